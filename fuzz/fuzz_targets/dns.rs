//! `flowgate_core::sniff::dns::{message, tcp_message}` and `Message::resolved` on arbitrary
//! bytes: a datagram, and the same bytes as a TCP stream.
//!
//! Input: the datagram (also read as a stream, and framed with its length as DNS over TCP).
//! Checks beyond "never panics":
//! - a datagram is never `NeedMore`; framed with its length over TCP it reads the same, and
//!   every shorter prefix of the framed stream is `NeedMore`; the raw bytes as a stream agree
//!   with the datagram their length prefix frames;
//! - at most `MAX_ANSWERS` answers; every name (question, owners, CNAME targets) is normalized;
//! - `resolved` gives no more addresses than there are answers, each from an A/AAAA record of
//!   the message with a TTL no larger than that record's, and only for a successful response to
//!   an A or AAAA question;
//! - the message, encoded again (names uncompressed; records of other types with a class that
//!   is not IN and no data), reads back to the same question, answers and resolved addresses.
#![no_main]

use std::net::IpAddr;

use flowgate_core::sniff::Sniff;
use flowgate_core::sniff::dns::{
    MAX_ANSWERS, Message, RecordData, TYPE_A, TYPE_AAAA, TYPE_CNAME, message, tcp_message,
};
use flowgate_core::sniff::host_name;
use libfuzzer_sys::fuzz_target;

fn normalized(name: &str) -> bool {
    host_name(name.as_bytes()).as_deref() == Some(name)
}

fn wire_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn encode(m: &Message) -> Vec<u8> {
    let flags = (u16::from(m.response) << 15) | 0x0100 | u16::from(m.rcode);
    let mut out = Vec::new();
    for v in [m.id, flags, u16::from(m.question.is_some()), m.answers.len() as u16, 0, 0] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    if let Some(q) = &m.question {
        wire_name(&mut out, &q.name);
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
    }
    for r in &m.answers {
        wire_name(&mut out, &r.name);
        let (rtype, class, rdata) = match &r.data {
            RecordData::A(a) => (TYPE_A, 1u16, a.octets().to_vec()),
            RecordData::Aaaa(a) => (TYPE_AAAA, 1, a.octets().to_vec()),
            RecordData::Cname(target) => {
                let mut rdata = Vec::new();
                wire_name(&mut rdata, target);
                (TYPE_CNAME, 1, rdata)
            }
            // Class CH: whatever the type, it stays "other".
            RecordData::Other(t) => (*t, 3, Vec::new()),
        };
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&class.to_be_bytes());
        out.extend_from_slice(&r.ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    out
}

fn check(m: &Message) {
    assert!(m.answers.len() <= MAX_ANSWERS);
    if let Some(q) = &m.question {
        assert!(normalized(&q.name), "question {:?}", q.name);
    }
    for r in &m.answers {
        assert!(normalized(&r.name), "owner {:?}", r.name);
        if let RecordData::Cname(t) = &r.data {
            assert!(normalized(t), "target {t:?}");
        }
    }
    let resolved = m.resolved();
    assert!(resolved.len() <= m.answers.len(), "{} addresses from {} answers", resolved.len(), m.answers.len());
    if !resolved.is_empty() {
        let q = m.question.as_ref().expect("resolved without a question");
        assert!(m.response && m.rcode == 0 && (q.qtype == TYPE_A || q.qtype == TYPE_AAAA));
    }
    for (address, ttl) in &resolved {
        let from = m.answers.iter().any(|r| {
            let a = match r.data {
                RecordData::A(a) => IpAddr::V4(a),
                RecordData::Aaaa(a) => IpAddr::V6(a),
                _ => return false,
            };
            a == *address && *ttl <= r.ttl
        });
        assert!(from, "{address} (TTL {ttl}) is in no A/AAAA record with a TTL as large");
    }
}

fuzz_target!(|data: &[u8]| {
    let udp = message(data);
    assert_ne!(udp, Sniff::NeedMore, "a datagram needs more");
    if let Sniff::Found(m) = &udp {
        check(m);
        let again = encode(m);
        let Sniff::Found(back) = message(&again) else { panic!("re-encoded {m:?} does not read") };
        assert_eq!((back.id, back.response, back.rcode), (m.id, m.response, m.rcode));
        assert_eq!(back.question, m.question);
        assert_eq!(back.answers, m.answers);
        assert_eq!(back.resolved(), m.resolved());
    }

    if let Ok(len) = u16::try_from(data.len()) {
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(data);
        let tcp = tcp_message(&framed);
        assert_eq!(tcp, if data.len() < 12 { Sniff::NotThis } else { udp.clone() }, "over TCP");
        if data.len() >= 12 {
            let step = (framed.len() / 32).max(1);
            for cut in (0..framed.len()).step_by(step) {
                assert_eq!(tcp_message(&framed[..cut]), Sniff::NeedMore, "a prefix of {cut}");
            }
        }
    }

    let raw = tcp_message(data);
    if let [hi, lo, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let expected = if len < 12 { Sniff::NotThis } else { rest.get(..len).map_or(Sniff::NeedMore, message) };
        assert_eq!(raw, expected, "the stream and the datagram its prefix frames");
    } else {
        assert_eq!(raw, Sniff::NeedMore);
    }
});
