//! The daemon's control protocol, server side: request lines as `flowgate flows`, `block`,
//! `allow`, `reload` and `stats` send them, parsed and answered by the real daemon.
//!
//! The server's reading and dispatch (`daemon::control`'s `read_request`, `answer`, `authorized`,
//! `selector`, `dispatch`, `change`, `stream_flows`) are private and reached only through the
//! daemon's socket, so this
//! target starts a real daemon (`flowgate::daemon::Running::start`, one queue, loopback
//! filtered) once, inside a network namespace of its own (`unshare(CLONE_NEWNET)`: its chains,
//! queue and conntrack settings never touch the host, and vanish with the process), and sends
//! each input to its control socket as one client would, then reads the whole answer. A few
//! loopback UDP flows are opened now and then so that listings and verdict changes find
//! something. Needs root (as `flowgate run` does), iptables and NFQUEUE support.
//!
//! The typed protocol (`flowgate::protocol::Request`) is public and is also checked directly: a
//! request that parses round-trips through its serialization.
//!
//! Checks: no panic, in any of the daemon's threads (a panic aborts the process); every answer
//! line is a JSON object; an answer starts with `ok` (or, for a listing, ends with `end`); the
//! daemon keeps answering (a request that got no answer within 20 s is a failure).
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowgate::daemon::Running;
use flowgate::protocol::Request;
use libfuzzer_sys::fuzz_target;

struct Daemon {
    socket: PathBuf,
    _running: Running,
}

fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        // SAFETY: geteuid takes no pointers.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the control target needs root: it runs the daemon");
        // libFuzzer's main, not Rust's, runs this process: SIGPIPE is not ignored as in the
        // flowgate binary, and a client that went away must not kill the daemon's threads.
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // A network namespace of this thread's own (libFuzzer runs inputs on this thread; the
        // daemon's threads, started below, inherit it).
        // SAFETY: unshare takes no pointers.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        let lo = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
        assert!(lo.is_ok_and(|s| s.success()), "ip link set lo up");
        let dir = std::env::temp_dir().join(format!("flowgate-fuzz-control-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let conf = dir.join("flowgate.toml");
        let text = format!(
            "run_dir = \"{}\"\nlog = \"{}\"\nqueues = 1\nloopback = true\nmax_flows = 4096\n{}",
            dir.join("run").display(),
            dir.join("events.jsonl").display(),
            r#"
[timeouts]
udp = "2s"
[[rule]]
name = "drop-discard"
remote_ports = "9"
protocol = "udp"
action = "drop"
silent = true
[[rule]]
name = "peek-echo"
remote_ports = "7"
action = "inspect"
peek = { outbound = 4, inbound = 0 }
"#
        );
        std::fs::write(&conf, text).expect("write config");
        let config = flowgate::config::load(&conf).expect("control target config");
        let running = Running::start(&config, None).expect("start the daemon in the fuzz namespace");
        Daemon { socket: config.live.run_dir.join(flowgate::daemon::control::SOCKET), _running: running }
    })
}

/// Opens a loopback UDP flow (allowed, dropped or inspected by the rules) now and then.
fn traffic(n: u64) {
    if !n.is_multiple_of(64) {
        return;
    }
    if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
        let port = [7, 9, 53, 5000][(n / 64 % 4) as usize];
        let _ = s.send_to(b"fuzz", ("127.0.0.1", port));
    }
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let d = daemon();
    // The typed protocol both ends share (`flowgate::protocol`): a request line that parses
    // serializes back to one that parses to the same request.
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(req) = serde_json::from_slice::<Request>(line) {
        let text = serde_json::to_string(&req).expect("a request serializes");
        let back: Request = serde_json::from_str(&text).expect("a serialized request parses");
        assert_eq!(back, req, "request changed on a round trip through {text}");
    }
    traffic(RUNS.fetch_add(1, Ordering::Relaxed));
    let conn = UnixStream::connect(&d.socket).expect("the daemon's control socket answers");
    conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    // The daemon reads one line (at most 64 KiB); it may close before reading all of a longer
    // input, so a failed write is not an error.
    let _ = (&conn).write_all(data);
    let _ = conn.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    match (&conn).read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            panic!("no answer within 20 s to {:?}", String::from_utf8_lossy(data))
        }
        // The daemon closed while our request was still being written: it has answered.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the answer: {e}"),
    }
    let text = std::str::from_utf8(&answer).expect("the answer is UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        // Only an empty request goes unanswered.
        assert!(data.is_empty(), "no answer to {:?}", String::from_utf8_lossy(data));
        return;
    }
    let parsed: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("answer line is not JSON ({e}): {l}")))
        .collect();
    let first = &parsed[0];
    assert!(first.get("ok").is_some_and(serde_json::Value::is_boolean), "first answer line has no `ok`: {first}");
    if first["ok"] == false {
        assert!(first["error"].is_string(), "a refusal says why: {first}");
    }
    if parsed.len() > 1 {
        let last = parsed.last().unwrap();
        assert_eq!(last["end"], true, "a listing ends with its end line: {last}");
    }
});
