//! `flowgate check`: the real binary on this machine (every required feature present, the host
//! left exactly as it was), with a missing tool (exit 1, its cost named), and with usage errors
//! (exit 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            // Skipped is not passed: under CI a test that cannot run fails.
            assert!(std::env::var_os("CI").is_none(), "this test needs root (network namespaces, netfilter)");
            eprintln!("skipped: this test needs root (network namespaces, netfilter)");
            return;
        }
    };
}

/// A directory of the test's own, removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("flowgate-check-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        TempDir(d)
    }

    /// A config whose run_dir is `run/sub` inside this directory (not created).
    fn config(&self) -> PathBuf {
        let conf = self.0.join("flowgate.toml");
        std::fs::write(&conf, format!("run_dir = \"{}\"\n", self.run_dir().display())).expect("write config");
        conf
    }

    fn run_dir(&self) -> PathBuf {
        self.0.join("run/sub")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn flowgate(args: &[&str], env: Option<(&str, &Path)>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowgate"));
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    c.output().expect("run flowgate")
}

fn json_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "--json prints one line:\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn feature<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["features"]
        .as_array()
        .and_then(|l| l.iter().find(|f| f["name"] == name))
        .unwrap_or_else(|| panic!("no feature {name} in {report}"))
}

/// What the host's netfilter tables and accounting sysctl look like: `iptables-save` and
/// `ip6tables-save` of the filter and mangle tables (without comment lines, which carry the time,
/// and chain counters, which traffic changes), and `nf_conntrack_acct`.
fn host_state() -> Vec<String> {
    let mut state = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        for table in ["filter", "mangle"] {
            let o = Command::new(tool)
                .args(["-t", table])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {tool} (the iptables package): {e}"));
            let text: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                    (true, Some(i)) => l[..i].to_string(),
                    _ => l.to_string(),
                })
                .collect();
            state.push(format!(
                "{tool} -t {table}: {}\n{}\n{}",
                o.status,
                text.join("\n"),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    let acct = "/proc/sys/net/netfilter/nf_conntrack_acct";
    state.push(format!("{acct}: {:?}", std::fs::read_to_string(acct).map_err(|e| e.to_string())));
    state
}

/// The processes (pid, command) whose threads or open descriptors are in the network namespace
/// `ns` (`net:[inode]`).
fn holders_of(ns: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = p.path();
        let links = |sub: &str| -> Vec<PathBuf> {
            std::fs::read_dir(dir.join(sub)).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
        };
        let mut candidates: Vec<PathBuf> = links("task").into_iter().map(|t| t.join("ns/net")).collect();
        candidates.extend(links("fd"));
        if candidates.iter().any(|c| std::fs::read_link(c).is_ok_and(|l| l.as_os_str() == ns)) {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim().to_string();
            found.push((pid, comm));
        }
    }
    found
}

#[test]
fn check_finds_every_required_feature_here_and_leaves_the_host_as_it_was() {
    require_root!();
    let t = TempDir::new("live");
    let config = t.config();
    let before = host_state();
    let own_ns = std::fs::read_link("/proc/self/ns/net").expect("own network namespace");

    let out = flowgate(&["check", "--json", "--config", &config.display().to_string()], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report = json_of(&out);
    let not_ok: Vec<String> = report["features"]
        .as_array()
        .expect("features")
        .iter()
        .filter(|f| f["need"] == "required" && f["status"] != "ok")
        .map(|f| format!("{}: {} ({})", f["name"], f["status"], f["detail"]))
        .collect();
    assert!(not_ok.is_empty(), "required features not found on this machine:\n{}\n{stderr}", not_ok.join("\n"));
    assert_eq!(out.status.code(), Some(0), "{report}\n{stderr}");
    assert_eq!(report["can_filter"], true);
    assert_eq!(report["verdict"], "flowgate run can filter on this host");
    // Every required feature was probed for real, here: the kernel facts the daemon relies on.
    for (name, says) in [
        ("nfqueue", "arrived and passed on accept"),
        ("conntrack", "announced, dumped"),
        ("sock_destroy", "ECONNABORTED"),
        ("chains", "install and remove"),
    ] {
        let detail = feature(&report, name)["detail"].as_str().unwrap_or_default().to_string();
        assert!(detail.contains(says), "{name}: {detail}");
    }
    assert!(["nft", "legacy"].contains(&feature(&report, "iptables")["value"].as_str().unwrap_or("")), "{report}");
    assert_eq!(report["run_dir"], t.run_dir().display().to_string());
    assert!(feature(&report, "run_dir")["detail"].as_str().unwrap_or("").contains("can be created"), "{report}");

    // The host is as it was: its rules and sysctl, no run_dir (nor its parent, created with it),
    // and the probes' namespace, which was not this one, is held by nothing.
    assert_eq!(host_state(), before, "flowgate check changed the host");
    assert!(!t.0.join("run").exists(), "flowgate check left {}", t.0.join("run").display());
    let ns = report["namespace"].as_str().expect("the probes' namespace");
    assert!(ns.starts_with("net:["), "{ns}");
    assert_ne!(Path::new(ns), own_ns, "the probes ran in the test's own network namespace");
    // Namespace numbers are reused: another program may have a new one by that number by now,
    // but none of flowgate's own or of the tools it ran.
    let ours = ["flowgate", "iptables", "ip6tables", "xtables", "nft"];
    let held: Vec<_> =
        holders_of(ns).into_iter().filter(|(_, comm)| ours.iter().any(|o| comm.starts_with(o))).collect();
    assert!(held.is_empty(), "the probes' namespace {ns} is still held by {held:?}");
}

#[test]
fn a_missing_iptables_fails_the_check_and_names_what_it_costs() {
    let t = TempDir::new("missing");
    let config = t.config();
    let no_tools = t.0.join("no-tools");
    std::fs::create_dir_all(&no_tools).expect("tools dir");
    let config = config.display().to_string();

    let out = flowgate(&["check", "--json", "--config", &config], Some(("FLOWGATE_CHECK_PATH", &no_tools)));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let report = json_of(&out);
    assert_eq!(report["can_filter"], false);
    let iptables = feature(&report, "iptables");
    assert_eq!(iptables["status"], "missing");
    assert_eq!(iptables["need"], "required");
    let detail = iptables["detail"].as_str().unwrap_or_default();
    assert!(detail.starts_with("iptables and iptables-restore not found (searched "), "{detail}");
    assert!(detail.contains(&no_tools.display().to_string()), "{detail}");
    let cost = iptables["cost"].as_str().unwrap_or_default();
    assert!(
        cost.starts_with("flowgate run cannot filter: it installs its IPv4 chains with iptables-restore"),
        "{cost}"
    );
    assert!(report["verdict"].as_str().unwrap_or_default().contains("missing iptables, ip6tables"), "{report}");
    if is_root() {
        // What depends on the tools is not probed, and said so; the rest is still found.
        for name in ["mangle", "connmark", "chains", "nfqueue", "conntrack"] {
            assert_eq!(feature(&report, name)["status"], "unknown", "{name}: {report}");
        }
        assert_eq!(feature(&report, "sock_destroy")["status"], "ok", "{report}");
        assert_eq!(
            report["verdict"],
            "flowgate run cannot filter on this host: missing iptables, ip6tables; not probed mangle, connmark, nfqueue, chains, conntrack"
        );
    }

    // The text says the same, with the cost under the missing feature.
    let out = flowgate(&["check", "--config", &config], Some(("FLOWGATE_CHECK_PATH", &no_tools)));
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("\nmissing           iptables        iptables and iptables-restore not found").expect(&text);
    let next = text[at + 1..].lines().nth(1).unwrap_or_default();
    assert_eq!(next.trim_start(), format!("without it: {cost}"), "{text}");
    assert!(text.trim_end().lines().last().unwrap_or_default().starts_with("flowgate run cannot filter on this host:"));
}

#[test]
fn usage_errors_exit_2() {
    let out = flowgate(&["check", "--no-such-option"], None);
    assert_eq!(out.status.code(), Some(2));
    let t = TempDir::new("usage");
    let missing = t.0.join("absent.toml");
    let out = flowgate(&["check", "--config", &missing.display().to_string()], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is probed on a usage error");
    let bad = t.0.join("bad.toml");
    std::fs::write(&bad, "run_dir = \"relative\"\n").expect("write");
    let out = flowgate(&["check", "--config", &bad.display().to_string()], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run_dir"));
}
