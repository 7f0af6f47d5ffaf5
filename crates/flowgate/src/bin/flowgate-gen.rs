//! `flowgate-gen DIR`: writes flowgate's man pages and shell completions, generated from the
//! clap definition of the command line (`flowgate::cli::Cli`), so they say exactly what the
//! binary accepts:
//!
//! - `DIR/man/flowgate.1` and one page per subcommand (`flowgate-run.1`, ...,
//!   `flowgate-rules-check.1`), with clap_mangen;
//! - `DIR/completions/flowgate.bash`, `_flowgate` (zsh) and `flowgate.fish`, with clap_complete.
//!
//! `packaging/build-deb.sh` runs it and puts the files in the package; it is not installed
//! itself, and keeps clap_mangen and clap_complete out of the `flowgate` binary. It writes only
//! under DIR, and the same binary always writes the same bytes (no dates), so packages built
//! from one commit are identical.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// Added to flowgate(1): where the packaged daemon keeps its files.
const FILES: &str = r#".SH FILES
.TP
\fI/etc/flowgate/config.toml\fR
The config file of the packaged service (allow everything, fail open); \fBflowgate rules check\fR validates it.
.TP
\fI/run/flowgate/control.sock\fR
The running daemon's control socket (\fBflowgate flows\fR, \fBblock\fR, \fBallow\fR, \fBstats\fR, \fBreload\fR).
.TP
\fI/var/log/flowgate/events.jsonl\fR
Flow events, one JSON object per line.
.TP
\fI/lib/systemd/system/flowgate.service\fR
The systemd unit: \fBsystemctl reload flowgate\fR re-judges every live flow, \fBsystemctl stop flowgate\fR removes the chains.
"#;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: flowgate-gen DIR (writes DIR/man/*.1 and DIR/completions/*)");
        return ExitCode::FAILURE;
    };
    match generate(Path::new(&dir)) {
        Ok(written) => {
            for p in written {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flowgate-gen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every page and completion file under `dir`; returns their paths.
fn generate(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: cannot create: {e}", d.display()))?;
    }
    // `help` is a clap built-in, not a command worth a page.
    let mut cmd = flowgate::cli::Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    pages(&cmd, None, &man, &mut written)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "flowgate", &completions)
            .map_err(|e| format!("{}: cannot write {shell} completions: {e}", completions.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The page of `cmd` and, recursively, of each of its subcommands. `parent` is the page that
/// lists it (named in SEE ALSO).
fn pages(cmd: &clap::Command, parent: Option<&str>, dir: &Path, written: &mut Vec<PathBuf>) -> Result<(), String> {
    // Every page's footer names the version (clap gives only the top command one); short, as a
    // long one runs into the page name. flowgate(1) has the commit in its VERSION section.
    let page = clap_mangen::Man::new(cmd.clone()).source(concat!("flowgate ", env!("CARGO_PKG_VERSION")));
    let path = dir.join(page.get_filename());
    let mut roff = Vec::new();
    page.render(&mut roff).map_err(|e| format!("{}: cannot render: {e}", path.display()))?;
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_string();
    let mut see_also: Vec<String> = parent.into_iter().map(str::to_string).collect();
    see_also.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).map(|s| {
        let sub = s.get_display_name().unwrap_or_else(|| s.get_name());
        sub.to_string()
    }));
    if parent.is_none() {
        roff.extend_from_slice(FILES.as_bytes());
        see_also.push("systemctl".into());
    }
    if !see_also.is_empty() {
        let refs: Vec<String> = see_also.iter().map(|s| format!("\\fB{}\\fR(1)", s.replace('-', "\\-"))).collect();
        write!(roff, ".SH \"SEE ALSO\"\n{}\n", refs.join(", ")).map_err(|e| e.to_string())?;
    }
    std::fs::write(&path, &roff).map_err(|e| format!("{}: cannot write: {e}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub, Some(&name), dir, written)?;
    }
    Ok(())
}
