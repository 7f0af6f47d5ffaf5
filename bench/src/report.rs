//! Numbers and output shared by the live benchmarks (`src/bin/live.rs`, `src/bin/verdicts.rs`,
//! `src/bin/flows.rs`, `src/bin/packets.rs`, `src/bin/compare.rs`): nearest-rank percentiles, the
//! median with the minimum and maximum of interleaved rounds ([`Spread`]) and same-round ratios,
//! rounding for the JSON result, the load average, and the end of a run, where the table is
//! printed and the JSON result is the last line of stdout (and the content of the `--json` file).
//!
//! Also what every result says about where it was measured: the machine ([`machine`]) and the
//! source it was built from ([`source_state`]).
//!
//! It reads `/proc` and the workspace's git state and writes stdout and the `--json` file it is
//! given; nothing else.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// Nearest-rank percentile `p` (0 to 100) of sorted values: the smallest value with at least
/// `p`% of the values at or below it (`p` = 0 gives the smallest). NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The median, smallest and largest of some values (one per round); non-finite values are left
/// out. NaN when none is left.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Spread { median: f64::NAN, min: f64::NAN, max: f64::NAN };
        }
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Spread { median, min: v[0], max: v[n - 1] }
    }

    pub fn json(self, digits: i32) -> Value {
        json!({"median": round(self.median, digits), "min": round(self.min, digits), "max": round(self.max, digits)})
    }

    /// `median [min-max]` with `f` formatting each.
    pub fn show(self, f: impl Fn(f64) -> String) -> String {
        format!("{} [{}-{}]", f(self.median), f(self.min), f(self.max))
    }
}

/// A ratio between two configurations measured in the same rounds: of their medians, and the
/// spread of the per-round ratios (`num[i] / den[i]`, the two measured a few seconds apart).
pub fn paired_ratio(num: &[f64], den: &[f64]) -> (f64, Spread) {
    let of_medians = Spread::of(num).median / Spread::of(den).median;
    let paired: Vec<f64> = num.iter().zip(den).map(|(a, b)| a / b).collect();
    (of_medians, Spread::of(&paired))
}

/// `x` rounded to `digits` decimals, for the JSON result.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

/// The 1, 5 and 15 minute load averages as `/proc/loadavg` gives them (empty if unreadable).
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Writes a run's results as `<name>.md` (`md`) and `<name>.json` (`json`, pretty) in `out`,
/// creating it, and says so on stderr. Errors name the file.
pub fn write_results(out: &Path, name: &str, md: &str, json: &Value) -> Result<(), String> {
    fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let md_path = out.join(format!("{name}.md"));
    let json_path = out.join(format!("{name}.json"));
    fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let pretty = serde_json::to_string_pretty(json).map_err(|e| e.to_string())?;
    fs::write(&json_path, format!("{pretty}\n")).map_err(|e| format!("{}: {e}", json_path.display()))?;
    eprintln!("{name}: wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

/// The end of a run: writes `json` as one line to `json_file` (if given), then prints `text` and
/// that line to stdout. Prints nothing if the file cannot be written; the error names the file.
pub fn print_result(text: &str, json: &Value, json_file: Option<&Path>) -> Result<(), String> {
    let line = json.to_string();
    if let Some(path) = json_file {
        fs::write(path, format!("{line}\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    print!("{text}");
    println!("{line}");
    Ok(())
}

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The machine a run measured: CPUs, kernel, CPU model, memory, conntrack's hash buckets.
pub fn machine() -> Value {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|m| m.trim_start_matches([' ', '\t', ':']).to_string()))
        })
        .unwrap_or_default();
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").and_then(|m| m.split_whitespace().next()?.parse::<u64>().ok())
            })
        })
        .unwrap_or(0);
    json!({
        "nproc": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": kernel,
        "cpu": cpu,
        "memory_gib": round(mem as f64 / 1048576.0, 1),
        "conntrack_buckets": read_u64("/proc/sys/net/netfilter/nf_conntrack_buckets"),
    })
}

/// The workspace's commit, the files under `crates/` that differ from it (the daemon a run
/// measured) and a hash of that difference, when git can tell.
pub fn source_state() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let changed: Vec<String> = git(&["status", "--porcelain", "--", "crates"])
        .map(|s| s.lines().map(|l| l.trim().to_string()).collect())
        .unwrap_or_default();
    // Identifies the uncommitted changes the daemon was built with.
    let diff_sha256 = Command::new("sh")
        .arg("-c")
        .arg("git diff HEAD -- crates | sha256sum")
        .current_dir(&root)
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().map(str::to_string));
    json!({
        "commit": git(&["rev-parse", "--short", "HEAD"]),
        "changed_under_crates": changed,
        "diff_under_crates_sha256": diff_sha256,
    })
}
