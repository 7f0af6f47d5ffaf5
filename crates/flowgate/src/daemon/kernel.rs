//! What the kernel knows about flows it handles alone: conntrack, turned into engine reports and
//! sent to the engine that owns each flow.
//!
//! Once a flow is settled its packets no longer reach user space, so its life is read from
//! conntrack. Two threads do it, each with its own netlink socket:
//!
//! - **events** (`flowgate-ct-events`): conntrack's new and destroy events. An entry's creation
//!   tells its owner the entry's id (and, for a flow a static rule decided, that the flow exists);
//!   a destroy is its end. Update events are not subscribed to: the kernel would build one for
//!   every TCP state change of every connection, on the connection's own packet path (about
//!   10 us per connection measured here); TCP reaching TIME_WAIT or CLOSE (the connection's FIN
//!   or RST) is read from the next sync's dump instead. Only entries whose mark names an owner (see
//!   [`flowgate_linux::marks`]) are passed on, to that owner alone. A full command channel or a
//!   socket overrun (ENOBUFS) loses reports: both are counted and make the next sync come at once.
//! - **sync** (`flowgate-ct-sync`, at a lower priority than the queue workers): every `interval`
//!   (or ten times as long as the last sync took, if that is longer: at a million entries a sync
//!   takes a couple of seconds), and whenever [`Syncer::sync`] asks, a dump of the whole table, framed by [`KernelSync`] start and done, with every owned entry's counters
//!   sent to its owner. Syncs refresh counters (a kernel-handled flow's activity), catch ends that
//!   were never reported (two syncs that miss a flow close it) and tell idle flows from busy ones.
//!
//! Reports go through the engines' bounded command channels: the event thread never waits (a
//! report it cannot hand over is counted and the sync repairs it), the sync thread waits for room.
//! This room owns the conntrack sockets it opens.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use flowgate_core::{CloseReason, Handle, KernelDecided, KernelReport, KernelState, KernelSync, Protocol};
use flowgate_linux::conntrack::{Conntrack, Entry, EventKind};
use flowgate_linux::marks;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::clock::Clock;
use super::statics::{self, Ids};

/// Reports per command sent to an engine.
const BATCH: usize = flowgate_core::KERNEL_BATCH;
/// How long the sync thread waits for room in an engine's command channel before giving up on
/// a batch (an engine that busy is stuck; the next sync tries again).
const SYNC_WAIT: Duration = Duration::from_secs(10);

// `enum tcp_conntrack` of nf_conntrack_tcp.h.
const TCP_TIME_WAIT: u8 = 7;
const TCP_CLOSE: u8 = 8;

/// Counters of what the kernel watcher saw and lost.
#[derive(Debug, Default)]
pub(crate) struct KernelStats {
    /// Reports passed to engines.
    pub(crate) reports: AtomicU64,
    /// Reports an engine's full channel could not take.
    pub(crate) reports_dropped: AtomicU64,
    /// Times the event socket overran (ENOBUFS): an unknown number of events was lost each time.
    pub(crate) event_overruns: AtomicU64,
    /// Syncs done, and the duration of the last one.
    pub(crate) syncs: AtomicU64,
    pub(crate) last_sync_us: AtomicU64,
    /// Entries in the last dump.
    pub(crate) last_sync_entries: AtomicU64,
}

/// Converts a conntrack entry into the engine's terms.
pub(crate) fn report(e: &Entry, state: KernelState) -> KernelReport {
    let o = &e.original;
    let protocol = match o.protocol {
        6 => Protocol::Tcp,
        17 => Protocol::Udp,
        1 | 58 => Protocol::Icmp,
        n => Protocol::Other(n),
    };
    let counts = |c: Option<flowgate_linux::conntrack::Counter>| c.map(|c| (c.packets, c.bytes));
    KernelReport {
        protocol,
        opener: SocketAddr::new(o.src, o.src_port),
        responder: SocketAddr::new(o.dst, o.dst_port),
        from_opener: counts(e.counters_original),
        from_responder: counts(e.counters_reply),
        id: e.id,
        state,
        decided: None,
    }
}

/// The state an entry reports: a TCP connection that has seen both FINs or a RST is closing.
fn live_state(e: &Entry) -> KernelState {
    match e.tcp_state {
        Some(TCP_TIME_WAIT) => KernelState::Closing(CloseReason::Fin),
        Some(TCP_CLOSE) => KernelState::Closing(CloseReason::Rst),
        _ => KernelState::Alive,
    }
}

/// The engine that hears of an entry: the owner its mark names, or, for a flow a static rule
/// decided in the kernel (no owner, a rule id), the one its 5-tuple hashes to, with what the
/// kernel says of where it was decided.
fn route(e: &Entry, engines: usize, ids: &[Option<KernelDecided>]) -> Option<(usize, Option<KernelDecided>)> {
    if let Some(k) = marks::owner_of(e.mark).filter(|&k| k < engines) {
        return Some((k, None));
    }
    let id = marks::rule_of(e.mark)?;
    let decided = ids.get(usize::from(id)).cloned().flatten();
    let o = &e.original;
    Some((statics::engine_for(o.protocol, o.src, o.src_port, o.dst, o.dst_port, engines), decided))
}

/// The running watcher: its two threads and the way to ask for a sync.
pub(crate) struct Watcher {
    events: JoinHandle<Result<(), String>>,
    sync: JoinHandle<Result<(), String>>,
    requests: Sender<SyncSender<()>>,
    pub(crate) stats: Arc<KernelStats>,
}

/// Asks the sync thread for a sync and waits for it.
#[derive(Clone)]
pub(crate) struct Syncer {
    requests: Sender<SyncSender<()>>,
}

impl Syncer {
    /// Runs a sync that starts after this call and waits up to `wait` for it to end. When it
    /// returns `true`, every engine has the reports of that sync ahead of any command sent now.
    pub(crate) fn sync(&self, wait: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.requests.send(tx).is_ok() && rx.recv_timeout(wait).is_ok()
    }
}

impl Watcher {
    /// Starts both threads. `interval`: time between syncs.
    pub(crate) fn start(
        handles: Vec<Handle>,
        clock: Clock,
        interval: Duration,
        stop: Arc<AtomicBool>,
        ids: Arc<Ids>,
    ) -> Result<Watcher, String> {
        let stats = Arc::new(KernelStats::default());
        // New and destroy only: the kernel builds no update event for a group no one listens to,
        // and a TCP connection has half a dozen of them (every state change), each built and sent
        // on the connection's own packet path. A connection's FIN or RST is read from the next
        // sync's dump instead.
        let events = Conntrack::open_events(true, false, true).map_err(|e| format!("conntrack events: {e}"))?;
        let dumper = Conntrack::open().map_err(|e| format!("conntrack: {e}"))?;
        let (requests, incoming) = std::sync::mpsc::channel::<SyncSender<()>>();
        let urgent = Arc::new(AtomicBool::new(false));
        let events = {
            let (handles, stats, stop, urgent, ids) =
                (handles.clone(), stats.clone(), stop.clone(), urgent.clone(), ids.clone());
            std::thread::Builder::new()
                .name("flowgate-ct-events".into())
                .spawn(move || watch_events(events, &handles, &stats, &stop, &urgent, &ids))
                .map_err(|e| format!("cannot start the conntrack event thread: {e}"))?
        };
        let sync = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("flowgate-ct-sync".into())
                .spawn(move || {
                    super::background();
                    let mut s = Sync { ct: dumper, handles, clock, stats, generation: 0, ids };
                    s.run(&incoming, interval, &stop, &urgent)
                })
                .map_err(|e| format!("cannot start the conntrack sync thread: {e}"))?
        };
        Ok(Watcher { events, sync, requests, stats })
    }

    pub(crate) fn syncer(&self) -> Syncer {
        Syncer { requests: self.requests.clone() }
    }

    /// Waits for both threads (after the stop flag was set).
    pub(crate) fn join(self) -> Vec<String> {
        drop(self.requests);
        let mut errors = Vec::new();
        for (name, t) in [("event", self.events), ("sync", self.sync)] {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push(format!("the conntrack {name} thread panicked")),
            }
        }
        errors
    }
}

fn watch_events(
    mut ct: Conntrack,
    handles: &[Handle],
    stats: &KernelStats,
    stop: &AtomicBool,
    urgent: &AtomicBool,
    ids: &Ids,
) -> Result<(), String> {
    let mut batches: Vec<Vec<KernelReport>> = vec![Vec::new(); handles.len()];
    let mut overruns = 0;
    while !stop.load(Ordering::Acquire) {
        // Bounded wait so a stop request is seen within a quarter second.
        let mut fds = [PollFd::new(ct.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(250u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("conntrack events: poll: {e}")),
        }
        // Drain what is there (a bound, so the stop flag is seen), then hand each owner its
        // reports, a batch per command.
        let table = ids.current();
        for _ in 0..DRAIN {
            let n = ct
                .recv_events(|ev| {
                    let Some((k, decided)) = route(&ev.entry, handles.len(), &table) else { return };
                    let state = match ev.kind {
                        EventKind::Destroy => KernelState::Ended,
                        EventKind::New => match live_state(&ev.entry) {
                            KernelState::Alive => KernelState::Created,
                            s => s,
                        },
                        // Not subscribed to (see the module documentation); were one to come, it
                        // would matter only when TCP starts closing.
                        EventKind::Update => match live_state(&ev.entry) {
                            KernelState::Alive => return,
                            s => s,
                        },
                    };
                    batches[k].push(KernelReport { decided, ..report(&ev.entry, state) });
                })
                .map_err(|e| format!("conntrack events: {e}"))?;
            if n == 0 {
                break;
            }
        }
        for (h, batch) in handles.iter().zip(batches.iter_mut()) {
            for part in std::mem::take(batch).chunks(BATCH) {
                let n = part.len() as u64;
                match h.kernel_reports(part.to_vec(), Duration::ZERO) {
                    Ok(()) => {
                        stats.reports.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) => {
                        stats.reports_dropped.fetch_add(n, Ordering::Relaxed);
                        urgent.store(true, Ordering::Release);
                    }
                }
            }
        }
        if ct.overruns() != overruns {
            stats.event_overruns.fetch_add(ct.overruns() - overruns, Ordering::Relaxed);
            overruns = ct.overruns();
            urgent.store(true, Ordering::Release);
        }
        // Let the next events gather: one wake-up of this thread, of each engine and of the
        // writer per GATHER instead of per connection (each costs microseconds of CPU that,
        // on a busy host, the connections themselves are waiting for). The socket's buffer
        // holds what comes meanwhile.
        std::thread::sleep(super::GATHER);
    }
    Ok(())
}

/// Most datagrams (one event each) the event thread reads per wake-up: with [`super::GATHER`],
/// about 2 million events a second at most, far beyond what a host's connections make.
const DRAIN: usize = 4096;

struct Sync {
    ct: Conntrack,
    handles: Vec<Handle>,
    clock: Clock,
    stats: Arc<KernelStats>,
    generation: u16,
    ids: Arc<Ids>,
}

impl Sync {
    fn run(
        &mut self,
        requests: &Receiver<SyncSender<()>>,
        interval: Duration,
        stop: &AtomicBool,
        urgent: &AtomicBool,
    ) -> Result<(), String> {
        let mut next = StdInstant::now() + interval;
        while !stop.load(Ordering::Acquire) {
            let wait = next.saturating_duration_since(StdInstant::now()).min(Duration::from_millis(250));
            let mut waiting = Vec::new();
            match requests.recv_timeout(wait) {
                Ok(r) => waiting.push(r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            // Requests that arrive during a sync wait for the next one: they must see what
            // happened after they asked.
            waiting.extend(requests.try_iter());
            let due = StdInstant::now() >= next || urgent.swap(false, Ordering::AcqRel);
            if waiting.is_empty() && !due {
                continue;
            }
            let began = StdInstant::now();
            match self.sync_once() {
                Ok(()) => log::debug!("conntrack sync took {:.1} ms", began.elapsed().as_secs_f64() * 1e3),
                // A failed dump is retried at the next interval; the engines keep their flows.
                Err(e) => log::warn!("conntrack sync: {e}"),
            }
            for w in waiting {
                let _ = w.try_send(());
            }
            // A huge table makes a sync long: never spend more than a tenth of the time on it.
            next = StdInstant::now() + interval.max(began.elapsed() * 10);
        }
        Ok(())
    }

    fn sync_once(&mut self) -> Result<(), String> {
        let t0 = StdInstant::now();
        self.generation = self.generation.wrapping_add(1).max(1);
        let generation = self.generation;
        let at = self.clock.now();
        for h in &self.handles {
            let _ = h.kernel_sync(KernelSync::Start { generation, at }, SYNC_WAIT);
        }
        let n = self.handles.len();
        let mut batches: Vec<Vec<KernelReport>> = vec![Vec::new(); n];
        let mut entries = 0u64;
        let handles = &self.handles;
        let stats = &self.stats;
        let send = |k: usize, batch: &mut Vec<KernelReport>| {
            let len = batch.len() as u64;
            match handles[k].kernel_reports(std::mem::replace(batch, Vec::with_capacity(BATCH)), SYNC_WAIT) {
                Ok(()) => stats.reports.fetch_add(len, Ordering::Relaxed),
                Err(_) => stats.reports_dropped.fetch_add(len, Ordering::Relaxed),
            };
        };
        let table = self.ids.current();
        let dumped = self.ct.dump(|e| {
            entries += 1;
            let Some((k, decided)) = route(e, n, &table) else { return };
            batches[k].push(KernelReport { decided, ..report(e, live_state(e)) });
            if batches[k].len() >= BATCH {
                send(k, &mut batches[k]);
            }
        });
        for (k, batch) in batches.iter_mut().enumerate() {
            if !batch.is_empty() {
                send(k, batch);
            }
        }
        // A dump that failed half way must not count as a sync that saw every flow.
        dumped.map_err(|e| format!("dump: {e}"))?;
        for h in &self.handles {
            let _ = h.kernel_sync(KernelSync::Done { generation }, SYNC_WAIT);
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.stats.last_sync_us.store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.stats.last_sync_entries.store(entries, Ordering::Relaxed);
        Ok(())
    }
}
