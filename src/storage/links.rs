//! Manifest links: a manifest a client pulled from a repository *by digest*, when none of that
//! repository's tags reaches it (`app@sha256:…` deployments). With the tag records they are the
//! roots of the reference index (`cache::refs`): what a repository holds, for purge and pins.
//!
//! ```text
//! data_dir/links/ab/<sha256 of registry\0repository>/<manifest digest hex>.json
//! ```
//!
//! One small file per (repository, manifest): written once, never rewritten, so concurrent
//! pulls need no read-modify-write. The file holds the names (the directory is a hash, so no
//! client input becomes a path component). Written atomically (temp file, rename), not fsynced:
//! a lost link only means a repository purge does not see that manifest.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::disk::{DiskStore, files_below, remove_if_present};
use crate::oci::Digest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRecord {
    pub registry: String,
    pub repository: String,
    pub digest: String,
}

impl DiskStore {
    fn link_dir(&self, registry: &str, repository: &str) -> PathBuf {
        let key = Digest::of(format!("{registry}\0{repository}").as_bytes());
        let hex = key.hex();
        self.root().join("links").join(&hex[..2]).join(hex)
    }

    /// Writes the link; returns its size, for the metadata budget.
    pub fn write_link(&self, registry: &str, repository: &str, digest: &Digest) -> io::Result<u64> {
        let dir = self.link_dir(registry, repository);
        self.create_dir_below_root(&dir)?;
        let record = LinkRecord {
            registry: registry.to_string(),
            repository: repository.to_string(),
            digest: digest.to_string(),
        };
        let bytes = serde_json::to_vec(&record).map_err(io::Error::other)?;
        let partial = self.create_partial(&Digest::of(&bytes))?;
        (&*partial.file).write_all(&bytes)?;
        self.stamp_written(&partial.file);
        partial.persist_to(&dir.join(format!("{}.json", digest.hex())))?;
        Ok(bytes.len() as u64)
    }

    pub fn remove_link(&self, registry: &str, repository: &str, digest: &Digest) -> io::Result<()> {
        let dir = self.link_dir(registry, repository);
        remove_if_present(&dir.join(format!("{}.json", digest.hex())))?;
        // An emptied repository directory goes too; one still in use stays.
        let _ = fs::remove_dir(&dir);
        Ok(())
    }

    /// Every link on disk. Records that do not parse (torn, or from a future version) are
    /// skipped: a link is a hint.
    pub fn list_links(&self) -> io::Result<Vec<(String, String, Digest)>> {
        let mut out = Vec::new();
        for path in files_below(&self.root().join("links"))? {
            let Ok(bytes) = fs::read(&path) else { continue };
            let Ok(r) = serde_json::from_slice::<LinkRecord>(&bytes) else {
                continue;
            };
            if let Ok(d) = Digest::parse(&r.digest) {
                out.push((r.registry, r.repository, d));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_round_trip_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        s.write_link("docker.io", "library/app", &a).unwrap();
        s.write_link("docker.io", "library/app", &a).unwrap();
        s.write_link("ghcr.io", "library/app", &b).unwrap();
        let mut all = s.list_links().unwrap();
        all.sort();
        assert_eq!(
            all,
            vec![
                ("docker.io".into(), "library/app".into(), a.clone()),
                ("ghcr.io".into(), "library/app".into(), b.clone()),
            ]
        );
        s.remove_link("docker.io", "library/app", &a).unwrap();
        s.remove_link("docker.io", "library/app", &a).unwrap();
        assert_eq!(s.list_links().unwrap().len(), 1);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
