//! Self-tests of the network-namespace lab (`tests/lab/mod.rs`): the topology really carries
//! forwarded, local and tunnelled traffic, the helpers behave, and nothing is left behind.
//! They need root; as another user each test prints why it is skipped and passes, except under
//! CI (`CI` set), where a test that cannot run fails.

mod lab;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use lab::*;

fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    // Skipped is not passed: under CI a test that cannot run fails.
    assert!(std::env::var_os("CI").is_none(), "{test}: the network-namespace lab needs root, and CI is set");
    eprintln!("skipping {test}: the network-namespace lab needs root");
    false
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Connects from inside `ns` to a TCP echo server at `dst`, sends `len` bytes (writer thread,
/// so large transfers cannot deadlock), half-closes, reads everything back and compares.
/// Returns the client's local address.
fn tcp_echo_roundtrip(ns: &Netns, dst: SocketAddr, len: usize) -> SocketAddr {
    ns.in_ns(move || {
        let s =
            TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let local = s.local_addr().unwrap();
        let data = pattern(len, 7);
        let mut w = s.try_clone().unwrap();
        let expected = data.clone();
        let writer = thread::spawn(move || {
            w.write_all(&data).expect("write");
            w.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut got = Vec::with_capacity(len);
        (&s).read_to_end(&mut got).unwrap_or_else(|e| panic!("read from {dst}: {e} after {} bytes", got.len()));
        writer.join().expect("writer");
        assert_eq!(got.len(), expected.len(), "echo length from {dst}");
        assert!(got == expected, "echo content from {dst} differs");
        local
    })
}

/// Sends `count` datagrams of `len` bytes from inside `ns` to a UDP echo at `dst` (connected
/// socket) and checks each comes back.
fn udp_echo_roundtrip(ns: &Netns, dst: SocketAddr, len: usize, count: usize) {
    ns.in_ns(move || {
        let bind: SocketAddr = if dst.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let s = UdpSocket::bind(bind).unwrap();
        s.connect(dst).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 65536];
        for i in 0..count {
            let msg = pattern(len, i as u8);
            s.send(&msg).unwrap_or_else(|e| panic!("send to {dst}: {e}"));
            let n = s.recv(&mut buf).unwrap_or_else(|e| panic!("no UDP echo from {dst} (datagram {i}): {e}"));
            assert_eq!(&buf[..n], &msg[..], "UDP echo from {dst}");
        }
    })
}

fn threads_named(names: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(comm) = std::fs::read_to_string(t.path().join("comm")) {
            let comm = comm.trim().to_string();
            if names.contains(&comm) {
                found.push(comm);
            }
        }
    }
    found
}

fn netns_list() -> String {
    let o = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn listed(list: &str, name: &str) -> bool {
    list.lines().any(|l| l.split_whitespace().next() == Some(name))
}

/// Command lines of all processes on the system that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !cmd.contains("lab_selftest") {
                found.push(format!("{}: {cmd}", p.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn process_gone_or_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) STATE ..." — comm may contain spaces, so look after the last ')'.
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn forwarded_tcp_echo_v4_and_v6() {
    if !root_or_skip("forwarded_tcp_echo_v4_and_v6") {
        return;
    }
    let lab = Lab::new("fwd");
    let e4 = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
    let e6 = tcp_echo(&lab.srv, sa(SRV_SERVICE_V6, 7));
    assert_eq!(e4.addr, "203.0.113.10:7".parse().unwrap());
    assert_eq!(e6.addr, "[2001:db8:2::10]:7".parse().unwrap());

    let local = tcp_echo_roundtrip(&lab.cli, e4.addr, 100);
    assert_eq!(local.ip(), CLI_V4, "IPv4 client source (no NAT on the host)");
    let local = tcp_echo_roundtrip(&lab.cli, e6.addr, 100);
    assert_eq!(local.ip(), CLI_V6, "IPv6 client source");
    // Bigger transfers (many segments, full-size packets) both ways.
    tcp_echo_roundtrip(&lab.cli, e4.addr, 1 << 20);
    tcp_echo_roundtrip(&lab.cli, e6.addr, 1 << 20);
    assert_eq!(e4.connections(), 2);
    assert_eq!(e6.connections(), 2);
    assert_eq!(e4.bytes(), 100 + (1 << 20));

    // The bytes were forwarded by host: its cli-side veth received them (count bytes, not
    // packets: veth does GRO/TSO, so 1 MiB can be a handful of 64 KiB super-packets).
    assert!(lab.host.iface_counter("veth0", "rx_bytes") > 2 << 20);
    assert!(lab.host.iface_counter("veth1", "tx_bytes") > 2 << 20);
    let route = lab.cli.ip(&["route", "get", "203.0.113.10"]);
    assert!(route.contains("via 198.18.0.1 dev veth0"), "cli route: {route}");
}

#[test]
fn concurrent_connections_to_echo() {
    if !root_or_skip("concurrent_connections_to_echo") {
        return;
    }
    let lab = Lab::new("conc");
    let echo = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
    let addr = echo.addr;
    // All connections open at the same time, then each exchanges data.
    lab.cli.in_ns(move || {
        let conns: Vec<TcpStream> =
            (0..32).map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect")).collect();
        for (i, mut c) in conns.iter().enumerate() {
            c.write_all(format!("hello {i:03}").as_bytes()).unwrap();
        }
        for (i, mut c) in conns.iter().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 9];
            c.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, format!("hello {i:03}").as_bytes());
        }
    });
    assert_eq!(echo.connections(), 32);
}

#[test]
fn host_local_tcp_and_udp_echo() {
    if !root_or_skip("host_local_tcp_and_udp_echo") {
        return;
    }
    let lab = Lab::new("local");
    let t4 = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
    let u4 = udp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
    let u6 = udp_echo(&lab.srv, sa(SRV_SERVICE_V6, 7));
    let local = tcp_echo_roundtrip(&lab.host, t4.addr, 64 * 1024);
    assert_eq!(local.ip(), HOST_SRV_SIDE_V4);
    udp_echo_roundtrip(&lab.host, u4.addr, 512, 10);
    udp_echo_roundtrip(&lab.host, u6.addr, 512, 10);
    // Forwarded UDP too.
    udp_echo_roundtrip(&lab.cli, u4.addr, 1200, 5);
    assert_eq!(u4.packets(), 15);
    assert_eq!(u6.packets(), 10);
}

#[test]
fn tunnel_carries_traffic() {
    if !root_or_skip("tunnel_carries_traffic") {
        return;
    }
    let lab = Lab::new("tun");
    let route = lab.host.ip(&["route", "get", "192.0.2.2"]);
    assert!(route.contains("dev tun0"), "host route to 192.0.2.2: {route}");
    let mtu = lab.host.run_ok(&["cat", "/sys/class/net/tun0/mtu"]);
    assert_eq!(mtu.trim(), "1400");

    let e4 = tcp_echo(&lab.srv, sa(SRV_TUN_V4, 7));
    let e6 = tcp_echo(&lab.srv, sa(SRV_TUN_V6, 7));
    let u4 = udp_echo(&lab.srv, sa(SRV_TUN_V4, 7));

    let tx_before = lab.host.iface_counter("tun0", "tx_packets");
    let srv_rx_before = lab.srv.iface_counter("tun0", "rx_packets");
    let udp_before = lab.host.iface_counter("veth1", "tx_packets");
    let local = tcp_echo_roundtrip(&lab.host, e4.addr, 256 * 1024);
    assert_eq!(local.ip(), HOST_TUN_V4);
    let tx_after = lab.host.iface_counter("tun0", "tx_packets");
    let srv_rx_after = lab.srv.iface_counter("tun0", "rx_packets");
    // 256 KiB at MSS 1360 is ~190 data segments, plus handshake and teardown.
    assert!(tx_after - tx_before >= 190, "host tun0 tx_packets {tx_before} -> {tx_after}");
    assert!(srv_rx_after - srv_rx_before >= 190, "srv tun0 rx_packets {srv_rx_before} -> {srv_rx_after}");
    assert!(lab.host.iface_counter("veth1", "tx_packets") - udp_before >= 190, "UDP carrier on veth1");
    let (encap, _) = lab.tunnel_host_stats();
    let (_, decap) = lab.tunnel_srv_stats();
    assert!(encap >= 190 && decap >= 190, "forwarder counters: host encap {encap}, srv decap {decap}");

    // IPv6 inside the tunnel.
    let tx_before = lab.host.iface_counter("tun0", "tx_packets");
    let local = tcp_echo_roundtrip(&lab.host, e6.addr, 64 * 1024);
    assert_eq!(local.ip(), HOST_TUN_V6);
    assert!(lab.host.iface_counter("tun0", "tx_packets") - tx_before >= 40);

    // Datagrams just under the tunnel MTU (1400 - 28) cross unfragmented.
    let tx_before = lab.host.iface_counter("tun0", "tx_packets");
    udp_echo_roundtrip(&lab.host, u4.addr, 1372, 5);
    // (Fragments would double the count; a late ACK of the TCP test above may add one.)
    let sent = lab.host.iface_counter("tun0", "tx_packets") - tx_before;
    assert!((5..10).contains(&sent), "{sent} packets for 5 datagrams");
}

#[test]
fn cleanup_after_drop() {
    if !root_or_skip("cleanup_after_drop") {
        return;
    }
    let lab = Lab::new("clean");
    let names: Vec<String> = lab.namespaces().iter().map(|n| n.name.clone()).collect();
    let threads: Vec<String> = lab.tunnel_thread_names().to_vec();
    let list = netns_list();
    for n in &names {
        assert!(listed(&list, n), "{n} not in `ip netns list`:\n{list}");
    }
    assert_eq!(threads_named(&threads).len(), 2, "tunnel threads {threads:?} running");
    let echo = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
    tcp_echo_roundtrip(&lab.cli, echo.addr, 10);

    // A guarded child is terminated by its guard ...
    let child = lab.host.spawn(&["sleep", "1000"]);
    let guarded = child.pid();
    assert!(lab.host.pids().contains(&guarded), "spawned process is inside the host namespace");
    // ... and an unguarded one (guard leaked) is SIGKILLed when the namespace is deleted.
    let leaked = lab.srv.spawn(&["sleep", "1000"]);
    let leaked_pid = leaked.pid();
    let leaked_log = leaked.log_path.clone();
    std::mem::forget(leaked);
    // Its exit is awaited through a pidfd (readable once it has exited): the kill that deleting
    // the namespace sends takes effect asynchronously.
    // SAFETY: plain syscall; the pid is our unreaped child, so it cannot be reused.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, leaked_pid, 0) };
    assert!(raw >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd returned by pidfd_open, owned by nobody else.
    let leaked_fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw as i32) };

    drop(child);
    assert!(process_gone_or_zombie(guarded), "guarded child {guarded} still running");
    drop(echo);
    drop(lab);

    let list = netns_list();
    for n in &names {
        assert!(!listed(&list, n), "{n} still in `ip netns list`:\n{list}");
        assert!(!std::path::Path::new("/run/netns").join(n).exists());
        let procs = processes_mentioning(n);
        assert!(procs.is_empty(), "processes still mention {n}: {procs:?}");
    }
    assert!(threads_named(&threads).is_empty(), "tunnel threads survived the lab");
    // The tunnel is in-process, but make sure no socat (or other helper) of this lab exists.
    let socats: Vec<String> =
        processes_mentioning("socat").into_iter().filter(|p| names.iter().any(|n| p.contains(n))).collect();
    assert!(socats.is_empty(), "{socats:?}");
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&leaked_fd), nix::poll::PollFlags::POLLIN)];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16));
    assert!(process_gone_or_zombie(leaked_pid), "leaked child {leaked_pid} survived its namespace");
    // Reap the leaked child ourselves (its guard was forgotten).
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(leaked_pid), None);
    let _ = std::fs::remove_file(leaked_log);
}

#[test]
fn cleanup_after_panic() {
    if !root_or_skip("cleanup_after_panic") {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new("panic");
        let names: Vec<String> = lab.namespaces().iter().map(|n| n.name.clone()).collect();
        let _echo = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
        let _child = lab.host.spawn(&["sleep", "1000"]);
        std::panic::panic_any(names);
    });
    let names = *result.expect_err("closure panics").downcast::<Vec<String>>().expect("payload");
    let list = netns_list();
    for n in &names {
        assert!(!listed(&list, n), "{n} survived a panic:\n{list}");
    }
}

#[test]
fn two_labs_at_once() {
    if !root_or_skip("two_labs_at_once") {
        return;
    }
    // Built concurrently from two threads, alive at the same time, same interface names.
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| Lab::new("twinA"));
        let b = s.spawn(|| Lab::new("twinB"));
        (a.join().unwrap(), b.join().unwrap())
    });
    for (x, y) in a.namespaces().iter().zip(b.namespaces()) {
        assert_ne!(x.name, y.name);
    }
    let ea = tcp_echo(&a.srv, sa(SRV_SERVICE_V4, 7));
    let eb = tcp_echo(&b.srv, sa(SRV_SERVICE_V4, 7));
    let ta = tcp_echo(&a.srv, sa(SRV_TUN_V4, 7));
    let tb = tcp_echo(&b.srv, sa(SRV_TUN_V4, 7));
    thread::scope(|s| {
        s.spawn(|| tcp_echo_roundtrip(&a.cli, ea.addr, 200_000));
        s.spawn(|| tcp_echo_roundtrip(&b.cli, eb.addr, 200_000));
        s.spawn(|| tcp_echo_roundtrip(&a.host, ta.addr, 50_000));
        s.spawn(|| tcp_echo_roundtrip(&b.host, tb.addr, 50_000));
    });
    // Each lab's traffic stayed in that lab.
    assert_eq!((ea.connections(), eb.connections(), ta.connections(), tb.connections()), (1, 1, 1, 1));
    assert_eq!(ea.bytes(), 200_000);
    assert_eq!(eb.bytes(), 200_000);
}

#[test]
fn namespace_settings() {
    if !root_or_skip("namespace_settings") {
        return;
    }
    let lab = Lab::new("sysctl");
    for ns in lab.namespaces() {
        for dev in ["all", "default", "veth0"] {
            let ra = ns.run_ok(&["cat", &format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra")]);
            assert_eq!(ra.trim(), "0", "{}: {dev} accept_ra", ns.name);
            let rs = ns.run_ok(&["cat", &format!("/proc/sys/net/ipv6/conf/{dev}/router_solicitations")]);
            assert_eq!(rs.trim(), "0", "{}: {dev} router_solicitations", ns.name);
        }
        let lo = ns.ip(&["-o", "link", "show", "lo"]);
        assert!(lo.contains("UP"), "{}: lo {lo}", ns.name);
        let addrs = ns.ip(&["-6", "-o", "addr", "show", "scope", "global"]);
        assert!(!addrs.contains("tentative"), "{}: {addrs}", ns.name);
    }
    assert_eq!(lab.host.run_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    assert_eq!(lab.host.run_ok(&["cat", "/proc/sys/net/ipv6/conf/all/forwarding"]).trim(), "1");
    assert_eq!(lab.cli.run_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(), "0");
    // No veth or tun of the lab appeared in the root namespace.
    let links = String::from_utf8_lossy(&Command::new("ip").args(["-o", "link"]).output().unwrap().stdout).into_owned();
    for ns in lab.namespaces() {
        assert!(!links.contains(&ns.name), "root namespace link mentions {}: {links}", ns.name);
    }
}

#[test]
fn child_guard_and_wait_helpers() {
    if !root_or_skip("child_guard_and_wait_helpers") {
        return;
    }
    let lab = Lab::new("child");

    // A process ignoring SIGTERM is SIGKILLed after the (shortened) bounded wait.
    let mut stubborn = lab.host.spawn(&["sh", "-c", "trap '' TERM; echo ready; exec sleep 1000"]);
    stubborn.set_term_timeout(Duration::from_millis(300));
    let pid = stubborn.pid();
    let t = Instant::now();
    drop(stubborn);
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(process_gone_or_zombie(pid));

    // signal(), wait_timeout() and the log.
    let mut c =
        lab.host.spawn(&["sh", "-c", "echo started; trap 'echo got-hup; exit 3' HUP; while :; do sleep 1; done"]);
    wait_for_log(&c, "started");
    c.signal(Signal::SIGHUP);
    let st = c.wait_timeout(Duration::from_secs(5)).expect("exits on SIGHUP");
    assert_eq!(st.code(), Some(3));
    assert!(c.log().contains("got-hup"), "log: {}", c.log());
    assert!(!c.is_running());
    drop(c);

    // wait_tcp_listening / wait_listed against an external listener process.
    if Command::new("socat").arg("-V").output().is_err() {
        eprintln!("socat not installed: skipping the external-listener part");
        return;
    }
    let tcp = sa(SRV_SERVICE_V4, 9000);
    let udp = sa(SRV_SERVICE_V6, 9001);
    let _t = lab.srv.spawn(&["socat", "TCP-LISTEN:9000,bind=203.0.113.10,reuseaddr,fork", "EXEC:cat"]);
    let _u = lab.srv.spawn(&["socat", "-T", "5", "UDP6-RECVFROM:9001,bind=[2001:db8:2::10],fork", "EXEC:cat"]);
    wait_listed(&lab.srv, Proto::Tcp, tcp);
    wait_tcp_listening(&lab.cli, tcp);
    tcp_echo_roundtrip(&lab.cli, tcp, 5000);
    wait_listed(&lab.srv, Proto::Udp, udp);
    udp_echo_roundtrip(&lab.cli, udp, 100, 1);
}

fn wait_for_log(c: &Child, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.log().contains(needle) {
        assert!(Instant::now() < deadline, "{needle:?} never appeared in the log: {}", c.log());
        thread::sleep(Duration::from_millis(10)); // bounded polling of a file
    }
}

#[test]
fn server_stops_with_open_connections_and_sink_counts() {
    if !root_or_skip("server_stops_with_open_connections_and_sink_counts") {
        return;
    }
    let lab = Lab::new("stop");
    let sink = tcp_sink(&lab.srv, sa(SRV_SERVICE_V6, 9));
    let addr = sink.addr;
    let sent = 8usize << 20;
    let reply = lab.cli.in_ns(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = pattern(64 * 1024, 1);
        for _ in 0..sent / chunk.len() {
            s.write_all(&chunk).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    });
    assert_eq!(reply, format!("{sent}\n"));
    assert_eq!(sink.bytes(), sent as u64);

    // An idle open connection (and one blocked on a full send buffer) must not delay the stop.
    let echo = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));
    let addr = echo.addr;
    let (idle, stuffed) = lab.cli.in_ns(move || {
        let connect = || {
            // One echoed byte proves the server has accepted the connection.
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).unwrap();
            c
        };
        let idle = connect();
        let mut stuffed = connect();
        // Never read: the echo's writes eventually block on a full window.
        stuffed.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while stuffed.write_all(&chunk).is_ok() {}
        (idle, stuffed)
    });
    assert_eq!(echo.connections(), 2);
    let t = Instant::now();
    drop(echo);
    assert!(t.elapsed() < Duration::from_secs(2), "stop took {:?}", t.elapsed());
    // The listener is closed: new connections are refused.
    let refused = lab.cli.in_ns(move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_err());
    assert!(refused);
    drop((idle, stuffed));
}

#[test]
fn in_ns_propagates_panics_and_namespaces_isolate() {
    if !root_or_skip("in_ns_propagates_panics_and_namespaces_isolate") {
        return;
    }
    let ns = Netns::new("bare");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.in_ns(|| panic!("boom inside"))));
    let msg = r.expect_err("panics").downcast::<&str>().map(|s| s.to_string()).unwrap_or_default();
    assert_eq!(msg, "boom inside");
    // A bare namespace has only lo (down until setup_basics), and no route anywhere.
    let links = ns.ip(&["-o", "link"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    ns.setup_basics(false);
    let unreachable = ns.in_ns(|| TcpStream::connect_timeout(&sa(SRV_SERVICE_V4, 7), Duration::from_secs(1)).is_err());
    assert!(unreachable);
}
