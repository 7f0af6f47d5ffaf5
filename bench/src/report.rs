//! Numbers and output shared by the live benchmarks (`src/bin/live.rs`, `src/bin/verdicts.rs`,
//! `src/bin/flows.rs`): nearest-rank percentiles, rounding for the JSON result, the load average,
//! and the end of a run, where the table is printed and the JSON result is the last line of
//! stdout (and the content of the `--json` file).
//!
//! It reads `/proc/loadavg` and writes stdout and the `--json` file it is given; nothing else.

use std::fs;
use std::path::Path;

use serde_json::Value;

/// Nearest-rank percentile `p` (0 to 100) of sorted values: the smallest value with at least
/// `p`% of the values at or below it (`p` = 0 gives the smallest). NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
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
