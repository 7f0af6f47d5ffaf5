//! One network table of the compiled matcher: every (network, port) that rules of one side of a
//! flow (remote or local) and one address family are filed under, in a single open-addressed hash
//! table keyed by the network's address, its prefix length and a port (or "any port").
//!
//! This is a tuple-space index: a lookup masks the address once per prefix length present and
//! probes the table for that length with the flow's port and with "any port". The cost is one
//! or two probes per distinct prefix length (at most 33 for IPv4, 129 for IPv6), whatever the
//! number of rules or how densely they cover an address: fifty rules on fifty ports under the
//! prefixes of one address cost what one does. Each key holds
//! its rules' indexes in order, inline when there is one (the usual case, and no second memory
//! access), else in one shared flat array. A key also carries a small check word per rule (see
//! the matcher) so that most candidates are accepted or rejected without touching the rule.
//!
//! The table knows nothing of rules beyond their index and check word; it touches nothing else.

use std::net::Ipv6Addr;

/// The port key of entries that hold for any port (and for flows without ports).
const ANY_PORT: u32 = 1 << 16;
const LEN_SHIFT: u32 = 17;
/// The low bits of a slot's `meta` are its key (port key and prefix length), the high bits the
/// check word of the rule it holds inline.
const KEY_MASK: u32 = (1 << CHECK_SHIFT) - 1;
const CHECK_SHIFT: u32 = 25;
/// No key has every port-key bit set, so an unused slot can never compare equal to a key.
const EMPTY: u32 = u32::MAX;
/// A slot value with this bit set is an offset into `lists`, else a rule index.
const LIST: u32 = 1 << 31;

/// The largest rule index a table can hold, and the most entries all tables together may hold
/// (so every list offset fits beside the `LIST` bit). The matcher stops indexing there.
pub(super) const MAX_RULE: u32 = LIST - 1;
pub(super) const MAX_ENTRIES: usize = (LIST - 1) as usize;

/// An address family's address as a table key.
pub(super) trait Addr: Copy + Ord + Default {
    /// The address with every bit below the prefix length cleared.
    fn masked(self, len: u8) -> Self;
    /// Where the key (this masked address and a port key with prefix length) starts probing.
    fn hash(self, key: u32) -> u64;
}

/// Fibonacci hashing's multiplier: odd, with its bits spread evenly.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Spreads every input bit over the high bits of the result, which pick the slot.
fn mix(x: u64) -> u64 {
    let x = x.wrapping_mul(GOLDEN);
    (x ^ (x >> 32)).wrapping_mul(GOLDEN)
}

impl Addr for u32 {
    fn masked(self, len: u8) -> Self {
        self & u32::MAX.checked_shl(32u32.saturating_sub(u32::from(len))).unwrap_or(0)
    }

    fn hash(self, key: u32) -> u64 {
        mix((u64::from(self) << 32) | u64::from(key))
    }
}

/// An IPv6 address as two halves: 8-byte alignment keeps a table slot at 24 bytes (a `u128`
/// would make it 32).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct V6 {
    hi: u64,
    lo: u64,
}

impl From<Ipv6Addr> for V6 {
    fn from(a: Ipv6Addr) -> Self {
        let bits = u128::from(a);
        V6 { hi: (bits >> 64) as u64, lo: bits as u64 }
    }
}

impl Addr for V6 {
    fn masked(self, len: u8) -> Self {
        let bits = (u128::from(self.hi) << 64) | u128::from(self.lo);
        let bits = bits & u128::MAX.checked_shl(128u32.saturating_sub(u32::from(len))).unwrap_or(0);
        V6 { hi: (bits >> 64) as u64, lo: bits as u64 }
    }

    fn hash(self, key: u32) -> u64 {
        mix(self.hi ^ mix(self.lo ^ (u64::from(key) << 32)))
    }
}

#[derive(Copy, Clone, Debug)]
struct Slot<A> {
    addr: A,
    /// Key in the low bits, check word of an inline rule in the high bits; `EMPTY` if unused.
    meta: u32,
    /// A rule index, or `LIST | offset` of a list header in `lists`.
    value: u32,
}

/// A list header (`rule` is the length of the list that follows) or one rule of a list.
#[derive(Copy, Clone, Debug)]
struct Entry {
    rule: u32,
    check: u32,
}

/// A prefix length present in the table, with the lowest rule index filed under it with a port
/// key and with "any port" (`u32::MAX` when there is none of that kind): a lookup skips a probe
/// that could only find rules later than the best match so far.
#[derive(Copy, Clone, Debug)]
struct Len {
    len: u8,
    port_min: u32,
    any_min: u32,
}

/// Probes one lookup starts together: two (a port key and "any port") per prefix length.
const BATCH: usize = 8;

/// One probe of a lookup: its key, the slot it starts at and that slot's `meta` as first read.
#[derive(Copy, Clone, Debug)]
struct Probe<A> {
    addr: A,
    key: u32,
    slot: usize,
    meta: u32,
}

/// A built table; see the module doc.
#[derive(Debug)]
pub(super) struct Table<A> {
    slots: Box<[Slot<A>]>,
    lists: Box<[Entry]>,
    /// Ascending.
    lens: Box<[Len]>,
}

impl<A: Addr> Table<A> {
    /// Offers `accept` the rules filed under a network containing `addr` with `port` (when the
    /// flow has ports) or with any port, each key's rules in order, skipping rules at or after
    /// `best`, and lowers `best` to the rules it accepts: `best` ends as the first rule that
    /// `accept` takes among this table's candidates and the `best` it was given.
    pub(super) fn lookup(&self, addr: A, port: Option<u16>, best: &mut u32, accept: &impl Fn(u32, u8) -> bool) {
        for lens in self.lens.chunks(BATCH / 2) {
            // The probes of different prefix lengths are independent: load each one's first
            // slot before looking at any, so that a lookup in a table too big for the caches
            // waits for its misses together rather than one after another.
            let mut probes = [Probe { addr, key: 0, slot: 0, meta: EMPTY }; BATCH];
            let mut count = 0;
            for l in lens {
                let addr = addr.masked(l.len);
                let len_key = u32::from(l.len) << LEN_SHIFT;
                if let Some(p) = port
                    && l.port_min < *best
                {
                    probes[count] = self.start(addr, len_key | u32::from(p));
                    count += 1;
                }
                if l.any_min < *best {
                    probes[count] = self.start(addr, len_key | ANY_PORT);
                    count += 1;
                }
            }
            for probe in &probes[..count] {
                self.visit(probe, best, accept);
            }
        }
    }

    fn start(&self, addr: A, key: u32) -> Probe<A> {
        let slot = slot_of(addr.hash(key), self.slots.len());
        Probe { addr, key, slot, meta: self.slots.get(slot).map_or(EMPTY, |s| s.meta) }
    }

    fn visit(&self, probe: &Probe<A>, best: &mut u32, accept: &impl Fn(u32, u8) -> bool) {
        if probe.meta == EMPTY {
            return;
        }
        let Some(slot) = self.find(probe) else {
            return;
        };
        if slot.value & LIST == 0 {
            let rule = slot.value;
            if rule < *best && accept(rule, (slot.meta >> CHECK_SHIFT) as u8) {
                *best = rule;
            }
            return;
        }
        let start = (slot.value & !LIST) as usize + 1;
        let len = self.lists.get(start - 1).map_or(0, |h| h.rule as usize);
        for e in self.lists.get(start..start + len).unwrap_or_default() {
            if e.rule >= *best {
                return;
            }
            if accept(e.rule, e.check as u8) {
                *best = e.rule;
                return;
            }
        }
    }

    fn find(&self, probe: &Probe<A>) -> Option<&Slot<A>> {
        let n = self.slots.len();
        let mut i = probe.slot;
        // Terminates: a built table always has unused slots (at most half are used).
        loop {
            let slot = self.slots.get(i)?;
            if slot.meta == EMPTY {
                return None;
            }
            if slot.addr == probe.addr && slot.meta & KEY_MASK == probe.key {
                return Some(slot);
            }
            i = if i + 1 == n { 0 } else { i + 1 };
        }
    }

    /// Heap bytes the table holds.
    pub(super) fn heap_bytes(&self) -> usize {
        size_of_val(&*self.slots) + size_of_val(&*self.lists) + size_of_val(&*self.lens)
    }
}

/// `hash` scaled to `0..n` by its high bits (a multiply, no division; `n` need not be a power
/// of two, so the table can be sized to its load).
fn slot_of(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

/// Collects a table's entries, then builds it once.
#[derive(Debug)]
pub(super) struct TableBuilder<A> {
    /// Masked address, key, rule index, check word.
    entries: Vec<(A, u32, u32, u8)>,
}

impl<A: Addr> Default for TableBuilder<A> {
    fn default() -> Self {
        TableBuilder { entries: Vec::new() }
    }
}

impl<A: Addr> TableBuilder<A> {
    /// Files `rule` (at most `MAX_RULE`) under the network `addr/len` and `port`, or any port.
    /// `check` is 7 bits.
    pub(super) fn push(&mut self, addr: A, len: u8, port: Option<u16>, rule: u32, check: u8) {
        let key = (u32::from(len) << LEN_SHIFT) | port.map_or(ANY_PORT, u32::from);
        self.entries.push((addr.masked(len), key, rule, check));
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn build(mut self) -> Table<A> {
        // Sorted by key, then rule: each key's rules come out in order.
        self.entries.sort_unstable();
        self.entries.dedup_by_key(|e| (e.0, e.1, e.2));
        let keys = self.entries.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)).count();
        // Half full at most: short probe runs, and every probe run ends at an unused slot.
        let n = if keys == 0 { 0 } else { keys * 2 };
        let mut slots = vec![Slot { addr: A::default(), meta: EMPTY, value: 0 }; n].into_boxed_slice();
        let mut lists = Vec::new();
        let mut lens: Vec<Len> = (0..=128).map(|len| Len { len, port_min: u32::MAX, any_min: u32::MAX }).collect();
        for group in self.entries.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (addr, key, first, check) = group[0];
            let slot = if let [_] = group {
                Slot { addr, meta: key | (u32::from(check) << CHECK_SHIFT), value: first }
            } else {
                // Below `LIST`: the matcher keeps the entry count under `MAX_ENTRIES`.
                let offset = lists.len() as u32;
                lists.push(Entry { rule: group.len() as u32, check: 0 });
                lists.extend(group.iter().map(|&(_, _, rule, check)| Entry { rule, check: u32::from(check) }));
                Slot { addr, meta: key, value: LIST | offset }
            };
            let mut i = slot_of(addr.hash(key), n);
            while slots[i].meta != EMPTY {
                i = if i + 1 == n { 0 } else { i + 1 };
            }
            slots[i] = slot;
            if let Some(l) = lens.get_mut((key >> LEN_SHIFT) as usize) {
                let min = if key & ANY_PORT == 0 { &mut l.port_min } else { &mut l.any_min };
                *min = (*min).min(first);
            }
        }
        lens.retain(|l| l.port_min != u32::MAX || l.any_min != u32::MAX);
        Table { slots, lists: lists.into_boxed_slice(), lens: lens.into_boxed_slice() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_found<A: Addr>(t: &Table<A>, addr: A, port: Option<u16>) -> Vec<u32> {
        // Accept nothing, so every candidate is offered: what the table files under `addr`.
        let seen = std::cell::RefCell::new(Vec::new());
        let mut best = u32::MAX;
        t.lookup(addr, port, &mut best, &|r, _| {
            seen.borrow_mut().push(r);
            false
        });
        let mut v = seen.into_inner();
        v.sort_unstable();
        v
    }

    #[test]
    fn masks_keys_and_lists() {
        let mut b = TableBuilder::<u32>::default();
        b.push(0xc000_0200, 24, Some(80), 7, 1); // 192.0.2.0/24 port 80
        b.push(0xc000_02ff, 24, Some(80), 3, 1); // host bits are cleared: same key, a list
        b.push(0xc000_0207, 32, None, 9, 1);
        b.push(0, 0, None, 11, 1);
        let t = b.build();
        assert_eq!(rules_found(&t, 0xc000_0207, Some(80)), [3, 7, 9, 11]);
        assert_eq!(rules_found(&t, 0xc000_0207, Some(81)), [9, 11]);
        assert_eq!(rules_found(&t, 0xc000_0207, None), [9, 11]);
        assert_eq!(rules_found(&t, 0xc000_0301, Some(80)), [11]);
        // The first accepted rule wins, and later ones are not offered.
        let mut best = u32::MAX;
        t.lookup(0xc000_0207, Some(80), &mut best, &|r, _| r >= 7);
        assert_eq!(best, 7);
    }

    /// The mean and the longest distance of a key from the slot its probe starts at.
    fn displacement<A: Addr>(t: &Table<A>) -> (f64, usize) {
        let n = t.slots.len();
        let (mut sum, mut count, mut longest) = (0, 0, 0);
        for (i, s) in t.slots.iter().enumerate().filter(|(_, s)| s.meta != EMPTY) {
            let d = (i + n - slot_of(s.addr.hash(s.meta & KEY_MASK), n)) % n;
            (sum, count, longest) = (sum + d, count + 1, longest.max(d));
        }
        (sum as f64 / count as f64, longest)
    }

    #[test]
    fn regular_keys_spread_over_the_table() {
        // Address blocks, one port, and one address on many ports: the shapes of real rule sets,
        // which a weak hash would pile into long runs.
        let mut v4 = TableBuilder::<u32>::default();
        let mut v6 = TableBuilder::<V6>::default();
        for i in 0..20_000u32 {
            v4.push(0x0a00_0000 + i, 32, Some(443), i, 1);
            v4.push(0xc000_0200, 32, Some(i as u16), i, 1);
            v4.push(0x0a00_0000 + (i << 8), 24, None, i, 1);
            v6.push(V6 { hi: 0x2001_0db8_0000_0000 + u64::from(i), lo: 0 }, 64, Some(443), i, 1);
            v6.push(V6 { hi: 0x2001_0db8_0000_0000, lo: u64::from(i) }, 128, None, i, 1);
        }
        let (v4, v6) = (v4.build(), v6.build());
        // Linear probing at half load with a uniform hash: a mean of 0.5 slots, and a longest
        // distance of a few dozen among 60,000 keys.
        for (mean, longest) in [displacement(&v4), displacement(&v6)] {
            assert!(mean < 0.75 && longest < 64, "mean {mean}, longest {longest}");
        }
        assert_eq!(rules_found(&v4, 0x0a00_0107, Some(443)), [1, 263]);
    }

    #[test]
    fn ipv6_masks() {
        let a = V6::from("2001:db8:1:2::5".parse::<Ipv6Addr>().expect("addr"));
        assert_eq!(a.masked(48), V6::from("2001:db8:1::".parse::<Ipv6Addr>().expect("addr")));
        assert_eq!(a.masked(0), V6::default());
        assert_eq!(a.masked(128), a);
        assert_eq!(0xffff_ffffu32.masked(0), 0);
        assert_eq!(0xffff_ffffu32.masked(32), 0xffff_ffff);
        assert_eq!(0xffff_ffffu32.masked(31), 0xffff_fffe);
    }
}
