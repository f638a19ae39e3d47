//! Streams a blob (or a range of it) to one client, from a committed file or by following a
//! fill as its bytes land.
//!
//! Architecture invariants:
//! - **The final byte of every response is withheld until the blob is verified.** While the
//!   fill runs, a reader may *read* up to the response's end, but it keeps the final byte
//!   back until the fill publishes `Verified`. If the fill fails (wrong digest, upstream cut,
//!   stall), the reader returns an error, which makes hyper abort the connection; with
//!   `Content-Length` set, the client sees a short body and an error. No client ever gets a
//!   complete body that did not verify.
//! - The one exception, chosen per route (`cold_ranges = "upstream"`): a range of a blob not
//!   cached yet may be read from the fill without waiting for verification
//!   ([`BlobReader::unverified`]); it ends as soon as its bytes are read, and carries the
//!   upstream's bytes, not checked against the digest. Whole-blob responses never do this.
//! - **A short body is always an error.** A reader never ends cleanly before its end offset.
//! - Memory per client is one chunk of [`CHUNK`] bytes in flight (plus, only while a fill
//!   passes through memory after a disk failure, its share of that fill's bounded window).
//! - A reader owns nothing but its receiver, its cursor and a file handle; dropping it (client
//!   gone) affects no one else.

use std::fs::File;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::blobs::BlobSource;
use super::fill::{FillState, Progress};
use super::spill::Cursor;
use crate::error::{Error, Result};
use crate::storage::mapped::MappedFile;

/// Bytes per read. Large enough to keep syscall and task overhead small, small enough that
/// fifty clients on one cold blob stay within a few MiB.
pub const CHUNK: usize = 64 * 1024;

/// Bytes per chunk when chunks are mapped ([`BlobReader::zero_copy`]): they cost no memory
/// (the socket takes the file's pages), so they can be large, which saves wake-ups.
pub const MAPPED_CHUNK: usize = 1024 * 1024;

pub struct BlobReader {
    /// Keeps the blob from eviction until the response is done.
    _guard: Option<super::evict::ReadGuard>,
    /// The fill being followed; `None` once the blob is verified (or was committed).
    progress: Option<watch::Receiver<FillState>>,
    /// This reader's place among the fill's followers.
    cursor: Option<Cursor>,
    /// Where the bytes are, as last seen.
    data: Option<Progress>,
    verified: bool,
    /// Whether the response's final byte waits for the blob's verification (every response
    /// but an unverified range).
    withhold_last: bool,
    /// Next offset to read.
    pos: u64,
    /// The response's final byte, read but held back until the blob is verified.
    held: Option<Bytes>,
    /// End of the response (exclusive). `None`: the blob's end, not yet known (an upstream
    /// that sent no length).
    end: Option<u64>,
    /// Verified bytes are sent as chunks of a mapping of the file ([`BlobReader::zero_copy`]).
    zero_copy: ZeroCopy,
}

/// Whether, and how far, a reader sends mapped chunks.
enum ZeroCopy {
    Off,
    /// Wanted; the file is mapped at the first verified read.
    Wanted,
    Mapped(Arc<MappedFile>),
}

impl BlobReader {
    /// A reader for `start..end` of the blob (`end` `None` = to the end of the blob).
    pub fn new(source: BlobSource, start: u64, end: Option<u64>) -> BlobReader {
        BlobReader::with_withholding(source, start, end, true)
    }

    /// A reader for `start..end` of a blob that may still be filling, which sends the bytes
    /// as the fill writes them and ends once it has sent `end`, without waiting for the blob
    /// to be verified: for `cold_ranges = "upstream"`, never for a whole blob. It still fails
    /// if the fill fails before it has read its bytes.
    pub fn unverified(source: BlobSource, start: u64, end: u64) -> BlobReader {
        BlobReader::with_withholding(source, start, Some(end), false)
    }

    fn with_withholding(
        source: BlobSource,
        start: u64,
        end: Option<u64>,
        withhold_last: bool,
    ) -> BlobReader {
        match source {
            BlobSource::Cached { file, size, guard } => BlobReader {
                _guard: Some(guard),
                progress: None,
                cursor: None,
                data: Some(Progress::committed(file, size)),
                verified: true,
                withhold_last,
                pos: start,
                held: None,
                end: Some(end.unwrap_or(size)),
                zero_copy: ZeroCopy::Off,
            },
            BlobSource::Filling {
                progress,
                cursor,
                size,
                ..
            } => {
                // The window must keep bytes from `start` on for us; nothing below.
                let _ = cursor.advance(start);
                BlobReader {
                    _guard: None,
                    progress: Some(progress),
                    cursor: Some(cursor),
                    data: None,
                    verified: false,
                    withhold_last,
                    pos: start,
                    held: None,
                    end: end.or(size),
                    zero_copy: ZeroCopy::Off,
                }
            }
        }
    }

    /// Sends the verified bytes as chunks that map the blob's file instead of copies of it,
    /// for a connection that hands such chunks to the socket by `sendfile`
    /// (`server::zero_copy`). Bytes read before the blob is verified (while following a
    /// fill) are read as usual: only a verified file is complete and never written again.
    pub fn zero_copy(mut self) -> BlobReader {
        self.zero_copy = ZeroCopy::Wanted;
        self
    }

    /// The next chunk; `None` at the end of the response, `Err` if the blob cannot be
    /// completed (the caller must abort the response).
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        loop {
            // An unverified range is done once its bytes are out, whatever the fill does next.
            if !self.withhold_last
                && let Some(end) = self.end
                && self.pos >= end
            {
                return None;
            }
            if let Err(e) = self.observe() {
                return Some(Err(e));
            }
            let available = self.data.as_ref().map_or(0, |d| d.available);
            let limit = match self.end {
                Some(end) => end.min(available),
                None => available,
            };
            // A held byte goes out once verified, or once more bytes follow it (with the end
            // unknown, the byte held was only the last to have arrived).
            if self.held.is_some() && (self.verified || self.pos < limit) {
                return self.held.take().map(Ok);
            }
            if self.pos < limit {
                let chunk = match self.read(limit).await {
                    Ok(c) => c,
                    Err(e) => return Some(Err(e)),
                };
                return Some(Ok(self.hold_back_last(chunk)));
            }
            if self.verified {
                // `observe` sets the end as it sees the blob verified.
                let Some(end) = self.end else {
                    return Some(Err(Error::internal("a verified blob has no end")));
                };
                if self.pos >= end {
                    return None;
                }
                // The response runs past the blob's end (a range computed from a wrong size
                // would do this): never pretend it is complete.
                return Some(Err(Error::internal(format!(
                    "blob is shorter than the response (ends at {limit}, response at {end})"
                ))));
            }
            if let Some(cursor) = &self.cursor
                && cursor.is_dropped()
            {
                return Some(Err(dropped()));
            }
            // Only `observe` stops following the fill, as it sees the blob verified.
            let Some(rx) = self.progress.as_mut() else {
                return Some(Err(Error::internal("an unverified reader follows no fill")));
            };
            if rx.changed().await.is_err() {
                return Some(Err(Error::internal("the cache fill vanished")));
            }
        }
    }

    /// Takes in the fill's latest state. Once verified, stops following it.
    fn observe(&mut self) -> Result<()> {
        let Some(rx) = &mut self.progress else {
            return Ok(());
        };
        match &*rx.borrow_and_update() {
            FillState::Connecting => {}
            FillState::Receiving(p) => self.data = Some(p.clone()),
            FillState::Verified(p) => {
                self.data = Some(p.clone());
                self.verified = true;
            }
            FillState::Complete { file, size } => {
                self.data = Some(Progress::committed(file.clone(), *size));
                self.verified = true;
            }
            FillState::Failed(e) => return Err(e.clone()),
        }
        if self.verified {
            let size = self
                .data
                .as_ref()
                .and_then(|d| d.size)
                .ok_or_else(|| Error::internal("a verified blob has no size"))?;
            self.end.get_or_insert(size);
            self.progress = None;
        }
        Ok(())
    }

    /// Until the blob is verified, a chunk that reaches the response's end (or, with the end
    /// unknown, the bytes available so far) keeps its final byte back.
    fn hold_back_last(&mut self, mut chunk: Bytes) -> Bytes {
        if self.verified || !self.withhold_last {
            return chunk;
        }
        let reaches_end = match self.end {
            Some(end) => self.pos >= end,
            None => true,
        };
        if reaches_end && !chunk.is_empty() {
            self.held = Some(chunk.split_off(chunk.len() - 1));
        }
        chunk
    }

    /// Reads the next chunk below `limit`, from the file or from the pass-through window, and
    /// moves the cursor past it.
    async fn read(&mut self, limit: u64) -> Result<Bytes> {
        let mapped = self.mapped_chunk(limit);
        // `limit` is above `pos` only once `observe` has seen data.
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| Error::internal("a readable range has no data"))?;
        let pos = self.pos;
        let len = ((limit - self.pos) as usize).min(CHUNK);
        let buf = if let Some(chunk) = mapped {
            chunk
        } else if pos < data.on_disk {
            let file = data
                .file
                .clone()
                .ok_or_else(|| Error::internal("bytes on disk have no file"))?;
            let len = len.min((data.on_disk - pos) as usize);
            // Bytes in the page cache (a warm blob, or one a fill just wrote) are copied right
            // here; only a read that would wait for the disk goes to the blocking pool.
            match read_cached_at(&file, len, pos) {
                Some(buf) => buf,
                None => tokio::task::spawn_blocking(move || read_at(&file, len, pos))
                    .await
                    .map_err(|e| Error::internal(format!("reader task failed: {e}")))?
                    .map_err(|e| Error::storage("reading a cached blob", &e))?,
            }
        } else {
            let spill = data
                .spill
                .as_ref()
                .ok_or_else(|| Error::internal("blob bytes are neither on disk nor in memory"))?;
            match spill.read(pos, len) {
                Ok(Some(b)) => b,
                Ok(None) => return Err(Error::internal("pass-through bytes went missing")),
                Err(_) => return Err(dropped()),
            }
        };
        self.pos += buf.len() as u64;
        if let Some(cursor) = &self.cursor
            && cursor.advance(self.pos).is_err()
        {
            return Err(dropped());
        }
        Ok(buf)
    }
}

impl BlobReader {
    /// The next chunk below `limit` as a slice of the mapped file, when this reader sends
    /// mapped chunks and the blob is verified and on disk. `None`: read it as usual (also
    /// when the file cannot be mapped, which is then not tried again).
    fn mapped_chunk(&mut self, limit: u64) -> Option<Bytes> {
        if matches!(self.zero_copy, ZeroCopy::Off) || !self.verified {
            return None;
        }
        let data = self.data.as_ref()?;
        if limit > data.on_disk || data.spill.is_some() {
            return None;
        }
        if let ZeroCopy::Wanted = self.zero_copy {
            let file = data.file.clone()?;
            match MappedFile::map(file, data.on_disk) {
                Ok(map) => self.zero_copy = ZeroCopy::Mapped(map),
                Err(e) => {
                    tracing::debug!(error = %e, "mapping a cached blob failed; reading it instead");
                    self.zero_copy = ZeroCopy::Off;
                    return None;
                }
            }
        }
        let ZeroCopy::Mapped(map) = &self.zero_copy else {
            return None;
        };
        let len = usize::try_from(limit - self.pos)
            .unwrap_or(MAPPED_CHUNK)
            .min(MAPPED_CHUNK);
        map.slice(self.pos, len)
    }
}

fn dropped() -> Error {
    Error::internal("this client fell too far behind a pass-through download and was dropped")
}

/// Whether `preadv2(RWF_NOWAIT)` works here; cleared the first time the kernel or file
/// system says it does not.
static NOWAIT_WORKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Reads up to `len` bytes at `pos` if they are in the page cache, without blocking
/// (`preadv2` with `RWF_NOWAIT`). `None` when the read would wait for the disk, or cannot be
/// done this way: the caller then reads on the blocking pool. May return fewer than `len`
/// bytes (those that were cached), never zero.
fn read_cached_at(file: &File, len: usize, pos: u64) -> Option<Bytes> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering::Relaxed;
    if !NOWAIT_WORKS.load(Relaxed) || len == 0 {
        return None;
    }
    let mut buf = BytesMut::with_capacity(len);
    // `buf` was made with room for `len` bytes: never `None`.
    let spare = buf.spare_capacity_mut().get_mut(..len)?;
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // SAFETY: `iov` describes `len` writable bytes of `buf`'s capacity, which outlives the
    // call; preadv2 writes at most that many and reports how many.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            pos as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n <= 0 {
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
            ) {
                NOWAIT_WORKS.store(false, Relaxed);
            }
        }
        // EAGAIN (not cached), EINTR, or an end of file the blocking read will report.
        return None;
    }
    // SAFETY: preadv2 initialised the first `n` bytes.
    unsafe { buf.set_len(n as usize) };
    Some(buf.freeze())
}

/// Reads exactly `len` bytes at `pos` into a fresh buffer, without zeroing it first.
fn read_at(file: &File, len: usize, pos: u64) -> std::io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let mut buf = BytesMut::with_capacity(len);
    let mut done = 0;
    while done < len {
        // `buf` has room for `len` bytes and holds `done`: never the error.
        let spare = buf
            .spare_capacity_mut()
            .get_mut(..len - done)
            .ok_or_else(|| std::io::Error::other("read buffer too small"))?;
        // SAFETY: `spare` is `len - done` writable bytes of `buf`'s capacity; pread writes at
        // most that many and reports how many, and only those are exposed by `set_len`.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                (pos + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the blob file is shorter than expected",
            ));
        }
        // SAFETY: pread initialised the next `n` bytes.
        unsafe { buf.set_len(done + n as usize) };
        done += n as usize;
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn read_at_reads_exactly_and_fails_short() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello, world").unwrap();
        assert_eq!(&read_at(&f, 5, 7).unwrap()[..], b"world");
        assert_eq!(&read_at(&f, 0, 3).unwrap()[..], b"");
        let e = read_at(&f, 6, 7).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn cached_reads_return_what_is_there() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello, world").unwrap();
        // Just written, so in the page cache. (ext4, xfs, btrfs and tmpfs support
        // RWF_NOWAIT; if this fails on another file system, reads there always take the
        // blocking pool, which is correct but slower.)
        let b = read_cached_at(&f, 5, 7).expect("cached bytes are read without blocking");
        assert_eq!(&b[..], b"world");
        let b = read_cached_at(&f, 100, 7).expect("a short read past the end");
        assert_eq!(&b[..], b"world");
        assert_eq!(read_cached_at(&f, 5, 12), None, "nothing at the end");
    }
}
