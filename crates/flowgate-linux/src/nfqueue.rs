//! NFQUEUE over a raw netlink socket: bind one queue, receive the packets the installed chains
//! send to it (with hook, interfaces, conntrack state and socket owner), and answer with verdicts
//! that are batched into one `send` and can set the conntrack mark.
//!
//! This room owns one `NETLINK_NETFILTER` socket and the one queue number it binds, nothing else:
//! it installs no rules (that is [`crate::netfilter`]) and decides nothing (that is the engine).
//! The queue's messages are encoded here, on the crate's shared netlink framing (`netlink.rs`),
//! rather than taken from `libnetfilter_queue` (GPL) or the `nfq` crate (no batched verdicts, no
//! conntrack mark in a verdict); the numbers follow `linux/netfilter/nfnetlink_queue.h` and
//! `nfnetlink_conntrack.h`.
//!
//! Setting the conntrack mark from a verdict (and seeing conntrack state in packets) needs a
//! kernel with `CONFIG_NETFILTER_NETLINK_GLUE_CT`; without it the queue still works and
//! [`Queue::has_conntrack`] says false, and only the packet mark of a verdict takes effect.
//!
//! Everything the kernel sends is parsed as untrusted input: lengths are checked before every
//! read, unknown attributes are skipped, and a message that does not parse is skipped and
//! counted ([`Queue::malformed`]) instead of failing the receive loop. Received packets borrow
//! from one receive buffer allocated at [`Queue::open`], so the hot path does not allocate.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{SockFlag, SockProtocol, getsockopt, setsockopt, sockopt};

use crate::netlink::{
    self, Attrs, Messages, NFGENMSG_LEN, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NLMSG_HDRLEN, be16, be32, begin_nest,
    end_msg, end_nest, error_answer, put_attr, put_be32, read_u32_ne, recv_from_kernel, send_all,
};

/// The netfilter hook a packet was queued from, as [`QueuedPacket::hook`] reports it.
pub mod hook {
    pub const PRE_ROUTING: u8 = 0;
    pub const LOCAL_IN: u8 = 1;
    pub const FORWARD: u8 = 2;
    pub const LOCAL_OUT: u8 = 3;
    pub const POST_ROUTING: u8 = 4;
}

/// Conntrack states (`enum ip_conntrack_info`), as [`QueuedPacket::ct_info`] reports them.
pub mod ct_info {
    pub const ESTABLISHED: u32 = 0;
    pub const RELATED: u32 = 1;
    pub const NEW: u32 = 2;
    /// Added to `ESTABLISHED` or `RELATED` for packets in the reply direction.
    pub const IS_REPLY: u32 = 3;
}

// nfnetlink.h
const NFNL_SUBSYS_QUEUE: u16 = 3;
const AF_UNSPEC: u8 = 0;

// nfnetlink_queue.h
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_CFG_CMD_PF_BIND: u8 = 3;
const NFQNL_CFG_CMD_PF_UNBIND: u8 = 4;
const NFQNL_COPY_PACKET: u8 = 2;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQA_CFG_F_FAIL_OPEN: u32 = 1 << 0;
const NFQA_CFG_F_CONNTRACK: u32 = 1 << 1;
const NFQA_CFG_F_GSO: u32 = 1 << 2;
const NFQA_CFG_F_UID_GID: u32 = 1 << 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_MARK: u16 = 3;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CT: u16 = 11;
const NFQA_CT_INFO: u16 = 12;
const NFQA_UID: u16 = 16;
const NFQA_GID: u16 = 17;

// nfnetlink_conntrack.h, inside NFQA_CT.
const CTA_MARK: u16 = 8;
const CTA_MARK_MASK: u16 = 21;

/// `sizeof(struct nfqnl_msg_packet_hdr)`: packed be32 id, be16 hw_protocol, u8 hook.
const PACKET_HDR_LEN: usize = 7;

/// A packet message holds at most 64 KiB of packet (`NFQNL_MAX_COPY_RANGE`; with
/// `NFQA_CFG_F_GSO` a packet can be longer and is cut there) plus its other attributes, and a
/// datagram may hold more than one message. Allocated once, so generous room costs nothing per
/// packet.
const RECV_BUF_LEN: usize = 256 * 1024;
/// Asked for with `SO_RCVBUFFORCE`: a burst that outruns the reader makes the kernel drop (or,
/// with fail-open, accept) packets, so the socket should absorb seconds of traffic, not
/// milliseconds.
const SOCKET_RCVBUF: usize = 8 * 1024 * 1024;
/// A netlink `send` larger than the socket's send buffer fails with EMSGSIZE, so the send buffer
/// bounds how many verdicts go out in one call.
const SOCKET_SNDBUF: usize = 1024 * 1024;
/// The kernel answers config requests while handling the `send`, so the answer is already queued
/// when we wait; the timeout only guards against a lost acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How to bind a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// The queue number the rules send packets to (`--queue-num`).
    pub num: u16,
    /// How many packets the kernel holds waiting for a verdict (`NFQA_CFG_QUEUE_MAXLEN`).
    pub max_len: u32,
    /// When the queue is full (or our socket is), accept the packet instead of dropping it
    /// (`NFQA_CFG_F_FAIL_OPEN`).
    pub fail_open: bool,
    /// How many bytes of each packet to copy to user space (0xffff = the whole packet; the
    /// kernel caps it at 0xffff minus an attribute header, and takes 0 as that maximum).
    pub copy_range: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        // 1024 is the kernel's own default queue length (NFQNL_QMAX_DEFAULT).
        QueueConfig { num: 0, max_len: 1024, fail_open: false, copy_range: 0xffff }
    }
}

/// What to do with a queued packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// `NF_ACCEPT`: continue with the next hook.
    Accept,
    /// `NF_DROP`.
    Drop,
    /// `NF_REPEAT`: traverse the same hook again, so rules that act on a mark set by this verdict
    /// see it.
    Repeat,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Repeat => 4,
        }
    }
}

/// A mark a verdict sets on the packet's conntrack entry and on the packet itself.
///
/// The conntrack mark becomes `(old & !mask) | (value & mask)`: only the bits in `mask` change
/// (the kernel computes `(old & !mask) ^ value`, so `value` is masked before it is sent).
///
/// The packet mark has no mask in the verdict message: it is replaced by `value` as given,
/// clearing any bits other rules set (policy-routing marks of VPN clients, for instance). At
/// `LOCAL_OUT` a changed packet mark also makes the kernel route the packet again. Keeping the
/// other bits takes the packet's current mark ([`QueuedPacket::mark`]): use [`Mark::keeping`],
/// which gives the packet `(current & !mask) | bits` and still the conntrack mark only `bits`,
/// since the conntrack half is masked.
///
/// Kernels built without `CONFIG_NETFILTER_NETLINK_GLUE_CT` ignore the conntrack half and set
/// only the packet mark; [`Queue::has_conntrack`] tells which kind of kernel this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl Mark {
    /// Sets `bits` (within `mask`) and keeps every other bit of the packet's `current` mark.
    pub fn keeping(current: u32, bits: u32, mask: u32) -> Mark {
        Mark { value: (current & !mask) | (bits & mask), mask }
    }
}

/// One packet the kernel queued, borrowed from the queue's receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedPacket<'a> {
    /// The id a verdict names.
    pub id: u32,
    /// The link-layer protocol (0x0800 IPv4, 0x86dd IPv6), host order.
    pub hw_protocol: u16,
    /// See [`hook`].
    pub hook: u8,
    /// The IP packet, up to the queue's copy range; empty if the kernel copied nothing.
    pub payload: &'a [u8],
    pub indev: Option<u32>,
    pub outdev: Option<u32>,
    /// The conntrack mark, when the packet has a conntrack entry and the kernel reported a mark.
    pub ct_mark: Option<u32>,
    /// See [`ct_info`].
    pub ct_info: Option<u32>,
    /// The owner of the local socket that sent or will receive the packet, when there is one.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The packet's mark (`NFQA_MARK`); the kernel leaves it out when it is 0.
    pub mark: Option<u32>,
}

/// What a failed [`NfqError`] was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Open,
    Bind,
    SetParams,
    SetFlags,
    Recv,
    SendVerdicts,
    Unbind,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Open => "open",
            Operation::Bind => "bind",
            Operation::SetParams => "set params",
            Operation::SetFlags => "set flags",
            Operation::Recv => "recv",
            Operation::SendVerdicts => "send verdicts",
            Operation::Unbind => "unbind",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NfqError {
    /// A system call failed, or the kernel refused a request.
    #[error("NFQUEUE queue {queue}: {op}: {error}")]
    Os { queue: u16, op: Operation, error: io::Error },
    /// Another netlink socket (usually another process, possibly another flowgate) owns the
    /// queue: the kernel answers EPERM to a bind from a different socket and EBUSY to a second
    /// bind from the same one.
    #[error("NFQUEUE queue {queue}: bind: queue {queue} is already bound by another process ({error})")]
    AlreadyBound { queue: u16, error: io::Error },
    /// The kernel did not acknowledge a config request.
    #[error("NFQUEUE queue {queue}: {op}: no acknowledgement from the kernel within {timeout:?}")]
    NoAck { queue: u16, op: Operation, timeout: Duration },
}

impl NfqError {
    pub fn queue(&self) -> u16 {
        match self {
            NfqError::Os { queue, .. } | NfqError::AlreadyBound { queue, .. } | NfqError::NoAck { queue, .. } => *queue,
        }
    }

    pub fn operation(&self) -> Operation {
        match self {
            NfqError::Os { op, .. } | NfqError::NoAck { op, .. } => *op,
            NfqError::AlreadyBound { .. } => Operation::Bind,
        }
    }

    /// The OS error behind this one, if there is one.
    pub fn os_error(&self) -> Option<&io::Error> {
        match self {
            NfqError::Os { error, .. } | NfqError::AlreadyBound { error, .. } => Some(error),
            NfqError::NoAck { .. } => None,
        }
    }
}

/// A bound NFQUEUE queue.
///
/// The socket is non-blocking: poll [`Queue::as_fd`] for readability, then call [`Queue::recv`]
/// until it returns 0, give verdicts with [`Queue::verdict`] and send them with
/// [`Queue::flush`]. Dropping the queue sends the pending verdicts and unbinds; packets still
/// waiting for a verdict at unbind are dropped by the kernel.
pub struct Queue {
    fd: OwnedFd,
    num: u16,
    rx: Vec<u8>,
    /// Verdict messages back to back, sent by `flush`.
    tx: Vec<u8>,
    pending: usize,
    /// The largest `send` the socket accepts; `flush` splits a larger batch at message bounds.
    max_send: usize,
    seq: u32,
    bound: bool,
    conntrack: bool,
    malformed: u64,
    overruns: u64,
    kernel_errors: u64,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("fd", &self.fd)
            .field("num", &self.num)
            .field("pending", &self.pending)
            .field("bound", &self.bound)
            .field("conntrack", &self.conntrack)
            .field("malformed", &self.malformed)
            .field("overruns", &self.overruns)
            .field("kernel_errors", &self.kernel_errors)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens a netlink socket and binds queue `cfg.num` with copy-packet mode, the queue length,
    /// conntrack, GSO and uid/gid reporting, and fail-open if asked. Needs CAP_NET_ADMIN in the
    /// socket's network namespace.
    pub fn open(cfg: &QueueConfig) -> Result<Queue, NfqError> {
        let num = cfg.num;
        let os = |op, e: Errno| NfqError::Os { queue: num, op, error: io::Error::from(e) };
        let fd = netlink::open(SockProtocol::NetlinkNetFilter, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
            .map_err(|(_, e)| os(Operation::Open, e))?;
        // Only the forced sizes go past net.core.{r,w}mem_max; the plain ones are the fallback
        // without CAP_NET_ADMIN, and a smaller buffer than asked for still works.
        if setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &SOCKET_RCVBUF);
        }
        if setsockopt(&fd, sockopt::SndBufForce, &SOCKET_SNDBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::SndBuf, &SOCKET_SNDBUF);
        }
        let sndbuf = getsockopt(&fd, sockopt::SndBuf).unwrap_or(SOCKET_SNDBUF);

        let mut queue = Queue {
            fd,
            num,
            rx: vec![0; RECV_BUF_LEN],
            tx: Vec::with_capacity(64 * 1024),
            pending: 0,
            // netlink_sendmsg refuses messages longer than sk_sndbuf - 32.
            max_send: sndbuf.saturating_sub(64).max(4096),
            seq: 0,
            bound: false,
            conntrack: false,
            malformed: 0,
            overruns: 0,
            kernel_errors: 0,
        };

        // Kernels before 3.8 needed the queue handler bound per protocol family; current ones
        // accept and ignore these commands. Their answers still tell whether we may talk to
        // nfnetlink at all, which disambiguates an EPERM from the bind below.
        let mut not_permitted = false;
        for pf in [libc::AF_INET as u16, libc::AF_INET6 as u16] {
            for cmd in [NFQNL_CFG_CMD_PF_UNBIND, NFQNL_CFG_CMD_PF_BIND] {
                let r = queue.request(Operation::Open, |buf, seq| encode_cmd(buf, seq, 0, cmd, pf, NLM_F_ACK));
                if let Err(NfqError::Os { error, .. }) = r {
                    not_permitted |= error.raw_os_error() == Some(libc::EPERM);
                }
            }
        }

        match queue.request(Operation::Bind, |buf, seq| encode_cmd(buf, seq, num, NFQNL_CFG_CMD_BIND, 0, NLM_F_ACK)) {
            Ok(()) => queue.bound = true,
            Err(NfqError::Os { error, .. })
                if !not_permitted && matches!(error.raw_os_error(), Some(libc::EPERM | libc::EBUSY)) =>
            {
                return Err(NfqError::AlreadyBound { queue: num, error });
            }
            Err(e) => return Err(e),
        }
        // From here on a failure drops `queue`, which unbinds.
        queue.request(Operation::SetParams, |buf, seq| encode_params(buf, seq, num, cfg.copy_range, cfg.max_len))?;
        // No NFQA_CFG_F_GSO: the kernel cuts GSO packets into segments before queueing them, so
        // a held packet carries at most one segment's bytes and can be let through cut (a
        // verdict with a new payload on a GSO packet would go out with a wrong checksum).
        // Only packets of undecided flows are queued, so the cutting costs little.
        let flags = NFQA_CFG_F_CONNTRACK | NFQA_CFG_F_UID_GID | if cfg.fail_open { NFQA_CFG_F_FAIL_OPEN } else { 0 };
        let mask = NFQA_CFG_F_CONNTRACK | NFQA_CFG_F_GSO | NFQA_CFG_F_UID_GID | NFQA_CFG_F_FAIL_OPEN;
        let set_flags = |queue: &mut Queue, flags| {
            let r = queue.request(Operation::SetFlags, |buf, seq| encode_flags(buf, seq, num, flags, mask));
            match r {
                // EAGAIN: the kernel has just loaded nf_conntrack_netlink for us and wants the
                // request again.
                Err(e) if e.os_error().and_then(io::Error::raw_os_error) == Some(libc::EAGAIN) => {
                    queue.request(Operation::SetFlags, |buf, seq| encode_flags(buf, seq, num, flags, mask))
                }
                r => r,
            }
        };
        match set_flags(&mut queue, flags) {
            Ok(()) => queue.conntrack = true,
            // The kernel refuses NFQA_CFG_F_CONNTRACK when it was built without
            // CONFIG_NETFILTER_NETLINK_GLUE_CT. Queueing still works, only without conntrack
            // state in packets and without the conntrack half of verdict marks.
            Err(e) if e.os_error().and_then(io::Error::raw_os_error) == Some(libc::EOPNOTSUPP) => {
                set_flags(&mut queue, flags & !NFQA_CFG_F_CONNTRACK)?;
            }
            Err(e) => return Err(e),
        }
        // Packets queued before the configuration was complete (no payload copy, no conntrack
        // info) were given NF_REPEAT while we waited; send those verdicts now so they come back
        // configured.
        queue.flush()?;
        Ok(queue)
    }

    pub fn num(&self) -> u16 {
        self.num
    }

    /// Receives one datagram (non-blocking: returns Ok(0) when nothing is waiting) and calls `f`
    /// for every packet message in it. Returns the number of packets.
    ///
    /// Datagrams without packets (error answers to verdicts, malformed ones) are consumed and
    /// counted on the way, so Ok(0) always means the socket is drained.
    ///
    /// ENOBUFS (the kernel could not deliver messages because our socket buffer was full) is
    /// counted in [`Queue::overruns`] and the receive goes on: the packets it stands for were
    /// dropped by the kernel, or accepted with fail-open, so none of them waits for a verdict.
    pub fn recv(&mut self, mut f: impl FnMut(&QueuedPacket<'_>)) -> Result<usize, NfqError> {
        loop {
            let Some(len) = self.recv_datagram()? else { return Ok(0) };
            let Queue { rx, malformed, kernel_errors, .. } = self;
            let mut packets = 0;
            walk_messages(rx.get(..len).unwrap_or(&[]), |event| match event {
                Event::Packet(p) => {
                    packets += 1;
                    f(&p);
                }
                Event::Malformed => *malformed += 1,
                // Verdicts ask for no acknowledgement, so an answer here is an error: typically
                // ENOENT for a verdict on an id the kernel no longer holds.
                Event::Ack { errno, .. } => *kernel_errors += u64::from(errno != 0),
            });
            if packets > 0 {
                return Ok(packets);
            }
        }
    }

    /// Appends a verdict to the batch; nothing is sent until [`Queue::flush`].
    pub fn verdict(&mut self, id: u32, verdict: Verdict, mark: Option<Mark>) {
        let seq = self.next_seq();
        encode_verdict(&mut self.tx, seq, self.num, id, verdict, mark, None);
        self.pending += 1;
    }

    /// Appends an accept of packet `id` that goes out as `packet` instead (the whole IP packet,
    /// checksums right: the kernel takes it as it is).
    pub fn accept_changed(&mut self, id: u32, packet: &[u8]) {
        let seq = self.next_seq();
        encode_verdict(&mut self.tx, seq, self.num, id, Verdict::Accept, None, Some(packet));
        self.pending += 1;
    }

    /// Sends every batched verdict, back to back in one `send`. A batch larger than the
    /// socket's send buffer (thousands of verdicts) goes out in as few sends as fit. No-op when
    /// nothing is pending.
    ///
    /// On failure the verdicts not yet sent stay in the batch for the next flush: a verdict that
    /// never arrives leaves its packet queued until unbind.
    pub fn flush(&mut self) -> Result<(), NfqError> {
        let mut sent = 0;
        while sent < self.tx.len() {
            let end = chunk_end(&self.tx, sent, self.max_send);
            let chunk = self.tx.get(sent..end).unwrap_or(&[]);
            if let Err(e) = send_all(self.fd.as_raw_fd(), chunk) {
                self.pending -= count_messages(self.tx.get(..sent).unwrap_or(&[]));
                self.tx.drain(..sent);
                return Err(NfqError::Os { queue: self.num, op: Operation::SendVerdicts, error: e.into() });
            }
            sent = end;
        }
        self.tx.clear();
        self.pending = 0;
        Ok(())
    }

    /// Sends the pending verdicts, then stops queueing (`NFQNL_CFG_CMD_UNBIND`). Packets the
    /// kernel still holds are dropped by it; the rules keep sending new packets to the queue
    /// number, which the kernel drops too unless they use `--queue-bypass`.
    pub fn unbind(&mut self) -> Result<(), NfqError> {
        let flushed = self.flush();
        if self.bound {
            let num = self.num;
            self.request(Operation::Unbind, |buf, seq| encode_cmd(buf, seq, num, NFQNL_CFG_CMD_UNBIND, 0, NLM_F_ACK))?;
            self.bound = false;
            // Packets received while waiting were given NF_REPEAT, but their queue is gone.
            self.tx.clear();
            self.pending = 0;
        }
        flushed
    }

    /// Whether the kernel reports conntrack state and applies the conntrack half of a verdict's
    /// [`Mark`]. Both need `CONFIG_NETFILTER_NETLINK_GLUE_CT`, which most distribution kernels
    /// enable. Without it, [`QueuedPacket::ct_mark`] and [`QueuedPacket::ct_info`] are always
    /// `None`, and the kernel silently ignores `NFQA_CT` in verdicts: a verdict's mark reaches
    /// only the packet, and rules have to copy it to the conntrack entry (`CONNMARK
    /// --save-mark`).
    pub fn has_conntrack(&self) -> bool {
        self.conntrack
    }

    /// Messages skipped because they did not parse.
    pub fn malformed(&self) -> u64 {
        self.malformed
    }

    /// Times the kernel reported ENOBUFS: our socket buffer overflowed and packets were dropped
    /// (or accepted, with fail-open). One report can stand for many packets.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }

    /// Error answers the kernel sent to verdicts (for instance for an unknown packet id).
    pub fn kernel_errors(&self) -> u64 {
        self.kernel_errors
    }

    /// Verdicts waiting for [`Queue::flush`].
    pub fn pending(&self) -> usize {
        self.pending
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// `Ok(None)` when nothing is waiting; datagrams from anyone but the kernel are counted as
    /// malformed and skipped.
    fn recv_datagram(&mut self) -> Result<Option<usize>, NfqError> {
        loop {
            match recv_from_kernel(self.fd.as_raw_fd(), &mut self.rx) {
                Ok(Some(len)) => return Ok(Some(len.min(self.rx.len()))),
                Ok(None) => self.malformed += 1,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => {}
                Err(Errno::ENOBUFS) => self.overruns += 1,
                Err(e) => {
                    return Err(NfqError::Os { queue: self.num, op: Operation::Recv, error: e.into() });
                }
            }
        }
    }

    /// Sends one config message with NLM_F_ACK and waits for the kernel's answer to it.
    fn request(&mut self, op: Operation, build: impl FnOnce(&mut Vec<u8>, u32)) -> Result<(), NfqError> {
        let seq = self.next_seq();
        let mut msg = Vec::with_capacity(64);
        build(&mut msg, seq);
        let num = self.num;
        let os = |e: Errno| NfqError::Os { queue: num, op, error: e.into() };
        send_all(self.fd.as_raw_fd(), &msg).map_err(os)?;

        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let Some(len) = self.recv_datagram()? else {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(NfqError::NoAck { queue: num, op, timeout: ACK_TIMEOUT });
                }
                let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX).max(1);
                netlink::wait_readable(self.fd.as_fd(), ms).map_err(os)?;
                continue;
            };
            let Queue { rx, tx, pending, seq: next, malformed, .. } = self;
            let mut answer = None;
            walk_messages(rx.get(..len).unwrap_or(&[]), |event| match event {
                Event::Ack { seq: Some(s), errno } if s == seq => answer = Some(errno),
                Event::Ack { .. } => {}
                Event::Packet(p) => {
                    *next = next.wrapping_add(1);
                    encode_verdict(tx, *next, num, p.id, Verdict::Repeat, None, None);
                    *pending += 1;
                }
                Event::Malformed => *malformed += 1,
            });
            match answer {
                Some(0) => return Ok(()),
                Some(errno) => {
                    return Err(NfqError::Os { queue: num, op, error: io::Error::from_raw_os_error(errno) });
                }
                None => {}
            }
        }
    }
}

/// What the kernel counts for one queue (`/proc/net/netfilter/nfnetlink_queue` of the calling
/// thread's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelQueueStats {
    pub queue: u16,
    /// Packets waiting in the queue now.
    pub waiting: u64,
    /// Packets dropped because the queue was full (fail-closed; a fail-open queue lets them
    /// pass instead, and the kernel does not count those).
    pub dropped: u64,
    /// Packets the kernel could not send to the program (its socket buffer was full).
    pub user_dropped: u64,
}

/// The kernel's counters of every bound queue in this namespace.
pub fn kernel_stats() -> io::Result<Vec<KernelQueueStats>> {
    Ok(parse_kernel_stats(&std::fs::read_to_string("/proc/net/netfilter/nfnetlink_queue")?))
}

/// Lines of `queue_number peer_portid queue_total copy_mode copy_range queue_dropped
/// user_dropped id_sequence 1`; lines that do not read so are skipped.
fn parse_kernel_stats(text: &str) -> Vec<KernelQueueStats> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            Some(KernelQueueStats {
                queue: u16::try_from(*f.first()?).ok()?,
                waiting: *f.get(2)?,
                dropped: *f.get(5)?,
                user_dropped: *f.get(6)?,
            })
        })
        .collect()
}

impl Drop for Queue {
    fn drop(&mut self) {
        let _ = self.flush();
        if self.bound {
            // Closing the socket unbinds as well; saying so first does not wait for an answer.
            let mut msg = Vec::with_capacity(32);
            let seq = self.next_seq();
            encode_cmd(&mut msg, seq, self.num, NFQNL_CFG_CMD_UNBIND, 0, 0);
            let _ = send_all(self.fd.as_raw_fd(), &msg);
        }
    }
}

impl AsFd for Queue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The end of the longest run of whole messages from `start` that fits in `max` bytes (at least
/// one message).
fn chunk_end(buf: &[u8], start: usize, max: usize) -> usize {
    let mut end = start;
    while let Some(len) = read_u32_ne(buf, end) {
        let next = end.saturating_add((len as usize).max(NLMSG_HDRLEN)).min(buf.len());
        if end > start && next - start > max {
            break;
        }
        end = next;
    }
    if end == start { buf.len() } else { end }
}

fn count_messages(buf: &[u8]) -> usize {
    let mut n = 0;
    let mut at = 0;
    while let Some(len) = read_u32_ne(buf, at) {
        at = at.saturating_add((len as usize).max(NLMSG_HDRLEN));
        n += 1;
    }
    n
}

// ---- encoding -------------------------------------------------------------------------------

/// Starts a queue-subsystem message; [`end_msg`] writes its length.
fn begin_msg(buf: &mut Vec<u8>, msg: u16, flags: u16, seq: u32, res_id: u16) -> usize {
    netlink::begin_nfmsg(buf, NFNL_SUBSYS_QUEUE, msg, flags, seq, AF_UNSPEC, res_id)
}

/// A config command; `extra_flags` is NLM_F_ACK or 0.
fn encode_cmd(buf: &mut Vec<u8>, seq: u32, queue: u16, cmd: u8, pf: u16, extra_flags: u16) {
    let start = begin_msg(buf, NFQNL_MSG_CONFIG, NLM_F_REQUEST | extra_flags, seq, queue);
    let pf = pf.to_be_bytes();
    put_attr(buf, NFQA_CFG_CMD, &[cmd, 0, pf[0], pf[1]]);
    end_msg(buf, start);
}

fn encode_params(buf: &mut Vec<u8>, seq: u32, queue: u16, copy_range: u32, max_len: u32) {
    let start = begin_msg(buf, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue);
    let range = copy_range.to_be_bytes();
    put_attr(buf, NFQA_CFG_PARAMS, &[range[0], range[1], range[2], range[3], NFQNL_COPY_PACKET]);
    put_be32(buf, NFQA_CFG_QUEUE_MAXLEN, max_len);
    end_msg(buf, start);
}

fn encode_flags(buf: &mut Vec<u8>, seq: u32, queue: u16, flags: u32, mask: u32) {
    let start = begin_msg(buf, NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, queue);
    put_be32(buf, NFQA_CFG_MASK, mask);
    put_be32(buf, NFQA_CFG_FLAGS, flags);
    end_msg(buf, start);
}

/// A single-packet verdict (NFQNL_MSG_VERDICT). NFQNL_MSG_VERDICT_BATCH is not used: it gives
/// one verdict to every id up to a bound and cannot carry NFQA_CT.
fn encode_verdict(
    buf: &mut Vec<u8>,
    seq: u32,
    queue: u16,
    id: u32,
    verdict: Verdict,
    mark: Option<Mark>,
    payload: Option<&[u8]>,
) {
    let start = begin_msg(buf, NFQNL_MSG_VERDICT, NLM_F_REQUEST, seq, queue);
    let code = verdict.code().to_be_bytes();
    let id = id.to_be_bytes();
    put_attr(buf, NFQA_VERDICT_HDR, &[code[0], code[1], code[2], code[3], id[0], id[1], id[2], id[3]]);
    if let Some(mark) = mark {
        put_be32(buf, NFQA_MARK, mark.value);
        let nest = begin_nest(buf, NFQA_CT);
        put_be32(buf, CTA_MARK, mark.value & mark.mask);
        put_be32(buf, CTA_MARK_MASK, mark.mask);
        end_nest(buf, nest);
    }
    if let Some(p) = payload {
        put_attr(buf, NFQA_PAYLOAD, p);
    }
    end_msg(buf, start);
}

// ---- parsing --------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Event<'a> {
    Packet(QueuedPacket<'a>),
    /// NLMSG_ERROR: `errno` 0 is an acknowledgement. `seq` is that of the request answered.
    Ack {
        seq: Option<u32>,
        errno: i32,
    },
    Malformed,
}

/// Calls `f` for every message in a datagram. A header that does not fit ends the walk, since
/// nothing after it can be located.
fn walk_messages<'a>(data: &'a [u8], mut f: impl FnMut(Event<'a>)) {
    let mut msgs = Messages::new(data);
    for msg in &mut msgs {
        if msg.ty == NLMSG_ERROR {
            f(error_answer(msg.payload).map_or(Event::Malformed, |(errno, seq)| Event::Ack { seq, errno }));
        } else if msg.ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
            f(parse_packet(msg.payload).map_or(Event::Malformed, Event::Packet));
        }
        // NLMSG_NOOP, NLMSG_DONE and anything newer are not ours to act on.
    }
    if msgs.malformed {
        f(Event::Malformed);
    }
}

/// The body of an NFQNL_MSG_PACKET (after the netlink header). `None` if it is malformed or has
/// no packet header (without an id there is nothing to give a verdict to).
fn parse_packet(body: &[u8]) -> Option<QueuedPacket<'_>> {
    let mut header = None;
    let mut p = QueuedPacket {
        id: 0,
        hw_protocol: 0,
        hook: 0,
        payload: &[],
        indev: None,
        outdev: None,
        ct_mark: None,
        ct_info: None,
        uid: None,
        gid: None,
        mark: None,
    };
    let mut attrs = Attrs::new(body.get(NFGENMSG_LEN..)?);
    for (ty, v) in &mut attrs {
        match ty {
            NFQA_PACKET_HDR => {
                let hdr = v.get(..PACKET_HDR_LEN)?;
                header = Some((be32(hdr)?, be16(hdr.get(4..)?)?, *hdr.get(6)?));
            }
            NFQA_IFINDEX_INDEV => p.indev = Some(be32(v)?),
            NFQA_IFINDEX_OUTDEV => p.outdev = Some(be32(v)?),
            NFQA_PAYLOAD => p.payload = v,
            NFQA_CT => p.ct_mark = ct_mark(v)?,
            NFQA_CT_INFO => p.ct_info = Some(be32(v)?),
            NFQA_UID => p.uid = Some(be32(v)?),
            NFQA_GID => p.gid = Some(be32(v)?),
            NFQA_MARK => p.mark = Some(be32(v)?),
            _ => {}
        }
    }
    if attrs.malformed {
        return None;
    }
    (p.id, p.hw_protocol, p.hook) = header?;
    Some(p)
}

/// The mark inside `NFQA_CT`: `Some(None)` when it has none, `None` when the nest is malformed.
fn ct_mark(nest: &[u8]) -> Option<Option<u32>> {
    let mut mark = None;
    let mut attrs = Attrs::new(nest);
    for (ty, v) in &mut attrs {
        if ty == CTA_MARK {
            mark = Some(be32(v)?);
        }
    }
    (!attrs.malformed).then_some(mark)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_queue_counters_are_read_from_procfs_lines() {
        let text =
            "    0  12345     3 2 65535     7     9 1000 1\n    1  12346     0 2 65535     0     0   20 1\nbroken\n";
        let got = parse_kernel_stats(text);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], KernelQueueStats { queue: 0, waiting: 3, dropped: 7, user_dropped: 9 });
        assert_eq!(got[1].queue, 1);
    }

    use nix::sys::socket::{AddressFamily, MsgFlags, SockType};

    use super::*;
    use crate::netlink::NLA_F_NESTED;

    fn nlmsghdr(len: u32, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v
    }

    fn attr_hdr(len: u16, ty: u16) -> Vec<u8> {
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&ty.to_ne_bytes());
        v
    }

    #[test]
    fn bind_command_bytes() {
        let mut buf = Vec::new();
        encode_cmd(&mut buf, 7, 3, NFQNL_CFG_CMD_BIND, 0, NLM_F_ACK);
        let mut want = nlmsghdr(28, 0x0302, 0x0005, 7);
        want.extend_from_slice(&[0, 0, 0x00, 0x03]);
        want.extend(attr_hdr(8, 1));
        want.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(buf, want);

        let mut buf = Vec::new();
        encode_cmd(&mut buf, 1, 0, NFQNL_CFG_CMD_PF_UNBIND, libc::AF_INET6 as u16, NLM_F_ACK);
        let mut want_attr = attr_hdr(8, 1);
        // struct nfqnl_msg_config_cmd: command, pad, be16 pf.
        want_attr.extend_from_slice(&[4, 0, 0, 10]);
        assert_eq!(&buf[20..], &want_attr[..]);
        assert_eq!(&buf[16..20], &[0, 0, 0, 0], "PF commands carry queue 0");
    }

    #[test]
    fn params_and_flags_bytes() {
        let mut buf = Vec::new();
        encode_params(&mut buf, 9, 0x0102, 0xffff, 4096);
        let mut want = nlmsghdr(40, 0x0302, 0x0005, 9);
        want.extend_from_slice(&[0, 0, 0x01, 0x02]);
        // struct nfqnl_msg_config_params is packed: 5 bytes, padded to 8.
        want.extend(attr_hdr(9, 2));
        want.extend_from_slice(&[0x00, 0x00, 0xff, 0xff, 2, 0, 0, 0]);
        want.extend(attr_hdr(8, 3));
        want.extend_from_slice(&[0x00, 0x00, 0x10, 0x00]);
        assert_eq!(buf, want);

        let mut buf = Vec::new();
        encode_flags(&mut buf, 10, 5, 0x0f, 0x0f);
        let mut want = nlmsghdr(36, 0x0302, 0x0005, 10);
        want.extend_from_slice(&[0, 0, 0, 5]);
        want.extend(attr_hdr(8, 4));
        want.extend_from_slice(&[0, 0, 0, 0x0f]);
        want.extend(attr_hdr(8, 5));
        want.extend_from_slice(&[0, 0, 0, 0x0f]);
        assert_eq!(buf, want);
    }

    #[test]
    fn verdict_without_mark_bytes() {
        let mut buf = Vec::new();
        encode_verdict(&mut buf, 0x11, 3, 0x0a0b0c0d, Verdict::Accept, None, None);
        let mut want = nlmsghdr(32, 0x0301, 0x0001, 0x11);
        want.extend_from_slice(&[0, 0, 0, 3]);
        want.extend(attr_hdr(12, 2));
        want.extend_from_slice(&[0, 0, 0, 1, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(buf, want);

        for (v, code) in [(Verdict::Drop, 0u8), (Verdict::Repeat, 4)] {
            let mut buf = Vec::new();
            encode_verdict(&mut buf, 1, 0, 1, v, None, None);
            assert_eq!(&buf[24..28], &[0, 0, 0, code]);
        }
    }

    #[test]
    fn verdict_with_mark_bytes() {
        let mut buf = Vec::new();
        // Bit 0 is outside the mask: it goes to the packet mark but not to the conntrack mark.
        let mark = Mark { value: 0x0001_0001, mask: 0x0003_0000 };
        encode_verdict(&mut buf, 2, 3, 42, Verdict::Accept, Some(mark), None);
        let mut want = nlmsghdr(60, 0x0301, 0x0001, 2);
        want.extend_from_slice(&[0, 0, 0, 3]);
        want.extend(attr_hdr(12, 2));
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 42]);
        want.extend(attr_hdr(8, 3));
        want.extend_from_slice(&[0x00, 0x01, 0x00, 0x01]);
        want.extend(attr_hdr(20, 0x8000 | 11));
        want.extend(attr_hdr(8, 8));
        want.extend_from_slice(&[0x00, 0x01, 0x00, 0x00]);
        want.extend(attr_hdr(8, 21));
        want.extend_from_slice(&[0x00, 0x03, 0x00, 0x00]);
        assert_eq!(buf, want);
        assert_eq!(buf.len() % 4, 0);
    }

    fn test_queue(fd: OwnedFd) -> Queue {
        Queue {
            fd,
            num: 3,
            rx: vec![0; RECV_BUF_LEN],
            tx: Vec::new(),
            pending: 0,
            max_send: 1 << 20,
            seq: 0,
            // Not bound: Drop must not send an unbind into the test's socket pair.
            bound: false,
            conntrack: false,
            malformed: 0,
            overruns: 0,
            kernel_errors: 0,
        }
    }

    fn socket_pair() -> (OwnedFd, OwnedFd) {
        nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )
        .expect("socketpair")
    }

    fn recv_all(fd: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    #[test]
    fn verdicts_are_batched_into_one_send() {
        let (ours, peer) = socket_pair();
        let mut q = test_queue(ours);
        q.flush().expect("empty flush");
        assert!(recv_all(&peer).is_empty(), "an empty flush sends nothing");

        let allow = Mark { value: 0x1_0000, mask: 0x3_0000 };
        q.verdict(1, Verdict::Accept, Some(allow));
        q.verdict(2, Verdict::Drop, None);
        q.verdict(3, Verdict::Repeat, Some(allow));
        assert_eq!(q.pending(), 3);
        assert!(recv_all(&peer).is_empty(), "verdict() does not send");
        q.flush().expect("flush");
        assert_eq!(q.pending(), 0);

        let datagrams = recv_all(&peer);
        assert_eq!(datagrams.len(), 1, "one send for the whole batch");
        let d = &datagrams[0];
        assert_eq!(d.len(), 60 + 32 + 60);
        let mut expected = Vec::new();
        encode_verdict(&mut expected, 1, 3, 1, Verdict::Accept, Some(allow), None);
        encode_verdict(&mut expected, 2, 3, 2, Verdict::Drop, None, None);
        encode_verdict(&mut expected, 3, 3, 3, Verdict::Repeat, Some(allow), None);
        assert_eq!(d, &expected);

        q.flush().expect("second flush");
        assert!(recv_all(&peer).is_empty(), "the batch is emptied by flush");
    }

    #[test]
    fn datagrams_not_from_the_kernel_are_skipped() {
        let (ours, peer) = socket_pair();
        let mut q = test_queue(ours);
        // A well-formed packet message, but from a peer that is not the kernel.
        let msg = packet_message(1, b"spoofed");
        nix::sys::socket::send(peer.as_raw_fd(), &msg, MsgFlags::empty()).expect("send");
        assert_eq!(q.recv(|p| panic!("accepted a foreign packet: {p:?}")).expect("recv"), 0);
        assert_eq!(q.malformed(), 1);
        assert_eq!(q.recv(|_| {}).expect("recv"), 0, "drained: EAGAIN is Ok(0)");
    }

    #[test]
    fn large_batches_split_at_message_bounds() {
        let (ours, peer) = socket_pair();
        let mut q = test_queue(ours);
        q.max_send = 100;
        for id in 0..5 {
            q.verdict(id, Verdict::Accept, Some(Mark { value: 1, mask: 1 }));
        }
        q.flush().expect("flush");
        let datagrams = recv_all(&peer);
        // 60-byte messages, at most 100 bytes per send: one per send.
        assert_eq!(datagrams.len(), 5);
        assert!(datagrams.iter().all(|d| d.len() == 60));
    }

    /// A packet message as the kernel builds it, with every attribute we read and some we skip.
    fn packet_message(id: u32, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = begin_msg(&mut buf, NFQNL_MSG_PACKET, 0, 0, 3);
        buf[16] = libc::AF_INET as u8;
        let id = id.to_be_bytes();
        put_attr(&mut buf, NFQA_PACKET_HDR, &[id[0], id[1], id[2], id[3], 0x08, 0x00, 3]);
        put_be32(&mut buf, NFQA_MARK, 0x55);
        put_attr(&mut buf, 4, &[0; 16]); // NFQA_TIMESTAMP
        put_be32(&mut buf, NFQA_IFINDEX_INDEV, 7);
        put_be32(&mut buf, NFQA_IFINDEX_OUTDEV, 1);
        put_be32(&mut buf, 7, 9); // NFQA_IFINDEX_PHYSINDEV
        put_attr(&mut buf, 9, &[0, 6, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0]); // NFQA_HWADDR
        let nest = begin_nest(&mut buf, NFQA_CT);
        let tuple = begin_nest(&mut buf, 1); // CTA_TUPLE_ORIG
        put_attr(&mut buf, 1, &[1, 2, 3]);
        end_nest(&mut buf, tuple);
        put_be32(&mut buf, 3, 0x188); // CTA_STATUS
        put_be32(&mut buf, CTA_MARK, 0x0001_0004);
        put_be32(&mut buf, 12, 99); // CTA_ID
        end_nest(&mut buf, nest);
        put_be32(&mut buf, NFQA_CT_INFO, 2);
        put_be32(&mut buf, 13, 1500); // NFQA_CAP_LEN
        put_be32(&mut buf, 14, 0); // NFQA_SKB_INFO
        put_be32(&mut buf, NFQA_UID, 1000);
        put_be32(&mut buf, NFQA_GID, 100);
        put_attr(&mut buf, 0x3ff0, b"future attribute");
        put_attr(&mut buf, NFQA_PAYLOAD, payload);
        end_msg(&mut buf, start);
        buf
    }

    fn events(data: &[u8]) -> Vec<Event<'_>> {
        let mut out = Vec::new();
        walk_messages(data, |e| out.push(e));
        out
    }

    #[test]
    fn parses_a_packet_with_all_attributes() {
        let payload = [0x45u8, 0, 0, 33, 1, 2, 3];
        let msg = packet_message(0x01020304, &payload);
        let got = events(&msg);
        assert_eq!(
            got,
            vec![Event::Packet(QueuedPacket {
                id: 0x01020304,
                hw_protocol: 0x0800,
                hook: hook::LOCAL_OUT,
                payload: &payload,
                indev: Some(7),
                outdev: Some(1),
                ct_mark: Some(0x0001_0004),
                ct_info: Some(ct_info::NEW),
                uid: Some(1000),
                gid: Some(100),
                mark: Some(0x55),
            })]
        );
    }

    #[test]
    fn minimal_packet_has_no_options() {
        let mut buf = Vec::new();
        let start = begin_msg(&mut buf, NFQNL_MSG_PACKET, 0, 0, 0);
        put_attr(&mut buf, NFQA_PACKET_HDR, &[0, 0, 0, 9, 0x86, 0xdd, 1]);
        end_msg(&mut buf, start);
        let Event::Packet(p) = &events(&buf)[0] else { panic!("not a packet") };
        assert_eq!((p.id, p.hw_protocol, p.hook), (9, 0x86dd, 1));
        assert_eq!(p.payload, &[] as &[u8]);
        assert_eq!((p.indev, p.outdev, p.ct_mark, p.ct_info, p.uid, p.gid), (None, None, None, None, None, None));
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut data = packet_message(1, b"one");
        data.extend(packet_message(2, b"second"));
        // An error answer (ENOENT to a verdict with seq 77) and a NOOP in between.
        let mut err = nlmsghdr(36, NLMSG_ERROR, 0, 0);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend(nlmsghdr(32, 0x0301, 1, 77));
        data.extend(err);
        data.extend(nlmsghdr(16, 1, 0, 0));
        data.extend(packet_message(3, b"three"));
        let got = events(&data);
        assert_eq!(got.len(), 4);
        let ids: Vec<u32> = got
            .iter()
            .filter_map(|e| match e {
                Event::Packet(p) => Some(p.id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(got[2], Event::Ack { seq: Some(77), errno: libc::ENOENT });
    }

    #[test]
    fn parses_acks() {
        let mut ack = nlmsghdr(36, NLMSG_ERROR, 0x100, 0);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend(nlmsghdr(28, 0x0302, 5, 12));
        assert_eq!(events(&ack), vec![Event::Ack { seq: Some(12), errno: 0 }]);
        // Cut short after the errno: still an answer, to an unknown request.
        let mut short = nlmsghdr(20, NLMSG_ERROR, 0, 0);
        short.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(events(&short), vec![Event::Ack { seq: None, errno: libc::EPERM }]);
    }

    #[test]
    fn malformed_messages_are_reported_not_parsed() {
        // No packet header.
        let mut buf = Vec::new();
        let start = begin_msg(&mut buf, NFQNL_MSG_PACKET, 0, 0, 0);
        put_attr(&mut buf, NFQA_PAYLOAD, b"x");
        end_msg(&mut buf, start);
        assert_eq!(events(&buf), vec![Event::Malformed]);

        // A packet header too short, a be32 attribute too short, a nested attribute that
        // overruns its parent.
        for (ty, payload) in [(NFQA_PACKET_HDR, &[0u8; 6][..]), (NFQA_UID, &[0u8; 3][..])] {
            let mut buf = Vec::new();
            let start = begin_msg(&mut buf, NFQNL_MSG_PACKET, 0, 0, 0);
            put_attr(&mut buf, NFQA_PACKET_HDR, &[0, 0, 0, 1, 8, 0, 3]);
            put_attr(&mut buf, ty, payload);
            end_msg(&mut buf, start);
            assert_eq!(events(&buf), vec![Event::Malformed], "attr {ty}");
        }
        let mut buf = Vec::new();
        let start = begin_msg(&mut buf, NFQNL_MSG_PACKET, 0, 0, 0);
        put_attr(&mut buf, NFQA_PACKET_HDR, &[0, 0, 0, 1, 8, 0, 3]);
        let mut ct = attr_hdr(40, CTA_MARK);
        ct.extend_from_slice(&[0; 4]);
        put_attr(&mut buf, NFQA_CT | NLA_F_NESTED, &ct);
        end_msg(&mut buf, start);
        assert_eq!(events(&buf), vec![Event::Malformed]);

        // A header whose length is below the header size must not loop forever.
        assert_eq!(events(&nlmsghdr(0, 0x0300, 0, 0)), vec![Event::Malformed]);
        assert_eq!(events(&nlmsghdr(8, 0x0300, 0, 0)), vec![Event::Malformed]);
    }

    #[test]
    fn every_prefix_and_every_corruption_is_safe() {
        let msg = packet_message(5, b"abcdefghijklmnopqrstuvwxyz");
        for cut in 0..msg.len() {
            let got = events(&msg[..cut]);
            assert!(got.iter().all(|e| *e == Event::Malformed), "prefix {cut}: {got:?}");
            if cut > 0 {
                assert!(!got.is_empty(), "prefix {cut} went unnoticed");
            }
            // The same prefix with a consistent message length: the attributes are cut instead.
            if cut >= NLMSG_HDRLEN {
                let mut m = msg[..cut].to_vec();
                m[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
                let _ = events(&m);
            }
        }
        for i in 0..msg.len() {
            for bit in 0..8 {
                let mut m = msg.clone();
                m[i] ^= 1 << bit;
                let _ = events(&m);
            }
            for byte in [0x00, 0xff, 0x04, 0x80] {
                let mut m = msg.clone();
                m[i] = byte;
                let _ = events(&m);
            }
        }
    }

    #[test]
    fn random_bytes_are_safe() {
        // xorshift: deterministic, no extra crate.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut buf = Vec::new();
        for round in 0..20_000 {
            buf.clear();
            let len = (next() % 512) as usize;
            buf.extend((0..len).map(|_| next() as u8));
            if round % 2 == 0 && len >= 20 {
                // A plausible header so the attribute walker sees the noise.
                let total = (len as u32).to_ne_bytes();
                buf[..4].copy_from_slice(&total);
                buf[4..6].copy_from_slice(&0x0300u16.to_ne_bytes());
            }
            let _ = events(&buf);
        }
    }

    #[test]
    fn chunking_never_splits_a_message() {
        let mut buf = Vec::new();
        for id in 0..10 {
            encode_verdict(
                &mut buf,
                id,
                0,
                id,
                Verdict::Accept,
                (id % 2 == 0).then_some(Mark { value: 1, mask: 1 }),
                None,
            );
        }
        assert_eq!(count_messages(&buf), 10);
        for max in [1, 31, 32, 60, 61, 92, 200, 10_000] {
            let mut at = 0;
            let mut n = 0;
            while at < buf.len() {
                let end = chunk_end(&buf, at, max);
                assert!(end > at);
                n += count_messages(&buf[at..end]);
                at = end;
            }
            assert_eq!(at, buf.len());
            assert_eq!(n, 10);
        }
    }

    #[test]
    fn errors_name_queue_and_operation() {
        let e = NfqError::AlreadyBound { queue: 3, error: io::Error::from_raw_os_error(libc::EPERM) };
        let s = e.to_string();
        assert!(s.contains("queue 3 is already bound by another process"), "{s}");
        let e =
            NfqError::Os { queue: 4, op: Operation::SendVerdicts, error: io::Error::from_raw_os_error(libc::ENOBUFS) };
        let s = e.to_string();
        assert!(s.contains("queue 4") && s.contains("send verdicts") && s.contains("os error"), "{s}");
        assert_eq!(e.queue(), 4);
        assert_eq!(e.operation(), Operation::SendVerdicts);
    }
}
