//! Answers for a [`super::FakeRegistry`] script to return: blobs and manifests, OCI errors,
//! challenges, tokens and redirects.

use bytes::Bytes;
use http::header;
use http::{Response, StatusCode};
use http_body_util::Full;

/// What a script answers.
pub type Reply = Response<Full<Bytes>>;

/// 200 with a blob (or manifest) body: `Content-Length` and `Docker-Content-Digest` set.
pub fn blob_reply(data: &Bytes) -> Reply {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, data.len())
        .header("docker-content-digest", crate::support::sha256_digest(data))
        .body(Full::new(data.clone()))
        .unwrap()
}

/// An OCI error body with this status and code.
pub fn oci_error(status: u16, code: &str) -> Reply {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"scripted","detail":null}}]}}"#);
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// 401 with this `WWW-Authenticate` challenge.
pub fn challenge(www_authenticate: &str) -> Reply {
    let mut reply = oci_error(401, "UNAUTHORIZED");
    reply.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        www_authenticate.parse().expect("a header value"),
    );
    reply
}

/// A token endpoint's answer: `token`, valid for five minutes.
pub fn token_reply(token: &str) -> Reply {
    expiring_token_reply(token, 300)
}

/// A token endpoint's answer: `token`, valid for `expires_in` seconds.
pub fn expiring_token_reply(token: &str, expires_in: u64) -> Reply {
    Response::new(Full::new(Bytes::from(format!(
        r#"{{"token":"{token}","expires_in":{expires_in}}}"#
    ))))
}

/// 307 to `location`.
pub fn redirect(location: &str) -> Reply {
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(header::LOCATION, location)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The `Authorization` value for HTTP Basic auth, as a client library writes it.
pub fn basic_authorization(username: &str, password: &str) -> String {
    crate::support::init(); // reqwest needs the crypto provider even for a client it never uses
    let request = reqwest::Client::new()
        .get("http://127.0.0.1/")
        .basic_auth(username, Some(password))
        .build()
        .expect("build a request");
    request.headers()[header::AUTHORIZATION]
        .to_str()
        .expect("ASCII")
        .to_string()
}

/// 200 with a manifest: its media type, length and digest (hyper drops the body for a HEAD).
pub fn manifest_reply(bytes: &Bytes) -> Reply {
    let mut reply = blob_reply(bytes);
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        crate::support::OCI_MANIFEST
            .parse()
            .expect("a header value"),
    );
    reply
}
