//! Flows: their identity and what providers are told about them.
//!
//! A flow is one conversation between two endpoints (TCP connection, UDP socket pair, ICMP echo
//! exchange), seen from the host's point of view: it has a local and a remote end and a
//! direction (who opened it). [`FlowKey`] is a flow's direction-free identity, by which the
//! engine's table finds it. This module knows nothing about rules or verdict policy; the engine
//! owns those.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use crate::owner::Owner;

use crate::time::Instant;

/// A flow's id: unique for the life of the process, never reused.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct FlowId(pub u64);

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Transport protocol of a flow. ICMP covers ICMPv4 and ICMPv6.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    /// Any other IP protocol, by number (GRE, ESP, SCTP, ...).
    Other(u8),
}

impl Protocol {
    /// The name used in configs and events.
    pub fn name(self) -> std::borrow::Cow<'static, str> {
        match self {
            Protocol::Tcp => "tcp".into(),
            Protocol::Udp => "udp".into(),
            Protocol::Icmp => "icmp".into(),
            Protocol::Other(n) => format!("ip-{n}").into(),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// Which way a flow goes from the host's point of view: who opened it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Opened by the local side.
    Outbound,
    /// Opened by the remote side.
    Inbound,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A flow as providers and events see it: fixed for the flow's life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Flow {
    pub id: FlowId,
    pub protocol: Protocol,
    pub direction: Direction,
    #[serde(serialize_with = "ser_addr")]
    pub local: SocketAddr,
    #[serde(serialize_with = "ser_addr")]
    pub remote: SocketAddr,
    /// The interface the flow was first seen on, where the packet source knows it.
    pub interface: Option<Arc<str>>,
    /// The flow was open before the filter started (adopted, not seen opening).
    pub existing: bool,
    /// The flow passes through this host (routed), neither end is local.
    pub forwarded: bool,
    #[serde(skip)]
    pub started: Instant,
    /// For ICMP flows: the type and code of the opener's first message (an echo exchange first
    /// seen at its reply counts as opened by the request), as flow hashes and the EVE and OCSF
    /// formats name them; `None` for other protocols or an unreadable ICMP header.
    #[serde(skip)]
    pub icmp: Option<(u8, u8)>,
    /// The process that owns the local socket, once known (see [`crate::owner`]); for an
    /// engine that asks, known before the flow's first event.
    #[serde(rename = "process", skip_serializing_if = "Option::is_none")]
    pub owner: Option<Arc<Owner>>,
    /// The host name the flow is for, once known (see [`Host`]): from a DNS answer when the flow
    /// starts, from its own first bytes once they were read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<Arc<Host>>,
}

/// Where a flow's host name came from, most trusted first.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostSource {
    /// The TLS ClientHello's server name.
    Sni,
    /// The server name of the ClientHello in a QUIC Initial.
    Quic,
    /// The HTTP/1.x request's Host (or absolute target).
    Http,
    /// A DNS answer this filter saw for the flow's remote address, within its TTL.
    Dns,
}

impl HostSource {
    pub fn name(self) -> &'static str {
        match self {
            HostSource::Sni => "sni",
            HostSource::Quic => "quic",
            HostSource::Http => "http",
            HostSource::Dns => "dns",
        }
    }
}

/// What a flow says, or what DNS said, about the host it is for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Host {
    /// The name rules judge the flow by: the flow's own (SNI, QUIC SNI, HTTP Host), else the
    /// name a DNS answer gave its remote address. `None` when neither is known.
    pub name: Option<Arc<str>>,
    pub source: Option<HostSource>,
    /// The ALPN protocols a ClientHello offered, in its order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// The ClientHello carried Encrypted Client Hello: its server name is only the outer,
    /// public one ([`Host::outer_sni`]), not trusted as the flow's name.
    pub ech: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outer_sni: Option<String>,
}

impl Flow {
    /// The end that opened the flow (sent the SYN, the first datagram, the echo request).
    pub fn opener(&self) -> SocketAddr {
        match self.direction {
            Direction::Outbound => self.local,
            Direction::Inbound => self.remote,
        }
    }

    /// The end that answered.
    pub fn responder(&self) -> SocketAddr {
        match self.direction {
            Direction::Outbound => self.remote,
            Direction::Inbound => self.local,
        }
    }

    /// The IP protocol number: ICMP is 1 over IPv4 and 58 (ICMPv6) over IPv6.
    pub fn ip_protocol(&self) -> u8 {
        match self.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Icmp if self.local.is_ipv6() => 58,
            Protocol::Icmp => 1,
            Protocol::Other(n) => n,
        }
    }
}

// `SocketAddr`'s Display already writes IPv6 as `[addr]:port`.
fn ser_addr<S: serde::Serializer>(a: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(a)
}

/// Packet and byte counts of a flow, per direction (out = local to remote).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets_out: u64,
    pub packets_in: u64,
    /// IP bytes (headers included), as conntrack counts them.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Transport payload bytes.
    pub payload_out: u64,
    pub payload_in: u64,
}

impl Counters {
    pub(crate) fn add(&mut self, outbound: bool, ip_len: u32, payload: usize) {
        if outbound {
            self.packets_out += 1;
            self.bytes_out += u64::from(ip_len);
            self.payload_out += payload as u64;
        } else {
            self.packets_in += 1;
            self.bytes_in += u64::from(ip_len);
            self.payload_in += payload as u64;
        }
    }
}

/// The direction-free identity of a flow: protocol and both endpoints, in canonical order, so
/// both directions of a conversation find the same entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    protocol: Protocol,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

impl FlowKey {
    pub fn new(protocol: Protocol, a: (IpAddr, u16), b: (IpAddr, u16)) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        FlowKey { protocol, lo, hi }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> (IpAddr, u16) {
        let a: SocketAddr = s.parse().expect("addr");
        (a.ip(), a.port())
    }

    #[test]
    fn key_is_the_same_both_ways() {
        let a = ep("198.51.100.1:40000");
        let b = ep("203.0.113.7:443");
        assert_eq!(FlowKey::new(Protocol::Tcp, a, b), FlowKey::new(Protocol::Tcp, b, a));
        assert_ne!(FlowKey::new(Protocol::Tcp, a, b), FlowKey::new(Protocol::Udp, a, b));
    }

    #[test]
    fn serializes_endpoints_as_addr_port() {
        let f = Flow {
            id: FlowId(7),
            protocol: Protocol::Tcp,
            direction: Direction::Outbound,
            local: "[2001:db8::1]:40000".parse().expect("addr"),
            remote: "203.0.113.7:443".parse().expect("addr"),
            interface: Some("tun0".into()),
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp: None,
            owner: None,
            host: None,
        };
        let v = serde_json::to_value(&f).expect("json");
        assert_eq!(v["local"], "[2001:db8::1]:40000");
        assert_eq!(v["remote"], "203.0.113.7:443");
        assert_eq!(v["protocol"], "tcp");
        assert_eq!(v["direction"], "outbound");
        assert_eq!(v["interface"], "tun0");
        assert_eq!(v["id"], 7);
    }
}
