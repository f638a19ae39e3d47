//! Committed blob files mapped into the address space, so that a response body can name a
//! file's bytes without copying them: the chunks are `Bytes` over the mapping, and the plain
//! HTTP/1 connection (`server::zero_copy`) recognises them by address and hands the socket the
//! file's pages with `sendfile` instead of writing the bytes. The mapping itself is never read
//! on that path, so no page of it is faulted in and the process's memory does not grow with
//! the blob: the kernel moves page-cache pages to the socket, as nginx's `sendfile on` does.
//!
//! Why not plain reads into buffers: every chunk was copied from the page cache into a fresh
//! buffer, then from the buffer into freshly allocated socket memory. On a VM whose freed pages
//! go back to the host (free page reporting, balloons), those fresh pages each cost a host
//! fault, and a warm 200 MiB GET varied from 0.7x to 1.8x nginx's time (issue 15).
//!
//! Safety: a mapping is read only if something touches a chunk's bytes (TLS, HTTP/2, or a
//! writer that is not the zero-copy one). Reading a mapped page past the file's end raises
//! SIGBUS, so only committed blobs are mapped: cistern never truncates or rewrites a committed
//! file in place (eviction and purges unlink it; a mapping keeps an unlinked file's pages), and
//! only the zero-copy path asks for mapped chunks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::sync::Locked;

/// The mapped regions, by start address: how a writer finds, from a chunk's address, the file
/// and offset its bytes come from. A region is in here exactly while it is mapped.
static REGIONS: Mutex<BTreeMap<usize, Region>> = Mutex::new(BTreeMap::new());

/// How many regions are mapped: lets writers skip the lookup when none is.
static MAPPED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of mapped files handed to sockets without a copy, since start (for `/metrics`).
static SENT: AtomicU64 = AtomicU64::new(0);

/// A writer sent `n` bytes of a mapped file without copying them.
pub fn count_sent(n: usize) {
    SENT.fetch_add(n as u64, Ordering::Relaxed);
}

/// Bytes of mapped files sent without a copy since the process started.
pub fn sent_bytes() -> u64 {
    SENT.load(Ordering::Relaxed)
}

struct Region {
    len: usize,
    file: Arc<File>,
}

/// A whole committed file, mapped read-only.
pub struct MappedFile {
    /// The mapping's address; a `usize` so that the type is `Send` and `Sync` (the mapping is
    /// read-only and shared; nothing writes through it).
    addr: usize,
    len: usize,
}

impl MappedFile {
    /// Maps the first `len` bytes of `file` (a committed blob of that size).
    pub fn map(file: Arc<File>, len: u64) -> io::Result<Arc<MappedFile>> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty file cannot be mapped",
            ));
        }
        // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the
        // address. The file descriptor may be closed later: the mapping holds its own
        // reference to the file.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = ptr as usize;
        REGIONS.locked().insert(addr, Region { len, file });
        MAPPED.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(MappedFile { addr, len }))
    }

    /// Bytes `start..start + len` of the file, as `Bytes` that keep the mapping alive. `None`
    /// if that is not inside the file.
    pub fn slice(self: &Arc<Self>, start: u64, len: usize) -> Option<Bytes> {
        let start = usize::try_from(start).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len || len == 0 {
            return None;
        }
        Some(Bytes::from_owner(MappedSlice {
            map: self.clone(),
            start,
            len,
        }))
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // Out of the registry first: once unmapped, the address may be reused by another
        // mapping, which must not be taken for this file.
        REGIONS.locked().remove(&self.addr);
        MAPPED.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: `addr..addr + len` is the mapping `map` made, and nothing refers to it any
        // more: every `MappedSlice` holds an `Arc` to `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The owner behind a mapped `Bytes`.
struct MappedSlice {
    map: Arc<MappedFile>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `start + len <= map.len` (checked in `slice`) and the mapping lives as long
        // as `map`. Reading it is safe while the file is not truncated (see the module doc).
        unsafe { std::slice::from_raw_parts((self.map.addr + self.start) as *const u8, self.len) }
    }
}

/// Where the bytes at `ptr..ptr + len` come from, if they lie inside one mapped file: the
/// file and the offset of `ptr` in it. The caller holds a `Bytes` over those bytes, so the
/// mapping (and the answer) stays valid while it uses it.
pub fn source_of(ptr: *const u8, len: usize) -> Option<(Arc<File>, u64)> {
    if MAPPED.load(Ordering::Relaxed) == 0 || len == 0 {
        return None;
    }
    let addr = ptr as usize;
    let regions = REGIONS.locked();
    let (&start, region) = regions.range(..=addr).next_back()?;
    let end = addr.checked_add(len)?;
    if end > start + region.len {
        return None;
    }
    Some((region.file.clone(), (addr - start) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn slices_read_the_file_and_name_their_source() {
        let mut f = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&content).unwrap();
        let file = Arc::new(f);
        let map = MappedFile::map(file.clone(), content.len() as u64).unwrap();
        let chunk = map.slice(4096, 10_000).unwrap();
        assert_eq!(&chunk[..], &content[4096..14_096]);
        let (found, offset) = source_of(chunk.as_ptr(), chunk.len()).unwrap();
        assert_eq!(offset, 4096);
        assert_eq!(found.as_raw_fd(), file.as_raw_fd());
        // A sub-slice, as a writer sees after a partial write.
        let tail = chunk.slice(100..);
        assert_eq!(source_of(tail.as_ptr(), tail.len()).unwrap().1, 4196);
        // Past the mapping, or out of the file: no source, no slice.
        assert!(map.slice(99_000, 2_000).is_none());
        assert!(map.slice(0, 0).is_none());
        let heap = [1u8; 64];
        assert!(source_of(heap.as_ptr(), heap.len()).is_none());
        // Unmapped once the last slice is gone: no longer found.
        let (ptr, len) = (chunk.as_ptr(), chunk.len());
        drop((map, chunk, tail));
        assert!(source_of(ptr, len).is_none());
    }

    #[test]
    fn empty_files_are_not_mapped() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        assert!(MappedFile::map(file, 0).is_err());
    }
}
