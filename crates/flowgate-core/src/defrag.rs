//! IP defragmentation: IPv4 and IPv6 fragments put back together into whole datagrams, within
//! bounds, refusing fragments that overlap with different bytes.
//!
//! Live, the kernel (conntrack's defragmentation) hands NFQUEUE whole datagrams, so the engine
//! never needs this; a capture holds the fragments as they were on the wire, and `flowgate
//! replay` passes its packets through a [`Defragmenter`] before the engine, so that a fragmented
//! datagram is judged once, whole, at the time of its last fragment. This room reads IP headers
//! and copies bytes; it keeps no clock (time is an argument) and touches nothing else.
//!
//! **What is put together.** IPv4 fragments by (source, destination, protocol, identification):
//! the header of the fragment at offset 0 (options included; other fragments' options are not
//! kept) becomes the datagram's, with MF cleared, offset 0, total length and header checksum
//! computed afresh. IPv6 fragments by (source, destination, identification): the unfragmentable
//! part (the IPv6 header and the extension headers before the Fragment header) of the fragment
//! at offset 0 becomes the datagram's, the Fragment header is removed, the next-header field that
//! named it takes the Fragment header's next header, and the payload length is computed afresh.
//!
//! **Evasion.** Overlapping fragments may carry different bytes, and hosts differ in which copy
//! they keep; a filter that judged one copy while the receiver kept the other would be fooled.
//! IPv4 overlaps with identical bytes are accepted (fragments get duplicated on the way), any
//! differing byte refuses the datagram. IPv6 follows RFC 5722 (any overlap abandons the
//! datagram), except that a fragment whose bytes are all stored already with the same values (a
//! duplicate, which RFC 8200 allows to drop quietly) changes nothing. A non-last fragment whose
//! length is not a multiple of 8, a datagram past 65,535 bytes, a last fragment with another
//! end than an earlier one, and data past the end are refused too. A refused datagram is
//! remembered (without its bytes) until its timeout, and its later fragments are refused.
//!
//! **Bounds.** At most [`DefragLimits::max_datagrams`] datagrams are remembered (being put
//! together or refused), and the fragments' buffers (bytes, the headers kept, the list of
//! ranges received) take at most [`DefragLimits::max_bytes`] in all; a fragment that would go
//! past either is not kept ([`Defrag::Overflow`]). Datagrams are forgotten
//! [`DefragLimits::timeout`] after their first fragment.
//!
//! **Why not `etherparse::defrag`.** etherparse 0.21 has an `IpDefragPool`, but it keeps the
//! last copy of overlapping bytes without telling (the evasion above goes unseen), has no bound
//! on memory (its documentation says so), and returns the payload without the headers. Headers
//! are read here with etherparse's slices (`Ipv4HeaderSlice`, `Ipv6HeaderSlice`, the extension
//! header slices); the IPv6 header chain is walked by hand only up to the Fragment header,
//! because etherparse's `Ipv6ExtensionsSlice` goes on past it and refuses a non-first fragment
//! whose fragmentable part starts with an extension header.

use std::collections::HashMap;
use std::time::Duration;

use etherparse::checksum::Sum16BitWords;
use etherparse::{
    IpAuthHeaderSlice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, ip_number,
};

use crate::Instant;

/// How much a [`Defragmenter`] keeps, and for how long.
#[derive(Copy, Clone, Debug)]
pub struct DefragLimits {
    /// Datagrams remembered at once (being put together, or refused until their timeout).
    pub max_datagrams: usize,
    /// Heap bytes of all fragments' buffers together.
    pub max_bytes: usize,
    /// How long after its first fragment a datagram is forgotten.
    pub timeout: Duration,
}

impl Default for DefragLimits {
    /// 1024 datagrams, 4 MiB, 30 s (Linux's `ipfrag_time` default for IPv4).
    fn default() -> Self {
        DefragLimits { max_datagrams: 1024, max_bytes: 4 << 20, timeout: Duration::from_secs(30) }
    }
}

/// What became of one packet given to [`Defragmenter::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Defrag {
    /// Not a fragment: use the packet as it is.
    NotFragment,
    /// Kept; the datagram is not whole yet.
    Incomplete,
    /// The last missing piece arrived: the whole datagram as one unfragmented IP packet.
    Complete(Vec<u8>),
    /// Overlapping fragments with different bytes (an evasion attempt), or fragments that cannot
    /// be put together (a fragment past 65,535 bytes, a second last fragment with another end,
    /// IPv6 overlapping at all per RFC 5722): the datagram is dropped, and later fragments of it
    /// too until it times out.
    Refused,
    /// Over the limits: this fragment is not kept.
    Overflow,
}

/// What a [`Defragmenter`] has done so far.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DefragStats {
    /// Datagrams put together ([`Defrag::Complete`]).
    pub completed: u64,
    /// Datagrams refused (each counted once, however many of its fragments come after).
    pub refused: u64,
    /// Datagrams forgotten incomplete at their timeout.
    pub expired: u64,
    /// Fragments not kept because of the limits ([`Defrag::Overflow`]).
    pub overflow: u64,
}

/// Puts IP fragments back together; see the module documentation.
#[derive(Debug)]
pub struct Defragmenter {
    limits: DefragLimits,
    /// Keys are chosen by whoever sends the fragments: std's `HashMap` hashes them with SipHash
    /// and per-process random keys.
    datagrams: HashMap<Key, Datagram>,
    /// Heap bytes of the buffers of all datagrams being put together.
    bytes: usize,
    /// No datagram times out before this (`None`: none is remembered).
    next_due: Option<Instant>,
    stats: DefragStats,
}

/// Which datagram a fragment belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    V4 { src: [u8; 4], dst: [u8; 4], protocol: u8, id: u16 },
    V6 { src: [u8; 16], dst: [u8; 16], id: u32 },
}

/// One fragment, read from its packet.
struct Fragment<'a> {
    key: Key,
    /// Where its data goes in the datagram's fragmentable part, in bytes.
    offset: u32,
    more: bool,
    data: &'a [u8],
    /// The headers the datagram gets if this is its first fragment: the IPv4 header with its
    /// options, or the IPv6 header and the extension headers before the Fragment header.
    head: &'a [u8],
    /// IPv6: where in `head` the next-header byte that named the Fragment header is, and the
    /// Fragment header's own next header.
    next_header: Option<(usize, u8)>,
}

#[derive(Debug)]
struct Datagram {
    /// Its first fragment's time: it is forgotten `timeout` later.
    since: Instant,
    /// `None` once refused: remembered so that its later fragments are refused too.
    assembly: Option<Assembly>,
}

#[derive(Debug, Default)]
struct Assembly {
    /// The first fragment's headers (empty until the fragment at offset 0 arrives).
    head: Vec<u8>,
    next_header: Option<(usize, u8)>,
    /// The fragmentable part: byte `i` is at offset `i`, zero in gaps.
    data: Vec<u8>,
    /// Offsets received, `[from, to)`: sorted, disjoint, never adjacent (merged).
    ranges: Vec<(u32, u32)>,
    /// Where the data ends, once the last fragment (MF clear) arrived.
    end: Option<u32>,
}

impl Assembly {
    fn heap_bytes(&self) -> usize {
        self.head.capacity() + self.data.capacity() + self.ranges.capacity() * size_of::<(u32, u32)>()
    }
}

/// Largest IP datagram: IPv4 total length, or IPv6 payload length after the 40-byte header.
const MAX_LEN: u32 = 65_535;

impl Defragmenter {
    pub fn new(limits: DefragLimits) -> Self {
        Defragmenter { limits, datagrams: HashMap::new(), bytes: 0, next_due: None, stats: DefragStats::default() }
    }

    /// Takes one IP packet (from its IP header on) seen at `now`. A packet that cannot be read as
    /// an IP fragment (not IP, cut short, malformed headers) is [`Defrag::NotFragment`]: the
    /// caller passes it on as it is, and whoever parses it next says what is wrong with it.
    pub fn push(&mut self, now: Instant, packet: &[u8]) -> Defrag {
        let Some(f) = read(packet) else {
            return Defrag::NotFragment;
        };
        if let Some(d) = self.datagrams.get(&f.key)
            && self.due(d, now)
        {
            self.expire_one(f.key);
        }
        if !self.datagrams.contains_key(&f.key) {
            if self.datagrams.len() >= self.limits.max_datagrams {
                self.stats.overflow += 1;
                return Defrag::Overflow;
            }
            self.datagrams.insert(f.key, Datagram { since: now, assembly: Some(Assembly::default()) });
            let due = now + self.limits.timeout;
            self.next_due = Some(self.next_due.map_or(due, |d| d.min(due)));
        }
        let Some(Datagram { assembly: Some(a), .. }) = self.datagrams.get_mut(&f.key) else {
            return Defrag::Refused;
        };
        let v6 = matches!(f.key, Key::V6 { .. });
        let before = a.heap_bytes();
        let room = self.limits.max_bytes.saturating_sub(self.bytes.saturating_sub(before));
        let outcome = add(a, &f, v6, room);
        let after = a.heap_bytes();
        self.bytes = self.bytes - before + after;
        match outcome {
            Added::Kept => match complete(a, v6) {
                Whole::NotYet => Defrag::Incomplete,
                Whole::Packet(packet) => {
                    self.remove(f.key);
                    self.stats.completed += 1;
                    Defrag::Complete(packet)
                }
                Whole::TooLong => {
                    self.refuse(f.key);
                    Defrag::Refused
                }
            },
            Added::Overflow => {
                self.stats.overflow += 1;
                // A datagram this fragment would have started is not remembered.
                if after == 0 {
                    self.remove(f.key);
                }
                Defrag::Overflow
            }
            Added::Refused => {
                self.refuse(f.key);
                Defrag::Refused
            }
        }
    }

    /// Forgets datagrams older than the timeout; call now and then. Cheap when none is due.
    pub fn expire(&mut self, now: Instant) {
        if self.next_due.is_none_or(|d| d > now) {
            return;
        }
        let keys: Vec<Key> = self.datagrams.iter().filter(|(_, d)| self.due(d, now)).map(|(k, _)| *k).collect();
        for k in keys {
            self.expire_one(k);
        }
        self.next_due = self.datagrams.values().map(|d| d.since + self.limits.timeout).min();
    }

    /// Datagrams being put together (refused ones, remembered until their timeout, are not).
    pub fn pending(&self) -> usize {
        self.datagrams.values().filter(|d| d.assembly.is_some()).count()
    }

    /// Counters of what was done so far.
    pub fn stats(&self) -> DefragStats {
        self.stats
    }

    /// Heap bytes of the buffers of the datagrams being put together (at most
    /// [`DefragLimits::max_bytes`]).
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    fn due(&self, d: &Datagram, now: Instant) -> bool {
        d.since + self.limits.timeout <= now
    }

    /// Removes a datagram and its buffers; whether it was still being put together.
    fn remove(&mut self, key: Key) -> bool {
        match self.datagrams.remove(&key) {
            Some(Datagram { assembly: Some(a), .. }) => {
                self.bytes -= a.heap_bytes();
                true
            }
            _ => false,
        }
    }

    /// Removes a datagram whose time is up.
    fn expire_one(&mut self, key: Key) {
        if self.remove(key) {
            self.stats.expired += 1;
        }
    }

    /// Drops a datagram's buffers and remembers it as refused until its timeout.
    fn refuse(&mut self, key: Key) {
        if let Some(d) = self.datagrams.get_mut(&key)
            && let Some(a) = d.assembly.take()
        {
            self.bytes -= a.heap_bytes();
            self.stats.refused += 1;
        }
    }
}

/// What adding one fragment did.
enum Added {
    Kept,
    Refused,
    Overflow,
}

/// Adds `f` to `a` if it fits with what is there and within `room` heap bytes for `a`.
fn add(a: &mut Assembly, f: &Fragment<'_>, v6: bool, room: usize) -> Added {
    let Ok(len) = u32::try_from(f.data.len()) else { return Added::Refused };
    let end = f.offset + len;
    if f.more && len % 8 != 0 {
        return Added::Refused;
    }
    // The datagram's headers (as this fragment has them) and data must fit its length field.
    let unfragmentable = if v6 { f.head.len().saturating_sub(40) } else { f.head.len() };
    if u32::try_from(unfragmentable).map_or(true, |u| u.saturating_add(end) > MAX_LEN) {
        return Added::Refused;
    }
    match a.end {
        Some(known) if end > known || (!f.more && end != known) => return Added::Refused,
        None if !f.more && a.ranges.last().is_some_and(|&(_, to)| to > end) => return Added::Refused,
        _ => {}
    }
    // Ranges that touch [offset, end): first..last; compare the bytes where they overlap.
    let first = a.ranges.partition_point(|&(_, to)| to < f.offset);
    let last = first + a.ranges[first..].partition_point(|&(from, _)| from <= end);
    let mut overlap = 0u32;
    for &(from, to) in &a.ranges[first..last] {
        let (lo, hi) = (from.max(f.offset), to.min(end));
        if lo >= hi {
            continue;
        }
        let stored = a.data.get(lo as usize..hi as usize);
        let offered = f.data.get((lo - f.offset) as usize..(hi - f.offset) as usize);
        if stored != offered {
            return Added::Refused;
        }
        overlap += hi - lo;
    }
    if v6 && overlap > 0 {
        // A duplicate changes nothing; any other overlap abandons the datagram (RFC 5722).
        let duplicate = overlap == len && (f.more || a.end == Some(end));
        return if duplicate { Added::Kept } else { Added::Refused };
    }
    // What the buffers will take: data grown (doubling, so in-order fragments are not copied
    // over and over, up to the largest datagram), the headers, one more range.
    let data_cap = if end as usize > a.data.capacity() {
        (end as usize).max(a.data.capacity().saturating_mul(2).min(MAX_LEN as usize))
    } else {
        a.data.capacity()
    };
    let head_cap = if f.offset == 0 && a.head.is_empty() { f.head.len() } else { a.head.capacity() };
    let ranges_cap = if a.ranges.len() == a.ranges.capacity() {
        a.ranges.capacity().saturating_mul(2).max(4)
    } else {
        a.ranges.capacity()
    };
    if data_cap + head_cap + ranges_cap * size_of::<(u32, u32)>() > room {
        return Added::Overflow;
    }
    if end as usize > a.data.len() {
        a.data.reserve_exact(data_cap - a.data.len());
        a.data.resize(end as usize, 0);
    }
    if let Some(dst) = a.data.get_mut(f.offset as usize..end as usize) {
        dst.copy_from_slice(f.data);
    }
    if f.offset == 0 && a.head.is_empty() {
        a.head.reserve_exact(f.head.len());
        a.head.extend_from_slice(f.head);
        a.next_header = f.next_header;
    }
    if len > 0 {
        let merged = match (a.ranges.get(first), last.checked_sub(1).and_then(|l| a.ranges.get(l))) {
            (Some(lo), Some(hi)) if first < last => (lo.0.min(f.offset), hi.1.max(end)),
            _ => (f.offset, end),
        };
        if first == last {
            if a.ranges.len() == a.ranges.capacity() {
                a.ranges.reserve_exact(ranges_cap - a.ranges.len());
            }
            a.ranges.insert(first, merged);
        } else {
            a.ranges[first] = merged;
            a.ranges.drain(first + 1..last);
        }
    }
    if !f.more {
        a.end = Some(end);
    }
    Added::Kept
}

/// Whether a datagram is whole.
enum Whole {
    NotYet,
    Packet(Vec<u8>),
    /// Whole, but longer than an IP packet can be (the first fragment's headers are longer than
    /// those of the fragment that fit the data up to 65,535 bytes).
    TooLong,
}

/// The whole datagram once every byte and the first fragment's headers are there.
fn complete(a: &Assembly, v6: bool) -> Whole {
    let Some(end) = a.end else { return Whole::NotYet };
    let all_there = match a.ranges.as_slice() {
        [] => end == 0,
        [(0, to)] => *to == end,
        _ => false,
    };
    let (Some(data), false, true) = (a.data.get(..end as usize), a.head.is_empty(), all_there) else {
        return Whole::NotYet;
    };
    let mut out = Vec::with_capacity(a.head.len() + data.len());
    out.extend_from_slice(&a.head);
    out.extend_from_slice(data);
    let fixed = if v6 { fix_v6(&mut out, a.next_header) } else { fix_v4(&mut out, a.head.len()) };
    match fixed {
        Some(()) => Whole::Packet(out),
        None => Whole::TooLong,
    }
}

/// The datagram's IPv6 header: payload length, and the next header that named the Fragment
/// header. `None` if the payload is too long for its field.
fn fix_v6(out: &mut [u8], next_header: Option<(usize, u8)>) -> Option<()> {
    let payload_len = u16::try_from(out.len().checked_sub(40)?).ok()?;
    out.get_mut(4..6)?.copy_from_slice(&payload_len.to_be_bytes());
    let (at, next) = next_header?;
    *out.get_mut(at)? = next;
    Some(())
}

/// The datagram's IPv4 header (`header_len` bytes): total length, MF and offset cleared (the
/// reserved and DF bits kept), header checksum. `None` if it is too long for its length field.
fn fix_v4(out: &mut [u8], header_len: usize) -> Option<()> {
    let total = u16::try_from(out.len()).ok()?;
    out.get_mut(2..4)?.copy_from_slice(&total.to_be_bytes());
    *out.get_mut(6)? &= 0xc0;
    *out.get_mut(7)? = 0;
    out.get_mut(10..12)?.copy_from_slice(&[0, 0]);
    let sum = Sum16BitWords::new().add_slice(out.get(..header_len)?).ones_complement().to_be();
    out.get_mut(10..12)?.copy_from_slice(&sum.to_be_bytes());
    Some(())
}

/// Reads `packet` as an IP fragment; `None` if it is not one (or cannot be read).
fn read(packet: &[u8]) -> Option<Fragment<'_>> {
    match packet.first()? >> 4 {
        4 => read_v4(packet),
        6 => read_v6(packet),
        _ => None,
    }
}

fn read_v4(packet: &[u8]) -> Option<Fragment<'_>> {
    let h = Ipv4HeaderSlice::from_slice(packet).ok()?;
    if !h.is_fragmenting_payload() {
        return None;
    }
    let head = h.slice();
    let data = packet.get(head.len()..usize::from(h.total_len()))?;
    Some(Fragment {
        key: Key::V4 { src: h.source(), dst: h.destination(), protocol: h.protocol().0, id: h.identification() },
        offset: u32::from(h.fragments_offset().value()) * 8,
        more: h.more_fragments(),
        data,
        head,
        next_header: None,
    })
}

fn read_v6(packet: &[u8]) -> Option<Fragment<'_>> {
    let h = Ipv6HeaderSlice::from_slice(packet).ok()?;
    // A payload length of 0 is a jumbogram (RFC 2675), which is never fragmented.
    let total = 40 + usize::from(h.payload_length());
    let packet = packet.get(..total).filter(|_| h.payload_length() != 0)?;
    let (mut next, mut at, mut named_at) = (h.next_header(), 40usize, 6usize);
    // Each extension header is at least 8 bytes long: the walk ends.
    loop {
        let rest = packet.get(at..)?;
        let len = match next {
            ip_number::IPV6_HOP_BY_HOP if at == 40 => {
                let ext = Ipv6RawExtHeaderSlice::from_slice(rest).ok()?;
                next = ext.next_header();
                ext.slice().len()
            }
            ip_number::IPV6_DEST_OPTIONS | ip_number::IPV6_ROUTE => {
                let ext = Ipv6RawExtHeaderSlice::from_slice(rest).ok()?;
                next = ext.next_header();
                ext.slice().len()
            }
            ip_number::AUTH => {
                let ext = IpAuthHeaderSlice::from_slice(rest).ok()?;
                next = ext.next_header();
                ext.slice().len()
            }
            ip_number::IPV6_FRAG => {
                let frag = Ipv6FragmentHeaderSlice::from_slice(rest).ok()?;
                if !frag.is_fragmenting_payload() {
                    // An atomic fragment (offset 0, no more): a whole datagram already.
                    return None;
                }
                return Some(Fragment {
                    key: Key::V6 { src: h.source(), dst: h.destination(), id: frag.identification() },
                    offset: u32::from(frag.fragment_offset().value()) * 8,
                    more: frag.more_fragments(),
                    data: rest.get(frag.slice().len()..)?,
                    head: packet.get(..at)?,
                    next_header: Some((named_at, frag.next_header().0)),
                });
            }
            _ => return None,
        };
        named_at = at;
        at += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::parse;
    use etherparse::{
        IpFragOffset, IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader, PacketBuilder,
    };

    const SRC4: [u8; 4] = [198, 51, 100, 1];
    const DST4: [u8; 4] = [203, 0, 113, 7];

    fn v6addr(last: u8) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        a[15] = last;
        a
    }

    fn body(n: usize, salt: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
    }

    /// A whole IPv4 UDP datagram to port 5353 with identification `id` and DF clear.
    fn udp4(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut h = Ipv4Header::new(0, 64, etherparse::ip_number::UDP, SRC4, DST4).expect("header");
        h.identification = id;
        h.dont_fragment = false;
        let mut out = Vec::new();
        PacketBuilder::ip(IpHeaders::Ipv4(h, Default::default()))
            .udp(40000, 5353)
            .write(&mut out, payload)
            .expect("write");
        out
    }

    /// A whole IPv6 UDP datagram with these extension headers.
    fn udp6(exts: Ipv6Extensions, payload: &[u8]) -> Vec<u8> {
        let h = etherparse::Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: 0,
            next_header: etherparse::ip_number::UDP,
            hop_limit: 64,
            source: v6addr(1),
            destination: v6addr(2),
        };
        let mut out = Vec::new();
        PacketBuilder::ip(IpHeaders::Ipv6(h, exts)).udp(40000, 5353).write(&mut out, payload).expect("write");
        out
    }

    /// `whole` (IPv4) cut at byte ranges `cuts` of its payload, written with etherparse's header
    /// code (not this module's).
    fn frag4(whole: &[u8], cuts: &[(usize, usize)]) -> Vec<Vec<u8>> {
        let (h, rest) = Ipv4Header::from_slice(whole).expect("IPv4");
        let payload = &rest[..usize::from(h.total_len) - h.header_len()];
        cuts.iter()
            .map(|&(a, b)| {
                let mut f = h.clone();
                f.total_len = (h.header_len() + b - a) as u16;
                f.more_fragments = b < payload.len();
                f.fragment_offset = IpFragOffset::try_new((a / 8) as u16).expect("offset");
                f.header_checksum = f.calc_header_checksum();
                let mut out = f.to_bytes().to_vec();
                out.extend_from_slice(&payload[a..b]);
                out
            })
            .collect()
    }

    /// `whole` (IPv6) cut after its first `unfragmentable` bytes, at byte ranges `cuts` of the
    /// rest; `named_at` is the next-header byte that is to name the Fragment header.
    fn frag6(whole: &[u8], unfragmentable: usize, named_at: usize, id: u32, cuts: &[(usize, usize)]) -> Vec<Vec<u8>> {
        let rest = &whole[unfragmentable..];
        cuts.iter()
            .map(|&(a, b)| {
                let mut out = whole[..unfragmentable].to_vec();
                out[named_at] = 44;
                let offset = IpFragOffset::try_new((a / 8) as u16).expect("offset");
                let fh = Ipv6FragmentHeader::new(IpNumber(whole[named_at]), offset, b < rest.len(), id);
                out.extend_from_slice(&fh.to_bytes());
                out.extend_from_slice(&rest[a..b]);
                let len = (out.len() - 40) as u16;
                out[4..6].copy_from_slice(&len.to_be_bytes());
                out
            })
            .collect()
    }

    /// An IPv4 UDP fragment written field by field with etherparse.
    fn raw4(id: u16, options: &[u8], offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
        let mut h = Ipv4Header::new(data.len() as u16, 64, etherparse::ip_number::UDP, SRC4, DST4).expect("header");
        h.identification = id;
        h.dont_fragment = false;
        h.more_fragments = more;
        h.fragment_offset = IpFragOffset::try_new((offset / 8) as u16).expect("offset");
        h.options = options.try_into().expect("options");
        h.total_len = (h.header_len() + data.len()) as u16;
        h.header_checksum = h.calc_header_checksum();
        let mut out = h.to_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    /// Cuts `[0, n)` into pieces of `size` bytes (a multiple of 8), the last one shorter.
    fn even(n: usize, size: usize) -> Vec<(usize, usize)> {
        (0..n).step_by(size).map(|a| (a, (a + size).min(n))).collect()
    }

    /// Feeds `fragments` in order at one-millisecond steps; returns the outcomes.
    fn feed(d: &mut Defragmenter, fragments: &[Vec<u8>]) -> Vec<Defrag> {
        fragments.iter().enumerate().map(|(i, f)| d.push(Instant::from_micros(1000 * i as u64), f)).collect()
    }

    /// Only the last outcome is `Complete`, and it is `whole`, byte for byte, and parses like it.
    fn assert_whole(outcomes: Vec<Defrag>, whole: &[u8], what: &str) {
        let n = outcomes.len();
        for (i, o) in outcomes.into_iter().enumerate() {
            if i + 1 < n {
                assert_eq!(o, Defrag::Incomplete, "{what}: fragment {i}");
                continue;
            }
            let Defrag::Complete(got) = o else { panic!("{what}: the last fragment gave {o:?}") };
            assert_eq!(got, whole, "{what}: the datagram is the original, byte for byte");
            let (p, q) = (parse(&got).expect("parses"), parse(whole).expect("original parses"));
            assert_eq!(
                (p.src, p.dst, p.protocol, p.src_port, p.dst_port),
                (q.src, q.dst, q.protocol, q.src_port, q.dst_port)
            );
            assert_eq!(p.payload, q.payload, "{what}");
        }
    }

    fn shuffled<T: Clone>(v: &[T], seed: u64) -> Vec<T> {
        let mut v = v.to_vec();
        let mut x = seed | 1;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    }

    #[test]
    fn ipv4_in_order_reversed_shuffled_duplicated() {
        let whole = udp4(0x1234, &body(3000, 1));
        let frags = frag4(&whole, &even(3008, 1480));
        assert_eq!(frags.len(), 3);
        let mut d = Defragmenter::new(DefragLimits::default());
        assert_whole(feed(&mut d, &frags), &whole, "in order");
        let mut rev = frags.clone();
        rev.reverse();
        assert_whole(feed(&mut d, &rev), &whole, "reversed");
        for seed in 1..20 {
            let small = frag4(&whole, &even(3008, 8 * (1 + seed as usize % 40)));
            assert_whole(feed(&mut d, &shuffled(&small, seed)), &whole, "shuffled");
        }
        // Every fragment twice (the duplicates of the last fragments come after completion:
        // they start a datagram of their own, which times out).
        let dup: Vec<Vec<u8>> =
            frags[..2].iter().flat_map(|f| [f.clone(), f.clone()]).chain([frags[2].clone()]).collect();
        assert_whole(feed(&mut d, &dup), &whole, "duplicated");
        assert_eq!(d.pending(), 0);
        assert_eq!(d.buffered_bytes(), 0, "buffers are released with the datagram");
        assert_eq!(d.stats(), DefragStats { completed: 22, ..DefragStats::default() });
    }

    #[test]
    fn ipv6_in_order_reversed_shuffled_duplicated_with_extension_headers() {
        let hbh = || Some(etherparse::Ipv6RawExtHeader::new_raw(IpNumber(0), &[1, 4, 0, 0, 0, 0]).expect("ext"));
        let cases = [
            ("no extension headers", Ipv6Extensions::default(), 40, 6),
            ("hop-by-hop", Ipv6Extensions { hop_by_hop_options: hbh(), ..Default::default() }, 48, 40),
            (
                "hop-by-hop, then destination options in the fragmentable part",
                Ipv6Extensions { hop_by_hop_options: hbh(), destination_options: hbh(), ..Default::default() },
                48,
                40,
            ),
        ];
        for (name, exts, unfragmentable, named_at) in cases {
            let whole = udp6(exts, &body(3000, 2));
            let n = whole.len() - unfragmentable;
            let frags = frag6(&whole, unfragmentable, named_at, 0xdead_beef, &even(n, 1232));
            let mut d = Defragmenter::new(DefragLimits::default());
            assert_whole(feed(&mut d, &frags), &whole, name);
            let mut rev = frags.clone();
            rev.reverse();
            assert_whole(feed(&mut d, &rev), &whole, name);
            for seed in 1..10 {
                let small =
                    frag6(&whole, unfragmentable, named_at, seed as u32, &even(n, 8 * (1 + seed as usize % 30)));
                assert_whole(feed(&mut d, &shuffled(&small, seed)), &whole, name);
            }
            // An exact duplicate changes nothing (RFC 8200 lets it be dropped).
            let dup = [frags[0].clone(), frags[0].clone(), frags[1].clone(), frags[1].clone(), frags[2].clone()];
            assert_whole(feed(&mut d, &dup), &whole, name);
            assert_eq!(d.stats().completed, 12, "{name}");
        }
    }

    #[test]
    fn tiny_fragments_of_a_tcp_syn() {
        let mut h = Ipv4Header::new(0, 64, etherparse::ip_number::TCP, SRC4, DST4).expect("header");
        h.identification = 77;
        h.dont_fragment = false;
        let mut whole = Vec::new();
        PacketBuilder::ip(IpHeaders::Ipv4(h, Default::default()))
            .tcp(40000, 5353, 1, 65535)
            .syn()
            .options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460), etherparse::TcpOptionElement::Noop])
            .expect("options")
            .write(&mut whole, &[])
            .expect("write");
        let frags = frag4(&whole, &even(whole.len() - 20, 8));
        assert!(frags.len() >= 3);
        for f in &frags {
            assert!(parse(f).is_err(), "a fragment alone is not a packet the engine can use");
        }
        let mut d = Defragmenter::new(DefragLimits::default());
        assert_whole(feed(&mut d, &shuffled(&frags, 5)), &whole, "tiny");
        let p = parse(&whole).expect("syn");
        assert!(p.tcp.is_some_and(|f| f.syn) && p.dst_port == 5353);
    }

    #[test]
    fn identical_ipv4_overlaps_are_accepted() {
        let whole = udp4(9, &body(200, 3));
        // Overlaps: [0, 64) [32, 128) [120, 208) [0, 16)
        let frags = frag4(&whole, &[(0, 64), (32, 128), (120, 208), (0, 16)]);
        let mut d = Defragmenter::new(DefragLimits::default());
        let out = feed(&mut d, &frags);
        assert_eq!(out[..2], [Defrag::Incomplete, Defrag::Incomplete]);
        let Defrag::Complete(got) = &out[2] else { panic!("{out:?}") };
        assert_eq!(got, &whole);
    }

    #[test]
    fn conflicting_overlaps_refuse_the_datagram_until_it_times_out() {
        let whole = udp4(10, &body(200, 4));
        let mut frags = frag4(&whole, &[(0, 64), (56, 128), (128, 208)]);
        // The second fragment's first byte (overlapping the first fragment) differs.
        frags[1][20] ^= 0xff;
        let limits = DefragLimits::default();
        let mut d = Defragmenter::new(limits);
        let t = Instant::from_micros(1_000_000);
        assert_eq!(d.push(t, &frags[0]), Defrag::Incomplete);
        assert_eq!(d.push(t, &frags[1]), Defrag::Refused);
        assert_eq!((d.pending(), d.buffered_bytes()), (0, 0), "the bytes are dropped");
        assert_eq!(d.push(t, &frags[2]), Defrag::Refused, "later fragments too");
        assert_eq!(d.push(t, &frags[0]), Defrag::Refused);
        assert_eq!(d.stats().refused, 1, "one datagram refused");
        // After the timeout the same identification is a new datagram.
        let later = t + limits.timeout;
        d.expire(later);
        assert_eq!(d.push(later, &frags[0]), Defrag::Incomplete);
        let good = frag4(&whole, &[(56, 128), (128, 208)]);
        assert_eq!(d.push(later, &good[0]), Defrag::Incomplete);
        assert_eq!(d.push(later, &good[1]), Defrag::Complete(whole.clone()));

        // IPv6: any overlap that is not a duplicate abandons the datagram, even with the same bytes.
        let whole6 = udp6(Ipv6Extensions::default(), &body(100, 5));
        let frags6 = frag6(&whole6, 40, 6, 1, &[(0, 64), (56, 108)]);
        let mut d = Defragmenter::new(limits);
        assert_eq!(feed(&mut d, &frags6), [Defrag::Incomplete, Defrag::Refused]);
        // ... and a duplicate whose bytes differ too.
        let mut other = frags6[0].clone();
        *other.last_mut().expect("byte") ^= 1;
        let mut d = Defragmenter::new(limits);
        assert_eq!(feed(&mut d, &[frags6[0].clone(), other]), [Defrag::Incomplete, Defrag::Refused]);
    }

    #[test]
    fn fragments_that_cannot_be_put_together_are_refused() {
        let limits = DefragLimits::default();
        let whole = udp4(11, &body(100, 6));
        let base = frag4(&whole, &[(0, 48), (48, 108)]);
        let refused = |frags: &[Vec<u8>]| {
            let mut d = Defragmenter::new(limits);
            let out = feed(&mut d, frags);
            assert_eq!(out.last(), Some(&Defrag::Refused), "{out:?}");
            assert_eq!(d.stats().refused, 1);
        };
        // Past 65,535 bytes: the largest offset with 16 bytes.
        refused(&[raw4(11, &[], 8190 * 8, true, &[0; 16])]);
        // A second last fragment with another end.
        let mut shorter = base[1].clone();
        shorter.truncate(shorter.len() - 8);
        let len = shorter.len() as u16;
        shorter[2..4].copy_from_slice(&len.to_be_bytes());
        refused(&[base[1].clone(), shorter.clone()]);
        // A last fragment ending before data already received.
        let mut early_end = frag4(&whole, &[(48, 56)]).remove(0);
        early_end[6..8].copy_from_slice(&6u16.to_be_bytes());
        refused(&[base[1].clone(), early_end]);
        // Data past the end.
        let past = frag4(&udp4(11, &body(200, 6)), &[(48, 120)]);
        refused(&[base[1].clone(), past[0].clone()]);
        // A non-last fragment whose length is not a multiple of 8.
        let odd = frag4(&whole, &[(0, 44), (44, 108)]);
        refused(&[odd[0].clone()]);

        // The first fragment's header (with options) makes the whole too long, though each
        // fragment alone fits.
        let first = raw4(12, &[1; 40], 0, true, &[0; 8]);
        let middle = raw4(12, &[], 8, true, &vec![0; 65_440]);
        let last = raw4(12, &[], 65_448, false, &[0; 64]);
        let mut d = Defragmenter::new(limits);
        assert_eq!(d.push(Instant::ZERO, &last), Defrag::Incomplete);
        assert_eq!(d.push(Instant::ZERO, &middle), Defrag::Incomplete);
        assert_eq!(d.push(Instant::ZERO, &first), Defrag::Refused, "60-byte header + 65,512 bytes");
        // The same with a 20-byte first header fits exactly below the limit.
        let mut d = Defragmenter::new(limits);
        for f in [&last, &middle] {
            assert_eq!(d.push(Instant::ZERO, f), Defrag::Incomplete);
        }
        let Defrag::Complete(p) = d.push(Instant::ZERO, &raw4(12, &[], 0, true, &[0; 8])) else { panic!("not whole") };
        assert_eq!(p.len(), 20 + 65_512);
    }

    #[test]
    fn incomplete_datagrams_time_out() {
        let limits = DefragLimits { timeout: Duration::from_secs(30), ..DefragLimits::default() };
        let whole = udp4(13, &body(100, 7));
        let frags = frag4(&whole, &[(0, 48), (48, 108)]);
        let mut d = Defragmenter::new(limits);
        let t0 = Instant::from_micros(5_000_000);
        assert_eq!(d.push(t0, &frags[0]), Defrag::Incomplete);
        d.expire(t0 + Duration::from_secs(29));
        assert_eq!(d.pending(), 1);
        // Its time is up when the second fragment comes: it starts a datagram of its own.
        assert_eq!(d.push(t0 + limits.timeout, &frags[1]), Defrag::Incomplete);
        assert_eq!((d.pending(), d.stats().expired), (1, 1));
        d.expire(t0 + Duration::from_secs(61));
        assert_eq!((d.pending(), d.stats().expired, d.buffered_bytes()), (0, 2, 0));
        // A capture whose clock goes back does not expire anything early.
        assert_eq!(d.push(t0, &frags[0]), Defrag::Incomplete);
        d.expire(Instant::ZERO);
        assert_eq!(d.pending(), 1);
    }

    #[test]
    fn limits_bound_datagrams_and_bytes() {
        let limits = DefragLimits { max_datagrams: 2, max_bytes: 4096, timeout: Duration::from_secs(30) };
        let mut d = Defragmenter::new(limits);
        let firsts: Vec<Vec<u8>> =
            (0..3).map(|id| frag4(&udp4(id, &body(100, 8)), &[(0, 48), (48, 108)]).remove(0)).collect();
        assert_eq!(d.push(Instant::ZERO, &firsts[0]), Defrag::Incomplete);
        assert_eq!(d.push(Instant::ZERO, &firsts[1]), Defrag::Incomplete);
        assert_eq!(d.push(Instant::ZERO, &firsts[2]), Defrag::Overflow, "a third datagram");
        assert_eq!((d.pending(), d.stats().overflow), (2, 1));
        // Completing one makes room.
        let whole = udp4(0, &body(100, 8));
        let rest = frag4(&whole, &[(48, 108)]).remove(0);
        assert_eq!(d.push(Instant::ZERO, &rest), Defrag::Complete(whole));
        assert_eq!(d.push(Instant::ZERO, &firsts[2]), Defrag::Incomplete);

        // Bytes: a fragment far into a datagram needs a buffer up to its end.
        let mut d = Defragmenter::new(limits);
        let big = udp4(20, &body(6000, 9));
        let frags = frag4(&big, &even(6008, 1480));
        assert_eq!(d.push(Instant::ZERO, &frags[0]), Defrag::Incomplete);
        assert_eq!(d.push(Instant::ZERO, &frags[4]), Defrag::Overflow, "6008 bytes of buffer > 4096");
        assert!(d.buffered_bytes() <= 4096);
        assert_eq!(d.pending(), 1, "the datagram is still there, without that fragment");
        // A datagram that could not keep its first fragment is not remembered.
        let mut d = Defragmenter::new(limits);
        assert_eq!(d.push(Instant::ZERO, &frags[4]), Defrag::Overflow);
        assert_eq!(d.pending(), 0);
        // Many datagrams, each within the bytes left.
        let mut d = Defragmenter::new(DefragLimits { max_datagrams: 1000, ..limits });
        let mut kept = 0;
        for id in 0..100 {
            let f = frag4(&udp4(id, &body(1000, 1)), &[(0, 512), (512, 1008)]).remove(0);
            match d.push(Instant::ZERO, &f) {
                Defrag::Incomplete => kept += 1,
                Defrag::Overflow => {}
                other => panic!("{other:?}"),
            }
            assert!(d.buffered_bytes() <= 4096, "{}", d.buffered_bytes());
        }
        assert!((4..100).contains(&kept), "{kept}");
        assert_eq!(d.pending(), kept);
    }

    #[test]
    fn what_is_not_a_fragment() {
        let mut d = Defragmenter::new(DefragLimits::default());
        let whole = udp4(1, b"hello");
        assert_eq!(d.push(Instant::ZERO, &whole), Defrag::NotFragment);
        assert_eq!(d.push(Instant::ZERO, &udp6(Ipv6Extensions::default(), b"hi")), Defrag::NotFragment);
        assert_eq!(d.push(Instant::ZERO, &[]), Defrag::NotFragment);
        assert_eq!(d.push(Instant::ZERO, &[0x45, 0, 0]), Defrag::NotFragment);
        assert_eq!(d.push(Instant::ZERO, &[0x00; 40]), Defrag::NotFragment);
        // An atomic fragment (offset 0, no more) is a whole datagram already.
        let whole6 = udp6(Ipv6Extensions::default(), &body(20, 1));
        let atomic = frag6(&whole6, 40, 6, 3, &[(0, 28)]).remove(0);
        assert_eq!(d.push(Instant::ZERO, &atomic), Defrag::NotFragment);
        assert!(parse(&atomic).is_ok());
        // A fragment cut short (its length fields say more): for the parser to count.
        let f = frag4(&udp4(2, &body(100, 1)), &[(0, 48)]).remove(0);
        assert_eq!(d.push(Instant::ZERO, &f[..30]), Defrag::NotFragment);
        assert_eq!(d.pending(), 0);
        // The same identification with another protocol is another datagram.
        let mut other = f.clone();
        other[9] = 6;
        assert_eq!(d.push(Instant::ZERO, &f), Defrag::Incomplete);
        assert_eq!(d.push(Instant::ZERO, &other), Defrag::Incomplete);
        assert_eq!(d.pending(), 2);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut d = Defragmenter::new(DefragLimits { max_datagrams: 8, max_bytes: 1 << 16, ..DefragLimits::default() });
        let seeds = [udp4(1, &body(300, 1)), udp6(Ipv6Extensions::default(), &body(300, 1))];
        let mut frags: Vec<Vec<u8>> = frag4(&seeds[0], &even(308, 64));
        frags.extend(frag6(&seeds[1], 40, 6, 9, &even(308, 64)));
        let mut x: u32 = 99;
        for round in 0..3000u64 {
            let mut f = frags[round as usize % frags.len()].clone();
            for _ in 0..1 + round % 4 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let at = (x >> 8) as usize % f.len();
                f[at] = (x >> 20) as u8;
            }
            if round % 7 == 0 {
                f.truncate((x as usize >> 4) % (f.len() + 1));
            }
            if let Defrag::Complete(p) = d.push(Instant::from_micros(round * 10_000), &f) {
                assert!(p.len() <= 65_535 + 40);
            }
            assert!(d.pending() <= 8 && d.buffered_bytes() <= 1 << 16);
        }
    }
}
