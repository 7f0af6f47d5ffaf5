//! New TCP connections timed one at a time, for the live benchmarks that measure them
//! (`src/bin/live.rs`, `src/bin/flows.rs`, `src/bin/compare.rs`): an accept-and-close (or
//! accept-and-hold) server in a lab namespace, one `connect()` from a source port of its own then
//! closed with a RST (or left open), and the sorted times with nearest-rank percentiles. Also the
//! listening socket of `src/bin/verdicts.rs`'s servers.
//!
//! It touches only the sockets it makes: listeners (backlog [`BACKLOG`]) on the addresses it is
//! given, in the namespace given or the calling thread's, with a thread of their own for the
//! accept server; and one client socket at a time, bound to the source port it is given (the
//! callers take them from [`FIRST_CLIENT_PORT`]..=[`LAST_CLIENT_PORT`]).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, connect, listen as listen_fd, setsockopt, socket,
    sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use crate::lab::Netns;
use crate::report::percentile;

type Result<T> = std::result::Result<T, String>;

/// Listen backlog of the servers. std's `TcpListener::bind` uses 128: the connect loop opens
/// 30,000 connections a second without a filter, so an accept thread that is off the CPU for
/// 4 ms lets the queue overflow, the SYN is dropped and that connect() takes 1 s (the SYN
/// retransmission timeout). That was seen in live.rs, several times per run; with 4096 (the
/// default `net.core.somaxconn`) the queue holds more than a whole run.
pub const BACKLOG: i32 = 4096;

/// First client port of the connect loops; each connection binds a port of its own.
///
/// Every connection gets a source port of its own, so each one is a new 4-tuple. With ports
/// picked by the kernel, a run of 3,100 connections wraps around the ephemeral range (the
/// kernel advances its per-destination offset by 2 to 16 per connect) and reuses 4-tuples of
/// connections reset a fraction of a second earlier, whose conntrack entries (10 s in CLOSE)
/// and flowgate flows (`tcp_closing`, 10 s) still exist: those are not the plain new flows the
/// benchmarks measure (and flowgate did not always log them as new flows; see bench/README.md).
/// The ports stay below the ephemeral range (32768), where nothing else binds.
pub const FIRST_CLIENT_PORT: u16 = 10_000;
pub const LAST_CLIENT_PORT: u16 = 32_767;

/// How many source ports [`FIRST_CLIENT_PORT`]..=[`LAST_CLIENT_PORT`] holds.
pub fn client_ports() -> usize {
    usize::from(LAST_CLIENT_PORT - FIRST_CLIENT_PORT) + 1
}

/// A listening TCP socket on `addr` (SO_REUSEADDR, as std's, and a backlog of [`BACKLOG`]), in
/// the calling thread's namespace.
pub fn listen(addr: SocketAddrV4) -> Result<TcpListener> {
    let l = || -> nix::Result<TcpListener> {
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
        listen_fd(&fd, Backlog::new(BACKLOG)?)?;
        Ok(TcpListener::from(fd))
    };
    l().map_err(|e| format!("listen on {addr}: {e}"))
}

/// A TCP server that accepts connections and closes them at once ([`AcceptServer::start`]) or
/// keeps every one open until it is dropped ([`AcceptServer::holding`]), on one thread (no thread
/// per connection, so it costs the 2-core machine little). Stopped and joined on drop.
pub struct AcceptServer {
    listener: Arc<TcpListener>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AcceptServer {
    /// Listens on `addr` in `ns` and starts accepting (and closing).
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Result<AcceptServer> {
        AcceptServer::new(ns, addr, false)
    }

    /// Listens on `addr` in `ns` and starts accepting; every connection stays open (idle) until
    /// the server is dropped, then each is closed with a RST (SO_LINGER 0, so no TIME_WAIT).
    pub fn holding(ns: &Netns, addr: SocketAddrV4) -> Result<AcceptServer> {
        AcceptServer::new(ns, addr, true)
    }

    fn new(ns: &Netns, addr: SocketAddrV4, keep: bool) -> Result<AcceptServer> {
        let listener = Arc::new(ns.in_ns(move || listen(addr))?);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, n, s) = (listener.clone(), accepted.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("accept-{}", addr.port()))
            .spawn(move || {
                let mut held = Vec::new();
                loop {
                    match l.accept() {
                        Ok((conn, _)) => {
                            n.fetch_add(1, Ordering::Relaxed);
                            if keep {
                                held.push(conn);
                            }
                        }
                        Err(_) if s.load(Ordering::Acquire) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            eprintln!("{}: accept server on {addr}: {e}", crate::guard::tool());
                            break;
                        }
                    }
                }
                for conn in held {
                    let _ = setsockopt(&conn, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
                }
            })
            .map_err(|e| format!("cannot start the accept server: {e}"))?;
        Ok(AcceptServer { listener, accepted, stop, thread: Some(thread) })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for AcceptServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // shutdown() on a listening socket wakes a blocked accept() with EINVAL.
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection: a fresh socket bound to `port`, a blocking connect() (timed; SO_SNDTIMEO
/// bounds it to 5 s), then SO_LINGER 0 and close, which sends a RST (no TIME_WAIT).
pub fn connect_once(to: &SockaddrIn, port: u16) -> Result<Duration> {
    let (fd, dt) = connect_open(to, port)?;
    close_with_reset(fd)?;
    Ok(dt)
}

/// One connection left open: a fresh socket bound to `port` and a blocking connect() (timed;
/// SO_SNDTIMEO bounds it to 5 s). Close it with [`close_with_reset`].
pub fn connect_open(to: &SockaddrIn, port: u16) -> Result<(OwnedFd, Duration)> {
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::seconds(5)).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    let local = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    bind(fd.as_raw_fd(), &local).map_err(|e| format!("bind {local}: {e}"))?;
    let t0 = Instant::now();
    connect(fd.as_raw_fd(), to).map_err(|e| format!("connect {to}: {e}"))?;
    Ok((fd, t0.elapsed()))
}

/// SO_LINGER 0 and close: the connection ends with a RST (no TIME_WAIT).
pub fn close_with_reset(fd: OwnedFd) -> Result<()> {
    setsockopt(&fd, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 })
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    drop(fd);
    Ok(())
}

/// connect() times in µs, sorted.
#[derive(Debug, Default)]
pub struct Latencies(Vec<f64>);

impl Latencies {
    /// Sorts the times (µs).
    pub fn new(mut us: Vec<f64>) -> Latencies {
        us.sort_by(f64::total_cmp);
        Latencies(us)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nearest-rank percentile `q` (0 to 100), µs; NaN when there are none.
    pub fn p(&self, q: f64) -> f64 {
        percentile(&self.0, q)
    }

    /// The slowest, µs; NaN when there are none.
    pub fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }

    /// The mean, µs (0 when there are none).
    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len().max(1) as f64
    }

    /// How many took longer than `us`.
    pub fn over(&self, us: f64) -> usize {
        self.0.len() - self.0.partition_point(|&x| x <= us)
    }
}
