//! Work over every live flow, done a slice at a time so the packet path never waits long:
//! listings and verdict changes by selector, re-judging after a reload, and reconciling with a
//! kernel sync.
//!
//! A sweep walks the table's slots in order from a cursor; each call of
//! [`Engine::handle_timeout`] advances the pending sweeps by at most [`BUDGET`] slots in all. A
//! flow keeps its slot for life, so a flow that lives through a whole sweep is visited exactly
//! once; flows that start or end meanwhile may or may not be. A listing whose reader is slow
//! waits (its chunk stays here, retried a millisecond later) and is dropped if the reader goes
//! away. Only one re-judge and one reconcile are ever pending: a newer one restarts or takes over
//! the pending one.
//!
//! This room owns the pending sweeps and their cursors.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use super::Engine;
use super::table::Slot;
use crate::event::UpdateSource;
use crate::handle::{Chunk, FlowStatus, Selector};
use crate::time::Instant;
use crate::verdict::DataVerdict;

/// Slots visited per `handle_timeout` call, over all sweeps.
pub(super) const BUDGET: usize = 1024;
/// Flows per listing chunk.
const CHUNK: usize = 512;
/// How long a listing waits for a slow reader before trying again.
const RETRY: Duration = Duration::from_millis(1);

/// A listing's way out: chunks go to `sink`, emptied ones come back through `recycle`.
struct Out {
    sink: SyncSender<Chunk>,
    recycle: Receiver<Vec<FlowStatus>>,
    batch: Vec<FlowStatus>,
}

enum Job {
    Select { selector: Selector, verdict: Option<DataVerdict>, out: Out },
    Rejudge,
    Reconcile { generation: u16 },
}

struct Sweep {
    job: Job,
    cursor: Slot,
    /// A listing waiting for its reader: not before this time.
    blocked_until: Option<Instant>,
}

#[derive(Default)]
pub(super) struct Sweeps {
    pending: VecDeque<Sweep>,
}

impl Sweeps {
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    fn push(&mut self, job: Job) {
        self.pending.push_back(Sweep { job, cursor: 0, blocked_until: None });
    }

    pub(super) fn select(
        &mut self,
        selector: Selector,
        verdict: Option<DataVerdict>,
        sink: SyncSender<Chunk>,
        recycle: Receiver<Vec<FlowStatus>>,
    ) {
        self.push(Job::Select { selector, verdict, out: Out { sink, recycle, batch: Vec::new() } });
    }

    pub(super) fn rejudge(&mut self) {
        match self.pending.iter_mut().find(|s| matches!(s.job, Job::Rejudge)) {
            // Newer rules: every flow must be judged by them, also those already visited.
            Some(s) => s.cursor = 0,
            None => self.push(Job::Rejudge),
        }
    }

    pub(super) fn reconcile(&mut self, generation: u16) {
        match self.pending.iter_mut().find_map(|s| match &mut s.job {
            Job::Reconcile { generation: g } => Some(g),
            _ => None,
        }) {
            Some(g) => *g = generation,
            None => self.push(Job::Reconcile { generation }),
        }
    }

    /// When a sweep can go on: long ago if one can run now.
    pub(super) fn due(&self) -> Option<Instant> {
        self.pending.iter().map(|s| s.blocked_until.unwrap_or(Instant::ZERO)).min()
    }
}

impl Out {
    fn push(&mut self, f: FlowStatus) {
        if self.batch.capacity() == 0 {
            self.batch = self.recycle.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        }
        self.batch.push(f);
    }

    /// Sends what the listing has gathered; false if the reader is slow (try later).
    fn flush(&mut self) -> Result<bool, ()> {
        if self.batch.is_empty() {
            return Ok(true);
        }
        match self.sink.try_send(Chunk::Flows(std::mem::take(&mut self.batch))) {
            Ok(()) => Ok(true),
            Err(TrySendError::Full(Chunk::Flows(back))) => {
                self.batch = back;
                Ok(false)
            }
            Err(TrySendError::Full(Chunk::Done)) => Ok(false),
            Err(TrySendError::Disconnected(_)) => Err(()),
        }
    }

    /// Sends the last chunk and the end of the listing.
    fn finish(&mut self) -> Step {
        match self.flush() {
            Ok(true) => {}
            Ok(false) => return Step::Blocked,
            Err(()) => return Step::Abandoned,
        }
        match self.sink.try_send(Chunk::Done) {
            Ok(()) => Step::Finished,
            Err(TrySendError::Full(_)) => Step::Blocked,
            Err(TrySendError::Disconnected(_)) => Step::Abandoned,
        }
    }
}

impl Engine {
    /// Advances the pending sweeps by up to [`BUDGET`] slots.
    pub(super) fn run_sweeps(&mut self, now: Instant) {
        let mut budget = BUDGET;
        let mut waiting = VecDeque::new();
        while budget > 0 {
            let Some(mut s) = self.sweeps.pending.pop_front() else { break };
            if s.blocked_until.is_some_and(|t| t > now) {
                waiting.push_back(s);
                continue;
            }
            s.blocked_until = None;
            let done = self.step(&mut s, now, &mut budget);
            match done {
                Step::Finished | Step::Abandoned => {}
                Step::Blocked => {
                    s.blocked_until = Some(now + RETRY);
                    waiting.push_back(s);
                }
                Step::More => self.sweeps.pending.push_front(s),
            }
        }
        // Sweeps set aside go back in their order, ahead of those not reached.
        while let Some(s) = waiting.pop_back() {
            self.sweeps.pending.push_front(s);
        }
    }

    fn step(&mut self, s: &mut Sweep, now: Instant, budget: &mut usize) -> Step {
        // A listing by ids needs no walk: look them up.
        if let Job::Select { selector, verdict, out } = &mut s.job
            && selector.ids_only()
        {
            if s.cursor == 0 {
                for id in selector.ids.clone() {
                    let Some(slot) = self.table.slot_of(id) else { continue };
                    if let Some(v) = *verdict {
                        self.apply(slot, now, v, None, UpdateSource::Handle);
                    }
                    if let Some(e) = self.table.get(slot) {
                        out.push(e.status(&self.interfaces));
                    }
                }
                s.cursor = usize::MAX;
                *budget = budget.saturating_sub(selector.ids.len().max(1));
            }
            return out.finish();
        }
        let high = self.table.high();
        while s.cursor < high && *budget > 0 {
            let slot = s.cursor;
            s.cursor += 1;
            *budget -= 1;
            match &mut s.job {
                Job::Rejudge => self.rejudge(slot, now),
                Job::Reconcile { generation } => {
                    let g = *generation;
                    self.reconcile(slot, now, g);
                }
                Job::Select { selector, verdict, out } => {
                    let Some(e) = self.table.get(slot) else { continue };
                    if !selector.matches(e.id, e.protocol, e.remote(), e.owner.as_deref()) {
                        continue;
                    }
                    if let Some(v) = *verdict {
                        self.apply(slot, now, v, None, UpdateSource::Handle);
                    }
                    if let Some(e) = self.table.get(slot) {
                        out.push(e.status(&self.interfaces));
                    }
                    if out.batch.len() >= CHUNK {
                        match out.flush() {
                            Ok(true) => {}
                            Ok(false) => return Step::Blocked,
                            Err(()) => return Step::Abandoned,
                        }
                    }
                }
            }
        }
        if s.cursor < high {
            return Step::More;
        }
        match &mut s.job {
            Job::Select { out, .. } => out.finish(),
            _ => Step::Finished,
        }
    }
}

enum Step {
    More,
    Blocked,
    Finished,
    Abandoned,
}
