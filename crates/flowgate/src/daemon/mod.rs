//! The live daemon (`flowgate run`): NFQUEUE workers around the engine, the chains that feed
//! them, the event log, the control socket, and an orderly start and stop.
//!
//! Start: the config is already validated; then root is checked, the instance lock in `run_dir`
//! is taken (a second instance stops here), the queues are bound (a live instance holding them
//! stops us here too), and only then are a dead instance's leftovers removed and flowgate's
//! chains installed (all or nothing). Workers, the event writer and the control socket start;
//! "ready" is printed on stderr. Stop (SIGINT, SIGTERM): the chains go first, so no packet is
//! queued to a worker that is leaving; then workers answer what they hold and exit, flows close,
//! the log is flushed, the socket and lock are removed. SIGKILL leaves the chains in place: with
//! `fail = "open"` their `--queue-bypass` lets traffic pass while no one listens, with
//! `fail = "closed"` nothing new passes; the next start (or `flowgate cleanup`) removes them.

mod clock;
pub mod control;
mod kernel;
mod lock;
mod shard;

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::{Engine, EngineConfig, Event};
use flowgate_linux::netfilter::{self, ChainSpec, Tools};
use flowgate_linux::nfqueue::{Queue, QueueConfig};
use nix::sys::signal::{SigSet, Signal};

use crate::config::{Config, FailMode};
use crate::replay::write_event;
use clock::Clock;
use shard::Shard;

pub use lock::LOCK;

/// Runs the daemon until SIGINT or SIGTERM. Errors say what failed and what was undone.
pub fn run(config: &Config) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("flowgate run needs root (it installs netfilter rules and binds NFQUEUE queues)".into());
    }
    // Signals are taken synchronously by the main thread; block them before any thread starts
    // so every thread inherits the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let live = &config.live;
    std::fs::create_dir_all(&live.run_dir)
        .map_err(|e| format!("{}: cannot create run_dir: {e}", live.run_dir.display()))?;
    let _lock = lock::acquire(&live.run_dir)?;
    let group = match &live.control_group {
        None => None,
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .map_err(|e| format!("control_group `{name}`: cannot look it up: {e}"))?
                .ok_or_else(|| format!("control_group `{name}`: no such group"))?
                .gid,
        ),
    };
    let fail_open = config.fail == FailMode::Open;
    let last = live.first_queue + (live.queues - 1);
    let mut queues = Vec::with_capacity(usize::from(live.queues));
    for num in live.first_queue..=last {
        let q = Queue::open(&QueueConfig {
            num,
            max_len: live.queue_max_len,
            fail_open,
            copy_range: 0xffff,
        })
        .map_err(|e| format!("{e} (is another flowgate, or another NFQUEUE program, running?)"))?;
        queues.push(q);
    }
    // Per-flow counters of kernel-handled flows come from conntrack accounting.
    let accounting_was =
        flowgate_linux::conntrack::enable_accounting().map_err(|e| format!("enabling conntrack accounting: {e}"))?;
    let spec = ChainSpec {
        queues: live.first_queue..=last,
        fail_open,
        loopback: live.loopback,
    };
    let installed = netfilter::install(&spec, &Tools::default())
        .map_err(|e| format!("installing netfilter rules: {e} (nothing was left installed)"))?;

    // From here on, whatever fails must remove the chains again.
    let started = start(config, queues, group);
    let (workers, writer, socket) = match started {
        Ok(x) => x,
        Err(e) => {
            let undo = installed
                .remove()
                .err()
                .map(|u| format!("; removing the rules also failed: {u}"))
                .unwrap_or_default();
            return Err(format!("{e}{undo}"));
        }
    };
    eprintln!(
        "flowgate: ready: {} queue{} ({}-{}), fail-{}, {} rule{}, default {}, control socket {}",
        live.queues,
        if live.queues == 1 { "" } else { "s" },
        live.first_queue,
        last,
        if fail_open { "open" } else { "closed" },
        config.rules.rules.len(),
        if config.rules.rules.len() == 1 { "" } else { "s" },
        config.rules.default_action.name(),
        socket.display(),
    );

    let signal = loop {
        match signals.wait() {
            Ok(Signal::SIGHUP) => {
                eprintln!("flowgate: SIGHUP: reloading is not implemented in this version; rules unchanged")
            }
            Ok(s) => break s,
            Err(e) => return Err(format!("waiting for signals: {e}")),
        }
    };
    eprintln!("flowgate: {signal}: stopping");
    let mut errors = Vec::new();
    if let Err(e) = installed.remove() {
        errors.push(format!("removing netfilter rules: {e}"));
    }
    if let Err(e) = workers.stop() {
        errors.push(e);
    }
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => errors.push(e),
        Err(_) => errors.push("the event writer panicked".into()),
    }
    let _ = std::fs::remove_file(&socket);
    if !accounting_was {
        let _ = flowgate_linux::conntrack::set_accounting(false);
    }
    if errors.is_empty() {
        eprintln!("flowgate: stopped; rules removed");
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The queue workers, the conntrack watcher, and their common stop flag.
struct Workers {
    shards: Vec<Shard>,
    conntrack: Option<std::thread::JoinHandle<Result<(), String>>>,
    stop: Arc<AtomicBool>,
}

impl Workers {
    fn stop(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Release);
        let mut errors: Vec<String> = Vec::new();
        if let Some(t) = self.conntrack {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("the conntrack watcher panicked".into()),
            }
        }
        errors.extend(self.shards.into_iter().filter_map(|s| s.join().err()));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

type Started = (Workers, std::thread::JoinHandle<Result<(), String>>, std::path::PathBuf);

fn start(config: &Config, queues: Vec<Queue>, group: Option<nix::unistd::Gid>) -> Result<Started, String> {
    let live = &config.live;
    let out: Box<dyn Write + Send> = match &live.log {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("{}: cannot open log: {e}", p.display()))?,
        ),
    };
    let (tx, rx) = mpsc::channel::<Event>();
    let writer = std::thread::Builder::new()
        .name("flowgate-log".into())
        .spawn(move || write_events(rx, out))
        .map_err(|e| format!("cannot start the event writer: {e}"))?;
    let clock = Clock::new();
    let rules = Arc::new(CompiledRules::compile(config.rules.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let n = queues.len() as u64;
    let mut shards = Vec::with_capacity(queues.len());
    for (k, queue) in queues.into_iter().enumerate() {
        // Ids never collide across workers: worker k hands out k+1, k+1+n, ...
        let engine_config = EngineConfig {
            first_flow_id: k as u64 + 1,
            flow_id_step: n,
            ..config.engine.clone()
        };
        let engine = Engine::new(engine_config, rules.clone());
        let shard = Shard::start(queue, engine, clock, tx.clone(), stop.clone())
            .map_err(|e| format!("cannot start a queue worker: {e}"))?;
        shards.push(shard);
    }
    drop(tx);
    let handles: Vec<_> = shards.iter().map(|s| s.handle.clone()).collect();
    let mut workers = Workers {
        shards,
        conntrack: None,
        stop: stop.clone(),
    };
    match kernel::watch_ends(handles.clone(), stop) {
        Ok(t) => workers.conntrack = Some(t),
        Err(e) => {
            let _ = workers.stop();
            return Err(e);
        }
    }
    let socket = match control::serve(&live.run_dir, group, handles, clock) {
        Ok(p) => p,
        Err(e) => {
            let _ = workers.stop();
            return Err(e);
        }
    };
    Ok((workers, writer, socket))
}

/// Writes events as JSON lines, flushing whenever the channel runs dry so a reader sees each
/// event promptly. Ends when every worker has dropped its sender.
fn write_events(rx: mpsc::Receiver<Event>, out: Box<dyn Write + Send>) -> Result<(), String> {
    let mut out = BufWriter::new(out);
    while let Ok(e) = rx.recv() {
        write_event(&mut out, &e).map_err(|e| format!("writing events: {e}"))?;
        while let Ok(e) = rx.try_recv() {
            write_event(&mut out, &e).map_err(|e| format!("writing events: {e}"))?;
        }
        out.flush().map_err(|e| format!("writing events: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing events: {e}"))
}

/// `flowgate cleanup`: removes a dead instance's chains and socket. Refuses while an instance
/// is running (it would cut that instance off).
pub fn cleanup(run_dir: &Path) -> Result<bool, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("flowgate cleanup needs root".into());
    }
    std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: cannot create run_dir: {e}", run_dir.display()))?;
    let _lock = lock::acquire(run_dir)?;
    let found = netfilter::cleanup(&Tools::default()).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(run_dir.join(control::SOCKET));
    Ok(found)
}
