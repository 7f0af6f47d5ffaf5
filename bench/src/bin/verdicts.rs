//! Live benchmark of verdicts that change on live connections, and of the adoption of connections
//! that were open before the daemon started. Run it with `bench/verdicts.sh` (root); see
//! bench/README.md, "Verdict changes and adoption".
//!
//! Both parts run the real `flowgate run` daemon (2 queues, no rules: allow everything) in the
//! `host` namespace of the integration tests' lab (`crates/flowgate/tests/lab/mod.rs`), with TCP
//! connections from `host` (198.51.100.1) to servers on 203.0.113.10 in `srv`. This process holds
//! the client ends, and the server ends of the block part's connections.
//!
//! 1. **block**: K long-lived connections (one exchange each, then idle, so the kernel handles
//!    them by their conntrack mark). For each one in turn, a thread in `host` is blocked in
//!    `read()` on the client socket and a thread in `srv` in `read()` on the server socket; the
//!    benchmark sends `{"cmd":"block","ids":[id]}` over the control socket and measures, from just
//!    before the request, when the client's read fails and when the server's read fails with
//!    ECONNRESET. The same with the CLI, `flowgate block ID --run-dir DIR`, run directly and run
//!    through `ip netns exec` (as the live tests do), for a few connections each.
//! 2. **adoption**: N connections opened before the daemon starts, tracked by conntrack (a
//!    conntrack rule in `host`, as any stateful host firewall has). The time from spawning the
//!    daemon to its `flowgate: ready: ... N existing connections adopted` line, against the same
//!    start with no connections just before. Then one more start: a restart, which finds the
//!    verdicts the first one left in the conntrack marks. After each start one byte goes each way
//!    on every connection. S rounds, each in a fresh lab, so every adoption is a first one. The
//!    server ends of these connections are held by a child process, this binary run with
//!    `--echo-server`: a process may not be allowed enough descriptors for both ends.
//!
//! The results are printed as a table, and the last line of stdout is one JSON object with
//! everything (also written to `--json FILE`).
//!
//! Cleanup: the lab's guards delete every namespace (killing what is inside) and stop the daemon
//! (SIGTERM, then SIGKILL), also when a part fails. SIGINT, SIGTERM and SIGHUP are taken by a
//! thread that kills everything in this process's namespaces, deletes them and exits; in a build
//! with `panic = "abort"` (the workspace's release profile), where no guard runs on a panic, a
//! panic hook does the same. `bench/verdicts.sh` builds this binary with unwinding panics, so a
//! failure unwinds through the guards.

use flowgate::protocol::{Command as Ask, Request, Select};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowgate_bench::args::{Args, whole_number};
use flowgate_bench::connect::listen;
use flowgate_bench::counters::tcp;
use flowgate_bench::daemon::{
    self, Daemon, check_nothing_left, check_stopped_alone, child_setup, is_tcp_to, read_events,
};
use flowgate_bench::guard::{TempDir, begin};
use flowgate_bench::lab::{self, Lab, Netns, SRV_SERVICE_V4};
use flowgate_bench::process::raise_nofile;
use flowgate_bench::report::{loadavg, percentile, print_result, round};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde_json::{Value, json};

type Result<T> = std::result::Result<T, String>;

/// Server port of the block part.
const BLOCK_PORT: u16 = 7100;
/// First server port of the adoption part; connection `i` goes to port `ADOPT_FIRST_PORT + i % P`.
const ADOPT_FIRST_PORT: u16 = 7200;
/// At most this many adopted connections per server port (each needs a source port of its own).
const CONNS_PER_PORT: usize = 2500;
/// The source-port range of `host` in the adoption part (the default has 28,232 ports).
const HOST_PORT_RANGE: &str = "15000 64999";
/// File-descriptor limit this process asks for (both ends of the block part's connections, the
/// client ends of the adoption part's), and the descriptors it needs besides the connections.
const NOFILE: u64 = 65536;
const FD_SLACK: usize = 512;
/// The daemon may take 60 s to print its ready line and 60 s to exit after SIGTERM; its first 20
/// stderr lines are echoed to this process's stderr, the rest counted.
const DAEMON: daemon::Options = daemon::Options {
    ready_timeout: Duration::from_secs(60),
    stop_timeout: Duration::from_secs(60),
    echo_lines: 20,
    echo_more: "... (further lines are counted, not shown)",
};
/// Read timeout of the block part's waiting readers: a connection the block missed shows up as
/// an EAGAIN after this long, not as a hang.
const BLOCK_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one pass of the adoption part's echo check may take in all.
const ECHO_TIMEOUT: Duration = Duration::from_secs(20);

struct Opts {
    flowgate: PathBuf,
    json: Option<PathBuf>,
    /// Connections blocked over the control socket.
    block: usize,
    /// Connections blocked with the CLI, for each of the two ways of running it.
    cli: usize,
    /// Connections open before the daemon starts.
    connections: usize,
    /// Starts with and without connections.
    starts: usize,
    parts: Vec<String>,
}

const PARTS: [&str; 2] = ["block", "adoption"];

const USAGE: &str = "usage: verdicts [--flowgate PATH] [--json FILE] [--block K] [--cli C] [--connections N]
                [--starts S] [--parts block,adoption]

Runs as root. block: K idle TCP connections from the lab's `host` to `srv`, each blocked in turn
over flowgate's control socket (then C more with `flowgate block`, and C more with
`ip netns exec ... flowgate block`); the time until the client's and the server's pending read()
fail. adoption: N TCP connections open before `flowgate run` starts; the time from its spawn to
its ready line, against a start with no connections just before, then a restart; S rounds, each
in a fresh lab; each start is followed by one byte each way on every connection. (`--echo-server
PORT,...` is the adoption part's server process, started by the benchmark itself.)
Defaults: --block 200 --cli 20
--connections 10000 --starts 5, both parts; --flowgate defaults to `flowgate` next to this
binary, else <workspace>/target/release/flowgate.";

fn parse_opts() -> Result<Opts> {
    let mut opts = Opts {
        flowgate: PathBuf::new(),
        json: None,
        block: 200,
        cli: 20,
        connections: 10_000,
        starts: 5,
        parts: PARTS.iter().map(|s| s.to_string()).collect(),
    };
    let mut args = Args::new(USAGE);
    while let Some(a) = args.next_option()? {
        match a.as_str() {
            "--block" => opts.block = whole_number(&args.value("--block")?, "--block", 1, 5000)?,
            "--cli" => opts.cli = whole_number(&args.value("--cli")?, "--cli", 0, 1000)?,
            "--connections" => {
                opts.connections = whole_number(&args.value("--connections")?, "--connections", 1, 30_000)?;
            }
            "--starts" => opts.starts = whole_number(&args.value("--starts")?, "--starts", 1, 50)?,
            "--parts" => {
                let list = args.value("--parts")?;
                opts.parts = list.split(',').map(str::to_string).collect();
                if let Some(bad) = opts.parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
                    return Err(format!("--parts: unknown part `{bad}`\n\n{USAGE}"));
                }
            }
            other => return Err(args.unknown(other)),
        }
    }
    (opts.flowgate, opts.json) = args.finish()?;
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// A started daemon: how long it took to print its ready line, the line, and the number of
/// existing connections the line says were adopted.
struct Ready {
    daemon: Daemon,
    took: Duration,
    line: String,
    adopted: u64,
}

/// Starts the daemon (2 queues, no rules: allow everything) in `ns` with its config in `dir`, and
/// reads the adoption count off its ready line.
fn start_daemon(ns: &Netns, flowgate: &Path, dir: &TempDir) -> Result<Ready> {
    let config = daemon::write_config(dir, "")?;
    let daemon::Ready { daemon, took, line } = Daemon::start(ns, flowgate, &config, &DAEMON)?;
    let adopted = adopted_in(&line).ok_or_else(|| format!("no adoption count in `{line}`"))?;
    Ok(Ready { daemon, took, line, adopted })
}

/// The count in `..., 10000 existing connections adopted, ...`.
fn adopted_in(line: &str) -> Option<u64> {
    let before = &line[..line.find(" existing connection")?];
    before.rsplit(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Whether an event is about a TCP flow to the service address (203.0.113.10).
fn to_service(e: &Value) -> bool {
    is_tcp_to(&e["flow"], SRV_SERVICE_V4)
}

// ---------------------------------------------------------------------------------------------
// Counters of the host namespace
// ---------------------------------------------------------------------------------------------

/// Packets of the NFQUEUE rules of flowgate's `FLOWGATE-OUT` and `FLOWGATE-IN` chains (packets
/// sent to user space: the owner rules and the balancing rule, added up), read with
/// `iptables -L CHAIN -v -x -n` in `ns`.
fn nfqueue_packets(ns: &Netns) -> Result<u64> {
    let mut total = 0;
    for chain in ["FLOWGATE-OUT", "FLOWGATE-IN"] {
        let o = ns.run(&["iptables", "-L", chain, "-v", "-x", "-n"]);
        if !o.status.success() {
            return Err(format!("iptables -L {chain}: {}", String::from_utf8_lossy(&o.stderr).trim()));
        }
        let text = String::from_utf8_lossy(&o.stdout);
        let rules: Vec<&str> =
            text.lines().skip(2).filter(|l| l.split_whitespace().nth(2) == Some("NFQUEUE")).collect();
        if rules.is_empty() {
            return Err(format!("iptables -L {chain}: no NFQUEUE rule:\n{text}"));
        }
        for l in rules {
            let pkts = l.split_whitespace().next().and_then(|p| p.parse::<u64>().ok());
            total += pkts.ok_or_else(|| format!("iptables -L {chain}: bad NFQUEUE line: {l}"))?;
        }
    }
    Ok(total)
}

/// `Tcp: RetransSegs` of `/proc/net/snmp` in `ns`: TCP segments retransmitted.
fn retrans_segs(ns: &Netns) -> Result<u64> {
    tcp(ns, "RetransSegs")
}

/// Conntrack entries of TCP connections to 203.0.113.10 in `ns`, and how many of them carry one
/// of flowgate's mark bits (0x30000).
fn conntrack_entries(ns: &Netns) -> Result<(u64, u64)> {
    let o = ns.run(&["conntrack", "-L", "-p", "tcp", "-d", "203.0.113.10"]);
    if !o.status.success() {
        return Err(format!("conntrack -L: {}", String::from_utf8_lossy(&o.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let mut n = 0;
    let mut marked = 0;
    for line in text.lines().filter(|l| l.starts_with("tcp")) {
        n += 1;
        let mark = line.split_whitespace().find_map(|w| w.strip_prefix("mark=")).and_then(|m| m.parse::<u32>().ok());
        if mark.is_some_and(|m| m & 0x30000 != 0) {
            marked += 1;
        }
    }
    Ok((n, marked))
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// Both ends of one connection from `host` to `srv` (the block part).
struct Conn {
    client: TcpStream,
    server: TcpStream,
    /// The client's address (198.51.100.1:port) and the server's (203.0.113.10:port).
    local: SocketAddr,
    remote: SocketAddr,
}

/// Opens `n` connections from `host` to 203.0.113.10, connection `i` to `targets[i % len]`, one
/// after another (a blocking connect each, bounded to 5 s). Returns them in order, with the time
/// the loop took.
fn connect_all(ns: &Netns, n: usize, targets: Vec<SocketAddr>) -> Result<(Vec<TcpStream>, Duration)> {
    let t0 = Instant::now();
    let clients = ns.in_ns(move || -> Result<Vec<TcpStream>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let to = targets[i % targets.len()];
            let c = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connection {} of {n}: connect {to}: {e}", i + 1))?;
            out.push(c);
        }
        Ok(out)
    })?;
    Ok((clients, t0.elapsed()))
}

/// The block part's connections: `n` to 203.0.113.10:`port`, accepted in `srv` by a thread of
/// this process, both ends kept here, in order.
fn open_pairs(lab: &Lab, n: usize, port: u16) -> Result<(Vec<Conn>, Duration)> {
    let addr = SocketAddrV4::new(SRV_SERVICE_V4, port);
    let listener = Arc::new(lab.srv.in_ns(move || listen(addr))?);
    let l2 = listener.clone();
    let acceptor = std::thread::Builder::new()
        .name(format!("accept-{port}"))
        .spawn(move || {
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                match l2.accept() {
                    Ok(c) => got.push(c),
                    Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                    // shutdown() of the listener (a failed connect) ends the wait with EINVAL.
                    Err(_) => break,
                }
            }
            got
        })
        .map_err(|e| format!("cannot start the accept thread: {e}"))?;
    let clients = connect_all(&lab.host, n, vec![SocketAddr::V4(addr)]);
    if clients.is_err() {
        let _ = nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
    let accepted = acceptor.join().map_err(|_| "the accept thread panicked")?;
    drop(listener);
    let (clients, took) = clients?;
    let mut servers: HashMap<SocketAddr, TcpStream> = accepted.into_iter().map(|(s, peer)| (peer, s)).collect();
    let mut conns = Vec::with_capacity(n);
    for client in clients {
        let local = client.local_addr().map_err(|e| format!("local_addr: {e}"))?;
        let remote = client.peer_addr().map_err(|e| format!("peer_addr: {e}"))?;
        let server = servers.remove(&local).ok_or_else(|| format!("srv never accepted the connection from {local}"))?;
        conns.push(Conn { client, server, local, remote });
    }
    Ok((conns, took))
}

/// The adoption part's server ends live in a process of their own: this binary with
/// `--echo-server PORT,...`, started in `srv`. The system's hard RLIMIT_NOFILE may be too low for
/// both ends of N connections in one process, and raising it needs CAP_SYS_RESOURCE. The lab's
/// [`lab::Child`] guard stops it; it also gets SIGKILL if the thread that spawned it dies.
fn start_echo_process(ns: &Netns, ports: &[u16]) -> Result<lab::Child> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let exe = exe.to_string_lossy();
    let list = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let mut child = ns.spawn_with(&[&exe, ECHO_SERVER_FLAG, &list], |cmd| {
        cmd.stdout(Stdio::piped());
        child_setup(cmd, libc::SIGKILL);
    });
    let out = child.child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("echo-ready".into())
        .spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(line) if line.trim() == "ready" => Ok(child),
        Ok(line) => Err(format!("echo server said {:?} instead of ready; its log:\n{}", line.trim(), child.log())),
        Err(_) => Err(format!("echo server not ready within 10 s; its log:\n{}", child.log())),
    }
}

/// The flag that runs this binary as the adoption part's echo server.
const ECHO_SERVER_FLAG: &str = "--echo-server";

/// `--echo-server PORT,...`: listens on 203.0.113.10 on each port (in the namespace it was
/// started in), prints `ready`, then accepts every connection and echoes whatever arrives, on one
/// thread with epoll, until it is killed.
fn echo_server_main(list: &str) -> ! {
    let run = || -> Result<()> {
        const LISTENER: u64 = 1 << 63;
        let ports: Vec<u16> =
            list.split(',').map(|p| p.parse().map_err(|_| format!("bad port `{p}`"))).collect::<Result<_>>()?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| format!("epoll: {e}"))?;
        let mut listeners = Vec::new();
        for (k, &p) in ports.iter().enumerate() {
            let l = listen(SocketAddrV4::new(SRV_SERVICE_V4, p))?;
            l.set_nonblocking(true).map_err(|e| format!("nonblocking: {e}"))?;
            epoll.add(&l, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER | k as u64)).map_err(|e| format!("{e}"))?;
            listeners.push(l);
        }
        let mut stdout = std::io::stdout();
        writeln!(stdout, "ready").and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))?;
        let mut conns: HashMap<u64, TcpStream> = HashMap::new();
        let mut next_id = 0u64;
        let mut events = vec![EpollEvent::empty(); 1024];
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(format!("epoll_wait: {e}")),
            };
            for ev in &events[..n] {
                let d = ev.data();
                if d & LISTENER != 0 {
                    let l = &listeners[(d & !LISTENER) as usize];
                    loop {
                        match l.accept() {
                            Ok((s, _)) => {
                                s.set_nonblocking(true).map_err(|e| format!("nonblocking: {e}"))?;
                                epoll
                                    .add(&s, EpollEvent::new(EpollFlags::EPOLLIN, next_id))
                                    .map_err(|e| format!("epoll add: {e}"))?;
                                conns.insert(next_id, s);
                                next_id += 1;
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                            Err(e) => return Err(format!("accept after {} connections: {e}", conns.len())),
                        }
                    }
                } else if let Some(s) = conns.get_mut(&d) {
                    let keep = match s.read(&mut buf) {
                        // One byte at a time arrives here; a short write would lose data, so it
                        // ends the connection (the client then sees that).
                        Ok(n) if n > 0 => matches!(s.write(&buf[..n]), Ok(w) if w == n),
                        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => true,
                        _ => false,
                    };
                    if !keep {
                        // Closing the socket also removes it from the epoll set.
                        conns.remove(&d);
                    }
                }
            }
        }
    };
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("verdicts {ECHO_SERVER_FLAG}: {e}");
            std::process::exit(1);
        }
    }
}

/// What one pass of [`echo_check`] found.
#[derive(Default)]
struct Echo {
    ok: usize,
    /// Connection index and what went wrong, at most 10 kept.
    failures: Vec<(usize, String)>,
    failed: usize,
    seconds: f64,
}

impl Echo {
    fn fail(&mut self, i: usize, what: String) {
        self.failed += 1;
        if self.failures.len() < 10 {
            self.failures.push((i, what));
        }
    }

    fn json(&self) -> Value {
        json!({
            "ok": self.ok,
            "failed": self.failed,
            "failures": self.failures.iter().map(|(i, w)| format!("#{i}: {w}")).collect::<Vec<_>>(),
            "seconds": round(self.seconds, 3),
        })
    }
}

/// One byte (`byte`) from every client to the echo server, which sends it back: all writes
/// first, then the echoes, waiting with epoll, [`ECHO_TIMEOUT`] in all. A connection counts as
/// working when exactly its byte came back.
fn echo_check(clients: &[TcpStream], byte: u8) -> Echo {
    let t0 = Instant::now();
    let deadline = t0 + ECHO_TIMEOUT;
    let mut r = Echo::default();
    let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
        Ok(e) => e,
        Err(e) => {
            (0..clients.len()).for_each(|i| r.fail(i, format!("epoll: {e}")));
            return r;
        }
    };
    let mut pending = 0;
    let mut waiting = vec![false; clients.len()];
    for (i, c) in clients.iter().enumerate() {
        let step = c
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))
            .and_then(|()| match (&*c).write(&[byte]) {
                Ok(1) => Ok(()),
                Ok(n) => Err(format!("write wrote {n} bytes")),
                Err(e) => Err(format!("write: {}", errno_name(&e))),
            })
            .and_then(|()| {
                epoll.add(c, EpollEvent::new(EpollFlags::EPOLLIN, i as u64)).map_err(|e| format!("epoll add: {e}"))
            });
        match step {
            Ok(()) => {
                waiting[i] = true;
                pending += 1;
            }
            Err(e) => r.fail(i, e),
        }
    }
    let mut events = vec![EpollEvent::empty(); 1024];
    while pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for i in (0..clients.len()).filter(|&i| waiting[i]) {
                r.fail(i, format!("no echo within {ECHO_TIMEOUT:?}"));
            }
            break;
        }
        let ms = left.as_millis().clamp(1, 1000) as u16;
        let n = match epoll.wait(&mut events, EpollTimeout::from(ms)) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                for i in (0..clients.len()).filter(|&i| waiting[i]) {
                    r.fail(i, format!("epoll_wait: {e}"));
                }
                break;
            }
        };
        for ev in &events[..n] {
            let i = ev.data() as usize;
            if !waiting[i] {
                continue;
            }
            let mut b = [0u8; 2];
            let got = (&clients[i]).read(&mut b);
            if matches!(&got, Err(e) if e.kind() == ErrorKind::WouldBlock) {
                continue;
            }
            waiting[i] = false;
            pending -= 1;
            let _ = epoll.delete(&clients[i]);
            match got {
                Ok(1) if b[0] == byte => r.ok += 1,
                Ok(0) => r.fail(i, "end of stream".into()),
                Ok(n) => r.fail(i, format!("read {n} bytes, first {:#04x}, wanted one {byte:#04x}", b[0])),
                Err(e) => r.fail(i, format!("read: {}", errno_name(&e))),
            }
        }
    }
    for c in clients {
        let _ = c.set_nonblocking(false);
    }
    r.seconds = t0.elapsed().as_secs_f64();
    r
}

/// An I/O error as its errno name (`ECONNRESET`), or its kind when it has no errno.
fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{:?}", Errno::from_raw(n)),
        None => format!("{:?}", e.kind()),
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// p50, p90, p99, min, max and mean of sorted values, rounded to `digits`.
fn dist_json(sorted: &[f64], digits: i32) -> Value {
    let mean = sorted.iter().sum::<f64>() / sorted.len().max(1) as f64;
    json!({
        "p50": round(percentile(sorted, 50.0), digits),
        "p90": round(percentile(sorted, 90.0), digits),
        "p99": round(percentile(sorted, 99.0), digits),
        "min": round(percentile(sorted, 0.0), digits),
        "max": round(percentile(sorted, 100.0), digits),
        "mean": round(mean, digits),
    })
}

// ---------------------------------------------------------------------------------------------
// Part 1: block latency
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Method {
    /// `control::request` from this process.
    Socket,
    /// `flowgate block ID --run-dir DIR`, run directly.
    Cli,
    /// `ip netns exec HOST flowgate block ID --run-dir DIR`, as the live tests run it.
    CliNetns,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Socket => "control socket",
            Method::Cli => "flowgate block",
            Method::CliNetns => "ip netns exec + flowgate block",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Method::Socket => "control_socket",
            Method::Cli => "cli",
            Method::CliNetns => "cli_netns_exec",
        }
    }
}

/// One blocked connection: times from just before the request, in µs, and how each end's read
/// ended.
struct Sample {
    client_us: f64,
    server_us: f64,
    /// Until the request returned (control socket: the reply; CLI: the process's exit).
    request_us: f64,
    client: String,
    server: String,
}

impl Sample {
    fn ok(&self) -> bool {
        self.client != "EAGAIN" && self.client.starts_with('E') && self.server == "ECONNRESET"
    }
}

/// How a read ended: an errno name, `EOF`, or `data`.
fn outcome(r: &std::io::Result<usize>) -> String {
    match r {
        Ok(0) => "EOF".into(),
        Ok(_) => "data".into(),
        Err(e) => errno_name(e),
    }
}

/// The thread's scheduler state (`S` = sleeping) from `/proc/self/task/TID/stat`.
fn thread_state(tid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Waits (bounded, 2 s) until thread `tid` sleeps, i.e. is blocked in its read().
fn wait_blocked(tid: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut spins = 0u32;
    loop {
        if thread_state(tid) == Some('S') {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("reader thread {tid} not blocked in read() after 2 s (state {:?})", thread_state(tid)));
        }
        spins += 1;
        if spins < 100 {
            std::thread::yield_now();
        } else {
            // Bounded polling interval, not a synchronisation sleep.
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// A thread in `ns` that reports its tid, then blocks in read() on `s`; it returns how the
/// read ended and when.
fn blocked_reader(
    ns: &Netns,
    mut s: TcpStream,
    tids: mpsc::Sender<i32>,
) -> Result<JoinHandle<(std::io::Result<usize>, Instant)>> {
    s.set_read_timeout(Some(BLOCK_READ_TIMEOUT)).map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    Ok(ns.spawn_in_ns(move || {
        // SAFETY: gettid has no preconditions.
        let _ = tids.send(unsafe { libc::gettid() });
        let mut b = [0u8; 16];
        let r = s.read(&mut b);
        (r, Instant::now())
    }))
}

fn block_one(lab: &Lab, conn: Conn, id: u64, how: Method, run_dir: &Path, flowgate: &Path) -> Result<Sample> {
    let (tx, rx) = mpsc::channel();
    let client = blocked_reader(&lab.host, conn.client, tx.clone())?;
    let server = blocked_reader(&lab.srv, conn.server, tx)?;
    for _ in 0..2 {
        let tid = rx.recv_timeout(Duration::from_secs(5)).map_err(|e| format!("reader thread: {e}"))?;
        wait_blocked(tid)?;
    }
    let id_s = id.to_string();
    let run_dir_s = run_dir.to_string_lossy();
    let t0 = Instant::now();
    let request = match how {
        Method::Socket => flowgate::daemon::control::request(
            run_dir,
            &Request::new(Ask::Block(Select { ids: vec![id], ..Select::default() })),
        )
        .map(|_| ()),
        Method::Cli | Method::CliNetns => {
            let mut cmd = if how == Method::Cli {
                Command::new(flowgate)
            } else {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.host.name]).arg(flowgate);
                c
            };
            let out = cmd.args(["block", &id_s, "--run-dir", &run_dir_s]).stdin(Stdio::null()).output();
            match out {
                Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("blocked: ") => Ok(()),
                Ok(o) => Err(format!(
                    "flowgate block {id}: {}: {}{}",
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim(),
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => Err(format!("cannot run flowgate block: {e}")),
            }
        }
    };
    let request_us = t0.elapsed().as_secs_f64() * 1e6;
    // On a failed request the readers still end, at their read timeout.
    let (c, c_at) = client.join().map_err(|_| "client reader panicked")?;
    let (s, s_at) = server.join().map_err(|_| "server reader panicked")?;
    request.map_err(|e| format!("block flow {id} ({}): {e}", how.name()))?;
    Ok(Sample {
        client_us: c_at.saturating_duration_since(t0).as_secs_f64() * 1e6,
        server_us: s_at.saturating_duration_since(t0).as_secs_f64() * 1e6,
        request_us,
        client: outcome(&c),
        server: outcome(&s),
    })
}

/// The daemon's flow id of each connection, from `{"cmd":"flows"}` (one line per flow after the
/// first answer), matched by local and remote address; every one must be allowed.
fn flow_ids(run_dir: &Path, conns: &[Conn]) -> Result<Vec<u64>> {
    let mut by_pair: HashMap<(String, String), (u64, String)> = HashMap::new();
    flowgate::daemon::control::request_stream(run_dir, &Request::new(Ask::Flows(Select::default())), |line| {
        let f: Value = serde_json::from_str(line).map_err(|e| format!("flows: bad flow line ({e}): {line}"))?;
        let flow = &f["flow"];
        if let (Some(l), Some(r), Some(id)) = (flow["local"].as_str(), flow["remote"].as_str(), flow["id"].as_u64()) {
            by_pair.insert((l.to_string(), r.to_string()), (id, f["verdict"].as_str().unwrap_or("?").to_string()));
        }
        Ok(())
    })?;
    conns
        .iter()
        .map(|c| {
            let (id, verdict) = by_pair
                .get(&(c.local.to_string(), c.remote.to_string()))
                .ok_or_else(|| format!("no live flow {} -> {} in `flows`", c.local, c.remote))?;
            if verdict != "allow" {
                return Err(format!("flow {id} ({} -> {}) is `{verdict}`, not allowed", c.local, c.remote));
            }
            Ok(*id)
        })
        .collect()
}

struct BlockReport {
    connections: usize,
    ready: Duration,
    open: Duration,
    samples: Vec<(Method, Sample)>,
    /// `flow.update` events with verdict drop and source handle, and blocks sent.
    updates: usize,
    stopped: Duration,
    daemon_messages: Vec<String>,
}

fn run_block(opts: &Opts) -> Result<BlockReport> {
    // Drop order (reverse of declaration): daemon, temp dir, lab.
    let lab = Lab::new("vblock");
    let tmp = TempDir::new("block")?;
    let Ready { daemon, took: ready, .. } = start_daemon(&lab.host, &opts.flowgate, &tmp)?;
    eprintln!("verdicts: [block] flowgate ready after {:.3} s", ready.as_secs_f64());
    let plan: Vec<Method> = std::iter::repeat_n(Method::Socket, opts.block)
        .chain(std::iter::repeat_n(Method::Cli, opts.cli))
        .chain(std::iter::repeat_n(Method::CliNetns, opts.cli))
        .collect();
    let (mut conns, open) = open_pairs(&lab, plan.len(), BLOCK_PORT)?;
    // One exchange each; then they sit idle, handled by the kernel.
    for (i, c) in conns.iter_mut().enumerate() {
        let t = Some(Duration::from_secs(5));
        let step = (|| -> std::io::Result<()> {
            c.client.set_read_timeout(t)?;
            c.server.set_read_timeout(t)?;
            c.client.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.server.read_exact(&mut b)?;
            c.server.write_all(&b)?;
            c.client.read_exact(&mut b)
        })();
        step.map_err(|e| format!("connection {i}: first exchange: {e}"))?;
    }
    let run_dir = tmp.run_dir();
    let ids = flow_ids(&run_dir, &conns)?;
    eprintln!(
        "verdicts: [block] {} connections open and allowed ({:.2} s to connect); blocking them one by one",
        conns.len(),
        open.as_secs_f64()
    );
    let mut samples = Vec::with_capacity(plan.len());
    for ((conn, id), how) in conns.into_iter().zip(ids).zip(plan) {
        samples.push((how, block_one(&lab, conn, id, how, &run_dir, &opts.flowgate)?));
    }
    let (stopped, daemon_messages) = daemon.stop()?;
    let updates = read_events(&tmp.log())?
        .iter()
        .filter(|e| e["event"] == "flow.update" && e["verdict"] == "drop" && e["source"] == "handle" && to_service(e))
        .count();
    check_stopped_alone(&lab.host)?;
    Ok(BlockReport { connections: samples.len(), ready, open, samples, updates, stopped, daemon_messages })
}

// ---------------------------------------------------------------------------------------------
// Part 2: adoption
// ---------------------------------------------------------------------------------------------

/// One start of the daemon.
struct Start {
    /// `baseline`, `adoption` or `restart`.
    kind: &'static str,
    ready: Duration,
    /// The count on the ready line.
    adopted: u64,
    line: String,
    stopped: Duration,
    /// Events of this start: `flow.verdict` of existing TCP flows to 203.0.113.10, how many
    /// allowed, how many of those with rule `kept`.
    existing_verdicts: usize,
    existing_allowed: usize,
    existing_kept: usize,
    /// Flows this start saw open while it ran (`flow.new` not `existing`), as
    /// `protocol local -> remote (verdict)`: none of the benchmark's.
    new_flows: Vec<String>,
    /// Conntrack entries to 203.0.113.10 and how many had a flowgate mark, while it ran.
    conntrack: Option<(u64, u64)>,
    /// After the start: one byte each way on every connection (none for baselines).
    echo: Option<Echo>,
    /// NFQUEUE packets and TCP retransmissions in `host` during the echo check.
    nfqueue_during_echo: Option<u64>,
    retrans_during_echo: Option<u64>,
    daemon_messages: Vec<String>,
}

impl Start {
    fn json(&self) -> Value {
        json!({
            "kind": self.kind,
            "ready_ms": round(self.ready.as_secs_f64() * 1e3, 2),
            "adopted": self.adopted,
            "stop_ms": round(self.stopped.as_secs_f64() * 1e3, 1),
            "existing_flow_verdicts": self.existing_verdicts,
            "existing_allowed": self.existing_allowed,
            "existing_kept": self.existing_kept,
            "new_flows": self.new_flows,
            "conntrack_entries": self.conntrack.map(|c| c.0),
            "conntrack_marked": self.conntrack.map(|c| c.1),
            "echo": self.echo.as_ref().map(Echo::json),
            "nfqueue_packets_during_echo": self.nfqueue_during_echo,
            "tcp_retrans_segs_during_echo": self.retrans_during_echo,
            "daemon_messages": self.daemon_messages,
        })
    }
}

/// Starts the daemon in `lab`'s host (a fresh temp dir per start), then checks every connection
/// of `conns` (the client ends), then stops it and reads its events.
fn start_once(lab: &Lab, opts: &Opts, kind: &'static str, conns: &[TcpStream], byte: u8) -> Result<Start> {
    let n = conns.len();
    let tmp = TempDir::new(&format!("{kind}-{n}"))?;
    let Ready { daemon, took: ready, line, adopted } = start_daemon(&lab.host, &opts.flowgate, &tmp)?;
    let mut s = Start {
        kind,
        ready,
        adopted,
        line,
        stopped: Duration::ZERO,
        existing_verdicts: 0,
        existing_allowed: 0,
        existing_kept: 0,
        new_flows: Vec::new(),
        conntrack: None,
        echo: None,
        nfqueue_during_echo: None,
        retrans_during_echo: None,
        daemon_messages: Vec::new(),
    };
    if !conns.is_empty() {
        s.conntrack = Some(conntrack_entries(&lab.host)?);
        let (q0, r0) = (nfqueue_packets(&lab.host)?, retrans_segs(&lab.host)?);
        let echo = echo_check(conns, byte);
        s.nfqueue_during_echo = Some(nfqueue_packets(&lab.host)?.saturating_sub(q0));
        s.retrans_during_echo = Some(retrans_segs(&lab.host)?.saturating_sub(r0));
        s.echo = Some(echo);
    }
    (s.stopped, s.daemon_messages) = daemon.stop()?;
    for e in read_events(&tmp.log())? {
        if e["event"] == "flow.verdict" && e["flow"]["existing"] == false {
            let f = &e["flow"];
            let t = |k: &str| f[k].as_str().unwrap_or("?").to_string();
            let v = e["verdict"].as_str().unwrap_or("?");
            s.new_flows.push(format!("{} {} -> {} ({v})", t("protocol"), t("local"), t("remote")));
        }
        if e["event"] == "flow.verdict" && e["flow"]["existing"] == true && to_service(&e) {
            s.existing_verdicts += 1;
            if e["verdict"] == "allow" {
                s.existing_allowed += 1;
                if e["rule"] == "kept" {
                    s.existing_kept += 1;
                }
            }
        }
    }
    let echo = s.echo.as_ref().map_or(String::new(), |e| {
        format!(
            "; echo {}/{} in {:.2} s, {} NFQUEUE packets, {} retransmitted segments",
            e.ok,
            conns.len(),
            e.seconds,
            s.nfqueue_during_echo.unwrap_or(0),
            s.retrans_during_echo.unwrap_or(0)
        )
    });
    eprintln!(
        "verdicts: [adoption] {kind} ({n} connections): ready after {:.1} ms, {} adopted, stopped after {:.0} ms{echo}",
        s.ready.as_secs_f64() * 1e3,
        s.adopted,
        s.stopped.as_secs_f64() * 1e3,
    );
    Ok(s)
}

/// One lab of the adoption part.
struct AdoptLab {
    /// Time to open the connections.
    open: Duration,
    /// Conntrack entries to 203.0.113.10 before the adoption start, and how many were marked.
    conntrack_before: (u64, u64),
    /// The check before any daemon ran.
    echo_before: Echo,
}

struct AdoptReport {
    connections: usize,
    ports: usize,
    labs: Vec<AdoptLab>,
    /// Every start, lab after lab: baseline, adoption, restart.
    starts: Vec<Start>,
}

/// `opts.starts` rounds, each in a fresh lab, so every adoption start is a first one (its
/// connections have no mark of a previous instance): the daemon starts with no connections
/// (baseline), then N connections are opened and the daemon starts again (adoption), then once
/// more (restart: every connection keeps the verdict the previous start gave it).
fn run_adoption(opts: &Opts) -> Result<AdoptReport> {
    let n = opts.connections;
    let ports: Vec<u16> = (0..n.div_ceil(CONNS_PER_PORT) as u16).map(|k| ADOPT_FIRST_PORT + k).collect();
    let mut labs = Vec::new();
    let mut starts = Vec::new();
    for round in 1..=opts.starts {
        // Drop order (reverse of declaration): connections, echo server, lab.
        let lab = Lab::new(&format!("vadopt{round}"));
        // A host firewall that tracks connections (as the live tests set up): conntrack knows
        // every connection while no daemon runs.
        lab.host.run_ok(&["iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
        lab.host.sysctls(&[("net/ipv4/ip_local_port_range", HOST_PORT_RANGE)]);
        starts.push(start_once(&lab, opts, "baseline", &[], 0)?);
        let _echo = start_echo_process(&lab.srv, &ports)?;
        let targets = ports.iter().map(|&p| lab::sa(SRV_SERVICE_V4, p)).collect();
        let (conns, open) = connect_all(&lab.host, n, targets)?;
        let echo_before = echo_check(&conns, b'0');
        eprintln!(
            "verdicts: [adoption] round {round}: {n} connections open to {} server ports in {:.2} s, {} of them echo",
            ports.len(),
            open.as_secs_f64(),
            echo_before.ok
        );
        if echo_before.ok != n {
            return Err(format!(
                "{} of {n} connections did not echo before any daemon ran: {:?}",
                echo_before.failed, echo_before.failures
            ));
        }
        let conntrack_before = conntrack_entries(&lab.host)?;
        starts.push(start_once(&lab, opts, "adoption", &conns, b'a')?);
        starts.push(start_once(&lab, opts, "restart", &conns, b'b')?);
        check_stopped_alone(&lab.host)?;
        labs.push(AdoptLab { open, conntrack_before, echo_before });
    }
    Ok(AdoptReport { connections: n, ports: ports.len(), labs, starts })
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn block_section(b: &BlockReport, out: &mut String) -> Value {
    let _ = writeln!(
        out,
        "\n== block latency: {} idle, kernel-handled TCP connections 198.51.100.1 -> 203.0.113.10, blocked one at a time",
        b.connections
    );
    let _ = writeln!(out, "   (µs from just before the request until each end's pending read() fails)");
    let _ = writeln!(
        out,
        "{:<31} {:>4} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}  outcomes (client / server)",
        "method", "n", "client p50", "client p99", "server p50", "server p99", "req p50", "req p99"
    );
    let mut methods = serde_json::Map::new();
    for how in [Method::Socket, Method::Cli, Method::CliNetns] {
        let ss: Vec<&Sample> = b.samples.iter().filter(|(m, _)| *m == how).map(|(_, s)| s).collect();
        if ss.is_empty() {
            continue;
        }
        let col = |f: fn(&Sample) -> f64| sorted(ss.iter().map(|s| f(s)).collect());
        let (client, server, request) = (col(|s| s.client_us), col(|s| s.server_us), col(|s| s.request_us));
        let tally = |f: fn(&Sample) -> &str| {
            let mut m: BTreeMap<String, usize> = BTreeMap::new();
            for s in &ss {
                *m.entry(f(s).to_string()).or_insert(0) += 1;
            }
            m
        };
        let (ce, se) = (tally(|s| &s.client), tally(|s| &s.server));
        let show =
            |m: &BTreeMap<String, usize>| m.iter().map(|(k, n)| format!("{k} x{n}")).collect::<Vec<_>>().join(", ");
        let failed = ss.iter().filter(|s| !s.ok()).count();
        let _ = writeln!(
            out,
            "{:<31} {:>4} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}  {} / {}{}",
            how.name(),
            ss.len(),
            percentile(&client, 50.0),
            percentile(&client, 99.0),
            percentile(&server, 50.0),
            percentile(&server, 99.0),
            percentile(&request, 50.0),
            percentile(&request, 99.0),
            show(&ce),
            show(&se),
            if failed > 0 { format!("  <-- {failed} NOT TORN DOWN AS EXPECTED") } else { String::new() }
        );
        methods.insert(
            how.key().to_string(),
            json!({
                "count": ss.len(),
                "client_us": dist_json(&client, 1),
                "server_us": dist_json(&server, 1),
                "request_us": dist_json(&request, 1),
                "client_outcomes": ce,
                "server_outcomes": se,
                "not_torn_down": failed,
            }),
        );
    }
    let sent = b.samples.len();
    let _ = writeln!(
        out,
        "flowgate: ready after {:.3} s, stopped (exit 0) after {:.2} s; {} flow.update drop/handle events for {sent} blocks{}",
        b.ready.as_secs_f64(),
        b.stopped.as_secs_f64(),
        b.updates,
        if b.updates == sent { "" } else { "  <-- MISMATCH" }
    );
    for m in &b.daemon_messages {
        let _ = writeln!(out, "flowgate said: {m}");
    }
    json!({
        "connections": b.connections,
        "connect_seconds": round(b.open.as_secs_f64(), 3),
        "methods": Value::Object(methods),
        "flow_update_events": b.updates,
        "ready_seconds": round(b.ready.as_secs_f64(), 3),
        "stop_seconds": round(b.stopped.as_secs_f64(), 3),
        "daemon_messages": b.daemon_messages,
    })
}

fn adoption_section(a: &AdoptReport, out: &mut String) -> Value {
    let n = a.connections;
    let ms = |v: Vec<f64>| sorted(v.into_iter().map(|x| x * 1e3).collect());
    let of = |kind: &str| -> Vec<&Start> { a.starts.iter().filter(|s| s.kind == kind).collect() };
    let (base, adopt, restart) = (of("baseline"), of("adoption"), of("restart"));
    let base_ms = ms(base.iter().map(|s| s.ready.as_secs_f64()).collect());
    let adopt_ms = ms(adopt.iter().map(|s| s.ready.as_secs_f64()).collect());
    let restart_ms = ms(restart.iter().map(|s| s.ready.as_secs_f64()).collect());
    let (b50, a50) = (percentile(&base_ms, 50.0), percentile(&adopt_ms, 50.0));
    let _ = writeln!(
        out,
        "\n== adoption: {n} established TCP connections 198.51.100.1 -> 203.0.113.10 ({} server ports) open before \
         the start, {} rounds (a fresh lab each)",
        a.ports,
        a.labs.len()
    );
    let _ = writeln!(out, "   (ms from spawning `ip netns exec <host> flowgate run` to its ready line)");
    let _ = writeln!(out, "{:<34} {:>6} {:>9} {:>9} {:>9}  adopted", "start", "starts", "p50 ms", "p99 ms", "min ms");
    for (name, v, list) in [
        ("baseline (0 connections)".to_string(), &base_ms, &base),
        (format!("adoption ({n} connections)"), &adopt_ms, &adopt),
        (format!("restart ({n}, verdicts kept)"), &restart_ms, &restart),
    ] {
        let counts: Vec<String> = list.iter().map(|s| s.adopted.to_string()).collect();
        let _ = writeln!(
            out,
            "{name:<34} {:>6} {:>9.1} {:>9.1} {:>9.1}  {}",
            v.len(),
            percentile(v, 50.0),
            percentile(v, 99.0),
            percentile(v, 0.0),
            counts.join(", ")
        );
    }
    let diff = a50 - b50;
    let _ = writeln!(
        out,
        "adoption - baseline (p50): {diff:.1} ms = {:.1} µs per connection; ratio {:.2}x",
        diff * 1e3 / n as f64,
        a50 / b50
    );
    let mut problems = Vec::new();
    for (k, s) in a.starts.iter().enumerate() {
        let what = format!("start {} ({}, round {})", k + 1, s.kind, k / 3 + 1);
        let want = if s.kind == "baseline" { 0 } else { n as u64 };
        if s.adopted < want {
            problems.push(format!("{what}: the ready line says {} adopted, fewer than {want}", s.adopted));
        }
        if s.kind != "baseline" && s.existing_verdicts != n {
            problems.push(format!("{what}: {} existing-flow verdicts for the {n} connections", s.existing_verdicts));
        }
        if s.existing_allowed != s.existing_verdicts {
            problems.push(format!("{what}: not every adopted connection was allowed"));
        }
        if s.kind == "restart" && s.existing_kept != n {
            problems.push(format!("{what}: {} of {n} flows kept their verdict (rule `kept`)", s.existing_kept));
        }
        if let Some((entries, marked)) = s.conntrack
            && (entries < n as u64 || marked < n as u64)
        {
            problems.push(format!("{what}: {entries} conntrack entries to 203.0.113.10, {marked} marked, for {n}"));
        }
        if let Some(e) = &s.echo
            && e.ok != n
        {
            problems.push(format!("{what}: {} of {n} connections failed the echo check: {:?}", e.failed, e.failures));
        }
    }
    for (k, l) in a.labs.iter().enumerate() {
        if l.conntrack_before.0 < n as u64 || l.conntrack_before.1 > 0 {
            problems.push(format!(
                "round {}: before the start conntrack had {} entries to 203.0.113.10 ({} marked) for {n} connections",
                k + 1,
                l.conntrack_before.0,
                l.conntrack_before.1
            ));
        }
    }
    let echoes: Vec<&Echo> = a.starts.iter().filter_map(|s| s.echo.as_ref()).collect();
    let ok_total: usize = echoes.iter().map(|e| e.ok).sum();
    let queued: u64 = a.starts.iter().filter_map(|s| s.nfqueue_during_echo).sum();
    let retrans: u64 = a.starts.iter().filter_map(|s| s.retrans_during_echo).sum();
    let before: usize = a.labs.iter().map(|l| l.echo_before.ok).sum();
    let _ = writeln!(
        out,
        "connections working after the starts (1 byte each way on every one): {ok_total}/{} over {} starts \
         (before any daemon: {before}/{}); NFQUEUE packets during the checks: {queued}; TCP retransmissions: {retrans}",
        n * echoes.len(),
        echoes.len(),
        n * a.labs.len()
    );
    let _ = writeln!(
        out,
        "conntrack entries to 203.0.113.10 before each adoption start: {}",
        a.labs.iter().map(|l| format!("{} ({} marked)", l.conntrack_before.0, l.conntrack_before.1)).join_list()
    );
    let stops = |list: &[&Start]| list.iter().map(|s| format!("{:.0}", s.stopped.as_secs_f64() * 1e3)).join_list();
    let _ = writeln!(
        out,
        "connects: {} s; daemon stop, ms: baseline {}, adoption {}, restart {}",
        a.labs.iter().map(|l| format!("{:.2}", l.open.as_secs_f64())).join_list(),
        stops(&base),
        stops(&adopt),
        stops(&restart)
    );
    if let Some(s) = adopt.first() {
        let _ = writeln!(out, "ready line: {}", s.line);
    }
    for s in &a.starts {
        for m in &s.daemon_messages {
            let _ = writeln!(out, "flowgate ({}) said: {m}", s.kind);
        }
    }
    let mut new_flows: BTreeMap<&str, usize> = BTreeMap::new();
    for f in a.starts.iter().flat_map(|s| &s.new_flows) {
        *new_flows.entry(f).or_insert(0) += 1;
    }
    let _ = writeln!(
        out,
        "flows opened while a daemon ran (flow.new, not existing): {}",
        if new_flows.is_empty() { "none".to_string() } else { new_flows.len().to_string() }
    );
    for (f, k) in new_flows.iter().take(10) {
        let _ = writeln!(out, "  {f}{}", if *k > 1 { format!(" x{k}") } else { String::new() });
    }
    let ours = new_flows.keys().filter(|f| f.contains(" -> 203.0.113.10:")).count();
    if ours > 0 {
        problems.push(format!("{ours} connections open before the start were judged as new flows too"));
    }
    for p in &problems {
        let _ = writeln!(out, "PROBLEM: {p}");
    }
    json!({
        "connections": n,
        "server_ports": a.ports,
        "rounds": a.labs.len(),
        "baseline_ready_ms": dist_json(&base_ms, 2),
        "adoption_ready_ms": dist_json(&adopt_ms, 2),
        "restart_ready_ms": dist_json(&restart_ms, 2),
        "difference_p50_ms": round(diff, 2),
        "per_connection_us": round(diff * 1e3 / n as f64, 2),
        "ratio_p50": round(a50 / b50, 3),
        "echo_ok_total": ok_total,
        "echo_expected_total": n * echoes.len(),
        "echo_before_ok_total": before,
        "nfqueue_packets_during_checks": queued,
        "tcp_retrans_segs_during_checks": retrans,
        "labs": a.labs.iter().map(|l| json!({
            "connect_seconds": round(l.open.as_secs_f64(), 3),
            "conntrack_before": {"entries": l.conntrack_before.0, "marked": l.conntrack_before.1},
            "echo_before": l.echo_before.json(),
        })).collect::<Vec<_>>(),
        "starts": a.starts.iter().map(Start::json).collect::<Vec<_>>(),
        "problems": problems,
    })
}

/// `a, b, c` from an iterator of strings.
trait JoinList {
    fn join_list(self) -> String;
}

impl<I: Iterator<Item = String>> JoinList for I {
    fn join_list(self) -> String {
        self.collect::<Vec<_>>().join(", ")
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(ECHO_SERVER_FLAG) {
        echo_server_main(args.get(2).map_or("", String::as_str));
    }
    let opts = begin("verdicts", "network namespaces, iptables, NFQUEUE", parse_opts);
    // The adoption part's client ends (its echo server, a child, holds the server ends) and both
    // ends of the block part's connections live in this process; children inherit the limit.
    let need = (opts.connections.max(2 * (opts.block + 2 * opts.cli)) + FD_SLACK) as u64;
    match raise_nofile(need.max(NOFILE)) {
        Ok(n) if n >= need => eprintln!("verdicts: RLIMIT_NOFILE {n}"),
        Ok(n) => {
            eprintln!("verdicts: RLIMIT_NOFILE is {n} and cannot be raised to the {need} this run needs");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("verdicts: {e}");
            std::process::exit(1);
        }
    }
    let start = Instant::now();
    let load_start = loadavg();
    eprintln!("verdicts: flowgate binary {}, load average {load_start}", opts.flowgate.display());
    let want = |p: &str| opts.parts.iter().any(|x| x == p);
    let mut failed = None;
    let block = if want("block") {
        eprintln!("verdicts: [block] starting");
        run_block(&opts).map_err(|e| failed = Some(format!("[block] {e}"))).ok()
    } else {
        None
    };
    let adoption = if failed.is_none() && want("adoption") {
        eprintln!("verdicts: [adoption] starting");
        run_adoption(&opts).map_err(|e| failed = Some(format!("[adoption] {e}"))).ok()
    } else {
        None
    };
    if !check_nothing_left() {
        std::process::exit(1);
    }
    if let Some(e) = failed {
        eprintln!("verdicts: {e}");
        std::process::exit(1);
    }
    let mut text = String::new();
    let mut json = json!({
        "benchmark": "flowgate-verdicts",
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "wall_seconds": round(start.elapsed().as_secs_f64(), 1),
    });
    if let Some(b) = &block {
        json["block"] = block_section(b, &mut text);
    }
    if let Some(a) = &adoption {
        json["adoption"] = adoption_section(a, &mut text);
    }
    if let Err(e) = print_result(&text, &json, opts.json.as_deref()) {
        eprintln!("verdicts: {e}");
        std::process::exit(1);
    }
}
