//! Writes images from a cache's store as an OCI image layout: a directory, or a tar of one when
//! the output's name ends in `.tar`.
//!
//! Everything is looked up before anything is written: each image's tag record (or digest),
//! every manifest below it (read and checked against its digest by the store), every blob's
//! presence. A missing piece fails the export naming the image and the digest, and no output
//! appears. Then the layout is written under a temporary name beside the output
//! (`OUT.tmp-<pid>`), blobs streamed through a hash (never read whole into memory) and checked
//! against their names, and renamed to OUT only when all of it was written and synced. A
//! failure removes the temporary file or directory.
//!
//! The store is only read: blob access times are not touched, so an export does not reorder
//! eviction.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;

use super::hashing::{CHUNK, Hashing};
use super::model::{self, Entry, ImageRef};
use crate::oci::{Digest, DigestVerifier};
use crate::storage::DiskStore;

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportReport {
    pub images: usize,
    pub manifests: usize,
    pub blobs: usize,
    /// Bytes of every file under `blobs/` (manifests included).
    pub bytes: u64,
}

/// One file of `blobs/sha256/`, in the order written.
enum Item {
    Manifest(Digest, Bytes),
    Blob { digest: Digest, size: u64 },
}

/// Exports `images` from `store` to `out` (see the module's documentation). `out` must not
/// exist yet.
pub fn export(store: &DiskStore, images: &[ImageRef], out: &Path) -> anyhow::Result<ExportReport> {
    if fs::symlink_metadata(out).is_ok() {
        bail!(
            "{} exists already: remove it or choose another output",
            out.display()
        );
    }
    let (entries, items) = plan(store, images)?;
    let index = model::index_json(&entries);
    let as_tar = out.extension().is_some_and(|e| e == "tar");
    let tmp = temporary_name(out)?;
    let written = if as_tar {
        write_tar(store, &items, &index, &tmp)
    } else {
        write_dir(store, &items, &index, &tmp)
    };
    let finished = written.and_then(|report| {
        fs::rename(&tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
        sync_parent(out)?;
        Ok(report)
    });
    match finished {
        Ok(mut report) => {
            report.images = entries.len();
            Ok(report)
        }
        Err(e) => {
            let removed = if as_tar {
                fs::remove_file(&tmp)
            } else {
                fs::remove_dir_all(&tmp)
            };
            if let Err(r) = removed
                && r.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(path = %tmp.display(), error = %r, "could not remove a partial export");
            }
            Err(e)
        }
    }
}

/// `OUT.tmp-<pid>` beside OUT: on the same file system, so the final rename is atomic.
fn temporary_name(out: &Path) -> anyhow::Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| anyhow!("{}: the output needs a file name", out.display()))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    Ok(out.with_file_name(tmp))
}

/// Resolves every image and lists every manifest and blob the layout needs, each once,
/// failing on the first thing the cache does not hold.
fn plan(store: &DiskStore, images: &[ImageRef]) -> anyhow::Result<(Vec<Entry>, Vec<Item>)> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut items = Vec::new();
    let mut seen = BTreeSet::new();
    for image in images {
        if entries.iter().any(|e| e.image == *image) {
            continue;
        }
        let digest = resolve(store, image)?;
        let top = read_manifest(store, image, &digest)?;
        entries.push(Entry {
            image: image.clone(),
            media_type: top.0.clone(),
            digest: digest.clone(),
            size: top.1.len() as u64,
        });
        // Depth first from the top manifest; an index's children are manifests too.
        let mut pending = vec![(digest, Some(top))];
        while let Some((digest, known)) = pending.pop() {
            if !seen.insert(digest.clone()) {
                continue;
            }
            let (_, bytes) = match known {
                Some(m) => m,
                None => read_manifest(store, image, &digest)?,
            };
            let contents =
                model::contents(&bytes).map_err(|e| anyhow!("{image}: manifest {digest}: {e}"))?;
            items.push(Item::Manifest(digest, bytes));
            for blob in contents.blobs.into_iter().map(|n| n.digest) {
                if !seen.insert(blob.clone()) {
                    continue;
                }
                let size = store
                    .blob_size(&blob)
                    .with_context(|| format!("{image}: reading blob {blob}"))?
                    .ok_or_else(|| anyhow!("{image}: blob {blob} is not in the cache"))?;
                items.push(Item::Blob { digest: blob, size });
            }
            for child in contents.manifests.into_iter().rev() {
                pending.push((child.digest, None));
            }
        }
    }
    Ok((entries, items))
}

/// The digest an image names: its own, or its tag's newest record.
fn resolve(store: &DiskStore, image: &ImageRef) -> anyhow::Result<Digest> {
    if let Some(d) = &image.digest {
        return Ok(d.clone());
    }
    let Some(tag) = &image.tag else {
        bail!("{image}: names neither a tag nor a digest");
    };
    let records = store
        .read_tag_any(&image.registry, image.repository.as_str(), tag.as_str())
        .with_context(|| format!("{image}: reading its tag records"))?;
    model::newest_tag_record(&records)
        .and_then(|r| r.digest())
        .ok_or_else(|| {
            anyhow!("{image}: the cache has no record of this tag (pull it through cistern first)")
        })
}

/// A manifest's media type and exact bytes (the store checks them against the digest).
fn read_manifest(
    store: &DiskStore,
    image: &ImageRef,
    digest: &Digest,
) -> anyhow::Result<(String, Bytes)> {
    let m = store
        .read_manifest(digest)
        .with_context(|| format!("{image}: reading manifest {digest}"))?
        .ok_or_else(|| anyhow!("{image}: manifest {digest} is not in the cache"))?;
    Ok((m.media_type, m.bytes))
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// Copies a cached blob into `sink`, hashing it on the way; an error if the file does not hold
/// exactly `size` bytes with that digest (a cached file damaged since it was verified).
fn copy_blob(
    store: &DiskStore,
    digest: &Digest,
    size: u64,
    sink: impl FnOnce(&mut dyn Read) -> io::Result<()>,
) -> anyhow::Result<()> {
    let (file, _) = store
        .open_blob(digest)
        .with_context(|| format!("opening cached blob {digest}"))?
        .ok_or_else(|| anyhow!("blob {digest} left the cache during the export"))?;
    let mut reader = Hashing {
        inner: BufReader::with_capacity(CHUNK, file).take(size),
        verifier: DigestVerifier::new(),
    };
    sink(&mut reader).with_context(|| format!("copying blob {digest}"))?;
    // Anything the sink did not read (it stopped early) is hashed too.
    io::copy(&mut reader, &mut io::sink())?;
    let (len, actual) = (reader.verifier.len(), reader.verifier.finish());
    if len != size || actual != *digest {
        bail!(
            "cached blob {digest} is damaged ({len} of {size} bytes, digest {actual}): run `cistern verify` on the cache"
        );
    }
    Ok(())
}

fn write_dir(
    store: &DiskStore,
    items: &[Item],
    index: &[u8],
    dir: &Path,
) -> anyhow::Result<ExportReport> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let write_file = |path: &Path, bytes: &[u8]| -> anyhow::Result<()> {
        let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    };
    write_file(&dir.join("oci-layout"), model::OCI_LAYOUT)?;
    let mut report = ExportReport::default();
    for item in items {
        match item {
            Item::Manifest(digest, bytes) => {
                write_file(&dir.join(blob_name(digest)), bytes)?;
                report.manifests += 1;
                report.bytes += bytes.len() as u64;
            }
            Item::Blob { digest, size } => {
                let path = dir.join(blob_name(digest));
                let mut f = BufWriter::with_capacity(
                    CHUNK,
                    File::create(&path).with_context(|| format!("creating {}", path.display()))?,
                );
                copy_blob(store, digest, *size, |r| io::copy(r, &mut f).map(drop))?;
                f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                report.blobs += 1;
                report.bytes += size;
            }
        }
    }
    // index.json last: a directory with one names only complete content.
    write_file(&dir.join("index.json"), index)?;
    for d in [blobs.as_path(), dir.join("blobs").as_path(), dir] {
        File::open(d)?.sync_all()?;
    }
    Ok(report)
}

fn write_tar(
    store: &DiskStore,
    items: &[Item],
    index: &[u8],
    path: &Path,
) -> anyhow::Result<ExportReport> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut tar = tar::Builder::new(BufWriter::with_capacity(CHUNK, file));
    for d in ["blobs/", "blobs/sha256/"] {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, d, io::empty())?;
    }
    append_bytes(&mut tar, "oci-layout", model::OCI_LAYOUT)?;
    append_bytes(&mut tar, "index.json", index)?;
    let mut report = ExportReport::default();
    for item in items {
        match item {
            Item::Manifest(digest, bytes) => {
                append_bytes(&mut tar, &blob_name(digest), bytes)?;
                report.manifests += 1;
                report.bytes += bytes.len() as u64;
            }
            Item::Blob { digest, size } => {
                let mut h = header(tar::EntryType::Regular, 0o644, *size);
                copy_blob(store, digest, *size, |r| {
                    tar.append_data(&mut h, blob_name(digest), r)
                })?;
                report.blobs += 1;
                report.bytes += size;
            }
        }
    }
    let writer = tar.into_inner()?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(report)
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let mut h = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
    tar.append_data(&mut h, name, bytes)
}

/// A tar header with fixed owner and time, so the same images make the same tar.
fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", parent.display()))
}
