//! The enforcer: carries out in the kernel what the engines decide away from a packet.
//!
//! When a verdict changes away from a packet (the CLI, a library handle, a reload), a connection
//! is adopted at start, or an idle flow closes, the flow's packets may never reach a queue worker
//! again. The enforcer, a thread of its own so that no queue waits on these syscalls, then acts in
//! the kernel through the flow's conntrack mark, which holds the verdict and the owning worker
//! (see [`flowgate_linux::marks`]):
//!
//! - allow: mark it allowed (the kernel passes it);
//! - drop: mark it rejected or silently dropped (the chains stop every further packet of it, in
//!   both directions) and, for a connection with a local end, destroy the local socket
//!   (`SOCK_DESTROY`): the application's pending or next call fails at once and a TCP peer gets a
//!   reset. A forwarded connection has no local socket: the mark makes the chains answer the next
//!   packet of either side with a reset or unreachable;
//! - recall: keep only the owner, so the chains queue its packets to the owner again;
//! - forget: clear flowgate's bits, so its next packet is judged as a new flow.
//!
//! At start, a connection conntrack does not track yet (nothing used conntrack on this host
//! before) gets an entry created with its mark, so its packets are routed and decided like any
//! other. The channel to the enforcer is bounded ([`CAPACITY`]): a worker that finds it full keeps
//! the rest in its engine's queue (one pending verdict per flow) and tries again a moment later.
//! Every action carried out is counted ([`EnforceStats`], for `flowgate stats` and the metrics),
//! at start as later. This room owns its conntrack and sock_diag sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use flowgate_core::{Enforce, KernelAction, Protocol};
use flowgate_linux::conntrack::{Conntrack, CtError, Tuple};
use flowgate_linux::marks;
use flowgate_linux::sockdiag::SockDiag;

/// Verdicts in flight to the enforcer.
pub(crate) const CAPACITY: usize = 4096;
/// Timeouts of entries created at start: conntrack's defaults for an established TCP connection
/// and a UDP stream (each packet renews them anyway).
const CREATED_TCP_TIMEOUT: u32 = 432_000;
const CREATED_UDP_TIMEOUT: u32 = 180;

/// The conntrack tuple of a flow from `from` to `to` (conntrack finds an entry by either
/// direction's tuple).
pub(crate) fn tuple(protocol: Protocol, from: SocketAddr, to: SocketAddr) -> Tuple {
    let protocol = match protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Icmp if from.is_ipv4() => 1,
        Protocol::Icmp => 58,
        Protocol::Other(n) => n,
    };
    Tuple { protocol, src: from.ip(), dst: to.ip(), src_port: from.port(), dst_port: to.port() }
}

/// What the enforcer did: actions by kind, what failed, local sockets destroyed.
#[derive(Debug, Default)]
pub(crate) struct EnforceStats {
    pub(crate) allow: AtomicU64,
    pub(crate) drop: AtomicU64,
    pub(crate) recall: AtomicU64,
    pub(crate) forget: AtomicU64,
    /// Actions whose conntrack mark could not be set or whose entry could not be created.
    pub(crate) failed: AtomicU64,
    /// Local sockets destroyed (`SOCK_DESTROY`) for dropped flows, and destroys that failed.
    pub(crate) sockets_destroyed: AtomicU64,
    pub(crate) socket_destroy_failures: AtomicU64,
}

impl EnforceStats {
    /// The counters as `flowgate stats` shows them.
    pub(crate) fn json(&self) -> serde_json::Value {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "allow": r(&self.allow),
            "drop": r(&self.drop),
            "recall": r(&self.recall),
            "forget": r(&self.forget),
            "failed": r(&self.failed),
            "sockets_destroyed": r(&self.sockets_destroyed),
            "socket_destroy_failures": r(&self.socket_destroy_failures),
        })
    }
}

/// The owner (worker index) of a flow, from its id: engine `k` of `n` hands out ids
/// `k + 1, k + 1 + n, ...`.
pub(crate) fn owner_of(id: flowgate_core::FlowId, engines: usize) -> usize {
    (id.0.saturating_sub(1) % engines.max(1) as u64) as usize
}

/// Carries out one verdict and counts it in `stats`. `create`: make a conntrack entry for a
/// connection that has none (adoption at start). Errors are returned for the log; a flow that
/// vanished meanwhile is not an error.
pub(crate) fn enforce(
    ct: &mut Conntrack,
    diag: Option<&mut SockDiag>,
    e: &Enforce,
    engines: usize,
    create: bool,
    stats: &EnforceStats,
) -> Result<(), String> {
    let kind = match e.action {
        KernelAction::Allow => &stats.allow,
        KernelAction::Drop { .. } => &stats.drop,
        KernelAction::Recall => &stats.recall,
        KernelAction::Forget => &stats.forget,
    };
    kind.fetch_add(1, Ordering::Relaxed);
    let marked = mark(ct, e, engines, create);
    if marked.is_err() {
        stats.failed.fetch_add(1, Ordering::Relaxed);
    }
    marked?;
    let f = &e.flow;
    if matches!(e.action, KernelAction::Drop { .. })
        && !f.forwarded
        && matches!(f.protocol, Protocol::Tcp | Protocol::Udp)
    {
        let proto = if f.protocol == Protocol::Tcp { 6 } else { 17 };
        if let Some(diag) = diag {
            match diag.destroy_matching(proto, f.local, f.remote) {
                Ok(n) => {
                    stats.sockets_destroyed.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(err) => {
                    stats.socket_destroy_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("flow {}: destroying its local socket: {err}", f.id));
                }
            }
        }
    }
    Ok(())
}

/// Sets the conntrack mark that carries a verdict (creating the entry if asked, see
/// [`enforce`]).
fn mark(ct: &mut Conntrack, e: &Enforce, engines: usize, create: bool) -> Result<(), String> {
    let f = &e.flow;
    let owner = marks::owner(owner_of(f.id, engines));
    let bits = match e.action {
        KernelAction::Allow => marks::ALLOW | owner,
        KernelAction::Drop { silent: false } => marks::REJECT | owner,
        KernelAction::Drop { silent: true } => marks::DROP | owner,
        KernelAction::Recall => owner,
        KernelAction::Forget => 0,
    };
    match ct.set_mark(&tuple(f.protocol, f.local, f.remote), bits, marks::MASK) {
        Ok(()) => {}
        Err(CtError::NotFound) if create && matches!(f.protocol, Protocol::Tcp | Protocol::Udp) => {
            // Conntrack's original direction is the opener's.
            let (from, to) = match f.direction {
                flowgate_core::Direction::Inbound if !f.forwarded => (f.remote, f.local),
                _ => (f.local, f.remote),
            };
            let timeout = if f.protocol == Protocol::Tcp { CREATED_TCP_TIMEOUT } else { CREATED_UDP_TIMEOUT };
            ct.create(&tuple(f.protocol, from, to), bits, timeout)
                .map_err(|err| format!("flow {}: creating its conntrack entry: {err}", f.id))?;
        }
        Err(CtError::NotFound) => {}
        Err(err) => return Err(format!("flow {}: setting its conntrack mark: {err}", f.id)),
    }
    Ok(())
}

/// The enforcer thread and the channel to it.
pub(crate) struct Enforcer {
    pub(crate) tx: SyncSender<Enforce>,
    thread: JoinHandle<()>,
}

impl Enforcer {
    /// Starts the thread; what it does is counted in `stats`.
    pub(crate) fn start(engines: usize, stats: Arc<EnforceStats>) -> Result<Enforcer, String> {
        let mut ct = Conntrack::open().map_err(|e| format!("conntrack: {e}"))?;
        // Without sock_diag destroy, drops still hold through the conntrack mark; say so once.
        let mut diag = match SockDiag::open() {
            Ok(d) => Some(d),
            Err(e) => {
                log::warn!("sock_diag unavailable ({e}): blocked connections end at their next packet");
                None
            }
        };
        let (tx, rx): (SyncSender<Enforce>, Receiver<Enforce>) = sync_channel(CAPACITY);
        let thread = std::thread::Builder::new()
            .name("flowgate-enforce".into())
            .spawn(move || {
                for e in rx {
                    match enforce(&mut ct, diag.as_mut(), &e, engines, false, &stats) {
                        Ok(()) => log::debug!("enforced {:?} on flow {}", e.action, e.flow.id),
                        Err(err) => log::warn!("{err}"),
                    }
                }
            })
            .map_err(|e| format!("cannot start the enforcer: {e}"))?;
        Ok(Enforcer { tx, thread })
    }

    /// Waits for every queued verdict to be carried out (after all senders are gone).
    pub(crate) fn finish(self) {
        drop(self.tx);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::FlowId;

    #[test]
    fn owners_follow_the_engines_id_spacing() {
        // Engine k of 3 hands out k+1, k+1+3, ...
        for k in 0..3u64 {
            for step in 0..5 {
                assert_eq!(owner_of(FlowId(k + 1 + 3 * step), 3), k as usize);
            }
        }
        assert_eq!(owner_of(FlowId(7), 1), 0);
        assert_eq!(owner_of(FlowId(0), 2), 0, "no id is 0, but it must not underflow");
    }
}
