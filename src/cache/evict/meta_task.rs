//! The metadata budget's task: off the request path, whenever the metadata passes the high
//! watermark, it removes manifests, tag records and links (in `cache::refs::trim`'s order)
//! until under the low one. Choosing and removing run on the blocking pool; no lock is held
//! across a file removal.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::metadata::{MetaUsage, remove_files};
use super::usage::Usage;
use crate::cache::refs::RefIndex;
use crate::storage::DiskStore;

/// Runs until `stop`. `usage` gives the pins (config and run time).
pub async fn run_metadata(
    meta: Arc<MetaUsage>,
    index: Arc<RefIndex>,
    usage: Arc<Usage>,
    store: Arc<DiskStore>,
    stop: CancellationToken,
) {
    // No pass until the start-up count is merged (too low a total, entries missing) and the
    // reference graph is complete: on a partial graph every manifest would look unreferenced.
    // A graph whose load ended incomplete never allows a pass (until a restart rebuilds it).
    tokio::select! {
        () = stop.cancelled() => return,
        () = async {
            meta.loaded().await;
            if index.loaded().await.is_err() {
                std::future::pending::<()>().await;
            }
        } => {}
    }
    loop {
        let pass = {
            let (meta, index, usage, store) =
                (meta.clone(), index.clone(), usage.clone(), store.clone());
            tokio::task::spawn_blocking(move || trim_once(&meta, &index, &usage, &store)).await
        };
        match pass {
            Ok((0, _)) => {}
            Ok((count, freed)) => {
                meta.count_evicted(count, freed);
                tracing::info!(
                    items = count,
                    freed,
                    total = meta.total(),
                    "evicted metadata over cache.max_metadata_size"
                );
                // Still over because what was used during the pass stayed: pass again at
                // once (it is not in use any more, or it is the most recent now). A pass that
                // could remove nothing waits for the next write instead of spinning.
                if meta.over_high() {
                    continue;
                }
            }
            Err(e) => tracing::error!(error = %e, "metadata eviction pass failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = meta.pass_wanted() => {}
        }
    }
}

/// One pass (blocking): choose, then for each group remove its files (the root before the
/// manifests it freed, so a crash part-way leaves unreferenced manifests, never a root
/// promising a missing one) and take it out of the reference index at once, so the index
/// matches the disk after each removal. Returns (entries, bytes) removed.
pub fn trim_once(
    meta: &MetaUsage,
    index: &RefIndex,
    usage: &Usage,
    store: &DiskStore,
) -> (u64, u64) {
    if !index.is_loaded() {
        return (0, 0);
    }
    let groups = meta.take_victims(index, &usage.all_pins());
    let (mut count, mut bytes) = (0, 0);
    for group in &groups {
        for key in &group.keys {
            // A file left behind (logged) is counted again at the next start.
            if let Err(e) = remove_files(store, key) {
                tracing::warn!(?key, error = %e, "could not evict metadata");
            }
        }
        index.trimmed(&group.keys);
        count += group.keys.len() as u64;
        bytes += group.bytes;
    }
    (count, bytes)
}
