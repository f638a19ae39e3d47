//! Cache administration as a library service: stats, metrics, pins and purges.
//!
//! One [`Admin`] serves both the admin HTTP API of a running server (`server::admin`, which
//! only maps requests to these calls) and `cistern admin --data-dir` on a stopped cache (which
//! opens the same [`Cache`] and calls the same methods), so a purge or a pin does the same
//! thing either way and answers with the same JSON. [`remote`] is the CLI's client for a
//! running server's API.

mod op;
pub mod remote;

use std::sync::Arc;

pub use op::{Op, parse_digest, parse_pin, repository_target, tag_target};

use crate::api::metrics::Family;
use crate::cache::Cache;
use crate::cache::blocking;
use crate::cache::refs::{PurgeReport, Target};
use crate::error::Result;
use crate::oci::Digest;
use crate::policy::pins::Pin;
use crate::upstream::Upstream;

pub struct Admin {
    cache: Arc<Cache>,
    /// Pin changes and their `pins.json` writes happen one at a time.
    pin_writes: tokio::sync::Mutex<()>,
}

impl Admin {
    pub fn new(cache: Arc<Cache>) -> Admin {
        Admin {
            cache,
            pin_writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Carries out one operation and returns its JSON answer.
    pub async fn apply(&self, op: &Op) -> Result<serde_json::Value> {
        match op {
            Op::Stats => Ok(self.stats()),
            Op::Pins => Ok(self.pins()),
            Op::Pin(p) => self.set_pin(p.clone(), true).await,
            Op::Unpin(p) => self.set_pin(p.clone(), false).await,
            // Purges wait for the start-up loads (see cache::evict::usage and cache::refs):
            // they answer with, and leave, indexes that know every blob, manifest and root.
            // A load cut short by a shutdown makes them fail.
            Op::PurgeBlob(d) => {
                self.cache.loaded().await?;
                self.purge_blob(d).await
            }
            Op::PurgeManifest(d) => {
                self.cache.loaded().await?;
                self.purge_manifest(d).await
            }
            Op::Purge(t) => {
                self.cache.loaded().await?;
                self.purge(t).await
            }
        }
    }

    /// Size, entries, hit ratio, pins, indexed manifests, tags and links.
    pub fn stats(&self) -> serde_json::Value {
        let c = &self.cache;
        let (manifests, tags, links) = c.manifests.index().counts();
        let (hits, misses) = c.blobs.hit_counts();
        let ratio = if hits + misses == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!(hits as f64 / (hits + misses) as f64)
        };
        serde_json::json!({
            "blobs": c.usage.len(),
            "blob_bytes": c.usage.total(),
            "max_size": c.max_size,
            "manifests_in_memory": c.manifests.in_memory(),
            "blob_hits": hits,
            "blob_misses": misses,
            "hit_ratio": ratio,
            "fills_running": c.blobs.running_fills(),
            "pins": c.usage.pins().len(),
            "config_pins": c.usage.config_pins().len(),
            "manifests_indexed": manifests,
            "tags": tags,
            "links": links,
            // Start-up: `blobs` and `blob_bytes` count what is indexed so far; so do
            // `manifests_indexed`, `tags` and `links` while the reference index loads.
            "blob_index_loading": c.usage.is_loading(),
            "reference_index_loading": !c.manifests.index().is_loaded(),
            "blobs_scanned": c.usage.scanned(),
            "blob_index_bytes": c.usage.index_bytes(),
            // The metadata budget (cache.max_metadata_size): manifests, tag records, links.
            "metadata_bytes": c.metadata.total(),
            "metadata_high_watermark": c.metadata.budget().high,
            "metadata_evicted": c.metadata.evictions().0,
            "metadata_evicted_bytes": c.metadata.evictions().1,
        })
    }

    /// The pins made at run time and those from the config.
    pub fn pins(&self) -> serde_json::Value {
        let strings = |pins: Vec<Pin>| -> Vec<String> { pins.iter().map(Pin::to_string).collect() };
        serde_json::json!({
            "pins": strings(self.cache.usage.pins()),
            "config": strings(self.cache.usage.config_pins()),
        })
    }

    /// Adds (`on`) or removes a run-time pin and saves the pins to `pins.json`.
    pub async fn set_pin(&self, pin: Pin, on: bool) -> Result<serde_json::Value> {
        let _one_at_a_time = self.pin_writes.lock().await;
        let usage = &self.cache.usage;
        let changed = if on {
            usage.pin(&pin)
        } else {
            usage.unpin(&pin)
        };
        if changed {
            let store = self.cache.store.clone();
            let pins: Vec<String> = usage.pins().iter().map(Pin::to_string).collect();
            blocking(move || store.write_pins(&pins), "saving pins").await?;
            tracing::info!(%pin, pinned = on, "pins changed");
        }
        let mut answer = serde_json::Map::new();
        answer.insert("pattern".into(), pin.to_string().into());
        answer.insert("changed".into(), changed.into());
        if let Some(d) = pin.exact_digest() {
            answer.insert("digest".into(), d.to_string().into());
        }
        Ok(answer.into())
    }

    /// Removes one blob. A reader that has it open keeps reading; the next pull fetches it
    /// again.
    pub async fn purge_blob(&self, digest: &Digest) -> Result<serde_json::Value> {
        self.cache.blobs.purge(digest).await?;
        tracing::info!(%digest, "blob purged");
        Ok(serde_json::json!({ "purged": digest.to_string() }))
    }

    /// Removes one manifest.
    pub async fn purge_manifest(&self, digest: &Digest) -> Result<serde_json::Value> {
        self.cache.manifests.purge(digest).await?;
        tracing::info!(%digest, "manifest purged");
        Ok(serde_json::json!({ "purged": digest.to_string() }))
    }

    /// Purges a repository or a tag (see `cache::refs`: what another repository, tag or pin
    /// uses stays) and drops the removed blobs from the disk budget's index. A target with
    /// no records is a 404.
    pub async fn purge(&self, target: &Target) -> Result<serde_json::Value> {
        let c = &self.cache;
        let pins = c.usage.all_pins();
        let (plan, report) = c.manifests.purge_refs(target, &pins).await?;
        // The files are gone; the blob cache drops them from the disk budget's index and
        // stops a fill of one of them that is still running from committing it again.
        for d in &plan.remove_blobs {
            c.blobs.purged(d).await?;
        }
        tracing::info!(
            %target,
            manifests = report.removed.manifests,
            blobs = report.removed.blobs,
            bytes = report.removed.blob_bytes + report.removed.manifest_bytes,
            "purged"
        );
        Ok(purge_answer(target, &report))
    }

    /// Everything [`Admin::stats`] says, as Prometheus metrics, and each upstream's counters.
    pub fn metrics(&self, upstreams: &[Arc<Upstream>]) -> Vec<Family> {
        let c = &self.cache;
        let (manifests, tags, links) = c.manifests.index().counts();
        let (hits, misses) = c.blobs.hit_counts();
        let (evicted, evicted_bytes) = c.usage.evictions();
        let mut requests = Family::counter(
            "cistern_blob_requests_total",
            "Blob GETs by where the bytes came from: the disk cache (hit) or an upstream fill, started or joined (miss).",
        );
        requests.sample(vec![("result", "hit".into())], hits as f64);
        requests.sample(vec![("result", "miss".into())], misses as f64);
        let cold = &c.blobs.cold_ranges().counts;
        let load =
            |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed) as f64;
        let mut cold_ranges = Family::counter(
            "cistern_cold_ranges_total",
            "Ranges of blobs not verified yet, answered without waiting for the whole blob (cold_ranges = \"upstream\"), by how: a ranged upstream request (fetched), one shared with another range (joined), the blob's download so far (fill), or the download as it went on, past a bound (followed).",
        );
        for (how, n) in [
            ("fetched", &cold.fetched),
            ("joined", &cold.joined),
            ("fill", &cold.from_fill),
            ("followed", &cold.followed),
        ] {
            cold_ranges.sample(vec![("source", how.into())], load(n));
        }
        let zero_copy = Family::counter(
            "cistern_blob_bytes_sent_zero_copy_total",
            "Bytes of cached blobs sent to clients by sendfile from the cached file (plain HTTP/1 connections), without a copy through cistern's memory.",
        )
        .value(crate::storage::mapped::sent_bytes() as f64);
        let mut pins = Family::gauge(
            "cistern_pins",
            "Pin patterns: made at run time (admin API, pins.json) or in the config.",
        );
        pins.sample(
            vec![("source", "admin".into())],
            c.usage.pins().len() as f64,
        );
        pins.sample(
            vec![("source", "config".into())],
            c.usage.config_pins().len() as f64,
        );
        let mut families = vec![
            Family::gauge("cistern_cache_blobs", "Blobs in the disk cache.")
                .value(c.usage.len() as f64),
            Family::gauge(
                "cistern_cache_blob_bytes",
                "Bytes of blobs in the disk cache.",
            )
            .value(c.usage.total() as f64),
            requests,
            cold_ranges,
            zero_copy,
            Family::counter(
                "cistern_cold_range_fetches_unanswered_total",
                "Cold ranges fetched or joined that no upstream served (a 200 to the Range, errors): they followed the blob's download instead.",
            )
            .value(load(&cold.unanswered)),
            Family::counter(
                "cistern_cold_range_blobs_failed_verification_total",
                "Blobs whose download failed verification (wrong digest or size) after ranges of them had been served unverified.",
            )
            .value(load(&cold.failed_after_ranges)),
            Family::gauge("cistern_fills_running", "Blob downloads under way.")
                .value(c.blobs.running_fills() as f64),
            Family::counter(
                "cistern_evicted_blobs_total",
                "Blobs removed to keep the cache under its budget.",
            )
            .value(evicted as f64),
            Family::counter(
                "cistern_evicted_bytes_total",
                "Bytes of blobs removed to keep the cache under its budget.",
            )
            .value(evicted_bytes as f64),
            Family::gauge(
                "cistern_manifests",
                "Manifests in the disk cache (the reference index's count).",
            )
            .value(manifests as f64),
            Family::gauge(
                "cistern_manifests_in_memory",
                "Manifests kept in memory, in front of the disk.",
            )
            .value(c.manifests.in_memory() as f64),
            Family::gauge("cistern_tags", "Tag records on disk.").value(tags as f64),
            Family::gauge(
                "cistern_links",
                "Manifests recorded as pulled from a repository by digest.",
            )
            .value(links as f64),
            Family::gauge(
                "cistern_cache_metadata_bytes",
                "Bytes of manifests, tag records and links on disk (the metadata budget's count).",
            )
            .value(c.metadata.total() as f64),
            Family::gauge(
                "cistern_cache_metadata_high_watermark_bytes",
                "Where metadata eviction starts: cache.max_metadata_size times cache.high_watermark.",
            )
            .value(c.metadata.budget().high as f64),
            Family::counter(
                "cistern_evicted_metadata_total",
                "Manifests, tags and links removed to keep the metadata under its budget.",
            )
            .value(c.metadata.evictions().0 as f64),
            pins,
        ];
        if let Some(max) = c.max_size {
            families.push(
                Family::gauge(
                    "cistern_cache_max_size_bytes",
                    "The blob budget, cache.max_size.",
                )
                .value(max as f64),
            );
        }
        let mut up_requests = Family::counter(
            "cistern_upstream_requests_total",
            "Requests sent to each upstream.",
        );
        let mut up_failures = Family::counter(
            "cistern_upstream_failures_total",
            "Exchanges with each upstream that failed: connection errors, timeouts, 5xx, bodies cut off or not matching their digest.",
        );
        let mut up_skipped = Family::counter(
            "cistern_upstream_skipped_total",
            "Requests that passed an upstream over because its circuit was open.",
        );
        let mut up_bytes = Family::counter(
            "cistern_upstream_blob_bytes_total",
            "Blob bytes received from each upstream.",
        );
        let mut up_open = Family::gauge(
            "cistern_upstream_circuit_open",
            "1 while an upstream's circuit is open (requests skip it), else 0.",
        );
        for u in upstreams {
            let s = u.stats();
            let label = || vec![("upstream", u.name().to_string())];
            up_requests.sample(label(), s.requests as f64);
            up_failures.sample(label(), s.failures as f64);
            up_skipped.sample(label(), s.skipped as f64);
            up_bytes.sample(label(), s.blob_bytes as f64);
            up_open.sample(label(), u8::from(s.circuit_open));
        }
        families.extend([up_requests, up_failures, up_skipped, up_bytes, up_open]);
        families
    }
}

/// The JSON answer to a purge of a repository or tag.
fn purge_answer(target: &Target, report: &PurgeReport) -> serde_json::Value {
    // A struct serializes to an object; were it ever not one, the answer keeps only `purged`.
    let mut answer = match serde_json::to_value(report) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => serde_json::Map::new(),
    };
    answer.insert("purged".into(), target.to_string().into());
    answer.into()
}
