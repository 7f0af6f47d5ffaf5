//! Changing a live flow's verdict, and the packets that wait for one.
//!
//! A verdict changes when a provider answers on data, when an inspect window ends, when a handle
//! (library, CLI, control socket) says so, or when a reload's rules drop the flow. Each change is
//! an event (`flow.update`); a change given away from a packet (handle, reload) is also queued for
//! the data plane to enforce in the kernel, since the flow's packets may never reach the engine
//! again. A paused direction holds its packets (bounded by `max_held_packets`); they are released
//! or dropped when the pause ends, or dropped when the flow closes.
//!
//! This room changes modes, emits updates and moves held packets; it never closes a flow.

use super::Engine;
use super::entry::{Mode, bits};
use super::stream::mode_of;
use super::table::Slot;
use crate::event::{Event, EventKind, UpdateSource};
use crate::flow::{Direction, FlowId};
use crate::time::Instant;
use crate::verdict::{DataVerdict, FlowVerdict};

impl Engine {
    /// Changes a live flow's verdict (what [`crate::Handle::update`] does, for single-threaded
    /// users). Unknown or closed flows are ignored.
    pub fn update(&mut self, now: Instant, flow: FlowId, verdict: DataVerdict, direction: Option<Direction>) {
        if let Some(slot) = self.table.slot_of(flow) {
            self.apply(slot, now, verdict, direction, UpdateSource::Handle);
        }
    }

    /// A provider's data verdict: `Drop` and `Pause` hold for the whole flow, the rest for
    /// the direction whose data was shown.
    pub(super) fn apply_data(&mut self, slot: Slot, now: Instant, dir: Direction, verdict: DataVerdict, offset: u64) {
        match verdict {
            DataVerdict::Drop | DataVerdict::Pause => self.apply(slot, now, verdict, None, UpdateSource::Provider),
            _ => self.apply_side(slot, now, dir, mode_of(verdict, offset), UpdateSource::Provider),
        }
    }

    pub(super) fn apply(
        &mut self,
        slot: Slot,
        now: Instant,
        verdict: DataVerdict,
        direction: Option<Direction>,
        source: UpdateSource,
    ) {
        let provider = self.names.provider.clone();
        self.settle_first(slot);
        let Some(e) = self.table.get_mut(slot) else { return };
        let dirs: &[Direction] = match direction {
            Some(Direction::Outbound) => &[Direction::Outbound],
            Some(Direction::Inbound) => &[Direction::Inbound],
            None => &[Direction::Outbound, Direction::Inbound],
        };
        let before = (e.modes(), e.verdict());
        for &d in dirs {
            let m = mode_of(verdict, e.offset(d));
            e.set_mode(d, m);
        }
        // A verdict on the whole flow from a handle or the product ends the rules' wait for its
        // host name: it is the latest word on the flow.
        if direction.is_none()
            && matches!(verdict, DataVerdict::Allow | DataVerdict::Drop)
            && matches!(source, UpdateSource::Handle | UpdateSource::Provider)
            && let Some(i) = e.inspection_mut()
        {
            i.stop_sniffing();
        }
        if let DataVerdict::Pass { .. } = verdict {
            e.set(bits::FILTER_INSPECTS, true);
        }
        // A verdict from a provider or a handle replaces the rule's: events must say so.
        if matches!(source, UpdateSource::Provider | UpdateSource::Handle) && e.rule.as_ref() != Some(&provider) {
            e.rule = Some(provider);
        }
        self.after_change(slot, now, before, direction, source);
    }

    pub(super) fn apply_side(&mut self, slot: Slot, now: Instant, dir: Direction, mode: Mode, source: UpdateSource) {
        self.settle_first(slot);
        let Some(e) = self.table.get_mut(slot) else { return };
        let before = (e.modes(), e.verdict());
        e.set_mode(dir, mode);
        let (out, inn) = e.modes();
        self.after_change(slot, now, before, if out == inn { None } else { Some(dir) }, source);
    }

    /// Emits the update event, queues the change for the data plane, and lets the held packets
    /// meet the new verdict.
    pub(super) fn after_change(
        &mut self,
        slot: Slot,
        now: Instant,
        before: ((Mode, Mode), FlowVerdict),
        direction: Option<Direction>,
        source: UpdateSource,
    ) {
        let Some(e) = self.table.get_mut(slot) else { return };
        let verdict = e.verdict();
        let (out, inn) = e.modes();
        // Moving an inspect window is not news; a direction changing its verdict is.
        let changed = (out.verdict(), inn.verdict()) != (before.0.0.verdict(), before.0.1.verdict());
        if changed {
            // Verdicts given away from a packet (a handle call, a reload) may concern a flow the
            // kernel handles alone: the data plane must carry them out.
            // A drop decided on a packet's bytes (a provider, the host, an evasion, a timeout) of a
            // connection that is up must tear it down at both ends too, not only answer the
            // packet's sender.
            let away = matches!(source, UpdateSource::Handle | UpdateSource::Rules) && verdict != before.1;
            let torn = verdict == FlowVerdict::Drop && before.1 != FlowVerdict::Drop && e.has(bits::ACCEPTED);
            if away || torn {
                self.kernel.queue(e);
            }
            if verdict != before.1 || direction.is_some() {
                let flow = e.flow(&self.interfaces);
                let rule = e.rule.clone();
                let ev = Event { time: now, kind: EventKind::FlowUpdate { flow, verdict, rule, direction, source } };
                // Behind the flow's first events if they still wait for its owner.
                if let Some(ev) = self.owners.defer(ev) {
                    self.events.push_back(ev);
                }
            }
        }
        if self.reviewing {
            return;
        }
        self.reviewing = true;
        self.review_held(slot, now);
        self.reviewing = false;
    }

    /// A flow still waiting for its owner gets its first verdict and events now (owner unknown),
    /// before a change is made to it: the change must apply to that verdict, not be overwritten
    /// by it.
    fn settle_first(&mut self, slot: Slot) {
        if let Some(id) = self.table.get(slot).map(|e| e.id) {
            self.flush_owner_wait(id);
        }
    }
}
