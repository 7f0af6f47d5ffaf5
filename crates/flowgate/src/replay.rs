//! Replay: drive the engine with the packets of a capture file, in capture time.
//!
//! `flowgate replay` answers "what would these rules have done?" without privileges: it reads a
//! pcap or pcapng file, cuts each frame down to its IP packet, feeds the engine with the frame's
//! timestamp as the clock, fires idle timeouts at the instants they fall due, and writes every
//! event as a JSON line. The interface name comes from the pcapng interface block where the
//! capture recorded it. This module touches only the capture file and the writer it is given.
//!
//! **Reading.** This module cuts the file into records itself (a pcap record header and its
//! bytes; a pcapng block by its length field) and hands each complete record to `pcap-file`'s
//! slice parsers (`PcapParser`, `PcapNgParser`), which decode the headers, blocks and options.
//! It does not use `pcap-file`'s readers, because through them a file cut in the middle, a
//! corrupt length field and a real I/O error all come out as "unexpected end of file", with no
//! position, after buffering up to 8 MB; framing here gives every error the byte offset of the
//! record and the frame number, caps what a length field can make it read (a block at 64 MiB, a
//! pcap record at the larger of the snap length and 256 KiB), and can never loop: every record
//! read moves the offset forward by at least 12 bytes. `pcap-file` 2.0 also refuses a pcap record
//! whose original length exceeds the snap length, i.e. every packet a snap length cut, so the
//! pcap record fields are checked here instead: captured length at most the original length,
//! timestamp fraction below one second.
//!
//! Every problem with the file is an error naming the file, the byte offset and the frame:
//! a file or block cut short, a block length that is not a multiple of 4, below the minimum,
//! above the cap or unequal to its trailer, a block `pcap-file` cannot decode, a pcapng major
//! version other than 1, a packet naming an interface the section has not described (also a
//! packet before any interface block), a captured length above the original length, a timestamp
//! that is not a time between 1970 and the end of 9999 (events carry RFC 3339 times), and a frame
//! of a link type this module cannot read (an interface of such a type without packets is no
//! error). The frames before the problem have been replayed and their events written. Blocks the
//! replay does not need (statistics, name resolution, custom, ...) are checked for their framing
//! only. Within well-framed records, what is wrong with a packet is counted and skipped: a frame
//! too short for its link header reaches the engine empty and counts as truncated, like a packet
//! a snap length cut; frames that carry no IP (ARP, ...) are counted as `non_ip_frames`.
//!
//! **pcapng timestamps.** `pcap-file` 2.0 returns an Enhanced Packet Block's timestamp as a
//! `Duration` of that many nanoseconds whatever the interface's resolution, so the raw 64-bit
//! count is taken back out of it and scaled here by the interface's `if_tsresol` (high bit clear:
//! units of 10^-n s; high bit set: 2^-n s; n up to 127; default 10^-6) in 128-bit integers, plus
//! its `if_tsoffset` (whole seconds, signed). The obsolete Packet Block's timestamp is read by
//! `pcap-file` as one 64-bit word, which is right only in big-endian sections; its halves are
//! swapped back for little-endian ones. A Simple Packet Block has no timestamp: it gets the time
//! of the frame before it (the epoch if it is the first), and its captured length is the
//! smaller of its original length and interface 0's snap length, as the format defines.
//!
//! **Link layers.** Ethernet (any number of 802.1Q / 802.1ad / QinQ tags) and Linux cooked v1
//! frames are read with `etherparse`'s link-layer slices (`Ethernet2Slice`, `SingleVlanSlice`,
//! `LinuxSllSlice`, `LinuxSllProtocolType`), not with `SlicedPacket::from_ethernet`, which also
//! validates the IP and transport headers and refuses the whole frame when they are cut or
//! malformed: the engine parses the IP packet itself and must see such packets to count them.
//! Three small pieces are read by hand, because `etherparse` 0.21 has no parser for them:
//! - Linux cooked v2 (`LINKTYPE_LINUX_SLL2`): a fixed 20-byte header whose protocol and ARPHRD
//!   fields (offsets 0 and 8) are then interpreted by `etherparse`'s `LinuxSllProtocolType`
//!   exactly as for v1;
//! - Linux cooked v1 frames `etherparse` refuses: it knows five ARPHRD device types (Ethernet,
//!   netlink, GRE, radiotap, FRAD) and packet types 0 to 7, but a capture on `any` also holds
//!   frames of loopback (772), tun and WireGuard (65534), PPP (512) and IP tunnel (768, 769, 776)
//!   devices, whose protocol field is an ethertype as well (libpcap and Wireshark read it so);
//!   for those the protocol field (offset 14) is read directly;
//! - BSD loopback (`NULL`, `LOOP`): a 4-byte address family (host byte order for `NULL`, big
//!   endian for `LOOP`; both orders are accepted), `AF_INET` = 2, `AF_INET6` = 10, 24, 28 or 30
//!   depending on the capturing OS.
//!
//! Raw IP (`RAW`, `IPV4`, `IPV6`) frames are the IP packet itself.
//!
//! **IP fragments.** A capture holds fragments as they were on the wire, whereas live the kernel
//! (conntrack's defragmentation) hands NFQUEUE whole datagrams. So the replay puts fragments
//! together first (`flowgate_core::defrag`, default limits: 1024 datagrams, 4 MiB, 30 s) and
//! the engine sees each datagram once, whole, at the time of its last fragment. The summary
//! counts the datagrams put together, those refused (fragments overlapping with different
//! bytes, or that cannot be put together: none of their fragments reaches the engine), those
//! never completed, and the fragments over the limits (passed on as they are: the engine counts
//! them as fragments).

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use etherparse::err::linux_sll::HeaderSliceError;
use etherparse::{
    ArpHardwareId, EtherPayloadSlice, EtherType, Ethernet2Slice, LenSource, LinuxSllProtocolType, LinuxSllSlice,
    SingleVlanSlice,
};
use flowgate_core::defrag::{Defrag, DefragLimits, Defragmenter};
use flowgate_core::{Engine, Event, EventFormat, Instant, Origin, PacketMeta, Stats};
use pcap_file::pcap::PcapParser;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::blocks::{
    ENHANCED_PACKET_BLOCK, INTERFACE_DESCRIPTION_BLOCK, INTERFACE_STATISTIC_BLOCK, NAME_RESOLUTION_BLOCK, PACKET_BLOCK,
    SECTION_HEADER_BLOCK, SIMPLE_PACKET_BLOCK, SYSTEMD_JOURNAL_EXPORT_BLOCK,
};
use pcap_file::pcapng::{Block, PcapNgParser};
use pcap_file::{DataLink, Endianness, PcapError, TsResolution};
use serde::Serialize;

/// What a replay saw, beyond the events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub frames: u64,
    /// Frames that do not carry IP (ARP, LLDP, ...). Frames of link types the replay cannot read
    /// are an error, not counted here.
    pub non_ip_frames: u64,
    /// IP datagrams put together from their fragments (each reached the engine once, whole).
    pub datagrams_reassembled: u64,
    /// Datagrams refused: fragments overlapping with different bytes, or that cannot be put
    /// together (past 65,535 bytes, two different ends, IPv6 overlaps). None of their fragments
    /// reached the engine.
    pub datagrams_refused: u64,
    /// Datagrams whose fragments never all arrived (timed out, or still missing at the end).
    pub datagrams_incomplete: u64,
    /// Fragments over the reassembly limits, passed to the engine as they are (which counts them
    /// as fragments).
    pub fragments_over_limits: u64,
    pub events: u64,
    #[serde(flatten)]
    pub engine: Stats,
}

/// A capture could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: cannot open capture: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read capture at byte {offset}: {source}")]
    Read { path: PathBuf, offset: u64, source: io::Error },
    #[error("{path}: not a pcap or pcapng capture (unknown magic number {magic:#010x})")]
    Format { path: PathBuf, magic: u32 },
    /// The file is cut short or corrupt at `offset` (the start of the record or block at fault);
    /// the message names the frame where one is concerned.
    #[error("{path}: broken capture at byte {offset}: {message}")]
    Corrupt { path: PathBuf, offset: u64, message: String },
    #[error("writing events: {0}")]
    Output(#[from] io::Error),
}

/// One frame cut down to what the engine needs.
struct Frame<'a> {
    time: Instant,
    interface: Option<&'a str>,
    link: DataLink,
    data: &'a [u8],
}

/// Replays `path` through `engine`, writing each event as one JSON line to `out`.
pub fn replay(engine: &mut Engine, path: &Path, out: &mut dyn Write) -> Result<Summary, ReplayError> {
    replay_as(engine, path, out, EventFormat::Flowgate)
}

/// Replays `path` through `engine`, writing each event's records in `format` (`event_format`)
/// to `out`, one JSON line each.
pub fn replay_as(
    engine: &mut Engine,
    path: &Path,
    out: &mut dyn Write,
    format: EventFormat,
) -> Result<Summary, ReplayError> {
    let mut summary = Summary::default();
    let mut last = Instant::ZERO;
    let mut defrag = Defragmenter::new(DefragLimits::default());
    let mut buf = Vec::with_capacity(4096);
    let mut write_events = |engine: &mut Engine, summary: &mut Summary| -> io::Result<()> {
        while let Some(e) = engine.poll_event() {
            buf.clear();
            format.write(&e, &mut buf).map_err(io::Error::other)?;
            out.write_all(&buf)?;
            summary.events += 1;
        }
        // Held packets have nowhere to go in a replay; their release is only counted by the engine.
        while let Some(r) = engine.poll_release() {
            // Nothing goes out in replay: a cut packet's new bytes are not needed.
            let _ = engine.take_rewrite(r.packet);
        }
        Ok(())
    };
    for_each_frame(path, |frame| {
        summary.frames += 1;
        // Fire the timers that fell due before this frame, each at its own instant.
        while let Some(t) = engine.poll_timeout().filter(|&t| t <= frame.time) {
            engine.handle_timeout(t);
        }
        let meta = PacketMeta { interface: frame.interface, origin: Origin::Unknown };
        // A replay only reports what would have happened; the decisions themselves are unused.
        match link_payload(frame.link, frame.data) {
            Link::Ip(ip) => {
                defrag.expire(frame.time);
                match defrag.push(frame.time, ip) {
                    Defrag::NotFragment | Defrag::Overflow => {
                        let _ = engine.handle_packet(frame.time, meta, ip);
                    }
                    Defrag::Complete(whole) => {
                        let _ = engine.handle_packet(frame.time, meta, &whole);
                    }
                    Defrag::Incomplete | Defrag::Refused => {}
                }
            }
            // Cut inside its link header: the engine counts an empty packet as truncated.
            Link::Truncated => {
                let _ = engine.handle_packet(frame.time, meta, &[]);
            }
            Link::NotIp => summary.non_ip_frames += 1,
        }
        last = last.max(frame.time);
        write_events(engine, &mut summary)
    })?;
    // Idle timeouts that fall inside the capture's span already fired; what is still open
    // closes at the end of the capture.
    engine.close_all(last);
    write_events(engine, &mut summary)?;
    summary.engine = engine.stats();
    let d = defrag.stats();
    summary.datagrams_reassembled = d.completed;
    summary.datagrams_refused = d.refused;
    summary.datagrams_incomplete = d.expired + defrag.pending() as u64;
    summary.fragments_over_limits = d.overflow;
    Ok(summary)
}

/// Writes one event as a JSON line.
pub fn write_event(out: &mut dyn Write, e: &Event) -> io::Result<()> {
    serde_json::to_writer(&mut *out, e).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

/// The latest instant an event can carry: its time is printed in RFC 3339, which ends with 9999.
const LAST_MICROS: u64 = 253_402_300_800_000_000 - 1;

/// The largest pcapng block read (libpcap stops at 16 MiB; a packet block holds one packet).
const MAX_BLOCK: u32 = 64 << 20;

/// The largest pcap record accepted whatever the file's snap length (libpcap's default).
const MIN_RECORD_CAP: u32 = 256 << 10;

/// The capture file, read record by record, with the offset of the next unread byte.
struct Input<'p> {
    path: &'p Path,
    file: BufReader<File>,
    offset: u64,
}

impl Input<'_> {
    /// Appends up to `n` more bytes of the file to `buf`; fewer only at the end of the file.
    /// Memory grows with the bytes actually read, not with `n`.
    fn read_into(&mut self, buf: &mut Vec<u8>, n: usize) -> Result<usize, ReplayError> {
        let start = buf.len();
        while buf.len() - start < n {
            let available = match self.file.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let offset = self.offset + (buf.len() - start) as u64;
                    return Err(ReplayError::Read { path: self.path.to_path_buf(), offset, source });
                }
            };
            if available.is_empty() {
                break;
            }
            let take = available.len().min(n - (buf.len() - start));
            buf.extend_from_slice(&available[..take]);
            self.file.consume(take);
        }
        let got = buf.len() - start;
        self.offset += got as u64;
        Ok(got)
    }

    fn corrupt(&self, offset: u64, message: impl Into<String>) -> ReplayError {
        ReplayError::Corrupt { path: self.path.to_path_buf(), offset, message: message.into() }
    }
}

fn for_each_frame(path: &Path, f: impl FnMut(Frame<'_>) -> io::Result<()>) -> Result<(), ReplayError> {
    let open_err = |source| ReplayError::Open { path: path.to_path_buf(), source };
    let mut file = BufReader::with_capacity(1 << 16, File::open(path).map_err(open_err)?);
    // Peek at the magic number without consuming it; the parsers read the header themselves.
    let head = file.fill_buf().map_err(open_err)?;
    let magic = head.get(..4).map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    let mut input = Input { path, file, offset: 0 };
    match magic {
        Some(0xa1b2_c3d4 | 0xd4c3_b2a1 | 0xa1b2_3c4d | 0x4d3c_b2a1) => read_pcap(&mut input, f),
        Some(0x0a0d_0d0a) => read_pcapng(&mut input, f),
        Some(other) => Err(ReplayError::Format { path: path.to_path_buf(), magic: other }),
        None => Err(input.corrupt(0, "file is shorter than a capture header")),
    }
}

/// Reads a pcap file (either byte order, microsecond or nanosecond timestamps).
fn read_pcap(input: &mut Input<'_>, mut f: impl FnMut(Frame<'_>) -> io::Result<()>) -> Result<(), ReplayError> {
    let mut buf = Vec::with_capacity(64 << 10);
    let got = input.read_into(&mut buf, 24)?;
    if got < 24 {
        return Err(input.corrupt(0, format!("the file ends inside the pcap file header ({got} of 24 bytes)")));
    }
    let (_, parser) = PcapParser::new(&buf).map_err(|e| input.corrupt(0, describe(&e)))?;
    let header = parser.header();
    // The upper 16 bits of the link type field may carry FCS information; the type is the rest.
    let link = DataLink::from(u32::from(header.datalink) & 0xffff);
    let cap = header.snaplen.max(MIN_RECORD_CAP);
    let be = header.endianness == Endianness::Big;
    let word = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if be { u32::from_be_bytes(w) } else { u32::from_le_bytes(w) }
    };
    let (frac_limit, frac_per_micro) = match header.ts_resolution {
        TsResolution::MicroSecond => (1_000_000, 1),
        TsResolution::NanoSecond => (1_000_000_000, 1_000),
    };
    let mut frame = 0u64;
    loop {
        let at = input.offset;
        buf.clear();
        let got = input.read_into(&mut buf, 16)?;
        if got == 0 {
            return Ok(());
        }
        frame += 1;
        if got < 16 {
            return Err(
                input.corrupt(at, format!("the file ends inside the header of frame {frame} ({got} of 16 bytes)"))
            );
        }
        let (incl_len, orig_len) = (word(&buf, 8), word(&buf, 12));
        if incl_len > cap {
            return Err(input.corrupt(
                at,
                format!(
                    "frame {frame} says it holds {incl_len} bytes, more than any record of this capture may \
                     ({cap}: the larger of its snap length {} and 256 KiB): its record header is corrupt",
                    header.snaplen
                ),
            ));
        }
        let got = input.read_into(&mut buf, incl_len as usize)?;
        if got < incl_len as usize {
            return Err(input.corrupt(
                at,
                format!("the file ends inside frame {frame}: its record holds {incl_len} bytes, {got} are left"),
            ));
        }
        let (_, raw) =
            parser.next_raw_packet(&buf).map_err(|e| input.corrupt(at, format!("frame {frame}: {}", describe(&e))))?;
        if incl_len > orig_len {
            return Err(input.corrupt(
                at,
                format!("frame {frame}: captured length {incl_len} is more than the original length {orig_len}"),
            ));
        }
        if raw.ts_frac >= frac_limit {
            return Err(input.corrupt(
                at,
                format!("frame {frame}: timestamp fraction {} is not below one second ({frac_limit})", raw.ts_frac),
            ));
        }
        let time = Instant::from_micros(u64::from(raw.ts_sec) * 1_000_000 + u64::from(raw.ts_frac / frac_per_micro));
        if !supported(link) {
            return Err(input.corrupt(at, format!("frame {frame}: {}", unsupported(link))));
        }
        f(Frame { time, interface: None, link, data: &raw.data })?;
    }
}

/// What the replay keeps of a pcapng Interface Description Block.
struct Interface {
    link: DataLink,
    name: Option<String>,
    snaplen: u32,
    tsresol: u8,
    tsoffset: i64,
}

/// Reads a pcapng file: any number of sections, of either byte order.
fn read_pcapng(input: &mut Input<'_>, mut f: impl FnMut(Frame<'_>) -> io::Result<()>) -> Result<(), ReplayError> {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut parser: Option<PcapNgParser> = None;
    let mut interfaces: Vec<Interface> = Vec::new();
    let mut frames = 0u64;
    let mut last_time = Instant::ZERO;
    loop {
        let at = input.offset;
        buf.clear();
        // Block type, block length, and (for a section header) the byte-order magic.
        let got = input.read_into(&mut buf, 12)?;
        if got == 0 {
            return Ok(());
        }
        if got < 12 {
            return Err(input.corrupt(at, format!("the file ends inside a block header ({got} of 12 bytes)")));
        }
        let shb = buf[..4] == SECTION_HEADER_BLOCK.to_le_bytes();
        let endianness = match (shb, &parser) {
            (true, _) => match [buf[8], buf[9], buf[10], buf[11]] {
                [0x1a, 0x2b, 0x3c, 0x4d] => Endianness::Big,
                [0x4d, 0x3c, 0x2b, 0x1a] => Endianness::Little,
                m => {
                    return Err(
                        input.corrupt(at, format!("section header block with an unknown byte-order magic {m:02x?}"))
                    );
                }
            },
            (false, Some(p)) => p.section().endianness,
            // The magic number was checked: the first block is a section header.
            (false, None) => return Err(input.corrupt(at, "the file does not start with a section header block")),
        };
        let word = |b: &[u8], at: usize| {
            let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            if endianness == Endianness::Big { u32::from_be_bytes(w) } else { u32::from_le_bytes(w) }
        };
        let (kind, len) = (word(&buf, 0), word(&buf, 4));
        let name = block_name(kind);
        let min = if shb { 28 } else { 12 };
        if len % 4 != 0 || len < min {
            return Err(input.corrupt(
                at,
                format!("{name} has an impossible length {len} (a multiple of 4, at least {min}, is needed)"),
            ));
        }
        if len > MAX_BLOCK {
            return Err(input.corrupt(
                at,
                format!(
                    "{name} says it is {len} bytes long, more than the {} MiB a block may be: its length is corrupt",
                    MAX_BLOCK >> 20
                ),
            ));
        }
        let rest = (len - 12) as usize;
        let got = input.read_into(&mut buf, rest)?;
        if got < rest {
            return Err(input.corrupt(
                at,
                format!("the file ends inside this {name}: it is {len} bytes long, {} are left", 12 + got),
            ));
        }
        let is_frame = matches!(kind, ENHANCED_PACKET_BLOCK | SIMPLE_PACKET_BLOCK | PACKET_BLOCK);
        let what = What { name, frame: is_frame.then_some(frames + 1) };
        let trailer = word(&buf, buf.len() - 4);
        if trailer != len {
            return Err(input.corrupt(
                at,
                format!(
                    "{what}: its length field says {len} bytes but the copy that ends it says {trailer}: one is wrong"
                ),
            ));
        }
        let bad = |e: PcapError| input.corrupt(at, format!("{what}: {}", describe(&e)));
        let Some(p) = parser.as_mut() else {
            let (_, p) = PcapNgParser::new(&buf).map_err(bad)?;
            check_version(input, at, &p)?;
            parser = Some(p);
            continue;
        };
        // Only the blocks that matter are decoded; the others are checked for their framing.
        if !(shb || is_frame || kind == INTERFACE_DESCRIPTION_BLOCK) {
            p.next_raw_block(&buf).map_err(bad)?;
            continue;
        }
        let (_, block) = p.next_block(&buf).map_err(bad)?;
        // Where a frame block's interface was described, and what is wrong with it.
        let iface = |id: u32| {
            interfaces.get(id as usize).ok_or_else(|| {
                let known = match interfaces.len() {
                    0 => "none is described yet (a packet block came before any interface block)".to_string(),
                    1 => "only interface 0 is described".to_string(),
                    n => format!("only interfaces 0 to {} are described", n - 1),
                };
                input.corrupt(at, format!("{what} names interface {id}, but in this section {known}"))
            })
        };
        let check = |i: &Interface, captured: usize, original: u32| {
            if captured > original as usize {
                return Err(input.corrupt(
                    at,
                    format!("{what}: captured length {captured} is more than the original length {original}"),
                ));
            }
            if !supported(i.link) {
                return Err(input.corrupt(at, format!("{what}: {}", unsupported(i.link))));
            }
            Ok(())
        };
        let at_time = |i: &Interface, raw: u64| {
            pcapng_time(raw, i.tsresol, i.tsoffset).map_err(|e| input.corrupt(at, format!("{what}: {e}")))
        };
        match block {
            Block::SectionHeader(_) => {
                check_version(input, at, p)?;
                interfaces.clear();
            }
            Block::InterfaceDescription(idb) => {
                let mut i = Interface { link: idb.linktype, name: None, snaplen: idb.snaplen, tsresol: 6, tsoffset: 0 };
                for o in &idb.options {
                    match o {
                        InterfaceDescriptionOption::IfName(n) => i.name = Some(n.to_string()),
                        InterfaceDescriptionOption::IfTsResol(t) => i.tsresol = *t,
                        // A signed count of seconds (pcap-file reads it unsigned).
                        InterfaceDescriptionOption::IfTsOffset(o) => i.tsoffset = o.cast_signed(),
                        _ => {}
                    }
                }
                interfaces.push(i);
            }
            Block::EnhancedPacket(epb) => {
                let i = iface(epb.interface_id)?;
                check(i, epb.data.len(), epb.original_len)?;
                let time = at_time(i, raw_units(epb.timestamp))?;
                frames += 1;
                last_time = time;
                f(Frame { time, interface: i.name.as_deref(), link: i.link, data: &epb.data })?;
            }
            Block::Packet(pb) => {
                let i = iface(u32::from(pb.interface_id))?;
                check(i, pb.data.len(), pb.original_len)?;
                // pcap-file reads the two 32-bit halves (high first) as one word of the section's
                // byte order: right in big-endian sections, swapped in little-endian ones.
                let raw = match endianness {
                    Endianness::Big => pb.timestamp,
                    Endianness::Little => pb.timestamp.rotate_left(32),
                };
                let time = at_time(i, raw)?;
                frames += 1;
                last_time = time;
                f(Frame { time, interface: i.name.as_deref(), link: i.link, data: &pb.data })?;
            }
            Block::SimplePacket(spb) => {
                let i = iface(0)?;
                // pcap-file leaves the padding in the data: the captured length is the original
                // length, cut at the interface's snap length (0: none).
                let mut len = spb.data.len().min(spb.original_len as usize);
                if i.snaplen != 0 {
                    len = len.min(i.snaplen as usize);
                }
                check(i, len, spb.original_len)?;
                frames += 1;
                f(Frame { time: last_time, interface: i.name.as_deref(), link: i.link, data: &spb.data[..len] })?;
            }
            _ => {}
        }
    }
}

/// A block as messages name it: "frame 7 (enhanced packet block)", or the block's name. Formatted
/// only when something is wrong.
#[derive(Clone, Copy)]
struct What {
    name: &'static str,
    frame: Option<u64>,
}

impl fmt::Display for What {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.frame {
            Some(n) => write!(f, "frame {n} ({})", self.name),
            None => f.write_str(self.name),
        }
    }
}

/// A section of another major version has other block layouts.
fn check_version(input: &Input<'_>, at: u64, parser: &PcapNgParser) -> Result<(), ReplayError> {
    let s = parser.section();
    if s.major_version == 1 {
        return Ok(());
    }
    Err(input
        .corrupt(at, format!("pcapng version {}.{} is not supported (only 1.x)", s.major_version, s.minor_version)))
}

/// The raw timestamp of an Enhanced Packet Block: pcap-file 2.0 returns the 64-bit count of
/// if_tsresol units as that many nanoseconds, so the count comes back out exactly.
fn raw_units(d: Duration) -> u64 {
    // pcap-file built the Duration from a u64 count of nanoseconds, so this never saturates.
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn block_name(kind: u32) -> &'static str {
    match kind {
        SECTION_HEADER_BLOCK => "section header block",
        INTERFACE_DESCRIPTION_BLOCK => "interface description block",
        PACKET_BLOCK => "packet block",
        SIMPLE_PACKET_BLOCK => "simple packet block",
        NAME_RESOLUTION_BLOCK => "name resolution block",
        INTERFACE_STATISTIC_BLOCK => "interface statistics block",
        ENHANCED_PACKET_BLOCK => "enhanced packet block",
        SYSTEMD_JOURNAL_EXPORT_BLOCK => "systemd journal export block",
        _ => "block",
    }
}

/// pcap-file's error for a record or block it was given whole.
fn describe(e: &PcapError) -> String {
    match e {
        // The parser was given the whole block: a field that needs more runs past its end.
        PcapError::IncompleteBuffer => "a field runs past the end of the block".to_string(),
        e => e.to_string(),
    }
}

/// Converts a pcapng timestamp (`raw` units of the interface's `if_tsresol`, plus `if_tsoffset`
/// seconds) to an [`Instant`], rounding down to the microsecond. Exact for every resolution:
/// the arithmetic is in 128 bits, where `raw` (< 2^64) times 10^6 (< 2^20) cannot overflow.
fn pcapng_time(raw: u64, tsresol: u8, tsoffset: i64) -> Result<Instant, String> {
    let n = u32::from(tsresol & 0x7f);
    let units = u128::from(raw);
    let micros = if tsresol & 0x80 == 0 {
        // 10^-n s. Past 10^38 the divisor does not fit 128 bits, but then it exceeds any
        // 64-bit count times 10^6 and the quotient is 0.
        if n <= 6 { units * 10u128.pow(6 - n) } else { 10u128.checked_pow(n - 6).map_or(0, |d| units / d) }
    } else {
        // 2^-n s; n <= 127, so the shift is in range.
        (units * 1_000_000) >> n
    };
    // Both terms are below 2^84 in magnitude: the sum fits an i128.
    let total = i128::try_from(micros).unwrap_or(i128::MAX) + i128::from(tsoffset) * 1_000_000;
    let stated = || {
        let unit = if tsresol & 0x80 == 0 { format!("10^-{n} s") } else { format!("2^-{n} s") };
        format!("timestamp {raw} × {unit} (if_tsresol {tsresol:#04x}) + if_tsoffset {tsoffset} s")
    };
    if total < 0 {
        return Err(format!("{} is before 1970", stated()));
    }
    match u64::try_from(total) {
        Ok(m) if m <= LAST_MICROS => Ok(Instant::from_micros(m)),
        _ => Err(format!("{} is after the year 9999", stated())),
    }
}

/// Link types [`link_payload`] reads.
fn supported(link: DataLink) -> bool {
    matches!(
        link,
        DataLink::RAW
            | DataLink::IPV4
            | DataLink::IPV6
            | DataLink::ETHERNET
            | DataLink::LINUX_SLL
            | DataLink::LINUX_SLL2
            | DataLink::NULL
            | DataLink::LOOP
    )
}

fn unsupported(link: DataLink) -> String {
    format!(
        "link type {} ({link:?}) is not supported; replay reads Ethernet (1), Linux cooked v1 (113) and v2 (276), \
         raw IP (101, 228, 229) and BSD loopback (0, 108)",
        u32::from(link)
    )
}

/// What a frame carries, as far as the replay cares.
#[derive(Debug, PartialEq, Eq)]
enum Link<'a> {
    /// The IP packet (from its IP header on).
    Ip(&'a [u8]),
    /// Another protocol (ARP, LLDP, netlink, ...).
    NotIp,
    /// Cut inside its link-layer header.
    Truncated,
}

/// The IP packet inside a frame of link type `link` (one [`supported`] says is).
fn link_payload(link: DataLink, data: &[u8]) -> Link<'_> {
    match link {
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Link::Ip(data),
        DataLink::ETHERNET => match Ethernet2Slice::from_slice_without_fcs(data) {
            Ok(eth) => ether_payload(eth.payload()),
            Err(_) => Link::Truncated,
        },
        DataLink::LINUX_SLL => match LinuxSllSlice::from_slice(data) {
            Ok(sll) => {
                let p = sll.payload();
                sll_payload(p.protocol_type, p.payload)
            }
            Err(HeaderSliceError::Len(_)) => Link::Truncated,
            // A device type or packet type etherparse does not know (see the module doc): the
            // 16-byte header is all there; its protocol field is at offset 14.
            Err(HeaderSliceError::Content(_)) => match (data.get(2..4), data.get(14..16), data.get(16..)) {
                (Some(hw), Some(proto), Some(payload)) => {
                    sll_fields(u16::from_be_bytes([hw[0], hw[1]]), u16::from_be_bytes([proto[0], proto[1]]), payload)
                }
                _ => Link::Truncated,
            },
        },
        DataLink::LINUX_SLL2 => {
            // Protocol (2), reserved (2), interface index (4), ARPHRD type (2), packet type (1),
            // address length (1), address (8).
            let (Some(h), Some(payload)) = (data.get(..20), data.get(20..)) else {
                return Link::Truncated;
            };
            sll_fields(u16::from_be_bytes([h[8], h[9]]), u16::from_be_bytes([h[0], h[1]]), payload)
        }
        DataLink::NULL | DataLink::LOOP => {
            let Some((family, payload)) = data.split_first_chunk::<4>() else {
                return Link::Truncated;
            };
            // AF_INET is 2 everywhere; AF_INET6 is 10 (Linux), 24 (OpenBSD, NetBSD), 28 (FreeBSD),
            // 30 (macOS). NULL is in the capturing host's byte order, LOOP big endian.
            let is = |af: u32| *family == af.to_le_bytes() || *family == af.to_be_bytes();
            if [2, 10, 24, 28, 30].into_iter().any(is) { Link::Ip(payload) } else { Link::NotIp }
        }
        // Refused before a frame gets here.
        _ => Link::NotIp,
    }
}

/// A Linux cooked frame's payload from its ARPHRD device type and protocol field, interpreted by
/// etherparse where it knows the device type; every other device type carries an ethertype.
fn sll_fields(arphrd: u16, protocol: u16, payload: &[u8]) -> Link<'_> {
    match LinuxSllProtocolType::try_from((ArpHardwareId(arphrd), protocol)) {
        Ok(t) => sll_payload(t, payload),
        Err(_) => {
            ether_payload(EtherPayloadSlice { ether_type: EtherType(protocol), len_source: LenSource::Slice, payload })
        }
    }
}

fn sll_payload(protocol: LinuxSllProtocolType, payload: &[u8]) -> Link<'_> {
    let ether_type = match protocol {
        LinuxSllProtocolType::EtherType(t) => t,
        // An ARPHRD_IPGRE device: GRE protocol types are ethertypes.
        LinuxSllProtocolType::GenericRoutingEncapsulationProtocolType(t) => EtherType(t),
        // Netlink families, Linux's own non-Ethernet protocol numbers, ignored fields.
        _ => return Link::NotIp,
    };
    ether_payload(EtherPayloadSlice { ether_type, len_source: LenSource::Slice, payload })
}

/// The IP packet behind an ethertype, through any number of VLAN tags.
fn ether_payload(mut p: EtherPayloadSlice<'_>) -> Link<'_> {
    loop {
        match p.ether_type {
            EtherType::IPV4 | EtherType::IPV6 => return Link::Ip(p.payload),
            // Each tag read shortens the payload by 4 bytes: the loop ends.
            EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING | EtherType::VLAN_DOUBLE_TAGGED_FRAME => {
                match SingleVlanSlice::from_slice(p.payload) {
                    Ok(vlan) => p = vlan.payload(),
                    Err(_) => return Link::Truncated,
                }
            }
            _ => return Link::NotIp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: [u8; 4] = [0x45, 0, 0, 20];

    fn with(head: &[u8]) -> Vec<u8> {
        let mut v = head.to_vec();
        v.extend_from_slice(&IP);
        v
    }

    #[test]
    fn strips_link_headers() {
        let mac = [0u8; 12];
        let eth = with(&[&mac[..], &[0x08, 0x00]].concat());
        assert_eq!(link_payload(DataLink::ETHERNET, &eth), Link::Ip(&IP));
        let vlan = with(&[&mac[..], &[0x81, 0x00, 0, 5, 0x86, 0xdd]].concat());
        assert_eq!(link_payload(DataLink::ETHERNET, &vlan), Link::Ip(&IP));
        let qinq = with(&[&mac[..], &[0x88, 0xa8, 0, 7, 0x81, 0x00, 0, 5, 0x91, 0x00, 0, 9, 0x08, 0x00]].concat());
        assert_eq!(link_payload(DataLink::ETHERNET, &qinq), Link::Ip(&IP));
        let arp = [&mac[..], &[0x08, 0x06, 0, 1]].concat();
        assert_eq!(link_payload(DataLink::ETHERNET, &arp), Link::NotIp);
        assert_eq!(link_payload(DataLink::ETHERNET, &[0u8; 13]), Link::Truncated);
        let cut_tag = [&mac[..], &[0x81, 0x00, 0, 5, 0x08]].concat();
        assert_eq!(link_payload(DataLink::ETHERNET, &cut_tag), Link::Truncated);

        // Linux cooked v1: an Ethernet device (etherparse), loopback and tun (read directly).
        for hw in [1u16, 772, 65534] {
            let mut sll = vec![0, 0];
            sll.extend_from_slice(&hw.to_be_bytes());
            sll.extend_from_slice(&[0u8; 10]);
            sll.extend_from_slice(&[0x08, 0x00]);
            assert_eq!(link_payload(DataLink::LINUX_SLL, &with(&sll)), Link::Ip(&IP), "ARPHRD {hw}");
        }
        let mut netlink = vec![0, 4, 0x03, 0x38];
        netlink.extend_from_slice(&[0u8; 10]);
        netlink.extend_from_slice(&[0x08, 0x00]);
        assert_eq!(link_payload(DataLink::LINUX_SLL, &with(&netlink)), Link::NotIp);
        assert_eq!(link_payload(DataLink::LINUX_SLL, &[0u8; 15]), Link::Truncated);

        // Linux cooked v2.
        let mut sll2 = vec![0x86, 0xdd, 0, 0, 0, 0, 0, 3, 0, 1, 0, 6];
        sll2.extend_from_slice(&[0u8; 8]);
        assert_eq!(link_payload(DataLink::LINUX_SLL2, &with(&sll2)), Link::Ip(&IP));
        assert_eq!(link_payload(DataLink::LINUX_SLL2, &sll2[..19]), Link::Truncated);

        assert_eq!(link_payload(DataLink::RAW, &IP), Link::Ip(&IP));
        assert_eq!(link_payload(DataLink::NULL, &with(&2u32.to_le_bytes())), Link::Ip(&IP));
        assert_eq!(link_payload(DataLink::LOOP, &with(&30u32.to_be_bytes())), Link::Ip(&IP));
        assert_eq!(link_payload(DataLink::NULL, &with(&7u32.to_le_bytes())), Link::NotIp);
        assert_eq!(link_payload(DataLink::NULL, &[2, 0, 0]), Link::Truncated);
        assert!(!supported(DataLink::IEEE802_11_RADIOTAP));
    }

    /// A second way of computing the same microseconds: digit by digit and half by half.
    fn reference(raw: u64, tsresol: u8) -> u128 {
        let n = u32::from(tsresol & 0x7f);
        if tsresol & 0x80 == 0 {
            let mut v = u128::from(raw) * 1_000_000;
            for _ in 0..n {
                v /= 10;
            }
            v
        } else {
            let whole = if n >= 64 { 0 } else { u128::from(raw >> n) * 1_000_000 };
            let frac = if n >= 64 { u128::from(raw) } else { u128::from(raw & ((1u64 << n) - 1)) };
            whole + ((frac * 1_000_000) >> n)
        }
    }

    #[test]
    fn pcapng_timestamps_follow_every_tsresol() {
        // Default resolution: microseconds.
        assert_eq!(pcapng_time(1_500_000, 6, 0), Ok(Instant::from_micros(1_500_000)));
        assert_eq!(pcapng_time(1_500_000, 9, 0), Ok(Instant::from_micros(1_500)));
        assert_eq!(pcapng_time(3, 3, 0), Ok(Instant::from_micros(3_000)));
        assert_eq!(pcapng_time(1_700_000_000, 0, 0), Ok(Instant::from_micros(1_700_000_000_000_000)));
        assert_eq!(pcapng_time(1024, 0x80 | 10, 0), Ok(Instant::from_micros(1_000_000)));
        assert_eq!(pcapng_time(u64::MAX, 19, 0), Ok(Instant::from_micros(1_844_674)));
        assert_eq!(pcapng_time(u64::MAX, 0x80 | 63, 0), Ok(Instant::from_micros(1_999_999)));
        assert_eq!(pcapng_time(u64::MAX, 0x80 | 64, 0), Ok(Instant::from_micros(999_999)));
        assert_eq!(pcapng_time(u64::MAX, 127, 0), Ok(Instant::ZERO));
        assert_eq!(pcapng_time(u64::MAX, 255, 0), Ok(Instant::ZERO));
        assert_eq!(pcapng_time(u64::MAX, 255, 1_700_000_000), Ok(Instant::from_micros(1_700_000_000_000_000)));
        assert_eq!(pcapng_time(1_700_000_100, 0, -100), Ok(Instant::from_micros(1_700_000_000_000_000)));
        assert!(pcapng_time(5, 0, -6).is_err_and(|e| e.contains("before 1970")));
        assert!(pcapng_time(u64::MAX, 6, 0).is_err_and(|e| e.contains("after the year 9999")));
        assert!(pcapng_time(0, 6, i64::MAX).is_err_and(|e| e.contains("after the year 9999")));
        assert!(pcapng_time(0, 0, i64::MIN).is_err_and(|e| e.contains("before 1970")));
        // 2^64 - 1 s - 2^63 s is still 2^63 - 1 s after 1970.
        assert!(pcapng_time(u64::MAX, 0, i64::MIN).is_err_and(|e| e.contains("after the year 9999")));
        assert_eq!(pcapng_time(253_402_300_799, 0, 0), Ok(Instant::from_micros(LAST_MICROS - 999_999)));
        assert!(pcapng_time(253_402_300_800, 0, 0).is_err());
        // Every resolution, against the reference, never a panic.
        for tsresol in 0..=255u8 {
            for raw in [0, 1, 999, 1 << 32, 1_700_000_000_123_456_789, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
                let want = reference(raw, tsresol);
                match pcapng_time(raw, tsresol, 0) {
                    Ok(t) => assert_eq!(u128::from(t.as_micros()), want, "raw {raw} tsresol {tsresol:#x}"),
                    Err(_) => assert!(want > u128::from(LAST_MICROS), "raw {raw} tsresol {tsresol:#x}: {want}"),
                }
            }
        }
    }
}
