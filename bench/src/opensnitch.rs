//! OpenSnitch's daemon (`opensnitchd`, Debian's package `opensnitch`, 1.5.8) in a lab namespace,
//! for the side-by-side benchmark (`src/bin/compare.rs`): its config in a temp directory, its
//! start (ready once it logs that it runs on its queue and its NFQUEUE rule is in place), its
//! memory, its stop, and the checks that none of it is left on this machine.
//!
//! How it is run, and why:
//!
//! * opensnitchd 1.5.8 reads its config from the fixed paths `/etc/opensnitchd/default-config.json`
//!   and `/etc/opensnitchd/system-fw.json` (no option names them). So it is started as
//!   `ip netns exec <ns> unshare --mount --propagation private -- sh -c 'mount --bind <tmp>/...
//!   /etc/opensnitchd/...; exec opensnitchd -rules-path <tmp>/rules -log-file <tmp>/...'`: the
//!   bind mounts exist only in that process's private mount namespace, and the files under /etc
//!   are never written. Every `exec` replaces the process in place, so the child's pid is the
//!   daemon's.
//! * Its config ([`config_json`]): `DefaultAction` `allow` (with no UI connected and no rule, every
//!   new connection gets it), `DefaultDuration` `once`, `InterceptUnknown` false,
//!   `ProcMonitorMethod` `proc` (the owning process found through `/proc`), `Firewall`
//!   `iptables` (it then queues `-t mangle OUTPUT -m conntrack --ctstate NEW,RELATED` with
//!   `--queue-bypass`, and UDP from port 53 in `INPUT` for its DNS cache; the native nftables
//!   `queue` expression is missing from this workplace's kernel), `Server.Address` a Unix socket
//!   in the temp directory where no UI listens, `LogLevel` 1 (info; `-log-file` sets that level
//!   anyway). The system firewall file is the package's, copied. The rules directory is empty.
//! * It runs in the namespace of the client, like a desktop firewall on the client's host.
//! * It gets SIGKILL if this process dies (`PR_SET_PDEATHSIG`), and on stop SIGTERM, then
//!   SIGKILL after [`STOP_TIMEOUT`]: 1.5.8 was seen not to exit on SIGTERM (it logged its cleanup
//!   and hung). Its rules live in the lab namespace, which is deleted with everything in it.
//!
//! It touches: the temp directory it is given, the process it spawns (and only that one), and
//! reads the namespace's iptables rules and `/proc`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon::{child_setup, describe_exit};
use crate::guard::TempDir;
use crate::lab::{self, Netns};

type Result<T> = std::result::Result<T, String>;

/// Where Debian's package puts the daemon.
pub const BINARY: &str = "/usr/bin/opensnitchd";
/// The config files opensnitchd 1.5.8 reads, at fixed paths.
pub const CONFIG_PATH: &str = "/etc/opensnitchd/default-config.json";
pub const SYSTEM_FW_PATH: &str = "/etc/opensnitchd/system-fw.json";
/// What it logs once its queue and its rules are in place.
const READY_LOG: &str = "Running on netfilter queue";
/// How long it may take to get ready, and to exit after SIGTERM before it gets SIGKILL.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
pub const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// The config written for it (see the module doc), with its socket and log in `dir`.
pub fn config_json(dir: &Path) -> Value {
    json!({
        "Server": {
            "Address": format!("unix://{}", dir.join("no-ui.sock").display()),
            "LogFile": dir.join("opensnitchd.log").display().to_string(),
        },
        "DefaultAction": "allow",
        "DefaultDuration": "once",
        "InterceptUnknown": false,
        "ProcMonitorMethod": "proc",
        "LogLevel": 1,
        "Firewall": "iptables",
        "Stats": {"MaxEvents": 150, "MaxStats": 25},
    })
}

/// `opensnitchd -version`, or why it cannot be run.
pub fn version(binary: &Path) -> Result<String> {
    let o = Command::new(binary).arg("-version").output().map_err(|e| format!("{}: {e}", binary.display()))?;
    let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if !o.status.success() || v.is_empty() {
        return Err(format!(
            "{} -version: {} {}",
            binary.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(v)
}

/// Pids of every process on this machine whose executable is `binary` (all namespaces).
pub fn processes(binary: &Path) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == binary))
        .collect()
}

/// The NFQUEUE rules in `ns` (IPv4 and IPv6, every table), as `iptables-save` prints them.
pub fn nfqueue_rules(ns: &Netns) -> Result<Vec<String>> {
    let mut rules = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let o = ns.run(&[tool]);
        if !o.status.success() {
            return Err(format!("{tool} in {}: {}", ns.name, String::from_utf8_lossy(&o.stderr).trim()));
        }
        rules.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("-j NFQUEUE"))
                .map(|l| format!("{tool}: {l}")),
        );
    }
    Ok(rules)
}

/// How a stop went.
#[derive(Clone, Debug)]
pub struct Stopped {
    /// Whether it exited on SIGTERM within [`STOP_TIMEOUT`] (else it got SIGKILL).
    pub exited_on_term: bool,
    pub took: Duration,
    /// Its NFQUEUE rules still in the namespace after it was gone (a SIGKILL leaves them; the
    /// namespace is deleted right after).
    pub rules_left: usize,
}

/// A running opensnitchd in a lab namespace; SIGKILLed and reaped on drop if not stopped.
pub struct OpenSnitch<'a> {
    ns: &'a Netns,
    child: lab::Child,
    log: PathBuf,
    binary: PathBuf,
}

impl<'a> OpenSnitch<'a> {
    /// Writes its config into `dir` and starts it in `ns`; returns once it is ready (its ready log
    /// line and its mangle-table NFQUEUE rule in place), with the time that took.
    pub fn start(ns: &'a Netns, binary: &Path, dir: &TempDir) -> Result<(OpenSnitch<'a>, Duration)> {
        let d = &dir.0;
        let config = d.join("default-config.json");
        let fw = d.join("system-fw.json");
        let rules = d.join("rules");
        let log = d.join("opensnitchd.log");
        let text = serde_json::to_string_pretty(&config_json(d)).map_err(|e| e.to_string())?;
        fs::write(&config, text).map_err(|e| format!("{}: {e}", config.display()))?;
        fs::copy(SYSTEM_FW_PATH, &fw).map_err(|e| format!("copying {SYSTEM_FW_PATH}: {e}"))?;
        fs::create_dir_all(&rules).map_err(|e| format!("{}: {e}", rules.display()))?;
        if !Path::new(CONFIG_PATH).is_file() {
            return Err(format!("{CONFIG_PATH} is missing (is the opensnitch package installed?)"));
        }
        let q = |p: &Path| format!("'{}'", p.display());
        let script = format!(
            "mount --bind {} {CONFIG_PATH} && mount --bind {} {SYSTEM_FW_PATH} && exec {} -rules-path {} -log-file {}",
            q(&config),
            q(&fw),
            q(binary),
            q(&rules),
            q(&log)
        );
        let t0 = Instant::now();
        let mut child =
            ns.spawn_with(&["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", &script], |cmd| {
                child_setup(cmd, libc::SIGKILL);
            });
        child.set_term_timeout(STOP_TIMEOUT);
        let mut me = OpenSnitch { ns, child, log, binary: binary.to_path_buf() };
        loop {
            if !me.child.is_running() {
                let st = me.child.wait_timeout(Duration::ZERO);
                return Err(format!(
                    "opensnitchd exited before it was ready ({}); its output:\n{}\nits log:\n{}",
                    describe_exit(st),
                    me.child.log(),
                    me.log_text()
                ));
            }
            if me.log_text().contains(READY_LOG) {
                break;
            }
            if t0.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "opensnitchd did not log `{READY_LOG}` within {READY_TIMEOUT:?}:\n{}",
                    me.log_text()
                ));
            }
            // Nothing announces readiness but the log; bounded polling.
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = t0.elapsed();
        let exe = fs::read_link(format!("/proc/{}/exe", me.pid())).map_err(|e| format!("opensnitchd's exe: {e}"))?;
        if exe != binary {
            return Err(format!("pid {} runs {}, not {}", me.pid(), exe.display(), binary.display()));
        }
        let queue_rules = nfqueue_rules(ns)?;
        if !queue_rules.iter().any(|r| r.starts_with("iptables-save:") && r.contains("-A OUTPUT") && r.contains("NEW"))
        {
            return Err(format!("opensnitchd is ready but its mangle OUTPUT NFQUEUE rule is missing: {queue_rules:?}"));
        }
        Ok((me, took))
    }

    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, SIGKILL after [`STOP_TIMEOUT`]; then counts its rules left in the namespace.
    pub fn stop(mut self) -> Result<Stopped> {
        let t0 = Instant::now();
        self.child.signal(lab::Signal::SIGTERM);
        let exited_on_term = self.child.wait_timeout(STOP_TIMEOUT).is_some();
        if !exited_on_term {
            self.child.kill_now();
        }
        let took = t0.elapsed();
        if processes(&self.binary).contains(&self.pid()) {
            return Err(format!("opensnitchd (pid {}) is still running after SIGKILL", self.pid()));
        }
        let rules_left = nfqueue_rules(self.ns)?.len();
        Ok(Stopped { exited_on_term, took, rules_left })
    }
}

impl Drop for OpenSnitch<'_> {
    fn drop(&mut self) {
        // Not stopped through `stop` (an error path): no need to wait for a clean exit.
        self.child.kill_now();
    }
}
