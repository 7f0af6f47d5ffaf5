//! Host-name patterns and sets (placeholder until the hosts room lands).
use std::collections::HashSet;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    name: String,
    below: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HostError(pub String);

impl HostPattern {
    pub fn parse(text: &str) -> Result<HostPattern, HostError> {
        let t = text.trim();
        let (below, rest) = match t.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, t),
        };
        let name =
            crate::sniff::host_name(rest.as_bytes()).ok_or_else(|| HostError(format!("`{t}` is not a host name")))?;
        Ok(HostPattern { name, below })
    }
    pub fn matches(&self, host: &str) -> bool {
        host == self.name
            || (self.below && host.ends_with(&self.name) && host[..host.len() - self.name.len()].ends_with('.'))
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.below { write!(f, "*.{}", self.name) } else { f.write_str(&self.name) }
    }
}

#[derive(Clone, Debug, Default)]
pub struct HostSet {
    exact: HashSet<String>,
    domains: HashSet<String>,
}

impl HostSet {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, p: &HostPattern) {
        if p.below { self.insert_domain(&p.name) } else { self.insert_exact(&p.name) }
    }
    pub fn insert_exact(&mut self, name: &str) {
        self.exact.insert(name.to_string());
    }
    pub fn insert_domain(&mut self, name: &str) {
        self.domains.insert(name.to_string());
    }
    pub fn matches(&self, host: &str) -> bool {
        if self.exact.contains(host) {
            return true;
        }
        let mut h = host;
        loop {
            if self.domains.contains(h) {
                return true;
            }
            match h.find('.') {
                Some(i) => h = &h[i + 1..],
                None => return false,
            }
        }
    }
    pub fn len(&self) -> usize {
        self.exact.len() + self.domains.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn heap_bytes(&self) -> usize {
        0
    }
}

#[derive(Clone, Debug, Default)]
pub struct HostsFileReport {
    pub added: usize,
}

pub fn parse_hosts_file(text: &str, into: &mut HostSet) -> Result<HostsFileReport, HostError> {
    let mut added = 0;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            [one] => {
                if let Ok(p) = HostPattern::parse(one) {
                    into.insert_domain(&p.name);
                    added += 1;
                }
            }
            [_, names @ ..] => {
                for n in names {
                    if let Some(h) = crate::sniff::host_name(n.as_bytes()) {
                        into.insert_exact(&h);
                        added += 1;
                    }
                }
            }
        }
    }
    Ok(HostsFileReport { added })
}
