//! What the live tests share: a network namespace guard ([`Netns`]), the root check ([`root`]) and
//! a command runner ([`cmd`]). Each test file includes it with `mod common;`.
//!
//! The rules: a test works only in network namespaces it creates itself, never in the host's; each
//! has a name no other test or concurrent run uses (`<prefix>-<pid>-<n>`, the prefix the test
//! file's); and everything a test makes lives in its namespace, which is deleted when the
//! [`Netns`] is dropped, also when the test panics. Without root a test says so and passes.
//!
//! Every test binary compiles this module on its own, so a helper some of them do not use is
//! marked `#[allow(dead_code)]`.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns};

/// Whether the tests run as root. If not, says that the calling test is skipped; under CI (`CI`
/// set) a test that cannot run fails instead, since skipped is not passed.
pub fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    // The test harness names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    assert!(std::env::var_os("CI").is_none(), "{test}: needs root (network namespaces), and CI is set");
    eprintln!("{}: {test}: skipped, needs root (network namespaces)", env!("CARGO_CRATE_NAME"));
    false
}

/// Where `name` is installed, looked for in the system directories first (where `PATH` may not
/// reach), else `name` itself for a lookup on `PATH`.
fn program(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a program (in the calling thread's network namespace), asserts it succeeds, returns its
/// stdout.
pub fn cmd(name: &str, args: &[&str]) -> String {
    let out = Command::new(program(name)).args(args).output().unwrap_or_else(|e| panic!("running {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own, deleted with `ip netns del` when this is dropped,
/// unwinding included.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new, empty namespace named `<prefix>-<pid>-<n>`: unique within the run and among runs.
    pub fn new(prefix: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        cmd("ip", &["netns", "add", &name]);
        Netns { name }
    }

    #[allow(dead_code)]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `args` (program first) in the namespace with `ip netns exec`, asserts it succeeds,
    /// returns its stdout.
    #[allow(dead_code)]
    pub fn exec(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        cmd("ip", &all)
    }

    /// Runs `f` on a thread that has entered the namespace: the sockets it opens, the sysctls it
    /// writes and the programs it starts are the namespace's.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                setns(&ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("entering {path}: {e}"));
                f()
            });
            thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let status = Command::new(program("ip")).args(["netns", "del", &self.name]).status();
        if !status.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("warning: could not delete network namespace {}: {status:?}", self.name);
        }
    }
}
