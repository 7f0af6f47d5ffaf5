//! DNS sniffer: one DNS message (RFC 1035) over UDP or TCP, its question and answers, and the
//! addresses an answer gives the name that was asked, CNAME chains followed back to it.
//!
//! This room reads bytes and returns a [`Message`]; the names it learns are kept by
//! [`crate::dns_names`], not here.
//!
//! The reader is written here rather than taken from `simple-dns` 0.13 or `hickory-proto` 0.26
//! because a filter needs less, and needs it bounded, where both decode more: each decodes every
//! section and every record type of a message up front and refuses the whole message when any
//! record anywhere in it does not decode (an odd record in the additional section would hide the
//! answers), and `simple-dns` reserves room for as many records as the header announces before
//! reading one (a 12-byte datagram announcing 65,535 answers makes it reserve about 9 MB);
//! `hickory-proto` also brings a dozen dependencies (`url`, `idna`, `rand`, `tracing`, ...) for
//! what here is a header, one question and three record types. This reader reads the header,
//! the first question and at most [`MAX_ANSWERS`] answer records, skips the authority and
//! additional sections, and keeps A, AAAA and CNAME data (other types are kept as their type
//! number only).
//!
//! Names: compression pointers must point backwards (before the pointer itself), so following
//! them always ends; at most [`MAX_POINTERS`] are followed per name, and a name is at most 255
//! bytes on the wire. Names are normalized with [`host_name`]; a record whose name (or CNAME
//! target) does not normalize, or has a label with a `.` inside it (which would read as two
//! labels), is skipped: it can name no host. A question whose name does not normalize is
//! `None`. A message whose header or question section is cut or malformed is `NotThis`; an
//! answer record that is cut or malformed ends the answers read (those before it are kept).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{MAX_HOST_NAME, Sniff, host_name};

/// Most answer records read from one message. Real answers hold a few CNAMEs and a handful of
/// addresses (large CDNs answer with up to 8 or so); more is padding or an attempt to make every
/// flow pay for parsing it.
pub const MAX_ANSWERS: usize = 64;

/// Most compression pointers followed in one name. Pointers point backwards, so they cannot
/// loop; this only bounds the work a name can cost (a real name needs one, rarely two).
pub const MAX_POINTERS: usize = 16;

/// Longest CNAME chain followed from the question's name. Resolvers give up after 8 to 16
/// links; real chains (CDNs) have 2 or 3.
pub const MAX_CHAIN: usize = 12;

/// Record types.
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;

const HEADER: usize = 12;
const CLASS_IN: u16 = 1;

/// One DNS message: its header's id, QR bit and RCODE, the first question, and the answers read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: u16,
    /// The QR bit: a response (not a query).
    pub response: bool,
    /// The header's 4-bit RCODE (0 = no error, 3 = NXDOMAIN; EDNS's extended bits are not read).
    pub rcode: u8,
    /// The first question; `None` when there is none or its name does not normalize.
    pub question: Option<Question>,
    /// The answer records read (at most [`MAX_ANSWERS`]), in message order; records whose
    /// names do not normalize are left out.
    pub answers: Vec<Record>,
}

/// A question: the name asked about and the type asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Normalized by [`host_name`].
    pub name: String,
    pub qtype: u16,
}

/// An answer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The owner name, normalized by [`host_name`].
    pub name: String,
    /// As sent, in seconds (see [`Message::resolved`] for how it is read).
    pub ttl: u32,
    pub data: RecordData,
}

/// What an answer record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    /// An IN-class A record.
    A(Ipv4Addr),
    /// An IN-class AAAA record.
    Aaaa(Ipv6Addr),
    /// An IN-class CNAME record: the canonical name, normalized by [`host_name`].
    Cname(String),
    /// Any other record (its type), including A/AAAA/CNAME records of other classes or whose
    /// data has the wrong length.
    Other(u16),
}

/// One DNS message (a UDP datagram's payload). `Found` or `NotThis`, never `NeedMore`: a
/// datagram is whole. `NotThis` when the header or a question is cut or malformed.
pub fn message(datagram: &[u8]) -> Sniff<Message> {
    match parse(datagram) {
        Some(message) => Sniff::Found(message),
        None => Sniff::NotThis,
    }
}

/// DNS over TCP (RFC 1035 4.2.2, RFC 7766): the first message of the stream, after its 2-byte
/// length. `NeedMore` until the whole message is there; `NotThis` when the length is shorter
/// than a DNS header or the message does not read.
pub fn tcp_message(stream: &[u8]) -> Sniff<Message> {
    let Some((len, rest)) = stream.split_first_chunk::<2>() else {
        return Sniff::NeedMore;
    };
    let len = usize::from(u16::from_be_bytes(*len));
    if len < HEADER {
        return Sniff::NotThis;
    }
    match rest.get(..len) {
        Some(datagram) => message(datagram),
        None => Sniff::NeedMore,
    }
}

impl Message {
    /// Addresses the answer gives the question's name, following CNAME chains from it (at most
    /// [`MAX_CHAIN`] links, a link back to a name already on the chain ends it), each with the
    /// smallest TTL along its chain (the CNAMEs leading to its owner and its own). Only for
    /// responses with rcode 0 and a question of type A or AAAA; both A and AAAA records count.
    /// A TTL with its top bit set counts as 0 (RFC 2181 8). Where a name has several CNAMEs
    /// (which RFC 2181 10.1 forbids) the first is followed.
    pub fn resolved(&self) -> Vec<(IpAddr, u32)> {
        let Some(question) = &self.question else {
            return Vec::new();
        };
        if !self.response || self.rcode != 0 || !matches!(question.qtype, TYPE_A | TYPE_AAAA) {
            return Vec::new();
        }
        // The chain: each name with the smallest TTL of the CNAMEs that lead to it.
        let mut chain: Vec<(&str, u32)> = vec![(question.name.as_str(), u32::MAX)];
        while let Some(&(name, ttl)) = chain.last() {
            if chain.len() > MAX_CHAIN {
                break;
            }
            let next = self.answers.iter().find_map(|r| match &r.data {
                RecordData::Cname(target) if r.name == name => Some((target.as_str(), r.ttl)),
                _ => None,
            });
            match next {
                Some((target, link_ttl)) if !chain.iter().any(|(n, _)| *n == target) => {
                    chain.push((target, ttl.min(ttl_of(link_ttl))));
                }
                _ => break,
            }
        }
        self.answers
            .iter()
            .filter_map(|r| {
                let address = match r.data {
                    RecordData::A(a) => IpAddr::V4(a),
                    RecordData::Aaaa(a) => IpAddr::V6(a),
                    _ => return None,
                };
                let &(_, chain_ttl) = chain.iter().find(|(n, _)| *n == r.name)?;
                Some((address, chain_ttl.min(ttl_of(r.ttl))))
            })
            .collect()
    }
}

/// RFC 2181 8: a TTL with its most significant bit set is to be read as zero.
fn ttl_of(raw: u32) -> u32 {
    if raw > i32::MAX as u32 { 0 } else { raw }
}

/// Reads big-endian integers at positions, `None` past the end.
fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    data.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_be_bytes)
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_be_bytes)
}

fn parse(data: &[u8]) -> Option<Message> {
    let id = u16_at(data, 0)?;
    let flags = u16_at(data, 2)?;
    let questions = u16_at(data, 4)?;
    let answers = u16_at(data, 6)?;
    if data.len() < HEADER {
        return None;
    }
    let mut at = HEADER;
    let mut question = None;
    for i in 0..questions {
        let (name, end) = read_name(data, at)?;
        let qtype = u16_at(data, end)?;
        u16_at(data, end + 2)?;
        at = end + 4;
        if i == 0 {
            question = name.map(|name| Question { name, qtype });
        }
    }
    let mut records = Vec::new();
    for _ in 0..usize::from(answers).min(MAX_ANSWERS) {
        match read_record(data, at) {
            Some((record, end)) => {
                records.extend(record);
                at = end;
            }
            None => break,
        }
    }
    Some(Message { id, response: flags & 0x8000 != 0, rcode: (flags & 0x000f) as u8, question, answers: records })
}

/// One resource record at `at`: the record (`None` when its name or CNAME target does not
/// normalize) and where the next one starts; `None` when it is cut or malformed.
fn read_record(data: &[u8], at: usize) -> Option<(Option<Record>, usize)> {
    let (name, end) = read_name(data, at)?;
    let rtype = u16_at(data, end)?;
    let class = u16_at(data, end + 2)?;
    let ttl = u32_at(data, end + 4)?;
    let rdlength = usize::from(u16_at(data, end + 8)?);
    let rdata_at = end + 10;
    let rdata = data.get(rdata_at..rdata_at + rdlength)?;
    let next = rdata_at + rdlength;
    // mDNS sets the top bit of the class (cache flush); it is still IN.
    let internet = class & 0x7fff == CLASS_IN;
    let record_data = match (rtype, rdata.len()) {
        (TYPE_A, 4) if internet => <[u8; 4]>::try_from(rdata).ok().map(|a| RecordData::A(Ipv4Addr::from(a))),
        (TYPE_AAAA, 16) if internet => <[u8; 16]>::try_from(rdata).ok().map(|a| RecordData::Aaaa(Ipv6Addr::from(a))),
        (TYPE_CNAME, _) if internet => {
            // The target may be compressed; its own bytes must lie inside the RDATA.
            let (target, target_end) = read_name(data, rdata_at)?;
            if target_end > next {
                return None;
            }
            target.map(RecordData::Cname)
        }
        _ => Some(RecordData::Other(rtype)),
    };
    let record = name.zip(record_data).map(|(name, data)| Record { name, ttl, data });
    Some((record, next))
}

/// The name at `at` (`None` inside when it does not normalize) and the position after its own
/// bytes (after the first pointer, if any); `None` when it is cut, too long, uses a reserved
/// label type, or a pointer that does not point backwards.
fn read_name(data: &[u8], at: usize) -> Option<(Option<String>, usize)> {
    // The text form: labels joined by dots. 255 wire bytes make at most 254 text bytes.
    let mut text = [0u8; 255];
    let mut text_len = 0;
    let mut wire_len = 0;
    let mut usable = true;
    let mut pos = at;
    let mut end = None;
    let mut pointers = 0;
    loop {
        let len = *data.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => break,
            0x00 => {
                let label = data.get(pos + 1..pos + 1 + usize::from(len))?;
                wire_len += 1 + label.len();
                if wire_len >= 255 {
                    return None;
                }
                if label.contains(&b'.') {
                    usable = false;
                }
                let dot = usize::from(text_len > 0);
                let slot = text.get_mut(text_len..text_len + dot + label.len())?;
                let (sep, rest) = slot.split_at_mut(dot);
                sep.fill(b'.');
                rest.copy_from_slice(label);
                text_len += dot + label.len();
                pos += 1 + label.len();
            }
            0xc0 => {
                let target = usize::from(u16_at(data, pos)? & 0x3fff);
                pointers += 1;
                if target >= pos || pointers > MAX_POINTERS {
                    return None;
                }
                end.get_or_insert(pos + 2);
                pos = target;
            }
            // 0x40 and 0x80: extended and reserved label types (RFC 6891 retired them).
            _ => return None,
        }
    }
    let end = end.unwrap_or(pos + 1);
    let name = if usable && text_len <= MAX_HOST_NAME { host_name(text.get(..text_len)?) } else { None };
    Some((name, end))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Answers recorded from dnsmasq 2.90 (see `fuzz/seeds/sniff.py`): `a.example` is a host
    /// record (198.51.100.7, 2001:db8::7, TTL 300), `www.a.example` a CNAME to it (TTL 60),
    /// `cdn.b.example` a CNAME to `www.a.example` (TTL 120), `sink.example` answers 0.0.0.0 and
    /// `::`, `blocked.example` is NXDOMAIN.
    pub(crate) mod fixtures {
        pub const QUERY_A: &[u8] = include_bytes!("testdata/query-a.bin");
        pub const A: &[u8] = include_bytes!("testdata/dnsmasq-a.bin");
        pub const AAAA: &[u8] = include_bytes!("testdata/dnsmasq-aaaa.bin");
        pub const CNAME_A: &[u8] = include_bytes!("testdata/dnsmasq-cname-a.bin");
        pub const CNAME2_AAAA: &[u8] = include_bytes!("testdata/dnsmasq-cname2-aaaa.bin");
        pub const TCP_CNAME2_A: &[u8] = include_bytes!("testdata/dnsmasq-tcp-cname2-a.bin");
        pub const SINK_A: &[u8] = include_bytes!("testdata/dnsmasq-sink-a.bin");
        pub const SINK_AAAA: &[u8] = include_bytes!("testdata/dnsmasq-sink-aaaa.bin");
        pub const NXDOMAIN: &[u8] = include_bytes!("testdata/dnsmasq-nxdomain.bin");
        pub const MIXED_CASE: &[u8] = include_bytes!("testdata/dnsmasq-mixed-case.bin");
    }
    use fixtures::*;

    fn found(bytes: &[u8]) -> Message {
        match message(bytes) {
            Sniff::Found(m) => m,
            other => panic!("{other:?}"),
        }
    }

    /// A wire name, uncompressed.
    pub(crate) fn name(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in text.split('.').filter(|l| !l.is_empty()) {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A response to `qname`/`qtype` with the given answers (owner, type, ttl, rdata).
    pub(crate) fn response(qname: &str, qtype: u16, answers: &[(&str, u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, answers.len() as u8, 0, 0, 0, 0];
        m.extend(name(qname));
        m.extend(qtype.to_be_bytes());
        m.extend(1u16.to_be_bytes());
        for (owner, rtype, ttl, rdata) in answers {
            m.extend(name(owner));
            m.extend(rtype.to_be_bytes());
            m.extend(1u16.to_be_bytes());
            m.extend(ttl.to_be_bytes());
            m.extend((rdata.len() as u16).to_be_bytes());
            m.extend(rdata);
        }
        m
    }

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn dnsmasq_answers_read_as_sent() {
        let m = found(A);
        assert_eq!((m.id, m.response, m.rcode), (0x1000, true, 0));
        assert_eq!(m.question, Some(Question { name: "a.example".into(), qtype: TYPE_A }));
        assert_eq!(
            m.answers,
            vec![Record { name: "a.example".into(), ttl: 300, data: RecordData::A("198.51.100.7".parse().unwrap()) }]
        );
        assert_eq!(m.resolved(), vec![(v4("198.51.100.7"), 300)]);
        assert_eq!(found(AAAA).resolved(), vec![(v4("2001:db8::7"), 300)]);

        let q = found(QUERY_A);
        assert!(!q.response);
        assert_eq!(q.question, Some(Question { name: "a.example".into(), qtype: TYPE_A }));
        assert!(q.answers.is_empty() && q.resolved().is_empty());
    }

    #[test]
    fn cname_chains_give_their_addresses_to_the_asked_name_with_the_smallest_ttl() {
        let m = found(CNAME_A);
        assert_eq!(m.question.as_ref().map(|q| q.name.as_str()), Some("www.a.example"));
        assert_eq!(m.answers[0].data, RecordData::Cname("a.example".into()));
        assert_eq!(m.resolved(), vec![(v4("198.51.100.7"), 60)]);

        let m = found(CNAME2_AAAA);
        assert_eq!(m.answers.len(), 3);
        assert_eq!(m.resolved(), vec![(v4("2001:db8::7"), 60)]);

        let Sniff::Found(m) = tcp_message(TCP_CNAME2_A) else { panic!("tcp") };
        assert_eq!(m.question.as_ref().map(|q| q.name.as_str()), Some("cdn.b.example"));
        assert_eq!(m.resolved(), vec![(v4("198.51.100.7"), 60)]);
    }

    #[test]
    fn sinkholes_and_errors_resolve_as_they_are() {
        assert_eq!(found(SINK_A).resolved(), vec![(v4("0.0.0.0"), 300)]);
        assert_eq!(found(SINK_AAAA).resolved(), vec![(v4("::"), 300)]);
        let nx = found(NXDOMAIN);
        assert_eq!((nx.rcode, nx.answers.len()), (3, 0));
        assert!(nx.resolved().is_empty());
        let m = found(MIXED_CASE);
        assert_eq!(m.question.as_ref().map(|q| q.name.as_str()), Some("a.example"), "names are normalized");
        assert_eq!(m.resolved(), vec![(v4("198.51.100.7"), 300)]);
    }

    #[test]
    fn resolved_is_only_for_successful_address_answers() {
        let mut m = found(A);
        m.rcode = 2;
        assert!(m.resolved().is_empty());
        let mut m = found(A);
        m.response = false;
        assert!(m.resolved().is_empty());
        let mut m = found(A);
        m.question.as_mut().unwrap().qtype = 16;
        assert!(m.resolved().is_empty());
        let mut m = found(A);
        m.question = None;
        assert!(m.resolved().is_empty());
    }

    #[test]
    fn addresses_of_names_off_the_chain_are_not_given_to_the_asked_name() {
        let m = found(&response(
            "www.a.example",
            TYPE_A,
            &[
                ("www.a.example", TYPE_CNAME, 50, name("a.example")),
                ("other.example", TYPE_A, 50, vec![192, 0, 2, 66]),
                ("a.example", TYPE_A, 40, vec![192, 0, 2, 1]),
                ("a.example", TYPE_A, 0x8000_0000, vec![192, 0, 2, 2]),
            ],
        ));
        assert_eq!(m.resolved(), vec![(v4("192.0.2.1"), 40), (v4("192.0.2.2"), 0)]);
    }

    #[test]
    fn cname_loops_and_long_chains_end() {
        let m = found(&response(
            "a.example",
            TYPE_A,
            &[
                ("a.example", TYPE_CNAME, 50, name("b.example")),
                ("b.example", TYPE_CNAME, 50, name("a.example")),
                ("b.example", TYPE_A, 50, vec![192, 0, 2, 1]),
            ],
        ));
        assert_eq!(m.resolved(), vec![(v4("192.0.2.1"), 50)]);

        let links: Vec<(String, String)> =
            (0..MAX_CHAIN + 2).map(|i| (format!("n{i}.example"), format!("n{}.example", i + 1))).collect();
        let mut answers: Vec<(&str, u16, u32, Vec<u8>)> =
            links.iter().map(|(from, to)| (from.as_str(), TYPE_CNAME, 9, name(to))).collect();
        let last = format!("n{MAX_CHAIN}.example");
        let beyond = format!("n{}.example", MAX_CHAIN + 1);
        answers.push((&last, TYPE_A, 9, vec![192, 0, 2, 1]));
        answers.push((&beyond, TYPE_A, 9, vec![192, 0, 2, 2]));
        let m = found(&response("n0.example", TYPE_A, &answers));
        assert_eq!(m.resolved(), vec![(v4("192.0.2.1"), 9)], "{MAX_CHAIN} links followed, not more");
    }

    #[test]
    fn compression_pointers_must_point_backwards() {
        // The question's name points at itself, then forwards.
        let mut m = vec![0, 1, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        assert_eq!(message(&m), Sniff::NotThis);
        m[13] = 14;
        assert_eq!(message(&m), Sniff::NotThis);
        // An answer name that points back at the question is fine (dnsmasq's answers do).
        assert!(found(A).answers.len() == 1);
        // A chain of pointers, each to the one before, is followed up to MAX_POINTERS jumps.
        let mut m = vec![0, 1, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0];
        m.extend(name("a.example"));
        let mut previous = 12u16;
        for _ in 0..MAX_POINTERS + 1 {
            let here = m.len() as u16;
            m.extend((0xc000 | previous).to_be_bytes());
            previous = here;
        }
        let last = usize::from(previous);
        assert_eq!(read_name(&m, last - 2), Some((Some("a.example".into()), last)), "{MAX_POINTERS} jumps");
        assert_eq!(read_name(&m, last), None, "{} jumps", MAX_POINTERS + 1);
    }

    #[test]
    fn unusable_names_skip_their_records_and_cut_records_end_the_answers() {
        let mut dotted = vec![3, b'a', b'.', b'b', 7];
        dotted.extend_from_slice(b"example");
        dotted.push(0);
        let mut m = response(
            "a.example",
            TYPE_A,
            &[
                ("a.example", TYPE_CNAME, 5, dotted),
                ("bad_name!.example", TYPE_A, 5, vec![192, 0, 2, 9]),
                ("a.example", TYPE_A, 5, vec![192, 0, 2, 1, 0]),
                ("a.example", TYPE_A, 5, vec![192, 0, 2, 1]),
                ("a.example", TYPE_A, 5, vec![192, 0, 2, 2]),
            ],
        );
        let whole = found(&m);
        assert_eq!(whole.answers.len(), 3, "{whole:?}");
        assert_eq!(whole.answers[0].data, RecordData::Other(TYPE_A), "an A of 5 bytes");
        assert_eq!(whole.resolved(), vec![(v4("192.0.2.1"), 5), (v4("192.0.2.2"), 5)]);
        m.truncate(m.len() - 2);
        let cut = found(&m);
        assert_eq!(cut.resolved(), vec![(v4("192.0.2.1"), 5)]);
        assert_eq!(message(&m[..20]), Sniff::NotThis, "a cut question");
        assert_eq!(message(&m[..11]), Sniff::NotThis, "a cut header");
    }

    #[test]
    fn answers_read_are_bounded() {
        let answers: Vec<(&str, u16, u32, Vec<u8>)> =
            (0..200).map(|i| ("a.example", TYPE_A, 1, vec![192, 0, 2, i as u8])).collect();
        let mut m = response("a.example", TYPE_A, &answers);
        m[6] = 0;
        m[7] = 200;
        assert_eq!(found(&m).answers.len(), MAX_ANSWERS);
        let mut header_only = vec![0, 1, 0x81, 0x80, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(found(&header_only).answers.len(), 0);
        header_only[5] = 1;
        assert_eq!(message(&header_only), Sniff::NotThis);
    }

    #[test]
    fn tcp_messages_need_their_whole_length() {
        for cut in 0..TCP_CNAME2_A.len() {
            assert_eq!(tcp_message(&TCP_CNAME2_A[..cut]), Sniff::NeedMore, "prefix of {cut}");
        }
        let mut two = TCP_CNAME2_A.to_vec();
        two.extend_from_slice(TCP_CNAME2_A);
        assert_eq!(tcp_message(&two), message(&TCP_CNAME2_A[2..]));
        assert_eq!(tcp_message(&[0, 11, 0, 0]), Sniff::NotThis);
    }
}
