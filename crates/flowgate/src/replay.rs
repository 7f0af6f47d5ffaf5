//! Replay: drive the engine with the packets of a capture file, in capture time.
//!
//! `flowgate replay` answers "what would these rules have done?" without privileges: it reads a
//! pcap or pcapng file (`pcap-file`), cuts each frame down to its IP packet, feeds the engine with
//! the frame's timestamp as the clock, fires idle timeouts at the instants they fall due, and
//! writes every event as a JSON line. The interface name comes from the pcapng interface block
//! where the capture recorded it. This module touches only the capture file and the writer it is
//! given.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowgate_core::{Engine, Event, Instant, Origin, PacketMeta, Stats};
use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption;
use pcap_file::pcapng::{Block, PcapNgReader};
use serde::Serialize;

/// What a replay saw, beyond the events.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub frames: u64,
    /// Frames that do not carry IP (ARP, LLDP, ...) or whose link type is not supported.
    pub non_ip_frames: u64,
    pub events: u64,
    #[serde(flatten)]
    pub engine: Stats,
}

/// A capture could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{path}: cannot open capture: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: not a pcap or pcapng capture (unknown magic number {magic:#010x})")]
    Format { path: PathBuf, magic: u32 },
    #[error("{path}: broken capture after {frames} frames: {message}")]
    Corrupt { path: PathBuf, frames: u64, message: String },
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
    let mut summary = Summary::default();
    let mut last = Instant::ZERO;
    let mut write_events = |engine: &mut Engine, summary: &mut Summary| -> io::Result<()> {
        while let Some(e) = engine.poll_event() {
            write_event(out, &e)?;
            summary.events += 1;
        }
        // Held packets have nowhere to go in a replay; their release is only counted by the engine.
        while engine.poll_release().is_some() {}
        Ok(())
    };
    for_each_frame(path, |frame| {
        summary.frames += 1;
        // Fire the timers that fell due before this frame, each at its own instant.
        while let Some(t) = engine.poll_timeout().filter(|&t| t <= frame.time) {
            engine.handle_timeout(t);
        }
        match ip_payload(frame.link, frame.data) {
            Some(ip) => {
                let meta = PacketMeta { interface: frame.interface, origin: Origin::Unknown };
                // A replay only reports what would have happened; the decision itself is unused.
                let _ = engine.handle_packet(frame.time, meta, ip);
            }
            None => summary.non_ip_frames += 1,
        }
        last = last.max(frame.time);
        write_events(engine, &mut summary)
    })?;
    // Idle timeouts that fall inside the capture's span already fired; what is still open
    // closes at the end of the capture.
    engine.close_all(last);
    write_events(engine, &mut summary)?;
    summary.engine = engine.stats();
    Ok(summary)
}

/// Writes one event as a JSON line.
pub fn write_event(out: &mut dyn Write, e: &Event) -> io::Result<()> {
    serde_json::to_writer(&mut *out, e).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

fn for_each_frame(path: &Path, mut f: impl FnMut(Frame<'_>) -> io::Result<()>) -> Result<(), ReplayError> {
    let open_err = |source| ReplayError::Open { path: path.to_path_buf(), source };
    let mut file = BufReader::new(File::open(path).map_err(open_err)?);
    // Peek at the magic number without consuming it; the readers parse the header themselves.
    let head = file.fill_buf().map_err(open_err)?;
    let magic: [u8; 4] = match head.get(..4) {
        Some(m) => [m[0], m[1], m[2], m[3]],
        None => {
            return Err(ReplayError::Corrupt {
                path: path.to_path_buf(),
                frames: 0,
                message: "file is shorter than a capture header".into(),
            });
        }
    };
    let mut frames = 0u64;
    let corrupt = |frames, e: pcap_file::PcapError| ReplayError::Corrupt {
        path: path.to_path_buf(),
        frames,
        message: e.to_string(),
    };
    match u32::from_le_bytes(magic) {
        0xa1b2_c3d4 | 0xd4c3_b2a1 | 0xa1b2_3c4d | 0x4d3c_b2a1 => {
            let mut r = PcapReader::new(file).map_err(|e| corrupt(0, e))?;
            let link = r.header().datalink;
            while let Some(p) = r.next_packet() {
                let p = p.map_err(|e| corrupt(frames, e))?;
                frames += 1;
                let time = Instant::from_unix(p.timestamp.as_secs(), p.timestamp.subsec_nanos());
                f(Frame { time, interface: None, link, data: &p.data })?;
            }
        }
        0x0a0d_0d0a => {
            let mut r = PcapNgReader::new(file).map_err(|e| corrupt(0, e))?;
            // pcap-file 2.0 returns EPB timestamps as raw units labelled nanoseconds; the real
            // unit is the interface's if_tsresol (default microseconds), so rescale here.
            let mut ifaces: Vec<(DataLink, Option<String>, u8)> = Vec::new();
            while let Some(b) = r.next_block() {
                let b = b.map_err(|e| corrupt(frames, e))?;
                match b {
                    Block::SectionHeader(_) => ifaces.clear(),
                    Block::InterfaceDescription(idb) => {
                        let mut name = None;
                        let mut tsresol = 6;
                        for o in &idb.options {
                            match o {
                                InterfaceDescriptionOption::IfName(n) => name = Some(n.to_string()),
                                InterfaceDescriptionOption::IfTsResol(t) => tsresol = *t,
                                _ => {}
                            }
                        }
                        ifaces.push((idb.linktype, name, tsresol));
                    }
                    Block::EnhancedPacket(epb) => {
                        frames += 1;
                        let Some((link, name, tsresol)) = ifaces.get(epb.interface_id as usize) else {
                            return Err(ReplayError::Corrupt {
                                path: path.to_path_buf(),
                                frames,
                                message: format!(
                                    "packet names interface {} that was never described",
                                    epb.interface_id
                                ),
                            });
                        };
                        let time = pcapng_time(epb.timestamp, *tsresol);
                        f(Frame { time, interface: name.as_deref(), link: *link, data: &epb.data })?;
                    }
                    Block::SimplePacket(spb) => {
                        frames += 1;
                        if let Some((link, name, _)) = ifaces.first() {
                            f(Frame { time: Instant::ZERO, interface: name.as_deref(), link: *link, data: &spb.data })?;
                        }
                    }
                    _ => {}
                }
            }
        }
        other => {
            return Err(ReplayError::Format { path: path.to_path_buf(), magic: other });
        }
    }
    Ok(())
}

/// Converts a pcapng timestamp in raw units (see above) to an [`Instant`].
fn pcapng_time(raw: Duration, tsresol: u8) -> Instant {
    let units = raw.as_nanos();
    let micros = if tsresol & 0x80 == 0 {
        let exp = u32::from(tsresol);
        if exp >= 6 { units / 10u128.pow(exp - 6) } else { units * 10u128.pow(6 - exp) }
    } else {
        let exp = u32::from(tsresol & 0x7f).min(127);
        (units * 1_000_000) >> exp
    };
    Instant::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
}

/// The IP packet inside a frame of link type `link`, or `None` for frames that carry no IP.
/// Only the offset of the IP header is needed, which is why this reads the few link headers
/// itself instead of fully parsing them.
fn ip_payload(link: DataLink, data: &[u8]) -> Option<&[u8]> {
    let is_ip = |ethertype: u16| ethertype == 0x0800 || ethertype == 0x86dd;
    match link {
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => Some(data),
        DataLink::ETHERNET => {
            let mut off = 12;
            loop {
                let et = u16::from_be_bytes([*data.get(off)?, *data.get(off + 1)?]);
                match et {
                    // 802.1Q / 802.1ad VLAN tags: skip the tag, read the inner type.
                    0x8100 | 0x88a8 | 0x9100 => off += 4,
                    _ if is_ip(et) => return data.get(off + 2..),
                    _ => return None,
                }
            }
        }
        DataLink::LINUX_SLL => {
            let et = u16::from_be_bytes([*data.get(14)?, *data.get(15)?]);
            if is_ip(et) { data.get(16..) } else { None }
        }
        DataLink::LINUX_SLL2 => {
            let et = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
            if is_ip(et) { data.get(20..) } else { None }
        }
        DataLink::NULL | DataLink::LOOP => {
            // A 4-byte address family in the capturing host's byte order (NULL) or big endian (LOOP).
            let fam = data.get(..4)?;
            let v = |f: u32| fam == f.to_le_bytes() || fam == f.to_be_bytes();
            if v(2) || v(10) || v(24) || v(28) || v(30) { data.get(4..) } else { None }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_link_headers() {
        let ip = [0x45u8, 0, 0, 20];
        let mut eth = vec![0u8; 12];
        eth.extend_from_slice(&[0x08, 0x00]);
        eth.extend_from_slice(&ip);
        assert_eq!(ip_payload(DataLink::ETHERNET, &eth), Some(&ip[..]));
        let mut vlan = vec![0u8; 12];
        vlan.extend_from_slice(&[0x81, 0x00, 0, 5, 0x86, 0xdd]);
        vlan.extend_from_slice(&ip);
        assert_eq!(ip_payload(DataLink::ETHERNET, &vlan), Some(&ip[..]));
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x08, 0x06, 0, 1]);
        assert_eq!(ip_payload(DataLink::ETHERNET, &arp), None);
        assert_eq!(ip_payload(DataLink::ETHERNET, &[0u8; 13]), None);
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(&ip);
        assert_eq!(ip_payload(DataLink::LINUX_SLL, &sll), Some(&ip[..]));
        assert_eq!(ip_payload(DataLink::RAW, &ip), Some(&ip[..]));
        let mut null = 2u32.to_le_bytes().to_vec();
        null.extend_from_slice(&ip);
        assert_eq!(ip_payload(DataLink::NULL, &null), Some(&ip[..]));
    }

    #[test]
    fn pcapng_timestamps_follow_tsresol() {
        // Default resolution: microseconds.
        assert_eq!(pcapng_time(Duration::from_nanos(1_500_000), 6), Instant::from_micros(1_500_000));
        // Nanoseconds.
        assert_eq!(pcapng_time(Duration::from_nanos(1_500_000), 9), Instant::from_micros(1_500));
        // Milliseconds.
        assert_eq!(pcapng_time(Duration::from_nanos(3), 3), Instant::from_micros(3_000));
        // Powers of two: 2^-10 s units.
        assert_eq!(pcapng_time(Duration::from_nanos(1024), 0x80 | 10), Instant::from_micros(1_000_000));
    }
}
