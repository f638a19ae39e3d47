//! Manifests: fetched whole (they are small and capped), verified, stored byte for byte, kept
//! in memory in front of the disk.
//!
//! Architecture invariants:
//! - A manifest is served with exactly the bytes the upstream sent; `Docker-Content-Digest` is
//!   the sha256 of those bytes. Nothing here parses and re-serializes a manifest.
//! - A manifest requested by digest is checked against that digest before it is stored or
//!   served. One requested by tag is stored under the digest of its bytes, and rejected if
//!   the upstream's `Docker-Content-Digest` disagrees.
//! - Tag → digest answers are trusted for `cache.tag_ttl`, then revalidated with a HEAD. They
//!   are kept per Accept set: the same tag can name different manifests for different sets.
//! - Concurrent requests for the same manifest or tag share one upstream request (moka's
//!   `try_get_with` runs one loader per key). Errors are not cached.

use std::sync::Arc;

use bytes::Bytes;

use super::fill::blocking;
use crate::config::CacheConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, Tag, media_types};
use crate::storage::{DiskStore, StoredManifest};
use crate::upstream::fallback::first_success;
use crate::upstream::{Route, Upstream};

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
}

impl Manifest {
    pub fn info(&self) -> ManifestInfo {
        ManifestInfo {
            digest: self.digest.clone(),
            media_type: self.media_type.clone(),
            size: self.bytes.len() as u64,
        }
    }
}

#[derive(Clone, Hash, PartialEq, Eq)]
struct TagKey {
    /// The same repository name means different images on different registries.
    registry: String,
    name: RepoName,
    tag: Tag,
    /// `api::headers::accept_key` of the request's Accept set.
    accept: String,
}

pub struct ManifestCache {
    store: Arc<DiskStore>,
    by_digest: moka::future::Cache<Digest, Arc<Manifest>>,
    tags: moka::future::Cache<TagKey, ManifestInfo>,
    max_size: u64,
}

impl ManifestCache {
    pub fn new(store: Arc<DiskStore>, config: &CacheConfig) -> Self {
        let by_digest = moka::future::Cache::builder()
            .max_capacity(config.manifest_memory.as_u64())
            .weigher(|_k: &Digest, m: &Arc<Manifest>| {
                u32::try_from(m.bytes.len() + m.media_type.len() + 128).unwrap_or(u32::MAX)
            })
            .build();
        let tags = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.tag_ttl)
            .build();
        ManifestCache {
            store,
            by_digest,
            tags,
            max_size: config.max_manifest_size.as_u64(),
        }
    }

    /// The manifest for a GET.
    pub async fn get(
        &self,
        route: &Route,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Arc<Manifest>> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self.resolve_tag(route, name, t, accept).await?.digest,
        };
        self.by_digest(route, name, &digest, accept).await
    }

    /// The facts for a HEAD. A tag whose upstream HEAD told us everything is answered without
    /// downloading the manifest (a HEAD does not count against Docker Hub's pull limit).
    pub async fn head(
        &self,
        route: &Route,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        match reference {
            Reference::Digest(d) => Ok(self.by_digest(route, name, d, accept).await?.info()),
            Reference::Tag(t) => self.resolve_tag(route, name, t, accept).await,
        }
    }

    async fn by_digest(
        &self,
        route: &Route,
        name: &RepoName,
        digest: &Digest,
        accept: &[String],
    ) -> Result<Arc<Manifest>> {
        self.by_digest
            .try_get_with(
                digest.clone(),
                self.load_by_digest(route, name, digest, accept),
            )
            .await
            .map_err(|e| (*e).clone())
    }

    /// From disk, else from the first upstream of the route that has it (verified, then
    /// stored). A mirror that sends the wrong bytes is passed over like one that lacks them.
    async fn load_by_digest(
        &self,
        route: &Route,
        name: &RepoName,
        digest: &Digest,
        accept: &[String],
    ) -> Result<Arc<Manifest>> {
        let store = self.store.clone();
        let d = digest.clone();
        match blocking(move || store.read_manifest(&d), "reading a cached manifest").await {
            Ok(Some(m)) => {
                return Ok(Arc::new(Manifest {
                    digest: digest.clone(),
                    media_type: m.media_type,
                    bytes: m.bytes,
                }));
            }
            Ok(None) => {}
            // A damaged file is refetched (and overwritten) rather than served or fatal.
            Err(e) => tracing::warn!(%digest, error = %e, "cached manifest unreadable; refetching"),
        }
        let reference = Reference::Digest(digest.clone());
        let what = format!("manifest {name}@{digest}");
        let (fetched, media_type) = first_success(&route.upstreams, &what, |upstream| {
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
        Ok(self
            .store_manifest(digest.clone(), media_type, fetched.bytes)
            .await)
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
        if let Err(e) = blocking(
            move || store.write_manifest(&d, &stored),
            "storing a manifest",
        )
        .await
        {
            tracing::warn!(%digest, error = %e, "could not cache manifest");
        }
        Arc::new(Manifest {
            digest,
            media_type,
            bytes,
        })
    }

    /// Tag → digest (and the facts a HEAD needs), from memory within the TTL, else from the
    /// route's tag upstreams, in order.
    async fn resolve_tag(
        &self,
        route: &Route,
        name: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        let key = TagKey {
            registry: route.registry.clone(),
            name: name.clone(),
            tag: tag.clone(),
            accept: crate::api::headers::accept_key(accept),
        };
        let what = format!("manifest {name}:{tag}");
        let resolve = first_success(&route.tag_upstreams, &what, |upstream| {
            self.resolve_tag_on(route, upstream, name, tag, accept)
        });
        self.tags
            .try_get_with(key, resolve)
            .await
            .map_err(|e| (*e).clone())
    }

    /// Resolves a tag on one upstream.
    async fn resolve_tag_on(
        &self,
        route: &Route,
        upstream: &Upstream,
        name: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        let reference = Reference::Tag(tag.clone());
        match upstream.head_manifest(name, &reference, accept).await {
            Ok(head) => {
                if let Some(digest) = head.digest {
                    // Do we hold that manifest already? Then no GET at all.
                    if let Some(m) = self.by_digest.get(&digest).await {
                        return Ok(m.info());
                    }
                    let store = self.store.clone();
                    let d = digest.clone();
                    if let Ok(Some(m)) =
                        blocking(move || store.read_manifest(&d), "reading a cached manifest").await
                    {
                        return Ok(ManifestInfo {
                            digest,
                            size: m.bytes.len() as u64,
                            media_type: m.media_type,
                        });
                    }
                    // The upstream's HEAD is complete: answer HEADs from it; a GET fetches the
                    // bytes by digest (verified) when it needs them.
                    if let (Some(ct), Some(size)) = (head.content_type.as_deref(), head.size)
                        && media_types::is_manifest_type(ct.split(';').next().unwrap_or("").trim())
                        && size <= self.max_size
                    {
                        return Ok(ManifestInfo {
                            digest,
                            media_type: media_types::manifest_media_type(Some(ct), b""),
                            size,
                        });
                    }
                    return Ok(self.by_digest(route, name, &digest, accept).await?.info());
                }
            }
            // Some registries answer HEAD badly (405, 400): a GET still works. A HEAD 404
            // has no body to say whether the tag or the whole repository is missing; the GET
            // tells. It costs one more request, and only for a tag that does not resolve.
            Err(e)
                if matches!(
                    e.kind,
                    ErrorKind::UpstreamInvalid
                        | ErrorKind::ManifestUnknown
                        | ErrorKind::NameUnknown
                ) =>
            {
                tracing::debug!(error = %e, "manifest HEAD failed; trying GET");
            }
            Err(e) => return Err(e),
        }
        // No digest from HEAD: GET by tag, and name it by the digest of its bytes.
        let fetched = upstream
            .get_manifest(name, &reference, accept, self.max_size)
            .await?;
        let digest = Digest::of(&fetched.bytes);
        if let Some(claimed) = &fetched.digest_header
            && *claimed != digest
        {
            return Err(Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "manifest {name}:{tag}: upstream {} claims digest {claimed} but sent content with digest {digest}",
                    upstream.name()
                ),
            ));
        }
        let media_type =
            media_types::manifest_media_type(fetched.content_type.as_deref(), &fetched.bytes);
        let m = self
            .store_manifest(digest.clone(), media_type, fetched.bytes)
            .await;
        self.by_digest.insert(digest, m.clone()).await;
        Ok(m.info())
    }
}
