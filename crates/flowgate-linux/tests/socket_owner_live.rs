//! socket_owner and procinfo against the running kernel, as root: a python3 child started in a
//! network namespace of the test's own (`fgso-<pid>-<n>`, deleted at the end even when the test
//! fails) holds a TCP connection, an unconnected UDP socket that has sent a datagram, a connected
//! UDP socket (IPv6) and a TCP listener, all on the namespace's loopback with documentation
//! addresses; the test finds each socket's process from the flow's ends, and reads the process.
//! The child runs as root, or as nobody (65534).
//!
//! Also measured (printed; `cargo test --release -- --nocapture` shows them): a warm lookup, and
//! a full scan of `/proc` with the host's processes and with some 9,000 more socket links.
//!
//! Without root the tests say so and pass.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use flowgate_linux::procinfo::{self, Users};
use flowgate_linux::sockdiag::{TCP, UDP};
use flowgate_linux::socket_owner::{SocketOwner, SocketOwners};

mod common;
use common::{Netns, root};

const PYTHON: &str = "/usr/bin/python3";

/// The child: sockets as the module doc says; prints its pid, uid, the ends and inodes, then
/// waits until its stdin closes.
const CHILD: &str = r#"
import os, socket, sys
tcp_to, udp_to, udp6_to, user = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if user == "nobody":
    os.setgid(65534); os.setuid(65534)
ino = lambda s: os.fstat(s.fileno()).st_ino
conn = socket.create_connection(("198.51.100.1", int(tcp_to)))
unconnected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
unconnected.sendto(b"hello", ("198.51.100.1", udp_to))
connected = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
connected.connect(("2001:db8::1", udp6_to))
connected.send(b"hi")
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.bind(("0.0.0.0", 0)); listener.listen(8)
print(os.getpid(), os.getuid(), conn.getsockname()[1], ino(conn), unconnected.getsockname()[1], ino(unconnected),
      connected.getsockname()[1], ino(connected), listener.getsockname()[1], ino(listener), flush=True)
sys.stdin.read()
"#;

/// A namespace of its own with loopback up and documentation addresses on it.
fn netns() -> Netns {
    let ns = Netns::new("fgso");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns.exec(&["ip", "addr", "add", "198.51.100.1/24", "dev", "lo"]);
    ns.exec(&["ip", "addr", "add", "2001:db8::1/64", "dev", "lo", "nodad"]);
    ns
}

/// What the child printed.
struct Report {
    pid: u32,
    uid: u32,
    tcp: (u16, u32),
    unconnected: (u16, u32),
    connected: (u16, u32),
    listener: (u16, u32),
}

/// The child, killed and reaped when dropped.
struct Python {
    child: Child,
    _stdin: ChildStdin,
    report: Report,
}

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_child(user: &str, tcp_to: u16, udp_to: u16, udp6_to: u16) -> Python {
    let mut child = Command::new(PYTHON)
        .args(["-c", CHILD, &tcp_to.to_string(), &udp_to.to_string(), &udp6_to.to_string(), user])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {PYTHON}: {e}"));
    let stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("the child's report");
    let n: Vec<u32> = line.split_whitespace().map(|w| w.parse().unwrap_or_else(|_| panic!("{line:?}"))).collect();
    assert_eq!(n.len(), 10, "the child said {line:?}");
    let port = |i: usize| u16::try_from(n[i]).unwrap();
    let report = Report {
        pid: n[0],
        uid: n[1],
        tcp: (port(2), n[3]),
        unconnected: (port(4), n[5]),
        connected: (port(6), n[7]),
        listener: (port(8), n[9]),
    };
    Python { child, _stdin: stdin, report }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn check(
    owners: &mut SocketOwners,
    what: &str,
    protocol: u8,
    local: SocketAddr,
    remote: SocketAddr,
    want: SocketOwner,
) {
    let got = owners.lookup(protocol, local, remote).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got, Some(want), "{what}: {local} -> {remote}");
}

/// Runs the four cases with a child as `user` (root or nobody).
fn attribute(user: &str) {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let tcp_server = TcpListener::bind("198.51.100.1:0").unwrap();
        let udp_server = UdpSocket::bind("198.51.100.1:0").unwrap();
        let udp6_server = UdpSocket::bind("[2001:db8::1]:0").unwrap();
        let (tcp_port, udp_port, udp6_port) = (
            tcp_server.local_addr().unwrap().port(),
            udp_server.local_addr().unwrap().port(),
            udp6_server.local_addr().unwrap().port(),
        );
        let python = start_child(user, tcp_port, udp_port, udp6_port);
        let r = &python.report;
        let (_accepted, _) = tcp_server.accept().unwrap();
        let mut buf = [0u8; 16];
        let (_, from) = udp_server.recv_from(&mut buf).unwrap();
        let (_, from6) = udp6_server.recv_from(&mut buf).unwrap();
        assert_eq!((from.port(), from6.port()), (r.unconnected.0, r.connected.0));
        let want_uid = if user == "nobody" { 65534 } else { 0 };
        assert_eq!(r.uid, want_uid);

        let mut owners = SocketOwners::new().expect("SocketOwners::new");
        let owner = |inode| SocketOwner { inode, uid: want_uid, pid: Some(r.pid) };
        let here = |port| SocketAddr::new(addr("198.51.100.1:0").ip(), port);
        // (a) The TCP connection, outbound from the child.
        check(&mut owners, "TCP connection", TCP, here(r.tcp.0), here(tcp_port), owner(r.tcp.1));
        // (b) The unconnected UDP socket, by the datagram it sent, and by any other remote end.
        check(&mut owners, "unconnected UDP", UDP, from, here(udp_port), owner(r.unconnected.1));
        check(&mut owners, "unconnected UDP, other peer", UDP, from, addr("203.0.113.9:53"), owner(r.unconnected.1));
        // (c) The connected UDP socket, IPv6.
        check(&mut owners, "connected UDP6", UDP, from6, SocketAddr::new(from6.ip(), udp6_port), owner(r.connected.1));
        // (d) The listener: a SYN not yet answered (no connection at all), then a connection
        // waiting in the accept queue (a socket without a file).
        let listen = here(r.listener.0);
        check(&mut owners, "listener, new SYN", TCP, listen, addr("203.0.113.7:40000"), owner(r.listener.1));
        let queued = TcpStream::connect(listen).unwrap();
        check(&mut owners, "listener, accept queue", TCP, listen, queued.local_addr().unwrap(), owner(r.listener.1));
        // Not the child's: the test's own end of the accepted connection, and nothing at all.
        let ours = owners.lookup(TCP, here(tcp_port), here(r.tcp.0)).unwrap().expect("the test's socket");
        assert_eq!(ours.pid, Some(std::process::id()));
        assert_eq!(owners.lookup(UDP, here(9), addr("203.0.113.9:53")).unwrap(), None);
        assert_eq!(owners.lookup(TCP, here(9), addr("203.0.113.9:53")).unwrap(), None);

        // The process.
        let p = procinfo::read_process(r.pid).expect("read_process");
        let python_exe = std::fs::canonicalize(PYTHON).unwrap();
        assert_eq!(p.exe.as_deref().map(Path::new), Some(python_exe.as_path()));
        assert_eq!((p.pid, p.ppid, p.uid, p.gid), (r.pid, std::process::id(), want_uid, want_uid));
        assert_eq!(&p.cmdline[..2], [PYTHON, "-c"]);
        assert_eq!(p.cmdline.last().map(String::as_str), Some(user));
        assert!(p.comm.starts_with("python3"), "{p:?}");
        assert!(p.start_ticks > 0);
        let own_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        assert_eq!(p.cgroup, procinfo::cgroup_path(&own_cgroup), "the child's cgroup is the test's");
        let parents = procinfo::parents(r.pid, 64);
        assert_eq!(parents.first().map(|p| p.0), Some(std::process::id()));
        assert_eq!(parents.last().map(|p| p.0), Some(1), "{parents:?}");
        let mut users = Users::new();
        assert_eq!(users.name(want_uid).as_deref(), Some(if user == "nobody" { "nobody" } else { "root" }));
        assert_eq!(users.uid("nobody"), Some(65534));
        eprintln!(
            "socket_owner_live: {user}: pid {} exe {:?} cgroup {:?} unit {:?} start {} parents {parents:?}",
            p.pid,
            p.exe,
            p.cgroup,
            p.cgroup.as_deref().and_then(procinfo::unit_of),
            p.start_ticks
        );

        // Warm lookups: the socket's lookup by ends and the index's check.
        let n = 2000;
        let start = Instant::now();
        for _ in 0..n {
            let got = owners.lookup(TCP, here(r.tcp.0), here(tcp_port)).unwrap();
            assert_eq!(got.and_then(|o| o.pid), Some(r.pid));
        }
        let udp_start = Instant::now();
        for _ in 0..n {
            assert!(owners.lookup(UDP, from, here(udp_port)).unwrap().is_some());
        }
        let (tcp_took, udp_took) = (udp_start - start, udp_start.elapsed());
        eprintln!(
            "socket_owner_live: warm lookup: TCP connection {:?}, unconnected UDP {:?} (mean of {n})",
            tcp_took / n,
            udp_took / n
        );
        drop(queued);
    });
}

#[test]
fn finds_the_process_of_each_kind_of_socket() {
    attribute("root");
}

#[test]
fn a_non_root_child_is_found_with_its_uid() {
    attribute("nobody");
}

/// How long a scan of `/proc` takes with this host's processes, and with some 9,000 more
/// socket links in ten more processes.
#[test]
fn scan_cost() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let mut owners = SocketOwners::new().expect("SocketOwners::new");
        let best_of = |owners: &mut SocketOwners| (0..5).map(|_| owners.rescan()).min_by_key(|s| s.took).unwrap();
        let host = best_of(&mut owners);
        eprintln!("socket_owner_live: scan of this host: {host:?}");

        let holders: Vec<(Child, ChildStdin)> = (0..10)
            .map(|_| {
                let script = "import socket, sys\n\
                              s = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(900)]\n\
                              print('ready', flush=True)\nsys.stdin.read()\n";
                let mut child = Command::new(PYTHON)
                    .args(["-c", script])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
                assert_eq!(line.trim(), "ready");
                let stdin = child.stdin.take().unwrap();
                (child, stdin)
            })
            .collect();
        let busy = best_of(&mut owners);
        eprintln!("socket_owner_live: scan with 9,000 more sockets: {busy:?}");
        assert!(busy.sockets >= 9000, "{busy:?}");
        for (mut child, stdin) in holders {
            drop(stdin);
            let _ = child.wait();
        }
        // The rate limit: a miss right after a scan does not scan again.
        let before = owners.rescan();
        let before = owners.last_scan().filter(|s| *s == before).unwrap();
        assert_eq!(owners.pid_of(u32::MAX), None);
        assert_eq!(owners.last_scan(), Some(before));
        std::thread::sleep(Duration::from_millis(60).max(before.took * 10));
        assert_eq!(owners.pid_of(u32::MAX), None);
        assert_ne!(owners.last_scan(), Some(before), "a miss after the interval scans");
    });
}
