//! Pass-through for a fill whose disk write failed (a full disk, an I/O error): the bytes the
//! disk no longer takes reach the attached readers from memory, through a bounded window,
//! paced by the slowest of them. The upstream stream is not interrupted and the digest is
//! still checked over every byte before any reader sends its last one.
//!
//! Architecture invariants:
//! - **Every reader of a fill is a follower from the moment it subscribes** (under the fill
//!   map's lock), with a cursor at the next offset it still needs. The window drops only bytes
//!   every follower has passed, so no attached reader ever misses a byte.
//! - **The window is bounded.** A chunk waits until the window holds less than
//!   [`WINDOW`] bytes; the upstream is then paced by the slowest reader, as in any proxy.
//! - **A stuck follower cannot hold the others forever.** One whose cursor has not moved for
//!   [`STALL`] while the window is full is dropped: its next read fails and its client sees
//!   an aborted body.
//! - **With no follower left, a pass-through fill stops**: it has left the fill map (nobody new
//!   can join it) and nothing of it will be cached, so the rest of the download is wasted.
//!
//! Everything here is synchronous: the fill's writer thread blocks on a condition variable;
//! readers only take short locks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use crate::clock::Clock;
use crate::sync::Locked;

/// At most this many bytes wait in memory ahead of the slowest follower.
pub const WINDOW: u64 = 4 << 20;

/// A follower whose cursor stays put this long while the window is full is dropped.
pub const STALL: Duration = Duration::from_secs(60);

/// A cursor's value once its follower was dropped for stalling.
const DROPPED: u64 = u64::MAX;

/// A waiting writer looks at the cursors again at least this often, woken or not. Readers wake
/// it when they move, but a reader that moves just as the fill starts passing through can read
/// `passing_through` as still unset (it and the cursor are separate atomics) and skip the
/// wake-up; this bounds what such a miss costs. The tests set it far longer, so that they fail
/// if a wake-up is missing instead of being rescued by the re-poll.
const REPOLL: Duration = Duration::from_millis(200);

/// The readers of one fill and how far each has got.
#[derive(Default)]
pub struct Followers {
    /// Taken with `Locked`: each section reads the map or inserts or removes one cursor, so
    /// a poisoned lock still guards a whole map.
    cursors: Mutex<HashMap<u64, Arc<AtomicU64>>>,
    moved: Condvar,
    next_id: AtomicU64,
    /// Set once the fill passes through: only then do readers wake the writer when they move.
    passing_through: AtomicBool,
    /// Set, under `cursors`' lock, while the writer waits for room: the tests' way to know it
    /// is waiting, so that they can check what wakes it.
    #[cfg(test)]
    writer_waiting: AtomicBool,
    /// Signalled, under `cursors`' lock, as the writer starts to wait: what the tests wait on.
    #[cfg(test)]
    writer_waits: Condvar,
}

impl std::fmt::Debug for Followers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `try_lock`: a Debug impl must never wait on the writer.
        let count = self.cursors.try_lock().map(|c| c.len()).ok();
        f.debug_struct("Followers").field("count", &count).finish()
    }
}

/// One follower's place in the fill. Dropping it (the client went away) lets the window move
/// on without it.
pub struct Cursor {
    followers: Arc<Followers>,
    id: u64,
    at: Arc<AtomicU64>,
}

/// The follower was dropped for stalling a pass-through fill.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped;

impl Followers {
    /// A new follower, needing everything from offset 0 until it says otherwise.
    pub fn join(self: &Arc<Self>) -> Cursor {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let at = Arc::new(AtomicU64::new(0));
        self.cursors.locked().insert(id, at.clone());
        Cursor {
            followers: self.clone(),
            id,
            at,
        }
    }

    pub fn len(&self) -> usize {
        self.cursors.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The smallest offset some follower still needs; `None` with no followers.
    fn slowest(cursors: &HashMap<u64, Arc<AtomicU64>>) -> Option<u64> {
        cursors
            .values()
            .map(|c| c.load(Ordering::Acquire))
            .filter(|&c| c != DROPPED)
            .min()
    }

    fn wake(&self) {
        if self.passing_through.load(Ordering::Acquire) {
            let _held = self.cursors.locked();
            self.moved.notify_all();
        }
    }
}

impl Cursor {
    /// The follower now needs bytes from `to` on. Fails if it was dropped for stalling.
    pub fn advance(&self, to: u64) -> Result<(), Dropped> {
        let mut cur = self.at.load(Ordering::Acquire);
        loop {
            if cur == DROPPED {
                return Err(Dropped);
            }
            match self
                .at
                .compare_exchange(cur, to, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.followers.wake();
        Ok(())
    }

    pub fn is_dropped(&self) -> bool {
        self.at.load(Ordering::Acquire) == DROPPED
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.followers.cursors.locked().remove(&self.id);
        self.followers.moved.notify_all();
    }
}

/// The bytes of a pass-through fill that are not on disk: `[base, end)`, in arrival order.
pub struct Spill {
    /// Taken with `Locked`. `base` and `chunks` (and `end` and `chunks`) move together in
    /// straight-line code with no panic path between them, so a poisoned lock still guards a
    /// window whose offsets match its chunks.
    inner: Mutex<Window>,
}

impl std::fmt::Debug for Spill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.inner.locked();
        f.debug_struct("Spill")
            .field("base", &w.base)
            .field("end", &w.end)
            .finish()
    }
}

struct Window {
    base: u64,
    end: u64,
    chunks: VecDeque<Bytes>,
}

/// Why a chunk could not be passed through.
#[derive(Debug, PartialEq, Eq)]
pub enum PassError {
    /// Every reader went away: nobody needs the rest of the blob.
    NoFollowers,
}

impl Spill {
    /// A window that starts at `start`: the bytes below it are on disk.
    pub fn new(start: u64) -> Spill {
        Spill {
            inner: Mutex::new(Window {
                base: start,
                end: start,
                chunks: VecDeque::new(),
            }),
        }
    }

    /// Up to `max` bytes at `pos`: `Ok(None)` if they have not arrived yet, `Err` if the
    /// window has already moved past `pos` (only a follower that was dropped can get there).
    pub fn read(&self, pos: u64, max: usize) -> Result<Option<Bytes>, Dropped> {
        let w = self.inner.locked();
        if pos < w.base {
            return Err(Dropped);
        }
        if pos >= w.end {
            return Ok(None);
        }
        let mut off = w.base;
        for c in &w.chunks {
            let len = c.len() as u64;
            if pos < off + len {
                let from = (pos - off) as usize;
                let to = c.len().min(from + max);
                return Ok(Some(c.slice(from..to)));
            }
            off += len;
        }
        // Not reached: the chunks cover `[base, end)` and `pos` is in it. Were it reached, the
        // reader would report the bytes missing rather than the process panic.
        Ok(None)
    }

    /// Offset one past the last byte in the window.
    pub fn end(&self) -> u64 {
        self.inner.locked().end
    }

    /// Drops whole chunks that end at or below `offset`.
    fn drop_below(w: &mut Window, offset: u64) {
        while let Some(c) = w.chunks.front() {
            let len = c.len() as u64;
            if w.base + len > offset {
                break;
            }
            w.base += len;
            w.chunks.pop_front();
        }
    }

    /// Appends `chunk`, first waiting until the window has room for it beyond the slowest
    /// follower. Blocks the calling (writer) thread. Drops followers that stall for `stall`
    /// as `clock` measures it (the server's: tests step a manual one past the limit).
    pub fn pass(
        &self,
        followers: &Followers,
        chunk: Bytes,
        window: u64,
        stall: Duration,
        clock: &Clock,
    ) -> Result<(), PassError> {
        self.pass_repolling(followers, chunk, window, stall, REPOLL, clock)
    }

    /// [`Spill::pass`], looking at the cursors again at least every `repoll` while it waits.
    fn pass_repolling(
        &self,
        followers: &Followers,
        chunk: Bytes,
        window: u64,
        stall: Duration,
        repoll: Duration,
        clock: &Clock,
    ) -> Result<(), PassError> {
        followers.passing_through.store(true, Ordering::Release);
        let mut cursors = followers.cursors.locked();
        let mut last_move = (Followers::slowest(&cursors), clock.monotonic_now());
        loop {
            let Some(slowest) = Followers::slowest(&cursors) else {
                return Err(PassError::NoFollowers);
            };
            {
                let mut w = self.inner.locked();
                Self::drop_below(&mut w, slowest);
                let held = w.end - w.base;
                if held == 0 || held + chunk.len() as u64 <= window {
                    w.end += chunk.len() as u64;
                    w.chunks.push_back(chunk);
                    return Ok(());
                }
            }
            let now = clock.monotonic_now();
            if last_move.0 != Some(slowest) {
                last_move = (Some(slowest), now);
            } else if now.saturating_duration_since(last_move.1) >= stall {
                for c in cursors.values() {
                    if c.load(Ordering::Acquire) == slowest {
                        c.store(DROPPED, Ordering::Release);
                    }
                }
                tracing::warn!(
                    offset = slowest,
                    "dropping a client that stalled a pass-through download"
                );
                continue;
            }
            let wait = stall.saturating_sub(now.saturating_duration_since(last_move.1));
            #[cfg(test)]
            {
                followers.writer_waiting.store(true, Ordering::Relaxed);
                followers.writer_waits.notify_all();
            }
            cursors = followers
                .moved
                .wait_timeout(cursors, wait.min(repoll))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            #[cfg(test)]
            followers.writer_waiting.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;

    fn bytes(n: usize, fill: u8) -> Bytes {
        Bytes::from(vec![fill; n])
    }

    /// Stall limit and re-poll interval for the writers the wake-up tests start: so long that
    /// only a wake-up can get them going again within [`WAKE_BOUND`].
    const NEVER: Duration = Duration::from_secs(3600);

    /// How long a test waits for something that should happen at once: generous for a busy
    /// machine, and far below [`NEVER`].
    const WAKE_BOUND: Duration = Duration::from_secs(10);

    /// Passes `chunk` through a 10-byte window on a thread of its own, with neither the stall
    /// limit nor the re-poll to get a waiting writer going: the result arrives on the channel.
    fn writer(
        s: &Arc<Spill>,
        f: &Arc<Followers>,
        chunk: Bytes,
    ) -> mpsc::Receiver<Result<(), PassError>> {
        writer_on(s, f, chunk, NEVER, &still_clock())
    }

    /// [`writer`], dropping followers that stall for `stall` on `clock`.
    fn writer_on(
        s: &Arc<Spill>,
        f: &Arc<Followers>,
        chunk: Bytes,
        stall: Duration,
        clock: &Clock,
    ) -> mpsc::Receiver<Result<(), PassError>> {
        let (s, f, clock) = (s.clone(), f.clone(), clock.clone());
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(s.pass_repolling(&f, chunk, 10, stall, NEVER, &clock));
        });
        rx
    }

    /// Returns once the writer waits for room. The flag is read under the lock the writer
    /// holds whenever it is not waiting, so a writer seen waiting is inside its wait.
    fn until_the_writer_waits(f: &Followers) {
        let cursors = f.cursors.lock().unwrap();
        let (_cursors, timeout) = f
            .writer_waits
            .wait_timeout_while(cursors, WAKE_BOUND, |_| {
                !f.writer_waiting.load(Ordering::Relaxed)
            })
            .unwrap();
        assert!(!timeout.timed_out(), "the writer never waited");
    }

    /// Wakes a waiting writer as a moving reader would, so that it looks at the cursors (and
    /// the clock) again.
    fn nudge(f: &Followers) {
        let _cursors = f.cursors.lock().unwrap();
        f.moved.notify_all();
    }

    /// A clock that stands still: only [`Clock::advance`] makes a follower stall.
    fn still_clock() -> Clock {
        Clock::manual(std::time::SystemTime::UNIX_EPOCH)
    }

    /// The writer's result, which must come well before any re-poll could have fetched it.
    fn woken(rx: &mpsc::Receiver<Result<(), PassError>>) -> Result<(), PassError> {
        rx.recv_timeout(WAKE_BOUND)
            .expect("the waiting writer was not woken")
    }

    #[test]
    fn reads_come_from_the_right_chunk() {
        let f = Arc::new(Followers::default());
        let _c = f.join();
        let s = Spill::new(100);
        s.pass(&f, bytes(10, 1), 1000, STALL, &still_clock())
            .unwrap();
        s.pass(&f, bytes(10, 2), 1000, STALL, &still_clock())
            .unwrap();
        assert_eq!(s.read(100, 4).unwrap().unwrap(), bytes(4, 1));
        assert_eq!(s.read(108, 100).unwrap().unwrap(), bytes(2, 1));
        assert_eq!(s.read(115, 100).unwrap().unwrap(), bytes(5, 2));
        assert_eq!(s.read(120, 100).unwrap(), None);
        assert_eq!(s.end(), 120);
    }

    #[test]
    fn the_window_keeps_what_the_slowest_follower_needs() {
        let f = Arc::new(Followers::default());
        let slow = f.join();
        let fast = f.join();
        let s = Spill::new(0);
        s.pass(&f, bytes(10, 1), 20, STALL, &still_clock()).unwrap();
        s.pass(&f, bytes(10, 2), 20, STALL, &still_clock()).unwrap();
        fast.advance(20).unwrap();
        slow.advance(10).unwrap();
        // The first chunk is behind both followers: it goes, making room.
        s.pass(&f, bytes(10, 3), 20, STALL, &still_clock()).unwrap();
        assert_eq!(s.read(0, 10), Err(Dropped));
        assert_eq!(s.read(10, 10).unwrap().unwrap(), bytes(10, 2));
    }

    #[test]
    fn a_full_window_waits_for_the_slowest_follower() {
        let f = Arc::new(Followers::default());
        let slow = f.join();
        let s = Arc::new(Spill::new(0));
        s.pass(&f, bytes(10, 1), 10, STALL, &still_clock()).unwrap();
        let writer = writer(&s, &f, bytes(10, 2));
        until_the_writer_waits(&f);
        assert_eq!(s.end(), 10, "the writer must wait for room");
        slow.advance(10).unwrap();
        assert_eq!(woken(&writer), Ok(()));
        assert_eq!(s.end(), 20);
    }

    #[test]
    fn a_stalled_follower_is_dropped_and_the_others_go_on() {
        let clock = still_clock();
        let f = Arc::new(Followers::default());
        let stuck = f.join();
        let moving = f.join();
        moving.advance(10).unwrap();
        let s = Arc::new(Spill::new(0));
        s.pass(&f, bytes(10, 1), 10, STALL, &clock).unwrap();
        // The window is full until `stuck` moves, which it never does: the writer waits until
        // `stuck` has not moved for `STALL`, then drops it.
        let writer = writer_on(&s, &f, bytes(10, 2), STALL, &clock);
        until_the_writer_waits(&f);
        clock.advance(STALL);
        nudge(&f);
        assert_eq!(woken(&writer), Ok(()));
        assert!(stuck.is_dropped());
        assert_eq!(stuck.advance(5), Err(Dropped));
        assert!(!moving.is_dropped());
        assert_eq!(s.read(10, 10).unwrap().unwrap(), bytes(10, 2));
    }

    #[test]
    fn with_no_followers_the_pass_through_stops() {
        let f = Arc::new(Followers::default());
        let s = Spill::new(0);
        assert_eq!(
            s.pass(&f, bytes(1, 1), 10, STALL, &still_clock()),
            Err(PassError::NoFollowers)
        );
        let c = f.join();
        s.pass(&f, bytes(1, 1), 10, STALL, &still_clock()).unwrap();
        drop(c);
        assert!(f.is_empty());
        assert_eq!(
            s.pass(&f, bytes(1, 1), 10, STALL, &still_clock()),
            Err(PassError::NoFollowers)
        );
    }

    #[test]
    fn a_departing_follower_wakes_a_waiting_writer() {
        let f = Arc::new(Followers::default());
        let keep = f.join();
        keep.advance(10).unwrap();
        let leaving = f.join();
        let s = Arc::new(Spill::new(0));
        s.pass(&f, bytes(10, 1), 10, STALL, &still_clock()).unwrap();
        let writer = writer(&s, &f, bytes(10, 2));
        until_the_writer_waits(&f);
        drop(leaving);
        assert_eq!(woken(&writer), Ok(()));
    }
}
