//! The reference index: the graph behind a lock, rebuilt from the files at start and kept
//! current as manifests are stored and tags and links recorded.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::graph::{Graph, Pinned, PurgePlan, RepoKey, Target};
use crate::oci::Digest;
use crate::oci::references::{self, References};
use crate::policy::pins::Pin;
use crate::storage::DiskStore;

/// A manifest's references, or none (with a warning) if it cannot be read.
pub fn references_or_warn(digest: &Digest, bytes: &[u8]) -> References {
    references::parse(bytes).unwrap_or_else(|e| {
        tracing::warn!(%digest, error = %e, "manifest is not readable JSON: it references nothing");
        References::default()
    })
}

/// The index: the graph behind a lock, and a generation that moves whenever something is
/// added (so an eviction pass can tell that its pinned set may have grown).
#[derive(Default)]
pub struct RefIndex {
    graph: Mutex<Graph>,
    generation: AtomicU64,
}

impl RefIndex {
    /// Builds the index from the stored manifests, tag records and links (blocking: call it
    /// on the blocking pool). Unreadable manifests count as referencing nothing.
    pub fn load(store: &DiskStore) -> std::io::Result<RefIndex> {
        let mut g = Graph::default();
        for d in store.list_manifests()? {
            match store.read_manifest(&d) {
                Ok(Some(m)) => {
                    let refs = references_or_warn(&d, &m.bytes);
                    g.add_manifest(d, refs);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(digest = %d, error = %e, "stored manifest unreadable"),
            }
        }
        for r in store.list_tags()? {
            if let Some(d) = r.digest() {
                let key = RepoKey {
                    registry: r.registry,
                    repository: r.repository,
                };
                g.set_tag(key, &r.tag, &r.accept, d);
            }
        }
        for (registry, repository, d) in store.list_links()? {
            g.add_link(
                RepoKey {
                    registry,
                    repository,
                },
                d,
            );
        }
        Ok(RefIndex {
            graph: Mutex::new(g),
            generation: AtomicU64::new(0),
        })
    }

    fn graph(&self) -> std::sync::MutexGuard<'_, Graph> {
        self.graph.lock().expect("reference index poisoned")
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

    pub fn manifest_stored(&self, digest: &Digest, bytes: &[u8]) {
        let refs = references_or_warn(digest, bytes);
        let changed = self.graph().add_manifest(digest.clone(), refs);
        self.changed(changed);
    }

    pub fn tag_recorded(&self, key: RepoKey, tag: &str, accept: &str, digest: &Digest) {
        let changed = self.graph().set_tag(key, tag, accept, digest.clone());
        self.changed(changed);
    }

    /// A manifest was pulled from `key` by digest. True if the caller should write a link
    /// (it is in the index from now on, so concurrent pulls write it once).
    pub fn claim_link(&self, key: &RepoKey, digest: &Digest) -> bool {
        let mut g = self.graph();
        if !g.needs_link(key, digest) {
            return false;
        }
        g.add_link(key.clone(), digest.clone());
        drop(g);
        self.changed(true);
        true
    }

    pub fn manifest_purged(&self, digest: &Digest) {
        self.graph().remove_manifest(digest);
    }

    pub fn pinned(&self, pins: &[Pin]) -> Pinned {
        self.graph().pinned(pins)
    }

    pub fn plan_purge(&self, target: &Target, pins: &[Pin]) -> PurgePlan {
        self.graph().plan_purge(target, pins)
    }

    pub fn apply(&self, plan: &PurgePlan) {
        self.graph().apply(plan);
    }

    /// (manifests, tags, links) in the index, for stats.
    pub fn counts(&self) -> (usize, usize, usize) {
        let g = self.graph();
        let (t, l) = g.root_counts();
        (g.manifest_count(), t, l)
    }
}
