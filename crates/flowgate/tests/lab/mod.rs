//! The network-namespace test lab: real Linux network namespaces, veth pairs and a small UDP
//! tunnel, in which integration tests start the real `flowgate run` daemon and drive real
//! traffic through it.
//!
//! Include it from a test file with `mod lab; use lab::*;`. Everything here needs root
//! (CAP_NET_ADMIN and CAP_SYS_ADMIN); tests should call [`is_root`] first and return early with
//! an `eprintln!` when it is false.
//!
//! # Topology built by [`Lab::new`]
//!
//! ```text
//!  cli ── a client BEHIND the filtered host (its traffic is forwarded by host)
//!    veth0  198.18.0.2/24     2001:db8:18::2/64
//!    default via 198.18.0.1,  ::/0 via 2001:db8:18::1
//!      │
//!      │ veth pair (cli veth0 <-> host veth0)
//!      │
//!  host ── the filtered host: flowgate runs here; ip_forward=1, IPv6 forwarding=1
//!    veth0  198.18.0.1/24     2001:db8:18::1/64        toward cli
//!    veth1  198.51.100.1/24   2001:db8:1::1/64         toward srv
//!    tun0   192.0.2.1/30      2001:db8:99::1/64  mtu 1400 ═══╗
//!    203.0.113.0/24 via 198.51.100.2                         ║ the tunnel: every tun0 packet is
//!    2001:db8:2::/64 via 2001:db8:1::2                       ║ the payload of a UDP datagram
//!      │                                                     ║ 198.51.100.1:5555 <-> .2:5555,
//!      │ veth pair (host veth1 <-> srv veth0) ═══════════════╝ which crosses this veth pair
//!      │
//!  srv ── the server host
//!    veth0  198.51.100.2/24   2001:db8:1::2/64
//!    lo     203.0.113.10/32   2001:db8:2::10/128       service addresses: bind servers here
//!    tun0   192.0.2.2/30      2001:db8:99::2/64  mtu 1400
//!    198.18.0.0/24 via 198.51.100.1,  2001:db8:18::/64 via 2001:db8:1::1
//! ```
//!
//! * `cli` is a client *behind* the filtered host: its traffic to 203.0.113.10 /
//!   2001:db8:2::10 is FORWARDED by `host`.
//! * `host` is where flowgate runs: it forwards between `veth0` (cli side) and `veth1` (srv
//!   side), and its own traffic to 203.0.113.10 is LOCALLY generated.
//! * `srv` holds the services: 203.0.113.10 and 2001:db8:2::10 on `lo` (so servers can bind
//!   there), plus its veth address 198.51.100.2.
//! * The tunnel: a TUN device `tun0` in `host` and in `srv`; each side's packets travel as UDP
//!   payloads between 198.51.100.1:5555 and 198.51.100.2:5555 (so the UDP carrier itself crosses
//!   `host`'s `veth1`). 192.0.2.0/30 and 2001:db8:99::/64 are reachable only through it. The
//!   forwarder is in-process (one thread per side, see [`Lab`]) and stops when the lab is dropped.
//!
//! Every namespace has `lo` up, IPv6 `accept_ra=0`, `router_solicitations=0`, `accept_dad=0`
//! (and all IPv6 addresses are added with `nodad`, so they are usable at once), and
//! `rp_filter=0` (IPv4 conf settings are otherwise inherited from the root namespace).
//! Constants for all addresses are defined below ([`SRV_SERVICE_V4`] etc.).
//!
//! # Rules (from the project)
//!
//! * Each test makes its own namespaces, named `fg<pid>x<n>-<tag>-<role>` (pid, a per-process
//!   counter, the caller's short tag, `cli`/`host`/`srv`), so tests run in parallel, in one
//!   process or several. Veth pairs are created directly inside the namespaces, so no interface
//!   ever appears in the root namespace and names (`veth0`, `veth1`, `tun0`) are the same in all
//!   tests.
//! * Everything is removed even when a test fails or panics: [`Netns`] deletes its namespace on
//!   drop (which also destroys its veths), after SIGKILLing any process still inside it; [`Child`]
//!   terminates and reaps its process on drop; [`Server`]s and the tunnel stop and join their
//!   threads on drop. Namespaces left behind by a test process that was killed outright are
//!   deleted by the next [`Lab::new`] / [`Netns::new`] (names whose pid is no longer alive).
//! * Traffic goes only between namespaces the test created and only to 192.0.2.0/24,
//!   198.51.100.0/24, 203.0.113.0/24, 198.18.0.0/15 and 2001:db8::/32. Nothing ever touches the
//!   host's real interfaces.
//! * No sleeps as synchronisation: servers here are bound before their constructor returns;
//!   for external processes use [`wait_tcp_listening`] (bounded connect retry) or
//!   [`wait_listed`] (bounded `ss` polling, for UDP or when a probe connection would disturb the
//!   test); child exit is awaited with a pidfd; servers and the tunnel stop via an eventfd.
//!
//! # Usage
//!
//! ```ignore
//! mod lab;
//! use lab::*;
//!
//! #[test]
//! fn forwarded_echo() {
//!     if !is_root() { eprintln!("skipped: needs root"); return; }
//!     let lab = Lab::new("fwd");                                   // cli, host, srv + tunnel
//!     let echo = tcp_echo(&lab.srv, sa(SRV_SERVICE_V4, 7));        // bound when it returns
//!     let daemon = lab.host.spawn(&[env!("CARGO_BIN_EXE_flowgate"), "run", "--config", conf]);
//!     // ... wait for the daemon's readiness (its log: daemon.log()) ...
//!     let ok = lab.cli.in_ns(move || std::net::TcpStream::connect(echo.addr).is_ok());
//! }   // daemon SIGTERMed and reaped, echo stopped, tunnel stopped, namespaces deleted
//! ```
//!
//! API at a glance: [`Lab::new`]; [`Netns`] (`run`, `run_ok`, `ip`, `ip_batch`, `spawn`,
//! `spawn_with`, `command`, `in_ns`, `spawn_in_ns`, `iface_counter`, `pids`, `sysctls`);
//! [`Child`] (`pid`, `signal`, `stop`, `kill_now`, `wait_timeout`, `is_running`, `log`);
//! servers [`tcp_echo`], [`tcp_sink`], [`udp_echo`] returning a [`Server`] (`addr`, counters);
//! [`wait_tcp_listening`], [`wait_listed`].
//!
//! Note for filtering tests: the tunnel's UDP carrier (198.51.100.1:5555 <-> 198.51.100.2:5555)
//! is sent and received by a socket of the TEST process inside `host`, so in `host` it is
//! locally generated/delivered traffic of an ordinary local UDP socket; a rule dropping it
//! breaks the tunnel. Traffic to 192.0.2.2 / 2001:db8:99::2 leaves `host` through `tun0`.
//!
//! # Drop order
//!
//! Locals drop in reverse order of declaration, so the natural
//! `let lab = Lab::new("x"); let srv = tcp_echo(&lab.srv, ..); let daemon = lab.host.spawn(..);`
//! stops the daemon, then the server, then the lab. Note that threads made by
//! [`Netns::in_ns`] share the process's mount namespace, so `/sys/class/net` read from them
//! shows the ROOT namespace's interfaces; read `/sys` through [`Netns::run`] (`ip netns exec`
//! remounts it) or [`Netns::iface_counter`].
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use nix::sys::eventfd::{EfdFlags, EventFd};
pub use nix::sys::signal::Signal;
use nix::sys::signal::kill;
use nix::unistd::Pid;

// ---------------------------------------------------------------------------------------------
// Address plan
// ---------------------------------------------------------------------------------------------

/// `cli`'s veth0 address.
pub const CLI_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLI_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);
/// `host`'s veth0 address (toward cli; cli's default gateway).
pub const HOST_CLI_SIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const HOST_CLI_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 1);
/// `host`'s veth1 address (toward srv).
pub const HOST_SRV_SIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const HOST_SRV_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// `srv`'s veth0 address.
pub const SRV_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const SRV_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// The service addresses on `srv`'s `lo` (routed by `host` via srv's veth address).
pub const SRV_SERVICE_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const SRV_SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
/// Tunnel (`tun0`) addresses.
pub const HOST_TUN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const SRV_TUN_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const HOST_TUN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);
pub const SRV_TUN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 2);
/// The UDP port both tunnel endpoints use (on HOST_SRV_SIDE_V4 and SRV_V4).
pub const TUNNEL_UDP_PORT: u16 = 5555;
/// MTU of both `tun0` devices (leaves room for the 28-byte IPv4+UDP encapsulation on the veth).
pub const TUNNEL_MTU: u32 = 1400;

/// Builds a `SocketAddr` from any IP address and a port.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Whether the test process runs as root (the lab needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

// ---------------------------------------------------------------------------------------------
// Namespaces
// ---------------------------------------------------------------------------------------------

static SERIAL: AtomicU32 = AtomicU32::new(0);
/// Serialises `ip netns add/del` within this process (iproute2 sets up the `/run/netns` mount
/// on first use; concurrent first uses can race).
static NETNS_LOCK: Mutex<()> = Mutex::new(());
static REAP_STALE: Once = Once::new();

const NETNS_DIR: &str = "/run/netns";

fn next_serial() -> u32 {
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

fn sanitize_tag(tag: &str) -> String {
    let t: String = tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(16).collect();
    if t.is_empty() { "t".to_string() } else { t }
}

/// If `name` is a lab namespace name (`fg<pid>x<n>` optionally followed by `-...`), its pid.
fn lab_name_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("fg")?;
    let (pid, rest) = rest.split_once('x')?;
    let (serial, _) = rest.split_once('-').unwrap_or((rest, ""));
    if pid.is_empty() || serial.is_empty() || !pid.bytes().chain(serial.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Deletes lab namespaces left behind by test processes that no longer exist (killed with
/// SIGKILL, timed out, ...). Only names of the exact lab pattern whose pid is dead are touched.
fn reap_stale_namespaces() {
    REAP_STALE.call_once(|| {
        let Ok(dir) = std::fs::read_dir(NETNS_DIR) else { return };
        let me = std::process::id() as i32;
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = lab_name_pid(&name) else { continue };
            if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            eprintln!("lab: removing stale namespace {name} (its test process {pid} is gone)");
            let ns = Netns { name };
            drop(ns); // kills what is left inside, then `ip netns del`
        }
    });
}

/// A network namespace owned by the test: created by [`Netns::new`] (or [`Lab::new`]) and
/// deleted on drop, after any process still inside it has been SIGKILLed.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates a fresh, empty namespace `fg<pid>x<n>-<tag>` (with `lo` down; see
    /// [`Netns::setup_basics`]). Panics if it cannot.
    pub fn new(tag: &str) -> Netns {
        let name = format!("fg{}x{}-{}", std::process::id(), next_serial(), sanitize_tag(tag));
        Netns::create(name).unwrap_or_else(|e| panic!("{e}"))
    }

    fn create(name: String) -> Result<Netns, String> {
        if !is_root() {
            return Err(format!("cannot create network namespace {name}: the lab needs root"));
        }
        reap_stale_namespaces();
        let out = {
            let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            Command::new("ip").args(["netns", "add", &name]).output()
        };
        match out {
            Ok(o) if o.status.success() => Ok(Netns { name }),
            Ok(o) => Err(format!("`ip netns add {name}` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
            Err(e) => Err(format!("cannot run `ip netns add {name}`: {e}")),
        }
    }

    /// `/run/netns/NAME`, the bind mount that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The kernel's id of the namespace (the inode shown as `net:[N]` in `/proc/PID/ns/net`).
    pub fn inode(&self) -> u64 {
        std::fs::metadata(self.path()).map(|m| m.ino()).unwrap_or_else(|e| panic!("stat {:?}: {e}", self.path()))
    }

    /// Brings `lo` up and sets the IPv6 / rp_filter defaults every lab namespace gets (see the
    /// module docs). Call it before creating interfaces so `default` applies to them.
    pub fn setup_basics(&self, forwarding: bool) {
        let f = if forwarding { "1" } else { "0" };
        let settings = [
            ("net/ipv6/conf/all/accept_ra", "0"),
            ("net/ipv6/conf/default/accept_ra", "0"),
            ("net/ipv6/conf/all/router_solicitations", "0"),
            ("net/ipv6/conf/default/router_solicitations", "0"),
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/ip_forward", f),
            ("net/ipv6/conf/all/forwarding", f),
        ];
        self.sysctls(&settings);
        self.ip(&["link", "set", "lo", "up"]);
    }

    /// Writes sysctls (`("net/ipv4/ip_forward", "1")`, path relative to /proc/sys) inside the
    /// namespace. `/proc/sys/net` reflects the writing thread's network namespace.
    pub fn sysctls(&self, settings: &[(&str, &str)]) {
        let settings: Vec<(String, String)> = settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let name = self.name.clone();
        self.in_ns(move || {
            for (k, v) in settings {
                let p = Path::new("/proc/sys").join(&k);
                std::fs::write(&p, &v).unwrap_or_else(|e| panic!("in netns {name}: sysctl {k}={v}: {e}"));
            }
        });
    }

    /// A `Command` running `args` inside the namespace (`ip netns exec NAME args...`).
    pub fn command(&self, args: &[&str]) -> Command {
        assert!(!args.is_empty(), "empty command for netns {}", self.name);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Runs a command inside the namespace and returns its output, whatever its exit status
    /// (panics only if it cannot be started). See [`Netns::run_ok`] for the checking variant.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("in netns {}: cannot run {args:?}: {e}", self.name))
    }

    /// Runs a command inside the namespace; returns its stdout, panics with its stdout and
    /// stderr if it fails.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        check_output(&format!("in netns {}: {args:?}", self.name), &o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `ip -n NAME args...` (cheaper than `run(["ip", ...])`); panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
        check_output(&format!("ip -n {} {}", self.name, args.join(" ")), &o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs several `ip` commands (one per line, without the leading `ip`) in one `ip -batch`
    /// process inside the namespace; panics at the first failing line.
    pub fn ip_batch(&self, lines: &[String]) {
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
        let mut script = lines.join("\n");
        script.push('\n');
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write ip batch");
        let o = child.wait_with_output().expect("wait ip batch");
        check_output(&format!("ip -n {} -batch:\n{script}", self.name), &o);
    }

    /// Reads `/sys/class/net/DEV/statistics/COUNTER` (e.g. `tx_packets`) in the namespace.
    pub fn iface_counter(&self, dev: &str, counter: &str) -> u64 {
        let path = format!("/sys/class/net/{dev}/statistics/{counter}");
        let s = self.run_ok(&["cat", &path]);
        s.trim().parse().unwrap_or_else(|e| panic!("in netns {}: {path}: {s:?}: {e}", self.name))
    }

    /// Pids of the processes inside the namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        let o = Command::new("ip").args(["netns", "pids", &self.name]).stdin(Stdio::null()).output();
        match o {
            Ok(o) if o.status.success() => {
                String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Spawns a long-running process inside the namespace (`ip netns exec NAME args...`), its
    /// stdout and stderr going to a log file ([`Child::log`]). When it returns, the process is
    /// already inside the namespace (not necessarily listening yet: see
    /// [`wait_tcp_listening`]). The guard terminates and reaps it on drop.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.spawn_with(args, |_| {})
    }

    /// Like [`Netns::spawn`], letting `configure` adjust the `Command` first (environment,
    /// working directory, stdin, or stdout/stderr to override the log file).
    pub fn spawn_with(&self, args: &[&str], configure: impl FnOnce(&mut Command)) -> Child {
        let prog = Path::new(args.first().copied().unwrap_or("cmd"))
            .file_name()
            .map(|s| sanitize_tag(&s.to_string_lossy()))
            .unwrap_or_default();
        let log_path =
            std::env::temp_dir().join(format!("flowgate-lab-{}-{}-{prog}.log", std::process::id(), next_serial()));
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("create {log_path:?}: {e}"));
        let log2 = log.try_clone().expect("dup log fd");
        let mut cmd = self.command(args);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        // Enter the namespace already in the forked child, before exec'ing `ip netns exec`
        // (which then also remounts /sys etc.): when spawn() returns, the process is in the
        // namespace, so a Netns dropped right after cannot miss it.
        let nsfile = File::open(self.path()).unwrap_or_else(|e| panic!("open {:?}: {e}", self.path()));
        let nsfd = nsfile.as_raw_fd();
        // SAFETY: the closure only makes the async-signal-safe setns syscall on an fd that stays
        // open until spawn() returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        configure(&mut cmd);
        let spawned = cmd.spawn();
        drop(nsfile);
        let child = spawned.unwrap_or_else(|e| {
            let _ = std::fs::remove_file(&log_path);
            panic!("in netns {}: cannot spawn {args:?}: {e}", self.name)
        });
        Child {
            child,
            log_path,
            desc: format!("{args:?} in netns {}", self.name),
            term_timeout: Duration::from_secs(5),
        }
    }

    /// Runs `f` on a new thread that has entered this namespace and returns its result
    /// (re-raising its panic, if any). Sockets created there live in the namespace and keep
    /// working from any thread afterwards.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn_in_ns(f).join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Like [`Netns::in_ns`] but returns the `JoinHandle` without waiting.
    pub fn spawn_in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = self.path();
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("ns:{name}"))
            .spawn(move || {
                enter_netns(&path).unwrap_or_else(|e| panic!("cannot enter netns {name}: {e}"));
                f()
            })
            .expect("spawn thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        for pid in self.pids() {
            if pid != me {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        match Command::new("ip").args(["netns", "del", &self.name]).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!("lab: `ip netns del {}` failed: {}", self.name, String::from_utf8_lossy(&o.stderr).trim())
            }
            Err(e) => eprintln!("lab: cannot run `ip netns del {}`: {e}", self.name),
        }
    }
}

fn enter_netns(path: &Path) -> nix::Result<()> {
    let f = File::open(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    setns(&f, CloneFlags::CLONE_NEWNET)
}

fn check_output(what: &str, o: &Output) {
    if !o.status.success() {
        panic!(
            "{what} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A process started by [`Netns::spawn`]. On drop it gets SIGTERM, then SIGKILL if it has not
/// exited within `term_timeout` (5 s by default), and is reaped. If the test is panicking, the
/// tail of its log is printed (shown with the test failure).
///
/// `ip netns exec` execs the command in place, so [`Child::pid`] is the command's own pid.
/// Processes it forks itself are not tracked, but anything still inside the namespace when the
/// [`Netns`] is dropped is SIGKILLed.
pub struct Child {
    pub child: std::process::Child,
    /// Where stdout and stderr go (removed on drop).
    pub log_path: PathBuf,
    desc: String,
    term_timeout: Duration,
}

impl Child {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal to the process (e.g. SIGHUP to reload). Must not be used after the
    /// process has been reaped (by `wait*`, `kill_now`, `stop`, or through `child` directly).
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill({}, {sig}) for {}: {e}", self.pid(), self.desc));
    }

    /// How long drop / [`Child::stop`] wait after SIGTERM before SIGKILL.
    pub fn set_term_timeout(&mut self, d: Duration) {
        self.term_timeout = d;
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit and reaps it. Returns its status, or None
    /// if it is still running (or was already reaped elsewhere, e.g. via `child` directly).
    /// Uses a pidfd (no sleeping); falls back to short polling if pidfd_open is unavailable.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut pidfd: Option<OwnedFd> = None;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) => {}
                Err(_) => return None, // reaped by someone else
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if pidfd.is_none() {
                // SAFETY: plain syscall; the pid is our unreaped child, so it cannot be reused.
                let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid(), 0) };
                // SAFETY: a new fd returned by pidfd_open, owned by nobody else.
                pidfd = (raw >= 0).then(|| unsafe { OwnedFd::from_raw_fd(raw as i32) });
            }
            match &pidfd {
                Some(fd) => {
                    poll_one(fd.as_fd(), PollFlags::POLLIN, Some(left));
                }
                None => thread::sleep(left.min(Duration::from_millis(10))),
            }
        }
    }

    /// SIGTERM, wait up to the term timeout, then SIGKILL; reaps it and returns the exit status
    /// (None if it had been reaped elsewhere). Never panics (it runs in drop).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        if let Some(st) = self.wait_timeout(self.term_timeout) {
            return Some(st);
        }
        eprintln!("lab: {} still running {:?} after SIGTERM; sending SIGKILL", self.desc, self.term_timeout);
        self.kill_now()
    }

    /// SIGKILL and reap at once (None if it had been reaped elsewhere).
    pub fn kill_now(&mut self) -> Option<ExitStatus> {
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Everything the process has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let st = self.stop();
        if thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(8192);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            let st = st.map_or_else(|| "status unknown".to_string(), |s| s.to_string());
            eprintln!("lab: --- {} ({st}), log tail ---\n{}\nlab: --- end of log ---", self.desc, &log[start..]);
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}

// ---------------------------------------------------------------------------------------------
// poll helpers
// ---------------------------------------------------------------------------------------------

fn new_stop_fd() -> Arc<EventFd> {
    Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).expect("eventfd"))
}

/// Polls one fd; true if it became ready (any revents) within `timeout` (None = forever).
fn poll_one(fd: BorrowedFd<'_>, events: PollFlags, timeout: Option<Duration>) -> bool {
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d.as_millis().clamp(1, i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX),
    };
    let mut fds = [PollFd::new(fd, events)];
    match poll(&mut fds, t) {
        Ok(n) => n > 0,
        Err(_) => false, // EINTR (or ENOMEM): callers re-check their condition
    }
}

/// Waits until `fd` is ready for `events` (or has an error/hangup) or `stop` fires.
/// Returns false when stopped.
fn wait_ready(fd: BorrowedFd<'_>, events: PollFlags, stop: &EventFd) -> bool {
    loop {
        let mut fds = [PollFd::new(stop.as_fd(), PollFlags::POLLIN), PollFd::new(fd, events)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => panic!("poll: {e}"),
        }
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return false;
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In-process servers
// ---------------------------------------------------------------------------------------------

/// Counters shared between a [`Server`] and its threads.
#[derive(Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
    pub packets: AtomicU64,
}

/// An in-process server whose socket was created inside a namespace. It is bound (listening)
/// before its constructor returns, so no waiting is needed. Dropping it closes the socket,
/// stops every connection and joins all its threads (stop is signalled through an eventfd).
pub struct Server {
    /// The bound address (with the real port if 0 was asked for).
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The brief's name for the TCP echo server; all servers share one type.
pub type TcpEchoServer = Server;

impl Server {
    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.stats.connections.load(Ordering::SeqCst)
    }
    /// Bytes received so far (all connections / datagrams).
    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::SeqCst)
    }
    /// UDP datagrams received so far.
    pub fn packets(&self) -> u64 {
        self.stats.packets.load(Ordering::SeqCst)
    }
    /// Stops the server now (same as dropping it).
    pub fn stop(self) {}
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
            && !thread::panicking()
        {
            panic!("lab server thread on {} panicked", self.addr);
        }
    }
}

fn tcp_listen_in(ns: &Netns, addr: SocketAddr) -> TcpListener {
    let name = ns.name.clone();
    ns.in_ns(move || {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("in netns {name}: bind TCP {addr}: {e}"));
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
}

fn tcp_server(
    ns: &Netns,
    addr: SocketAddr,
    kind: &'static str,
    handler: fn(&mut TcpStream, &EventFd, &ServerStats),
) -> Server {
    let listener = tcp_listen_in(ns, addr);
    let addr = listener.local_addr().expect("local_addr");
    let stop = new_stop_fd();
    let stats = Arc::new(ServerStats::default());
    let (stop2, stats2) = (stop.clone(), stats.clone());
    let thread = thread::Builder::new()
        .name(format!("lab-{kind}"))
        .spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while wait_ready(listener.as_fd(), PollFlags::POLLIN, &stop2) {
                match listener.accept() {
                    Ok((s, _)) => {
                        stats2.connections.fetch_add(1, Ordering::SeqCst);
                        s.set_nonblocking(true).expect("nonblocking");
                        let _ = s.set_nodelay(true);
                        conns.retain(|h| !h.is_finished());
                        let (stop3, stats3) = (stop2.clone(), stats2.clone());
                        conns.push(
                            thread::Builder::new()
                                .name(format!("lab-{kind}-conn"))
                                .spawn(move || {
                                    let mut s = s;
                                    handler(&mut s, &stop3, &stats3);
                                    // As for the listener: really end the connection now.
                                    let _ = s.shutdown(Shutdown::Both);
                                })
                                .expect("spawn connection thread"),
                        );
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        eprintln!("lab: {kind} server on {addr}: accept: {e}");
                        // e.g. EMFILE: back off until the stop fd fires or a slot frees up.
                        if poll_one(stop2.as_fd(), PollFlags::POLLIN, Some(Duration::from_millis(50))) {
                            break;
                        }
                    }
                }
            }
            // shutdown() stops the listening socket even if a concurrent fork+exec elsewhere in
            // the test process briefly holds a duplicate of its fd (so new connects are refused
            // as soon as the server is dropped); then close it.
            let _ = nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        })
        .expect("spawn server thread");
    Server { addr, stats, stop, thread: Some(thread) }
}

/// Reads into `buf` from a nonblocking stream; None on EOF, error or stop.
fn read_some(s: &mut TcpStream, buf: &mut [u8], stop: &EventFd) -> Option<usize> {
    loop {
        match s.read(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait_ready(s.as_fd(), PollFlags::POLLIN, stop) {
                    return None;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Writes all of `data` to a nonblocking stream; false on error or stop.
fn write_all_nb(s: &mut TcpStream, mut data: &[u8], stop: &EventFd) -> bool {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return false,
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait_ready(s.as_fd(), PollFlags::POLLOUT, stop) {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

fn echo_conn(s: &mut TcpStream, stop: &EventFd, stats: &ServerStats) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(n) = read_some(s, &mut buf, stop) {
        stats.bytes.fetch_add(n as u64, Ordering::SeqCst);
        if !write_all_nb(s, &buf[..n], stop) {
            return;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn sink_conn(s: &mut TcpStream, stop: &EventFd, stats: &ServerStats) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                stats.bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait_ready(s.as_fd(), PollFlags::POLLIN, stop) {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    // Clean EOF: report what this connection delivered, for clients that half-close and read.
    let _ = write_all_nb(s, format!("{total}\n").as_bytes(), stop);
    let _ = s.shutdown(Shutdown::Write);
}

/// A TCP echo server bound to `addr` inside `ns`: echoes everything back, one thread per
/// connection (any number concurrently), half-closes after the client does.
pub fn tcp_echo(ns: &Netns, addr: SocketAddr) -> Server {
    tcp_server(ns, addr, "echo", echo_conn)
}

/// A TCP sink bound to `addr` inside `ns`: reads and counts bytes ([`Server::bytes`]). When a
/// client half-closes (shutdown(Write)) the sink replies with that connection's byte count as
/// a decimal line (`"12345\n"`) and closes, so the client can check everything arrived.
pub fn tcp_sink(ns: &Netns, addr: SocketAddr) -> Server {
    tcp_server(ns, addr, "sink", sink_conn)
}

/// A UDP echo server bound to `addr` inside `ns`: sends every datagram back to its sender
/// (from `addr`, so bind a specific address if the client uses a connected socket).
pub fn udp_echo(ns: &Netns, addr: SocketAddr) -> Server {
    let name = ns.name.clone();
    let sock = ns.in_ns(move || {
        let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("in netns {name}: bind UDP {addr}: {e}"));
        s.set_nonblocking(true).expect("nonblocking");
        s
    });
    let addr = sock.local_addr().expect("local_addr");
    let stop = new_stop_fd();
    let stats = Arc::new(ServerStats::default());
    let (stop2, stats2) = (stop.clone(), stats.clone());
    let thread = thread::Builder::new()
        .name("lab-udp-echo".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            while wait_ready(sock.as_fd(), PollFlags::POLLIN, &stop2) {
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            stats2.packets.fetch_add(1, Ordering::SeqCst);
                            stats2.bytes.fetch_add(n as u64, Ordering::SeqCst);
                            let _ = sock.send_to(&buf[..n], from);
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => break, // WouldBlock, or an ICMP error reported on the socket
                    }
                }
            }
        })
        .expect("spawn udp thread");
    Server { addr, stats, stop, thread: Some(thread) }
}

// ---------------------------------------------------------------------------------------------
// Waiting for external listeners
// ---------------------------------------------------------------------------------------------

/// Waits until a TCP connect to `addr` from inside `ns` succeeds: bounded retry (~5 s), panics
/// after. Each successful probe is a real (immediately closed) connection seen by the listener
/// (and by flowgate if it is on the path); use [`wait_listed`] to avoid that.
pub fn wait_tcp_listening(ns: &Netns, addr: SocketAddr) {
    let name = ns.name.clone();
    ns.in_ns(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&addr, left.clamp(Duration::from_millis(1), Duration::from_millis(500))) {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("nothing listening on TCP {addr} (seen from netns {name}) after 5 s: {e}")
                }
                // Bounded retry interval of the probe loop, not a synchronisation sleep.
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

/// Which socket table [`wait_listed`] looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Waits (bounded, ~5 s, then panics) until `ss` in `ns` lists a TCP listener / bound UDP
/// socket on `addr` (a wildcard bind on the same port counts). No traffic is generated.
pub fn wait_listed(ns: &Netns, proto: Proto, addr: SocketAddr) {
    let flags = match proto {
        Proto::Tcp => "-Hltn",
        Proto::Udp => "-Hlun",
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = ns.run_ok(&["ss", flags]);
        if out
            .lines()
            .any(|l| l.split_whitespace().nth(3).and_then(parse_ss_addr).is_some_and(|a| addr_matches(a, addr)))
        {
            return;
        }
        if Instant::now() >= deadline {
            panic!("no {proto:?} socket bound to {addr} in netns {} after 5 s; ss {flags}:\n{out}", ns.name);
        }
        thread::sleep(Duration::from_millis(10)); // bounded polling interval
    }
}

/// Parses ss's "Local Address:Port" (`1.2.3.4:80`, `[2001:db8::1]:80`, `*:80`, `0.0.0.0%lo:53`);
/// a `*` host becomes the unspecified address.
fn parse_ss_addr(s: &str) -> Option<SocketAddr> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next()?;
    let ip: IpAddr = if host == "*" { Ipv6Addr::UNSPECIFIED.into() } else { host.parse().ok()? };
    Some(SocketAddr::new(ip, port))
}

fn addr_matches(listed: SocketAddr, want: SocketAddr) -> bool {
    listed.port() == want.port() && (listed.ip() == want.ip() || listed.ip().is_unspecified())
}

// ---------------------------------------------------------------------------------------------
// The tunnel
// ---------------------------------------------------------------------------------------------

/// Opens a TUN device `name` (IFF_TUN | IFF_NO_PI, nonblocking, close-on-exec) in the calling
/// thread's network namespace. The device disappears when the fd is closed.
fn open_tun(name: &str) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(ErrorKind::InvalidInput, "interface name too long"));
    }
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF takes a pointer to a struct ifreq, which outlives the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on a valid fd we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Packet counters of one tunnel side's forwarder.
#[derive(Default)]
pub struct TunnelStats {
    /// Packets read from tun0 and sent as UDP to the peer.
    pub encapsulated: AtomicU64,
    /// UDP datagrams from the peer written to tun0.
    pub decapsulated: AtomicU64,
}

/// The in-process tunnel: per side a TUN fd + UDP socket (both created inside that side's
/// namespace) and one forwarder thread polling both plus a shared stop eventfd.
struct Tunnel {
    stop: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
    stats: [Arc<TunnelStats>; 2],
}

impl Tunnel {
    /// Creates `tun0` + UDP socket in both namespaces and starts the forwarders. The TUN
    /// devices exist (down, unconfigured) when this returns.
    fn start(serial: u32, a: (&Netns, SocketAddr), b: (&Netns, SocketAddr)) -> Tunnel {
        let open = |ns: &Netns, local: SocketAddr| {
            let name = ns.name.clone();
            ns.in_ns(move || {
                let tun = open_tun("tun0").unwrap_or_else(|e| panic!("in netns {name}: cannot create tun0: {e}"));
                let udp =
                    UdpSocket::bind(local).unwrap_or_else(|e| panic!("in netns {name}: tunnel UDP bind {local}: {e}"));
                udp.set_nonblocking(true).expect("nonblocking");
                (tun, udp)
            })
        };
        let stop = new_stop_fd();
        let stats = [Arc::new(TunnelStats::default()), Arc::new(TunnelStats::default())];
        // Open both sides before starting threads, so a failure leaks nothing (fds just close).
        let side_a = open(a.0, a.1);
        let side_b = open(b.0, b.1);
        let mut tunnel = Tunnel { stop: stop.clone(), threads: Vec::new(), stats: stats.clone() };
        for (i, ((tun, udp), peer)) in [(side_a, b.1), (side_b, a.1)].into_iter().enumerate() {
            let (stop, st) = (stop.clone(), stats[i].clone());
            let name = tunnel_thread_name(serial, i);
            let h = thread::Builder::new()
                .name(name)
                .spawn(move || tunnel_forward(tun, udp, peer, &stop, &st))
                .expect("spawn tunnel thread");
            tunnel.threads.push(h);
        }
        tunnel
    }
}

fn tunnel_thread_name(serial: u32, side: usize) -> String {
    format!("fgtun{serial}{}", if side == 0 { 'h' } else { 's' })
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tunnel_forward(mut tun: File, udp: UdpSocket, peer: SocketAddr, stop: &EventFd, stats: &TunnelStats) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (tun_ready, udp_ready) = {
            let mut fds = [
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
                PollFd::new(tun.as_fd(), PollFlags::POLLIN),
                PollFd::new(udp.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => panic!("tunnel poll: {e}"),
            }
            let ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            if ready(0) {
                return;
            }
            (ready(1), ready(2))
        };
        // Bounded batches keep both directions fair.
        if tun_ready {
            for _ in 0..64 {
                match tun.read(&mut buf) {
                    Ok(n) => {
                        if udp.send_to(&buf[..n], peer).is_ok() {
                            stats.encapsulated.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        if udp_ready {
            for _ in 0..64 {
                match udp.recv_from(&mut buf) {
                    Ok((n, from)) if from == peer => {
                        if tun.write(&buf[..n]).is_ok() {
                            stats.decapsulated.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {} // not from the peer: drop
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab
// ---------------------------------------------------------------------------------------------

/// The three-namespace lab described in the module docs. Dropping it stops the tunnel, then
/// deletes the namespaces (SIGKILLing anything still inside).
pub struct Lab {
    pub cli: Netns,
    pub host: Netns,
    pub srv: Netns,
    tunnel: Option<Tunnel>,
    serial: u32,
}

impl Lab {
    /// Builds the lab; `tag` (alphanumerics, up to 16 are kept) goes into the namespace names.
    /// Panics with a clear message on failure, after removing whatever it had made.
    pub fn new(tag: &str) -> Lab {
        if !is_root() {
            panic!("Lab::new({tag:?}): the network-namespace lab needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN)");
        }
        match std::panic::catch_unwind(|| Lab::build(tag)) {
            Ok(lab) => lab,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                panic!("Lab::new({tag:?}) failed; everything it had created was removed. Cause: {msg}")
            }
        }
    }

    fn build(tag: &str) -> Lab {
        let serial = next_serial();
        let base = format!("fg{}x{serial}-{}", std::process::id(), sanitize_tag(tag));
        let mk =
            |role: &str| Netns::create(format!("{base}-{role}")).unwrap_or_else(|e| panic!("Lab::new({tag:?}): {e}"));
        // Each guard is a local: a panic below drops (deletes) what exists so far.
        let cli = mk("cli");
        let host = mk("host");
        let srv = mk("srv");
        cli.setup_basics(false);
        host.setup_basics(true);
        srv.setup_basics(false);

        // veth pairs created directly inside the namespaces (nothing in the root namespace).
        for (a, an, b, bn) in [(&cli, "veth0", &host, "veth0"), (&host, "veth1", &srv, "veth0")] {
            let o = Command::new("ip")
                .args(["link", "add", an, "netns", &a.name, "type", "veth", "peer", "name", bn, "netns", &b.name])
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run ip: {e}"));
            check_output(&format!("Lab::new({tag:?}): veth {}:{an} <-> {}:{bn}", a.name, b.name), &o);
        }

        let l = |s: &str| s.to_string();
        cli.ip_batch(&[
            l("link set veth0 up"),
            format!("addr add {CLI_V4}/24 dev veth0"),
            format!("addr add {CLI_V6}/64 dev veth0 nodad"),
        ]);
        host.ip_batch(&[
            l("link set veth0 up"),
            l("link set veth1 up"),
            format!("addr add {HOST_CLI_SIDE_V4}/24 dev veth0"),
            format!("addr add {HOST_CLI_SIDE_V6}/64 dev veth0 nodad"),
            format!("addr add {HOST_SRV_SIDE_V4}/24 dev veth1"),
            format!("addr add {HOST_SRV_SIDE_V6}/64 dev veth1 nodad"),
        ]);
        srv.ip_batch(&[
            l("link set veth0 up"),
            format!("addr add {SRV_V4}/24 dev veth0"),
            format!("addr add {SRV_V6}/64 dev veth0 nodad"),
            format!("addr add {SRV_SERVICE_V4}/32 dev lo"),
            format!("addr add {SRV_SERVICE_V6}/128 dev lo nodad"),
        ]);
        // Routes after all links are up.
        cli.ip_batch(&[
            format!("route add default via {HOST_CLI_SIDE_V4}"),
            format!("route add ::/0 via {HOST_CLI_SIDE_V6}"),
        ]);
        host.ip_batch(&[
            format!("route add 203.0.113.0/24 via {SRV_V4}"),
            format!("route add 2001:db8:2::/64 via {SRV_V6}"),
        ]);
        srv.ip_batch(&[
            format!("route add 198.18.0.0/24 via {HOST_SRV_SIDE_V4}"),
            format!("route add 2001:db8:18::/64 via {HOST_SRV_SIDE_V6}"),
        ]);

        let tunnel =
            Tunnel::start(serial, (&host, sa(HOST_SRV_SIDE_V4, TUNNEL_UDP_PORT)), (&srv, sa(SRV_V4, TUNNEL_UDP_PORT)));
        for (ns, v4, v6) in [(&host, HOST_TUN_V4, HOST_TUN_V6), (&srv, SRV_TUN_V4, SRV_TUN_V6)] {
            ns.ip_batch(&[
                format!("link set tun0 mtu {TUNNEL_MTU} up"),
                format!("addr add {v4}/30 dev tun0"),
                format!("addr add {v6}/64 dev tun0 nodad"),
            ]);
        }
        Lab { cli, host, srv, tunnel: Some(tunnel), serial }
    }

    /// The three namespaces, in the order cli, host, srv.
    pub fn namespaces(&self) -> [&Netns; 3] {
        [&self.cli, &self.host, &self.srv]
    }

    /// Packets the host side of the tunnel encapsulated (tun0 -> UDP) and decapsulated.
    pub fn tunnel_host_stats(&self) -> (u64, u64) {
        self.tunnel_stats(0)
    }

    /// Packets the srv side of the tunnel encapsulated (tun0 -> UDP) and decapsulated.
    pub fn tunnel_srv_stats(&self) -> (u64, u64) {
        self.tunnel_stats(1)
    }

    fn tunnel_stats(&self, i: usize) -> (u64, u64) {
        let t = self.tunnel.as_ref().expect("tunnel");
        (t.stats[i].encapsulated.load(Ordering::Relaxed), t.stats[i].decapsulated.load(Ordering::Relaxed))
    }

    /// Names of the two tunnel forwarder threads (as in /proc/self/task/*/comm), for checks
    /// that they are gone after drop.
    pub fn tunnel_thread_names(&self) -> [String; 2] {
        [tunnel_thread_name(self.serial, 0), tunnel_thread_name(self.serial, 1)]
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The tunnel's fds keep its namespaces alive: stop it before the Netns fields drop.
        drop(self.tunnel.take());
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon and its events (content inspection tests: tests/content.rs)
// ---------------------------------------------------------------------------------------------

/// A directory of a test's files (configs, certificates, server logs), removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// `$TMPDIR/flowgate-<tag>-<pid>-<n>`, created empty.
    pub fn new(tag: &str) -> ScratchDir {
        let p = std::env::temp_dir().join(format!(
            "flowgate-{}-{}-{}",
            sanitize_tag(tag),
            std::process::id(),
            next_serial()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {p:?}: {e}"));
        ScratchDir(p)
    }

    /// The path of `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` and returns its path.
    pub fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).unwrap_or_else(|e| panic!("write {p:?}: {e}"));
        p
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (bounded by `timeout`, then panics naming `what`) until `check` returns Some, calling it
/// every 20 ms: for state that only shows in files (event logs, server logs).
pub fn poll_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20)); // bounded polling interval
    }
}

/// Parses a file of JSON lines (an event log, a server's log); a missing file is empty, a torn
/// last line (being written) is left out.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// `flowgate run` in a lab namespace, with its config in a [`ScratchDir`] of its own (`run_dir`,
/// `log = events.jsonl` and `queues = 2` come first, then the caller's text). Its stdout and
/// stderr go to the [`Child`]'s log (shown when a test fails); SIGTERM on drop.
pub struct FlowgateRun {
    pub child: Child,
    pub dir: ScratchDir,
    /// From the spawn to the daemon's ready line.
    pub ready_after: Duration,
    flowgate: PathBuf,
    ns: String,
}

impl FlowgateRun {
    /// Starts `flowgate` (the binary) in `ns` with `config` and waits (up to `ready_timeout`)
    /// for its `flowgate: ready` line; panics with its log if it exits or is not ready in time.
    pub fn start(ns: &Netns, flowgate: &Path, tag: &str, config: &str, ready_timeout: Duration) -> FlowgateRun {
        let dir = ScratchDir::new(&format!("run-{tag}"));
        let text = format!(
            "run_dir = \"{}\"\nlog = \"{}\"\nqueues = 2\n{config}",
            dir.path("run").display(),
            dir.path("events.jsonl").display()
        );
        let conf = dir.write("flowgate.toml", text.as_bytes());
        let t0 = Instant::now();
        let mut child = ns.spawn(&[&flowgate.to_string_lossy(), "run", "--config", &conf.to_string_lossy()]);
        child.set_term_timeout(Duration::from_secs(30));
        let deadline = t0 + ready_timeout;
        loop {
            if child.log().contains("flowgate: ready") {
                break;
            }
            if !child.is_running() {
                panic!("flowgate exited before it was ready; config:\n{text}\nlog:\n{}", child.log());
            }
            if Instant::now() >= deadline {
                panic!("flowgate not ready within {ready_timeout:?}; log:\n{}", child.log());
            }
            thread::sleep(Duration::from_millis(10)); // bounded polling of its log
        }
        FlowgateRun { child, dir, ready_after: t0.elapsed(), flowgate: flowgate.to_path_buf(), ns: ns.name.clone() }
    }

    /// Every event logged so far.
    pub fn events(&self) -> Vec<serde_json::Value> {
        json_lines(&self.dir.path("events.jsonl"))
    }

    /// Waits (up to 10 s) until the events logged so far satisfy `check`, and returns its value.
    pub fn wait_events<T>(&self, what: &str, check: impl Fn(&[serde_json::Value]) -> Option<T>) -> T {
        poll_until(what, Duration::from_secs(10), || check(&self.events()))
    }

    /// The daemon's own pid (`ip netns exec` execs it in place).
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// A line of `/proc/PID/status` of the daemon, in kB (`VmRSS`, `VmHWM`).
    pub fn status_kb(&self, key: &str) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
    }

    /// Runs the flowgate CLI (`flowgate ARGS... --run-dir RUN_DIR`) in the daemon's namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        let run_dir = self.dir.path("run");
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.flowgate)
            .args(args)
            .arg("--run-dir")
            .arg(&run_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run flowgate {args:?}: {e}"))
    }

    /// SIGTERM, waits for the exit (must be status 0) and returns every event.
    pub fn stop(mut self) -> Vec<serde_json::Value> {
        self.child.signal(Signal::SIGTERM);
        let st = self.child.wait_timeout(Duration::from_secs(30));
        assert!(st.is_some_and(|s| s.success()), "flowgate exited with {st:?}; log:\n{}", self.child.log());
        self.events()
    }
}

/// The events of flow `id`, in log order.
pub fn events_of(events: &[serde_json::Value], id: u64) -> Vec<&serde_json::Value> {
    events.iter().filter(|e| e["flow"]["id"].as_u64() == Some(id)).collect()
}

/// The ids of the flows between `local` and `remote` (`addr:port` as events write them), first
/// seen first.
pub fn flows_between(events: &[serde_json::Value], local: &str, remote: &str) -> Vec<u64> {
    flow_ids(events, |f| f["local"] == local && f["remote"] == remote)
}

/// The ids of the flows to `remote` (`addr:port`), first seen first.
pub fn flows_to(events: &[serde_json::Value], remote: &str) -> Vec<u64> {
    flow_ids(events, |f| f["remote"] == remote)
}

fn flow_ids(events: &[serde_json::Value], pick: impl Fn(&serde_json::Value) -> bool) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in events {
        if pick(&e["flow"])
            && let Some(id) = e["flow"]["id"].as_u64()
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    ids
}

/// A flow's final verdict and rule: those of its last `flow.verdict` or `flow.update` event.
pub fn final_verdict(events: &[serde_json::Value], id: u64) -> Option<(String, String)> {
    events_of(events, id)
        .into_iter()
        .rev()
        .find(|e| e["event"] == "flow.verdict" || e["event"] == "flow.update")
        .map(|e| (e["verdict"].as_str().unwrap_or("").to_string(), e["rule"].as_str().unwrap_or("").to_string()))
}

/// A flow's `host` object, from its last event that carries one (in `flow.host`, or beside
/// `flow`).
pub fn host_of(events: &[serde_json::Value], id: u64) -> Option<serde_json::Value> {
    events_of(events, id)
        .into_iter()
        .rev()
        .find_map(|e| [&e["flow"]["host"], &e["host"]].into_iter().find(|h| h.is_object()).cloned())
}
