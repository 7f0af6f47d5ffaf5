//! Event records to a local log daemon: syslog (`/dev/log`) or systemd-journald's native
//! socket, one Unix datagram per record. This room frames records and sends them; it never
//! blocks the writer for long and never fails the daemon: a socket that is missing, refuses, or
//! stays full loses the record (the writer counts it) and is tried again a second later.
//!
//! - Syslog: RFC 3164 as the C library's `syslog()` sends it to the local socket, which
//!   rsyslog, syslog-ng and journald all read: `<PRI>Mmm dd hh:mm:ss flowgate[PID]: RECORD`,
//!   facility daemon, severity info (notice for a drop), local time.
//! - journald: the native protocol (`KEY=VALUE` lines in one datagram): `MESSAGE` (the record),
//!   `PRIORITY`, `SYSLOG_FACILITY`, `SYSLOG_IDENTIFIER=flowgate`, `FLOWGATE_EVENT` (the event's
//!   name), `FLOWGATE_FLOW_ID`. A record too large for one datagram is lost (journald would take
//!   it through a memfd; flowgate's records are a few hundred bytes).
//!
//! Written here rather than with the `syslog` crate or the journald crates
//! (`systemd-journal-logger`, `libsystemd`): those are loggers for the `log` facade, with a
//! fixed socket path or blocking sends and their own error policy, while what matters here is
//! the policy (a bounded wait, drop and count, reconnect) around two framings of a few lines.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant as StdInstant};

use flowgate_core::{Event, EventKind, FlowVerdict};

/// How long one send may wait for a full receiver before the record is given up.
const SEND_WAIT: Duration = Duration::from_millis(500);
/// How long after a failure the socket is left alone (records meanwhile are lost at once).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Which protocol the socket speaks.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Syslog,
    Journald,
}

/// A datagram socket to a log daemon, connected on first use and again after failures.
pub(crate) struct SocketLog {
    path: PathBuf,
    framing: Framing,
    socket: Option<UnixDatagram>,
    /// Not before this instant is the socket tried again.
    retry_at: Option<StdInstant>,
    pid: u32,
    buf: Vec<u8>,
}

impl SocketLog {
    /// Nothing is opened yet: a socket missing at start must not keep the daemon from starting.
    pub(crate) fn new(path: &Path, framing: Framing) -> SocketLog {
        SocketLog {
            path: path.to_path_buf(),
            framing,
            socket: None,
            retry_at: None,
            pid: std::process::id(),
            buf: Vec::with_capacity(1024),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Forgets the connection, so the next record connects anew (SIGUSR1, as for a file).
    pub(crate) fn reopen(&mut self) {
        self.socket = None;
        self.retry_at = None;
    }

    /// Sends one record (a JSON line without its `\n`) for `event`.
    pub(crate) fn send(&mut self, record: &[u8], event: &Event) -> io::Result<()> {
        self.connect()?;
        let Some(socket) = &self.socket else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("{}: not reachable since the last failure; retrying within a second", self.path.display()),
            ));
        };
        self.buf.clear();
        match self.framing {
            Framing::Syslog => syslog_frame(&mut self.buf, record, event, self.pid),
            Framing::Journald => journald_frame(&mut self.buf, record, event),
        }
        match socket.send(&self.buf) {
            Ok(_) => Ok(()),
            // Too large: this record is lost, the socket is fine.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => Err(io::Error::new(
                e.kind(),
                format!("{}: record too large for one datagram: {e}", self.path.display()),
            )),
            Err(e) => {
                self.socket = None;
                self.retry_at = Some(StdInstant::now() + RETRY_AFTER);
                Err(io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
            }
        }
    }

    /// Connects if not connected and it is time to (nothing happens while waiting to retry).
    fn connect(&mut self) -> io::Result<()> {
        if self.socket.is_none() {
            if self.retry_at.is_some_and(|t| StdInstant::now() < t) {
                return Ok(());
            }
            let connect = || -> io::Result<UnixDatagram> {
                let s = UnixDatagram::unbound()?;
                s.connect(&self.path)?;
                s.set_write_timeout(Some(SEND_WAIT))?;
                Ok(s)
            };
            match connect() {
                Ok(s) => {
                    self.socket = Some(s);
                    self.retry_at = None;
                }
                Err(e) => {
                    self.retry_at = Some(StdInstant::now() + RETRY_AFTER);
                    return Err(io::Error::new(e.kind(), format!("{}: cannot connect: {e}", self.path.display())));
                }
            }
        }
        Ok(())
    }
}

/// Syslog severity of an event: notice for a drop, info otherwise.
fn severity(event: &Event) -> u8 {
    match &event.kind {
        EventKind::FlowVerdict { verdict: FlowVerdict::Drop, .. }
        | EventKind::FlowUpdate { verdict: FlowVerdict::Drop, .. } => 5,
        _ => 6,
    }
}

/// Facility daemon (3).
const FACILITY: u8 = 3;

fn syslog_frame(out: &mut Vec<u8>, record: &[u8], event: &Event, pid: u32) {
    use std::io::Write;
    let pri = u16::from(FACILITY) * 8 + u16::from(severity(event));
    let _ = write!(out, "<{pri}>{} flowgate[{pid}]: ", local_time());
    out.extend_from_slice(record);
}

/// `Mmm dd hh:mm:ss` in local time, as RFC 3164 wants (day padded with a space).
fn local_time() -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    // SAFETY: time(NULL) takes no pointer; localtime_r writes only into `tm`, which we own.
    let tm = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return "Jan  1 00:00:00".into();
        }
        tm
    };
    let month = MONTHS.get(usize::try_from(tm.tm_mon).unwrap_or(0)).copied().unwrap_or("Jan");
    format!("{month} {:>2} {:02}:{:02}:{:02}", tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)
}

fn journald_frame(out: &mut Vec<u8>, record: &[u8], event: &Event) {
    field(out, "MESSAGE", record);
    field(out, "PRIORITY", severity(event).to_string().as_bytes());
    field(out, "SYSLOG_FACILITY", FACILITY.to_string().as_bytes());
    field(out, "SYSLOG_IDENTIFIER", b"flowgate");
    field(out, "FLOWGATE_EVENT", event.kind.name().as_bytes());
    field(out, "FLOWGATE_FLOW_ID", event.kind.flow().id.to_string().as_bytes());
}

/// One field of journald's native protocol: `KEY=value\n`, or, for a value with a newline,
/// `KEY\n`, its length as 64-bit little endian, the value and `\n`.
fn field(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(key.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::{Direction, Flow, FlowId, Instant, Protocol};

    fn event(verdict: FlowVerdict) -> Event {
        let flow = Flow {
            id: FlowId(77),
            protocol: Protocol::Udp,
            direction: Direction::Outbound,
            local: "198.51.100.1:5000".parse().expect("addr"),
            remote: "203.0.113.9:53".parse().expect("addr"),
            interface: None,
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp: None,
            owner: None,
            host: None,
        };
        Event {
            time: Instant::ZERO,
            kind: EventKind::FlowVerdict { flow, verdict, rule: Some("r".into()), peek: None },
        }
    }

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("flowgate-socketlog-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }

    fn recv(s: &UnixDatagram) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = vec![0u8; 65536];
        let n = s.recv(&mut buf).expect("a datagram");
        buf.truncate(n);
        buf
    }

    #[test]
    fn syslog_datagrams_are_rfc3164_with_tag_and_pid() {
        let d = dir("syslog");
        let path = d.0.join("log");
        let server = UnixDatagram::bind(&path).expect("bind");
        let mut log = SocketLog::new(&path, Framing::Syslog);
        log.send(br#"{"a":1}"#, &event(FlowVerdict::Allow)).expect("sent");
        log.send(br#"{"b":2}"#, &event(FlowVerdict::Drop)).expect("sent");
        let one = String::from_utf8(recv(&server)).expect("utf-8");
        let two = String::from_utf8(recv(&server)).expect("utf-8");
        // <daemon.info> and <daemon.notice>, then "Mmm dd hh:mm:ss ", the tag, the record.
        assert!(one.starts_with("<30>"), "{one}");
        assert!(two.starts_with("<29>"), "{two}");
        let rest = &one[4..];
        assert_eq!(rest.as_bytes()[15], b' ', "{one}");
        assert!(rest[16..].starts_with(&format!("flowgate[{}]: ", std::process::id())), "{one}");
        assert!(one.ends_with(r#": {"a":1}"#), "{one}");
    }

    #[test]
    fn journald_datagrams_carry_the_record_and_flowgate_fields() {
        let d = dir("journald");
        let path = d.0.join("socket");
        let server = UnixDatagram::bind(&path).expect("bind");
        let mut log = SocketLog::new(&path, Framing::Journald);
        log.send(br#"{"event":"flow.verdict"}"#, &event(FlowVerdict::Drop)).expect("sent");
        let text = String::from_utf8(recv(&server)).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                r#"MESSAGE={"event":"flow.verdict"}"#,
                "PRIORITY=5",
                "SYSLOG_FACILITY=3",
                "SYSLOG_IDENTIFIER=flowgate",
                "FLOWGATE_EVENT=flow.verdict",
                "FLOWGATE_FLOW_ID=77"
            ]
        );
        // A value with a newline takes the binary form.
        let mut out = Vec::new();
        field(&mut out, "K", b"a\nb");
        assert_eq!(out, b"K\n\x03\0\0\0\0\0\0\0a\nb\n");
    }

    #[test]
    fn a_missing_socket_fails_fast_and_is_retried_later() {
        let d = dir("missing");
        let path = d.0.join("log");
        let mut log = SocketLog::new(&path, Framing::Syslog);
        let e = log.send(b"{}", &event(FlowVerdict::Allow)).expect_err("no socket");
        assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        // Within the retry delay, records are lost at once, without touching the socket.
        let server = UnixDatagram::bind(&path).expect("bind");
        let t = StdInstant::now();
        assert_eq!(log.send(b"{}", &event(FlowVerdict::Allow)).map_err(|e| e.kind()), Err(io::ErrorKind::NotConnected));
        assert!(t.elapsed() < Duration::from_millis(100));
        // Once the delay is over (made so here), the socket is found again.
        log.retry_at = Some(StdInstant::now());
        log.send(b"{\"back\":1}", &event(FlowVerdict::Allow)).expect("reconnected");
        assert!(String::from_utf8(recv(&server)).expect("utf-8").ends_with("{\"back\":1}"));
        // A receiver that goes away: the send fails, and a new receiver is reached after reopen.
        drop(server);
        std::fs::remove_file(&path).expect("unlink");
        assert!(log.send(b"{}", &event(FlowVerdict::Allow)).is_err());
        let server = UnixDatagram::bind(&path).expect("bind again");
        log.reopen();
        log.send(b"{\"again\":1}", &event(FlowVerdict::Allow)).expect("reopened");
        assert!(String::from_utf8(recv(&server)).expect("utf-8").ends_with("{\"again\":1}"));
    }
}
