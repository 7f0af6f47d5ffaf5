//! OCSF: flowgate's events as OCSF Network Activity records (class 4001, category 4), schema
//! version [`OCSF_VERSION`] with the `security_control` profile (which brings `action`,
//! `disposition` and `firewall_rule`).
//!
//! One record per event; `activity_id` as fits it:
//!
//! | event | activity | action / disposition | status |
//! | --- | --- | --- | --- |
//! | `flow.new` | 1 Open | — | 1 Success |
//! | `flow.verdict` allow | 6 Traffic | 1 Allowed / 1 Allowed | 1 Success |
//! | `flow.verdict` drop | 5 Refuse | 2 Denied / 2 Blocked | 2 Failure |
//! | `flow.update` allow | 6 Traffic | 1 Allowed / 1 Allowed | 1 Success |
//! | `flow.update` drop | 3 Reset (cut by a middle device) | 2 Denied / 2 Blocked | 2 Failure |
//! | verdict or update inspect, pause | 6 Traffic | 99 Other (`Inspect`, `Pause`) / 14 Delayed | 1 Success |
//! | `flow.closed` | 2 Close | as the verdict it ended with | 1 Success |
//!
//! `type_uid` is 400100 + `activity_id`; `time` is the event's time in milliseconds since the
//! epoch; `severity_id` 1 (Informational). `src_endpoint` is the end that opened the flow,
//! `dst_endpoint` the other, each with `ip`, `port` (TCP and UDP only: an ICMP echo identifier
//! is no port) and, on the host's own end, `interface_name`. `connection_info`: `uid` (the flow
//! id), `protocol_name` (IANA's keyword in lower case: `tcp`, `udp`, `icmp`, `ipv6-icmp`),
//! `protocol_num`, `protocol_ver_id` (4 or 6), `direction`/`direction_id` (Inbound 1, Outbound 2,
//! Other 99 with `Forwarded` for a routed flow), `community_uid` (Community ID). Close records
//! add `traffic` {`packets_out`, `packets_in`, `bytes_out`, `bytes_in`, `packets`, `bytes`}
//! (out = from the source, as OCSF counts), `start_time`, `end_time`, `duration`.
//! `firewall_rule.name` is the rule that decided. `metadata`: `product` {`name` flowgate,
//! `vendor_name` flowgate, `version`}, `version` [`OCSF_VERSION`], `profiles`, `event_code` (the
//! flowgate event name). What OCSF has no attribute for goes to `unmapped.flowgate`: the
//! verdict, the update's source and direction, the peek sizes, the close reason, payload bytes,
//! `existing`, `forwarded`.

use serde_json::{Map, Value, json};

use crate::event::{Event, EventKind};
use crate::flow::{Flow, Protocol};
use crate::verdict::FlowVerdict;

/// The OCSF schema version the records follow (and are validated against in the tests).
pub const OCSF_VERSION: &str = "1.8.0";

/// The record for one event.
pub fn record(e: &Event) -> Value {
    let flow = e.kind.flow();
    let mut unmapped = Map::new();
    let (activity, verdict) = match &e.kind {
        EventKind::FlowNew { .. } => ((1, "Open"), None),
        EventKind::FlowVerdict { verdict, peek, .. } => {
            if let Some(p) = peek {
                unmapped.insert("peek".into(), json!({"outbound": p.outbound, "inbound": p.inbound}));
            }
            let a = if *verdict == FlowVerdict::Drop { (5, "Refuse") } else { (6, "Traffic") };
            (a, Some(*verdict))
        }
        EventKind::FlowUpdate { verdict, direction, source, .. } => {
            unmapped.insert("source".into(), json!(source.name()));
            if let Some(d) = direction {
                unmapped.insert("direction".into(), json!(d.name()));
            }
            let a = if *verdict == FlowVerdict::Drop { (3, "Reset") } else { (6, "Traffic") };
            (a, Some(*verdict))
        }
        EventKind::FlowClosed { report, .. } => {
            unmapped.insert("reason".into(), serde_json::to_value(report.reason).unwrap_or(Value::Null));
            unmapped.insert("payload_out".into(), json!(report.counters.payload_out));
            unmapped.insert("payload_in".into(), json!(report.counters.payload_in));
            ((2, "Close"), Some(report.verdict))
        }
    };
    let rule = match &e.kind {
        EventKind::FlowNew { .. } => None,
        EventKind::FlowVerdict { rule, .. } | EventKind::FlowUpdate { rule, .. } => rule.as_ref(),
        EventKind::FlowClosed { report, .. } => report.rule.as_ref(),
    };
    let time_ms = e.time.as_micros() / 1000;
    let mut r = Map::new();
    r.insert("class_uid".into(), json!(4001));
    r.insert("class_name".into(), json!("Network Activity"));
    r.insert("category_uid".into(), json!(4));
    r.insert("category_name".into(), json!("Network Activity"));
    r.insert("activity_id".into(), json!(activity.0));
    r.insert("activity_name".into(), json!(activity.1));
    r.insert("type_uid".into(), json!(400_100 + activity.0));
    r.insert("type_name".into(), json!(format!("Network Activity: {}", activity.1)));
    r.insert("time".into(), json!(time_ms));
    r.insert("timezone_offset".into(), json!(0));
    r.insert("severity_id".into(), json!(1));
    r.insert("severity".into(), json!("Informational"));
    let failed = verdict == Some(FlowVerdict::Drop) && !matches!(e.kind, EventKind::FlowClosed { .. });
    let (status_id, status) = if failed { (2, "Failure") } else { (1, "Success") };
    r.insert("status_id".into(), json!(status_id));
    r.insert("status".into(), json!(status));
    if let Some(v) = verdict {
        let (action_id, action, disposition_id, disposition) = match v {
            FlowVerdict::Allow => (1, "Allowed", 1, "Allowed"),
            FlowVerdict::Drop => (2, "Denied", 2, "Blocked"),
            FlowVerdict::Inspect => (99, "Inspect", 14, "Delayed"),
            FlowVerdict::Pause => (99, "Pause", 14, "Delayed"),
        };
        r.insert("action_id".into(), json!(action_id));
        r.insert("action".into(), json!(action));
        r.insert("disposition_id".into(), json!(disposition_id));
        r.insert("disposition".into(), json!(disposition));
        unmapped.insert("verdict".into(), json!(v.name()));
    }
    if let Some(rule) = rule {
        r.insert("firewall_rule".into(), json!({ "name": rule.as_ref() }));
    }
    let (src_local, dst_local) = (flow.opener() == flow.local, flow.responder() == flow.local);
    r.insert("src_endpoint".into(), endpoint(flow, flow.opener(), src_local));
    r.insert("dst_endpoint".into(), endpoint(flow, flow.responder(), dst_local && !src_local));
    r.insert("is_src_dst_assignment_known".into(), json!(true));
    r.insert("connection_info".into(), connection_info(flow));
    r.insert("start_time".into(), json!(flow.started.as_micros() / 1000));
    if let EventKind::FlowClosed { report, .. } = &e.kind {
        let c = &report.counters;
        let outbound = flow.opener() == flow.local;
        let (p_out, p_in, b_out, b_in) = if outbound {
            (c.packets_out, c.packets_in, c.bytes_out, c.bytes_in)
        } else {
            (c.packets_in, c.packets_out, c.bytes_in, c.bytes_out)
        };
        r.insert(
            "traffic".into(),
            json!({
                "packets_out": p_out, "packets_in": p_in, "bytes_out": b_out, "bytes_in": b_in,
                "packets": p_out + p_in, "bytes": b_out + b_in,
            }),
        );
        r.insert("end_time".into(), json!(time_ms));
        r.insert("duration".into(), json!(report.duration_ms));
    }
    r.insert(
        "metadata".into(),
        json!({
            "product": {"name": "flowgate", "vendor_name": "flowgate", "version": env!("CARGO_PKG_VERSION")},
            "version": OCSF_VERSION,
            "profiles": ["security_control"],
            "event_code": e.kind.name(),
        }),
    );
    unmapped.insert("event".into(), json!(e.kind.name()));
    unmapped.insert("flow_id".into(), json!(flow.id.0));
    unmapped.insert("existing".into(), json!(flow.existing));
    unmapped.insert("forwarded".into(), json!(flow.forwarded));
    r.insert("unmapped".into(), json!({ "flowgate": unmapped }));
    Value::Object(r)
}

fn endpoint(flow: &Flow, at: std::net::SocketAddr, host_side: bool) -> Value {
    let mut ep = Map::new();
    ep.insert("ip".into(), json!(at.ip().to_string()));
    if matches!(flow.protocol, Protocol::Tcp | Protocol::Udp) {
        ep.insert("port".into(), json!(at.port()));
    }
    if let (true, Some(i)) = (host_side, &flow.interface) {
        ep.insert("interface_name".into(), json!(i.as_ref()));
    }
    Value::Object(ep)
}

fn connection_info(flow: &Flow) -> Value {
    let number = flow.ip_protocol();
    let (direction_id, direction) = if flow.forwarded {
        (99, "Forwarded")
    } else {
        match flow.direction {
            crate::flow::Direction::Inbound => (1, "Inbound"),
            crate::flow::Direction::Outbound => (2, "Outbound"),
        }
    };
    let mut c = Map::new();
    c.insert("uid".into(), json!(flow.id.0.to_string()));
    if let Some(name) = super::iana_keyword(number) {
        c.insert("protocol_name".into(), json!(name.to_ascii_lowercase()));
    }
    c.insert("protocol_num".into(), json!(number));
    c.insert("protocol_ver_id".into(), json!(if flow.local.is_ipv6() { 6 } else { 4 }));
    c.insert("direction_id".into(), json!(direction_id));
    c.insert("direction".into(), json!(direction));
    c.insert("community_uid".into(), json!(crate::community_id::of_flow(flow)));
    Value::Object(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::UpdateSource;
    use crate::event::{CloseReason, FlowReport};
    use crate::flow::{Counters, Direction, FlowId};
    use crate::time::Instant;

    fn flow(direction: Direction) -> Flow {
        Flow {
            id: FlowId(7),
            protocol: Protocol::Tcp,
            direction,
            local: "198.51.100.1:40000".parse().expect("local"),
            remote: "203.0.113.7:443".parse().expect("remote"),
            interface: Some("eth0".into()),
            existing: false,
            forwarded: false,
            started: Instant::from_micros(1_700_000_000_123_456),
            icmp: None,
            owner: None,
            host: None,
        }
    }

    #[test]
    fn activities_follow_the_events() {
        let t = Instant::from_micros(1_700_000_001_000_999);
        let f = flow(Direction::Outbound);
        let ev = |kind| record(&Event { time: t, kind });
        let new = ev(EventKind::FlowNew { flow: f.clone() });
        assert_eq!((new["activity_id"].as_u64(), new["type_uid"].as_u64()), (Some(1), Some(400_101)));
        assert!(new.get("action_id").is_none());
        assert_eq!(new["time"], 1_700_000_001_000u64);
        let drop = ev(EventKind::FlowVerdict {
            flow: f.clone(),
            verdict: FlowVerdict::Drop,
            rule: Some("r".into()),
            peek: None,
        });
        assert_eq!(
            (drop["activity_id"].as_u64(), drop["action_id"].as_u64(), drop["disposition_id"].as_u64()),
            (Some(5), Some(2), Some(2))
        );
        assert_eq!(drop["firewall_rule"]["name"], "r");
        let cut = ev(EventKind::FlowUpdate {
            flow: f.clone(),
            verdict: FlowVerdict::Drop,
            rule: None,
            direction: Some(Direction::Inbound),
            source: UpdateSource::Handle,
        });
        assert_eq!((cut["activity_id"].as_u64(), cut["type_uid"].as_u64()), (Some(3), Some(400_103)));
        assert_eq!(cut["unmapped"]["flowgate"]["direction"], "inbound");
        let counters =
            Counters { packets_out: 5, packets_in: 4, bytes_out: 500, bytes_in: 400, payload_out: 0, payload_in: 0 };
        let report = FlowReport {
            reason: CloseReason::Rst,
            verdict: FlowVerdict::Allow,
            rule: None,
            counters,
            duration_ms: 877,
        };
        let close = ev(EventKind::FlowClosed { flow: f, report });
        assert_eq!((close["activity_id"].as_u64(), close["action_id"].as_u64()), (Some(2), Some(1)));
        assert_eq!(close["traffic"]["bytes_out"], 500);
        assert_eq!(close["traffic"]["packets"], 9);
        assert_eq!(close["src_endpoint"]["interface_name"], "eth0");
        assert!(close["dst_endpoint"].get("interface_name").is_none());
        assert_eq!(close["connection_info"]["direction_id"], 2);
        assert_eq!(close["connection_info"]["protocol_name"], "tcp");
        assert_eq!(close["metadata"]["event_code"], "flow.closed");
        assert_eq!(close["start_time"], 1_700_000_000_123u64);
    }

    #[test]
    fn an_inbound_flow_counts_from_the_remote_opener() {
        let f = flow(Direction::Inbound);
        let counters =
            Counters { packets_out: 5, packets_in: 4, bytes_out: 500, bytes_in: 400, payload_out: 0, payload_in: 0 };
        let report =
            FlowReport { reason: CloseReason::Fin, verdict: FlowVerdict::Drop, rule: None, counters, duration_ms: 1 };
        let r = record(&Event { time: Instant::ZERO, kind: EventKind::FlowClosed { flow: f, report } });
        assert_eq!(r["src_endpoint"]["ip"], "203.0.113.7");
        assert_eq!(r["dst_endpoint"]["interface_name"], "eth0");
        assert_eq!((r["traffic"]["bytes_out"].as_u64(), r["traffic"]["bytes_in"].as_u64()), (Some(400), Some(500)));
        assert_eq!(r["connection_info"]["direction"], "Inbound");
        assert_eq!(r["disposition"], "Blocked");
    }
}
