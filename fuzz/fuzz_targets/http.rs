//! `flowgate_core::sniff::http::request_head` on arbitrary bytes: the first bytes a client sent.
//!
//! Input: the stream itself. Checks beyond "never panics":
//! - over growing prefixes the answers are `NeedMore` and then either the same `Found` for every
//!   longer prefix or `NotThis` for every longer prefix (every prefix for inputs of up to 300
//!   bytes, else 64 evenly spaced ones, and around the shortest prefix that is found);
//! - bytes after a found head change nothing; bytes after a `NotThis` leave it `NotThis`;
//! - a found head has a method of token bytes and a target (without spaces or controls unless
//!   the head is ambiguous); its host
//!   is normalized (`host_name` gives it back unchanged) and occurs in the input (ignoring
//!   case); an ambiguous head has no host.
#![no_main]

use flowgate_core::sniff::Sniff;
use flowgate_core::sniff::host_name;
use flowgate_core::sniff::http::{MAX_HEAD, RequestHead, request_head};
use libfuzzer_sys::fuzz_target;

fn check_head(head: &RequestHead, data: &[u8]) {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    assert!(!head.method.is_empty() && head.method.bytes().all(token), "method {:?}", head.method);
    assert!(!head.target.is_empty(), "an empty target");
    // A request line only a lenient server reads (ambiguous) may hold blanks and controls.
    if !head.ambiguous {
        assert!(head.target.bytes().all(|b| b > b' ' && b != 0x7f), "target {:?}", head.target);
    }
    if head.ambiguous {
        assert_eq!(head.host, None, "an ambiguous head names a host");
    }
    if let Some(host) = &head.host {
        assert_eq!(host_name(host.as_bytes()).as_deref(), Some(host.as_str()), "host not normalized");
        let lower = data.to_ascii_lowercase();
        assert!(lower.windows(host.len()).any(|w| w == host.as_bytes()), "host {host:?} not in the input");
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = request_head(data);
    let mut cuts: Vec<usize> =
        if data.len() <= 300 { (0..=data.len()).collect() } else { (0..=64).map(|i| data.len() * i / 64).collect() };
    if let Sniff::Found(head) = &whole {
        check_head(head, data);
        // The shortest found prefix, by bisection (answers are monotone if the checks below hold).
        let (mut lo, mut hi) = (0, data.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if matches!(request_head(&data[..mid]), Sniff::Found(_)) { hi = mid } else { lo = mid + 1 }
        }
        cuts.extend([lo.saturating_sub(1), lo, lo + 1].into_iter().filter(|&c| c <= data.len()));
        assert!(lo <= MAX_HEAD, "found after {lo} bytes");
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"\r\n\r\nGET / HTTP/1.1\r\nHost: other.example\r\n\r\n");
        assert_eq!(request_head(&longer), whole, "bytes after the head changed it");
    }
    if whole == Sniff::NotThis {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b" / HTTP/1.1\r\nHost: a.example\r\n\r\n");
        assert_eq!(request_head(&longer), Sniff::NotThis, "more bytes made a NotThis something else");
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut settled: Option<Sniff<RequestHead>> = None;
    for cut in cuts {
        let answer = request_head(&data[..cut]);
        match &settled {
            Some(s) => assert_eq!(&answer, s, "prefix of {cut} bytes"),
            None if answer != Sniff::NeedMore => settled = Some(answer),
            None => {}
        }
    }
    assert_eq!(settled.unwrap_or(Sniff::NeedMore), whole);
});
