//! Flow events: what the engine reports, in the JSON-lines shape users and scripts rely on.
//!
//! Every event has `time` (RFC 3339, microseconds, UTC), `event` (`flow.new`, `flow.verdict`,
//! `flow.update`, `flow.closed`) and `flow` (id, protocol, direction, local, remote, interface,
//! existing). Verdict events add `verdict` and `rule`; close events add the reason, the last
//! verdict, and packets, IP bytes and payload bytes per direction. The serde shape here *is* the
//! wire format: the binary only writes one `serde_json` line per event.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::flow::{Counters, Direction, Flow};
use crate::time::Instant;
use crate::verdict::FlowVerdict;

/// One event, with the time it happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    #[serde(serialize_with = "ser_time")]
    pub time: Instant,
    #[serde(flatten)]
    pub kind: EventKind,
}

fn ser_time<S: serde::Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(t.as_micros());
    s.collect_str(&humantime::format_rfc3339_micros(at))
}

/// The name of the rule that gave a verdict; `"default"` for the default action.
pub type RuleName = Arc<str>;

/// Peek sizes of an inspect verdict.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peek {
    pub outbound: u32,
    pub inbound: u32,
}

/// Who changed a flow's verdict.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateSource {
    /// A provider's `data` or `data_complete` answer.
    Provider,
    /// A call on the [`crate::Handle`] (library, CLI, control API).
    Handle,
    /// The inspect window of a rule ended with nothing against the flow.
    Peek,
    /// A reload: the new rules drop the flow.
    Rules,
    /// The rules judged the flow again once its host name was known (or known not to come),
    /// or once an inspect rule's look at its first bytes ended.
    Host,
    /// Overlapping segments carried different bytes (an evasion attempt).
    Overlap,
    /// Held bytes waited longer than the hold timeout for a verdict.
    Timeout,
}

impl UpdateSource {
    pub fn name(self) -> &'static str {
        match self {
            UpdateSource::Provider => "provider",
            UpdateSource::Handle => "handle",
            UpdateSource::Peek => "peek",
            UpdateSource::Rules => "rules",
            UpdateSource::Host => "host",
            UpdateSource::Overlap => "overlap",
            UpdateSource::Timeout => "timeout",
        }
    }
}

/// Why a flow ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// Both sides sent FIN.
    Fin,
    /// A side sent RST.
    Rst,
    /// No packet for the protocol's idle timeout.
    Idle,
    /// The capture ended (replay) or the engine shut down with the flow open.
    End,
    /// A new connection reused the 4-tuple of a closing one.
    Reused,
    /// The kernel's connection tracking ended it (FIN, RST or its own timeout) while the kernel
    /// was handling the flow alone.
    Conntrack,
}

/// What a flow did, reported when it closes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowReport {
    pub reason: CloseReason,
    /// The flow's verdict when it closed.
    pub verdict: FlowVerdict,
    pub rule: Option<RuleName>,
    #[serde(flatten)]
    pub counters: Counters,
    pub duration_ms: u64,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event")]
pub enum EventKind {
    /// A flow was seen for the first time.
    #[serde(rename = "flow.new")]
    FlowNew { flow: Flow },
    /// The flow's first verdict (rules and providers combined).
    #[serde(rename = "flow.verdict")]
    FlowVerdict {
        flow: Flow,
        verdict: FlowVerdict,
        rule: Option<RuleName>,
        #[serde(skip_serializing_if = "Option::is_none")]
        peek: Option<Peek>,
    },
    /// A later change of verdict. `direction` is absent when both directions changed.
    #[serde(rename = "flow.update")]
    FlowUpdate {
        flow: Flow,
        verdict: FlowVerdict,
        rule: Option<RuleName>,
        #[serde(skip_serializing_if = "Option::is_none")]
        direction: Option<Direction>,
        source: UpdateSource,
    },
    /// The flow ended.
    #[serde(rename = "flow.closed")]
    FlowClosed {
        flow: Flow,
        #[serde(flatten)]
        report: FlowReport,
    },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::FlowNew { .. } => "flow.new",
            EventKind::FlowVerdict { .. } => "flow.verdict",
            EventKind::FlowUpdate { .. } => "flow.update",
            EventKind::FlowClosed { .. } => "flow.closed",
        }
    }

    pub fn flow(&self) -> &Flow {
        match self {
            EventKind::FlowNew { flow }
            | EventKind::FlowVerdict { flow, .. }
            | EventKind::FlowUpdate { flow, .. }
            | EventKind::FlowClosed { flow, .. } => flow,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{FlowId, Protocol};

    fn flow() -> Flow {
        Flow {
            id: FlowId(3),
            protocol: Protocol::Udp,
            direction: Direction::Inbound,
            local: "198.51.100.1:53".parse().expect("addr"),
            remote: "203.0.113.9:5000".parse().expect("addr"),
            interface: None,
            existing: false,
            forwarded: false,
            started: Instant::ZERO,
            icmp: None,
            owner: None,
            host: None,
        }
    }

    #[test]
    fn wire_shape_of_each_event() {
        let t = Instant::from_unix(1_700_000_000, 123_456_000);
        let v = serde_json::to_value(Event { time: t, kind: EventKind::FlowNew { flow: flow() } }).expect("json");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["event"], "flow.new");
        assert_eq!(v["flow"]["id"], 3);
        assert_eq!(v["flow"]["interface"], serde_json::Value::Null);
        assert_eq!(v["flow"]["existing"], false);

        let v = serde_json::to_value(Event {
            time: t,
            kind: EventKind::FlowVerdict {
                flow: flow(),
                verdict: FlowVerdict::Drop,
                rule: Some("r1".into()),
                peek: None,
            },
        })
        .expect("json");
        assert_eq!(
            (v["event"].as_str(), v["verdict"].as_str(), v["rule"].as_str()),
            (Some("flow.verdict"), Some("drop"), Some("r1"))
        );
        assert!(v.get("peek").is_none());

        let report = FlowReport {
            reason: CloseReason::Fin,
            verdict: FlowVerdict::Allow,
            rule: Some("default".into()),
            counters: Counters {
                packets_out: 1,
                packets_in: 2,
                bytes_out: 3,
                bytes_in: 4,
                payload_out: 5,
                payload_in: 6,
            },
            duration_ms: 7,
        };
        let v = serde_json::to_value(Event { time: t, kind: EventKind::FlowClosed { flow: flow(), report } })
            .expect("json");
        assert_eq!(v["event"], "flow.closed");
        assert_eq!(v["reason"], "fin");
        for (k, n) in [("packets_out", 1), ("packets_in", 2), ("bytes_out", 3), ("bytes_in", 4), ("duration_ms", 7)] {
            assert_eq!(v[k], n, "{k}");
        }
    }
}
