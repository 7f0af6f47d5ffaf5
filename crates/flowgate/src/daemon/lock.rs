//! The instance lock: one running flowgate per `run_dir`.
//!
//! An exclusive `flock(2)` on `run_dir/flowgate.lock`, holding the owner's pid for messages. The
//! kernel releases the lock when the process dies, however it dies, so a SIGKILLed instance
//! never blocks the next start.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside `run_dir`.
pub const LOCK: &str = "flowgate.lock";

/// Held for the life of the instance; dropping it releases the lock.
pub struct InstanceLock(#[allow(dead_code)] Flock<File>);

pub(crate) fn acquire(run_dir: &Path) -> Result<InstanceLock, String> {
    let path = run_dir.join(LOCK);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: cannot open lock file: {e}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            let _ = locked.set_len(0);
            let _ = locked.rewind();
            let _ = writeln!(locked, "{}", std::process::id());
            Ok(InstanceLock(locked))
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(format!(
                "another flowgate is already running (pid {}, lock {}); stop it first",
                pid.trim(),
                path.display()
            ))
        }
        Err((_, e)) => Err(format!("{}: cannot lock: {e}", path.display())),
    }
}
