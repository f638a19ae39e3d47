//! The index of committed blobs (size, last access, open readers), the pins, and an eviction
//! pass over them: copy the candidates out, choose outside the lock, take the victims out.
//!
//! Memory: the index holds every committed blob, so an entry is kept small: the digest's 32
//! bytes as the key, the size and the last access (milliseconds), 48 bits each, as the value:
//! 44 bytes in all, 51 to 103 bytes per blob with the hash table's free slots and control
//! bytes (see [`Entry`], [`Usage::index_bytes`] and `benches/startup.rs`). Readers are counted in a side table that
//! holds only the blobs being read.
//!
//! Start-up: the index is built by a scan of `blobs/` that runs while the server already
//! serves ([`Usage::begin_loading`], [`Usage::load`]). What waits for what:
//! - serving blobs waits for nothing: a hit opens the file by its digest, and `open` enters
//!   the blob into the index (with its reader) if the scan has not reached it yet;
//! - eviction waits for the scan's end ([`Usage::loaded`]): an index without the blobs not yet
//!   scanned holds only the recently used ones, the very ones LRU must keep, and its total
//!   is too low to say whether the budget is kept;
//! - purges wait for it too (`admin::Admin`), so a purge answers with an index that knows
//!   every blob;
//! - the scan's batches are merged under the index's lock, and what happened while it ran
//!   wins over what it saw: an entry already there (committed or opened during the scan) is
//!   kept as it is, and a blob forgotten (purged) during the scan is not put back from a
//!   stale directory listing. So nothing recorded during the scan is lost or counted twice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};

use super::key::BlobKey;
use super::victims::{Candidate, choose_victims};
use crate::cache::refs::{Graph, Pinned, RefIndex};
use crate::cache::spill::Followers;
use crate::clock::Clock;
use crate::oci::Digest;
use crate::policy::pins::Pin;
use crate::storage::DiskStore;
use crate::sync::Locked;

/// A committed blob's entry, 12 bytes with an alignment of 2, so that key and entry take 44
/// bytes in the hash table: with its control byte and free slots (a table is 7/16 to 7/8
/// full) that is 51 to 103 bytes per blob, 79 at 300,000 blobs and 94 at 1,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// The size in bytes, 48 bits (256 TiB; a larger blob would count as that much).
    size: [u16; 3],
    /// Last access, in milliseconds since the Unix epoch, 48 bits (until the year 10889).
    /// Finer than the seconds nginx keeps: blobs pulled in the same second must still go in
    /// the order they were used.
    last_access: [u16; 3],
}

/// 48 bits in three u16s, and back.
fn split48(v: u64) -> [u16; 3] {
    [v as u16, (v >> 16) as u16, (v >> 32) as u16]
}

fn join48(parts: [u16; 3]) -> u64 {
    let [a, b, c] = parts.map(u64::from);
    a | (b << 16) | (c << 32)
}

impl Entry {
    const MAX: u64 = (1 << 48) - 1;

    fn new(size: u64, last_access: u64) -> Entry {
        Entry {
            size: split48(size.min(Entry::MAX)),
            last_access: split48(last_access.min(Entry::MAX)),
        }
    }

    fn size(&self) -> u64 {
        join48(self.size)
    }

    fn last_access(&self) -> u64 {
        join48(self.last_access)
    }

    fn accessed(&mut self, at: u64) {
        self.last_access = split48(at.min(Entry::MAX));
    }
}

/// Milliseconds since the epoch (0 before it).
fn stamp(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn unstamp(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Who reads a blob now. Only blobs with readers (or, until the next sweep, that had them)
/// are in the side table.
#[derive(Debug, Default)]
struct Readers {
    /// Open `ReadGuard`s.
    open: u32,
    /// The readers still following the fill that committed this blob: they joined before the
    /// commit, so they hold no `ReadGuard`, and must keep it from eviction all the same.
    followers: Option<Weak<Followers>>,
}

impl Readers {
    /// Is anyone reading this blob now?
    fn in_use(&self) -> bool {
        self.open > 0
            || self
                .followers
                .as_ref()
                .and_then(Weak::upgrade)
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
    /// Taken with `Locked`. Sections that change `blobs` and `total` together do it in
    /// straight-line code; a panic between the two (only an overflow of `total` in a build
    /// with overflow checks could be one) would leave `total` off by one blob's size, so
    /// eviction aims that much high or low until the next start rebuilds the index. Panicking
    /// instead would fail every later hit and commit, and abort the process from
    /// `ReadGuard::drop`.
    inner: Mutex<Inner>,
    budget: Option<Budget>,
    /// `cache.pins` (and the deprecated `cache.pinned_digests`).
    config_pins: Mutex<Vec<Pin>>,
    /// Pins made at run time (admin API, `pins.json`), sorted, each once. Both pin lists are
    /// replaced whole or changed by one insert or removal at a searched place, so a poisoned
    /// lock (`Locked`) still guards a sorted list.
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
    room_wanted: AtomicU64,
    /// Blobs and bytes removed by eviction since start.
    evicted_blobs: AtomicU64,
    evicted_bytes: AtomicU64,
    /// What access times are read from (the store stamps mtimes from the same clock).
    clock: Clock,
    /// True once the start-up scan has been merged (or there was none to wait for).
    loaded: watch::Sender<bool>,
    /// Blobs the start-up scan has seen so far, for stats.
    scanned: AtomicU64,
    /// Set to end the start-up scan early (shutdown).
    stop_loading: AtomicBool,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<BlobKey, Entry>,
    total: u64,
    /// Readers of blobs being read now; see [`Readers`]. Entries whose readers have all gone
    /// are removed when the last guard drops, or by a sweep (followers leave without telling).
    readers: HashMap<BlobKey, Readers>,
    /// The side table's size after its last sweep: the next sweep comes when it has doubled.
    readers_swept: usize,
    /// While the start-up scan runs: the blobs forgotten (purged) since it began, which its
    /// batches must not put back. `None` once it has been merged.
    loading: Option<HashSet<BlobKey>>,
    /// While an eviction pass chooses: the blobs opened or committed since it copied the
    /// candidates out, which it must not take.
    touched: Option<HashSet<BlobKey>>,
}

impl Inner {
    fn in_use(&self, key: &BlobKey) -> bool {
        self.readers.get(key).is_some_and(Readers::in_use)
    }

    fn touch(&mut self, key: BlobKey) {
        if let Some(t) = &mut self.touched {
            t.insert(key);
        }
    }

    /// Drops side-table entries nobody reads any more, once the table has doubled since the
    /// last sweep (amortised O(1) per insertion).
    fn sweep_readers(&mut self) {
        if self.readers.len() >= 2 * self.readers_swept.max(32) {
            self.readers.retain(|_, r| r.in_use());
            self.readers_swept = self.readers.len();
        }
    }
}

/// Keeps a blob from eviction while a reader has it open.
pub struct ReadGuard {
    usage: Arc<Usage>,
    key: BlobKey,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = self.usage.lock();
        if let Some(r) = inner.readers.get_mut(&self.key) {
            r.open = r.open.saturating_sub(1);
            if !r.in_use() {
                inner.readers.remove(&self.key);
            }
        }
    }
}

impl Usage {
    /// An empty index whose access times come from the system clock.
    pub fn new(budget: Option<Budget>) -> Arc<Usage> {
        Usage::with_clock(budget, Clock::system())
    }

    /// An empty index whose access times come from `clock` (the server's). It counts as
    /// loaded until [`Usage::begin_loading`] is called.
    pub fn with_clock(budget: Option<Budget>, clock: Clock) -> Arc<Usage> {
        Arc::new(Usage {
            inner: Mutex::default(),
            budget,
            config_pins: Mutex::default(),
            pins: Mutex::default(),
            pins_generation: AtomicU64::new(0),
            index: OnceLock::new(),
            over: Notify::new(),
            room_wanted: AtomicU64::new(0),
            evicted_blobs: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            clock,
            loaded: watch::Sender::new(true),
            scanned: AtomicU64::new(0),
            stop_loading: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// Marks the index as being loaded: from now until [`Usage::load`] has merged the scan,
    /// eviction waits and forgotten blobs are remembered. Call it before serving, then run
    /// `load` in the background.
    pub fn begin_loading(&self) {
        let mut inner = self.lock();
        if inner.loading.is_none() {
            inner.loading = Some(HashSet::new());
        }
        self.loaded.send_replace(false);
    }

    /// Builds the index from what is on disk (blocking: call it on the blocking pool),
    /// merging each shard's blobs as it is scanned; the index may be in use meanwhile (see
    /// the module's comment). Ends the loading state even on an error, with what was scanned
    /// until then (the caller logs it; blobs not scanned join as they are read).
    pub fn load(&self, store: &DiskStore) -> std::io::Result<()> {
        self.begin_loading();
        let scanned = self.scan(store);
        self.finish_loading();
        scanned
    }

    /// The scan half of [`Usage::load`]: merges what `blobs/` holds into the index, shard by
    /// shard, stopping early after [`Usage::stop_loading`]. The index stays in its loading
    /// state until [`Usage::finish_loading`].
    pub fn scan(&self, store: &DiskStore) -> std::io::Result<()> {
        store.scan_blobs(|batch| {
            self.merge_scanned(batch);
            !self.stop_loading.load(Ordering::Relaxed)
        })
    }

    /// Takes in one batch of the start-up scan: what was recorded since the scan began wins.
    fn merge_scanned(&self, batch: Vec<(Digest, u64, SystemTime)>) {
        let count = batch.len() as u64;
        let keyed: Vec<(BlobKey, Entry)> = batch
            .into_iter()
            .map(|(d, size, at)| (BlobKey::of(&d), Entry::new(size, stamp(at))))
            .collect();
        let mut inner = self.lock();
        let Inner {
            blobs,
            total,
            loading,
            ..
        } = &mut *inner;
        for (key, entry) in keyed {
            if loading.as_ref().is_some_and(|f| f.contains(&key)) {
                continue; // purged after the scan listed it
            }
            if let std::collections::hash_map::Entry::Vacant(v) = blobs.entry(key) {
                *total += entry.size();
                v.insert(entry);
            } // else: committed or opened during the scan; that entry is newer
        }
        drop(inner);
        self.scanned.fetch_add(count, Ordering::Relaxed);
    }

    /// Ends the loading state and lets eviction run if the budget or a full disk asks.
    pub fn finish_loading(&self) {
        self.lock().loading = None;
        self.loaded.send_replace(true);
        if self.room_wanted.load(Ordering::Relaxed) > 0 {
            self.over.notify_one();
        }
        self.check();
    }

    /// Asks a running start-up scan to stop after its current shard (shutdown).
    pub fn stop_loading(&self) {
        self.stop_loading.store(true, Ordering::Relaxed);
    }

    /// Waits until the start-up scan has been merged (at once if there is none).
    pub async fn loaded(&self) {
        let mut rx = self.loaded.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Is the reference graph complete? Until it is, the pinned set may miss what a tag or
    /// repository pin reaches through a root not loaded yet, so no blob may go.
    fn references_loaded(&self) -> bool {
        self.index.get().is_none_or(|i| i.is_loaded())
    }

    /// Waits until eviction may run: the start-up scan merged and the reference graph
    /// complete. If the graph's load ended incomplete (a directory it could not read), never:
    /// nothing is evicted that cannot be proven unpinned.
    pub async fn ready_to_evict(&self) {
        self.loaded().await;
        if let Some(index) = self.index.get()
            && index.loaded().await.is_err()
        {
            std::future::pending::<()>().await;
        }
    }

    /// Is the start-up scan still running?
    pub fn is_loading(&self) -> bool {
        !*self.loaded.borrow()
    }

    /// Blobs the start-up scan has seen so far.
    pub fn scanned(&self) -> u64 {
        self.scanned.load(Ordering::Relaxed)
    }

    /// About how many bytes of memory the index takes: its hash tables' slots (key and entry,
    /// plus a control byte each) at their current capacity. For stats and the startup bench.
    pub fn index_bytes(&self) -> usize {
        fn table<K, V>(capacity: usize) -> usize {
            // hashbrown keeps at most 7/8 of its slots full.
            let slots = if capacity == 0 { 0 } else { capacity * 8 / 7 };
            slots * (std::mem::size_of::<(K, V)>() + 1)
        }
        let inner = self.lock();
        table::<BlobKey, Entry>(inner.blobs.capacity())
            + table::<BlobKey, Readers>(inner.readers.capacity())
            + inner
                .loading
                .as_ref()
                .map_or(0, |s| table::<BlobKey, ()>(s.capacity()))
            + inner
                .touched
                .as_ref()
                .map_or(0, |s| table::<BlobKey, ()>(s.capacity()))
    }

    /// Gives repository and tag pins the reference index to reach blobs through.
    pub fn attach_index(&self, index: Arc<RefIndex>) {
        let _ = self.index.set(index);
    }

    /// Sets the pins from the config.
    pub fn set_config_pins(&self, pins: Vec<Pin>) {
        *self.config_pins.locked() = pins;
        self.pins_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Replaces the run-time pins.
    pub fn set_pins(&self, pins: impl IntoIterator<Item = Pin>) {
        let mut list: Vec<Pin> = pins.into_iter().collect();
        list.sort();
        list.dedup();
        *self.pins.locked() = list;
        self.pins_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Adds a run-time pin; false if it was there already.
    pub fn pin(&self, pin: &Pin) -> bool {
        let mut pins = self.pins.locked();
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
        let mut pins = self.pins.locked();
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
        self.pins.locked().clone()
    }

    /// The pins from the config.
    pub fn config_pins(&self) -> Vec<Pin> {
        self.config_pins.locked().clone()
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
        self.pins.locked()
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

    /// Takes a blob out of the index (it was purged). Its readers stay counted until they
    /// finish: if the blob is committed again meanwhile, they still read a copy of it.
    pub fn forget(&self, digest: &Digest) {
        let key = BlobKey::of(digest);
        let mut inner = self.lock();
        if let Some(e) = inner.blobs.remove(&key) {
            inner.total -= e.size();
        }
        // A scan still running may have listed the file before it went.
        if let Some(forgotten) = &mut inner.loading {
            forgotten.insert(key);
        }
    }

    /// (blobs, bytes) removed by eviction since start.
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.evicted_blobs.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// Total bytes of committed blobs (while loading: of those indexed so far).
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    pub fn len(&self) -> usize {
        self.lock().blobs.len()
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
        followers: Option<&Arc<Followers>>,
    ) {
        let key = BlobKey::of(digest);
        let now = stamp(self.clock.wall_now());
        let mut inner = self.lock();
        // The file is visible from its rename on, before this call: a hit in between has
        // already put the blob in the index with its reader, and that reader must stay
        // counted. (So must one still reading a copy committed before a purge.) The readers
        // live in their own table, so replacing the entry keeps them.
        let entry = Entry::new(size, now);
        let old_size = inner.blobs.insert(key, entry).map_or(0, |e| e.size());
        inner.total = inner.total - old_size + entry.size();
        match followers {
            Some(f) => {
                inner.readers.entry(key).or_default().followers = Some(Arc::downgrade(f));
                inner.sweep_readers();
            }
            None => {
                if let Some(r) = inner.readers.get_mut(&key) {
                    r.followers = None;
                    if !r.in_use() {
                        inner.readers.remove(&key);
                    }
                }
            }
        }
        inner.touch(key);
        drop(inner);
        self.check();
    }

    /// A reader opened a committed blob: it is used now, and must stay while read.
    pub fn open(self: &Arc<Self>, digest: &Digest, size: u64) -> ReadGuard {
        let key = BlobKey::of(digest);
        let now = stamp(self.clock.wall_now());
        let mut inner = self.lock();
        // A blob committed by another process, missed by the scan or not yet reached by it
        // joins the index here (the scan's batch then leaves this entry as it is).
        let added = match inner.blobs.get_mut(&key) {
            Some(e) => {
                e.accessed(now);
                false
            }
            None => {
                let entry = Entry::new(size, now);
                inner.blobs.insert(key, entry);
                inner.total += entry.size();
                true
            }
        };
        inner.readers.entry(key).or_default().open += 1;
        inner.touch(key);
        drop(inner);
        if added {
            self.check();
        }
        ReadGuard {
            usage: self.clone(),
            key,
        }
    }

    /// The disk ran full while a fill needed `needed` bytes: evict least recently used blobs
    /// until that much is free, even below the budget (or with none): a cache that cannot
    /// write is worse than a smaller one.
    pub fn disk_full(&self, needed: u64) {
        self.room_wanted.fetch_max(needed, Ordering::Relaxed);
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
    /// them). The caller deletes the files. Nothing while the start-up scan or the reference
    /// graph's load runs (the eviction task waits for both; this is the second line of that
    /// defence).
    ///
    /// The `Usage` lock is held only to copy the unread entries out and, at the end, to take
    /// the victims out; sorting and the pinned set happen outside it, so hits and commits are
    /// not stalled by a pass.
    pub(super) fn take_victims(&self) -> Vec<(Digest, u64)> {
        if self.is_loading() || !self.references_loaded() {
            return Vec::new();
        }
        let wanted = self.room_wanted.swap(0, Ordering::Relaxed);
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
                c.keep = pinned.contains(&c.digest.digest());
                c
            }),
            total,
            target,
        );
        if victims.is_empty() {
            self.lock().touched = None;
            return Vec::new();
        }
        // Something was pinned, tagged or stored while we chose: look again (once per pass).
        if self.pin_generation() != generation {
            pinned = self.pinned();
        }
        self.take(victims, &pinned)
    }

    /// The unread blobs (digest, size, last access) and the total. A copy made under the
    /// lock: no sorting, no pins. From here until `take`, the blobs opened or committed are
    /// remembered, so that `take` leaves them. (Public for `benches/cache_lookup.rs`, which
    /// measures how long a pass holds the lock.)
    pub fn candidates(&self) -> (Vec<Candidate>, u64) {
        let mut inner = self.lock();
        inner.touched = Some(HashSet::new());
        let candidates = inner
            .blobs
            .iter()
            .filter(|(k, _)| !inner.in_use(k))
            .map(|(k, e)| Candidate {
                digest: *k,
                size: e.size(),
                last_access: unstamp(e.last_access()),
                keep: false,
            })
            .collect();
        (candidates, inner.total)
    }

    /// Takes the chosen victims out of the index, except those pinned now and those whose
    /// entry changed since they were copied out (opened, read, re-committed).
    fn take(&self, victims: Vec<Candidate>, pinned: &Pinned) -> Vec<(Digest, u64)> {
        let mut inner = self.lock();
        let touched = inner.touched.take().unwrap_or_default();
        let mut out = Vec::with_capacity(victims.len());
        for v in victims {
            let digest = v.digest.digest();
            if pinned.contains(&digest) || touched.contains(&v.digest) || inner.in_use(&v.digest) {
                continue;
            }
            let unchanged = inner
                .blobs
                .get(&v.digest)
                .is_some_and(|e| unstamp(e.last_access()) == v.last_access && e.size() == v.size);
            if unchanged && let Some(e) = inner.blobs.remove(&v.digest) {
                inner.total -= e.size();
                out.push((digest, e.size()));
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
    fn no_victims_while_the_reference_graph_loads() {
        // Until the graph is whole, a tag or repository pin may reach any blob.
        for (index, victims) in [(RefIndex::loading(), 0), (RefIndex::default(), 1)] {
            let usage = Usage::new(Some(Budget { high: 5, low: 0 }));
            usage.attach_index(Arc::new(index));
            usage.committed(&Digest::of(b"a"), 10);
            assert_eq!(usage.take_victims().len(), victims);
        }
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

    /// A data directory whose blobs are `contents`, committed as the store commits them.
    fn store_with(contents: &[&[u8]]) -> (tempfile::TempDir, DiskStore, Vec<Digest>) {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let digests = contents
            .iter()
            .map(|c| {
                let d = Digest::of(c);
                let path = dir.path().join("blobs").join(d.shard_path());
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, c).unwrap();
                d
            })
            .collect();
        (dir, store, digests)
    }

    #[test]
    fn what_happens_during_the_scan_is_neither_lost_nor_counted_twice() {
        let (_dir, store, d) = store_with(&[b"old", b"read", b"purged", b"recommitted"]);
        let usage = Usage::new(Some(Budget { high: 1, low: 0 }));
        usage.begin_loading();
        assert!(usage.is_loading());
        // While the scan has not reached them: a hit on one blob, a purge of another whose
        // file the scan may still list, a commit of a blob the scan also finds, and one that
        // only the commit knows.
        let reading = usage.open(&d[1], 4);
        usage.forget(&d[2]);
        usage.committed(&d[3], 11);
        let fresh = Digest::of(b"fresh");
        usage.committed(&fresh, 5);
        assert!(usage.take_victims().is_empty(), "no eviction while loading");
        usage.scan(&store).unwrap();
        assert!(usage.is_loading(), "loading until finished");
        usage.finish_loading();
        assert!(!usage.is_loading());
        assert_eq!(usage.scanned(), 4);
        // old (3) + read (4) + recommitted (its commit's size, 11) + fresh (5); not purged.
        assert_eq!(usage.len(), 4);
        assert_eq!(usage.total(), 3 + 4 + 11 + 5);
        // The reader counted during the scan still keeps its blob.
        let victims: Vec<Digest> = usage.take_victims().into_iter().map(|(d, _)| d).collect();
        assert!(!victims.contains(&d[1]), "{victims:?}");
        assert!(victims.contains(&d[0]), "{victims:?}");
        drop(reading);
        // Forgetting is remembered only while loading.
        usage.forget(&d[0]);
        usage.committed(&d[0], 3);
        assert!(usage.len() >= 2);
    }

    #[tokio::test]
    async fn loaded_waits_for_the_end_of_the_scan() {
        let (_dir, store, _) = store_with(&[b"a"]);
        let usage = Usage::new(None);
        usage.loaded().await; // a fresh index counts as loaded
        usage.begin_loading();
        let waiter = tokio::spawn({
            let usage = usage.clone();
            async move { usage.loaded().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        usage.load(&store).unwrap();
        waiter.await.unwrap();
        assert_eq!(usage.len(), 1);
    }

    #[test]
    fn an_entry_is_small() {
        assert_eq!(std::mem::size_of::<(BlobKey, Entry)>(), 44);
        let e = Entry::new(0x1234_5678_9abc, 0xfedc_ba98_7654);
        assert_eq!(
            (e.size(), e.last_access()),
            (0x1234_5678_9abc, 0xfedc_ba98_7654)
        );
        let usage = Usage::new(None);
        for i in 0u32..10_000 {
            usage.committed(&Digest::of(&i.to_le_bytes()), 1);
        }
        let per_blob = usage.index_bytes() / usage.len();
        // 10,000 entries in 16,384 slots of 45 bytes.
        assert!(per_blob <= 100, "{per_blob} bytes per blob");
    }
}
