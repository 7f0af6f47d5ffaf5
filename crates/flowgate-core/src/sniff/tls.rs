//! The TLS ClientHello sniffer: the server name (SNI), ALPN protocols and Encrypted Client Hello
//! flag a TLS client states in the clear in its first handshake message.
//!
//! This room reads the bytes a client sent (the TCP stream from offset 0, or QUIC's CRYPTO
//! stream) and touches nothing else. Two entry points:
//! - [`client_hello`] walks the record layer (RFC 8446 5.1) and joins the handshake message
//!   across records, since a client may fragment its hello over several records;
//! - [`client_hello_message`] reads handshake-layer bytes, as QUIC carries them (RFC 9001 4.1).
//!
//! The record walk and the 4-byte handshake header are read here, because that is where the
//! answers `NeedMore`, `NotThis` and the size bound are decided, byte by byte. The message body
//! is parsed by `tls-parser` (`parse_tls_handshake_client_hello`), and each extension by its
//! `parse_tls_client_hello_extension`, called on that one extension's bytes: this room walks the
//! extension headers (type, length) itself so that an extension tls-parser finds malformed
//! costs only that extension. Handed the whole list, tls-parser stops at the first extension
//! whose content it rejects and drops the rest (`many0`), and real clients order extensions
//! at random (Chrome), so one odd extension would otherwise hide the server name.
//!
//! What is reported:
//! - `sni`: the first `host_name` entry of the first `server_name` extension, normalized by
//!   [`super::host_name`]. A server_name extension tls-parser cannot read (a list length past
//!   its end, a truncated entry) gives `sni: None`; the rest of the hello is still read and the
//!   answer is `Found` (a server would refuse such a hello, so nothing is lost by not guessing).
//! - `alpn`: the names of the first ALPN extension, in order; empty names and names that are not
//!   printable ASCII are left out, and at most 16 are kept (clients offer one to four).
//! - `ech`: an `encrypted_client_hello` extension (0xfe0d) is present. Browsers without an ECH
//!   configuration for the server send a GREASE one that looks the same on the wire (by design of
//!   the ECH draft), so `ech` means "the server name may be only the outer one", not that it is.
//!
//! Not this protocol (`NotThis`, as early as the bytes allow): a first byte other than 22
//! (handshake), a record version whose major byte is not 3 or whose minor byte is above 4 (after
//! 2 or 3 bytes: HTTP, SSH banners and most other protocols go here on their first byte), a
//! record longer than 2^14 bytes, a record of another type before the hello is complete (RFC 8446
//! forbids interleaving), a first handshake message that is not a ClientHello (after 6 bytes), a
//! hello that cannot end within [`MAX_CLIENT_HELLO`] bytes, a hello body tls-parser rejects (a
//! session ID over 32 bytes, cipher suites or compression methods cut short), or a
//! `legacy_version` whose major byte is not 3. An extension block whose length runs past the
//! message is read as no extensions (`Found` with nothing in it: tls-parser's reading).
//! SSLv2-compatible hellos (first byte 0x80) are not read: no client made this century sends one
//! and they carry no server name.

use tls_parser::{TlsExtension, parse_tls_client_hello_extension, parse_tls_handshake_client_hello};

use super::{ClientHello, Sniff, host_name};

/// Most bytes [`client_hello`] will ask for before giving up (`NotThis`): the ClientHello must
/// end within the first 16 KiB of the stream, record headers included.
///
/// Why 16 KiB: real hellos are 200 to 600 bytes, about 1.8 KB with a post-quantum key share
/// (X25519MLKEM768, 1,216 bytes) and up to about 3 KB with a resumption ticket; 2^14 is the
/// most one record may carry (RFC 8446 5.1), so 16 KiB is one full record, five times the largest
/// hello seen in the wild, and enough for a 1.8 KB hello cut into one-byte records (6 bytes of
/// stream each: 10.8 KB). A hello that needs more is no browser's and not worth holding a flow
/// for; callers size their peek buffers by this figure.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Longest handshake message (header included) either entry point accepts: what fits in
/// [`MAX_CLIENT_HELLO`] bytes of stream after one record header. QUIC's CRYPTO reassembly keeps
/// no more than this.
pub(crate) const MAX_HELLO_MESSAGE: usize = MAX_CLIENT_HELLO - RECORD_HEADER;

/// ALPN names kept (clients offer one to four).
const MAX_ALPN: usize = 16;

const RECORD_HEADER: usize = 5;
const HANDSHAKE_HEADER: usize = 4;
const CONTENT_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const MAX_RECORD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;

/// The ClientHello at the start of a TLS client's byte stream (the record layer, from stream
/// offset 0). Call again with a longer prefix of the same stream after `NeedMore`: the answer
/// depends only on the bytes up to the end of the hello, so every prefix that holds the hello
/// gives the same `Found`, and once an answer is `NotThis` it stays so for longer prefixes.
pub fn client_hello(stream: &[u8]) -> Sniff<ClientHello> {
    // Nothing past the bound is looked at: a prefix that long without a hello is the answer.
    let view = stream.get(..MAX_CLIENT_HELLO).unwrap_or(stream);
    let mut message = Joined::Empty;
    let mut at = 0;
    loop {
        let rest = view.get(at..).unwrap_or_default();
        if let Some(&content_type) = rest.first()
            && content_type != CONTENT_HANDSHAKE
        {
            return Sniff::NotThis;
        }
        if let Some(&major) = rest.get(1)
            && major != 3
        {
            return Sniff::NotThis;
        }
        if let Some(&minor) = rest.get(2)
            && minor > 4
        {
            return Sniff::NotThis;
        }
        let Some(&[hi, lo]) = rest.get(3..RECORD_HEADER) else {
            return incomplete(stream);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len > MAX_RECORD {
            return Sniff::NotThis;
        }
        let fragment = rest.get(RECORD_HEADER..).unwrap_or_default();
        let fragment = fragment.get(..len).unwrap_or(fragment);
        message.push(fragment);
        match message_length(message.bytes()) {
            Err(()) => return Sniff::NotThis,
            Ok(Some(total)) => {
                if let Some(whole) = message.bytes().get(..total) {
                    return parse_message(whole);
                }
            }
            Ok(None) => {}
        }
        if fragment.len() < len {
            return incomplete(stream);
        }
        at += RECORD_HEADER + len;
    }
}

/// The ClientHello in handshake-layer bytes (a handshake message header: type 1, u24 length; as
/// QUIC's CRYPTO stream carries it). Bytes after the message are ignored.
pub fn client_hello_message(handshake: &[u8]) -> Sniff<ClientHello> {
    match message_length(handshake) {
        Err(()) => Sniff::NotThis,
        Ok(None) => Sniff::NeedMore,
        Ok(Some(total)) => match handshake.get(..total) {
            Some(whole) => parse_message(whole),
            None => Sniff::NeedMore,
        },
    }
}

/// A stream that ended before the hello did: worth more bytes unless the bound is reached.
fn incomplete(stream: &[u8]) -> Sniff<ClientHello> {
    if stream.len() >= MAX_CLIENT_HELLO { Sniff::NotThis } else { Sniff::NeedMore }
}

/// The whole handshake message's length (header included) once its header is there; `Err` when
/// what is there already rules out a ClientHello within the bound.
fn message_length(handshake: &[u8]) -> Result<Option<usize>, ()> {
    if let Some(&kind) = handshake.first()
        && kind != CLIENT_HELLO
    {
        return Err(());
    }
    let Some(&[_, a, b, c]) = handshake.get(..HANDSHAKE_HEADER) else {
        return Ok(None);
    };
    let total = HANDSHAKE_HEADER + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
    if total > MAX_HELLO_MESSAGE {
        return Err(());
    }
    Ok(Some(total))
}

/// A whole ClientHello message (header included) read into what it says.
fn parse_message(message: &[u8]) -> Sniff<ClientHello> {
    let body = message.get(HANDSHAKE_HEADER..).unwrap_or_default();
    let Ok((_, hello)) = parse_tls_handshake_client_hello(body) else {
        return Sniff::NotThis;
    };
    if hello.version.0 >> 8 != 3 {
        return Sniff::NotThis;
    }
    let mut found = ClientHello::default();
    let (mut seen_sni, mut seen_alpn) = (false, false);
    let mut extensions = hello.ext.unwrap_or_default();
    while let Some(&[t0, t1, l0, l1]) = extensions.get(..4) {
        let kind = u16::from_be_bytes([t0, t1]);
        let end = 4 + usize::from(u16::from_be_bytes([l0, l1]));
        let (Some(one), Some(after)) = (extensions.get(..end), extensions.get(end..)) else {
            // The last extension runs past the list: nothing after it can be delimited.
            break;
        };
        extensions = after;
        match kind {
            EXT_SERVER_NAME if !seen_sni => {
                seen_sni = true;
                if let Ok((_, TlsExtension::SNI(names))) = parse_tls_client_hello_extension(one) {
                    found.sni = names.iter().find(|(t, _)| t.0 == 0).and_then(|(_, name)| host_name(name));
                }
            }
            EXT_ALPN if !seen_alpn => {
                seen_alpn = true;
                if let Ok((_, TlsExtension::ALPN(names))) = parse_tls_client_hello_extension(one) {
                    found.alpn = names
                        .iter()
                        .filter(|n| !n.is_empty() && n.iter().all(u8::is_ascii_graphic))
                        .take(MAX_ALPN)
                        .map(|n| n.iter().map(|&b| char::from(b)).collect())
                        .collect();
                }
            }
            EXT_ECH => {
                found.ech |= matches!(
                    parse_tls_client_hello_extension(one),
                    Ok((_, TlsExtension::Unknown(t, _))) if t.0 == EXT_ECH
                );
            }
            _ => {}
        }
    }
    Sniff::Found(found)
}

/// The handshake bytes of the records read so far: borrowed while they come from one record
/// (the common case, no copy), copied once a second record adds to them.
enum Joined<'a> {
    Empty,
    One(&'a [u8]),
    Many(Vec<u8>),
}

impl<'a> Joined<'a> {
    fn push(&mut self, fragment: &'a [u8]) {
        match self {
            Joined::Empty => *self = Joined::One(fragment),
            Joined::One(first) => {
                if !fragment.is_empty() {
                    *self = Joined::Many([*first, fragment].concat());
                }
            }
            Joined::Many(joined) => joined.extend_from_slice(fragment),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Joined::Empty => &[],
            Joined::One(first) => first,
            Joined::Many(joined) => joined,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One extension: type, u16 length, data.
    pub(crate) fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_be_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    pub(crate) fn sni_ext(name: &str) -> Vec<u8> {
        let entry = [&[0u8][..], &(name.len() as u16).to_be_bytes(), name.as_bytes()].concat();
        ext(0, &[&(entry.len() as u16).to_be_bytes()[..], &entry].concat())
    }

    pub(crate) fn alpn_ext(names: &[&str]) -> Vec<u8> {
        let list: Vec<u8> = names.iter().flat_map(|n| [&[n.len() as u8][..], n.as_bytes()].concat()).collect();
        ext(16, &[&(list.len() as u16).to_be_bytes()[..], &list].concat())
    }

    /// A key_share extension with an X25519MLKEM768 share (group 0x11ec, 1,216 bytes) and an
    /// X25519 one, as Chrome 131 and later send.
    pub(crate) fn pq_key_share() -> Vec<u8> {
        let mut shares = Vec::new();
        for (group, len) in [(0x11ecu16, 1216usize), (0x001d, 32)] {
            shares.extend_from_slice(&group.to_be_bytes());
            shares.extend_from_slice(&(len as u16).to_be_bytes());
            shares.extend((0..len).map(|i| (i * 7 + 3) as u8));
        }
        ext(51, &[&(shares.len() as u16).to_be_bytes()[..], &shares].concat())
    }

    /// A ClientHello handshake message (header included) with these extensions, laid out as a
    /// TLS 1.3 client sends it.
    pub(crate) fn hello(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend((0..32u8).map(|i| i.wrapping_mul(37)));
        body.push(32);
        body.extend((0..32u8).map(|i| i ^ 0x5a));
        let suites = [0x1301u16, 0x1302, 0x1303, 0xc02b, 0xc02f];
        body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
        suites.iter().for_each(|s| body.extend_from_slice(&s.to_be_bytes()));
        body.extend_from_slice(&[1, 0]);
        let exts = extensions.concat();
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// Extensions as Chrome 131 and later send them: the usual ones, an X25519MLKEM768 key
    /// share, ALPS, certificate compression and a GREASE ECH extension (so `ech` is set): about
    /// 1.8 KB of hello.
    pub(crate) fn chrome_pq(sni: Option<&str>, alpn: &[&str]) -> Vec<Vec<u8>> {
        let mut exts = typical(sni, alpn);
        exts.insert(2, pq_key_share());
        exts.push(ext(0x1b, &[2, 0, 2]));
        exts.push(ext(0x44cd, &[0, 3, 2, b'h', b'2']));
        exts.push(ext(5, &[1, 0, 0, 0, 0]));
        exts.push(ext(18, &[]));
        exts.push(ext(35, &[]));
        let mut ech = vec![0, 0, 1, 0, 1, 0x9c, 0, 32];
        ech.extend((0..32u8).map(|i| i.wrapping_mul(11)));
        ech.extend_from_slice(&[0, 240]);
        ech.extend((0..240u32).map(|i| (i * 13) as u8));
        exts.push(ext(0xfe0d, &ech));
        exts.push(ext(0x2a2a, &[0]));
        exts
    }

    /// The usual extensions around a server name and ALPN list.
    pub(crate) fn typical(sni: Option<&str>, alpn: &[&str]) -> Vec<Vec<u8>> {
        let mut exts = vec![ext(0x0a0a, &[]), ext(0xff01, &[0]), ext(23, &[]), ext(10, &[0, 4, 0x11, 0xec, 0, 0x1d])];
        if let Some(name) = sni {
            exts.push(sni_ext(name));
        }
        if !alpn.is_empty() {
            exts.push(alpn_ext(alpn));
        }
        exts.extend([ext(43, &[4, 3, 4, 3, 3]), ext(13, &[0, 4, 4, 3, 8, 4]), ext(45, &[1, 1])]);
        exts
    }

    /// The message cut into handshake records of these sizes (the last size repeats).
    pub(crate) fn records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i.min(sizes.len() - 1)].min(rest.len());
            i += 1;
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        out
    }

    fn found(sni: Option<&str>, alpn: &[&str], ech: bool) -> Sniff<ClientHello> {
        Sniff::Found(ClientHello {
            sni: sni.map(str::to_owned),
            alpn: alpn.iter().map(|s| s.to_string()).collect(),
            ech,
        })
    }

    /// Every prefix shorter than `end` asks for more; every longer one gives `want`.
    fn check_prefixes(stream: &[u8], end: usize, want: &Sniff<ClientHello>) {
        for n in 0..=stream.len() {
            let got = client_hello(&stream[..n]);
            if n < end {
                assert_eq!(got, Sniff::NeedMore, "prefix of {n} of {} bytes (hello ends at {end})", stream.len());
            } else {
                assert_eq!(&got, want, "prefix of {n} of {} bytes", stream.len());
            }
        }
    }

    #[test]
    fn a_hello_in_one_record_is_found_exactly_when_its_last_byte_arrives() {
        let msg = hello(&typical(Some("WWW.Example.com."), &["h2", "http/1.1"]));
        let stream = [records(&msg, &[usize::MAX]), b"\x17\x03\x03\x00\x05after".to_vec()].concat();
        check_prefixes(&stream, 5 + msg.len(), &found(Some("www.example.com"), &["h2", "http/1.1"], false));
    }

    #[test]
    fn a_hello_fragmented_over_records_of_any_size_is_joined() {
        let msg = hello(&typical(Some("split.example"), &["h2"]));
        let want = found(Some("split.example"), &["h2"], false);
        for sizes in [&[1][..], &[2], &[3], &[4], &[5, 1], &[100], &[1, 2, 3, 500], &[msg.len() - 1]] {
            let stream = records(&msg, sizes);
            assert_eq!(client_hello(&stream), want, "records of {sizes:?}");
            assert_eq!(client_hello_message(&msg), want);
        }
        // Every prefix of a hello in records of 7 bytes, and of one in 1-byte records.
        for size in [7, 1] {
            let stream = records(&msg, &[size]);
            check_prefixes(&stream, stream.len(), &want);
        }
    }

    #[test]
    fn a_post_quantum_hello_larger_than_a_segment_is_read_across_it() {
        let msg = hello(&chrome_pq(Some("pq.example"), &["h2", "http/1.1"]));
        assert!((1700..2000).contains(&msg.len()), "a hello of {} bytes", msg.len());
        let stream = records(&msg, &[usize::MAX]);
        let want = found(Some("pq.example"), &["h2", "http/1.1"], true);
        // As TCP delivers it: one full segment, then the rest.
        assert_eq!(client_hello(&stream[..1460]), Sniff::NeedMore);
        assert_eq!(client_hello(&stream), want);
        check_prefixes(&stream, stream.len(), &want);
        assert_eq!(client_hello_message(&msg), want);
    }

    #[test]
    fn absent_server_name_and_alpn_and_an_ech_extension() {
        assert_eq!(client_hello(&records(&hello(&typical(None, &["h2"])), &[9000])), found(None, &["h2"], false));
        assert_eq!(
            client_hello(&records(&hello(&typical(Some("a.example"), &[])), &[40])),
            found(Some("a.example"), &[], false)
        );
        assert_eq!(client_hello(&records(&hello(&typical(None, &[])), &[40])), found(None, &[], false));
        assert_eq!(client_hello(&records(&hello(&[]), &[40])), found(None, &[], false), "no extensions at all");
        let mut exts = typical(Some("public.example"), &["h2"]);
        exts.push(ext(0xfe0d, &[0, 0, 1, 0, 1, 0x42, 0, 32, 1, 2, 3]));
        assert_eq!(client_hello(&records(&hello(&exts), &[200])), found(Some("public.example"), &["h2"], true));
    }

    #[test]
    fn a_malformed_server_name_gives_no_name_and_the_rest_of_the_hello() {
        // The list length claims more than the extension holds.
        let bad_list = ext(0, &[0, 40, 0, 0, 3, b'a', b'.', b'b']);
        // An entry whose name length runs past the list.
        let bad_entry = ext(0, &[0, 6, 0, 0, 9, b'a', b'.', b'b']);
        // A name flowgate cannot use.
        let bad_name = sni_ext("exa mple.com");
        for sni in [bad_list, bad_entry, bad_name] {
            let exts = [sni, alpn_ext(&["h2"]), ext(0xfe0d, &[0])];
            assert_eq!(client_hello(&records(&hello(&exts), &[512])), found(None, &["h2"], true));
        }
        // An entry of another name type before the host name.
        let other_first = ext(0, &[0, 10, 7, 0, 1, b'x', 0, 0, 3, b'a', b'.', b'b']);
        assert_eq!(client_hello_message(&hello(&[other_first])), found(Some("a.b"), &[], false));
    }

    #[test]
    fn an_extension_tls_parser_rejects_does_not_hide_the_ones_after_it() {
        // post_handshake_auth must be empty and heartbeat one byte: tls-parser refuses these.
        let exts = [ext(49, &[1, 2]), ext(15, &[1, 2, 3]), sni_ext("after.example"), alpn_ext(&["h3"])];
        assert_eq!(client_hello_message(&hello(&exts)), found(Some("after.example"), &["h3"], false));
    }

    #[test]
    fn alpn_names_that_are_not_printable_are_left_out() {
        let exts = [alpn_ext(&["h2", "", "sp ace", "\u{7f}", "http/1.1"])];
        assert_eq!(client_hello_message(&hello(&exts)), found(None, &["h2", "http/1.1"], false));
        let many: Vec<String> = (0..40).map(|i| format!("p{i}")).collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        let Sniff::Found(got) = client_hello_message(&hello(&[alpn_ext(&names)])) else { panic!("not found") };
        assert_eq!(got.alpn, names[..MAX_ALPN]);
    }

    #[test]
    fn other_protocols_are_refused_on_their_first_bytes() {
        for (bytes, at) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], 1),
            (b"SSH-2.0-OpenSSH_9.2\r\n", 1),
            (b"\x00\x00\x00\x00", 1),
            (b"\x80\x2e\x01\x03\x01", 1), // SSLv2-compatible hello
            (b"\x16\x02\x01\x00\x40", 2),
            (b"\x16\x03\x09\x00\x40", 3),
            (b"\x16\x03\x01\x40\x01", 5),                 // a record over 2^14
            (b"\x16\x03\x01\x00\x40\x02\x00\x00\x3c", 6), // a ServerHello
            (b"\x16\x03\x01\x00\x40\x0b", 6),
        ] {
            for n in 0..at {
                assert_eq!(client_hello(&bytes[..n]), Sniff::NeedMore, "{bytes:?} at {n}");
            }
            assert_eq!(client_hello(&bytes[..at]), Sniff::NotThis, "{bytes:?} at {at}");
            assert_eq!(client_hello(bytes), Sniff::NotThis, "{bytes:?}");
        }
        assert_eq!(client_hello_message(b"\x02\x00\x00\x10"), Sniff::NotThis);
        assert_eq!(client_hello_message(b""), Sniff::NeedMore);
        assert_eq!(client_hello_message(b"\x01\x00\x00"), Sniff::NeedMore);
    }

    #[test]
    fn a_record_of_another_type_inside_the_hello_is_refused() {
        let msg = hello(&typical(Some("a.example"), &[]));
        let stream = records(&msg, &[50]);
        let mut broken = stream[..55].to_vec();
        broken.extend_from_slice(b"\x15\x03\x03\x00\x02\x02\x28");
        broken.extend_from_slice(&stream[55..]);
        assert_eq!(client_hello(&broken), Sniff::NotThis);
    }

    #[test]
    fn hellos_beyond_the_bound_are_refused() {
        // Declared beyond the bound: refused on its header, 9 bytes in.
        let len = MAX_HELLO_MESSAGE - HANDSHAKE_HEADER + 1;
        let header =
            [&[CONTENT_HANDSHAKE, 3, 1, 0x40, 0][..], &[CLIENT_HELLO], &(len as u32).to_be_bytes()[1..]].concat();
        assert_eq!(client_hello(&header[..8]), Sniff::NeedMore);
        assert_eq!(client_hello(&header), Sniff::NotThis);
        assert_eq!(client_hello_message(&header[5..]), Sniff::NotThis);
        // Within the bound as a message, but cut into records whose headers push it past.
        let msg = hello(&[ext(21, &vec![0; 4000])]);
        assert_eq!(client_hello(&records(&msg, &[4000])), found(None, &[], false));
        let stream = records(&msg, &[1]);
        assert!(stream.len() > MAX_CLIENT_HELLO);
        assert_eq!(client_hello(&stream[..MAX_CLIENT_HELLO - 1]), Sniff::NeedMore);
        assert_eq!(client_hello(&stream[..MAX_CLIENT_HELLO]), Sniff::NotThis);
        assert_eq!(client_hello(&stream), Sniff::NotThis);
        // The largest hello that fits: MAX_HELLO_MESSAGE bytes in one record make a stream of
        // exactly MAX_CLIENT_HELLO; in two records, one record header too many.
        let fill = MAX_HELLO_MESSAGE - hello(&[ext(21, &[])]).len();
        let msg = hello(&[ext(21, &vec![0; fill])]);
        assert_eq!(msg.len(), MAX_HELLO_MESSAGE);
        let stream = records(&msg, &[MAX_RECORD]);
        assert_eq!(stream.len(), MAX_CLIENT_HELLO);
        assert_eq!(client_hello(&stream), found(None, &[], false));
        assert_eq!(client_hello_message(&msg), found(None, &[], false));
        assert_eq!(client_hello(&records(&msg, &[8000])), Sniff::NotThis);
    }

    #[test]
    fn a_hello_body_tls_parser_rejects_is_not_this() {
        let mut msg = hello(&typical(Some("a.example"), &[]));
        msg[4 + 2 + 32] = 33; // a session id over 32 bytes
        assert_eq!(client_hello_message(&msg), Sniff::NotThis);
        assert_eq!(client_hello_message(b"\x01\x00\x00\x02\x03\x03"), Sniff::NotThis);
    }

    #[test]
    fn the_openssl_client_hello_is_read() {
        let stream = include_bytes!("testdata/openssl-s_client-hello.bin");
        let want = found(Some("x.example"), &["h2", "http/1.1"], false);
        check_prefixes(stream, stream.len(), &want);
    }

    /// Any single-byte change to a hello, and any cut, gives an answer without panicking, and
    /// answers stay consistent as the prefix grows.
    #[test]
    fn damaged_hellos_never_panic_and_answers_only_settle() {
        let mut exts = typical(Some("fuzz.example"), &["h2"]);
        exts.push(ext(0xfe0d, &[0; 8]));
        let stream = records(&hello(&exts), &[60]);
        for i in 0..stream.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = stream.clone();
                bad[i] ^= flip;
                let whole = client_hello(&bad);
                let mut settled = false;
                for n in (0..=bad.len()).step_by(7).chain([bad.len()]) {
                    let got = client_hello(&bad[..n]);
                    if settled {
                        assert_eq!(got, whole, "byte {i} ^ {flip:#x}, prefix {n}");
                    }
                    settled |= got != Sniff::NeedMore;
                }
                let _ = client_hello_message(&bad[5..]);
            }
        }
    }

    /// Writes the seeds of the `tls` fuzz target (fuzz/corpus/tls/): hellos built here, cut into
    /// records in several ways, the openssl capture, and other protocols' first bytes.
    /// `cargo test -p flowgate-core --lib sniff::tls::tests::write_fuzz_seeds -- --ignored`
    #[test]
    #[ignore = "writes files into fuzz/corpus"]
    fn write_fuzz_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/tls");
        std::fs::create_dir_all(dir).unwrap();
        let pq = hello(&chrome_pq(Some("pq.example"), &["h2", "http/1.1"]));
        let mut malformed_sni = typical(None, &["h2"]);
        malformed_sni.push(ext(0, &[0, 40, 0, 0, 3, b'a', b'.', b'b']));
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            ("openssl-s_client-hello", include_bytes!("testdata/openssl-s_client-hello.bin").to_vec()),
            ("chrome-pq-one-record", records(&pq, &[usize::MAX])),
            ("chrome-pq-records-of-100", records(&pq, &[100])),
            ("chrome-pq-records-of-1-then-7", records(&pq[..200], &[1, 1, 1, 1, 7])),
            ("chrome-pq-message", pq.clone()),
            ("no-sni-no-alpn", records(&hello(&typical(None, &[])), &[usize::MAX])),
            ("malformed-sni", records(&hello(&malformed_sni), &[usize::MAX])),
            ("rfc9001-hello-message", hello(&[sni_ext("example.com"), alpn_ext(&["alpn"])])),
            ("declared-beyond-bound", vec![22, 3, 1, 0x40, 0, 1, 0, 0x40, 0]),
            ("http-request", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec()),
            ("ssh-banner", b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n".to_vec()),
        ];
        for (name, bytes) in seeds {
            std::fs::write(format!("{dir}/{name}"), bytes).unwrap();
        }
    }

    /// µs per `client_hello` on a 1.8 KB post-quantum hello. Run with
    /// `cargo test --release -p flowgate-core --lib sniff::tls::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn timing() {
        let msg = hello(&chrome_pq(Some("pq.example"), &["h2", "http/1.1"]));
        let one = records(&msg, &[usize::MAX]);
        let split = records(&msg, &[1000]);
        for (what, stream) in [("one record", &one), ("two records", &split)] {
            let rounds = 200_000;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                assert!(matches!(client_hello(std::hint::black_box(stream)), Sniff::Found(_)));
            }
            let per = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
            println!("client_hello, {} byte hello in {what}: {per:.3} us", stream.len());
        }
    }
}
