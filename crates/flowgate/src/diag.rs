//! Daemon diagnostics: leveled messages about the daemon itself (ready, reloaded, faults,
//! losses, failures), never flow events, on stderr.
//!
//! The `log` facade's macros are used throughout the binary; this module is the one logger
//! behind them. On a terminal or a file each message is a line `flowgate: <message>`. When stderr
//! is the systemd journal (`$JOURNAL_STREAM` names the same device and inode as stderr), each line
//! starts with the sd-daemon priority prefix instead (`<3>` error, `<4>` warn, `<6>` info, `<7>`
//! debug and trace), so journald records the level, and `journalctl -p warning` filters by it;
//! the journal adds the program's name itself. `--log-level` sets the most verbose level shown
//! (default `info`). Writing a line never fails the caller: a stderr that cannot be written (a
//! closed pipe) loses the line.
//!
//! Written here rather than with `env_logger` or `tracing-subscriber`: what is needed is the
//! level filter and the journald prefix, a few lines, and neither crate writes the prefix.

use std::io::Write;
use std::str::FromStr;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Parses a `--log-level` value: off, error, warn, info, debug or trace.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    LevelFilter::from_str(text.trim())
        .map_err(|_| format!("`{text}` is not a log level: expected off, error, warn, info, debug or trace"))
}

/// The sd-daemon(3) priority of a level (syslog's numbers).
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One message as it goes to stderr.
fn line(journald: bool, level: Level, message: &std::fmt::Arguments<'_>) -> String {
    if journald { format!("<{}>{message}\n", priority(level)) } else { format!("flowgate: {message}\n") }
}

struct StderrLog {
    journald: bool,
}

impl Log for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() && metadata.target().starts_with("flowgate")
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            // One write per line, so lines of different threads never interleave.
            let _ = std::io::stderr().lock().write_all(line(self.journald, record.level(), record.args()).as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Whether stderr is the journal: `$JOURNAL_STREAM` is `device:inode` of the stream systemd
/// connected, and stderr must be that very stream (a child whose stderr was redirected keeps
/// the variable but not the stream).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    meta.dev() == dev && meta.ino() == ino
}

/// Installs the logger with `level` as the most verbose level shown. A second call only
/// changes the level.
pub fn init(level: LevelFilter) {
    let _ = log::set_boxed_logger(Box::new(StderrLog { journald: stderr_is_journal() }));
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(parse_level("warn"), Ok(LevelFilter::Warn));
        assert_eq!(parse_level("DEBUG"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("off"), Ok(LevelFilter::Off));
        let e = parse_level("loud").expect_err("not a level");
        assert!(e.contains("`loud`") && e.contains("expected off, error, warn, info, debug or trace"), "{e}");
    }

    #[test]
    fn lines_carry_the_name_or_the_journal_priority() {
        let m = format_args!("ready: {} queues", 2);
        assert_eq!(line(false, Level::Info, &m), "flowgate: ready: 2 queues\n");
        assert_eq!(line(true, Level::Info, &format_args!("ready")), "<6>ready\n");
        assert_eq!(line(true, Level::Error, &format_args!("x")), "<3>x\n");
        assert_eq!(line(true, Level::Warn, &format_args!("x")), "<4>x\n");
        assert_eq!(line(true, Level::Debug, &format_args!("x")), "<7>x\n");
    }

    #[test]
    fn journal_detection_needs_the_same_stream() {
        // No variable, or one naming another stream: not the journal.
        // SAFETY: tests in this module do not read the variable concurrently with this change
        // elsewhere; the binary's other tests do not use JOURNAL_STREAM.
        unsafe { std::env::set_var("JOURNAL_STREAM", "1:1") };
        assert!(!stderr_is_journal());
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata("/proc/self/fd/2") {
            unsafe { std::env::set_var("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino())) };
            assert!(stderr_is_journal());
        }
        unsafe { std::env::remove_var("JOURNAL_STREAM") };
        assert!(!stderr_is_journal());
    }
}
