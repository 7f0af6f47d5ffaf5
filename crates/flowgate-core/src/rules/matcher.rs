//! The compiled rule set: an immutable index over a [`RuleSet`] that classifies a flow in time
//! that does not grow with the number of rules.
//!
//! Each rule is filed once, under its most selective field: its remote networks (a prefix trie
//! per address family, from `prefix-trie`), else its local networks, else a short list of remote
//! or local ports (hash maps by port), else a short "rest" list. Classifying a flow collects the
//! candidate lists that can apply to it (the trie nodes covering its addresses, its ports, the
//! rest) and keeps the lowest-numbered rule that fully matches, which is exactly first-match
//! order. Each list is sorted, so a scan stops at its first match or at the best found so far.
//! Build once (`compile`), share behind an `Arc`, swap whole on reload; lookups allocate nothing.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

use super::{Action, Rule, RuleSet};
use crate::flow::{Flow, Protocol};

/// Rules with at most this many ports in their port set are filed by port; wider ones would
/// bloat the port maps and go to the rest list.
const MAX_INDEXED_PORTS: u32 = 64;

/// The outcome of classifying a flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    /// Index of the rule that matched; `None` when the default action applied.
    pub rule: Option<usize>,
    pub action: Action,
}

#[derive(Default)]
struct NetIndex {
    v4: PrefixMap<Ipv4Net, Vec<u32>>,
    v6: PrefixMap<Ipv6Net, Vec<u32>>,
}

impl NetIndex {
    fn insert(&mut self, net: IpNet, rule: u32) {
        match net {
            IpNet::V4(n) => self.v4.entry(n).or_default().push(rule),
            IpNet::V6(n) => self.v6.entry(n).or_default().push(rule),
        }
    }

    fn for_each_cover(&self, addr: IpAddr, mut f: impl FnMut(&[u32])) {
        match addr {
            IpAddr::V4(a) => {
                for v in self.v4.cover_values(&Ipv4Net::from(a)) {
                    f(v);
                }
            }
            IpAddr::V6(a) => {
                for v in self.v6.cover_values(&Ipv6Net::from(a)) {
                    f(v);
                }
            }
        }
    }
}

/// A rule set compiled for matching. Cheap to share; rebuild to change.
pub struct CompiledRules {
    rules: Vec<Rule>,
    /// Rule names, shared into events without copying.
    names: Vec<std::sync::Arc<str>>,
    default_action: Action,
    remote: NetIndex,
    local: NetIndex,
    remote_port: HashMap<u16, Vec<u32>>,
    local_port: HashMap<u16, Vec<u32>>,
    rest: Vec<u32>,
}

impl std::fmt::Debug for CompiledRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRules")
            .field("rules", &self.rules.len())
            .field("default_action", &self.default_action)
            .finish()
    }
}

impl CompiledRules {
    /// Builds the index. Rules keep their order: index `i` is the `i`-th rule.
    pub fn compile(set: RuleSet) -> Self {
        let mut c = CompiledRules {
            rules: Vec::new(),
            names: set.rules.iter().map(|r| r.name.as_str().into()).collect(),
            default_action: set.default_action,
            remote: NetIndex::default(),
            local: NetIndex::default(),
            remote_port: HashMap::new(),
            local_port: HashMap::new(),
            rest: Vec::new(),
        };
        for (i, rule) in set.rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let small = |p: &Option<super::PortSet>| {
                p.as_ref().filter(|p| p.len() <= MAX_INDEXED_PORTS).map(|p| p.ranges().to_vec())
            };
            if !rule.remote.is_empty() {
                rule.remote.iter().for_each(|n| c.remote.insert(*n, i));
            } else if !rule.local.is_empty() {
                rule.local.iter().for_each(|n| c.local.insert(*n, i));
            } else if let Some(ranges) = small(&rule.remote_ports) {
                for (lo, hi) in ranges {
                    (lo..=hi).for_each(|p| c.remote_port.entry(p).or_default().push(i));
                }
            } else if let Some(ranges) = small(&rule.local_ports) {
                for (lo, hi) in ranges {
                    (lo..=hi).for_each(|p| c.local_port.entry(p).or_default().push(i));
                }
            } else {
                c.rest.push(i);
            }
        }
        c.rules = set.rules;
        c
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The name of rule `i`, shared.
    pub fn name(&self, i: usize) -> Option<&std::sync::Arc<str>> {
        self.names.get(i)
    }

    pub fn default_action(&self) -> Action {
        self.default_action
    }

    /// The first rule that matches `flow`, or the default action.
    pub fn classify(&self, flow: &Flow) -> Classification {
        let mut best = u32::MAX;
        let mut scan = |list: &[u32]| {
            for &i in list {
                if i >= best {
                    return;
                }
                if rule_matches(&self.rules[i as usize], flow) {
                    best = i;
                    return;
                }
            }
        };
        self.remote.for_each_cover(flow.remote.ip(), &mut scan);
        self.local.for_each_cover(flow.local.ip(), &mut scan);
        if has_ports(flow.protocol) {
            if let Some(l) = self.remote_port.get(&flow.remote.port()) {
                scan(l);
            }
            if let Some(l) = self.local_port.get(&flow.local.port()) {
                scan(l);
            }
        }
        scan(&self.rest);
        match best {
            u32::MAX => Classification { rule: None, action: self.default_action },
            i => Classification { rule: Some(i as usize), action: self.rules[i as usize].action },
        }
    }
}

fn has_ports(p: Protocol) -> bool {
    matches!(p, Protocol::Tcp | Protocol::Udp)
}

/// Whether every field of `rule` matches `flow`. Port fields never match protocols without
/// ports; an interface glob never matches a flow whose interface is unknown.
pub fn rule_matches(rule: &Rule, flow: &Flow) -> bool {
    let ports_ok = |set: &Option<super::PortSet>, port: u16| match set {
        None => true,
        Some(s) => has_ports(flow.protocol) && s.contains(port),
    };
    rule.protocol.matches(flow.protocol)
        && rule.direction.matches(flow.direction)
        && (rule.remote.is_empty() || rule.remote.iter().any(|n| n.contains(&flow.remote.ip())))
        && (rule.local.is_empty() || rule.local.iter().any(|n| n.contains(&flow.local.ip())))
        && ports_ok(&rule.remote_ports, flow.remote.port())
        && ports_ok(&rule.local_ports, flow.local.port())
        && match &rule.interface {
            None => true,
            Some(g) => flow.interface.as_deref().is_some_and(|i| g.matches(i)),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Direction, FlowId};
    use crate::rules::*;
    use crate::time::Instant;

    fn flow(proto: Protocol, dir: Direction, local: &str, remote: &str, iface: Option<&str>) -> Flow {
        Flow {
            id: FlowId(1),
            protocol: proto,
            direction: dir,
            local: local.parse().expect("local"),
            remote: remote.parse().expect("remote"),
            interface: iface.map(Into::into),
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp: None,
        }
    }

    fn out_tcp(remote: &str) -> Flow {
        flow(Protocol::Tcp, Direction::Outbound, "198.51.100.1:40000", remote, Some("eth0"))
    }

    fn rule(name: &str, action: Action, f: impl FnOnce(&mut Rule)) -> Rule {
        let mut r = Rule::new(name, action);
        f(&mut r);
        r
    }

    fn net(s: &str) -> IpNet {
        parse_network(s).expect("net")
    }

    fn classify(rules: Vec<Rule>, f: &Flow) -> Option<String> {
        let c = CompiledRules::compile(RuleSet { rules, default_action: Action::Allow });
        c.classify(f).rule.map(|i| c.rules()[i].name.clone())
    }

    #[test]
    fn slash_32_is_one_host_and_slash_0_is_everything() {
        let rules = vec![rule("one", Action::Drop, |r| r.remote = vec![net("203.0.113.7")])];
        assert_eq!(classify(rules.clone(), &out_tcp("203.0.113.7:80")).as_deref(), Some("one"));
        assert_eq!(classify(rules, &out_tcp("203.0.113.8:80")), None);
        let all = vec![rule("all", Action::Drop, |r| r.remote = vec![net("0.0.0.0/0")])];
        assert_eq!(classify(all.clone(), &out_tcp("192.0.2.99:1")).as_deref(), Some("all"));
        // A v4 /0 says nothing about IPv6.
        assert_eq!(classify(all, &out_tcp("[2001:db8::1]:1")), None);
    }

    #[test]
    fn ipv6_networks() {
        let rules = vec![rule("v6", Action::Drop, |r| r.remote = vec![net("2001:db8:2::/48")])];
        assert_eq!(classify(rules.clone(), &out_tcp("[2001:db8:2::10]:443")).as_deref(), Some("v6"));
        assert_eq!(classify(rules, &out_tcp("[2001:db8:3::10]:443")), None);
    }

    #[test]
    fn first_match_wins_across_index_buckets() {
        // Rule 0 is filed under ports, rule 1 under remote networks, rule 2 in the rest list:
        // order must still be the file's order.
        let rules = vec![
            rule("port", Action::Allow, |r| r.remote_ports = Some(parse_ports("443").expect("p"))),
            rule("net", Action::Drop, |r| r.remote = vec![net("203.0.113.0/24")]),
            rule("rest", Action::Drop, |r| r.protocol = ProtocolMatch::Only(Protocol::Tcp)),
        ];
        assert_eq!(classify(rules.clone(), &out_tcp("203.0.113.7:443")).as_deref(), Some("port"));
        assert_eq!(classify(rules.clone(), &out_tcp("203.0.113.7:80")).as_deref(), Some("net"));
        assert_eq!(classify(rules.clone(), &out_tcp("192.0.2.1:80")).as_deref(), Some("rest"));
        let mut reversed = rules;
        reversed.reverse();
        assert_eq!(classify(reversed, &out_tcp("203.0.113.7:443")).as_deref(), Some("rest"));
    }

    #[test]
    fn more_specific_later_rule_does_not_beat_earlier_broad_one() {
        let rules = vec![
            rule("broad", Action::Allow, |r| r.remote = vec![net("203.0.0.0/8")]),
            rule("narrow", Action::Drop, |r| r.remote = vec![net("203.0.113.7/32")]),
        ];
        assert_eq!(classify(rules, &out_tcp("203.0.113.7:80")).as_deref(), Some("broad"));
    }

    #[test]
    fn port_ranges_protocol_direction_interface() {
        let rules = vec![rule("r", Action::Drop, |r| {
            r.remote_ports = Some(parse_ports("80,8000-8080").expect("p"));
            r.protocol = ProtocolMatch::Only(Protocol::Tcp);
            r.direction = DirectionMatch::Only(Direction::Outbound);
            r.interface = Some(parse_interface("eth*").expect("g"));
        })];
        let hit = |f: &Flow| classify(rules.clone(), f).is_some();
        assert!(hit(&out_tcp("192.0.2.1:8042")));
        assert!(!hit(&out_tcp("192.0.2.1:8081")));
        assert!(!hit(&flow(Protocol::Udp, Direction::Outbound, "198.51.100.1:1", "192.0.2.1:80", Some("eth0"))));
        assert!(!hit(&flow(Protocol::Tcp, Direction::Inbound, "198.51.100.1:1", "192.0.2.1:80", Some("eth0"))));
        assert!(!hit(&flow(Protocol::Tcp, Direction::Outbound, "198.51.100.1:1", "192.0.2.1:80", Some("tun0"))));
        assert!(!hit(&flow(Protocol::Tcp, Direction::Outbound, "198.51.100.1:1", "192.0.2.1:80", None)));
    }

    #[test]
    fn ports_never_match_icmp_and_local_side_is_checked() {
        let rules = vec![
            rule("p", Action::Drop, |r| r.remote_ports = Some(parse_ports("0-65535").expect("p"))),
            rule("l", Action::Drop, |r| {
                r.local = vec![net("198.51.100.0/24")];
                r.local_ports = Some(parse_ports("22").expect("p"));
            }),
        ];
        let icmp = flow(Protocol::Icmp, Direction::Outbound, "198.51.100.1:7", "192.0.2.1:7", None);
        assert_eq!(classify(rules.clone(), &icmp), None);
        let ssh_in = flow(Protocol::Udp, Direction::Inbound, "198.51.100.1:22", "192.0.2.1:5000", None);
        assert_eq!(classify(rules, &ssh_in).as_deref(), Some("p"));
    }

    #[test]
    fn interface_glob_selects_tunnels() {
        let rules = vec![rule("tun", Action::Drop, |r| r.interface = Some(parse_interface("tun*").expect("g")))];
        let t = flow(Protocol::Udp, Direction::Outbound, "192.0.2.1:1", "192.0.2.2:2", Some("tun0"));
        assert_eq!(classify(rules, &t).as_deref(), Some("tun"));
    }

    #[test]
    fn default_applies_when_nothing_matches() {
        let c = CompiledRules::compile(RuleSet { rules: vec![], default_action: Action::Drop });
        assert_eq!(c.classify(&out_tcp("192.0.2.1:1")), Classification { rule: None, action: Action::Drop });
    }

    #[test]
    fn index_agrees_with_linear_scan_on_many_rules() {
        // A pseudo-random mix of rule shapes, checked against the obvious first-match loop.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut rules = Vec::new();
        for i in 0..400 {
            let n = next();
            let r = rule(&format!("r{i}"), if n & 1 == 0 { Action::Drop } else { Action::Allow }, |r| {
                match (n >> 1) % 5 {
                    0 => r.remote = vec![net(&format!("203.0.113.{}/{}", (n >> 8) % 256, 24 + (n >> 16) % 9))],
                    1 => r.local = vec![net(&format!("198.51.100.{}/{}", (n >> 8) % 256, 28 + (n >> 16) % 5))],
                    2 => r.remote_ports = Some(parse_ports(&format!("{}", (n >> 8) % 64)).expect("p")),
                    3 => r.local_ports = Some(parse_ports(&format!("{}-{}", (n >> 8) % 64, 200)).expect("p")),
                    _ => r.protocol = ProtocolMatch::Only(Protocol::Udp),
                }
                if (n >> 24) % 3 == 0 {
                    r.direction = DirectionMatch::Only(Direction::Inbound);
                }
            });
            rules.push(r);
        }
        let compiled = CompiledRules::compile(RuleSet { rules: rules.clone(), default_action: Action::Allow });
        for _ in 0..2000 {
            let n = next();
            let f = flow(
                if n & 1 == 0 { Protocol::Tcp } else { Protocol::Udp },
                if n & 2 == 0 { Direction::Outbound } else { Direction::Inbound },
                &format!("198.51.100.{}:{}", (n >> 8) % 256, (n >> 16) % 256),
                &format!("203.0.113.{}:{}", (n >> 24) % 256, (n >> 32) % 70),
                None,
            );
            let linear = rules.iter().position(|r| rule_matches(r, &f));
            assert_eq!(compiled.classify(&f).rule, linear, "flow {f:?}");
        }
    }
}
