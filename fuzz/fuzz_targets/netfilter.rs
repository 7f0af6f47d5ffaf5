//! The host's filter and mangle tables as `iptables -S` lists them, read by
//! `flowgate_linux::netfilter` to find and remove what a dead instance left: `netfilter::cleanup`
//! (the first step of every start, and `flowgate cleanup`). The listing parser
//! (`parse_listing_of`, `split_args`: quotes, escapes, `-j`/`-g` targets) is private; `cleanup`
//! reaches it through `Tools`, whose programs are public paths: here, small shell scripts in a
//! temporary directory.
//!
//! Input: a status byte (bit 0: `iptables-restore` fails), then UTF-8 text: the filter table's
//! listing, and, after the first NUL byte, the mangle table's (no NUL: the mangle table is empty,
//! so inputs from before the mangle chains mean what they meant). The `iptables` stand-in prints
//! the listing of the table asked for with `-t` once (as the IPv4 listing; afterwards that table
//! is clean), the `ip6tables` one empty tables, and the `iptables-restore` stand-ins record what
//! they are fed and succeed or fail as the status byte says.
//!
//! Checks: no panic; what flowgate feeds `iptables-restore` is made of `*filter` and `*mangle`
//! sections ending in `COMMIT`, and in each it only ever deletes jumps from the built-in chains
//! OUTPUT, INPUT, FORWARD to flowgate's own chains of that table (filter: FLOWGATE-OUT/IN/FWD,
//! mangle: FLOWGATE-PKT-OUT/IN/FWD) that are listed in that table, and flushes and deletes
//! flowgate's own chains of that table: whatever the host's listings hold (other chains, comments
//! with quotes, rules that mention flowgate's names, one table's chains named in the other), no
//! other rule can be touched. And every flowgate chain a table's listing declares (`-N`) is
//! flushed and deleted in that table.
#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use flowgate_linux::netfilter::{
    self, CHAIN_FWD, CHAIN_IN, CHAIN_OUT, PACKET_FWD, PACKET_IN, PACKET_OUT, SPREAD, SPREAD_BY_SPORT, Tools,
};
use flowgate_linux::static_rules::{STATIC_FWD, STATIC_IN, STATIC_OUT};
use libfuzzer_sys::fuzz_target;

/// The tables flowgate installs chains in, and its chains there.
const TABLES: [(&str, [&str; 3]); 2] =
    [("filter", [CHAIN_OUT, CHAIN_IN, CHAIN_FWD]), ("mangle", [PACKET_OUT, PACKET_IN, PACKET_FWD])];

/// Every chain of flowgate's in a table: the hook chains and those only they jump to.
fn all_ours(t: usize) -> Vec<&'static str> {
    let mut v = TABLES[t].1.to_vec();
    if t == 0 {
        v.extend([STATIC_OUT, STATIC_IN, STATIC_FWD, SPREAD]);
        v.extend(SPREAD_BY_SPORT);
    }
    v
}

struct Fake {
    dir: PathBuf,
    tools: Tools,
}

fn fake() -> &'static Fake {
    static FAKE: OnceLock<Fake> = OnceLock::new();
    FAKE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("flowgate-fuzz-netfilter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let script = |name: &str, body: String| {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("write a fake tool");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            path
        };
        let d = dir.display();
        // `iptables -w -t TABLE -S`: that table's listing, once (the filter table without -t).
        let lister = script(
            "iptables",
            format!(
                "t=filter\nwhile [ $# -gt 0 ]; do [ \"$1\" = -t ] && t=$2; shift; done\n\
                 f={d}/listing.$t\n[ -e $f ] && cat $f && rm -f $f\nexit 0\n"
            ),
        );
        let lister6 = script("ip6tables", "exit 0\n".into());
        let restore = script("iptables-restore", format!("cat >> {d}/restored\nexit $(cat {d}/status)\n"));
        Fake {
            tools: Tools {
                iptables_restore: restore.clone(),
                ip6tables_restore: restore,
                iptables: lister,
                ip6tables: lister6,
                // No sets to list: cleanup destroys none.
                ipset: script("ipset", "exit 0\n".into()),
            },
            dir,
        }
    })
}

/// Whether `line` of a removal may be fed to iptables-restore in the section of a table (whose
/// flowgate chains are `ours`), given that table's listing: a flush or delete of one of ours, or
/// the deletion of a listed rule of a built-in chain whose target (as iptables-restore reads the
/// words) is one of ours.
fn allowed(line: &str, ours: &[&str], listing: &str) -> bool {
    if let Some(chain) = line.strip_prefix("-F ").or_else(|| line.strip_prefix("-X ")) {
        return ours.contains(&chain);
    }
    let Some(rule) = line.strip_prefix("-D ") else { return false };
    let words = words(rule);
    let builtin = words.first().is_some_and(|c| ["OUTPUT", "INPUT", "FORWARD"].contains(&c.as_str()));
    let listed = listing.lines().any(|l| l.trim().strip_prefix("-A ") == Some(rule));
    let target = words.windows(2).rev().find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"));
    builtin && listed && target.is_some_and(|w| ours.contains(&w[1].as_str()))
}

/// A rule's words as iptables-restore reads them: blanks separate words, `"` toggles quoting
/// (the quotes themselves are dropped), `\` escapes inside quotes.
fn words(rule: &str) -> Vec<String> {
    let (mut out, mut word, mut started, mut quoted) = (Vec::new(), String::new(), false, false);
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => (quoted, started) = (!quoted, true),
            '\\' if quoted => word.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(word);
    }
    out
}

/// Checks what was fed to iptables-restore against the listings (filter, mangle).
fn check(fed: &str, listings: [&str; 2]) {
    let show = || format!("fed:\n{fed}\nfilter listing:\n{}\nmangle listing:\n{}", listings[0], listings[1]);
    // The table whose section a line is in.
    let mut table: Option<usize> = None;
    // Per table: the chains flushed and deleted.
    let mut flushed: [Vec<&str>; 2] = Default::default();
    let mut deleted: [Vec<&str>; 2] = Default::default();
    for line in fed.lines() {
        if let Some(name) = line.strip_prefix('*') {
            assert!(table.is_none(), "table {line:?} opened inside another table's section\n{}", show());
            let t = TABLES.iter().position(|(n, _)| *n == name);
            assert!(t.is_some(), "cleanup would feed iptables-restore {line:?}\n{}", show());
            table = t;
            continue;
        }
        let Some(t) = table else { panic!("{line:?} outside a table's section\n{}", show()) };
        if line == "COMMIT" {
            table = None;
            continue;
        }
        let (name, _) = &TABLES[t];
        assert!(
            allowed(line, &all_ours(t), listings[t]),
            "cleanup would feed iptables-restore {line:?} in the {name} table\n{}",
            show()
        );
        if let Some(chain) = line.strip_prefix("-F ") {
            flushed[t].push(chain);
        } else if let Some(chain) = line.strip_prefix("-X ") {
            deleted[t].push(chain);
        }
    }
    assert!(table.is_none(), "a section without COMMIT\n{}", show());
    for (t, (name, _)) in TABLES.iter().enumerate() {
        for chain in &all_ours(t) {
            let declared = listings[t].lines().any(|l| l.trim().strip_prefix("-N ").map(str::trim) == Some(*chain));
            if declared {
                assert!(
                    flushed[t].contains(chain) && deleted[t].contains(chain),
                    "{chain} is declared in the {name} table but not flushed and deleted there\n{}",
                    show()
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&status, text)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(text) else { return };
    let (filter, mangle) = text.split_once('\0').unwrap_or((text, ""));
    let f = fake();
    std::fs::write(f.dir.join("listing.filter"), filter).expect("write the filter listing");
    std::fs::write(f.dir.join("listing.mangle"), mangle).expect("write the mangle listing");
    std::fs::write(f.dir.join("status"), if status & 1 == 0 { "0" } else { "4" }).expect("write the status");
    let _ = std::fs::remove_file(f.dir.join("restored"));
    let _ = netfilter::cleanup(&f.tools);
    let fed = std::fs::read_to_string(f.dir.join("restored")).unwrap_or_default();
    check(&fed, [filter, mangle]);
});
