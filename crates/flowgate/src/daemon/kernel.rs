//! What the kernel knows about flows it handles alone: conntrack, turned into engine reports.
//!
//! Once a flow is settled its packets no longer reach user space, so its end and its counts come
//! from conntrack. A thread listens for conntrack's destroy events and hands each one to every
//! queue worker's engine (the one that owns the flow closes it; the others ignore it); the
//! control socket dumps the table before listing flows so their counters are current. This room
//! owns the conntrack sockets.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use flowgate_core::{Handle, KernelReport, Protocol};
use flowgate_linux::conntrack::{Conntrack, Entry, EventKind};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Converts a conntrack entry into the engine's terms.
pub(crate) fn report(e: &Entry, ended: bool) -> KernelReport {
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
        ended,
    }
}

/// Sends current conntrack counters of every entry to the engines (before a listing).
pub(crate) fn refresh_counters(handles: &[Handle]) -> Result<(), String> {
    let mut ct = Conntrack::open().map_err(|e| format!("conntrack: {e}"))?;
    let mut reports = Vec::new();
    ct.dump(|e| reports.push(report(e, false))).map_err(|e| format!("conntrack dump: {e}"))?;
    for r in reports {
        for h in handles {
            let _ = h.kernel_report(r);
        }
    }
    Ok(())
}

/// Starts the thread that passes conntrack's destroy events to the engines.
pub(crate) fn watch_ends(
    handles: Vec<Handle>,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<Result<(), String>>, String> {
    let mut ct = Conntrack::open_events(false, false, true).map_err(|e| format!("conntrack events: {e}"))?;
    std::thread::Builder::new()
        .name("flowgate-conntrack".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                // Bounded wait so a stop request is seen within a quarter second.
                let mut fds = [PollFd::new(ct.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(250u16)) {
                    Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                    Ok(_) => {}
                    Err(e) => return Err(format!("conntrack events: poll: {e}")),
                }
                loop {
                    let n = ct
                        .recv_events(|ev| {
                            if matches!(ev.kind, EventKind::Destroy) {
                                let r = report(&ev.entry, true);
                                for h in &handles {
                                    let _ = h.kernel_report(r);
                                }
                            }
                        })
                        .map_err(|e| format!("conntrack events: {e}"))?;
                    if n == 0 {
                        break;
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| format!("cannot start the conntrack thread: {e}"))
}
