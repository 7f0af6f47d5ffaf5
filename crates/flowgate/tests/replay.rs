//! Replay tests: the real `flowgate` binary over captures recorded from real programs
//! (`tests/data/record.sh`), checked against an independent oracle (`tests/data/count_flows.py`,
//! which counts flows straight from the capture bytes) and against the verdicts the rules imply.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter};
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name)
}

/// A directory for one test's files, removed when the test ends (also on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "flowgate-replay-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn flowgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowgate")).args(args).output().expect("run flowgate")
}

/// Replays a capture and returns its events.
fn replay(capture: &Path, config: Option<&Path>) -> Vec<Value> {
    let mut args = vec!["replay".to_string(), capture.display().to_string()];
    if let Some(c) = config {
        args.push("--config".into());
        args.push(c.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = flowgate(&args);
    assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn events<'a>(all: &'a [Value], name: &str) -> Vec<&'a Value> {
    all.iter().filter(|e| e["event"] == name).collect()
}

fn oracle(capture: &Path) -> Value {
    let out = Command::new("python3")
        .arg(data("count_flows.py"))
        .arg("--json")
        .arg(capture)
        .output()
        .expect("python3 is needed for the replay oracle (scripts/test.sh installs it)");
    assert!(out.status.success(), "oracle failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("oracle JSON")
}

fn endpoint(addr: &Value, port: &Value) -> String {
    let a = addr.as_str().expect("addr");
    if a.contains(':') { format!("[{a}]:{port}") } else { format!("{a}:{port}") }
}

const LAB_CONFIG: &str = "local_addresses = [\"198.51.100.1\", \"2001:db8:1::1\"]\n";

/// Every flow the oracle finds in each capture is one flow of the replay, with the same
/// endpoints, direction, and packet, IP-byte and payload counts per direction.
#[test]
fn every_capture_matches_the_oracle() {
    let tmp = TempDir::new("oracle");
    let config = tmp.file("lab.toml", LAB_CONFIG);
    let captures = [
        "http_curl_v4.pcap",
        "socat_tcp_v4.pcap",
        "socat_udp_v4.pcap",
        "socat_tcp_v6.pcapng",
        "icmp_ping.pcap",
        "mixed_v4v6.pcapng",
        "socat_tcp_inbound_v4.pcap",
    ];
    for name in captures {
        let path = data(name);
        let truth = oracle(&path);
        let ev = replay(&path, Some(&config));
        let closed = events(&ev, "flow.closed");
        let want = truth["flows"].as_array().expect("oracle flows");
        assert_eq!(closed.len(), want.len(), "{name}: number of flows");
        assert_eq!(events(&ev, "flow.new").len(), want.len(), "{name}: flow.new events");
        for w in want {
            let local = endpoint(&w["local_addr"], &w["local_port"]);
            let remote = endpoint(&w["remote_addr"], &w["remote_port"]);
            let proto = w["proto"].as_str().expect("proto").to_lowercase().replace("icmpv6", "icmp");
            let got = closed
                .iter()
                .find(|e| {
                    let f = &e["flow"];
                    let la = f["local"].as_str().unwrap_or_default();
                    let ra = f["remote"].as_str().unwrap_or_default();
                    if proto == "icmp" {
                        // The oracle keys ICMP by addresses only; flowgate adds the echo id as port.
                        f["protocol"] == "icmp"
                            && la.rsplit_once(':').map(|x| x.0) == local.rsplit_once(':').map(|x| x.0)
                            && ra.rsplit_once(':').map(|x| x.0) == remote.rsplit_once(':').map(|x| x.0)
                    } else {
                        f["protocol"] == proto.as_str() && la == local && ra == remote
                    }
                })
                .unwrap_or_else(|| panic!("{name}: no flow {proto} {local} -> {remote} in {closed:?}"));
            let dir = if w["initiator"] == "local" { "outbound" } else { "inbound" };
            assert_eq!(got["flow"]["direction"], dir, "{name}: direction of {local} -> {remote}");
            for (mine, theirs) in [
                ("packets_out", "packets_out"),
                ("packets_in", "packets_in"),
                ("bytes_out", "ip_bytes_out"),
                ("bytes_in", "ip_bytes_in"),
                ("payload_out", "payload_out"),
                ("payload_in", "payload_in"),
            ] {
                assert_eq!(got[mine], w[theirs], "{name}: {mine} of {proto} {local} -> {remote}");
            }
            if w["tcp"]["complete"] == true {
                assert_eq!(got["reason"], "fin", "{name}: a complete TCP flow closes by FIN");
            }
        }
    }
}

#[test]
fn rules_decide_with_the_rule_named() {
    let ev = replay(&data("mixed_v4v6.pcapng"), Some(&data("../../examples/flowgate.toml")));
    let verdicts = events(&ev, "flow.verdict");
    let by_remote = |r: &str| {
        verdicts
            .iter()
            .find(|e| e["flow"]["remote"].as_str().is_some_and(|x| x.starts_with(r)))
            .copied()
            .unwrap_or_else(|| panic!("no flow to {r}"))
    };
    let http6 = by_remote("[2001:db8:2::10]:8080");
    assert_eq!((http6["verdict"].as_str(), http6["rule"].as_str()), (Some("drop"), Some("no-plain-http-v6")));
    let socat = by_remote("203.0.113.10:7000");
    assert_eq!((socat["verdict"].as_str(), socat["rule"].as_str()), (Some("inspect"), Some("peek-at-requests")));
    assert_eq!(socat["peek"]["outbound"], 512);
    let udp = by_remote("203.0.113.10:5353");
    assert_eq!((udp["verdict"].as_str(), udp["rule"].as_str()), (Some("allow"), Some("udp-to-lab-server")));
    // The 1000-byte request fills the 512-byte window: the rule's inspection ends in allow.
    let updates = events(&ev, "flow.update");
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!((updates[0]["verdict"].as_str(), updates[0]["source"].as_str()), (Some("allow"), Some("peek")));
    assert_eq!(updates[0]["flow"]["id"], socat["flow"]["id"]);
    // Every event has the documented fields.
    for e in &ev {
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
        for k in ["id", "protocol", "direction", "local", "remote", "interface", "existing"] {
            assert!(e["flow"].get(k).is_some(), "missing flow.{k} in {e}");
        }
    }
}

#[test]
fn default_action_and_first_match_order() {
    let tmp = TempDir::new("order");
    let config = tmp.file(
        "c.toml",
        "default_action = \"drop\"\n\
         [[rule]]\nname = \"allow-7000\"\nremote_ports = \"7000\"\naction = \"allow\"\n\
         [[rule]]\nname = \"drop-host\"\nremote = \"203.0.113.10/32\"\naction = \"drop\"\n",
    );
    let ev = replay(&data("mixed_v4v6.pcapng"), Some(&config));
    let v: Vec<(String, String)> = events(&ev, "flow.verdict")
        .iter()
        .map(|e| {
            (e["rule"].as_str().unwrap_or_default().to_string(), e["verdict"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    assert_eq!(
        v,
        vec![
            ("default".to_string(), "drop".to_string()),
            ("allow-7000".to_string(), "allow".to_string()),
            ("drop-host".to_string(), "drop".to_string()),
        ]
    );
}

#[test]
fn direction_without_local_addresses_is_the_openers() {
    // The server side of this capture is the capturing host; without local_addresses the
    // opener (the remote client) is taken as local, so the flow reads as outbound from it.
    let ev = replay(&data("socat_tcp_inbound_v4.pcap"), None);
    let new = events(&ev, "flow.new");
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["flow"]["direction"], "outbound");
    assert!(new[0]["flow"]["local"].as_str().is_some_and(|l| l.starts_with("203.0.113.10:")));
    assert_eq!(new[0]["flow"]["remote"], "198.51.100.1:9000");

    let tmp = TempDir::new("dir");
    let config = tmp.file("lab.toml", LAB_CONFIG);
    let ev = replay(&data("socat_tcp_inbound_v4.pcap"), Some(&config));
    let new = events(&ev, "flow.new");
    assert_eq!(new[0]["flow"]["direction"], "inbound");
    assert_eq!(new[0]["flow"]["local"], "198.51.100.1:9000");
}

#[test]
fn inbound_rules_match_inbound_flows_only() {
    let tmp = TempDir::new("inbound");
    let config = tmp.file(
        "c.toml",
        &format!("{LAB_CONFIG}[[rule]]\nname = \"no-inbound\"\ndirection = \"inbound\"\naction = \"drop\"\n"),
    );
    let inbound = replay(&data("socat_tcp_inbound_v4.pcap"), Some(&config));
    assert_eq!(events(&inbound, "flow.verdict")[0]["rule"], "no-inbound");
    let outbound = replay(&data("socat_tcp_v4.pcap"), Some(&config));
    assert_eq!(events(&outbound, "flow.verdict")[0]["rule"], "default");
}

#[test]
fn interface_comes_from_pcapng_and_interface_rules_use_it() {
    let ev = replay(&data("socat_tcp_v6.pcapng"), None);
    let iface = events(&ev, "flow.new")[0]["flow"]["interface"].as_str().map(str::to_string);
    let iface = iface.expect("pcapng records the interface name");
    assert!(iface.starts_with("fgc"), "{iface}");
    // pcap has no interface names.
    let ev = replay(&data("socat_tcp_v4.pcap"), None);
    assert!(events(&ev, "flow.new")[0]["flow"]["interface"].is_null());

    let tmp = TempDir::new("iface");
    let config = tmp.file("c.toml", "[[rule]]\nname = \"lab-veth\"\ninterface = \"fgc*\"\naction = \"drop\"\n");
    let ev = replay(&data("socat_tcp_v6.pcapng"), Some(&config));
    assert_eq!(events(&ev, "flow.verdict")[0]["rule"], "lab-veth");
    let ev = replay(&data("socat_tcp_v4.pcap"), Some(&config));
    assert_eq!(events(&ev, "flow.verdict")[0]["rule"], "default", "unknown interface never matches a glob");
}

/// Writes the frames of `src` for which `keep(index, frame)` holds, and returns the path.
fn rewrite(tmp: &TempDir, src: &Path, name: &str, mut edit: impl FnMut(usize, &[u8]) -> Option<Vec<u8>>) -> PathBuf {
    let mut r = PcapReader::new(std::fs::File::open(src).expect("open capture")).expect("pcap");
    let header = r.header();
    let path = tmp.0.join(name);
    let mut w = PcapWriter::with_header(std::fs::File::create(&path).expect("create"), header).expect("writer");
    let mut i = 0;
    while let Some(p) = r.next_packet() {
        let p = p.expect("packet");
        if let Some(data) = edit(i, &p.data) {
            let len = u32::try_from(data.len()).expect("len");
            w.write_packet(&PcapPacket::new(p.timestamp, len, &data)).expect("write");
        }
        i += 1;
    }
    path
}

#[test]
fn a_flow_picked_up_mid_stream_is_a_flow() {
    let tmp = TempDir::new("mid");
    // Drop everything up to and including the handshake: the capture starts mid-connection.
    let src = data("socat_tcp_v4.pcap");
    let mut seen_ip = 0;
    let cut = rewrite(&tmp, &src, "mid.pcap", |_, frame| {
        let is_ip = frame.get(12..14) == Some(&[0x08, 0x00]);
        if is_ip {
            seen_ip += 1;
        }
        (!is_ip || seen_ip > 3).then(|| frame.to_vec())
    });
    let truth = oracle(&cut);
    let config = tmp.file("lab.toml", LAB_CONFIG);
    let ev = replay(&cut, Some(&config));
    let closed = events(&ev, "flow.closed");
    assert_eq!(closed.len(), 1, "{ev:?}");
    let f = &closed[0];
    assert_eq!(f["flow"]["direction"], "outbound");
    assert_eq!(f["flow"]["remote"], "203.0.113.10:7000");
    let w = &truth["flows"][0];
    assert_eq!(f["packets_out"], w["packets_out"]);
    assert_eq!(f["packets_in"], w["packets_in"]);
    assert_eq!(f["payload_in"], w["payload_in"]);
}

#[test]
fn idle_timeouts_close_udp_flows_in_capture_time() {
    let tmp = TempDir::new("idle");
    // The three datagrams are a few ms apart: a 1 ms idle timeout splits them into flows.
    let config = tmp.file("c.toml", "[timeouts]\nudp = \"1ms\"\n");
    let ev = replay(&data("socat_udp_v4.pcap"), Some(&config));
    let closed = events(&ev, "flow.closed");
    assert!(closed.len() >= 2, "{closed:?}");
    assert!(closed.iter().filter(|e| e["reason"] == "idle").count() >= 1);
    let mut ids: Vec<u64> = events(&ev, "flow.new").iter().filter_map(|e| e["flow"]["id"].as_u64()).collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "flow ids are never reused");
    // With the default timeout it is one flow.
    let ev = replay(&data("socat_udp_v4.pcap"), None);
    assert_eq!(events(&ev, "flow.closed").len(), 1);
}

#[test]
fn broken_frames_are_counted_and_skipped() {
    let tmp = TempDir::new("broken");
    let src = data("socat_tcp_v4.pcap");
    let broken = rewrite(&tmp, &src, "broken.pcap", |i, frame| {
        Some(match i {
            // Cut the IP packet short: headers promise more than the frame holds.
            2 => frame[..frame.len().min(30)].to_vec(),
            // An IPv4 header with an impossible header length.
            3 => {
                let mut f = frame.to_vec();
                if f.len() > 14 {
                    f[14] = 0x41;
                }
                f
            }
            // Random bytes with an IP ethertype.
            4 => {
                let mut f = frame[..14.min(frame.len())].to_vec();
                f.extend((0..40u8).map(|b| b.wrapping_mul(37)));
                f
            }
            _ => frame.to_vec(),
        })
    });
    let out = flowgate(&["replay", broken.to_str().expect("path"), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(
        out.stderr.split(|&b| b == b'\n').find(|l| l.starts_with(b"{")).expect("JSON summary on stderr"),
    )
    .expect("summary JSON");
    let s = &summary["summary"];
    let skipped =
        s["truncated"].as_u64().unwrap_or(0) + s["malformed"].as_u64().unwrap_or(0) + s["not_ip"].as_u64().unwrap_or(0);
    assert_eq!(skipped, 3, "{s}");
    assert!(s["truncated"].as_u64().unwrap_or(0) >= 1, "{s}");
}

#[test]
fn bad_inputs_get_clear_errors() {
    let tmp = TempDir::new("bad");
    let not_capture = tmp.file("x.pcap", "this is not a capture");
    let out = flowgate(&["replay", not_capture.to_str().expect("path")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("x.pcap") && err.contains("not a pcap or pcapng"), "{err}");

    let out = flowgate(&["replay", "/nonexistent/capture.pcap"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/capture.pcap"));

    let bad_config = tmp.file("bad.toml", "[[rule]]\nname = \"x\"\nprotocol = \"tcpp\"\naction = \"drop\"\n");
    let out = flowgate(&[
        "replay",
        data("socat_tcp_v4.pcap").to_str().expect("path"),
        "--config",
        bad_config.to_str().expect("p"),
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing replayed with a bad config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:3:") && err.contains("`protocol`") && err.contains("tcpp"), "{err}");

    // A capture cut in the middle of a record: the frames before the cut are still replayed.
    let whole = std::fs::read(data("socat_tcp_v4.pcap")).expect("read");
    let cut = tmp.0.join("cut.pcap");
    std::fs::write(&cut, &whole[..whole.len() - 7]).expect("write");
    let out = flowgate(&["replay", cut.to_str().expect("path")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cut.pcap"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("flow.new"));
}

#[test]
fn raw_ip_captures_replay_too() {
    // Re-encode an Ethernet capture as LINKTYPE_RAW (what NFQUEUE-style tools write).
    let tmp = TempDir::new("raw");
    let mut r = PcapReader::new(std::fs::File::open(data("socat_tcp_v4.pcap")).expect("open")).expect("pcap");
    let path = tmp.0.join("raw.pcap");
    let header = PcapHeader { datalink: DataLink::RAW, ..r.header() };
    let mut w = PcapWriter::with_header(std::fs::File::create(&path).expect("create"), header).expect("writer");
    while let Some(p) = r.next_packet() {
        let p = p.expect("packet");
        if p.data.get(12..14) == Some(&[0x08, 0x00]) {
            let ip = &p.data[14..];
            w.write_packet(&PcapPacket::new(p.timestamp, u32::try_from(ip.len()).expect("len"), ip)).expect("write");
        }
    }
    drop(w);
    let ev = replay(&path, None);
    assert_eq!(events(&ev, "flow.closed").len(), 1);
    assert_eq!(events(&ev, "flow.closed")[0]["payload_out"], 1000);
}
