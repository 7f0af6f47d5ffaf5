//! The daemon's clock: wall-clock time that never runs backwards.
//!
//! Events carry wall-clock times, but timers must not jump when the system clock is set. The
//! clock reads the wall time once at start and adds the monotonic time elapsed since.

use std::time::{SystemTime, UNIX_EPOCH};

use flowgate_core::Instant;

#[derive(Copy, Clone, Debug)]
pub(crate) struct Clock {
    wall_start: Instant,
    mono_start: std::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Clock {
            wall_start: Instant::from_unix(since_epoch.as_secs(), since_epoch.subsec_nanos()),
            mono_start: std::time::Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> Instant {
        self.wall_start + self.mono_start.elapsed()
    }
}
