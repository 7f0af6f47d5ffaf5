//! The control socket: how `flowgate flows`, `block`, `allow`, `reload` and `stats` talk to a
//! running daemon.
//!
//! A Unix stream socket in the daemon's `run_dir`, mode 0600 owned by root, or 0660 with the
//! config's `control_group`: the file's permissions are the access control. Each client gets a
//! thread of its own (at most [`MAX_CLIENTS`] at once; more are told to come back), so a slow or
//! silent client holds up no one else, and nothing here touches a queue worker's state: requests
//! become commands to the engines' handles (see [`super::registry`]).
//!
//! The protocol is one JSON object per line each way. A request names its command and, for
//! commands about flows, a selection: `{"cmd": "flows"|"block"|"allow", "ids": [..],
//! "remote": "CIDR", "port": N, "protocol": "tcp"}`, `{"cmd": "reload"}`, `{"cmd": "stats"}`.
//! Every answer starts with `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. `flows`
//! answers `{"ok": true}`, then one line per flow as the engines produce them (filtered on the
//! daemon's side), then `{"end": true, "count": N}`: a million flows stream without the daemon
//! or the client holding them all. `block`/`allow` answer with the flows they changed. This room
//! owns the socket file.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flowgate_core::{DataVerdict, FlowId, FlowStatus, Protocol, Selector};
use serde::Deserialize;
use serde_json::{Value, json};

use super::clock::Clock;
use super::registry::Registry;

/// The socket's file name inside `run_dir`.
pub const SOCKET: &str = "control.sock";
/// Clients served at once.
const MAX_CLIENTS: usize = 16;
/// Longest request line.
const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request, and to take each write of the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which flows a request is about (all fields optional; all that are given must match).
#[derive(Debug, Default, Deserialize)]
struct Select {
    #[serde(default)]
    ids: Vec<u64>,
    remote: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
    /// `flows` only: sync with conntrack first, so kernel-handled flows' counters are current
    /// (otherwise they are as of the last periodic sync).
    #[serde(default)]
    fresh: bool,
}

impl Select {
    fn selector(&self) -> Result<Selector, String> {
        let remote = match &self.remote {
            None => None,
            Some(t) => Some(flowgate_core::rules::parse_network(t).map_err(|e| format!("remote: {e}"))?),
        };
        let protocol = match self.protocol.as_deref() {
            None | Some("any") => None,
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") => Some(Protocol::Udp),
            Some("icmp") => Some(Protocol::Icmp),
            Some(other) => return Err(format!("protocol: `{other}` is not tcp, udp, icmp or any")),
        };
        Ok(Selector { ids: self.ids.iter().map(|&i| FlowId(i)).collect(), remote, remote_port: self.port, protocol })
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.remote.is_none() && self.port.is_none() && self.protocol.is_none()
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
enum Request {
    Flows(Select),
    Block(Select),
    Allow(Select),
    Reload,
    Stats,
}

/// What the control server needs of the daemon.
pub(crate) struct Context {
    pub(crate) registry: Registry,
    pub(crate) clock: Clock,
    pub(crate) config: PathBuf,
    /// The daemon's counters as JSON.
    pub(crate) stats: Box<dyn Fn() -> Value + Send + Sync>,
}

/// Binds the socket and answers requests on background threads for the life of the process.
pub(crate) fn serve(run_dir: &Path, group: Option<nix::unistd::Gid>, ctx: Context) -> Result<PathBuf, String> {
    let path = run_dir.join(SOCKET);
    // We hold the instance lock: a socket file here is a dead instance's.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| format!("{}: cannot create control socket: {e}", path.display()))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: cannot set permissions: {e}", path.display()))?;
    if let Some(gid) = group {
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
            .map_err(|e| format!("{}: cannot give the socket to group {gid}: {e}", path.display()))?;
    }
    let ctx = Arc::new(ctx);
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("flowgate-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let conn = match conn {
                    Ok(c) => c,
                    Err(_) => {
                        // Out of descriptors or memory: back off instead of spinning.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let _ = conn.set_read_timeout(Some(CLIENT_TIMEOUT));
                let _ = conn.set_write_timeout(Some(CLIENT_TIMEOUT));
                if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::AcqRel);
                    let mut w = &conn;
                    let _ =
                        writeln!(w, "{}", json!({"ok": false, "error": "too many control clients at once; try again"}));
                    continue;
                }
                let (ctx, clients) = (ctx.clone(), clients.clone());
                let spawned = std::thread::Builder::new().name("flowgate-client".into()).spawn(move || {
                    super::background();
                    answer(conn, &ctx);
                    clients.fetch_sub(1, Ordering::AcqRel);
                });
                if spawned.is_err() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    Ok(path)
}

fn answer(conn: UnixStream, ctx: &Context) {
    let mut line = String::new();
    let read = BufReader::new((&conn).take(MAX_REQUEST)).read_line(&mut line);
    let mut out = BufWriter::new(&conn);
    let reply = match read {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') => {
            json!({"ok": false, "error": format!("request longer than {MAX_REQUEST} bytes")})
        }
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(Request::Flows(sel)) => {
                let _ = stream_flows(&mut out, &sel, ctx);
                let _ = out.flush();
                return;
            }
            Ok(req) => dispatch(req, ctx),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("cannot read request: {e}")}),
    };
    let _ = writeln!(out, "{reply}");
    let _ = out.flush();
}

/// One listing line: the flow's status and its age, written straight to the client.
#[derive(serde::Serialize)]
struct FlowLine<'a> {
    #[serde(flatten)]
    status: &'a FlowStatus,
    age_ms: u64,
}

fn stream_flows(out: &mut impl Write, sel: &Select, ctx: &Context) -> std::io::Result<()> {
    let selector = match sel.selector() {
        Ok(s) => s,
        Err(e) => return writeln!(out, "{}", json!({"ok": false, "error": e})),
    };
    writeln!(out, "{}", json!({"ok": true}))?;
    // The client learns at once that the listing is coming.
    out.flush()?;
    let mut count = 0u64;
    // Kernel-handled flows' counters come from conntrack's syncs; `fresh` waits for a new one.
    let listed = ctx.registry.list(&selector, sel.fresh, |chunk| {
        let now = ctx.clock.now();
        for status in chunk {
            let age_ms = u64::try_from(now.saturating_since(status.flow.started).as_millis()).unwrap_or(u64::MAX);
            serde_json::to_writer(&mut *out, &FlowLine { status, age_ms })
                .map_err(|e| format!("writing to the client: {e}"))?;
            out.write_all(b"\n").map_err(|e| format!("writing to the client: {e}"))?;
        }
        count += chunk.len() as u64;
        Ok(())
    });
    match listed {
        Ok(()) => writeln!(out, "{}", json!({"end": true, "count": count})),
        Err(e) => writeln!(out, "{}", json!({"end": true, "count": count, "error": e})),
    }
}

fn dispatch(req: Request, ctx: &Context) -> Value {
    match req {
        Request::Block(sel) | Request::Allow(sel) if sel.is_empty() => {
            json!({"ok": false, "error": "name flows by id, or by remote, port and/or protocol"})
        }
        Request::Block(sel) => change(&sel, DataVerdict::Drop, ctx),
        Request::Allow(sel) => change(&sel, DataVerdict::Allow, ctx),
        Request::Reload => match super::reload(&ctx.config, &ctx.registry) {
            Ok(n) => json!({"ok": true, "rules": n}),
            Err(e) => json!({"ok": false, "error": format!("{e}; the rules in force are unchanged")}),
        },
        Request::Stats => json!({"ok": true, "stats": (ctx.stats)()}),
        Request::Flows(_) => json!({"ok": false, "error": "internal: flows is streamed"}),
    }
}

/// Blocks or allows the selected flows. Ids of flows that are not live are an error (nothing is
/// changed), so a typo is not taken for success.
fn change(sel: &Select, verdict: DataVerdict, ctx: &Context) -> Value {
    let selector = match sel.selector() {
        Ok(s) => s,
        Err(e) => return json!({"ok": false, "error": e}),
    };
    if !sel.ids.is_empty() {
        let ids_only = Selector { ids: selector.ids.clone(), ..Selector::all() };
        let mut live = Vec::new();
        if let Err(e) = ctx.registry.list(&ids_only, false, |c| {
            live.extend(c.iter().map(|f| f.flow.id));
            Ok(())
        }) {
            return json!({"ok": false, "error": e});
        }
        if let Some(missing) = selector.ids.iter().find(|id| !live.contains(id)) {
            return json!({"ok": false, "error": format!("no live flow has id {missing}")});
        }
    }
    match ctx.registry.apply(&selector, verdict) {
        Ok(flows) if flows.is_empty() => json!({"ok": false, "error": "no live flow matches"}),
        Ok(flows) => {
            let mut ids: Vec<u64> = flows.iter().map(|f| f.flow.id.0).collect();
            ids.sort_unstable();
            json!({"ok": true, "flows": ids})
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn connect(run_dir: &Path) -> Result<(UnixStream, PathBuf), String> {
    let path = run_dir.join(SOCKET);
    let conn = UnixStream::connect(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            format!("no flowgate daemon is running here ({}: {e})", path.display())
        }
        std::io::ErrorKind::PermissionDenied => {
            format!(
                "{}: permission denied: the control socket is for root (or the config's control_group)",
                path.display()
            )
        }
        _ => format!("{}: cannot connect: {e}", path.display()),
    })?;
    Ok((conn, path))
}

fn parse_reply(line: &str, path: &Path) -> Result<Value, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{}: bad reply: {e}", path.display()))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v)
    } else {
        Err(v.get("error").and_then(Value::as_str).unwrap_or("the daemon refused the request").to_string())
    }
}

/// Sends one request to the daemon whose `run_dir` is given and returns its reply.
pub fn request(run_dir: &Path, req: &Value) -> Result<Value, String> {
    let (conn, path) = connect(run_dir)?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut w = &conn;
    writeln!(w, "{req}").map_err(|e| format!("{}: cannot send request: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("{}: no reply: {e}", path.display()))?;
    parse_reply(&line, &path)
}

/// Sends a streaming request (`flows`): calls `each` with every flow line after the first (as
/// the daemon wrote it: one JSON object), until the end line, and returns the end line.
pub fn request_stream(
    run_dir: &Path,
    req: &Value,
    mut each: impl FnMut(&str) -> Result<(), String>,
) -> Result<Value, String> {
    let (conn, path) = connect(run_dir)?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut w = &conn;
    writeln!(w, "{req}").map_err(|e| format!("{}: cannot send request: {e}", path.display()))?;
    let mut lines = BufReader::new(&conn).lines();
    let first = lines.next().ok_or_else(|| format!("{}: no reply", path.display()))?;
    parse_reply(&first.map_err(|e| format!("{}: no reply: {e}", path.display()))?, &path)?;
    for line in lines {
        let line = line.map_err(|e| format!("{}: reply cut short: {e}", path.display()))?;
        // Flow lines start with their flow object; anything else is the end line.
        if line.starts_with("{\"flow\":") {
            each(&line)?;
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{}: bad reply line: {e}", path.display()))?;
        if v.get("end") != Some(&Value::Bool(true)) {
            return Err(format!("{}: unexpected reply line: {line}", path.display()));
        }
        return match v.get("error").and_then(Value::as_str) {
            Some(e) => Err(format!("the listing stopped after {} flows: {e}", v["count"])),
            None => Ok(v),
        };
    }
    Err(format!("{}: the reply ended without its last line", path.display()))
}
