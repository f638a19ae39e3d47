//! Test images built from scratch: deterministic layer tarballs, image configs, manifests and
//! indexes, written as an OCI image layout directory that `skopeo copy oci:DIR:REF ...` reads.
//!
//! Nothing here depends on docker or on network access. Layers are gzip-compressed tar files
//! whose entries have fixed owners, modes and mtimes, so the same code always produces the same
//! bytes (and the same digests) with the same crate versions. The tests never hard-code a
//! digest: they compute it here and compare what the clients report against it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A content-addressed blob (layer, config, manifest or index).
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&bytes),
            bytes,
        }
    }

    /// The OCI descriptor pointing at this blob.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }

    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap()
    }
}

/// Deterministic pseudo-random bytes (xorshift64*): incompressible, so gzip cannot shrink the
/// layer and a blob of this size really crosses the proxy.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
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
    blobs: BTreeMap<String, Vec<u8>>,
    refs: Vec<Value>,
}

impl Layout {
    fn put(&mut self, blob: &Blob) {
        self.blobs
            .insert(blob.hex().to_string(), blob.bytes.clone());
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
        for (hex, bytes) in &self.blobs {
            fs::write(blob_dir.join(hex), bytes).unwrap();
        }
    }
}
