//! The control socket: how `flowgate flows` (and later `block`, `allow`, `reload`) talk to a
//! running daemon.
//!
//! A Unix stream socket in the daemon's `run_dir`, mode 0600 owned by root, or 0660 with the
//! config's `control_group`: the file's permissions are the access control. The protocol is one
//! JSON object per line each way: a request (`{"cmd": "flows"}`, `{"cmd": "block", "ids": [..],
//! "remote": "CIDR", "port": N}`, `{"cmd": "allow", ...}`, `{"cmd": "reload"}`), a reply
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. The server answers from the engines' snapshots through their
//! handles, so it never touches a queue worker's state directly. This room owns the socket file.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowgate_core::{DataVerdict, FlowId, FlowStatus, Handle};
use serde_json::{Value, json};

use super::clock::Clock;

/// The socket's file name inside `run_dir`.
pub const SOCKET: &str = "control.sock";

/// How long a request waits for the engines to publish fresh snapshots.
const FRESH: Duration = Duration::from_millis(500);

/// Binds the socket and answers requests on a background thread for the life of the process.
pub(crate) fn serve(
    run_dir: &Path,
    group: Option<nix::unistd::Gid>,
    handles: Vec<Handle>,
    clock: Clock,
    config: PathBuf,
) -> Result<PathBuf, String> {
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
    std::thread::Builder::new()
        .name("flowgate-control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                // One slow client must not hold the socket for long.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
                answer(conn, &handles, &clock, &config);
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    Ok(path)
}

fn answer(conn: UnixStream, handles: &[Handle], clock: &Clock, config: &Path) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    let reply = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Value>(&line) {
            Ok(req) => dispatch(&req, handles, clock, config),
            Err(e) => json!({"ok": false, "error": format!("request is not JSON: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("cannot read request: {e}")}),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{reply}");
}

fn dispatch(req: &Value, handles: &[Handle], clock: &Clock, config: &Path) -> Value {
    match req.get("cmd").and_then(Value::as_str) {
        Some("flows") => {
            // Kernel-handled flows' counters live in conntrack; bring them in first. A failure
            // here only makes the counts stale, so it does not fail the listing.
            let _ = super::kernel::refresh_counters(handles);
            let now = clock.now();
            let mut flows: Vec<FlowStatus> = Vec::new();
            for h in handles {
                match h.flows_fresh(FRESH) {
                    Ok(s) => flows.extend(s.flows.iter().cloned()),
                    Err(e) => return json!({"ok": false, "error": e.to_string()}),
                }
            }
            flows.sort_by_key(|f| f.flow.id);
            let list: Vec<Value> = flows
                .iter()
                .map(|f| {
                    let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("age_ms".into(), json!(now.saturating_since(f.flow.started).as_millis() as u64));
                    }
                    v
                })
                .collect();
            json!({"ok": true, "flows": list})
        }
        Some(cmd @ ("block" | "allow")) => {
            let verdict = if cmd == "block" { DataVerdict::Drop } else { DataVerdict::Allow };
            match select(req, handles) {
                Ok(ids) if ids.is_empty() => json!({"ok": false, "error": "no live flow matches"}),
                Ok(ids) => {
                    for id in &ids {
                        // Each engine knows only its own flows and ignores the others.
                        for h in handles {
                            if let Err(e) = h.update(*id, verdict, None) {
                                return json!({"ok": false, "error": e.to_string()});
                            }
                        }
                    }
                    json!({"ok": true, "flows": ids})
                }
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        Some("reload") => match super::reload(config, handles) {
            Ok(n) => json!({"ok": true, "rules": n}),
            Err(e) => json!({"ok": false, "error": format!("{e}; the rules in force are unchanged")}),
        },
        Some(other) => json!({"ok": false, "error": format!("unknown command `{other}`")}),
        None => json!({"ok": false, "error": "request has no `cmd`"}),
    }
}

/// The live flows a block/allow request names: by `ids`, or by `remote` (CIDR) and/or `port`
/// (remote port). Ids of flows that are not live are an error, so a typo is not taken for
/// success.
fn select(req: &Value, handles: &[Handle]) -> Result<Vec<FlowId>, String> {
    let mut live: Vec<FlowStatus> = Vec::new();
    for h in handles {
        live.extend(h.flows_fresh(FRESH).map_err(|e| e.to_string())?.flows.iter().cloned());
    }
    let ids: Vec<u64> = match req.get("ids") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or("`ids` must be a list of flow ids")?
            .iter()
            .map(|i| i.as_u64().ok_or_else(|| format!("`{i}` is not a flow id")))
            .collect::<Result<_, _>>()?,
    };
    let remote = match req.get("remote").and_then(Value::as_str) {
        None => None,
        Some(t) => Some(flowgate_core::rules::parse_network(t).map_err(|e| format!("remote: {e}"))?),
    };
    let port = match req.get("port") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or("`port` must be a port number")?),
    };
    let mut out = Vec::new();
    for id in &ids {
        if !live.iter().any(|f| f.flow.id.0 == *id) {
            return Err(format!("no live flow has id {id}"));
        }
        out.push(FlowId(*id));
    }
    if remote.is_some() || port.is_some() {
        out.extend(
            live.iter()
                .filter(|f| remote.is_none_or(|n| n.contains(&f.flow.remote.ip())))
                .filter(|f| port.is_none_or(|p| f.flow.remote.port() == p))
                .map(|f| f.flow.id),
        );
    } else if ids.is_empty() {
        return Err("name flows by id, or by remote and/or port".into());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Sends one request to the daemon whose `run_dir` is given and returns its reply.
pub fn request(run_dir: &Path, req: &Value) -> Result<Value, String> {
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
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut w = &conn;
    writeln!(w, "{req}").map_err(|e| format!("{}: cannot send request: {e}", path.display()))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("{}: no reply: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("{}: bad reply: {e}", path.display()))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v)
    } else {
        Err(v.get("error").and_then(Value::as_str).unwrap_or("the daemon refused the request").to_string())
    }
}
