//! The admin API over HTTP: a separate listener (off unless `[admin] listen` is set, meant for
//! loopback), guarded by an optional bearer token. It maps each request to an admin
//! operation (`admin::Op`, whose docs list the endpoints) carried out by the library's
//! `admin::Admin`, plus `GET /metrics` for Prometheus (text format 0.0.4).
//!
//! A pattern (`policy::pins`) is `sha256:<hex>`, `<registry>/<repo>` or `<registry>/<repo>:<tag>`
//! with `*` and `?` globs, percent-encoded in the query (`docker.io%2Flibrary%2F*`; a `/` may
//! also be left as is). `<registry>` is the name requests are recorded under: the route's
//! registry (`docker.io`, `ghcr.io`, or the `[upstream]` URL's host and port).
//!
//! A repository or tag purge removes its records, then the manifests and blobs that no other
//! repository, tag or pin uses (see `cache::refs`), and answers with what it removed and kept:
//! `{"purged": "...", "tags": n, "links": n, "removed": {"manifests", "manifest_bytes",
//! "blobs", "blob_bytes"}, "kept": {...}}`. Purging something with no records is a 404.
//!
//! Answers are JSON; errors use the same OCI error bodies as the registry API (every path
//! component is checked against the OCI grammars: a bad one is a 400).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::Body;
use super::handlers::{App, error_response, full};
use crate::admin::{Admin, Op};
use crate::api::metrics;
use crate::error::{Error, ErrorKind, Result};

pub struct AdminApi {
    pub admin: Admin,
    /// The registry side, for the upstreams' counters in `/metrics`.
    pub app: Arc<App>,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
}

impl super::Service for AdminApi {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        match self.dispatch(&req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%method, %path, error = %e, "admin request refused");
                error_response(&e)
            }
        }
    }
}

impl AdminApi {
    async fn dispatch(&self, req: &Request<Incoming>) -> Result<Response<Body>> {
        self.authorize(req)?;
        let path = req.uri().path();
        let method = req.method();
        if path == "/metrics" {
            if method != Method::GET {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("{method} is not allowed here"),
                ));
            }
            let families = self.admin.metrics(&self.app.routes.upstreams());
            let body = Bytes::from(metrics::render(&families));
            return Ok(respond(StatusCode::OK, metrics::CONTENT_TYPE, body));
        }
        let Some(op) = Op::from_http(method, path, req.uri().query())? else {
            return Err(Error::new(
                ErrorKind::NameUnknown,
                format!("{method} {path} is not an admin endpoint"),
            ));
        };
        let answer = self.admin.apply(&op).await?;
        Ok(json(StatusCode::OK, answer))
    }

    fn authorize(&self, req: &Request<Incoming>) -> Result<()> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::AdminUnauthorized,
                "the admin API needs Authorization: Bearer <admin token>",
            ))
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    respond(status, "application/json", Bytes::from(value.to_string()))
}

/// A response with `body` of `content_type`. Built field by field rather than with `http`'s
/// builder, so that it cannot fail: the length is a number, and the type a valid constant
/// (`metrics::CONTENT_TYPE` or JSON's; `from_static` would reject another at its first use).
fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_LENGTH, length);
    response
}

/// Compares secrets without an early exit that would leak how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares() {
        assert!(super::constant_time_eq(b"secret", b"secret"));
        assert!(!super::constant_time_eq(b"secret", b"secreT"));
        assert!(!super::constant_time_eq(b"secret", b"secret!"));
        assert!(!super::constant_time_eq(b"", b"x"));
    }
}
