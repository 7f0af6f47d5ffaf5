//! Live benchmark: the real `flowgate run` daemon in the namespace lab, measured against the same
//! traffic with no filter at all. Run it with `bench/live.sh` (root); see bench/README.md, "Live".
//!
//! One run measures three configurations, in this order, each in a fresh lab
//! (`crates/flowgate/tests/lab/mod.rs`: namespaces `cli`, `host`, `srv`):
//!
//! 1. `none`: no filter;
//! 2. `flowgate`: `flowgate run` in `host` with 2 queues and no rules (allow everything);
//! 3. `flowgate-100k-rules`: the same with 100,000 `/32` drop rules in 198.18.0.0/15 that the
//!    benchmark traffic never uses, so every flow is still allowed after matching.
//!
//! The client is `host` itself (198.51.100.1), the servers are on 203.0.113.10 in `srv`:
//!
//! * bulk: one TCP flow to a sink, 128 KiB writes for ~3 s or 2 GiB, whichever comes first;
//!   throughput counted until the sink confirmed every byte;
//! * connects: sequential new TCP connections, each from a source port of its own, to an
//!   accept-and-close server, each closed by the client with SO_LINGER 0 (a RST, so no
//!   TIME_WAIT); connections per second over the loop, and the time of each `connect()` (SYN to
//!   established), median and 99th percentile.
//!
//! The results are printed as a table and as ratios against `none`, and the last line of stdout
//! is one JSON object with everything (also written to `--json FILE`).
//!
//! Cleanup: the lab's guards delete every namespace (killing what is inside) and stop the daemon
//! (SIGTERM, then SIGKILL) when a configuration ends, also when it fails. SIGINT, SIGTERM and
//! SIGHUP are taken by a thread that kills everything in this process's namespaces, deletes
//! them and exits; in a build with `panic = "abort"` (the workspace's release profile), where no
//! guard runs on a panic, a panic hook does the same. `bench/live.sh` builds this binary with
//! unwinding panics, so a failure unwinds through the guards.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flowgate_bench::args::{Args, number};
use flowgate_bench::connect::{
    AcceptServer, FIRST_CLIENT_PORT, LAST_CLIENT_PORT, Latencies, client_ports, connect_once,
};
use flowgate_bench::counters::tcp_ext;
use flowgate_bench::daemon::{self, Daemon, check_stopped_alone, read_events};
use flowgate_bench::guard::{TempDir, begin, emergency_cleanup, namespaces_left};
use flowgate_bench::lab::{self, Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::report::{loadavg, print_result, round};
use nix::sys::socket::SockaddrIn;
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// Port of the bulk sink and of the accept server on 203.0.113.10.
const SINK_PORT: u16 = 5001;
const ACCEPT_PORT: u16 = 5002;
/// The bulk flow stops after this many bytes even if time is left.
const BULK_MAX_BYTES: u64 = 2 << 30;
/// Rules of the large configuration.
const BIG_RULES: usize = 100_000;
/// The daemon may take 120 s to print its ready line (the config loader was slow on huge rule
/// files; see bench/README.md) and 60 s to exit after SIGTERM; all its stderr lines are echoed.
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(120),
    stop_timeout: Duration::from_secs(60),
    echo_lines: usize::MAX,
    echo_more: "",
};

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    connects: usize,
    warmup: usize,
    bulk_seconds: f64,
    /// Names of the configurations to run (all three by default).
    configs: Vec<String>,
}

const USAGE: &str = "usage: live [--flowgate PATH] [--json FILE] [--connects N] [--warmup N] [--bulk-seconds S]
            [--configs none,flowgate,flowgate-100k-rules]

Runs as root. Measures bulk TCP throughput and new-connection rate and latency from the lab's
`host` namespace to `srv`, with no filter, with flowgate (no rules) and with flowgate and 100,000
rules, and prints ratios against no filter (when `none` is among --configs). Defaults:
--connects 3000 --warmup 100 --bulk-seconds 3, all configurations; --flowgate defaults to `flowgate` next to this binary, else
<workspace>/target/release/flowgate.";

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        flowgate: PathBuf::new(),
        json: None,
        connects: 3000,
        warmup: 100,
        bulk_seconds: 3.0,
        configs: SPECS.iter().map(|s| s.name.to_string()).collect(),
    };
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        match a.as_str() {
            "--connects" => opts.connects = number(&args.value("--connects")?, "--connects", 1.0, 1e6)? as usize,
            "--warmup" => opts.warmup = number(&args.value("--warmup")?, "--warmup", 0.0, 1e6)? as usize,
            "--bulk-seconds" => {
                opts.bulk_seconds = number(&args.value("--bulk-seconds")?, "--bulk-seconds", 0.1, 60.0)?;
            }
            "--configs" => {
                let list = args.value("--configs")?;
                opts.configs = list.split(',').map(str::to_string).collect();
                if let Some(bad) = opts.configs.iter().find(|c| !SPECS.iter().any(|s| s.name == c.as_str())) {
                    return Err(format!("--configs: unknown configuration `{bad}`\n\n{USAGE}"));
                }
            }
            other => return Err(args.unknown(other)),
        }
    }
    let ports = client_ports();
    if opts.warmup + opts.connects > ports {
        return Err(format!("--warmup + --connects must not exceed {ports} (one client port per connection)"));
    }
    (opts.flowgate, opts.json) = args.finish()?;
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// The config lines after run_dir, log and 2 queues: `rules` drop rules on distinct /32s in
/// 198.18.1.0 .. 198.19.135.159 (inside 198.18.0.0/15; 198.18.0.0/24 is left out because the
/// lab's `cli` namespace uses it).
///
/// The rules are one array of inline tables on a single line (one `[[rule]]` table per rule
/// loads as fast since the loader binary-searches line starts; this layout is just shorter).
fn rules_config(rules: usize) -> String {
    let mut text = String::new();
    if rules > 0 {
        assert!(rules <= (1 << 17) - 256, "{rules} distinct /32s do not fit in 198.18.1.0 .. 198.19.255.255");
        text.reserve(rules * 48);
        text.push_str("rule = [");
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0));
        for i in 0..rules {
            let ip = std::net::Ipv4Addr::from(base + i as u32);
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{{remote=\"{ip}/32\",action=\"drop\"}}");
        }
        text.push_str("]\n");
    }
    text
}

/// What the event log holds.
struct EventCounts {
    by_type: BTreeMap<String, u64>,
    /// `flow.new` of TCP flows to the service address.
    tcp_new: u64,
    /// The other `flow.new` flows (`protocol local -> remote`), at most 10.
    other_new: Vec<String>,
}

/// Counts the events of an event log by type, and the `flow.new` of TCP flows to `to`.
fn count_events(path: &Path, to: std::net::Ipv4Addr) -> Result<EventCounts> {
    let mut c = EventCounts { by_type: BTreeMap::new(), tcp_new: 0, other_new: Vec::new() };
    for v in read_events(path)? {
        let kind = v["event"].as_str().unwrap_or("?").to_string();
        if kind == "flow.new" {
            let f = &v["flow"];
            if daemon::is_tcp_to(f, to) {
                c.tcp_new += 1;
            } else if c.other_new.len() < 10 {
                let s = |k: &str| f[k].as_str().unwrap_or("?").to_string();
                c.other_new.push(format!("{} {} -> {} ({})", s("protocol"), s("local"), s("remote"), s("direction")));
            }
        }
        *c.by_type.entry(kind).or_insert(0) += 1;
    }
    Ok(c)
}

// ---------------------------------------------------------------------------------------------
// iptables counters
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Default, Debug)]
struct Count {
    pkts: u64,
    bytes: u64,
}

/// Counters of the two rules of a flowgate chain that matter here: the RETURN of flows whose
/// conntrack mark says "allowed" (handled by the kernel alone) and the NFQUEUE at the end.
#[derive(Clone, Copy, Default, Debug)]
struct ChainCounters {
    allow_return: Count,
    nfqueue: Count,
}

impl ChainCounters {
    fn since(self, before: ChainCounters) -> ChainCounters {
        let d = |a: Count, b: Count| Count { pkts: a.pkts - b.pkts.min(a.pkts), bytes: a.bytes - b.bytes.min(a.bytes) };
        ChainCounters {
            allow_return: d(self.allow_return, before.allow_return),
            nfqueue: d(self.nfqueue, before.nfqueue),
        }
    }

    fn json(self) -> Value {
        json!({
            "connmark_allow_return": {"pkts": self.allow_return.pkts, "bytes": self.allow_return.bytes},
            "nfqueue": {"pkts": self.nfqueue.pkts, "bytes": self.nfqueue.bytes},
        })
    }

    fn describe(self) -> String {
        format!(
            "connmark-allow RETURN {} pkts / {} bytes, NFQUEUE {} pkts / {} bytes",
            self.allow_return.pkts, self.allow_return.bytes, self.nfqueue.pkts, self.nfqueue.bytes
        )
    }
}

/// The chains whose counters are read: locally generated packets and packets to the host.
const CHAINS: [&str; 2] = ["FLOWGATE-OUT", "FLOWGATE-IN"];

/// Reads `iptables -L CHAIN -v -x -n` in `ns`.
fn chain_counters(ns: &Netns, chain: &str) -> Result<ChainCounters> {
    let o = ns.run(&["iptables", "-L", chain, "-v", "-x", "-n"]);
    if !o.status.success() {
        return Err(format!("iptables -L {chain}: {}", String::from_utf8_lossy(&o.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let mut c = ChainCounters::default();
    let (mut allow, mut queue) = (false, false);
    for line in text.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(pkts), Some(bytes), Some(target)) =
            (f.first().and_then(|s| s.parse().ok()), f.get(1).and_then(|s| s.parse().ok()), f.get(2))
        else {
            continue;
        };
        let n = Count { pkts, bytes };
        if *target == "NFQUEUE" {
            // The owner rules and the balancing rule, added up.
            c.nfqueue = Count { pkts: c.nfqueue.pkts + n.pkts, bytes: c.nfqueue.bytes + n.bytes };
            queue = true;
        } else if *target == "RETURN"
            && line.contains("connmark match")
            && line.contains("0x10000/0x30000")
            && !line.contains("flags:")
            && !line.contains("ctstate")
        {
            c.allow_return = n;
            allow = true;
        }
    }
    if !(allow && queue) {
        return Err(format!("iptables -L {chain}: connmark-allow RETURN or NFQUEUE rule not found:\n{text}"));
    }
    Ok(c)
}

fn all_chain_counters(ns: &Netns) -> Result<Vec<ChainCounters>> {
    CHAINS.iter().map(|c| chain_counters(ns, c)).collect()
}

// ---------------------------------------------------------------------------------------------
// Servers and clients
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Bulk {
    bytes: u64,
    seconds: f64,
}

impl Bulk {
    fn gbit_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

/// One TCP flow to the sink: 128 KiB writes for `seconds` or 2 GiB, then a half-close; the time
/// runs until the sink's reply confirms it received every byte.
fn bulk(to: SocketAddr, seconds: f64) -> Result<Bulk> {
    let (bytes, seconds) = flowgate_bench::bulk::to_sink(to, seconds, BULK_MAX_BYTES)?;
    Ok(Bulk { bytes, seconds })
}

/// One connect loop: the timed connections' connect() times and how long the loop took.
#[derive(Debug)]
struct Connects {
    latencies: Latencies,
    seconds: f64,
}

impl Connects {
    /// Timed connections per second of the whole loop.
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }
}

/// `warmup` untimed connections, then `n` timed ones, one after the other.
fn connect_loop(to: SocketAddrV4, warmup: usize, n: usize) -> Result<Connects> {
    let to = SockaddrIn::from(to);
    let mut ports = FIRST_CLIENT_PORT..=LAST_CLIENT_PORT;
    let mut next_port = || ports.next().ok_or_else(|| "out of client ports".to_string());
    for _ in 0..warmup {
        connect_once(&to, next_port()?)?;
    }
    let mut latencies = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        latencies.push(connect_once(&to, next_port()?).map_err(|e| format!("connection {} of {n}: {e}", i + 1))?);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Connects { latencies: Latencies::new(latencies.iter().map(|d| d.as_secs_f64() * 1e6).collect()), seconds })
}

// ---------------------------------------------------------------------------------------------
// One configuration
// ---------------------------------------------------------------------------------------------

struct Spec {
    name: &'static str,
    /// Lab tag (goes into the namespace names).
    tag: &'static str,
    /// None: no filter; Some(n): flowgate with n rules.
    rules: Option<usize>,
}

const SPECS: [Spec; 3] = [
    Spec { name: "none", tag: "none", rules: None },
    Spec { name: "flowgate", tag: "fg", rules: Some(0) },
    Spec { name: "flowgate-100k-rules", tag: "fg100k", rules: Some(BIG_RULES) },
];

struct DaemonReport {
    ready: Duration,
    stopped: Duration,
    events: EventCounts,
    expected_flows: u64,
    /// Per chain ([`CHAINS`]), during the bulk run and during the connection loop (warm-up
    /// included), or why they could not be read.
    chains_bulk: Result<Vec<ChainCounters>>,
    chains_connects: Result<Vec<ChainCounters>>,
}

struct Outcome {
    bulk: Bulk,
    connects: Connects,
    accepted: u64,
    /// During the connect loop: SYNs `host` retransmitted (each one is a connect() of 1 s or
    /// more), and connections `srv`'s listen queue refused.
    syn_retrans: u64,
    listen_overflows: u64,
    daemon: Option<DaemonReport>,
}

fn run_spec(spec: &Spec, opts: &Opts) -> Result<Outcome> {
    // Drop order (reverse of declaration): daemon, temp dir, servers, lab.
    let lab = Lab::new(spec.tag);
    let sink = lab::tcp_sink(&lab.srv, lab::sa(SRV_SERVICE_V4, SINK_PORT));
    let acceptor = AcceptServer::start(&lab.srv, SocketAddrV4::new(SRV_SERVICE_V4, ACCEPT_PORT))?;
    let tmp = TempDir::new(spec.tag)?;
    let mut daemon = None;
    let mut ready = Duration::ZERO;
    if let Some(rules) = spec.rules {
        let t = Instant::now();
        let config = daemon::write_config(&tmp, &rules_config(rules))?;
        if rules > 0 {
            eprintln!("live: [{}] wrote {rules} rules in {:.2} s", spec.name, t.elapsed().as_secs_f64());
        }
        let started = Daemon::start(&lab.host, &opts.flowgate, &config, &DAEMON)?;
        daemon = Some(started.daemon);
        ready = started.took;
        eprintln!("live: [{}] flowgate ready after {:.2} s", spec.name, ready.as_secs_f64());
    }

    let counters = |d: &Option<Daemon>| d.as_ref().map(|_| all_chain_counters(&lab.host));
    let before_bulk = counters(&daemon);
    let secs = opts.bulk_seconds;
    let b = lab.host.in_ns(move || bulk(lab::sa(SRV_SERVICE_V4, SINK_PORT), secs))?;
    eprintln!("live: [{}] bulk: {:.2} Gbit/s ({} bytes in {:.2} s)", spec.name, b.gbit_s(), b.bytes, b.seconds);
    let after_bulk = counters(&daemon);

    let (warmup, n) = (opts.warmup, opts.connects);
    let (syn_before, overflow_before) = (tcp_ext(&lab.host, "TCPSynRetrans")?, tcp_ext(&lab.srv, "ListenOverflows")?);
    let c = lab.host.in_ns(move || connect_loop(SocketAddrV4::new(SRV_SERVICE_V4, ACCEPT_PORT), warmup, n))?;
    let syn_retrans = tcp_ext(&lab.host, "TCPSynRetrans")? - syn_before;
    let listen_overflows = tcp_ext(&lab.srv, "ListenOverflows")? - overflow_before;
    eprintln!(
        "live: [{}] connects: {:.0}/s, p50 {:.1} µs, p99 {:.1} µs; {syn_retrans} SYN retransmissions",
        spec.name,
        c.rate(),
        c.latencies.p(50.0),
        c.latencies.p(99.0)
    );
    let after_connects = counters(&daemon);

    let report = match daemon.take() {
        None => None,
        Some(d) => {
            let (stopped, _) = d.stop()?;
            let events = count_events(&tmp.log(), SRV_SERVICE_V4)?;
            let delta = |a: Option<Result<Vec<ChainCounters>>>, b: Option<Result<Vec<ChainCounters>>>| match (a, b) {
                (Some(Ok(a)), Some(Ok(b))) => {
                    Ok(a.into_iter().zip(b).map(|(after, before)| after.since(before)).collect())
                }
                (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
                _ => Err("not read".to_string()),
            };
            let bulk_counters = delta(after_bulk.clone(), before_bulk);
            let connect_counters = delta(after_connects, after_bulk);
            Some(DaemonReport {
                ready,
                stopped,
                events,
                expected_flows: 1 + (warmup + n) as u64,
                chains_bulk: bulk_counters,
                chains_connects: connect_counters,
            })
        }
    };
    let accepted = acceptor.accepted();
    if let Some(r) = &report {
        check_stopped_alone(&lab.host)?;
        eprintln!("live: [{}] flowgate stopped (exit 0) after {:.2} s", spec.name, r.stopped.as_secs_f64());
    }
    drop(sink);
    Ok(Outcome { bulk: b, connects: c, accepted, syn_retrans, listen_overflows, daemon: report })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn report(results: &[(&Spec, Outcome)], opts: &Opts, load: (String, String), wall: f64) -> (String, Value) {
    let mut out = String::new();
    let _ =
        writeln!(out, "\n== live: host 198.51.100.1 -> 203.0.113.10 (srv), one run, each configuration in a fresh lab");
    let _ = writeln!(
        out,
        "{:<22} {:>12} {:>12} {:>15} {:>15} {:>9}",
        "configuration", "bulk Gbit/s", "connects/s", "connect p50 µs", "connect p99 µs", "SYN rtx"
    );
    for (spec, o) in results {
        let _ = writeln!(
            out,
            "{:<22} {:>12.2} {:>12.0} {:>15.1} {:>15.1} {:>9}",
            spec.name,
            o.bulk.gbit_s(),
            o.connects.rate(),
            o.connects.latencies.p(50.0),
            o.connects.latencies.p(99.0),
            o.syn_retrans
        );
    }
    let base = results.iter().find(|(s, _)| s.rules.is_none()).map(|(_, o)| o);
    let mut ratios = serde_json::Map::new();
    if base.is_some() && results.iter().any(|(s, _)| s.rules.is_some()) {
        let _ =
            writeln!(out, "\n== ratios vs none (bulk and connect rate: higher is better; latency: lower is better)");
    }
    for (spec, o) in results.iter().filter(|(s, _)| s.rules.is_some()) {
        let Some(base) = base else { break };
        let r = [
            ("bulk", o.bulk.gbit_s() / base.bulk.gbit_s()),
            ("connect rate", o.connects.rate() / base.connects.rate()),
            ("connect p50", o.connects.latencies.p(50.0) / base.connects.latencies.p(50.0)),
            ("connect p99", o.connects.latencies.p(99.0) / base.connects.latencies.p(99.0)),
        ];
        let mut m = serde_json::Map::new();
        for (what, x) in r {
            let _ = writeln!(out, "{} {what}: {x:.2}x", spec.name);
            m.insert(what.replace(' ', "_"), json!(round(x, 3)));
        }
        ratios.insert(spec.name.to_string(), Value::Object(m));
    }
    if results.iter().any(|(_, o)| o.daemon.is_some()) {
        let _ = writeln!(out, "\n== flowgate sanity");
    }
    let mut configs = serde_json::Map::new();
    for (spec, o) in results {
        let mut v = json!({
            "bulk": {
                "gbit_s": round(o.bulk.gbit_s(), 3),
                "bytes": o.bulk.bytes,
                "seconds": round(o.bulk.seconds, 4),
            },
            "connects": {
                "count": o.connects.latencies.len(),
                "warmup": opts.warmup,
                "seconds": round(o.connects.seconds, 4),
                "per_second": round(o.connects.rate(), 1),
                "p50_us": round(o.connects.latencies.p(50.0), 1),
                "p90_us": round(o.connects.latencies.p(90.0), 1),
                "p99_us": round(o.connects.latencies.p(99.0), 1),
                "mean_us": round(o.connects.latencies.mean(), 1),
                "max_us": round(o.connects.latencies.max(), 1),
                "server_accepted": o.accepted,
                "syn_retransmissions": o.syn_retrans,
                "listen_overflows": o.listen_overflows,
            },
        });
        if let Some(d) = &o.daemon {
            let ok = d.events.tcp_new == d.expected_flows;
            let events: Vec<String> = d.events.by_type.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let _ = writeln!(
                out,
                "{}: ready after {:.2} s, stopped (exit 0) after {:.2} s; events: {}",
                spec.name,
                d.ready.as_secs_f64(),
                d.stopped.as_secs_f64(),
                if events.is_empty() { "none".to_string() } else { events.join(", ") }
            );
            let _ = writeln!(
                out,
                "{}: flow.new for TCP to 203.0.113.10: {} (expected {}: 1 bulk + {} warm-up + {} timed connections){}",
                spec.name,
                d.events.tcp_new,
                d.expected_flows,
                opts.warmup,
                opts.connects,
                if ok { "" } else { "  <-- MISMATCH" }
            );
            for other in &d.events.other_new {
                let _ = writeln!(out, "{}: other flow: {other}", spec.name);
            }
            let chains = |r: &Result<Vec<ChainCounters>>, during: &str, out: &mut String| -> Value {
                match r {
                    Ok(v) => {
                        let mut m = serde_json::Map::new();
                        for (name, c) in CHAINS.iter().zip(v) {
                            let _ = writeln!(out, "{}: {name} during {during}: {}", spec.name, c.describe());
                            m.insert(name.to_string(), c.json());
                        }
                        Value::Object(m)
                    }
                    Err(e) => {
                        let _ = writeln!(out, "{}: counters during {during}: {e}", spec.name);
                        json!({ "error": e })
                    }
                }
            };
            let bulk_chains = chains(&d.chains_bulk, "bulk", &mut out);
            let connect_chains = chains(&d.chains_connects, "connects (warm-up included)", &mut out);
            v["flowgate"] = json!({
                "ready_seconds": round(d.ready.as_secs_f64(), 3),
                "stop_seconds": round(d.stopped.as_secs_f64(), 3),
                "exit": 0,
                "events": d.events.by_type,
                "tcp_flow_new": d.events.tcp_new,
                "other_flows": d.events.other_new,
                "expected_flows": d.expected_flows,
                "flows_match": ok,
                "iptables_during_bulk": bulk_chains,
                "iptables_during_connects": connect_chains,
            });
        }
        configs.insert(spec.name.to_string(), v);
    }
    let json = json!({
        "benchmark": "flowgate-live",
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg_start": load.0,
        "loadavg_end": load.1,
        "wall_seconds": round(wall, 1),
        "configs": Value::Object(configs),
        "ratios_vs_none": Value::Object(ratios),
    });
    (out, json)
}

fn main() {
    let opts = begin("live", "network namespaces, iptables, NFQUEUE", parse_opts);
    let start = Instant::now();
    let load_start = loadavg();
    eprintln!("live: flowgate binary {}, load average {load_start}", opts.flowgate.display());
    let mut results = Vec::new();
    for spec in SPECS.iter().filter(|s| opts.configs.iter().any(|c| c == s.name)) {
        eprintln!("live: [{}] starting", spec.name);
        match run_spec(spec, &opts) {
            Ok(o) => results.push((spec, o)),
            Err(e) => {
                eprintln!("live: [{}] failed: {e}", spec.name);
                std::process::exit(1);
            }
        }
    }
    let leftover = namespaces_left();
    if !leftover.is_empty() {
        eprintln!("live: namespaces left behind: {leftover:?}");
        emergency_cleanup();
        std::process::exit(1);
    }
    let (text, json) = report(&results, &opts, (load_start, loadavg()), start.elapsed().as_secs_f64());
    if let Err(e) = print_result(&text, &json, opts.json.as_deref()) {
        eprintln!("live: {e}");
        std::process::exit(1);
    }
}
