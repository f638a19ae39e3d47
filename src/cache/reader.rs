//! Streams a blob (or a range of it) to one client, from a committed file or by following a
//! fill as its bytes land.
//!
//! Architecture invariants:
//! - **The final byte of every response is withheld until the blob is verified.** While the
//!   fill runs, a reader sends at most up to one byte short of the response's end. If the
//!   fill fails (wrong digest, upstream cut, stall), the reader returns an error, which makes
//!   hyper abort the connection; with `Content-Length` set, the client sees a short body and
//!   an error. No client ever gets a complete body that did not verify.
//! - **A short body is always an error.** A reader never ends cleanly before its end offset.
//! - Memory per client is one chunk of [`CHUNK`] bytes in flight.
//! - A reader owns nothing but its receiver and a file handle; dropping it (client gone)
//!   affects no one else.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::blobs::BlobSource;
use super::fill::FillState;
use crate::error::{Error, Result};

/// Bytes per read. Large enough to keep syscall and task overhead small, small enough that
/// fifty clients on one cold blob stay within a few MiB.
pub const CHUNK: usize = 128 * 1024;

pub struct BlobReader {
    /// Keeps the blob from eviction until the response is done.
    _guard: Option<super::evict::ReadGuard>,
    file: Option<Arc<File>>,
    progress: Option<watch::Receiver<FillState>>,
    /// Next offset to send.
    pos: u64,
    /// End of the response (exclusive). `None`: the blob's end, not yet known (an upstream
    /// that sent no length).
    end: Option<u64>,
}

impl BlobReader {
    /// A reader for `start..end` of the blob (`end` `None` = to the end of the blob).
    pub fn new(source: BlobSource, start: u64, end: Option<u64>) -> BlobReader {
        match source {
            BlobSource::Cached { file, size, guard } => BlobReader {
                _guard: guard,
                file: Some(file),
                progress: None,
                pos: start,
                end: Some(end.unwrap_or(size)),
            },
            BlobSource::Filling { progress, size } => BlobReader {
                _guard: None,
                file: None,
                progress: Some(progress),
                pos: start,
                end: end.or(size),
            },
        }
    }

    /// The next chunk; `None` at the end of the response, `Err` if the blob cannot be
    /// completed (the caller must abort the response).
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        loop {
            // How far may we read, and is the blob verified?
            let (limit, verified) = match &mut self.progress {
                None => (self.end.expect("cached readers know their end"), true),
                Some(rx) => match &*rx.borrow_and_update() {
                    FillState::Connecting => (self.pos, false),
                    FillState::Streaming { file, written, .. } => {
                        self.file.get_or_insert_with(|| file.clone());
                        // Never reach the end before verification: hold back one byte of
                        // the response's end (or of what has landed, if the end is unknown).
                        let cap = match self.end {
                            Some(end) => end.saturating_sub(1),
                            None => written.saturating_sub(1),
                        };
                        (cap.min(*written), false)
                    }
                    FillState::Complete { file, size } => {
                        self.file.get_or_insert_with(|| file.clone());
                        let end = *self.end.get_or_insert(*size);
                        (end.min(*size), true)
                    }
                    FillState::Failed(e) => return Some(Err(e.clone())),
                },
            };
            if self.pos < limit {
                return Some(self.read(limit).await);
            }
            if verified {
                let end = self.end.expect("known once verified");
                if self.pos >= end {
                    return None;
                }
                // The response runs past the blob's end (a range computed from a wrong size
                // would do this): never pretend it is complete.
                return Some(Err(Error::internal(format!(
                    "blob is shorter than the response (ends at {limit}, response at {end})"
                ))));
            }
            let rx = self
                .progress
                .as_mut()
                .expect("unverified readers follow a fill");
            if rx.changed().await.is_err() {
                return Some(Err(Error::internal("the cache fill vanished")));
            }
        }
    }

    async fn read(&mut self, limit: u64) -> Result<Bytes> {
        let file = self.file.clone().expect("a readable range has a file");
        let len = ((limit - self.pos) as usize).min(CHUNK);
        let pos = self.pos;
        let buf = tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
            let mut buf = BytesMut::zeroed(len);
            file.read_exact_at(&mut buf, pos)?;
            Ok(buf.freeze())
        })
        .await
        .map_err(|e| Error::internal(format!("reader task failed: {e}")))?
        .map_err(|e| Error::storage("reading a cached blob", &e))?;
        self.pos += buf.len() as u64;
        Ok(buf)
    }
}
