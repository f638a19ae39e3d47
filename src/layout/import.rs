//! Reads an OCI image layout (a directory, or a tar of one when the input's name ends in
//! `.tar`) into a stopped cache's store, and records the tags its `index.json` names.
//!
//! The walk starts at `index.json`: each entry's manifest (an image manifest, or an index or
//! manifest list whose children are walked in turn, every platform), then every config and
//! layer. Every manifest and blob is checked against its digest and its descriptor's size
//! before it is visible: blobs are copied into the store's `tmp/` through a hash and committed
//! by the store's own verified commit (`DiskStore::commit_blob`: fsync, rename, fsync) only
//! if they match; manifests are small, read whole and hashed. Blobs the cache holds already
//! are not copied again (their presence in the layout and their size are still checked).
//!
//! **Ordering rule: nothing names an image until all of it is in the cache.** Blobs are
//! committed as they are verified; manifests are written once every image's walk has
//! succeeded; tag records (and links, for images named only by digest) come last, after every
//! blob and manifest of every image is committed. A missing, truncated or corrupt piece
//! anywhere fails the whole import naming the image and the digest: blobs committed before the
//! failure are harmless content-addressed files (evictable, verified), no manifest of the
//! import is written, and no tag points to an incomplete image. Everything the records need
//! (names, duplicates) is checked before the first blob is copied.
//!
//! A tar is never unpacked: a first pass reads its headers only (seeking over the contents),
//! refusing any path that is absolute or climbs with `..`, any entry among the layout's own
//! files (`oci-layout`, `index.json`, `blobs/…`) that is not a regular file or a directory,
//! and an archive that ends early; then each blob is read where it lies in the tar, as from a
//! directory.
//!
//! Records are written with the store's own functions (`write_manifest`, `write_tag`,
//! `write_link`), the ones the cache uses for what it fetches, so a server started on the cache
//! afterwards finds them as its own: its reference index, metadata budget and blob index are
//! rebuilt from the disk at start.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;

use super::hashing::{CHUNK, Hashing};
use super::model::{self, ImageRef, LayoutEntry, Needed};
use crate::oci::{Digest, media_types};
use crate::storage::tags::millis_since_epoch;
use crate::storage::{DiskStore, StoredManifest, TagRecord};

/// `oci-layout` is a few bytes; `index.json` lists images (a few hundred bytes each).
const MAX_OCI_LAYOUT: u64 = 64 * 1024;
const MAX_INDEX_JSON: u64 = 16 * 1024 * 1024;

/// How to name what the layout holds, and how large a manifest may be.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The registry of names that carry none (`--registry`).
    pub registry: String,
    /// The repository prefix of names that carry no registry; a bare tag's repository.
    pub prefix: Option<String>,
    /// `cache.max_manifest_size`: a larger manifest is refused, as the cache refuses it from
    /// an upstream.
    pub max_manifest_size: u64,
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Entries of `index.json`.
    pub images: usize,
    /// Tags recorded (an image named only by digest gets a link instead).
    pub tags: usize,
    pub manifests: usize,
    pub manifests_cached: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub blobs_cached: usize,
    pub cached_bytes: u64,
    /// Images imported but not named under a tag the cache can serve, and why.
    pub unnamed: Vec<String>,
}

/// Imports the layout at `input` into `store` (see the module's documentation).
pub fn import(
    store: &DiskStore,
    input: &Path,
    options: &ImportOptions,
) -> anyhow::Result<ImportReport> {
    let layout = Layout::open(input)?;
    check_oci_layout(&layout)?;
    let index = layout
        .read_small("index.json", MAX_INDEX_JSON)?
        .ok_or_else(|| anyhow!("{}: no index.json", input.display()))?;
    let entries = model::parse_index(&index).map_err(anyhow::Error::msg)?;
    let names = names(&entries, options)?;

    let mut report = ImportReport {
        images: entries.len(),
        ..ImportReport::default()
    };
    let mut walk = Walk {
        store,
        layout: &layout,
        options,
        seen: BTreeSet::new(),
        manifests: Vec::new(),
        report: &mut report,
    };
    for (entry, name) in entries.iter().zip(&names) {
        let label = match name {
            Some(image) => image.to_string(),
            None => format!("the unnamed image {}", entry.top.digest),
        };
        walk.image(&label, &entry.top)?;
    }
    let manifests = std::mem::take(&mut walk.manifests);

    // Every blob of every image is committed: now the manifests, then what names them.
    for m in manifests.iter().rev() {
        write_manifest(store, m, &mut report)?;
    }
    let now = millis_since_epoch(SystemTime::now());
    for (entry, name) in entries.iter().zip(&names) {
        let Some(image) = name else {
            report.unnamed.push(format!(
                "{}: index.json gives it no name (served by digest only)",
                entry.top.digest
            ));
            continue;
        };
        let Some(top) = manifests.iter().find(|m| m.digest == entry.top.digest) else {
            bail!("{image}: manifest {} was not imported", entry.top.digest);
        };
        record(store, image, top, now, &mut report)?;
    }
    Ok(report)
}

/// A manifest verified by the walk, to be written once every image is complete.
struct Verified {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

/// The names of every entry, checked before anything is copied: a name that does not parse,
/// or one tag named for two different images, refuses the import.
fn names(
    entries: &[LayoutEntry],
    options: &ImportOptions,
) -> anyhow::Result<Vec<Option<ImageRef>>> {
    let mut names = Vec::with_capacity(entries.len());
    let mut tags: BTreeMap<String, &Digest> = BTreeMap::new();
    for entry in entries {
        let name = model::imported_name(entry, &options.registry, options.prefix.as_deref())
            .map_err(anyhow::Error::msg)?;
        if let Some(image) = &name
            && let Some(tag) = &image.tag
        {
            let key = format!("{}/{}:{tag}", image.registry, image.repository);
            if let Some(other) = tags.insert(key.clone(), &entry.top.digest)
                && *other != entry.top.digest
            {
                bail!(
                    "index.json names two images {key}: {other} and {}",
                    entry.top.digest
                );
            }
        }
        names.push(name);
    }
    Ok(names)
}

fn check_oci_layout(layout: &Layout) -> anyhow::Result<()> {
    let bytes = layout
        .read_small("oci-layout", MAX_OCI_LAYOUT)?
        .ok_or_else(|| {
            anyhow!(
                "{}: not an OCI image layout (no oci-layout file)",
                layout.name()
            )
        })?;
    #[derive(serde::Deserialize)]
    struct OciLayout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let parsed: OciLayout = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{}: oci-layout: {e}", layout.name()))?;
    if !parsed.version.starts_with("1.") {
        bail!(
            "{}: image layout version {} is not supported (1.x is)",
            layout.name(),
            parsed.version
        );
    }
    Ok(())
}

/// The walk over every image's manifests and blobs.
struct Walk<'a> {
    store: &'a DiskStore,
    layout: &'a Layout,
    options: &'a ImportOptions,
    /// Manifests and blobs already walked (shared by images).
    seen: BTreeSet<Digest>,
    /// In the order found: parents before their children.
    manifests: Vec<Verified>,
    report: &'a mut ImportReport,
}

impl Walk<'_> {
    /// Walks one image from its top manifest, depth first.
    fn image(&mut self, label: &str, top: &Needed) -> anyhow::Result<()> {
        let mut pending = vec![top.clone()];
        while let Some(manifest) = pending.pop() {
            if !self.seen.insert(manifest.digest.clone()) {
                continue;
            }
            let bytes = self
                .manifest(&manifest)
                .with_context(|| format!("{label}: manifest {}", manifest.digest))?;
            let contents = model::contents(&bytes)
                .map_err(|e| anyhow!("{label}: manifest {}: {e}", manifest.digest))?;
            for blob in &contents.blobs {
                if self.seen.insert(blob.digest.clone()) {
                    self.blob(blob)
                        .with_context(|| format!("{label}: blob {}", blob.digest))?;
                }
            }
            pending.extend(contents.manifests.into_iter().rev());
            self.manifests.push(Verified {
                media_type: media_types::manifest_media_type(
                    manifest.media_type.as_deref(),
                    &bytes,
                ),
                digest: manifest.digest,
                bytes,
            });
        }
        Ok(())
    }

    /// A manifest's bytes, read whole (up to the cache's limit) and checked.
    fn manifest(&self, m: &Needed) -> anyhow::Result<Bytes> {
        let max = self.options.max_manifest_size;
        if let Some(size) = m.size
            && size > max
        {
            bail!("its descriptor says {size} bytes, more than cache.max_manifest_size ({max})");
        }
        let (reader, _) = self
            .layout
            .open_blob(&m.digest)?
            .ok_or_else(|| anyhow!("is missing from the layout"))?;
        let mut bytes = Vec::new();
        reader.take(max + 1).read_to_end(&mut bytes)?;
        let len = bytes.len() as u64;
        if len > max {
            bail!("is larger than cache.max_manifest_size ({max})");
        }
        check(&m.digest, m.size, len, Digest::of(&bytes))?;
        Ok(Bytes::from(bytes))
    }

    /// Copies a blob into the store through a hash and commits it if it matches; one the
    /// cache holds is only checked for presence and size.
    fn blob(&mut self, b: &Needed) -> anyhow::Result<()> {
        let (reader, layout_size) = self
            .layout
            .open_blob(&b.digest)?
            .ok_or_else(|| anyhow!("is missing from the layout"))?;
        if let Some(size) = b.size
            && size != layout_size
        {
            bail!("its descriptor says {size} bytes, the layout holds {layout_size}");
        }
        if let Some(cached) = self.store.blob_size(&b.digest)? {
            // The cached file was verified when committed; a descriptor disagreeing with it
            // is wrong, as is the layout's file.
            if cached != layout_size {
                bail!("the layout holds {layout_size} bytes; the cached blob has {cached}");
            }
            self.report.blobs_cached += 1;
            self.report.cached_bytes += cached;
            return Ok(());
        }
        let partial = self.store.create_partial(&b.digest)?;
        let mut hashing = Hashing::new(BufReader::with_capacity(CHUNK, reader));
        {
            let mut out = BufWriter::with_capacity(CHUNK, &*partial.file);
            io::copy(&mut hashing, &mut out)?;
            out.flush()?;
        }
        let len = hashing.verifier.len();
        check(&b.digest, Some(layout_size), len, hashing.verifier.finish())?;
        // Dropping an uncommitted partial removes it: a failure above leaves nothing.
        self.store
            .commit_blob(partial, &b.digest)
            .context("committing it to the cache")?;
        self.report.blobs += 1;
        self.report.blob_bytes += len;
        Ok(())
    }
}

/// The content read must have the digest it is named by and the size its descriptor states.
fn check(digest: &Digest, size: Option<u64>, len: u64, actual: Digest) -> anyhow::Result<()> {
    if let Some(size) = size
        && len != size
    {
        bail!("is truncated or padded: {len} bytes where {size} were expected");
    }
    if actual != *digest {
        bail!("is corrupt: its content has digest {actual}");
    }
    Ok(())
}

/// Writes a verified manifest unless the cache holds it (a damaged cached file is replaced).
fn write_manifest(
    store: &DiskStore,
    m: &Verified,
    report: &mut ImportReport,
) -> anyhow::Result<()> {
    if let Ok(Some(_)) = store.read_manifest(&m.digest) {
        report.manifests_cached += 1;
        return Ok(());
    }
    let stored = StoredManifest {
        media_type: m.media_type.clone(),
        bytes: m.bytes.clone(),
    };
    store
        .write_manifest(&m.digest, &stored)
        .with_context(|| format!("writing manifest {}", m.digest))?;
    report.manifests += 1;
    Ok(())
}

/// Records what names an image: its tag (one record per Accept class that accepts its type,
/// as the cache records a tag it resolved), or, named by digest only, a link to its
/// repository.
fn record(
    store: &DiskStore,
    image: &ImageRef,
    top: &Verified,
    now_ms: u64,
    report: &mut ImportReport,
) -> anyhow::Result<()> {
    let repository = image.repository.as_str();
    let Some(tag) = &image.tag else {
        store
            .write_link(&image.registry, repository, &top.digest)
            .with_context(|| format!("{image}: linking it to its repository"))?;
        return Ok(());
    };
    let keys = model::tag_accept_keys(&top.media_type);
    if keys.is_empty() {
        report.unnamed.push(format!(
            "{image}: a tag cannot name a manifest of type {} (served by digest only)",
            top.media_type
        ));
        return Ok(());
    }
    for accept in keys {
        let record = TagRecord {
            registry: image.registry.clone(),
            repository: repository.to_string(),
            tag: tag.to_string(),
            accept,
            digest: top.digest.to_string(),
            media_type: top.media_type.clone(),
            size: top.bytes.len() as u64,
            fetched_at_ms: now_ms,
        };
        store
            .write_tag(&record)
            .with_context(|| format!("{image}: recording its tag"))?;
    }
    report.tags += 1;
    Ok(())
}

/// The layout being read: a directory, or a tar indexed by a first pass over its headers.
enum Layout {
    Dir(PathBuf),
    Tar {
        path: PathBuf,
        file: File,
        /// Path in the layout → (offset of its bytes in the tar, size).
        files: HashMap<String, (u64, u64)>,
    },
}

impl Layout {
    fn open(input: &Path) -> anyhow::Result<Layout> {
        let meta =
            std::fs::metadata(input).with_context(|| format!("reading {}", input.display()))?;
        if meta.is_dir() {
            return Ok(Layout::Dir(input.to_path_buf()));
        }
        if input.extension().is_none_or(|e| e != "tar") {
            bail!(
                "{}: neither a layout directory nor a .tar of one",
                input.display()
            );
        }
        let file = File::open(input).with_context(|| format!("opening {}", input.display()))?;
        let files = index_tar(&file, meta.len())
            .with_context(|| format!("{}: not a readable layout tar", input.display()))?;
        Ok(Layout::Tar {
            path: input.to_path_buf(),
            file,
            files,
        })
    }

    fn name(&self) -> String {
        match self {
            Layout::Dir(p) | Layout::Tar { path: p, .. } => p.display().to_string(),
        }
    }

    /// A file of the layout and its size; `None` if it has none of that name. Only one reader
    /// is used at a time (a tar's readers share its file offset).
    fn open_file(&self, name: &str) -> anyhow::Result<Option<(Box<dyn Read + '_>, u64)>> {
        match self {
            Layout::Dir(dir) => {
                let path = dir.join(name);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
                };
                let meta = file.metadata()?;
                if !meta.is_file() {
                    bail!("{} is not a regular file", path.display());
                }
                Ok(Some((Box::new(file.take(meta.len())), meta.len())))
            }
            Layout::Tar { file, files, .. } => {
                let Some(&(offset, size)) = files.get(name) else {
                    return Ok(None);
                };
                let mut f: &File = file;
                f.seek(SeekFrom::Start(offset))?;
                Ok(Some((Box::new(f.take(size)), size)))
            }
        }
    }

    fn open_blob(&self, digest: &Digest) -> anyhow::Result<Option<(Box<dyn Read + '_>, u64)>> {
        self.open_file(&format!("blobs/sha256/{}", digest.hex()))
    }

    /// A small file, whole; an error if it is larger than `max`.
    fn read_small(&self, name: &str, max: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let Some((reader, size)) = self.open_file(name)? else {
            return Ok(None);
        };
        if size > max {
            bail!("{}: {name} is larger than {max} bytes", self.name());
        }
        let mut bytes = Vec::new();
        reader.take(max).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }
}

/// The first pass over a tar: where each of the layout's files lies. Contents are skipped by
/// seeking, not read. Refused: paths that are absolute or contain `..`, a layout file that is
/// not a regular file (a link or a device: a layout has none, and following one could read
/// outside the archive), and an archive shorter than its headers say. Entries outside the
/// layout's own names are never read, whatever they are: `docker save` adds its legacy
/// `<id>/layer.tar` as symbolic links into `blobs/`.
fn index_tar(file: &File, len: u64) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let mut archive = tar::Archive::new(file);
    let mut files = HashMap::new();
    let mut end = 0u64;
    for entry in archive.entries_with_seek()? {
        // A header cut short or garbled: the tar crate says which; say what it means.
        let entry = entry.map_err(|e| anyhow!("the tar is truncated or damaged: {e}"))?;
        let path = entry.path()?.into_owned();
        let name = layout_path(&path)?;
        let kind = entry.header().entry_type();
        let (offset, size) = (entry.raw_file_position(), entry.size());
        let data_end = offset
            .checked_add(size)
            .ok_or_else(|| anyhow!("{}: size out of range", path.display()))?;
        if data_end > len {
            bail!(
                "the tar is truncated: {} needs bytes up to {data_end}, the file has {len}",
                path.display()
            );
        }
        end = end.max(data_end.div_ceil(512).saturating_mul(512));
        let ours = name == "oci-layout" || name == "index.json" || name.starts_with("blobs/");
        if !ours || kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        if !(kind.is_file() || kind.is_contiguous()) {
            bail!(
                "{}: a {kind:?} entry; a layout holds only regular files and directories",
                path.display()
            );
        }
        files.insert(name, (offset, size));
    }
    // Every writer ends a tar with two zero blocks; an archive cut right after an entry has
    // none, and may have lost entries after it.
    if len < end.saturating_add(1024) {
        bail!("the tar is truncated: it ends without the end-of-archive marker");
    }
    Ok(files)
}

/// A tar entry's path within the layout (`./` dropped), refusing any that could name
/// something outside it.
fn layout_path(path: &Path) -> anyhow::Result<String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(
                p.to_str()
                    .ok_or_else(|| anyhow!("{}: not a UTF-8 path", path.display()))?,
            ),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => bail!(
                "{}: a path outside the layout (absolute or with ..); refused",
                path.display()
            ),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_paths_stay_inside_the_layout() {
        assert_eq!(
            layout_path(Path::new("./blobs/sha256/ab")).unwrap(),
            "blobs/sha256/ab"
        );
        assert_eq!(layout_path(Path::new("index.json")).unwrap(), "index.json");
        for bad in ["../x", "/etc/passwd", "blobs/../../x"] {
            let e = layout_path(Path::new(bad)).unwrap_err().to_string();
            assert!(e.contains("outside the layout"), "{bad}: {e}");
        }
    }
}
