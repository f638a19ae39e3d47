//! Test images built from scratch: deterministic layer tarballs, image configs, manifests and
//! indexes, written as an OCI image layout directory that `skopeo copy oci:DIR:REF ...` reads.
//!
//! Nothing here depends on docker or on network access. Layers are tar files (gzip-compressed,
//! or plain for the one of hundreds of MiB) whose entries have fixed owners, modes and mtimes,
//! so the same code always produces the same bytes (and the same digests) with the same crate
//! versions. The tests never hard-code a
//! digest: they compute it here and compare what the clients report against it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// An uncompressed tar layer: its digest is its diff_id. Every client under test (skopeo,
/// containerd, podman, dockerd) accepts it, and a layer of hundreds of MiB needs no gzip.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of a file's content, read in pieces (the file may be hundreds of MiB).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(format!("sha256:{}", hex::encode(hasher.finalize())));
        }
        hasher.update(&buf[..n]);
    }
}

/// Compares two files' contents: `None` if they are the same, else the first offset where they
/// differ (or where the shorter one ends).
pub fn same_content(a: &Path, b: &Path) -> std::io::Result<Option<u64>> {
    /// Reads until `buf` is full or the file ends.
    fn fill(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    }
    let (mut fa, mut fb) = (fs::File::open(a)?, fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let (na, nb) = (fill(&mut fa, &mut ba)?, fill(&mut fb, &mut bb)?);
        if ba[..na] != bb[..nb] {
            let first = ba[..na]
                .iter()
                .zip(&bb[..nb])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            return Ok(Some(offset + first as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        offset += na as u64;
    }
}

/// A content-addressed blob (layer, config, manifest or index).
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    /// The content, for blobs built in memory; empty for a blob kept in [`Blob::file`].
    pub bytes: Vec<u8>,
    /// The file holding the content of a blob too large to keep in memory.
    pub file: Option<PathBuf>,
    pub size: u64,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&bytes),
            size: bytes.len() as u64,
            bytes,
            file: None,
        }
    }

    /// A blob whose content is the file at `path` (`digest` and `size` already known).
    pub fn in_file(media_type: &str, digest: String, size: u64, path: PathBuf) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest,
            bytes: Vec::new(),
            file: Some(path),
            size,
        }
    }

    /// The OCI descriptor pointing at this blob.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        })
    }

    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap()
    }
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, so gzip cannot shrink the
/// layer and a blob of this size really crosses the proxy.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    PseudoRandom::new(seed, len as u64)
        .read_to_end(&mut out)
        .expect("reading generated bytes cannot fail");
    out
}

/// The bytes of [`pseudo_random_bytes`] as a reader, for contents too large to keep in memory.
/// The stream does not depend on the sizes of the reads.
pub struct PseudoRandom {
    state: u64,
    remaining: u64,
    /// The unread tail of the last word generated.
    spare: Vec<u8>,
}

impl PseudoRandom {
    pub fn new(seed: u64, len: u64) -> PseudoRandom {
        let state = seed ^ 0x9E37_79B9_7F4A_7C15;
        PseudoRandom {
            state: if state == 0 { 1 } else { state },
            remaining: len,
            spare: Vec::new(),
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }
}

impl Read for PseudoRandom {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let buf = &mut buf[..n];
        let from_spare = self.spare.len().min(n);
        buf[..from_spare].copy_from_slice(&self.spare[..from_spare]);
        self.spare.drain(..from_spare);
        for chunk in buf[from_spare..].chunks_mut(8) {
            let word = self.next_word();
            chunk.copy_from_slice(&word[..chunk.len()]);
            self.spare.extend_from_slice(&word[chunk.len()..]);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// One file or directory inside a layer.
pub enum Entry {
    Dir(&'static str),
    File(String, Vec<u8>),
}

/// A layer: the uncompressed tar (its sha256 is the config's diff_id) and the gzip blob.
pub struct Layer {
    pub blob: Blob,
    pub diff_id: String,
}

/// Builds a layer from `entries`: ustar headers with uid/gid 0, fixed mtime, no names of users,
/// then gzip with a zero mtime and no file name in the gzip header.
pub fn layer(entries: &[Entry], level: Compression) -> Layer {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match entry {
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .unwrap();
            }
            Entry::File(path, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, path, data.as_slice())
                    .unwrap();
            }
        }
    }
    let tar_bytes = builder.into_inner().unwrap();
    let diff_id = sha256_digest(&tar_bytes);
    let mut gz = GzBuilder::new().mtime(0).write(Vec::new(), level);
    gz.write_all(&tar_bytes).unwrap();
    let gz_bytes = gz.finish().unwrap();
    Layer {
        blob: Blob::new(OCI_LAYER_GZIP, gz_bytes),
        diff_id,
    }
}

/// Counts and hashes what passes through to `inner`.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// An uncompressed layer ([`OCI_LAYER_TAR`]) holding `<dir>/` and `<dir>/<name>`, a file of
/// `len` bytes of [`PseudoRandom`] from `seed`, written straight to disk (never held in memory)
/// and hashed as it is written. No gzip: compressing hundreds of MiB of incompressible bytes
/// would cost seconds and gain nothing.
///
/// The tar is kept in `cache_dir` under a name made of its parameters, with a note of its
/// digest and size beside it, and reused when that note is there and the size matches: by
/// later tests in the same process, by other test binaries, and by later runs. Both files are
/// written under temporary names and renamed into place, so concurrent builders (other test
/// binaries) never see a partial file.
pub fn uncompressed_layer_file(
    cache_dir: &Path,
    dir: &str,
    name: &str,
    len: u64,
    seed: u64,
) -> Layer {
    fs::create_dir_all(cache_dir).unwrap();
    let stem = format!("layer-v1-{dir}-{name}-{len}-{seed}");
    let tar_path = cache_dir.join(format!("{stem}.tar"));
    let note_path = cache_dir.join(format!("{stem}.digest"));
    let blob = |digest: &str, size: u64| Layer {
        blob: Blob::in_file(OCI_LAYER_TAR, digest.to_string(), size, tar_path.clone()),
        diff_id: digest.to_string(),
    };
    if let Ok(note) = fs::read_to_string(&note_path)
        && let Some((digest, size)) = note.trim().split_once(' ')
        && let Ok(size) = size.parse::<u64>()
        && fs::metadata(&tar_path).is_ok_and(|m| m.len() == size)
    {
        return blob(digest, size);
    }

    let tmp = |path: &Path| {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".tmp-{}", std::process::id()));
        PathBuf::from(p)
    };
    let tar_tmp = tmp(&tar_path);
    let file = fs::File::create(&tar_tmp).unwrap();
    let writer = HashingWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        len: 0,
    };
    let mut builder = tar::Builder::new(writer);
    let mut header = tar::Header::new_ustar();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_size(0);
    builder
        .append_data(&mut header, format!("{dir}/"), std::io::empty())
        .unwrap();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(len);
    builder
        .append_data(
            &mut header,
            format!("{dir}/{name}"),
            PseudoRandom::new(seed, len),
        )
        .unwrap();
    let mut writer = builder.into_inner().unwrap();
    writer.flush().unwrap();
    let digest = format!("sha256:{}", hex::encode(writer.hasher.finalize()));
    let size = writer.len;
    writer.inner.into_inner().unwrap().sync_all().unwrap();
    fs::rename(&tar_tmp, &tar_path).unwrap();
    let note_tmp = tmp(&note_path);
    fs::write(&note_tmp, format!("{digest} {size}\n")).unwrap();
    fs::rename(&note_tmp, &note_path).unwrap();
    blob(&digest, size)
}

/// A single-platform image: its manifest and every blob it references.
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

impl Image {
    /// Builds the config (with the layers' diff_ids) and the OCI manifest.
    pub fn build(name: &str, arch: &str, layers: Vec<Layer>) -> Image {
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        let history: Vec<Value> = layers
            .iter()
            .enumerate()
            .map(|(i, _)| {
                json!({
                    "created": "2023-11-14T22:13:20Z",
                    "created_by": format!("cistern e2e: {name} layer {i}"),
                })
            })
            .collect();
        let config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": arch,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "Labels": { "org.example.cistern.e2e": name },
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        let config = Blob::new(OCI_CONFIG, serde_json::to_vec(&config).unwrap());
        let layers: Vec<Blob> = layers.into_iter().map(|l| l.blob).collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
            "annotations": { "org.opencontainers.image.title": name },
        });
        let manifest = Blob::new(OCI_MANIFEST, serde_json::to_vec_pretty(&manifest).unwrap());
        Image {
            manifest,
            config,
            layers,
        }
    }

    /// Config and layers: the blobs a full pull of this image downloads.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }
}

/// A multi-platform image: an OCI image index and its children.
pub struct ImageIndex {
    pub index: Blob,
    pub children: Vec<(String, Image)>,
}

impl ImageIndex {
    pub fn build(children: Vec<(&str, Image)>) -> ImageIndex {
        let manifests: Vec<Value> = children
            .iter()
            .map(|(arch, image)| {
                let mut d = image.manifest.descriptor();
                d["platform"] = json!({ "architecture": arch, "os": "linux" });
                d
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        });
        ImageIndex {
            index: Blob::new(OCI_INDEX, serde_json::to_vec_pretty(&index).unwrap()),
            children: children
                .into_iter()
                .map(|(a, i)| (a.to_string(), i))
                .collect(),
        }
    }

    pub fn child(&self, arch: &str) -> &Image {
        &self.children.iter().find(|(a, _)| a == arch).unwrap().1
    }
}

/// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`) holding any
/// number of tagged images, read by `skopeo copy oci:DIR:TAG`.
#[derive(Default)]
pub struct Layout {
    blobs: BTreeMap<String, Blob>,
    refs: Vec<Value>,
}

impl Layout {
    fn put(&mut self, blob: &Blob) {
        self.blobs.insert(blob.hex().to_string(), blob.clone());
    }

    fn put_image(&mut self, image: &Image) {
        self.put(&image.manifest);
        for b in image.blobs() {
            self.put(b);
        }
    }

    fn add_ref(&mut self, top: &Blob, tag: &str) {
        let mut d = top.descriptor();
        d["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
        self.refs.push(d);
    }

    pub fn add_image(&mut self, tag: &str, image: &Image) {
        self.put_image(image);
        self.add_ref(&image.manifest, tag);
    }

    pub fn add_index(&mut self, tag: &str, index: &ImageIndex) {
        for (_, child) in &index.children {
            self.put_image(child);
        }
        self.put(&index.index);
        self.add_ref(&index.index, tag);
    }

    pub fn write(&self, dir: &Path) {
        let blob_dir = dir.join("blobs/sha256");
        fs::create_dir_all(&blob_dir).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = json!({ "schemaVersion": 2, "manifests": self.refs });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        for (hex, blob) in &self.blobs {
            let dest = blob_dir.join(hex);
            match &blob.file {
                // A hard link where the file system allows it: no copy of a large blob.
                Some(file) => {
                    if fs::hard_link(file, &dest).is_err() {
                        fs::copy(file, &dest).unwrap();
                    }
                }
                None => fs::write(dest, &blob.bytes).unwrap(),
            }
        }
    }
}
