//! The command line: argument parsing and one function per subcommand.
//!
//! `main → run → ExitCode`. Arguments are parsed and the config validated before anything else
//! happens; every failure prints one message naming what was wrong and where, and exits
//! non-zero. Subcommands here: `rules check` and `replay`.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::{Engine, EngineConfig};
use serde_json::json;

use crate::config::{self, Config};
use crate::replay;

#[derive(Parser, Debug)]
#[command(name = "flowgate", version, about = "A network content filter: judges every flow of a host", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Validate and lint a config file: errors name file, line and field; warnings flag rules
    /// that match every address or can never match.
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
    match cli.command {
        Command::Rules { command: RulesCommand::Check { file, json, strict } } => rules_check(&file, json, strict),
        Command::Replay { capture, config, json } => replay_cmd(&capture, config.as_deref(), json),
    }
}

fn rules_check(file: &Path, json: bool, strict: bool) -> ExitCode {
    let result = config::load(file);
    let ok = match &result {
        Ok(c) => !(strict && !c.warnings.is_empty()),
        Err(_) => false,
    };
    if json {
        let v = match &result {
            Ok(c) => json!({
                "file": file.display().to_string(),
                "ok": ok,
                "rules": c.rules.rules.len(),
                "default_action": c.rules.default_action.name(),
                "warnings": c.warnings.iter().map(|w| json!({"line": w.line, "message": w.message})).collect::<Vec<_>>(),
            }),
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
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// Builds an engine for replaying with a loaded config (or the built-in allow-all default).
pub fn replay_engine(config: Option<&Config>) -> Engine {
    let (mut engine_config, rules) = match config {
        Some(c) => (c.engine.clone(), c.rules.clone()),
        None => (EngineConfig::default(), Default::default()),
    };
    // Snapshots feed live listings (`flowgate flows`); a replay has no one to read them.
    engine_config.snapshot_interval = Duration::from_secs(u64::from(u32::MAX));
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
    let result = replay::replay(&mut engine, capture, &mut out);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(s), Ok(())) => {
            if json {
                eprintln!("{}", json!({"summary": s}));
            } else {
                let e = &s.engine;
                eprintln!(
                    "replayed {} frames: {} flows, {} events; skipped {} non-IP frames, {} truncated, {} malformed, {} fragments",
                    s.frames, e.flows_opened, s.events, s.non_ip_frames + e.not_ip, e.truncated, e.malformed, e.fragments
                );
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
