//! NFQUEUE against the real kernel: every test builds its own network namespace
//! (`fgnfq-<pid>-<n>`), installs iptables rules there, and talks to the queue from a thread that
//! has entered it. Needs root; without it the tests say so and pass.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use flowgate_linux::marks;
use flowgate_linux::nfqueue::{Mark, NfqError, Operation, Queue, QueueConfig, Verdict, ct_info, hook};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{setsockopt, sockopt};

mod common;
use common::{Netns, root};

/// Long enough for a loaded CI machine; waits end as soon as the packet is there.
const ARRIVAL: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

macro_rules! require_root {
    () => {
        if !root() {
            return;
        }
    };
}

/// A namespace of its own (`fgnfq-<pid>-<n>`) with loopback up.
fn netns() -> Netns {
    let ns = Netns::new("fgnfq");
    ns.exec(&["ip", "link", "set", "lo", "up"]);
    ns
}

impl Netns {
    /// `iptables -w <rule>` in the namespace; `rule` is split at whitespace.
    fn iptables(&self, rule: &str) -> String {
        self.tables("iptables", rule)
    }

    /// `<program> -w <args>` in the namespace; `args` is split at whitespace.
    fn tables(&self, program: &str, args: &str) -> String {
        let mut full = vec![program, "-w"];
        full.extend(args.split_whitespace());
        self.exec(&full)
    }

    /// Packet counts of the rules of `table`/`chain`, in rule order.
    fn counters(&self, program: &str, table: &str, chain: &str) -> Vec<u64> {
        let out = self.tables(program, &format!("-t {table} -L {chain} -v -x -n --line-numbers"));
        out.lines()
            .filter_map(|line| {
                let mut cols = line.split_whitespace();
                cols.next()?.parse::<u32>().ok()?;
                cols.next()?.parse::<u64>().ok()
            })
            .collect()
    }
}

/// An owned copy of what the queue reported.
#[derive(Debug, Clone)]
struct Got {
    id: u32,
    hw_protocol: u16,
    hook: u8,
    payload: Vec<u8>,
    indev: Option<u32>,
    outdev: Option<u32>,
    ct_mark: Option<u32>,
    ct_info: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn readable(fd: impl AsFd, timeout: Duration) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0)
}

/// Receives until `want` packets arrived or `timeout` passed.
fn packets(q: &mut Queue, want: usize, timeout: Duration) -> Vec<Got> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !readable(&*q, left) {
            break;
        }
        while q
            .recv(|p| {
                got.push(Got {
                    id: p.id,
                    hw_protocol: p.hw_protocol,
                    hook: p.hook,
                    payload: p.payload.to_vec(),
                    indev: p.indev,
                    outdev: p.outdev,
                    ct_mark: p.ct_mark,
                    ct_info: p.ct_info,
                    uid: p.uid,
                    gid: p.gid,
                })
            })
            .expect("recv")
            > 0
        {}
    }
    got
}

/// The UDP destination port and data of an IPv4 or IPv6 packet without extension headers.
fn udp(packet: &[u8]) -> Option<(u16, &[u8])> {
    let l4 = match packet.first()? >> 4 {
        4 if *packet.get(9)? == 17 => usize::from(packet.first()? & 0x0f) * 4,
        6 if *packet.get(6)? == 17 => 40,
        _ => return None,
    };
    let port = u16::from_be_bytes([*packet.get(l4 + 2)?, *packet.get(l4 + 3)?]);
    Some((port, packet.get(l4 + 8..)?))
}

/// Datagrams that reach `sock` within `timeout` (stops early once `want` arrived).
fn delivered(sock: &UdpSocket, want: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while out.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !readable(sock, left) {
            break;
        }
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
    }
    out
}

fn receiver(addr: &str) -> UdpSocket {
    let sock = UdpSocket::bind(addr).expect("bind receiver");
    sock.set_nonblocking(true).expect("nonblocking");
    sock
}

fn sender(to: &str) -> (UdpSocket, SocketAddr) {
    let to: SocketAddr = to.parse().expect("address");
    let from = if to.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" };
    (UdpSocket::bind(from).expect("bind sender"), to)
}

fn queue(num: u16) -> Queue {
    Queue::open(&QueueConfig { num, ..QueueConfig::default() }).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn accept_with_mark_sets_the_connmark() {
    require_root!();
    let ns = netns();
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -m connmark --mark 0x10000/0x30000 -j ACCEPT");
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -j NFQUEUE --queue-num 0");

    ns.run(|| {
        let mut q = queue(0);
        assert_eq!(q.num(), 0);
        if !q.has_conntrack() {
            // The kernel ignores the conntrack half of the verdict's mark (no
            // CONFIG_NETFILTER_NETLINK_GLUE_CT); the packet mark still arrives, and a rule copies
            // it to the conntrack entry, as flowgate's chains must on such kernels.
            eprintln!("note: kernel without NFQUEUE conntrack glue; copying the packet mark with CONNMARK --save-mark");
            ns.iptables(concat!(
                "-t mangle -A POSTROUTING -o lo -p udp --dport 9 -m mark --mark 0x10000/0x30000",
                " -j CONNMARK --save-mark --nfmask 0x30000 --ctmask 0x30000"
            ));
        }
        assert_eq!(q.recv(|_| panic!("nothing was sent")).expect("empty recv"), 0, "recv does not block");
        q.flush().expect("empty flush");

        let rx = receiver("127.0.0.1:9");
        let (tx, to) = sender("127.0.0.1:9");
        tx.send_to(b"first", to).expect("send");
        let got = packets(&mut q, 1, ARRIVAL);
        assert_eq!(got.len(), 1, "the datagram was queued");
        let p = &got[0];
        assert_eq!(p.hook, hook::LOCAL_OUT);
        assert_eq!(p.hw_protocol, 0x0800);
        assert_eq!(udp(&p.payload), Some((9, &b"first"[..])), "payload {:02x?}", p.payload);
        assert_eq!(p.outdev, Some(1), "lo");
        assert_eq!(p.indev, None);
        if q.has_conntrack() {
            assert_eq!(p.ct_info, Some(ct_info::NEW));
        } else {
            assert_eq!((p.ct_info, p.ct_mark), (None, None));
        }
        assert_eq!(p.uid, Some(nix::unistd::geteuid().as_raw()));
        assert_eq!(p.gid, Some(nix::unistd::getegid().as_raw()));
        assert!(delivered(&rx, 1, QUIET).is_empty(), "held until the verdict");

        q.verdict(p.id, Verdict::Accept, Some(Mark { value: marks::ALLOW, mask: marks::MASK }));
        assert_eq!(q.pending(), 1);
        q.flush().expect("flush");
        assert_eq!(delivered(&rx, 1, ARRIVAL), [b"first".to_vec()], "accepted");

        tx.send_to(b"second", to).expect("send");
        assert_eq!(delivered(&rx, 1, ARRIVAL), [b"second".to_vec()]);
        let again = packets(&mut q, 1, QUIET);
        assert!(again.is_empty(), "the flow's conntrack mark let it through unqueued: {again:?}");
        assert_eq!((q.malformed(), q.overruns(), q.kernel_errors()), (0, 0, 0));
    });
    assert_eq!(ns.counters("iptables", "filter", "OUTPUT"), [1, 1], "ACCEPT by connmark, NFQUEUE");
}

#[test]
fn drop_verdict_drops_and_batches_release_many() {
    require_root!();
    let ns = netns();
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -j NFQUEUE --queue-num 0");

    ns.run(|| {
        let mut q = queue(0);
        let rx = receiver("127.0.0.1:9");
        let (tx, to) = sender("127.0.0.1:9");

        tx.send_to(b"doomed", to).expect("send");
        let got = packets(&mut q, 1, ARRIVAL);
        assert_eq!(got.len(), 1);
        q.verdict(got[0].id, Verdict::Drop, None);
        q.flush().expect("flush");
        assert!(delivered(&rx, 1, QUIET).is_empty(), "dropped");

        // The receiver does work: several packets, their verdicts sent in one flush, all arrive.
        for i in 0..8u8 {
            tx.send_to(&[b'p', i], to).expect("send");
        }
        let got = packets(&mut q, 8, ARRIVAL);
        assert_eq!(got.len(), 8);
        for p in &got {
            q.verdict(p.id, Verdict::Accept, None);
        }
        assert_eq!(q.pending(), 8);
        q.flush().expect("flush");
        let mut arrived = delivered(&rx, 8, ARRIVAL);
        arrived.sort();
        assert_eq!(arrived, (0..8u8).map(|i| vec![b'p', i]).collect::<Vec<_>>());

        // A verdict for an id the kernel does not hold is answered with an error, counted.
        q.verdict(got[0].id, Verdict::Accept, None);
        q.flush().expect("flush");
        let deadline = Instant::now() + ARRIVAL;
        while q.kernel_errors() == 0 && Instant::now() < deadline {
            if readable(&q, QUIET) {
                assert_eq!(q.recv(|_| {}).expect("recv"), 0);
            }
        }
        assert_eq!(q.kernel_errors(), 1);

        // Unbinding drops what still waits for a verdict.
        tx.send_to(b"orphan", to).expect("send");
        assert_eq!(packets(&mut q, 1, ARRIVAL).len(), 1);
        q.unbind().expect("unbind");
        assert!(delivered(&rx, 1, QUIET).is_empty(), "dropped at unbind");
    });
}

#[test]
fn a_bound_queue_cannot_be_bound_again() {
    require_root!();
    let ns = netns();
    ns.run(|| {
        let first = queue(7);
        let err = Queue::open(&QueueConfig { num: 7, ..QueueConfig::default() }).expect_err("second bind");
        let msg = err.to_string();
        eprintln!("second bind: {msg}");
        assert!(matches!(err, NfqError::AlreadyBound { queue: 7, .. }), "{err:?}");
        assert!(msg.contains("queue 7 is already bound by another process"), "{msg}");
        assert_eq!((err.queue(), err.operation()), (7, Operation::Bind));

        // Another number is free, and dropping the first frees 7.
        drop(queue(8));
        drop(first);
        drop(queue(7));

        let mut q = queue(9);
        q.unbind().expect("unbind");
        drop(queue(9));
    });
}

#[test]
fn conntrack_mark_mask_is_honoured_and_packet_mark_is_replaced() {
    require_root!();
    let ns = netns();
    let udp9 = "-o lo -p udp --dport 9";
    // Bits outside flowgate's mask on both marks, set before the queue sees the packet.
    ns.iptables(&format!("-t mangle -A OUTPUT {udp9} -j MARK --set-xmark 0x4/0x4"));
    ns.iptables(&format!("-A OUTPUT {udp9} -j CONNMARK --set-xmark 0x1/0x1"));
    // Counts only: matches when the conntrack mark is exactly 0x10001.
    ns.iptables(&format!("-A OUTPUT {udp9} -m connmark --mark 0x10001"));
    ns.iptables(&format!("-A OUTPUT {udp9} -m connmark --mark 0x10000/0x30000 -j ACCEPT"));
    ns.iptables(&format!("-A OUTPUT {udp9} -j NFQUEUE --queue-num 0"));
    ns.iptables(&format!("-t mangle -A POSTROUTING {udp9} -m mark --mark 0x10000"));
    ns.iptables(&format!("-t mangle -A POSTROUTING {udp9} -m mark --mark 0x10004"));

    let conntrack = ns.run(|| {
        let mut q = queue(0);
        let rx = receiver("127.0.0.1:9");
        let (tx, to) = sender("127.0.0.1:9");
        tx.send_to(b"one", to).expect("send");
        let got = packets(&mut q, 1, ARRIVAL);
        assert_eq!(got.len(), 1);
        if q.has_conntrack() {
            assert_eq!(got[0].ct_mark, Some(0x1), "the conntrack mark as the rules left it");
        }
        q.verdict(got[0].id, Verdict::Accept, Some(Mark { value: marks::ALLOW, mask: marks::MASK }));
        q.flush().expect("flush");
        assert_eq!(delivered(&rx, 1, ARRIVAL).len(), 1);

        tx.send_to(b"two", to).expect("send");
        let again = packets(&mut q, 1, QUIET);
        if q.has_conntrack() {
            assert!(again.is_empty(), "{again:?}");
        } else {
            eprintln!("note: kernel without NFQUEUE conntrack glue; checking that NFQA_CT is ignored, not refused");
            assert_eq!(again.len(), 1, "without the glue the verdict left the conntrack mark alone");
            q.verdict(again[0].id, Verdict::Accept, None);
            q.flush().expect("flush");
        }
        assert_eq!(delivered(&rx, 1, ARRIVAL).len(), 1);
        // Let an error answer to the marked verdict arrive if there is one.
        let _ = packets(&mut q, 1, QUIET);
        assert_eq!(q.kernel_errors(), 0, "a verdict with NFQA_CT is accepted");
        q.has_conntrack()
    });
    // filter: CONNMARK, exact 0x10001 (bit 0 kept: the mask was honoured), ACCEPT, NFQUEUE.
    let filter = ns.counters("iptables", "filter", "OUTPUT");
    if conntrack {
        assert_eq!(filter, [2, 1, 1, 1]);
    } else {
        assert_eq!(filter, [2, 0, 0, 2]);
    }
    // mangle POSTROUTING: the verdict's packet mark is exactly 0x10000 (bit 2 was cleared); the
    // second packet keeps 0x4 only (never queued, or queued and answered without a mark).
    assert_eq!(ns.counters("iptables", "mangle", "POSTROUTING"), [1, 0]);
}

fn overflow_case(fail_open: bool) -> (usize, usize) {
    let ns = netns();
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -j NFQUEUE --queue-num 0");
    ns.run(|| {
        let mut q = Queue::open(&QueueConfig { num: 0, max_len: 1, fail_open, copy_range: 0xffff })
            .unwrap_or_else(|e| panic!("{e}"));
        let rx = receiver("127.0.0.1:9");
        let (tx, to) = sender("127.0.0.1:9");
        for data in [b"a", b"b", b"c"] {
            tx.send_to(data, to).expect("send");
        }
        // Only the first fits in the queue; the others were handled by the kernel at once.
        let early = delivered(&rx, 2, if fail_open { ARRIVAL } else { QUIET }).len();
        let got = packets(&mut q, 3, QUIET);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(udp(&got[0].payload), Some((9, &b"a"[..])));
        q.verdict(got[0].id, Verdict::Accept, None);
        q.flush().expect("flush");
        assert_eq!(delivered(&rx, 1, ARRIVAL), [b"a".to_vec()]);
        (early, got.len())
    })
}

#[test]
fn fail_open_accepts_what_a_full_queue_cannot_hold() {
    require_root!();
    assert_eq!(overflow_case(true), (2, 1), "fail-open: the overflow is accepted");
    assert_eq!(overflow_case(false), (0, 1), "fail-closed: the overflow is dropped");
}

#[test]
fn ipv6_packets_are_queued_too() {
    require_root!();
    let ns = netns();
    ns.tables("ip6tables", "-A OUTPUT -o lo -p udp --dport 9 -j NFQUEUE --queue-num 0");
    ns.run(|| {
        let mut q = queue(0);
        let rx = receiver("[::1]:9");
        let (tx, to) = sender("[::1]:9");
        tx.send_to(b"six", to).expect("send");
        let got = packets(&mut q, 1, ARRIVAL);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].hw_protocol, 0x86dd);
        assert_eq!(got[0].hook, hook::LOCAL_OUT);
        assert_eq!(udp(&got[0].payload), Some((9, &b"six"[..])), "payload {:02x?}", got[0].payload);
        q.verdict(got[0].id, Verdict::Accept, None);
        q.flush().expect("flush");
        assert_eq!(delivered(&rx, 1, ARRIVAL), [b"six".to_vec()]);
    });
}

/// Overflows the queue's socket buffer (shrunk for the test) with `SENT` datagrams before
/// reading. Returns (packets queued to us, datagrams delivered, overruns).
fn socket_overflow_case(fail_open: bool) -> (usize, usize, u64) {
    const SENT: usize = 100;
    let ns = netns();
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -j NFQUEUE --queue-num 0");
    ns.run(|| {
        let mut q = Queue::open(&QueueConfig { num: 0, max_len: 10_000, fail_open, copy_range: 0xffff })
            .unwrap_or_else(|e| panic!("{e}"));
        setsockopt(&q, sockopt::RcvBuf, &4096).expect("shrink SO_RCVBUF");
        let rx = receiver("127.0.0.1:9");
        setsockopt(&rx, sockopt::RcvBufForce, &(4 << 20)).expect("grow the receiver's SO_RCVBUF");
        let (tx, to) = sender("127.0.0.1:9");
        for i in 0..SENT {
            tx.send_to(&(i as u32).to_be_bytes(), to).expect("send");
        }
        let got = packets(&mut q, SENT, QUIET);
        assert!(!got.is_empty() && got.len() < SENT, "{} of {SENT} queued", got.len());
        assert!(q.overruns() >= 1, "ENOBUFS was seen and counted");
        for p in &got {
            q.verdict(p.id, Verdict::Accept, None);
        }
        q.flush().expect("flush");
        let want = if fail_open { SENT } else { got.len() };
        let arrived = delivered(&rx, want, ARRIVAL).len();
        // Nothing more than expected trickles in.
        let late = delivered(&rx, 1, QUIET).len();
        assert_eq!(q.malformed(), 0);
        (got.len(), arrived + late, q.overruns())
    })
}

#[test]
fn socket_overruns_are_counted_not_fatal() {
    require_root!();
    let (queued, arrived, overruns) = socket_overflow_case(false);
    eprintln!("fail-closed: {queued} queued, {arrived} delivered, {overruns} overruns");
    assert_eq!(arrived, queued, "what the socket could not take was dropped");
    let (queued, arrived, overruns) = socket_overflow_case(true);
    eprintln!("fail-open: {queued} queued, {arrived} delivered, {overruns} overruns");
    assert_eq!(arrived, 100, "what the socket could not take was accepted");
}

#[test]
fn repeat_with_a_mark_runs_the_chain_again() {
    require_root!();
    let ns = netns();
    // The daemon's way to settle a drop: mark the packet, repeat, and let a rule act on the mark.
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -m mark --mark 0x30000/0x30000 -j DROP");
    ns.iptables("-A OUTPUT -o lo -p udp --dport 9 -j NFQUEUE --queue-num 0");
    ns.run(|| {
        let mut q = queue(0);
        let rx = receiver("127.0.0.1:9");
        let (tx, to) = sender("127.0.0.1:9");
        tx.send_to(b"settled", to).expect("send");
        let got = packets(&mut q, 1, ARRIVAL);
        assert_eq!(got.len(), 1);
        q.verdict(got[0].id, Verdict::Repeat, Some(Mark { value: marks::DROP, mask: marks::MASK }));
        q.flush().expect("flush");
        assert!(packets(&mut q, 1, QUIET).is_empty(), "the mark rule caught it before the queue");
        assert!(delivered(&rx, 1, QUIET).is_empty());
        assert_eq!(q.kernel_errors(), 0);
    });
    assert_eq!(ns.counters("iptables", "filter", "OUTPUT"), [1, 1], "DROP by mark after the repeat, NFQUEUE once");
}
