//! Blocklists of a million names: how long `flowgate_core::hosts::parse_hosts_file` takes to
//! load one, what the `HostSet` costs in memory, and what one `HostSet::matches` costs. No root;
//! run it with `cargo run --profile bench -p flowgate-bench --bin hosts [NAMES]` (see
//! bench/README.md, "Blocklists").
//!
//! The list is generated (a fixed-seed xorshift, so every run reads the same text): names of
//! 2 to 4 labels, each 3 to 12 letters, digits and inner hyphens, under a few common top-level
//! domains, written once in hosts-file form (`0.0.0.0 name`, with a header of comments and
//! `localhost` lines as real lists have) and once as one domain a line. Each form is loaded 3
//! times into a fresh set; the best load is printed, in wall time and in this thread's CPU time
//! (the machine may be busy with other work). Memory is the counting allocator's live bytes
//! after the load minus before (the text itself excluded), next to `HostSet::heap_bytes`.
//! Lookups: a million hosts of 2 to 5 labels, half of them names of the list or names below
//! its domains, half not, each matched once; the figure is the mean per lookup (hash of each
//! suffix included). The last line of stdout is one JSON object with every figure.

use std::hint::black_box;
use std::time::{Duration, Instant};

use flowgate_bench::heap::{Counting, live_bytes};
use flowgate_core::hosts::{HostSet, parse_hosts_file};
use serde_json::json;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TLDS: [&str; 8] = ["com", "net", "org", "io", "info", "co.uk", "de", "example"];
const LABEL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn label(rng: &mut Rng, out: &mut String) {
    let len = 3 + rng.below(10) as usize;
    for i in 0..len {
        let hyphen = i > 0 && i + 1 < len && rng.below(12) == 0;
        out.push(if hyphen { '-' } else { LABEL[rng.below(LABEL.len() as u64) as usize] as char });
    }
}

fn name(rng: &mut Rng) -> String {
    let mut out = String::new();
    for _ in 0..1 + rng.below(3) {
        label(rng, &mut out);
        out.push('.');
    }
    out.push_str(TLDS[rng.below(TLDS.len() as u64) as usize]);
    out
}

/// Host names back to back in one text.
#[derive(Default)]
struct Queries {
    text: String,
    ends: Vec<usize>,
}

impl Queries {
    fn push(&mut self, host: &str) {
        self.text.push_str(host);
        self.ends.push(self.text.len());
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(&self.ends).map(|(start, &end)| &self.text[start..end])
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec of ours.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Load {
    wall: Duration,
    cpu: Duration,
    heap: i64,
    heap_bytes: usize,
    names: usize,
}

fn load(text: &str) -> (Load, HostSet) {
    let mut best: Option<(Load, HostSet)> = None;
    for _ in 0..3 {
        let before = live_bytes();
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let mut set = HostSet::new();
        let report = parse_hosts_file(text, &mut set).expect("the generated list reads");
        let (wall, cpu) = (wall.elapsed(), thread_cpu() - cpu);
        let heap = live_bytes() - before;
        let run = Load { wall, cpu, heap, heap_bytes: set.heap_bytes(), names: report.new };
        if best.as_ref().is_none_or(|(b, _)| run.cpu < b.cpu) {
            best = Some((run, set));
        }
    }
    best.expect("three runs")
}

fn main() {
    let names: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let list: Vec<String> = (0..names).map(|_| name(&mut rng)).collect();

    let mut hosts_text = String::from("# generated blocklist\n127.0.0.1 localhost\n::1 localhost ip6-localhost\n\n");
    let mut plain_text = String::from("# generated blocklist, one domain a line\n");
    for n in &list {
        hosts_text.push_str("0.0.0.0 ");
        hosts_text.push_str(n);
        hosts_text.push('\n');
        plain_text.push_str(n);
        plain_text.push('\n');
    }

    let (hosts, hosts_set) = load(&hosts_text);
    let (plain, plain_set) = load(&plain_text);

    // Lookups: half hits (a listed name, or for the domain list a name below one), half misses.
    // The hosts are laid out one after the other in one text, as a sniffer's fresh result would
    // be in the cache: the time is the set's, not that of fetching scattered strings.
    let mut queries = Queries::default();
    let mut below = Queries::default();
    for i in 0..1_000_000 {
        let host = if i % 2 == 0 { list[rng.below(list.len() as u64) as usize].clone() } else { name(&mut rng) };
        queries.push(&host);
        below.push(&format!("www.{host}"));
    }
    let time = |set: &HostSet, queries: &Queries| {
        let (wall, cpu) = (Instant::now(), thread_cpu());
        let hits = queries.iter().filter(|q| set.matches(black_box(q))).count();
        let (wall, cpu) = (wall.elapsed(), thread_cpu() - cpu);
        let per = |d: Duration| d.as_nanos() as f64 / queries.ends.len() as f64;
        (per(wall), per(cpu), hits)
    };
    let (exact_wall, exact_cpu, exact_hits) = time(&hosts_set, &queries);
    let (domain_wall, domain_cpu, domain_hits) = time(&plain_set, &below);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (form, l) in [("hosts-file", &hosts), ("one domain a line", &plain)] {
        println!(
            "{form}: {} names loaded in {:.0} ms wall, {:.0} ms CPU; heap {} bytes ({:.1} a name), heap_bytes() {}",
            l.names,
            ms(l.wall),
            ms(l.cpu),
            l.heap,
            l.heap as f64 / l.names as f64,
            l.heap_bytes
        );
    }
    println!(
        "matches: {exact_wall:.0} ns wall, {exact_cpu:.0} ns CPU a lookup in the hosts-file set \
         ({exact_hits} of 1,000,000 hit); {domain_wall:.0} ns wall, {domain_cpu:.0} ns CPU in the domain set for names \
         one label below ({domain_hits} hit)"
    );
    println!(
        "{}",
        json!({
            "names": names,
            "hosts_file": {"load_ms_wall": ms(hosts.wall), "load_ms_cpu": ms(hosts.cpu), "heap_bytes": hosts.heap,
                           "set_heap_bytes": hosts.heap_bytes, "names": hosts.names},
            "domains": {"load_ms_wall": ms(plain.wall), "load_ms_cpu": ms(plain.cpu), "heap_bytes": plain.heap,
                        "set_heap_bytes": plain.heap_bytes, "names": plain.names},
            "lookup_ns_exact": {"wall": exact_wall, "cpu": exact_cpu, "hits": exact_hits},
            "lookup_ns_below_domain": {"wall": domain_wall, "cpu": domain_cpu, "hits": domain_hits},
        })
    );
}
