//! Glue between HTTP and the cache: an `api::Route` goes in, a hyper response comes out.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream;
use http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, HeaderValue, LINK, RANGE,
    RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};

use super::Peer;
use super::access::AccessGate;
use crate::api::errors;
use crate::api::headers::{
    self, ByteRange, RangeRequest, content_range, merged_accept, unsatisfied_range,
};
use crate::api::route::{self, Route as ApiRoute};
use crate::cache::ranges::ColdRange;
use crate::cache::{BlobReader, Cache};
use crate::config::ColdRanges;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, media_types};
use crate::upstream::{Route, Routed, Routes, Walk, Want};

pub type Body = UnsyncBoxBody<Bytes, Error>;

const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// The response header that carries a request's id, as logged.
const REQUEST_ID: &str = "x-request-id";

/// A request's id: unique within the process, and unlikely to repeat across restarts (the
/// counter starts from the start time).
#[derive(Clone, Copy)]
struct RequestId(u64);

impl RequestId {
    fn next() -> RequestId {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: OnceLock<AtomicU64> = OnceLock::new();
        let next = NEXT.get_or_init(|| {
            let start = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            AtomicU64::new(start)
        });
        RequestId(next.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Everything a request handler needs.
pub struct App {
    pub cache: Arc<Cache>,
    /// `[access]`: who may pull what. `None`: every client may pull everything.
    pub access: Option<AccessGate>,
    pub routes: Routes,
    /// `offline = true`: nothing is fetched upstream.
    pub offline: bool,
}

impl super::Service for App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        self.handle_request(req).await
    }
}

impl App {
    pub async fn handle_request(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let id = RequestId::next();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let peer = req.extensions().get::<Peer>().map(|p| p.0);
        let mut response = match self.dispatch(&req).await {
            Ok(r) => {
                tracing::debug!(request = %id, %method, %path, status = %r.status(), elapsed = ?started.elapsed(), "request");
                r
            }
            Err(e) => {
                let response = error_response(&e);
                let status = response.status();
                // Logged once, here, with the whole cause: for an upstream failure the message
                // lists each upstream tried and what it did. What a client got wrong (4xx but
                // 429) is routine for a mirror (containerd probes for manifests it then finds
                // elsewhere) and stays at debug.
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    tracing::warn!(request = %id, ?peer, %method, %path, %status, elapsed = ?started.elapsed(), error = %e.message, "request failed");
                } else {
                    tracing::debug!(request = %id, ?peer, %method, %path, %status, error = %e.message, "request refused");
                }
                response
            }
        };
        // The same id in the log and in the response, so a user's report finds the log line.
        if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
            response.headers_mut().insert(REQUEST_ID, v);
        }
        response
    }

    async fn dispatch(&self, req: &Request<Incoming>) -> Result<Response<Body>> {
        let head = req.method() == Method::HEAD;
        let query = route::parse_query(req.uri().query())?;
        let api_route = route::route(req.method(), req.uri().path())?;
        let user = match &self.access {
            Some(gate) => {
                let peer = req.extensions().get::<Peer>().map(|p| p.0.ip());
                gate.identify(req.headers(), peer).await?
            }
            None => None,
        };
        // The route a name takes, if this client may pull through it.
        let resolve = |name: &RepoName| -> Result<Routed> {
            let routed = self.routes.resolve(query.ns.as_deref(), name)?;
            if let Some(gate) = &self.access {
                let r = &routed.route;
                gate.authorize(
                    user.as_deref(),
                    &r.registry,
                    routed.name.as_str(),
                    r.credentialed,
                )?;
            }
            Ok(routed)
        };
        match api_route {
            ApiRoute::Ping => {
                if let Some(gate) = &self.access {
                    gate.ping(user.as_deref())?;
                }
                Ok(with_api_version(Response::builder())
                    .header(CONTENT_TYPE, media_types::JSON)
                    .header(CONTENT_LENGTH, 2)
                    .body(if head {
                        empty()
                    } else {
                        full(Bytes::from_static(b"{}"))
                    })
                    .expect("valid response"))
            }
            ApiRoute::Manifest { name, reference } => {
                let routed = resolve(&name)?;
                let accept = merged_accept(req.headers());
                self.manifest(&routed.route, &routed.name, &reference, &accept, head)
                    .await
            }
            ApiRoute::Blob { name, digest } => {
                let routed = resolve(&name)?;
                if head {
                    self.blob_head(&routed.route, &routed.name, &digest).await
                } else {
                    let range = req
                        .headers()
                        .get(RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(headers::parse_range);
                    let client = req.extensions().get::<Peer>().map(|p| p.0.ip());
                    self.blob_get(&routed.route, &routed.name, &digest, range, client)
                        .await
                }
            }
            ApiRoute::TagsList { name, .. } => {
                let routed = resolve(&name)?;
                if self.offline {
                    return Err(Error::new(
                        ErrorKind::NameUnknown,
                        format!(
                            "tags of {}: this mirror is offline and does not list tags",
                            routed.name
                        ),
                    ));
                }
                let q = query.tags.to_query_string();
                let (body, upstream_headers) = Walk::new(&routed.route, Want::Tags)
                    .first_success(&format!("tags of {}", routed.name), |u| {
                        u.get_tags(&routed.name, &q)
                    })
                    .await?;
                let mut b = with_api_version(Response::builder())
                    .header(CONTENT_TYPE, media_types::JSON)
                    .header(CONTENT_LENGTH, body.len());
                if let Some(link) = upstream_headers.get(LINK) {
                    b = b.header(LINK, link);
                }
                Ok(b.body(if head { empty() } else { full(body) })
                    .expect("valid response"))
            }
        }
    }

    async fn manifest(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
        head: bool,
    ) -> Result<Response<Body>> {
        let (info, body) = if head {
            (
                self.cache
                    .manifests
                    .head(route, name, reference, accept)
                    .await?,
                None,
            )
        } else {
            let (m, stale) = self
                .cache
                .manifests
                .get(route, name, reference, accept)
                .await?;
            let mut info = m.info();
            info.stale = stale;
            (info, Some(m.bytes.clone()))
        };
        let mut b = with_api_version(Response::builder())
            .header(CONTENT_TYPE, header_value(&info.media_type)?)
            .header(CONTENT_LENGTH, info.size)
            .header("docker-content-digest", info.digest.to_string())
            .header(ETAG, format!("\"{}\"", info.digest));
        if info.stale {
            // RFC 7234's code for "served stale because revalidation failed".
            b = b.header(
                http::header::WARNING,
                "111 cistern \"Revalidation Failed: every upstream failed, serving the last known tag\"",
            );
        }
        Ok(b.body(body.map_or_else(empty, full))
            .expect("valid response"))
    }

    async fn blob_head(
        &self,
        route: &Route,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Response<Body>> {
        let size = if self.offline {
            let cached = self.cache.blobs.open_cached(digest).await?;
            cached
                .ok_or_else(|| offline_blob_miss(digest))?
                .size()
                .expect("cached blobs have a size")
        } else {
            self.cache.blobs.size(route, name, digest).await?
        };
        Ok(blob_headers(Response::builder(), digest)
            .header(CONTENT_LENGTH, size)
            .body(empty())
            .expect("valid response"))
    }

    async fn blob_get(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        client: Option<std::net::IpAddr>,
    ) -> Result<Response<Body>> {
        let mut source = if self.offline {
            let cached = self.cache.blobs.open_cached(digest).await?;
            cached.ok_or_else(|| offline_blob_miss(digest))?
        } else {
            self.cache.blobs.open(route, name, digest, client).await?
        };
        if range.is_some() && source.size().is_none() {
            // A range needs the size, and this upstream sent none: wait for the fill to end.
            source = source.with_size().await?;
        }
        let builder = blob_headers(Response::builder(), digest);
        let request = match (range, source.size()) {
            (Some(r), Some(size)) => r.resolve(size),
            _ => RangeRequest::Full,
        };
        match request {
            RangeRequest::Unsatisfiable => {
                let size = source.size().expect("resolved against a size");
                Err(Error::new(
                    ErrorKind::RangeNotSatisfiable { size },
                    format!("range is outside blob {digest} of {size} bytes"),
                ))
            }
            RangeRequest::Partial { start, end } => {
                let size = source.size().expect("resolved against a size");
                // A blob not verified yet: with `cold_ranges = "upstream"` the range is sent
                // without waiting for the whole blob (upstream bytes, not yet verified).
                let body = if route.cold_ranges == ColdRanges::Upstream && !self.offline {
                    let cold = self.cache.blobs.cold_ranges();
                    match cold.serve(route, name, digest, source, (start, end)).await {
                        ColdRange::Fetched(bytes) => full(bytes),
                        ColdRange::Reader(reader) => stream_body(reader),
                    }
                } else {
                    stream_body(BlobReader::new(source, start, Some(end)))
                };
                Ok(builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(CONTENT_RANGE, content_range(start, end, size))
                    .header(CONTENT_LENGTH, end - start)
                    .body(body)
                    .expect("valid response"))
            }
            RangeRequest::Full => {
                let mut b = builder;
                if let Some(size) = source.size() {
                    b = b.header(CONTENT_LENGTH, size);
                }
                let reader = BlobReader::new(source, 0, None);
                Ok(b.body(stream_body(reader)).expect("valid response"))
            }
        }
    }
}

fn offline_blob_miss(digest: &Digest) -> Error {
    Error::new(
        ErrorKind::BlobUnknown,
        format!("blob {digest} is not in the cache, and this mirror is offline"),
    )
}

fn with_api_version(b: http::response::Builder) -> http::response::Builder {
    b.header(API_VERSION.0, API_VERSION.1)
}

fn blob_headers(b: http::response::Builder, digest: &Digest) -> http::response::Builder {
    with_api_version(b)
        .header(CONTENT_TYPE, media_types::BLOB)
        .header(ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest.to_string())
        .header(ETAG, format!("\"{digest}\""))
}

fn header_value(s: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(s).map_err(|_| {
        Error::new(
            ErrorKind::UpstreamInvalid,
            format!("media type {s:?} is not a valid header value"),
        )
    })
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body that streams a reader. An `Err` item makes hyper abort the connection, which is how
/// a response that cannot be completed ends: never as a clean short body.
fn stream_body(reader: BlobReader) -> Body {
    let s = stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_chunk().await? {
            Ok(bytes) => Some((Ok(Frame::data(bytes)), Some(reader))),
            Err(e) => {
                tracing::warn!(error = %e, "aborting a blob response");
                Some((Err(e), None))
            }
        }
    });
    StreamBody::new(s).boxed_unsync()
}

pub fn error_response(e: &Error) -> Response<Body> {
    let (status, _) = errors::status_and_code(&e.kind);
    let body = errors::body(e);
    let mut b = with_api_version(Response::builder().status(status))
        .header(CONTENT_TYPE, media_types::JSON)
        .header(CONTENT_LENGTH, body.len());
    match &e.kind {
        ErrorKind::RangeNotSatisfiable { size } => {
            b = b.header(CONTENT_RANGE, unsatisfied_range(*size));
        }
        ErrorKind::TooManyRequests {
            retry_after: Some(after),
        } => {
            b = b.header(RETRY_AFTER, after.as_secs());
        }
        // What makes Docker, containerd, podman and skopeo send the credentials they have
        // for this host.
        ErrorKind::Unauthorized => {
            b = b.header(WWW_AUTHENTICATE, "Basic realm=\"cistern\"");
        }
        _ => {}
    }
    b.body(full(Bytes::from(body))).expect("valid response")
}
