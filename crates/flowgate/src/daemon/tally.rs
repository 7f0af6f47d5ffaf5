//! What a queue worker counts beside the engine's own counters, for `flowgate stats` and the
//! metrics: how long its packets waited for their verdicts, first verdicts by rule, later
//! verdict changes by source, and closed flows by reason.
//!
//! Plain counters owned by one worker and published with its other stats after each wake-up
//! (under that worker's own lock, see [`super::shard`]): nothing here is shared between queues
//! and nothing takes a lock on the per-packet path. The latency histogram costs one search in
//! 16 bounds per packet (the worker reads the clock); everything else is counted from the events
//! the worker hands to the writer, so once per flow or verdict change, never per packet.
//!
//! A rule's counts are keyed by the name the engine shares into its events: a rule's first
//! verdict adds its entry (an `Arc` clone, once per rule), the next ones find it by hash. Only
//! the entries that changed since the last wake-up are copied out, so publishing costs what the
//! wake-up's new flows cost, however many rules there are. When a reload changes the rule set,
//! the entries of rules that are gone are forgotten, so the names counted are those of the rules
//! in force plus the engine's own `default`, `provider` and `kept`: bounded by the config,
//! whatever the traffic. This room touches only its counters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flowgate_core::FlowVerdict;
use flowgate_core::event::{CloseReason, EventKind, RuleName, UpdateSource};
use flowgate_core::rules::matcher::CompiledRules;
use serde::Serialize;

/// Upper bounds of the verdict latency buckets, in nanoseconds: 1 µs to 100 ms, 1-2.5-5 per
/// decade. A last bucket holds everything slower.
pub(crate) const LATENCY_BOUNDS_NS: [u64; 16] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// Buckets of the histogram: one per bound and one past the last.
pub(crate) const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_NS.len() + 1;

/// Names the engine gives verdicts no rule gave (see `flowgate_core::Engine`).
pub(crate) const ENGINE_RULE_NAMES: [&str; 3] = ["default", "provider", "kept"];

/// A histogram of verdict latencies: packets per bucket (not cumulative), their sum and count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Latency {
    pub(crate) buckets: [u64; LATENCY_BUCKETS],
    pub(crate) sum_ns: u64,
    pub(crate) count: u64,
}

impl Latency {
    /// Counts one packet that waited `d` for its verdict.
    pub(crate) fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // The first bound at or above `ns`: bucket `i` holds `bounds[i-1] < ns <= bounds[i]`.
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.count += 1;
    }

    /// Adds another histogram's counts to this one.
    pub(crate) fn merge(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.count += other.count;
    }

    /// The upper bound (ns) of the bucket that holds the `q` quantile: `None` when nothing was
    /// counted, `Some(None)` when it lies past the last bound.
    pub(crate) fn quantile(&self, q: f64) -> Option<Option<u64>> {
        if self.count == 0 {
            return None;
        }
        // The rank of the quantile, at least the first packet.
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_NS.get(i).copied());
            }
        }
        Some(None)
    }

    /// The upper bound (ns) of the slowest bucket with a packet in it (as [`Latency::quantile`]).
    pub(crate) fn max(&self) -> Option<Option<u64>> {
        let i = self.buckets.iter().rposition(|&n| n > 0)?;
        Some(LATENCY_BOUNDS_NS.get(i).copied())
    }

    /// The histogram with its bounds and a summary, as `flowgate stats` shows the total: p50,
    /// p99 and max are the upper bounds of their buckets in µs (`null` past the last bound, or
    /// when nothing was counted).
    pub(crate) fn summary(&self) -> serde_json::Value {
        let us = |b: Option<Option<u64>>| b.flatten().map(|ns| ns as f64 / 1000.0);
        serde_json::json!({
            "bounds_us": LATENCY_BOUNDS_NS.map(|ns| ns as f64 / 1000.0),
            "buckets": self.buckets,
            "count": self.count,
            "sum_ns": self.sum_ns,
            "p50_us": us(self.quantile(0.5)),
            "p99_us": us(self.quantile(0.99)),
            "max_us": us(self.max()),
        })
    }
}

/// First verdicts given by one rule (or by `default`, `provider`, `kept`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct RuleVerdicts {
    pub(crate) rule: RuleName,
    pub(crate) allow: u64,
    pub(crate) drop: u64,
    pub(crate) inspect: u64,
    pub(crate) pause: u64,
}

impl RuleVerdicts {
    fn new(rule: RuleName) -> RuleVerdicts {
        RuleVerdicts { rule, allow: 0, drop: 0, inspect: 0, pause: 0 }
    }

    fn count(&mut self, v: FlowVerdict) {
        match v {
            FlowVerdict::Allow => self.allow += 1,
            FlowVerdict::Drop => self.drop += 1,
            FlowVerdict::Inspect => self.inspect += 1,
            FlowVerdict::Pause => self.pause += 1,
        }
    }

    /// Takes `from`'s counts (same rule).
    fn set_counts(&mut self, from: &RuleVerdicts) {
        (self.allow, self.drop, self.inspect, self.pause) = (from.allow, from.drop, from.inspect, from.pause);
    }
}

/// Verdict changes to one verdict, by who made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct BySource {
    pub(crate) provider: u64,
    pub(crate) handle: u64,
    pub(crate) peek: u64,
    pub(crate) rules: u64,
    pub(crate) host: u64,
    pub(crate) overlap: u64,
    pub(crate) timeout: u64,
}

/// Verdict changes (`flow.update`), by new verdict and source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Updates {
    pub(crate) allow: BySource,
    pub(crate) drop: BySource,
    pub(crate) inspect: BySource,
    pub(crate) pause: BySource,
}

impl Updates {
    fn count(&mut self, v: FlowVerdict, source: UpdateSource) {
        let to = match v {
            FlowVerdict::Allow => &mut self.allow,
            FlowVerdict::Drop => &mut self.drop,
            FlowVerdict::Inspect => &mut self.inspect,
            FlowVerdict::Pause => &mut self.pause,
        };
        match source {
            UpdateSource::Provider => to.provider += 1,
            UpdateSource::Handle => to.handle += 1,
            UpdateSource::Peek => to.peek += 1,
            UpdateSource::Rules => to.rules += 1,
            UpdateSource::Host => to.host += 1,
            UpdateSource::Overlap => to.overlap += 1,
            UpdateSource::Timeout => to.timeout += 1,
        }
    }
}

/// Closed flows by reason (the `reason` of `flow.closed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Closed {
    pub(crate) fin: u64,
    pub(crate) rst: u64,
    pub(crate) idle: u64,
    pub(crate) conntrack: u64,
    pub(crate) end: u64,
    pub(crate) reused: u64,
}

impl Closed {
    fn count(&mut self, r: CloseReason) {
        match r {
            CloseReason::Fin => self.fin += 1,
            CloseReason::Rst => self.rst += 1,
            CloseReason::Idle => self.idle += 1,
            CloseReason::Conntrack => self.conntrack += 1,
            CloseReason::End => self.end += 1,
            CloseReason::Reused => self.reused += 1,
        }
    }
}

/// What a worker publishes of its tally (part of its stats).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Counts {
    pub(crate) latency: Latency,
    pub(crate) verdicts: Vec<RuleVerdicts>,
    pub(crate) updates: Updates,
    pub(crate) closed: Closed,
}

impl Counts {
    /// Several workers' counts added up (counts by rule by name, in order of first appearance).
    pub(crate) fn sum<'a>(all: impl IntoIterator<Item = &'a Counts>) -> Counts {
        let mut out = Counts::default();
        for c in all {
            out.latency.merge(&c.latency);
            for r in &c.verdicts {
                match out.verdicts.iter_mut().find(|o| o.rule == r.rule) {
                    Some(o) => {
                        o.allow += r.allow;
                        o.drop += r.drop;
                        o.inspect += r.inspect;
                        o.pause += r.pause;
                    }
                    None => out.verdicts.push(r.clone()),
                }
            }
            for (o, u) in [
                (&mut out.updates.allow, c.updates.allow),
                (&mut out.updates.drop, c.updates.drop),
                (&mut out.updates.inspect, c.updates.inspect),
                (&mut out.updates.pause, c.updates.pause),
            ] {
                o.provider += u.provider;
                o.handle += u.handle;
                o.peek += u.peek;
                o.rules += u.rules;
                o.host += u.host;
                o.overlap += u.overlap;
                o.timeout += u.timeout;
            }
            let (o, k) = (&mut out.closed, c.closed);
            o.fin += k.fin;
            o.rst += k.rst;
            o.idle += k.idle;
            o.conntrack += k.conntrack;
            o.end += k.end;
            o.reused += k.reused;
        }
        out
    }
}

/// A worker's own counters (see the module documentation).
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) latency: Latency,
    updates: Updates,
    closed: Closed,
    /// First verdicts by rule, and where each rule's entry is.
    rules: Vec<RuleVerdicts>,
    index: HashMap<RuleName, usize>,
    /// Entries of `rules` changed since the last publication (each once: `changed_flag`).
    changed: Vec<usize>,
    changed_flag: Vec<bool>,
    /// Entries were forgotten: the next publication copies them all.
    renumbered: bool,
    /// The rule set whose names are counted (the engine's, compared by pointer).
    rule_set: Option<Arc<CompiledRules>>,
}

impl Tally {
    /// Counts what an event says: a first verdict by rule, a verdict change, a close.
    pub(crate) fn count(&mut self, e: &EventKind) {
        match e {
            EventKind::FlowVerdict { verdict, rule, .. } => {
                let Some(rule) = rule else { return };
                let i = match self.index.get(rule) {
                    Some(&i) => i,
                    None => {
                        self.rules.push(RuleVerdicts::new(rule.clone()));
                        self.changed_flag.push(false);
                        self.index.insert(rule.clone(), self.rules.len() - 1);
                        self.rules.len() - 1
                    }
                };
                if let Some(r) = self.rules.get_mut(i) {
                    r.count(*verdict);
                }
                if let Some(flag) = self.changed_flag.get_mut(i)
                    && !*flag
                {
                    *flag = true;
                    self.changed.push(i);
                }
            }
            EventKind::FlowUpdate { verdict, source, .. } => self.updates.count(*verdict, *source),
            EventKind::FlowClosed { report, .. } => self.closed.count(report.reason),
            EventKind::FlowNew { .. } => {}
        }
    }

    /// Follows the engine's rule set: after a reload, the rules that are gone are no longer
    /// counted (the first call only notes the set).
    pub(crate) fn follow(&mut self, rules: &Arc<CompiledRules>) {
        if self.rule_set.as_ref().is_some_and(|r| Arc::ptr_eq(r, rules)) {
            return;
        }
        let first = self.rule_set.is_none();
        self.rule_set = Some(rules.clone());
        if first {
            return;
        }
        let names: HashSet<&str> =
            (0..rules.rules().len()).filter_map(|i| rules.name(i).map(|n| &**n)).chain(ENGINE_RULE_NAMES).collect();
        let before = self.rules.len();
        self.rules.retain(|r| names.contains(&*r.rule));
        if self.rules.len() != before {
            self.index = self.rules.iter().enumerate().map(|(i, r)| (r.rule.clone(), i)).collect();
            self.changed.clear();
            self.changed_flag = vec![false; self.rules.len()];
            self.renumbered = true;
        }
    }

    /// Copies the counters into `to`, which only this tally writes: of the counts by rule, the
    /// new entries and those that changed (all of them after a reload forgot some).
    pub(crate) fn publish(&mut self, to: &mut Counts) {
        to.latency = self.latency;
        to.updates = self.updates;
        to.closed = self.closed;
        if std::mem::take(&mut self.renumbered) {
            to.verdicts.clone_from(&self.rules);
        }
        // New entries are at the end, in order.
        if let Some(new) = self.rules.get(to.verdicts.len()..) {
            to.verdicts.extend_from_slice(new);
        }
        for i in self.changed.drain(..) {
            if let (Some(out), Some(r)) = (to.verdicts.get_mut(i), self.rules.get(i)) {
                out.set_counts(r);
            }
            if let Some(flag) = self.changed_flag.get_mut(i) {
                *flag = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_core::event::{FlowReport, RuleName};
    use flowgate_core::rules::{Action, Rule, RuleSet};
    use flowgate_core::{Counters, Direction, Flow, FlowId, Protocol};

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn latencies_land_in_the_bucket_of_the_first_bound_at_or_above_them() {
        let mut h = Latency::default();
        for d in [Duration::ZERO, us(1), Duration::from_nanos(1_001), us(3), us(100), us(101), Duration::from_secs(1)] {
            h.record(d);
        }
        assert_eq!(&h.buckets[..4], &[2, 1, 1, 0], "0 and 1 µs; 1.001 µs; 3 µs");
        assert_eq!(h.buckets[6], 1, "100 µs is at most 100 µs");
        assert_eq!(h.buckets[7], 1, "101 µs is in the 250 µs bucket");
        assert_eq!(h.buckets[LATENCY_BUCKETS - 1], 1, "1 s is past the last bound");
        assert_eq!(h.count, 7);
        assert_eq!(h.sum_ns, 1_000 + 1_001 + 3_000 + 100_000 + 101_000 + 1_000_000_000);
        assert_eq!(h.buckets.iter().sum::<u64>(), h.count);
    }

    #[test]
    fn quantiles_and_the_max_name_their_buckets_upper_bound() {
        let mut h = Latency::default();
        assert_eq!((h.quantile(0.5), h.max()), (None, None), "nothing counted");
        for _ in 0..98 {
            h.record(us(20));
        }
        h.record(us(400));
        h.record(us(3_000));
        assert_eq!(h.quantile(0.5), Some(Some(25_000)));
        assert_eq!(h.quantile(0.98), Some(Some(25_000)));
        assert_eq!(h.quantile(0.99), Some(Some(500_000)));
        assert_eq!(h.quantile(1.0), Some(Some(5_000_000)));
        assert_eq!(h.max(), Some(Some(5_000_000)));
        h.record(Duration::from_millis(150));
        assert_eq!(h.max(), Some(None), "past the last bound");
        let mut sum = Latency::default();
        sum.merge(&h);
        sum.merge(&h);
        assert_eq!((sum.count, sum.buckets[4], sum.sum_ns), (2 * h.count, 2 * 98, 2 * h.sum_ns));
    }

    fn flow() -> Flow {
        Flow {
            id: FlowId(1),
            protocol: Protocol::Tcp,
            direction: Direction::Outbound,
            local: "198.51.100.1:40000".parse().expect("addr"),
            remote: "203.0.113.10:7".parse().expect("addr"),
            interface: None,
            existing: false,
            forwarded: false,
            icmp: None,
            owner: None,
            host: None,
            started: flowgate_core::Instant::ZERO,
        }
    }

    fn verdict(v: FlowVerdict, rule: &RuleName) -> EventKind {
        EventKind::FlowVerdict { flow: flow(), verdict: v, rule: Some(rule.clone()), peek: None }
    }

    fn rules(names: &[&str]) -> Arc<CompiledRules> {
        let rules = names.iter().map(|n| Rule::new(n.to_string(), Action::Drop)).collect();
        Arc::new(CompiledRules::compile(RuleSet { rules, default_action: Action::Allow }))
    }

    #[test]
    fn events_are_counted_by_rule_verdict_source_and_reason() {
        let mut t = Tally::default();
        let (web, default): (RuleName, RuleName) = ("web".into(), "default".into());
        t.count(&verdict(FlowVerdict::Drop, &web));
        t.count(&verdict(FlowVerdict::Drop, &web));
        t.count(&verdict(FlowVerdict::Allow, &default));
        t.count(&EventKind::FlowNew { flow: flow() });
        t.count(&EventKind::FlowUpdate {
            flow: flow(),
            verdict: FlowVerdict::Drop,
            rule: None,
            direction: None,
            source: UpdateSource::Handle,
        });
        let report = |reason| FlowReport {
            reason,
            verdict: FlowVerdict::Allow,
            rule: None,
            counters: Counters::default(),
            duration_ms: 0,
        };
        t.count(&EventKind::FlowClosed { flow: flow(), report: report(CloseReason::Fin) });
        t.count(&EventKind::FlowClosed { flow: flow(), report: report(CloseReason::Conntrack) });
        let mut out = Counts::default();
        t.publish(&mut out);
        let by: Vec<(&str, u64, u64)> = out.verdicts.iter().map(|r| (&*r.rule, r.allow, r.drop)).collect();
        assert_eq!(by, [("web", 0, 2), ("default", 1, 0)]);
        assert_eq!(out.updates.drop.handle, 1);
        assert_eq!(out.updates.allow, BySource::default());
        assert_eq!((out.closed.fin, out.closed.conntrack, out.closed.rst), (1, 1, 0));
        let v = serde_json::to_value(&out).expect("json");
        assert_eq!(
            v["verdicts"][0],
            serde_json::json!({"rule": "web", "allow": 0, "drop": 2, "inspect": 0, "pause": 0})
        );
        assert_eq!(v["updates"]["drop"]["handle"], 1);
        assert_eq!(v["closed"]["fin"], 1);
        assert_eq!(v["latency"]["buckets"].as_array().map(Vec::len), Some(LATENCY_BUCKETS));
    }

    #[test]
    fn a_reload_forgets_the_rules_that_are_gone_and_keeps_the_engines_names() {
        let mut t = Tally::default();
        let first = rules(&["a", "b"]);
        t.follow(&first);
        for name in ["a", "b", "default", "kept", "provider"] {
            t.count(&verdict(FlowVerdict::Drop, &name.into()));
        }
        t.follow(&first);
        let mut out = Counts::default();
        t.publish(&mut out);
        assert_eq!(out.verdicts.len(), 5, "the same rule set forgets nothing");
        t.follow(&rules(&["b", "c"]));
        assert!(t.renumbered, "all of them are copied next time");
        t.publish(&mut out);
        let names: Vec<&str> = out.verdicts.iter().map(|r| &*r.rule).collect();
        assert_eq!(names, ["b", "default", "kept", "provider"]);
        // Counting goes on under the new names, through the rebuilt index.
        t.count(&verdict(FlowVerdict::Allow, &"c".into()));
        t.count(&verdict(FlowVerdict::Drop, &"b".into()));
        t.publish(&mut out);
        let by: Vec<(&str, u64, u64)> = out.verdicts.iter().map(|r| (&*r.rule, r.allow, r.drop)).collect();
        assert_eq!(by, [("b", 0, 2), ("default", 0, 1), ("kept", 0, 1), ("provider", 0, 1), ("c", 1, 0)]);
    }

    #[test]
    fn workers_counts_add_up_by_rule_name() {
        let mut a = Tally::default();
        let mut b = Tally::default();
        a.count(&verdict(FlowVerdict::Drop, &"x".into()));
        b.count(&verdict(FlowVerdict::Allow, &"default".into()));
        b.count(&verdict(FlowVerdict::Drop, &"x".into()));
        a.latency.record(us(3));
        b.latency.record(us(300));
        let (mut ca, mut cb) = (Counts::default(), Counts::default());
        a.publish(&mut ca);
        b.publish(&mut cb);
        let sum = Counts::sum([&ca, &cb]);
        let by: Vec<(&str, u64, u64)> = sum.verdicts.iter().map(|r| (&*r.rule, r.allow, r.drop)).collect();
        assert_eq!(by, [("x", 0, 2), ("default", 1, 0)]);
        let s = sum.latency.summary();
        assert_eq!(
            (s["count"].as_u64(), s["p50_us"].as_f64(), s["max_us"].as_f64()),
            (Some(2), Some(5.0), Some(500.0))
        );
        assert_eq!(s["bounds_us"][0].as_f64(), Some(1.0));
        assert_eq!(Latency::default().summary()["p99_us"], serde_json::Value::Null);
    }

    #[test]
    fn each_publication_copies_the_new_and_changed_counts_by_rule() {
        let mut t = Tally::default();
        let mut out = Counts::default();
        t.count(&verdict(FlowVerdict::Drop, &"a".into()));
        t.publish(&mut out);
        t.count(&verdict(FlowVerdict::Drop, &"b".into()));
        t.count(&verdict(FlowVerdict::Allow, &"a".into()));
        t.count(&verdict(FlowVerdict::Allow, &"a".into()));
        t.latency.record(us(3));
        t.publish(&mut out);
        let by: Vec<(&str, u64, u64)> = out.verdicts.iter().map(|r| (&*r.rule, r.allow, r.drop)).collect();
        assert_eq!(by, [("a", 2, 1), ("b", 0, 1)]);
        assert_eq!(out.latency.count, 1);
        assert!(t.changed.is_empty() && t.changed_flag.iter().all(|f| !f), "nothing left to copy");
        t.publish(&mut out);
        assert_eq!(out.verdicts.len(), 2, "an idle publication changes nothing");
        // A published entry was changed in place only by its own tally.
        t.count(&verdict(FlowVerdict::Pause, &"b".into()));
        t.publish(&mut out);
        assert_eq!((out.verdicts[1].pause, out.verdicts[0].allow), (1, 2));
    }
}
