//! Replay throughput, in packets per second, over a synthetic capture.
//!
//! The capture (2,000 TCP flows of 16 packets with 500-byte segments and 1,000 UDP flows of 4
//! datagrams, raw-IP pcap) is written once to a temp file and removed at the end. Group
//! `replay`, throughput in packets:
//!
//! - `pcap-read-baseline`: open the file and read every packet with pcap-file, summing lengths;
//!   no engine. The floor under any replay.
//! - `allow-all`: `flowgate::replay::replay` with `flowgate::cli::replay_engine(None)` (no
//!   rules, allow everything), events serialized to `io::sink()`.
//! - `rules-10k`: the same engine with 10,000 generated rules installed (`Engine::set_rules`).
//!
//! Each replay iteration gets a fresh engine, built and dropped outside the timed region.

use std::fs::File;
use std::hint::black_box;
use std::io::{self, BufReader};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use flowgate::cli::replay_engine;
use flowgate::replay::replay;
use flowgate_bench::{CaptureSpec, TempFile, generate_rules, write_capture};
use flowgate_core::Engine;
use flowgate_core::rules::matcher::CompiledRules;
use pcap_file::pcap::PcapReader;

/// Reads every packet of the capture the way the replay does (buffered file, pcap-file reader)
/// and returns the sum of their lengths, or `None` if the file cannot be read.
fn read_capture(path: &Path) -> Option<u64> {
    let mut reader = PcapReader::new(BufReader::new(File::open(path).ok()?)).ok()?;
    let mut sum = 0u64;
    while let Some(p) = reader.next_packet() {
        sum += p.ok()?.data.len() as u64;
    }
    Some(sum)
}

fn engine_with(rules: Option<&Arc<CompiledRules>>) -> Engine {
    let mut engine = replay_engine(None);
    if let Some(r) = rules {
        engine.set_rules(Arc::clone(r));
    }
    engine
}

fn replay_bench(c: &mut Criterion) {
    let capture = TempFile::new("flowgate-bench-replay", "pcap");
    let path = capture.path();
    let info = write_capture(path, &CaptureSpec::default()).expect("writing the synthetic capture");
    let (set, _) = generate_rules(10_000, 0x9e37_79b9_7f4a_7c15).expect("generating 10,000 rules");
    let rules = Arc::new(CompiledRules::compile(set));

    // Check once, untimed, that the capture and both engines do what the numbers claim.
    assert_eq!(read_capture(path), Some(info.ip_bytes), "pcap-read baseline");
    for r in [None, Some(&rules)] {
        let mut engine = engine_with(r);
        let s = replay(&mut engine, path, &mut io::sink()).expect("replaying the synthetic capture");
        assert_eq!(s.frames, info.packets, "frames replayed");
        assert_eq!(s.non_ip_frames + s.engine.malformed + s.engine.truncated + s.engine.fragments, 0);
        assert_eq!(s.engine.flows_opened, info.flows, "flows opened");
    }

    let mut group = c.benchmark_group("replay");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat)
        .throughput(Throughput::Elements(info.packets));
    group.bench_function("pcap-read-baseline", |b| b.iter(|| read_capture(black_box(path))));
    for (name, r) in [("allow-all", None), ("rules-10k", Some(&rules))] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || engine_with(r),
                |mut engine| {
                    let summary = replay(&mut engine, black_box(path), &mut io::sink()).map(|s| s.events);
                    // Returned so that the engine's teardown happens outside the timing.
                    (engine, summary)
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
    drop(capture);
}

criterion_group!(benches, replay_bench);
criterion_main!(benches);
