//! `DataDir`: a temporary data directory for a cistern under test, and what tests look for in
//! it (committed blobs and manifests, partial files, anything written beside it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

// === impl DataDir ===

/// A data directory `<root>/data` inside a private temporary `<root>`, so a test can check that
/// nothing was written next to it. Deleted when the last clone is dropped.
#[derive(Clone)]
pub struct DataDir {
    root: Arc<tempfile::TempDir>,
    data: PathBuf,
}

impl Default for DataDir {
    fn default() -> Self {
        DataDir::new()
    }
}

impl DataDir {
    pub fn new() -> DataDir {
        let root = tempfile::Builder::new()
            .prefix("cistern-test-")
            .tempdir()
            .expect("create temp dir");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("create data dir");
        DataDir {
            root: Arc::new(root),
            data,
        }
    }

    /// The data directory handed to cistern.
    pub fn path(&self) -> &Path {
        &self.data
    }

    /// The private directory that holds `path()` and nothing else unless a test puts it there.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Where a committed blob lives: `blobs/sha256/<2 hex>/<64 hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path_in(&self.data, digest)
    }

    /// The committed blob's bytes, once its commit is done. A client's GET ends as soon as
    /// the blob is verified, a moment before the commit (fsync, rename) makes it visible.
    pub async fn committed_blob(&self, digest: &str) -> Vec<u8> {
        self.wait_for_blob(digest, &format!("blob {digest} to be committed"))
            .await;
        std::fs::read(self.blob_path(digest)).expect("read the committed blob")
    }

    /// Where a committed manifest lives: `manifests/sha256/<2 hex>/<64 hex>`.
    pub fn manifest_path(&self, digest: &str) -> PathBuf {
        self.data.join("manifests").join(shard(digest))
    }

    /// Every file (not directory) below `data/<sub>`, recursively, as paths relative to the
    /// data directory. Empty if `sub` does not exist.
    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
        files_in(&self.data, sub)
    }

    pub fn tmp_files(&self) -> Vec<PathBuf> {
        self.files("tmp")
    }

    pub fn blob_files(&self) -> Vec<PathBuf> {
        self.files("blobs")
    }

    /// Waits (bounded by the patience) until blob `digest` is committed: a fill nobody is
    /// reading, or the rename that may trail a response's last byte.
    pub async fn wait_for_blob(&self, digest: &str, what: &str) {
        super::eventually(what, super::patience(), || self.blob_path(digest).is_file()).await;
    }

    /// Asserts that no blob was committed: `blobs/` holds no file at all.
    #[track_caller]
    pub fn assert_no_blob_files(&self, what: &str) {
        assert_eq!(self.blob_files(), Vec::<PathBuf>::new(), "{what}");
    }

    pub fn manifest_files(&self) -> Vec<PathBuf> {
        self.files("manifests")
    }

    /// Names directly inside `root()`.
    pub fn root_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root())
            .expect("read temp root")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// Every file below `root()` that is not below `path()`, relative to `root()`.
    pub fn files_outside_data(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        walk(self.root(), self.root(), &mut all);
        all.retain(|p| !p.starts_with("data"));
        all.sort();
        all
    }
}

/// Where a committed blob lives in the data directory `data` (one a child process sees through
/// `/proc/<pid>/root`, say).
pub fn blob_path_in(data: &Path, digest: &str) -> PathBuf {
    data.join("blobs").join(shard(digest))
}

/// Every file below `data/<sub>`, relative to `data`, sorted.
pub fn files_in(data: &Path, sub: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    walk(data, &data.join(sub), &mut out);
    out.sort();
    out
}

fn shard(digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    PathBuf::from("sha256").join(&hex[..2]).join(hex)
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // symlink_metadata: never follow a link out of the tree.
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(base, &path, out),
            Ok(_) => out.push(path.strip_prefix(base).unwrap_or(&path).to_path_buf()),
            Err(_) => {}
        }
    }
}
