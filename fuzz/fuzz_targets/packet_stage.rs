//! The packet stage (`flowgate_core::PacketStage`) as a state machine, next to a model of it
//! written from its documentation: packets of a few interfaces and directions (raw bytes of any
//! length and content, or IPv4/IPv6 TCP/UDP/ICMP packets built with etherparse, some cut short
//! or with a broken IPv6 extension header chain), judged by stateless packet rules and a
//! product's `PacketFilter` whose verdicts the input scripts (allow, drop, delay, panic, a call
//! over its time budget, one just at it, a release through the `PacketHandle` from inside the
//! call); releases through the handle (of held ids, or of ids that may never have been held),
//! time passing, `handle_timeout`, rules and filter coverage replaced through the handle or
//! directly, `release_all`.
//!
//! Input: four settings bytes (`max_delayed` 0 to 64, `max_delay` 0 to 60 s, `expired_accept`,
//! the fail mode, a stopwatch or none, a filter or none, the first packet id and the id step, the
//! interface globs and directions the filter covers), a rule set (count byte, then three bytes a
//! rule: interface glob, directions, protocol, action, remote and local networks from fixed
//! lists), then operations (see `Harness::op`).
//!
//! Checked after every operation, against the model: each packet's action (first matching rule;
//! a packet whose protocol or addresses cannot be read matches every drop rule whose other fields
//! match and no allow rule that names them; else the filter for the interfaces and directions it
//! covers, with its id, interface, direction and exact bytes; else accept; a delay past
//! `max_delayed` drops; a filter that panics or runs over its budget gives the fail mode's
//! verdict and is reported as a fault); no panic escapes (the scripted ones are caught by the
//! stage); every `Hold` id is new and comes back exactly once through `poll_release`, in the
//! model's order and with the model's verdict (a handle's release, or expiry with
//! `expired_accept` once `max_delay` has passed, which `handle_timeout` and `handle_packet` never
//! miss), and at the end through `release_all`; no release of an id that was not held;
//! `delayed_now` never exceeds `max_delayed`; the totals (`packets == accepted + dropped +
//! delayed`, and every counter of `stats()`), the per-interface counters (their sums are the
//! totals) and the per-rule hits are the model's; commands sent through the handle wake the
//! driver once each and apply in order (at most 16 before a packet, all in `handle_timeout`);
//! `poll_timeout` is never later than the oldest delay's deadline. And from the stage's own rule
//! hits, without the model: a packet with no readable IP header that an applicable drop rule
//! covers in its direction is taken by a rule, and never by an allow rule that names a protocol
//! or networks.
#![no_main]

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use etherparse::{LaxIpSlice, PacketBuilder};
use flowgate_core::packet_stage::{
    Directions, InterfaceCounters, OTHER_INTERFACES, PacketRule, PacketRuleAction, PacketRules, PacketStageStats,
};
use flowgate_core::rules::{InterfaceGlob, ProtocolMatch, parse_interface, parse_network};
use flowgate_core::{
    FaultKind, Instant, PacketAction, PacketContext, PacketDirection, PacketFilter, PacketHandle, PacketId,
    PacketStage, PacketStageConfig, PacketVerdict, Protocol,
};
use flowgate_fuzz::Input;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

/// Interface globs of rules and of the filter's coverage.
const GLOBS: [&str; 6] = ["tun*", "wg0", "*", "eth?", "tun0", "l?"];
/// Interfaces packets come from (`None`: unknown).
const INTERFACES: [Option<&str>; 6] = [None, Some("tun0"), Some("tun1"), Some("wg0"), Some("eth0"), Some("lo")];
const NETWORKS: [&str; 8] = [
    "192.0.2.0/24",
    "198.51.100.0/24",
    "10.0.0.0/8",
    "203.0.113.53/32",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
];
const HOSTS_V4: [[u8; 4]; 4] = [[192, 0, 2, 9], [198, 51, 100, 1], [10, 9, 0, 2], [203, 0, 113, 53]];
const HOSTS_V6: [[u8; 16]; 4] = [
    [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3],
    [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
];
const PORTS: [u16; 4] = [53, 443, 40000, 51820];
const PROTOCOLS: [ProtocolMatch; 5] = [
    ProtocolMatch::Any,
    ProtocolMatch::Only(Protocol::Tcp),
    ProtocolMatch::Only(Protocol::Udp),
    ProtocolMatch::Only(Protocol::Icmp),
    ProtocolMatch::Only(Protocol::Other(47)),
];
const MAX_DELAYED: [usize; 8] = [0, 1, 2, 3, 4, 8, 16, 64];
const MAX_DELAY_MS: [u64; 8] = [0, 1, 10, 100, 500, 1_000, 10_000, 60_000];
/// The filter's time budget.
const BUDGET: Duration = Duration::from_millis(100);
/// What the scripted filter panics with; the panic hook keeps quiet about it (and does not abort).
const PANIC: &str = "scripted packet filter panic";
const DIRECTIONS: [PacketDirection; 3] = PacketDirection::ALL;

fn glob(text: &str) -> InterfaceGlob {
    parse_interface(text).expect("fuzz glob")
}

fn directions(bits: u8) -> Directions {
    if bits & 7 == 0 {
        return Directions::ALL;
    }
    DIRECTIONS.iter().enumerate().filter(|(i, _)| bits & (1 << i) != 0).fold(Directions::NONE, |s, (_, d)| s.with(*d))
}

/// A list of networks from a nibble: none (0, 1), one (2 to 9), two (10 to 15).
fn networks(k: u8) -> Vec<IpNet> {
    let net = |i: u8| parse_network(NETWORKS[usize::from(i) % NETWORKS.len()]).expect("fuzz network");
    match k {
        0 | 1 => Vec::new(),
        2..=9 => vec![net(k - 2)],
        _ => vec![net(k), net(k + 3)],
    }
}

fn read_rules(input: &mut Input<'_>) -> Arc<PacketRules> {
    let n = usize::from(input.u8() % 5);
    let rules = (0..n)
        .map(|k| {
            let (a, b, c) = (input.u8(), input.u8(), input.u8());
            let action = if b & 0x80 != 0 { PacketRuleAction::Drop } else { PacketRuleAction::Allow };
            let mut r = PacketRule::new(format!("r{k}"), action);
            r.interface = match usize::from(a & 7) {
                0 | 7 => None,
                i => Some(glob(GLOBS[i - 1])),
            };
            r.directions = directions(a >> 3);
            r.protocol = PROTOCOLS[usize::from(b & 0x7f) % PROTOCOLS.len()];
            r.remote = networks(c & 15);
            r.local = networks(c >> 4);
            r
        })
        .collect();
    Arc::new(PacketRules { rules })
}

fn coverage(mask: u8, dirs: u8) -> (Vec<InterfaceGlob>, Directions) {
    let globs = GLOBS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, g)| glob(g)).collect();
    (globs, directions(dirs))
}

/// What the stage reads of a packet, as its documentation says: etherparse's lax IP slice.
#[derive(Default)]
struct Facts {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    protocol: Option<Protocol>,
    unparsable: bool,
}

fn facts(bytes: &[u8]) -> Facts {
    match LaxIpSlice::from_slice(bytes) {
        Ok((ip, ext_error)) => Facts {
            src: Some(ip.source_addr()),
            dst: Some(ip.destination_addr()),
            protocol: ext_error.is_none().then(|| match ip.payload_ip_number().0 {
                6 => Protocol::Tcp,
                17 => Protocol::Udp,
                1 | 58 => Protocol::Icmp,
                n => Protocol::Other(n),
            }),
            unparsable: ext_error.is_some(),
        },
        Err(_) => Facts { unparsable: true, ..Facts::default() },
    }
}

/// Whether `rule` matches a packet going `d` with these facts (its interface already matched).
fn rule_matches(rule: &PacketRule, d: PacketDirection, f: &Facts) -> bool {
    if !rule.directions.contains(d) {
        return false;
    }
    // What cannot be read matches a drop rule and no allow rule.
    let unknown = rule.action == PacketRuleAction::Drop;
    let protocol_ok = match rule.protocol {
        ProtocolMatch::Any => true,
        ProtocolMatch::Only(p) => f.protocol.map_or(unknown, |q| q == p),
    };
    // The far end: the source of inbound packets, the destination of outbound ones, either
    // address of a forwarded one; this host's end the other way round.
    let (remote, local) = match d {
        PacketDirection::Inbound => ([f.src, None], [f.dst, None]),
        PacketDirection::Outbound => ([f.dst, None], [f.src, None]),
        PacketDirection::Forwarded => ([f.src, f.dst], [f.src, f.dst]),
    };
    let ends = |nets: &[IpNet], addrs: [Option<IpAddr>; 2]| {
        if nets.is_empty() {
            true
        } else if addrs.iter().all(Option::is_none) {
            unknown
        } else {
            addrs.iter().flatten().any(|a| nets.iter().any(|n| n.contains(a)))
        }
    };
    protocol_ok && ends(&rule.remote, remote) && ends(&rule.local, local)
}

/// A command sent through the handle, not yet applied by the stage.
enum Cmd {
    Release(PacketId, bool),
    Rules(Arc<PacketRules>),
    Coverage(Vec<InterfaceGlob>, Directions),
}

/// What the filter is told to do on its next call, and what it saw.
#[derive(Default)]
struct Script {
    verdict: u8,
    /// Release this packet through the handle from inside the call.
    release: Option<(PacketId, bool)>,
    sent: bool,
    calls: Vec<(PacketId, Option<String>, PacketDirection, Vec<u8>)>,
}

struct Filter {
    script: Arc<Mutex<Script>>,
    clock: Arc<AtomicU64>,
    handle: PacketHandle,
}

impl PacketFilter for Filter {
    fn packet(&mut self, ctx: &PacketContext<'_>) -> PacketVerdict {
        let (verdict, release) = {
            let mut s = self.script.lock().unwrap();
            s.calls.push((ctx.id, ctx.interface.map(str::to_owned), ctx.direction, ctx.bytes.to_vec()));
            (s.verdict, s.release.take())
        };
        if let Some((id, accept)) = release {
            let sent = self.handle.release(id, accept).is_ok();
            self.script.lock().unwrap().sent = sent;
        }
        let budget = u64::try_from(BUDGET.as_micros()).unwrap();
        match verdict % 8 {
            0 | 1 => PacketVerdict::Allow,
            2 => PacketVerdict::Drop,
            3 | 4 => PacketVerdict::Delay,
            5 => std::panic::panic_any(PANIC),
            6 => {
                // Over budget: the delay must not be honoured (when a stopwatch times it).
                self.clock.fetch_add(budget + 1, Ordering::SeqCst);
                PacketVerdict::Delay
            }
            _ => {
                // Just at the budget: no fault.
                self.clock.fetch_add(budget, Ordering::SeqCst);
                PacketVerdict::Allow
            }
        }
    }

    fn name(&self) -> &str {
        "fuzz"
    }
}

/// The stage as its documentation describes it.
struct Model {
    config: PacketStageConfig,
    filter: bool,
    stopwatch: bool,
    rules: Arc<PacketRules>,
    hits: Vec<(u64, u64)>,
    /// Delayed packets and their deadlines, in delay order.
    held: VecDeque<(PacketId, Instant)>,
    next_id: u64,
    pending: VecDeque<Cmd>,
    /// Releases the stage must hand out next, in order.
    expected: VecDeque<(PacketId, bool)>,
    stats: PacketStageStats,
    /// Interfaces by name in order of first sight, with counters per direction.
    interfaces: Vec<(String, [InterfaceCounters; 3])>,
    faults: VecDeque<FaultKind>,
}

/// What the model expects of one packet.
struct Expected {
    action: PacketAction,
    /// The filter is called with this id.
    call: Option<PacketId>,
    /// The release the filter is to send from inside its call.
    release: Option<(PacketId, bool)>,
}

impl Model {
    fn apply_commands(&mut self, budget: usize) {
        for _ in 0..budget {
            let Some(c) = self.pending.pop_front() else { return };
            match c {
                Cmd::Release(id, accept) => {
                    if let Some(i) = self.held.iter().position(|(h, _)| *h == id) {
                        self.held.remove(i);
                        self.stats.released += 1;
                        self.expected.push_back((id, accept));
                    }
                }
                Cmd::Rules(r) => self.set_rules(r),
                Cmd::Coverage(globs, dirs) => {
                    self.config.filter_interfaces = globs;
                    self.config.filter_directions = dirs;
                }
            }
        }
    }

    fn set_rules(&mut self, rules: Arc<PacketRules>) {
        self.hits = vec![(0, 0); rules.rules.len()];
        self.rules = rules;
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(id, deadline)) = self.held.front() {
            if deadline > now {
                break;
            }
            self.held.pop_front();
            self.stats.delay_expired += 1;
            self.expected.push_back((id, self.config.expired_accept));
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.apply_commands(4096);
        self.expire(now);
    }

    fn packet(
        &mut self,
        now: Instant,
        interface: Option<&str>,
        d: PacketDirection,
        bytes: &[u8],
        verdict: u8,
    ) -> Expected {
        self.apply_commands(16);
        self.expire(now);
        let name = interface.unwrap_or(OTHER_INTERFACES);
        let i = match self.interfaces.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                self.interfaces.push((name.to_string(), Default::default()));
                self.interfaces.len() - 1
            }
        };
        let len = bytes.len() as u64;
        self.stats.packets += 1;
        self.stats.bytes += len;
        let di = DIRECTIONS.iter().position(|x| *x == d).unwrap();
        self.interfaces[i].1[di].packets += 1;
        self.interfaces[i].1[di].bytes += len;

        let applies = |r: &PacketRule| r.interface.as_ref().is_none_or(|g| interface.is_some_and(|n| g.matches(n)));
        let mut decided = None;
        if self.rules.rules.iter().any(applies) {
            let f = facts(bytes);
            if f.unparsable {
                self.stats.unparsable += 1;
            }
            for (k, r) in self.rules.rules.iter().enumerate() {
                if applies(r) && rule_matches(r, d, &f) {
                    self.hits[k].0 += 1;
                    self.hits[k].1 += len;
                    decided = Some(r.action);
                    break;
                }
            }
        }
        let covered = interface.is_some_and(|n| self.config.filter_interfaces.iter().any(|g| g.matches(n)))
            && self.config.filter_directions.contains(d);
        let mut call = None;
        let mut release = None;
        let action = match decided {
            Some(PacketRuleAction::Drop) => PacketAction::Drop,
            Some(PacketRuleAction::Allow) => PacketAction::Accept,
            None if covered => {
                let id = PacketId(self.next_id);
                self.next_id += self.config.packet_id_step.max(1);
                let fail = if self.config.fail_open { PacketAction::Accept } else { PacketAction::Drop };
                if !self.filter {
                    PacketAction::Accept
                } else {
                    call = Some(id);
                    if verdict & 0x80 != 0 {
                        let target = self.held.front().map_or(PacketId(u64::from(verdict & 0x3f)), |(h, _)| *h);
                        release = Some((target, verdict & 0x40 != 0));
                    }
                    let fault = match verdict % 8 {
                        5 => Some(FaultKind::Panic(PANIC.to_string())),
                        6 if self.stopwatch => Some(FaultKind::Slow(BUDGET + Duration::from_micros(1))),
                        _ => None,
                    };
                    if let Some(kind) = fault {
                        self.stats.provider_faults += 1;
                        self.faults.push_back(kind);
                        fail
                    } else {
                        match verdict % 8 {
                            0 | 1 | 7 => PacketAction::Accept,
                            2 => PacketAction::Drop,
                            _ => {
                                if self.held.len() >= self.config.max_delayed {
                                    self.stats.delay_overflow += 1;
                                    PacketAction::Drop
                                } else {
                                    self.held.push_back((id, now + self.config.max_delay));
                                    self.stats.delayed += 1;
                                    PacketAction::Hold(id)
                                }
                            }
                        }
                    }
                }
            }
            None => PacketAction::Accept,
        };
        match action {
            PacketAction::Accept => self.stats.accepted += 1,
            PacketAction::Drop => {
                self.stats.dropped += 1;
                self.interfaces[i].1[di].dropped += 1;
            }
            PacketAction::Hold(_) => self.interfaces[i].1[di].delayed += 1,
        }
        Expected { action, call, release }
    }

    /// Ends every delay; returns the ids that were delayed.
    fn release_all(&mut self) -> HashSet<u64> {
        self.held.drain(..).map(|(id, _)| id.0).collect()
    }
}

struct Harness {
    stage: PacketStage,
    handle: PacketHandle,
    model: Model,
    script: Arc<Mutex<Script>>,
    now: Instant,
    /// Every id ever held, and every id released.
    held_ever: HashSet<u64>,
    released: HashSet<u64>,
    /// Commands sent through the handle, and wake-ups seen.
    sent: usize,
    woken: Arc<AtomicUsize>,
    end_accept: bool,
}

impl Harness {
    fn new(input: &mut Input<'_>) -> Harness {
        let (c0, c1, c2, c3) = (input.u8(), input.u8(), input.u8(), input.u8());
        let (filter_interfaces, filter_directions) = coverage(c2, c3);
        let config = PacketStageConfig {
            filter_interfaces,
            filter_directions,
            max_delayed: MAX_DELAYED[usize::from(c0 & 7)],
            max_delay: Duration::from_millis(MAX_DELAY_MS[usize::from(c1 & 7)]),
            expired_accept: c0 & 0x08 != 0,
            fail_open: c0 & 0x10 != 0,
            provider_budget: BUDGET,
            first_packet_id: u64::from(c1 >> 3 & 3),
            packet_id_step: u64::from(c1 >> 5 & 3),
        };
        let rules = read_rules(input);
        let mut stage = PacketStage::new(config.clone(), rules.clone());
        let handle = stage.handle();
        let script = Arc::new(Mutex::new(Script::default()));
        let clock = Arc::new(AtomicU64::new(0));
        let stopwatch = c0 & 0x20 != 0;
        if stopwatch {
            let c = clock.clone();
            stage.set_stopwatch(move || Duration::from_micros(c.load(Ordering::SeqCst)));
        }
        let filter = c0 & 0x40 == 0;
        if filter {
            stage.set_filter(Box::new(Filter { script: script.clone(), clock, handle: handle.clone() }));
        }
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        stage.set_waker(move || {
            w.fetch_add(1, Ordering::SeqCst);
        });
        let model = Model {
            next_id: config.first_packet_id.max(1),
            hits: vec![(0, 0); rules.rules.len()],
            config,
            filter,
            stopwatch,
            rules,
            held: VecDeque::new(),
            pending: VecDeque::new(),
            expected: VecDeque::new(),
            stats: PacketStageStats::default(),
            interfaces: Vec::new(),
            faults: VecDeque::new(),
        };
        Harness {
            stage,
            handle,
            model,
            script,
            now: Instant::from_micros(1_700_000_000_000_000),
            held_ever: HashSet::new(),
            released: HashSet::new(),
            sent: 0,
            woken,
            end_accept: c0 & 0x80 != 0,
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now + Duration::from_millis(ms);
    }

    fn send(&mut self, c: Cmd) {
        let ok = match &c {
            Cmd::Release(id, accept) => self.handle.release(*id, *accept),
            Cmd::Rules(r) => self.handle.set_rules(r.clone()),
            Cmd::Coverage(g, d) => self.handle.set_filter_coverage(g.clone(), *d),
        };
        ok.expect("the stage is alive and its channel holds 65536 commands");
        self.sent += 1;
        self.model.pending.push_back(c);
    }

    fn packet(&mut self, meta: u8, verdict: u8, bytes: &[u8]) {
        let interface = INTERFACES[usize::from(meta & 7) % INTERFACES.len()];
        let d = DIRECTIONS[usize::from(meta >> 3) % 3];
        let want = self.model.packet(self.now, interface, d, bytes, verdict);
        {
            let mut s = self.script.lock().unwrap();
            s.verdict = verdict;
            s.release = want.release;
            s.sent = false;
            s.calls.clear();
        }
        let rules = self.stage.rules().clone();
        let hits: Vec<u64> = self.stage.rule_hits().iter().map(|h| h.packets).collect();
        let got = self.stage.handle_packet(self.now, interface, d, bytes);
        if Arc::ptr_eq(&rules, self.stage.rules()) {
            self.unreadable(&rules, &hits, interface, d, bytes, got);
        }
        let (calls, sent) = {
            let mut s = self.script.lock().unwrap();
            (std::mem::take(&mut s.calls), s.sent)
        };
        match want.call {
            Some(id) => {
                assert_eq!(calls.len(), 1, "the filter is asked once about {id:?} ({interface:?}, {d:?})");
                let (cid, ci, cd, cb) = &calls[0];
                assert_eq!(*cid, id, "packet ids: first, then first + step, ...");
                assert_eq!(ci.as_deref(), interface);
                assert_eq!(*cd, d);
                assert!(cb == bytes, "the filter sees the packet's exact bytes");
            }
            None => assert!(calls.is_empty(), "the filter was asked about a packet it does not cover: {calls:?}"),
        }
        assert_eq!(got, want.action, "action for {interface:?} {d:?} {bytes:02x?}");
        if let PacketAction::Hold(id) = got {
            assert!(self.held_ever.insert(id.0), "hold id {id:?} reused");
        }
        if let Some((id, accept)) = want.release {
            assert!(sent, "the filter's release of {id:?} was refused");
            self.sent += 1;
            self.model.pending.push_back(Cmd::Release(id, accept));
        }
    }

    /// Checked on the stage alone (its rule hits say which rule took the packet), not through
    /// the model: a packet with nothing readable (no IP header) that an applicable drop rule
    /// covers in its direction is taken by a rule, and never let through by an allow rule that
    /// names a protocol or networks.
    fn unreadable(
        &self,
        rules: &PacketRules,
        before: &[u64],
        interface: Option<&str>,
        d: PacketDirection,
        bytes: &[u8],
        got: PacketAction,
    ) {
        if LaxIpSlice::from_slice(bytes).is_ok() {
            return;
        }
        let after = self.stage.rule_hits();
        let hit = after.iter().zip(before).position(|(h, b)| h.packets != *b);
        let applies = |r: &PacketRule| {
            r.directions.contains(d) && r.interface.as_ref().is_none_or(|g| interface.is_some_and(|n| g.matches(n)))
        };
        let dropping = rules.rules.iter().any(|r| r.action == PacketRuleAction::Drop && applies(r));
        match hit.map(|k| &rules.rules[k]) {
            None => assert!(!dropping, "an unreadable packet passed by a drop rule: {bytes:02x?}"),
            Some(r) if r.action == PacketRuleAction::Allow => {
                assert!(
                    r.protocol == ProtocolMatch::Any && r.remote.is_empty() && r.local.is_empty(),
                    "an unreadable packet let through by {r:?}: {bytes:02x?}"
                );
                assert_eq!(got, PacketAction::Accept);
            }
            Some(_) => assert_eq!(got, PacketAction::Drop),
        }
    }

    /// A packet built from a description: family, protocol, hosts, ports, payload, how it is
    /// damaged.
    fn built(&mut self, input: &mut Input<'_>) {
        let (meta, verdict, dt, shape, hosts, extra) =
            (input.u8(), input.u8(), input.u8(), input.u8(), input.u8(), input.u8());
        self.advance(u64::from(dt));
        let v6 = shape & 1 != 0;
        let (s, d) = (usize::from(hosts & 3), usize::from(hosts >> 2 & 3));
        let (sp, dp) = (PORTS[usize::from(hosts >> 4 & 3)], PORTS[usize::from(hosts >> 6)]);
        let builder = if v6 {
            PacketBuilder::ipv6(HOSTS_V6[s], HOSTS_V6[d], 64)
        } else {
            PacketBuilder::ipv4(HOSTS_V4[s], HOSTS_V4[d], 64)
        };
        let payload: Vec<u8> = (0..extra % 64).collect();
        let mut out = Vec::new();
        let kind = shape >> 1 & 7;
        let written = match kind {
            0 | 6 => {
                let mut t = builder.tcp(sp, dp, u32::from(extra) << 8, 65535);
                if kind == 6 {
                    t = t.syn();
                }
                t.write(&mut out, &payload)
            }
            1 | 4 | 5 => builder.udp(sp, dp).write(&mut out, &payload),
            2 | 3 => match (v6, kind == 2) {
                (true, true) => builder.icmpv6_echo_request(sp, dp).write(&mut out, &payload),
                (true, false) => builder.icmpv6_echo_reply(sp, dp).write(&mut out, &payload),
                (false, true) => builder.icmpv4_echo_request(sp, dp).write(&mut out, &payload),
                (false, false) => builder.icmpv4_echo_reply(sp, dp).write(&mut out, &payload),
            },
            _ => builder.udp(sp, dp).write(&mut out, &payload),
        };
        if written.is_err() {
            return;
        }
        match kind {
            // Another protocol (GRE) in the IP header.
            4 => out[if v6 { 6 } else { 9 }] = 47,
            // IPv6: the next header says hop-by-hop options, which the payload is not (the
            // protocol cannot be read); IPv4: a header length past the packet.
            5 => {
                if v6 {
                    out[6] = 0;
                    out.truncate(42);
                } else {
                    out[0] = 0x4f;
                    out.truncate(30);
                }
            }
            _ => {}
        }
        // Cut off: 0 (whole), or that many times 7 bytes.
        let cut = usize::from(shape >> 4) * 7;
        out.truncate(out.len().saturating_sub(cut));
        self.packet(meta, verdict, &out);
    }

    fn handle_timeout(&mut self) {
        self.model.handle_timeout(self.now);
        self.stage.handle_timeout(self.now);
    }

    /// The held ids, oldest first.
    fn held(&self) -> Vec<PacketId> {
        self.model.held.iter().map(|(id, _)| *id).collect()
    }

    fn op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 12 {
            0 => {
                let (meta, verdict, dt) = (input.u8(), input.u8(), input.u8());
                self.advance(u64::from(dt));
                let bytes = input.chunk();
                self.packet(meta, verdict, &bytes[..bytes.len().min(2048)]);
            }
            1..=3 => self.built(input),
            4 => self.advance(u64::from(input.u16())),
            5 => {
                self.advance(u64::from(input.u8()));
                self.handle_timeout();
            }
            6 => {
                let (which, accept) = (input.u8(), input.bool());
                let held = self.held();
                let id = if which & 0x80 != 0 || held.is_empty() {
                    // An id that may never have been held, or was released already.
                    PacketId(u64::from(which & 0x3f))
                } else {
                    held[usize::from(which) % held.len()]
                };
                self.send(Cmd::Release(id, accept));
                if which & 0x40 != 0 {
                    self.handle_timeout();
                }
            }
            7 => {
                let rules = read_rules(input);
                self.send(Cmd::Rules(rules));
            }
            8 => {
                let rules = read_rules(input);
                self.model.set_rules(rules.clone());
                self.stage.set_rules(rules);
            }
            9 => {
                let (mask, dirs) = (input.u8(), input.u8());
                let (globs, directions) = coverage(mask, dirs);
                if dirs & 0x80 != 0 {
                    self.model.config.filter_interfaces = globs.clone();
                    self.model.config.filter_directions = directions;
                    self.stage.set_filter_coverage(globs, directions);
                } else {
                    self.send(Cmd::Coverage(globs, directions));
                }
            }
            10 => {
                let accept = input.bool();
                self.release_all(accept);
            }
            _ => {
                // A driver's loop: sleep until the stage's next deadline, then call it.
                if let Some(t) = self.stage.poll_timeout() {
                    self.now = self.now.max(t);
                }
                self.handle_timeout();
            }
        }
        self.check();
    }

    /// Ends every delay; the releases may come in any order.
    fn release_all(&mut self, accept: bool) {
        self.drain();
        let want = self.model.release_all();
        self.stage.release_all(accept);
        let mut got = HashSet::new();
        while let Some((id, a)) = self.stage.poll_release() {
            assert_eq!(a, accept, "release_all({accept}) gave {id:?} {a}");
            assert!(got.insert(id.0), "{id:?} released twice by release_all");
            self.record_release(id);
        }
        assert_eq!(got, want, "release_all releases exactly the delayed packets");
        assert_eq!(self.stage.poll_timeout(), None, "nothing delayed after release_all");
    }

    fn record_release(&mut self, id: PacketId) {
        assert!(self.held_ever.contains(&id.0), "release of {id:?}, which was never held");
        assert!(self.released.insert(id.0), "second release of {id:?}");
    }

    /// Polls releases and faults, comparing them with the model's.
    fn drain(&mut self) {
        while let Some((id, accept)) = self.stage.poll_release() {
            self.record_release(id);
            let want = self.model.expected.pop_front();
            assert_eq!(Some((id, accept)), want, "releases in the model's order, with its verdicts");
        }
        assert!(self.model.expected.is_empty(), "releases the stage did not hand out: {:?}", self.model.expected);
        while let Some(f) = self.stage.poll_fault() {
            assert_eq!((f.provider.as_str(), f.call, f.flow), ("fuzz", "packet", None));
            assert_eq!(Some(f.kind), self.model.faults.pop_front(), "faults in order");
        }
        assert!(self.model.faults.is_empty(), "faults not reported: {:?}", self.model.faults);
    }

    fn check(&mut self) {
        self.drain();
        let s = self.stage.stats();
        assert_eq!(s.delayed_now as usize, self.model.held.len(), "{s:?}");
        assert!(s.delayed_now as usize <= self.model.config.max_delayed, "{s:?}");
        assert_eq!(s.packets, s.accepted + s.dropped + s.delayed, "{s:?}");
        assert_eq!(s, PacketStageStats { delayed_now: s.delayed_now, ..self.model.stats }, "stats against the model");
        if let Some(&(_, first)) = self.model.held.front() {
            let t = self.stage.poll_timeout();
            assert!(t.is_some_and(|t| t <= first), "poll_timeout {t:?} after the oldest delay's deadline {first:?}");
        }
        let by_interface = self.stage.interface_stats();
        let sum = |f: fn(&InterfaceCounters) -> u64| by_interface.iter().map(|i| f(&i.counters)).sum::<u64>();
        assert_eq!(sum(|c| c.packets), s.packets, "per-interface packets add up to the total");
        assert_eq!(sum(|c| c.bytes), s.bytes);
        assert_eq!(sum(|c| c.dropped), s.dropped);
        assert_eq!(sum(|c| c.delayed), s.delayed);
        let got: Vec<_> = by_interface.iter().map(|i| (i.name.to_string(), i.direction, i.counters)).collect();
        let want: Vec<_> = self
            .model
            .interfaces
            .iter()
            .flat_map(|(n, c)| DIRECTIONS.iter().enumerate().map(move |(k, d)| (n.clone(), *d, c[k])))
            .filter(|(_, _, c)| c.packets > 0)
            .collect();
        assert_eq!(got, want, "per-interface counters");
        assert!(Arc::ptr_eq(self.stage.rules(), &self.model.rules), "the rules in force are the model's");
        let hits: Vec<_> = self.stage.rule_hits().iter().map(|h| (h.packets, h.bytes)).collect();
        assert_eq!(hits, self.model.hits, "rule hits");
        assert_eq!(self.woken.load(Ordering::SeqCst), self.sent, "one wake-up per command sent");
        assert_eq!(self.stage.commands_refused(), 0);
    }

    fn finish(&mut self) {
        let accept = self.end_accept;
        self.release_all(accept);
        // Commands still waiting (releases of packets no longer delayed) change nothing.
        self.advance(3_600_000);
        self.handle_timeout();
        self.check();
        assert_eq!(self.released, self.held_ever, "every held packet released exactly once");
        assert_eq!(self.stage.stats().delayed_now, 0);
    }
}

fn quiet_scripted_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // libFuzzer's hook aborts on every panic, caught or not; the filter's scripted panics
        // are caught by the stage and must not end the run.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&PANIC) {
                previous(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    quiet_scripted_panics();
    let mut input = Input::new(data);
    let mut h = Harness::new(&mut input);
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        h.op(&mut input);
        ops += 1;
    }
    h.finish();
});
