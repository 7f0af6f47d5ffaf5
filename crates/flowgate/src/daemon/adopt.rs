//! Adoption: the connections that were open before flowgate started become flows.
//!
//! At start, before flowgate's chains go in, the host's socket tables (sock_diag: TCP in any
//! open or closing state, connected UDP) and conntrack (forwarded flows, and the marks a previous
//! instance left) are read. Each connection becomes an `existing` flow, judged like a new one or,
//! if a previous instance decided it (its conntrack mark), keeping that verdict, so a restart
//! breaks nothing. Allowed flows get their conntrack mark before the chains exist, so not one of
//! their packets is queued or lost; dropped ones are torn down by the enforcer. This room only
//! reads the tables; marking and tearing down is [`super::enforce`]'s.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use flowgate_core::{Direction, FlowVerdict, Protocol};
use flowgate_linux::conntrack::Conntrack;
use flowgate_linux::marks;
use flowgate_linux::sockdiag::SockDiag;

/// One connection found at start, owned (the engine's `Existing` borrows the interface name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub(crate) protocol: Protocol,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    pub(crate) direction: Direction,
    pub(crate) forwarded: bool,
    pub(crate) interface: Option<String>,
    pub(crate) kept: Option<FlowVerdict>,
    /// Its conntrack entry's id, where conntrack tracks it.
    pub(crate) conntrack_id: Option<u32>,
}

const TCP: u8 = 6;
const UDP: u8 = 17;
/// TCP states of a connection that still carries data or is closing (not LISTEN, not TIME_WAIT).
const OPEN_STATES: u32 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);
const LISTEN: u32 = 1 << 10;
const UDP_STATES: u32 = (1 << 1) | (1 << 7);

/// The host's addresses and the interface each belongs to.
fn local_addresses() -> Result<HashMap<IpAddr, String>, String> {
    let mut out = HashMap::new();
    for a in nix::ifaddrs::getifaddrs().map_err(|e| format!("listing interface addresses: {e}"))? {
        let ip = a.address.as_ref().and_then(|s| {
            s.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if let Some(ip) = ip {
            out.entry(ip).or_insert(a.interface_name);
        }
    }
    Ok(out)
}

fn verdict_of_mark(mark: u32) -> Option<FlowVerdict> {
    match mark & marks::VERDICT {
        marks::ALLOW => Some(FlowVerdict::Allow),
        marks::REJECT | marks::DROP => Some(FlowVerdict::Drop),
        _ => None,
    }
}

/// Every connection open now. `loopback`: also connections between local addresses on `lo`.
pub(crate) fn find(loopback: bool) -> Result<Vec<Found>, String> {
    let locals = local_addresses()?;
    let is_local = |ip: &IpAddr| locals.contains_key(ip) || ip.is_loopback();
    // Marks a previous instance left, and entry ids, by unordered endpoint pair.
    let mut by_pair: HashMap<(u8, SocketAddr, SocketAddr), (u32, Option<u32>)> = HashMap::new();
    let mut forwarded = Vec::new();
    let mut ct = Conntrack::open().map_err(|e| format!("conntrack: {e}"))?;
    ct.dump(|e| {
        let o = &e.original;
        let (a, b) = (SocketAddr::new(o.src, o.src_port), SocketAddr::new(o.dst, o.dst_port));
        by_pair.insert((o.protocol, a.min(b), a.max(b)), (e.mark, e.id));
        let protocol = match o.protocol {
            TCP => Protocol::Tcp,
            UDP => Protocol::Udp,
            1 | 58 => Protocol::Icmp,
            n => Protocol::Other(n),
        };
        // An entry neither of whose ends is this host passes through it.
        if !is_local(&o.src) && !is_local(&o.dst) {
            forwarded.push(Found {
                protocol,
                local: a,
                remote: b,
                direction: Direction::Outbound,
                forwarded: true,
                interface: None,
                kept: verdict_of_mark(e.mark),
                conntrack_id: e.id,
            });
        }
    })
    .map_err(|e| format!("conntrack dump: {e}"))?;
    let entry = |p: u8, a: SocketAddr, b: SocketAddr| by_pair.get(&(p, a.min(b), a.max(b))).copied();

    let mut diag = SockDiag::open().map_err(|e| format!("sock_diag: {e}"))?;
    let mut listening: HashSet<(IpAddr, u16)> = HashSet::new();
    let mut sockets = Vec::new();
    diag.dump(TCP, OPEN_STATES | LISTEN, |s| {
        if u32::from(s.state) == 10 {
            listening.insert((s.local.ip(), s.local.port()));
        } else {
            sockets.push((TCP, *s));
        }
    })
    .map_err(|e| format!("listing TCP sockets: {e}"))?;
    diag.dump(UDP, UDP_STATES, |s| {
        if s.remote.port() != 0 && !s.remote.ip().is_unspecified() {
            sockets.push((UDP, *s));
        }
    })
    .map_err(|e| format!("listing UDP sockets: {e}"))?;

    let mut out = Vec::with_capacity(sockets.len() + forwarded.len());
    let mut seen = HashSet::new();
    for (proto, s) in sockets {
        if !loopback && (s.local.ip().is_loopback() || s.remote.ip().is_loopback()) {
            continue;
        }
        // Both ends of a connection within this host show up as two sockets: one flow.
        let pair = (proto, s.local.min(s.remote), s.local.max(s.remote));
        if !seen.insert(pair) {
            continue;
        }
        let unspecified = if s.local.is_ipv4() { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) };
        let accepted =
            listening.contains(&(s.local.ip(), s.local.port())) || listening.contains(&(unspecified, s.local.port()));
        out.push(Found {
            protocol: if proto == TCP { Protocol::Tcp } else { Protocol::Udp },
            local: s.local,
            remote: s.remote,
            direction: if proto == TCP && accepted { Direction::Inbound } else { Direction::Outbound },
            forwarded: false,
            interface: locals.get(&s.local.ip()).cloned(),
            kept: entry(proto, s.local, s.remote).and_then(|(mark, _)| verdict_of_mark(mark)),
            conntrack_id: entry(proto, s.local, s.remote).and_then(|(_, id)| id),
        });
    }
    out.extend(forwarded);
    Ok(out)
}
