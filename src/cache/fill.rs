//! One cache fill: download a blob from the upstream into a temporary file, hash it on the
//! way, and commit it once verified. Progress is published on a `watch` channel, which every
//! attached reader follows.
//!
//! Architecture invariants:
//! - The fill runs in its own task on the cache's `TaskTracker`, under a cancellation token
//!   derived from the server's, never from a request. No client can cancel it.
//! - The fill ends in exactly one of two named states, [`FillState::Complete`] or
//!   [`FillState::Failed`]. If the task dies some other way (a panic), [`FillGuard`]'s `Drop`
//!   publishes `Failed`, so readers never wait forever and never mistake a dead fill for a
//!   finished one.
//! - The temporary file is removed on every path except a successful commit (see
//!   `PartialBlob`'s `Drop`).

use std::fs::File;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, DigestVerifier, RepoName};
use crate::storage::{DiskStore, PartialBlob};
use crate::upstream::client::error_chain;
use crate::upstream::fallback::{Attempts, moves_on};
use crate::upstream::{BlobResponse, Route, Upstream};

/// Upstream chunks that are already waiting are written together, up to this many bytes, so a
/// fast upstream costs few trips to the blocking pool while a slow one still lands each chunk
/// as soon as it arrives.
const MAX_WRITE_BATCH: usize = 1 << 20;

/// Where a fill is. Cheap to clone (the file is shared).
#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are landing in the temporary file.
    Streaming {
        file: Arc<File>,
        /// From the upstream's `Content-Length`; `None` if it sent none (chunked).
        size: Option<u64>,
        /// Bytes written to `file` so far; readers may read below this offset.
        written: u64,
    },
    /// Verified and committed: `file` is the blob now visible in the cache.
    Complete { file: Arc<File>, size: u64 },
    /// The fill died; nothing was committed. Every reader fails with this error.
    Failed(Error),
}

impl FillState {
    pub fn is_final(&self) -> bool {
        matches!(self, FillState::Complete { .. } | FillState::Failed(_))
    }
}

/// Publishes a fill's states, and guarantees a final one.
pub struct FillGuard {
    tx: watch::Sender<FillState>,
    /// Runs when the fill is over, whatever the outcome (removes the fill from the map);
    /// always before the final state is published.
    on_end: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl FillGuard {
    pub fn new(tx: watch::Sender<FillState>, on_end: Box<dyn FnOnce() + Send + Sync>) -> FillGuard {
        FillGuard {
            tx,
            on_end: Some(on_end),
        }
    }

    fn publish(&self, state: FillState) {
        // `send_replace` never fails: the state is kept even while nobody is subscribed.
        self.tx.send_replace(state);
    }

    fn set_written(&self, n: u64) {
        self.tx.send_modify(|s| {
            if let FillState::Streaming { written, .. } = s {
                *written = n;
            }
        });
    }

    /// Ends the fill and publishes its outcome.
    ///
    /// The fill leaves the map *before* the final state is published: a client that saw the
    /// failure and retries must start a fresh fill, not join the dead one. (After a success
    /// the blob is already committed, so a request in between finds it on disk.)
    pub fn finish(mut self, outcome: Result<FillState>) {
        if let Some(f) = self.on_end.take() {
            f();
        }
        self.publish(outcome.unwrap_or_else(FillState::Failed));
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            // Dropped without `finish`: the task panicked or was aborted. A bug, but one that
            // must not leave readers hanging or let them see a short blob as complete.
            tracing::error!("cache fill ended without an outcome");
            f();
            self.publish(FillState::Failed(Error::internal(
                "the cache fill ended unexpectedly",
            )));
        }
    }
}

/// Downloads, verifies and commits one blob. Returns the final `Complete` state.
///
/// The route's upstreams are tried in order. If one fails after K bytes (cut off, stalled,
/// too long), the fill goes on from the next with `Range: bytes=K-` (or from 0, dropping the
/// first K bytes, if it ignores ranges): readers see one unbroken stream, and the digest,
/// computed over all of it, decides at the end. Each upstream is tried at most once per fill.
pub async fn run(
    guard: &FillGuard,
    store: &Arc<DiskStore>,
    route: &Route,
    bad_sources: &BadSources,
    name: &RepoName,
    digest: &Digest,
) -> Result<FillState> {
    let mut attempts = Attempts::default();
    let mut partial: Option<PartialBlob> = None;
    let mut size: Option<u64> = None;
    let mut verifier = DigestVerifier::new();
    let mut written: u64 = 0;
    // Upstreams whose bytes went into the file, to blame if the digest does not match.
    let mut sources: Vec<&Upstream> = Vec::new();
    let mut complete = false;

    // Upstreams that recently sent bad bytes for this digest go last: demoted, not dropped,
    // so a lone upstream whose corruption was passing is still retried.
    let (trusted, suspect): (Vec<_>, Vec<_>) = route
        .upstreams
        .iter()
        .partition(|u| !bad_sources.is_bad(digest, u));
    for upstream in trusted.into_iter().chain(suspect) {
        if !upstream.admit() {
            attempts.circuit_open(upstream);
            continue;
        }
        let resp = match upstream.get_blob(name, digest, written).await {
            Ok(r) => r,
            Err(e) if moves_on(&e) => {
                attempts.push(upstream, e);
                continue;
            }
            Err(e) => return Err(e),
        };
        if let (Some(known), Some(total)) = (size, resp.total)
            && known != total
        {
            let e = Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "blob {digest}: upstream {} says it is {total} bytes, an earlier one said {known}",
                    upstream.name()
                ),
            );
            attempts.push(upstream, e);
            continue;
        }
        if partial.is_none() {
            size = resp.total;
            let store = store.clone();
            let d = digest.clone();
            let p = blocking(
                move || store.create_partial(&d),
                "creating a temporary file",
            )
            .await?;
            guard.publish(FillState::Streaming {
                file: p.file.clone(),
                size,
                written: 0,
            });
            partial = Some(p);
        } else {
            tracing::info!(%digest, upstream = upstream.name(), resume_at = written, "resuming blob from the next upstream");
        }
        let file = partial.as_ref().expect("created above").file.clone();
        sources.push(upstream);
        match stream(
            guard,
            upstream,
            resp,
            &file,
            &mut verifier,
            &mut written,
            size,
            digest,
        )
        .await
        {
            Ok(()) => {
                complete = true;
                break;
            }
            Err(e) if moves_on(&e) => {
                upstream.record_failure(&e);
                attempts.push(upstream, e);
            }
            Err(e) => return Err(e),
        }
    }
    if !complete {
        return Err(attempts.into_error(&format!("blob {digest}")));
    }
    let partial = partial.expect("a complete fill has a file");
    // Readers keep using this handle; after the rename it is the committed blob.
    let file = partial.file.clone();

    if let Some(size) = size
        && written != size
    {
        return Err(Error::new(
            ErrorKind::UpstreamInvalid,
            format!("blob {digest}: upstream body ended after {written} of {size} bytes"),
        ));
    }
    let actual = verifier.finish();
    if actual != *digest {
        let names: Vec<&str> = sources.iter().map(|u| u.name()).collect();
        let e = Error::new(
            ErrorKind::UpstreamInvalid,
            format!(
                "blob {digest}: upstream {} sent content with digest {actual}; discarded",
                names.join(" + ")
            ),
        );
        // The clients attached to this fill already have the bad bytes and must fail. The next
        // fill tries these sources last for this digest, so the next pull gets good bytes from
        // another upstream instead of failing the same way forever.
        for u in &sources {
            u.record_failure(&e);
            bad_sources.mark(digest, u);
        }
        return Err(e);
    }
    {
        let store = store.clone();
        let digest = digest.clone();
        blocking(
            move || store.commit_blob(partial, &digest),
            "committing a blob",
        )
        .await?;
    }
    tracing::info!(%digest, %name, size = written, "blob cached");
    Ok(FillState::Complete {
        file,
        size: written,
    })
}

/// Streams one upstream response into the file, hashing as it goes. Returns when the body
/// ends; an error leaves `written` and `verifier` at the last byte that was written, so the
/// next upstream can resume there.
#[allow(clippy::too_many_arguments)]
async fn stream(
    guard: &FillGuard,
    upstream: &Upstream,
    resp: BlobResponse,
    file: &Arc<File>,
    verifier: &mut DigestVerifier,
    written: &mut u64,
    size: Option<u64>,
    digest: &Digest,
) -> Result<()> {
    let idle = upstream.idle_timeout();
    let mut skip = resp.skip;
    let _permit = resp.permit;
    let mut body = resp.body.bytes_stream();
    let mut received: u64 = 0;
    loop {
        let first = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "blob {digest}: upstream {} sent nothing for {idle:?} after {written} bytes",
                        upstream.name()
                    ),
                ));
            }
            Ok(None) => return Ok(()),
            Ok(Some(chunk)) => chunk.map_err(|e| body_error(upstream, digest, *written, &e))?,
        };
        let mut batch: Vec<Bytes> = vec![first];
        let mut ended = false;
        let mut batch_len = batch[0].len();
        while batch_len < MAX_WRITE_BATCH {
            match body.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    batch_len += chunk.len();
                    batch.push(chunk);
                }
                Some(Some(Err(e))) => {
                    return Err(body_error(upstream, digest, *written, &e));
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        received += batch_len as u64;
        // An upstream that ignored our Range resends bytes we already have: drop them.
        if skip > 0 {
            let mut kept = Vec::with_capacity(batch.len());
            for mut chunk in batch {
                if skip >= chunk.len() as u64 {
                    skip -= chunk.len() as u64;
                    continue;
                }
                let _ = chunk.split_to(skip as usize);
                skip = 0;
                kept.push(chunk);
            }
            batch = kept;
        }
        let batch_len: u64 = batch.iter().map(|c| c.len() as u64).sum();
        if let Some(size) = size
            && *written + batch_len > size
        {
            return Err(Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "blob {digest}: upstream {} sent more than the blob's {size} bytes",
                    upstream.name()
                ),
            ));
        }
        if batch_len > 0 {
            // Hash and write off the async threads: both are CPU or disk bound.
            let f = file.clone();
            let v = std::mem::take(verifier);
            let (v, res) = tokio::task::spawn_blocking(move || {
                let mut v = v;
                let res = batch.iter().try_for_each(|c| {
                    v.update(c);
                    (&*f).write_all(c)
                });
                (v, res)
            })
            .await
            .map_err(|e| Error::internal(format!("writer task failed: {e}")))?;
            *verifier = v;
            res.map_err(|e| Error::storage("writing a blob to the cache", &e))?;
            *written += batch_len;
            guard.set_written(*written);
        }
        if ended {
            if skip > 0 {
                return Err(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "blob {digest}: upstream {} sent {received} bytes, fewer than the {} already cached",
                        upstream.name(),
                        resp.skip
                    ),
                ));
            }
            return Ok(());
        }
    }
}

fn body_error(upstream: &Upstream, digest: &Digest, at: u64, e: &reqwest::Error) -> Error {
    Error::new(
        ErrorKind::UpstreamUnavailable,
        format!(
            "blob {digest}: upstream {} body failed after {at} bytes: {}",
            upstream.name(),
            error_chain(e)
        ),
    )
}

/// (digest, upstream) pairs whose bytes failed verification recently. An upstream that
/// answers 200 with wrong content looks healthy to the breaker; this is what sends the next
/// fill of that blob to the other upstreams first.
pub struct BadSources {
    recent: moka::sync::Cache<(Digest, String), ()>,
}

impl BadSources {
    /// How long a source stays suspect for a digest: long enough for clients to retry their
    /// pull, short enough that a repaired mirror is used again.
    pub const MEMORY: std::time::Duration = std::time::Duration::from_secs(60 * 60);

    pub fn new() -> BadSources {
        BadSources {
            recent: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Self::MEMORY)
                .build(),
        }
    }

    fn mark(&self, digest: &Digest, upstream: &Upstream) {
        tracing::warn!(%digest, upstream = upstream.name(), "upstream sent bad bytes: trying it last for this blob");
        self.recent
            .insert((digest.clone(), upstream.name().to_string()), ());
    }

    fn is_bad(&self, digest: &Digest, upstream: &Upstream) -> bool {
        self.recent
            .contains_key(&(digest.clone(), upstream.name().to_string()))
    }
}

impl Default for BadSources {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs blocking storage work on the blocking pool, mapping failures to storage errors.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    context: &'static str,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::storage(context, &e)),
        Err(e) => Err(Error::internal(format!("{context}: {e}"))),
    }
}
