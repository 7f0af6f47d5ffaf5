//! The compiled rule set: an immutable index over a [`RuleSet`] that classifies a flow in time
//! that does not grow with the number of rules, nor with how many rules cover one address.
//!
//! Each rule is filed once, under its most selective field, as keys of per-side, per-family
//! network tables ([`table`]): under each of its remote networks, with each of its remote ports
//! when it names a few; else under its local networks (with its few local ports); else, when it
//! names a few remote (or local) ports and no network, under the /0 of both families with each
//! port; else under the remote /0 of both families for any port. Classifying a flow probes each
//! table once or twice per prefix length present and keeps the lowest-numbered rule that fully
//! matches, which is exactly first-match order. Every key's rules are in order and each table
//! knows the lowest rule under each prefix length, so a lookup skips whatever cannot beat the
//! best match so far.
//!
//! Beside each filed rule sits a check word: the protocols and directions it matches, and
//! whether anything the key does not already guarantee (an interface glob, the other side's
//! networks or ports, a port set too large to key, an unnamed protocol) is left to check on the
//! rule itself. Most candidates are thus decided without touching the `Rule`.
//!
//! Build once (`compile`), share behind an `Arc`, swap whole on reload; lookups allocate nothing.
//! This module reads rules and flows and touches nothing else.

mod table;

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use self::table::{MAX_ENTRIES, MAX_RULE, Table, TableBuilder, V6};
use super::{Action, DirectionMatch, PortSet, ProtocolMatch, Rule, RuleSet};
use crate::flow::{Direction, Flow, Protocol};
use crate::owner::OwnerView;

/// Rules with at most this many ports in their port set are keyed by port; wider ones are filed
/// for any port and their ports checked on the rule.
const MAX_INDEXED_PORTS: u32 = 64;
/// A rule is keyed by port only if its networks times its ports stay under this: a rule with
/// many networks and many ports would otherwise fill the tables.
const MAX_KEYS_PER_RULE: usize = 1024;

/// The outcome of classifying a flow.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Classification {
    /// Index of the rule that matched; `None` when the default action applied.
    pub rule: Option<usize>,
    pub action: Action,
}

// The check word of a filed rule, and the bits a flow must find in it. 7 bits: the tables keep
// it beside the key.
const TCP: u8 = 1;
const UDP: u8 = 2;
const ICMP: u8 = 4;
const OTHER: u8 = 8;
const OUTBOUND: u8 = 16;
const INBOUND: u8 = 32;
/// The key and the bits above do not decide the rule: check it with [`rule_matches`].
const FULL: u8 = 64;

/// The bits of a check word that `flow` needs.
fn flow_bits(flow: &Flow) -> u8 {
    let proto = match flow.protocol {
        Protocol::Tcp => TCP,
        Protocol::Udp => UDP,
        Protocol::Icmp => ICMP,
        Protocol::Other(_) => OTHER,
    };
    proto | if flow.direction == Direction::Outbound { OUTBOUND } else { INBOUND }
}

/// Which of a rule's fields the key it is filed under already guarantees.
#[derive(Copy, Clone, Default)]
struct Keyed {
    remote_nets: bool,
    local_nets: bool,
    remote_ports: bool,
    local_ports: bool,
}

fn check_word(rule: &Rule, keyed: Keyed) -> u8 {
    let proto = match rule.protocol {
        ProtocolMatch::Any => TCP | UDP | ICMP | OTHER,
        ProtocolMatch::Only(Protocol::Tcp) => TCP,
        ProtocolMatch::Only(Protocol::Udp) => UDP,
        ProtocolMatch::Only(Protocol::Icmp) => ICMP,
        // The bit says "some other protocol"; which one is checked on the rule.
        ProtocolMatch::Only(Protocol::Other(_)) => OTHER | FULL,
    };
    let dir = match rule.direction {
        DirectionMatch::Any => OUTBOUND | INBOUND,
        DirectionMatch::Only(Direction::Outbound) => OUTBOUND,
        DirectionMatch::Only(Direction::Inbound) => INBOUND,
    };
    let unkeyed = rule.interface.is_some()
        || !rule.owner.is_empty()
        || !rule.host.is_empty()
        || (!rule.remote.is_empty() && !keyed.remote_nets)
        || (!rule.local.is_empty() && !keyed.local_nets)
        || (rule.remote_ports.is_some() && !keyed.remote_ports)
        || (rule.local_ports.is_some() && !keyed.local_ports);
    proto | dir | if unkeyed { FULL } else { 0 }
}

/// The tables of one side of a flow, one per address family.
#[derive(Debug)]
struct Side {
    v4: Table<u32>,
    v6: Table<V6>,
}

impl Side {
    fn lookup(&self, at: SocketAddr, ports: bool, best: &mut u32, accept: &impl Fn(u32, u8) -> bool) {
        let port = ports.then_some(at.port());
        match at.ip() {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a), port, best, accept),
            IpAddr::V6(a) => self.v6.lookup(V6::from(a), port, best, accept),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }
}

#[derive(Default)]
struct SideBuilder {
    v4: TableBuilder<u32>,
    v6: TableBuilder<V6>,
}

impl SideBuilder {
    fn push(&mut self, net: IpNet, port: Option<u16>, rule: u32, check: u8) {
        match net {
            IpNet::V4(n) => self.v4.push(u32::from(n.network()), n.prefix_len(), port, rule, check),
            IpNet::V6(n) => self.v6.push(V6::from(n.network()), n.prefix_len(), port, rule, check),
        }
    }

    /// Files under the /0 of both families: the rule names no network on this side.
    fn push_everywhere(&mut self, port: Option<u16>, rule: u32, check: u8) {
        self.v4.push(0, 0, port, rule, check);
        self.v6.push(V6::default(), 0, port, rule, check);
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn build(self) -> Side {
        Side { v4: self.v4.build(), v6: self.v6.build() }
    }
}

/// The ports of `set` when it is small enough to key `nets` networks by port.
fn keyable(set: &Option<PortSet>, nets: usize) -> Option<&PortSet> {
    set.as_ref()
        .filter(|p| p.len() <= MAX_INDEXED_PORTS && (p.len() as usize).saturating_mul(nets) <= MAX_KEYS_PER_RULE)
}

fn ports(set: &PortSet) -> impl Iterator<Item = u16> + '_ {
    set.ranges().iter().flat_map(|&(lo, hi)| lo..=hi)
}

/// How many entries filing `rule` adds, to keep all tables under [`MAX_ENTRIES`].
fn entries_for(rule: &Rule) -> usize {
    let keys = |nets: usize, set: &Option<PortSet>| match keyable(set, nets) {
        Some(p) => nets.saturating_mul(p.len() as usize),
        None => nets,
    };
    if !rule.remote.is_empty() {
        keys(rule.remote.len(), &rule.remote_ports)
    } else if !rule.local.is_empty() {
        keys(rule.local.len(), &rule.local_ports)
    } else {
        // Both families.
        2 * keys(1, &rule.remote_ports).max(keys(1, &rule.local_ports))
    }
}

/// A rule set compiled for matching. Cheap to share; rebuild to change.
pub struct CompiledRules {
    rules: Vec<Rule>,
    /// Rule names, shared into events without copying.
    names: Vec<std::sync::Arc<str>>,
    default_action: Action,
    remote: Side,
    local: Side,
    /// Rules from this index on are not in the tables (past what their indexes and entry counts
    /// can address, far beyond any rule set that fits in memory) and are checked in order when
    /// no indexed rule matches.
    unindexed_from: usize,
    /// Some rule names an owner.
    any_owner_rules: bool,
    /// Some rule names hosts.
    any_host_rules: bool,
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
        Self::compile_within(set, MAX_RULE as usize, MAX_ENTRIES)
    }

    /// `compile`, indexing rules up to index `max_rule` while the tables hold at most
    /// `max_entries`; the rest are checked in order after the index.
    fn compile_within(set: RuleSet, max_rule: usize, max_entries: usize) -> Self {
        let (mut remote, mut local) = (SideBuilder::default(), SideBuilder::default());
        let mut unindexed_from = set.rules.len();
        for (i, rule) in set.rules.iter().enumerate() {
            let entries = remote.len() + local.len();
            let i = match u32::try_from(i) {
                Ok(n) if i <= max_rule && entries.saturating_add(entries_for(rule)) <= max_entries => n,
                _ => {
                    unindexed_from = i;
                    break;
                }
            };
            file(rule, i, &mut remote, &mut local);
        }
        CompiledRules {
            names: set.rules.iter().map(|r| r.name.as_str().into()).collect(),
            any_owner_rules: set.rules.iter().any(|r| !r.owner.is_empty()),
            any_host_rules: set.rules.iter().any(|r| !r.host.is_empty()),
            rules: set.rules,
            default_action: set.default_action,
            remote: remote.build(),
            local: local.build(),
            unindexed_from,
        }
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

    /// Heap bytes the index holds: its tables, not the rules nor their names.
    pub fn index_bytes(&self) -> usize {
        self.remote.heap_bytes() + self.local.heap_bytes()
    }

    /// The first rule that matches `flow` (with its owner and host name, where known), or the
    /// default action.
    pub fn classify(&self, flow: &Flow) -> Classification {
        self.classify_as(flow, owner_view(flow), host_view(flow))
    }

    /// Whether knowing the flow's owner could change its verdict: the first rule that matches
    /// while every owner rule counts as matching names an owner. Until the owner is known, a
    /// flow for which this is false is judged as [`CompiledRules::classify`] judges it.
    pub fn owner_decides(&self, flow: &Flow) -> bool {
        self.any_owner_rules
            && self
                .classify_as(flow, OwnerView::Pending, host_view(flow))
                .rule
                .is_some_and(|i| !self.rules[i].owner.is_empty())
    }

    /// Some rule names an owner (process, user, unit, cgroup).
    pub fn has_owner_rules(&self) -> bool {
        self.any_owner_rules
    }

    /// Whether the host name the flow's own bytes may carry (SNI, HTTP Host) could change its
    /// verdict: the first rule that matches while every host rule counts as matching names
    /// hosts. Such a flow's first bytes are held and read before it is judged.
    pub fn host_decides(&self, flow: &Flow) -> bool {
        self.host_rule_pending(flow).is_some()
    }

    /// The host rule [`CompiledRules::host_decides`] found: the first that may match once the
    /// host name is known.
    pub fn host_rule_pending(&self, flow: &Flow) -> Option<usize> {
        if !self.any_host_rules {
            return None;
        }
        self.classify_as(flow, owner_view(flow), HostView::Pending).rule.filter(|&i| !self.rules[i].host.is_empty())
    }

    /// Some rule names hosts.
    pub fn has_host_rules(&self) -> bool {
        self.any_host_rules
    }

    /// The verdict once a flow's first bytes were looked at: the first rule that matches it
    /// (with its host name, where known) and does not inspect (an inspect rule has had its
    /// look), or the default action.
    pub fn classify_inspected(&self, flow: &Flow) -> Classification {
        let first = self.classify(flow);
        let Some(i) = first.rule.filter(|_| matches!(first.action, Action::Inspect { .. })) else { return first };
        let rest = self.rules.get(i + 1..).unwrap_or(&[]);
        match rest.iter().position(|r| !matches!(r.action, Action::Inspect { .. }) && rule_matches(r, flow)) {
            Some(k) => Classification { rule: Some(i + 1 + k), action: self.rules[i + 1 + k].action },
            None => Classification { rule: None, action: self.default_action },
        }
    }

    fn classify_as(&self, flow: &Flow, view: OwnerView<'_>, host: HostView<'_>) -> Classification {
        let want = flow_bits(flow);
        let accept = |rule: u32, check: u8| {
            check & want == want
                && (check & FULL == 0 || self.rules.get(rule as usize).is_some_and(|r| matches_as(r, flow, view, host)))
        };
        let ports = has_ports(flow.protocol);
        let mut best = u32::MAX;
        self.remote.lookup(flow.remote, ports, &mut best, &accept);
        self.local.lookup(flow.local, ports, &mut best, &accept);
        let first = match best {
            u32::MAX => self.rules.get(self.unindexed_from..).and_then(|tail| {
                tail.iter().position(|r| matches_as(r, flow, view, host)).map(|i| self.unindexed_from + i)
            }),
            i => Some(i as usize),
        };
        match first.and_then(|i| Some((i, self.rules.get(i)?.action))) {
            Some((i, action)) => Classification { rule: Some(i), action },
            None => Classification { rule: None, action: self.default_action },
        }
    }
}

/// Files rule `i` in the tables; see the module doc for where.
fn file(rule: &Rule, i: u32, remote: &mut SideBuilder, local: &mut SideBuilder) {
    if !rule.remote.is_empty() {
        let keyed_ports = keyable(&rule.remote_ports, rule.remote.len());
        let check =
            check_word(rule, Keyed { remote_nets: true, remote_ports: keyed_ports.is_some(), ..Keyed::default() });
        for &net in &rule.remote {
            match keyed_ports {
                Some(set) => ports(set).for_each(|p| remote.push(net, Some(p), i, check)),
                None => remote.push(net, None, i, check),
            }
        }
    } else if !rule.local.is_empty() {
        let keyed_ports = keyable(&rule.local_ports, rule.local.len());
        let check =
            check_word(rule, Keyed { local_nets: true, local_ports: keyed_ports.is_some(), ..Keyed::default() });
        for &net in &rule.local {
            match keyed_ports {
                Some(set) => ports(set).for_each(|p| local.push(net, Some(p), i, check)),
                None => local.push(net, None, i, check),
            }
        }
    } else if let Some(set) = keyable(&rule.remote_ports, 1) {
        let check = check_word(rule, Keyed { remote_ports: true, ..Keyed::default() });
        ports(set).for_each(|p| remote.push_everywhere(Some(p), i, check));
    } else if let Some(set) = keyable(&rule.local_ports, 1) {
        let check = check_word(rule, Keyed { local_ports: true, ..Keyed::default() });
        ports(set).for_each(|p| local.push_everywhere(Some(p), i, check));
    } else {
        remote.push_everywhere(None, i, check_word(rule, Keyed::default()));
    }
}

fn has_ports(p: Protocol) -> bool {
    matches!(p, Protocol::Tcp | Protocol::Udp)
}

/// Whether every field of `rule` matches `flow`. Port fields never match protocols without
/// ports; an interface glob never matches a flow whose interface is unknown, owner fields never
/// one whose owner is unknown.
pub fn rule_matches(rule: &Rule, flow: &Flow) -> bool {
    matches_as(rule, flow, owner_view(flow), host_view(flow))
}

fn owner_view(flow: &Flow) -> OwnerView<'_> {
    match &flow.owner {
        Some(o) => OwnerView::Known(o),
        None => OwnerView::Unknown,
    }
}

fn host_view(flow: &Flow) -> HostView<'_> {
    match flow.host.as_ref().and_then(|h| h.name.as_deref()) {
        Some(name) => HostView::Known(name),
        None => HostView::Unknown,
    }
}

/// What is known of a flow's host name while it is judged.
#[derive(Copy, Clone, Debug)]
enum HostView<'a> {
    /// No name: rules that name hosts do not match.
    Unknown,
    /// Its first bytes are still to be read: rules that name hosts may match.
    Pending,
    Known(&'a str),
}

impl HostView<'_> {
    fn admits(self, m: &super::HostMatch) -> bool {
        if m.is_empty() {
            return true;
        }
        match self {
            HostView::Unknown => false,
            HostView::Pending => true,
            HostView::Known(name) => m.matches(name),
        }
    }
}

fn matches_as(rule: &Rule, flow: &Flow, view: OwnerView<'_>, host: HostView<'_>) -> bool {
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
        && view.admits(&rule.owner)
        && host.admits(&rule.host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{Direction, FlowId};
    use crate::rules::*;
    use crate::time::Instant;
    use std::net::{IpAddr, SocketAddr};

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
            owner: None,
            host: None,
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
        // Rule 0 is filed under the /0 with its port, rule 1 under its network, rule 2 under the
        // /0 for any port: order must still be the file's order.
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

    /// Marsaglia's xorshift64 with a fixed seed: the same rule sets and flows on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[self.below(from.len() as u64) as usize]
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    // Small pools, so that networks nest and overlap and flows land inside them.
    const PORTS: [u16; 12] = [0, 1, 22, 53, 80, 443, 1000, 1001, 1003, 1039, 8080, 65535];
    const V4_LENS: [u8; 11] = [0, 8, 16, 20, 23, 24, 26, 28, 31, 32, 32];
    const V6_LENS: [u8; 10] = [0, 16, 32, 47, 48, 56, 64, 127, 128, 128];

    fn addr(rng: &mut Rng, v6: bool) -> IpAddr {
        if v6 {
            let g = [0x2001, 0xdb8, rng.below(3) as u16, 0, 0, 0, rng.below(2) as u16, rng.below(8) as u16];
            IpAddr::V6(std::net::Ipv6Addr::from(g))
        } else {
            let host = [0, 1, 7, 8, 130, 255][rng.below(6) as usize];
            IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 112 + rng.below(3) as u8, host))
        }
    }

    /// A network of mixed length, sometimes with host bits left below the prefix (as a rule
    /// set built in code may have them).
    fn random_net(rng: &mut Rng) -> IpNet {
        let v6 = rng.chance(40);
        let a = addr(rng, v6);
        let len = if a.is_ipv6() { rng.pick(&V6_LENS) } else { rng.pick(&V4_LENS) };
        let n = IpNet::new(a, len).expect("prefix length in range");
        if rng.chance(80) { n.trunc() } else { n }
    }

    fn random_ports(rng: &mut Rng) -> PortSet {
        match rng.below(7) {
            0 | 1 => {
                let p = rng.pick(&PORTS);
                PortSet::from_ranges(vec![(p, p)])
            }
            2 => PortSet::from_ranges((0..3).map(|_| rng.pick(&PORTS)).map(|p| (p, p)).collect()),
            3 => PortSet::from_ranges(vec![(1000, 1039)]),
            // Too many ports to key: checked on the rule.
            4 => PortSet::from_ranges(vec![(1, 2000)]),
            5 => PortSet::from_ranges(vec![(0, 65535)]),
            // Matches no port at all.
            _ => PortSet::from_ranges(vec![]),
        }
    }

    fn random_rule(rng: &mut Rng, i: usize) -> Rule {
        let action = rng.pick(&[Action::Allow, Action::Drop, Action::Inspect { peek_outbound: 1, peek_inbound: 2 }]);
        let mut r = Rule::new(format!("r{i}"), action);
        if rng.chance(70) {
            // Now and then many networks with many ports: more keys than a rule may have.
            let n = if rng.chance(3) { 30 } else { 1 + rng.below(3) as usize };
            r.remote = (0..n).map(|_| random_net(rng)).collect();
        }
        if rng.chance(25) {
            r.local = (0..1 + rng.below(2)).map(|_| random_net(rng)).collect();
        }
        if rng.chance(50) {
            r.remote_ports = Some(random_ports(rng));
        }
        if rng.chance(25) {
            r.local_ports = Some(random_ports(rng));
        }
        if rng.chance(40) {
            r.protocol = ProtocolMatch::Only(rng.pick(&[
                Protocol::Tcp,
                Protocol::Udp,
                Protocol::Icmp,
                Protocol::Other(47),
                Protocol::Other(50),
            ]));
        }
        if rng.chance(40) {
            r.direction = DirectionMatch::Only(rng.pick(&[Direction::Inbound, Direction::Outbound]));
        }
        if rng.chance(15) {
            r.interface = Some(parse_interface(rng.pick(&["eth0", "tun*", "wg?"])).expect("glob"));
        }
        r
    }

    fn random_flow(rng: &mut Rng) -> Flow {
        let (local_v6, remote_v6) = if rng.chance(5) { (rng.chance(50), rng.chance(50)) } else { (false, false) };
        let remote_v6 = remote_v6 || rng.chance(35);
        let local_v6 = local_v6 || remote_v6;
        Flow {
            id: FlowId(1),
            protocol: rng.pick(&[Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Other(47)]),
            direction: rng.pick(&[Direction::Inbound, Direction::Outbound]),
            local: SocketAddr::new(addr(rng, local_v6), rng.pick(&PORTS)),
            remote: SocketAddr::new(addr(rng, remote_v6), rng.pick(&PORTS)),
            interface: rng.pick(&[None, Some("eth0"), Some("tun0"), Some("wg1"), Some("wg10")]).map(Into::into),
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp: None,
            owner: None,
            host: None,
        }
    }

    fn first_match(set: &RuleSet, f: &Flow) -> Classification {
        match set.rules.iter().position(|r| rule_matches(r, f)) {
            Some(i) => Classification { rule: Some(i), action: set.rules[i].action },
            None => Classification { rule: None, action: set.default_action },
        }
    }

    #[test]
    fn classify_is_the_first_match_on_random_rule_sets() {
        let mut rng = Rng(0x5eed_1d3a_0b5e_55ed);
        let (mut flows, mut matched) = (0, 0);
        for round in 0..150 {
            let n = [1, 5, 30, 120, 400][round % 5];
            let rules = (0..n).map(|i| random_rule(&mut rng, i)).collect();
            let set = RuleSet { rules, default_action: if round % 2 == 0 { Action::Allow } else { Action::Drop } };
            let compiled = CompiledRules::compile(set.clone());
            for _ in 0..400 {
                let f = random_flow(&mut rng);
                let want = first_match(&set, &f);
                assert_eq!(compiled.classify(&f), want, "round {round}, flow {f:?}");
                flows += 1;
                matched += usize::from(want.rule.is_some());
            }
        }
        // The pools are meant to make matches common but not universal: a test where nothing
        // (or everything) matches would prove little.
        assert!(matched > flows / 5 && matched < flows * 9 / 10, "{matched} of {flows} flows matched");
    }

    #[test]
    fn rules_past_the_index_are_checked_in_order() {
        let mut rng = Rng(0x0dd_ba11);
        let rules: Vec<Rule> = (0..200).map(|i| random_rule(&mut rng, i)).collect();
        let set = RuleSet { rules, default_action: Action::Drop };
        // Rules from 50 on are past the index by count, and some earlier by the entry budget.
        for (max_rule, max_entries) in [(50, MAX_ENTRIES), (MAX_RULE as usize, 120), (0, 0)] {
            let compiled = CompiledRules::compile_within(set.clone(), max_rule, max_entries);
            assert!(compiled.unindexed_from < set.rules.len());
            for _ in 0..3000 {
                let f = random_flow(&mut rng);
                assert_eq!(compiled.classify(&f), first_match(&set, &f), "flow {f:?}");
            }
        }
    }
}
