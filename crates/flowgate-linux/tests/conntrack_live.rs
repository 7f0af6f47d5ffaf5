//! The conntrack module against the running kernel, as root, each test in a network namespace of
//! its own (`fgct-<pid>-<n>`, deleted at the end even when the test fails). Loopback traffic is
//! tracked there once a rule uses conntrack, so every flow below is real and local.
//!
//! Without root the tests say so and pass. Where the `conntrack` tool is installed, marks are
//! also checked through it.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use flowgate_linux::conntrack::{self, Conntrack, Counter, CtError, Entry, Event, EventKind, Tuple};
use nix::poll::{PollFd, PollFlags, PollTimeout};

mod common;
use common::{Netns, root};

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// A namespace of its own (`fgct-<pid>-<n>`) with loopback up, where a rule that uses conntrack
/// makes the kernel track its traffic, loopback included.
fn netns() -> Netns {
    let ns = Netns::new("fgct");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    for tool in ["iptables", "ip6tables"] {
        ns.exec(&[tool, "-A", "OUTPUT", "-m", "conntrack", "--ctstate", "NEW", "-j", "ACCEPT"]);
    }
    ns
}

impl Netns {
    /// The `conntrack` tool's listing for these arguments, or `None` when it is not installed.
    fn conntrack_cli(&self, args: &[&str]) -> Option<String> {
        if Command::new("conntrack").arg("--version").output().is_err() {
            assert!(std::env::var_os("CI").is_none(), "conntrack_live: no conntrack tool, and CI is set");
            eprintln!("conntrack_live: no conntrack tool, cross-check skipped");
            return None;
        }
        let mut all = vec!["conntrack", "-L"];
        all.extend_from_slice(args);
        let out = Command::new("ip").args(["netns", "exec", self.name()]).args(&all).output().unwrap();
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn read_acct() -> String {
    let s = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_acct").unwrap();
    s.trim().to_owned()
}

fn tuple(protocol: u8, src: SocketAddr, dst: SocketAddr) -> Tuple {
    Tuple { protocol, src: src.ip(), dst: dst.ip(), src_port: src.port(), dst_port: dst.port() }
}

fn reversed(t: &Tuple) -> Tuple {
    Tuple { protocol: t.protocol, src: t.dst, dst: t.src, src_port: t.dst_port, dst_port: t.src_port }
}

fn dump_all(ct: &mut Conntrack) -> Vec<Entry> {
    let mut all = Vec::new();
    ct.dump(|e| all.push(e.clone())).expect("dump");
    all
}

fn find(ct: &mut Conntrack, t: &Tuple) -> Option<Entry> {
    dump_all(ct).into_iter().find(|e| e.original == *t)
}

/// Reads events until one matches, for at most five seconds.
fn wait_event(ev: &mut Conntrack, pred: impl Fn(&Event) -> bool) -> Option<Event> {
    wait_event_for(ev, Duration::from_secs(5), pred)
}

fn wait_event_for(ev: &mut Conntrack, wait: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let mut found = None;
        let n = ev
            .recv_events(|e| {
                if found.is_none() && pred(e) {
                    found = Some(e.clone());
                }
            })
            .expect("recv_events");
        if found.is_some() {
            return found;
        }
        if n == 0 {
            let mut fds = [PollFd::new(ev.as_fd(), PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, PollTimeout::from(100u16)).expect("poll");
        }
    }
    None
}

/// A connected TCP pair over `ip`, with `bytes` sent from client to server and read there.
fn tcp_flow(ip: IpAddr, bytes: usize) -> (TcpStream, TcpStream, Tuple) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(&vec![0x55; bytes]).unwrap();
    let mut got = vec![0; bytes];
    server.read_exact(&mut got).unwrap();
    let t = tuple(TCP, client.local_addr().unwrap(), listener.local_addr().unwrap());
    (client, server, t)
}

/// An echo request with this id to `dst` over a raw socket, and its answer read back.
fn ping(dst: IpAddr, id: u16) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto};
    let (family, proto, ty) = match dst {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8u8),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128u8),
    };
    let fd = nix::sys::socket::socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, proto).unwrap();
    let mut pkt = vec![ty, 0, 0, 0];
    pkt.extend_from_slice(&id.to_be_bytes());
    pkt.extend_from_slice(&1u16.to_be_bytes()); // sequence
    pkt.extend_from_slice(b"flowgate");
    if dst.is_ipv4() {
        // ICMPv6 raw sockets have their checksum filled in by the kernel; ICMP ones do not.
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let flags = nix::sys::socket::MsgFlags::empty();
    match dst {
        IpAddr::V4(a) => sendto(fd.as_raw_fd(), &pkt, &SockaddrIn::from(std::net::SocketAddrV4::new(a, 0)), flags),
        IpAddr::V6(a) => {
            sendto(fd.as_raw_fd(), &pkt, &SockaddrIn6::from(std::net::SocketAddrV6::new(a, 0, 0, 0)), flags)
        }
    }
    .unwrap();
    // Wait for the reply to come back, so the entry has seen both directions.
    let reply_type = if dst.is_ipv4() { 0 } else { 129 };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if nix::poll::poll(&mut fds, PollTimeout::from(200u16)).unwrap() == 0 {
            continue;
        }
        let n = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, flags).unwrap();
        // IPv4 raw sockets hand over the IP header too; IPv6 ones do not.
        let icmp = if dst.is_ipv4() { buf.get(20..n) } else { buf.get(..n) };
        if let Some(icmp) = icmp
            && icmp.len() >= 8
            && icmp[0] == reply_type
            && icmp[4..6] == id.to_be_bytes()
        {
            return;
        }
    }
    panic!("no echo reply from {dst}");
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn dump_finds_a_tcp_flow_with_its_counters() {
    if !root() {
        return;
    }
    let host_acct = read_acct();
    let ns = netns();
    ns.run(|| {
        assert!(!conntrack::enable_accounting().unwrap(), "a new namespace starts with accounting off");
        assert_eq!(read_acct(), "1");
        assert!(conntrack::enable_accounting().unwrap());

        let (_c, _s, t) = tcp_flow(LO4, 1000);
        let mut ct = Conntrack::open().unwrap();
        let e = find(&mut ct, &t).unwrap_or_else(|| panic!("no entry for {t:?} in {:?}", dump_all(&mut ct)));
        assert_eq!(e.reply, reversed(&t));
        let orig = e.counters_original.expect("original counters");
        // SYN, ACK and the data at least, each with at least 40 bytes of IP and TCP headers.
        assert!(orig.packets >= 3, "{orig:?}");
        assert!(orig.bytes >= 1000 + 40 * orig.packets, "{orig:?}");
        let reply = e.counters_reply.expect("reply counters");
        assert!(reply.packets >= 2, "{reply:?}");
        assert_eq!(e.tcp_state, Some(3), "established");
        // IPS_SEEN_REPLY | IPS_CONFIRMED
        assert_eq!(e.status & 0xa, 0xa, "status {:#x}", e.status);
        assert!(e.id.is_some());
        assert!(e.timeout.is_some_and(|t| t > 0));
        assert_eq!(e.zone, None);
        assert_eq!(e.mark, 0);
    });
    // The setting is the namespace's: this thread's namespace kept its own.
    assert_eq!(read_acct(), host_acct);
}

#[test]
fn set_mark_changes_only_the_masked_bits() {
    if !root() {
        return;
    }
    let ns = netns();
    let port = ns.run(|| {
        let (_c, _s, t) = tcp_flow(LO4, 10);
        let mut ct = Conntrack::open().unwrap();
        let mark = |ct: &mut Conntrack| find(ct, &t).expect("entry").mark;

        ct.set_mark(&t, 0x1, 0x1).unwrap();
        assert_eq!(mark(&mut ct), 0x1);
        ct.set_mark(&t, 0x10000, 0x30000).unwrap();
        assert_eq!(mark(&mut ct), 0x10001);
        ct.set_mark(&t, 0x20000, 0x30000).unwrap();
        assert_eq!(mark(&mut ct), 0x20001);
        // Bits of the value outside the mask are set too: (old & !mask) | value.
        ct.set_mark(&t, 0x100, 0).unwrap();
        assert_eq!(mark(&mut ct), 0x20101);
        ct.set_mark(&t, 0, 0x30100).unwrap();
        assert_eq!(mark(&mut ct), 0x1);
        ct.set_mark(&t, 0x30000, 0x30000).unwrap();
        assert_eq!(mark(&mut ct), 0x30001);
        // The kernel looks a request's tuple up in both directions: the reply tuple names the
        // same entry.
        ct.set_mark(&reversed(&t), 0, 0x1).unwrap();
        assert_eq!(mark(&mut ct), 0x30000);
        ct.set_mark(&t, 0x1, 0x1).unwrap();
        t.dst_port
    });
    if let Some(out) = ns.conntrack_cli(&["-p", "tcp", "--dport", &port.to_string()]) {
        assert!(out.contains("mark=196609"), "conntrack -L says: {out}");
    }
}

#[test]
fn delete_sends_a_destroy_event_with_counters() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        conntrack::enable_accounting().unwrap();
        let mut ev = Conntrack::open_events(false, false, true).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut buf = [0u8; 200];
        a.send_to(&[1; 100], b.local_addr().unwrap()).unwrap();
        let (_, from) = b.recv_from(&mut buf).unwrap();
        b.send_to(&[2; 50], from).unwrap();
        a.recv_from(&mut buf).unwrap();
        let t = tuple(UDP, a.local_addr().unwrap(), b.local_addr().unwrap());

        let mut ct = Conntrack::open().unwrap();
        let before = find(&mut ct, &t).expect("entry before delete");
        ct.delete(&t).unwrap();
        assert!(find(&mut ct, &t).is_none(), "still there after delete");

        let e = wait_event(&mut ev, |e| e.entry.original == t).expect("destroy event");
        assert_eq!(e.kind, EventKind::Destroy);
        assert_eq!(e.entry.reply, reversed(&t));
        assert_eq!(e.entry.id, before.id);
        // 100 and 50 bytes of data with 8 bytes of UDP and 20 of IPv4 header each.
        assert_eq!(e.entry.counters_original, Some(Counter { packets: 1, bytes: 128 }));
        assert_eq!(e.entry.counters_reply, Some(Counter { packets: 1, bytes: 78 }));
        assert_eq!(ev.overruns(), 0);

        assert!(matches!(ct.delete(&t), Err(CtError::NotFound)));
    });
}

#[test]
fn new_and_update_events_for_a_tcp_connection() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let mut new = Conntrack::open_events(true, false, false).unwrap();
        let mut update = Conntrack::open_events(false, true, false).unwrap();
        let (_c, _s, t) = tcp_flow(LO4, 10);

        let e = wait_event(&mut new, |e| e.entry.original == t).expect("new event");
        assert_eq!(e.kind, EventKind::New);
        assert_eq!(e.entry.reply, reversed(&t));
        // Only the groups asked for: no updates or destroys on the first socket.
        assert!(wait_event_for(&mut new, Duration::from_millis(500), |e| e.kind != EventKind::New).is_none());

        let e = wait_event(&mut update, |e| e.entry.original == t && e.entry.tcp_state == Some(3))
            .expect("update to established");
        assert_eq!(e.kind, EventKind::Update);
    });
}

#[test]
fn missing_entries_are_not_found() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let mut ct = Conntrack::open().unwrap();
        let t = Tuple { protocol: TCP, src: LO4, dst: LO4, src_port: 1, dst_port: 2 };
        assert!(matches!(ct.delete(&t), Err(CtError::NotFound)));
        assert!(matches!(ct.set_mark(&t, 1, 1), Err(CtError::NotFound)));
        let t6 = Tuple { protocol: UDP, src: LO6, dst: LO6, ..t };
        assert!(matches!(ct.delete(&t6), Err(CtError::NotFound)));
        let err = ct.delete(&Tuple { dst: LO6, ..t }).unwrap_err();
        assert!(matches!(err, CtError::MixedFamilies { .. }), "{err}");
        // The socket still works after the errors.
        ct.dump(|_| {}).unwrap();
    });
}

#[test]
fn ipv6_and_ipv4_flows_are_in_one_dump() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        conntrack::enable_accounting().unwrap();
        let (_c4, _s4, t4) = tcp_flow(LO4, 10);
        let (_c6, _s6, t6) = tcp_flow(LO6, 500);
        let u6a = UdpSocket::bind("[::1]:0").unwrap();
        let u6b = UdpSocket::bind("[::1]:0").unwrap();
        u6a.send_to(&[0; 10], u6b.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        u6b.recv_from(&mut buf).unwrap();
        let tu6 = tuple(UDP, u6a.local_addr().unwrap(), u6b.local_addr().unwrap());

        let mut ct = Conntrack::open().unwrap();
        let all = dump_all(&mut ct);
        let e6 = all.iter().find(|e| e.original == t6).unwrap_or_else(|| panic!("no {t6:?} in {all:?}"));
        assert_eq!(e6.reply, reversed(&t6));
        assert!(e6.counters_original.unwrap().bytes >= 500 + 60 * 3);
        assert_eq!(e6.tcp_state, Some(3));
        assert!(all.iter().any(|e| e.original == t4), "AF_UNSPEC dumps IPv4 too");
        let eu = all.iter().find(|e| e.original == tu6).expect("udp over ::1");
        // 10 bytes of data, 8 of UDP, 40 of IPv6.
        assert_eq!(eu.counters_original, Some(Counter { packets: 1, bytes: 58 }));

        ct.set_mark(&t6, 0x20000, 0x30000).unwrap();
        assert_eq!(find(&mut ct, &t6).unwrap().mark, 0x20000);
        ct.delete(&tu6).unwrap();
        assert!(find(&mut ct, &tu6).is_none());
    });
}

#[test]
fn icmp_echo_flows_are_found_marked_and_deleted() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let mut ct = Conntrack::open().unwrap();
        for (ip, proto, id) in [(LO4, ICMP, 0x4242u16), (LO6, ICMPV6, 0x4343)] {
            ping(ip, id);
            let t = Tuple { protocol: proto, src: ip, dst: ip, src_port: id, dst_port: id };
            let all = dump_all(&mut ct);
            let e = all.iter().find(|e| e.original == t).unwrap_or_else(|| panic!("no {t:?} in {all:?}"));
            assert_eq!(e.reply, t, "an echo's reply tuple on loopback is the same, id included");
            assert_eq!(e.tcp_state, None);
            ct.set_mark(&t, 0x10000, 0x30000).unwrap();
            assert_eq!(find(&mut ct, &t).unwrap().mark, 0x10000);
            ct.delete(&t).unwrap();
            assert!(find(&mut ct, &t).is_none());
            assert!(matches!(ct.delete(&t), Err(CtError::NotFound)));
        }
    });
}

#[test]
fn entries_in_other_zones_are_dumped_with_their_zone() {
    if !root() {
        return;
    }
    let ns = netns();
    let b = ns.run(|| UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let port = b.port().to_string();
    for dir in ["--dport", "--sport"] {
        ns.exec(&["iptables", "-t", "raw", "-A", "OUTPUT", "-p", "udp", dir, &port, "-j", "CT", "--zone", "7"]);
    }
    ns.run(|| {
        let b = UdpSocket::bind(b).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(&[0; 10], b.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        b.recv_from(&mut buf).unwrap();
        let t = tuple(UDP, a.local_addr().unwrap(), b.local_addr().unwrap());
        let mut ct = Conntrack::open().unwrap();
        let e = find(&mut ct, &t).expect("zoned entry");
        assert_eq!(e.zone, Some(7));
        // Requests address zone 0 only (documented).
        assert!(matches!(ct.delete(&t), Err(CtError::NotFound)));
    });
}

#[test]
fn overruns_are_counted_and_the_event_socket_goes_on() {
    if !root() {
        return;
    }
    let ns = netns();
    ns.run(|| {
        let mut ev = Conntrack::open_events(true, false, false).unwrap();
        // Shrink the buffer the module asked for, so that a burst overruns it.
        nix::sys::socket::setsockopt(&ev.as_fd(), nix::sys::socket::sockopt::RcvBuf, &1usize).unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..300 {
            let a = UdpSocket::bind("127.0.0.1:0").unwrap();
            a.send_to(&[0; 1], b.local_addr().unwrap()).unwrap();
        }
        let mut seen = 0;
        while ev.recv_events(|_| seen += 1).unwrap() > 0 {}
        assert!(ev.overruns() >= 1, "saw {seen} events and no overrun");
        assert!(seen < 300, "saw all {seen} events despite the small buffer");

        // The socket goes on once there is room again. (With the shrunken buffer alone, whether
        // one event fits depends on the kernel's allocation sizes of the moment: this failed
        // once in a full CI run.)
        nix::sys::socket::setsockopt(&ev.as_fd(), nix::sys::socket::sockopt::RcvBuf, &(256usize << 10)).unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(&[0; 1], b.local_addr().unwrap()).unwrap();
        let t = tuple(UDP, a.local_addr().unwrap(), b.local_addr().unwrap());
        wait_event(&mut ev, |e| e.entry.original == t).expect("an event after the overrun");
    });
}
