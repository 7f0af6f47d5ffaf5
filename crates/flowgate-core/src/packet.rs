//! Layer-3 packet parsing: the few facts the flow table needs from an IP packet.
//!
//! Input is an IP packet as NFQUEUE delivers it, or as the replay driver cuts it out of a capture
//! frame. Parsing is delegated to `etherparse` (checked slices, IPv6 extension headers); this
//! module only picks out the 5-tuple, the TCP flags and the transport payload, borrowing from the
//! caller's buffer. It allocates nothing and never panics on hostile input: every failure is a
//! [`ParseError`] the engine counts and skips.

use std::net::IpAddr;

use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};

use crate::flow::Protocol;

/// TCP control flags that matter for a flow's lifecycle.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

/// What the engine needs from one IP packet. Borrows the payload from the caller's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedPacket<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    /// Source port; for ICMP echo the identifier; 0 where the protocol has none.
    pub src_port: u16,
    /// Destination port; for ICMP echo the identifier; 0 where the protocol has none.
    pub dst_port: u16,
    /// Length of the whole IP packet as its header states it (what conntrack counts).
    pub ip_len: u32,
    /// TCP flags, for TCP packets.
    pub tcp: Option<TcpFlags>,
    /// TCP sequence number of the first payload byte (0 for other protocols).
    pub seq: u32,
    /// TCP acknowledgment number, when the ACK flag is set (else 0).
    pub ack: u32,
    /// Transport payload (TCP/UDP data; for ICMP the bytes after the ICMP header).
    pub payload: &'a [u8],
    /// An ICMP echo reply: its destination opened the exchange.
    pub icmp_echo_reply: bool,
    /// ICMP or ICMPv6 message type and code, for ICMP packets whose header could be read.
    pub icmp: Option<(u8, u8)>,
}

/// Why a packet could not be used. Each kind has its own counter in [`crate::engine::Stats`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its headers say (a capture's snap length, or a cut packet).
    #[error("packet truncated")]
    Truncated,
    /// Headers that cannot be valid (bad version, lengths, options).
    #[error("malformed packet")]
    Malformed,
    /// A non-first IP fragment: it carries no ports, so it cannot be put in a flow.
    #[error("IP fragment")]
    Fragment,
    /// Not an IP packet at all (ARP, other ethertypes).
    #[error("not an IP packet")]
    NotIp,
}

/// Parses one IP packet (starting at the IP header).
pub fn parse(bytes: &[u8]) -> Result<ParsedPacket<'_>, ParseError> {
    let Some(&first) = bytes.first() else {
        return Err(ParseError::Truncated);
    };
    if first >> 4 != 4 && first >> 4 != 6 {
        return Err(ParseError::NotIp);
    }
    let sliced = SlicedPacket::from_ip(bytes).map_err(|e| match e {
        etherparse::err::packet::SliceError::Len(_) => ParseError::Truncated,
        _ => ParseError::Malformed,
    })?;
    let (src, dst, ip_len, fragmented) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header();
            let fragmented = v4.payload().fragmented;
            (IpAddr::V4(h.source_addr()), IpAddr::V4(h.destination_addr()), u32::from(h.total_len()), fragmented)
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header();
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                40 + u32::from(h.payload_length()),
                v6.payload().fragmented,
            )
        }
        _ => return Err(ParseError::NotIp),
    };
    let ip_number = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => v4.payload().ip_number,
        Some(NetSlice::Ipv6(v6)) => v6.payload().ip_number,
        _ => return Err(ParseError::NotIp),
    };
    let mut p = ParsedPacket {
        src,
        dst,
        protocol: Protocol::Other(ip_number.0),
        src_port: 0,
        dst_port: 0,
        ip_len,
        tcp: None,
        seq: 0,
        ack: 0,
        payload: &[],
        icmp_echo_reply: false,
        icmp: None,
    };
    match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            p.protocol = Protocol::Tcp;
            p.src_port = tcp.source_port();
            p.dst_port = tcp.destination_port();
            // A SYN takes one sequence number itself; data it carries (TCP Fast Open) starts after.
            p.seq = tcp.sequence_number().wrapping_add(u32::from(tcp.syn()));
            p.tcp = Some(TcpFlags { syn: tcp.syn(), ack: tcp.ack(), fin: tcp.fin(), rst: tcp.rst() });
            p.ack = if tcp.ack() { tcp.acknowledgment_number() } else { 0 };
            p.payload = tcp.payload();
        }
        Some(TransportSlice::Udp(udp)) => {
            p.protocol = Protocol::Udp;
            p.src_port = udp.source_port();
            p.dst_port = udp.destination_port();
            p.payload = udp.payload();
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            p.protocol = Protocol::Icmp;
            let t = icmp.icmp_type();
            if let Icmpv4Type::EchoRequest(e) | Icmpv4Type::EchoReply(e) = t {
                (p.src_port, p.dst_port) = (e.id, e.id);
            }
            p.icmp_echo_reply = matches!(t, Icmpv4Type::EchoReply(_));
            p.icmp = Some((icmp.type_u8(), icmp.code_u8()));
            p.payload = icmp.payload();
        }
        Some(TransportSlice::Icmpv6(icmp)) => {
            p.protocol = Protocol::Icmp;
            let t = icmp.icmp_type();
            if let Icmpv6Type::EchoRequest(e) | Icmpv6Type::EchoReply(e) = t {
                (p.src_port, p.dst_port) = (e.id, e.id);
            }
            p.icmp_echo_reply = matches!(t, Icmpv6Type::EchoReply(_));
            p.icmp = Some((icmp.type_u8(), icmp.code_u8()));
            p.payload = icmp.payload();
        }
        // etherparse leaves the transport unparsed for fragments; a first fragment of TCP/UDP
        // still needs its ports, which only reassembly could give reliably.
        _ if fragmented => return Err(ParseError::Fragment),
        _ => {
            if matches!(ip_number.0, 1 | 58) {
                p.protocol = Protocol::Icmp;
            }
        }
    }
    Ok(p)
}

/// `packet` (an IPv4 or IPv6 TCP packet, as `parse` reads it) with only the first `keep` bytes
/// of its TCP payload: IP total/payload length, the IPv4 header checksum and the TCP checksum
/// (full, over the pseudo-header: the kernel takes the packet as is) computed afresh; a FIN flag is
/// cleared (it followed the bytes cut off). `None` if it is not a parsable TCP packet or `keep` is
/// not shorter than its payload.
///
/// Headers between the IP header and TCP (IPv4 options, an IPv4 authentication header, IPv6
/// extension headers) are kept as they are; the IPv6 payload length covers them. Bytes after the
/// IP packet (link-layer padding) are not copied. Packets the kernel queues from the local stack
/// often carry only a *partial* TCP checksum (checksum offload: the pseudo-header sum, to be
/// completed by the device); the checksum here is computed from scratch over the pseudo-header,
/// the TCP header and the kept payload, never adjusted incrementally from the old value, so the
/// result is valid whatever the old field held. The sums use `etherparse::checksum` over the raw
/// header bytes, so reserved bits and options count exactly as they are on the wire.
pub fn with_payload_prefix(packet: &[u8], keep: usize) -> Option<Vec<u8>> {
    use etherparse::checksum::Sum16BitWords;
    use etherparse::{Ipv6Header, ip_number};

    let p = parse(packet).ok()?;
    if p.protocol != Protocol::Tcp || keep >= p.payload.len() {
        return None;
    }
    let sliced = SlicedPacket::from_ip(packet).ok()?;
    let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else { return None };
    // Where TCP starts: the IP header and whatever lies between it and TCP.
    let tcp_at = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => v4.header().slice().len() + v4.extensions().auth.map_or(0, |a| a.slice().len()),
        Some(NetSlice::Ipv6(v6)) => Ipv6Header::LEN + v6.extensions().slice().len(),
        _ => return None,
    };
    let tcp_len = tcp.header_len();
    let mut out = packet.get(..tcp_at + tcp_len + keep)?.to_vec();
    let ip_len = u16::try_from(out.len()).ok()?;
    match &sliced.net {
        Some(NetSlice::Ipv4(_)) => {
            out.get_mut(2..4)?.copy_from_slice(&ip_len.to_be_bytes());
            let header_len = usize::from(out.first()? & 0x0f) * 4;
            out.get_mut(10..12)?.copy_from_slice(&[0, 0]);
            let sum = Sum16BitWords::new().add_slice(out.get(..header_len)?).ones_complement().to_be();
            out.get_mut(10..12)?.copy_from_slice(&sum.to_be_bytes());
        }
        _ => {
            let payload_len = ip_len.checked_sub(Ipv6Header::LEN as u16)?;
            out.get_mut(4..6)?.copy_from_slice(&payload_len.to_be_bytes());
        }
    }
    // FIN is bit 0 of the flags byte (offset 13); the checksum field is at offset 16.
    *out.get_mut(tcp_at + 13)? &= !0x01;
    out.get_mut(tcp_at + 16..tcp_at + 18)?.copy_from_slice(&[0, 0]);
    let segment = out.get(tcp_at..)?;
    let segment_len = u32::try_from(segment.len()).ok()?;
    let mut sum = Sum16BitWords::new();
    sum = match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum
            .add_4bytes(s.octets())
            .add_4bytes(d.octets())
            .add_2bytes([0, ip_number::TCP.0])
            .add_2bytes(u16::try_from(segment_len).ok()?.to_be_bytes()),
        (IpAddr::V6(s), IpAddr::V6(d)) => sum
            .add_16bytes(s.octets())
            .add_16bytes(d.octets())
            .add_4bytes(segment_len.to_be_bytes())
            .add_2bytes([0, ip_number::TCP.0]),
        _ => return None,
    };
    let checksum = sum.add_slice(segment).ones_complement().to_be();
    out.get_mut(tcp_at + 16..tcp_at + 18)?.copy_from_slice(&checksum.to_be_bytes());
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// Builds an IPv4 TCP packet for tests.
    pub(crate) fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: &str, payload: &[u8]) -> Vec<u8> {
        let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 65535);
        for f in flags.chars() {
            b = match f {
                'S' => b.syn(),
                'A' => b.ack(1),
                'F' => b.fin(),
                'R' => b.rst(),
                _ => b,
            };
        }
        let mut out = Vec::new();
        b.write(&mut out, payload).expect("write test packet");
        out
    }

    pub(crate) fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6(src, dst, 64).udp(sport, dport).write(&mut out, payload).expect("write test packet");
        out
    }

    #[test]
    fn parses_tcp_v4_with_flags_and_payload() {
        let bytes = tcp4([198, 51, 100, 1], 40000, [203, 0, 113, 7], 443, "SA", b"hello");
        let p = parse(&bytes).expect("valid");
        assert_eq!(p.protocol, Protocol::Tcp);
        assert_eq!((p.src_port, p.dst_port), (40000, 443));
        assert_eq!(p.ip_len as usize, bytes.len());
        assert_eq!(p.payload, b"hello");
        let f = p.tcp.expect("tcp flags");
        assert!(f.syn && f.ack && !f.fin && !f.rst);
    }

    #[test]
    fn parses_udp_v6() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let mut b = a;
        a[15] = 1;
        b[15] = 2;
        let bytes = udp6(a, 5000, b, 53, b"q");
        let p = parse(&bytes).expect("valid");
        assert_eq!(p.protocol, Protocol::Udp);
        assert_eq!(p.ip_len as usize, bytes.len());
        assert_eq!(p.payload, b"q");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = tcp4([198, 51, 100, 1], 1, [203, 0, 113, 7], 2, "S", b"0123456789");
        for cut in 0..bytes.len() {
            assert!(parse(&bytes[..cut]).is_err(), "cut at {cut} parsed");
        }
        assert_eq!(parse(&[]), Err(ParseError::Truncated));
        assert_eq!(parse(&bytes[..10]), Err(ParseError::Truncated));
    }

    #[test]
    fn garbage_is_classified() {
        assert_eq!(parse(&[0x00, 1, 2, 3]), Err(ParseError::NotIp));
        // Version 4 with a header length below the minimum.
        let mut bad = tcp4([198, 51, 100, 1], 1, [203, 0, 113, 7], 2, "S", b"");
        bad[0] = 0x41;
        assert_eq!(parse(&bad), Err(ParseError::Malformed));
        // Arbitrary bytes must never panic.
        let mut x: u32 = 12345;
        for len in 0..200usize {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1103515245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = parse(&buf);
        }
    }

    /// An IPv6 TCP packet with the given extension headers before TCP.
    fn tcp6(exts: etherparse::Ipv6Extensions, flags: &str, payload: &[u8]) -> Vec<u8> {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let mut b = a;
        a[15] = 1;
        b[15] = 2;
        let ip = etherparse::Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: 0,
            next_header: etherparse::ip_number::TCP,
            hop_limit: 64,
            source: a,
            destination: b,
        };
        let mut builder =
            PacketBuilder::ip(etherparse::IpHeaders::Ipv6(ip, exts)).tcp(40000, 443, 7, 1000).ack(9).psh();
        if flags.contains('F') {
            builder = builder.fin();
        }
        let mut out = Vec::new();
        builder.write(&mut out, payload).expect("write test packet");
        out
    }

    fn raw_ext(next: etherparse::IpNumber) -> etherparse::Ipv6RawExtHeader {
        etherparse::Ipv6RawExtHeader::new_raw(next, &[1, 4, 0, 0, 0, 0]).expect("ext header")
    }

    /// Checks with etherparse's own checksum code (from the parsed header fields, not the raw
    /// bytes) that `cut` is `whole` with payload `want` and valid checksums.
    fn check_cut(whole: &[u8], cut: &[u8], want: &[u8]) {
        use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
        let h = PacketHeaders::from_ip_slice(cut).expect("the cut packet parses");
        let Some(TransportHeader::Tcp(tcp)) = h.transport else { panic!("not TCP: {h:?}") };
        let payload = h.payload.slice();
        assert_eq!(payload, want);
        match h.net {
            Some(NetHeaders::Ipv4(ip, _)) => {
                assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header checksum");
                assert_eq!(usize::from(ip.total_len), cut.len());
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv4(&ip, payload).expect("sum"), "TCP checksum");
            }
            Some(NetHeaders::Ipv6(ip, _)) => {
                assert_eq!(usize::from(ip.payload_length) + 40, cut.len());
                assert_eq!(tcp.checksum, tcp.calc_checksum_ipv6(&ip, payload).expect("sum"), "TCP checksum");
            }
            other => panic!("not IP: {other:?}"),
        }
        // Everything before the payload is the original's but for lengths, checksums and FIN.
        let head = cut.len() - want.len();
        assert_eq!(&cut[head..], want);
        assert_eq!(cut.len() - want.len(), whole.len() - (parse(whole).expect("whole").payload.len()));
        let p = parse(cut).expect("parse the cut packet");
        let q = parse(whole).expect("parse the whole packet");
        assert_eq!((p.src, p.dst, p.src_port, p.dst_port, p.seq), (q.src, q.dst, q.src_port, q.dst_port, q.seq));
        assert_eq!(p.payload, want);
        assert!(!p.tcp.expect("flags").fin, "FIN is cleared");
    }

    #[test]
    fn a_tcp_payload_cut_short_has_valid_lengths_and_checksums() {
        let data: Vec<u8> = (0..300u16).map(|i| (i * 13) as u8).collect();
        use etherparse::Ipv6Extensions;
        use etherparse::ip_number::{IPV6_DEST_OPTIONS, TCP};
        let hbh = Ipv6Extensions { hop_by_hop_options: Some(raw_ext(TCP)), ..Default::default() };
        let dst = Ipv6Extensions { destination_options: Some(raw_ext(TCP)), ..Default::default() };
        let both = Ipv6Extensions {
            hop_by_hop_options: Some(raw_ext(IPV6_DEST_OPTIONS)),
            destination_options: Some(raw_ext(TCP)),
            ..Default::default()
        };
        let packets = [
            ("v4", tcp4([198, 51, 100, 1], 40000, [203, 0, 113, 7], 443, "AP", &data)),
            ("v6", tcp6(Default::default(), "", &data)),
            ("v6 hop-by-hop", tcp6(hbh, "", &data)),
            ("v6 destination options", tcp6(dst, "", &data)),
            ("v6 both", tcp6(both, "", &data)),
        ];
        for (name, whole) in &packets {
            // The extension headers are really there.
            let exts = SlicedPacket::from_ip(whole).ok().and_then(|s| match s.net {
                Some(NetSlice::Ipv6(v6)) => Some(v6.extensions().slice().len()),
                _ => None,
            });
            assert_eq!(exts.unwrap_or(0) > 0, name.starts_with("v6 "), "{name}");
            for keep in [0, 1, 2, 7, 150, 299] {
                let cut = with_payload_prefix(whole, keep).unwrap_or_else(|| panic!("{name}: keep {keep}"));
                check_cut(whole, &cut, &data[..keep]);
            }
            assert_eq!(with_payload_prefix(whole, 300), None, "{name}: not shorter");
            assert_eq!(with_payload_prefix(whole, 301), None, "{name}: longer");
        }
    }

    #[test]
    fn a_cut_clears_fin_and_keeps_other_flags() {
        let data = b"GET / HTTP/1.1\r\n\r\n";
        for whole in [tcp4([198, 51, 100, 1], 1, [203, 0, 113, 7], 80, "AF", data), tcp6(Default::default(), "F", data)]
        {
            assert!(parse(&whole).expect("whole").tcp.expect("flags").fin);
            let cut = with_payload_prefix(&whole, 4).expect("cut");
            check_cut(&whole, &cut, b"GET ");
            let f = parse(&cut).expect("cut").tcp.expect("flags");
            assert!(f.ack && !f.fin && !f.syn && !f.rst);
        }
    }

    #[test]
    fn a_cut_computes_the_checksum_afresh_and_drops_padding() {
        let mut whole = tcp4([198, 51, 100, 1], 1, [203, 0, 113, 7], 80, "A", b"0123456789");
        // A partial checksum as offload leaves it (any value: it is not used), and Ethernet
        // padding after the IP packet.
        whole[20 + 16] ^= 0x5a;
        whole[20 + 17] ^= 0xa5;
        whole.extend_from_slice(&[0xee; 6]);
        let cut = with_payload_prefix(&whole, 3).expect("cut");
        check_cut(&whole[..whole.len() - 6], &cut, b"012");
        assert_eq!(cut.len(), 20 + 20 + 3, "padding is not copied");
        // IPv4 options are kept, and the header checksum covers them.
        let mut with_options = PacketBuilder::ip(etherparse::IpHeaders::Ipv4(
            {
                let mut h =
                    etherparse::Ipv4Header::new(0, 64, etherparse::ip_number::TCP, [198, 51, 100, 1], [203, 0, 113, 7])
                        .expect("header");
                h.options = [1, 1, 1, 0][..].try_into().expect("options");
                h
            },
            Default::default(),
        ))
        .tcp(1, 2, 3, 4);
        with_options = with_options.ack(5);
        let mut v = Vec::new();
        with_options.write(&mut v, b"abcdef").expect("write");
        let cut = with_payload_prefix(&v, 2).expect("cut");
        assert_eq!(cut[0] & 0x0f, 6, "options kept");
        check_cut(&v, &cut, b"ab");
    }

    #[test]
    fn only_tcp_packets_with_more_payload_than_kept_are_cut() {
        let mut a = [0u8; 16];
        a[0] = 0x20;
        assert_eq!(with_payload_prefix(&udp6(a, 1, a, 2, b"data"), 1), None, "UDP");
        assert_eq!(with_payload_prefix(&[0x45, 0, 0], 0), None, "garbage");
        assert_eq!(with_payload_prefix(&[], 0), None);
        let syn = tcp4([198, 51, 100, 1], 1, [203, 0, 113, 7], 2, "S", b"");
        assert_eq!(with_payload_prefix(&syn, 0), None, "no payload to cut");
        // A first fragment: not parsable as TCP.
        let mut frag = tcp4([198, 51, 100, 1], 1, [203, 0, 113, 7], 2, "A", b"01234567abc");
        frag[6] |= 0x20;
        assert_eq!(with_payload_prefix(&frag, 1), None, "a fragment");
        // Cut packets never panic.
        let whole = tcp6(Default::default(), "", b"0123456789");
        for end in 0..whole.len() {
            let _ = with_payload_prefix(&whole[..end], 1);
        }
    }
}
