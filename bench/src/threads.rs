//! Threads of the live benchmarks that measure per-packet costs (`src/bin/packets.rs`,
//! `src/bin/compare.rs`): starting a named thread and learning its kernel id, its nice value,
//! and pinning it to a CPU.
//!
//! It touches only this process's threads (their priority and CPU affinity).

use std::thread::JoinHandle;
use std::time::Duration;

type Result<T> = std::result::Result<T, String>;

/// Sets the calling thread's nice value, as the daemon does for its queue workers (-10).
pub fn nice(value: libc::c_int) {
    // SAFETY: gettid and setpriority take no pointers and only touch this thread's priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, value);
    }
}

/// Spawns thread `name` running `f` and waits until it has started and said its kernel id, which
/// is returned with its handle.
pub fn spawn_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(JoinHandle<T>, i32)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // SAFETY: gettid takes no arguments and cannot fail.
            let _ = tx.send(unsafe { libc::gettid() });
            f()
        })
        .map_err(|e| format!("cannot start thread {name}: {e}"))?;
    let tid = rx.recv_timeout(Duration::from_secs(10)).map_err(|e| format!("thread {name} did not start: {e}"))?;
    Ok((handle, tid))
}

/// Pins thread `tid` (None: the calling thread) to `cpu`.
pub fn pin(tid: Option<i32>, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid.unwrap_or(0)), &set)
        .map_err(|e| format!("pinning thread {} to CPU {cpu}: {e}", tid.unwrap_or(0)))
}

/// Pins the calling thread to `cpu`, if given; says so if it cannot.
pub fn pin_me(cpu: Option<usize>) {
    if let Some(c) = cpu
        && let Err(e) = pin(None, c)
    {
        eprintln!("{}: {e}", crate::guard::tool());
    }
}

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(_) => Vec::new(),
    }
}
