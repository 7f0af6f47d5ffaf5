//! Live benchmark of the daemon's flow registry at very many live flows: memory per flow, the
//! time to list them all, and how long new connections wait while a listing runs. Run it with
//! `bench/flows.sh` (root); see bench/README.md, "Flow registry at 1,000,000 flows".
//!
//! For each size N (100,000 and 1,000,000 by default), in a fresh lab
//! (`crates/flowgate/tests/lab/mod.rs`: namespaces `cli`, `host`, `srv`) and with a fresh
//! `flowgate run` in `host` (2 queues, `queue_max_len` 65536, `max_flows` 4,000,000, every idle
//! timeout 30 minutes, no rules: allow everything, events logged to a file in the temp dir):
//!
//! 1. **fill**: `cli` sends one UDP datagram to each of N distinct destinations (203.0.113.1 to
//!    .254 without .10, ports 20000 and up), from one socket (198.18.0.2:40000). Each datagram is
//!    a new flow that `host` forwards, judged by the daemon; nothing answers (`srv` drops them),
//!    so each leaves one unreplied conntrack entry. The sender goes 1,000 datagrams at a time,
//!    each step only when the NFQUEUE queues of `host` hold few enough packets that the step
//!    keeps them within `--budget` (20,000; the kernel's own count, `queue_total` of
//!    `/proc/net/netfilter/nfnetlink_queue`): the queues (65,536 packets each) and the daemon's
//!    socket buffers never overflow, which with `fail = "open"` would let flows through
//!    unjudged. Then it waits until the daemon's live-flow count (`flowgate stats`,
//!    `total.flows`) holds all N; the fill rate is N over the time until then.
//! 2. **memory**: the daemon's `VmRSS` before and after the fill, per flow; `total.flows` and
//!    `total.timers` from `flowgate stats --json`.
//! 3. **listing**: `ip netns exec <host> flowgate flows --json --run-dir DIR`, its stdout read
//!    through a pipe here; the time from the spawn to its exit, to its first line, the lines,
//!    and how many are the fill's flows (UDP to 203.0.113.x). The same with `--port 20000` (a
//!    filter the daemon applies; it matches one flow per destination address).
//! 4. **stall**: new TCP connections from `host` to an accept-and-close server on 203.0.113.10
//!    in `srv` (the connect loop of live.rs: a source port of its own each, closed with
//!    SO_LINGER 0, only `connect()` timed). A batch with nothing else running (after a warm-up),
//!    then a batch that starts right after a `flowgate flows --json` listing of all flows was
//!    spawned and goes on until the listing ended (at least `--during-min` connections).
//! 5. **CPU**, during the fill and the listings: the daemon's threads' time on a CPU and waiting
//!    for one (`/proc/PID/task/*/schedstat`), the connecting thread's, the machine's idle time.
//!
//! The kernel must keep N entries: conntrack's table limit, `nf_conntrack_max`, is global and
//! writable only in the root namespace. The benchmark raises it to the largest N + 200,000 for
//! the run and restores it: a guard's Drop on every return and unwinding panic; the value to
//! restore also sits in a static, restored by an `atexit` hook when the process exits any other
//! way (the signal thread of [`flowgate_bench::guard::install`] ends with `exit`), and by a
//! panic hook when panics abort. Only a SIGKILL leaves it raised (the original is printed at
//! the start). In `host`, `nf_conntrack_udp_timeout` and `nf_conntrack_udp_timeout_stream`
//! (per-namespace) are set to 3600 s so no entry expires during the run.
//!
//! The results are printed as a table, and the last line of stdout is one JSON object with
//! everything (also written to `--json FILE`).
//!
//! Cleanup: the lab's guards delete every namespace (killing what is inside) and stop the daemon
//! (SIGTERM, then SIGKILL), also when a size fails; the temp dir (run_dir, the event log) goes
//! with its guard. SIGINT, SIGTERM and SIGHUP are taken by the guard's signal thread, which
//! kills everything in this process's namespaces, deletes them, removes the temp dirs and exits
//! (and the exit restores `nf_conntrack_max`). `bench/flows.sh` builds this binary with
//! unwinding panics, so a failure unwinds through the guards.

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child as ProcChild, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flowgate_bench::args::{Args, whole_number};
use flowgate_bench::connect::{AcceptServer, FIRST_CLIENT_PORT, Latencies, client_ports, connect_once};
use flowgate_bench::counters::tcp_ext;
use flowgate_bench::daemon::{self, Daemon, check_nothing_left, check_stopped_alone, child_setup, describe_exit};
use flowgate_bench::guard::{TempDir, begin};
use flowgate_bench::lab::{CLI_V4, Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::process::vm_bytes;
use flowgate_bench::report::{loadavg, print_result, round};
use nix::sys::socket::SockaddrIn;
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// The fill's destinations: 203.0.113.1 to .254 without the service address .10, each on ports
/// `FILL_FIRST_PORT` and up; flow `i` goes to host `i % 253`, port `FILL_FIRST_PORT + i / 253`.
const FILL_HOSTS: usize = 253;
const FILL_FIRST_PORT: u16 = 20_000;
/// The fill's one source socket in `cli`.
const FILL_SOURCE_PORT: u16 = 40_000;
/// Largest N (the default 4,000,000 `max_flows`, shared by two engines, leaves room for an
/// uneven split).
const MAX_N: usize = 3_000_000;
/// How long the daemon's live-flow count may stand still during the fill before the run fails.
const FILL_STALL: Duration = Duration::from_secs(20);
/// How often the fill asks the daemon for its counters (workers publish them every 250 ms).
const STATS_POLL: Duration = Duration::from_millis(20);
/// Datagrams the fill sends at a time, and how often it looks at the queues while they are
/// too full for the next step.
const FILL_STEP: usize = 1000;
const QUEUE_POLL: Duration = Duration::from_micros(200);
/// Servers of the connect loop on 203.0.113.10 (5002 first; more ports give more distinct
/// 4-tuples to a loop that runs as long as a listing of a million flows).
const ACCEPT_PORTS: [u16; 8] = [5002, 5003, 5004, 5005, 5006, 5007, 5008, 5009];
/// conntrack's limit during the run: the largest N plus this.
const CT_HEADROOM: u64 = 200_000;
const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// Per-namespace conntrack timeouts set in `host` (seconds).
const UDP_CT_TIMEOUT: &str = "3600";
/// The daemon may take 60 s to print its ready line and 180 s to exit after SIGTERM (it closes,
/// and logs, every flow first); its first 20 stderr lines are echoed to this process's stderr,
/// all are kept for the report.
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(60),
    stop_timeout: Duration::from_secs(180),
    echo_lines: 20,
    echo_more: "... (further lines are kept for the report, not shown)",
};
/// How long one listing may take.
const LISTING_TIMEOUT: Duration = Duration::from_secs(300);

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    flows: Vec<usize>,
    budget: usize,
    connects: usize,
    warmup: usize,
    during_min: usize,
    /// Least time from one connection's start to the next (0: back to back).
    gap: Duration,
    /// Niceness of the listing that runs during the connections (a diagnostic).
    listing_nice: Option<i32>,
    /// The daemon's `max_flows`.
    max_flows: usize,
}

const USAGE: &str = "usage: flows [--flowgate PATH] [--json FILE] [--flows N,...] [--quick] [--budget B]
             [--connects K] [--warmup W] [--during-min M] [--gap-us G]
             [--listing-nice N] [--max-flows F]

Runs as root. For each N: a fresh lab and `flowgate run` in its `host`; N UDP flows forwarded
from `cli` (at most B packets waiting in the NFQUEUE queues); the daemon's memory per flow; the
time of `flowgate flows --json` over all of them and with a `--port` filter; connect() times of
new TCP connections from `host`, K with nothing else running and, during a listing of all flows,
as many as fit in the listing (at least M).

Diagnostics: --gap-us starts each connection at least G µs after the one before (0: back to
back); --listing-nice runs the listing during the connections under `nice -n N`; --max-flows
sets the daemon's max_flows (its tables are allocated for that many at start).

Defaults: --flows 100000,1000000 --budget 20000 --connects 2000 --warmup 100 --during-min 500
--gap-us 0 --max-flows 4000000; --quick is --flows 20000. --flowgate defaults to `flowgate` next
to this binary, else <workspace>/target/release/flowgate. Raises the root namespace's
net.netfilter.nf_conntrack_max to the largest N + 200000 for the run and restores it.";

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        flowgate: PathBuf::new(),
        json: None,
        flows: vec![100_000, 1_000_000],
        budget: 20_000,
        connects: 2000,
        warmup: 100,
        during_min: 500,
        gap: Duration::ZERO,
        listing_nice: None,
        max_flows: 4_000_000,
    };
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        let mut count = |name: &str, lo: usize, hi: usize| whole_number(&args.value(name)?, name, lo, hi);
        match a.as_str() {
            "--flows" => {
                let list = args.value("--flows")?;
                opts.flows =
                    list.split(',').map(|s| whole_number(s.trim(), "--flows", 1000, MAX_N)).collect::<Result<_>>()?;
            }
            "--quick" => opts.flows = vec![20_000],
            "--budget" => opts.budget = count("--budget", 2 * FILL_STEP, 60_000)?,
            "--connects" => opts.connects = count("--connects", 10, 180_000)?,
            "--warmup" => opts.warmup = count("--warmup", 0, 5000)?,
            "--during-min" => opts.during_min = count("--during-min", 1, 20_000)?,
            "--max-flows" => opts.max_flows = count("--max-flows", 2000, 16_000_000)?,
            "--listing-nice" => opts.listing_nice = Some(count("--listing-nice", 0, 19)? as i32),
            "--gap-us" => opts.gap = Duration::from_micros(count("--gap-us", 0, 100_000)? as u64),
            other => return Err(args.unknown(other)),
        }
    }
    // Each of the two engines gets half of max_flows; the fill's flows split about 47/53 between
    // them (the queues are chosen by a hash of the addresses), and the connections add theirs.
    let largest = opts.flows.iter().copied().max().unwrap_or(0);
    if largest * 55 / 100 + 100_000 > opts.max_flows / 2 {
        return Err(format!("--max-flows {} is too small for {largest} flows", opts.max_flows));
    }
    if opts.warmup + opts.connects + opts.during_min > client_slots() {
        return Err(format!("--warmup + --connects + --during-min must not exceed {}", client_slots()));
    }
    (opts.flowgate, opts.json) = args.finish()?;
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// nf_conntrack_max of the root namespace
// ---------------------------------------------------------------------------------------------

/// The root namespace's `nf_conntrack_max` before this run raised it; 0 while there is nothing
/// to restore. Whoever restores it first (the guard's Drop, the `atexit` hook, the panic hook)
/// takes it out, so it is written back once.
static CT_MAX_ORIGINAL: AtomicU64 = AtomicU64::new(0);

fn read_u64(path: &str) -> Result<u64> {
    let s = fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    s.trim().parse().map_err(|e| format!("{path}: {s:?}: {e}"))
}

/// Writes the saved value back, if one is saved. Returns it, or None when there was nothing to
/// restore.
fn restore_ct_max() -> Option<Result<u64>> {
    let original = CT_MAX_ORIGINAL.swap(0, Ordering::SeqCst);
    if original == 0 {
        return None;
    }
    Some(fs::write(CT_MAX, original.to_string()).map(|()| original).map_err(|e| format!("{CT_MAX}: {e}")))
}

/// For exits that skip the guard's Drop: `std::process::exit` from the guard's signal thread
/// (after its cleanup) or from `main`.
extern "C" fn restore_ct_max_at_exit() {
    match restore_ct_max() {
        Some(Ok(v)) => eprintln!("flows: exiting: restored {CT_MAX} to {v}"),
        Some(Err(e)) => eprintln!("flows: exiting: could not restore {e}; set it back by hand"),
        None => {}
    }
}

/// Registers the restore for the paths where no Drop runs. Call after [`begin`] (which installs
/// the guard) and before raising the limit. The guard's signal thread ends with
/// `std::process::exit`, which runs `atexit` hooks; with `panic = "abort"` a panic hook restores
/// it (the guard's own hook, set before, cleans up the labs).
fn install_ct_max_restore() -> Result<()> {
    // SAFETY: registers a plain function with no arguments; it may run on any thread at exit.
    if unsafe { libc::atexit(restore_ct_max_at_exit) } != 0 {
        return Err("atexit: cannot register the nf_conntrack_max restore".into());
    }
    if cfg!(panic = "abort") {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            restore_ct_max_at_exit();
        }));
    }
    Ok(())
}

/// Raises the root namespace's `nf_conntrack_max` to at least `to` and restores it on drop.
struct CtMax {
    original: u64,
    set: u64,
}

impl CtMax {
    fn raise(to: u64) -> Result<CtMax> {
        let original = read_u64(CT_MAX)?;
        if original >= to {
            return Ok(CtMax { original, set: original });
        }
        CT_MAX_ORIGINAL.store(original, Ordering::SeqCst);
        if let Err(e) = fs::write(CT_MAX, to.to_string()) {
            CT_MAX_ORIGINAL.store(0, Ordering::SeqCst);
            return Err(format!("{CT_MAX}: cannot raise it to {to}: {e}"));
        }
        Ok(CtMax { original, set: to })
    }
}

impl Drop for CtMax {
    fn drop(&mut self) {
        if let Some(Err(e)) = restore_ct_max() {
            eprintln!("flows: could not restore {CT_MAX} to {}: {e}; set it back by hand", self.original);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// Writes the daemon's config: run_dir and log in the temp dir, 2 queues of 65,536 packets,
/// room for `max_flows` flows (4,000,000 unless asked), 30-minute idle timeouts, no rules.
fn write_config(dir: &TempDir, max_flows: usize) -> Result<PathBuf> {
    daemon::write_config(
        dir,
        &format!(
            "queue_max_len = 65536\nmax_flows = {max_flows}\n\n\
             [timeouts]\nudp = \"30m\"\ntcp = \"30m\"\nicmp = \"30m\"\nother = \"30m\"\n"
        ),
    )
}

/// The daemon's counters (`{"workers": [...], "total": {...}, "conntrack": {...}, "events":
/// {...}}`), over the control socket: the request `flowgate stats --json` makes, without
/// starting a process for each poll.
fn stats(run_dir: &Path) -> Result<Value> {
    let request = flowgate::protocol::Request::new(flowgate::protocol::Command::Stats);
    let reply = flowgate::daemon::control::request(run_dir, &request)?;
    Ok(reply.stats.unwrap_or_default())
}

/// The same through the CLI, as a user runs it: `ip netns exec <host> flowgate stats --json`.
fn stats_cli(ns: &Netns, flowgate: &Path, run_dir: &Path) -> Result<Value> {
    let (f, d) = (flowgate.to_string_lossy(), run_dir.to_string_lossy());
    let o = ns.run(&[&f, "stats", "--json", "--run-dir", &d]);
    if !o.status.success() {
        return Err(format!("flowgate stats: {}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim()));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("flowgate stats --json: {e}"))
}

fn total(stats: &Value, key: &str) -> u64 {
    stats["total"][key].as_u64().unwrap_or(0)
}

/// A sysctl of `ns` (path under /proc/sys), read through `ip netns exec`.
fn ns_sysctl(ns: &Netns, path: &str) -> Result<u64> {
    let o = ns.run(&["cat", &format!("/proc/sys/{path}")]);
    let s = String::from_utf8_lossy(&o.stdout);
    s.trim().parse().map_err(|_| format!("{path} in {}: {s:?} {}", ns.name, String::from_utf8_lossy(&o.stderr)))
}

// ---------------------------------------------------------------------------------------------
// Where the CPU time goes
// ---------------------------------------------------------------------------------------------

/// CPU seconds (user + system) from the `stat` line of a process or thread (`/proc/.../stat`):
/// its name and the time.
fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let s = fs::read_to_string(path).ok()?;
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let name = s[open + 1..close].to_string();
    // Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((name, ticks as f64 / hz))
}

/// The machine's CPU time by kind (`/proc/stat`'s `cpu` line), in seconds: user (with nice),
/// system, softirq, idle (with iowait), and the rest (irq, steal).
fn system_cpu() -> [f64; 5] {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    [g(0) + g(1), g(2), g(6), g(3) + g(4), g(5) + g(7)].map(|t| t as f64 / hz)
}

/// `/proc/.../schedstat` of a thread: seconds on a CPU and seconds runnable but waiting for
/// one (the run queue).
fn schedstat(path: &str) -> Option<(f64, f64)> {
    let s = fs::read_to_string(path).ok()?;
    let mut f = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    Some((f.next()?? as f64 / 1e9, f.next()?? as f64 / 1e9))
}

/// CPU time of the daemon (per thread name: on a CPU and waiting for one; and in all, where
/// threads that have exited, such as the control socket's client threads, still count), of this
/// process, and of the machine.
struct CpuSample {
    at: Instant,
    daemon: f64,
    threads: std::collections::BTreeMap<String, (f64, f64)>,
    bench: f64,
    system: [f64; 5],
}

impl CpuSample {
    fn take(pid: i32) -> CpuSample {
        let mut threads = std::collections::BTreeMap::new();
        if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in dir.flatten() {
                let dir = t.path().display().to_string();
                let name = fs::read_to_string(format!("{dir}/comm")).unwrap_or_default().trim().to_string();
                if let Some((run, wait)) = schedstat(&format!("{dir}/schedstat")) {
                    let e = threads.entry(name).or_insert((0.0, 0.0));
                    e.0 += run;
                    e.1 += wait;
                }
            }
        }
        CpuSample {
            at: Instant::now(),
            daemon: stat_cpu(&format!("/proc/{pid}/stat")).map_or(0.0, |x| x.1),
            threads,
            bench: stat_cpu("/proc/self/stat").map_or(0.0, |x| x.1),
            system: system_cpu(),
        }
    }

    /// What was spent since `before`, in seconds, and the wall time.
    fn since(&self, before: &CpuSample) -> Value {
        let mut threads = serde_json::Map::new();
        let mut named = 0.0;
        for (name, (run, wait)) in &self.threads {
            let (r0, w0) = before.threads.get(name).copied().unwrap_or((0.0, 0.0));
            let (run, wait) = (run - r0, wait - w0);
            if run > 0.0005 {
                named += run;
                threads.insert(name.clone(), json!({"cpu": round(run, 3), "runqueue_wait": round(wait, 3)}));
            }
        }
        let daemon = self.daemon - before.daemon;
        let sys: Vec<f64> = self.system.iter().zip(before.system).map(|(a, b)| a - b).collect();
        json!({
            "wall_seconds": round(self.at.duration_since(before.at).as_secs_f64(), 3),
            "daemon_seconds": round(daemon, 2),
            "daemon_threads_seconds": threads,
            "daemon_exited_threads_seconds": round((daemon - named).max(0.0), 2),
            "bench_seconds": round(self.bench - before.bench, 2),
            "machine_seconds": {
                "user": round(sys[0], 2),
                "system": round(sys[1], 2),
                "softirq": round(sys[2], 2),
                "idle": round(sys[3], 2),
                "other": round(sys[4], 2),
            },
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Fill
// ---------------------------------------------------------------------------------------------

/// Destination of fill flow `i`.
fn fill_target(i: usize) -> SocketAddrV4 {
    let h = (i % FILL_HOSTS) as u8 + 1; // 1..=253
    let host = if h >= 10 { h + 1 } else { h }; // 1..=9, 11..=254
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, host), FILL_FIRST_PORT + (i / FILL_HOSTS) as u16)
}

struct Fill {
    seconds: f64,
    /// Live flows before the fill, and the daemon's count at the end minus that.
    base: u64,
    counted: u64,
    /// Time spent in send_to(): each datagram's way through `host` up to its NFQUEUE queue is
    /// done by the sender's system call.
    send_seconds: f64,
    /// Times the sender waited for the queues to drain, and the most packets they held at once.
    waits: u64,
    max_waiting: u64,
    /// Until the last datagram was sent, and until the daemon's count showed the last flow.
    sent_seconds: f64,
    /// Most packets allowed to wait in the queues.
    budget: usize,
}

impl Fill {
    fn rate(&self, n: usize) -> f64 {
        n as f64 / self.seconds
    }
}

/// Packets that the NFQUEUE queues of the calling thread's namespace hold for user space now
/// (queued and not yet answered), summed over the queues (`queue_total` of
/// `/proc/net/netfilter/nfnetlink_queue`; `thread-self` because only this thread is in the
/// namespace).
fn nfqueue_waiting() -> Result<u64> {
    const PATH: &str = "/proc/thread-self/net/netfilter/nfnetlink_queue";
    let text = fs::read_to_string(PATH).map_err(|e| format!("{PATH}: {e}"))?;
    let mut sum = 0;
    for line in text.lines() {
        let waiting = line.split_whitespace().nth(2).and_then(|v| v.parse::<u64>().ok());
        sum += waiting.ok_or_else(|| format!("{PATH}: {line:?}"))?;
    }
    Ok(sum)
}

/// Waits until the daemon counts at least `want` live flows; fails when the count stands still
/// for [`FILL_STALL`].
fn wait_flows(run_dir: &Path, want: u64) -> Result<u64> {
    let mut last = (u64::MAX, Instant::now());
    loop {
        let s = stats(run_dir)?;
        let live = total(&s, "flows");
        if live >= want {
            return Ok(live);
        }
        if live != last.0 {
            last = (live, Instant::now());
        } else if last.1.elapsed() >= FILL_STALL {
            return Err(format!(
                "the daemon's live flows stood at {live} for {FILL_STALL:?}, {want} expected \
                 (flows_opened {}, flows_closed {}, untracked {}, queue_overruns {}, events_dropped {}): \
                 datagrams were lost before the daemon, or passed it unjudged",
                total(&s, "flows_opened"),
                total(&s, "flows_closed"),
                total(&s, "untracked"),
                total(&s, "queue_overruns"),
                total(&s, "events_dropped"),
            ));
        }
        std::thread::sleep(STATS_POLL); // bounded polling interval
    }
}

/// Sends one datagram per flow from `cli`'s socket, in steps of [`FILL_STEP`], each only when
/// the NFQUEUE queues of `host` have room for it within `budget` waiting packets; then waits
/// until the daemon counts every flow. Runs on a thread in `host`'s namespace (it reads the
/// queues' counters there); the socket was made in `cli`.
fn fill(lab: &Lab, n: usize, budget: usize, run_dir: &Path) -> Result<Fill> {
    let src = SocketAddr::V4(SocketAddrV4::new(CLI_V4, FILL_SOURCE_PORT));
    let sock = lab.cli.in_ns(move || UdpSocket::bind(src)).map_err(|e| format!("bind {src} in cli: {e}"))?;
    let run_dir = run_dir.to_path_buf();
    lab.host.in_ns(move || {
        let payload = *b"flowgate-bench-flows";
        let base = total(&stats(&run_dir)?, "flows");
        let t0 = Instant::now();
        let mut send_time = Duration::ZERO;
        let mut send = |from: usize, to: usize| -> Result<()> {
            let t = Instant::now();
            for i in from..to {
                let dst = fill_target(i);
                sock.send_to(&payload, dst).map_err(|e| format!("fill: send to {dst} (flow {i}): {e}"))?;
            }
            send_time += t.elapsed();
            Ok(())
        };
        // The first datagram alone: the neighbour entries on its way get resolved, so no burst
        // waits in (and overflows) an unresolved neighbour's queue.
        send(0, 1)?;
        wait_flows(&run_dir, base + 1)?;
        let (mut sent, mut waits, mut max_waiting) = (1, 0, 0);
        while sent < n {
            let next = (sent + FILL_STEP).min(n);
            let mut waiting = nfqueue_waiting()?;
            max_waiting = max_waiting.max(waiting);
            if waiting as usize + (next - sent) > budget {
                waits += 1;
                let mut last = (waiting, Instant::now());
                while waiting as usize + (next - sent) > budget {
                    std::thread::sleep(QUEUE_POLL); // bounded polling interval
                    waiting = nfqueue_waiting()?;
                    if waiting < last.0 {
                        last = (waiting, Instant::now());
                    } else if last.1.elapsed() >= FILL_STALL {
                        return Err(format!(
                            "fill: {waiting} packets waited in host's NFQUEUE queues for {FILL_STALL:?} \
                             after {sent} datagrams: the daemon stopped answering"
                        ));
                    }
                }
            }
            send(sent, next)?;
            sent = next;
        }
        let sent_seconds = t0.elapsed().as_secs_f64();
        let end = wait_flows(&run_dir, base + n as u64)?;
        Ok(Fill {
            seconds: t0.elapsed().as_secs_f64(),
            base,
            counted: end - base,
            send_seconds: send_time.as_secs_f64(),
            waits,
            max_waiting,
            sent_seconds,
            budget,
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Listings
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Listing {
    seconds: f64,
    /// Until the first line arrived (the daemon syncs with conntrack before it lists).
    first_line_seconds: f64,
    lines: u64,
    /// Lines that are flows of the fill: UDP to 203.0.113.x (counted only where asked for).
    filled: Option<u64>,
    bytes: u64,
    stderr: String,
}

impl Listing {
    fn json(&self) -> Value {
        json!({
            "seconds": round(self.seconds, 3),
            "first_line_seconds": round(self.first_line_seconds, 3),
            "lines": self.lines,
            "fill_flows_listed": self.filled,
            "flows_per_second": round(self.lines as f64 / self.seconds, 0),
            "bytes": self.bytes,
        })
    }
}

/// `ip netns exec <host> flowgate flows --json --run-dir DIR [extra...]`, stdout piped.
/// With `nice`, under `nice -n N`.
fn spawn_listing(ns: &Netns, flowgate: &Path, run_dir: &Path, extra: &[&str], nice: Option<i32>) -> Result<ProcChild> {
    let (f, d) = (flowgate.to_string_lossy(), run_dir.to_string_lossy());
    let n = nice.map(|n| n.to_string()).unwrap_or_default();
    let mut args = if nice.is_some() { vec!["nice", "-n", &*n] } else { Vec::new() };
    args.extend_from_slice(&[&*f, "flows", "--json", "--run-dir", &*d]);
    args.extend_from_slice(extra);
    let mut cmd = ns.command(&args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    child_setup(&mut cmd, libc::SIGKILL);
    cmd.spawn().map_err(|e| format!("cannot run flowgate flows: {e}"))
}

/// Reads a listing's stdout to the end; with `classify`, also counts the fill's flows (lines with
/// `"protocol":"udp"` and a remote in 203.0.113.0/24), else only lines. Then waits for the
/// process and fails unless it exited 0. Times are from `t0`.
fn read_listing(mut child: ProcChild, t0: Instant, classify: bool) -> Result<Listing> {
    let out = child.stdout.take().ok_or("no stdout pipe")?;
    let mut err = child.stderr.take().ok_or("no stderr pipe")?;
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut l = Listing::default();
    let mut r = BufReader::with_capacity(1 << 20, out);
    if classify {
        l.filled = Some(0);
        let mut line = Vec::with_capacity(1024);
        loop {
            line.clear();
            let n = r.read_until(b'\n', &mut line).map_err(|e| format!("reading the listing: {e}"))?;
            if n == 0 {
                break;
            }
            if l.lines == 0 {
                l.first_line_seconds = t0.elapsed().as_secs_f64();
            }
            l.lines += 1;
            l.bytes += n as u64;
            let s = String::from_utf8_lossy(&line);
            if s.contains("\"protocol\":\"udp\"") && s.contains("\"remote\":\"203.0.113.") {
                *l.filled.get_or_insert(0) += 1;
            }
        }
    } else {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(|e| format!("reading the listing: {e}"))?;
            if n == 0 {
                break;
            }
            if l.bytes == 0 {
                l.first_line_seconds = t0.elapsed().as_secs_f64();
            }
            l.bytes += n as u64;
            l.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
    }
    let st = wait_child(&mut child, LISTING_TIMEOUT.saturating_sub(t0.elapsed()));
    l.seconds = t0.elapsed().as_secs_f64();
    l.stderr = stderr.join().unwrap_or_default().trim().to_string();
    match st {
        Some(s) if s.success() => Ok(l),
        s => Err(format!("flowgate flows: {} after {} lines: {}", describe_exit(s), l.lines, l.stderr)),
    }
}

/// Waits up to `timeout` for a child (bounded polling; a listing's end is also its stdout's
/// end, so this is short), killing it after that.
fn wait_child(child: &mut ProcChild, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// Connection slots: source port × server port, every one a 4-tuple of its own.
fn client_slots() -> usize {
    client_ports() * ACCEPT_PORTS.len()
}

/// Slot `k`: (source port, server address). Source ports first, then the next server port.
fn slot(k: usize) -> (u16, SockaddrIn) {
    let ports = client_ports();
    let src = FIRST_CLIENT_PORT + (k % ports) as u16;
    (src, SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, ACCEPT_PORTS[k / ports])))
}

/// connect() times of one batch.
struct Connects {
    /// Per connection: start, in seconds after the batch's reference time, and connect() time
    /// in µs, in order.
    samples: Vec<(f64, f64)>,
    /// connect() times in µs, sorted.
    sorted: Latencies,
    seconds: f64,
    /// The loop stopped because the connection slots ran out (not because it was done).
    exhausted: bool,
    /// During the batch: SYNs `host` retransmitted, connections `srv`'s listen queues refused,
    /// conntrack syncs of the daemon.
    syn_retrans: u64,
    listen_overflows: u64,
    syncs: u64,
    /// The connecting thread's own time on a CPU and waiting for one, in seconds.
    thread: Option<(f64, f64)>,
}

impl Connects {
    fn new(samples: Vec<(f64, f64)>, seconds: f64, exhausted: bool) -> Connects {
        let sorted = Latencies::new(samples.iter().map(|s| s.1).collect());
        Connects { samples, sorted, seconds, exhausted, syn_retrans: 0, listen_overflows: 0, syncs: 0, thread: None }
    }

    fn p(&self, q: f64) -> f64 {
        self.sorted.p(q)
    }

    fn max(&self) -> f64 {
        self.sorted.max()
    }

    fn over(&self, us: f64) -> usize {
        self.sorted.over(us)
    }

    /// The connections that started in `[from, to)` seconds (after the reference time), as a
    /// batch of their own.
    fn window(&self, from: f64, to: f64) -> Connects {
        let part: Vec<(f64, f64)> = self.samples.iter().copied().filter(|s| s.0 >= from && s.0 < to).collect();
        Connects::new(part, to - from, false)
    }

    /// Count, p50, p99, max and connections over 1 ms.
    fn brief(&self) -> Value {
        json!({
            "count": self.sorted.len(),
            "p50_us": round(self.p(50.0), 1),
            "p99_us": round(self.p(99.0), 1),
            "max_us": round(self.max(), 1),
            "over_1ms": self.over(1000.0),
        })
    }

    /// The `k` slowest connections: (start in s, µs).
    fn slowest(&self, k: usize) -> Vec<(f64, f64)> {
        let mut s = self.samples.clone();
        s.sort_by(|a, b| b.1.total_cmp(&a.1));
        s.truncate(k);
        s
    }

    fn json(&self) -> Value {
        let mean = self.sorted.mean();
        json!({
            "count": self.sorted.len(),
            "seconds": round(self.seconds, 3),
            "per_second": round(self.sorted.len() as f64 / self.seconds, 0),
            "p50_us": round(self.p(50.0), 1),
            "p90_us": round(self.p(90.0), 1),
            "p99_us": round(self.p(99.0), 1),
            "p99_9_us": round(self.p(99.9), 1),
            "max_us": round(self.max(), 1),
            "mean_us": round(mean, 1),
            "over_1ms": self.over(1000.0),
            "slowest": self.slowest(5).iter()
                .map(|(at, us)| json!({"at_s": round(*at, 4), "us": round(*us, 1)}))
                .collect::<Vec<_>>(),
            "slots_exhausted": self.exhausted,
            "syn_retransmissions": self.syn_retrans,
            "listen_overflows": self.listen_overflows,
            "conntrack_syncs": self.syncs,
            "connect_thread_seconds": self.thread.map(|(run, wait)| json!({
                "cpu": round(run, 3),
                "runqueue_wait": round(wait, 3),
            })),
        })
    }
}

/// Sequential connections from the calling thread's namespace, slots `first..`: at least `min`
/// of them, then more until `until` is set (if given; else exactly `min`), or until the slots
/// run out. Times are taken from `t0`. Returns the batch and the next free slot.
fn connect_loop(
    first: usize,
    min: usize,
    until: Option<&AtomicBool>,
    t0: Instant,
    gap: Duration,
) -> Result<(Connects, usize)> {
    let mut samples = Vec::with_capacity(min.max(4096));
    let mut k = first;
    let sched0 = schedstat("/proc/thread-self/schedstat");
    let start = Instant::now();
    let mut exhausted = false;
    loop {
        let done = samples.len() >= min && until.is_none_or(|u| u.load(Ordering::Acquire));
        if done {
            break;
        }
        if k >= client_slots() {
            exhausted = true;
            break;
        }
        let (port, to) = slot(k);
        let started = Instant::now();
        let at = started.duration_since(t0).as_secs_f64();
        let dt = connect_once(&to, port).map_err(|e| format!("connection {} (slot {k}): {e}", samples.len() + 1))?;
        samples.push((at, dt.as_secs_f64() * 1e6));
        k += 1;
        let next = started + gap;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now); // the pacing asked for with --gap-us
        }
    }
    let mut c = Connects::new(samples, start.elapsed().as_secs_f64(), exhausted);
    if let (Some(a), Some(b)) = (sched0, schedstat("/proc/thread-self/schedstat")) {
        c.thread = Some((b.0 - a.0, b.1 - a.1));
    }
    Ok((c, k))
}

/// Counters read around a batch of connections.
struct Around {
    syn: u64,
    overflows: u64,
    syncs: u64,
}

fn around(lab: &Lab, run_dir: &Path) -> Result<Around> {
    Ok(Around {
        syn: tcp_ext(&lab.host, "TCPSynRetrans")?,
        overflows: tcp_ext(&lab.srv, "ListenOverflows")?,
        syncs: stats(run_dir)?["conntrack"]["syncs"].as_u64().unwrap_or(0),
    })
}

impl Connects {
    fn count_since(&mut self, before: &Around, after: &Around) {
        self.syn_retrans = after.syn.saturating_sub(before.syn);
        self.listen_overflows = after.overflows.saturating_sub(before.overflows);
        self.syncs = after.syncs.saturating_sub(before.syncs);
    }
}

// ---------------------------------------------------------------------------------------------
// One size
// ---------------------------------------------------------------------------------------------

struct SizeReport {
    n: usize,
    ready: Duration,
    fill: Fill,
    rss_before: u64,
    rss_filled: u64,
    rss_listed: u64,
    hwm: u64,
    /// `flowgate stats --json` after the fill.
    stats_filled: Value,
    /// Conntrack entries in `host` after the fill, and the limit seen there.
    conntrack_entries: u64,
    conntrack_max_in_ns: u64,
    listing: Listing,
    filtered: Listing,
    filtered_port: u16,
    filtered_expected: u64,
    baseline: Connects,
    during: Connects,
    /// The listing that ran during `during`.
    concurrent: Listing,
    /// CPU time spent during the fill, the timed listing, and the listing with connections.
    cpu_fill: Value,
    cpu_listing: Value,
    cpu_concurrent: Value,
    accepted: u64,
    /// The daemon's counters at the end, before the stop.
    stats_end: Value,
    stopped: Duration,
    log_bytes: u64,
    daemon_messages: Vec<String>,
}

fn run_size(n: usize, opts: &Opts) -> Result<SizeReport> {
    // Drop order (reverse of declaration): daemon, temp dir, servers, lab.
    let lab = Lab::new(&format!("fl{n}"));
    lab.host.sysctls(&[
        ("net/netfilter/nf_conntrack_udp_timeout", UDP_CT_TIMEOUT),
        ("net/netfilter/nf_conntrack_udp_timeout_stream", UDP_CT_TIMEOUT),
    ]);
    let servers: Vec<AcceptServer> = ACCEPT_PORTS
        .iter()
        .map(|&p| AcceptServer::start(&lab.srv, SocketAddrV4::new(SRV_SERVICE_V4, p)))
        .collect::<Result<_>>()?;
    let tmp = TempDir::new(&format!("n{n}"))?;
    let config = write_config(&tmp, opts.max_flows)?;
    let run_dir = tmp.run_dir();
    let daemon::Ready { daemon, took: ready, .. } = Daemon::start(&lab.host, &opts.flowgate, &config, &DAEMON)?;
    let pid = daemon.flowgate_pid(&opts.flowgate)?;
    eprintln!("flows: [{n}] flowgate ready after {:.2} s (pid {pid})", ready.as_secs_f64());

    // Memory before: after one stats request, so the control socket's first client is served.
    stats(&run_dir)?;
    let rss_before = vm_bytes(pid, "VmRSS")?;
    let cpu0 = CpuSample::take(pid);
    let fill = fill(&lab, n, opts.budget, &run_dir)?;
    let cpu_fill = CpuSample::take(pid).since(&cpu0);
    let rss_filled = vm_bytes(pid, "VmRSS")?;
    eprintln!(
        "flows: [{n}] filled in {:.2} s ({:.0} flows/s; {} waits for room in the queues, at most {} packets waiting); RSS {:.1} -> {:.1} MiB",
        fill.seconds,
        fill.rate(n),
        fill.waits,
        fill.max_waiting,
        rss_before as f64 / 1048576.0,
        rss_filled as f64 / 1048576.0
    );
    let stats_filled = stats_cli(&lab.host, &opts.flowgate, &run_dir)?;
    let conntrack_entries = ns_sysctl(&lab.host, "net/netfilter/nf_conntrack_count")?;
    let conntrack_max_in_ns = ns_sysctl(&lab.host, "net/netfilter/nf_conntrack_max")?;

    let cpu0 = CpuSample::take(pid);
    let t0 = Instant::now();
    let listing = read_listing(spawn_listing(&lab.host, &opts.flowgate, &run_dir, &[], None)?, t0, true)?;
    let cpu_listing = CpuSample::take(pid).since(&cpu0);
    eprintln!(
        "flows: [{n}] flowgate flows --json: {} lines ({} of the fill) in {:.2} s, first line after {:.2} s",
        listing.lines,
        listing.filled.unwrap_or(0),
        listing.seconds,
        listing.first_line_seconds
    );
    let filtered_port = FILL_FIRST_PORT;
    let filtered_expected = n.min(FILL_HOSTS) as u64;
    let port = filtered_port.to_string();
    let t0 = Instant::now();
    let filtered =
        read_listing(spawn_listing(&lab.host, &opts.flowgate, &run_dir, &["--port", &port], None)?, t0, true)?;
    eprintln!(
        "flows: [{n}] flowgate flows --json --port {port}: {} lines in {:.3} s",
        filtered.lines, filtered.seconds
    );
    let rss_listed = vm_bytes(pid, "VmRSS")?;

    // Connections: a warm-up, the baseline, then a batch during a listing of every flow.
    let warmup = opts.warmup;
    let gap = opts.gap;
    let (_, next) = lab.host.in_ns(move || connect_loop(0, warmup, None, Instant::now(), gap))?;
    let before = around(&lab, &run_dir)?;
    let k = opts.connects;
    let (mut baseline, next) = lab.host.in_ns(move || connect_loop(next, k, None, Instant::now(), gap))?;
    let after = around(&lab, &run_dir)?;
    baseline.count_since(&before, &after);
    eprintln!(
        "flows: [{n}] connects, no listing: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        baseline.p(50.0),
        baseline.p(99.0),
        baseline.max()
    );

    let before = around(&lab, &run_dir)?;
    let done = Arc::new(AtomicBool::new(false));
    let cpu0 = CpuSample::take(pid);
    let t0 = Instant::now();
    let child = spawn_listing(&lab.host, &opts.flowgate, &run_dir, &[], opts.listing_nice)?;
    let (d, min) = (done.clone(), opts.during_min);
    let connector = lab.host.spawn_in_ns(move || connect_loop(next, min, Some(&*d), t0, gap));
    let concurrent = read_listing(child, t0, false);
    done.store(true, Ordering::Release);
    let connected = connector.join().map_err(|_| "the connect thread panicked".to_string());
    let cpu_concurrent = CpuSample::take(pid).since(&cpu0);
    let concurrent = concurrent?;
    let (mut during, _) = connected??;
    let after = around(&lab, &run_dir)?;
    during.count_since(&before, &after);
    eprintln!(
        "flows: [{n}] connects during a listing ({} lines, {:.2} s): {} connects, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        concurrent.lines,
        concurrent.seconds,
        during.sorted.len(),
        during.p(50.0),
        during.p(99.0),
        during.max()
    );
    let hwm = vm_bytes(pid, "VmHWM")?;
    let stats_end = stats(&run_dir)?;
    let accepted = servers.iter().map(AcceptServer::accepted).sum();

    let (stopped, daemon_messages) = daemon.stop()?;
    eprintln!("flows: [{n}] flowgate stopped (exit 0) after {:.2} s", stopped.as_secs_f64());
    let log_bytes = fs::metadata(tmp.log()).map(|m| m.len()).unwrap_or(0);
    check_stopped_alone(&lab.host)?;
    drop(servers);
    Ok(SizeReport {
        n,
        ready,
        fill,
        rss_before,
        rss_filled,
        rss_listed,
        hwm,
        stats_filled,
        conntrack_entries,
        conntrack_max_in_ns,
        listing,
        filtered,
        filtered_port,
        filtered_expected,
        baseline,
        during,
        concurrent,
        cpu_fill,
        cpu_listing,
        cpu_concurrent,
        accepted,
        stats_end,
        stopped,
        log_bytes,
        daemon_messages,
    })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn size_section(r: &SizeReport, out: &mut String) -> Value {
    let n = r.n;
    let per_flow = (r.rss_filled as f64 - r.rss_before as f64) / n as f64;
    let s = &r.stats_filled;
    let mut problems = Vec::new();
    if r.fill.counted < n as u64 {
        problems.push(format!("the daemon counted {} live flows for {n} sent", r.fill.counted));
    }
    let listed = r.listing.filled.unwrap_or(0);
    if listed < n as u64 {
        problems.push(format!("the listing held {listed} of the {n} fill flows ({} lines)", r.listing.lines));
    }
    if r.concurrent.lines < n as u64 {
        problems.push(format!("the listing during the connects had {} lines for {n} flows", r.concurrent.lines));
    }
    if r.filtered.filled != Some(r.filtered_expected) {
        problems.push(format!(
            "--port {} listed {} fill flows, {} expected",
            r.filtered_port,
            r.filtered.filled.unwrap_or(0),
            r.filtered_expected
        ));
    }
    if r.conntrack_entries < n as u64 {
        problems.push(format!("conntrack in host held {} entries for {n} flows", r.conntrack_entries));
    }
    for key in ["untracked", "queue_overruns", "events_dropped", "commands_refused", "kernel_lost"] {
        let v = total(&r.stats_end, key);
        if v > 0 {
            problems.push(format!("stats: total.{key} = {v}"));
        }
    }
    for key in ["reports_dropped", "event_overruns"] {
        let v = r.stats_end["conntrack"][key].as_u64().unwrap_or(0);
        if v > 0 {
            problems.push(format!("stats: conntrack.{key} = {v}"));
        }
    }
    if r.during.exhausted {
        problems.push("the connect loop ran out of connection slots before the listing ended".into());
    }
    for m in &r.daemon_messages {
        problems.push(format!("flowgate said: {m}"));
    }
    let (b, d) = (&r.baseline, &r.during);
    let _ = writeln!(
        out,
        "{:>9} {:>9.0} {:>9.1} {:>9.1} {:>8.0} {:>9} {:>9} {:>8.2} {:>9.0} {:>9.3}",
        n,
        r.fill.rate(n),
        mib(r.rss_before),
        mib(r.rss_filled),
        per_flow,
        total(s, "flows"),
        total(s, "timers"),
        r.listing.seconds,
        r.listing.lines as f64 / r.listing.seconds,
        r.filtered.seconds,
    );
    json!({
        "flows": n,
        "ready_seconds": round(r.ready.as_secs_f64(), 3),
        "fill": {
            "seconds": round(r.fill.seconds, 3),
            "per_second": round(r.fill.rate(n), 0),
            "send_seconds": round(r.fill.send_seconds, 3),
            "sent_seconds": round(r.fill.sent_seconds, 3),
            "waits_for_queue_room": r.fill.waits,
            "most_packets_waiting": r.fill.max_waiting,
            "queue_budget": r.fill.budget,
            "live_flows_before": r.fill.base,
            "counted": r.fill.counted,
        },
        "memory": {
            "rss_before_bytes": r.rss_before,
            "rss_filled_bytes": r.rss_filled,
            "rss_after_listings_bytes": r.rss_listed,
            "hwm_bytes": r.hwm,
            "bytes_per_flow": round(per_flow, 1),
        },
        "stats_after_fill": {
            "flows": total(s, "flows"),
            "timers": total(s, "timers"),
            "flows_opened": total(s, "flows_opened"),
            "packets": total(s, "packets"),
            "per_worker_flows": s["workers"].as_array().map(|w| w.iter().map(|x| x["flows"].clone()).collect::<Vec<_>>()),
            "conntrack": s["conntrack"].clone(),
            "events": s["events"].clone(),
        },
        "stats_end": r.stats_end.clone(),
        "cpu": {
            "fill": r.cpu_fill.clone(),
            "listing": r.cpu_listing.clone(),
            "listing_with_connects": r.cpu_concurrent.clone(),
        },
        "conntrack_entries_in_host": r.conntrack_entries,
        "conntrack_max_seen_in_host": r.conntrack_max_in_ns,
        "listing": r.listing.json(),
        "filtered_listing": {
            "port": r.filtered_port,
            "expected": r.filtered_expected,
            "listing": r.filtered.json(),
        },
        "connects": {
            "baseline": b.json(),
            "during_listing": d.json(),
            "listing_during": r.concurrent.json(),
            // Until the listing's first bytes (process start, the daemon's conntrack sync), and
            // after (the flows streaming).
            "during_phases": {
                "before_first_line": d.window(0.0, r.concurrent.first_line_seconds).brief(),
                "streaming": d.window(r.concurrent.first_line_seconds, f64::INFINITY).brief(),
            },
            "p99_ratio": round(d.p(99.0) / b.p(99.0), 3),
            "max_ratio": round(d.max() / b.max(), 3),
            "max_minus_baseline_max_us": round(d.max() - b.max(), 1),
            "server_accepted": r.accepted,
        },
        "stop_seconds": round(r.stopped.as_secs_f64(), 3),
        "event_log_bytes": r.log_bytes,
        "daemon_messages": r.daemon_messages,
        "problems": problems,
    })
}

fn connects_table(results: &[SizeReport], gap: Duration, out: &mut String) {
    let pace = if gap.is_zero() {
        "back to back".to_string()
    } else {
        format!("one started every {} µs at most", gap.as_micros())
    };
    let _ = writeln!(out, "\n== connect() from host to 203.0.113.10 (new TCP flows, {pace}), µs");
    let _ = writeln!(
        out,
        "{:>9} {:<15} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>5}",
        "flows", "batch", "count", "p50", "p90", "p99", "p99.9", "max", ">1ms", "syncs"
    );
    for r in results {
        for (name, c) in [("no listing", &r.baseline), ("during listing", &r.during)] {
            let _ = writeln!(
                out,
                "{:>9} {:<15} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1} {:>6} {:>5}",
                r.n,
                name,
                c.sorted.len(),
                c.p(50.0),
                c.p(90.0),
                c.p(99.0),
                c.p(99.9),
                c.max(),
                c.over(1000.0),
                c.syncs
            );
        }
        let (b, d) = (&r.baseline, &r.during);
        let _ = writeln!(
            out,
            "{:>9} during/no listing: p99 {:.2}x, max {:.2}x (max {:+.0} µs); listing {:.2} s, {} lines, connects covered {:.2} s",
            r.n,
            d.p(99.0) / b.p(99.0),
            d.max() / b.max(),
            d.max() - b.max(),
            r.concurrent.seconds,
            r.concurrent.lines,
            d.samples.last().map_or(0.0, |s| s.0)
        );
        let (sync, stream) =
            (d.window(0.0, r.concurrent.first_line_seconds), d.window(r.concurrent.first_line_seconds, f64::INFINITY));
        let _ = writeln!(
            out,
            "{:>9} during listing, until its first line ({:.2} s): {} connects, p99 {:.1} µs, max {:.1} µs, {} over 1 ms; \
             while it streamed: {} connects, p99 {:.1} µs, max {:.1} µs, {} over 1 ms",
            r.n,
            r.concurrent.first_line_seconds,
            sync.sorted.len(),
            sync.p(99.0),
            sync.max(),
            sync.over(1000.0),
            stream.sorted.len(),
            stream.p(99.0),
            stream.max(),
            stream.over(1000.0)
        );
        let slow: Vec<String> = d.slowest(5).iter().map(|(at, us)| format!("{us:.0} µs at {at:.3} s")).collect();
        let _ = writeln!(out, "{:>9} slowest during the listing: {}", r.n, slow.join(", "));
    }
}

fn main() {
    let code = real_main();
    std::process::exit(code);
}

fn real_main() -> i32 {
    let opts = begin("flows", "network namespaces, iptables, NFQUEUE, sysctls", parse_opts);
    if let Err(e) = install_ct_max_restore() {
        eprintln!("flows: {e}");
        return 1;
    }
    let start = Instant::now();
    let load_start = loadavg();
    let source = flowgate_bench::report::source_state();
    eprintln!("flows: flowgate binary {}, load average {load_start}", opts.flowgate.display());
    let largest = opts.flows.iter().copied().max().unwrap_or(0) as u64;
    let ct = match CtMax::raise(largest + CT_HEADROOM) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flows: {e}");
            return 1;
        }
    };
    if ct.set == ct.original {
        eprintln!("flows: {CT_MAX}: {} already holds the largest N + {CT_HEADROOM}; left as it is", ct.original);
    } else {
        eprintln!(
            "flows: {CT_MAX}: {} -> {} for this run (restored at the end; after a SIGKILL of this process, set it back by hand)",
            ct.original, ct.set
        );
    }
    let mut results = Vec::new();
    let mut failed = None;
    for &n in &opts.flows {
        eprintln!("flows: [{n}] starting");
        match run_size(n, &opts) {
            Ok(r) => results.push(r),
            Err(e) => {
                failed = Some(format!("[{n}] {e}"));
                break;
            }
        }
    }
    let (ct_original, ct_set) = (ct.original, ct.set);
    drop(ct);
    let ct_now = read_u64(CT_MAX);
    if !check_nothing_left() {
        return 1;
    }
    match &ct_now {
        Ok(v) if *v == ct_original => {}
        other => {
            eprintln!("flows: {CT_MAX} is {other:?} after the run, not the original {ct_original}");
            return 1;
        }
    }
    if let Some(e) = failed {
        eprintln!("flows: {e}");
        return 1;
    }

    let mut text = String::new();
    let _ = writeln!(
        text,
        "\n== flows: flowgate's flow registry at N live flows (UDP flows forwarded cli -> 203.0.113.0/24, 2 queues)"
    );
    let _ = writeln!(
        text,
        "{:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "flows", "fill/s", "RSS0 MiB", "RSS MiB", "B/flow", "live", "timers", "list s", "listed/s", "filter s"
    );
    let sizes: Vec<Value> = results.iter().map(|r| size_section(r, &mut text)).collect();
    // Memory added per flow from one size to the next (each size has a daemon of its own; both
    // start from about the same RSS): what the fixed costs of a fill do not blur.
    let mut by_size: Vec<&SizeReport> = results.iter().collect();
    by_size.sort_by_key(|r| r.n);
    let marginal: Vec<Value> = by_size
        .windows(2)
        .filter(|w| w[1].n > w[0].n)
        .map(|w| {
            let per = (w[1].rss_filled as f64 - w[0].rss_filled as f64) / (w[1].n - w[0].n) as f64;
            let _ = writeln!(text, "RSS added per flow from {} to {} flows: {per:.0} bytes", w[0].n, w[1].n);
            json!({"from": w[0].n, "to": w[1].n, "bytes_per_flow": round(per, 1)})
        })
        .collect();
    connects_table(&results, opts.gap, &mut text);
    for (r, v) in results.iter().zip(&sizes) {
        for p in v["problems"].as_array().into_iter().flatten() {
            let _ = writeln!(text, "PROBLEM [{}]: {}", r.n, p.as_str().unwrap_or_default());
        }
    }
    let json = json!({
        "benchmark": "flowgate-flows",
        "machine": flowgate_bench::report::machine(),
        "source": source,
        "flowgate_binary": opts.flowgate.display().to_string(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_seconds": round(start.elapsed().as_secs_f64(), 1),
        "queue_budget": opts.budget,
        "connect_gap_us": opts.gap.as_micros() as u64,
        "listing_nice": opts.listing_nice,
        "max_flows": opts.max_flows,
        "conntrack_max": {"original": ct_original, "during_run": ct_set, "after_run": ct_now.ok()},
        "sizes": sizes,
        "memory_marginal": marginal,
    });
    if let Err(e) = print_result(&text, &json, opts.json.as_deref()) {
        eprintln!("flows: {e}");
        return 1;
    }
    0
}
