//! The control socket: how `flowgate flows`, `block`, `allow`, `reload` and `stats` talk to a
//! running daemon.
//!
//! A Unix stream socket in the daemon's `run_dir`, mode 0600 owned by root, or 0660 with the
//! config's `control_group`. The file's mode keeps others from connecting; on top of it, commands
//! that change what passes (`block`, `allow`, `reload`) are refused unless the peer's credentials
//! (`SO_PEERCRED`: its uid, its group and its supplementary groups) say root or the control group,
//! so a socket whose mode was loosened, or one handed on, cannot be used to change verdicts.
//!
//! Each client gets a thread of its own (at most [`MAX_CLIENTS`] at once; more are told to come
//! back), so a slow or silent client holds up no one else: its whole request must arrive within
//! [`CLIENT_TIMEOUT`] and be at most [`MAX_REQUEST`] bytes, and each write of the answer must be
//! taken within [`CLIENT_TIMEOUT`]. Running out of file descriptors backs off instead of spinning.
//! Nothing here touches a queue worker's state: requests become commands to the engines' handles
//! (see [`super::registry`]). The protocol is [`crate::protocol`]'s. This room owns the socket
//! file.

use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flowgate_core::{DataVerdict, FlowId, FlowStatus, Protocol, Selector};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Gid;

use super::clock::Clock;
use super::registry::Registry;
use crate::protocol::{Command, Reply, Request, Select, VERSION};

/// The socket's file name inside `run_dir`.
pub const SOCKET: &str = "control.sock";
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Longest request line.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its whole request, and to take each write of the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

fn selector(sel: &Select) -> Result<Selector, String> {
    use flowgate_core::owner::{Glob, OwnerMatch, UserMatch};
    let remote = match &sel.remote {
        None => None,
        Some(t) => Some(flowgate_core::rules::parse_network(t).map_err(|e| format!("remote: {e}"))?),
    };
    let protocol = match sel.protocol.as_deref() {
        None | Some("any") => None,
        Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some("icmp") => Some(Protocol::Icmp),
        Some(other) => return Err(format!("protocol: `{other}` is not tcp, udp, icmp or any")),
    };
    let mut owner = OwnerMatch::default();
    if let Some(t) = &sel.process {
        owner.process = Some(Glob::new(t).map_err(|e| format!("process: {e}"))?);
    }
    if let Some(t) = &sel.user {
        owner.user = Some(UserMatch::parse(t).map_err(|e| format!("user: {e}"))?);
    }
    Ok(Selector {
        ids: sel.ids.iter().map(|&i| FlowId(i)).collect(),
        remote,
        remote_port: sel.port,
        protocol,
        owner: Box::new(owner),
    })
}

/// What the control server needs of the daemon.
pub(crate) struct Context {
    pub(crate) registry: Registry,
    pub(crate) clock: Clock,
    /// Applies the config file again (`flowgate reload`).
    pub(crate) reloader: std::sync::Arc<super::Reloader>,
    /// The daemon's counters as JSON.
    pub(crate) stats: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The control group, whose members may change verdicts besides root.
    pub(crate) group: Option<Gid>,
}

/// Binds the socket and answers requests on background threads for the life of the process.
pub(crate) fn serve(run_dir: &Path, ctx: Context) -> Result<PathBuf, String> {
    let group = ctx.group;
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
                    let _ = send(&mut w, &Reply::error("too many control clients at once; try again"));
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

/// One protocol line.
fn send(out: &mut impl Write, r: &impl serde::Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, r).map_err(std::io::Error::other)?;
    out.write_all(b"\n")
}

/// Reads one request line: all of it within [`CLIENT_TIMEOUT`] (one deadline, not one per read,
/// so a client that drips bytes cannot hold its thread) and at most [`MAX_REQUEST`] bytes.
fn read_request(conn: &UnixStream) -> Result<Option<String>, String> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no whole request within {} s", CLIENT_TIMEOUT.as_secs()));
        }
        conn.set_read_timeout(Some(left)).map_err(|e| format!("cannot read request: {e}"))?;
        let n = match (&*conn).read(&mut buf) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err("the request ended without a newline".into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("no whole request within {} s", CLIENT_TIMEOUT.as_secs()));
            }
            Err(e) => return Err(format!("cannot read request: {e}")),
        };
        if let Some(end) = buf[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..end]);
            return String::from_utf8(line).map(Some).map_err(|_| "the request is not UTF-8".into());
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
    }
}

/// Whether the peer may change verdicts: root, or in the control group (its own group or one of
/// its supplementary groups, read from `/proc/<pid>/status`).
fn authorized(conn: &UnixStream, group: Option<Gid>) -> Result<(), String> {
    let cred =
        getsockopt(conn, sockopt::PeerCredentials).map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    if cred.uid() == 0 {
        return Ok(());
    }
    if let Some(g) = group {
        let in_group = cred.gid() == g.as_raw()
            || std::fs::read_to_string(format!("/proc/{}/status", cred.pid())).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .is_some_and(|gs| gs.split_whitespace().any(|x| x.parse() == Ok(g.as_raw())))
            });
        if in_group {
            return Ok(());
        }
    }
    Err(format!(
        "permission denied: only root{} may change verdicts (you are uid {})",
        if group.is_some() { " or the control group" } else { "" },
        cred.uid()
    ))
}

fn answer(conn: UnixStream, ctx: &Context) {
    let request = read_request(&conn);
    let mut out = BufWriter::new(&conn);
    let reply = match request {
        Ok(None) => return,
        Err(e) => Reply::error(e),
        Ok(Some(line)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) if req.v != VERSION => {
                Reply::error(format!("protocol version {} is not spoken here (this daemon speaks {VERSION})", req.v))
            }
            Ok(req) => match (req.command.changes_verdicts(), authorized(&conn, ctx.group)) {
                (true, Err(e)) => Reply::error(format!("{}: {e}", req.command.name())),
                _ => match req.command {
                    Command::Flows(sel) => {
                        let _ = stream_flows(&mut out, &sel, ctx);
                        let _ = out.flush();
                        return;
                    }
                    other => dispatch(other, ctx),
                },
            },
            Err(e) => Reply::error(format!("bad request: {e}")),
        },
    };
    let _ = send(&mut out, &reply);
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
    let selector = match selector(sel) {
        Ok(s) => s,
        Err(e) => return send(out, &Reply::error(e)),
    };
    send(out, &Reply::ok())?;
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
    let mut end = Reply { end: true, count: Some(count), ..Reply::ok() };
    if let Err(e) = listed {
        end.ok = false;
        end.error = Some(e);
    }
    send(out, &end)
}

fn dispatch(command: Command, ctx: &Context) -> Reply {
    match command {
        Command::Block(sel) | Command::Allow(sel) if sel.is_empty() => {
            Reply::error("name flows by id, or by remote, port and/or protocol")
        }
        Command::Block(sel) => change(&sel, DataVerdict::Drop, ctx),
        Command::Allow(sel) => change(&sel, DataVerdict::Allow, ctx),
        Command::Reload => match ctx.reloader.reload() {
            Ok(n) => Reply { rules: Some(n), ..Reply::ok() },
            Err(e) => Reply::error(format!("{e}; the rules in force are unchanged")),
        },
        Command::Stats => Reply { stats: Some((ctx.stats)()), ..Reply::ok() },
        Command::Flows(_) => Reply::error("internal: flows is streamed"),
    }
}

/// Blocks or allows the selected flows. Ids of flows that are not live are an error (nothing is
/// changed), so a typo is not taken for success.
fn change(sel: &Select, verdict: DataVerdict, ctx: &Context) -> Reply {
    let selector = match selector(sel) {
        Ok(s) => s,
        Err(e) => return Reply::error(e),
    };
    if !sel.ids.is_empty() {
        let ids_only = Selector { ids: selector.ids.clone(), ..Selector::all() };
        let mut live = Vec::new();
        if let Err(e) = ctx.registry.list(&ids_only, false, |c| {
            live.extend(c.iter().map(|f| f.flow.id));
            Ok(())
        }) {
            return Reply::error(e);
        }
        if let Some(missing) = selector.ids.iter().find(|id| !live.contains(id)) {
            return Reply::error(format!("no live flow has id {missing}"));
        }
    }
    match ctx.registry.apply(&selector, verdict) {
        Ok(flows) if flows.is_empty() => Reply::error("no live flow matches"),
        Ok(flows) => {
            let mut ids: Vec<u64> = flows.iter().map(|f| f.flow.id.0).collect();
            ids.sort_unstable();
            Reply { flows: Some(ids), ..Reply::ok() }
        }
        Err(e) => Reply::error(e),
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

fn parse_reply(line: &str, path: &Path) -> Result<Reply, String> {
    let r: Reply = serde_json::from_str(line).map_err(|e| format!("{}: bad reply: {e}", path.display()))?;
    if r.ok { Ok(r) } else { Err(r.error.unwrap_or_else(|| "the daemon refused the request".into())) }
}

fn send_request(conn: &UnixStream, path: &Path, req: &Request) -> Result<(), String> {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut w = conn;
    send(&mut w, req).map_err(|e| format!("{}: cannot send request: {e}", path.display()))
}

/// Sends one request to the daemon whose `run_dir` is given and returns its reply.
pub fn request(run_dir: &Path, req: &Request) -> Result<Reply, String> {
    let (conn, path) = connect(run_dir)?;
    send_request(&conn, &path, req)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("{}: no reply: {e}", path.display()))?;
    parse_reply(&line, &path)
}

/// Sends a streaming request (`flows`): calls `each` with every flow line after the first (as
/// the daemon wrote it: one JSON object), until the end line, and returns the end line.
pub fn request_stream(
    run_dir: &Path,
    req: &Request,
    mut each: impl FnMut(&str) -> Result<(), String>,
) -> Result<Reply, String> {
    let (conn, path) = connect(run_dir)?;
    send_request(&conn, &path, req)?;
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
        let r: Reply = serde_json::from_str(&line).map_err(|e| format!("{}: bad reply line: {e}", path.display()))?;
        if !r.end {
            return Err(format!("{}: unexpected reply line: {line}", path.display()));
        }
        return match r.error {
            Some(e) => Err(format!("the listing stopped after {} flows: {e}", r.count.unwrap_or(0))),
            None => Ok(r),
        };
    }
    Err(format!("{}: the reply ended without its last line", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_take_owners_and_bad_ones_name_the_field() {
        let sel = |process: Option<&str>, user: Option<&str>| Select {
            process: process.map(String::from),
            user: user.map(String::from),
            ..Select::default()
        };
        let s = selector(&sel(Some("/usr/bin/*"), Some("33"))).expect("owner selector");
        assert_eq!(s.owner.process.as_ref().map(|g| g.as_str()), Some("/usr/bin/*"));
        assert_eq!(s.owner.user, Some(flowgate_core::owner::UserMatch::Uid(33)));
        assert!(selector(&sel(Some(" "), None)).is_err_and(|e| e.starts_with("process: ")));
        assert!(selector(&sel(None, Some("a:b"))).is_err_and(|e| e.starts_with("user: ")));
    }
}
