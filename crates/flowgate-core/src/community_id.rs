//! Community ID (version 1): the flow hash that Zeek, Suricata, Elastic and OCSF share, so one
//! flow can be found across tools.
//!
//! Spec: corelight's community-id-spec. SHA-1 over the seed, both addresses, the IP protocol, a
//! padding byte and both ports (for ICMP, the type and the code or counterpart type), with the
//! endpoints in canonical order so both directions hash alike; base64; `1:` in front. The
//! hashing is the `community-id` crate's; this room only says what a flowgate [`Flow`] hands it.
//! Pure: no I/O.
//!
//! What a flow hands over:
//! - TCP, UDP: the opener's and the responder's address and port;
//! - ICMP, ICMPv6: the opener's first message type and code ([`Flow::icmp`]); the crate maps
//!   request/reply pairs (echo, timestamp, router and neighbour discovery, ...) so both
//!   directions hash alike. A flow whose ICMP header could not be read hashes as type 0 code 0;
//! - SCTP (132): flowgate does not read SCTP ports, so the ports are 0 (other tools' IDs for
//!   the same association will differ);
//! - any other protocol: addresses and protocol only, as the spec says.

use crate::flow::{Flow, Protocol};

/// The seed flowgate uses: 0, the spec's default, which every tool uses unless told otherwise.
pub const SEED: u16 = 0;

/// The Community ID (v1, base64, seed [`SEED`]) of `flow`, e.g. `1:LQU9qZlK+B5F3KDmev6m5PMibrg=`.
pub fn of_flow(flow: &Flow) -> String {
    let (src, dst) = (flow.opener(), flow.responder());
    let (sport, dport) = match flow.protocol {
        Protocol::Tcp | Protocol::Udp => (Some(src.port()), Some(dst.port())),
        Protocol::Icmp => {
            let (t, c) = flow.icmp.unwrap_or((0, 0));
            (Some(u16::from(t)), Some(u16::from(c)))
        }
        Protocol::Other(132) => (Some(0), Some(0)),
        Protocol::Other(_) => (None, None),
    };
    // The crate refuses only ports missing for TCP, UDP or SCTP, ICMPv6 over IPv4 and mixed
    // address families, none of which a flow can hold (both ends of a flow share a family, and
    // the protocol number follows it); should it ever refuse, the record says so rather than
    // carry a wrong hash.
    community_id::calculate_community_id(SEED, src.ip(), dst.ip(), sport, dport, flow.ip_protocol(), false)
        .unwrap_or_else(|e| format!("unavailable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Direction, FlowId};
    use crate::time::Instant;

    fn flow(protocol: Protocol, direction: Direction, local: &str, remote: &str, icmp: Option<(u8, u8)>) -> Flow {
        Flow {
            id: FlowId(1),
            protocol,
            direction,
            local: local.parse().expect("local"),
            remote: remote.parse().expect("remote"),
            interface: None,
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp,
            owner: None,
            host: None,
        }
    }

    #[test]
    fn the_specs_tcp_example() {
        // The spec's README example (seed 0): 128.232.110.120:34855 -> 66.35.250.204:80.
        let f = flow(Protocol::Tcp, Direction::Outbound, "128.232.110.120:34855", "66.35.250.204:80", None);
        assert_eq!(of_flow(&f), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
        // Seen from the server (an inbound flow): same ends, same hash.
        let f = flow(Protocol::Tcp, Direction::Inbound, "66.35.250.204:80", "128.232.110.120:34855", None);
        assert_eq!(of_flow(&f), "1:LQU9qZlK+B5F3KDmev6m5PMibrg=");
    }

    #[test]
    fn icmp_echo_hashes_alike_from_either_side_and_ignores_the_identifier() {
        let a = flow(Protocol::Icmp, Direction::Outbound, "192.0.2.1:7", "198.51.100.2:7", Some((8, 0)));
        let b = flow(Protocol::Icmp, Direction::Inbound, "198.51.100.2:9", "192.0.2.1:9", Some((8, 0)));
        assert_eq!(of_flow(&a), of_flow(&b));
        let v6 = flow(Protocol::Icmp, Direction::Outbound, "[2001:db8::1]:7", "[2001:db8::2]:7", Some((128, 0)));
        assert_ne!(of_flow(&v6), of_flow(&a));
        assert!(of_flow(&v6).starts_with("1:"));
    }

    #[test]
    fn portless_protocols_hash_addresses_only() {
        let gre = flow(Protocol::Other(47), Direction::Outbound, "192.0.2.1:0", "198.51.100.2:0", None);
        let gre_back = flow(Protocol::Other(47), Direction::Inbound, "198.51.100.2:0", "192.0.2.1:0", None);
        assert_eq!(of_flow(&gre), of_flow(&gre_back));
        assert!(!of_flow(&gre).contains("unavailable"));
        let sctp = flow(Protocol::Other(132), Direction::Outbound, "192.0.2.1:0", "198.51.100.2:0", None);
        assert!(!of_flow(&sctp).contains("unavailable"));
    }
}
