//! A mock kernel for the netlink targets (`conntrack`, `nfqueue`, `sockdiag`).
//!
//! flowgate-linux decodes the kernel's netlink messages in private functions; the public API
//! reads them from a socket (`Conntrack::recv_events`, `Conntrack::dump`, `Queue::open`,
//! `Queue::recv`, `SockDiag::dump`, `SockDiag::destroy_matching`). To feed that real code the
//! fuzzer's bytes without changing the crate, this module interposes the three libc calls the
//! crate's netlink I/O goes through, `recvfrom`, `send` and `poll`: a function of the same
//! name in the executable takes precedence over glibc's for every call the program makes. Calls
//! on netlink sockets (`SO_DOMAIN` is `AF_NETLINK`) are answered from the queued deliveries;
//! every other call goes to the real system call. The sockets themselves are real (opened and
//! bound by the crate as usual), so nothing else needs faking.
//!
//! A request that asks for an answer (`NLM_F_ACK` or `NLM_F_DUMP`) gets one from the mock: an
//! `NLMSG_ERROR` (an acknowledgement or an error) or an `NLMSG_DONE`, slipped into the queue at a
//! place the input's script chooses, so the fuzzer's datagrams arrive before, between or after
//! the answers, as they can from a real kernel.
//!
//! Include this file only in the targets that need it (`#[path] mod mock_kernel;`): in any other
//! binary it would catch real netlink traffic.

#![allow(dead_code)] // each target uses a part of it

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use flowgate_fuzz::Delivery;
use libc::{c_int, c_void, nfds_t, pollfd, size_t, sockaddr, socklen_t, ssize_t};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_ACK: u16 = 0x04;
const NLM_F_DUMP: u16 = 0x300;

#[derive(Default)]
struct State {
    queue: VecDeque<Delivery>,
    /// One byte per answered request: low nibble, how many queued deliveries go before the
    /// answer; high nibble, which answer (see `answer`).
    script: VecDeque<u8>,
    last_seq: u32,
    sent: Vec<Vec<u8>>,
}

static STATE: Mutex<State> =
    Mutex::new(State { queue: VecDeque::new(), script: VecDeque::new(), last_seq: 0, sent: Vec::new() });

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts a new run: these deliveries, this answer script, nothing sent yet.
pub fn reset(deliveries: Vec<Delivery>, script: &[u8]) {
    let mut s = state();
    s.queue = deliveries.into();
    s.script = script.iter().copied().collect();
    s.last_seq = 0;
    s.sent.clear();
}

/// Deliveries not yet received.
pub fn pending() -> usize {
    state().queue.len()
}

/// Every datagram sent to the mock kernel since the last reset.
pub fn sent() -> Vec<Vec<u8>> {
    state().sent.clone()
}

fn is_netlink(fd: c_int) -> bool {
    let mut domain: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as socklen_t;
    // SAFETY: `domain` and `len` are valid for writes and outlive the call.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&raw mut domain).cast(), &mut len) };
    rc == 0 && domain == libc::AF_NETLINK
}

fn header(len: usize, ty: u16, flags: u16, seq: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_ne_bytes());
    v.extend_from_slice(&ty.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v
}

/// The messages of a datagram built by flowgate: (offset, type, flags, seq). Panics if the
/// datagram is not a clean run of whole messages, which every request must be.
fn requests(data: &[u8]) -> Vec<(usize, u16, u16, u32)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let field = |o: usize, n: usize| data.get(at + o..at + o + n).expect("a sent netlink header is cut short");
        let len = u32::from_ne_bytes(field(0, 4).try_into().unwrap()) as usize;
        assert!(len >= NLMSG_HDRLEN && at + len <= data.len(), "sent netlink message has a bad length {len}");
        let ty = u16::from_ne_bytes(field(4, 2).try_into().unwrap());
        let flags = u16::from_ne_bytes(field(6, 2).try_into().unwrap());
        let seq = u32::from_ne_bytes(field(8, 4).try_into().unwrap());
        out.push((at, ty, flags, seq));
        at += (len + 3) & !3;
    }
    assert_eq!(at, data.len(), "sent netlink datagram does not end at a message boundary");
    out
}

/// The answer the script chooses for a request: an acknowledgement, an error the crate treats
/// specially, or (for a dump) its end.
fn answer(request: &[u8], flags: u16, seq: u32, choice: u8) -> Vec<u8> {
    let errno = match choice {
        10 => libc::EPERM,
        11 => libc::EBUSY,
        12 => libc::EOPNOTSUPP,
        13 => libc::EAGAIN,
        14 => libc::ENOENT,
        15 => libc::ESTALE,
        _ => 0,
    };
    if flags & NLM_F_DUMP == NLM_F_DUMP && errno == 0 {
        let mut m = header(NLMSG_HDRLEN + 4, NLMSG_DONE, 0x2, seq);
        m.extend_from_slice(&0i32.to_ne_bytes());
        return m;
    }
    // struct nlmsgerr: the negative errno, then the request's header.
    let mut m = header(NLMSG_HDRLEN + 4 + NLMSG_HDRLEN, NLMSG_ERROR, 0, seq);
    m.extend_from_slice(&(-errno).to_ne_bytes());
    m.extend_from_slice(&request[..NLMSG_HDRLEN]);
    m
}

fn on_send(data: &[u8]) {
    let mut s = state();
    s.sent.push(data.to_vec());
    for (at, _ty, flags, seq) in requests(data) {
        if flags & NLM_F_REQUEST == 0 {
            continue;
        }
        s.last_seq = seq;
        if flags & (NLM_F_ACK | NLM_F_DUMP) == 0 {
            continue;
        }
        let b = s.script.pop_front().unwrap_or(0);
        let reply = answer(&data[at..], flags, seq, b >> 4);
        let place = usize::from(b & 0x0f).min(s.queue.len());
        s.queue.insert(place, Delivery::Datagram { bytes: reply, stamp: false, pid: 0 });
    }
}

fn stamp(bytes: &mut [u8], seq: u32) {
    let mut at = 0;
    while let Some(len) = bytes.get(at..at + 4).map(|l| u32::from_ne_bytes(l.try_into().unwrap()) as usize) {
        if let Some(field) = bytes.get_mut(at + 8..at + 12) {
            field.copy_from_slice(&seq.to_ne_bytes());
        }
        if len < NLMSG_HDRLEN {
            break;
        }
        at += (len + 3) & !3;
    }
}

fn set_errno(e: c_int) {
    // SAFETY: errno is thread-local and always valid to write.
    unsafe { *libc::__errno_location() = e };
}

/// # Safety
/// The libc contract of `recvfrom(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    addr_len: *mut socklen_t,
) -> ssize_t {
    if !is_netlink(fd) {
        // SAFETY: forwarded unchanged to the real system call.
        return unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, len, flags, addr, addr_len) as ssize_t };
    }
    let mut s = state();
    let last_seq = s.last_seq;
    let Some(d) = s.queue.pop_front() else {
        set_errno(libc::EAGAIN);
        return -1;
    };
    match d {
        Delivery::Errno(e) => {
            set_errno(e);
            -1
        }
        Delivery::Datagram { mut bytes, stamp: stamped, pid } => {
            if stamped {
                stamp(&mut bytes, last_seq);
            }
            let n = bytes.len().min(len);
            // SAFETY: the caller gave `len` writable bytes at `buf`; `n <= len`.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), n) };
            let nl_len = std::mem::size_of::<libc::sockaddr_nl>();
            // SAFETY: `addr_len` and `addr` are the caller's, checked for room before writing.
            unsafe {
                if !addr.is_null() && !addr_len.is_null() && *addr_len as usize >= nl_len {
                    let mut nl: libc::sockaddr_nl = std::mem::zeroed();
                    nl.nl_family = libc::AF_NETLINK as libc::sa_family_t;
                    nl.nl_pid = pid;
                    std::ptr::copy_nonoverlapping((&raw const nl).cast::<u8>(), addr.cast::<u8>(), nl_len);
                    *addr_len = nl_len as socklen_t;
                }
            }
            if flags & libc::MSG_TRUNC != 0 { bytes.len() as ssize_t } else { n as ssize_t }
        }
    }
}

/// # Safety
/// The libc contract of `send(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
    if !is_netlink(fd) {
        // SAFETY: forwarded unchanged to the real system call.
        return unsafe {
            libc::syscall(libc::SYS_sendto, fd, buf, len, flags, std::ptr::null::<sockaddr>(), 0 as socklen_t)
                as ssize_t
        };
    }
    // SAFETY: the caller gave `len` readable bytes at `buf`.
    let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
    on_send(data);
    len as ssize_t
}

/// # Safety
/// The libc contract of `poll(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn poll(fds: *mut pollfd, nfds: nfds_t, timeout: c_int) -> c_int {
    // SAFETY: the caller gave `nfds` pollfds at `fds`.
    let all = if fds.is_null() { &mut [][..] } else { unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) } };
    if all.is_empty() || !all.iter().all(|p| is_netlink(p.fd)) {
        // SAFETY: forwarded unchanged to the real system call.
        return unsafe { libc::syscall(libc::SYS_poll, fds, nfds, timeout) as c_int };
    }
    // The mock kernel never makes anyone wait: readable now, or never (a time-out at once).
    let ready = !state().queue.is_empty();
    for p in all.iter_mut() {
        p.revents = if ready { p.events & libc::POLLIN } else { 0 };
    }
    c_int::from(ready)
}
