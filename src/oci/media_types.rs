//! Manifest media types and how to tell which one a manifest is.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Blobs are opaque bytes to a registry.
pub const BLOB: &str = "application/octet-stream";
/// Error bodies.
pub const JSON: &str = "application/json";

/// The media type to serve a manifest with. The upstream's `Content-Type` wins when it names a
/// real type; registries that answer with a generic type (or none) get the manifest's own
/// `mediaType` field, and an OCI document without one is classified by its shape, as the OCI
/// image spec says clients do.
pub fn manifest_media_type(upstream_content_type: Option<&str>, bytes: &[u8]) -> String {
    if let Some(ct) = upstream_content_type {
        let essence = ct.split(';').next().unwrap_or("").trim();
        if !essence.is_empty() && !is_generic(essence) {
            return essence.to_string();
        }
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            media_type: Some(mt),
            ..
        }) if !mt.is_empty() => mt,
        Ok(Probe {
            manifests: Some(_), ..
        }) => OCI_INDEX.to_string(),
        _ => OCI_MANIFEST.to_string(),
    }
}

fn is_generic(essence: &str) -> bool {
    matches!(
        essence,
        "application/json" | "text/plain" | "application/octet-stream"
    )
}

/// Is this a media type a registry serves as a manifest (as opposed to an error page)?
pub fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST
            | OCI_INDEX
            | DOCKER_MANIFEST_V2
            | DOCKER_MANIFEST_LIST
            | DOCKER_MANIFEST_V1_SIGNED
            | "application/vnd.docker.distribution.manifest.v1+json"
    ) || media_type.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_type_wins() {
        assert_eq!(
            manifest_media_type(Some(DOCKER_MANIFEST_V2), br#"{"mediaType":"x"}"#),
            DOCKER_MANIFEST_V2
        );
        assert_eq!(
            manifest_media_type(
                Some("application/vnd.oci.image.index.v1+json; charset=utf-8"),
                b"{}"
            ),
            OCI_INDEX
        );
    }

    #[test]
    fn generic_type_falls_back_to_the_document() {
        assert_eq!(
            manifest_media_type(
                Some("application/json"),
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json"}"#
            ),
            DOCKER_MANIFEST_LIST
        );
        assert_eq!(manifest_media_type(None, br#"{"manifests":[]}"#), OCI_INDEX);
        assert_eq!(manifest_media_type(None, br#"{"layers":[]}"#), OCI_MANIFEST);
        assert_eq!(manifest_media_type(None, b"not json"), OCI_MANIFEST);
    }
}
