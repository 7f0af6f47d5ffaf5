//! The sockdiag module against the running kernel, as root, each test in a network namespace of
//! its own (`fgsd-<pid>-<n>`, deleted at the end even when the test fails). The sockets are made
//! on a thread that entered the namespace, over its loopback, so a dump there sees only them.
//!
//! Without root the tests say so and pass. The time from a destroy to the program's error is
//! printed (`cargo test -- --nocapture` shows it).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flowgate_linux::sockdiag::{DiagError, SockDiag, SocketInfo, TCP, UDP, state};

mod common;
use common::{Netns, root};

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);
/// What "at once" means here: the abort is synchronous in the kernel, so the blocked call returns
/// as soon as its thread is scheduled; a second leaves room for a loaded CI machine.
const PROMPT: Duration = Duration::from_secs(1);

/// A namespace of its own (`fgsd-<pid>-<n>`) with loopback up.
fn netns() -> Netns {
    let ns = Netns::new("fgsd");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns
}

/// A connected TCP pair to a listener on `listen`, connecting to `connect_ip`: (client, server).
fn tcp_pair(listen: SocketAddr, connect_ip: IpAddr) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(listen).unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect(SocketAddr::new(connect_ip, port)).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn all_sockets(diag: &mut SockDiag, protocol: u8, states: u32) -> Vec<SocketInfo> {
    let mut all = Vec::new();
    diag.dump(protocol, states, |s| all.push(*s)).expect("dump");
    all
}

/// The one socket with these ends, from a fresh dump.
fn find(diag: &mut SockDiag, protocol: u8, local: SocketAddr, remote: SocketAddr) -> SocketInfo {
    let states = if protocol == TCP { state::TCP_CONNECTIONS } else { state::UDP_ALL };
    let all = all_sockets(diag, protocol, states);
    let found: Vec<&SocketInfo> = all.iter().filter(|s| s.local == local && s.remote == remote).collect();
    assert_eq!(found.len(), 1, "{local} -> {remote} in {all:#?}");
    *found[0]
}

fn inode(fd: impl AsFd) -> u32 {
    nix::sys::stat::fstat(fd).expect("fstat").st_ino as u32
}

/// Runs `cut` while `call` is blocked on another thread, and checks that the call then fails at
/// once with ECONNABORTED. Prints how long `cut` took and how long after its start the call
/// returned.
fn cut_while_blocked<T: std::fmt::Debug + Send + 'static>(
    what: &str,
    call: impl FnOnce() -> io::Result<T> + Send + 'static,
    cut: impl FnOnce(),
) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = call();
        let _ = tx.send((r, Instant::now()));
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(rx.try_recv().is_err(), "{what}: the call did not block");
    let start = Instant::now();
    cut();
    let took = start.elapsed();
    let (r, at) = rx.recv_timeout(PROMPT).unwrap_or_else(|_| panic!("{what}: the blocked call did not return"));
    let after = at.duration_since(start);
    eprintln!("sockdiag_live: {what}: the destroy took {took:?}; the blocked call returned {r:?} after {after:?}");
    assert_eq!(errno(&r), Some(libc::ECONNABORTED), "{what}: {r:?}");
}

/// Runs `f` with a sock_diag socket, on a thread in a namespace of its own. Without root, says so
/// and does nothing.
fn in_namespace(f: impl FnOnce(&mut SockDiag) + Send) {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| f(&mut SockDiag::open().expect("open")));
}

fn assert_not_found(what: &str, r: Result<(), DiagError>) {
    eprintln!("sockdiag_live: {what}: {r:?}");
    assert!(matches!(r, Err(DiagError::NotFound)), "{what}: {r:?}");
}

fn errno<T: std::fmt::Debug>(r: &io::Result<T>) -> Option<i32> {
    r.as_ref().err().and_then(io::Error::raw_os_error)
}

#[test]
fn dump_finds_both_ends_of_tcp_connections_and_udp_sockets() {
    in_namespace(|diag| {
        let mut keep = Vec::new();
        for ip in [LO4, LO6] {
            let (client, server) = tcp_pair(SocketAddr::new(ip, 0), ip);
            let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
            let (on_client, on_server) = (find(diag, TCP, c, s), find(diag, TCP, s, c));
            for (got, stream) in [(on_client, &client), (on_server, &server)] {
                assert_eq!(got.protocol, TCP);
                assert_eq!(got.state, state::ESTABLISHED);
                assert_eq!(got.inode, inode(stream), "{got}");
                assert_eq!((got.uid, got.ifindex), (0, 0));
                assert_ne!(got.cookie, 0);
            }
            assert_ne!(on_client.cookie, on_server.cookie);
            keep.push((client, server));
        }
        // The listeners are closed; nothing else is open in the namespace.
        assert_eq!(all_sockets(diag, TCP, state::TCP_CONNECTIONS).len(), 4);
        assert!(all_sockets(diag, TCP, 1 << state::LISTEN).is_empty());

        let peer = UdpSocket::bind((LO4, 0)).unwrap();
        let connected = UdpSocket::bind((LO4, 0)).unwrap();
        connected.connect(peer.local_addr().unwrap()).unwrap();
        let got = find(diag, UDP, connected.local_addr().unwrap(), peer.local_addr().unwrap());
        assert_eq!((got.protocol, got.state, got.inode), (UDP, state::ESTABLISHED, inode(&connected)));
        let unconnected = find(diag, UDP, peer.local_addr().unwrap(), "0.0.0.0:0".parse().unwrap());
        assert_eq!((unconnected.state, unconnected.inode), (state::CLOSE, inode(&peer)));
        assert_eq!(all_sockets(diag, UDP, 1 << state::ESTABLISHED), vec![got]);
    });
}

#[test]
fn destroy_aborts_a_blocked_read_and_resets_the_peer() {
    in_namespace(|diag| {
        for ip in [LO4, LO6] {
            let (mut client, mut server) = tcp_pair(SocketAddr::new(ip, 0), ip);
            let target = find(diag, TCP, client.local_addr().unwrap(), server.local_addr().unwrap());
            let mut reader = client.try_clone().unwrap();
            cut_while_blocked(
                &format!("{ip} client read"),
                move || reader.read(&mut [0; 16]),
                || diag.destroy(&target).expect("destroy"),
            );

            server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let peer = server.read(&mut [0; 16]);
            let (again, write) = (client.read(&mut [0; 16]), client.write(b"x"));
            eprintln!(
                "sockdiag_live: {ip}: then the server's read: {peer:?}; the client's read: {again:?}, write: {write:?}"
            );
            assert_eq!(errno(&peer), Some(libc::ECONNRESET), "{peer:?}");
            // The error is reported once; after it the socket is closed both ways.
            assert_eq!(again.ok(), Some(0));
            assert_eq!(errno(&write), Some(libc::EPIPE), "{write:?}");
            assert!(!all_sockets(diag, TCP, u32::MAX).iter().any(|s| s.cookie == target.cookie));
        }
    });
}

#[test]
fn destroy_matching_aborts_a_pending_udp_recv() {
    in_namespace(|diag| {
        for ip in [LO4, LO6] {
            let peer = UdpSocket::bind((ip, 0)).unwrap();
            let app = UdpSocket::bind((ip, 0)).unwrap();
            app.connect(peer.local_addr().unwrap()).unwrap();
            let (local, remote) = (app.local_addr().unwrap(), peer.local_addr().unwrap());
            let receiver = app.try_clone().unwrap();
            cut_while_blocked(
                &format!("{ip} UDP recv"),
                move || receiver.recv(&mut [0; 16]),
                || assert_eq!(diag.destroy_matching(UDP, local, remote).expect("destroy_matching"), 1),
            );

            // The socket is disconnected, and since its port was the kernel's pick, unbound too:
            // it is out of the table, and a send without an address has nowhere to go.
            let after = all_sockets(diag, UDP, state::UDP_ALL);
            assert!(after.iter().all(|s| s.inode != inode(&app)), "{after:?}");
            let send = app.send(b"x");
            eprintln!("sockdiag_live: {ip}: then the app's send: {send:?}");
            assert_eq!(errno(&send), Some(libc::EDESTADDRREQ), "{send:?}");
            assert_eq!(diag.destroy_matching(UDP, local, remote).expect("destroy_matching"), 0);
        }
    });
}

#[test]
fn destroying_a_socket_that_is_gone_is_not_found() {
    in_namespace(|diag| {
        let listener = TcpListener::bind((LO4, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
        let (on_client, on_server) = (find(diag, TCP, c, s), find(diag, TCP, s, c));

        // A cookie that is not the socket's: the kernel refuses, and the connection lives on.
        let mut stale = on_client;
        stale.cookie ^= 1;
        assert_not_found("wrong cookie", diag.destroy(&stale));
        assert_eq!(find(diag, TCP, c, s), on_client);

        diag.destroy(&on_client).expect("destroy");
        assert_not_found("client socket again", diag.destroy(&on_client));
        // The reset closed the server's end too. Its addresses now lead the kernel's lookup to the
        // listener, which the cookie tells apart: not found, and the listener is left alone.
        assert_not_found("server socket after the peer's reset", diag.destroy(&on_server));
        assert!(all_sockets(diag, TCP, 1 << state::LISTEN).iter().any(|l| l.local == s), "the listener was hit");

        let udp = UdpSocket::bind((LO4, 0)).unwrap();
        let gone = find(diag, UDP, udp.local_addr().unwrap(), "0.0.0.0:0".parse().unwrap());
        drop(udp);
        assert_not_found("closed UDP socket", diag.destroy(&gone));
        drop((listener, client, server));
    });
}

#[test]
fn a_dual_stack_socket_shows_as_ipv4_and_can_be_destroyed() {
    in_namespace(|diag| {
        // Bound to [::] without IPV6_V6ONLY: the accepted socket is IPv6 with mapped addresses.
        let (mut client, mut server) = tcp_pair((Ipv6Addr::UNSPECIFIED, 0).into(), LO4);
        assert!(server.local_addr().unwrap().is_ipv6(), "std reports the mapped address");
        let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
        let s4 = SocketAddr::new(s.ip().to_canonical(), s.port());
        assert!(s4.is_ipv4());
        assert_eq!(find(diag, TCP, s4, c).inode, inode(&server));

        let mut reader = server.try_clone().unwrap();
        cut_while_blocked(
            "dual-stack server read",
            move || reader.read(&mut [0; 16]),
            || assert_eq!(diag.destroy_matching(TCP, s4, c).expect("destroy_matching"), 1),
        );
        client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (peer, write) = (client.read(&mut [0; 16]), server.write(b"x"));
        eprintln!("sockdiag_live: dual-stack: then the client's read: {peer:?}; the server's write: {write:?}");
        assert_eq!(errno(&peer), Some(libc::ECONNRESET), "{peer:?}");
        assert_eq!(errno(&write), Some(libc::EPIPE), "{write:?}");
    });
}

#[test]
fn destroy_matching_never_takes_a_listener_or_an_unconnected_socket_for_a_connection() {
    if !root() {
        return;
    }
    in_namespace(|diag| {
        // The kernel's lookup by ends falls back to a listening TCP socket or an unconnected
        // UDP socket on the local port when no connection matches: those must survive.
        let listener = TcpListener::bind((LO4, 0)).unwrap();
        let listen = listener.local_addr().unwrap();
        let ghost = SocketAddr::new(LO4, 40_999);
        assert_eq!(diag.destroy_matching(TCP, listen, ghost).expect("destroy_matching"), 0);
        let (_client, _server) = (TcpStream::connect(listen).unwrap(), listener.accept().unwrap());

        let server = UdpSocket::bind((LO4, 0)).unwrap();
        let bound = server.local_addr().unwrap();
        assert_eq!(diag.destroy_matching(UDP, bound, ghost).expect("destroy_matching"), 0);
        let client = UdpSocket::bind((LO4, 0)).unwrap();
        client.send_to(b"still there", bound).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(server.recv(&mut b).expect("the unconnected socket still receives"), 11);
    });
}

#[test]
fn find_looks_up_exact_ends_of_tcp_and_udp_sockets() {
    in_namespace(|diag| {
        for ip in [LO4, LO6] {
            let (client, server) = tcp_pair(SocketAddr::new(ip, 0), ip);
            let (c, s) = (client.local_addr().unwrap(), server.local_addr().unwrap());
            let got = diag.find(TCP, c, s, state::TCP_CONNECTIONS).expect("find").expect("the client socket");
            assert_eq!((got.local, got.remote, got.inode), (c, s, inode(&client)));
            assert_eq!(diag.find(TCP, c, s, 1 << state::LISTEN).expect("find"), None, "state filter");

            // UDP: the kernel's lookup reads the ends the other way round; find sees through it.
            let peer = UdpSocket::bind((ip, 0)).unwrap();
            let app = UdpSocket::bind((ip, 0)).unwrap();
            app.connect(peer.local_addr().unwrap()).unwrap();
            let (local, remote) = (app.local_addr().unwrap(), peer.local_addr().unwrap());
            let got = diag.find(UDP, local, remote, state::UDP_ALL).expect("find").expect("the connected socket");
            assert_eq!((got.local, got.remote, got.state, got.inode), (local, remote, state::ESTABLISHED, inode(&app)));
            let unspecified = SocketAddr::new(
                if ip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() },
                0,
            );
            let got =
                diag.find(UDP, remote, unspecified, state::UDP_ALL).expect("find").expect("the unconnected socket");
            assert_eq!((got.state, got.inode), (state::CLOSE, inode(&peer)));
            // No wildcard: the unconnected socket is not found under a remote end.
            assert_eq!(diag.find(UDP, remote, SocketAddr::new(ip, 9), state::UDP_ALL).expect("find"), None);
        }
    });
}

#[test]
fn find_receiver_falls_back_to_the_listener_and_the_bound_udp_socket() {
    in_namespace(|diag| {
        let ghost = SocketAddr::new(LO4, 40_999);
        // A dual-stack listener, not yet accepting: a connection in its accept queue has no file
        // (inode 0) until accept().
        let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let local = SocketAddr::new(LO4, port);
        let got = diag.find_receiver(TCP, local, ghost).expect("find_receiver").expect("the listener");
        assert_eq!((got.state, got.inode), (state::LISTEN, inode(&listener)));
        assert_eq!(got.local, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port));
        assert_eq!(diag.find(TCP, local, ghost, u32::MAX).expect("find"), None);

        let client = TcpStream::connect(local).unwrap();
        let queued = diag.find_receiver(TCP, local, client.local_addr().unwrap()).expect("find_receiver").unwrap();
        eprintln!("sockdiag_live: a connection in the accept queue: {queued:?}");
        assert_eq!((queued.state, queued.remote, queued.inode), (state::ESTABLISHED, client.local_addr().unwrap(), 0));
        let (server, _) = listener.accept().unwrap();
        let accepted = diag.find_receiver(TCP, local, client.local_addr().unwrap()).expect("find_receiver").unwrap();
        assert_eq!(accepted.inode, inode(&server));

        // UDP: the unconnected socket bound to the unspecified address, for any remote end.
        let bound = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let local = SocketAddr::new(LO4, bound.local_addr().unwrap().port());
        let got = diag.find_receiver(UDP, local, ghost).expect("find_receiver").expect("the bound socket");
        assert_eq!(
            (got.state, got.inode, got.local.ip()),
            (state::CLOSE, inode(&bound), IpAddr::from(Ipv4Addr::UNSPECIFIED))
        );
        // Nothing on a port no socket has.
        assert_eq!(diag.find_receiver(UDP, SocketAddr::new(LO4, 9), ghost).expect("find_receiver"), None);
        assert_eq!(diag.find_receiver(TCP, SocketAddr::new(LO4, 9), ghost).expect("find_receiver"), None);
    });
}
