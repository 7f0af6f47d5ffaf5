//! Static verdicts in the kernel: the rules the kernel decides alone, as iptables rules in
//! flowgate's static chains and ipsets that hold their networks and ports.
//!
//! The engine's plan (`flowgate_core::rules::kernel`) says which rules, at which hook, under
//! which id; this room writes them down for the kernel. For each hook with static rules,
//! flowgate's hook chain ([`crate::netfilter`], step 7) jumps, for a flow's first packet only
//! (`--ctstate NEW`, for TCP a SYN) that carries no verdict yet, into the static chain
//! ([`STATIC_OUT`], [`STATIC_IN`], [`STATIC_FWD`]). There each rule, in order, sets the packet
//! mark to its verdict and its id ([`crate::marks::RULE`]) unless an earlier one did. Back in the
//! hook chain ([`hook_tail`]) the mark is saved to the conntrack entry, an allowed flow returns to
//! the host's own rules, and a dropped one is logged to NFLOG group
//! [`StaticRules::log_group`] (the log carries the mark, so the id) and rejected or dropped. The
//! conntrack entry of an allowed flow carries its id from its creation on, so conntrack's
//! reports on it say which rule and hook decided it; later packets return at step 2 like any
//! decided flow.
//!
//! A rule's networks live in an ipset (`hash:net`, one per rule, side and family; a single
//! network is matched directly), its ports in `multiport` (up to 15 ports or ranges) or a
//! `bitmap:port` set. Lookups in a hash set stay fast at a million entries, so a rule's cost does
//! not grow with its networks; the static chain itself is scanned in order, one set lookup per
//! rule, for a new flow's first packet only.
//!
//! Sets are named `flowgate-<generation>-<id><side><family>`; a reload loads the next
//! generation's sets, swaps each family's static chains in one `iptables-restore` transaction
//! (a first packet sees the old rules or the new ones, never none) and then destroys the sets no
//! chain uses any more. Removal destroys every `flowgate-` set after the chains are gone.
//!
//! This room builds the text of rules and sets, and runs `ipset`; it decides nothing.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;

use crate::marks;
use crate::netfilter::{Family, NetfilterError, Step, Tools, run};

/// flowgate's static chain for locally generated first packets.
pub const STATIC_OUT: &str = "FLOWGATE-S-OUT";
/// flowgate's static chain for first packets to this host.
pub const STATIC_IN: &str = "FLOWGATE-S-IN";
/// flowgate's static chain for routed first packets.
pub const STATIC_FWD: &str = "FLOWGATE-S-FWD";

/// The prefix of every ipset flowgate creates.
pub const SET_PREFIX: &str = "flowgate-";

/// Longest multiport list (iptables counts a range as two of its 15 slots).
const MULTIPORT_SLOTS: usize = 15;

/// Where a static rule sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaticHook {
    Output,
    Input,
    Forward,
}

impl StaticHook {
    pub(crate) fn chain(self) -> &'static str {
        match self {
            StaticHook::Output => STATIC_OUT,
            StaticHook::Input => STATIC_IN,
            StaticHook::Forward => STATIC_FWD,
        }
    }
}

/// What a static rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaticVerdict {
    Allow,
    /// Dropped, and the sender told (TCP reset, ICMP port unreachable).
    Reject,
    /// Dropped silently.
    Drop,
}

/// The protocols a static rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaticProtocol {
    Any,
    Tcp,
    Udp,
    Icmp,
}

/// One rule at one hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRule {
    /// 1 to [`marks::MAX_RULE_IDS`].
    pub id: u16,
    pub hook: StaticHook,
    pub verdict: StaticVerdict,
    pub protocol: StaticProtocol,
    /// Networks of the remote and of the local end; empty: any.
    pub remote: Vec<IpNet>,
    pub local: Vec<IpNet>,
    /// Port ranges of each end; empty: any.
    pub remote_ports: Vec<(u16, u16)>,
    pub local_ports: Vec<(u16, u16)>,
    /// The interface in iptables' form (`eth0`, `tun+`).
    pub interface: Option<String>,
}

impl StaticRule {
    /// A rule at `hook` that matches every new flow there; narrow it with the fields.
    pub fn new(id: u16, hook: StaticHook, verdict: StaticVerdict) -> Self {
        StaticRule {
            id,
            hook,
            verdict,
            protocol: StaticProtocol::Any,
            remote: Vec::new(),
            local: Vec::new(),
            remote_ports: Vec::new(),
            local_ports: Vec::new(),
            interface: None,
        }
    }
}

/// The static rules of one rule set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StaticRules {
    pub rules: Vec<StaticRule>,
    /// The NFLOG group kernel drops are logged to.
    pub log_group: u16,
    /// Which sets the rules use (see the module documentation); a reload takes the next one.
    pub generation: u32,
}

impl StaticRules {
    fn at(&self, hook: StaticHook) -> impl Iterator<Item = &StaticRule> {
        self.rules.iter().filter(move |r| r.hook == hook)
    }

    /// Whether any rule sits at `hook`.
    pub fn any_at(&self, hook: StaticHook) -> bool {
        self.at(hook).next().is_some()
    }
}

fn family_of(n: &IpNet) -> Family {
    if matches!(n.addr(), IpAddr::V4(_)) { Family::Ipv4 } else { Family::Ipv6 }
}

/// A side of a rule.
#[derive(Clone, Copy)]
enum Side {
    Remote,
    Local,
}

fn set_name(generation: u32, id: u16, side: Side, kind: &str) -> String {
    let s = match side {
        Side::Remote => 'r',
        Side::Local => 'l',
    };
    format!("{SET_PREFIX}{generation}-{id}{s}{kind}")
}

/// The rules that go to the hook chain after the jump into the static chain: save the mark,
/// return an allowed flow, log and drop a dropped one.
pub(crate) fn hook_tail(ipv6: bool, log_group: u16) -> Vec<String> {
    let unreachable = if ipv6 { "icmp6-port-unreachable" } else { "icmp-port-unreachable" };
    let v = |value: u32| format!("{value:#x}/{:#x}", marks::VERDICT);
    let (allow, reject) = (v(marks::ALLOW), v(marks::REJECT));
    let none = format!("0x0/{:#x}", marks::VERDICT);
    vec![
        format!(
            "-m mark ! --mark {none} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}",
            mask = marks::MASK
        ),
        format!("-m mark --mark {allow} -j RETURN"),
        format!("-m mark ! --mark {none} -j NFLOG --nflog-group {log_group} --nflog-prefix flowgate"),
        format!("-p tcp -m mark --mark {reject} -j REJECT --reject-with tcp-reset"),
        format!("-m mark --mark {reject} -j REJECT --reject-with {unreachable}"),
        format!("-m mark ! --mark {none} -j DROP"),
    ]
}

/// The jump from a hook chain into its static chain: first packets without a verdict.
pub(crate) fn hook_jump(hook: StaticHook) -> String {
    format!(
        "-m conntrack --ctstate NEW -m mark --mark 0x0/{v:#x} -m connmark --mark 0x0/{v:#x} -j {}",
        hook.chain(),
        v = marks::VERDICT
    )
}

/// The `-A` lines of the static chains for one family.
pub(crate) fn chain_rules(statics: &StaticRules, ipv6: bool) -> String {
    let family = if ipv6 { Family::Ipv6 } else { Family::Ipv4 };
    let mut text = String::new();
    for rule in &statics.rules {
        for line in rule_lines(rule, family, statics.generation) {
            let _ = writeln!(text, "-A {} {line}", rule.hook.chain());
        }
    }
    text
}

/// One rule's lines for one family: none when its networks are all of the other family.
fn rule_lines(rule: &StaticRule, family: Family, generation: u32) -> Vec<String> {
    let fam = |nets: &[IpNet]| nets.iter().filter(|n| family_of(n) == family).copied().collect::<Vec<_>>();
    let (remote, local) = (fam(&rule.remote), fam(&rule.local));
    if (remote.is_empty() && !rule.remote.is_empty()) || (local.is_empty() && !rule.local.is_empty()) {
        return Vec::new();
    }
    let has_ports = !rule.remote_ports.is_empty() || !rule.local_ports.is_empty();
    // The engine orients a TCP flow by its SYN: only a SYN opens a flow here; a first packet
    // that is not one (a connection picked up mid-stream) is left to user space.
    let protocols: &[&str] = match (rule.protocol, has_ports) {
        (StaticProtocol::Tcp, _) => &["-p tcp --syn"],
        (StaticProtocol::Udp, _) => &["-p udp"],
        (StaticProtocol::Any, true) => &["-p tcp --syn", "-p udp"],
        (StaticProtocol::Any, false) => &["-p tcp --syn", "! -p tcp"],
        // Ports never match a protocol without them.
        (StaticProtocol::Icmp, true) => return Vec::new(),
        (StaticProtocol::Icmp, false) => {
            if family == Family::Ipv6 {
                &["-p ipv6-icmp"]
            } else {
                &["-p icmp"]
            }
        }
    };
    // Which packet field is which end: the first packet comes from the local end, except at
    // INPUT, where it comes from the remote one.
    let remote_is_src = rule.hook == StaticHook::Input;
    let (remote_dir, local_dir) = if remote_is_src { ("src", "dst") } else { ("dst", "src") };
    let fam_tag = if family == Family::Ipv6 { "6" } else { "4" };
    let mut matches = String::new();
    if let Some(i) = &rule.interface {
        let opt = if rule.hook == StaticHook::Output { "-o" } else { "-i" };
        let _ = write!(matches, " {opt} {i}");
    }
    for (nets, dir, side) in [(&remote, remote_dir, Side::Remote), (&local, local_dir, Side::Local)] {
        match nets.as_slice() {
            [] => {}
            [one] => {
                let opt = if dir == "src" { "-s" } else { "-d" };
                let _ = write!(matches, " {opt} {one}");
            }
            _ => {
                let name = set_name(generation, rule.id, side, fam_tag);
                let _ = write!(matches, " -m set --match-set {name} {dir}");
            }
        }
    }
    let mut port_matches = String::new();
    for (ports, dir, side) in
        [(&rule.remote_ports, remote_dir, Side::Remote), (&rule.local_ports, local_dir, Side::Local)]
    {
        if ports.is_empty() {
            continue;
        }
        let flag = if dir == "src" { "--sports" } else { "--dports" };
        if slots(ports) <= MULTIPORT_SLOTS {
            let list: Vec<String> =
                ports.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}:{b}") }).collect();
            let _ = write!(port_matches, " -m multiport {flag} {}", list.join(","));
        } else {
            let name = set_name(generation, rule.id, side, "p");
            let _ = write!(port_matches, " -m set --match-set {name} {dir}");
        }
    }
    let value = match rule.verdict {
        StaticVerdict::Allow => marks::ALLOW,
        StaticVerdict::Reject => marks::REJECT,
        StaticVerdict::Drop => marks::DROP,
    } | marks::rule(rule.id);
    let guard = format!("-m mark --mark 0x0/{:#x}", marks::VERDICT);
    protocols
        .iter()
        .map(|p| format!("{guard} {p}{matches}{port_matches} -j MARK --set-xmark {value:#x}/{:#x}", marks::MASK))
        .collect()
}

fn slots(ports: &[(u16, u16)]) -> usize {
    ports.iter().map(|&(a, b)| if a == b { 1 } else { 2 }).sum()
}

/// The `ipset restore` input that creates and fills every set the rules of `family` use (port
/// sets go with IPv4).
pub(crate) fn sets_text(statics: &StaticRules, family: Family) -> String {
    let fam_tag = if family == Family::Ipv6 { "6" } else { "4" };
    let fam_name = if family == Family::Ipv6 { "inet6" } else { "inet" };
    let mut text = String::new();
    for rule in &statics.rules {
        for (nets, side) in [(&rule.remote, Side::Remote), (&rule.local, Side::Local)] {
            let nets: Vec<&IpNet> = nets.iter().filter(|n| family_of(n) == family).collect();
            if nets.len() < 2 {
                continue;
            }
            let name = set_name(statics.generation, rule.id, side, fam_tag);
            let max = nets.len().max(65_536);
            let hashsize = (nets.len() / 4).next_power_of_two().clamp(1024, 1 << 20);
            let _ = writeln!(text, "create {name} hash:net family {fam_name} hashsize {hashsize} maxelem {max}");
            for n in nets {
                let _ = writeln!(text, "add {name} {n}");
            }
        }
        if family == Family::Ipv4 {
            for (ports, side) in [(&rule.remote_ports, Side::Remote), (&rule.local_ports, Side::Local)] {
                if slots(ports) <= MULTIPORT_SLOTS {
                    continue;
                }
                let name = set_name(statics.generation, rule.id, side, "p");
                let _ = writeln!(text, "create {name} bitmap:port range 0-65535");
                for &(a, b) in ports.iter() {
                    if a == b {
                        let _ = writeln!(text, "add {name} {a}");
                    } else {
                        let _ = writeln!(text, "add {name} {a}-{b}");
                    }
                }
            }
        }
    }
    text
}

/// Creates and fills the sets of `statics`.
pub(crate) fn load_sets(tools: &Tools, statics: &StaticRules) -> Result<(), NetfilterError> {
    for family in Family::BOTH {
        let text = sets_text(statics, family);
        if !text.is_empty() {
            // -exist: a generation loaded again (the old rules put back after a failed reload) is no
            // error.
            run("ipset", &tools.ipset, &["restore", "-exist"], Some(&text), family, Step::LoadingSets)?;
        }
    }
    Ok(())
}

/// Destroys flowgate's sets except those of generation `keep`. No `ipset` tool: nothing to do.
pub(crate) fn destroy_sets(tools: &Tools, keep: Option<u32>, step: Step) -> Result<(), NetfilterError> {
    let keep = keep.map(|g| format!("{SET_PREFIX}{g}-"));
    destroy_where(tools, step, |name| !keep.as_deref().is_some_and(|k| name.starts_with(k)))
}

/// Destroys the sets of one generation (a reload that failed after loading them).
pub(crate) fn destroy_generation(tools: &Tools, generation: u32) -> Result<(), NetfilterError> {
    let prefix = format!("{SET_PREFIX}{generation}-");
    destroy_where(tools, Step::RemovingSets, |name| name.starts_with(&prefix))
}

/// Destroys, in one `ipset restore`, each of flowgate's sets whose name `doomed` picks.
fn destroy_where(tools: &Tools, step: Step, doomed: impl Fn(&str) -> bool) -> Result<(), NetfilterError> {
    if !is_program(&tools.ipset) {
        return Ok(());
    }
    let listing = run("ipset", &tools.ipset, &["list", "-n"], None, Family::Ipv4, step)?;
    let mut text = String::new();
    for name in listing.lines().map(str::trim).filter(|n| n.starts_with(SET_PREFIX) && doomed(n)) {
        let _ = writeln!(text, "destroy {name}");
    }
    if text.is_empty() {
        return Ok(());
    }
    run("ipset", &tools.ipset, &["restore"], Some(&text), Family::Ipv4, step).map(drop)
}

fn is_program(p: &Path) -> bool {
    p.is_absolute() && p.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: u16, hook: StaticHook, verdict: StaticVerdict) -> StaticRule {
        StaticRule::new(id, hook, verdict)
    }

    fn net(t: &str) -> IpNet {
        t.parse().expect("net")
    }

    #[test]
    fn rules_become_exact_iptables_lines_per_family_and_side() {
        let mut out = rule(1, StaticHook::Output, StaticVerdict::Allow);
        out.protocol = StaticProtocol::Tcp;
        out.remote = vec![net("192.0.2.0/24"), net("198.51.100.0/24"), net("2001:db8::/32")];
        out.remote_ports = vec![(80, 80), (8000, 8080)];
        out.interface = Some("tun+".into());
        let mut inbound = rule(2, StaticHook::Input, StaticVerdict::Reject);
        inbound.local_ports = vec![(22, 22)];
        inbound.remote = vec![net("203.0.113.7/32")];
        let mut icmp = rule(3, StaticHook::Forward, StaticVerdict::Drop);
        icmp.protocol = StaticProtocol::Icmp;
        let statics = StaticRules { rules: vec![out, inbound, icmp], log_group: 9, generation: 4 };
        let v4 = chain_rules(&statics, false);
        assert_eq!(
            v4,
            "-A FLOWGATE-S-OUT -m mark --mark 0x0/0x30000 -p tcp --syn -o tun+ -m set --match-set flowgate-4-1r4 dst -m multiport --dports 80,8000:8080 -j MARK --set-xmark 0x810000/0xffff0000\n\
-A FLOWGATE-S-IN -m mark --mark 0x0/0x30000 -p tcp --syn -s 203.0.113.7/32 -m multiport --dports 22 -j MARK --set-xmark 0x1020000/0xffff0000\n\
-A FLOWGATE-S-IN -m mark --mark 0x0/0x30000 -p udp -s 203.0.113.7/32 -m multiport --dports 22 -j MARK --set-xmark 0x1020000/0xffff0000\n\
-A FLOWGATE-S-FWD -m mark --mark 0x0/0x30000 -p icmp -j MARK --set-xmark 0x1830000/0xffff0000\n"
        );
        let v6 = chain_rules(&statics, true);
        // The IPv4-only inbound rule has no IPv6 line; one network of the family: no set.
        assert_eq!(
            v6,
            "-A FLOWGATE-S-OUT -m mark --mark 0x0/0x30000 -p tcp --syn -o tun+ -d 2001:db8::/32 -m multiport --dports 80,8000:8080 -j MARK --set-xmark 0x810000/0xffff0000\n\
-A FLOWGATE-S-FWD -m mark --mark 0x0/0x30000 -p ipv6-icmp -j MARK --set-xmark 0x1830000/0xffff0000\n"
        );
        assert_eq!(
            sets_text(&statics, Family::Ipv4),
            "create flowgate-4-1r4 hash:net family inet hashsize 1024 maxelem 65536\nadd flowgate-4-1r4 192.0.2.0/24\nadd flowgate-4-1r4 198.51.100.0/24\n"
        );
        assert_eq!(sets_text(&statics, Family::Ipv6), "");
    }

    #[test]
    fn wide_port_lists_go_to_a_bitmap_set_and_icmp_with_ports_matches_nothing() {
        let mut r = rule(7, StaticHook::Output, StaticVerdict::Drop);
        r.remote_ports = (0..20u16).map(|i| (1000 + i * 10, 1000 + i * 10)).collect();
        let mut icmp = rule(8, StaticHook::Output, StaticVerdict::Drop);
        icmp.protocol = StaticProtocol::Icmp;
        icmp.remote_ports = vec![(1, 1)];
        let statics = StaticRules { rules: vec![r, icmp], log_group: 1, generation: 0 };
        let text = chain_rules(&statics, false);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("-p udp -m set --match-set flowgate-0-7rp dst"), "{text}");
        let sets = sets_text(&statics, Family::Ipv4);
        assert!(sets.starts_with("create flowgate-0-7rp bitmap:port range 0-65535\nadd flowgate-0-7rp 1000\n"));
        assert_eq!(sets.lines().count(), 21);
    }

    #[test]
    fn the_tail_logs_and_drops_only_what_a_static_rule_marked() {
        let tail = hook_tail(false, 5);
        assert_eq!(tail[1], "-m mark --mark 0x10000/0x30000 -j RETURN");
        assert!(tail[2].contains("--nflog-group 5"));
        assert_eq!(tail.last().map(String::as_str), Some("-m mark ! --mark 0x0/0x30000 -j DROP"));
        assert_eq!(
            hook_jump(StaticHook::Input),
            "-m conntrack --ctstate NEW -m mark --mark 0x0/0x30000 -m connmark --mark 0x0/0x30000 -j FLOWGATE-S-IN"
        );
    }
}
