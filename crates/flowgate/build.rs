//! Build script: embeds what `flowgate --version` reports besides the crate's version: the git
//! commit the binary was built from and the target it was built for.
//!
//! The commit comes from `FLOWGATE_COMMIT` when set (a packager building from a tarball can name
//! it), else from `git rev-parse HEAD` in the source tree; without git, or outside a git
//! checkout of flowgate (a build from a source tarball, also one unpacked inside some other
//! repository), it is "unknown" and the build goes on. It touches nothing but
//! git's read-only commands and cargo's instructions on stdout.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=FLOWGATE_COMMIT");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let commit = match std::env::var("FLOWGATE_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        // Only a checkout of flowgate itself names the commit: a tarball unpacked inside some
        // other repository's work tree must not take that repository's commit.
        _ if git(Path::new(&dir), &["ls-files", "--error-unmatch", "build.rs"]).is_some() => {
            watch_head(Path::new(&dir));
            git(Path::new(&dir), &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
        _ => "unknown".into(),
    };
    println!("cargo:rustc-env=FLOWGATE_COMMIT={commit}");
    // Always set by cargo for build scripts; the fallback only keeps a hand-run build working.
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=FLOWGATE_TARGET={target}");
}

/// Runs git in `dir`; its trimmed stdout if it succeeded and printed something.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// Asks cargo to run this script again when HEAD moves: HEAD itself (a checkout), its reflog
/// (every commit, checkout or reset appends to it), the branch HEAD names and packed-refs. Paths
/// come from git, so worktrees work too. Only files that exist are named: cargo would run the
/// script, and rebuild the crate, on every build for one that does not.
fn watch_head(dir: &Path) {
    let mut files = vec!["HEAD".to_string(), "logs/HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        files.push(branch);
    }
    for f in files {
        if let Some(path) = git(dir, &["rev-parse", "--path-format=absolute", "--git-path", &f])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
