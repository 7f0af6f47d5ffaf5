//! `flowgate_core::hosts::parse_hosts_file` (and `list_entries`, `HostPattern`, `HostSet`) on
//! arbitrary bytes read as text (lossy UTF-8): a blocklist someone downloaded.
//!
//! Checks beyond "never panics":
//! - the report agrees with the entries `list_entries` hands over (names, skipped, bad, the
//!   first bad ones with their line numbers), and line numbers lie in the text;
//! - when the text is read, every name added matches in the set (a domain also one label below
//!   it), and so it does in a set built by inserting the patterns one by one; the set holds as
//!   many patterns as there are distinct ones; when it is refused, more entries were bad than
//!   usable and the set is untouched;
//! - every added pattern, and every word of the text that parses as one, prints back to a text
//!   that parses to the same pattern and matches its own name.
#![no_main]

use std::collections::HashSet;

use flowgate_core::hosts::{HostPattern, HostSet, HostsError, ListEntry, REPORTED_BAD, list_entries, parse_hosts_file};
use flowgate_core::sniff::MAX_HOST_NAME;
use libfuzzer_sys::fuzz_target;

fn round_trip(p: &HostPattern) {
    let text = p.to_string();
    assert_eq!(HostPattern::parse(&text).as_ref(), Ok(p), "{text:?} reads back differently");
    assert!(p.matches(p.name()), "{p} does not match its own name");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.split('\n').count();
    let (mut names, mut skipped, mut bad) = (Vec::new(), 0, Vec::new());
    list_entries(&text, |line, entry| {
        assert!((1..=lines).contains(&line), "line {line} of {lines}");
        match entry {
            ListEntry::Name(p) => names.push(p),
            ListEntry::Skipped(word) => {
                assert!(text.contains(word));
                skipped += 1;
            }
            ListEntry::Bad(word, why) => {
                assert!(text.contains(word) && !why.is_empty());
                bad.push(line);
            }
        }
    });

    let mut set = HostSet::new();
    set.insert_exact("kept.invalid");
    match parse_hosts_file(&text, &mut set) {
        Ok(report) => {
            assert_eq!(report.added, names.len());
            assert_eq!(report.exact + report.domains, names.len());
            assert_eq!(report.domains, names.iter().filter(|p| p.is_domain()).count());
            assert_eq!((report.skipped, report.bad), (skipped, bad.len()));
            let reported: Vec<usize> = report.first_bad.iter().map(|b| b.line).collect();
            assert_eq!(reported, bad.iter().copied().take(REPORTED_BAD).collect::<Vec<_>>());
            let distinct: HashSet<&HostPattern> = names.iter().collect();
            let kept = HostPattern::exact("kept.invalid").expect("a name");
            let expected = distinct.len() + usize::from(!distinct.contains(&kept));
            assert_eq!(set.len(), expected, "patterns in the set");
            assert_eq!(report.new, expected - 1, "new patterns");
            let mut one_by_one = HostSet::new();
            for p in &names {
                one_by_one.insert(p);
            }
            assert_eq!(one_by_one.len(), distinct.len());
            assert!(set.matches("kept.invalid"), "what the set held was lost");
            for p in &names {
                round_trip(p);
                assert!(set.matches(p.name()), "{p} added but does not match");
                assert!(one_by_one.matches(p.name()), "{p} inserted but does not match");
                let below = format!("x.{}", p.name());
                if p.is_domain() && below.len() <= MAX_HOST_NAME {
                    assert!(set.matches(&below) && one_by_one.matches(&below), "{below} is below {p}");
                }
            }
        }
        Err(HostsError::NotAList { bad: b, entries, first }) => {
            assert!(b > names.len() && b == bad.len(), "refused with {b} bad of {entries}, {} names", names.len());
            assert_eq!(Some(&first.line), bad.first());
            assert_eq!(set.len(), 1, "a refused text changed the set");
        }
    }

    for word in text.split_whitespace() {
        if let Ok(p) = HostPattern::parse(word) {
            round_trip(&p);
        }
    }
});
