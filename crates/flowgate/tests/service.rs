//! flowgate under a service manager: `flowgate run` in a network namespace of the test's own,
//! with `NOTIFY_SOCKET` pointing at a Unix datagram socket the test binds in place of systemd's.
//! It must say `READY=1` once filtering (its ready line written, its chains in), `RELOADING=1`
//! with `MONOTONIC_USEC` then `READY=1` around a SIGHUP reload, and `STOPPING=1` at SIGTERM,
//! and nothing else. The namespace, the daemon and the directory are removed on drop, also when
//! the test fails.

mod lab;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use lab::*;
use nix::sys::signal::Signal;

macro_rules! require_root {
    () => {
        if !is_root() {
            // Skipped is not passed: under CI a test that cannot run fails.
            assert!(std::env::var_os("CI").is_none(), "live tests need root (network namespaces, netfilter)");
            eprintln!("skipped: live tests need root (network namespaces, netfilter)");
            return;
        }
    };
}

/// A directory of the test's, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("flowgate-service-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The next notification, within 30 s (a start adopts connections and installs chains).
fn next(socket: &UnixDatagram, waiting_for: &str) -> String {
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no notification while waiting for {waiting_for}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC` must be.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, owned `ts`.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[test]
fn run_tells_the_service_manager_when_it_is_ready_reloading_and_stopping() {
    require_root!();
    let ns = Netns::new("notify");
    ns.setup_basics(false);
    let dir = TempDir::new("notify");
    let conf = dir.0.join("flowgate.toml");
    let base = format!(
        "run_dir = \"{}\"\nlog = \"{}\"\nqueues = 1\n",
        dir.0.join("run").display(),
        dir.0.join("events.jsonl").display()
    );
    std::fs::write(&conf, &base).expect("write config");
    let notify = dir.0.join("notify");
    let socket = UnixDatagram::bind(&notify).expect("bind the notification socket");

    let conf_arg = conf.display().to_string();
    let mut daemon = ns.spawn_with(&[env!("CARGO_BIN_EXE_flowgate"), "run", "--config", &conf_arg], |c| {
        c.env("NOTIFY_SOCKET", &notify);
    });

    // Ready: the first word it says, once its ready line is written and its chains are in.
    let ready = next(&socket, "READY=1");
    assert_eq!(ready, "READY=1\nSTATUS=filtering, 0 rules\n");
    assert!(daemon.log().contains("flowgate: ready:"), "READY=1 came before the ready line:\n{}", daemon.log());
    ns.run_ok(&["iptables", "-S", "FLOWGATE-OUT"]);
    ns.run_ok(&["ip6tables", "-S", "FLOWGATE-OUT"]);

    // Reload: RELOADING=1 stamped with the monotonic clock, then READY=1 once the new rules
    // are in force.
    std::fs::write(&conf, format!("{base}[[rule]]\nname = \"one\"\nremote = \"203.0.113.7\"\naction = \"drop\"\n"))
        .expect("write the new config");
    let before = monotonic_usec();
    daemon.signal(Signal::SIGHUP);
    let reloading = next(&socket, "RELOADING=1");
    let after = monotonic_usec();
    let usec: u64 = reloading
        .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
        .and_then(|r| r.strip_suffix('\n'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("not RELOADING=1 with MONOTONIC_USEC: {reloading:?}"));
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is not the time of the SIGHUP ({before}..{after})"
    );
    let reloaded = next(&socket, "READY=1 after the reload");
    assert_eq!(reloaded, "READY=1\nSTATUS=filtering, 1 rule\n");
    assert!(daemon.log().contains(": 1 rules"), "READY=1 came before the reload was done:\n{}", daemon.log());

    // Stop: STOPPING=1, then a clean exit that removed the chains.
    daemon.signal(Signal::SIGTERM);
    assert_eq!(next(&socket, "STOPPING=1"), "STOPPING=1\n");
    let status = daemon.wait_timeout(Duration::from_secs(30)).expect("flowgate did not exit after SIGTERM");
    assert!(status.success(), "flowgate exited with {status}:\n{}", daemon.log());
    assert!(!ns.run(&["iptables", "-S", "FLOWGATE-OUT"]).status.success(), "the chains are still there");

    // And nothing more.
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    if let Ok(n) = socket.recv(&mut buf) {
        panic!("an extra notification: {:?}", String::from_utf8_lossy(&buf[..n]));
    }
    assert!(!daemon.log().contains("cannot notify"), "a notification failed:\n{}", daemon.log());
}
