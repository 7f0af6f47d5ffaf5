//! The engine: a state machine fed with packets, kernel reports and time that returns verdicts
//! and events.
//!
//! It never reads a clock, a socket or a file. A driver (the replay loop, the NFQUEUE daemon,
//! a test) drives it like this:
//!
//! 1. for each packet: `handle_packet(now, meta, bytes)` → a [`Decision`] to carry out at once;
//! 2. when [`Engine::poll_timeout`] says so: `handle_timeout(now)` (timers fire, and slices of
//!    long jobs run: listings, re-judging after a reload, reconciling with the kernel);
//! 3. after either: drain [`Engine::poll_event`] (events to log), [`Engine::poll_release`] (held
//!    packets to accept or drop now), [`Engine::poll_enforce`] (verdicts the data plane must
//!    carry out in the kernel) and [`Engine::poll_fault`] (provider faults to report).
//!
//! A driver that lets the kernel handle settled flows ([`EngineConfig::kernel_offload`]) also
//! feeds what the kernel's connection tracking says ([`Engine::handle_kernel_report`],
//! [`Engine::handle_kernel_sync`], or the same through a [`Handle`]): such flows' packets no
//! longer reach the engine, so their counters, their end and their idleness come from there. A
//! driver whose kernel decides static rules alone ([`crate::rules::kernel`]) feeds the reports
//! on those flows the same way, and the kernel's log of the packets they dropped
//! ([`Engine::handle_kernel_drop`]).
//!
//! Methods come in these kinds: getters (`stats`, `flows`, `rules`, `footprint`), `handle_*`
//! (input), commands (`set_rules`, `update`, `adopt`, `reload`, `close_all`), and `poll_*`
//! (output). The built-in rule set and a product's [`FlowFilter`] judge side by side and the most
//! restrictive verdict wins (drop, then pause, then inspect, then allow).
//!
//! ## Rooms
//!
//! - `entry`: one flow's compact state; `table`: the slab and its indexes, interface names;
//!   `timers`: one timer per flow.
//! - `judge`: a new flow's first verdict (rules and the product filter), and re-judging on reload.
//! - `stream`: stream positions and what inspection shows a filter.
//! - `verdicts`: changing a flow's verdict, holding and releasing packets.
//! - `providers`: calling the product's filters, their panics and overruns contained.
//! - `kernel`: flows the kernel handles alone: kernel reports, syncs, adoption, and the verdicts
//!   the data plane must enforce.
//! - `sweep`: work over every flow, done a slice at a time (listings, re-judging, reconciling).
//! - `owners`: asking the driver who owns each new flow; what waits for the answer.

mod entry;
mod judge;
mod kernel;
mod owners;
mod providers;
mod stream;
mod sweep;
mod table;
mod timers;
mod verdicts;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::dns_names::DnsNames;
use crate::event::{CloseReason, Event, EventKind, FlowReport, RuleName};
use crate::flow::{Direction, FlowId, FlowKey, Protocol};
use crate::handle::{COMMAND_CAPACITY, Command, FlowStatus, Handle, Waker};
use crate::packet::{self, ParseError, ParsedPacket};
use crate::provider::FlowFilter;
use crate::rules::matcher::CompiledRules;
use crate::time::Instant;
use crate::verdict::{Decision, FlowVerdict, PacketAction, PacketId};

use entry::{Entry, Mode, bits};
use table::{FlowTable, Interfaces, Slot};
use timers::Timers;

pub use kernel::{Enforce, KernelAction};
pub(crate) use providers::panic_message;
pub use providers::{FaultKind, ProviderFault};

/// Work done per [`Engine::handle_commands`] call, in commands, a batch of kernel reports
/// counting one per report: a call stays short and packets do not wait behind a burst.
pub const COMMAND_BUDGET: usize = 512;
/// Timers fired per [`Engine::handle_timeout`] call.
pub const TIMER_BUDGET: usize = 1024;
/// Kernel reports a driver should put in one command.
pub const KERNEL_BATCH: usize = 128;
/// Addresses an engine's own table of DNS-learnt names holds (see [`Engine::set_dns_names`]).
pub const DNS_NAMES: usize = 65_536;

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

impl Timeouts {
    pub(crate) fn idle(&self, p: Protocol) -> Duration {
        match p {
            Protocol::Tcp => self.tcp,
            Protocol::Udp => self.udp,
            Protocol::Icmp => self.icmp,
            Protocol::Other(_) => self.other,
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
    /// Most live flows (at most 16,777,215); past it new flows are judged by the rules alone,
    /// untracked, and counted.
    pub max_flows: usize,
    /// Most packets held at once (paused flows, delayed packets); past it they are dropped.
    pub max_held_packets: usize,
    /// First flow id and the step between ids, so several engines (one per queue) can hand out
    /// ids that never collide: engine `k` of `n` uses first `k + 1`, step `n`.
    pub first_flow_id: u64,
    pub flow_id_step: u64,
    /// The driver lets the kernel handle settled flows (their packets stop reaching the engine)
    /// and feeds kernel reports and syncs: such flows then live as long as the kernel says, not
    /// as long as the engine sees packets. Off for replay.
    pub kernel_offload: bool,
    /// How often the driver syncs with the kernel's table; a kernel-handled flow is found idle
    /// only by a sync that began after its idle deadline.
    pub kernel_sync_interval: Duration,
    /// The fail mode, for what the engine cannot judge: a flow whose provider faulted, a new flow
    /// past `max_flows`. Open: it passes; closed: it is dropped.
    pub fail_open: bool,
    /// Drop packets that cannot be parsed (truncated, malformed, IP fragments the kernel did not
    /// reassemble), rather than let them pass unjudged.
    pub drop_unparsable: bool,
    /// Longest a provider call may take (timed with the driver's stopwatch, see
    /// [`Engine::set_stopwatch`]); a slower one counts as a fault.
    pub provider_budget: Duration,
    /// The driver can tell who owns a flow ([`Engine::poll_owner_request`]): every new flow is
    /// asked about, its first events wait for the answer, and a flow whose verdict an owner rule
    /// could decide is paused for it, at most this long (then its owner counts as unknown).
    /// `None`: owners are not asked for, and rules that name one never match.
    pub owner_wait: Option<Duration>,
    /// Longest packets may be held without a verdict (bytes under inspection, a pause): then
    /// the flow gets `hold_timeout_drop`'s verdict (allowing, the rules' wait for a host name
    /// ends first with what is known).
    pub hold_timeout: Duration,
    /// Held bytes still undecided at the hold timeout are dropped (else allowed).
    pub hold_timeout_drop: bool,
    /// Overlapping TCP segments that carry different bytes (an evasion attempt) drop the flow;
    /// off, only the conflicting packet is dropped (the receiver then gets the bytes judged).
    pub overlap_drop: bool,
    /// How many of the opener's first bytes the rules read for a host name (TLS ClientHello,
    /// HTTP request head) before they judge without one.
    pub sniff_window: u32,
    /// Most bytes of one direction kept for inspection, from the first undecided byte on; a
    /// segment starting past it is dropped until the flow is decided (its sender repeats it).
    pub max_inspect_span: usize,
    /// Most packets one flow may hold; past it its new packets are dropped (TCP repeats them).
    pub max_held_per_flow: usize,
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
            kernel_offload: false,
            kernel_sync_interval: Duration::from_secs(10),
            fail_open: true,
            drop_unparsable: false,
            provider_budget: Duration::from_millis(100),
            owner_wait: None,
            hold_timeout: Duration::from_secs(10),
            hold_timeout_drop: true,
            overlap_drop: true,
            // A request head may be 32 KiB (nginx's limit), a ClientHello 16 KiB.
            sniff_window: crate::sniff::http::MAX_HEAD.max(crate::sniff::tls::MAX_CLIENT_HELLO) as u32,
            max_inspect_span: 64 * 1024,
            max_held_per_flow: 512,
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
    /// Packets of new flows refused because the flow table was full: they get the fail mode's
    /// verdict, untracked (every packet of such a flow counts: each one is judged afresh).
    pub untracked: u64,
    /// Packets that could not be parsed (truncated, malformed, fragments, not IP), all kinds.
    pub unparsable: u64,
    /// Provider calls that panicked or ran over their budget.
    pub provider_faults: u64,
    /// Packets dropped because too many were held.
    pub held_overflow: u64,
    /// Kernel-handled flows closed because two syncs in a row did not find their conntrack
    /// entry (its end was never reported: a lost event).
    pub kernel_lost: u64,
    /// Flows a static rule decided in the kernel, first heard of from conntrack (or from the
    /// log of a kernel drop): never queued to user space.
    pub kernel_decided: u64,
    /// New flows paused until their owner was known (an owner rule could decide them).
    pub owner_held: u64,
    /// Owners asked for and not answered within `owner_wait`.
    pub owner_timeouts: u64,
    /// Flows whose owner was found.
    pub owners_known: u64,
    /// Flows whose own bytes named their host (SNI, QUIC SNI, HTTP Host).
    pub hosts_found: u64,
    /// Addresses learnt from DNS answers.
    pub dns_learnt: u64,
    /// Overlapping segments whose bytes differed from the first copy (evasion attempts).
    pub overlap_conflicts: u64,
    /// Segments of an inspected direction that started past the span kept, dropped.
    pub out_of_window: u64,
    /// Flows whose held packets waited past the hold timeout.
    pub hold_timeouts: u64,
}

/// How much the engine holds now; every figure is bounded by the live flows.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Footprint {
    pub flows: usize,
    pub timers: usize,
    pub interfaces: usize,
    pub held_packets: usize,
    pub pending_enforce: usize,
    pub pending_events: usize,
    pub pending_faults: usize,
    pub sweeps: usize,
    /// Kernel-handled flows that ended (a new connection reused their 5-tuple) and wait for
    /// the kernel's last counts.
    pub retired: usize,
    /// Flows waiting for their owner, and questions not yet taken by the driver.
    pub owner_waiting: usize,
    pub owner_requests: usize,
    /// Held packets whose released form (a cut payload) the driver has not taken yet.
    pub rewrites: usize,
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
    /// The id of its conntrack entry, where one exists.
    pub conntrack_id: Option<u32>,
}

/// A held packet's fate, decided later. An accepted packet may have to go out changed (a drop
/// inside it lets only its judged first bytes through): ask [`Engine::take_rewrite`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Release {
    pub packet: PacketId,
    pub accept: bool,
}

/// Rule names the engine gives for verdicts no rule gave.
struct Names {
    default: RuleName,
    provider: RuleName,
    kept: RuleName,
}

/// The flow filter engine. See the module documentation for how to drive it.
pub struct Engine {
    config: EngineConfig,
    rules: Arc<CompiledRules>,
    filter: Option<Box<dyn FlowFilter>>,
    table: FlowTable,
    interfaces: Interfaces,
    timers: Timers,
    events: VecDeque<Event>,
    releases: VecDeque<Release>,
    /// Held packet → its flow.
    held: HashMap<PacketId, Option<FlowId>>,
    next_flow_id: u64,
    next_packet_id: u64,
    stats: Stats,
    commands: Receiver<Command>,
    /// A command taken from the channel but not applied yet (the budget ran out).
    next_command: Option<Command>,
    handle: Handle,
    names: Names,
    kernel: kernel::Kernel,
    sweeps: sweep::Sweeps,
    stopwatch: Option<providers::Stopwatch>,
    faults: VecDeque<ProviderFault>,
    owners: owners::Owners,
    /// Names learnt from DNS answers, shared with the other engines of a driver; made at the
    /// first answer when no driver gave one.
    dns_names: Option<Arc<DnsNames>>,
    /// When held packets of a flow must have a verdict, in the order set (one timeout for all).
    hold_deadlines: VecDeque<(Instant, FlowId)>,
    /// Accepted held packets that go out with these bytes instead.
    rewrites: HashMap<PacketId, Vec<u8>>,
    /// A held-packet review is running (a verdict change inside it does not start another).
    reviewing: bool,
    /// The latest time the driver gave.
    last_now: Instant,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("flows", &self.table.len()).field("stats", &self.stats).finish()
    }
}

fn ignored() -> Decision {
    Decision { action: PacketAction::Accept, flow: None, settled: false, silent: false }
}

impl Engine {
    pub fn new(config: EngineConfig, rules: Arc<CompiledRules>) -> Self {
        let (tx, rx) = mpsc::sync_channel(COMMAND_CAPACITY);
        let handle = Handle { tx, waker: Arc::new(Mutex::new(None)), refused: Arc::new(AtomicU64::new(0)) };
        Engine {
            table: FlowTable::new(config.max_flows),
            next_flow_id: config.first_flow_id,
            config,
            rules,
            filter: None,
            interfaces: Interfaces::default(),
            timers: Timers::default(),
            events: VecDeque::new(),
            releases: VecDeque::new(),
            held: HashMap::new(),
            next_packet_id: 1,
            stats: Stats::default(),
            commands: rx,
            next_command: None,
            handle,
            names: Names { default: "default".into(), provider: "provider".into(), kept: "kept".into() },
            kernel: kernel::Kernel::default(),
            sweeps: sweep::Sweeps::default(),
            stopwatch: None,
            faults: VecDeque::new(),
            owners: owners::Owners::default(),
            dns_names: None,
            hold_deadlines: VecDeque::new(),
            rewrites: HashMap::new(),
            reviewing: false,
            last_now: Instant::ZERO,
        }
    }

    /// Shares a table of names learnt from DNS answers with other engines (one per queue): an
    /// answer one engine reads names the flows all of them judge.
    pub fn set_dns_names(&mut self, names: Arc<DnsNames>) {
        self.dns_names = Some(names);
    }

    /// The bytes a released (accepted) held packet must go out with instead of its own, if it
    /// was cut (see [`Release`]). Call once per release; `None` for the rest.
    pub fn take_rewrite(&mut self, packet: PacketId) -> Option<Vec<u8>> {
        self.rewrites.remove(&packet)
    }

    /// Installs a product's flow filter beside the rules.
    pub fn set_flow_filter(&mut self, filter: Box<dyn FlowFilter>) {
        self.filter = Some(filter);
    }

    /// A handle for other threads. All handles of an engine share one channel.
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

    /// What the engine holds now.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            flows: self.table.len(),
            timers: self.timers.len(),
            interfaces: self.interfaces.len(),
            held_packets: self.held.len(),
            pending_enforce: self.kernel.pending(),
            retired: self.kernel.retired(),
            rewrites: self.rewrites.len(),
            pending_events: self.events.len(),
            pending_faults: self.faults.len(),
            sweeps: self.sweeps.len(),
            owner_waiting: self.owners.waiting(),
            owner_requests: self.owners.requests(),
        }
    }

    pub fn rules(&self) -> &Arc<CompiledRules> {
        &self.rules
    }

    /// Live flows, now. (From another thread, use [`Handle::list`].)
    pub fn flows(&self) -> Vec<FlowStatus> {
        self.table.iter().map(|(_, e)| e.status(&self.interfaces)).collect()
    }

    /// Replaces the rule set. Flows that start from now on are judged by the new rules.
    pub fn set_rules(&mut self, rules: Arc<CompiledRules>) {
        self.rules = rules;
    }

    /// Judges one IP packet (starting at its IP header) seen at `now`. A waiting handle command
    /// is applied first (one, so a packet never waits behind many).
    pub fn handle_packet(&mut self, now: Instant, meta: PacketMeta<'_>, bytes: &[u8]) -> Decision {
        self.last_now = self.last_now.max(now);
        self.apply_commands(now, 1);
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
                self.stats.unparsable += 1;
                // Nothing to judge it by: a packet no rule can see must not slip past the rules
                // that drop, so it gets the configured verdict.
                let action = if self.config.drop_unparsable { PacketAction::Drop } else { PacketAction::Accept };
                return Decision { action, flow: None, settled: false, silent: false };
            }
        };
        let slot = match self.flow_of(now, meta, &p) {
            Ok(s) => s,
            Err(action) => return Decision { action, flow: None, settled: false, silent: false },
        };
        self.on_packet(slot, now, &p, bytes)
    }

    /// The flow a packet belongs to: found, or opened and judged (a pure SYN on a known 4-tuple
    /// opens a new one). `Err` carries the rules' verdict for a flow the full table could not take.
    fn flow_of(&mut self, now: Instant, meta: PacketMeta<'_>, p: &ParsedPacket<'_>) -> Result<Slot, PacketAction> {
        let key = FlowKey::new(p.protocol, (p.src, p.src_port), (p.dst, p.dst_port));
        let mut slot = self.table.lookup(&key);
        if let Some(s) = slot {
            // A connection never sends a pure SYN once open, so one that is not a retransmission
            // of this flow's own opening SYN is a new connection on a reused 4-tuple. The old one
            // may have ended unseen (a kernel-handled flow's FIN or RST never reaches us): the new
            // one must be judged, not inherit the old verdict.
            let reopen = p.tcp.is_some_and(|f| f.syn && !f.ack)
                && self
                    .table
                    .get(s)
                    .is_some_and(|e| e.closing.is_some() || !e.has(bits::SYN_SEQ) || e.syn_seq != p.seq);
            if reopen {
                self.reopen(s, now);
                slot = None;
            }
        }
        match slot {
            Some(s) => Ok(s),
            None => self.open(now, meta, p),
        }
    }

    /// A packet a static rule dropped in the kernel, from the kernel's log of it: counted to its
    /// flow, which is opened and judged like any new flow when this is its first packet (so its
    /// `flow.new` and `flow.verdict` events name the rule). Nothing is answered: the packet is
    /// gone. A packet that cannot be read, or whose flow the rules here do not drop (a reload
    /// raced the log), is only counted as seen.
    pub fn handle_kernel_drop(&mut self, now: Instant, meta: PacketMeta<'_>, bytes: &[u8]) {
        self.apply_commands(now, 1);
        self.kernel_drop(now, meta, bytes);
    }

    fn kernel_drop(&mut self, now: Instant, meta: PacketMeta<'_>, bytes: &[u8]) {
        let Ok(p) = packet::parse(bytes) else { return };
        let known = self.table.len();
        let Ok(slot) = self.flow_of(now, meta, &p) else { return };
        if self.table.len() > known {
            self.stats.kernel_decided += 1;
        }
        // Only a flow dropped both ways is counted: it holds nothing, so the packet cannot end
        // up held here (it is gone already).
        let dropped = |e: &Entry| e.mode(Direction::Outbound) == Mode::Drop && e.mode(Direction::Inbound) == Mode::Drop;
        if self.table.get(slot).is_some_and(dropped) {
            self.stats.packets += 1;
            let _ = self.on_packet(slot, now, &p, bytes);
        }
    }

    /// Fires due timers (idle flows close), at most [`TIMER_BUDGET`] of them, and runs a slice of
    /// pending sweeps. Call when [`Engine::poll_timeout`] is reached (calling earlier or more
    /// often is harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        self.handle_commands(now);
        // Many flows can fall due together (after an outage, say): a call takes a slice of them,
        // and `poll_timeout` says the rest are due at once.
        for _ in 0..TIMER_BUDGET {
            let Some(slot) = self.timers.pop_due(now) else { break };
            self.on_timer(slot, now);
        }
        self.end_retired(now);
        self.expire_owner_waits(now);
        self.expire_holds(now);
        self.run_sweeps(now);
    }

    /// The next time `handle_timeout` has work to do (in the past when a sweep can go on now).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let commands = self.next_command.as_ref().map(|_| Instant::ZERO);
        let holds = self.hold_deadlines.front().map(|&(t, _)| t);
        [
            self.timers.next(),
            self.sweeps.due(),
            self.kernel.next_retired(),
            commands,
            self.owners.next_deadline(),
            holds,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next held packet whose fate is now known.
    pub fn poll_release(&mut self) -> Option<Release> {
        self.releases.pop_front()
    }

    /// Applies commands sent through handles, at most [`COMMAND_BUDGET`] per call; if more wait,
    /// [`Engine::poll_timeout`] says so (due at once).
    pub fn handle_commands(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        self.apply_commands(now, COMMAND_BUDGET);
    }

    fn apply_commands(&mut self, now: Instant, budget: usize) {
        let mut spent = 0;
        while spent < budget {
            let Some(c) = self.next_command.take().or_else(|| self.commands.try_recv().ok()) else { return };
            spent += match &c {
                Command::Kernel(reports) => reports.len().max(1),
                Command::KernelDrops(drops) => drops.len().max(1),
                _ => 1,
            };
            match c {
                Command::Update { flow, verdict, direction } => self.update(now, flow, verdict, direction),
                Command::Reload(rules) => self.reload(now, rules),
                Command::Kernel(reports) => {
                    for r in &reports {
                        self.handle_kernel_report(now, r);
                    }
                }
                Command::KernelDrops(drops) => {
                    for d in &drops {
                        let meta = PacketMeta { interface: d.interface.as_deref(), origin: d.origin };
                        self.kernel_drop(now, meta, &d.packet);
                    }
                }
                Command::Sync(s) => self.handle_kernel_sync(now, s),
                Command::Owner { flow, owner } => self.set_owner(flow, owner),
                Command::Select { selector, verdict, sink, recycle } => {
                    self.sweeps.select(selector, verdict, sink, recycle)
                }
            }
        }
        // Out of budget: keep the next one, if any, and be called again at once.
        self.next_command = self.commands.try_recv().ok();
    }

    /// Closes every flow (end of a capture, shutdown), emitting their close events. Flows that
    /// were lingering after FIN or RST close with that reason, the others with `end`.
    pub fn close_all(&mut self, now: Instant) {
        let slots: Vec<Slot> = self.table.iter().map(|(s, _)| s).collect();
        for s in slots {
            // A flow already closing (FIN both ways, RST) ended for that reason, not this one.
            let reason = self.table.get(s).and_then(|e| e.closing).unwrap_or(CloseReason::End);
            self.close(s, now, reason);
        }
        // Flows waiting for the kernel's last counts end now with what they have.
        self.end_all_retired(now);
    }

    fn on_packet(&mut self, slot: Slot, now: Instant, p: &ParsedPacket<'_>, raw: &[u8]) -> Decision {
        let closing_linger = self.config.timeouts.tcp_closing;
        let Some(e) = self.table.get_mut(slot) else { return ignored() };
        let id = e.id;
        let local = e.local();
        let dir = if p.src == local.ip() && (p.src_port == local.port() || p.protocol == Protocol::Icmp) {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        e.counters.add(dir == Direction::Outbound, p.ip_len, p.payload.len());
        e.last_seen = now;
        if e.has(bits::KERNEL) {
            // A packet of a flow the kernel was handling reached us: its conntrack entry no
            // longer carries our verdict (a new entry for the same flow, or a recall). Which
            // entry that is will be learnt from the kernel again.
            e.set(bits::KERNEL, false);
            e.set_ct_id(None);
        }
        let mut fin_now = false;
        if let Some(f) = p.tcp {
            if f.rst {
                e.closing = Some(CloseReason::Rst);
            } else if f.fin && !e.fin(dir) {
                e.set_fin(dir);
                fin_now = true;
                if e.fin(Direction::Outbound) && e.fin(Direction::Inbound) {
                    e.closing = Some(CloseReason::Fin);
                }
            }
            if f.syn {
                // `parse` counts the SYN's own sequence number: this is the first byte's.
                e.set_next_seq(dir, p.seq);
                if !f.ack && !e.has(bits::SYN_SEQ) {
                    e.set(bits::SYN_SEQ, true);
                    e.syn_seq = p.seq;
                }
            }
        }
        if e.closing.is_some() {
            let at = now + closing_linger;
            if at < e.timer_at {
                self.timers.reset(slot, e.timer_at, at);
                e.timer_at = at;
            }
        }

        if let Some(f) = p.tcp
            && f.ack
            && e.inspection().is_some_and(stream::Inspection::verifying)
        {
            self.acknowledged(slot, dir, p.ack);
        }
        let Some(e) = self.table.get_mut(slot) else { return ignored() };
        let mut range = (0, 0);
        let mut action = None;
        if !p.payload.is_empty() {
            // Track the stream position always: a window opened later (an update with `Pass`)
            // must be placed at the right offset.
            match stream::place(e, dir, p) {
                Some(r) => {
                    range = r;
                    if e.has(bits::WATCH) {
                        self.read_dns(slot, now, dir, r.0, p.payload);
                    }
                    let e = self.table.get(slot);
                    if e.is_some_and(|e| stream::inspected(e, dir)) {
                        action = Some(if p.tcp.is_some() {
                            self.inspect_packet(slot, now, dir, r, p, raw)
                        } else {
                            self.inspect_datagram(slot, now, dir, r, p, raw)
                        });
                    }
                }
                // Bytes far from anything this connection sent: not for an inspected stream.
                None if e.has(bits::FILTER_INSPECTS) || e.inspection().is_some() => action = Some(PacketAction::Drop),
                None => {}
            }
        }
        if fin_now {
            self.complete(slot, now, dir);
        }

        let action = match (action, self.table.get(slot).map(|e| e.mode(dir))) {
            (Some(a), _) => a,
            (None, Some(Mode::Drop)) => PacketAction::Drop,
            (None, Some(Mode::Pause)) => self.hold_packet(slot, now, dir, range, raw, false),
            _ => PacketAction::Accept,
        };
        let offload = self.config.kernel_offload;
        let generation = self.kernel.generation();
        let Some(e) = self.table.get_mut(slot) else { return ignored() };
        if action == PacketAction::Accept {
            e.set(bits::ACCEPTED, true);
        }
        let settled = e.settled();
        // A settled flow whose packets have passed has a conntrack entry that now carries its
        // verdict: the kernel handles the rest of it, and reports on it instead of its packets.
        // (A flow dropped at its first packet never gets an entry: its retries keep coming here.)
        if offload && settled && e.has(bits::ACCEPTED) {
            e.set(bits::KERNEL, true);
            e.seen_gen = generation;
        }
        // A connection the data plane is about to tear down at both ends (its verdict changed
        // away from this packet) must not be answered here: a reset to this packet's sender
        // would close its socket before the teardown can reset the other end through it.
        let quiet = action == PacketAction::Drop && e.has(bits::ENFORCE_QUEUED);
        Decision { action, flow: Some(id), settled, silent: e.has(bits::SILENT) || quiet }
    }

    fn on_timer(&mut self, slot: Slot, now: Instant) {
        let t = self.config.timeouts;
        let (synced_at, interval) = (self.kernel.synced_at(), self.config.kernel_sync_interval);
        let Some(e) = self.table.get_mut(slot) else { return };
        let deadline = match e.closing {
            Some(_) => e.last_seen + t.tcp_closing,
            None => e.last_seen + t.idle(e.protocol),
        };
        let next = if deadline > now {
            Some(deadline)
        } else if e.has(bits::KERNEL) && e.closing.is_none() && synced_at.is_none_or(|s| s < deadline) {
            // The kernel passes this flow's packets without us: it is idle only if a pass over
            // the kernel's table that began after the deadline saw its counters unchanged.
            Some(now + interval)
        } else {
            None
        };
        match next {
            Some(at) => {
                e.timer_at = at;
                self.timers.set(slot, at);
            }
            None => {
                let reason = e.closing.unwrap_or(CloseReason::Idle);
                self.close(slot, now, reason);
            }
        }
    }

    /// Removes a flow, releases what it held and emits its close event.
    fn close(&mut self, slot: Slot, now: Instant, reason: CloseReason) {
        if let Some(e) = self.remove(slot) {
            self.finish(e, now, reason);
        }
    }

    /// Takes a flow out of the table and its timer out of the timers (its first events out of
    /// waiting for its owner, first).
    fn remove(&mut self, slot: Slot) -> Option<Entry> {
        if let Some(id) = self.table.get(slot).map(|e| e.id) {
            self.flush_owner_wait(id);
        }
        let e = self.table.remove(slot)?;
        self.timers.cancel(slot, e.timer_at);
        Some(e)
    }

    /// A flow is over: releases what it held and emits its close event.
    fn finish(&mut self, e: Entry, now: Instant, reason: CloseReason) {
        self.stats.flows_closed += 1;
        for h in e.held() {
            if self.held.remove(&h.id).is_some() {
                self.releases.push_back(Release { packet: h.id, accept: false });
            }
        }
        let flow = e.flow(&self.interfaces);
        self.interfaces.release(e.interface);
        let report = FlowReport {
            reason,
            verdict: e.verdict(),
            rule: e.rule.clone(),
            counters: e.counters,
            duration_ms: u64::try_from(e.last_seen.saturating_since(e.started).as_millis()).unwrap_or(u64::MAX),
        };
        // An allowed flow the kernel still passes must come back to us if it wakes up again,
        // or it would run on unlisted: its conntrack entry forgets our verdict.
        if reason == CloseReason::Idle && e.has(bits::KERNEL) && report.verdict == FlowVerdict::Allow {
            self.kernel.push_closed(Enforce { flow: flow.clone(), action: KernelAction::Forget });
        }
        let _ = self.call_filter("closed", flow.id, |f| f.closed(&flow, &report));
        self.events.push_back(Event { time: now, kind: EventKind::FlowClosed { flow, report } });
    }
}

#[cfg(test)]
mod tests;
