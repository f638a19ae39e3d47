//! Driving one fill: walk the route's upstreams (`upstream::select` decides the order, where
//! the next one resumes and whom to blame), stream each response into the pipeline, verify,
//! and commit.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};

use super::pipeline::{MAX_WRITE_BATCH, Pipe, is_disk_full};
use super::state::{CommitGate, FillGuard, FillState, Progress};
use crate::clock::Clock;
use crate::error::error_chain;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, RepoName};
use crate::storage::{DiskStore, PartialBlob};
use crate::upstream::{BlobResponse, Outcome, Route, Upstream, Walk, Want};

/// What the fill needs from the cache around it.
pub struct FillContext {
    pub store: Arc<DiskStore>,
    /// Closed by a purge of this digest while the fill runs.
    pub gate: Arc<CommitGate>,
    /// Called with a number of bytes when the disk ran full, to make room.
    pub disk_full: Box<dyn Fn(u64) + Send + Sync>,
    /// The server's clock: a fill passing through memory drops readers stalled on it.
    pub clock: Clock,
}

/// Downloads, verifies and commits one blob. Returns the final state: `Complete`, or
/// `Verified` if the blob was served but could not be cached.
///
/// The route's upstreams are walked as `upstream::select` orders them. If one fails after K
/// bytes (cut off, stalled, too long), the fill goes on from the next with `Range: bytes=K-`
/// (or from 0, dropping the first K bytes, if it ignores ranges): readers see one unbroken
/// stream, and the digest, computed over all of it, decides at the end.
pub async fn run(
    guard: &FillGuard,
    cx: &FillContext,
    route: &Route,
    name: &RepoName,
    digest: &Digest,
) -> Result<FillState> {
    let mut walk = Walk::new(route, Want::Blob(digest));
    let mut pipe: Option<Pipe> = None;
    // Owned here, not by the writer thread: if this task is cancelled, dropping it removes
    // the temporary file at once.
    let mut partial: Option<PartialBlob> = None;
    // Bytes handed to the writer. After a cut the walk resumes the next upstream here.
    let mut handed: u64 = 0;
    let mut complete = false;

    while let Some(upstream) = walk.next() {
        let resp = match upstream.get_blob(name, digest, walk.resume_at()).await {
            Ok(r) => r,
            Err(e) => {
                walk.record(upstream, e.into())?;
                continue;
            }
        };
        if !walk.take_body(upstream, resp.total) {
            continue;
        }
        let pipe = match &pipe {
            Some(pipe) => {
                tracing::info!(%digest, upstream = upstream.name(), resume_at = handed, "resuming blob from the next upstream");
                pipe
            }
            None => {
                let store = cx.store.clone();
                let d = digest.clone();
                let created = tokio::task::spawn_blocking(move || store.create_partial(&d))
                    .await
                    .map_err(|e| Error::internal(format!("creating a temporary file: {e}")))?;
                let file = match created {
                    Ok(p) => {
                        let file = p.file.clone();
                        partial = Some(p);
                        Ok(file)
                    }
                    Err(e) => Err(e),
                };
                pipe.insert(Pipe::start(
                    guard,
                    digest,
                    walk.size(),
                    file,
                    cx.clock.clone(),
                )?)
            }
        };
        match stream(upstream, resp, pipe, &mut handed, walk.size(), digest).await {
            Ok(()) => {
                walk.record(upstream, Outcome::Answered)?;
                complete = true;
                break;
            }
            Err(Stop::Upstream(error)) => {
                walk.record(upstream, Outcome::Cut { at: handed, error })?
            }
            Err(Stop::Writer) => break,
        }
    }
    let size = walk.size();
    let Some(pipe) = pipe else {
        return Err(walk.into_error(&format!("blob {digest}")));
    };
    let written = pipe.finish().await?;
    if written.disk_full {
        (cx.disk_full)(size.unwrap_or(handed));
    }
    if let Some(e) = written.abandoned {
        return Err(e);
    }
    if !complete {
        return Err(walk.into_error(&format!("blob {digest}")));
    }

    if let Some(size) = size
        && handed != size
    {
        return Err(Error::new(
            ErrorKind::UpstreamInvalid,
            format!("blob {digest}: upstream body ended after {handed} of {size} bytes"),
        ));
    }
    let actual = written.verifier.finish();
    if actual != *digest {
        // The clients attached to this fill already have the bad bytes and must fail; the
        // walk blames every source, so the next fill goes to a healthy upstream first.
        return Err(walk.wrong_bytes(&actual));
    }
    let verified = Progress {
        file: partial.as_ref().map(|p| p.file.clone()),
        on_disk: written.on_disk,
        spill: written.spill.clone(),
        available: handed,
        size: Some(handed),
    };
    // Readers may finish now; the fill stays in the map until the commit is done.
    guard.publish(FillState::Verified(verified.clone()));

    let Some(partial) = partial.filter(|_| written.spill.is_none()) else {
        tracing::warn!(%digest, %name, size = handed, "blob served from the upstream but not cached: the disk write failed");
        return Ok(FillState::Verified(verified));
    };
    if !cx.gate.begin_commit() {
        tracing::info!(%digest, %name, size = handed, "blob served but not cached: it was purged while it was being fetched");
        return Ok(FillState::Verified(verified));
    }
    let file = partial.file.clone();
    let committed = {
        let store = cx.store.clone();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || store.commit_blob(partial, &digest))
            .await
            .map_err(|e| Error::internal(format!("committing a blob: {e}")))?
    };
    match committed {
        Ok(()) => {
            tracing::info!(%digest, %name, size = handed, "blob cached");
            Ok(FillState::Complete { file, size: handed })
        }
        Err(e) => {
            // The clients have their verified bytes; only the cache missed out.
            tracing::error!(%digest, %name, error = %e, "blob served but not cached: the commit failed");
            if is_disk_full(&e) {
                (cx.disk_full)(handed);
            }
            Ok(FillState::Verified(verified))
        }
    }
}

/// Why receiving stopped.
enum Stop {
    /// The upstream failed; the next one may resume.
    Upstream(Error),
    /// The writer stopped taking bytes (nobody is reading a pass-through fill, or it died):
    /// its outcome says why.
    Writer,
}

/// Streams one upstream response to the writer. Returns when the body ends; an error leaves
/// `handed` at the last byte handed over, so the next upstream can resume there.
async fn stream(
    upstream: &Upstream,
    resp: BlobResponse,
    pipe: &Pipe,
    handed: &mut u64,
    size: Option<u64>,
    digest: &Digest,
) -> std::result::Result<(), Stop> {
    let idle = upstream.idle_timeout();
    let mut skip = resp.skip;
    let _permit = resp.permit;
    let mut body = resp.body.bytes_stream();
    let mut received: u64 = 0;
    let failed = |e: Error| Stop::Upstream(e);
    loop {
        let first = match tokio::time::timeout(idle, body.next()).await {
            Err(_) => {
                return Err(failed(Error::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "blob {digest}: upstream {} sent nothing for {idle:?} after {handed} bytes",
                        upstream.name()
                    ),
                )));
            }
            Ok(None) => return Ok(()),
            Ok(Some(chunk)) => {
                chunk.map_err(|e| failed(body_error(upstream, digest, *handed, &e)))?
            }
        };
        let mut batch_len = first.len();
        let mut batch: Vec<Bytes> = vec![first];
        let mut ended = false;
        // A body error behind chunks that already arrived: those are handed over first, so
        // the next upstream resumes after them, not before.
        let mut broken = None;
        while batch_len < MAX_WRITE_BATCH {
            match body.next().now_or_never() {
                Some(Some(Ok(chunk))) => {
                    batch_len += chunk.len();
                    batch.push(chunk);
                }
                Some(Some(Err(e))) => {
                    broken = Some(e);
                    break;
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        received += batch_len as u64;
        upstream.received_blob_bytes(batch_len as u64);
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
            && *handed + batch_len > size
        {
            return Err(failed(Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "blob {digest}: upstream {} sent more than the blob's {size} bytes",
                    upstream.name()
                ),
            )));
        }
        if batch_len > 0 {
            pipe.batches.send(batch).await.map_err(|_| Stop::Writer)?;
            *handed += batch_len;
        }
        if let Some(e) = broken {
            return Err(failed(body_error(upstream, digest, *handed, &e)));
        }
        if ended {
            if skip > 0 {
                return Err(failed(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "blob {digest}: upstream {} sent {received} bytes, fewer than the {} already cached",
                        upstream.name(),
                        resp.skip
                    ),
                )));
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
