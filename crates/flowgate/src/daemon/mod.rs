//! The live daemon (`flowgate run`): NFQUEUE workers around the engine, the chains that feed
//! them, the event log, the control socket, and an orderly start and stop.
//!
//! Start: the config is already validated; then root is checked, the instance lock in `run_dir`
//! is taken (a second instance stops here), the queues are bound (a live instance holding them
//! stops us here too), the connections already open are adopted (`adopt`: marked or torn down
//! by `enforce` before any chain exists), and only then are a dead instance's leftovers removed
//! and flowgate's chains installed (all or nothing), with the static rules the kernel decides
//! alone (`statics`: the plan, its ipsets and chains, the ids conntrack's reports carry).
//! Before any flow is judged, the lookup of flows' owners is set up (`owners`: the kernel
//! capture, or `/proc`), so it sees the sockets of the flows the engines will ask about; its
//! thread starts with the workers and answers their questions.
//! Workers, the enforcer (verdict changes on kernel-handled flows), the conntrack watcher, the
//! drop log (`droplog`: packets static rules dropped), the event writer, the control socket
//! and, if configured, the metrics listener (bound before anything is installed) start;
//! SIGHUP or `flowgate reload` re-judges every live flow with the config file's new rules and
//! swaps the static rules in the kernel;
//! SIGUSR1 has the writer reopen its log (logrotate), which it writes in `event_format` to
//! stdout, a file, or a syslog or journald socket (`socket_log`);
//! "ready" is printed on stderr. Stop (SIGINT, SIGTERM): the chains go first, so no packet is
//! queued to a worker that is leaving; then workers answer what they hold and exit, flows close,
//! the log is flushed, the socket and lock are removed. SIGKILL leaves the chains in place: with
//! `fail = "open"` their `--queue-bypass` lets traffic pass while no one listens, with
//! `fail = "closed"` nothing new passes; the next start (or `flowgate cleanup`) removes them.

mod adopt;
mod clock;
pub mod control;
mod droplog;
mod enforce;
mod kernel;
mod lock;
mod metrics;
pub mod notify;
mod owners;
mod packet_shard;
mod registry;
mod shard;
mod socket_log;
mod statics;
mod tally;

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant as StdInstant};

use flowgate_core::packet_stage::PacketRules;
use flowgate_core::rules::matcher::CompiledRules;
use flowgate_core::{
    DataVerdict, Direction, Engine, EngineConfig, Event, FlowFilter, FlowId, FlowStatus, Handle, PacketFilter,
    PacketHandle, PacketStage, PacketStageConfig, Selector,
};
use flowgate_linux::netfilter::{self, ChainSpec, PacketChains, PacketInterface, Tools};
use flowgate_linux::nfqueue::{Queue, QueueConfig};
use flowgate_linux::static_rules::StaticRules;
use nix::sys::signal::{SigSet, Signal};
use serde_json::{Value, json};

use crate::config::{Config, FailMode, LogTarget, PacketConfig};
use clock::Clock;
use packet_shard::{PacketLinks, PacketShard, PacketWorkerStats};
use registry::Registry;
use shard::{Links, Shard};

pub use lock::LOCK;

/// Sets the calling thread's nice value. Best effort: a thread that keeps its priority still
/// works.
fn nice(value: i32) {
    // SAFETY: gettid and setpriority take no pointers; PRIO_PROCESS with a thread id sets that
    // thread's nice value on Linux.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, value);
    }
}

/// Bulk work (listings, syncs) runs at nice 10: it waits while a queue worker needs a CPU,
/// instead of taking turns with it.
pub(crate) fn background() {
    nice(10);
}

/// Queue workers run at nice -10: a packet that wakes one gets a CPU ahead of the host's
/// ordinary work and of the daemon's own bulk work (a worker sleeps whenever it has nothing to
/// judge, so this takes nothing from anyone while traffic is quiet).
pub(crate) fn foreground() {
    nice(-10);
}

/// Makes one product flow filter per queue worker (argument: the worker's index), for a
/// product that embeds the daemon (see [`Running`]).
pub type FilterFactory = dyn Fn(usize) -> Box<dyn FlowFilter>;

/// Makes one product packet filter per packet-stage queue worker (arguments: the worker's index,
/// and its stage's handle, through which the filter releases the packets it delays).
pub type PacketFilterFactory = dyn Fn(usize, PacketHandle) -> Box<dyn PacketFilter>;

/// The product's providers for an embedded daemon ([`Running::start_with`]).
#[derive(Default, Clone, Copy)]
pub struct Providers<'a> {
    /// Judges flows beside the rules, one per flow queue worker.
    pub flow: Option<&'a FilterFactory>,
    /// Judges every packet of the interfaces `[packet_filter]` names, one per packet queue
    /// worker.
    pub packet: Option<&'a PacketFilterFactory>,
}

/// Runs the daemon until SIGINT or SIGTERM (SIGHUP reloads the rules, SIGUSR1 reopens the
/// event log). Errors say what failed and what was undone.
pub fn run(config: &Config) -> Result<(), String> {
    // Signals are taken synchronously by the main thread; block them before any thread starts
    // so every thread inherits the mask.
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGUSR1] {
        signals.add(s);
    }
    signals.thread_block().map_err(|e| format!("cannot block signals: {e}"))?;
    // No transparent huge pages: a queue worker that first touches a fresh 2 MiB page waits for
    // the kernel to clear it, milliseconds on the packet path (bench/src/bin/registry.rs
    // measured 2-6 ms). Small pages spread that cost out.
    // SAFETY: this prctl only sets a flag of this process; it takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        log::warn!("cannot turn transparent huge pages off: {}", std::io::Error::last_os_error());
    }
    // Under systemd (`Type=notify`), the service manager learns when filtering starts, when a
    // reload begins and ends, and when the daemon stops. A product embedding `Running` owns its
    // process's readiness and notifies for itself.
    let notifier = notify::Notifier::from_env().unwrap_or_else(|e| {
        log::warn!("{e}; the service manager will not be told when flowgate is ready");
        None
    });
    let running = Running::start(config, None)?;
    let rules = |n: usize| format!("filtering, {n} rule{}", if n == 1 { "" } else { "s" });
    if let Some(n) = &notifier {
        n.ready(&rules(config.rules.rules.len()));
    }
    let signal = loop {
        match signals.wait() {
            Ok(Signal::SIGHUP) => {
                if let Some(n) = &notifier {
                    n.reloading();
                }
                let status = match running.reload() {
                    Ok(n) => {
                        log::info!("SIGHUP: reloaded {}: {n} rules", config.path.display());
                        rules(n)
                    }
                    Err(e) => {
                        log::error!("SIGHUP: {e}; the rules in force are unchanged");
                        format!("filtering; the last reload failed: {e}")
                    }
                };
                if let Some(n) = &notifier {
                    n.ready(&status);
                }
            }
            // logrotate: the writer opens the log's path anew (and says so on stderr).
            Ok(Signal::SIGUSR1) => running.reopen_log(),
            Ok(s) => break s,
            Err(e) => {
                if let Some(n) = &notifier {
                    n.stopping();
                }
                let _ = running.stop();
                return Err(format!("waiting for signals: {e}"));
            }
        }
    };
    log::info!("{signal}: stopping");
    if let Some(n) = &notifier {
        n.stopping();
    }
    running.stop()
}

/// A running daemon, for products that embed it. Every live flow belongs to one queue worker's
/// engine; [`Running::update`] and [`Running::list`] find it there, with the same effect as
/// `flowgate block`/`allow`/`flows` (a kernel-handled flow is torn down too).
pub struct Running {
    registry: Registry,
    workers: Workers,
    writer: Writer,
    socket: std::path::PathBuf,
    installed: flowgate_linux::netfilter::Installed,
    accounting_was: bool,
    reloader: Arc<Reloader>,
    metrics: Option<metrics::Server>,
    _lock: lock::InstanceLock,
}

impl Running {
    /// Starts filtering: see the module documentation for the order of things. `filters`, if
    /// given, makes a product flow filter for each queue worker, judging beside the rules.
    pub fn start(config: &Config, filters: Option<&FilterFactory>) -> Result<Running, String> {
        Running::start_with(config, Providers { flow: filters, packet: None })
    }

    /// Starts filtering with the product's flow and packet filters (see [`Providers`]).
    pub fn start_with(config: &Config, providers: Providers<'_>) -> Result<Running, String> {
        let filters = providers.flow;
        if !nix::unistd::geteuid().is_root() {
            return Err("flowgate run needs root (it installs netfilter rules and binds NFQUEUE queues)".into());
        }
        let live = &config.live;
        std::fs::create_dir_all(&live.run_dir)
            .map_err(|e| format!("{}: cannot create run_dir: {e}", live.run_dir.display()))?;
        let lock = lock::acquire(&live.run_dir)?;
        let group = match &live.control_group {
            None => None,
            Some(name) => Some(
                nix::unistd::Group::from_name(name)
                    .map_err(|e| format!("control_group `{name}`: cannot look it up: {e}"))?
                    .ok_or_else(|| format!("control_group `{name}`: no such group"))?
                    .gid,
            ),
        };
        // Bound now, so a taken address stops the start before anything is installed.
        let metrics_listener = live.metrics.as_ref().map(|a| metrics::bind(a, group)).transpose()?;
        let fail_open = config.fail == FailMode::Open;
        let last = live.first_queue + (live.queues - 1);
        let mut queues = Vec::with_capacity(usize::from(live.queues));
        for num in live.first_queue..=last {
            let q = Queue::open(&QueueConfig { num, max_len: live.queue_max_len, fail_open, copy_range: 0xffff })
                .map_err(|e| format!("{e} (is another flowgate, or another NFQUEUE program, running?)"))?;
            queues.push(q);
        }
        // The packet stage's queues come right after the flow queues.
        let packet_first = last + 1;
        let packet_last = packet_first + (config.packet.queues - 1);
        let mut packet_queues = Vec::with_capacity(usize::from(config.packet.queues));
        for num in packet_first..=packet_last {
            let q = Queue::open(&QueueConfig { num, max_len: live.queue_max_len, fail_open, copy_range: 0xffff })
                .map_err(|e| format!("{e} (is another flowgate, or another NFQUEUE program, running?)"))?;
            packet_queues.push(q);
        }
        // Per-flow counters of kernel-handled flows come from conntrack accounting.
        let accounting_was = flowgate_linux::conntrack::enable_accounting()
            .map_err(|e| format!("enabling conntrack accounting: {e}"))?;
        let clock = Clock::new();
        // Before any flow is judged: the kernel capture must see the sockets of flows that the
        // engines are about to ask about.
        let resolver = owners::Resolver::open(live.attribution)?;
        let attribution = resolver.as_ref().map_or("off", owners::Resolver::mechanism);
        let mut engines = engines(config, queues.len(), resolver.is_some());
        // One table of names learnt from DNS answers: an answer one queue reads names flows
        // every queue judges.
        let dns_names = Arc::new(flowgate_core::dns_names::DnsNames::new(flowgate_core::engine::DNS_NAMES));
        for e in &mut engines {
            e.set_dns_names(dns_names.clone());
        }
        if let Some(make) = filters {
            for (k, e) in engines.iter_mut().enumerate() {
                e.set_flow_filter(make(k));
            }
        }
        // Connections already open become flows, and are marked or torn down, before the
        // chains exist: an allowed one never has a packet queued.
        let enforce_stats = Arc::new(enforce::EnforceStats::default());
        let adopted = adopt_existing(config, &mut engines, &clock, &enforce_stats)?;
        let plan = statics::plan(&config.rules, live.kernel_rules, filters.is_some());
        let spec = ChainSpec {
            queues: live.first_queue..=last,
            fail_open,
            loopback: live.loopback,
            packet: packet_chains(&config.packet, packet_first..=packet_last),
            statics: statics::static_rules(&config.rules, &plan, 1, statics::LOG_GROUP),
        };
        let ids = Arc::new(statics::Ids::new(&config.rules, &plan));
        let kernel_part = statics::describe(&config.rules, &plan);
        let installed = netfilter::install(&spec, &Tools::default())
            .map_err(|e| format!("installing netfilter rules: {e} (nothing was left installed)"))?;

        // From here on, whatever fails must remove the chains again.
        let stages = stages(config, &config.packet, packet_queues.len(), providers.packet);
        let packets = (packet_queues, stages, spec.clone());
        let extras = Extras {
            enforce: enforce_stats,
            metrics: metrics_listener,
            ids,
            provider: filters.is_some(),
            owners: resolver,
        };
        let started = start(config, queues, engines, packets, clock, group, extras);
        let (workers, writer, socket, registry, reloader, metrics) = match started {
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
        let covered = spec.packet.interfaces.iter().map(describe_covered).collect::<Vec<_>>();
        log::info!(
            "ready: {} queue{} ({}-{}), fail-{}, {} rule{}, default {} ({kernel_part}), {adopted} existing connection{} adopted, owners by {attribution}, packet stage on {} ({} queue{} {}-{}, {} packet rule{}{}), control socket {}{}",
            live.queues,
            if live.queues == 1 { "" } else { "s" },
            live.first_queue,
            last,
            if fail_open { "open" } else { "closed" },
            config.rules.rules.len(),
            if config.rules.rules.len() == 1 { "" } else { "s" },
            config.rules.default_action.name(),
            if adopted == 1 { "" } else { "s" },
            if covered.is_empty() { "no interface".to_string() } else { covered.join(", ") },
            config.packet.queues,
            if config.packet.queues == 1 { "" } else { "s" },
            packet_first,
            packet_last,
            config.packet.rules.rules.len(),
            if config.packet.rules.rules.len() == 1 { "" } else { "s" },
            if providers.packet.is_some() { ", a packet filter" } else { "" },
            socket.display(),
            live.metrics.as_ref().map(|m| format!(", metrics at {m}")).unwrap_or_default(),
        );
        Ok(Running { registry, workers, writer, socket, installed, accounting_was, reloader, metrics, _lock: lock })
    }

    /// One handle per queue worker, in queue order. A flow lives in exactly one of them (the
    /// others ignore commands for it); [`Running::update`] finds the right one.
    pub fn handles(&self) -> Vec<Handle> {
        self.registry.handles().to_vec()
    }

    /// Changes a live flow's verdict, from any thread, at any time (see [`Handle::update`]).
    pub fn update(&self, flow: FlowId, verdict: DataVerdict, direction: Option<Direction>) -> Result<(), String> {
        self.registry.owner(flow).update(flow, verdict, direction).map_err(|e| e.to_string())
    }

    /// The live flows `selector` matches, from every worker. `fresh`: sync with conntrack
    /// first, so kernel-handled flows' counters are current (otherwise they are as of the last
    /// periodic sync).
    pub fn list(&self, selector: &Selector, fresh: bool) -> Result<Vec<FlowStatus>, String> {
        let mut out = Vec::new();
        self.registry.list(selector, fresh, |c| {
            out.extend_from_slice(c);
            Ok(())
        })?;
        Ok(out)
    }

    /// Loads the config file again and applies its rules to every live flow, and its packet
    /// rules and packet stage coverage to every packet from now on (like SIGHUP).
    pub fn reload(&self) -> Result<usize, String> {
        self.reloader.reload()
    }

    /// Has the event writer open its log anew (the file at the configured path, or a new
    /// connection to the syslog or journald socket), as SIGUSR1 does after logrotate moved the
    /// file; it says so on stderr when done.
    pub fn reopen_log(&self) {
        self.writer.reopen.store(true, Ordering::Relaxed);
    }

    /// One handle per packet-stage queue worker, in queue order.
    pub fn packet_handles(&self) -> Vec<PacketHandle> {
        self.workers.packet_shards.iter().map(|s| s.handle.clone()).collect()
    }

    /// Stops: the chains go first, then the workers; the log is flushed; the socket and lock
    /// are removed.
    pub fn stop(self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Some(m) = self.metrics {
            m.stop();
        }
        if let Err(e) = self.installed.remove() {
            errors.push(format!("removing netfilter rules: {e}"));
        }
        if let Err(e) = self.workers.stop() {
            errors.push(e);
        }
        // A writer stuck on a reader that stopped reading must not keep the daemon from
        // stopping: it gets a few seconds, then its last events are given up (and said so).
        let done = self
            .writer
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv_timeout(Duration::from_secs(5));
        match done {
            Ok(()) => {
                if self.writer.thread.join().is_err() {
                    errors.push("the event writer panicked".into());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::error!(
                    "the event log did not take the last events within 5 s (is its reader stuck?); they are lost"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => errors.push("the event writer panicked".into()),
        }
        let _ = std::fs::remove_file(&self.socket);
        if !self.accounting_was {
            let _ = flowgate_linux::conntrack::set_accounting(false);
        }
        if errors.is_empty() {
            log::info!("stopped; rules removed");
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// The queue workers, the conntrack watcher, the link watcher, the enforcer, and their common
/// stop flag.
struct Workers {
    shards: Vec<Shard>,
    packet_shards: Vec<PacketShard>,
    watcher: Option<kernel::Watcher>,
    droplog: Option<droplog::DropLog>,
    links: Option<flowgate_linux::ifname::LinkWatch>,
    enforcer: Option<enforce::Enforcer>,
    owners: Option<owners::Attributor>,
    stop: Arc<AtomicBool>,
}

impl Workers {
    fn stop(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Release);
        let mut errors: Vec<String> = Vec::new();
        if let Some(w) = self.watcher {
            errors.extend(w.join());
        }
        if let Some(d) = self.droplog {
            errors.extend(d.join());
        }
        errors.extend(self.shards.into_iter().filter_map(|s| s.join().err()));
        // After the workers: none asks any more.
        if let Some(o) = self.owners {
            errors.extend(o.join());
        }
        errors.extend(self.packet_shards.into_iter().filter_map(|s| s.join().err()));
        if let Some(l) = self.links {
            l.join();
        }
        // The workers are gone: what they queued for the enforcer is carried out, then it ends.
        if let Some(e) = self.enforcer {
            e.finish();
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

type Started = (Workers, Writer, std::path::PathBuf, Registry, Arc<Reloader>, Option<metrics::Server>);

/// What `start` is handed besides the queues and engines: the enforcer's counters (adoption
/// counted in them already) and the metrics listener, if configured.
struct Extras {
    enforce: Arc<enforce::EnforceStats>,
    metrics: Option<metrics::Listener>,
    /// The static rules' ids, for the conntrack watcher and the drop log.
    ids: Arc<statics::Ids>,
    /// A product's flow filter judges beside the rules (only drops are then static).
    provider: bool,
    /// How flows' owners are looked up (`None`: they are not).
    owners: Option<owners::Resolver>,
}

/// The packet stage's queues, one stage per queue, and the chains as installed.
type Packets = (Vec<Queue>, Vec<PacketStage>, ChainSpec);

/// What the packet stage's chains cover, from the config.
fn packet_chains(p: &PacketConfig, queues: std::ops::RangeInclusive<u16>) -> PacketChains {
    let interfaces = p
        .covered()
        .into_iter()
        .map(|(glob, d)| PacketInterface {
            glob,
            inbound: d.contains(flowgate_core::PacketDirection::Inbound),
            outbound: d.contains(flowgate_core::PacketDirection::Outbound),
            forwarded: d.contains(flowgate_core::PacketDirection::Forwarded),
        })
        .collect();
    PacketChains { queues, interfaces }
}

fn describe_covered(i: &PacketInterface) -> String {
    let dirs: Vec<&str> = [(i.inbound, "in"), (i.outbound, "out"), (i.forwarded, "fwd")]
        .into_iter()
        .filter_map(|(on, n)| on.then_some(n))
        .collect();
    format!("{} ({})", i.glob.as_deref().unwrap_or("*"), dirs.join("/"))
}

/// One packet stage per packet queue; ids never collide across them.
fn stages(config: &Config, p: &PacketConfig, n: usize, make: Option<&PacketFilterFactory>) -> Vec<PacketStage> {
    let rules = Arc::new(p.rules.clone());
    (0..n)
        .map(|k| {
            let c = PacketStageConfig {
                filter_interfaces: p.filter_interfaces.clone(),
                filter_directions: p.filter_directions,
                max_delayed: p.max_delayed,
                max_delay: p.max_delay,
                expired_accept: p.expired_accept,
                fail_open: config.fail == FailMode::Open,
                provider_budget: config.engine.provider_budget,
                first_packet_id: k as u64 + 1,
                packet_id_step: n as u64,
            };
            let mut stage = PacketStage::new(c, rules.clone());
            if let Some(make) = make {
                let filter = make(k, stage.handle());
                stage.set_filter(filter);
            }
            stage
        })
        .collect()
}

/// Applies a changed config file to a running daemon: flow rules to every engine, packet rules
/// and the packet stage's coverage to every packet stage and to its chains.
pub(crate) struct Reloader {
    path: std::path::PathBuf,
    registry: Registry,
    packet_handles: Vec<PacketHandle>,
    /// The chains as they are now (reloads take turns on it).
    spec: std::sync::Mutex<ChainSpec>,
    ids: Arc<statics::Ids>,
    provider: bool,
}

impl Reloader {
    pub(crate) fn reload(&self) -> Result<usize, String> {
        let c = crate::config::load(&self.path).map_err(|e| e.to_string())?;
        let mut spec = self.spec.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let chains = packet_chains(&c.packet, spec.packet.queues.clone());
        let plan = statics::plan(&c.rules, c.live.kernel_rules, self.provider);
        let generation = spec.statics.generation.wrapping_add(1);
        let static_rules = statics::static_rules(&c.rules, &plan, generation, statics::LOG_GROUP);
        let rule_set = c.rules.clone();
        let rules = Arc::new(CompiledRules::compile(c.rules));
        let n = rules.rules().len();
        // Packet rules first: packets the new chains queue meet the new rules.
        let packet_rules: Arc<PacketRules> = Arc::new(c.packet.rules.clone());
        for h in &self.packet_handles {
            h.set_rules(packet_rules.clone()).map_err(|e| format!("packet stage: {e}"))?;
            h.set_filter_coverage(c.packet.filter_interfaces.clone(), c.packet.filter_directions)
                .map_err(|e| format!("packet stage: {e}"))?;
        }
        // The kernel first, so that a failure leaves everything as it was: the engines keep
        // their rules, and a family already changed is put back. (A flow the new kernel rules
        // decide in the moment before the engines take the new rules is judged by the old ones;
        // where they disagree the engine's verdict is enforced, and the re-judging below then
        // applies the new rules to it.)
        let same_statics = StaticRules { generation: spec.statics.generation, ..static_rules.clone() } == spec.statics;
        if chains != spec.packet || !same_statics {
            let new = ChainSpec { packet: chains, statics: static_rules, ..spec.clone() };
            if let Err(e) = netfilter::replace_rules(&new, &Tools::default()) {
                let back = netfilter::replace_rules(&spec, &Tools::default())
                    .err()
                    .map(|b| format!("; putting the old rules back failed too: {b}"))
                    .unwrap_or_default();
                return Err(format!("changing the netfilter rules (static rules, packet stage): {e}{back}"));
            }
            *spec = new;
        }
        self.ids.set(&rule_set, &plan);
        self.registry.reload(&rules)?;
        Ok(n)
    }
}

/// The event writer's thread, and word that it has written everything (behind a mutex so that
/// [`Running`] stays `Sync` for products that call it from many threads).
struct Writer {
    thread: std::thread::JoinHandle<()>,
    done: std::sync::Mutex<mpsc::Receiver<()>>,
    /// Set to have the writer reopen its log (SIGUSR1).
    reopen: Arc<AtomicBool>,
}

/// One engine per queue. Ids never collide across them: engine k hands out k+1, k+1+n, ...
/// `max_flows` is shared out evenly. The kernel handles settled flows, so their liveness comes
/// from conntrack.
fn engines(config: &Config, n: usize, owners: bool) -> Vec<Engine> {
    let rules = Arc::new(CompiledRules::compile(config.rules.clone()));
    (0..n)
        .map(|k| {
            let c = EngineConfig {
                first_flow_id: k as u64 + 1,
                flow_id_step: n as u64,
                kernel_offload: true,
                max_flows: config.engine.max_flows.div_ceil(n),
                owner_wait: owners.then_some(config.live.attribution_wait),
                ..config.engine.clone()
            };
            Engine::new(c, rules.clone())
        })
        .collect()
}

/// Adopts the connections open now into the engines (spread by a hash of their endpoints) and
/// carries out their verdicts, creating conntrack entries where conntrack had none. Returns how
/// many were adopted. A host whose socket tables cannot be read still starts: its connections
/// are then judged at their next packet.
fn adopt_existing(
    config: &Config,
    engines: &mut [Engine],
    clock: &Clock,
    stats: &enforce::EnforceStats,
) -> Result<usize, String> {
    let found = match adopt::find(config.live.loopback) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("cannot list existing connections ({e}); each is judged at its next packet");
            return Ok(0);
        }
    };
    let now = clock.now();
    let mut adopted = 0;
    for f in &found {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(f.local.min(f.remote), f.local.max(f.remote)), &mut h);
        let k = (std::hash::Hasher::finish(&h) % engines.len() as u64) as usize;
        let x = flowgate_core::Existing {
            protocol: f.protocol,
            local: f.local,
            remote: f.remote,
            direction: f.direction,
            forwarded: f.forwarded,
            interface: f.interface.as_deref(),
            kept: f.kept,
            conntrack_id: f.conntrack_id,
        };
        if engines[k].adopt(now, &x).is_some() {
            adopted += 1;
        }
    }
    let mut ct = flowgate_linux::conntrack::Conntrack::open().map_err(|e| format!("conntrack: {e}"))?;
    let mut diag = flowgate_linux::sockdiag::SockDiag::open().ok();
    let n = engines.len();
    for engine in engines.iter_mut() {
        while let Some(x) = engine.poll_enforce() {
            if let Err(e) = enforce::enforce(&mut ct, diag.as_mut(), &x, n, true, stats) {
                log::warn!("{e}");
            }
        }
    }
    Ok(adopted)
}

/// What the event writer counted.
#[derive(Debug, Default)]
struct WriterStats {
    written: AtomicU64,
    failed: AtomicU64,
}

fn start(
    config: &Config,
    queues: Vec<Queue>,
    engines: Vec<Engine>,
    packets: Packets,
    clock: Clock,
    group: Option<nix::unistd::Gid>,
    extras: Extras,
) -> Result<Started, String> {
    let live = &config.live;
    let sink = match &live.log {
        LogTarget::Stdout => Sink::Stdout,
        LogTarget::File(p) => Sink::File(LogFile::open(p)?),
        LogTarget::Syslog(p) => Sink::Socket(socket_log::SocketLog::new(p, socket_log::Framing::Syslog)),
        LogTarget::Journald(p) => Sink::Socket(socket_log::SocketLog::new(p, socket_log::Framing::Journald)),
    };
    let format = config.event_format;
    let reopen = Arc::new(AtomicBool::new(false));
    // Events in flight between the workers and the writer; past it, events are dropped and
    // counted (`events_dropped` in `flowgate stats`) rather than stall the packet path.
    let (tx, rx) = mpsc::sync_channel::<Event>(live.event_buffer);
    let writer_stats = Arc::new(WriterStats::default());
    let writer = {
        let stats = writer_stats.clone();
        let (done_tx, done) = mpsc::sync_channel(1);
        let flag = reopen.clone();
        let thread = std::thread::Builder::new()
            .name("flowgate-log".into())
            .spawn(move || {
                write_events(rx, sink, format, &flag, &stats);
                let _ = done_tx.send(());
            })
            .map_err(|e| format!("cannot start the event writer: {e}"))?;
        Writer { thread, done: std::sync::Mutex::new(done), reopen }
    };
    let enforce_stats = extras.enforce;
    let enforcer = enforce::Enforcer::start(queues.len(), enforce_stats.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    let link_watch = flowgate_linux::ifname::LinkWatch::start(stop.clone())
        .map_err(|e| format!("cannot watch link changes (rtnetlink): {e}"))?;
    let mut workers = Workers {
        shards: Vec::new(),
        packet_shards: Vec::new(),
        watcher: None,
        droplog: None,
        links: None,
        enforcer: Some(enforcer),
        owners: None,
        stop: stop.clone(),
    };
    let changes = link_watch.changes();
    workers.links = Some(link_watch);
    let owner_stats = Arc::new(owners::OwnerStats::default());
    let (owner_tx, owner_rx) = mpsc::sync_channel::<owners::Question>(owners::QUEUE);
    let resolver = extras.owners;
    for (index, (queue, engine)) in queues.into_iter().zip(engines).enumerate() {
        let Some(enforce) = workers.enforcer.as_ref().map(|e| e.tx.clone()) else { break };
        let links = Links {
            index,
            clock,
            events: tx.clone(),
            enforce,
            stop: stop.clone(),
            fail_open: config.fail == FailMode::Open,
            link_changes: changes.clone(),
            owners: resolver.is_some().then(|| owners::Links { tx: owner_tx.clone(), stats: owner_stats.clone() }),
        };
        match Shard::start(queue, engine, links) {
            Ok(shard) => workers.shards.push(shard),
            Err(e) => {
                let _ = workers.stop();
                return Err(format!("cannot start a queue worker: {e}"));
            }
        }
    }
    drop(tx);
    let (packet_queues, stages, spec) = packets;
    for (queue, stage) in packet_queues.into_iter().zip(stages) {
        let links = PacketLinks {
            clock,
            stop: stop.clone(),
            fail_open: config.fail == FailMode::Open,
            link_changes: changes.clone(),
        };
        match PacketShard::start(queue, stage, links) {
            Ok(shard) => workers.packet_shards.push(shard),
            Err(e) => {
                let _ = workers.stop();
                return Err(format!("cannot start a packet queue worker: {e}"));
            }
        }
    }
    let handles: Vec<_> = workers.shards.iter().map(|s| s.handle.clone()).collect();
    drop(owner_tx);
    if let Some(r) = resolver {
        match owners::Attributor::start(r, owner_rx, handles.clone(), owner_stats.clone(), stop.clone()) {
            Ok(a) => workers.owners = Some(a),
            Err(e) => {
                let _ = workers.stop();
                return Err(format!("cannot start the owner lookup thread: {e}"));
            }
        }
    }
    let watcher = match kernel::Watcher::start(
        handles.clone(),
        clock,
        config.engine.kernel_sync_interval,
        stop.clone(),
        extras.ids.clone(),
    ) {
        Ok(w) => w,
        Err(e) => {
            let _ = workers.stop();
            return Err(e);
        }
    };
    workers.droplog = match droplog::DropLog::start(handles.clone(), stop, changes.clone()) {
        Ok(d) => Some(d),
        Err(e) => {
            workers.watcher = Some(watcher);
            let _ = workers.stop();
            return Err(e);
        }
    };
    let registry = Registry::new(handles, Some(watcher.syncer()));
    let worker_stats: Vec<_> = workers.shards.iter().map(|s| s.stats.clone()).collect();
    let kernel_stats = watcher.stats.clone();
    workers.watcher = Some(watcher);
    let drop_log_stats = workers.droplog.as_ref().map(|d| d.stats.clone()).unwrap_or_default();
    let packet_stats: Vec<_> = workers.packet_shards.iter().map(|s| s.stats.clone()).collect();
    let queues = live.first_queue..=spec.packet.queues.end().to_owned().max(live.first_queue + (live.queues - 1));
    let flow_queues = live.first_queue..=live.first_queue + (live.queues - 1);
    let fail_open = config.fail == FailMode::Open;
    let tools = Tools::default();
    let stats = move || {
        // The kernel's counts before the workers': a packet the kernel counted as queued is
        // then already among the packets the workers read, or still waiting, so the bypass
        // estimate errs low, never high.
        let rules = netfilter::queue_rule_counters(&tools);
        let kernel_queues: Vec<_> = flowgate_linux::nfqueue::kernel_stats()
            .unwrap_or_default()
            .into_iter()
            .filter(|q| queues.contains(&q.queue))
            .collect();
        let per_worker: Vec<shard::WorkerStats> =
            worker_stats.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()).collect();
        let mut v = stats_json(&per_worker, &kernel_stats, &writer_stats);
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let d = &drop_log_stats;
        v["drop_log"] = json!({"logged": r(&d.logged), "dropped": r(&d.dropped), "overruns": r(&d.overruns)});
        v["owners"] = serde_json::to_value(&*owner_stats).unwrap_or(Value::Null);
        let per_packet: Vec<PacketWorkerStats> =
            packet_stats.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()).collect();
        v["packet_stage"] = packet_stats_json(&per_packet);
        // What the kernel counts for our queues.
        let stage = |q: u16| if flow_queues.contains(&q) { "flow" } else { "packet" };
        let kq: Vec<Value> = kernel_queues
            .iter()
            .map(|q| json!({"queue": q.queue, "stage": stage(q.queue), "waiting": q.waiting, "dropped": q.dropped, "user_dropped": q.user_dropped}))
            .collect();
        v["kernel_queues"] = json!(kq);
        v["enforce"] = enforce_stats.json();
        v["fail"] = json!(if fail_open { "open" } else { "closed" });
        let queued = match &rules {
            Ok(rules) => {
                v["queue_rules"] = queue_rules_json(rules);
                Some(rules.iter().filter(|r| r.table == "filter").map(|r| r.packets).sum())
            }
            Err(e) => {
                v["queue_rules_error"] = json!(e.to_string());
                None
            }
        };
        let flow_kernel = kernel_queues.iter().filter(|q| flow_queues.contains(&q.queue));
        let (waiting, dropped) = flow_kernel.fold((0, 0), |(w, d), q| (w + q.waiting, d + q.dropped + q.user_dropped));
        let received = per_worker.iter().map(|w| w.engine.packets).sum();
        let held = per_worker.iter().map(|w| w.footprint.held_packets as u64).sum();
        v["bypass"] = json!({"flow": bypass_json(fail_open, queued, received, waiting, held, dropped)});
        v
    };
    let stats: Arc<metrics::StatsFn> = Arc::new(stats);
    let reloader = Arc::new(Reloader {
        path: config.path.clone(),
        registry: registry.clone(),
        packet_handles: workers.packet_shards.iter().map(|s| s.handle.clone()).collect(),
        spec: std::sync::Mutex::new(spec),
        ids: extras.ids.clone(),
        provider: extras.provider,
    });
    let ctx = control::Context {
        registry: registry.clone(),
        clock,
        reloader: reloader.clone(),
        stats: Box::new({
            let stats = stats.clone();
            move || stats()
        }),
        group,
    };
    let metrics = match extras.metrics.map(|l| metrics::serve(l, stats)).transpose() {
        Ok(m) => m,
        Err(e) => {
            let _ = workers.stop();
            return Err(e);
        }
    };
    let socket = match control::serve(&live.run_dir, ctx) {
        Ok(p) => p,
        Err(e) => {
            if let Some(m) = metrics {
                m.stop();
            }
            let _ = workers.stop();
            return Err(e);
        }
    };
    Ok((workers, writer, socket, registry, reloader, metrics))
}

/// The counters of flowgate's NFQUEUE rules, summed per stage (filter table: the flow stage;
/// mangle: the packet stage) and address family.
fn queue_rules_json(rules: &[netfilter::QueueRuleCounter]) -> Value {
    let mut out: Vec<(&str, &str, u64, u64)> = Vec::new();
    for r in rules {
        let stage = if r.table == "filter" { "flow" } else { "packet" };
        let family = match r.family {
            netfilter::Family::Ipv4 => "ipv4",
            netfilter::Family::Ipv6 => "ipv6",
        };
        match out.iter_mut().find(|(s, f, _, _)| *s == stage && *f == family) {
            Some((_, _, p, b)) => {
                *p += r.packets;
                *b += r.bytes;
            }
            None => out.push((stage, family, r.packets, r.bytes)),
        }
    }
    out.into_iter()
        .map(|(stage, family, packets, bytes)| json!({"stage": stage, "family": family, "packets": packets, "bytes": bytes}))
        .collect()
}

/// What the flow stage's NFQUEUE rules matched against what became of it: read by the workers,
/// still waiting in the kernel (less the packets the engines hold, which they read already),
/// dropped by the kernel (fail closed). What is left passed unjudged (`bypassed`; fail open
/// only): the kernel counts such packets nowhere else. `queued` is `None` when the rules'
/// counters could not be read.
fn bypass_json(fail_open: bool, queued: Option<u64>, received: u64, waiting: u64, held: u64, dropped: u64) -> Value {
    let accounted = received + waiting.saturating_sub(held) + dropped;
    let bypassed = queued.filter(|_| fail_open).map(|q| q.saturating_sub(accounted));
    json!({"queued": queued, "received": received, "waiting": waiting, "held": held, "dropped": dropped, "bypassed": bypassed})
}

/// The packet stage's counters: per worker, totals, and per interface and per rule summed over
/// the workers.
fn packet_stats_json(workers: &[PacketWorkerStats]) -> Value {
    let mut total = serde_json::Map::new();
    let mut interfaces: Vec<(String, &'static str, [u64; 4])> = Vec::new();
    let mut rules: Vec<(String, &'static str, [u64; 2])> = Vec::new();
    let mut per = Vec::new();
    for w in workers {
        let v = json!({"queue": w.queue, "commands_refused": w.commands_refused});
        let mut v = v.as_object().cloned().unwrap_or_default();
        if let Some(stage) = serde_json::to_value(w.stage).ok().and_then(|s| s.as_object().cloned()) {
            for (key, val) in stage {
                if let Some(n) = val.as_u64() {
                    let sum = total.get(&key).and_then(Value::as_u64).unwrap_or(0) + n;
                    total.insert(key.clone(), json!(sum));
                }
                v.insert(key, val);
            }
        }
        per.push(Value::Object(v));
        for i in &w.interfaces {
            let c = [i.counters.packets, i.counters.bytes, i.counters.dropped, i.counters.delayed];
            match interfaces.iter_mut().find(|(n, d, _)| **n == *i.name && *d == i.direction.name()) {
                Some((_, _, have)) => have.iter_mut().zip(c).for_each(|(h, x)| *h += x),
                None => interfaces.push((i.name.to_string(), i.direction.name(), c)),
            }
        }
        for r in &w.rules {
            match rules.iter_mut().find(|(n, _, _)| **n == *r.name) {
                Some((_, _, have)) => {
                    have[0] += r.packets;
                    have[1] += r.bytes;
                }
                None => rules.push((r.name.to_string(), r.action, [r.packets, r.bytes])),
            }
        }
    }
    let interfaces: Vec<Value> = interfaces
        .into_iter()
        .map(|(name, direction, c)| {
            json!({"name": name, "direction": direction, "packets": c[0], "bytes": c[1], "dropped": c[2], "delayed": c[3]})
        })
        .collect();
    let rules: Vec<Value> = rules
        .into_iter()
        .map(|(name, action, c)| json!({"name": name, "action": action, "packets": c[0], "bytes": c[1]}))
        .collect();
    json!({"workers": per, "total": total, "interfaces": interfaces, "rules": rules})
}

/// The daemon's counters: per worker, their total, the kernel watcher's and the writer's.
fn stats_json(workers: &[shard::WorkerStats], k: &kernel::KernelStats, w: &WriterStats) -> Value {
    let per: Vec<Value> = workers.iter().map(|s| serde_json::to_value(s).unwrap_or(Value::Null)).collect();
    // Every counter of the workers, summed (the queue number is not a counter).
    let mut total = serde_json::Map::new();
    for v in &per {
        for (key, val) in v.as_object().into_iter().flatten() {
            if let (Some(n), true) = (val.as_u64(), key != "queue") {
                let sum = total.get(key).and_then(Value::as_u64).unwrap_or(0) + n;
                total.insert(key.clone(), json!(sum));
            }
        }
    }
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let counts = tally::Counts::sum(workers.iter().map(|w| &w.counts));
    json!({
        "workers": per,
        "total": total,
        "verdicts": counts.verdicts,
        "updates": counts.updates,
        "closed": counts.closed,
        "latency": counts.latency.summary(),
        "conntrack": {
            "reports": r(&k.reports),
            "reports_dropped": r(&k.reports_dropped),
            "event_overruns": r(&k.event_overruns),
            "syncs": r(&k.syncs),
            "last_sync_ms": r(&k.last_sync_us) as f64 / 1000.0,
            "last_sync_entries": r(&k.last_sync_entries),
        },
        "events": {"written": r(&w.written), "write_failures": r(&w.failed)},
    })
}

/// The event log file, reopened when the path no longer leads to it (deleted or moved away, or
/// its directory removed): a removed log is created again as soon as that is possible, so
/// writing resumes when the sink recovers.
struct LogFile {
    path: std::path::PathBuf,
    file: BufWriter<std::fs::File>,
    /// (device, inode) of the open file.
    id: (u64, u64),
    checked: StdInstant,
}

impl LogFile {
    fn open(path: &Path) -> Result<LogFile, String> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: cannot open log: {e}", path.display()))?;
        let m = f.metadata().map_err(|e| format!("{}: cannot stat log: {e}", path.display()))?;
        use std::os::unix::fs::MetadataExt;
        Ok(LogFile {
            path: path.to_path_buf(),
            file: BufWriter::new(f),
            id: (m.dev(), m.ino()),
            checked: StdInstant::now(),
        })
    }

    /// At most once a second: if the path leads elsewhere or nowhere, opens it anew.
    fn follow_path(&mut self) -> std::io::Result<()> {
        if self.checked.elapsed() < Duration::from_secs(1) {
            return Ok(());
        }
        self.checked = StdInstant::now();
        use std::os::unix::fs::MetadataExt;
        let same = std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if !same {
            let _ = self.file.flush();
            *self = LogFile::open(&self.path).map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

/// Where events go.
enum Sink {
    Stdout,
    File(LogFile),
    /// syslog or journald: one datagram per record.
    Socket(socket_log::SocketLog),
}

/// How often the writer, while no event comes, looks whether it was asked to reopen its log.
const REOPEN_CHECK: Duration = Duration::from_millis(200);

/// Writes events in `format`, flushing whenever the channel runs dry so a reader sees each
/// event promptly. A write that fails loses that event (counted, and said at most every ten
/// seconds) and writing goes on: the log must never stop the filter. A log file whose path no
/// longer leads to it is opened anew (see [`LogFile`]); `reopen` (SIGUSR1) opens it anew at
/// once, or reconnects a syslog or journald socket. Ends when every worker has dropped its
/// sender.
fn write_events(
    rx: mpsc::Receiver<Event>,
    mut sink: Sink,
    format: flowgate_core::EventFormat,
    reopen: &AtomicBool,
    stats: &WriterStats,
) {
    let mut stdout = BufWriter::new(std::io::stdout());
    let mut said: Option<StdInstant> = None;
    let mut failed = |e: std::io::Error, stats: &WriterStats| {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            log::warn!(
                "writing events failed ({e}); {} events lost so far, filtering goes on",
                stats.failed.load(Ordering::Relaxed)
            );
            said = Some(StdInstant::now());
        }
    };
    // The records of one event; reused.
    let mut buf = Vec::with_capacity(4096);
    loop {
        let first = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if reopen.swap(false, Ordering::Relaxed) {
            match &mut sink {
                Sink::Stdout => log::info!("SIGUSR1: events go to stdout, nothing to reopen"),
                Sink::File(f) => {
                    let _ = f.file.flush();
                    match LogFile::open(&f.path) {
                        Ok(new) => {
                            *f = new;
                            log::info!("SIGUSR1: reopened the event log {}", f.path.display());
                        }
                        Err(e) => failed(std::io::Error::other(e), stats),
                    }
                }
                Sink::Socket(s) => {
                    s.reopen();
                    log::info!("SIGUSR1: reconnecting to the log socket {}", s.path().display());
                }
            }
        }
        let Some(first) = first else { continue };
        if let Sink::File(f) = &mut sink
            && let Err(err) = f.follow_path()
        {
            failed(err, stats);
        }
        for e in std::iter::once(first).chain(rx.try_iter()) {
            buf.clear();
            if let Err(err) = format.write(&e, &mut buf) {
                failed(
                    std::io::Error::other(format!("event {} of flow {}: {err}", e.kind.name(), e.kind.flow().id)),
                    stats,
                );
                continue;
            }
            let written = match &mut sink {
                Sink::Stdout => stdout.write_all(&buf),
                Sink::File(f) => f.file.write_all(&buf),
                Sink::Socket(s) => {
                    buf.split(|&b| b == b'\n').filter(|r| !r.is_empty()).try_for_each(|record| s.send(record, &e))
                }
            };
            match written {
                Ok(()) => {
                    stats.written.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => failed(err, stats),
            }
        }
        if let Err(err) = flush(&mut sink, &mut stdout) {
            failed(err, stats);
        }
        // Let the next events gather: one wake-up and one write per few milliseconds rather
        // than per flow (on a busy host each costs CPU the connections are waiting for); the
        // channel holds what comes meanwhile.
        std::thread::sleep(GATHER);
    }
    if let Err(err) = flush(&mut sink, &mut stdout) {
        failed(err, stats);
    }
}

/// How long the threads off the packet path (the conntrack event thread, the drop log, the
/// writer) let work gather after handling a batch: the most an item waits beyond its turn.
pub(crate) const GATHER: Duration = Duration::from_millis(2);

fn flush(sink: &mut Sink, stdout: &mut BufWriter<std::io::Stdout>) -> std::io::Result<()> {
    match sink {
        Sink::Stdout => stdout.flush(),
        Sink::File(f) => f.file.flush(),
        Sink::Socket(_) => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_sum_the_workers_tallies_and_render_as_metrics() {
        let mut a = shard::WorkerStats { queue: 0, ..Default::default() };
        a.engine.packets = 10;
        a.engine.flows_opened = 3;
        a.footprint.flows = 2;
        a.queue_overruns = 1;
        a.counts.verdicts.push(tally::RuleVerdicts { rule: "no-7".into(), allow: 0, drop: 2, inspect: 0, pause: 0 });
        a.counts.latency.record(Duration::from_micros(20));
        let mut b = shard::WorkerStats { queue: 1, ..Default::default() };
        b.engine.packets = 5;
        b.counts.verdicts.push(tally::RuleVerdicts { rule: "no-7".into(), allow: 0, drop: 1, inspect: 0, pause: 0 });
        b.counts.closed.fin = 4;
        b.counts.latency.record(Duration::from_micros(400));
        let k = kernel::KernelStats::default();
        k.syncs.store(3, Ordering::Relaxed);
        let w = WriterStats::default();
        w.written.store(9, Ordering::Relaxed);
        let s = stats_json(&[a, b], &k, &w);
        assert_eq!(s["total"]["packets"], 15);
        assert_eq!(s["verdicts"][0]["drop"], 3, "{s}");
        assert_eq!((s["latency"]["count"].as_u64(), s["latency"]["p99_us"].as_f64()), (Some(2), Some(500.0)));
        let text = metrics::render(&s);
        for line in [
            "flowgate_flows_judged_total{verdict=\"drop\",rule=\"no-7\"} 3",
            "flowgate_flows_live 2",
            "flowgate_flows_opened_total 3",
            "flowgate_flows_closed_total{reason=\"fin\"} 4",
            "flowgate_queue_packets_total{stage=\"flow\",queue=\"0\"} 10",
            "flowgate_queue_socket_overruns_total{queue=\"0\"} 1",
            "flowgate_verdict_latency_seconds_count 2",
            "flowgate_verdict_latency_seconds_bucket{le=\"0.000025\"} 1",
            "flowgate_conntrack_syncs_total 3",
            "flowgate_events_written_total 9",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
        }
    }

    #[test]
    fn what_was_queued_and_not_received_waiting_or_dropped_passed_a_fail_open_queue() {
        // 100 queued, 70 read (2 of them held: still counted as waiting by the kernel), 12
        // waiting: 20 passed unjudged.
        let v = bypass_json(true, Some(100), 70, 12, 2, 0);
        assert_eq!(v["bypassed"], 20);
        // Failing closed, what the kernel did not deliver it dropped and counted.
        assert_eq!(bypass_json(false, Some(100), 70, 12, 2, 20)["bypassed"], Value::Null);
        // Counters read a moment apart never make it negative.
        assert_eq!(bypass_json(true, Some(10), 12, 0, 0, 0)["bypassed"], 0);
        assert_eq!(bypass_json(true, None, 12, 0, 0, 0)["bypassed"], Value::Null, "no counters, no estimate");
    }
}
