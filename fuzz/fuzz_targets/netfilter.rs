//! The host's filter table as `iptables -S` lists it, read by `flowgate_linux::netfilter` to find
//! and remove what a dead instance left: `netfilter::cleanup` (the first step of every start, and
//! `flowgate cleanup`). The listing parser (`parse_listing`, `split_args`: quotes, escapes,
//! `-j`/`-g` targets) is private; `cleanup` reaches it through `Tools`, whose programs are
//! public paths: here, small shell scripts in a temporary directory. The `iptables` stand-in
//! prints the input once (as the IPv4 listing; afterwards the table is clean), the `ip6tables`
//! one an empty table, and the `iptables-restore` stand-ins record what they are fed and succeed
//! or fail as the input's first byte says.
//!
//! Checks: no panic; what flowgate feeds `iptables-restore` only ever deletes jumps from the
//! built-in chains OUTPUT, INPUT, FORWARD to flowgate's own chains, and flushes and deletes
//! flowgate's own chains: whatever the host's listing holds (other chains, comments with quotes,
//! rules that mention flowgate's names), no other rule can be touched; and every rule it deletes
//! was in the listing.
#![no_main]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use flowgate_linux::netfilter::{self, CHAIN_FWD, CHAIN_IN, CHAIN_OUT, Tools};
use libfuzzer_sys::fuzz_target;

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
        let lister = script("iptables", format!("f={d}/listing\n[ -e $f ] && cat $f && rm -f $f\nexit 0\n"));
        let lister6 = script("ip6tables", "exit 0\n".into());
        let restore = script("iptables-restore", format!("cat >> {d}/restored\nexit $(cat {d}/status)\n"));
        Fake {
            tools: Tools {
                iptables_restore: restore.clone(),
                ip6tables_restore: restore,
                iptables: lister,
                ip6tables: lister6,
            },
            dir,
        }
    })
}

/// Whether `line` of a removal may be fed to iptables-restore, given the listing it came from.
fn allowed(line: &str, listing: &str) -> bool {
    let ours = [CHAIN_OUT, CHAIN_IN, CHAIN_FWD];
    if line == "*filter" || line == "COMMIT" {
        return true;
    }
    if let Some(chain) = line.strip_prefix("-F ").or_else(|| line.strip_prefix("-X ")) {
        return ours.contains(&chain);
    }
    let Some(rule) = line.strip_prefix("-D ") else { return false };
    // The chain is the rule's first word, as iptables-restore reads it: blanks separate words,
    // `"` toggles quoting (the quotes themselves are dropped), `\` escapes inside quotes.
    let builtin = first_word(rule).is_some_and(|c| ["OUTPUT", "INPUT", "FORWARD"].contains(&c.as_str()));
    let listed = listing.lines().any(|l| l.trim().strip_prefix("-A ") == Some(rule));
    if !(builtin && listed && ours.iter().any(|c| rule.contains(c))) {
        return false;
    }
    // Without quotes a rule's words are plain: its last -j/-g target must be one of ours.
    if rule.contains(['"', '\\']) {
        return true;
    }
    let words: Vec<&str> = rule.split_whitespace().collect();
    let target = words.windows(2).rev().find(|w| matches!(w[0], "-j" | "--jump" | "-g" | "--goto")).map(|w| w[1]);
    target.is_some_and(|t| ours.contains(&t))
}

fn first_word(rule: &str) -> Option<String> {
    let (mut word, mut started, mut quoted) = (String::new(), false, false);
    let mut chars = rule.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => (quoted, started) = (!quoted, true),
            '\\' if quoted => word.extend(chars.next()),
            c if c.is_whitespace() && !quoted => {
                if started {
                    break;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    started.then_some(word)
}

fuzz_target!(|data: &[u8]| {
    let Some((&status, listing)) = data.split_first() else { return };
    let Ok(listing) = std::str::from_utf8(listing) else { return };
    let f = fake();
    std::fs::write(f.dir.join("listing"), listing).expect("write the listing");
    std::fs::write(f.dir.join("status"), if status & 1 == 0 { "0" } else { "4" }).expect("write the status");
    let _ = std::fs::remove_file(f.dir.join("restored"));
    let _ = netfilter::cleanup(&f.tools);
    let fed = std::fs::read_to_string(f.dir.join("restored")).unwrap_or_default();
    for line in fed.lines() {
        assert!(allowed(line, listing), "cleanup would feed iptables-restore {line:?}\nlisting:\n{listing}");
    }
});
