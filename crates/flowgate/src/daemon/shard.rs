//! One queue's worker: a thread that owns one NFQUEUE queue and one engine.
//!
//! The kernel balances new flows over queues by a hash of their addresses, so both directions of
//! a flow reach the same worker, and a flow whose conntrack mark names an owner goes to that
//! owner's queue: no flow state is shared between workers, and nothing on the per-packet path
//! takes a lock another queue could hold. A worker waits in `poll(2)` on its queue's socket and
//! an eventfd (rung by [`flowgate_core::Handle`] commands and by shutdown), drains the socket,
//! answers every packet in one batched send, runs the engine's timers and sweeps, and hands
//! events to the writer and verdicts to the enforcer.
//!
//! Both hand-offs are bounded and never block the packet path: an event the writer's full
//! channel cannot take is dropped and counted (`events_dropped`); a verdict the enforcer's full
//! channel cannot take waits in the engine (one per flow) and is offered again a millisecond
//! later. After each wake-up the worker publishes its counters for `flowgate stats` and the
//! metrics, with its own tally (see [`super::tally`]): how long each packet answered in that
//! wake-up waited between its receipt and the send of its verdict, and what the events it
//! handed off say. This room touches its queue, its eventfd, and the channels it was given.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use flowgate_core::{
    Decision, Enforce, Engine, Event, Footprint, Handle, Origin, PacketAction, PacketId, PacketMeta, Stats,
};
use flowgate_linux::ifname::IfNames;
use flowgate_linux::marks;
use flowgate_linux::nfqueue::{Mark, Queue, Verdict};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde::Serialize;

use super::clock::Clock;
use super::tally::{Counts, Tally};

/// How long a stopping worker waits for the event writer to take its last events.
const LAST_EVENTS_WAIT: Duration = Duration::from_secs(2);

/// Netfilter hook numbers as NFQUEUE reports them.
const HOOK_LOCAL_IN: u8 = 1;
const HOOK_FORWARD: u8 = 2;
const HOOK_LOCAL_OUT: u8 = 3;

/// Where a packet seen at netfilter hook `hook` was, and the index of the interface that names
/// its flow: the one it leaves by (output), else the one it came in on.
pub(crate) fn origin_of(hook: u8, indev: Option<u32>, outdev: Option<u32>) -> (Origin, Option<u32>) {
    match hook {
        HOOK_LOCAL_OUT => (Origin::Output, outdev),
        HOOK_LOCAL_IN => (Origin::Input, indev),
        HOOK_FORWARD => (Origin::Forward, indev),
        _ => (Origin::Unknown, indev.or(outdev)),
    }
}

/// Most datagrams read per wake-up before timers and commands get a turn.
const RECV_ROUNDS: usize = 64;

/// What a worker tells the kernel for one decision; `None` while the packet is held.
///
/// A settled flow's decision goes on the packet mark with `NF_REPEAT`: the packet goes round
/// flowgate's chain again, whose first rule copies the mark to the conntrack mark, and the rest
/// of the flow is handled there. Repeating (not accepting) matters twice over: kernels without
/// `CONFIG_NETFILTER_NETLINK_GLUE_CT` (like this project's CI) cannot set the conntrack mark from
/// a verdict, and an `NF_ACCEPT` would skip the host's own filter rules after flowgate's chain.
/// The mark also names this worker as the flow's `owner`. The packet's other mark bits
/// (`current_mark`; VPN clients route by them) are kept.
pub(crate) fn verdict_for(d: &Decision, current_mark: u32, owner: u32) -> Option<(Verdict, Option<Mark>)> {
    let mark = |bits| Some(Mark::keeping(current_mark, bits | owner, marks::MASK));
    match d.action {
        PacketAction::Accept if d.settled => Some((Verdict::Repeat, mark(marks::ALLOW))),
        PacketAction::Accept => Some((Verdict::Accept, None)),
        // Decided for good: mark it and send the packet round the chain again, where the
        // reject rule answers the sender (TCP reset, ICMP unreachable) unless silent.
        PacketAction::Drop if d.settled => {
            Some((Verdict::Repeat, mark(if d.silent { marks::DROP } else { marks::REJECT })))
        }
        PacketAction::Drop => Some((Verdict::Drop, None)),
        PacketAction::Hold(_) => None,
    }
}

/// An eventfd that wakes a worker from its `poll(2)`, non-blocking.
pub(crate) fn wake_fd() -> std::io::Result<Arc<EventFd>> {
    Ok(Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?))
}

/// Waits up to `wait` until `queue` has packets or `wake` rang; whether it rang (and if so, it
/// is read, so it can ring again).
pub(crate) fn wait_for_work(queue: &Queue, wake: &EventFd, wait: Duration) -> Result<bool, nix::errno::Errno> {
    let rang = {
        let mut fds = [PollFd::new(queue.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        // Round up: a timer due in 0.4 ms must not become a busy loop of zero waits.
        let ms = if wait.is_zero() { 0 } else { wait.as_micros().div_ceil(1000) };
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(_) => fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)),
            Err(nix::errno::Errno::EINTR) => false,
            Err(e) => return Err(e),
        }
    };
    if rang {
        let _ = wake.read();
    }
    Ok(rang)
}

/// Starts a worker thread named `name` at foreground priority. A worker that fails says so at
/// once (`what` names it): until shutdown nobody else would notice that its packets now go
/// unjudged (fail-open) or stall (fail-closed).
pub(crate) fn spawn_worker(
    name: String,
    what: String,
    run: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> std::io::Result<JoinHandle<Result<(), String>>> {
    std::thread::Builder::new().name(name).spawn(move || {
        super::foreground();
        let result = run();
        if let Err(e) = &result {
            log::error!("{what} worker stopped: {e}");
        }
        result
    })
}

/// Wakes a worker (after the stop flag was set) and waits for it to finish.
pub(crate) fn join_worker(
    wake: &EventFd,
    thread: Option<JoinHandle<Result<(), String>>>,
    what: &str,
) -> Result<(), String> {
    let _ = wake.write(1);
    match thread.map(JoinHandle::join) {
        Some(Ok(r)) => r,
        Some(Err(_)) => Err(format!("a {what} worker panicked")),
        None => Ok(()),
    }
}

/// A worker's counters, as `flowgate stats` shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct WorkerStats {
    pub(crate) queue: u16,
    #[serde(flatten)]
    pub(crate) engine: Stats,
    #[serde(flatten)]
    pub(crate) footprint: Footprint,
    /// Events the writer's full channel could not take.
    pub(crate) events_dropped: u64,
    /// Times the enforcer's channel was full and a verdict had to wait.
    pub(crate) enforce_deferred: u64,
    /// Handle commands refused because the engine's channel was full.
    pub(crate) commands_refused: u64,
    /// NFQUEUE: messages the kernel could not deliver (socket overruns).
    pub(crate) queue_overruns: u64,
    /// Verdict latency, first verdicts by rule, verdict changes, closes by reason.
    #[serde(flatten)]
    pub(crate) counts: Counts,
}

/// A running worker.
pub(crate) struct Shard {
    pub(crate) handle: Handle,
    pub(crate) stats: Arc<Mutex<WorkerStats>>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// What a worker is given besides its queue and engine.
pub(crate) struct Links {
    pub(crate) index: usize,
    pub(crate) clock: Clock,
    pub(crate) events: SyncSender<Event>,
    pub(crate) enforce: SyncSender<Enforce>,
    pub(crate) stop: Arc<AtomicBool>,
    /// The fail mode: what packets still held when the worker exits get.
    pub(crate) fail_open: bool,
    /// Link changes (see [`flowgate_linux::ifname::LinkWatch`]): the name cache follows them.
    pub(crate) link_changes: Arc<std::sync::atomic::AtomicU64>,
    /// Where the engine's owner questions go (see [`super::owners`]), when owners are looked up.
    pub(crate) owners: Option<super::owners::Links>,
}

impl Shard {
    /// Starts a worker for `queue`, driving `engine`.
    pub(crate) fn start(queue: Queue, mut engine: Engine, links: Links) -> std::io::Result<Shard> {
        let wake = wake_fd()?;
        let waker = wake.clone();
        engine.set_waker(move || {
            // A full counter still wakes the poll; nothing to do on error.
            let _ = waker.write(1);
        });
        // Provider calls are timed against the engine's budget on the monotonic clock.
        let started = StdInstant::now();
        engine.set_stopwatch(move || started.elapsed());
        let handle = engine.handle();
        let num = queue.num();
        let stats = Arc::new(Mutex::new(WorkerStats { queue: num, ..WorkerStats::default() }));
        let worker = Worker {
            queue,
            engine,
            owner: marks::owner(links.index),
            links,
            wake: wake.clone(),
            stats: stats.clone(),
            events_dropped: 0,
            enforce_deferred: 0,
            pending: None,
            faults_said: None,
            faults_unsaid: 0,
            drops_said: None,
            tally: Tally::default(),
        };
        let thread = spawn_worker(format!("flowgate-q{num}"), format!("queue {num}"), move || worker.run())?;
        Ok(Shard { handle, stats, wake, thread: Some(thread) })
    }

    /// Wakes the worker (after the stop flag was set) and waits for it to finish.
    pub(crate) fn join(mut self) -> Result<(), String> {
        join_worker(&self.wake, self.thread.take(), "queue")
    }
}

struct Worker {
    queue: Queue,
    engine: Engine,
    owner: u32,
    links: Links,
    wake: Arc<EventFd>,
    stats: Arc<Mutex<WorkerStats>>,
    events_dropped: u64,
    enforce_deferred: u64,
    /// A verdict the enforcer's channel had no room for.
    pending: Option<Enforce>,
    /// When a provider fault was last reported on stderr, and how many since were not.
    faults_said: Option<StdInstant>,
    faults_unsaid: u64,
    /// When dropped events were last reported, and the count then.
    drops_said: Option<(StdInstant, u64)>,
    tally: Tally,
}

impl Worker {
    fn run(mut self) -> Result<(), String> {
        let num = self.queue.num();
        let mut names = IfNames::following(self.links.link_changes.clone());
        // Engine packet ids of held packets → their NFQUEUE ids.
        let mut held: HashMap<PacketId, u32> = HashMap::new();
        let mut answers: Vec<(u32, Verdict, Option<Mark>)> = Vec::with_capacity(256);
        // When each packet answered in this wake-up was received (held packets are not: they
        // wait for a provider or for data by design, and their release is not timed).
        let mut received: Vec<StdInstant> = Vec::with_capacity(256);
        self.tally.follow(self.engine.rules());
        while !self.links.stop.load(Ordering::Acquire) {
            let now = self.links.clock.now();
            let mut wait = self
                .engine
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_since(now).min(Duration::from_secs(1)));
            if self.pending.is_some() {
                wait = wait.min(Duration::from_millis(1));
            }
            wait_for_work(&self.queue, &self.wake, wait).map_err(|e| format!("queue {num}: poll failed: {e}"))?;
            let now = self.links.clock.now();
            self.engine.handle_commands(now);
            for _ in 0..RECV_ROUNDS {
                let engine = &mut self.engine;
                let owner = self.owner;
                let n = self
                    .queue
                    .recv(|p| {
                        let at = StdInstant::now();
                        let (origin, ifindex) = origin_of(p.hook, p.indev, p.outdev);
                        let interface = ifindex.and_then(|i| names.name(i)).map(|n| &**n);
                        let d = engine.handle_packet(now, PacketMeta { interface, origin }, p.payload);
                        match verdict_for(&d, p.mark.unwrap_or(0), owner) {
                            Some((v, m)) => {
                                answers.push((p.id, v, m));
                                received.push(at);
                            }
                            None => {
                                if let PacketAction::Hold(id) = d.action {
                                    held.insert(id, p.id);
                                }
                            }
                        }
                    })
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
            }
            while let Some(r) = self.engine.poll_release() {
                let changed = if r.accept { self.engine.take_rewrite(r.packet) } else { None };
                if let Some(id) = held.remove(&r.packet) {
                    match changed {
                        // A drop inside a held packet: its judged first bytes go out alone.
                        Some(bytes) => self.queue.accept_changed(id, &bytes),
                        None => answers.push((id, if r.accept { Verdict::Accept } else { Verdict::Drop }, None)),
                    }
                }
            }
            for (id, v, m) in answers.drain(..) {
                self.queue.verdict(id, v, m);
            }
            self.queue.flush().map_err(|e| e.to_string())?;
            let sent = StdInstant::now();
            for at in received.drain(..) {
                self.tally.latency.record(sent.saturating_duration_since(at));
            }
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.hand_off(false);
            // After the hand-off: events of flows judged before a reload are counted under the
            // old names, then the names of rules that are gone are forgotten.
            self.tally.follow(self.engine.rules());
            self.report_faults();
            // Once per wake-up (the lock is this worker's own, taken by `flowgate stats` now and
            // then), so the counters are never older than the worker's last work.
            self.publish();
        }
        // Held packets must not stall the kernel queue past our exit; they get the fail mode's
        // verdict, as packets do while no daemon answers.
        let last = if self.links.fail_open { Verdict::Accept } else { Verdict::Drop };
        for (_, id) in held.drain() {
            self.queue.verdict(id, last, None);
        }
        self.queue.flush().map_err(|e| e.to_string())?;
        self.engine.close_all(self.links.clock.now());
        self.hand_off(true);
        self.publish();
        Ok(())
    }

    /// Gives events to the writer and verdicts to the enforcer. `last`: the worker is stopping,
    /// so waiting for room is fine and nothing may stay behind.
    fn hand_off(&mut self, last: bool) {
        if let Some(o) = &self.links.owners {
            super::owners::hand_over(&mut self.engine, self.links.index, &o.tx, &o.stats);
        }
        // At the end, the writer gets a little while to take what is left; a writer that is
        // stuck (a reader that stopped reading) must not keep the daemon from stopping.
        let deadline = StdInstant::now() + LAST_EVENTS_WAIT;
        while let Some(mut e) = self.engine.poll_event() {
            self.tally.count(&e.kind);
            let sent = loop {
                match self.links.events.try_send(e) {
                    Ok(()) => break true,
                    Err(TrySendError::Full(back)) if last && StdInstant::now() < deadline => {
                        e = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => break false,
                }
            };
            if !sent {
                self.events_dropped += 1;
            }
        }
        // Say so, at most every ten seconds: events are lost, but judging goes on.
        let said = self.drops_said.map_or(0, |(_, n)| n);
        if self.events_dropped > said && self.drops_said.is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(10)) {
            log::warn!(
                "queue {}: {} events dropped so far: the event log cannot keep up (filtering goes on)",
                self.queue.num(),
                self.events_dropped
            );
            self.drops_said = Some((StdInstant::now(), self.events_dropped));
        }
        while let Some(x) = self.pending.take().or_else(|| self.engine.poll_enforce()) {
            let result = if last {
                self.links.enforce.send(x).map_err(|e| TrySendError::Disconnected(e.0))
            } else {
                self.links.enforce.try_send(x)
            };
            match result {
                Ok(()) => {}
                Err(TrySendError::Full(x)) => {
                    self.enforce_deferred += 1;
                    self.pending = Some(x);
                    break;
                }
                // The enforcer is gone only at shutdown, after the workers.
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
    }

    /// Says what providers did wrong, at most once a second (the rest is counted in
    /// `provider_faults` and summed up in the next line).
    fn report_faults(&mut self) {
        while let Some(f) = self.engine.poll_fault() {
            if self.faults_said.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                self.faults_unsaid += 1;
                continue;
            }
            let what = match &f.kind {
                flowgate_core::FaultKind::Panic(m) => format!("panicked ({m})"),
                flowgate_core::FaultKind::Slow(t) => format!("took {} ms", t.as_millis()),
            };
            let flow = f.flow.map(|id| format!(" for flow {id}")).unwrap_or_default();
            let mode = if self.links.fail_open { "allowed (fail open)" } else { "dropped (fail closed)" };
            let more = match std::mem::take(&mut self.faults_unsaid) {
                0 => String::new(),
                n => format!("; {n} more faults since the last report"),
            };
            log::warn!("provider `{}` {what} in {}{flow}: the flow is {mode}{more}", f.provider, f.call);
            self.faults_said = Some(StdInstant::now());
        }
    }

    fn publish(&mut self) {
        let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        self.tally.publish(&mut s.counts);
        s.engine = self.engine.stats();
        s.footprint = self.engine.footprint();
        s.events_dropped = self.events_dropped;
        s.enforce_deferred = self.enforce_deferred;
        s.commands_refused = self.engine.handle().refused();
        s.queue_overruns = self.queue.overruns();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::FlowId;

    fn decision(action: PacketAction, settled: bool, silent: bool) -> Decision {
        Decision { action, flow: Some(FlowId(1)), settled, silent }
    }

    #[test]
    fn settled_verdicts_carry_the_mark_and_the_owner_and_keep_other_bits() {
        let other = 0x0000_00ff;
        let me = marks::owner(1);
        let allow = verdict_for(&decision(PacketAction::Accept, true, false), other, me);
        assert_eq!(allow, Some((Verdict::Repeat, Some(Mark { value: other | marks::ALLOW | me, mask: marks::MASK }))));
        let reject = verdict_for(&decision(PacketAction::Drop, true, false), 0, me);
        assert_eq!(reject, Some((Verdict::Repeat, Some(Mark { value: marks::REJECT | me, mask: marks::MASK }))));
        let silent = verdict_for(&decision(PacketAction::Drop, true, true), 0, me);
        assert_eq!(silent, Some((Verdict::Repeat, Some(Mark { value: marks::DROP | me, mask: marks::MASK }))));
        // Our bits already set on the packet are replaced, not or-ed.
        let flip = verdict_for(&decision(PacketAction::Drop, true, false), marks::ALLOW | marks::owner(5) | 0x1, me);
        assert_eq!(flip, Some((Verdict::Repeat, Some(Mark { value: marks::REJECT | me | 0x1, mask: marks::MASK }))));
    }

    #[test]
    fn undecided_packets_pass_or_drop_without_a_mark_and_held_ones_wait() {
        let me = marks::owner(0);
        assert_eq!(verdict_for(&decision(PacketAction::Accept, false, false), 7, me), Some((Verdict::Accept, None)));
        assert_eq!(verdict_for(&decision(PacketAction::Drop, false, false), 7, me), Some((Verdict::Drop, None)));
        assert_eq!(verdict_for(&decision(PacketAction::Hold(PacketId(3)), false, false), 7, me), None);
    }
}
