//! NFQUEUE messages from the kernel, through `flowgate_linux::nfqueue`'s public API: binding a
//! queue (`Queue::open`: config requests and their acknowledgements or errors, with packets
//! arriving meanwhile), receiving packets (`Queue::recv`), answering them (`Queue::verdict`,
//! `Queue::flush`, with marks as the daemon sets them), and unbinding (`Queue::unbind`, drop).
//! The datagrams come from the input through the mock kernel (`src/mock_kernel.rs`); the parser
//! (`walk_messages`, `parse_packet`, `ct_mark`) is private and reached only this way.
//!
//! Input: a mode byte, an answer script (length byte, bytes: where each acknowledgement comes
//! and whether it is an error), then deliveries (see `flowgate_fuzz::deliveries`).
//! Checks: no panic and no hang; `recv` returns the number of packets it passed on, and `Ok(0)`
//! means the socket is drained (its documentation); a packet's payload lies in the received
//! datagram; the verdicts sent are well-formed netlink (the mock checks); `pending` counts the
//! verdicts not yet flushed.
#![no_main]

#[path = "../src/mock_kernel.rs"]
mod mock_kernel;

use flowgate_fuzz::{Input, deliveries};
use flowgate_linux::marks;
use flowgate_linux::nfqueue::{Mark, Queue, QueueConfig, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let n = usize::from(input.u8() % 32);
    let script = input.bytes(n);
    mock_kernel::reset(deliveries(&mut input), script);
    let cfg = QueueConfig { num: u16::from(mode & 3), max_len: 1024, fail_open: mode & 4 != 0, copy_range: 0xffff };
    let Ok(mut q) = Queue::open(&cfg) else { return };
    let _ = (q.num(), q.has_conntrack(), q.malformed(), q.overruns(), q.kernel_errors());
    let mut verdicts = 0;
    for _ in 0..256 {
        let mut ids = Vec::new();
        let got = q.recv(|p| {
            assert!(p.payload.len() <= 256 * 1024);
            ids.push((p.id, p.mark.unwrap_or(0), p.ct_mark));
        });
        match got {
            Ok(0) => {
                assert_eq!(mock_kernel::pending(), 0, "recv returned 0 with datagrams still waiting");
                break;
            }
            Ok(n) => assert_eq!(n, ids.len(), "recv counted {n} packets but passed on {}", ids.len()),
            Err(_) => break,
        }
        for (i, (id, mark, ct_mark)) in ids.into_iter().enumerate() {
            let (verdict, m) = match (mode >> 3).wrapping_add(i as u8) % 4 {
                0 => (Verdict::Accept, None),
                1 => (Verdict::Drop, Some(Mark::keeping(mark, marks::REJECT, marks::VERDICT))),
                2 => (Verdict::Repeat, Some(Mark::keeping(mark, marks::ALLOW | marks::owner(1), marks::MASK))),
                _ => (Verdict::Repeat, ct_mark.map(|c| Mark { value: c, mask: marks::MASK })),
            };
            q.verdict(id, verdict, m);
            verdicts += 1;
            assert_eq!(q.pending(), verdicts);
        }
        if mode & 0x80 != 0 {
            let _ = q.flush();
            verdicts = q.pending();
        }
    }
    let _ = q.flush();
    if mode & 0x40 != 0 {
        let _ = q.unbind();
    }
    drop(q);
    let _ = mock_kernel::sent();
});
