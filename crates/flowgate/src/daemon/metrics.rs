//! The metrics listener: the daemon's counters as Prometheus text at `GET /metrics`, over HTTP
//! on a TCP address or a Unix socket (config key `metrics`; off unless set).
//!
//! One source of truth: the text is rendered from the very JSON that `flowgate stats` gets over
//! the control socket (the daemon's stats function, see `super::stats_json`), at each scrape, so
//! the two never disagree and a counter added to the stats is one [`render`] line away from
//! being a metric. Nothing here touches a queue worker: the workers publish their counters
//! under their own locks after each wake-up, and a scrape only reads those copies.
//!
//! The listener is a thread of its own (`flowgate-metrics`) waiting in `poll(2)` on the socket
//! and an eventfd that stops it. Each connection gets a thread of its own (`flowgate-scrape`, at
//! background priority), at most [`MAX_CONNECTIONS`] at once (more are answered 503 at once and
//! closed); its request head must arrive within [`READ_DEADLINE`], all of it, and be at most
//! [`MAX_REQUEST`] bytes, so a silent, slow or oversized client costs one slot for a few seconds
//! and holds up no other scrape, and never the packet path. `GET /metrics` (a query string is
//! ignored) is answered 200; any other path 404; another method on `/metrics` 405. One request
//! per connection (`Connection: close`). A Unix socket is created like the control socket: mode
//! 0600, or 0660 for the `control_group`, and removed at stop.
//!
//! Why by hand, not with the `prometheus-client` crate: that crate is built around metric
//! objects registered once and updated in place (atomics behind `Arc`s, a registry, a derive
//! macro for label sets), and encodes OpenMetrics. Here the values already exist as a snapshot
//! (the stats JSON, built from each worker's plain counters), and the text exposition format
//! 0.0.4 that every Prometheus scraper reads is a few `# HELP`/`# TYPE` lines and `name{labels}
//! value` samples with three escapes; rendering it directly keeps one source of truth, adds no
//! dependency to the binary, and is checked against Python's `prometheus_client` parser by the
//! live tests. Likewise the HTTP side is a single fixed route answered from std sockets; an HTTP
//! server crate would bring an async runtime or far more than this needs.
//!
//! This room owns its listening socket (and the Unix socket's file) and the threads it starts.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::EventFd;
use nix::unistd::Gid;
use serde_json::Value;

use super::tally::LATENCY_BOUNDS_NS;
use crate::config::MetricsAddr;

/// Connections served at once; more are answered 503 and closed.
pub(crate) const MAX_CONNECTIONS: usize = 4;
/// Longest request head (request line and headers).
pub(crate) const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its whole request head, and to take each write of the
/// answer.
pub(crate) const READ_DEADLINE: Duration = Duration::from_secs(5);

/// The daemon's stats, as `flowgate stats` gets them.
pub(crate) type StatsFn = dyn Fn() -> Value + Send + Sync;

/// A bound listening socket. A Unix socket's file goes with it.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(c, _)| Conn::Tcp(c)),
            Listener::Unix(l, _) => l.accept().map(|(c, _)| Conn::Unix(c)),
        }
    }
}

/// Binds `addr` (before anything touches the kernel's filter, so a taken port stops the start
/// with nothing to undo). A Unix socket gets mode 0600 (root), or 0660 and the group `group`.
pub(crate) fn bind(addr: &MetricsAddr, group: Option<Gid>) -> Result<Listener, String> {
    let listener = match addr {
        MetricsAddr::Tcp(a) => {
            let l = TcpListener::bind(a).map_err(|e| format!("metrics: cannot listen on {a}: {e}"))?;
            Listener::Tcp(l)
        }
        MetricsAddr::Unix(path) => {
            let shown = path.display();
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_socket() => {
                    if UnixStream::connect(path).is_ok() {
                        return Err(format!("metrics: {shown}: another process serves on this socket"));
                    }
                    // A dead instance's socket.
                    std::fs::remove_file(path)
                        .map_err(|e| format!("metrics: {shown}: cannot remove a stale socket: {e}"))?;
                }
                Ok(_) => return Err(format!("metrics: {shown}: exists and is not a socket (it is left alone)")),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(format!("metrics: {shown}: {e}")),
            }
            let l = UnixListener::bind(path).map_err(|e| format!("metrics: {shown}: cannot create socket: {e}"))?;
            let mode = if group.is_some() { 0o660 } else { 0o600 };
            let owned = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("metrics: {shown}: cannot set permissions: {e}"))
                .and_then(|()| match group {
                    Some(gid) => nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
                        .map_err(|e| format!("metrics: {shown}: cannot give the socket to group {gid}: {e}")),
                    None => Ok(()),
                });
            if let Err(e) = owned {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            Listener::Unix(l, path.clone())
        }
    };
    let nonblocking = match &listener {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l, _) => l.set_nonblocking(true),
    };
    nonblocking.map_err(|e| format!("metrics: {addr}: {e}"))?;
    Ok(listener)
}

/// The running listener.
pub(crate) struct Server {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Stops accepting; the socket closes (a Unix socket's file is removed). Scrapes under way
    /// finish on their own, within their deadline.
    pub(crate) fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `listener` on a thread of its own until [`Server::stop`].
pub(crate) fn serve(listener: Listener, stats: Arc<StatsFn>) -> Result<Server, String> {
    let wake = super::shard::wake_fd().map_err(|e| format!("metrics: cannot make an eventfd: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (wake, stop) = (wake.clone(), stop.clone());
        std::thread::Builder::new()
            .name("flowgate-metrics".into())
            .spawn(move || accept_loop(&listener, &wake, &stop, &stats))
            .map_err(|e| format!("metrics: cannot start the listener thread: {e}"))?
    };
    Ok(Server { stop, wake, thread: Some(thread) })
}

fn accept_loop(listener: &Listener, wake: &EventFd, stop: &AtomicBool, stats: &Arc<StatsFn>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN), PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                // Should not happen; never spin on it.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        }
        loop {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    // Out of descriptors or memory: back off instead of spinning.
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            };
            conn.set_timeouts(READ_DEADLINE);
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                let mut conn = conn;
                conn.set_timeouts(Duration::from_millis(10));
                let _ = respond(
                    &mut conn,
                    503,
                    "Service Unavailable",
                    &[("Retry-After", "1")],
                    "too many scrapes at once\n",
                );
                // A short linger, on this thread: it must not wait on a client for long.
                linger(conn, Duration::from_millis(10));
                continue;
            }
            let (stats, slot) = (stats.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("flowgate-scrape".into()).spawn(move || {
                super::background();
                answer(conn, &*stats);
                slot.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_err() {
                // The connection was dropped with the closure; its slot too.
                active.fetch_sub(1, Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A connection over TCP or a Unix socket.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_timeouts(&self, d: Duration) {
        let _ = match self {
            Conn::Tcp(c) => c.set_read_timeout(Some(d)).and_then(|()| c.set_write_timeout(Some(d))),
            Conn::Unix(c) => c.set_read_timeout(Some(d)).and_then(|()| c.set_write_timeout(Some(d))),
        };
    }

    fn set_read_timeout(&self, d: Duration) -> std::io::Result<()> {
        match self {
            Conn::Tcp(c) => c.set_read_timeout(Some(d)),
            Conn::Unix(c) => c.set_read_timeout(Some(d)),
        }
    }

    fn shutdown_write(&self) {
        let _ = match self {
            Conn::Tcp(c) => c.shutdown(std::net::Shutdown::Write),
            Conn::Unix(c) => c.shutdown(std::net::Shutdown::Write),
        };
    }
}

/// Most bytes read from a client after its answer, while waiting for it to close.
const LINGER_BYTES: usize = 64 * 1024;

/// Closes after the answer without losing it: the write side first, then what the client still
/// sends is read and thrown away (for at most `wait` and [`LINGER_BYTES`]). Closing a TCP socket
/// with unread bytes would send a reset, and the client could lose the answer to it.
fn linger(mut conn: Conn, wait: Duration) {
    conn.shutdown_write();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    let mut read = 0;
    while read < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.set_read_timeout(left).is_err() {
            return;
        }
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(c) => c.read(buf),
            Conn::Unix(c) => c.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(c) => c.write(buf),
            Conn::Unix(c) => c.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(c) => c.flush(),
            Conn::Unix(c) => c.flush(),
        }
    }
}

/// Why a request was not served.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    /// The client went away before sending a whole request head.
    Gone,
    /// Not all of it within [`READ_DEADLINE`].
    Timeout,
    /// Longer than [`MAX_REQUEST`].
    TooLarge,
    /// Not an HTTP request line.
    Malformed,
}

/// Reads the request head (up to the blank line) within one deadline for all of it.
fn read_head(conn: &mut Conn) -> Result<Vec<u8>, Refused> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Refused::Timeout);
        }
        conn.set_read_timeout(left).map_err(|_| Refused::Gone)?;
        let n = match conn.read(&mut buf) {
            Ok(0) => return Err(Refused::Gone),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(Refused::Timeout),
            Err(_) => return Err(Refused::Gone),
        };
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if let Some(end) = find_blank_line(head.get(from..).unwrap_or_default()) {
            head.truncate(from + end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST {
            return Err(Refused::TooLarge);
        }
    }
}

/// Where the head's blank line ends (`\r\n\r\n`, or `\n\n` from lax clients).
fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The status line and extra headers of an answer.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    code: u16,
    reason: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

/// What to answer a request head.
fn route(head: &[u8]) -> Result<Status, Refused> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = std::str::from_utf8(line).map_err(|_| Refused::Malformed)?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused::Malformed);
    };
    if method.is_empty() || !version.starts_with("HTTP/1.") {
        return Err(Refused::Malformed);
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok(match (path, method) {
        ("/metrics", "GET") => Status { code: 200, reason: "OK", headers: &[] },
        ("/metrics", _) => Status { code: 405, reason: "Method Not Allowed", headers: &[("Allow", "GET")] },
        _ => Status { code: 404, reason: "Not Found", headers: &[] },
    })
}

fn answer(mut conn: Conn, stats: &StatsFn) {
    let routed = read_head(&mut conn).and_then(|head| route(&head));
    let answered = match routed {
        Ok(Status { code: 200, reason, headers }) => {
            let body = render(&stats());
            respond(&mut conn, 200, reason, headers, &body)
        }
        Ok(Status { code, reason, headers }) => {
            respond(&mut conn, code, reason, headers, &format!("{code} {reason}: flowgate serves GET /metrics\n"))
        }
        Err(Refused::Gone) => return,
        Err(Refused::Timeout) => respond(&mut conn, 408, "Request Timeout", &[], "no whole request in time\n"),
        Err(Refused::TooLarge) => {
            respond(&mut conn, 431, "Request Header Fields Too Large", &[], "request too large\n")
        }
        Err(Refused::Malformed) => respond(&mut conn, 400, "Bad Request", &[], "not an HTTP/1 request\n"),
    };
    if answered.is_ok() {
        linger(conn, Duration::from_millis(500));
    }
}

fn respond(conn: &mut Conn, status: u16, reason: &str, headers: &[(&str, &str)], body: &str) -> std::io::Result<()> {
    let content_type =
        if status == 200 { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain; charset=utf-8" };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

// ---- the text exposition format

/// Prometheus text (exposition format 0.0.4), written a family at a time.
struct Text {
    out: String,
}

impl Text {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = write!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    /// One sample. Label values are escaped (`\`, `"`, newline); names are ours.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family with one unlabelled sample, if the stats have the value.
    fn one(&mut self, name: &str, kind: &str, help: &str, value: Option<u64>) {
        self.family(name, kind, help);
        if let Some(v) = value {
            self.sample(name, &[], v);
        }
    }
}

fn at<'a>(v: &'a Value, pointer: &str) -> Option<&'a Value> {
    v.pointer(pointer)
}

fn num(v: &Value, pointer: &str) -> Option<u64> {
    at(v, pointer).and_then(Value::as_u64)
}

fn list<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    at(v, pointer).and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default()
}

fn string<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// Renders the stats (as `flowgate stats --json` prints them) as Prometheus text. The README's
/// "Metrics" section lists every family and what it means.
pub(crate) fn render(s: &Value) -> String {
    let mut t = Text { out: String::with_capacity(16 * 1024) };
    flows(&mut t, s);
    queues(&mut t, s);
    latency(&mut t, s);
    kernel(&mut t, s);
    packet_stage(&mut t, s);
    t.out
}

const VERDICTS: [&str; 4] = ["allow", "drop", "inspect", "pause"];

fn flows(t: &mut Text, s: &Value) {
    t.family(
        "flowgate_flows_judged_total",
        "counter",
        "Flows given their first verdict, by verdict and by the rule that gave it (default: the default action; provider: a product's filter; kept: a verdict kept from a previous instance). Rules a reload removed are no longer listed.",
    );
    for r in list(s, "/verdicts") {
        let rule = string(r, "rule");
        for verdict in VERDICTS {
            if let Some(n) = r.get(verdict).and_then(Value::as_u64) {
                t.sample("flowgate_flows_judged_total", &[("verdict", verdict), ("rule", rule)], n);
            }
        }
    }
    t.family(
        "flowgate_flow_updates_total",
        "counter",
        "Later changes of a flow's verdict, by new verdict and source (provider: a product's filter on data; handle: the library, CLI or control socket; peek: an inspect window ended; rules: a reload; host: the rules again once the host name was known; overlap: overlapping segments with different bytes; timeout: held bytes waited past hold_timeout).",
    );
    for verdict in VERDICTS {
        for (source, n) in at(s, &format!("/updates/{verdict}")).and_then(Value::as_object).into_iter().flatten() {
            if let Some(n) = n.as_u64() {
                t.sample("flowgate_flow_updates_total", &[("verdict", verdict), ("source", source)], n);
            }
        }
    }
    t.one(
        "flowgate_flows_live",
        "gauge",
        "Flows tracked now, the kernel-handled ones included.",
        num(s, "/total/flows"),
    );
    t.one(
        "flowgate_flows_opened_total",
        "counter",
        "Flows opened (first packet judged, or adopted at start).",
        num(s, "/total/flows_opened"),
    );
    t.family(
        "flowgate_flows_closed_total",
        "counter",
        "Flows closed, by reason (fin, rst, idle, conntrack: the kernel's end of a kernel-handled flow, end: shutdown, reused: a new connection on the same ports).",
    );
    for (reason, n) in at(s, "/closed").and_then(Value::as_object).into_iter().flatten() {
        if let Some(n) = n.as_u64() {
            t.sample("flowgate_flows_closed_total", &[("reason", reason)], n);
        }
    }
    t.one(
        "flowgate_untracked_packets_total",
        "counter",
        "Packets of new flows refused a place in the flow table (max_flows): they got the fail mode's verdict, untracked.",
        num(s, "/total/untracked"),
    );
    t.family(
        "flowgate_unparsable_packets_total",
        "counter",
        "Packets that could not be parsed, by kind; they get the `unparsable` verdict.",
    );
    for (kind, key) in
        [("truncated", "truncated"), ("malformed", "malformed"), ("fragment", "fragments"), ("not_ip", "not_ip")]
    {
        if let Some(n) = num(s, &format!("/total/{key}")) {
            t.sample("flowgate_unparsable_packets_total", &[("kind", kind)], n);
        }
    }
    t.one(
        "flowgate_provider_faults_total",
        "counter",
        "Calls to a product's flow filter that panicked or ran over their budget (the flow got the fail mode's verdict).",
        num(s, "/total/provider_faults"),
    );
    t.one(
        "flowgate_held_packets",
        "gauge",
        "Packets held now (inspected or paused flows).",
        num(s, "/total/held_packets"),
    );
    t.one(
        "flowgate_held_overflow_packets_total",
        "counter",
        "Packets dropped because too many were held.",
        num(s, "/total/held_overflow"),
    );
    t.one(
        "flowgate_enforce_deferred_total",
        "counter",
        "Times a verdict change had to wait because the enforcer's channel was full.",
        num(s, "/total/enforce_deferred"),
    );
    t.one(
        "flowgate_commands_refused_total",
        "counter",
        "Commands to a queue worker (CLI, library, conntrack) refused because its channel was full.",
        num(s, "/total/commands_refused"),
    );
    t.family(
        "flowgate_enforce_actions_total",
        "counter",
        "Verdicts carried out in the kernel away from a packet (conntrack mark), by action: allow, drop, recall (judge its packets again), forget (a closed flow).",
    );
    for action in ["allow", "drop", "recall", "forget"] {
        if let Some(n) = num(s, &format!("/enforce/{action}")) {
            t.sample("flowgate_enforce_actions_total", &[("action", action)], n);
        }
    }
    t.one(
        "flowgate_enforce_failures_total",
        "counter",
        "Enforcement actions whose conntrack mark could not be set.",
        num(s, "/enforce/failed"),
    );
    t.one(
        "flowgate_sockets_destroyed_total",
        "counter",
        "Local sockets of dropped flows destroyed (SOCK_DESTROY: the application gets an error, a TCP peer a reset).",
        num(s, "/enforce/sockets_destroyed"),
    );
    t.one(
        "flowgate_socket_destroy_failures_total",
        "counter",
        "Socket destroys that failed (the conntrack mark still stops the flow at its next packet).",
        num(s, "/enforce/socket_destroy_failures"),
    );
    t.one("flowgate_events_written_total", "counter", "Flow events written to the log.", num(s, "/events/written"));
    t.one(
        "flowgate_events_dropped_total",
        "counter",
        "Flow events dropped because the writer's channel was full (the log could not keep up).",
        num(s, "/total/events_dropped"),
    );
    t.one(
        "flowgate_event_write_failures_total",
        "counter",
        "Flow events lost because writing them failed.",
        num(s, "/events/write_failures"),
    );
}

fn queues(t: &mut Text, s: &Value) {
    t.family(
        "flowgate_queue_packets_total",
        "counter",
        "Packets a queue worker read from its NFQUEUE queue, by stage (flow, packet) and queue.",
    );
    for (stage, pointer) in [("flow", "/workers"), ("packet", "/packet_stage/workers")] {
        for w in list(s, pointer) {
            if let (Some(q), Some(n)) =
                (w.get("queue").and_then(Value::as_u64), w.get("packets").and_then(Value::as_u64))
            {
                t.sample("flowgate_queue_packets_total", &[("stage", stage), ("queue", &q.to_string())], n);
            }
        }
    }
    t.family(
        "flowgate_queue_socket_overruns_total",
        "counter",
        "Times a flow queue's netlink socket overran (ENOBUFS): the kernel could not deliver an unknown number of packets.",
    );
    for w in list(s, "/workers") {
        if let (Some(q), Some(n)) =
            (w.get("queue").and_then(Value::as_u64), w.get("queue_overruns").and_then(Value::as_u64))
        {
            t.sample("flowgate_queue_socket_overruns_total", &[("queue", &q.to_string())], n);
        }
    }
    t.family(
        "flowgate_queue_waiting_packets",
        "gauge",
        "Packets in a queue waiting for their verdict, as the kernel counts them (/proc/net/netfilter/nfnetlink_queue).",
    );
    let kq = list(s, "/kernel_queues");
    for q in kq {
        if let (Some(n), Some(num)) = (q.get("waiting").and_then(Value::as_u64), q.get("queue").and_then(Value::as_u64))
        {
            t.sample(
                "flowgate_queue_waiting_packets",
                &[("stage", string(q, "stage")), ("queue", &num.to_string())],
                n,
            );
        }
    }
    t.family(
        "flowgate_queue_kernel_dropped_total",
        "counter",
        "Packets the kernel dropped for a queue (fail closed only), by reason: queue_full, socket_full.",
    );
    for q in kq {
        let Some(num) = q.get("queue").and_then(Value::as_u64) else { continue };
        for (reason, key) in [("queue_full", "dropped"), ("socket_full", "user_dropped")] {
            if let Some(n) = q.get(key).and_then(Value::as_u64) {
                t.sample(
                    "flowgate_queue_kernel_dropped_total",
                    &[("stage", string(q, "stage")), ("queue", &num.to_string()), ("reason", reason)],
                    n,
                );
            }
        }
    }
    t.family(
        "flowgate_queue_rule_packets_total",
        "counter",
        "Packets flowgate's NFQUEUE rules matched (iptables counters), by stage and address family: queued, or passed by --queue-bypass, or dropped by a full fail-closed queue. The packet stage's counts restart when a reload changes its chains.",
    );
    for r in list(s, "/queue_rules") {
        if let Some(n) = r.get("packets").and_then(Value::as_u64) {
            t.sample(
                "flowgate_queue_rule_packets_total",
                &[("stage", string(r, "stage")), ("family", string(r, "family"))],
                n,
            );
        }
    }
    t.one(
        "flowgate_fail_open",
        "gauge",
        "1 when the daemon fails open (traffic passes unjudged while no one answers or a queue is full), 0 when it fails closed.",
        at(s, "/fail").and_then(Value::as_str).map(|f| u64::from(f == "open")),
    );
    t.one(
        "flowgate_fail_open_bypassed_packets",
        "gauge",
        "An estimate of the flow stage's packets that passed unjudged because a fail-open queue was full or its socket was: packets its NFQUEUE rules matched, less those the workers read, those waiting, and those the kernel dropped. Read at one scrape; lags and may read low under load; absent when failing closed or when the counters cannot be read.",
        num(s, "/bypass/flow/bypassed"),
    );
}

fn latency(t: &mut Text, s: &Value) {
    let name = "flowgate_verdict_latency_seconds";
    t.family(
        name,
        "histogram",
        "Time from a queue worker's receipt of a packet to the send of its verdict, all flow queue workers (held packets are not timed).",
    );
    let buckets: Vec<u64> = list(s, "/latency/buckets").iter().filter_map(Value::as_u64).collect();
    let (Some(count), Some(sum_ns)) = (num(s, "/latency/count"), num(s, "/latency/sum_ns")) else { return };
    if buckets.len() != LATENCY_BOUNDS_NS.len() + 1 {
        return;
    }
    let mut cumulative = 0;
    for (bound, n) in LATENCY_BOUNDS_NS.iter().zip(&buckets) {
        cumulative += n;
        let le = (*bound as f64 / 1e9).to_string();
        t.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative);
    }
    t.sample(&format!("{name}_bucket"), &[("le", "+Inf")], count);
    t.sample(&format!("{name}_sum"), &[], sum_ns as f64 / 1e9);
    t.sample(&format!("{name}_count"), &[], count);
}

fn kernel(t: &mut Text, s: &Value) {
    t.one(
        "flowgate_conntrack_reports_total",
        "counter",
        "Conntrack reports (events and sync entries) passed to the queue workers.",
        num(s, "/conntrack/reports"),
    );
    t.one(
        "flowgate_conntrack_reports_dropped_total",
        "counter",
        "Conntrack reports a worker's full channel could not take (the next sync repairs them).",
        num(s, "/conntrack/reports_dropped"),
    );
    t.one(
        "flowgate_conntrack_event_overruns_total",
        "counter",
        "Times conntrack's event socket overran (ENOBUFS): an unknown number of events was lost each time.",
        num(s, "/conntrack/event_overruns"),
    );
    t.one("flowgate_conntrack_syncs_total", "counter", "Full conntrack table dumps done.", num(s, "/conntrack/syncs"));
    t.family("flowgate_conntrack_last_sync_seconds", "gauge", "How long the last conntrack sync took.");
    if let Some(ms) = at(s, "/conntrack/last_sync_ms").and_then(Value::as_f64) {
        t.sample("flowgate_conntrack_last_sync_seconds", &[], ms / 1000.0);
    }
    t.one(
        "flowgate_conntrack_last_sync_entries",
        "gauge",
        "Conntrack entries in the last sync's dump.",
        num(s, "/conntrack/last_sync_entries"),
    );
    t.one(
        "flowgate_kernel_lost_flows_total",
        "counter",
        "Kernel-handled flows closed because two syncs in a row did not find their conntrack entry (their end was never reported).",
        num(s, "/total/kernel_lost"),
    );
    t.one(
        "flowgate_kernel_decided_flows_total",
        "counter",
        "Flows a static rule decided in the kernel (never queued to user space), first heard of from conntrack or from the log of a kernel drop.",
        num(s, "/total/kernel_decided"),
    );
    for (key, kind, help) in [
        ("logged", "counter", "Packets static rules dropped in the kernel whose log reached an engine."),
        ("dropped", "counter", "Logs of kernel drops lost because an engine's command channel was full."),
        ("overruns", "counter", "Times the kernel-drop log socket overran (an unknown number of logs lost each time)."),
    ] {
        t.one(&format!("flowgate_drop_log_{key}_total"), kind, help, num(s, &format!("/drop_log/{key}")));
    }
    for (key, help) in [
        ("kernel", "Flow owners found by the kernel capture."),
        ("proc", "Flow owners found through /proc."),
        ("unknown", "Flows whose owner could not be found."),
        ("dropped", "Owner questions the lookup thread's full channel could not take (answered unknown)."),
    ] {
        t.one(&format!("flowgate_owner_lookups_{key}_total"), "counter", help, num(s, &format!("/owners/{key}")));
    }
    for (key, help) in [
        ("owner_held", "New flows held until their owner was known (a rule naming an owner could decide them)."),
        ("owner_timeouts", "Owners not known within attribution_wait (then unknown)."),
        ("hosts_found", "Flows whose own first bytes named their host (TLS SNI, QUIC SNI, HTTP Host)."),
        ("dns_learnt", "Addresses learnt from DNS answers (names for the host rules)."),
        ("overlap_conflicts", "Overlapping TCP segments whose bytes differed from the first copy (evasion attempts)."),
        ("out_of_window", "Segments of an inspected stream that started past the span kept, dropped."),
        ("hold_timeouts", "Flows whose held bytes waited past hold_timeout for a verdict."),
    ] {
        t.one(&format!("flowgate_{key}_total"), "counter", help, num(s, &format!("/total/{key}")));
    }
}

fn packet_stage(t: &mut Text, s: &Value) {
    let interfaces = list(s, "/packet_stage/interfaces");
    for (key, help) in [
        ("packets", "Packets the packet stage judged, by interface and direction."),
        ("bytes", "Bytes (IP) the packet stage judged, by interface and direction."),
        ("dropped", "Packets the packet stage dropped, by interface and direction."),
        ("delayed", "Packets the product's packet filter delayed, by interface and direction."),
    ] {
        let name = format!("flowgate_packet_stage_{key}_total");
        t.family(&name, "counter", help);
        for i in interfaces {
            if let Some(n) = i.get(key).and_then(Value::as_u64) {
                t.sample(&name, &[("interface", string(i, "name")), ("direction", string(i, "direction"))], n);
            }
        }
    }
    let rules = list(s, "/packet_stage/rules");
    for (key, help) in [
        ("packets", "Packets each packet rule matched, by rule and action."),
        ("bytes", "Bytes (IP) of the packets each packet rule matched, by rule and action."),
    ] {
        let name = format!("flowgate_packet_rule_{key}_total");
        t.family(&name, "counter", help);
        for r in rules {
            if let Some(n) = r.get(key).and_then(Value::as_u64) {
                t.sample(&name, &[("rule", string(r, "name")), ("action", string(r, "action"))], n);
            }
        }
    }
    for (name, kind, key, help) in [
        ("flowgate_packet_stage_released_total", "counter", "released", "Delayed packets released through a handle."),
        (
            "flowgate_packet_stage_delay_overflow_total",
            "counter",
            "delay_overflow",
            "Delays refused (the packet dropped) because max_delayed packets were delayed already.",
        ),
        (
            "flowgate_packet_stage_delay_expired_total",
            "counter",
            "delay_expired",
            "Delayed packets that waited max_delay and got on_delay_timeout's verdict.",
        ),
        (
            "flowgate_packet_stage_unparsable_total",
            "counter",
            "unparsable",
            "Packets whose IP header the packet stage could not read.",
        ),
        (
            "flowgate_packet_stage_provider_faults_total",
            "counter",
            "provider_faults",
            "Calls to a product's packet filter that panicked or ran over their budget.",
        ),
        ("flowgate_packet_stage_delayed_packets", "gauge", "delayed_now", "Packets delayed now."),
    ] {
        t.one(name, kind, help, num(s, &format!("/packet_stage/total/{key}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn head(text: &str) -> Result<u16, Refused> {
        route(text.as_bytes()).map(|s| s.code)
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(head("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(200));
        assert_eq!(head("GET /metrics?name[]=x HTTP/1.0\r\n\r\n"), Ok(200), "a query is ignored");
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n"), Ok(404));
        assert_eq!(head("GET /metrics/ HTTP/1.1\r\n\r\n"), Ok(404));
        assert_eq!(head("POST /other HTTP/1.1\r\n\r\n"), Ok(404));
        let post = route(b"POST /metrics HTTP/1.1\r\n\r\n").expect("routed");
        assert_eq!((post.code, post.headers), (405, &[("Allow", "GET")][..]));
        assert_eq!(head("HEAD /metrics HTTP/1.1\r\n\r\n"), Ok(405));
        for bad in ["GET /metrics\r\n\r\n", "hello\r\n\r\n", "GET /metrics SPDY/3\r\n\r\n", " / HTTP/1.1\r\n\r\n"] {
            assert_eq!(head(bad), Err(Refused::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_blank_line(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn labels_and_help_are_escaped() {
        let mut t = Text { out: String::new() };
        t.family("x_total", "counter", "a \\ b\nc");
        t.sample("x_total", &[("rule", "a\"b\\c\nd"), ("verdict", "drop")], 3);
        t.sample("x_total", &[], 0.25);
        assert_eq!(
            t.out,
            "# HELP x_total a \\\\ b\\nc\n# TYPE x_total counter\nx_total{rule=\"a\\\"b\\\\c\\nd\",verdict=\"drop\"} 3\nx_total 0.25\n"
        );
    }

    fn stats() -> Value {
        let mut buckets = vec![0u64; LATENCY_BOUNDS_NS.len() + 1];
        buckets[3] = 5;
        buckets[5] = 2;
        buckets[LATENCY_BOUNDS_NS.len()] = 1;
        json!({
            "fail": "open",
            "total": {"flows": 4, "flows_opened": 9, "untracked": 1, "truncated": 2, "malformed": 0, "fragments": 3,
                      "not_ip": 0, "provider_faults": 0, "held_packets": 0, "held_overflow": 0, "kernel_lost": 1,
                      "events_dropped": 0, "enforce_deferred": 0, "commands_refused": 0},
            "workers": [{"queue": 0, "packets": 10, "queue_overruns": 0}, {"queue": 1, "packets": 7, "queue_overruns": 2}],
            "verdicts": [{"rule": "no-\"7\"", "allow": 0, "drop": 2, "inspect": 0, "pause": 0},
                         {"rule": "default", "allow": 7, "drop": 0, "inspect": 0, "pause": 0}],
            "updates": {"allow": {"provider": 0, "handle": 1, "peek": 0, "rules": 0},
                        "drop": {"provider": 0, "handle": 2, "peek": 0, "rules": 1},
                        "inspect": {"provider": 0, "handle": 0, "peek": 0, "rules": 0},
                        "pause": {"provider": 0, "handle": 0, "peek": 0, "rules": 0}},
            "closed": {"fin": 3, "rst": 1, "idle": 0, "conntrack": 1, "end": 0, "reused": 0},
            "latency": {"buckets": buckets, "count": 8, "sum_ns": 150_000_000u64},
            "enforce": {"allow": 1, "drop": 2, "recall": 0, "forget": 3, "failed": 0, "sockets_destroyed": 2, "socket_destroy_failures": 0},
            "events": {"written": 30, "write_failures": 0},
            "conntrack": {"reports": 5, "reports_dropped": 0, "event_overruns": 0, "syncs": 2, "last_sync_ms": 1.5, "last_sync_entries": 12},
            "kernel_queues": [{"queue": 0, "stage": "flow", "waiting": 1, "dropped": 0, "user_dropped": 0}],
            "queue_rules": [{"stage": "flow", "family": "ipv4", "packets": 20}, {"stage": "flow", "family": "ipv6", "packets": 0}],
            "bypass": {"flow": {"bypassed": 2}},
            "packet_stage": {
                "workers": [{"queue": 2, "packets": 4}],
                "total": {"released": 0, "delay_overflow": 0, "delay_expired": 0, "unparsable": 0, "provider_faults": 0, "delayed_now": 1},
                "interfaces": [{"name": "tun0", "direction": "inbound", "packets": 4, "bytes": 400, "dropped": 1, "delayed": 0}],
                "rules": [{"name": "cut", "action": "drop", "packets": 1, "bytes": 100}],
            },
        })
    }

    #[test]
    fn every_family_has_help_and_type_and_samples_come_from_the_stats() {
        let text = render(&stats());
        let has = |line: &str| text.lines().any(|l| l == line);
        for line in [
            "flowgate_flows_judged_total{verdict=\"drop\",rule=\"no-\\\"7\\\"\"} 2",
            "flowgate_flows_judged_total{verdict=\"allow\",rule=\"default\"} 7",
            "flowgate_flow_updates_total{verdict=\"drop\",source=\"rules\"} 1",
            "flowgate_flows_live 4",
            "flowgate_flows_closed_total{reason=\"fin\"} 3",
            "flowgate_unparsable_packets_total{kind=\"fragment\"} 3",
            "flowgate_queue_packets_total{stage=\"flow\",queue=\"1\"} 7",
            "flowgate_queue_packets_total{stage=\"packet\",queue=\"2\"} 4",
            "flowgate_queue_socket_overruns_total{queue=\"1\"} 2",
            "flowgate_queue_waiting_packets{stage=\"flow\",queue=\"0\"} 1",
            "flowgate_queue_kernel_dropped_total{stage=\"flow\",queue=\"0\",reason=\"socket_full\"} 0",
            "flowgate_queue_rule_packets_total{stage=\"flow\",family=\"ipv4\"} 20",
            "flowgate_fail_open 1",
            "flowgate_fail_open_bypassed_packets 2",
            "flowgate_verdict_latency_seconds_bucket{le=\"0.000001\"} 0",
            "flowgate_verdict_latency_seconds_bucket{le=\"0.00001\"} 5",
            "flowgate_verdict_latency_seconds_bucket{le=\"0.00005\"} 7",
            "flowgate_verdict_latency_seconds_bucket{le=\"0.1\"} 7",
            "flowgate_verdict_latency_seconds_bucket{le=\"+Inf\"} 8",
            "flowgate_verdict_latency_seconds_sum 0.15",
            "flowgate_verdict_latency_seconds_count 8",
            "flowgate_enforce_actions_total{action=\"forget\"} 3",
            "flowgate_sockets_destroyed_total 2",
            "flowgate_events_written_total 30",
            "flowgate_conntrack_last_sync_seconds 0.0015",
            "flowgate_kernel_lost_flows_total 1",
            "flowgate_packet_stage_dropped_total{interface=\"tun0\",direction=\"inbound\"} 1",
            "flowgate_packet_rule_bytes_total{rule=\"cut\",action=\"drop\"} 100",
            "flowgate_packet_stage_delayed_packets 1",
        ] {
            assert!(has(line), "missing `{line}` in:\n{text}");
        }
        // Every sample belongs to a family announced just before it, with HELP and TYPE.
        let mut family = String::new();
        let mut kinds = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap_or_default().to_string();
                assert!(family.starts_with("flowgate_"), "{line}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("type line");
                assert_eq!(name, family, "TYPE follows its HELP");
                assert!(kinds.insert(name.to_string(), kind.to_string()).is_none(), "{name} announced twice");
            } else {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
                assert!(name == family || base == family, "`{line}` outside its family {family}");
                let value = line.rsplit(' ').next().unwrap_or_default();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
        for (name, kind) in &kinds {
            assert_eq!(name.ends_with("_total"), kind == "counter", "{name} is a {kind}");
        }
        assert!(kinds.len() >= 45, "{} families", kinds.len());
    }

    #[test]
    fn values_missing_from_the_stats_leave_their_family_empty() {
        let text = render(&json!({"fail": "closed", "total": {"flows": 1}}));
        assert!(text.contains("\nflowgate_flows_live 1\n"));
        assert!(text.contains("\nflowgate_fail_open 0\n"));
        assert!(text.contains("# TYPE flowgate_fail_open_bypassed_packets gauge\n"));
        assert!(!text.contains("\nflowgate_fail_open_bypassed_packets "), "no estimate when failing closed");
        assert!(!text.contains("flowgate_verdict_latency_seconds_count"));
    }
}
