//! Who owns each flow: the thread that answers the engines' owner questions.
//!
//! Queue workers hand each new flow's question ([`OwnerRequest`]) over a bounded channel and
//! never wait: a full channel answers "unknown" at once (counted). This thread looks the owner
//! up and answers through the engine's handle. Two mechanisms, fastest first:
//!
//! - kernel capture ([`flowgate_linux::owner_bpf`]): BPF programs record, when a socket
//!   connects, sends or binds, which process did it, keyed by the flow's ends; and, when a
//!   program starts, its path and arguments. The record is there before the flow's first packet
//!   reaches flowgate, so a process that exits at once is still named.
//! - `/proc` ([`flowgate_linux::socket_owner`]): the socket by its ends (sock_diag), the process
//!   holding it from `/proc/*/fd`. Needs the socket (and its process) to be alive when asked;
//!   used when the kernel capture cannot run here, and for flows it has no record of (opened
//!   before flowgate started).
//!
//! The process's details (path, arguments, user, cgroup, parents) come from `/proc` while it
//! lives (checked to be the same process by its start time), else from the kernel capture's
//! record of its exec. A process that is gone takes the cgroup of its nearest living ancestor.
//! Details are cached per process for a second, so a program that opens many flows is read
//! once. This room reads the kernel capture's maps, `/proc`, `/etc/passwd`, and sends on the
//! engines' handles; it never touches a packet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowgate_core::owner::{Ancestor, Owner, OwnerRequest, OwnerSource};
use flowgate_core::{Direction, Handle, Protocol};
use flowgate_linux::owner_bpf::{KernelOwner, OwnerCapture};
use flowgate_linux::procinfo::{self, ProcessInfo, Users};
use flowgate_linux::socket_owner::SocketOwners;
use serde::Serialize;

use crate::config::Attribution;

/// Questions in flight between the workers and this thread.
pub(crate) const QUEUE: usize = 16_384;
/// Ancestors named in a flow's owner.
const PARENTS: usize = 4;
/// How long a process's details are reused.
const CACHE_FOR: Duration = Duration::from_secs(1);
const CACHE_MAX: usize = 4096;
/// Longest an answer that only events wait for sits before its worker is woken (it is applied
/// at the worker's next wake-up in any case: a packet, a timer).
const GATHER: Duration = Duration::from_millis(2);
/// Clock ticks per second of `/proc/<pid>/stat`'s start time (USER_HZ, 100 on Linux).
const USER_HZ: u64 = 100;

/// What a worker sends: its index and the question.
pub(crate) type Question = (usize, OwnerRequest);

/// Counters of the owner lookups, for `flowgate stats` and the metrics.
#[derive(Debug, Default, Serialize)]
pub(crate) struct OwnerStats {
    /// Found by the kernel capture.
    pub(crate) kernel: AtomicU64,
    /// Found through `/proc`.
    pub(crate) proc: AtomicU64,
    /// Not found (no record, the socket already gone).
    pub(crate) unknown: AtomicU64,
    /// Questions the full channel could not take: answered "unknown" at once.
    pub(crate) dropped: AtomicU64,
}

/// The lookups, before the thread runs.
pub(crate) struct Resolver {
    capture: Option<OwnerCapture>,
    sockets: Option<SocketOwners>,
    users: Users,
    cache: HashMap<u32, (Instant, Arc<Owner>, u64)>,
    /// Ancestors read lately: pid → (when, exe, parent).
    ancestors: HashMap<u32, (Instant, Option<Arc<str>>, u32)>,
}

impl Resolver {
    /// Sets up the mechanisms `mode` asks for. `None` for `off`. Auto falls back to `/proc`
    /// (saying why) when the kernel capture cannot run; `kernel` fails instead.
    pub(crate) fn open(mode: Attribution) -> Result<Option<Resolver>, String> {
        if mode == Attribution::Off {
            return Ok(None);
        }
        let capture = match mode {
            Attribution::Proc | Attribution::Off => None,
            Attribution::Kernel => Some(
                OwnerCapture::start().map_err(|e| format!("attribution = \"kernel\": kernel capture failed: {e}"))?,
            ),
            Attribution::Auto => match OwnerCapture::start() {
                Ok(c) => Some(c),
                Err(e) => {
                    log::warn!("kernel capture of flow owners cannot run ({e}); owners are found through /proc");
                    None
                }
            },
        };
        let sockets = match SocketOwners::new() {
            Ok(s) => Some(s),
            Err(e) if capture.is_some() => {
                log::warn!("sock_diag is unavailable ({e}): flows the kernel capture has no record of have no owner");
                None
            }
            Err(e) => return Err(format!("attribution: cannot open sock_diag for /proc lookups: {e}")),
        };
        Ok(Some(Resolver { capture, sockets, users: Users::new(), cache: HashMap::new(), ancestors: HashMap::new() }))
    }

    /// The mechanism in use, for the ready line.
    pub(crate) fn mechanism(&self) -> &'static str {
        if self.capture.is_some() { "kernel capture (BPF)" } else { "/proc" }
    }

    /// The owner of the flow `q` asks about, if it can be found.
    pub(crate) fn resolve(&mut self, q: &OwnerRequest, stats: &OwnerStats) -> Option<Arc<Owner>> {
        let protocol = match q.protocol {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            _ => {
                stats.unknown.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        if let Some(c) = &self.capture {
            let k = match q.direction {
                Direction::Outbound => c.outbound(protocol, q.local, q.remote),
                Direction::Inbound => c.listener(protocol, q.local),
            };
            if let Some(k) = k {
                stats.kernel.fetch_add(1, Ordering::Relaxed);
                return Some(self.describe(k.tgid, Some(&k), None, OwnerSource::Kernel));
            }
        }
        // A forwarded flow's socket is in another namespace, out of sock_diag's reach.
        if !q.forwarded
            && let Some(s) = self.sockets.as_mut()
            && let Ok(Some(found)) = s.lookup(protocol, q.local, q.remote)
        {
            stats.proc.fetch_add(1, Ordering::Relaxed);
            return Some(match found.pid {
                Some(pid) => self.describe(pid, None, Some(found.uid), OwnerSource::Proc),
                None => Arc::new(Owner {
                    pid: 0,
                    exe: None,
                    cmdline: None,
                    uid: found.uid,
                    user: self.users.name(found.uid),
                    parents: Vec::new(),
                    cgroup: None,
                    unit: None,
                    source: OwnerSource::Proc,
                }),
            });
        }
        stats.unknown.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Everything about process `pid` (from `/proc` while it lives, else from the kernel
    /// capture's records), cached.
    fn describe(&mut self, pid: u32, k: Option<&KernelOwner>, uid: Option<u32>, source: OwnerSource) -> Arc<Owner> {
        let now = Instant::now();
        let record = self.capture.as_ref().and_then(|c| c.process(pid));
        let start = record.as_ref().map_or(0, |r| r.start_ns);
        if let Some(o) = self.cached(pid, start, now) {
            return o;
        }
        if self.cache.len() >= CACHE_MAX {
            self.cache.retain(|_, (at, _, _)| now.duration_since(*at) < CACHE_FOR);
        }
        if self.ancestors.len() >= CACHE_MAX {
            self.ancestors.retain(|_, (at, _, _)| now.duration_since(*at) < CACHE_FOR);
        }
        // /proc describes this process only if it is the one the record is about (a pid can be
        // reused once the process is gone; the capture has the task's start on the monotonic
        // clock, /proc on the boot clock in ticks: they agree to a tick unless the host was
        // suspended since), and only while it runs: an exiting process (or a zombie) still has
        // its stat and status, but no exe, an empty or cut command line and the root cgroup.
        let live = procinfo::read_process(pid).ok().filter(|p| {
            p.exe.is_some()
                && record.as_ref().is_none_or(|r| (r.start_ns / (1_000_000_000 / USER_HZ)).abs_diff(p.start_ticks) <= 1)
        });
        // The exec'd path and arguments come from the capture's record where there is one: /proc
        // reads can race the process's exit; a program that rewrites its arguments later shows
        // them as it was started.
        let exe = live.as_ref().and_then(|p| p.exe.clone()).or_else(|| record.as_ref().map(|r| resolve_path(&r.exe)));
        let cmdline = match (&record, &live) {
            (Some(r), _) if !r.args.is_empty() => join(&r.args),
            (_, Some(p)) => join(&p.cmdline),
            _ => None,
        };
        let ppid = live.as_ref().map(|p| p.ppid).or(record.as_ref().map(|r| r.ppid)).unwrap_or(0);
        let uid = k
            .map(|k| k.uid)
            .or(live.as_ref().map(|p| p.uid))
            .or(record.as_ref().map(|r| r.uid))
            .or(uid)
            .unwrap_or(u32::MAX);
        let cgroup =
            live.as_ref().and_then(|p| p.cgroup.clone()).filter(|c| c != "/").or_else(|| self.ancestor_cgroup(ppid));
        let owner = Arc::new(Owner {
            pid,
            exe: exe.map(Into::into),
            cmdline: cmdline.map(Into::into),
            uid,
            user: self.users.name(uid),
            parents: self.parents(ppid, now),
            unit: cgroup.as_deref().and_then(procinfo::unit_of).map(Into::into),
            cgroup: cgroup.map(Into::into),
            source,
        });
        self.cache.insert(pid, (now, owner.clone(), start));
        owner
    }

    /// A description of `pid` made within [`CACHE_FOR`], of the process that started at `start`
    /// (0: the start is not known).
    fn cached(&self, pid: u32, start: u64, now: Instant) -> Option<Arc<Owner>> {
        let (at, o, s) = self.cache.get(&pid)?;
        (now.duration_since(*at) < CACHE_FOR && *s == start).then(|| o.clone())
    }

    /// Ancestors from `ppid` up: `/proc` where they live, else the kernel capture's records; an
    /// ancestor described within [`CACHE_FOR`] (a shell or service starting many programs)
    /// brings its own ancestors.
    fn parents(&mut self, mut ppid: u32, now: Instant) -> Vec<Ancestor> {
        let mut out = Vec::new();
        while ppid > 0 && out.len() < PARENTS {
            if let Some((at, o, _)) = self.cache.get(&ppid)
                && now.duration_since(*at) < CACHE_FOR
            {
                out.push(Ancestor { pid: ppid, exe: o.exe.clone() });
                out.extend(o.parents.iter().take(PARENTS - out.len()).cloned());
                break;
            }
            let (exe, next) = match self.ancestors.get(&ppid) {
                Some((at, exe, next)) if now.duration_since(*at) < CACHE_FOR => (exe.clone(), *next),
                _ => {
                    let (exe, next) = match procinfo::read_process(ppid) {
                        Ok(p) => (p.exe.map(Arc::from), p.ppid),
                        Err(_) => match self.capture.as_ref().and_then(|c| c.process(ppid)) {
                            Some(r) => (Some(Arc::from(resolve_path(&r.exe))), r.ppid),
                            None => (None, 0),
                        },
                    };
                    self.ancestors.insert(ppid, (now, exe.clone(), next));
                    (exe, next)
                }
            };
            out.push(Ancestor { pid: ppid, exe });
            if ppid == 1 {
                break;
            }
            ppid = next;
        }
        out
    }

    /// The cgroup of the nearest living ancestor, for a process that is gone.
    fn ancestor_cgroup(&self, mut pid: u32) -> Option<String> {
        for _ in 0..PARENTS {
            if pid == 0 {
                return None;
            }
            match procinfo::read_process(pid) {
                Ok(ProcessInfo { cgroup: Some(c), .. }) => return Some(c),
                Ok(p) => pid = p.ppid,
                Err(_) => pid = self.capture.as_ref().and_then(|c| c.process(pid)).map_or(0, |r| r.ppid),
            }
        }
        None
    }
}

fn join(args: &[String]) -> Option<String> {
    (!args.is_empty()).then(|| args.join(" "))
}

/// A path as exec'd, with symbolic links resolved where the file can be found (so `/bin/curl`
/// on a merged-/usr system and `/usr/bin/python3` read as `/proc/<pid>/exe` would give them).
fn resolve_path(exe: &str) -> String {
    if exe.starts_with('/')
        && let Ok(p) = std::fs::canonicalize(exe)
    {
        return p.to_string_lossy().into_owned();
    }
    exe.to_string()
}

/// The running lookup thread.
pub(crate) struct Attributor {
    thread: JoinHandle<()>,
}

impl Attributor {
    /// Starts answering questions from `rx` through `handles` (one per worker, by index) until
    /// `stop` is set.
    pub(crate) fn start(
        mut resolver: Resolver,
        rx: Receiver<Question>,
        handles: Vec<Handle>,
        stats: Arc<OwnerStats>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Attributor> {
        let thread = std::thread::Builder::new().name("flowgate-owners".into()).spawn(move || {
            // Workers owed a wake-up for answers sent quietly, and since when.
            let mut owed: Vec<Option<Instant>> = vec![None; handles.len()];
            while !stop.load(Ordering::Acquire) {
                let wait =
                    owed.iter().flatten().min().map_or(Duration::from_millis(100), |t| {
                        (*t + GATHER).saturating_duration_since(Instant::now())
                    });
                let got = rx.recv_timeout(wait);
                let now = Instant::now();
                for (h, since) in handles.iter().zip(owed.iter_mut()) {
                    if since.is_some_and(|t| now >= t + GATHER) {
                        h.wake();
                        *since = None;
                    }
                }
                let (worker, q) = match got {
                    Ok(x) => x,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
                let owner = resolver.resolve(&q, &stats);
                let Some(h) = handles.get(worker) else { continue };
                // A held flow's packets wait: it is answered (and its worker woken) at once. The
                // others' answers gather for a while, so a worker is not woken once per flow
                // for events alone. A full engine channel: the flow's wait runs out instead.
                if q.hold {
                    let _ = h.owner(q.flow, owner, Duration::from_millis(5));
                } else if h.owner_quietly(q.flow, owner).is_ok() {
                    owed[worker].get_or_insert(now);
                }
            }
        })?;
        Ok(Attributor { thread })
    }

    pub(crate) fn join(self) -> Option<String> {
        self.thread.join().err().map(|_| "the owner lookup thread panicked".to_string())
    }
}

/// A worker's side: hands its engine's questions over without waiting.
pub(crate) fn hand_over(
    engine: &mut flowgate_core::Engine,
    worker: usize,
    tx: &SyncSender<Question>,
    stats: &OwnerStats,
) {
    while let Some(q) = engine.poll_owner_request() {
        match tx.try_send((worker, q)) {
            Ok(()) => {}
            Err(TrySendError::Full((_, q)) | TrySendError::Disconnected((_, q))) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
                engine.set_owner(q.flow, None);
            }
        }
    }
}

/// Shared between the daemon's parts: the channel and the counters.
pub(crate) struct Links {
    pub(crate) tx: SyncSender<Question>,
    pub(crate) stats: Arc<OwnerStats>,
}
