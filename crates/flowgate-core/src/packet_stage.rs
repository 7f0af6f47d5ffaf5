//! The packet stage: every packet of chosen interfaces, judged one at a time, before any flow
//! state.
//!
//! A driver hands it packets of the interfaces and directions it was set up for (the daemon
//! queues them from the mangle table, ahead of the flow chains) and carries out its answer at
//! once: accept (the packet goes on, to the flow stage), drop, or hold (a packet the product's
//! [`PacketFilter`] delayed; released or dropped later through a [`PacketHandle`], from any
//! thread). Two judges, in this order:
//!
//! 1. the stateless [`PacketRules`] (`[[packet_rule]]`): first match wins; `drop` drops, `allow`
//!    passes the packet on without asking the product's filter;
//! 2. the product's [`PacketFilter`], for packets of the interfaces and directions it was turned on
//!    for ([`PacketStageConfig::filter_interfaces`], [`PacketStageConfig::filter_directions`]).
//!
//! Anything else is accepted. A packet is shown as it is, also when it cannot be parsed: rules
//! read its addresses and protocol where they can (`etherparse`'s lax IP slices, which accept a
//! cut-off payload), and a packet whose protocol or addresses cannot be read matches every `drop`
//! rule whose other fields match and no `allow` rule that names them, so malformed packets cannot
//! slip past a drop rule.
//!
//! Delayed packets are bounded: at most [`PacketStageConfig::max_delayed`] at once (a delay past
//! it drops the packet, counted `delay_overflow`) and each for at most
//! [`PacketStageConfig::max_delay`] (then it gets [`PacketStageConfig::expired_accept`]'s verdict,
//! counted `delay_expired`). A product filter call that panics or runs over its budget gives the
//! packet the fail mode's verdict and is counted and reported, as in the flow engine.
//!
//! Counters: per interface and direction (packets, bytes, drops, delays) and per packet rule
//! (hits in packets and bytes). Interfaces are kept by name up to [`MAX_INTERFACES`]; packets of
//! interfaces past that are counted under [`OTHER_INTERFACES`], but still judged by their own
//! names. Nothing here allocates per packet once an interface has been seen.
//!
//! Like the engine, the stage never reads a clock or touches a socket: time comes in with each
//! call.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etherparse::LaxIpSlice;
use ipnet::IpNet;
use serde::Serialize;

use crate::engine::{FaultKind, ProviderFault};
use crate::flow::Protocol;
use crate::handle::{HandleError, Waker};
use crate::provider::{PacketContext, PacketFilter};
use crate::rules::{InterfaceGlob, ProtocolMatch};
use crate::time::Instant;
use crate::verdict::{PacketAction, PacketId, PacketVerdict};

/// Most interfaces counted by name; the rest share [`OTHER_INTERFACES`].
pub const MAX_INTERFACES: usize = 1024;
/// The name packets of interfaces past [`MAX_INTERFACES`] (or of no known interface) are
/// counted under.
/// It has a space, which no interface name can have, so it never stands for a real interface.
pub const OTHER_INTERFACES: &str = "(other interfaces)";
/// Commands a [`PacketHandle`] can have in flight before `release` says the stage is busy.
pub const PACKET_COMMAND_CAPACITY: usize = 65_536;
/// Most provider faults kept for [`PacketStage::poll_fault`]; older ones are only counted.
const MAX_FAULTS: usize = 64;

/// Which way a packet goes through the host, as the netfilter hook that saw it says.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PacketDirection {
    /// Addressed to this host (received on the interface).
    Inbound,
    /// Sent by this host (leaving by the interface).
    Outbound,
    /// Routed through this host (the interface is the one it came in or goes out on).
    Forwarded,
}

impl PacketDirection {
    pub const ALL: [PacketDirection; 3] =
        [PacketDirection::Inbound, PacketDirection::Outbound, PacketDirection::Forwarded];

    pub fn name(self) -> &'static str {
        match self {
            PacketDirection::Inbound => "inbound",
            PacketDirection::Outbound => "outbound",
            PacketDirection::Forwarded => "forwarded",
        }
    }

    /// Parses `inbound`, `outbound` or `forwarded`.
    pub fn parse(text: &str) -> Option<PacketDirection> {
        PacketDirection::ALL.into_iter().find(|d| d.name() == text.trim())
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A set of packet directions.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Directions(u8);

impl Directions {
    pub const ALL: Directions = Directions(0b111);
    pub const NONE: Directions = Directions(0);

    pub fn with(self, d: PacketDirection) -> Directions {
        Directions(self.0 | 1 << d.index())
    }

    pub fn contains(self, d: PacketDirection) -> bool {
        self.0 & (1 << d.index()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn union(self, other: Directions) -> Directions {
        Directions(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = PacketDirection> {
        PacketDirection::ALL.into_iter().filter(move |d| self.contains(*d))
    }
}

/// What a packet rule does with the packets it matches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PacketRuleAction {
    /// The packet passes the packet stage (the product's packet filter is not asked).
    Allow,
    Drop,
}

impl PacketRuleAction {
    pub fn name(self) -> &'static str {
        match self {
            PacketRuleAction::Allow => "allow",
            PacketRuleAction::Drop => "drop",
        }
    }
}

/// One stateless packet rule: every given field must match.
#[derive(Clone, Debug, PartialEq)]
pub struct PacketRule {
    pub name: Arc<str>,
    pub interface: Option<InterfaceGlob>,
    pub directions: Directions,
    pub protocol: ProtocolMatch,
    /// The far end (any of these networks; empty: anything): the source of inbound packets, the
    /// destination of outbound ones, either address of a forwarded one.
    pub remote: Vec<IpNet>,
    /// This host's end (any of these; empty: anything): the destination of inbound packets, the
    /// source of outbound ones, either address of a forwarded one.
    pub local: Vec<IpNet>,
    pub action: PacketRuleAction,
}

impl PacketRule {
    /// A rule that matches every packet in every direction.
    pub fn new(name: impl Into<Arc<str>>, action: PacketRuleAction) -> Self {
        PacketRule {
            name: name.into(),
            interface: None,
            directions: Directions::ALL,
            protocol: ProtocolMatch::Any,
            remote: Vec::new(),
            local: Vec::new(),
            action,
        }
    }

    /// Whether the rule matches a packet of `direction` on an interface it matches, with these
    /// header facts (`None`: could not be read).
    fn matches(&self, direction: PacketDirection, h: &Header) -> bool {
        if !self.directions.contains(direction) {
            return false;
        }
        // Unknown facts count as matching for a drop rule and as not matching for an allow
        // rule: a packet that hides its protocol or addresses cannot get past a drop rule.
        let unknown = self.action == PacketRuleAction::Drop;
        let protocol_ok = match self.protocol {
            ProtocolMatch::Any => true,
            ProtocolMatch::Only(p) => h.protocol.map_or(unknown, |q| q == p),
        };
        let ends = |nets: &[IpNet], mine: fn(&Header, PacketDirection) -> [Option<IpAddr>; 2]| {
            if nets.is_empty() {
                return true;
            }
            let addrs = mine(h, direction);
            if addrs.iter().all(Option::is_none) {
                unknown
            } else {
                addrs.iter().flatten().any(|a| nets.iter().any(|n| n.contains(a)))
            }
        };
        protocol_ok && ends(&self.remote, Header::remote) && ends(&self.local, Header::local)
    }
}

/// The packet rules, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PacketRules {
    pub rules: Vec<PacketRule>,
}

/// What the stage reads of a packet's header to match rules.
#[derive(Copy, Clone, Debug, Default)]
struct Header {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    protocol: Option<Protocol>,
}

impl Header {
    fn read(bytes: &[u8]) -> (Header, bool) {
        match LaxIpSlice::from_slice(bytes) {
            Ok((ip, ext_error)) => {
                let protocol = if ext_error.is_some() {
                    // The extension header chain is broken: the upper protocol is unknown.
                    None
                } else {
                    Some(match ip.payload_ip_number().0 {
                        6 => Protocol::Tcp,
                        17 => Protocol::Udp,
                        1 | 58 => Protocol::Icmp,
                        n => Protocol::Other(n),
                    })
                };
                let h = Header { src: Some(ip.source_addr()), dst: Some(ip.destination_addr()), protocol };
                (h, ext_error.is_some())
            }
            Err(_) => (Header::default(), true),
        }
    }

    fn remote(&self, d: PacketDirection) -> [Option<IpAddr>; 2] {
        match d {
            PacketDirection::Inbound => [self.src, None],
            PacketDirection::Outbound => [self.dst, None],
            PacketDirection::Forwarded => [self.src, self.dst],
        }
    }

    fn local(&self, d: PacketDirection) -> [Option<IpAddr>; 2] {
        match d {
            PacketDirection::Inbound => [self.dst, None],
            PacketDirection::Outbound => [self.src, None],
            PacketDirection::Forwarded => [self.src, self.dst],
        }
    }
}

/// How a packet stage is set up; fixed for its life (rules can change).
#[derive(Clone, Debug)]
pub struct PacketStageConfig {
    /// The interfaces the product's packet filter judges (globs); empty: none.
    pub filter_interfaces: Vec<InterfaceGlob>,
    /// The directions it judges on them.
    pub filter_directions: Directions,
    /// Most packets delayed at once; a delay past it drops the packet.
    pub max_delayed: usize,
    /// Longest a packet stays delayed.
    pub max_delay: Duration,
    /// What a packet delayed for longer than `max_delay` gets: accepted (true) or dropped.
    pub expired_accept: bool,
    /// The fail mode, for packets whose provider call faulted.
    pub fail_open: bool,
    /// Longest a provider call may take (timed with the driver's stopwatch).
    pub provider_budget: Duration,
    /// First packet id and the step between ids, so the stages of several queues hand out ids
    /// that never collide (stage `k` of `n`: first `k + 1`, step `n`).
    pub first_packet_id: u64,
    pub packet_id_step: u64,
}

impl Default for PacketStageConfig {
    fn default() -> Self {
        PacketStageConfig {
            filter_interfaces: Vec::new(),
            filter_directions: Directions::ALL,
            max_delayed: 4096,
            max_delay: Duration::from_secs(10),
            expired_accept: false,
            fail_open: true,
            provider_budget: Duration::from_millis(100),
            first_packet_id: 1,
            packet_id_step: 1,
        }
    }
}

/// Counts of one interface in one direction.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InterfaceCounters {
    pub packets: u64,
    /// IP bytes, headers included.
    pub bytes: u64,
    pub dropped: u64,
    pub delayed: u64,
}

/// One interface's counters, per direction that saw packets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceStats {
    pub name: Arc<str>,
    pub direction: PacketDirection,
    #[serde(flatten)]
    pub counters: InterfaceCounters,
}

/// A packet rule's hits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleHits {
    pub name: Arc<str>,
    pub action: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Totals of a packet stage.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PacketStageStats {
    pub packets: u64,
    pub bytes: u64,
    pub accepted: u64,
    pub dropped: u64,
    /// Packets the product's filter delayed (each counted once).
    pub delayed: u64,
    /// Delayed packets released through a handle (accepted or dropped).
    pub released: u64,
    /// Delays refused because `max_delayed` packets were delayed already: dropped.
    pub delay_overflow: u64,
    /// Delayed packets that waited `max_delay` and got the configured verdict.
    pub delay_expired: u64,
    /// Packets whose IP header could not be read whole (counted, and judged as described in the
    /// module documentation).
    pub unparsable: u64,
    /// Product filter calls that panicked or ran over their budget.
    pub provider_faults: u64,
    /// Delayed packets now.
    pub delayed_now: u64,
}

/// A command for a packet stage.
enum Command {
    Release { packet: PacketId, accept: bool },
    Rules(Arc<PacketRules>),
    Filter { interfaces: Vec<InterfaceGlob>, directions: Directions },
}

/// The packet stage's remote control, usable from any thread: releases delayed packets and
/// replaces the rules. Cheap to clone.
#[derive(Clone)]
pub struct PacketHandle {
    tx: SyncSender<Command>,
    waker: Arc<Mutex<Option<Waker>>>,
    refused: Arc<AtomicU64>,
}

impl std::fmt::Debug for PacketHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketHandle").finish_non_exhaustive()
    }
}

impl PacketHandle {
    fn send(&self, c: Command) -> Result<(), HandleError> {
        match self.tx.try_send(c) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(HandleError::Busy);
            }
            Err(TrySendError::Disconnected(_)) => return Err(HandleError::Gone),
        }
        if let Some(w) = self.waker.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            w();
        }
        Ok(())
    }

    /// Accepts (`accept`) or drops a packet the filter delayed. A packet no longer delayed
    /// (released before, expired, or never delayed) is left alone.
    pub fn release(&self, packet: PacketId, accept: bool) -> Result<(), HandleError> {
        self.send(Command::Release { packet, accept })
    }

    /// Replaces the packet rules; packets from now on are judged by them.
    pub fn set_rules(&self, rules: Arc<PacketRules>) -> Result<(), HandleError> {
        self.send(Command::Rules(rules))
    }

    /// Changes the interfaces and directions the product's filter judges.
    pub fn set_filter_coverage(
        &self,
        interfaces: Vec<InterfaceGlob>,
        directions: Directions,
    ) -> Result<(), HandleError> {
        self.send(Command::Filter { interfaces, directions })
    }
}

/// A seen interface: its counters and what applies to it.
struct Interface {
    name: Arc<str>,
    counters: [InterfaceCounters; 3],
    /// Indexes of the rules whose interface glob matches it.
    rules: Vec<u16>,
    /// The product's filter judges it (in its directions).
    filtered: bool,
}

/// The packet stage. See the module documentation.
pub struct PacketStage {
    config: PacketStageConfig,
    rules: Arc<PacketRules>,
    /// Per rule: packets and bytes.
    hits: Vec<(u64, u64)>,
    filter: Option<Box<dyn PacketFilter>>,
    interfaces: Vec<Interface>,
    /// The interface of the packet before (packets come in runs).
    last: Option<usize>,
    /// Delayed packets and their deadlines, in delay order (deadlines only grow).
    delayed: HashMap<PacketId, Instant>,
    deadlines: VecDeque<(Instant, PacketId)>,
    releases: VecDeque<(PacketId, bool)>,
    next_packet_id: u64,
    stats: PacketStageStats,
    faults: VecDeque<ProviderFault>,
    stopwatch: Option<Box<dyn Fn() -> Duration + Send>>,
    commands: Receiver<Command>,
    handle: PacketHandle,
}

impl std::fmt::Debug for PacketStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketStage").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl PacketStage {
    pub fn new(config: PacketStageConfig, rules: Arc<PacketRules>) -> Self {
        let (tx, rx) = mpsc::sync_channel(PACKET_COMMAND_CAPACITY);
        let handle = PacketHandle { tx, waker: Arc::new(Mutex::new(None)), refused: Arc::new(AtomicU64::new(0)) };
        PacketStage {
            hits: vec![(0, 0); rules.rules.len()],
            rules,
            filter: None,
            interfaces: Vec::new(),
            last: None,
            delayed: HashMap::new(),
            deadlines: VecDeque::new(),
            releases: VecDeque::new(),
            next_packet_id: config.first_packet_id.max(1),
            config,
            stats: PacketStageStats::default(),
            faults: VecDeque::new(),
            stopwatch: None,
            commands: rx,
            handle,
        }
    }

    /// Installs the product's packet filter.
    pub fn set_filter(&mut self, filter: Box<dyn PacketFilter>) {
        self.filter = Some(filter);
    }

    /// Times provider calls with `stopwatch` (monotonic); calls over the budget count as faults.
    pub fn set_stopwatch(&mut self, stopwatch: impl Fn() -> Duration + Send + 'static) {
        self.stopwatch = Some(Box::new(stopwatch));
    }

    /// Called after each command sent through a handle, so a sleeping driver wakes up.
    pub fn set_waker(&mut self, waker: impl Fn() + Send + Sync + 'static) {
        let w: Waker = Arc::new(waker);
        *self.handle.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(w);
    }

    /// A handle for other threads (and for the product's filter, to release what it delayed).
    pub fn handle(&self) -> PacketHandle {
        self.handle.clone()
    }

    /// Replaces the rules (also possible through a handle). Hit counts start again from zero.
    pub fn set_rules(&mut self, rules: Arc<PacketRules>) {
        self.hits = vec![(0, 0); rules.rules.len()];
        self.rules = rules;
        for i in 0..self.interfaces.len() {
            let name = self.interfaces[i].name.clone();
            self.interfaces[i].rules = self.rules_for(&name);
        }
    }

    /// Changes the interfaces and directions the product's filter judges (also possible
    /// through a handle).
    pub fn set_filter_coverage(&mut self, interfaces: Vec<InterfaceGlob>, directions: Directions) {
        self.config.filter_interfaces = interfaces;
        self.config.filter_directions = directions;
        for i in &mut self.interfaces {
            i.filtered =
                *i.name != *OTHER_INTERFACES && self.config.filter_interfaces.iter().any(|g| g.matches(&i.name));
        }
    }

    /// Whether anything here judges packets of `interface` going `direction`: the product's
    /// filter (its interfaces and directions) or a packet rule (its interface, or none, and its
    /// directions). The driver names a forwarded packet by the interface this is true of.
    pub fn covers(&self, interface: &str, direction: PacketDirection) -> bool {
        let by_filter = self.config.filter_directions.contains(direction)
            && self.config.filter_interfaces.iter().any(|g| g.matches(interface));
        by_filter
            || self
                .rules
                .rules
                .iter()
                .any(|r| r.directions.contains(direction) && r.interface.as_ref().is_none_or(|g| g.matches(interface)))
    }

    pub fn rules(&self) -> &Arc<PacketRules> {
        &self.rules
    }

    pub fn stats(&self) -> PacketStageStats {
        PacketStageStats { delayed_now: self.delayed.len() as u64, ..self.stats }
    }

    /// Counters of every interface and direction that saw packets.
    pub fn interface_stats(&self) -> Vec<InterfaceStats> {
        let mut out = Vec::new();
        self.fill_interface_stats(&mut out);
        out
    }

    /// The same into `out` (cleared first), reusing its room.
    pub fn fill_interface_stats(&self, out: &mut Vec<InterfaceStats>) {
        out.clear();
        for i in &self.interfaces {
            for d in PacketDirection::ALL {
                let c = i.counters[d.index()];
                if c.packets > 0 {
                    out.push(InterfaceStats { name: i.name.clone(), direction: d, counters: c });
                }
            }
        }
    }

    /// Hits of every packet rule, in rule order.
    pub fn rule_hits(&self) -> Vec<RuleHits> {
        self.rules
            .rules
            .iter()
            .zip(&self.hits)
            .map(|(r, (p, b))| RuleHits { name: r.name.clone(), action: r.action.name(), packets: *p, bytes: *b })
            .collect()
    }

    /// Commands refused because the handle's channel was full.
    pub fn commands_refused(&self) -> u64 {
        self.handle.refused.load(Ordering::Relaxed)
    }

    fn rules_for(&self, name: &str) -> Vec<u16> {
        let named = name != OTHER_INTERFACES;
        (0..self.rules.rules.len().min(usize::from(u16::MAX)))
            .filter(|&i| match &self.rules.rules[i].interface {
                None => true,
                Some(g) => named && g.matches(name),
            })
            .map(|i| i as u16)
            .collect()
    }

    /// The record of interface `name`, made on first sight.
    fn interface(&mut self, name: Option<&str>) -> usize {
        let name = name.unwrap_or(OTHER_INTERFACES);
        if let Some(i) = self.last
            && *self.interfaces[i].name == *name
        {
            return i;
        }
        let found = self.interfaces.iter().position(|i| *i.name == *name);
        let i = match found {
            Some(i) => i,
            None if self.interfaces.len() < MAX_INTERFACES || name == OTHER_INTERFACES => {
                let filtered =
                    name != OTHER_INTERFACES && self.config.filter_interfaces.iter().any(|g| g.matches(name));
                let rules = self.rules_for(name);
                self.interfaces.push(Interface { name: name.into(), counters: Default::default(), rules, filtered });
                self.interfaces.len() - 1
            }
            None => return self.interface(None),
        };
        self.last = Some(i);
        i
    }

    /// Judges one IP packet of `interface`, going `direction`, seen at `now`. Commands waiting
    /// from handles are applied first (a few, so a packet never waits behind many).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        interface: Option<&str>,
        direction: PacketDirection,
        bytes: &[u8],
    ) -> PacketAction {
        self.apply_commands(16);
        self.expire(now);
        let i = self.interface(interface);
        let len = bytes.len() as u64;
        self.stats.packets += 1;
        self.stats.bytes += len;
        let d = direction.index();
        self.interfaces[i].counters[d].packets += 1;
        self.interfaces[i].counters[d].bytes += len;

        // The record stands for this very interface (its rules and coverage are cached there), or
        // for many (an interface seen past MAX_INTERFACES shares the `(other interfaces)`
        // record): then what applies is worked out from the real name, packet by packet, so no
        // rule or filter ever stops applying because many interfaces came and went.
        let cached = interface.is_none_or(|n| *self.interfaces[i].name == *n);
        let candidates = if cached { self.interfaces[i].rules.len() } else { self.rules.rules.len() };
        let mut decided = None;
        if candidates > 0 {
            let (h, unparsable) = Header::read(bytes);
            if unparsable {
                self.stats.unparsable += 1;
            }
            for k in 0..candidates {
                let r = if cached { usize::from(self.interfaces[i].rules[k]) } else { k };
                let rule = &self.rules.rules[r];
                let on_interface =
                    cached || rule.interface.as_ref().is_none_or(|g| interface.is_some_and(|n| g.matches(n)));
                if on_interface && rule.matches(direction, &h) {
                    let hits = &mut self.hits[r];
                    hits.0 += 1;
                    hits.1 += len;
                    decided = Some(rule.action);
                    break;
                }
            }
        }
        let filtered = if cached {
            self.interfaces[i].filtered
        } else {
            interface.is_some_and(|n| self.config.filter_interfaces.iter().any(|g| g.matches(n)))
        };
        let action = match decided {
            Some(PacketRuleAction::Drop) => PacketAction::Drop,
            Some(PacketRuleAction::Allow) => PacketAction::Accept,
            None if filtered && self.config.filter_directions.contains(direction) => {
                // Each packet shown to the filter has an id of its own, for a later release.
                let id = PacketId(self.next_packet_id);
                self.next_packet_id += self.config.packet_id_step.max(1);
                match self.call_filter(interface, id, direction, bytes) {
                    PacketVerdict::Allow => PacketAction::Accept,
                    PacketVerdict::Drop => PacketAction::Drop,
                    PacketVerdict::Delay => self.delay(now, id),
                }
            }
            None => PacketAction::Accept,
        };
        match action {
            PacketAction::Accept => self.stats.accepted += 1,
            PacketAction::Drop => {
                self.stats.dropped += 1;
                self.interfaces[i].counters[d].dropped += 1;
            }
            PacketAction::Hold(_) => self.interfaces[i].counters[d].delayed += 1,
        }
        action
    }

    fn delay(&mut self, now: Instant, id: PacketId) -> PacketAction {
        if self.delayed.len() >= self.config.max_delayed {
            self.stats.delay_overflow += 1;
            return PacketAction::Drop;
        }
        let deadline = now + self.config.max_delay;
        self.delayed.insert(id, deadline);
        // Released packets leave their deadline behind; drop those once they outnumber the
        // delayed ones, so the queue stays bounded by `max_delayed`.
        if self.deadlines.len() >= 2 * self.config.max_delayed.max(16) {
            let delayed = &self.delayed;
            self.deadlines.retain(|(_, id)| delayed.contains_key(id));
        }
        self.deadlines.push_back((deadline, id));
        self.stats.delayed += 1;
        PacketAction::Hold(id)
    }

    /// Asks the product's filter about a packet of `interface`; faults give the fail mode's
    /// verdict.
    fn call_filter(
        &mut self,
        interface: Option<&str>,
        id: PacketId,
        direction: PacketDirection,
        bytes: &[u8],
    ) -> PacketVerdict {
        let Some(mut filter) = self.filter.take() else { return PacketVerdict::Allow };
        let ctx = PacketContext { id, interface, direction, bytes };
        let started = self.stopwatch.as_ref().map(|s| s());
        let result = catch_unwind(AssertUnwindSafe(|| filter.packet(&ctx)));
        let took = started.and_then(|t0| self.stopwatch.as_ref().map(|s| s().saturating_sub(t0)));
        let fault = match (&result, took) {
            (Err(payload), _) => Some(FaultKind::Panic(crate::engine::panic_message(&**payload))),
            (Ok(_), Some(t)) if t > self.config.provider_budget => Some(FaultKind::Slow(t)),
            _ => None,
        };
        let verdict = match (result, &fault) {
            (Ok(v), None) => v,
            _ => {
                self.stats.provider_faults += 1;
                if self.faults.len() < MAX_FAULTS
                    && let Some(kind) = fault
                {
                    self.faults.push_back(ProviderFault {
                        provider: filter.name().to_string(),
                        call: "packet",
                        flow: None,
                        kind,
                    });
                }
                // A delay the faulty call asked for is not honoured: the packet gets the fail
                // mode's verdict now.
                if self.config.fail_open { PacketVerdict::Allow } else { PacketVerdict::Drop }
            }
        };
        self.filter = Some(filter);
        verdict
    }

    /// Delayed packets past their deadline get the configured verdict.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if self.delayed.remove(&id).is_some() {
                self.stats.delay_expired += 1;
                self.releases.push_back((id, self.config.expired_accept));
            }
        }
    }

    /// Applies commands from handles, at most `budget`.
    fn apply_commands(&mut self, budget: usize) {
        for _ in 0..budget {
            let Ok(c) = self.commands.try_recv() else { return };
            match c {
                Command::Release { packet, accept } => {
                    if self.delayed.remove(&packet).is_some() {
                        self.stats.released += 1;
                        self.releases.push_back((packet, accept));
                    }
                }
                Command::Rules(rules) => self.set_rules(rules),
                Command::Filter { interfaces, directions } => self.set_filter_coverage(interfaces, directions),
            }
        }
    }

    /// Applies what handles sent and lets expired delays go. Call when woken, and when
    /// [`PacketStage::poll_timeout`] is reached.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.apply_commands(4096);
        self.expire(now);
    }

    /// When the next delayed packet expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        // The front may be a released packet's: waking for it is harmless, and it goes then.
        self.deadlines.front().map(|(t, _)| *t)
    }

    /// The next delayed packet whose fate is known: its id and whether it is accepted.
    pub fn poll_release(&mut self) -> Option<(PacketId, bool)> {
        self.releases.pop_front()
    }

    /// The next provider fault, oldest first.
    pub fn poll_fault(&mut self) -> Option<ProviderFault> {
        self.faults.pop_front()
    }

    /// Ends every delay (the driver is stopping): each delayed packet gets `accept`.
    pub fn release_all(&mut self, accept: bool) {
        for (id, _) in self.delayed.drain() {
            self.releases.push_back((id, accept));
        }
        self.deadlines.clear();
    }
}

#[cfg(test)]
mod tests;
