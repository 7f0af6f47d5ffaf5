//! Stream inspection: where each payload byte sits in its direction's stream, holding the packets
//! that carry bytes not judged yet, putting those bytes in order, and showing them to whoever
//! judges them (the sniffers that name the flow's host for the rules, a product's filter).
//!
//! Offsets follow TCP sequence numbers from the SYN on (a flow picked up mid-stream counts from
//! its first packet); other protocols count datagram payloads. A direction under inspection has
//! a line: bytes before it were judged and pass, bytes at or after it are undecided, and a packet
//! carrying any undecided byte is held (kept from the receiver) until a verdict covers it. Its
//! bytes go into a bounded [`Reassembler`], so segments that arrive out of order, twice, in tiny
//! pieces or overlapping are judged exactly as the receiver will assemble them; an overlap with
//! different bytes is an evasion attempt (the flow is dropped, or with `overlap_drop` off the
//! conflicting packet alone). A segment starting past the span kept is dropped (the sender sends
//! it again once the flow is decided).
//!
//! Who draws the line:
//! - the rules, while they wait for the host name the opener's first bytes may carry (a rule
//!   naming hosts may be the first to match, or an inspect rule matched): nothing of the
//!   opener's direction passes until a sniffer found the name, all said the bytes are not
//!   theirs, the window filled, the direction ended or the hold timed out; then the rules judge
//!   the flow again with its host ([`crate::rules::matcher::CompiledRules::classify_inspected`]);
//! - a product's filter, for the windows it asked for ([`Mode::Inspect`]): bytes before
//!   `pass_end` pass, bytes in `[pass_end, peek_end)` are shown in order and wait for its answer.
//!
//! A drop that falls inside a held TCP packet lets through the part before the line (the packet
//! rewritten with a shorter payload, see [`crate::packet::with_payload_prefix`]), so the receiver
//! gets exactly the bytes that were judged. Held bytes that get no verdict within the hold timeout
//! end the rules' wait (judged with what is known) or get the configured verdict.
//!
//! This room reads and moves stream positions, holds and releases inspected packets, calls the
//! sniffers and the filter's `data`/`data_complete`, and learns names from DNS answers.

use std::net::IpAddr;
use std::sync::Arc;

use super::entry::{Entry, HeldPacket, Mode, bits};
use super::table::Slot;
use super::{Engine, Release};
use crate::event::UpdateSource;
use crate::flow::{Direction, Host, HostSource, Protocol};
use crate::packet::ParsedPacket;
use crate::reassembly::Reassembler;
use crate::rules::Action;
use crate::sniff::{self, ClientHello, Sniff};
use crate::time::Instant;
use crate::verdict::{DataVerdict, PacketAction, PacketId};

/// Most datagrams of a UDP flow the QUIC sniffer reads before the rules judge without a name.
const QUIC_DATAGRAMS: u8 = 4;

/// One flow's inspection state; boxed in the entry's extra part while the flow is inspected.
#[derive(Default)]
pub(crate) struct Inspection {
    sides: [Side; 2],
    /// The rules wait for the host name the opener's bytes may carry.
    sniff: Option<Sniffing>,
    /// Held bytes must have a verdict by then.
    pub(super) deadline: Option<Instant>,
}

impl std::fmt::Debug for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inspection").field("sniffing", &self.sniff.is_some()).field("deadline", &self.deadline).finish()
    }
}

impl Inspection {
    /// The rules still wait for the host name.
    pub(crate) fn sniffing(&self) -> bool {
        self.sniff.is_some()
    }

    pub(super) fn stop_sniffing(&mut self) {
        self.sniff = None;
    }

    /// Some direction's judged bytes are not acknowledged yet (see `Side::verify_to`).
    pub(crate) fn verifying(&self) -> bool {
        self.sides.iter().any(|s| s.verify_to.is_some())
    }
}

/// The mode of a direction the rules read for a host name while a product's filter, which did
/// not ask to see it, judges the flow: nothing is shown to the filter (all of it lies before
/// `pass_end`), and it becomes `Allow` once the rules are done.
pub(super) const RULES_READ: Mode = Mode::Inspect { pass_end: u64::MAX, peek_end: u64::MAX };

#[derive(Default)]
struct Side {
    /// Undecided (and recently judged) bytes, from the line on.
    buf: Option<Reassembler>,
    /// Bytes before this offset were judged to pass: what a drop still lets through.
    allowed: u64,
    /// Bytes before this offset were shown to the product's filter.
    shown: u64,
    /// The direction was judged and passes, but its receiver has not acknowledged the bytes
    /// judged (up to this offset) yet: another copy of them could still take their place, so
    /// copies are compared until then.
    verify_to: Option<u64>,
}

/// The rules' wait for a host name.
struct Sniffing {
    dir: Direction,
    /// Stream offset where the wait ends without a name.
    window: u64,
    /// Sniffers that may still find something.
    tls: bool,
    http: bool,
    quic: Option<Box<sniff::quic::InitialSniffer>>,
    datagrams: u8,
}

fn index(d: Direction) -> usize {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

fn opener(e: &Entry) -> Direction {
    e.direction()
}

/// Places a packet's payload in its direction's stream: the stream range it covers (bytes a
/// retransmission carries again included), and moves the stream's end on. `None` for a TCP
/// payload more than 2 GiB away from the stream's end (not this connection's bytes).
pub(super) fn place(e: &mut Entry, dir: Direction, p: &ParsedPacket<'_>) -> Option<(u64, u64)> {
    let len = p.payload.len() as u64;
    let end_now = e.offset(dir);
    let start = match (p.tcp.is_some(), e.next_seq(dir)) {
        (true, Some(next)) => {
            let delta = i64::from(p.seq.wrapping_sub(next) as i32);
            let start = end_now as i64 + delta;
            if delta.unsigned_abs() > 1 << 31 || start + (len as i64) < 0 {
                return None;
            }
            start
        }
        _ => end_now as i64,
    };
    let (start, end) = (start.max(0) as u64, (start + len as i64).max(0) as u64);
    if end > end_now {
        e.set_offset(dir, end);
        if p.tcp.is_some() {
            // The packet's last byte is the stream's last now.
            e.set_next_seq(dir, p.seq.wrapping_add(len as u32));
        }
    }
    Some((start, end))
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

/// Where the line of `dir` is now: bytes before it pass.
fn line(e: &Entry, dir: Direction) -> u64 {
    if e.inspection().and_then(|i| i.sniff.as_ref()).is_some_and(|s| s.dir == dir) {
        return 0;
    }
    match e.mode(dir) {
        Mode::Allow => u64::MAX,
        Mode::Inspect { pass_end, .. } => pass_end,
        Mode::Drop | Mode::Pause => e.inspection().map_or(0, |i| i.sides[index(dir)].allowed),
    }
}

/// Whether packets of `dir` carrying bytes go through inspection: its bytes are being judged,
/// or were when a pause came (their copy is still compared with what comes).
pub(super) fn inspected(e: &Entry, dir: Direction) -> bool {
    match e.mode(dir) {
        Mode::Inspect { .. } => true,
        Mode::Allow => e
            .inspection()
            .is_some_and(|i| i.sniff.as_ref().is_some_and(|s| s.dir == dir) || i.sides[index(dir)].verify_to.is_some()),
        Mode::Pause => e.inspection().is_some_and(|i| i.sides[index(dir)].buf.is_some() || i.sniff.is_some()),
        Mode::Drop => false,
    }
}

/// How far `dir`'s bytes must be kept to judge them.
fn span_end(e: &Entry, dir: Direction) -> u64 {
    let sniff = e.inspection().and_then(|i| i.sniff.as_ref()).filter(|s| s.dir == dir).map_or(0, |s| s.window);
    let peek = match e.mode(dir) {
        Mode::Inspect { peek_end, .. } if e.has(bits::FILTER_INSPECTS) => peek_end,
        _ => 0,
    };
    sniff.max(peek)
}

/// The host a ClientHello names for the rules: its server name. With Encrypted Client Hello the
/// server name is only the outer one (a public name, or the real one: browsers send a decoy ECH
/// extension on every connection, and the two look the same on the wire), so a name a DNS answer
/// gave the address comes first then, and the outer name is used only when there is none.
fn host_of_hello(hello: ClientHello, source: HostSource, dns: Option<&Host>) -> Host {
    let dns_name = dns.filter(|h| h.source == Some(HostSource::Dns)).and_then(|h| h.name.clone());
    let (name, from) = match (hello.ech, dns_name, hello.sni.as_deref()) {
        (true, Some(d), _) => (Some(d), Some(HostSource::Dns)),
        (_, _, Some(sni)) => (Some(sni.into()), Some(source)),
        (_, Some(d), None) => (Some(d), Some(HostSource::Dns)),
        (_, None, None) => (None, None),
    };
    let outer_sni = if hello.ech { hello.sni } else { None };
    Host { name, source: from, alpn: hello.alpn, ech: hello.ech, outer_sni }
}

impl Engine {
    /// What a flow whose provider faulted gets: the fail mode's verdict.
    fn fail_verdict(&self) -> DataVerdict {
        if self.config.fail_open { DataVerdict::Allow } else { DataVerdict::Drop }
    }

    /// Makes the rules of a new flow wait for its host name, read from the first `window` bytes
    /// (or datagrams' worth) of the opener's direction.
    pub(super) fn start_sniffing(&mut self, slot: Slot, window: u64) {
        let Some(e) = self.table.get_mut(slot) else { return };
        let dir = opener(e);
        let tcp = e.protocol == Protocol::Tcp;
        let sniff = Sniffing {
            dir,
            window: window.min(self.config.max_inspect_span as u64),
            tls: tcp,
            http: tcp,
            quic: (e.protocol == Protocol::Udp).then(Box::default),
            datagrams: 0,
        };
        match e.inspection_mut() {
            Some(i) => i.sniff = Some(sniff),
            None => e.set_inspection(Some(Box::new(Inspection { sniff: Some(sniff), ..Inspection::default() }))),
        }
    }

    /// A packet with payload of a direction under inspection: held while it carries undecided
    /// bytes, judged with them once they are. Returns its action (a packet decided by its own
    /// bytes gets its verdict at once).
    pub(super) fn inspect_packet(
        &mut self,
        slot: Slot,
        now: Instant,
        dir: Direction,
        range: (u64, u64),
        p: &ParsedPacket<'_>,
        raw: &[u8],
    ) -> PacketAction {
        let Some(e) = self.table.get_mut(slot) else { return PacketAction::Accept };
        let (start, end) = range;
        let line_now = line(e, dir);
        if e.inspection().is_none() {
            e.set_inspection(Some(Box::default()));
        }
        let span = self.config.max_inspect_span;
        let span_end = span_end(e, dir);
        let Some(insp) = e.inspection_mut() else { return PacketAction::Accept };
        let side = &mut insp.sides[index(dir)];
        let buf = side.buf.get_or_insert_with(|| Reassembler::new(line_now.min(start), span));
        // Compare with what was kept, also for bytes already judged: a copy that differs from
        // the first is what an evasion sends hoping the receiver keeps it.
        let ins = buf.insert(start, p.payload);
        if ins.conflict {
            self.stats.overlap_conflicts += 1;
            if self.config.overlap_drop {
                self.apply(slot, now, DataVerdict::Drop, None, UpdateSource::Overlap);
            }
            return PacketAction::Drop;
        }
        if end <= line_now {
            return PacketAction::Accept;
        }
        if ins.refused {
            // Too many gaps already: this piece comes again once the ones before it are in.
            self.stats.out_of_window += 1;
            return PacketAction::Drop;
        }
        if ins.stored == 0 && buf.has(start, end) && p.tcp.is_some() {
            // A copy of bytes a held packet carries already: that one delivers them.
            return PacketAction::Drop;
        }
        let kept_from = buf.start();
        // (A direction the rules read while a product's filter judges has an endless window.)
        let limit = kept_from.saturating_add(span as u64);
        if start >= limit || (span_end > 0 && start >= span_end.max(line_now).saturating_add(span as u64)) {
            // Beyond anything kept: the receiver may not even take it; it comes again.
            self.stats.out_of_window += 1;
            return PacketAction::Drop;
        }
        let ingested = true;
        let action = self.hold_packet(slot, now, dir, (start, end), raw, ingested);
        // Too many held: this copy is dropped, but its bytes were stored and are judged (the
        // sender repeats them, and a different copy would be a conflict).
        self.progress(slot, now, dir);
        self.review_held(slot, now);
        match action {
            PacketAction::Hold(id) => self.take_own_release(id),
            other => other,
        }
    }

    /// Holds the packet being judged for flow `slot` (inspection, or a pause), keeping its bytes
    /// when it carries a payload.
    pub(super) fn hold_packet(
        &mut self,
        slot: Slot,
        now: Instant,
        dir: Direction,
        range: (u64, u64),
        raw: &[u8],
        ingested: bool,
    ) -> PacketAction {
        let per_flow = self.table.get(slot).map_or(0, |e| e.held().len());
        if self.held.len() >= self.config.max_held_packets || per_flow >= self.config.max_held_per_flow {
            self.stats.held_overflow += 1;
            return PacketAction::Drop;
        }
        let id = PacketId(self.next_packet_id);
        self.next_packet_id += 1;
        let hold_timeout = self.config.hold_timeout;
        let Some(e) = self.table.get_mut(slot) else { return PacketAction::Accept };
        let bytes = (range.1 > range.0).then(|| Box::<[u8]>::from(raw));
        e.hold(HeldPacket { id, dir, start: range.0, end: range.1, bytes, ingested });
        // The first packet held without a verdict starts the clock.
        if e.inspection().is_none() {
            e.set_inspection(Some(Box::default()));
        }
        if let Some(i) = e.inspection_mut()
            && i.deadline.is_none()
        {
            i.deadline = Some(now + hold_timeout);
            self.hold_deadlines.push_back((now + hold_timeout, e.id));
        }
        self.held.insert(id, Some(e.id));
        PacketAction::Hold(id)
    }

    /// The packet just held was decided by the work it caused: its verdict goes back at once.
    fn take_own_release(&mut self, id: PacketId) -> PacketAction {
        let Some(k) = self.releases.iter().rposition(|r| r.packet == id) else { return PacketAction::Hold(id) };
        if self.rewrites.contains_key(&id) {
            return PacketAction::Hold(id);
        }
        let r = self.releases.remove(k);
        self.held.remove(&id);
        match r {
            Some(Release { accept: true, .. }) => PacketAction::Accept,
            _ => PacketAction::Drop,
        }
    }

    /// New bytes of `dir` may be in order now: let the sniffers and the filter see them, as
    /// long as their answers open more.
    fn progress(&mut self, slot: Slot, now: Instant, dir: Direction) {
        for _ in 0..64 {
            let sniffed = self.sniff_step(slot, now, dir);
            let shown = self.show_filter(slot, now, dir);
            if !sniffed && !shown {
                break;
            }
        }
    }

    /// Runs the sniffers over the opener's bytes in order; ends the wait when one found the
    /// name, none can, or the window is full. Returns whether the wait ended.
    fn sniff_step(&mut self, slot: Slot, now: Instant, dir: Direction) -> bool {
        let Some(e) = self.table.get_mut(slot) else { return false };
        let dns = e.host();
        let protocol = e.protocol;
        let Some(insp) = e.inspection_mut() else { return false };
        let Some(s) = insp.sniff.as_mut().filter(|s| s.dir == dir) else { return false };
        let Some(buf) = insp.sides[index(dir)].buf.as_ref() else { return false };
        let data = buf.contiguous();
        if buf.start() != 0 || data.is_empty() {
            return false;
        }
        let mut found: Option<Host> = None;
        let mut over = false;
        if protocol == Protocol::Tcp {
            if s.tls {
                match sniff::tls::client_hello(data) {
                    Sniff::Found(h) => found = Some(host_of_hello(h, HostSource::Sni, dns.as_deref())),
                    Sniff::NotThis => s.tls = false,
                    Sniff::NeedMore => {}
                }
            }
            if found.is_none() && s.http {
                match sniff::http::request_head(data) {
                    // Two hosts in one head (two Host lines, a Host against the target, a line
                    // servers read but the parser does not): which one the server takes is
                    // unknown, so it is an evasion attempt, like overlapping bytes that differ.
                    Sniff::Found(h) if h.ambiguous => {
                        self.stats.overlap_conflicts += 1;
                        if let Some(i) = self.table.get_mut(slot).and_then(|e| e.inspection_mut()) {
                            i.stop_sniffing();
                        }
                        let verdict = if self.config.overlap_drop { DataVerdict::Drop } else { DataVerdict::Allow };
                        if self.config.overlap_drop {
                            self.apply(slot, now, verdict, None, UpdateSource::Overlap);
                        } else {
                            self.end_sniffing(slot, now, None);
                        }
                        return true;
                    }
                    Sniff::Found(h) => {
                        found = Some(match h.host {
                            Some(name) => {
                                Host { name: Some(name.into()), source: Some(HostSource::Http), ..Host::default() }
                            }
                            None => dns.as_deref().cloned().unwrap_or_default(),
                        })
                    }
                    Sniff::NotThis => s.http = false,
                    Sniff::NeedMore => {}
                }
            }
            over = !s.tls && !s.http || data.len() as u64 >= s.window;
        }
        let Some(found) = found else {
            if over {
                self.end_sniffing(slot, now, None);
                return true;
            }
            return false;
        };
        self.end_sniffing(slot, now, Some(found));
        true
    }

    /// A UDP datagram of the opener while the rules wait: the QUIC sniffer reads it.
    fn sniff_datagram(&mut self, slot: Slot, now: Instant, dir: Direction, payload: &[u8]) {
        let Some(e) = self.table.get_mut(slot) else { return };
        let dns = e.host();
        let Some(s) = e.inspection_mut().and_then(|i| i.sniff.as_mut()).filter(|s| s.dir == dir) else { return };
        s.datagrams = s.datagrams.saturating_add(1);
        let result = match s.quic.as_mut() {
            Some(q) => q.push(payload),
            None => Sniff::NotThis,
        };
        match result {
            Sniff::Found(h) => {
                let host = host_of_hello(h, HostSource::Quic, dns.as_deref());
                self.end_sniffing(slot, now, Some(host));
            }
            Sniff::NotThis => self.end_sniffing(slot, now, None),
            Sniff::NeedMore if s.datagrams >= QUIC_DATAGRAMS => self.end_sniffing(slot, now, None),
            Sniff::NeedMore => {}
        }
    }

    /// The rules' wait for a host name is over (`found`: what the bytes said): the flow gets its
    /// host and the rules judge it again with it.
    pub(super) fn end_sniffing(&mut self, slot: Slot, now: Instant, found: Option<Host>) {
        let Some(e) = self.table.get_mut(slot) else { return };
        let Some(insp) = e.inspection_mut() else { return };
        if insp.sniff.take().is_none() {
            return;
        }
        if let Some(h) = found {
            if h.source.is_some_and(|s| s != HostSource::Dns) {
                self.stats.hosts_found += 1;
            }
            e.set_host(Some(Arc::new(h)));
        }
        let flow = e.flow(&self.interfaces);
        let class = self.rules.classify_inspected(&flow);
        let rule = class.rule.and_then(|i| self.rules.name(i)).unwrap_or(&self.names.default).clone();
        let silent = class.rule.is_some_and(|i| self.rules.rules().get(i).is_some_and(|r| r.silent));
        let filter = e.has(bits::FILTER_INSPECTS);
        let verdict = match class.action {
            Action::Drop => DataVerdict::Drop,
            _ => DataVerdict::Allow,
        };
        if verdict == DataVerdict::Drop || !filter {
            e.rule = Some(rule);
            e.set(bits::SILENT, silent);
        }
        let before = (e.modes(), e.verdict());
        if filter {
            // The filter's windows go on; the rules can only take the flow away from it.
            if verdict == DataVerdict::Drop {
                self.apply(slot, now, DataVerdict::Drop, None, UpdateSource::Host);
            } else {
                for d in [Direction::Outbound, Direction::Inbound] {
                    if e.mode(d) == RULES_READ {
                        e.set_mode(d, Mode::Allow);
                    }
                }
                self.note_host(slot, now, before);
            }
        } else {
            // An inspect rule's other window (or none) ends with the flow's verdict too.
            for d in [Direction::Outbound, Direction::Inbound] {
                e.set_mode(d, mode_of(verdict, e.offset(d)));
            }
            self.after_change(slot, now, before, None, UpdateSource::Host);
        }
        self.review_held(slot, now);
    }

    /// The host is known and the verdict stays: say so once (the update names the host).
    fn note_host(&mut self, slot: Slot, now: Instant, before: ((Mode, Mode), crate::verdict::FlowVerdict)) {
        self.after_change(slot, now, before, None, UpdateSource::Host);
    }

    /// Shows the product filter the bytes of its window that are in order now. Returns whether
    /// it was shown anything.
    fn show_filter(&mut self, slot: Slot, now: Instant, dir: Direction) -> bool {
        let Some(e) = self.table.get(slot) else { return false };
        if !e.has(bits::FILTER_INSPECTS) {
            return false;
        }
        let Mode::Inspect { pass_end, peek_end } = e.mode(dir) else { return false };
        let Some(side) = e.inspection().map(|i| &i.sides[index(dir)]) else { return false };
        let Some(buf) = side.buf.as_ref() else { return false };
        let from = side.shown.max(pass_end).max(buf.start());
        let to = buf.contiguous_end().min(peek_end);
        if from >= to {
            return false;
        }
        let lo = (from - buf.start()) as usize;
        let hi = (to - buf.start()) as usize;
        let Some(shown) = buf.contiguous().get(lo..hi) else { return false };
        let flow = e.flow(&self.interfaces);
        let shown = shown.to_vec();
        if let Some(side) = self.table.get_mut(slot).and_then(|e| e.inspection_mut()).map(|i| &mut i.sides[index(dir)])
        {
            side.shown = to;
        }
        let verdict = match self.call_filter("data", flow.id, |f| f.data(&flow, dir, from, &shown)) {
            Some(Ok(v)) => v,
            Some(Err(())) => self.fail_verdict(),
            None => DataVerdict::Allow,
        };
        self.apply_data(slot, now, dir, verdict, to);
        true
    }

    /// Goes through the flow's held packets with the verdicts as they are now: releases what is
    /// judged, drops what is dropped (a TCP packet straddling the line of a dropped direction
    /// lets its judged part through), keeps the rest; bytes of packets held before inspection
    /// began (while paused) are read now.
    pub(super) fn review_held(&mut self, slot: Slot, now: Instant) {
        let Some(e) = self.table.get_mut(slot) else { return };
        // Packets held while paused whose direction is inspected now: their bytes go in first.
        let fresh: Vec<(Direction, u64, Vec<u8>)> = e
            .held()
            .iter()
            .filter(|h| !h.ingested && inspected(e, h.dir))
            .filter_map(|h| h.bytes.as_ref().map(|b| (h.dir, h.start, b.to_vec())))
            .collect();
        if !fresh.is_empty() {
            let span = self.config.max_inspect_span;
            for (dir, start, raw) in &fresh {
                let Ok(p) = crate::packet::parse(raw) else { continue };
                let line_now = line(e, *dir);
                if e.inspection().is_none() {
                    e.set_inspection(Some(Box::default()));
                }
                let Some(insp) = e.inspection_mut() else { continue };
                let buf =
                    insp.sides[index(*dir)].buf.get_or_insert_with(|| Reassembler::new(line_now.min(*start), span));
                let _ = buf.insert(*start, p.payload);
            }
            let mut held = e.take_held();
            for h in &mut held {
                if inspected(e, h.dir) {
                    h.ingested = true;
                }
            }
            e.keep_held(held);
            let udp = e.protocol == Protocol::Udp;
            for (dir, _, raw) in &fresh {
                if udp && let Ok(p) = crate::packet::parse(raw) {
                    self.sniff_datagram(slot, now, *dir, p.payload);
                }
            }
            for dir in [Direction::Outbound, Direction::Inbound] {
                if fresh.iter().any(|f| f.0 == dir) {
                    self.progress(slot, now, dir);
                }
            }
        }
        let Some(e) = self.table.get_mut(slot) else { return };
        let held = e.take_held();
        if held.is_empty() {
            self.tidy_inspection(slot, false);
            return;
        }
        let mut kept = Vec::new();
        let mut out = Vec::new();
        for h in held {
            let mode = e.mode(h.dir);
            let line_now = line(e, h.dir);
            let paused = mode == Mode::Pause;
            let fate = if paused {
                None
            } else if mode == Mode::Drop {
                let allowed = e.inspection().map_or(0, |i| i.sides[index(h.dir)].allowed);
                if h.start < allowed && allowed < h.end {
                    let keep = (allowed - h.start) as usize;
                    match h.bytes.as_deref().and_then(|b| crate::packet::with_payload_prefix(b, keep)) {
                        Some(cut) => {
                            self.rewrites.insert(h.id, cut);
                            Some(true)
                        }
                        None => Some(false),
                    }
                } else {
                    Some(h.end <= allowed && h.end > h.start)
                }
            } else if h.end <= line_now || !inspected(e, h.dir) || (h.end == h.start) {
                Some(true)
            } else {
                None
            };
            match fate {
                Some(accept) => out.push(Release { packet: h.id, accept }),
                None => kept.push(h),
            }
        }
        // What passes moves each direction's judged mark; bytes well behind it are forgotten
        // (the recent ones are kept to compare retransmissions with), so a window far into the
        // stream still fits the span.
        let half_span = self.config.max_inspect_span as u64 / 2;
        for d in [Direction::Outbound, Direction::Inbound] {
            let l = line(e, d);
            if e.mode(d) != Mode::Drop
                && l != u64::MAX
                && let Some(i) = e.inspection_mut()
            {
                let side = &mut i.sides[index(d)];
                side.allowed = side.allowed.max(l);
                if let Some(buf) = side.buf.as_mut()
                    && l > buf.start() + half_span
                {
                    buf.forget_before(l - half_span);
                }
            }
        }
        let still = !kept.is_empty();
        e.keep_held(kept);
        for r in out {
            if self.held.remove(&r.packet).is_some() {
                self.releases.push_back(r);
            } else {
                self.rewrites.remove(&r.packet);
            }
        }
        self.tidy_inspection(slot, still);
    }

    /// Frees what inspection no longer needs: the buffers of directions no longer inspected,
    /// the whole state once nothing is inspected or held.
    fn tidy_inspection(&mut self, slot: Slot, holding: bool) {
        let Some(e) = self.table.get_mut(slot) else { return };
        let tcp = e.protocol == Protocol::Tcp;
        // A local socket's retransmissions come from its own send queue, the same bytes: only
        // a sender elsewhere (inbound bytes, a forwarded flow) can send a different copy. Live,
        // that spares local flows the packets until the acknowledgement; without a kernel to hand
        // flows to (replay, where who sent a capture's packets is not known) every direction is
        // compared.
        let remote_sender = [e.has(bits::FORWARDED) || !self.config.kernel_offload, true];
        let modes = [e.mode(Direction::Outbound), e.mode(Direction::Inbound)];
        let ends = [e.offset(Direction::Outbound), e.offset(Direction::Inbound)];
        let Some(i) = e.inspection_mut() else { return };
        for k in 0..2 {
            let sniffed_here = i.sniff.as_ref().is_some_and(|s| index(s.dir) == k);
            let side = &mut i.sides[k];
            match modes[k] {
                Mode::Inspect { .. } | Mode::Pause => {}
                Mode::Drop => {
                    side.buf = None;
                    side.verify_to = None;
                }
                Mode::Allow if sniffed_here || side.verify_to.is_some() => {}
                Mode::Allow => {
                    // Judged and passing: compare copies until the receiver has the bytes.
                    if tcp && remote_sender[k] && side.buf.as_ref().is_some_and(|b| b.contiguous_end() > b.start()) {
                        side.verify_to = Some(ends[k]);
                    } else {
                        side.buf = None;
                    }
                }
            }
        }
        if !holding {
            i.deadline = None;
        }
        let idle = i.sides.iter().all(|s| s.buf.is_none() && s.verify_to.is_none());
        if !holding && i.sniff.is_none() && idle {
            e.set_inspection(None);
        }
    }

    /// A TCP acknowledgment travelling in `dir`: the other direction's receiver has the bytes
    /// before `ack`, so a verified direction whose judged bytes it covers is done comparing.
    pub(super) fn acknowledged(&mut self, slot: Slot, dir: Direction, ack: u32) {
        let other = match dir {
            Direction::Outbound => Direction::Inbound,
            Direction::Inbound => Direction::Outbound,
        };
        let Some(e) = self.table.get_mut(slot) else { return };
        let Some(next) = e.next_seq(other) else { return };
        let at = e.offset(other) as i64 + i64::from(ack.wrapping_sub(next) as i32);
        let Some(i) = e.inspection_mut() else { return };
        let side = &mut i.sides[index(other)];
        if side.verify_to.is_some_and(|v| at >= v as i64) {
            side.verify_to = None;
            side.buf = None;
            let held = !e.held().is_empty();
            self.tidy_inspection(slot, held);
        }
    }

    /// A datagram (UDP and other non-TCP payloads) of an inspected direction.
    pub(super) fn inspect_datagram(
        &mut self,
        slot: Slot,
        now: Instant,
        dir: Direction,
        range: (u64, u64),
        p: &ParsedPacket<'_>,
        raw: &[u8],
    ) -> PacketAction {
        let Some(e) = self.table.get_mut(slot) else { return PacketAction::Accept };
        if range.1 <= line(e, dir) {
            return PacketAction::Accept;
        }
        let action = self.hold_packet(slot, now, dir, range, raw, true);
        let PacketAction::Hold(id) = action else { return action };
        let span = self.config.max_inspect_span;
        if let Some(e) = self.table.get_mut(slot) {
            let line_now = line(e, dir);
            if let Some(i) = e.inspection_mut() {
                let buf = i.sides[index(dir)].buf.get_or_insert_with(|| Reassembler::new(line_now.min(range.0), span));
                if buf.start() < range.0 && !buf.has(buf.start(), range.0) {
                    // Datagrams are whole: what came before is judged already.
                    buf.forget_before(range.0);
                }
                let _ = buf.insert(range.0, p.payload);
            }
        }
        self.sniff_datagram(slot, now, dir, p.payload);
        self.progress(slot, now, dir);
        self.review_held(slot, now);
        self.take_own_release(id)
    }

    /// Direction `dir` ended (FIN) while it may be under inspection.
    pub(super) fn complete(&mut self, slot: Slot, now: Instant, dir: Direction) {
        let Some(e) = self.table.get(slot) else { return };
        if e.inspection().and_then(|i| i.sniff.as_ref()).is_some_and(|s| s.dir == dir) {
            // No more bytes will come to name the host.
            self.end_sniffing(slot, now, None);
        }
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
        self.review_held(slot, now);
    }

    /// Held bytes that waited past the hold timeout get the configured verdict: drop, or allow
    /// (then the rules' wait for a name ends with what is known, and they judge first).
    pub(super) fn expire_holds(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.hold_deadlines.front() {
            if at > now {
                break;
            }
            self.hold_deadlines.pop_front();
            let Some(slot) = self.table.slot_of(id) else { continue };
            let Some(e) = self.table.get(slot) else { continue };
            if e.inspection().and_then(|i| i.deadline) != Some(at) {
                continue;
            }
            if e.held().is_empty() && !e.inspection().is_some_and(Inspection::sniffing) {
                if let Some(i) = self.table.get_mut(slot).and_then(|e| e.inspection_mut()) {
                    i.deadline = None;
                }
                continue;
            }
            self.stats.hold_timeouts += 1;
            if let Some(i) = self.table.get_mut(slot).and_then(|e| e.inspection_mut()) {
                i.deadline = None;
            }
            if self.table.get(slot).and_then(|e| e.inspection()).is_some_and(Inspection::sniffing) {
                if self.config.hold_timeout_drop {
                    // Bytes that looked like the start of a name and never finished (a hello sent
                    // a byte at a time, slower than the timeout) must not pass as nameless.
                    if let Some(i) = self.table.get_mut(slot).and_then(|e| e.inspection_mut()) {
                        i.stop_sniffing();
                    }
                } else {
                    self.end_sniffing(slot, now, None);
                }
            }
            let undecided = self.table.get(slot).is_some_and(|e| !e.held().is_empty());
            if undecided {
                let verdict = if self.config.hold_timeout_drop { DataVerdict::Drop } else { DataVerdict::Allow };
                self.apply(slot, now, verdict, None, UpdateSource::Timeout);
                self.review_held(slot, now);
            }
        }
        if self.hold_deadlines.len() > 2 * self.table.len() + 64 {
            // Deadlines of flows that got their verdict stay behind; drop them now and then.
            let table = &self.table;
            self.hold_deadlines.retain(|&(at, id)| {
                table.slot_of(id).and_then(|s| table.get(s)).and_then(|e| e.inspection()).and_then(|i| i.deadline)
                    == Some(at)
            });
        }
    }

    /// A DNS flow's packet (see [`bits::WATCH`]): an answer teaches which addresses a name has.
    pub(super) fn read_dns(&mut self, slot: Slot, now: Instant, dir: Direction, start: u64, payload: &[u8]) {
        let Some(e) = self.table.get(slot) else { return };
        // Answers travel back to the opener.
        if dir == opener(e) {
            return;
        }
        let message = match e.protocol {
            Protocol::Udp => sniff::dns::message(payload),
            Protocol::Tcp if start == 0 => sniff::dns::tcp_message(payload),
            _ => return,
        };
        if let Sniff::Found(m) = message
            && m.response
        {
            let names =
                self.dns_names.get_or_insert_with(|| Arc::new(crate::dns_names::DnsNames::new(super::DNS_NAMES)));
            let n = names.learn(&m, now);
            self.stats.dns_learnt += n as u64;
        }
    }

    /// The name a DNS answer gave `remote`, as a host for a new flow.
    pub(super) fn dns_host(&self, remote: IpAddr, now: Instant) -> Option<Arc<Host>> {
        let name = self.dns_names.as_ref()?.lookup(remote, now)?;
        Some(Arc::new(Host { name: Some(name), source: Some(HostSource::Dns), ..Host::default() }))
    }
}
