//! Processes of the live benchmarks: this process's file-descriptor limit (raised for runs that
//! hold thousands of sockets, `src/bin/verdicts.rs`, `src/bin/compare.rs`) and another process's
//! memory as `/proc/PID/status` reports it (`src/bin/flows.rs`, `src/bin/compare.rs`).
//!
//! It reads `/proc/PID/status` and changes only this process's RLIMIT_NOFILE.

use std::fs;

type Result<T> = std::result::Result<T, String>;

/// Raises this process's RLIMIT_NOFILE soft limit to `want`, and the hard limit too where
/// allowed (that needs CAP_SYS_RESOURCE); children inherit it. Returns the soft limit in force.
/// (`nix::sys::resource` needs nix's `resource` feature, which the workspace does not enable.)
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit struct, which lives on this stack frame.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
    }
    if cur.rlim_cur >= want {
        return Ok(cur.rlim_cur);
    }
    for new in [
        libc::rlimit { rlim_cur: want, rlim_max: cur.rlim_max.max(want) },
        libc::rlimit { rlim_cur: want.min(cur.rlim_max), rlim_max: cur.rlim_max },
    ] {
        // SAFETY: setrlimit reads one rlimit struct, which lives on this stack frame.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return Ok(new.rlim_cur);
        }
    }
    Err(format!("setrlimit(RLIMIT_NOFILE, {want}): {}", std::io::Error::last_os_error()))
}

/// `VmRSS` or another `Vm*` line of `/proc/PID/status`, in bytes.
pub fn vm_bytes(pid: i32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .ok_or_else(|| format!("{path}: no {key}"))?;
    let kib: u64 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{path}: {key}: {line:?}"))?;
    Ok(kib * 1024)
}
