//! The control socket: how `flowgate flows` (and later `block`, `allow`, `reload`) talk to a
//! running daemon.
//!
//! A Unix stream socket in the daemon's `run_dir`, mode 0600 owned by root, or 0660 with the
//! config's `control_group`: the file's permissions are the access control. The protocol is one
//! JSON object per line each way: a request `{"cmd": "flows"}`, a reply `{"ok": true, ...}` or
//! `{"ok": false, "error": "..."}`. The server answers from the engines' snapshots through their
//! handles, so it never touches a queue worker's state directly. This room owns the socket file.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use flowgate_core::{FlowStatus, Handle};
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
                answer(conn, &handles, &clock);
            }
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))?;
    Ok(path)
}

fn answer(conn: UnixStream, handles: &[Handle], clock: &Clock) {
    let mut reader = BufReader::new(&conn);
    let mut line = String::new();
    let reply = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<Value>(&line) {
            Ok(req) => dispatch(&req, handles, clock),
            Err(e) => json!({"ok": false, "error": format!("request is not JSON: {e}")}),
        },
        Err(e) => json!({"ok": false, "error": format!("cannot read request: {e}")}),
    };
    let mut w = &conn;
    let _ = writeln!(w, "{reply}");
}

fn dispatch(req: &Value, handles: &[Handle], clock: &Clock) -> Value {
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
                        o.insert(
                            "age_ms".into(),
                            json!(now.saturating_since(f.flow.started).as_millis() as u64),
                        );
                    }
                    v
                })
                .collect();
            json!({"ok": true, "flows": list})
        }
        Some(other) => json!({"ok": false, "error": format!("unknown command `{other}`")}),
        None => json!({"ok": false, "error": "request has no `cmd`"}),
    }
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
    BufReader::new(&conn)
        .read_line(&mut line)
        .map_err(|e| format!("{}: no reply: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("{}: bad reply: {e}", path.display()))?;
    if v.get("ok") == Some(&Value::Bool(true)) {
        Ok(v)
    } else {
        Err(v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the daemon refused the request")
            .to_string())
    }
}
