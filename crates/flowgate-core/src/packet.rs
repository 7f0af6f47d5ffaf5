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

/// Placeholder until the reassembly room lands: a TCP packet with a shorter payload.
pub fn with_payload_prefix(_packet: &[u8], _keep: usize) -> Option<Vec<u8>> {
    None
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
}
