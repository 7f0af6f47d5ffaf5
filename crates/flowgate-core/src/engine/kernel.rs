//! Flows the kernel handles alone: what the kernel reports about them, connections adopted at
//! start, and the verdicts the data plane must carry out in the kernel.
//!
//! Once a flow is settled and its packets have passed, the driver lets the kernel pass or drop
//! the rest of it (its conntrack entry carries the verdict) and the engine stops seeing its
//! packets. From then on the kernel is the witness of its life:
//!
//! - **reports** ([`Engine::handle_kernel_report`]): an entry's creation (its id), its counters
//!   from a dump, TCP's FIN or RST as conntrack saw them, and its end. Only reports on the flow's
//!   own entry (by conntrack id) count, so the late FIN, RST or end of an old entry never touches
//!   a new connection that reuses its 5-tuple.
//! - **syncs** ([`Engine::handle_kernel_sync`]): a numbered pass over the kernel's whole table.
//!   A kernel-handled flow is idle only when a sync that began after its idle deadline found its
//!   counters unchanged; one that two syncs in a row did not find has ended unreported (a lost
//!   event) and is closed (counted as `kernel_lost`).
//!
//! - **flows a static rule decided in the kernel** (see [`crate::rules::kernel`]): the engine
//!   never saw a packet of them. A report on a live entry the engine does not know, carrying
//!   where the kernel decided it ([`crate::KernelDecided`]: the rule's hook and interface), opens
//!   the flow, judged by the rules like any new flow, with its events; from then on it is a
//!   kernel-handled flow like the others. A packet a static rule dropped comes from the kernel's
//!   log instead ([`Engine::handle_kernel_drop`], in `mod.rs`).
//!
//! A kernel-handled flow whose 5-tuple a new connection takes over (a pure SYN) has ended
//! unseen; it leaves the table but waits a sync interval for its entry's end, so that it closes
//! with the kernel's final counts, and the reports on the old entry never reach the new flow.
//!
//! The verdicts to enforce come out of [`Engine::poll_enforce`]: a change given through a handle
//! or a reload, an adopted connection, an idle flow the kernel must forget. At most one is queued
//! per flow at a time, and it is computed from the flow's verdict when polled, so the queue never
//! holds more than the live flows plus the flows that just closed.
//!
//! This room owns the sync state and the enforce queue; it closes flows through the engine.

use std::collections::VecDeque;
use std::sync::Arc;

use super::entry::{Entry, bits};
use super::judge::NewFlow;
use super::table::Slot;
use super::{Engine, Existing};
use crate::event::CloseReason;
use crate::flow::{Flow, FlowId, FlowKey, Protocol};
use crate::handle::{KernelDecided, KernelReport, KernelState, KernelSync};
use crate::rules::kernel::Hook;
use crate::rules::matcher::CompiledRules;
use crate::time::Instant;
use crate::verdict::FlowVerdict;

/// What the data plane must do in the kernel for a flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelAction {
    /// Let the kernel pass the flow (mark it allowed).
    Allow,
    /// Stop the flow now in both directions and tear the connection down at both ends.
    Drop { silent: bool },
    /// The engine needs the flow's packets again (paused or inspected anew): the kernel must
    /// stop deciding it alone and queue its packets to the flow's owner.
    Recall,
    /// The flow closed idle while the kernel may still pass it: forget the verdict, so that if
    /// it wakes up its next packet comes to the engine as a new flow.
    Forget,
}

/// A verdict the data plane must carry out itself, because the flow's packets may not reach the
/// engine again.
#[derive(Clone, Debug, PartialEq)]
pub struct Enforce {
    pub flow: Flow,
    pub action: KernelAction,
}

enum Pending {
    /// Computed from the flow's state when polled.
    Live(FlowId),
    Closed(Enforce),
}

/// Most retired flows waiting for the kernel's last word; past it the oldest closes at once.
const MAX_RETIRED: usize = 1024;

/// A kernel-handled flow whose 5-tuple a new connection took over: it waits, out of the table,
/// for its entry's end and final counts (see [`Engine::reopen`]).
struct Retired {
    key: FlowKey,
    entry: Entry,
    deadline: Instant,
}

/// Sync state, the enforce queue and the retired flows.
#[derive(Default)]
pub(super) struct Kernel {
    generation: u16,
    sync_started: Option<Instant>,
    /// When the last completed sync began.
    synced_at: Option<Instant>,
    queue: VecDeque<Pending>,
    retired: Vec<Retired>,
}

impl Kernel {
    pub(super) fn generation(&self) -> u16 {
        self.generation
    }

    pub(super) fn synced_at(&self) -> Option<Instant> {
        self.synced_at
    }

    pub(super) fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Queues the flow's current verdict for the data plane, once.
    pub(super) fn queue(&mut self, e: &mut Entry) {
        if !e.has(bits::ENFORCE_QUEUED) {
            e.set(bits::ENFORCE_QUEUED, true);
            self.queue.push_back(Pending::Live(e.id));
        }
    }

    pub(super) fn push_closed(&mut self, x: Enforce) {
        self.queue.push_back(Pending::Closed(x));
    }

    pub(super) fn retired(&self) -> usize {
        self.retired.len()
    }

    pub(super) fn next_retired(&self) -> Option<Instant> {
        self.retired.iter().map(|r| r.deadline).min()
    }
}

/// Takes the kernel's counters where larger (the kernel saw the packets we let it handle
/// alone); growth counts as activity at `now`.
fn take_counts(e: &mut Entry, r: &KernelReport, now: Instant) {
    let local = e.local();
    let opener_is_local = local == r.opener || (e.protocol == Protocol::Icmp && local.ip() == r.opener.ip());
    let (out, inn) =
        if opener_is_local { (r.from_opener, r.from_responder) } else { (r.from_responder, r.from_opener) };
    let c = &mut e.counters;
    let before = (c.packets_out, c.packets_in);
    if let Some((p, b)) = out {
        c.packets_out = c.packets_out.max(p);
        c.bytes_out = c.bytes_out.max(b);
    }
    if let Some((p, b)) = inn {
        c.packets_in = c.packets_in.max(p);
        c.bytes_in = c.bytes_in.max(b);
    }
    if (c.packets_out, c.packets_in) != before {
        e.last_seen = now;
    }
}

/// Whether a report speaks of the flow's own conntrack entry.
fn same_entry(e: &Entry, id: Option<u32>) -> bool {
    match (id, e.ct_id()) {
        (Some(a), Some(b)) => a == b,
        // A kernel that gives no ids: the 5-tuple is all there is.
        (None, _) => true,
        // The flow has not learnt its entry yet; the report may be of an older one.
        (Some(_), None) => false,
    }
}

impl Engine {
    /// A new connection (a pure SYN) takes over the 5-tuple of the flow in `slot`. A flow the
    /// kernel handles has ended unseen, and its final counts are still to come from the kernel
    /// (its entry's end usually arrives just after the new SYN): it leaves the table and waits for
    /// them a little while (a sync interval), claiming the reports on its own entry. Others close
    /// at once.
    pub(super) fn reopen(&mut self, slot: Slot, now: Instant) {
        let kernel = self.table.get(slot).is_some_and(|e| e.has(bits::KERNEL));
        if !kernel {
            self.close(slot, now, CloseReason::Reused);
            return;
        }
        let Some(entry) = self.remove(slot) else { return };
        if self.kernel.retired.len() >= MAX_RETIRED {
            let oldest = self.kernel.retired.remove(0);
            let reason = oldest.entry.closing.unwrap_or(CloseReason::Reused);
            self.finish(oldest.entry, now, reason);
        }
        let deadline = now + self.config.kernel_sync_interval;
        self.kernel.retired.push(Retired { key: entry.key(), entry, deadline });
    }

    /// Closes retired flows whose wait is over.
    pub(super) fn end_retired(&mut self, now: Instant) {
        while let Some(i) = self.kernel.retired.iter().position(|r| r.deadline <= now) {
            let r = self.kernel.retired.swap_remove(i);
            let reason = r.entry.closing.unwrap_or(CloseReason::Reused);
            self.finish(r.entry, now, reason);
        }
    }

    /// Closes every retired flow now (shutdown).
    pub(super) fn end_all_retired(&mut self, now: Instant) {
        for r in std::mem::take(&mut self.kernel.retired) {
            let reason = r.entry.closing.unwrap_or(CloseReason::Reused);
            self.finish(r.entry, now, reason);
        }
    }

    /// A report on a retired flow's entry: the first entry created for the 5-tuple after the
    /// flow was retired without knowing its entry is its own (conntrack reports in order, and
    /// the old entry was created before the new one).
    fn retired_report(&mut self, now: Instant, key: &FlowKey, r: &KernelReport) -> bool {
        let Some(i) = self.kernel.retired.iter().position(|x| {
            x.key == *key
                && match (x.entry.ct_id(), r.id) {
                    (Some(a), Some(b)) => a == b,
                    (None, _) => matches!(r.state, KernelState::Created) || r.id.is_none(),
                    (Some(_), None) => false,
                }
        }) else {
            return false;
        };
        let x = &mut self.kernel.retired[i];
        if x.entry.ct_id().is_none() {
            x.entry.set_ct_id(r.id);
        }
        take_counts(&mut x.entry, r, now);
        match r.state {
            KernelState::Ended => {
                let x = self.kernel.retired.swap_remove(i);
                let reason = x.entry.closing.unwrap_or(CloseReason::Reused);
                self.finish(x.entry, now, reason);
            }
            KernelState::Closing(reason) => {
                x.entry.closing.get_or_insert(reason);
            }
            KernelState::Created | KernelState::Alive => {}
        }
        true
    }

    /// Takes conntrack's word on a flow. Counters replace ours where larger (the kernel saw the
    /// packets we let it handle alone), and growth counts as activity; FIN or RST starts the
    /// flow's linger; an end closes it with the kernel's counts. Returns whether the flow was
    /// known here.
    pub fn handle_kernel_report(&mut self, now: Instant, r: &KernelReport) -> bool {
        let key = FlowKey::new(r.protocol, (r.opener.ip(), r.opener.port()), (r.responder.ip(), r.responder.port()));
        if !self.kernel.retired.is_empty() && self.retired_report(now, &key, r) {
            return true;
        }
        let Some(slot) = self.table.lookup(&key) else {
            // Only a live entry makes a flow: the end of one never heard of (a previous
            // instance's, or one whose creation was lost) is not a flow to start now.
            return match (&r.decided, r.state) {
                (Some(d), KernelState::Created | KernelState::Alive) => self.kernel_decided(now, r, d),
                _ => false,
            };
        };
        let linger = self.config.timeouts.tcp_closing;
        let generation = self.kernel.generation;
        // While an older flow on this 5-tuple waits for its end, a dump may still show its entry.
        let ambiguous = self.kernel.retired.iter().any(|x| x.key == key);
        let Some(e) = self.table.get_mut(slot) else { return false };
        // Which entry speaks: a new entry is the flow's from now on; a dump may name the flow's
        // entry for the first time; anything else must be about the entry the flow knows, or it
        // is about an older connection on the same 5-tuple.
        match r.state {
            KernelState::Created => e.set_ct_id(r.id),
            KernelState::Alive if e.ct_id().is_none() && !ambiguous => e.set_ct_id(r.id),
            _ => {}
        }
        if !same_entry(e, r.id) {
            return true;
        }
        take_counts(e, r, now);
        match r.state {
            KernelState::Ended => {
                let reason = e.closing.unwrap_or(CloseReason::Conntrack);
                self.close(slot, now, reason);
            }
            KernelState::Created | KernelState::Alive | KernelState::Closing(_) => {
                e.seen_gen = generation;
                if let KernelState::Closing(reason) = r.state
                    && e.closing.is_none()
                {
                    e.closing = Some(reason);
                    e.last_seen = now;
                    let at = now + linger;
                    if at < e.timer_at {
                        self.timers.reset(slot, e.timer_at, at);
                        e.timer_at = at;
                    }
                }
            }
        }
        true
    }

    /// A pass over the kernel's table begins or ends. At the end, kernel-handled flows that two
    /// passes in a row did not find are closed (see the module documentation).
    pub fn handle_kernel_sync(&mut self, _now: Instant, s: KernelSync) {
        match s {
            KernelSync::Start { generation, at } => {
                self.kernel.generation = generation;
                self.kernel.sync_started = Some(at);
            }
            KernelSync::Done { generation } => {
                if generation == self.kernel.generation
                    && let Some(at) = self.kernel.sync_started.take()
                {
                    self.kernel.synced_at = Some(at);
                    self.sweeps.reconcile(generation);
                }
            }
        }
    }

    /// Closes the flow in `slot` if it is kernel-handled and the last two syncs up to
    /// `generation` missed it.
    pub(super) fn reconcile(&mut self, slot: Slot, now: Instant, generation: u16) {
        let Some(e) = self.table.get(slot) else { return };
        if e.has(bits::KERNEL)
            && generation.wrapping_sub(e.seen_gen) >= 2
            && generation.wrapping_sub(e.seen_gen) < 0x8000
        {
            self.stats.kernel_lost += 1;
            let reason = e.closing.unwrap_or(CloseReason::Conntrack);
            self.close(slot, now, reason);
        }
    }

    /// A flow a static rule decided in the kernel, reported by conntrack before the engine saw
    /// any of it: judged here by the rules with what the kernel knows (the rule's hook gives its
    /// direction, the rule's interface its interface), with its `flow.new` and `flow.verdict`
    /// events; the kernel handles it from then on. When the rules here no longer say what the
    /// kernel did (a reload raced the report), the flow's verdict here is enforced. Returns
    /// whether the flow is known now. `r` reports a live entry.
    fn kernel_decided(&mut self, now: Instant, r: &KernelReport, d: &KernelDecided) -> bool {
        let (local, remote) = if d.hook == Hook::Input { (r.responder, r.opener) } else { (r.opener, r.responder) };
        let new = NewFlow {
            protocol: r.protocol,
            local,
            remote,
            direction: d.hook.direction(),
            interface: d.interface.as_deref(),
            existing: false,
            forwarded: d.hook == Hook::Forward,
            icmp: None,
        };
        self.stats.kernel_decided += 1;
        let Ok(slot) = self.start_flow(now, &new, None) else { return false };
        let offload = self.config.kernel_offload;
        let generation = self.kernel.generation;
        let Some(e) = self.table.get_mut(slot) else { return false };
        e.set(bits::ACCEPTED, true);
        e.set_ct_id(r.id);
        e.seen_gen = generation;
        take_counts(e, r, now);
        if offload && e.settled() && e.verdict() == FlowVerdict::Allow {
            e.set(bits::KERNEL, true);
        } else {
            self.kernel.queue(e);
        }
        true
    }

    /// Takes in a connection that was open before the engine started: a flow marked `existing`,
    /// judged like a new one (or keeping the verdict a previous instance gave it), with its
    /// `flow.new` and `flow.verdict` events. Its verdict is queued for [`Engine::poll_enforce`],
    /// so the data plane marks it, tears it down, or routes its packets here. Returns `None` for
    /// a flow already known, or when the table is full.
    pub fn adopt(&mut self, now: Instant, x: &Existing<'_>) -> Option<FlowId> {
        let key = FlowKey::new(x.protocol, (x.local.ip(), x.local.port()), (x.remote.ip(), x.remote.port()));
        if self.table.lookup(&key).is_some() {
            return None;
        }
        let new = NewFlow {
            protocol: x.protocol,
            local: x.local,
            remote: x.remote,
            direction: x.direction,
            interface: x.interface,
            existing: true,
            forwarded: x.forwarded,
            icmp: None,
        };
        let slot = self.start_flow(now, &new, x.kept).ok()?;
        let offload = self.config.kernel_offload;
        let generation = self.kernel.generation;
        let e = self.table.get_mut(slot)?;
        // Its packets have passed before: the kernel knows it.
        e.set(bits::ACCEPTED, true);
        e.set_ct_id(x.conntrack_id);
        if offload && e.settled() {
            e.set(bits::KERNEL, true);
            e.seen_gen = generation;
        }
        let id = e.id;
        self.kernel.queue(e);
        Some(id)
    }

    /// Replaces the rule set and judges every live flow again, a slice at a time (see
    /// [`Engine::handle_timeout`]): a flow the new rules drop is dropped (and torn down, see
    /// [`Engine::poll_enforce`]); a flow they still allow is left alone, as are flows already
    /// dropped. New flows follow the new rules at once.
    pub fn reload(&mut self, _now: Instant, rules: Arc<CompiledRules>) {
        self.rules = rules;
        self.sweeps.rejudge();
    }

    /// The next verdict the data plane must enforce itself, oldest first.
    pub fn poll_enforce(&mut self) -> Option<Enforce> {
        let offload = self.config.kernel_offload;
        let generation = self.kernel.generation;
        while let Some(p) = self.kernel.queue.pop_front() {
            let id = match p {
                Pending::Closed(x) => return Some(x),
                Pending::Live(id) => id,
            };
            let Some(slot) = self.table.slot_of(id) else { continue };
            let Some(e) = self.table.get_mut(slot) else { continue };
            e.set(bits::ENFORCE_QUEUED, false);
            let action = match e.verdict() {
                FlowVerdict::Allow if e.settled() => KernelAction::Allow,
                FlowVerdict::Drop if e.settled() => KernelAction::Drop { silent: e.has(bits::SILENT) },
                _ => KernelAction::Recall,
            };
            match action {
                KernelAction::Recall => e.set(bits::KERNEL, false),
                _ if offload && e.has(bits::ACCEPTED) => {
                    if !e.has(bits::KERNEL) {
                        e.seen_gen = generation;
                    }
                    e.set(bits::KERNEL, true);
                }
                _ => {}
            }
            return Some(Enforce { flow: e.flow(&self.interfaces), action });
        }
        None
    }
}
