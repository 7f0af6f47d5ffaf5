//! Cleanup for the live benchmarks (`src/bin/live.rs`, `src/bin/verdicts.rs`,
//! `src/bin/flows.rs`), for the paths where their Drop guards cannot run: a signal, or a panic in
//! a build that aborts on panic.
//!
//! Each binary calls [`install`] with its name first thing; [`TempDir`] names its directories
//! after that name and this process, and [`emergency_cleanup`] removes them along with this
//! process's lab namespaces (`fg<pid>x...`) and everything running in them.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

static TOOL: OnceLock<&'static str> = OnceLock::new();

/// The binary's name given to [`install`] (`bench` before), which its messages start with.
pub fn tool() -> &'static str {
    TOOL.get().copied().unwrap_or("bench")
}

/// Prefix of this process's temp directories.
fn temp_prefix() -> String {
    format!("flowgate-{}-bench-{}-", tool(), std::process::id())
}

/// This process's lab namespaces (`fg<pid>x...`) that exist now.
pub fn namespaces_left() -> Vec<String> {
    let prefix = format!("fg{}x", std::process::id());
    fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Kills everything inside this process's lab namespaces (the daemon included), deletes them,
/// and removes this process's temp files.
pub fn emergency_cleanup() {
    let me = std::process::id();
    for name in namespaces_left() {
        let pids = Command::new("ip").args(["netns", "pids", &name]).stderr(Stdio::null()).output();
        if let Ok(o) = pids {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                if pid != me as i32 {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        eprintln!("{}: removed namespace {name}", tool());
    }
    // Ours, and the log files of the lab's process guards (`flowgate-lab-<pid>-...`).
    let lab_logs = format!("flowgate-lab-{me}-");
    if let Ok(dir) = fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&temp_prefix()) {
                let _ = fs::remove_dir_all(entry.path());
            } else if name.starts_with(&lab_logs) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// The start of a live benchmark's `main`: its options from `parse_opts` (else the error and
/// exit 2), root (else exit 2: the benchmark needs it for `needs`), then [`install`] (else exit
/// 1). Messages start with `tool`, the binary's name, which is also its script's:
/// `bench/<tool>.sh`.
pub fn begin<T>(tool: &'static str, needs: &str, parse_opts: impl FnOnce() -> Result<T, String>) -> T {
    let opts = parse_opts().unwrap_or_else(|e| {
        eprintln!("{tool}: {e}");
        std::process::exit(2);
    });
    if !crate::lab::is_root() {
        eprintln!("{tool}: needs root ({needs}); run bench/{tool}.sh as root");
        std::process::exit(2);
    }
    if let Err(e) = install(tool) {
        eprintln!("{tool}: {e}");
        std::process::exit(1);
    }
    opts
}

/// Names this binary (`tool`), blocks SIGINT, SIGTERM and SIGHUP in every thread (call before
/// any thread starts) and takes them on a thread of their own, which cleans up and exits; with
/// `panic = "abort"`, a panic cleans up too.
pub fn install(tool: &'static str) -> Result<(), String> {
    let _ = TOOL.set(tool);
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block().map_err(|e| format!("cannot block signals: {e}"))?;
    std::thread::Builder::new()
        .name(format!("{tool}-signals"))
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                eprintln!("{tool}: {sig}: removing the labs and the daemon, then exiting");
                emergency_cleanup();
                std::process::exit(128 + sig as i32);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    if cfg!(panic = "abort") {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            eprintln!("{tool}: panic with panic = \"abort\": removing the labs and the daemon");
            emergency_cleanup();
        }));
    }
    Ok(())
}

/// A temp directory of this process, removed on drop; the daemon's run_dir and log live in it.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir, String> {
        let p = std::env::temp_dir().join(format!("{}{tag}", temp_prefix()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn run_dir(&self) -> PathBuf {
        self.0.join("run")
    }

    pub fn log(&self) -> PathBuf {
        self.0.join("events.jsonl")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
