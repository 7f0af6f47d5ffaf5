//! Owners: asking the driver who owns each new flow, and what waits for the answer.
//!
//! When the driver can tell owners ([`crate::EngineConfig::owner_wait`] is set), every new flow
//! is asked about ([`Engine::poll_owner_request`]) and its first events (`flow.new`,
//! `flow.verdict`) wait for the answer, so they carry the owner. A flow whose verdict the answer
//! could change (a rule naming a process, user, unit or cgroup may be the first to match it) is
//! also paused: its packets are held until the answer comes and the rules are asked again with
//! it. So is every new flow when a product's filter judges beside the rules: the filter's
//! `new_flow` is called once the owner is known, with it in the flow. An answer that does not
//! come by `owner_wait` counts as "unknown": rules that name an owner then do not match. Nothing here blocks: the driver answers through a handle.
//!
//! This room keeps the waiting flows and settles them; it emits the deferred events and moves
//! held packets. It never closes a flow.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::Engine;
use super::entry::bits;
use super::judge::First;
use super::table::Slot;
use crate::event::{Event, EventKind};
use crate::flow::{Flow, FlowId};
use crate::owner::{Owner, OwnerRequest};
use crate::time::Instant;
use crate::verdict::{FlowVerdict, NewFlowVerdict};

/// A flow waiting for its owner.
struct Waiting {
    slot: Slot,
    /// Its first verdict waits too.
    hold: Option<Held>,
    events: Vec<Event>,
}

/// What a held flow's first verdict still needs besides the rules.
#[derive(Copy, Clone, Debug)]
pub(super) enum Held {
    /// The product filter's answer, given already (or `None`: no filter), to be combined with
    /// the rules' once they can be asked with the owner.
    Filtered(Option<NewFlowVerdict>),
    /// The product filter is asked once the owner is known.
    AskFilter,
}

#[derive(Default)]
pub(super) struct Owners {
    waiting: HashMap<FlowId, Waiting>,
    /// Deadlines in the order they were set: one wait for all, so the oldest is first.
    deadlines: VecDeque<(Instant, FlowId)>,
    requests: VecDeque<OwnerRequest>,
}

impl Owners {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|&(t, _)| t)
    }

    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub(super) fn requests(&self) -> usize {
        self.requests.len()
    }

    /// Keeps an event of a flow whose first events wait for its owner behind them; gives it
    /// back if the flow does not wait.
    pub(super) fn defer(&mut self, ev: Event) -> Option<Event> {
        let id = match &ev.kind {
            EventKind::FlowUpdate { flow, .. } => flow.id,
            _ => return Some(ev),
        };
        match self.waiting.get_mut(&id) {
            Some(w) => {
                w.events.push(ev);
                None
            }
            None => Some(ev),
        }
    }
}

impl Engine {
    /// The next flow whose owner the engine wants to know; answer with
    /// [`crate::Handle::owner`] (or [`Engine::set_owner`]), also when it cannot be found.
    pub fn poll_owner_request(&mut self) -> Option<OwnerRequest> {
        self.owners.requests.pop_front()
    }

    /// The owner of a flow the engine asked about (`None`: it could not be found). Settles the
    /// flow: its deferred events go out, and a paused first verdict is given.
    pub fn set_owner(&mut self, flow: FlowId, owner: Option<Arc<Owner>>) {
        let Some(w) = self.owners.waiting.remove(&flow) else { return };
        self.settle(flow, w, owner);
    }

    /// Queues the question about a flow just opened, and keeps its first events until the
    /// answer. `hold`: its verdict waits too (with the product filter's answer).
    pub(super) fn ask_owner(&mut self, now: Instant, slot: Slot, flow: &Flow, hold: Option<Held>, events: [Event; 2]) {
        let Some(wait) = self.config.owner_wait else {
            self.events.extend(events);
            return;
        };
        self.owners.requests.push_back(OwnerRequest {
            flow: flow.id,
            protocol: flow.protocol,
            direction: flow.direction,
            local: flow.local,
            remote: flow.remote,
            forwarded: flow.forwarded,
            hold: hold.is_some(),
        });
        self.owners.deadlines.push_back((now + wait, flow.id));
        self.owners.waiting.insert(flow.id, Waiting { slot, hold, events: events.into() });
        if hold.is_some() {
            self.stats.owner_held += 1;
        }
    }

    /// Settles the flows whose answer did not come in time: their owner is unknown.
    pub(super) fn expire_owner_waits(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.owners.deadlines.front() {
            if at > now {
                break;
            }
            self.owners.deadlines.pop_front();
            if let Some(w) = self.owners.waiting.remove(&id) {
                self.stats.owner_timeouts += 1;
                self.settle(id, w, None);
            }
        }
        // Answered flows leave their deadline behind; keep the queue bounded by the waiting.
        if self.owners.waiting.is_empty() {
            self.owners.deadlines.clear();
        }
    }

    /// Something else is about to be said of a waiting flow (it changes verdict or closes):
    /// its first events must go out before, owner or not.
    pub(super) fn flush_owner_wait(&mut self, flow: FlowId) {
        if let Some(w) = self.owners.waiting.remove(&flow) {
            self.settle(flow, w, None);
        }
    }

    fn settle(&mut self, id: FlowId, w: Waiting, owner: Option<Arc<Owner>>) {
        let Some(e) = self.table.get_mut(w.slot).filter(|e| e.id == id) else { return };
        if owner.is_some() {
            self.stats.owners_known += 1;
        }
        e.owner = owner.clone();
        let mut first: Option<(FlowVerdict, First, Option<crate::event::Peek>)> = None;
        if let Some(held) = w.hold {
            let flow = e.flow(&self.interfaces);
            let filter_verdict = match held {
                Held::Filtered(v) => v,
                Held::AskFilter => {
                    let fail = if self.config.fail_open { NewFlowVerdict::Allow } else { NewFlowVerdict::Drop };
                    self.call_filter("new_flow", flow.id, |f| f.new_flow(&flow)).map(|r| r.unwrap_or(fail))
                }
            };
            let class = self.rules.classify(&flow);
            let fm = self.first_modes(&flow, class, filter_verdict);
            let f = fm.first;
            let peek = fm.peek;
            let Some(e) = self.table.get_mut(w.slot) else { return };
            e.set_mode(crate::flow::Direction::Outbound, fm.out);
            e.set_mode(crate::flow::Direction::Inbound, fm.inn);
            e.set(bits::FILTER_INSPECTS, f.filter_inspects);
            e.set(bits::SILENT, f.silent);
            e.rule = Some(f.rule.clone());
            let verdict = e.verdict();
            if let Some(window) = fm.sniff {
                self.start_sniffing(w.slot, window);
            }
            first = Some((verdict, f, peek));
        }
        for mut ev in w.events {
            match &mut ev.kind {
                EventKind::FlowNew { flow } | EventKind::FlowUpdate { flow, .. } => flow.owner = owner.clone(),
                EventKind::FlowVerdict { flow, verdict, rule, peek } => {
                    flow.owner = owner.clone();
                    if let Some((v, f, p)) = &first {
                        *verdict = *v;
                        *rule = Some(f.rule.clone());
                        *peek = *p;
                    }
                }
                _ => {}
            }
            self.events.push_back(ev);
        }
        // The packets held meanwhile meet the verdict now (bytes among them are read first),
        // after the first events: what reading them decides comes later.
        if first.is_some() {
            self.review_held(w.slot, self.last_now);
        }
    }
}
