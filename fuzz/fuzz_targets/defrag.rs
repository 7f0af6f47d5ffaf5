//! `flowgate_core::defrag::Defragmenter` fed with fragments in virtual time: fragments cut from
//! eight whole datagrams (IPv4 and IPv6, UDP and a TCP SYN, with and without IPv6 extension
//! headers, up to 60,000 bytes), in any order, cut anywhere, duplicated, overlapping, with bytes
//! changed or the last-fragment flag flipped, and raw packets of any content.
//!
//! Input: three settings bytes (`max_datagrams` 1 to 8, `max_bytes` 1 to 256 KiB, `timeout` 1 to
//! 30 s), then records. A record whose first byte has the high bit set is a raw packet (a 16-bit
//! length, then that many bytes). Otherwise it is a fragment of datagram `first & 7`: a 16-bit
//! start (in 8-byte units), a size byte (1 to 256 units), and a flags byte (bit 0: flip the
//! more-fragments flag; bit 1: change a byte 64 or more bytes into the datagram, past any
//! transport header; bit 2: call `expire` after; bits 3-7: time passing, in 100-ms steps).
//!
//! Checked after every push: `pending() <= max_datagrams`, `buffered_bytes() <= max_bytes`;
//! every `Complete` is at most 65,535 bytes past its fixed header; every fragment built from a
//! template is taken as one (unless it is offset 0 without more); with no raw packet in the input
//! (raw ones may nest a Fragment header inside a datagram), every `Complete` is no fragment any
//! more (`packet::parse` never says `Fragment`, a second defragmenter says `NotFragment`), and
//! one of a datagram none of whose fragments had its flag flipped parses with `packet::parse`
//! to the original's addresses, ports and payload length, and, if no byte of it was changed
//! either, equals the original byte for byte; the counters match the outcomes (`completed` =
//! completes, `overflow` = overflows, `refused` at most the refusals).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use etherparse::{IpFragOffset, IpHeaders, Ipv4Header, Ipv6Extensions, Ipv6FragmentHeader, Ipv6RawExtHeader};
use flowgate_core::defrag::{Defrag, DefragLimits, Defragmenter};
use flowgate_core::packet::{ParseError, parse};
use flowgate_core::{Instant, packet::ParsedPacket};
use flowgate_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// A whole datagram and how to cut it.
struct Template {
    whole: Vec<u8>,
    /// Bytes before the fragmentable part (IPv4 header; IPv6 header and hop-by-hop options).
    head: usize,
    /// IPv6: the next-header byte that is to name the Fragment header.
    named_at: Option<usize>,
    /// IPv6: the Fragment header's identification (IPv4: the header's).
    id: u32,
}

fn v6addr(last: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    a[15] = last;
    a
}

fn templates() -> &'static [Template] {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let payload = |n: usize| (0..n).map(|i| (i * 7 % 253) as u8).collect::<Vec<u8>>();
        let v4 = |id: u16, tcp: bool, n: usize| {
            let proto = if tcp { etherparse::ip_number::TCP } else { etherparse::ip_number::UDP };
            let mut h = Ipv4Header::new(0, 64, proto, [198, 51, 100, 1], [203, 0, 113, 7]).expect("header");
            h.identification = id;
            h.dont_fragment = false;
            let b = etherparse::PacketBuilder::ip(IpHeaders::Ipv4(h, Default::default()));
            let mut out = Vec::new();
            if tcp {
                b.tcp(40000, 443, 1, 1000).syn().write(&mut out, &payload(n)).expect("write");
            } else {
                b.udp(40000, 5353).write(&mut out, &payload(n)).expect("write");
            }
            Template { whole: out, head: 20, named_at: None, id: u32::from(id) }
        };
        let v6 = |id: u32, hbh: bool, n: usize| {
            let h = etherparse::Ipv6Header {
                traffic_class: 0,
                flow_label: Default::default(),
                payload_length: 0,
                next_header: etherparse::ip_number::UDP,
                hop_limit: 64,
                source: v6addr(1),
                destination: v6addr(2),
            };
            let exts = Ipv6Extensions {
                hop_by_hop_options: hbh.then(|| Ipv6RawExtHeader::new_raw(0.into(), &[1, 4, 0, 0, 0, 0]).expect("ext")),
                ..Default::default()
            };
            let mut out = Vec::new();
            etherparse::PacketBuilder::ip(IpHeaders::Ipv6(h, exts))
                .udp(40000, 5353)
                .write(&mut out, &payload(n))
                .expect("write");
            Template { whole: out, head: if hbh { 48 } else { 40 }, named_at: Some(if hbh { 40 } else { 6 }), id }
        };
        vec![
            v4(1, false, 3000),
            v4(2, true, 0),
            v4(3, false, 60_000),
            v4(1, true, 100),
            v6(1, false, 3000),
            v6(2, true, 1400),
            v6(3, false, 60_000),
            v6(4, true, 16),
        ]
    })
}

/// Template `t`'s fragment of `[from, to)` of its fragmentable part (`to` at most its end).
fn fragment(t: &Template, from: usize, to: usize, more: bool) -> Vec<u8> {
    let rest = &t.whole[t.head..];
    let offset = IpFragOffset::try_new((from / 8) as u16).expect("offset");
    match t.named_at {
        None => {
            let (mut h, _) = Ipv4Header::from_slice(&t.whole).expect("IPv4");
            h.total_len = (t.head + to - from) as u16;
            h.more_fragments = more;
            h.fragment_offset = offset;
            h.header_checksum = h.calc_header_checksum();
            let mut out = h.to_bytes().to_vec();
            out.extend_from_slice(&rest[from..to]);
            out
        }
        Some(named_at) => {
            let mut out = t.whole[..t.head].to_vec();
            let fh = Ipv6FragmentHeader::new(t.whole[named_at].into(), offset, more, t.id);
            out[named_at] = 44;
            out.extend_from_slice(&fh.to_bytes());
            out.extend_from_slice(&rest[from..to]);
            let len = (out.len() - 40) as u16;
            out[4..6].copy_from_slice(&len.to_be_bytes());
            out
        }
    }
}

fn same_flow(a: &ParsedPacket<'_>, b: &ParsedPacket<'_>) -> bool {
    (a.src, a.dst, a.protocol, a.src_port, a.dst_port, a.payload.len())
        == (b.src, b.dst, b.protocol, b.src_port, b.dst_port, b.payload.len())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let limits = DefragLimits {
        max_datagrams: 1 + usize::from(input.u8() % 8),
        max_bytes: 1024 * (1 + usize::from(input.u8())),
        timeout: Duration::from_secs(1 + u64::from(input.u8() % 30)),
    };
    let mut d = Defragmenter::new(limits);
    let mut now = Instant::from_micros(1_000_000);
    let (mut completes, mut overflows, mut refusals) = (0u64, 0u64, 0u64);
    let mut raw_seen = false;
    let (mut flipped, mut changed) = ([false; 8], [false; 8]);
    let mut records = 0;
    while !input.is_empty() && records < 1000 {
        records += 1;
        let first = input.u8();
        // `which`: the template, and whether the fragment is a whole packet (offset 0, no more).
        let (packet, which, expire) = if first & 0x80 != 0 {
            raw_seen = true;
            let len = usize::from(input.u16());
            (input.bytes(len).to_vec(), None, false)
        } else {
            let k = usize::from(first & 7);
            let t = &templates()[k];
            let len = t.whole.len() - t.head;
            let from = (usize::from(input.u16()) * 8) % (len.div_ceil(8) * 8).max(8);
            let from = from.min(len / 8 * 8);
            let to = (from + 8 * (1 + usize::from(input.u8()))).min(len);
            let flags = input.u8();
            let mut more = to < len;
            if flags & 1 != 0 {
                more = !more;
                flipped[k] = true;
            }
            let mut f = fragment(t, from, to, more);
            if flags & 2 != 0 && to > 64.max(from) {
                let at = f.len() - (to - 64.max(from));
                f[at] ^= 0x5a;
                changed[k] = true;
            }
            now = now + Duration::from_millis(100 * u64::from(flags >> 3));
            (f, Some((k, from == 0 && !more)), flags & 4 != 0)
        };
        let outcome = d.push(now, &packet);
        match &outcome {
            Defrag::Complete(whole) => {
                completes += 1;
                assert!(whole.len() <= 65_535 + 40, "{} bytes", whole.len());
                // Raw packets can nest a Fragment header in a datagram: the checks below hold
                // for the templates' fragments alone.
                if let (Some((k, _)), false) = (which, raw_seen) {
                    assert_ne!(parse(whole).err(), Some(ParseError::Fragment), "still a fragment");
                    let mut again = Defragmenter::new(DefragLimits::default());
                    assert_eq!(again.push(now, whole), Defrag::NotFragment);
                    let t = &templates()[k];
                    if !flipped[k] {
                        let got = parse(whole).expect("a completed datagram parses");
                        let want = parse(&t.whole).expect("template");
                        assert!(same_flow(&got, &want), "{got:?} vs {want:?}");
                        assert_eq!(got.ip_len as usize, whole.len());
                        if !changed[k] {
                            assert_eq!(whole, &t.whole, "datagram {k} put together differs from the original");
                        }
                    }
                }
            }
            Defrag::Overflow => overflows += 1,
            Defrag::Refused => refusals += 1,
            Defrag::NotFragment => {
                assert!(which.is_none_or(|(_, whole)| whole), "a built fragment was not taken as one")
            }
            Defrag::Incomplete => {}
        }
        if expire {
            d.expire(now);
        }
        assert!(d.pending() <= limits.max_datagrams, "{} pending", d.pending());
        assert!(d.buffered_bytes() <= limits.max_bytes, "{} bytes held", d.buffered_bytes());
        let s = d.stats();
        assert_eq!((s.completed, s.overflow), (completes, overflows), "{s:?}");
        assert!(s.refused <= refusals, "{s:?}");
    }
});
