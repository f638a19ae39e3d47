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
use crate::storage::DiskStore;
use crate::upstream::Upstream;

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
pub async fn run(
    guard: &FillGuard,
    store: &Arc<DiskStore>,
    upstream: &Upstream,
    name: &RepoName,
    digest: &Digest,
) -> Result<FillState> {
    let resp = upstream.get_blob(name, digest).await?;
    let size = resp.content_length();
    let partial = {
        let store = store.clone();
        let digest = digest.clone();
        blocking(
            move || store.create_partial(&digest),
            "creating a temporary file",
        )
        .await?
    };
    let file = partial.file.clone();
    guard.publish(FillState::Streaming {
        file: file.clone(),
        size,
        written: 0,
    });

    let idle = upstream.idle_timeout();
    let mut body = resp.bytes_stream();
    let mut verifier = DigestVerifier::new();
    let mut written: u64 = 0;
    loop {
        let first = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "blob {digest}: upstream {} sent nothing for {idle:?} after {written} bytes",
                        upstream.base_url()
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(chunk)) => chunk,
        };
        let mut batch: Vec<Bytes> = vec![first.map_err(|e| body_error(digest, written, &e))?];
        let mut batch_len = batch[0].len();
        let mut ended = false;
        while batch_len < MAX_WRITE_BATCH {
            match body.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    batch_len += chunk.len();
                    batch.push(chunk);
                }
                Some(Some(Err(e))) => {
                    return Err(body_error(digest, written + batch_len as u64, &e));
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        if let Some(size) = size
            && written + batch_len as u64 > size
        {
            return Err(Error::new(
                ErrorKind::UpstreamInvalid,
                format!("blob {digest}: upstream sent more than its Content-Length of {size}"),
            ));
        }
        // Hash and write off the async threads: both are CPU or disk bound.
        let f = file.clone();
        let (v, res) = tokio::task::spawn_blocking(move || {
            let mut v = verifier;
            let res = batch.iter().try_for_each(|c| {
                v.update(c);
                (&*f).write_all(c)
            });
            (v, res)
        })
        .await
        .map_err(|e| Error::internal(format!("writer task failed: {e}")))?;
        verifier = v;
        res.map_err(|e| Error::storage("writing a blob to the cache", &e))?;
        written += batch_len as u64;
        guard.set_written(written);
        if ended {
            break;
        }
    }

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
        return Err(Error::new(
            ErrorKind::UpstreamInvalid,
            format!(
                "blob {digest}: upstream {} sent content with digest {actual}; discarded",
                upstream.base_url()
            ),
        ));
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

fn body_error(digest: &Digest, at: u64, e: &reqwest::Error) -> Error {
    let mut msg = format!("blob {digest}: upstream body failed after {at} bytes: {e}");
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cur = c.source();
    }
    Error::new(ErrorKind::UpstreamUnavailable, msg)
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
