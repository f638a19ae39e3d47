//! [`Error`] → HTTP status + OCI error JSON. The only place that chooses status codes.

use http::StatusCode;

use crate::error::{Error, ErrorKind};

/// The status and OCI error code for an error.
pub fn status_and_code(kind: &ErrorKind) -> (StatusCode, &'static str) {
    use ErrorKind::*;
    match kind {
        NameInvalid => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
        DigestInvalid => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        TagInvalid => (StatusCode::BAD_REQUEST, "TAG_INVALID"),
        Unsupported => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
        NameUnknown => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        ManifestUnknown => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        BlobUnknown => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        UpstreamUnavailable => (StatusCode::BAD_GATEWAY, "UNAVAILABLE"),
        UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "UNAVAILABLE"),
        // The client cannot fix upstream credentials by authenticating to us, so this is not
        // a 401 (which would make clients try to log in to cistern).
        UpstreamDenied => (StatusCode::FORBIDDEN, "DENIED"),
        TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
        AdminUnauthorized | Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        Denied => (StatusCode::FORBIDDEN, "DENIED"),
        UpstreamInvalid => (StatusCode::BAD_GATEWAY, "UPSTREAM_INVALID"),
        Storage => (StatusCode::INTERNAL_SERVER_ERROR, "STORAGE_ERROR"),
        ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
    }
}

/// The JSON body: `{"errors":[{"code":…,"message":…,"detail":…}]}`.
pub fn body(error: &Error) -> String {
    let (_, code) = status_and_code(&error.kind);
    let detail = match error.kind {
        ErrorKind::RangeNotSatisfiable { size } => serde_json::json!({ "size": size }),
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "errors": [{ "code": code, "message": error.message, "detail": detail }]
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_oci_error_json() {
        let e = Error::new(ErrorKind::BlobUnknown, "blob \"x\" unknown");
        let v: serde_json::Value = serde_json::from_str(&body(&e)).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "blob \"x\" unknown");
        assert_eq!(status_and_code(&e.kind).0, StatusCode::NOT_FOUND);
    }

    #[test]
    fn writes_are_405() {
        assert_eq!(
            status_and_code(&ErrorKind::Unsupported),
            (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
        );
    }
}
