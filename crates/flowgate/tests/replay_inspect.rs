//! Replay tests of content inspection (issue 10) over crafted captures: TLS ClientHellos for
//! `blocked.example` cut in every way a sender (or an evader) can cut them, which the real
//! `flowgate replay` must see through, with a host rule that drops `blocked.example`.
//!
//! The captures are built here (etherparse for the packets, pcap-file for the file, raw IP link
//! type) in a temp directory: every connection a full TCP handshake from 198.51.100.1 (the
//! local address) to 203.0.113.10:443 (or 2001:db8:1::1 to 2001:db8:2::10), then the ClientHello,
//! each connection on a client port of its own so its events can be found. The ClientHellos are
//! realistic TLS 1.3 ones built by [`client_hello`] (SNI, ALPN h2 and http/1.1, supported_versions,
//! supported_groups, signature_algorithms, psk_key_exchange_modes, a key_share): a small one
//! (X25519 share, about 250 bytes) and a post-quantum one (X25519MLKEM768's 1,216-byte share
//! plus X25519, about 1,500 bytes: two segments at an ordinary MSS).
//!
//! Each test checks every connection's events: the host name and source `sni`, and the final
//! verdict (the last `flow.verdict`/`flow.update` of the flow): drop for blocked.example, allow for
//! the allowed.example controls. A test collects every wrong connection before it fails, so its
//! message says which cuts fool the filter.

mod lab;

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use etherparse::{IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header, PacketBuilder};
use lab::{ScratchDir, final_verdict, flows_between, host_of};
use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use serde_json::Value;

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);

const CONFIG: &str = "local_addresses = [\"198.51.100.1\", \"2001:db8:1::1\"]\n\
                      [[rule]]\nname = \"no-blocked\"\nhost = \"blocked.example\"\naction = \"drop\"\n";

// ---------------------------------------------------------------------------------------------
// A TLS 1.3 ClientHello
// ---------------------------------------------------------------------------------------------

/// The key shares a ClientHello offers.
#[derive(Clone, Copy, Debug)]
enum Shares {
    /// X25519 only (32 bytes).
    X25519,
    /// X25519MLKEM768 (1,216 bytes: ML-KEM-768's 1,184-byte key and X25519's 32) and X25519.
    PostQuantum,
}

fn u16be(v: usize) -> [u8; 2] {
    u16::try_from(v).expect("fits in u16").to_be_bytes()
}

/// `len` (u16) then `body`.
fn vec16(body: &[u8]) -> Vec<u8> {
    let mut v = u16be(body.len()).to_vec();
    v.extend_from_slice(body);
    v
}

/// `len` (u8) then `body`.
fn vec8(body: &[u8]) -> Vec<u8> {
    let mut v = vec![u8::try_from(body.len()).expect("fits in u8")];
    v.extend_from_slice(body);
    v
}

fn extension(kind: u16, data: &[u8]) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend(vec16(data));
    v
}

/// Deterministic filler bytes (random, key shares): a tiny LCG.
fn filler(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// The ClientHello handshake message (type 1, u24 length, body) for `sni`, as a browser sends it
/// for TLS 1.3.
fn client_hello_message(sni: &str, shares: Shares) -> Vec<u8> {
    let mut body = vec![0x03, 0x03]; // legacy_version TLS 1.2
    body.extend(filler(1, 32)); // random
    body.extend(vec8(&filler(2, 32))); // legacy_session_id
    let suites: Vec<u8> = [0x1301u16, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8]
        .iter()
        .flat_map(|s| s.to_be_bytes())
        .collect();
    body.extend(vec16(&suites));
    body.extend([0x01, 0x00]); // compression: null
    let mut ext = Vec::new();
    // server_name: one host_name entry.
    let mut entry = vec![0x00];
    entry.extend(vec16(sni.as_bytes()));
    ext.extend(extension(0, &vec16(&entry)));
    ext.extend(extension(23, &[])); // extended_master_secret
    ext.extend(extension(0xff01, &[0x00])); // renegotiation_info
    let groups: Vec<u8> = [0x11ecu16, 0x001d, 0x0017, 0x0018].iter().flat_map(|g| g.to_be_bytes()).collect();
    ext.extend(extension(10, &vec16(&groups))); // supported_groups
    ext.extend(extension(11, &vec8(&[0x00]))); // ec_point_formats
    ext.extend(extension(35, &[])); // session_ticket
    let mut alpn = Vec::new();
    for p in ["h2", "http/1.1"] {
        alpn.extend(vec8(p.as_bytes()));
    }
    ext.extend(extension(16, &vec16(&alpn))); // ALPN
    ext.extend(extension(5, &[0x01, 0x00, 0x00, 0x00, 0x00])); // status_request
    let sigs: Vec<u8> = [0x0403u16, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
        .iter()
        .flat_map(|s| s.to_be_bytes())
        .collect();
    ext.extend(extension(13, &vec16(&sigs))); // signature_algorithms
    ext.extend(extension(18, &[])); // signed_certificate_timestamp
    let mut ks = Vec::new();
    if matches!(shares, Shares::PostQuantum) {
        ks.extend(0x11ecu16.to_be_bytes());
        ks.extend(vec16(&filler(3, 1216)));
    }
    ks.extend(0x001du16.to_be_bytes());
    ks.extend(vec16(&filler(4, 32)));
    ext.extend(extension(51, &vec16(&ks))); // key_share
    ext.extend(extension(45, &vec8(&[0x01]))); // psk_key_exchange_modes: psk_dhe_ke
    ext.extend(extension(43, &vec8(&[0x03, 0x04, 0x03, 0x03]))); // supported_versions
    ext.extend(extension(27, &[0x02, 0x00, 0x02])); // compress_certificate: brotli
    body.extend(vec16(&ext));
    let mut msg = vec![0x01];
    msg.extend(&u32::try_from(body.len()).expect("fits").to_be_bytes()[1..]);
    msg.extend(body);
    msg
}

/// The ClientHello in TLS records (type 22, version 3.1) of at most `max_fragment` bytes each.
fn records(message: &[u8], max_fragment: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in message.chunks(max_fragment) {
        out.extend([0x16, 0x03, 0x01]);
        out.extend(u16be(chunk.len()));
        out.extend(chunk);
    }
    out
}

/// A ClientHello for `sni` in one TLS record.
fn client_hello(sni: &str, shares: Shares) -> Vec<u8> {
    records(&client_hello_message(sni, shares), 16_384)
}

// ---------------------------------------------------------------------------------------------
// Captures
// ---------------------------------------------------------------------------------------------

/// A raw-IP pcap being written, with a clock that advances 50 µs per packet.
struct Capture {
    w: PcapWriter<std::fs::File>,
    path: PathBuf,
    clock_us: u64,
}

impl Capture {
    fn new(dir: &ScratchDir, name: &str) -> Capture {
        let path = dir.path(name);
        let header = PcapHeader { datalink: DataLink::RAW, ..PcapHeader::default() };
        let w = PcapWriter::with_header(std::fs::File::create(&path).expect("create capture"), header).expect("pcap");
        Capture { w, path, clock_us: 1_796_000_000_000_000 }
    }

    /// Capture time passes without a packet.
    fn advance_ms(&mut self, ms: u64) {
        self.clock_us += ms * 1000;
    }

    fn packet(&mut self, ip: &[u8]) {
        self.clock_us += 50;
        let ts = std::time::Duration::from_micros(self.clock_us);
        let len = u32::try_from(ip.len()).expect("len");
        self.w.write_packet(&PcapPacket::new(ts, len, ip)).expect("write packet");
    }
}

/// One TCP connection's endpoints and sequence numbers.
#[derive(Clone, Copy)]
struct Conn {
    v6: bool,
    port: u16,
    client_isn: u32,
    server_isn: u32,
}

/// The TCP flags of a crafted segment.
#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    /// ACK (and PSH when it carries data).
    Ack,
}

impl Conn {
    fn new(v6: bool, port: u16) -> Conn {
        Conn { v6, port, client_isn: 0x1000_0000 + u32::from(port) * 7919, server_isn: 0x7000_0000 }
    }

    /// The client's address as events write it.
    fn local(&self) -> String {
        if self.v6 { format!("[{CLIENT_V6}]:{}", self.port) } else { format!("{CLIENT_V4}:{}", self.port) }
    }

    fn remote(&self) -> String {
        if self.v6 { format!("[{SERVER_V6}]:443") } else { format!("{SERVER_V4}:443") }
    }

    /// A whole IP packet: from the client (`out`) or the server, with `flags` and `payload`
    /// at stream offset `offset` (of the client's data; 0 for handshake packets).
    fn segment(&self, out: bool, flags: Flags, offset: u32, payload: &[u8]) -> Vec<u8> {
        let (sport, dport) = if out { (self.port, 443) } else { (443, self.port) };
        let builder = match (self.v6, out) {
            (false, true) => PacketBuilder::ipv4(CLIENT_V4.octets(), SERVER_V4.octets(), 64),
            (false, false) => PacketBuilder::ipv4(SERVER_V4.octets(), CLIENT_V4.octets(), 64),
            (true, true) => PacketBuilder::ipv6(CLIENT_V6.octets(), SERVER_V6.octets(), 64),
            (true, false) => PacketBuilder::ipv6(SERVER_V6.octets(), CLIENT_V6.octets(), 64),
        };
        let (seq, ack) = match (flags, out) {
            (Flags::Syn, _) => (self.client_isn, 0),
            (Flags::SynAck, _) => (self.server_isn, self.client_isn.wrapping_add(1)),
            (Flags::Ack, true) => {
                (self.client_isn.wrapping_add(1).wrapping_add(offset), self.server_isn.wrapping_add(1))
            }
            (Flags::Ack, false) => {
                (self.server_isn.wrapping_add(1), self.client_isn.wrapping_add(1).wrapping_add(offset))
            }
        };
        let mut tcp = builder.tcp(sport, dport, seq, 64_240);
        tcp = match flags {
            Flags::Syn => tcp.syn(),
            Flags::SynAck => tcp.syn().ack(ack),
            Flags::Ack if payload.is_empty() => tcp.ack(ack),
            Flags::Ack => tcp.ack(ack).psh(),
        };
        let mut v = Vec::with_capacity(80 + payload.len());
        tcp.write(&mut v, payload).expect("build packet");
        v
    }

    /// SYN, SYN/ACK, ACK.
    fn handshake(&self, cap: &mut Capture) {
        cap.packet(&self.segment(true, Flags::Syn, 0, &[]));
        cap.packet(&self.segment(false, Flags::SynAck, 0, &[]));
        cap.packet(&self.segment(true, Flags::Ack, 0, &[]));
    }

    /// The client's bytes `data[range]` as one segment at their offset.
    fn data(&self, cap: &mut Capture, data: &[u8], from: usize, to: usize) {
        let seg = self.segment(true, Flags::Ack, u32::try_from(from).expect("offset"), &data[from..to]);
        cap.packet(&seg);
    }
}

/// Cuts a whole IPv4 packet into fragments whose payloads are `size` bytes (a multiple of 8)
/// but the last.
fn fragments_v4(packet: &[u8], size: usize, id: u16) -> Vec<Vec<u8>> {
    let (header, payload) = Ipv4Header::from_slice(packet).expect("an IPv4 packet");
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks(size).enumerate() {
        let offset = i * size;
        let mut h = header.clone();
        h.identification = id;
        h.dont_fragment = false;
        h.more_fragments = offset + chunk.len() < payload.len();
        h.fragment_offset = IpFragOffset::try_new(u16::try_from(offset / 8).expect("offset")).expect("offset");
        h.total_len = u16::try_from(h.header_len() + chunk.len()).expect("len");
        h.header_checksum = h.calc_header_checksum();
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(chunk);
        out.push(v);
    }
    out
}

/// Cuts a whole IPv6 packet (no extension headers) into fragments (a fragment header each)
/// whose fragmentable parts are `size` bytes (a multiple of 8) but the last.
fn fragments_v6(packet: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
    let (header, payload) = Ipv6Header::from_slice(packet).expect("an IPv6 packet");
    let mut out = Vec::new();
    for (i, chunk) in payload.chunks(size).enumerate() {
        let offset = i * size;
        let more = offset + chunk.len() < payload.len();
        let frag_offset = IpFragOffset::try_new(u16::try_from(offset / 8).expect("offset")).expect("offset");
        let frag = Ipv6FragmentHeader::new(header.next_header, frag_offset, more, id);
        let mut h = header.clone();
        h.next_header = IpNumber::IPV6_FRAGMENTATION_HEADER;
        h.payload_length = u16::try_from(8 + chunk.len()).expect("len");
        let mut v = h.to_bytes().to_vec();
        v.extend(frag.to_bytes());
        v.extend_from_slice(chunk);
        out.push(v);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Replay and checks
// ---------------------------------------------------------------------------------------------

/// Replays `capture` with `config` and returns its events.
fn replay(capture: &Path, config: &Path) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .arg("replay")
        .arg(capture)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run flowgate replay");
    assert!(out.status.success(), "flowgate replay {}: {}", capture.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// What one crafted connection must come to.
struct Expect {
    conn: Conn,
    what: String,
    /// The host name the flow must carry (source `sni`), if any is required.
    host: Option<&'static str>,
    verdict: &'static str,
}

impl Expect {
    fn blocked(conn: Conn, what: String) -> Expect {
        Expect { conn, what, host: Some("blocked.example"), verdict: "drop" }
    }

    fn allowed(conn: Conn, what: String) -> Expect {
        Expect { conn, what, host: Some("allowed.example"), verdict: "allow" }
    }
}

/// Checks every expectation against the events; returns the descriptions of the wrong ones.
fn wrong(events: &[Value], expects: &[Expect]) -> Vec<String> {
    // The events of each flow, and the flows of each (local, remote) pair: thousands of
    // connections are looked up.
    let mut by_id: HashMap<u64, Vec<Value>> = HashMap::new();
    let mut by_ends: HashMap<(String, String), Vec<u64>> = HashMap::new();
    for e in events {
        let f = &e["flow"];
        let Some(id) = f["id"].as_u64() else { continue };
        let mine = by_id.entry(id).or_default();
        if mine.is_empty() {
            let ends = (f["local"].as_str().unwrap_or("").to_string(), f["remote"].as_str().unwrap_or("").to_string());
            by_ends.entry(ends).or_default().push(id);
        }
        mine.push(e.clone());
    }
    let mut bad = Vec::new();
    for e in expects {
        let ids = by_ends.get(&(e.conn.local(), e.conn.remote())).cloned().unwrap_or_default();
        let Some(&id) = ids.first() else {
            bad.push(format!("{}: no flow {} -> {}", e.what, e.conn.local(), e.conn.remote()));
            continue;
        };
        let mine = by_id.get(&id).map(Vec::as_slice).unwrap_or_default();
        let (verdict, rule) = final_verdict(mine, id).unwrap_or_default();
        let host = host_of(mine, id).unwrap_or(Value::Null);
        let host_ok = e.host.is_none_or(|h| host["name"] == h && host["source"] == "sni");
        if verdict != e.verdict || !host_ok || ids.len() != 1 {
            // The flow's verdicts in order: `event verdict/rule/source @time`.
            let history: Vec<String> = mine
                .iter()
                .filter(|x| x["event"] == "flow.verdict" || x["event"] == "flow.update")
                .map(|x| {
                    let t = x["time"].as_str().unwrap_or("");
                    format!(
                        "{} {}/{}/{} @{}",
                        x["event"].as_str().unwrap_or(""),
                        x["verdict"].as_str().unwrap_or(""),
                        x["rule"].as_str().unwrap_or(""),
                        x["source"].as_str().unwrap_or("-"),
                        t.get(t.len().saturating_sub(16)..).unwrap_or(t)
                    )
                })
                .collect();
            bad.push(format!(
                "{}: flow {id} (of {}) final verdict {verdict:?} rule {rule:?} host {host}; expected {} host {:?}; \
                 verdicts: {}",
                e.what,
                ids.len(),
                e.verdict,
                e.host,
                history.join(", ")
            ));
        }
    }
    bad
}

fn check(events: &[Value], expects: &[Expect]) {
    let bad = wrong(events, expects);
    assert!(
        bad.is_empty(),
        "{} of {} connections came out wrong:\n{}",
        bad.len(),
        expects.len(),
        bad.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Ports handed out to connections, from 10,000 up.
struct Ports(u16);

impl Ports {
    fn next(&mut self) -> u16 {
        self.0 += 1;
        self.0
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[test]
fn client_hellos_have_the_shape_of_real_ones() {
    // The builder's own check, so a wrong builder cannot pass for a filter failure.
    for (shares, lo, hi) in [(Shares::X25519, 200, 400), (Shares::PostQuantum, 1_400, 1_700)] {
        let ch = client_hello("blocked.example", shares);
        assert!((lo..hi).contains(&ch.len()), "{shares:?}: {} bytes", ch.len());
        assert_eq!(ch.len(), client_hello("allowed.example", shares).len(), "same length for both names");
        let declared = usize::from(u16::from_be_bytes([ch[3], ch[4]]));
        assert_eq!(declared + 5, ch.len(), "record length");
        let hs = usize::from(ch[6]) << 16 | usize::from(ch[7]) << 8 | usize::from(ch[8]);
        assert_eq!(hs + 4, declared, "handshake length");
        assert!(ch.windows(15).any(|w| w == b"blocked.example"));
    }
    // The post-quantum one needs two segments at the lab's MSS (1,460).
    assert!(client_hello("blocked.example", Shares::PostQuantum).len() > 1460);
    let msg = client_hello_message("blocked.example", Shares::X25519);
    let split = records(&msg, 100);
    assert_eq!(split.len(), msg.len() + 5 * msg.len().div_ceil(100));
}

#[test]
fn a_client_hello_split_at_every_byte_offset_is_dropped() {
    let dir = ScratchDir::new("replay-split");
    let mut cap = Capture::new(&dir, "split.pcap");
    let mut ports = Ports(10_000);
    let mut expects = Vec::new();
    for shares in [Shares::X25519, Shares::PostQuantum] {
        for (name, blocked) in [("blocked.example", true), ("allowed.example", false)] {
            let ch = client_hello(name, shares);
            // Every cut into two segments (the allowed name: a handful, as controls).
            let cuts: Vec<usize> = if blocked { (1..ch.len()).collect() } else { vec![1, 5, 6, 60, ch.len() - 1] };
            for cut in cuts {
                let conn = Conn::new(false, ports.next());
                conn.handshake(&mut cap);
                conn.data(&mut cap, &ch, 0, cut);
                conn.data(&mut cap, &ch, cut, ch.len());
                let what = format!("{name} {shares:?} ({} bytes) cut at {cut}", ch.len());
                expects.push(if blocked { Expect::blocked(conn, what) } else { Expect::allowed(conn, what) });
            }
        }
        // Segments of an ordinary MSS, of 1 to 3 TLS records, and one record per 100 bytes.
        for (max_fragment, mss) in [(16_384, 1460), (100, 1460), (700, 536)] {
            let ch = records(&client_hello_message("blocked.example", shares), max_fragment);
            let conn = Conn::new(false, ports.next());
            conn.handshake(&mut cap);
            for from in (0..ch.len()).step_by(mss) {
                conn.data(&mut cap, &ch, from, (from + mss).min(ch.len()));
            }
            expects.push(Expect::blocked(conn, format!("{shares:?} in records of {max_fragment} B, MSS {mss}")));
        }
    }
    let config = dir.write("config.toml", CONFIG.as_bytes());
    drop(cap.w);
    eprintln!("{} connections in {}", expects.len(), cap.path.display());
    check(&replay(&cap.path, &config), &expects);
}

#[test]
fn one_byte_segments_in_reverse_order_are_put_back_in_order() {
    let dir = ScratchDir::new("replay-reverse");
    let mut cap = Capture::new(&dir, "reverse.pcap");
    let mut ports = Ports(20_000);
    let mut expects = Vec::new();
    let mut stuck = Vec::new();
    for (name, shares) in [
        ("blocked.example", Shares::X25519),
        ("allowed.example", Shares::X25519),
        ("blocked.example", Shares::PostQuantum),
    ] {
        let ch = client_hello(name, shares);
        let expect = |conn, what: String| {
            if name == "blocked.example" { Expect::blocked(conn, what) } else { Expect::allowed(conn, what) }
        };
        // Every byte in a segment of its own, last first. More packets than a flow may hold
        // (64): what is not held is dropped, and a real sender sends it again when its
        // retransmission timer fires, as Linux does, collapsed into full-size segments.
        let conn = Conn::new(false, ports.next());
        conn.handshake(&mut cap);
        for i in (0..ch.len()).rev() {
            conn.data(&mut cap, &ch, i, i + 1);
        }
        cap.advance_ms(200);
        for from in (0..ch.len()).step_by(1460) {
            conn.data(&mut cap, &ch, from, (from + 1460).min(ch.len()));
        }
        expects.push(expect(
            conn,
            format!("{name} {shares:?} as {} one-byte segments last first, then sent again", ch.len()),
        ));
        // Every byte in a segment of its own, in order (a sender writing byte by byte with
        // Nagle off), then sent again as above.
        let conn = Conn::new(false, ports.next());
        conn.handshake(&mut cap);
        for i in 0..ch.len() {
            conn.data(&mut cap, &ch, i, i + 1);
        }
        cap.advance_ms(200);
        for from in (0..ch.len()).step_by(1460) {
            conn.data(&mut cap, &ch, from, (from + 1460).min(ch.len()));
        }
        expects.push(expect(
            conn,
            format!("{name} {shares:?} as {} one-byte segments in order, then sent again", ch.len()),
        ));
        // Within the bounds: the rest first, then the first 60 bytes one byte at a time, last first.
        let conn = Conn::new(false, ports.next());
        conn.handshake(&mut cap);
        conn.data(&mut cap, &ch, 60, ch.len());
        for i in (0..60).rev() {
            conn.data(&mut cap, &ch, i, i + 1);
        }
        expects.push(expect(conn, format!("{name} {shares:?}: the rest, then 60 one-byte segments last first")));
        // Reverse order of ordinary segments.
        let conn = Conn::new(false, ports.next());
        conn.handshake(&mut cap);
        let starts: Vec<usize> = (0..ch.len()).step_by(100).collect();
        for &from in starts.iter().rev() {
            conn.data(&mut cap, &ch, from, (from + 100).min(ch.len()));
        }
        expects.push(expect(conn, format!("{name} {shares:?} as 100-byte segments, last first")));
        // One-byte segments last first and nothing sent again: the name cannot be read, and
        // nothing may pass; the hold timeout ends it.
        if name == "blocked.example" {
            let conn = Conn::new(false, ports.next());
            conn.handshake(&mut cap);
            for i in (0..ch.len()).rev() {
                conn.data(&mut cap, &ch, i, i + 1);
            }
            let what = format!("{name} {shares:?} as one-byte segments last first, never sent again");
            stuck.push(Expect { conn, what, host: None, verdict: "drop" });
        }
    }
    // Capture time goes on past the hold timeout (default 10 s): another flow's packet.
    cap.advance_ms(12_000);
    let later = Conn::new(false, ports.next());
    later.handshake(&mut cap);
    expects.extend(stuck);
    let config = dir.write("config.toml", CONFIG.as_bytes());
    drop(cap.w);
    check(&replay(&cap.path, &config), &expects);
}

/// A conflicting overlap: what it is, the first segment's hello and byte range, then the
/// second's.
type Conflict<'a> = (&'a str, &'a [u8], &'a [u8], (usize, usize), (usize, usize));

#[test]
fn overlapping_segments_with_conflicting_bytes_are_dropped_as_evasion() {
    let dir = ScratchDir::new("replay-overlap");
    let mut cap = Capture::new(&dir, "overlap.pcap");
    let mut ports = Ports(30_000);
    let mut expects = Vec::new();
    let allowed = client_hello("allowed.example", Shares::X25519);
    let blocked = client_hello("blocked.example", Shares::X25519);
    assert_eq!(allowed.len(), blocked.len());
    let sni_at = blocked.windows(15).position(|w| w == b"blocked.example").expect("SNI in the hello");
    let half = sni_at + 7; // inside the name
    // Conflicting overlaps: one name's bytes, then the other's over them.
    let conflicts: [Conflict<'_>; 4] = [
        ("allowed first, then blocked over all of it", &allowed, &blocked, (0, half), (0, blocked.len())),
        ("blocked first, then allowed over all of it", &blocked, &allowed, (0, half), (0, allowed.len())),
        // The later segment overlaps only the name's bytes.
        ("whole allowed hello, then 'blocked' over its name", &allowed, &blocked, (0, allowed.len()), (sni_at, half)),
        // Out of order: the tail first, then a head that overlaps it with other bytes.
        (
            "blocked tail first, then an allowed head overlapping it",
            &blocked,
            &allowed,
            (sni_at, blocked.len()),
            (0, half),
        ),
    ];
    for (what, first, second, a, b) in conflicts {
        let conn = Conn::new(false, ports.next());
        conn.handshake(&mut cap);
        conn.data(&mut cap, first, a.0, a.1);
        conn.data(&mut cap, second, b.0, b.1);
        // Whatever is still missing, from the second name's hello.
        let have_to = a.1.max(b.1);
        if have_to < second.len() {
            conn.data(&mut cap, second, have_to, second.len());
        }
        if a.0.min(b.0) > 0 {
            conn.data(&mut cap, second, 0, a.0.min(b.0));
        }
        expects.push(Expect { conn, what: format!("conflict: {what}"), host: None, verdict: "drop" });
    }
    // Controls: overlaps that repeat the same bytes (retransmissions) are no evasion.
    for (name, ch) in [("allowed.example", &allowed), ("blocked.example", &blocked)] {
        let conn = Conn::new(false, ports.next());
        conn.handshake(&mut cap);
        conn.data(&mut cap, ch, 0, half);
        conn.data(&mut cap, ch, 0, ch.len());
        conn.data(&mut cap, ch, sni_at, ch.len());
        let what = format!("{name}: retransmissions of the same bytes");
        expects.push(if name == "blocked.example" { Expect::blocked(conn, what) } else { Expect::allowed(conn, what) });
    }
    let config = dir.write("config.toml", CONFIG.as_bytes());
    drop(cap.w);
    let events = replay(&cap.path, &config);
    check(&events, &expects);
    // With overlap_conflict = "ignore" the controls come out the same (the conflicts are not
    // asserted: which bytes win is then the receiver's business).
    let ignore = dir.write("ignore.toml", format!("overlap_conflict = \"ignore\"\n{CONFIG}").as_bytes());
    let events = replay(&cap.path, &ignore);
    check(&events, &expects[4..]);
    for e in &expects[..4] {
        let id = flows_between(&events, &e.conn.local(), &e.conn.remote()).first().copied();
        let v = id.and_then(|id| final_verdict(&events, id));
        eprintln!("overlap_conflict = ignore: {}: {v:?}", e.what);
    }
}

#[test]
fn ip_fragments_in_and_out_of_order_are_put_together() {
    let dir = ScratchDir::new("replay-frag");
    let mut cap = Capture::new(&dir, "fragments.pcap");
    let mut ports = Ports(40_000);
    let mut expects = Vec::new();
    let mut id = 100u16;
    for v6 in [false, true] {
        for shares in [Shares::X25519, Shares::PostQuantum] {
            for (order, size) in [("in order", 64), ("last first", 64), ("shuffled", 64), ("tiny first fragment", 8)] {
                for name in ["blocked.example", "allowed.example"] {
                    let ch = client_hello(name, shares);
                    let conn = Conn::new(v6, ports.next());
                    conn.handshake(&mut cap);
                    let packet = conn.segment(true, Flags::Ack, 0, &ch);
                    id += 1;
                    let mut frags =
                        if v6 { fragments_v6(&packet, size, u32::from(id)) } else { fragments_v4(&packet, size, id) };
                    match order {
                        "last first" => frags.reverse(),
                        // A fixed interleaving: odd pieces first, then even ones backwards.
                        "shuffled" => {
                            let (odd, even): (Vec<_>, Vec<_>) =
                                frags.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
                            frags = odd.into_iter().chain(even.into_iter().rev()).map(|(_, f)| f).collect();
                        }
                        _ => {}
                    }
                    for f in &frags {
                        cap.packet(f);
                    }
                    let what = format!(
                        "{name} {shares:?} over IPv{} in {} fragments of {size} B, {order}",
                        if v6 { 6 } else { 4 },
                        frags.len()
                    );
                    expects.push(if name == "blocked.example" {
                        Expect::blocked(conn, what)
                    } else {
                        Expect::allowed(conn, what)
                    });
                }
            }
        }
    }
    let config = dir.write("config.toml", CONFIG.as_bytes());
    drop(cap.w);
    check(&replay(&cap.path, &config), &expects);
}
