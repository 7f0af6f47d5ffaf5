//! `flowgate::config::parse(path, text)`: the TOML config loader behind `flowgate run`,
//! `flowgate replay --config` and `flowgate rules check`.
//!
//! Checks: no panic; an error names a line and column inside the text when it gives one, and
//! formats; a config that loads compiles into a matcher, lints, and has a rule line for each
//! rule, and its warnings point at lines of the text; the compiled index classifies flows built
//! from the rules' own addresses and ports exactly as trying the rules one by one does (the
//! matcher's documented contract: first match wins).
#![no_main]

use std::path::Path;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use flowgate_core::rules::matcher::{CompiledRules, rule_matches};
use flowgate_core::rules::{Action, lint};
use flowgate_core::{Direction, Flow, FlowId, Instant, Protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    // Lines as the loader counts them: one more than there are newlines.
    let lines = text.matches('\n').count() + 1;
    match flowgate::config::parse(path, text) {
        Err(e) => {
            let _ = e.to_string();
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= lines, "error line {line} outside a {lines}-line text: {e}");
            }
            if let Some(column) = e.column {
                assert!(column >= 1, "column {column}: {e}");
            }
        }
        Ok(config) => {
            assert_eq!(config.rule_lines.len(), config.rules.rules.len(), "one line per rule");
            for w in &config.warnings {
                assert!(w.line >= 1 && w.line <= lines, "warning line {} outside the text: {w}", w.line);
            }
            let _ = lint::lint(&config.rules);
            // The rules compile into the matcher the engine uses. (No engine is built: its flow
            // table is sized for `max_flows` up front, up to gigabytes.)
            let compiled = CompiledRules::compile(config.rules.clone());
            assert_eq!(compiled.rules().len(), config.rules.rules.len());
            classify_agrees_with_a_linear_scan(&compiled);
            let _ = flowgate::config::sync_interval(&config.engine.timeouts);
            // The kernel's part of the rules: ids in order and in range, every rule either in
            // the kernel or in user space, never both.
            for provider in [false, true] {
                let plan = flowgate_core::rules::kernel::KernelPlan::new(&config.rules, provider);
                for (k, e) in plan.entries.iter().enumerate() {
                    assert_eq!(usize::from(e.id), k + 1, "ids are handed out in order");
                    assert!(e.id <= flowgate_core::rules::kernel::MAX_IDS);
                    assert!(e.rule.is_none_or(|i| !plan.user_space.iter().any(|(u, _)| *u == i)));
                }
                let mut seen: Vec<usize> = plan.entries.iter().filter_map(|e| e.rule).collect();
                seen.dedup();
                seen.extend(plan.user_space.iter().map(|(i, _)| *i));
                seen.sort_unstable();
                assert_eq!(seen, (0..config.rules.rules.len()).collect::<Vec<_>>(), "every rule has one place");
            }
        }
    }
});

/// Flows at the edges of every rule (first and last address of each network, ends of each port
/// range, each protocol and direction, with and without the rule's interface), classified by
/// the index and by a linear scan.
fn classify_agrees_with_a_linear_scan(c: &CompiledRules) {
    let rules = c.rules();
    let mut addrs: Vec<IpAddr> = vec!["198.51.100.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
    let mut ports: Vec<u16> = vec![0, 443];
    let mut ifaces: Vec<Option<Arc<str>>> = vec![None, Some("eth0".into())];
    for r in rules.iter().take(16) {
        for n in r.remote.iter().chain(&r.local).take(4) {
            addrs.extend([n.network(), n.broadcast()]);
        }
        for p in [&r.remote_ports, &r.local_ports].into_iter().flatten() {
            for &(lo, hi) in p.ranges().iter().take(2) {
                ports.extend([lo, hi]);
            }
        }
        if let Some(i) = &r.interface {
            ifaces.push(Some(i.as_str().into()));
        }
    }
    addrs.truncate(12);
    ports.truncate(6);
    ifaces.truncate(3);
    let mut id = 0;
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Other(47)] {
        for direction in [Direction::Outbound, Direction::Inbound] {
            for &remote in &addrs {
                for &local in addrs.iter().filter(|a| a.is_ipv4() == remote.is_ipv4()).take(3) {
                    for &port in &ports {
                        for interface in &ifaces {
                            id += 1;
                            let flow = Flow {
                                id: FlowId(id),
                                protocol,
                                direction,
                                local: SocketAddr::new(local, port.wrapping_add(1)),
                                remote: SocketAddr::new(remote, port),
                                interface: interface.clone(),
                                existing: false,
                                forwarded: false,
                                started: Instant::ZERO,
                                icmp: None,
                                owner: None,
                                host: None,
                            };
                            let got = c.classify(&flow);
                            let want = rules.iter().position(|r| rule_matches(r, &flow));
                            assert_eq!(got.rule, want, "index and linear scan disagree on {flow:?}");
                            let action: Action = want.map_or(c.default_action(), |i| rules[i].action);
                            assert_eq!(got.action, action);
                        }
                    }
                }
            }
        }
    }
}
