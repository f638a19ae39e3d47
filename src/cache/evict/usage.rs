//! The index of committed blobs (size, last access, open readers), the pins, and an eviction
//! pass over them: copy the candidates out, choose outside the lock, take the victims out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use tokio::sync::Notify;

use super::victims::{Candidate, choose_victims};
use crate::cache::refs::{Graph, Pinned, RefIndex};
use crate::clock::Clock;
use crate::oci::Digest;
use crate::policy::pins::Pin;
use crate::storage::DiskStore;

#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    last_access: SystemTime,
    readers: u32,
    /// The readers still following the fill that committed this blob: they joined before the
    /// commit, so they hold no `ReadGuard`, and must keep it from eviction all the same.
    followers: Option<std::sync::Weak<crate::cache::spill::Followers>>,
}

impl Entry {
    /// Is anyone reading this blob now?
    fn in_use(&self) -> bool {
        self.readers > 0
            || self
                .followers
                .as_ref()
                .and_then(std::sync::Weak::upgrade)
                .is_some_and(|f| !f.is_empty())
    }
}

/// The budget: where the watermarks are.
#[derive(Debug, Clone)]
pub struct Budget {
    pub high: u64,
    pub low: u64,
}

/// Committed blobs and their use, and the pins.
pub struct Usage {
    inner: Mutex<Inner>,
    budget: Option<Budget>,
    /// `cache.pins` (and the deprecated `cache.pinned_digests`).
    config_pins: Mutex<Vec<Pin>>,
    /// Pins made at run time (admin API, `pins.json`), sorted, each once.
    pins: Mutex<Vec<Pin>>,
    /// Moves whenever a pin is added or removed.
    pins_generation: AtomicU64,
    /// Manifest → blob references, for repository and tag pins. Without it only digest pins
    /// hold.
    index: OnceLock<Arc<RefIndex>>,
    /// Wakes the eviction task when the total passes the high watermark.
    over: Notify,
    /// Bytes a fill could not write because the disk was full: the next pass frees at least
    /// this much, budget or not.
    room_wanted: std::sync::atomic::AtomicU64,
    /// Blobs and bytes removed by eviction since start.
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
    /// What access times are read from (the store stamps mtimes from the same clock).
    clock: Clock,
}

#[derive(Default)]
struct Inner {
    /// Keys are shared (`Arc`) so that a read guard and an eviction pass's copy of the
    /// candidates take a reference instead of allocating a copy of each digest.
    blobs: HashMap<Arc<Digest>, Entry>,
    total: u64,
}

/// Keeps a blob from eviction while a reader has it open.
pub struct ReadGuard {
    usage: Arc<Usage>,
    digest: Arc<Digest>,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = self.usage.inner.lock().expect("usage poisoned");
        if let Some(e) = inner.blobs.get_mut(&self.digest) {
            e.readers = e.readers.saturating_sub(1);
        }
    }
}

impl Usage {
    /// An empty index whose access times come from the system clock.
    pub fn new(budget: Option<Budget>) -> Arc<Usage> {
        Usage::with_clock(budget, Clock::system())
    }

    /// An empty index whose access times come from `clock` (the server's).
    pub fn with_clock(budget: Option<Budget>, clock: Clock) -> Arc<Usage> {
        Arc::new(Usage {
            inner: Mutex::default(),
            budget,
            config_pins: Mutex::default(),
            pins: Mutex::default(),
            pins_generation: AtomicU64::new(0),
            index: OnceLock::new(),
            over: Notify::new(),
            room_wanted: Default::default(),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            clock,
        })
    }

    /// Builds the index from what is on disk (blocking: call it on the blocking pool).
    pub fn load(&self, store: &DiskStore) -> std::io::Result<()> {
        let blobs = store.list_blobs()?;
        let mut inner = self.inner.lock().expect("usage poisoned");
        for (digest, size, last_access) in blobs {
            inner.total += size;
            inner.blobs.insert(
                Arc::new(digest),
                Entry {
                    size,
                    last_access,
                    readers: 0,
                    followers: None,
                },
            );
        }
        drop(inner);
        self.check();
        Ok(())
    }

    /// Gives repository and tag pins the reference index to reach blobs through.
    pub fn attach_index(&self, index: Arc<RefIndex>) {
        let _ = self.index.set(index);
    }

    /// Sets the pins from the config.
    pub fn set_config_pins(&self, pins: Vec<Pin>) {
        *self.config_pins.lock().expect("pins poisoned") = pins;
        self.pins_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Replaces the run-time pins.
    pub fn set_pins(&self, pins: impl IntoIterator<Item = Pin>) {
        let mut list: Vec<Pin> = pins.into_iter().collect();
        list.sort();
        list.dedup();
        *self.pins.lock().expect("pins poisoned") = list;
        self.pins_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds a run-time pin; false if it was there already.
    pub fn pin(&self, pin: &Pin) -> bool {
        let mut pins = self.pins.lock().expect("pins poisoned");
        match pins.binary_search(pin) {
            Ok(_) => false,
            Err(at) => {
                pins.insert(at, pin.clone());
                self.pins_generation.fetch_add(1, Ordering::AcqRel);
                true
            }
        }
    }

    /// Removes a run-time pin; false if it was not there.
    pub fn unpin(&self, pin: &Pin) -> bool {
        let mut pins = self.pins.lock().expect("pins poisoned");
        match pins.binary_search(pin) {
            Ok(at) => {
                pins.remove(at);
                self.pins_generation.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// The run-time pins.
    pub fn pins(&self) -> Vec<Pin> {
        self.pins.lock().expect("pins poisoned").clone()
    }

    /// The pins from the config.
    pub fn config_pins(&self) -> Vec<Pin> {
        self.config_pins.lock().expect("pins poisoned").clone()
    }

    /// Config and run-time pins together.
    pub fn all_pins(&self) -> Vec<Pin> {
        let mut all = self.config_pins();
        all.extend(self.pins());
        all
    }

    /// Holds the run-time pins' lock, as a pass that is slow to compute the pinned set would.
    #[cfg(test)]
    pub(super) fn hold_pins(&self) -> std::sync::MutexGuard<'_, Vec<Pin>> {
        self.pins.lock().expect("pins poisoned")
    }

    /// What the pins cover now: one walk of the reference index.
    pub fn pinned(&self) -> Pinned {
        let pins = self.all_pins();
        match self.index.get() {
            Some(index) => index.pinned(&pins),
            None => Graph::default().pinned(&pins),
        }
    }

    /// Moves whenever the pinned set may have grown (a pin, a tag, a link or a manifest was
    /// added).
    fn pin_generation(&self) -> u64 {
        self.pins_generation.load(Ordering::Acquire)
            + self.index.get().map_or(0, |i| i.generation())
    }

    /// Takes a blob out of the index (it was purged).
    pub fn forget(&self, digest: &Digest) {
        let mut inner = self.inner.lock().expect("usage poisoned");
        if let Some(e) = inner.blobs.remove(digest) {
            inner.total -= e.size;
        }
    }

    /// (blobs, bytes) removed by eviction since start.
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.evicted_blobs.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// Total bytes of committed blobs.
    pub fn total(&self) -> u64 {
        self.inner.lock().expect("usage poisoned").total
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("usage poisoned").blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A blob was committed.
    pub fn committed(&self, digest: &Digest, size: u64) {
        self.committed_followed(digest, size, None);
    }

    /// A fill committed a blob that `followers` may still be reading.
    pub fn committed_followed(
        &self,
        digest: &Digest,
        size: u64,
        followers: Option<&Arc<crate::cache::spill::Followers>>,
    ) {
        let mut inner = self.inner.lock().expect("usage poisoned");
        let now = self.clock.wall_now();
        let followers = followers.map(Arc::downgrade);
        // The file is visible from its rename on, before this call: a hit in between has
        // already put the blob in the index with its reader, and that reader must stay
        // counted. (So must one still reading a copy committed before a purge.)
        let old_size = match inner.blobs.get_mut(digest) {
            Some(e) => {
                let old = e.size;
                e.size = size;
                e.last_access = now;
                e.followers = followers;
                old
            }
            None => {
                let entry = Entry {
                    size,
                    last_access: now,
                    readers: 0,
                    followers,
                };
                inner.blobs.insert(Arc::new(digest.clone()), entry);
                0
            }
        };
        inner.total = inner.total - old_size + size;
        drop(inner);
        self.check();
    }

    /// A reader opened a committed blob: it is used now, and must stay while read.
    pub fn open(self: &Arc<Self>, digest: &Digest, size: u64) -> ReadGuard {
        let mut inner = self.inner.lock().expect("usage poisoned");
        let now = self.clock.wall_now();
        let (key, added) = match inner.blobs.get_key_value(digest) {
            Some((key, _)) => (key.clone(), false),
            // A blob committed by another process or missed by the scan joins the index here.
            None => {
                let key = Arc::new(digest.clone());
                inner.blobs.insert(
                    key.clone(),
                    Entry {
                        size,
                        last_access: now,
                        readers: 0,
                        followers: None,
                    },
                );
                inner.total += size;
                (key, true)
            }
        };
        if let Some(e) = inner.blobs.get_mut(digest) {
            e.last_access = now;
            e.readers += 1;
        }
        drop(inner);
        if added {
            self.check();
        }
        ReadGuard {
            usage: self.clone(),
            digest: key,
        }
    }

    /// The disk ran full while a fill needed `needed` bytes: evict least recently used blobs
    /// until that much is free, even below the budget (or with none): a cache that cannot
    /// write is worse than a smaller one.
    pub fn disk_full(&self, needed: u64) {
        self.room_wanted
            .fetch_max(needed, std::sync::atomic::Ordering::Relaxed);
        self.over.notify_one();
    }

    /// Waits until a pass is wanted: the blobs passed the high watermark, or the disk ran
    /// full.
    pub(super) async fn pass_wanted(&self) {
        self.over.notified().await;
    }

    /// Counts what a pass removed (for `evictions`).
    pub(super) fn count_evicted(&self, blobs: u64, bytes: u64) {
        self.evicted_blobs.fetch_add(blobs, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn check(&self) {
        if let Some(b) = &self.budget
            && self.total() > b.high
        {
            self.over.notify_one();
        }
    }

    /// Picks blobs to remove and takes them out of the index (so no new reader is promised
    /// them). The caller deletes the files.
    ///
    /// The `Usage` lock is held only to copy the unread entries out and, at the end, to take
    /// the victims out; sorting and the pinned set happen outside it, so hits and commits are
    /// not stalled by a pass.
    pub(super) fn take_victims(&self) -> Vec<(Digest, u64)> {
        let wanted = self
            .room_wanted
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let total = self.total();
        let over_budget = self
            .budget
            .as_ref()
            .filter(|b| total > b.high)
            .map(|b| b.low);
        // A full disk asks for room even under the budget (or with none).
        let for_room = (wanted > 0).then(|| total.saturating_sub(wanted));
        let Some(target) = over_budget.into_iter().chain(for_room).min() else {
            return Vec::new();
        };
        let generation = self.pin_generation();
        let mut pinned = self.pinned();
        let (candidates, total) = self.candidates();
        let victims = choose_victims(
            candidates.into_iter().map(|mut c| {
                c.keep = pinned.contains(&c.digest);
                c
            }),
            total,
            target,
        );
        if victims.is_empty() {
            return Vec::new();
        }
        // Something was pinned, tagged or stored while we chose: look again (once per pass).
        if self.pin_generation() != generation {
            pinned = self.pinned();
        }
        self.take(victims, &pinned)
    }

    /// The unread blobs (digest, size, last access) and the total. A copy made under the
    /// lock: no sorting, no pins. (Public for `benches/cache_lookup.rs`, which measures how
    /// long a pass holds the lock.)
    pub fn candidates(&self) -> (Vec<Candidate>, u64) {
        let inner = self.inner.lock().expect("usage poisoned");
        let candidates = inner
            .blobs
            .iter()
            .filter(|(_, e)| !e.in_use())
            .map(|(d, e)| Candidate {
                digest: Arc::clone(d),
                size: e.size,
                last_access: e.last_access,
                keep: false,
            })
            .collect();
        (candidates, inner.total)
    }

    /// Takes the chosen victims out of the index, except those pinned now and those whose
    /// entry changed since they were copied out (opened, read, re-committed).
    fn take(&self, victims: Vec<Candidate>, pinned: &Pinned) -> Vec<(Digest, u64)> {
        let mut inner = self.inner.lock().expect("usage poisoned");
        let mut out = Vec::with_capacity(victims.len());
        for v in victims {
            if pinned.contains(&v.digest) {
                continue;
            }
            let unchanged = inner
                .blobs
                .get(&*v.digest)
                .is_some_and(|e| !e.in_use() && e.last_access == v.last_access && e.size == v.size);
            if unchanged && let Some(e) = inner.blobs.remove(&*v.digest) {
                inner.total -= e.size;
                out.push((Arc::unwrap_or_clone(v.digest), e.size));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn index_tracks_totals_readers_and_pins() {
        let pinned = Digest::of(b"pinned");
        let usage = Usage::new(Some(Budget { high: 25, low: 15 }));
        usage.set_config_pins(vec![
            Pin::parse(&format!("{}*", &pinned.to_string()[..12])).unwrap(),
        ]);
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        usage.committed(&a, 10);
        usage.committed(&pinned, 10);
        usage.committed(&b, 10);
        assert_eq!(usage.total(), 30);
        let guard = usage.open(&a, 10); // a is now the most recent, and open
        let victims = usage.take_victims();
        assert_eq!(victims, vec![(b.clone(), 10)], "only b may go");
        assert_eq!(usage.total(), 20);
        drop(guard);
        assert_eq!(usage.len(), 2);
        usage.committed(&b, 10);
        // Recommitting the same digest does not double-count.
        usage.committed(&b, 10);
        assert_eq!(usage.total(), 30);
    }

    #[test]
    fn victims_that_changed_after_the_copy_stay() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH);
        let usage = Usage::with_clock(Some(Budget { high: 5, low: 0 }), clock.clone());
        let (a, b, c, d) = (
            Digest::of(b"a"),
            Digest::of(b"b"),
            Digest::of(b"c"),
            Digest::of(b"d"),
        );
        for x in [&a, &b, &c, &d] {
            usage.committed(x, 10);
        }
        let (candidates, total) = usage.candidates();
        assert_eq!((candidates.len(), total), (4, 40));
        let victims = choose_victims(candidates.into_iter(), total, 0);
        assert_eq!(victims.len(), 4);
        // Between the copy and the take: a is opened (and still read), b is read and
        // released (newer access), c is pinned at run time. Only d may go.
        clock.advance(Duration::from_secs(1));
        let _reading = usage.open(&a, 10);
        drop(usage.open(&b, 10));
        usage.pin(&Pin::parse(&c.to_string()).unwrap());
        let taken = usage.take(victims, &usage.pinned());
        assert_eq!(taken, vec![(d.clone(), 10)]);
        assert_eq!(usage.total(), 30);
        assert_eq!(usage.len(), 3);
    }

    #[test]
    fn a_reader_that_opened_the_blob_before_its_commit_was_indexed_keeps_it() {
        // A hit can open the file between the commit's rename and the fill's call to
        // `committed`: the reader joins the index first, and the commit must not forget it.
        let usage = Usage::new(Some(Budget { high: 5, low: 0 }));
        let (read, idle) = (Digest::of(b"read"), Digest::of(b"idle"));
        let reading = usage.open(&read, 10);
        usage.committed(&read, 10);
        usage.committed(&idle, 10);
        assert_eq!(usage.total(), 20, "counted once");
        assert_eq!(
            usage.take_victims(),
            vec![(idle, 10)],
            "only the idle blob may go"
        );
        drop(reading);
        usage.committed(&Digest::of(b"more"), 10);
        let victims: Vec<Digest> = usage.take_victims().into_iter().map(|(d, _)| d).collect();
        assert!(victims.contains(&read), "once read, it may go: {victims:?}");
    }

    #[test]
    fn run_time_pins_are_sorted_sets() {
        let usage = Usage::new(None);
        let p = Pin::parse("docker.io/library/*").unwrap();
        assert!(usage.pin(&p));
        assert!(!usage.pin(&p));
        assert_eq!(usage.pins(), vec![p.clone()]);
        assert!(usage.unpin(&p));
        assert!(!usage.unpin(&p));
    }

    #[test]
    fn a_blob_still_followed_after_its_commit_is_not_a_victim() {
        let usage = Usage::new(Some(Budget { high: 5, low: 0 }));
        let followers = Arc::new(crate::cache::spill::Followers::default());
        let reader = followers.join();
        let (followed, idle) = (Digest::of(b"followed"), Digest::of(b"idle"));
        usage.committed_followed(&followed, 10, Some(&followers));
        usage.committed(&idle, 10);
        assert_eq!(
            usage.take_victims(),
            vec![(idle, 10)],
            "only the idle blob may go"
        );
        drop(reader);
        usage.committed(&Digest::of(b"more"), 10);
        let victims: Vec<Digest> = usage.take_victims().into_iter().map(|(d, _)| d).collect();
        assert!(
            victims.contains(&followed),
            "once its reader is gone, it may go: {victims:?}"
        );
    }
}
