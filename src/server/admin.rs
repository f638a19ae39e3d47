//! The admin API: a separate listener (off unless `[admin] listen` is set, meant for
//! loopback), guarded by an optional bearer token.
//!
//! ```text
//! GET    /admin/stats               cache size, entries, hit ratio, running fills
//! DELETE /admin/blobs/<digest>      purge a blob (readers that have it open finish)
//! DELETE /admin/manifests/<digest>  purge a manifest
//! GET    /admin/pins                digests pinned at run time
//! PUT    /admin/pins/<digest>       pin: never evicted (kept in data_dir/pins.json)
//! DELETE /admin/pins/<digest>       unpin
//! ```
//!
//! Answers are JSON; errors use the same OCI error bodies as the registry API.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::Body;
use super::handlers::{App, error_response, full};
use crate::cache::evict::Usage;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::Digest;
use crate::storage::DiskStore;

pub struct Admin {
    pub app: Arc<App>,
    pub usage: Arc<Usage>,
    pub store: Arc<DiskStore>,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// `cache.max_size`, for stats.
    pub max_size: Option<u64>,
}

impl super::Service for Admin {
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

impl Admin {
    async fn dispatch(&self, req: &Request<Incoming>) -> Result<Response<Body>> {
        self.authorize(req)?;
        let path = req.uri().path();
        let method = req.method();
        if path == "/admin/stats" && method == Method::GET {
            return Ok(json(StatusCode::OK, self.stats()));
        }
        if path == "/admin/pins" && method == Method::GET {
            let pins: Vec<String> = self.usage.pins().iter().map(Digest::to_string).collect();
            return Ok(json(StatusCode::OK, serde_json::json!({ "pins": pins })));
        }
        let digest_in = |prefix: &str| -> Option<Result<Digest>> {
            path.strip_prefix(prefix).map(|d| {
                Digest::parse(d).map_err(|e| Error::new(ErrorKind::DigestInvalid, e.to_string()))
            })
        };
        if let Some(d) = digest_in("/admin/blobs/") {
            let d = d?;
            expect(method, &Method::DELETE)?;
            self.app.blobs.purge(&d).await?;
            tracing::info!(digest = %d, "blob purged");
            return Ok(json(
                StatusCode::OK,
                serde_json::json!({ "purged": d.to_string() }),
            ));
        }
        if let Some(d) = digest_in("/admin/manifests/") {
            let d = d?;
            expect(method, &Method::DELETE)?;
            self.app.manifests.purge(&d).await?;
            tracing::info!(digest = %d, "manifest purged");
            return Ok(json(
                StatusCode::OK,
                serde_json::json!({ "purged": d.to_string() }),
            ));
        }
        if let Some(d) = digest_in("/admin/pins/") {
            let d = d?;
            let changed = match *method {
                Method::PUT => self.usage.pin(&d),
                Method::DELETE => self.usage.unpin(&d),
                _ => return Err(not_allowed(method)),
            };
            let store = self.store.clone();
            let pins = self.usage.pins();
            crate::cache::fill::blocking(move || store.write_pins(&pins), "saving pins").await?;
            return Ok(json(
                StatusCode::OK,
                serde_json::json!({ "digest": d.to_string(), "changed": changed }),
            ));
        }
        Err(Error::new(
            ErrorKind::NameUnknown,
            format!("{method} {path} is not an admin endpoint"),
        ))
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

    fn stats(&self) -> serde_json::Value {
        let (hits, misses) = self.app.blobs.hit_counts();
        let ratio = if hits + misses == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!(hits as f64 / (hits + misses) as f64)
        };
        serde_json::json!({
            "blobs": self.usage.len(),
            "blob_bytes": self.usage.total(),
            "max_size": self.max_size,
            "manifests_in_memory": self.app.manifests.in_memory(),
            "blob_hits": hits,
            "blob_misses": misses,
            "hit_ratio": ratio,
            "fills_running": self.app.blobs.running_fills(),
            "pins": self.usage.pins().len(),
        })
    }
}

fn expect(method: &Method, want: &Method) -> Result<()> {
    if method == want {
        Ok(())
    } else {
        Err(not_allowed(method))
    }
}

fn not_allowed(method: &Method) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("{method} is not allowed here"),
    )
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let body = Bytes::from(value.to_string());
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(full(body))
        .expect("valid response")
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
