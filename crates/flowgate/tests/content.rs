//! Content inspection, live (issue 10): the real daemon in the namespace lab (`lab/mod.rs`)
//! judging flows by what their first bytes say, against real programs: curl over TLS and HTTP
//! to servers with a test certificate made at test time, dnsmasq and dig, an HTTP/3 client and
//! server on aioquic, and a product's `FlowFilter` in an embedded daemon.
//!
//! The programs and scripts: `tests/content/servers.py` (TLS and plain-HTTP servers that log
//! every connection with the raw bytes it delivered, so "not one byte of the blocked request
//! passed" is checked at the server), `tests/content/quic_server.py` and `quic_client.py`
//! (aioquic, from the venv `/opt/flowgate-test-venv` that `scripts/test.sh` makes from
//! `tests/content/requirements.txt`), Debian's curl, openssl, dnsmasq (dnsmasq-base) and dig
//! (bind9-dnsutils). Without root or one of them a test says so and passes, except under CI
//! (`CI` set), where it fails.
//!
//! `FLOWGATE_CONTENT_BASELINE=1` runs every test with the same programs and daemon but without
//! the host rules and the hosts file, and expects every client to get through: it tells a
//! failure of the lab's programs from a failure of the filter.
//!
//! Everything a test starts is stopped by a Drop guard, on failure too (servers, the daemon,
//! the lab's namespaces, temp directories).

mod lab;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowgate_core::{DataVerdict, Direction, Flow, FlowFilter, NewFlowVerdict};
use lab::*;
use serde_json::Value;

const FLOWGATE: &str = env!("CARGO_BIN_EXE_flowgate");
/// Debian's python (standard library only: servers.py).
const SYS_PYTHON: &str = "/usr/bin/python3";
/// The venv with aioquic (scripts/test.sh makes it).
const VENV_PYTHON: &str = "/opt/flowgate-test-venv/bin/python";
const READY: Duration = Duration::from_secs(60);
/// The service address of srv as events write a remote.
const TLS_REMOTE: &str = "203.0.113.10:443";
const HTTP_REMOTE: &str = "203.0.113.10:80";

const BLOCK_RULE: &str = "[[rule]]\nname = \"no-blocked\"\nhost = \"blocked.example\"\naction = \"drop\"\n";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            // Skipped is not passed: under CI a test that cannot run fails.
            assert!(std::env::var_os("CI").is_none(), "live tests need root (network namespaces, netfilter)");
            eprintln!("skipped: live tests need root (network namespaces, netfilter)");
            return;
        }
    };
}

/// Returns from the test (or fails it under CI) when a program it needs is missing.
macro_rules! require {
    ($($tool:expr),+ $(,)?) => {
        if let Some(missing) = missing(&[$($tool),+]) {
            assert!(std::env::var_os("CI").is_none(), "missing {missing} (scripts/test.sh installs it), and CI is set");
            eprintln!("skipped: missing {missing} (scripts/test.sh installs it)");
            return;
        }
    };
}

/// The first of `tools` that is not there: a command on PATH, an absolute path, or `aioquic`
/// (the venv's python can import it).
fn missing(tools: &[&str]) -> Option<String> {
    tools.iter().find_map(|&t| {
        let have = match t {
            "aioquic" => std::process::Command::new(VENV_PYTHON)
                .args(["-c", "import aioquic"])
                .output()
                .is_ok_and(|o| o.status.success()),
            p if p.starts_with('/') => Path::new(p).exists(),
            cmd => std::process::Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .output()
                .is_ok_and(|o| o.status.success()),
        };
        (!have).then(|| if t == "aioquic" { format!("aioquic in {VENV_PYTHON}") } else { t.to_string() })
    })
}

/// Baseline mode (see the module doc): no host rules, everything must get through.
fn baseline() -> bool {
    std::env::var_os("FLOWGATE_CONTENT_BASELINE").is_some_and(|v| !v.is_empty() && v != "0")
}

/// `text` (rules, hosts_file), or nothing in baseline mode.
fn host_rules(text: &str) -> String {
    if baseline() {
        eprintln!("baseline mode: the daemon runs without:\n{text}");
        String::new()
    } else {
        text.to_string()
    }
}

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/content").join(name).display().to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// The test certificate and the servers
// ---------------------------------------------------------------------------------------------

/// A self-signed P-256 certificate for allowed.example and blocked.example, made by openssl in
/// a temp directory; it is its own CA for the clients.
struct TestCert {
    _dir: ScratchDir,
    cert: String,
    key: String,
}

fn test_cert() -> TestCert {
    let dir = ScratchDir::new("cert");
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-subj", "/CN=flowgate-test", "-days", "2"])
        .args(["-addext", "subjectAltName=DNS:allowed.example,DNS:blocked.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    TestCert { cert: s(&cert), key: s(&key), _dir: dir }
}

/// A server script running in srv, logging one JSON line per connection (or event) to `log`.
struct ScriptServer {
    _child: Child,
    log: PathBuf,
    _dir: ScratchDir,
}

impl ScriptServer {
    /// `servers.py tls|http` on `addr` (TCP), listening when this returns.
    fn tcp(lab: &Lab, mode: &str, addr: SocketAddr, cert: Option<&TestCert>) -> ScriptServer {
        let dir = ScratchDir::new(mode);
        let log = dir.path("connections.jsonl");
        let (ip, port, logs) = (addr.ip().to_string(), addr.port().to_string(), s(&log));
        let servers = script("servers.py");
        let mut args = vec![SYS_PYTHON, &servers, mode, "--addr", &ip, "--port", &port, "--log", &logs];
        if let Some(c) = cert {
            args.extend(["--cert", &c.cert, "--key", &c.key]);
        }
        let child = lab.srv.spawn(&args);
        wait_listed(&lab.srv, Proto::Tcp, addr);
        ScriptServer { _child: child, log, _dir: dir }
    }

    /// `quic_server.py` on `addr` (UDP), bound when this returns.
    fn quic(lab: &Lab, addr: SocketAddr, cert: &TestCert) -> ScriptServer {
        let dir = ScratchDir::new("quic");
        let log = dir.path("quic.jsonl");
        let (ip, port, logs) = (addr.ip().to_string(), addr.port().to_string(), s(&log));
        let quic = script("quic_server.py");
        let args = [
            VENV_PYTHON,
            &quic,
            "--addr",
            &ip,
            "--port",
            &port,
            "--cert",
            &cert.cert,
            "--key",
            &cert.key,
            "--log",
            &logs,
        ];
        let child = lab.srv.spawn(&args);
        wait_listed(&lab.srv, Proto::Udp, addr);
        ScriptServer { _child: child, log, _dir: dir }
    }

    fn records(&self) -> Vec<Value> {
        json_lines(&self.log)
    }

    /// The record of the connection from `peer` (`addr:port`). The server writes it when the
    /// connection ends: at once when it was reset, after its 10-s idle timeout otherwise; so
    /// this waits up to 12 s, and None means no connection from `peer` reached the server.
    fn connection_from(&self, peer: &str) -> Option<Value> {
        let deadline = Instant::now() + Duration::from_secs(12);
        loop {
            if let Some(r) = self.records().into_iter().find(|r| r["peer"] == peer) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20)); // bounded polling of its log
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What one curl run did: whether it exited 0, its body, the local port it used (0 if it never
/// connected) and its stderr.
#[derive(Debug)]
struct Fetch {
    ok: bool,
    body: String,
    port: u16,
    #[allow(dead_code, reason = "shown in failure messages, through Debug")]
    stderr: String,
}

/// Runs curl in `ns` with `args`, bounded to 5 s, writing its local port after the body.
fn curl(ns: &Netns, args: &[&str]) -> Fetch {
    let mut all = vec!["curl", "-sS", "--max-time", "5", "-w", "\n@@%{local_port}"];
    all.extend_from_slice(args);
    let o = ns.run(&all);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, port) = out.rsplit_once("\n@@").unwrap_or((&out, "0"));
    Fetch {
        ok: o.status.success(),
        body: body.to_string(),
        port: port.trim().parse().unwrap_or(0),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `curl https://NAME/` to srv's TLS server by `--resolve` (no DNS), trusting the test CA.
fn curl_tls(ns: &Netns, cert: &TestCert, name: &str) -> Fetch {
    let resolve = format!("{name}:443:203.0.113.10");
    curl(ns, &["--resolve", &resolve, "--cacert", &cert.cert, &format!("https://{name}/")])
}

/// `curl http://203.0.113.10/ -H 'Host: NAME'`.
fn curl_http(ns: &Netns, name: &str) -> Fetch {
    curl(ns, &["-H", &format!("Host: {name}"), "http://203.0.113.10/"])
}

/// The client address of a namespace as events and servers write it (`addr:port`).
fn client(ns_is_cli: bool, port: u16) -> String {
    format!("{}:{port}", if ns_is_cli { CLI_V4 } else { HOST_SRV_SIDE_V4 })
}

/// Checks a fetch: it must have worked with `body`, or (blocked) failed.
fn check_fetch(f: &Fetch, works: bool, body: &str, what: &str) {
    if works {
        assert!(f.ok && f.body == body, "{what}: expected the page {body:?}, got {f:?}");
    } else {
        assert!(!f.ok, "{what}: the fetch must fail (blocked), but it worked: {f:?}");
        assert_ne!(f.port, 0, "{what}: curl never connected, so the block proves nothing: {f:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// Waits (up to 10 s) until the flow between `local` and `remote` has a settled final verdict
/// (neither `inspect` nor `pause`), and returns its id, verdict, rule and host; panics with the
/// events of the flow when it does not settle.
fn settled(d: &FlowgateRun, local: &str, remote: &str) -> (u64, String, String, Value) {
    let id = poll_until(&format!("a flow {local} -> {remote} in the events"), Duration::from_secs(10), || {
        flows_between(&d.events(), local, remote).first().copied()
    });
    let (v, r, h) = settled_flow(d, id);
    (id, v, r, h)
}

/// Waits (up to 10 s) until flow `id` has a settled final verdict, and returns it, its rule and
/// its host; panics with the flow's events when it does not settle.
fn settled_flow(d: &FlowgateRun, id: u64) -> (String, String, Value) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = d.events();
        // "The last verdict event of a flow" must mean the last one decided: a flow's events are
        // logged in the order they happened.
        let mine = events_of(&ev, id);
        let first_verdict = mine.iter().position(|e| e["event"] == "flow.verdict");
        let early_update = mine.iter().position(|e| e["event"] == "flow.update");
        if let (Some(v), Some(u)) = (first_verdict, early_update) {
            assert!(u > v, "flow {id}: a flow.update is logged before its flow.verdict: {mine:#?}");
        }
        if let Some((v, r)) = final_verdict(&ev, id)
            && v != "inspect"
            && v != "pause"
        {
            return (v, r, host_of(&ev, id).unwrap_or(Value::Null));
        }
        if Instant::now() >= deadline {
            panic!("flow {id} has no settled verdict within 10 s; its events: {:#?}", events_of(&ev, id));
        }
        std::thread::sleep(Duration::from_millis(20)); // bounded polling of the event log
    }
}

/// The verdict events of the flow between `local` and `remote` so far, one line each
/// (`event verdict/rule/source time host`), for failure messages.
fn history(d: &FlowgateRun, local: &str, remote: &str) -> String {
    let ev = d.events();
    let Some(&id) = flows_between(&ev, local, remote).first() else {
        return format!("no flow {local} -> {remote} logged");
    };
    let lines: Vec<String> = events_of(&ev, id)
        .iter()
        .filter(|e| e["event"] == "flow.verdict" || e["event"] == "flow.update")
        .map(|e| {
            let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
            format!(
                "{} {}/{}/{} {} host {}",
                s(&e["event"]),
                s(&e["verdict"]),
                s(&e["rule"]),
                s(&e["source"]),
                s(&e["time"]),
                e["flow"]["host"]
            )
        })
        .collect();
    format!("flow {id}:\n  {}", lines.join("\n  "))
}

/// Checks a settled flow: verdict and rule, and its host (name, source, ALPN; `ech` false).
fn check_flow(d: &FlowgateRun, local: &str, remote: &str, want: (&str, Option<&str>), host: (&str, &str, &[&str])) {
    let (id, verdict, rule, h) = settled(d, local, remote);
    let what = format!("{} ({local} -> {remote})", history(d, local, remote));
    if baseline() {
        assert_eq!(verdict, "allow", "{what}: baseline mode allows everything");
        return;
    }
    assert_eq!(verdict, want.0, "{what}: final verdict (rule {rule:?}); host {h}");
    if let Some(r) = want.1 {
        assert_eq!(rule, r, "{what}: the rule of the final verdict");
    }
    assert_eq!(h["name"], host.0, "{what}: host {h}");
    assert_eq!(h["source"], host.1, "{what}: host {h}");
    let alpn: Vec<&str> =
        h["alpn"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    assert_eq!(alpn, host.2, "{what}: ALPN in host {h}");
    if host.1 != "dns" && host.1 != "http" {
        assert_eq!(h["ech"], false, "{what}: no ECH in host {h}");
    }
    if verdict == "drop" {
        // Pending on its host, the flow was held as `inspect`, then updated once it was known.
        let ev = d.events();
        let mine = events_of(&ev, id);
        assert!(
            mine.iter().any(|e| e["event"] == "flow.update" && e["source"] == "host" && e["verdict"] == "drop"),
            "{what}: a flow.update with source host and verdict drop: {mine:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. TLS by SNI
// ---------------------------------------------------------------------------------------------

#[test]
fn tls_is_dropped_by_sni_before_one_byte_of_the_request_passes() {
    require_root!();
    require!("openssl", "curl", SYS_PYTHON);
    let lab = Lab::new("sni");
    let cert = test_cert();
    let tls = ScriptServer::tcp(&lab, "tls", SocketAddr::new(SRV_SERVICE_V4.into(), 443), Some(&cert));
    let d = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "sni", &host_rules(BLOCK_RULE), READY);
    let blocking = !baseline();

    for (ns, is_cli) in [(&lab.host, false), (&lab.cli, true)] {
        let from = if is_cli { "cli (forwarded)" } else { "host (local)" };
        let blocked = curl_tls(ns, &cert, "blocked.example");
        check_fetch(&blocked, !blocking, "hello blocked.example\n", &format!("https://blocked.example/ from {from}"));
        let allowed = curl_tls(ns, &cert, "allowed.example");
        check_fetch(&allowed, true, "hello allowed.example\n", &format!("https://allowed.example/ from {from}"));

        // Not one byte of the blocked connection reached the server (it may have seen the
        // handshake, then a reset).
        let peer = client(is_cli, blocked.port);
        match tls.connection_from(&peer) {
            Some(r) if blocking => {
                assert_eq!(r["bytes"], 0, "from {from}: the server got bytes of the blocked request: {r}")
            }
            Some(r) => assert_eq!(r["host"], "blocked.example", "baseline: {r}"),
            None => assert!(blocking, "baseline: no connection from {peer} at the server"),
        }
        let ok = tls.connection_from(&client(is_cli, allowed.port)).expect("the allowed connection at the server");
        assert_eq!(
            (ok["sni"].as_str(), ok["host"].as_str()),
            (Some("allowed.example"), Some("allowed.example")),
            "{ok}"
        );

        let alpn: &[&str] = &["h2", "http/1.1"];
        check_flow(
            &d,
            &client(is_cli, blocked.port),
            TLS_REMOTE,
            ("drop", Some("no-blocked")),
            ("blocked.example", "sni", alpn),
        );
        check_flow(&d, &client(is_cli, allowed.port), TLS_REMOTE, ("allow", None), ("allowed.example", "sni", alpn));
    }

    // A live TLS connection is listed with its host.
    let mut s_client = lab.host.spawn_with(
        &[
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            TLS_REMOTE,
            "-servername",
            "allowed.example",
            "-alpn",
            "http/1.1",
        ],
        |c| {
            c.stdin(Stdio::piped());
        },
    );
    let listed = poll_until("the s_client connection listed with its host", Duration::from_secs(10), || {
        let out = d.cli(&["flows", "--json"]);
        assert!(out.status.success(), "flowgate flows: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|f| {
            // The listing's flow fields are under `flow`, or beside its counters.
            let field = |k: &str| if f["flow"][k].is_null() { f[k].clone() } else { f["flow"][k].clone() };
            let by_openssl = field("process")["exe"].as_str().is_some_and(|e| e.ends_with("/openssl"));
            field("remote") == TLS_REMOTE && by_openssl && (baseline() || field("host")["name"] == "allowed.example")
        })
    });
    eprintln!("listed: {listed}");
    drop(s_client.child.stdin.take());
    drop(s_client);
    let _ = d.stop();
}

// ---------------------------------------------------------------------------------------------
// 2. HTTP by Host
// ---------------------------------------------------------------------------------------------

#[test]
fn http_is_dropped_by_host_header() {
    require_root!();
    require!("curl", SYS_PYTHON);
    let lab = Lab::new("httphost");
    let http = ScriptServer::tcp(&lab, "http", SocketAddr::new(SRV_SERVICE_V4.into(), 80), None);
    let d = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "httphost", &host_rules(BLOCK_RULE), READY);
    let blocking = !baseline();
    for (ns, is_cli) in [(&lab.host, false), (&lab.cli, true)] {
        let from = if is_cli { "cli (forwarded)" } else { "host (local)" };
        let blocked = curl_http(ns, "blocked.example");
        check_fetch(&blocked, !blocking, "hello blocked.example\n", &format!("Host: blocked.example from {from}"));
        let allowed = curl_http(ns, "allowed.example");
        check_fetch(&allowed, true, "hello allowed.example\n", &format!("Host: allowed.example from {from}"));
        match http.connection_from(&client(is_cli, blocked.port)) {
            Some(r) if blocking => {
                assert_eq!(r["bytes"], 0, "from {from}: the server got bytes of the blocked request: {r}");
                assert!(r["request"].is_null(), "{r}");
            }
            Some(r) => assert_eq!(r["host"], "blocked.example", "baseline: {r}"),
            None => assert!(blocking, "baseline: the blocked request never reached the server"),
        }
        let ok = http.connection_from(&client(is_cli, allowed.port)).expect("the allowed request at the server");
        assert_eq!(ok["host"], "allowed.example", "{ok}");
        check_flow(
            &d,
            &client(is_cli, blocked.port),
            HTTP_REMOTE,
            ("drop", Some("no-blocked")),
            ("blocked.example", "http", &[]),
        );
        check_flow(&d, &client(is_cli, allowed.port), HTTP_REMOTE, ("allow", None), ("allowed.example", "http", &[]));
    }
    let _ = d.stop();
}

// ---------------------------------------------------------------------------------------------
// 3. DNS answers label plain TCP
// ---------------------------------------------------------------------------------------------

/// dnsmasq in srv on 203.0.113.10:53: blocked.example → 203.0.113.11, alias.example → CNAME
/// target.example → 203.0.113.12, sinkhole.example → 127.0.0.1; TTL 600 s. Answers when this
/// returns.
fn dnsmasq(lab: &Lab, dir: &ScratchDir) -> Child {
    let pid = format!("--pid-file={}", s(&dir.path("dnsmasq.pid")));
    let leases = format!("--dhcp-leasefile={}", s(&dir.path("dnsmasq.leases")));
    let child = lab.srv.spawn(&[
        "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--listen-address=203.0.113.10",
        "--bind-interfaces",
        "--local-ttl=600",
        "--host-record=blocked.example,203.0.113.11",
        "--host-record=target.example,203.0.113.12",
        "--cname=alias.example,target.example",
        "--host-record=sinkhole.example,127.0.0.1",
        "--log-queries",
        "--log-facility=-",
        &pid,
        &leases,
    ]);
    wait_listed(&lab.srv, Proto::Udp, SocketAddr::new(SRV_SERVICE_V4.into(), 53));
    child
}

/// `dig +short @203.0.113.10 NAME` in `ns`: the answer's lines.
fn dig(ns: &Netns, name: &str) -> Vec<String> {
    let out = ns.run_ok(&["dig", "+short", "+tries=1", "+time=3", "@203.0.113.10", name]);
    out.lines().map(str::to_string).collect()
}

/// A TCP echo exchange to `to` from the calling thread's namespace, bounded to 3 s.
fn echo_exchange(to: SocketAddr) -> std::io::Result<()> {
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    c.write_all(b"ping\n")?;
    let mut b = [0u8; 5];
    c.read_exact(&mut b)?;
    if &b != b"ping\n" {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

#[test]
fn dns_answers_make_host_rules_apply_to_plain_tcp() {
    require_root!();
    require!("dnsmasq", "dig");
    let lab = Lab::new("dns");
    lab.srv.ip(&["addr", "add", "203.0.113.11/32", "dev", "lo"]);
    lab.srv.ip(&["addr", "add", "203.0.113.12/32", "dev", "lo"]);
    let dir = ScratchDir::new("dns");
    let _dns = dnsmasq(&lab, &dir);
    let (to11, to12) = (SocketAddr::from(([203, 0, 113, 11], 7)), SocketAddr::from(([203, 0, 113, 12], 7)));
    let lo = SocketAddr::from(([127, 0, 0, 1], 7));
    let _echo11 = tcp_echo(&lab.srv, to11);
    let _echo12 = tcp_echo(&lab.srv, to12);
    let _echo_lo = tcp_echo(&lab.host, lo);
    let rules = host_rules(
        "[[rule]]\nname = \"no-blocked\"\nhost = \"blocked.example\"\naction = \"drop\"\n\
         [[rule]]\nname = \"no-alias\"\nhost = \"alias.example\"\naction = \"drop\"\n\
         [[rule]]\nname = \"no-sinkhole\"\nhost = \"sinkhole.example\"\naction = \"drop\"\n",
    );
    // Loopback filtered too, so that a label on 127.0.0.1 would show.
    let d = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "dns", &format!("loopback = true\n{rules}"), READY);
    let blocking = !baseline();

    // Before any answer was seen, nothing ties 203.0.113.11 to a name.
    let before = lab.host.in_ns(move || echo_exchange(to11));
    assert!(before.is_ok(), "TCP to 203.0.113.11:7 before any DNS answer: {before:?}");
    let lo_before = lab.host.in_ns(move || echo_exchange(lo));
    assert!(lo_before.is_ok(), "TCP to 127.0.0.1:7 before any DNS answer: {lo_before:?}");

    assert_eq!(dig(&lab.host, "blocked.example"), ["203.0.113.11"]);
    let after = lab.host.in_ns(move || echo_exchange(to11));
    assert_eq!(after.is_ok(), !blocking, "TCP to 203.0.113.11:7 after blocked.example's answer: {after:?}");

    // A CNAME chain: the address is labelled with the name that was asked.
    assert_eq!(dig(&lab.host, "alias.example"), ["target.example.", "203.0.113.12"]);
    let aliased = lab.host.in_ns(move || echo_exchange(to12));
    assert_eq!(aliased.is_ok(), !blocking, "TCP to 203.0.113.12:7 after alias.example's answer: {aliased:?}");

    // A loopback answer labels nothing: loopback traffic goes on.
    assert_eq!(dig(&lab.host, "sinkhole.example"), ["127.0.0.1"]);
    let lo_after = lab.host.in_ns(move || echo_exchange(lo));
    assert!(lo_after.is_ok(), "TCP to 127.0.0.1:7 after sinkhole.example's answer (127.0.0.1): {lo_after:?}");

    let ev = d.wait_events("two flows to 203.0.113.11:7, two to 127.0.0.1:7 and one to .12", |ev| {
        (flows_to(ev, "203.0.113.11:7").len() >= 2
            && flows_to(ev, "127.0.0.1:7").len() >= 2
            && !flows_to(ev, "203.0.113.12:7").is_empty())
        .then(|| ev.to_vec())
    });
    let settle = |remote: &str, nth: usize| -> (u64, String, String, Value) {
        let id = flows_to(&ev, remote)[nth];
        let (v, r, h) = settled_flow(&d, id);
        (id, v, r, h)
    };
    let (_, v, _, h) = settle("203.0.113.11:7", 0);
    assert_eq!(v, "allow", "the flow before the answer: host {h}");
    assert!(h.is_null() || h["name"].is_null(), "the flow before any answer has no host name: {h}");
    if blocking {
        let (id, v, r, h) = settle("203.0.113.11:7", 1);
        assert_eq!((v.as_str(), r.as_str()), ("drop", "no-blocked"), "flow {id}: {h}");
        assert_eq!((h["name"].as_str(), h["source"].as_str()), (Some("blocked.example"), Some("dns")), "flow {id}");
        let (id, v, r, h) = settle("203.0.113.12:7", 0);
        assert_eq!((v.as_str(), r.as_str()), ("drop", "no-alias"), "flow {id}: {h}");
        assert_eq!((h["name"].as_str(), h["source"].as_str()), (Some("alias.example"), Some("dns")), "flow {id}");
    }
    for nth in 0..2 {
        let (id, v, _, h) = settle("127.0.0.1:7", nth);
        assert_eq!(v, "allow", "loopback flow {id}: {h}");
        assert_ne!(h["name"], "sinkhole.example", "loopback flow {id} labelled by a 127.0.0.1 answer: {h}");
    }
    let _ = d.stop();
}

// ---------------------------------------------------------------------------------------------
// 4. QUIC / HTTP/3 by the Initial's SNI
// ---------------------------------------------------------------------------------------------

/// Runs quic_client.py in `ns` from UDP port `port`: Ok(body) or Err(stderr).
fn h3_get(ns: &Netns, cert: &TestCert, name: &str, port: u16) -> Result<String, String> {
    let (client, port) = (script("quic_client.py"), port.to_string());
    let o = ns.run(&[
        VENV_PYTHON,
        &client,
        "--addr",
        "203.0.113.10",
        "--port",
        "443",
        "--server-name",
        name,
        "--ca",
        &cert.cert,
        "--local-port",
        &port,
        "--timeout",
        "3",
    ]);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}

#[test]
fn quic_is_dropped_by_the_initials_sni() {
    require_root!();
    require!("openssl", "aioquic");
    let lab = Lab::new("quic");
    let cert = test_cert();
    let quic = ScriptServer::quic(&lab, SocketAddr::new(SRV_SERVICE_V4.into(), 443), &cert);
    let d = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "quic", &host_rules(BLOCK_RULE), READY);
    let blocking = !baseline();
    for (ns, is_cli, base) in [(&lab.host, false, 21_000u16), (&lab.cli, true, 22_000)] {
        let from = if is_cli { "cli (forwarded)" } else { "host (local)" };
        let blocked = h3_get(ns, &cert, "blocked.example", base + 1);
        assert_eq!(blocked.is_ok(), !blocking, "HTTP/3 GET for blocked.example from {from}: {blocked:?}");
        let allowed = h3_get(ns, &cert, "allowed.example", base + 2);
        assert_eq!(allowed.as_deref(), Ok("hello h3 allowed.example\n"), "HTTP/3 GET for allowed.example from {from}");
        // The blocked client's Initials never reached the server.
        let peer = client(is_cli, base + 1);
        let at_server: Vec<Value> = quic.records().into_iter().filter(|r| r["peer"] == peer.as_str()).collect();
        assert_eq!(at_server.is_empty(), blocking, "from {from}: the server's records of {peer}: {at_server:?}");
        let h3: &[&str] = &["h3"];
        check_flow(&d, &peer, TLS_REMOTE, ("drop", Some("no-blocked")), ("blocked.example", "quic", h3));
        check_flow(&d, &client(is_cli, base + 2), TLS_REMOTE, ("allow", None), ("allowed.example", "quic", h3));
    }
    let _ = d.stop();
}

// ---------------------------------------------------------------------------------------------
// 5. A product's FlowFilter: pass what it judged, peek 100 more, drop
// ---------------------------------------------------------------------------------------------

/// One `data` call a filter saw: the flow's remote port, the direction, the offset, the bytes.
type DataCall = (u16, Direction, u64, Vec<u8>);

/// Inspects flows to `port`: the first 100 outbound bytes are judged good (pass them, show the
/// next 100), the next 100 bad (drop). Notes every `data` call.
struct PeekThenDrop {
    ports: [u16; 2],
    seen: Arc<Mutex<Vec<DataCall>>>,
}

impl FlowFilter for PeekThenDrop {
    fn name(&self) -> &str {
        "peek-then-drop"
    }

    fn new_flow(&mut self, flow: &Flow) -> NewFlowVerdict {
        if self.ports.contains(&flow.remote.port()) {
            NewFlowVerdict::Inspect { peek_outbound: 100, peek_inbound: 0 }
        } else {
            NewFlowVerdict::Allow
        }
    }

    fn data(&mut self, flow: &Flow, direction: Direction, offset: u64, bytes: &[u8]) -> DataVerdict {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).push((
            flow.remote.port(),
            direction,
            offset,
            bytes.to_vec(),
        ));
        if offset == 0 { DataVerdict::Pass { pass: 0, peek: 100 } } else { DataVerdict::Drop }
    }
}

/// How a sink's connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    Eof,
    Error(ErrorKind),
    /// Nothing for 10 s: the connection was neither closed nor reset.
    Timeout,
}

/// A one-connection sink in srv: accepts one connection on `addr` (within 10 s), reads until it
/// ends (EOF, error, or 10 s of silence) and returns what arrived.
fn one_connection_sink(lab: &Lab, addr: SocketAddr) -> JoinHandle<(Vec<u8>, Ending)> {
    let listener = lab.srv.in_ns(move || TcpListener::bind(addr).expect("bind sink"));
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5)); // bounded accept polling
                }
                Err(e) => return (Vec::new(), Ending::Error(e.kind())),
            }
        };
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut probed = false;
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return (got, Ending::Eof),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                // The local end's reset can fall inside this end's window (the client's stack
                // counts the dropped bytes as sent) and be answered with a challenge ACK, not
                // taken (RFC 5961): then this end learns of the teardown when it next sends, as
                // the peer of any dropped flow does. Send once, then the reset must come.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) && !probed => {
                    probed = true;
                    eprintln!("sink: no reset within 3 s of silence; sending a byte");
                    if let Err(e) = (&conn).write_all(b"?") {
                        return (got, Ending::Error(e.kind()));
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return (got, Ending::Timeout);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return (got, Ending::Error(e.kind())),
            }
        }
    })
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

#[test]
fn a_product_filter_passes_100_bytes_peeks_100_more_and_drops() {
    require_root!();
    let lab = Lab::new("peekdrop");
    let dir = ScratchDir::new("peekdrop");
    let text =
        format!("run_dir = \"{}\"\nlog = \"{}\"\nqueues = 2\n", s(&dir.path("run")), s(&dir.path("events.jsonl")));
    let config = flowgate::config::parse(&dir.path("embedded.toml"), &text).expect("config");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (one_write, ten_writes) = (7100u16, 7101u16);
    let sinks = [one_write, ten_writes].map(|p| one_connection_sink(&lab, SocketAddr::new(SRV_SERVICE_V4.into(), p)));
    let s2 = seen.clone();
    let running = lab.host.in_ns(move || {
        let make = move |_: usize| -> Box<dyn FlowFilter> {
            Box::new(PeekThenDrop { ports: [one_write, ten_writes], seen: s2.clone() })
        };
        flowgate::daemon::Running::start(&config, Some(&make)).expect("start embedded daemon")
    });
    let data = pattern(1000);
    for (port, writes) in [(one_write, 1usize), (ten_writes, 10)] {
        let to = SocketAddr::new(SRV_SERVICE_V4.into(), port);
        let d = data.clone();
        let client_end = lab.host.in_ns(move || -> Result<Ending, String> {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| format!("connect: {e}"))?;
            c.set_nodelay(true).map_err(|e| e.to_string())?;
            for chunk in d.chunks(1000 / writes) {
                if let Err(e) = c.write_all(chunk) {
                    return Ok(Ending::Error(e.kind())); // torn down while writing
                }
            }
            c.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
            let mut b = [0u8; 64];
            Ok(match c.read(&mut b) {
                Ok(0) => Ending::Eof,
                Ok(n) => return Err(format!("the sink sent {n} bytes")),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ending::Timeout,
                Err(e) => Ending::Error(e.kind()),
            })
        });
        let client_end = client_end.unwrap_or_else(|e| panic!("port {port}: {e}"));
        assert_ne!(client_end, Ending::Timeout, "port {port}: the client's connection was not torn down");
    }
    let mut ends = Vec::new();
    for (sink, (port, writes)) in sinks.into_iter().zip([(one_write, 1), (ten_writes, 10)]) {
        let (got, end) = sink.join().expect("sink thread");
        eprintln!("port {port} ({writes} writes): the sink got {} bytes, then {end:?}", got.len());
        ends.push((port, got, end));
    }
    let calls: Vec<DataCall> = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lab.host.in_ns(move || running.stop()).expect("stop");
    let ev = json_lines(&dir.path("events.jsonl"));
    for (port, got, end) in ends {
        let remote = format!("{SRV_SERVICE_V4}:{port}");
        let verdicts = flows_to(&ev, &remote).first().map_or(String::from("no flow logged"), |&id| {
            let lines: Vec<String> = events_of(&ev, id)
                .iter()
                .map(|e| format!("{} {} {} {}", e["event"], e["verdict"], e["source"], e["time"]))
                .collect();
            lines.join("; ")
        });
        assert_eq!(got.len(), 100, "port {port}: the sink must get exactly the 100 judged bytes; events: {verdicts}");
        assert_eq!(got, data[..100], "port {port}: and they are the first 100");
        assert_ne!(end, Ending::Timeout, "port {port}: the sink's connection was not torn down; events: {verdicts}");
        let mine: Vec<(u64, &[u8])> = calls
            .iter()
            .filter(|c| c.0 == port)
            .map(|c| {
                assert_eq!(c.1, Direction::Outbound, "port {port}: only outbound bytes were asked for");
                (c.2, c.3.as_slice())
            })
            .collect();
        assert_eq!(
            mine,
            vec![(0, &data[..100]), (100, &data[100..200])],
            "port {port}: data() must see offset 0 then 100, 100 bytes each"
        );
    }
    for port in [one_write, ten_writes] {
        let remote = format!("{SRV_SERVICE_V4}:{port}");
        let id = *flows_to(&ev, &remote).first().unwrap_or_else(|| panic!("no flow to {remote}"));
        let (v, r) = final_verdict(&ev, id).unwrap_or_default();
        assert_eq!(v, "drop", "flow {id} to {remote}: final verdict (rule {r})");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A hosts file of 1,000,000 names
// ---------------------------------------------------------------------------------------------

/// Writes a hosts file of `n` generated names plus blocked.example (hosts-file lines, with
/// comments and blank lines as real ones have them).
fn hosts_file(dir: &ScratchDir, n: usize) -> PathBuf {
    let path = dir.path("blocklist.txt");
    let f = std::fs::File::create(&path).expect("create hosts file");
    let mut w = std::io::BufWriter::new(f);
    writeln!(w, "# flowgate test blocklist: {n} generated names\n127.0.0.1 localhost\n").expect("write");
    for i in 0..n {
        // Different shapes: bare names, subdomains, a few per line.
        match i % 3 {
            0 => writeln!(w, "0.0.0.0 ads{i}.tracker{}.example", i % 997),
            1 => writeln!(w, "0.0.0.0 n{i}.example.net # generated"),
            _ => writeln!(w, "0.0.0.0 cdn{i}.example.org"),
        }
        .expect("write");
    }
    writeln!(w, "0.0.0.0 blocked.example").expect("write");
    w.flush().expect("flush");
    path
}

#[test]
fn a_hosts_file_of_a_million_names_loads_and_blocks_by_sni() {
    require_root!();
    require!("openssl", "curl", SYS_PYTHON);
    let lab = Lab::new("hostsfile");
    let cert = test_cert();
    let tls = ScriptServer::tcp(&lab, "tls", SocketAddr::new(SRV_SERVICE_V4.into(), 443), Some(&cert));
    let dir = ScratchDir::new("hostsfile");
    let list = hosts_file(&dir, 1_000_000);
    let size = std::fs::metadata(&list).map(|m| m.len()).unwrap_or(0);

    // The same daemon without the list, for its memory.
    let plain = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "plain", "", READY);
    let (plain_ready, plain_rss) = (plain.ready_after, plain.status_kb("VmRSS").unwrap_or(0));
    let _ = plain.stop();

    let config = host_rules(&format!("hosts_file = \"{}\"\n", s(&list)));
    let d = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "hostsfile", &config, READY);
    let (rss, hwm) = (d.status_kb("VmRSS").unwrap_or(0), d.status_kb("VmHWM").unwrap_or(0));
    eprintln!(
        "hosts_file: 1,000,001 names ({:.1} MB): start to ready {:.2} s (without the list {:.2} s); VmRSS {} MB \
         (without the list {} MB, +{} MB), VmHWM {} MB",
        size as f64 / 1e6,
        d.ready_after.as_secs_f64(),
        plain_ready.as_secs_f64(),
        rss / 1024,
        plain_rss / 1024,
        rss.saturating_sub(plain_rss) / 1024,
        hwm / 1024,
    );
    let blocked = curl_tls(&lab.host, &cert, "blocked.example");
    check_fetch(&blocked, baseline(), "hello blocked.example\n", "https://blocked.example/ with the hosts file");
    let allowed = curl_tls(&lab.host, &cert, "allowed.example");
    check_fetch(&allowed, true, "hello allowed.example\n", "https://allowed.example/ with the hosts file");
    if !baseline() {
        let r = tls.connection_from(&client(false, blocked.port));
        assert!(r.as_ref().is_none_or(|r| r["bytes"] == 0), "the server got bytes of the blocked request: {r:?}");
    }
    let alpn: &[&str] = &["h2", "http/1.1"];
    check_flow(
        &d,
        &client(false, blocked.port),
        TLS_REMOTE,
        ("drop", Some("hosts_file")),
        ("blocked.example", "sni", alpn),
    );
    check_flow(&d, &client(false, allowed.port), TLS_REMOTE, ("allow", None), ("allowed.example", "sni", alpn));
    let _ = d.stop();
}

// ---------------------------------------------------------------------------------------------
// 7. A ClientHello sent one byte per segment
// ---------------------------------------------------------------------------------------------

/// Runs tiny_client.py in `ns`: (its local port, Ok(body) or Err(stderr)).
fn tiny_get(ns: &Netns, cert: &TestCert, name: &str) -> (u16, Result<String, String>) {
    let client = script("tiny_client.py");
    let o = ns.run(&[
        SYS_PYTHON,
        &client,
        "--addr",
        "203.0.113.10",
        "--server-name",
        name,
        "--ca",
        &cert.cert,
        "--timeout",
        "8",
    ]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let port = err.lines().find_map(|l| l.strip_prefix("local_port ")?.trim().parse().ok()).unwrap_or(0);
    (port, if o.status.success() { Ok(String::from_utf8_lossy(&o.stdout).into_owned()) } else { Err(err) })
}

#[test]
fn a_client_hello_written_one_byte_at_a_time_is_still_dropped() {
    require_root!();
    require!("openssl", SYS_PYTHON);
    let lab = Lab::new("tiny");
    let cert = test_cert();
    let tls = ScriptServer::tcp(&lab, "tls", SocketAddr::new(SRV_SERVICE_V4.into(), 443), Some(&cert));
    // A short hold timeout: a flow whose name could not be read must not pass when it ends.
    let config = host_rules(&format!("hold_timeout = \"3s\"\n{BLOCK_RULE}"));
    let d = FlowgateRun::start(&lab.host, FLOWGATE.as_ref(), "tiny", &config, READY);
    let blocking = !baseline();
    for (ns, is_cli) in [(&lab.host, false), (&lab.cli, true)] {
        let from = if is_cli { "cli (forwarded)" } else { "host (local)" };
        let (bport, blocked) = tiny_get(ns, &cert, "blocked.example");
        assert_ne!(bport, 0, "from {from}: the client never connected: {blocked:?}");
        assert_eq!(
            blocked.is_ok(),
            !blocking,
            "one byte at a time to blocked.example from {from}: {blocked:?}; the flow's verdicts: {}",
            history(&d, &client(is_cli, bport), TLS_REMOTE)
        );
        if blocking {
            let r = tls.connection_from(&client(is_cli, bport));
            assert!(r.as_ref().is_none_or(|r| r["bytes"] == 0), "from {from}: the server got bytes: {r:?}");
        }
        // The name may stay unread: once the sender's congestion window (10 segments, here
        // 10 bytes) is out unacknowledged, it sends nothing new until an acknowledgement that
        // cannot come while its bytes are held, and what it sends again are copies. Then the
        // hold timeout ends the wait with its action (drop), without a name. (Seen about once in
        // 20 runs: the client's reset after 3 s had sequence 71, 70 bytes of a 517-byte hello.)
        let by_timeout = |local: &str| -> bool {
            let (id, verdict, rule, host) = settled(&d, local, TLS_REMOTE);
            let ev = d.events();
            let last = events_of(&ev, id).into_iter().rev().find(|e| e["event"] == "flow.update").cloned();
            let timed_out = last.is_some_and(|e| e["source"] == "timeout");
            if timed_out {
                assert_eq!(verdict, "drop", "{}: the hold timeout's action is drop", history(&d, local, TLS_REMOTE));
                assert!(host["name"].is_null(), "a flow whose name was read is not judged by the timeout: {host}");
                eprintln!("from {from}: {local}: the name was not read within the hold timeout (rule {rule})");
            }
            timed_out
        };
        let blocked_local = client(is_cli, bport);
        if !blocking || !by_timeout(&blocked_local) {
            check_flow(
                &d,
                &blocked_local,
                TLS_REMOTE,
                ("drop", Some("no-blocked")),
                ("blocked.example", "sni", &["http/1.1"]),
            );
        }
        let (aport, allowed) = tiny_get(ns, &cert, "allowed.example");
        let allowed_local = client(is_cli, aport);
        if allowed.is_err() && blocking && by_timeout(&allowed_local) {
            continue;
        }
        assert_eq!(
            allowed.as_deref(),
            Ok("hello allowed.example\n"),
            "one byte at a time to allowed.example from {from}; the flow's verdicts: {}",
            history(&d, &allowed_local, TLS_REMOTE)
        );
        check_flow(&d, &allowed_local, TLS_REMOTE, ("allow", None), ("allowed.example", "sni", &["http/1.1"]));
    }
    let _ = d.stop();
}
