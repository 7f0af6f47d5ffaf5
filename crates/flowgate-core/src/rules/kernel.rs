//! The kernel's part of a rule set: which rules the data plane may decide alone, in the kernel,
//! without queueing a flow to user space, and under which ids.
//!
//! A rule is *static* when everything it looks at is in a flow's first packet and the kernel
//! can match it: networks, ports, protocol, direction and an interface glob that iptables can
//! express (a literal name, or a prefix followed by `*`). A rule that inspects, or an allow rule
//! while a product's filter judges beside the rules (the filter could still drop the flow),
//! needs user space.
//!
//! Order is kept exactly. A static rule is decided in the kernel only when no earlier rule
//! that stays in user space could match a flow it matches ([`may_overlap`] errs towards "could":
//! overlap is decided from protocols, directions, networks, ports and literal interface names,
//! within a work budget). A static rule that overlaps an earlier user-space rule stays in user
//! space itself, and so blocks later rules it overlaps in turn. The default action is decided in
//! the kernel only when every rule is.
//!
//! Each rule and hook the kernel decides gets an id (1 to [`MAX_IDS`]) that travels in the
//! conntrack mark of the flows it decides, so conntrack's reports say which rule and which hook
//! (hence direction) decided a flow the engine never saw. Rules past the last id stay in user
//! space.
//!
//! This room computes and reads plans; it touches nothing else. The data plane turns a plan into
//! iptables rules and sets (`flowgate_linux::netfilter`), the engine reads it to judge kernel
//! reports (`engine/kernel.rs`).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Action, DirectionMatch, InterfaceGlob, PortSet, ProtocolMatch, Rule, RuleSet};
use crate::flow::{Direction, Protocol};

/// Most ids a plan hands out (the conntrack mark has 9 bits for them).
pub const MAX_IDS: u16 = 511;

/// Most user-space rules before a static one that are checked for overlap with it; past that
/// the rest of the rule set stays in user space.
const MAX_USER_RULES_CHECKED: usize = 4096;

/// Network comparisons allowed for a whole plan; past that overlap is assumed.
const OVERLAP_BUDGET: u64 = 20_000_000;

/// The netfilter hook a kernel rule sits at, which fixes the direction of the flows it decides.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// Sent by this host: the flow is outbound, its source is local.
    Output,
    /// Addressed to this host: the flow is inbound, its destination is local.
    Input,
    /// Routed through this host: outbound from the opener's side, marked forwarded.
    Forward,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Output, Hook::Input, Hook::Forward];

    /// The direction of a flow whose first packet passed this hook.
    pub fn direction(self) -> Direction {
        match self {
            Hook::Input => Direction::Inbound,
            Hook::Output | Hook::Forward => Direction::Outbound,
        }
    }
}

/// What the kernel does with a flow a kernel rule matches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum KernelVerdict {
    Allow,
    /// Dropped; `silent`: without telling the sender.
    Drop {
        silent: bool,
    },
}

/// One rule (or the default) at one hook, decided in the kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelEntry {
    /// The id flows it decides carry (1 to [`MAX_IDS`]).
    pub id: u16,
    /// Index of the rule in the rule set; `None`: the default action.
    pub rule: Option<usize>,
    pub hook: Hook,
    pub verdict: KernelVerdict,
}

/// Why a rule is judged in user space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserSpaceReason {
    /// The kernel part is turned off (`kernel_rules = false`) or the data plane has none.
    Off,
    /// It inspects the flow's bytes.
    Inspects,
    /// It allows, and a product's filter judges beside the rules.
    ProviderJudges,
    /// Its interface glob has a wildcard iptables cannot express (`?`, or `*` not at the end).
    InterfaceGlob,
    /// It names the owning process, user, unit or cgroup, which only user space learns.
    Owner,
    /// It names hosts, which only user space learns (from the flow's bytes or DNS answers).
    Host,
    /// It allows flows that may be DNS (port 53), whose answers name hosts for host rules: they
    /// must be read in user space.
    Dns,
    /// An earlier rule judged in user space could match the same flows.
    Overlaps { earlier: usize },
    /// All ids are taken, or too many user-space rules come before it to check.
    TooMany,
}

impl std::fmt::Display for UserSpaceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserSpaceReason::Off => f.write_str("kernel rules are off"),
            UserSpaceReason::Inspects => f.write_str("it inspects"),
            UserSpaceReason::ProviderJudges => f.write_str("it allows while a product's filter judges too"),
            UserSpaceReason::InterfaceGlob => f.write_str("its interface glob has a wildcard iptables cannot match"),
            UserSpaceReason::Owner => f.write_str("it names the owning process, user, unit or cgroup"),
            UserSpaceReason::Host => f.write_str("it names hosts, learnt from the flow's bytes or DNS answers"),
            UserSpaceReason::Dns => {
                f.write_str("it allows flows that may be DNS, whose answers name hosts for the host rules")
            }
            UserSpaceReason::Overlaps { earlier } => {
                write!(f, "rule {} before it is judged in user space and may match the same flows", earlier + 1)
            }
            UserSpaceReason::TooMany => f.write_str("the kernel part is full"),
        }
    }
}

/// The kernel's part of one rule set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelPlan {
    /// In rule order (hooks of one rule together), the default's last.
    pub entries: Vec<KernelEntry>,
    /// Rules judged in user space, with the reason, in rule order.
    pub user_space: Vec<(usize, UserSpaceReason)>,
}

impl KernelPlan {
    /// Nothing decided in the kernel.
    pub fn off(rules: &RuleSet) -> Self {
        KernelPlan {
            entries: Vec::new(),
            user_space: (0..rules.rules.len()).map(|i| (i, UserSpaceReason::Off)).collect(),
        }
    }

    /// The plan for `rules`; `provider`: a product's filter judges flows beside the rules.
    pub fn new(rules: &RuleSet, provider: bool) -> Self {
        let mut plan = KernelPlan::default();
        let mut next_id: u16 = 1;
        let mut budget = OVERLAP_BUDGET;
        // Ranges of each earlier user-space rule, computed once.
        let mut user: Vec<(usize, Shape)> = Vec::new();
        let hosts = rules.rules.iter().any(|r| !r.host.is_empty());
        for (i, rule) in rules.rules.iter().enumerate() {
            let hooks = hooks_of(rule.direction);
            let decided = static_verdict(rule, provider).and_then(|verdict| {
                if hosts && verdict == KernelVerdict::Allow && may_be_dns(rule) {
                    return Err(UserSpaceReason::Dns);
                }
                if user.len() > MAX_USER_RULES_CHECKED || usize::from(next_id) + hooks.len() > usize::from(MAX_IDS) + 1
                {
                    return Err(UserSpaceReason::TooMany);
                }
                let shape = Shape::of(rule);
                match user.iter().find(|(_, u)| may_overlap_shapes(u, &shape, &mut budget)) {
                    Some(&(earlier, _)) => Err(UserSpaceReason::Overlaps { earlier }),
                    None => Ok(verdict),
                }
            });
            match decided {
                Ok(verdict) => {
                    for &hook in hooks {
                        plan.entries.push(KernelEntry { id: next_id, rule: Some(i), hook, verdict });
                        next_id += 1;
                    }
                }
                Err(reason) => {
                    let full = reason == UserSpaceReason::TooMany;
                    user.push((i, Shape::of(rule)));
                    plan.user_space.push((i, reason));
                    if full {
                        // Nothing after this can be decided in the kernel either.
                        for j in i + 1..rules.rules.len() {
                            plan.user_space.push((j, UserSpaceReason::TooMany));
                        }
                        return plan;
                    }
                }
            }
        }
        let default = match rules.default_action {
            // With host rules, DNS must reach user space: every rule that is not static keeps
            // the default in user space anyway (a host rule is never static).
            Action::Allow if !provider => Some(KernelVerdict::Allow),
            Action::Drop => Some(KernelVerdict::Drop { silent: false }),
            _ => None,
        };
        if let Some(verdict) = default
            && plan.user_space.is_empty()
            && usize::from(next_id) + Hook::ALL.len() <= usize::from(MAX_IDS) + 1
        {
            for hook in Hook::ALL {
                plan.entries.push(KernelEntry { id: next_id, rule: None, hook, verdict });
                next_id += 1;
            }
        }
        plan
    }

    /// The entry with this id.
    pub fn entry(&self, id: u16) -> Option<&KernelEntry> {
        // Ids are handed out in order from 1.
        self.entries.get(usize::from(id).checked_sub(1)?).filter(|e| e.id == id)
    }

    /// Whether the kernel decides every new flow (the default included): nothing new is queued.
    pub fn decides_everything(&self) -> bool {
        self.entries.iter().any(|e| e.rule.is_none())
    }
}

fn hooks_of(d: DirectionMatch) -> &'static [Hook] {
    match d {
        DirectionMatch::Any => &Hook::ALL,
        DirectionMatch::Only(Direction::Outbound) => &[Hook::Output, Hook::Forward],
        DirectionMatch::Only(Direction::Inbound) => &[Hook::Input],
    }
}

/// Whether a rule may match DNS flows (TCP or UDP to or from port 53), whose answers user space
/// must read to learn names.
fn may_be_dns(rule: &Rule) -> bool {
    let proto = matches!(
        rule.protocol,
        crate::rules::ProtocolMatch::Any
            | crate::rules::ProtocolMatch::Only(crate::flow::Protocol::Tcp | crate::flow::Protocol::Udp)
    );
    // Answers are read from DNS flows this host (or a client behind it) opened: remote port 53.
    let outbound = rule.direction != DirectionMatch::Only(Direction::Inbound);
    proto && outbound && rule.remote_ports.as_ref().is_none_or(|s| s.contains(53))
}

/// The kernel's verdict for a rule, or why it needs user space.
fn static_verdict(rule: &Rule, provider: bool) -> Result<KernelVerdict, UserSpaceReason> {
    if !rule.owner.is_empty() {
        return Err(UserSpaceReason::Owner);
    }
    if !rule.host.is_empty() {
        return Err(UserSpaceReason::Host);
    }
    let verdict = match rule.action {
        Action::Inspect { .. } => return Err(UserSpaceReason::Inspects),
        Action::Allow if provider => return Err(UserSpaceReason::ProviderJudges),
        Action::Allow => KernelVerdict::Allow,
        Action::Drop => KernelVerdict::Drop { silent: rule.silent },
    };
    if let Some(g) = &rule.interface
        && iptables_prefix(g).is_none()
    {
        return Err(UserSpaceReason::InterfaceGlob);
    }
    Ok(verdict)
}

/// The iptables form of an interface glob when iptables can match exactly what it matches: a
/// literal name, or a prefix and a final `*` (`tun*` is `tun+`).
pub fn iptables_prefix(g: &InterfaceGlob) -> Option<String> {
    let t = g.as_str();
    if g.is_literal() {
        return Some(t.to_string());
    }
    let prefix = t.strip_suffix('*')?;
    (!prefix.contains(['*', '?'])).then(|| format!("{prefix}+"))
}

/// A rule's fields as ranges, for overlap checks.
struct Shape {
    protocol: ProtocolMatch,
    direction: DirectionMatch,
    remote: Vec<(u8, u128, u128)>,
    local: Vec<(u8, u128, u128)>,
    remote_ports: Option<PortSet>,
    local_ports: Option<PortSet>,
    interface: Option<String>,
}

impl Shape {
    fn of(rule: &Rule) -> Self {
        Shape {
            protocol: rule.protocol,
            direction: rule.direction,
            remote: ranges(&rule.remote),
            local: ranges(&rule.local),
            remote_ports: rule.remote_ports.clone(),
            local_ports: rule.local_ports.clone(),
            interface: rule.interface.as_ref().filter(|g| g.is_literal()).map(|g| g.as_str().to_string()),
        }
    }
}

/// Networks as sorted, merged (family, first, last) address ranges.
fn ranges(nets: &[IpNet]) -> Vec<(u8, u128, u128)> {
    let mut out: Vec<(u8, u128, u128)> = nets
        .iter()
        .map(|n| {
            let (a, b) = (n.network(), n.broadcast());
            match (a, b) {
                (IpAddr::V4(a), IpAddr::V4(b)) => (4, u128::from(u32::from(a)), u128::from(u32::from(b))),
                (a, b) => (6, to_u128(a), to_u128(b)),
            }
        })
        .collect();
    out.sort_unstable();
    let mut merged: Vec<(u8, u128, u128)> = Vec::with_capacity(out.len());
    for r in out {
        match merged.last_mut() {
            Some(last) if last.0 == r.0 && r.1 <= last.2.saturating_add(1) => last.2 = last.2.max(r.2),
            _ => merged.push(r),
        }
    }
    merged
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Whether two sorted range lists share an address (an empty list is "any"); spends `budget`.
fn nets_overlap(a: &[(u8, u128, u128)], b: &[(u8, u128, u128)], budget: &mut u64) -> bool {
    if a.is_empty() || b.is_empty() {
        return true;
    }
    let cost = (a.len() + b.len()) as u64;
    if cost > *budget {
        return true;
    }
    *budget -= cost;
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        if (x.0, x.2) < (y.0, y.1) {
            i += 1;
        } else if (y.0, y.2) < (x.0, x.1) {
            j += 1;
        } else {
            return true;
        }
    }
    false
}

fn ports_overlap(a: &Option<PortSet>, b: &Option<PortSet>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            let (x, y) = (a.ranges(), b.ranges());
            let (mut i, mut j) = (0, 0);
            while i < x.len() && j < y.len() {
                if x[i].1 < y[j].0 {
                    i += 1;
                } else if y[j].1 < x[i].0 {
                    j += 1;
                } else {
                    return true;
                }
            }
            false
        }
        _ => true,
    }
}

fn may_overlap_shapes(a: &Shape, b: &Shape, budget: &mut u64) -> bool {
    let protocol = match (a.protocol, b.protocol) {
        (ProtocolMatch::Only(x), ProtocolMatch::Only(y)) => x == y,
        _ => true,
    };
    // Ports match only TCP and UDP: a rule with ports and one only for other protocols share
    // nothing.
    let portless =
        |s: &Shape| matches!(s.protocol, ProtocolMatch::Only(p) if !matches!(p, Protocol::Tcp | Protocol::Udp));
    let has_ports = |s: &Shape| s.remote_ports.is_some() || s.local_ports.is_some();
    if !protocol || (has_ports(a) && portless(b)) || (has_ports(b) && portless(a)) {
        return false;
    }
    let direction = match (a.direction, b.direction) {
        (DirectionMatch::Only(x), DirectionMatch::Only(y)) => x == y,
        _ => true,
    };
    let interface = match (&a.interface, &b.interface) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    };
    direction
        && interface
        && ports_overlap(&a.remote_ports, &b.remote_ports)
        && ports_overlap(&a.local_ports, &b.local_ports)
        && nets_overlap(&a.remote, &b.remote, budget)
        && nets_overlap(&a.local, &b.local, budget)
}

/// Whether some flow could match both rules (false only when it is sure none can).
pub fn may_overlap(a: &Rule, b: &Rule) -> bool {
    let mut budget = u64::MAX;
    may_overlap_shapes(&Shape::of(a), &Shape::of(b), &mut budget)
}

#[cfg(test)]
mod tests;
