//! The flow registry in process: what one engine costs per tracked flow, and how long the packet
//! path waits while the engine lists, re-judges or syncs a million flows. No root, no kernel:
//! the sans-IO engine is driven as the daemon's queue worker drives it. Run it with
//! `cargo run --release -p flowgate-bench --bin registry` (see bench/README.md, "Registry").
//!
//! For each size (100,000 and 1,000,000 flows by default):
//!
//! * **memory**: heap bytes the engine holds per live flow (a counting global allocator: bytes
//!   allocated and not yet freed, after the flows were opened, minus before), and the process's
//!   resident memory per flow. The flows are UDP and TCP (one packet each, the first of a flow),
//!   IPv4 and IPv6 (one in eight), on two interfaces, as the kernel-handled flows of a host are.
//! * **listing**: a reader thread lists every flow through a [`flowgate_core::Handle`] while the
//!   driver loop keeps judging new packets and calls `handle_timeout`; the time to list all, and
//!   the longest single `handle_timeout` or `handle_packet` call meanwhile (the stall a packet
//!   could see).
//! * **sync**: one kernel sync's worth of reports (every flow, in batches of
//!   [`flowgate_core::KERNEL_BATCH`]) fed through the handle, as the daemon's sync thread does; the
//!   time to take them all, and the longest call meanwhile.
//! * **reload**: new rules for every live flow; the time to re-judge them all, and the longest
//!   call.
//!
//! "Longest call" is given in this thread's CPU time (the engine's own work, whatever else the
//! machine runs) and in wall time. Transparent huge pages are off, as in the daemon; `--thp`
//! keeps them. Sizes: the first argument, e.g. `100000,1000000`. The last line of stdout is one
//! JSON object with every figure.

use std::alloc::{GlobalAlloc, Layout};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant as StdInstant};

use etherparse::PacketBuilder;
use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::rules::{Action, Rule, RuleSet, parse_network};
use flowgate_core::{
    Engine, EngineConfig, Instant, KERNEL_BATCH, KernelReport, KernelState, KernelSync, Origin, PacketMeta, Protocol,
    Selector,
};
use serde_json::json;

/// Counts the bytes allocated and not yet freed, on top of mimalloc, the daemon's allocator
/// (`crates/flowgate/src/main.rs`).
struct Counting;

static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed to mimalloc unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller's contract is the inner allocator's.
        unsafe { INNER.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { INNER.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { INNER.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The `i`-th flow's endpoints: unique for every `i` below 2^32.
fn endpoints(i: u64) -> (SocketAddr, SocketAddr) {
    let port = 1024 + (i % 60_000) as u16;
    let host = (i / 60_000) as u32;
    if i % 8 == 7 {
        let remote = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, (host >> 16) as u16, host as u16);
        (
            SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1)), 40_000),
            SocketAddr::new(IpAddr::V6(remote), port),
        )
    } else {
        let remote = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + host);
        (SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 40_000), SocketAddr::new(IpAddr::V4(remote), port))
    }
}

/// The first packet of flow `i`: a SYN or a datagram.
fn first_packet(i: u64, out: &mut Vec<u8>) {
    out.clear();
    let (l, r) = endpoints(i);
    let b = match (l.ip(), r.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => PacketBuilder::ipv4(a.octets(), b.octets(), 64),
        (IpAddr::V6(a), IpAddr::V6(b)) => PacketBuilder::ipv6(a.octets(), b.octets(), 64),
        _ => unreachable!("one family per flow"),
    };
    let written = if i.is_multiple_of(2) {
        b.tcp(l.port(), r.port(), 1000, 65535).syn().write(out, &[])
    } else {
        b.udp(l.port(), r.port()).write(out, b"q")
    };
    written.expect("packet");
}

fn config(n: usize) -> EngineConfig {
    EngineConfig { max_flows: n + 10, kernel_offload: true, ..EngineConfig::default() }
}

fn t(micros: u64) -> Instant {
    Instant::from_micros(1_800_000_000_000_000 + micros)
}

/// Opens flows `0..n` in `e`, as settled flows the kernel then handles.
fn fill(e: &mut Engine, n: u64) {
    let mut buf = Vec::with_capacity(128);
    for i in 0..n {
        first_packet(i, &mut buf);
        let meta = PacketMeta { interface: Some(if i % 2 == 0 { "eth0" } else { "tun0" }), origin: Origin::Output };
        let d = e.handle_packet(t(i), meta, &buf);
        assert!(d.settled && d.flow.is_some(), "flow {i} tracked and settled");
        while e.poll_event().is_some() {}
    }
}

/// Whether the engine has work it wants done at once (commands waiting, a sweep going on).
fn busy(e: &Engine) -> bool {
    e.poll_timeout() == Some(Instant::ZERO)
}

/// The longest single call seen while driving: wall time (includes being preempted by other
/// processes) and this thread's CPU time (the engine's own work).
#[derive(Copy, Clone, Default)]
struct Longest {
    wall: Duration,
    cpu: Duration,
}

impl Longest {
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let (w, c) = (StdInstant::now(), cpu());
        let out = f();
        self.wall = self.wall.max(w.elapsed());
        self.cpu = self.cpu.max(cpu().saturating_sub(c));
        out
    }
}

/// Runs `engine` as a queue worker does (commands, a new packet, then handle_timeout when due)
/// until `done`; returns the longest call and how many packets were judged meanwhile.
fn drive(e: &mut Engine, first_new: u64, mut done: impl FnMut(&Engine) -> bool) -> (Longest, u64) {
    let mut longest = Longest::default();
    let mut buf = Vec::with_capacity(128);
    let mut i = first_new;
    // Time goes on from where the flows were opened (a microsecond per flow).
    let mut now = 2 * first_new.max(1);
    while !done(e) {
        first_packet(i, &mut buf);
        i += 1;
        now += 20;
        longest.time(|| e.handle_commands(t(now)));
        let meta = PacketMeta { interface: Some("eth0"), origin: Origin::Output };
        let _ = longest.time(|| e.handle_packet(t(now), meta, &buf));
        if e.poll_timeout().is_some_and(|d| d <= t(now)) {
            longest.time(|| e.handle_timeout(t(now)));
        }
        while e.poll_event().is_some() {}
        while e.poll_enforce().is_some() {}
    }
    (longest, i - first_new)
}

fn cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(n: u64) -> serde_json::Value {
    let rules = Arc::new(CompiledRules::compile(RuleSet::default()));
    let heap0 = LIVE.load(Ordering::Relaxed);
    let rss0 = rss_bytes();
    let mut e = Engine::new(config(n as usize), rules);
    let t0 = StdInstant::now();
    fill(&mut e, n);
    let fill_s = t0.elapsed().as_secs_f64();
    let heap = (LIVE.load(Ordering::Relaxed) - heap0) as f64 / n as f64;
    let rss = rss_bytes().saturating_sub(rss0) as f64 / n as f64;
    let fp = e.footprint();
    println!(
        "{n:>9} flows: opened at {:.0} flows/s; engine heap {heap:.0} B/flow, resident {rss:.0} B/flow; {} timers",
        n as f64 / fill_s,
        fp.timers
    );

    // Listing every flow while packets keep coming.
    let h = e.handle();
    let reader = std::thread::spawn(move || {
        let s = StdInstant::now();
        let mut listed = 0usize;
        let mut listing = h.list(Selector::all()).expect("listing");
        while let Some(chunk) = listing.next() {
            let chunk = chunk.expect("engine alive");
            listed += chunk.len();
            listing.give_back(chunk);
        }
        (listed, s.elapsed())
    });
    let (list_stall, judged) = drive(&mut e, n, |_| reader.is_finished());
    let (listed, list_time) = reader.join().expect("reader");
    assert!(listed as u64 >= n, "listed {listed} of {n}");
    println!(
        "{:>9}   listing: {listed} flows in {:.0} ms ({:.2} M flows/s) while {judged} new packets were judged; longest call {:.3} ms CPU ({:.3} ms wall)",
        "",
        ms(list_time),
        listed as f64 / list_time.as_secs_f64() / 1e6,
        ms(list_stall.cpu),
        ms(list_stall.wall)
    );

    // One sync's worth of kernel reports.
    let h = e.handle();
    let total = n;
    let feeder = std::thread::spawn(move || {
        let s = StdInstant::now();
        let _ = h.kernel_sync(KernelSync::Start { generation: 1, at: t(0) }, Duration::from_secs(60));
        let mut batch = Vec::with_capacity(KERNEL_BATCH);
        for i in 0..total {
            let (l, r) = endpoints(i);
            let protocol = if i % 2 == 0 { Protocol::Tcp } else { Protocol::Udp };
            batch.push(KernelReport {
                protocol,
                opener: l,
                responder: r,
                from_opener: Some((5, 500)),
                from_responder: Some((5, 500)),
                id: Some(i as u32),
                state: KernelState::Alive,
                decided: None,
            });
            if batch.len() == KERNEL_BATCH {
                h.kernel_reports(std::mem::take(&mut batch), Duration::from_secs(60)).expect("reports");
            }
        }
        h.kernel_reports(batch, Duration::from_secs(60)).expect("reports");
        let _ = h.kernel_sync(KernelSync::Done { generation: 1 }, Duration::from_secs(60));
        s.elapsed()
    });
    let (sync_stall, _) = drive(&mut e, 2 * n, |e| feeder.is_finished() && !busy(e));
    let sync_time = feeder.join().expect("feeder");
    println!(
        "{:>9}   sync of {n} reports: {:.0} ms; longest call {:.3} ms CPU ({:.3} ms wall)",
        "",
        ms(sync_time),
        ms(sync_stall.cpu),
        ms(sync_stall.wall)
    );

    // A reload whose rules match nothing: every flow is judged again.
    let mut r = Rule::new("never", Action::Drop);
    r.remote = vec![parse_network("192.0.2.99").expect("net")];
    e.reload(t(0), Arc::new(CompiledRules::compile(RuleSet { rules: vec![r], default_action: Action::Allow })));
    let s = StdInstant::now();
    let (reload_stall, _) = drive(&mut e, 3 * n, |e| !busy(e));
    println!(
        "{:>9}   reload: {:.0} ms; longest call {:.3} ms CPU ({:.3} ms wall)",
        "",
        ms(s.elapsed()),
        ms(reload_stall.cpu),
        ms(reload_stall.wall)
    );
    json!({
        "flows": n,
        "open_flows_per_s": n as f64 / fill_s,
        "heap_bytes_per_flow": heap,
        "resident_bytes_per_flow": rss,
        "timers": fp.timers,
        "list_ms": ms(list_time),
        "list_longest_call_cpu_ms": ms(list_stall.cpu),
        "list_longest_call_wall_ms": ms(list_stall.wall),
        "sync_ms": ms(sync_time),
        "sync_longest_call_cpu_ms": ms(sync_stall.cpu),
        "sync_longest_call_wall_ms": ms(sync_stall.wall),
        "reload_longest_call_cpu_ms": ms(reload_stall.cpu),
        "reload_longest_call_wall_ms": ms(reload_stall.wall),
    })
}

fn main() {
    // As the daemon does (`daemon::run`): no transparent huge pages, whose first touch costs a
    // queue worker milliseconds. `--thp` keeps them, to compare.
    let thp = std::env::args().any(|a| a == "--thp");
    if !thp {
        // SAFETY: prctl with these arguments only sets a flag of this process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    let sizes: Vec<u64> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .map(|a| a.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    let mut results = Vec::new();
    for n in sizes {
        results.push(measure(n));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("{}", json!({"bench": "registry", "cpus": cpus, "transparent_huge_pages": thp, "results": results}));
}
