//! Tag answers: tag → digest (and the facts a HEAD needs), kept per (registry, repository,
//! tag, Accept class) in memory and on disk (`storage::tags`), so they survive restarts.
//! The Accept class (`media_types::AcceptClass`) is the set of known manifest types the client
//! accepts, never the raw header: a client cannot make a new key by sending a new header, so a
//! tag has a handful of answers at most.
//!
//! Architecture invariants:
//! - Answers follow the route's freshness policy (`cache::freshness`): fresh within their TTL,
//!   then served while refreshed in the background, then served only if every upstream fails
//!   (stale-if-error); revalidation is a HEAD.
//! - Only the route's `tags_from` upstreams are asked (`Want::Tags`).
//! - "Not found" is remembered for `cache.negative_ttl` (memory only), never served stale.
//! - In offline mode no upstream is contacted: tags as last recorded (any age, any Accept class
//!   whose media type the client accepts).
//! - Concurrent refreshes of one answer share one upstream request (`SingleFlight`). Errors
//!   are not cached.

use std::sync::Arc;
use std::time::SystemTime;

use super::{Inner, ManifestInfo, offline_miss};
use crate::cache::blocking;
use crate::cache::refs::{MetaKey, RepoKey, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, Tag, media_types};
use crate::policy::freshness::Freshness;
use crate::storage::TagRecord;
use crate::storage::tags::millis_since_epoch;
use crate::upstream::{Route, Upstream, Walk, Want};

/// A remembered tag answer: what it resolved to (`None`: not found), and when.
#[derive(Clone, Debug)]
pub(super) struct TagAnswer {
    info: Option<ManifestInfo>,
    fetched: SystemTime,
}

#[derive(Clone, Hash, PartialEq, Eq)]
pub(super) struct TagKey {
    /// The same repository name means different images on different registries.
    registry: String,
    name: RepoName,
    tag: Tag,
    /// `AcceptClass::key` of the request's Accept set.
    accept: String,
}

impl Inner {
    /// Tag → digest (and the facts a HEAD needs), by the freshness policy: from memory or disk
    /// while fresh, else from the route's tag upstreams in order. `accept` is an Accept class's
    /// media types (`ManifestCache` narrows the client's set to one), which is also what
    /// upstreams are sent: every client of a class gets the answer the upstream gives the class.
    pub(super) async fn resolve_tag(
        self: &Arc<Self>,
        route: &Arc<Route>,
        name: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        let key = TagKey {
            registry: route.registry.clone(),
            name: name.clone(),
            tag: tag.clone(),
            accept: media_types::AcceptClass::of(accept).key(),
        };
        self.meta.used(&MetaKey::Tag(
            RepoKey {
                registry: key.registry.clone(),
                repository: key.name.to_string(),
            },
            key.tag.to_string(),
        ));
        let known = self.remembered(&key).await;
        if self.offline {
            return self.resolve_offline(&key, known, accept).await;
        }
        if let Some(answer) = &known {
            let age = self.clock.age(answer.fetched);
            match &answer.info {
                None if route.freshness.negative_is_fresh(age) => {
                    return Err(Error::new(
                        ErrorKind::ManifestUnknown,
                        format!(
                            "manifest {name}:{tag} is unknown upstream (remembered for cache.negative_ttl)"
                        ),
                    ));
                }
                None => {}
                Some(info) => match route.freshness.classify(tag.as_str(), age) {
                    Freshness::Fresh => return Ok(info.clone()),
                    Freshness::StaleRevalidate => {
                        let this = self.clone();
                        let (route, name, tag, accept) =
                            (route.clone(), name.clone(), tag.clone(), accept.to_vec());
                        let key = key.clone();
                        tokio::spawn(async move {
                            if let Err(e) = this.refresh(&key, &route, &name, &tag, &accept).await {
                                tracing::info!(%name, %tag, error = %e, "background tag refresh failed");
                            }
                        });
                        return Ok(info.clone());
                    }
                    Freshness::StaleIfError | Freshness::Expired => {}
                },
            }
        }
        match self.refresh(&key, route, name, tag, accept).await {
            Ok(info) => Ok(info),
            Err(e) if e.is_upstream_failure() => {
                let stale = known.and_then(|a| {
                    let age = self.clock.age(a.fetched);
                    let info = a.info?;
                    (route.freshness.classify(tag.as_str(), age) != Freshness::Expired)
                        .then_some(info)
                });
                match stale {
                    Some(info) => {
                        tracing::warn!(%name, %tag, digest = %info.digest, error = %e, "every upstream failed: serving the last known answer (stale-if-error)");
                        Ok(ManifestInfo {
                            stale: true,
                            ..info
                        })
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The remembered answer for a key: memory, else the disk record.
    async fn remembered(&self, key: &TagKey) -> Option<TagAnswer> {
        if let Some(a) = self.tags.get(key).await {
            return Some(a);
        }
        let store = self.store.clone();
        let k = key.clone();
        let record = blocking(
            move || store.read_tag(&k.registry, k.name.as_str(), k.tag.as_str(), &k.accept),
            "reading a tag record",
        )
        .await
        .ok()
        .flatten()?;
        let answer = answer_from_record(&record)?;
        self.tags.insert(key.clone(), answer.clone()).await;
        Some(answer)
    }

    /// Offline: the recorded answer for this Accept class, else one recorded for another client
    /// whose media type this client accepts.
    async fn resolve_offline(
        &self,
        key: &TagKey,
        known: Option<TagAnswer>,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        if let Some(info) = known.and_then(|a| a.info) {
            return Ok(info);
        }
        let store = self.store.clone();
        let k = key.clone();
        let records = blocking(
            move || store.read_tag_any(&k.registry, k.name.as_str(), k.tag.as_str()),
            "reading tag records",
        )
        .await?;
        let acceptable =
            |mt: &str| accept.is_empty() || accept.iter().any(|a| a.eq_ignore_ascii_case(mt));
        records
            .iter()
            .filter(|r| acceptable(&r.media_type))
            .max_by_key(|r| r.fetched_at_ms)
            .and_then(answer_from_record)
            .and_then(|a| a.info)
            .ok_or_else(|| offline_miss(format!("manifest {}:{}", key.name, key.tag)))
    }

    /// Asks the route's tag upstreams (one request per key at a time) and remembers the
    /// answer: positive in memory and on disk, "not found" in memory for `negative_ttl`.
    async fn refresh(
        &self,
        key: &TagKey,
        route: &Route,
        name: &RepoName,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestInfo> {
        self.refreshing
            .run(key, async {
                let what = format!("manifest {name}:{tag}");
                let result = Walk::new(route, Want::Tags)
                    .first_success(&what, |upstream| {
                        self.resolve_tag_on(route, upstream, name, tag, accept)
                    })
                    .await;
                let now = self.clock.wall_now();
                match &result {
                    Ok(info) => {
                        let answer = TagAnswer {
                            info: Some(info.clone()),
                            fetched: now,
                        };
                        self.tags.insert(key.clone(), answer).await;
                        let record = TagRecord {
                            registry: key.registry.clone(),
                            repository: key.name.to_string(),
                            tag: key.tag.to_string(),
                            accept: key.accept.clone(),
                            digest: info.digest.to_string(),
                            media_type: info.media_type.clone(),
                            size: info.size,
                            fetched_at_ms: millis_since_epoch(now),
                        };
                        let store = self.store.clone();
                        match blocking(move || store.write_tag(&record), "recording a tag").await
                        {
                            Ok(written) => {
                                let repo = RepoKey {
                                    registry: key.registry.clone(),
                                    repository: key.name.to_string(),
                                };
                                self.meta.written(
                                    MetaKey::Tag(repo.clone(), key.tag.to_string()),
                                    written.size,
                                    written.replaced,
                                );
                                // A pass choosing now must not take the manifest it names.
                                self.meta.used(&MetaKey::Manifest(info.digest.clone()));
                                self.index.tag_recorded(
                                    repo,
                                    key.tag.as_str(),
                                    &key.accept,
                                    &info.digest,
                                );
                            }
                            Err(e) => {
                                tracing::warn!(%name, %tag, error = %e, "could not record tag on disk")
                            }
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind,
                            ErrorKind::ManifestUnknown | ErrorKind::NameUnknown
                        ) =>
                    {
                        let answer = TagAnswer {
                            info: None,
                            fetched: now,
                        };
                        self.tags.insert(key.clone(), answer).await;
                    }
                    Err(_) => {}
                }
                result
            })
            .await
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
                    if let Some(m) = self.read_from_disk(&digest).await {
                        return Ok(m.info());
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
                            stale: false,
                        });
                    }
                    return Ok(self
                        .by_digest(route, name, &digest, accept, false)
                        .await?
                        .info());
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

    /// Drops the remembered answers of the tags a purge of `target` removed, so the next pull
    /// asks the upstream.
    pub(super) async fn forget_tags(&self, target: &Target) {
        let stale: Vec<TagKey> = self
            .tags
            .iter()
            .map(|(k, _)| k)
            .filter(|k| {
                let key = RepoKey {
                    registry: k.registry.clone(),
                    repository: k.name.to_string(),
                };
                match target {
                    Target::Repository(r) => *r == key,
                    Target::Tag(r, t) => *r == key && k.tag.as_str() == t,
                }
            })
            .map(|k| (*k).clone())
            .collect();
        for k in stale {
            self.tags.invalidate(&k).await;
        }
    }
}

fn answer_from_record(r: &TagRecord) -> Option<TagAnswer> {
    Some(TagAnswer {
        info: Some(ManifestInfo {
            digest: r.digest()?,
            media_type: r.media_type.clone(),
            size: r.size,
            stale: false,
        }),
        fetched: r.fetched_at(),
    })
}
