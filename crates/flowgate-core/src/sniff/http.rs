//! HTTP/1.x sniffer: the request head at the start of a client's byte stream, and the host it
//! names.
//!
//! This room reads bytes and returns a [`RequestHead`]; it touches nothing else. The request line
//! and the header fields are parsed by `httparse` (zero-copy, and it tells a partial head from a
//! malformed one, which is what [`Sniff`] needs); this module adds what a filter must decide on
//! top of it: where the host comes from, what is ambiguous, and the limits.
//!
//! What `httparse` 1.10 accepts, and what that means here:
//!
//! - **Leading empty lines** (CRLF or bare LF) before the request line are skipped, as RFC 9112
//!   2.2 asks of servers; they count towards [`MAX_HEAD`].
//! - **Bare LF** line endings are accepted everywhere (a CR must be followed by LF). Servers such
//!   as nginx accept them too, so a head ended by `\n\n` is complete: waiting for `\r\n\r\n`
//!   would let a client hide its host by leaving out the CRs.
//! - **obs-fold** (a header line continued on a line starting with a space or tab) is rejected by
//!   `httparse` in requests, and RFC 9112 5.2 lets a server either reject it or unfold it. A head
//!   whose header section does not parse (obs-fold, a byte not allowed in a name or value) is
//!   still a request, not another protocol: once its blank line arrives it is `Found` with
//!   `host: None` and `ambiguous: true`, so the engine can treat it as an attempt to hide the
//!   host rather than as "not HTTP".
//! - Several spaces between the request line's words are accepted (RFC 9112 3 allows it). A
//!   request line httparse refuses (a tab between words, a blank after the version, a target
//!   that is not UTF-8 or holds a control byte) but that still reads as `METHOD target
//!   HTTP/1.x` to a lenient server is treated like a refused header section: found at the
//!   blank line, ambiguous, no host. Refusing it as "not HTTP" would let a client hide its
//!   host behind one odd byte.
//! - Only `HTTP/1.0` and `HTTP/1.1` are HTTP/1.x: the HTTP/2 preface (`PRI * HTTP/2.0`) and
//!   HTTP/0.9's `GET /` without a version are `NotThis`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use httparse::{EMPTY_HEADER, Header, ParserConfig, Request, Status};

use super::{Sniff, host_name};

/// Longest request head (from the first byte, leading empty lines included, to the blank line)
/// this sniffer reads: 32 KiB. Servers refuse longer heads, so longer is not a request anyone
/// answers: nginx by default takes at most 4 lines of 8 KiB beyond its 1 KiB buffer (32 KiB),
/// HAProxy and Node.js 16 KiB, Tomcat 8 KiB. Browsers stay well under it (cookies are capped at
/// 4 KiB each). A head that is still open after this many bytes is `NotThis`: the host cannot be
/// told, and the engine should decide the flow on what it knows without a host. To see hosts in
/// long heads the engine must hold up to this many bytes of a flow it sniffs.
pub const MAX_HEAD: usize = 32 * 1024;

/// Longest method: registered methods have at most 17 characters (`UPDATEREDIRECTREF`). A first
/// word longer than this is another protocol that happens to start with letters; saying so early
/// spares the engine holding up to [`MAX_HEAD`] bytes of it.
const MAX_METHOD: usize = 32;

/// Header fields parsed without allocating; Apache's default limit is 100. A head with more is
/// parsed again with room for as many fields as it has lines.
const STACK_HEADERS: usize = 100;

/// An HTTP/1.x request head: its request line and the host it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The request target, as sent (origin form `/path`, absolute form `http://host/path`,
    /// authority form `host:port` for CONNECT, or `*`).
    pub target: String,
    /// The host name the request is for, normalized by [`host_name`]: from an absolute-form
    /// target first (RFC 9112 3.2.2: a server must then ignore Host), from a CONNECT's
    /// authority-form target, else from the Host header; port and userinfo removed. `None` when
    /// there is no Host (HTTP/1.0), when it is empty, when it is an IP address literal
    /// (`[2001:db8::1]:80`, `192.0.2.1`: an address, not a name), or when `ambiguous`.
    pub host: Option<String>,
    /// The head names its host in a way servers may read differently, which is how requests
    /// slip past host rules: more than one Host line (RFC 9112 3.2 says a server must reject
    /// it, some use the first, some the last), a Host that disagrees with an absolute-form
    /// target (servers must use the target, some proxies use Host), a Host or target authority
    /// that is not a valid host, or a header section that does not parse (obs-fold and other
    /// bytes a lenient server may accept). `host` is then `None`: no guess is made, so the
    /// caller decides what such a request deserves (no host rule can match it; a product may
    /// drop it).
    pub ambiguous: bool,
}

/// The request head at the start of a client's byte stream.
///
/// `NeedMore` until the head is complete (its blank line, `\r\n\r\n` or with bare LFs),
/// `Found` then; `NotThis` as soon as the bytes cannot start an HTTP/1.x request (the method must
/// be a token of at most 32 bytes followed by a space or tab: a TLS record fails at byte 0, an
/// SSH banner at the end of its first word or line; a first line that does not end in
/// `HTTP/1.0` or `HTTP/1.1` fails at its end), or when the head is longer than [`MAX_HEAD`]. Results
/// are consistent over a growing stream: `NeedMore` on every prefix shorter than the head, then
/// the same `Found` (bytes after the head are not read), or `NotThis` from some length on.
pub fn request_head(stream: &[u8]) -> Sniff<RequestHead> {
    let buf = stream.get(..MAX_HEAD).unwrap_or(stream);
    let more = || if stream.len() > MAX_HEAD { Sniff::NotThis } else { Sniff::NeedMore };

    let start = match skip_empty_lines(buf) {
        Sniff::Found(start) => start,
        Sniff::NeedMore => return more(),
        Sniff::NotThis => return Sniff::NotThis,
    };
    let line_and_rest = buf.get(start..).unwrap_or_default();
    if !starts_with_method(line_and_rest) {
        return Sniff::NotThis;
    }
    let Some(newline) = line_and_rest.iter().position(|&b| b == b'\n') else {
        return more();
    };
    let (line, fields) = line_and_rest.split_at(newline + 1);
    let Some((method, target)) = request_line(line) else {
        // httparse refuses the line. If it still reads as an HTTP/1.x request line, a lenient
        // server may answer it: a request whose host is not told, not another protocol.
        return match lenient_request_line(line) {
            Some((method, target)) => ambiguous_at_blank_line(buf, start + newline, method, target, more),
            None => Sniff::NotThis,
        };
    };

    let mut stack = [EMPTY_HEADER; STACK_HEADERS];
    let parsed = match httparse::parse_headers(fields, &mut stack) {
        Err(httparse::Error::TooManyHeaders) => {
            // Every field ends with an LF, so this many cannot be too few.
            let lines = fields.iter().filter(|&&b| b == b'\n').count() + 1;
            let mut heap = vec![EMPTY_HEADER; lines];
            headers_outcome(httparse::parse_headers(fields, &mut heap), method, target)
        }
        other => headers_outcome(other, method, target),
    };
    match parsed {
        Outcome::Head(head) => Sniff::Found(head),
        Outcome::Partial => more(),
        // The header section is not one httparse reads, but this is a request.
        Outcome::Malformed => ambiguous_at_blank_line(buf, start + newline, method.to_owned(), target.to_owned(), more),
    }
}

/// A request whose head does not parse cleanly: `Found` (ambiguous, no host) once its blank
/// line is in `buf`, looking from `from`, the request line's LF (which may be the first LF of
/// the two); until then what `more` says.
fn ambiguous_at_blank_line(
    buf: &[u8],
    from: usize,
    method: String,
    target: String,
    more: impl Fn() -> Sniff<RequestHead>,
) -> Sniff<RequestHead> {
    let tail = buf.get(from..).unwrap_or_default();
    let ended = tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
    if ended { Sniff::Found(RequestHead { method, target, host: None, ambiguous: true }) } else { more() }
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `bytes` (from the request line's start) begin with a method: a token of at most
/// [`MAX_METHOD`] bytes followed by a space or tab, or the start of one.
fn starts_with_method(bytes: &[u8]) -> bool {
    match bytes.iter().position(|&b| !is_token(b)) {
        None => bytes.len() <= MAX_METHOD,
        Some(end) => end > 0 && end <= MAX_METHOD && matches!(bytes.get(end), Some(b' ' | b'\t')),
    }
}

/// A request line httparse refuses but that reads as HTTP/1.x to a lenient server: a method,
/// blanks (spaces or tabs), a target, blanks, `HTTP/1.0` or `HTTP/1.1`, then blanks, CR and LF
/// in any amount. The target is everything between the blanks (as lossy UTF-8).
fn lenient_request_line(line: &[u8]) -> Option<(String, String)> {
    let blank = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let end = line.iter().rposition(|b| !blank(b))? + 1;
    let line = line.get(..end)?;
    let rest = line.strip_suffix(b"HTTP/1.1").or_else(|| line.strip_suffix(b"HTTP/1.0"))?;
    if !rest.last().is_some_and(|b| matches!(b, b' ' | b'\t')) {
        return None;
    }
    let method_end = rest.iter().position(|&b| !is_token(b))?;
    let method = rest.get(..method_end)?;
    let target = rest.get(method_end..)?;
    let target_start = target.iter().position(|b| !blank(b))?;
    let target_end = target.iter().rposition(|b| !blank(b))? + 1;
    let target = target.get(target_start..target_end)?;
    if method.is_empty() || method.len() > MAX_METHOD {
        return None;
    }
    Some((String::from_utf8_lossy(method).into_owned(), String::from_utf8_lossy(target).into_owned()))
}

enum Outcome {
    Head(RequestHead),
    Partial,
    Malformed,
}

fn headers_outcome(parsed: httparse::Result<(usize, &[Header<'_>])>, method: &str, target: &str) -> Outcome {
    match parsed {
        Ok(Status::Complete((_, headers))) => {
            let (host, ambiguous) = host_of(method, target, headers);
            Outcome::Head(RequestHead { method: method.to_owned(), target: target.to_owned(), host, ambiguous })
        }
        Ok(Status::Partial) => Outcome::Partial,
        Err(_) => Outcome::Malformed,
    }
}

/// Where the first non-empty line starts (after CRLF or LF lines): `NeedMore` while there are
/// only empty lines (or a CR waiting for its LF), `NotThis` when a CR is followed by another byte.
fn skip_empty_lines(buf: &[u8]) -> Sniff<usize> {
    let mut at = 0;
    loop {
        match buf.get(at..).unwrap_or_default() {
            [b'\r', b'\n', ..] => at += 2,
            [b'\n', ..] => at += 1,
            [b'\r'] | [] => return Sniff::NeedMore,
            [b'\r', ..] => return Sniff::NotThis,
            _ => return Sniff::Found(at),
        }
    }
}

/// The method and target of a request line (with its LF) as httparse reads it: `None` when it
/// refuses the line.
fn request_line(line: &[u8]) -> Option<(&str, &str)> {
    let mut config = ParserConfig::default();
    config.allow_multiple_spaces_in_request_line_delimiters(true);
    let mut no_headers: [Header<'_>; 0] = [];
    let mut request = Request::new(&mut no_headers);
    // With no header slots, a whole request line is Partial (the fields are still to come); a
    // request line with an empty header section (`GET / HTTP/1.1\r\n\r\n`) is never given here,
    // because the line is cut at its own LF.
    match config.parse_request(&mut request, line) {
        Ok(_) => Some((request.method.unwrap_or_default(), request.path.unwrap_or_default())),
        Err(_) => None,
    }
}

/// What an authority (a Host value, or the authority of a target) names.
#[derive(Debug, PartialEq, Eq)]
enum Authority {
    Name(String),
    Address(IpAddr),
    Empty,
    Invalid,
}

/// The host of the request and whether it is ambiguous (then the host is `None`).
fn host_of(method: &str, target: &str, headers: &[Header<'_>]) -> (Option<String>, bool) {
    let mut host_lines = headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
    let first = host_lines.next();
    if host_lines.next().is_some() {
        return (None, true);
    }
    let header = first.map(|h| authority(h.value, false));
    let named = match target_authority(method, target).map(|a| authority(a.as_bytes(), true)) {
        Some(from_target) => {
            let conflict = matches!(&header, Some(h) if *h != Authority::Empty && *h != from_target);
            if conflict {
                return (None, true);
            }
            from_target
        }
        None => header.unwrap_or(Authority::Empty),
    };
    match named {
        Authority::Name(name) => (Some(name), false),
        Authority::Address(_) | Authority::Empty => (None, false),
        Authority::Invalid => (None, true),
    }
}

/// The authority of an absolute-form target (`scheme://authority/...`), or a CONNECT's
/// authority-form target; `None` for origin form and `*`.
fn target_authority<'t>(method: &str, target: &'t str) -> Option<&'t str> {
    if method == "CONNECT" {
        return Some(target);
    }
    let (scheme, rest) = target.split_once("://")?;
    let mut chars = scheme.bytes();
    let scheme_ok = chars.next().is_some_and(|b| b.is_ascii_alphabetic())
        && chars.all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.');
    if !scheme_ok {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    rest.get(..end)
}

/// Reads `host[:port]` (RFC 3986 authority; `userinfo@` only where `userinfo` is allowed: in a
/// target, not in a Host header).
fn authority(raw: &[u8], userinfo: bool) -> Authority {
    let raw = match raw.iter().rposition(|&b| b == b'@') {
        Some(at) if userinfo => raw.get(at + 1..).unwrap_or_default(),
        Some(_) => return Authority::Invalid,
        None => raw,
    };
    if raw.is_empty() {
        return Authority::Empty;
    }
    let port_ok = |port: &[u8]| port.is_empty() || (port.len() <= 5 && port.iter().all(u8::is_ascii_digit));
    if let Some(bracketed) = raw.strip_prefix(b"[") {
        let Some(close) = bracketed.iter().position(|&b| b == b']') else {
            return Authority::Invalid;
        };
        let (inside, after) = bracketed.split_at(close);
        let after = after.get(1..).unwrap_or_default();
        let port = match after {
            [] => Some(&b""[..]),
            [b':', port @ ..] => Some(port),
            _ => None,
        };
        let address = std::str::from_utf8(inside).ok().and_then(|s| s.parse::<Ipv6Addr>().ok());
        return match (address, port) {
            (Some(a), Some(p)) if port_ok(p) => Authority::Address(IpAddr::V6(a)),
            _ => Authority::Invalid,
        };
    }
    let (host, port) = match raw.iter().rposition(|&b| b == b':') {
        Some(colon) => (raw.get(..colon).unwrap_or_default(), raw.get(colon + 1..).unwrap_or_default()),
        None => (raw, &b""[..]),
    };
    if host.is_empty() || !port_ok(port) {
        return Authority::Invalid;
    }
    if let Some(v4) = std::str::from_utf8(host).ok().and_then(|s| s.parse::<Ipv4Addr>().ok()) {
        return Authority::Address(IpAddr::V4(v4));
    }
    match host_name(host) {
        Some(name) => Authority::Name(name),
        None => Authority::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(bytes: &[u8]) -> RequestHead {
        match request_head(bytes) {
            Sniff::Found(head) => head,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn host(bytes: &[u8]) -> (Option<String>, bool) {
        let head = found(bytes);
        (head.host, head.ambiguous)
    }

    #[test]
    fn a_get_with_host_is_found_with_its_normalized_name_and_without_the_port() {
        let head = found(b"GET /index.html?q=1 HTTP/1.1\r\nHost: WWW.Example.COM.:8080\r\nAccept: */*\r\n\r\nbody");
        assert_eq!(
            head,
            RequestHead {
                method: "GET".into(),
                target: "/index.html?q=1".into(),
                host: Some("www.example.com".into()),
                ambiguous: false
            }
        );
        assert_eq!(host(b"POST / HTTP/1.0\r\nhOsT:   a.example  \r\n\r\n"), (Some("a.example".into()), false));
    }

    #[test]
    fn every_prefix_of_a_head_needs_more_and_every_longer_stream_finds_the_same() {
        let whole = b"\r\nGET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nX-Y: z\r\n\r\n";
        for cut in 0..whole.len() {
            assert_eq!(request_head(&whole[..cut]), Sniff::NeedMore, "prefix of {cut}");
        }
        let head = found(whole);
        let mut longer = whole.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n");
        assert_eq!(request_head(&longer), Sniff::Found(head));
    }

    #[test]
    fn other_protocols_are_not_this_from_their_first_bytes() {
        let tls = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
        assert_eq!(request_head(&tls[..1]), Sniff::NotThis);
        assert_eq!(request_head(b"\x00"), Sniff::NotThis);
        assert_eq!(request_head(b" GET"), Sniff::NotThis, "a space before the method");
        assert_eq!(request_head(b"\r\r"), Sniff::NotThis, "a CR without its LF");
        assert_eq!(request_head(b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"), Sniff::NotThis);
        assert_eq!(request_head(b"SSH-2.0-OpenSSH_9.6\r\n"), Sniff::NotThis);
        assert_eq!(request_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniff::NotThis, "HTTP/2 preface");
        assert_eq!(request_head(b"GET /\r\n"), Sniff::NotThis, "HTTP/0.9");
        assert_eq!(request_head(b"GET(/ HTTP/1.1\r\n"), Sniff::NotThis, "a method ended by a non-token");
        assert_eq!(request_head(b"GET / HTTP/1.1 x\r\n"), Sniff::NotThis, "a line ended by another word");
        assert_eq!(request_head(&[b'A'; MAX_METHOD + 1]), Sniff::NotThis, "a first word too long");
        assert_eq!(request_head(&[b'A'; MAX_METHOD]), Sniff::NeedMore);
        assert_eq!(request_head(b"GET / HTTP/1."), Sniff::NeedMore);
        assert_eq!(request_head(b"GET / HTTP/1.2\r\n"), Sniff::NotThis);
    }

    #[test]
    fn leading_empty_lines_bare_lf_and_several_spaces_are_accepted() {
        assert_eq!(host(b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n"), (Some("a.example".into()), false));
        assert_eq!(host(b"GET / HTTP/1.1\nHost: a.example\n\n"), (Some("a.example".into()), false));
        assert_eq!(request_head(b"GET / HTTP/1.1\nHost: a.example\n"), Sniff::NeedMore);
        assert_eq!(found(b"GET   /x   HTTP/1.1\r\nHost: a.example\r\n\r\n").target, "/x");
        assert_eq!(request_head(b"\r\n\r\n\n"), Sniff::NeedMore, "only empty lines so far");
        assert_eq!(request_head(b"\r"), Sniff::NeedMore);
    }

    #[test]
    fn the_absolute_form_target_names_the_host_before_the_host_header() {
        assert_eq!(host(b"GET http://user:pw@A.example:8080/p?q HTTP/1.1\r\n\r\n"), (Some("a.example".into()), false));
        assert_eq!(
            host(b"GET http://a.example/ HTTP/1.1\r\nHost: a.example:80\r\n\r\n"),
            (Some("a.example".into()), false),
            "the same host with a port is no conflict"
        );
        assert_eq!(host(b"GET http://a.example/ HTTP/1.1\r\nHost:\r\n\r\n"), (Some("a.example".into()), false));
        assert_eq!(host(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n"), (None, true));
        assert_eq!(
            host(b"GET http:/a.example/ HTTP/1.1\r\n\r\n"),
            (None, false),
            "no authority: no host from the target"
        );
        assert_eq!(host(b"GET http://a_%41.example/ HTTP/1.1\r\n\r\n"), (None, true));
        assert_eq!(
            host(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"),
            (Some("a.example".into()), false)
        );
        assert_eq!(host(b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n"), (Some("a.example".into()), false));
    }

    #[test]
    fn two_host_lines_or_an_invalid_host_are_ambiguous() {
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"), (None, true));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a.example\r\nHOST: a.example\r\n\r\n"), (None, true));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a example\r\n\r\n"), (None, true));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a.example:http\r\n\r\n"), (None, true));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: u@a.example\r\n\r\n"), (None, true));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n"), (None, true));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1\r\n\r\n"), (None, true));
    }

    #[test]
    fn address_literals_and_missing_or_empty_hosts_name_nothing() {
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"), (None, false));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]\r\n\r\n"), (None, false));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: 192.0.2.1:8080\r\n\r\n"), (None, false));
        assert_eq!(host(b"GET / HTTP/1.0\r\n\r\n"), (None, false));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: \r\n\r\n"), (None, false));
    }

    #[test]
    fn a_header_section_httparse_refuses_is_an_ambiguous_request_once_it_ends() {
        let folded = b"GET /a HTTP/1.1\r\nHost: a.example\r\n b.example\r\n\r\n";
        let head = found(folded);
        assert_eq!((head.method.as_str(), head.target.as_str(), head.host, head.ambiguous), ("GET", "/a", None, true));
        assert_eq!(request_head(&folded[..folded.len() - 2]), Sniff::NeedMore);
        assert_eq!(host(b"GET / HTTP/1.1\r\nHo st: a.example\n\n"), (None, true));
    }

    #[test]
    fn a_request_line_httparse_refuses_but_lenient_servers_take_is_ambiguous() {
        for line in [
            &b"GET / HTTP/1.1 \r\n"[..],
            b"GET\t/ HTTP/1.1\r\n",
            b"GET /\xfc HTTP/1.1\r\n",
            b"GET /a\x01b\tHTTP/1.0\t\r\r\n",
        ] {
            let mut head = line.to_vec();
            head.extend_from_slice(b"Host: blocked.example\r\n\r\n");
            assert_eq!(request_head(&head[..head.len() - 1]), Sniff::NeedMore, "{line:?}");
            let found = found(&head);
            assert_eq!((found.method.as_str(), found.host, found.ambiguous), ("GET", None, true), "{line:?}");
        }
        assert_eq!(found(b"GET /\xfc HTTP/1.1\r\n\r\n").target, "/\u{fffd}");
        assert_eq!(request_head(b"GET  HTTP/1.1\r\n\r\n"), Sniff::NotThis, "no target");
    }

    #[test]
    fn many_header_fields_are_read_to_the_last() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(STACK_HEADERS * 3) {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"Host: last.example\r\n\r\n");
        assert_eq!(host(&head), (Some("last.example".into()), false));
    }

    #[test]
    fn a_head_longer_than_max_head_is_not_this() {
        let mut head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: ".to_vec();
        let pad = MAX_HEAD - head.len() - 4;
        head.extend(std::iter::repeat_n(b'p', pad));
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head.len(), MAX_HEAD);
        assert_eq!(host(&head), (Some("a.example".into()), false), "a head of exactly MAX_HEAD");
        let cut = &head[..MAX_HEAD - 1];
        assert_eq!(request_head(cut), Sniff::NeedMore);

        let mut longer = head[..MAX_HEAD - 4].to_vec();
        longer.extend_from_slice(b"pp\r\n\r\n");
        assert_eq!(request_head(&longer[..MAX_HEAD]), Sniff::NeedMore);
        assert_eq!(request_head(&longer), Sniff::NotThis);
        assert_eq!(request_head(&vec![b'\n'; MAX_HEAD + 1]), Sniff::NotThis);
    }
}
