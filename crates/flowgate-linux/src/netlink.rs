//! Netlink framing for the rooms that talk to the kernel over raw netlink sockets
//! ([`crate::nfqueue`], [`crate::nflog`], [`crate::conntrack`], [`crate::sockdiag`]): building
//! messages and their attributes, walking the messages of a datagram and the attributes of a
//! message, sending to and receiving from the kernel, and reading its error answers.
//!
//! This room touches nothing by itself: it holds no state beyond the socket a caller opens through
//! it, and it knows no family's message types; each room keeps its own numbers, encodings and
//! decoding. It is written by hand because the netlink crates either lack these families' message
//! types (NFQUEUE verdicts carrying a conntrack mark, ctnetlink, inet_diag's `SOCK_DESTROY`) or
//! pull in far more than these few hundred lines (generic message traits, async runtimes).
//! Numbers follow `linux/netlink.h` and `linux/netfilter/nfnetlink.h`.
//!
//! Everything received is hostile input: every length is checked before it is used, nothing is
//! indexed without `get`, a length that does not fit ends a walk and marks it malformed instead of
//! being guessed at, and datagrams from anyone but the kernel are dropped (any process may send to
//! a netlink port).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, send, socket};

// linux/netlink.h
pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLA_HDRLEN: usize = 4;
pub(crate) const NLMSG_NOOP: u16 = 1;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_OVERRUN: u16 = 4;
pub(crate) const NLM_F_REQUEST: u16 = 0x01;
pub(crate) const NLM_F_ACK: u16 = 0x04;
pub(crate) const NLM_F_DUMP: u16 = 0x300; // NLM_F_ROOT | NLM_F_MATCH
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
// Strips NLA_F_NESTED and NLA_F_NET_BYTEORDER, which say how to read an attribute, not which.
pub(crate) const NLA_TYPE_MASK: u16 = 0x3fff;

// linux/netfilter/nfnetlink.h
pub(crate) const NFNETLINK_V0: u8 = 0;
pub(crate) const NFGENMSG_LEN: usize = 4;

/// How long a request waits for each answer datagram. The kernel answers while handling the
/// `send`; this only keeps a wedged socket from hanging the caller for ever.
pub(crate) const REPLY_TIMEOUT_MS: u16 = 10_000;

pub(crate) const fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

// ---- encoding -------------------------------------------------------------------------------

/// Appends a netlink header whose length [`end_msg`] fills in; returns where the message starts,
/// so several messages can be built back to back in one buffer (one `send` for a batch).
pub(crate) fn begin_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    // The kernel fills in our port id.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    start
}

/// [`begin_msg`] for nfnetlink: the type is subsystem and message, and `struct nfgenmsg`
/// (family, version, big-endian resource id) follows the header.
pub(crate) fn begin_nfmsg(
    buf: &mut Vec<u8>,
    subsys: u16,
    msg: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) -> usize {
    let start = begin_msg(buf, (subsys << 8) | msg, flags, seq);
    buf.extend_from_slice(&[family, NFNETLINK_V0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    start
}

pub(crate) fn end_msg(buf: &mut [u8], start: usize) {
    let len = u32::try_from(buf.len().saturating_sub(start)).unwrap_or(u32::MAX);
    if let Some(field) = buf.get_mut(start..start.saturating_add(4)) {
        field.copy_from_slice(&len.to_ne_bytes());
    }
}

pub(crate) fn put_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    // Every attribute built in this crate is a few bytes long; the u16 length cannot overflow.
    buf.extend_from_slice(&((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

pub(crate) fn put_be32(buf: &mut Vec<u8>, ty: u16, value: u32) {
    put_attr(buf, ty, &value.to_be_bytes());
}

/// Starts a nested attribute; [`end_nest`] writes its length once its members are in.
pub(crate) fn begin_nest(buf: &mut Vec<u8>, ty: u16) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    start
}

pub(crate) fn end_nest(buf: &mut [u8], start: usize) {
    let len = u16::try_from(buf.len().saturating_sub(start)).unwrap_or(u16::MAX);
    if let Some(field) = buf.get_mut(start..start.saturating_add(2)) {
        field.copy_from_slice(&len.to_ne_bytes());
    }
}

// ---- decoding -------------------------------------------------------------------------------

pub(crate) fn read_u16_ne(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

pub(crate) fn read_u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

pub(crate) fn read_i32_ne(b: &[u8], at: usize) -> Option<i32> {
    read_u32_ne(b, at).map(|v| v as i32)
}

pub(crate) fn be16(p: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(..2)?.try_into().ok()?))
}

pub(crate) fn be32(p: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(..4)?.try_into().ok()?))
}

pub(crate) fn be64(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

/// One netlink message: its header's type, flags and sequence number, and what follows the
/// header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NlMsg<'a> {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
}

/// A walk over length-prefixed records: the messages of a datagram ([`Messages`]) or the
/// attributes of a payload ([`Attrs`]). A record whose length does not fit ends the walk, since
/// nothing after it can be located, and sets `malformed`.
pub(crate) struct Walk<'a, T> {
    rest: &'a [u8],
    pub(crate) malformed: bool,
    /// Reads the record at the front and says how long it is. A length shorter than the record's
    /// header inverts its payload range and so fails: a walk never stands still.
    parse: fn(&'a [u8]) -> Option<(T, usize)>,
}

/// The netlink messages of one datagram.
pub(crate) type Messages<'a> = Walk<'a, NlMsg<'a>>;

/// The attributes in a payload, as (type without flags, payload).
pub(crate) type Attrs<'a> = Walk<'a, (u16, &'a [u8])>;

impl<'a> Messages<'a> {
    pub(crate) fn new(datagram: &'a [u8]) -> Self {
        let parse = |b: &'a [u8]| {
            let len = read_u32_ne(b, 0)? as usize;
            let msg = NlMsg {
                ty: read_u16_ne(b, 4)?,
                flags: read_u16_ne(b, 6)?,
                seq: read_u32_ne(b, 8)?,
                payload: b.get(NLMSG_HDRLEN..len)?,
            };
            Some((msg, len))
        };
        Walk { rest: datagram, malformed: false, parse }
    }
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(payload: &'a [u8]) -> Self {
        let parse = |b: &'a [u8]| {
            let len = usize::from(read_u16_ne(b, 0)?);
            Some(((read_u16_ne(b, 2)? & NLA_TYPE_MASK, b.get(NLA_HDRLEN..len)?), len))
        };
        Walk { rest: payload, malformed: false, parse }
    }
}

impl<T> Iterator for Walk<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        if self.rest.is_empty() {
            return None;
        }
        match (self.parse)(self.rest) {
            Some((record, len)) => {
                // The last record need not be padded.
                self.rest = self.rest.get(align4(len)..).unwrap_or_default();
                Some(record)
            }
            None => {
                self.malformed = true;
                self.rest = &[];
                None
            }
        }
    }
}

/// The payload of an `NLMSG_ERROR` (`struct nlmsgerr`): the errno as a positive number (0 is an
/// acknowledgement) and, when the echoed request header is there, the sequence number of the
/// request it answers. `None` when not even the errno is there.
pub(crate) fn error_answer(payload: &[u8]) -> Option<(i32, Option<u32>)> {
    let err = read_i32_ne(payload, 0)?;
    let seq = read_u32_ne(payload, 4 + 8);
    Some((err.saturating_neg(), seq))
}

// ---- system calls ---------------------------------------------------------------------------

/// Opens a netlink socket of `protocol` and binds it to a port the kernel picks. The error names
/// the step that failed.
pub(crate) fn open(protocol: SockProtocol, flags: SockFlag) -> Result<OwnedFd, (&'static str, Errno)> {
    let fd =
        socket(AddressFamily::Netlink, SockType::Raw, flags, protocol).map_err(|e| ("open a netlink socket", e))?;
    // Port id 0 lets the kernel pick a unique one.
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| ("bind the netlink socket", e))?;
    Ok(fd)
}

/// A netlink datagram goes to the kernel whole or not at all, so a short count is not expected;
/// it is reported rather than retried because a retry would repeat the messages before it.
pub(crate) fn send_all(fd: RawFd, data: &[u8]) -> Result<(), Errno> {
    if data.is_empty() {
        return Ok(());
    }
    loop {
        // No address: an unconnected netlink socket sends to the kernel (port 0).
        match send(fd, data, MsgFlags::empty()) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Errno::EMSGSIZE),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Receives one datagram into `buf` without waiting. `Ok(None)` means it did not come from the
/// kernel. The returned length is the datagram's full length (MSG_TRUNC), which may exceed `buf`:
/// the caller decides whether a cut datagram is worth reading.
pub(crate) fn recv_from_kernel(fd: RawFd, buf: &mut [u8]) -> Result<Option<usize>, Errno> {
    // SAFETY: sockaddr_nl is plain data, all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut addr_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and `addr`/`addr_len` describe a
    // sockaddr_nl the kernel may fill; all outlive the call.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            (&raw mut addr).cast(),
            &mut addr_len,
        )
    };
    let n = usize::try_from(Errno::result(n)?).unwrap_or(0);
    if addr.nl_family != libc::AF_NETLINK as libc::sa_family_t || addr.nl_pid != 0 {
        return Ok(None);
    }
    Ok(Some(n))
}

/// Waits up to `ms` for `fd` to become readable: false when the time ran out. An interrupted
/// wait counts as readable, so the caller simply tries to receive again.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, ms: u16) -> Result<bool, Errno> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(0) => Ok(false),
        Ok(_) | Err(Errno::EINTR) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Why a [`Socket`] operation failed; each room turns it into its own error, naming its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A system call failed.
    Os(Errno),
    /// The kernel answered the request with this errno (positive).
    Kernel(i32),
    /// An answer did not parse, or a datagram was longer than the receive buffer.
    Malformed,
    /// No answer within [`REPLY_TIMEOUT_MS`].
    Timeout,
}

/// A netlink socket with its receive buffer, for requests and their answers (one request at a
/// time) or for events.
pub(crate) struct Socket {
    fd: OwnedFd,
    buf: Vec<u8>,
    seq: u32,
    overruns: u64,
}

impl Socket {
    /// `buf_len` must hold the largest datagram the kernel sends on this socket: a longer one is
    /// [`Failure::Malformed`], since its cut-off messages cannot be read.
    pub(crate) fn open(
        protocol: SockProtocol,
        flags: SockFlag,
        buf_len: usize,
    ) -> Result<Socket, (&'static str, Errno)> {
        Ok(Socket { fd: open(protocol, flags | SockFlag::SOCK_CLOEXEC)?, buf: vec![0; buf_len], seq: 0, overruns: 0 })
    }

    pub(crate) fn seq(&self) -> u32 {
        self.seq
    }

    pub(crate) fn next_seq(&mut self) -> u32 {
        // 0 is what events carry; never use it so they cannot pass for an answer.
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// How many times the kernel said it dropped messages for this socket because its buffer was
    /// full (ENOBUFS). Each time, an unknown number was lost.
    pub(crate) fn overruns(&self) -> u64 {
        self.overruns
    }

    /// One datagram from the kernel, without waiting; `Ok(None)` when nothing is waiting. Overruns
    /// are counted and reading goes on.
    pub(crate) fn recv(&mut self) -> Result<Option<&[u8]>, Failure> {
        Ok(self.recv_len()?.and_then(|n| self.buf.get(..n)))
    }

    fn recv_len(&mut self) -> Result<Option<usize>, Failure> {
        loop {
            match recv_from_kernel(self.fd.as_raw_fd(), &mut self.buf) {
                Ok(Some(n)) if n > self.buf.len() => return Err(Failure::Malformed),
                Ok(Some(n)) => return Ok(Some(n)),
                Ok(None) | Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Ok(None),
                // The kernel dropped messages for us; the socket goes on working.
                Err(Errno::ENOBUFS) => self.overruns += 1,
                Err(e) => return Err(Failure::Os(e)),
            }
        }
    }

    /// Sends a request and reads until the kernel's acknowledgement, error or end of dump for
    /// it, passing every other message that answers it to `f`. Messages with another sequence
    /// number (stale answers, events) are skipped.
    pub(crate) fn request(&mut self, req: &[u8], seq: u32, mut f: impl FnMut(&NlMsg<'_>)) -> Result<(), Failure> {
        send_all(self.fd.as_raw_fd(), req).map_err(Failure::Os)?;
        loop {
            let n = match self.recv_len()? {
                Some(n) => n,
                None => {
                    if !wait_readable(self.fd.as_fd(), REPLY_TIMEOUT_MS).map_err(Failure::Os)? {
                        return Err(Failure::Timeout);
                    }
                    continue;
                }
            };
            let mut msgs = Messages::new(self.buf.get(..n).unwrap_or_default());
            for msg in &mut msgs {
                if msg.seq != seq {
                    continue;
                }
                match msg.ty {
                    NLMSG_ERROR | NLMSG_DONE => {
                        // nlmsgerr and NLMSG_DONE both start with a negative errno (0 = fine);
                        // a bare NLMSG_DONE has nothing and means success.
                        return match read_i32_ne(msg.payload, 0).unwrap_or(0).saturating_neg() {
                            0 => Ok(()),
                            errno => Err(Failure::Kernel(errno)),
                        };
                    }
                    NLMSG_OVERRUN => return Err(Failure::Malformed),
                    NLMSG_NOOP => {}
                    _ => f(&msg),
                }
            }
            if msgs.malformed {
                return Err(Failure::Malformed);
            }
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_messages_walk_back() {
        let mut buf = Vec::new();
        let a = begin_msg(&mut buf, 0x14, NLM_F_REQUEST, 7);
        put_attr(&mut buf, 1, &[9]);
        let n = begin_nest(&mut buf, 2);
        put_be32(&mut buf, 3, 0x0102_0304);
        end_nest(&mut buf, n);
        end_msg(&mut buf, a);
        let b = begin_nfmsg(&mut buf, 1, 2, 0, 8, 10, 0x0305);
        end_msg(&mut buf, b);
        assert_eq!(buf.len() % 4, 0);

        let mut msgs = Messages::new(&buf);
        let got: Vec<NlMsg<'_>> = (&mut msgs).collect();
        assert!(!msgs.malformed);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].ty, got[0].flags, got[0].seq), (0x14, NLM_F_REQUEST, 7));
        assert_eq!((got[1].ty, got[1].seq, got[1].payload), (0x0102, 8, &[10, 0, 3, 5][..]));

        let mut attrs = Attrs::new(got[0].payload);
        let (t1, p1) = attrs.next().unwrap();
        let (t2, p2) = attrs.next().unwrap();
        assert_eq!((t1, p1), (1, &[9][..]));
        assert_eq!(t2, 2, "the nested flag is masked off");
        assert_eq!(Attrs::new(p2).map(|(t, p)| (t, be32(p))).collect::<Vec<_>>(), [(3, Some(0x0102_0304))]);
        assert!(attrs.next().is_none() && !attrs.malformed);
    }

    #[test]
    fn lengths_that_do_not_fit_end_the_walk() {
        let mut attrs = Attrs::new(&[8, 0, 1, 0, 0]);
        assert!(attrs.next().is_none() && attrs.malformed);
        for len in [0u16, 1, 3] {
            let mut b = len.to_ne_bytes().to_vec();
            b.extend_from_slice(&[1, 0, 0, 0]);
            let mut attrs = Attrs::new(&b);
            assert!(attrs.next().is_none() && attrs.malformed, "length {len}");
        }
        for len in [0u32, 15, 17] {
            let mut m = len.to_ne_bytes().to_vec();
            m.extend_from_slice(&[0; 12]);
            let mut msgs = Messages::new(&m);
            assert!(msgs.next().is_none() && msgs.malformed, "length {len}");
        }
        assert!(read_u32_ne(&[1, 2, 3, 4], usize::MAX).is_none());
        assert!(be64(&[0; 7]).is_none());
    }

    #[test]
    fn error_answers() {
        let mut p = (-libc::ENOENT).to_ne_bytes().to_vec();
        assert_eq!(error_answer(&p), Some((libc::ENOENT, None)));
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(&42u32.to_ne_bytes());
        assert_eq!(error_answer(&p), Some((libc::ENOENT, Some(42))));
        assert_eq!(error_answer(&i32::MIN.to_ne_bytes()), Some((i32::MAX, None)));
        assert_eq!(error_answer(&[0, 0]), None);
    }
}
