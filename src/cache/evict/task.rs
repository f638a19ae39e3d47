//! The eviction task: off the request path, it runs a pass whenever one is wanted, choosing
//! the victims and removing their files on the blocking pool.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::usage::Usage;
use crate::storage::DiskStore;

/// Runs until `stop`: whenever the blobs pass the high watermark, removes the least recently
/// used down to the low watermark.
pub async fn run(usage: Arc<Usage>, store: Arc<DiskStore>, stop: CancellationToken) {
    // No pass until the start-up scan is merged: an index without the blobs not yet scanned
    // holds only the recently used ones (the ones LRU keeps) and too low a total. Nor until
    // the reference graph is loaded: the pinned set needs all of it. A wake-up asked for
    // meanwhile is kept by `Notify`, and the scan's end asks again if need be.
    tokio::select! {
        () = stop.cancelled() => return,
        () = usage.ready_to_evict() => {}
    }
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = usage.pass_wanted() => {}
        }
        // Choosing victims walks the reference index for the pinned set (under its mutex) and
        // copies the index: blocking work, so it runs on the blocking pool with the removals,
        // never on an async worker that serves requests.
        let pass = {
            let (usage, store) = (usage.clone(), store.clone());
            tokio::task::spawn_blocking(move || {
                let victims = usage.take_victims();
                for (digest, _) in &victims {
                    if let Err(e) = store.remove_blob(digest) {
                        tracing::warn!(%digest, error = %e, "could not evict blob");
                    }
                }
                (victims.len(), victims.iter().map(|(_, s)| s).sum::<u64>())
            })
            .await
        };
        let (count, freed) = match pass {
            Ok((0, _)) => continue,
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "eviction pass failed");
                continue;
            }
        };
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cache::evict::Budget;
    use crate::oci::Digest;

    /// A pass blocked on the pins (the reference index's mutex, a slow disk) must leave the
    /// runtime's workers free: on a one-thread runtime, other tasks still run meanwhile.
    #[test]
    fn a_pass_never_blocks_the_async_workers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open(dir.path()).unwrap());
        let usage = Usage::new(Some(Budget { high: 10, low: 5 }));
        usage.committed(&Digest::of(b"a"), 100); // over the budget: a pass is wanted
        let held = usage.hold_pins();
        let (tx, rx) = std::sync::mpsc::channel();
        let runtime = {
            let usage = usage.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let stop = CancellationToken::new();
                    tokio::spawn(run(usage, store, stop.clone()));
                    for _ in 0..10 {
                        tokio::task::yield_now().await;
                    }
                    let _ = tx.send(());
                    stop.cancel();
                });
            })
        };
        // A watchdog, not a timing: the runtime either gets on at once or never does.
        let went_on = rx.recv_timeout(Duration::from_secs(30)).is_ok();
        drop(held);
        runtime.join().unwrap();
        assert!(
            went_on,
            "the eviction pass blocked the runtime's only worker"
        );
    }
}
