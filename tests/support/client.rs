//! Client helpers. A [`Response`] always holds the outcome of reading the whole body, so a
//! connection aborted mid-body (the only honest way to end a short response) is visible as
//! `body: Err(..)`, never as a clean short body.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::header::HeaderMap;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{HOME, bounded, http1};

// === impl Client ===

/// A reqwest client bound to one base URL.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    pub fn new(base: impl Into<String>) -> Client {
        super::init();
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("build reqwest client");
        Client {
            http,
            base: base.into(),
        }
    }

    /// A client whose connections come from `local` (a loopback address such as
    /// 127.0.0.2), for what cistern decides by client address.
    pub fn from_address(base: impl Into<String>, local: std::net::IpAddr) -> Client {
        super::init();
        let http = reqwest::Client::builder()
            .no_proxy()
            .local_address(local)
            .build()
            .expect("build reqwest client");
        Client {
            http,
            base: base.into(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request to build on (extra headers and the like); send it with [`Client::send`].
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends and reads the whole body. Panics only if no response arrives at all.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Response {
        bounded("a response", async {
            let response = request.send().await.expect("send request");
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|e| format!("{e:?}"));
            Response {
                status,
                headers,
                body,
            }
        })
        .await
    }

    pub async fn get(&self, path: &str) -> Response {
        self.send(self.request(Method::GET, path)).await
    }

    /// GETs `path` with `Range: <range>` (`range` as sent, e.g. `bytes=0-99`).
    pub async fn get_range(&self, path: &str, range: impl AsRef<str>) -> Response {
        let request = self.request(Method::GET, path);
        self.send(request.header("range", range.as_ref())).await
    }

    pub async fn head(&self, path: &str) -> Response {
        self.send(self.request(Method::HEAD, path)).await
    }

    /// GETs a blob: `Ok` only for a 2xx whose whole body arrived. A non-2xx status, an error
    /// while sending, or a body that ended early is an `Err` describing what happened.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Result<Bytes, String> {
        let request = self.request(Method::GET, &format!("/v2/{repo}/blobs/{digest}"));
        bounded("a blob", read_reporting_progress(request, |_| {})).await
    }

    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Response {
        self.get(&format!("/v2/{repo}/manifests/{reference}")).await
    }

    /// Asserts that blob `digest` of `repo` is unknown: a 404 `BLOB_UNKNOWN`.
    pub async fn assert_blob_unknown(&self, repo: &str, digest: &str) {
        self.get(&super::blob_route(repo, digest))
            .await
            .assert_oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    }

    /// Asserts that manifest `reference` of `repo` is unknown: a 404 `MANIFEST_UNKNOWN`.
    pub async fn assert_manifest_unknown(&self, repo: &str, reference: &str) {
        self.get_manifest(repo, reference)
            .await
            .assert_oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }

    /// GETs `path`, reads at least `n` body bytes, then drops the response (closing the
    /// connection mid-body). Returns how many bytes arrived. Panics on a non-200 answer or if
    /// the body ends before `n`.
    pub async fn read_prefix_then_disconnect(&self, path: &str, n: usize) -> usize {
        bounded("a body prefix", async {
            let mut response = self
                .request(Method::GET, path)
                .send()
                .await
                .expect("send request");
            assert_eq!(response.status(), StatusCode::OK, "GET {path}");
            let mut got = 0;
            while got < n {
                match response.chunk().await {
                    Ok(Some(chunk)) => got += chunk.len(),
                    Ok(None) => panic!("body of {path} ended after {got} bytes, before {n}"),
                    Err(e) => panic!("body of {path} failed after {got} bytes: {e:?}"),
                }
            }
            got
        })
        .await
    }

    /// Starts `n` concurrent GETs of `path`; see [`Readers`].
    pub fn spawn_readers(&self, path: &str, n: usize) -> Readers {
        self.spawn_readers_with(path, n, |r| r)
    }

    /// Like [`Client::spawn_readers`], with `tweak` applied to each request (e.g. a `Range`).
    pub fn spawn_readers_with(
        &self,
        path: &str,
        n: usize,
        tweak: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Readers {
        let progress = watch::Sender::new(vec![Progress::default(); n]);
        let handles = (0..n)
            .map(|i| {
                let request = tweak(self.request(Method::GET, path));
                let progress = progress.clone();
                tokio::spawn(async move {
                    let result = read_reporting_progress(request, |received| {
                        progress.send_modify(|p| p[i].received = received)
                    })
                    .await;
                    progress.send_modify(|p| p[i].done = true);
                    result
                })
            })
            .collect();
        Readers { progress, handles }
    }
}

/// Sends `request` and reads the whole body, calling `on_progress` with the running byte count
/// after every chunk. `Ok` only for a 200 (or a 206, for a range) whose whole body arrived;
/// otherwise an `Err` saying what happened, with the body of an error status.
async fn read_reporting_progress(
    request: reqwest::RequestBuilder,
    mut on_progress: impl FnMut(usize),
) -> Result<Bytes, String> {
    let mut response = request
        .send()
        .await
        .map_err(|e| format!("send failed: {e:?}"))?;
    let status = response.status();
    if status != StatusCode::OK && status != StatusCode::PARTIAL_CONTENT {
        let text = response.text().await.unwrap_or_default();
        return Err(format!("status {status}: {text}"));
    }
    let mut body = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                on_progress(body.len());
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(format!("body failed after {} bytes: {e:?}", body.len())),
        }
    }
}

// === impl Readers ===

#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    received: usize,
    done: bool,
}

/// Concurrent GETs of one path, each reporting how far it got. A reader that has received body
/// bytes is attached to whatever produces the body; the test can then let the upstream go on.
pub struct Readers {
    progress: watch::Sender<Vec<Progress>>,
    handles: Vec<JoinHandle<Result<Bytes, String>>>,
}

impl Readers {
    /// Waits until every reader has received its first body byte (or finished).
    pub async fn started(&self) {
        self.received_at_least(1).await
    }

    /// Waits until every reader has received at least `n` body bytes (or finished).
    pub async fn received_at_least(&self, n: usize) {
        let mut rx = self.progress.subscribe();
        let what = format!("every reader to receive {n} bytes");
        bounded(
            &what,
            rx.wait_for(|p| p.iter().all(|r| r.done || r.received >= n)),
        )
        .await
        .expect("progress sender is alive");
    }

    /// Waits for every reader and asserts that each received exactly `want`.
    pub async fn all_receive(self, want: &[u8]) {
        for (i, result) in self.finish().await.into_iter().enumerate() {
            let body = result.unwrap_or_else(|e| panic!("client {i}: {e}"));
            super::assert_same_bytes(&body, want, &format!("client {i}"));
        }
    }

    /// Waits for every reader and asserts that each one's body ended in an error; `how`
    /// completes "client N got a complete body ...".
    pub async fn all_fail(self, how: &str) {
        for (i, result) in self.finish().await.into_iter().enumerate() {
            assert!(result.is_err(), "client {i} got a complete body {how}");
        }
    }

    /// Waits for every reader; results in the order they were spawned.
    pub async fn finish(self) -> Vec<Result<Bytes, String>> {
        let mut out = Vec::with_capacity(self.handles.len());
        for handle in self.handles {
            out.push(
                bounded("a reader to finish", handle)
                    .await
                    .expect("reader task panicked"),
            );
        }
        out
    }
}

// === impl Response ===

/// A response with its whole body read.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `Err` if the body could not be read to its end (e.g. the connection was aborted).
    pub body: Result<Bytes, String>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// The body; panics if it did not arrive whole.
    pub fn bytes(&self) -> &Bytes {
        match &self.body {
            Ok(bytes) => bytes,
            Err(e) => panic!("body did not arrive whole ({}): {e}", self.status),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(self.bytes())
            )
        })
    }

    /// Asserts an OCI error response: this status, a JSON body `{"errors":[{"code":..,
    /// "message":..}]}` whose first code is `code`.
    pub fn assert_oci_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "status; body: {:?}", self.body_text());
        assert_eq!(self.oci_error_code(), code, "body: {:?}", self.body_text());
    }

    /// The first error code of an OCI error body; panics if the body is not one.
    pub fn oci_error_code(&self) -> String {
        oci_error_code(self.bytes())
    }

    pub fn body_text(&self) -> String {
        match &self.body {
            Ok(b) => String::from_utf8_lossy(b).into_owned(),
            Err(e) => format!("<body error: {e}>"),
        }
    }
}

/// The first `errors[].code` of an OCI error body, checking the shape on the way.
pub fn oci_error_code(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {text:?}"));
    let first = &json["errors"][0];
    assert!(
        first["message"].is_string(),
        "OCI error without a message: {text}"
    );
    first["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an OCI error body: {text}"))
        .to_string()
}

// === Raw HTTP ===

pub use super::http1::RawResponse;

impl RawResponse {
    /// Asserts an OCI error response: `status`, and an error body whose first code is `code`.
    /// `what` names the request in the failure message.
    #[track_caller]
    pub fn assert_oci_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(
            self.status,
            status,
            "{what}: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(oci_error_code(&self.body), code, "{what}");
    }
}

/// Sends `METHOD target HTTP/1.1` exactly as given (no URL normalisation, so `..`, `%2f` and
/// even NUL reach the server), with `Connection: close`, and reads the response to EOF.
pub async fn raw_request(addr: SocketAddr, method: &str, target: &[u8]) -> RawResponse {
    bounded("a raw response", async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = http1::request(method, target, HOME, &[]);
        stream.write_all(&request).await.expect("write request");
        let mut raw = Vec::new();
        // A reset after the response is fine; what arrived before it counts.
        let _ = stream.read_to_end(&mut raw).await;
        http1::parse_lenient(&raw, method == "HEAD")
    })
    .await
}

/// A GET whose reader stops after part of the body, so the server cannot finish it: its
/// socket's receive buffer is fixed small (which turns Linux's autotuning off; autotuning may
/// otherwise grow it to `tcp_rmem`'s maximum, 32 MiB on some machines, and swallow a whole
/// test blob).
pub struct HeldResponse {
    stream: tokio::net::TcpStream,
    raw: Vec<u8>,
}

impl HeldResponse {
    /// Sends `GET path` and reads until at least `body_bytes` of the body have arrived.
    pub async fn start(addr: SocketAddr, path: &str, body_bytes: usize) -> HeldResponse {
        bounded("the start of a held response", async {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .set_recv_buffer_size(64 * 1024)
                .expect("set SO_RCVBUF");
            let mut stream = socket.connect(addr).await.expect("connect");
            let request = http1::request("GET", path.as_bytes(), HOME, &[]);
            stream.write_all(&request).await.expect("write request");
            let mut held = HeldResponse {
                stream,
                raw: Vec::new(),
            };
            let mut buf = vec![0; 64 * 1024];
            while held.body_len() < body_bytes {
                let n = held.stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "the response ended early");
                held.raw.extend_from_slice(&buf[..n]);
            }
            held
        })
        .await
    }

    fn body_len(&self) -> usize {
        http1::head_end(&self.raw).map_or(0, |split| self.raw.len() - split - 4)
    }

    /// Reads the rest of the response.
    pub async fn finish(mut self) -> RawResponse {
        bounded("the rest of a held response", async {
            let _ = self.stream.read_to_end(&mut self.raw).await;
            http1::parse_lenient(&self.raw, false)
        })
        .await
    }
}
