//! `flowgate_core::sniff::quic::InitialSniffer` (and `is_initial`) over a sequence of datagrams.
//!
//! Input: a mode byte, then
//! - mode bit 0 clear, raw datagrams: `[u16 big-endian length][bytes]` repeated (a short last
//!   one takes what is left; the fixtures in `crates/flowgate-core/src/sniff/testdata/*.bin` are
//!   in this framing). Checks: a first datagram `is_initial` refuses is `NotThis`; once an answer
//!   is given it is given again for every later datagram; a clone of the sniffer taken before a
//!   push answers that push the same (the state is all in the value); a found server name is
//!   normalized.
//! - mode bit 0 set, sealed CRYPTO frames: the target builds client Initial packets itself,
//!   protected as RFC 9001 says (its own HKDF/AES code, not the crate's), so that the fuzzer's
//!   bytes reach the frames, the reassembly and the ClientHello parser behind the decryption.
//!   Mode bit 1 picks QUIC v2; bits 2.. the DCID length (8 to 20). Then records of
//!   `[flags][offset u16 BE][length u16 BE][data]`, each a CRYPTO frame (data cut to what the
//!   input holds); flags: 0x01 end the datagram after it, 0x02 a PING before it, 0x04 an ACK
//!   before it, 0x08 three PADDING bytes before it, 0x10 a 0-RTT packet coalesced after the
//!   Initial, 0x20 8-byte variable-length integers in the frame, 0x40/0x80 the packet number
//!   length - 1. Each datagram is one Initial (packet number = its index), padded to 1,200 bytes.
//!   Check: after every datagram the sniffer's answer is the one of a model written from the
//!   module documentation: CRYPTO bytes kept below offset 16,379, first copy wins; a datagram
//!   with a new byte runs `client_hello_message` on the bytes contiguous from 0 (an answer
//!   other than NeedMore is final); 16 datagrams in a row without a new byte give NotThis.
#![no_main]

use aes::Aes128;
use aes::cipher::array::Array;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::{AeadInOut, Aes128Gcm};
use flowgate_core::sniff::quic::{InitialSniffer, is_initial};
use flowgate_core::sniff::tls::client_hello_message;
use flowgate_core::sniff::{ClientHello, Sniff, host_name};
use hkdf::Hkdf;
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

/// What `sniff::quic`'s documentation promises: CRYPTO bytes kept, datagrams without progress.
const KEPT: usize = 16 * 1024 - 5;
const NO_PROGRESS_LIMIT: u32 = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 { raw(rest) } else { sealed(mode, rest) }
});

fn check_found(answer: &Sniff<ClientHello>) {
    if let Sniff::Found(hello) = answer
        && let Some(sni) = &hello.sni
    {
        assert_eq!(host_name(sni.as_bytes()).as_ref(), Some(sni), "server name not normalized");
    }
}

fn raw(mut rest: &[u8]) {
    let mut sniffer = InitialSniffer::new();
    let mut answer: Option<Sniff<ClientHello>> = None;
    let mut first = true;
    while !rest.is_empty() {
        let len = match rest {
            [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
            _ => 0,
        };
        let body = rest.get(2..).unwrap_or_default();
        let (datagram, after) = body.split_at(len.min(body.len()));
        rest = after;
        let mut before = sniffer.clone();
        let got = sniffer.push(datagram);
        assert_eq!(before.push(datagram), got, "a clone answered otherwise");
        check_found(&got);
        if first && !is_initial(datagram) {
            assert_eq!(got, Sniff::NotThis, "a first datagram that is not an Initial");
        }
        first = false;
        match &answer {
            Some(a) => assert_eq!(&got, a, "the answer changed"),
            None if got != Sniff::NeedMore => answer = Some(got),
            None => {}
        }
    }
}

/// Client Initial keys (RFC 9001 5.2, RFC 9369 3.3): AEAD key, IV, header protection key.
fn keys(v2: bool, dcid: &[u8]) -> (Aes128Gcm, [u8; 12], Aes128) {
    let salt: [u8; 20] = if v2 {
        [
            0x0d, 0xed, 0xe3, 0xde, 0xf7, 0, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd,
            0x2e, 0xd9,
        ]
    } else {
        [
            0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb,
            0x7f, 0x0a,
        ]
    };
    let label = |secret: &[u8], name: &str, out: &mut [u8]| {
        let full = format!("tls13 {name}");
        let info = [&(out.len() as u16).to_be_bytes()[..], &[full.len() as u8], full.as_bytes(), &[0]].concat();
        Hkdf::<Sha256>::from_prk(secret).expect("prk").expand(&info, out).expect("expand");
    };
    let (initial, _) = Hkdf::<Sha256>::extract(Some(&salt), dcid);
    let mut client = [0u8; 32];
    label(&initial, "client in", &mut client);
    let prefix = if v2 { "quicv2" } else { "quic" };
    let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
    label(&client, &format!("{prefix} key"), &mut key);
    label(&client, &format!("{prefix} iv"), &mut iv);
    label(&client, &format!("{prefix} hp"), &mut hp);
    (Aes128Gcm::new(&Array::from(key)), iv, Aes128::new(&Array::from(hp)))
}

fn varint(v: u64, long: bool) -> Vec<u8> {
    if long {
        (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec()
    } else if v < 64 {
        vec![v as u8]
    } else if v < 16384 {
        (0x4000 | v as u16).to_be_bytes().to_vec()
    } else {
        (0x8000_0000 | v as u32).to_be_bytes().to_vec()
    }
}

/// One protected long-header packet (`kind_bits` already mapped for the version).
fn protect(v2: bool, kind_bits: u8, dcid: &[u8], pn: u64, pn_len: usize, payload: &[u8]) -> Vec<u8> {
    let (aead, iv, hp) = keys(v2, dcid);
    let version: u32 = if v2 { 0x6b33_43cf } else { 1 };
    let mut p = vec![0xc0 | kind_bits << 4 | (pn_len as u8 - 1)];
    p.extend_from_slice(&version.to_be_bytes());
    p.push(dcid.len() as u8);
    p.extend_from_slice(dcid);
    p.extend_from_slice(&[4, 1, 2, 3, 4]);
    if kind_bits == u8::from(v2) {
        p.push(0); // an Initial: no token
    }
    p.extend_from_slice(&(0x8000_0000u32 | (pn_len + payload.len() + 16) as u32).to_be_bytes());
    let pn_offset = p.len();
    p.extend_from_slice(&pn.to_be_bytes()[8 - pn_len..]);
    let mut nonce = iv;
    for (n, b) in nonce[4..].iter_mut().zip(pn.to_be_bytes()) {
        *n ^= b;
    }
    let mut body = payload.to_vec();
    let tag = aead.encrypt_inout_detached(&Array::from(nonce), &p, body.as_mut_slice().into()).expect("seal");
    p.extend_from_slice(&body);
    p.extend_from_slice(&tag);
    let sample: [u8; 16] = p[pn_offset + 4..pn_offset + 20].try_into().expect("sample");
    let mut mask = Array::from(sample);
    hp.encrypt_block(&mut mask);
    p[0] ^= mask[0] & 0x0f;
    for i in 0..pn_len {
        p[pn_offset + i] ^= mask[1 + i];
    }
    p
}

/// One datagram of the sealed mode: its frames, the (offset, data) of its CRYPTO frames, and the
/// flags of the record that closed it.
struct Datagram<'a> {
    frames: Vec<u8>,
    pieces: Vec<(usize, &'a [u8])>,
    flags: u8,
}

fn sealed(mode: u8, mut rest: &[u8]) {
    let v2 = mode & 2 != 0;
    let dcid: Vec<u8> = (0..8 + usize::from(mode >> 2) % 13).map(|i| 0x5a ^ i as u8).collect();
    let (initial_bits, zero_rtt_bits) = if v2 { (1, 2) } else { (0, 1) };

    let mut datagrams: Vec<Datagram<'_>> = Vec::new();
    let mut frames = Vec::new();
    let mut pieces = Vec::new();
    while let [flags, o0, o1, l0, l1, tail @ ..] = rest {
        let offset = usize::from(u16::from_be_bytes([*o0, *o1]));
        let len = usize::from(u16::from_be_bytes([*l0, *l1])).min(tail.len());
        let (bytes, after) = tail.split_at(len);
        rest = after;
        if flags & 0x02 != 0 {
            frames.push(0x01);
        }
        if flags & 0x04 != 0 {
            frames.extend_from_slice(&[0x02, 0x03, 0x00, 0x01, 0x00, 0x00, 0x01]);
        }
        if flags & 0x08 != 0 {
            frames.extend_from_slice(&[0, 0, 0]);
        }
        let long = flags & 0x20 != 0;
        frames.push(0x06);
        frames.extend_from_slice(&varint(offset as u64, long));
        frames.extend_from_slice(&varint(len as u64, long));
        frames.extend_from_slice(bytes);
        pieces.push((offset, bytes));
        if flags & 0x01 != 0 || rest.len() < 5 {
            datagrams.push(Datagram {
                frames: std::mem::take(&mut frames),
                pieces: std::mem::take(&mut pieces),
                flags: *flags,
            });
            if datagrams.len() >= 64 {
                break;
            }
        }
    }

    let mut sniffer = InitialSniffer::new();
    let mut stream = vec![None::<u8>; KEPT];
    let mut contiguous = 0;
    let mut idle = 0;
    let mut model: Option<Sniff<ClientHello>> = None;
    for (i, Datagram { frames, pieces, flags }) in datagrams.iter().enumerate() {
        let pn_len = 1 + usize::from(flags >> 6);
        let pn = i as u64;
        let zero_rtt =
            if flags & 0x10 != 0 { protect(v2, zero_rtt_bits, &dcid, pn, 2, &[0x01; 30]) } else { Vec::new() };
        // Pad the Initial so the datagram has 1,200 bytes.
        let bare = protect(v2, initial_bits, &dcid, pn, pn_len, frames).len();
        let mut payload = frames.clone();
        payload.resize(frames.len() + 1200usize.saturating_sub(bare + zero_rtt.len()), 0);
        let datagram = [protect(v2, initial_bits, &dcid, pn, pn_len, &payload), zero_rtt].concat();
        assert!(i > 0 || is_initial(&datagram), "a built first Initial is refused");

        let expected = match &model {
            Some(done) => done.clone(),
            None => {
                let mut new = false;
                for &(offset, bytes) in pieces {
                    for (at, &b) in (offset..KEPT).zip(bytes) {
                        if stream[at].is_none() {
                            stream[at] = Some(b);
                            new = true;
                        }
                    }
                }
                if new {
                    idle = 0;
                    while stream.get(contiguous).is_some_and(Option::is_some) {
                        contiguous += 1;
                    }
                    let bytes: Vec<u8> = stream[..contiguous].iter().map(|b| b.unwrap_or(0)).collect();
                    match client_hello_message(&bytes) {
                        Sniff::NeedMore => Sniff::NeedMore,
                        answer => {
                            model = Some(answer.clone());
                            answer
                        }
                    }
                } else {
                    idle += 1;
                    if idle >= NO_PROGRESS_LIMIT {
                        model = Some(Sniff::NotThis);
                        Sniff::NotThis
                    } else {
                        Sniff::NeedMore
                    }
                }
            }
        };
        let got = sniffer.push(&datagram);
        check_found(&got);
        assert_eq!(got, expected, "datagram {i}: the sniffer and the model disagree");
    }
}
