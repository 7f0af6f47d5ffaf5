//! NFLOG against the real kernel: every test builds its own network namespace
//! (`fgnflog-<pid>-<n>`) with a veth pair carrying 192.0.2.1/24 and 2001:db8::1/64, installs
//! `NFLOG` + `DROP` rules for 192.0.2.9 and 2001:db8::9 there (as flowgate's kernel-side drops
//! will look), binds the log group from a thread that has entered it, and sends to the dropped
//! addresses from that thread. Needs root, `ip`, `iptables` and `ip6tables`; without them the
//! tests say so and pass, unless `CI` is set, where they fail.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use flowgate_linux::nflog::{Logged, Nflog, NflogError, Operation};
use flowgate_linux::nfqueue::hook;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage, connect, getsockname,
    getsockopt, setsockopt, socket, sockopt,
};

mod common;
use common::{Netns, root};

/// The group the lab's rules log to.
const GROUP: u16 = 7;
const PREFIX: &str = "fg-test";
/// The rules' `--nflog-size`.
const RULE_SIZE: usize = 128;
/// Long enough for a loaded CI machine; waits end as soon as the logs are there.
const ARRIVAL: Duration = Duration::from_secs(5);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
const V4_LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const V4_DROPPED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);
const V6_LOCAL: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const V6_DROPPED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);

/// Whether the test can run: root, and the programs the lab needs. Under CI (`CI` set) a test
/// that cannot run fails instead, since skipped is not passed.
fn ready() -> bool {
    if !root() {
        return false;
    }
    let missing: Vec<&str> = ["ip", "iptables", "ip6tables"].into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    assert!(std::env::var_os("CI").is_none(), "{test}: needs {missing:?}, and CI is set");
    eprintln!("nflog_live: {test}: skipped, {missing:?} not installed");
    false
}

fn installed(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .chain(std::env::split_paths(&path).map(|d| d.join(name)))
        .any(|p| p.is_file())
}

macro_rules! require_lab {
    () => {
        if !ready() {
            return;
        }
    };
}

/// The namespace: loopback, the veth pair (`fgl0` with the local addresses, `fgl1` its peer,
/// both up so the routes are there), and for each family an `NFLOG` rule and a `DROP` rule for
/// the dropped address in OUTPUT.
fn lab() -> Netns {
    let ns = Netns::new("fgnflog");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns.exec(&["ip", "link", "add", "fgl0", "type", "veth", "peer", "name", "fgl1"]);
    ns.exec(&["ip", "addr", "add", "192.0.2.1/24", "dev", "fgl0"]);
    // nodad: usable as a source at once.
    ns.exec(&["ip", "addr", "add", "2001:db8::1/64", "dev", "fgl0", "nodad"]);
    ns.exec(&["ip", "link", "set", "fgl0", "up"]);
    ns.exec(&["ip", "link", "set", "fgl1", "up"]);
    for (program, dst) in [("iptables", "192.0.2.9"), ("ip6tables", "2001:db8::9")] {
        let size = RULE_SIZE.to_string();
        let group = GROUP.to_string();
        ns.exec(&[
            program,
            "-w",
            "-A",
            "OUTPUT",
            "-d",
            dst,
            "-j",
            "NFLOG",
            "--nflog-group",
            &group,
            "--nflog-prefix",
            PREFIX,
            "--nflog-size",
            &size,
        ]);
        ns.exec(&[program, "-w", "-A", "OUTPUT", "-d", dst, "-j", "DROP"]);
    }
    ns
}

/// Packet counts of the OUTPUT rules, in order (`program` is iptables or ip6tables).
fn counters(ns: &Netns, program: &str) -> Vec<u64> {
    let out = ns.exec(&[program, "-w", "-L", "OUTPUT", "-v", "-x", "-n", "--line-numbers"]);
    out.lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            cols.next()?.parse::<u32>().ok()?;
            cols.next()?.parse::<u64>().ok()
        })
        .collect()
}

fn bind(copy_bytes: u16) -> Nflog {
    Nflog::bind(GROUP, copy_bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// Receives until `want` logs arrived or `timeout` passed; each with the time it was returned.
fn logs(log: &mut Nflog, want: usize, timeout: Duration) -> Vec<(Instant, Logged)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let n = log.recv(&mut buf, ms).expect("recv");
        assert_eq!(n, buf.len(), "recv returns how many it appended");
        let now = Instant::now();
        got.extend(buf.drain(..).map(|l| (now, l)));
    }
    got
}

/// What the tests read of a logged IP packet.
#[derive(Debug, PartialEq, Eq)]
struct Ip {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// TCP flags.
    flags: Option<u8>,
    /// The packet's length as its IP header says (it may have been cut).
    len: usize,
}

/// An IPv4 or IPv6 packet without extension headers, as far as the tests need it.
fn ip(p: &[u8]) -> Option<Ip> {
    let (src, dst, proto, l4, len): (IpAddr, IpAddr, u8, usize, usize) = match p.first()? >> 4 {
        4 => {
            let a: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            let len = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            (a.into(), b.into(), *p.get(9)?, usize::from(p[0] & 0x0f) * 4, len)
        }
        6 => {
            let a: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            let len = 40 + usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            (a.into(), b.into(), *p.get(6)?, 40, len)
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes([*p.get(l4 + at)?, *p.get(l4 + at + 1)?]));
    let flags = if proto == 6 { Some(*p.get(l4 + 13)?) } else { None };
    Some(Ip { src, dst, proto, sport: port(0)?, dport: port(2)?, flags, len })
}

fn family_of(v6: bool) -> u8 {
    (if v6 { libc::AF_INET6 } else { libc::AF_INET }) as u8
}

fn addresses(v6: bool) -> (IpAddr, IpAddr) {
    if v6 { (V6_LOCAL.into(), V6_DROPPED.into()) } else { (V4_LOCAL.into(), V4_DROPPED.into()) }
}

/// What every log of the lab's rules says, whatever the packet.
fn check_meta(l: &Logged, v6: bool, outdev: u32) {
    assert_eq!(l.group, GROUP);
    assert_eq!(l.family, family_of(v6));
    assert_eq!(l.hook, hook::LOCAL_OUT);
    assert_eq!(l.prefix, PREFIX);
    assert_eq!(l.mark, 0);
    assert_eq!((l.indev, l.outdev), (None, Some(outdev)), "sent by this host, out of fgl0");
    assert_eq!(l.uid, Some(nix::unistd::geteuid().as_raw()));
    assert_eq!(l.gid, Some(nix::unistd::getegid().as_raw()));
}

/// A non-blocking TCP connect to `to`: the SYN leaves at once, the call does not wait. Returns
/// the socket (kept open: the kernel retransmits the SYN while it lives) and its local port.
fn start_connect(to: SocketAddr) -> (OwnedFd, u16) {
    let family = if to.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None).expect("socket");
    let r = match to {
        SocketAddr::V4(a) => connect(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => connect(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    assert_eq!(r, Err(Errno::EINPROGRESS), "a dropped SYN leaves the connect in progress");
    let local: SockaddrStorage = getsockname(fd.as_raw_fd()).expect("getsockname");
    let port = local.as_sockaddr_in().map(|a| a.port()).or(local.as_sockaddr_in6().map(|a| a.port()));
    (fd, port.expect("a port"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A UDP datagram and a TCP connect to the dropped address of one family: each packet is
/// logged once, with the rule's prefix, the outgoing interface and the packet's start, and the
/// retransmitted SYN is logged again.
fn drops_are_logged(v6: bool) {
    let ns = lab();
    let program = if v6 { "ip6tables" } else { "iptables" };
    let logged = ns.run(|| {
        let outdev = nix::net::if_::if_nametoindex("fgl0").expect("fgl0");
        let mut log = bind(0xffff);
        assert_eq!(log.group(), GROUP);
        // As root the 4 MiB are forced past net.core.rmem_max (the kernel doubles what is set).
        let rcvbuf = getsockopt(&log, sockopt::RcvBuf).expect("SO_RCVBUF");
        assert!(rcvbuf >= 4 << 20, "receive buffer {rcvbuf}");
        let mut none = Vec::new();
        assert_eq!(log.recv(&mut none, 0).expect("empty recv"), 0, "a timeout of 0 does not wait");
        let started = Instant::now();
        assert_eq!(log.recv(&mut none, 50).expect("empty recv"), 0);
        assert!(started.elapsed() >= Duration::from_millis(50), "recv waited its timeout");
        let (local, dropped) = addresses(v6);

        // UDP: 300 bytes of data, so the rule's --nflog-size cuts the copy.
        let udp = UdpSocket::bind(SocketAddr::new(local, 0)).expect("bind");
        let sport = udp.local_addr().expect("local address").port();
        let sent = Instant::now();
        let r = udp.send_to(&[b'x'; 300], SocketAddr::new(dropped, 5353));
        eprintln!("{program}: send_to a dropped address: {r:?}");
        assert_eq!(r.map_err(|e| e.raw_os_error()), Err(Some(libc::EPERM)), "OUTPUT's DROP fails the send");
        let got = logs(&mut log, 1, ARRIVAL);
        assert_eq!(got.len(), 1, "the datagram was logged");
        eprintln!("{program}: UDP logged {} after the send", ms(got[0].0 - sent));
        let l = &got[0].1;
        check_meta(l, v6, outdev);
        assert_eq!(l.payload.len(), RULE_SIZE, "cut to the rule's --nflog-size");
        let header = if v6 { 40 } else { 20 };
        assert_eq!(
            ip(&l.payload),
            Some(Ip { src: local, dst: dropped, proto: 17, sport, dport: 5353, flags: None, len: header + 8 + 300 })
        );
        assert!(l.payload[header + 8..].iter().all(|&b| b == b'x'), "the datagram's first bytes");

        // TCP: the SYN, and its retransmission about 1 s later (the initial RTO), both logged.
        let sent = Instant::now();
        let (conn, sport) = start_connect(SocketAddr::new(dropped, 80));
        let got = logs(&mut log, 2, ARRIVAL);
        drop(conn);
        let times: Vec<String> = got.iter().map(|(t, _)| ms(*t - sent)).collect();
        eprintln!("{program}: TCP SYNs logged at {times:?} after the connect");
        assert_eq!(got.len(), 2, "the SYN and its retransmission were both logged");
        for (_, l) in &got {
            check_meta(l, v6, outdev);
            let p = ip(&l.payload).expect("an IP packet");
            assert_eq!((p.src, p.dst, p.proto, p.sport, p.dport), (local, dropped, 6, sport, 80));
            assert_eq!(p.flags.map(|f| f & 0x12), Some(0x02), "a SYN without ACK");
            assert_eq!(l.payload.len(), p.len, "a SYN is shorter than the copy: whole");
        }
        assert!(got[1].0 - got[0].0 >= Duration::from_millis(500), "the second is a retransmission");
        assert!(logs(&mut log, 1, QUIET).is_empty(), "nothing else: {:?}", logs(&mut log, 1, QUIET));
        assert_eq!((log.malformed(), log.overruns()), (0, 0));
        3
    });
    // The connect is closed before a third SYN; the NFLOG rule and the DROP saw the same
    // packets.
    assert_eq!(counters(&ns, program), [logged, logged]);
}

#[test]
fn ipv4_drops_are_logged() {
    require_lab!();
    drops_are_logged(false);
}

#[test]
fn ipv6_drops_are_logged() {
    require_lab!();
    drops_are_logged(true);
}

#[test]
fn copy_bytes_cuts_below_the_rules_size_and_zero_copies_none() {
    require_lab!();
    let ns = lab();
    ns.run(|| {
        let outdev = nix::net::if_::if_nametoindex("fgl0").expect("fgl0");
        let udp = UdpSocket::bind("192.0.2.1:0").expect("bind");
        let port = udp.local_addr().expect("local address").port();
        for (copy, want) in [(40u16, 40usize), (0, 0), (1000, RULE_SIZE), (20, 20)] {
            // Each bind follows the drop of the last: the group is free again.
            let mut log = bind(copy);
            let _ = udp.send_to(&[0; 200], "192.0.2.9:9");
            let got = logs(&mut log, 1, ARRIVAL);
            assert_eq!(got.len(), 1, "copy {copy}");
            let l = &got[0].1;
            check_meta(l, false, outdev);
            assert_eq!(l.payload.len(), want, "copy {copy}");
            if want >= 24 {
                let ports = [l.payload[20], l.payload[21], l.payload[22], l.payload[23]];
                assert_eq!(ports, [(port >> 8) as u8, port as u8, 0, 9]);
            }
        }
    });
}

#[test]
fn a_bound_group_cannot_be_bound_again() {
    require_lab!();
    let ns = lab();
    ns.run(|| {
        let first = bind(64);
        let addr: NetlinkAddr = getsockname(first.as_raw_fd()).expect("getsockname");
        let listed = || std::fs::read_to_string("/proc/thread-self/net/netfilter/nfnetlink_log").expect("list");
        assert!(listed().lines().any(|l| l.split_whitespace().next() == Some("7")), "{}", listed());

        let err = Nflog::bind(GROUP, 64).expect_err("a second bind");
        let msg = err.to_string();
        eprintln!("second bind: {msg}");
        assert!(
            matches!(err, NflogError::AlreadyBound { group: GROUP, port: Some(p), errno: libc::EPERM } if p == addr.pid()),
            "{err:?}"
        );
        assert!(msg.contains(&format!("group 7 is already bound by netlink port {}", addr.pid())), "{msg}");
        assert!(msg.contains("EPERM"), "{msg}");
        assert_eq!((err.group(), err.operation()), (GROUP, Operation::Bind));

        // Another group is free; dropping the first frees 7.
        drop(Nflog::bind(GROUP + 1, 64).expect("another group"));
        drop(first);
        assert!(!listed().lines().any(|l| l.split_whitespace().next() == Some("7")), "{}", listed());
        drop(bind(64));
    });
}

#[test]
fn pf_bind_only_where_no_default_logger_is_set() {
    require_lab!();
    let ns = lab();
    ns.run(|| {
        let logger = |pf: u8| {
            let path = format!("/proc/sys/net/netfilter/nf_log/{pf}");
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().to_owned()
        };
        let v4 = logger(libc::AF_INET as u8);
        eprintln!("default loggers: AF_INET {v4}, AF_INET6 {}", logger(libc::AF_INET6 as u8));
        // No default logger for IPv6 (as on a kernel without nf_log_syslog): then PF_BIND is sent
        // and nfnetlink_log becomes the default.
        std::fs::write(format!("/proc/sys/net/netfilter/nf_log/{}", libc::AF_INET6), "NONE").expect("unset");
        assert_eq!(logger(libc::AF_INET6 as u8), "NONE");
        let mut log = bind(64);
        assert_eq!(logger(libc::AF_INET as u8), v4, "a family's default logger is left alone");
        assert_eq!(logger(libc::AF_INET6 as u8), "nfnetlink_log", "PF_BIND where there was none");
        // A second bind, PF_BIND of an already bound family included, is fine.
        drop(Nflog::bind(GROUP + 1, 64).expect("another group"));

        // Logging works either way.
        let udp = UdpSocket::bind("[2001:db8::1]:0").expect("bind");
        let _ = udp.send_to(b"six", "[2001:db8::9]:9");
        assert_eq!(logs(&mut log, 1, ARRIVAL).len(), 1);
    });
}

#[test]
fn overruns_are_counted_and_reading_goes_on() {
    require_lab!();
    let ns = lab();
    const SENT: usize = 300;
    ns.run(|| {
        let mut log = bind(128);
        // The smallest receive buffer the kernel allows (it doubles and floors what is asked),
        // so a burst overflows it.
        setsockopt(&log, sockopt::RcvBuf, &0).expect("shrink the receive buffer");
        let udp = UdpSocket::bind("192.0.2.1:0").expect("bind");
        for i in 0..SENT {
            let _ = udp.send_to(&i.to_be_bytes(), "192.0.2.9:9");
        }
        let mut got = Vec::new();
        while log.recv(&mut got, 100).expect("an overrun is not an error") > 0 {}
        eprintln!("{SENT} dropped, {} logs read, {} overruns", got.len(), log.overruns());
        assert!(log.overruns() >= 1, "the burst overflowed the buffer");
        assert!(!got.is_empty() && got.len() < SENT, "some were read, some lost: {}", got.len());
        assert_eq!(log.malformed(), 0);

        // After the overrun the socket works as before.
        let _ = udp.send_to(b"after", "192.0.2.9:9");
        let after = logs(&mut log, 1, ARRIVAL);
        assert_eq!(after.len(), 1);
        assert_eq!(&after[0].1.payload[28..], b"after");
    });
}
