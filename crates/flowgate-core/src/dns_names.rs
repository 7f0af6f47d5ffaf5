//! Names learned from DNS answers: address → the name an answer gave it, until the answer's TTL
//! runs out, shared by every engine (one per queue) without a lock.
//!
//! This room keeps that table and nothing else: answers come in parsed ([`Message`], from
//! [`crate::sniff::dns`]), time comes in as an argument, and it reads no clock. An engine that
//! sees a DNS response calls [`DnsNames::learn`]; when a flow starts it asks
//! [`DnsNames::lookup`] for the remote address, so a flow to an address a client just resolved
//! gets the name it asked for (source `dns`), even where no SNI or Host header says it.
//!
//! ## Shape
//!
//! A fixed number of slots, two ways per set: an address hashes (SipHash with keys drawn when
//! the table is made, so no one can aim many addresses at one set) to a pair of slots and lives
//! in one of them. A new answer for an address replaces that address's entry; otherwise it takes
//! an empty or expired slot of the pair, else the one that expires first: a newer answer may
//! evict an older one, and the table never grows. Each slot is an `arc-swap` cell holding an
//! immutable entry (address, name, expiry), so readers load an entry whole (never a name torn
//! from another address's entry), and neither readers nor writers take a lock: engines on
//! different threads write while others read. Two writers racing for the same pair may
//! overwrite each other's fresh entry; a name is then lost early, which only costs a flow its
//! DNS-learned name, as an eviction would.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`) are kept and looked up as their IPv4
//! address.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use crate::sniff::dns::Message;
use crate::time::Instant;

/// What a slot holds: immutable once made.
#[derive(Debug)]
struct Entry {
    address: IpAddr,
    name: Arc<str>,
    /// Valid while `now < expires`.
    expires: Instant,
    learned: Instant,
}

/// Address → the name a DNS answer gave it, until the answer's TTL runs out. Bounded (a fixed
/// number of slots; a newer answer may evict an older one), lock-free for readers and writers;
/// `Send + Sync`, shared behind an `Arc`.
pub struct DnsNames {
    slots: Box<[ArcSwapOption<Entry>]>,
    hasher: RandomState,
    occupied: AtomicUsize,
}

impl DnsNames {
    /// A table of `capacity` slots (rounded up to an even number, at least 2). Each slot costs
    /// a pointer, and an entry about 80 bytes plus its name while it holds one.
    pub fn new(capacity: usize) -> Self {
        let slots = capacity.max(2).next_multiple_of(2);
        DnsNames {
            slots: (0..slots).map(|_| ArcSwapOption::empty()).collect(),
            hasher: RandomState::new(),
            occupied: AtomicUsize::new(0),
        }
    }

    /// Learns the addresses of `message` (a response: [`Message::resolved`]) under the
    /// question's name, valid until `now` + TTL. Answers mapping a name to a loopback or
    /// unspecified address (0.0.0.0, ::, 127/8, ::1, also IPv4-mapped: what sinkholes answer)
    /// are ignored: they never label other flows; so are TTLs of 0 (the answer may not be
    /// kept). Returns how many addresses were learnt.
    pub fn learn(&self, message: &Message, now: Instant) -> usize {
        let Some(question) = &message.question else {
            return 0;
        };
        let resolved = message.resolved();
        if resolved.is_empty() {
            return 0;
        }
        let name: Arc<str> = Arc::from(question.name.as_str());
        resolved.into_iter().filter(|&(address, ttl)| self.put(&name, address, ttl, now)).count()
    }

    /// Learns one address for `name` (as [`crate::sniff::host_name`] gives it), valid until
    /// `now` + `ttl` seconds; ignored for loopback and unspecified addresses and a TTL of 0, as
    /// in [`DnsNames::learn`].
    pub fn learn_one(&self, name: &str, addr: IpAddr, ttl: u32, now: Instant) {
        self.put(&Arc::from(name), addr, ttl, now);
    }

    /// The name for `addr`, if an answer gave one that has not expired at `now`. If both slots
    /// of its pair hold it (two writers raced), the later answer's name.
    pub fn lookup(&self, addr: IpAddr, now: Instant) -> Option<Arc<str>> {
        let address = addr.to_canonical();
        let (a, b) = self.pair(address);
        let (a, b) = (a.load(), b.load());
        let live = |e: &Option<Arc<Entry>>| e.as_ref().filter(|e| e.address == address && now < e.expires).cloned();
        match (live(&a), live(&b)) {
            (Some(x), Some(y)) => Some(if y.learned > x.learned { y.name.clone() } else { x.name.clone() }),
            (Some(x), None) | (None, Some(x)) => Some(x.name.clone()),
            (None, None) => None,
        }
    }

    /// Slots holding an entry: approximate, as it counts entries that have expired but not yet
    /// been replaced (the table reads no clock of its own to sweep them).
    pub fn len(&self) -> usize {
        self.occupied.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The two slots `address` may live in.
    fn pair(&self, address: IpAddr) -> (&ArcSwapOption<Entry>, &ArcSwapOption<Entry>) {
        let pairs = self.slots.len() / 2;
        let first = (self.hasher.hash_one(address) % pairs as u64) as usize * 2;
        match self.slots.get(first..first + 2) {
            Some([a, b]) => (a, b),
            // `first + 1 < slots.len()` always holds; this arm only keeps indexing out.
            _ => (&self.slots[0], &self.slots[1]),
        }
    }

    fn put(&self, name: &Arc<str>, addr: IpAddr, ttl: u32, now: Instant) -> bool {
        let address = addr.to_canonical();
        if ttl == 0 || address.is_loopback() || address.is_unspecified() {
            return false;
        }
        let entry = Arc::new(Entry {
            address,
            name: name.clone(),
            expires: now + Duration::from_secs(u64::from(ttl)),
            learned: now,
        });
        let (a, b) = self.pair(address);
        let slot = {
            let (held_a, held_b) = (a.load(), b.load());
            let expired = |e: &Arc<Entry>| e.expires <= now;
            match (held_a.as_ref(), held_b.as_ref()) {
                (Some(x), _) if x.address == address => a,
                (_, Some(y)) if y.address == address => b,
                (None, _) => a,
                (_, None) => b,
                (Some(x), _) if expired(x) => a,
                (_, Some(y)) if expired(y) => b,
                (Some(x), Some(y)) => {
                    if x.expires <= y.expires {
                        a
                    } else {
                        b
                    }
                }
            }
        };
        if slot.swap(Some(entry)).is_none() {
            self.occupied.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

impl std::fmt::Debug for DnsNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsNames").field("capacity", &self.capacity()).field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::Sniff;
    use crate::sniff::dns::tests::{fixtures, name, response};
    use crate::sniff::dns::{self, TYPE_A, TYPE_AAAA};

    fn parsed(bytes: &[u8]) -> Message {
        match dns::message(bytes) {
            Sniff::Found(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const T0: Instant = Instant::from_micros(1_000_000_000);

    #[test]
    fn an_answer_names_its_address_until_its_ttl_runs_out() {
        let names = DnsNames::new(64);
        assert_eq!(names.learn(&parsed(fixtures::A), T0), 1);
        assert_eq!(names.learn(&parsed(fixtures::AAAA), T0), 1);
        let at = |secs: u64, micros: u64| T0 + Duration::from_secs(secs) + Duration::from_micros(micros);
        assert_eq!(names.lookup(ip("198.51.100.7"), at(299, 999_999)).as_deref(), Some("a.example"));
        assert_eq!(names.lookup(ip("198.51.100.7"), at(300, 0)), None, "TTL 300 ends at 300 s");
        assert_eq!(names.lookup(ip("2001:db8::7"), at(1, 0)).as_deref(), Some("a.example"));
        assert_eq!(names.lookup(ip("192.0.2.1"), T0), None);
        assert_eq!(names.len(), 2);
    }

    #[test]
    fn a_cname_chain_names_the_address_after_the_name_asked() {
        let names = DnsNames::new(64);
        assert_eq!(names.learn(&parsed(fixtures::CNAME2_AAAA), T0), 1);
        assert_eq!(names.lookup(ip("2001:db8::7"), T0).as_deref(), Some("cdn.b.example"));
        assert_eq!(
            names.lookup(ip("2001:db8::7"), T0 + Duration::from_secs(60)),
            None,
            "the chain's smallest TTL (60, the www.a.example CNAME) holds"
        );
        assert_eq!(names.learn(&parsed(fixtures::CNAME_A), T0), 1);
        assert_eq!(names.lookup(ip("198.51.100.7"), T0).as_deref(), Some("www.a.example"));
        names.learn(&parsed(fixtures::A), T0 + Duration::from_secs(1));
        assert_eq!(names.lookup(ip("198.51.100.7"), T0 + Duration::from_secs(2)).as_deref(), Some("a.example"));
    }

    #[test]
    fn sinkhole_answers_queries_and_ttl_zero_are_not_learnt() {
        let names = DnsNames::new(64);
        assert_eq!(names.learn(&parsed(fixtures::SINK_A), T0), 0);
        assert_eq!(names.learn(&parsed(fixtures::SINK_AAAA), T0), 0);
        assert_eq!(names.learn(&parsed(fixtures::QUERY_A), T0), 0);
        assert_eq!(names.learn(&parsed(fixtures::NXDOMAIN), T0), 0);
        let loopbacks = response(
            "evil.example",
            TYPE_AAAA,
            &[
                ("evil.example", TYPE_A, 60, vec![127, 0, 0, 1]),
                ("evil.example", TYPE_A, 60, vec![127, 9, 9, 9]),
                ("evil.example", TYPE_AAAA, 60, ip_bytes("::1")),
                ("evil.example", TYPE_AAAA, 60, ip_bytes("::ffff:127.0.0.1")),
                ("evil.example", TYPE_AAAA, 60, ip_bytes("::ffff:0.0.0.0")),
                ("evil.example", TYPE_A, 0, vec![192, 0, 2, 5]),
            ],
        );
        assert_eq!(parsed(&loopbacks).resolved().len(), 6);
        assert_eq!(names.learn(&parsed(&loopbacks), T0), 0);
        names.learn_one("x.example", ip("127.0.0.1"), 60, T0);
        names.learn_one("x.example", ip("::"), 60, T0);
        assert!(names.is_empty());
        for a in ["0.0.0.0", "::", "127.0.0.1", "127.9.9.9", "::1", "192.0.2.5"] {
            assert_eq!(names.lookup(ip(a), T0), None, "{a}");
        }
    }

    fn ip_bytes(s: &str) -> Vec<u8> {
        match ip(s) {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        let names = DnsNames::new(8);
        names.learn_one("m.example", ip("::ffff:192.0.2.9"), 30, T0);
        assert_eq!(names.lookup(ip("192.0.2.9"), T0).as_deref(), Some("m.example"));
        names.learn_one("n.example", ip("192.0.2.9"), 30, T0);
        assert_eq!(names.lookup(ip("::ffff:192.0.2.9"), T0).as_deref(), Some("n.example"));
        assert_eq!(names.len(), 1, "one entry for both spellings");
    }

    #[test]
    fn the_table_stays_bounded_and_the_newest_answer_stays() {
        let names = DnsNames::new(7);
        assert_eq!(names.capacity(), 8);
        for i in 0..1000u32 {
            let address = IpAddr::V4((0xc633_6400u32 + i).into());
            names.learn_one(&format!("h{i}.example"), address, 600, T0 + Duration::from_millis(u64::from(i)));
            assert_eq!(names.lookup(address, T0 + Duration::from_secs(1)).as_deref(), Some(&*format!("h{i}.example")));
            assert!(names.len() <= 8);
        }
        assert_eq!(names.len(), 8);
        let found =
            (0..1000u32).filter(|i| names.lookup(IpAddr::V4((0xc633_6400u32 + i).into()), T0).is_some()).count();
        assert!(found <= 8, "{found} names kept in 8 slots");

        // An expired entry is replaced before a live one.
        let names = DnsNames::new(2);
        names.learn_one("short.example", ip("192.0.2.1"), 1, T0);
        names.learn_one("long.example", ip("192.0.2.2"), 100, T0);
        names.learn_one("new.example", ip("192.0.2.3"), 100, T0 + Duration::from_secs(5));
        let later = T0 + Duration::from_secs(6);
        assert_eq!(names.lookup(ip("192.0.2.2"), later).as_deref(), Some("long.example"));
        assert_eq!(names.lookup(ip("192.0.2.3"), later).as_deref(), Some("new.example"));
    }

    #[test]
    fn threads_reading_and_writing_never_see_a_name_learnt_for_another_address() {
        let names = Arc::new(DnsNames::new(16));
        let addresses = 64u32;
        let workers: Vec<_> = (0..4u32)
            .map(|t| {
                let names = names.clone();
                std::thread::spawn(move || {
                    let mut state = 0x9e37_79b9u32.wrapping_mul(t + 1);
                    let mut seen = 0u32;
                    for round in 0..20_000u32 {
                        state ^= state << 13;
                        state ^= state >> 17;
                        state ^= state << 5;
                        let j = state % addresses;
                        let address = IpAddr::V4((0xc000_0200u32 + j).into());
                        let now = T0 + Duration::from_micros(u64::from(round));
                        if (state >> 16) & 1 == 0 {
                            names.learn_one(&format!("t{t}-r{round}-a{j}.example"), address, 5, now);
                        } else if let Some(name) = names.lookup(address, now) {
                            seen += 1;
                            assert!(name.ends_with(&format!("-a{j}.example")), "{name} for address {j}");
                        }
                    }
                    seen
                })
            })
            .collect();
        let seen: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(seen > 0, "the readers found names");
        assert!(names.len() <= 16);
    }

    #[test]
    fn a_cname_without_addresses_teaches_nothing() {
        let names = DnsNames::new(16);
        let m = parsed(&response("q.example", TYPE_A, &[("q.example", dns::TYPE_CNAME, 9, name("r.example"))]));
        assert_eq!(names.learn(&m, T0), 0, "a CNAME without addresses teaches nothing");
    }
}
