//! Interface index → name, as NFQUEUE reports indexes and rules and events use names.
//!
//! Names are looked up with `if_indextoname(3)` and cached; a miss (an interface created after
//! the cache was filled, such as a VPN's new tunnel) is looked up again. Indexes can be reused
//! after an interface goes away, so [`IfNames::forget`] drops the cache when the caller learns of
//! link changes, and entries are refreshed on every miss anyway.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::CStr;
use std::sync::Arc;

/// A per-thread cache of interface names.
#[derive(Debug, Default)]
pub struct IfNames {
    cache: HashMap<u32, Arc<str>>,
}

impl IfNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// The name of interface `index`, or `None` if no such interface exists (any more).
    pub fn name(&mut self, index: u32) -> Option<&Arc<str>> {
        if let Entry::Vacant(slot) = self.cache.entry(index) {
            slot.insert(lookup(index)?.into());
        }
        self.cache.get(&index)
    }

    /// Forgets every cached name (after link changes).
    pub fn forget(&mut self) {
        self.cache.clear();
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
    fn loopback_has_a_name_and_bogus_index_has_none() {
        let mut n = IfNames::new();
        assert_eq!(n.name(1).map(|s| s.as_ref()), Some("lo"));
        assert!(n.name(u32::MAX).is_none());
    }
}
