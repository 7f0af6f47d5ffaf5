//! The QUIC Initial sniffer: the ClientHello a QUIC client (v1, RFC 9000; v2, RFC 9369) sends
//! in the CRYPTO frames of its Initial packets, decrypted.
//!
//! This room reads the UDP payloads a client sent to a server, one datagram at a time, and
//! touches nothing else; [`InitialSniffer`] is the state one connection needs (keys, the CRYPTO
//! bytes so far). Initial packets are encrypted with keys anyone can derive from the client's
//! Destination Connection ID (RFC 9001 5.2), so the sniffer does what the server does with them:
//! - parse the long header (variable-length integers, RFC 9000 16; packet types by version:
//!   Initial is 0b00 in v1 and 0b01 in v2) and step over the other packets coalesced in a
//!   datagram (0-RTT, Handshake); a short-header packet ends the datagram (it has no length);
//! - derive the client's Initial key, IV and header-protection key with HKDF-SHA256 from the
//!   version's salt and the DCID (labels `quic key`/`quic iv`/`quic hp`, `quicv2 ...` in v2);
//! - remove header protection (AES-128-ECB of a 16-byte sample, RFC 9001 5.4), rebuild the packet
//!   number from its truncated form (RFC 9000 A.3) and open the payload (AES-128-GCM);
//! - read the frames an Initial may carry (PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE) and put
//!   CRYPTO data in place by offset, in any order, overlapping or repeated (the first copy of a
//!   byte wins), until the handshake bytes from offset 0 hold a whole ClientHello, which
//!   [`super::tls::client_hello_message`] reads.
//!
//! The QUIC framing is written here because no QUIC crate offers it without a connection state
//! machine (quinn-proto, quiche, s2n-quic parse and decrypt packets only as a server endpoint
//! with its own sockets, keys and allocation); the cryptography is RustCrypto's (`hkdf`, `sha2`,
//! `aes`, `aes-gcm`: pure Rust, no C).
//!
//! Bounds: CRYPTO bytes are kept only below offset 16,379 (the longest hello
//! [`super::tls::client_hello`] accepts over TCP, 16 KiB less one record header), so a sniffer
//! holds at most about 18 KiB (the bytes and a bitmap of which arrived) plus one datagram of
//! scratch space; at most 16 packets of a datagram are looked at; after 16 datagrams in a row that
//! bring no new CRYPTO byte (a client resends its Initials on loss, and may send up to its initial
//! congestion window of 0-RTT datagrams, 10 per RFC 9002 7.2, before a lost one is resent) the
//! answer is `NotThis`. So is a first datagram that [`is_initial`] refuses, or one in which no
//! packet decrypts (later Initials of the same connection could not be opened either: their keys
//! come from the first one's DCID).
//!
//! Keys: the client's first Initial DCID gives the keys for all its Initials, even once it
//! addresses the server by another connection ID; after a Retry it derives new ones from the
//! Retry's connection ID. The sniffer tries the keys that last opened a packet first, then keys
//! from the packet's own DCID. The CRYPTO bytes are not reset when keys change (a client resends
//! the same ClientHello after a Retry); a client that starts over with a different hello after
//! Version Negotiation is read from the bytes first received.

use aes::Aes128;
use aes::cipher::array::Array;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::{AeadInOut, Aes128Gcm};
use hkdf::Hkdf;
use sha2::Sha256;

use super::tls::{self, MAX_HELLO_MESSAGE};
use super::{ClientHello, Sniff};

const VERSION_1: u32 = 0x0000_0001;
const VERSION_2: u32 = 0x6b33_43cf;
/// RFC 9001 5.2.
const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f,
    0x0a,
];
/// RFC 9369 3.3.1.
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e,
    0xd9,
];
/// A client pads every datagram that carries an Initial to this (RFC 9000 14.1); servers drop
/// shorter ones.
const MIN_INITIAL_DATAGRAM: usize = 1200;
const MAX_CONNECTION_ID: usize = 20;
const TAG: usize = 16;
const SAMPLE: usize = 16;
/// Datagrams in a row without a new CRYPTO byte before giving up.
const NO_PROGRESS_LIMIT: u32 = 16;
/// Packets of one datagram looked at (a datagram coalesces at most one per packet type in
/// practice: Initial, 0-RTT, Handshake, 1-RTT).
const MAX_PACKETS_PER_DATAGRAM: usize = 16;

/// Cheap test: could this UDP payload be a QUIC long-header Initial packet (v1 or v2)?
/// True when the datagram is at least 1,200 bytes (RFC 9000 14.1: clients pad Initial datagrams
/// to that, servers drop shorter ones) and starts with a long header with the fixed bit set,
/// version 1 or 2, the Initial packet type, connection IDs of at most 20 bytes, and a length
/// that fits in the datagram. No decryption.
pub fn is_initial(datagram: &[u8]) -> bool {
    datagram.len() >= MIN_INITIAL_DATAGRAM
        && matches!(LongHeader::parse(datagram), Some(h) if h.kind == PacketKind::Initial)
}

/// Follows a QUIC connection's client Initial packets, datagram by datagram, until their CRYPTO
/// frames hold a whole ClientHello. Bounded memory (about 18 KiB of CRYPTO data and bitmap, plus
/// one datagram's worth of scratch space, freed once there is an answer).
#[derive(Clone, Default)]
pub struct InitialSniffer {
    /// Datagrams pushed so far.
    datagrams: u32,
    /// Datagrams in a row that brought no new CRYPTO byte.
    idle: u32,
    /// The keys that last opened a packet, and the last ones derived that did not (so that a
    /// datagram of packets with one unknown DCID costs one derivation).
    keys: Option<Box<Keys>>,
    tried: Option<Box<Keys>>,
    /// Largest packet number opened in the Initial space.
    largest_pn: Option<u64>,
    crypto: CryptoStream,
    /// A packet's copy, unprotected and decrypted in place.
    scratch: Vec<u8>,
    /// The answer, once there is one: repeated for later datagrams.
    done: Option<Sniff<ClientHello>>,
}

impl std::fmt::Debug for InitialSniffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitialSniffer")
            .field("datagrams", &self.datagrams)
            .field("idle", &self.idle)
            .field("version", &self.keys.as_ref().map(|k| k.version))
            .field("largest_pn", &self.largest_pn)
            .field("crypto_contiguous", &self.crypto.contiguous)
            .field("done", &self.done)
            .finish()
    }
}

impl InitialSniffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next client->server datagram (its UDP payload). Coalesced packets in one datagram, the
    /// ClientHello spread over several Initial packets and datagrams (post-quantum key shares make
    /// it ~1.8 KB: Chrome and Firefox send two Initial datagrams), CRYPTO frames out of order or
    /// overlapping, PADDING/PING/ACK frames: all handled. NotThis once it cannot be QUIC v1/v2
    /// Initial: a first datagram [`is_initial`] refuses or in which no packet decrypts, or 16
    /// datagrams in a row that bring no new CRYPTO byte. After `Found` or `NotThis` every later call gives the same answer.
    pub fn push(&mut self, datagram: &[u8]) -> Sniff<ClientHello> {
        if let Some(done) = &self.done {
            return done.clone();
        }
        if self.datagrams == 0 && !is_initial(datagram) {
            return self.finish(Sniff::NotThis);
        }
        self.datagrams = self.datagrams.saturating_add(1);
        let progress = self.read_datagram(datagram);
        if self.keys.is_none() {
            // Not one packet opened, from the first datagram on: not a client's first Initial, or
            // one of a connection whose first Initial (and so its keys) was never seen.
            return self.finish(Sniff::NotThis);
        }
        if progress {
            self.idle = 0;
            match tls::client_hello_message(self.crypto.contiguous_bytes()) {
                Sniff::NeedMore => Sniff::NeedMore,
                answer => self.finish(answer),
            }
        } else {
            self.idle += 1;
            if self.idle >= NO_PROGRESS_LIMIT { self.finish(Sniff::NotThis) } else { Sniff::NeedMore }
        }
    }

    fn finish(&mut self, answer: Sniff<ClientHello>) -> Sniff<ClientHello> {
        // Nothing more will be read: give the memory back.
        *self = InitialSniffer { datagrams: self.datagrams, done: Some(answer.clone()), ..InitialSniffer::default() };
        answer
    }

    /// Reads the Initial packets of one datagram; true if they brought a new CRYPTO byte.
    fn read_datagram(&mut self, datagram: &[u8]) -> bool {
        let mut progress = false;
        let mut rest = datagram;
        for _ in 0..MAX_PACKETS_PER_DATAGRAM {
            // A short header, an unknown version or a broken header: what follows cannot be
            // delimited.
            let Some(header) = LongHeader::parse(rest) else { break };
            let Some((packet, after)) = rest.split_at_checked(header.packet_len) else { break };
            if header.kind == PacketKind::Initial {
                progress |= self.read_initial(packet, &header);
            }
            rest = after;
        }
        progress
    }

    fn read_initial(&mut self, packet: &[u8], header: &LongHeader<'_>) -> bool {
        let mut opened = None;
        if let Some(keys) = &self.keys
            && keys.version == header.version
        {
            opened = open(keys, packet, header.pn_offset, self.largest_pn, &mut self.scratch);
        }
        if opened.is_none() {
            let fresh = match self.tried.take() {
                Some(keys) if keys.matches(header.version, header.dcid) => keys,
                _ => Box::new(Keys::derive(header.version, header.dcid)),
            };
            // Derived from this packet's own DCID: unless it is the one that already failed.
            let same_as_current = self.keys.as_ref().is_some_and(|k| k.matches(header.version, header.dcid));
            if !same_as_current {
                opened = open(&fresh, packet, header.pn_offset, self.largest_pn, &mut self.scratch);
            }
            if opened.is_some() {
                self.keys = Some(fresh);
            } else {
                self.tried = Some(fresh);
            }
        }
        let Some((pn, payload)) = opened else { return false };
        self.largest_pn = Some(self.largest_pn.map_or(pn, |l| l.max(pn)));
        let Some(payload) = self.scratch.get(payload) else { return false };
        read_frames(payload, &mut self.crypto)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

impl Version {
    fn from_wire(version: u32) -> Option<Version> {
        match version {
            VERSION_1 => Some(Version::V1),
            VERSION_2 => Some(Version::V2),
            _ => None,
        }
    }

    fn kind(self, first: u8) -> PacketKind {
        let bits = (first >> 4) & 0b11;
        let bits = match self {
            Version::V1 => bits,
            // RFC 9369 3.2: Initial 0b01, 0-RTT 0b10, Handshake 0b11, Retry 0b00.
            Version::V2 => bits.wrapping_sub(1) & 0b11,
        };
        match bits {
            0 => PacketKind::Initial,
            1 => PacketKind::ZeroRtt,
            2 => PacketKind::Handshake,
            _ => PacketKind::Retry,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PacketKind {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

/// What a long header says, before header protection is removed.
#[derive(Debug)]
struct LongHeader<'a> {
    version: Version,
    kind: PacketKind,
    dcid: &'a [u8],
    /// Where the (protected) packet number starts, from the packet's first byte.
    pn_offset: usize,
    /// The whole packet's length, header included.
    packet_len: usize,
}

impl<'a> LongHeader<'a> {
    fn parse(packet: &'a [u8]) -> Option<LongHeader<'a>> {
        let mut r = Reader::new(packet);
        let first = r.u8()?;
        // Long header form and the fixed bit (RFC 9000 17.2).
        if first & 0xc0 != 0xc0 {
            return None;
        }
        let version = Version::from_wire(u32::from_be_bytes(r.array()?))?;
        let dcid_len = usize::from(r.u8()?);
        if dcid_len > MAX_CONNECTION_ID {
            return None;
        }
        let dcid = r.bytes(dcid_len)?;
        let scid_len = usize::from(r.u8()?);
        if scid_len > MAX_CONNECTION_ID {
            return None;
        }
        r.bytes(scid_len)?;
        let kind = version.kind(first);
        match kind {
            // No length field: it runs to the end of the datagram; nothing of it is read.
            PacketKind::Retry => {
                return Some(LongHeader { version, kind, dcid, pn_offset: 0, packet_len: packet.len() });
            }
            PacketKind::Initial => {
                let token = usize::try_from(r.varint()?).ok()?;
                r.bytes(token)?;
            }
            PacketKind::ZeroRtt | PacketKind::Handshake => {}
        }
        let length = usize::try_from(r.varint()?).ok()?;
        let pn_offset = r.at;
        let packet_len = pn_offset.checked_add(length)?;
        // Room for the longest packet number before the sample header protection takes.
        if packet_len > packet.len() || length < 4 + SAMPLE {
            return None;
        }
        Some(LongHeader { version, kind, dcid, pn_offset, packet_len })
    }
}

/// One client Initial key set.
#[derive(Clone)]
struct Keys {
    version: Version,
    dcid: [u8; MAX_CONNECTION_ID],
    dcid_len: usize,
    aead: Aes128Gcm,
    iv: [u8; 12],
    hp: Aes128,
}

impl Keys {
    fn derive(version: Version, dcid: &[u8]) -> Keys {
        let (key, iv, hp) = secrets(version, dcid);
        let mut id = [0; MAX_CONNECTION_ID];
        let dcid_len = dcid.len().min(MAX_CONNECTION_ID);
        id[..dcid_len].copy_from_slice(&dcid[..dcid_len]);
        Keys {
            version,
            dcid: id,
            dcid_len,
            aead: Aes128Gcm::new(&Array::from(key)),
            iv,
            hp: Aes128::new(&Array::from(hp)),
        }
    }

    fn matches(&self, version: Version, dcid: &[u8]) -> bool {
        self.version == version && self.dcid.get(..self.dcid_len) == Some(dcid)
    }

    fn mask(&self, sample: [u8; SAMPLE]) -> [u8; SAMPLE] {
        let mut block = Array::from(sample);
        self.hp.encrypt_block(&mut block);
        block.into()
    }

    fn nonce(&self, pn: u64) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, p) in nonce[4..].iter_mut().zip(pn.to_be_bytes()) {
            *n ^= p;
        }
        nonce
    }
}

/// The client's Initial packet key, IV and header-protection key for this DCID (RFC 9001 5.2).
fn secrets(version: Version, dcid: &[u8]) -> ([u8; 16], [u8; 12], [u8; 16]) {
    let (salt, labels) = match version {
        Version::V1 => (&SALT_V1, ["quic key", "quic iv", "quic hp"]),
        Version::V2 => (&SALT_V2, ["quicv2 key", "quicv2 iv", "quicv2 hp"]),
    };
    let (initial_secret, _) = Hkdf::<Sha256>::extract(Some(salt), dcid);
    let mut client = [0; 32];
    expand_label(&initial_secret, "client in", &mut client);
    let (mut key, mut iv, mut hp) = ([0; 16], [0; 12], [0; 16]);
    expand_label(&client, labels[0], &mut key);
    expand_label(&client, labels[1], &mut iv);
    expand_label(&client, labels[2], &mut hp);
    (key, iv, hp)
}

/// HKDF-Expand-Label of TLS 1.3 (RFC 8446 7.1) with an empty context.
fn expand_label(secret: &[u8], label: &str, out: &mut [u8]) {
    let full = [b"tls13 ", label.as_bytes()].concat();
    let mut info = Vec::with_capacity(4 + full.len());
    info.extend_from_slice(&(out.len() as u16).to_be_bytes());
    info.push(full.len() as u8);
    info.extend_from_slice(&full);
    info.push(0);
    // Both cannot fail: a secret of 32 bytes is a valid PRK for SHA-256, and every output here
    // is far below 255 hash lengths.
    if let Ok(prk) = Hkdf::<Sha256>::from_prk(secret) {
        let _ = prk.expand(&info, out);
    }
}

/// Removes header protection from a copy of `packet` in `scratch` and decrypts its payload there.
/// Returns the packet number and where the plaintext payload lies in `scratch`.
fn open(
    keys: &Keys,
    packet: &[u8],
    pn_offset: usize,
    largest_pn: Option<u64>,
    scratch: &mut Vec<u8>,
) -> Option<(u64, std::ops::Range<usize>)> {
    let sample = packet.get(pn_offset + 4..pn_offset + 4 + SAMPLE)?;
    let mask = keys.mask(sample.try_into().ok()?);
    let first = packet.first()? ^ (mask[0] & 0x0f);
    let pn_len = usize::from(first & 0b11) + 1;
    let header_len = pn_offset + pn_len;
    if packet.len() < header_len + TAG {
        return None;
    }
    scratch.clear();
    scratch.extend_from_slice(packet);
    let (header, body) = scratch.split_at_mut(header_len);
    *header.first_mut()? = first;
    let mut truncated = 0u64;
    for (byte, m) in header.get_mut(pn_offset..)?.iter_mut().zip(&mask[1..]) {
        *byte ^= m;
        truncated = truncated << 8 | u64::from(*byte);
    }
    let pn = decode_packet_number(largest_pn, truncated, pn_len as u32 * 8);
    let (ciphertext, tag) = body.split_at_mut(body.len() - TAG);
    let tag = Array::try_from(&*tag).ok()?;
    keys.aead.decrypt_inout_detached(&Array::from(keys.nonce(pn)), header, ciphertext.into(), &tag).ok()?;
    Some((pn, header_len..packet.len() - TAG))
}

/// The full packet number closest to the next expected one (RFC 9000 A.3).
fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: u32) -> u64 {
    let expected = largest.map_or(0, |l| l.saturating_add(1));
    let window = 1u64 << bits;
    let half = window / 2;
    let candidate = (expected & !(window - 1)) | truncated;
    if candidate.saturating_add(half) <= expected && candidate < (1 << 62) - window {
        candidate + window
    } else if candidate > expected.saturating_add(half) && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// Reads the frames of an Initial packet's payload; true if a CRYPTO frame brought a new byte.
/// Stops at a frame an Initial may not carry, or at a frame cut short.
fn read_frames(payload: &[u8], crypto: &mut CryptoStream) -> bool {
    let mut r = Reader::new(payload);
    let mut progress = false;
    while let Some(kind) = r.varint() {
        let ok = match kind {
            // PADDING: a run of them is most of a padded Initial; skip it at once.
            0x00 => {
                r.skip_zeros();
                Some(())
            }
            0x01 => Some(()), // PING
            0x02 | 0x03 => skip_ack(&mut r, kind == 0x03),
            0x06 => (|| {
                let offset = r.varint()?;
                let len = usize::try_from(r.varint()?).ok()?;
                progress |= crypto.insert(offset, r.bytes(len)?);
                Some(())
            })(),
            0x1c => (|| {
                r.varint()?;
                r.varint()?;
                let len = usize::try_from(r.varint()?).ok()?;
                r.bytes(len).map(drop)
            })(),
            _ => None,
        };
        if ok.is_none() {
            break;
        }
    }
    progress
}

fn skip_ack(r: &mut Reader<'_>, ecn: bool) -> Option<()> {
    r.varint()?; // largest acknowledged
    r.varint()?; // delay
    let ranges = r.varint()?;
    r.varint()?; // first range
    // Each range takes at least two bytes, so a huge count ends with the payload.
    for _ in 0..ranges {
        r.varint()?;
        r.varint()?;
    }
    if ecn {
        for _ in 0..3 {
            r.varint()?;
        }
    }
    Some(())
}

/// The CRYPTO stream's first bytes, put together by offset.
#[derive(Clone, Default)]
struct CryptoStream {
    data: Vec<u8>,
    /// Which bytes of `data` arrived, one bit each.
    have: Vec<u64>,
    /// Bytes from offset 0 that all arrived.
    contiguous: usize,
}

impl CryptoStream {
    /// Stores what of `bytes` (at stream `offset`) lies below the bound and was not there yet;
    /// true if something was new.
    fn insert(&mut self, offset: u64, bytes: &[u8]) -> bool {
        let Ok(start) = usize::try_from(offset) else { return false };
        let end = start.saturating_add(bytes.len()).min(MAX_HELLO_MESSAGE);
        if start >= end {
            return false;
        }
        if self.data.len() < end {
            self.data.resize(end, 0);
            self.have.resize(end.div_ceil(64), 0);
        }
        let mut new = false;
        for (i, &b) in (start..end).zip(bytes) {
            if let (Some(word), Some(slot)) = (self.have.get_mut(i / 64), self.data.get_mut(i)) {
                let bit = 1u64 << (i % 64);
                if *word & bit == 0 {
                    *word |= bit;
                    *slot = b;
                    new = true;
                }
            }
        }
        while self.have.get(self.contiguous / 64).is_some_and(|w| w & (1 << (self.contiguous % 64)) != 0) {
            self.contiguous += 1;
        }
        new
    }

    fn contiguous_bytes(&self) -> &[u8] {
        self.data.get(..self.contiguous).unwrap_or_default()
    }
}

/// A bounds-checked cursor over bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn skip_zeros(&mut self) {
        let zeros = self.buf.get(self.at..).unwrap_or_default().iter().take_while(|&&b| b == 0).count();
        self.at += zeros;
    }

    /// A variable-length integer (RFC 9000 16): the first byte's two high bits give its length.
    fn varint(&mut self) -> Option<u64> {
        let first = *self.buf.get(self.at)?;
        let len = 1usize << (first >> 6);
        let bytes = self.bytes(len)?;
        Some(bytes.iter().skip(1).fold(u64::from(first & 0x3f), |v, &b| v << 8 | u64::from(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sniff::tls::tests::{chrome_pq, ext, hello};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    /// RFC 9001 A.1 and RFC 9369 A.1: the client's first Destination Connection ID.
    const RFC_DCID: &str = "8394c8f03e515708";

    /// RFC 9001 A.2 (and RFC 9369 A.2): the CRYPTO frame of the client Initial, a 241-byte
    /// ClientHello for example.com offering ALPN "alpn"; the payload is this padded with zeros
    /// to 1,162 bytes, under packet number 2.
    const RFC_CRYPTO_FRAME: &str = concat!(
        "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868",
        "04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578",
        "616d706c652e636f6dff01000100000a00080006001d00170018001000070005",
        "04616c706e000500050100000000003300260024001d00209370b2c9caa47fba",
        "baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400",
        "0d0010000e0403050306030203080408050806002d00020101001c0002400100",
        "3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000",
        "75300901100f088394c8f03e51570806048000ffff",
    );

    /// RFC 9001 A.2: the protected client Initial packet (1,200 bytes).
    const RFC9001_PACKET: &str = concat!(
        "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11",
        "d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399",
        "1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c",
        "8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212",
        "30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5",
        "457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208",
        "4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec",
        "4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3",
        "485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db",
        "059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c",
        "7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8",
        "9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556",
        "be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74",
        "68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a",
        "c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00",
        "f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632",
        "291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964",
        "25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd",
        "14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff",
        "ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198",
        "e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd",
        "c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73",
        "203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f",
        "cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e",
        "fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade",
        "a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047",
        "90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2",
        "162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4",
        "40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0",
        "6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e",
        "8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0",
        "be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400",
        "54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab",
        "760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9",
        "f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4",
        "056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064",
        "7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241",
        "e221af44860018ab0856972e194cd934",
    );

    /// RFC 9369 A.2: the same client Initial in QUIC version 2.
    const RFC9369_PACKET: &str = concat!(
        "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485",
        "dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04",
        "9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d",
        "250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a",
        "12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500",
        "cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68",
        "18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33",
        "12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3",
        "d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd",
        "6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520",
        "bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045",
        "636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f",
        "ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12",
        "16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5",
        "4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4",
        "fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b",
        "8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7",
        "14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9",
        "9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91",
        "abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd",
        "80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db",
        "848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18",
        "d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15",
        "c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc",
        "7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61",
        "f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710",
        "10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b",
        "3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e",
        "06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce",
        "8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1",
        "34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1",
        "e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd",
        "5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3",
        "8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89",
        "d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53",
        "6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19",
        "9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b",
        "a18b2faa745b6fe189cf772a9f84cbfc",
    );

    fn rfc_payload() -> Vec<u8> {
        let mut payload = hex(RFC_CRYPTO_FRAME);
        payload.resize(1162, 0);
        payload
    }

    fn rfc_hello() -> Sniff<ClientHello> {
        Sniff::Found(ClientHello { sni: Some("example.com".into()), alpn: vec!["alpn".into()], ech: false })
    }

    fn varint(v: u64) -> Vec<u8> {
        match v {
            0..64 => vec![v as u8],
            64..16384 => (0x4000 | v as u16).to_be_bytes().to_vec(),
            16384..1_073_741_824 => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
            _ => (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec(),
        }
    }

    fn crypto(offset: usize, data: &[u8]) -> Vec<u8> {
        [&[0x06][..], &varint(offset as u64), &varint(data.len() as u64), data].concat()
    }

    /// An ACK frame with one gap, and one with ECN counts.
    fn acks() -> Vec<u8> {
        [&[0x02, 0x05, 0x40, 0x10, 0x01, 0x01, 0x00, 0x01][..], &[0x03, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03]]
            .concat()
    }

    fn type_bits(version: Version, kind: PacketKind) -> u8 {
        let v1 = match kind {
            PacketKind::Initial => 0,
            PacketKind::ZeroRtt => 1,
            PacketKind::Handshake => 2,
            PacketKind::Retry => 3,
        };
        match version {
            Version::V1 => v1,
            Version::V2 => (v1 + 1) & 0b11,
        }
    }

    /// The client's own connection ID in the packets built here.
    const SCID: [u8; 5] = [0xa1, 0xa2, 0xa3, 0xa4, 0xa5];

    /// One long-header packet protected the RFC 9001 way (5.3, 5.4) with the client Initial keys
    /// of `key_dcid`: a 2-byte Length, a `pn_len`-byte packet number; a token only for Initials.
    #[allow(clippy::too_many_arguments)]
    fn protect(
        version: Version,
        kind: PacketKind,
        dcid: &[u8],
        key_dcid: &[u8],
        scid: &[u8],
        token: &[u8],
        pn: u64,
        pn_len: usize,
        payload: &[u8],
    ) -> Vec<u8> {
        let keys = Keys::derive(version, key_dcid);
        let wire = match version {
            Version::V1 => VERSION_1,
            Version::V2 => VERSION_2,
        };
        let mut packet = vec![0xc0 | type_bits(version, kind) << 4 | (pn_len as u8 - 1)];
        packet.extend_from_slice(&wire.to_be_bytes());
        packet.push(dcid.len() as u8);
        packet.extend_from_slice(dcid);
        packet.push(scid.len() as u8);
        packet.extend_from_slice(scid);
        if kind == PacketKind::Initial {
            packet.extend_from_slice(&varint(token.len() as u64));
            packet.extend_from_slice(token);
        }
        packet.extend_from_slice(&(0x4000 | (pn_len + payload.len() + TAG) as u16).to_be_bytes());
        let pn_offset = packet.len();
        packet.extend_from_slice(&pn.to_be_bytes()[8 - pn_len..]);
        let mut body = payload.to_vec();
        let tag = keys
            .aead
            .encrypt_inout_detached(&Array::from(keys.nonce(pn)), &packet, body.as_mut_slice().into())
            .expect("seal");
        packet.extend_from_slice(&body);
        packet.extend_from_slice(&tag);
        let mask = keys.mask(packet[pn_offset + 4..pn_offset + 4 + SAMPLE].try_into().unwrap());
        packet[0] ^= mask[0] & 0x0f;
        for i in 0..pn_len {
            packet[pn_offset + i] ^= mask[1 + i];
        }
        packet
    }

    /// A client Initial datagram of `size` bytes (padded with PADDING frames) carrying `frames`,
    /// then the packets in `after`.
    fn encrypt_initial(version: Version, dcid: &[u8], pn: u64, frames: &[u8], after: &[u8], size: usize) -> Vec<u8> {
        let bare = protect(version, PacketKind::Initial, dcid, dcid, &SCID, &[], pn, 2, frames);
        let mut payload = frames.to_vec();
        payload.resize(frames.len() + size.saturating_sub(bare.len() + after.len()), 0);
        [protect(version, PacketKind::Initial, dcid, dcid, &SCID, &[], pn, 2, &payload), after.to_vec()].concat()
    }

    /// Datagrams framed as the fixtures and the fuzz target hold them: u16 length, bytes.
    fn datagrams(framed: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut rest = framed;
        while let [a, b, tail @ ..] = rest {
            let (d, after) = tail.split_at(usize::from(u16::from_be_bytes([*a, *b])));
            out.push(d);
            rest = after;
        }
        out
    }

    fn answers(datagrams: &[&[u8]]) -> Vec<Sniff<ClientHello>> {
        let mut sniffer = InitialSniffer::new();
        datagrams.iter().map(|d| sniffer.push(d)).collect()
    }

    fn h3(name: &str) -> Sniff<ClientHello> {
        Sniff::Found(ClientHello { sni: Some(name.into()), alpn: vec!["h3".into()], ech: false })
    }

    /// A ~1.8 KB hello as Chrome sends over QUIC: an X25519MLKEM768 share, a GREASE ECH and
    /// transport parameters.
    fn pq_hello() -> Vec<u8> {
        let mut exts = chrome_pq(Some("pq.example"), &["h3"]);
        exts.push(ext(0x39, &[1, 2, 0x40, 0x10, 4, 4, 0x80, 0x98, 0x96, 0x80]));
        hello(&exts)
    }

    fn pq_found() -> Sniff<ClientHello> {
        Sniff::Found(ClientHello { sni: Some("pq.example".into()), alpn: vec!["h3".into()], ech: true })
    }

    #[test]
    fn keys_are_those_of_rfc_9001_and_rfc_9369_appendix_a1() {
        let dcid = hex(RFC_DCID);
        let (key, iv, hp) = secrets(Version::V1, &dcid);
        assert_eq!(key.to_vec(), hex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(iv.to_vec(), hex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(hp.to_vec(), hex("9f50449e04a0e810283a1e9933adedd2"));
        let (key, iv, hp) = secrets(Version::V2, &dcid);
        assert_eq!(key.to_vec(), hex("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(iv.to_vec(), hex("91f73e2351d8fa91660e909f"));
        assert_eq!(hp.to_vec(), hex("45b95e15235d6f45a6b19cbcb0294ba9"));
    }

    #[test]
    fn the_rfc_9001_client_initial_decrypts_to_its_client_hello() {
        let packet = hex(RFC9001_PACKET);
        assert_eq!(packet.len(), 1200);
        let keys = Keys::derive(Version::V1, &hex(RFC_DCID));
        // A.2: the sample and the mask it gives.
        assert_eq!(packet[22..38].to_vec(), hex("d1b1c98dd7689fb8ec11d242b123dc9b"));
        assert_eq!(keys.mask(packet[22..38].try_into().unwrap())[..5].to_vec(), hex("437b9aec36"));
        let mut scratch = Vec::new();
        let (pn, range) = open(&keys, &packet, 18, None, &mut scratch).expect("opens");
        assert_eq!(pn, 2);
        assert_eq!(scratch[..18 + 4].to_vec(), hex("c300000001088394c8f03e5157080000449e00000002"));
        assert_eq!(scratch[range].to_vec(), rfc_payload());
        // This module's sealing (the tests' encrypt_initial) gives the RFC's bytes back.
        let sealed =
            protect(Version::V1, PacketKind::Initial, &hex(RFC_DCID), &hex(RFC_DCID), &[], &[], 2, 4, &rfc_payload());
        assert_eq!(sealed, packet);
        assert!(is_initial(&packet));
        assert_eq!(InitialSniffer::new().push(&packet), rfc_hello());
    }

    #[test]
    fn the_rfc_9369_client_initial_decrypts_to_its_client_hello() {
        let packet = hex(RFC9369_PACKET);
        assert_eq!(packet.len(), 1200);
        let keys = Keys::derive(Version::V2, &hex(RFC_DCID));
        assert_eq!(keys.mask(packet[22..38].try_into().unwrap())[..5].to_vec(), hex("94a0c95e80"));
        let mut scratch = Vec::new();
        let (pn, range) = open(&keys, &packet, 18, None, &mut scratch).expect("opens");
        assert_eq!(pn, 2);
        assert_eq!(scratch[..22].to_vec(), hex("d36b3343cf088394c8f03e5157080000449e00000002"));
        assert_eq!(scratch[range].to_vec(), rfc_payload());
        assert!(is_initial(&packet));
        assert_eq!(InitialSniffer::new().push(&packet), rfc_hello());
        // The v1 keys do not open a v2 packet, nor the v2 keys a v1 one.
        assert!(open(&Keys::derive(Version::V1, &hex(RFC_DCID)), &packet, 18, None, &mut scratch).is_none());
        let v1 = hex(RFC9001_PACKET);
        assert!(open(&keys, &v1, 18, None, &mut scratch).is_none());
    }

    #[test]
    fn aioquic_client_initials_are_read() {
        let one = include_bytes!("testdata/aioquic-h3-initial.bin");
        assert_eq!(answers(&datagrams(one)), [h3("h3.example")]);
        let v2 = include_bytes!("testdata/aioquic-h3-v2-initial.bin");
        assert_eq!(answers(&datagrams(v2)), [h3("h3.example")]);
        let pq = datagrams(include_bytes!("testdata/aioquic-h3-pq-initials.bin"));
        assert_eq!(pq.len(), 2, "aioquic's post-quantum hello takes two datagrams");
        assert!(pq.iter().all(|d| is_initial(d)));
        assert_eq!(answers(&pq), [Sniff::NeedMore, h3("h3.example")]);
        // Either datagram may arrive first.
        assert_eq!(answers(&[pq[1], pq[0]]), [Sniff::NeedMore, h3("h3.example")]);
    }

    #[test]
    fn a_hello_over_two_datagrams_in_shuffled_overlapping_frames_is_joined() {
        let hello = pq_hello();
        assert!(hello.len() > 1700, "{} bytes", hello.len());
        // Chrome-like: pieces of varied size, out of order, some twice, overlapping, between
        // PING, PADDING and ACK frames.
        let cuts = [0, 7, 100, 101, 350, 600, 901, 1000, 1100, 1380, 1500, 1650, hello.len()];
        let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
        pieces.push((90, 130));
        pieces.push((1490, 1660));
        let order = [5, 0, 9, 3, 12, 7, 1, 13, 10, 4, 11, 2, 6, 8];
        let frames = |which: &[usize]| -> Vec<u8> {
            let mut out = acks();
            for &i in which {
                let (from, to) = pieces[i];
                out.extend_from_slice(&[0x01, 0x00, 0x00]);
                out.extend_from_slice(&crypto(from, &hello[from..to]));
            }
            out
        };
        let dcid = [0x11; 8];
        let first = encrypt_initial(Version::V1, &dcid, 0, &frames(&order[..7]), &[], 1252);
        let second = encrypt_initial(Version::V1, &dcid, 1, &frames(&order[7..]), &[], 1252);
        assert_eq!(answers(&[&first, &second]), [Sniff::NeedMore, pq_found()]);
        assert_eq!(answers(&[&second, &first]), [Sniff::NeedMore, pq_found()]);
        assert_eq!(
            answers(&[&first, &first, &second, &second]),
            [Sniff::NeedMore, Sniff::NeedMore, pq_found(), pq_found()]
        );
        // v2 the same way.
        let first = encrypt_initial(Version::V2, &dcid, 0, &frames(&order[..7]), &[], 1200);
        let second = encrypt_initial(Version::V2, &dcid, 1, &frames(&order[7..]), &[], 1200);
        assert_eq!(answers(&[&first, &second]), [Sniff::NeedMore, pq_found()]);
    }

    #[test]
    fn coalesced_packets_around_initials_are_stepped_over() {
        let hello = pq_hello();
        let dcid = [0x22; 12];
        let zero_rtt = protect(Version::V1, PacketKind::ZeroRtt, &dcid, &dcid, &SCID, &[], 0, 2, &[0x01; 64]);
        let handshake =
            protect(Version::V1, PacketKind::Handshake, &dcid, b"other keys", &SCID, &[], 0, 1, &[0x01; 40]);
        let short = [&[0x40][..], &dcid, &[0x55; 60]].concat();
        let first = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &hello[..1000]), &zero_rtt, 1200);
        // A later datagram may start with any packet; a short header ends it.
        let second_initial =
            protect(Version::V1, PacketKind::Initial, &dcid, &dcid, &SCID, &[], 1, 1, &crypto(1000, &hello[1000..]));
        let second = [handshake.clone(), second_initial, short.clone()].concat();
        assert_eq!(answers(&[&first, &second]), [Sniff::NeedMore, pq_found()]);
        // After a short header nothing is read, even an Initial.
        let hidden = [
            handshake,
            short,
            protect(Version::V1, PacketKind::Initial, &dcid, &dcid, &SCID, &[], 1, 1, &crypto(1000, &hello[1000..])),
        ]
        .concat();
        assert_eq!(answers(&[&first, &hidden]), [Sniff::NeedMore, Sniff::NeedMore]);
    }

    #[test]
    fn later_initials_to_the_servers_connection_id_use_the_first_keys() {
        let hello = pq_hello();
        let dcid = [0x33; 8];
        let first = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &hello[..900]), &[], 1200);
        // The client now addresses the server's connection ID; the keys stay those of `dcid`.
        let server_cid = [0x44; 5];
        let later = protect(
            Version::V1,
            PacketKind::Initial,
            &server_cid,
            &dcid,
            &SCID,
            &[],
            1,
            1,
            &crypto(900, &hello[900..]),
        );
        let later = [later, vec![0; 100]].concat();
        assert_eq!(answers(&[&first, &later]), [Sniff::NeedMore, pq_found()]);
    }

    #[test]
    fn after_a_retry_the_initials_under_new_keys_are_read() {
        let hello = pq_hello();
        let first = encrypt_initial(Version::V1, &[0x55; 8], 0, &crypto(0, &hello[..900]), &[], 1200);
        // After a Retry: a new DCID (the Retry's), keys from it, a token, the hello from 0 again.
        let retry_cid = [0x66; 16];
        let mut again = Vec::new();
        for (pn, (from, to)) in [(1, (0, 1100)), (2, (1100, hello.len()))] {
            let packet = protect(
                Version::V1,
                PacketKind::Initial,
                &retry_cid,
                &retry_cid,
                &SCID,
                b"retry token",
                pn,
                2,
                &crypto(from, &hello[from..to]),
            );
            again.push([packet, vec![0; 60]].concat());
        }
        assert_eq!(answers(&[&first, &again[0], &again[1]]), [Sniff::NeedMore, Sniff::NeedMore, pq_found()]);
    }

    #[test]
    fn what_is_not_a_client_initial_is_refused_at_once() {
        let rfc = hex(RFC9001_PACKET);
        let dns = hex("12340100000100000000000003777777076578616d706c6503636f6d0000010001");
        let mut short_header = rfc.clone();
        short_header[0] = 0x43;
        let mut unknown_version = rfc.clone();
        unknown_version[1..5].copy_from_slice(&[0xff, 0, 0, 0x1d]);
        let mut handshake_type = rfc.clone();
        handshake_type[0] ^= 0x20;
        let mut no_fixed_bit = rfc.clone();
        no_fixed_bit[0] &= !0x40;
        let mut long_cid = rfc.clone();
        long_cid[5] = 21;
        let mut tampered = rfc.clone();
        tampered[600] ^= 1;
        for (what, datagram) in [
            ("dns", &dns[..]),
            ("empty", &[]),
            ("short of 1200 bytes", &rfc[..1199]),
            ("short header", &short_header),
            ("unknown version", &unknown_version),
            ("handshake packet", &handshake_type),
            ("no fixed bit", &no_fixed_bit),
            ("connection id of 21 bytes", &long_cid),
        ] {
            assert!(!is_initial(datagram), "{what}");
            assert_eq!(answers(&[datagram, &rfc]), [Sniff::NotThis, Sniff::NotThis], "{what}");
        }
        // Shaped like an Initial but it does not decrypt.
        assert!(is_initial(&tampered));
        assert_eq!(answers(&[&tampered, &rfc]), [Sniff::NotThis, Sniff::NotThis]);
        // A hello too long to keep, and a handshake message that is not a ClientHello.
        let dcid = [0x77; 8];
        let huge = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &[1, 0, 0x40, 0x00, 3, 3]), &[], 1200);
        assert_eq!(answers(&[&huge]), [Sniff::NotThis]);
        let server_hello = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &[2, 0, 0, 0x40, 3, 3]), &[], 1200);
        assert_eq!(answers(&[&server_hello]), [Sniff::NotThis]);
    }

    #[test]
    fn sixteen_datagrams_without_a_new_crypto_byte_end_the_wait() {
        let hello = pq_hello();
        let dcid = [0x88; 8];
        let first = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &hello[..1000]), &[], 1200);
        let resent =
            encrypt_initial(Version::V1, &dcid, 1, &[&acks()[..], &crypto(10, &hello[10..900])].concat(), &[], 1200);
        let zero_rtt = protect(Version::V1, PacketKind::ZeroRtt, &dcid, &dcid, &SCID, &[], 2, 2, &[0; 1100]);
        let mut sniffer = InitialSniffer::new();
        assert_eq!(sniffer.push(&first), Sniff::NeedMore);
        for i in 1..NO_PROGRESS_LIMIT {
            let d = if i % 2 == 0 { &resent } else { &zero_rtt };
            assert_eq!(sniffer.push(d), Sniff::NeedMore, "datagram {i} without progress");
        }
        assert_eq!(sniffer.push(&zero_rtt), Sniff::NotThis);
        let rest = encrypt_initial(Version::V1, &dcid, 3, &crypto(1000, &hello[1000..]), &[], 1200);
        assert_eq!(sniffer.push(&rest), Sniff::NotThis, "the answer stays");
        // Progress resets the count.
        let mut sniffer = InitialSniffer::new();
        assert_eq!(sniffer.push(&first), Sniff::NeedMore);
        for _ in 1..NO_PROGRESS_LIMIT {
            assert_eq!(sniffer.push(&zero_rtt), Sniff::NeedMore);
        }
        assert_eq!(sniffer.push(&rest), pq_found());
        assert_eq!(sniffer.push(&zero_rtt), pq_found(), "the answer stays");
    }

    #[test]
    fn crypto_data_beyond_the_bound_and_odd_frames_are_harmless() {
        let dcid = [0x99; 8];
        let rfc_hello_bytes = &hex(RFC_CRYPTO_FRAME)[4..];
        let frames = [
            crypto((1 << 62) - 1, &[1, 2, 3]),
            crypto(MAX_HELLO_MESSAGE - 1, &[9; 40]),
            vec![0x1c, 0x01, 0x00, 0x03, b'b', b'y', b'e'], // CONNECTION_CLOSE
            crypto(0, rfc_hello_bytes),
        ]
        .concat();
        let d = encrypt_initial(Version::V1, &dcid, 0, &frames, &[], 1200);
        assert_eq!(answers(&[&d]), [rfc_hello()]);
        // A frame an Initial may not carry (STREAM) ends the packet's frames.
        let stream_first = [&[0x08, 0x00, 0x01, 0x00][..], &crypto(0, rfc_hello_bytes)].concat();
        let d = encrypt_initial(Version::V1, &dcid, 0, &stream_first, &[], 1200);
        assert_eq!(answers(&[&d]), [Sniff::NeedMore]);
        // A huge ACK range count runs out with the payload.
        let ack = [&[0x02, 0x00, 0x00][..], &varint((1 << 62) - 1), &[0x00]].concat();
        let d = encrypt_initial(Version::V1, &dcid, 0, &ack, &[], 1200);
        assert_eq!(answers(&[&d]), [Sniff::NeedMore]);
    }

    #[test]
    fn variable_length_integers_and_packet_numbers_decode_as_rfc_9000_shows() {
        for (bytes, want) in [
            ("c2197c5eff14e88c", 151_288_809_941_952_652),
            ("9d7f3e7d", 494_878_333),
            ("7bbd", 15_293),
            ("25", 37),
            ("4025", 37),
        ] {
            let b = hex(bytes);
            let mut r = Reader::new(&b);
            assert_eq!(r.varint(), Some(want), "{bytes}");
            assert_eq!(r.at, b.len());
            assert_eq!(Reader::new(&b[..b.len() - 1]).varint(), None, "{bytes} cut short");
        }
        assert_eq!(decode_packet_number(Some(0xa82f30ea), 0x9b32, 16), 0xa82f9b32);
        assert_eq!(decode_packet_number(None, 2, 32), 2);
        assert_eq!(decode_packet_number(Some(0xff), 0x01, 8), 0x101);
        assert_eq!(decode_packet_number(Some(0x100), 0xff, 8), 0xff);
    }

    /// Any single-byte change to a real Initial gives an answer without panicking; only a
    /// change that keeps the packet authentic could still give the hello.
    #[test]
    fn damaged_initials_never_panic() {
        let rfc = hex(RFC9001_PACKET);
        for i in 0..rfc.len() {
            let mut bad = rfc.clone();
            bad[i] ^= 0x41;
            let mut sniffer = InitialSniffer::new();
            assert_eq!(sniffer.push(&bad), Sniff::NotThis, "byte {i}");
            for cut in [0, 1, 17, 18, 40, 1199] {
                let mut sniffer = InitialSniffer::new();
                let _ = sniffer.push(&rfc[..cut]);
                assert!(!matches!(sniffer.push(&rfc[cut..]), Sniff::Found(_)), "a cut datagram at {cut}");
            }
        }
    }

    /// Writes the seeds of the `quic` fuzz target (fuzz/corpus/quic/; framing in its doc): the
    /// RFC and aioquic Initials as raw datagrams (mode 0), and built hellos as sealed CRYPTO
    /// frame records (mode 1: v1, mode 3: v2).
    /// `cargo test -p flowgate-core --lib sniff::quic::tests::write_fuzz_seeds -- --ignored`
    #[test]
    #[ignore = "writes files into fuzz/corpus"]
    fn write_fuzz_seeds() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/quic");
        std::fs::create_dir_all(dir).unwrap();
        let framed = |datagrams: &[&[u8]]| -> Vec<u8> {
            let mut out = vec![0];
            for d in datagrams {
                out.extend_from_slice(&(d.len() as u16).to_be_bytes());
                out.extend_from_slice(d);
            }
            out
        };
        // Sealed mode: records of [flags][offset u16][length u16][data].
        let sealed = |mode: u8, pieces: &[(u8, usize, &[u8])]| -> Vec<u8> {
            let mut out = vec![mode];
            for &(flags, offset, data) in pieces {
                out.push(flags);
                out.extend_from_slice(&(offset as u16).to_be_bytes());
                out.extend_from_slice(&(data.len() as u16).to_be_bytes());
                out.extend_from_slice(data);
            }
            out
        };
        let (v1, v2) = (hex(RFC9001_PACKET), hex(RFC9369_PACKET));
        let pq = pq_hello();
        let rfc = hex(RFC_CRYPTO_FRAME)[4..].to_vec();
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            ("raw-rfc9001-a2", framed(&[&v1])),
            ("raw-rfc9369-a2", framed(&[&v2])),
            ("raw-rfc9001-a2-twice", framed(&[&v1, &v1])),
            ("raw-aioquic-h3", [&[0][..], include_bytes!("testdata/aioquic-h3-initial.bin")].concat()),
            ("raw-aioquic-h3-v2", [&[0][..], include_bytes!("testdata/aioquic-h3-v2-initial.bin")].concat()),
            ("raw-aioquic-h3-pq", [&[0][..], include_bytes!("testdata/aioquic-h3-pq-initials.bin")].concat()),
            ("sealed-v1-rfc-hello", sealed(1, &[(0x01, 0, &rfc)])),
            ("sealed-v2-rfc-hello", sealed(3, &[(0x01, 0, &rfc)])),
            (
                "sealed-v1-pq-two-datagrams-shuffled",
                sealed(
                    1,
                    &[
                        (0x02, 900, &pq[900..1000]),
                        (0x04, 0, &pq[..500]),
                        (0x09, 450, &pq[450..900]),
                        (0x12, 1000, &pq[1000..1400]),
                        (0x28, 1300, &pq[1300..]),
                        (0xc1, 0, &pq[..10]),
                    ],
                ),
            ),
            ("sealed-v2-pq-cid-20", sealed(3 | 12 << 2, &[(0x41, 0, &pq[..1100]), (0x81, 1100, &pq[1100..])])),
        ];
        for (name, bytes) in seeds {
            std::fs::write(format!("{dir}/{name}"), bytes).unwrap();
        }
    }

    /// µs per `push` of a 1,252-byte Initial (a new sniffer each time: key derivation included).
    /// `cargo test --release -p flowgate-core --lib sniff::quic::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn timing() {
        let dcid = [0x5a; 8];
        let whole = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &hex(RFC_CRYPTO_FRAME)[4..]), &[], 1252);
        let hello = pq_hello();
        let half = encrypt_initial(Version::V1, &dcid, 0, &crypto(0, &hello[..1100]), &[], 1252);
        assert_eq!(whole.len(), 1252);
        assert_eq!(half.len(), 1252);
        let rounds = 50_000;
        for (what, d) in [("whole hello", &whole), ("first half of a 1.8 KB hello", &half)] {
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                let mut sniffer = InitialSniffer::new();
                std::hint::black_box(sniffer.push(std::hint::black_box(d)));
            }
            let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
            println!("push of a {} byte Initial ({what}), new sniffer: {per:.2} us", d.len());
        }
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(Keys::derive(Version::V1, std::hint::black_box(&dcid)));
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
        println!("of which key derivation (HKDF, AES key schedules): {per:.2} us");
        let keys = Keys::derive(Version::V1, &dcid);
        let mut scratch = Vec::new();
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            assert!(open(&keys, std::hint::black_box(&whole), 23, None, &mut scratch).is_some());
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
        println!("of which header protection and AES-GCM: {per:.2} us");
        let second = encrypt_initial(Version::V1, &dcid, 1, &crypto(1100, &hello[1100..]), &[], 1252);
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            let mut sniffer = InitialSniffer::new();
            sniffer.push(&half);
            assert_eq!(sniffer.push(std::hint::black_box(&second)), pq_found());
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
        println!("two pushes of 1252-byte Initials holding a {} byte hello: {per:.2} us", hello.len());
    }
}
