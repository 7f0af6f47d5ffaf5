//! The Debian package: `packaging/build-deb.sh` builds it, dpkg installs it into an empty root
//! of the test's own, and every file is checked where the package says it is.
//!
//! The package is made from the debug binaries this test run already built (`--dev
//! --no-build`): a release build would add minutes to the suite, and what is checked here (the
//! files, their places, the dpkg database, the unit, the pages) does not depend on the
//! profile. It is built twice, and the two must be byte-identical (reproducible). A second test
//! runs the package under a real systemd in a container (`packaging/systemd-check.sh`). Needs
//! root (dpkg sets owners, containers) and dpkg, dpkg-dev, binutils, groff, systemd (for
//! `systemd-analyze`), systemd-container (systemd-nspawn); `scripts/test.sh` installs them, and
//! cargo-deb. Temporary roots, mounts and containers go also when a test fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether `program` is on the PATH.
fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

/// Returns early (skipped) when the test cannot run: not root, or a tool missing. Under CI that
/// is a failure, never a skip.
macro_rules! require {
    ($($tool:expr),* $(,)?) => {
        let mut missing: Vec<&str> = Vec::new();
        if !is_root() {
            missing.push("root");
        }
        $(if !have($tool) { missing.push($tool); })*
        if !missing.is_empty() {
            assert!(std::env::var_os("CI").is_none(), "the packaging test needs {} (scripts/test.sh installs them)", missing.join(", "));
            eprintln!("skipped: the packaging test needs {}", missing.join(", "));
            return;
        }
    };
}

/// A directory of the test's, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("flowgate-packaging-{tag}-{}", std::process::id()));
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

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cargo target directory these test binaries were built in.
fn target_dir() -> PathBuf {
    // CARGO_BIN_EXE_flowgate is TARGET/debug/flowgate.
    let bin = Path::new(env!("CARGO_BIN_EXE_flowgate"));
    bin.parent().and_then(Path::parent).map(Path::to_path_buf).expect("the binary's target dir")
}

/// Runs `cmd`; its output, or a panic with both streams when it fails.
fn ok(what: &str, cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One package build at a time: every build writes the generated pages and completions to the
/// same place (`target/debug/packaging`, where cargo-deb reads them).
static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds the .deb into `dir` (debug binaries, no build); returns its path.
fn build_deb(dir: &Path) -> PathBuf {
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // The man page generator, built with this test (asked for so that it is).
    assert!(Path::new(env!("CARGO_BIN_EXE_flowgate-gen")).exists());
    ok(
        "packaging/build-deb.sh --dev --no-build",
        Command::new(repo().join("packaging/build-deb.sh"))
            .args(["--dev", "--no-build", "--output"])
            .arg(dir)
            .env("CARGO_TARGET_DIR", target_dir()),
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read the output dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "expected one .deb in {}: {debs:?}", dir.display());
    debs[0].clone()
}

/// The man pages the package must have: flowgate(1) and one per subcommand, at any depth.
fn expected_pages() -> BTreeSet<String> {
    fn walk(cmd: &clap::Command, prefix: &str, out: &mut BTreeSet<String>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            let name = format!("{prefix}-{}", sub.get_name());
            out.insert(format!("usr/share/man/man1/{name}.1.gz"));
            walk(sub, &name, out);
        }
    }
    let mut out = BTreeSet::from(["usr/share/man/man1/flowgate.1.gz".to_string()]);
    walk(&flowgate::cli::Cli::command(), "flowgate", &mut out);
    out
}

#[test]
fn the_deb_installs_every_file_where_it_says_and_builds_reproducibly() {
    require!("dpkg", "dpkg-deb", "dpkg-query", "dpkg-shlibdeps", "strip", "groff", "gzip", "bash", "systemd-analyze");
    let tmp = TempDir::new("deb");
    let deb = build_deb(&tmp.0.join("first"));

    // Reproducible: a second build of the same commit is byte for byte the same.
    let again = build_deb(&tmp.0.join("second"));
    let (a, b) = (std::fs::read(&deb).expect("read .deb"), std::fs::read(&again).expect("read .deb"));
    assert!(a == b, "two builds differ: {} and {}", deb.display(), again.display());

    // What the package says it holds.
    let listing = text(&ok("dpkg-deb -c", Command::new("dpkg-deb").arg("-c").arg(&deb)));
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches("./").to_string())
        .collect();
    let mut expected: BTreeSet<String> = [
        "usr/bin/flowgate",
        "lib/systemd/system/flowgate.service",
        "usr/lib/tmpfiles.d/flowgate.conf",
        "etc/flowgate/config.toml",
        "usr/share/bash-completion/completions/flowgate",
        "usr/share/zsh/vendor-completions/_flowgate",
        "usr/share/fish/vendor_completions.d/flowgate.fish",
        "usr/share/doc/flowgate/README.md",
        "usr/share/doc/flowgate/copyright",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    expected.extend(expected_pages());
    assert_eq!(files, expected, "the package's files (dpkg-deb -c):\n{listing}");
    let fields = text(&ok("dpkg-deb -f", Command::new("dpkg-deb").arg("-f").arg(&deb).args(["Depends", "Package"])));
    assert!(fields.contains("Package: flowgate"), "{fields}");
    let depends = fields.lines().find(|l| l.starts_with("Depends:")).unwrap_or_default();
    for dep in ["libc6", "iptables", "ipset"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }

    // Installed into an empty root with a dpkg database of its own. The maintainer scripts run
    // outside the root (there is no shell inside it) with DPKG_ROOT set, which they honour by
    // leaving the host's systemd alone; the dependencies are not in that root, hence
    // --force-depends.
    let root = tmp.0.join("root");
    let admin = root.join("var/lib/dpkg");
    for d in ["info", "updates"] {
        std::fs::create_dir_all(admin.join(d)).expect("dpkg database dirs");
    }
    std::fs::write(admin.join("status"), "").expect("empty dpkg status");
    std::fs::create_dir_all(root.join("var/log")).expect("var/log");
    let dpkg = |args: &[&str]| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.display())).args(["--force-script-chrootless", "--force-depends"]).args(args);
        c
    };
    ok("dpkg --install", dpkg(&["--install"]).arg(&deb));

    let query = |format: &str| {
        text(&ok(
            "dpkg-query",
            Command::new("dpkg-query")
                .arg(format!("--admindir={}", admin.display()))
                .args(["-W", "-f", format, "flowgate"]),
        ))
    };
    assert!(query("${Status}").contains("install ok installed"), "{}", query("${Status}"));
    let conffiles = query("${Conffiles}");
    assert!(conffiles.trim_start().starts_with("/etc/flowgate/config.toml "), "conffiles: {conffiles:?}");
    let listed = text(&ok(
        "dpkg-query -L",
        Command::new("dpkg-query").arg(format!("--admindir={}", admin.display())).args(["-L", "flowgate"]),
    ));
    for f in &expected {
        let on_disk = root.join(f);
        assert!(on_disk.is_file(), "{f} is not in the installed root");
        assert!(listed.lines().any(|l| l == format!("/{f}")), "dpkg does not list /{f}:\n{listed}");
    }
    let mode = |f: &str| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(root.join(f)).expect("stat").permissions())
    };
    assert_eq!(mode("usr/bin/flowgate") & 0o777, 0o755);
    assert_eq!(mode("etc/flowgate/config.toml") & 0o777, 0o644);

    // The binary runs from there and says what it is.
    let bin = root.join("usr/bin/flowgate");
    let version = text(&ok("flowgate --version", Command::new(&bin).arg("--version")));
    let commit = Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| text(&o).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let target = ok("rustc -vV", Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into())).arg("-vV"));
    let target = text(&target).lines().find_map(|l| l.strip_prefix("host: ").map(str::to_string)).expect("host triple");
    assert_eq!(
        version.trim(),
        format!("flowgate {} (commit {commit}, {target})", env!("CARGO_PKG_VERSION")),
        "flowgate --version"
    );

    // The config: valid, and the safe default the README promises.
    let config = root.join("etc/flowgate/config.toml");
    ok("flowgate rules check --strict", Command::new(&bin).args(["rules", "check", "--strict"]).arg(&config));
    let c = flowgate::config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.rules.default_action.name(), "allow");
    assert!(c.fail == flowgate::config::FailMode::Open, "the shipped config fails closed");
    assert!(c.rules.rules.is_empty(), "the shipped config has rules");
    assert_eq!(c.live.log, flowgate::config::LogTarget::File("/var/log/flowgate/events.jsonl".into()));
    assert_eq!(c.live.run_dir, Path::new("/run/flowgate"));

    // Man pages: valid roff, without a single groff warning.
    for page in expected_pages() {
        let path = root.join(&page);
        let roff = ok("gzip -dc", Command::new("gzip").arg("-dc").arg(&path)).stdout;
        let name = page.trim_start_matches("usr/share/man/man1/").trim_end_matches(".1.gz");
        assert!(String::from_utf8_lossy(&roff).contains(&format!(".TH {name} 1 ")), "{page} has no .TH {name} 1");
        let mut groff = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run groff");
        std::io::Write::write_all(&mut groff.stdin.take().expect("stdin"), &roff).expect("feed groff");
        let out = groff.wait_with_output().expect("groff");
        assert!(out.status.success() && out.stderr.is_empty(), "{page}: {}", String::from_utf8_lossy(&out.stderr));
    }

    // Completions: bash parses and registers its function; zsh and fish files are theirs.
    let bash = root.join("usr/share/bash-completion/completions/flowgate");
    ok("bash -n", Command::new("bash").arg("-n").arg(&bash));
    let registered = text(&ok(
        "bash: source the completion",
        Command::new("bash").args(["-c", "source \"$1\" && complete -p flowgate", "bash"]).arg(&bash),
    ));
    assert!(registered.contains("-F _flowgate flowgate"), "{registered}");
    let zsh = std::fs::read_to_string(root.join("usr/share/zsh/vendor-completions/_flowgate")).expect("zsh");
    assert!(zsh.starts_with("#compdef flowgate"), "zsh completion: {}", &zsh[..zsh.len().min(80)]);
    let fish = std::fs::read_to_string(root.join("usr/share/fish/vendor_completions.d/flowgate.fish")).expect("fish");
    assert!(fish.contains("complete -c flowgate"), "fish completion");
    for sub in ["run", "flows", "block", "reload", "cleanup", "replay"] {
        assert!(std::fs::read_to_string(&bash).expect("bash").contains(sub), "bash completion lacks {sub}");
    }

    // The unit passes systemd's own checks, its commands resolved inside the installed root.
    verify_unit(&root, &tmp.0.join("verify"));

    // A purge takes everything away again, the conffile included.
    ok("dpkg --purge", &mut dpkg(&["--purge", "flowgate"]));
    for f in &expected {
        assert!(!root.join(f).exists(), "{f} is still there after a purge");
    }
}

/// The packaged service under a real systemd: `packaging/systemd-check.sh` boots this machine's
/// own system in a systemd-nspawn container (read-only root under a throwaway overlay, private
/// network), installs the .deb and checks start (READY, capabilities, the sandbox), traffic,
/// reload, stop, a SIGKILL and the restart, the legacy iptables backend, control_group and
/// purge. About 20 s.
#[test]
fn the_packaged_service_starts_reloads_stops_and_restarts_under_systemd() {
    require!("dpkg-deb", "dpkg-shlibdeps", "strip", "systemd-nspawn", "nsenter", "mount");
    let tmp = TempDir::new("systemd");
    let deb = build_deb(&tmp.0.join("deb"));
    let out = Command::new(repo().join("packaging/systemd-check.sh")).arg(&deb).output().expect("run systemd-check.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == "ALL PASSED"),
        "packaging/systemd-check.sh: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `systemd-analyze verify` on the installed unit, in a copy whose flowgate commands point into
/// the installed root (checked to be executable there). Not `--root`: it looks for every unit
/// the service is ordered against (sysinit.target, network-pre.target, ...) and for /bin/kill
/// inside the root too, and those belong to the systemd and procps packages, which a root with
/// only flowgate in it lacks. systemd-analyze says what is wrong on stderr (with the unit's
/// name) and still exits 0 for unknown keys or values, so stderr is read.
fn verify_unit(root: &Path, dir: &Path) {
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/flowgate.service")).expect("read the unit");
    let installed = root.join("usr/bin/flowgate");
    let copy = unit.replace("/usr/bin/flowgate", &installed.display().to_string());
    assert!(
        copy.contains(&format!("ExecStart={} run ", installed.display())),
        "ExecStart is not /usr/bin/flowgate run"
    );
    std::fs::create_dir_all(dir).expect("verify dir");
    let path = dir.join("flowgate.service");
    std::fs::write(&path, copy).expect("write the unit's copy");
    let out =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("flowgate"), "systemd-analyze verify:\n{stderr}");
}
