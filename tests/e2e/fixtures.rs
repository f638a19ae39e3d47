//! The test images, pushed to the private registry with skopeo, and what a correct pull of each
//! must produce.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use flate2::Compression;
use serde_json::Value;

use super::daemon::http_get;
use super::image::{
    self, DOCKER_MANIFEST_LIST, Entry, Image, ImageIndex, Layer, Layout, sha256_digest,
};
use super::skopeo::Skopeo;

/// Size of the incompressible file in the big layer: a few MiB, not a round number.
pub const BIG_FILE_LEN: usize = 3 * 1024 * 1024 + 12_345;

/// Size of the file in the large image's layer: just over 200 MiB, not a round number, so
/// the layer (an uncompressed tar) is at least 200 MiB, as issue #6 asks.
pub const LARGE_FILE_LEN: u64 = 200 * 1024 * 1024 + 54_321;

/// An image as it sits in the registry.
#[derive(Debug, Clone)]
pub struct Seeded {
    /// Repository in the registry, e.g. `library/app`.
    pub repo: String,
    pub tag: String,
    /// Exact bytes of the top-level manifest (or index) in the registry.
    pub manifest: Vec<u8>,
    /// sha256 of `manifest`.
    pub digest: String,
    pub media_type: String,
    /// Child manifests of an index: (architecture, digest).
    pub children: Vec<(String, String)>,
    /// Every config and layer blob reachable from the manifest (through all children).
    pub blobs: BTreeSet<String>,
}

/// Union of the config and layer blobs of `images`.
pub fn all_blobs(images: &[&Seeded]) -> BTreeSet<String> {
    images
        .iter()
        .flat_map(|s| s.blobs.iter().cloned())
        .collect()
}

impl Seeded {
    pub fn reference(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repo, self.tag)
    }
}

/// What is seeded into a registry.
pub struct Fixtures {
    /// `library/app:1.0`: single-arch OCI manifest, 3 gzip layers, one of them ~3 MiB of
    /// pseudo-random bytes.
    pub app: Seeded,
    /// `library/multi:1.0`: OCI image index with linux/amd64 and linux/arm64 children.
    pub multi: Seeded,
    /// `library/dockerv2:1.0`: Docker v2 schema 2 manifest (converted by skopeo --format v2s2).
    pub dockerv2: Seeded,
    /// `library/mlist:1.0`: Docker manifest list with v2s2 children (an OCI index converted
    /// by skopeo `--all --format v2s2`), the shape of most multi-arch images on Docker Hub.
    pub mlist: Seeded,
    /// `e2e/team/app:1.0`: the app image again under a three-component repository name.
    pub nested: Seeded,
    /// Digest of the app image's ~3 MiB layer.
    pub big_layer: String,
    /// The OCI layout the images were pushed from (tags `app`, `multi`, `dockerv2`; the
    /// latter as built, an OCI manifest, before skopeo's v2s2 conversion).
    pub layout_dir: PathBuf,
}

impl Fixtures {
    pub fn all(&self) -> [&Seeded; 5] {
        [
            &self.app,
            &self.multi,
            &self.dockerv2,
            &self.mlist,
            &self.nested,
        ]
    }
}

fn app_image() -> Image {
    let base = image::layer(
        &[
            Entry::Dir("etc/"),
            Entry::File(
                "etc/os-release".into(),
                b"NAME=\"cistern e2e\"\nID=e2e\n".to_vec(),
            ),
            Entry::Dir("usr/"),
            Entry::Dir("usr/share/"),
            Entry::File("usr/share/app.txt".into(), b"app base layer\n".repeat(200)),
        ],
        Compression::default(),
    );
    // Incompressible: stored gzip blocks are as good as any level here and keep the debug
    // build of the test fast.
    let big = image::layer(
        &[
            Entry::Dir("data/"),
            Entry::File(
                "data/random.bin".into(),
                image::pseudo_random_bytes(1, BIG_FILE_LEN),
            ),
        ],
        Compression::none(),
    );
    let top = image::layer(
        &[
            Entry::Dir("etc/"),
            Entry::File("etc/app.conf".into(), b"listen = 8080\n".to_vec()),
        ],
        Compression::default(),
    );
    Image::build("app", "amd64", vec![base, big, top])
}

fn small_layer(name: &str, arch: &str, n: usize) -> Layer {
    image::layer(
        &[
            Entry::Dir("opt/"),
            Entry::File(
                format!("opt/{name}-{arch}-{n}.txt"),
                format!("{name} {arch} layer {n}\n")
                    .repeat(100 + n)
                    .into_bytes(),
            ),
        ],
        Compression::default(),
    )
}

/// An index with linux/amd64 and linux/arm64 children, two small layers each.
fn index(name: &str) -> ImageIndex {
    let child = |arch: &'static str| {
        (
            arch,
            Image::build(
                &format!("{name}-{arch}"),
                arch,
                vec![small_layer(name, arch, 0), small_layer(name, arch, 1)],
            ),
        )
    };
    ImageIndex::build(vec![child("amd64"), child("arm64")])
}

fn dockerv2_image() -> Image {
    Image::build(
        "dockerv2",
        "amd64",
        vec![
            small_layer("dockerv2", "amd64", 0),
            small_layer("dockerv2", "amd64", 1),
        ],
    )
}

static LARGE: OnceLock<Image> = OnceLock::new();

/// Checks that the file at `path` holds the blob `digest`. The large layer (once built) is
/// compared byte for byte with its local file, which is known to hold it: as strong as hashing
/// it, and much faster (sha256 runs at about 25 MB/s in a debug build, 8 s for that layer).
/// Anything else is hashed.
pub fn check_blob_file(path: &Path, digest: &str) -> Result<(), String> {
    let known = LARGE
        .get()
        .into_iter()
        .flat_map(|image| &image.layers)
        .find(|layer| layer.digest == digest)
        .and_then(|layer| layer.file.as_deref());
    let read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    match known {
        Some(known) => match image::same_content(path, known).map_err(read)? {
            None => Ok(()),
            Some(offset) => Err(format!(
                "{} differs from blob {digest} (its local copy {}) from byte {offset}",
                path.display(),
                known.display()
            )),
        },
        None => match image::sha256_file(path).map_err(read)? {
            got if got == digest => Ok(()),
            got => Err(format!(
                "{} hashes to {got}, not to its blob's digest {digest}",
                path.display()
            )),
        },
    }
}

/// `library/large:1.0`: an OCI manifest with an uncompressed layer of [`LARGE_FILE_LEN`]
/// pseudo-random bytes (plus a small gzip layer on top). Built once per test binary: the layer
/// lives in a file (never in memory) cached under cargo's `CARGO_TARGET_TMPDIR`, so only the
/// first build on a machine writes it (about a second in a debug build).
pub fn large_image() -> &'static Image {
    LARGE.get_or_init(|| {
        let large = image::uncompressed_layer_file(
            &Path::new(env!("CARGO_TARGET_TMPDIR")).join("cistern-e2e"),
            "data",
            "large.bin",
            LARGE_FILE_LEN,
            200,
        );
        assert!(
            large.blob.size >= 200 * 1024 * 1024,
            "the large layer is {} bytes",
            large.blob.size
        );
        Image::build(
            "large",
            "amd64",
            vec![large, small_layer("large", "amd64", 0)],
        )
    })
}

/// Reads a manifest straight from the registry, accepting every manifest type.
pub fn registry_manifest(registry: SocketAddr, repo: &str, reference: &str) -> (String, Vec<u8>) {
    let accept = [
        image::OCI_INDEX,
        image::OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        image::DOCKER_MANIFEST_V2,
    ]
    .join(", ");
    let r = http_get(
        registry,
        &format!("/v2/{repo}/manifests/{reference}"),
        &[("Accept", &accept)],
    )
    .expect("GET manifest from the registry");
    assert_eq!(
        r.status,
        200,
        "registry GET {repo}:{reference}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let ct = r.header("Content-Type").unwrap_or_default().to_string();
    (ct, r.body)
}

/// Reads back what the registry holds for `repo:tag` and collects its blobs.
pub fn describe(registry: SocketAddr, repo: &str, tag: &str) -> Seeded {
    let (media_type, manifest) = registry_manifest(registry, repo, tag);
    let digest = sha256_digest(&manifest);
    let v: Value = serde_json::from_slice(&manifest).unwrap();
    let mut children = Vec::new();
    let mut blobs = BTreeSet::new();
    let mut collect = |m: &Value| {
        blobs.insert(m["config"]["digest"].as_str().unwrap().to_string());
        for l in m["layers"].as_array().unwrap() {
            blobs.insert(l["digest"].as_str().unwrap().to_string());
        }
    };
    if let Some(list) = v["manifests"].as_array() {
        for d in list {
            let child_digest = d["digest"].as_str().unwrap().to_string();
            let (_, child) = registry_manifest(registry, repo, &child_digest);
            assert_eq!(sha256_digest(&child), child_digest);
            collect(&serde_json::from_slice(&child).unwrap());
            let arch = d["platform"]["architecture"].as_str().unwrap().to_string();
            children.push((arch, child_digest));
        }
    } else {
        collect(&v);
    }
    Seeded {
        repo: repo.to_string(),
        tag: tag.to_string(),
        manifest,
        digest,
        media_type,
        children,
        blobs,
    }
}

/// Pushes `layout_tag` of the OCI layout at `layout_dir` to `registry` as `dest` (`repo:tag`),
/// converted to `format` if given, and reads it back, checking skopeo's reported digest
/// against the registry's.
pub fn push(
    skopeo: &Skopeo,
    layout_dir: &Path,
    layout_tag: &str,
    registry: SocketAddr,
    dest: &str,
    format: Option<&str>,
    ctx: &dyn Fn() -> String,
) -> Seeded {
    let (repo, tag) = dest.split_once(':').expect("dest is repo:tag");
    let reported = skopeo.push(
        layout_dir,
        layout_tag,
        &format!("{registry}/{dest}"),
        format,
        ctx,
    );
    let seeded = describe(registry, repo, tag);
    assert_eq!(
        seeded.digest, reported,
        "skopeo --digestfile vs registry for {repo}"
    );
    seeded
}

/// Pushes [`large_image`] to the registry as `library/large:1.0` (from its own OCI layout under
/// `dir`, which links the cached layer file) and checks that the registry serves the manifest
/// that was built and holds every blob.
pub fn seed_large(
    dir: &Path,
    skopeo: &Skopeo,
    registry: SocketAddr,
    ctx: &dyn Fn() -> String,
) -> Seeded {
    let large = large_image();
    let mut layout = Layout::default();
    layout.add_image("large", large);
    let layout_dir = dir.join("oci-layout-large");
    layout.write(&layout_dir);
    let seeded = push(
        skopeo,
        &layout_dir,
        "large",
        registry,
        "library/large:1.0",
        None,
        ctx,
    );
    assert_eq!(
        seeded.manifest, large.manifest.bytes,
        "registry altered the large manifest"
    );
    assert_eq!(seeded.media_type, image::OCI_MANIFEST);
    let want: BTreeSet<String> = large.blobs().iter().map(|b| b.digest.clone()).collect();
    assert_eq!(seeded.blobs, want);
    seeded
}

/// Builds the images, writes them as an OCI layout under `dir` and pushes them to the
/// registry with `skopeo copy`. Checks that the registry serves the bytes that were built
/// (so later mismatches are cistern's, not the seeding's).
pub fn seed(
    dir: &Path,
    skopeo: &Skopeo,
    registry: SocketAddr,
    ctx: &dyn Fn() -> String,
) -> Fixtures {
    let app = app_image();
    let multi = index("multi");
    let mlist = index("mlist");
    let dockerv2 = dockerv2_image();
    let mut layout = Layout::default();
    layout.add_image("app", &app);
    layout.add_index("multi", &multi);
    layout.add_image("dockerv2", &dockerv2);
    layout.add_index("mlist", &mlist);
    let layout_dir = dir.join("oci-layout");
    layout.write(&layout_dir);

    let push = |tag: &str, repo: &str, format: Option<&str>| {
        push(
            skopeo,
            &layout_dir,
            tag,
            registry,
            &format!("{repo}:1.0"),
            format,
            ctx,
        )
    };

    let seeded_app = push("app", "library/app", None);
    assert_eq!(
        seeded_app.manifest, app.manifest.bytes,
        "registry altered the app manifest"
    );
    assert_eq!(seeded_app.media_type, image::OCI_MANIFEST);
    let want: BTreeSet<String> = app.blobs().iter().map(|b| b.digest.clone()).collect();
    assert_eq!(seeded_app.blobs, want);

    let seeded_multi = push("multi", "library/multi", None);
    assert_eq!(
        seeded_multi.manifest, multi.index.bytes,
        "registry altered the index"
    );
    assert_eq!(seeded_multi.media_type, image::OCI_INDEX);
    assert_eq!(seeded_multi.children.len(), 2);
    for (arch, digest) in &seeded_multi.children {
        assert_eq!(digest, &multi.child(arch).manifest.digest);
    }

    let seeded_v2 = push("dockerv2", "library/dockerv2", Some("v2s2"));
    assert_eq!(seeded_v2.media_type, image::DOCKER_MANIFEST_V2);
    assert_ne!(
        seeded_v2.digest, dockerv2.manifest.digest,
        "v2s2 conversion must change bytes"
    );
    let want: BTreeSet<String> = dockerv2.blobs().iter().map(|b| b.digest.clone()).collect();
    assert_eq!(seeded_v2.blobs, want, "v2s2 conversion must keep the blobs");

    let seeded_mlist = push("mlist", "library/mlist", Some("v2s2"));
    assert_eq!(seeded_mlist.media_type, DOCKER_MANIFEST_LIST);
    assert_eq!(seeded_mlist.children.len(), 2);
    let want: BTreeSet<String> = mlist
        .children
        .iter()
        .flat_map(|(_, i)| i.blobs())
        .map(|b| b.digest.clone())
        .collect();
    assert_eq!(
        seeded_mlist.blobs, want,
        "v2s2 conversion must keep the blobs"
    );
    for (arch, child) in &seeded_mlist.children {
        let (ct, _) = registry_manifest(registry, "library/mlist", child);
        assert_eq!(ct, image::DOCKER_MANIFEST_V2, "mlist {arch} child");
    }

    let seeded_nested = push("app", "e2e/team/app", None);
    assert_eq!(seeded_nested.digest, seeded_app.digest);

    Fixtures {
        app: seeded_app,
        multi: seeded_multi,
        dockerv2: seeded_v2,
        mlist: seeded_mlist,
        nested: seeded_nested,
        big_layer: app.layers[1].digest.clone(),
        layout_dir,
    }
}

/// Pushes one small image to each of `repos` (as `<repo>:1.0`), each image its own (its name,
/// the repository, is in its config and its one tiny layer), so a pull of one repository can
/// never be answered with another's digest or blobs. The cheapest seeding there is: for
/// tests about who may pull, not about image shapes.
#[allow(dead_code)] // used by tests/e2e_access.rs, not by every test crate
pub fn seed_small(
    dir: &Path,
    skopeo: &Skopeo,
    registry: SocketAddr,
    repos: &[&str],
    ctx: &dyn Fn() -> String,
) -> Vec<Seeded> {
    let images: Vec<Image> = repos
        .iter()
        .map(|repo| {
            let layer = image::layer(
                &[
                    Entry::Dir("opt/"),
                    Entry::File(
                        "opt/repository.txt".into(),
                        format!("{repo}\n").into_bytes(),
                    ),
                ],
                Compression::default(),
            );
            Image::build(repo, "amd64", vec![layer])
        })
        .collect();
    let mut layout = Layout::default();
    for (n, built) in images.iter().enumerate() {
        layout.add_image(&format!("small-{n}"), built);
    }
    let layout_dir = dir.join("oci-layout-small");
    layout.write(&layout_dir);
    repos
        .iter()
        .zip(&images)
        .enumerate()
        .map(|(n, (repo, built))| {
            let seeded = push(
                skopeo,
                &layout_dir,
                &format!("small-{n}"),
                registry,
                &format!("{repo}:1.0"),
                None,
                ctx,
            );
            assert_eq!(
                seeded.manifest, built.manifest.bytes,
                "registry altered the manifest of {repo}"
            );
            seeded
        })
        .collect()
}
