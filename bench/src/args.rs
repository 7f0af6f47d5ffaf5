//! The command line of the live benchmarks (`src/bin/live.rs`, `src/bin/verdicts.rs`,
//! `src/bin/flows.rs`): `--option value` pairs, the options all of them take (`--flowgate PATH`,
//! `--json FILE`, `-h`/`--help`), the flowgate binary to run, and number checks.
//!
//! It reads this process's arguments and, for the flowgate binary, the file system (to find and
//! canonicalize the path); on `--help` it prints the usage and exits. Nothing else.

use std::fs;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, String>;

/// The arguments after the program name, read one option at a time. Errors end with the usage.
pub struct Args {
    args: std::iter::Skip<std::env::Args>,
    usage: &'static str,
    flowgate: Option<PathBuf>,
    json: Option<PathBuf>,
}

impl Args {
    pub fn new(usage: &'static str) -> Args {
        Args { args: std::env::args().skip(1), usage, flowgate: None, json: None }
    }

    /// The next option for the benchmark to handle, or None after the last argument. Takes
    /// `--flowgate PATH` and `--json FILE` itself (see [`Args::finish`]), and `-h`/`--help`,
    /// which prints the usage and exits 0.
    pub fn next_option(&mut self) -> Result<Option<String>> {
        while let Some(a) = self.args.next() {
            match a.as_str() {
                "--flowgate" => self.flowgate = Some(PathBuf::from(self.value("--flowgate")?)),
                "--json" => self.json = Some(PathBuf::from(self.value("--json")?)),
                "-h" | "--help" => {
                    println!("{}", self.usage);
                    std::process::exit(0);
                }
                _ => return Ok(Some(a)),
            }
        }
        Ok(None)
    }

    /// The value of option `name`: the next argument.
    pub fn value(&mut self, name: &str) -> Result<String> {
        self.args.next().ok_or_else(|| format!("{name} needs a value\n\n{}", self.usage))
    }

    /// The error for an argument that is no option of the benchmark.
    pub fn unknown(&self, arg: &str) -> String {
        format!("unknown argument `{arg}`\n\n{}", self.usage)
    }

    /// After the last option: the flowgate binary, canonicalized (`--flowgate`, else `flowgate`
    /// next to this binary, else `<workspace>/target/release/flowgate`), and the `--json` file.
    pub fn finish(self) -> Result<(PathBuf, Option<PathBuf>)> {
        let flowgate = match self.flowgate {
            Some(p) => p,
            None => {
                let sibling = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("flowgate")));
                match sibling {
                    Some(p) if p.is_file() => p,
                    _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/flowgate"),
                }
            }
        };
        let flowgate = fs::canonicalize(&flowgate).map_err(|e| {
            format!(
                "flowgate binary {}: {e} (build it with `cargo build --release -p flowgate`, or pass --flowgate)",
                flowgate.display()
            )
        })?;
        Ok((flowgate, self.json))
    }
}

/// The value of option `name` as a whole number from `lo` to `hi` (`_` may separate digits).
pub fn whole_number(s: &str, name: &str, lo: usize, hi: usize) -> Result<usize> {
    match s.replace('_', "").parse::<usize>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("{name}: `{s}` is not a whole number from {lo} to {hi}")),
    }
}

/// The value of option `name` as a number from `lo` to `hi`.
pub fn number(s: &str, name: &str, lo: f64, hi: f64) -> Result<f64> {
    match s.parse::<f64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!("{name}: `{s}` is not a number from {lo} to {hi}")),
    }
}
