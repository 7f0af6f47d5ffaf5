//! The iptables/ip6tables chains flowgate installs, and their removal.
//!
//! flowgate inserts one jump at position 1 of the filter table's `OUTPUT`, `INPUT` and `FORWARD`
//! chains, for IPv4 and IPv6, into its own chains [`CHAIN_OUT`], [`CHAIN_IN`] and [`CHAIN_FWD`].
//! The host's own rules are never modified, reordered or flushed. Each of flowgate's chains, in
//! order ([`ruleset_text`] is the exact text):
//!
//! 1. unless loopback is filtered, `-o lo` (out) / `-i lo` (in) returns at once;
//! 2. a flow decided [`ALLOW`](crate::marks::ALLOW) (conntrack mark) returns: the host's own
//!    rules still apply to it;
//! 3. answers to a rejected flow return too: a TCP reset, or an ICMP error (`RELATED`), whose
//!    conntrack mark is [`REJECT`](crate::marks::REJECT). The kernel attaches such answers
//!    (`REJECT`'s own, and the stack's for a closed port) to the conntrack entry of the flow they
//!    answer, so without this step they would be caught by the next rules of flowgate's `OUTPUT`
//!    chain, and the peer would wait for a timeout instead of being told. (A packet rejected by
//!    its packet mark alone gets an answer without that conntrack mark, which is queued like
//!    anything undecided.)
//! 4. a flow or packet decided [`REJECT`](crate::marks::REJECT) (conntrack mark or packet mark)
//!    is rejected: TCP with a reset, everything else with an ICMP(v6) port unreachable. `REJECT`
//!    drops the packet also when it sends no answer (to ICMP errors, non-first fragments,
//!    broadcasts); a catch-all `DROP` follows it as a safety net;
//! 5. a flow or packet decided [`DROP`](crate::marks::DROP) is dropped silently;
//! 6. a flow whose conntrack mark names an owner ([`marks::OWNER`](crate::marks::OWNER): adopted
//!    at start, or recalled from the kernel to be judged again) goes to its owner's queue;
//! 7. everything else goes to NFQUEUE, balanced over [`ChainSpec::queues`], with
//!    `--queue-bypass` when failing open.
//!
//! The daemon gives its verdicts with `NF_REPEAT` after setting the marks, so a packet runs
//! through the chain again and one of steps 2 to 5 acts on it. The same mark names the worker that
//! judged the flow (its owner), so the conntrack entry says which worker to tell about it.
//!
//! ## Balancing and failing open
//!
//! `--queue-balance` hashes the source and destination addresses (sorted, so both directions of
//! a flow land on the same queue) and the protocol, not the ports: every flow between the same
//! two addresses goes to the same queue. The addresses are those the filter table sees, which
//! NAT leaves consistent in both directions.
//!
//! With `--queue-bypass` and no process bound to the queue, the packet is accepted by the whole
//! filter table, as if the NFQUEUE rule were an `ACCEPT`: the host's own filter rules after
//! flowgate's jump do not see it. Without it the packet is dropped.
//!
//! ## The packet stage's chains
//!
//! flowgate also inserts one jump at position 1 of the **mangle** table's `OUTPUT`, `INPUT` and
//! `FORWARD` chains into [`PACKET_OUT`], [`PACKET_IN`] and [`PACKET_FWD`]. They hold one NFQUEUE
//! rule per interface (and direction) the packet stage covers ([`ChainSpec::packet`]), to the
//! packet stage's own queues, and nothing else: every packet of those interfaces goes to user
//! space, flows the kernel handles included, and packets of other interfaces pass on at once.
//! The mangle table runs before the filter table on every hook, so a packet the packet stage
//! drops never reaches the flow chains; one it accepts (`NF_ACCEPT`) goes on to them. The chains
//! exist, possibly empty, for the daemon's whole life, so [`replace_rules`] can change
//! what they cover in one transaction per family (a reload). An interface glob becomes an
//! iptables name: `tun*` is `tun+`; a glob whose wildcard is not only at its end is widened to
//! its literal prefix (`t?n0` to `t+`, `*vpn` to every interface) and narrowed again in user
//! space.
//!
//! ## Counters
//!
//! [`queue_rule_counters`] reads what the kernel counted for each of flowgate's NFQUEUE rules
//! (`iptables -S -v`): every packet the rule matched, whatever became of it: taken by a queue,
//! passed by `--queue-bypass` (no process bound, or a fail-open queue that was full or whose
//! reader's socket was full; the kernel counts these nowhere else), or dropped by a full
//! fail-closed queue. Set against what the queue workers received, this bounds what passed
//! unjudged.
//!
//! ## Transactions
//!
//! Each family is installed with one `iptables-restore --noflush` run (chains, rules and jumps in
//! one transaction, so either all of it or none is in place); if IPv6 fails, IPv4 is removed
//! again before the error is returned. Removal lists the filter table (`iptables -S`) and
//! deletes, in one restore transaction per family, every jump into flowgate's chains from the
//! built-in chains, then flushes and deletes the chains. [`cleanup`] does the same for what a
//! dead instance left, and [`install`] calls it first.
//!
//! In a network namespace where the filter table did not exist yet, installing creates it with
//! its built-in chains (policy `ACCEPT`); removal leaves those empty chains in place, since
//! iptables has no way to delete a table.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::marks;
use crate::static_rules::{self, STATIC_FWD, STATIC_IN, STATIC_OUT, StaticHook, StaticRules};

/// flowgate's chain for locally generated packets, jumped to from `OUTPUT`.
pub const CHAIN_OUT: &str = "FLOWGATE-OUT";
/// flowgate's chain for packets to the host, jumped to from `INPUT`.
pub const CHAIN_IN: &str = "FLOWGATE-IN";
/// flowgate's chain for routed packets, jumped to from `FORWARD`.
pub const CHAIN_FWD: &str = "FLOWGATE-FWD";

/// The packet stage's chain for locally generated packets, jumped to from mangle `OUTPUT`.
pub const PACKET_OUT: &str = "FLOWGATE-PKT-OUT";
/// The packet stage's chain for packets to the host, jumped to from mangle `INPUT`.
pub const PACKET_IN: &str = "FLOWGATE-PKT-IN";
/// The packet stage's chain for routed packets, jumped to from mangle `FORWARD`.
pub const PACKET_FWD: &str = "FLOWGATE-PKT-FWD";

/// flowgate's chain that spreads new TCP and UDP flows over the queues by their ports (see
/// "Balancing" in the module documentation).
pub const SPREAD: &str = "FLOWGATE-SPREAD";
/// Its second level, one chain per value of the source port's low bits.
pub const SPREAD_BY_SPORT: [&str; 16] = [
    "FLOWGATE-SPREAD-0",
    "FLOWGATE-SPREAD-1",
    "FLOWGATE-SPREAD-2",
    "FLOWGATE-SPREAD-3",
    "FLOWGATE-SPREAD-4",
    "FLOWGATE-SPREAD-5",
    "FLOWGATE-SPREAD-6",
    "FLOWGATE-SPREAD-7",
    "FLOWGATE-SPREAD-8",
    "FLOWGATE-SPREAD-9",
    "FLOWGATE-SPREAD-10",
    "FLOWGATE-SPREAD-11",
    "FLOWGATE-SPREAD-12",
    "FLOWGATE-SPREAD-13",
    "FLOWGATE-SPREAD-14",
    "FLOWGATE-SPREAD-15",
];

/// A table flowgate installs chains in: its chains and the built-in chains that jump to them.
struct Table {
    name: &'static str,
    /// (built-in chain, flowgate chain).
    hooks: [(&'static str, &'static str); 3],
    /// flowgate's chains that only its own chains jump to.
    inner: &'static [&'static str],
}

const TABLES: [Table; 2] = [
    Table {
        name: "filter",
        hooks: [("OUTPUT", CHAIN_OUT), ("INPUT", CHAIN_IN), ("FORWARD", CHAIN_FWD)],
        inner: &[
            STATIC_OUT,
            STATIC_IN,
            STATIC_FWD,
            SPREAD,
            SPREAD_BY_SPORT[0],
            SPREAD_BY_SPORT[1],
            SPREAD_BY_SPORT[2],
            SPREAD_BY_SPORT[3],
            SPREAD_BY_SPORT[4],
            SPREAD_BY_SPORT[5],
            SPREAD_BY_SPORT[6],
            SPREAD_BY_SPORT[7],
            SPREAD_BY_SPORT[8],
            SPREAD_BY_SPORT[9],
            SPREAD_BY_SPORT[10],
            SPREAD_BY_SPORT[11],
            SPREAD_BY_SPORT[12],
            SPREAD_BY_SPORT[13],
            SPREAD_BY_SPORT[14],
            SPREAD_BY_SPORT[15],
        ],
    },
    Table {
        name: "mangle",
        hooks: [("OUTPUT", PACKET_OUT), ("INPUT", PACKET_IN), ("FORWARD", PACKET_FWD)],
        inner: &[],
    },
];

/// A built-in chain and the flowgate chain it jumps to.
struct Hook {
    builtin: &'static str,
    chain: &'static str,
    /// The interface option that matches loopback in this chain, if any.
    loopback: Option<&'static str>,
    /// Its static rules' hook.
    statics: StaticHook,
}

const HOOKS: [Hook; 3] = [
    Hook { builtin: "OUTPUT", chain: CHAIN_OUT, loopback: Some("-o"), statics: StaticHook::Output },
    Hook { builtin: "INPUT", chain: CHAIN_IN, loopback: Some("-i"), statics: StaticHook::Input },
    Hook { builtin: "FORWARD", chain: CHAIN_FWD, loopback: None, statics: StaticHook::Forward },
];

/// What to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    /// The NFQUEUE numbers packets are balanced over, e.g. `0..=1`.
    pub queues: RangeInclusive<u16>,
    /// Let packets pass while no process is bound to the queue (`--queue-bypass`); otherwise
    /// they are dropped.
    pub fail_open: bool,
    /// Filter loopback traffic too; otherwise it bypasses flowgate.
    pub loopback: bool,
    /// What the packet stage's chains send to its queues.
    pub packet: PacketChains,
    /// The rules the kernel decides alone.
    pub statics: StaticRules,
}

/// What the packet stage covers: interfaces and directions, and its queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketChains {
    /// The packet stage's NFQUEUE numbers; unused while `interfaces` is empty.
    pub queues: RangeInclusive<u16>,
    pub interfaces: Vec<PacketInterface>,
}

impl PacketChains {
    /// Nothing covered: the chains stay empty.
    pub fn none() -> Self {
        PacketChains { queues: 0..=0, interfaces: Vec::new() }
    }
}

/// One interface glob the packet stage covers, and in which directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketInterface {
    /// An interface glob (`tun*`, `wg0`); `None` or `*` for every interface (loopback
    /// included only when [`ChainSpec::loopback`] is set).
    pub glob: Option<String>,
    pub inbound: bool,
    pub outbound: bool,
    pub forwarded: bool,
}

/// An interface glob as an iptables interface name: `tun*` → `tun+`; a wildcard before the
/// end widens it to the literal prefix; `None` when it covers every interface.
pub fn iptables_interface(glob: &str) -> Option<String> {
    let cut = glob.find(['*', '?']);
    match cut {
        None => Some(glob.to_string()),
        Some(0) => None,
        Some(i) => Some(format!("{}+", &glob[..i])),
    }
}

/// The programs flowgate runs. [`Default`] looks them up on `PATH`, then in `/usr/local/sbin`,
/// `/usr/sbin` and `/sbin` (relative `PATH` entries are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub iptables_restore: PathBuf,
    pub ip6tables_restore: PathBuf,
    pub iptables: PathBuf,
    pub ip6tables: PathBuf,
    /// Needed only by static rules with several networks or many ports.
    pub ipset: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            iptables_restore: find_program("iptables-restore"),
            ip6tables_restore: find_program("ip6tables-restore"),
            iptables: find_program("iptables"),
            ip6tables: find_program("ip6tables"),
            ipset: find_program("ipset"),
        }
    }
}

impl Tools {
    fn restore(&self, family: Family) -> (&'static str, &Path) {
        match family {
            Family::Ipv4 => ("iptables-restore", &self.iptables_restore),
            Family::Ipv6 => ("ip6tables-restore", &self.ip6tables_restore),
        }
    }

    fn lister(&self, family: Family) -> (&'static str, &Path) {
        match family {
            Family::Ipv4 => ("iptables", &self.iptables),
            Family::Ipv6 => ("ip6tables", &self.ip6tables),
        }
    }
}

fn find_program(name: &str) -> PathBuf {
    find_program_in(name, &search_dirs()).unwrap_or_else(|| PathBuf::from(name))
}

/// Where [`Tools::default`] looks for a program, in order: the absolute entries of `PATH`, then
/// `/usr/local/sbin`, `/usr/sbin` and `/sbin`.
pub fn search_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let fallback = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).filter(|dir| dir.is_absolute()).chain(fallback).collect()
}

/// The first executable file called `name` in `dirs`.
pub fn find_program_in(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|dir| dir.join(name)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// An address family, with its own set of tools and rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub(crate) const BOTH: [Family; 2] = [Family::Ipv4, Family::Ipv6];
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// What flowgate was doing when a tool failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Removing what a previous instance left ([`cleanup`], also the first step of [`install`]).
    RemovingLeftovers,
    /// Installing the chains and jumps.
    Installing,
    /// Removing IPv4 again after IPv6 failed to install.
    RollingBack,
    /// Removing what was installed ([`Installed::remove`]).
    Removing,
    /// Reading the counters of the rules ([`queue_rule_counters`]).
    ReadingCounters,
    /// Creating and filling the static rules' ipsets.
    LoadingSets,
    /// Replacing the rules on a reload ([`replace_rules`]).
    Replacing,
    /// Destroying ipsets no rule uses any more.
    RemovingSets,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::RemovingLeftovers => "removing leftovers",
            Step::Installing => "installing chains",
            Step::RollingBack => "rolling back",
            Step::Removing => "removing chains",
            Step::ReadingCounters => "reading counters",
            Step::LoadingSets => "loading static rule sets",
            Step::Replacing => "replacing rules",
            Step::RemovingSets => "removing static rule sets",
        })
    }
}

/// Why installing or removing the chains failed.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// The queue range cannot be expressed as an NFQUEUE target.
    #[error("invalid NFQUEUE range {start}..={end}: {reason}")]
    InvalidQueues { start: u16, end: u16, reason: &'static str },
    /// The tool could not be started, or its input could not be written.
    #[error("could not run {tool} ({family}, {step}) as {}: {source}", .program.display())]
    Run {
        tool: &'static str,
        program: PathBuf,
        family: Family,
        step: Step,
        #[source]
        source: io::Error,
    },
    /// The tool ran and failed.
    #[error("{tool} ({family}, {step}) failed with {}: {}", describe_status(.status), describe_output(.stderr))]
    Failed { tool: &'static str, program: PathBuf, family: Family, step: Step, status: ExitStatus, stderr: String },
    /// Jumps or chains of flowgate were still there after repeated removal (something keeps
    /// adding them).
    #[error("flowgate's rules are still present ({family}, {step}) after removing them {attempts} times")]
    StillPresent { family: Family, step: Step, attempts: usize },
    /// Installing failed, and removing what was already installed failed too.
    #[error("{error}; removing what was installed failed too: {rollback}")]
    RollbackFailed { error: Box<NetfilterError>, rollback: Box<NetfilterError> },
    /// Several steps failed (removal tries both families).
    #[error("{}", join_errors(.0))]
    Several(Vec<NetfilterError>),
}

fn describe_status(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

fn describe_output(stderr: &str) -> &str {
    if stderr.is_empty() { "no error output" } else { stderr }
}

fn join_errors(errors: &[NetfilterError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// One error from several, or none.
fn combine(mut errors: Vec<NetfilterError>) -> Result<(), NetfilterError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(NetfilterError::Several(errors)),
    }
}

/// The chains as installed; removed by [`Installed::remove`], or when dropped (best effort,
/// errors ignored). A process that dies without either leaves them for [`cleanup`].
#[derive(Debug)]
pub struct Installed {
    tools: Tools,
    spec: ChainSpec,
    removed_leftovers: bool,
    armed: bool,
}

impl Installed {
    /// What was installed.
    pub fn spec(&self) -> &ChainSpec {
        &self.spec
    }

    /// Whether [`install`] found and removed chains of a previous instance first.
    pub fn removed_leftovers(&self) -> bool {
        self.removed_leftovers
    }

    /// Removes the jumps (every copy) and then flowgate's chains, for both families. Both are
    /// tried even if one fails, and every failure is reported. Chains already gone are no
    /// error.
    pub fn remove(mut self) -> Result<(), NetfilterError> {
        self.armed = false;
        remove_all(&self.tools, Step::Removing).map(drop)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.armed {
            self.armed = false;
            let _ = remove_all(&self.tools, Step::Removing);
        }
    }
}

/// Installs flowgate's chains and jumps for IPv4 and IPv6, after removing whatever a previous
/// instance left. Nothing is left half-installed on error.
pub fn install(spec: &ChainSpec, tools: &Tools) -> Result<Installed, NetfilterError> {
    check_queues(&spec.queues)?;
    if !spec.packet.interfaces.is_empty() {
        check_queues(&spec.packet.queues)?;
    }
    let removed_leftovers = cleanup(tools)?;
    let roll_back = |error: NetfilterError| match remove_all(tools, Step::RollingBack) {
        Ok(_) => error,
        Err(rollback) => NetfilterError::RollbackFailed { error: Box::new(error), rollback: Box::new(rollback) },
    };
    static_rules::load_sets(tools, &spec.statics).map_err(roll_back)?;
    for family in Family::BOTH {
        let ipv6 = family == Family::Ipv6;
        let text = format!("{}{}", ruleset_text(spec, ipv6), packet_ruleset_text(spec, ipv6));
        // Each table commits on its own: whatever failed, nothing of either family may stay.
        restore(tools, family, Step::Installing, &text).map_err(roll_back)?;
    }
    Ok(Installed { tools: tools.clone(), spec: spec.clone(), removed_leftovers, armed: true })
}

/// Removes flowgate's jumps and chains, for both families, if present (left by an instance that
/// died). Returns whether anything was found. Both families are tried even if one fails.
pub fn cleanup(tools: &Tools) -> Result<bool, NetfilterError> {
    remove_all(tools, Step::RemovingLeftovers)
}

/// What one of flowgate's NFQUEUE rules matched, as the kernel counts it (see "Counters" in the
/// module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueRuleCounter {
    pub family: Family,
    /// The table (`filter`: the flow chains; `mangle`: the packet stage's) and the chain.
    pub table: &'static str,
    pub chain: &'static str,
    /// The queues the rule sends to: one, or a range balanced over.
    pub queues: RangeInclusive<u16>,
    pub packets: u64,
    pub bytes: u64,
}

/// The counters of flowgate's NFQUEUE rules in both tables, for both families. Only reads; where
/// flowgate's chains are not installed there is nothing to count.
pub fn queue_rule_counters(tools: &Tools) -> Result<Vec<QueueRuleCounter>, NetfilterError> {
    let mut out = Vec::new();
    for family in Family::BOTH {
        let (tool, program) = tools.lister(family);
        for table in &TABLES {
            let args = ["-w", "-t", table.name, "-S", "-v"];
            let listing = run(tool, program, &args, None, family, Step::ReadingCounters)?;
            out.extend(parse_queue_counters(table, family, &listing));
        }
    }
    Ok(out)
}

/// The NFQUEUE rules of flowgate's chains in `iptables -S -v` output (`-A CHAIN ... -c PACKETS
/// BYTES -j NFQUEUE --queue-num N` or `--queue-balance A:B`).
fn parse_queue_counters(table: &Table, family: Family, listing: &str) -> Vec<QueueRuleCounter> {
    listing
        .lines()
        .filter_map(|line| {
            let args = split_args(line.trim().strip_prefix("-A ")?);
            // The spreading chains hold NFQUEUE rules too.
            let chain = table
                .hooks
                .iter()
                .map(|(_, c)| *c)
                .chain(table.inner.iter().copied())
                .find(|c| args.first().is_some_and(|a| a == c))?;
            let after = |flag: &str| args.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str());
            if after("-j") != Some("NFQUEUE") {
                return None;
            }
            let counts = args.windows(3).find(|w| w[0] == "-c")?;
            let (packets, bytes) = (counts[1].parse().ok()?, counts[2].parse().ok()?);
            let queues = match (after("--queue-num"), after("--queue-balance")) {
                (Some(n), _) => {
                    let n = n.parse().ok()?;
                    n..=n
                }
                (None, Some(range)) => {
                    let (a, b) = range.split_once(':')?;
                    a.parse().ok()?..=b.parse().ok()?
                }
                // NFQUEUE without a number sends to queue 0.
                (None, None) => 0..=0,
            };
            Some(QueueRuleCounter { family, table: table.name, chain, queues, packets, bytes })
        })
        .collect()
}

fn check_queues(queues: &RangeInclusive<u16>) -> Result<(), NetfilterError> {
    let (start, end) = (*queues.start(), *queues.end());
    let reason = if start > end {
        "the range is empty"
    } else if start == 0 && end == u16::MAX {
        "at most 65535 queues can be balanced over"
    } else {
        return Ok(());
    };
    Err(NetfilterError::InvalidQueues { start, end, reason })
}

/// The exact `iptables-restore --noflush` input that installs flowgate for one family: the
/// chains, their rules, and the jumps at position 1 of the built-in chains. `spec.queues` is
/// assumed valid ([`install`] checks it).
/// ICMPv6 types exempt from judging: router solicitation/advertisement, neighbour
/// solicitation/advertisement, redirect, MLDv2 report.
const ND_TYPES: [u8; 6] = [133, 134, 135, 136, 137, 143];

pub fn ruleset_text(spec: &ChainSpec, ipv6: bool) -> String {
    let mut text = String::from("*filter\n");
    for chain in HOOKS.iter().map(|h| h.chain).chain(TABLES[0].inner.iter().copied()) {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    text.push_str(&filter_rules_text(spec, ipv6));
    for hook in &HOOKS {
        text.push_str(&format!("-I {} 1 -j {}\n", hook.builtin, hook.chain));
    }
    text.push_str("COMMIT\n");
    text
}

/// The `-A` lines of flowgate's chains in the filter table, for one family.
fn filter_rules_text(spec: &ChainSpec, ipv6: bool) -> String {
    let (icmp, unreachable) =
        if ipv6 { ("ipv6-icmp", "icmp6-port-unreachable") } else { ("icmp", "icmp-port-unreachable") };
    let mark = |value: u32| format!("{value:#x}/{:#x}", marks::VERDICT);
    let (allow, reject, drop) = (mark(marks::ALLOW), mark(marks::REJECT), mark(marks::DROP));
    let (first, last) = (*spec.queues.start(), *spec.queues.end());
    let queue = queue_target(&spec.queues, spec.fail_open);

    let mut text = String::new();
    for hook in &HOOKS {
        let mut rules = Vec::new();
        if let (false, Some(option)) = (spec.loopback, hook.loopback) {
            rules.push(format!("{option} lo -j RETURN"));
        }
        if ipv6 {
            // Neighbour discovery and MLD reports keep IPv6 itself working: never judged, so a
            // drop default or a daemon down with fail-closed cannot cut the link.
            for t in ND_TYPES {
                rules.push(format!("-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"));
            }
        }
        // A verdict's decision arrives on the packet mark (kernels without
        // CONFIG_NETFILTER_NETLINK_GLUE_CT cannot set the conntrack mark from user space) with
        // NF_REPEAT: copy it to the conntrack mark, so the rest of the flow is decided here.
        rules.push(format!(
            "-m mark ! --mark 0x0/{mask:#x} -j CONNMARK --save-mark --nfmask {mask:#x} --ctmask {mask:#x}",
            mask = marks::MASK
        ));
        rules.push(format!("-m connmark --mark {allow} -j RETURN"));
        rules.push(format!("-p tcp -m tcp --tcp-flags RST RST -m connmark --mark {reject} -j RETURN"));
        rules.push(format!("-p {icmp} -m conntrack --ctstate RELATED -m connmark --mark {reject} -j RETURN"));
        for matcher in ["connmark", "mark"] {
            rules.push(format!("-p tcp -m {matcher} --mark {reject} -j REJECT --reject-with tcp-reset"));
        }
        for matcher in ["connmark", "mark"] {
            rules.push(format!("-m {matcher} --mark {reject} -j REJECT --reject-with {unreachable}"));
        }
        for matcher in ["connmark", "mark"] {
            rules.push(format!("-m {matcher} --mark {reject} -j DROP"));
        }
        for matcher in ["connmark", "mark"] {
            rules.push(format!("-m {matcher} --mark {drop} -j DROP"));
        }
        // A flow with an owner (adopted at start, or recalled from the kernel) goes to its
        // owner's queue, whatever the balancing hash says.
        if first != last {
            for (k, num) in (first..=last).enumerate() {
                let bypass = if spec.fail_open { " --queue-bypass" } else { "" };
                rules.push(format!(
                    "-m connmark --mark {:#x}/{:#x} -j NFQUEUE --queue-num {num}{bypass}",
                    marks::owner(k),
                    marks::OWNER
                ));
            }
        }
        // A new flow's first packet that a static rule decides never reaches user space.
        if spec.statics.any_at(hook.statics) {
            rules.push(static_rules::hook_jump(hook.statics));
            rules.extend(static_rules::hook_tail(ipv6, spec.statics.log_group));
        }
        if first != last {
            // TCP and UDP by their ports; the rest (and IPv6 with extension headers before the
            // ports) by the addresses, below.
            for (proto, number) in [("tcp", 6), ("udp", 17)] {
                // Written as iptables lists it back, so a listing compares equal.
                let direct = if ipv6 { format!(" -m u32 --u32 \"0x4>>0x8&0xff={number:#x}\"") } else { String::new() };
                rules.push(format!("-p {proto}{direct} -j {SPREAD}"));
            }
        }
        rules.push(queue.clone());
        for rule in rules {
            text.push_str(&format!("-A {} {rule}\n", hook.chain));
        }
    }
    text.push_str(&static_rules::chain_rules(&spec.statics, ipv6));
    text.push_str(&spread_rules_text(spec, ipv6));
    text
}

/// The spreading chains' rules: a new TCP or UDP flow goes to queue `first + (s + d) mod n`,
/// where `s` and `d` are the low bits of its source and destination ports above the lowest one
/// (Linux gives `connect()` even source ports, so the lowest bit would put every connection to
/// one server port on one queue). The sum is the same
/// for both directions of a flow, so a flow's packets all reach one worker while connections of
/// one busy peer (same addresses, other ports) spread over all of them.
fn spread_rules_text(spec: &ChainSpec, ipv6: bool) -> String {
    let (first, last) = (*spec.queues.start(), *spec.queues.end());
    if first == last {
        return String::new();
    }
    let n = usize::from(last - first) + 1;
    let m = n.next_power_of_two().min(SPREAD_BY_SPORT.len());
    let mask = m - 1;
    // Where the ports are: after IPv4's header (its length in the header), or right after
    // IPv6's fixed 40 bytes (the jump checks that no extension header comes first).
    let ports = if ipv6 { "0x28" } else { "0x0>>0x16&0x3c@0x0" };
    let bypass = if spec.fail_open { " --queue-bypass" } else { "" };
    let mut text = String::new();
    for (i, chain) in SPREAD_BY_SPORT.iter().enumerate().take(m) {
        text.push_str(&format!("-A {SPREAD} -m u32 --u32 \"{ports}>>0x11&{mask:#x}={i:#x}\" -j {chain}\n"));
    }
    for (i, chain) in SPREAD_BY_SPORT.iter().enumerate().take(m) {
        for j in 0..m {
            let queue = usize::from(first) + (i + j) % n;
            text.push_str(&format!(
                "-A {chain} -m u32 --u32 \"{ports}>>0x1&{mask:#x}={j:#x}\" -j NFQUEUE --queue-num {queue}{bypass}\n"
            ));
        }
    }
    text
}

/// The packet stage's chains in the mangle table, their NFQUEUE rules and the jumps into them,
/// for one family (see the module documentation).
pub fn packet_ruleset_text(spec: &ChainSpec, ipv6: bool) -> String {
    let _ = ipv6; // the same rules for both families
    let mut text = String::from("*mangle\n");
    let table = &TABLES[1];
    for (_, chain) in &table.hooks {
        text.push_str(&format!(":{chain} - [0:0]\n"));
    }
    text.push_str(&packet_rules_text(spec));
    for (builtin, chain) in &table.hooks {
        text.push_str(&format!("-I {builtin} 1 -j {chain}\n"));
    }
    text.push_str("COMMIT\n");
    text
}

/// The NFQUEUE target for a range of queues: one queue, or balanced over several; with
/// `--queue-bypass` when failing open.
fn queue_target(queues: &RangeInclusive<u16>, fail_open: bool) -> String {
    let (first, last) = (*queues.start(), *queues.end());
    let mut queue = if first == last {
        format!("-j NFQUEUE --queue-num {first}")
    } else {
        format!("-j NFQUEUE --queue-balance {first}:{last}")
    };
    if fail_open {
        queue.push_str(" --queue-bypass");
    }
    queue
}

/// The `-A` lines of the packet stage's chains.
fn packet_rules_text(spec: &ChainSpec) -> String {
    let p = &spec.packet;
    let queue = queue_target(&p.queues, spec.fail_open);
    let mut text = String::new();
    let mut lo_exempt = [false; 3];
    for i in &p.interfaces {
        let name = i.glob.as_deref().and_then(iptables_interface);
        let hooks = [
            (PACKET_OUT, i.outbound, ["-o"].as_slice()),
            (PACKET_IN, i.inbound, &["-i"]),
            (PACKET_FWD, i.forwarded, &["-i", "-o"]),
        ];
        for (k, (chain, on, options)) in hooks.into_iter().enumerate() {
            if !on {
                continue;
            }
            match &name {
                Some(n) => {
                    for o in options {
                        text.push_str(&format!("-A {chain} {o} {n} {queue}\n"));
                    }
                }
                None => {
                    // Every interface: loopback only when it is filtered at all.
                    if !spec.loopback && k < 2 && !lo_exempt[k] {
                        lo_exempt[k] = true;
                        text.push_str(&format!("-A {chain} {} lo -j RETURN\n", options[0]));
                    }
                    text.push_str(&format!("-A {chain} {queue}\n"));
                }
            }
        }
    }
    text
}

/// Replaces the rules of flowgate's chains in both tables (a reload: rules, static rules,
/// packet stage coverage), for each family in one transaction: a packet sees the old rules or
/// the new ones, never none. The static rules' sets of `spec`'s generation are loaded first; the
/// sets of other generations are destroyed once no rule uses them.
pub fn replace_rules(spec: &ChainSpec, tools: &Tools) -> Result<(), NetfilterError> {
    check_queues(&spec.queues)?;
    if !spec.packet.interfaces.is_empty() {
        check_queues(&spec.packet.queues)?;
    }
    let generation = spec.statics.generation;
    let undo = |error: NetfilterError| {
        // The old rules stay in place with their sets; the new sets go.
        let _ = static_rules::destroy_generation(tools, generation);
        error
    };
    static_rules::load_sets(tools, &spec.statics).map_err(undo)?;
    for family in Family::BOTH {
        let ipv6 = family == Family::Ipv6;
        let mut text = String::from("*filter\n");
        for chain in HOOKS.iter().map(|h| h.chain).chain(TABLES[0].inner.iter().copied()) {
            text.push_str(&format!("-F {chain}\n"));
        }
        text.push_str(&filter_rules_text(spec, ipv6));
        text.push_str("COMMIT\n*mangle\n");
        for (_, chain) in &TABLES[1].hooks {
            text.push_str(&format!("-F {chain}\n"));
        }
        text.push_str(&packet_rules_text(spec));
        text.push_str("COMMIT\n");
        restore(tools, family, Step::Replacing, &text).map_err(undo)?;
    }
    // Best effort: a set left behind is destroyed at the next reload or at exit.
    let _ = static_rules::destroy_sets(tools, Some(generation), Step::RemovingSets);
    Ok(())
}

/// Removes flowgate from both families; whether anything was found.
fn remove_all(tools: &Tools, step: Step) -> Result<bool, NetfilterError> {
    let mut found = false;
    let mut errors = Vec::new();
    for family in Family::BOTH {
        match remove_family(tools, family, step) {
            Ok(f) => found |= f,
            Err(e) => errors.push(e),
        }
    }
    // Sets can go only once no rule refers to them.
    if errors.is_empty()
        && let Err(e) = static_rules::destroy_sets(tools, None, step)
    {
        errors.push(e);
    }
    combine(errors).map(|()| found)
}

/// How often removal lists and deletes before giving up.
const REMOVAL_ATTEMPTS: usize = 3;

/// Removes flowgate's jumps and chains for one family; whether anything was found. The table is
/// listed again after each removal, so copies added meanwhile go too, and a removal that failed
/// because the table changed under it is retried.
fn remove_family(tools: &Tools, family: Family, step: Step) -> Result<bool, NetfilterError> {
    let mut found = false;
    for attempt in 1..=REMOVAL_ATTEMPTS {
        let ours = list_ours(tools, family, step)?;
        if ours.is_empty() {
            return Ok(found);
        }
        found = true;
        match restore(tools, family, step, &ours.removal_text()) {
            Err(e) if attempt == REMOVAL_ATTEMPTS => return Err(e),
            Ok(()) | Err(_) => {}
        }
    }
    if list_ours(tools, family, step)?.is_empty() {
        Ok(found)
    } else {
        Err(NetfilterError::StillPresent { family, step, attempts: REMOVAL_ATTEMPTS })
    }
}

/// flowgate's jumps and chains found in the listings of its tables.
#[derive(Debug, Default, PartialEq, Eq)]
struct Ours {
    tables: Vec<OursIn>,
}

impl Ours {
    fn is_empty(&self) -> bool {
        self.tables.iter().all(OursIn::is_empty)
    }

    fn removal_text(&self) -> String {
        self.tables.iter().filter(|t| !t.is_empty()).map(OursIn::removal_text).collect()
    }
}

/// flowgate's jumps and chains found in a listing of one table.
#[derive(Debug, Default, PartialEq, Eq)]
struct OursIn {
    table: &'static str,
    /// The jump rules, as listed after `-A ` (chain name first).
    jumps: Vec<String>,
    chains: Vec<&'static str>,
}

impl OursIn {
    fn is_empty(&self) -> bool {
        self.jumps.is_empty() && self.chains.is_empty()
    }

    fn removal_text(&self) -> String {
        let mut text = format!("*{}\n", self.table);
        for jump in &self.jumps {
            text.push_str(&format!("-D {jump}\n"));
        }
        // All flushed before any is deleted: a chain cannot go while another jumps to it.
        for chain in &self.chains {
            text.push_str(&format!("-F {chain}\n"));
        }
        for chain in &self.chains {
            text.push_str(&format!("-X {chain}\n"));
        }
        text.push_str("COMMIT\n");
        text
    }
}

fn list_ours(tools: &Tools, family: Family, step: Step) -> Result<Ours, NetfilterError> {
    let (tool, program) = tools.lister(family);
    let mut ours = Ours::default();
    for table in &TABLES {
        let listing = run(tool, program, &["-w", "-t", table.name, "-S"], None, family, step)?;
        ours.tables.push(parse_listing_of(table, &listing));
    }
    Ok(ours)
}

/// Finds flowgate's chains (`-N`) and the rules of the built-in chains that jump or go to them
/// in `iptables -S` output of the filter table.
#[cfg(test)]
fn parse_listing(listing: &str) -> OursIn {
    parse_listing_of(&TABLES[0], listing)
}

/// The same for any of flowgate's tables.
fn parse_listing_of(table: &Table, listing: &str) -> OursIn {
    let chains: Vec<&'static str> = table.hooks.iter().map(|(_, c)| *c).chain(table.inner.iter().copied()).collect();
    let mut ours = OursIn { table: table.name, ..OursIn::default() };
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("-N ") {
            if let Some(chain) = chains.iter().find(|c| **c == name.trim()) {
                ours.chains.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let args = split_args(rule);
            let Some(chain) = args.first() else { continue };
            if !table.hooks.iter().any(|(builtin, _)| builtin == chain) {
                continue;
            }
            let target = args
                .windows(2)
                .rev()
                .find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
                .map(|w| w[1].as_str());
            if target.is_some_and(|t| chains.contains(&t)) {
                ours.jumps.push(rule.to_owned());
            }
        }
    }
    ours
}

/// Splits a rule as iptables prints it: words separated by blanks, `"…"` quoting blanks, and
/// `\` escaping the next character inside quotes.
fn split_args(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    args.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        args.push(current);
    }
    args
}

/// Feeds `input` to `iptables-restore --noflush` (or the IPv6 one): one transaction.
fn restore(tools: &Tools, family: Family, step: Step, input: &str) -> Result<(), NetfilterError> {
    let (tool, program) = tools.restore(family);
    run(tool, program, &["-w", "--noflush"], Some(input), family, step).map(drop)
}

/// Runs a tool (never through a shell) with `input` on its stdin; its stdout on success.
pub(crate) fn run(
    tool: &'static str,
    program: &Path,
    args: &[&str],
    input: Option<&str>,
    family: Family,
    step: Step,
) -> Result<String, NetfilterError> {
    let io_error = |source| NetfilterError::Run { tool, program: program.to_owned(), family, step, source };
    let mut child = Command::new(program)
        .args(args.iter().map(OsStr::new))
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error)?;
    let stdin = child.stdin.take();
    // The input is written from a second thread while this one collects the output, so neither
    // side can block the other on a full pipe.
    let (output, written) = std::thread::scope(|scope| {
        let writer = scope.spawn(move || match (stdin, input) {
            (Some(mut stdin), Some(input)) => stdin.write_all(input.as_bytes()),
            _ => Ok(()),
        });
        let output = child.wait_with_output();
        let written = writer.join().unwrap_or_else(|_| Err(io::Error::other("writing the input panicked")));
        (output, written)
    });
    let output = output.map_err(io_error)?;
    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        }
        return Err(NetfilterError::Failed {
            tool,
            program: program.to_owned(),
            family,
            step,
            status: output.status,
            stderr,
        });
    }
    // A tool that succeeded without reading all of its input did not apply all of it.
    written.map_err(io_error)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(queues: RangeInclusive<u16>, fail_open: bool, loopback: bool) -> ChainSpec {
        ChainSpec { queues, fail_open, loopback, packet: PacketChains::none(), statics: StaticRules::default() }
    }

    #[test]
    fn queue_rule_counters_are_read_from_flowgates_chains_only() {
        let listing = "-P OUTPUT ACCEPT -c 0 0\n-N FLOWGATE-OUT\n-N FLOWGATE-IN\n\
-A OUTPUT -c 9 900 -j FLOWGATE-OUT\n\
-A OUTPUT -c 5 500 -j NFQUEUE --queue-num 7\n\
-A FLOWGATE-OUT -o lo -c 2 168 -j RETURN\n\
-A FLOWGATE-OUT -m connmark --mark 0x40000/0x7c0000 -c 3 180 -j NFQUEUE --queue-num 0 --queue-bypass\n\
-A FLOWGATE-OUT -c 12 840 -j NFQUEUE --queue-balance 0:1 --queue-bypass\n\
-A FLOWGATE-IN -c 4 240 -j NFQUEUE\n";
        let got = parse_queue_counters(&TABLES[0], Family::Ipv6, listing);
        let short: Vec<(&str, RangeInclusive<u16>, u64, u64)> =
            got.iter().map(|c| (c.chain, c.queues.clone(), c.packets, c.bytes)).collect();
        assert_eq!(
            short,
            [(CHAIN_OUT, 0..=0, 3, 180), (CHAIN_OUT, 0..=1, 12, 840), (CHAIN_IN, 0..=0, 4, 240)],
            "the host's own NFQUEUE rule in OUTPUT is not flowgate's"
        );
        assert!(got.iter().all(|c| c.family == Family::Ipv6 && c.table == "filter"));
        let mangle = "-A FLOWGATE-PKT-IN -i tun+ -c 6 600 -j NFQUEUE --queue-balance 2:3\n";
        let got = parse_queue_counters(&TABLES[1], Family::Ipv4, mangle);
        assert_eq!((got[0].chain, got[0].queues.clone(), got[0].packets), (PACKET_IN, 2..=3, 6));
        assert!(parse_queue_counters(&TABLES[0], Family::Ipv4, mangle).is_empty(), "wrong table");
    }

    fn chain_rules<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        text.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
    }

    #[test]
    fn ipv4_two_queues_fail_open_loopback_exempt_is_exact() {
        let text = ruleset_text(&spec(0..=1, true, false), false);
        let expected = "\
*filter
:FLOWGATE-OUT - [0:0]
:FLOWGATE-IN - [0:0]
:FLOWGATE-FWD - [0:0]
:FLOWGATE-S-OUT - [0:0]
:FLOWGATE-S-IN - [0:0]
:FLOWGATE-S-FWD - [0:0]
:FLOWGATE-SPREAD - [0:0]
:FLOWGATE-SPREAD-0 - [0:0]
:FLOWGATE-SPREAD-1 - [0:0]
:FLOWGATE-SPREAD-2 - [0:0]
:FLOWGATE-SPREAD-3 - [0:0]
:FLOWGATE-SPREAD-4 - [0:0]
:FLOWGATE-SPREAD-5 - [0:0]
:FLOWGATE-SPREAD-6 - [0:0]
:FLOWGATE-SPREAD-7 - [0:0]
:FLOWGATE-SPREAD-8 - [0:0]
:FLOWGATE-SPREAD-9 - [0:0]
:FLOWGATE-SPREAD-10 - [0:0]
:FLOWGATE-SPREAD-11 - [0:0]
:FLOWGATE-SPREAD-12 - [0:0]
:FLOWGATE-SPREAD-13 - [0:0]
:FLOWGATE-SPREAD-14 - [0:0]
:FLOWGATE-SPREAD-15 - [0:0]
-A FLOWGATE-OUT -o lo -j RETURN
-A FLOWGATE-OUT -m mark ! --mark 0x0/0xffff0000 -j CONNMARK --save-mark --nfmask 0xffff0000 --ctmask 0xffff0000
-A FLOWGATE-OUT -m connmark --mark 0x10000/0x30000 -j RETURN
-A FLOWGATE-OUT -p tcp -m tcp --tcp-flags RST RST -m connmark --mark 0x20000/0x30000 -j RETURN
-A FLOWGATE-OUT -p icmp -m conntrack --ctstate RELATED -m connmark --mark 0x20000/0x30000 -j RETURN
-A FLOWGATE-OUT -p tcp -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset
-A FLOWGATE-OUT -p tcp -m mark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset
-A FLOWGATE-OUT -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port-unreachable
-A FLOWGATE-OUT -m mark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port-unreachable
-A FLOWGATE-OUT -m connmark --mark 0x20000/0x30000 -j DROP
-A FLOWGATE-OUT -m mark --mark 0x20000/0x30000 -j DROP
-A FLOWGATE-OUT -m connmark --mark 0x30000/0x30000 -j DROP
-A FLOWGATE-OUT -m mark --mark 0x30000/0x30000 -j DROP
-A FLOWGATE-OUT -m connmark --mark 0x40000/0x7c0000 -j NFQUEUE --queue-num 0 --queue-bypass
-A FLOWGATE-OUT -m connmark --mark 0x80000/0x7c0000 -j NFQUEUE --queue-num 1 --queue-bypass
-A FLOWGATE-OUT -p tcp -j FLOWGATE-SPREAD
-A FLOWGATE-OUT -p udp -j FLOWGATE-SPREAD
-A FLOWGATE-OUT -j NFQUEUE --queue-balance 0:1 --queue-bypass
-A FLOWGATE-IN -i lo -j RETURN
-A FLOWGATE-IN -m mark ! --mark 0x0/0xffff0000 -j CONNMARK --save-mark --nfmask 0xffff0000 --ctmask 0xffff0000
-A FLOWGATE-IN -m connmark --mark 0x10000/0x30000 -j RETURN
-A FLOWGATE-IN -p tcp -m tcp --tcp-flags RST RST -m connmark --mark 0x20000/0x30000 -j RETURN
-A FLOWGATE-IN -p icmp -m conntrack --ctstate RELATED -m connmark --mark 0x20000/0x30000 -j RETURN
-A FLOWGATE-IN -p tcp -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset
-A FLOWGATE-IN -p tcp -m mark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset
-A FLOWGATE-IN -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port-unreachable
-A FLOWGATE-IN -m mark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port-unreachable
-A FLOWGATE-IN -m connmark --mark 0x20000/0x30000 -j DROP
-A FLOWGATE-IN -m mark --mark 0x20000/0x30000 -j DROP
-A FLOWGATE-IN -m connmark --mark 0x30000/0x30000 -j DROP
-A FLOWGATE-IN -m mark --mark 0x30000/0x30000 -j DROP
-A FLOWGATE-IN -m connmark --mark 0x40000/0x7c0000 -j NFQUEUE --queue-num 0 --queue-bypass
-A FLOWGATE-IN -m connmark --mark 0x80000/0x7c0000 -j NFQUEUE --queue-num 1 --queue-bypass
-A FLOWGATE-IN -p tcp -j FLOWGATE-SPREAD
-A FLOWGATE-IN -p udp -j FLOWGATE-SPREAD
-A FLOWGATE-IN -j NFQUEUE --queue-balance 0:1 --queue-bypass
-A FLOWGATE-FWD -m mark ! --mark 0x0/0xffff0000 -j CONNMARK --save-mark --nfmask 0xffff0000 --ctmask 0xffff0000
-A FLOWGATE-FWD -m connmark --mark 0x10000/0x30000 -j RETURN
-A FLOWGATE-FWD -p tcp -m tcp --tcp-flags RST RST -m connmark --mark 0x20000/0x30000 -j RETURN
-A FLOWGATE-FWD -p icmp -m conntrack --ctstate RELATED -m connmark --mark 0x20000/0x30000 -j RETURN
-A FLOWGATE-FWD -p tcp -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset
-A FLOWGATE-FWD -p tcp -m mark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset
-A FLOWGATE-FWD -m connmark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port-unreachable
-A FLOWGATE-FWD -m mark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port-unreachable
-A FLOWGATE-FWD -m connmark --mark 0x20000/0x30000 -j DROP
-A FLOWGATE-FWD -m mark --mark 0x20000/0x30000 -j DROP
-A FLOWGATE-FWD -m connmark --mark 0x30000/0x30000 -j DROP
-A FLOWGATE-FWD -m mark --mark 0x30000/0x30000 -j DROP
-A FLOWGATE-FWD -m connmark --mark 0x40000/0x7c0000 -j NFQUEUE --queue-num 0 --queue-bypass
-A FLOWGATE-FWD -m connmark --mark 0x80000/0x7c0000 -j NFQUEUE --queue-num 1 --queue-bypass
-A FLOWGATE-FWD -p tcp -j FLOWGATE-SPREAD
-A FLOWGATE-FWD -p udp -j FLOWGATE-SPREAD
-A FLOWGATE-FWD -j NFQUEUE --queue-balance 0:1 --queue-bypass
-A FLOWGATE-SPREAD -m u32 --u32 \"0x0>>0x16&0x3c@0x0>>0x11&0x1=0x0\" -j FLOWGATE-SPREAD-0
-A FLOWGATE-SPREAD -m u32 --u32 \"0x0>>0x16&0x3c@0x0>>0x11&0x1=0x1\" -j FLOWGATE-SPREAD-1
-A FLOWGATE-SPREAD-0 -m u32 --u32 \"0x0>>0x16&0x3c@0x0>>0x1&0x1=0x0\" -j NFQUEUE --queue-num 0 --queue-bypass
-A FLOWGATE-SPREAD-0 -m u32 --u32 \"0x0>>0x16&0x3c@0x0>>0x1&0x1=0x1\" -j NFQUEUE --queue-num 1 --queue-bypass
-A FLOWGATE-SPREAD-1 -m u32 --u32 \"0x0>>0x16&0x3c@0x0>>0x1&0x1=0x0\" -j NFQUEUE --queue-num 1 --queue-bypass
-A FLOWGATE-SPREAD-1 -m u32 --u32 \"0x0>>0x16&0x3c@0x0>>0x1&0x1=0x1\" -j NFQUEUE --queue-num 0 --queue-bypass
-I OUTPUT 1 -j FLOWGATE-OUT
-I INPUT 1 -j FLOWGATE-IN
-I FORWARD 1 -j FLOWGATE-FWD
COMMIT
";
        assert_eq!(text, expected);
    }

    #[test]
    fn ipv6_uses_icmpv6_for_answers_and_rejects() {
        let text = ruleset_text(&spec(0..=1, true, false), true);
        let v4 = ruleset_text(&spec(0..=1, true, false), false);
        let nd = |chain: &str| {
            ND_TYPES
                .iter()
                .map(|t| format!("-A {chain} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN\n"))
                .collect::<String>()
        };
        let save = |chain: &str| format!("-A {chain} -m mark ! --mark 0x0/0xffff0000");
        let mut expected = v4
            .replace("-p icmp ", "-p ipv6-icmp ")
            .replace("icmp-port-unreachable", "icmp6-port-unreachable")
            .replace("-p tcp -j FLOWGATE-SPREAD", "-p tcp -m u32 --u32 \"0x4>>0x8&0xff=0x6\" -j FLOWGATE-SPREAD")
            .replace("-p udp -j FLOWGATE-SPREAD", "-p udp -m u32 --u32 \"0x4>>0x8&0xff=0x11\" -j FLOWGATE-SPREAD")
            .replace("0x0>>0x16&0x3c@0x0", "0x28");
        for chain in [CHAIN_OUT, CHAIN_IN, CHAIN_FWD] {
            expected = expected.replacen(&save(chain), &format!("{}{}", nd(chain), save(chain)), 1);
        }
        assert_eq!(text, expected);
        for chain in [CHAIN_OUT, CHAIN_IN, CHAIN_FWD] {
            let rules = chain_rules(&text, chain);
            assert!(
                rules.contains(
                    &"-p ipv6-icmp -m conntrack --ctstate RELATED -m connmark --mark 0x20000/0x30000 -j RETURN"
                )
            );
            assert!(rules.contains(&"-m mark --mark 0x20000/0x30000 -j REJECT --reject-with icmp6-port-unreachable"));
            assert!(!rules.iter().any(|r| r.contains("-p icmp ") || r.contains("icmp-port")));
        }
    }

    #[test]
    fn one_queue_uses_queue_num() {
        for ipv6 in [false, true] {
            let text = ruleset_text(&spec(3..=3, true, false), ipv6);
            for chain in [CHAIN_OUT, CHAIN_IN, CHAIN_FWD] {
                assert_eq!(chain_rules(&text, chain).last(), Some(&"-j NFQUEUE --queue-num 3 --queue-bypass"));
            }
            assert!(!text.contains("queue-balance"));
        }
    }

    #[test]
    fn several_queues_use_queue_balance() {
        let text = ruleset_text(&spec(2..=5, false, false), false);
        for chain in [CHAIN_OUT, CHAIN_IN, CHAIN_FWD] {
            let rules = chain_rules(&text, chain);
            assert_eq!(rules.last(), Some(&"-j NFQUEUE --queue-balance 2:5"));
            // Owned flows go to their owner's queue, ahead of the balancing.
            let owned: Vec<&str> = rules.iter().copied().filter(|r| r.contains("--queue-num")).collect();
            assert_eq!(
                owned,
                [
                    "-m connmark --mark 0x40000/0x7c0000 -j NFQUEUE --queue-num 2",
                    "-m connmark --mark 0x80000/0x7c0000 -j NFQUEUE --queue-num 3",
                    "-m connmark --mark 0xc0000/0x7c0000 -j NFQUEUE --queue-num 4",
                    "-m connmark --mark 0x100000/0x7c0000 -j NFQUEUE --queue-num 5",
                ]
            );
            assert_eq!(marks::owner_of(0x100000), Some(3));
        }
    }

    #[test]
    fn bypass_only_when_failing_open() {
        for ipv6 in [false, true] {
            let open = ruleset_text(&spec(0..=1, true, false), ipv6);
            let closed = ruleset_text(&spec(0..=1, false, false), ipv6);
            assert_eq!(
                open.matches("--queue-bypass").count(),
                3 * 3 + 4,
                "balance and two owner rules, three chains; four spreading rules"
            );
            assert_eq!(closed.matches("--queue-bypass").count(), 0);
            assert_eq!(open.replace(" --queue-bypass", ""), closed);
        }
    }

    #[test]
    fn loopback_exemption_only_when_loopback_is_not_filtered() {
        for ipv6 in [false, true] {
            let exempt = ruleset_text(&spec(0..=0, true, false), ipv6);
            let filtered = ruleset_text(&spec(0..=0, true, true), ipv6);
            assert_eq!(chain_rules(&exempt, CHAIN_OUT)[0], "-o lo -j RETURN");
            assert_eq!(chain_rules(&exempt, CHAIN_IN)[0], "-i lo -j RETURN");
            assert!(!chain_rules(&exempt, CHAIN_FWD).iter().any(|r| r.contains(" lo ")));
            assert!(!filtered.contains(" lo "));
            let without: String =
                exempt.lines().filter(|l| !l.contains(" lo -j RETURN")).map(|l| format!("{l}\n")).collect();
            assert_eq!(without, filtered);
        }
    }

    #[test]
    fn order_is_declarations_rules_jumps_commit() {
        let text = ruleset_text(&spec(0..=1, false, false), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "*filter");
        assert_eq!(
            &lines[1..7],
            [
                ":FLOWGATE-OUT - [0:0]",
                ":FLOWGATE-IN - [0:0]",
                ":FLOWGATE-FWD - [0:0]",
                ":FLOWGATE-S-OUT - [0:0]",
                ":FLOWGATE-S-IN - [0:0]",
                ":FLOWGATE-S-FWD - [0:0]"
            ]
        );
        assert_eq!(lines[7], ":FLOWGATE-SPREAD - [0:0]");
        let n = lines.len();
        assert_eq!(
            &lines[n - 4..],
            ["-I OUTPUT 1 -j FLOWGATE-OUT", "-I INPUT 1 -j FLOWGATE-IN", "-I FORWARD 1 -j FLOWGATE-FWD", "COMMIT"]
        );
        assert!(lines[24..n - 4].iter().all(|l| l.starts_with("-A FLOWGATE-")));

        // Within a chain: loopback, the verdict's packet mark saved to conntrack, allow, answers to rejects, reject TCP, reject the rest,
        // catch-all drop for rejects, silent drop, queue.
        let rules = chain_rules(&text, CHAIN_OUT);
        let position = |needle: &str| {
            rules.iter().position(|r| r.contains(needle)).unwrap_or_else(|| panic!("no rule with {needle}"))
        };
        let order = [
            position("-o lo -j RETURN"),
            position("-j CONNMARK --save-mark"),
            position("0x10000/0x30000 -j RETURN"),
            position("--tcp-flags RST RST"),
            position("--ctstate RELATED"),
            position("-m connmark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset"),
            position("-m mark --mark 0x20000/0x30000 -j REJECT --reject-with tcp-reset"),
            position("-m connmark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port"),
            position("-m mark --mark 0x20000/0x30000 -j REJECT --reject-with icmp-port"),
            position("-m connmark --mark 0x20000/0x30000 -j DROP"),
            position("-m mark --mark 0x20000/0x30000 -j DROP"),
            position("-m connmark --mark 0x30000/0x30000 -j DROP"),
            position("-m mark --mark 0x30000/0x30000 -j DROP"),
            position("-j NFQUEUE --queue-num 0"),
            position("-j NFQUEUE --queue-num 1"),
            position("-p tcp -j FLOWGATE-SPREAD"),
            position("-p udp -j FLOWGATE-SPREAD"),
            position("-j NFQUEUE --queue-balance"),
        ];
        assert_eq!(order.to_vec(), (0..rules.len()).collect::<Vec<_>>());
        // TCP resets are only ever sent for TCP.
        assert!(rules.iter().filter(|r| r.contains("tcp-reset")).all(|r| r.starts_with("-p tcp ")));
    }

    #[test]
    fn marks_come_from_the_contract() {
        let text = ruleset_text(&spec(0..=0, true, false), false);
        assert!(text.contains(&format!("{:#x}/{:#x} -j RETURN", marks::ALLOW, marks::VERDICT)));
        assert!(text.contains(&format!("{:#x}/{:#x} -j REJECT", marks::REJECT, marks::VERDICT)));
        assert!(text.contains(&format!("{:#x}/{:#x} -j DROP", marks::DROP, marks::VERDICT)));
    }

    #[test]
    fn queue_ranges_are_checked() {
        assert!(check_queues(&(0..=0)).is_ok());
        assert!(check_queues(&(0..=65534)).is_ok());
        assert!(check_queues(&(1..=65535)).is_ok());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 5..=4;
        let err = check_queues(&empty).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("invalid NFQUEUE range 5..=4: the range is empty"));
        assert!(matches!(check_queues(&(0..=65535)), Err(NetfilterError::InvalidQueues { .. })));
    }

    #[test]
    fn listing_finds_jumps_in_builtins_and_our_chains_only() {
        let listing = "\
-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N FLOWGATE-FWD
-N FLOWGATE-IN
-N FLOWGATE-OUT
-N HOST-CHAIN
-N FLOWGATE-OTHER
-A INPUT -j FLOWGATE-IN
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FORWARD -j FLOWGATE-FWD
-A OUTPUT -j FLOWGATE-OUT
-A OUTPUT -m comment --comment \"-j FLOWGATE-OUT\" -j ACCEPT
-A OUTPUT -m comment --comment \"say \\\"hi\\\"\" -g FLOWGATE-OUT
-A OUTPUT -j FLOWGATE-OUT
-A OUTPUT -p tcp -m tcp --dport 25 -j DROP
-A HOST-CHAIN -j FLOWGATE-OUT
-A FLOWGATE-OUT -j NFQUEUE --queue-num 0
";
        let ours = parse_listing(listing);
        assert_eq!(ours.chains, [CHAIN_FWD, CHAIN_IN, CHAIN_OUT]);
        assert_eq!(
            ours.jumps,
            [
                "INPUT -j FLOWGATE-IN",
                "FORWARD -j FLOWGATE-FWD",
                "OUTPUT -j FLOWGATE-OUT",
                "OUTPUT -m comment --comment \"say \\\"hi\\\"\" -g FLOWGATE-OUT",
                "OUTPUT -j FLOWGATE-OUT",
            ]
        );
        assert_eq!(
            ours.removal_text(),
            "*filter\n-D INPUT -j FLOWGATE-IN\n-D FORWARD -j FLOWGATE-FWD\n-D OUTPUT -j FLOWGATE-OUT\n\
             -D OUTPUT -m comment --comment \"say \\\"hi\\\"\" -g FLOWGATE-OUT\n-D OUTPUT -j FLOWGATE-OUT\n\
             -F FLOWGATE-FWD\n-F FLOWGATE-IN\n-F FLOWGATE-OUT\n-X FLOWGATE-FWD\n-X FLOWGATE-IN\n-X FLOWGATE-OUT\nCOMMIT\n"
        );
        assert!(parse_listing("-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n").is_empty());
    }

    fn packet_spec(interfaces: Vec<PacketInterface>, fail_open: bool, loopback: bool) -> ChainSpec {
        ChainSpec {
            queues: 0..=1,
            fail_open,
            loopback,
            packet: PacketChains { queues: 2..=3, interfaces },
            statics: StaticRules::default(),
        }
    }

    fn iface(glob: Option<&str>, inbound: bool, outbound: bool, forwarded: bool) -> PacketInterface {
        PacketInterface { glob: glob.map(str::to_string), inbound, outbound, forwarded }
    }

    #[test]
    fn packet_chains_queue_each_covered_interface_and_direction_in_the_mangle_table() {
        let spec = packet_spec(
            vec![iface(Some("tun*"), true, true, true), iface(Some("wg0"), false, true, false)],
            true,
            false,
        );
        let text = packet_ruleset_text(&spec, false);
        let q = "-j NFQUEUE --queue-balance 2:3 --queue-bypass";
        assert_eq!(
            text,
            format!(
                "*mangle\n:FLOWGATE-PKT-OUT - [0:0]\n:FLOWGATE-PKT-IN - [0:0]\n:FLOWGATE-PKT-FWD - [0:0]\n\
                 -A FLOWGATE-PKT-OUT -o tun+ {q}\n-A FLOWGATE-PKT-IN -i tun+ {q}\n\
                 -A FLOWGATE-PKT-FWD -i tun+ {q}\n-A FLOWGATE-PKT-FWD -o tun+ {q}\n\
                 -A FLOWGATE-PKT-OUT -o wg0 {q}\n\
                 -I OUTPUT 1 -j FLOWGATE-PKT-OUT\n-I INPUT 1 -j FLOWGATE-PKT-IN\n-I FORWARD 1 -j FLOWGATE-PKT-FWD\nCOMMIT\n"
            )
        );
        // Fail closed: no bypass; an empty stage: empty chains, jumps all the same.
        let closed =
            packet_ruleset_text(&packet_spec(vec![iface(Some("tun0"), true, false, false)], false, false), true);
        assert!(closed.contains("-A FLOWGATE-PKT-IN -i tun0 -j NFQUEUE --queue-balance 2:3\n"), "{closed}");
        let empty = packet_ruleset_text(&packet_spec(vec![], true, false), false);
        assert!(!empty.contains("-A "), "{empty}");
        assert!(empty.contains("-I FORWARD 1 -j FLOWGATE-PKT-FWD\n"));
    }

    #[test]
    fn every_interface_exempts_loopback_unless_it_is_filtered() {
        let all = packet_ruleset_text(&packet_spec(vec![iface(None, true, true, true)], true, false), false);
        assert!(all.contains("-A FLOWGATE-PKT-OUT -o lo -j RETURN\n-A FLOWGATE-PKT-OUT -j NFQUEUE"), "{all}");
        assert!(all.contains("-A FLOWGATE-PKT-IN -i lo -j RETURN\n-A FLOWGATE-PKT-IN -j NFQUEUE"), "{all}");
        assert!(all.contains("-A FLOWGATE-PKT-FWD -j NFQUEUE"), "{all}");
        let with_lo = packet_ruleset_text(&packet_spec(vec![iface(Some("*"), true, true, false)], true, true), false);
        assert!(!with_lo.contains(" lo "), "{with_lo}");
    }

    #[test]
    fn globs_become_iptables_names_widened_where_they_must_be() {
        assert_eq!(iptables_interface("tun*").as_deref(), Some("tun+"));
        assert_eq!(iptables_interface("wg0").as_deref(), Some("wg0"));
        assert_eq!(iptables_interface("t?n0").as_deref(), Some("t+"));
        assert_eq!(iptables_interface("*vpn"), None);
        assert_eq!(iptables_interface("*"), None);
    }

    #[test]
    fn removal_covers_the_mangle_table_too() {
        let listing = "-P OUTPUT ACCEPT\n-N FLOWGATE-PKT-OUT\n-N FLOWGATE-OUT\n-A OUTPUT -j FLOWGATE-PKT-OUT\n-A FLOWGATE-PKT-OUT -o tun+ -j NFQUEUE --queue-num 2\n";
        let ours = parse_listing_of(&TABLES[1], listing);
        assert_eq!(ours.jumps, ["OUTPUT -j FLOWGATE-PKT-OUT"]);
        assert_eq!(ours.chains, [PACKET_OUT], "only the mangle table's chains count here");
        assert_eq!(
            ours.removal_text(),
            "*mangle\n-D OUTPUT -j FLOWGATE-PKT-OUT\n-F FLOWGATE-PKT-OUT\n-X FLOWGATE-PKT-OUT\nCOMMIT\n"
        );
    }

    #[test]
    fn split_args_handles_quotes_and_escapes() {
        assert_eq!(split_args("OUTPUT  -j  X "), ["OUTPUT", "-j", "X"]);
        assert_eq!(split_args(r#"OUTPUT --comment "a b" -j X"#), ["OUTPUT", "--comment", "a b", "-j", "X"]);
        assert_eq!(split_args(r#"--comment "say \"hi\" \\" x"#), ["--comment", r#"say "hi" \"#, "x"]);
        assert_eq!(split_args(r#"--comment "" x"#), ["--comment", "", "x"]);
    }

    #[test]
    fn error_messages_name_tool_family_step_status_and_stderr() {
        let failed = NetfilterError::Failed {
            tool: "ip6tables-restore",
            program: PathBuf::from("/usr/sbin/ip6tables-restore"),
            family: Family::Ipv6,
            step: Step::Installing,
            status: ExitStatus::from_raw(2 << 8),
            stderr: "iptables-restore: line 7 failed".into(),
        };
        assert_eq!(
            failed.to_string(),
            "ip6tables-restore (IPv6, installing chains) failed with exit status 2: iptables-restore: line 7 failed"
        );
        let silent = NetfilterError::Failed {
            tool: "iptables",
            program: PathBuf::from("/bin/false"),
            family: Family::Ipv4,
            step: Step::RemovingLeftovers,
            status: ExitStatus::from_raw(9),
            stderr: String::new(),
        };
        assert_eq!(silent.to_string(), "iptables (IPv4, removing leftovers) failed with signal 9: no error output");
        let run = NetfilterError::Run {
            tool: "iptables-restore",
            program: PathBuf::from("/nonexistent/iptables-restore"),
            family: Family::Ipv4,
            step: Step::Removing,
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(
            run.to_string(),
            "could not run iptables-restore (IPv4, removing chains) as /nonexistent/iptables-restore: entity not found"
        );
        let both = NetfilterError::Several(vec![silent, run]);
        assert!(both.to_string().contains("(IPv4, removing leftovers)"));
        assert!(both.to_string().contains("; could not run iptables-restore"));
    }

    #[test]
    fn missing_program_is_reported_with_its_path() {
        let tools = Tools {
            iptables_restore: "/nonexistent/iptables-restore".into(),
            ip6tables_restore: "/nonexistent/ip6tables-restore".into(),
            iptables: "/nonexistent/iptables".into(),
            ip6tables: "/nonexistent/ip6tables".into(),
            ipset: "/nonexistent/ipset".into(),
        };
        let err = cleanup(&tools).map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("could not run iptables (IPv4, removing leftovers) as /nonexistent/iptables"), "{err}");
        assert!(err.contains("could not run ip6tables (IPv6, removing leftovers) as /nonexistent/ip6tables"), "{err}");
    }

    #[test]
    fn run_feeds_stdin_and_reports_failures() {
        let out = run("cat", Path::new("/bin/cat"), &[], Some("hello\n"), Family::Ipv4, Step::Installing);
        assert_eq!(out.ok().as_deref(), Some("hello\n"));
        let err =
            run("sh", Path::new("/bin/sh"), &["-c", "echo ' oops ' >&2; exit 3"], None, Family::Ipv6, Step::Removing)
                .err()
                .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("sh (IPv6, removing chains) failed with exit status 3: oops"));
    }

    #[test]
    fn default_tools_are_found() {
        let tools = Tools::default();
        for path in [&tools.iptables_restore, &tools.ip6tables_restore, &tools.iptables, &tools.ip6tables] {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(name.contains("tables"), "{}", path.display());
        }
    }
}
