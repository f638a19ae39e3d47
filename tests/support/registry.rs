//! `FakeRegistry`: an in-process upstream registry (OCI pull API over hyper 1) with fault
//! injection and a request log.
//!
//! ```ignore
//! let blob = blob_bytes(4 * MIB, 1);
//! let digest = sha256_digest(&blob);
//! let gate = Gate::new();
//! let upstream = FakeRegistry::builder()
//!     .blob("library/app", blob.clone())
//!     .on_blob(&digest, Fault::GateAt(MIB as u64, gate.clone()))
//!     .start()
//!     .await;
//! upstream.on_blob(&digest, Fault::WrongBytes.once());
//! assert_eq!(upstream.blob_gets(&digest), 0);
//! ```
//!
//! Content lives per repository, like a real registry: an unknown repository answers 404
//! `NAME_UNKNOWN`, an unknown blob or manifest 404 `BLOB_UNKNOWN` / `MANIFEST_UNKNOWN`.
//!
//! Faults are attached to a blob (by digest) or a manifest (by the reference the request uses:
//! tag or digest) as a [`Rule`]: one or more [`Fault`]s applied together, forever or to the
//! next N matching requests. Each request consumes at most one rule: the first one, in the
//! order they were added, that applies to its method and has uses left.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::sha256_digest;

type Body = BoxBody<Bytes, io::Error>;

/// Bytes per body frame when no fault asks for something else.
const CHUNK: usize = 64 * 1024;

// === Faults ===

/// One way for the upstream to misbehave on a request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an OCI error body (GET and HEAD). A 429 carries
    /// `Retry-After: 1`; a 404 uses the matching `*_UNKNOWN` code.
    Status(u16),
    /// Declare the full `Content-Length`, send exactly this many bytes, then abort the
    /// connection. The abort waits until those bytes have been written to the socket, so the
    /// client receives every one of them before the connection ends: the cut offset is exact.
    CutAfter(u64),
    /// Declare the full `Content-Length`, send this many bytes, then send nothing more until the
    /// client goes away or the registry is dropped.
    StallAfter(u64),
    /// Send a body of the right length whose every byte is inverted (headers, including
    /// `Docker-Content-Digest`, still describe the real content).
    WrongBytes,
    /// Send the body in small chunks at about this rate.
    Slow { bytes_per_sec: u64 },
    /// Send this many bytes, then hold the rest of the body until the gate opens.
    GateAt(u64, Gate),
    /// Answer HEAD without a `Content-Length` (as some upstreams do).
    HeadWithoutLength,
}

impl Fault {
    /// A rule that applies to the next matching request only.
    pub fn once(self) -> Rule {
        Rule::from(self).once()
    }

    /// A rule that applies to the next `n` matching requests.
    pub fn times(self, n: usize) -> Rule {
        Rule::from(self).times(n)
    }

    /// A rule applying this fault and `other` to the same request.
    pub fn and(self, other: Fault) -> Rule {
        Rule::from(self).and(other)
    }

    fn applies_to(&self, method: &Method) -> bool {
        match self {
            Fault::Status(_) => method == Method::GET || method == Method::HEAD,
            Fault::HeadWithoutLength => method == Method::HEAD,
            _ => method == Method::GET,
        }
    }
}

/// Faults applied together to a request, with an optional use count.
#[derive(Clone, Debug)]
pub struct Rule {
    faults: Vec<Fault>,
    /// `None`: forever.
    remaining: Option<usize>,
}

impl Rule {
    pub fn and(mut self, fault: Fault) -> Rule {
        self.faults.push(fault);
        self
    }

    pub fn once(self) -> Rule {
        self.times(1)
    }

    pub fn times(mut self, n: usize) -> Rule {
        self.remaining = Some(n);
        self
    }

    /// A rule applies to a method only if every one of its faults does (a HEAD has no body to
    /// cut, a GET has no missing HEAD length).
    fn applies_to(&self, method: &Method) -> bool {
        self.remaining != Some(0) && self.faults.iter().all(|f| f.applies_to(method))
    }

    fn status(&self) -> Option<u16> {
        self.faults.iter().find_map(|f| match f {
            Fault::Status(code) => Some(*code),
            _ => None,
        })
    }

    fn has(&self, pred: impl Fn(&Fault) -> bool) -> bool {
        self.faults.iter().any(pred)
    }
}

impl From<Fault> for Rule {
    fn from(fault: Fault) -> Rule {
        Rule {
            faults: vec![fault],
            remaining: None,
        }
    }
}

// === impl Gate ===

/// Holds response bodies at a byte offset until the test opens it. Once open it stays open.
#[derive(Clone, Debug)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    open: watch::Sender<bool>,
    /// How many bodies have reached the gate so far (open or not).
    reached: watch::Sender<usize>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                open: watch::Sender::new(false),
                reached: watch::Sender::new(0),
            }),
        }
    }

    /// Lets every held body, and every later one, through.
    pub fn open(&self) {
        self.inner.open.send_replace(true);
    }

    /// Waits (bounded) until `n` bodies in total have been sent up to the gate. The bytes
    /// before the gate have then been handed to the connection, not necessarily received.
    pub async fn wait_reached(&self, n: usize) {
        let mut rx = self.inner.reached.subscribe();
        super::bounded("bodies to reach the gate", rx.wait_for(|&r| r >= n))
            .await
            .expect("gate sender lives as long as the gate");
    }

    pub fn reached(&self) -> usize {
        *self.inner.reached.borrow()
    }

    async fn pass(&self) {
        self.inner.reached.send_modify(|r| *r += 1);
        let mut rx = self.inner.open.subscribe();
        let _ = rx.wait_for(|&open| open).await;
    }
}

// === The request log ===

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ping,
    Blob,
    Manifest,
    Tags,
    Other,
}

/// One request the registry received, recorded before it was answered.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub kind: Kind,
    /// Repository name; empty for `Ping` and `Other`.
    pub repo: String,
    /// Digest for blobs, tag or digest for manifests; empty otherwise.
    pub reference: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

impl Seen {
    /// Every value of `name` across all of its header lines, split at commas and trimmed.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

// === Registry state ===

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    rules: Vec<(Target, Rule)>,
    seen: Vec<Seen>,
}

#[derive(Default)]
struct Repo {
    blobs: HashMap<String, Bytes>,
    /// By digest.
    manifests: HashMap<String, Manifest>,
    /// Tag → digest; ordered, as `tags/list` returns tags in lexical order.
    tags: BTreeMap<String, String>,
}

#[derive(Clone)]
struct Manifest {
    media_type: String,
    bytes: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Blob(String),
    Manifest(String),
}

impl State {
    fn add_blob(&mut self, repo: &str, data: Bytes) -> String {
        let digest = sha256_digest(&data);
        self.repo(repo).blobs.insert(digest.clone(), data);
        digest
    }

    fn add_manifest(
        &mut self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> String {
        let digest = sha256_digest(&bytes);
        let repo = self.repo(repo);
        repo.manifests.insert(
            digest.clone(),
            Manifest {
                media_type: media_type.to_string(),
                bytes,
            },
        );
        if let Some(tag) = tag {
            repo.tags.insert(tag.to_string(), digest.clone());
        }
        digest
    }

    fn repo(&mut self, name: &str) -> &mut Repo {
        self.repos.entry(name.to_string()).or_default()
    }

    /// Consumes one use of the first rule for `target` that applies to `method`.
    fn take_rule(&mut self, target: &Target, method: &Method) -> Option<Rule> {
        let (_, rule) = self
            .rules
            .iter_mut()
            .find(|(t, rule)| t == target && rule.applies_to(method))?;
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
        }
        Some(rule.clone())
    }
}

// They are never held across an await, and the critical sections are tiny, so a std mutex is
// the simple choice.
struct Shared {
    state: Mutex<State>,
    /// Cancelled when the registry is dropped: ends the accept loop, every connection and
    /// every stalled or gated body.
    stop: CancellationToken,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl FakeRegistryBuilder ===

/// Content and faults to start a [`FakeRegistry`] with.
#[derive(Default)]
pub struct FakeRegistryBuilder {
    state: State,
}

impl FakeRegistryBuilder {
    pub fn blob(mut self, repo: &str, data: impl Into<Bytes>) -> Self {
        self.state.add_blob(repo, data.into());
        self
    }

    /// A manifest stored under the sha256 of `bytes`, and under `tag` if given.
    pub fn manifest(
        mut self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Self {
        self.state.add_manifest(repo, tag, media_type, bytes.into());
        self
    }

    pub fn on_blob(mut self, digest: &str, rule: impl Into<Rule>) -> Self {
        self.state
            .rules
            .push((Target::Blob(digest.to_string()), rule.into()));
        self
    }

    pub fn on_manifest(mut self, reference: &str, rule: impl Into<Rule>) -> Self {
        self.state
            .rules
            .push((Target::Manifest(reference.to_string()), rule.into()));
        self
    }

    /// Binds `127.0.0.1:0` and serves until the registry is dropped.
    pub async fn start(self) -> FakeRegistry {
        super::init();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake registry");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(self.state),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        FakeRegistry { addr, shared }
    }
}

// === impl FakeRegistry ===

/// A running fake upstream. Dropping it closes every connection it holds.
pub struct FakeRegistry {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl FakeRegistry {
    pub fn builder() -> FakeRegistryBuilder {
        FakeRegistryBuilder::default()
    }

    /// A registry holding one manifest (in `repo`, under `tag` if given), and nothing else.
    pub async fn with_manifest(
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: &Bytes,
    ) -> FakeRegistry {
        FakeRegistry::builder()
            .manifest(repo, tag, media_type, bytes.clone())
            .start()
            .await
    }

    /// A registry holding `blob` in `repo`, and nothing else, whose requests for it follow
    /// `rule`.
    pub async fn with_faulty_blob(repo: &str, blob: &Bytes, rule: impl Into<Rule>) -> FakeRegistry {
        let digest = sha256_digest(blob);
        FakeRegistry::builder()
            .blob(repo, blob.clone())
            .on_blob(&digest, rule)
            .start()
            .await
    }

    /// A registry holding `blobs` in `repo`, and nothing else.
    pub async fn with_blobs(repo: &str, blobs: &[Bytes]) -> FakeRegistry {
        let mut builder = FakeRegistry::builder();
        for blob in blobs {
            builder = builder.blob(repo, blob.clone());
        }
        builder.start().await
    }

    /// A registry holding `blob` in `repo`, and nothing else.
    pub async fn with_blob(repo: &str, blob: &Bytes) -> FakeRegistry {
        FakeRegistry::builder()
            .blob(repo, blob.clone())
            .start()
            .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, without `/v2/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a blob to `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        self.shared.lock().add_blob(repo, data.into())
    }

    /// Adds a manifest (and points `tag` at it); returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        self.shared
            .lock()
            .add_manifest(repo, tag, media_type, bytes.into())
    }

    /// Points `tag` at an existing (or future) manifest digest.
    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        self.shared
            .lock()
            .repo(repo)
            .tags
            .insert(tag.to_string(), digest.to_string());
    }

    pub fn on_blob(&self, digest: &str, rule: impl Into<Rule>) {
        self.shared
            .lock()
            .rules
            .push((Target::Blob(digest.to_string()), rule.into()));
    }

    pub fn on_manifest(&self, reference: &str, rule: impl Into<Rule>) {
        self.shared
            .lock()
            .rules
            .push((Target::Manifest(reference.to_string()), rule.into()));
    }

    pub fn clear_faults(&self) {
        self.shared.lock().rules.clear();
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// The requests of one kind for one blob digest or manifest reference.
    pub fn requests_for(&self, kind: Kind, reference: &str) -> Vec<Seen> {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.kind == kind && s.reference == reference)
            .cloned()
            .collect()
    }

    pub fn count(&self, method: Method, kind: Kind, reference: &str) -> usize {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.method == method && s.kind == kind && s.reference == reference)
            .count()
    }

    /// The GET requests of this blob so far (with or without `Range`), oldest first.
    pub fn blob_get_requests(&self, digest: &str) -> Vec<Seen> {
        self.requests_for(Kind::Blob, digest)
            .into_iter()
            .filter(|s| s.method == Method::GET)
            .collect()
    }

    /// GETs of this blob so far (with or without `Range`).
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count(Method::GET, Kind::Blob, digest)
    }

    /// Manifest requests of any method and reference so far.
    pub fn manifest_requests(&self) -> usize {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.kind == Kind::Manifest)
            .count()
    }
}

// === The server ===

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "fake registry: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let flushes = Arc::new(Flushes::default());
            let service = service_fn({
                let (shared, flushes) = (shared.clone(), flushes.clone());
                move |req| handle(shared.clone(), flushes.clone(), req)
            });
            let stream = FlushCountingStream {
                inner: stream,
                flushes,
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shared.stop.cancelled() => {}
            }
        });
    }
}

enum Route {
    Ping,
    Blob { repo: String, digest: String },
    Manifest { repo: String, reference: String },
    Tags { repo: String },
    Other,
}

impl Route {
    fn parse(path: &str) -> Route {
        if path == "/v2/" || path == "/v2" {
            return Route::Ping;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Other;
        };
        if let Some(repo) = rest.strip_suffix("/tags/list") {
            return Route::Tags {
                repo: repo.to_string(),
            };
        }
        if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
            return Route::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            };
        }
        if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
            return Route::Manifest {
                repo: repo.to_string(),
                reference: reference.to_string(),
            };
        }
        Route::Other
    }

    fn describe(&self) -> (Kind, String, String) {
        match self {
            Route::Ping => (Kind::Ping, String::new(), String::new()),
            Route::Blob { repo, digest } => (Kind::Blob, repo.clone(), digest.clone()),
            Route::Manifest { repo, reference } => {
                (Kind::Manifest, repo.clone(), reference.clone())
            }
            Route::Tags { repo } => (Kind::Tags, repo.clone(), String::new()),
            Route::Other => (Kind::Other, String::new(), String::new()),
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    flushes: Arc<Flushes>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let route = Route::parse(req.uri().path());
    let (kind, repo, reference) = route.describe();
    let method = req.method().clone();
    shared.lock().seen.push(Seen {
        method: method.clone(),
        kind,
        repo,
        reference,
        query: req.uri().query().map(str::to_string),
        headers: req.headers().clone(),
    });

    if method != Method::GET && method != Method::HEAD {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the fake registry is read-only",
        ));
    }
    let response = match route {
        Route::Ping => Response::builder()
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .body(full(Bytes::from_static(b"{}")))
            .unwrap(),
        Route::Blob { repo, digest } => {
            blob(&shared, &flushes, &method, req.headers(), &repo, &digest)
        }
        Route::Manifest { repo, reference } => {
            manifest(&shared, &flushes, &method, &repo, &reference)
        }
        Route::Tags { repo } => tags(&shared, &repo, req.uri().query()),
        Route::Other => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route"),
    };
    Ok(response)
}

fn blob(
    shared: &Arc<Shared>,
    flushes: &Arc<Flushes>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    digest: &str,
) -> Response<Body> {
    let (data, rule) = {
        let mut state = shared.lock();
        let Some(r) = state.repos.get(repo) else {
            return name_unknown();
        };
        let Some(data) = r.blobs.get(digest).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            );
        };
        (
            data,
            state.take_rule(&Target::Blob(digest.to_string()), method),
        )
    };
    if let Some(code) = rule.as_ref().and_then(Rule::status) {
        return status_fault(code, "BLOB_UNKNOWN");
    }

    let size = data.len() as u64;
    let (status, start, end) = match headers.get(header::RANGE).map(|v| parse_range(v, size)) {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(None) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(empty())
                .unwrap();
        }
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", digest)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    let omit_length = rule
        .as_ref()
        .is_some_and(|r| r.has(|f| matches!(f, Fault::HeadWithoutLength)));
    if !omit_length {
        response = response.header(header::CONTENT_LENGTH, end - start);
    }
    if method == Method::HEAD {
        return response.body(empty()).unwrap();
    }
    let data = corrupt_if_asked(data, rule.as_ref());
    let body = stream_body(
        data.slice(start as usize..end as usize),
        rule,
        shared.stop.clone(),
        flushes.clone(),
    );
    response.body(body).unwrap()
}

fn manifest(
    shared: &Arc<Shared>,
    flushes: &Arc<Flushes>,
    method: &Method,
    repo: &str,
    reference: &str,
) -> Response<Body> {
    let (digest, found, rule) = {
        let mut state = shared.lock();
        let Some(r) = state.repos.get(repo) else {
            return name_unknown();
        };
        let digest = match r.tags.get(reference) {
            Some(digest) => digest.clone(),
            None => reference.to_string(),
        };
        let Some(found) = r.manifests.get(&digest).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            );
        };
        (
            digest,
            found,
            state.take_rule(&Target::Manifest(reference.to_string()), method),
        )
    };
    if let Some(code) = rule.as_ref().and_then(Rule::status) {
        return status_fault(code, "MANIFEST_UNKNOWN");
    }
    let response = Response::builder()
        .header(header::CONTENT_TYPE, found.media_type.as_str())
        .header("Docker-Content-Digest", digest)
        .header(header::CONTENT_LENGTH, found.bytes.len());
    if method == Method::HEAD {
        return response.body(empty()).unwrap();
    }
    let data = corrupt_if_asked(found.bytes, rule.as_ref());
    response
        .body(stream_body(
            data,
            rule,
            shared.stop.clone(),
            flushes.clone(),
        ))
        .unwrap()
}

fn tags(shared: &Arc<Shared>, repo: &str, query: Option<&str>) -> Response<Body> {
    let state = shared.lock();
    let Some(r) = state.repos.get(repo) else {
        return name_unknown();
    };
    let mut n = None;
    let mut last = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => n = v.parse::<usize>().ok(),
            Some(("last", v)) => last = Some(v.to_string()),
            _ => {}
        }
    }
    let after: Vec<&String> = r
        .tags
        .keys()
        .filter(|t| last.as_ref().is_none_or(|l| *t > l))
        .collect();
    let page: Vec<&String> = after
        .iter()
        .copied()
        .take(n.unwrap_or(usize::MAX))
        .collect();
    let body = serde_json::json!({ "name": repo, "tags": page });
    let mut response = Response::builder().header(header::CONTENT_TYPE, "application/json");
    if page.len() < after.len() {
        let next = format!(
            "</v2/{repo}/tags/list?n={}&last={}>; rel=\"next\"",
            page.len(),
            page.last().expect("a truncated page is not empty")
        );
        response = response.header(header::LINK, next);
    }
    response.body(full(Bytes::from(body.to_string()))).unwrap()
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` → the half-open range `[start, end)`; `None` if it
/// cannot be satisfied (or is not understood).
fn parse_range(value: &HeaderValue, size: u64) -> Option<(u64, u64)> {
    let spec = value.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size
        } else {
            (b.parse::<u64>().ok()? + 1).min(size)
        };
        (start, end)
    };
    (start < end).then_some((start, end))
}

fn corrupt_if_asked(data: Bytes, rule: Option<&Rule>) -> Bytes {
    if rule.is_some_and(|r| r.has(|f| matches!(f, Fault::WrongBytes))) {
        Bytes::from(data.iter().map(|b| !b).collect::<Vec<u8>>())
    } else {
        data
    }
}

// === Response bodies ===

/// How a body is sent: pacing, a gate, and how it ends.
struct Plan {
    chunk: usize,
    delay: Option<Duration>,
    gate: Option<(u64, Gate)>,
    end: End,
}

enum End {
    Complete,
    Cut(u64),
    Stall(u64),
}

impl Plan {
    fn from_rule(rule: Option<Rule>) -> Plan {
        let mut plan = Plan {
            chunk: CHUNK,
            delay: None,
            gate: None,
            end: End::Complete,
        };
        for fault in rule.map(|r| r.faults).unwrap_or_default() {
            match fault {
                Fault::CutAfter(n) => plan.end = End::Cut(n),
                Fault::StallAfter(n) => plan.end = End::Stall(n),
                Fault::GateAt(n, gate) => plan.gate = Some((n, gate)),
                Fault::Slow { bytes_per_sec } => {
                    let per_tick = (bytes_per_sec / 20).clamp(1, CHUNK as u64);
                    plan.chunk = per_tick as usize;
                    plan.delay = Some(Duration::from_secs_f64(
                        per_tick as f64 / bytes_per_sec.max(1) as f64,
                    ));
                }
                Fault::Status(_) | Fault::WrongBytes | Fault::HeadWithoutLength => {}
            }
        }
        plan
    }
}

/// What the pump hands the body.
enum Piece {
    Data(Bytes),
    /// End the body with this error at once.
    Fail(io::Error),
    /// End the body with an error once every byte before this point is on the socket.
    Cut,
}

/// A body fed by a task that follows the plan. The task stops as soon as the client goes away
/// (hyper drops the body, closing the channel) or the registry is dropped.
fn stream_body(
    data: Bytes,
    rule: Option<Rule>,
    stop: CancellationToken,
    flushes: Arc<Flushes>,
) -> Body {
    let (tx, rx) = mpsc::channel::<Piece>(2);
    tokio::spawn(pump(data, Plan::from_rule(rule), tx, stop));
    PumpedBody {
        rx,
        flushes,
        cut_after_flush: None,
    }
    .boxed()
}

/// The body of a response, as the pump sends it.
///
/// A cut needs care: an error from a body makes hyper drop the connection at once, with
/// whatever it still holds in its write buffer (up to several frames). So at [`Piece::Cut`]
/// the body notes the connection's flush count and answers `Pending` until the count moves.
/// hyper buffers each frame before it asks for the next, so its buffer then holds every byte
/// this body returned; it flushes that buffer, and calls the socket's flush only once the
/// buffer is empty. Only then does the body return its error.
struct PumpedBody {
    rx: mpsc::Receiver<Piece>,
    flushes: Arc<Flushes>,
    /// Set at [`Piece::Cut`]: the flush count then.
    cut_after_flush: Option<u64>,
}

impl hyper::body::Body for PumpedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if let Some(seen) = self.cut_after_flush {
                if self.flushes.flushed_since(seen, cx.waker()) {
                    return Poll::Ready(Some(Err(io::Error::other(
                        "fake registry: cut the body short",
                    ))));
                }
                return Poll::Pending;
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Piece::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Some(Piece::Fail(e)) => return Poll::Ready(Some(Err(e))),
                Some(Piece::Cut) => self.cut_after_flush = Some(self.flushes.count()),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// How often a connection's socket has been flushed, and who waits for the next flush.
#[derive(Default)]
struct Flushes {
    count: AtomicU64,
    waiter: Mutex<Option<Waker>>,
}

impl Flushes {
    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// True if the socket was flushed since the count was `seen`; otherwise `waker` is woken
    /// at the next flush.
    fn flushed_since(&self, seen: u64, waker: &Waker) -> bool {
        if self.count() != seen {
            return true;
        }
        *self.waiter.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
        // A flush between the check and the registration found no waiter to wake.
        self.count() != seen
    }

    fn flushed(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        let waiter = self.waiter.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waiter {
            waker.wake();
        }
    }
}

/// A connection's socket, counting its completed flushes (see [`PumpedBody`]).
struct FlushCountingStream {
    inner: TcpStream,
    flushes: Arc<Flushes>,
}

impl AsyncRead for FlushCountingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FlushCountingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.flushes.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn pump(data: Bytes, plan: Plan, tx: mpsc::Sender<Piece>, stop: CancellationToken) {
    let len = data.len() as u64;
    let limit = match plan.end {
        End::Complete => len,
        End::Cut(n) | End::Stall(n) => n.min(len),
    };
    let mut pos = 0u64;
    let mut gate_passed = false;
    while pos < limit {
        if let Some((at, gate)) = &plan.gate
            && !gate_passed
            && pos >= *at
        {
            tokio::select! {
                _ = gate.pass() => {}
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
            }
            gate_passed = true;
        }
        let mut end = (pos + plan.chunk as u64).min(limit);
        if let Some((at, _)) = &plan.gate
            && !gate_passed
            && *at > pos
            && *at < end
        {
            end = *at;
        }
        if let Some(delay) = plan.delay {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
            }
        }
        let piece = Piece::Data(data.slice(pos as usize..end as usize));
        if tx.send(piece).await.is_err() {
            return;
        }
        pos = end;
    }
    match plan.end {
        End::Complete => {}
        End::Cut(_) => {
            let _ = tx.send(Piece::Cut).await;
        }
        End::Stall(_) => {
            tokio::select! {
                _ = tx.closed() => {}
                _ = stop.cancelled() => {
                    let _ = tx.send(Piece::Fail(io::Error::other("fake registry: stopped"))).await;
                }
            }
        }
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body =
        serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body.to_string())))
        .unwrap()
}

/// The answer for a repository the registry does not hold.
fn name_unknown() -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        "repository name not known to registry",
    )
}

fn status_fault(code: u16, not_found_code: &str) -> Response<Body> {
    let status = StatusCode::from_u16(code).expect("a valid status code in a Fault::Status");
    let oci_code = match code {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => not_found_code,
        429 => "TOOMANYREQUESTS",
        _ => "UNKNOWN",
    };
    let mut response = error(status, oci_code, "injected fault");
    if code == 429 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
