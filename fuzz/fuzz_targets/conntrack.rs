//! ctnetlink messages from the kernel, through `flowgate_linux::conntrack`'s public API:
//! `Conntrack::recv_events` (events: new, update, destroy) and `Conntrack::dump` (dump parts,
//! NLMSG_DONE, errors), then `set_mark` and `delete` on a decoded entry, and `create`, as the
//! daemon does. The datagrams come from the input through the mock kernel
//! (`src/mock_kernel.rs`), which stands in for the socket; the decoders (`decode_event`,
//! `decode_ct_message`, `decode_entry`, `decode_tuple`, `decode_counter`, the netlink walk) are
//! private and reached only this way.
//!
//! Input: a mode byte, an answer script (length byte, bytes), then deliveries (see
//! `flowgate_fuzz::deliveries`). Checks: no panic and no hang; `recv_events` returns how many
//! events it passed on; every request the crate sends is a well-formed netlink datagram (the
//! mock checks).
#![no_main]

#[path = "../src/mock_kernel.rs"]
mod mock_kernel;

use flowgate_fuzz::{Input, deliveries};
use flowgate_linux::conntrack::{Conntrack, Entry, Tuple};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let n = usize::from(input.u8() % 32);
    let script = input.bytes(n);
    mock_kernel::reset(deliveries(&mut input), script);
    let Ok(mut ct) = Conntrack::open() else {
        panic!("cannot open a netlink socket: the conntrack target needs NETLINK_NETFILTER");
    };
    let mut entries: Vec<Entry> = Vec::new();
    // Events first, as many datagrams as the mode says (the rest go to the dump).
    let event_datagrams = usize::from(mode & 0x0f);
    for _ in 0..event_datagrams {
        let mut seen = 0;
        match ct.recv_events(|e| {
            seen += 1;
            entries.push(e.entry.clone());
        }) {
            Ok(0) => break,
            Ok(n) => assert_eq!(n, seen, "recv_events counted {n} events but passed on {seen}"),
            Err(_) => break,
        }
    }
    if mode & 0x10 != 0 {
        let _ = ct.dump(|e| entries.push(e.clone()));
    }
    let _ = ct.overruns();
    let _ = format!("{ct:?}");
    if mode & 0x20 != 0
        && let Some(e) = entries.first()
    {
        let _ = ct.set_mark(&e.original, 0x0001_0000, 0x007f_0000);
        let _ = ct.delete(&e.reply);
    }
    if mode & 0x40 != 0 {
        let t = entries.first().map_or(
            Tuple {
                protocol: 6,
                src: "192.0.2.1".parse().unwrap(),
                dst: "198.51.100.2".parse().unwrap(),
                src_port: 40000,
                dst_port: 443,
            },
            |e| e.original,
        );
        let _ = ct.create(&t, 0x0001_0000, 60);
    }
});
