//! Host names: the rules wait for the name a flow's first bytes carry (TLS SNI, HTTP Host) or
//! a DNS answer gave its address, then judge it with it.

use super::*;
use crate::flow::HostSource;
use crate::hosts::HostPattern;
use crate::rules::HostMatch;

fn u16b(n: usize) -> [u8; 2] {
    (n as u16).to_be_bytes()
}

fn ext(ty: u16, body: &[u8]) -> Vec<u8> {
    [&ty.to_be_bytes()[..], &u16b(body.len()), body].concat()
}

/// A TLS 1.3 ClientHello record for `sni` offering `alpn`, with `pad` bytes of padding
/// extension (a large key share's worth) and an Encrypted Client Hello extension if `ech`.
pub(super) fn client_hello(sni: &str, alpn: &[&str], pad: usize, ech: bool) -> Vec<u8> {
    let name = sni.as_bytes();
    let entry = [&[0u8][..], &u16b(name.len()), name].concat();
    let mut exts = ext(0, &[&u16b(entry.len())[..], &entry].concat());
    let protos: Vec<u8> = alpn.iter().flat_map(|p| [&[p.len() as u8][..], p.as_bytes()].concat()).collect();
    exts.extend(ext(16, &[&u16b(protos.len())[..], &protos].concat()));
    exts.extend(ext(43, &[2, 3, 4]));
    if ech {
        exts.extend(ext(0xfe0d, &[0, 0, 1, 0, 1, 7, 0, 2, 0xaa, 0xbb, 0, 4, 1, 2, 3, 4]));
    }
    exts.extend(ext(21, &vec![0; pad]));
    let body =
        [&[3, 3][..], &[7; 32], &[32], &[9; 32], &[0, 2, 0x13, 0x01], &[1, 0], &u16b(exts.len()), &exts].concat();
    let len = body.len() as u32;
    let hs = [&[1u8][..], &len.to_be_bytes()[1..], &body].concat();
    [&[22u8, 3, 1][..], &u16b(hs.len()), &hs].concat()
}

fn host_rule(name: &str, pattern: &str, action: Action) -> Rule {
    let p = HostPattern::parse(pattern).expect("pattern");
    Rule { host: HostMatch::new(&[p], Vec::new()), ..Rule::new(name, action) }
}

/// Client data at stream offset `offset`.
fn at(c: &Conn, offset: usize, data: &[u8]) -> Vec<u8> {
    tcp(c.c, c.s, 1_001 + offset as u32, c.sseq, "PA", data)
}

fn host_of(ev: &[Event], id: FlowId) -> Option<crate::flow::Host> {
    ev.iter().rev().find_map(|e| match &e.kind {
        EventKind::FlowUpdate { flow, .. } | EventKind::FlowClosed { flow, .. } if flow.id == id => {
            flow.host.as_deref().cloned()
        }
        _ => None,
    })
}

fn final_verdict(ev: &[Event], id: FlowId) -> Option<(FlowVerdict, Option<String>, UpdateSource)> {
    ev.iter().rev().find_map(|e| match &e.kind {
        EventKind::FlowUpdate { flow, verdict, rule, source, .. } if flow.id == id => {
            Some((*verdict, rule.as_deref().map(str::to_string), *source))
        }
        _ => None,
    })
}

fn blocking() -> Engine {
    engine_with_rules(vec![host_rule("no-blocked", "*.blocked.example", Action::Drop)], Action::Allow)
}

#[test]
fn a_host_rule_holds_the_client_hello_until_its_name_and_drops_it_unseen() {
    let mut e = blocking();
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
    let d = e.handle_packet(ms(0), OUT, &c.syn());
    let id = d.flow.expect("tracked");
    assert_eq!(d, accepted(id, false), "the handshake carries no bytes: it passes, unsettled");
    let _ = e.handle_packet(ms(1), IN, &c.syn_ack());
    let _ = e.handle_packet(ms(2), OUT, &c.ack());
    let ev = events(&mut e);
    let (_, verdict, rule, _) = verdict_of(&ev[1]);
    assert_eq!((verdict, rule), (FlowVerdict::Inspect, Some("no-blocked")));
    let hello = client_hello("www.blocked.example", &["h2", "http/1.1"], 0, false);
    let first = match e.handle_packet(ms(3), OUT, &at(&c, 0, &hello[..100])).action {
        PacketAction::Hold(p) => p,
        other => panic!("the first part must be held, got {other:?}"),
    };
    assert_eq!(e.handle_packet(ms(4), OUT, &at(&c, 100, &hello[100..])), dropped(id, false));
    assert_eq!(releases(&mut e), [Release { packet: first, accept: false }], "not one byte passed");
    let ev = events(&mut e);
    assert_eq!(final_verdict(&ev, id), Some((FlowVerdict::Drop, Some("no-blocked".into()), UpdateSource::Host)));
    let host = host_of(&ev, id).expect("host");
    assert_eq!(host.name.as_deref(), Some("www.blocked.example"));
    assert_eq!(host.source, Some(HostSource::Sni));
    assert_eq!(host.alpn, ["h2", "http/1.1"]);
    assert_eq!(e.stats().hosts_found, 1);
}

#[test]
fn another_name_passes_once_read_and_the_flow_settles() {
    // Live (the kernel takes settled flows): a local socket repeats its own bytes, nothing to
    // compare.
    let rules = vec![host_rule("no-blocked", "*.blocked.example", Action::Drop)];
    let mut e =
        Engine::new(EngineConfig { kernel_offload: true, ..EngineConfig::default() }, compiled(rules, Action::Allow));
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
    let id = handshake(&mut e, &mut c, ms(0));
    let hello = client_hello("allowed.example", &["h2"], 0, false);
    assert_eq!(e.handle_packet(ms(3), OUT, &at(&c, 0, &hello)), accepted(id, true));
    let ev = events(&mut e);
    assert_eq!(final_verdict(&ev, id), Some((FlowVerdict::Allow, Some("default".into()), UpdateSource::Host)));
    assert_eq!(host_of(&ev, id).and_then(|h| h.name).as_deref(), Some("allowed.example"));
}

const FWD: PacketMeta<'static> = PacketMeta { interface: None, origin: Origin::Forward };

/// A forwarded connection (a client behind this host) up to its first byte.
fn forwarded(e: &mut Engine, c: &mut Conn) -> FlowId {
    let id = e.handle_packet(ms(0), FWD, &c.syn()).flow.expect("tracked");
    let _ = e.handle_packet(ms(1), FWD, &c.syn_ack());
    let _ = e.handle_packet(ms(2), FWD, &c.ack());
    events(e);
    id
}

#[test]
fn a_forwarded_flow_is_read_until_the_server_acknowledges_its_judged_bytes() {
    let mut e = blocking();
    let mut c = Conn::new("198.18.0.2:40000", "203.0.113.7:443");
    let id = forwarded(&mut e, &mut c);
    let hello = client_hello("allowed.example", &["h2"], 0, false);
    assert_eq!(e.handle_packet(ms(3), FWD, &at(&c, 0, &hello)), accepted(id, false));
    let ack = |n: usize| tcp(c.s, c.c, c.sseq, 1_001 + n as u32, "A", b"");
    assert_eq!(e.handle_packet(ms(4), FWD, &ack(hello.len() - 1)), accepted(id, false));
    assert_eq!(e.handle_packet(ms(5), FWD, &ack(hello.len())), accepted(id, true));
}

#[test]
fn a_client_hello_split_anywhere_or_sent_backwards_byte_by_byte_names_the_same_host() {
    // A large hello (a post-quantum key share's size) spans two segments of 1448 bytes.
    for hello in
        [client_hello("a.blocked.example", &["h2"], 0, false), client_hello("a.blocked.example", &["h2"], 1300, false)]
    {
        for cut in 1..hello.len() {
            let mut e = blocking();
            let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
            let id = handshake(&mut e, &mut c, ms(0));
            let first = e.handle_packet(ms(3), OUT, &at(&c, 0, &hello[..cut]));
            assert!(matches!(first.action, PacketAction::Hold(_)), "cut {cut}: {first:?}");
            assert_eq!(e.handle_packet(ms(4), OUT, &at(&c, cut, &hello[cut..])), dropped(id, false), "cut {cut}");
        }
        if hello.len() > EngineConfig::default().max_held_per_flow {
            continue;
        }
        let mut e = blocking();
        let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
        let id = handshake(&mut e, &mut c, ms(0));
        for k in (1..hello.len()).rev() {
            let d = e.handle_packet(ms(3), OUT, &at(&c, k, &hello[k..k + 1]));
            assert!(matches!(d.action, PacketAction::Hold(_)), "byte {k}: {d:?}");
        }
        assert_eq!(e.handle_packet(ms(4), OUT, &at(&c, 0, &hello[..1])), dropped(id, false));
        assert!(releases(&mut e).iter().all(|r| !r.accept));
        assert_eq!(host_of(&events(&mut e), id).and_then(|h| h.name).as_deref(), Some("a.blocked.example"));
    }
}

#[test]
fn past_the_packets_one_flow_may_hold_the_rest_is_dropped_not_passed() {
    let mut e = blocking();
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
    let id = handshake(&mut e, &mut c, ms(0));
    let hello = client_hello("a.blocked.example", &["h2"], 1300, false);
    let most = EngineConfig::default().max_held_per_flow;
    for k in 0..most {
        assert!(matches!(e.handle_packet(ms(3), OUT, &at(&c, k, &hello[k..k + 1])).action, PacketAction::Hold(_)));
    }
    assert_eq!(
        e.handle_packet(ms(4), OUT, &at(&c, most, &hello[most..most + 1])),
        Expect { action: PacketAction::Drop, flow: Some(id), settled: false }
    );
    assert!(releases(&mut e).is_empty());
    assert_eq!(e.stats().held_overflow, 1);
}

#[test]
fn an_http_request_is_judged_by_its_host() {
    let mut e = blocking();
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let request = b"GET / HTTP/1.1\r\nUser-Agent: t\r\nHost: x.blocked.example:80\r\n\r\n";
    let d = e.handle_packet(ms(3), OUT, &at(&c, 0, &request[..20]));
    assert!(matches!(d.action, PacketAction::Hold(_)));
    assert_eq!(e.handle_packet(ms(4), OUT, &at(&c, 20, &request[20..])), dropped(id, false));
    let host = host_of(&events(&mut e), id).expect("host");
    assert_eq!((host.name.as_deref(), host.source), (Some("x.blocked.example"), Some(HostSource::Http)));
}

#[test]
fn with_encrypted_client_hello_a_dns_name_comes_before_the_outer_name() {
    // No DNS answer: the outer name is all there is (browsers send a decoy ECH extension on
    // every connection, with the real name outside): it is judged, marked as outer.
    let mut e = blocking();
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
    let id = handshake(&mut e, &mut c, ms(0));
    let hello = client_hello("www.blocked.example", &["h2"], 0, true);
    assert_eq!(e.handle_packet(ms(3), OUT, &at(&c, 0, &hello)), dropped(id, false));
    let host = host_of(&events(&mut e), id).expect("host");
    assert!(host.ech);
    assert_eq!(host.outer_sni.as_deref(), Some("www.blocked.example"));
    assert_eq!((host.name.as_deref(), host.source), (Some("www.blocked.example"), Some(HostSource::Sni)));

    // A DNS answer named the address: that name is judged, not the outer one.
    let mut e = blocking();
    let (client, server) = (sa("198.51.100.1:53000"), sa("198.51.100.53:53"));
    let _ = e.handle_packet(ms(0), OUT, &udp(client, server, b"query"));
    let answer = dns_answer("shop.blocked.example", "edge.cdn.example", &[[203, 0, 113, 7]], 300);
    let _ = e.handle_packet(ms(1), IN, &udp(server, client, &answer));
    let mut c = Conn::new("198.51.100.1:40001", "203.0.113.7:443");
    let id = handshake(&mut e, &mut c, ms(2));
    let hello = client_hello("public.cdn.example", &["h2"], 0, true);
    assert_eq!(e.handle_packet(ms(5), OUT, &at(&c, 0, &hello)), dropped(id, false));
    let host = host_of(&events(&mut e), id).expect("host");
    assert_eq!(host.outer_sni.as_deref(), Some("public.cdn.example"));
    assert_eq!((host.name.as_deref(), host.source), (Some("shop.blocked.example"), Some(HostSource::Dns)));
}

#[test]
fn an_inspect_rule_hands_the_flow_to_the_first_later_rule_that_matches_with_its_host() {
    let rules = vec![
        Rule::new("look", Action::Inspect { peek_outbound: 4096, peek_inbound: 0 }),
        host_rule("no-blocked", "blocked.example", Action::Drop),
    ];
    let mut e = engine_with_rules(rules, Action::Allow);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
    let id = handshake(&mut e, &mut c, ms(0));
    assert_eq!(
        e.handle_packet(ms(3), OUT, &at(&c, 0, &client_hello("blocked.example", &[], 0, false))),
        dropped(id, false)
    );
    assert_eq!(final_verdict(&events(&mut e), id).map(|v| v.1), Some(Some("no-blocked".into())));
}

/// A DNS answer from `server` for `name`: a CNAME to `target`, and `target`'s A records.
fn dns_answer(name: &str, target: &str, addrs: &[[u8; 4]], ttl: u32) -> Vec<u8> {
    let encode = |n: &str| -> Vec<u8> {
        let mut out: Vec<u8> = n.split('.').flat_map(|l| [&[l.len() as u8][..], l.as_bytes()].concat()).collect();
        out.push(0);
        out
    };
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1 + addrs.len() as u8, 0, 0, 0, 0];
    m.extend(encode(name));
    m.extend([0, 1, 0, 1]);
    let cname = encode(target);
    m.extend([0xc0, 12, 0, 5, 0, 1]);
    m.extend(ttl.to_be_bytes());
    m.extend(u16b(cname.len()));
    let target_at = m.len();
    m.extend(cname);
    for a in addrs {
        m.extend([0xc0, target_at as u8, 0, 1, 0, 1]);
        m.extend(ttl.to_be_bytes());
        m.extend([0, 4]);
        m.extend(a);
    }
    m
}

#[test]
fn a_dns_answer_names_the_address_for_plain_tcp_and_the_first_byte_does_not_pass() {
    let mut e = blocking();
    let (client, server) = (sa("198.51.100.1:53000"), sa("198.51.100.53:53"));
    let _ = e.handle_packet(ms(0), OUT, &udp(client, server, b"query"));
    let answer = dns_answer("cdn.blocked.example", "edge.cdn.example", &[[203, 0, 113, 9]], 300);
    let _ = e.handle_packet(ms(1), IN, &udp(server, client, &answer));
    assert_eq!(e.stats().dns_learnt, 1);
    // Plain TCP to the address: the rules wait for a name the bytes may carry, find none, and
    // judge by the DNS name.
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.9:7");
    let id = handshake(&mut e, &mut c, ms(2));
    assert_eq!(e.handle_packet(ms(5), OUT, &at(&c, 0, b"\x00\x01binary hello")), dropped(id, false));
    let ev = events(&mut e);
    let host = host_of(&ev, id).unwrap_or_else(|| panic!("host: {ev:?}"));
    assert_eq!((host.name.as_deref(), host.source), (Some("cdn.blocked.example"), Some(HostSource::Dns)));
    // A plain UDP datagram to it is dropped at once too.
    let d = e.handle_packet(ms(6), OUT, &udp(sa("198.51.100.1:5000"), sa("203.0.113.9:5000"), b"x"));
    assert_eq!(d.action, PacketAction::Drop);
    // Past its TTL the name is forgotten.
    let mut c = Conn::new("198.51.100.1:40001", "203.0.113.9:7");
    let id = handshake(&mut e, &mut c, secs(301));
    assert_eq!(e.handle_packet(secs(302), OUT, &at(&c, 0, b"\x00\x01binary hello")), accepted(id, false));
}

#[test]
fn an_answer_giving_a_loopback_or_unspecified_address_labels_nothing() {
    let mut e = blocking();
    let (client, server) = (sa("198.51.100.1:53000"), sa("198.51.100.53:53"));
    let _ = e.handle_packet(ms(0), OUT, &udp(client, server, b"query"));
    let answer = dns_answer("ads.blocked.example", "sink.example", &[[0, 0, 0, 0], [127, 0, 0, 1]], 300);
    let _ = e.handle_packet(ms(1), IN, &udp(server, client, &answer));
    assert_eq!(e.stats().dns_learnt, 0);
}

#[test]
fn a_name_that_never_finishes_within_the_hold_timeout_gets_its_verdict() {
    for drop in [true, false] {
        let rules = vec![host_rule("no-blocked", "*.blocked.example", Action::Drop)];
        let config = EngineConfig { hold_timeout_drop: drop, ..EngineConfig::default() };
        let mut e = Engine::new(config, compiled(rules, Action::Allow));
        let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:443");
        let id = handshake(&mut e, &mut c, ms(0));
        let hello = client_hello("www.blocked.example", &[], 0, false);
        let p = match e.handle_packet(ms(3), OUT, &at(&c, 0, &hello[..10])).action {
            PacketAction::Hold(p) => p,
            other => panic!("{other:?}"),
        };
        e.handle_timeout(ms(3) + Duration::from_secs(10));
        // Dropped by default (a hello dripped slower than the timeout must not pass as
        // nameless); allowed, the rules judge without a name first (here: the default allows).
        assert_eq!(releases(&mut e), [Release { packet: p, accept: !drop }], "drop {drop}");
        let expected =
            if drop { (FlowVerdict::Drop, UpdateSource::Timeout) } else { (FlowVerdict::Allow, UpdateSource::Host) };
        assert_eq!(final_verdict(&events(&mut e), id).map(|v| (v.0, v.2)), Some(expected));
        assert_eq!(e.stats().hold_timeouts, 1);
    }
}

#[test]
fn a_host_verdict_given_before_the_owner_is_known_waits_behind_the_flows_first_events() {
    let mut e = owner_engine(vec![host_rule("no-blocked", "*.blocked.example", Action::Drop)]);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = e.handle_packet(ms(0), OUT, &c.syn()).flow.expect("tracked");
    let _ = e.handle_packet(ms(1), IN, &c.syn_ack());
    let _ = e.handle_packet(ms(2), OUT, &c.ack());
    let request = b"GET / HTTP/1.1\r\nHost: www.blocked.example\r\n\r\n";
    assert_eq!(e.handle_packet(ms(3), OUT, &at(&c, 0, request)), dropped(id, false));
    assert!(events(&mut e).is_empty(), "the first events wait for the owner, the update behind them");
    e.set_owner(id, Some(owner(42, "/usr/bin/curl", 0, "root")));
    let ev = events(&mut e);
    assert_eq!(names(&ev), ["flow.new", "flow.verdict", "flow.update"]);
    for v in &ev {
        let flow = match &v.kind {
            EventKind::FlowNew { flow } | EventKind::FlowVerdict { flow, .. } | EventKind::FlowUpdate { flow, .. } => {
                flow
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(flow.owner.as_ref().map(|o| o.pid), Some(42), "{}", v.kind.name());
    }
    assert_eq!(final_verdict(&ev, id).map(|v| v.0), Some(FlowVerdict::Drop));
}

#[test]
fn a_copy_that_differs_from_judged_bytes_the_receiver_has_not_acknowledged_is_evasion() {
    // The allowed hello passes, is lost on the way (a short TTL), and a copy naming a blocked
    // host follows: the receiver would keep the copy.
    let mut e = blocking();
    let mut c = Conn::new("198.18.0.2:40000", "203.0.113.7:443");
    let id = forwarded(&mut e, &mut c);
    let good = client_hello("allowed.example", &["h2"], 0, false);
    let bad = client_hello("blocked.example", &["h2"], 0, false);
    assert_eq!(good.len(), bad.len());
    assert_eq!(e.handle_packet(ms(3), FWD, &at(&c, 0, &good)), accepted(id, false));
    assert_eq!(e.handle_packet(ms(4), FWD, &at(&c, 0, &bad)), dropped(id, false));
    assert_eq!(e.stats().overlap_conflicts, 1);
    assert_eq!(
        final_verdict(&events(&mut e), id).map(|v| (v.0, v.2)),
        Some((FlowVerdict::Drop, UpdateSource::Overlap))
    );
}

#[test]
fn a_request_naming_two_hosts_is_evasion() {
    let mut e = blocking();
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = handshake(&mut e, &mut c, ms(0));
    let request = b"GET / HTTP/1.1\r\nHost: allowed.example\r\nHost: www.blocked.example\r\n\r\n";
    assert_eq!(e.handle_packet(ms(3), OUT, &at(&c, 0, request)), dropped(id, false));
    assert_eq!(
        final_verdict(&events(&mut e), id).map(|v| (v.0, v.2)),
        Some((FlowVerdict::Drop, UpdateSource::Overlap))
    );
    assert_eq!(e.stats().overlap_conflicts, 1);
}

#[test]
fn bytes_held_while_the_owner_was_asked_are_read_after_the_flows_first_events() {
    // A process rule holds the flow (its SYN, its request) until the owner is known; then the
    // request is read for its name: its verdict comes after the first events (the engine fuzz
    // target found it before them).
    let rules = vec![
        super::process_rule("curl", "/usr/bin/curl", Action::Allow),
        host_rule("no-blocked", "*.blocked.example", Action::Drop),
    ];
    let mut e = owner_engine(rules);
    let mut c = Conn::new("198.51.100.1:40000", "203.0.113.7:80");
    let id = e.handle_packet(ms(0), OUT, &c.syn()).flow.expect("tracked");
    let _ = e.handle_packet(ms(1), IN, &c.syn_ack());
    let _ = e.handle_packet(ms(2), OUT, &c.ack());
    let request = b"GET / HTTP/1.1\r\nHost: www.blocked.example\r\n\r\n";
    assert!(matches!(e.handle_packet(ms(3), OUT, &at(&c, 0, request)).action, PacketAction::Hold(_)));
    e.set_owner(id, Some(owner(7, "/usr/bin/wget", 0, "root")));
    let ev = events(&mut e);
    assert_eq!(names(&ev), ["flow.new", "flow.verdict", "flow.update"], "{ev:?}");
    assert_eq!(final_verdict(&ev, id).map(|v| (v.0, v.2)), Some((FlowVerdict::Drop, UpdateSource::Host)));
}
