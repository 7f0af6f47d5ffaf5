//! The handle: how other threads change verdicts and look at flows while the engine runs.
//!
//! A [`Handle`] is cheap to clone and `Send + Sync`. Commands go over a channel and take effect
//! the next time the engine is driven (`handle_packet`, `handle_timeout` or `handle_commands`);
//! a driver that sleeps between packets registers a waker with [`crate::Engine::set_waker`] so a
//! command wakes it. `flows()` reads the snapshot the engine last published, never the live
//! table, so it can be called from anywhere, even from inside a provider callback.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::event::RuleName;
use crate::flow::{Counters, Direction, Flow, FlowId};
use crate::time::Instant;
use crate::verdict::{DataVerdict, FlowVerdict, PacketId};

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

/// The latest published list of live flows and when it was taken.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub taken: Instant,
    pub flows: Arc<[FlowStatus]>,
    /// Counts publications, so a reader can wait for a newer one.
    pub generation: u64,
}

/// Where the engine publishes snapshots: a slot and a condition variable to wait on it.
#[derive(Debug, Default)]
pub(crate) struct SnapshotSlot {
    pub(crate) snapshot: Mutex<Snapshot>,
    pub(crate) published: Condvar,
}

pub(crate) enum Command {
    Update { flow: FlowId, verdict: DataVerdict, direction: Option<Direction> },
    Resume { flow: FlowId, verdict: DataVerdict },
    Release { packet: PacketId, accept: bool },
    Publish,
    Kernel(KernelReport),
    Reload(Arc<crate::rules::matcher::CompiledRules>),
}

/// What the kernel's connection tracking says about a flow it handles without user space.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct KernelReport {
    pub protocol: crate::flow::Protocol,
    /// The end that opened the flow (conntrack's original direction source).
    pub opener: std::net::SocketAddr,
    pub responder: std::net::SocketAddr,
    /// (packets, bytes) sent by the opener and by the responder, where accounting is on.
    pub from_opener: Option<(u64, u64)>,
    pub from_responder: Option<(u64, u64)>,
    /// The kernel forgot the flow: it is over.
    pub ended: bool,
}

pub(crate) type Waker = Arc<dyn Fn() + Send + Sync>;

/// A remote control for one engine, usable from any thread at any time.
#[derive(Clone)]
pub struct Handle {
    pub(crate) tx: Sender<Command>,
    pub(crate) waker: Arc<Mutex<Option<Waker>>>,
    pub(crate) snapshot: Arc<SnapshotSlot>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handle")
    }
}

/// The engine behind a handle is gone; the command had no effect.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the flowgate engine has stopped")]
pub struct EngineGone;

impl Handle {
    fn send(&self, c: Command) -> Result<(), EngineGone> {
        self.tx.send(c).map_err(|_| EngineGone)?;
        let waker = self.waker.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(w) = waker {
            w();
        }
        Ok(())
    }

    /// Changes the verdict of a live flow, in one direction or (`None`) both, at any time, also
    /// long after its first verdict. Updating a flow that has closed does nothing.
    pub fn update(&self, flow: FlowId, verdict: DataVerdict, direction: Option<Direction>) -> Result<(), EngineGone> {
        self.send(Command::Update { flow, verdict, direction })
    }

    /// Gives the verdict a paused flow was waiting for, in both directions; held packets are
    /// released (or dropped) accordingly.
    pub fn resume(&self, flow: FlowId, verdict: DataVerdict) -> Result<(), EngineGone> {
        self.send(Command::Resume { flow, verdict })
    }

    /// Releases (`accept`) or drops a packet a packet filter delayed.
    pub fn release(&self, packet: PacketId, accept: bool) -> Result<(), EngineGone> {
        self.send(Command::Release { packet, accept })
    }

    /// Passes on what conntrack reports about a flow (counters; its end). Flows this engine
    /// does not know are ignored, so a report can be sent to every engine of a daemon.
    pub fn kernel_report(&self, report: KernelReport) -> Result<(), EngineGone> {
        self.send(Command::Kernel(report))
    }

    /// Replaces the engine's rules and judges every live flow again ([`crate::Engine::reload`]).
    pub fn reload(&self, rules: Arc<crate::rules::matcher::CompiledRules>) -> Result<(), EngineGone> {
        self.send(Command::Reload(rules))
    }

    /// Asks the engine to publish a fresh snapshot the next time it is driven.
    pub fn refresh(&self) -> Result<(), EngineGone> {
        self.send(Command::Publish)
    }

    /// The live flows as of the engine's last published snapshot.
    pub fn flows(&self) -> Snapshot {
        self.snapshot.snapshot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Asks for a fresh snapshot and waits up to `timeout` for the engine to publish it; on
    /// timeout (an engine that is not being driven) returns the last one. Never call this from
    /// the engine's own thread (a provider callback): it would wait for itself.
    pub fn flows_fresh(&self, timeout: Duration) -> Result<Snapshot, EngineGone> {
        let slot = &self.snapshot;
        let before = slot.snapshot.lock().unwrap_or_else(PoisonError::into_inner).generation;
        self.refresh()?;
        let guard = slot.snapshot.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = slot
            .published
            .wait_timeout_while(guard, timeout, |s| s.generation == before)
            .unwrap_or_else(PoisonError::into_inner);
        Ok(guard.clone())
    }
}
