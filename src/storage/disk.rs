//! Content-addressed files under the data directory.
//!
//! ```text
//! data_dir/
//!   lock                        held (flock) by the running server: one process per cache
//!   blobs/sha256/ab/abcd…       verified blobs, named by their digest
//!   manifests/sha256/ab/abcd…   "<media type>\n" followed by the manifest's exact bytes
//!   tags/, links/               what repositories and tags name (`tags.rs`, `links.rs`)
//!   pins.json                   pins made through the admin API
//!   tmp/                        fills in progress; never served by lookup, swept at start
//! ```
//!
//! Architecture invariant: a file appears under `blobs/` or `manifests/` only by an atomic
//! rename from `tmp/`, after its bytes were verified against the digest it is named by and
//! flushed with fsync; the directory is fsynced after the rename. So a crash at any moment
//! leaves either nothing or a complete, verified file under its real name. `tmp/` lives on the
//! same file system, which is what makes the rename atomic.
//!
//! All functions here block; async callers run them on the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::clock::Clock;
use crate::oci::Digest;

pub struct DiskStore {
    root: PathBuf,
    blobs: PathBuf,
    manifests: PathBuf,
    tmp: PathBuf,
    /// Held open for the life of the store: the exclusive lock on `data_dir/lock` keeps a
    /// second cistern from sweeping this one's `tmp/` or racing its renames.
    _lock: File,
    /// Makes temp-file names unique within the process.
    next_tmp: AtomicU64,
    /// What blob mtimes (last access, for LRU across restarts) are stamped with.
    clock: Clock,
}

/// A manifest as stored: its media type and exact bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredManifest {
    pub media_type: String,
    pub bytes: Bytes,
}

impl DiskStore {
    /// Opens (creating if needed) the cache at `root`, takes its lock and removes every
    /// leftover temporary file: those are fills that were interrupted by a crash or kill, and
    /// were never verified.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        fs::create_dir_all(root)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("{} is in use by another cistern process", root.display()),
                ));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let store = DiskStore {
            root: root.to_path_buf(),
            blobs: root.join("blobs"),
            manifests: root.join("manifests"),
            tmp: root.join("tmp"),
            _lock: lock,
            next_tmp: AtomicU64::new(0),
            clock: Clock::system(),
        };
        fs::create_dir_all(store.blobs.join("sha256"))?;
        fs::create_dir_all(store.manifests.join("sha256"))?;
        fs::create_dir_all(&store.tmp)?;
        let swept = store.sweep_tmp()?;
        if swept > 0 {
            tracing::info!(
                swept,
                "removed leftover temporary files from an earlier run"
            );
        }
        Ok(store)
    }

    /// Stamps blob access times (mtimes) from `clock` instead of the system clock: the
    /// server's clock, so that eviction order follows it, in tests a manual one.
    pub fn with_clock(mut self, clock: Clock) -> DiskStore {
        self.clock = clock;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes everything in `tmp/`. Only called at start-up, under the lock.
    fn sweep_tmp(&self) -> io::Result<usize> {
        let mut n = 0;
        for entry in fs::read_dir(&self.tmp)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            n += 1;
        }
        Ok(n)
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.shard_path())
    }

    pub(crate) fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.manifests.join(digest.shard_path())
    }

    /// Opens a committed blob: `None` if it is not cached.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a committed blob for a client and records the access in the file's mtime, which
    /// is what keeps LRU order across restarts.
    pub fn open_blob_for_read(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        let found = self.open_blob(digest)?;
        if let Some((file, _)) = &found {
            self.stamp_access(file, digest);
        }
        Ok(found)
    }

    /// Sets a blob file's mtime, its last access, to now on the store's clock. A failure only
    /// costs LRU precision, so it is logged, not returned.
    fn stamp_access(&self, file: &File, digest: &Digest) {
        if let Err(e) = file.set_modified(self.clock.wall_now()) {
            tracing::debug!(%digest, error = %e, "could not record blob access time");
        }
    }

    /// Stamps a metadata file (manifest, tag record, link) with the store clock's now before
    /// it is renamed into place: the metadata budget's index reads its mtime at start as the
    /// last use, and compares it with times from the same clock. A failure only costs that
    /// order's precision.
    pub(crate) fn stamp_written(&self, file: &File) {
        if let Err(e) = file.set_modified(self.clock.wall_now()) {
            tracing::debug!(error = %e, "could not stamp a metadata file's time");
        }
    }

    /// Every committed blob: digest, size, last access (mtime). Files that are not named by
    /// a digest are skipped (`verify` removes them).
    pub fn list_blobs(&self) -> io::Result<Vec<(Digest, u64, std::time::SystemTime)>> {
        let mut out = Vec::new();
        for path in files_below(&self.blobs.join("sha256"))? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            let meta = fs::metadata(&path)?;
            out.push((digest, meta.len(), meta.modified()?));
        }
        Ok(out)
    }

    /// Every committed blob, one shard directory (`blobs/sha256/ab/`) at a time: `each` gets
    /// a shard's (digest, size, last access) and returns false to stop the scan. Files that
    /// are not named by a digest are skipped. For the start-up index: a batch per shard keeps
    /// the scan's own memory to 1/256 of the cache, and lets the index take each batch in
    /// under its lock briefly while the server already serves.
    pub fn scan_blobs(
        &self,
        mut each: impl FnMut(Vec<(Digest, u64, std::time::SystemTime)>) -> bool,
    ) -> io::Result<()> {
        let shards = match fs::read_dir(self.blobs.join("sha256")) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            let mut batch = Vec::new();
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(digest) = name
                    .to_str()
                    .and_then(|n| Digest::parse(&format!("sha256:{n}")).ok())
                else {
                    continue;
                };
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Removed (evicted, purged) since the directory was read.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                if meta.is_file() {
                    batch.push((digest, meta.len(), meta.modified()?));
                }
            }
            if !each(batch) {
                break;
            }
        }
        Ok(())
    }

    /// Every stored manifest's digest. Files not named by a digest are skipped.
    pub fn list_manifests(&self) -> io::Result<Vec<Digest>> {
        Ok(files_below(&self.manifests.join("sha256"))?
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()))
            .filter_map(|n| Digest::parse(&format!("sha256:{n}")).ok())
            .collect())
    }

    /// The size of a committed blob's file, if it is there.
    pub fn blob_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        file_size(&self.blob_path(digest))
    }

    /// The size of a stored manifest's file (media type line included), if it is there.
    pub fn manifest_file_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        file_size(&self.manifest_path(digest))
    }

    /// Removes a cached manifest (purge). Gone already is fine.
    pub fn remove_manifest(&self, digest: &Digest) -> io::Result<()> {
        remove_if_present(&self.manifest_path(digest))
    }

    /// The pin patterns made through the admin API (`pins.json`: a JSON list of strings, each
    /// a digest as in earlier versions, or a `policy::pins` pattern). Not checked here.
    pub fn read_pins(&self) -> io::Result<Vec<String>> {
        let raw = match fs::read(self.root.join("pins.json")) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&raw)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("pins.json: {e}")))
    }

    /// Saves the pins atomically (they are a user's decision: fsynced).
    pub fn write_pins(&self, pins: &[String]) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(pins).map_err(io::Error::other)?;
        let partial = self.create_partial(&Digest::of(&bytes))?;
        (&*partial.file).write_all(&bytes)?;
        partial.file.sync_all()?;
        partial.persist_to(&self.root.join("pins.json"))?;
        sync_dir(&self.root)
    }

    /// Removes a committed blob (eviction). Gone already is fine.
    pub fn remove_blob(&self, digest: &Digest) -> io::Result<()> {
        remove_if_present(&self.blob_path(digest))
    }

    /// Is the blob committed? (A cheap check used under the fill lock.)
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Creates a new, empty temporary file for filling `digest`.
    pub fn create_partial(&self, digest: &Digest) -> io::Result<PartialBlob> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!(
            "{}.{}.{n}.partial",
            digest.hex(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(PartialBlob {
            path,
            file: Arc::new(file),
            committed: false,
        })
    }

    /// Creates `dir` and whichever of its parents are missing, but never the data directory
    /// itself: if it was removed under a running server, a write fails (and is logged)
    /// instead of quietly creating a stray piece of the tree again.
    pub(crate) fn create_dir_below_root(&self, dir: &Path) -> io::Result<()> {
        match fs::create_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match dir.parent() {
                Some(parent) if parent != self.root && parent.starts_with(&self.root) => {
                    self.create_dir_below_root(parent)?;
                    self.create_dir_below_root(dir)
                }
                _ => Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} is gone (was the data directory removed?)",
                        dir.display()
                    ),
                )),
            },
            Err(e) => Err(e),
        }
    }

    /// Makes a verified partial blob visible under its digest: stamp its first access, fsync
    /// the file, rename it into place, fsync the directory. The caller has checked the digest.
    pub fn commit_blob(&self, mut partial: PartialBlob, digest: &Digest) -> io::Result<()> {
        // The write's own mtime is the system's time; the access times the index compares
        // it with are the store clock's.
        self.stamp_access(&partial.file, digest);
        partial.file.sync_all()?;
        let dest = self.blob_path(digest);
        let dir = parent_dir(&dest)?;
        self.create_dir_below_root(dir)?;
        fs::rename(&partial.path, &dest)?;
        partial.committed = true;
        sync_dir(dir)
    }

    pub fn read_manifest(&self, digest: &Digest) -> io::Result<Option<StoredManifest>> {
        let raw = match fs::read(self.manifest_path(digest)) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some((line, _)) = raw
            .iter()
            .position(|&b| b == b'\n')
            .and_then(|nl| raw.split_at_checked(nl))
        else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("manifest file for {digest} has no media type line"),
            ));
        };
        let media_type = String::from_utf8_lossy(line).into_owned();
        let nl = line.len();
        let bytes = Bytes::from(raw).slice(nl + 1..);
        // Stored files were verified when written; a mismatch now means the disk changed
        // under us. Manifests are small, so checking on every read from disk is cheap.
        if Digest::of(&bytes) != *digest {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("manifest file for {digest} does not match its digest"),
            ));
        }
        Ok(Some(StoredManifest { media_type, bytes }))
    }

    /// Stores a manifest whose bytes the caller has verified against `digest`.
    pub fn write_manifest(&self, digest: &Digest, manifest: &StoredManifest) -> io::Result<()> {
        if manifest.media_type.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "media type contains a newline",
            ));
        }
        let mut partial = self.create_partial(digest)?;
        {
            let mut f: &File = &partial.file;
            f.write_all(manifest.media_type.as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(&manifest.bytes)?;
            self.stamp_written(f);
            f.sync_all()?;
        }
        let dest = self.manifest_path(digest);
        let dir = parent_dir(&dest)?;
        self.create_dir_below_root(dir)?;
        fs::rename(&partial.path, &dest)?;
        partial.committed = true;
        sync_dir(dir)
    }
}

/// The directory a file of the store goes in. Every path the store builds is the root joined
/// with more components, so the error is never returned.
fn parent_dir(path: &Path) -> io::Result<&Path> {
    path.parent()
        .ok_or_else(|| io::Error::other(format!("{} has no parent", path.display())))
}

/// What `DiskStore::verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs_ok: u64,
    pub blob_bytes: u64,
    pub manifests_ok: u64,
    /// Files that failed verification (or do not belong) and were removed, relative to the
    /// data directory, with the reason.
    pub removed: Vec<(PathBuf, String)>,
}

impl DiskStore {
    /// Re-hashes every cached blob and manifest and removes those whose content does not
    /// match the digest they are named by, and files that do not belong in the layout.
    /// `progress` is called after each file with the bytes hashed so far.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> io::Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut hashed = 0u64;
        for (dir, is_blob) in [(&self.blobs, true), (&self.manifests, false)] {
            for path in files_below(&dir.join("sha256"))? {
                let rel = path.strip_prefix(&self.root).unwrap_or(&path).to_path_buf();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                    fs::remove_file(&path)?;
                    report.removed.push((rel, "not named by a digest".into()));
                    continue;
                };
                if path.parent() != dir.join(digest.shard_path()).parent() {
                    fs::remove_file(&path)?;
                    report
                        .removed
                        .push((rel, "in the wrong shard directory".into()));
                    continue;
                }
                if is_blob {
                    let mut verifier = crate::oci::DigestVerifier::new();
                    let mut file = File::open(&path)?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = std::io::Read::read(&mut file, &mut buf)?;
                        if n == 0 {
                            break;
                        }
                        let read = buf
                            .get(..n)
                            .ok_or_else(|| io::Error::other("read past the end of the buffer"))?;
                        verifier.update(read);
                        hashed += n as u64;
                    }
                    let len = verifier.len();
                    let actual = verifier.finish();
                    if actual == digest {
                        report.blobs_ok += 1;
                        report.blob_bytes += len;
                    } else {
                        fs::remove_file(&path)?;
                        report
                            .removed
                            .push((rel, format!("content has digest {actual}")));
                    }
                } else {
                    match self.read_manifest(&digest) {
                        Ok(Some(_)) => report.manifests_ok += 1,
                        Ok(None) => {}
                        Err(e) => {
                            fs::remove_file(&path)?;
                            report.removed.push((rel, e.to_string()));
                        }
                    }
                }
                progress(hashed);
            }
        }
        Ok(report)
    }
}

/// Every regular file below `dir`, recursively (none if it does not exist).
pub(crate) fn files_below(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes a file; one that is already gone is not an error.
pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn file_size(path: &Path) -> io::Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A blob being filled in `tmp/`. Dropping it without committing removes the file, so an
/// abandoned or failed fill never leaves anything behind (and a cancelled fill future cleans
/// up after itself).
pub struct PartialBlob {
    path: PathBuf,
    /// Shared with readers, which follow the growing file with positioned reads
    /// (`read_at`), so they never disturb the writer's offset and keep working after the
    /// file is renamed into place.
    pub file: Arc<File>,
    committed: bool,
}

impl PartialBlob {
    /// Renames the temporary file to `dest` (same file system), replacing what is there.
    /// No fsync: for small records that can be rebuilt, where atomicity is enough.
    pub fn persist_to(mut self, dest: &Path) -> io::Result<()> {
        fs::rename(&self.path, dest)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for PartialBlob {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove partial file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn store() -> (tempfile::TempDir, DiskStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        (dir, s)
    }

    #[test]
    fn a_removed_data_directory_is_not_created_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let s = DiskStore::open(&root).unwrap();
        let data = b"late commit";
        let digest = Digest::of(data);
        let p = s.create_partial(&digest).unwrap();
        (&*p.file).write_all(data).unwrap();
        // Shards and parents below the root are created as needed ...
        fs::remove_dir_all(root.join("blobs")).unwrap();
        s.commit_blob(p, &digest).unwrap();
        assert!(s.open_blob(&digest).unwrap().is_some());
        // ... but a root removed under the store stays removed: the write fails instead.
        let p = s.create_partial(&Digest::of(b"other")).unwrap();
        fs::remove_dir_all(&root).unwrap();
        let e = s.commit_blob(p, &Digest::of(b"other")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(
            s.write_link("registry.test", "library/app", &digest)
                .is_err()
        );
        assert!(!root.exists());
    }

    #[test]
    fn blob_commit_makes_it_visible() {
        let (_d, s) = store();
        let data = b"layer bytes";
        let digest = Digest::of(data);
        assert!(s.open_blob(&digest).unwrap().is_none());
        let p = s.create_partial(&digest).unwrap();
        (&*p.file).write_all(data).unwrap();
        let reader = p.file.clone();
        assert!(
            s.open_blob(&digest).unwrap().is_none(),
            "partial is invisible"
        );
        s.commit_blob(p, &digest).unwrap();
        let (f, len) = s.open_blob(&digest).unwrap().unwrap();
        assert_eq!(len, data.len() as u64);
        let mut buf = vec![0; data.len()];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
        // A reader holding the partial's handle still reads after the rename.
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn dropped_partial_is_removed() {
        let (_d, s) = store();
        let digest = Digest::of(b"x");
        let p = s.create_partial(&digest).unwrap();
        (&*p.file).write_all(b"half").unwrap();
        drop(p);
        assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
        assert!(s.open_blob(&digest).unwrap().is_none());
    }

    #[test]
    fn open_sweeps_tmp_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp/sub")).unwrap();
        fs::write(dir.path().join("tmp/abc.partial"), b"junk").unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let second = DiskStore::open(dir.path());
        assert!(second.is_err(), "a second process must not share the cache");
        drop(s);
        DiskStore::open(dir.path()).unwrap();
    }

    #[test]
    fn manifests_round_trip_byte_exact() {
        let (_d, s) = store();
        let bytes = Bytes::from_static(b"{ \"schemaVersion\" : 2,\n\t\"z\":1, \"a\":0 }  ");
        let digest = Digest::of(&bytes);
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes.clone(),
        };
        assert_eq!(s.read_manifest(&digest).unwrap(), None);
        s.write_manifest(&digest, &m).unwrap();
        assert_eq!(s.read_manifest(&digest).unwrap(), Some(m));
    }

    #[test]
    fn verify_drops_what_does_not_match() {
        let (_d, s) = store();
        let good = b"good layer";
        let gd = Digest::of(good);
        let p = s.create_partial(&gd).unwrap();
        (&*p.file).write_all(good).unwrap();
        s.commit_blob(p, &gd).unwrap();
        let bad = Digest::of(b"original");
        let p = s.create_partial(&bad).unwrap();
        (&*p.file).write_all(b"original").unwrap();
        s.commit_blob(p, &bad).unwrap();
        fs::write(s.blob_path(&bad), b"bit rot!").unwrap();
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: Bytes::from_static(b"{}"),
        };
        s.write_manifest(&Digest::of(b"{}"), &m).unwrap();
        fs::write(s.root().join("blobs/sha256/stray"), b"x").unwrap();

        let report = s.verify(|_| {}).unwrap();
        assert_eq!(report.blobs_ok, 1);
        assert_eq!(report.blob_bytes, good.len() as u64);
        assert_eq!(report.manifests_ok, 1);
        let removed: Vec<String> = report
            .removed
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(s.open_blob(&gd).unwrap().is_some());
        assert!(s.open_blob(&bad).unwrap().is_none());
        assert_eq!(s.verify(|_| {}).unwrap().removed, vec![]);
    }

    #[test]
    fn corrupt_manifest_is_an_error_not_content() {
        let (_d, s) = store();
        let digest = Digest::of(b"{}");
        let path = s.manifest_path(&digest);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"application/json\n{ }").unwrap();
        assert!(s.read_manifest(&digest).is_err());
    }
}
