//! How busy the server is, for work best done when it is not (giving freed heap back to the
//! kernel: see `main.rs`). Pure, apart from one process-wide counter.

use std::sync::atomic::{AtomicU64, Ordering};

/// Requests started and responses ended, by every listener of this process. Only its
/// changes matter: no change over a tick means nothing started or ended in it.
static EVENTS: AtomicU64 = AtomicU64::new(0);

fn event() {
    EVENTS.fetch_add(1, Ordering::Relaxed);
}

/// Counts a request's start; the guard counts its response's end (when the body is done or
/// the client went away), so keep it alive as long as the body.
pub fn request_started() -> ResponseEnd {
    event();
    ResponseEnd(())
}

/// See [`request_started`].
#[must_use = "the response's end is counted when this is dropped"]
pub struct ResponseEnd(());

impl Drop for ResponseEnd {
    fn drop(&mut self) {
        event();
    }
}

/// Requests started plus responses ended so far.
pub fn events() -> u64 {
    EVENTS.load(Ordering::Relaxed)
}

/// Looks at [`events`] once per tick and says when to tidy up: at the first quiet tick after
/// some (a burst is over: its last response ended), and, under traffic that never pauses,
/// every `every` ticks. Never while idle with nothing new since the last time.
#[derive(Debug)]
pub struct Settle {
    seen: u64,
    /// Events since the last tidy-up.
    dirty: bool,
    ticks_dirty: u32,
    every: u32,
}

impl Settle {
    pub fn new(every: u32) -> Settle {
        Settle {
            seen: 0,
            dirty: false,
            ticks_dirty: 0,
            every,
        }
    }

    /// One tick, given [`events`] now: true if it is time to tidy up.
    pub fn tick(&mut self, events: u64) -> bool {
        let arrived = events != self.seen;
        self.seen = events;
        self.dirty |= arrived;
        if !self.dirty {
            return false;
        }
        self.ticks_dirty += 1;
        if !arrived || self.ticks_dirty >= self.every {
            self.dirty = false;
            self.ticks_dirty = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds event counts, one per tick; returns the ticks that said "tidy up".
    fn ticks(every: u32, counts: &[u64]) -> Vec<usize> {
        let mut s = Settle::new(every);
        (0..counts.len()).filter(|&i| s.tick(counts[i])).collect()
    }

    #[test]
    fn once_after_a_burst_and_never_while_idle() {
        assert_eq!(ticks(30, &[0, 0, 5, 9, 9, 9, 9]), vec![4]);
        assert_eq!(ticks(30, &[0, 0, 0, 0]), Vec::<usize>::new());
    }

    #[test]
    fn each_burst_gets_its_own() {
        assert_eq!(ticks(30, &[3, 3, 3, 4, 4, 4]), vec![1, 4]);
    }

    #[test]
    fn steady_traffic_still_gets_one_now_and_then() {
        let counts: Vec<u64> = (1..=10).collect();
        assert_eq!(ticks(4, &counts), vec![3, 7]);
    }
}
