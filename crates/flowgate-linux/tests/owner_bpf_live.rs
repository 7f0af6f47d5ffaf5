//! The owner_bpf module against the running kernel, as root. Each test starts a capture of its
//! own (so several are attached at once, as with concurrent daemons) and a network namespace of
//! its own (`fgob-<pid>-<n>`, deleted at the end even when the test fails), where real child
//! processes (python3, bash) open TCP and UDP flows and exit at once; the test then asks the
//! capture who made each flow. Every address is the namespace's own: loopback, plus 198.51.100.1
//! and 2001:db8::1 put on its loopback, so nothing leaves the namespace.
//!
//! Without root the tests say so and pass. `measure_cost_and_lookup` is ignored by default: it
//! times connects with and without a capture and must run alone
//! (`cargo test --test owner_bpf_live -- --ignored --nocapture`).

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use flowgate_linux::owner_bpf::{KernelOwner, OwnerCapture};

mod common;
use common::{Netns, root};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// The child program: `<mode> <host> <port>`; prints `<pid> <local port>` of the process that
/// made the socket, and exits at once.
const CHILD: &str = r#"
import os, socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET

def report(s):
    print(os.getpid(), s.getsockname()[1], flush=True)

def tcp():
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect((host, port))
    report(s)

if mode == "tcp":
    tcp()
elif mode == "tcp-nobody":
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    tcp()
elif mode == "fork-tcp":
    child = os.fork()
    if child == 0:
        tcp()
        os._exit(0)
    os.waitpid(child, 0)
elif mode == "udp-sendto":
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.sendto(b"x", (host, port))
    report(s)
elif mode in ("udp-connect", "udp-connect-nosend"):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    if mode == "udp-connect":
        s.send(b"x")
    report(s)
elif mode in ("bind-tcp", "bind-udp"):
    s = socket.socket(family, socket.SOCK_STREAM if mode == "bind-tcp" else socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, 0))
    if mode == "bind-tcp":
        s.listen()
    report(s)
else:
    sys.exit("unknown mode " + mode)
"#;

/// A namespace of its own with loopback up and the documentation addresses on it.
fn netns() -> Netns {
    let ns = Netns::new("fgob");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns.exec(&["ip", "addr", "add", "198.51.100.1/32", "dev", "lo"]);
    ns.exec(&["ip", "addr", "add", "2001:db8::1/128", "dev", "lo", "nodad"]);
    ns
}

fn capture() -> OwnerCapture {
    OwnerCapture::start().unwrap_or_else(|e| panic!("starting the capture: {e}"))
}

/// The python3 the tests run, by absolute path (so what the kernel records as exe is known).
fn python() -> PathBuf {
    ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("python3 (in /usr/bin, /usr/local/bin or /bin)")
}

/// The child program in a file of the test's own, removed when this is dropped.
struct Script(PathBuf);

impl Script {
    fn new() -> Script {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("flowgate-owner-child-{}-{}.py", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, CHILD).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        Script(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What one child run printed: the process that made the socket, and its local port.
struct Made {
    /// The process the test started.
    spawned: u32,
    pid: u32,
    port: u16,
}

/// Runs the child program in `ns` and waits for it to exit.
fn run_child(ns: &Netns, script: &Script, mode: &str, host: &str, port: u16) -> Made {
    let port = port.to_string();
    let (spawned, out) = ns.run(|| {
        let child = Command::new(python())
            .arg(script.path())
            .args([mode, host, &port])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting python3");
        let spawned = child.id();
        (spawned, child.wait_with_output().expect("waiting for python3"))
    });
    assert!(out.status.success(), "child {mode} {host}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let pid = words.next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("child {mode}: printed {text:?}"));
    let port = words.next().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("child {mode}: printed {text:?}"));
    Made { spawned, pid, port }
}

fn any_local(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port)
}

/// Asserts that the flow `made` opened to `remote` is the child's, and its process record is the
/// python3 the test ran with these arguments.
fn assert_outbound(
    capture: &OwnerCapture,
    script: &Script,
    protocol: u8,
    made: &Made,
    remote: SocketAddr,
    args: &[&str],
) -> KernelOwner {
    let owner = capture
        .outbound(protocol, any_local(made.port), remote)
        .unwrap_or_else(|| panic!("no owner for {protocol} :{} -> {remote}", made.port));
    assert_eq!(owner.tgid, made.pid, "{protocol} :{} -> {remote}: {owner:?}", made.port);
    assert_eq!(owner.tid, made.pid, "{owner:?}");
    assert!(!owner.comm.is_empty(), "{owner:?}");
    assert!(owner.captured_ns > 0, "{owner:?}");
    let process = capture.process(made.pid).unwrap_or_else(|| panic!("no process record for {}", made.pid));
    let canonical = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|e| panic!("resolving {p}: {e}"));
    assert_eq!(canonical(&process.exe), canonical(&python().to_string_lossy()), "{process:?}");
    let python = python();
    let mut expected = vec![python.to_str().expect("python path"), script.path().to_str().expect("script path")];
    expected.extend_from_slice(args);
    assert_eq!(process.args, expected, "{process:?}");
    assert_eq!(process.tgid, made.pid);
    owner
}

#[test]
fn tcp_connects_are_attributed_to_their_process() {
    if !root() {
        return;
    }
    let capture = capture();
    let ns = netns();
    let script = Script::new();
    let (v4, v6) = ns.run(|| (TcpListener::bind("127.0.0.1:0").unwrap(), TcpListener::bind("[::1]:0").unwrap()));
    let p4 = v4.local_addr().unwrap().port();
    let p6 = v6.local_addr().unwrap().port();
    for (host, port, remote) in [
        ("127.0.0.1", p4, SocketAddr::from(([127, 0, 0, 1], p4))),
        ("::1", p6, v6.local_addr().unwrap()),
        // A dual-stack socket to an IPv4 listener.
        ("::ffff:127.0.0.1", p4, SocketAddr::from(([127, 0, 0, 1], p4))),
    ] {
        let made = run_child(&ns, &script, "tcp", host, port);
        assert_eq!(made.pid, made.spawned);
        let owner = assert_outbound(&capture, &script, TCP, &made, remote, &["tcp", host, &port.to_string()]);
        assert_eq!((owner.uid, owner.gid), (0, 0), "{owner:?}");
        let process = capture.process(made.pid).expect("process");
        assert_eq!(process.ppid, std::process::id(), "{process:?}");
        assert_eq!(process.uid, 0, "{process:?}");
        if let IpAddr::V4(v4) = remote.ip() {
            // The same flow asked for by its IPv4-mapped name.
            let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), remote.port());
            assert_eq!(capture.outbound(TCP, any_local(made.port), mapped), Some(owner));
        }
    }
}

#[test]
fn udp_sends_and_connects_are_attributed_to_their_process() {
    if !root() {
        return;
    }
    let capture = capture();
    let ns = netns();
    let script = Script::new();
    // udp-connect-nosend: recorded at connect(), before any datagram.
    for mode in ["udp-sendto", "udp-connect", "udp-connect-nosend"] {
        for (host, remote) in [
            ("198.51.100.1", SocketAddr::from(([198, 51, 100, 1], 53))),
            ("2001:db8::1", "[2001:db8::1]:53".parse().unwrap()),
            ("::ffff:198.51.100.1", SocketAddr::from(([198, 51, 100, 1], 53))),
            ("127.0.0.1", SocketAddr::from(([127, 0, 0, 1], 53))),
        ] {
            let made = run_child(&ns, &script, mode, host, 53);
            let owner = assert_outbound(&capture, &script, UDP, &made, remote, &[mode, host, "53"]);
            assert_eq!((owner.uid, owner.gid), (0, 0), "{mode} {host}: {owner:?}");
            assert_eq!(capture.outbound(TCP, any_local(made.port), remote), None, "{mode} {host}: TCP");
        }
    }
}

#[test]
fn a_forked_child_and_a_non_root_process_are_told_apart() {
    if !root() {
        return;
    }
    let capture = capture();
    let ns = netns();
    let script = Script::new();
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let remote = listener.local_addr().unwrap();
    let port = remote.port().to_string();

    let made = run_child(&ns, &script, "fork-tcp", "127.0.0.1", remote.port());
    assert_ne!(made.pid, made.spawned, "the connect is the forked child's");
    let owner = capture.outbound(TCP, any_local(made.port), remote).expect("the forked child's flow");
    assert_eq!(owner.tgid, made.pid, "{owner:?}");
    let child = capture.process(made.pid).expect("the forked child's record");
    let parent = capture.process(made.spawned).expect("the parent's record");
    assert_eq!(child.ppid, made.spawned, "{child:?}");
    assert_eq!((&child.exe, &child.args), (&parent.exe, &parent.args), "inherited from the parent");
    assert_eq!(parent.args[2..], ["fork-tcp", "127.0.0.1", port.as_str()]);
    assert!(child.start_ns >= parent.start_ns, "{child:?} {parent:?}");

    let made = run_child(&ns, &script, "tcp-nobody", "127.0.0.1", remote.port());
    let owner = assert_outbound(&capture, &script, TCP, &made, remote, &["tcp-nobody", "127.0.0.1", &port]);
    assert_eq!((owner.uid, owner.gid), (65534, 65534), "{owner:?}");
}

#[test]
fn bound_sockets_are_attributed_to_their_process() {
    if !root() {
        return;
    }
    let capture = capture();
    let ns = netns();
    let script = Script::new();
    // (mode, bound host, protocol, the local ends asked for)
    let cases: [(&str, &str, u8, &[&str]); 4] = [
        ("bind-tcp", "127.0.0.1", TCP, &["127.0.0.1"]),
        ("bind-udp", "0.0.0.0", UDP, &["198.51.100.1", "0.0.0.0", "::ffff:198.51.100.1"]),
        ("bind-tcp", "::", TCP, &["::1", "2001:db8::1", "127.0.0.1", "::"]),
        ("bind-udp", "2001:db8::1", UDP, &["2001:db8::1"]),
    ];
    for (mode, host, protocol, asked) in cases {
        let made = run_child(&ns, &script, mode, host, 0);
        for ip in asked {
            let local = SocketAddr::new(ip.parse().unwrap(), made.port);
            let owner = capture.listener(protocol, local).unwrap_or_else(|| panic!("{mode} {host}: none for {local}"));
            assert_eq!(owner.tgid, made.pid, "{mode} {host}, asked {local}: {owner:?}");
        }
        // Not the other protocol, not another port.
        let other = if protocol == TCP { UDP } else { TCP };
        let local = SocketAddr::new(asked[0].parse().unwrap(), made.port);
        assert!(capture.listener(other, local).is_none_or(|o| o.tgid != made.pid), "{mode} {host}: other protocol");
    }
    // A specific IPv4 address does not answer for another one.
    let made = run_child(&ns, &script, "bind-tcp", "127.0.0.1", 0);
    let elsewhere = SocketAddr::from(([198, 51, 100, 1], made.port));
    assert!(capture.listener(TCP, elsewhere).is_none_or(|o| o.tgid != made.pid));
}

/// A script run directly: the record names the interpreter the kernel ran, and argv has the
/// script's path after it.
#[test]
fn a_script_is_recorded_with_its_interpreter() {
    if !root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let capture = capture();
    let ns = netns();
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let remote = listener.local_addr().unwrap();
    let script = std::env::temp_dir().join(format!("flowgate-owner-script-{}.sh", std::process::id()));
    std::fs::write(&script, "#!/bin/bash\nexec 3<>/dev/tcp/127.0.0.1/\"$1\"\n").expect("writing the script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let port = remote.port().to_string();
    let (pid, status) = ns.run(|| {
        let mut child = Command::new(&script).arg(&port).spawn().expect("starting the script");
        (child.id(), child.wait().expect("waiting for the script"))
    });
    let _ = std::fs::remove_file(&script);
    assert!(status.success(), "script: {status}");
    let (_, peer) = listener.accept().expect("accept");
    assert_eq!(capture.outbound(TCP, peer, remote).map(|o| o.tgid), Some(pid));
    let process = capture.process(pid).expect("the script's record");
    assert_eq!(process.exe, "/bin/bash", "{process:?}");
    assert_eq!(process.args, ["/bin/bash", script.to_str().expect("script path"), port.as_str()], "{process:?}");
}

/// 500 short-lived processes, one after the other, each connecting once and exiting at once:
/// every flow must have its process.
#[test]
fn short_lived_processes_are_all_attributed() {
    if !root() {
        return;
    }
    const RUNS: usize = 500;
    let capture = capture();
    let ns = netns();
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let remote = listener.local_addr().unwrap();
    let connect = format!("exec 3<>/dev/tcp/127.0.0.1/{}", remote.port());
    let start = Instant::now();
    let mut right = 0;
    let mut wrong = Vec::new();
    for _ in 0..RUNS {
        let (pid, status) = ns.run(|| {
            let mut child = Command::new("/bin/bash").args(["-c", &connect]).spawn().expect("starting bash");
            (child.id(), child.wait().expect("waiting for bash"))
        });
        assert!(status.success(), "bash: {status}");
        let (_, peer) = listener.accept().expect("accept");
        match capture.outbound(TCP, peer, remote) {
            Some(owner) if owner.tgid == pid => right += 1,
            other => wrong.push((pid, peer, other)),
        }
    }
    eprintln!("owner_bpf_live: {right} of {RUNS} short-lived processes attributed right, in {:?}", start.elapsed());
    assert_eq!(right, RUNS, "wrong or missing: {wrong:?}");
}

/// Connects and accepts `n` times on loopback in `ns`; the time taken.
fn connects(ns: &Netns, n: usize) -> std::time::Duration {
    ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let to = listener.local_addr().unwrap();
        let start = Instant::now();
        for _ in 0..n {
            let client = TcpStream::connect(to).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            drop(client);
            drop(server);
        }
        start.elapsed()
    })
}

/// The cost the programs add to a connect, and the time of one lookup. Run alone (the cgroup
/// programs of any other capture would be timed too).
#[test]
#[ignore = "a measurement; run alone with --ignored --nocapture"]
fn measure_cost_and_lookup() {
    if !root() {
        return;
    }
    const N: usize = 2000;
    const ROUNDS: usize = 5;
    let ns = netns();
    let script = Script::new();
    connects(&ns, 200); // warm up
    // Rounds without and with a capture, alternating; the fastest of each counts.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(connects(&ns, N));
        let capture = capture();
        with.push(connects(&ns, N));
        drop(capture);
    }
    let (base, cost) = (without.iter().min().unwrap(), with.iter().min().unwrap());
    eprintln!(
        "owner_bpf_live: {N} TCP connects+accepts, fastest of {ROUNDS}: without capture {base:?}, with {cost:?}: \
         {:.3}x, {:.2} us more per connect (all rounds: without {without:?}, with {with:?})",
        cost.as_secs_f64() / base.as_secs_f64(),
        (cost.as_secs_f64() - base.as_secs_f64()) * 1e6 / N as f64
    );

    // What the programs themselves cost: the kernel's run-time statistics (on while the returned
    // descriptor is open).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let capture = self::capture();
    let took = connects(&ns, N);
    let mut total = std::time::Duration::ZERO;
    for info in aya::programs::loaded_programs().flatten() {
        let name = info.name_as_str().unwrap_or_default().to_string();
        if name.starts_with("fg_") && info.run_count() > 0 {
            // Other captures' programs have the same names: these counts are all of them.
            eprintln!("owner_bpf_live:   {name}: {} runs, {:?}", info.run_count(), info.run_time());
            total += info.run_time();
        }
    }
    drop(stats);
    eprintln!(
        "owner_bpf_live: in the BPF programs: {total:?} for {N} connects+accepts ({took:?}): {:.2} us per connect",
        total.as_secs_f64() * 1e6 / N as f64
    );

    let made = run_child(&ns, &script, "udp-sendto", "198.51.100.1", 53);
    let remote = SocketAddr::from(([198, 51, 100, 1], 53));
    assert!(capture.outbound(UDP, any_local(made.port), remote).is_some());
    const LOOKUPS: u32 = 100_000;
    let start = Instant::now();
    for _ in 0..LOOKUPS {
        std::hint::black_box(capture.outbound(UDP, any_local(made.port), remote));
    }
    let hit = start.elapsed() / LOOKUPS;
    let start = Instant::now();
    for _ in 0..LOOKUPS {
        std::hint::black_box(capture.outbound(UDP, any_local(made.port.wrapping_add(1)), remote));
    }
    let miss = start.elapsed() / LOOKUPS;
    let start = Instant::now();
    for _ in 0..LOOKUPS {
        std::hint::black_box(capture.process(made.pid));
    }
    let process = start.elapsed() / LOOKUPS;
    eprintln!("owner_bpf_live: outbound() found {hit:?}, not found {miss:?}; process() {process:?}");
    let start = Instant::now();
    let again = self::capture();
    eprintln!("owner_bpf_live: start() took {:?}", start.elapsed());
    drop(again);
}
