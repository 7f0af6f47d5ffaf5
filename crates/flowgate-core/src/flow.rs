//! Flows: their identity, what providers are told about them, and the table that holds them.
//!
//! A flow is one conversation between two endpoints (TCP connection, UDP socket pair, ICMP echo
//! exchange), seen from the host's point of view: it has a local and a remote end and a
//! direction (who opened it). The table keeps live flows in a slab addressed by slot, indexed by
//! a direction-free [`FlowKey`] through std's `HashMap`, whose SipHash with random keys keeps a
//! remote peer from choosing 5-tuples that collide. The table enforces a cap on live flows.
//! This module knows nothing about rules or verdict policy; the engine owns those.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;
use slab::Slab;

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

/// Slot of a flow in the table; valid until that flow is removed.
pub(crate) type Slot = usize;

/// Live flows: a slab of entries of type `E` plus the key and id indexes.
#[derive(Debug)]
pub(crate) struct FlowTable<E> {
    entries: Slab<(FlowKey, FlowId, E)>,
    by_key: HashMap<FlowKey, Slot>,
    by_id: HashMap<FlowId, Slot>,
    cap: usize,
}

/// The table is at its cap; the flow was not added.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TableFull;

impl<E> FlowTable<E> {
    pub(crate) fn new(cap: usize) -> Self {
        FlowTable { entries: Slab::new(), by_key: HashMap::new(), by_id: HashMap::new(), cap }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn lookup(&self, key: &FlowKey) -> Option<Slot> {
        self.by_key.get(key).copied()
    }

    pub(crate) fn slot_of(&self, id: FlowId) -> Option<Slot> {
        self.by_id.get(&id).copied()
    }

    pub(crate) fn insert(&mut self, key: FlowKey, id: FlowId, entry: E) -> Result<Slot, TableFull> {
        if self.entries.len() >= self.cap {
            return Err(TableFull);
        }
        let slot = self.entries.insert((key, id, entry));
        self.by_key.insert(key, slot);
        self.by_id.insert(id, slot);
        Ok(slot)
    }

    pub(crate) fn get(&self, slot: Slot) -> Option<&E> {
        self.entries.get(slot).map(|(_, _, e)| e)
    }

    pub(crate) fn get_mut(&mut self, slot: Slot) -> Option<&mut E> {
        self.entries.get_mut(slot).map(|(_, _, e)| e)
    }

    pub(crate) fn remove(&mut self, slot: Slot) -> Option<E> {
        let (key, id, e) = self.entries.try_remove(slot)?;
        self.by_key.remove(&key);
        self.by_id.remove(&id);
        Some(e)
    }

    pub(crate) fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.entries.iter().map(|(slot, _)| slot)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &E> + '_ {
        self.entries.iter().map(|(_, (_, _, e))| e)
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
    fn table_indexes_by_key_and_id_and_enforces_cap() {
        let mut t: FlowTable<&str> = FlowTable::new(2);
        let k1 = FlowKey::new(Protocol::Udp, ep("192.0.2.1:1"), ep("192.0.2.2:2"));
        let k2 = FlowKey::new(Protocol::Udp, ep("192.0.2.1:1"), ep("192.0.2.2:3"));
        let k3 = FlowKey::new(Protocol::Udp, ep("192.0.2.1:1"), ep("192.0.2.2:4"));
        let s1 = t.insert(k1, FlowId(1), "one").expect("room");
        t.insert(k2, FlowId(2), "two").expect("room");
        assert_eq!(t.insert(k3, FlowId(3), "three"), Err(TableFull));
        assert_eq!(t.lookup(&k1), Some(s1));
        assert_eq!(t.slot_of(FlowId(1)), Some(s1));
        assert_eq!(t.remove(s1), Some("one"));
        assert_eq!(t.lookup(&k1), None);
        assert_eq!(t.slot_of(FlowId(1)), None);
        assert!(t.insert(k3, FlowId(3), "three").is_ok());
        assert_eq!(t.len(), 2);
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
