//! The reference index: the graph behind a lock, rebuilt from the files at start and kept
//! current as manifests are stored and tags and links recorded.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::graph::{Graph, Pinned, PurgePlan, RepoKey, Target};
use super::trim::{MetaItem, MetaKey, TrimGroup};
use crate::oci::Digest;
use crate::oci::media_types::AcceptClass;
use crate::oci::references::{self, References};
use crate::policy::pins::Pin;
use crate::storage::DiskStore;
use crate::sync::Locked;

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
    /// Taken with `Locked`. The graph is maps of owned values, each changed by one insert or
    /// removal; only a purge's `apply` makes several, and a panic part-way through it would
    /// leave some of the purged roots in the index: they keep their blobs until the next purge
    /// or restart, which is what a purge that had not run would do.
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
        // Oldest first, so that where records of earlier versions (keyed by the raw Accept
        // set) fall into one class, the newest answer is the one indexed.
        let mut tags = store.list_tags()?;
        tags.sort_by_key(|r| r.fetched_at_ms);
        for r in tags {
            if let Some(d) = r.digest() {
                let key = RepoKey {
                    registry: r.registry,
                    repository: r.repository,
                };
                let class = AcceptClass::from_key(&r.accept).key();
                g.set_tag(key, &r.tag, &class, d);
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
        self.graph.locked()
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

    /// Would a manifest pulled from `key` by digest need a link (no link or tag of the
    /// repository reaches it)?
    pub fn needs_link(&self, key: &RepoKey, digest: &Digest) -> bool {
        self.graph().needs_link(key, digest)
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

    /// What the metadata budget removes to get from `total` to `target` (see `trim`). Runs
    /// under the index's lock: call it on the blocking pool.
    pub fn plan_trim(
        &self,
        items: &[MetaItem],
        pins: &[Pin],
        total: u64,
        target: u64,
    ) -> Vec<TrimGroup> {
        self.graph().plan_trim(items, pins, total, target)
    }

    /// Takes what the metadata budget removed from disk out of the index.
    pub fn trimmed(&self, keys: &[MetaKey]) {
        self.graph().remove_trimmed(keys);
    }

    /// (manifests, tags, links) in the index, for stats.
    pub fn counts(&self) -> (usize, usize, usize) {
        let g = self.graph();
        let (t, l) = g.root_counts();
        (g.manifest_count(), t, l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StoredManifest, TagRecord};

    #[test]
    fn records_of_earlier_versions_fall_into_their_class_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let (old, new) = (&b"{\"a\":1}"[..], &b"{\"a\":2}"[..]);
        for bytes in [old, new] {
            let m = StoredManifest {
                media_type: crate::oci::media_types::OCI_MANIFEST.into(),
                bytes: bytes::Bytes::copy_from_slice(bytes),
            };
            store.write_manifest(&Digest::of(bytes), &m).unwrap();
        }
        // Earlier versions keyed records by the raw Accept set: two clients that differ only
        // in a type cistern does not know made two records. The newer one is written first.
        let record = |accept: &str, bytes: &[u8], at: u64| TagRecord {
            registry: "docker.io".into(),
            repository: "library/app".into(),
            tag: "1".into(),
            accept: accept.into(),
            digest: Digest::of(bytes).to_string(),
            media_type: crate::oci::media_types::OCI_MANIFEST.into(),
            size: bytes.len() as u64,
            fetched_at_ms: at,
        };
        let oci = crate::oci::media_types::OCI_MANIFEST;
        store
            .write_tag(&record(&format!("{oci},y/junk"), new, 2))
            .unwrap();
        store
            .write_tag(&record(&format!("{oci},x/junk"), old, 1))
            .unwrap();
        let index = RefIndex::load(&store).unwrap();
        let key = RepoKey {
            registry: "docker.io".into(),
            repository: "library/app".into(),
        };
        let plan = index.plan_purge(&Target::Tag(key, "1".into()), &[]);
        // One answer for the class, the newest: the older manifest is no longer a tag's.
        assert_eq!(plan.remove_manifests, vec![Digest::of(new)]);
    }
}
