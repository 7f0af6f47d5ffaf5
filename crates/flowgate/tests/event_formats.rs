//! Event formats against their references: the Community ID of many generated flows against
//! the reference implementation (PyPI `communityid`), and EVE and OCSF records of every event
//! kind (TCP, UDP, ICMP, ICMPv6, other protocols; IPv4 and IPv6; inbound, outbound, forwarded)
//! against the published schemas (Suricata's EVE schema as Debian's source package of Suricata 8
//! has it, fetched at test time by scripts/eve-schema.sh; OCSF 1.8.0 Network Activity)
//! with a real JSON Schema validator (`crates/flowgate/tests/formats/*.py`). Also `flowgate
//! replay` with `event_format` over recorded captures.
//!
//! Python 3 with `jsonschema`, `communityid` and `ocsf-json-schema` is needed (scripts/test.sh
//! installs them); without them the tests fail under CI and are skipped elsewhere.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use flowgate_core::event::{Peek, RuleName};
use flowgate_core::{
    CloseReason, Counters, Direction, Event, EventFormat, EventKind, Flow, FlowId, FlowReport, FlowVerdict, Instant,
    Protocol, UpdateSource,
};
use serde_json::{Value, json};

const PYTHON: &str = "/usr/bin/python3";

fn here(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Whether the Python side is there; under CI its absence fails the test.
fn python_ready() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import jsonschema, communityid, ocsf_json_schema"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{PYTHON} with jsonschema, communityid and ocsf-json-schema is needed (scripts/test.sh installs them)"
        );
        eprintln!("skipped: {PYTHON} with jsonschema, communityid and ocsf-json-schema is missing");
    }
    ok
}

/// Runs a helper script with `input` on stdin.
fn python(script: &str, args: &[&Path], input: &[u8]) -> Output {
    let mut child = Command::new(PYTHON)
        .arg(here(&format!("tests/formats/{script}")))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // Written from a thread: the script's output could fill its pipe before it read everything.
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("python output");
    feeder.join().expect("feeder").expect("write to python");
    out
}

/// Small deterministic generator for test tuples.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn flow(id: u64, protocol: Protocol, direction: Direction, local: SocketAddr, remote: SocketAddr) -> Flow {
    Flow {
        id: FlowId(id),
        protocol,
        direction,
        local,
        remote,
        interface: Some("veth1".into()),
        existing: false,
        forwarded: false,
        started: Instant::from_unix(1_700_000_000, 250_000_000),
        icmp: None,
        owner: None,
        host: None,
    }
}

#[test]
fn community_id_matches_the_reference_implementation() {
    if !python_ready() {
        return;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let v4 = ["192.0.2.1", "192.0.2.200", "198.51.100.7", "203.0.113.9", "10.0.0.1", "255.255.255.255", "0.0.0.0"];
    let v6 = ["2001:db8::1", "2001:db8::ffff:1", "2001:db8:1::7", "fe80::1", "::1", "::ffff:192.0.2.1"];
    // ICMP types with and without a counterpart (echo, timestamp, router, info, mask; errors).
    let icmp4: [(u8, u8); 10] = [(8, 0), (0, 0), (13, 0), (14, 0), (10, 0), (9, 0), (3, 3), (11, 0), (5, 1), (42, 7)];
    let icmp6: [(u8, u8); 12] = [
        (128, 0),
        (129, 0),
        (133, 0),
        (134, 0),
        (135, 0),
        (136, 0),
        (130, 0),
        (131, 0),
        (1, 4),
        (2, 0),
        (139, 1),
        (200, 9),
    ];
    let mut flows = Vec::new();
    // The spec's example, then generated tuples.
    flows.push(flow(
        0,
        Protocol::Tcp,
        Direction::Outbound,
        "128.232.110.120:34855".parse().expect("addr"),
        "66.35.250.204:80".parse().expect("addr"),
    ));
    for id in 1..=600u64 {
        let six = rng.next().is_multiple_of(2);
        let addrs: &[&str] = if six { &v6 } else { &v4 };
        let a: IpAddr = rng.pick(addrs).parse().expect("ip");
        // Sometimes both ends on one address, to exercise the port tie-break.
        let b: IpAddr = if rng.next().is_multiple_of(8) { a } else { rng.pick(addrs).parse().expect("ip") };
        let protocol = match rng.next() % 6 {
            0 | 1 => Protocol::Tcp,
            2 => Protocol::Udp,
            3 | 4 => Protocol::Icmp,
            _ => Protocol::Other(rng.pick(&[47u8, 50, 51, 132, 89, 253])),
        };
        let port = |rng: &mut Rng| rng.pick(&[0u16, 1, 53, 80, 443, 1024, 34855, 65535]);
        let (pa, pb) = match protocol {
            Protocol::Tcp | Protocol::Udp => (port(&mut rng), port(&mut rng)),
            _ => (0, 0),
        };
        let direction = if rng.next().is_multiple_of(2) { Direction::Outbound } else { Direction::Inbound };
        let mut f = flow(id, protocol, direction, SocketAddr::new(a, pa), SocketAddr::new(b, pb));
        if protocol == Protocol::Icmp {
            f.icmp = Some(if six { rng.pick(&icmp6) } else { rng.pick(&icmp4) });
        }
        flows.push(f);
    }
    let mut input = String::new();
    for f in &flows {
        let (src, dst) = (f.opener(), f.responder());
        let (sport, dport) = match (f.protocol, f.icmp) {
            (Protocol::Tcp | Protocol::Udp, _) => (src.port().to_string(), dst.port().to_string()),
            (Protocol::Icmp, Some((t, c))) => (t.to_string(), c.to_string()),
            (Protocol::Other(132), _) => ("0".into(), "0".into()),
            _ => ("-".into(), "-".into()),
        };
        input.push_str(&format!("{} {} {} {sport} {dport}\n", f.ip_protocol(), src.ip(), dst.ip()));
    }
    let out = python("community_id.py", &[], input.as_bytes());
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let want: Vec<String> = String::from_utf8(out.stdout).expect("utf-8").lines().map(str::to_string).collect();
    assert_eq!(want.len(), flows.len());
    assert_eq!(want[0], "1:LQU9qZlK+B5F3KDmev6m5PMibrg=", "the spec's example");
    let mut kinds = std::collections::BTreeSet::new();
    for (f, want) in flows.iter().zip(&want) {
        assert_eq!(&flowgate_core::community_id::of_flow(f), want, "{f:?}");
        kinds.insert((f.ip_protocol(), f.local.is_ipv6()));
    }
    // Every protocol family was covered.
    for k in [(6, false), (6, true), (17, false), (17, true), (1, false), (58, true), (47, false), (132, true)] {
        assert!(kinds.contains(&k), "no generated flow of {k:?}");
    }
}

/// One event of every kind for `f`, in the order a flow's life makes them.
fn life(f: &Flow, t0: u64) -> Vec<Event> {
    let at = |s: u64| Instant::from_unix(1_700_000_000 + t0 + s, 500_000);
    let rule = |r: &str| -> Option<RuleName> { Some(r.into()) };
    let counters =
        Counters { packets_out: 4, packets_in: 3, bytes_out: 400, bytes_in: 3000, payload_out: 10, payload_in: 20 };
    let mut out = vec![Event { time: at(0), kind: EventKind::FlowNew { flow: f.clone() } }];
    for (verdict, peek) in [
        (FlowVerdict::Allow, None),
        (FlowVerdict::Drop, None),
        (FlowVerdict::Inspect, Some(Peek { outbound: 2048, inbound: 0 })),
        (FlowVerdict::Pause, None),
    ] {
        out.push(Event {
            time: at(0),
            kind: EventKind::FlowVerdict { flow: f.clone(), verdict, rule: rule("r1"), peek },
        });
    }
    out.push(Event {
        time: at(0),
        kind: EventKind::FlowVerdict { flow: f.clone(), verdict: FlowVerdict::Drop, rule: rule("default"), peek: None },
    });
    for (verdict, source, direction) in [
        (FlowVerdict::Allow, UpdateSource::Peek, None),
        (FlowVerdict::Drop, UpdateSource::Handle, None),
        (FlowVerdict::Drop, UpdateSource::Provider, Some(Direction::Inbound)),
        (FlowVerdict::Drop, UpdateSource::Rules, None),
        (FlowVerdict::Pause, UpdateSource::Provider, None),
    ] {
        let rule = if source == UpdateSource::Rules { rule("r2") } else { None };
        out.push(Event {
            time: at(1),
            kind: EventKind::FlowUpdate { flow: f.clone(), verdict, rule, direction, source },
        });
    }
    let reasons = [
        CloseReason::Fin,
        CloseReason::Rst,
        CloseReason::Idle,
        CloseReason::End,
        CloseReason::Reused,
        CloseReason::Conntrack,
    ];
    for (i, reason) in reasons.into_iter().enumerate() {
        let verdict = [FlowVerdict::Allow, FlowVerdict::Drop, FlowVerdict::Inspect][i % 3];
        let mut c = counters;
        if i == 2 {
            c.packets_in = 0;
        }
        let report = FlowReport { reason, verdict, rule: rule("r1"), counters: c, duration_ms: 61_250 };
        out.push(Event { time: at(61), kind: EventKind::FlowClosed { flow: f.clone(), report } });
    }
    out
}

/// Flows of every protocol, family and direction the formats distinguish.
fn sample_flows() -> Vec<Flow> {
    let sa = |s: &str| -> SocketAddr { s.parse().expect("addr") };
    let mut flows = vec![
        flow(1, Protocol::Tcp, Direction::Outbound, sa("198.51.100.1:40000"), sa("203.0.113.10:443")),
        flow(2, Protocol::Tcp, Direction::Inbound, sa("[2001:db8:1::1]:22"), sa("[2001:db8:2::10]:50000")),
        flow(3, Protocol::Udp, Direction::Outbound, sa("[2001:db8:1::1]:5353"), sa("[2001:db8:2::10]:53")),
        flow(4, Protocol::Udp, Direction::Inbound, sa("198.51.100.1:53"), sa("203.0.113.10:40001")),
        flow(5, Protocol::Icmp, Direction::Outbound, sa("198.51.100.1:4242"), sa("203.0.113.10:4242")),
        flow(6, Protocol::Icmp, Direction::Inbound, sa("[2001:db8:1::1]:7"), sa("[2001:db8:2::10]:7")),
        flow(7, Protocol::Icmp, Direction::Outbound, sa("198.51.100.1:0"), sa("203.0.113.10:0")),
        flow(8, Protocol::Other(47), Direction::Outbound, sa("198.51.100.1:0"), sa("203.0.113.10:0")),
        flow(9, Protocol::Other(253), Direction::Inbound, sa("[2001:db8:1::1]:0"), sa("[2001:db8:2::10]:0")),
        flow(10, Protocol::Tcp, Direction::Outbound, sa("198.18.0.2:40000"), sa("203.0.113.10:80")),
    ];
    flows[4].icmp = Some((8, 0));
    flows[5].icmp = Some((128, 0));
    flows[6].icmp = Some((3, 3));
    flows[1].existing = true;
    flows[3].interface = None;
    flows[9].forwarded = true;
    flows
}

/// Validates `records` (format, record) with validate.py; returns its summary line.
fn validate(records: &[(EventFormat, Value)]) -> Output {
    let mut input = Vec::new();
    for (format, r) in records {
        serde_json::to_writer(&mut input, &json!({"format": format.name(), "record": r})).expect("json");
        input.push(b'\n');
    }
    let schema = eve_schema();
    python("validate.py", &[&schema], &input)
}

/// Suricata's EVE schema, fetched by scripts/eve-schema.sh from Debian's source package (it is
/// Suricata's, not part of this repository) and cached under target/schemas/.
fn eve_schema() -> PathBuf {
    let out =
        Command::new(here("../../scripts/eve-schema.sh")).stderr(Stdio::inherit()).output().expect("run eve-schema.sh");
    assert!(out.status.success(), "scripts/eve-schema.sh could not get Suricata's EVE schema");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn eve_and_ocsf_records_of_every_event_kind_validate_against_the_published_schemas() {
    if !python_ready() {
        return;
    }
    let mut records = Vec::new();
    let (mut eve_flow, mut eve_drop, mut ocsf_activities) = (0, 0, std::collections::BTreeSet::new());
    for (i, f) in sample_flows().iter().enumerate() {
        for e in life(f, i as u64 * 100) {
            for format in [EventFormat::Eve, EventFormat::Ocsf] {
                for r in format.records(&e) {
                    match (format, r["event_type"].as_str()) {
                        (EventFormat::Eve, Some("flow")) => eve_flow += 1,
                        (EventFormat::Eve, Some("drop")) => eve_drop += 1,
                        _ => {}
                    }
                    if format == EventFormat::Ocsf {
                        ocsf_activities.insert(r["activity_id"].as_u64().expect("activity_id"));
                        assert_eq!(r["connection_info"]["community_uid"], flowgate_core::community_id::of_flow(f));
                    } else {
                        assert_eq!(r["community_id"], flowgate_core::community_id::of_flow(f));
                    }
                    records.push((format, r));
                }
            }
        }
    }
    // Each flow closes six times and is dropped five times (two verdicts, three updates).
    assert_eq!((eve_flow, eve_drop), (60, 50));
    assert_eq!(ocsf_activities.into_iter().collect::<Vec<_>>(), [1, 2, 3, 5, 6]);
    let out = validate(&records);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "invalid records:\n{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains("validated 110 eve, 170 ocsf, 0 invalid"), "{report}");

    // The validator is not asleep: a property the EVE schema does not name, an activity OCSF
    // does not have, and a missing required attribute are all rejected.
    let mut bad_eve = records.iter().find(|(f, _)| *f == EventFormat::Eve).expect("eve").1.clone();
    bad_eve["flowgate"] = json!({"verdict": "drop"});
    let mut bad_activity = records.iter().find(|(f, _)| *f == EventFormat::Ocsf).expect("ocsf").1.clone();
    bad_activity["activity_id"] = json!(42);
    let mut no_metadata = bad_activity.clone();
    no_metadata["activity_id"] = json!(1);
    no_metadata.as_object_mut().expect("object").remove("metadata");
    let out =
        validate(&[(EventFormat::Eve, bad_eve), (EventFormat::Ocsf, bad_activity), (EventFormat::Ocsf, no_metadata)]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("validated 1 eve, 2 ocsf, 3 invalid"), "{report}");
}

/// A directory for one test's files, removed when the test ends (also on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "flowgate-formats-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `flowgate replay` with `event_format`: its records, one per line.
fn replay(capture: &str, config: &str) -> Vec<Value> {
    let dir = TempDir::new("replay");
    let conf = dir.0.join("flowgate.toml");
    std::fs::write(&conf, config).expect("write config");
    let capture = here("../../tests/data").join(capture);
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["replay".as_ref(), capture.as_os_str(), "--config".as_ref(), conf.as_os_str()])
        .output()
        .expect("run flowgate");
    assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line ({e}): {l}")))
        .collect()
}

#[test]
fn replay_writes_the_configured_format_and_it_validates() {
    if !python_ready() {
        return;
    }
    let rules = "[[rule]]\nname = \"no-web\"\nremote_ports = \"80\"\naction = \"drop\"\n\
                 [[rule]]\nname = \"no-ping\"\nprotocol = \"icmp\"\naction = \"drop\"\n";
    let mut records = Vec::new();
    for capture in ["mixed_v4v6.pcapng", "icmp_ping.pcap", "http_curl_v4.pcap", "socat_udp_v4.pcap"] {
        let native = replay(capture, rules);
        let flows = native.iter().filter(|e| e["event"] == "flow.new").count();
        let drops = native.iter().filter(|e| e["event"] == "flow.verdict" && e["verdict"] == "drop").count();
        assert!(flows > 0, "{capture}");
        let eve = replay(capture, &format!("event_format = \"eve\"\n{rules}"));
        let ocsf = replay(capture, &format!("event_format = \"ocsf\"\n{rules}"));
        // EVE: one flow record per flow (all close at the end of the capture), one drop record
        // per dropped flow; OCSF: one record per event.
        assert_eq!(eve.iter().filter(|r| r["event_type"] == "flow").count(), flows, "{capture}");
        assert_eq!(eve.iter().filter(|r| r["event_type"] == "drop").count(), drops, "{capture}");
        assert_eq!(ocsf.len(), native.len(), "{capture}");
        for (o, n) in ocsf.iter().zip(&native) {
            assert_eq!(o["metadata"]["event_code"], n["event"], "{capture}");
            assert_eq!(o["unmapped"]["flowgate"]["flow_id"], n["flow"]["id"], "{capture}");
        }
        records.extend(eve.into_iter().map(|r| (EventFormat::Eve, r)));
        records.extend(ocsf.into_iter().map(|r| (EventFormat::Ocsf, r)));
    }
    assert!(records.iter().any(|(_, r)| r["proto"] == "IPv6-ICMP" || r["proto"] == "ICMP"), "ICMP covered");
    assert!(records.iter().any(|(_, r)| r["event_type"] == "drop"), "a drop covered");
    let out = validate(&records);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "invalid records:\n{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.contains(" 0 invalid"), "{report}");
}
