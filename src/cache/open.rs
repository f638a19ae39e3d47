//! The cache as one value: the store, the disk budget's index, the reference index, the blob
//! cache and the manifest cache, opened together from a data directory.
//!
//! A running server and `cistern admin --data-dir` on a stopped cache open it the same way, so
//! an admin operation behaves the same whether or not a server is running.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::evict::{Budget, MetaUsage, Usage};
use super::fill_limit::FillLimits;
use super::refs::{self, LoadGate, RefIndex};
use super::{BlobCache, ManifestCache};
use crate::clock::Clock;
use crate::config::Config;
use crate::policy::pins::Pin;
use crate::storage::DiskStore;

/// Everything the cache holds, ready to serve.
pub struct Cache {
    pub store: Arc<DiskStore>,
    /// The disk budget: committed blobs, their readers, the pins.
    pub usage: Arc<Usage>,
    pub blobs: BlobCache,
    pub manifests: ManifestCache,
    /// `cache.max_size`, for stats.
    pub max_size: Option<u64>,
    /// The metadata budget (`cache.max_metadata_size`): stored manifests, tag records, links.
    pub metadata: Arc<MetaUsage>,
}

/// How fills run: on `fills`, cancelled only by `cancel_fills` (the end of a shutdown's grace
/// period), never by a request.
#[derive(Default)]
pub struct FillTasks {
    pub fills: TaskTracker,
    pub cancel_fills: CancellationToken,
}

impl Cache {
    /// Opens the cache at `config.data_dir` (taking its lock: one process per cache), reads
    /// the pins (`cache.pins` and `pins.json`), and starts indexing the committed blobs and
    /// the stored manifests, tag records and links in the background ([`Cache::loaded`] says
    /// when both are done). Blocking work runs on the blocking pool.
    pub async fn open(config: &Config, clock: Clock, tasks: FillTasks) -> anyhow::Result<Cache> {
        Cache::open_with_gate(config, clock, tasks, LoadGate::default()).await
    }

    /// [`Cache::open`], with the reference index's load held at `gate` until it is opened
    /// (tests make records during a load with it).
    pub async fn open_with_gate(
        config: &Config,
        clock: Clock,
        tasks: FillTasks,
        gate: LoadGate,
    ) -> anyhow::Result<Cache> {
        let data_dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || DiskStore::open(&data_dir))
            .await?
            .with_context(|| format!("opening the cache at {}", config.data_dir.display()))?;
        let store = Arc::new(store.with_clock(clock.clone()));

        let watermarks = |max: u64| {
            let max = max as f64;
            Budget {
                high: (max * config.cache.high_watermark) as u64,
                low: (max * config.cache.low_watermark) as u64,
            }
        };
        let budget = config.cache.max_size.map(|max| watermarks(max.as_u64()));
        let usage = Usage::with_clock(budget, clock.clone());
        usage.set_config_pins(config.cache.pin_patterns());
        {
            let store = store.clone();
            let pins = tokio::task::spawn_blocking(move || read_pins(&store))
                .await?
                .context("reading the pins")?;
            usage.set_pins(pins);
        }
        // The blob index is built in the background, as the server serves (see
        // cache::evict::usage for what waits for it: eviction and purges do, hits do not).
        usage.begin_loading();
        {
            let (usage, store) = (usage.clone(), store.clone());
            let started = std::time::Instant::now();
            tokio::task::spawn_blocking(move || {
                let result = usage.scan(&store);
                // The store (and with it the data directory's lock) is let go of before the
                // index says it is loaded: a shutdown waits for that, and a restart in the
                // same process then finds the lock free.
                drop(store);
                usage.finish_loading();
                match result {
                    Ok(()) => tracing::info!(
                        blobs = usage.len(),
                        bytes = usage.total(),
                        index_bytes = usage.index_bytes(),
                        elapsed = ?started.elapsed(),
                        "blob index built"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        blobs = usage.len(),
                        "indexing the cached blobs failed: blobs not scanned count against the \
                         budget only once read"
                    ),
                }
            });
        }
        // Which manifests each repository and tag names, and what each manifest references:
        // rebuilt from the files at every start (see cache::refs), in the background too.
        // Records made meanwhile go into it at once and win over the files the load reads;
        // what needs the whole graph waits for it (eviction, purges, link decisions).
        let index = Arc::new(RefIndex::loading());
        usage.attach_index(index.clone());
        let metadata = MetaUsage::new(
            watermarks(config.cache.max_metadata_size.as_u64()),
            clock.clone(),
        );
        count_metadata(&metadata, &store);
        tokio::spawn(refs::load_in_background(index.clone(), store.clone(), gate));

        Ok(Cache {
            blobs: BlobCache::new(
                store.clone(),
                usage.clone(),
                tasks.fills,
                tasks.cancel_fills,
                clock.clone(),
                FillLimits::new(config.cache.max_fills_per_client, config.cache.max_fills),
            ),
            manifests: ManifestCache::with_index(
                store.clone(),
                &config.cache,
                config.offline,
                index,
                metadata.clone(),
                clock,
            ),
            store,
            usage,
            max_size: config.cache.max_size.map(|m| m.as_u64()),
            metadata,
        })
    }
}

/// Starts counting the stored manifests, tag records and links for the metadata budget, in
/// the background (its eviction waits for the count; serving does not). Separate from the
/// reference index's load: it only stats manifests and reads the small records.
fn count_metadata(metadata: &Arc<MetaUsage>, store: &Arc<DiskStore>) {
    metadata.begin_loading();
    let (metadata, store) = (metadata.clone(), store.clone());
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let result = metadata.count(&store);
        // As for the blob index: the store (and the data directory's lock) goes before the
        // count says it is done, which is what a shutdown waits for.
        drop(store);
        metadata.finish_loading();
        match result {
            Ok(()) => {
                let (manifests, tags, links) = metadata.counts();
                tracing::info!(
                    manifests,
                    tags,
                    links,
                    bytes = metadata.total(),
                    elapsed = ?started.elapsed(),
                    "metadata counted"
                );
            }
            Err(e) => tracing::error!(
                error = %e,
                "counting the cached metadata failed: what was not counted joins as it is used"
            ),
        }
    });
}

impl Cache {
    /// Waits until the start-up indexes are complete: every committed blob, the metadata
    /// count, and the reference graph. An error if the reference index's load ended without completing
    /// (a shutdown, or a directory it could not read).
    pub async fn loaded(&self) -> crate::error::Result<()> {
        self.usage.loaded().await;
        self.metadata.loaded().await;
        self.manifests.index().loaded().await
    }

    /// Asks both start-up loads to stop early (shutdown).
    pub fn stop_loading(&self) {
        self.usage.stop_loading();
        self.manifests.index().stop_loading();
    }

    /// Waits until both start-up loads have ended, complete or not: they let go of the store
    /// (and the data directory's lock) before.
    pub async fn settled(&self) {
        self.usage.loaded().await;
        self.metadata.loaded().await;
        self.manifests.index().settled().await;
    }
}

/// The run-time pins in `pins.json`. Digests, as written by earlier versions, are pins too;
/// an entry that is not a pin pattern is an error, naming it.
pub fn read_pins(store: &DiskStore) -> std::io::Result<Vec<Pin>> {
    store
        .read_pins()?
        .iter()
        .map(|p| {
            Pin::parse(p).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("pins.json: {e}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pins_json_of_earlier_versions_reads_as_digest_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::DiskStore::open(dir.path()).unwrap();
        let d = crate::oci::Digest::of(b"layer");
        // What earlier versions wrote: a list of digests.
        std::fs::write(dir.path().join("pins.json"), format!("[\n  \"{d}\"\n]")).unwrap();
        let pins = super::read_pins(&store).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].exact_digest(), Some(d));
        // A pattern round-trips; an entry that is no pattern is an error naming the file.
        store
            .write_pins(&["docker.io/library/*:1.*".to_string()])
            .unwrap();
        assert_eq!(
            super::read_pins(&store).unwrap()[0].to_string(),
            "docker.io/library/*:1.*"
        );
        store.write_pins(&["alpine".to_string()]).unwrap();
        let e = super::read_pins(&store).unwrap_err();
        assert!(e.to_string().contains("pins.json"), "{e}");
    }
}
