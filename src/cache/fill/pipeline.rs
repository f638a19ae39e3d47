//! A fill's pipeline: the task hands batches of upstream bytes over a bounded channel to the
//! fill's writer thread, which passes each batch on to a hashing thread (another bounded
//! channel) and writes it with `pwrite`, so receiving, hashing and storing overlap and memory
//! per fill is bounded by the channels. A disk that fails mid-fill switches the writer to
//! pass-through (`cache::spill`); every byte is still hashed.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::state::{Detach, FillGuard, FillState, Progress};
use crate::cache::spill::{self, Followers, PassError, Spill};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, DigestVerifier};

/// Upstream chunks that are already waiting are handed to the writer together, up to this
/// many bytes, so a fast upstream costs few channel hops while a slow one still lands each
/// chunk as soon as it arrives.
pub(super) const MAX_WRITE_BATCH: usize = 256 << 10;

/// Batches that may wait in each of the writer's and the hasher's channels. One is enough
/// to keep receiving while a batch is written and the one before it hashed (three measured
/// no faster on cold GETs), and each batch pins upstream receive buffers of up to ~400 KiB:
/// with 50 clients on one cold blob, three batches per channel cost ~3 MiB of peak RSS.
const PIPELINE_BATCHES: usize = 1;

/// The channel to a fill's writer thread, and the way to its outcome.
pub(super) struct Pipe {
    pub(super) batches: mpsc::Sender<Vec<Bytes>>,
    done: oneshot::Receiver<Written>,
}

/// What the writer thread did.
pub(super) struct Written {
    pub(super) verifier: DigestVerifier,
    pub(super) on_disk: u64,
    /// Set if the disk write failed and the rest passed through memory.
    pub(super) spill: Option<Arc<Spill>>,
    /// Set if the writer gave up before the end (nobody left to pass bytes to).
    pub(super) abandoned: Option<Error>,
    /// The disk write failed because the disk (or a quota) was full.
    pub(super) disk_full: bool,
}

impl Pipe {
    /// Starts the writer thread on the temporary file (or on the error creating it, in which
    /// case every byte passes through).
    pub(super) fn start(
        guard: &FillGuard,
        digest: &Digest,
        size: Option<u64>,
        file: io::Result<Arc<File>>,
        clock: Clock,
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
            clock,
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
    pub(super) async fn finish(self) -> Result<Written> {
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
    /// What the spill times stalled readers on.
    clock: Clock,
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
        // The disk failed (or no file could be made), so `disk_failed` has set the spill.
        let Some(spill) = self.spill.clone() else {
            return Err(Error::internal(format!(
                "blob {}: neither the disk nor a pass-through window takes its bytes",
                self.digest
            )));
        };
        let len = rest.len() as u64;
        match spill.pass(
            &self.followers,
            rest,
            spill::WINDOW,
            spill::STALL,
            &self.clock,
        ) {
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
    while let Some(rest) = buf.get(done..).filter(|rest| !rest.is_empty()) {
        match file.write_at(rest, offset + done as u64) {
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
