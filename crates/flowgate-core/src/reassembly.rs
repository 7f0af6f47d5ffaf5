//! Stream reassembly: one direction's bytes under inspection, put in stream order within a
//! bounded span, whatever order the segments carrying them arrive in.
//!
//! This room only places bytes by stream offset and says what each insert did; it knows nothing of
//! TCP (the caller maps sequence numbers to `u64` offsets, so there is no wrap-around here), of
//! packets or of flows. The engine keeps one [`Reassembler`] per inspected direction, shows
//! [`Reassembler::contiguous`] to sniffers and filters after every insert, and forgets bytes once
//! they are judged.
//!
//! **Evasion.** Two segments may carry different bytes for the same offsets, and the receiver
//! may keep either copy; a filter that judged one while the receiver read the other would be
//! fooled. So an insert whose bytes differ from bytes already stored is refused whole and
//! reported ([`Insert::conflict`]): the first copy stays, and the caller decides (drop the flow,
//! typically). Identical overlaps (retransmissions) are fine.
//!
//! **Memory bound.** Bytes are kept only in `[start(), start() + limit())`. The buffer is one
//! `Vec` of at most `limit` bytes, grown as data arrives (never past `limit`), in which byte `i`
//! is stream offset `start() + i`, so [`Reassembler::contiguous`] is a slice of it, with no copy.
//! Stored bytes are tracked as a sorted list of disjoint ranges, merged on insert. The range
//! that begins at `start()` (the contiguous prefix) is always accepted, and so is any segment
//! that touches a range already stored; beyond the prefix at most [`MAX_ISLANDS`] separate
//! ranges ("islands") are kept, and a segment that would open one more is refused
//! ([`Insert::refused`]) — a sender of thousands of one-byte segments with gaps cannot grow the
//! list, and the in-order stream never stalls on the cap. So [`Reassembler::heap_bytes`] never
//! exceeds `limit + BOOKKEEPING_BYTES`. [`Reassembler::forget_before`] moves the kept bytes to
//! the front of the buffer (a copy of at most `limit` bytes), so the buffer never wraps.

use std::mem::size_of;

/// Separate ranges kept beyond the contiguous prefix; a segment that would open another is
/// refused.
pub const MAX_ISLANDS: usize = 64;

/// Most heap bytes the range list takes: the prefix and [`MAX_ISLANDS`] islands.
pub const BOOKKEEPING_BYTES: usize = (MAX_ISLANDS + 1) * size_of::<(u64, u64)>();

/// One direction's bytes under inspection, placed by stream offset as segments arrive in any
/// order, within a bounded span.
#[derive(Clone, Debug)]
pub struct Reassembler {
    start: u64,
    limit: usize,
    /// Byte `i` is stream offset `start + i`; as long as the highest byte stored, zero in gaps.
    buf: Vec<u8>,
    /// Stored bytes, as `[from, to)` stream offsets: sorted, disjoint, never adjacent (merged),
    /// all inside `[start, start + limit)`.
    ranges: Vec<(u64, u64)>,
    /// Bytes stored now (the ranges' total length).
    stored: usize,
}

/// What one insert did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Insert {
    /// Bytes stored that were not there before.
    pub stored: usize,
    /// Some byte overlapped a stored byte with a different value (evasion: the receiver may keep
    /// either). Nothing of this insert was stored.
    pub conflict: bool,
    /// Some bytes lay at or past `start + limit` and were not stored.
    pub beyond: bool,
    /// The bytes would have opened a separate range past the [`MAX_ISLANDS`] already kept:
    /// nothing of this insert was stored.
    pub refused: bool,
}

impl Reassembler {
    /// Keeps bytes from stream offset `start` up to (not including) `start + limit`. Allocates
    /// nothing until bytes arrive.
    pub fn new(start: u64, limit: usize) -> Self {
        Reassembler { start, limit, buf: Vec::new(), ranges: Vec::new(), stored: 0 }
    }

    /// Places `bytes` at stream offset `offset`. Bytes before `start()` are ignored (not compared:
    /// they were forgotten). Overlap with identical bytes is fine (retransmission). On conflict
    /// nothing of this insert is stored (the first copy stays) and `conflict` is set; bytes at or
    /// past `start() + limit()` are not stored and set `beyond`; a segment that would open one
    /// separate range too many is not stored and sets `refused`.
    pub fn insert(&mut self, offset: u64, bytes: &[u8]) -> Insert {
        let mut out = Insert::default();
        let span_end = self.span_end();
        let len = bytes.len() as u64;
        // Past u64::MAX is past any span too.
        let end = offset.checked_add(len);
        out.beyond = len > 0 && end.is_none_or(|e| e > span_end);
        let a = offset.max(self.start);
        let b = end.unwrap_or(u64::MAX).min(span_end);
        if a >= b {
            return out;
        }
        // a >= offset and b - offset <= len, so both fit in usize and the range is inside `bytes`.
        let Some(piece) = bytes.get((a - offset) as usize..(b - offset) as usize) else {
            return out;
        };
        // Ranges that touch [a, b) (overlap or adjacent): first..last.
        let first = self.ranges.partition_point(|&(_, to)| to < a);
        let last = first + self.ranges[first..].partition_point(|&(from, _)| from <= b);
        let mut old = 0usize;
        for &(from, to) in &self.ranges[first..last] {
            let (lo, hi) = (from.max(a), to.min(b));
            if lo >= hi {
                continue;
            }
            let stored = self.buf.get(self.index(lo)..self.index(hi));
            let offered = piece.get((lo - a) as usize..(hi - a) as usize);
            if stored != offered {
                out.conflict = true;
                return out;
            }
            old += (hi - lo) as usize;
        }
        if first == last && a != self.start && self.islands() >= MAX_ISLANDS {
            out.refused = true;
            return out;
        }
        self.grow_to(self.index(b));
        let (i, j) = (self.index(a), self.index(b));
        if let Some(dst) = self.buf.get_mut(i..j) {
            dst.copy_from_slice(piece);
        }
        let merged = match (self.ranges.get(first), last.checked_sub(1).and_then(|l| self.ranges.get(l))) {
            (Some(f), Some(l)) if first < last => (f.0.min(a), l.1.max(b)),
            _ => (a, b),
        };
        if first == last {
            if self.ranges.len() == self.ranges.capacity() {
                // Exact growth keeps the list inside BOOKKEEPING_BYTES.
                let want = (self.ranges.capacity() * 2).clamp(4, MAX_ISLANDS + 1);
                self.ranges.reserve_exact(want.saturating_sub(self.ranges.len()));
            }
            self.ranges.insert(first, merged);
        } else {
            self.ranges[first] = merged;
            self.ranges.drain(first + 1..last);
        }
        out.stored = piece.len() - old;
        self.stored += out.stored;
        out
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Stream offset just past the bytes stored contiguously from `start()`.
    pub fn contiguous_end(&self) -> u64 {
        match self.ranges.first() {
            Some(&(from, to)) if from == self.start => to,
            _ => self.start,
        }
    }

    /// The bytes `[start(), contiguous_end())`, without a copy.
    pub fn contiguous(&self) -> &[u8] {
        let n = self.index(self.contiguous_end());
        self.buf.get(..n).unwrap_or(&[])
    }

    /// Whether every byte of `[from, to)` is stored (or lies before `start()`).
    pub fn has(&self, from: u64, to: u64) -> bool {
        let from = from.max(self.start);
        if from >= to {
            return true;
        }
        let i = self.ranges.partition_point(|&(_, end)| end <= from);
        self.ranges.get(i).is_some_and(|&(a, b)| a <= from && to <= b)
    }

    /// Forgets bytes before `offset` (start moves there; never backwards); the span end moves with
    /// it (`start + limit`). Copies the bytes still kept to the front of the buffer.
    pub fn forget_before(&mut self, offset: u64) {
        if offset <= self.start {
            return;
        }
        let gone = offset - self.start;
        if gone >= self.buf.len() as u64 {
            self.buf.clear();
        } else {
            self.buf.drain(..gone as usize);
        }
        self.start = offset;
        let dropped = self.ranges.partition_point(|&(_, to)| to <= offset);
        for &(from, to) in &self.ranges[..dropped] {
            self.stored -= (to - from) as usize;
        }
        self.ranges.drain(..dropped);
        if let Some(r) = self.ranges.first_mut()
            && r.0 < offset
        {
            self.stored -= (offset - r.0) as usize;
            r.0 = offset;
        }
    }

    /// Bytes stored now.
    pub fn buffered(&self) -> usize {
        self.stored
    }

    /// Heap bytes held: the buffer's and the range list's allocations; at most
    /// `limit() + BOOKKEEPING_BYTES`.
    pub fn heap_bytes(&self) -> usize {
        self.buf.capacity() + self.ranges.capacity() * size_of::<(u64, u64)>()
    }

    fn span_end(&self) -> u64 {
        self.start.saturating_add(self.limit as u64)
    }

    /// Index in `buf` of stream offset `at` (at least `start`, at most the span end: it fits).
    fn index(&self, at: u64) -> usize {
        at.saturating_sub(self.start) as usize
    }

    /// Separate ranges past the contiguous prefix.
    fn islands(&self) -> usize {
        match self.ranges.first() {
            Some(&(from, _)) if from == self.start => self.ranges.len() - 1,
            _ => self.ranges.len(),
        }
    }

    /// Makes the buffer at least `len` bytes long (`len <= limit`), doubling its allocation up to
    /// `limit` so that in-order data is not copied over and over.
    fn grow_to(&mut self, len: usize) {
        if len <= self.buf.len() {
            return;
        }
        if len > self.buf.capacity() {
            let target = len.max(self.buf.capacity().saturating_mul(2)).min(self.limit).max(len);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.resize(len, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i + 1));
            }
        }
    }

    fn message(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Cuts `[0, n)` into segments of 1 to `max` bytes.
    fn cuts(rng: &mut Rng, n: usize, max: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < n {
            let len = (1 + rng.below(max)).min(n - at);
            out.push((at, at + len));
            at += len;
        }
        out
    }

    fn feed(r: &mut Reassembler, base: u64, msg: &[u8], segs: &[(usize, usize)]) -> usize {
        segs.iter().map(|&(a, b)| r.insert(base + a as u64, &msg[a..b]).stored).sum()
    }

    #[test]
    fn in_order_and_reversed() {
        let msg = message(1000);
        let mut rng = Rng(1);
        let segs = cuts(&mut rng, msg.len(), 50);
        let mut r = Reassembler::new(100, 4096);
        assert_eq!(r.heap_bytes(), 0, "nothing allocated before data");
        assert_eq!(feed(&mut r, 100, &msg, &segs), 1000);
        assert_eq!(r.contiguous(), &msg[..]);
        assert_eq!(r.contiguous_end(), 1100);
        let mut rev = segs.clone();
        rev.reverse();
        let mut r = Reassembler::new(100, 4096);
        for (k, &(a, b)) in rev.iter().enumerate() {
            let ins = r.insert(100 + a as u64, &msg[a..b]);
            assert_eq!(ins, Insert { stored: b - a, ..Insert::default() });
            // Nothing is contiguous until the first segment arrives, last.
            assert_eq!(r.contiguous().is_empty(), k + 1 < rev.len());
        }
        assert_eq!(r.contiguous(), &msg[..]);
        assert_eq!(r.buffered(), 1000);
    }

    #[test]
    fn random_permutations_of_one_byte_and_random_segments() {
        let msg = message(700);
        for seed in 1..40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let max = if seed % 2 == 0 { 1 } else { 1 + rng.below(90) };
            let mut segs = cuts(&mut rng, msg.len(), max);
            rng.shuffle(&mut segs);
            let mut r = Reassembler::new(5, 700);
            let mut refused = 0;
            for &(a, b) in &segs {
                let ins = r.insert(5 + a as u64, &msg[a..b]);
                assert!(!ins.conflict && !ins.beyond, "seed {seed}: {ins:?}");
                refused += usize::from(ins.refused);
                assert!(r.heap_bytes() <= 700 + BOOKKEEPING_BYTES);
                assert_eq!(r.contiguous(), &msg[..(r.contiguous_end() - 5) as usize]);
            }
            // One-byte segments in random order open more islands than are kept; the sender
            // retransmits from the first byte not acknowledged, in order, and that is never refused.
            segs.sort_unstable();
            for &(a, b) in &segs {
                let ins = r.insert(5 + a as u64, &msg[a..b]);
                assert!(!ins.refused && !ins.conflict, "seed {seed}: in order: {ins:?}");
            }
            assert_eq!(r.contiguous(), &msg[..], "seed {seed}");
            assert_eq!(r.buffered(), msg.len());
            if max == 1 {
                assert!(refused > 0, "seed {seed}: 700 one-byte segments in random order reach the cap");
            }
        }
    }

    #[test]
    fn retransmissions_and_identical_overlaps_store_only_new_bytes() {
        let msg = message(100);
        let mut r = Reassembler::new(0, 100);
        assert_eq!(r.insert(10, &msg[10..30]).stored, 20);
        assert_eq!(r.insert(10, &msg[10..30]), Insert::default(), "a retransmission stores nothing");
        assert_eq!(r.insert(5, &msg[5..40]).stored, 15, "covering: only the new bytes count");
        assert_eq!(r.insert(35, &msg[35..50]).stored, 10, "right edge");
        assert_eq!(r.insert(0, &msg[0..8]).stored, 5, "left edge");
        assert_eq!(r.contiguous(), &msg[..50]);
        assert!(r.has(0, 50) && !r.has(0, 51) && r.has(20, 20));
    }

    #[test]
    fn conflicting_overlaps_keep_the_first_copy_in_every_geometry() {
        let msg = message(100);
        // (offset, len) of the second insert against a stored [20, 40).
        for (name, at, len) in
            [("inside", 25, 5), ("covering", 10, 40), ("left edge", 15, 10), ("right edge", 35, 10), ("same", 20, 20)]
        {
            let mut r = Reassembler::new(0, 100);
            r.insert(20, &msg[20..40]);
            let mut evil = msg[at..at + len].to_vec();
            // Differ in one byte inside the overlap only.
            let overlap_byte = 20usize.max(at) - at;
            evil[overlap_byte] ^= 0xff;
            let ins = r.insert(at as u64, &evil);
            assert_eq!(ins, Insert { conflict: true, ..Insert::default() }, "{name}");
            assert_eq!(r.buffered(), 20, "{name}: nothing of the conflicting insert is stored");
            assert!(r.has(20, 40), "{name}");
            assert!(at >= 20 || !r.has(at as u64, 20), "{name}: its bytes before the overlap are not stored either");
            r.insert(0, &msg[..20]);
            assert_eq!(r.contiguous(), &msg[..40], "{name}: the first copy stays");
            assert!(!r.has(40, 41), "{name}");
        }
    }

    #[test]
    fn bytes_past_the_span_and_before_start() {
        let msg = message(100);
        let mut r = Reassembler::new(10, 50);
        let ins = r.insert(40, &msg[40..80]);
        assert_eq!(ins, Insert { stored: 20, beyond: true, ..Insert::default() });
        assert_eq!(r.insert(60, &msg[60..61]), Insert { beyond: true, ..Insert::default() });
        assert_eq!(r.insert(59, &msg[59..60]), Insert::default(), "the last byte of the span is kept already");
        // Bytes before start are ignored, even when they differ: they were forgotten.
        let mut early = msg[0..15].to_vec();
        early[0] ^= 1;
        assert_eq!(r.insert(0, &early).stored, 5);
        assert_eq!(r.contiguous(), &msg[10..15]);
        assert_eq!(r.insert(0, &msg[0..10]), Insert::default());
        assert_eq!(r.insert(u64::MAX - 1, &[1, 2, 3]), Insert { beyond: true, ..Insert::default() });
        assert_eq!(r.insert(70, &[]), Insert::default(), "no bytes, nothing beyond");
        assert!(r.heap_bytes() <= 50 + BOOKKEEPING_BYTES);
        let mut zero = Reassembler::new(0, 0);
        assert_eq!(zero.insert(0, b"x"), Insert { beyond: true, ..Insert::default() });
        assert_eq!(zero.heap_bytes(), 0);
    }

    #[test]
    fn forget_before_moves_the_span() {
        let msg = message(200);
        let mut r = Reassembler::new(0, 100);
        r.insert(0, &msg[0..60]);
        r.insert(70, &msg[70..100]);
        assert!(r.insert(100, &msg[100..110]).beyond);
        r.forget_before(50);
        assert_eq!((r.start(), r.contiguous_end(), r.buffered()), (50, 60, 40));
        assert_eq!(r.contiguous(), &msg[50..60]);
        assert!(r.has(0, 60) && r.has(70, 100) && !r.has(60, 61));
        // The span end moved with it.
        assert_eq!(r.insert(100, &msg[100..150]), Insert { stored: 50, ..Insert::default() });
        r.forget_before(20);
        assert_eq!(r.start(), 50, "never backwards");
        r.insert(60, &msg[60..70]);
        assert_eq!(r.contiguous(), &msg[50..150]);
        // Into a gap: nothing contiguous until the gap fills.
        r.forget_before(160);
        assert_eq!((r.buffered(), r.contiguous_end(), r.contiguous()), (0, 160, &[][..]));
        r.insert(165, &msg[165..170]);
        r.forget_before(167);
        assert_eq!((r.buffered(), r.contiguous()), (3, &msg[167..170]));
        assert!(r.heap_bytes() <= 100 + BOOKKEEPING_BYTES);
    }

    #[test]
    fn the_island_cap_bounds_the_range_list_and_never_stalls_the_stream() {
        let mut r = Reassembler::new(0, 100_000);
        // Thousands of one-byte segments with gaps.
        let mut refused = 0;
        for k in 0..5000u64 {
            let ins = r.insert(10 + 2 * k, &[k as u8]);
            refused += usize::from(ins.refused);
            assert!(ins.refused == (k >= MAX_ISLANDS as u64), "segment {k}: {ins:?}");
        }
        assert_eq!(refused, 5000 - MAX_ISLANDS);
        assert_eq!(r.buffered(), MAX_ISLANDS);
        assert!(r.heap_bytes() <= 100_000 + BOOKKEEPING_BYTES);
        assert!(r.ranges.capacity() <= MAX_ISLANDS + 1);
        // A segment touching an island is taken (it grows the island, not the list).
        assert_eq!(r.insert(11, &[0]).stored, 1);
        // The stream from start is always taken, and grows into the islands.
        let ins = r.insert(0, &[0; 10]);
        assert_eq!(ins.stored, 10);
        assert_eq!(r.contiguous_end(), 13);
        // The two merges (10 with 12, the prefix with 10) freed two places.
        assert!(!r.insert(50_000, &[1]).refused);
        assert!(!r.insert(50_002, &[1]).refused);
        assert!(r.insert(60_000, &[1]).refused);
    }

    /// The reference: one `Option<u8>` per stream offset.
    struct Model {
        start: u64,
        limit: usize,
        bytes: Vec<Option<u8>>,
    }

    impl Model {
        fn insert(&mut self, offset: u64, data: &[u8]) -> Insert {
            let mut out = Insert::default();
            let span_end = self.start + self.limit as u64;
            out.beyond = !data.is_empty() && offset + data.len() as u64 > span_end;
            let kept: Vec<(u64, u8)> = data
                .iter()
                .enumerate()
                .map(|(i, &b)| (offset + i as u64, b))
                .filter(|&(o, _)| o >= self.start && o < span_end)
                .collect();
            let Some(&(a, _)) = kept.first() else { return out };
            let b = kept.last().map_or(a, |l| l.0 + 1);
            if kept.iter().any(|&(o, v)| self.bytes[o as usize].is_some_and(|s| s != v)) {
                out.conflict = true;
                return out;
            }
            let lo = a.saturating_sub(1).max(self.start);
            let hi = (b + 1).min(span_end);
            let touches = (lo..hi).any(|o| self.bytes[o as usize].is_some());
            if !touches && a != self.start && self.islands() >= MAX_ISLANDS {
                out.refused = true;
                return out;
            }
            for (o, v) in kept {
                let slot = &mut self.bytes[o as usize];
                if slot.is_none() {
                    out.stored += 1;
                }
                *slot = Some(v);
            }
            out
        }

        fn islands(&self) -> usize {
            let span = &self.bytes[self.start as usize..];
            let runs = span.iter().enumerate().filter(|&(i, b)| b.is_some() && (i == 0 || span[i - 1].is_none()));
            runs.filter(|&(i, _)| i != 0).count()
        }

        fn contiguous(&self) -> Vec<u8> {
            self.bytes[self.start as usize..].iter().map_while(|b| *b).collect()
        }
    }

    #[test]
    fn behaves_like_the_model() {
        // How often each outcome came up: the inputs must reach every path.
        let (mut conflicts, mut beyond, mut refused, mut at_start_with_full_list) = (0, 0, 0, 0);
        for seed in 1..120u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
            let start = rng.below(50) as u64;
            let limit = rng.below(600);
            let total = 2000usize;
            let mut r = Reassembler::new(start, limit);
            let mut m = Model { start, limit, bytes: vec![None; total + 1000] };
            for step in 0..300 {
                if rng.below(40) == 0 {
                    let to = (m.start + rng.below(60) as u64).min(total as u64);
                    r.forget_before(to);
                    if to > m.start {
                        for b in &mut m.bytes[..to as usize] {
                            *b = None;
                        }
                        m.start = to;
                    }
                    continue;
                }
                let (offset, len) = if seed % 3 == 0 {
                    // Islands: single bytes at every other offset, now and then the stream's next
                    // bytes from start.
                    if rng.below(10) == 0 {
                        (m.start, 1 + rng.below(4))
                    } else {
                        ((m.start as usize + 1 + 2 * rng.below(limit / 2 + 10)).min(total) as u64, 1)
                    }
                } else {
                    let max = if rng.below(3) == 0 { 2 } else { 60 };
                    ((m.start as usize + rng.below(limit + 40)).saturating_sub(20).min(total) as u64, rng.below(max))
                };
                // Mostly the "true" stream byte, sometimes a different one.
                let data: Vec<u8> = (0..len)
                    .map(|i| {
                        let o = offset + i as u64;
                        if rng.below(40) == 0 { 0xee } else { (o * 31 % 251) as u8 }
                    })
                    .collect();
                if offset == m.start && !data.is_empty() && m.islands() == MAX_ISLANDS {
                    at_start_with_full_list += 1;
                }
                let want = m.insert(offset, &data);
                let got = r.insert(offset, &data);
                conflicts += usize::from(want.conflict);
                beyond += usize::from(want.beyond);
                refused += usize::from(want.refused);
                assert_eq!(got, want, "seed {seed} step {step}: insert {offset}+{len}");
                assert_eq!(r.contiguous(), &m.contiguous()[..], "seed {seed} step {step}");
                assert_eq!(r.buffered(), m.bytes.iter().filter(|b| b.is_some()).count());
                assert!(r.heap_bytes() <= limit + BOOKKEEPING_BYTES);
                let (a, b) = (rng.below(total) as u64, rng.below(total) as u64);
                let model_has = (a.max(m.start)..b).all(|o| m.bytes[o as usize].is_some());
                assert_eq!(r.has(a, b), model_has, "seed {seed} step {step}: has({a}, {b})");
            }
        }
        assert!(
            conflicts > 100 && beyond > 100 && refused > 100 && at_start_with_full_list > 0,
            "{conflicts} conflicts, {beyond} beyond, {refused} refused, {at_start_with_full_list} at start with a full list"
        );
    }
}
