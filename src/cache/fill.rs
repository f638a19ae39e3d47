//! One cache fill: download a blob from the upstream, hash it and write it to a temporary file
//! on a writer thread while the next bytes arrive, publish `Verified` once the digest
//! matches, and commit. Progress is published on a `watch` channel, which every attached
//! reader follows.
//!
//! Architecture invariants:
//! - The fill runs in its own task on the cache's `TaskTracker`, under a cancellation token
//!   derived from the server's, never from a request. No client can cancel it.
//! - **Receiving, hashing and storing overlap.** The task receives from the upstream and hands
//!   batches to the fill's writer thread over a bounded channel ([`PIPELINE_BATCHES`] batches
//!   of at most [`MAX_WRITE_BATCH`] bytes); the writer passes each batch on to a hashing
//!   thread (another bounded channel) and writes it. The upstream is paced by the slower of
//!   the two, and memory per fill is bounded by the channels.
//! - **Readers finish on `Verified`, the cache on `Complete`.** Readers may send their last
//!   byte once every byte has matched the digest; the fill stays in the fill map (new
//!   requests join it) until the fsync, rename and directory fsync are done, and only then is
//!   the blob visible under `blobs/`. Durability is not on the clients' critical path; what is
//!   visible on disk is always durable.
//! - **A disk that fails mid-fill (ENOSPC, EIO) does not fail the clients.** The writer keeps
//!   what landed, passes the rest through memory ([`super::spill`]), leaves the fill map (new
//!   requests start a fresh fill, which tries the disk again), and still checks the digest
//!   over every byte. Nothing is committed; the temporary file is removed; on a full disk,
//!   eviction is asked to make room.
//! - The fill ends in exactly one of three named states: [`FillState::Complete`] (committed),
//!   [`FillState::Verified`] (verified, served, not cached) or [`FillState::Failed`]. If the
//!   task dies some other way (a panic), [`FillGuard`]'s `Drop` publishes `Failed`, so readers
//!   never wait forever and never mistake a dead fill for a finished one.
//! - The temporary file is removed on every path except a successful commit (see
//!   `PartialBlob`'s `Drop`).
//! - **A purge wins over a running fill.** An admin purge of a digest whose fill has not
//!   begun its commit closes the fill's [`CommitGate`]: the readers still get their verified
//!   bytes, but the blob is not committed. If the commit is already under way, the purge waits
//!   for the fill to end and removes the file after it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};

use super::spill::{self, Followers, PassError, Spill};
use crate::error::{Error, ErrorKind, Result, error_chain};
use crate::oci::{Digest, DigestVerifier, RepoName};
use crate::storage::{DiskStore, PartialBlob};
use crate::upstream::fallback::{Attempts, moves_on};
use crate::upstream::{BlobResponse, Route, Upstream};

/// Upstream chunks that are already waiting are handed to the writer together, up to this
/// many bytes, so a fast upstream costs few channel hops while a slow one still lands each
/// chunk as soon as it arrives.
const MAX_WRITE_BATCH: usize = 256 << 10;

/// Batches that may wait in each of the writer's and the hasher's channels. One is enough
/// to keep receiving while a batch is written and the one before it hashed (three measured
/// no faster on cold GETs), and each batch pins upstream receive buffers of up to ~400 KiB:
/// with 50 clients on one cold blob, three batches per channel cost ~3 MiB of peak RSS.
const PIPELINE_BATCHES: usize = 1;

/// Where a fill is. Cheap to clone (files and buffers are shared).
#[derive(Clone, Debug)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Connecting,
    /// Bytes are arriving; readers may read up to `available`, but not send the last one.
    Receiving(Progress),
    /// Every byte arrived and matched the digest: readers may finish. The fill may still be
    /// committing; if this is the final state, the blob was served but not cached.
    Verified(Progress),
    /// Verified and committed: `file` is the blob now visible in the cache.
    Complete { file: Arc<File>, size: u64 },
    /// The fill died; nothing was committed. Every reader fails with this error.
    Failed(Error),
}

/// Where a fill's bytes can be read.
#[derive(Clone, Debug)]
pub struct Progress {
    /// The temporary file; `None` only if it could not even be created.
    pub file: Option<Arc<File>>,
    /// Bytes `[0, on_disk)` are in `file`.
    pub on_disk: u64,
    /// Bytes from `on_disk` on, once the disk write failed and the fill passes through.
    pub spill: Option<Arc<Spill>>,
    /// Bytes that can be read so far: `on_disk`, plus what passed through `spill`.
    pub available: u64,
    /// The blob's size: the upstream's `Content-Length` while receiving (`None` if it sent
    /// none), the real size once verified.
    pub size: Option<u64>,
}

impl Progress {
    /// A committed file, as a `Progress` readers can finish on.
    pub fn committed(file: Arc<File>, size: u64) -> Progress {
        Progress {
            file: Some(file),
            on_disk: size,
            spill: None,
            available: size,
            size: Some(size),
        }
    }
}

/// Takes a fill out of the fill map, once: early when it starts passing through (so new
/// requests start a fresh fill), else when it ends.
pub struct Detach {
    done: AtomicBool,
    remove: Box<dyn Fn() + Send + Sync>,
}

impl Detach {
    pub fn new(remove: Box<dyn Fn() + Send + Sync>) -> Arc<Detach> {
        Arc::new(Detach {
            done: AtomicBool::new(false),
            remove,
        })
    }

    fn run(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            (self.remove)();
        }
    }
}

/// Publishes a fill's states, and guarantees a final one.
pub struct FillGuard {
    tx: Arc<watch::Sender<FillState>>,
    detach: Arc<Detach>,
    /// The fill's readers; each subscribed with a cursor.
    followers: Arc<Followers>,
    finished: bool,
}

impl FillGuard {
    pub fn new(
        tx: watch::Sender<FillState>,
        followers: Arc<Followers>,
        detach: Arc<Detach>,
    ) -> FillGuard {
        FillGuard {
            tx: Arc::new(tx),
            detach,
            followers,
            finished: false,
        }
    }

    fn publish(&self, state: FillState) {
        // `send_replace` never fails: the state is kept even while nobody is subscribed.
        self.tx.send_replace(state);
    }

    /// Ends the fill and publishes its outcome.
    ///
    /// The fill leaves the map *before* the final state is published: a client that saw the
    /// failure and retries must start a fresh fill, not join the dead one. (After a success
    /// the blob is already committed, so a request in between finds it on disk.)
    pub fn finish(mut self, outcome: Result<FillState>) {
        self.finished = true;
        self.detach.run();
        self.publish(outcome.unwrap_or_else(FillState::Failed));
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped without `finish`: the task panicked or was aborted. A bug, but one that
            // must not leave readers hanging or let them see a short blob as complete.
            tracing::error!("cache fill ended without an outcome");
            self.detach.run();
            self.publish(FillState::Failed(Error::internal(
                "the cache fill ended unexpectedly",
            )));
        }
    }
}

/// Whether a fill may still commit its blob. A purge of the digest while the fill runs
/// closes it, so the blob the purge removed does not reappear when the fill ends.
#[derive(Debug, Default)]
pub struct CommitGate(std::sync::Mutex<Gate>);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Gate {
    #[default]
    Open,
    /// Purged before the commit began: the fill serves its readers and discards the file.
    Closed,
    /// The commit has begun; a purge must wait for the fill's end and remove the file.
    Committing,
}

impl CommitGate {
    /// The fill is about to commit: false if a purge closed the gate first.
    pub fn begin_commit(&self) -> bool {
        let mut gate = self.0.lock().expect("commit gate poisoned");
        match *gate {
            Gate::Closed => false,
            Gate::Open | Gate::Committing => {
                *gate = Gate::Committing;
                true
            }
        }
    }

    /// A purge: true if the fill will not commit; false if its commit has already begun.
    pub fn close(&self) -> bool {
        let mut gate = self.0.lock().expect("commit gate poisoned");
        match *gate {
            Gate::Open | Gate::Closed => {
                *gate = Gate::Closed;
                true
            }
            Gate::Committing => false,
        }
    }
}

/// What the fill needs from the cache around it.
pub struct FillContext {
    pub store: Arc<DiskStore>,
    /// Closed by a purge of this digest while the fill runs.
    pub gate: Arc<CommitGate>,
    pub bad_sources: Arc<BadSources>,
    /// Called with a number of bytes when the disk ran full, to make room.
    pub disk_full: Box<dyn Fn(u64) + Send + Sync>,
}

/// Downloads, verifies and commits one blob. Returns the final state: `Complete`, or
/// `Verified` if the blob was served but could not be cached.
///
/// The route's upstreams are tried in order. If one fails after K bytes (cut off, stalled,
/// too long), the fill goes on from the next with `Range: bytes=K-` (or from 0, dropping the
/// first K bytes, if it ignores ranges): readers see one unbroken stream, and the digest,
/// computed over all of it, decides at the end. Each upstream is tried at most once per fill.
pub async fn run(
    guard: &FillGuard,
    cx: &FillContext,
    route: &Route,
    name: &RepoName,
    digest: &Digest,
) -> Result<FillState> {
    let mut attempts = Attempts::default();
    let mut pipe: Option<Pipe> = None;
    // Owned here, not by the writer thread: if this task is cancelled, dropping it removes
    // the temporary file at once.
    let mut partial: Option<PartialBlob> = None;
    let mut size: Option<u64> = None;
    // Bytes handed to the writer: where the next upstream resumes.
    let mut handed: u64 = 0;
    // Upstreams whose bytes went into the blob, to blame if the digest does not match.
    let mut sources: Vec<&Upstream> = Vec::new();
    let mut complete = false;

    // Upstreams that recently sent bad bytes for this digest go last: demoted, not dropped,
    // so a lone upstream whose corruption was passing is still retried.
    let (trusted, suspect): (Vec<_>, Vec<_>) = route
        .upstreams
        .iter()
        .partition(|u| !cx.bad_sources.is_bad(digest, u));
    for upstream in trusted.into_iter().chain(suspect) {
        if !upstream.admit() {
            attempts.circuit_open(upstream);
            continue;
        }
        let resp = match upstream.get_blob(name, digest, handed).await {
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
        if pipe.is_none() {
            size = resp.total;
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
            pipe = Some(Pipe::start(guard, digest, size, file)?);
        } else {
            tracing::info!(%digest, upstream = upstream.name(), resume_at = handed, "resuming blob from the next upstream");
        }
        let pipe = pipe.as_ref().expect("started above");
        sources.push(upstream);
        match stream(upstream, resp, pipe, &mut handed, size, digest).await {
            Ok(()) => {
                complete = true;
                break;
            }
            Err(Stop::Upstream(e)) if moves_on(&e) => {
                upstream.record_failure(&e);
                attempts.push(upstream, e);
            }
            Err(Stop::Upstream(e)) => return Err(e),
            Err(Stop::Writer) => break,
        }
    }
    let Some(pipe) = pipe else {
        return Err(attempts.into_error(&format!("blob {digest}")));
    };
    let written = pipe.finish().await?;
    if written.disk_full {
        (cx.disk_full)(size.unwrap_or(handed));
    }
    if let Some(e) = written.abandoned {
        return Err(e);
    }
    if !complete {
        return Err(attempts.into_error(&format!("blob {digest}")));
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
            cx.bad_sources.mark(digest, u);
        }
        return Err(e);
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
        let mut batch: Vec<Bytes> = vec![first];
        let mut ended = false;
        // A body error behind chunks that already arrived: those are handed over first, so
        // the next upstream resumes after them, not before.
        let mut broken = None;
        let mut batch_len = batch[0].len();
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

/// The channel to a fill's writer thread, and the way to its outcome.
struct Pipe {
    batches: mpsc::Sender<Vec<Bytes>>,
    done: oneshot::Receiver<Written>,
}

/// What the writer thread did.
struct Written {
    verifier: DigestVerifier,
    on_disk: u64,
    /// Set if the disk write failed and the rest passed through memory.
    spill: Option<Arc<Spill>>,
    /// Set if the writer gave up before the end (nobody left to pass bytes to).
    abandoned: Option<Error>,
    /// The disk write failed because the disk (or a quota) was full.
    disk_full: bool,
}

impl Pipe {
    /// Starts the writer thread on the temporary file (or on the error creating it, in which
    /// case every byte passes through).
    fn start(
        guard: &FillGuard,
        digest: &Digest,
        size: Option<u64>,
        file: io::Result<Arc<File>>,
    ) -> Result<Pipe> {
        let (batches, rx) = mpsc::channel(PIPELINE_BATCHES);
        let (done_tx, done) = oneshot::channel();
        let mut writer = Writer {
            tx: guard.tx.clone(),
            detach: guard.detach.clone(),
            followers: guard.followers.clone(),
            digest: digest.clone(),
            size,
            verifier: DigestVerifier::new(),
            file: None,
            on_disk: 0,
            available: 0,
            spill: None,
            disk_full: false,
        };
        std::thread::Builder::new()
            .name("cistern-fill".into())
            .spawn(move || {
                let abandoned = writer.run(file, rx).err();
                let _ = done_tx.send(Written {
                    verifier: writer.verifier,
                    on_disk: writer.on_disk,
                    spill: writer.spill,
                    abandoned,
                    disk_full: writer.disk_full,
                });
            })
            .map_err(|e| Error::storage("starting a fill's writer thread", &e))?;
        Ok(Pipe { batches, done })
    }

    /// Closes the channel and waits until the writer has taken everything.
    async fn finish(self) -> Result<Written> {
        drop(self.batches);
        self.done
            .await
            .map_err(|_| Error::internal("the fill's writer thread died"))
    }
}

/// Hashes and stores a fill's bytes on its own thread.
struct Writer {
    tx: Arc<watch::Sender<FillState>>,
    detach: Arc<Detach>,
    followers: Arc<Followers>,
    digest: Digest,
    size: Option<u64>,
    verifier: DigestVerifier,
    file: Option<Arc<File>>,
    on_disk: u64,
    available: u64,
    spill: Option<Arc<Spill>>,
    disk_full: bool,
}

impl Writer {
    fn run(
        &mut self,
        file: io::Result<Arc<File>>,
        mut rx: mpsc::Receiver<Vec<Bytes>>,
    ) -> Result<()> {
        match file {
            Ok(f) => self.file = Some(f),
            Err(e) => self.disk_failed(&e, "creating a temporary file"),
        }
        self.publish();
        let mut hasher = Hasher::start();
        while let Some(batch) = rx.blocking_recv() {
            hasher.feed(&batch)?;
            for chunk in batch {
                self.take(chunk)?;
            }
            self.publish();
        }
        self.verifier = hasher.finish()?;
        Ok(())
    }

    /// Stores one chunk: on disk while the disk takes it, else through the spill window.
    fn take(&mut self, chunk: Bytes) -> Result<()> {
        let rest = match (&self.spill, &self.file) {
            (None, Some(file)) => {
                let file = file.clone();
                match write_all_at(&file, &chunk, self.on_disk) {
                    Ok(()) => {
                        self.on_disk += chunk.len() as u64;
                        self.available = self.on_disk;
                        return Ok(());
                    }
                    Err((landed, e)) => {
                        self.on_disk += landed as u64;
                        self.available = self.on_disk;
                        self.disk_failed(&e, "writing a blob to the cache");
                        self.publish();
                        chunk.slice(landed..)
                    }
                }
            }
            _ => chunk,
        };
        if rest.is_empty() {
            return Ok(());
        }
        let spill = self
            .spill
            .clone()
            .expect("the disk failed, so there is a spill");
        let len = rest.len() as u64;
        match spill.pass(&self.followers, rest, spill::WINDOW, spill::STALL) {
            Ok(()) => {
                self.available += len;
                Ok(())
            }
            Err(PassError::NoFollowers) => Err(Error::new(
                ErrorKind::Storage,
                format!(
                    "blob {}: the disk write failed and every client left; download abandoned",
                    self.digest
                ),
            )),
        }
    }

    /// Switches to pass-through: what landed stays readable, the rest goes through memory.
    fn disk_failed(&mut self, e: &io::Error, context: &str) {
        let full = is_disk_full(e);
        tracing::error!(digest = %self.digest, error = %e, at = self.on_disk, disk_full = full,
            "{context} failed: passing the rest of the blob through without caching it");
        self.spill = Some(Arc::new(Spill::new(self.on_disk)));
        // New requests must not join a fill that will not be cached and may already have
        // dropped the bytes they need: they start a fresh fill.
        self.detach.run();
        self.disk_full |= full;
    }

    fn publish(&self) {
        let progress = Progress {
            file: self.file.clone(),
            on_disk: self.on_disk,
            spill: self.spill.clone(),
            available: self.available,
            size: self.size,
        };
        self.tx.send_modify(|s| {
            // Never overwrite a final state (the fill may have been cancelled meanwhile).
            if matches!(s, FillState::Connecting | FillState::Receiving(_)) {
                *s = FillState::Receiving(progress);
            }
        });
    }
}

/// Writes all of `buf` at `offset`. On failure, says how many bytes landed first.
fn write_all_at(
    file: &File,
    buf: &[u8],
    offset: u64,
) -> std::result::Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        match file.write_at(&buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err((
                    done,
                    io::Error::new(io::ErrorKind::WriteZero, "the disk took no bytes"),
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

/// Is this the disk (or a quota) being full?
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

/// Hashes a fill's bytes on a thread of its own, beside the writer: sha256 (~1.2 GiB/s here)
/// and the copy into the page cache then overlap instead of adding up. If the thread cannot
/// be started, the writer hashes inline.
struct Hasher {
    batches: Option<std::sync::mpsc::SyncSender<Vec<Bytes>>>,
    thread: Option<std::thread::JoinHandle<DigestVerifier>>,
    inline: DigestVerifier,
}

impl Hasher {
    fn start() -> Hasher {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Bytes>>(PIPELINE_BATCHES);
        let spawned = std::thread::Builder::new()
            .name("cistern-hash".into())
            .spawn(move || {
                let mut v = DigestVerifier::new();
                for batch in rx {
                    for chunk in &batch {
                        v.update(chunk);
                    }
                }
                v
            });
        match spawned {
            Ok(thread) => Hasher {
                batches: Some(tx),
                thread: Some(thread),
                inline: DigestVerifier::new(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "could not start a hashing thread; hashing inline");
                Hasher {
                    batches: None,
                    thread: None,
                    inline: DigestVerifier::new(),
                }
            }
        }
    }

    fn feed(&mut self, batch: &[Bytes]) -> Result<()> {
        match &self.batches {
            // Cloning a batch clones reference counts, not bytes.
            Some(tx) => tx
                .send(batch.to_vec())
                .map_err(|_| Error::internal("the fill's hashing thread died")),
            None => {
                batch.iter().for_each(|c| self.inline.update(c));
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<DigestVerifier> {
        drop(self.batches.take());
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::internal("the fill's hashing thread died")),
            None => Ok(std::mem::take(&mut self.inline)),
        }
    }
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
