//! Manifests: fetched whole (they are small and capped), verified, stored byte for byte, kept
//! in memory in front of the disk; and tag answers (`tags`), which name them.
//!
//! Architecture invariants:
//! - A manifest is served with exactly the bytes the upstream sent; `Docker-Content-Digest` is
//!   the sha256 of those bytes. Nothing here parses and re-serializes a manifest.
//! - A manifest requested by digest is checked against that digest before it is stored or
//!   served. One requested by tag is stored under the digest of its bytes, and rejected if
//!   the upstream's `Docker-Content-Digest` disagrees.
//! - In offline mode no upstream is contacted: manifests and blobs from disk only (tags: see
//!   `tags`).
//! - Concurrent requests for the same manifest share one upstream request (moka's
//!   `try_get_with` by digest). Errors are not cached.
//! - The reference index (`cache::refs`) hears of every manifest stored, every tag recorded,
//!   and every manifest pulled by digest that none of its repository's tags reaches, once an
//!   upstream confirmed the repository holds it (it is then linked to the repository on disk,
//!   `storage::links`; see `links`).
//! - A purge by repository or tag drops the purged tags' answers from memory too, so the next
//!   pull asks the upstream.
//! - The metadata budget (`cache::evict::MetaUsage`) hears of every manifest, tag record and
//!   link written (with its bytes) and used, and of every purge; a manifest being read from
//!   disk is held from it. Answers in memory are not touched by its removals: a removed tag
//!   record or manifest is asked upstream again when memory no longer has it.

use std::sync::Arc;

use bytes::Bytes;

use super::blocking;
use super::evict::{Budget, MetaUsage};
use super::refs::{self, MetaKey, PurgePlan, PurgeReport, RefIndex, RepoKey, Target};
use super::singleflight::SingleFlight;
use crate::clock::Clock;
use crate::config::CacheConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, media_types};
use crate::policy::pins::Pin;
use crate::storage::{DiskStore, StoredManifest};
use crate::upstream::{Route, Walk, Want};

mod links;
mod tags;

use links::LinkChecks;
use tags::{TagAnswer, TagKey};

/// A verified manifest.
#[derive(Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a HEAD answers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestInfo {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Served from a stale tag answer because every upstream failed (stale-if-error).
    pub stale: bool,
}

impl Manifest {
    pub fn info(&self) -> ManifestInfo {
        ManifestInfo {
            digest: self.digest.clone(),
            media_type: self.media_type.clone(),
            size: self.bytes.len() as u64,
            stale: false,
        }
    }
}

pub struct ManifestCache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<DiskStore>,
    by_digest: moka::future::Cache<Digest, Arc<Manifest>>,
    /// Tag answers in memory; the disk has the positive ones too.
    tags: moka::future::Cache<TagKey, TagAnswer>,
    refreshing: SingleFlight<TagKey, Result<ManifestInfo>>,
    max_size: u64,
    offline: bool,
    /// What repositories, tags and manifests reference.
    index: Arc<RefIndex>,
    /// One purge at a time.
    purging: tokio::sync::Mutex<()>,
    /// Fetch times of tag answers, and their ages.
    clock: Clock,
    /// Running confirmations that a repository holds a manifest served from the cache.
    link_checks: LinkChecks,
    /// The metadata budget: hears of every manifest, tag record and link written or used.
    meta: Arc<MetaUsage>,
}

impl ManifestCache {
    /// A manifest cache with an empty reference index and metadata budget (benchmarks,
    /// tests).
    pub fn new(store: Arc<DiskStore>, config: &CacheConfig, offline: bool) -> Self {
        let max = config.max_metadata_size.as_u64();
        let meta = MetaUsage::new(
            Budget {
                high: max,
                low: max,
            },
            Clock::system(),
        );
        Self::with_index(
            store,
            config,
            offline,
            Arc::default(),
            meta,
            Clock::system(),
        )
    }

    /// A manifest cache that keeps `index` (built by `RefIndex::load`) and `meta` (the
    /// metadata budget) current, and dates tag answers by `clock`.
    pub fn with_index(
        store: Arc<DiskStore>,
        config: &CacheConfig,
        offline: bool,
        index: Arc<RefIndex>,
        meta: Arc<MetaUsage>,
        clock: Clock,
    ) -> Self {
        let by_digest = moka::future::Cache::builder()
            .max_capacity(config.manifest_memory.as_u64())
            .weigher(|_k: &Digest, m: &Arc<Manifest>| {
                u32::try_from(m.bytes.len() + m.media_type.len() + 128).unwrap_or(u32::MAX)
            })
            .build();
        // Bounded by count only: every answer carries its fetch time, and the route's policy
        // decides what an age means.
        let tags = moka::future::Cache::builder().max_capacity(100_000).build();
        ManifestCache {
            inner: Arc::new(Inner {
                store,
                by_digest,
                tags,
                refreshing: SingleFlight::default(),
                max_size: config.max_manifest_size.as_u64(),
                offline,
                index,
                purging: tokio::sync::Mutex::new(()),
                clock,
                link_checks: LinkChecks::default(),
                meta,
            }),
        }
    }

    pub fn index(&self) -> &Arc<RefIndex> {
        &self.inner.index
    }

    /// Removes a cached manifest from memory and disk (admin purge).
    pub async fn purge(&self, digest: &Digest) -> Result<()> {
        self.inner.by_digest.invalidate(digest).await;
        let store = self.inner.store.clone();
        let d = digest.clone();
        blocking(move || store.remove_manifest(&d), "removing a manifest").await?;
        self.inner.index.manifest_purged(digest);
        self.inner.meta.forget(&MetaKey::Manifest(digest.clone()));
        Ok(())
    }

    /// Purges a repository or a tag (see `cache::refs` for what goes and what stays): its
    /// records, then the manifests and blobs nothing else uses, on disk, in the index and in
    /// memory. Returns the plan (the caller drops the removed blobs from the blob index) and
    /// what it measured. A target with no records is `NAME_UNKNOWN` / `MANIFEST_UNKNOWN`.
    pub async fn purge_refs(
        &self,
        target: &Target,
        pins: &[Pin],
    ) -> Result<(PurgePlan, PurgeReport)> {
        let inner = &self.inner;
        // The plan needs every root and manifest: wait for the start-up load.
        inner.index.loaded().await?;
        let _one_at_a_time = inner.purging.lock().await;
        let plan = inner.index.plan_purge(target, pins);
        if !plan.found() {
            let kind = match target {
                Target::Repository(_) => ErrorKind::NameUnknown,
                Target::Tag(..) => ErrorKind::ManifestUnknown,
            };
            return Err(Error::new(
                kind,
                format!("{target}: nothing of it is cached"),
            ));
        }
        let store = inner.store.clone();
        let p = plan.clone();
        let report = blocking(move || refs::execute(&store, &p), "purging").await;
        // Whatever was removed before a failure is gone from disk: forget it either way.
        inner.index.apply(&plan);
        for (key, tag) in &plan.tags {
            inner.meta.forget(&MetaKey::Tag(key.clone(), tag.clone()));
        }
        for (key, d) in &plan.links {
            inner.meta.forget(&MetaKey::Link(key.clone(), d.clone()));
        }
        for d in &plan.remove_manifests {
            inner.meta.forget(&MetaKey::Manifest(d.clone()));
            inner.by_digest.invalidate(d).await;
        }
        inner.forget_tags(target).await;
        Ok((plan, report?))
    }

    /// Manifests held in memory (for stats).
    pub fn in_memory(&self) -> u64 {
        self.inner.by_digest.entry_count()
    }

    /// The manifest for a GET, and whether a stale tag answer named it (stale-if-error).
    pub async fn get(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<(Arc<Manifest>, bool)> {
        let inner = &self.inner;
        let accept = &known_types(accept);
        let (digest, stale) = match reference {
            Reference::Digest(d) => (d.clone(), false),
            Reference::Tag(t) => {
                let info = inner.resolve_tag(route, name, t, accept).await?;
                (info.digest, info.stale)
            }
        };
        let by_digest = matches!(reference, Reference::Digest(_));
        let m = inner
            .by_digest(route, name, &digest, accept, by_digest)
            .await?;
        inner.used(route, name, &digest, by_digest);
        if by_digest {
            inner.link_if_confirmed(route, name, &digest, accept);
        }
        Ok((m, stale))
    }

    /// The facts for a HEAD. A tag whose upstream HEAD told us everything is answered without
    /// downloading the manifest (a HEAD does not count against Docker Hub's pull limit).
    pub async fn head(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        let inner = &self.inner;
        let accept = &known_types(accept);
        match reference {
            Reference::Digest(d) => {
                let info = inner.by_digest(route, name, d, accept, true).await?.info();
                inner.used(route, name, d, true);
                inner.link_if_confirmed(route, name, d, accept);
                Ok(info)
            }
            Reference::Tag(t) => inner.resolve_tag(route, name, t, accept).await,
        }
    }
}

impl Inner {
    /// A manifest was served (by digest under `name`, or through a tag): it, and the link that
    /// names it in `name`, are the most recently used metadata now.
    fn used(&self, route: &Route, name: &RepoName, digest: &Digest, by_digest: bool) {
        self.meta.used(&MetaKey::Manifest(digest.clone()));
        if by_digest {
            let repo = RepoKey {
                registry: route.registry.clone(),
                repository: name.to_string(),
            };
            self.meta.used(&MetaKey::Link(repo, digest.clone()));
        }
    }

    /// The manifest, from memory, disk or upstream. `link`: the client asked for it by digest
    /// in `name`, so a fetch from upstream links it to that repository (`links`).
    async fn by_digest(
        &self,
        route: &Route,
        name: &RepoName,
        digest: &Digest,
        accept: &[String],
        link: bool,
    ) -> Result<Arc<Manifest>> {
        self.by_digest
            .try_get_with(
                digest.clone(),
                self.load_by_digest(route, name, digest, accept, link),
            )
            .await
            .map_err(|e| (*e).clone())
    }

    /// The manifest from disk, if cached there. A damaged file counts as absent (it is
    /// refetched and overwritten), never as content or a fatal error.
    async fn read_from_disk(&self, digest: &Digest) -> Option<Manifest> {
        // The metadata budget leaves a manifest alone while it is read.
        let _reading = self.meta.reading(digest);
        let store = self.store.clone();
        let d = digest.clone();
        match blocking(move || store.read_manifest(&d), "reading a cached manifest").await {
            Ok(found) => found.map(|m| Manifest {
                digest: digest.clone(),
                media_type: m.media_type,
                bytes: m.bytes,
            }),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cached manifest unreadable; refetching");
                None
            }
        }
    }

    /// From disk, else from the first upstream of the route that has it (verified, then
    /// stored). A mirror that sends the wrong bytes is passed over like one that lacks them.
    async fn load_by_digest(
        &self,
        route: &Route,
        name: &RepoName,
        digest: &Digest,
        accept: &[String],
        link: bool,
    ) -> Result<Arc<Manifest>> {
        if let Some(m) = self.read_from_disk(digest).await {
            return Ok(Arc::new(m));
        }
        if self.offline {
            return Err(offline_miss(format!("manifest {name}@{digest}")));
        }
        let reference = Reference::Digest(digest.clone());
        let what = format!("manifest {name}@{digest}");
        let walk = Walk::new(route, Want::ByDigest);
        let (fetched, media_type) = walk.first_success(&what, |upstream| {
            let reference = &reference;
            async move {
                let fetched = upstream
                    .get_manifest(name, reference, accept, self.max_size)
                    .await?;
                let actual = Digest::of(&fetched.bytes);
                if actual != *digest {
                    return Err(Error::new(
                        ErrorKind::UpstreamInvalid,
                        format!(
                            "manifest {name}@{digest}: upstream {} sent content with digest {actual}; discarded",
                            upstream.name()
                        ),
                    ));
                }
                let media_type = media_types::manifest_media_type(
                    fetched.content_type.as_deref(),
                    &fetched.bytes,
                );
                Ok((fetched, media_type))
            }
        })
        .await?;
        let m = self
            .store_manifest(digest.clone(), media_type, fetched.bytes)
            .await;
        if link {
            self.link_fetched(route, name, digest).await;
        }
        Ok(m)
    }

    /// Writes a verified manifest to disk and returns it. A failed write is logged, not
    /// fatal: the bytes are verified and can be served; they are just not cached.
    async fn store_manifest(
        &self,
        digest: Digest,
        media_type: String,
        bytes: Bytes,
    ) -> Arc<Manifest> {
        let store = self.store.clone();
        let stored = StoredManifest {
            media_type: media_type.clone(),
            bytes: bytes.clone(),
        };
        let d = digest.clone();
        match blocking(
            move || store.write_manifest(&d, &stored),
            "storing a manifest",
        )
        .await
        {
            Ok(()) => {
                // The file: the media type line and the bytes.
                let size = (media_type.len() + 1 + bytes.len()) as u64;
                self.meta
                    .written(MetaKey::Manifest(digest.clone()), size, 0);
                self.index.manifest_stored(&digest, &bytes);
            }
            Err(e) => tracing::warn!(%digest, error = %e, "could not cache manifest"),
        }
        Arc::new(Manifest {
            digest,
            media_type,
            bytes,
        })
    }
}

/// The media types of the client's Accept class (see `tags`): what cistern asks upstreams
/// for, so that every client of one class is answered alike.
fn known_types(accept: &[String]) -> Vec<String> {
    media_types::AcceptClass::of(accept).media_types()
}

fn offline_miss(what: String) -> Error {
    Error::new(
        ErrorKind::ManifestUnknown,
        format!("{what} is not in the cache, and this mirror is offline"),
    )
}
