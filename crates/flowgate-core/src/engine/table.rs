//! The flow table: live flows in a slab, found by 5-tuple or by id, and the interface names
//! they share.
//!
//! Entries live in a slab addressed by slot. Two `hashbrown::HashTable`s of bare `u32` slots index
//! them: by direction-free [`FlowKey`] (hashed with std's SipHash and random keys, so a remote
//! peer cannot choose 5-tuples that collide) and by [`FlowId`]. The tables hold no keys of their
//! own: equality is checked against the entry in the slab, which keeps the index at a few bytes
//! per flow. `high` remembers one past the highest slot ever used, so sweeps can walk the slots
//! in order across several calls; a slot keeps its flow for the flow's whole life. Everything is
//! sized for the cap at creation, so no insert ever stops to grow the table.
//!
//! [`Interfaces`] interns interface names with a count of the flows that use each one: a name no
//! live flow uses any more is forgotten at once, so tunnel and container interfaces that come
//! and go do not pile up.
//!
//! This room knows nothing of rules, verdicts or time.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;
use slab::Slab;

use super::entry::Entry;
use crate::flow::{FlowId, FlowKey};

/// Slot of a flow in the table; valid until that flow is removed.
pub(crate) type Slot = usize;

/// The most slots a table can have (indexes and timers hold slots as `u32`; the cap keeps a
/// table a few gigabytes at most).
pub(crate) const MAX_SLOTS: usize = (1 << 24) - 1;

/// Live flows and their two indexes.
pub(crate) struct FlowTable {
    entries: Slab<Entry>,
    by_key: HashTable<u32>,
    by_id: HashTable<u32>,
    hasher: RandomState,
    cap: usize,
    high: usize,
}

/// The table is at its cap; the flow was not added.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TableFull;

/// Ids are handed out by the engine, not chosen by peers: a fast mix (SplitMix64's finaliser)
/// spreads the evenly spaced ids of one engine over all buckets.
fn id_hash(id: FlowId) -> u64 {
    let mut z = id.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FlowTable {
    /// A table for at most `cap` flows, allocated for all of them at once: growing a table of a
    /// million flows would copy and rehash it all inside one packet's judgement. The slab's
    /// untouched pages cost address space, not memory; the indexes' control bytes (about one byte
    /// per flow) are written at once.
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.min(MAX_SLOTS);
        FlowTable {
            entries: Slab::with_capacity(cap),
            by_key: HashTable::with_capacity(cap),
            by_id: HashTable::with_capacity(cap),
            hasher: RandomState::new(),
            cap,
            high: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_full(&self) -> bool {
        self.entries.len() >= self.cap
    }

    /// One past the highest slot that ever held a flow.
    pub(crate) fn high(&self) -> usize {
        self.high
    }

    fn key_hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(crate) fn lookup(&self, key: &FlowKey) -> Option<Slot> {
        let entries = &self.entries;
        self.by_key
            .find(self.key_hash(key), |&s| entries.get(s as usize).is_some_and(|e| e.key() == *key))
            .map(|&s| s as usize)
    }

    pub(crate) fn slot_of(&self, id: FlowId) -> Option<Slot> {
        let entries = &self.entries;
        self.by_id.find(id_hash(id), |&s| entries.get(s as usize).is_some_and(|e| e.id == id)).map(|&s| s as usize)
    }

    pub(crate) fn insert(&mut self, entry: Entry) -> Result<Slot, TableFull> {
        if self.is_full() {
            return Err(TableFull);
        }
        let (kh, ih) = (self.key_hash(&entry.key()), id_hash(entry.id));
        let slot = self.entries.insert(entry);
        self.high = self.high.max(slot + 1);
        let entries = &self.entries;
        let hasher = &self.hasher;
        self.by_key
            .insert_unique(kh, slot as u32, |&s| entries.get(s as usize).map_or(0, |e| hasher.hash_one(e.key())));
        self.by_id.insert_unique(ih, slot as u32, |&s| entries.get(s as usize).map_or(0, |e| id_hash(e.id)));
        Ok(slot)
    }

    pub(crate) fn get(&self, slot: Slot) -> Option<&Entry> {
        self.entries.get(slot)
    }

    pub(crate) fn get_mut(&mut self, slot: Slot) -> Option<&mut Entry> {
        self.entries.get_mut(slot)
    }

    pub(crate) fn remove(&mut self, slot: Slot) -> Option<Entry> {
        let e = self.entries.get(slot)?;
        let (kh, ih) = (self.key_hash(&e.key()), id_hash(e.id));
        if let Ok(found) = self.by_key.find_entry(kh, |&s| s as usize == slot) {
            found.remove();
        }
        if let Ok(found) = self.by_id.find_entry(ih, |&s| s as usize == slot) {
            found.remove();
        }
        self.entries.try_remove(slot)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Slot, &Entry)> + '_ {
        self.entries.iter()
    }
}

/// Interned interface names, counted by the flows that use them. Index 0 means "unknown".
#[derive(Debug, Default)]
pub(crate) struct Interfaces {
    names: Vec<(Option<Arc<str>>, u32)>,
    by_name: HashMap<Arc<str>, u16>,
    free: Vec<u16>,
}

impl Interfaces {
    /// The index for `name`, counting one more user. 0 (unknown) when 65,535 names are in use.
    pub(crate) fn acquire(&mut self, name: Option<&str>) -> u16 {
        let Some(name) = name else { return 0 };
        if let Some(&i) = self.by_name.get(name) {
            self.names[usize::from(i) - 1].1 += 1;
            return i;
        }
        let name: Arc<str> = name.into();
        let i = match self.free.pop() {
            Some(i) => {
                self.names[usize::from(i) - 1] = (Some(name.clone()), 1);
                i
            }
            None => {
                let Ok(i) = u16::try_from(self.names.len() + 1) else { return 0 };
                self.names.push((Some(name.clone()), 1));
                i
            }
        };
        self.by_name.insert(name, i);
        i
    }

    /// One user of `index` is gone; the name is forgotten with its last user.
    pub(crate) fn release(&mut self, index: u16) {
        let Some(slot) = usize::from(index).checked_sub(1).and_then(|i| self.names.get_mut(i)) else { return };
        slot.1 = slot.1.saturating_sub(1);
        if slot.1 == 0
            && let Some(name) = slot.0.take()
        {
            self.by_name.remove(&name);
            self.free.push(index);
        }
    }

    pub(crate) fn get(&self, index: u16) -> Option<&Arc<str>> {
        usize::from(index).checked_sub(1).and_then(|i| self.names.get(i)).and_then(|(n, _)| n.as_ref())
    }

    /// Names currently interned.
    pub(crate) fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::entry::tests::entry;

    #[test]
    fn indexes_by_key_and_id_and_enforces_the_cap() {
        let mut t = FlowTable::new(2);
        let (e1, e2, e3) = (
            entry(1, "192.0.2.1:1", "192.0.2.2:2"),
            entry(2, "192.0.2.1:1", "192.0.2.2:3"),
            entry(3, "192.0.2.1:1", "192.0.2.2:4"),
        );
        let (k1, k3) = (e1.key(), e3.key());
        let s1 = t.insert(e1).expect("room");
        t.insert(e2).expect("room");
        assert_eq!(t.insert(e3).err(), Some(TableFull));
        assert_eq!(t.lookup(&k1), Some(s1));
        assert_eq!(t.slot_of(FlowId(1)), Some(s1));
        assert_eq!(t.remove(s1).map(|e| e.id), Some(FlowId(1)));
        assert_eq!(t.lookup(&k1), None);
        assert_eq!(t.slot_of(FlowId(1)), None);
        let s3 = t.insert(entry(3, "192.0.2.1:1", "192.0.2.2:4")).expect("room again");
        assert_eq!(t.lookup(&k3), Some(s3));
        assert_eq!(t.len(), 2);
        assert_eq!(t.high(), 2, "a freed slot is reused before a new one");
    }

    #[test]
    fn many_flows_in_and_out_keep_both_indexes_exact() {
        let mut t = FlowTable::new(100_000);
        let mut live = Vec::new();
        for i in 0..20_000u64 {
            let e = entry(i + 1, &format!("198.51.100.1:{}", 1 + i % 60_000), &format!("203.0.113.{}:443", i / 60_000));
            live.push((e.key(), FlowId(i + 1), t.insert(e).expect("room")));
        }
        for (k, id, s) in live.iter().step_by(2) {
            assert_eq!(t.remove(*s).map(|e| (e.key(), e.id)), Some((*k, *id)));
        }
        for (n, (k, id, s)) in live.iter().enumerate() {
            let want = if n % 2 == 0 { None } else { Some(*s) };
            assert_eq!((t.lookup(k), t.slot_of(*id)), (want, want), "flow {id}");
        }
        assert_eq!(t.len(), 10_000);
    }

    #[test]
    fn interface_names_are_shared_and_forgotten_with_their_last_flow() {
        let mut i = Interfaces::default();
        assert_eq!(i.acquire(None), 0);
        let a = i.acquire(Some("tun0"));
        let b = i.acquire(Some("tun0"));
        let c = i.acquire(Some("eth0"));
        assert_eq!((a, a == b, a != c), (1, true, true));
        assert_eq!(i.get(a).map(|n| &**n), Some("tun0"));
        i.release(a);
        assert_eq!(i.len(), 2, "tun0 still has a user");
        i.release(b);
        assert_eq!(i.len(), 1, "tun0 is forgotten with its last user");
        assert_eq!(i.get(a), None);
        let d = i.acquire(Some("tun1"));
        assert_eq!(d, a, "the freed index is reused");
        i.release(0);
        i.release(999);
    }
}
