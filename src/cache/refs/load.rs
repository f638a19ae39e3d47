//! The reference index's load at start, in the background while the server serves (as
//! nginx's cache loader does): the stored manifests, then the tag records and links, merged
//! under what is recorded meanwhile (see `index`).
//!
//! ```text
//! manifests/ ─ batches, merged as read ─▶ graph ◀─ records made while serving
//! tags/, links/ ─ read ─▶ [LoadGate] ─▶ merged under the live ones ─▶ held links decided,
//!                                        written ─▶ LoadState::Loaded
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::graph::RepoKey;
use super::index::{DiskTag, Link, LoadState, RefIndex};
use crate::oci::Digest;
use crate::oci::media_types::AcceptClass;
use crate::storage::DiskStore;

/// A point the load stops at until it is opened: after it has read every file, before it
/// merges the roots and ends. For tests, which hold it to make records during a load
/// deterministically; a server's gate is open from the start.
#[derive(Clone, Default)]
pub struct LoadGate {
    /// `None`: no gate (always open).
    gate: Option<Arc<Gate>>,
}

struct Gate {
    open: watch::Sender<bool>,
    reached: watch::Sender<bool>,
}

impl LoadGate {
    /// A gate that holds the load until [`LoadGate::open`].
    pub fn closed() -> LoadGate {
        LoadGate {
            gate: Some(Arc::new(Gate {
                open: watch::Sender::new(false),
                reached: watch::Sender::new(false),
            })),
        }
    }

    /// Lets the load (this one and any later one through this gate) go on.
    pub fn open(&self) {
        if let Some(g) = &self.gate {
            g.open.send_replace(true);
        }
    }

    /// Waits until a load has read every file and stands at the gate (at once without one).
    pub async fn reached(&self) {
        if let Some(g) = &self.gate {
            let mut rx = g.reached.subscribe();
            // The sender lives in `g`, which we hold: the channel cannot close.
            let _ = rx.wait_for(|r| *r).await;
        }
    }

    /// The load's side: says it is here, and waits to be let through.
    async fn pass(&self) {
        if let Some(g) = &self.gate {
            g.reached.send_replace(true);
            let mut rx = g.open.subscribe();
            let _ = rx.wait_for(|o| *o).await;
        }
    }
}

/// The tag records (each (tag, Accept class) resolved to the newest record's manifest) and
/// the links on disk (blocking).
pub(super) fn read_roots(store: &DiskStore) -> std::io::Result<(Vec<DiskTag>, Vec<Link>)> {
    let mut tags = store.list_tags()?;
    // Oldest first, so that where records of earlier versions (keyed by the raw Accept set)
    // fall into one class, the newest answer is the one kept.
    tags.sort_by_key(|r| r.fetched_at_ms);
    let mut slots: BTreeMap<(RepoKey, String, String), Digest> = BTreeMap::new();
    for r in tags {
        if let Some(d) = r.digest() {
            let class = AcceptClass::from_key(&r.accept).key();
            let key = RepoKey {
                registry: r.registry,
                repository: r.repository,
            };
            slots.insert((key, r.tag, class), d);
        }
    }
    let tags = slots
        .into_iter()
        .map(|((key, tag, class), d)| (key, tag, class, d))
        .collect();
    let links = store
        .list_links()?
        .into_iter()
        .map(|(registry, repository, d)| {
            (
                RepoKey {
                    registry,
                    repository,
                },
                d,
            )
        })
        .collect();
    Ok((tags, links))
}

/// Writes the links decided at the end of the load (blocking). A failure is logged: a lost
/// link only means a repository purge or pin does not see that manifest until it is pulled
/// again.
pub(super) fn write_links(store: &DiskStore, links: &[Link]) {
    for (key, d) in links {
        if let Err(e) = store.write_link(&key.registry, &key.repository, d) {
            tracing::warn!(repository = %key, digest = %d, error = %e, "could not record the manifest's repository");
        }
    }
}

/// Loads `index` (made by [`RefIndex::loading`]) from `store` while the server serves, and
/// says how it ended in its `LoadState`. The store (and with it the data directory's lock) is
/// let go of before that, so a shutdown that waits for [`RefIndex::settled`] can restart the
/// cache in the same process.
pub async fn load_in_background(index: Arc<RefIndex>, store: Arc<DiskStore>, gate: LoadGate) {
    let started = std::time::Instant::now();
    let state = match load(&index, store, &gate).await {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(
                error = %e,
                "indexing the cached manifests failed: no eviction and no purge by repository \
                 or tag until a restart rebuilds the index"
            );
            LoadState::Incomplete(format!("reading the data directory failed: {e}"))
        }
    };
    let (manifests, tags, links) = index.counts();
    match &state {
        LoadState::Loaded => {
            tracing::info!(manifests, tags, links, elapsed = ?started.elapsed(), "reference index built")
        }
        _ => tracing::info!(manifests, tags, links, "reference index not completed"),
    }
    index.set_state(state);
}

async fn load(
    index: &Arc<RefIndex>,
    store: Arc<DiskStore>,
    gate: &LoadGate,
) -> anyhow::Result<LoadState> {
    let stopped = || LoadState::Incomplete("stopped by a shutdown".into());
    let roots = {
        let (index, store) = (index.clone(), store.clone());
        tokio::task::spawn_blocking(move || {
            index.merge_manifests_from(&store)?;
            if index.stop_token().is_cancelled() {
                return Ok(None);
            }
            read_roots(&store).map(Some)
        })
        .await??
    };
    let Some((tags, links)) = roots else {
        return Ok(stopped());
    };
    tokio::select! {
        () = gate.pass() => {}
        () = index.stop_token().cancelled() => return Ok(stopped()),
    }
    // Merging the roots walks the graph for each held link only: quick, but under the index's
    // lock, so off the async workers all the same.
    let to_write = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || {
            let to_write = index.finish_load(tags, links);
            write_links(&store, &to_write);
            to_write.len()
        })
        .await?
    };
    if to_write > 0 {
        tracing::debug!(
            links = to_write,
            "linked manifests pulled while the index loaded"
        );
    }
    Ok(LoadState::Loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_load_ends_at_a_shutdown_and_lets_go_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path()).unwrap());
        let index = Arc::new(RefIndex::loading());
        let gate = LoadGate::closed();
        let task = tokio::spawn(load_in_background(
            index.clone(),
            store.clone(),
            gate.clone(),
        ));
        gate.reached().await;
        assert_eq!(index.load_state(), LoadState::Loading);
        index.stop_loading();
        task.await.unwrap();
        index.settled().await;
        assert!(matches!(index.load_state(), LoadState::Incomplete(_)));
        assert!(index.loaded().await.is_err());
        assert_eq!(
            Arc::strong_count(&store),
            1,
            "the loader let go of the store"
        );
    }

    #[tokio::test]
    async fn an_opened_gate_lets_the_load_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path()).unwrap());
        store
            .write_link("docker.io", "team/x", &Digest::of(b"m"))
            .unwrap();
        let index = Arc::new(RefIndex::loading());
        let gate = LoadGate::closed();
        let task = tokio::spawn(load_in_background(index.clone(), store, gate.clone()));
        gate.reached().await;
        assert_eq!(index.counts().2, 0, "the roots wait at the gate");
        gate.open();
        index.loaded().await.unwrap();
        task.await.unwrap();
        assert_eq!(index.counts().2, 1);
    }
}
