//! The engine as a state machine: `Engine::handle_packet` fed a sequence of packets, with time
//! passing, timers firing, flow filter verdicts, handle commands (updates, resumes, listings,
//! verdict changes by selector), kernel reports and syncs, adoptions and reloads, all chosen by
//! the input. (Single packets are judged by the packet stage, which has a target of its own:
//! `packet_stage`.)
//!
//! Input: a settings byte (engine config), a second one (flow ids, rule set; its bit 0x40, which
//! once turned on a packet filter, is ignored), a script for the flow filter (length byte,
//! bytes: the verdicts it gives, in order), then operations (see `Harness::op`). Packets are
//! either raw bytes or built from a compact description over a few hosts and ports, so flows
//! meet, reuse 4-tuples, close and reopen.
//!
//! Checked after every operation (documented invariants):
//! - every live flow has exactly one timer (`engine/timers.rs`): `timers == flows`;
//! - held packets (those of a paused direction, or carrying bytes not judged yet): every `PacketAction::Hold` names its flow, its
//!   id is new, it is released exactly once (never a packet that was not held) and until then
//!   is counted in `footprint().held_packets`; held packets never exceed `max_held_packets`; a
//!   held packet's flow is live and paused or inspected (or dropped in its other direction: the
//!   flow's verdict is `pause`, `inspect` or `drop`); when a flow closes, its held packets are
//!   released; when a whole flow is resumed or updated to allow or drop, its held packets are
//!   released;
//! - live flows never exceed `max_flows`; a flow's events begin with `flow.new`, end with one
//!   `flow.closed`, and a closed flow is no longer listed; a decision names a live flow;
//! - after `close_all`: no flow, timer, held packet or retired flow is left, and every held
//!   packet was released.
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant as StdInstant};

use etherparse::PacketBuilder;
use flowgate_core::rules::kernel::Hook;
use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::{
    CloseReason, DataVerdict, Direction, Engine, EngineConfig, EventKind, Existing, Flow, FlowFilter, FlowId,
    FlowVerdict, Handle, Instant, KernelDecided, KernelReport, KernelState, KernelSync, NewFlowVerdict, Origin,
    PacketAction, PacketMeta, Protocol, Selector, Timeouts,
};
use flowgate_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// Rule sets the engine starts with and reloads, loaded through the real config loader.
const RULES: [&str; 4] = [
    "",
    r#"
default_action = "allow"
[[rule]]
name = "drop-telnet"
remote_ports = "23"
action = "drop"
[[rule]]
name = "odd-programs"
process = "/usr/bin/odd*"
remote_ports = "80,443"
action = "drop"
[[rule]]
name = "silent-v6"
remote = "2001:db8:2::/64"
protocol = "udp"
action = "drop"
silent = true
[[rule]]
name = "peek-web"
remote = "203.0.113.0/24"
remote_ports = "80,443"
action = "inspect"
peek = { outbound = 64, inbound = 16 }
[[rule]]
name = "tunnel-only"
interface = "tun*"
direction = "inbound"
action = "drop"
"#,
    r#"
default_action = "drop"
[[rule]]
name = "dns"
remote_ports = "53"
protocol = "udp"
action = "allow"
[[rule]]
name = "icmp"
protocol = "icmp"
action = "inspect"
peek = { outbound = 8, inbound = 8 }
[[rule]]
name = "named"
host = ["*.example", "a.test"]
action = "allow"
"#,
    r#"
default_action = "allow"
[[rule]]
name = "no-blocked"
host = "*.blocked.example"
action = "drop"
[[rule]]
name = "look"
remote_ports = "8000-9000"
action = "inspect"
peek = { outbound = 300, inbound = 0 }
[[rule]]
name = "web-by-name"
host = "www.example"
remote_ports = "80,443"
action = "allow"
"#,
];

fn rule_sets() -> &'static Vec<Arc<CompiledRules>> {
    static SETS: OnceLock<Vec<Arc<CompiledRules>>> = OnceLock::new();
    SETS.get_or_init(|| {
        RULES
            .iter()
            .map(|text| {
                let c = flowgate::config::parse(std::path::Path::new("rules.toml"), text).expect("fuzz rule set");
                Arc::new(CompiledRules::compile(c.rules))
            })
            .collect()
    })
}

const HOSTS_V4: [[u8; 4]; 4] = [[198, 51, 100, 1], [198, 51, 100, 2], [203, 0, 113, 10], [192, 0, 2, 7]];
const HOSTS_V6: [[u8; 16]; 3] = [
    [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    [0x20, 0x01, 0x0d, 0xb8, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
];
const PORTS: [u16; 6] = [80, 443, 53, 23, 40000, 40001];
const INTERFACES: [Option<&str>; 4] = [None, Some("eth0"), Some("tun0"), Some("wg-vpn")];

/// Flow filter verdicts come from the input, one byte per call; past its end everything is
/// allowed.
#[derive(Clone, Default)]
struct Script(Arc<Mutex<VecDeque<u8>>>);

impl Script {
    fn next(&self) -> Option<u8> {
        self.0.lock().unwrap().pop_front()
    }
}

struct Filter(Script);

impl FlowFilter for Filter {
    fn new_flow(&mut self, _flow: &Flow) -> NewFlowVerdict {
        match self.0.next() {
            None => NewFlowVerdict::Allow,
            Some(b) => match b % 6 {
                0 | 1 => NewFlowVerdict::Allow,
                2 => NewFlowVerdict::Drop,
                3 => NewFlowVerdict::Inspect { peek_outbound: u32::from(b / 6) * 3, peek_inbound: u32::from(b & 7) },
                4 => NewFlowVerdict::Pause,
                _ => NewFlowVerdict::Inspect { peek_outbound: 0, peek_inbound: u32::from(b / 6) },
            },
        }
    }

    fn data(&mut self, _flow: &Flow, _direction: Direction, _offset: u64, bytes: &[u8]) -> DataVerdict {
        assert!(!bytes.is_empty(), "data() called with no bytes");
        self.verdict()
    }

    fn data_complete(&mut self, _flow: &Flow, _direction: Direction) -> DataVerdict {
        self.verdict()
    }
}

impl Filter {
    fn verdict(&mut self) -> DataVerdict {
        match self.0.next() {
            None => DataVerdict::Allow,
            Some(b) => match b % 5 {
                0 => DataVerdict::Allow,
                1 => DataVerdict::Drop,
                2 => DataVerdict::Pass { pass: u32::from(b / 5) * 2, peek: u32::from(b & 15) },
                3 => DataVerdict::Pause,
                _ => DataVerdict::Pass { pass: u32::from(b & 7), peek: 0 },
            },
        }
    }
}

struct Harness {
    engine: Engine,
    handle: Handle,
    now: Instant,
    config: EngineConfig,
    /// Held packet → the flow that holds it.
    held: HashMap<u64, FlowId>,
    released: HashSet<u64>,
    /// Flow ids that had `flow.new`, and those that had `flow.closed`.
    opened: HashSet<u64>,
    closed: HashSet<u64>,
    /// Flows seen recently, to aim commands at.
    known: Vec<Flow>,
    /// Flows whose owner was asked and not answered: their first events may still wait.
    asked: HashSet<u64>,
}

fn addr(v6: bool, host: usize, port: u16) -> SocketAddr {
    let ip = if v6 { IpAddr::from(HOSTS_V6[host % 3]) } else { IpAddr::from(HOSTS_V4[host % 4]) };
    SocketAddr::new(ip, port)
}

fn data_verdict(b: u8) -> DataVerdict {
    match b % 4 {
        0 => DataVerdict::Allow,
        1 => DataVerdict::Drop,
        2 => DataVerdict::Pause,
        _ => DataVerdict::Pass { pass: u32::from(b >> 2), peek: u32::from(b >> 4) },
    }
}

fn direction(b: u8) -> Option<Direction> {
    match b % 3 {
        0 => None,
        1 => Some(Direction::Outbound),
        _ => Some(Direction::Inbound),
    }
}

impl Harness {
    fn new(input: &mut Input<'_>) -> Harness {
        let settings = input.u8();
        let extra = input.u8();
        let script = Script::default();
        let n = usize::from(input.u8());
        script.0.lock().unwrap().extend(input.bytes(n));
        let short = Duration::from_millis;
        let config = EngineConfig {
            local_networks: if settings & 1 != 0 {
                vec!["198.51.100.0/24".parse().unwrap(), "2001:db8:1::/48".parse().unwrap()]
            } else {
                Vec::new()
            },
            timeouts: Timeouts {
                tcp: short(30_000),
                tcp_closing: short(2_000),
                udp: short(5_000),
                icmp: short(3_000),
                other: short(4_000),
            },
            max_flows: [4, 16, 64, 1024][usize::from(settings >> 1 & 3)],
            max_held_packets: [2, 8, 64, 4096][usize::from(settings >> 3 & 3)],
            first_flow_id: u64::from(extra & 3) + 1,
            flow_id_step: u64::from(extra >> 2 & 3) + 1,
            kernel_offload: settings & 0x20 != 0,
            kernel_sync_interval: short(1_000),
            fail_open: settings & 0x40 != 0,
            drop_unparsable: settings & 0x80 != 0,
            provider_budget: Duration::from_secs(3600),
            owner_wait: (extra & 0x40 != 0).then(|| short(50)),
            // Short, small and strict or lenient, so the input reaches every bound.
            hold_timeout: short(if extra & 0x80 != 0 { 200 } else { 3_000 }),
            hold_timeout_drop: extra & 0x80 == 0,
            overlap_drop: settings & 0x04 == 0,
            sniff_window: if extra & 0x80 != 0 { 64 } else { 16 * 1024 },
            max_inspect_span: if extra & 0x80 != 0 { 256 } else { 64 * 1024 },
            max_held_per_flow: if extra & 0x80 != 0 { 4 } else { 512 },
        };
        let rules = rule_sets()[usize::from(extra >> 4) % RULES.len()].clone();
        let mut engine = Engine::new(config.clone(), rules);
        // Bit 0x40 of `extra` turned on a packet filter before the packet stage took it over; it
        // now has the engine ask for owners (answered in `drain`).
        engine.set_flow_filter(Box::new(Filter(script)));
        let handle = engine.handle();
        Harness {
            engine,
            handle,
            now: Instant::from_micros(1_700_000_000_000_000),
            config,
            held: HashMap::new(),
            released: HashSet::new(),
            opened: HashSet::new(),
            closed: HashSet::new(),
            known: Vec::new(),
            asked: HashSet::new(),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now = self.now + Duration::from_millis(ms);
    }

    fn packet(&mut self, meta: u8, bytes: &[u8]) {
        let origin = [Origin::Unknown, Origin::Output, Origin::Input, Origin::Forward][usize::from(meta & 3)];
        let interface = INTERFACES[usize::from(meta >> 2 & 3)];
        let d = self.engine.handle_packet(self.now, PacketMeta { interface, origin }, bytes);
        if let PacketAction::Hold(id) = d.action {
            let flow = d.flow.unwrap_or_else(|| panic!("held packet {id:?} without a flow: {d:?}"));
            assert!(!self.held.contains_key(&id.0) && !self.released.contains(&id.0), "hold id {id:?} reused");
            self.held.insert(id.0, flow);
        }
        if let Some(flow) = d.flow {
            // Decisions name tracked flows, which are live until their close event is polled.
            assert!(!self.closed.contains(&flow.0) || self.engine.flows().iter().any(|f| f.flow.id == flow));
        }
    }

    /// A packet built from a description: family, protocol, which hosts and ports, which way,
    /// TCP flags and sequence number, payload.
    fn synth(&mut self, input: &mut Input<'_>) {
        if let Some((meta, out)) = synth_packet(input) {
            self.packet(meta, &out);
        }
    }

    /// The same packet, logged as dropped by a static rule in the kernel.
    fn synth_kernel_drop(&mut self, input: &mut Input<'_>) {
        if let Some((meta, out)) = synth_packet(input) {
            let origin = [Origin::Unknown, Origin::Output, Origin::Input, Origin::Forward][usize::from(meta & 3)];
            let interface = INTERFACES[usize::from(meta >> 2 & 3)];
            self.engine.handle_kernel_drop(self.now, PacketMeta { interface, origin }, &out);
        }
    }

    /// A report from conntrack on a flow a static rule decided in the kernel, which the engine
    /// may never have seen.
    fn kernel_decided(&mut self, input: &mut Input<'_>) {
        let (hosts, ports, s) = (input.u8(), input.u8(), input.u8());
        let v6 = s & 1 != 0;
        let a = addr(v6, usize::from(hosts & 3), PORTS[usize::from(ports & 7) % PORTS.len()]);
        let b = addr(v6, usize::from(hosts >> 2 & 3), PORTS[usize::from(ports >> 3 & 7) % PORTS.len()]);
        let hook = [Hook::Output, Hook::Input, Hook::Forward][usize::from(s >> 1 & 3) % 3];
        let state = match s >> 3 & 3 {
            0 => KernelState::Created,
            1 => KernelState::Alive,
            2 => KernelState::Closing(CloseReason::Fin),
            _ => KernelState::Ended,
        };
        let report = KernelReport {
            protocol: [Protocol::Tcp, Protocol::Udp, Protocol::Icmp][usize::from(s >> 5 & 3) % 3],
            opener: a,
            responder: b,
            from_opener: (s & 0x80 != 0).then_some((3, 300)),
            from_responder: None,
            id: Some(u32::from(hosts)),
            state,
            decided: Some(KernelDecided {
                hook,
                interface: INTERFACES[usize::from(ports >> 6)].map(std::sync::Arc::from),
            }),
        };
        let _ = self.engine.handle_kernel_report(self.now, &report);
    }
}

/// A packet built from a description: family, protocol, which hosts and ports, which way, TCP
/// flags and sequence number, payload; with the byte that says where it was seen.
fn synth_packet(input: &mut Input<'_>) -> Option<(u8, Vec<u8>)> {
    {
        let meta = input.u8();
        let shape = input.u8();
        let hosts = input.u8();
        let ports = input.u8();
        let flags = input.u8();
        let seq = u32::from(input.u16()) * 1000;
        let len = usize::from(input.u8() % 120);
        let v6 = shape & 1 != 0;
        let a = addr(v6, usize::from(hosts & 3), PORTS[usize::from(ports & 7) % PORTS.len()]);
        let b = addr(v6, usize::from(hosts >> 2 & 3), PORTS[usize::from(ports >> 3 & 7) % PORTS.len()]);
        let (src, dst) = if shape & 2 != 0 { (b, a) } else { (a, b) };
        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ flags).collect();
        let builder = match (src.ip(), dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => return None,
        };
        let mut out = Vec::new();
        let written = match shape >> 2 & 3 {
            0 | 1 => {
                let mut t = builder.tcp(src.port(), dst.port(), seq, 65535);
                if flags & 1 != 0 {
                    t = t.syn();
                }
                if flags & 2 != 0 {
                    t = t.ack(seq.wrapping_add(1));
                }
                if flags & 4 != 0 {
                    t = t.fin();
                }
                if flags & 8 != 0 {
                    t = t.rst();
                }
                t.write(&mut out, &payload)
            }
            2 => builder.udp(src.port(), dst.port()).write(&mut out, &payload),
            _ => {
                let id = src.port() ^ dst.port();
                if v6 {
                    let i = if flags & 1 != 0 {
                        builder.icmpv6_echo_reply(id, 1)
                    } else {
                        builder.icmpv6_echo_request(id, 1)
                    };
                    i.write(&mut out, &payload)
                } else {
                    let i = if flags & 1 != 0 {
                        builder.icmpv4_echo_reply(id, 1)
                    } else {
                        builder.icmpv4_echo_request(id, 1)
                    };
                    i.write(&mut out, &payload)
                }
            }
        };
        written.ok().map(|_| (meta, out))
    }
}

impl Harness {
    fn timeouts(&mut self) {
        for _ in 0..64 {
            match self.engine.poll_timeout() {
                Some(t) if t <= self.now => self.engine.handle_timeout(t),
                _ => break,
            }
            self.drain();
        }
    }

    fn pick_flow(&mut self, b: u8) -> Option<Flow> {
        if self.known.is_empty() {
            return None;
        }
        Some(self.known[usize::from(b) % self.known.len()].clone())
    }

    fn op(&mut self, input: &mut Input<'_>) {
        // A whole flow given a verdict other than pause: none of its packets may stay held.
        let mut resumed = None;
        match input.u8() % 16 {
            0 => {
                let meta = input.u8();
                self.advance(u64::from(input.u8()));
                let bytes = input.chunk();
                self.packet(meta, &bytes[..bytes.len().min(2048)]);
            }
            1..=4 => {
                self.advance(u64::from(input.u8() % 16));
                self.synth(input);
            }
            5 => {
                self.advance(u64::from(input.u16()) * 4);
                self.timeouts();
            }
            6 => {
                let (f, v, d) = (input.u8(), input.u8(), input.u8());
                if let Some(flow) = self.pick_flow(f) {
                    let verdict = data_verdict(v);
                    let (applied, whole) = if d & 0x80 != 0 {
                        self.engine.update(self.now, flow.id, verdict, direction(d));
                        (true, direction(d).is_none())
                    } else if d & 0x40 != 0 {
                        (self.handle.resume(flow.id, verdict).is_ok(), true)
                    } else {
                        (self.handle.update(flow.id, verdict, direction(d)).is_ok(), direction(d).is_none())
                    };
                    // (A `Pass` holds what it has not judged, like a pause.)
                    if applied && whole && matches!(verdict, DataVerdict::Allow | DataVerdict::Drop) {
                        resumed = Some(flow.id);
                    }
                }
                self.engine.handle_commands(self.now);
            }
            7 => {
                // Resume (allow) or drop the flow that holds one of the held packets. (These bytes
                // once released packets a packet filter had delayed.)
                let (which, accept) = (input.u8(), input.bool());
                let verdict = if accept { DataVerdict::Allow } else { DataVerdict::Drop };
                let mut held: Vec<(u64, FlowId)> = self.held.iter().map(|(p, f)| (*p, *f)).collect();
                held.sort_unstable();
                if let Some(&(_, flow)) = held.get(usize::from(which) % held.len().max(1))
                    && self.handle.resume(flow, verdict).is_ok()
                {
                    resumed = Some(flow);
                }
                // A stale or unknown flow id must be harmless too.
                if which & 0x80 != 0 {
                    let _ = self.handle.resume(FlowId(u64::from(which)), verdict);
                }
                self.engine.handle_commands(self.now);
            }
            8 => {
                let (f, s, c) = (input.u8(), input.u8(), input.u16());
                if let Some(flow) = self.pick_flow(f) {
                    let (opener, responder) = match flow.direction {
                        Direction::Outbound if s & 0x40 == 0 => (flow.local, flow.remote),
                        _ => (flow.remote, flow.local),
                    };
                    let state = match s % 6 {
                        0 => KernelState::Created,
                        1 | 2 => KernelState::Alive,
                        3 => KernelState::Closing(CloseReason::Fin),
                        4 => KernelState::Closing(CloseReason::Rst),
                        _ => KernelState::Ended,
                    };
                    let counts = |k: u64| (s & 0x08 != 0).then_some((u64::from(c) * k, u64::from(c) * 100 * k));
                    let report = KernelReport {
                        protocol: flow.protocol,
                        opener,
                        responder,
                        from_opener: counts(1),
                        from_responder: counts(2),
                        id: (s & 0x10 != 0).then_some(u32::from(c % 4)),
                        state,
                        decided: None,
                    };
                    if s & 0x80 != 0 {
                        let _ = self.engine.handle_kernel_report(self.now, &report);
                    } else {
                        let _ = self.handle.kernel_reports(vec![report], Duration::ZERO);
                        self.engine.handle_commands(self.now);
                    }
                }
            }
            9 => {
                let g = input.u8();
                let generation = u16::from(g & 0x7f);
                let sync = if g & 0x80 != 0 {
                    KernelSync::Done { generation }
                } else {
                    KernelSync::Start { generation, at: self.now }
                };
                self.engine.handle_kernel_sync(self.now, sync);
            }
            10 => {
                let (hosts, ports, k) = (input.u8(), input.u8(), input.u8());
                let v6 = k & 1 != 0;
                let protocol =
                    [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Other(47)][usize::from(k >> 1 & 3)];
                let kept = match k >> 3 & 3 {
                    0 => None,
                    1 => Some(FlowVerdict::Allow),
                    2 => Some(FlowVerdict::Drop),
                    _ => Some(FlowVerdict::Pause),
                };
                let x = Existing {
                    protocol,
                    local: addr(v6, usize::from(hosts & 3), PORTS[usize::from(ports & 7) % PORTS.len()]),
                    remote: addr(v6, usize::from(hosts >> 2 & 3), PORTS[usize::from(ports >> 3 & 7) % PORTS.len()]),
                    direction: if k & 0x20 != 0 { Direction::Inbound } else { Direction::Outbound },
                    forwarded: k & 0x40 != 0,
                    interface: INTERFACES[usize::from(hosts >> 4 & 3)],
                    kept,
                    conntrack_id: (k & 0x80 != 0).then_some(u32::from(ports)),
                };
                let _ = self.engine.adopt(self.now, &x);
            }
            11 => {
                let r = input.u8();
                let rules = rule_sets()[usize::from(r) % RULES.len()].clone();
                if r & 0x80 != 0 {
                    self.engine.reload(self.now, rules);
                } else if r & 0x40 != 0 {
                    let _ = self.handle.reload(rules);
                    self.engine.handle_commands(self.now);
                } else {
                    self.engine.set_rules(rules);
                }
            }
            12 => {
                let (s, v, f) = (input.u8(), input.u8(), input.u8());
                let mut selector = Selector::all();
                if s & 1 != 0
                    && let Some(flow) = self.pick_flow(f)
                {
                    selector.ids.push(flow.id);
                }
                if s & 2 != 0 {
                    selector.ids.push(FlowId(u64::from(f)));
                }
                if s & 4 != 0 {
                    selector.remote =
                        Some(["203.0.113.0/24", "2001:db8::/32", "0.0.0.0/0"][usize::from(f % 3)].parse().unwrap());
                }
                if s & 8 != 0 {
                    selector.remote_port = Some(PORTS[usize::from(f) % PORTS.len()]);
                }
                if s & 16 != 0 {
                    selector.protocol = Some([Protocol::Tcp, Protocol::Udp, Protocol::Icmp][usize::from(f % 3)]);
                }
                let listing = if s & 32 != 0 {
                    self.handle.apply(selector.clone(), data_verdict(v))
                } else {
                    self.handle.list(selector.clone())
                };
                let Ok(mut listing) = listing else { return };
                let read_all = s & 64 != 0;
                for _ in 0..32 {
                    self.engine.handle_commands(self.now);
                    self.engine.handle_timeout(self.now);
                    self.drain();
                    match listing.next_before(StdInstant::now()) {
                        Some(Ok(chunk)) => {
                            for status in &chunk {
                                let flow = &status.flow;
                                assert!(
                                    selector.matches_public(flow.id, flow.protocol, flow.remote),
                                    "listing returned a flow its selector does not match: {flow:?}"
                                );
                            }
                            listing.give_back(chunk);
                            if !read_all {
                                break;
                            }
                        }
                        Some(Err(_)) | None => break,
                    }
                }
            }
            14 => self.kernel_decided(input),
            15 => self.synth_kernel_drop(input),
            _ => {
                let n = usize::from(input.u8() % 4) + 1;
                for _ in 0..n {
                    self.advance(1);
                    self.synth(input);
                }
            }
        }
        self.drain();
        self.check();
        if let Some(flow) = resumed {
            let still: Vec<u64> = self.held.iter().filter(|(_, f)| **f == flow).map(|(p, _)| *p).collect();
            assert!(still.is_empty(), "{flow:?} was resumed or decided, yet still holds packets {still:?}");
        }
    }

    fn drain(&mut self) {
        // Owners: flows with an odd id are some `/usr/bin/odd<id>`, every fourth is not found,
        // the rest never answered (their wait runs out).
        while let Some(q) = self.engine.poll_owner_request() {
            let id = q.flow.0;
            match id % 4 {
                1 | 3 => self.engine.set_owner(
                    q.flow,
                    Some(Arc::new(flowgate_core::owner::Owner {
                        pid: id as u32,
                        exe: Some(format!("/usr/bin/odd{id}").into()),
                        cmdline: None,
                        uid: 0,
                        user: None,
                        parents: Vec::new(),
                        cgroup: None,
                        unit: None,
                        source: flowgate_core::owner::OwnerSource::Kernel,
                    })),
                ),
                0 => self.engine.set_owner(q.flow, None),
                _ => {
                    self.asked.insert(id);
                }
            }
        }
        while let Some(e) = self.engine.poll_event() {
            let _ = serde_json::to_string(&e).expect("events serialize");
            let flow = match &e.kind {
                EventKind::FlowNew { flow } => {
                    assert!(self.opened.insert(flow.id.0), "second flow.new for {:?}", flow.id);
                    self.asked.remove(&flow.id.0);
                    flow
                }
                EventKind::FlowVerdict { flow, .. } | EventKind::FlowUpdate { flow, .. } => flow,
                EventKind::FlowClosed { flow, .. } => {
                    assert!(self.closed.insert(flow.id.0), "second flow.closed for {:?}", flow.id);
                    flow
                }
            };
            assert!(self.opened.contains(&flow.id.0), "event before flow.new: {e:?}");
            if !matches!(e.kind, EventKind::FlowClosed { .. }) {
                assert!(!self.closed.contains(&flow.id.0), "event after flow.closed: {e:?}");
                if self.known.len() >= 32 {
                    self.known.remove(0);
                }
                self.known.push(flow.clone());
            }
        }
        while let Some(r) = self.engine.poll_release() {
            assert!(self.held.remove(&r.packet.0).is_some(), "release of a packet not held: {r:?}");
            assert!(self.released.insert(r.packet.0), "second release of {r:?}");
            // A packet let through cut is still a packet, with a shorter payload.
            if let Some(cut) = self.engine.take_rewrite(r.packet) {
                assert!(r.accept, "a dropped packet has no new bytes: {r:?}");
                assert!(flowgate_core::packet::parse(&cut).is_ok(), "a cut packet that does not parse: {cut:?}");
            }
        }
        assert_eq!(self.engine.footprint().rewrites, 0, "new bytes of packets never released");
        while self.engine.poll_enforce().is_some() {}
        while self.engine.poll_fault().is_some() {}
    }

    fn check(&self) {
        let f = self.engine.footprint();
        assert_eq!(f.timers, f.flows, "every live flow has exactly one timer: {f:?}");
        assert_eq!(f.held_packets, self.held.len(), "held packets: engine {f:?}, harness {:?}", self.held);
        assert!(f.held_packets <= self.config.max_held_packets, "{f:?}");
        assert!(f.flows <= self.config.max_flows, "{f:?}");
        let live = self.engine.flows();
        assert_eq!(live.len(), f.flows);
        for s in &live {
            if self.asked.contains(&s.flow.id.0) {
                continue;
            }
            assert!(self.opened.contains(&s.flow.id.0), "live flow without flow.new: {:?}", s.flow);
            assert!(!self.closed.contains(&s.flow.id.0), "closed flow still live: {:?}", s.flow);
        }
        // A held packet waits for its flow's pause to end, or for its bytes to be judged: the
        // flow is live, and paused or inspected in at least one direction (its verdict, the most
        // restrictive of the two, is pause, inspect or drop).
        for (packet, flow) in &self.held {
            assert!(!self.closed.contains(&flow.0), "packet {packet} still held after {flow:?} closed");
            let status = live.iter().find(|s| s.flow.id == *flow);
            let status = status.unwrap_or_else(|| panic!("packet {packet} held by {flow:?}, which is not live"));
            assert!(
                matches!(status.verdict, FlowVerdict::Pause | FlowVerdict::Inspect | FlowVerdict::Drop),
                "packet {packet} held by {flow:?}, whose verdict is {:?}",
                status.verdict
            );
        }
    }

    fn finish(&mut self) {
        self.engine.close_all(self.now);
        self.drain();
        let f = self.engine.footprint();
        assert_eq!((f.flows, f.timers, f.held_packets, f.retired), (0, 0, 0, 0), "left after close_all: {f:?}");
        assert!(self.held.is_empty(), "never released: {:?}", self.held);
        assert_eq!(self.opened, self.closed, "every opened flow closed once");
    }
}

/// `Selector::matches` is crate-private; the same rule, from its documentation.
trait MatchesPublic {
    fn matches_public(&self, id: FlowId, protocol: Protocol, remote: SocketAddr) -> bool;
}

impl MatchesPublic for Selector {
    fn matches_public(&self, id: FlowId, protocol: Protocol, remote: SocketAddr) -> bool {
        (self.ids.is_empty() || self.ids.contains(&id))
            && self.remote.is_none_or(|n| n.contains(&remote.ip()))
            && self.remote_port.is_none_or(|p| p == remote.port())
            && self.protocol.is_none_or(|p| p == protocol)
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut h = Harness::new(&mut input);
    let mut ops = 0;
    while !input.is_empty() && ops < 512 {
        h.op(&mut input);
        ops += 1;
    }
    h.finish();
});
