//! The clock tag answers are aged on: the system's, or in tests one moved by hand, so that the
//! integration tests step past a TTL instead of sleeping through it.
//!
//! It lives here, not beside the freshness rules in `policy`, because reading the time is an
//! input from outside, like reading a file: the policy stays pure by taking ages as durations,
//! and the cache, the one part that stamps tag answers with a fetch time and later measures
//! their age, owns the clock it does that on. The library's entry point hands it in, and tests
//! reach it as `cistern::cache::Clock`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Where tag answers get their fetch times and ages: the system clock, or a manual one that
/// stands still until a test advances it.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<SystemTime>>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start` until [`Clock::advance`] moves it (tests).
    pub fn manual(start: SystemTime) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    pub fn now(&self) -> SystemTime {
        match &self.manual {
            Some(t) => *t.lock().expect("clock poisoned"),
            None => SystemTime::now(),
        }
    }

    /// Moves a manual clock forward; every copy of it moves. The system clock cannot be moved.
    pub fn advance(&self, by: Duration) {
        let t = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        *t.lock().expect("clock poisoned") += by;
    }

    /// How long ago `then` was; zero if it is in the future (a clock set back).
    pub fn age(&self, then: SystemTime) -> Duration {
        self.now().duration_since(then).unwrap_or(Duration::ZERO)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.manual {
            Some(_) => write!(f, "Clock::manual({:?})", self.now()),
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
        assert_eq!(clock.now(), start);
        copy.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), start + Duration::from_secs(90));
        assert_eq!(clock.age(start), Duration::from_secs(90));
        assert_eq!(clock.age(start + Duration::from_secs(100)), Duration::ZERO);
    }
}
