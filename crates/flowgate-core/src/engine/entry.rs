//! One live flow's state, kept small: a million flows must fit in a few hundred megabytes.
//!
//! The public [`Flow`] (two `SocketAddr`s, an `Arc` interface name) is about 100 bytes; an
//! [`Entry`] keeps the same facts in compact form (addresses as 16 bytes each with a family bit,
//! the interface as an index into [`super::table::Interfaces`], booleans as bits) and builds a
//! `Flow` only when a provider, an event or a listing needs one. What only some flows need (the
//! peek windows of an inspected flow, the packets a paused flow holds) lives in a boxed
//! [`Extra`], allocated when first needed. `size_of::<Entry>()` is checked by a test.
//!
//! This room holds the per-flow data and its accessors; the engine's other rooms decide.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use super::table::Interfaces;
use crate::event::{CloseReason, RuleName};
use crate::flow::{Counters, Direction, Flow, FlowId, FlowKey, Host, Protocol};
use crate::handle::FlowStatus;
use crate::owner::Owner;
use crate::time::Instant;
use crate::verdict::{FlowVerdict, PacketId};

/// What the engine does with one direction of a flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Allow,
    Drop,
    Pause,
    /// Bytes before `pass_end` go unseen; bytes in `[pass_end, peek_end)` are shown.
    Inspect {
        pass_end: u64,
        peek_end: u64,
    },
}

impl Mode {
    pub(crate) fn verdict(self) -> FlowVerdict {
        match self {
            Mode::Allow => FlowVerdict::Allow,
            Mode::Drop => FlowVerdict::Drop,
            Mode::Pause => FlowVerdict::Pause,
            Mode::Inspect { .. } => FlowVerdict::Inspect,
        }
    }
}

/// The stored form of a [`Mode`]: the window of an inspected direction is in [`Extra`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
enum ModeTag {
    Allow,
    Drop,
    Pause,
    Inspect,
}

/// Both ends of a flow in 36 bytes: IPv4 addresses are stored IPv4-mapped, and the entry's
/// [`bits::V6`] says which family they are.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Ends {
    local: [u8; 16],
    remote: [u8; 16],
    local_port: u16,
    remote_port: u16,
}

fn octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn address(o: [u8; 16], v6: bool) -> IpAddr {
    if v6 { IpAddr::V6(Ipv6Addr::from(o)) } else { IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15])) }
}

/// Flag bits of an [`Entry`].
pub(crate) mod bits {
    pub(crate) const INBOUND: u16 = 1 << 0;
    pub(crate) const EXISTING: u16 = 1 << 1;
    pub(crate) const FORWARDED: u16 = 1 << 2;
    pub(crate) const V6: u16 = 1 << 3;
    /// The kernel handles this flow alone (its conntrack entry carries the verdict): its
    /// packets may not reach the engine, so its liveness comes from kernel reports.
    pub(crate) const KERNEL: u16 = 1 << 4;
    /// Drops of this flow do not tell the sender.
    pub(crate) const SILENT: u16 = 1 << 5;
    /// The product filter asked to see this flow's data.
    pub(crate) const FILTER_INSPECTS: u16 = 1 << 6;
    pub(crate) const FIN_OUT: u16 = 1 << 7;
    pub(crate) const FIN_IN: u16 = 1 << 8;
    /// `ct_id` holds the id of the flow's conntrack entry.
    pub(crate) const CT_ID: u16 = 1 << 9;
    /// `syn_seq` holds the sequence number after the opening SYN.
    pub(crate) const SYN_SEQ: u16 = 1 << 10;
    pub(crate) const SEQ_OUT: u16 = 1 << 11;
    pub(crate) const SEQ_IN: u16 = 1 << 12;
    /// A verdict for the data plane to carry out is queued for this flow.
    pub(crate) const ENFORCE_QUEUED: u16 = 1 << 13;
    /// A packet of this flow has been let through: the kernel has a conntrack entry for it.
    pub(crate) const ACCEPTED: u16 = 1 << 14;
    /// The engine reads this flow's packets though its verdict is settled (a DNS flow whose
    /// answers name hosts): the kernel must not handle it alone.
    pub(crate) const WATCH: u16 = 1 << 15;
}

/// A packet the engine holds for a flow (paused, or carrying bytes not judged yet).
#[derive(Debug)]
pub(crate) struct HeldPacket {
    pub(crate) id: PacketId,
    pub(crate) dir: Direction,
    /// The stream range of its payload (empty for a packet without one).
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// The whole IP packet when it has a payload: inspection reads it later (a packet held
    /// while paused), and a drop may let a prefix of it through.
    pub(crate) bytes: Option<Box<[u8]>>,
    /// Its payload went into the flow's inspection already.
    pub(crate) ingested: bool,
}

/// What only some flows need.
#[derive(Debug, Default)]
pub(crate) struct Extra {
    /// `(pass_end, peek_end)` per direction, for directions in [`Mode::Inspect`].
    windows: [(u64, u64); 2],
    /// Packets held while the flow is paused or its bytes are judged, in arrival order.
    pub(crate) held: Vec<HeldPacket>,
    /// What the flow's bytes or DNS said about its host.
    pub(crate) host: Option<Arc<Host>>,
    /// The state of inspecting its bytes (see `stream.rs`).
    pub(crate) inspection: Option<Box<super::stream::Inspection>>,
}

/// One live flow.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: FlowId,
    ends: Ends,
    pub(crate) protocol: Protocol,
    /// Index into the engine's [`Interfaces`]; 0 when unknown.
    pub(crate) interface: u16,
    pub(crate) bits: u16,
    pub(crate) closing: Option<CloseReason>,
    modes: [ModeTag; 2],
    /// The last kernel sync generation that saw this flow (see `kernel.rs`).
    pub(crate) seen_gen: u16,
    pub(crate) ct_id: u32,
    /// TCP: see [`bits::SYN_SEQ`]; ICMP: the opener's type and code (see `with_icmp`).
    pub(crate) syn_seq: u32,
    next_seq: [u32; 2],
    /// Payload bytes of each direction seen so far (stream offset of the next new byte).
    offset: [u64; 2],
    pub(crate) started: Instant,
    pub(crate) last_seen: Instant,
    /// When this flow's timer is set for (see `timers.rs`).
    pub(crate) timer_at: Instant,
    pub(crate) counters: Counters,
    pub(crate) rule: Option<RuleName>,
    /// The process that owns the local socket, once the driver said (see `owners.rs`).
    pub(crate) owner: Option<Arc<Owner>>,
    extra: Option<Box<Extra>>,
}

fn index(d: Direction) -> usize {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

impl Entry {
    /// A new entry for `flow`, both directions allowed until told otherwise.
    pub(crate) fn new(flow: &Flow, interface: u16, now: Instant) -> Entry {
        let mut bits = 0;
        let mut set = |b: u16, on: bool| {
            if on {
                bits |= b;
            }
        };
        set(bits::INBOUND, flow.direction == Direction::Inbound);
        set(bits::EXISTING, flow.existing);
        set(bits::FORWARDED, flow.forwarded);
        set(bits::V6, flow.local.is_ipv6());
        Entry {
            id: flow.id,
            ends: Ends {
                local: octets(flow.local.ip()),
                remote: octets(flow.remote.ip()),
                local_port: flow.local.port(),
                remote_port: flow.remote.port(),
            },
            protocol: flow.protocol,
            interface,
            bits,
            closing: None,
            modes: [ModeTag::Allow; 2],
            seen_gen: 0,
            ct_id: 0,
            syn_seq: 0,
            next_seq: [0; 2],
            offset: [0; 2],
            started: flow.started,
            last_seen: now,
            timer_at: now,
            counters: Counters::default(),
            rule: None,
            owner: flow.owner.clone(),
            extra: None,
        }
        .with_icmp(flow.icmp)
        .with_host(flow.host.clone())
    }

    /// An ICMP flow keeps its opener's type and code in `syn_seq`, which only TCP flows use
    /// otherwise (the entry stays at its size: see the `is_small` test): bit 16 says it is
    /// known, then the type and the code.
    fn with_icmp(mut self, icmp: Option<(u8, u8)>) -> Entry {
        if let (Protocol::Icmp, Some((t, c))) = (self.protocol, icmp) {
            self.syn_seq = 1 << 16 | u32::from(t) << 8 | u32::from(c);
        }
        self
    }

    fn with_host(mut self, host: Option<Arc<Host>>) -> Entry {
        self.set_host(host);
        self
    }

    fn icmp(&self) -> Option<(u8, u8)> {
        let v = self.syn_seq;
        (self.protocol == Protocol::Icmp && v & 1 << 16 != 0).then_some(((v >> 8) as u8, v as u8))
    }

    pub(crate) fn has(&self, b: u16) -> bool {
        self.bits & b != 0
    }

    pub(crate) fn set(&mut self, b: u16, on: bool) {
        if on {
            self.bits |= b;
        } else {
            self.bits &= !b;
        }
    }

    pub(crate) fn local(&self) -> SocketAddr {
        SocketAddr::new(address(self.ends.local, self.has(bits::V6)), self.ends.local_port)
    }

    pub(crate) fn remote(&self) -> SocketAddr {
        SocketAddr::new(address(self.ends.remote, self.has(bits::V6)), self.ends.remote_port)
    }

    pub(crate) fn direction(&self) -> Direction {
        if self.has(bits::INBOUND) { Direction::Inbound } else { Direction::Outbound }
    }

    pub(crate) fn key(&self) -> FlowKey {
        let (l, r) = (self.local(), self.remote());
        FlowKey::new(self.protocol, (l.ip(), l.port()), (r.ip(), r.port()))
    }

    /// The flow as providers, events and listings see it.
    pub(crate) fn flow(&self, interfaces: &Interfaces) -> Flow {
        Flow {
            id: self.id,
            protocol: self.protocol,
            direction: self.direction(),
            local: self.local(),
            remote: self.remote(),
            interface: interfaces.get(self.interface).cloned(),
            existing: self.has(bits::EXISTING),
            forwarded: self.has(bits::FORWARDED),
            started: self.started,
            icmp: self.icmp(),
            owner: self.owner.clone(),
            host: self.host(),
        }
    }

    pub(crate) fn host(&self) -> Option<Arc<Host>> {
        self.extra.as_ref().and_then(|x| x.host.clone())
    }

    pub(crate) fn set_host(&mut self, host: Option<Arc<Host>>) {
        if host.is_some() || self.extra.is_some() {
            self.extra_mut().host = host;
        }
    }

    pub(crate) fn inspection(&self) -> Option<&super::stream::Inspection> {
        self.extra.as_ref().and_then(|x| x.inspection.as_deref())
    }

    pub(crate) fn inspection_mut(&mut self) -> Option<&mut super::stream::Inspection> {
        self.extra.as_mut().and_then(|x| x.inspection.as_deref_mut())
    }

    pub(crate) fn set_inspection(&mut self, i: Option<Box<super::stream::Inspection>>) {
        if i.is_some() || self.extra.is_some() {
            self.extra_mut().inspection = i;
        }
    }

    pub(crate) fn status(&self, interfaces: &Interfaces) -> FlowStatus {
        FlowStatus {
            flow: self.flow(interfaces),
            verdict: self.verdict(),
            rule: self.rule.clone(),
            counters: self.counters,
            last_seen: self.last_seen,
        }
    }

    pub(crate) fn mode(&self, d: Direction) -> Mode {
        let i = index(d);
        match self.modes[i] {
            ModeTag::Allow => Mode::Allow,
            ModeTag::Drop => Mode::Drop,
            ModeTag::Pause => Mode::Pause,
            ModeTag::Inspect => {
                let (pass_end, peek_end) = self.extra.as_ref().map_or((0, 0), |x| x.windows[i]);
                Mode::Inspect { pass_end, peek_end }
            }
        }
    }

    pub(crate) fn set_mode(&mut self, d: Direction, m: Mode) {
        let i = index(d);
        self.modes[i] = match m {
            Mode::Allow => ModeTag::Allow,
            Mode::Drop => ModeTag::Drop,
            Mode::Pause => ModeTag::Pause,
            Mode::Inspect { pass_end, peek_end } => {
                self.extra_mut().windows[i] = (pass_end, peek_end);
                ModeTag::Inspect
            }
        };
    }

    pub(crate) fn modes(&self) -> (Mode, Mode) {
        (self.mode(Direction::Outbound), self.mode(Direction::Inbound))
    }

    /// The most restrictive of the two directions' verdicts.
    pub(crate) fn verdict(&self) -> FlowVerdict {
        let (a, b) = (self.mode(Direction::Outbound).verdict(), self.mode(Direction::Inbound).verdict());
        if a.severity() >= b.severity() { a } else { b }
    }

    /// Decided for good in both directions, and nothing more to read: the kernel may handle
    /// the rest.
    pub(crate) fn settled(&self) -> bool {
        matches!(self.modes, [ModeTag::Allow, ModeTag::Allow] | [ModeTag::Drop, ModeTag::Drop])
            && (!self.has(bits::WATCH) || self.modes[0] == ModeTag::Drop)
            && self.inspection().is_none_or(|i| !i.sniffing() && !i.verifying())
    }

    pub(crate) fn offset(&self, d: Direction) -> u64 {
        self.offset[index(d)]
    }

    pub(crate) fn set_offset(&mut self, d: Direction, o: u64) {
        self.offset[index(d)] = o;
    }

    /// TCP sequence number of the next new byte of `d`, once known.
    pub(crate) fn next_seq(&self, d: Direction) -> Option<u32> {
        let b = if d == Direction::Outbound { bits::SEQ_OUT } else { bits::SEQ_IN };
        self.has(b).then_some(self.next_seq[index(d)])
    }

    pub(crate) fn set_next_seq(&mut self, d: Direction, seq: u32) {
        let b = if d == Direction::Outbound { bits::SEQ_OUT } else { bits::SEQ_IN };
        self.set(b, true);
        self.next_seq[index(d)] = seq;
    }

    pub(crate) fn fin(&self, d: Direction) -> bool {
        self.has(if d == Direction::Outbound { bits::FIN_OUT } else { bits::FIN_IN })
    }

    pub(crate) fn set_fin(&mut self, d: Direction) {
        self.set(if d == Direction::Outbound { bits::FIN_OUT } else { bits::FIN_IN }, true);
    }

    pub(crate) fn ct_id(&self) -> Option<u32> {
        self.has(bits::CT_ID).then_some(self.ct_id)
    }

    pub(crate) fn set_ct_id(&mut self, id: Option<u32>) {
        self.set(bits::CT_ID, id.is_some());
        self.ct_id = id.unwrap_or(0);
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Packets this flow holds.
    pub(crate) fn held(&self) -> &[HeldPacket] {
        self.extra.as_ref().map_or(&[], |x| &x.held)
    }

    pub(crate) fn hold(&mut self, p: HeldPacket) {
        self.extra_mut().held.push(p);
    }

    pub(crate) fn take_held(&mut self) -> Vec<HeldPacket> {
        self.extra.as_mut().map(|x| std::mem::take(&mut x.held)).unwrap_or_default()
    }

    /// Puts back packets taken with `take_held` that stay held (before any held since).
    pub(crate) fn keep_held(&mut self, mut kept: Vec<HeldPacket>) {
        if kept.is_empty() {
            return;
        }
        let x = self.extra_mut();
        kept.append(&mut x.held);
        x.held = kept;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An outbound UDP entry, for table tests.
    pub(crate) fn entry(id: u64, local: &str, remote: &str) -> Entry {
        let flow = Flow {
            id: FlowId(id),
            protocol: Protocol::Udp,
            direction: Direction::Outbound,
            local: local.parse().expect("local"),
            remote: remote.parse().expect("remote"),
            interface: None,
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp: None,
            owner: None,
            host: None,
        };
        Entry::new(&flow, 0, Instant::ZERO)
    }

    #[test]
    fn is_small() {
        // The memory goal is 300 bytes per flow with the indexes and the timer; the entry itself
        // must stay well below it.
        assert!(std::mem::size_of::<Entry>() <= 192, "Entry is {} bytes", std::mem::size_of::<Entry>());
    }

    #[test]
    fn gives_back_the_flow_it_was_made_from() {
        let mut names = Interfaces::default();
        let cases = [
            ("198.51.100.1:40000", "203.0.113.7:443", Protocol::Tcp, None),
            ("[2001:db8::1]:5", "[::ffff:192.0.2.1]:6", Protocol::Tcp, None),
            ("198.51.100.1:7", "203.0.113.7:7", Protocol::Icmp, Some((8, 0))),
            ("[2001:db8::1]:0", "[2001:db8::2]:0", Protocol::Icmp, Some((1, 4))),
            ("[2001:db8::1]:0", "[2001:db8::2]:0", Protocol::Icmp, None),
        ];
        for (local, remote, protocol, icmp) in cases {
            let tun = names.acquire(Some("tun0"));
            let flow = Flow {
                id: FlowId(9),
                protocol,
                direction: Direction::Inbound,
                local: local.parse().expect("local"),
                remote: remote.parse().expect("remote"),
                interface: Some("tun0".into()),
                existing: true,
                forwarded: false,
                started: Instant::from_micros(5),
                icmp,
                owner: None,
                host: None,
            };
            let e = Entry::new(&flow, tun, Instant::ZERO);
            assert_eq!(e.flow(&names), flow);
        }
    }

    #[test]
    fn modes_and_windows_round_trip() {
        let mut e = entry(1, "192.0.2.1:1", "192.0.2.2:2");
        assert!(e.settled());
        e.set_mode(Direction::Inbound, Mode::Inspect { pass_end: 10, peek_end: 30 });
        assert_eq!(e.modes(), (Mode::Allow, Mode::Inspect { pass_end: 10, peek_end: 30 }));
        assert_eq!(e.verdict(), FlowVerdict::Inspect);
        assert!(!e.settled());
        e.set_mode(Direction::Outbound, Mode::Drop);
        assert_eq!(e.verdict(), FlowVerdict::Drop);
        e.set_mode(Direction::Inbound, Mode::Drop);
        assert!(e.settled());
        assert_eq!(e.next_seq(Direction::Outbound), None);
        e.set_next_seq(Direction::Outbound, 7);
        assert_eq!((e.next_seq(Direction::Outbound), e.next_seq(Direction::Inbound)), (Some(7), None));
    }
}
