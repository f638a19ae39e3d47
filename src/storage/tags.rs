//! Tag records on disk: what a tag resolved to, and when, so tag answers survive a restart
//! (for stale-if-error and offline mode).
//!
//! ```text
//! data_dir/tags/ab/<sha256 of registry\0repository\0tag>/<sha256 of the Accept key>.json
//! ```
//!
//! Paths are hashes, so no client input ever becomes a path component. Each tag has a
//! directory with one record per Accept class (`oci::media_types::AcceptClass::key`, the known
//! manifest types the client accepts): offline mode can fall back to a record made for another
//! class.
//!
//! Earlier versions keyed records by the raw Accept set. For a set of known types (what real
//! clients send) the key is the same string, so those records are read as before. The others
//! (a set with unknown types, or no Accept) are never looked up by `read_tag` again: the next
//! refresh writes the class's own record. Until their tag is purged they stay harmless: the
//! reference index files them under their class (the newest record of a class wins), and
//! offline mode may serve one as another client's answer, which it is. Records are written atomically (temp file, rename) but not
//! fsynced: a record is a hint that can always be asked again upstream, and a torn or missing
//! one only costs that.

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::disk::DiskStore;
use crate::oci::Digest;

/// What writing a record did to the bytes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub size: u64,
    /// The size of the record it replaced; 0 if it was new.
    pub replaced: u64,
}

/// What a tag resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    /// `AcceptClass::key` of the Accept class it was resolved for (earlier versions: the raw
    /// Accept set, sorted, lower-cased, joined by `,`).
    pub accept: String,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Milliseconds since the Unix epoch.
    pub fetched_at_ms: u64,
}

impl TagRecord {
    pub fn fetched_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.fetched_at_ms)
    }

    pub fn digest(&self) -> Option<Digest> {
        Digest::parse(&self.digest).ok()
    }
}

pub fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl DiskStore {
    fn tag_dir(&self, registry: &str, repository: &str, tag: &str) -> PathBuf {
        let key = Digest::of(format!("{registry}\0{repository}\0{tag}").as_bytes());
        let hex = key.hex();
        self.root().join("tags").join(&hex[..2]).join(hex)
    }

    /// The record for exactly this Accept set, if any.
    pub fn read_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        accept: &str,
    ) -> io::Result<Option<TagRecord>> {
        let file = self
            .tag_dir(registry, repository, tag)
            .join(format!("{}.json", Digest::of(accept.as_bytes()).hex()));
        read_record(&file)
    }

    /// Every record of a tag, whatever Accept set it was made for.
    pub fn read_tag_any(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> io::Result<Vec<TagRecord>> {
        let dir = self.tag_dir(registry, repository, tag);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            if let Some(r) = read_record(&entry?.path())? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Every tag record on disk (records that do not parse are skipped).
    pub fn list_tags(&self) -> io::Result<Vec<TagRecord>> {
        let mut out = Vec::new();
        for path in super::disk::files_below(&self.root().join("tags"))? {
            if let Some(r) = read_record(&path)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Removes every record of a tag (all Accept sets). Gone already is fine.
    pub fn remove_tag(&self, registry: &str, repository: &str, tag: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.tag_dir(registry, repository, tag)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Writes (or replaces) the record for its Accept set. Returns the record's size and the
    /// size of the record it replaced (0 if none), for the metadata budget.
    pub fn write_tag(&self, record: &TagRecord) -> io::Result<Written> {
        let dir = self.tag_dir(&record.registry, &record.repository, &record.tag);
        self.create_dir_below_root(&dir)?;
        let dest = dir.join(format!(
            "{}.json",
            Digest::of(record.accept.as_bytes()).hex()
        ));
        let bytes = serde_json::to_vec(record).map_err(io::Error::other)?;
        let partial = self.create_partial(&Digest::of(&bytes))?;
        (&*partial.file).write_all(&bytes)?;
        self.stamp_written(&partial.file);
        let replaced = super::disk::file_size(&dest)?.unwrap_or(0);
        partial.persist_to(&dest)?;
        Ok(Written {
            size: bytes.len() as u64,
            replaced,
        })
    }
}

fn read_record(path: &std::path::Path) -> io::Result<Option<TagRecord>> {
    match fs::read(path) {
        // A record that does not parse (torn, or from a future version) is no record.
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(accept: &str, digest_of: &[u8]) -> TagRecord {
        TagRecord {
            registry: "docker.io".into(),
            repository: "library/alpine".into(),
            tag: "3.20".into(),
            accept: accept.into(),
            digest: Digest::of(digest_of).to_string(),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            size: 10,
            fetched_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn records_round_trip_per_accept_set() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        assert_eq!(
            s.read_tag("docker.io", "library/alpine", "3.20", "a")
                .unwrap(),
            None
        );
        let a = record("a", b"x");
        let b = record("b", b"y");
        s.write_tag(&a).unwrap();
        s.write_tag(&b).unwrap();
        assert_eq!(
            s.read_tag("docker.io", "library/alpine", "3.20", "a")
                .unwrap(),
            Some(a.clone())
        );
        let mut all = s
            .read_tag_any("docker.io", "library/alpine", "3.20")
            .unwrap();
        all.sort_by(|x, y| x.accept.cmp(&y.accept));
        assert_eq!(all, vec![a.clone(), b]);
        // Another registry's tag of the same name is another record.
        assert_eq!(
            s.read_tag("ghcr.io", "library/alpine", "3.20", "a")
                .unwrap(),
            None
        );
        // Rewriting replaces.
        let newer = TagRecord {
            fetched_at_ms: a.fetched_at_ms + 1,
            ..a
        };
        s.write_tag(&newer).unwrap();
        assert_eq!(
            s.read_tag("docker.io", "library/alpine", "3.20", "a")
                .unwrap(),
            Some(newer)
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        assert_eq!(s.list_tags().unwrap().len(), 2);
        s.remove_tag("docker.io", "library/alpine", "3.20").unwrap();
        s.remove_tag("docker.io", "library/alpine", "3.20").unwrap();
        assert!(s.list_tags().unwrap().is_empty());
    }

    #[test]
    fn torn_record_is_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStore::open(dir.path()).unwrap();
        s.write_tag(&record("a", b"x")).unwrap();
        let tag_dir = s.tag_dir("docker.io", "library/alpine", "3.20");
        let file = fs::read_dir(&tag_dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        fs::write(&file, b"{\"registry\":").unwrap();
        assert_eq!(
            s.read_tag("docker.io", "library/alpine", "3.20", "a")
                .unwrap(),
            None
        );
    }
}
