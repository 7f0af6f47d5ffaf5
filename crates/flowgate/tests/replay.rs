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
    // The 1000-byte request fills the 512-byte window: the rules judge the flow again past the
    // inspect rule, and the first later one that matches it (none: the default) allows it.
    let updates = events(&ev, "flow.update");
    assert_eq!(updates.len(), 1, "{updates:?}");
    assert_eq!((updates[0]["verdict"].as_str(), updates[0]["source"].as_str()), (Some("allow"), Some("host")));
    assert_eq!(updates[0]["rule"], "default");
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

// ---------------------------------------------------------------------------------------------
// Crafted captures: every kind of timestamp, link layer and broken file the replay must handle.
// They are written byte by byte (not with pcap-file's writers) so that broken ones can be made.
// ---------------------------------------------------------------------------------------------

/// What one run of `flowgate replay CAPTURE --json` gave.
struct Run {
    /// Exit code; `None` if killed by a signal.
    code: Option<i32>,
    events: Vec<Value>,
    stderr: String,
    /// The `summary` object of a successful run.
    summary: Value,
}

impl Run {
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "replay failed: {}", self.stderr);
        assert!(self.events.iter().all(Value::is_object), "not JSON: {:?}", self.events);
        self
    }

    /// Asserts a clean failure (exit 1, no panic) whose message contains every one of `parts`.
    fn fails_with(&self, parts: &[&str]) -> &Self {
        assert_eq!(self.code, Some(1), "expected exit 1: {}", self.stderr);
        for p in parts {
            assert!(self.stderr.contains(p), "{p:?} not in {:?}", self.stderr);
        }
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }

    fn count(&self, key: &str) -> u64 {
        self.summary[key].as_u64().unwrap_or_else(|| panic!("no {key} in summary {}", self.summary))
    }

    /// The `flow.new` event of the flow from local UDP port `sport`.
    fn new_flow(&self, sport: u16) -> &Value {
        let local = format!(":{sport}");
        self.events
            .iter()
            .find(|e| e["event"] == "flow.new" && e["flow"]["local"].as_str().is_some_and(|l| l.ends_with(&local)))
            .unwrap_or_else(|| panic!("no flow from port {sport} in {:?} ({})", self.events, self.stderr))
    }
}

/// Runs the replay with a deadline: a replay that hangs fails the test instead of blocking it.
fn run(capture: &Path) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["replay", capture.to_str().expect("path"), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run flowgate");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    // The pipes are drained while the deadline runs, so a large output cannot stall the child.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(out) => out.expect("wait for flowgate"),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("replay of {} did not end within 60 s", capture.display());
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // A line that is not JSON (a run cut short) is kept as a string for the assertions to show.
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.to_string())))
        .collect();
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("{\"summary\""))
        .map(|l| serde_json::from_str::<Value>(l).expect("summary JSON")["summary"].clone())
        .unwrap_or(Value::Null);
    Run { code: out.status.code(), events, stderr, summary }
}

fn write(tmp: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = tmp.0.join(name);
    std::fs::write(&p, bytes).expect("write capture");
    p
}

/// An IPv4 UDP packet 198.51.100.1:`sport` -> 203.0.113.10:53 with `payload` bytes.
fn udp4(sport: u16, payload: usize) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv4([198, 51, 100, 1], [203, 0, 113, 10], 64)
        .udp(sport, 53)
        .write(&mut out, &vec![0x61; payload])
        .expect("build packet");
    out
}

/// An IPv6 UDP packet [2001:db8:1::1]:`sport` -> [2001:db8:2::10]:53.
fn udp6(sport: u16) -> Vec<u8> {
    let a = |last: u8, net: u8| {
        let mut x = [0u8; 16];
        x[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, net]);
        x[15] = last;
        x
    };
    let mut out = Vec::new();
    etherparse::PacketBuilder::ipv6(a(1, 1), a(0x10, 2), 64).udp(sport, 53).write(&mut out, b"query").expect("build");
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

const MACS: [u8; 12] = [2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];

/// An Ethernet frame: MACs, then `tags` (VLAN tags with their ethertypes), then `ethertype`.
fn eth(tags: &[u8], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    cat(&[&MACS, tags, &ethertype.to_be_bytes(), payload])
}

/// A Linux cooked v1 frame of device type `arphrd` and protocol `proto`.
fn sll(arphrd: u16, proto: u16, payload: &[u8]) -> Vec<u8> {
    cat(&[&[0, 4], &arphrd.to_be_bytes(), &[0, 6], &MACS[..8], &proto.to_be_bytes(), payload])
}

/// A Linux cooked v2 frame.
fn sll2(arphrd: u16, proto: u16, payload: &[u8]) -> Vec<u8> {
    cat(&[&proto.to_be_bytes(), &[0, 0], &3u32.to_be_bytes(), &arphrd.to_be_bytes(), &[4, 6], &MACS[..8], payload])
}

const ARP: [u8; 28] = [0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 198, 51, 100, 1, 0, 0, 0, 0, 0, 0, 198, 51, 100, 2];

/// pcapng blocks in either byte order, written field by field.
struct Ng {
    big: bool,
}

impl Ng {
    const LE: Ng = Ng { big: false };

    fn u16(&self, v: u16) -> [u8; 2] {
        if self.big { v.to_be_bytes() } else { v.to_le_bytes() }
    }

    fn u32(&self, v: u32) -> [u8; 4] {
        if self.big { v.to_be_bytes() } else { v.to_le_bytes() }
    }

    /// A block: type, total length, body padded to 32 bits, total length again.
    fn block(&self, kind: u32, body: &[u8]) -> Vec<u8> {
        let mut body = body.to_vec();
        body.resize(body.len().div_ceil(4) * 4, 0);
        let len = self.u32(u32::try_from(body.len() + 12).expect("len"));
        cat(&[&self.u32(kind), &len, &body, &len])
    }

    fn shb_version(&self, major: u16) -> Vec<u8> {
        self.block(0x0a0d_0d0a, &cat(&[&self.u32(0x1a2b_3c4d), &self.u16(major), &self.u16(0), &[0xff; 8]]))
    }

    fn shb(&self) -> Vec<u8> {
        self.shb_version(1)
    }

    fn opt(&self, code: u16, value: &[u8]) -> Vec<u8> {
        let mut v = cat(&[&self.u16(code), &self.u16(u16::try_from(value.len()).expect("len")), value]);
        v.resize(v.len().div_ceil(4) * 4, 0);
        v
    }

    /// An interface description block; `opts` get their end-of-options marker here.
    fn idb(&self, link: u16, snaplen: u32, opts: &[Vec<u8>]) -> Vec<u8> {
        let mut body = cat(&[&self.u16(link), &[0, 0], &self.u32(snaplen)]);
        if !opts.is_empty() {
            body.extend(opts.concat());
            body.extend(self.opt(0, &[]));
        }
        self.block(1, &body)
    }

    /// An Ethernet interface named `name` with these timestamp options (`None`: not written).
    fn iface(&self, name: &str, tsresol: Option<u8>, tsoffset: Option<i64>) -> Vec<u8> {
        let mut opts = vec![self.opt(2, name.as_bytes())];
        if let Some(r) = tsresol {
            opts.push(self.opt(9, &[r]));
        }
        if let Some(o) = tsoffset {
            opts.push(self.opt(14, &if self.big { o.to_be_bytes() } else { o.to_le_bytes() }));
        }
        self.idb(1, 262_144, &opts)
    }

    fn epb_orig(&self, iface: u32, ts: u64, data: &[u8], orig: u32) -> Vec<u8> {
        let caplen = self.u32(u32::try_from(data.len()).expect("len"));
        let (high, low) = (self.u32((ts >> 32) as u32), self.u32(ts as u32));
        self.block(6, &cat(&[&self.u32(iface), &high, &low, &caplen, &self.u32(orig), data]))
    }

    fn epb(&self, iface: u32, ts: u64, data: &[u8]) -> Vec<u8> {
        self.epb_orig(iface, ts, data, u32::try_from(data.len()).expect("len"))
    }

    /// An obsolete Packet Block.
    fn pb(&self, iface: u16, ts: u64, data: &[u8]) -> Vec<u8> {
        let len = self.u32(u32::try_from(data.len()).expect("len"));
        let (high, low) = (self.u32((ts >> 32) as u32), self.u32(ts as u32));
        self.block(2, &cat(&[&self.u16(iface), &self.u16(0), &high, &low, &len, &len, data]))
    }

    fn spb(&self, orig: u32, data: &[u8]) -> Vec<u8> {
        self.block(3, &cat(&[&self.u32(orig), data]))
    }
}

/// A pcap file: header (microseconds unless `nanos`, little endian) and records.
fn pcap(nanos: bool, snaplen: u32, link: u32, records: &[Vec<u8>]) -> Vec<u8> {
    let magic: u32 = if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 };
    let mut v = cat(&[&magic.to_le_bytes(), &2u16.to_le_bytes(), &4u16.to_le_bytes(), &[0; 8]]);
    v.extend_from_slice(&snaplen.to_le_bytes());
    v.extend_from_slice(&link.to_le_bytes());
    for r in records {
        v.extend_from_slice(r);
    }
    v
}

fn record(secs: u32, frac: u32, data: &[u8], orig: u32) -> Vec<u8> {
    let caplen = u32::try_from(data.len()).expect("len");
    cat(&[&secs.to_le_bytes(), &frac.to_le_bytes(), &caplen.to_le_bytes(), &orig.to_le_bytes(), data])
}

fn full(data: &[u8]) -> u32 {
    u32::try_from(data.len()).expect("len")
}

const M: u64 = u64::MAX;

/// if_tsresol (`None`: not written), if_tsoffset, the raw count, and the time or the error.
type TimeCase = (Option<u8>, Option<i64>, u64, &'static str);

/// pcapng timestamps: if_tsresol in powers of ten and of two up to 127, if_tsoffset either way,
/// raw counts up to 2^64 - 1. Each packet is alone on an interface of its own and starts its own
/// flow; the expected times were computed with exact fractions (Python's `fractions`).
#[test]
fn pcapng_times_are_right_for_every_if_tsresol() {
    // Each file is one era (the times are checked per file).
    let eras: [&[TimeCase]; 3] = [
        &[
            (Some(127), None, M, "1970-01-01T00:00:00.000000Z"), // 10^-127 s
            (Some(255), None, M, "1970-01-01T00:00:00.000000Z"), // 2^-127 s
            (Some(0x80 | 64), None, M, "1970-01-01T00:00:00.999999Z"),
            (Some(19), None, M, "1970-01-01T00:00:01.844674Z"),
            (Some(0x80 | 63), None, M, "1970-01-01T00:00:01.999999Z"),
            (Some(0x80 | 40), None, 1 << 40, "1970-01-01T00:00:01.000000Z"),
        ],
        &[
            (Some(0), None, 1_700_000_000, "2023-11-14T22:13:20.000000Z"), // seconds
            (Some(3), None, 1_700_000_000_250, "2023-11-14T22:13:20.250000Z"),
            (None, None, 1_700_000_000_500_000, "2023-11-14T22:13:20.500000Z"), // default: 10^-6
            (Some(6), None, 1_700_000_000_600_001, "2023-11-14T22:13:20.600001Z"),
            (Some(9), None, 1_700_000_000_700_000_999, "2023-11-14T22:13:20.700000Z"),
            (Some(0x80 | 10), None, (1_700_000_000 << 10) + 819, "2023-11-14T22:13:20.799804Z"),
            (Some(0x80), None, 1_700_000_001, "2023-11-14T22:13:21.000000Z"), // 2^0 s
            (Some(255), Some(1_700_000_002), M, "2023-11-14T22:13:22.000000Z"),
            (Some(127), Some(1_700_000_003), M, "2023-11-14T22:13:23.000000Z"),
            (Some(0), Some(-100), 1_700_000_104, "2023-11-14T22:13:24.000000Z"),
            (Some(0x80 | 32), None, (1_700_000_005 << 32) + (1 << 31), "2023-11-14T22:13:25.500000Z"),
            (Some(9), Some(1), 1_700_000_005_999_999_999, "2023-11-14T22:13:26.999999Z"),
            (Some(9), None, 1_700_000_027_000_000_000, "2023-11-14T22:13:47.000000Z"),
        ],
        &[
            (Some(9), None, M, "2554-07-21T23:34:33.709551Z"), // the largest count at 10^-9 s
            (Some(0), Some(-1), 18_446_744_073, "2554-07-21T23:34:32.000000Z"),
        ],
    ];
    let ng = Ng::LE;
    let tmp = TempDir::new("tsresol");
    for cases in eras {
        let mut file = ng.shb();
        for (i, &(tsresol, tsoffset, _, _)) in cases.iter().enumerate() {
            file.extend(ng.iface(&format!("if{i}"), tsresol, tsoffset));
        }
        for (i, &(_, _, raw, _)) in cases.iter().enumerate() {
            let sport = 10_000 + u16::try_from(i).expect("i");
            file.extend(ng.epb(u32::try_from(i).expect("i"), raw, &eth(&[], 0x0800, &udp4(sport, 10))));
        }
        let r = run(&write(&tmp, "tsresol.pcapng", &file));
        r.ok();
        assert_eq!(r.count("frames"), cases.len() as u64);
        for (i, &(tsresol, tsoffset, raw, want)) in cases.iter().enumerate() {
            let e = r.new_flow(10_000 + u16::try_from(i).expect("i"));
            assert_eq!(e["time"], want, "raw {raw}, if_tsresol {tsresol:?}, if_tsoffset {tsoffset:?}");
            assert_eq!(e["flow"]["interface"], format!("if{i}"));
        }
    }
}

/// Frames decades apart (a clock that was not set, a wrong if_tsresol) replay: the engine's
/// timers are exact at any distance (when they packed a deadline in 40 bits of milliseconds, the
/// replay of the first file below never ended).
#[test]
fn captures_spanning_decades_replay_in_order_of_their_times() {
    let tmp = TempDir::new("span");
    let frame = |sport| eth(&[], 0x0800, &udp4(sport, 10));
    // Frames decades apart, forwards and backwards: every flow is replayed, and none waits on
    // a timer that a long jump in time would have wrapped (the engine's timers are exact).
    for (first, second) in [(0, 1_700_000_000), (1_700_000_000, 0), (1_000_000_000, 2_000_000_000)] {
        let rec = |secs, sport| record(secs, 0, &frame(sport), full(&frame(sport)));
        let file = pcap(false, 65_535, 1, &[rec(first, 1000), rec(second, 1001), rec(second, 1002)]);
        let r = run(&write(&tmp, "span.pcap", &file));
        r.ok();
        for sport in [1000, 1001, 1002] {
            r.new_flow(sport);
        }
    }
    // A pcapng whose first packet block has no timestamp (the epoch) and whose next has one.
    let ng = Ng::LE;
    let file =
        cat(&[&ng.shb(), &ng.iface("eth0", None, None), &ng.spb(52, &frame(1000)), &ng.epb(0, 1 << 52, &frame(1001))]);
    let r = run(&write(&tmp, "span.pcapng", &file));
    r.ok();
    r.new_flow(1001);
}

/// Times an event cannot carry (before 1970, after 9999) and broken timestamp options are
/// errors naming the frame and its byte offset; the frames before it are replayed.
#[test]
fn pcapng_times_out_of_range_are_errors() {
    let ng = Ng::LE;
    let tmp = TempDir::new("tsrange");
    let frame = |sport| eth(&[], 0x0800, &udp4(sport, 10));
    let cases: [TimeCase; 4] = [
        (Some(0), None, M, "after the year 9999"),                  // 2^64 s
        (Some(6), None, M, "after the year 9999"),                  // 584,542 years
        (Some(0x80), None, 253_402_300_800, "after the year 9999"), // 10000-01-01
        (Some(9), Some(-2), 1_000_000_000, "before 1970"),
    ];
    for (tsresol, tsoffset, raw, why) in cases {
        let good = cat(&[&ng.shb(), &ng.iface("good", None, None), &ng.iface("bad", tsresol, tsoffset)]);
        let first = ng.epb(0, 1_700_000_000_000_000, &frame(1000));
        let offset = good.len() + first.len();
        let file = cat(&[&good, &first, &ng.epb(1, raw, &frame(1001))]);
        let r = run(&write(&tmp, "range.pcapng", &file));
        r.fails_with(&["range.pcapng", &format!("at byte {offset}:"), "frame 2 (enhanced packet block)", why]);
        r.new_flow(1000);
    }
    // An if_tsresol option of the wrong size: the interface block is refused.
    let bad_opt = ng.idb(1, 0, &[ng.opt(9, &[6, 0])]);
    let file = cat(&[&ng.shb(), &bad_opt, &ng.epb(0, 1, &frame(1000))]);
    run(&write(&tmp, "opt.pcapng", &file)).fails_with(&["opt.pcapng", "at byte 28:", "interface description block"]);
}

/// Files cut or corrupt anywhere: a clear error with the file, the byte offset and the frame;
/// never a panic, never a hang, and the frames before the problem are replayed.
#[test]
fn broken_pcapng_files_get_clear_errors() {
    let ng = Ng::LE;
    let tmp = TempDir::new("ngbroken");
    let frame = |sport| eth(&[], 0x0800, &udp4(sport, 10));
    let (shb, idb) = (ng.shb(), ng.iface("eth0", None, None));
    let (e1, e2) = (ng.epb(0, 1_700_000_000_000_000, &frame(1000)), ng.epb(0, 1_700_000_001_000_000, &frame(1001)));
    let good = cat(&[&shb, &idb, &e1, &e2]);
    let at_e1 = shb.len() + idb.len();
    let at_e2 = at_e1 + e1.len();
    let r = run(&write(&tmp, "good.pcapng", &good));
    r.ok();
    r.new_flow(1001);

    // Patches the 32-bit word at `at`.
    let patched = |at: usize, v: u32| {
        let mut f = good.clone();
        f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        f
    };
    let e2_len = u32::try_from(e2.len()).expect("len");
    let cases: Vec<(&str, Vec<u8>, Vec<String>, bool)> = vec![
        (
            "a block cut in the middle",
            good[..good.len() - 10].to_vec(),
            vec![format!("at byte {at_e2}:"), "ends inside this enhanced packet block".into()],
            true,
        ),
        (
            "a block header cut",
            good[..at_e2 + 6].to_vec(),
            vec![format!("at byte {at_e2}:"), "ends inside a block header (6 of 12 bytes)".into()],
            true,
        ),
        (
            "a length that is not a multiple of 4",
            patched(at_e2 + 4, e2_len + 2),
            vec![format!("at byte {at_e2}:"), "impossible length".into()],
            true,
        ),
        (
            "a length below 12",
            patched(at_e2 + 4, 8),
            vec![format!("at byte {at_e2}:"), "impossible length 8".into()],
            true,
        ),
        (
            "a length past the trailer",
            patched(at_e1 + 4, u32::try_from(e1.len()).expect("len") + 4),
            vec![
                format!("at byte {at_e1}:"),
                "frame 1 (enhanced packet block)".into(),
                "its length field says 88 bytes but the copy that ends it says 6".into(),
            ],
            false,
        ),
        (
            "a huge length",
            patched(at_e2 + 4, 0xffff_fff0),
            vec![format!("at byte {at_e2}:"), "length is corrupt".into()],
            true,
        ),
        (
            "a section header cut",
            shb[..20].to_vec(),
            vec!["at byte 0:".into(), "ends inside this section header block".into()],
            false,
        ),
        (
            "a packet block before any interface block",
            cat(&[&shb, &e1]),
            vec![
                format!("at byte {}:", shb.len()),
                "frame 1".into(),
                "names interface 0".into(),
                "none is described yet".into(),
            ],
            false,
        ),
        (
            "an interface id that does not exist",
            cat(&[&shb, &idb, &e1, &ng.epb(3, 1_700_000_001_000_000, &frame(1001))]),
            vec![format!("at byte {at_e2}:"), "frame 2".into(), "names interface 3".into(), "only interface 0".into()],
            true,
        ),
        (
            "a new section forgets the interfaces of the last",
            cat(&[&shb, &idb, &e1, &shb, &e2]),
            vec![format!("at byte {}:", at_e2 + shb.len()), "frame 2".into(), "none is described yet".into()],
            true,
        ),
        (
            "a simple packet block before any interface block",
            cat(&[&shb, &ng.spb(42, &frame(1000))]),
            vec![format!("at byte {}:", shb.len()), "frame 1 (simple packet block)".into()],
            false,
        ),
        (
            "captured length above the original length",
            cat(&[&shb, &idb, &e1, &ng.epb_orig(0, 1_700_000_001_000_000, &frame(1001), 20)]),
            vec![
                format!("at byte {at_e2}:"),
                "frame 2".into(),
                "captured length 52 is more than the original length 20".into(),
            ],
            true,
        ),
        (
            "pcapng version 2",
            cat(&[&ng.shb_version(2), &idb, &e1]),
            vec!["at byte 0:".into(), "pcapng version 2.0 is not supported".into()],
            false,
        ),
        (
            "a section header with a bad byte-order magic",
            cat(&[&shb, &idb, &e1, &ng.block(0x0a0d_0d0a, &[0; 16])]),
            vec![format!("at byte {at_e2}:"), "unknown byte-order magic".into()],
            true,
        ),
        ("a file shorter than a magic number", vec![0x0a, 0x0d], vec!["shorter than a capture header".into()], false),
    ];
    for (what, bytes, parts, first_replayed) in cases {
        let r = run(&write(&tmp, "broken.pcapng", &bytes));
        let mut parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        parts.push("broken.pcapng");
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        r.fails_with(&parts);
        if first_replayed {
            r.new_flow(1000);
        }
    }

    // A section header alone is an empty capture; blocks the replay does not need (here one
    // of an unknown type and statistics with garbage options) are skipped whatever they hold.
    let r = run(&write(&tmp, "empty.pcapng", &shb));
    assert_eq!(r.ok().count("frames"), 0);
    assert!(r.events.is_empty());
    let odd = cat(&[&shb, &idb, &ng.block(0x0bad, &[1, 2, 3]), &ng.block(5, &[0xff; 20]), &e1]);
    let r = run(&write(&tmp, "odd.pcapng", &odd));
    assert_eq!(r.ok().count("frames"), 1);
    r.new_flow(1000);
}

/// pcap: a snap-length-cut packet is replayed as a truncated packet (pcap-file 2.0 refused the
/// whole file: "orig_len > snap_len"); a broken record is an error naming frame and offset.
#[test]
fn broken_pcap_files_get_clear_errors() {
    let tmp = TempDir::new("pcapbroken");
    let small = eth(&[], 0x0800, &udp4(1000, 10));
    let big = eth(&[], 0x0800, &udp4(1001, 500));
    let cut = record(1_700_000_001, 0, &big[..64], full(&big));
    let file = pcap(false, 64, 1, &[record(1_700_000_000, 250_000, &small, full(&small)), cut]);
    let r = run(&write(&tmp, "snap.pcap", &file));
    r.ok();
    assert_eq!(r.count("truncated"), 1, "{}", r.summary);
    assert_eq!(r.new_flow(1000)["time"], "2023-11-14T22:13:20.250000Z");

    // Nanosecond pcap; the FCS bits of the link type field (here: 4 bytes of FCS follow each
    // frame) are not part of the link type.
    let fcs = cat(&[&small, &[0xde, 0xad, 0xbe, 0xef]]);
    let file = pcap(true, 65_535, 0x4400_0001, &[record(1_700_000_000, 123_456_789, &fcs, full(&fcs))]);
    let r = run(&write(&tmp, "nanos.pcap", &file));
    r.ok();
    assert_eq!(r.new_flow(1000)["time"], "2023-11-14T22:13:20.123456Z");

    let first = record(1_700_000_000, 0, &small, full(&small));
    let at2 = 24 + first.len();
    let good = pcap(false, 65_535, 1, &[first.clone(), record(1_700_000_001, 0, &small, full(&small))]);
    let cases: Vec<(&str, Vec<u8>, Vec<String>)> = vec![
        ("a header cut", good[..10].to_vec(), vec!["at byte 0:".into(), "pcap file header (10 of 24 bytes)".into()]),
        (
            "a record header cut",
            good[..at2 + 7].to_vec(),
            vec![format!("at byte {at2}:"), "inside the header of frame 2 (7 of 16 bytes)".into()],
        ),
        (
            "a record cut",
            good[..good.len() - 1].to_vec(),
            vec![format!("at byte {at2}:"), "ends inside frame 2".into()],
        ),
        (
            "captured length above the original length",
            pcap(false, 65_535, 1, &[first.clone(), record(1_700_000_001, 0, &small, 20)]),
            vec![format!("at byte {at2}:"), "frame 2: captured length 52 is more than the original length 20".into()],
        ),
        (
            "a huge captured length",
            {
                let mut f = good.clone();
                f[at2 + 8..at2 + 12].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
                f
            },
            vec![format!("at byte {at2}:"), "frame 2 says it holds 2147483647 bytes".into()],
        ),
        (
            "a timestamp fraction of a second or more",
            pcap(false, 65_535, 1, &[first.clone(), record(1_700_000_001, 1_000_000, &small, full(&small))]),
            vec![format!("at byte {at2}:"), "frame 2: timestamp fraction 1000000".into()],
        ),
    ];
    for (what, bytes, parts) in cases {
        let r = run(&write(&tmp, "broken.pcap", &bytes));
        let mut parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        parts.push("broken.pcap");
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        r.fails_with(&parts);
        if what != "a header cut" {
            r.new_flow(1000);
        }
    }
    // A header alone is an empty capture.
    let r = run(&write(&tmp, "empty.pcap", &pcap(false, 65_535, 1, &[])));
    assert_eq!(r.ok().count("frames"), 0);
}

/// pcapng: a packet a snap length cut reaches the engine and counts as truncated, as does a
/// simple packet block cut at its interface's snap length.
#[test]
fn snaplen_cut_pcapng_packets_are_counted_as_truncated() {
    let ng = Ng::LE;
    let tmp = TempDir::new("ngsnap");
    let small = eth(&[], 0x0800, &udp4(1000, 10));
    let big = eth(&[], 0x0800, &udp4(1001, 500));
    let file = cat(&[
        &ng.shb(),
        &ng.idb(1, 64, &[]),
        &ng.epb(0, 1_700_000_000_000_000, &small),
        &ng.epb_orig(0, 1_700_000_001_000_000, &big[..64], full(&big)),
        &ng.spb(full(&big), &big[..64]),
    ]);
    let r = run(&write(&tmp, "snap.pcapng", &file));
    r.ok();
    assert_eq!((r.count("frames"), r.count("truncated")), (3, 2), "{}", r.summary);
    r.new_flow(1000);
}

/// Every supported link layer, each on an interface of its own in one pcapng: each IP frame is
/// its own flow on its own interface; non-IP frames and frames cut inside their link header
/// are counted and skipped; an interface of an unsupported type without packets is no error.
#[test]
fn every_supported_link_type_replays() {
    let ng = Ng::LE;
    let v4 = |sport| udp4(sport, 10);
    let q = |tpid: u16, vid: u16| cat(&[&tpid.to_be_bytes(), &vid.to_be_bytes()]);
    // (link type, frame, local port of its flow or None)
    let frames: Vec<(u16, Vec<u8>, Option<u16>)> = vec![
        (1, eth(&[], 0x0800, &v4(2000)), Some(2000)),
        (1, eth(&q(0x8100, 5), 0x86dd, &udp6(2001)), Some(2001)),
        (1, eth(&cat(&[&q(0x88a8, 7), &q(0x8100, 5)]), 0x0800, &v4(2002)), Some(2002)),
        (1, eth(&cat(&[&q(0x9100, 7), &q(0x8100, 5), &q(0x8100, 6)]), 0x0800, &v4(2003)), Some(2003)),
        (113, sll(1, 0x0800, &v4(2004)), Some(2004)),   // an Ethernet device
        (113, sll(772, 0x0800, &v4(2005)), Some(2005)), // loopback (etherparse refuses it)
        (113, sll(65534, 0x86dd, &udp6(2006)), Some(2006)), // tun, WireGuard
        (113, sll(512, 0x0800, &v4(2007)), Some(2007)), // PPP
        (113, sll(1, 0x8100, &cat(&[&5u16.to_be_bytes(), &0x0800u16.to_be_bytes(), &v4(2008)])), Some(2008)),
        (276, sll2(1, 0x0800, &v4(2009)), Some(2009)),
        (276, sll2(65534, 0x86dd, &udp6(2010)), Some(2010)),
        (101, v4(2011), Some(2011)),
        (228, v4(2012), Some(2012)),
        (229, udp6(2013), Some(2013)),
        (0, cat(&[&2u32.to_le_bytes(), &v4(2014)]), Some(2014)), // NULL, little-endian host
        (0, cat(&[&30u32.to_be_bytes(), &udp6(2015)]), Some(2015)), // NULL, big-endian macOS
        (108, cat(&[&24u32.to_be_bytes(), &udp6(2016)]), Some(2016)), // LOOP, OpenBSD
        (108, cat(&[&2u32.to_be_bytes(), &v4(2017)]), Some(2017)),
        // Not IP: counted in non_ip_frames.
        (1, eth(&[], 0x0806, &ARP), None),
        (1, eth(&q(0x8100, 5), 0x0806, &ARP), None),
        (113, sll(1, 0x0806, &ARP), None),
        (113, sll(824, 0x0800, &[0; 20]), None), // netlink: its protocol is a netlink family
        (113, sll(1, 0x0004, &[0; 20]), None),   // 802.2 LLC
        (276, sll2(772, 0x0806, &ARP), None),
        (0, cat(&[&7u32.to_le_bytes(), &[0; 20]]), None),
        // Cut inside the link header: counted as truncated.
        (1, MACS[..10].to_vec(), None),
        (1, cat(&[&MACS, &[0x81, 0x00, 0]]), None), // a VLAN tag cut
        (113, sll(1, 0x0800, &[])[..12].to_vec(), None),
        (276, sll2(1, 0x0800, &[])[..18].to_vec(), None),
        (0, vec![2, 0, 0], None),
    ];
    let mut file = ng.shb();
    file.extend(ng.idb(127, 0, &[ng.opt(2, b"wlan0mon")])); // unsupported, but carries no packet
    for (i, (link, _, _)) in frames.iter().enumerate() {
        file.extend(ng.idb(*link, 0, &[ng.opt(2, format!("if{i}").as_bytes())]));
    }
    for (i, (_, data, _)) in frames.iter().enumerate() {
        let ts = 1_700_000_000_000_000 + 1000 * u64::try_from(i).expect("i");
        file.extend(ng.epb(u32::try_from(i + 1).expect("i"), ts, data));
    }
    let tmp = TempDir::new("links");
    let r = run(&write(&tmp, "links.pcapng", &file));
    r.ok();
    for (i, (link, _, sport)) in frames.iter().enumerate() {
        if let Some(sport) = sport {
            assert_eq!(r.new_flow(*sport)["flow"]["interface"], format!("if{i}"), "link type {link}");
        }
    }
    let ip = frames.iter().filter(|f| f.2.is_some()).count() as u64;
    assert_eq!(r.count("flows_opened"), ip, "{}", r.summary);
    assert_eq!(r.count("non_ip_frames"), 7, "{}", r.summary);
    assert_eq!(r.count("truncated"), 5, "{}", r.summary);
    assert_eq!(r.count("malformed") + r.count("not_ip"), 0, "{}", r.summary);
}

/// A frame of a link type the replay cannot read is an error naming the link type and the
/// frame (never a mis-parse, never a silent skip).
#[test]
fn unknown_link_types_are_errors() {
    let ng = Ng::LE;
    let tmp = TempDir::new("unknown");
    let frame = eth(&[], 0x0800, &udp4(1000, 10));
    let file = cat(&[
        &ng.shb(),
        &ng.iface("eth0", None, None),
        &ng.idb(127, 0, &[]),
        &ng.epb(0, 1_700_000_000_000_000, &frame),
        &ng.epb(1, 1_700_000_000_000_001, &frame),
    ]);
    let at = file.len() - ng.epb(1, 0, &frame).len();
    let r = run(&write(&tmp, "radiotap.pcapng", &file));
    r.fails_with(&[
        "radiotap.pcapng",
        &format!("at byte {at}:"),
        "frame 2",
        "link type 127 (IEEE802_11_RADIOTAP) is not supported",
    ]);
    r.new_flow(1000);
    let file = pcap(false, 65_535, 147, &[record(1_700_000_000, 0, &frame, full(&frame))]);
    run(&write(&tmp, "user0.pcap", &file)).fails_with(&["user0.pcap", "at byte 24:", "frame 1", "link type 147"]);
}

/// The obsolete Packet Block (whose timestamp pcap-file reads with swapped halves in
/// little-endian sections) and the Simple Packet Block (no timestamp: the time of the frame
/// before it), in sections of both byte orders.
#[test]
fn packet_and_simple_packet_blocks_in_both_byte_orders() {
    let tmp = TempDir::new("pb");
    for big in [false, true] {
        let ng = Ng { big };
        let file = cat(&[
            &ng.shb(),
            &ng.iface("eth0", Some(9), None),
            &ng.pb(0, 1_700_000_000_250_000_000, &eth(&[], 0x0800, &udp4(1000, 10))),
            &ng.spb(60, &eth(&[], 0x0800, &udp4(1001, 10))),
            &ng.epb(0, 1_700_000_001_000_000_000, &eth(&[], 0x0800, &udp4(1002, 10))),
        ]);
        let r = run(&write(&tmp, "pb.pcapng", &file));
        r.ok();
        assert_eq!(r.count("frames"), 3);
        assert_eq!(r.new_flow(1000)["time"], "2023-11-14T22:13:20.250000Z", "big endian: {big}");
        assert_eq!(r.new_flow(1001)["time"], "2023-11-14T22:13:20.250000Z", "big endian: {big}");
        assert_eq!(r.new_flow(1001)["flow"]["interface"], "eth0");
        assert_eq!(r.new_flow(1002)["time"], "2023-11-14T22:13:21.000000Z", "big endian: {big}");
    }
}

/// The recorded captures give exactly the events the replay gave before it read link layers
/// with etherparse and framed records itself (`tests/data/expected/`, see its README).
#[test]
fn recorded_captures_give_the_same_events_as_before() {
    for name in [
        "http_curl_v4.pcap",
        "icmp_ping.pcap",
        "mixed_v4v6.pcapng",
        "socat_tcp_inbound_v4.pcap",
        "socat_tcp_v4.pcap",
        "socat_tcp_v6.pcapng",
        "socat_udp_v4.pcap",
    ] {
        let want = std::fs::read_to_string(data(&format!("expected/{name}.events.jsonl"))).expect("expected events");
        let want: Vec<Value> = want.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
        assert!(!want.is_empty());
        let r = run(&data(name));
        r.ok();
        assert_eq!(r.events, want, "{name}");
    }
}

/// Damaged copies of the recorded captures and of crafted ones (bytes changed, files cut):
/// every replay ends, with success or a clean error, never a panic or a hang.
#[test]
fn damaged_captures_never_panic_or_hang() {
    let tmp = TempDir::new("damage");
    let ng = Ng::LE;
    let frame = eth(&[0x81, 0, 0, 5], 0x0800, &udp4(1000, 10));
    let crafted = cat(&[
        &ng.shb(),
        &ng.iface("a", Some(0x80 | 40), Some(-5)),
        &ng.idb(113, 0, &[]),
        &ng.epb(0, 1 << 60, &frame),
        &ng.epb(1, 5, &sll(772, 0x0800, &udp4(1001, 3))),
        &ng.spb(40, &frame),
        &ng.pb(0, 1 << 50, &frame),
    ]);
    let mut seeds: Vec<(String, Vec<u8>)> = ["mixed_v4v6.pcapng", "socat_tcp_v4.pcap", "icmp_ping.pcap"]
        .iter()
        .map(|n| ((*n).to_string(), std::fs::read(data(n)).expect("read capture")))
        .collect();
    seeds.push(("crafted.pcapng".into(), crafted));
    // xorshift64: the same damage on every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % below as u64).expect("fits")
    };
    let mut outcomes = [0u32; 2];
    for (name, bytes) in &seeds {
        for round in 0..40 {
            let mut b = bytes.clone();
            match round % 4 {
                // Cut anywhere.
                0 => b.truncate(next(b.len())),
                // Change bytes in the first 300 (headers, lengths, options, timestamps).
                1 => {
                    for _ in 0..=next(4) {
                        let at = next(b.len().min(300));
                        b[at] = u8::try_from(next(256)).expect("byte");
                    }
                }
                // Change bytes anywhere.
                2 => {
                    for _ in 0..=next(8) {
                        let at = next(b.len());
                        b[at] ^= 1 << next(8);
                    }
                }
                // Put a large or odd value into a 32-bit word.
                _ => {
                    let at = next(b.len() - 4);
                    let v = [0xffff_ffffu32, 0x8000_0000, 0x7fff_fffc, 13, 0, 12][next(6)];
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            }
            let r = run(&write(&tmp, "damaged.cap", &b));
            assert!(
                matches!(r.code, Some(0 | 1)) && !r.stderr.contains("panicked"),
                "{name}, round {round}: exit {:?}: {}",
                r.code,
                r.stderr
            );
            if r.code == Some(1) {
                assert!(r.stderr.contains("damaged.cap"), "{name}, round {round}: {}", r.stderr);
            }
            outcomes[usize::from(r.code == Some(1))] += 1;
        }
    }
    // Both outcomes happen: the damage is neither always harmless nor always fatal.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");

    // Every if_tsresol byte, with the largest count and with a present-day one.
    for tsresol in 0..=255u8 {
        for raw in [M, 1_700_000_000_000_000] {
            let file = cat(&[&ng.shb(), &ng.iface("a", Some(tsresol), None), &ng.epb(0, raw, &frame)]);
            let r = run(&write(&tmp, "tsresol.pcapng", &file));
            assert!(matches!(r.code, Some(0 | 1)) && !r.stderr.contains("panicked"), "{tsresol:#x}: {}", r.stderr);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// IP fragments: crafted captures of fragmented datagrams, put together before the engine.
// ---------------------------------------------------------------------------------------------

const FRAG_CONFIG: &str = "local_addresses = [\"198.51.100.1\", \"2001:db8:1::1\"]\n\
                           [[rule]]\nname = \"no-mdns-port\"\nremote_ports = \"5353\"\naction = \"drop\"\n";

/// An IPv4 packet 198.51.100.1:40000 -> 203.0.113.7:5353 (UDP, or a TCP SYN with options),
/// identification `id`, DF clear.
fn to_5353_v4(id: u16, tcp_syn: bool, payload: &[u8]) -> Vec<u8> {
    let proto = if tcp_syn { etherparse::ip_number::TCP } else { etherparse::ip_number::UDP };
    let mut h = etherparse::Ipv4Header::new(0, 64, proto, [198, 51, 100, 1], [203, 0, 113, 7]).expect("header");
    h.identification = id;
    h.dont_fragment = false;
    let b = etherparse::PacketBuilder::ip(etherparse::IpHeaders::Ipv4(h, Default::default()));
    let mut out = Vec::new();
    if tcp_syn {
        let mss = [etherparse::TcpOptionElement::MaximumSegmentSize(1460), etherparse::TcpOptionElement::Noop];
        b.tcp(40000, 5353, 1, 65535).syn().options(&mss).expect("options").write(&mut out, payload).expect("write");
    } else {
        b.udp(40000, 5353).write(&mut out, payload).expect("write");
    }
    out
}

/// Cuts an IPv4 packet into fragments of `size` bytes of payload (a multiple of 8).
fn fragments_v4(whole: &[u8], size: usize) -> Vec<Vec<u8>> {
    let (h, rest) = etherparse::Ipv4Header::from_slice(whole).expect("IPv4");
    let payload = &rest[..usize::from(h.total_len) - h.header_len()];
    (0..payload.len())
        .step_by(size)
        .map(|a| {
            let b = (a + size).min(payload.len());
            let mut f = h.clone();
            f.total_len = u16::try_from(h.header_len() + b - a).expect("len");
            f.more_fragments = b < payload.len();
            f.fragment_offset =
                etherparse::IpFragOffset::try_new(u16::try_from(a / 8).expect("offset")).expect("offset");
            f.header_checksum = f.calc_header_checksum();
            cat(&[&f.to_bytes(), &payload[a..b]])
        })
        .collect()
}

/// An IPv6 UDP packet [2001:db8:1::1]:40000 -> [2001:db8:2::10]:5353, cut into fragments of
/// `size` bytes (a multiple of 8) after the IPv6 header.
fn fragments_v6(payload: &[u8], size: usize, id: u32) -> (Vec<u8>, Vec<Vec<u8>>) {
    let a = |last: u8, net: u8| {
        let mut x = [0u8; 16];
        x[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, net]);
        x[15] = last;
        x
    };
    let mut whole = Vec::new();
    etherparse::PacketBuilder::ipv6(a(1, 1), a(0x10, 2), 64)
        .udp(40000, 5353)
        .write(&mut whole, payload)
        .expect("write");
    let rest = &whole[40..];
    let frags = (0..rest.len())
        .step_by(size)
        .map(|at| {
            let end = (at + size).min(rest.len());
            let offset = etherparse::IpFragOffset::try_new(u16::try_from(at / 8).expect("offset")).expect("offset");
            let fh = etherparse::Ipv6FragmentHeader::new(etherparse::ip_number::UDP, offset, end < rest.len(), id);
            let mut f = cat(&[&whole[..40], &fh.to_bytes(), &rest[at..end]]);
            f[6] = 44;
            let len = u16::try_from(f.len() - 40).expect("len");
            f[4..6].copy_from_slice(&len.to_be_bytes());
            f
        })
        .collect();
    (whole, frags)
}

/// A raw-IP pcap of `packets`, one millisecond apart.
fn raw_capture(tmp: &TempDir, name: &str, packets: &[Vec<u8>]) -> PathBuf {
    let records: Vec<Vec<u8>> = packets
        .iter()
        .enumerate()
        .map(|(i, p)| record(1_700_000_000, u32::try_from(i).expect("index") * 1000, p, full(p)))
        .collect();
    write(tmp, name, &pcap(false, 65_535, 101, &records))
}

/// `flowgate replay CAPTURE --config FRAG_CONFIG --json`: the events and the summary.
fn replay_fragments(tmp: &TempDir, capture: &Path) -> (Vec<Value>, Value) {
    let config = tmp.file("frag.toml", FRAG_CONFIG);
    let out =
        flowgate(&["replay", capture.to_str().expect("path"), "--config", config.to_str().expect("path"), "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("{\"summary\""))
        .map(|l| serde_json::from_str::<Value>(l).expect("summary JSON")["summary"].clone())
        .unwrap_or_else(|| panic!("no JSON summary in {stderr}"));
    (events, summary)
}

/// A counter of a replay summary.
fn count(summary: &Value, key: &str) -> u64 {
    summary[key].as_u64().unwrap_or_else(|| panic!("no {key} in summary {summary}"))
}

/// The capture's one flow was judged by the port rule: `flow.new` and `flow.verdict` with its
/// ports and the drop verdict, and it carried one packet of `ip_len` bytes out.
fn judged_once(events: &[Value], summary: &Value, protocol: &str, local: &str, remote: &str, ip_len: usize) {
    let new = events.iter().filter(|e| e["event"] == "flow.new").collect::<Vec<_>>();
    assert_eq!(new.len(), 1, "one flow: {events:?}");
    let f = &new[0]["flow"];
    assert_eq!(
        (f["protocol"].as_str(), f["local"].as_str(), f["remote"].as_str()),
        (Some(protocol), Some(local), Some(remote))
    );
    assert_eq!(f["direction"], "outbound");
    let verdict =
        events.iter().find(|e| e["event"] == "flow.verdict").unwrap_or_else(|| panic!("no verdict: {events:?}"));
    assert_eq!((verdict["verdict"].as_str(), verdict["rule"].as_str()), (Some("drop"), Some("no-mdns-port")));
    assert_eq!(verdict["flow"]["id"], f["id"]);
    let closed = events.iter().find(|e| e["event"] == "flow.closed").expect("closed at the end");
    assert_eq!(
        (closed["packets_out"].as_u64(), closed["bytes_out"].as_u64()),
        (Some(1), Some(ip_len as u64)),
        "{closed}"
    );
    assert_eq!(count(summary, "datagrams_reassembled"), 1, "{summary}");
    assert_eq!((count(summary, "datagrams_refused"), count(summary, "datagrams_incomplete")), (0, 0), "{summary}");
    assert_eq!(
        (count(summary, "fragments"), count(summary, "packets")),
        (0, 1),
        "the engine saw one whole packet: {summary}"
    );
}

#[test]
fn a_udp_datagram_fragmented_in_order_is_judged_whole() {
    let tmp = TempDir::new("frag-in-order");
    let whole = to_5353_v4(0x4242, false, &(0..3000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let frags = fragments_v4(&whole, 1480);
    assert_eq!(frags.len(), 3);
    // Ethernet frames, with an ARP frame between the fragments.
    let records: Vec<Vec<u8>> = [eth(&[], 0x0800, &frags[0]), eth(&[], 0x0806, &ARP), eth(&[], 0x0800, &frags[1])]
        .into_iter()
        .chain([eth(&[], 0x0800, &frags[2])])
        .enumerate()
        .map(|(i, f)| record(1_700_000_000, u32::try_from(i).expect("i") * 1000, &f, full(&f)))
        .collect();
    let capture = write(&tmp, "in-order.pcap", &pcap(false, 65_535, 1, &records));
    let (events, summary) = replay_fragments(&tmp, &capture);
    judged_once(&events, &summary, "udp", "198.51.100.1:40000", "203.0.113.7:5353", whole.len());
    // Judged at the time of its last fragment.
    let new = events.iter().find(|e| e["event"] == "flow.new").expect("new");
    assert!(new["time"].as_str().is_some_and(|t| t.ends_with(":20.003000Z")), "{new}");
    // The sentence says it too.
    let config = tmp.file("frag.toml", FRAG_CONFIG);
    let out = flowgate(&["replay", capture.to_str().expect("path"), "--config", config.to_str().expect("path")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("IP fragments: 1 datagrams reassembled, 0 refused"), "{stderr}");
}

#[test]
fn a_udp_datagram_fragmented_out_of_order_is_judged_whole() {
    let tmp = TempDir::new("frag-reversed");
    let whole = to_5353_v4(7, false, &[0x5a; 3000]);
    let mut frags = fragments_v4(&whole, 1480);
    frags.reverse();
    let (events, summary) = replay_fragments(&tmp, &raw_capture(&tmp, "reversed.pcap", &frags));
    judged_once(&events, &summary, "udp", "198.51.100.1:40000", "203.0.113.7:5353", whole.len());
}

#[test]
fn ipv6_fragments_are_judged_whole() {
    let tmp = TempDir::new("frag-v6");
    let (whole, frags) = fragments_v6(&[0x66; 3000], 1232, 0x0102_0304);
    assert_eq!(frags.len(), 3);
    let shuffled = vec![frags[1].clone(), frags[2].clone(), frags[0].clone()];
    let (events, summary) = replay_fragments(&tmp, &raw_capture(&tmp, "v6.pcap", &shuffled));
    judged_once(&events, &summary, "udp", "[2001:db8:1::1]:40000", "[2001:db8:2::10]:5353", whole.len());
}

#[test]
fn a_tcp_syn_in_tiny_fragments_is_judged_whole() {
    let tmp = TempDir::new("frag-syn");
    let whole = to_5353_v4(99, true, &[]);
    let mut frags = fragments_v4(&whole, 8);
    assert_eq!(frags.len(), 4, "a 28-byte TCP header (MSS, padding) in 8-byte fragments");
    // Last first, the first in the middle.
    frags.swap(0, 3);
    frags.swap(1, 3);
    let (events, summary) = replay_fragments(&tmp, &raw_capture(&tmp, "syn.pcap", &frags));
    judged_once(&events, &summary, "tcp", "198.51.100.1:40000", "203.0.113.7:5353", whole.len());
}

#[test]
fn conflicting_overlapping_fragments_are_refused_and_counted() {
    let tmp = TempDir::new("frag-conflict");
    let whole = to_5353_v4(5, false, &[0x11; 3000]);
    let frags = fragments_v4(&whole, 1480);
    // A copy of the second fragment one 8-byte block earlier, overlapping the first fragment's
    // last block with other bytes.
    let mut evil = fragments_v4(&to_5353_v4(5, false, &[0x22; 3000]), 1480).remove(1);
    let offset = (1480 - 8) / 8;
    evil[6..8].copy_from_slice(&(0x2000u16 | offset).to_be_bytes());
    let capture = raw_capture(&tmp, "conflict.pcap", &[frags[0].clone(), evil, frags[1].clone(), frags[2].clone()]);
    let (events, summary) = replay_fragments(&tmp, &capture);
    let summary = &summary;
    assert!(events.is_empty(), "no flow is judged from refused fragments: {events:?}");
    assert_eq!(count(summary, "datagrams_refused"), 1, "{summary}");
    assert_eq!((count(summary, "datagrams_reassembled"), count(summary, "flows_opened")), (0, 0), "{summary}");
    assert_eq!((count(summary, "fragments"), count(summary, "packets")), (0, 0), "none reached the engine: {summary}");
}
