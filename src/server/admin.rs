//! The admin API: a separate listener (off unless `[admin] listen` is set, meant for
//! loopback), guarded by an optional bearer token.
//!
//! ```text
//! GET    /admin/stats                               cache size, entries, hit ratio, fills
//! GET    /metrics                                   the same and the upstreams' counters,
//!                                                   for Prometheus (text format 0.0.4)
//! DELETE /admin/blobs/<digest>                      purge a blob (open readers finish)
//! DELETE /admin/manifests/<digest>                  purge a manifest
//! DELETE /admin/repositories/<registry>/<repo>      purge a repository
//! DELETE /admin/tags/<registry>/<repo>:<tag>        purge a tag
//! GET    /admin/pins                                pins (run time, and from the config)
//! PUT    /admin/pins?pattern=<pattern>              pin (kept in data_dir/pins.json)
//! DELETE /admin/pins?pattern=<pattern>              unpin
//! PUT    /admin/pins/<digest>                       pin a digest (the older form)
//! DELETE /admin/pins/<digest>                       unpin a digest
//! ```
//!
//! A pattern (`cache::pins`) is `sha256:<hex>`, `<registry>/<repo>` or `<registry>/<repo>:<tag>`
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
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::Body;
use super::handlers::{App, error_response, full};
use crate::api::metrics::{self, Family};
use crate::cache::evict::Usage;
use crate::cache::pins::Pin;
use crate::cache::refs::{PurgeReport, RepoKey, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::name::check_registry;
use crate::oci::{Digest, RepoName, Tag};
use crate::storage::DiskStore;

pub struct Admin {
    pub app: Arc<App>,
    pub usage: Arc<Usage>,
    pub store: Arc<DiskStore>,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// `cache.max_size`, for stats.
    pub max_size: Option<u64>,
    /// Pin changes and their `pins.json` writes happen one at a time.
    pub pin_writes: tokio::sync::Mutex<()>,
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
        if path == "/metrics" {
            expect(method, &Method::GET)?;
            let body = Bytes::from(metrics::render(&self.metrics()));
            return Ok(Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(full(body))
                .expect("valid response"));
        }
        if path == "/admin/pins" {
            return match *method {
                Method::GET => {
                    let strings = |pins: Vec<Pin>| -> Vec<String> {
                        pins.iter().map(Pin::to_string).collect()
                    };
                    Ok(json(
                        StatusCode::OK,
                        serde_json::json!({
                            "pins": strings(self.usage.pins()),
                            "config": strings(self.usage.config_pins()),
                        }),
                    ))
                }
                Method::PUT | Method::DELETE => {
                    let pattern = query_param(req.uri().query(), "pattern").ok_or_else(|| {
                        Error::new(
                            ErrorKind::NameInvalid,
                            "give the pin pattern as ?pattern=<sha256:…|registry/repo[:tag]>",
                        )
                    })?;
                    let pin =
                        Pin::parse(&pattern).map_err(|e| Error::new(ErrorKind::NameInvalid, e))?;
                    self.change_pin(method, pin).await
                }
                _ => Err(not_allowed(method)),
            };
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
            let pin = Pin::Digest(d.to_string());
            return self.change_pin(method, pin).await;
        }
        if let Some(rest) = path.strip_prefix("/admin/repositories/") {
            let target = Target::Repository(repo_key(rest)?);
            expect(method, &Method::DELETE)?;
            return self.purge(target).await;
        }
        if let Some(rest) = path.strip_prefix("/admin/tags/") {
            let (repo, tag) = rest.rsplit_once(':').ok_or_else(|| {
                Error::new(
                    ErrorKind::TagInvalid,
                    format!("{rest:?}: give <registry>/<repository>:<tag>"),
                )
            })?;
            let tag =
                Tag::parse(tag).map_err(|e| Error::new(ErrorKind::TagInvalid, e.to_string()))?;
            let target = Target::Tag(repo_key(repo)?, tag.to_string());
            expect(method, &Method::DELETE)?;
            return self.purge(target).await;
        }
        Err(Error::new(
            ErrorKind::NameUnknown,
            format!("{method} {path} is not an admin endpoint"),
        ))
    }

    /// Adds or removes a run-time pin and saves the pins.
    async fn change_pin(&self, method: &Method, pin: Pin) -> Result<Response<Body>> {
        let _one_at_a_time = self.pin_writes.lock().await;
        let changed = match *method {
            Method::PUT => self.usage.pin(&pin),
            Method::DELETE => self.usage.unpin(&pin),
            _ => return Err(not_allowed(method)),
        };
        if changed {
            let store = self.store.clone();
            let pins: Vec<String> = self.usage.pins().iter().map(Pin::to_string).collect();
            crate::cache::blocking(move || store.write_pins(&pins), "saving pins").await?;
            tracing::info!(%pin, pinned = *method == Method::PUT, "pins changed");
        }
        let mut answer = serde_json::json!({ "pattern": pin.to_string(), "changed": changed });
        if let Some(d) = pin.exact_digest() {
            answer["digest"] = serde_json::json!(d.to_string());
        }
        Ok(json(StatusCode::OK, answer))
    }

    /// Purges a repository or a tag, and drops the removed blobs from the disk budget's index.
    async fn purge(&self, target: Target) -> Result<Response<Body>> {
        let pins = self.usage.all_pins();
        let (plan, report) = self.app.manifests.purge_refs(&target, &pins).await?;
        // The files are gone; the blob cache drops them from the disk budget's index and
        // stops a fill of one of them that is still running from committing it again.
        for d in &plan.remove_blobs {
            self.app.blobs.purged(d).await?;
        }
        tracing::info!(
            %target,
            manifests = report.removed.manifests,
            blobs = report.removed.blobs,
            bytes = report.removed.blob_bytes + report.removed.manifest_bytes,
            "purged"
        );
        Ok(json(StatusCode::OK, purge_answer(&target, &report)))
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
        let (manifests, tags, links) = self.app.manifests.index().counts();
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
            "config_pins": self.usage.config_pins().len(),
            "manifests_indexed": manifests,
            "tags": tags,
            "links": links,
        })
    }
}

impl Admin {
    /// Everything `/admin/stats` says, as Prometheus metrics, and each upstream's counters.
    fn metrics(&self) -> Vec<Family> {
        let (manifests, tags, links) = self.app.manifests.index().counts();
        let (hits, misses) = self.app.blobs.hit_counts();
        let (evicted, evicted_bytes) = self.usage.evictions();
        let mut requests = Family::counter(
            "cistern_blob_requests_total",
            "Blob GETs by where the bytes came from: the disk cache (hit) or an upstream fill, started or joined (miss).",
        );
        requests.sample(vec![("result", "hit".into())], hits as f64);
        requests.sample(vec![("result", "miss".into())], misses as f64);
        let mut pins = Family::gauge(
            "cistern_pins",
            "Pin patterns: made at run time (admin API, pins.json) or in the config.",
        );
        pins.sample(
            vec![("source", "admin".into())],
            self.usage.pins().len() as f64,
        );
        pins.sample(
            vec![("source", "config".into())],
            self.usage.config_pins().len() as f64,
        );
        let mut families = vec![
            Family::gauge("cistern_cache_blobs", "Blobs in the disk cache.")
                .value(self.usage.len() as f64),
            Family::gauge(
                "cistern_cache_blob_bytes",
                "Bytes of blobs in the disk cache.",
            )
            .value(self.usage.total() as f64),
            requests,
            Family::gauge("cistern_fills_running", "Blob downloads under way.")
                .value(self.app.blobs.running_fills() as f64),
            Family::counter(
                "cistern_evicted_blobs_total",
                "Blobs removed to keep the cache under its budget.",
            )
            .value(evicted as f64),
            Family::counter(
                "cistern_evicted_bytes_total",
                "Bytes of blobs removed to keep the cache under its budget.",
            )
            .value(evicted_bytes as f64),
            Family::gauge(
                "cistern_manifests",
                "Manifests in the disk cache (the reference index's count).",
            )
            .value(manifests as f64),
            Family::gauge(
                "cistern_manifests_in_memory",
                "Manifests kept in memory, in front of the disk.",
            )
            .value(self.app.manifests.in_memory() as f64),
            Family::gauge("cistern_tags", "Tag records on disk.").value(tags as f64),
            Family::gauge(
                "cistern_links",
                "Manifests recorded as pulled from a repository by digest.",
            )
            .value(links as f64),
            pins,
        ];
        if let Some(max) = self.max_size {
            families.push(
                Family::gauge(
                    "cistern_cache_max_size_bytes",
                    "The blob budget, cache.max_size.",
                )
                .value(max as f64),
            );
        }
        let mut up_requests = Family::counter(
            "cistern_upstream_requests_total",
            "Requests sent to each upstream.",
        );
        let mut up_failures = Family::counter(
            "cistern_upstream_failures_total",
            "Exchanges with each upstream that failed: connection errors, timeouts, 5xx, bodies cut off or not matching their digest.",
        );
        let mut up_skipped = Family::counter(
            "cistern_upstream_skipped_total",
            "Requests that passed an upstream over because its circuit was open.",
        );
        let mut up_bytes = Family::counter(
            "cistern_upstream_blob_bytes_total",
            "Blob bytes received from each upstream.",
        );
        let mut up_open = Family::gauge(
            "cistern_upstream_circuit_open",
            "1 while an upstream's circuit is open (requests skip it), else 0.",
        );
        for u in self.app.routes.upstreams() {
            let s = u.stats();
            let label = || vec![("upstream", u.name().to_string())];
            up_requests.sample(label(), s.requests as f64);
            up_failures.sample(label(), s.failures as f64);
            up_skipped.sample(label(), s.skipped as f64);
            up_bytes.sample(label(), s.blob_bytes as f64);
            up_open.sample(label(), u8::from(s.circuit_open));
        }
        families.extend([up_requests, up_failures, up_skipped, up_bytes, up_open]);
        families
    }
}

/// The JSON answer to a purge (the CLI prints the same on a stopped cache).
pub fn purge_answer(target: &Target, report: &PurgeReport) -> serde_json::Value {
    let mut v = serde_json::to_value(report).unwrap_or_default();
    v["purged"] = serde_json::json!(target.to_string());
    v
}

/// `<registry>/<repository>`, each checked against its grammar.
pub fn repo_key(s: &str) -> Result<RepoKey> {
    let (registry, repository) = s.split_once('/').ok_or_else(|| {
        Error::new(
            ErrorKind::NameInvalid,
            format!("{s:?}: give <registry>/<repository>"),
        )
    })?;
    let registry = crate::api::registry::canonical_registry(registry);
    check_registry(&registry)
        .map_err(|e| Error::new(ErrorKind::NameInvalid, format!("registry: {e}")))?;
    let repository = RepoName::parse(repository)
        .map_err(|e| Error::new(ErrorKind::NameInvalid, e.to_string()))?;
    Ok(RepoKey {
        registry,
        repository: repository.to_string(),
    })
}

/// A query parameter, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
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
