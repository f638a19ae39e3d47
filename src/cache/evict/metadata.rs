//! The metadata budget's index (`cache.max_metadata_size`): every stored manifest, tag and link
//! with its bytes on disk and its last use, and the pass that copies them out, lets the
//! reference index choose (`cache::refs::Graph::plan_trim`) and takes the chosen out.
//!
//! What counts: a manifest's file (media type line and bytes), a tag's records (one per Accept
//! class, counted and removed together), a link's file. Blobs do not: they have `max_size`.
//!
//! Like the blob index (`usage`):
//! - The files are the source of truth. [`MetaUsage::load`] counts them at start (a separate
//!   scan: `DiskStore::scan_metadata`), in the background; a pass waits for it. What was
//!   recorded during the scan wins over what it saw, and what was forgotten (purged) during
//!   it is not put back.
//! - A pass holds the lock only to copy the entries out and to take the chosen groups out;
//!   a group with an entry used, written or being read since the copy stays whole.
//! - Last use is the store clock's time of the last write or use; at start, the file's mtime
//!   (stamped from the same clock when it was written), so a manifest last served from memory
//!   before a restart counts from its write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use tokio::sync::{Notify, watch};

use super::usage::Budget;
use crate::cache::refs::{MetaItem, MetaKey, RefIndex, RepoKey, TrimGroup};
use crate::clock::Clock;
use crate::oci::Digest;
use crate::policy::pins::Pin;
use crate::storage::{DiskStore, MetaFile};

/// Milliseconds since the epoch (0 before it).
fn stamp(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    last_access: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<MetaKey, Entry>,
    total: u64,
    /// Manifests a request is reading from disk now, and how many requests.
    reading: HashMap<Digest, u32>,
    /// While the start-up count runs: what was forgotten since it began (not to be put back).
    loading: Option<HashSet<MetaKey>>,
    /// While a pass chooses: what was used or written since it copied the entries.
    touched: Option<HashSet<MetaKey>>,
}

impl Inner {
    fn touch(&mut self, key: &MetaKey) {
        if let Some(t) = &mut self.touched {
            t.insert(key.clone());
        }
    }
}

/// Stored manifests, tags and links, their bytes and last use.
pub struct MetaUsage {
    inner: Mutex<Inner>,
    budget: Budget,
    over: Notify,
    clock: Clock,
    loaded: watch::Sender<bool>,
    evicted_items: AtomicU64,
    evicted_bytes: AtomicU64,
}

/// Keeps a manifest from the metadata budget while a request reads it from disk.
pub struct MetaReadGuard {
    usage: Arc<MetaUsage>,
    digest: Digest,
}

impl Drop for MetaReadGuard {
    fn drop(&mut self) {
        let mut inner = self.usage.lock();
        if let Some(n) = inner.reading.get_mut(&self.digest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                inner.reading.remove(&self.digest);
            }
        }
    }
}

impl MetaUsage {
    /// An empty index (counting as loaded until [`MetaUsage::begin_loading`]).
    pub fn new(budget: Budget, clock: Clock) -> Arc<MetaUsage> {
        Arc::new(MetaUsage {
            inner: Mutex::default(),
            budget,
            over: Notify::new(),
            clock,
            loaded: watch::Sender::new(true),
            evicted_items: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under this lock is a few map operations that cannot panic half-way:
        // a poisoned lock's contents are still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        stamp(self.clock.wall_now())
    }

    /// Marks the index as being counted: passes wait, forgotten entries are remembered.
    pub fn begin_loading(&self) {
        let mut inner = self.lock();
        if inner.loading.is_none() {
            inner.loading = Some(HashSet::new());
        }
        self.loaded.send_replace(false);
    }

    /// Counts the metadata on disk (blocking: call it on the blocking pool) and ends the
    /// loading state, even on an error (then with what was counted: entries join as they are
    /// used or written).
    pub fn load(&self, store: &DiskStore) -> std::io::Result<()> {
        self.begin_loading();
        let counted = self.count(store);
        self.finish_loading();
        counted
    }

    /// The counting half of [`MetaUsage::load`]: merges what is on disk into the index, which
    /// stays in its loading state until [`MetaUsage::finish_loading`].
    pub fn count(&self, store: &DiskStore) -> std::io::Result<()> {
        let scanned = store.scan_metadata();
        if let Ok(files) = &scanned {
            let mut inner = self.lock();
            let Inner {
                entries,
                total,
                loading,
                ..
            } = &mut *inner;
            // Entries recorded during the scan are newer than what it saw: the scan adds only
            // to entries it created itself (a tag's records add up).
            let mut from_scan: HashSet<MetaKey> = HashSet::new();
            for f in files {
                let key = key_of(&f.file);
                if loading.as_ref().is_some_and(|l| l.contains(&key)) {
                    continue;
                }
                let at = stamp(f.modified);
                match entries.get_mut(&key) {
                    Some(e) if from_scan.contains(&key) => {
                        e.size += f.size;
                        e.last_access = e.last_access.max(at);
                        *total += f.size;
                    }
                    Some(_) => {}
                    None => {
                        entries.insert(
                            key.clone(),
                            Entry {
                                size: f.size,
                                last_access: at,
                            },
                        );
                        *total += f.size;
                        from_scan.insert(key);
                    }
                }
            }
        }
        scanned.map(|_| ())
    }

    /// Ends the loading state and lets a pass run if the budget asks.
    pub fn finish_loading(&self) {
        self.lock().loading = None;
        self.loaded.send_replace(true);
        self.check();
    }

    /// Waits until the start-up count is merged.
    pub async fn loaded(&self) {
        let mut rx = self.loaded.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    fn is_loading(&self) -> bool {
        !*self.loaded.borrow()
    }

    /// A manifest, tag record or link was written: `size` bytes, replacing `replaced` bytes
    /// of the same entry (a tag's record for the same Accept class; 0 for a new file).
    pub fn written(&self, key: MetaKey, size: u64, replaced: u64) {
        let now = self.now();
        let mut inner = self.lock();
        inner.touch(&key);
        let old = inner.entries.get(&key).copied();
        let size = match old {
            // A tag's other records stay counted.
            Some(e) if matches!(key, MetaKey::Tag(..)) => {
                e.size.saturating_sub(replaced).saturating_add(size)
            }
            _ => size,
        };
        let old_size = old.map_or(0, |e| e.size);
        inner.total = inner.total.saturating_sub(old_size).saturating_add(size);
        inner.entries.insert(
            key,
            Entry {
                size,
                last_access: now,
            },
        );
        drop(inner);
        self.check();
    }

    /// An entry was used (served): it is the most recently used now. Nothing if it is not
    /// counted (not on disk).
    pub fn used(&self, key: &MetaKey) {
        let now = self.now();
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(key) {
            e.last_access = now;
            inner.touch(key);
        }
    }

    /// A request reads this manifest from disk: the budget leaves it until the guard drops.
    pub fn reading(self: &Arc<Self>, digest: &Digest) -> MetaReadGuard {
        let mut inner = self.lock();
        *inner.reading.entry(digest.clone()).or_default() += 1;
        inner.touch(&MetaKey::Manifest(digest.clone()));
        drop(inner);
        MetaReadGuard {
            usage: self.clone(),
            digest: digest.clone(),
        }
    }

    /// An entry was removed from disk by a purge.
    pub fn forget(&self, key: &MetaKey) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.remove(key) {
            inner.total = inner.total.saturating_sub(e.size);
        }
        if let Some(l) = &mut inner.loading {
            l.insert(key.clone());
        }
    }

    /// Bytes counted.
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// (manifests, tags, links) counted.
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        inner
            .entries
            .keys()
            .fold((0, 0, 0), |(m, t, l), k| match k {
                MetaKey::Manifest(_) => (m + 1, t, l),
                MetaKey::Tag(..) => (m, t + 1, l),
                MetaKey::Link(..) => (m, t, l + 1),
            })
    }

    /// (entries, bytes) removed by the budget since start.
    pub fn evictions(&self) -> (u64, u64) {
        (
            self.evicted_items.load(Ordering::Relaxed),
            self.evicted_bytes.load(Ordering::Relaxed),
        )
    }

    /// The budget's (high, low) watermarks in bytes.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Is the metadata over the high watermark?
    pub fn over_high(&self) -> bool {
        self.total() > self.budget.high
    }

    fn check(&self) {
        if self.over_high() {
            self.over.notify_one();
        }
    }

    /// Waits until a pass is wanted (the total passed the high watermark).
    pub(super) async fn pass_wanted(&self) {
        self.over.notified().await;
    }

    /// Chooses what goes and takes it out of this index (blocking: the reference index's
    /// walk; call it on the blocking pool). The caller removes the files, then tells the
    /// reference index (`RefIndex::trimmed`). Nothing while the start-up count runs or under
    /// the high watermark.
    pub fn take_victims(&self, index: &RefIndex, pins: &[Pin]) -> Vec<TrimGroup> {
        if self.is_loading() || self.total() <= self.budget.high {
            return Vec::new();
        }
        let (items, total) = self.snapshot();
        let groups = index.plan_trim(&items, pins, total, self.budget.low);
        self.take(groups)
    }

    /// Copies the entries out (those being read marked `keep`) and starts remembering what
    /// is touched until `take`.
    fn snapshot(&self) -> (Vec<MetaItem>, u64) {
        let mut inner = self.lock();
        inner.touched = Some(HashSet::new());
        let items = inner
            .entries
            .iter()
            .map(|(k, e)| MetaItem {
                key: k.clone(),
                size: e.size,
                last_access: e.last_access,
                keep: matches!(k, MetaKey::Manifest(d) if inner.reading.contains_key(d)),
            })
            .collect();
        (items, inner.total)
    }

    /// Takes the chosen groups out, except a group any of whose entries was touched or is
    /// being read since the copy (it stays whole: a root with the manifests it freed).
    fn take(&self, groups: Vec<TrimGroup>) -> Vec<TrimGroup> {
        let mut inner = self.lock();
        let touched = inner.touched.take().unwrap_or_default();
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let changed = g.keys.iter().any(|k| {
                touched.contains(k)
                    || matches!(k, MetaKey::Manifest(d) if inner.reading.contains_key(d))
            });
            if changed {
                continue;
            }
            let mut bytes = 0;
            for k in &g.keys {
                if let Some(e) = inner.entries.remove(k) {
                    inner.total = inner.total.saturating_sub(e.size);
                    bytes += e.size;
                }
            }
            out.push(TrimGroup {
                keys: g.keys,
                bytes,
            });
        }
        out
    }

    /// Counts what a pass removed.
    pub(super) fn count_evicted(&self, items: u64, bytes: u64) {
        self.evicted_items.fetch_add(items, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The budget's key for a file found on disk.
fn key_of(file: &MetaFile) -> MetaKey {
    match file {
        MetaFile::Manifest(d) => MetaKey::Manifest(d.clone()),
        MetaFile::Tag {
            registry,
            repository,
            tag,
        } => MetaKey::Tag(
            RepoKey {
                registry: registry.clone(),
                repository: repository.clone(),
            },
            tag.clone(),
        ),
        MetaFile::Link {
            registry,
            repository,
            digest,
        } => MetaKey::Link(
            RepoKey {
                registry: registry.clone(),
                repository: repository.clone(),
            },
            digest.clone(),
        ),
    }
}

/// Removes a trimmed entry's files (blocking). Gone already is fine.
pub fn remove_files(store: &DiskStore, key: &MetaKey) -> std::io::Result<()> {
    match key {
        MetaKey::Manifest(d) => store.remove_manifest(d),
        MetaKey::Tag(r, t) => store.remove_tag(&r.registry, &r.repository, t),
        MetaKey::Link(r, d) => store.remove_link(&r.registry, &r.repository, d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StoredManifest, TagRecord};
    use std::time::Duration;

    fn repo() -> RepoKey {
        RepoKey {
            registry: "docker.io".into(),
            repository: "library/app".into(),
        }
    }

    #[test]
    fn the_count_survives_a_restart_and_records_of_a_tag_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let store = DiskStore::open(dir.path())
            .unwrap()
            .with_clock(clock.clone());
        let m = StoredManifest {
            media_type: "x".into(),
            bytes: bytes::Bytes::from_static(b"{}"),
        };
        let d = Digest::of(b"{}");
        store.write_manifest(&d, &m).unwrap();
        let record = |accept: &str| TagRecord {
            registry: "docker.io".into(),
            repository: "library/app".into(),
            tag: "1".into(),
            accept: accept.into(),
            digest: d.to_string(),
            media_type: "x".into(),
            size: 2,
            fetched_at_ms: 0,
        };
        let a = store.write_tag(&record("a")).unwrap();
        let b = store.write_tag(&record("b")).unwrap();
        let link = store.write_link("docker.io", "library/app", &d).unwrap();
        let usage = MetaUsage::new(
            Budget {
                high: 1000,
                low: 500,
            },
            clock.clone(),
        );
        usage.load(&store).unwrap();
        assert_eq!(usage.counts(), (1, 1, 1));
        assert_eq!(usage.total(), 4 + a.size + b.size + link);
        // Rewriting one record replaces its bytes; the other record stays counted.
        usage.written(MetaKey::Tag(repo(), "1".into()), 100, a.size);
        assert_eq!(usage.total(), 4 + 100 + b.size + link);
        usage.forget(&MetaKey::Link(repo(), d.clone()));
        assert_eq!(usage.counts(), (1, 1, 0));
    }

    #[test]
    fn a_group_touched_or_read_after_the_copy_stays() {
        let clock = Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        let usage = MetaUsage::new(Budget { high: 10, low: 0 }, clock);
        let (a, b, c) = (Digest::of(b"a"), Digest::of(b"b"), Digest::of(b"c"));
        for d in [&a, &b, &c] {
            usage.written(MetaKey::Manifest(d.clone()), 10, 0);
        }
        let index = RefIndex::default();
        let (items, total) = usage.snapshot();
        let groups = index.plan_trim(&items, &[], total, 0);
        assert_eq!(groups.len(), 3);
        // After the copy: a is used, b is being read. Only c may go.
        usage.used(&MetaKey::Manifest(a.clone()));
        let reading = usage.reading(&b);
        let taken = usage.take(groups);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].keys, vec![MetaKey::Manifest(c)]);
        assert_eq!(usage.total(), 20);
        // While b is read, a pass leaves it.
        let victims = usage.take_victims(&index, &[]);
        let chosen: Vec<MetaKey> = victims.into_iter().flat_map(|g| g.keys).collect();
        assert_eq!(chosen, vec![MetaKey::Manifest(a)]);
        drop(reading);
        assert_eq!(usage.total(), 10);
        assert!(
            usage.take_victims(&index, &[]).is_empty(),
            "under the high watermark"
        );
    }
}
