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
use super::zero_copy::ZeroCopy;
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
                built(
                    with_api_version(Response::builder())
                        .header(CONTENT_TYPE, media_types::JSON)
                        .header(CONTENT_LENGTH, 2)
                        .body(if head {
                            empty()
                        } else {
                            full(Bytes::from_static(b"{}"))
                        }),
                )
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
                    let zero_copy = req.extensions().get::<ZeroCopy>().is_some();
                    self.blob_get(
                        &routed.route,
                        &routed.name,
                        &digest,
                        range,
                        client,
                        zero_copy,
                    )
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
                built(b.body(if head { empty() } else { full(body) }))
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
        built(b.body(body.map_or_else(empty, full)))
    }

    async fn blob_head(
        &self,
        route: &Route,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Response<Body>> {
        let size = if self.offline {
            let cached = self.cache.blobs.open_cached(digest).await?;
            // A cached blob always has a size.
            cached
                .and_then(|c| c.size())
                .ok_or_else(|| offline_blob_miss(digest))?
        } else {
            self.cache.blobs.size(route, name, digest).await?
        };
        built(
            blob_headers(Response::builder(), digest)
                .header(CONTENT_LENGTH, size)
                .body(empty()),
        )
    }

    async fn blob_get(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        client: Option<std::net::IpAddr>,
        zero_copy: bool,
    ) -> Result<Response<Body>> {
        // Mapped chunks, sent by sendfile, where the connection can (`server::zero_copy`).
        let reader = |reader: BlobReader| {
            if zero_copy {
                reader.zero_copy()
            } else {
                reader
            }
        };
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
        let size = source.size();
        let request = match (range, size) {
            (Some(r), Some(size)) => r.resolve(size),
            _ => RangeRequest::Full,
        };
        // Only a range resolved against a size is partial or unsatisfiable.
        match (request, size) {
            (RangeRequest::Unsatisfiable, Some(size)) => Err(Error::new(
                ErrorKind::RangeNotSatisfiable { size },
                format!("range is outside blob {digest} of {size} bytes"),
            )),
            (RangeRequest::Partial { start, end }, Some(size)) => {
                // A blob not verified yet: with `cold_ranges = "upstream"` the range is sent
                // without waiting for the whole blob (upstream bytes, not yet verified).
                let body = if route.cold_ranges == ColdRanges::Upstream && !self.offline {
                    let cold = self.cache.blobs.cold_ranges();
                    match cold.serve(route, name, digest, source, (start, end)).await {
                        ColdRange::Fetched(bytes) => full(bytes),
                        ColdRange::Reader(r) => stream_body(reader(r)),
                    }
                } else {
                    stream_body(reader(BlobReader::new(source, start, Some(end))))
                };
                built(
                    builder
                        .status(StatusCode::PARTIAL_CONTENT)
                        .header(CONTENT_RANGE, content_range(start, end, size))
                        .header(CONTENT_LENGTH, end - start)
                        .body(body),
                )
            }
            _ => {
                let mut b = builder;
                if let Some(size) = size {
                    b = b.header(CONTENT_LENGTH, size);
                }
                built(b.body(stream_body(reader(BlobReader::new(source, 0, None)))))
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

/// Finishes a response made with `http`'s builder, which fails only on a header value that is
/// not one. Every value set with it here is a number, a constant, a digest, or a value already
/// checked (`header_value`, an upstream's header): a failure would be a bug, and gets the
/// client a 500 naming it rather than a reset connection.
fn built(response: http::Result<Response<Body>>) -> Result<Response<Body>> {
    response.map_err(|e| Error::internal(format!("building a response: {e}")))
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

/// The response for an error. Built field by field rather than with `http`'s builder, so that
/// it cannot fail: every header value is a number or a constant.
pub fn error_response(e: &Error) -> Response<Body> {
    let (status, _) = errors::status_and_code(&e.kind);
    let body = errors::body(e);
    let length = HeaderValue::from(body.len());
    let mut response = Response::new(full(Bytes::from(body)));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    h.insert(CONTENT_TYPE, HeaderValue::from_static(media_types::JSON));
    h.insert(CONTENT_LENGTH, length);
    match &e.kind {
        ErrorKind::RangeNotSatisfiable { size } => {
            // `bytes */<number>`: always a valid value.
            if let Ok(v) = HeaderValue::try_from(unsatisfied_range(*size)) {
                h.insert(CONTENT_RANGE, v);
            }
        }
        ErrorKind::TooManyRequests {
            retry_after: Some(after),
        } => {
            h.insert(RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        // What makes Docker, containerd, podman and skopeo send the credentials they have
        // for this host.
        ErrorKind::Unauthorized => {
            h.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cistern\""),
            );
        }
        _ => {}
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn header(r: &Response<Body>, name: &str) -> Option<String> {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn error_responses_carry_their_status_and_headers() {
        let e = Error::new(ErrorKind::RangeNotSatisfiable { size: 42 }, "range");
        let r = error_response(&e);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&r, "content-range").as_deref(), Some("bytes */42"));
        assert_eq!(
            header(&r, "content-type").as_deref(),
            Some(media_types::JSON)
        );
        assert_eq!(
            header(&r, "content-length"),
            Some(errors::body(&e).len().to_string())
        );
        assert_eq!(
            header(&r, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0")
        );

        let e = Error::new(
            ErrorKind::TooManyRequests {
                retry_after: Some(Duration::from_secs(7)),
            },
            "slow down",
        );
        let r = error_response(&e);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&r, "retry-after").as_deref(), Some("7"));

        let r = error_response(&Error::new(ErrorKind::Unauthorized, "log in"));
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            header(&r, "www-authenticate").as_deref(),
            Some("Basic realm=\"cistern\"")
        );
        assert_eq!(header(&r, "retry-after"), None);
    }
}
