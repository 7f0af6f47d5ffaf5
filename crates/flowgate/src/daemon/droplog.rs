//! The kernel's log of the packets static rules dropped, turned into engine input.
//!
//! A flow a static rule drops never gets a conntrack entry (its first packet dies before the
//! entry is confirmed), so conntrack cannot tell of it. The static chains log each such packet to
//! NFLOG ([`statics::LOG_GROUP`]); one thread (`flowgate-drop-log`) reads the log and hands each
//! packet, with its hook and interface, to the engine its 5-tuple hashes to
//! ([`statics::engine_for`]), which counts it to its flow and, for the flow's first packet, opens
//! the flow with its `flow.new` and `flow.verdict` events. The thread never waits on an engine:
//! a full command channel loses the packets (counted), a socket overrun loses an unknown number
//! (counted as overruns); filtering is never affected, only the log of a drop.
//!
//! This room owns the NFLOG socket and the thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use flowgate_core::packet;
use flowgate_core::{Handle, KernelDrop, Protocol};
use flowgate_linux::ifname::IfNames;
use flowgate_linux::nflog::{Logged, Nflog};

use super::statics;

/// Packets taken per wake-up before they are handed over.
const BATCH: usize = 256;

/// What the drop log saw and lost.
#[derive(Debug, Default)]
pub(crate) struct DropLogStats {
    /// Logged packets handed to engines.
    pub(crate) logged: AtomicU64,
    /// Logged packets an engine's full command channel could not take.
    pub(crate) dropped: AtomicU64,
    /// Times the log socket overran: an unknown number of logs was lost each time.
    pub(crate) overruns: AtomicU64,
}

/// The running log reader.
pub(crate) struct DropLog {
    thread: JoinHandle<Result<(), String>>,
    pub(crate) stats: Arc<DropLogStats>,
}

impl DropLog {
    /// Binds the log group and starts the thread.
    pub(crate) fn start(handles: Vec<Handle>, stop: Arc<AtomicBool>, links: Arc<AtomicU64>) -> Result<DropLog, String> {
        let log = Nflog::bind(statics::LOG_GROUP, u16::MAX)
            .map_err(|e| format!("the log of kernel drops (NFLOG group {}): {e}", statics::LOG_GROUP))?;
        let stats = Arc::new(DropLogStats::default());
        let thread = {
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("flowgate-drop-log".into())
                .spawn(move || run(log, &handles, &stats, &stop, IfNames::following(links)))
                .map_err(|e| format!("cannot start the drop log thread: {e}"))?
        };
        Ok(DropLog { thread, stats })
    }

    /// Waits for the thread (after the stop flag was set).
    pub(crate) fn join(self) -> Option<String> {
        match self.thread.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("the drop log thread panicked".into()),
        }
    }
}

/// The engine a logged packet goes to, and the packet in the engine's terms.
fn route(l: Logged, engines: usize, names: &mut IfNames) -> Option<(usize, KernelDrop)> {
    let (origin, ifindex) = super::shard::origin_of(l.hook, l.indev, l.outdev);
    let p = packet::parse(&l.payload).ok()?;
    let protocol = match p.protocol {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Icmp if p.src.is_ipv6() => 58,
        Protocol::Icmp => 1,
        Protocol::Other(n) => n,
    };
    let k = statics::engine_for(protocol, p.src, p.src_port, p.dst, p.dst_port, engines);
    let interface = ifindex.and_then(|i| names.name(i)).cloned();
    Some((k, KernelDrop { origin, interface, packet: l.payload }))
}

fn run(
    mut log: Nflog,
    handles: &[Handle],
    stats: &DropLogStats,
    stop: &AtomicBool,
    mut names: IfNames,
) -> Result<(), String> {
    super::background();
    let mut logged = Vec::with_capacity(BATCH);
    let mut batches: Vec<Vec<KernelDrop>> = vec![Vec::new(); handles.len()];
    let mut overruns = 0;
    while !stop.load(Ordering::Acquire) {
        // Bounded wait so a stop request is seen within a quarter second.
        let logged_any = log.recv(&mut logged, 250).map_err(|e| format!("the log of kernel drops: {e}"))? > 0;
        for l in logged.drain(..) {
            if let Some((k, d)) = route(l, handles.len(), &mut names) {
                batches[k].push(d);
            }
        }
        for (h, batch) in handles.iter().zip(batches.iter_mut()) {
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            match h.kernel_drops(std::mem::take(batch), Duration::ZERO) {
                Ok(()) => stats.logged.fetch_add(n, Ordering::Relaxed),
                Err(_) => stats.dropped.fetch_add(n, Ordering::Relaxed),
            };
        }
        if log.overruns() != overruns {
            stats.overruns.fetch_add(log.overruns() - overruns, Ordering::Relaxed);
            overruns = log.overruns();
        }
        // As the conntrack event thread does: let the next logs gather (a flood of drops then
        // costs one wake-up per batch, not per packet).
        if !logged_any {
            continue;
        }
        std::thread::sleep(super::GATHER);
    }
    Ok(())
}
