//! The blob cache: committed blobs on disk, and at most one running fill per digest.
//!
//! Architecture invariants:
//! - **The cache owns every fill; no request does.** A fill is spawned on the cache's
//!   `TaskTracker` under a child of the cache's cancellation token (cancelled only at the end
//!   of a shutdown's grace period). A client that disconnects drops its reader and nothing
//!   else.
//! - **At most one fill per digest.** The map is checked and updated under one lock. The disk
//!   is looked at before, off the lock (no IO under it); a fill that committed and left the
//!   map between that lookup and the lock is not fetched twice, because every departure from
//!   the map moves a counter (`left`) under the lock: a caller that sees it moved since its
//!   disk lookup looks again (after a few such rounds, under the lock, so churn cannot starve
//!   it).
//! - A fill leaves the map just before it publishes its final state (see `FillGuard`), so a
//!   request that saw a fill fail and retries starts a fresh one.
//! - **Starting a fill takes a slot of [`FillLimits`]** (per client address and in total),
//!   held by the fill until it ends; over the cap the request gets 429. Cache hits and
//!   joiners never take one.
//! - **A joiner is not bound by another request's route.** A fill fetches through the route
//!   and repository of the request that started it. A request that joined a fill started for
//!   another route or repository, and saw it fail before any byte, opens again through its
//!   own (a 404 on one route says nothing about another): still one fill per digest at a
//!   time, as the failed fill has left the map.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::blocking;
use super::evict::{ReadGuard, Usage};
use super::fill::{self, CommitGate, Detach, FillContext, FillGuard, FillState, Progress};
use super::fill_limit::FillLimits;
use super::ranges::{ColdRanges, FillRanges};
use super::spill::{Cursor, Followers};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, RepoName};
use crate::storage::DiskStore;
use crate::sync::Locked;
use crate::upstream::{Route, Walk, Want};

pub struct BlobCache {
    store: Arc<DiskStore>,
    /// Running fills by digest. A std mutex: it is held only for map operations (and, rarely,
    /// a `stat`: see `join_or_start`), never across an await. Each section inserts or removes
    /// one whole entry, so a poisoned lock (`Locked`) still guards a consistent map.
    fills: Arc<Mutex<HashMap<Digest, RunningFill>>>,
    /// How many fills have left the map, moved under its lock: a disk lookup made before the
    /// lock still holds if this has not moved since.
    left: Arc<AtomicU64>,
    /// Where fills run, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Parent of every fill's token; cancelled when a shutdown's grace period runs out.
    cancel: CancellationToken,
    /// Committed blobs, their sizes and use: the disk budget's index.
    usage: Arc<Usage>,
    /// Blob GETs served from the cache, and those that needed a fill (for stats).
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    /// What a fill passing through memory times its stalled readers on.
    clock: Clock,
    /// The cap on fills started at once, per client address and in total.
    limits: FillLimits,
    /// Ranged upstream requests for ranges of blobs being filled (`cold_ranges`).
    cold_ranges: Arc<ColdRanges>,
}

/// A fill in the map: its progress, and its readers (each joins under the map's lock).
struct RunningFill {
    progress: watch::Receiver<FillState>,
    followers: Arc<Followers>,
    gate: Arc<CommitGate>,
    /// Where it fetches from: its failure before any byte binds only requests for the same.
    source: FillSource,
    /// Its ranges served before verification, and the ranged fetches running for it.
    ranges: Arc<FillRanges>,
}

/// The route (by registry) and repository a fill fetches through.
#[derive(Clone, PartialEq, Eq)]
struct FillSource {
    registry: String,
    name: RepoName,
}

impl RunningFill {
    fn subscribe(&self) -> (watch::Receiver<FillState>, Cursor) {
        (self.progress.clone(), self.followers.join())
    }
}

/// Where a blob's bytes come from.
pub enum BlobSource {
    /// Committed and verified on disk. The guard keeps eviction away while it is read.
    Cached {
        file: Arc<File>,
        size: u64,
        guard: ReadGuard,
    },
    /// A fill in progress (past the upstream's headers); follow its progress. The cursor
    /// keeps the bytes this reader needs if the fill has to pass them through memory.
    Filling {
        progress: watch::Receiver<FillState>,
        cursor: Cursor,
        size: Option<u64>,
        /// What the fill's ranges share (`cold_ranges = "upstream"`).
        ranges: Arc<FillRanges>,
    },
}

impl BlobSource {
    /// The blob's size, if known yet.
    pub fn size(&self) -> Option<u64> {
        match self {
            BlobSource::Cached { size, .. } => Some(*size),
            BlobSource::Filling { size, .. } => *size,
        }
    }

    /// Follows a fill until the blob's size is known (an upstream that sent no length makes
    /// it known only at the end). For ranges, which need the size up front.
    pub async fn with_size(self) -> Result<BlobSource> {
        let BlobSource::Filling {
            mut progress,
            cursor,
            size: None,
            ranges,
        } = self
        else {
            return Ok(self);
        };
        let size = follow_until(&mut progress, |s| match s {
            FillState::Verified(p) => p.size,
            FillState::Complete { size, .. } => Some(*size),
            _ => None,
        })
        .await?;
        Ok(BlobSource::Filling {
            progress,
            cursor,
            size: Some(size),
            ranges,
        })
    }
}

/// Follows a fill's states until `found` picks a value out of one; fails if the fill fails.
async fn follow_until<T>(
    progress: &mut watch::Receiver<FillState>,
    found: impl Fn(&FillState) -> Option<T>,
) -> Result<T> {
    loop {
        {
            let state = progress.borrow_and_update();
            if let FillState::Failed(e) = &*state {
                return Err(e.clone());
            }
            if let Some(v) = found(&state) {
                return Ok(v);
            }
        }
        if progress.changed().await.is_err() {
            return Err(Error::internal("the cache fill vanished"));
        }
    }
}

/// What a cache miss found once it held the fill map's lock.
enum Joined {
    /// A fill to follow; `foreign`: one started for another route or repository.
    Fill {
        progress: watch::Receiver<FillState>,
        cursor: Cursor,
        foreign: bool,
        ranges: Arc<FillRanges>,
    },
    Committed(Arc<File>, u64),
    /// A fill left the map since the caller's disk lookup: it may have committed the blob.
    Recheck,
}

/// Rounds of disk lookups off the fill map's lock before one is made under it.
const MAX_RECHECKS: usize = 3;

/// How many times a request that joined foreign fills which failed opens again; its own fill
/// ends the retries anyway, so this only bounds a run of other routes' failures.
const FOREIGN_RETRIES: usize = 3;

impl BlobCache {
    pub fn new(
        store: Arc<DiskStore>,
        usage: Arc<Usage>,
        tracker: TaskTracker,
        cancel: CancellationToken,
        clock: Clock,
        limits: FillLimits,
    ) -> BlobCache {
        BlobCache {
            limits,
            usage,
            store,
            fills: Arc::default(),
            left: Arc::default(),
            tracker,
            cancel,
            hits: Default::default(),
            misses: Default::default(),
            clock,
            cold_ranges: Arc::default(),
        }
    }

    /// Opens a committed blob, if cached.
    pub async fn open_cached(&self, digest: &Digest) -> Result<Option<BlobSource>> {
        let store = self.store.clone();
        let d = digest.clone();
        let found = blocking(
            move || store.open_blob_for_read(&d),
            "opening a cached blob",
        )
        .await?;
        Ok(found.map(|(file, size)| BlobSource::Cached {
            file: Arc::new(file),
            size,
            guard: self.usage.open(digest, size),
        }))
    }

    /// The blob from the cache, or from a fill (joined or started) once the upstream has
    /// answered. Errors before any byte (404, 5xx, timeouts) are returned here, so the
    /// client gets a proper status. `client` (the request's address) is charged for a fill
    /// this starts: over its cap, or over the total, this is a 429.
    pub async fn open(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        digest: &Digest,
        client: Option<IpAddr>,
    ) -> Result<BlobSource> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut counted = false;
        let (mut retries, mut rechecks) = (0, 0);
        loop {
            // Read before the disk lookup: if no fill leaves the map after this, what the disk
            // says now still holds when the map is locked.
            let seen = self.left.load(SeqCst);
            if let Some(found) = self.open_cached(digest).await? {
                if !counted {
                    self.hits.fetch_add(1, Relaxed);
                }
                return Ok(found);
            }
            if !counted {
                self.misses.fetch_add(1, Relaxed);
                counted = true;
            }
            let seen = (rechecks < MAX_RECHECKS).then_some(seen);
            let (mut progress, cursor, foreign, ranges) =
                match self.join_or_start(route, name, digest, client, seen)? {
                    Joined::Fill {
                        progress,
                        cursor,
                        foreign,
                        ranges,
                    } => (progress, cursor, foreign, ranges),
                    Joined::Recheck => {
                        rechecks += 1;
                        continue;
                    }
                    Joined::Committed(file, size) => {
                        // A hit after all, and read like one: eviction must wait for it.
                        return Ok(BlobSource::Cached {
                            file,
                            size,
                            guard: self.usage.open(digest, size),
                        });
                    }
                };
            // Wait for the upstream's headers, so errors before any byte get a proper status.
            let size = follow_until(&mut progress, |s| match s {
                FillState::Connecting => None,
                FillState::Receiving(p) | FillState::Verified(p) => Some(p.size),
                FillState::Complete { size, .. } => Some(Some(*size)),
                FillState::Failed(_) => None,
            })
            .await;
            match size {
                Ok(size) => {
                    return Ok(BlobSource::Filling {
                        progress,
                        cursor,
                        size,
                        ranges,
                    });
                }
                // Another route's upstreams failed (a 404 there, an outage): ours may have it.
                // The failed fill has left the map, so this joins or starts a fresh one.
                Err(e)
                    if foreign
                        && retries < FOREIGN_RETRIES
                        && e.kind != ErrorKind::ShuttingDown =>
                {
                    retries += 1;
                    tracing::debug!(%digest, %name, registry = %route.registry, error = %e, "a fill for another route failed; trying our own");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The size of a blob for a HEAD: from the cache or a running fill if possible, else
    /// asked of the upstream without downloading (and without caching) the blob.
    pub async fn size(&self, route: &Route, name: &RepoName, digest: &Digest) -> Result<u64> {
        // `open_cached` finds only committed blobs, which have a size.
        if let Some(size) = self.open_cached(digest).await?.and_then(|b| b.size()) {
            return Ok(size);
        }
        let running = self.fills.locked().get(digest).map(|f| f.progress.clone());
        if let Some(rx) = running {
            match &*rx.borrow() {
                FillState::Receiving(Progress {
                    size: Some(size), ..
                })
                | FillState::Verified(Progress {
                    size: Some(size), ..
                }) => return Ok(*size),
                FillState::Complete { size, .. } => return Ok(*size),
                _ => {}
            }
        }
        Walk::new(route, Want::ByDigest)
            .first_success(&format!("HEAD blob {digest}"), |u| {
                u.blob_size(name, digest)
            })
            .await
    }

    /// Subscribes to the running fill for `digest`, starting one (charged to `client`) if
    /// there is none. `seen`: the `left` count read before the caller found the blob missing
    /// on disk (None: look at the disk here, under the lock).
    fn join_or_start(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        digest: &Digest,
        client: Option<IpAddr>,
        seen: Option<u64>,
    ) -> Result<Joined> {
        let source = FillSource {
            registry: route.registry.clone(),
            name: name.clone(),
        };
        let mut fills = self.fills.locked();
        if let Some(running) = fills.get(digest) {
            let (progress, cursor) = running.subscribe();
            return Ok(Joined::Fill {
                progress,
                cursor,
                foreign: running.source != source,
                ranges: running.ranges.clone(),
            });
        }
        // A fill may have committed and left the map since the caller's disk lookup: if any
        // fill left since, look again (off the lock, or here after a few rounds).
        match seen {
            Some(seen) if self.left.load(SeqCst) == seen => {}
            Some(_) => return Ok(Joined::Recheck),
            None => {
                if let Ok(Some((file, size))) = self.store.open_blob(digest) {
                    return Ok(Joined::Committed(Arc::new(file), size));
                }
            }
        }
        let slot = self.limits.try_start(client)?;
        let (tx, rx) = watch::channel(FillState::Connecting);
        let running = RunningFill {
            progress: rx,
            followers: Arc::default(),
            gate: Arc::default(),
            source,
            ranges: Arc::default(),
        };
        let (rx, cursor) = running.subscribe();
        let followers = running.followers.clone();
        let gate = running.gate.clone();
        let ranges = running.ranges.clone();
        fills.insert(digest.clone(), running);
        drop(fills);

        let map = self.fills.clone();
        let left = self.left.clone();
        let key = digest.clone();
        let mine = rx.clone();
        let detach = Detach::new(Box::new(move || {
            let mut fills = map.locked();
            // Only this fill's own entry: after an early detach, a newer fill may hold the key.
            if fills
                .get(&key)
                .is_some_and(|f| f.progress.same_channel(&mine))
            {
                fills.remove(&key);
                left.fetch_add(1, SeqCst);
            }
        }));
        let guard = FillGuard::new(tx, followers.clone(), detach);
        let usage = self.usage.clone();
        let cx = FillContext {
            store: self.store.clone(),
            gate,
            disk_full: Box::new(move |needed| usage.disk_full(needed)),
            clock: self.clock.clone(),
        };
        let route = route.clone();
        let usage = self.usage.clone();
        let token = self.cancel.child_token();
        let name = name.clone();
        let digest = digest.clone();
        let (cold_ranges, fill_ranges) = (self.cold_ranges.clone(), ranges.clone());
        tracing::debug!(%digest, %name, "starting cache fill");
        self.tracker.spawn(async move {
            let outcome = tokio::select! {
                r = fill::run(&guard, &cx, &route, &name, &digest) => r,
                () = token.cancelled() => Err(Error::new(
                    ErrorKind::ShuttingDown,
                    format!("blob {digest}: fill cancelled by shutdown"),
                )),
            };
            match &outcome {
                Ok(FillState::Complete { size, .. }) => {
                    usage.committed_followed(&digest, *size, Some(&followers))
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%digest, %name, error = %e, "cache fill failed"),
            }
            cold_ranges.fill_ended(&fill_ranges, &digest, &outcome);
            // The upstream download is over: the slot is free for the next one, before the fill
            // leaves the map (so once `running_fills` says it has gone, so has its slot).
            drop(slot);
            guard.finish(outcome);
        });
        Ok(Joined::Fill {
            progress: rx,
            cursor,
            foreign: false,
            ranges,
        })
    }

    /// Ranges of blobs being filled, answered without waiting for verification.
    pub fn cold_ranges(&self) -> &ColdRanges {
        &self.cold_ranges
    }

    /// (blob GETs served from the cache, blob GETs that needed the upstream).
    pub fn hit_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.hits.load(Relaxed), self.misses.load(Relaxed))
    }

    /// Removes a cached blob (admin purge). A reader that has it open keeps reading; the
    /// next request fetches it again.
    pub async fn purge(&self, digest: &Digest) -> Result<()> {
        self.remove_file(digest).await?;
        self.purged(digest).await
    }

    /// The blob's file was just removed (by [`BlobCache::purge`] or a repository or tag
    /// purge): drops it from the disk budget's index and keeps a fill of it from bringing it
    /// back. A fill that has not begun its commit will not commit; one already committing
    /// is waited for, and its file removed after it.
    pub async fn purged(&self, digest: &Digest) -> Result<()> {
        let committing = self
            .fills
            .locked()
            .get(digest)
            .filter(|f| !f.gate.close())
            .map(|f| f.progress.clone());
        if let Some(mut progress) = committing {
            // The fill's sender goes away when it has finished (committed or not).
            while progress.changed().await.is_ok() {}
            self.remove_file(digest).await?;
        }
        self.usage.forget(digest);
        Ok(())
    }

    async fn remove_file(&self, digest: &Digest) -> Result<()> {
        let store = self.store.clone();
        let d = digest.clone();
        blocking(move || store.remove_blob(&d), "removing a blob").await
    }

    /// Number of fills running now (for tests and stats).
    pub fn running_fills(&self) -> usize {
        self.fills.locked().len()
    }
}
