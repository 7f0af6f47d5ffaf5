//! Lints: rules that are valid but almost certainly not what their author meant.
//!
//! `flowgate rules check` prints these as warnings. Two mistakes matter most for a filter: a
//! network with prefix length 0, which matches every address (the classic `remotePrefix: 0` slip),
//! and a rule that can never fire because an earlier rule already takes every flow it would match.
//! Shadowing is decided field by field (an earlier rule covers a later one when each of its fields
//! is at least as wide); candidates come from a prefix trie of remote networks, so large rule
//! files are checked in close to linear time.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

use super::{DirectionMatch, InterfaceGlob, PortSet, ProtocolMatch, Rule, RuleSet};
use crate::flow::Protocol;
use crate::owner::{Glob, OwnerMatch};

/// A warning about one rule (indexes are positions in the rule set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lint {
    /// The rule's `field` holds a `/0` network: it matches every address of that family.
    MatchesEveryAddress { rule: usize, field: &'static str, network: IpNet },
    /// An earlier rule matches every flow this one would: this one never fires.
    Shadowed { rule: usize, by: usize },
    /// The rule's own fields contradict each other.
    NeverMatches { rule: usize, reason: String },
}

impl Lint {
    pub fn rule(&self) -> usize {
        match self {
            Lint::MatchesEveryAddress { rule, .. } | Lint::Shadowed { rule, .. } | Lint::NeverMatches { rule, .. } => {
                *rule
            }
        }
    }

    /// A sentence for the user, naming the rules involved.
    pub fn message(&self, set: &RuleSet) -> String {
        let name = |i: usize| set.rules.get(i).map_or("?", |r| r.name.as_str());
        match self {
            Lint::MatchesEveryAddress { rule, field, network } => format!(
                "rule `{}`: {field} = \"{network}\" matches every {} address (prefix length 0); \
                 for one host write /32 (or /128), or leave `{field}` out to say \"any\" on purpose",
                name(*rule),
                if network.addr().is_ipv4() { "IPv4" } else { "IPv6" },
            ),
            Lint::Shadowed { rule, by } => format!(
                "rule `{}` can never match: earlier rule `{}` already matches every flow it would",
                name(*rule),
                name(*by)
            ),
            Lint::NeverMatches { rule, reason } => format!("rule `{}` can never match: {reason}", name(*rule)),
        }
    }
}

/// All lints of a rule set, in rule order.
pub fn lint(set: &RuleSet) -> Vec<Lint> {
    let mut out = Vec::new();
    let mut dead = vec![false; set.rules.len()];
    for (i, r) in set.rules.iter().enumerate() {
        for (field, nets) in [("remote", &r.remote), ("local", &r.local)] {
            for n in nets.iter().filter(|n| n.prefix_len() == 0) {
                out.push(Lint::MatchesEveryAddress { rule: i, field, network: *n });
            }
        }
        if let Some(reason) = contradiction(r) {
            dead[i] = true;
            out.push(Lint::NeverMatches { rule: i, reason });
        }
    }
    out.extend(shadowed(set, &dead));
    out.sort_by_key(Lint::rule);
    out
}

fn contradiction(r: &Rule) -> Option<String> {
    let only = |nets: &[IpNet], v4: bool| !nets.is_empty() && nets.iter().all(|n| n.addr().is_ipv4() == v4);
    if (only(&r.remote, true) && only(&r.local, false)) || (only(&r.remote, false) && only(&r.local, true)) {
        return Some("its remote and local networks are of different address families".into());
    }
    let has_ports = r.remote_ports.is_some() || r.local_ports.is_some();
    if has_ports && matches!(r.protocol, ProtocolMatch::Only(Protocol::Icmp)) {
        return Some("it names ports, but ICMP has no ports".into());
    }
    if r.remote_ports.as_ref().is_some_and(PortSet::is_empty) || r.local_ports.as_ref().is_some_and(PortSet::is_empty) {
        return Some("its port set is empty".into());
    }
    None
}

fn shadowed(set: &RuleSet, dead: &[bool]) -> Vec<Lint> {
    // Earlier rules filed by remote network, so a later rule only meets the few that can cover it.
    let mut v4: PrefixMap<Ipv4Net, Vec<usize>> = PrefixMap::new();
    let mut v6: PrefixMap<Ipv6Net, Vec<usize>> = PrefixMap::new();
    let mut any_remote: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    for (j, b) in set.rules.iter().enumerate() {
        if !dead[j] {
            let mut cands: Vec<usize> = any_remote.clone();
            if let Some(first) = b.remote.first() {
                match first {
                    IpNet::V4(n) => v4.cover_values(n).for_each(|l| cands.extend_from_slice(l)),
                    IpNet::V6(n) => v6.cover_values(n).for_each(|l| cands.extend_from_slice(l)),
                }
            } else {
                // Only rules without a remote constraint, or with /0 of both families, can cover.
                if let Some(l) = v4.get(&Ipv4Net::default()) {
                    cands.extend(
                        l.iter().filter(|&&i| {
                            set.rules[i].remote.iter().any(|n| n.prefix_len() == 0 && n.addr().is_ipv6())
                        }),
                    );
                }
            }
            cands.sort_unstable();
            if let Some(&by) = cands.iter().find(|&&i| !dead[i] && covers(&set.rules[i], b)) {
                out.push(Lint::Shadowed { rule: j, by });
            }
        }
        if b.remote.is_empty() {
            any_remote.push(j);
        }
        for n in &b.remote {
            match n {
                IpNet::V4(n) => v4.entry(*n).or_default().push(j),
                IpNet::V6(n) => v6.entry(*n).or_default().push(j),
            }
        }
    }
    out
}

/// Every flow that `b` matches, `a` matches too.
pub fn covers(a: &Rule, b: &Rule) -> bool {
    let protocol = match (a.protocol, b.protocol) {
        (ProtocolMatch::Any, _) => true,
        (ProtocolMatch::Only(x), ProtocolMatch::Only(y)) => x == y,
        (ProtocolMatch::Only(_), ProtocolMatch::Any) => false,
    };
    let direction = match (a.direction, b.direction) {
        (DirectionMatch::Any, _) => true,
        (DirectionMatch::Only(x), DirectionMatch::Only(y)) => x == y,
        (DirectionMatch::Only(_), DirectionMatch::Any) => false,
    };
    protocol
        && direction
        && nets_cover(&a.remote, &b.remote)
        && nets_cover(&a.local, &b.local)
        && ports_cover(&a.remote_ports, &b.remote_ports, b.protocol)
        && ports_cover(&a.local_ports, &b.local_ports, b.protocol)
        && interface_covers(a.interface.as_ref(), b.interface.as_ref())
        && owner_covers(&a.owner, &b.owner)
        && host_covers(&a.host, &b.host)
}

/// `a`'s host names cover `b`'s: `a` names none, or the same ones. Names never cover a rule
/// without any: that rule also matches flows whose host is unknown.
fn host_covers(a: &super::HostMatch, b: &super::HostMatch) -> bool {
    a.is_empty() || (!b.is_empty() && a == b)
}

/// `a`'s owner fields match every owner `b`'s do: none given, or each the same as `b`'s (a glob
/// also covers a literal it matches). An owner field never covers a rule without one: that
/// rule also matches flows whose owner is unknown.
fn owner_covers(a: &OwnerMatch, b: &OwnerMatch) -> bool {
    let glob = |a: &Option<Glob>, b: &Option<Glob>| match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a == b || (!b.as_str().contains(['*', '?', '[']) && a.matches(b.as_str())),
    };
    glob(&a.process, &b.process)
        && glob(&a.unit, &b.unit)
        && glob(&a.cgroup, &b.cgroup)
        && match (&a.user, &b.user) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(x), Some(y)) => x == y,
        }
}

fn nets_cover(a: &[IpNet], b: &[IpNet]) -> bool {
    if a.is_empty() {
        return true;
    }
    if b.is_empty() {
        // `b` matches every address: only /0 of both families covers that.
        return a.iter().any(|n| n.prefix_len() == 0 && n.addr().is_ipv4())
            && a.iter().any(|n| n.prefix_len() == 0 && n.addr().is_ipv6());
    }
    b.iter().all(|bn| a.iter().any(|an| an.contains(bn)))
}

fn ports_cover(a: &Option<PortSet>, b: &Option<PortSet>, b_proto: ProtocolMatch) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(a), Some(b)) => a.covers(b),
        // `b` also matches port-less protocols unless it is limited to TCP or UDP.
        (Some(a), None) => a.len() == 65536 && matches!(b_proto, ProtocolMatch::Only(Protocol::Tcp | Protocol::Udp)),
    }
}

fn interface_covers(a: Option<&InterfaceGlob>, b: Option<&InterfaceGlob>) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a == b || (b.is_literal() && a.matches(b.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Direction;
    use crate::rules::*;

    fn r(name: &str, f: impl FnOnce(&mut Rule)) -> Rule {
        let mut rule = Rule::new(name, Action::Drop);
        f(&mut rule);
        rule
    }

    fn net(s: &str) -> IpNet {
        parse_network(s).expect("net")
    }

    fn lints(rules: Vec<Rule>) -> Vec<Lint> {
        lint(&RuleSet { rules, default_action: Action::Allow })
    }

    #[test]
    fn warns_on_prefix_length_zero() {
        let l = lints(vec![r("oops", |r| r.remote = vec![net("203.0.113.7/0")])]);
        assert_eq!(l, vec![Lint::MatchesEveryAddress { rule: 0, field: "remote", network: net("0.0.0.0/0") }]);
        let set = RuleSet { rules: vec![r("oops", |_| {})], default_action: Action::Allow };
        assert!(l[0].message(&set).contains("/32"));
        assert!(lints(vec![r("fine", |r| r.remote = vec![net("203.0.113.7/32")])]).is_empty());
    }

    #[test]
    fn finds_shadowed_rules() {
        let l = lints(vec![
            r("wide", |r| r.remote = vec![net("203.0.113.0/24")]),
            r("narrow", |r| {
                r.remote = vec![net("203.0.113.7")];
                r.remote_ports = Some(parse_ports("443").expect("p"));
            }),
            r("other-net", |r| r.remote = vec![net("192.0.2.7")]),
        ]);
        assert_eq!(l, vec![Lint::Shadowed { rule: 1, by: 0 }]);
    }

    #[test]
    fn narrower_earlier_rule_does_not_shadow() {
        let l = lints(vec![
            r("narrow", |r| {
                r.remote = vec![net("203.0.113.7")];
                r.protocol = ProtocolMatch::Only(Protocol::Tcp);
            }),
            r("wide", |r| r.remote = vec![net("203.0.113.0/24")]),
            r("ports", |r| r.remote_ports = Some(parse_ports("80-90").expect("p"))),
            r("more-ports", |r| r.remote_ports = Some(parse_ports("80-100").expect("p"))),
            r("in", |r| r.direction = DirectionMatch::Only(Direction::Inbound)),
            r("tun", |r| r.interface = Some(parse_interface("tun0").expect("i"))),
        ]);
        assert!(l.is_empty(), "{l:?}");
    }

    #[test]
    fn catch_all_shadows_everything_after_it() {
        let l = lints(vec![
            r("all-tcp", |r| r.protocol = ProtocolMatch::Only(Protocol::Tcp)),
            r("tcp-tun", |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Tcp);
                r.interface = Some(parse_interface("tun*").expect("i"));
            }),
            r("tcp-host", |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Tcp);
                r.remote = vec![net("2001:db8::1")];
            }),
            r("udp", |r| r.protocol = ProtocolMatch::Only(Protocol::Udp)),
        ]);
        assert_eq!(l, vec![Lint::Shadowed { rule: 1, by: 0 }, Lint::Shadowed { rule: 2, by: 0 }]);
    }

    #[test]
    fn owner_rules_cover_only_rules_of_the_same_or_a_narrower_owner() {
        let owned = |p: &str| r(p, |r| r.owner.process = Some(crate::owner::Glob::new(p).expect("glob")));
        let any = r("any", |_| {});
        assert!(!covers(&owned("/usr/bin/*"), &any), "a program's rule does not shadow a rule for everyone");
        assert!(covers(&any, &owned("/usr/bin/curl")));
        assert!(covers(&owned("/usr/bin/*"), &owned("/usr/bin/curl")));
        assert!(!covers(&owned("/usr/bin/curl"), &owned("/usr/bin/*")));
    }

    #[test]
    fn glob_covers_literal_interface() {
        let l = lints(vec![
            r("tuns", |r| r.interface = Some(parse_interface("tun*").expect("i"))),
            r("tun0", |r| r.interface = Some(parse_interface("tun0").expect("i"))),
        ]);
        assert_eq!(l, vec![Lint::Shadowed { rule: 1, by: 0 }]);
    }

    #[test]
    fn contradictions() {
        let l = lints(vec![
            r("fam", |r| {
                r.remote = vec![net("203.0.113.7")];
                r.local = vec![net("2001:db8::1")];
            }),
            r("icmp-port", |r| {
                r.protocol = ProtocolMatch::Only(Protocol::Icmp);
                r.remote_ports = Some(parse_ports("7").expect("p"));
            }),
        ]);
        assert!(matches!(&l[0], Lint::NeverMatches { rule: 0, .. }));
        assert!(matches!(&l[1], Lint::NeverMatches { rule: 1, .. }));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn host_rules_shadow_only_rules_of_the_same_names() {
        let named = |p: &str| {
            r(p, |r| {
                r.host =
                    super::super::HostMatch::new(&[crate::hosts::HostPattern::parse(p).expect("pattern")], Vec::new())
            })
        };
        let any = r("any", |_| {});
        let lints = lint(&RuleSet { rules: vec![named("a.example"), any.clone()], default_action: Action::Allow });
        assert!(!lints.iter().any(|l| matches!(l, Lint::Shadowed { .. })), "{lints:?}");
        let lints =
            lint(&RuleSet { rules: vec![named("a.example"), named("a.example")], default_action: Action::Allow });
        assert!(lints.iter().any(|l| matches!(l, Lint::Shadowed { .. })), "{lints:?}");
        let lints =
            lint(&RuleSet { rules: vec![named("a.example"), named("b.example")], default_action: Action::Allow });
        assert!(!lints.iter().any(|l| matches!(l, Lint::Shadowed { .. })), "{lints:?}");
    }
}
