//! Links: the repository a manifest pulled by digest belongs to, when none of that
//! repository's tags reaches it (`storage::links` on disk, roots of `cache::refs`).
//!
//! Architecture invariants:
//! - A link is written only for a repository an upstream confirmed holds the manifest: when
//!   it was fetched from an upstream for that repository, or, for a cache hit under a
//!   repository whose roots do not reach it, once an upstream HEAD of it by digest in that
//!   repository answered. A client naming made-up repositories cannot make links or index
//!   roots: they are bounded by what exists upstream.
//! - Whether a repository's roots reach a manifest is decided on the whole reference graph:
//!   while it loads at start, a check waits for it before asking upstream, and a link claimed
//!   meanwhile is held by the index and written when the load ends, if still needed.
//! - Confirmations run in the background, off the client's path, at most `MAX_CHECKS` at a
//!   time and one per (repository, manifest); a hit that finds them all busy is not linked,
//!   and a later pull tries again. A check that fails or finds nothing links nothing. Offline,
//!   nothing can be confirmed, so cache hits are not linked.
//!
//! Why confirm instead of never linking a cache hit: a deployment that pulls
//! `app@sha256:…` after `app`'s tag moved on, or the same image under a second repository,
//! must still belong to that repository for its pins and purges. The HEAD is cheap (not a pull
//! on Docker Hub) and happens once per (repository, manifest) that really exists.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use super::Inner;
use crate::cache::blocking;
use crate::cache::refs::{MetaKey, RepoKey};
use crate::oci::{Digest, Reference, RepoName};
use crate::upstream::{Route, Walk, Want};

/// Confirmations in flight at most: a flood of pulls under made-up names keeps at most this
/// many upstream HEADs running.
const MAX_CHECKS: usize = 8;

/// The (repository, manifest) pairs whose confirmation is running.
#[derive(Default)]
pub(super) struct LinkChecks {
    running: Mutex<HashSet<(RepoKey, Digest)>>,
}

/// A running confirmation's claim; dropping it (when the check ends, or its task is dropped)
/// frees the slot.
struct Claim {
    inner: Arc<Inner>,
    pair: (RepoKey, Digest),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.inner.link_checks.lock().remove(&self.pair);
    }
}

impl LinkChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(RepoKey, Digest)>> {
        // The set is only inserted into and removed from: a panic elsewhere cannot leave it
        // half-changed, so a poisoned lock's contents are still right.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims a check of `pair`, unless it is running already or too many are.
    fn claim(inner: &Arc<Inner>, pair: (RepoKey, Digest)) -> Option<Claim> {
        let mut running = inner.link_checks.lock();
        if running.len() >= MAX_CHECKS || !running.insert(pair.clone()) {
            return None;
        }
        Some(Claim {
            inner: inner.clone(),
            pair,
        })
    }
}

fn repo_key(route: &Route, name: &RepoName) -> RepoKey {
    RepoKey {
        registry: route.registry.clone(),
        repository: name.to_string(),
    }
}

impl Inner {
    /// A manifest was fetched from an upstream for `name` by digest: the upstream confirmed the
    /// repository holds it, so link it if no tag of the repository reaches it (so a repository
    /// purge or pin sees it). Written once per (repository, manifest); a failed write is
    /// logged, not fatal.
    pub(super) async fn link_fetched(&self, route: &Route, name: &RepoName, digest: &Digest) {
        let key = repo_key(route, name);
        if !self.index.claim_link(&key, digest) {
            return;
        }
        let store = self.store.clone();
        let (d, k) = (digest.clone(), key.clone());
        match blocking(
            move || store.write_link(&k.registry, &k.repository, &d),
            "linking a manifest to its repository",
        )
        .await
        {
            Ok(size) => {
                self.meta
                    .written(MetaKey::Link(key, digest.clone()), size, 0);
                // A pass choosing now must not take the manifest it names.
                self.meta.used(&MetaKey::Manifest(digest.clone()));
            }
            Err(e) => {
                tracing::warn!(%name, %digest, error = %e, "could not record the manifest's repository")
            }
        }
    }

    /// A manifest was served by digest from the cache under `name`. If the repository's roots
    /// do not reach it, ask the route's upstreams in the background whether the repository
    /// holds it, and link it only if one says so.
    pub(super) fn link_if_confirmed(
        self: &Arc<Self>,
        route: &Arc<Route>,
        name: &RepoName,
        digest: &Digest,
        accept: &[String],
    ) {
        let key = repo_key(route, name);
        // While the reference index loads, whether the repository's roots reach the manifest
        // is not known yet (`None`): the check decides once it is, before asking upstream.
        if self.offline || self.index.needs_link(&key, digest) == Some(false) {
            return;
        }
        let Some(claim) = LinkChecks::claim(self, (key.clone(), digest.clone())) else {
            tracing::debug!(%name, %digest, "too many link checks running; not linked this time");
            return;
        };
        let (this, route, name, digest, accept) = (
            self.clone(),
            route.clone(),
            name.clone(),
            digest.clone(),
            accept.to_vec(),
        );
        tokio::spawn(async move {
            let _claim = claim;
            if this.index.needs_link(&key, &digest).is_none() {
                // A load cut short (shutdown) decides nothing.
                if this.index.loaded().await.is_err()
                    || this.index.needs_link(&key, &digest) != Some(true)
                {
                    return;
                }
            }
            let reference = Reference::Digest(digest.clone());
            let what = format!("manifest {name}@{digest}");
            let found = Walk::new(&route, Want::ByDigest)
                .first_success(&what, |upstream| {
                    upstream.head_manifest(&name, &reference, &accept)
                })
                .await;
            match found {
                // A HEAD without a digest header answered for the digest we asked about.
                Ok(head) if head.digest.as_ref().is_none_or(|d| *d == digest) => {
                    this.link_fetched(&route, &name, &digest).await;
                }
                Ok(_) => {
                    tracing::debug!(%name, %digest, "upstream named another digest; not linked")
                }
                Err(e) => {
                    tracing::debug!(%name, %digest, error = %e, "not confirmed upstream; not linked")
                }
            }
        });
    }
}
