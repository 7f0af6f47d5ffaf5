//! The command line: argument parsing and one function per subcommand.
//!
//! `main → run → ExitCode`. Arguments are parsed and the config validated before anything else
//! happens; every failure prints one message naming what was wrong and where, and exits
//! non-zero. Subcommands: `run` (the daemon); `flows`, `block`, `allow`, `reload` (talk to a
//! running daemon over its control socket); `cleanup` (after a killed daemon); `rules check`;
//! `replay`; `check` (what this host's kernel offers, before anything is installed: `check.rs`).

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::{Engine, EngineConfig};
use serde_json::json;

use crate::config::{self, Config};
use crate::protocol::{Command as Ask, Request, Select};
use crate::replay;

/// What `flowgate --version` says after the name: the crate's version, the git commit the binary
/// was built from ("unknown" when built outside a git checkout) and the target it was built for
/// (see `build.rs`).
pub const VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FLOWGATE_COMMIT"), ", ", env!("FLOWGATE_TARGET"), ")");

#[derive(Parser, Debug)]
#[command(name = "flowgate", version = VERSION, about = "A network content filter: judges every flow of a host", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// The most verbose daemon diagnostics shown on stderr (not flow events): off, error, warn,
    /// info, debug or trace. Under systemd each line carries its journal priority.
    #[arg(long, global = true, value_name = "LEVEL", default_value = "info", value_parser = crate::diag::parse_level)]
    pub log_level: log::LevelFilter,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the filter on this host (as root, in the foreground): installs flowgate's netfilter
    /// chains, judges every flow, logs flow events as JSON lines, removes the chains on
    /// SIGINT/SIGTERM. Without --config: allow everything, fail open (a safe default that only
    /// watches).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// List the live flows of the running daemon, whatever their age, with current counters
    /// (also for flows the kernel handles). Filters are applied by the daemon; the list streams.
    Flows {
        #[command(flatten)]
        filter: FlowFilterArgs,
        #[command(flatten)]
        target: DaemonTarget,
        /// One JSON object per flow, one per line.
        #[arg(long)]
        json: bool,
        /// Sync with conntrack first, so the counters of flows the kernel handles are current
        /// (otherwise they are as of the daemon's last periodic sync; at a million flows a sync
        /// takes a few seconds).
        #[arg(long)]
        fresh: bool,
    },
    /// The running daemon's counters: per queue worker and in total (packets, flows, what was
    /// dropped or deferred and why), conntrack reports and syncs, events written, and the packet
    /// stage's counters per packet queue, per interface and direction, and per packet rule.
    Stats {
        #[command(flatten)]
        target: DaemonTarget,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop live flows now, also ones allowed long ago and handled in the kernel since: a local
    /// application's socket gets an error at once, a TCP peer a reset, and no further packet of
    /// the flow passes either way. Name flows by id, or by --remote, --port, --protocol,
    /// --process (every live flow of that program) and/or --user (of that user).
    Block {
        #[command(flatten)]
        select: FlowSelect,
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Let live flows continue: held (paused) or inspected ones pass, blocked ones are allowed
    /// again (a TCP connection already reset stays gone).
    Allow {
        #[command(flatten)]
        select: FlowSelect,
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Apply the daemon's config file again (like SIGHUP): new flows follow the new rules, and
    /// every live flow the new rules drop is torn down; the others are untouched. Packet rules
    /// and the packet stage's interfaces apply to every packet from then on.
    Reload {
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Remove what a killed daemon left behind (netfilter chains, control socket).
    Cleanup {
        #[command(flatten)]
        target: DaemonTarget,
    },
    /// Tell which kernel features this host has and what each missing one costs, before
    /// anything is installed (probes run in a private network namespace; the host is left as it
    /// was). Exit status 0 when `flowgate run` can filter, 1 when it cannot, 2 on usage errors.
    Check {
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// The config `flowgate run` would use (for its run_dir).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Work with rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Run the engine over a pcap or pcapng capture and print the events it would have logged
    /// (one JSON object per line). Needs no privileges.
    Replay {
        /// The capture file (pcap or pcapng; Ethernet, Linux cooked or raw IP frames).
        capture: PathBuf,
        /// Config with the rules to apply; without it every flow is allowed.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the replay's summary as JSON on stderr instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

/// Which live flows a command is about, besides ids.
#[derive(clap::Args, Debug, Default)]
pub struct FlowFilterArgs {
    /// Flows whose remote address is in this network (CIDR; a bare address is one host).
    #[arg(long)]
    pub remote: Option<String>,
    /// Flows with this remote port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Flows of this protocol (tcp, udp, icmp, any).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Flows of this program: a glob on its executable's path (`/usr/bin/curl`, `*/python3*`).
    #[arg(long, value_name = "PATH")]
    pub process: Option<String>,
    /// Flows of this user, by name or uid.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
}

impl FlowFilterArgs {
    fn is_empty(&self) -> bool {
        self.remote.is_none()
            && self.port.is_none()
            && self.protocol.is_none()
            && self.process.is_none()
            && self.user.is_none()
    }
}

/// Which live flows a command is about.
#[derive(clap::Args, Debug)]
pub struct FlowSelect {
    /// Flow ids (from `flowgate flows` or the event log).
    pub ids: Vec<u64>,
    #[command(flatten)]
    pub filter: FlowFilterArgs,
    /// Print the reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which daemon to talk to: by its config (its `run_dir`) or by `run_dir` directly.
#[derive(clap::Args, Debug)]
pub struct DaemonTarget {
    /// The daemon's config file (to find its run_dir).
    #[arg(long, short, conflicts_with = "run_dir")]
    pub config: Option<PathBuf>,
    /// The daemon's run_dir (default /run/flowgate).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

impl DaemonTarget {
    fn run_dir(&self) -> Result<PathBuf, String> {
        match (&self.config, &self.run_dir) {
            (Some(c), _) => config::load(c).map(|c| c.live.run_dir).map_err(|e| e.to_string()),
            (None, Some(d)) => Ok(d.clone()),
            (None, None) => Ok(config::Live::default().run_dir),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Validate and lint a config file: errors name file, line and field; warnings flag rules
    /// that match every address or can never match; it also says which rules `flowgate run` would
    /// decide in the kernel and why the others are judged in user space.
    Check {
        file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Treat warnings as errors (exit status 1).
        #[arg(long)]
        strict: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    run(Cli::parse())
}

pub fn run(cli: Cli) -> ExitCode {
    crate::diag::init(cli.log_level);
    match cli.command {
        Command::Rules { command: RulesCommand::Check { file, json, strict } } => rules_check(&file, json, strict),
        Command::Replay { capture, config, json } => replay_cmd(&capture, config.as_deref(), json),
        Command::Run { config } => run_cmd(config.as_deref()),
        Command::Flows { filter, target, json, fresh } => flows_cmd(&filter, &target, json, fresh),
        Command::Stats { target, json } => stats_cmd(&target, json),
        Command::Cleanup { target } => cleanup_cmd(&target),
        Command::Block { select, target } => verdict_cmd("block", &select, &target),
        Command::Allow { select, target } => verdict_cmd("allow", &select, &target),
        Command::Reload { target } => reload_cmd(&target),
        Command::Check { json, config } => crate::check::command(config.as_deref(), json),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::FAILURE
}

fn run_cmd(path: Option<&Path>) -> ExitCode {
    let config = match path {
        Some(p) => match config::load(p) {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
        None => match config::parse(Path::new("<built-in default>"), "") {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
    };
    for w in &config.warnings {
        log::warn!("{w}");
    }
    match crate::daemon::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn flows_cmd(filter: &FlowFilterArgs, target: &DaemonTarget, json: bool, fresh: bool) -> ExitCode {
    let run_dir = match target.run_dir() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let req = Request::new(Ask::Flows(Select {
        remote: filter.remote.clone(),
        port: filter.port,
        protocol: filter.protocol.clone(),
        process: filter.process.clone(),
        user: filter.user.clone(),
        fresh,
        ..Select::default()
    }));
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if !json && let Err(e) = print_flow_header(&mut out) {
        return fail(e);
    }
    // Lines are printed as they arrive: a million flows never sit in memory here.
    let streamed = crate::daemon::control::request_stream(&run_dir, &req, |line| {
        let written = if json {
            // As the daemon wrote it: no need to parse what is only passed on.
            writeln!(out, "{line}")
        } else {
            let f: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("bad flow line: {e}"))?;
            print_flow_row(&mut out, &f)
        };
        written.map_err(|e| e.to_string())
    });
    match streamed.map(drop).and_then(|()| out.flush().map_err(|e| e.to_string())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.contains("Broken pipe") => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn stats_cmd(target: &DaemonTarget, json: bool) -> ExitCode {
    let run_dir = match target.run_dir() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let reply = match crate::daemon::control::request(&run_dir, &Request::new(Ask::Stats)) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let stats = reply.stats.unwrap_or_default();
    if json {
        println!("{stats}");
        return ExitCode::SUCCESS;
    }
    let mut out = String::new();
    let section = |out: &mut String, title: &str, v: &serde_json::Value| {
        out.push_str(title);
        out.push('\n');
        // Lists and tables (a worker's latency histogram, its counts by rule) have sections of
        // their own, from the totals.
        for (k, x) in v.as_object().into_iter().flatten().filter(|(_, x)| !x.is_object() && !x.is_array()) {
            out.push_str(&format!("  {k:<22} {x}\n"));
        }
    };
    section(&mut out, "total:", &stats["total"]);
    print_flow_counts(&mut out, &stats);
    for w in stats["workers"].as_array().into_iter().flatten() {
        section(&mut out, &format!("queue {}:", w["queue"]), w);
    }
    for q in stats["kernel_queues"].as_array().into_iter().flatten() {
        section(&mut out, &format!("kernel, queue {}:", q["queue"]), q);
    }
    if let Some(rules) = stats["queue_rules"].as_array() {
        for r in rules {
            out.push_str(&format!(
                "kernel, NFQUEUE rules ({} stage, {}): {} packets matched\n",
                r["stage"].as_str().unwrap_or("?"),
                r["family"].as_str().unwrap_or("?"),
                r["packets"]
            ));
        }
    }
    if let Some(e) = stats["queue_rules_error"].as_str() {
        out.push_str(&format!("kernel, NFQUEUE rules: cannot read their counters: {e}\n"));
    }
    let b = &stats["bypass"]["flow"];
    if let Some(n) = b["bypassed"].as_u64() {
        out.push_str(&format!(
            "fail open: about {n} packets passed the flow queues unjudged ({} matched, {} read, {} waiting)\n",
            b["queued"], b["received"], b["waiting"]
        ));
    }
    section(&mut out, "conntrack:", &stats["conntrack"]);
    section(&mut out, "enforcement:", &stats["enforce"]);
    section(&mut out, "events:", &stats["events"]);
    let ps = &stats["packet_stage"];
    section(&mut out, "packet stage, total:", &ps["total"]);
    for w in ps["workers"].as_array().into_iter().flatten() {
        section(&mut out, &format!("packet queue {}:", w["queue"]), w);
    }
    let interfaces = ps["interfaces"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !interfaces.is_empty() {
        out.push_str(&format!(
            "packet stage, per interface:\n  {:<16} {:<10} {:>12} {:>16} {:>10} {:>10}\n",
            "INTERFACE", "DIRECTION", "PACKETS", "BYTES", "DROPPED", "DELAYED"
        ));
        for i in interfaces {
            out.push_str(&format!(
                "  {:<16} {:<10} {:>12} {:>16} {:>10} {:>10}\n",
                i["name"].as_str().unwrap_or("?"),
                i["direction"].as_str().unwrap_or("?"),
                i["packets"].as_u64().unwrap_or(0),
                i["bytes"].as_u64().unwrap_or(0),
                i["dropped"].as_u64().unwrap_or(0),
                i["delayed"].as_u64().unwrap_or(0)
            ));
        }
    }
    let rules = ps["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !rules.is_empty() {
        out.push_str(&format!("packet rules:\n  {:<24} {:<6} {:>12} {:>16}\n", "NAME", "ACTION", "PACKETS", "BYTES"));
        for r in rules {
            out.push_str(&format!(
                "  {:<24} {:<6} {:>12} {:>16}\n",
                r["name"].as_str().unwrap_or("?"),
                r["action"].as_str().unwrap_or("?"),
                r["packets"].as_u64().unwrap_or(0),
                r["bytes"].as_u64().unwrap_or(0)
            ));
        }
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// First verdicts by rule, verdict changes, closes by reason, and the verdict latency summary.
fn print_flow_counts(out: &mut String, stats: &serde_json::Value) {
    let rules = stats["verdicts"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !rules.is_empty() {
        out.push_str(&format!(
            "first verdicts by rule:\n  {:<24} {:>10} {:>10} {:>10} {:>10}\n",
            "RULE", "ALLOW", "DROP", "INSPECT", "PAUSE"
        ));
        // Numbers, not JSON values: a value's Display ignores the column width.
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        for r in rules {
            out.push_str(&format!(
                "  {:<24} {:>10} {:>10} {:>10} {:>10}\n",
                r["rule"].as_str().unwrap_or("?"),
                n(&r["allow"]),
                n(&r["drop"]),
                n(&r["inspect"]),
                n(&r["pause"])
            ));
        }
    }
    let mut changes = Vec::new();
    for (verdict, sources) in stats["updates"].as_object().into_iter().flatten() {
        for (source, n) in sources.as_object().into_iter().flatten() {
            if n.as_u64().is_some_and(|n| n > 0) {
                changes.push(format!("{verdict} by {source} {n}"));
            }
        }
    }
    if !changes.is_empty() {
        out.push_str(&format!("verdict changes: {}\n", changes.join(", ")));
    }
    let closed: Vec<String> = stats["closed"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    if !closed.is_empty() {
        out.push_str(&format!("flows closed: {}\n", closed.join(", ")));
    }
    let l = &stats["latency"];
    if let Some(count) = l["count"].as_u64() {
        // Bucket bounds, so "at most"; past the last bound is over 100 ms.
        let bound = |v: &serde_json::Value| match v.as_f64() {
            Some(us) if us >= 1000.0 => format!("<= {} ms", us / 1000.0),
            Some(us) => format!("<= {us} us"),
            None if count == 0 => "-".to_string(),
            None => "> 100 ms".to_string(),
        };
        out.push_str(&format!(
            "verdict latency (receipt to verdict sent): {count} packets, p50 {}, p99 {}, max {}\n",
            bound(&l["p50_us"]),
            bound(&l["p99_us"]),
            bound(&l["max_us"])
        ));
    }
}

fn print_flow_header(out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{:>8} {:<5} {:<8} {:<42} {:<42} {:<10} {:<7} {:<16} {:>13} {:>17} {:>8}  {:<32} PROCESS",
        "ID",
        "PROTO",
        "DIR",
        "LOCAL",
        "REMOTE",
        "IFACE",
        "VERDICT",
        "RULE",
        "PKTS OUT/IN",
        "BYTES OUT/IN",
        "AGE",
        "HOST"
    )
}

fn print_flow_row(out: &mut dyn Write, f: &serde_json::Value) -> io::Result<()> {
    let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string();
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let flow = f.get("flow").cloned().unwrap_or_default();
    let dir = if flow.get("forwarded") == Some(&serde_json::Value::Bool(true)) {
        "forward".to_string()
    } else {
        s(&flow, "direction")
    };
    // The owner, as `pid user exe` (what is known of it).
    let process = match flow.get("process") {
        Some(p) if p.is_object() => {
            let user = p.get("user").and_then(|u| u.as_str()).map_or_else(|| n(p, "uid").to_string(), String::from);
            format!("{} {user} {}", n(p, "pid"), s(p, "exe"))
        }
        _ => "-".to_string(),
    };
    // The host, as `name (source)`; an Encrypted Client Hello's outer name is marked as such.
    let host = match flow.get("host") {
        Some(h) if h.is_object() => {
            let name = match (h.get("name").and_then(|x| x.as_str()), h.get("source").and_then(|x| x.as_str())) {
                (Some(name), Some(src)) => format!("{name} ({src})"),
                _ => "-".to_string(),
            };
            match h.get("outer_sni").and_then(|x| x.as_str()) {
                Some(outer) => format!("{name} ech:{outer}"),
                None => name,
            }
        }
        _ => "-".to_string(),
    };
    writeln!(
        out,
        "{:>8} {:<5} {:<8} {:<42} {:<42} {:<10} {:<7} {:<16} {:>13} {:>17} {:>7}s  {host:<32} {process}",
        n(&flow, "id"),
        s(&flow, "protocol"),
        dir,
        s(&flow, "local"),
        s(&flow, "remote"),
        s(&flow, "interface"),
        s(f, "verdict"),
        s(f, "rule"),
        format!("{}/{}", n(f, "packets_out"), n(f, "packets_in")),
        format!("{}/{}", n(f, "bytes_out"), n(f, "bytes_in")),
        n(f, "age_ms") / 1000,
    )
}

fn verdict_cmd(cmd: &str, select: &FlowSelect, target: &DaemonTarget) -> ExitCode {
    if select.ids.is_empty() && select.filter.is_empty() {
        return fail(format!(
            "flowgate {cmd}: name flows by id, or by --remote, --port, --protocol, --process and/or --user"
        ));
    }
    let run_dir = match target.run_dir() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let f = &select.filter;
    let sel = Select {
        ids: select.ids.clone(),
        remote: f.remote.clone(),
        port: f.port,
        protocol: f.protocol.clone(),
        process: f.process.clone(),
        user: f.user.clone(),
        ..Select::default()
    };
    let req = Request::new(if cmd == "block" { Ask::Block(sel) } else { Ask::Allow(sel) });
    match crate::daemon::control::request(&run_dir, &req) {
        Ok(reply) => {
            if select.json {
                println!("{}", serde_json::to_string(&reply).unwrap_or_default());
            } else {
                let ids: Vec<String> = reply.flows.unwrap_or_default().iter().map(ToString::to_string).collect();
                println!("{}: {}", if cmd == "block" { "blocked" } else { "allowed" }, ids.join(" "));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn reload_cmd(target: &DaemonTarget) -> ExitCode {
    let run_dir = match target.run_dir() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    match crate::daemon::control::request(&run_dir, &Request::new(Ask::Reload)) {
        Ok(reply) => {
            println!("reloaded: {} rules", reply.rules.unwrap_or(0));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn cleanup_cmd(target: &DaemonTarget) -> ExitCode {
    let run_dir = match target.run_dir() {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    match crate::daemon::cleanup(&run_dir) {
        Ok(true) => {
            println!("removed flowgate's leftover netfilter chains");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("nothing to clean up");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn rules_check(file: &Path, json: bool, strict: bool) -> ExitCode {
    let result = config::load(file);
    let ok = match &result {
        Ok(c) => !strict || c.warnings.is_empty(),
        Err(_) => false,
    };
    // Which rules `flowgate run` would decide in the kernel, and why the others need user space
    // (without a product's filter: the CLI daemon has none).
    let kernel = |c: &config::Config| {
        let plan = if c.live.kernel_rules {
            flowgate_core::rules::kernel::KernelPlan::new(&c.rules, false)
        } else {
            flowgate_core::rules::kernel::KernelPlan::off(&c.rules)
        };
        let mut decided: Vec<&str> =
            plan.entries.iter().filter_map(|e| e.rule).map(|i| c.rules.rules[i].name.as_str()).collect();
        decided.dedup();
        let user: Vec<(usize, String, String)> = plan
            .user_space
            .iter()
            .map(|(i, why)| {
                (c.rule_lines.get(*i).copied().unwrap_or(0), c.rules.rules[*i].name.clone(), why.to_string())
            })
            .collect();
        (decided.into_iter().map(str::to_string).collect::<Vec<_>>(), plan.decides_everything(), user)
    };
    if json {
        let v = match &result {
            Ok(c) => {
                let (decided, default, user) = kernel(c);
                json!({
                    "file": file.display().to_string(),
                    "ok": ok,
                    "rules": c.rules.rules.len(),
                    "default_action": c.rules.default_action.name(),
                    "warnings": c.warnings.iter().map(|w| json!({"line": w.line, "message": w.message})).collect::<Vec<_>>(),
                    "kernel": {
                        "rules": decided,
                        "default": default,
                        "user_space": user.iter().map(|(line, name, why)| json!({"line": line, "rule": name, "reason": why})).collect::<Vec<_>>(),
                    },
                })
            }
            Err(e) => json!({
                "file": file.display().to_string(),
                "ok": false,
                "error": {"line": e.line, "column": e.column, "field": e.field, "message": e.message},
            }),
        };
        println!("{v}");
    } else {
        match &result {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("{w}");
                }
                println!(
                    "{}: {} rule{}, default action {}, {} warning{}{}",
                    file.display(),
                    c.rules.rules.len(),
                    if c.rules.rules.len() == 1 { "" } else { "s" },
                    c.rules.default_action.name(),
                    c.warnings.len(),
                    if c.warnings.len() == 1 { "" } else { "s" },
                    if ok { "" } else { " (rejected: --strict)" },
                );
                let (decided, default, user) = kernel(c);
                println!(
                    "decided in the kernel: {} rule{}{}",
                    decided.len(),
                    if decided.len() == 1 { "" } else { "s" },
                    if default { " and the default" } else { "" }
                );
                for (line, name, why) in &user {
                    println!("{}:{line}: rule `{name}` is judged in user space: {why}", file.display());
                }
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Builds an engine for replaying with a loaded config (or the built-in allow-all default).
pub fn replay_engine(config: Option<&Config>) -> Engine {
    let (engine_config, rules) = match config {
        Some(c) => (c.engine.clone(), c.rules.clone()),
        None => (EngineConfig::default(), Default::default()),
    };
    Engine::new(engine_config, Arc::new(CompiledRules::compile(rules)))
}

fn replay_cmd(capture: &Path, config_path: Option<&Path>, json: bool) -> ExitCode {
    let config = match config_path.map(config::load).transpose() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut engine = replay_engine(config.as_ref());
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let format = config.as_ref().map(|c| c.event_format).unwrap_or_default();
    let result = replay::replay_as(&mut engine, capture, &mut out, format);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(s), Ok(())) => {
            if json {
                eprintln!("{}", json!({"summary": s}));
            } else {
                let e = &s.engine;
                eprintln!(
                    "replayed {} frames: {} flows, {} events; skipped {} non-IP frames, {} truncated, {} malformed, {} fragments",
                    s.frames,
                    e.flows_opened,
                    s.events,
                    s.non_ip_frames + e.not_ip,
                    e.truncated,
                    e.malformed,
                    e.fragments
                );
                let defrag =
                    [s.datagrams_reassembled, s.datagrams_refused, s.datagrams_incomplete, s.fragments_over_limits];
                if defrag.iter().any(|&n| n > 0) {
                    eprintln!(
                        "IP fragments: {} datagrams reassembled, {} refused (conflicting or impossible fragments), {} \
                         incomplete, {} fragments over the reassembly limits",
                        defrag[0], defrag[1], defrag[2], defrag[3]
                    );
                }
            }
            ExitCode::SUCCESS
        }
        (Err(e), _) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        (Ok(_), Err(e)) => {
            // A closed pipe (`| head`) is not worth a message.
            if e.kind() != io::ErrorKind::BrokenPipe {
                eprintln!("error: writing events: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
