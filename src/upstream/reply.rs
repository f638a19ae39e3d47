//! Reading upstream replies (pure): which error a reply that is not the expected one means,
//! and the headers the registry calls read.

use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, StatusCode};

use crate::api::headers::{ContentRange, retry_after_secs};
use crate::error::ErrorKind;
use crate::oci::Digest;

/// Most bytes of an error body read for its OCI error code.
pub const MAX_ERROR_BODY: u64 = 64 * 1024;

/// What kind of object a request was for, to pick the right "unknown" error on a 404.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Manifest,
    Blob,
    Tags,
}

/// The error a client sees for an upstream reply with `status` that is not the answer asked
/// for. `code` is the first OCI error code of the body (only a 404's body is read: the
/// upstream's own code says whether the repository or the object is missing), `retry_after`
/// the reply's `Retry-After`.
pub fn classify(
    status: StatusCode,
    code: Option<&str>,
    retry_after: Option<Duration>,
    object: Object,
) -> ErrorKind {
    match status {
        StatusCode::NOT_FOUND => match code {
            Some("NAME_UNKNOWN") => ErrorKind::NameUnknown,
            Some("MANIFEST_UNKNOWN") => ErrorKind::ManifestUnknown,
            Some("BLOB_UNKNOWN") => ErrorKind::BlobUnknown,
            _ => match object {
                Object::Manifest => ErrorKind::ManifestUnknown,
                Object::Blob => ErrorKind::BlobUnknown,
                Object::Tags => ErrorKind::NameUnknown,
            },
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorKind::UpstreamDenied,
        StatusCode::TOO_MANY_REQUESTS => ErrorKind::TooManyRequests { retry_after },
        s if s.is_server_error() => ErrorKind::UpstreamUnavailable,
        _ => ErrorKind::UpstreamInvalid,
    }
}

/// The first OCI error code in an error body (`{"errors":[{"code":"…"}]}`), if it has one.
pub fn oci_error_code(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Code>,
    }
    #[derive(serde::Deserialize)]
    struct Code {
        code: String,
    }
    let parsed: Body = serde_json::from_slice(body).ok()?;
    parsed.errors.into_iter().next().map(|c| c.code)
}

/// `Retry-After`, when it is a number of seconds.
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after_secs)
        .map(Duration::from_secs)
}

/// `Content-Length`, when it is a number.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

pub fn content_type(h: &HeaderMap) -> Option<String> {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `Docker-Content-Digest`, when it is a valid digest.
pub fn digest_header(h: &HeaderMap) -> Option<Digest> {
    Digest::parse(h.get("docker-content-digest")?.to_str().ok()?.trim()).ok()
}

/// The `Content-Range` header as text (empty when absent or not text), for messages.
pub fn content_range_text(h: &HeaderMap) -> &str {
    h.get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A 206 that answered `Range: bytes={from}-`: `Some(total)` (the blob's size, if the
/// upstream names it) when its `Content-Range` starts at `from`; `None` when it does not,
/// or is missing or malformed, so the bytes are not the ones asked for.
pub fn resumed_at(h: &HeaderMap, from: u64) -> Option<Option<u64>> {
    match ContentRange::parse(content_range_text(h))? {
        ContentRange::Bytes { first, total, .. } if first == from => Some(total),
        _ => None,
    }
}

/// A 206 that answered `Range: bytes={first}-{last}`: `Some(total)` (the blob's size, if the
/// upstream names it) when its `Content-Range` names exactly those bytes; `None` otherwise
/// (other bytes, or a missing or malformed header).
pub fn answered_range(h: &HeaderMap, first: u64, last: u64) -> Option<Option<u64>> {
    match ContentRange::parse(content_range_text(h))? {
        ContentRange::Bytes {
            first: f,
            last: l,
            total,
        } if f == first && l == last => Some(total),
        _ => None,
    }
}

/// The total size a 206's `Content-Range` names.
pub fn range_total(h: &HeaderMap) -> Option<u64> {
    ContentRange::parse(content_range_text(h))?.total()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn not_found_follows_the_upstreams_code_else_the_object() {
        let nf = |code, object| classify(StatusCode::NOT_FOUND, code, None, object);
        for object in [Object::Manifest, Object::Blob, Object::Tags] {
            assert_eq!(nf(Some("NAME_UNKNOWN"), object), ErrorKind::NameUnknown);
            assert_eq!(
                nf(Some("MANIFEST_UNKNOWN"), object),
                ErrorKind::ManifestUnknown
            );
            assert_eq!(nf(Some("BLOB_UNKNOWN"), object), ErrorKind::BlobUnknown);
        }
        assert_eq!(nf(None, Object::Manifest), ErrorKind::ManifestUnknown);
        assert_eq!(nf(None, Object::Blob), ErrorKind::BlobUnknown);
        assert_eq!(nf(None, Object::Tags), ErrorKind::NameUnknown);
        // A code that names no missing thing says nothing about what is missing.
        assert_eq!(nf(Some("DENIED"), Object::Blob), ErrorKind::BlobUnknown);
        assert_eq!(
            nf(Some("name_unknown"), Object::Manifest),
            ErrorKind::ManifestUnknown
        );
    }

    #[test]
    fn other_statuses() {
        let c = |status, retry_after| classify(status, None, retry_after, Object::Blob);
        assert_eq!(c(StatusCode::UNAUTHORIZED, None), ErrorKind::UpstreamDenied);
        assert_eq!(c(StatusCode::FORBIDDEN, None), ErrorKind::UpstreamDenied);
        let wait = Some(Duration::from_secs(7));
        assert_eq!(
            c(StatusCode::TOO_MANY_REQUESTS, wait),
            ErrorKind::TooManyRequests { retry_after: wait }
        );
        assert_eq!(
            c(StatusCode::TOO_MANY_REQUESTS, None),
            ErrorKind::TooManyRequests { retry_after: None }
        );
        for s in [500, 502, 503, 504, 599] {
            let s = StatusCode::from_u16(s).unwrap();
            assert_eq!(c(s, wait), ErrorKind::UpstreamUnavailable, "{s}");
        }
        for s in [200, 206, 302, 400, 405, 416, 418] {
            let s = StatusCode::from_u16(s).unwrap();
            assert_eq!(c(s, wait), ErrorKind::UpstreamInvalid, "{s}");
        }
        // Only a 404 looks at the code.
        assert_eq!(
            classify(
                StatusCode::FORBIDDEN,
                Some("BLOB_UNKNOWN"),
                None,
                Object::Blob
            ),
            ErrorKind::UpstreamDenied
        );
    }

    #[test]
    fn error_bodies() {
        let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"x"},{"code":"DENIED"}]}"#;
        assert_eq!(oci_error_code(body).as_deref(), Some("NAME_UNKNOWN"));
        assert_eq!(oci_error_code(br#"{"errors":[]}"#), None);
        assert_eq!(oci_error_code(b"<html>not found</html>"), None);
        assert_eq!(oci_error_code(b""), None);
    }

    #[test]
    fn header_values() {
        let h = headers(&[
            ("retry-after", " 30 "),
            ("content-length", "123"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(retry_after(&h), Some(Duration::from_secs(30)));
        assert_eq!(content_length(&h), Some(123));
        assert_eq!(content_type(&h).as_deref(), Some("application/json"));
        let h = headers(&[
            ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
            ("content-length", "many"),
            ("docker-content-digest", "sha256:short"),
        ]);
        assert_eq!(retry_after(&h), None);
        assert_eq!(content_length(&h), None);
        assert_eq!(digest_header(&h), None);
        let hex = "a".repeat(64);
        let mut h = HeaderMap::new();
        h.insert(
            "docker-content-digest",
            HeaderValue::from_str(&format!("sha256:{hex}")).unwrap(),
        );
        assert_eq!(
            digest_header(&h).map(|d| d.to_string()),
            Some(format!("sha256:{hex}"))
        );
    }

    #[test]
    fn resumed_ranges() {
        let h = headers(&[("content-range", "bytes 100-199/200")]);
        assert_eq!(resumed_at(&h, 100), Some(Some(200)));
        assert_eq!(resumed_at(&h, 0), None, "starts elsewhere");
        assert_eq!(range_total(&h), Some(200));
        let h = headers(&[("content-range", "bytes 100-199/*")]);
        assert_eq!(resumed_at(&h, 100), Some(None));
        assert_eq!(range_total(&h), None);
        for bad in ["bytes */200", "garbage", "bytes 100-99/200"] {
            let h = headers(&[("content-range", bad)]);
            assert_eq!(resumed_at(&h, 100), None, "{bad}");
        }
        assert_eq!(resumed_at(&HeaderMap::new(), 100), None);
        let h = headers(&[("content-range", "bytes 100-199/200")]);
        assert_eq!(answered_range(&h, 100, 199), Some(Some(200)));
        assert_eq!(answered_range(&h, 100, 150), None, "ends elsewhere");
        assert_eq!(answered_range(&h, 0, 199), None, "starts elsewhere");
        let h = headers(&[("content-range", "bytes 100-199/*")]);
        assert_eq!(answered_range(&h, 100, 199), Some(None));
        assert_eq!(answered_range(&HeaderMap::new(), 100, 199), None);
        assert_eq!(content_range_text(&HeaderMap::new()), "");
        assert_eq!(range_total(&HeaderMap::new()), None);
    }
}
