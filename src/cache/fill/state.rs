//! Where a fill is, and who publishes it: [`FillState`] on a `watch` channel every reader
//! follows, [`FillGuard`] (which guarantees a final state), [`Detach`] (out of the fill map,
//! once) and [`CommitGate`] (closed by a purge while the fill runs).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::cache::spill::{Followers, Spill};
use crate::error::{Error, Result};
use crate::sync::Locked;

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

    pub(super) fn run(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            (self.remove)();
        }
    }
}

/// Publishes a fill's states, and guarantees a final one.
pub struct FillGuard {
    pub(super) tx: Arc<watch::Sender<FillState>>,
    pub(super) detach: Arc<Detach>,
    /// The fill's readers; each subscribed with a cursor.
    pub(super) followers: Arc<Followers>,
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

    pub(super) fn publish(&self, state: FillState) {
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
/// closes it, so the blob the purge removed does not reappear when the fill ends. Each section
/// replaces the state whole, so a poisoned lock (`Locked`) still guards a valid one.
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
        let mut gate = self.0.locked();
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
        let mut gate = self.0.locked();
        match *gate {
            Gate::Open | Gate::Closed => {
                *gate = Gate::Closed;
                true
            }
            Gate::Committing => false,
        }
    }
}
