//! Inspection benchmark (issue 10's evidence): what holding a flow's first bytes until its host
//! is known costs. Run it with `bench/inspect.sh` (root).
//!
//! Four configurations of the lab's `host` namespace (`crates/flowgate/tests/lab/mod.rs`), each
//! in a fresh lab in every round, in an order rotated by one each round:
//!
//! 1. `none`: no filter, no iptables rule.
//! 2. `floor`: the minimal accept-all queue reader, placed as flowgate's user-space path is
//!    (chains of its own jumped to at position 1 of the filter table's `OUTPUT` and `INPUT`:
//!    loopback returns, a verdict's packet mark is saved on the conntrack entry, a flow whose
//!    conntrack mark says "allowed" returns, everything else is queued, fail-open), answering
//!    every packet at once. It sees what the inspect path must see: every packet of a flow until
//!    the first one that carries payload, which it lets pass with flowgate's "allowed" mark
//!    (`NF_REPEAT`, so the rest of the flow stays in the kernel); packets without payload pass
//!    unmarked (`NF_ACCEPT`). It keeps no state and parses nothing but the TCP header's length.
//! 3. `flowgate`: `flowgate run` with default allow and no host rule: flows decided at their
//!    first packet (in the kernel where the rules allow it), no byte held.
//! 4. `flowgate-inspect`: the same plus `[[rule]] host = "blocked.example"`, `action = "drop"`:
//!    every new flow is pending on its host, so its first data packets are held, sniffed (TLS
//!    SNI) and released (allowed.example is not blocked).
//!
//! The workloads, from `host` (198.51.100.1) to a server on 203.0.113.10:443 in `srv`, each
//! connection from a source port of its own and closed with a RST (no TIME_WAIT): the request is
//! a TLS 1.3 ClientHello for allowed.example (about 250 bytes, one segment), the answer 3 bytes.
//!
//! * (a) rate: `--connections` connections by `--clients` client threads at once (connect,
//!   request, answer, RST); packets per second = packets on `host`'s `veth1` (received and sent:
//!   every packet of the workload crosses it) over the loop's time; also connections per second
//!   and the packets that went to user space per connection (NFQUEUE rule counters). Goal:
//!   flowgate-inspect ≥ 0.9× the floor, as a same-round ratio.
//! * (b) latency: `--requests` sequential connections; the time from the client's write of the
//!   request to the server's read of its last byte (both ends in this process, one monotonic
//!   clock). Goal: the added p99 of a held flow's first request (flowgate-inspect − flowgate)
//!   below 5 ms.
//!
//! After each flowgate-inspect run its event log is read: how many of the workload's flows got
//! host allowed.example from `sni` (a run where none did measured no inspection, and says so).
//!
//! Output: `bench/results/inspect.md` and `bench/results/inspect.json` (`--out` elsewhere),
//! written only when every configuration and workload completed; the last line of stdout is the
//! JSON. Cleanup: every guard undoes its part also on an error (servers, the floor and its rules,
//! the daemons, the labs); SIGINT, SIGTERM and SIGHUP are taken by a thread that removes the labs
//! and exits; at the end the run checks that nothing of it is left.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use flowgate_bench::args::{Args, whole_number};
use flowgate_bench::connect::{FIRST_CLIENT_PORT, Latencies, client_ports, close_with_reset, connect_open, listen};
use flowgate_bench::daemon::{self, Daemon, check_nothing_left, check_stopped_alone, read_events};
use flowgate_bench::guard::{TempDir, begin};
use flowgate_bench::lab::{Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::report::{
    Spread, loadavg, machine, paired_ratio, print_result, round, source_state, write_results,
};
use flowgate_bench::threads::{nice, spawn_thread};
use flowgate_linux::marks;
use flowgate_linux::nfqueue::{Mark, Queue, QueueConfig, Verdict};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::SockaddrIn;
use serde_json::json;

type Result<T> = std::result::Result<T, String>;

const PORT: u16 = 443;
const ANSWER: &[u8] = b"ok\n";
const FLOOR_QUEUE: u16 = 0;
const FLOOR_OUT: &str = "INSPFLOOR-OUT";
const FLOOR_IN: &str = "INSPFLOOR-IN";
const GOAL_RATE: f64 = 0.9;
/// Connections before the measured ones (the filter's one-time costs).
const WARMUP: usize = 50;
const GOAL_ADDED_P99_MS: f64 = 5.0;
const HOST_RULE: &str = "[[rule]]\nname = \"no-blocked\"\nhost = \"blocked.example\"\naction = \"drop\"\n";
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(60),
    stop_timeout: Duration::from_secs(30),
    echo_lines: 3,
    echo_more: "(more lines kept, shown on errors)",
};

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    Floor,
    Flowgate,
    Inspect,
}

const KINDS: [Kind; 4] = [Kind::None, Kind::Floor, Kind::Flowgate, Kind::Inspect];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Floor => "floor",
            Kind::Flowgate => "flowgate",
            Kind::Inspect => "flowgate-inspect",
        }
    }

    /// For the lab's namespace names.
    fn tag(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Floor => "floor",
            Kind::Flowgate => "fg",
            Kind::Inspect => "fginsp",
        }
    }
}

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    out: PathBuf,
    rounds: usize,
    connections: usize,
    clients: usize,
    requests: usize,
    kinds: Vec<Kind>,
}

const USAGE: &str = "usage: inspect [--flowgate PATH] [--json FILE] [--out DIR] [--rounds N] [--connections N]
               [--clients N] [--requests N] [--only none,floor,flowgate,flowgate-inspect]

Runs as root. Issue 10's evidence: packets per second of short TLS connections through flowgate
holding and sniffing every flow's first bytes (a host rule) against the minimal accept-all queue
reader that sees the same packets, and the latency a held flow's first request gets, in
interleaved rounds. Writes inspect.md and inspect.json into --out (default
<workspace>/bench/results); the last line of stdout is the JSON.
Defaults: --rounds 5 --connections 3000 --clients 4 --requests 1000.";

fn parse_opts() -> Result<Opts> {
    let mut o = Opts {
        flowgate: PathBuf::new(),
        json: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
        rounds: 5,
        connections: 3000,
        clients: 4,
        requests: 1000,
        kinds: KINDS.to_vec(),
    };
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        match a.as_str() {
            "--out" => o.out = PathBuf::from(args.value("--out")?),
            "--rounds" => o.rounds = whole_number(&args.value("--rounds")?, "--rounds", 1, 50)?,
            "--connections" => {
                o.connections = whole_number(&args.value("--connections")?, "--connections", 100, 20_000)?
            }
            "--clients" => o.clients = whole_number(&args.value("--clients")?, "--clients", 1, 32)?,
            "--requests" => o.requests = whole_number(&args.value("--requests")?, "--requests", 10, 10_000)?,
            "--only" => {
                let v = args.value("--only")?;
                o.kinds = v
                    .split(',')
                    .map(|n| {
                        KINDS.iter().copied().find(|k| k.name() == n).ok_or(format!("--only: no configuration `{n}`"))
                    })
                    .collect::<Result<_>>()?;
            }
            other => return Err(args.unknown(other)),
        }
    }
    if WARMUP + o.connections + o.requests > client_ports() {
        return Err(format!(
            "--connections + --requests must not exceed {} (a source port each)",
            client_ports() - WARMUP
        ));
    }
    (o.flowgate, o.json) = args.finish()?;
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The request
// ---------------------------------------------------------------------------------------------

fn with_len16(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend(with_len16(data));
    v
}

/// A TLS 1.3 ClientHello for `name` in one record (SNI, ALPN h2/http1.1, supported_versions,
/// supported_groups, signature_algorithms, an X25519 key share).
fn client_hello(name: &str) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    body.push(32);
    body.extend((0u8..32).map(|i| i.wrapping_mul(11)));
    body.extend(with_len16(&[0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 0xc0, 0x2b, 0xc0, 0x2f]));
    body.extend([0x01, 0x00]);
    let mut e = Vec::new();
    let mut sni = vec![0x00];
    sni.extend(with_len16(name.as_bytes()));
    e.extend(ext(0, &with_len16(&sni)));
    e.extend(ext(10, &with_len16(&[0x00, 0x1d, 0x00, 0x17])));
    e.extend(ext(16, &with_len16(b"\x02h2\x08http/1.1")));
    e.extend(ext(13, &with_len16(&[0x04, 0x03, 0x08, 0x04, 0x04, 0x01])));
    let mut share = vec![0x00, 0x1d];
    share.extend(with_len16(&[0x42; 32]));
    e.extend(ext(51, &with_len16(&share)));
    e.extend(ext(45, &[0x01, 0x01]));
    e.extend(ext(43, &[0x02, 0x03, 0x04]));
    body.extend(with_len16(&e));
    let mut msg = vec![0x01, 0x00];
    msg.extend((body.len() as u16).to_be_bytes());
    msg.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend(with_len16(&msg));
    rec
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The server in srv: `workers` threads accepting on one listener; each connection's request is
/// read whole (its length is known), the time of that read noted by the client's port, the
/// answer sent, and the connection read until the client's RST.
struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    read_at: Arc<Mutex<HashMap<u16, Instant>>>,
}

impl Server {
    fn start(ns: &Netns, addr: SocketAddrV4, request_len: usize, workers: usize) -> Result<Server> {
        let listener = Arc::new(ns.in_ns(move || listen(addr))?);
        let stop = Arc::new(AtomicBool::new(false));
        let read_at = Arc::new(Mutex::new(HashMap::new()));
        let mut threads = Vec::new();
        for i in 0..workers {
            let (l, s, r) = (listener.clone(), stop.clone(), read_at.clone());
            let t = std::thread::Builder::new()
                .name(format!("inspect-srv-{i}"))
                .spawn(move || serve(&l, &s, &r, request_len))
                .map_err(|e| format!("cannot start a server thread: {e}"))?;
            threads.push(t);
        }
        Ok(Server { listener, stop, threads, read_at })
    }

    fn take_read_times(&self) -> HashMap<u16, Instant> {
        std::mem::take(&mut *self.read_at.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn serve(l: &TcpListener, stop: &AtomicBool, read_at: &Mutex<HashMap<u16, Instant>>, request_len: usize) {
    let mut buf = vec![0u8; request_len];
    loop {
        let (mut c, peer) = match l.accept() {
            Ok(x) => x,
            Err(_) if stop.load(Ordering::Acquire) => return,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::ConnectionAborted) => {
                continue;
            }
            Err(e) => {
                eprintln!("inspect: server accept: {e}");
                return;
            }
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        if c.read_exact(&mut buf).is_err() {
            continue;
        }
        let t = Instant::now();
        read_at.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.port(), t);
        let _ = c.write_all(ANSWER);
        let mut rest = [0u8; 64];
        while matches!(c.read(&mut rest), Ok(n) if n > 0) {}
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // shutdown() on a listening socket wakes every blocked accept() with EINVAL.
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The floor: accept everything, mark a flow allowed at its first payload
// ---------------------------------------------------------------------------------------------

/// TCP payload bytes of an IPv4 packet (0 for anything else or a short packet).
fn tcp_payload_len(p: &[u8]) -> usize {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
        return 0;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let Some(&off) = p.get(ihl + 12) else { return 0 };
    total.saturating_sub(ihl + usize::from(off >> 4) * 4)
}

/// The floor's reader and its iptables rules in `host`; undone on drop.
struct Floor<'a> {
    ns: &'a Netns,
    undo: Vec<Vec<String>>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<()>>>,
}

fn iptables(ns: &Netns, args: &[String]) -> Result<()> {
    let mut all = vec!["iptables", "-w"];
    all.extend(args.iter().map(String::as_str));
    let o = ns.run(&all);
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", all.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

impl<'a> Floor<'a> {
    fn start(ns: &'a Netns, judged: Arc<AtomicU64>) -> Result<Floor<'a>> {
        let cfg = QueueConfig {
            num: FLOOR_QUEUE,
            max_len: flowgate::config::Live::default().queue_max_len,
            fail_open: true,
            copy_range: 0xffff,
        };
        let queue = ns.in_ns(move || Queue::open(&cfg)).map_err(|e| format!("floor reader: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let (st, wk) = (stop.clone(), wake.clone());
        let (thread, _) = spawn_thread("inspect-floor", move || floor_loop(queue, &st, &wk, &judged))?;
        let mut me = Floor { ns, undo: Vec::new(), stop, wake, thread: Some(thread) };
        let allowed = format!("{:#x}/{:#x}", marks::ALLOW, marks::VERDICT);
        let any = format!("0x0/{:#x}", marks::VERDICT);
        let mask = format!("{:#x}", marks::VERDICT);
        let q = FLOOR_QUEUE.to_string();
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<String>>();
        for (chain, builtin, lo) in [(FLOOR_OUT, "OUTPUT", "-o"), (FLOOR_IN, "INPUT", "-i")] {
            let steps: [(Vec<String>, Vec<String>); 6] = [
                (v(&["-N", chain]), v(&["-X", chain])),
                (v(&["-A", chain, lo, "lo", "-j", "RETURN"]), v(&["-D", chain, lo, "lo", "-j", "RETURN"])),
                {
                    let rest = [
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
                    ];
                    (v(&[&["-A", chain][..], &rest].concat()), v(&[&["-D", chain][..], &rest].concat()))
                },
                {
                    let rest = ["-m", "connmark", "--mark", &allowed, "-j", "RETURN"];
                    (v(&[&["-A", chain][..], &rest].concat()), v(&[&["-D", chain][..], &rest].concat()))
                },
                {
                    let rest = ["-j", "NFQUEUE", "--queue-num", &q, "--queue-bypass"];
                    (v(&[&["-A", chain][..], &rest].concat()), v(&[&["-D", chain][..], &rest].concat()))
                },
                (v(&["-I", builtin, "1", "-j", chain]), v(&["-D", builtin, "-j", chain])),
            ];
            for (add, undo) in steps {
                iptables(ns, &add)?; // on error, `me` drops: undoes what is in, stops the reader
                me.undo.push(undo);
            }
        }
        Ok(me)
    }

    fn finish(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        while let Some(u) = self.undo.pop() {
            if let Err(e) = iptables(self.ns, &u) {
                errors.push(e);
            }
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => errors.push(format!("floor reader: {e}")),
            Some(Err(_)) => errors.push("the floor reader panicked".into()),
            _ => {}
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

impl Drop for Floor<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("inspect: {e}");
        }
    }
}

fn floor_loop(mut queue: Queue, stop: &AtomicBool, wake: &EventFd, judged: &AtomicU64) -> Result<()> {
    nice(-10);
    let mut verdicts: Vec<(u32, bool, Option<u32>)> = Vec::with_capacity(256);
    while !stop.load(Ordering::Acquire) {
        {
            let mut fds = [PollFd::new(queue.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
        }
        for _ in 0..64 {
            let n = queue
                .recv(|p| {
                    verdicts.push((p.id, tcp_payload_len(p.payload) > 0, p.mark));
                    judged.fetch_add(1, Ordering::Relaxed);
                })
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
        }
        for (id, data, mark) in verdicts.drain(..) {
            if data {
                let m = Mark::keeping(mark.unwrap_or(0), marks::ALLOW, marks::VERDICT);
                queue.verdict(id, Verdict::Repeat, Some(m));
            } else {
                queue.verdict(id, Verdict::Accept, None);
            }
        }
        queue.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The workloads
// ---------------------------------------------------------------------------------------------

/// One connection from `port`: connect, request, answer, RST. Returns when the answer arrived
/// and the time of the write.
fn exchange(to: &SockaddrIn, port: u16, request: &[u8]) -> Result<Instant> {
    let (fd, _) = connect_open(to, port)?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let t0 = Instant::now();
    s.write_all(request).map_err(|e| format!("request from port {port}: {e}"))?;
    let mut a = [0u8; 3];
    s.read_exact(&mut a).map_err(|e| format!("answer to port {port}: {e}"))?;
    close_with_reset(OwnedFd::from(s))?;
    Ok(t0)
}

/// Packets on `host`'s veth1, received and sent.
fn veth_packets(lab: &Lab) -> u64 {
    lab.host.iface_counter("veth1", "rx_packets") + lab.host.iface_counter("veth1", "tx_packets")
}

/// Packets taken by every NFQUEUE rule in `ns` so far (`iptables-save -c`).
fn queued_packets(ns: &Netns) -> Result<u64> {
    let o = ns.run(&["iptables-save", "-c"]);
    if !o.status.success() {
        return Err(format!("iptables-save -c: {}", String::from_utf8_lossy(&o.stderr).trim()));
    }
    let mut sum = 0;
    for line in String::from_utf8_lossy(&o.stdout).lines().filter(|l| l.contains("-j NFQUEUE")) {
        sum += line
            .strip_prefix('[')
            .and_then(|r| r.split(':').next())
            .and_then(|p| p.parse::<u64>().ok())
            .ok_or_else(|| format!("iptables-save -c: no counters in {line:?}"))?;
    }
    Ok(sum)
}

#[derive(Clone, Debug, Default)]
struct Sample {
    conns_per_s: f64,
    packets_per_s: f64,
    packets_per_conn: f64,
    queued_per_conn: f64,
    latency: Vec<f64>,
    /// flowgate-inspect: workload flows whose host came from SNI, of those logged.
    inspected: Option<(u64, u64)>,
}

fn rate(lab: &Lab, opts: &Opts, request: &Arc<Vec<u8>>, first_port: u16) -> Result<(f64, f64, f64, f64)> {
    let to = SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, PORT));
    let (p0, q0) = (veth_packets(lab), queued_packets(&lab.host)?);
    let t0 = Instant::now();
    let per = opts.connections / opts.clients;
    let mut threads = Vec::new();
    for c in 0..opts.clients {
        let req = request.clone();
        let base = first_port + (c * per) as u16;
        threads.push(lab.host.spawn_in_ns(move || -> Result<()> {
            for i in 0..per {
                exchange(&to, base + i as u16, &req)?;
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join().map_err(|_| "a client thread panicked".to_string())??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = (per * opts.clients) as f64;
    let (p1, q1) = (veth_packets(lab), queued_packets(&lab.host)?);
    let packets = (p1 - p0) as f64;
    Ok((n / secs, packets / secs, packets / n, (q1 - q0) as f64 / n))
}

fn latency(lab: &Lab, server: &Server, opts: &Opts, request: &Arc<Vec<u8>>, first_port: u16) -> Result<Vec<f64>> {
    let to = SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, PORT));
    let (req, n) = (request.clone(), opts.requests);
    let writes = lab.host.in_ns(move || -> Result<Vec<(u16, Instant)>> {
        (0..n).map(|i| Ok((first_port + i as u16, exchange(&to, first_port + i as u16, &req)?))).collect()
    })?;
    let reads = server.take_read_times();
    writes
        .into_iter()
        .map(|(port, w)| {
            let r = reads.get(&port).ok_or(format!("the server has no read time for port {port}"))?;
            Ok(r.saturating_duration_since(w).as_secs_f64() * 1e6)
        })
        .collect()
}

fn run_one(kind: Kind, opts: &Opts, round: usize, request: &Arc<Vec<u8>>) -> Result<Sample> {
    let lab = Lab::new(&format!("insp{round}{}", kind.tag()));
    let server = Server::start(&lab.srv, SocketAddrV4::new(SRV_SERVICE_V4, PORT), request.len(), opts.clients + 1)?;
    let judged = Arc::new(AtomicU64::new(0));
    let mut floor = None;
    let mut daemon = None;
    match kind {
        Kind::None => {}
        Kind::Floor => floor = Some(Floor::start(&lab.host, judged.clone())?),
        Kind::Flowgate | Kind::Inspect => {
            let tmp = TempDir::new(&format!("{}-r{round}", kind.name()))?;
            // Owners are not asked for: their lookups are measured apart (`bench/owners.sh`);
            // this measures the inspect path.
            let extra = format!(
                "default_action = \"allow\"\nattribution = \"off\"\n{}",
                if kind == Kind::Inspect { HOST_RULE } else { "" }
            );
            let config = daemon::write_config(&tmp, &extra)?;
            let ready = Daemon::start(&lab.host, &opts.flowgate, &config, &DAEMON)?;
            daemon = Some((ready.daemon, tmp));
        }
    }
    rate_warmup(&lab, request, WARMUP as u16)?;
    let first = FIRST_CLIENT_PORT + WARMUP as u16;
    let (conns_per_s, packets_per_s, packets_per_conn, queued_per_conn) = rate(&lab, opts, request, first)?;
    let _ = server.take_read_times();
    let lat = latency(&lab, &server, opts, request, first + opts.connections as u16)?;
    let mut sample =
        Sample { conns_per_s, packets_per_s, packets_per_conn, queued_per_conn, latency: lat, inspected: None };
    if let Some(f) = floor.take() {
        let mut f = f;
        f.finish()?;
    }
    if let Some((d, tmp)) = daemon.take() {
        d.stop()?;
        check_stopped_alone(&lab.host)?;
        if kind == Kind::Inspect {
            let ev = read_events(&tmp.log())?;
            let mut flows: HashMap<u64, bool> = HashMap::new();
            for e in &ev {
                let f = &e["flow"];
                if f["remote"] != format!("{SRV_SERVICE_V4}:{PORT}") {
                    continue;
                }
                let Some(id) = f["id"].as_u64() else { continue };
                let host = if f["host"].is_object() { &f["host"] } else { &e["host"] };
                let by_sni = host["name"] == "allowed.example" && host["source"] == "sni";
                *flows.entry(id).or_default() |= by_sni;
            }
            sample.inspected = Some((flows.values().filter(|&&b| b).count() as u64, flows.len() as u64));
        }
    }
    drop(server);
    Ok(sample)
}

fn rate_warmup(lab: &Lab, request: &Arc<Vec<u8>>, n: u16) -> Result<()> {
    let to = SockaddrIn::from(SocketAddrV4::new(SRV_SERVICE_V4, PORT));
    let req = request.clone();
    lab.host.in_ns(move || (0..n).try_for_each(|i| exchange(&to, FIRST_CLIENT_PORT + i, &req).map(drop)))
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn fmt(x: f64, digits: usize) -> String {
    if x.is_finite() { format!("{x:.digits$}") } else { "n/a".into() }
}

fn run(opts: &Opts, command: &str) -> Result<()> {
    let start = Instant::now();
    let load_start = loadavg();
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    for k in [Kind::Flowgate, Kind::Inspect] {
        let text = format!(
            "run_dir = \"/nonexistent\"\nqueues = 2\ndefault_action = \"allow\"\nattribution = \"off\"\n{}",
            if k == Kind::Inspect { HOST_RULE } else { "" }
        );
        flowgate::config::parse(Path::new("inspect.toml"), &text)
            .map_err(|e| format!("[{}] this flowgate does not take the benchmark's config: {e}", k.name()))?;
    }
    let request = Arc::new(client_hello("allowed.example"));
    let mut samples: Vec<(Kind, Vec<Sample>)> = opts.kinds.iter().map(|&k| (k, Vec::new())).collect();
    let n = samples.len();
    for r in 0..opts.rounds {
        for i in 0..n {
            let idx = (r + i) % n;
            let kind = samples[idx].0;
            let t = Instant::now();
            let s =
                run_one(kind, opts, r + 1, &request).map_err(|e| format!("[{}] round {}: {e}", kind.name(), r + 1))?;
            let lat = Latencies::new(s.latency.clone());
            eprintln!(
                "inspect: round {}/{} [{}] {:.1} s: {:.0} conn/s, {:.0} packets/s ({:.1} packets, {:.2} queued per \
                 connection); first request p50 {:.0} µs p99 {:.0} µs{}",
                r + 1,
                opts.rounds,
                kind.name(),
                t.elapsed().as_secs_f64(),
                s.conns_per_s,
                s.packets_per_s,
                s.packets_per_conn,
                s.queued_per_conn,
                lat.p(50.0),
                lat.p(99.0),
                s.inspected.map_or(String::new(), |(a, b)| format!("; {a} of {b} flows named by SNI")),
            );
            samples[idx].1.push(s);
        }
    }
    if !check_nothing_left() {
        return Err("namespaces or flowgate processes were left (removed now)".into());
    }
    let get = |k: Kind| samples.iter().find(|(x, _)| *x == k).map(|(_, s)| s.as_slice()).unwrap_or(&[]);
    let per_round = |k: Kind, f: &dyn Fn(&Sample) -> f64| get(k).iter().map(f).collect::<Vec<f64>>();
    let mut md = String::new();
    let _ = writeln!(md, "# Inspection benchmark (issue 10)\n\n`{command}`, {date}, {} rounds\n", opts.rounds);
    let _ = writeln!(
        md,
        "| configuration | conn/s | packets/s | packets per conn | queued per conn | first request p50 µs | p99 µs | \
         flows named by SNI |\n|---|---|---|---|---|---|---|---|"
    );
    let mut configs = serde_json::Map::new();
    for (k, ss) in &samples {
        let cps = Spread::of(&per_round(*k, &|s| s.conns_per_s));
        let pps = Spread::of(&per_round(*k, &|s| s.packets_per_s));
        let ppc = Spread::of(&per_round(*k, &|s| s.packets_per_conn));
        let qpc = Spread::of(&per_round(*k, &|s| s.queued_per_conn));
        let p50 = Spread::of(&per_round(*k, &|s| Latencies::new(s.latency.clone()).p(50.0)));
        let p99 = Spread::of(&per_round(*k, &|s| Latencies::new(s.latency.clone()).p(99.0)));
        let inspected: Option<(u64, u64)> = ss
            .iter()
            .filter_map(|s| s.inspected)
            .fold(None, |a, (x, y)| Some(a.map_or((x, y), |(p, q)| (p + x, q + y))));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            k.name(),
            cps.show(|x| fmt(x, 0)),
            pps.show(|x| fmt(x, 0)),
            fmt(ppc.median, 1),
            fmt(qpc.median, 2),
            p50.show(|x| fmt(x, 0)),
            p99.show(|x| fmt(x, 0)),
            inspected.map_or("".into(), |(a, b)| format!("{a} of {b}")),
        );
        configs.insert(
            k.name().into(),
            json!({
                "conns_per_s": cps.json(0), "packets_per_s": pps.json(0), "packets_per_conn": round(ppc.median, 2),
                "queued_per_conn": round(qpc.median, 2), "first_request_p50_us": p50.json(1),
                "first_request_p99_us": p99.json(1),
                "inspected_flows": inspected.map(|(a, b)| json!({"named_by_sni": a, "logged": b})),
                "rounds": ss.iter().map(|s| json!({
                    "conns_per_s": round(s.conns_per_s, 0), "packets_per_s": round(s.packets_per_s, 0),
                    "first_request_p50_us": round(Latencies::new(s.latency.clone()).p(50.0), 1),
                    "first_request_p99_us": round(Latencies::new(s.latency.clone()).p(99.0), 1),
                })).collect::<Vec<_>>(),
            }),
        );
    }
    let mut goals = Vec::new();
    if !get(Kind::Inspect).is_empty() && !get(Kind::Floor).is_empty() {
        let (ratio, spread) = paired_ratio(
            &per_round(Kind::Inspect, &|s| s.packets_per_s),
            &per_round(Kind::Floor, &|s| s.packets_per_s),
        );
        goals.push(json!({"goal": "packets/s flowgate-inspect / floor", "target": GOAL_RATE, "ratio": round(ratio, 3),
            "per_round": spread.json(3), "met": ratio >= GOAL_RATE}));
        let _ = writeln!(
            md,
            "\npackets/s, flowgate-inspect / floor: {:.3}x (per round {}), goal ≥ {GOAL_RATE}x: {}",
            ratio,
            spread.show(|x| fmt(x, 3)),
            if ratio >= GOAL_RATE { "met" } else { "MISSED" }
        );
    }
    if !get(Kind::Inspect).is_empty() && !get(Kind::Flowgate).is_empty() {
        let with = per_round(Kind::Inspect, &|s| Latencies::new(s.latency.clone()).p(99.0));
        let without = per_round(Kind::Flowgate, &|s| Latencies::new(s.latency.clone()).p(99.0));
        let added: Vec<f64> = with.iter().zip(&without).map(|(a, b)| (a - b) / 1000.0).collect();
        let added = Spread::of(&added);
        let met = added.median < GOAL_ADDED_P99_MS;
        goals.push(json!({"goal": "added p99 of a held flow's first request, ms (flowgate-inspect - flowgate)",
            "target": GOAL_ADDED_P99_MS, "added_ms": added.json(3), "met": met}));
        let _ = writeln!(
            md,
            "added p99 of a held flow's first request (flowgate-inspect − flowgate, same round): {} ms, goal < \
             {GOAL_ADDED_P99_MS} ms: {}",
            added.show(|x| fmt(x, 3)),
            if met { "met" } else { "MISSED" }
        );
    }
    let _ = writeln!(
        md,
        "\nEach figure: median [min-max] of the rounds. Machine: {}. Load {load_start} at the start, {} at the end; \
         {:.0} s in all.",
        machine(),
        loadavg(),
        start.elapsed().as_secs_f64()
    );
    let json = json!({
        "benchmark": "inspect", "command": command, "date": date, "rounds": opts.rounds,
        "connections": opts.connections, "clients": opts.clients, "requests": opts.requests,
        "request_bytes": request.len(), "configurations": configs, "goals": goals,
        "machine": machine(), "source": source_state(), "load_start": load_start, "load_end": loadavg(),
        "wall_s": round(start.elapsed().as_secs_f64(), 0),
    });
    write_results(&opts.out, "inspect", &md, &json)?;
    print_result(&md, &json, opts.json.as_deref())
}

fn main() {
    let opts = begin("inspect", "network namespaces, iptables, NFQUEUE", parse_opts);
    let command = std::env::var("INSPECT_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        format!("inspect {}", args.join(" ")).trim().to_string()
    });
    if let Err(e) = run(&opts, &command) {
        eprintln!("inspect: FAILED: {e}");
        check_nothing_left();
        std::process::exit(1);
    }
}
