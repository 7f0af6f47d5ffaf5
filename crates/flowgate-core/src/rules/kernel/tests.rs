use super::*;
use crate::flow::{Flow, FlowId};
use crate::rules::matcher::rule_matches;
use crate::rules::{parse_interface, parse_network, parse_ports};
use crate::time::Instant;

fn rule(name: &str, action: Action, f: impl FnOnce(&mut Rule)) -> Rule {
    let mut r = Rule::new(name, action);
    f(&mut r);
    r
}

fn set(rules: Vec<Rule>, default_action: Action) -> RuleSet {
    RuleSet { rules, default_action }
}

const INSPECT: Action = Action::Inspect { peek_outbound: 100, peek_inbound: 0 };

fn kernel_rules(plan: &KernelPlan) -> Vec<Option<usize>> {
    let mut v: Vec<Option<usize>> = plan.entries.iter().map(|e| e.rule).collect();
    v.dedup();
    v
}

#[test]
fn static_rules_and_the_default_are_all_decided_in_the_kernel_with_ids_in_order() {
    let rules = set(
        vec![
            rule("ssh", Action::Drop, |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Tcp);
                r.remote_ports = Some(parse_ports("22").expect("p"));
                r.direction = DirectionMatch::Only(Direction::Inbound);
            }),
            rule("docs", Action::Allow, |r| r.remote = vec![parse_network("192.0.2.0/24").expect("n")]),
        ],
        Action::Allow,
    );
    let plan = KernelPlan::new(&rules, false);
    assert!(plan.user_space.is_empty());
    let ids: Vec<(u16, Option<usize>, Hook)> = plan.entries.iter().map(|e| (e.id, e.rule, e.hook)).collect();
    assert_eq!(
        ids,
        vec![
            (1, Some(0), Hook::Input),
            (2, Some(1), Hook::Output),
            (3, Some(1), Hook::Input),
            (4, Some(1), Hook::Forward),
            (5, None, Hook::Output),
            (6, None, Hook::Input),
            (7, None, Hook::Forward),
        ]
    );
    assert!(plan.decides_everything());
    assert_eq!(plan.entry(3).map(|e| (e.rule, e.hook)), Some((Some(1), Hook::Input)));
    assert_eq!(plan.entry(0), None);
    assert_eq!(plan.entry(8), None);
    assert_eq!(plan.entries[0].verdict, KernelVerdict::Drop { silent: false });
}

#[test]
fn a_rule_after_an_overlapping_user_space_rule_stays_in_user_space_and_disjoint_ones_do_not() {
    let rules = set(
        vec![
            rule("peek-https", INSPECT, |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Tcp);
                r.remote_ports = Some(parse_ports("443").expect("p"));
            }),
            rule("dns", Action::Allow, |r| r.protocol = ProtocolMatch::Only(Protocol::Udp)),
            rule("web", Action::Allow, |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Tcp);
                r.remote_ports = Some(parse_ports("80,8080").expect("p"));
            }),
            rule("icmp", Action::Allow, |r| r.protocol = ProtocolMatch::Only(Protocol::Icmp)),
            rule("docs", Action::Drop, |r| r.remote = vec![parse_network("192.0.2.0/24").expect("n")]),
            rule("after-docs", Action::Allow, |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Udp);
                r.remote = vec![parse_network("192.0.2.128/25").expect("n")];
            }),
            rule("elsewhere", Action::Allow, |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Udp);
                r.remote = vec![parse_network("198.51.100.0/24").expect("n")];
            }),
        ],
        Action::Drop,
    );
    let plan = KernelPlan::new(&rules, false);
    assert_eq!(kernel_rules(&plan), vec![Some(1), Some(2), Some(3), Some(6)]);
    assert_eq!(
        plan.user_space,
        vec![
            (0, UserSpaceReason::Inspects),
            (4, UserSpaceReason::Overlaps { earlier: 0 }),
            // Disjoint from the inspect rule (UDP), but overlaps "docs", which stayed in user space.
            (5, UserSpaceReason::Overlaps { earlier: 4 }),
        ]
    );
    assert!(!plan.decides_everything());
}

#[test]
fn with_a_product_filter_only_drops_are_decided_in_the_kernel() {
    let rules = set(
        vec![
            rule("a", Action::Allow, |r| r.protocol = ProtocolMatch::Only(Protocol::Udp)),
            rule("d", Action::Drop, |r| r.protocol = ProtocolMatch::Only(Protocol::Tcp)),
        ],
        Action::Allow,
    );
    let plan = KernelPlan::new(&rules, true);
    assert_eq!(kernel_rules(&plan), vec![Some(1)]);
    assert_eq!(plan.user_space, vec![(0, UserSpaceReason::ProviderJudges)]);
    let off = KernelPlan::off(&rules);
    assert!(off.entries.is_empty());
    assert_eq!(off.user_space.len(), 2);
}

#[test]
fn owner_rules_stay_in_user_space_and_keep_later_rules_there() {
    let curl = crate::owner::OwnerMatch {
        process: Some(crate::owner::Glob::new("/usr/bin/curl").expect("glob")),
        ..Default::default()
    };
    let rules = set(
        vec![
            rule("curl", Action::Drop, |r| r.owner = curl.clone()),
            rule("tcp", Action::Allow, |r| r.protocol = ProtocolMatch::Only(Protocol::Tcp)),
        ],
        Action::Allow,
    );
    let plan = KernelPlan::new(&rules, false);
    assert!(plan.entries.is_empty(), "the allow after it may match curl's flows");
    assert_eq!(plan.user_space, vec![(0, UserSpaceReason::Owner), (1, UserSpaceReason::Overlaps { earlier: 0 })]);
}

#[test]
fn interface_globs_iptables_cannot_express_stay_in_user_space() {
    let g = |t: &str| parse_interface(t).expect("glob");
    assert_eq!(iptables_prefix(&g("eth0")).as_deref(), Some("eth0"));
    assert_eq!(iptables_prefix(&g("tun*")).as_deref(), Some("tun+"));
    assert_eq!(iptables_prefix(&g("t?n0")), None);
    assert_eq!(iptables_prefix(&g("*vpn")), None);
    let rules = set(vec![rule("x", Action::Drop, |r| r.interface = Some(g("wg?")))], Action::Allow);
    let plan = KernelPlan::new(&rules, false);
    assert_eq!(plan.user_space, vec![(0, UserSpaceReason::InterfaceGlob)]);
    // Two literal names never share a flow.
    let a = rule("a", INSPECT, |r| r.interface = Some(g("eth0")));
    let b = rule("b", Action::Drop, |r| r.interface = Some(g("eth1")));
    assert!(!may_overlap(&a, &b));
    assert!(may_overlap(&a, &rule("c", Action::Drop, |r| r.interface = Some(g("eth*")))));
}

#[test]
fn ids_run_out_at_the_mark_width_and_the_rest_is_judged_in_user_space() {
    let many: Vec<Rule> = (0..300u32)
        .map(|i| {
            rule(&format!("r{i}"), Action::Allow, |r| {
                r.remote = vec![parse_network(&format!("10.{}.{}.0/24", i / 256, i % 256)).expect("n")];
            })
        })
        .collect();
    let plan = KernelPlan::new(&set(many, Action::Allow), false);
    // Three hooks per rule: 170 rules fit in 511 ids.
    assert_eq!(plan.entries.len(), 510);
    assert!(plan.entries.iter().all(|e| (1..=MAX_IDS).contains(&e.id)));
    assert_eq!(plan.user_space.first(), Some(&(170, UserSpaceReason::TooMany)));
    assert_eq!(plan.user_space.len(), 130);
    assert!(!plan.decides_everything());
}

/// xorshift64*, fixed seed: the same rule sets every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_rule(rng: &mut Rng, i: usize) -> Rule {
    let action = match rng.below(4) {
        0 => INSPECT,
        1 => Action::Drop,
        _ => Action::Allow,
    };
    rule(&format!("r{i}"), action, |r| {
        if rng.below(2) == 0 {
            let nets = [
                "192.0.2.0/24",
                "192.0.2.0/25",
                "192.0.2.64/26",
                "198.51.100.0/24",
                "2001:db8::/32",
                "2001:db8:1::/48",
            ];
            r.remote = (0..1 + rng.below(2)).map(|_| parse_network(nets[rng.below(6) as usize]).expect("n")).collect();
        }
        if rng.below(3) == 0 {
            let nets = ["10.0.0.0/8", "10.1.0.0/16", "fd00::/8"];
            r.local = vec![parse_network(nets[rng.below(3) as usize]).expect("n")];
        }
        match rng.below(4) {
            0 => r.protocol = ProtocolMatch::Only(Protocol::Tcp),
            1 => r.protocol = ProtocolMatch::Only(Protocol::Udp),
            2 => r.protocol = ProtocolMatch::Only(Protocol::Icmp),
            _ => {}
        }
        if rng.below(2) == 0 {
            let ports = ["53", "80,443", "1-1024", "443", "8000-9000"];
            r.remote_ports = Some(parse_ports(ports[rng.below(5) as usize]).expect("p"));
        }
        if rng.below(4) == 0 {
            r.local_ports = Some(parse_ports("22,80").expect("p"));
        }
        match rng.below(3) {
            0 => r.direction = DirectionMatch::Only(Direction::Inbound),
            1 => r.direction = DirectionMatch::Only(Direction::Outbound),
            _ => {}
        }
        if rng.below(4) == 0 {
            let g = ["eth0", "eth1", "tun*", "t?n0"];
            r.interface = Some(parse_interface(g[rng.below(4) as usize]).expect("g"));
        }
    })
}

fn random_flow(rng: &mut Rng, hook: Hook) -> Flow {
    let v6 = rng.below(2) == 0;
    let remote: IpAddr = if v6 {
        ["2001:db8::7", "2001:db8:1::9", "2001:db8:2::1"][rng.below(3) as usize].parse().expect("a")
    } else {
        ["192.0.2.7", "192.0.2.70", "192.0.2.200", "198.51.100.1", "203.0.113.5"][rng.below(5) as usize]
            .parse()
            .expect("a")
    };
    let local: IpAddr = if v6 {
        ["fd00::1", "2001:db8:ff::1"][rng.below(2) as usize].parse().expect("a")
    } else {
        ["10.1.2.3", "10.9.0.1", "172.16.0.1"][rng.below(3) as usize].parse().expect("a")
    };
    let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp][rng.below(3) as usize];
    let port = |rng: &mut Rng| [22u16, 53, 80, 443, 1000, 5000, 8080, 40000][rng.below(8) as usize];
    let (lp, rp) = if protocol == Protocol::Icmp { (0, 0) } else { (port(rng), port(rng)) };
    Flow {
        id: FlowId(1),
        protocol,
        direction: hook.direction(),
        local: std::net::SocketAddr::new(local, lp),
        remote: std::net::SocketAddr::new(remote, rp),
        interface: Some(["eth0", "eth1", "tun0", "tin0"][rng.below(4) as usize].into()),
        existing: false,
        forwarded: hook == Hook::Forward,
        started: Instant::from_micros(0),
        icmp: None,
        owner: None,
        host: None,
    }
}

/// The property the data plane stands on: whatever flow the kernel decides with a plan's first
/// matching entry at its hook, user space (first match over every rule) decides with the same
/// rule; flows no entry matches are left to user space.
#[test]
fn the_kernel_decides_a_flow_exactly_as_the_whole_rule_list_would() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut decided, mut left) = (0, 0);
    for round in 0..300 {
        let n = 1 + rng.below(12) as usize;
        let rules: Vec<Rule> = (0..n).map(|i| random_rule(&mut rng, i)).collect();
        let default_action = if rng.below(2) == 0 { Action::Allow } else { Action::Drop };
        let rs = set(rules, default_action);
        let provider = rng.below(4) == 0;
        let plan = KernelPlan::new(&rs, provider);
        for _ in 0..200 {
            let hook = Hook::ALL[rng.below(3) as usize];
            let flow = random_flow(&mut rng, hook);
            let kernel = plan.entries.iter().filter(|e| e.hook == hook).find(|e| match e.rule {
                Some(i) => rule_matches(&rs.rules[i], &flow),
                None => true,
            });
            let Some(k) = kernel else {
                left += 1;
                continue;
            };
            decided += 1;
            let user = rs.rules.iter().position(|r| rule_matches(r, &flow));
            assert_eq!(k.rule, user, "round {round}: {flow:?}\nrules {:#?}\nplan {plan:#?}", rs.rules);
            let action = user.map_or(rs.default_action, |i| rs.rules[i].action);
            match (k.verdict, action) {
                (KernelVerdict::Allow, Action::Allow) | (KernelVerdict::Drop { .. }, Action::Drop) => {}
                other => panic!("round {round}: verdicts differ {other:?}"),
            }
            assert!(!(provider && k.verdict == KernelVerdict::Allow));
        }
    }
    // Both kinds occur often enough for the property to mean something.
    assert!(decided > 5_000 && left > 5_000, "decided {decided}, left {left}");
}
