//! The disk budget: an index of committed blobs (size, last access, open readers) and the
//! background task that removes the least recently used ones when the cache is too big.
//!
//! The file system is the single source of truth. At start a scan of `blobs/` builds the
//! index; a blob's last access is its file's mtime, set on every cache hit, so LRU order
//! survives restarts without a second store to keep consistent with the files.
//!
//! Architecture invariants:
//! - Eviction runs off the request path, in its own task, and only when the blobs pass the
//!   high watermark; it removes least recently used blobs until they are under the low one.
//! - A blob with an open reader, a pinned blob, or a blob still being filled (not yet in the
//!   index) is never chosen. A reader that opens a blob in the instant it is removed keeps
//!   reading it: an open file outlives its name.
//! - Removing a blob never breaks a cached manifest: the blob is fetched again on demand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::freshness::glob_match;
use crate::oci::Digest;
use crate::storage::DiskStore;

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    last_access: SystemTime,
    readers: u32,
}

/// The budget: where the watermarks are, and what may never go.
#[derive(Debug, Clone)]
pub struct Budget {
    pub high: u64,
    pub low: u64,
    pub pinned: Vec<String>,
}

/// Committed blobs and their use.
pub struct Usage {
    inner: Mutex<Inner>,
    budget: Option<Budget>,
    /// Digests pinned at run time (admin API), on top of the budget's patterns.
    pins: Mutex<std::collections::BTreeSet<Digest>>,
    /// Wakes the eviction task when the total passes the high watermark.
    over: Notify,
    /// Bytes a fill could not write because the disk was full: the next pass frees at least
    /// this much, budget or not.
    room_wanted: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Inner {
    blobs: HashMap<Digest, Entry>,
    total: u64,
}

/// Keeps a blob from eviction while a reader has it open.
pub struct ReadGuard {
    usage: Arc<Usage>,
    digest: Digest,
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
    pub fn new(budget: Option<Budget>) -> Arc<Usage> {
        Arc::new(Usage {
            inner: Mutex::default(),
            budget,
            pins: Mutex::default(),
            over: Notify::new(),
            room_wanted: Default::default(),
        })
    }

    /// Builds the index from what is on disk (blocking: call it on the blocking pool).
    pub fn load(&self, store: &DiskStore) -> std::io::Result<()> {
        let blobs = store.list_blobs()?;
        let mut inner = self.inner.lock().expect("usage poisoned");
        for (digest, size, last_access) in blobs {
            inner.total += size;
            inner.blobs.insert(
                digest,
                Entry {
                    size,
                    last_access,
                    readers: 0,
                },
            );
        }
        drop(inner);
        self.check();
        Ok(())
    }

    /// Replaces the run-time pins.
    pub fn set_pins(&self, pins: impl IntoIterator<Item = Digest>) {
        *self.pins.lock().expect("pins poisoned") = pins.into_iter().collect();
    }

    pub fn pin(&self, digest: &Digest) -> bool {
        self.pins
            .lock()
            .expect("pins poisoned")
            .insert(digest.clone())
    }

    pub fn unpin(&self, digest: &Digest) -> bool {
        self.pins.lock().expect("pins poisoned").remove(digest)
    }

    pub fn pins(&self) -> Vec<Digest> {
        self.pins
            .lock()
            .expect("pins poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Takes a blob out of the index (it was purged).
    pub fn forget(&self, digest: &Digest) {
        let mut inner = self.inner.lock().expect("usage poisoned");
        if let Some(e) = inner.blobs.remove(digest) {
            inner.total -= e.size;
        }
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
        let mut inner = self.inner.lock().expect("usage poisoned");
        let entry = Entry {
            size,
            last_access: SystemTime::now(),
            readers: 0,
        };
        if let Some(old) = inner.blobs.insert(digest.clone(), entry) {
            inner.total -= old.size;
        }
        inner.total += size;
        drop(inner);
        self.check();
    }

    /// A reader opened a committed blob: it is used now, and must stay while read.
    pub fn open(self: &Arc<Self>, digest: &Digest, size: u64) -> ReadGuard {
        let mut inner = self.inner.lock().expect("usage poisoned");
        let now = SystemTime::now();
        // A blob committed by another process or missed by the scan joins the index here.
        let added = !inner.blobs.contains_key(digest);
        let e = inner.blobs.entry(digest.clone()).or_insert(Entry {
            size,
            last_access: now,
            readers: 0,
        });
        e.last_access = now;
        e.readers += 1;
        if added {
            inner.total += size;
        }
        drop(inner);
        if added {
            self.check();
        }
        ReadGuard {
            usage: self.clone(),
            digest: digest.clone(),
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

    fn check(&self) {
        if let Some(b) = &self.budget
            && self.total() > b.high
        {
            self.over.notify_one();
        }
    }

    /// Picks blobs to remove and takes them out of the index (so no new reader is promised
    /// them). The caller deletes the files.
    fn take_victims(&self) -> Vec<(Digest, u64)> {
        let wanted = self
            .room_wanted
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        let pins = self.pins.lock().expect("pins poisoned").clone();
        let patterns = self.budget.as_ref().map_or(&[][..], |b| &b.pinned[..]);
        let mut inner = self.inner.lock().expect("usage poisoned");
        let over_budget = self
            .budget
            .as_ref()
            .filter(|b| inner.total > b.high)
            .map(|b| b.low);
        let for_room = (wanted > 0).then(|| inner.total.saturating_sub(wanted));
        let Some(target) = over_budget.into_iter().chain(for_room).min() else {
            return Vec::new();
        };
        let candidates = inner.blobs.iter().map(|(d, e)| Candidate {
            digest: d.clone(),
            size: e.size,
            last_access: e.last_access,
            keep: e.readers > 0 || pins.contains(d) || is_pinned(patterns, d),
        });
        let victims = choose_victims(candidates, inner.total, target);
        let mut out = Vec::with_capacity(victims.len());
        for d in victims {
            if let Some(e) = inner.blobs.remove(&d) {
                inner.total -= e.size;
                out.push((d, e.size));
            }
        }
        out
    }
}

fn is_pinned(patterns: &[String], digest: &Digest) -> bool {
    let d = digest.to_string();
    patterns.iter().any(|p| glob_match(p, &d))
}

/// A blob eviction may consider.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub digest: Digest,
    pub size: u64,
    pub last_access: SystemTime,
    /// Pinned or being read: never chosen.
    pub keep: bool,
}

/// The least recently used blobs whose removal brings `total` to `target` or below (or as
/// close as the blobs that may go allow).
pub fn choose_victims(
    candidates: impl Iterator<Item = Candidate>,
    total: u64,
    target: u64,
) -> Vec<Digest> {
    let mut c: Vec<Candidate> = candidates.filter(|c| !c.keep).collect();
    c.sort_by(|a, b| {
        a.last_access
            .cmp(&b.last_access)
            .then(a.digest.cmp(&b.digest))
    });
    let mut remaining = total;
    let mut out = Vec::new();
    for cand in c {
        if remaining <= target {
            break;
        }
        remaining = remaining.saturating_sub(cand.size);
        out.push(cand.digest);
    }
    out
}

/// Runs until `stop`: whenever the blobs pass the high watermark, removes the least recently
/// used down to the low watermark.
pub async fn run(usage: Arc<Usage>, store: Arc<DiskStore>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = usage.over.notified() => {}
        }
        let victims = usage.take_victims();
        if victims.is_empty() {
            continue;
        }
        let freed: u64 = victims.iter().map(|(_, s)| s).sum();
        let count = victims.len();
        let store = store.clone();
        let removed = tokio::task::spawn_blocking(move || {
            for (digest, _) in &victims {
                if let Err(e) = store.remove_blob(digest) {
                    tracing::warn!(%digest, error = %e, "could not evict blob");
                }
            }
        })
        .await;
        if removed.is_err() {
            tracing::error!("eviction task failed");
        }
        tracing::info!(
            blobs = count,
            freed,
            total = usage.total(),
            "evicted least recently used blobs"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cand(n: u8, size: u64, age_secs: u64, keep: bool) -> Candidate {
        Candidate {
            digest: Digest::of(&[n]),
            size,
            last_access: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age_secs),
            keep,
        }
    }

    #[test]
    fn oldest_go_first_until_under_target() {
        let c = vec![
            cand(1, 10, 5, false),
            cand(2, 10, 50, false),
            cand(3, 10, 500, false),
        ];
        let v = choose_victims(c.into_iter(), 30, 15);
        assert_eq!(v, vec![Digest::of(&[3]), Digest::of(&[2])]);
    }

    #[test]
    fn kept_blobs_are_never_chosen() {
        let c = vec![cand(1, 10, 5, false), cand(2, 10, 500, true)];
        let v = choose_victims(c.into_iter(), 20, 0);
        assert_eq!(v, vec![Digest::of(&[1])]);
    }

    #[test]
    fn nothing_under_target() {
        let c = vec![cand(1, 10, 5, false)];
        assert!(choose_victims(c.into_iter(), 10, 10).is_empty());
    }

    #[test]
    fn index_tracks_totals_readers_and_pins() {
        let pinned = Digest::of(b"pinned");
        let usage = Usage::new(Some(Budget {
            high: 25,
            low: 15,
            pinned: vec![format!("{}*", &pinned.to_string()[..12])],
        }));
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
}
