//! Live heap bytes for benchmarks that report memory: a global allocator that passes every call
//! to the system allocator and keeps one counter of the bytes allocated and not yet freed.
//!
//! A bench binary opts in with `#[global_allocator] static A: flowgate_bench::heap::Counting =
//! flowgate_bench::heap::Counting;`. Without it [`live_bytes`] stays 0 and [`counting`] is
//! false, so callers can tell "not measured" from "nothing allocated". The counter is the sum of
//! the sizes asked for; the allocator's own bookkeeping and rounding are not in it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

static LIVE: AtomicI64 = AtomicI64::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);

/// The counting allocator (over [`System`]).
pub struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only counters are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        SEEN.store(true, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        SEEN.store(true, Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as for `alloc` and `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Bytes allocated through [`Counting`] and not yet freed (0 when it is not the global
/// allocator).
pub fn live_bytes() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Whether [`Counting`] is this process's global allocator (it has served an allocation).
pub fn counting() -> bool {
    SEEN.load(Ordering::Relaxed)
}
