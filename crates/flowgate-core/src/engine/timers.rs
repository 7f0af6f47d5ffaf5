//! Timers: when each flow must be looked at again (idle timeouts, the linger after FIN/RST, the
//! re-check of a kernel-handled flow's idleness).
//!
//! Every live flow has exactly one timer, held in an ordered set of `(deadline, slot)` keys. A
//! flow's timer is removed when the flow closes and replaced when it moves, so the set never
//! holds more keys than there are live flows, whatever the churn. Deadlines are kept to the
//! microsecond, whatever their distance from each other (a capture may span decades). Timers are
//! not moved on every packet: a flow's deadline is recomputed from its last activity when its
//! timer fires, and the timer is set again if the flow was busy.
//!
//! This room knows slots and instants only.

use std::collections::BTreeSet;

use super::table::Slot;
use crate::time::Instant;

#[derive(Debug, Default)]
pub(crate) struct Timers {
    set: BTreeSet<(Instant, u32)>,
}

impl Timers {
    /// Sets the timer of `slot` for `at`. The caller keeps `at` to cancel it.
    pub(crate) fn set(&mut self, slot: Slot, at: Instant) {
        self.set.insert((at, slot as u32));
    }

    /// Cancels the timer of `slot` set for `at`.
    pub(crate) fn cancel(&mut self, slot: Slot, at: Instant) {
        self.set.remove(&(at, slot as u32));
    }

    /// Moves the timer of `slot` from `from` to `to`.
    pub(crate) fn reset(&mut self, slot: Slot, from: Instant, to: Instant) {
        self.cancel(slot, from);
        self.set(slot, to);
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.set.first().map(|&(at, _)| at)
    }

    /// Takes the earliest timer if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Slot> {
        let &(at, slot) = self.set.first()?;
        if at > now {
            return None;
        }
        self.set.pop_first();
        Some(slot as Slot)
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
        t.set(9, Instant::from_micros(ms(20).as_micros() + 1)); // 20.001 ms
        t.set(4, ms(40));
        t.cancel(4, ms(40));
        assert_eq!(t.len(), 3);
        assert_eq!(t.next(), Some(ms(10)));
        assert_eq!(t.pop_due(ms(9)), None);
        assert_eq!(t.pop_due(ms(10)), Some(3));
        assert_eq!(t.pop_due(ms(20)), None, "20.001 ms is not due at 20 ms");
        assert_eq!(t.pop_due(Instant::from_micros(ms(20).as_micros() + 1)), Some(9));
        t.reset(7, ms(30), ms(50));
        assert_eq!(t.pop_due(ms(45)), None);
        assert_eq!(t.pop_due(ms(50)), Some(7));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn deadlines_decades_apart_keep_their_order_and_their_time() {
        let mut t = Timers::default();
        let early = Instant::from_micros(1_000_000);
        let late = Instant::from_micros(4_000_000_000_000_000); // about 2096
        t.set(1, late);
        t.set(2, early);
        assert_eq!(t.next(), Some(early));
        assert_eq!(t.pop_due(early), Some(2));
        assert_eq!(t.pop_due(Instant::from_micros(late.as_micros() - 1)), None);
        assert_eq!(t.pop_due(late), Some(1));
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
