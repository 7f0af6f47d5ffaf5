//! Protocol sniffers: what the first bytes of a flow say about where it is going.
//!
//! Each sniffer looks at the bytes one direction of a flow has sent so far (from its first
//! byte) and answers [`Sniff::NeedMore`] (a prefix of something it knows: show more),
//! [`Sniff::Found`] (here is what it says) or [`Sniff::NotThis`] (these bytes are not that
//! protocol, or not a part of it that names a host). Sniffers are pure functions of their input,
//! never panic and never allocate more than a bounded amount, whatever the input: they parse what
//! anyone on the network can send. The engine calls them on held bytes to learn a flow's host
//! name; a product's own provider may call them too.
//!
//! - [`tls`]: the TLS ClientHello (server name, ALPN, Encrypted Client Hello), over records.
//! - [`quic`]: the QUIC Initial packets (v1, v2) of a connection, decrypted, and the ClientHello
//!   in their CRYPTO frames.
//! - [`http`]: an HTTP/1.x request head (method, target, Host).
//! - [`dns`]: DNS messages over UDP or TCP, and the addresses an answer gives a name, CNAME
//!   chains followed back to the name that was asked.
//!
//! This room reads bytes and returns findings; it keeps no state between calls except inside a
//! sniffer value the caller owns (the QUIC one, which decrypts datagram by datagram).

pub mod dns;
pub mod http;
pub mod quic;
pub mod tls;

/// What a sniffer makes of the bytes it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sniff<T> {
    /// So far these bytes may be the start of this protocol: give more.
    NeedMore,
    /// Found.
    Found(T),
    /// Not this protocol (or it will never name what is sought): stop asking this sniffer.
    NotThis,
}

impl<T> Sniff<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Sniff<U> {
        match self {
            Sniff::NeedMore => Sniff::NeedMore,
            Sniff::Found(t) => Sniff::Found(f(t)),
            Sniff::NotThis => Sniff::NotThis,
        }
    }
}

/// What a TLS ClientHello (over TCP, or in QUIC's CRYPTO frames) says about where the client is
/// going.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` extension's host name, normalized by [`host_name`]; `None` when absent
    /// or not a usable name.
    pub sni: Option<String>,
    /// The ALPN protocol names offered, in the client's order (`h2`, `http/1.1`, `h3`, ...);
    /// names that are not printable ASCII are left out.
    pub alpn: Vec<String>,
    /// The ClientHello carries an `encrypted_client_hello` extension (type 0xfe0d): the real
    /// server name is encrypted and `sni` is only the outer, public name. Browsers that have no
    /// ECH configuration for the server send a GREASE extension that looks the same on the wire
    /// (Chrome does on every connection), so `sni` may also be the real name.
    pub ech: bool,
}

/// Longest host name kept (DNS: 253 characters).
pub const MAX_HOST_NAME: usize = 253;

/// A host name as flowgate compares them: ASCII lowercase, without a trailing dot. `None` for a
/// name that cannot be a host name: empty, longer than [`MAX_HOST_NAME`], an empty label, or
/// with a byte other than ASCII letters, digits, `-`, `_` and `.` (internationalized names travel
/// as `xn--` labels).
pub fn host_name(raw: &[u8]) -> Option<String> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty() || raw.len() > MAX_HOST_NAME {
        return None;
    }
    if raw.split(|&b| b == b'.').any(|label| label.is_empty() || label.len() > 63) {
        return None;
    }
    if !raw.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') {
        return None;
    }
    Some(raw.iter().map(|b| b.to_ascii_lowercase() as char).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_lowercased_and_lose_their_trailing_dot() {
        assert_eq!(host_name(b"WWW.Example.COM.").as_deref(), Some("www.example.com"));
        assert_eq!(host_name(b"xn--bcher-kva.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(host_name(b"_dmarc.example").as_deref(), Some("_dmarc.example"));
        for bad in [&b""[..], b".", b"a..b", b"exa mple.com", b"ex\0ample", "bücher.example".as_bytes(), b"*.example"]
        {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
        assert_eq!(host_name(&[b'a'; 64]), None, "a label of 64");
        let long =
            [&b"a".repeat(63)[..], b".", &b"b".repeat(63), b".", &b"c".repeat(63), b".", &b"d".repeat(62)].concat();
        assert_eq!(long.len(), 254);
        assert_eq!(host_name(&long), None);
        assert!(host_name(&long[1..]).is_some());
    }
}
