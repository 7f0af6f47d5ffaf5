//! The static part of the rule set on the live daemon: the kernel's plan for the configured
//! rules (`flowgate_core::rules::kernel`), the data plane's static chains made from it
//! (`flowgate_linux::static_rules`), and the table of ids the conntrack watcher and the drop log
//! read to tell the engines where a kernel-decided flow was decided.
//!
//! A flow a static rule decided carries the rule's id in its conntrack mark and no owner: the
//! engine that hears of it is picked by a hash of its original 5-tuple ([`engine_for`]), the same
//! for every report on it and for the log of its dropped packets.
//!
//! This room holds the current id table (swapped on reload) and converts between the two crates'
//! terms; it touches nothing in the kernel itself.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};

use flowgate_core::KernelDecided;
use flowgate_core::Protocol;
use flowgate_core::rules::kernel::{Hook, KernelPlan, KernelVerdict, iptables_prefix};
use flowgate_core::rules::{ProtocolMatch, RuleSet};
use flowgate_linux::static_rules::{StaticHook, StaticProtocol, StaticRule, StaticRules, StaticVerdict};

/// The NFLOG group the kernel logs the packets static rules drop to (per network namespace).
pub(crate) const LOG_GROUP: u16 = 17991;

/// The plan for a rule set: nothing when the kernel part is off.
pub(crate) fn plan(rules: &RuleSet, on: bool, provider: bool) -> KernelPlan {
    if on { KernelPlan::new(rules, provider) } else { KernelPlan::off(rules) }
}

/// The data plane's static rules for a plan.
pub(crate) fn static_rules(rules: &RuleSet, plan: &KernelPlan, generation: u32, log_group: u16) -> StaticRules {
    let out = plan
        .entries
        .iter()
        .map(|e| {
            let hook = match e.hook {
                Hook::Output => StaticHook::Output,
                Hook::Input => StaticHook::Input,
                Hook::Forward => StaticHook::Forward,
            };
            let verdict = match e.verdict {
                KernelVerdict::Allow => StaticVerdict::Allow,
                KernelVerdict::Drop { silent: true } => StaticVerdict::Drop,
                KernelVerdict::Drop { silent: false } => StaticVerdict::Reject,
            };
            let mut r = StaticRule::new(e.id, hook, verdict);
            if let Some(rule) = e.rule.and_then(|i| rules.rules.get(i)) {
                r.protocol = match rule.protocol {
                    ProtocolMatch::Any => StaticProtocol::Any,
                    ProtocolMatch::Only(Protocol::Tcp) => StaticProtocol::Tcp,
                    ProtocolMatch::Only(Protocol::Udp) => StaticProtocol::Udp,
                    ProtocolMatch::Only(Protocol::Icmp) => StaticProtocol::Icmp,
                    // The rule parser names no other protocol; were it to, such a rule would not
                    // be in a plan (see `rules::kernel`), so this is never reached.
                    ProtocolMatch::Only(Protocol::Other(_)) => StaticProtocol::Any,
                };
                r.remote = rule.remote.clone();
                r.local = rule.local.clone();
                r.remote_ports = rule.remote_ports.as_ref().map(|p| p.ranges().to_vec()).unwrap_or_default();
                r.local_ports = rule.local_ports.as_ref().map(|p| p.ranges().to_vec()).unwrap_or_default();
                r.interface = rule.interface.as_ref().and_then(iptables_prefix);
            }
            r
        })
        .collect();
    StaticRules { rules: out, log_group, generation }
}

/// What the kernel says of flows a static rule decided, by id (index 0 is never used).
#[derive(Default)]
pub(crate) struct Ids {
    table: RwLock<Arc<Vec<Option<KernelDecided>>>>,
}

impl Ids {
    pub(crate) fn new(rules: &RuleSet, plan: &KernelPlan) -> Ids {
        let ids = Ids::default();
        ids.set(rules, plan);
        ids
    }

    /// Takes the ids of a new plan (a reload).
    pub(crate) fn set(&self, rules: &RuleSet, plan: &KernelPlan) {
        let max = plan.entries.iter().map(|e| usize::from(e.id)).max().unwrap_or(0);
        let mut table = vec![None; max + 1];
        for e in &plan.entries {
            let interface = e.rule.and_then(|i| rules.rules.get(i)).and_then(|r| r.interface.as_ref());
            table[usize::from(e.id)] =
                Some(KernelDecided { hook: e.hook, interface: interface.map(|g| Arc::from(g.as_str())) });
        }
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }

    /// The table as it is now (cheap: an `Arc`).
    pub(crate) fn current(&self) -> Arc<Vec<Option<KernelDecided>>> {
        self.table.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The engine that hears of a kernel-decided flow, from its original direction's 5-tuple.
pub(crate) fn engine_for(
    protocol: u8,
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
    engines: usize,
) -> usize {
    // SipHash with fixed keys: the same answer in every thread for the daemon's whole life.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (protocol, src, src_port, dst, dst_port).hash(&mut h);
    (h.finish() % engines.max(1) as u64) as usize
}

/// Says, for `flowgate rules check` and the start-up log, which rules the kernel decides.
pub(crate) fn describe(rules: &RuleSet, plan: &KernelPlan) -> String {
    let mut kernel: Vec<usize> = plan.entries.iter().filter_map(|e| e.rule).collect();
    kernel.dedup();
    let default = if plan.decides_everything() { " and the default" } else { "" };
    format!(
        "{} of {} rule{}{default} decided in the kernel",
        kernel.len(),
        rules.rules.len(),
        if rules.rules.len() == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::Direction;
    use flowgate_core::rules::{Action, DirectionMatch, Rule, parse_interface, parse_network, parse_ports};

    #[test]
    fn plans_become_static_rules_and_ids_say_hook_and_interface() {
        let mut a = Rule::new("web", Action::Allow);
        a.protocol = ProtocolMatch::Only(Protocol::Tcp);
        a.remote_ports = Some(parse_ports("80,443").expect("p"));
        a.remote = vec![parse_network("192.0.2.0/24").expect("n")];
        a.direction = DirectionMatch::Only(Direction::Outbound);
        a.interface = Some(parse_interface("tun*").expect("g"));
        let mut d = Rule::new("quiet", Action::Drop);
        d.silent = true;
        let rules = RuleSet { rules: vec![a, d], default_action: Action::Allow };
        let p = plan(&rules, true, false);
        let s = static_rules(&rules, &p, 7, 42);
        assert_eq!((s.generation, s.log_group, s.rules.len()), (7, 42, 8));
        let web = &s.rules[0];
        assert_eq!(
            (web.id, web.hook, web.verdict, web.protocol),
            (1, StaticHook::Output, StaticVerdict::Allow, StaticProtocol::Tcp)
        );
        assert_eq!(web.remote_ports, vec![(80, 80), (443, 443)]);
        assert_eq!(web.interface.as_deref(), Some("tun+"));
        assert_eq!(s.rules[1].hook, StaticHook::Forward);
        assert_eq!(s.rules[2].verdict, StaticVerdict::Drop);
        let ids = Ids::new(&rules, &p);
        let t = ids.current();
        assert_eq!(t[1].as_ref().map(|d| (d.hook, d.interface.as_deref())), Some((Hook::Output, Some("tun*"))));
        assert_eq!(t[3].as_ref().map(|d| d.hook), Some(Hook::Output));
        assert!(t[0].is_none());
        assert_eq!(describe(&rules, &p), "2 of 2 rules and the default decided in the kernel");
        let off = plan(&rules, false, false);
        assert!(static_rules(&rules, &off, 1, 1).rules.is_empty());
    }

    #[test]
    fn the_engine_for_a_flow_is_stable_and_spread() {
        let a: IpAddr = "192.0.2.1".parse().expect("a");
        let b: IpAddr = "198.51.100.1".parse().expect("a");
        let first = engine_for(6, a, 40000, b, 80, 4);
        assert_eq!(first, engine_for(6, a, 40000, b, 80, 4));
        let mut seen = [0usize; 4];
        for port in 40000..40400 {
            seen[engine_for(6, a, port, b, 80, 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
