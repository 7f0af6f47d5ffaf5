//! The minimal accept-all NFQUEUE reader, the floor of any user-space verdict, for the live
//! benchmarks that compare against it (`src/bin/packets.rs`, `src/bin/compare.rs`): one queue on
//! flowgate's own NFQUEUE library (`flowgate_linux::nfqueue`), bound in a lab namespace, one
//! thread that lets every packet it is shown pass (`NF_ACCEPT`, or `NF_REPEAT` with a mark, as a
//! verdict of the daemon does), and the iptables rules that feed it, which the caller gives.
//!
//! The thread works as the daemon's queue workers do: nice -10, it waits in poll(2), receives up
//! to [`RECV_ROUNDS`] datagrams, then sends all their verdicts in one flush. It decides nothing
//! and keeps no state per packet or flow: that is what makes it a floor.
//!
//! It touches: the queue it binds, the iptables rules it is given (added in order once the queue
//! is bound, undone in reverse order when it stops, also on drop), and its own thread.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use flowgate_linux::nfqueue::{Mark, Queue, QueueConfig, Verdict};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::lab::Netns;
use crate::threads::{nice, pin_me, spawn_thread};

type Result<T> = std::result::Result<T, String>;

/// Datagrams the reader takes per wake-up before it answers (the daemon's packet worker's batch).
pub const RECV_ROUNDS: usize = 64;

/// How the reader binds its queue and what its verdicts carry.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub queue: u16,
    /// Packets the kernel holds for the queue (the daemon's `queue_max_len`).
    pub max_len: u32,
    /// Fail-open queue (as the daemon's default `fail = "open"`); the feeding rules then carry
    /// `--queue-bypass` too, which is up to the caller.
    pub fail_open: bool,
    /// The verdict on every packet: `Accept`, or `Repeat` (the packet runs through its hook's
    /// chain again, as the daemon's verdicts do, so that a rule there can act on the mark).
    pub verdict: Verdict,
    /// `(bits, mask)`: every verdict sets these bits of the packet mark (keeping its other bits,
    /// as the daemon does) and of the conntrack mark (where the kernel has the NFQUEUE conntrack
    /// glue; without it, a rule must copy the packet mark, as the daemon's chains do); None: no
    /// mark.
    pub mark: Option<(u32, u32)>,
    /// The CPU the reader is pinned to, if any.
    pub cpu: Option<usize>,
}

/// One command that feeds the reader, as `iptables` arguments after `-w`, and the one that
/// undoes it.
#[derive(Clone, Debug)]
pub struct FeedRule {
    pub add: Vec<String>,
    pub undo: Vec<String>,
}

impl FeedRule {
    /// A rule appended (`-A CHAIN rest...`) or inserted (`-I CHAIN N rest...`) in `table`, undone
    /// by `-D CHAIN rest...`.
    pub fn rule(table: &str, op: &str, chain: &str, position: Option<u32>, rest: &[&str]) -> FeedRule {
        let mut add = vec!["-t".to_string(), table.to_string(), op.to_string(), chain.to_string()];
        add.extend(position.map(|p| p.to_string()));
        add.extend(rest.iter().map(|s| s.to_string()));
        let mut undo = vec!["-t".to_string(), table.to_string(), "-D".to_string(), chain.to_string()];
        undo.extend(rest.iter().map(|s| s.to_string()));
        FeedRule { add, undo }
    }

    /// A new chain in `table` (`-N`), deleted by `-X` (after its rules were undone).
    pub fn chain(table: &str, chain: &str) -> FeedRule {
        let v = |op: &str| vec!["-t".to_string(), table.to_string(), op.to_string(), chain.to_string()];
        FeedRule { add: v("-N"), undo: v("-X") }
    }
}

fn iptables(ns: &Netns, args: &[String]) -> Result<()> {
    let mut all = vec!["iptables", "-w"];
    all.extend(args.iter().map(String::as_str));
    let o = ns.run(&all);
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{} (in {}): {}", all.join(" "), ns.name, String::from_utf8_lossy(&o.stderr).trim()))
    }
}

/// The reader and its feeding rules in a namespace. On drop (or [`AcceptAll::stop`]) the rules
/// are undone, then the thread is stopped and joined, which unbinds the queue.
pub struct AcceptAll<'a> {
    ns: &'a Netns,
    tid: i32,
    /// Undo commands of the rules in place, in the order they were added.
    installed: Vec<Vec<String>>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl<'a> AcceptAll<'a> {
    /// Binds the queue in `ns`, starts the reader (counting every packet into `judged`), then
    /// adds `feed` in order. On an error, what was added is undone and the reader stopped.
    pub fn start(ns: &'a Netns, opts: &Options, judged: Arc<AtomicU64>, feed: &[FeedRule]) -> Result<AcceptAll<'a>> {
        let cfg = QueueConfig { num: opts.queue, max_len: opts.max_len, fail_open: opts.fail_open, copy_range: 0xffff };
        let queue = ns.in_ns(move || Queue::open(&cfg)).map_err(|e| format!("accept-all reader: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let (st, wk, verdict, mark, cpu) = (stop.clone(), wake.clone(), opts.verdict, opts.mark, opts.cpu);
        let (thread, tid) = spawn_thread(&format!("accept-all-{}", opts.queue), move || {
            pin_me(cpu);
            reader_loop(queue, verdict, mark, &st, &wk, &judged)
        })?;
        let mut me = AcceptAll { ns, tid, installed: Vec::new(), stop, wake, thread: Some(thread) };
        for rule in feed {
            iptables(ns, &rule.add)?; // on error, `me` drops: undoes what is in, stops the thread
            me.installed.push(rule.undo.clone());
        }
        Ok(me)
    }

    /// The reader thread's kernel id.
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// Undoes the rules and stops the reader; an error if either failed.
    pub fn stop(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        while let Some(undo) = self.installed.pop() {
            if let Err(e) = iptables(self.ns, &undo) {
                errors.push(e);
            }
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => errors.push(format!("accept-all reader: {e}")),
            Some(Err(_)) => errors.push("the accept-all reader panicked".into()),
            Some(Ok(Ok(()))) | None => {}
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

impl Drop for AcceptAll<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("{}: {e}", crate::guard::tool());
        }
    }
}

fn reader_loop(
    mut queue: Queue,
    verdict: Verdict,
    mark: Option<(u32, u32)>,
    stop: &AtomicBool,
    wake: &EventFd,
    judged: &AtomicU64,
) -> Result<()> {
    nice(-10);
    let mut verdicts: Vec<(u32, Option<Mark>)> = Vec::with_capacity(256);
    while !stop.load(Ordering::Acquire) {
        {
            let mut fds = [PollFd::new(queue.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
        }
        for _ in 0..RECV_ROUNDS {
            let n = queue
                .recv(|p| {
                    let m = mark.map(|(bits, mask)| Mark::keeping(p.mark.unwrap_or(0), bits, mask));
                    verdicts.push((p.id, m));
                    judged.fetch_add(1, Ordering::Relaxed);
                })
                .map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
        }
        for (id, m) in verdicts.drain(..) {
            queue.verdict(id, verdict, m);
        }
        queue.flush().map_err(|e| e.to_string())?;
    }
    Ok(())
}
