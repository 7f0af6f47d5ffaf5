//! `flowgate_core::sniff::tls::{client_hello, client_hello_message}` on arbitrary bytes: the first
//! bytes of a TCP stream, and handshake-layer bytes as QUIC's CRYPTO stream carries them.
//!
//! Checks beyond "never panics" (the module's promise):
//! - answers only settle as the stream grows: over prefixes of the input (every prefix up to 256
//!   bytes, then at most 512 more spread over the rest, and every prefix just before the first
//!   settled one), `NeedMore` until some length, then one answer, the same as for the whole
//!   input; `NeedMore` never once `MAX_CLIENT_HELLO` bytes are there;
//! - the record layer is only framing: the input taken as a handshake message and cut into two
//!   records at a point the input chooses gives the same answer through `client_hello` as
//!   `client_hello_message` gives on it (when the two record headers keep it within the bound);
//! - a found server name is normalized (`host_name` of itself) and ALPN names are printable.
#![no_main]

use flowgate_core::sniff::tls::{MAX_CLIENT_HELLO, client_hello, client_hello_message};
use flowgate_core::sniff::{Sniff, host_name};
use libfuzzer_sys::fuzz_target;

fn records(message: &[u8], cut: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 10);
    for part in [&message[..cut], &message[cut..]] {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = client_hello(data);
    if data.len() >= MAX_CLIENT_HELLO {
        assert_ne!(whole, Sniff::NeedMore, "asked for more than MAX_CLIENT_HELLO");
    }
    if let Sniff::Found(hello) = &whole {
        if let Some(sni) = &hello.sni {
            assert_eq!(host_name(sni.as_bytes()).as_ref(), Some(sni), "server name not normalized");
        }
        assert!(hello.alpn.iter().all(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_graphic())));
    }

    // Prefixes: every one of the first 256, then a stride.
    let stride = (data.len() / 512).max(1);
    let mut checked = (0..=data.len().min(256)).chain((256..=data.len()).step_by(stride)).chain([data.len()]);
    let mut last_need_more = None;
    let mut settled = None;
    for n in checked.by_ref() {
        let got = client_hello(&data[..n]);
        if got == Sniff::NeedMore {
            assert!(n < MAX_CLIENT_HELLO, "NeedMore at {n} bytes");
            last_need_more = Some(n);
        } else {
            assert_eq!(got, whole, "prefix of {n} bytes answered otherwise than the whole input");
            settled = Some(n);
            break;
        }
    }
    if let Some(first) = settled {
        // Between the last NeedMore seen and the first answer: NeedMore, then the answer.
        let mut answered = false;
        for n in last_need_more.map_or(0, |n| n + 1)..first {
            let got = client_hello(&data[..n]);
            if answered || got != Sniff::NeedMore {
                assert_eq!(got, whole, "prefix of {n} bytes answered otherwise than the whole input");
                answered = true;
            }
        }
        for n in checked {
            assert_eq!(client_hello(&data[..n]), whole, "answer changed at a prefix of {n} bytes");
        }
    } else {
        assert_eq!(whole, Sniff::NeedMore);
    }

    // The input as a handshake message, through the record layer.
    let message = client_hello_message(data);
    if data.len() + 10 <= MAX_CLIENT_HELLO {
        let cut = usize::from(data.first().copied().unwrap_or(0)) * data.len() / 256;
        assert_eq!(client_hello(&records(data, cut)), message, "records cut at {cut} disagree with the message");
    }
});
