//! Names learned from DNS answers (placeholder until the room lands).
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sniff::dns::Message;
use crate::time::Instant;

#[derive(Default)]
pub struct DnsNames {
    map: Mutex<HashMap<IpAddr, (Arc<str>, Instant)>>,
}

impl DnsNames {
    pub fn new(_capacity: usize) -> Self {
        Self::default()
    }
    pub fn learn(&self, message: &Message, now: Instant) -> usize {
        let Some(q) = &message.question else { return 0 };
        let r = message.resolved();
        for &(a, ttl) in &r {
            self.learn_one(&q.name, a, ttl, now);
        }
        r.len()
    }
    pub fn learn_one(&self, name: &str, addr: IpAddr, ttl: u32, now: Instant) {
        if addr.is_loopback() || addr.is_unspecified() {
            return;
        }
        if let Ok(mut m) = self.map.lock() {
            m.insert(addr, (name.into(), now + Duration::from_secs(u64::from(ttl))));
        }
    }
    pub fn lookup(&self, addr: IpAddr, now: Instant) -> Option<Arc<str>> {
        let m = self.map.lock().ok()?;
        m.get(&addr).filter(|(_, t)| *t > now).map(|(n, _)| n.clone())
    }
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
