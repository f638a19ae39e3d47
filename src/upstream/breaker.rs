//! A per-upstream circuit breaker on consecutive failures, so a dead or hanging upstream is
//! skipped at once instead of costing every request a full timeout.
//!
//! Closed → (after `threshold` consecutive failures) → Open → (after `cooldown`) → one probe
//! request is let through (half-open) → its success closes the breaker, its failure opens it
//! again for another cool-down. A probe whose outcome never arrives (its request was dropped)
//! does not wedge the breaker: after another cool-down the next request probes.
//!
//! What counts as a failure is the caller's call: transport errors, timeouts and 5xx do;
//! a 404 or a 429 is an answer from a live upstream and does not.
//!
//! Time is passed in, so the state machine is tested without clocks or sleeps. Deadlines are
//! never computed: the breaker keeps when a state began and compares the time elapsed since
//! with the cool-down, so no cool-down, however long, can overflow an `Instant`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::Locked;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { since: Instant },
    HalfOpen { probe_started: Instant },
}

#[derive(Debug)]
pub struct Breaker {
    /// Each section reads the state and replaces it whole, so a poisoned lock (`Locked`) still
    /// guards a valid one.
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// May a request go to this upstream now? Closed: yes. Open: no until the cool-down
    /// ends, and then exactly one caller (the probe) gets a yes.
    pub fn admit(&self, now: Instant) -> bool {
        let mut s = self.state.locked();
        match *s {
            State::Closed { .. } => true,
            State::Open { since } if self.cooling(since, now) => false,
            State::Open { .. } => {
                *s = State::HalfOpen { probe_started: now };
                true
            }
            State::HalfOpen { probe_started } if self.cooling(probe_started, now) => false,
            State::HalfOpen { .. } => {
                *s = State::HalfOpen { probe_started: now };
                true
            }
        }
    }

    pub fn record_success(&self) {
        let mut s = self.state.locked();
        if !matches!(*s, State::Closed { failures: 0 }) {
            if !matches!(*s, State::Closed { .. }) {
                tracing::info!("upstream answered again: circuit closed");
            }
            *s = State::Closed { failures: 0 };
        }
    }

    /// Records a failure; returns true if this opened the breaker.
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut s = self.state.locked();
        let open = match *s {
            State::Closed { failures } => failures.saturating_add(1) >= self.threshold,
            // A failed probe, or a straggler from before the breaker opened.
            State::HalfOpen { .. } => true,
            State::Open { .. } => false,
        };
        *s = match *s {
            _ if open => State::Open { since: now },
            State::Closed { failures } => State::Closed {
                failures: failures.saturating_add(1),
            },
            other => other,
        };
        open
    }

    /// Is a cool-down that began at `since` still running at `now`? (A `now` before `since`,
    /// from a caller that read the clock before another, counts as no time passed.)
    fn cooling(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) < self.cooldown
    }

    /// True while requests are being turned away (for status and logs).
    pub fn is_open(&self, now: Instant) -> bool {
        match *self.state.locked() {
            State::Closed { .. } => false,
            State::Open { since } => self.cooling(since, now),
            State::HalfOpen { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL: Duration = Duration::from_secs(10);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new(3, COOL);
        let t = Instant::now();
        assert!(!b.record_failure(t));
        assert!(!b.record_failure(t));
        b.record_success(); // not consecutive any more
        assert!(!b.record_failure(t));
        assert!(!b.record_failure(t));
        assert!(b.admit(t));
        assert!(b.record_failure(t), "third consecutive failure opens");
        assert!(!b.admit(t));
        assert!(!b.admit(t + COOL / 2));
        assert!(b.is_open(t));
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.record_failure(t);
        let later = t + COOL;
        assert!(b.admit(later), "the probe");
        assert!(!b.admit(later), "only one probe at a time");
        b.record_success();
        assert!(b.admit(later) && b.admit(later), "closed again");
        assert!(!b.is_open(later));
    }

    #[test]
    fn failed_probe_reopens() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.record_failure(t);
        let later = t + COOL;
        assert!(b.admit(later));
        assert!(b.record_failure(later));
        assert!(!b.admit(later + COOL / 2));
        assert!(b.admit(later + COOL));
    }

    /// A cool-down no `Instant` can be moved by (an absurd `breaker_cooldown`) used to panic
    /// the request that opened the breaker; now the upstream just stays skipped.
    #[test]
    fn an_endless_cooldown_does_not_overflow() {
        let b = Breaker::new(1, Duration::MAX);
        let t = Instant::now();
        assert!(b.record_failure(t));
        let much_later = t + Duration::from_secs(100 * 365 * 24 * 3600);
        assert!(!b.admit(much_later));
        assert!(b.is_open(much_later));
        assert!(!b.record_failure(much_later), "already open");
    }

    #[test]
    fn an_earlier_now_counts_as_no_time_passed() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now() + COOL;
        b.record_failure(t);
        assert!(!b.admit(t - COOL / 2), "a caller that read the clock first");
        assert!(b.admit(t + COOL));
    }

    #[test]
    fn lost_probe_does_not_wedge() {
        let b = Breaker::new(1, COOL);
        let t = Instant::now();
        b.record_failure(t);
        assert!(b.admit(t + COOL)); // probe whose outcome is never recorded
        assert!(!b.admit(t + COOL + COOL / 2));
        assert!(b.admit(t + COOL * 2), "another probe after a cool-down");
    }
}
