//! The engine: a state machine fed with packets and time that returns verdicts and events.
//!
//! It never reads a clock, a socket or a file. A driver (the replay loop, the NFQUEUE daemon,
//! a test) drives it like this:
//!
//! 1. for each packet: `handle_packet(now, meta, bytes)` → a [`Decision`] to carry out at once;
//! 2. when [`Engine::poll_timeout`] says so: `handle_timeout(now)` (idle flows close);
//! 3. after either: drain [`Engine::poll_event`] (events to log) and [`Engine::poll_release`]
//!    (held packets to accept or drop now).
//!
//! Methods come in these kinds: getters (`stats`, `flows`, `rules`), `handle_*` (input), commands
//! (`set_rules`, `update`, `close_all`), and `poll_*` (output). The engine owns the flow table,
//! the compiled rules and the optional product providers; the built-in rule set and a product's
//! [`FlowFilter`] judge side by side and the most restrictive verdict wins (drop, then pause,
//! then inspect, then allow).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::event::{CloseReason, Event, EventKind, FlowReport, Peek, RuleName, UpdateSource};
use crate::flow::{Counters, Direction, Flow, FlowId, FlowKey, FlowTable, Protocol, Slot};
use crate::handle::{Command, FlowStatus, Handle, KernelReport, Snapshot, SnapshotSlot, Waker};
use crate::packet::{self, ParseError, ParsedPacket};
use crate::provider::{FlowFilter, PacketContext, PacketFilter};
use crate::rules::Action;
use crate::rules::matcher::CompiledRules;
use crate::time::Instant;
use crate::verdict::{DataVerdict, Decision, FlowVerdict, NewFlowVerdict, PacketAction, PacketId, PacketVerdict};

/// Idle timeouts per protocol, and how long a TCP flow lingers after FIN/RST so that its last
/// ACKs and retransmissions are counted to it instead of opening a new flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Duration,
    pub tcp_closing: Duration,
    pub udp: Duration,
    pub icmp: Duration,
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp: Duration::from_secs(7200),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(30),
            other: Duration::from_secs(60),
        }
    }
}

/// How the engine is set up; fixed for its life (rules can change, see [`Engine::set_rules`]).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Addresses of this host. A flow's end inside these is its local end. When empty (or for
    /// packets touching none of them) the side that opened the flow counts as local.
    pub local_networks: Vec<IpNet>,
    pub timeouts: Timeouts,
    /// Most live flows; past it new flows are judged by the rules alone, untracked, and counted.
    pub max_flows: usize,
    /// Most packets held at once (paused flows, delayed packets); past it they are dropped.
    pub max_held_packets: usize,
    /// First flow id and the step between ids, so several engines (one per queue) can hand out
    /// ids that never collide: engine `k` of `n` uses first `k + 1`, step `n`.
    pub first_flow_id: u64,
    pub flow_id_step: u64,
    /// How often `handle_timeout` publishes the snapshot that [`Handle::flows`] reads.
    pub snapshot_interval: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            local_networks: Vec::new(),
            timeouts: Timeouts::default(),
            max_flows: 262_144,
            max_held_packets: 4096,
            first_flow_id: 1,
            flow_id_step: 1,
            snapshot_interval: Duration::from_secs(1),
        }
    }
}

/// Where the driver saw a packet. Live drivers know it from the netfilter hook; captures do not.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Sent by this host (OUTPUT): the source is local.
    Output,
    /// Addressed to this host (INPUT): the destination is local.
    Input,
    /// Routed through this host (FORWARD): neither end is local; the opener is taken as the
    /// local end and the flow is marked `forwarded`.
    Forward,
    /// Seen in a capture: decided from `local_networks` and from who opened the flow.
    Unknown,
}

/// Facts about a packet that are not in its bytes.
#[derive(Copy, Clone, Debug)]
pub struct PacketMeta<'a> {
    pub interface: Option<&'a str>,
    pub origin: Origin,
}

/// Counters of everything the engine has seen.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub packets: u64,
    pub truncated: u64,
    pub malformed: u64,
    pub fragments: u64,
    pub not_ip: u64,
    pub flows_opened: u64,
    pub flows_closed: u64,
    /// Packets judged by the rules alone, untracked, because the flow table was full (every
    /// packet of such a flow counts: each one is judged afresh).
    pub untracked: u64,
    /// Packets dropped because too many were held.
    pub held_overflow: u64,
}

/// A connection that was open before the engine started, as the data plane found it (socket
/// tables, conntrack). See [`Engine::adopt`].
#[derive(Copy, Clone, Debug)]
pub struct Existing<'a> {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub direction: Direction,
    pub forwarded: bool,
    pub interface: Option<&'a str>,
    /// The verdict a previous instance left on the flow (its conntrack mark): kept as it is.
    pub kept: Option<FlowVerdict>,
}

/// A verdict the data plane must carry out itself, because the flow's packets may not reach the
/// engine again: the kernel handles a decided flow alone. `Allow`: let the kernel pass it.
/// `Drop`: stop it now in both directions and tear the connection down at both ends.
#[derive(Clone, Debug, PartialEq)]
pub struct Enforce {
    pub flow: Flow,
    pub verdict: FlowVerdict,
    /// A drop should not tell the sender.
    pub silent: bool,
}

/// A held packet's fate, decided later.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub packet: PacketId,
    pub accept: bool,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Mode {
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
    fn verdict(self) -> FlowVerdict {
        match self {
            Mode::Allow => FlowVerdict::Allow,
            Mode::Drop => FlowVerdict::Drop,
            Mode::Pause => FlowVerdict::Pause,
            Mode::Inspect { .. } => FlowVerdict::Inspect,
        }
    }

    fn from_data(v: DataVerdict, offset: u64) -> Mode {
        match v {
            DataVerdict::Allow | DataVerdict::Pass { peek: 0, .. } => Mode::Allow,
            DataVerdict::Drop => Mode::Drop,
            DataVerdict::Pause => Mode::Pause,
            DataVerdict::Pass { pass, peek } => {
                let pass_end = offset + u64::from(pass);
                Mode::Inspect { pass_end, peek_end: pass_end + u64::from(peek) }
            }
        }
    }
}

/// One direction of a flow's stream.
#[derive(Copy, Clone, Debug)]
struct Side {
    mode: Mode,
    /// Payload bytes of this direction seen so far (stream offset of the next new byte).
    offset: u64,
    /// TCP sequence number of the next new byte, once known.
    next_seq: Option<u32>,
    fin: bool,
}

impl Side {
    fn new(mode: Mode) -> Self {
        Side { mode, offset: 0, next_seq: None, fin: false }
    }
}

#[derive(Debug)]
struct Entry {
    flow: Flow,
    counters: Counters,
    last_seen: Instant,
    rule: Option<RuleName>,
    out: Side,
    inn: Side,
    /// The product filter asked to see this flow's data.
    filter_inspects: bool,
    closing: Option<CloseReason>,
    /// Time of this flow's pending entry in the timer heap.
    timer_at: Instant,
    held: Vec<PacketId>,
    /// Drops of this flow do not tell the sender.
    silent: bool,
    /// Sequence number after the opening SYN, to tell a retransmitted SYN from a new
    /// connection on the same 4-tuple.
    syn_seq: Option<u32>,
}

impl Entry {
    fn side(&mut self, d: Direction) -> &mut Side {
        match d {
            Direction::Outbound => &mut self.out,
            Direction::Inbound => &mut self.inn,
        }
    }

    fn verdict(&self) -> FlowVerdict {
        let (a, b) = (self.out.mode.verdict(), self.inn.mode.verdict());
        if a.severity() >= b.severity() { a } else { b }
    }

    fn settled(&self) -> bool {
        matches!((self.out.mode, self.inn.mode), (Mode::Allow, Mode::Allow) | (Mode::Drop, Mode::Drop))
    }

    fn status(&self) -> FlowStatus {
        FlowStatus {
            flow: self.flow.clone(),
            verdict: self.verdict(),
            rule: self.rule.clone(),
            counters: self.counters,
            last_seen: self.last_seen,
        }
    }
}

/// The flow filter engine. See the module documentation for how to drive it.
pub struct Engine {
    config: EngineConfig,
    rules: Arc<CompiledRules>,
    filter: Option<Box<dyn FlowFilter>>,
    packet_filter: Option<Box<dyn PacketFilter>>,
    flows: FlowTable<Entry>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    events: VecDeque<Event>,
    releases: VecDeque<Release>,
    /// Held packet → its flow (None for packets delayed by the packet filter).
    held: HashMap<PacketId, Option<FlowId>>,
    next_flow_id: u64,
    next_packet_id: u64,
    interfaces: HashSet<Arc<str>>,
    stats: Stats,
    commands: Receiver<Command>,
    handle: Handle,
    next_snapshot: Option<Instant>,
    default_rule: RuleName,
    provider_rule: RuleName,
    kept_rule: RuleName,
    actions: VecDeque<Enforce>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("flows", &self.flows.len()).field("stats", &self.stats).finish()
    }
}

impl Engine {
    pub fn new(config: EngineConfig, rules: Arc<CompiledRules>) -> Self {
        let (tx, rx) = mpsc::channel();
        let handle = Handle { tx, waker: Arc::new(Mutex::new(None)), snapshot: Arc::new(SnapshotSlot::default()) };
        Engine {
            flows: FlowTable::new(config.max_flows),
            next_flow_id: config.first_flow_id,
            config,
            rules,
            filter: None,
            packet_filter: None,
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            releases: VecDeque::new(),
            held: HashMap::new(),
            next_packet_id: 1,
            interfaces: HashSet::new(),
            stats: Stats::default(),
            commands: rx,
            handle,
            next_snapshot: None,
            default_rule: "default".into(),
            provider_rule: "provider".into(),
            kept_rule: "kept".into(),
            actions: VecDeque::new(),
        }
    }

    /// Installs a product's flow filter beside the rules.
    pub fn set_flow_filter(&mut self, filter: Box<dyn FlowFilter>) {
        self.filter = Some(filter);
    }

    /// Installs a packet filter: from now on it sees every packet.
    pub fn set_packet_filter(&mut self, filter: Box<dyn PacketFilter>) {
        self.packet_filter = Some(filter);
    }

    /// A handle for other threads. All handles of an engine share one channel and snapshot.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Called after each command sent through a handle, so a sleeping driver wakes up and
    /// calls [`Engine::handle_commands`].
    pub fn set_waker(&mut self, waker: impl Fn() + Send + Sync + 'static) {
        let w: Waker = Arc::new(waker);
        *self.handle.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(w);
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn rules(&self) -> &Arc<CompiledRules> {
        &self.rules
    }

    /// Live flows, now.
    pub fn flows(&self) -> Vec<FlowStatus> {
        self.flows.iter().map(Entry::status).collect()
    }

    /// Replaces the rule set. Flows that start from now on are judged by the new rules.
    pub fn set_rules(&mut self, rules: Arc<CompiledRules>) {
        self.rules = rules;
    }

    /// Judges one IP packet (starting at its IP header) seen at `now`.
    pub fn handle_packet(&mut self, now: Instant, meta: PacketMeta<'_>, bytes: &[u8]) -> Decision {
        self.handle_commands(now);
        self.stats.packets += 1;
        let p = match packet::parse(bytes) {
            Ok(p) => p,
            Err(e) => {
                match e {
                    ParseError::Truncated => self.stats.truncated += 1,
                    ParseError::Malformed => self.stats.malformed += 1,
                    ParseError::Fragment => self.stats.fragments += 1,
                    ParseError::NotIp => self.stats.not_ip += 1,
                }
                // Nothing to judge it by; the kernel has its own checks for broken packets.
                return Decision { action: PacketAction::Accept, flow: None, settled: false, silent: false };
            }
        };
        let key = FlowKey::new(p.protocol, (p.src, p.src_port), (p.dst, p.dst_port));
        let mut slot = self.flows.lookup(&key);
        if let Some(s) = slot {
            // A connection never sends a pure SYN once open, so one that is not a retransmission
            // of this flow's own opening SYN is a new connection on a reused 4-tuple. The old one
            // may have ended unseen (a kernel-handled flow's FIN or RST never reaches us): the new
            // one must be judged, not inherit the old verdict.
            let reopen = p.tcp.is_some_and(|f| f.syn && !f.ack)
                && self.flows.get(s).is_some_and(|e| e.closing.is_some() || e.syn_seq != Some(p.seq));
            if reopen {
                self.close(s, now, CloseReason::Reused);
                slot = None;
            }
        }
        let slot = match slot {
            Some(s) => s,
            None => match self.open(now, meta, &p, key) {
                Ok(s) => s,
                Err(action) => {
                    return Decision { action, flow: None, settled: false, silent: false };
                }
            },
        };
        self.on_packet(slot, now, meta, &p, bytes)
    }

    /// Closes flows whose time is up. Call when [`Engine::poll_timeout`] is reached (calling
    /// earlier or more often is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.handle_commands(now);
        while let Some(&Reverse((at, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.flows.slot_of(id) else { continue };
            let Some(e) = self.flows.get_mut(slot) else { continue };
            if e.timer_at != at {
                continue; // superseded by an earlier entry for the same flow
            }
            let deadline = deadline(&self.config.timeouts, e);
            if deadline <= now {
                let reason = e.closing.unwrap_or(CloseReason::Idle);
                self.close(slot, now, reason);
            } else {
                e.timer_at = deadline;
                self.timers.push(Reverse((deadline, id)));
            }
        }
        if self.next_snapshot.is_none_or(|t| t <= now) {
            self.publish(now);
        }
    }

    /// The next time `handle_timeout` has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        match (timer, self.next_snapshot) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next held packet whose fate is now known.
    pub fn poll_release(&mut self) -> Option<Release> {
        self.releases.pop_front()
    }

    /// Applies commands sent through handles.
    pub fn handle_commands(&mut self, now: Instant) {
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Update { flow, verdict, direction } => self.update(now, flow, verdict, direction),
                Command::Resume { flow, verdict } => self.update(now, flow, verdict, None),
                Command::Release { packet, accept } => {
                    if self.held.remove(&packet).is_some() {
                        self.releases.push_back(Release { packet, accept });
                    }
                }
                Command::Publish => self.publish(now),
                Command::Reload(rules) => self.reload(now, rules),
                Command::Kernel(r) => {
                    self.handle_kernel_report(now, &r);
                }
            }
        }
    }

    /// Changes a live flow's verdict (what [`Handle::update`] does, for single-threaded users).
    /// Unknown or closed flows are ignored.
    pub fn update(&mut self, now: Instant, flow: FlowId, verdict: DataVerdict, direction: Option<Direction>) {
        if let Some(slot) = self.flows.slot_of(flow) {
            self.apply(slot, now, verdict, direction, UpdateSource::Handle);
        }
    }

    /// Takes conntrack's word on a flow: its counters replace ours where larger (the kernel saw
    /// the packets we let it handle alone), and an ended flow closes. Returns whether the flow
    /// was known here.
    pub fn handle_kernel_report(&mut self, now: Instant, r: &KernelReport) -> bool {
        let key = FlowKey::new(r.protocol, (r.opener.ip(), r.opener.port()), (r.responder.ip(), r.responder.port()));
        let Some(slot) = self.flows.lookup(&key) else {
            return false;
        };
        let Some(e) = self.flows.get_mut(slot) else {
            return false;
        };
        let opener_is_local =
            e.flow.local == r.opener || (e.flow.protocol == Protocol::Icmp && e.flow.local.ip() == r.opener.ip());
        let (out, inn) =
            if opener_is_local { (r.from_opener, r.from_responder) } else { (r.from_responder, r.from_opener) };
        let c = &mut e.counters;
        if let Some((p, b)) = out {
            c.packets_out = c.packets_out.max(p);
            c.bytes_out = c.bytes_out.max(b);
        }
        if let Some((p, b)) = inn {
            c.packets_in = c.packets_in.max(p);
            c.bytes_in = c.bytes_in.max(b);
        }
        if r.ended {
            let reason = e.closing.unwrap_or(CloseReason::Conntrack);
            self.close(slot, now, reason);
        }
        true
    }

    /// Takes in a connection that was open before the engine started: a flow marked `existing`,
    /// judged like a new one (or keeping the verdict a previous instance gave it), with its
    /// `flow.new` and `flow.verdict` events. Allowed and dropped flows are also passed to
    /// [`Engine::poll_enforce`], so the data plane marks or tears them down. Returns `None` for
    /// a flow already known, or when the table is full.
    pub fn adopt(&mut self, now: Instant, x: &Existing<'_>) -> Option<FlowId> {
        let key = FlowKey::new(x.protocol, (x.local.ip(), x.local.port()), (x.remote.ip(), x.remote.port()));
        if self.flows.lookup(&key).is_some() {
            return None;
        }
        let interface = x.interface.map(|i| self.intern(i));
        let flow = Flow {
            id: FlowId(0),
            protocol: x.protocol,
            direction: x.direction,
            local: x.local,
            remote: x.remote,
            interface,
            existing: true,
            forwarded: x.forwarded,
            started: now,
        };
        let slot = self.start_flow(now, key, flow, x.kept).ok()?;
        let e = self.flows.get(slot)?;
        let verdict = e.verdict();
        if matches!(verdict, FlowVerdict::Allow | FlowVerdict::Drop) {
            self.actions.push_back(Enforce { flow: e.flow.clone(), verdict, silent: e.silent });
        }
        Some(e.flow.id)
    }

    /// Replaces the rule set and judges every live flow again: a flow the new rules drop is
    /// dropped now (and torn down, see [`Engine::poll_enforce`]); a flow they still allow is left
    /// alone, as are flows already dropped. New flows follow the new rules.
    pub fn reload(&mut self, now: Instant, rules: Arc<CompiledRules>) {
        self.rules = rules;
        let slots: Vec<Slot> = self.flows.slots().collect();
        for slot in slots {
            let Some(e) = self.flows.get_mut(slot) else { continue };
            if e.verdict() == FlowVerdict::Drop {
                continue;
            }
            let class = self.rules.classify(&e.flow);
            if class.action == Action::Drop {
                if let Some(i) = class.rule {
                    e.rule = self.rules.name(i).cloned();
                    e.silent = self.rules.rules()[i].silent;
                } else {
                    e.rule = Some(self.default_rule.clone());
                }
                self.apply(slot, now, DataVerdict::Drop, None, UpdateSource::Rules);
            }
        }
        self.publish(now);
    }

    /// The next verdict the data plane must enforce itself, oldest first.
    pub fn poll_enforce(&mut self) -> Option<Enforce> {
        self.actions.pop_front()
    }

    /// Closes every flow (end of a capture, shutdown), emitting their close events. Flows that
    /// were lingering after FIN or RST close with that reason, the others with `end`.
    pub fn close_all(&mut self, now: Instant) {
        let slots: Vec<Slot> = self.flows.slots().collect();
        for s in slots {
            // A flow already closing (FIN both ways, RST) ended for that reason, not this one.
            let reason = self.flows.get(s).and_then(|e| e.closing).unwrap_or(CloseReason::End);
            self.close(s, now, reason);
        }
        self.publish(now);
    }

    fn publish(&mut self, now: Instant) {
        let flows: Arc<[FlowStatus]> = self.flows.iter().map(Entry::status).collect();
        let slot = &self.handle.snapshot;
        let mut s = slot.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        *s = Snapshot { taken: now, flows, generation: s.generation + 1 };
        drop(s);
        slot.published.notify_all();
        self.next_snapshot = Some(now + self.config.snapshot_interval);
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(a) = self.interfaces.get(name) {
            return a.clone();
        }
        let a: Arc<str> = name.into();
        self.interfaces.insert(a.clone());
        a
    }

    /// Which end is local and who opened the flow, from the hook, the config and the packet.
    fn orient(&self, meta: PacketMeta<'_>, p: &ParsedPacket<'_>) -> (bool, Direction) {
        let src_opened = match p.tcp {
            Some(f) if f.syn => !f.ack,
            // Picked up mid-stream: the side on the lower port is taken as the server.
            Some(_) => p.src_port >= p.dst_port,
            None => !(p.protocol == Protocol::Icmp && p.icmp_echo_reply),
        };
        let is_local = |a: &IpAddr| self.config.local_networks.iter().any(|n| n.contains(a));
        let src_local = match meta.origin {
            Origin::Output => true,
            Origin::Input => false,
            Origin::Forward => src_opened,
            Origin::Unknown => match (is_local(&p.src), is_local(&p.dst)) {
                (true, false) => true,
                (false, true) => false,
                _ => src_opened,
            },
        };
        let dir = if src_local == src_opened { Direction::Outbound } else { Direction::Inbound };
        (src_local, dir)
    }

    fn open(
        &mut self,
        now: Instant,
        meta: PacketMeta<'_>,
        p: &ParsedPacket<'_>,
        key: FlowKey,
    ) -> Result<Slot, PacketAction> {
        let (src_local, direction) = self.orient(meta, p);
        let (src, dst) = (SocketAddr::new(p.src, p.src_port), SocketAddr::new(p.dst, p.dst_port));
        let (local, remote) = if src_local { (src, dst) } else { (dst, src) };
        let interface = meta.interface.map(|i| self.intern(i));
        let forwarded = meta.origin == Origin::Forward;
        let flow = Flow {
            id: FlowId(0),
            protocol: p.protocol,
            direction,
            local,
            remote,
            interface,
            existing: false,
            forwarded,
            started: now,
        };
        self.start_flow(now, key, flow, None)
    }

    /// Judges a new flow (rules and the product filter, or a verdict kept from before) and puts
    /// it in the table, emitting its `flow.new` and `flow.verdict` events. `Err` carries the
    /// rules' verdict for a flow the full table could not take.
    fn start_flow(
        &mut self,
        now: Instant,
        key: FlowKey,
        mut flow: Flow,
        kept: Option<FlowVerdict>,
    ) -> Result<Slot, PacketAction> {
        let class = self.rules.classify(&flow);
        if self.flows.len() >= self.config.max_flows {
            self.stats.untracked += 1;
            return Err(match class.action {
                Action::Drop => PacketAction::Drop,
                _ => PacketAction::Accept,
            });
        }
        flow.id = FlowId(self.next_flow_id);
        self.next_flow_id += self.config.flow_id_step.max(1);
        self.stats.flows_opened += 1;

        let rule_verdict = match class.action {
            Action::Allow => NewFlowVerdict::Allow,
            Action::Drop => NewFlowVerdict::Drop,
            Action::Inspect { peek_outbound, peek_inbound } => NewFlowVerdict::Inspect { peek_outbound, peek_inbound },
        };
        let mut rule = class.rule.and_then(|i| self.rules.name(i)).unwrap_or(&self.default_rule).clone();
        let silent = class.rule.is_some_and(|i| self.rules.rules()[i].silent);
        let (rule_verdict, filter_verdict) = match kept {
            // A previous instance decided this flow for good: keep its word, ask no one.
            Some(v) => {
                rule = self.kept_rule.clone();
                let v = if v == FlowVerdict::Drop { NewFlowVerdict::Drop } else { NewFlowVerdict::Allow };
                (v, None)
            }
            None => (rule_verdict, self.filter.as_mut().map(|f| f.new_flow(&flow))),
        };
        let (verdict, filter_inspects) = match filter_verdict {
            None => (rule_verdict, false),
            Some(fv) => {
                if severity(fv) > severity(rule_verdict) && !matches!(fv, NewFlowVerdict::Inspect { .. }) {
                    rule = self.provider_rule.clone();
                }
                // A filter that inspects is shown exactly the window it asked for; a rule's own
                // inspect window has no one to show its bytes to (yet) and adds nothing.
                match (rule_verdict, fv) {
                    (NewFlowVerdict::Allow | NewFlowVerdict::Inspect { .. }, NewFlowVerdict::Inspect { .. }) => {
                        (fv, true)
                    }
                    _ => (combine(rule_verdict, fv), false),
                }
            }
        };
        let (out, inn, peek) = match verdict {
            NewFlowVerdict::Allow => (Mode::Allow, Mode::Allow, None),
            NewFlowVerdict::Drop => (Mode::Drop, Mode::Drop, None),
            NewFlowVerdict::Pause => (Mode::Pause, Mode::Pause, None),
            NewFlowVerdict::Inspect { peek_outbound, peek_inbound } => {
                let m = |n: u32| {
                    if n == 0 { Mode::Allow } else { Mode::Inspect { pass_end: 0, peek_end: u64::from(n) } }
                };
                (m(peek_outbound), m(peek_inbound), Some(Peek { outbound: peek_outbound, inbound: peek_inbound }))
            }
        };
        let timer_at = now + timeout(&self.config.timeouts, flow.protocol);
        let entry = Entry {
            flow: flow.clone(),
            counters: Counters::default(),
            last_seen: now,
            rule: Some(rule.clone()),
            out: Side::new(out),
            inn: Side::new(inn),
            filter_inspects,
            closing: None,
            timer_at,
            held: Vec::new(),
            silent,
            syn_seq: None,
        };
        let verdict = entry.verdict();
        let slot = self.flows.insert(key, flow.id, entry).map_err(|_| PacketAction::Accept)?;
        self.timers.push(Reverse((timer_at, flow.id)));
        self.events.push_back(Event { time: now, kind: EventKind::FlowNew { flow: flow.clone() } });
        self.events
            .push_back(Event { time: now, kind: EventKind::FlowVerdict { flow, verdict, rule: Some(rule), peek } });
        Ok(slot)
    }

    fn on_packet(
        &mut self,
        slot: Slot,
        now: Instant,
        meta: PacketMeta<'_>,
        p: &ParsedPacket<'_>,
        bytes: &[u8],
    ) -> Decision {
        let Some(e) = self.flows.get_mut(slot) else {
            return Decision { action: PacketAction::Accept, flow: None, settled: false, silent: false };
        };
        let id = e.flow.id;
        let dir = if p.src == e.flow.local.ip() && (p.src_port == e.flow.local.port() || p.protocol == Protocol::Icmp) {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        e.counters.add(dir == Direction::Outbound, p.ip_len, p.payload.len());
        e.last_seen = now;
        let mut fin_now = false;
        if let Some(f) = p.tcp {
            if f.rst {
                e.closing = Some(CloseReason::Rst);
            } else if f.fin && !e.side(dir).fin {
                e.side(dir).fin = true;
                fin_now = true;
                if e.out.fin && e.inn.fin {
                    e.closing = Some(CloseReason::Fin);
                }
            }
            if f.syn {
                e.side(dir).next_seq = Some(p.seq);
                if !f.ack && e.syn_seq.is_none() {
                    e.syn_seq = Some(p.seq);
                }
            }
        }
        if e.closing.is_some() {
            let at = now + self.config.timeouts.tcp_closing;
            if at < e.timer_at {
                e.timer_at = at;
                self.timers.push(Reverse((at, id)));
            }
        }

        if !p.payload.is_empty() {
            // Track the stream position always: a window opened later (an update with `Pass`)
            // must be placed at the right offset.
            if let Some((start, new_bytes)) = advance(e.side(dir), p)
                && matches!(e.side(dir).mode, Mode::Inspect { .. })
            {
                self.inspect(slot, now, dir, start, new_bytes);
            }
        }
        if fin_now {
            self.complete(slot, now, dir);
        }

        let mut action = match self.flows.get(slot).map(|e| match dir {
            Direction::Outbound => e.out.mode,
            Direction::Inbound => e.inn.mode,
        }) {
            Some(Mode::Drop) => PacketAction::Drop,
            Some(Mode::Pause) => self.hold(Some(slot)),
            _ => PacketAction::Accept,
        };
        if let (Some(pf), PacketAction::Accept) = (self.packet_filter.as_mut(), action) {
            let ctx = PacketContext { interface: meta.interface, direction: dir, flow: id, bytes };
            action = match pf.packet(&ctx) {
                PacketVerdict::Allow => PacketAction::Accept,
                PacketVerdict::Drop => PacketAction::Drop,
                PacketVerdict::Delay => self.hold(None),
            };
        }
        let (settled, silent) = match self.flows.get(slot) {
            Some(e) => (self.packet_filter.is_none() && e.settled(), e.silent),
            None => (false, false),
        };
        Decision { action, flow: Some(id), settled, silent }
    }

    /// Shows the part of new payload (starting at stream offset `start`) that lies in the
    /// direction's peek window.
    fn inspect(&mut self, slot: Slot, now: Instant, dir: Direction, start: u64, payload: &[u8]) {
        let Some(e) = self.flows.get_mut(slot) else { return };
        let Mode::Inspect { pass_end, peek_end } = e.side(dir).mode else {
            return;
        };
        let end = start + payload.len() as u64;
        let (from, to) = (start.max(pass_end), end.min(peek_end));
        if e.filter_inspects {
            if from < to {
                let shown = &payload[(from - start) as usize..(to - start) as usize];
                let verdict = match self.filter.as_mut() {
                    Some(f) => f.data(&e.flow, dir, from, shown),
                    None => DataVerdict::Allow,
                };
                self.apply_data(slot, now, dir, verdict, to);
            }
        } else if end >= peek_end {
            // A rule's inspect window is full and nothing objected: the direction is allowed.
            self.apply_side(slot, now, dir, Mode::Allow, UpdateSource::Peek);
        }
    }

    fn complete(&mut self, slot: Slot, now: Instant, dir: Direction) {
        let Some(e) = self.flows.get_mut(slot) else { return };
        let Mode::Inspect { .. } = e.side(dir).mode else { return };
        if e.filter_inspects {
            let verdict = match self.filter.as_mut() {
                Some(f) => f.data_complete(&e.flow, dir),
                None => DataVerdict::Allow,
            };
            let offset = e.side(dir).offset;
            self.apply_data(slot, now, dir, verdict, offset);
        } else {
            self.apply_side(slot, now, dir, Mode::Allow, UpdateSource::Peek);
        }
    }

    /// A provider's data verdict: `Drop` and `Pause` hold for the whole flow, the rest for
    /// the direction whose data was shown.
    fn apply_data(&mut self, slot: Slot, now: Instant, dir: Direction, verdict: DataVerdict, offset: u64) {
        match verdict {
            DataVerdict::Drop | DataVerdict::Pause => self.apply(slot, now, verdict, None, UpdateSource::Provider),
            _ => self.apply_side(slot, now, dir, Mode::from_data(verdict, offset), UpdateSource::Provider),
        }
    }

    fn apply(
        &mut self,
        slot: Slot,
        now: Instant,
        verdict: DataVerdict,
        direction: Option<Direction>,
        source: UpdateSource,
    ) {
        let Some(e) = self.flows.get_mut(slot) else { return };
        let dirs: &[Direction] = match direction {
            Some(Direction::Outbound) => &[Direction::Outbound],
            Some(Direction::Inbound) => &[Direction::Inbound],
            None => &[Direction::Outbound, Direction::Inbound],
        };
        let before = (e.out.mode, e.inn.mode, e.verdict());
        for &d in dirs {
            let side = e.side(d);
            side.mode = Mode::from_data(verdict, side.offset);
        }
        if let DataVerdict::Pass { .. } = verdict {
            e.filter_inspects = true;
        }
        // A verdict from a provider or a handle replaces the rule's: events must say so.
        if matches!(source, UpdateSource::Provider | UpdateSource::Handle)
            && e.rule.as_ref() != Some(&self.provider_rule)
        {
            e.rule = Some(self.provider_rule.clone());
        }
        self.after_change(slot, now, before, direction, source);
    }

    fn apply_side(&mut self, slot: Slot, now: Instant, dir: Direction, mode: Mode, source: UpdateSource) {
        let Some(e) = self.flows.get_mut(slot) else { return };
        let before = (e.out.mode, e.inn.mode, e.verdict());
        e.side(dir).mode = mode;
        let both_same = e.out.mode == e.inn.mode;
        self.after_change(slot, now, before, if both_same { None } else { Some(dir) }, source);
    }

    /// Emits the update event and releases held packets if a pause ended.
    fn after_change(
        &mut self,
        slot: Slot,
        now: Instant,
        before: (Mode, Mode, FlowVerdict),
        direction: Option<Direction>,
        source: UpdateSource,
    ) {
        let Some(e) = self.flows.get_mut(slot) else { return };
        let verdict = e.verdict();
        // Moving an inspect window is not news; a direction changing its verdict is.
        let changed = (e.out.mode.verdict(), e.inn.mode.verdict()) != (before.0.verdict(), before.1.verdict());
        if !changed {
            return;
        }
        // Verdicts given away from a packet (a handle call, a reload) may concern a flow the
        // kernel handles alone: the data plane must carry them out.
        if matches!(source, UpdateSource::Handle | UpdateSource::Rules)
            && verdict != before.2
            && matches!(verdict, FlowVerdict::Allow | FlowVerdict::Drop)
        {
            self.actions.push_back(Enforce { flow: e.flow.clone(), verdict, silent: e.silent });
        }
        if verdict != before.2 || direction.is_some() {
            self.events.push_back(Event {
                time: now,
                kind: EventKind::FlowUpdate { flow: e.flow.clone(), verdict, rule: e.rule.clone(), direction, source },
            });
        }
        if !matches!(verdict, FlowVerdict::Pause) && !e.held.is_empty() {
            let accept = !matches!(verdict, FlowVerdict::Drop);
            for packet in std::mem::take(&mut e.held) {
                if self.held.remove(&packet).is_some() {
                    self.releases.push_back(Release { packet, accept });
                }
            }
        }
    }

    fn hold(&mut self, slot: Option<Slot>) -> PacketAction {
        if self.held.len() >= self.config.max_held_packets {
            self.stats.held_overflow += 1;
            return PacketAction::Drop;
        }
        let id = PacketId(self.next_packet_id);
        self.next_packet_id += 1;
        let flow = slot.and_then(|s| self.flows.get_mut(s)).map(|e| {
            e.held.push(id);
            e.flow.id
        });
        self.held.insert(id, flow);
        PacketAction::Hold(id)
    }

    fn close(&mut self, slot: Slot, now: Instant, reason: CloseReason) {
        let Some(e) = self.flows.remove(slot) else { return };
        self.stats.flows_closed += 1;
        for packet in &e.held {
            if self.held.remove(packet).is_some() {
                self.releases.push_back(Release { packet: *packet, accept: false });
            }
        }
        let report = FlowReport {
            reason,
            verdict: e.verdict(),
            rule: e.rule.clone(),
            counters: e.counters,
            duration_ms: u64::try_from(e.last_seen.saturating_since(e.flow.started).as_millis()).unwrap_or(u64::MAX),
        };
        if let Some(f) = self.filter.as_mut() {
            f.closed(&e.flow, &report);
        }
        self.events.push_back(Event { time: now, kind: EventKind::FlowClosed { flow: e.flow, report } });
    }
}

/// Places a packet's payload in its direction's stream and moves the stream on. Returns the
/// stream offset of the first new byte and the new bytes, or `None` when everything in it was
/// seen before (a retransmission). Gaps (lost or reordered segments) move the offset past them.
fn advance<'p>(side: &mut Side, p: &ParsedPacket<'p>) -> Option<(u64, &'p [u8])> {
    let mut payload = p.payload;
    let start = match (p.tcp.is_some(), side.next_seq) {
        (true, Some(next)) => {
            let delta = p.seq.wrapping_sub(next) as i32;
            if delta < 0 {
                let seen = delta.unsigned_abs() as usize;
                if seen >= payload.len() {
                    return None;
                }
                payload = &payload[seen..];
                side.offset
            } else {
                side.offset + delta as u64
            }
        }
        _ => side.offset,
    };
    side.offset = start + payload.len() as u64;
    if p.tcp.is_some() {
        side.next_seq = Some(p.seq.wrapping_add(p.payload.len() as u32));
    }
    Some((start, payload))
}

fn timeout(t: &Timeouts, p: Protocol) -> Duration {
    match p {
        Protocol::Tcp => t.tcp,
        Protocol::Udp => t.udp,
        Protocol::Icmp => t.icmp,
        Protocol::Other(_) => t.other,
    }
}

fn deadline(t: &Timeouts, e: &Entry) -> Instant {
    match e.closing {
        Some(_) => e.last_seen + t.tcp_closing,
        None => e.last_seen + timeout(t, e.flow.protocol),
    }
}

fn severity(v: NewFlowVerdict) -> u8 {
    match v {
        NewFlowVerdict::Allow => 0,
        NewFlowVerdict::Inspect { .. } => 1,
        NewFlowVerdict::Pause => 2,
        NewFlowVerdict::Drop => 3,
    }
}

/// The most restrictive of two verdicts.
fn combine(a: NewFlowVerdict, b: NewFlowVerdict) -> NewFlowVerdict {
    if severity(a) >= severity(b) { a } else { b }
}

#[cfg(test)]
mod tests;
