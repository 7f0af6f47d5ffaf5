//! Stream positions and inspection: where each payload byte sits in its direction's stream, and
//! which of those bytes a flow filter is shown.
//!
//! Offsets follow TCP sequence numbers once the SYN was seen (a retransmission is not shown twice,
//! an overlapping one only for its new bytes, a gap moves the offset past it); other protocols
//! count datagram payloads. A direction in [`Mode::Inspect`] shows the part of new bytes inside
//! its window to the product filter, whose answer may move the window, allow, drop or pause; a
//! rule's own inspect window ends in an allow once filled or once the direction ends.
//!
//! This room reads and moves stream positions and calls the filter's `data`/`data_complete`.

use super::Engine;
use super::entry::{Entry, Mode, bits};
use super::table::Slot;
use crate::event::UpdateSource;
use crate::flow::Direction;
use crate::packet::ParsedPacket;
use crate::time::Instant;
use crate::verdict::DataVerdict;

/// Places a packet's payload in its direction's stream and moves the stream on. Returns the
/// stream offset of the first new byte and the new bytes, or `None` when everything in it was
/// seen before (a retransmission). Gaps (lost or reordered segments) move the offset past them.
pub(super) fn advance<'p>(e: &mut Entry, dir: Direction, p: &ParsedPacket<'p>) -> Option<(u64, &'p [u8])> {
    let mut payload = p.payload;
    let offset = e.offset(dir);
    let start = match (p.tcp.is_some(), e.next_seq(dir)) {
        (true, Some(next)) => {
            let delta = p.seq.wrapping_sub(next) as i32;
            if delta < 0 {
                let seen = delta.unsigned_abs() as usize;
                if seen >= payload.len() {
                    return None;
                }
                payload = &payload[seen..];
                offset
            } else {
                offset + delta as u64
            }
        }
        _ => offset,
    };
    e.set_offset(dir, start + payload.len() as u64);
    if p.tcp.is_some() {
        e.set_next_seq(dir, p.seq.wrapping_add(p.payload.len() as u32));
    }
    Some((start, payload))
}

/// A data verdict as the mode of the direction it was given for, at stream offset `offset`.
pub(super) fn mode_of(v: DataVerdict, offset: u64) -> Mode {
    match v {
        DataVerdict::Allow | DataVerdict::Pass { peek: 0, .. } => Mode::Allow,
        DataVerdict::Drop => Mode::Drop,
        DataVerdict::Pause => Mode::Pause,
        DataVerdict::Pass { pass, peek } => {
            let pass_end = offset + u64::from(pass);
            Mode::Inspect { pass_end, peek_end: pass_end + u64::from(peek) }
        }
    }
}

impl Engine {
    /// What a flow whose provider faulted gets: the fail mode's verdict.
    fn fail_verdict(&self) -> DataVerdict {
        if self.config.fail_open { DataVerdict::Allow } else { DataVerdict::Drop }
    }

    /// Shows the part of new payload (starting at stream offset `start`) that lies in the
    /// direction's peek window.
    pub(super) fn inspect(&mut self, slot: Slot, now: Instant, dir: Direction, start: u64, payload: &[u8]) {
        let Some(e) = self.table.get(slot) else { return };
        let Mode::Inspect { pass_end, peek_end } = e.mode(dir) else {
            return;
        };
        let end = start + payload.len() as u64;
        let (from, to) = (start.max(pass_end), end.min(peek_end));
        if e.has(bits::FILTER_INSPECTS) {
            if from < to {
                let shown = &payload[(from - start) as usize..(to - start) as usize];
                let flow = e.flow(&self.interfaces);
                let verdict = match self.call_filter("data", flow.id, |f| f.data(&flow, dir, from, shown)) {
                    Some(Ok(v)) => v,
                    Some(Err(())) => self.fail_verdict(),
                    None => DataVerdict::Allow,
                };
                self.apply_data(slot, now, dir, verdict, to);
            }
        } else if end >= peek_end {
            // A rule's inspect window is full and nothing objected: the direction is allowed.
            self.apply_side(slot, now, dir, Mode::Allow, UpdateSource::Peek);
        }
    }

    /// Direction `dir` ended (FIN) while it may be under inspection.
    pub(super) fn complete(&mut self, slot: Slot, now: Instant, dir: Direction) {
        let Some(e) = self.table.get(slot) else { return };
        let Mode::Inspect { .. } = e.mode(dir) else { return };
        if e.has(bits::FILTER_INSPECTS) {
            let flow = e.flow(&self.interfaces);
            let offset = e.offset(dir);
            let verdict = match self.call_filter("data_complete", flow.id, |f| f.data_complete(&flow, dir)) {
                Some(Ok(v)) => v,
                Some(Err(())) => self.fail_verdict(),
                None => DataVerdict::Allow,
            };
            self.apply_data(slot, now, dir, verdict, offset);
        } else {
            self.apply_side(slot, now, dir, Mode::Allow, UpdateSource::Peek);
        }
    }
}
