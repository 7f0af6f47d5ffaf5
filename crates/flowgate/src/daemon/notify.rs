//! Tells the service manager what `flowgate run` is doing, the `sd_notify(3)` way: `READY=1` once
//! filtering, `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around a SIGHUP reload,
//! `STOPPING=1` when it stops. This is what lets a systemd unit be `Type=notify`: `systemctl
//! start` returns when the chains are in, not when the process exists.
//!
//! It touches the `NOTIFY_SOCKET` variable (read once, at start) and one unbound Unix datagram
//! socket; nothing when the variable is unset (run by hand, or by a manager that does not ask).
//! A notification that cannot be sent is logged (a warning) and costs nothing else: filtering never
//! depends on the service manager.
//!
//! Written on std's `UnixDatagram` rather than with the `sd-notify` crate: sd-notify 0.5
//! connects to `NOTIFY_SOCKET` as a file path, so the abstract-namespace form `@name` that
//! `sd_notify(3)` defines (and that container managers use) fails, and it reads the variable
//! anew at every call, which leaves no way to test it against a socket of the test's own
//! without changing the process's environment. The protocol is one datagram of `KEY=VALUE`
//! lines; the few lines below are all of it that flowgate needs.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable a service manager sets to the socket it listens on.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// A connection to the service manager's notification socket.
pub struct Notifier {
    socket: UnixDatagram,
    /// `NOTIFY_SOCKET` as given, for messages.
    name: String,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for, or None when it is unset or empty. An address that
    /// cannot be used is an error naming it.
    pub fn from_env() -> Result<Option<Notifier>, String> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(v) if !v.is_empty() => Notifier::to(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for the socket `address`: a file path (`/run/systemd/notify`), or `@name` for
    /// a socket in the abstract namespace.
    pub fn to(address: &OsStr) -> Result<Notifier, String> {
        let name = address.to_string_lossy().into_owned();
        let bytes = address.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(address),
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]),
            _ => {
                return Err(format!(
                    "{NOTIFY_SOCKET}={name}: not a socket path or @abstract name (the only forms flowgate supports)"
                ));
            }
        }
        .map_err(|e| format!("{NOTIFY_SOCKET}={name}: {e}"))?;
        let socket = UnixDatagram::unbound().map_err(|e| format!("{NOTIFY_SOCKET}: cannot make a socket: {e}"))?;
        socket.connect_addr(&addr).map_err(|e| format!("{NOTIFY_SOCKET}={name}: cannot connect: {e}"))?;
        Ok(Notifier { socket, name })
    }

    /// Filtering has started, or a reload has ended.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// A reload starts. `MONOTONIC_USEC` tells systemd 253 and later which reload this is (it
    /// refuses a `RELOADING=1` without it for `Type=notify-reload`); older ones ignore it.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}\n", monotonic_usec()));
    }

    /// The daemon is stopping (removing its chains, flushing its log).
    pub fn stopping(&self) {
        self.send("STOPPING=1\n");
    }

    fn send(&self, message: &str) {
        if let Err(e) = self.send_raw(message) {
            log::warn!("cannot notify the service manager at {}: {e}", self.name);
        }
    }

    fn send_raw(&self, message: &str) -> io::Result<()> {
        let sent = self.socket.send(message.as_bytes())?;
        if sent == message.len() {
            Ok(())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, format!("sent {sent} of {} bytes", message.len())))
        }
    }
}

/// `STATUS=` takes one line: a newline would start another (unknown) key.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// CLOCK_MONOTONIC in microseconds, the clock `MONOTONIC_USEC` is read against.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, owned `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifications_reach_an_abstract_socket() {
        let name = format!("flowgate-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        let n = Notifier::to(OsStr::new(&format!("@{name}"))).expect("notifier");
        n.ready("filtering:\n2 queues");
        assert_eq!(receive(&listener), "READY=1\nSTATUS=filtering: 2 queues\n");
        let before = monotonic_usec();
        n.reloading();
        let m = receive(&listener);
        let usec: u64 = m
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|r| r.strip_suffix('\n'))
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("not RELOADING=1 with MONOTONIC_USEC: {m:?}"));
        assert!(usec >= before && usec <= monotonic_usec(), "MONOTONIC_USEC {usec} is not CLOCK_MONOTONIC now");
        n.stopping();
        assert_eq!(receive(&listener), "STOPPING=1\n");
    }

    /// A directory removed on drop, also when the test fails.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn notifications_reach_a_socket_path() {
        let dir = TempDir(std::env::temp_dir().join(format!("flowgate-notify-test-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let path = dir.0.join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind socket");
        Notifier::to(path.as_os_str()).expect("notifier").stopping();
        assert_eq!(receive(&listener), "STOPPING=1\n");
    }

    #[test]
    fn unusable_addresses_are_named() {
        let e = Notifier::to(OsStr::new("vsock:2:1234")).err().expect("refused");
        assert!(e.contains("NOTIFY_SOCKET=vsock:2:1234"), "{e}");
        let e = Notifier::to(OsStr::new("/nonexistent/flowgate/notify")).err().expect("refused");
        assert!(e.contains("/nonexistent/flowgate/notify: cannot connect"), "{e}");
    }
}
