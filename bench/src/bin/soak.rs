//! Soak test of the live daemon: `flowgate run` under a steady churn of short flows and a few
//! long ones for half an hour, and whether what it holds stays flat. Run it with `bench/soak.sh`
//! (root); see bench/README.md, "Soak".
//!
//! In a fresh lab (`crates/flowgate/tests/lab/mod.rs`: namespaces `cli`, `host`, `srv`),
//! `flowgate run` runs in `host` with 2 queues, no rules (allow everything), events logged to a
//! file in the temp dir, and short timeouts so that flows also end by idleness (`udp` 10 s, `tcp`
//! 60 s, `tcp_closing` 2 s; the conntrack sync runs every 3.3 s). For `--minutes M` (30), from
//! `host` (198.51.100.1) to servers on 203.0.113.10 in `srv`:
//!
//! * **TCP churn**: `--tcp-rate` (200) new connections a second, paced on a fixed schedule, to
//!   accept-and-close servers on 8 ports; each from a source port of its own (10000-32767, so a
//!   4-tuple comes back only after 182,144 connections: 15 minutes at 200/s, long after its
//!   conntrack entry and flow are gone); every other one closed with SO_LINGER 0 (a RST), the
//!   others with a plain close (FIN, the client's socket goes to TIME_WAIT);
//! * **UDP churn**: `--udp-rate` (50) new UDP flows a second, one datagram each from a socket of
//!   its own (source ports 10000-32767 in turn) to a UDP echo server; the answer is looked for a
//!   second later and the socket closed, so the flow ends by idleness;
//! * **long connections**: `--long` (5) TCP connections to an echo server, opened when the load
//!   starts, each exchanging 16 bytes every second for the whole run; a failed exchange is
//!   counted and the connection opened again;
//! * every `--list-seconds` (60): `flowgate flows --json` (through `ip netns exec`), its lines,
//!   whether the long connections are listed, and their byte counters (which must keep rising:
//!   the kernel handles those flows, their counters come from conntrack);
//! * every `--sample-seconds` (30), from t = 0 (before the load starts) to the end: the daemon's
//!   VmRSS and VmHWM and threads (`/proc/PID/status`), open descriptors (`/proc/PID/fd`), CPU
//!   time; `flowgate stats --json` (its totals: flows, timers, interfaces, retired, held packets,
//!   pending enforcements and events, events dropped, provider faults, untracked, kernel_lost);
//!   conntrack's entry count in `host`; the connections made and their connect() times since the
//!   sample before; the machine's load average and idle share (other work shows there).
//!
//! Then the churn stops and the daemon drains (`--drain-seconds`, 30: until only the long
//! connections are live flows), a last sample is taken, the long connections close and the
//! daemon stops; its event log is counted (every flow opened is closed, one flow per connection
//! and datagram).
//!
//! **Verdicts** (reported, never asserted): each measure's last third of the run (samples with
//! t > 2T/3) against its middle third (T/3 < t <= 2T/3). Memory (VmRSS, VmHWM) is "flat" when
//! the last third's highest value is at most the middle third's highest plus 5% or 2 MiB,
//! whichever is more; descriptors, threads and interfaces when the last third's highest is at
//! most the middle third's highest (no more of them); flows, timers, retired flows, held
//! packets, pending enforcements and events, and conntrack entries, which move with the churn,
//! when the last third's mean is at most 1.1 times the middle third's mean plus 16; the counters
//! of lost or refused work (events dropped, provider faults, untracked, kernel_lost) when they
//! did not rise during the last third; the daemon's CPU (% of a core between samples) when the
//! last third's mean is at most the middle third's mean times 1.25 plus 1. Anything else is
//! "growing". Each measure's least-squares slope over the middle and last thirds is shown too
//! (per hour), for a trend too slow for its rule. Timers must also track flows
//! (every flow has one timer): the largest |timers - flows| of any sample is reported.
//!
//! The curve (every sample) and the verdicts are printed as tables; the last line of stdout is
//! one JSON object with everything (also written to `--json FILE`), the machine included.
//!
//! Cleanup: the load's threads are stopped and joined by a guard before the daemon stops; the
//! lab's guards delete every namespace (killing what is inside) and stop the daemon (SIGTERM,
//! then SIGKILL), also when the run fails; the temp dir (run_dir, event log) goes with its
//! guard. SIGINT, SIGTERM and SIGHUP are taken by the guard's signal thread, which kills
//! everything in this process's namespaces, deletes them, removes the temp dirs and exits.
//! `bench/soak.sh` builds this binary with unwinding panics, so a failure unwinds through the
//! guards. Nothing outside the lab's namespaces is changed (`nf_conntrack_max` is only read).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowgate_bench::args::{Args, number, whole_number};
use flowgate_bench::connect::{AcceptServer, FIRST_CLIENT_PORT, client_ports};
use flowgate_bench::daemon::{self, Daemon, check_nothing_left, check_stopped_alone, child_setup, describe_exit};
use flowgate_bench::guard::{TempDir, begin};
use flowgate_bench::lab::{self, HOST_SRV_SIDE_V4, Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::report::{loadavg, percentile, print_result, round};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// Accept-and-close servers of the TCP churn on 203.0.113.10: with the 22,768 source ports, a
/// 4-tuple comes back after 182,144 connections.
const ACCEPT_PORTS: [u16; 8] = [5002, 5003, 5004, 5005, 5006, 5007, 5008, 5009];
/// The long connections' TCP echo server and the UDP churn's echo server, on 203.0.113.10.
const ECHO_PORT: u16 = 7007;
const UDP_ECHO_PORT: u16 = 5353;
/// What a long connection sends every second (and reads back): 16 bytes.
const EXCHANGE_LEN: usize = 16;
/// How long a long connection's exchange, or its reconnection, may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after its datagram a UDP churn socket is checked for the echo, then closed.
const UDP_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// The daemon's config after run_dir, log and 2 queues: no rules, short timeouts.
const CONFIG: &str = "[timeouts]\nudp = \"10s\"\ntcp = \"60s\"\ntcp_closing = \"2s\"\n";
/// The daemon may take 60 s to print its ready line and 120 s to exit after SIGTERM; its first
/// 20 stderr lines are echoed to this process's stderr, all are kept for the report.
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(60),
    stop_timeout: Duration::from_secs(120),
    echo_lines: 20,
    echo_more: "... (further lines are kept for the report, not shown)",
};
/// How long one `flowgate stats` or `flowgate flows` may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const MIB: f64 = 1048576.0;

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    minutes: f64,
    tcp_rate: f64,
    udp_rate: f64,
    long: usize,
    sample_every: Duration,
    list_every: Duration,
    drain: Duration,
}

const USAGE: &str = "usage: soak [--flowgate PATH] [--json FILE] [--minutes M] [--quick] [--tcp-rate R]
            [--udp-rate U] [--long L] [--sample-seconds S] [--list-seconds S] [--drain-seconds D]

Runs as root. `flowgate run` in a fresh lab's `host` (2 queues, no rules, timeouts udp 10s, tcp
60s, tcp_closing 2s) for M minutes under a steady churn from `host` to 203.0.113.10: R new TCP
connections a second (half closed with a RST, half with a FIN), U new UDP flows a second (one
datagram each, to an echo server), and L long TCP connections exchanging 16 bytes every second;
`flowgate flows --json` every --list-seconds. Every --sample-seconds: the daemon's VmRSS, VmHWM,
descriptors, threads, CPU, `flowgate stats --json` totals and host's conntrack entries. Prints
the curve, a flat/growing verdict per measure (last third of the run against the middle third),
the long connections' exchanges and failures, the rates achieved, and what the daemon said.

Defaults: --minutes 30 --tcp-rate 200 --udp-rate 50 --long 5 --sample-seconds 30
--list-seconds 60 --drain-seconds 30; --quick is --minutes 2. --flowgate defaults to `flowgate`
next to this binary, else <workspace>/target/release/flowgate.";

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        flowgate: PathBuf::new(),
        json: None,
        minutes: 30.0,
        tcp_rate: 200.0,
        udp_rate: 50.0,
        long: 5,
        sample_every: Duration::from_secs(30),
        list_every: Duration::from_secs(60),
        drain: Duration::from_secs(30),
    };
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        let mut secs = |name: &str, lo: usize, hi: usize| -> Result<Duration> {
            Ok(Duration::from_secs(whole_number(&args.value(name)?, name, lo, hi)? as u64))
        };
        match a.as_str() {
            "--minutes" => opts.minutes = number(&args.value("--minutes")?, "--minutes", 0.5, 1440.0)?,
            "--quick" => opts.minutes = 2.0,
            // A 4-tuple comes back after 182,144 connections: at 1,500/s after 121 s, when its
            // conntrack entry (TIME_WAIT: 120 s) is gone.
            "--tcp-rate" => opts.tcp_rate = number(&args.value("--tcp-rate")?, "--tcp-rate", 0.0, 1500.0)?,
            // A UDP source port comes back after 22,768 flows: at 300/s after 76 s, when its
            // conntrack entry (30 s) is gone.
            "--udp-rate" => opts.udp_rate = number(&args.value("--udp-rate")?, "--udp-rate", 0.0, 300.0)?,
            "--long" => opts.long = whole_number(&args.value("--long")?, "--long", 0, 100)?,
            "--sample-seconds" => opts.sample_every = secs("--sample-seconds", 5, 600)?,
            "--list-seconds" => opts.list_every = secs("--list-seconds", 5, 3600)?,
            "--drain-seconds" => opts.drain = secs("--drain-seconds", 0, 600)?,
            other => return Err(args.unknown(other)),
        }
    }
    if opts.sample_every.as_secs_f64() * 3.0 > opts.minutes * 60.0 {
        return Err(format!("--sample-seconds must leave at least three samples in the run\n\n{USAGE}"));
    }
    (opts.flowgate, opts.json) = args.finish()?;
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// The daemon, seen from outside
// ---------------------------------------------------------------------------------------------

/// What `/proc/PID` says of the daemon.
#[derive(Clone, Copy, Default)]
struct Proc {
    rss: u64,
    hwm: u64,
    threads: u64,
    fds: u64,
    /// User and system CPU time so far, in seconds.
    cpu: f64,
}

/// Reads the daemon's `/proc/PID/status`, `fd` and `stat`; an error when the process is gone.
fn read_proc(pid: i32) -> Result<Proc> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).map_err(|e| format!("{path}: {e} (did flowgate exit?)"))?;
    let field = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("{path}: no {key} (did flowgate exit?)"))
    };
    let (rss, hwm, threads) = (field("VmRSS")? * 1024, field("VmHWM")? * 1024, field("Threads")?);
    let fd_dir = format!("/proc/{pid}/fd");
    let fds = fs::read_dir(&fd_dir).map_err(|e| format!("{fd_dir}: {e}"))?.count() as u64;
    Ok(Proc { rss, hwm, threads, fds, cpu: cpu_seconds(pid).unwrap_or(f64::NAN) })
}

/// User + system CPU seconds of a process (`/proc/PID/stat`, fields 14 and 15).
fn cpu_seconds(pid: i32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// Conntrack's entry count in `ns` (`/proc/sys/net` shows the reading thread's namespace).
fn conntrack_count(ns: &Netns) -> Result<u64> {
    ns.in_ns(|| {
        let path = "/proc/sys/net/netfilter/nf_conntrack_count";
        let s = fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        s.trim().parse().map_err(|e| format!("{path}: {s:?}: {e}"))
    })
}

/// Runs `args` in `ns` (`ip netns exec`), stdout piped; kills it after `timeout`. Its stdout,
/// and how long it took; an error unless it exited 0.
fn run_cli(ns: &Netns, args: &[&str], timeout: Duration) -> Result<(Vec<u8>, f64)> {
    let t0 = Instant::now();
    let mut cmd = ns.command(args);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    child_setup(&mut cmd, libc::SIGKILL);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {args:?}: {e}"))?;
    let (mut out, mut err) = (child.stdout.take().ok_or("no stdout")?, child.stderr.take().ok_or("no stderr")?);
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(2)), // bounded poll
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = reader.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let took = t0.elapsed().as_secs_f64();
    match status {
        Some(s) if s.success() => Ok((stdout, took)),
        s => Err(format!("{}: {} after {took:.1} s: {}", args[1..].join(" "), describe_exit(s), stderr.trim())),
    }
}

/// `flowgate stats --json` in `ns`, as a user runs it.
fn stats_cli(ns: &Netns, flowgate: &Path, run_dir: &Path) -> Result<Value> {
    let (f, d) = (flowgate.to_string_lossy(), run_dir.to_string_lossy());
    let (out, _) = run_cli(ns, &[&f, "stats", "--json", "--run-dir", &d], CLI_TIMEOUT)?;
    serde_json::from_slice(&out).map_err(|e| format!("flowgate stats --json: {e}"))
}

/// One `flowgate flows --json` listing.
#[derive(Clone, Default)]
struct Listing {
    seconds: f64,
    lines: u64,
    /// Listed flows that are long connections (TCP to the echo server's port), and their bytes
    /// both ways as the listing gives them (conntrack's counts as of the last sync).
    long: u64,
    long_bytes: u64,
    error: Option<String>,
}

impl Listing {
    fn json(&self) -> Value {
        json!({
            "seconds": round(self.seconds, 3),
            "lines": self.lines,
            "long_listed": self.long,
            "long_bytes": self.long_bytes,
            "error": self.error,
        })
    }
}

fn listing(ns: &Netns, flowgate: &Path, run_dir: &Path) -> Listing {
    let (f, d) = (flowgate.to_string_lossy(), run_dir.to_string_lossy());
    match run_cli(ns, &[&f, "flows", "--json", "--run-dir", &d], CLI_TIMEOUT) {
        Ok((out, seconds)) => {
            let mut l = Listing { seconds, ..Listing::default() };
            let echo = format!("{SRV_SERVICE_V4}:{ECHO_PORT}");
            for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                l.lines += 1;
                match serde_json::from_slice::<Value>(line) {
                    Ok(v) if v["flow"]["protocol"] == "tcp" && v["flow"]["remote"] == echo.as_str() => {
                        l.long += 1;
                        l.long_bytes += v["bytes_out"].as_u64().unwrap_or(0) + v["bytes_in"].as_u64().unwrap_or(0);
                    }
                    Ok(_) => {}
                    Err(e) => l.error = Some(format!("a line that is no JSON ({e})")),
                }
            }
            l
        }
        Err(e) => Listing { error: Some(e), ..Listing::default() },
    }
}

// ---------------------------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------------------------

/// A fixed schedule of `rate` ticks a second from `start`: a tick that is late is taken at once
/// (the schedule does not slip, so the rate achieved is the rate asked for unless the machine
/// cannot keep up).
struct Pacer {
    start: Instant,
    rate: f64,
    n: u64,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer { start: Instant::now(), rate, n: 0 }
    }

    /// Waits for the next tick; false when `stop` was set.
    fn next(&mut self, stop: &AtomicBool) -> bool {
        let due = self.start + Duration::from_secs_f64(self.n as f64 / self.rate);
        loop {
            if stop.load(Ordering::Acquire) {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100))); // the pacing itself
        }
        self.n += 1;
        true
    }
}

/// Keeps the first ten error messages, with the time since the load started.
#[derive(Default)]
struct Errors(Mutex<Vec<String>>);

impl Errors {
    fn add(&self, t0: Instant, what: String) {
        let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() < 10 {
            v.push(format!("t={:.1} s: {what}", t0.elapsed().as_secs_f64()));
        }
    }

    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Takes the values gathered since the last call.
fn take(v: &Mutex<Vec<f64>>) -> Vec<f64> {
    std::mem::take(&mut *v.lock().unwrap_or_else(|p| p.into_inner()))
}

/// The TCP churn's counters.
#[derive(Default)]
struct TcpChurn {
    /// connect() calls, and those that succeeded (closed with a RST or a FIN) or failed.
    attempts: AtomicU64,
    made: AtomicU64,
    rst: AtomicU64,
    fin: AtomicU64,
    /// Failures before connect() (socket, bind) and of connect().
    failed: AtomicU64,
    /// connect() times (µs) since the sampler last took them.
    times: Mutex<Vec<f64>>,
    errors: Errors,
}

/// Connection slot `k`: a source port, then the next server port when the source ports ran out.
fn slot(k: u64) -> (u16, SockaddrIn) {
    let ports = client_ports() as u64;
    let k = k % (ports * ACCEPT_PORTS.len() as u64);
    let src = FIRST_CLIENT_PORT + (k % ports) as u16;
    (src, SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, ACCEPT_PORTS[(k / ports) as usize])))
}

/// One churn connection from `port`: SO_REUSEADDR (a FIN-closed connection leaves its port in
/// TIME_WAIT for 60 s), a blocking connect() (timed; SO_SNDTIMEO bounds it to 5 s), then close:
/// with SO_LINGER 0 (a RST) when `rst`, else a plain close (a FIN).
fn churn_connect(st: &TcpChurn, to: &SockaddrIn, port: u16, rst: bool) -> Result<Duration> {
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::seconds(5)).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    let local = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    bind(fd.as_raw_fd(), &local).map_err(|e| format!("bind {local}: {e}"))?;
    st.attempts.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    connect(fd.as_raw_fd(), to).map_err(|e| format!("connect {local} -> {to}: {e}"))?;
    let dt = t0.elapsed();
    if rst {
        setsockopt(&fd, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 })
            .map_err(|e| format!("SO_LINGER: {e}"))?;
    }
    drop(fd);
    Ok(dt)
}

/// The TCP churn, on a thread in `host`, until `stop`.
fn tcp_churn(rate: f64, stop: &AtomicBool, st: &TcpChurn, t0: Instant) {
    let mut pacer = Pacer::new(rate);
    let mut k = 0u64;
    while pacer.next(stop) {
        let (port, to) = slot(k);
        let rst = k.is_multiple_of(2);
        k += 1;
        match churn_connect(st, &to, port, rst) {
            Ok(dt) => {
                st.made.fetch_add(1, Ordering::Relaxed);
                (if rst { &st.rst } else { &st.fin }).fetch_add(1, Ordering::Relaxed);
                st.times.lock().unwrap_or_else(|p| p.into_inner()).push(dt.as_secs_f64() * 1e6);
            }
            Err(e) => {
                st.failed.fetch_add(1, Ordering::Relaxed);
                st.errors.add(t0, e);
            }
        }
    }
}

/// The UDP churn's counters.
#[derive(Default)]
struct UdpChurn {
    sent: AtomicU64,
    /// Datagrams whose echo was there a second later, and those whose echo was not.
    answered: AtomicU64,
    unanswered: AtomicU64,
    failed: AtomicU64,
    errors: Errors,
}

/// The UDP churn, on a thread in `host`, until `stop`: one datagram from a new socket per tick,
/// each socket checked for the echo and closed [`UDP_ANSWER_WAIT`] later.
fn udp_churn(rate: f64, to: SocketAddr, stop: &AtomicBool, st: &UdpChurn, t0: Instant) {
    let ports = client_ports() as u64;
    let mut open: VecDeque<(Instant, UdpSocket)> = VecDeque::new();
    let mut buf = [0u8; 64];
    let mut check = |sock: UdpSocket| match sock.recv(&mut buf) {
        Ok(_) => st.answered.fetch_add(1, Ordering::Relaxed),
        Err(_) => st.unanswered.fetch_add(1, Ordering::Relaxed),
    };
    let mut pacer = Pacer::new(rate);
    let mut k = 0u64;
    while pacer.next(stop) {
        let port = FIRST_CLIENT_PORT + (k % ports) as u16;
        k += 1;
        let sent = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(|s| s.send_to(b"flowgate-soak-udp", to).map(|_| s));
        match sent {
            Ok(s) => {
                st.sent.fetch_add(1, Ordering::Relaxed);
                open.push_back((Instant::now(), s));
            }
            Err(e) => {
                st.failed.fetch_add(1, Ordering::Relaxed);
                st.errors.add(t0, format!("UDP from port {port} to {to}: {e}"));
            }
        }
        while open.front().is_some_and(|(at, _)| at.elapsed() >= UDP_ANSWER_WAIT) {
            if let Some((_, s)) = open.pop_front() {
                check(s);
            }
        }
    }
    // The last second's sockets: each gets its full wait.
    for (at, s) in open {
        std::thread::sleep(UDP_ANSWER_WAIT.saturating_sub(at.elapsed()));
        check(s);
    }
}

/// The long connections' counters.
#[derive(Default)]
struct Long {
    exchanges: AtomicU64,
    failures: AtomicU64,
    reconnects: AtomicU64,
    /// Exchanges per connection.
    per_connection: Mutex<Vec<u64>>,
    /// Exchange times (µs) since the sampler last took them.
    times: Mutex<Vec<f64>>,
    errors: Errors,
}

/// A long connection to the echo server at `to`, from the calling thread's namespace.
fn open_long(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, EXCHANGE_TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(EXCHANGE_TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sends `msg` and reads it back.
fn exchange(s: &mut TcpStream, msg: &[u8; EXCHANGE_LEN]) -> Result<()> {
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; EXCHANGE_LEN];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if &back != msg {
        return Err(format!("echo {:?} for {:?}", String::from_utf8_lossy(&back), String::from_utf8_lossy(msg)));
    }
    Ok(())
}

/// The long connections, on a thread in `host`, until `stop`: one exchange on each every second;
/// a connection whose exchange fails is counted and opened again (at the next second).
fn long_connections(mut conns: Vec<Option<TcpStream>>, to: SocketAddr, stop: &AtomicBool, st: &Long, t0: Instant) {
    let mut pacer = Pacer::new(1.0);
    let mut round = 0u64;
    while pacer.next(stop) {
        for (i, c) in conns.iter_mut().enumerate() {
            if c.is_none() {
                match open_long(to) {
                    Ok(s) => {
                        st.reconnects.fetch_add(1, Ordering::Relaxed);
                        *c = Some(s);
                    }
                    Err(e) => {
                        st.failures.fetch_add(1, Ordering::Relaxed);
                        st.errors.add(t0, format!("long connection {i}: reconnect: {e}"));
                        continue;
                    }
                }
            }
            let Some(s) = c else { continue };
            let mut msg = [0u8; EXCHANGE_LEN];
            let text = format!("{:02} {:012}\n", i % 100, round % 1_000_000_000_000);
            msg.copy_from_slice(&text.as_bytes()[..EXCHANGE_LEN]);
            let t = Instant::now();
            match exchange(s, &msg) {
                Ok(()) => {
                    st.exchanges.fetch_add(1, Ordering::Relaxed);
                    st.times.lock().unwrap_or_else(|p| p.into_inner()).push(t.elapsed().as_secs_f64() * 1e6);
                    if let Some(n) = st.per_connection.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                        *n += 1;
                    }
                }
                Err(e) => {
                    st.failures.fetch_add(1, Ordering::Relaxed);
                    st.errors.add(t0, format!("long connection {i} ({:?}): {e}", s.local_addr().ok()));
                    *c = None;
                }
            }
        }
        round += 1;
    }
}

/// The running load: its threads (in `host`) and counters. Dropping it stops and joins every
/// thread, so no client outlives a failed run's daemon or lab.
struct Load {
    t0: Instant,
    stop_churn: Arc<AtomicBool>,
    stop_long: Arc<AtomicBool>,
    tcp: Arc<TcpChurn>,
    udp: Arc<UdpChurn>,
    long: Arc<Long>,
    churn: Vec<(&'static str, JoinHandle<()>)>,
    long_thread: Option<JoinHandle<()>>,
    /// Threads that panicked.
    panicked: Vec<&'static str>,
}

impl Load {
    /// Starts the churn threads and the long connections' thread (with `conns`, opened in
    /// `host`) in `host`.
    fn start(host: &Netns, opts: &Opts, conns: Vec<TcpStream>) -> Load {
        let t0 = Instant::now();
        let mut load = Load {
            t0,
            stop_churn: Arc::new(AtomicBool::new(false)),
            stop_long: Arc::new(AtomicBool::new(false)),
            tcp: Arc::new(TcpChurn::default()),
            udp: Arc::new(UdpChurn::default()),
            long: Arc::new(Long { per_connection: Mutex::new(vec![0; conns.len()]), ..Long::default() }),
            churn: Vec::new(),
            long_thread: None,
            panicked: Vec::new(),
        };
        if opts.tcp_rate > 0.0 {
            let (rate, stop, st) = (opts.tcp_rate, load.stop_churn.clone(), load.tcp.clone());
            load.churn.push(("tcp churn", host.spawn_in_ns(move || tcp_churn(rate, &stop, &st, t0))));
        }
        if opts.udp_rate > 0.0 {
            let (rate, stop, st) = (opts.udp_rate, load.stop_churn.clone(), load.udp.clone());
            let to = SocketAddr::V4(SocketAddrV4::new(SRV_SERVICE_V4, UDP_ECHO_PORT));
            load.churn.push(("udp churn", host.spawn_in_ns(move || udp_churn(rate, to, &stop, &st, t0))));
        }
        if !conns.is_empty() {
            let (stop, st) = (load.stop_long.clone(), load.long.clone());
            let to = SocketAddr::V4(SocketAddrV4::new(SRV_SERVICE_V4, ECHO_PORT));
            let conns = conns.into_iter().map(Some).collect();
            load.long_thread = Some(host.spawn_in_ns(move || long_connections(conns, to, &stop, &st, t0)));
        }
        load
    }

    fn stop_churn(&mut self) {
        self.stop_churn.store(true, Ordering::Release);
        for (name, t) in self.churn.drain(..) {
            if t.join().is_err() {
                self.panicked.push(name);
            }
        }
    }

    fn stop_long(&mut self) {
        self.stop_long.store(true, Ordering::Release);
        if let Some(t) = self.long_thread.take()
            && t.join().is_err()
        {
            self.panicked.push("long connections");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_churn();
        self.stop_long();
    }
}

// ---------------------------------------------------------------------------------------------
// Samples
// ---------------------------------------------------------------------------------------------

/// The load's counters at a sample (cumulative), and the connect() and exchange times since
/// the sample before.
#[derive(Clone, Default)]
struct LoadCounts {
    tcp_attempts: u64,
    tcp_made: u64,
    tcp_failed: u64,
    udp_sent: u64,
    udp_answered: u64,
    udp_unanswered: u64,
    long_exchanges: u64,
    long_failures: u64,
    connect_us: Vec<f64>,
    exchange_us: Vec<f64>,
}

impl LoadCounts {
    fn read(load: &Load) -> LoadCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut connect_us = take(&load.tcp.times);
        connect_us.sort_by(f64::total_cmp);
        let mut exchange_us = take(&load.long.times);
        exchange_us.sort_by(f64::total_cmp);
        LoadCounts {
            tcp_attempts: r(&load.tcp.attempts),
            tcp_made: r(&load.tcp.made),
            tcp_failed: r(&load.tcp.failed),
            udp_sent: r(&load.udp.sent),
            udp_answered: r(&load.udp.answered),
            udp_unanswered: r(&load.udp.unanswered),
            long_exchanges: r(&load.long.exchanges),
            long_failures: r(&load.long.failures),
            connect_us,
            exchange_us,
        }
    }
}

/// One sample.
#[derive(Clone)]
struct Sample {
    /// Seconds since the load started (0: just before).
    t: f64,
    proc: Proc,
    conntrack: Option<u64>,
    /// The daemon's CPU time since the sample before, in % of one core.
    cpu_pct: Option<f64>,
    /// The machine: its 1-minute load average, `/proc/uptime` (seconds since boot, and idle
    /// seconds summed over the CPUs), and its idle share since the sample before (% of all
    /// CPUs): other work on the machine shows here.
    load1: Option<f64>,
    uptime: (f64, f64),
    idle_pct: Option<f64>,
    /// `flowgate stats --json` (Null if it failed: see `errors`).
    stats: Value,
    load: LoadCounts,
    listing: Option<Listing>,
    errors: Vec<String>,
}

/// The totals the curve shows, from `flowgate stats --json`, in table order.
const TOTALS: [&str; 11] = [
    "flows",
    "timers",
    "interfaces",
    "retired",
    "held_packets",
    "pending_enforce",
    "pending_events",
    "events_dropped",
    "provider_faults",
    "untracked",
    "kernel_lost",
];

impl Sample {
    /// `total.KEY` of the stats, if they were read.
    fn total(&self, key: &str) -> Option<u64> {
        self.stats["total"][key].as_u64()
    }

    fn json(&self) -> Value {
        let totals: serde_json::Map<String, Value> =
            TOTALS.iter().map(|k| (k.to_string(), json!(self.total(k)))).collect();
        let c = &self.load;
        json!({
            "t": round(self.t, 1),
            "rss_bytes": self.proc.rss,
            "hwm_bytes": self.proc.hwm,
            "fds": self.proc.fds,
            "threads": self.proc.threads,
            "daemon_cpu_seconds": round(self.proc.cpu, 2),
            "daemon_cpu_percent": self.cpu_pct.map(|c| round(c, 1)),
            "machine_load1": self.load1,
            "machine_idle_percent": self.idle_pct.map(|c| round(c, 1)),
            "conntrack_entries": self.conntrack,
            "totals": totals,
            "stats": {
                "total": self.stats["total"].clone(),
                "conntrack": self.stats["conntrack"].clone(),
                "events": self.stats["events"].clone(),
                "kernel_queues": self.stats["kernel_queues"].clone(),
            },
            "load": {
                "tcp_attempts": c.tcp_attempts,
                "tcp_made": c.tcp_made,
                "tcp_failed": c.tcp_failed,
                "udp_sent": c.udp_sent,
                "udp_answered": c.udp_answered,
                "udp_unanswered": c.udp_unanswered,
                "long_exchanges": c.long_exchanges,
                "long_failures": c.long_failures,
                "connects_since_last": c.connect_us.len(),
                "connect_p50_us": finite(percentile(&c.connect_us, 50.0), 1),
                "connect_p99_us": finite(percentile(&c.connect_us, 99.0), 1),
                "connect_max_us": finite(c.connect_us.last().copied().unwrap_or(f64::NAN), 1),
                "exchange_max_us": finite(c.exchange_us.last().copied().unwrap_or(f64::NAN), 1),
            },
            "listing": self.listing.as_ref().map(Listing::json),
            "errors": self.errors,
        })
    }
}

/// `x` rounded, or null when it is not a number.
fn finite(x: f64, digits: i32) -> Value {
    if x.is_finite() { json!(round(x, digits)) } else { Value::Null }
}

/// What a sample needs to look at.
struct Target<'a> {
    host: &'a Netns,
    flowgate: &'a Path,
    run_dir: &'a Path,
    pid: i32,
}

/// Takes a sample at `t`: `/proc` first (before the CLI's client thread and socket exist in the
/// daemon), then conntrack, then `flowgate stats --json`. An error only when the daemon is gone.
fn sample(target: &Target<'_>, t: f64, load: Option<&Load>) -> Result<Sample> {
    let proc = read_proc(target.pid)?;
    let mut errors = Vec::new();
    let conntrack = conntrack_count(target.host).map_err(|e| errors.push(e)).ok();
    let stats = match stats_cli(target.host, target.flowgate, target.run_dir) {
        Ok(v) => v,
        Err(e) => {
            errors.push(e);
            Value::Null
        }
    };
    let load = load.map(LoadCounts::read).unwrap_or_default();
    let load1 = loadavg().split_whitespace().next().and_then(|l| l.parse().ok());
    Ok(Sample {
        t,
        proc,
        conntrack,
        cpu_pct: None,
        load1,
        uptime: uptime(),
        idle_pct: None,
        stats,
        load,
        listing: None,
        errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------------

/// How a measure's last third is held against its middle third.
#[derive(Clone, Copy)]
enum Rule {
    /// Last third's highest <= middle third's highest + max(5%, 2 MiB).
    Memory,
    /// Last third's highest <= middle third's highest.
    NoMore,
    /// Last third's mean <= middle third's mean * 1.10 + 16.
    Churn,
    /// A counter: it did not rise during the last third.
    Counter,
    /// CPU: last third's mean <= middle third's mean * 1.25 + 1 (% of a core).
    Cpu,
}

impl Rule {
    fn describe(self) -> &'static str {
        match self {
            Rule::Memory => "last max <= mid max + max(5%, 2 MiB)",
            Rule::NoMore => "last max <= mid max",
            Rule::Churn => "last mean <= mid mean x 1.1 + 16",
            Rule::Counter => "no rise in the last third",
            Rule::Cpu => "last mean <= mid mean x 1.25 + 1",
        }
    }
}

/// A measure of the curve.
struct Measure {
    name: &'static str,
    rule: Rule,
    /// Its value in a sample (None when not read).
    get: fn(&Sample) -> Option<f64>,
    /// Shown in MiB.
    bytes: bool,
}

fn measures() -> Vec<Measure> {
    let m = |name, rule, get, bytes| Measure { name, rule, get, bytes };
    vec![
        m("VmRSS", Rule::Memory, |s: &Sample| Some(s.proc.rss as f64), true),
        m("VmHWM", Rule::Memory, |s: &Sample| Some(s.proc.hwm as f64), true),
        m("fds", Rule::NoMore, |s: &Sample| Some(s.proc.fds as f64), false),
        m("threads", Rule::NoMore, |s: &Sample| Some(s.proc.threads as f64), false),
        m("flows", Rule::Churn, |s: &Sample| s.total("flows").map(|v| v as f64), false),
        m("timers", Rule::Churn, |s: &Sample| s.total("timers").map(|v| v as f64), false),
        m("interfaces", Rule::NoMore, |s: &Sample| s.total("interfaces").map(|v| v as f64), false),
        m("retired", Rule::Churn, |s: &Sample| s.total("retired").map(|v| v as f64), false),
        m("held_packets", Rule::Churn, |s: &Sample| s.total("held_packets").map(|v| v as f64), false),
        m("pending_enforce", Rule::Churn, |s: &Sample| s.total("pending_enforce").map(|v| v as f64), false),
        m("pending_events", Rule::Churn, |s: &Sample| s.total("pending_events").map(|v| v as f64), false),
        m("events_dropped", Rule::Counter, |s: &Sample| s.total("events_dropped").map(|v| v as f64), false),
        m("provider_faults", Rule::Counter, |s: &Sample| s.total("provider_faults").map(|v| v as f64), false),
        m("untracked", Rule::Counter, |s: &Sample| s.total("untracked").map(|v| v as f64), false),
        m("kernel_lost", Rule::Counter, |s: &Sample| s.total("kernel_lost").map(|v| v as f64), false),
        m("conntrack entries", Rule::Churn, |s: &Sample| s.conntrack.map(|v| v as f64), false),
        m("daemon CPU %", Rule::Cpu, |s: &Sample| s.cpu_pct, false),
    ]
}

struct Span {
    min: f64,
    max: f64,
    mean: f64,
    first: f64,
    last: f64,
}

fn span(v: &[f64]) -> Option<Span> {
    let (first, last) = (*v.first()?, *v.last()?);
    Some(Span {
        min: v.iter().copied().fold(f64::INFINITY, f64::min),
        max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        first,
        last,
    })
}

/// The verdict of one measure over the samples of a run of `total` seconds: flat or not, and
/// the limit the last third was held to.
struct Verdict {
    start: Option<f64>,
    middle: Option<f64>,
    end: Option<f64>,
    mid: Option<Span>,
    last: Option<Span>,
    /// What the last third's highest value (or mean, by the rule) may reach.
    limit: Option<f64>,
    flat: Option<bool>,
    /// The least-squares slope over the middle and last thirds, per hour, and twice its
    /// standard error (a slope within that of 0 is noise): a trend too slow for the rule shows
    /// here.
    trend: Option<(f64, f64)>,
}

/// The least-squares slope of `v` over `t`, per second, and twice its standard error (None for
/// fewer than 3 points).
fn slope(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let (mt, mv) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let var: f64 = points.iter().map(|p| (p.0 - mt).powi(2)).sum();
    let cov: f64 = points.iter().map(|p| (p.0 - mt) * (p.1 - mv)).sum();
    if var <= 0.0 {
        return None;
    }
    let b = cov / var;
    let residuals: f64 = points.iter().map(|p| (p.1 - mv - b * (p.0 - mt)).powi(2)).sum();
    Some((b, 2.0 * (residuals / (n - 2.0) / var).sqrt()))
}

fn verdict(m: &Measure, samples: &[Sample], total: f64) -> Verdict {
    let value_at =
        |t: f64| samples.iter().min_by(|a, b| (a.t - t).abs().total_cmp(&(b.t - t).abs())).and_then(|s| (m.get)(s));
    let part = |from: f64, to: f64| -> Vec<f64> {
        samples.iter().filter(|s| s.t > from + 1e-6 && s.t <= to + 1e-6).filter_map(|s| (m.get)(s)).collect()
    };
    let (mid, last) = (span(&part(total / 3.0, total * 2.0 / 3.0)), span(&part(total * 2.0 / 3.0, total)));
    let limit = match (&mid, m.rule) {
        (Some(mid), Rule::Memory) => Some(mid.max + (mid.max * 0.05).max(2.0 * MIB)),
        (Some(mid), Rule::NoMore) => Some(mid.max),
        (Some(mid), Rule::Churn) => Some(mid.mean * 1.1 + 16.0),
        (Some(mid), Rule::Counter) => Some(mid.last),
        (Some(mid), Rule::Cpu) => Some(mid.mean * 1.25 + 1.0),
        (None, _) => None,
    };
    let flat = match (&last, limit, m.rule) {
        (Some(l), Some(lim), Rule::Memory | Rule::NoMore) => Some(l.max <= lim),
        (Some(l), Some(lim), Rule::Churn | Rule::Cpu) => Some(l.mean <= lim),
        (Some(l), Some(lim), Rule::Counter) => Some(l.max <= lim),
        _ => None,
    };
    let points: Vec<(f64, f64)> =
        samples.iter().filter(|s| s.t > total / 3.0 + 1e-6).filter_map(|s| Some((s.t, (m.get)(s)?))).collect();
    Verdict {
        start: samples.first().and_then(|s| (m.get)(s)),
        middle: value_at(total / 2.0),
        end: samples.last().and_then(|s| (m.get)(s)),
        mid,
        last,
        limit,
        flat,
        trend: slope(&points).map(|(b, e)| (b * 3600.0, e * 3600.0)),
    }
}

fn word(flat: Option<bool>) -> &'static str {
    match flat {
        Some(true) => "flat",
        Some(false) => "growing",
        None => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// The event log
// ---------------------------------------------------------------------------------------------

/// What the event log holds.
#[derive(Default)]
struct EventCounts {
    by_type: BTreeMap<String, u64>,
    closed_by_reason: BTreeMap<String, u64>,
    /// `flow.new` of the TCP churn (TCP to an accept port), of the long connections (TCP to the
    /// echo port), of the UDP churn (UDP to the echo port), and of anything else.
    new_tcp_churn: u64,
    new_long: u64,
    new_udp_churn: u64,
    new_other: Vec<String>,
    new_other_count: u64,
    bad_lines: u64,
    bytes: u64,
}

impl EventCounts {
    fn json(&self) -> Value {
        json!({
            "by_type": self.by_type,
            "closed_by_reason": self.closed_by_reason,
            "new_tcp_churn": self.new_tcp_churn,
            "new_long": self.new_long,
            "new_udp_churn": self.new_udp_churn,
            "new_other": self.new_other_count,
            "new_other_examples": self.new_other,
            "bad_lines": self.bad_lines,
            "log_bytes": self.bytes,
        })
    }
}

/// Counts the events of the log at `path`, one line at a time.
fn count_events(path: &Path) -> Result<EventCounts> {
    let f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut c = EventCounts::default();
    let mut line = String::new();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let (accept_lo, accept_hi) = (ACCEPT_PORTS[0], ACCEPT_PORTS[ACCEPT_PORTS.len() - 1]);
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        c.bytes += n as u64;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            c.bad_lines += 1;
            continue;
        };
        let kind = v["event"].as_str().unwrap_or("?");
        *c.by_type.entry(kind.to_string()).or_insert(0) += 1;
        if kind == "flow.closed" {
            *c.closed_by_reason.entry(v["reason"].as_str().unwrap_or("?").to_string()).or_insert(0) += 1;
        }
        if kind != "flow.new" {
            continue;
        }
        let f = &v["flow"];
        let remote: Option<SocketAddr> = f["remote"].as_str().and_then(|r| r.parse().ok());
        let to_service = remote.filter(|r| r.ip() == SRV_SERVICE_V4);
        match (f["protocol"].as_str(), to_service.map(|r| r.port())) {
            (Some("tcp"), Some(p)) if (accept_lo..=accept_hi).contains(&p) => c.new_tcp_churn += 1,
            (Some("tcp"), Some(ECHO_PORT)) => c.new_long += 1,
            (Some("udp"), Some(UDP_ECHO_PORT)) => c.new_udp_churn += 1,
            _ => {
                c.new_other_count += 1;
                if c.new_other.len() < 10 {
                    let s = |k: &str| f[k].as_str().unwrap_or("?").to_string();
                    c.new_other.push(format!("{} {} -> {}", s("protocol"), s("local"), s("remote")));
                }
            }
        }
    }
    Ok(c)
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

struct Outcome {
    ready: Duration,
    ready_line: String,
    pid: i32,
    samples: Vec<Sample>,
    /// The run's planned length and how long the load really ran.
    planned: f64,
    loaded: f64,
    /// After the churn stopped: how long until only the long connections were live flows (or
    /// the drain time ran out), and the sample then.
    drain_seconds: f64,
    drained: Option<Sample>,
    tcp: TcpTotals,
    udp: UdpTotals,
    long: LongTotals,
    stats_end: Value,
    /// How long the stop took (None: it failed, see `aborted`).
    stopped: Option<Duration>,
    daemon_messages: Vec<String>,
    events: Option<EventCounts>,
    events_error: Option<String>,
    /// Why the run stopped early, if it did.
    aborted: Option<String>,
    panicked: Vec<&'static str>,
}

struct TcpTotals {
    attempts: u64,
    made: u64,
    rst: u64,
    fin: u64,
    failed: u64,
    accepted: u64,
    connect_us: Vec<f64>,
    errors: Vec<String>,
}

struct UdpTotals {
    sent: u64,
    answered: u64,
    unanswered: u64,
    failed: u64,
    echoed: u64,
    errors: Vec<String>,
}

struct LongTotals {
    connections: usize,
    exchanges: u64,
    failures: u64,
    reconnects: u64,
    per_connection: Vec<u64>,
    exchange_us: Vec<f64>,
    errors: Vec<String>,
}

fn run(opts: &Opts) -> Result<Outcome> {
    // Drop order (reverse of declaration): load, daemon, temp dir, servers, lab.
    let lab = Lab::new("soak");
    let acceptors: Vec<AcceptServer> = ACCEPT_PORTS
        .iter()
        .map(|&p| AcceptServer::start(&lab.srv, SocketAddrV4::new(SRV_SERVICE_V4, p)))
        .collect::<Result<_>>()?;
    let echo = lab::tcp_echo(&lab.srv, lab::sa(SRV_SERVICE_V4, ECHO_PORT));
    let udp_echo = lab::udp_echo(&lab.srv, lab::sa(SRV_SERVICE_V4, UDP_ECHO_PORT));
    let tmp = TempDir::new("soak")?;
    let config = daemon::write_config(&tmp, CONFIG)?;
    let run_dir = tmp.run_dir();
    // The daemon and the CLI run from a copy: a build in the same checkout during the run
    // replaces target/release/flowgate.
    let flowgate = tmp.0.join("flowgate");
    fs::copy(&opts.flowgate, &flowgate)
        .map_err(|e| format!("copy {} to {}: {e}", opts.flowgate.display(), flowgate.display()))?;
    let daemon::Ready { daemon, took: ready, line: ready_line } =
        Daemon::start(&lab.host, &flowgate, &config, &DAEMON)?;
    let pid = daemon.flowgate_pid(&flowgate)?;
    eprintln!("soak: flowgate ready after {:.2} s (pid {pid})", ready.as_secs_f64());
    let target = Target { host: &lab.host, flowgate: &flowgate, run_dir: &run_dir, pid };

    let planned = opts.minutes * 60.0;
    let step = opts.sample_every.as_secs_f64();
    let mut samples = vec![sample(&target, 0.0, None)?];
    let n = opts.long;
    let to = lab::sa(SRV_SERVICE_V4, ECHO_PORT);
    let conns = lab.host.in_ns(move || (0..n).map(|_| open_long(to)).collect::<Result<Vec<_>>>())?;
    let mut load = Load::start(&lab.host, opts, conns);
    eprintln!(
        "soak: load started: {} TCP connections/s, {} UDP flows/s, {} long connections; {} minutes, a sample every {step} s",
        opts.tcp_rate, opts.udp_rate, opts.long, opts.minutes
    );

    let mut aborted = None;
    let mut next_listing = opts.list_every.as_secs_f64();
    let mut i = 1u64;
    loop {
        let t = i as f64 * step;
        if t > planned + 1e-6 {
            break;
        }
        let due = load.t0 + Duration::from_secs_f64(t);
        std::thread::sleep(due.saturating_duration_since(Instant::now())); // the sampling schedule
        // Samples carry the time they were due (taken within milliseconds of it), so that the
        // thirds of the run hold the samples they should.
        let mut s = match sample(&target, t, Some(&load)) {
            Ok(s) => s,
            Err(e) => {
                aborted = Some(format!("at t = {t:.0} s: {e}"));
                break;
            }
        };
        s.cpu_pct = samples.last().map(|b| cpu_percent(&s, b));
        s.idle_pct = samples.last().and_then(|b| idle_percent(&s, b));
        if t + 1e-6 >= next_listing {
            s.listing = Some(listing(&lab.host, &flowgate, &run_dir));
            next_listing += opts.list_every.as_secs_f64();
        }
        progress(&s, samples.last());
        samples.push(s);
        i += 1;
    }
    let loaded = load.t0.elapsed().as_secs_f64();
    load.stop_churn();

    // Drain: until only the long connections (and at most one other flow) are live.
    let mut drain_seconds = 0.0;
    let mut drained = None;
    if aborted.is_none() {
        let d0 = Instant::now();
        loop {
            let flows = stats_cli(&lab.host, &flowgate, &run_dir).map(|s| s["total"]["flows"].as_u64());
            if matches!(flows, Ok(Some(f)) if f <= opts.long as u64 + 1) || d0.elapsed() >= opts.drain {
                break;
            }
            std::thread::sleep(Duration::from_secs(1)); // bounded polling interval
        }
        drain_seconds = d0.elapsed().as_secs_f64();
        match sample(&target, load.t0.elapsed().as_secs_f64(), Some(&load)) {
            Ok(mut s) => {
                s.cpu_pct = samples.last().map(|b| cpu_percent(&s, b));
                s.idle_pct = samples.last().and_then(|b| idle_percent(&s, b));
                s.listing = Some(listing(&lab.host, &flowgate, &run_dir));
                eprintln!(
                    "soak: drained after {drain_seconds:.1} s: {} flows, {} timers, {} conntrack entries, RSS {:.1} MiB, {} fds",
                    opt(s.total("flows")),
                    opt(s.total("timers")),
                    opt(s.conntrack),
                    s.proc.rss as f64 / MIB,
                    s.proc.fds
                );
                drained = Some(s);
            }
            Err(e) => aborted = Some(format!("after the drain: {e}")),
        }
    }
    load.stop_long();
    let stats_end = stats_cli(&lab.host, &flowgate, &run_dir).unwrap_or(Value::Null);

    // A failed stop is reported with the samples taken so far, not instead of them.
    let (stopped, daemon_messages) = match daemon.stop() {
        Ok((took, messages)) => {
            eprintln!("soak: flowgate stopped (exit 0) after {:.2} s", took.as_secs_f64());
            (Some(took), messages)
        }
        Err(e) => {
            eprintln!("soak: {e}");
            aborted = Some(aborted.map_or_else(|| e.clone(), |a| format!("{a}; then {e}")));
            (None, Vec::new())
        }
    };
    if let Err(e) = check_stopped_alone(&lab.host) {
        aborted = Some(aborted.map_or_else(|| e.clone(), |a| format!("{a}; {e}")));
    }
    let (events, events_error) = match count_events(&tmp.log()) {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e)),
    };

    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut connect_us: Vec<f64> = samples.iter().chain(&drained).flat_map(|s| s.load.connect_us.clone()).collect();
    connect_us.extend(take(&load.tcp.times));
    connect_us.sort_by(f64::total_cmp);
    let mut exchange_us: Vec<f64> = samples.iter().chain(&drained).flat_map(|s| s.load.exchange_us.clone()).collect();
    exchange_us.extend(take(&load.long.times));
    exchange_us.sort_by(f64::total_cmp);
    let tcp = TcpTotals {
        attempts: r(&load.tcp.attempts),
        made: r(&load.tcp.made),
        rst: r(&load.tcp.rst),
        fin: r(&load.tcp.fin),
        failed: r(&load.tcp.failed),
        accepted: acceptors.iter().map(AcceptServer::accepted).sum(),
        connect_us,
        errors: load.tcp.errors.list(),
    };
    let udp = UdpTotals {
        sent: r(&load.udp.sent),
        answered: r(&load.udp.answered),
        unanswered: r(&load.udp.unanswered),
        failed: r(&load.udp.failed),
        echoed: udp_echo.packets(),
        errors: load.udp.errors.list(),
    };
    let long = LongTotals {
        connections: opts.long,
        exchanges: r(&load.long.exchanges),
        failures: r(&load.long.failures),
        reconnects: r(&load.long.reconnects),
        per_connection: load.long.per_connection.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        exchange_us,
        errors: load.long.errors.list(),
    };
    let panicked = std::mem::take(&mut load.panicked);
    drop(load);
    drop(echo);
    drop(udp_echo);
    drop(acceptors);
    Ok(Outcome {
        ready,
        ready_line,
        pid,
        samples,
        planned,
        loaded,
        drain_seconds,
        drained,
        tcp,
        udp,
        long,
        stats_end,
        stopped,
        daemon_messages,
        events,
        events_error,
        aborted,
        panicked,
    })
}

/// `/proc/uptime`: seconds since boot, and idle seconds summed over the CPUs. (Not the
/// busy/idle split of `/proc/stat`: on the test VM its busy times, sampled at the tick, missed a
/// third of this load's short bursts, so its idle share read 90% where the processes' own times
/// left 83%.)
fn uptime() -> (f64, f64) {
    let s = fs::read_to_string("/proc/uptime").unwrap_or_default();
    let mut v = s.split_whitespace().filter_map(|x| x.parse::<f64>().ok());
    (v.next().unwrap_or(0.0), v.next().unwrap_or(0.0))
}

/// The machine's idle share from sample `b` to `s`, in % of all its CPUs.
fn idle_percent(s: &Sample, b: &Sample) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as f64;
    let wall = s.uptime.0 - b.uptime.0;
    (wall > 0.0).then(|| ((s.uptime.1 - b.uptime.1) / (wall * cpus) * 100.0).clamp(0.0, 100.0))
}

/// The daemon's CPU time from sample `b` to `s`, in % of one core.
fn cpu_percent(s: &Sample, b: &Sample) -> f64 {
    (s.proc.cpu - b.proc.cpu) / (s.t - b.t).max(1e-9) * 100.0
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// One line on stderr per sample, so a long run can be followed.
fn progress(s: &Sample, before: Option<&Sample>) {
    let dt = before.map_or(s.t, |b| s.t - b.t).max(1e-9);
    let tcp = before.map_or(s.load.tcp_made, |b| s.load.tcp_made - b.load.tcp_made) as f64 / dt;
    eprintln!(
        "soak: t={:>5.0} s  RSS {:.1} MiB  HWM {:.1} MiB  fds {}  threads {}  flows {}  timers {}  conntrack {}  \
         tcp {tcp:.0}/s  long {} ok / {} failed{}{}",
        s.t,
        s.proc.rss as f64 / MIB,
        s.proc.hwm as f64 / MIB,
        s.proc.fds,
        s.proc.threads,
        opt(s.total("flows")),
        opt(s.total("timers")),
        opt(s.conntrack),
        s.load.long_exchanges,
        s.load.long_failures,
        s.listing.as_ref().map_or(String::new(), |l| match &l.error {
            Some(e) => format!("  listing failed: {e}"),
            None => format!("  listed {} ({} long, {} bytes)", l.lines, l.long, l.long_bytes),
        }),
        if s.errors.is_empty() { String::new() } else { format!("  errors: {}", s.errors.join("; ")) }
    );
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A number for the tables: MiB with one decimal for bytes, else a whole number.
fn show(v: Option<f64>, bytes: bool) -> String {
    match v {
        None => "-".into(),
        Some(x) if bytes => format!("{:.1}", x / MIB),
        Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.1}"),
    }
}

fn curve(samples: &[Sample], drained: Option<&Sample>, out: &mut String) {
    let _ = writeln!(
        out,
        "{:>6} {:>7} {:>7} {:>4} {:>3} {:>5} {:>6} {:>6} {:>3} {:>3} {:>4} {:>5} {:>5} {:>5} {:>4} {:>4} {:>5} {:>6} {:>5} {:>7} {:>8} {:>5} {:>10} {:>9} {:>5} {:>5}",
        "t s",
        "RSS",
        "HWM",
        "fds",
        "thr",
        "cpu%",
        "flows",
        "timers",
        "if",
        "ret",
        "held",
        "p.enf",
        "p.ev",
        "ev.dr",
        "flt",
        "untr",
        "klost",
        "ct",
        "tcp/s",
        "p99 µs",
        "max µs",
        "udp/s",
        "long ok/x",
        "list/long",
        "load1",
        "idle%"
    );
    let mut before: Option<&Sample> = None;
    for (s, is_drained) in samples.iter().map(|s| (s, false)).chain(drained.map(|s| (s, true))) {
        let dt = before.map_or(0.0, |b| s.t - b.t);
        let rate = |now: u64, then: Option<u64>| match then {
            Some(t) if dt > 0.0 => format!("{:.0}", (now - t.min(now)) as f64 / dt),
            _ => "-".into(),
        };
        let cpu = s.cpu_pct.map_or("-".into(), |c| format!("{c:.1}"));
        let c = &s.load.connect_us;
        let us = |x: f64| if x.is_finite() { format!("{x:.0}") } else { "-".into() };
        let t = |k: &str| opt(s.total(k));
        let _ = writeln!(
            out,
            "{:>6} {:>7.1} {:>7.1} {:>4} {:>3} {:>5} {:>6} {:>6} {:>3} {:>3} {:>4} {:>5} {:>5} {:>5} {:>4} {:>4} {:>5} {:>6} {:>5} {:>7} {:>8} {:>5} {:>10} {:>9} {:>5} {:>5}",
            if is_drained { format!("d{:.0}", s.t) } else { format!("{:.0}", s.t) },
            s.proc.rss as f64 / MIB,
            s.proc.hwm as f64 / MIB,
            s.proc.fds,
            s.proc.threads,
            cpu,
            t("flows"),
            t("timers"),
            t("interfaces"),
            t("retired"),
            t("held_packets"),
            t("pending_enforce"),
            t("pending_events"),
            t("events_dropped"),
            t("provider_faults"),
            t("untracked"),
            t("kernel_lost"),
            opt(s.conntrack),
            rate(s.load.tcp_made, before.map(|b| b.load.tcp_made)),
            us(percentile(c, 99.0)),
            us(c.last().copied().unwrap_or(f64::NAN)),
            rate(s.load.udp_sent, before.map(|b| b.load.udp_sent)),
            format!("{}/{}", s.load.long_exchanges, s.load.long_failures),
            s.listing.as_ref().map_or("".into(), |l| match &l.error {
                Some(_) => "error".into(),
                None => format!("{}/{}", l.lines, l.long),
            }),
            s.load1.map_or("-".into(), |l| format!("{l:.1}")),
            s.idle_pct.map_or("-".into(), |i| format!("{i:.0}")),
        );
        before = Some(s);
    }
}

fn report(o: &Outcome, opts: &Opts, meta: Value) -> (String, Value) {
    let mut out = String::new();
    let mut problems: Vec<String> = Vec::new();
    if let Some(a) = &o.aborted {
        problems.push(format!("the run stopped early: {a}"));
    }
    let _ = writeln!(
        out,
        "\n== soak: flowgate run in host, {:.0} min, {} TCP connections/s (half RST, half FIN), {} UDP flows/s, {} long connections",
        o.planned / 60.0,
        opts.tcp_rate,
        opts.udp_rate,
        opts.long
    );
    let _ = writeln!(
        out,
        "RSS/HWM in MiB; cpu% of one core since the sample before; totals from `flowgate stats --json`; ct = conntrack \
         entries in host;\ntcp/s, p99/max connect() and udp/s since the sample before; long: exchanges ok/failed so far; \
         list/long: lines of `flowgate flows --json` / long connections listed; load1, idle%: the machine's \
         1-minute load average and idle CPU since the sample before; d = after the drain"
    );
    curve(&o.samples, o.drained.as_ref(), &mut out);

    // Verdicts.
    // The thirds are of the planned run, or of what was sampled when it stopped early.
    let total = if o.aborted.is_some() { o.samples.last().map_or(0.0, |s| s.t) } else { o.planned };
    let _ = writeln!(
        out,
        "\n== verdicts: the last third (t > {:.0} s) against the middle third ({:.0} < t <= {:.0} s); \
         trend/h: least-squares slope over both, per hour, ± twice its standard error",
        total * 2.0 / 3.0,
        total / 3.0,
        total * 2.0 / 3.0
    );
    let _ = writeln!(
        out,
        "{:<18} {:>9} {:>9} {:>9} {:>21} {:>21} {:>10} {:>15}  {:<38} verdict",
        "measure", "start", "middle", "end", "middle min/max/mean", "last min/max/mean", "limit", "trend/h", "rule"
    );
    let mut verdicts = Vec::new();
    for m in measures() {
        let v = verdict(&m, &o.samples, total);
        let trio = |s: &Option<Span>| {
            s.as_ref().map_or("-".into(), |s| {
                format!("{}/{}/{}", show(Some(s.min), m.bytes), show(Some(s.max), m.bytes), show(Some(s.mean), m.bytes))
            })
        };
        let unit = if m.bytes { " MiB" } else { "" };
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>9} {:>9} {:>21} {:>21} {:>10} {:>15}  {:<38} {}",
            format!("{}{unit}", m.name),
            show(v.start, m.bytes),
            show(v.middle, m.bytes),
            show(v.end, m.bytes),
            trio(&v.mid),
            trio(&v.last),
            show(v.limit, m.bytes),
            v.trend.map_or("-".into(), |(x, e)| if m.bytes {
                format!("{:+.2}±{:.2}", x / MIB, e / MIB)
            } else {
                format!("{x:+.1}±{e:.1}")
            }),
            m.rule.describe(),
            word(v.flat)
        );
        // An aborted run's thirds are too short to judge (the verdicts are still printed).
        if v.flat == Some(false) && o.aborted.is_none() {
            problems.push(format!("{} is growing: {}", m.name, trio(&v.last)));
        }
        let sp = |s: &Option<Span>| {
            s.as_ref().map(
                |s| json!({"min": s.min, "max": s.max, "mean": round(s.mean, 1), "first": s.first, "last": s.last}),
            )
        };
        verdicts.push(json!({
            "measure": m.name,
            "unit": if m.bytes { "bytes" } else { "count" },
            "rule": m.rule.describe(),
            "start": v.start,
            "middle": v.middle,
            "end": v.end,
            "middle_third": sp(&v.mid),
            "last_third": sp(&v.last),
            "limit": v.limit.map(|l| round(l, 1)),
            "trend_per_hour": v.trend.map(|(x, _)| round(x, 1)),
            "trend_per_hour_2se": v.trend.map(|(_, e)| round(e, 1)),
            "verdict": word(v.flat),
        }));
    }
    let diffs: Vec<i64> =
        o.samples.iter().filter_map(|s| Some(s.total("timers")? as i64 - s.total("flows")? as i64)).collect();
    let worst = diffs.iter().copied().max_by_key(|d| d.abs()).unwrap_or(0);
    let _ = writeln!(
        out,
        "timers - flows: {} in every sample{}",
        if diffs.iter().all(|&d| d == diffs.first().copied().unwrap_or(0)) {
            format!("{}", diffs.first().copied().unwrap_or(0))
        } else {
            format!("from {} to {}", diffs.iter().min().unwrap_or(&0), diffs.iter().max().unwrap_or(&0))
        },
        if worst == 0 { " (every flow has its one timer)" } else { "" }
    );
    if worst.abs() > 2 {
        problems.push(format!("timers and flows differ by up to {worst}"));
    }

    // The load.
    let t = &o.tcp;
    let loaded = o.loaded.max(1e-9);
    let _ = writeln!(out, "\n== load ({:.0} s)", o.loaded);
    let _ = writeln!(
        out,
        "TCP churn: {} connects ({:.1}/s; asked {}), {} closed with a RST, {} with a FIN, {} failed; the servers accepted {}; \
         connect() p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs, {} over 1 ms, {} over 100 ms",
        t.made,
        t.made as f64 / loaded,
        opts.tcp_rate,
        t.rst,
        t.fin,
        t.failed,
        t.accepted,
        percentile(&t.connect_us, 50.0),
        percentile(&t.connect_us, 99.0),
        percentile(&t.connect_us, 99.9),
        t.connect_us.last().copied().unwrap_or(f64::NAN),
        t.connect_us.len() - t.connect_us.partition_point(|&x| x <= 1000.0),
        t.connect_us.len() - t.connect_us.partition_point(|&x| x <= 100_000.0),
    );
    if t.failed > 0 {
        problems.push(format!("{} TCP churn connections failed", t.failed));
    }
    let u = &o.udp;
    let _ = writeln!(
        out,
        "UDP churn: {} flows ({:.1}/s; asked {}), {} answered within 1 s, {} not, {} failed to send; the echo server got {}",
        u.sent,
        u.sent as f64 / loaded,
        opts.udp_rate,
        u.answered,
        u.unanswered,
        u.failed,
        u.echoed
    );
    if u.unanswered + u.failed > 0 {
        problems.push(format!("UDP churn: {} datagrams unanswered, {} not sent", u.unanswered, u.failed));
    }
    let l = &o.long;
    let _ = writeln!(
        out,
        "long connections: {} connections, {} exchanges ({:?} per connection), {} failures, {} reconnections; \
         exchange p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        l.connections,
        l.exchanges,
        l.per_connection,
        l.failures,
        l.reconnects,
        percentile(&l.exchange_us, 50.0),
        percentile(&l.exchange_us, 99.0),
        l.exchange_us.last().copied().unwrap_or(f64::NAN)
    );
    if l.failures > 0 {
        problems.push(format!("the long connections failed {} times", l.failures));
    }
    for e in t.errors.iter().chain(&u.errors).chain(&l.errors) {
        let _ = writeln!(out, "  error: {e}");
    }
    let listings: Vec<&Listing> = o.samples.iter().filter_map(|s| s.listing.as_ref()).collect();
    let short = listings.iter().filter(|x| x.error.is_some() || x.long != opts.long as u64).count();
    let slowest = listings.iter().map(|x| x.seconds).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "listings: {} (`flowgate flows --json`), {} to {} lines, slowest {:.3} s; {} without all {} long connections or failed",
        listings.len(),
        listings.iter().map(|x| x.lines).min().unwrap_or(0),
        listings.iter().map(|x| x.lines).max().unwrap_or(0),
        slowest,
        short,
        opts.long
    );
    if short > 0 {
        problems.push(format!("{short} listings failed or missed a long connection"));
    }
    let bytes: Vec<u64> = listings.iter().filter(|x| x.error.is_none()).map(|x| x.long_bytes).collect();
    if opts.long > 0 && !bytes.is_empty() {
        let rising = bytes.windows(2).all(|w| w[1] > w[0]);
        let _ = writeln!(
            out,
            "long connections' bytes in the listings: {} at the first, {} at the last{}",
            bytes[0],
            bytes[bytes.len() - 1],
            if rising { ", rising at every listing" } else { "" }
        );
        if !rising {
            problems.push(format!(
                "the long connections' byte counters in the listings did not rise every time: {bytes:?}"
            ));
        }
    }
    for s in o.samples.iter().chain(&o.drained) {
        for e in &s.errors {
            problems.push(format!("sample at t={:.0} s: {e}", s.t));
        }
    }

    // The drain, the stop and the event log.
    let _ = writeln!(out, "\n== after the load");
    if let Some(d) = &o.drained {
        let _ = writeln!(
            out,
            "drain: {:.1} s after the churn stopped: {} flows, {} timers, {} conntrack entries (TIME_WAIT entries live 120 s), \
             RSS {:.1} MiB (start {:.1}), {} fds (start {}), {} threads (start {})",
            o.drain_seconds,
            opt(d.total("flows")),
            opt(d.total("timers")),
            opt(d.conntrack),
            d.proc.rss as f64 / MIB,
            o.samples.first().map_or(0.0, |s| s.proc.rss as f64 / MIB),
            d.proc.fds,
            o.samples.first().map_or(0, |s| s.proc.fds),
            d.proc.threads,
            o.samples.first().map_or(0, |s| s.proc.threads),
        );
        if d.total("flows").is_some_and(|f| f > opts.long as u64 + 1) {
            problems.push(format!("{} flows still live after the drain", opt(d.total("flows"))));
        }
    }
    let _ = writeln!(
        out,
        "flowgate: ready after {:.2} s, {}",
        o.ready.as_secs_f64(),
        match o.stopped {
            Some(d) => format!("stopped (exit 0) after {:.2} s", d.as_secs_f64()),
            None => "did not stop cleanly (see the PROBLEM lines)".to_string(),
        }
    );
    if let Some(e) = &o.events {
        let types: Vec<String> = e.by_type.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let reasons: Vec<String> = e.closed_by_reason.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = writeln!(out, "event log: {} MiB; {}", round(e.bytes as f64 / MIB, 1), types.join(", "));
        let _ = writeln!(out, "flows closed by reason: {}", reasons.join(", "));
        let _ = writeln!(
            out,
            "flow.new: {} TCP churn (connect() calls: {}), {} long (connections: {}), {} UDP churn (sent: {}), {} other",
            e.new_tcp_churn,
            t.attempts,
            e.new_long,
            l.connections as u64 + l.reconnects,
            e.new_udp_churn,
            u.sent,
            e.new_other_count
        );
        for x in &e.new_other {
            let _ = writeln!(out, "  other flow: {x}");
        }
        let (new, closed) =
            (e.by_type.get("flow.new").copied().unwrap_or(0), e.by_type.get("flow.closed").copied().unwrap_or(0));
        if new != closed {
            problems.push(format!("{new} flow.new but {closed} flow.closed in the event log"));
        }
        if e.new_tcp_churn != t.attempts
            || e.new_udp_churn != u.sent
            || e.new_long != l.connections as u64 + l.reconnects
        {
            problems.push("the event log's new flows do not match the connections and datagrams made".into());
        }
        if e.bad_lines > 0 {
            problems.push(format!("{} event lines are no JSON", e.bad_lines));
        }
    }
    if let Some(e) = &o.events_error {
        problems.push(format!("event log: {e}"));
    }
    let _ = writeln!(
        out,
        "flowgate's stderr besides its ready and stop lines: {}",
        if o.daemon_messages.is_empty() { "nothing".to_string() } else { format!("{} lines", o.daemon_messages.len()) }
    );
    for m in &o.daemon_messages {
        let _ = writeln!(out, "  [flowgate] {m}");
        problems.push(format!("flowgate said: {m}"));
    }
    for p in &o.panicked {
        problems.push(format!("the {p} thread panicked"));
    }
    for p in &problems {
        let _ = writeln!(out, "PROBLEM: {p}");
    }
    if problems.is_empty() {
        let _ = writeln!(out, "no problem found");
    }

    let pct = |v: &[f64], q: f64| finite(percentile(v, q), 1);
    let mut json = json!({
        "benchmark": "flowgate-soak",
        "options": {
            "minutes": opts.minutes,
            "tcp_rate": opts.tcp_rate,
            "udp_rate": opts.udp_rate,
            "long": opts.long,
            "sample_seconds": opts.sample_every.as_secs(),
            "list_seconds": opts.list_every.as_secs(),
            "drain_seconds": opts.drain.as_secs(),
        },
        "config": format!("queues = 2\n{CONFIG}"),
        "flowgate_pid": o.pid,
        "ready_seconds": round(o.ready.as_secs_f64(), 3),
        "ready_line": o.ready_line,
        "planned_seconds": o.planned,
        "loaded_seconds": round(o.loaded, 1),
        "samples": o.samples.iter().map(Sample::json).collect::<Vec<_>>(),
        "drain_seconds": round(o.drain_seconds, 1),
        "drained": o.drained.as_ref().map(Sample::json),
        "verdicts": verdicts,
        "timers_minus_flows": {"min": diffs.iter().min(), "max": diffs.iter().max()},
        "tcp_churn": {
            "connects": t.made,
            "per_second": round(t.made as f64 / loaded, 2),
            "rst": t.rst,
            "fin": t.fin,
            "connect_calls": t.attempts,
            "failed": t.failed,
            "server_accepted": t.accepted,
            "connect_p50_us": pct(&t.connect_us, 50.0),
            "connect_p99_us": pct(&t.connect_us, 99.0),
            "connect_p99_9_us": pct(&t.connect_us, 99.9),
            "connect_max_us": finite(t.connect_us.last().copied().unwrap_or(f64::NAN), 1),
            "errors": t.errors,
        },
        "udp_churn": {
            "flows": u.sent,
            "per_second": round(u.sent as f64 / loaded, 2),
            "answered": u.answered,
            "unanswered": u.unanswered,
            "failed": u.failed,
            "echo_server_received": u.echoed,
            "errors": u.errors,
        },
        "long": {
            "connections": l.connections,
            "exchanges": l.exchanges,
            "per_connection": l.per_connection,
            "failures": l.failures,
            "reconnects": l.reconnects,
            "exchange_p50_us": pct(&l.exchange_us, 50.0),
            "exchange_p99_us": pct(&l.exchange_us, 99.0),
            "exchange_max_us": finite(l.exchange_us.last().copied().unwrap_or(f64::NAN), 1),
            "errors": l.errors,
        },
        "stats_end": o.stats_end,
        "stop_seconds": o.stopped.map(|d| round(d.as_secs_f64(), 3)),
        "daemon_messages": o.daemon_messages,
        "events": o.events.as_ref().map(EventCounts::json),
        "aborted": o.aborted,
        "problems": problems,
    });
    if let (Value::Object(j), Value::Object(m)) = (&mut json, meta) {
        j.extend(m);
    }
    (out, json)
}

fn main() {
    let code = real_main();
    std::process::exit(code);
}

fn real_main() -> i32 {
    let opts = begin("soak", "network namespaces, iptables, NFQUEUE", parse_opts);
    let wall = Instant::now();
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let load_start = loadavg();
    let source = flowgate_bench::report::source_state();
    let ct_max_before = read_u64(CT_MAX);
    eprintln!(
        "soak: flowgate binary {}, load average {load_start}, {CT_MAX} = {}",
        opts.flowgate.display(),
        opt(ct_max_before)
    );
    let outcome = run(&opts);
    let ct_max_after = read_u64(CT_MAX);
    if !check_nothing_left() {
        return 1;
    }
    let o = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("soak: {e}");
            return 1;
        }
    };
    let meta = json!({
        "machine": flowgate_bench::report::machine(),
        "source": source,
        "flowgate_binary": opts.flowgate.display().to_string(),
        "client": HOST_SRV_SIDE_V4.to_string(),
        "started_unix": started,
        "wall_seconds": round(wall.elapsed().as_secs_f64(), 1),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "conntrack_max": {"before": ct_max_before, "after": ct_max_after},
    });
    let (text, json) = report(&o, &opts, meta);
    if let Err(e) = print_result(&text, &json, opts.json.as_deref()) {
        eprintln!("soak: {e}");
        return 1;
    }
    if o.aborted.is_some() { 1 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_bench::connect::LAST_CLIENT_PORT;

    fn at(t: f64, rss: u64) -> Sample {
        Sample {
            t,
            proc: Proc { rss, ..Proc::default() },
            conntrack: None,
            cpu_pct: None,
            load1: None,
            uptime: (0.0, 0.0),
            idle_pct: None,
            stats: Value::Null,
            load: LoadCounts::default(),
            listing: None,
            errors: Vec::new(),
        }
    }

    #[test]
    fn memory_verdicts() {
        let rss = &measures()[0];
        let flat: Vec<Sample> = (0..=9).map(|i| at(i as f64 * 10.0, 40 << 20)).collect();
        assert_eq!(verdict(rss, &flat, 90.0).flat, Some(true));
        let growing: Vec<Sample> = (0..=9).map(|i| at(i as f64 * 10.0, (40 << 20) + i * (1 << 20))).collect();
        assert_eq!(verdict(rss, &growing, 90.0).flat, Some(false));
        let v = verdict(rss, &growing, 90.0);
        assert_eq!(v.start, Some(40.0 * MIB));
        assert_eq!(v.end, Some(49.0 * MIB));
    }

    #[test]
    fn trend_is_the_slope_per_hour() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some((2.0, 0.0)));
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0)]), None);
        let rss = &measures()[0];
        let rising: Vec<Sample> = (0..=9).map(|i| at(i as f64 * 60.0, (40 << 20) + i * (1 << 20))).collect();
        let (trend, _) = verdict(rss, &rising, 540.0).trend.unwrap_or_default();
        assert!((trend - 60.0 * MIB).abs() < 1.0, "{trend}");
    }

    #[test]
    fn slots_cycle_through_ports() {
        let ports = client_ports() as u64;
        assert_eq!(slot(0).0, FIRST_CLIENT_PORT);
        assert_eq!(slot(ports - 1).0, LAST_CLIENT_PORT);
        assert_eq!(slot(ports).0, FIRST_CLIENT_PORT);
        assert_eq!(slot(ports * ACCEPT_PORTS.len() as u64).1, slot(0).1);
    }
}
