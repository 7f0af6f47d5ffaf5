//! The handle: how other threads change verdicts, feed kernel reports and list flows while the
//! engine runs.
//!
//! A [`Handle`] is cheap to clone and `Send + Sync`. Commands go over one bounded channel per
//! engine ([`COMMAND_CAPACITY`]) and take effect the next time the engine is driven
//! (`handle_packet`, `handle_timeout` or `handle_commands`); a driver that sleeps between packets
//! registers a waker with [`crate::Engine::set_waker`] so a command wakes it. Sending never
//! blocks: when the channel is full the call returns [`HandleError::Busy`] (and the refusal is
//! counted, see [`Handle::refused`]), so neither the caller nor the engine's thread can be stalled
//! by the other. Callers that must not lose a command retry.
//!
//! Listing is a command too: [`Handle::list`] returns a [`Listing`] that yields the engine's live
//! flows in chunks, which the engine produces a slice at a time between packets, so listing a
//! million flows never stalls the packet path. [`Handle::apply`] changes the verdict of every
//! flow a [`Selector`] matches the same way. Both must not be waited on from the engine's own
//! thread (a provider callback): the engine would wait for itself.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant as StdInstant};

use ipnet::IpNet;
use serde::Serialize;

use crate::event::{CloseReason, RuleName};
use crate::flow::{Counters, Direction, Flow, FlowId, Protocol};
use crate::time::Instant;
use crate::verdict::{DataVerdict, FlowVerdict};

/// Commands an engine's channel holds before senders are told [`HandleError::Busy`].
pub const COMMAND_CAPACITY: usize = 4096;
/// Chunks of a listing in flight between the engine and the reader.
const LISTING_DEPTH: usize = 4;

/// A live flow as listings show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowStatus {
    pub flow: Flow,
    pub verdict: FlowVerdict,
    pub rule: Option<RuleName>,
    #[serde(flatten)]
    pub counters: Counters,
    #[serde(skip)]
    pub last_seen: Instant,
}

/// Which flows a listing or a verdict change is about. Every field that is set must match; an
/// empty selector matches every flow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    /// These flows (empty: any).
    pub ids: Vec<FlowId>,
    /// Remote address in this network.
    pub remote: Option<IpNet>,
    /// This remote port.
    pub remote_port: Option<u16>,
    pub protocol: Option<Protocol>,
    /// The owning process, user, unit, cgroup (a flow whose owner is unknown matches none).
    pub owner: Box<crate::owner::OwnerMatch>,
}

impl Selector {
    /// Every flow.
    pub fn all() -> Selector {
        Selector::default()
    }

    /// Whether only ids are given (the engine then looks them up instead of scanning).
    pub(crate) fn ids_only(&self) -> bool {
        !self.ids.is_empty()
            && self.remote.is_none()
            && self.remote_port.is_none()
            && self.protocol.is_none()
            && self.owner.is_empty()
    }

    pub(crate) fn matches(
        &self,
        id: FlowId,
        protocol: Protocol,
        remote: SocketAddr,
        owner: Option<&crate::owner::Owner>,
    ) -> bool {
        (self.ids.is_empty() || self.ids.contains(&id))
            && self.owner.matches(owner)
            && self.remote.is_none_or(|n| n.contains(&remote.ip()))
            && self.remote_port.is_none_or(|p| p == remote.port())
            && self.protocol.is_none_or(|p| p == protocol)
    }
}

pub(crate) enum Chunk {
    Flows(Vec<FlowStatus>),
    Done,
}

pub(crate) enum Command {
    Update {
        flow: FlowId,
        verdict: DataVerdict,
        direction: Option<Direction>,
    },
    Kernel(Vec<KernelReport>),
    KernelDrops(Vec<KernelDrop>),
    Sync(KernelSync),
    Reload(Arc<crate::rules::matcher::CompiledRules>),
    Owner {
        flow: FlowId,
        owner: Option<Arc<crate::owner::Owner>>,
    },
    /// List (`verdict: None`) or change the verdict of the selected flows, streaming their
    /// statuses (after the change) to `sink`; emptied chunks come back through `recycle`.
    Select {
        selector: Selector,
        verdict: Option<DataVerdict>,
        sink: SyncSender<Chunk>,
        recycle: Receiver<Vec<FlowStatus>>,
    },
}

/// What the kernel's connection tracking says about a flow (see [`crate::Engine::handle_kernel_report`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelReport {
    pub protocol: Protocol,
    /// The end that opened the flow (conntrack's original direction source).
    pub opener: SocketAddr,
    pub responder: SocketAddr,
    /// (packets, bytes) sent by the opener and by the responder, where accounting is on.
    pub from_opener: Option<(u64, u64)>,
    pub from_responder: Option<(u64, u64)>,
    /// The conntrack entry's id, which tells an entry from a later one on the same 5-tuple.
    pub id: Option<u32>,
    pub state: KernelState,
    /// A static rule decided the flow in the kernel (its entry's mark says which): the engine
    /// may never have seen a packet of it (see [`crate::rules::kernel`]).
    pub decided: Option<KernelDecided>,
}

/// A packet a static rule dropped in the kernel, as the kernel logged it (see
/// [`crate::Engine::handle_kernel_drop`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDrop {
    /// The hook it was dropped at.
    pub origin: crate::engine::Origin,
    /// The interface it came in on (input, forward) or was to leave by (output).
    pub interface: Option<std::sync::Arc<str>>,
    /// The IP packet.
    pub packet: Vec<u8>,
}

/// Where a flow a static rule decided in the kernel was decided: what conntrack cannot say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDecided {
    /// The hook of the rule: the flow's direction, and whether it is forwarded.
    pub hook: crate::rules::kernel::Hook,
    /// The interface the rule named (its glob text: `tun*` when that is all the kernel knows).
    pub interface: Option<std::sync::Arc<str>>,
}

/// Where a kernel-tracked flow stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelState {
    /// The entry was just created (conntrack's event): it is the flow's entry from now on.
    Created,
    /// The entry exists (a dump listed it).
    Alive,
    /// The connection is ending: both sides sent FIN ([`CloseReason::Fin`]) or one sent RST
    /// ([`CloseReason::Rst`]); conntrack keeps the entry a while longer.
    Closing(CloseReason),
    /// The kernel forgot the entry: the flow is over.
    Ended,
}

/// A pass over the kernel's whole connection table (see [`crate::Engine::handle_kernel_sync`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelSync {
    /// A dump begins at `at`; its reports follow.
    Start { generation: u16, at: Instant },
    /// Every report of that dump has been sent.
    Done { generation: u16 },
}

pub(crate) type Waker = Arc<dyn Fn() + Send + Sync>;

/// A remote control for one engine, usable from any thread at any time.
#[derive(Clone)]
pub struct Handle {
    pub(crate) tx: SyncSender<Command>,
    pub(crate) waker: Arc<Mutex<Option<Waker>>>,
    pub(crate) refused: Arc<AtomicU64>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handle")
    }
}

/// Why a command had no effect.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error("the flowgate engine has stopped")]
    Gone,
    #[error("the flowgate engine's command queue is full ({COMMAND_CAPACITY} commands); try again")]
    Busy,
    #[error("the flowgate engine did not answer in time")]
    Timeout,
}

impl Handle {
    fn try_send(&self, c: Command) -> Result<(), (HandleError, Command)> {
        self.try_send_quietly(c)?;
        self.wake();
        Ok(())
    }

    /// Queues `c` without waking the driver: it is applied at the driver's next wake-up.
    fn try_send_quietly(&self, c: Command) -> Result<(), (HandleError, Command)> {
        match self.tx.try_send(c) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(c)) => Err((HandleError::Busy, c)),
            Err(TrySendError::Disconnected(c)) => Err((HandleError::Gone, c)),
        }
    }

    /// Wakes the driver, so it applies what was sent ([`Handle::owner_quietly`]).
    pub fn wake(&self) {
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(w) = waker {
            w();
        }
    }

    /// Sends `c`, retrying while the channel is full for up to `wait`.
    fn send(&self, mut c: Command, wait: Duration) -> Result<(), HandleError> {
        let deadline = StdInstant::now() + wait;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.try_send(c) {
                Ok(()) => return Ok(()),
                Err((HandleError::Busy, back)) if StdInstant::now() < deadline => {
                    c = back;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    if e == HandleError::Busy {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Changes the verdict of a live flow, in one direction or (`None`) both, at any time, also
    /// long after its first verdict. Updating a flow that has closed does nothing.
    pub fn update(&self, flow: FlowId, verdict: DataVerdict, direction: Option<Direction>) -> Result<(), HandleError> {
        self.send(Command::Update { flow, verdict, direction }, Duration::ZERO)
    }

    /// Gives the verdict a paused flow was waiting for, in both directions; held packets are
    /// released (or dropped) accordingly.
    pub fn resume(&self, flow: FlowId, verdict: DataVerdict) -> Result<(), HandleError> {
        self.update(flow, verdict, None)
    }

    /// Passes on what conntrack reports about flows; flows this engine does not know are
    /// ignored. Waits up to `wait` while the channel is full.
    pub fn kernel_reports(&self, reports: Vec<KernelReport>, wait: Duration) -> Result<(), HandleError> {
        self.send(Command::Kernel(reports), wait)
    }

    /// Hands the engine packets static rules dropped in the kernel (their log), in one command.
    pub fn kernel_drops(&self, drops: Vec<KernelDrop>, wait: Duration) -> Result<(), HandleError> {
        self.send(Command::KernelDrops(drops), wait)
    }

    /// Marks the start or the end of a pass over the kernel's table. Waits up to `wait` while the
    /// channel is full.
    pub fn kernel_sync(&self, sync: KernelSync, wait: Duration) -> Result<(), HandleError> {
        self.send(Command::Sync(sync), wait)
    }

    /// Answers the engine's question about a flow's owner ([`crate::Engine::poll_owner_request`]);
    /// `None` when it could not be found. Waits up to `wait` while the channel is full.
    pub fn owner(
        &self,
        flow: FlowId,
        owner: Option<Arc<crate::owner::Owner>>,
        wait: Duration,
    ) -> Result<(), HandleError> {
        self.send(Command::Owner { flow, owner }, wait)
    }

    /// [`Handle::owner`] without waking the driver, for an answer nothing waits for but the
    /// flow's first events (its verdict was given already, see [`crate::owner::OwnerRequest::hold`]):
    /// answers gather until the driver's next wake-up, or until [`Handle::wake`].
    pub fn owner_quietly(&self, flow: FlowId, owner: Option<Arc<crate::owner::Owner>>) -> Result<(), HandleError> {
        self.try_send_quietly(Command::Owner { flow, owner }).map_err(|(e, _)| {
            if e == HandleError::Busy {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            e
        })
    }

    /// Replaces the engine's rules and judges every live flow again ([`crate::Engine::reload`]).
    pub fn reload(&self, rules: Arc<crate::rules::matcher::CompiledRules>) -> Result<(), HandleError> {
        self.send(Command::Reload(rules), Duration::ZERO)
    }

    /// The live flows `selector` matches, in chunks, as the engine gets to them. A flow that lives
    /// through the whole listing is listed exactly once; one that starts or ends meanwhile may be
    /// listed or not.
    pub fn list(&self, selector: Selector) -> Result<Listing, HandleError> {
        self.select(selector, None)
    }

    /// Gives every flow `selector` matches the verdict `verdict` (like [`Handle::update`] on
    /// each), and lists them as they are afterwards.
    pub fn apply(&self, selector: Selector, verdict: DataVerdict) -> Result<Listing, HandleError> {
        self.select(selector, Some(verdict))
    }

    fn select(&self, selector: Selector, verdict: Option<DataVerdict>) -> Result<Listing, HandleError> {
        let (sink, rx) = std::sync::mpsc::sync_channel(LISTING_DEPTH);
        let (give_back, recycle) = std::sync::mpsc::sync_channel(LISTING_DEPTH);
        self.send(Command::Select { selector, verdict, sink, recycle }, Duration::ZERO)?;
        Ok(Listing { rx, give_back, done: false })
    }

    /// Every live flow, waiting up to `timeout` for the engine to list them. Never call this from
    /// the engine's own thread (a provider callback): it would wait for itself.
    pub fn flows(&self, timeout: Duration) -> Result<Vec<FlowStatus>, HandleError> {
        let mut listing = self.list(Selector::all())?;
        let deadline = StdInstant::now() + timeout;
        let mut out = Vec::new();
        while let Some(chunk) = listing.next_before(deadline) {
            out.extend(chunk?);
        }
        Ok(out)
    }

    /// Commands refused so far because the channel was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Flows streamed from an engine (see [`Handle::list`]). Iterating blocks until the engine sends
/// the next chunk; `Err(Gone)` means the engine stopped before it finished. A reader that hands
/// each chunk back when done with it ([`Listing::give_back`]) lets the engine fill it again, so a
/// long listing allocates nothing on the engine's thread after its first few chunks.
#[derive(Debug)]
pub struct Listing {
    rx: Receiver<Chunk>,
    give_back: SyncSender<Vec<FlowStatus>>,
    done: bool,
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Flows(v) => write!(f, "Flows({})", v.len()),
            Chunk::Done => f.write_str("Done"),
        }
    }
}

impl Listing {
    /// Returns a chunk, emptied, for the engine to reuse.
    pub fn give_back(&self, mut chunk: Vec<FlowStatus>) {
        chunk.clear();
        let _ = self.give_back.try_send(chunk);
    }

    /// The next chunk, waiting no later than `deadline`; `Some(Err(Timeout))` if it passed.
    pub fn next_before(&mut self, deadline: StdInstant) -> Option<Result<Vec<FlowStatus>, HandleError>> {
        if self.done {
            return None;
        }
        let wait = deadline.saturating_duration_since(StdInstant::now());
        match self.rx.recv_timeout(wait) {
            Ok(Chunk::Flows(v)) => Some(Ok(v)),
            Ok(Chunk::Done) => {
                self.done = true;
                None
            }
            Err(RecvTimeoutError::Timeout) => {
                self.done = true;
                Some(Err(HandleError::Timeout))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.done = true;
                Some(Err(HandleError::Gone))
            }
        }
    }
}

impl Iterator for Listing {
    type Item = Result<Vec<FlowStatus>, HandleError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.rx.recv() {
            Ok(Chunk::Flows(v)) => Some(Ok(v)),
            Ok(Chunk::Done) => {
                self.done = true;
                None
            }
            Err(_) => {
                self.done = true;
                Some(Err(HandleError::Gone))
            }
        }
    }
}
