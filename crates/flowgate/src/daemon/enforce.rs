//! The enforcer: carries out verdicts on flows the kernel handles alone.
//!
//! When a verdict changes away from a packet (the CLI, a library handle, a reload) or a
//! connection is adopted at start, the flow's packets may never reach a queue worker again. The
//! enforcer, a thread of its own so that no queue waits on these syscalls, then acts in the
//! kernel: it sets the flow's conntrack mark (allow: the kernel passes it; drop: the chains reject
//! or drop every further packet of it, in both directions) and, for a drop of a connection with
//! a local end, destroys the local socket (`SOCK_DESTROY`): the application's pending or next call
//! fails at once and a TCP peer gets a reset. A forwarded connection has no local socket: the
//! mark makes the chains answer the next packet of either side with a reset or unreachable. This
//! room owns its conntrack and sock_diag sockets.

use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use flowgate_core::{Enforce, FlowVerdict, Protocol};
use flowgate_linux::conntrack::{Conntrack, CtError, Tuple};
use flowgate_linux::marks;
use flowgate_linux::sockdiag::SockDiag;

/// The conntrack tuple of a flow (conntrack finds an entry by either direction's tuple).
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

/// Carries out one verdict. Errors are returned for the log; a flow that vanished meanwhile is
/// not an error.
pub(crate) fn enforce(ct: &mut Conntrack, diag: Option<&mut SockDiag>, e: &Enforce) -> Result<(), String> {
    let f = &e.flow;
    let bits = match (e.verdict, e.silent) {
        (FlowVerdict::Drop, false) => marks::REJECT,
        (FlowVerdict::Drop, true) => marks::DROP,
        _ => marks::ALLOW,
    };
    match ct.set_mark(&tuple(f.protocol, f.local, f.remote), bits, marks::MASK) {
        Ok(()) | Err(CtError::NotFound) => {}
        Err(err) => return Err(format!("flow {}: setting its conntrack mark: {err}", f.id)),
    }
    if e.verdict == FlowVerdict::Drop && !f.forwarded && matches!(f.protocol, Protocol::Tcp | Protocol::Udp) {
        let proto = if f.protocol == Protocol::Tcp { 6 } else { 17 };
        if let Some(diag) = diag {
            diag.destroy_matching(proto, f.local, f.remote)
                .map_err(|err| format!("flow {}: destroying its local socket: {err}", f.id))?;
        }
    }
    Ok(())
}

/// The enforcer thread and the channel to it.
pub(crate) struct Enforcer {
    pub(crate) tx: Sender<Enforce>,
    thread: JoinHandle<()>,
}

impl Enforcer {
    pub(crate) fn start() -> Result<Enforcer, String> {
        let mut ct = Conntrack::open().map_err(|e| format!("conntrack: {e}"))?;
        // Without sock_diag destroy, drops still hold through the conntrack mark; say so once.
        let mut diag = match SockDiag::open() {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("flowgate: sock_diag unavailable ({e}): blocked connections end at their next packet");
                None
            }
        };
        let (tx, rx): (Sender<Enforce>, Receiver<Enforce>) = channel();
        let thread = std::thread::Builder::new()
            .name("flowgate-enforce".into())
            .spawn(move || {
                for e in rx {
                    if let Err(err) = enforce(&mut ct, diag.as_mut(), &e) {
                        eprintln!("flowgate: {err}");
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
