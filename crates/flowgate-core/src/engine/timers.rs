//! Timers: when each flow must be looked at again (idle timeouts, the linger after FIN/RST, the
//! re-check of a kernel-handled flow's idleness).
//!
//! Every live flow has exactly one timer, held in an ordered set of packed `u64` keys (deadline
//! in milliseconds since an epoch, slot in the low 24 bits). The epoch lies [`BACK`] before the
//! first deadline ever set, since later deadlines can be earlier than that first one (a short
//! linger set after a long idle timeout); the 40 bits of milliseconds then reach 26 years ahead. A flow's timer is removed when
//! the flow closes and replaced when it moves, so the set never holds more keys than there are
//! live flows, whatever the churn. A deadline is rounded up to the millisecond: a timer never
//! fires early. Timers are not moved on every packet: a flow's deadline is recomputed from its
//! last activity when its timer fires, and the timer is set again if the flow was busy.
//!
//! This room knows slots and instants only.

use std::collections::BTreeSet;

use super::table::Slot;
use crate::time::Instant;

const SLOT_BITS: u32 = 24;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Milliseconds fit in the remaining 40 bits: about 34 years after the epoch.
const MAX_MS: u64 = (1 << (64 - SLOT_BITS)) - 1;
/// How far before the first deadline the epoch lies, in microseconds (about 8.7 years, more
/// than any timeout).
const BACK: u64 = (1 << 38) * 1000;

#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeSet<u64>,
    epoch: Option<Instant>,
}

impl Timers {
    fn key(&mut self, slot: Slot, at: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(Instant::from_micros(at.as_micros().saturating_sub(BACK)));
        let micros = at.as_micros().saturating_sub(epoch.as_micros());
        let ms = micros.div_ceil(1000).min(MAX_MS);
        (ms << SLOT_BITS) | (slot as u64 & SLOT_MASK)
    }

    fn instant(&self, key: u64) -> Instant {
        let epoch = self.epoch.unwrap_or_default();
        Instant::from_micros(epoch.as_micros().saturating_add((key >> SLOT_BITS) * 1000))
    }

    /// Sets the timer of `slot` for `at`. The caller keeps `at` to cancel it.
    pub(crate) fn set(&mut self, slot: Slot, at: Instant) {
        let k = self.key(slot, at);
        self.set.insert(k);
    }

    /// Cancels the timer of `slot` set for `at`.
    pub(crate) fn cancel(&mut self, slot: Slot, at: Instant) {
        let k = self.key(slot, at);
        self.set.remove(&k);
    }

    /// Moves the timer of `slot` from `from` to `to`.
    pub(crate) fn reset(&mut self, slot: Slot, from: Instant, to: Instant) {
        self.cancel(slot, from);
        self.set(slot, to);
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|&k| self.instant(k))
    }

    /// Takes the earliest timer if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Slot> {
        let &k = self.set.first()?;
        if self.instant(k) > now {
            return None;
        }
        self.set.pop_first();
        Some((k & SLOT_MASK) as Slot)
    }

    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_micros(1_000_000_000 + n * 1000)
    }

    #[test]
    fn fires_in_order_never_early_and_cancels_exactly() {
        let mut t = Timers::default();
        t.set(7, ms(30));
        t.set(3, ms(10));
        t.set(9, Instant::from_micros(ms(20).as_micros() + 1)); // rounds up to 21 ms
        t.set(4, ms(40));
        t.cancel(4, ms(40));
        assert_eq!(t.len(), 3);
        assert_eq!(t.next(), Some(ms(10)));
        assert_eq!(t.pop_due(ms(9)), None);
        assert_eq!(t.pop_due(ms(10)), Some(3));
        assert_eq!(t.pop_due(ms(20)), None, "20.001 ms is not due at 20 ms");
        assert_eq!(t.pop_due(ms(21)), Some(9));
        t.reset(7, ms(30), ms(50));
        assert_eq!(t.pop_due(ms(45)), None);
        assert_eq!(t.pop_due(ms(50)), Some(7));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn one_key_per_slot_and_deadline_whatever_the_churn() {
        let mut t = Timers::default();
        for round in 0..1_000u64 {
            for slot in 0..100 {
                t.set(slot, ms(round + slot as u64));
                t.reset(slot, ms(round + slot as u64), ms(round + 5_000));
                t.cancel(slot, ms(round + 5_000));
            }
        }
        assert_eq!(t.len(), 0);
    }
}
