//! Rules: what a user writes (a [`RuleSet`] of ordered [`Rule`]s and a default action), the
//! parsers for each field's text form, and the lints of `flowgate rules check`.
//!
//! This room is about meaning, not file formats: the binary's config loader reads TOML and hands
//! each field's text to the parsers here, adding file and line to their errors. Matching lives in
//! [`matcher`] (a compiled, immutable index built once per rule set), lints in [`lint`].

pub mod kernel;
pub mod lint;
pub mod matcher;

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use wildmatch::WildMatch;

use crate::flow::{Direction, Protocol};
use crate::hosts::{HostPattern, HostSet};
use crate::owner::OwnerMatch;

/// What a rule, or the default, does with a flow it matches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Drop,
    /// Hold the flow and look at up to this many bytes of each direction before deciding.
    Inspect {
        peek_outbound: u32,
        peek_inbound: u32,
    },
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Drop => "drop",
            Action::Inspect { .. } => "inspect",
        }
    }
}

/// Which protocols a rule matches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProtocolMatch {
    Any,
    Only(Protocol),
}

impl ProtocolMatch {
    pub fn matches(self, p: Protocol) -> bool {
        match self {
            ProtocolMatch::Any => true,
            ProtocolMatch::Only(q) => p == q,
        }
    }
}

/// Which directions a rule matches.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DirectionMatch {
    Any,
    Only(Direction),
}

impl DirectionMatch {
    pub fn matches(self, d: Direction) -> bool {
        match self {
            DirectionMatch::Any => true,
            DirectionMatch::Only(e) => d == e,
        }
    }
}

/// A set of ports as sorted, merged, inclusive ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Builds a set from ranges, sorting and merging them.
    pub fn from_ranges(mut ranges: Vec<(u16, u16)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        PortSet { ranges: merged }
    }

    pub fn contains(&self, port: u16) -> bool {
        // Ranges are sorted and disjoint: binary search on the start.
        let i = self.ranges.partition_point(|&(lo, _)| lo <= port);
        i > 0 && self.ranges[i - 1].1 >= port
    }

    /// Number of ports in the set.
    pub fn len(&self) -> u32 {
        self.ranges.iter().map(|&(lo, hi)| u32::from(hi - lo) + 1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Every port of `other` is in `self`.
    pub fn covers(&self, other: &PortSet) -> bool {
        other.ranges.iter().all(|&(lo, hi)| {
            let i = self.ranges.partition_point(|&(a, _)| a <= lo);
            i > 0 && self.ranges[i - 1].1 >= hi
        })
    }

    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        Ok(())
    }
}

/// A glob on an interface name (`*` and `?`), kept with its source text.
#[derive(Clone, Debug)]
pub struct InterfaceGlob {
    text: String,
    glob: WildMatch,
}

impl InterfaceGlob {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, name: &str) -> bool {
        self.glob.matches(name)
    }

    /// The glob has no wildcard: it names exactly one interface.
    pub fn is_literal(&self) -> bool {
        !self.text.contains(['*', '?'])
    }
}

impl PartialEq for InterfaceGlob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

/// One rule: every given field must match (an empty list or `None` matches anything).
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: String,
    /// Remote networks; empty = any.
    pub remote: Vec<IpNet>,
    /// Local networks; empty = any.
    pub local: Vec<IpNet>,
    pub remote_ports: Option<PortSet>,
    pub local_ports: Option<PortSet>,
    pub protocol: ProtocolMatch,
    pub direction: DirectionMatch,
    pub interface: Option<InterfaceGlob>,
    /// The owning process, user, unit and cgroup (empty: any flow, owned or not).
    pub owner: OwnerMatch,
    /// Host names (empty: any flow, named or not).
    pub host: HostMatch,
    pub action: Action,
    /// With `Action::Drop`: drop without telling the sender (no TCP reset, no ICMP unreachable).
    pub silent: bool,
}

impl Rule {
    /// A rule that matches everything and does `action`; narrow it with the fields.
    pub fn new(name: impl Into<String>, action: Action) -> Self {
        Rule {
            name: name.into(),
            remote: Vec::new(),
            local: Vec::new(),
            remote_ports: None,
            local_ports: None,
            protocol: ProtocolMatch::Any,
            direction: DirectionMatch::Any,
            interface: None,
            owner: OwnerMatch::default(),
            host: HostMatch::default(),
            action,
            silent: false,
        }
    }
}

/// The host names a rule matches: its `host` patterns and the names of its `hosts_file` lists
/// (each list one compact set, shared by every copy of the rule). Empty: the rule does not look
/// at names.
#[derive(Clone, Default)]
pub struct HostMatch {
    /// What was written, as listings and lints show it: the patterns, then `file PATH (N names)`.
    pub texts: Vec<String>,
    pub sets: Vec<std::sync::Arc<HostSet>>,
}

impl HostMatch {
    /// Names from patterns (`example.com`, `*.example.com`) and lists already read
    /// (`(path, names)`).
    pub fn new(patterns: &[HostPattern], lists: Vec<(String, std::sync::Arc<HostSet>)>) -> HostMatch {
        let mut m = HostMatch::default();
        if !patterns.is_empty() {
            let mut set = HostSet::new();
            for p in patterns {
                set.insert(p);
                m.texts.push(p.to_string());
            }
            m.sets.push(std::sync::Arc::new(set));
        }
        for (path, list) in lists {
            m.texts.push(format!("file {path} ({} names)", list.len()));
            m.sets.push(list);
        }
        m
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    /// Whether `host` (a normalized name) is one of the rule's (any name, for a rule without).
    pub fn matches(&self, host: &str) -> bool {
        self.sets.is_empty() || self.sets.iter().any(|s| s.matches(host))
    }
}

impl PartialEq for HostMatch {
    fn eq(&self, other: &Self) -> bool {
        self.texts == other.texts
    }
}

impl fmt::Debug for HostMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.texts).finish()
    }
}

/// Ordered rules (first match wins) and the action for flows no rule matches.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub default_action: Action,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet { rules: Vec::new(), default_action: Action::Allow }
    }
}

/// A field's text could not be understood. The config loader adds where it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// Parses a network in CIDR form (`203.0.113.0/24`, `2001:db8::/32`); a bare address is one
/// host (`/32` or `/128`). Host bits below the prefix are cleared (the lint reports them).
pub fn parse_network(text: &str) -> Result<IpNet, ParseError> {
    let t = text.trim();
    if t.contains('/') {
        match t.parse::<IpNet>() {
            Ok(net) => Ok(net.trunc()),
            Err(_) => err(format!(
                "`{t}` is not a network: write an address with a prefix length, like 203.0.113.0/24 or 2001:db8::/32"
            )),
        }
    } else {
        match t.parse::<IpAddr>() {
            Ok(addr) => Ok(IpNet::from(addr)),
            Err(_) => err(format!("`{t}` is not an IP address or CIDR network")),
        }
    }
}

/// True when the text's address has bits set below its prefix (`203.0.113.7/24`): almost always
/// a typo for `/32`.
pub fn has_host_bits(text: &str) -> bool {
    text.trim().parse::<IpNet>().is_ok_and(|n| n.addr() != n.network())
}

/// Parses ports: `443`, `80,443`, `8000-8080`, or a mix (`80,443,8000-8080`).
pub fn parse_ports(text: &str) -> Result<PortSet, ParseError> {
    let mut ranges = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return err(format!("empty port in `{text}`: write ports like 80,443,8000-8080"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (parse_port(a, text)?, parse_port(b, text)?),
            None => {
                let p = parse_port(part, text)?;
                (p, p)
            }
        };
        if lo > hi {
            return err(format!("port range `{part}` runs backwards: write {hi}-{lo}"));
        }
        ranges.push((lo, hi));
    }
    Ok(PortSet::from_ranges(ranges))
}

fn parse_port(p: &str, whole: &str) -> Result<u16, ParseError> {
    match p.trim().parse::<u16>() {
        Ok(n) => Ok(n),
        Err(_) => err(format!("`{}` in `{whole}` is not a port number (0-65535)", p.trim())),
    }
}

pub fn parse_protocol(text: &str) -> Result<ProtocolMatch, ParseError> {
    Ok(match text.trim() {
        "tcp" => ProtocolMatch::Only(Protocol::Tcp),
        "udp" => ProtocolMatch::Only(Protocol::Udp),
        "icmp" => ProtocolMatch::Only(Protocol::Icmp),
        "any" => ProtocolMatch::Any,
        other => return err(format!("unknown protocol `{other}`: expected tcp, udp, icmp or any")),
    })
}

pub fn parse_direction(text: &str) -> Result<DirectionMatch, ParseError> {
    Ok(match text.trim() {
        "inbound" => DirectionMatch::Only(Direction::Inbound),
        "outbound" => DirectionMatch::Only(Direction::Outbound),
        "any" => DirectionMatch::Any,
        other => {
            return err(format!("unknown direction `{other}`: expected inbound, outbound or any"));
        }
    })
}

/// Parses an interface glob (`eth0`, `tun*`, `wg?`). Interface names are at most 15 bytes.
pub fn parse_interface(text: &str) -> Result<InterfaceGlob, ParseError> {
    let t = text.trim();
    if t.is_empty() {
        return err("empty interface name");
    }
    if t.len() > 15 && !t.contains('*') {
        return err(format!("`{t}` is longer than an interface name can be (15 bytes)"));
    }
    if t.contains(['/', ' ']) {
        return err(format!("`{t}` cannot be an interface name (no `/` or spaces)"));
    }
    Ok(InterfaceGlob { text: t.to_string(), glob: WildMatch::new(t) })
}

/// Parses an action name; `inspect` takes its peek sizes from the rule's `peek` field.
pub fn parse_action(text: &str, peek_outbound: u32, peek_inbound: u32) -> Result<Action, ParseError> {
    Ok(match text.trim() {
        "allow" => Action::Allow,
        "drop" => Action::Drop,
        "inspect" => Action::Inspect { peek_outbound, peek_inbound },
        other => return err(format!("unknown action `{other}`: expected allow, drop or inspect")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_address_is_one_host_and_cidr_is_kept() {
        assert_eq!(parse_network("203.0.113.7").expect("ok").to_string(), "203.0.113.7/32");
        assert_eq!(parse_network("2001:db8::1").expect("ok").to_string(), "2001:db8::1/128");
        assert_eq!(parse_network("203.0.113.0/24").expect("ok").to_string(), "203.0.113.0/24");
        assert_eq!(parse_network("0.0.0.0/0").expect("ok").prefix_len(), 0);
        assert_eq!(parse_network("203.0.113.7/24").expect("ok").to_string(), "203.0.113.0/24");
        assert!(has_host_bits("203.0.113.7/24"));
        assert!(!has_host_bits("203.0.113.0/24"));
        assert!(parse_network("203.0.113.7/33").is_err());
        assert!(parse_network("example.com").is_err());
    }

    #[test]
    fn ports_lists_and_ranges() {
        let p = parse_ports("80,443,8000-8080").expect("ok");
        for yes in [80, 443, 8000, 8042, 8080] {
            assert!(p.contains(yes), "{yes}");
        }
        for no in [0, 79, 81, 444, 7999, 8081, 65535] {
            assert!(!p.contains(no), "{no}");
        }
        assert_eq!(p.len(), 2 + 81);
        assert_eq!(p.to_string(), "80,443,8000-8080");
        assert_eq!(parse_ports("5-7,1-4").expect("ok").to_string(), "1-7");
        assert!(parse_ports("0-65535").expect("ok").contains(65535));
        assert!(parse_ports("80-79").is_err());
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("80,").is_err());
        assert!(parse_ports("http").is_err());
        assert!(p.covers(&parse_ports("443,8001-8003").expect("ok")));
        assert!(!p.covers(&parse_ports("443,8001-8090").expect("ok")));
    }

    #[test]
    fn names_are_checked() {
        assert!(parse_protocol("sctp").is_err());
        assert!(parse_direction("sideways").is_err());
        assert!(parse_action("reject", 0, 0).is_err());
        assert!(parse_interface("").is_err());
        let g = parse_interface("tun*").expect("ok");
        assert!(g.matches("tun0") && !g.matches("eth0") && !g.is_literal());
    }
}
