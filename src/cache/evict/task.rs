//! The eviction task: off the request path, it runs a pass whenever one is wanted and removes
//! the chosen files on the blocking pool.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::usage::Usage;
use crate::storage::DiskStore;

/// Runs until `stop`: whenever the blobs pass the high watermark, removes the least recently
/// used down to the low watermark.
pub async fn run(usage: Arc<Usage>, store: Arc<DiskStore>, stop: CancellationToken) {
    // No pass until the start-up scan is merged: an index without the blobs not yet scanned
    // holds only the recently used ones (the ones LRU keeps) and too low a total. A wake-up
    // asked for meanwhile is kept by `Notify`, and the scan's end asks again if need be.
    tokio::select! {
        () = stop.cancelled() => return,
        () = usage.loaded() => {}
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = usage.pass_wanted() => {}
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
        // Counted as evicted even where a removal failed (logged above): the index let go of
        // them; a file left behind is found and indexed again at the next start.
        usage.count_evicted(count as u64, freed);
        tracing::info!(
            blobs = count,
            freed,
            total = usage.total(),
            "evicted least recently used blobs"
        );
    }
}
