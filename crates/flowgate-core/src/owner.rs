//! Who a flow belongs to: the process (and user, unit, cgroup) that owns its local socket, as
//! the data plane found it, and the matchers rules and selectors use on it.
//!
//! The core never looks owners up (that takes the kernel or `/proc`); a driver hands them in
//! ([`crate::Handle::owner`]) after the engine asked ([`crate::Engine::poll_owner_request`]). This
//! room holds the types and their matching; it touches nothing else.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;
use wildmatch::WildMatch;

use crate::flow::{Direction, FlowId, Protocol};
use crate::rules::ParseError;

/// How the owner was found.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerSource {
    /// Captured in the kernel when the socket connected, sent or was bound (BPF).
    Kernel,
    /// Found afterwards: the socket by its ends, the process holding it through `/proc`.
    Proc,
}

/// One ancestor of the owning process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ancestor {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<Arc<str>>,
}

/// The process that owns a flow's local socket: for an outbound flow the one that connected or
/// sent, for an inbound one the one that bound the listening socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// Process id (thread group id) in the host's pid namespace.
    pub pid: u32,
    /// Path of its executable, symbolic links resolved where the file could be found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe: Option<Arc<str>>,
    /// Its arguments, space-joined (as far as they were read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<Arc<str>>,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<Arc<str>>,
    /// Its parent first, up to a few generations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<Ancestor>,
    /// Its cgroup path (the unified hierarchy's, else systemd's v1 hierarchy's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<Arc<str>>,
    /// The systemd unit (`*.service`, `*.scope`) its cgroup denotes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<Arc<str>>,
    pub source: OwnerSource,
}

/// What the engine asks a driver: who owns this flow? Answer with [`crate::Handle::owner`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerRequest {
    pub flow: FlowId,
    pub protocol: Protocol,
    pub direction: Direction,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub forwarded: bool,
    /// The flow's first verdict waits for the answer (its packets are held): answer at once.
    /// Otherwise only its first events wait (at most the engine's `owner_wait`).
    pub hold: bool,
}

/// A glob (`*`, `?`) on an owner's text field, kept with its source text.
#[derive(Clone)]
pub struct Glob {
    text: String,
    glob: WildMatch,
}

impl Glob {
    pub fn new(text: &str) -> Result<Glob, ParseError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(ParseError("empty pattern".into()));
        }
        Ok(Glob { text: t.to_string(), glob: WildMatch::new(t) })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, s: &str) -> bool {
        self.glob.matches(s)
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Glob {}

/// A user, by name or by uid (a number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserMatch {
    Uid(u32),
    Name(String),
}

impl UserMatch {
    pub fn parse(text: &str) -> Result<UserMatch, ParseError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(ParseError("empty user".into()));
        }
        if let Ok(uid) = t.parse::<u32>() {
            return Ok(UserMatch::Uid(uid));
        }
        if t.contains([':', '/', ' ', '\n']) {
            return Err(ParseError(format!("`{t}` is not a user name or uid")));
        }
        Ok(UserMatch::Name(t.to_string()))
    }

    pub fn matches(&self, o: &Owner) -> bool {
        match self {
            UserMatch::Uid(uid) => o.uid == *uid,
            UserMatch::Name(n) => o.user.as_deref() == Some(n.as_str()),
        }
    }
}

impl fmt::Display for UserMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserMatch::Uid(u) => write!(f, "{u}"),
            UserMatch::Name(n) => f.write_str(n),
        }
    }
}

/// The owner fields of a rule or a selector: every one given must match; a flow whose owner is
/// unknown matches none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerMatch {
    /// Glob on the executable path.
    pub process: Option<Glob>,
    pub user: Option<UserMatch>,
    /// Glob on the systemd unit.
    pub unit: Option<Glob>,
    /// Glob on the cgroup path.
    pub cgroup: Option<Glob>,
}

impl OwnerMatch {
    /// No owner field is given: matches any flow, owned or not.
    pub fn is_empty(&self) -> bool {
        self.process.is_none() && self.user.is_none() && self.unit.is_none() && self.cgroup.is_none()
    }

    pub fn matches(&self, owner: Option<&Owner>) -> bool {
        if self.is_empty() {
            return true;
        }
        let Some(o) = owner else { return false };
        let text = |g: &Option<Glob>, v: &Option<Arc<str>>| match g {
            None => true,
            Some(g) => v.as_deref().is_some_and(|s| g.matches(s)),
        };
        text(&self.process, &o.exe)
            && self.user.as_ref().is_none_or(|u| u.matches(o))
            && text(&self.unit, &o.unit)
            && text(&self.cgroup, &o.cgroup)
    }
}

/// What is known of a flow's owner while it is judged.
#[derive(Copy, Clone, Debug)]
pub enum OwnerView<'a> {
    /// Not asked, or the answer came without one: rules that name an owner do not match.
    Unknown,
    /// Asked and not answered yet: rules that name an owner may match (classification then
    /// tells whether the answer could change the verdict).
    Pending,
    Known(&'a Owner),
}

impl OwnerView<'_> {
    pub fn admits(self, m: &OwnerMatch) -> bool {
        if m.is_empty() {
            return true;
        }
        match self {
            OwnerView::Unknown => false,
            OwnerView::Pending => true,
            OwnerView::Known(o) => m.matches(Some(o)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curl() -> Owner {
        Owner {
            pid: 42,
            exe: Some("/usr/bin/curl".into()),
            cmdline: Some("curl http://203.0.113.7/".into()),
            uid: 33,
            user: Some("www-data".into()),
            parents: vec![Ancestor { pid: 1, exe: Some("/usr/lib/systemd/systemd".into()) }],
            cgroup: Some("/system.slice/nginx.service".into()),
            unit: Some("nginx.service".into()),
            source: OwnerSource::Kernel,
        }
    }

    #[test]
    fn every_given_field_must_match_and_no_owner_matches_none() {
        let o = curl();
        let m = |p: Option<&str>, u: Option<&str>, unit: Option<&str>, cg: Option<&str>| OwnerMatch {
            process: p.map(|t| Glob::new(t).expect("glob")),
            user: u.map(|t| UserMatch::parse(t).expect("user")),
            unit: unit.map(|t| Glob::new(t).expect("glob")),
            cgroup: cg.map(|t| Glob::new(t).expect("glob")),
        };
        assert!(m(None, None, None, None).matches(None));
        assert!(m(Some("/usr/bin/curl"), None, None, None).matches(Some(&o)));
        assert!(m(Some("/usr/bin/*"), Some("www-data"), None, None).matches(Some(&o)));
        assert!(m(None, Some("33"), Some("nginx.*"), Some("/system.slice/*")).matches(Some(&o)));
        assert!(!m(Some("/usr/bin/wget"), None, None, None).matches(Some(&o)));
        assert!(!m(None, Some("0"), None, None).matches(Some(&o)));
        assert!(!m(None, Some("root"), None, None).matches(Some(&o)));
        assert!(!m(Some("*"), None, None, None).matches(None));
        let no_exe = Owner { exe: None, ..curl() };
        assert!(!m(Some("*"), None, None, None).matches(Some(&no_exe)), "an unknown path matches no glob");
    }

    #[test]
    fn pending_admits_what_may_match_unknown_nothing() {
        let o = curl();
        let m = OwnerMatch { process: Some(Glob::new("/usr/bin/wget").expect("glob")), ..OwnerMatch::default() };
        assert!(OwnerView::Pending.admits(&m));
        assert!(!OwnerView::Unknown.admits(&m));
        assert!(!OwnerView::Known(&o).admits(&m));
        assert!(OwnerView::Unknown.admits(&OwnerMatch::default()));
    }

    #[test]
    fn users_are_names_or_uids() {
        assert_eq!(UserMatch::parse(" 1000 ").expect("uid"), UserMatch::Uid(1000));
        assert_eq!(UserMatch::parse("www-data").expect("name"), UserMatch::Name("www-data".into()));
        assert!(UserMatch::parse("").is_err());
        assert!(UserMatch::parse("a:b").is_err());
        assert!(Glob::new(" ").is_err());
    }

    #[test]
    fn owners_serialize_as_the_process_object() {
        let v = serde_json::to_value(curl()).expect("json");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["exe"], "/usr/bin/curl");
        assert_eq!(v["user"], "www-data");
        assert_eq!(v["unit"], "nginx.service");
        assert_eq!(v["source"], "kernel");
        assert_eq!(v["parents"][0]["pid"], 1);
    }
}
