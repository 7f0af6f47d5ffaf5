//! Shared helpers for the benchmarks (see `benches/`): a deterministic rule-set generator with
//! the flows the `classify` bench looks up, and a synthetic capture for the `replay` bench.
//!
//! Everything here is deterministic (a fixed-seed xorshift), so two runs measure the same rules
//! and the same packets. Setup errors are returned, never panicked on; the benches decide.
//!
//! The modules are what the live benchmarks (`src/bin/live.rs`, `verdicts.rs`, `flows.rs`,
//! `packets.rs`, `compare.rs`) share: [`args`], [`guard`], [`daemon`], [`connect`], [`bulk`],
//! [`counters`], [`report`], [`process`] (file-descriptor limit, another process's memory),
//! [`threads`] (named, niced, pinned threads), [`accept_all`] (the minimal accept-all NFQUEUE
//! reader), [`opensnitch`] (OpenSnitch's daemon in a lab namespace), and the integration tests'
//! namespace [`lab`]. [`heap`] counts live heap bytes for the `classify` bench's memory figures.

pub mod accept_all;
pub mod args;
pub mod bulk;
pub mod connect;
pub mod counters;
pub mod daemon;
pub mod guard;
pub mod heap;
// The integration tests' namespace lab, included here once so that the live benchmarks and the
// modules above share one copy of it (its types, its namespace counter).
#[path = "../../crates/flowgate/tests/lab/mod.rs"]
pub mod lab;
pub mod opensnitch;
pub mod process;
pub mod report;
pub mod threads;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etherparse::PacketBuilder;
use flowgate_core::rules::matcher::{CompiledRules, rule_matches};
use flowgate_core::rules::{Action, DirectionMatch, PortSet, ProtocolMatch, Rule, RuleSet};
use flowgate_core::{Direction, Flow, FlowId, Instant, Protocol};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::{DataLink, Endianness};

/// Marsaglia's xorshift64: tiny, deterministic, good enough to scatter addresses.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
}

/// 198.18.0.0/15 (RFC 2544 benchmarking range) as a number; 131,072 addresses.
const BENCH_V4_BASE: u32 = 0xC612_0000;
const BENCH_V4_SIZE: u64 = 1 << 17;

/// An address in 198.18.0.0/15.
pub fn bench_v4(rng: &mut XorShift) -> Ipv4Addr {
    Ipv4Addr::from(BENCH_V4_BASE + rng.below(BENCH_V4_SIZE) as u32)
}

/// An address in 2001:db8::/32, third group drawn from 256 values so that shorter prefixes
/// nest over longer ones.
fn doc_v6(rng: &mut XorShift) -> Ipv6Addr {
    let mut g = [0u16; 8];
    g[0] = 0x2001;
    g[1] = 0x0db8;
    g[2] = rng.below(256) as u16;
    for x in &mut g[3..] {
        *x = rng.next_u64() as u16;
    }
    Ipv6Addr::from(g)
}

/// Ports the generated network rules use; the looked-up flows use 443, outside this range.
const RULE_PORT_LO: u16 = 1024;

fn rule_port(rng: &mut XorShift) -> u16 {
    RULE_PORT_LO + rng.below(u64::from(u16::MAX - RULE_PORT_LO) + 1) as u16
}

fn one_port(p: u16) -> PortSet {
    PortSet::from_ranges(vec![(p, p)])
}

/// The fixed port/protocol rules at the head of every generated set.
fn service_rules() -> Vec<Rule> {
    let mut telnet = Rule::new("svc-telnet", Action::Drop);
    telnet.protocol = ProtocolMatch::Only(Protocol::Tcp);
    telnet.remote_ports = Some(one_port(23));
    let mut smtp = Rule::new("svc-smtp-inspect", Action::Inspect { peek_outbound: 512, peek_inbound: 512 });
    smtp.protocol = ProtocolMatch::Only(Protocol::Tcp);
    smtp.remote_ports = Some(one_port(25));
    let mut netbios = Rule::new("svc-netbios", Action::Drop);
    netbios.protocol = ProtocolMatch::Only(Protocol::Udp);
    netbios.remote_ports = Some(PortSet::from_ranges(vec![(137, 139)]));
    let mut torrent = Rule::new("svc-bittorrent", Action::Drop);
    torrent.remote_ports = Some(PortSet::from_ranges(vec![(6881, 6889)]));
    let mut gre = Rule::new("svc-gre-inbound", Action::Drop);
    gre.protocol = ProtocolMatch::Only(Protocol::Other(47));
    gre.direction = DirectionMatch::Only(Direction::Inbound);
    vec![telnet, smtp, netbios, torrent, gre]
}

fn net_rule(i: usize, net: IpNet, port: u16, action: Action) -> Rule {
    let mut r = Rule::new(format!("r{i}"), action);
    r.remote = vec![net];
    r.remote_ports = Some(one_port(port));
    r
}

/// `n` rules (`n >= 7`): five port/protocol rules, then remote-network rules — /32 (89%), /28
/// (4%), /24 (2%) in 198.18.0.0/15 and /48, /64, /128 (5%) in 2001:db8::/32 — each narrowed to
/// one remote port in 1024-65535, then a last /32 rule on an address and port no earlier rule
/// matches. Also returns the index of the last IPv6 rule, if any.
///
/// Why the ports: 198.18.0.0/15 holds only 131,072 addresses, so a million rules cannot all be
/// distinct plain /32s (and a few hundred plain /24s would already cover the whole range, leaving
/// no address for the "last rule" or the "no rule" lookup). With one port per rule every rule
/// is distinct and the address density is what it must be: at 1M rules each /32 of the range
/// carries about seven rules, each /28 five and each /24 forty, so about fifty rules cover any
/// one address (and about sixty cover one of the 256 /48s of the IPv6 part).
pub fn generate_rules(n: usize, seed: u64) -> Result<(RuleSet, Option<usize>), String> {
    let mut rules = service_rules();
    if n < rules.len() + 2 {
        return Err(format!("need at least {} rules, got {n}", rules.len() + 2));
    }
    let mut rng = XorShift::new(seed);
    let mut last_v6 = None;
    while rules.len() < n - 1 {
        let i = rules.len();
        let action = if rng.below(10) == 0 { Action::Allow } else { Action::Drop };
        let kind = rng.below(100);
        let net = match kind {
            0..2 => IpNet::V4(Ipv4Net::new(bench_v4(&mut rng), 24).map_err(|e| e.to_string())?.trunc()),
            2..6 => IpNet::V4(Ipv4Net::new(bench_v4(&mut rng), 28).map_err(|e| e.to_string())?.trunc()),
            6..11 => {
                let len = [48, 64, 128][rng.below(3) as usize];
                last_v6 = Some(i);
                IpNet::V6(Ipv6Net::new(doc_v6(&mut rng), len).map_err(|e| e.to_string())?.trunc())
            }
            _ => IpNet::V4(Ipv4Net::from(bench_v4(&mut rng))),
        };
        rules.push(net_rule(i, net, rule_port(&mut rng), action));
    }
    // The last rule: a /32 and port that no earlier rule matches, so a flow to it hits it and
    // only it. Checked by the plain first-match loop; almost always the first candidate.
    for _ in 0..10_000 {
        let (addr, port) = (bench_v4(&mut rng), rule_port(&mut rng));
        let probe = lookup_flow(SocketAddr::new(IpAddr::V4(addr), port));
        if !rules.iter().any(|r| rule_matches(r, &probe)) {
            rules.push(net_rule(n - 1, IpNet::V4(Ipv4Net::from(addr)), port, Action::Drop));
            return Ok((RuleSet { rules, default_action: Action::Allow }, last_v6));
        }
    }
    Err("found no free address/port for the last rule".into())
}

/// An outbound TCP flow from a fixed local address to `remote`, as the engine would build it.
pub fn lookup_flow(remote: SocketAddr) -> Flow {
    let local: SocketAddr = match remote {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10)), 40_000),
        SocketAddr::V6(_) => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10)), 40_000)
        }
    };
    Flow {
        id: FlowId(1),
        protocol: Protocol::Tcp,
        direction: Direction::Outbound,
        local,
        remote,
        interface: Some(Arc::from("eth0")),
        existing: false,
        forwarded: false,
        started: Instant::ZERO,
        icmp: None,
        owner: None,
        host: None,
    }
}

/// A compiled rule set and the three flows the `classify` bench looks up in it.
pub struct ClassifyFixture {
    pub rules: CompiledRules,
    /// Hits the last rule (and no earlier one): every candidate list is scanned to its end.
    pub last_rule: Flow,
    /// Inside 198.18.0.0/15 but on port 443, which no rule names: the default action.
    pub no_match: Flow,
    /// Hits the last IPv6 rule of the set.
    pub ipv6: Flow,
    /// Time taken to generate the rules, and to compile them.
    pub generated_in: Duration,
    pub compiled_in: Duration,
    /// Heap bytes the generated rule set holds, and the bytes compiling adds on top of it (the
    /// index and the shared names); `None` unless [`heap::Counting`] is the global allocator.
    pub rules_heap: Option<i64>,
    pub index_heap: Option<i64>,
}

impl ClassifyFixture {
    /// Generates and compiles `n` rules and checks each lookup's expected outcome against the
    /// plain first-match loop.
    pub fn build(n: usize) -> Result<Self, String> {
        let heap_start = heap::live_bytes();
        let start = std::time::Instant::now();
        let (set, last_v6) = generate_rules(n, 0x9e37_79b9_7f4a_7c15)?;
        let generated_in = start.elapsed();
        let heap_rules = heap::live_bytes();
        let last = set.rules.len() - 1;
        let remote_of = |i: usize| -> Result<SocketAddr, String> {
            let r = &set.rules[i];
            let net = r.remote.first().ok_or_else(|| format!("rule {i} has no remote network"))?;
            let port = r.remote_ports.as_ref().and_then(|p| p.ranges().first()).map_or(0, |&(lo, _)| lo);
            Ok(SocketAddr::new(net.network(), port))
        };
        let last_rule = lookup_flow(remote_of(last)?);
        let v6_index = last_v6.ok_or("the rule set has no IPv6 rule")?;
        let ipv6 = lookup_flow(remote_of(v6_index)?);
        let mut rng = XorShift::new(0x0123_4567_89ab_cdef);
        let no_match = lookup_flow(SocketAddr::new(IpAddr::V4(bench_v4(&mut rng)), 443));

        let start = std::time::Instant::now();
        let rules = CompiledRules::compile(set);
        let compiled_in = start.elapsed();
        let heap_compiled = heap::live_bytes();
        let (rules_heap, index_heap) = if heap::counting() {
            (Some(heap_rules - heap_start), Some(heap_compiled - heap_rules))
        } else {
            (None, None)
        };
        let linear = |f: &Flow| rules.rules().iter().position(|r| rule_matches(r, f));
        for (name, flow, want) in
            [("last_rule", &last_rule, Some(last)), ("no_match", &no_match, None), ("ipv6", &ipv6, Some(v6_index))]
        {
            let (got, first) = (rules.classify(flow).rule, linear(flow));
            if got != want || first != want {
                return Err(format!(
                    "{n} rules, {name}: compiled says {got:?}, linear scan {first:?}, expected {want:?}"
                ));
            }
        }
        Ok(ClassifyFixture { rules, last_rule, no_match, ipv6, generated_in, compiled_in, rules_heap, index_heap })
    }

    /// How many rules have a remote network containing `flow`'s remote address: the rules the
    /// index files under prefixes covering it, which a lookup may have to check one by one.
    pub fn covering_rules(&self, flow: &Flow) -> usize {
        let ip = flow.remote.ip();
        self.rules.rules().iter().filter(|r| r.remote.iter().any(|n| n.contains(&ip))).count()
    }

    /// The lookups by name, in report order.
    pub fn lookups(&self) -> [(&'static str, &Flow); 3] {
        [("last_rule", &self.last_rule), ("no_match", &self.no_match), ("ipv6", &self.ipv6)]
    }
}

/// The shape of the synthetic capture.
#[derive(Copy, Clone, Debug)]
pub struct CaptureSpec {
    pub tcp_flows: usize,
    /// Data segments in each direction of each TCP flow.
    pub tcp_segments: usize,
    pub tcp_payload: usize,
    pub udp_flows: usize,
    /// Datagrams per UDP flow (alternating query and answer).
    pub udp_datagrams: usize,
    /// Flows in progress at once: packets of this many flows are interleaved.
    pub concurrency: usize,
    /// Time between consecutive packets.
    pub gap: Duration,
}

impl Default for CaptureSpec {
    fn default() -> Self {
        CaptureSpec {
            tcp_flows: 2_000,
            tcp_segments: 5,
            tcp_payload: 500,
            udp_flows: 1_000,
            udp_datagrams: 4,
            concurrency: 64,
            gap: Duration::from_micros(20),
        }
    }
}

/// What was written.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct CaptureInfo {
    pub packets: u64,
    pub flows: u64,
    /// Bytes of IP packets (the sum the pcap-read baseline computes).
    pub ip_bytes: u64,
}

/// 2026-11-23T00:00:00Z, the capture's first timestamp.
const CAPTURE_EPOCH: Duration = Duration::from_secs(1_795_392_000);

/// One IP packet of a flow, still to be serialized.
enum Seg {
    Tcp { c2s: bool, seq: u32, ack: Option<u32>, syn: bool, fin: bool, len: usize },
    Udp { c2s: bool, len: usize },
}

struct SynthFlow {
    client: SocketAddr,
    server: SocketAddr,
    segs: Vec<Seg>,
}

fn tcp_flow(spec: &CaptureSpec, k: usize, rng: &mut XorShift) -> SynthFlow {
    let client =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1 + (k % 250) as u8)), 10_000 + (k % 50_000) as u16);
    let server = SocketAddr::new(IpAddr::V4(bench_v4(rng)), if k.is_multiple_of(2) { 443 } else { 80 });
    let (mut c, mut s) = (rng.next_u32(), rng.next_u32());
    let mut segs = vec![Seg::Tcp { c2s: true, seq: c, ack: None, syn: true, fin: false, len: 0 }];
    c = c.wrapping_add(1);
    segs.push(Seg::Tcp { c2s: false, seq: s, ack: Some(c), syn: true, fin: false, len: 0 });
    s = s.wrapping_add(1);
    segs.push(Seg::Tcp { c2s: true, seq: c, ack: Some(s), syn: false, fin: false, len: 0 });
    let len = spec.tcp_payload;
    for _ in 0..spec.tcp_segments {
        segs.push(Seg::Tcp { c2s: true, seq: c, ack: Some(s), syn: false, fin: false, len });
        c = c.wrapping_add(len as u32);
        segs.push(Seg::Tcp { c2s: false, seq: s, ack: Some(c), syn: false, fin: false, len });
        s = s.wrapping_add(len as u32);
    }
    segs.push(Seg::Tcp { c2s: true, seq: c, ack: Some(s), syn: false, fin: true, len: 0 });
    c = c.wrapping_add(1);
    segs.push(Seg::Tcp { c2s: false, seq: s, ack: Some(c), syn: false, fin: true, len: 0 });
    s = s.wrapping_add(1);
    segs.push(Seg::Tcp { c2s: true, seq: c, ack: Some(s), syn: false, fin: false, len: 0 });
    SynthFlow { client, server, segs }
}

fn udp_flow(spec: &CaptureSpec, k: usize, rng: &mut XorShift) -> SynthFlow {
    let client =
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1 + (k % 250) as u8)), 20_000 + (k % 40_000) as u16);
    let server = SocketAddr::new(IpAddr::V4(bench_v4(rng)), 53);
    let segs = (0..spec.udp_datagrams)
        .map(|d| Seg::Udp { c2s: d.is_multiple_of(2), len: if d.is_multiple_of(2) { 48 } else { 160 } })
        .collect();
    SynthFlow { client, server, segs }
}

fn v4(a: SocketAddr) -> io::Result<[u8; 4]> {
    match a.ip() {
        IpAddr::V4(a) => Ok(a.octets()),
        IpAddr::V6(_) => Err(io::Error::other("synthetic flows are IPv4")),
    }
}

fn serialize(flow: &SynthFlow, seg: &Seg, payload: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    let (c, s) = (flow.client, flow.server);
    let (c2s, len) = match *seg {
        Seg::Tcp { c2s, len, .. } | Seg::Udp { c2s, len } => (c2s, len),
    };
    let (src, dst) = if c2s { (c, s) } else { (s, c) };
    let ip = PacketBuilder::ipv4(v4(src)?, v4(dst)?, 64);
    let payload = payload.get(..len).ok_or_else(|| io::Error::other("payload larger than the buffer"))?;
    match *seg {
        Seg::Tcp { seq, ack, syn, fin, .. } => {
            let mut b = ip.tcp(src.port(), dst.port(), seq, 64_240);
            if syn {
                b = b.syn();
            }
            if fin {
                b = b.fin();
            }
            if let Some(a) = ack {
                b = b.ack(a);
            }
            if len > 0 {
                b = b.psh();
            }
            b.write(out, payload).map_err(|e| io::Error::other(e.to_string()))
        }
        Seg::Udp { .. } => {
            ip.udp(src.port(), dst.port()).write(out, payload).map_err(|e| io::Error::other(e.to_string()))
        }
    }
}

/// Writes the synthetic capture to `path`: raw-IP pcap (LINKTYPE_RAW), TCP and UDP flows between
/// 198.51.100.0/24 (clients) and 198.18.0.0/15 (servers), `spec.concurrency` flows interleaved
/// at a time, timestamps increasing by `spec.gap` from 2026-11-23T00:00:00Z.
pub fn write_capture(path: &Path, spec: &CaptureSpec) -> io::Result<CaptureInfo> {
    let mut rng = XorShift::new(0x5eed_0ff1_0e6a_7e00);
    // One UDP flow after every two TCP flows while both last, so both kinds are spread out.
    let total = spec.tcp_flows + spec.udp_flows;
    let mut flows = Vec::with_capacity(total);
    let (mut t, mut u) = (0, 0);
    for i in 0..total {
        let udp = t >= spec.tcp_flows || (u < spec.udp_flows && i % 3 == 2);
        if udp {
            flows.push(udp_flow(spec, u, &mut rng));
            u += 1;
        } else {
            flows.push(tcp_flow(spec, t, &mut rng));
            t += 1;
        }
    }

    let header = PcapHeader { datalink: DataLink::RAW, endianness: Endianness::native(), ..Default::default() };
    let mut writer = PcapWriter::with_header(BufWriter::new(File::create(path)?), header).map_err(io::Error::other)?;
    let payload: Vec<u8> = (0..spec.tcp_payload.max(160)).map(|i| (i % 251) as u8).collect();
    let mut buf = Vec::with_capacity(1600);
    let mut info = CaptureInfo { packets: 0, flows: total as u64, ip_bytes: 0 };
    let mut time = CAPTURE_EPOCH;
    for window in flows.chunks(spec.concurrency.max(1)) {
        // Round-robin over the window: each flow's packets stay in order, flows overlap.
        let longest = window.iter().map(|f| f.segs.len()).max().unwrap_or(0);
        for step in 0..longest {
            for flow in window {
                let Some(seg) = flow.segs.get(step) else {
                    continue;
                };
                serialize(flow, seg, &payload, &mut buf)?;
                let len = u32::try_from(buf.len()).map_err(io::Error::other)?;
                writer.write_packet(&PcapPacket::new(time, len, &buf)).map_err(io::Error::other)?;
                info.packets += 1;
                info.ip_bytes += u64::from(len);
                time += spec.gap;
            }
        }
    }
    writer.into_writer().flush()?;
    Ok(info)
}

/// A file under the system temp dir with a name unique to this process, removed on drop.
#[derive(Debug)]
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(stem: &str, ext: &str) -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        TempFile(std::env::temp_dir().join(format!("{stem}-{}-{nanos}.{ext}", std::process::id())))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_lookups_hit_what_they_claim() {
        for n in [100, 10_000] {
            let f = ClassifyFixture::build(n).expect("fixture");
            assert_eq!(f.rules.rules().len(), n);
            assert_eq!(f.rules.classify(&f.last_rule).rule, Some(n - 1));
            assert_eq!(f.rules.classify(&f.no_match).rule, None);
        }
    }

    #[test]
    fn capture_replays_cleanly() {
        let spec = CaptureSpec { tcp_flows: 20, udp_flows: 10, ..CaptureSpec::default() };
        let tmp = TempFile::new("flowgate-bench-test", "pcap");
        let info = write_capture(tmp.path(), &spec).expect("capture");
        assert_eq!(info.packets, 20 * 16 + 10 * 4);
        let mut engine = flowgate::cli::replay_engine(None);
        let s = flowgate::replay::replay(&mut engine, tmp.path(), &mut io::sink()).expect("replay");
        assert_eq!(s.frames, info.packets);
        assert_eq!(s.non_ip_frames + s.engine.malformed + s.engine.truncated, 0);
        assert_eq!(s.engine.flows_opened, 30);
    }
}
