//! `flowgate_linux::nflog::parse_datagram` on arbitrary bytes: a datagram as the kernel sends it
//! on an NFLOG socket. The parser is public, so this target calls it directly, in process,
//! without the mock kernel of the other netlink targets.
//!
//! Input: the datagram itself. Checks beyond "never panics" (its documentation's promise):
//! - every payload, and all of them together, fit in the input (each comes from its own bytes);
//! - a prefix holds no NUL (it ends at the first);
//! - logs plus malformed messages are at most one per 16-byte netlink header the input holds,
//!   plus the one count for a walk that ended on a bad length;
//! - output is appended: what `out` held before is untouched, and parsing again gives the same;
//! - every log, encoded again as the kernel lays it out, parses back to itself, not malformed.
#![no_main]

use flowgate_linux::nflog::{Logged, parse_datagram};
use libfuzzer_sys::fuzz_target;

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// One `NFULNL_MSG_PACKET` message carrying `l`, as `__build_packet_message` would build it.
fn encode(l: &Logged) -> Vec<u8> {
    let mut m = vec![0; 16];
    m[4..6].copy_from_slice(&0x0400u16.to_ne_bytes());
    m.extend_from_slice(&[l.family, 0]);
    m.extend_from_slice(&l.group.to_be_bytes());
    attr(&mut m, 1, &[0x08, 0x00, l.hook, 0]);
    if l.mark != 0 {
        attr(&mut m, 2, &l.mark.to_be_bytes());
    }
    for (ty, v) in [(4, l.indev), (5, l.outdev), (11, l.uid), (14, l.gid)] {
        if let Some(v) = v {
            attr(&mut m, ty, &v.to_be_bytes());
        }
    }
    let mut prefix = l.prefix.as_bytes().to_vec();
    prefix.push(0);
    attr(&mut m, 10, &prefix);
    if !l.payload.is_empty() {
        attr(&mut m, 9, &l.payload);
    }
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_ne_bytes());
    m
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let malformed = parse_datagram(data, &mut out);

    let total: usize = out.iter().map(|l| l.payload.len()).sum();
    assert!(total <= data.len(), "payloads of {total} bytes from {} bytes of input", data.len());
    assert!(out.iter().all(|l| !l.prefix.contains('\0')), "a prefix holds a NUL");
    assert!(
        out.len() + malformed <= data.len() / 16 + 1,
        "{} logs and {malformed} malformed from {} bytes",
        out.len(),
        data.len()
    );

    let sentinel = Logged {
        group: 0xabcd,
        family: 0xee,
        hook: 0xff,
        prefix: "sentinel".to_owned(),
        mark: 1,
        indev: Some(2),
        outdev: None,
        uid: Some(3),
        gid: None,
        payload: vec![4; 5],
    };
    let mut again = vec![sentinel.clone()];
    assert_eq!(parse_datagram(data, &mut again), malformed, "a second parse counts the same");
    assert_eq!(again[0], sentinel, "what out held before was changed");
    assert_eq!(&again[1..], &out[..], "a second parse gives the same logs");

    for l in &out {
        // A prefix of invalid UTF-8 grows when made lossy (one byte to three) and may no longer
        // fit in one attribute.
        if l.prefix.len() + 5 > usize::from(u16::MAX) {
            continue;
        }
        let mut back = Vec::new();
        assert_eq!(parse_datagram(&encode(l), &mut back), 0, "re-encoded {l:?} is malformed");
        assert_eq!(back.as_slice(), std::slice::from_ref(l), "re-encoded log parsed differently");
    }
});
