//! Manifest media types and how to tell which one a manifest is.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Schema 1 without a signature; old registries still name it.
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
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
            | DOCKER_MANIFEST_V1
    ) || media_type.ends_with("+json")
}

/// The manifest types cistern knows, each one bit of an `AcceptClass`.
const KNOWN: [&str; 6] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
    DOCKER_MANIFEST_V1_SIGNED,
    DOCKER_MANIFEST_V1,
];

/// What a client that sends no `Accept` (or none cistern knows) gets: the set Docker,
/// containerd and podman send.
pub const DEFAULT_ACCEPT: [&str; 4] = [
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_MANIFEST_V2,
];

/// The known manifest types a client accepts: what a tag answer depends on. A tag may resolve
/// to different manifests for different classes, so tag answers are kept per class; keying
/// them by the raw `Accept` set instead let every distinct header (a junk type is enough) make
/// a new record, a new index entry and a new upstream request. There are at most 2^6 classes,
/// and real clients use two or three.
///
/// Unknown types are ignored; a wildcard (`*/*`, `application/*`) accepts every known type;
/// a set with no known type is the default set, as is no `Accept` at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AcceptClass(u8);

impl AcceptClass {
    pub fn of<S: AsRef<str>>(accept: &[S]) -> AcceptClass {
        let mut bits = 0u8;
        for a in accept {
            let essence = a.as_ref().split(';').next().unwrap_or("").trim();
            if essence == "*/*" || essence.eq_ignore_ascii_case("application/*") {
                bits = u8::MAX >> (8 - KNOWN.len());
                break;
            }
            for (i, known) in KNOWN.iter().enumerate() {
                if essence.eq_ignore_ascii_case(known) {
                    bits |= 1 << i;
                }
            }
        }
        if bits == 0 {
            return AcceptClass::of(&DEFAULT_ACCEPT);
        }
        AcceptClass(bits)
    }

    /// The class of a key written by `key`, or of a raw Accept key written by earlier
    /// versions (their sorted, lower-cased types joined by `,`): a record of any version maps
    /// to the class its client would have today.
    pub fn from_key(key: &str) -> AcceptClass {
        let types: Vec<&str> = key.split(',').collect();
        AcceptClass::of(&types)
    }

    /// The class's media types, to send upstream in `Accept`.
    pub fn media_types(self) -> Vec<String> {
        KNOWN
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, t)| (*t).to_string())
            .collect()
    }

    /// A stable name for the class (on disk and in the index): its types sorted and joined by
    /// `,`. For a set of known types this is exactly the key earlier versions derived from the
    /// raw header, so their records for real clients (Docker, containerd, podman, skopeo) are
    /// found under the same name after an upgrade.
    pub fn key(self) -> String {
        let mut v = self.media_types();
        v.sort();
        v.join(",")
    }
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

    fn class(accept: &[&str]) -> AcceptClass {
        AcceptClass::of(accept)
    }

    #[test]
    fn accept_classes_ignore_unknown_types_and_order() {
        let docker = [
            DOCKER_MANIFEST_V2,
            DOCKER_MANIFEST_LIST,
            OCI_INDEX,
            OCI_MANIFEST,
        ];
        let mut reversed = docker;
        reversed.reverse();
        assert_eq!(class(&docker), class(&reversed));
        let junk = [
            DOCKER_MANIFEST_V2,
            "application/x-junk-1",
            DOCKER_MANIFEST_LIST,
        ];
        assert_eq!(
            class(&junk),
            class(&[DOCKER_MANIFEST_LIST, DOCKER_MANIFEST_V2])
        );
        assert_eq!(
            class(&["APPLICATION/VND.OCI.IMAGE.INDEX.V1+JSON; q=0.9"]),
            class(&[OCI_INDEX])
        );
        // No Accept, or nothing known: the default set.
        assert_eq!(class(&[]), class(&DEFAULT_ACCEPT));
        assert_eq!(class(&["text/html"]), class(&DEFAULT_ACCEPT));
        assert_eq!(class(&[]).media_types(), DEFAULT_ACCEPT);
        // A wildcard accepts every known type.
        assert_eq!(class(&["*/*"]).media_types(), KNOWN);
        assert_ne!(class(&[OCI_MANIFEST]), class(&[OCI_INDEX]));
    }

    #[test]
    fn accept_class_keys_read_back_and_match_earlier_keys() {
        for accept in [&[OCI_MANIFEST][..], &DEFAULT_ACCEPT, &KNOWN, &[]] {
            let c = class(accept);
            assert_eq!(AcceptClass::from_key(&c.key()), c);
        }
        // What earlier versions keyed a Docker client's record by: the same name today.
        let earlier = "application/vnd.docker.distribution.manifest.list.v2+json,application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.index.v1+json,application/vnd.oci.image.manifest.v1+json";
        assert_eq!(class(&DEFAULT_ACCEPT).key(), earlier);
        // An earlier key with a junk type maps to its class.
        assert_eq!(
            AcceptClass::from_key("application/vnd.oci.image.manifest.v1+json,x/junk"),
            class(&[OCI_MANIFEST])
        );
        // An earlier record for "no Accept" belongs to the default class.
        assert_eq!(AcceptClass::from_key(""), class(&DEFAULT_ACCEPT));
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
