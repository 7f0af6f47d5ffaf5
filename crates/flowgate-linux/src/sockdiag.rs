//! The host's own TCP and UDP sockets through sock_diag (`NETLINK_SOCK_DIAG`, inet_diag): list
//! them, and destroy one (`SOCK_DESTROY`). Destroying is how a live connection is cut from outside
//! the program that holds it: the kernel aborts the socket, the program's pending and next calls
//! fail at once with `ECONNABORTED`, and a TCP peer gets a reset. Dropping the flow's packets
//! instead would leave both ends waiting for their timeouts.
//!
//! This room owns one `NETLINK_SOCK_DIAG` socket of the calling thread's network namespace and
//! touches nothing else: it decides nothing (the daemon says which connection to cut) and installs
//! no rule. Listing needs no privilege; destroying needs CAP_NET_ADMIN and a kernel built with
//! `CONFIG_INET_DIAG_DESTROY`. Numbers follow `linux/sock_diag.h` and `linux/inet_diag.h`;
//! messages are built and walked with the crate's shared netlink framing (`netlink.rs`), and every
//! answer is parsed as untrusted input: a message too short for its structure, or of another
//! family, is skipped.
//!
//! Dual-stack sockets: an IPv6 socket that talks to an IPv4 peer has IPv4-mapped addresses
//! (`::ffff:a.b.c.d`). [`SocketInfo`] reports them as plain IPv4, so that they compare equal with
//! the tuples of [`crate::conntrack`], and keeps the family the kernel reported in a private field:
//! [`SockDiag::destroy`] names the socket to the kernel exactly as the kernel described it
//! (family `AF_INET6`, mapped addresses). A `SocketInfo` therefore comes from the kernel (a dump,
//! or the lookup [`SockDiag::destroy_matching`] makes first); it cannot be made up.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::sys::socket::{SockFlag, SockProtocol};

use crate::netlink::{self, Failure, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, REPLY_TIMEOUT_MS, be16, read_u32_ne};

/// `IPPROTO_TCP`.
pub const TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const UDP: u8 = 17;

/// Socket states (`TCP_*` of `include/net/tcp_states.h`), and the masks [`SockDiag::dump`] takes:
/// one bit per state, `1 << state`. UDP sockets use two of them: [`ESTABLISHED`](state::ESTABLISHED)
/// when connected, [`CLOSE`](state::CLOSE) when not.
pub mod state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;

    /// Every TCP connection that is opening, open or still closing with a program behind it: what
    /// "every live connection" means. Listeners and TIME_WAIT remnants are left out.
    pub const TCP_CONNECTIONS: u32 = 1 << ESTABLISHED
        | 1 << SYN_SENT
        | 1 << SYN_RECV
        | 1 << FIN_WAIT1
        | 1 << FIN_WAIT2
        | 1 << CLOSE_WAIT
        | 1 << LAST_ACK
        | 1 << CLOSING;
    /// Every UDP socket, connected or not.
    pub const UDP_ALL: u32 = 1 << ESTABLISHED | 1 << CLOSE;
}

// linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;

// linux/inet_diag.h: sizes of struct inet_diag_req_v2 and struct inet_diag_msg, and where the
// fields this room reads sit in the latter (the struct inet_diag_sockid `id` starts at 4).
const REQ_V2_LEN: usize = 56;
const MSG_LEN: usize = 72;
const MSG_ID: usize = 4;
const MSG_UID: usize = 64;
const MSG_INODE: usize = 68;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// Dump parts are capped near 32 KiB by the kernel; room for twice that.
const RECV_BUF: usize = 64 * 1024;

/// A local socket as the kernel describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// [`TCP`] or [`UDP`].
    pub protocol: u8,
    /// This host's end. IPv4-mapped addresses of dual-stack sockets are given as IPv4.
    pub local: SocketAddr,
    /// The peer; port 0 and the unspecified address when there is none (unconnected UDP).
    pub remote: SocketAddr,
    /// See [`state`]: a TCP state; for UDP `ESTABLISHED` when connected, `CLOSE` when not.
    pub state: u8,
    /// The socket's inode, as in `/proc/<pid>/fd` links (`socket:[inode]`): how to find its
    /// program.
    pub inode: u32,
    pub uid: u32,
    /// The kernel's id of this socket (`idiag_cookie`). Addresses and ports can be reused by a
    /// new socket; the cookie cannot, so a destroy names exactly the socket that was dumped.
    pub cookie: u64,
    /// The device the socket is bound to (`SO_BINDTODEVICE`), 0 if none.
    pub ifindex: u32,
    /// `AF_INET` or `AF_INET6` as the kernel reported it; see the module doc.
    family: u8,
}

impl fmt::Display for SocketInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} -> {}", protocol_name(self.protocol), self.local, self.remote)
    }
}

fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        TCP => "TCP",
        UDP => "UDP",
        _ => "IP",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The socket to destroy does not exist any more (ENOENT), also when its addresses now lead
    /// to another socket, such as a listener on the same port or a new connection: the cookie
    /// does not match (ENOENT too on current kernels; ESTALE is taken the same way).
    #[error("sock_diag destroy: no such socket (it has closed already)")]
    NotFound,
    /// `SOCK_DESTROY` answered EOPNOTSUPP.
    #[error(
        "sock_diag destroy {socket}: this kernel cannot destroy sockets (it was built without CONFIG_INET_DIAG_DESTROY)"
    )]
    Unsupported { socket: String },
    #[error("sock_diag: protocol {protocol} is not supported, only TCP (6) and UDP (17)")]
    Protocol { protocol: u8 },
    /// A system call failed. `what` names the operation and the sockets it was about.
    #[error("sock_diag {what}: {source}")]
    Io { what: String, source: io::Error },
    /// The kernel refused a request (EPERM: destroying needs CAP_NET_ADMIN).
    #[error("sock_diag {what}: the kernel answered: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { what: String, errno: i32 },
    #[error("sock_diag {what}: malformed netlink message from the kernel")]
    Malformed { what: String },
    #[error("sock_diag {what}: no answer from the kernel within {} ms", REPLY_TIMEOUT_MS)]
    Timeout { what: String },
}

fn failed(what: String, failure: Failure) -> DiagError {
    match failure {
        Failure::Os(e) => DiagError::Io { what, source: e.into() },
        Failure::Kernel(errno) => DiagError::Kernel { what, errno },
        Failure::Malformed => DiagError::Malformed { what },
        Failure::Timeout => DiagError::Timeout { what },
    }
}

/// A sock_diag socket of the calling thread's network namespace. One request at a time.
pub struct SockDiag {
    sock: netlink::Socket,
}

impl fmt::Debug for SockDiag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SockDiag").field("seq", &self.sock.seq()).finish_non_exhaustive()
    }
}

impl SockDiag {
    pub fn open() -> Result<SockDiag, DiagError> {
        let sock = netlink::Socket::open(SockProtocol::NetlinkSockDiag, SockFlag::empty(), RECV_BUF)
            .map_err(|(what, e)| DiagError::Io { what: what.to_owned(), source: e.into() })?;
        Ok(SockDiag { sock })
    }

    /// Dumps the sockets of `protocol` ([`TCP`] or [`UDP`]) in the given states (a mask of
    /// [`state`] bits, such as [`state::TCP_CONNECTIONS`] or [`state::UDP_ALL`]), IPv4 and IPv6
    /// (one request each; dual-stack sockets come with the IPv6 ones), calling `f` for each.
    pub fn dump(&mut self, protocol: u8, states: u32, mut f: impl FnMut(&SocketInfo)) -> Result<(), DiagError> {
        check_protocol(protocol)?;
        for family in [AF_INET, AF_INET6] {
            self.dump_family(family, protocol, states, 0, 0, &mut f)?;
        }
        Ok(())
    }

    /// One dump request. Non-zero ports make the kernel leave out sockets with other ports, which
    /// spares reading the whole table when one connection is wanted.
    fn dump_family(
        &mut self,
        family: u8,
        protocol: u8,
        states: u32,
        local_port: u16,
        remote_port: u16,
        f: &mut impl FnMut(&SocketInfo),
    ) -> Result<(), DiagError> {
        let seq = self.sock.next_seq();
        let mut req = Vec::with_capacity(netlink::NLMSG_HDRLEN + REQ_V2_LEN);
        let start = netlink::begin_msg(&mut req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq);
        put_req_v2(&mut req, family, protocol, states);
        put_sockid(&mut req, (local_port, remote_port), ([0; 16], [0; 16]), 0, 0);
        netlink::end_msg(&mut req, start);
        let answer = self.sock.request(&req, seq, |msg| {
            if msg.ty == SOCK_DIAG_BY_FAMILY
                && let Some(s) = decode_socket(protocol, msg.payload)
            {
                f(&s);
            }
        });
        answer.map_err(|e| {
            let ip = if family == AF_INET { "IPv4" } else { "IPv6" };
            failed(format!("dump {} {ip} sockets", protocol_name(protocol)), e)
        })
    }

    /// Destroys this socket (`SOCK_DESTROY`). A TCP connection is aborted: the program's pending
    /// and next calls on it fail with `ECONNABORTED` and the peer gets a reset. A UDP socket is
    /// disconnected and its pending and next receive fails with `ECONNABORTED`.
    ///
    /// [`DiagError::NotFound`] when the socket is gone (the cookie makes sure no other socket that
    /// took over its addresses is hit); [`DiagError::Unsupported`] on a kernel without
    /// `CONFIG_INET_DIAG_DESTROY`.
    pub fn destroy(&mut self, s: &SocketInfo) -> Result<(), DiagError> {
        let seq = self.sock.next_seq();
        let req = destroy_request(seq, s);
        self.sock.request(&req, seq, |_| {}).map_err(|e| match e {
            Failure::Kernel(libc::ENOENT | libc::ESTALE) => DiagError::NotFound,
            Failure::Kernel(libc::EOPNOTSUPP) => DiagError::Unsupported { socket: s.to_string() },
            e => failed(format!("destroy {s}"), e),
        })
    }

    /// The socket the kernel finds for this exact local and remote end (a lookup, not a dump:
    /// microseconds where a dump walks the whole socket table). The kernel's lookup falls back
    /// to a listening or unconnected socket when no connected one matches, so the answer is
    /// checked: `None` unless it has exactly these ends and a state in `states`. A socket bound
    /// to a device (`SO_BINDTODEVICE`) is not found this way.
    fn find_exact(
        &mut self,
        family: u8,
        protocol: u8,
        states: u32,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Option<SocketInfo>, DiagError> {
        let found = self.lookup(family, protocol, local, remote)?;
        Ok(found.filter(|s| s.local == local && s.remote == remote && in_states(states, s.state)))
    }

    /// What the kernel answers to a lookup by these ends, unchecked: the connection with these
    /// ends, else what its lookup falls back to (see [`SockDiag::find_receiver`]).
    fn lookup(
        &mut self,
        family: u8,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Option<SocketInfo>, DiagError> {
        let seq = self.sock.next_seq();
        let req = lookup_request(seq, family, protocol, local, remote);
        let mut found = None;
        let answer = self.sock.request(&req, seq, |msg| {
            if msg.ty == SOCK_DIAG_BY_FAMILY {
                found = decode_socket(protocol, msg.payload);
            }
        });
        match answer {
            Ok(()) => Ok(found),
            Err(Failure::Kernel(libc::ENOENT)) => Ok(None),
            Err(e) => Err(failed(format!("look up {} socket {local} -> {remote}", protocol_name(protocol)), e)),
        }
    }

    /// The socket of `protocol` with exactly this local end (this host's) and remote end, in one
    /// of `states` (a mask of [`state`] bits), or `None`. Addresses compare as [`SocketInfo`]
    /// gives them (IPv4-mapped as IPv4), with no wildcard, as in [`SockDiag::destroy_matching`]:
    /// an unconnected UDP socket or a listener is found only with the unspecified remote address
    /// and port 0 and its own local address (the unspecified one if it is bound to that).
    ///
    /// A lookup by ends, IPv4 and then the IPv6 table (dual-stack sockets) for an IPv4 local
    /// end: microseconds, whatever the size of the socket table. A socket bound to a device
    /// (`SO_BINDTODEVICE`) is not found; [`SockDiag::dump`] lists it.
    pub fn find(
        &mut self,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
        states: u32,
    ) -> Result<Option<SocketInfo>, DiagError> {
        check_protocol(protocol)?;
        let (local, remote) = (canonical(local), canonical(remote));
        for &family in families(local) {
            if let Some(s) = self.find_exact(family, protocol, states, local, remote)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// The socket the kernel would give a packet from `remote` to `local` of `protocol`: the
    /// connection with these ends (any state, `TIME_WAIT` included, whose inode is 0), else for
    /// TCP the listener on the local port, else for UDP the unconnected socket bound to the local
    /// port, on the local address or the unspecified one (IPv4 or a dual-stack IPv6 one). This is
    /// the kernel's own choice (`SO_REUSEPORT` groups included: one of the group), so it is the
    /// socket a flow belongs to even when the flow has no socket of its own yet (a TCP SYN that is
    /// still queued) or never gets one (datagrams to or from an unconnected UDP socket).
    ///
    /// The answer is checked: its local port is `local`'s, its local address `local`'s or
    /// unspecified, and its remote end `remote` or unspecified with port 0; else `None`. The
    /// remote end is how the caller tells a connection from a fallback. As [`SockDiag::find`],
    /// a lookup by ends that does not see sockets bound to a device.
    pub fn find_receiver(
        &mut self,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Option<SocketInfo>, DiagError> {
        check_protocol(protocol)?;
        let (local, remote) = (canonical(local), canonical(remote));
        let fits = |s: &SocketInfo| {
            s.local.port() == local.port()
                && (s.local.ip() == local.ip() || s.local.ip().is_unspecified())
                && (s.remote == remote || (s.remote.port() == 0 && s.remote.ip().is_unspecified()))
        };
        for &family in families(local) {
            if let Some(s) = self.lookup(family, protocol, local, remote)?.filter(fits) {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// Destroys every socket of `protocol` with this local end (this host's) and this remote end,
    /// in the states of a live connection ([`state::TCP_CONNECTIONS`]; any UDP state), and returns
    /// how many. Addresses compare as [`SocketInfo`] gives them (IPv4-mapped as IPv4), with no
    /// wildcard: an unconnected UDP socket matches only with the unspecified remote address and
    /// port 0, and a socket bound to the unspecified address only with that as `local`. A socket
    /// that closes on its own between the listing and its destruction is not counted.
    ///
    /// The connection is looked up by its ends first; only if that finds nothing (a socket bound
    /// to a device, say) are the socket tables dumped, which on a host with a large connection
    /// table takes milliseconds.
    pub fn destroy_matching(
        &mut self,
        protocol: u8,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<usize, DiagError> {
        check_protocol(protocol)?;
        let (local, remote) = (canonical(local), canonical(remote));
        let states = if protocol == TCP { state::TCP_CONNECTIONS } else { state::UDP_ALL };
        for &family in families(local) {
            if let Some(s) = self.find_exact(family, protocol, states, local, remote)? {
                return match self.destroy(&s) {
                    Ok(()) => Ok(1),
                    Err(DiagError::NotFound) => Ok(0),
                    Err(e) => Err(e),
                };
            }
        }
        let mut found = Vec::new();
        for &family in families(local) {
            self.dump_family(family, protocol, states, local.port(), remote.port(), &mut |s: &SocketInfo| {
                if s.local == local && s.remote == remote {
                    found.push(*s);
                }
            })?;
        }
        let mut destroyed = 0;
        for s in &found {
            match self.destroy(s) {
                Ok(()) => destroyed += 1,
                Err(DiagError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(destroyed)
    }
}

/// Whether `state` is in the mask `states`; a state the kernel does not have (32 or more) is in
/// none.
fn in_states(states: u32, state: u8) -> bool {
    1u32.checked_shl(u32::from(state)).is_some_and(|bit| states & bit != 0)
}

fn check_protocol(protocol: u8) -> Result<(), DiagError> {
    match protocol {
        TCP | UDP => Ok(()),
        _ => Err(DiagError::Protocol { protocol }),
    }
}

/// The socket tables a local end can be in: a true IPv6 address is never on an IPv4 socket; an
/// IPv4 one can be on either (an IPv6 socket that is not `IPV6_V6ONLY` takes IPv4 too).
fn families(local: SocketAddr) -> &'static [u8] {
    if local.is_ipv4() { &[AF_INET, AF_INET6] } else { &[AF_INET6] }
}

/// IPv4-mapped addresses as IPv4; no flow label or scope, which the kernel does not report.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

// ---- encoding -------------------------------------------------------------------------------

/// The head of `struct inet_diag_req_v2`, up to its `id`: no extensions asked for.
fn put_req_v2(buf: &mut Vec<u8>, family: u8, protocol: u8, states: u32) {
    buf.extend_from_slice(&[family, protocol, 0, 0]);
    buf.extend_from_slice(&states.to_ne_bytes());
}

/// `struct inet_diag_sockid`: ports and addresses in network order, the interface and the
/// cookie's two halves in host order.
fn put_sockid(buf: &mut Vec<u8>, ports: (u16, u16), addrs: ([u8; 16], [u8; 16]), ifindex: u32, cookie: u64) {
    buf.extend_from_slice(&ports.0.to_be_bytes());
    buf.extend_from_slice(&ports.1.to_be_bytes());
    buf.extend_from_slice(&addrs.0);
    buf.extend_from_slice(&addrs.1);
    buf.extend_from_slice(&ifindex.to_ne_bytes());
    buf.extend_from_slice(&(cookie as u32).to_ne_bytes());
    buf.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
}

/// A lookup by ends (`SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`): the answer is one message,
/// and the ACK after it tells that nothing more is coming. The cookie is `INET_DIAG_NOCOOKIE`:
/// any socket with these ends.
///
/// The kernel reads the ends of a UDP lookup the other way round from a TCP one: TCP takes
/// `idiag_src` as the socket's local end (as its answers and `SOCK_DESTROY` do), while UDP's
/// lookup (`udp_dump_one`) passes `idiag_src` to the receive path's lookup as the packet's
/// source, that is the remote end. Asked with the local end first, the kernel finds the socket
/// bound to the remote end instead (seen on 6.18: the lookup for a connected UDP socket answered
/// with the peer's unconnected one). So a UDP lookup puts the remote end first.
fn lookup_request(seq: u32, family: u8, protocol: u8, local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let (first, second) = if protocol == UDP { (remote, local) } else { (local, remote) };
    let mut req = Vec::with_capacity(netlink::NLMSG_HDRLEN + REQ_V2_LEN);
    let start = netlink::begin_msg(&mut req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_ACK, seq);
    put_req_v2(&mut req, family, protocol, u32::MAX);
    let addrs = (raw_addr(family, first.ip()), raw_addr(family, second.ip()));
    put_sockid(&mut req, (first.port(), second.port()), addrs, 0, u64::MAX);
    netlink::end_msg(&mut req, start);
    req
}

/// The exact request that names `s`: the family the kernel reported, its addresses as the kernel
/// holds them, its interface and cookie. The states are all of them: the kernel looks the socket
/// up by its addresses, not by a dump filter.
fn destroy_request(seq: u32, s: &SocketInfo) -> Vec<u8> {
    let mut req = Vec::with_capacity(netlink::NLMSG_HDRLEN + REQ_V2_LEN);
    let start = netlink::begin_msg(&mut req, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq);
    put_req_v2(&mut req, s.family, s.protocol, u32::MAX);
    let addrs = (raw_addr(s.family, s.local.ip()), raw_addr(s.family, s.remote.ip()));
    put_sockid(&mut req, (s.local.port(), s.remote.port()), addrs, s.ifindex, s.cookie);
    netlink::end_msg(&mut req, start);
    req
}

/// An address as `idiag_src`/`idiag_dst` hold it: IPv4 in the first four bytes, or, on an IPv6
/// socket, IPv4-mapped.
fn raw_addr(family: u8, ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) if family == AF_INET6 => a.to_ipv6_mapped().octets(),
        IpAddr::V4(a) => {
            let [a, b, c, d] = a.octets();
            [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        }
        IpAddr::V6(a) => a.octets(),
    }
}

// ---- decoding -------------------------------------------------------------------------------

/// A `struct inet_diag_msg` (attributes after it are not read). `None` when it is cut short or of
/// a family other than IPv4 and IPv6.
fn decode_socket(protocol: u8, payload: &[u8]) -> Option<SocketInfo> {
    let msg = payload.get(..MSG_LEN)?;
    let (family, state) = (*msg.first()?, *msg.get(1)?);
    let id = msg.get(MSG_ID..)?;
    let local = SocketAddr::new(addr(family, id.get(4..20)?)?, be16(id)?);
    let remote = SocketAddr::new(addr(family, id.get(20..36)?)?, be16(id.get(2..)?)?);
    let cookie = u64::from(read_u32_ne(id, 40)?) | u64::from(read_u32_ne(id, 44)?) << 32;
    Some(SocketInfo {
        protocol,
        local,
        remote,
        state,
        inode: read_u32_ne(msg, MSG_INODE)?,
        uid: read_u32_ne(msg, MSG_UID)?,
        cookie,
        ifindex: read_u32_ne(id, 36)?,
        family,
    })
}

fn addr(family: u8, raw: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(raw.get(..4)?).ok()?))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(raw.get(..16)?).ok()?)).to_canonical()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Messages;

    #[test]
    fn constants_agree_with_the_headers() {
        assert_eq!(libc::NETLINK_SOCK_DIAG, 4);
        assert_eq!(u32::from(state::CLOSING), 11);
        assert_eq!(state::TCP_CONNECTIONS, 0b1011_0011_1110);
        assert_eq!(state::UDP_ALL, 0b1000_0010);
        // sizeof(struct inet_diag_sockid) = 2 + 2 + 16 + 16 + 4 + 8.
        let mut id = Vec::new();
        put_sockid(&mut id, (0, 0), ([0; 16], [0; 16]), 0, 0);
        assert_eq!(id.len(), 48);
        assert_eq!(REQ_V2_LEN, 8 + id.len());
        assert_eq!(MSG_LEN, MSG_ID + id.len() + 5 * 4);
    }

    fn socket(family: u8, protocol: u8, local: &str, remote: &str) -> SocketInfo {
        SocketInfo {
            protocol,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: state::ESTABLISHED,
            inode: 4242,
            uid: 1000,
            cookie: 0x0000_0001_8000_0002,
            ifindex: 3,
            family,
        }
    }

    #[test]
    fn destroy_request_bytes_ipv4() {
        let s = socket(AF_INET, TCP, "192.0.2.1:40000", "198.51.100.2:443");
        let req = destroy_request(9, &s);
        let mut want = Vec::new();
        want.extend_from_slice(&72u32.to_ne_bytes());
        want.extend_from_slice(&21u16.to_ne_bytes());
        want.extend_from_slice(&0x5u16.to_ne_bytes()); // NLM_F_REQUEST | NLM_F_ACK
        want.extend_from_slice(&9u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[2, 6, 0, 0]);
        want.extend_from_slice(&u32::MAX.to_ne_bytes());
        want.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
        want.extend_from_slice(&[192, 0, 2, 1]);
        want.extend_from_slice(&[0; 12]);
        want.extend_from_slice(&[198, 51, 100, 2]);
        want.extend_from_slice(&[0; 12]);
        want.extend_from_slice(&3u32.to_ne_bytes());
        want.extend_from_slice(&0x8000_0002u32.to_ne_bytes());
        want.extend_from_slice(&1u32.to_ne_bytes());
        assert_eq!(req, want);
    }

    #[test]
    fn destroy_request_of_a_dual_stack_socket_uses_its_family_and_mapped_addresses() {
        let s = socket(AF_INET6, UDP, "127.0.0.1:5353", "127.0.0.2:53");
        let req = destroy_request(1, &s);
        assert_eq!(&req[16..18], &[AF_INET6, UDP]);
        let mapped = |last: u8| [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, last];
        assert_eq!(&req[28..44], &mapped(1));
        assert_eq!(&req[44..60], &mapped(2));

        let s6 = socket(AF_INET6, TCP, "[2001:db8::1]:1", "[::]:0");
        let req = destroy_request(1, &s6);
        assert_eq!(&req[28..44], &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(&req[44..60], &[0; 16]);
    }

    #[test]
    fn lookup_requests_put_the_remote_end_first_for_udp_only() {
        let (local, remote) = ("192.0.2.1:40000".parse().unwrap(), "198.51.100.2:53".parse().unwrap());
        let tcp = lookup_request(3, AF_INET, TCP, local, remote);
        let udp = lookup_request(3, AF_INET, UDP, local, remote);
        assert_eq!(tcp.len(), netlink::NLMSG_HDRLEN + REQ_V2_LEN);
        assert_eq!((&tcp[4..6], &tcp[6..8]), (&20u16.to_ne_bytes()[..], &0x5u16.to_ne_bytes()[..]));
        assert_eq!((tcp[16], tcp[17], &tcp[20..24]), (AF_INET, TCP, &u32::MAX.to_ne_bytes()[..]));
        assert_eq!(&tcp[24..28], &[0x9c, 0x40, 0x00, 0x35]);
        assert_eq!(&tcp[28..32], &[192, 0, 2, 1]);
        assert_eq!(&tcp[44..48], &[198, 51, 100, 2]);
        assert_eq!(&udp[24..28], &[0x00, 0x35, 0x9c, 0x40]);
        assert_eq!(&udp[28..32], &[198, 51, 100, 2]);
        assert_eq!(&udp[44..48], &[192, 0, 2, 1]);
        // No interface; the cookie INET_DIAG_NOCOOKIE.
        assert_eq!(&tcp[60..], &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let v6 = lookup_request(1, AF_INET6, TCP, local, remote);
        assert_eq!(&v6[28..44], &Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets());
    }

    /// A dump answer for `s` as the kernel builds it: inet_diag_msg, then attributes.
    fn reply(s: &SocketInfo) -> Vec<u8> {
        let mut buf = Vec::new();
        let start = netlink::begin_msg(&mut buf, SOCK_DIAG_BY_FAMILY, 0x2, 5);
        buf.extend_from_slice(&[s.family, s.state, 1, 0]);
        let addrs = (raw_addr(s.family, s.local.ip()), raw_addr(s.family, s.remote.ip()));
        put_sockid(&mut buf, (s.local.port(), s.remote.port()), addrs, s.ifindex, s.cookie);
        for v in [100u32, 0, 7, s.uid, s.inode] {
            buf.extend_from_slice(&v.to_ne_bytes());
        }
        netlink::put_attr(&mut buf, 8, &[0]); // INET_DIAG_SHUTDOWN
        netlink::put_attr(&mut buf, 0x3ff0, b"from a future kernel");
        netlink::end_msg(&mut buf, start);
        buf
    }

    fn decode_all(data: &[u8]) -> Vec<SocketInfo> {
        Messages::new(data).filter_map(|m| decode_socket(TCP, m.payload)).collect()
    }

    #[test]
    fn decodes_what_it_encodes() {
        let cases = [
            socket(AF_INET, TCP, "192.0.2.1:40000", "198.51.100.2:443"),
            socket(AF_INET6, TCP, "[2001:db8::1]:40000", "[2001:db8::2]:443"),
            socket(AF_INET6, TCP, "127.0.0.1:8080", "127.0.0.1:51000"),
            socket(AF_INET6, TCP, "[::]:8080", "[::]:0"),
        ];
        let mut all = Vec::new();
        for s in cases {
            assert_eq!(decode_all(&reply(&s)), vec![s], "{s}");
            all.extend(reply(&s));
        }
        assert_eq!(decode_all(&all), cases);
        // The dual-stack one reads as IPv4 but keeps its family for destroy.
        let got = decode_all(&reply(&cases[2]))[0];
        assert!(got.local.is_ipv4() && got.remote.is_ipv4());
        assert_eq!(destroy_request(1, &got), destroy_request(1, &cases[2]));
        assert_eq!(got.to_string(), "TCP 127.0.0.1:8080 -> 127.0.0.1:51000");
    }

    #[test]
    fn other_families_and_short_messages_are_skipped() {
        let mut m = reply(&socket(AF_INET, TCP, "192.0.2.1:1", "192.0.2.2:2"));
        m[16] = libc::AF_UNIX as u8;
        assert!(decode_all(&m).is_empty());
        assert!(decode_socket(TCP, &[AF_INET; MSG_LEN - 1]).is_none());
        assert!(decode_socket(TCP, &[]).is_none());
    }

    #[test]
    fn truncated_and_corrupted_answers_never_panic() {
        let m = reply(&socket(AF_INET6, TCP, "[2001:db8::1]:40000", "[2001:db8::2]:443"));
        for cut in 0..m.len() {
            let _ = decode_all(&m[..cut]);
            let mut short = m[..cut].to_vec();
            if short.len() >= 4 {
                short[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            let _ = decode_all(&short);
            for payload_cut in 0..MSG_LEN {
                let _ = decode_socket(UDP, m.get(16..16 + payload_cut).unwrap_or_default());
            }
        }
        for i in 0..m.len() {
            for v in [0u8, 1, 2, 10, 0x7f, 0x80, 0xff] {
                let mut bad = m.clone();
                bad[i] = v;
                let _ = decode_all(&bad);
            }
        }
    }

    #[test]
    fn errors_name_the_operation_and_the_socket() {
        let s = socket(AF_INET, TCP, "192.0.2.1:40000", "198.51.100.2:443");
        let e = failed(format!("destroy {s}"), Failure::Kernel(libc::EPERM));
        let text = e.to_string();
        assert!(text.starts_with("sock_diag destroy TCP 192.0.2.1:40000 -> 198.51.100.2:443: "), "{text}");
        let e = DiagError::Unsupported { socket: s.to_string() };
        assert!(e.to_string().contains("CONFIG_INET_DIAG_DESTROY"), "{e}");
        assert!(matches!(check_protocol(1), Err(DiagError::Protocol { protocol: 1 })));
        assert_eq!(canonical("[::ffff:10.0.0.1]:80".parse().unwrap()), "10.0.0.1:80".parse().unwrap());
    }
}
