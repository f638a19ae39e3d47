//! What a manifest references: the blobs (config, layers) and the child manifests (an index's
//! or manifest list's `manifests[]`, an artifact's `subject`). Pure: bytes in, digests out.
//!
//! The JSON is read by shape, not by media type, so one parser covers every manifest a
//! registry serves:
//!
//! | kind                                   | blobs                    | manifests           |
//! |----------------------------------------|--------------------------|---------------------|
//! | OCI image manifest, Docker v2 schema 2 | `config`, `layers[]`     | `subject`           |
//! | OCI index, Docker manifest list        |                          | `manifests[]`, `subject` |
//! | OCI artifact manifest (draft)          | `blobs[]`                | `subject`           |
//! | Docker v2 schema 1                     | `fsLayers[].blobSum`     |                     |
//!
//! A `subject` counts as a reference: a signature or SBOM tagged in a repository keeps the
//! image it describes. Digests in another algorithm than sha256 (which cistern does not
//! store) are skipped; a document that is not JSON, or whose fields have the wrong shape, is
//! an error, and the caller treats it as referencing nothing.

use serde::Deserialize;

use super::Digest;

/// The digests a manifest references, each once, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    pub blobs: Vec<Digest>,
    pub manifests: Vec<Digest>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: Option<String>,
}

#[derive(Deserialize)]
struct Schema1Layer {
    #[serde(rename = "blobSum")]
    blob_sum: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    blobs: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<Vec<Schema1Layer>>,
}

/// The references of a manifest's bytes. `Err` says why the document could not be read.
pub fn parse(bytes: &[u8]) -> Result<References, String> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut out = References::default();
    let add = |list: &mut Vec<Digest>, d: Option<&str>| {
        if let Some(d) = d.and_then(|d| Digest::parse(d).ok())
            && !list.contains(&d)
        {
            list.push(d);
        }
    };
    if let Some(c) = &doc.config {
        add(&mut out.blobs, c.digest.as_deref());
    }
    for d in doc.layers.iter().chain(doc.blobs.iter()).flatten() {
        add(&mut out.blobs, d.digest.as_deref());
    }
    for l in doc.fs_layers.iter().flatten() {
        add(&mut out.blobs, l.blob_sum.as_deref());
    }
    for d in doc.manifests.iter().flatten() {
        add(&mut out.manifests, d.digest.as_deref());
    }
    if let Some(s) = &doc.subject {
        add(&mut out.manifests, s.digest.as_deref());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn oci_and_docker_image_manifests_reference_config_and_layers() {
        for media_type in [
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
        ] {
            let json = format!(
                r#"{{"schemaVersion":2,"mediaType":"{media_type}",
                "config":{{"mediaType":"x","digest":"{}","size":1}},
                "layers":[{{"digest":"{}","size":2}},{{"digest":"{}","size":3}},{{"digest":"{}","size":2}}]}}"#,
                d(1),
                d(2),
                d(3),
                d(2)
            );
            let r = parse(json.as_bytes()).unwrap();
            assert_eq!(r.blobs, vec![d(1), d(2), d(3)], "{media_type}");
            assert!(r.manifests.is_empty());
        }
    }

    #[test]
    fn indexes_and_manifest_lists_reference_child_manifests() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests":[{{"digest":"{}","platform":{{"os":"linux"}}}},{{"digest":"{}"}}]}}"#,
            d(4),
            d(5)
        );
        let r = parse(json.as_bytes()).unwrap();
        assert_eq!(r.manifests, vec![d(4), d(5)]);
        assert!(r.blobs.is_empty());
    }

    #[test]
    fn artifacts_reference_their_blobs_and_subject() {
        let json = format!(
            r#"{{"mediaType":"application/vnd.oci.artifact.manifest.v1+json",
            "blobs":[{{"digest":"{}"}}],"subject":{{"digest":"{}"}}}}"#,
            d(6),
            d(7)
        );
        let r = parse(json.as_bytes()).unwrap();
        assert_eq!(r.blobs, vec![d(6)]);
        assert_eq!(r.manifests, vec![d(7)]);
    }

    #[test]
    fn schema1_references_its_fs_layers() {
        let json = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}},{{"blobSum":"{}"}}]}}"#,
            d(8),
            d(8)
        );
        assert_eq!(parse(json.as_bytes()).unwrap().blobs, vec![d(8)]);
    }

    #[test]
    fn unusable_digests_are_skipped() {
        let json = format!(
            r#"{{"layers":[{{"digest":"sha512:abcd"}},{{"size":1}},{{"digest":"{}"}}]}}"#,
            d(9)
        );
        assert_eq!(parse(json.as_bytes()).unwrap().blobs, vec![d(9)]);
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"not json",
            b"{\"layers\":",
            b"[1,2,3]",
            b"{\"layers\":{\"digest\":1}}",
            b"{\"config\":\"sha256:x\"}",
            b"\xff\xfe",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(parse(b"{}").unwrap(), References::default());
    }
}
