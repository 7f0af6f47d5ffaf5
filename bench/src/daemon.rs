//! The real `flowgate run` daemon in a lab namespace, for the live benchmarks
//! (`src/bin/live.rs`, `src/bin/verdicts.rs`, `src/bin/flows.rs`): its config file, its start
//! (spawned through `ip netns exec`, timed until its ready line on stderr), its stop (SIGTERM,
//! exit status 0 required), its event log, and the checks at the end that none of the daemons is
//! left. Also the pre-exec setup of the benchmarks' other long-lived children.
//!
//! It touches: `flowgate.toml` in the run's [`TempDir`] (which also holds the daemon's `run_dir`
//! and event log), the processes it spawns (and only those: the lab's [`lab::Child`] guard
//! SIGTERMs, then SIGKILLs and reaps each one on drop), and this process's stderr, where the
//! daemon's stderr lines are echoed as `  [flowgate] ...`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::guard::{TempDir, emergency_cleanup, namespaces_left, tool};
use crate::lab::{self, Netns};

type Result<T> = std::result::Result<T, String>;

/// What the daemon prints on stderr once it is ready.
pub const READY_LINE: &str = "flowgate: ready";

/// Writes the daemon's config, `flowgate.toml` in `dir`: `run_dir` and `log` in `dir`, 2 queues,
/// then `extra` (more keys, tables, rules) as it is.
pub fn write_config(dir: &TempDir, extra: &str) -> Result<PathBuf> {
    let text =
        format!("run_dir = \"{}\"\nlog = \"{}\"\nqueues = 2\n{extra}", dir.run_dir().display(), dir.log().display());
    let path = dir.0.join("flowgate.toml");
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// For the long-lived children (the daemon, and the benchmarks' own: an echo server, a
/// listing), in the child before exec: an empty signal mask, and `deathsig` when the spawning
/// thread dies (PR_SET_PDEATHSIG: only the main thread spawns them, and it lives until the end).
///
/// The benchmarks block SIGINT, SIGTERM and SIGHUP for the signal thread of
/// [`crate::guard::install`], and children inherit that mask (`SigBlk: 0x4003` was seen), so a
/// child that does not manage its own signals would ignore the guards' SIGTERM.
pub fn child_setup(cmd: &mut Command, deathsig: libc::c_int) {
    // SAFETY: sigemptyset, pthread_sigmask and prctl are async-signal-safe and only touch the
    // child's own stack.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            let rc = libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, deathsig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// How a benchmark runs its daemons.
pub struct Options {
    /// How long the daemon may take to print its ready line.
    pub ready_timeout: Duration,
    /// How long it may take to exit after SIGTERM (also the guard's wait before SIGKILL).
    pub stop_timeout: Duration,
    /// How many of its stderr lines are echoed to this process's stderr (all are kept), and
    /// what is echoed instead of the first line that is not.
    pub echo_lines: usize,
    pub echo_more: &'static str,
}

/// Pids of every daemon this process started, checked at the end ([`check_nothing_left`]).
static SPAWNED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// `flowgate run` inside a namespace. The lab's [`lab::Child`] guard SIGTERMs (then SIGKILLs)
/// and reaps it on drop; it also gets SIGTERM if this process dies ([`child_setup`]).
pub struct Daemon {
    child: lab::Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    stop_timeout: Duration,
}

/// A started daemon, how long it took from the spawn to its ready line, and the line.
pub struct Ready {
    pub daemon: Daemon,
    pub took: Duration,
    pub line: String,
}

impl Daemon {
    /// Spawns `flowgate run --config CONFIG` in `ns` and waits for its ready line.
    pub fn start(ns: &Netns, flowgate: &Path, config: &Path, opts: &Options) -> Result<Ready> {
        let flowgate = flowgate.to_string_lossy();
        let config = config.to_string_lossy();
        let t0 = Instant::now();
        let mut child = ns.spawn_with(&[&flowgate, "run", "--config", &config], |cmd| {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
            child_setup(cmd, libc::SIGTERM);
        });
        SPAWNED.lock().unwrap_or_else(|p| p.into_inner()).push(child.pid());
        child.set_term_timeout(opts.stop_timeout);
        let pipe = child.child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, rx) = mpsc::channel();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let kept = stderr.clone();
        let (echo_lines, echo_more) = (opts.echo_lines, opts.echo_more);
        std::thread::Builder::new()
            .name("flowgate-stderr".into())
            .spawn(move || {
                for (i, line) in BufReader::new(pipe).lines().map_while(std::result::Result::ok).enumerate() {
                    if i < echo_lines {
                        eprintln!("  [flowgate] {line}");
                    } else if i == echo_lines {
                        eprintln!("  [flowgate] {echo_more}");
                    }
                    kept.lock().unwrap_or_else(|p| p.into_inner()).push(line.clone());
                    let _ = tx.send(line);
                }
            })
            .map_err(|e| format!("cannot start the stderr reader: {e}"))?;
        let mut d = Daemon { child, lines: rx, stderr, stop_timeout: opts.stop_timeout };
        let deadline = t0 + opts.ready_timeout;
        loop {
            match d.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(READY_LINE) => return Ok(Ready { daemon: d, took: t0.elapsed(), line }),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = d.child.wait_timeout(Duration::from_secs(5));
                    return Err(format!(
                        "flowgate exited before it was ready ({}):\n{}",
                        describe_exit(st),
                        d.stderr_text()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!("flowgate did not print `{READY_LINE}` within {:?}", opts.ready_timeout));
                }
            }
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// The pid of the flowgate process itself. `ip netns exec` execs the command in place, so
    /// it is the child's pid; checked through `/proc/PID/exe`, with its children as fallback.
    pub fn flowgate_pid(&self, flowgate: &Path) -> Result<i32> {
        let pid = self.child.pid();
        let is_flowgate = |p: i32| fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == flowgate);
        if is_flowgate(pid) {
            return Ok(pid);
        }
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .find(|&c| is_flowgate(c))
            .ok_or_else(|| format!("neither pid {pid} nor a child of it runs {}", flowgate.display()))
    }

    /// SIGTERM, waits for the exit; returns how long it took and the stderr lines other than the
    /// ready and stop lines, or an error unless it exited 0.
    pub fn stop(mut self) -> Result<(Duration, Vec<String>)> {
        let t0 = Instant::now();
        kill(Pid::from_raw(self.child.pid()), Signal::SIGTERM).map_err(|e| format!("kill flowgate: {e}"))?;
        match self.child.wait_timeout(self.stop_timeout) {
            Some(st) if st.success() => {
                let took = t0.elapsed();
                let lines = self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let other = lines
                    .into_iter()
                    .filter(|l| {
                        !l.contains(READY_LINE) && !l.contains("flowgate: SIGTERM: stopping") && !l.contains("stopped;")
                    })
                    .collect();
                Ok((took, other))
            }
            st => {
                Err(format!("flowgate did not exit 0 after SIGTERM ({}):\n{}", describe_exit(st), self.stderr_text()))
            }
        }
    }
}

/// An exit status as the error messages show it.
pub fn describe_exit(st: Option<ExitStatus>) -> String {
    st.map_or_else(|| "still running or status unknown".into(), |s| s.to_string())
}

/// After a daemon stopped: an error unless no process is left in its namespace `ns`.
pub fn check_stopped_alone(ns: &Netns) -> Result<()> {
    let left = ns.pids();
    if !left.is_empty() {
        return Err(format!("processes left in {} after flowgate stopped: {left:?}", ns.name));
    }
    Ok(())
}

/// The daemons this process started that are still running.
pub fn daemons_alive() -> Vec<i32> {
    SPAWNED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .filter(|&p| kill(Pid::from_raw(p), None).is_ok())
        .collect()
}

/// At the end of a run: true when none of this process's lab namespaces and none of the daemons
/// it started is left; else says what is left (`<tool>: left behind: ...`), removes it with
/// [`emergency_cleanup`] and returns false.
pub fn check_nothing_left() -> bool {
    let (leftover, alive) = (namespaces_left(), daemons_alive());
    if leftover.is_empty() && alive.is_empty() {
        return true;
    }
    eprintln!("{}: left behind: namespaces {leftover:?}, flowgate processes {alive:?}", tool());
    emergency_cleanup();
    false
}

/// Reads an event log: every event, parsed.
pub fn read_events(path: &Path) -> Result<Vec<Value>> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines().map(|l| serde_json::from_str(l).map_err(|e| format!("bad event line ({e}): {l}"))).collect()
}

/// Whether an event's `flow` object is a TCP flow to `to`.
pub fn is_tcp_to(flow: &Value, to: Ipv4Addr) -> bool {
    let prefix = format!("{to}:");
    flow["protocol"] == "tcp" && flow["remote"].as_str().is_some_and(|r| r.starts_with(&prefix))
}
