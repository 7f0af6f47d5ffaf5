//! Suricata EVE JSON: flowgate's events as the records Suricata writes, so Suricata's tools and
//! Filebeat's Suricata module take them as they are.
//!
//! Checked against the EVE JSON schema of Suricata 8.0.7 (`etc/schema.json`), which allows no
//! property it does not name, at the top level or in its objects: flowgate's own facts go where
//! Suricata keeps such things, not in an object of their own.
//!
//! - `flow.closed` → an `event_type: "flow"` record, as Suricata logs a flow when it ends:
//!   `flow` {`pkts_toserver`, `pkts_toclient`, `bytes_toserver`, `bytes_toclient` (to the
//!   server = from the end that opened the flow), `start`, `end`, `age` (whole seconds),
//!   `state` (`closed` after FIN or RST, `established` when both ends sent, else `new`),
//!   `reason` (`timeout` for FIN, RST, idle and conntrack's end, all of which Suricata logs at
//!   its flow timeout; `shutdown` at the end of a capture or a stop; `tcp_reuse` for a reused
//!   4-tuple), `alerted` (the flow ended dropped), `action` (`accept` or `drop`, the verdict it
//!   ended with; absent while inspected or paused)};
//! - `flow.verdict` and `flow.update` that drop the flow → an `event_type: "drop"` record, as
//!   Suricata logs a dropped packet in IPS mode: `drop.reason` (`firewall rules`, `firewall
//!   default packet policy` for the default action, `firewall flow drop` for a live flow dropped
//!   by a handle, a provider or an inspection), `verdict.action` `drop`, and an `alert` object
//!   as Suricata's drop log adds (`action` `blocked`, `signature` = the rule's name, or the
//!   update's source when no rule decided, `category`, `severity` 3);
//! - `flow.new`, and verdicts that allow, inspect or pause, make no record (Suricata has none
//!   for them; the closing `flow` record tells how the flow ended).
//!
//! Every record has Suricata's header: `timestamp` (Suricata's `2023-11-14T22:13:20.123456+0000`,
//! in UTC), `flow_id` (flowgate's flow id), `in_iface` (where known), `src_ip`/`src_port` (the
//! opener), `dest_ip`/`dest_port`, `ip_v`, `proto` (`TCP`, `UDP`, `ICMP`, `IPv6-ICMP`, IANA's
//! keyword, or the number), `icmp_type`/`icmp_code` for ICMP (which has no ports, as in
//! Suricata), `community_id`, and `metadata.flowvars` with flowgate's view: `flowgate.verdict`,
//! `flowgate.rule`, `flowgate.direction` (`outbound`, `inbound` or `forwarded`), and where they
//! apply `flowgate.reason` (the close reason) and `flowgate.existing`.

use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};

use crate::event::{CloseReason, Event, EventKind, RuleName, UpdateSource};
use crate::flow::{Flow, Protocol};
use crate::time::Instant;
use crate::verdict::FlowVerdict;

/// The records one event becomes (none, or one).
pub fn records(e: &Event) -> Vec<Value> {
    match &e.kind {
        EventKind::FlowClosed { flow, report } => {
            let outbound = flow.opener() == flow.local;
            let c = &report.counters;
            let (pkts_ts, pkts_tc, bytes_ts, bytes_tc) = if outbound {
                (c.packets_out, c.packets_in, c.bytes_out, c.bytes_in)
            } else {
                (c.packets_in, c.packets_out, c.bytes_in, c.bytes_out)
            };
            let state = match report.reason {
                CloseReason::Fin | CloseReason::Rst => "closed",
                _ if pkts_ts > 0 && pkts_tc > 0 => "established",
                _ => "new",
            };
            let reason = match report.reason {
                CloseReason::Fin | CloseReason::Rst | CloseReason::Idle | CloseReason::Conntrack => "timeout",
                CloseReason::End => "shutdown",
                CloseReason::Reused => "tcp_reuse",
            };
            let mut f = json!({
                "pkts_toserver": pkts_ts,
                "pkts_toclient": pkts_tc,
                "bytes_toserver": bytes_ts,
                "bytes_toclient": bytes_tc,
                "start": timestamp(flow.started),
                "end": timestamp(e.time),
                "age": (e.time.as_micros() / 1_000_000).saturating_sub(flow.started.as_micros() / 1_000_000),
                "state": state,
                "reason": reason,
                "alerted": report.verdict == FlowVerdict::Drop,
            });
            match report.verdict {
                FlowVerdict::Allow => f["action"] = json!("accept"),
                FlowVerdict::Drop => f["action"] = json!("drop"),
                FlowVerdict::Inspect | FlowVerdict::Pause => {}
            }
            let mut r = header(e.time, flow, "flow");
            r.insert("flow".into(), f);
            let reason = close_reason(report.reason);
            r.insert("metadata".into(), flowvars(flow, report.verdict, report.rule.as_ref(), Some(reason)));
            vec![Value::Object(r)]
        }
        EventKind::FlowVerdict { flow, verdict: FlowVerdict::Drop, rule, .. } => {
            let why =
                if rule.as_deref() == Some("default") { "firewall default packet policy" } else { "firewall rules" };
            vec![drop_record(e.time, flow, rule.as_ref(), None, why)]
        }
        EventKind::FlowUpdate { flow, verdict: FlowVerdict::Drop, rule, source, .. } => {
            let why = match source {
                UpdateSource::Rules | UpdateSource::Host => "firewall rules",
                UpdateSource::Overlap => "firewall stream evasion",
                UpdateSource::Handle | UpdateSource::Provider | UpdateSource::Peek | UpdateSource::Timeout => {
                    "firewall flow drop"
                }
            };
            vec![drop_record(e.time, flow, rule.as_ref(), Some(*source), why)]
        }
        EventKind::FlowNew { .. } | EventKind::FlowVerdict { .. } | EventKind::FlowUpdate { .. } => Vec::new(),
    }
}

fn drop_record(time: Instant, flow: &Flow, rule: Option<&RuleName>, source: Option<UpdateSource>, why: &str) -> Value {
    let source_name = source.map(UpdateSource::name);
    let signature =
        rule.map(|r| r.to_string()).or(source_name.map(str::to_string)).unwrap_or_else(|| "flowgate".into());
    let category = match source_name {
        None => "flowgate verdict".to_string(),
        Some(s) => format!("flowgate update ({s})"),
    };
    let mut r = header(time, flow, "drop");
    r.insert("drop".into(), json!({ "reason": why }));
    r.insert("verdict".into(), json!({ "action": "drop" }));
    r.insert(
        "alert".into(),
        json!({ "action": "blocked", "signature": signature, "category": category, "severity": 3 }),
    );
    r.insert("metadata".into(), flowvars(flow, FlowVerdict::Drop, rule, None));
    Value::Object(r)
}

/// Suricata's record header for a flow: time, ids, the 5-tuple as Suricata orients it (the
/// opener is the source), protocol and Community ID.
fn header(time: Instant, flow: &Flow, event_type: &str) -> Map<String, Value> {
    let (src, dst) = (flow.opener(), flow.responder());
    let number = flow.ip_protocol();
    let mut r = Map::new();
    r.insert("timestamp".into(), json!(timestamp(time)));
    r.insert("flow_id".into(), json!(flow.id.0));
    if let Some(i) = &flow.interface {
        r.insert("in_iface".into(), json!(i.as_ref()));
    }
    r.insert("event_type".into(), json!(event_type));
    r.insert("src_ip".into(), json!(src.ip().to_string()));
    let ports = matches!(flow.protocol, Protocol::Tcp | Protocol::Udp);
    if ports {
        r.insert("src_port".into(), json!(src.port()));
    }
    r.insert("dest_ip".into(), json!(dst.ip().to_string()));
    if ports {
        r.insert("dest_port".into(), json!(dst.port()));
    }
    r.insert("ip_v".into(), json!(if src.is_ipv6() { 6 } else { 4 }));
    let proto = super::iana_keyword(number).map_or_else(|| number.to_string(), str::to_string);
    r.insert("proto".into(), json!(proto));
    if let (Protocol::Icmp, Some((t, c))) = (flow.protocol, flow.icmp) {
        r.insert("icmp_type".into(), json!(t));
        r.insert("icmp_code".into(), json!(c));
    }
    r.insert("community_id".into(), json!(crate::community_id::of_flow(flow)));
    r
}

/// flowgate's own facts, as Suricata keeps a flow's variables (`metadata.flowvars`: a list of
/// one-entry objects with string values).
fn flowvars(flow: &Flow, verdict: FlowVerdict, rule: Option<&RuleName>, reason: Option<&str>) -> Value {
    let direction = if flow.forwarded { "forwarded" } else { flow.direction.name() };
    let mut vars = vec![json!({ "flowgate.verdict": verdict.name() })];
    if let Some(r) = rule {
        vars.push(json!({ "flowgate.rule": r.as_ref() }));
    }
    vars.push(json!({ "flowgate.direction": direction }));
    if let Some(r) = reason {
        vars.push(json!({ "flowgate.reason": r }));
    }
    if flow.existing {
        vars.push(json!({ "flowgate.existing": "true" }));
    }
    json!({ "flowvars": vars })
}

fn close_reason(r: CloseReason) -> &'static str {
    match r {
        CloseReason::Fin => "fin",
        CloseReason::Rst => "rst",
        CloseReason::Idle => "idle",
        CloseReason::End => "end",
        CloseReason::Reused => "reused",
        CloseReason::Conntrack => "conntrack",
    }
}

/// Suricata's timestamp: ISO 8601 with microseconds and a numeric UTC offset (`+0000`: flowgate
/// writes UTC; Suricata writes the sensor's local offset, which its readers accept either way).
pub fn timestamp(t: Instant) -> String {
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(t.as_micros());
    let mut s = humantime::format_rfc3339_micros(at).to_string();
    if s.ends_with('Z') {
        s.pop();
        s.push_str("+0000");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::FlowReport;
    use crate::flow::{Counters, Direction, FlowId};

    fn flow(protocol: Protocol, direction: Direction, local: &str, remote: &str) -> Flow {
        Flow {
            id: FlowId(42),
            protocol,
            direction,
            local: local.parse().expect("local"),
            remote: remote.parse().expect("remote"),
            interface: Some("veth1".into()),
            existing: false,
            forwarded: false,
            started: Instant::from_unix(1_700_000_000, 500_000_000),
            icmp: (protocol == Protocol::Icmp).then_some((8, 0)),
            owner: None,
            host: None,
        }
    }

    fn closed(flow: Flow, reason: CloseReason, verdict: FlowVerdict) -> Event {
        let counters =
            Counters { packets_out: 3, packets_in: 2, bytes_out: 300, bytes_in: 200, payload_out: 10, payload_in: 20 };
        let report = FlowReport { reason, verdict, rule: Some("r1".into()), counters, duration_ms: 2500 };
        Event { time: Instant::from_unix(1_700_000_003, 0), kind: EventKind::FlowClosed { flow, report } }
    }

    #[test]
    fn a_closed_inbound_tcp_flow_is_a_suricata_flow_record_from_the_opener() {
        let f = flow(Protocol::Tcp, Direction::Inbound, "198.51.100.1:22", "203.0.113.9:50000");
        let r = records(&closed(f, CloseReason::Fin, FlowVerdict::Allow));
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r["event_type"], "flow");
        assert_eq!(r["timestamp"], "2023-11-14T22:13:23.000000+0000");
        assert_eq!((r["src_ip"].as_str(), r["src_port"].as_u64()), (Some("203.0.113.9"), Some(50000)));
        assert_eq!((r["dest_ip"].as_str(), r["dest_port"].as_u64()), (Some("198.51.100.1"), Some(22)));
        assert_eq!((r["proto"].as_str(), r["ip_v"].as_u64(), r["flow_id"].as_u64()), (Some("TCP"), Some(4), Some(42)));
        assert_eq!(r["in_iface"], "veth1");
        // To the server = from the remote opener = flowgate's inbound direction.
        let f = &r["flow"];
        assert_eq!((f["pkts_toserver"].as_u64(), f["bytes_toclient"].as_u64()), (Some(2), Some(300)));
        assert_eq!(
            (f["state"].as_str(), f["reason"].as_str(), f["action"].as_str()),
            (Some("closed"), Some("timeout"), Some("accept"))
        );
        assert_eq!((f["start"].as_str(), f["age"].as_u64()), (Some("2023-11-14T22:13:20.500000+0000"), Some(3)));
        assert_eq!(f["alerted"], false);
        assert!(r["community_id"].as_str().is_some_and(|c| c.starts_with("1:")));
        let vars = r["metadata"]["flowvars"].as_array().expect("flowvars");
        assert!(vars.contains(&json!({"flowgate.rule": "r1"})), "{vars:?}");
        assert!(vars.contains(&json!({"flowgate.direction": "inbound"})), "{vars:?}");
    }

    #[test]
    fn icmp_has_type_and_code_and_no_ports() {
        let f = flow(Protocol::Icmp, Direction::Outbound, "[2001:db8::1]:7", "[2001:db8::2]:7");
        let r = &records(&closed(f, CloseReason::Idle, FlowVerdict::Drop))[0];
        assert_eq!(r["proto"], "IPv6-ICMP");
        assert_eq!((r["icmp_type"].as_u64(), r["icmp_code"].as_u64()), (Some(8), Some(0)));
        assert!(r.get("src_port").is_none() && r.get("dest_port").is_none());
        assert_eq!((r["flow"]["state"].as_str(), r["flow"]["action"].as_str()), (Some("established"), Some("drop")));
        assert_eq!(r["flow"]["alerted"], true);
    }

    #[test]
    fn drops_make_drop_records_and_allows_make_none() {
        let f = flow(Protocol::Udp, Direction::Outbound, "198.51.100.1:5000", "203.0.113.9:53");
        let t = Instant::from_unix(1_700_000_001, 0);
        let verdict = |v: FlowVerdict, rule: &str| Event {
            time: t,
            kind: EventKind::FlowVerdict { flow: f.clone(), verdict: v, rule: Some(rule.into()), peek: None },
        };
        assert!(records(&verdict(FlowVerdict::Allow, "r")).is_empty());
        assert!(records(&Event { time: t, kind: EventKind::FlowNew { flow: f.clone() } }).is_empty());
        let d = &records(&verdict(FlowVerdict::Drop, "default"))[0];
        assert_eq!(d["event_type"], "drop");
        assert_eq!(d["drop"]["reason"], "firewall default packet policy");
        assert_eq!(
            (d["alert"]["action"].as_str(), d["alert"]["signature"].as_str()),
            (Some("blocked"), Some("default"))
        );
        let update = Event {
            time: t,
            kind: EventKind::FlowUpdate {
                flow: f,
                verdict: FlowVerdict::Drop,
                rule: None,
                direction: None,
                source: UpdateSource::Handle,
            },
        };
        let d = &records(&update)[0];
        assert_eq!(
            (d["drop"]["reason"].as_str(), d["alert"]["signature"].as_str()),
            (Some("firewall flow drop"), Some("handle"))
        );
        assert_eq!(d["verdict"]["action"], "drop");
    }
}
