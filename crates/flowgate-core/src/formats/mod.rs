//! Event formats: what one flow [`Event`] looks like on the wire, as JSON lines.
//!
//! Three formats (config key `event_format`):
//! - [`EventFormat::Flowgate`]: flowgate's own JSON lines, the serde shape of [`Event`] (see
//!   [`crate::event`]), one line per event;
//! - [`EventFormat::Eve`]: Suricata EVE JSON records that Suricata's tools and Filebeat's
//!   Suricata module take as they are (see [`eve`]): a `flow` record when a flow closes and a
//!   `drop` record when a flow is dropped; other events make no record;
//! - [`EventFormat::Ocsf`]: OCSF Network Activity (class 4001) records, one per event (see
//!   [`ocsf`]).
//!
//! EVE and OCSF records carry the flow's [`crate::community_id`]. Pure functions of the event:
//! no clock, no I/O; the caller hands in the buffer the lines are appended to.

pub mod eve;
pub mod ocsf;

use serde_json::Value;

use crate::event::Event;

/// Which shape events are written in.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// flowgate's JSON lines.
    #[default]
    Flowgate,
    /// Suricata EVE JSON.
    Eve,
    /// OCSF Network Activity.
    Ocsf,
}

impl EventFormat {
    /// The names the config accepts, for messages.
    pub const EXPECTED: &'static str = "flowgate, eve or ocsf";

    /// The format a config value names.
    pub fn parse(name: &str) -> Option<EventFormat> {
        match name {
            "flowgate" => Some(EventFormat::Flowgate),
            "eve" => Some(EventFormat::Eve),
            "ocsf" => Some(EventFormat::Ocsf),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            EventFormat::Flowgate => "flowgate",
            EventFormat::Eve => "eve",
            EventFormat::Ocsf => "ocsf",
        }
    }

    /// Appends the records `event` becomes to `out`, each a line of JSON ending in `\n` (JSON
    /// escapes newlines inside strings, so splitting at `\n` gives the records back). Returns
    /// how many records were written: EVE writes none for some events. On an error `out` is left
    /// as it was.
    pub fn write(self, event: &Event, out: &mut Vec<u8>) -> Result<usize, serde_json::Error> {
        let start = out.len();
        let result = match self {
            // The common case serializes the event directly, without a Value in between.
            EventFormat::Flowgate => serde_json::to_writer(&mut *out, event).map(|()| {
                out.push(b'\n');
                1
            }),
            EventFormat::Eve | EventFormat::Ocsf => {
                let records = self.records(event);
                records
                    .iter()
                    .try_for_each(|r| {
                        serde_json::to_writer(&mut *out, r)?;
                        out.push(b'\n');
                        Ok(())
                    })
                    .map(|()| records.len())
            }
        };
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    /// The records `event` becomes, as JSON values.
    pub fn records(self, event: &Event) -> Vec<Value> {
        match self {
            EventFormat::Flowgate => serde_json::to_value(event).into_iter().collect(),
            EventFormat::Eve => eve::records(event),
            EventFormat::Ocsf => vec![ocsf::record(event)],
        }
    }
}

/// IANA's keyword for an IP protocol number, as Suricata names protocols (its `proto`) and, in
/// lower case, OCSF (`protocol_name`): the protocols a host's flows commonly carry; others are
/// named by their number.
pub(crate) fn iana_keyword(protocol: u8) -> Option<&'static str> {
    Some(match protocol {
        1 => "ICMP",
        2 => "IGMP",
        4 => "IP-in-IP",
        6 => "TCP",
        17 => "UDP",
        33 => "DCCP",
        41 => "IPv6",
        46 => "RSVP",
        47 => "GRE",
        50 => "ESP",
        51 => "AH",
        58 => "IPv6-ICMP",
        88 => "EIGRP",
        89 => "OSPF",
        103 => "PIM",
        112 => "VRRP",
        115 => "L2TP",
        132 => "SCTP",
        136 => "UDPLite",
        137 => "MPLS-in-IP",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::flow::{Direction, Flow, FlowId, Protocol};
    use crate::time::Instant;

    fn new_event() -> Event {
        Event {
            time: Instant::from_unix(1_700_000_000, 0),
            kind: EventKind::FlowNew {
                flow: Flow {
                    id: FlowId(1),
                    protocol: Protocol::Tcp,
                    direction: Direction::Outbound,
                    local: "198.51.100.1:40000".parse().expect("addr"),
                    remote: "203.0.113.7:443".parse().expect("addr"),
                    interface: Some("eth0\nx".into()),
                    existing: false,
                    forwarded: false,
                    started: Instant::ZERO,
                    icmp: None,
                    owner: None,
                    host: None,
                },
            },
        }
    }

    #[test]
    fn names_round_trip() {
        for f in [EventFormat::Flowgate, EventFormat::Eve, EventFormat::Ocsf] {
            assert_eq!(EventFormat::parse(f.name()), Some(f));
        }
        assert_eq!(EventFormat::parse("json"), None);
        assert_eq!(EventFormat::default(), EventFormat::Flowgate);
    }

    #[test]
    fn every_record_is_one_line_and_flowgate_is_the_event_itself() {
        let e = new_event();
        let mut out = b"before\n".to_vec();
        assert_eq!(EventFormat::Flowgate.write(&e, &mut out).expect("flowgate"), 1);
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let v: Value = serde_json::from_str(lines[1]).expect("json");
        assert_eq!(v, serde_json::to_value(&e).expect("json"));
        // EVE has no record for a new flow; OCSF has one.
        let mut out = Vec::new();
        assert_eq!(EventFormat::Eve.write(&e, &mut out).expect("eve"), 0);
        assert!(out.is_empty());
        assert_eq!(EventFormat::Ocsf.write(&e, &mut out).expect("ocsf"), 1);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(out.last(), Some(&b'\n'));
    }
}
