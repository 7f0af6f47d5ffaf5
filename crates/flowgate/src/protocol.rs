//! The control protocol: what `flowgate flows`, `block`, `allow`, `reload` and `stats` (and
//! products, and the benchmarks) say to a running daemon over its control socket, and what it
//! answers. One typed definition, used by both ends.
//!
//! One JSON object per line each way. A request is `{"v": 1, "cmd": ..., ...}` ([`Request`]); a
//! request without `v` is taken as version 1, one with another version is refused. Every answer
//! is a [`Reply`]: `{"v": 1, "ok": true, ...}` or `{"v": 1, "ok": false, "error": "..."}`.
//! `flows` answers `{"ok": true}`, then one line per flow (a [`flowgate_core::FlowStatus`] with
//! `age_ms`), then a reply with `end: true` and `count` (and `error` if the listing broke off).
//! This room holds the types only; `daemon::control` serves them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

fn version() -> u32 {
    VERSION
}

/// One request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    #[serde(default = "version")]
    pub v: u32,
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    pub fn new(command: Command) -> Request {
        Request { v: VERSION, command }
    }
}

/// What is asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Command {
    /// The live flows the selection matches, streamed.
    Flows(Select),
    /// Stop the selected flows now.
    Block(Select),
    /// Let the selected flows pass.
    Allow(Select),
    /// Load the config file again and judge every live flow with its rules.
    Reload,
    /// The daemon's counters.
    Stats,
}

impl Command {
    /// Whether the command changes what passes: it needs root or the control group.
    pub fn changes_verdicts(&self) -> bool {
        matches!(self, Command::Block(_) | Command::Allow(_) | Command::Reload)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Flows(_) => "flows",
            Command::Block(_) => "block",
            Command::Allow(_) => "allow",
            Command::Reload => "reload",
            Command::Stats => "stats",
        }
    }
}

/// Which flows a command is about: every field given must match; none given, every flow.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Select {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// A glob on the owning program's executable path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    /// The owning user, by name or uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `flows` only: sync with conntrack first, so kernel-handled flows' counters are current.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh: bool,
}

impl Select {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.remote.is_none()
            && self.port.is_none()
            && self.protocol.is_none()
            && self.process.is_none()
            && self.user.is_none()
    }
}

/// One answer line (but the flow lines of a listing).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default = "version")]
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `block`/`allow`: the ids of the flows changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<u64>>,
    /// `reload`: how many rules are in force now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Value>,
    /// The last line of a listing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub end: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply { v: VERSION, ok: true, ..Reply::default() }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply { v: VERSION, ok: false, error: Some(message.into()), ..Reply::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_default_to_version_1() {
        let r = Request::new(Command::Block(Select { ids: vec![3], port: Some(443), ..Select::default() }));
        let text = serde_json::to_string(&r).expect("json");
        assert_eq!(text, r#"{"v":1,"cmd":"block","ids":[3],"port":443}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).expect("parse"), r);
        let old: Request = serde_json::from_str(r#"{"cmd":"stats"}"#).expect("parse");
        assert_eq!(old, Request::new(Command::Stats));
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"format-disk"}"#).is_err());
        assert!(Command::Reload.changes_verdicts() && !Command::Stats.changes_verdicts());
    }

    #[test]
    fn replies_carry_only_what_they_say() {
        assert_eq!(serde_json::to_string(&Reply::ok()).expect("json"), r#"{"v":1,"ok":true}"#);
        let e = Reply::error("no");
        assert_eq!(serde_json::to_string(&e).expect("json"), r#"{"v":1,"ok":false,"error":"no"}"#);
    }
}
