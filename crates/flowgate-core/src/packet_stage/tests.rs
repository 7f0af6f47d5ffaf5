//! Unit tests of the packet stage: rules, the product's filter, delays and their bounds, faults,
//! counters.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etherparse::PacketBuilder;

use super::*;
use crate::rules::{parse_interface, parse_network, parse_protocol};

fn ms(n: u64) -> Instant {
    Instant::from_micros(n * 1000)
}

fn udp(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let (s, d): (IpAddr, IpAddr) = (src.parse().expect("src"), dst.parse().expect("dst"));
    let b = match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64).udp(40000, 53),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64).udp(40000, 53),
        _ => panic!("mixed families"),
    };
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build");
    out
}

fn icmp_echo(src: &str, dst: &str, seq: u16) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.parse().expect("src"), dst.parse().expect("dst")) else {
        panic!("IPv4 only")
    };
    let mut out = Vec::new();
    PacketBuilder::ipv4(s.octets(), d.octets(), 64)
        .icmpv4_echo_request(7, seq)
        .write(&mut out, b"ping")
        .expect("build");
    out
}

fn rule(name: &str, action: PacketRuleAction, f: impl FnOnce(&mut PacketRule)) -> PacketRule {
    let mut r = PacketRule::new(name, action);
    f(&mut r);
    r
}

fn stage(rules: Vec<PacketRule>, config: PacketStageConfig) -> PacketStage {
    PacketStage::new(config, Arc::new(PacketRules { rules }))
}

fn filtered(globs: &[&str]) -> PacketStageConfig {
    PacketStageConfig {
        filter_interfaces: globs.iter().map(|g| parse_interface(g).expect("glob")).collect(),
        ..PacketStageConfig::default()
    }
}

/// A filter that answers from a script by packet number and records what it saw.
struct Scripted {
    answer: fn(usize) -> PacketVerdict,
    seen: Seen,
}

impl PacketFilter for Scripted {
    fn packet(&mut self, ctx: &PacketContext<'_>) -> PacketVerdict {
        let mut seen = self.seen.lock().expect("seen");
        seen.push((ctx.id, ctx.interface.map(str::to_owned), ctx.direction, ctx.bytes.len()));
        (self.answer)(seen.len())
    }

    fn name(&self) -> &str {
        "scripted"
    }
}

type Seen = Arc<Mutex<Vec<(PacketId, Option<String>, PacketDirection, usize)>>>;

fn scripted(s: &mut PacketStage, answer: fn(usize) -> PacketVerdict) -> Seen {
    let seen: Seen = Arc::default();
    s.set_filter(Box::new(Scripted { answer, seen: seen.clone() }));
    seen
}

const IN: PacketDirection = PacketDirection::Inbound;
const OUT: PacketDirection = PacketDirection::Outbound;
const FWD: PacketDirection = PacketDirection::Forwarded;

#[test]
fn without_rules_or_filter_everything_passes_and_is_counted_per_interface() {
    let mut s = stage(vec![], PacketStageConfig::default());
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    assert_eq!(s.handle_packet(ms(0), Some("tun0"), OUT, &p), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(1), Some("tun0"), OUT, &p), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(2), Some("eth0"), IN, &p), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(3), None, FWD, b"not even IP"), PacketAction::Accept);
    let by: Vec<_> =
        s.interface_stats().into_iter().map(|i| (i.name.to_string(), i.direction, i.counters.packets)).collect();
    assert_eq!(by, [("tun0".to_string(), OUT, 2), ("eth0".to_string(), IN, 1), (OTHER_INTERFACES.to_string(), FWD, 1)]);
    let tun = &s.interface_stats()[0];
    assert_eq!(tun.counters.bytes, 2 * p.len() as u64);
    assert_eq!(s.stats().packets, 4);
    assert_eq!(s.stats().accepted, 4);
}

#[test]
fn packet_rules_first_match_wins_by_interface_direction_protocol_and_address() {
    let rules = vec![
        rule("allow-dns", PacketRuleAction::Allow, |r| {
            r.interface = Some(parse_interface("tun*").expect("glob"));
            r.protocol = parse_protocol("udp").expect("proto");
            r.remote = vec![parse_network("203.0.113.53").expect("net")];
        }),
        rule("cut-tun", PacketRuleAction::Drop, |r| {
            r.interface = Some(parse_interface("tun*").expect("glob"));
            r.directions = Directions::NONE.with(OUT).with(IN);
        }),
    ];
    let mut s = stage(rules, PacketStageConfig::default());
    let dns = udp("198.51.100.1", "203.0.113.53", b"q");
    let other = udp("198.51.100.1", "203.0.113.10", b"q");
    assert_eq!(s.handle_packet(ms(0), Some("tun0"), OUT, &dns), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(1), Some("tun0"), OUT, &other), PacketAction::Drop);
    assert_eq!(s.handle_packet(ms(2), Some("tun1"), IN, &other), PacketAction::Drop);
    // Not its direction, not its interface.
    assert_eq!(s.handle_packet(ms(3), Some("tun0"), FWD, &other), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(4), Some("eth0"), OUT, &other), PacketAction::Accept);
    let hits: Vec<_> = s.rule_hits().into_iter().map(|h| (h.name.to_string(), h.packets, h.bytes)).collect();
    assert_eq!(hits, [("allow-dns".into(), 1, dns.len() as u64), ("cut-tun".into(), 2, 2 * other.len() as u64)]);
    let tun0: Vec<_> = s.interface_stats().into_iter().filter(|i| &*i.name == "tun0").collect();
    assert_eq!(tun0[0].counters.dropped, 1);
}

#[test]
fn remote_and_local_follow_the_direction_and_either_address_when_forwarded() {
    let rules =
        vec![rule("block", PacketRuleAction::Drop, |r| r.remote = vec![parse_network("192.0.2.0/24").expect("net")])];
    let mut s = stage(rules, PacketStageConfig::default());
    let to = udp("198.51.100.1", "192.0.2.9", b"x");
    let from = udp("192.0.2.9", "198.51.100.1", b"x");
    assert_eq!(s.handle_packet(ms(0), Some("eth0"), OUT, &to), PacketAction::Drop);
    assert_eq!(s.handle_packet(ms(1), Some("eth0"), IN, &from), PacketAction::Drop);
    // The far end of an inbound packet is its source: this one's source is not in the rule.
    assert_eq!(s.handle_packet(ms(2), Some("eth0"), IN, &to), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(3), Some("eth0"), FWD, &to), PacketAction::Drop);
    assert_eq!(s.handle_packet(ms(4), Some("eth0"), FWD, &from), PacketAction::Drop);
    let v6 = udp("2001:db8::1", "2001:db8::2", b"x");
    assert_eq!(s.handle_packet(ms(5), Some("eth0"), OUT, &v6), PacketAction::Accept);
}

#[test]
fn unreadable_packets_match_drop_rules_but_never_allow_rules() {
    let allow = rule("allow-udp", PacketRuleAction::Allow, |r| r.protocol = parse_protocol("udp").expect("proto"));
    let drop = rule("drop-to-doc", PacketRuleAction::Drop, |r| {
        r.remote = vec![parse_network("192.0.2.0/24").expect("net")];
        r.protocol = parse_protocol("tcp").expect("proto");
    });
    let mut s = stage(vec![allow, drop], filtered(&["tun*"]));
    let seen = scripted(&mut s, |_| PacketVerdict::Allow);
    // Garbage: no addresses, no protocol. The allow rule does not take it; the drop rule does.
    assert_eq!(s.handle_packet(ms(0), Some("tun0"), OUT, &[0x45, 0, 0]), PacketAction::Drop);
    assert_eq!(s.stats().unparsable, 1);
    assert!(seen.lock().expect("seen").is_empty(), "a packet a rule decided is not shown to the filter");
    // An IPv6 packet whose extension header chain is cut: its addresses are known, its
    // protocol is not.
    let mut v6 = udp("2001:db8::1", "2001:db8::2", b"x");
    v6[6] = 0; // next header: hop-by-hop options, which the payload is not
    v6.truncate(42);
    assert_eq!(s.handle_packet(ms(1), Some("tun0"), OUT, &v6), PacketAction::Accept, "not to 192.0.2.0/24");
    let mut v6b = udp("2001:db8::1", "2001:db8::2", b"x");
    v6b[6] = 0;
    v6b.truncate(42);
    let drop_v6 = rule("drop-v6-tcp", PacketRuleAction::Drop, |r| r.protocol = parse_protocol("tcp").expect("proto"));
    s.set_rules(Arc::new(PacketRules { rules: vec![drop_v6] }));
    assert_eq!(s.handle_packet(ms(2), Some("tun0"), OUT, &v6b), PacketAction::Drop);
}

#[test]
fn the_filter_sees_only_its_interfaces_and_directions_with_ids_and_raw_bytes() {
    let mut config = filtered(&["tun*", "wg0"]);
    config.filter_directions = Directions::NONE.with(IN).with(OUT);
    let mut s = stage(vec![], config);
    let seen = scripted(&mut s, |_| PacketVerdict::Allow);
    let p = udp("198.51.100.1", "203.0.113.10", b"abc");
    for (iface, dir) in [("tun0", OUT), ("wg0", IN), ("wg1", IN), ("eth0", OUT), ("tun3", FWD)] {
        assert_eq!(s.handle_packet(ms(0), Some(iface), dir, &p), PacketAction::Accept);
    }
    // Even bytes that are no IP packet at all reach it.
    assert_eq!(s.handle_packet(ms(1), Some("tun0"), IN, b"\x00junk"), PacketAction::Accept);
    let seen = seen.lock().expect("seen").clone();
    let got: Vec<_> = seen.iter().map(|(_, i, d, n)| (i.clone().unwrap_or_default(), *d, *n)).collect();
    assert_eq!(got, [("tun0".into(), OUT, p.len()), ("wg0".into(), IN, p.len()), ("tun0".into(), IN, 5)]);
    assert_ne!(seen[0].0, seen[1].0, "every packet has an id of its own");
}

#[test]
fn a_filter_drop_drops_and_every_third_echo_is_cut() {
    let mut s = stage(vec![], filtered(&["tun*"]));
    scripted(&mut s, |n| if n % 3 == 0 { PacketVerdict::Drop } else { PacketVerdict::Allow });
    let got: Vec<_> = (1..=9)
        .map(|seq| s.handle_packet(ms(seq.into()), Some("tun0"), OUT, &icmp_echo("10.9.0.1", "10.9.0.2", seq)))
        .collect();
    assert_eq!(got.iter().filter(|a| **a == PacketAction::Drop).count(), 3);
    assert_eq!(s.stats().dropped, 3);
}

#[test]
fn delayed_packets_wait_for_a_release_from_any_thread() {
    let mut s = stage(vec![], filtered(&["tun*"]));
    scripted(&mut s, |_| PacketVerdict::Delay);
    let woken = Arc::new(AtomicUsize::new(0));
    let w = woken.clone();
    s.set_waker(move || {
        w.fetch_add(1, Ordering::SeqCst);
    });
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    let PacketAction::Hold(a) = s.handle_packet(ms(0), Some("tun0"), OUT, &p) else { panic!("held") };
    let PacketAction::Hold(b) = s.handle_packet(ms(1), Some("tun0"), OUT, &p) else { panic!("held") };
    assert_ne!(a, b);
    assert_eq!(s.stats().delayed_now, 2);
    let h = s.handle();
    std::thread::spawn(move || {
        h.release(b, true).expect("alive");
        h.release(a, false).expect("alive");
        h.release(a, true).expect("alive"); // a second release of the same packet does nothing
    })
    .join()
    .expect("thread");
    assert_eq!(woken.load(Ordering::SeqCst), 3);
    assert_eq!(s.poll_release(), None, "commands apply only when the stage is driven");
    s.handle_timeout(ms(2));
    assert_eq!(std::iter::from_fn(|| s.poll_release()).collect::<Vec<_>>(), [(b, true), (a, false)]);
    assert_eq!(s.stats().released, 2);
    assert_eq!(s.stats().delayed_now, 0);
}

#[test]
fn delays_are_bounded_in_count_and_time() {
    let config = PacketStageConfig {
        max_delayed: 2,
        max_delay: Duration::from_millis(500),
        expired_accept: true,
        ..filtered(&["tun*"])
    };
    let mut s = stage(vec![], config);
    scripted(&mut s, |_| PacketVerdict::Delay);
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    let PacketAction::Hold(a) = s.handle_packet(ms(0), Some("tun0"), OUT, &p) else { panic!("held") };
    let PacketAction::Hold(b) = s.handle_packet(ms(100), Some("tun0"), OUT, &p) else { panic!("held") };
    assert_eq!(s.handle_packet(ms(200), Some("tun0"), OUT, &p), PacketAction::Drop, "past max_delayed");
    assert_eq!(s.stats().delay_overflow, 1);
    assert_eq!(s.poll_timeout(), Some(ms(500)));
    s.handle_timeout(ms(499));
    assert_eq!(s.poll_release(), None);
    s.handle_timeout(ms(500));
    assert_eq!(s.poll_release(), Some((a, true)), "expired: the configured verdict");
    assert_eq!(s.poll_release(), None);
    // A packet arriving after b's deadline lets b go too, before it is judged.
    let PacketAction::Hold(_) = s.handle_packet(ms(650), Some("tun0"), OUT, &p) else { panic!("held") };
    assert_eq!(s.poll_release(), Some((b, true)));
    assert_eq!(s.stats().delay_expired, 2);
}

#[test]
fn many_released_delays_leave_no_growing_queue_behind() {
    let config = PacketStageConfig { max_delayed: 16, ..filtered(&["tun*"]) };
    let mut s = stage(vec![], config);
    scripted(&mut s, |_| PacketVerdict::Delay);
    let h = s.handle();
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    for i in 0..10_000 {
        let PacketAction::Hold(id) = s.handle_packet(ms(i), Some("tun0"), OUT, &p) else { panic!("held") };
        h.release(id, true).expect("alive");
        s.handle_timeout(ms(i));
        assert_eq!(s.poll_release(), Some((id, true)));
    }
    assert!(s.deadlines.len() <= 32, "{} deadlines kept", s.deadlines.len());
}

#[test]
fn a_filter_that_panics_or_is_slow_gives_the_fail_mode_and_is_reported() {
    struct Bad(usize);
    impl PacketFilter for Bad {
        fn packet(&mut self, _ctx: &PacketContext<'_>) -> PacketVerdict {
            self.0 += 1;
            if self.0 == 1 {
                panic!("bad packet filter")
            }
            PacketVerdict::Delay
        }
        fn name(&self) -> &str {
            "bad"
        }
    }
    let config = PacketStageConfig { fail_open: false, provider_budget: Duration::from_millis(50), ..filtered(&["*"]) };
    let mut s = stage(vec![], config);
    s.set_filter(Box::new(Bad(0)));
    let clock = Arc::new(AtomicUsize::new(0));
    let c = clock.clone();
    s.set_stopwatch(move || Duration::from_millis(c.fetch_add(60, Ordering::SeqCst) as u64));
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    assert_eq!(s.handle_packet(ms(0), Some("eth0"), OUT, &p), PacketAction::Drop, "panicked: fail closed");
    // Slow (60 ms a call, budget 50 ms): its delay is not honoured.
    assert_eq!(s.handle_packet(ms(1), Some("eth0"), OUT, &p), PacketAction::Drop, "slow: fail closed");
    let faults: Vec<_> = std::iter::from_fn(|| s.poll_fault()).map(|f| (f.provider, f.call, f.kind)).collect();
    assert_eq!(faults[0].0, "bad");
    assert_eq!(faults[0].2, FaultKind::Panic("bad packet filter".into()));
    assert_eq!(faults[1].2, FaultKind::Slow(Duration::from_millis(60)));
    assert_eq!(s.stats().provider_faults, 2);
    assert_eq!(s.stats().delayed_now, 0);
}

#[test]
fn interfaces_past_the_bound_are_counted_together() {
    let mut s = stage(vec![], PacketStageConfig::default());
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    for i in 0..MAX_INTERFACES + 10 {
        let _ = s.handle_packet(ms(0), Some(&format!("veth{i}")), IN, &p);
    }
    let stats = s.interface_stats();
    assert_eq!(stats.len(), MAX_INTERFACES + 1);
    let other = stats.iter().find(|i| &*i.name == OTHER_INTERFACES).expect("other");
    assert_eq!(other.counters.packets, 10);
}

#[test]
fn rules_replaced_through_the_handle_apply_to_the_next_packet() {
    let mut s = stage(vec![], PacketStageConfig::default());
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    assert_eq!(s.handle_packet(ms(0), Some("tun0"), OUT, &p), PacketAction::Accept);
    let cut = rule("cut", PacketRuleAction::Drop, |r| r.interface = Some(parse_interface("tun*").expect("glob")));
    s.handle().set_rules(Arc::new(PacketRules { rules: vec![cut] })).expect("alive");
    assert_eq!(s.handle_packet(ms(1), Some("tun0"), OUT, &p), PacketAction::Drop);
    assert_eq!(s.handle_packet(ms(2), Some("eth0"), OUT, &p), PacketAction::Accept);
    assert_eq!(s.rule_hits()[0].packets, 1);
}

#[test]
fn release_all_gives_every_delayed_packet_the_same_fate() {
    let mut s = stage(vec![], filtered(&["tun*"]));
    scripted(&mut s, |_| PacketVerdict::Delay);
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    let _ = s.handle_packet(ms(0), Some("tun0"), OUT, &p);
    let _ = s.handle_packet(ms(0), Some("tun0"), OUT, &p);
    s.release_all(false);
    let r: Vec<_> = std::iter::from_fn(|| s.poll_release()).collect();
    assert_eq!(r.len(), 2);
    assert!(r.iter().all(|(_, accept)| !accept));
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn the_filter_coverage_can_change_through_the_handle() {
    let mut s = stage(vec![], filtered(&["tun*"]));
    let seen = scripted(&mut s, |_| PacketVerdict::Drop);
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    assert_eq!(s.handle_packet(ms(0), Some("wg0"), OUT, &p), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(1), Some("tun0"), OUT, &p), PacketAction::Drop);
    let wg = vec![parse_interface("wg*").expect("glob")];
    s.handle().set_filter_coverage(wg, Directions::NONE.with(OUT)).expect("alive");
    assert_eq!(s.handle_packet(ms(2), Some("wg0"), OUT, &p), PacketAction::Drop);
    assert_eq!(s.handle_packet(ms(3), Some("wg0"), IN, &p), PacketAction::Accept, "not its direction");
    assert_eq!(s.handle_packet(ms(4), Some("tun0"), OUT, &p), PacketAction::Accept, "no longer covered");
    assert_eq!(seen.lock().expect("seen").len(), 2);
}

#[test]
fn rules_and_the_filter_still_apply_to_interfaces_seen_past_the_bound() {
    let cut = rule("cut", PacketRuleAction::Drop, |r| r.interface = Some(parse_interface("tun*").expect("glob")));
    let mut s = stage(vec![cut], filtered(&["wg*"]));
    let seen = scripted(&mut s, |_| PacketVerdict::Allow);
    let p = udp("198.51.100.1", "203.0.113.10", b"x");
    for i in 0..MAX_INTERFACES {
        let _ = s.handle_packet(ms(0), Some(&format!("veth{i}")), IN, &p);
    }
    // Counted together with other late interfaces, but judged by their own names.
    assert_eq!(s.handle_packet(ms(1), Some("tun9"), OUT, &p), PacketAction::Drop);
    assert_eq!(s.handle_packet(ms(2), Some("eth9"), OUT, &p), PacketAction::Accept);
    assert_eq!(s.handle_packet(ms(3), Some("wg7"), OUT, &p), PacketAction::Accept);
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1.as_deref(), Some("wg7"), "the filter is told the real name");
    assert_eq!(s.rule_hits()[0].packets, 1);
    let other = s.interface_stats().into_iter().find(|i| &*i.name == OTHER_INTERFACES).expect("other");
    assert_eq!((other.counters.packets, other.counters.dropped), (3, 1));
}

#[test]
fn covers_says_which_interfaces_and_directions_something_judges() {
    let cut = rule("cut", PacketRuleAction::Drop, |r| {
        r.interface = Some(parse_interface("tun*").expect("glob"));
        r.directions = Directions::NONE.with(FWD);
    });
    let mut config = filtered(&["wg0"]);
    config.filter_directions = Directions::NONE.with(IN);
    let s = stage(vec![cut], config);
    assert!(s.covers("tun3", FWD));
    assert!(!s.covers("tun3", OUT), "the rule's directions only");
    assert!(s.covers("wg0", IN));
    assert!(!s.covers("wg0", FWD), "the filter's directions only");
    assert!(!s.covers("eth0", FWD));
    let all = stage(vec![PacketRule::new("all", PacketRuleAction::Drop)], PacketStageConfig::default());
    assert!(all.covers("eth0", FWD), "a rule without an interface covers every one");
}
