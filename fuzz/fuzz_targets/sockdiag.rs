//! sock_diag (inet_diag) answers from the kernel, through `flowgate_linux::sockdiag`'s public
//! API: `SockDiag::dump` (TCP or UDP, IPv4 then IPv6) and `SockDiag::destroy_matching` (a lookup
//! by the connection's ends, a `SOCK_DESTROY`, and the dump it falls back to), as the daemon
//! uses them to adopt and cut connections. The datagrams come from the input through the mock
//! kernel (`src/mock_kernel.rs`); the decoder (`decode_socket`, `addr`) is private.
//!
//! Input: a mode byte, an answer script (length byte, bytes), then deliveries.
//! Checks: no panic and no hang; sockets come back with the protocol asked for, and
//! IPv4-mapped IPv6 addresses are given as IPv4 (the module's promise); every request sent is
//! well-formed netlink (the mock checks).
#![no_main]

#[path = "../src/mock_kernel.rs"]
mod mock_kernel;

use std::net::{IpAddr, SocketAddr};

use flowgate_fuzz::{Input, deliveries};
use flowgate_linux::sockdiag::{SockDiag, SocketInfo, TCP, UDP, state};
use libfuzzer_sys::fuzz_target;

fn check(protocol: u8, s: &SocketInfo) {
    assert_eq!(s.protocol, protocol);
    for a in [s.local, s.remote] {
        if let IpAddr::V6(v6) = a.ip() {
            assert!(v6.to_ipv4_mapped().is_none(), "IPv4-mapped address not given as IPv4: {s:?}");
        }
    }
    let _ = s.to_string();
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let n = usize::from(input.u8() % 32);
    let script = input.bytes(n);
    let ends = input.u8();
    let deliveries = deliveries(&mut input);
    mock_kernel::reset(deliveries, script);
    let Ok(mut diag) = SockDiag::open() else {
        panic!("cannot open a netlink socket: the sockdiag target needs NETLINK_SOCK_DIAG");
    };
    let protocol = if mode & 1 != 0 { UDP } else { TCP };
    let states = if protocol == TCP { state::TCP_CONNECTIONS } else { state::UDP_ALL };
    let mut found: Vec<SocketInfo> = Vec::new();
    if mode & 2 != 0 {
        let _ = diag.dump(protocol, states, |s| {
            check(protocol, s);
            found.push(*s);
        });
    }
    if mode & 4 != 0 {
        // Destroy what the dump found, or ends from the input (IPv4, IPv6, or mapped).
        let (local, remote) = match found.first() {
            Some(s) if ends & 1 == 0 => (s.local, s.remote),
            _ => {
                let l: IpAddr =
                    ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"][usize::from(ends >> 1) % 3].parse().unwrap();
                let r: IpAddr =
                    ["198.51.100.2", "2001:db8::2", "::ffff:198.51.100.2"][usize::from(ends >> 3) % 3].parse().unwrap();
                (SocketAddr::new(l, 40000), SocketAddr::new(r, 443))
            }
        };
        let _ = diag.destroy_matching(protocol, local, remote);
    }
    if mode & 8 != 0
        && let Some(s) = found.first()
    {
        let _ = diag.destroy(s);
    }
    let _ = format!("{diag:?}");
});
