//! `flowgate_core::packet::parse` on arbitrary bytes: an IP packet as NFQUEUE hands it over.
//!
//! Beyond "never panics" (the module's promise), checks what the parse result claims about the
//! bytes: the payload lies inside the packet, ports are zero where a protocol has none, ICMP echo
//! packets carry their identifier as both ports, and TCP packets have flags.
#![no_main]

use flowgate_core::Protocol;
use flowgate_core::packet::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = parse(data) else { return };
    let range = data.as_ptr_range();
    let payload = p.payload.as_ptr_range();
    assert!(
        p.payload.is_empty() || (payload.start >= range.start && payload.end <= range.end),
        "payload outside the packet"
    );
    assert_eq!(p.src.is_ipv4(), p.dst.is_ipv4(), "mixed address families");
    assert_eq!(p.src.is_ipv4(), data[0] >> 4 == 4, "family differs from the version nibble");
    match p.protocol {
        Protocol::Tcp => assert!(p.tcp.is_some(), "TCP without flags"),
        Protocol::Udp => assert!(p.tcp.is_none()),
        Protocol::Icmp => assert_eq!(p.src_port, p.dst_port, "ICMP ports are the echo id or 0"),
        Protocol::Other(_) => assert_eq!((p.src_port, p.dst_port, p.tcp), (0, 0, None)),
    }
    assert!(!p.icmp_echo_reply || p.protocol == Protocol::Icmp);
});
