//! Classifying one flow against compiled rule sets of 100, 10,000 and 1,000,000 rules.
//!
//! Group `classify`, ids `<size>/<lookup>`: sizes `baseline-100-rules`, `10k-rules`,
//! `1m-rules`; lookups `last_rule` (hits the set's last rule, nothing earlier), `no_match`
//! (default action) and `ipv6` (hits the last 2001:db8::/32 rule). The 100-rule set is the
//! baseline: `bench/run.sh` divides each size's time by the baseline's for the same lookup.
//! The rule sets are generated and compiled outside the timed loop, once per size (see
//! `flowgate_bench::generate_rules` for their shape). The bench counts live heap bytes
//! (`flowgate_bench::heap`) so that setup can print what each rule set and its index hold.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flowgate_bench::ClassifyFixture;
use flowgate_bench::heap::Counting;

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn mib(bytes: Option<i64>) -> String {
    bytes.map_or_else(|| "not measured".into(), |b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
}

fn classify(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (size, n) in [("baseline-100-rules", 100), ("10k-rules", 10_000), ("1m-rules", 1_000_000)] {
        let fixture = ClassifyFixture::build(n).expect("generating and compiling the rule set");
        let covering = fixture.lookups().map(|(name, f)| format!("{name} {}", fixture.covering_rules(f)));
        eprintln!(
            "classify: {n} rules generated in {:.2?}, compiled in {:.2?}; rules covering each lookup's address: {}",
            fixture.generated_in,
            fixture.compiled_in,
            covering.join(", ")
        );
        // The names are a shared copy of each rule's name (`Arc<str>`: two counts and the text,
        // rounded up to the counts' alignment), whatever the index: subtracting them leaves
        // what the index itself costs.
        let names: usize = fixture
            .rules
            .rules()
            .iter()
            .map(|r| size_of::<std::sync::Arc<str>>() + (16 + r.name.len()).next_multiple_of(8))
            .sum();
        eprintln!(
            "classify: {n} rules hold {} of heap; compiling adds {}: {} of shared names, the index the rest ({} by its own count)",
            mib(fixture.rules_heap),
            mib(fixture.index_heap),
            mib(Some(names as i64)),
            mib(Some(fixture.rules.index_bytes() as i64))
        );
        for (lookup, flow) in fixture.lookups() {
            let rules = &fixture.rules;
            group.bench_with_input(BenchmarkId::new(size, lookup), flow, |b, flow| {
                b.iter(|| black_box(rules).classify(black_box(flow)))
            });
        }
        // The fixture (a million rules at the largest size) is dropped here, untimed.
    }
    group.finish();
}

criterion_group!(benches, classify);
criterion_main!(benches);
