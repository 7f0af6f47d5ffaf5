//! The config file: TOML in, a validated rule set and engine settings out.
//!
//! Loading never touches the system: it reads one file, checks every key and value, and returns
//! either a [`Config`] or a [`ConfigError`] that names the file, the line and the field. Unknown
//! keys are errors (a misspelt key silently ignored is a rule silently not enforced). The meaning
//! of each value (CIDR, ports, protocol, ...) is parsed by `flowgate_core::rules`; this module
//! adds the TOML shape and the positions. Lints come back as [`Warning`]s with their line.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowgate_core::hosts::{HostPattern, HostSet, parse_hosts_file};
use flowgate_core::owner::{Glob, UserMatch};
use flowgate_core::packet_stage::{Directions, PacketDirection, PacketRule, PacketRuleAction, PacketRules};
use flowgate_core::rules::{self, Action, InterfaceGlob, Rule, RuleSet, lint};
use flowgate_core::{EngineConfig, EventFormat, Timeouts};
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// What traffic does while the daemon cannot answer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FailMode {
    Open,
    Closed,
}

/// Settings of the live daemon (`flowgate run`); replay ignores them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Live {
    /// Number of NFQUEUE queues (worker threads), numbered from `first_queue`.
    pub queues: u16,
    pub first_queue: u16,
    /// Packets the kernel may hold per queue while the daemon is busy.
    pub queue_max_len: u32,
    /// Also filter loopback traffic.
    pub loopback: bool,
    /// Let the kernel decide flows that rules can settle by addresses, ports, protocol,
    /// direction and interface alone (`kernel_rules`, default on); off: every new flow is
    /// queued to user space and judged there.
    pub kernel_rules: bool,
    /// Directory for the control socket and the instance lock.
    pub run_dir: PathBuf,
    /// Group (besides root) allowed to use the control socket.
    pub control_group: Option<String>,
    /// Where Prometheus metrics are served (`metrics`); `None`: nowhere (the default).
    pub metrics: Option<MetricsAddr>,
    /// Where flow events go.
    pub log: LogTarget,
    /// Events in flight between the queue workers and the writer; past it events are dropped
    /// and counted rather than slow the packet path.
    pub event_buffer: usize,
    /// How flows' owning processes are found (`attribution`).
    pub attribution: Attribution,
    /// Longest a new flow that an owner rule may decide waits for its owner (`attribution_wait`);
    /// then its owner counts as unknown.
    pub attribution_wait: Duration,
}

/// How the daemon finds the process that owns a flow (`attribution`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Attribution {
    /// Kernel capture (BPF) where this kernel allows it, else `/proc` (`"auto"`, the default).
    #[default]
    Auto,
    /// Kernel capture only; the daemon does not start without it (`"kernel"`).
    Kernel,
    /// The socket by its ends (sock_diag), its process through `/proc` (`"proc"`).
    Proc,
    /// No attribution: no owner in events, rules that name one are refused (`"off"`).
    Off,
}

impl Default for Live {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Live {
            queues: u16::try_from(cpus.min(16)).unwrap_or(1),
            first_queue: 0,
            queue_max_len: 4096,
            loopback: false,
            kernel_rules: true,
            run_dir: PathBuf::from("/run/flowgate"),
            control_group: None,
            metrics: None,
            log: LogTarget::Stdout,
            event_buffer: 65_536,
            attribution: Attribution::Auto,
            attribution_wait: Duration::from_millis(250),
        }
    }
}

/// Where the live daemon's flow events go (`log`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output (`"-"`).
    #[default]
    Stdout,
    /// This file, appended to (an absolute path).
    File(PathBuf),
    /// The local syslog socket, one datagram per record (`"syslog"`: [`SYSLOG_SOCKET`], or
    /// `"syslog:/path"`).
    Syslog(PathBuf),
    /// systemd-journald's native protocol, one entry per record (`"journald"`:
    /// [`JOURNALD_SOCKET`], or `"journald:/path"`).
    Journald(PathBuf),
}

/// The local syslog socket.
pub const SYSLOG_SOCKET: &str = "/dev/log";
/// systemd-journald's socket for its native protocol.
pub const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";

/// Where the daemon serves its Prometheus metrics (`metrics = "127.0.0.1:9464"`, or an absolute
/// path for a Unix socket).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating zero).
const MAX_UNIX_PATH: usize = 107;

impl MetricsAddr {
    /// Parses the `metrics` value: an IP address and port, or an absolute path.
    pub fn parse(text: &str) -> Result<MetricsAddr, String> {
        let text = text.trim();
        if text.starts_with('/') {
            if text.len() > MAX_UNIX_PATH {
                return Err(format!("a Unix socket path can be at most {MAX_UNIX_PATH} bytes long"));
            }
            if text.ends_with('/') {
                return Err(format!("`{text}` names a directory: give the socket's file path"));
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(text)));
        }
        match text.parse::<std::net::SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                Err(format!("`{text}`: port 0 would be a random port; give the port to serve on"))
            }
            Ok(a) => Ok(MetricsAddr::Tcp(a)),
            Err(_) => Err(format!(
                "`{text}` is neither an address:port (an IP address, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\") nor an absolute path to a Unix socket"
            )),
        }
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsAddr::Tcp(a) => write!(f, "http://{a}/metrics"),
            MetricsAddr::Unix(p) => write!(f, "{} (/metrics)", p.display()),
        }
    }
}

/// The packet stage (`[packet_filter]`, `[[packet_rule]]`): see `flowgate_core::packet_stage`.
#[derive(Clone, Debug, PartialEq)]
pub struct PacketConfig {
    /// Interfaces whose packets a product's packet filter judges (`[packet_filter] interfaces`).
    pub filter_interfaces: Vec<InterfaceGlob>,
    /// Directions it judges them in.
    pub filter_directions: Directions,
    /// NFQUEUE queues (worker threads) of the packet stage, numbered after the flow queues.
    pub queues: u16,
    /// Most packets delayed at once per queue, and longest delay.
    pub max_delayed: usize,
    pub max_delay: Duration,
    /// What a packet delayed past `max_delay` gets: accepted, or dropped.
    pub expired_accept: bool,
    /// The stateless packet rules, in order.
    pub rules: PacketRules,
}

impl Default for PacketConfig {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        PacketConfig {
            filter_interfaces: Vec::new(),
            filter_directions: Directions::ALL,
            queues: u16::try_from(cpus.clamp(1, 4)).unwrap_or(1),
            max_delayed: 4096,
            max_delay: Duration::from_secs(10),
            expired_accept: false,
            rules: PacketRules::default(),
        }
    }
}

impl PacketConfig {
    /// What the packet stage's chains must send to it: every interface glob of the packet
    /// filter and of the packet rules (a rule without one: every interface), with the
    /// directions each needs.
    pub fn covered(&self) -> Vec<(Option<String>, Directions)> {
        let mut out: Vec<(Option<String>, Directions)> = Vec::new();
        let mut add = |glob: Option<&str>, d: Directions| {
            let glob = glob.filter(|g| *g != "*").map(str::to_string);
            match out.iter_mut().find(|(g, _)| *g == glob) {
                Some((_, have)) => *have = have.union(d),
                None => out.push((glob, d)),
            }
        };
        for g in &self.filter_interfaces {
            add(Some(g.as_str()), self.filter_directions);
        }
        for r in &self.rules.rules {
            add(r.interface.as_ref().map(InterfaceGlob::as_str), r.directions);
        }
        out.retain(|(_, d)| !d.is_empty());
        out
    }
}

/// A loaded, validated config.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub rules: RuleSet,
    /// Line of each rule's `[[rule]]` header, for messages.
    pub rule_lines: Vec<usize>,
    pub engine: EngineConfig,
    pub fail: FailMode,
    pub live: Live,
    pub packet: PacketConfig,
    pub warnings: Vec<Warning>,
    /// The shape of written events, live and in replay (`event_format`).
    pub event_format: EventFormat,
}

/// A config that loads but probably does not say what its author meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: warning: {}", self.path.display(), self.line, self.message)
    }
}

/// Why a config could not be loaded: file, line, column and field where known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ": `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    default_action: Option<Spanned<String>>,
    fail: Option<Spanned<String>>,
    unparsable: Option<Spanned<String>>,
    local_addresses: Option<Vec<Spanned<String>>>,
    max_flows: Option<Spanned<i64>>,
    queues: Option<Spanned<i64>>,
    first_queue: Option<Spanned<i64>>,
    queue_max_len: Option<Spanned<i64>>,
    loopback: Option<bool>,
    kernel_rules: Option<bool>,
    run_dir: Option<Spanned<String>>,
    control_group: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    log: Option<Spanned<String>>,
    event_format: Option<Spanned<String>>,
    event_buffer: Option<Spanned<i64>>,
    attribution: Option<Spanned<String>>,
    attribution_wait: Option<Spanned<String>>,
    hosts_file: Option<Spanned<String>>,
    hold_timeout: Option<Spanned<String>>,
    hold_timeout_action: Option<Spanned<String>>,
    overlap_conflict: Option<Spanned<String>>,
    timeouts: Option<RawTimeouts>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
    packet_filter: Option<Spanned<RawPacketFilter>>,
    #[serde(default, rename = "packet_rule")]
    packet_rules: Vec<Spanned<RawPacketRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacketFilter {
    interfaces: Option<Spanned<toml::Value>>,
    directions: Option<Spanned<toml::Value>>,
    queues: Option<Spanned<i64>>,
    max_delayed: Option<Spanned<i64>>,
    max_delay: Option<Spanned<String>>,
    on_delay_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPacketRule {
    name: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    direction: Option<Spanned<toml::Value>>,
    protocol: Option<Spanned<String>>,
    remote: Option<Spanned<toml::Value>>,
    local: Option<Spanned<toml::Value>>,
    action: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tcp: Option<Spanned<String>>,
    tcp_closing: Option<Spanned<String>>,
    udp: Option<Spanned<String>>,
    icmp: Option<Spanned<String>>,
    other: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    remote: Option<Spanned<toml::Value>>,
    local: Option<Spanned<toml::Value>>,
    remote_ports: Option<Spanned<toml::Value>>,
    local_ports: Option<Spanned<toml::Value>>,
    protocol: Option<Spanned<String>>,
    direction: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    host: Option<Spanned<toml::Value>>,
    hosts_file: Option<Spanned<String>>,
    process: Option<Spanned<String>>,
    user: Option<Spanned<toml::Value>>,
    unit: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    action: Option<Spanned<String>>,
    silent: Option<Spanned<bool>>,
    peek: Option<Spanned<RawPeek>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeek {
    outbound: Option<u32>,
    inbound: Option<u32>,
}

/// Byte offsets → line and column, and the error builder for one file.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    /// Byte offset where each line starts, so a position is a binary search, not a scan
    /// (a file of 100,000 rules asks for a position per rule).
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(path: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        Source { path, text, line_starts }
    }

    /// 1-based line and column (in bytes) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset).max(1);
        (line, offset - self.line_starts[line - 1] + 1)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.position(span.start).0
    }

    fn error(&self, span: Option<Range<usize>>, field: Option<&str>, message: impl Into<String>) -> ConfigError {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = self.position(s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            column,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    fn at<T>(&self, v: &Spanned<T>, field: &str, message: impl Into<String>) -> ConfigError {
        self.error(Some(v.span()), Some(field), message)
    }

    /// The key written on the line of `offset` (`key = value`), to name the field in errors
    /// that come from the TOML layer without it.
    fn key_at(&self, offset: usize) -> Option<String> {
        let start = self.text[..offset.min(self.text.len())].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next()?;
        let (key, _) = line.split_once('=')?;
        let key = key.trim();
        (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read config: {e}"),
    })?;
    parse(path, &text)
}

/// Validates config text; `path` is only used in messages.
/// Most flows the daemon tracks (16,777,215: a few gigabytes of tables).
pub const MAX_FLOWS: usize = (1 << 24) - 1;

/// How often the live daemon syncs with conntrack: a third of the shortest idle timeout (so a
/// kernel-handled flow is found idle soon after its timeout), between 0.5 s and 30 s.
pub fn sync_interval(t: &flowgate_core::Timeouts) -> std::time::Duration {
    let shortest = [t.tcp, t.udp, t.icmp, t.other].into_iter().min().unwrap_or_default();
    (shortest / 3).clamp(std::time::Duration::from_millis(500), std::time::Duration::from_secs(30))
}

pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let src = Source::new(path, text);
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let field = span.as_ref().and_then(|s| src.key_at(s.start));
        src.error(span, field.as_deref(), e.message().trim().to_string())
    })?;

    let default_action = match &raw.default_action {
        None => Action::Allow,
        Some(v) => match v.get_ref().as_str() {
            "allow" => Action::Allow,
            "drop" => Action::Drop,
            other => {
                return Err(src.at(
                    v,
                    "default_action",
                    format!("`{other}` is not a default action: expected allow or drop"),
                ));
            }
        },
    };
    let fail = match &raw.fail {
        None => FailMode::Open,
        Some(v) => match v.get_ref().as_str() {
            "open" => FailMode::Open,
            "closed" => FailMode::Closed,
            other => {
                return Err(src.at(v, "fail", format!("`{other}` is not a fail mode: expected open or closed")));
            }
        },
    };
    let mut engine = EngineConfig::default();
    for a in raw.local_addresses.iter().flatten() {
        let net = rules::parse_network(a.get_ref()).map_err(|e| src.at(a, "local_addresses", e.0))?;
        engine.local_networks.push(net);
    }
    if let Some(m) = &raw.max_flows {
        engine.max_flows = usize::try_from(*m.get_ref())
            .ok()
            .filter(|&n| (1..=MAX_FLOWS).contains(&n))
            .ok_or_else(|| src.at(m, "max_flows", format!("must be a number of flows from 1 to {MAX_FLOWS}")))?;
    }
    if let Some(t) = &raw.timeouts {
        engine.timeouts = timeouts(&src, t)?;
    }
    engine.kernel_sync_interval = sync_interval(&engine.timeouts);
    let live = live(&src, &raw)?;

    let mut warnings = Vec::new();
    let mut rule_list = Vec::with_capacity(raw.rules.len());
    let mut rule_lines = Vec::with_capacity(raw.rules.len());
    let mut names = std::collections::HashMap::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let line = src.line(&r.span());
        let rule = rule(&src, i, r.get_ref(), &mut warnings)?;
        if let Some(first) = names.insert(rule.name.clone(), line) {
            let span = r.get_ref().name.as_ref().map(Spanned::span);
            return Err(src.error(
                span,
                Some("name"),
                format!("rule name `{}` is already used by the rule at line {first}", rule.name),
            ));
        }
        if live.attribution == Attribution::Off && !rule.owner.is_empty() {
            return Err(src.error(
                Some(r.span()),
                None,
                format!("rule `{}` names a process, user, unit or cgroup, but attribution = \"off\"", rule.name),
            ));
        }
        rule_lines.push(line);
        rule_list.push(rule);
    }
    if let Some(v) = &raw.hosts_file {
        // A blocklist: checked before the rules (a rule's own `hosts_file` gives a list any
        // place and action).
        let mut rule = Rule::new("hosts_file", Action::Drop);
        rule.host = rules::HostMatch::new(&[], vec![hosts_list(&src, v, "hosts_file", &mut warnings)?]);
        if names.contains_key("hosts_file") {
            return Err(src.at(
                v,
                "hosts_file",
                "a rule is already named `hosts_file`, the name of the blocklist's rule",
            ));
        }
        rule_list.insert(0, rule);
        rule_lines.insert(0, src.line(&v.span()));
    }
    let set = RuleSet { rules: rule_list, default_action };
    engine.fail_open = fail == FailMode::Open;
    inspection(&src, &raw, &mut engine)?;
    // A packet no rule can see must not slip past rules that drop: by default it is dropped as
    // soon as anything could be.
    engine.drop_unparsable = match &raw.unparsable {
        None => set.default_action == Action::Drop || set.rules.iter().any(|r| r.action == Action::Drop),
        Some(v) => match v.get_ref().as_str() {
            "drop" => true,
            "accept" => false,
            other => return Err(src.at(v, "unparsable", format!("`{other}` is not drop or accept"))),
        },
    };
    for l in lint::lint(&set) {
        warnings.push(Warning { path: path.to_path_buf(), line: rule_lines[l.rule()], message: l.message(&set) });
    }
    let packet = packet_config(&src, &raw, &live, &mut warnings)?;
    warnings.sort_by_key(|w| w.line);
    let event_format = match &raw.event_format {
        None => EventFormat::default(),
        Some(v) => EventFormat::parse(v.get_ref()).ok_or_else(|| {
            src.at(
                v,
                "event_format",
                format!("`{}` is not an event format: expected {}", v.get_ref(), EventFormat::EXPECTED),
            )
        })?,
    };
    Ok(Config { path: path.to_path_buf(), rules: set, rule_lines, engine, fail, live, packet, warnings, event_format })
}

/// The settings of content inspection: holding undecided bytes, and overlapping segments.
fn inspection(src: &Source<'_>, raw: &RawConfig, engine: &mut EngineConfig) -> Result<(), ConfigError> {
    if let Some(v) = &raw.hold_timeout {
        let d = humantime::parse_duration(v.get_ref()).map_err(|e| {
            src.at(v, "hold_timeout", format!("`{}` is not a duration ({e}); write e.g. \"5s\"", v.get_ref()))
        })?;
        if d < Duration::from_millis(10) || d > Duration::from_secs(600) {
            return Err(src.at(v, "hold_timeout", "must be between 10ms and 10min"));
        }
        engine.hold_timeout = d;
    }
    if let Some(v) = &raw.hold_timeout_action {
        engine.hold_timeout_drop = match v.get_ref().trim() {
            "drop" => true,
            "allow" => false,
            other => return Err(src.at(v, "hold_timeout_action", format!("`{other}`: expected drop or allow"))),
        };
    }
    if let Some(v) = &raw.overlap_conflict {
        engine.overlap_drop = match v.get_ref().trim() {
            "drop" => true,
            "ignore" => false,
            other => return Err(src.at(v, "overlap_conflict", format!("`{other}`: expected drop or ignore"))),
        };
    }
    Ok(())
}

fn live(src: &Source<'_>, raw: &RawConfig) -> Result<Live, ConfigError> {
    let mut live = Live::default();
    let int = |v: &Spanned<i64>, field: &str, lo: i64, hi: i64| -> Result<i64, ConfigError> {
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) { Ok(n) } else { Err(src.at(v, field, format!("must be between {lo} and {hi}"))) }
    };
    if let Some(v) = &raw.queues {
        // The conntrack mark names a flow's owning queue in 5 bits.
        let most = flowgate_linux::marks::MAX_OWNERS as i64;
        live.queues = u16::try_from(int(v, "queues", 1, most)?).unwrap_or(1);
    }
    if let Some(v) = &raw.first_queue {
        live.first_queue = u16::try_from(int(v, "first_queue", 0, 65535)?).unwrap_or(0);
    }
    if u32::from(live.first_queue) + u32::from(live.queues) > 65536 {
        let span = raw.first_queue.as_ref().map(Spanned::span);
        return Err(src.error(span, Some("first_queue"), "queues would run past queue number 65535"));
    }
    if let Some(v) = &raw.queue_max_len {
        live.queue_max_len = u32::try_from(int(v, "queue_max_len", 16, 1 << 20)?).unwrap_or(4096);
    }
    live.loopback = raw.loopback.unwrap_or(false);
    live.kernel_rules = raw.kernel_rules.unwrap_or(true);
    if let Some(v) = &raw.event_buffer {
        live.event_buffer = usize::try_from(int(v, "event_buffer", 1, 1 << 24)?).unwrap_or(65_536);
    }
    if let Some(v) = &raw.attribution {
        live.attribution = match v.get_ref().trim() {
            "auto" => Attribution::Auto,
            "kernel" => Attribution::Kernel,
            "proc" => Attribution::Proc,
            "off" => Attribution::Off,
            other => {
                return Err(src.at(v, "attribution", format!("`{other}`: expected auto, kernel, proc or off")));
            }
        };
    }
    if let Some(v) = &raw.attribution_wait {
        let d = humantime::parse_duration(v.get_ref()).map_err(|e| {
            src.at(v, "attribution_wait", format!("`{}` is not a duration ({e}); write e.g. \"250ms\"", v.get_ref()))
        })?;
        if d.is_zero() || d > Duration::from_secs(10) {
            return Err(src.at(v, "attribution_wait", "must be more than zero and at most 10s"));
        }
        live.attribution_wait = d;
    }
    if let Some(v) = &raw.run_dir {
        if !Path::new(v.get_ref()).is_absolute() {
            return Err(src.at(v, "run_dir", "must be an absolute path"));
        }
        live.run_dir = PathBuf::from(v.get_ref());
    }
    if let Some(v) = &raw.control_group {
        if v.get_ref().trim().is_empty() {
            return Err(src.at(v, "control_group", "empty group name"));
        }
        live.control_group = Some(v.get_ref().trim().to_string());
    }
    if let Some(v) = &raw.metrics {
        live.metrics = Some(MetricsAddr::parse(v.get_ref()).map_err(|e| src.at(v, "metrics", e))?);
    }
    if let Some(v) = &raw.log {
        let socket = |p: &str| Some(PathBuf::from(p)).filter(|p| p.is_absolute());
        live.log = match v.get_ref().as_str() {
            "-" | "stdout" => LogTarget::Stdout,
            "syslog" => LogTarget::Syslog(PathBuf::from(SYSLOG_SOCKET)),
            "journald" => LogTarget::Journald(PathBuf::from(JOURNALD_SOCKET)),
            p if p.starts_with("syslog:") && socket(&p[7..]).is_some() => LogTarget::Syslog(PathBuf::from(&p[7..])),
            p if p.starts_with("journald:") && socket(&p[9..]).is_some() => LogTarget::Journald(PathBuf::from(&p[9..])),
            p if Path::new(p).is_absolute() => LogTarget::File(PathBuf::from(p)),
            _ => {
                return Err(src.at(
                    v,
                    "log",
                    "must be \"-\" (stdout), an absolute file path, \"syslog\", \"journald\", or \"syslog:/socket/path\" or \"journald:/socket/path\" with an absolute path",
                ));
            }
        };
    }
    Ok(live)
}

/// Parses a list of directions (`inbound`, `outbound`, `forwarded`; `any` for all three).
fn directions(src: &Source<'_>, v: &Spanned<toml::Value>, field: &str) -> Result<Directions, ConfigError> {
    let mut out = Directions::NONE;
    for text in strings(src, v, field)? {
        if text.trim() == "any" {
            out = Directions::ALL;
            continue;
        }
        let d = PacketDirection::parse(text).ok_or_else(|| {
            src.at(v, field, format!("`{text}` is not a direction: expected inbound, outbound, forwarded or any"))
        })?;
        out = out.with(d);
    }
    Ok(out)
}

fn packet_config(
    src: &Source<'_>,
    raw: &RawConfig,
    live: &Live,
    warnings: &mut Vec<Warning>,
) -> Result<PacketConfig, ConfigError> {
    let mut out = PacketConfig::default();
    let int = |v: &Spanned<i64>, field: &str, lo: i64, hi: i64| -> Result<i64, ConfigError> {
        let n = *v.get_ref();
        if (lo..=hi).contains(&n) { Ok(n) } else { Err(src.at(v, field, format!("must be between {lo} and {hi}"))) }
    };
    if let Some(pf) = &raw.packet_filter {
        let pf = pf.get_ref();
        match &pf.interfaces {
            None => {
                return Err(src.error(
                    None,
                    Some("packet_filter.interfaces"),
                    "[packet_filter] needs `interfaces`, e.g. [\"tun*\", \"wg*\"] (or [\"*\"] for every interface)",
                ));
            }
            Some(v) => {
                for text in strings(src, v, "packet_filter.interfaces")? {
                    let g = rules::parse_interface(text).map_err(|e| src.at(v, "packet_filter.interfaces", e.0))?;
                    out.filter_interfaces.push(g);
                }
            }
        }
        if let Some(v) = &pf.directions {
            out.filter_directions = directions(src, v, "packet_filter.directions")?;
        }
        if let Some(v) = &pf.queues {
            out.queues = u16::try_from(int(v, "packet_filter.queues", 1, 64)?).unwrap_or(1);
        }
        if let Some(v) = &pf.max_delayed {
            out.max_delayed = usize::try_from(int(v, "packet_filter.max_delayed", 1, 1 << 20)?).unwrap_or(4096);
        }
        if let Some(v) = &pf.max_delay {
            let d = humantime::parse_duration(v.get_ref()).map_err(|e| {
                src.at(
                    v,
                    "packet_filter.max_delay",
                    format!("`{}` is not a duration ({e}); write e.g. \"500ms\", \"10s\"", v.get_ref()),
                )
            })?;
            if d.is_zero() || d > Duration::from_secs(3600) {
                return Err(src.at(v, "packet_filter.max_delay", "must be more than zero and at most an hour"));
            }
            out.max_delay = d;
        }
        if let Some(v) = &pf.on_delay_timeout {
            out.expired_accept = match v.get_ref().as_str() {
                "drop" => false,
                "allow" => true,
                other => {
                    return Err(src.at(v, "packet_filter.on_delay_timeout", format!("`{other}` is not drop or allow")));
                }
            };
        }
    }
    let end = u32::from(live.first_queue) + u32::from(live.queues) + u32::from(out.queues);
    if end > 65536 {
        return Err(src.error(None, Some("packet_filter.queues"), format!("the packet stage's queues come after the flow queues and would run past queue number 65535 (first_queue {} + queues {} + {})", live.first_queue, live.queues, out.queues)));
    }
    let mut names = std::collections::HashMap::new();
    for (i, r) in raw.packet_rules.iter().enumerate() {
        let line = src.line(&r.span());
        let rule = packet_rule(src, i, r.get_ref(), line)?;
        if let Some(first) = names.insert(rule.name.clone(), line) {
            let span = r.get_ref().name.as_ref().map(Spanned::span);
            return Err(src.error(
                span,
                Some("name"),
                format!("packet rule name `{}` is already used by the packet rule at line {first}", rule.name),
            ));
        }
        if rule.interface.is_none() {
            warnings.push(Warning {
                path: src.path.to_path_buf(),
                line,
                message: format!("packet rule `{}` names no interface: every packet of every interface (but loopback) then goes through the packet stage in user space, which costs the kernel fast path", rule.name),
            });
        }
        out.rules.rules.push(rule);
    }
    Ok(out)
}

fn packet_rule(src: &Source<'_>, index: usize, r: &RawPacketRule, line: usize) -> Result<PacketRule, ConfigError> {
    let name = match &r.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(src.at(n, "name", "a packet rule name cannot be empty"));
        }
        Some(n) => n.get_ref().trim().to_string(),
        None => format!("packet-rule-{}", index + 1),
    };
    let action = match &r.action {
        None => {
            let mut e =
                src.error(None, Some("action"), format!("packet rule `{name}` has no `action` (allow or drop)"));
            e.line = Some(line);
            return Err(e);
        }
        Some(v) => match v.get_ref().trim() {
            "allow" => PacketRuleAction::Allow,
            "drop" => PacketRuleAction::Drop,
            other => {
                return Err(src.at(
                    v,
                    "action",
                    format!("`{other}` is not a packet rule action: expected allow or drop"),
                ));
            }
        },
    };
    let mut rule = PacketRule::new(name, action);
    if let Some(v) = &r.interface {
        rule.interface = Some(rules::parse_interface(v.get_ref()).map_err(|e| src.at(v, "interface", e.0))?);
    }
    if let Some(v) = &r.direction {
        rule.directions = directions(src, v, "direction")?;
    }
    if let Some(v) = &r.protocol {
        rule.protocol = rules::parse_protocol(v.get_ref()).map_err(|e| src.at(v, "protocol", e.0))?;
    }
    for (field, raw, out) in [("remote", &r.remote, &mut rule.remote), ("local", &r.local, &mut rule.local)] {
        if let Some(v) = raw {
            for text in strings(src, v, field)? {
                out.push(rules::parse_network(text).map_err(|e| src.at(v, field, e.0))?);
            }
        }
    }
    Ok(rule)
}

fn timeouts(src: &Source<'_>, t: &RawTimeouts) -> Result<Timeouts, ConfigError> {
    let mut out = Timeouts::default();
    let fields = [
        ("tcp", &t.tcp, &mut out.tcp),
        ("tcp_closing", &t.tcp_closing, &mut out.tcp_closing),
        ("udp", &t.udp, &mut out.udp),
        ("icmp", &t.icmp, &mut out.icmp),
        ("other", &t.other, &mut out.other),
    ];
    for (name, raw, slot) in fields {
        if let Some(v) = raw {
            let d: Duration = humantime::parse_duration(v.get_ref()).map_err(|e| {
                src.at(
                    v,
                    &format!("timeouts.{name}"),
                    format!("`{}` is not a duration ({e}); write e.g. \"30s\", \"5m\", \"2h\"", v.get_ref()),
                )
            })?;
            if d.is_zero() {
                return Err(src.at(v, &format!("timeouts.{name}"), "a timeout of zero would close every flow at once"));
            }
            *slot = d;
        }
    }
    Ok(out)
}

fn strings<'v>(src: &Source<'_>, v: &'v Spanned<toml::Value>, field: &str) -> Result<Vec<&'v str>, ConfigError> {
    match v.get_ref() {
        toml::Value::String(s) => Ok(vec![s.as_str()]),
        toml::Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| i.as_str().ok_or_else(|| src.at(v, field, "expected a string or a list of strings")))
            .collect(),
        toml::Value::Array(_) => Err(src.at(v, field, "empty list: leave the field out to match anything")),
        _ => Err(src.at(v, field, "expected a string or a list of strings")),
    }
}

fn ports(src: &Source<'_>, v: &Spanned<toml::Value>, field: &str) -> Result<rules::PortSet, ConfigError> {
    let text = match v.get_ref() {
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::String(s) => s.clone(),
        _ => {
            return Err(src.at(v, field, "expected ports as a string like \"80,443,8000-8080\" or a number"));
        }
    };
    rules::parse_ports(&text).map_err(|e| src.at(v, field, e.0))
}

fn rule(src: &Source<'_>, index: usize, r: &RawRule, warnings: &mut Vec<Warning>) -> Result<Rule, ConfigError> {
    let name = match &r.name {
        Some(n) if n.get_ref().trim().is_empty() => return Err(src.at(n, "name", "a rule name cannot be empty")),
        Some(n) => n.get_ref().trim().to_string(),
        None => format!("rule-{}", index + 1),
    };
    let Some(action_text) = &r.action else {
        return Err(src.error(None, Some("action"), format!("rule `{name}` has no `action` (allow, drop or inspect)")))
            .map_err(|mut e| {
                e.line = r.name.as_ref().map(|n| src.line(&n.span()));
                e
            });
    };
    let (peek_out, peek_in) = match &r.peek {
        Some(p) => (p.get_ref().outbound.unwrap_or(0), p.get_ref().inbound.unwrap_or(0)),
        None => (0, 0),
    };
    let action = rules::parse_action(action_text.get_ref(), peek_out, peek_in)
        .map_err(|e| src.at(action_text, "action", e.0))?;
    match (&action, &r.peek) {
        (Action::Inspect { .. }, None) => {
            return Err(src.at(action_text, "peek", "an inspect rule needs `peek = { outbound = N, inbound = N }`"));
        }
        (Action::Inspect { peek_outbound: 0, peek_inbound: 0 }, Some(p)) => {
            return Err(src.at(p, "peek", "an inspect rule must peek at least one byte in some direction"));
        }
        (Action::Allow | Action::Drop, Some(p)) => {
            return Err(src.at(p, "peek", "`peek` only goes with action = \"inspect\""));
        }
        _ => {}
    }
    let silent = match (&r.silent, &action) {
        (None, _) => false,
        (Some(v), Action::Drop) => *v.get_ref(),
        (Some(v), _) => return Err(src.at(v, "silent", "`silent` only goes with action = \"drop\"")),
    };
    let mut rule = Rule::new(name, action);
    rule.silent = silent;
    for (field, raw, out) in [("remote", &r.remote, &mut rule.remote), ("local", &r.local, &mut rule.local)] {
        if let Some(v) = raw {
            for text in strings(src, v, field)? {
                let net: IpNet = rules::parse_network(text).map_err(|e| src.at(v, field, e.0))?;
                if rules::has_host_bits(text) {
                    warnings.push(Warning {
                        path: src.path.to_path_buf(),
                        line: src.line(&v.span()),
                        message: format!("{field} = \"{text}\" has host bits set below the prefix: it means {net}; for one host write /{}", if net.addr().is_ipv4() { 32 } else { 128 }),
                    });
                }
                out.push(net);
            }
        }
    }
    if let Some(v) = &r.remote_ports {
        rule.remote_ports = Some(ports(src, v, "remote_ports")?);
    }
    if let Some(v) = &r.local_ports {
        rule.local_ports = Some(ports(src, v, "local_ports")?);
    }
    if let Some(v) = &r.protocol {
        rule.protocol = rules::parse_protocol(v.get_ref()).map_err(|e| src.at(v, "protocol", e.0))?;
    }
    if let Some(v) = &r.direction {
        rule.direction = rules::parse_direction(v.get_ref()).map_err(|e| src.at(v, "direction", e.0))?;
    }
    if let Some(v) = &r.interface {
        rule.interface = Some(rules::parse_interface(v.get_ref()).map_err(|e| src.at(v, "interface", e.0))?);
    }
    for (field, raw, out) in [
        ("process", &r.process, &mut rule.owner.process),
        ("unit", &r.unit, &mut rule.owner.unit),
        ("cgroup", &r.cgroup, &mut rule.owner.cgroup),
    ] {
        if let Some(v) = raw {
            *out = Some(Glob::new(v.get_ref()).map_err(|e| src.at(v, field, e.0))?);
        }
    }
    if let Some(v) = &r.process
        && !v.get_ref().trim().starts_with(['/', '*'])
    {
        return Err(src.at(v, "process", "give the executable's path (a glob like \"/usr/bin/curl\" or \"*/curl\")"));
    }
    if let Some(v) = &r.user {
        let text = match v.get_ref() {
            toml::Value::String(t) => t.clone(),
            toml::Value::Integer(n) if u32::try_from(*n).is_ok() => n.to_string(),
            _ => return Err(src.at(v, "user", "give a user name or a uid, e.g. \"www-data\" or 33")),
        };
        rule.owner.user = Some(UserMatch::parse(&text).map_err(|e| src.at(v, "user", e.0))?);
    }
    let mut patterns = Vec::new();
    if let Some(v) = &r.host {
        let texts: Vec<&str> = match v.get_ref() {
            toml::Value::String(t) => vec![t.as_str()],
            toml::Value::Array(a) if !a.is_empty() => {
                a.iter().map(|x| x.as_str()).collect::<Option<Vec<_>>>().ok_or_else(|| {
                    src.at(v, "host", "give host names as strings, e.g. [\"example.com\", \"*.example.org\"]")
                })?
            }
            _ => return Err(src.at(v, "host", "give a host name or a list of them, e.g. \"*.example.com\"")),
        };
        for t in texts {
            patterns.push(HostPattern::parse(t).map_err(|e| src.at(v, "host", e.to_string()))?);
        }
    }
    let mut lists = Vec::new();
    if let Some(v) = &r.hosts_file {
        lists.push(hosts_list(src, v, "hosts_file", warnings)?);
    }
    rule.host = rules::HostMatch::new(&patterns, lists);
    Ok(rule)
}

/// Reads a hosts list a config names (relative paths from the config's directory).
fn hosts_list(
    src: &Source<'_>,
    v: &Spanned<String>,
    field: &str,
    warnings: &mut Vec<Warning>,
) -> Result<(String, std::sync::Arc<HostSet>), ConfigError> {
    let given = Path::new(v.get_ref().trim());
    if given.as_os_str().is_empty() {
        return Err(src.at(v, field, "give the path of a hosts file or a list of domains"));
    }
    let path = match src.path.parent() {
        Some(dir) if given.is_relative() => dir.join(given),
        _ => given.to_path_buf(),
    };
    let text = std::fs::read(&path).map_err(|e| src.at(v, field, format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&text);
    let mut set = HostSet::new();
    let report = parse_hosts_file(&text, &mut set).map_err(|e| src.at(v, field, format!("{}: {e}", path.display())))?;
    if set.is_empty() {
        warnings.push(Warning {
            path: src.path.to_path_buf(),
            line: src.line(&v.span()),
            message: format!("{field} {} holds no host names", path.display()),
        });
    }
    if report.bad > 0 {
        // Third-party lists of a million lines carry some junk: it is skipped, said, not fatal.
        let first: Vec<String> = report.first_bad.iter().map(ToString::to_string).collect();
        warnings.push(Warning {
            path: src.path.to_path_buf(),
            line: src.line(&v.span()),
            message: format!(
                "{field} {}: {} entries are not host names and were skipped ({})",
                path.display(),
                report.bad,
                first.join("; ")
            ),
        });
    }
    Ok((path.display().to_string(), std::sync::Arc::new(set)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("test.toml"), text)
    }

    fn err(text: &str) -> ConfigError {
        match load_str(text) {
            Ok(_) => panic!("config should be rejected:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn log_targets_and_event_formats() {
        let c = load_str("").expect("empty config");
        assert_eq!((c.live.log.clone(), c.event_format), (LogTarget::Stdout, EventFormat::Flowgate));
        for (text, want) in [
            ("-", LogTarget::Stdout),
            ("/var/log/flowgate.jsonl", LogTarget::File("/var/log/flowgate.jsonl".into())),
            ("syslog", LogTarget::Syslog(SYSLOG_SOCKET.into())),
            ("syslog:/tmp/x/log.sock", LogTarget::Syslog("/tmp/x/log.sock".into())),
            ("journald", LogTarget::Journald(JOURNALD_SOCKET.into())),
            ("journald:/tmp/j.sock", LogTarget::Journald("/tmp/j.sock".into())),
        ] {
            let c = load_str(&format!("log = \"{text}\"")).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.live.log, want, "{text}");
        }
        for bad in ["events.jsonl", "syslog:", "syslog:relative.sock", "journald:x", "udp://192.0.2.1"] {
            let e = err(&format!("\nlog = \"{bad}\""));
            assert_eq!((e.line, e.field.as_deref()), (Some(2), Some("log")), "{bad}: {e}");
        }
        for (name, want) in
            [("flowgate", EventFormat::Flowgate), ("eve", EventFormat::Eve), ("ocsf", EventFormat::Ocsf)]
        {
            assert_eq!(load_str(&format!("event_format = \"{name}\"")).expect(name).event_format, want);
        }
        let e = err("event_format = \"cef\"");
        assert_eq!(e.field.as_deref(), Some("event_format"));
        assert!(e.message.contains("flowgate, eve or ocsf"), "{e}");
    }

    #[test]
    fn full_example_loads() {
        let c = load_str(
            r#"
default_action = "allow"
fail = "open"
local_addresses = ["198.51.100.1", "2001:db8:1::/64"]
max_flows = 1000

[timeouts]
udp = "30s"

[[rule]]
name = "block-one-host"
remote = "203.0.113.7/32"
remote_ports = "80,443,8000-8080"
local = "198.51.100.0/24"
local_ports = "1024-65535"
protocol = "tcp"
direction = "outbound"
interface = "tun*"
action = "drop"

[[rule]]
name = "peek-web"
remote_ports = 443
action = "inspect"
peek = { outbound = 2048, inbound = 0 }
"#,
        )
        .expect("valid config");
        assert_eq!(c.rules.rules.len(), 2);
        assert_eq!(c.rule_lines, vec![10, 21]);
        assert_eq!(c.rules.rules[1].action, Action::Inspect { peek_outbound: 2048, peek_inbound: 0 });
        assert_eq!(c.engine.local_networks.len(), 2);
        assert_eq!(c.engine.max_flows, 1000);
        assert_eq!(c.engine.timeouts.udp, Duration::from_secs(30));
        assert_eq!(c.fail, FailMode::Open);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err("[[rule]]\nname = \"x\"\nremote = \"203.0.113.300\"\naction = \"drop\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("remote")));
        let shown = e.to_string();
        assert!(shown.starts_with("test.toml:3:"), "{shown}");
        assert!(shown.contains("203.0.113.300"), "{shown}");

        let e = err("[[rule]]\nname = \"x\"\nremote_ports = \"80-\"\naction = \"drop\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("remote_ports")));

        let e = err("[[rule]]\nname = \"x\"\naction = \"reject\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("action")));

        let e = err("default_action = \"inspect\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("default_action")));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = err("[[rule]]\nname = \"x\"\nremote_port = \"80\"\naction = \"drop\"\n");
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("remote_port"), "{e}");
        let e = err("defualt_action = \"drop\"\n");
        assert!(e.message.contains("defualt_action"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err("[[rule]]\nname = \"x\"\nprotocol = 6\naction = \"drop\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("protocol")));
    }

    #[test]
    fn rule_shape_errors() {
        assert_eq!(err("[[rule]]\nname = \"x\"\n").field.as_deref(), Some("action"));
        assert_eq!(err("[[rule]]\naction = \"inspect\"\n").field.as_deref(), Some("peek"));
        assert_eq!(err("[[rule]]\naction = \"drop\"\npeek = { outbound = 1 }\n").field.as_deref(), Some("peek"));
        let dup = err("[[rule]]\nname = \"a\"\naction = \"drop\"\n[[rule]]\nname = \"a\"\naction = \"allow\"\n");
        assert_eq!((dup.line, dup.field.as_deref()), (Some(5), Some("name")));
        assert_eq!(err("[timeouts]\nudp = \"soon\"\n").field.as_deref(), Some("timeouts.udp"));
        assert_eq!(err("local_addresses = [\"not-an-ip\"]\n").field.as_deref(), Some("local_addresses"));
        assert_eq!(err("[[rule]]\nremote = []\naction = \"drop\"\n").field.as_deref(), Some("remote"));
    }

    #[test]
    fn warnings_carry_the_rule_line() {
        let c = load_str(
            "[[rule]]\nname = \"zero\"\nremote = \"203.0.113.7/0\"\naction = \"drop\"\n\n[[rule]]\nname = \"later\"\nremote = \"203.0.113.7\"\naction = \"allow\"\n",
        )
        .expect("loads with warnings");
        let lines: Vec<usize> = c.warnings.iter().map(|w| w.line).collect();
        // /0 (rule line 1), host bits (field line 3), and `later` shadowed by `zero` (line 6).
        assert_eq!(lines, vec![1, 3, 6], "{:?}", c.warnings);
        assert!(c.warnings[0].message.contains("matches every IPv4 address"));
        assert!(c.warnings[2].message.contains("can never match"));
        assert!(c.warnings[2].to_string().starts_with("test.toml:6: warning:"));
    }

    #[test]
    fn defaults_without_rules() {
        let c = load_str("").expect("empty config is valid");
        assert_eq!(c.rules.default_action, Action::Allow);
        assert!(c.rules.rules.is_empty());
    }

    #[test]
    fn metrics_is_off_by_default_and_takes_an_address_or_an_absolute_path() {
        assert_eq!(load_str("").expect("empty").live.metrics, None);
        let c = load_str("metrics = \"127.0.0.1:9464\"\n").expect("tcp");
        assert_eq!(c.live.metrics, Some(MetricsAddr::Tcp("127.0.0.1:9464".parse().expect("addr"))));
        let c = load_str("metrics = \"[::1]:9464\"\n").expect("tcp6");
        assert_eq!(c.live.metrics, Some(MetricsAddr::Tcp("[::1]:9464".parse().expect("addr"))));
        let c = load_str("metrics = \"/run/flowgate/metrics.sock\"\n").expect("unix");
        assert_eq!(c.live.metrics, Some(MetricsAddr::Unix(PathBuf::from("/run/flowgate/metrics.sock"))));
        for bad in ["localhost:9464", "127.0.0.1", "9464", "metrics.sock", "127.0.0.1:0", "/run/flowgate/", ""] {
            let e = err(&format!("default_action = \"allow\"\nmetrics = \"{bad}\"\n"));
            assert_eq!((e.line, e.field.as_deref()), (Some(2), Some("metrics")), "{bad}: {e}");
            assert!(e.to_string().starts_with("test.toml:2:"), "{e}");
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(err(&format!("metrics = \"{long}\"\n")).message.contains("at most 107 bytes"));
        let e = err("metrics = 9464\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("metrics")), "{e}");
    }

    #[test]
    fn packet_filter_and_packet_rules_load_in_order_with_their_coverage() {
        let c = load_str(
            r#"
queues = 2

[packet_filter]
interfaces = ["tun*", "wg0"]
directions = ["inbound", "outbound"]
queues = 3
max_delayed = 100
max_delay = "2s"
on_delay_timeout = "allow"

[[packet_rule]]
name = "allow-dns-in-tunnel"
interface = "tun*"
direction = "outbound"
protocol = "udp"
remote = ["192.0.2.53", "2001:db8::53"]
action = "allow"

[[packet_rule]]
name = "cut-wg"
interface = "wg*"
direction = "any"
action = "drop"
"#,
        )
        .expect("valid config");
        let p = &c.packet;
        assert_eq!(p.queues, 3);
        assert_eq!((p.max_delayed, p.max_delay, p.expired_accept), (100, Duration::from_secs(2), true));
        assert!(p.filter_directions.contains(PacketDirection::Inbound));
        assert!(!p.filter_directions.contains(PacketDirection::Forwarded));
        let names: Vec<&str> = p.rules.rules.iter().map(|r| &*r.name).collect();
        assert_eq!(names, ["allow-dns-in-tunnel", "cut-wg"]);
        assert_eq!(p.rules.rules[0].remote.len(), 2);
        assert_eq!(p.rules.rules[0].action, PacketRuleAction::Allow);
        assert_eq!(p.rules.rules[1].directions, Directions::ALL);
        // Coverage: the filter's interfaces in its directions, and each rule's interface in the
        // rule's directions, merged per glob.
        let covered = p.covered();
        let get = |g: &str| covered.iter().find(|(x, _)| x.as_deref() == Some(g)).map(|(_, d)| *d);
        assert_eq!(get("tun*"), Some(Directions::NONE.with(PacketDirection::Inbound).with(PacketDirection::Outbound)));
        assert_eq!(get("wg0"), Some(Directions::NONE.with(PacketDirection::Inbound).with(PacketDirection::Outbound)));
        assert_eq!(get("wg*"), Some(Directions::ALL));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        // Without either, the packet stage covers nothing.
        assert!(load_str("").expect("empty").packet.covered().is_empty());
    }

    #[test]
    fn packet_config_errors_name_the_field() {
        let e = err("[packet_filter]\ndirections = [\"inbound\"]\n");
        assert_eq!(e.field.as_deref(), Some("packet_filter.interfaces"));
        let e = err("[packet_filter]\ninterfaces = [\"tun*\"]\ndirections = [\"sideways\"]\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("packet_filter.directions")));
        let e = err("[packet_filter]\ninterfaces = [\"tun*\"]\nmax_delay = \"soon\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(3), Some("packet_filter.max_delay")));
        let e = err("[packet_filter]\ninterfaces = [\"tun*\"]\nqueue = 2\n");
        assert!(e.message.contains("queue"), "{e}");
        let e = err("[[packet_rule]]\nname = \"x\"\ninterface = \"tun0\"\naction = \"inspect\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(4), Some("action")));
        let e = err("[[packet_rule]]\nname = \"x\"\ninterface = \"tun0\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(1), Some("action")));
        let e =
            err("[[packet_rule]]\nname = \"x\"\ninterface = \"tun0\"\nremote = \"192.0.2.300\"\naction = \"drop\"\n");
        assert_eq!((e.line, e.field.as_deref()), (Some(4), Some("remote")));
        let e = err(
            "[[packet_rule]]\nname = \"x\"\ninterface = \"a\"\naction = \"drop\"\n[[packet_rule]]\nname = \"x\"\ninterface = \"b\"\naction = \"drop\"\n",
        );
        assert!(e.message.contains("already used"), "{e}");
        let e = err("first_queue = 65534\nqueues = 1\n[packet_filter]\ninterfaces = [\"tun*\"]\nqueues = 4\n");
        assert_eq!(e.field.as_deref(), Some("packet_filter.queues"));
    }

    #[test]
    fn a_packet_rule_without_an_interface_is_warned_about() {
        let c = load_str("[[packet_rule]]\nname = \"all\"\nprotocol = \"udp\"\naction = \"drop\"\n").expect("valid");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].message.contains("every packet of every interface"), "{}", c.warnings[0]);
        assert_eq!(c.packet.covered(), [(None, Directions::ALL)]);
    }

    #[test]
    fn owner_fields_and_attribution_load_and_bad_ones_name_the_field() {
        let c = load_str(
            "attribution = \"proc\"\nattribution_wait = \"40ms\"\n[[rule]]\nname = \"a\"\nprocess = \"/usr/bin/curl\"\n\
             user = 33\nunit = \"nginx.*\"\ncgroup = \"/system.slice/*\"\naction = \"drop\"\n\
             [[rule]]\nname = \"b\"\nuser = \"www-data\"\naction = \"allow\"\n",
        )
        .expect("owner rules");
        assert_eq!((c.live.attribution, c.live.attribution_wait), (Attribution::Proc, Duration::from_millis(40)));
        let o = &c.rules.rules[0].owner;
        assert_eq!(o.process.as_ref().map(Glob::as_str), Some("/usr/bin/curl"));
        assert_eq!(o.user, Some(UserMatch::Uid(33)));
        assert_eq!(o.unit.as_ref().map(Glob::as_str), Some("nginx.*"));
        assert_eq!(o.cgroup.as_ref().map(Glob::as_str), Some("/system.slice/*"));
        assert_eq!(c.rules.rules[1].owner.user, Some(UserMatch::Name("www-data".into())));
        let d = load_str("").expect("defaults");
        assert_eq!((d.live.attribution, d.live.attribution_wait), (Attribution::Auto, Duration::from_millis(250)));
        for (text, field, line) in [
            ("\n[[rule]]\nprocess = \"curl\"\naction = \"drop\"\n", "process", 3),
            ("\n[[rule]]\nprocess = \"\"\naction = \"drop\"\n", "process", 3),
            ("\n[[rule]]\nuser = \"a:b\"\naction = \"drop\"\n", "user", 3),
            ("\n[[rule]]\nuser = -1\naction = \"drop\"\n", "user", 3),
            ("\n[[rule]]\nunit = \" \"\naction = \"drop\"\n", "unit", 3),
            ("\nattribution = \"bpf\"\n", "attribution", 2),
            ("\nattribution_wait = \"soon\"\n", "attribution_wait", 2),
            ("\nattribution_wait = \"11s\"\n", "attribution_wait", 2),
        ] {
            let e = err(text);
            assert_eq!((e.field.as_deref(), e.line), (Some(field), Some(line)), "{text}: {e}");
        }
        // A rule naming an owner cannot be honoured without attribution: refused, not ignored.
        let e = err("attribution = \"off\"\n[[rule]]\nname = \"x\"\nuser = \"nobody\"\naction = \"drop\"\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("attribution = \"off\""), "{e}");
    }

    #[test]
    fn host_rules_take_names_lists_and_the_inspection_settings() {
        let dir = std::env::temp_dir().join(format!("flowgate-config-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("block.txt"),
            "# ads\n0.0.0.0 ads.example tracker.example\nevil.example\nnot_a name!\n",
        )
        .expect("list");
        let config = dir.join("flowgate.toml");
        let text = "hosts_file = \"block.txt\"\nhold_timeout = \"3s\"\nhold_timeout_action = \"allow\"\n\
                    overlap_conflict = \"ignore\"\n[[rule]]\nname = \"one\"\nhost = \"*.example.com\"\naction = \"drop\"\n\
                    [[rule]]\nname = \"two\"\nhost = [\"a.example\", \"B.Example.\"]\naction = \"allow\"\n";
        let c = parse(&config, text).expect("valid config");
        let names: Vec<&str> = c.rules.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["hosts_file", "one", "two"], "the blocklist comes first");
        assert_eq!(c.rule_lines, vec![1, 5, 9]);
        let list = &c.rules.rules[0].host;
        assert!(list.matches("ads.example") && list.matches("tracker.example") && list.matches("evil.example"));
        assert!(list.matches("www.evil.example"), "a one-domain line covers the names below it");
        assert!(!list.matches("other.example"));
        assert!(c.rules.rules[1].host.matches("example.com") && c.rules.rules[1].host.matches("a.b.example.com"));
        assert!(!c.rules.rules[1].host.matches("notexample.com"));
        assert!(c.rules.rules[2].host.matches("b.example") && !c.rules.rules[2].host.matches("x.a.example"));
        assert_eq!(c.engine.hold_timeout, Duration::from_secs(3));
        assert!(!c.engine.hold_timeout_drop && !c.engine.overlap_drop);
        assert!(c.warnings.iter().any(|w| w.line == 1 && w.message.contains("line 4")), "{:?}", c.warnings);
        let _ = std::fs::remove_dir_all(&dir);
        for (text, field, line) in [
            ("[[rule]]\naction = \"drop\"\nhost = \"exa mple.com\"\n", "host", 3),
            ("[[rule]]\naction = \"drop\"\nhost = \"\"\n", "host", 3),
            ("[[rule]]\naction = \"drop\"\nhost = []\n", "host", 3),
            ("[[rule]]\naction = \"drop\"\nhost = [1]\n", "host", 3),
            ("[[rule]]\naction = \"drop\"\nhosts_file = \"/nonexistent/flowgate-list\"\n", "hosts_file", 3),
            ("hosts_file = \"/nonexistent/flowgate-list\"\n", "hosts_file", 1),
            ("hold_timeout = \"soon\"\n", "hold_timeout", 1),
            ("hold_timeout = \"1ms\"\n", "hold_timeout", 1),
            ("hold_timeout_action = \"pause\"\n", "hold_timeout_action", 1),
            ("overlap_conflict = \"first\"\n", "overlap_conflict", 1),
        ] {
            let e = err(text);
            assert_eq!((e.field.as_deref(), e.line), (Some(field), Some(line)), "{text}: {e}");
        }
    }
}
