//! Conntrack over netlink (ctnetlink): end-of-flow events with their counters, dumps of the
//! table, mark updates and deletion of entries.
//!
//! This room talks to the kernel's conntrack table through `NETLINK_NETFILTER` sockets of the
//! calling thread's network namespace, and touches one file: the `nf_conntrack_acct` sysctl of
//! that namespace ([`enable_accounting`]). It decides nothing; the daemon says which entries to
//! mark or drop. It encodes and decodes its own messages, on the crate's shared netlink framing
//! (`netlink.rs`): the kernel's answers and events are parsed without trusting a single length,
//! unknown attributes are skipped, and a message that does not parse is dropped rather than
//! guessed at.
//!
//! Constants are those of `linux/netfilter/nfnetlink.h`, `linux/netfilter/nfnetlink_conntrack.h`
//! and `linux/netfilter/nf_conntrack_common.h`.
//!
//! Requests address an entry by its original tuple (the kernel finds it by its reply tuple too),
//! in conntrack zone 0 only: [`Tuple`] carries no zone, so an entry in another zone shows up in
//! dumps and events (with [`Entry::zone`]) but [`Conntrack::set_mark`] and [`Conntrack::delete`]
//! answer [`CtError::NotFound`] for it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use nix::sys::socket::{self, SockFlag, SockProtocol, sockopt};

use crate::netlink::{
    self, Attrs, Failure, Messages, NFGENMSG_LEN, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NlMsg,
    REPLY_TIMEOUT_MS, be16, be32, be64,
};

// linux/netfilter/nfnetlink.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

// linux/netfilter/nfnetlink_conntrack.h: enum cntl_msg_types
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const CTA_MARK_MASK: u16 = 21;

// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

// enum ctattr_protoinfo, enum ctattr_protoinfo_tcp
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_ECHO: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// Bigger than any datagram the kernel sends: dump parts are capped at 32 KiB, events are one
/// entry each.
const RECV_BUF: usize = 64 * 1024;
/// What an event socket asks for; bursts of short flows ending together must not overrun it.
const EVENT_RCVBUF: usize = 8 * 1024 * 1024;
const ACCT_SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";

/// A flow's tuple in one direction.
///
/// For ICMP and ICMPv6 both ports hold the echo identifier (`CTA_PROTO_ICMP_ID`,
/// `CTA_PROTO_ICMPV6_ID`); type and code are not kept. A request built from such a tuple
/// ([`Conntrack::set_mark`], [`Conntrack::delete`]) says type 8 code 0 (ICMPv6: 128, code 0),
/// an echo request, because the kernel needs type and code to find an ICMP entry: only echo
/// flows, seen from the side that pinged, can be addressed.
///
/// For protocols the kernel tracks without ports (other than ICMP), both ports are 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Packets and bytes (with IP headers) in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// A conntrack entry as the kernel describes it. The optional fields are those the kernel leaves
/// out: counters without accounting (see [`enable_accounting`]), the zone when it is the default
/// one, the timeout in destroy events, the TCP state for other protocols.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
    pub mark: u32,
    /// `IPS_*` bits of `nf_conntrack_common.h`.
    pub status: u32,
    pub id: Option<u32>,
    pub zone: Option<u16>,
    pub counters_original: Option<Counter>,
    pub counters_reply: Option<Counter>,
    /// `CTA_PROTOINFO_TCP_STATE`: `enum tcp_conntrack` of `nf_conntrack_tcp.h` (3 = established).
    pub tcp_state: Option<u8>,
    /// Seconds left before the entry expires.
    pub timeout: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    New,
    Update,
    Destroy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub entry: Entry,
}

#[derive(Debug, thiserror::Error)]
pub enum CtError {
    #[error("conntrack entry not found")]
    NotFound,
    #[error("conntrack {op}: {source}")]
    Io { op: &'static str, source: io::Error },
    #[error("conntrack {op}: the kernel answered: {}", io::Error::from_raw_os_error(*.errno))]
    Netlink { op: &'static str, errno: i32 },
    #[error("conntrack {op}: malformed netlink message from the kernel")]
    Malformed { op: &'static str },
    #[error("conntrack {op}: no answer from the kernel within {} ms", REPLY_TIMEOUT_MS)]
    Timeout { op: &'static str },
    #[error("conntrack {op}: a tuple's addresses must both be IPv4 or both IPv6")]
    MixedFamilies { op: &'static str },
}

/// A ctnetlink socket: either a request socket ([`Conntrack::open`]) or an event socket
/// ([`Conntrack::open_events`]). Use one socket per role: a request skips messages that do not
/// answer it, so events arriving on a socket used for requests are lost.
pub struct Conntrack {
    sock: netlink::Socket,
}

impl std::fmt::Debug for Conntrack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conntrack")
            .field("fd", &self.sock.as_raw_fd())
            .field("seq", &self.sock.seq())
            .field("overruns", &self.sock.overruns())
            .finish()
    }
}

impl AsFd for Conntrack {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl AsRawFd for Conntrack {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// A [`Failure`] of `op` in this room's terms: ENOENT is an entry that is not there.
fn failed(op: &'static str, failure: Failure) -> CtError {
    match failure {
        Failure::Os(e) => CtError::Io { op, source: e.into() },
        Failure::Kernel(libc::ENOENT) => CtError::NotFound,
        Failure::Kernel(errno) => CtError::Netlink { op, errno },
        Failure::Malformed => CtError::Malformed { op },
        Failure::Timeout => CtError::Timeout { op },
    }
}

impl Conntrack {
    /// A request socket: dumps, mark updates, deletions.
    pub fn open() -> Result<Conntrack, CtError> {
        Self::socket(SockFlag::empty())
    }

    /// An event socket subscribed to the chosen groups, non-blocking, with an 8 MiB receive
    /// buffer; poll it through [`AsFd`]/[`AsRawFd`] and drain it with
    /// [`Conntrack::recv_events`].
    pub fn open_events(new: bool, update: bool, destroy: bool) -> Result<Conntrack, CtError> {
        let ct = Self::socket(SockFlag::SOCK_NONBLOCK)?;
        // SO_RCVBUFFORCE goes past net.core.rmem_max but needs CAP_NET_ADMIN; without it the
        // buffer is whatever SO_RCVBUF is allowed to give.
        if socket::setsockopt(&ct, sockopt::RcvBufForce, &EVENT_RCVBUF).is_err() {
            socket::setsockopt(&ct, sockopt::RcvBuf, &EVENT_RCVBUF)
                .map_err(|e| CtError::Io { op: "set the event socket's receive buffer", source: e.into() })?;
        }
        let groups =
            [(new, NFNLGRP_CONNTRACK_NEW), (update, NFNLGRP_CONNTRACK_UPDATE), (destroy, NFNLGRP_CONNTRACK_DESTROY)];
        for (_, group) in groups.iter().filter(|(on, _)| *on) {
            // SAFETY: the option value is a u32 that lives across the call, and its size is
            // passed with it.
            let rc = unsafe {
                libc::setsockopt(
                    ct.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_ADD_MEMBERSHIP,
                    (group as *const u32).cast(),
                    std::mem::size_of::<u32>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(CtError::Io { op: "join a conntrack event group", source: io::Error::last_os_error() });
            }
        }
        Ok(ct)
    }

    fn socket(flags: SockFlag) -> Result<Conntrack, CtError> {
        let sock = netlink::Socket::open(SockProtocol::NetlinkNetFilter, flags, RECV_BUF)
            .map_err(|(op, e)| CtError::Io { op, source: e.into() })?;
        Ok(Conntrack { sock })
    }

    /// How many times the kernel said it dropped events because the socket's buffer was full
    /// (ENOBUFS). Each time, an unknown number of events was lost.
    pub fn overruns(&self) -> u64 {
        self.sock.overruns()
    }

    /// Non-blocking: receives one datagram and calls `f` for each event in it. `Ok(0)` means
    /// nothing is waiting (datagrams without a usable event are skipped, not returned as 0).
    /// Overruns are counted ([`Conntrack::overruns`]) and reading goes on.
    pub fn recv_events(&mut self, mut f: impl FnMut(&Event)) -> Result<usize, CtError> {
        loop {
            let received = self.sock.recv().map_err(|e| failed("receive conntrack events", e))?;
            let Some(datagram) = received else { return Ok(0) };
            let mut count = 0;
            for msg in Messages::new(datagram) {
                if let Some(event) = decode_event(&msg) {
                    f(&event);
                    count += 1;
                }
            }
            if count > 0 {
                return Ok(count);
            }
        }
    }

    /// Dumps the whole table, IPv4 and IPv6 (family `AF_UNSPEC` asks for both), calling `f` for
    /// each entry.
    pub fn dump(&mut self, f: impl FnMut(&Entry)) -> Result<(), CtError> {
        let seq = self.sock.next_seq();
        self.transact("dump", &dump_request(seq), seq, f)
    }

    /// Changes the mark of the entry with this original tuple to `(old & !mask) | value`, as an
    /// update (no `NLM_F_CREATE`): [`CtError::NotFound`] if there is no such entry.
    ///
    /// The kernel looks the tuple up in both directions, so an entry's reply tuple names it too.
    pub fn set_mark(&mut self, original: &Tuple, value: u32, mask: u32) -> Result<(), CtError> {
        let seq = self.sock.next_seq();
        let req = set_mark_request(seq, original, value, mask)?;
        self.transact("set mark", &req, seq, |_| {})
    }

    /// Creates an entry for a TCP or UDP connection conntrack does not track (one that was open
    /// before anything on this host used conntrack): `original` and its reverse as the reply
    /// tuple, `mark`, `timeout` seconds, seen both ways and assured, and for TCP the ESTABLISHED
    /// state (window tracking picks the connection up at its next packet). An entry that exists
    /// already is left as it is (`Ok`).
    pub fn create(&mut self, original: &Tuple, mark: u32, timeout: u32) -> Result<(), CtError> {
        let seq = self.sock.next_seq();
        let req = create_request(seq, original, mark, timeout)?;
        match self.transact("create", &req, seq, |_| {}) {
            Err(CtError::Netlink { errno: libc::EEXIST, .. }) => Ok(()),
            other => other,
        }
    }

    /// Deletes the entry with this original tuple: [`CtError::NotFound`] if there is none. As
    /// with [`Conntrack::set_mark`], the reply tuple names the entry too.
    pub fn delete(&mut self, original: &Tuple) -> Result<(), CtError> {
        let seq = self.sock.next_seq();
        let req = delete_request(seq, original)?;
        self.transact("delete", &req, seq, |_| {})
    }

    /// Sends a request and reads until the kernel's ACK, error or end of dump for it, passing
    /// each entry it answers with to `f`.
    fn transact(&mut self, op: &'static str, req: &[u8], seq: u32, mut f: impl FnMut(&Entry)) -> Result<(), CtError> {
        let answer = self.sock.request(req, seq, |msg| {
            if let Some((_, entry)) = decode_ct_message(msg) {
                f(&entry);
            }
        });
        answer.map_err(|e| failed(op, e))
    }
}

/// Turns on per-entry byte and packet accounting in the current network namespace (it applies to
/// entries created from then on) and returns whether it was on before.
pub fn enable_accounting() -> Result<bool, CtError> {
    set_accounting(true)
}

/// Turns per-entry accounting on or off in the current network namespace and returns whether it
/// was on before, so that a caller of [`enable_accounting`] can put things back.
pub fn set_accounting(on: bool) -> Result<bool, CtError> {
    let old =
        std::fs::read_to_string(ACCT_SYSCTL).map_err(|source| CtError::Io { op: "read nf_conntrack_acct", source })?;
    let was_on = old.trim() != "0";
    if was_on != on {
        std::fs::write(ACCT_SYSCTL, if on { "1" } else { "0" })
            .map_err(|source| CtError::Io { op: "write nf_conntrack_acct", source })?;
    }
    Ok(was_on)
}

// ---- encoding ----

/// One ctnetlink message (res_id 0): conntrack's tuple encoding on top of the shared framing.
struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    fn new(msg: u16, flags: u16, seq: u32, family: u8) -> Builder {
        let mut buf = Vec::with_capacity(128);
        netlink::begin_nfmsg(&mut buf, NFNL_SUBSYS_CTNETLINK, msg, flags, seq, family, 0);
        Builder { buf }
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) {
        netlink::put_attr(&mut self.buf, ty, payload);
    }

    fn nest_start(&mut self, ty: u16) -> usize {
        netlink::begin_nest(&mut self.buf, ty)
    }

    fn nest_end(&mut self, at: usize) {
        netlink::end_nest(&mut self.buf, at);
    }

    fn finish(mut self) -> Vec<u8> {
        netlink::end_msg(&mut self.buf, 0);
        self.buf
    }

    fn tuple(&mut self, ty: u16, t: &Tuple) {
        let outer = self.nest_start(ty);
        let ip = self.nest_start(CTA_TUPLE_IP);
        match (t.src, t.dst) {
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                self.attr(CTA_IP_V6_SRC, &s.octets());
                self.attr(CTA_IP_V6_DST, &d.octets());
            }
            (s, d) => {
                self.attr(CTA_IP_V4_SRC, &v4_octets(s));
                self.attr(CTA_IP_V4_DST, &v4_octets(d));
            }
        }
        self.nest_end(ip);
        let proto = self.nest_start(CTA_TUPLE_PROTO);
        self.attr(CTA_PROTO_NUM, &[t.protocol]);
        match t.protocol {
            IPPROTO_ICMP => {
                self.attr(CTA_PROTO_ICMP_ID, &t.src_port.to_be_bytes());
                self.attr(CTA_PROTO_ICMP_TYPE, &[ICMP_ECHO]);
                self.attr(CTA_PROTO_ICMP_CODE, &[0]);
            }
            IPPROTO_ICMPV6 => {
                self.attr(CTA_PROTO_ICMPV6_ID, &t.src_port.to_be_bytes());
                self.attr(CTA_PROTO_ICMPV6_TYPE, &[ICMPV6_ECHO_REQUEST]);
                self.attr(CTA_PROTO_ICMPV6_CODE, &[0]);
            }
            // Port-less protocols have no use for these and the kernel ignores them.
            _ => {
                self.attr(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes());
                self.attr(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes());
            }
        }
        self.nest_end(proto);
        self.nest_end(outer);
    }
}

fn v4_octets(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => [0; 4], // ruled out by family_of()
    }
}

fn family_of(t: &Tuple, op: &'static str) -> Result<u8, CtError> {
    match (t.src, t.dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => Ok(libc::AF_INET as u8),
        (IpAddr::V6(_), IpAddr::V6(_)) => Ok(libc::AF_INET6 as u8),
        _ => Err(CtError::MixedFamilies { op }),
    }
}

fn dump_request(seq: u32) -> Vec<u8> {
    Builder::new(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, libc::AF_UNSPEC as u8).finish()
}

fn set_mark_request(seq: u32, t: &Tuple, value: u32, mask: u32) -> Result<Vec<u8>, CtError> {
    let family = family_of(t, "set mark")?;
    let mut b = Builder::new(IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_ACK, seq, family);
    b.tuple(CTA_TUPLE_ORIG, t);
    // The kernel computes (old & !mask) ^ value. Widening the mask by the value's bits makes
    // that (old & !mask) | value, whatever bits the value has outside the mask.
    b.attr(CTA_MARK, &value.to_be_bytes());
    b.attr(CTA_MARK_MASK, &(mask | value).to_be_bytes());
    Ok(b.finish())
}

/// `IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED` of `nf_conntrack_common.h` (a created entry
/// is confirmed at once, and the kernel refuses a status that says otherwise).
const STATUS_CREATED: u32 = (1 << 1) | (1 << 2) | (1 << 3);
/// `TCP_CONNTRACK_ESTABLISHED` of `nf_conntrack_tcp.h`.
const TCP_ESTABLISHED: u8 = 3;

fn create_request(seq: u32, t: &Tuple, mark: u32, timeout: u32) -> Result<Vec<u8>, CtError> {
    const OP: &str = "create";
    let family = family_of(t, OP)?;
    if !matches!(t.protocol, 6 | 17) {
        return Err(CtError::Netlink { op: OP, errno: libc::EOPNOTSUPP });
    }
    let reply = Tuple { protocol: t.protocol, src: t.dst, dst: t.src, src_port: t.dst_port, dst_port: t.src_port };
    let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | netlink::NLM_F_EXCL;
    let mut b = Builder::new(IPCTNL_MSG_CT_NEW, flags, seq, family);
    b.tuple(CTA_TUPLE_ORIG, t);
    b.tuple(CTA_TUPLE_REPLY, &reply);
    b.attr(CTA_TIMEOUT, &timeout.to_be_bytes());
    b.attr(CTA_MARK, &mark.to_be_bytes());
    b.attr(CTA_STATUS, &STATUS_CREATED.to_be_bytes());
    if t.protocol == 6 {
        let info = b.nest_start(CTA_PROTOINFO);
        let tcp = b.nest_start(CTA_PROTOINFO_TCP);
        b.attr(CTA_PROTOINFO_TCP_STATE, &[TCP_ESTABLISHED]);
        b.nest_end(tcp);
        b.nest_end(info);
    }
    Ok(b.finish())
}

fn delete_request(seq: u32, t: &Tuple) -> Result<Vec<u8>, CtError> {
    // A delete without a tuple flushes the whole table: this one always carries it.
    let family = family_of(t, "delete")?;
    let mut b = Builder::new(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, family);
    b.tuple(CTA_TUPLE_ORIG, t);
    Ok(b.finish())
}

// ---- decoding ----

fn ipv4(p: &[u8]) -> Option<IpAddr> {
    let o: [u8; 4] = p.get(..4)?.try_into().ok()?;
    Some(IpAddr::V4(Ipv4Addr::from(o)))
}

fn ipv6(p: &[u8]) -> Option<IpAddr> {
    let o: [u8; 16] = p.get(..16)?.try_into().ok()?;
    Some(IpAddr::V6(Ipv6Addr::from(o)))
}

fn decode_event(msg: &NlMsg<'_>) -> Option<Event> {
    let (ty, entry) = decode_ct_message(msg)?;
    // ctnetlink_conntrack_event() sends destroys as DELETE, and news as NEW with
    // NLM_F_CREATE | NLM_F_EXCL, and every other change as a plain NEW.
    let kind = match ty {
        IPCTNL_MSG_CT_DELETE => EventKind::Destroy,
        IPCTNL_MSG_CT_NEW if msg.flags & NLM_F_CREATE != 0 => EventKind::New,
        IPCTNL_MSG_CT_NEW => EventKind::Update,
        _ => return None,
    };
    Some(Event { kind, entry })
}

/// A ctnetlink message's type (`IPCTNL_MSG_CT_*`) and entry; `None` for other subsystems
/// (expectations among them) and for entries without both tuples.
fn decode_ct_message(msg: &NlMsg<'_>) -> Option<(u16, Entry)> {
    if msg.ty >> 8 != NFNL_SUBSYS_CTNETLINK {
        return None;
    }
    let entry = decode_entry(msg.payload.get(NFGENMSG_LEN..)?)?;
    Some((msg.ty & 0xff, entry))
}

fn decode_entry(attrs: &[u8]) -> Option<Entry> {
    let mut original = None;
    let mut reply = None;
    let mut mark = 0;
    let mut status = 0;
    let mut id = None;
    let mut zone = None;
    let mut counters_original = None;
    let mut counters_reply = None;
    let mut tcp_state = None;
    let mut timeout = None;
    for (ty, p) in Attrs::new(attrs) {
        match ty {
            CTA_TUPLE_ORIG => original = decode_tuple(p),
            CTA_TUPLE_REPLY => reply = decode_tuple(p),
            CTA_STATUS => status = be32(p).unwrap_or(status),
            CTA_PROTOINFO => tcp_state = decode_tcp_state(p).or(tcp_state),
            CTA_TIMEOUT => timeout = be32(p),
            CTA_MARK => mark = be32(p).unwrap_or(mark),
            CTA_COUNTERS_ORIG => counters_original = decode_counter(p),
            CTA_COUNTERS_REPLY => counters_reply = decode_counter(p),
            CTA_ID => id = be32(p),
            CTA_ZONE => zone = be16(p),
            _ => {}
        }
    }
    Some(Entry {
        original: original?,
        reply: reply?,
        mark,
        status,
        id,
        zone,
        counters_original,
        counters_reply,
        tcp_state,
        timeout,
    })
}

fn decode_tuple(p: &[u8]) -> Option<Tuple> {
    let mut src = None;
    let mut dst = None;
    let mut protocol = None;
    let mut src_port = None;
    let mut dst_port = None;
    let mut icmp_id = None;
    for (ty, p) in Attrs::new(p) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, a) in Attrs::new(p) {
                    match ty {
                        CTA_IP_V4_SRC => src = ipv4(a),
                        CTA_IP_V4_DST => dst = ipv4(a),
                        CTA_IP_V6_SRC => src = ipv6(a),
                        CTA_IP_V6_DST => dst = ipv6(a),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, a) in Attrs::new(p) {
                    match ty {
                        CTA_PROTO_NUM => protocol = a.first().copied(),
                        CTA_PROTO_SRC_PORT => src_port = be16(a),
                        CTA_PROTO_DST_PORT => dst_port = be16(a),
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => icmp_id = be16(a),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = protocol?;
    let (src_port, dst_port) = match protocol {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let id = icmp_id.unwrap_or(0);
            (id, id)
        }
        _ => (src_port.unwrap_or(0), dst_port.unwrap_or(0)),
    };
    Some(Tuple { protocol, src: src?, dst: dst?, src_port, dst_port })
}

fn decode_tcp_state(p: &[u8]) -> Option<u8> {
    let (_, tcp) = Attrs::new(p).find(|(ty, _)| *ty == CTA_PROTOINFO_TCP)?;
    let (_, state) = Attrs::new(tcp).find(|(ty, _)| *ty == CTA_PROTOINFO_TCP_STATE)?;
    state.first().copied()
}

fn decode_counter(p: &[u8]) -> Option<Counter> {
    let mut packets = None;
    let mut bytes = None;
    for (ty, a) in Attrs::new(p) {
        match ty {
            CTA_COUNTERS_PACKETS => packets = be64(a).or(packets),
            CTA_COUNTERS_BYTES => bytes = be64(a).or(bytes),
            // Kernels before 64-bit counters; kept for hand-made or replayed messages.
            CTA_COUNTERS32_PACKETS => packets = packets.or(be32(a).map(u64::from)),
            CTA_COUNTERS32_BYTES => bytes = bytes.or(be32(a).map(u64::from)),
            _ => {}
        }
    }
    if packets.is_none() && bytes.is_none() {
        return None;
    }
    Some(Counter { packets: packets.unwrap_or(0), bytes: bytes.unwrap_or(0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{
        NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_NOOP, NLMSG_OVERRUN, read_i32_ne,
    };

    const AF_INET: u8 = libc::AF_INET as u8;
    const AF_INET6: u8 = libc::AF_INET6 as u8;

    fn tcp4() -> Tuple {
        Tuple {
            protocol: 6,
            src: "192.0.2.1".parse().unwrap(),
            dst: "198.51.100.2".parse().unwrap(),
            src_port: 40000,
            dst_port: 443,
        }
    }

    fn reversed(t: &Tuple) -> Tuple {
        Tuple { protocol: t.protocol, src: t.dst, dst: t.src, src_port: t.dst_port, dst_port: t.src_port }
    }

    #[test]
    fn constants_agree_with_libc() {
        assert_eq!(NLMSG_NOOP, libc::NLMSG_NOOP as u16);
        assert_eq!(NLMSG_ERROR, libc::NLMSG_ERROR as u16);
        assert_eq!(NLMSG_DONE, libc::NLMSG_DONE as u16);
        assert_eq!(NLMSG_OVERRUN, libc::NLMSG_OVERRUN as u16);
        assert_eq!(NLM_F_REQUEST, libc::NLM_F_REQUEST as u16);
        assert_eq!(NLM_F_ACK, libc::NLM_F_ACK as u16);
        assert_eq!(NLM_F_DUMP, libc::NLM_F_DUMP as u16);
        assert_eq!(NLM_F_CREATE, libc::NLM_F_CREATE as u16);
        assert_eq!(NLA_F_NESTED, libc::NLA_F_NESTED as u16);
        assert_eq!(NLA_TYPE_MASK, libc::NLA_TYPE_MASK as u16);
        assert_eq!(libc::NETLINK_NETFILTER, 12);
        assert_eq!(NLMSG_HDRLEN, std::mem::size_of::<libc::nlmsghdr>());
    }

    fn header(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v
    }

    fn nla(v: &mut Vec<u8>, len: u16, ty: u16) {
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
    }

    /// CTA_TUPLE_ORIG for tcp4(), written out byte by byte.
    fn tcp4_orig_bytes() -> Vec<u8> {
        let mut v = Vec::new();
        nla(&mut v, 52, 0x8001); // CTA_TUPLE_ORIG, nested
        nla(&mut v, 20, 0x8001); //   CTA_TUPLE_IP, nested
        nla(&mut v, 8, 1); //           CTA_IP_V4_SRC
        v.extend_from_slice(&[192, 0, 2, 1]);
        nla(&mut v, 8, 2); //           CTA_IP_V4_DST
        v.extend_from_slice(&[198, 51, 100, 2]);
        nla(&mut v, 28, 0x8002); //   CTA_TUPLE_PROTO, nested
        nla(&mut v, 5, 1); //           CTA_PROTO_NUM
        v.extend_from_slice(&[6, 0, 0, 0]);
        nla(&mut v, 6, 2); //           CTA_PROTO_SRC_PORT
        v.extend_from_slice(&[0x9c, 0x40, 0, 0]);
        nla(&mut v, 6, 3); //           CTA_PROTO_DST_PORT
        v.extend_from_slice(&[0x01, 0xbb, 0, 0]);
        v
    }

    #[test]
    fn dump_request_bytes() {
        let mut want = header(20, 0x0101, 0x0301, 9);
        want.extend_from_slice(&[0, 0, 0, 0]); // AF_UNSPEC, version 0, res_id 0
        assert_eq!(dump_request(9), want);
    }

    #[test]
    fn set_mark_request_bytes() {
        let mut want = header(88, 0x0100, 0x0005, 7);
        want.extend_from_slice(&[AF_INET, 0, 0, 0]);
        want.extend_from_slice(&tcp4_orig_bytes());
        nla(&mut want, 8, 8); // CTA_MARK
        want.extend_from_slice(&[0, 1, 0, 0]);
        nla(&mut want, 8, 21); // CTA_MARK_MASK
        want.extend_from_slice(&[0, 3, 0, 0]);
        assert_eq!(set_mark_request(7, &tcp4(), 0x10000, 0x30000).unwrap(), want);
    }

    #[test]
    fn set_mark_widens_the_mask_by_the_value() {
        // The kernel's (old & !m) ^ v, with m = mask | value, must equal (old & !mask) | value.
        for (old, value, mask) in [(0xffff_ffffu32, 0x100, 0), (0x1, 0x10000, 0x30000), (0x30001, 0x20000, 0x30000)] {
            let req = set_mark_request(1, &tcp4(), value, mask).unwrap();
            let m = be32(&req[req.len() - 4..]).unwrap();
            assert_eq!((old & !m) ^ value, (old & !mask) | value);
        }
    }

    #[test]
    fn delete_request_bytes() {
        let mut want = header(72, 0x0102, 0x0005, 8);
        want.extend_from_slice(&[AF_INET, 0, 0, 0]);
        want.extend_from_slice(&tcp4_orig_bytes());
        assert_eq!(delete_request(8, &tcp4()).unwrap(), want);
    }

    #[test]
    fn icmp_requests_say_echo_request() {
        let t = Tuple {
            protocol: 1,
            src: "127.0.0.1".parse().unwrap(),
            dst: "127.0.0.2".parse().unwrap(),
            src_port: 0x1234,
            dst_port: 0x1234,
        };
        let req = delete_request(1, &t).unwrap();
        let orig = Attrs::new(&req[20..]).next().unwrap().1;
        let (_, proto) = Attrs::new(orig).find(|a| a.0 == CTA_TUPLE_PROTO).unwrap();
        let got: Vec<(u16, Vec<u8>)> = Attrs::new(proto).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(got, vec![(1, vec![1]), (4, vec![0x12, 0x34]), (5, vec![8]), (6, vec![0])]);

        let t6 = Tuple { protocol: 58, src: "::1".parse().unwrap(), dst: "::1".parse().unwrap(), ..t };
        let req = delete_request(1, &t6).unwrap();
        assert_eq!(req[16], AF_INET6);
        let orig = Attrs::new(&req[20..]).next().unwrap().1;
        let (_, ip) = Attrs::new(orig).find(|a| a.0 == CTA_TUPLE_IP).unwrap();
        let ips: Vec<u16> = Attrs::new(ip).map(|a| a.0).collect();
        assert_eq!(ips, vec![3, 4]);
        let (_, proto) = Attrs::new(orig).find(|a| a.0 == CTA_TUPLE_PROTO).unwrap();
        let got: Vec<(u16, Vec<u8>)> = Attrs::new(proto).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(got, vec![(1, vec![58]), (7, vec![0x12, 0x34]), (8, vec![128]), (9, vec![0])]);
        // And what we encode, we decode back.
        assert_eq!(decode_tuple(orig), Some(t6));
    }

    #[test]
    fn mixed_families_are_refused() {
        let t = Tuple { dst: "::1".parse().unwrap(), ..tcp4() };
        assert!(matches!(delete_request(1, &t), Err(CtError::MixedFamilies { .. })));
        assert!(matches!(set_mark_request(1, &t, 1, 1), Err(CtError::MixedFamilies { .. })));
    }

    /// A message as the kernel would send it, with every attribute this module reads and some
    /// it does not.
    fn full_message(ty: u16, flags: u16, family: u8, orig: &Tuple, reply: &Tuple, tcp: bool) -> Vec<u8> {
        let mut b = Builder::new(ty, flags, 0, family);
        b.tuple(CTA_TUPLE_ORIG, orig);
        b.tuple(CTA_TUPLE_REPLY, reply);
        let c = b.nest_start(CTA_COUNTERS_ORIG);
        b.attr(CTA_COUNTERS_PACKETS, &3u64.to_be_bytes());
        b.attr(CTA_COUNTERS_BYTES, &1164u64.to_be_bytes());
        b.nest_end(c);
        let c = b.nest_start(CTA_COUNTERS_REPLY);
        b.attr(CTA_COUNTERS_PACKETS, &2u64.to_be_bytes());
        b.attr(CTA_COUNTERS_BYTES, &112u64.to_be_bytes());
        b.attr(5, &[0; 8]); // CTA_COUNTERS_PAD
        b.nest_end(c);
        b.attr(CTA_STATUS, &0x18eu32.to_be_bytes());
        b.attr(CTA_TIMEOUT, &431999u32.to_be_bytes());
        b.attr(CTA_MARK, &0x10001u32.to_be_bytes());
        b.attr(11, &1u32.to_be_bytes()); // CTA_USE, not read
        b.attr(CTA_ID, &0xdead_beefu32.to_be_bytes());
        b.attr(CTA_ZONE, &7u16.to_be_bytes());
        let ts = b.nest_start(20); // CTA_TIMESTAMP, not read
        b.attr(1, &1u64.to_be_bytes());
        b.nest_end(ts);
        b.attr(0x3fff, &[1, 2, 3]); // from a future kernel
        if tcp {
            let pi = b.nest_start(CTA_PROTOINFO);
            let t = b.nest_start(CTA_PROTOINFO_TCP);
            b.attr(CTA_PROTOINFO_TCP_STATE, &[3]);
            b.attr(2, &[7]); // CTA_PROTOINFO_TCP_WSCALE_ORIGINAL
            b.nest_end(t);
            b.nest_end(pi);
        }
        b.finish()
    }

    fn expected(orig: Tuple, reply: Tuple, tcp: bool) -> Entry {
        Entry {
            original: orig,
            reply,
            mark: 0x10001,
            status: 0x18e,
            id: Some(0xdead_beef),
            zone: Some(7),
            counters_original: Some(Counter { packets: 3, bytes: 1164 }),
            counters_reply: Some(Counter { packets: 2, bytes: 112 }),
            tcp_state: tcp.then_some(3),
            timeout: Some(431999),
        }
    }

    fn cases() -> Vec<(u8, Tuple, Tuple, bool)> {
        let tcp6 = Tuple {
            protocol: 6,
            src: "2001:db8::1".parse().unwrap(),
            dst: "2001:db8::2".parse().unwrap(),
            src_port: 51000,
            dst_port: 80,
        };
        let icmp4 = Tuple {
            protocol: 1,
            src: "192.0.2.1".parse().unwrap(),
            dst: "198.51.100.2".parse().unwrap(),
            src_port: 77,
            dst_port: 77,
        };
        let icmp6 = Tuple { protocol: 58, ..tcp6 };
        let icmp6 = Tuple { src_port: 99, dst_port: 99, ..icmp6 };
        vec![
            (AF_INET, tcp4(), reversed(&tcp4()), true),
            (AF_INET6, tcp6, reversed(&tcp6), true),
            (AF_INET, icmp4, reversed(&icmp4), false),
            (AF_INET6, icmp6, reversed(&icmp6), false),
        ]
    }

    #[test]
    fn decodes_events_and_dump_entries_with_every_attribute() {
        for (family, orig, reply, tcp) in cases() {
            let want = expected(orig, reply, tcp);
            for (ty, flags, kind) in [
                (IPCTNL_MSG_CT_NEW, 0x0600, EventKind::New), // NLM_F_CREATE | NLM_F_EXCL
                (IPCTNL_MSG_CT_NEW, 0, EventKind::Update),
                (IPCTNL_MSG_CT_DELETE, 0, EventKind::Destroy),
            ] {
                let m = full_message(ty, flags, family, &orig, &reply, tcp);
                let msgs: Vec<NlMsg<'_>> = Messages::new(&m).collect();
                assert_eq!(msgs.len(), 1);
                let ev = decode_event(&msgs[0]).unwrap();
                assert_eq!(ev, Event { kind, entry: want.clone() });
            }
            // A dump part: several NEW | NLM_F_MULTI messages, then NLMSG_DONE.
            let one = full_message(IPCTNL_MSG_CT_NEW, 0x2, family, &orig, &reply, tcp);
            let mut part = one.clone();
            part.extend_from_slice(&one);
            part.extend_from_slice(&header(20, NLMSG_DONE, 0x2, 0));
            part.extend_from_slice(&0i32.to_ne_bytes());
            let mut msgs = Messages::new(&part);
            let entries: Vec<Entry> = (&mut msgs).filter_map(|m| decode_ct_message(&m)).map(|e| e.1).collect();
            assert!(!msgs.malformed);
            assert_eq!(entries, vec![want.clone(), want]);
        }
    }

    #[test]
    fn messages_of_other_subsystems_and_incomplete_entries_are_skipped() {
        let (family, orig, reply, tcp) = cases().remove(0);
        let mut m = full_message(IPCTNL_MSG_CT_NEW, 0, family, &orig, &reply, tcp);
        m[5] = 2; // NFNL_SUBSYS_CTNETLINK_EXP
        assert!(decode_event(&Messages::new(&m).next().unwrap()).is_none());

        let mut b = Builder::new(IPCTNL_MSG_CT_NEW, 0, 0, family);
        b.tuple(CTA_TUPLE_ORIG, &orig);
        b.attr(CTA_MARK, &1u32.to_be_bytes());
        let m = b.finish();
        assert!(decode_event(&Messages::new(&m).next().unwrap()).is_none());
    }

    #[test]
    fn old_32_bit_counters_are_read() {
        let mut b = Builder::new(0, 0, 0, 0);
        b.attr(CTA_COUNTERS32_PACKETS, &5u32.to_be_bytes());
        b.attr(CTA_COUNTERS32_BYTES, &500u32.to_be_bytes());
        let m = b.finish();
        assert_eq!(decode_counter(&m[20..]), Some(Counter { packets: 5, bytes: 500 }));
        assert_eq!(decode_counter(&[]), None);
    }

    fn decode_all(data: &[u8]) -> usize {
        let mut n = 0;
        for m in Messages::new(data) {
            if decode_event(&m).is_some() {
                n += 1;
            }
            let _ = read_i32_ne(m.payload, 0);
        }
        n
    }

    #[test]
    fn truncated_input_never_panics() {
        for (family, orig, reply, tcp) in cases() {
            let m = full_message(IPCTNL_MSG_CT_DELETE, 0, family, &orig, &reply, tcp);
            for cut in 0..m.len() {
                // As cut off by a short read...
                assert_eq!(decode_all(&m[..cut]), 0);
                // ...and with the header's length telling the truth about the cut.
                let mut short = m[..cut].to_vec();
                if short.len() >= 4 {
                    short[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
                }
                decode_all(&short);
            }
            assert_eq!(decode_all(&m), 1);
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Pure noise.
        for _ in 0..2000 {
            let len = (rnd() % 300) as usize;
            let data: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            decode_all(&data);
        }
        // Valid messages with bytes changed: lengths, types and flags get hit too.
        let (family, orig, reply, tcp) = cases().remove(1);
        let m = full_message(IPCTNL_MSG_CT_NEW, 0x600, family, &orig, &reply, tcp);
        for i in 0..m.len() {
            for v in [0u8, 1, 3, 4, 0x7f, 0x80, 0xff] {
                let mut bad = m.clone();
                bad[i] = v;
                decode_all(&bad);
            }
        }
        for _ in 0..5000 {
            let mut bad = m.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() as usize) % bad.len();
                bad[i] = rnd() as u8;
            }
            decode_all(&bad);
        }
        // Zero-length attributes and headers must not loop for ever.
        decode_all(&[0; 64]);
        let mut zero_attrs = header(40, 0x0100, 0, 0);
        zero_attrs.extend_from_slice(&[0; 24]);
        assert_eq!(decode_all(&zero_attrs), 0);
    }

    #[test]
    fn errors_name_the_operation() {
        let e = CtError::Netlink { op: "set mark", errno: libc::EPERM };
        assert!(e.to_string().starts_with("conntrack set mark: "), "{e}");
        let e = CtError::Io { op: "bind the netlink socket", source: io::Error::from_raw_os_error(libc::EACCES) };
        assert!(e.to_string().contains("bind the netlink socket"));
    }
}
