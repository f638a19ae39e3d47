//! The image layout as values: no IO.
//!
//! - [`ImageRef`]: `registry/repo:tag` or `registry/repo@sha256:…` as a user writes it, with
//!   Docker's naming rules (no registry: the default route's; Docker Hub's `library/`).
//! - [`newest_tag_record`]: which recorded tag answer names the image to export.
//! - [`contents`]: what a manifest needs in a layout (child manifests, blobs), with the sizes
//!   and media types its descriptors state.
//! - [`ref_names`] and [`index_json`]: how `index.json` names each image, and its bytes.
//! - For import: [`parse_index`] (a layout's `index.json`), [`imported_name`] (the image an
//!   entry of it names) and [`tag_accept_keys`] (the Accept classes an imported tag is
//!   recorded for).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::api::registry::{canonical_registry, looks_like_registry, upstream_name};
use crate::oci::media_types::{AcceptClass, DEFAULT_ACCEPT};
use crate::oci::name::check_registry;
use crate::oci::{Digest, RepoName, Tag, media_types};
use crate::storage::TagRecord;

/// The `oci-layout` file: the version of the layout specification this layout follows.
pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The standard annotation naming an image in `index.json`: what `skopeo copy oci:DIR:NAME`
/// and `podman pull oci:DIR:NAME` look for.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// The image's full reference, as containerd (`ctr export`), BuildKit and `docker save` write
/// it, and as `ctr import` names the image it imports: a layout of several registries
/// round-trips through it.
pub const FULL_NAME: &str = "io.containerd.image.name";

/// An image as the user named it, normalized the way the server names it: canonical registry,
/// repository as that registry stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: RepoName,
    /// At least one of `tag` and `digest` is set. With both, the digest is what is exported
    /// and the tag names it.
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parses `[registry/]repo[:tag][@sha256:…]`. The first component is a registry when it
    /// looks like one (a `.`, a `:` or `localhost`, Docker's rule); otherwise the image is on
    /// `default_registry` (the config's default route). No tag and no digest means `latest`.
    pub fn parse(s: &str, default_registry: &str) -> Result<ImageRef, String> {
        let s = s.trim();
        let (name_and_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d).map_err(|e| format!("{s}: {e}"))?)),
            None => (s, None),
        };
        // A tag follows the last `:` after the last `/` (a registry's port comes before one).
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag.rfind(':').filter(|&i| i >= last_slash) {
            Some(i) => {
                let (n, t) = name_and_tag.split_at(i);
                let t = t.trim_start_matches(':');
                (n, Some(Tag::parse(t).map_err(|e| format!("{s}: {e}"))?))
            }
            None => (name_and_tag, None),
        };
        let tag = match (tag, &digest) {
            (None, None) => Some(Tag::parse("latest").map_err(|e| format!("{s}: {e}"))?),
            (tag, _) => tag,
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if looks_like_registry(first) => (canonical_registry(first), rest),
            _ => (canonical_registry(default_registry), name),
        };
        if registry.is_empty() {
            return Err(format!(
                "{s}: names no registry and the config has no default route"
            ));
        }
        check_registry(&registry).map_err(|e| format!("{s}: registry {registry:?}: {e}"))?;
        let repository = RepoName::parse(repository).map_err(|e| format!("{s}: {e}"))?;
        let repository = upstream_name(&registry, &repository).map_err(|e| e.message)?;
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

/// `registry/repository:tag`, `registry/repository@digest`, or both.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The images of a list file (`-f`): one reference a line; blank lines and `#` comments
/// (whole-line or trailing) are skipped.
pub fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_once('#').map_or(l, |(before, _)| before).trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The tag record an export follows, among those recorded for one tag (one per Accept class):
/// the newest, which is what offline mode serves a client that accepts every manifest type. Of
/// records made at the same moment, an index (all platforms) wins over a single manifest.
/// Records whose digest does not parse are no answer.
pub fn newest_tag_record(records: &[TagRecord]) -> Option<&TagRecord> {
    let is_index = |r: &TagRecord| {
        r.media_type == media_types::OCI_INDEX || r.media_type == media_types::DOCKER_MANIFEST_LIST
    };
    records
        .iter()
        .filter(|r| r.digest().is_some())
        .max_by_key(|r| (r.fetched_at_ms, is_index(r)))
}

/// What a manifest needs in a layout besides itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// Child manifests (an index's or manifest list's `manifests[]`), in document order.
    pub manifests: Vec<Needed>,
    /// Config, layers (or an artifact's blobs, a schema 1 manifest's `fsLayers`), in order.
    pub blobs: Vec<Needed>,
}

/// One descriptor of a manifest: the content it names and what it says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    pub digest: Digest,
    /// The descriptor's `size` (a schema 1 `fsLayers` entry has none).
    pub size: Option<u64>,
    /// The descriptor's `mediaType`, if it has one.
    pub media_type: Option<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    size: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Schema1Layer {
    #[serde(rename = "blobSum")]
    blob_sum: String,
}

#[derive(Deserialize)]
struct Document {
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    blobs: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<Vec<Schema1Layer>>,
}

/// A descriptor's digest, parsed: a digest cistern cannot hold (another algorithm, or not a
/// digest) is an error naming it.
fn needed(digest: &str, size: Option<u64>, media_type: Option<&String>) -> Result<Needed, String> {
    Ok(Needed {
        digest: Digest::parse(digest).map_err(|e| e.to_string())?,
        size,
        media_type: media_type.cloned(),
    })
}

/// The child manifests and blobs a manifest's bytes reference, each once. Unlike the cache's
/// reference graph (`oci::references`), a `subject` is not followed: a signature's layout does
/// not need the image it signs. A digest that cistern cannot hold is an error naming it: a
/// layout without that content would be incomplete.
pub fn contents(bytes: &[u8]) -> Result<Contents, String> {
    let doc: Document =
        serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
    let push = |list: &mut Vec<Needed>, n: Needed| {
        if !list.iter().any(|o| o.digest == n.digest) {
            list.push(n);
        }
    };
    let mut out = Contents::default();
    for d in doc.manifests.iter().flatten() {
        push(
            &mut out.manifests,
            needed(&d.digest, d.size, d.media_type.as_ref())?,
        );
    }
    let descriptors = doc
        .config
        .iter()
        .chain(doc.layers.iter().flatten())
        .chain(doc.blobs.iter().flatten());
    for d in descriptors {
        push(
            &mut out.blobs,
            needed(&d.digest, d.size, d.media_type.as_ref())?,
        );
    }
    for l in doc.fs_layers.iter().flatten() {
        push(&mut out.blobs, needed(&l.blob_sum, None, None)?);
    }
    Ok(out)
}

/// The `org.opencontainers.image.ref.name` of each image, in order: its tag, which is what
/// `oci:OUT:<tag>` looks up; its full reference when another image of the export has the same
/// tag (two registries' `alpine:3`), or when it has no tag. Ref names are not unique
/// otherwise, and a reader takes the first match.
pub fn ref_names(images: &[ImageRef]) -> Vec<String> {
    images
        .iter()
        .map(|image| match &image.tag {
            Some(tag)
                if !images
                    .iter()
                    .any(|other| other.tag.as_ref() == Some(tag) && other != image) =>
            {
                tag.to_string()
            }
            _ => image.to_string(),
        })
        .collect()
}

/// One image in `index.json`: its top manifest as the cache holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub image: ImageRef,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Serialize)]
struct IndexDescriptor<'a> {
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    digest: String,
    size: u64,
    annotations: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct Index<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<IndexDescriptor<'a>>,
}

/// The bytes of `index.json`: an OCI image index with one descriptor per image, in order,
/// named by [`ref_names`] and by its full reference ([`FULL_NAME`]).
pub fn index_json(entries: &[Entry]) -> Vec<u8> {
    let images: Vec<ImageRef> = entries.iter().map(|e| e.image.clone()).collect();
    let manifests = entries
        .iter()
        .zip(ref_names(&images))
        .map(|(e, ref_name)| IndexDescriptor {
            media_type: &e.media_type,
            digest: e.digest.to_string(),
            size: e.size,
            annotations: BTreeMap::from([(FULL_NAME, e.image.to_string()), (REF_NAME, ref_name)]),
        })
        .collect();
    let index = Index {
        schema_version: 2,
        media_type: media_types::OCI_INDEX,
        manifests,
    };
    // Serializing plain strings and numbers cannot fail; were it to, an empty index would
    // be written and the reader would find no image, never a wrong one.
    serde_json::to_vec(&index).unwrap_or_default()
}

/// One image named by a layout's `index.json`: its top manifest's descriptor and annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutEntry {
    pub top: Needed,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct LayoutIndex {
    manifests: Vec<Descriptor>,
}

/// The entries of a layout's `index.json`, in order. Every entry is an image to import (an
/// image manifest, or an index whose children are walked).
pub fn parse_index(bytes: &[u8]) -> Result<Vec<LayoutEntry>, String> {
    let index: LayoutIndex = serde_json::from_slice(bytes)
        .map_err(|e| format!("index.json is not an OCI index: {e}"))?;
    index
        .manifests
        .into_iter()
        .map(|d| {
            let top = needed(&d.digest, d.size, d.media_type.as_ref())
                .map_err(|e| format!("index.json: {e}"))?;
            Ok(LayoutEntry {
                top,
                annotations: d.annotations,
            })
        })
        .collect()
}

/// The image an entry of a layout's `index.json` names, to record its tag under; `None` if it
/// names none (its content is imported, reachable by digest only).
///
/// The full reference ([`FULL_NAME`], written by cistern export, containerd, BuildKit) wins;
/// else [`REF_NAME`], a tag (skopeo's `oci:DIR:TAG`) or a reference. A reference that names no
/// registry is on `registry`, under `prefix` if given (`team/app:1` with prefix `mirror` is
/// `<registry>/mirror/team/app:1`); a bare tag needs `prefix`, which is then the whole
/// repository. A digest in the name must be the entry's own.
pub fn imported_name(
    entry: &LayoutEntry,
    registry: &str,
    prefix: Option<&str>,
) -> Result<Option<ImageRef>, String> {
    let (name, bare_tag) = match (
        entry.annotations.get(FULL_NAME),
        entry.annotations.get(REF_NAME),
    ) {
        (Some(full), _) => (full.trim(), false),
        (None, Some(r)) => {
            let r = r.trim();
            (r, !r.contains(['/', ':', '@']))
        }
        (None, None) => return Ok(None),
    };
    let joined = |rest: &str| match prefix {
        Some(p) => format!("{registry}/{}/{rest}", p.trim_matches('/')),
        None => format!("{registry}/{rest}"),
    };
    let reference = if bare_tag {
        let Some(p) = prefix else {
            return Err(format!(
                "index.json names {} only by the tag {name:?}: give --prefix REPOSITORY to say which repository it belongs to",
                entry.top.digest
            ));
        };
        format!("{registry}/{}:{name}", p.trim_matches('/'))
    } else {
        match name.split_once('/') {
            Some((first, _)) if looks_like_registry(first) => name.to_string(),
            _ => joined(name),
        }
    };
    let image = ImageRef::parse(&reference, registry)
        .map_err(|e| format!("index.json names {}: {e}", entry.top.digest))?;
    if let Some(d) = &image.digest
        && *d != entry.top.digest
    {
        return Err(format!(
            "index.json names {} as {image}, another digest",
            entry.top.digest
        ));
    }
    Ok(Some(image))
}

/// The Accept classes an imported tag is recorded for: the default class (Docker, containerd,
/// podman) and the class of every known type (skopeo, `*/*`), each if it accepts the
/// manifest's media type. Online, a client of another class asks upstream as for any tag it
/// has no answer for; offline, any record whose type the client accepts is served.
pub fn tag_accept_keys(media_type: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for class in [AcceptClass::of(&DEFAULT_ACCEPT), AcceptClass::of(&["*/*"])] {
        let key = class.key();
        if class.media_types().iter().any(|t| t == media_type) && !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(s: &str) -> ImageRef {
        ImageRef::parse(s, "docker.io").unwrap()
    }

    #[test]
    fn references_are_named_as_the_server_names_them() {
        let i = image("alpine");
        assert_eq!(i.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            image("alpine:3.20").to_string(),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(
            image("index.docker.io/bitnami/redis:7").to_string(),
            "docker.io/bitnami/redis:7"
        );
        let local = image("127.0.0.1:5000/team/app:1.0");
        assert_eq!(local.registry, "127.0.0.1:5000");
        assert_eq!(local.repository.as_str(), "team/app");
        assert_eq!(local.tag.as_ref().map(Tag::as_str), Some("1.0"));
        // A port is not a tag.
        let no_tag = image("localhost:5000/app");
        assert_eq!(no_tag.registry, "localhost:5000");
        assert_eq!(no_tag.tag.as_ref().map(Tag::as_str), Some("latest"));
        let d = Digest::of(b"m");
        let by_digest = image(&format!("ghcr.io/org/app@{d}"));
        assert_eq!((by_digest.tag, by_digest.digest), (None, Some(d.clone())));
        let both = image(&format!("ghcr.io/org/app:1@{d}"));
        assert_eq!(both.to_string(), format!("ghcr.io/org/app:1@{d}"));
        // Another default route's registry; its names get no `library/`.
        let other = ImageRef::parse("team/app:1", "registry.example:5000").unwrap();
        assert_eq!(other.to_string(), "registry.example:5000/team/app:1");
        assert_eq!(
            ImageRef::parse("app", "ghcr.io")
                .unwrap()
                .repository
                .as_str(),
            "app"
        );
    }

    #[test]
    fn bad_references_are_refused_naming_them() {
        for bad in [
            "",
            "Alpine:3",
            "docker.io/library/alpine:bad:tag",
            "alpine@sha256:abc",
            "alpine@md5:0123",
            "docker.io/library/alpine:",
            "bad_host.io/app:1",
            "a.io:port/app:1",
        ] {
            let e = ImageRef::parse(bad, "docker.io").unwrap_err();
            assert!(e.starts_with(bad.trim()), "{bad:?}: {e}");
        }
        let e = ImageRef::parse("app:1", "").unwrap_err();
        assert!(e.contains("no default route"), "{e}");
    }

    #[test]
    fn list_files_skip_comments_and_blank_lines() {
        let list = "# images for site A\n\nalpine:3.20  # the base\n  ghcr.io/org/app:1\n#x\n";
        assert_eq!(parse_list(list), ["alpine:3.20", "ghcr.io/org/app:1"]);
    }

    fn record(media_type: &str, at: u64, content: &[u8]) -> TagRecord {
        TagRecord {
            registry: "docker.io".into(),
            repository: "library/alpine".into(),
            tag: "3".into(),
            accept: String::new(),
            digest: Digest::of(content).to_string(),
            media_type: media_type.into(),
            size: 1,
            fetched_at_ms: at,
        }
    }

    #[test]
    fn the_newest_record_names_the_image_and_an_index_wins_a_tie() {
        assert!(newest_tag_record(&[]).is_none());
        let old_index = record(media_types::OCI_INDEX, 1, b"a");
        let new_manifest = record(media_types::OCI_MANIFEST, 2, b"b");
        let records = [old_index.clone(), new_manifest.clone()];
        assert_eq!(newest_tag_record(&records), Some(&new_manifest));
        let same_time_list = record(media_types::DOCKER_MANIFEST_LIST, 2, b"c");
        let records = [new_manifest.clone(), same_time_list.clone(), old_index];
        assert_eq!(newest_tag_record(&records), Some(&same_time_list));
        let broken = TagRecord {
            digest: "sha256:nope".into(),
            fetched_at_ms: 9,
            ..new_manifest.clone()
        };
        assert_eq!(
            newest_tag_record(&[broken, new_manifest.clone()]),
            Some(&new_manifest)
        );
    }

    fn digests(list: &[Needed]) -> Vec<Digest> {
        list.iter().map(|n| n.digest.clone()).collect()
    }

    #[test]
    fn contents_of_each_kind_of_manifest() {
        let (c, l1, l2) = (Digest::of(b"c"), Digest::of(b"1"), Digest::of(b"2"));
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{c}","size":1}},
               "layers":[{{"digest":"{l1}"}},{{"digest":"{l2}"}},{{"digest":"{l1}"}}],
               "subject":{{"digest":"{}"}}}}"#,
            Digest::of(b"signed")
        );
        let got = contents(image.as_bytes()).unwrap();
        assert_eq!(digests(&got.blobs), [c.clone(), l1.clone(), l2.clone()]);
        assert_eq!(got.blobs[0].size, Some(1));
        assert_eq!(got.blobs[1].size, None);
        assert!(got.manifests.is_empty(), "a subject is not exported");

        let index = format!(
            r#"{{"manifests":[{{"digest":"{l1}","platform":{{"os":"linux"}}}},{{"digest":"{l2}"}}]}}"#
        );
        let got = contents(index.as_bytes()).unwrap();
        assert_eq!(digests(&got.manifests), [l1.clone(), l2]);
        assert!(got.blobs.is_empty());

        let schema1 = format!(r#"{{"fsLayers":[{{"blobSum":"{l1}"}}]}}"#);
        assert_eq!(digests(&contents(schema1.as_bytes()).unwrap().blobs), [l1]);

        let e = contents(br#"{"layers":[{"digest":"sha512:abcd"}]}"#).unwrap_err();
        assert!(e.contains("sha512"), "{e}");
        assert!(contents(b"not json").is_err());
        assert!(contents(br#"{"layers":[{"size":1}]}"#).is_err());
    }

    #[test]
    fn ref_names_are_tags_unless_a_tag_is_shared_or_missing() {
        let d = Digest::of(b"x");
        let images = [
            image("alpine:3"),
            image("ghcr.io/org/alpine:3"),
            image("busybox:1"),
            image(&format!("ghcr.io/org/app@{d}")),
        ];
        assert_eq!(
            ref_names(&images),
            [
                "docker.io/library/alpine:3".to_string(),
                "ghcr.io/org/alpine:3".to_string(),
                "1".to_string(),
                format!("ghcr.io/org/app@{d}"),
            ]
        );
    }

    #[test]
    fn index_json_is_an_oci_index_naming_each_image() {
        let d = Digest::of(b"manifest");
        let entries = [Entry {
            image: image("alpine:3.20"),
            media_type: media_types::OCI_INDEX.into(),
            digest: d.clone(),
            size: 8,
        }];
        let text = String::from_utf8(index_json(&entries)).unwrap();
        assert_eq!(
            text,
            format!(
                concat!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","#,
                    r#""manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","#,
                    r#""digest":"{}","size":8,"annotations":{{"#,
                    r#""io.containerd.image.name":"docker.io/library/alpine:3.20","#,
                    r#""org.opencontainers.image.ref.name":"3.20"}}}}]}}"#
                ),
                d
            )
        );
        let empty: serde_json::Value = serde_json::from_slice(&index_json(&[])).unwrap();
        assert_eq!(empty["manifests"], serde_json::json!([]));
        let layout: serde_json::Value = serde_json::from_slice(OCI_LAYOUT).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    }

    fn entry(annotations: &[(&str, &str)]) -> LayoutEntry {
        LayoutEntry {
            top: Needed {
                digest: Digest::of(b"top"),
                size: Some(3),
                media_type: Some(media_types::OCI_MANIFEST.into()),
            },
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn name(annotations: &[(&str, &str)], prefix: Option<&str>) -> Result<Option<String>, String> {
        imported_name(&entry(annotations), "registry.test:5000", prefix)
            .map(|i| i.map(|i| i.to_string()))
    }

    #[test]
    fn imported_names_prefer_the_full_reference_and_place_short_ones() {
        let full = name(
            &[
                (FULL_NAME, "docker.io/library/alpine:3.20"),
                (REF_NAME, "3.20"),
            ],
            Some("ignored"),
        );
        assert_eq!(full.unwrap().unwrap(), "docker.io/library/alpine:3.20");
        // A reference with a registry of its own stays there.
        let r = name(&[(REF_NAME, "ghcr.io/org/app:1")], Some("mirror"));
        assert_eq!(r.unwrap().unwrap(), "ghcr.io/org/app:1");
        // Without one: --registry, under --prefix.
        let r = name(&[(REF_NAME, "team/app:1")], Some("mirror"));
        assert_eq!(r.unwrap().unwrap(), "registry.test:5000/mirror/team/app:1");
        let r = name(&[(REF_NAME, "app:1")], None);
        assert_eq!(r.unwrap().unwrap(), "registry.test:5000/app:1");
        // Docker Hub's rule applies to docker.io.
        let hub = imported_name(&entry(&[(REF_NAME, "alpine:3")]), "docker.io", None);
        assert_eq!(
            hub.unwrap().unwrap().to_string(),
            "docker.io/library/alpine:3"
        );
        // A bare tag: the prefix is the repository; without one, refused naming the entry.
        let r = name(&[(REF_NAME, "1.0")], Some("/team/app/"));
        assert_eq!(r.unwrap().unwrap(), "registry.test:5000/team/app:1.0");
        let e = name(&[(REF_NAME, "latest")], None).unwrap_err();
        assert!(
            e.contains("--prefix") && e.contains(&Digest::of(b"top").to_string()),
            "{e}"
        );
        // No name: content only.
        assert_eq!(name(&[("other", "x")], None).unwrap(), None);
        // A digest in the name must be the entry's.
        let own = format!("ghcr.io/org/app@{}", Digest::of(b"top"));
        assert_eq!(name(&[(FULL_NAME, &own)], None).unwrap().unwrap(), own);
        let other = format!("ghcr.io/org/app@{}", Digest::of(b"else"));
        assert!(name(&[(FULL_NAME, &other)], None).is_err());
        // Bad names are refused.
        assert!(name(&[(REF_NAME, "Bad/Name:1")], None).is_err());
        assert!(name(&[(REF_NAME, "../etc:1")], None).is_err());
    }

    #[test]
    fn an_index_json_round_trips_through_parse_index() {
        let d = Digest::of(b"manifest");
        let entries = [Entry {
            image: image("alpine:3.20"),
            media_type: media_types::OCI_INDEX.into(),
            digest: d.clone(),
            size: 8,
        }];
        let parsed = parse_index(&index_json(&entries)).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].top.digest, d);
        assert_eq!(parsed[0].top.size, Some(8));
        let back = imported_name(&parsed[0], "elsewhere.test", None).unwrap();
        assert_eq!(back, Some(image("alpine:3.20")));
        assert!(parse_index(b"{}").is_err());
        assert!(parse_index(br#"{"manifests":[{"digest":"sha256:short"}]}"#).is_err());
    }

    #[test]
    fn imported_tags_are_recorded_for_the_classes_that_accept_them() {
        let default = AcceptClass::of(&DEFAULT_ACCEPT).key();
        let all = AcceptClass::of(&["*/*"]).key();
        assert_eq!(
            tag_accept_keys(media_types::OCI_INDEX),
            [default.clone(), all.clone()]
        );
        assert_eq!(
            tag_accept_keys(media_types::DOCKER_MANIFEST_V2),
            [default, all.clone()]
        );
        assert_eq!(tag_accept_keys(media_types::DOCKER_MANIFEST_V1), [all]);
        assert!(tag_accept_keys("application/x-unknown").is_empty());
    }
}
