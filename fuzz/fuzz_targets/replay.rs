//! `flowgate::replay::replay`: the capture reader (pcap and pcapng framed record by record and
//! decoded by `pcap-file`'s parsers; the link layers: Ethernet with VLAN tags, Linux cooked
//! v1/v2, raw IP, BSD loopback) and the engine behind it, over a capture file written from the
//! input, with the example config (plus a small `max_flows`, so the full-table path is reached
//! too).
//!
//! Checks: no panic; on success, the summary adds up (packets judged plus non-IP frames never
//! exceed frames), every flow opened was closed by the end of the capture (the replay closes
//! what is still open), and the events written are JSON lines whose `flow.new` and
//! `flow.closed` counts match the engine's counters.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use flowgate::config::Config;
use libfuzzer_sys::fuzz_target;

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = format!("max_flows = 32\n{}", include_str!("../../examples/flowgate.toml"));
        flowgate::config::parse(std::path::Path::new("examples/flowgate.toml"), &text).expect("example config")
    })
}

fn capture_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("flowgate-fuzz-replay-{}.cap", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = capture_path();
    {
        let mut f = std::fs::File::create(path).expect("create the capture file");
        f.write_all(data).expect("write the capture file");
    }
    let mut engine = flowgate::cli::replay_engine(Some(config()));
    let mut out = Vec::new();
    let Ok(summary) = flowgate::replay::replay(&mut engine, path, &mut out) else { return };
    let e = &summary.engine;
    assert!(e.packets + summary.non_ip_frames <= summary.frames, "{summary:?}");
    assert_eq!(e.flows_opened, e.flows_closed, "flows left open after the replay: {summary:?}");
    let (mut new, mut closed, mut lines) = (0, 0, 0);
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("an event line is JSON");
        match v["event"].as_str() {
            Some("flow.new") => new += 1,
            Some("flow.closed") => closed += 1,
            Some(_) => {}
            None => panic!("event without a name: {v}"),
        }
        lines += 1;
    }
    assert_eq!(lines, summary.events, "{summary:?}");
    assert_eq!((new, closed), (e.flows_opened, e.flows_closed), "{summary:?}");
    let f = engine.footprint();
    assert_eq!((f.flows, f.timers, f.held_packets), (0, 0, 0), "{f:?}");
});
