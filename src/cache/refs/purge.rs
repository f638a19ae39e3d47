//! Carrying a purge plan out on disk, and what it removed and kept.

use super::graph::PurgePlan;
use crate::storage::DiskStore;

/// What a purge removed and kept, for the admin answer.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PurgeReport {
    pub tags: usize,
    pub links: usize,
    pub removed: Amounts,
    pub kept: Amounts,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Amounts {
    pub manifests: usize,
    pub manifest_bytes: u64,
    pub blobs: usize,
    pub blob_bytes: u64,
}

/// Carries out a purge plan on disk (blocking): roots first, then manifests, then blobs, and
/// measures what was removed and kept.
pub fn execute(store: &DiskStore, plan: &PurgePlan) -> std::io::Result<PurgeReport> {
    let mut report = PurgeReport {
        tags: plan.tags.len(),
        links: plan.links.len(),
        ..PurgeReport::default()
    };
    for (key, tag) in &plan.tags {
        store.remove_tag(&key.registry, &key.repository, tag)?;
    }
    for (key, d) in &plan.links {
        store.remove_link(&key.registry, &key.repository, d)?;
    }
    for d in &plan.remove_manifests {
        if let Some(size) = store.manifest_file_size(d)? {
            store.remove_manifest(d)?;
            report.removed.manifests += 1;
            report.removed.manifest_bytes += size;
        }
    }
    for d in &plan.keep_manifests {
        if let Some(size) = store.manifest_file_size(d)? {
            report.kept.manifests += 1;
            report.kept.manifest_bytes += size;
        }
    }
    for d in &plan.remove_blobs {
        if let Some(size) = store.blob_size(d)? {
            store.remove_blob(d)?;
            report.removed.blobs += 1;
            report.removed.blob_bytes += size;
        }
    }
    for d in &plan.keep_blobs {
        if let Some(size) = store.blob_size(d)? {
            report.kept.blobs += 1;
            report.kept.blob_bytes += size;
        }
    }
    Ok(report)
}
