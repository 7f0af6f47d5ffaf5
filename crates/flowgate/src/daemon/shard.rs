//! One queue's worker: a thread that owns one NFQUEUE queue and one engine.
//!
//! The kernel balances flows over queues by a hash of their addresses, so both directions of a
//! flow reach the same worker and no flow state is shared between workers: nothing on the
//! per-packet path takes a lock that another queue could hold. A worker waits in `poll(2)` on
//! its queue's socket and an eventfd (rung by [`flowgate_core::Handle`] commands and by
//! shutdown), drains the socket, answers every packet in one batched send, fires the engine's
//! timers and forwards events to the writer. This room touches its queue, its eventfd and the
//! events channel; nothing else.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use flowgate_core::{Decision, Enforce, Engine, Event, Handle, Origin, PacketAction, PacketId, PacketMeta};
use flowgate_linux::ifname::IfNames;
use flowgate_linux::marks;
use flowgate_linux::nfqueue::{Mark, Queue, Verdict};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::clock::Clock;

/// Netfilter hook numbers as NFQUEUE reports them.
const HOOK_LOCAL_IN: u8 = 1;
const HOOK_FORWARD: u8 = 2;
const HOOK_LOCAL_OUT: u8 = 3;

/// Most datagrams read per wake-up before timers and commands get a turn.
const RECV_ROUNDS: usize = 64;

/// What a worker tells the kernel for one decision; `None` while the packet is held.
///
/// A settled flow's decision goes on the packet mark with `NF_REPEAT`: the packet goes round
/// flowgate's chain again, whose first rule copies the mark to the conntrack mark, and the rest
/// of the flow is handled there. Repeating (not accepting) matters twice over: kernels without
/// `CONFIG_NETFILTER_NETLINK_GLUE_CT` (like this project's CI) cannot set the conntrack mark from
/// a verdict, and an `NF_ACCEPT` would skip the host's own filter rules after flowgate's chain.
/// The packet's other mark bits (`current_mark`; VPN clients route by them) are kept.
pub(crate) fn verdict_for(d: &Decision, current_mark: u32) -> Option<(Verdict, Option<Mark>)> {
    let mark = |bits| Some(Mark::keeping(current_mark, bits, marks::MASK));
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

/// A running worker.
pub(crate) struct Shard {
    pub(crate) handle: Handle,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Shard {
    /// Starts a worker for `queue`, driving `engine`.
    pub(crate) fn start(
        queue: Queue,
        mut engine: Engine,
        clock: Clock,
        events: Sender<Event>,
        enforce: Sender<Enforce>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Shard> {
        let wake = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?);
        let waker = wake.clone();
        engine.set_waker(move || {
            // A full counter still wakes the poll; nothing to do on error.
            let _ = waker.write(1);
        });
        let handle = engine.handle();
        let w = wake.clone();
        let num = queue.num();
        let thread = std::thread::Builder::new().name(format!("flowgate-q{num}")).spawn(move || {
            let result = Worker { queue, engine, clock, events, enforce, stop, wake: w }.run();
            // Say so at once: until shutdown nobody else would notice that this queue's flows
            // now go unjudged (fail-open) or stall (fail-closed).
            if let Err(e) = &result {
                eprintln!("flowgate: queue {num} worker stopped: {e}");
            }
            result
        })?;
        Ok(Shard { handle, wake, thread: Some(thread) })
    }

    /// Wakes the worker (after the stop flag was set) and waits for it to finish.
    pub(crate) fn join(mut self) -> Result<(), String> {
        let _ = self.wake.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err("a queue worker panicked".into()),
            None => Ok(()),
        }
    }
}

struct Worker {
    queue: Queue,
    engine: Engine,
    clock: Clock,
    events: Sender<Event>,
    enforce: Sender<Enforce>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
}

impl Worker {
    fn run(mut self) -> Result<(), String> {
        let num = self.queue.num();
        let mut names = IfNames::new();
        // Engine packet ids of held packets → their NFQUEUE ids.
        let mut held: HashMap<PacketId, u32> = HashMap::new();
        let mut answers: Vec<(u32, Verdict, Option<Mark>)> = Vec::with_capacity(256);
        while !self.stop.load(Ordering::Acquire) {
            let now = self.clock.now();
            let wait = self
                .engine
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| t.saturating_since(now).min(Duration::from_secs(1)));
            let ready = {
                let mut fds = [
                    PollFd::new(self.queue.as_fd(), PollFlags::POLLIN),
                    PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
                ];
                let timeout = PollTimeout::try_from(wait.as_millis().max(1)).unwrap_or(PollTimeout::MAX);
                match poll(&mut fds, timeout) {
                    Ok(_) => fds[1].revents().is_some_and(|r| r.contains(PollFlags::POLLIN)),
                    Err(nix::errno::Errno::EINTR) => false,
                    Err(e) => return Err(format!("queue {num}: poll failed: {e}")),
                }
            };
            if ready {
                let _ = self.wake.read();
            }
            let now = self.clock.now();
            self.engine.handle_commands(now);
            for _ in 0..RECV_ROUNDS {
                let engine = &mut self.engine;
                let n = self
                    .queue
                    .recv(|p| {
                        let (origin, ifindex) = match p.hook {
                            HOOK_LOCAL_OUT => (Origin::Output, p.outdev),
                            HOOK_LOCAL_IN => (Origin::Input, p.indev),
                            HOOK_FORWARD => (Origin::Forward, p.indev),
                            _ => (Origin::Unknown, p.indev.or(p.outdev)),
                        };
                        let interface = ifindex.and_then(|i| names.name(i)).map(|n| &**n);
                        let d = engine.handle_packet(now, PacketMeta { interface, origin }, p.payload);
                        match verdict_for(&d, p.mark.unwrap_or(0)) {
                            Some((v, m)) => answers.push((p.id, v, m)),
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
                if let Some(id) = held.remove(&r.packet) {
                    answers.push((id, if r.accept { Verdict::Accept } else { Verdict::Drop }, None));
                }
            }
            for (id, v, m) in answers.drain(..) {
                self.queue.verdict(id, v, m);
            }
            self.queue.flush().map_err(|e| e.to_string())?;
            if self.engine.poll_timeout().is_some_and(|t| t <= now) {
                self.engine.handle_timeout(now);
            }
            self.forward_events()?;
        }
        // Held packets must not stall the kernel queue past our exit.
        for (_, id) in held.drain() {
            self.queue.verdict(id, Verdict::Accept, None);
        }
        self.queue.flush().map_err(|e| e.to_string())?;
        self.engine.close_all(self.clock.now());
        self.forward_events()
    }

    fn forward_events(&mut self) -> Result<(), String> {
        while let Some(e) = self.engine.poll_event() {
            if self.events.send(e).is_err() {
                return Err("the event writer stopped".into());
            }
        }
        while let Some(x) = self.engine.poll_enforce() {
            if self.enforce.send(x).is_err() {
                return Err("the enforcer stopped".into());
            }
        }
        Ok(())
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
    fn settled_verdicts_carry_the_mark_and_keep_other_bits() {
        let other = 0x0000_00ff;
        let allow = verdict_for(&decision(PacketAction::Accept, true, false), other);
        assert_eq!(allow, Some((Verdict::Repeat, Some(Mark { value: other | marks::ALLOW, mask: marks::MASK }))));
        let reject = verdict_for(&decision(PacketAction::Drop, true, false), 0);
        assert_eq!(reject, Some((Verdict::Repeat, Some(Mark { value: marks::REJECT, mask: marks::MASK }))));
        let silent = verdict_for(&decision(PacketAction::Drop, true, true), 0);
        assert_eq!(silent, Some((Verdict::Repeat, Some(Mark { value: marks::DROP, mask: marks::MASK }))));
        // Our bits already set on the packet are replaced, not or-ed.
        let flip = verdict_for(&decision(PacketAction::Drop, true, false), marks::ALLOW | 0x1);
        assert_eq!(flip, Some((Verdict::Repeat, Some(Mark { value: marks::REJECT | 0x1, mask: marks::MASK }))));
    }

    #[test]
    fn undecided_packets_pass_or_drop_without_a_mark_and_held_ones_wait() {
        assert_eq!(verdict_for(&decision(PacketAction::Accept, false, false), 7), Some((Verdict::Accept, None)));
        assert_eq!(verdict_for(&decision(PacketAction::Drop, false, false), 7), Some((Verdict::Drop, None)));
        assert_eq!(verdict_for(&decision(PacketAction::Hold(PacketId(3)), false, false), 7), None);
    }
}
