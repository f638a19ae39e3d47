//! The one clock cistern reads time from: the system's, or in tests one moved by hand, so that
//! the tests step past a TTL, a token's lifetime or a breaker's cool-down instead of sleeping
//! through it.
//!
//! It gives two readings, moved together by [`Clock::advance`]:
//! - [`Clock::monotonic_now`] (an [`Instant`]) for durations that must not jump when the
//!   system's wall clock is set: breaker cool-downs, token lifetimes;
//! - [`Clock::wall_now`] (a [`SystemTime`]) for stamps that outlive the process or are
//!   compared with stamps from disk: tag fetch times, blob access times (file mtimes).
//!
//! One clock, not one per concern: a test that advances it moves every deadline at once, so no
//! part of the server is left on real time by accident. It is a module of its own, low in the
//! layering, because reading the time is an input from outside, like reading a file: the pure
//! policy modules below it take ages and instants as arguments and never read it; `storage`,
//! `upstream` and `cache` hold a copy, handed in by the library's entry point
//! (`Server::builder(config).clock(clock)`). Tests reach it as `cistern::clock::Clock`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::sync::Locked;

/// Where the server reads the time: the system clock, or a manual one that stands still until
/// a test advances it. Copies share the time: advancing one advances all.
#[derive(Clone, Default)]
pub struct Clock {
    /// Taken with `Locked`: only `advance` changes it, and an overflow there (the one panic
    /// it can meet, a test moving a clock past what `SystemTime` holds) would leave its two
    /// readings apart by the step, which only that test could notice.
    manual: Option<Arc<Mutex<Manual>>>,
}

/// A manual clock's two readings.
#[derive(Clone, Copy, Debug)]
struct Manual {
    wall: SystemTime,
    monotonic: Instant,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock whose wall time reads `start` (and whose monotonic time reads the moment it
    /// was made) until [`Clock::advance`] moves both (tests).
    pub fn manual(start: SystemTime) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(Manual {
                wall: start,
                monotonic: Instant::now(),
            }))),
        }
    }

    /// Wall-clock time, for stamps: when a tag answer was fetched, when a blob was last used.
    pub fn wall_now(&self) -> SystemTime {
        match &self.manual {
            Some(m) => m.locked().wall,
            None => SystemTime::now(),
        }
    }

    /// Monotonic time, for deadlines and durations: breaker cool-downs, token lifetimes.
    pub fn monotonic_now(&self) -> Instant {
        match &self.manual {
            Some(m) => m.locked().monotonic,
            None => Instant::now(),
        }
    }

    /// Moves a manual clock's two readings forward by `by`; every copy of it moves. The system
    /// clock cannot be moved: calling this on it is a test's mistake, and panics.
    // The one exception to the lint in this file. Nothing in `src/` outside tests calls
    // `advance`, so no request or file can reach the panic; a test that moves the system clock
    // must fail loudly rather than run on real time.
    #[allow(clippy::expect_used)]
    pub fn advance(&self, by: Duration) {
        let m = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        let mut m = m.locked();
        m.wall += by;
        m.monotonic += by;
    }

    /// How long ago the wall-clock stamp `then` was; zero if it is in the future (a clock set
    /// back).
    pub fn age(&self, then: SystemTime) -> Duration {
        self.wall_now()
            .duration_since(then)
            .unwrap_or(Duration::ZERO)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.manual {
            Some(_) => write!(f, "Clock::manual({:?})", self.wall_now()),
            None => f.write_str("Clock::system"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_every_copy_with_it() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Clock::manual(start);
        let copy = clock.clone();
        let instant = clock.monotonic_now();
        assert_eq!(clock.wall_now(), start);
        assert_eq!(clock.monotonic_now(), instant, "standing still");
        copy.advance(Duration::from_secs(90));
        assert_eq!(clock.wall_now(), start + Duration::from_secs(90));
        assert_eq!(clock.monotonic_now(), instant + Duration::from_secs(90));
        assert_eq!(clock.age(start), Duration::from_secs(90));
        assert_eq!(clock.age(start + Duration::from_secs(100)), Duration::ZERO);
    }

    #[test]
    fn the_system_clock_runs() {
        let clock = Clock::system();
        let (wall, instant) = (SystemTime::now(), Instant::now());
        assert!(clock.wall_now() >= wall);
        assert!(clock.monotonic_now() >= instant);
    }
}
