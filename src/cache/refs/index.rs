//! The reference index: the graph behind a lock, loaded from the files in the background
//! while the server serves (`load`), and kept current as manifests are stored and tags and
//! links recorded.
//!
//! While the load runs, what is recorded meanwhile goes into the same graph and wins over
//! what the load read from disk, which may be older (see [`RefIndex::merge_manifests`] and
//! [`RefIndex::finish_load`]):
//! - manifests are content-addressed, so the load adds one only if it is not there already,
//!   and never one purged since the load began (the load may have listed its file before it
//!   went);
//! - a tag answer recorded during the load is newer than any record the load read: the load
//!   fills only the (tag, Accept class) slots that nothing recorded meanwhile;
//! - links are a set, so the load's and the live ones are simply united. Whether a manifest
//!   needs a link depends on every tag of its repository, which only the full graph knows:
//!   links claimed during the load are held back and decided when it ends (the loader writes
//!   those still needed), so none is written twice or where a tag already reaches it.
//!
//! Decisions that need the whole graph (eviction's pinned set, purge plans, link decisions)
//! wait for [`RefIndex::loaded`] or are deferred; counts say what is indexed so far.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::graph::{Graph, Pinned, PurgePlan, RepoKey, Target};
use super::trim::{MetaItem, MetaKey, TrimGroup};
use crate::error::{Error, ErrorKind};
use crate::oci::Digest;
use crate::oci::references::{self, References};
use crate::policy::pins::Pin;
use crate::storage::DiskStore;
use crate::sync::Locked;

/// Links claimed during the load, held until it ends, at most: each one stands for a manifest
/// an upstream confirmed for its repository in the few seconds the load takes, so this is
/// never reached in practice; past it, a claim is dropped (a later pull links it).
const MAX_HELD_LINKS: usize = 10_000;

/// A manifest's references, or none (with a warning) if it cannot be read.
pub fn references_or_warn(digest: &Digest, bytes: &[u8]) -> References {
    references::parse(bytes).unwrap_or_else(|e| {
        tracing::warn!(%digest, error = %e, "manifest is not readable JSON: it references nothing");
        References::default()
    })
}

/// Where the load from disk stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    /// Reading the files; the graph holds what was read and recorded so far.
    Loading,
    /// The graph holds everything on disk, and everything recorded since.
    Loaded,
    /// The load ended early (shutdown) or failed: the graph is partial and stays so until the
    /// next start. The message says why.
    Incomplete(String),
}

/// One tag answer the load read from disk: (repository, tag, Accept class key) → manifest.
pub type DiskTag = (RepoKey, String, String, Digest);

/// One link: a repository, and a manifest pulled from it by digest.
pub type Link = (RepoKey, Digest);

/// The index: the graph behind a lock, a generation that moves whenever something is added
/// (so an eviction pass can tell that its pinned set may have grown), and the load's state.
pub struct RefIndex {
    /// Taken with `Locked`. The graph is maps of owned values, each changed by one insert or
    /// removal; only a purge's `apply` makes several, and a panic part-way through it would
    /// leave some of the purged roots in the index: they keep their blobs until the next purge
    /// or restart, which is what a purge that had not run would do.
    inner: Mutex<Inner>,
    generation: AtomicU64,
    state: watch::Sender<LoadState>,
    /// Cancelled to end a running load early (shutdown).
    stop: CancellationToken,
}

#[derive(Default)]
struct Inner {
    graph: Graph,
    /// `Some` until the load has merged the roots it read.
    loading: Option<Loading>,
}

/// What the load must know of what happened while it ran.
#[derive(Default)]
struct Loading {
    /// Manifests purged since the load began: their files may still be in its listing.
    purged: HashSet<Digest>,
    /// Links claimed meanwhile, decided when the roots are complete.
    held_links: BTreeSet<Link>,
}

impl Default for RefIndex {
    /// An empty index with nothing to load (benchmarks, tests).
    fn default() -> RefIndex {
        RefIndex::with_state(LoadState::Loaded, None)
    }
}

impl RefIndex {
    fn with_state(state: LoadState, loading: Option<Loading>) -> RefIndex {
        RefIndex {
            inner: Mutex::new(Inner {
                graph: Graph::default(),
                loading,
            }),
            generation: AtomicU64::new(0),
            state: watch::Sender::new(state),
            stop: CancellationToken::new(),
        }
    }

    /// An empty index waiting for its load (`refs::load_in_background`): it takes records
    /// from now on, and merges what the load reads from disk under them.
    pub fn loading() -> RefIndex {
        RefIndex::with_state(LoadState::Loading, Some(Loading::default()))
    }

    /// Builds the whole index from the stored manifests, tag records and links, at once
    /// (blocking: call it on the blocking pool). For benchmarks and tools; a server loads it
    /// in the background instead.
    pub fn load(store: &DiskStore) -> std::io::Result<RefIndex> {
        let index = RefIndex::loading();
        index.merge_manifests_from(store)?;
        let (tags, links) = super::load::read_roots(store)?;
        let to_write = index.finish_load(tags, links);
        super::load::write_links(store, &to_write);
        index.set_state(LoadState::Loaded);
        Ok(index)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under this lock is a single map operation on the graph or the loading
        // state: a panic elsewhere cannot leave them half-changed, so a poisoned lock's
        // contents are still right.
        self.inner.locked()
    }

    /// Moves whenever something was added to the index.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self, changed: bool) {
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    // --- The load ---

    /// Reads every stored manifest into the graph, a batch at a time: the files are read
    /// outside the lock, and each batch merged under it. Stops early once
    /// [`RefIndex::stop_loading`] was called. Unreadable manifests are skipped with a warning.
    pub(super) fn merge_manifests_from(&self, store: &DiskStore) -> std::io::Result<()> {
        const BATCH: usize = 512;
        let digests = store.list_manifests()?;
        for chunk in digests.chunks(BATCH) {
            if self.stop.is_cancelled() {
                break;
            }
            let mut batch = Vec::with_capacity(chunk.len());
            for d in chunk {
                match store.read_manifest(d) {
                    Ok(Some(m)) => batch.push((d.clone(), references_or_warn(d, &m.bytes))),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(digest = %d, error = %e, "stored manifest unreadable"),
                }
            }
            self.merge_manifests(batch);
        }
        Ok(())
    }

    /// Takes in manifests the load read: each one not indexed yet and not purged since the
    /// load began.
    pub(super) fn merge_manifests(&self, batch: Vec<(Digest, References)>) {
        let mut inner = self.lock();
        let Inner { graph, loading } = &mut *inner;
        let mut added = false;
        for (d, refs) in batch {
            if loading.as_ref().is_some_and(|l| l.purged.contains(&d)) {
                continue;
            }
            added |= graph.add_manifest_if_absent(d, refs);
        }
        drop(inner);
        self.changed(added);
    }

    /// Takes in the roots the load read (tags resolved per Accept class, newest record first;
    /// links) under what was recorded meanwhile, ends the loading state, and decides the
    /// links held back: returns those to write (the caller writes them).
    pub(super) fn finish_load(&self, tags: Vec<DiskTag>, links: Vec<Link>) -> Vec<Link> {
        let mut inner = self.lock();
        let Inner { graph, loading } = &mut *inner;
        for (key, tag, class, d) in tags {
            // A slot already filled was recorded during the load: newer than the file read.
            graph.set_tag_if_absent(key, &tag, &class, d);
        }
        for (key, d) in links {
            graph.add_link(key, d);
        }
        let held = loading.take().map(|l| l.held_links).unwrap_or_default();
        let mut to_write = Vec::new();
        for (key, d) in held {
            if graph.needs_link(&key, &d) {
                graph.add_link(key.clone(), d.clone());
                to_write.push((key, d));
            }
        }
        drop(inner);
        self.changed(true);
        to_write
    }

    pub(super) fn set_state(&self, state: LoadState) {
        self.state.send_replace(state);
    }

    pub(super) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Asks a running load to stop after its current batch (shutdown). The index then stays
    /// incomplete: nothing that needs the whole graph runs on it.
    pub fn stop_loading(&self) {
        self.stop.cancel();
    }

    /// Where the load stands.
    pub fn load_state(&self) -> LoadState {
        self.state.borrow().clone()
    }

    /// Is the graph complete (everything on disk, and everything recorded since)?
    pub fn is_loaded(&self) -> bool {
        *self.state.borrow() == LoadState::Loaded
    }

    /// Waits until the graph is complete. An error if the load ended without completing it
    /// (shutdown, or a directory it could not read): what needs the whole graph must not run.
    pub async fn loaded(&self) -> crate::error::Result<()> {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let state = match rx.wait_for(|s| *s != LoadState::Loading).await {
            Ok(s) => s.clone(),
            Err(_) => LoadState::Incomplete("the reference index went away".into()),
        };
        match state {
            LoadState::Loaded => Ok(()),
            LoadState::Loading | LoadState::Incomplete(_) => Err(Error::new(
                ErrorKind::ShuttingDown,
                format!(
                    "the reference index was not loaded ({}): restart cistern to rebuild it",
                    match state {
                        LoadState::Incomplete(why) => why,
                        _ => String::new(),
                    }
                ),
            )),
        }
    }

    /// Waits until the load has ended, completed or not (shutdown: the loader has let go of
    /// the store, and with it the data directory's lock).
    pub async fn settled(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| *s != LoadState::Loading).await;
    }

    // --- Records while serving ---

    pub fn manifest_stored(&self, digest: &Digest, bytes: &[u8]) {
        let refs = references_or_warn(digest, bytes);
        let mut inner = self.lock();
        if let Some(l) = &mut inner.loading {
            // Stored again after a purge: the file is there, the load may add it too.
            l.purged.remove(digest);
        }
        let changed = inner.graph.add_manifest(digest.clone(), refs);
        drop(inner);
        self.changed(changed);
    }

    pub fn tag_recorded(&self, key: RepoKey, tag: &str, accept: &str, digest: &Digest) {
        let changed = self.lock().graph.set_tag(key, tag, accept, digest.clone());
        self.changed(changed);
    }

    /// Would a manifest pulled from `key` by digest need a link (no link or tag of the
    /// repository reaches it)? `None` while loading: the repository's roots are not all known.
    pub fn needs_link(&self, key: &RepoKey, digest: &Digest) -> Option<bool> {
        let inner = self.lock();
        match inner.loading {
            Some(_) => None,
            None => Some(inner.graph.needs_link(key, digest)),
        }
    }

    /// A manifest was pulled from `key` by digest, and an upstream confirmed the repository
    /// holds it. True if the caller should write a link (it is in the index from now on, so
    /// concurrent pulls write it once). While loading, the claim is held and decided when the
    /// load ends, which then writes the link if it is still needed: false here.
    pub fn claim_link(&self, key: &RepoKey, digest: &Digest) -> bool {
        let mut inner = self.lock();
        let Inner { graph, loading } = &mut *inner;
        if let Some(l) = loading {
            if l.held_links.len() < MAX_HELD_LINKS {
                l.held_links.insert((key.clone(), digest.clone()));
            }
            return false;
        }
        if !graph.needs_link(key, digest) {
            return false;
        }
        graph.add_link(key.clone(), digest.clone());
        drop(inner);
        self.changed(true);
        true
    }

    pub fn manifest_purged(&self, digest: &Digest) {
        let mut inner = self.lock();
        inner.graph.remove_manifest(digest);
        if let Some(l) = &mut inner.loading {
            l.purged.insert(digest.clone());
        }
    }

    // --- Decisions on the whole graph: callers wait for `loaded` first ---

    /// What the pins reach. Only meaningful once loaded (eviction checks `is_loaded`).
    pub fn pinned(&self, pins: &[Pin]) -> Pinned {
        self.lock().graph.pinned(pins)
    }

    /// A purge's plan. Only meaningful once loaded (purges wait for `loaded`).
    pub fn plan_purge(&self, target: &Target, pins: &[Pin]) -> PurgePlan {
        self.lock().graph.plan_purge(target, pins)
    }

    pub fn apply(&self, plan: &PurgePlan) {
        self.lock().graph.apply(plan);
    }

    /// What the metadata budget removes to get from `total` to `target` (see `trim`). Runs
    /// under the index's lock: call it on the blocking pool.
    pub fn plan_trim(
        &self,
        items: &[MetaItem],
        pins: &[Pin],
        total: u64,
        target: u64,
    ) -> Vec<TrimGroup> {
        self.lock().graph.plan_trim(items, pins, total, target)
    }

    /// Takes what the metadata budget removed from disk out of the index.
    pub fn trimmed(&self, keys: &[MetaKey]) {
        self.lock().graph.remove_trimmed(keys);
    }

    /// (manifests, tags, links) in the index, for stats: while loading, those indexed so far.
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        let (t, l) = inner.graph.root_counts();
        (inner.graph.manifest_count(), t, l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StoredManifest, TagRecord};

    fn key(repo: &str) -> RepoKey {
        RepoKey {
            registry: "docker.io".into(),
            repository: repo.into(),
        }
    }

    fn image(blob: &str) -> (Vec<u8>, Digest) {
        let bytes = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[]}}"#,
            Digest::of(blob.as_bytes())
        )
        .into_bytes();
        let d = Digest::of(&bytes);
        (bytes, d)
    }

    fn store_manifest(store: &DiskStore, bytes: &[u8]) {
        let m = StoredManifest {
            media_type: crate::oci::media_types::OCI_MANIFEST.into(),
            bytes: bytes::Bytes::copy_from_slice(bytes),
        };
        store.write_manifest(&Digest::of(bytes), &m).unwrap();
    }

    fn record(repo: &str, tag: &str, accept: &str, bytes: &[u8], at: u64) -> TagRecord {
        TagRecord {
            registry: "docker.io".into(),
            repository: repo.into(),
            tag: tag.into(),
            accept: accept.into(),
            digest: Digest::of(bytes).to_string(),
            media_type: crate::oci::media_types::OCI_MANIFEST.into(),
            size: bytes.len() as u64,
            fetched_at_ms: at,
        }
    }

    #[test]
    fn records_of_earlier_versions_fall_into_their_class_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let (old, new) = (&b"{\"a\":1}"[..], &b"{\"a\":2}"[..]);
        for bytes in [old, new] {
            store_manifest(&store, bytes);
        }
        // Earlier versions keyed records by the raw Accept set: two clients that differ only
        // in a type cistern does not know made two records. The newer one is written first.
        let oci = crate::oci::media_types::OCI_MANIFEST;
        store
            .write_tag(&record(
                "library/app",
                "1",
                &format!("{oci},y/junk"),
                new,
                2,
            ))
            .unwrap();
        store
            .write_tag(&record(
                "library/app",
                "1",
                &format!("{oci},x/junk"),
                old,
                1,
            ))
            .unwrap();
        let index = RefIndex::load(&store).unwrap();
        assert!(index.is_loaded());
        let plan = index.plan_purge(&Target::Tag(key("library/app"), "1".into()), &[]);
        // One answer for the class, the newest: the older manifest is no longer a tag's.
        assert_eq!(plan.remove_manifests, vec![Digest::of(new)]);
    }

    /// Everything recorded while the load runs is merged with what it read: the newer tag
    /// answer wins over the stale record the load read, a manifest purged after the load
    /// listed it stays out, nothing is counted twice, and links claimed meanwhile are decided
    /// on the whole graph.
    #[test]
    fn records_made_during_the_load_win_over_what_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let (old, old_d) = image("old");
        let (new, new_d) = image("new");
        let (purged, purged_d) = image("purged");
        let (linked, linked_d) = image("linked");
        for m in [&old, &new, &purged, &linked] {
            store_manifest(&store, m);
        }
        let class = "application/vnd.oci.image.manifest.v1+json";
        store
            .write_tag(&record("library/app", "1", class, &old, 1))
            .unwrap();
        store.write_link("docker.io", "team/x", &linked_d).unwrap();

        let index = RefIndex::loading();
        assert!(!index.is_loaded());
        // Before the load reads anything: a purge of a manifest whose file it will list...
        index.manifest_purged(&purged_d);
        // ...and one stored again (its file is there; counted once).
        index.manifest_stored(&new_d, &new);
        index.merge_manifests_from(&store).unwrap();
        // The load has read the tag's old record; then the tag is answered anew, live.
        let (tags, links) = crate::cache::refs::load::read_roots(&store).unwrap();
        store
            .write_tag(&record("library/app", "1", class, &new, 2))
            .unwrap();
        index.tag_recorded(key("library/app"), "1", class, &new_d);
        // Link decisions wait for the whole graph: one already on disk, one reached by the
        // tag (on disk only), and one really needed.
        assert_eq!(index.needs_link(&key("team/x"), &linked_d), None);
        assert!(!index.claim_link(&key("team/x"), &linked_d));
        assert!(!index.claim_link(&key("library/app"), &new_d));
        assert!(!index.claim_link(&key("team/y"), &old_d));
        let to_write = index.finish_load(tags, links);
        index.set_state(LoadState::Loaded);

        assert_eq!(to_write, vec![(key("team/y"), old_d.clone())]);
        // old, new, linked; not the purged one. One tag, two links.
        assert_eq!(index.counts(), (3, 1, 2));
        let plan = index.plan_purge(&Target::Tag(key("library/app"), "1".into()), &[]);
        assert_eq!(
            plan.remove_manifests,
            vec![new_d.clone()],
            "the live answer won"
        );
        // Decided now: no claim is held any more.
        assert_eq!(index.needs_link(&key("team/x"), &linked_d), Some(false));
        assert!(index.claim_link(&key("team/z"), &linked_d));
    }

    #[tokio::test]
    async fn loaded_fails_for_a_load_that_did_not_complete() {
        let index = RefIndex::loading();
        index.set_state(LoadState::Incomplete("shutting down".into()));
        let e = index.loaded().await.unwrap_err();
        assert!(e.message.contains("shutting down"), "{e}");
        index.settled().await;
        RefIndex::default().loaded().await.unwrap();
    }
}
