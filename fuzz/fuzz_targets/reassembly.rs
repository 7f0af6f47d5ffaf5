//! `flowgate_core::reassembly::Reassembler` next to a model written from its documentation: one
//! `Option<u8>` per stream offset.
//!
//! Input: the span (`start`: one of a few bases, 0, 2^32 or 3000 below `u64::MAX` so that the
//! span end saturates and offsets overflow, plus 0 to 63; `limit`: 0 to 4096), then up to 400
//! operations of five bytes each: a kind byte, an offset (0 to 8191 past the base), a length (0
//! to 255) and a fill byte. Kinds: insert bytes that are the stream's own (a function of the
//! offset) or the fill byte (so overlaps are identical or conflicting), `forget_before`, `has`.
//!
//! Checked after every operation, against the model: each insert's outcome (`stored`,
//! `conflict` exactly when a byte differs from a stored one, `beyond`, `refused` exactly when
//! the segment touches no stored byte, does not start at `start` and 64 islands are kept), the
//! contiguous bytes, `contiguous_end`, `buffered`, every `has`, `start`; and
//! `heap_bytes <= limit + BOOKKEEPING_BYTES`.
#![no_main]

use flowgate_core::reassembly::{BOOKKEEPING_BYTES, Insert, MAX_ISLANDS, Reassembler};
use flowgate_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// Offsets an operation reaches past the base: its offset, a 255-byte segment, the span.
const REACH: usize = 8192 + 64 + 256 + 4097;

struct Model {
    base: u64,
    start: u64,
    limit: usize,
    /// Byte `i` is offset `base + i`.
    bytes: Vec<Option<u8>>,
    stored: usize,
}

impl Model {
    fn at(&self, o: u64) -> Option<u8> {
        o.checked_sub(self.base).and_then(|i| self.bytes.get(i as usize).copied().flatten())
    }

    fn span_end(&self) -> u64 {
        self.start.saturating_add(self.limit as u64)
    }

    fn insert(&mut self, offset: u64, data: &[u8]) -> Insert {
        let mut out = Insert::default();
        let span_end = self.span_end();
        out.beyond = data.iter().enumerate().any(|(i, _)| offset.checked_add(i as u64).is_none_or(|o| o >= span_end));
        let kept: Vec<(u64, u8)> = data
            .iter()
            .enumerate()
            .filter_map(|(i, &b)| offset.checked_add(i as u64).map(|o| (o, b)))
            .filter(|&(o, _)| o >= self.start && o < span_end)
            .collect();
        let (Some(&(a, _)), Some(&(last, _))) = (kept.first(), kept.last()) else { return out };
        if kept.iter().any(|&(o, v)| self.at(o).is_some_and(|s| s != v)) {
            out.conflict = true;
            return out;
        }
        let touches = (a.saturating_sub(1).max(self.start)..=last.saturating_add(1).min(span_end.saturating_sub(1)))
            .any(|o| self.at(o).is_some());
        if !touches && a != self.start && self.islands() >= MAX_ISLANDS {
            out.refused = true;
            return out;
        }
        for (o, v) in kept {
            let slot = &mut self.bytes[(o - self.base) as usize];
            out.stored += usize::from(slot.is_none());
            *slot = Some(v);
        }
        self.stored += out.stored;
        out
    }

    fn forget_before(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        for o in self.start..offset.min(self.span_end()) {
            let slot = &mut self.bytes[(o - self.base) as usize];
            self.stored -= usize::from(slot.is_some());
            *slot = None;
        }
        self.start = offset;
    }

    /// The model's bytes of the span (nothing is stored outside it).
    fn span(&self) -> &[Option<u8>] {
        let from = (self.start - self.base) as usize;
        let to = (self.span_end() - self.base).min(REACH as u64) as usize;
        self.bytes.get(from..to).unwrap_or(&[])
    }

    /// Runs of stored bytes past the one at `start`.
    fn islands(&self) -> usize {
        let span = self.span();
        (1..span.len()).filter(|&i| span[i].is_some() && span[i - 1].is_none()).count()
    }

    fn contiguous(&self) -> Vec<u8> {
        self.span().iter().map_while(|b| *b).collect()
    }

    fn has(&self, from: u64, to: u64) -> bool {
        (from.max(self.start)..to).all(|o| self.at(o).is_some())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let base = [0, 1 << 32, u64::MAX - 3000][usize::from(input.u8() % 3)];
    let start = base + u64::from(input.u8() % 64);
    let limit = usize::from(input.u16()) % 4097;
    let mut r = Reassembler::new(start, limit);
    let mut m = Model { base, start, limit, bytes: vec![None; REACH], stored: 0 };
    let mut ops = 0;
    while !input.is_empty() && ops < 400 {
        ops += 1;
        let kind = input.u8();
        let rel = u64::from(input.u16() % 8192);
        let len = usize::from(input.u8());
        let fill = input.u8();
        let Some(offset) = base.checked_add(rel) else { continue };
        match kind % 8 {
            0..=5 => {
                // The stream's own bytes, or a constant: overlaps are identical or conflicting.
                let own = kind & 0x10 == 0;
                let bytes: Vec<u8> =
                    (0..len as u64).map(|i| if own { (offset.wrapping_add(i) % 251) as u8 } else { fill }).collect();
                let want = m.insert(offset, &bytes);
                let got = r.insert(offset, &bytes);
                assert_eq!(got, want, "insert {len} bytes at {offset} (start {}, limit {limit})", m.start);
            }
            6 => {
                r.forget_before(offset);
                m.forget_before(offset);
            }
            _ => {
                let to = offset.saturating_add(len as u64);
                assert_eq!(r.has(offset, to), m.has(offset, to), "has({offset}, {to})");
            }
        }
        assert_eq!(r.start(), m.start);
        assert_eq!(r.limit(), limit);
        let want = m.contiguous();
        assert_eq!(r.contiguous(), &want[..], "contiguous bytes");
        assert_eq!(r.contiguous_end(), m.start + want.len() as u64);
        assert_eq!(r.buffered(), m.stored);
        assert!(r.heap_bytes() <= limit + BOOKKEEPING_BYTES, "{} heap bytes, limit {limit}", r.heap_bytes());
    }
});
