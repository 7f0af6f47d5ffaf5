//! Time as the core sees it: an [`Instant`] the caller hands in, never a clock read.
//!
//! The engine is driven with time as an argument, so a capture's recorded timestamps and a live
//! daemon's clock feed the same code. An `Instant` counts microseconds since the Unix epoch: pcap
//! timestamps convert without loss and event times print as wall-clock times.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time, in microseconds since the Unix epoch.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant {
    micros: u64,
}

impl Instant {
    /// The Unix epoch; also a handy origin for tests.
    pub const ZERO: Instant = Instant { micros: 0 };

    /// An instant this many microseconds after the Unix epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Instant { micros }
    }

    /// An instant from seconds and sub-second nanoseconds since the Unix epoch (a pcap timestamp).
    pub const fn from_unix(secs: u64, nanos: u32) -> Self {
        Instant { micros: secs.saturating_mul(1_000_000).saturating_add(nanos as u64 / 1_000) }
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> u64 {
        self.micros
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_micros(self.micros.saturating_sub(earlier.micros))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        let add = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Instant { micros: self.micros.saturating_add(add) }
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_since(earlier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_pcap_timestamps_and_saturates() {
        let t = Instant::from_unix(2, 500_999);
        assert_eq!(t.as_micros(), 2_000_500);
        assert_eq!(t + Duration::from_millis(1), Instant::from_micros(2_001_500));
        assert_eq!(Instant::ZERO - t, Duration::ZERO);
        assert_eq!(Instant::from_micros(u64::MAX) + Duration::MAX, Instant::from_micros(u64::MAX));
    }
}
