//! Support for the routing, fallback and upstream-credential tests (`tests/routing.rs`,
//! `tests/fallback.rs`, `tests/upstream_credentials.rs`), on top of `tests/support/`.
//!
//! - [`Setup`]: a cistern with named upstreams and routes, built like the config file reads,
//!   and [`Cistern`], the running `cistern::run` it starts.
//! - [`Silent`]: an upstream that accepts TCP connections and never answers, counting them.
//! - [`closed_port_url`]: an upstream nobody listens on.
//! - [`CutMirror`]: an upstream whose blob body breaks off after exactly N bytes (a clean
//!   close), so the offset a resume asks for is exact.
//! - [`Scripted`]: a tiny HTTP server whose every answer comes from a closure, for what
//!   `FakeRegistry` does not do (ignoring `Range`, a 206 for the wrong range, redirects, Basic
//!   and Bearer auth, extra headers). It logs every request with its headers.
//!
//! Everything listens on loopback only; `127.0.0.2` stands for a foreign host (all of 127/8 is
//! loopback on Linux).

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cistern::Config;
use cistern::config::{RouteConfig, UpstreamConfig};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::{self, DataDir, TestCistern};

/// A running cistern, as [`Setup::start`] starts it.
pub type Cistern = TestCistern;

/// The host every upstream of ours lives on.
pub const HOME: &str = "127.0.0.1";
/// Another host on the loopback interface: a token realm or a blob store that is not the
/// upstream's own host.
pub const FOREIGN: &str = "127.0.0.2";

pub const SECOND: Duration = Duration::from_secs(1);

// === Config ===

/// An upstream at `url` with default settings; change some with struct-update syntax:
/// `UpstreamConfig { header_timeout: SECOND, ..at(&url) }`.
pub fn at(url: &str) -> UpstreamConfig {
    UpstreamConfig::new(url)
}

/// A route for `registry` over `upstreams`, in order; tags from all of them. Built through
/// serde, as from a config file, so every other key has its default.
pub fn route(registry: &str, upstreams: &[&str]) -> RouteConfig {
    let mut table = toml::Table::new();
    table.insert("registry".into(), registry.into());
    let upstreams = upstreams.iter().map(|&u| u.into()).collect();
    table.insert("upstreams".into(), toml::Value::Array(upstreams));
    toml::Value::Table(table)
        .try_into()
        .expect("a route with only registry and upstreams is valid")
}

/// Like [`route`], and the route for requests that name no registry.
pub fn default_route(registry: &str, upstreams: &[&str]) -> RouteConfig {
    RouteConfig {
        default: true,
        ..route(registry, upstreams)
    }
}

pub fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// Upstreams and routes for a cistern under test.
#[derive(Default)]
pub struct Setup {
    upstreams: BTreeMap<String, UpstreamConfig>,
    routes: Vec<RouteConfig>,
}

impl Setup {
    pub fn new() -> Setup {
        Setup::default()
    }

    pub fn upstream(mut self, name: &str, config: UpstreamConfig) -> Setup {
        self.upstreams.insert(name.to_string(), config);
        self
    }

    pub fn route(mut self, route: RouteConfig) -> Setup {
        self.routes.push(route);
        self
    }

    /// Starts cistern on `127.0.0.1:0` over a fresh data directory.
    pub async fn start(self) -> Cistern {
        let data = DataDir::new();
        let config = Config {
            upstreams: self.upstreams,
            routes: self.routes,
            ..TestCistern::config_for(&data)
        };
        config
            .validate()
            .unwrap_or_else(|e| panic!("test config is invalid: {e}"));
        TestCistern::start_config(data, config).await
    }
}

// === Upstreams that do not answer ===

/// An upstream that accepts TCP connections and never sends a byte. Connections stay open
/// until it is dropped.
pub struct Silent {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Silent {
    pub async fn start() -> Silent {
        let listener = TcpListener::bind((HOME, 0)).await.expect("bind silent");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (count, token) = (accepted.clone(), stop.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            count.fetch_add(1, Ordering::SeqCst);
                            held.push(stream);
                        }
                    }
                }
            }
        });
        Silent {
            addr,
            accepted,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The URL of a loopback port nobody listens on (bound, then closed).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind((HOME, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

// === impl CutMirror ===

/// An upstream that answers every GET with `200`, the blob's full `Content-Length`, exactly
/// `cut_at` body bytes, and then a clean close (FIN), where `Fault::CutAfter` has hyper abort
/// the connection. Every one of the `cut_at` bytes reaches the client: where the body breaks
/// off is exact.
///
/// With `hold_at`, it sends that many bytes first and the rest (up to `cut_at`) only after
/// [`CutMirror::release`].
pub struct CutMirror {
    addr: SocketAddr,
    /// The head of every request, as text.
    heads: Arc<Mutex<Vec<String>>>,
    released: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Drop for CutMirror {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl CutMirror {
    pub async fn start(blob: Bytes, cut_at: usize, hold_at: Option<usize>) -> CutMirror {
        let listener = TcpListener::bind((HOME, 0)).await.expect("bind cut mirror");
        let addr = listener.local_addr().expect("local addr");
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let released = watch::Sender::new(false);
        let stop = CancellationToken::new();
        let (log, gate, token) = (heads.clone(), released.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let mut stream = tokio::select! {
                    _ = token.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (blob, log, mut released, token) =
                    (blob.clone(), log.clone(), gate.subscribe(), token.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = async {
                            let Some(head) = read_head(&mut stream).await else { return };
                            log.lock().unwrap().push(head);
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                                 content-length: {}\r\ndocker-content-digest: {}\r\n\
                                 connection: close\r\n\r\n",
                                blob.len(),
                                support::sha256_digest(&blob)
                            );
                            let first = hold_at.unwrap_or(cut_at).min(cut_at);
                            if stream.write_all(reply.as_bytes()).await.is_err()
                                || stream.write_all(&blob[..first]).await.is_err()
                            {
                                return;
                            }
                            if hold_at.is_some() && released.wait_for(|r| *r).await.is_err() {
                                return;
                            }
                            if stream.write_all(&blob[first..cut_at]).await.is_err() {
                                return;
                            }
                            // FIN after the last byte, then wait for the client to hang up, so
                            // no unread data turns the close into a reset.
                            let _ = stream.shutdown().await;
                            let mut sink = [0u8; 1024];
                            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        } => {}
                    }
                });
            }
        });
        CutMirror {
            addr,
            heads,
            released,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets held bodies go on to the cut.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// The head (request line and headers) of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Reads an HTTP/1.1 request head (up to the blank line); `None` if the client went away.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

// === impl Scripted ===

/// One request a [`Scripted`] server received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn authorization(&self) -> Option<String> {
        self.header("authorization")
    }

    /// The last path segment: the digest of a blob request.
    pub fn last_segment(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

pub type Reply = Response<Full<Bytes>>;
type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// An HTTP server whose answers come from a closure. Bind first, then [`Scripted::serve`], so
/// the closure can know the server's own URL (for a token realm on the same host).
pub struct Scripted {
    addr: SocketAddr,
    listener: Mutex<Option<TcpListener>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Scripted {
    /// Listens on `ip`, port 0. Connections wait in the backlog until `serve`.
    pub async fn bind(ip: &str) -> Scripted {
        support::init();
        let listener = TcpListener::bind((ip, 0)).await.expect("bind scripted");
        Scripted {
            addr: listener.local_addr().expect("local addr"),
            listener: Mutex::new(Some(listener)),
            seen: Arc::default(),
            stop: CancellationToken::new(),
        }
    }

    /// Binds and serves at once.
    pub async fn start(
        ip: &str,
        handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Scripted {
        let server = Scripted::bind(ip).await;
        server.serve(handler);
        server
    }

    /// Starts answering every request with `handler`.
    pub fn serve(&self, handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) {
        let listener = self
            .listener
            .lock()
            .unwrap()
            .take()
            .expect("serve is called once");
        let handler: Handler = Arc::new(handler);
        let (seen, stop) = (self.seen.clone(), self.stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (handler, seen, stop) = (handler.clone(), seen.clone(), stop.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let request = Seen {
                            method: req.method().clone(),
                            path: req.uri().path().to_string(),
                            query: req.uri().query().map(str::to_string),
                            headers: req.headers().clone(),
                        };
                        seen.lock().unwrap().push(request.clone());
                        let reply = handler(&request);
                        async move { Ok::<_, Infallible>(reply) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests whose path is `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

// === Replies ===

/// 200 with a blob (or manifest) body: `Content-Length` and `Docker-Content-Digest` set.
pub fn blob_reply(data: &Bytes) -> Reply {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, data.len())
        .header("docker-content-digest", support::sha256_digest(data))
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

/// A token endpoint's answer.
pub fn token_reply(token: &str) -> Reply {
    Response::new(Full::new(Bytes::from(format!(
        r#"{{"token":"{token}","expires_in":300}}"#
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
    support::init(); // reqwest needs the crypto provider even for a client it never uses
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

// === Content ===

/// A small OCI image manifest, different for every `seed`.
pub fn image_manifest(seed: u32) -> Bytes {
    let config = support::sha256_digest(format!("config {seed}").as_bytes());
    let layer = support::sha256_digest(format!("layer {seed}").as_bytes());
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{seed}}}]}}"#,
        support::OCI_MANIFEST
    ))
}

/// 200 with a manifest: its media type, length and digest (hyper drops the body for a HEAD).
pub fn manifest_reply(bytes: &Bytes) -> Reply {
    let mut reply = blob_reply(bytes);
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        support::OCI_MANIFEST.parse().expect("a header value"),
    );
    reply
}
