//! The handle: how other threads change verdicts and look at flows while the engine runs.
//!
//! A [`Handle`] is cheap to clone and `Send + Sync`. Commands go over a channel and take effect
//! the next time the engine is driven (`handle_packet`, `handle_timeout` or `handle_commands`);
//! a driver that sleeps between packets registers a waker with [`crate::Engine::set_waker`] so a
//! command wakes it. `flows()` reads the snapshot the engine last published, never the live
//! table, so it can be called from anywhere, even from inside a provider callback.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

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
}

pub(crate) enum Command {
    Update { flow: FlowId, verdict: DataVerdict, direction: Option<Direction> },
    Resume { flow: FlowId, verdict: DataVerdict },
    Release { packet: PacketId, accept: bool },
    Publish,
}

pub(crate) type Waker = Arc<dyn Fn() + Send + Sync>;

/// A remote control for one engine, usable from any thread at any time.
#[derive(Clone)]
pub struct Handle {
    pub(crate) tx: Sender<Command>,
    pub(crate) waker: Arc<Mutex<Option<Waker>>>,
    pub(crate) snapshot: Arc<Mutex<Snapshot>>,
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

    /// Asks the engine to publish a fresh snapshot the next time it is driven.
    pub fn refresh(&self) -> Result<(), EngineGone> {
        self.send(Command::Publish)
    }

    /// The live flows as of the engine's last published snapshot.
    pub fn flows(&self) -> Snapshot {
        self.snapshot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
