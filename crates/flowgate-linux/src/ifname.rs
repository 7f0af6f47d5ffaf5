//! Interface index → name, as NFQUEUE reports indexes and rules and events use names.
//!
//! Names are looked up with `if_indextoname(3)` and cached; a miss (an interface created after
//! the cache was filled, such as a VPN's new tunnel) is looked up again. An index can be reused
//! by a new interface after the old one goes away, and a link can be renamed, so a cache must not
//! outlive a change of links: [`LinkWatch`] follows the kernel's link notifications (rtnetlink
//! `RTMGRP_LINK`) and counts changes, and an [`IfNames`] built with that count drops everything
//! it cached when it moves. The cache thus holds only links seen since the last change.
//!
//! This room reads interface names and link notifications of the calling thread's namespace.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use nix::sys::socket::{AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket};

/// A per-thread cache of interface names.
#[derive(Debug, Default)]
pub struct IfNames {
    cache: HashMap<u32, Arc<str>>,
    changes: Option<Arc<AtomicU64>>,
    seen: u64,
}

impl IfNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache that forgets everything when `changes` (a [`LinkWatch`] count) moves.
    pub fn following(changes: Arc<AtomicU64>) -> Self {
        IfNames { cache: HashMap::new(), seen: changes.load(Ordering::Acquire), changes: Some(changes) }
    }

    /// The name of interface `index`, or `None` if no such interface exists (any more).
    pub fn name(&mut self, index: u32) -> Option<&Arc<str>> {
        if let Some(c) = &self.changes {
            let now = c.load(Ordering::Acquire);
            if now != self.seen {
                self.seen = now;
                self.cache.clear();
            }
        }
        if let Entry::Vacant(slot) = self.cache.entry(index) {
            slot.insert(lookup(index)?.into());
        }
        self.cache.get(&index)
    }

    /// Forgets every cached name (after link changes).
    pub fn forget(&mut self) {
        self.cache.clear();
    }

    /// Names cached now.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

/// `RTMGRP_LINK` of `linux/rtnetlink.h`: link added, removed or changed.
const RTMGRP_LINK: u32 = 1;

/// Counts link changes of the current network namespace on a thread of its own.
pub struct LinkWatch {
    thread: JoinHandle<()>,
    changes: Arc<AtomicU64>,
}

impl LinkWatch {
    /// Starts watching; the thread ends when `stop` is set (seen within a quarter second).
    pub fn start(stop: Arc<AtomicBool>) -> std::io::Result<LinkWatch> {
        let fd: OwnedFd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))?;
        let changes = Arc::new(AtomicU64::new(0));
        let count = changes.clone();
        let thread = std::thread::Builder::new().name("flowgate-links".into()).spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while !stop.load(Ordering::Acquire) {
                match crate::netlink::wait_readable(fd.as_fd(), 250) {
                    Ok(false) => continue,
                    Ok(true) => {}
                    Err(_) => return,
                }
                // Any notification, or a lost one (ENOBUFS), is a change; what changed does not
                // matter, the caches are refilled on demand.
                let mut changed = false;
                loop {
                    match nix::sys::socket::recv(fd.as_raw_fd(), &mut buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                        Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
                        Ok(_) | Err(nix::errno::Errno::ENOBUFS) => changed = true,
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => return,
                    }
                }
                if changed {
                    count.fetch_add(1, Ordering::AcqRel);
                }
            }
        })?;
        Ok(LinkWatch { thread, changes })
    }

    /// The change count to give [`IfNames::following`].
    pub fn changes(&self) -> Arc<AtomicU64> {
        self.changes.clone()
    }

    /// Waits for the thread (after the stop flag was set).
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

fn lookup(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires; on success it holds a
    // NUL-terminated name, on failure the call returns NULL and the buffer is not read.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated string within its bounds.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_following_cache_forgets_when_links_change() {
        let changes = Arc::new(AtomicU64::new(0));
        let mut n = IfNames::following(changes.clone());
        assert!(n.name(1).is_some());
        assert_eq!(n.len(), 1);
        changes.fetch_add(1, Ordering::AcqRel);
        assert!(n.name(u32::MAX).is_none());
        assert!(n.is_empty(), "the change emptied the cache before the lookup");
    }

    #[test]
    fn loopback_has_a_name_and_bogus_index_has_none() {
        let mut n = IfNames::new();
        assert_eq!(n.name(1).map(|s| s.as_ref()), Some("lo"));
        assert!(n.name(u32::MAX).is_none());
    }
}
