//! Host names as rules name them: patterns (`example.com`, `*.example.com`), compact sets of
//! many names, and blocklist files (hosts-file lines or one domain a line) read into such sets.
//!
//! This room turns text into matchers and answers "does this host match"; it reads no file (the
//! caller hands in the text) and knows nothing of flows. Hosts to match are normalized by
//! [`crate::sniff::host_name`] first (lowercase, no trailing dot), as every sniffer does.
//!
//! ## How a [`HostSet`] is kept
//!
//! A set holds no names, only a 64-bit keyed hash of each (SipHash-1-3 with random keys drawn
//! when the set is made, `std`'s [`RandomState`]), tagged with whether it stands for the name
//! alone or for the domain and every name below it. The hashes sit in one sorted vector with a
//! bucket index over their top bits (about 16 hashes a bucket), so a million names cost about
//! 8.3 bytes each, and a lookup reads two adjacent index entries (256 KiB for a million names:
//! they stay in the cache) and part of one short run of hashes. A host is matched by looking up
//! its own name, then the domain key of itself and of each parent (`a.b.example` →
//! `a.b.example`, `b.example`, `example`): at most one lookup per label, plus one. Lengths (in
//! labels) that no stored name has are not looked up: a set of hosts-file names costs one
//! lookup a host, whatever its length.
//!
//! The price of keeping hashes is a chance of a false match: a host that is in no list matches
//! when one of its keys equals a stored one. With `n` names and a host of `L` labels that chance
//! is about `(L + 1) · n / 2⁶⁴`: for a million names and 4 labels, 2.7 · 10⁻¹³ per host looked
//! up, one false match in about 40 years at a thousand new flows a second. The keys are secret
//! and different in each set (and process), so no one can look for a name that collides.
//!
//! A set is built once (new names are collected in a small sorted run and merged in when it
//! fills) and then read by many threads: it is `Send + Sync` and matching never writes.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::str::FromStr;

use crate::sniff::{MAX_HOST_NAME, host_name};

/// A host pattern: `example.com` (that name only) or `*.example.com` (the domain `example.com`
/// and every name below it). Names are normalized as [`host_name`] does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPattern {
    name: String,
    domain: bool,
}

/// Why a text is not a host pattern.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("an empty host name")]
    Empty,
    #[error("`*` alone would match every host; leave the host out instead")]
    Everything,
    #[error("`{0}`: `*` may only stand as the whole first label, as in `*.example.com`")]
    Wildcard(String),
    #[error("`{text}` is not a host name: {why}")]
    NotAName { text: String, why: String },
}

impl HostPattern {
    /// Reads `name` or `*.name`.
    pub fn parse(text: &str) -> Result<HostPattern, HostError> {
        if text.is_empty() {
            return Err(HostError::Empty);
        }
        if text == "*" || text == "*." {
            return Err(HostError::Everything);
        }
        let (rest, domain) = match text.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        if rest.contains('*') {
            return Err(HostError::Wildcard(text.to_owned()));
        }
        match host_name(rest.as_bytes()) {
            Some(name) => Ok(HostPattern { name, domain }),
            None => Err(HostError::NotAName { text: text.to_owned(), why: why_not_a_name(rest) }),
        }
    }

    /// The pattern of one name (normalized), `None` if it is not a host name.
    pub fn exact(name: &str) -> Option<HostPattern> {
        host_name(name.as_bytes()).map(|name| HostPattern { name, domain: false })
    }

    /// The pattern of a domain and every name below it, `None` if it is not a host name.
    pub fn domain(name: &str) -> Option<HostPattern> {
        host_name(name.as_bytes()).map(|name| HostPattern { name, domain: true })
    }

    /// The name (of a domain pattern: the domain), normalized.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the pattern stands for the domain and every name below it.
    pub fn is_domain(&self) -> bool {
        self.domain
    }

    /// Whether `host` (normalized by [`host_name`]) is this name, or for a domain pattern this
    /// name or a name below it.
    pub fn matches(&self, host: &str) -> bool {
        if host == self.name {
            return true;
        }
        self.domain
            && host.strip_suffix(self.name.as_str()).is_some_and(|below| below.len() > 1 && below.ends_with('.'))
    }
}

impl FromStr for HostPattern {
    type Err = HostError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostPattern::parse(s)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.domain { write!(f, "*.{}", self.name) } else { f.write_str(&self.name) }
    }
}

/// What makes `text` fail [`host_name`], for error messages.
fn why_not_a_name(text: &str) -> String {
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    if trimmed.is_empty() {
        return "it is empty".into();
    }
    if trimmed.len() > MAX_HOST_NAME {
        return format!("{} characters, more than {MAX_HOST_NAME}", trimmed.len());
    }
    if let Some(c) = trimmed.chars().find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')) {
        return format!("{c:?} is not a letter, digit, `-`, `_` or `.` (international names are written `xn--...`)");
    }
    if trimmed.split('.').any(str::is_empty) {
        return "an empty label (two dots in a row, or a leading dot)".into();
    }
    "a label longer than 63 characters".into()
}

/// Key tags: a key stands for a name alone or for a domain and the names below it.
const EXACT: u8 = b'=';
const DOMAIN: u8 = b'*';

/// New keys wait in a sorted run of at most this many before they are merged into the rest.
const PENDING: usize = 4096;

/// Most names a set holds (positions are kept in 32 bits); names beyond are not added.
pub const MAX_NAMES: usize = u32::MAX as usize;

/// A compact set of names: exact names and domains (a domain matches itself and every name
/// below). Built once, read by many threads (`Send + Sync`); matching costs one lookup per
/// label of the host, plus one. See the module documentation for how it is kept and its odds
/// of a false match.
#[derive(Clone)]
pub struct HostSet {
    hasher: RandomState,
    /// Keys, sorted and distinct.
    sorted: Vec<u64>,
    /// `index[b]..index[b + 1]` are the positions in `sorted` of keys whose top `bits` bits
    /// are `b`.
    index: Vec<u32>,
    bits: u32,
    /// Keys added since the last merge, sorted and distinct, none of them in `sorted`.
    pending: Vec<u64>,
    /// Bit `i` is set when some exact name (`exact_labels`) or domain (`domain_labels`) has `i`
    /// labels (127 for 127 or more): a host's suffixes of other lengths need no lookup, so a
    /// set of hosts-file names costs one lookup a host, and a set of domains one per label
    /// count it holds.
    exact_labels: u128,
    domain_labels: u128,
}

impl HostSet {
    pub fn new() -> Self {
        HostSet {
            hasher: RandomState::new(),
            sorted: Vec::new(),
            index: vec![0, 0],
            bits: 0,
            pending: Vec::new(),
            exact_labels: 0,
            domain_labels: 0,
        }
    }

    /// Adds a pattern: its name alone, or the domain and every name below it.
    pub fn insert(&mut self, p: &HostPattern) {
        let key = self.pattern_key(p);
        self.insert_key(key);
    }

    /// Adds one name (normalized by [`host_name`]); a text that is not a host name is not added.
    pub fn insert_exact(&mut self, name: &str) {
        if let Some(p) = HostPattern::exact(name) {
            self.insert(&p);
        }
    }

    /// Adds a domain and every name below it (normalized by [`host_name`]); a text that is not a
    /// host name is not added.
    pub fn insert_domain(&mut self, name: &str) {
        if let Some(p) = HostPattern::domain(name) {
            self.insert(&p);
        }
    }

    /// Whether `host` (normalized by [`host_name`]) is one of the exact names, or one of the
    /// domains or below one.
    pub fn matches(&self, host: &str) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut labels = labels_of(host);
        if has(self.exact_labels, labels) && self.contains(self.key(EXACT, host)) {
            return true;
        }
        let mut rest = host;
        loop {
            if has(self.domain_labels, labels) && self.contains(self.key(DOMAIN, rest)) {
                return true;
            }
            match rest.split_once('.') {
                Some((_, parent)) => rest = parent,
                None => return false,
            }
            labels -= 1;
        }
    }

    /// How many patterns the set holds (a name added both alone and as a domain counts twice).
    pub fn len(&self) -> usize {
        self.sorted.len() + self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the set holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        (self.sorted.capacity() + self.pending.capacity()) * size_of::<u64>() + self.index.capacity() * size_of::<u32>()
    }

    fn key(&self, tag: u8, name: &str) -> u64 {
        self.hasher.hash_one((tag, name))
    }

    /// The key of a pattern about to be added (its label count is noted).
    fn pattern_key(&mut self, p: &HostPattern) -> u64 {
        let bit = 1u128 << labels_of(&p.name).min(127);
        if p.domain {
            self.domain_labels |= bit;
            self.key(DOMAIN, &p.name)
        } else {
            self.exact_labels |= bit;
            self.key(EXACT, &p.name)
        }
    }

    fn contains(&self, key: u64) -> bool {
        let bucket = bucket_of(key, self.bits);
        let (Some(&lo), Some(&hi)) = (self.index.get(bucket), self.index.get(bucket + 1)) else {
            return false;
        };
        let run = self.sorted.get(lo as usize..hi as usize).unwrap_or_default();
        // The run is sorted: stop at the first key not below.
        run.iter().find(|&&k| k >= key) == Some(&key) || self.pending.binary_search(&key).is_ok()
    }

    fn insert_key(&mut self, key: u64) {
        if self.len() >= MAX_NAMES || self.contains(key) {
            return;
        }
        if let Err(at) = self.pending.binary_search(&key) {
            self.pending.insert(at, key);
        }
        if self.pending.len() >= PENDING {
            self.merge(Vec::new());
        }
    }

    /// Merges `pending` and `more` (any order, duplicates allowed) into `sorted`; returns how
    /// many keys are new.
    fn merge(&mut self, mut more: Vec<u64>) -> usize {
        let before = self.len();
        more.append(&mut self.pending);
        more.sort_unstable();
        more.dedup();
        let mut merged = Vec::with_capacity(self.sorted.len() + more.len());
        let (mut old, mut new) = (self.sorted.iter().peekable(), more.iter().peekable());
        while merged.len() < MAX_NAMES {
            let next = match (old.peek(), new.peek()) {
                (Some(&&a), Some(&&b)) if a == b => {
                    new.next();
                    old.next()
                }
                (Some(&&a), Some(&&b)) if b < a => new.next(),
                (Some(_), _) => old.next(),
                (None, _) => new.next(),
            };
            match next {
                Some(&key) => merged.push(key),
                None => break,
            }
        }
        self.sorted = merged;
        self.pending = Vec::new();
        self.rebuild_index();
        self.len() - before
    }

    fn rebuild_index(&mut self) {
        let n = self.sorted.len();
        // About 16 keys a bucket (half of them read on average, two cache lines): the index
        // of a million names is 256 KiB and stays in the cache, so a lookup misses it once, in
        // the run.
        self.bits = if n < 32 { 0 } else { (n / 16).next_power_of_two().trailing_zeros() };
        let buckets = 1usize << self.bits;
        let mut index = Vec::with_capacity(buckets + 1);
        let mut at = 0;
        for bucket in 0..buckets {
            index.push(at as u32);
            while self.sorted.get(at).is_some_and(|&k| bucket_of(k, self.bits) == bucket) {
                at += 1;
            }
        }
        index.push(at as u32);
        self.index = index;
    }
}

/// Labels of a host name (`a.example` has 2).
fn labels_of(name: &str) -> u32 {
    name.bytes().filter(|&b| b == b'.').count() as u32 + 1
}

fn has(mask: u128, labels: u32) -> bool {
    mask & (1u128 << labels.min(127)) != 0
}

fn bucket_of(key: u64, bits: u32) -> usize {
    if bits == 0 { 0 } else { (key >> (64 - bits)) as usize }
}

impl Default for HostSet {
    fn default() -> Self {
        HostSet::new()
    }
}

impl fmt::Debug for HostSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostSet").field("len", &self.len()).field("heap_bytes", &self.heap_bytes()).finish()
    }
}

/// What one blocklist entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListEntry<'a> {
    /// A name to add: a hosts-file name as itself alone, a one-domain-a-line name as the domain
    /// and every name below it.
    Name(HostPattern),
    /// A hosts-file name for the host itself (`localhost`, `localhost.localdomain`, `local`,
    /// `broadcasthost`, `ip6-*`), or an address where a name belongs (`0.0.0.0 0.0.0.0`):
    /// lists carry these for the system's sake, and blocking them would block the host itself.
    Skipped(&'a str),
    /// Not a usable entry: the word (or line) and why.
    Bad(&'a str, String),
}

/// Reads a blocklist's text and hands each entry to `each` with its line number (from 1).
///
/// A line is cut at `#` (a comment) and split at whitespace; a trailing CR is dropped; lines
/// starting with `!` or `[` are adblock comments and headers. Then:
///
/// - **hosts-file lines**, an address first (`0.0.0.0 a.example b.example`, any IPv4 or IPv6
///   address, a zone `%lo0` allowed): every following word is a name matched exactly (that is
///   what a hosts file says: this name resolves to that address);
/// - **one domain a line**: `a.example`, `*.a.example`, `.a.example` or adblock's
///   `||a.example^`: the domain and every name below it (that is how such lists are meant:
///   `ads.example` blocks `x.ads.example` too). Other adblock syntax (exceptions `@@`, options
///   `$...`, paths, cosmetic rules) is not a host and is `Bad`.
pub fn list_entries<'a>(text: &'a str, mut each: impl FnMut(usize, ListEntry<'a>)) {
    for (number, line) in text.split('\n').enumerate() {
        let number = number + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.split_once('#').map_or(line, |(before, _)| before).trim_ascii();
        if line.is_empty() || line.starts_with('!') || line.starts_with('[') {
            continue;
        }
        let mut words = line.split_ascii_whitespace();
        let Some(first) = words.next() else { continue };
        if is_address(first) {
            let mut any = false;
            for word in words {
                any = true;
                let entry = if is_address(word) || is_loopback_name(word) {
                    ListEntry::Skipped(word)
                } else {
                    match HostPattern::exact(word) {
                        Some(p) => ListEntry::Name(p),
                        None => ListEntry::Bad(word, format!("not a host name: {}", why_not_a_name(word))),
                    }
                };
                each(number, entry);
            }
            if !any {
                each(number, ListEntry::Bad(line, "an address without names".into()));
            }
            continue;
        }
        if words.next().is_some() {
            each(number, ListEntry::Bad(line, "several words, and the first is not an address".into()));
            continue;
        }
        each(number, domain_entry(first));
    }
}

/// One word alone on a line: a domain in one of its spellings.
fn domain_entry(word: &str) -> ListEntry<'_> {
    if word.starts_with("@@") {
        return ListEntry::Bad(word, "an adblock exception: not supported".into());
    }
    let name = match word.strip_prefix("||") {
        Some(rest) => match rest.strip_suffix('^') {
            Some(name) => name,
            None => return ListEntry::Bad(word, "adblock rules other than `||name^` are not supported".into()),
        },
        None => word.strip_prefix("*.").or_else(|| word.strip_prefix('.')).unwrap_or(word),
    };
    if name.contains('*') {
        return ListEntry::Bad(word, "`*` may only stand as the whole first label, as in `*.example.com`".into());
    }
    if is_loopback_name(name) {
        return ListEntry::Skipped(word);
    }
    match HostPattern::domain(name) {
        Some(p) => ListEntry::Name(p),
        None => ListEntry::Bad(word, format!("not a host name: {}", why_not_a_name(name))),
    }
}

fn is_address(word: &str) -> bool {
    let address = word.split_once('%').map_or(word, |(address, _zone)| address);
    address.parse::<IpAddr>().is_ok()
}

/// Names hosts files give the host itself.
fn is_loopback_name(word: &str) -> bool {
    let word = word.strip_suffix('.').unwrap_or(word);
    ["localhost", "localhost.localdomain", "local", "broadcasthost"].iter().any(|n| word.eq_ignore_ascii_case(n))
        || word.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("ip6-"))
}

/// Bad entries a report describes; the rest are only counted.
pub const REPORTED_BAD: usize = 10;

/// What [`parse_hosts_file`] read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostsFileReport {
    /// Lines in the text.
    pub lines: usize,
    /// Names read and added: exact names (hosts-file lines) plus domains (one a line).
    pub added: usize,
    pub exact: usize,
    pub domains: usize,
    /// How many of the added names were not in the set already.
    pub new: usize,
    /// Names skipped on purpose ([`ListEntry::Skipped`]).
    pub skipped: usize,
    /// Entries that are not usable names, skipped.
    pub bad: usize,
    /// The first [`REPORTED_BAD`] of them.
    pub first_bad: Vec<BadEntry>,
}

/// One unusable entry: where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadEntry {
    /// Line number, from 1.
    pub line: usize,
    /// The word or line (its first 80 characters).
    pub text: String,
    pub why: String,
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: `{}`: {}", self.line, self.text, self.why)
    }
}

impl fmt::Display for HostsFileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lines: {} names added ({} exact, {} domains, {} new), {} skipped, {} not usable",
            self.lines, self.added, self.exact, self.domains, self.new, self.skipped, self.bad
        )?;
        for bad in &self.first_bad {
            write!(f, "; {bad}")?;
        }
        if self.bad > self.first_bad.len() {
            write!(f, "; and {} more", self.bad - self.first_bad.len())?;
        }
        Ok(())
    }
}

/// Why a text was not read as a blocklist.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostsError {
    /// More entries are unusable than usable: the text is likely not a blocklist (a wrong file,
    /// or a format this reader does not know) and nothing was added.
    #[error(
        "not a blocklist: {bad} of {entries} entries are not host names (first: {first}); expected hosts-file lines \
         (`0.0.0.0 a.example`) or one domain a line"
    )]
    NotAList { bad: usize, entries: usize, first: BadEntry },
}

/// Reads a blocklist into `into` (see [`list_entries`] for the line forms and what each
/// entry matches).
///
/// Lists of a million lines from third parties always hold some junk, and one odd line must
/// not cost the whole list: an unusable entry is skipped and counted, and the report describes
/// the first [`REPORTED_BAD`] (line, text, why) for the log. Only when more entries are bad
/// than usable is the text refused ([`HostsError::NotAList`], naming the first bad entry), and
/// then nothing is added. All names are hashed first and merged into the set at once.
pub fn parse_hosts_file(text: &str, into: &mut HostSet) -> Result<HostsFileReport, HostsError> {
    let mut report = HostsFileReport { lines: text.split('\n').count(), ..Default::default() };
    if text.ends_with('\n') {
        report.lines -= 1;
    }
    let mut keys = Vec::new();
    let masks = (into.exact_labels, into.domain_labels);
    list_entries(text, |line, entry| match entry {
        ListEntry::Name(p) => {
            if p.domain {
                report.domains += 1;
            } else {
                report.exact += 1;
            }
            keys.push(into.pattern_key(&p));
        }
        ListEntry::Skipped(_) => report.skipped += 1,
        ListEntry::Bad(text, why) => {
            report.bad += 1;
            if report.first_bad.len() < REPORTED_BAD {
                report.first_bad.push(BadEntry { line, text: text.chars().take(80).collect(), why });
            }
        }
    });
    report.added = report.exact + report.domains;
    if report.bad > report.added
        && let Some(first) = report.first_bad.first()
    {
        (into.exact_labels, into.domain_labels) = masks;
        return Err(HostsError::NotAList {
            bad: report.bad,
            entries: report.bad + report.added + report.skipped,
            first: first.clone(),
        });
    }
    report.new = into.merge(keys);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_read_match_and_print_back() {
        let exact = HostPattern::parse("WWW.Example.com.").unwrap();
        assert_eq!(exact.to_string(), "www.example.com");
        assert!(exact.matches("www.example.com"));
        assert!(!exact.matches("a.www.example.com"));
        assert!(!exact.matches("example.com"));

        let domain: HostPattern = "*.example.com".parse().unwrap();
        assert_eq!(domain.to_string(), "*.example.com");
        assert!(domain.is_domain() && domain.name() == "example.com");
        for host in ["example.com", "a.example.com", "a.b.example.com"] {
            assert!(domain.matches(host), "{host}");
        }
        for host in ["badexample.com", "example.com.evil", "com", ".example.com", ""] {
            assert!(!domain.matches(host), "{host}");
        }
        for p in [&exact, &domain] {
            assert_eq!(&HostPattern::parse(&p.to_string()).unwrap(), p);
        }
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        assert_eq!(HostPattern::parse(""), Err(HostError::Empty));
        assert_eq!(HostPattern::parse("*"), Err(HostError::Everything));
        assert_eq!(HostPattern::parse("a*.example"), Err(HostError::Wildcard("a*.example".into())));
        assert_eq!(HostPattern::parse("*.*.example"), Err(HostError::Wildcard("*.*.example".into())));
        let err = HostPattern::parse("exa mple.com").unwrap_err().to_string();
        assert!(err.contains("' ' is not a letter"), "{err}");
        let err = HostPattern::parse("a..b").unwrap_err().to_string();
        assert!(err.contains("empty label"), "{err}");
        let err = HostPattern::parse(&format!("{}.example", "a".repeat(64))).unwrap_err().to_string();
        assert!(err.contains("longer than 63"), "{err}");
        let err = HostPattern::parse(&"a.".repeat(130)).unwrap_err().to_string();
        assert!(err.contains("more than 253"), "{err}");
    }

    #[test]
    fn a_set_matches_exact_names_and_domains_with_everything_below() {
        let mut set = HostSet::new();
        assert!(set.is_empty() && !set.matches("a.example"));
        set.insert(&"exact.example".parse().unwrap());
        set.insert(&"*.domain.example".parse().unwrap());
        set.insert_exact("Upper.Example.");
        set.insert_domain("sub.other.example");
        set.insert_exact("not a name");
        assert_eq!(set.len(), 4);
        for host in ["exact.example", "domain.example", "a.domain.example", "x.y.domain.example", "upper.example"] {
            assert!(set.matches(host), "{host}");
        }
        assert!(set.matches("sub.other.example") && set.matches("a.sub.other.example"));
        for host in ["a.exact.example", "example", "other.example", "xdomain.example", "a.upper.example"] {
            assert!(!set.matches(host), "{host}");
        }
        set.insert_exact("exact.example");
        assert_eq!(set.len(), 4, "no duplicates");
    }

    #[test]
    fn a_set_stays_right_across_merges() {
        let mut set = HostSet::new();
        let n = PENDING * 3 + 17;
        for i in 0..n {
            set.insert_exact(&format!("h{i}.example"));
        }
        for i in (0..n).step_by(2) {
            set.insert_exact(&format!("h{i}.example"));
        }
        assert_eq!(set.len(), n);
        assert!(set.pending.len() < PENDING && set.sorted.len() >= PENDING * 3);
        assert!((0..n).all(|i| set.matches(&format!("h{i}.example"))));
        assert!((n..n + 1000).all(|i| !set.matches(&format!("h{i}.example"))));
        assert!(set.heap_bytes() >= n * 8);
        let shared = std::sync::Arc::new(set);
        let reader = std::thread::spawn({
            let shared = shared.clone();
            move || shared.matches("h1.example")
        });
        assert!(reader.join().unwrap());
    }

    #[test]
    fn hosts_file_lines_add_exact_names_and_skip_the_hosts_own() {
        let text = "# StevenBlack-like\r\n127.0.0.1 localhost\r\n::1 localhost ip6-localhost ip6-loopback\r\n\
                    fe80::1%lo0 localhost\r\n0.0.0.0 0.0.0.0\r\n255.255.255.255 broadcasthost\r\n\r\n\
                    0.0.0.0 ads.example Tracker.Example.  # two\r\n0.0.0.0\tmetrics.example\r\n";
        let mut set = HostSet::new();
        let report = parse_hosts_file(text, &mut set).unwrap();
        assert_eq!(
            report,
            HostsFileReport { lines: 9, added: 3, exact: 3, domains: 0, new: 3, skipped: 7, bad: 0, first_bad: vec![] }
        );
        assert!(set.matches("ads.example") && set.matches("tracker.example") && set.matches("metrics.example"));
        assert!(!set.matches("x.ads.example"), "hosts-file names match exactly");
        assert!(!set.matches("localhost") && !set.matches("ip6-localhost"));
    }

    #[test]
    fn one_domain_a_line_adds_the_domain_and_everything_below() {
        let text =
            "a.example\n*.b.example\n||c.example^\n.d.example\n  e.example  # why\n! adblock comment\n[Adblock]\n";
        let mut set = HostSet::new();
        let report = parse_hosts_file(text, &mut set).unwrap();
        assert_eq!((report.domains, report.exact, report.bad, report.lines), (5, 0, 0, 7));
        for d in ["a", "b", "c", "d", "e"] {
            assert!(set.matches(&format!("{d}.example")) && set.matches(&format!("x.{d}.example")), "{d}");
        }
        assert!(!set.matches("example"));
    }

    #[test]
    fn bad_entries_are_skipped_counted_and_the_first_reported() {
        let mut text = String::from("good.example\n0.0.0.0 fine.example\n");
        for i in 0..15 {
            text.push_str(&format!("bad{i} name\n"));
        }
        for i in 0..20 {
            text.push_str(&format!("ok{i}.example\n"));
        }
        text.push_str("0.0.0.0\n||x.example^$third-party\n@@||y.example^\nexa$mple.com\n*.*.z.example\n");
        let mut set = HostSet::new();
        let report = parse_hosts_file(&text, &mut set).unwrap();
        assert_eq!((report.added, report.bad), (22, 20));
        assert_eq!(report.first_bad.len(), REPORTED_BAD);
        assert_eq!(
            report.first_bad[0],
            BadEntry {
                line: 3,
                text: "bad0 name".into(),
                why: "several words, and the first is not an address".into()
            }
        );
        assert!(report.to_string().contains("and 10 more"), "{report}");
        assert!(set.matches("ok19.example") && set.matches("fine.example"));

        let mut tail = HostSet::new();
        let report =
            parse_hosts_file("0.0.0.0\n||x.example^$p\n@@||y.example^\nexa$mple.com\n*.*.z.example\n", &mut tail);
        let Err(HostsError::NotAList { bad, entries, first }) = report else { panic!("{report:?}") };
        assert_eq!((bad, entries, first.line), (5, 5, 1));
        assert!(first.why.contains("address without names"));
        assert!(tail.is_empty(), "nothing added from a text that is not a list");
    }

    #[test]
    fn an_empty_or_comment_only_text_adds_nothing_and_is_fine() {
        let mut set = HostSet::new();
        assert_eq!(parse_hosts_file("", &mut set).unwrap().added, 0);
        assert_eq!(parse_hosts_file("# nothing\n\n", &mut set).unwrap().lines, 2);
        assert!(set.is_empty());
    }

    #[test]
    fn merging_a_file_into_a_set_keeps_what_it_held() {
        let mut set = HostSet::new();
        set.insert_exact("kept.example");
        let report = parse_hosts_file("kept.example\nnew.example\n0.0.0.0 kept.example\n", &mut set).unwrap();
        assert_eq!((report.added, report.new), (3, 2), "the domain kept.example is new, the exact one is not");
        assert!(set.matches("kept.example") && set.matches("x.new.example") && set.matches("x.kept.example"));
        assert_eq!(set.len(), 3);
    }

    /// Load time, memory and match cost for a million names; `cargo test -p flowgate-core
    /// --release --lib hosts -- --ignored --nocapture`. The bench binary
    /// `bench/src/bin/hosts.rs` measures the same with the heap counted.
    #[test]
    #[ignore]
    fn a_million_names() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut text = String::new();
        for _ in 0..1_000_000 {
            let labels = 2 + next() % 3;
            text.push_str("0.0.0.0 ");
            for l in 0..labels {
                let len = 3 + next() % 10;
                for _ in 0..len {
                    text.push((b'a' + (next() % 26) as u8) as char);
                }
                text.push(if l + 1 == labels { '\n' } else { '.' });
            }
        }
        let start = std::time::Instant::now();
        let mut set = HostSet::new();
        let report = parse_hosts_file(&text, &mut set).unwrap();
        let load = start.elapsed();
        let start = std::time::Instant::now();
        let mut hits = 0;
        for i in 0..1_000_000u32 {
            hits += usize::from(set.matches(&format!("www.h{i}.example.com")));
        }
        eprintln!(
            "{} names in {load:.2?}, {} heap bytes ({:.1} a name), {:.0} ns a 4-label lookup (with formatting), {hits} hits",
            report.new,
            set.heap_bytes(),
            set.heap_bytes() as f64 / set.len() as f64,
            start.elapsed().as_nanos() as f64 / 1e6
        );
        assert!(report.new > 999_000);
    }
}
