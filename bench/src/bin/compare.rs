//! Side-by-side benchmark (issue 14): the same workloads through five configurations of the
//! lab's `host` namespace, in interleaved rounds, each figure the median of the rounds with their
//! minimum and maximum. Run it with `bench/compare.sh` (root); see bench/README.md, "Side by
//! side".
//!
//! The configurations, each set up in a fresh lab (`crates/flowgate/tests/lab/mod.rs`) and torn
//! down again in every round, in an order rotated by one each round:
//!
//! 1. `none`: no filter, no iptables rule (so no conntrack either): the limit.
//! 2. `accept-all`: the floor of any user-space verdict. A minimal reader
//!    (`flowgate_bench::accept_all`, on flowgate's own NFQUEUE library) at the place flowgate's
//!    user-space judging uses: chains of its own jumped to from the filter table's `OUTPUT` and
//!    `INPUT` (position 1), that return loopback traffic, copy a verdict's packet mark to the
//!    conntrack mark, return flows whose conntrack mark says "allowed" (`0x10000/0x30000`,
//!    flowgate's mark) and queue everything else; the reader answers every packet at once with
//!    `NF_REPEAT` and that packet mark, so the rest of the flow returns in the kernel (see
//!    [`floor_feed`]). It does what flowgate's user-space path must do at the least: one queue
//!    round trip for a flow's first packet, and a mark so the others stay in the kernel. It
//!    decides nothing and keeps no state.
//! 3. `flowgate-kernel`: `flowgate run` with `default_action = "allow"` and static allow rules for
//!    the workloads' flows (protocol, remote address and port): rules that need nothing from user
//!    space, decided in the kernel when `kernel_rules` (default on) does that.
//! 4. `flowgate-user`: the same config with `kernel_rules = false`: every flow judged in user
//!    space.
//! 5. `opensnitch`: `opensnitchd` (Debian's 1.5.8) in `host`, default action allow, process
//!    monitor `proc`, firewall `iptables`, no UI (see `flowgate_bench::opensnitch`).
//!
//! The workloads, from `host` (198.51.100.1) to servers on 203.0.113.10 in `srv`, in this order in
//! each configuration and round:
//!
//! * memory per tracked flow: long-lived TCP connections opened one after the other to a server
//!   that holds them, 200 first (they take the filter's one-time costs of its first flows), then
//!   N more; the filter process's VmRSS once steady before and after the N, (after − before) / N;
//!   then all are closed (with a RST). Run first, on the fresh filter, so the allocator has no
//!   freed flows to reuse. Every configuration opens them; none and accept-all have no filter
//!   process and report n/a;
//! * new TCP connections: a warm-up, then sequential connect() + close (RST) from a source port of
//!   their own (as in live.rs): connections per second over the loop, connect() p50 and p99;
//! * UDP request/response: each request from a new socket on a new source port (a new flow each
//!   time, like a DNS lookup, but not on port 53, which OpenSnitch parses as DNS), 32 bytes to
//!   an echo server and the answer back: requests per second over the loop (socket creation
//!   included), round trip (send to receive) p50 and p99; the client and the server pinned to one
//!   CPU (see [`udp`]);
//! * bulk TCP: one flow of 128 KiB writes to the lab's sink for a few seconds, timed until the
//!   sink confirmed every byte (`flowgate_bench::bulk`).
//!
//! Also, per workload, the packets every NFQUEUE rule in `host` took (`iptables-save -c`): how
//! many packets per new flow went to user space; and during the timed connection and UDP loops
//! the filter's CPU time (`schedstat` of every thread of the daemon's process, or of the reader's
//! thread), per connection or request. After the network rounds of each round, rule
//! classification: flowgate's `CompiledRules::classify` in this process on the generated rule
//! sets of 100, 10,000 and 1,000,000 rules (`flowgate_bench::ClassifyFixture`, as the criterion
//! bench `classify`), median ns per lookup of batches, the sizes alternating batch by batch, for
//! three lookups.
//!
//! Output: `bench/results/compare.md` (a Markdown table, the goals as same-run ratios with pass or
//! miss, the machine) and `bench/results/compare.json` (the same data, every round, the machine,
//! the commit, the date, the load), both written only when every configuration and workload
//! completed; the last line of stdout is the JSON. Any configuration that cannot be set up, or a
//! workload that does not complete, ends the run with a message naming it and exit status 1.
//!
//! Cleanup: every guard undoes its part also on an error (servers, the reader and its rules, the
//! daemons, the lab's namespaces); SIGINT, SIGTERM and SIGHUP are taken by a thread that kills
//! everything in this process's namespaces, deletes them and exits. At the end the run checks
//! that nothing of it is left: no namespace, no flowgate or opensnitchd process, and no NFQUEUE
//! rule in this machine's own (root namespace) iptables that was not there before.

use std::fmt::Write as _;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use flowgate_bench::ClassifyFixture;
use flowgate_bench::accept_all::{self, AcceptAll, FeedRule};
use flowgate_bench::args::{Args, number, whole_number};
use flowgate_bench::connect::{
    AcceptServer, FIRST_CLIENT_PORT, LAST_CLIENT_PORT, Latencies, close_with_reset, connect_once, connect_open,
};
use flowgate_bench::counters::tcp_ext;
use flowgate_bench::daemon::{self, Daemon, check_nothing_left, check_stopped_alone, read_events};
use flowgate_bench::guard::{TempDir, begin};
use flowgate_bench::lab::{self, Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::opensnitch::{self, OpenSnitch};
use flowgate_bench::process::{raise_nofile, vm_bytes};
use flowgate_bench::report::{
    Spread, loadavg, machine, paired_ratio, print_result, round, source_state, write_results,
};
use flowgate_bench::threads::{allowed_cpus, pin_me, spawn_thread};
use flowgate_linux::marks;
use flowgate_linux::nfqueue::Verdict;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::SockaddrIn;
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// Ports on 203.0.113.10: the bulk sink, the accept-and-close server, the holding server, the UDP
/// echo server.
const SINK_PORT: u16 = 5001;
const ACCEPT_PORT: u16 = 5002;
const HOLD_PORT: u16 = 5003;
const UDP_PORT: u16 = 5300;
/// The accept-all reader's queue, and the chains that feed it.
const FLOOR_QUEUE: u16 = 0;
const FLOOR_OUT: &str = "CMPFLOOR-OUT";
const FLOOR_IN: &str = "CMPFLOOR-IN";
/// The goals issue 14 sets, as same-run ratios.
const GOAL_KERNEL_RATE: f64 = 0.9;
const GOAL_USER_P50_US: f64 = 10.0;
const GOAL_USER_RATE: f64 = 0.9;
const GOAL_CLASSIFY: f64 = 3.0;
const GOAL_BULK: f64 = 0.97;
/// Rule-set sizes of the classification; the first is the baseline.
const CLASSIFY_SIZES: [(usize, &str); 3] = [(100, "100"), (10_000, "10,000"), (1_000_000, "1,000,000")];
/// Long-lived connections opened before the memory workload's first reading.
const MEMORY_WARMUP: usize = 200;
/// Size of a UDP request.
const UDP_PAYLOAD: usize = 32;
/// How long a UDP answer may take before the workload fails.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);
/// flowgate's start and stop: the ready line within 60 s, the exit within 30 s of SIGTERM; its
/// first stderr lines are echoed.
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(60),
    stop_timeout: Duration::from_secs(30),
    echo_lines: 6,
    echo_more: "(more lines kept, shown on errors)",
};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    /// No filter, but conntrack tracking every connection (one rule that asks for it): what any
    /// stateful filter pays before it decides anything.
    Conntrack,
    AcceptAll,
    FlowgateKernel,
    FlowgateUser,
    OpenSnitch,
}

const KINDS: [Kind; 6] =
    [Kind::None, Kind::Conntrack, Kind::AcceptAll, Kind::FlowgateKernel, Kind::FlowgateUser, Kind::OpenSnitch];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Conntrack => "conntrack",
            Kind::AcceptAll => "accept-all",
            Kind::FlowgateKernel => "flowgate-kernel",
            Kind::FlowgateUser => "flowgate-user",
            Kind::OpenSnitch => "opensnitch",
        }
    }

    /// Short lab tag (namespace names).
    fn tag(self) -> &'static str {
        match self {
            Kind::None => "cmpnone",
            Kind::Conntrack => "cmpct",
            Kind::AcceptAll => "cmpfloor",
            Kind::FlowgateKernel => "cmpfgk",
            Kind::FlowgateUser => "cmpfgu",
            Kind::OpenSnitch => "cmpsnitch",
        }
    }

    fn has_process(self) -> bool {
        matches!(self, Kind::FlowgateKernel | Kind::FlowgateUser | Kind::OpenSnitch)
    }
}

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    out: PathBuf,
    opensnitchd: PathBuf,
    rounds: usize,
    connects: usize,
    warmup: usize,
    udp: usize,
    memory_flows: usize,
    bulk_seconds: f64,
    configs: Vec<Kind>,
    classify: bool,
}

const USAGE: &str = "usage: compare [--flowgate PATH] [--json FILE] [--out DIR] [--opensnitchd PATH] [--rounds N]
               [--connects N] [--warmup N] [--udp N] [--memory-flows N] [--bulk-seconds S]
               [--configs none,accept-all,flowgate-kernel,flowgate-user,opensnitch] [--no-classify]

Runs as root. The side-by-side benchmark of issue 14: new TCP connections per second and connect
latency, bulk TCP, UDP request/response, memory per tracked flow (and, in process, rule
classification at 100 / 10,000 / 1,000,000 rules) through no filter, a minimal accept-all NFQUEUE
reader, flowgate with flows decided in the kernel, flowgate judging every flow in user space, and
OpenSnitch, in interleaved rounds. Writes compare.md and compare.json into --out (default
<workspace>/bench/results) when every part completed; the last line of stdout is the JSON.
Defaults: --rounds 5 --connects 2000 --warmup 100 --udp 2000 --memory-flows 2000 --bulk-seconds 2,
all configurations, --opensnitchd /usr/bin/opensnitchd; --flowgate defaults to `flowgate` next to
this binary, else <workspace>/target/release/flowgate.";

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        flowgate: PathBuf::new(),
        json: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
        opensnitchd: PathBuf::from(opensnitch::BINARY),
        rounds: 5,
        connects: 2000,
        warmup: 100,
        udp: 2000,
        memory_flows: 2000,
        bulk_seconds: 2.0,
        configs: KINDS.to_vec(),
        classify: true,
    };
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        match a.as_str() {
            "--out" => opts.out = PathBuf::from(args.value("--out")?),
            "--opensnitchd" => opts.opensnitchd = PathBuf::from(args.value("--opensnitchd")?),
            "--rounds" => opts.rounds = whole_number(&args.value("--rounds")?, "--rounds", 1, 50)?,
            "--connects" => opts.connects = whole_number(&args.value("--connects")?, "--connects", 10, 20_000)?,
            "--warmup" => opts.warmup = whole_number(&args.value("--warmup")?, "--warmup", 0, 2_000)?,
            "--udp" => opts.udp = whole_number(&args.value("--udp")?, "--udp", 10, 20_000)?,
            "--memory-flows" => {
                opts.memory_flows = whole_number(&args.value("--memory-flows")?, "--memory-flows", 100, 10_000)?;
            }
            "--bulk-seconds" => {
                opts.bulk_seconds = number(&args.value("--bulk-seconds")?, "--bulk-seconds", 0.2, 30.0)?;
            }
            "--configs" => {
                let list = args.value("--configs")?;
                let mut v = Vec::new();
                for c in list.split(',') {
                    match KINDS.iter().find(|k| k.name() == c) {
                        Some(k) if !v.contains(k) => v.push(*k),
                        Some(_) => {}
                        None => return Err(format!("--configs: unknown configuration `{c}`\n\n{USAGE}")),
                    }
                }
                // Report order, whatever the order given.
                opts.configs = KINDS.iter().copied().filter(|k| v.contains(k)).collect();
            }
            "--no-classify" => opts.classify = false,
            other => return Err(args.unknown(other)),
        }
    }
    let ports = usize::from(LAST_CLIENT_PORT - FIRST_CLIENT_PORT) + 1;
    if MEMORY_WARMUP + opts.memory_flows + opts.warmup + opts.connects > ports {
        return Err(format!(
            "{MEMORY_WARMUP} + --memory-flows + --warmup + --connects must not exceed {ports} (a client port each)"
        ));
    }
    if opts.udp + opts.warmup > ports {
        return Err(format!("--udp + --warmup must not exceed {ports} (a client port each)"));
    }
    (opts.flowgate, opts.json) = args.finish()?;
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// The configurations
// ---------------------------------------------------------------------------------------------

/// flowgate's config after run_dir, log and 2 queues: allow by default, and static allow rules
/// for exactly the workloads' flows; `kernel_rules = false` for `flowgate-user`.
fn flowgate_extra(kind: Kind) -> String {
    let mut s = String::new();
    if kind == Kind::FlowgateUser {
        s.push_str("kernel_rules = false\n");
    }
    let _ = write!(
        s,
        "default_action = \"allow\"\n\n\
         [[rule]]\nname = \"bench-tcp\"\nremote = \"{SRV_SERVICE_V4}/32\"\nremote_ports = \"{SINK_PORT}-{HOLD_PORT}\"\n\
         protocol = \"tcp\"\ndirection = \"outbound\"\naction = \"allow\"\n\n\
         [[rule]]\nname = \"bench-udp\"\nremote = \"{SRV_SERVICE_V4}/32\"\nremote_ports = \"{UDP_PORT}\"\n\
         protocol = \"udp\"\ndirection = \"outbound\"\naction = \"allow\"\n"
    );
    s
}

/// The floor's chains, jumped to at position 1 of the filter table's `OUTPUT` and `INPUT`, as
/// flowgate's are: loopback returns; a packet mark of the verdict bits is copied to the conntrack
/// mark; a flow marked "allowed" returns; the rest is queued to the reader (fail-open, as
/// flowgate's default). The reader answers `NF_REPEAT` with the "allowed" packet mark, so the
/// packet runs through the chain again, its mark is saved on its conntrack entry and it returns;
/// every later packet of the flow returns in the kernel. (A verdict can set the conntrack mark
/// itself only on kernels with the NFQUEUE conntrack glue, which this workplace's kernel lacks;
/// flowgate copies the packet mark the same way.)
fn floor_feed() -> Vec<FeedRule> {
    let allowed = format!("{:#x}/{:#x}", marks::ALLOW, marks::VERDICT);
    let any = format!("0x0/{:#x}", marks::VERDICT);
    let mask = format!("{:#x}", marks::VERDICT);
    let q = FLOOR_QUEUE.to_string();
    let mut feed = Vec::new();
    for (chain, builtin, lo) in [(FLOOR_OUT, "OUTPUT", "-o"), (FLOOR_IN, "INPUT", "-i")] {
        let rule = |rest: &[&str]| FeedRule::rule("filter", "-A", chain, None, rest);
        feed.push(FeedRule::chain("filter", chain));
        feed.push(rule(&[lo, "lo", "-j", "RETURN"]));
        feed.push(rule(&[
            "-m",
            "mark",
            "!",
            "--mark",
            &any,
            "-j",
            "CONNMARK",
            "--save-mark",
            "--nfmask",
            &mask,
            "--ctmask",
            &mask,
        ]));
        feed.push(rule(&["-m", "connmark", "--mark", &allowed, "-j", "RETURN"]));
        feed.push(rule(&["-j", "NFQUEUE", "--queue-num", &q, "--queue-bypass"]));
        feed.push(FeedRule::rule("filter", "-I", builtin, Some(1), &["-j", chain]));
    }
    feed
}

/// A filter in place in `host` for one configuration and round.
enum Filter<'a> {
    None,
    AcceptAll(AcceptAll<'a>),
    Flowgate { daemon: Daemon, pid: i32, tmp: TempDir },
    OpenSnitch { snitch: OpenSnitch<'a>, _tmp: TempDir },
}

impl<'a> Filter<'a> {
    /// Starts `kind`'s filter; returns it, the seconds that took, and flowgate's ready line.
    fn start(
        kind: Kind,
        lab: &'a Lab,
        opts: &Opts,
        round: usize,
        judged: Arc<AtomicU64>,
    ) -> Result<(Filter<'a>, f64, Option<String>)> {
        let t0 = Instant::now();
        let mut line = None;
        let f = match kind {
            Kind::None => Filter::None,
            Kind::Conntrack => {
                for tool in ["iptables", "ip6tables"] {
                    for chain in ["OUTPUT", "INPUT"] {
                        let out = lab.host.run(&[
                            tool,
                            "-w",
                            "-A",
                            chain,
                            "-m",
                            "conntrack",
                            "--ctstate",
                            "NEW",
                            "-j",
                            "ACCEPT",
                        ]);
                        if !out.status.success() {
                            return Err(format!(
                                "conntrack: {tool} -A {chain}: {}",
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                    }
                }
                Filter::None
            }
            Kind::AcceptAll => {
                let o = accept_all::Options {
                    queue: FLOOR_QUEUE,
                    max_len: flowgate::config::Live::default().queue_max_len,
                    fail_open: true,
                    verdict: Verdict::Repeat,
                    mark: Some((marks::ALLOW, marks::VERDICT)),
                    cpu: None,
                };
                Filter::AcceptAll(AcceptAll::start(&lab.host, &o, judged, &floor_feed())?)
            }
            Kind::FlowgateKernel | Kind::FlowgateUser => {
                let tmp = TempDir::new(&format!("{}-r{round}", kind.tag()))?;
                let config = daemon::write_config(&tmp, &flowgate_extra(kind))?;
                let ready = Daemon::start(&lab.host, &opts.flowgate, &config, &DAEMON)?;
                let pid = ready.daemon.flowgate_pid(&opts.flowgate)?;
                line = Some(ready.line);
                Filter::Flowgate { daemon: ready.daemon, pid, tmp }
            }
            Kind::OpenSnitch => {
                let tmp = TempDir::new(&format!("{}-r{round}", kind.tag()))?;
                let (snitch, _) = OpenSnitch::start(&lab.host, &opts.opensnitchd, &tmp)?;
                Filter::OpenSnitch { snitch, _tmp: tmp }
            }
        };
        Ok((f, t0.elapsed().as_secs_f64(), line))
    }

    /// CPU time (ns, user and kernel, softirq work done in its context included) of the filter
    /// so far: every thread of the daemon's process, or the accept-all reader's thread.
    fn cpu_ns(&self) -> Option<u64> {
        match self {
            Filter::None => None,
            Filter::AcceptAll(r) => schedstat_ns(&format!("/proc/self/task/{}/schedstat", r.tid())),
            Filter::Flowgate { pid, .. } => process_cpu_ns(*pid),
            Filter::OpenSnitch { snitch, .. } => process_cpu_ns(snitch.pid()),
        }
    }

    /// The process whose memory is measured.
    fn pid(&self) -> Option<i32> {
        match self {
            Filter::Flowgate { pid, .. } => Some(*pid),
            Filter::OpenSnitch { snitch, .. } => Some(snitch.pid()),
            Filter::None | Filter::AcceptAll(_) => None,
        }
    }
}

/// The first field of a `schedstat` file: time on a CPU, ns.
fn schedstat_ns(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.split_whitespace().next()?.parse().ok()
}

/// Time on a CPU of every thread of process `pid` that exists now, ns.
fn process_cpu_ns(pid: i32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(dir.flatten().filter_map(|t| schedstat_ns(&format!("{}/schedstat", t.path().display()))).sum())
}

/// How a filter stopped.
#[derive(Clone, Debug, Default)]
struct StopInfo {
    seconds: f64,
    /// OpenSnitch: whether it exited on SIGTERM (else SIGKILL), and its NFQUEUE rules left then.
    exited_on_term: Option<bool>,
    rules_left: Option<usize>,
    /// flowgate: `flow.new` events in its log for TCP and UDP flows to 203.0.113.10.
    tcp_flows_logged: Option<u64>,
    udp_flows_logged: Option<u64>,
}

fn stop_filter(filter: Filter<'_>, lab: &Lab) -> Result<StopInfo> {
    let t0 = Instant::now();
    let mut info = StopInfo::default();
    match filter {
        Filter::None => {}
        Filter::AcceptAll(r) => r.stop()?,
        Filter::Flowgate { daemon, tmp, .. } => {
            daemon.stop()?;
            check_stopped_alone(&lab.host)?;
            let (mut tcp, mut udp) = (0, 0);
            for v in read_events(&tmp.log())? {
                if v["event"] == "flow.new" {
                    let f = &v["flow"];
                    let to_srv = f["remote"].as_str().is_some_and(|r| r.starts_with(&format!("{SRV_SERVICE_V4}:")));
                    if to_srv && f["protocol"] == "tcp" {
                        tcp += 1;
                    } else if to_srv && f["protocol"] == "udp" {
                        udp += 1;
                    }
                }
            }
            info.tcp_flows_logged = Some(tcp);
            info.udp_flows_logged = Some(udp);
        }
        Filter::OpenSnitch { snitch, _tmp } => {
            let s = snitch.stop()?;
            info.exited_on_term = Some(s.exited_on_term);
            info.rules_left = Some(s.rules_left);
        }
    }
    info.seconds = t0.elapsed().as_secs_f64();
    Ok(info)
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// Packets taken by every NFQUEUE rule in `ns` so far (IPv4, every table; `iptables-save -c`).
/// 0 without any rule.
fn queued_packets(ns: &Netns) -> Result<u64> {
    let o = ns.run(&["iptables-save", "-c"]);
    if !o.status.success() {
        return Err(format!("iptables-save -c in {}: {}", ns.name, String::from_utf8_lossy(&o.stderr).trim()));
    }
    let mut sum = 0;
    for line in String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("-j NFQUEUE")) {
        // [PACKETS:BYTES] -A CHAIN ...
        let pkts = line
            .strip_prefix('[')
            .and_then(|r| r.split(':').next())
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| format!("iptables-save -c: no counters in {line:?}"))?;
        sum += pkts;
    }
    Ok(sum)
}

/// NFQUEUE rules in this machine's own iptables (the root namespace), IPv4 and IPv6.
fn root_nfqueue_rules() -> Result<Vec<String>> {
    let mut rules = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let o = Command::new(tool).output().map_err(|e| format!("{tool}: {e}"))?;
        if !o.status.success() {
            return Err(format!("{tool}: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        rules.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("NFQUEUE"))
                .map(|l| format!("{tool}: {l}")),
        );
    }
    Ok(rules)
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// Client source ports, one per connection or request, never reused in a lab.
struct Ports(RangeInclusive<u16>);

impl Ports {
    fn new() -> Ports {
        Ports(FIRST_CLIENT_PORT..=LAST_CLIENT_PORT)
    }

    fn next(&mut self) -> Result<u16> {
        self.0.next().ok_or_else(|| "out of client ports".to_string())
    }
}

#[derive(Clone, Debug, Default)]
struct Memory {
    flows: usize,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
}

impl Memory {
    fn per_flow(&self) -> Option<f64> {
        Some((self.rss_after? as f64 - self.rss_before? as f64) / self.flows as f64)
    }
}

/// VmRSS of `pid` once two readings 100 ms apart agree (at most 3 s).
fn steady_rss(pid: i32) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = vm_bytes(pid, "VmRSS")?;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = vm_bytes(pid, "VmRSS")?;
        if now == last || Instant::now() >= deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Long-lived connections to the holding server: [`MEMORY_WARMUP`] first, then the filter's
/// steady RSS, then `n` more and its steady RSS again; then all are closed. The first ones take
/// the filter's one-time costs of its first flows (buffers, code paths touched for the first
/// time), so the difference is what more flows cost.
fn memory(lab: &Lab, pid: Option<i32>, n: usize, ports: &mut Ports) -> Result<Memory> {
    let holder = AcceptServer::holding(&lab.srv, SocketAddrV4::new(SRV_SERVICE_V4, HOLD_PORT))?;
    let open = |count: usize, ports: &mut Ports| -> Result<Vec<std::os::fd::OwnedFd>> {
        let list: Vec<u16> = (0..count).map(|_| ports.next()).collect::<Result<_>>()?;
        lab.host.in_ns(move || -> Result<Vec<std::os::fd::OwnedFd>> {
            let to = SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, HOLD_PORT));
            let mut v = Vec::with_capacity(list.len());
            for (i, p) in list.into_iter().enumerate() {
                let (fd, _) = connect_open(&to, p).map_err(|e| format!("connection {} of {count}: {e}", i + 1))?;
                v.push(fd);
            }
            Ok(v)
        })
    };
    let wait_accepted = |want: usize| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while holder.accepted() < want as u64 {
            if Instant::now() >= deadline {
                return Err(format!("the holding server accepted {} of {want} connections", holder.accepted()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    };
    let mut conns = open(MEMORY_WARMUP, ports).map_err(|e| format!("warm-up: {e}"))?;
    wait_accepted(MEMORY_WARMUP)?;
    let rss_before = pid.map(steady_rss).transpose()?;
    conns.extend(open(n, ports)?);
    wait_accepted(MEMORY_WARMUP + n)?;
    let rss_after = pid.map(steady_rss).transpose()?;
    for fd in conns {
        close_with_reset(fd)?;
    }
    drop(holder);
    Ok(Memory { flows: n, rss_before, rss_after })
}

#[derive(Debug)]
struct Connects {
    latencies: Latencies,
    seconds: f64,
    syn_retrans: u64,
    queued: u64,
    /// Connections the server accepted, warm-up included.
    accepted: u64,
    /// The filter's CPU time during the timed loop.
    filter_cpu_ns: Option<u64>,
}

impl Connects {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }
}

fn connects(lab: &Lab, filter: &Filter<'_>, warmup: usize, n: usize, ports: &mut Ports) -> Result<Connects> {
    let acceptor = AcceptServer::start(&lab.srv, SocketAddrV4::new(SRV_SERVICE_V4, ACCEPT_PORT))?;
    let warm: Vec<u16> = (0..warmup).map(|_| ports.next()).collect::<Result<_>>()?;
    let timed: Vec<u16> = (0..n).map(|_| ports.next()).collect::<Result<_>>()?;
    let to = SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, ACCEPT_PORT));
    lab.host.in_ns(move || -> Result<()> {
        for p in warm {
            connect_once(&to, p).map_err(|e| format!("warm-up: {e}"))?;
        }
        Ok(())
    })?;
    let (syn0, q0) = (tcp_ext(&lab.host, "TCPSynRetrans")?, queued_packets(&lab.host)?);
    let cpu0 = filter.cpu_ns();
    let (times, seconds) = lab.host.in_ns(move || -> Result<(Vec<f64>, f64)> {
        let mut v = Vec::with_capacity(timed.len());
        let start = Instant::now();
        for (i, p) in timed.into_iter().enumerate() {
            let dt = connect_once(&to, p).map_err(|e| format!("connection {} of {n}: {e}", i + 1))?;
            v.push(dt.as_secs_f64() * 1e6);
        }
        Ok((v, start.elapsed().as_secs_f64()))
    })?;
    let cpu1 = filter.cpu_ns();
    let (syn1, q1) = (tcp_ext(&lab.host, "TCPSynRetrans")?, queued_packets(&lab.host)?);
    // Every connect() completed its handshake. The server may count a few less: an accept() of a
    // connection the client's RST already ended fails with ECONNABORTED, which it skips.
    let accepted = acceptor.accepted();
    let filter_cpu_ns = cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a));
    Ok(Connects {
        latencies: Latencies::new(times),
        seconds,
        syn_retrans: syn1 - syn0,
        queued: q1 - q0,
        accepted,
        filter_cpu_ns,
    })
}

#[derive(Debug)]
struct Udp {
    rtts: Latencies,
    seconds: f64,
    queued: u64,
    /// The filter's CPU time during the timed loop.
    filter_cpu_ns: Option<u64>,
}

impl Udp {
    fn rate(&self) -> f64 {
        self.rtts.len() as f64 / self.seconds
    }
}

/// The UDP echo server of the workload: one thread pinned to `cpu` (with the client: see
/// [`udp`]) that answers every datagram to its sender. Stopped (eventfd) and joined on drop.
struct PinnedEcho {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl PinnedEcho {
    fn start(ns: &Netns, addr: SocketAddrV4, cpu: Option<usize>) -> Result<PinnedEcho> {
        let sock = ns.in_ns(move || -> Result<UdpSocket> {
            let s = UdpSocket::bind(addr).map_err(|e| format!("UDP echo: bind {addr}: {e}"))?;
            s.set_nonblocking(true).map_err(|e| format!("UDP echo: {e}"))?;
            Ok(s)
        })?;
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let st = stop.clone();
        let (thread, _) = spawn_thread("udp-echo", move || -> Result<()> {
            pin_me(cpu);
            let mut buf = [0u8; 2048];
            loop {
                let mut fds =
                    [PollFd::new(sock.as_fd(), PollFlags::POLLIN), PollFd::new(st.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(format!("UDP echo: poll: {e}")),
                }
                if fds[1].revents().is_some_and(|r| !r.is_empty()) {
                    return Ok(());
                }
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            let _ = sock.send_to(&buf[..n], from);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break, // WouldBlock, or an ICMP error reported on the socket
                    }
                }
            }
        })?;
        Ok(PinnedEcho { stop, thread: Some(thread) })
    }
}

impl Drop for PinnedEcho {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Err(e)) => eprintln!("compare: {e}"),
                Err(_) => eprintln!("compare: the UDP echo server panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// One request from a new socket bound to `port`: its round trip, µs.
fn udp_request(to: SocketAddrV4, port: u16, i: usize) -> Result<f64> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).map_err(|e| format!("bind {port}: {e}"))?;
    s.set_read_timeout(Some(UDP_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut req = [0u8; UDP_PAYLOAD];
    req[..8].copy_from_slice(&(i as u64).to_be_bytes());
    let mut buf = [0u8; 2 * UDP_PAYLOAD];
    let t0 = Instant::now();
    s.send_to(&req, to).map_err(|e| format!("send to {to}: {e}"))?;
    let (len, from) = s.recv_from(&mut buf).map_err(|e| format!("no answer from {to} within {UDP_TIMEOUT:?}: {e}"))?;
    let dt = t0.elapsed();
    if from != std::net::SocketAddr::V4(to) || buf[..len] != req {
        return Err(format!("a wrong answer ({len} bytes from {from})"));
    }
    Ok(dt.as_secs_f64() * 1e6)
}

/// The UDP workload. The client and the echo server run on the same CPU (the first this process
/// may use): on this VM a wake-up of an idle CPU takes tens of µs, and with the two threads left
/// to the scheduler the no-filter round trip depended on where it put the server (p50 48–88 µs
/// in one run, 15–20 µs in others). Pinned, a request without a filter wakes no other CPU; what
/// a filter adds (its threads, wherever the scheduler runs them) is the filter's.
fn udp(lab: &Lab, filter: &Filter<'_>, warmup: usize, n: usize) -> Result<Udp> {
    let to = SocketAddrV4::new(SRV_SERVICE_V4, UDP_PORT);
    let cpu = allowed_cpus().first().copied();
    let echo = PinnedEcho::start(&lab.srv, to, cpu)?;
    // UDP ports are a space of their own: the range starts again.
    let mut ports = Ports::new();
    let warm: Vec<u16> = (0..warmup).map(|_| ports.next()).collect::<Result<_>>()?;
    let timed: Vec<u16> = (0..n).map(|_| ports.next()).collect::<Result<_>>()?;
    lab.host.in_ns(move || -> Result<()> {
        pin_me(cpu);
        for (i, p) in warm.into_iter().enumerate() {
            udp_request(to, p, i).map_err(|e| format!("warm-up request {}: {e}", i + 1))?;
        }
        Ok(())
    })?;
    let q0 = queued_packets(&lab.host)?;
    let cpu0 = filter.cpu_ns();
    let (rtts, seconds) = lab.host.in_ns(move || -> Result<(Vec<f64>, f64)> {
        pin_me(cpu);
        let mut v = Vec::with_capacity(timed.len());
        let start = Instant::now();
        for (i, p) in timed.into_iter().enumerate() {
            v.push(udp_request(to, p, i).map_err(|e| format!("request {} of {n}: {e}", i + 1))?);
        }
        Ok((v, start.elapsed().as_secs_f64()))
    })?;
    let cpu1 = filter.cpu_ns();
    let q1 = queued_packets(&lab.host)?;
    drop(echo);
    let filter_cpu_ns = cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a));
    Ok(Udp { rtts: Latencies::new(rtts), seconds, queued: q1 - q0, filter_cpu_ns })
}

#[derive(Debug)]
struct Bulk {
    bytes: u64,
    seconds: f64,
    queued: u64,
}

impl Bulk {
    fn gbit_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }
}

fn bulk(lab: &Lab, seconds: f64) -> Result<Bulk> {
    let sink = lab::tcp_sink(&lab.srv, lab::sa(SRV_SERVICE_V4, SINK_PORT));
    let q0 = queued_packets(&lab.host)?;
    let (bytes, secs) =
        lab.host.in_ns(move || flowgate_bench::bulk::to_sink(lab::sa(SRV_SERVICE_V4, SINK_PORT), seconds, u64::MAX))?;
    let q1 = queued_packets(&lab.host)?;
    drop(sink);
    Ok(Bulk { bytes, seconds: secs, queued: q1 - q0 })
}

// ---------------------------------------------------------------------------------------------
// One configuration in one round
// ---------------------------------------------------------------------------------------------

struct Sample {
    setup_seconds: f64,
    /// flowgate's ready line (what it decides in the kernel).
    ready_line: Option<String>,
    memory: Memory,
    connects: Connects,
    udp: Udp,
    bulk: Bulk,
    stop: StopInfo,
    /// Packets the accept-all reader judged.
    judged: Option<u64>,
}

/// Sets `kind` up in a fresh lab, runs the workloads, tears it down. An error names the part
/// that failed.
fn run_one(kind: Kind, opts: &Opts, round: usize) -> Result<Sample> {
    // Drop order (reverse of declaration): the filter, then the lab.
    let lab = Lab::new(kind.tag());
    let judged = Arc::new(AtomicU64::new(0));
    let (filter, setup_seconds, ready_line) =
        Filter::start(kind, &lab, opts, round, judged.clone()).map_err(|e| format!("setting it up: {e}"))?;
    let mut ports = Ports::new();
    let memory = memory(&lab, filter.pid(), opts.memory_flows, &mut ports).map_err(|e| format!("memory: {e}"))?;
    let connects =
        connects(&lab, &filter, opts.warmup, opts.connects, &mut ports).map_err(|e| format!("connects: {e}"))?;
    let udp = udp(&lab, &filter, opts.warmup, opts.udp).map_err(|e| format!("UDP: {e}"))?;
    let bulk = bulk(&lab, opts.bulk_seconds).map_err(|e| format!("bulk: {e}"))?;
    let stop = stop_filter(filter, &lab).map_err(|e| format!("stopping it: {e}"))?;
    let judged = (kind == Kind::AcceptAll).then(|| judged.load(std::sync::atomic::Ordering::Relaxed));
    if judged == Some(0) {
        return Err("the accept-all reader judged no packet".into());
    }
    Ok(Sample { setup_seconds, ready_line, memory, connects, udp, bulk, stop, judged })
}

// ---------------------------------------------------------------------------------------------
// Rule classification
// ---------------------------------------------------------------------------------------------

/// Batches per lookup and rule-set size in a round.
const CLASSIFY_BATCHES: usize = 15;

/// How many `classify` calls of `flow` take about 2 ms (at least 256).
fn batch_size(fixture: &ClassifyFixture, flow: &flowgate_core::Flow) -> u64 {
    let rules = &fixture.rules;
    let mut iters = 256u64;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            black_box(black_box(rules).classify(black_box(flow)));
        }
        if t.elapsed() >= Duration::from_millis(2) || iters >= 1 << 24 {
            return iters;
        }
        iters *= 2;
    }
}

/// ns per `classify` of `flow` in one batch of `iters` calls.
fn time_batch(fixture: &ClassifyFixture, flow: &flowgate_core::Flow, iters: u64) -> f64 {
    let rules = &fixture.rules;
    let t = Instant::now();
    for _ in 0..iters {
        black_box(black_box(rules).classify(black_box(flow)));
    }
    t.elapsed().as_secs_f64() * 1e9 / iters as f64
}

/// Per size, per lookup: ns.
type ClassifySample = Vec<[f64; 3]>;

/// One round of classification: for each lookup, [`CLASSIFY_BATCHES`] batches of about 2 ms per
/// rule-set size, the sizes alternating batch by batch (so the sizes compared are measured
/// moments apart, whatever else the machine does); the median batch of each.
fn classify_round(fixtures: &[ClassifyFixture]) -> ClassifySample {
    let per_lookup: Vec<Vec<f64>> = (0..3)
        .map(|li| {
            let iters: Vec<u64> = fixtures.iter().map(|f| batch_size(f, f.lookups()[li].1)).collect();
            let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(CLASSIFY_BATCHES); fixtures.len()];
            for _ in 0..CLASSIFY_BATCHES {
                for ((f, n), v) in fixtures.iter().zip(&iters).zip(per.iter_mut()) {
                    v.push(time_batch(f, f.lookups()[li].1, *n));
                }
            }
            per.iter().map(|v| Spread::of(v).median).collect()
        })
        .collect();
    (0..fixtures.len()).map(|si| [per_lookup[0][si], per_lookup[1][si], per_lookup[2][si]]).collect()
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

/// One row of the table: a figure per configuration over the rounds, or a text.
enum Cell {
    Values(Vec<f64>),
    Text(String),
}

struct Row {
    label: String,
    key: &'static str,
    digits: i32,
    cells: Vec<(Kind, Cell)>,
}

fn fmt_num(x: f64, digits: i32) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let s = format!("{x:.*}", digits.max(0) as usize);
    // Thousands separators in the whole part.
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(a, b)| (a, Some(b)));
    let (sign, digits_only) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits_only.chars().enumerate() {
        if i > 0 && (digits_only.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

fn cell_text(c: &Cell, digits: i32) -> String {
    match c {
        Cell::Values(v) => {
            let s = Spread::of(v);
            format!("{} ({}–{})", fmt_num(s.median, digits), fmt_num(s.min, digits), fmt_num(s.max, digits))
        }
        Cell::Text(t) => t.clone(),
    }
}

fn cell_json(c: &Cell, digits: i32) -> Value {
    match c {
        Cell::Values(v) => {
            let mut j = Spread::of(v).json(digits);
            j["rounds"] = json!(v.iter().map(|x| round(*x, digits)).collect::<Vec<_>>());
            j
        }
        Cell::Text(t) => {
            let t = t
                .replace("not measured[^snitch-rules]", &format!("not measured: {SNITCH_CLASSIFY}"))
                .replace("as flowgate-user[^matcher]", &format!("as flowgate-user: {MATCHER_NOTE}"));
            json!({ "note": t })
        }
    }
}

struct Results<'a> {
    opts: &'a Opts,
    /// Per configuration that ran: its samples, round by round.
    samples: Vec<(Kind, Vec<Sample>)>,
    classify: Vec<ClassifySample>,
    classify_setup: Vec<(usize, f64, f64, [usize; 3])>,
    snitch_version: Option<String>,
}

impl Results<'_> {
    fn of(&self, k: Kind) -> Option<&[Sample]> {
        self.samples.iter().find(|(kk, _)| *kk == k).map(|(_, s)| s.as_slice())
    }

    fn values(&self, k: Kind, f: impl Fn(&Sample) -> f64) -> Option<Vec<f64>> {
        self.of(k).map(|s| s.iter().map(f).collect())
    }

    fn rows(&self) -> Vec<Row> {
        let left_out = || Cell::Text("not measured: left out by --configs".into());
        let net_row = |label: &str, key: &'static str, digits: i32, f: &dyn Fn(&Sample) -> f64| Row {
            label: label.to_string(),
            key,
            digits,
            cells: KINDS.iter().map(|&k| (k, self.values(k, f).map_or_else(left_out, Cell::Values))).collect(),
        };
        let cpu_row = |label: &str, key: &'static str, f: &dyn Fn(&Sample) -> Option<f64>| Row {
            label: label.to_string(),
            key,
            digits: 1,
            cells: KINDS
                .iter()
                .map(|&k| {
                    let c = if matches!(k, Kind::None | Kind::Conntrack) {
                        Cell::Text("n/a (no filter)".into())
                    } else {
                        self.values(k, |s| f(s).unwrap_or(f64::NAN)).map_or_else(left_out, Cell::Values)
                    };
                    (k, c)
                })
                .collect(),
        };
        let mut rows = vec![
            net_row("new TCP connections/s", "connects_per_s", 0, &|s| s.connects.rate()),
            net_row("connect p50 (µs)", "connect_p50_us", 1, &|s| s.connects.latencies.p(50.0)),
            net_row("connect p99 (µs)", "connect_p99_us", 1, &|s| s.connects.latencies.p(99.0)),
            net_row("packets to user space per new connection", "connect_queued_per_conn", 2, &|s| {
                s.connects.queued as f64 / s.connects.latencies.len() as f64
            }),
            cpu_row("filter CPU per new connection (µs)", "connect_filter_cpu_us", &|s| {
                s.connects.filter_cpu_ns.map(|ns| ns as f64 / 1e3 / s.connects.latencies.len() as f64)
            }),
            net_row("bulk TCP (Gbit/s)", "bulk_gbit_s", 2, &|s| s.bulk.gbit_s()),
            net_row("UDP requests/s (new flow each)", "udp_per_s", 0, &|s| s.udp.rate()),
            net_row("UDP round trip p50 (µs)", "udp_p50_us", 1, &|s| s.udp.rtts.p(50.0)),
            net_row("UDP round trip p99 (µs)", "udp_p99_us", 1, &|s| s.udp.rtts.p(99.0)),
            net_row("packets to user space per UDP request", "udp_queued_per_req", 2, &|s| {
                s.udp.queued as f64 / s.udp.rtts.len() as f64
            }),
            cpu_row("filter CPU per UDP request (µs)", "udp_filter_cpu_us", &|s| {
                s.udp.filter_cpu_ns.map(|ns| ns as f64 / 1e3 / s.udp.rtts.len() as f64)
            }),
        ];
        let mem_cells = KINDS
            .iter()
            .map(|&k| {
                let c = if !k.has_process() {
                    Cell::Text("n/a (no per-flow state)".into())
                } else {
                    self.values(k, |s| s.memory.per_flow().unwrap_or(f64::NAN)).map_or_else(left_out, Cell::Values)
                };
                (k, c)
            })
            .collect();
        rows.push(Row {
            label: format!("memory per tracked flow (bytes, {} flows)", self.opts.memory_flows),
            key: "memory_per_flow_bytes",
            digits: 0,
            cells: mem_cells,
        });
        let lookups = ["last_rule", "no_match", "ipv6"];
        for (si, (_, size)) in CLASSIFY_SIZES.iter().enumerate() {
            for (li, lookup) in lookups.iter().enumerate() {
                let cells = KINDS
                    .iter()
                    .map(|&k| {
                        let c = match k {
                            Kind::None | Kind::Conntrack | Kind::AcceptAll => Cell::Text("n/a (no rules)".into()),
                            Kind::FlowgateKernel => Cell::Text("as flowgate-user[^matcher]".into()),
                            Kind::FlowgateUser if self.classify.is_empty() => {
                                Cell::Text("not measured: --no-classify".into())
                            }
                            Kind::FlowgateUser => Cell::Values(self.classify.iter().map(|r| r[si][li]).collect()),
                            Kind::OpenSnitch => Cell::Text("not measured[^snitch-rules]".into()),
                        };
                        (k, c)
                    })
                    .collect();
                rows.push(Row {
                    label: format!("rule classification, {size} rules, `{lookup}` (ns)"),
                    key: CLASSIFY_KEYS[si][li],
                    digits: 1,
                    cells,
                });
            }
        }
        rows
    }
}

const CLASSIFY_KEYS: [[&str; 3]; 3] = [
    ["classify_100_last_rule_ns", "classify_100_no_match_ns", "classify_100_ipv6_ns"],
    ["classify_10k_last_rule_ns", "classify_10k_no_match_ns", "classify_10k_ipv6_ns"],
    ["classify_1m_last_rule_ns", "classify_1m_no_match_ns", "classify_1m_ipv6_ns"],
];

/// Why OpenSnitch's rule classification is not measured.
const SNITCH_CLASSIFY: &str = "opensnitchd has no rule lookup that can be timed on its own, and its rules are one JSON \
                               file each, loaded and matched one after the other per connection: a million of them do \
                               not fit in the run's budget.";
/// Why the flowgate-kernel column shows no classification figure of its own.
const MATCHER_NOTE: &str = "Rule classification is flowgate's `CompiledRules::classify`, timed in the benchmark \
                            process on the generated rule sets of the criterion bench `classify`; both flowgate \
                            configurations use the same compiled matcher, so there is one figure.";

/// One goal: a same-run ratio (or difference) and whether it is met.
struct Goal {
    what: String,
    value: Option<(f64, Spread)>,
    target: String,
    met: Option<bool>,
    unit: &'static str,
}

fn goals(r: &Results<'_>) -> Vec<Goal> {
    let mut g = Vec::new();
    let ratio = |a: Option<Vec<f64>>, b: Option<Vec<f64>>| a.zip(b).map(|(a, b)| paired_ratio(&a, &b));
    let rate = |s: &Sample| s.connects.rate();
    let v = ratio(r.values(Kind::FlowgateKernel, rate), r.values(Kind::None, rate));
    g.push(Goal {
        what: "new TCP connections/s, flowgate-kernel / none".into(),
        met: v.map(|(m, _)| m >= GOAL_KERNEL_RATE),
        value: v,
        target: format!("≥ {GOAL_KERNEL_RATE}"),
        unit: "×",
    });
    let p50 = |s: &Sample| s.connects.latencies.p(50.0);
    let diff = r.values(Kind::FlowgateUser, p50).zip(r.values(Kind::AcceptAll, p50)).map(|(a, b)| {
        let of_medians = Spread::of(&a).median - Spread::of(&b).median;
        let paired: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        (of_medians, Spread::of(&paired))
    });
    g.push(Goal {
        what: "connect p50, flowgate-user − accept-all".into(),
        met: diff.map(|(m, _)| m <= GOAL_USER_P50_US),
        value: diff,
        target: format!("≤ {GOAL_USER_P50_US} µs"),
        unit: " µs",
    });
    let v = ratio(r.values(Kind::FlowgateUser, rate), r.values(Kind::AcceptAll, rate));
    g.push(Goal {
        what: "new TCP connections/s, flowgate-user / accept-all".into(),
        met: v.map(|(m, _)| m >= GOAL_USER_RATE),
        value: v,
        target: format!("≥ {GOAL_USER_RATE}"),
        unit: "×",
    });
    for (li, lookup) in ["last_rule", "no_match", "ipv6"].iter().enumerate() {
        let v = (!r.classify.is_empty()).then(|| {
            let big: Vec<f64> = r.classify.iter().map(|c| c[2][li]).collect();
            let base: Vec<f64> = r.classify.iter().map(|c| c[0][li]).collect();
            paired_ratio(&big, &base)
        });
        g.push(Goal {
            what: format!("rule classification `{lookup}`, 1,000,000 rules / 100 rules"),
            met: v.map(|(m, _)| m <= GOAL_CLASSIFY),
            value: v,
            target: format!("≤ {GOAL_CLASSIFY}"),
            unit: "×",
        });
    }
    let gbit = |s: &Sample| s.bulk.gbit_s();
    for k in [Kind::FlowgateKernel, Kind::FlowgateUser] {
        let v = ratio(r.values(k, gbit), r.values(Kind::None, gbit));
        g.push(Goal {
            what: format!("bulk TCP of an allowed flow, {} / none", k.name()),
            met: v.map(|(m, _)| m >= GOAL_BULK),
            value: v,
            target: format!("≥ {GOAL_BULK}"),
            unit: "×",
        });
    }
    g
}

/// Ratios without a goal, for reading the table.
fn other_ratios(r: &Results<'_>) -> Vec<(String, Option<(f64, Spread)>)> {
    let ratio = |a: Option<Vec<f64>>, b: Option<Vec<f64>>| a.zip(b).map(|(a, b)| paired_ratio(&a, &b));
    let rate = |s: &Sample| s.connects.rate();
    let udp = |s: &Sample| s.udp.rate();
    vec![
        (
            "new TCP connections/s, conntrack / none".into(),
            ratio(r.values(Kind::Conntrack, rate), r.values(Kind::None, rate)),
        ),
        (
            "new TCP connections/s, flowgate-kernel / conntrack".into(),
            ratio(r.values(Kind::FlowgateKernel, rate), r.values(Kind::Conntrack, rate)),
        ),
        (
            "new TCP connections/s, accept-all / none".into(),
            ratio(r.values(Kind::AcceptAll, rate), r.values(Kind::None, rate)),
        ),
        (
            "new TCP connections/s, flowgate-user / opensnitch".into(),
            ratio(r.values(Kind::FlowgateUser, rate), r.values(Kind::OpenSnitch, rate)),
        ),
        (
            "UDP requests/s, flowgate-kernel / none".into(),
            ratio(r.values(Kind::FlowgateKernel, udp), r.values(Kind::None, udp)),
        ),
        (
            "UDP requests/s, flowgate-user / accept-all".into(),
            ratio(r.values(Kind::FlowgateUser, udp), r.values(Kind::AcceptAll, udp)),
        ),
        (
            "UDP requests/s, flowgate-user / opensnitch".into(),
            ratio(r.values(Kind::FlowgateUser, udp), r.values(Kind::OpenSnitch, udp)),
        ),
    ]
}

fn show_ratio(v: &Option<(f64, Spread)>, unit: &str, digits: usize) -> (String, String) {
    match v {
        None => ("not measured".into(), "—".into()),
        Some((m, p)) => {
            (format!("{m:.digits$}{unit}"), format!("{:.digits$} ({:.digits$}–{:.digits$})", p.median, p.min, p.max))
        }
    }
}

struct Meta {
    date: String,
    command: String,
    load_start: String,
    load_end: String,
    wall: f64,
    machine: Value,
    source: Value,
    host_checks: Value,
}

fn render(r: &Results<'_>, meta: &Meta) -> (String, Value) {
    let rows = r.rows();
    let goals = goals(r);
    let others = other_ratios(r);
    let o = r.opts;
    let m = &meta.machine;
    let mut md = String::new();
    let _ = writeln!(md, "# Side by side: flowgate, the floor, and OpenSnitch\n");
    let _ = writeln!(
        md,
        "Measured {} with `{}` on {} CPUs ({}), {} GiB, kernel {}; load average {} at the start, {} at the end; \
         wall time {:.0} s. Commit {}{}.\n",
        meta.date,
        meta.command,
        m["nproc"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        meta.load_start,
        meta.load_end,
        meta.wall,
        meta.source["commit"].as_str().unwrap_or("unknown"),
        if meta.source["changed_under_crates"].as_array().is_some_and(|a| !a.is_empty()) {
            " with uncommitted changes under crates/"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "Each cell: median (min–max) of {} interleaved rounds; each round sets every configuration up in a fresh lab \
         and tears it down, in an order rotated by one each round. Per round and configuration: {} + {} long-lived \
         connections for memory, {} + {} warm-up new TCP connections, {} + {} warm-up UDP requests, a {} s bulk flow. \
         OpenSnitch: {}. See bench/README.md, \"Side by side\", for the method.\n",
        o.rounds,
        MEMORY_WARMUP,
        o.memory_flows,
        o.connects,
        o.warmup,
        o.udp,
        o.warmup,
        o.bulk_seconds,
        r.snitch_version.as_deref().map_or("not run".into(), |v| format!("opensnitchd {v}"))
    );
    let _ = write!(md, "| figure |");
    for k in KINDS {
        let _ = write!(md, " `{}` |", k.name());
    }
    let _ = write!(md, "\n| --- |");
    for _ in KINDS {
        let _ = write!(md, " ---: |");
    }
    md.push('\n');
    let mut figures = serde_json::Map::new();
    for row in &rows {
        let _ = write!(md, "| {} |", row.label);
        let mut per = serde_json::Map::new();
        for (k, c) in &row.cells {
            let _ = write!(md, " {} |", cell_text(c, row.digits));
            per.insert(k.name().to_string(), cell_json(c, row.digits));
        }
        md.push('\n');
        figures.insert(row.key.to_string(), json!({"label": row.label, "configs": per}));
    }
    let _ = writeln!(md, "\n## Goals (same-run ratios)\n");
    let _ = writeln!(md, "| goal | of the medians | per round: median (min–max) | target | result |");
    let _ = writeln!(md, "| --- | ---: | ---: | --- | --- |");
    let mut goals_json = Vec::new();
    for g in &goals {
        let digits = if g.unit == "×" { 3 } else { 1 };
        let (m, p) = show_ratio(&g.value, g.unit, digits);
        let result = match g.met {
            Some(true) => "**pass**",
            Some(false) => "**miss**",
            None => "not measured",
        };
        let _ = writeln!(md, "| {} | {m} | {p} | {} | {result} |", g.what, g.target);
        goals_json.push(json!({
            "goal": g.what,
            "target": g.target,
            "of_medians": g.value.map(|(m, _)| round(m, 4)),
            "per_round": g.value.map(|(_, p)| p.json(4)),
            "met": g.met,
        }));
    }
    let _ = writeln!(md, "\n| other ratio | of the medians | per round: median (min–max) |");
    let _ = writeln!(md, "| --- | ---: | ---: |");
    let mut others_json = Vec::new();
    for (what, v) in &others {
        let (m, p) = show_ratio(v, "×", 3);
        let _ = writeln!(md, "| {what} | {m} | {p} |");
        others_json.push(
            json!({"ratio": what, "of_medians": v.map(|(m, _)| round(m, 4)), "per_round": v.map(|(_, p)| p.json(4))}),
        );
    }
    // Notes on what the counters say.
    let mut notes = Vec::new();
    let per_conn = |k: Kind| {
        r.values(k, |s| s.connects.queued as f64 / s.connects.latencies.len() as f64).map(|v| Spread::of(&v).median)
    };
    if let Some(q) = per_conn(Kind::FlowgateKernel) {
        if q >= 0.5 {
            notes.push(format!(
                "`flowgate-kernel` sent {q:.2} packets per new connection to user space: this build judged these \
                 flows in user space (kernel-side verdicts for static rules were not in effect), so its figures are \
                 those of user-space judging."
            ));
        } else {
            notes.push(format!(
                "`flowgate-kernel` sent {q:.2} packets per new connection to user space: its flows were decided in \
                 the kernel."
            ));
        }
    }
    if let Some(s) = r.of(Kind::OpenSnitch) {
        let killed = s.iter().filter(|x| x.stop.exited_on_term == Some(false)).count();
        let left: usize = s.iter().filter_map(|x| x.stop.rules_left).sum();
        if killed > 0 {
            notes.push(format!(
                "opensnitchd did not exit within {:?} of SIGTERM in {killed} of {} rounds and was killed (SIGKILL). \
                 NFQUEUE rules of it still in the lab's namespace once it was gone: {left} over all rounds (the \
                 namespace was deleted right after).",
                opensnitch::STOP_TIMEOUT,
                s.len()
            ));
        }
    }
    for k in KINDS.iter().copied().filter(|k| k.has_process()) {
        if let Some(s) = r.of(k) {
            let fell = s.iter().filter(|x| x.memory.per_flow().is_some_and(|b| b < 0.0)).count();
            if fell > 0 {
                notes.push(format!(
                    "`{}`: the process's RSS was lower after the {} connections than before them in {fell} of {} \
                     rounds (memory returned to the system meanwhile), so its memory figure is noisy.",
                    k.name(),
                    o.memory_flows,
                    s.len()
                ));
            }
        }
    }
    notes.push(format!("After the run: {}.", meta.host_checks["summary"].as_str().unwrap_or("?")));
    let _ = writeln!(md, "\nNotes:\n");
    for n in &notes {
        let _ = writeln!(md, "- {n}");
    }
    let _ = writeln!(md, "\n[^matcher]: {MATCHER_NOTE}\n\n[^snitch-rules]: Not measured: {SNITCH_CLASSIFY}");
    // JSON: everything, every round.
    let mut configs = serde_json::Map::new();
    for (k, samples) in &r.samples {
        let rounds: Vec<Value> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                json!({
                    "round": i + 1,
                    "setup_seconds": round(s.setup_seconds, 3),
                    "flowgate_ready_line": s.ready_line,
                    "stop_seconds": round(s.stop.seconds, 3),
                    "memory": {
                        "flows": s.memory.flows,
                        "rss_before": s.memory.rss_before,
                        "rss_after": s.memory.rss_after,
                        "per_flow_bytes": s.memory.per_flow().map(|x| round(x, 1)),
                    },
                    "connects": {
                        "count": s.connects.latencies.len(),
                        "seconds": round(s.connects.seconds, 4),
                        "per_second": round(s.connects.rate(), 1),
                        "p50_us": round(s.connects.latencies.p(50.0), 1),
                        "p90_us": round(s.connects.latencies.p(90.0), 1),
                        "p99_us": round(s.connects.latencies.p(99.0), 1),
                        "max_us": round(s.connects.latencies.max(), 1),
                        "syn_retransmissions": s.connects.syn_retrans,
                        "filter_cpu_ns": s.connects.filter_cpu_ns,
                        "server_accepted_with_warmup": s.connects.accepted,
                        "nfqueue_packets": s.connects.queued,
                    },
                    "udp": {
                        "count": s.udp.rtts.len(),
                        "seconds": round(s.udp.seconds, 4),
                        "per_second": round(s.udp.rate(), 1),
                        "p50_us": round(s.udp.rtts.p(50.0), 1),
                        "p99_us": round(s.udp.rtts.p(99.0), 1),
                        "max_us": round(s.udp.rtts.max(), 1),
                        "nfqueue_packets": s.udp.queued,
                        "filter_cpu_ns": s.udp.filter_cpu_ns,
                    },
                    "bulk": {
                        "bytes": s.bulk.bytes,
                        "seconds": round(s.bulk.seconds, 4),
                        "gbit_s": round(s.bulk.gbit_s(), 3),
                        "nfqueue_packets": s.bulk.queued,
                    },
                    "accept_all_judged": s.judged,
                    "flowgate_flow_new_logged": s.stop.tcp_flows_logged.map(|t| json!({"tcp": t, "udp": s.stop.udp_flows_logged})),
                    "opensnitch_exited_on_sigterm": s.stop.exited_on_term,
                    "opensnitch_rules_left_at_stop": s.stop.rules_left,
                })
            })
            .collect();
        configs.insert(k.name().to_string(), json!({ "rounds": rounds }));
    }
    let classify_setup: Vec<Value> = r
        .classify_setup
        .iter()
        .map(|(n, g, c, cover)| {
            json!({"rules": n, "generated_seconds": round(*g, 3), "compiled_seconds": round(*c, 3),
                   "rules_covering": {"last_rule": cover[0], "no_match": cover[1], "ipv6": cover[2]}})
        })
        .collect();
    let json = json!({
        "benchmark": "flowgate-compare",
        "date": meta.date,
        "command": meta.command,
        "machine": meta.machine,
        "source": meta.source,
        "loadavg_start": meta.load_start,
        "loadavg_end": meta.load_end,
        "wall_seconds": round(meta.wall, 1),
        "options": {
            "rounds": o.rounds, "connects": o.connects, "warmup": o.warmup, "udp": o.udp,
            "memory_flows": o.memory_flows, "bulk_seconds": o.bulk_seconds,
            "configs": o.configs.iter().map(|k| k.name()).collect::<Vec<_>>(),
        },
        "flowgate_config": {
            "flowgate-kernel": flowgate_extra(Kind::FlowgateKernel),
            "flowgate-user": flowgate_extra(Kind::FlowgateUser),
        },
        "opensnitch": {
            "version": r.snitch_version,
            "config": opensnitch::config_json(Path::new("<tmp>")),
        },
        "figures": Value::Object(figures),
        "goals": goals_json,
        "other_ratios": others_json,
        "notes": notes,
        "classify_setup": classify_setup,
        "configs": Value::Object(configs),
        "host_checks": meta.host_checks,
    });
    (md, json)
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

fn run(opts: &Opts, command: &str) -> Result<()> {
    let start = Instant::now();
    let load_start = loadavg();
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    eprintln!("compare: flowgate binary {}, load average {load_start}", opts.flowgate.display());
    let root_rules_before = root_nfqueue_rules()?;
    // Each configuration's flowgate config must load before anything runs.
    for k in [Kind::FlowgateKernel, Kind::FlowgateUser] {
        if opts.configs.contains(&k) {
            let text = format!("run_dir = \"/nonexistent\"\nqueues = 2\n{}", flowgate_extra(k));
            flowgate::config::parse(Path::new("compare.toml"), &text)
                .map_err(|e| format!("[{}] this flowgate does not take the benchmark's config: {e}", k.name()))?;
        }
    }
    let snitch_version = if opts.configs.contains(&Kind::OpenSnitch) {
        Some(opensnitch::version(&opts.opensnitchd).map_err(|e| format!("[opensnitch] {e}"))?)
    } else {
        None
    };
    // Client and server ends of the memory workload's connections, and spare.
    let need = (2 * (MEMORY_WARMUP + opts.memory_flows) + 1024) as u64;
    let nofile = raise_nofile(need.max(8192))?;
    if nofile < need {
        return Err(format!("RLIMIT_NOFILE is {nofile}; --memory-flows {} needs {need}", opts.memory_flows));
    }
    let mut fixtures = Vec::new();
    let mut classify_setup = Vec::new();
    if opts.classify {
        for (n, _) in CLASSIFY_SIZES {
            let f = ClassifyFixture::build(n).map_err(|e| format!("classification, {n} rules: {e}"))?;
            let cover = f.lookups().map(|(_, flow)| f.covering_rules(flow));
            eprintln!("compare: {n} rules generated in {:.2?}, compiled in {:.2?}", f.generated_in, f.compiled_in);
            classify_setup.push((n, f.generated_in.as_secs_f64(), f.compiled_in.as_secs_f64(), cover));
            fixtures.push(f);
        }
    }
    let mut samples: Vec<(Kind, Vec<Sample>)> = opts.configs.iter().map(|&k| (k, Vec::new())).collect();
    let mut classify = Vec::new();
    let n = opts.configs.len();
    for r in 0..opts.rounds {
        for i in 0..n {
            let idx = (r + i) % n;
            let kind = samples[idx].0;
            let t = Instant::now();
            let s = run_one(kind, opts, r + 1).map_err(|e| format!("[{}] round {}: {e}", kind.name(), r + 1))?;
            eprintln!(
                "compare: round {}/{} [{}] {:.1} s: connects {:.0}/s p50 {:.1} µs p99 {:.1} µs ({:.2} queued/conn); \
                 UDP {:.0}/s p50 {:.1} µs; bulk {:.2} Gbit/s; memory {}",
                r + 1,
                opts.rounds,
                kind.name(),
                t.elapsed().as_secs_f64(),
                s.connects.rate(),
                s.connects.latencies.p(50.0),
                s.connects.latencies.p(99.0),
                s.connects.queued as f64 / s.connects.latencies.len() as f64,
                s.udp.rate(),
                s.udp.rtts.p(50.0),
                s.bulk.gbit_s(),
                s.memory.per_flow().map_or("n/a".into(), |b| format!("{b:.0} B/flow")),
            );
            samples[idx].1.push(s);
        }
        if !fixtures.is_empty() {
            let c = classify_round(&fixtures);
            eprintln!(
                "compare: round {}/{} classify (ns, last_rule/no_match/ipv6): 100 {:.0}/{:.0}/{:.0}, 10k \
                 {:.0}/{:.0}/{:.0}, 1M {:.0}/{:.0}/{:.0}",
                r + 1,
                opts.rounds,
                c[0][0],
                c[0][1],
                c[0][2],
                c[1][0],
                c[1][1],
                c[1][2],
                c[2][0],
                c[2][1],
                c[2][2]
            );
            classify.push(c);
        }
    }
    drop(fixtures);
    // Nothing of the run may be left.
    let mut problems = Vec::new();
    if !check_nothing_left() {
        problems.push("namespaces or flowgate processes were left (removed now)".to_string());
    }
    let snitches = opensnitch::processes(&opts.opensnitchd);
    if !snitches.is_empty() {
        problems.push(format!("opensnitchd processes are running: {snitches:?}"));
    }
    let root_rules_after = root_nfqueue_rules()?;
    let new_rules: Vec<&String> = root_rules_after.iter().filter(|l| !root_rules_before.contains(l)).collect();
    if !new_rules.is_empty() {
        problems.push(format!("NFQUEUE rules appeared in this machine's own iptables: {new_rules:?}"));
    }
    if !problems.is_empty() {
        return Err(format!("after the run: {}", problems.join("; ")));
    }
    let host_checks = json!({
        "summary": format!(
            "no lab namespace, flowgate or opensnitchd process left; this machine's own iptables and ip6tables hold {} \
             NFQUEUE rules, as before the run",
            root_rules_after.len()
        ),
        "opensnitchd_processes": snitches,
        "root_nfqueue_rules_before": root_rules_before,
        "root_nfqueue_rules_after": root_rules_after,
    });
    let results = Results { opts, samples, classify, classify_setup, snitch_version };
    let meta = Meta {
        date,
        command: command.to_string(),
        load_start,
        load_end: loadavg(),
        wall: start.elapsed().as_secs_f64(),
        machine: machine(),
        source: source_state(),
        host_checks,
    };
    let (md, json) = render(&results, &meta);
    write_results(&opts.out, "compare", &md, &json)?;
    print_result(&md, &json, opts.json.as_deref())
}

fn main() {
    let opts = begin("compare", "network namespaces, iptables, NFQUEUE, opensnitchd", parse_opts);
    let command = std::env::var("COMPARE_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("compare {}", args.join(" ")).trim().to_string()
    });
    if let Err(e) = run(&opts, &command) {
        eprintln!("compare: FAILED: {e}");
        check_nothing_left();
        std::process::exit(1);
    }
}
