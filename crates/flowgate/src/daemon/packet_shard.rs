//! One packet-stage queue's worker: a thread that owns one of the packet stage's NFQUEUE queues
//! (fed from the mangle table, see `flowgate_linux::netfilter`) and one
//! [`flowgate_core::PacketStage`].
//!
//! It waits in `poll(2)` on its queue's socket and an eventfd (rung by [`PacketHandle`] commands:
//! releases of delayed packets, new rules on reload), drains the socket, answers every packet it
//! does not hold in one batched send, and lets delayed packets go when they are released or
//! expire. Accepted packets go on to the filter table, where the flow chains judge their flows;
//! nothing else of the flow stage is touched here. A delayed packet is only a number in a map: it
//! never stalls the packets behind it. Counters are published for `flowgate stats` after each
//! wake-up (the per-interface and per-rule lists at most every 50 ms). At exit every delayed
//! packet gets the fail mode's verdict.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant as StdInstant};

use flowgate_core::packet_stage::{InterfaceStats, PacketStageStats, RuleHits};
use flowgate_core::{PacketAction, PacketDirection, PacketHandle, PacketId, PacketStage};
use flowgate_linux::ifname::IfNames;
use flowgate_linux::nfqueue::{Queue, Verdict};
use nix::sys::eventfd::EventFd;
use serde::Serialize;

use super::clock::Clock;
use super::shard::{join_worker, spawn_worker, wait_for_work, wake_fd};

/// Netfilter hook numbers as NFQUEUE reports them.
const HOOK_LOCAL_IN: u8 = 1;
const HOOK_FORWARD: u8 = 2;
const HOOK_LOCAL_OUT: u8 = 3;

/// Most datagrams read per wake-up before releases and timers get a turn.
const RECV_ROUNDS: usize = 64;

/// How often the lists of `flowgate stats` (interfaces, rule hits) are published.
const LIST_PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// A packet worker's counters, as `flowgate stats` shows them.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct PacketWorkerStats {
    pub(crate) queue: u16,
    #[serde(flatten)]
    pub(crate) stage: PacketStageStats,
    pub(crate) commands_refused: u64,
    pub(crate) interfaces: Vec<InterfaceStats>,
    pub(crate) rules: Vec<RuleHits>,
}

/// A running packet worker.
pub(crate) struct PacketShard {
    pub(crate) handle: PacketHandle,
    pub(crate) stats: Arc<Mutex<PacketWorkerStats>>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// What a packet worker shares with the rest of the daemon.
pub(crate) struct PacketLinks {
    pub(crate) clock: Clock,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) fail_open: bool,
    pub(crate) link_changes: Arc<AtomicU64>,
}

impl PacketShard {
    pub(crate) fn start(queue: Queue, mut stage: PacketStage, links: PacketLinks) -> std::io::Result<PacketShard> {
        let wake = wake_fd()?;
        let waker = wake.clone();
        stage.set_waker(move || {
            let _ = waker.write(1);
        });
        let started = StdInstant::now();
        stage.set_stopwatch(move || started.elapsed());
        let handle = stage.handle();
        let num = queue.num();
        let stats = Arc::new(Mutex::new(PacketWorkerStats { queue: num, ..PacketWorkerStats::default() }));
        let worker = PacketWorker { queue, stage, links, wake: wake.clone(), stats: stats.clone(), faults_said: None };
        let thread = spawn_worker(format!("flowgate-p{num}"), format!("packet queue {num}"), move || worker.run())?;
        Ok(PacketShard { handle, stats, wake, thread: Some(thread) })
    }

    /// Wakes the worker (after the stop flag was set) and waits for it to finish.
    pub(crate) fn join(mut self) -> Result<(), String> {
        join_worker(&self.wake, self.thread.take(), "packet queue")
    }
}

struct PacketWorker {
    queue: Queue,
    stage: PacketStage,
    links: PacketLinks,
    wake: Arc<EventFd>,
    stats: Arc<Mutex<PacketWorkerStats>>,
    faults_said: Option<StdInstant>,
}

impl PacketWorker {
    fn run(mut self) -> Result<(), String> {
        let num = self.queue.num();
        let mut names = IfNames::following(self.links.link_changes.clone());
        let mut held: HashMap<PacketId, u32> = HashMap::new();
        let mut answers: Vec<(u32, Verdict)> = Vec::with_capacity(256);
        let mut lists_at: Option<StdInstant> = None;
        while !self.links.stop.load(Ordering::Acquire) {
            let now = self.links.clock.now();
            let wait = self
                .stage
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_since(now).min(Duration::from_secs(1)));
            wait_for_work(&self.queue, &self.wake, wait)
                .map_err(|e| format!("packet queue {num}: poll failed: {e}"))?;
            let now = self.links.clock.now();
            self.stage.handle_timeout(now);
            for _ in 0..RECV_ROUNDS {
                let stage = &mut self.stage;
                let n = self
                    .queue
                    .recv(|p| {
                        let (direction, ifindex) = match p.hook {
                            HOOK_LOCAL_OUT => (PacketDirection::Outbound, p.outdev),
                            HOOK_LOCAL_IN => (PacketDirection::Inbound, p.indev),
                            HOOK_FORWARD => {
                                // Named by the interface the chains queued it for: the one it came
                                // in on if the stage covers that, else the one it leaves by.
                                let by_in = p
                                    .indev
                                    .and_then(|i| names.name(i))
                                    .is_some_and(|n| stage.covers(n, PacketDirection::Forwarded));
                                (PacketDirection::Forwarded, if by_in { p.indev } else { p.outdev.or(p.indev) })
                            }
                            _ => (PacketDirection::Forwarded, p.indev.or(p.outdev)),
                        };
                        let interface = ifindex.and_then(|i| names.name(i)).map(|n| &**n);
                        match stage.handle_packet(now, interface, direction, p.payload) {
                            PacketAction::Accept => answers.push((p.id, Verdict::Accept)),
                            PacketAction::Drop => answers.push((p.id, Verdict::Drop)),
                            PacketAction::Hold(id) => {
                                held.insert(id, p.id);
                            }
                        }
                    })
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
            }
            while let Some((id, accept)) = self.stage.poll_release() {
                if let Some(nfq) = held.remove(&id) {
                    answers.push((nfq, if accept { Verdict::Accept } else { Verdict::Drop }));
                }
            }
            for (id, v) in answers.drain(..) {
                self.queue.verdict(id, v, None);
            }
            self.queue.flush().map_err(|e| e.to_string())?;
            self.report_faults();
            let lists = lists_at.is_none_or(|t| t.elapsed() >= LIST_PUBLISH_EVERY);
            if lists {
                lists_at = Some(StdInstant::now());
            }
            self.publish(lists);
        }
        // Delayed packets must not stall the kernel queue past our exit: they get the fail
        // mode's verdict, as packets do while no daemon answers.
        self.stage.release_all(self.links.fail_open);
        while let Some((id, accept)) = self.stage.poll_release() {
            if let Some(nfq) = held.remove(&id) {
                self.queue.verdict(nfq, if accept { Verdict::Accept } else { Verdict::Drop }, None);
            }
        }
        self.queue.flush().map_err(|e| e.to_string())?;
        self.publish(true);
        Ok(())
    }

    /// Says what the product's packet filter did wrong, at most once a second.
    fn report_faults(&mut self) {
        while let Some(f) = self.stage.poll_fault() {
            if self.faults_said.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                continue;
            }
            self.faults_said = Some(StdInstant::now());
            log::warn!(
                "packet queue {}: packet filter `{}` faulted in `{}` ({:?}); the packet got the fail mode's verdict ({} faults so far)",
                self.queue.num(),
                f.provider,
                f.call,
                f.kind,
                self.stage.stats().provider_faults
            );
        }
    }

    fn publish(&self, lists: bool) {
        let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        s.stage = self.stage.stats();
        s.commands_refused = self.stage.commands_refused();
        if lists {
            self.stage.fill_interface_stats(&mut s.interfaces);
            s.rules = self.stage.rule_hits();
        }
    }
}
