//! The metadata files and their sizes, for the metadata budget's index at start
//! (`cache::evict::MetaUsage`): stored manifests, tag records and links, each with its size
//! and its last use (the file's mtime, stamped from the store's clock when written).
//!
//! A scan stats every manifest (it does not read them) and reads the tag records and links
//! (small, and the names they hold are the keys the reference index uses). Files that do not
//! parse are skipped here as they are by the reference index: they are not roots, and `verify`
//! or a purge deals with them.

use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use super::disk::{DiskStore, files_below};
use super::links::LinkRecord;
use super::tags::TagRecord;
use crate::oci::Digest;

/// Which metadata a file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaFile {
    Manifest(Digest),
    /// One tag record (a tag has one per Accept class).
    Tag {
        registry: String,
        repository: String,
        tag: String,
    },
    Link {
        registry: String,
        repository: String,
        digest: Digest,
    },
}

/// A metadata file: what it is, its size, its last use.
#[derive(Debug, Clone)]
pub struct MetaFileInfo {
    pub file: MetaFile,
    pub size: u64,
    pub modified: SystemTime,
}

/// Size and mtime, or `None` if the file went meanwhile (evicted, purged).
fn stat(path: &Path) -> io::Result<Option<(u64, SystemTime)>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some((m.len(), m.modified()?))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A file's bytes, or `None` if it went meanwhile.
fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl DiskStore {
    /// Every manifest, tag record and link on disk, with its size and last use (blocking).
    pub fn scan_metadata(&self) -> io::Result<Vec<MetaFileInfo>> {
        let mut out = Vec::new();
        for path in files_below(&self.root().join("manifests").join("sha256"))? {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            if let Some((size, modified)) = stat(&path)? {
                out.push(MetaFileInfo {
                    file: MetaFile::Manifest(digest),
                    size,
                    modified,
                });
            }
        }
        for path in files_below(&self.root().join("tags"))? {
            let Some(bytes) = read(&path)? else { continue };
            let Ok(r) = serde_json::from_slice::<TagRecord>(&bytes) else {
                continue;
            };
            if let Some((size, modified)) = stat(&path)? {
                out.push(MetaFileInfo {
                    file: MetaFile::Tag {
                        registry: r.registry,
                        repository: r.repository,
                        tag: r.tag,
                    },
                    size,
                    modified,
                });
            }
        }
        for path in files_below(&self.root().join("links"))? {
            let Some(bytes) = read(&path)? else { continue };
            let Ok(r) = serde_json::from_slice::<LinkRecord>(&bytes) else {
                continue;
            };
            let Ok(digest) = Digest::parse(&r.digest) else {
                continue;
            };
            if let Some((size, modified)) = stat(&path)? {
                out.push(MetaFileInfo {
                    file: MetaFile::Link {
                        registry: r.registry,
                        repository: r.repository,
                        digest,
                    },
                    size,
                    modified,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoredManifest;

    #[test]
    fn a_scan_finds_every_metadata_file_with_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        let m = StoredManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes::Bytes::from_static(b"{}"),
        };
        let d = Digest::of(b"{}");
        s.write_manifest(&d, &m).unwrap();
        let link = s.write_link("docker.io", "library/app", &d).unwrap();
        let tag = s
            .write_tag(&TagRecord {
                registry: "docker.io".into(),
                repository: "library/app".into(),
                tag: "1".into(),
                accept: "x".into(),
                digest: d.to_string(),
                media_type: m.media_type.clone(),
                size: 2,
                fetched_at_ms: 0,
            })
            .unwrap();
        assert_eq!(tag.replaced, 0);
        let mut found = s.scan_metadata().unwrap();
        found.sort_by_key(|f| f.size);
        let sizes: Vec<u64> = found.iter().map(|f| f.size).collect();
        let manifest_size = (m.media_type.len() + 1 + 2) as u64;
        let mut want = vec![manifest_size, link, tag.size];
        want.sort();
        assert_eq!(sizes, want);
        assert!(
            found
                .iter()
                .any(|f| f.file == MetaFile::Manifest(d.clone()))
        );
    }
}
