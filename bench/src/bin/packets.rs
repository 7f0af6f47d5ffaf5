//! Packet-stage benchmark: what the packet stage (`[packet_filter]`, commit c052ec2) costs, in the
//! namespace lab, as ratios against baselines measured in the same run. Run it with
//! `bench/packets.sh` (root); see bench/README.md, "Packet stage".
//!
//! Two parts, each in a lab of its own (`crates/flowgate/tests/lab/mod.rs`), each a number of
//! interleaved rounds (every configuration once per round, the order rotated by one each round),
//! reported as the median with the minimum and maximum; ratios are given of the medians and as
//! the spread of the per-round ratios.
//!
//! 1. **Packets per second** through a packet filter. From `host` (198.51.100.1) one thread sends
//!    UDP datagrams (64-byte payload) in a tight loop on one connected socket (a fresh source
//!    port each measurement) to a counting sink on 203.0.113.10 in `srv`, through `veth1`. After
//!    a warm-up, a window counts what the sink received (delivered), what the sender sent, what
//!    the filter saw (judged) and the kernel's queue and socket drops, and reads each thread's
//!    CPU time from `/proc/self/task/TID/schedstat`. Configurations:
//!    * `none`: no rules at all (the limit of one sending thread, which then carries every packet
//!      all the way to the sink's socket itself);
//!    * `accept-all`: `iptables -t mangle -A OUTPUT -o veth1 -p udp --dport 5201 -j NFQUEUE
//!      --queue-num 1` in `host` and a minimal reader in this process, on the same library
//!      (`flowgate_linux::nfqueue::Queue`) with the same batching as the daemon's packet worker:
//!      wait in poll(2), receive up to 64 datagrams, accept each, one flush;
//!    * `accept-all-flow`: the same reader (on queue 100) beside the embedded daemon with its flow
//!      stage only: what the flow stage's chains and conntrack add to the path, without the
//!      packet stage (a diagnostic baseline);
//!    * `flowgate-packet`: the daemon embedded in this process (`Running::start_with`), 1 flow
//!      queue, `[packet_filter] interfaces = ["veth1"]`, `directions = ["outbound"]`, 1 queue, and
//!      a product packet filter that counts and allows;
//!    * `flowgate-packet-rules`: the same with 100 `[[packet_rule]]`s on `veth1` outbound that
//!      drop 198.19.0.x, which the traffic never matches, so every packet scans them all first.
//!
//!    Every queue is fail-closed (the daemon's `fail = "closed"`, the reader's queue without
//!    fail-open, no `--queue-bypass`), so a packet the reader cannot take is dropped and counted,
//!    never passed on unjudged. The daemon's queue workers run at nice -10, and so do the reader,
//!    the sender and the sink. The reader (or the daemon's packet worker) is pinned to the second
//!    CPU, the sender and the sink to the first (`--no-pin`: the scheduler places them). The
//!    sender's socket has a 64 MiB send buffer (forced): a datagram a queue holds stays charged to
//!    it, and with the default buffer the sender would block while about 200 wait, clocked by the
//!    reader (`--sndbuf 0`); so it never waits, and what the reader cannot take fills the queue,
//!    which drops the rest. The sink drains its socket every millisecond instead of waiting on
//!    it: a sink woken for each datagram makes the reader, in whose context an accepted packet
//!    travels on to `srv`, pay a cross-CPU wake-up per packet.
//! 2. **Bulk TCP on an interface the packet stage does not cover**: one TCP flow from `host` to
//!    the lab's `tcp_sink` on 203.0.113.10 through `veth1`, 128 KiB writes for `--seconds`, timed
//!    until the sink confirms every byte, with `none` (no filter), `flowgate` (`flowgate run`, the
//!    flow stage only) and `flowgate-packet-tun` (`flowgate run` with `[packet_filter] interfaces
//!    = ["tun*"]`: the packet stage on, for another interface). Also this process's CPU time per
//!    GB, and the packets that passed the packet stage's mangle chains.
//!
//! The goals the issue sets are reported: `flowgate-packet` / `accept-all` >= 0.9 in delivered
//! packets per second (and in the reader's packets per CPU-second), `flowgate-packet-tun` /
//! `flowgate` >= 0.97 in bulk throughput. The last line of stdout is one JSON object with
//! everything (also written to `--json FILE`).
//!
//! Cleanup: every measurement's guards undo it also when it fails (the sender stops, the
//! accept-all rule is deleted and its reader stopped, the embedded daemon stopped, `flowgate run`
//! SIGTERMed), and the labs' guards delete the namespaces. SIGINT, SIGTERM and SIGHUP are taken
//! by a thread that kills everything in this process's namespaces, deletes them and exits.
//! `bench/packets.sh` builds this binary with unwinding panics, so a failure unwinds through the
//! guards.

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowgate::daemon::{PacketFilterFactory, Providers, Running};
use flowgate::protocol::{Command as ControlCommand, Request};
use flowgate_bench::accept_all::{self, AcceptAll, FeedRule};
use flowgate_bench::args::{Args, number, whole_number};
use flowgate_bench::daemon::{self, Daemon, check_nothing_left};
use flowgate_bench::guard::{TempDir, begin};
use flowgate_bench::lab::{self, HOST_SRV_SIDE_V4, Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::report::{Spread, loadavg, paired_ratio, print_result, round};
use flowgate_bench::threads::{nice, pin, pin_me, spawn_thread};
use flowgate_core::{PacketContext, PacketFilter, PacketHandle, PacketVerdict};
use flowgate_linux::nfqueue::Verdict;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::sockopt;
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// The UDP sink and the TCP sink on 203.0.113.10.
const UDP_PORT: u16 = 5201;
const TCP_PORT: u16 = 5202;
/// The accept-all reader's queue: the number the packet stage's queue gets (first_queue 0, one
/// flow queue), so both are the same queue number.
const ACCEPT_QUEUE: u16 = 1;
/// The reader's queue beside the daemon's flow stage (which binds queue 0, and from 1 on the
/// packet stage's default queues, idle without `[packet_filter]`).
const ACCEPT_FLOW_QUEUE: u16 = 100;
/// Receive buffer of the UDP sink (forced past rmem_max): a stall of the sink costs datagrams only
/// after several milliseconds.
const SINK_RCVBUF: usize = 8 << 20;
/// The sender's socket send buffer (forced past wmem_max). A datagram a queue holds stays
/// charged to the socket that sent it: with the system's default buffer the sender blocks while
/// about 200 wait, and is clocked by the reader; with this one it never waits, the queue stays
/// full and drops what it cannot take, and the reader always has work.
const DEFAULT_SNDBUF: usize = 64 << 20;
/// How often the UDP sink drains its socket (ms); its buffer holds far more than a tick's worth.
const SINK_TICK: u16 = 1;
/// The nice value of the sender and the sink: the daemon's queue workers' (and the accept-all
/// reader's), so the lab's traffic is not starved by other work on the machine more than the
/// filter is.
const LOAD_NICE: libc::c_int = -10;
/// The goals the issue sets.
const PPS_GOAL: f64 = 0.9;
const BULK_GOAL: f64 = 0.97;
/// `flowgate run` may take 30 s to print its ready line and 30 s to exit after SIGTERM.
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(30),
    stop_timeout: Duration::from_secs(30),
    echo_lines: usize::MAX,
    echo_more: "",
};

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    rounds: usize,
    seconds: f64,
    warmup: f64,
    payload: usize,
    rules: usize,
    sndbuf: usize,
    /// The CPUs the measured threads are pinned to, unless `--no-pin`.
    pins: Option<Pins>,
    pps: bool,
    bulk: bool,
}

const USAGE: &str = "usage: packets [--flowgate PATH] [--json FILE] [--rounds N] [--seconds S] [--warmup S]
               [--payload BYTES] [--rules N] [--sndbuf BYTES] [--no-pin] [--parts pps,bulk]

Runs as root. Measures (pps) UDP packets per second from the lab's `host` to `srv` through a
minimal accept-all NFQUEUE reader and through flowgate's packet stage (embedded, with a counting
packet filter; also with N packet rules that never match), and (bulk) TCP throughput through an
interface the packet stage does not cover, with the packet stage on elsewhere and off. Defaults:
--rounds 9 --seconds 2 (each measurement window, and each bulk flow) --warmup 0.5 --payload 64
--rules 100 --parts pps,bulk --sndbuf 67108864: the sender's socket buffer, forced, large enough
for the sender to outrun the queue, which then drops what it cannot take (0: the system's
default, with which the sender is clocked by the queue: a datagram a queue holds stays charged to
its socket); the sender
and the sink (and the bulk client) are pinned to the first CPU this process may use, the reader
(and the bulk sink) to the second, unless --no-pin or there is only one; --flowgate defaults to `flowgate` next to this binary, else <workspace>/target/release/flowgate.";

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        flowgate: PathBuf::new(),
        json: None,
        rounds: 9,
        seconds: 2.0,
        warmup: 0.5,
        payload: 64,
        rules: 100,
        sndbuf: DEFAULT_SNDBUF,
        pins: None,
        pps: true,
        bulk: true,
    };
    let mut pin = true;
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        match a.as_str() {
            "--rounds" => opts.rounds = whole_number(&args.value("--rounds")?, "--rounds", 1, 100)?,
            "--seconds" => opts.seconds = number(&args.value("--seconds")?, "--seconds", 0.2, 60.0)?,
            "--warmup" => opts.warmup = number(&args.value("--warmup")?, "--warmup", 0.0, 10.0)?,
            "--payload" => opts.payload = whole_number(&args.value("--payload")?, "--payload", 1, 1400)?,
            "--no-pin" => pin = false,
            "--sndbuf" => opts.sndbuf = whole_number(&args.value("--sndbuf")?, "--sndbuf", 0, 1 << 30)?,
            "--rules" => opts.rules = whole_number(&args.value("--rules")?, "--rules", 1, 250 * 256)?,
            "--parts" => {
                let list = args.value("--parts")?;
                (opts.pps, opts.bulk) = (false, false);
                for p in list.split(',') {
                    match p {
                        "pps" => opts.pps = true,
                        "bulk" => opts.bulk = true,
                        other => return Err(format!("--parts: unknown part `{other}`\n\n{USAGE}")),
                    }
                }
            }
            other => return Err(args.unknown(other)),
        }
    }
    if pin {
        opts.pins = Pins::choose();
    }
    (opts.flowgate, opts.json) = args.finish()?;
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// Small things
// ---------------------------------------------------------------------------------------------

/// A thread's time on a CPU and its time waiting, runnable, for one (ns), from
/// `/proc/self/task/TID/schedstat`; user and kernel time together, softirq work done in its
/// context included.
#[derive(Clone, Copy, Debug, Default)]
struct Sched {
    run_ns: u64,
    wait_ns: u64,
}

impl Sched {
    fn of(tid: Option<i32>) -> Option<Sched> {
        let text = std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", tid?)).ok()?;
        let mut f = text.split_whitespace().map(|x| x.parse::<u64>().ok());
        Some(Sched { run_ns: f.next()??, wait_ns: f.next()?? })
    }

    fn since(self, before: Sched) -> Sched {
        Sched {
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
        }
    }
}

/// The thread of this process whose name is `comm`.
fn thread_named(comm: &str) -> Option<i32> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|e| {
        let tid = e.file_name().to_str()?.parse().ok()?;
        let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (name.trim() == comm).then_some(tid)
    })
}

/// The thread of this process named `comm`, waiting up to 5 s for it: a thread spawned with a
/// name sets it itself once it runs, so it can be missing for a moment after its spawn returned.
/// Nothing announces it; bounded polling, every millisecond.
fn thread_named_soon(comm: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(t) = thread_named(comm) {
            return Some(t);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The CPUs the measured threads run on: the traffic's (the sender and the sink; the bulk
/// client) and the reader's (the accept-all reader or the daemon's packet worker; the bulk sink).
/// Left to the scheduler, the reader woken by the sender is often placed on the sender's CPU and
/// both run at half speed while the other CPU idles, and rounds differ by 2x.
#[derive(Clone, Copy, Debug)]
struct Pins {
    load: usize,
    reader: usize,
}

impl Pins {
    /// The first two CPUs this process may use; None with fewer.
    fn choose() -> Option<Pins> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
        let mut cpus = (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false));
        Some(Pins { load: cpus.next()?, reader: cpus.next()? })
    }
}

/// Reads a file of `/proc/thread-self/net` as `ns` has it.
fn proc_net(ns: &Netns, file: &'static str) -> Result<String> {
    let path = format!("/proc/thread-self/net/{file}");
    ns.in_ns(move || std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}")))
}

/// The kernel's NFQUEUE counters in `ns`, summed over every bound queue: packets dropped because a
/// queue was full, and because the reader's socket was full. (0, 0) when no queue is bound.
fn queue_drops(ns: &Netns) -> Result<(u64, u64)> {
    // The file exists once nfnetlink_queue is loaded; a queue was bound before this is read.
    let text = proc_net(ns, "netfilter/nfnetlink_queue")?;
    let mut sum = (0, 0);
    for line in text.lines() {
        // queue_number peer_portid queue_total copy_mode copy_range queue_dropped user_dropped
        // id_sequence 1
        let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if let (Some(d), Some(u)) = (f.get(5), f.get(6)) {
            sum.0 += d;
            sum.1 += u;
        }
    }
    Ok(sum)
}

/// `Udp` counter `name` of `/proc/net/snmp` in `ns` (e.g. `RcvbufErrors`).
fn udp_counter(ns: &Netns, name: &str) -> Result<u64> {
    let text = proc_net(ns, "snmp")?;
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    if let (Some(names), Some(values)) = (lines.next(), lines.next())
        && let Some((_, v)) = names.split_whitespace().zip(values.split_whitespace()).find(|(n, _)| *n == name)
    {
        return v.parse().map_err(|e| format!("snmp Udp {name} = {v:?}: {e}"));
    }
    Err(format!("no Udp {name} in /proc/net/snmp of {}", ns.name))
}

// ---------------------------------------------------------------------------------------------
// The UDP blast and its sink
// ---------------------------------------------------------------------------------------------

/// A counting UDP sink in a namespace: one thread (at nice [`LOAD_NICE`]) that drains the socket
/// every [`SINK_TICK`]. It does not wait on the socket: a sink woken for every datagram would make
/// whoever delivers it (the reader, whose verdict carries the packet on to `srv`) pay a wake-up
/// per packet, a cross-CPU interrupt on this VM, and the figures would measure those. Stopped
/// (eventfd) and joined on drop.
struct UdpSink {
    received: Arc<AtomicU64>,
    tid: i32,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    fn start(ns: &Netns, addr: SocketAddr, cpu: Option<usize>) -> Result<UdpSink> {
        let sock = ns.in_ns(move || -> Result<UdpSocket> {
            let s = UdpSocket::bind(addr).map_err(|e| format!("UDP sink: bind {addr}: {e}"))?;
            if nix::sys::socket::setsockopt(&s, sockopt::RcvBufForce, &SINK_RCVBUF).is_err() {
                let _ = nix::sys::socket::setsockopt(&s, sockopt::RcvBuf, &SINK_RCVBUF);
            }
            s.set_nonblocking(true).map_err(|e| format!("UDP sink: {e}"))?;
            Ok(s)
        })?;
        let stop = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let received = Arc::new(AtomicU64::new(0));
        let (n, s) = (received.clone(), stop.clone());
        let (thread, tid) = spawn_thread("udp-sink", move || {
            nice(LOAD_NICE);
            pin_me(cpu);
            let mut buf = vec![0u8; 2048];
            let tick = PollTimeout::from(SINK_TICK);
            loop {
                loop {
                    match sock.recv(&mut buf) {
                        Ok(_) => {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break, // WouldBlock, or an ICMP error reported on the socket
                    }
                }
                // The next drain after a tick (or at once when told to stop).
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, tick) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        eprintln!("packets: UDP sink: poll: {e}");
                        return;
                    }
                }
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return;
                }
            }
        })?;
        Ok(UdpSink { received, tid, stop, thread: Some(thread) })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counts of the blaster.
#[derive(Default)]
struct BlastCounts {
    /// Datagrams the stack took.
    sent: AtomicU64,
    /// Refused with EPERM: a netfilter verdict dropped the datagram on its way out (here: a full
    /// fail-closed queue).
    refused: AtomicU64,
    /// Any other error (ENOBUFS, ...).
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// One thread sending datagrams on a connected UDP socket (bound in `host`, a fresh source port)
/// as fast as it can, until dropped.
struct Blaster {
    stop: Arc<AtomicBool>,
    tid: i32,
    counts: Arc<BlastCounts>,
    thread: Option<JoinHandle<()>>,
}

impl Blaster {
    fn start(ns: &Netns, to: SocketAddr, payload: usize, sndbuf: usize, cpu: Option<usize>) -> Result<Blaster> {
        let sock = ns.in_ns(move || -> Result<UdpSocket> {
            let s = UdpSocket::bind(lab::sa(HOST_SRV_SIDE_V4, 0)).map_err(|e| format!("blaster: bind: {e}"))?;
            if sndbuf > 0 {
                nix::sys::socket::setsockopt(&s, sockopt::SndBufForce, &sndbuf)
                    .map_err(|e| format!("blaster: SO_SNDBUFFORCE {sndbuf}: {e}"))?;
            }
            s.connect(to).map_err(|e| format!("blaster: connect {to}: {e}"))?;
            Ok(s)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(BlastCounts::default());
        let (st, c) = (stop.clone(), counts.clone());
        let (thread, tid) = spawn_thread("udp-blaster", move || {
            nice(LOAD_NICE);
            pin_me(cpu);
            let buf: Vec<u8> = (0..payload).map(|i| i as u8).collect();
            while !st.load(Ordering::Relaxed) {
                match sock.send(&buf) {
                    Ok(_) => {
                        c.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                        c.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        if c.errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            *c.first_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        }
                    }
                }
            }
        })?;
        Ok(Blaster { stop, tid, counts, thread: Some(thread) })
    }

    fn counts(&self) -> (u64, u64, u64) {
        let c = &self.counts;
        (c.sent.load(Ordering::Relaxed), c.refused.load(Ordering::Relaxed), c.errors.load(Ordering::Relaxed))
    }

    fn first_error(&self) -> Option<String> {
        self.counts.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Blaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The minimal accept-all reader
// ---------------------------------------------------------------------------------------------

/// The mangle rule that sends the blast to the reader's queue.
fn accept_feed(queue: u16) -> FeedRule {
    let q = queue.to_string();
    let port = UDP_PORT.to_string();
    FeedRule::rule(
        "mangle",
        "-A",
        "OUTPUT",
        None,
        &["-o", "veth1", "-p", "udp", "--dport", &port, "-j", "NFQUEUE", "--queue-num", &q],
    )
}

/// A minimal accept-all NFQUEUE reader in `host` (`flowgate_bench::accept_all`): queue `num`,
/// fail-closed, the daemon's queue length, verdicts without a mark; fed by [`accept_feed`].
fn accept_all<'a>(
    ns: &'a Netns,
    num: u16,
    max_len: u32,
    judged: Arc<AtomicU64>,
    cpu: Option<usize>,
) -> Result<AcceptAll<'a>> {
    let opts = accept_all::Options { queue: num, max_len, fail_open: false, verdict: Verdict::Accept, mark: None, cpu };
    AcceptAll::start(ns, &opts, judged, &[accept_feed(num)])
}

// ---------------------------------------------------------------------------------------------
// The embedded daemon
// ---------------------------------------------------------------------------------------------

/// The product packet filter of the benchmark: counts every packet and allows it.
struct CountAndAllow {
    seen: Arc<AtomicU64>,
}

impl PacketFilter for CountAndAllow {
    fn packet(&mut self, _ctx: &PacketContext<'_>) -> PacketVerdict {
        self.seen.fetch_add(1, Ordering::Relaxed);
        PacketVerdict::Allow
    }

    fn name(&self) -> &str {
        "count-and-allow"
    }
}

/// The daemon embedded in this process, started in `ns` (its threads live there): 1 flow queue,
/// fail-closed, `extra` appended to the config; with a [`CountAndAllow`] packet filter counting
/// into `seen` if given. Stopped (in `ns`) on drop.
struct Embedded<'a> {
    ns: &'a Netns,
    running: Option<Running>,
    dir: TempDir,
    ready: Duration,
}

impl<'a> Embedded<'a> {
    fn start(ns: &'a Netns, tag: &str, extra: &str, seen: Option<Arc<AtomicU64>>) -> Result<Embedded<'a>> {
        let dir = TempDir::new(tag)?;
        let text = format!(
            "run_dir = \"{}\"\nlog = \"{}\"\nqueues = 1\nfail = \"closed\"\n{extra}",
            dir.run_dir().display(),
            dir.log().display()
        );
        let path = dir.0.join("flowgate.toml");
        std::fs::write(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
        let config = flowgate::config::parse(&path, &text).map_err(|e| format!("the embedded daemon's config: {e}"))?;
        let t0 = Instant::now();
        let running = ns.in_ns(move || {
            let with_filter = seen.is_some();
            let seen = seen.unwrap_or_default();
            let make = move |_: usize, _: PacketHandle| -> Box<dyn PacketFilter> {
                Box::new(CountAndAllow { seen: seen.clone() })
            };
            let packet: Option<&PacketFilterFactory> = if with_filter { Some(&make) } else { None };
            Running::start_with(&config, Providers { flow: None, packet })
        })?;
        Ok(Embedded { ns, running: Some(running), dir, ready: t0.elapsed() })
    }

    /// The packet stage's counters (`flowgate stats`: `packet_stage`).
    fn packet_stats(&self) -> Result<Value> {
        let reply = flowgate::daemon::control::request(&self.dir.run_dir(), &Request::new(ControlCommand::Stats))?;
        reply.stats.map(|s| s["packet_stage"].clone()).ok_or_else(|| "the stats reply holds no counters".into())
    }

    fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        match self.running.take() {
            Some(r) => self.ns.in_ns(move || r.stop()),
            None => Ok(()),
        }
    }
}

impl Drop for Embedded<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("packets: stopping the embedded daemon: {e}");
        }
    }
}

/// `[packet_filter]` on veth1 outbound, 1 queue, and `rules` packet rules that drop remote
/// 198.19.0.0 .. (inside 198.18.0.0/15), which the traffic never matches.
fn packet_config(rules: usize) -> String {
    let mut text = String::from("[packet_filter]\ninterfaces = [\"veth1\"]\ndirections = [\"outbound\"]\nqueues = 1\n");
    for i in 0..rules {
        let _ = write!(
            text,
            "[[packet_rule]]\nname = \"never-{i}\"\ninterface = \"veth1\"\ndirection = \"outbound\"\nremote = \"198.19.{}.{}/32\"\naction = \"drop\"\n",
            i / 250,
            i % 250 + 1
        );
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Part 1: packets per second
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum PpsKind {
    None,
    AcceptAll,
    AcceptAllFlow,
    Packet { rules: bool },
}

struct PpsSpec {
    name: &'static str,
    kind: PpsKind,
}

const PPS_SPECS: [PpsSpec; 5] = [
    PpsSpec { name: "none", kind: PpsKind::None },
    PpsSpec { name: "accept-all", kind: PpsKind::AcceptAll },
    PpsSpec { name: "accept-all-flow", kind: PpsKind::AcceptAllFlow },
    PpsSpec { name: "flowgate-packet", kind: PpsKind::Packet { rules: false } },
    PpsSpec { name: "flowgate-packet-rules", kind: PpsKind::Packet { rules: true } },
];

/// The packet stage's totals after a measurement.
#[derive(Clone, Debug, Default)]
struct StageTotals {
    packets: u64,
    accepted: u64,
    dropped: u64,
    faults: u64,
    unparsable: u64,
    rule_hits: u64,
}

impl StageTotals {
    fn from_json(ps: &Value) -> StageTotals {
        let t = &ps["total"];
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        let rule_hits =
            ps["rules"].as_array().map(|r| r.iter().filter_map(|x| x["packets"].as_u64()).sum()).unwrap_or(0);
        StageTotals {
            packets: n("packets"),
            accepted: n("accepted"),
            dropped: n("dropped"),
            faults: n("provider_faults"),
            unparsable: n("unparsable"),
            rule_hits,
        }
    }
}

/// One measurement window.
#[derive(Clone, Debug, Default)]
struct PpsSample {
    round: usize,
    seconds: f64,
    sent: u64,
    refused: u64,
    errors: u64,
    first_error: Option<String>,
    delivered: u64,
    /// Packets the reader or the product's packet filter saw.
    judged: Option<u64>,
    /// Kernel drops of every bound queue: full queue, full socket.
    queue_dropped: Option<u64>,
    user_dropped: Option<u64>,
    /// Datagrams the sink's socket had no room for.
    sink_drops: u64,
    /// CPU and runnable-wait times in the window: the reader (the accept-all reader, or the
    /// daemon's packet worker), the sender, the sink.
    reader: Option<Sched>,
    sender: Option<Sched>,
    sinker: Option<Sched>,
    /// Packet stage totals for the whole life of the daemon (warm-up included).
    stage: Option<StageTotals>,
    ready_seconds: Option<f64>,
}

impl PpsSample {
    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.seconds
    }

    fn delivered_pps(&self) -> f64 {
        self.per_second(self.delivered)
    }

    /// The reader's CPU time per packet it judged, µs.
    fn reader_us_per_packet(&self) -> Option<f64> {
        let (r, j) = (self.reader?, self.judged?);
        (j > 0).then(|| r.run_ns as f64 / 1e3 / j as f64)
    }

    /// Packets the reader judged per second of its CPU time: what one core could do.
    fn reader_capacity(&self) -> Option<f64> {
        self.reader_us_per_packet().map(|us| 1e6 / us)
    }

    /// Share of the window a thread spent on a CPU, and waiting for one.
    fn shares(&self, t: Option<Sched>) -> Option<(f64, f64)> {
        let w = self.seconds * 1e9;
        t.map(|t| (t.run_ns as f64 / w, t.wait_ns as f64 / w))
    }
}

struct Snapshot {
    at: Instant,
    sent: u64,
    refused: u64,
    errors: u64,
    delivered: u64,
    judged: u64,
    queue: Option<(u64, u64)>,
    sink_drops: u64,
    /// CPU and runnable-wait times of the reader (the accept-all reader or the daemon's packet
    /// worker), the sender and the sink.
    reader: Option<Sched>,
    sender: Option<Sched>,
    sinker: Option<Sched>,
}

struct Threads<'a> {
    sink: &'a UdpSink,
    blaster: &'a Blaster,
    reader: Option<i32>,
}

fn snapshot(lab: &Lab, t: &Threads<'_>, judged: &AtomicU64, queued: bool) -> Result<Snapshot> {
    // The counters of this process first, at one instant; the kernel's right after (the same
    // delay at both ends of the window).
    let at = Instant::now();
    let (sent, refused, errors) = t.blaster.counts();
    let delivered = t.sink.received();
    let judged = judged.load(Ordering::Relaxed);
    let reader = Sched::of(t.reader);
    let sender = Sched::of(Some(t.blaster.tid));
    let sinker = Sched::of(Some(t.sink.tid));
    let queue = if queued { Some(queue_drops(&lab.host)?) } else { None };
    let sink_drops = udp_counter(&lab.srv, "RcvbufErrors")?;
    Ok(Snapshot { at, sent, refused, errors, delivered, judged, queue, sink_drops, reader, sender, sinker })
}

fn measure_pps(
    lab: &Lab,
    sink: &UdpSink,
    spec: &PpsSpec,
    opts: &Opts,
    round: usize,
    max_len: u32,
) -> Result<PpsSample> {
    let judged = Arc::new(AtomicU64::new(0));
    let tag = format!("{}-r{round}", spec.name);
    let reader_cpu = opts.pins.map(|p| p.reader);
    // Declared in this order so that on an early return the blaster stops first, then the
    // reader (rule deleted), then the daemon.
    let mut embedded = None;
    let mut reader = None;
    match spec.kind {
        PpsKind::None => {}
        PpsKind::AcceptAll => {
            reader = Some(accept_all(&lab.host, ACCEPT_QUEUE, max_len, judged.clone(), reader_cpu)?);
        }
        PpsKind::AcceptAllFlow => {
            embedded = Some(Embedded::start(&lab.host, &tag, "", None)?);
            reader = Some(accept_all(&lab.host, ACCEPT_FLOW_QUEUE, max_len, judged.clone(), reader_cpu)?);
        }
        PpsKind::Packet { rules } => {
            let extra = packet_config(if rules { opts.rules } else { 0 });
            embedded = Some(Embedded::start(&lab.host, &tag, &extra, Some(judged.clone()))?);
        }
    }
    let queued = spec.kind != PpsKind::None;
    let reader_tid = match (&reader, spec.kind) {
        (Some(r), _) => Some(r.tid()),
        (None, PpsKind::Packet { .. }) => thread_named_soon(&format!("flowgate-p{ACCEPT_QUEUE}")),
        (None, _) => None,
    };
    if queued && reader_tid.is_none() {
        return Err(format!("[{}]: the reader's thread was not found", spec.name));
    }
    // The daemon's packet worker gets the reader's CPU (the accept-all reader pins itself).
    if let (Some(cpu), PpsKind::Packet { .. }) = (reader_cpu, spec.kind) {
        pin(reader_tid, cpu)?;
    }
    let to = lab::sa(SRV_SERVICE_V4, UDP_PORT);
    let blaster = Blaster::start(&lab.host, to, opts.payload, opts.sndbuf, opts.pins.map(|p| p.load))?;
    // A fixed warm-up of traffic (the first packets of the flow go through the flow stage), then
    // the measurement window.
    std::thread::sleep(Duration::from_secs_f64(opts.warmup));
    let threads = Threads { sink, blaster: &blaster, reader: reader_tid };
    let a = snapshot(lab, &threads, &judged, queued)?;
    std::thread::sleep(Duration::from_secs_f64(opts.seconds));
    let b = snapshot(lab, &threads, &judged, queued)?;
    let first_error = blaster.first_error();
    drop(blaster);
    let stage = match &embedded {
        Some(e) if matches!(spec.kind, PpsKind::Packet { .. }) => Some(StageTotals::from_json(&e.packet_stats()?)),
        _ => None,
    };
    let ready_seconds = embedded.as_ref().map(|e| e.ready.as_secs_f64());
    if let Some(r) = reader.take() {
        r.stop()?;
    }
    if let Some(e) = embedded.take() {
        e.stop()?;
    }
    let s = PpsSample {
        round,
        seconds: b.at.duration_since(a.at).as_secs_f64(),
        sent: b.sent - a.sent,
        refused: b.refused - a.refused,
        errors: b.errors - a.errors,
        first_error,
        delivered: b.delivered - a.delivered,
        judged: queued.then_some(b.judged - a.judged),
        queue_dropped: a.queue.zip(b.queue).map(|(x, y)| y.0.saturating_sub(x.0)),
        user_dropped: a.queue.zip(b.queue).map(|(x, y)| y.1.saturating_sub(x.1)),
        sink_drops: b.sink_drops.saturating_sub(a.sink_drops),
        reader: a.reader.zip(b.reader).map(|(x, y)| y.since(x)),
        sender: a.sender.zip(b.sender).map(|(x, y)| y.since(x)),
        sinker: a.sinker.zip(b.sinker).map(|(x, y)| y.since(x)),
        stage,
        ready_seconds,
    };
    if s.delivered == 0 {
        return Err(format!(
            "[{}] round {round}: the sink received nothing ({} sent, {} refused, {} errors{})",
            spec.name,
            s.sent,
            s.refused,
            s.errors,
            s.first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default()
        ));
    }
    if s.judged == Some(0) {
        return Err(format!("[{}] round {round}: the filter saw no packet", spec.name));
    }
    Ok(s)
}

fn part_pps(opts: &Opts) -> Result<Vec<(&'static PpsSpec, Vec<PpsSample>)>> {
    let lab = Lab::new("pktpps");
    let sink = UdpSink::start(&lab.srv, lab::sa(SRV_SERVICE_V4, UDP_PORT), opts.pins.map(|p| p.load))?;
    // The reader's queue holds as many packets as the daemon's queues do.
    let max_len = flowgate::config::Live::default().queue_max_len;
    let mut results: Vec<(&'static PpsSpec, Vec<PpsSample>)> = PPS_SPECS.iter().map(|s| (s, Vec::new())).collect();
    let n = PPS_SPECS.len();
    for r in 0..opts.rounds {
        for k in 0..n {
            let i = (r + k) % n;
            let spec = &PPS_SPECS[i];
            let s = measure_pps(&lab, &sink, spec, opts, r + 1, max_len)?;
            eprintln!(
                "packets: pps round {}/{} [{}]: delivered {:.0}/s, sent {:.0}/s, refused {:.0}/s{}{}{}",
                r + 1,
                opts.rounds,
                spec.name,
                s.delivered_pps(),
                s.per_second(s.sent),
                s.per_second(s.refused),
                s.judged.map(|j| format!(", judged {:.0}/s", s.per_second(j))).unwrap_or_default(),
                s.queue_dropped.map(|d| format!(", queue drops {:.0}/s", s.per_second(d))).unwrap_or_default(),
                s.reader_us_per_packet()
                    .map(|x| format!(
                        ", reader {x:.2} µs/packet, on a CPU {:.0}%",
                        s.shares(s.reader).map_or(0.0, |v| v.0 * 100.0)
                    ))
                    .unwrap_or_default(),
            );
            results[i].1.push(s);
        }
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// Part 2: bulk TCP beside the packet stage
// ---------------------------------------------------------------------------------------------

struct BulkSpec {
    name: &'static str,
    /// None: no filter; Some(extra config): `flowgate run` with it.
    extra: Option<&'static str>,
}

const BULK_SPECS: [BulkSpec; 3] = [
    BulkSpec { name: "none", extra: None },
    BulkSpec { name: "flowgate", extra: Some("") },
    BulkSpec { name: "flowgate-packet-tun", extra: Some("[packet_filter]\ninterfaces = [\"tun*\"]\n") },
];

#[derive(Clone, Debug)]
struct BulkSample {
    round: usize,
    bytes: u64,
    seconds: f64,
    /// The packet stage's packets during the flow, and the interfaces it saw (flowgate only).
    stage_packets: Option<u64>,
    /// Packets that went through the packet stage's chains in the mangle table during the flow
    /// (`FLOWGATE-PKT-OUT`, `FLOWGATE-PKT-IN`): each is checked against its rules there.
    chain_packets: Option<(u64, u64)>,
    stage_interfaces: Vec<String>,
    ready_seconds: Option<f64>,
    /// CPU time of this whole process (client, sink, and the kernel's work done in their
    /// context) during the flow, s.
    cpu_seconds: f64,
    /// CPU time of the daemon during the flow, s.
    daemon_cpu_seconds: Option<f64>,
}

impl BulkSample {
    fn gbit_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds / 1e9
    }

    /// This process's CPU time per GB carried, ms.
    fn cpu_ms_per_gb(&self) -> f64 {
        self.cpu_seconds * 1e3 / (self.bytes as f64 / 1e9)
    }
}

/// One TCP flow to the sink: 128 KiB writes for `seconds`, then a half-close; the time runs
/// until the sink's reply confirms it received every byte. Run on a thread of its own (it sets
/// that thread's nice value to [`LOAD_NICE`]).
fn bulk(to: SocketAddr, seconds: f64, cpu: Option<usize>) -> Result<(u64, f64)> {
    nice(LOAD_NICE);
    pin_me(cpu);
    flowgate_bench::bulk::to_sink(to, seconds, u64::MAX)
}

/// Packets the jumps into the packet stage's chains (mangle `OUTPUT` to `FLOWGATE-PKT-OUT`,
/// `INPUT` to `FLOWGATE-PKT-IN`) have counted in `ns`, IPv4.
fn packet_chain_jumps(ns: &Netns) -> Result<(u64, u64)> {
    let count = |builtin: &str, chain: &str| -> Result<u64> {
        let o = ns.run(&["iptables", "-w", "-t", "mangle", "-L", builtin, "-v", "-x", "-n"]);
        if !o.status.success() {
            return Err(format!("iptables -t mangle -L {builtin}: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        let text = String::from_utf8_lossy(&o.stdout);
        text.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&chain))
            .and_then(|f| f.first().and_then(|p| p.parse().ok()))
            .ok_or_else(|| format!("no jump to {chain} in mangle {builtin}:\n{text}"))
    };
    Ok((count("OUTPUT", "FLOWGATE-PKT-OUT")?, count("INPUT", "FLOWGATE-PKT-IN")?))
}

/// User and system CPU time of process `pid` (`/proc/PID/stat`, clock ticks of 10 ms), s.
fn pid_cpu_seconds(pid: i32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// User and system CPU time of this process, all its threads (ended ones included), s.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage, which all-zero is a valid value of, and reads nothing.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// `flowgate stats`' packet stage of a `flowgate run` daemon, through its control socket.
fn run_packet_stats(run_dir: &Path) -> Result<Value> {
    let reply = flowgate::daemon::control::request(run_dir, &Request::new(ControlCommand::Stats))?;
    reply.stats.map(|s| s["packet_stage"].clone()).ok_or_else(|| "the stats reply holds no counters".into())
}

fn measure_bulk(lab: &Lab, spec: &BulkSpec, opts: &Opts, round: usize) -> Result<BulkSample> {
    let tmp = TempDir::new(&format!("{}-r{round}", spec.name))?;
    let mut started = None;
    if let Some(extra) = spec.extra {
        let config = daemon::write_config(&tmp, extra)?;
        started = Some(Daemon::start(&lab.host, &opts.flowgate, &config, &DAEMON)?);
    }
    let before = match &started {
        Some(_) => {
            Some((StageTotals::from_json(&run_packet_stats(&tmp.run_dir())?).packets, packet_chain_jumps(&lab.host)?))
        }
        None => None,
    };
    let daemon_pid = match &started {
        Some(r) => Some(r.daemon.flowgate_pid(&opts.flowgate)?),
        None => None,
    };
    let secs = opts.seconds;
    let cpu_before = process_cpu_seconds();
    let daemon_before = daemon_pid.and_then(pid_cpu_seconds);
    let cpu = opts.pins.map(|p| p.load);
    let (bytes, seconds) = lab.host.in_ns(move || bulk(lab::sa(SRV_SERVICE_V4, TCP_PORT), secs, cpu))?;
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    let daemon_cpu_seconds = daemon_pid.and_then(pid_cpu_seconds).zip(daemon_before).map(|(b, a)| b - a);
    let mut sample = BulkSample {
        round,
        bytes,
        seconds,
        stage_packets: None,
        chain_packets: None,
        stage_interfaces: Vec::new(),
        ready_seconds: None,
        cpu_seconds,
        daemon_cpu_seconds,
    };
    if let Some(ready) = started {
        let jumps = packet_chain_jumps(&lab.host)?;
        sample.chain_packets = before.map(|(_, b)| (jumps.0.saturating_sub(b.0), jumps.1.saturating_sub(b.1)));
        let ps = run_packet_stats(&tmp.run_dir())?;
        sample.stage_packets = before.map(|(b, _)| StageTotals::from_json(&ps).packets.saturating_sub(b));
        sample.stage_interfaces = ps["interfaces"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        format!("{} {}", i["name"].as_str().unwrap_or("?"), i["direction"].as_str().unwrap_or("?"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        sample.ready_seconds = Some(ready.took.as_secs_f64());
        let (_, other) = ready.daemon.stop()?;
        for line in other {
            eprintln!("packets: [{}] flowgate said: {line}", spec.name);
        }
    }
    Ok(sample)
}

fn part_bulk(opts: &Opts) -> Result<Vec<(&'static BulkSpec, Vec<BulkSample>)>> {
    let lab = Lab::new("pktbulk");
    // The sink's threads inherit the nice value and the CPU of the thread that starts it:
    // [`LOAD_NICE`], as the client's (see `bulk`), and the reader's CPU.
    let sink = std::thread::scope(|s| {
        s.spawn(|| {
            nice(LOAD_NICE);
            pin_me(opts.pins.map(|p| p.reader));
            lab::tcp_sink(&lab.srv, lab::sa(SRV_SERVICE_V4, TCP_PORT))
        })
        .join()
    })
    .map_err(|_| "starting the TCP sink panicked".to_string())?;
    let mut results: Vec<(&'static BulkSpec, Vec<BulkSample>)> = BULK_SPECS.iter().map(|s| (s, Vec::new())).collect();
    let n = BULK_SPECS.len();
    for r in 0..opts.rounds {
        for k in 0..n {
            let i = (r + k) % n;
            let spec = &BULK_SPECS[i];
            let s = measure_bulk(&lab, spec, opts, r + 1)?;
            eprintln!(
                "packets: bulk round {}/{} [{}]: {:.2} Gbit/s ({} bytes in {:.2} s){}",
                r + 1,
                opts.rounds,
                spec.name,
                s.gbit_s(),
                s.bytes,
                s.seconds,
                s.stage_packets.map(|p| format!(", packet stage saw {p} packets")).unwrap_or_default()
            );
            results[i].1.push(s);
        }
    }
    drop(sink);
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn ratio_json(num: &[f64], den: &[f64], goal: Option<f64>) -> Value {
    let (m, p) = paired_ratio(num, den);
    let mut v = json!({"of_medians": round(m, 3), "per_round": p.json(3)});
    if let Some(g) = goal {
        v["goal"] = json!(g);
        v["met"] = json!(m >= g);
    }
    v
}

fn pps_report(results: &[(&PpsSpec, Vec<PpsSample>)], opts: &Opts, out: &mut String) -> Value {
    let k = |x: f64| format!("{:.1}", x / 1e3);
    let pct = |x: f64| format!("{:.0}", x * 100.0);
    let us = |x: f64| format!("{x:.2}");
    let show =
        |v: &[f64], f: &dyn Fn(f64) -> String| if v.is_empty() { "-".to_string() } else { Spread::of(v).show(f) };
    let rates = |samples: &[PpsSample], f: &dyn Fn(&PpsSample) -> Option<u64>| -> Vec<f64> {
        samples.iter().filter_map(|s| f(s).map(|n| s.per_second(n))).collect()
    };
    let values = |samples: &[PpsSample], f: &dyn Fn(&PpsSample) -> Option<f64>| -> Vec<f64> {
        samples.iter().filter_map(f).collect()
    };
    let _ = writeln!(
        out,
        "\n== packets per second: UDP, {}-byte payload, host 198.51.100.1 -> 203.0.113.10 (srv) through veth1; {} rounds of {:.1} s (after {:.1} s of warm-up); thousands per second, median [min-max]",
        opts.payload, opts.rounds, opts.seconds, opts.warmup
    );
    let _ = writeln!(
        out,
        "{:<22} {:>22} {:>22} {:>22} {:>22} {:>10}",
        "configuration", "delivered", "judged", "sent", "kernel queue drops", "sink drops"
    );
    let mut configs = serde_json::Map::new();
    for (spec, samples) in results {
        let delivered = rates(samples, &|s| Some(s.delivered));
        let judged = rates(samples, &|s| s.judged);
        let sent = rates(samples, &|s| Some(s.sent));
        let qdrops = rates(samples, &|s| s.queue_dropped.zip(s.user_dropped).map(|(a, b)| a + b));
        let sink_drops = rates(samples, &|s| Some(s.sink_drops));
        let _ = writeln!(
            out,
            "{:<22} {:>22} {:>22} {:>22} {:>22} {:>10}",
            spec.name,
            show(&delivered, &k),
            show(&judged, &k),
            show(&sent, &k),
            show(&qdrops, &k),
            k(Spread::of(&sink_drops).median),
        );
        let share = |s: &PpsSample, t: Option<Sched>| {
            s.shares(t).map(|(r, w)| json!({"on_cpu": round(r, 3), "waiting": round(w, 3)}))
        };
        let rounds: Vec<Value> = samples
            .iter()
            .map(|s| {
                json!({
                    "round": s.round,
                    "seconds": round(s.seconds, 4),
                    "delivered": s.delivered,
                    "delivered_pps": round(s.delivered_pps(), 0),
                    "judged": s.judged,
                    "sent": s.sent,
                    "refused_eperm": s.refused,
                    "other_send_errors": s.errors,
                    "first_send_error": s.first_error,
                    "kernel_queue_dropped": s.queue_dropped,
                    "kernel_user_dropped": s.user_dropped,
                    "sink_rcvbuf_errors": s.sink_drops,
                    "reader_us_per_packet": s.reader_us_per_packet().map(|x| round(x, 3)),
                    "reader": share(s, s.reader),
                    "sender": share(s, s.sender),
                    "sink": share(s, s.sinker),
                    "daemon_ready_seconds": s.ready_seconds.map(|r| round(r, 3)),
                    "packet_stage_total": s.stage.as_ref().map(|t| json!({
                        "packets": t.packets, "accepted": t.accepted, "dropped": t.dropped,
                        "provider_faults": t.faults, "unparsable": t.unparsable, "rule_hits": t.rule_hits,
                    })),
                })
            })
            .collect();
        let opt = |v: &[f64], digits: i32| if v.is_empty() { Value::Null } else { Spread::of(v).json(digits) };
        configs.insert(
            spec.name.to_string(),
            json!({
                "delivered_pps": Spread::of(&delivered).json(0),
                "judged_pps": opt(&judged, 0),
                "sent_pps": Spread::of(&sent).json(0),
                "kernel_queue_drops_per_s": opt(&qdrops, 0),
                "sink_drops_per_s": Spread::of(&sink_drops).json(0),
                "reader_us_per_packet": opt(&values(samples, &|s| s.reader_us_per_packet()), 3),
                "reader_capacity_pps": opt(&values(samples, &|s| s.reader_capacity()), 0),
                "rounds": rounds,
            }),
        );
    }
    let _ = writeln!(
        out,
        "\n== CPU: the reader (accept-all reader or the daemon's packet worker: its CPU time per packet judged, and the packets one CPU-second of it judges), share of the window each thread was on a CPU / runnable but waiting, %; median [min-max]"
    );
    let _ = writeln!(
        out,
        "{:<22} {:>20} {:>22} {:>14} {:>14} {:>14} {:>14} {:>12}",
        "configuration",
        "reader µs/packet",
        "reader kpps/CPU-s",
        "reader on",
        "reader wait",
        "sender on",
        "sender wait",
        "sink on"
    );
    for (spec, samples) in results {
        let on = |f: &dyn Fn(&PpsSample) -> Option<Sched>, wait: bool| -> Vec<f64> {
            values(samples, &|s| s.shares(f(s)).map(|(r, w)| if wait { w } else { r }))
        };
        let _ = writeln!(
            out,
            "{:<22} {:>20} {:>22} {:>14} {:>14} {:>14} {:>14} {:>12}",
            spec.name,
            show(&values(samples, &|s| s.reader_us_per_packet()), &us),
            show(&values(samples, &|s| s.reader_capacity()), &k),
            show(&on(&|s| s.reader, false), &pct),
            show(&on(&|s| s.reader, true), &pct),
            show(&on(&|s| s.sender, false), &pct),
            show(&on(&|s| s.sender, true), &pct),
            show(&on(&|s| s.sinker, false), &pct),
        );
    }
    // Every stage total must show no drop, no fault and no rule hit.
    let mut sanity = Vec::new();
    for (spec, samples) in results {
        for s in samples {
            if let Some(t) = &s.stage
                && (t.dropped > 0 || t.faults > 0 || t.rule_hits > 0 || t.packets < s.judged.unwrap_or(0))
            {
                sanity.push(format!("{} round {}: packet stage totals {t:?}", spec.name, s.round));
            }
            if s.errors > 0 || s.refused > 0 {
                sanity.push(format!(
                    "{} round {}: {} sends refused (EPERM), {} other send errors (first: {})",
                    spec.name,
                    s.round,
                    s.refused,
                    s.errors,
                    s.first_error.as_deref().unwrap_or("-")
                ));
            }
        }
    }
    let get = |name: &str, f: &dyn Fn(&PpsSample) -> Option<f64>| -> Vec<f64> {
        results.iter().find(|(s, _)| s.name == name).map(|(_, v)| values(v, f)).unwrap_or_default()
    };
    let delivered = |name: &str| get(name, &|s| Some(s.delivered_pps()));
    let capacity = |name: &str| get(name, &|s| s.reader_capacity());
    let pairs: [(&str, &str, Option<f64>); 5] = [
        ("flowgate-packet", "accept-all", Some(PPS_GOAL)),
        ("flowgate-packet-rules", "accept-all", None),
        ("flowgate-packet", "accept-all-flow", None),
        ("accept-all-flow", "accept-all", None),
        ("accept-all", "none", None),
    ];
    let mut ratios = serde_json::Map::new();
    let _ = writeln!(
        out,
        "\n== pps ratios: delivered packets per second, and reader capacity (packets per CPU-second of the reader); of the medians; per round median [min-max]"
    );
    for (a, b, goal) in pairs {
        let (da, db) = (delivered(a), delivered(b));
        if da.is_empty() || db.is_empty() {
            continue;
        }
        let (m, p) = paired_ratio(&da, &db);
        let goal_part =
            goal.map(|g| format!("; goal >= {g}: {}", if m >= g { "met" } else { "NOT met" })).unwrap_or_default();
        let _ = writeln!(out, "{a} / {b}: delivered {m:.3}, per round {}{goal_part}", p.show(|x| format!("{x:.3}")));
        let mut v = json!({"delivered": ratio_json(&da, &db, goal)});
        let (ca, cb) = (capacity(a), capacity(b));
        if !ca.is_empty() && !cb.is_empty() {
            let (m, p) = paired_ratio(&ca, &cb);
            let goal_part =
                goal.map(|g| format!("; goal >= {g}: {}", if m >= g { "met" } else { "NOT met" })).unwrap_or_default();
            let _ = writeln!(
                out,
                "{a} / {b}: reader capacity {m:.3}, per round {}{goal_part}",
                p.show(|x| format!("{x:.3}"))
            );
            v["reader_capacity"] = ratio_json(&ca, &cb, goal);
        }
        ratios.insert(format!("{a}/{b}"), v);
    }
    if !sanity.is_empty() {
        let _ = writeln!(out, "\n== pps sanity: NOT clean");
        for s in &sanity {
            let _ = writeln!(out, "{s}");
        }
    }
    json!({"configs": configs, "ratios": ratios, "sanity_problems": sanity})
}

fn bulk_report(results: &[(&BulkSpec, Vec<BulkSample>)], opts: &Opts, out: &mut String) -> Value {
    let _ = writeln!(
        out,
        "\n== bulk TCP host -> 203.0.113.10 (srv) through veth1 (never covered by the packet stage); {} rounds of {:.1} s flows; median [min-max]",
        opts.rounds, opts.seconds
    );
    let _ = writeln!(
        out,
        "{:<22} {:>24} {:>24} {:>16}   packet stage",
        "configuration", "Gbit/s", "CPU ms per GB", "daemon CPU %"
    );
    let mut configs = serde_json::Map::new();
    for (spec, samples) in results {
        let g: Vec<f64> = samples.iter().map(BulkSample::gbit_s).collect();
        let cpu: Vec<f64> = samples.iter().map(BulkSample::cpu_ms_per_gb).collect();
        let daemon_cpu: Vec<f64> =
            samples.iter().filter_map(|s| s.daemon_cpu_seconds.map(|c| c * 100.0 / s.seconds)).collect();
        let stage: Vec<u64> = samples.iter().filter_map(|s| s.stage_packets).collect();
        let chains: Vec<(u64, u64)> = samples.iter().filter_map(|s| s.chain_packets).collect();
        let ifaces: Vec<String> = {
            let mut v: Vec<String> = samples.iter().flat_map(|s| s.stage_interfaces.iter().cloned()).collect();
            v.sort();
            v.dedup();
            v
        };
        let _ = writeln!(
            out,
            "{:<22} {:>24} {:>24} {:>16}   {}",
            spec.name,
            Spread::of(&g).show(|x| format!("{x:.2}")),
            Spread::of(&cpu).show(|x| format!("{x:.0}")),
            if daemon_cpu.is_empty() { "-".to_string() } else { Spread::of(&daemon_cpu).show(|x| format!("{x:.0}")) },
            if stage.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "saw {} packets during the flows (interfaces: {}); its mangle chains were passed by {} packets out, {} in",
                    stage.iter().sum::<u64>(),
                    if ifaces.is_empty() { "none".to_string() } else { ifaces.join(", ") },
                    chains.iter().map(|c| c.0).sum::<u64>(),
                    chains.iter().map(|c| c.1).sum::<u64>(),
                )
            }
        );
        let rounds: Vec<Value> = samples
            .iter()
            .map(|s| {
                json!({
                    "round": s.round,
                    "gbit_s": round(s.gbit_s(), 3),
                    "bytes": s.bytes,
                    "seconds": round(s.seconds, 4),
                    "cpu_seconds": round(s.cpu_seconds, 4),
                    "daemon_cpu_seconds": s.daemon_cpu_seconds.map(|c| round(c, 3)),
                    "packet_stage_packets": s.stage_packets,
                    "packet_chain_packets": s.chain_packets.map(|(o, i)| json!({"out": o, "in": i})),
                    "packet_stage_interfaces": s.stage_interfaces,
                    "daemon_ready_seconds": s.ready_seconds.map(|r| round(r, 3)),
                })
            })
            .collect();
        configs.insert(
            spec.name.to_string(),
            json!({"gbit_s": Spread::of(&g).json(3), "cpu_ms_per_gb": Spread::of(&cpu).json(1), "rounds": rounds}),
        );
    }
    let get = |name: &str, f: fn(&BulkSample) -> f64| -> Vec<f64> {
        results.iter().find(|(s, _)| s.name == name).map(|(_, v)| v.iter().map(f).collect()).unwrap_or_default()
    };
    let pairs: [(&str, &str, Option<f64>); 3] = [
        ("flowgate-packet-tun", "flowgate", Some(BULK_GOAL)),
        ("flowgate", "none", None),
        ("flowgate-packet-tun", "none", None),
    ];
    let mut ratios = serde_json::Map::new();
    let _ = writeln!(
        out,
        "\n== bulk ratios: throughput, and CPU per GB (b / a: above 1, a spends less); of the medians; per round median [min-max]"
    );
    for (a, b, goal) in pairs {
        let (va, vb) = (get(a, BulkSample::gbit_s), get(b, BulkSample::gbit_s));
        if va.is_empty() || vb.is_empty() {
            continue;
        }
        let (m, p) = paired_ratio(&va, &vb);
        let goal_part =
            goal.map(|g| format!("; goal >= {g}: {}", if m >= g { "met" } else { "NOT met" })).unwrap_or_default();
        let _ = writeln!(out, "{a} / {b}: throughput {m:.3}, per round {}{goal_part}", p.show(|x| format!("{x:.3}")));
        let (ca, cb) = (get(a, BulkSample::cpu_ms_per_gb), get(b, BulkSample::cpu_ms_per_gb));
        let (cm, cp) = paired_ratio(&cb, &ca);
        let _ = writeln!(out, "{a} / {b}: CPU per GB (inverse) {cm:.3}, per round {}", cp.show(|x| format!("{x:.3}")));
        ratios.insert(
            format!("{a}/{b}"),
            json!({"throughput": ratio_json(&va, &vb, goal), "cpu_per_gb_inverse": ratio_json(&cb, &ca, None)}),
        );
    }
    json!({"configs": configs, "ratios": ratios})
}

fn main() {
    let opts = begin("packets", "network namespaces, iptables, NFQUEUE", parse_opts);
    // As `flowgate run` does: no transparent huge pages (the embedded daemon lives here).
    // SAFETY: this prctl only sets a flag of this process; it takes no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    let start = Instant::now();
    let load_start = loadavg();
    eprintln!("packets: flowgate binary {}, load average {load_start}", opts.flowgate.display());
    let mut out = String::new();
    let mut result = json!({
        "benchmark": "flowgate-packets",
        "source": flowgate_bench::report::source_state(),
        "machine": flowgate_bench::report::machine(),
        "options": {
            "rounds": opts.rounds,
            "seconds": opts.seconds,
            "warmup_seconds": opts.warmup,
            "payload_bytes": opts.payload,
            "packet_rules": opts.rules,
            "sender_sndbuf": if opts.sndbuf == 0 { json!("system default") } else { json!(opts.sndbuf) },
            "pinned": opts.pins.map(|p| json!({"sender_and_sink_cpu": p.load, "reader_cpu": p.reader})),
        },
        "loadavg_start": load_start,
    });
    let mut failed = None;
    if opts.pps {
        match part_pps(&opts) {
            Ok(r) => result["pps"] = pps_report(&r, &opts, &mut out),
            Err(e) => failed = Some(format!("pps: {e}")),
        }
        result["loadavg_after_pps"] = json!(loadavg());
    }
    if opts.bulk && failed.is_none() {
        match part_bulk(&opts) {
            Ok(r) => result["bulk"] = bulk_report(&r, &opts, &mut out),
            Err(e) => failed = Some(format!("bulk: {e}")),
        }
    }
    let clean = check_nothing_left();
    if let Some(e) = failed {
        eprintln!("packets: failed: {e}");
        std::process::exit(1);
    }
    if !clean {
        std::process::exit(1);
    }
    result["loadavg_end"] = json!(loadavg());
    result["wall_seconds"] = json!(round(start.elapsed().as_secs_f64(), 1));
    if let Err(e) = print_result(&out, &result, opts.json.as_deref()) {
        eprintln!("packets: {e}");
        std::process::exit(1);
    }
}
