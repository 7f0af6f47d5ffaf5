//! `flowgate_linux::procinfo`'s parsers on arbitrary text: a process's `stat`, `status`,
//! `cmdline` and `cgroup` files, and `/etc/passwd`. A process chooses its own name and
//! arguments, which these files carry, so they are outside input.
//!
//! Input: the four process files and a passwd text, separated by 0xff bytes (which no kernel
//! text holds). Checks beyond "never panics":
//! - a parsed process's name is the text between the first `(` and the last `)` of `stat`;
//! - its arguments, joined back with NULs, are the `cmdline` bytes (up to UTF-8 repair and a
//!   final NUL);
//! - the cgroup path is one of the file's paths (or `/`), and its unit, if any, is one of the
//!   path's components ending in `.service` or `.scope`;
//! - every passwd entry's name is a prefix of one of the text's lines.
#![no_main]

use flowgate_linux::procinfo::{cgroup_path, parse_passwd, parse_process, unit_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0xff);
    let mut next = || parts.next().unwrap_or_default();
    let (stat, status, cmdline, cgroup, passwd) = (next(), next(), next(), next(), next());
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (stat, status, cgroup_text, passwd) = (text(stat), text(status), text(cgroup), text(passwd));
    if let Some(p) = parse_process(&stat, &status, cmdline, &cgroup_text) {
        let open = stat.find('(').expect("a parsed stat has a `(`");
        let close = stat.rfind(')').expect("a parsed stat has a `)`");
        assert_eq!(p.comm, stat[open + 1..close]);
        let joined = p.cmdline.join("\0");
        let raw = cmdline.strip_suffix(&[0]).unwrap_or(cmdline);
        assert_eq!(joined, String::from_utf8_lossy(raw));
    }
    if let Some(path) = cgroup_path(&cgroup_text) {
        let known = path == "/" || cgroup_text.lines().any(|l| l.splitn(3, ':').nth(2) == Some(path.as_str()));
        assert!(known, "{path:?} is not a path of {cgroup_text:?}");
        if let Some(unit) = unit_of(&path) {
            assert!(path.split('/').any(|c| c == unit), "{unit:?} is not a component of {path:?}");
            assert!(unit.ends_with(".service") || unit.ends_with(".scope"), "{unit:?}");
        }
    }
    for (name, _) in parse_passwd(&passwd) {
        assert!(passwd.lines().any(|l| l.trim_start().starts_with(name)), "{name:?}");
    }
});
