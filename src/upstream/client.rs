//! One upstream registry: requests with timeouts, auth, a concurrency limit and a circuit
//! breaker, and upstream replies classified into [`Error`]s.
//!
//! Timeouts: `connect_timeout` bounds connecting, `header_timeout` bounds the wait for the
//! response head (and for a free request slot), and `idle_timeout` bounds each wait for the
//! next body chunk (enforced by the callers that read bodies, via [`Upstream::idle_timeout`]).
//! There is no total timeout: a multi-GiB layer may take long, as long as it keeps moving.
//!
//! Credentials go only to this upstream's own host, and to token realms on its allow-list
//! (its host, hosts in its parent domain, and `token_realm_hosts`). Requests are built here
//! from scratch, so a client's `Authorization` is never forwarded. Redirects (blob GETs are
//! commonly redirected to S3 or a CDN) are followed, and reqwest drops `Authorization` when a
//! redirect leaves the original host.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, StatusCode};
use reqwest::{Method, Url};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::auth::{TokenCache, TokenEndpoint, TokenResponse, parse_challenge, pull_scope};
use super::breaker::Breaker;
use crate::api::headers::{content_range_total, retry_after_secs};
use crate::config::UpstreamConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, media_types};

const USER_AGENT: &str = concat!("cistern/", env!("CARGO_PKG_VERSION"));
/// Token responses are tiny JSON documents; anything larger is not one.
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;

/// How this upstream authenticates, read once at start.
#[derive(Clone)]
enum Credentials {
    None,
    Basic {
        username: String,
        password: String,
    },
    /// A long-lived bearer token sent as is.
    Token(String),
}

pub struct Upstream {
    /// The name from the config, for logs and error messages.
    name: String,
    http: reqwest::Client,
    /// Base URL ending in `/`, so `v2/...` joins below any path prefix it has.
    base: Url,
    header_timeout: Duration,
    idle_timeout: Duration,
    credentials: Credentials,
    /// Hosts allowed to receive `credentials` as a token realm.
    realm_hosts: Vec<String>,
    tokens: TokenCache,
    /// `max_concurrent_requests` slots; a blob download holds its slot until its body ends.
    slots: Arc<Semaphore>,
    breaker: Breaker,
    counters: Counters,
}

/// What an upstream has done since start, for `/metrics`.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failures: AtomicU64,
    skipped: AtomicU64,
    blob_bytes: AtomicU64,
}

/// A snapshot of an upstream's counters and circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamStats {
    /// Requests sent (a token fetch and a retry after one are part of the same request).
    pub requests: u64,
    /// Exchanges that failed: connection errors, timeouts, 5xx, bodies that broke off or did
    /// not verify. A 404 or a 429 is an answer, not a failure.
    pub failures: u64,
    /// Requests that went to the next upstream without trying this one: its circuit was open.
    pub skipped: u64,
    /// Blob bytes received from it.
    pub blob_bytes: u64,
    pub circuit_open: bool,
}

/// A blob response, ready to stream.
pub struct BlobResponse {
    pub body: reqwest::Response,
    /// The blob's full size, if the upstream said.
    pub total: Option<u64>,
    /// Bytes at the start of `body` to drop: an upstream that ignored our `Range` sends the
    /// blob from byte 0.
    pub skip: u64,
    /// Holds this upstream's request slot until the body is done.
    pub permit: OwnedSemaphorePermit,
}

/// A manifest fetched with GET: exact bytes plus the headers that describe them.
pub struct UpstreamManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    /// The upstream's `Docker-Content-Digest`, if it sent a valid one.
    pub digest_header: Option<Digest>,
}

/// What a manifest HEAD told us.
#[derive(Clone, Debug)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub content_type: Option<String>,
    pub size: Option<u64>,
}

/// What kind of object a request was for, to pick the right "unknown" error on a 404.
#[derive(Clone, Copy, Debug)]
enum Object {
    Manifest,
    Blob,
    Tags,
}

impl Upstream {
    /// Builds an upstream from its config. Reads `password_file`, `token_file` and `ca_file`
    /// now, so a missing file is a start-up error naming the key, not a failure at first pull.
    pub fn new(name: &str, config: &UpstreamConfig) -> anyhow::Result<Upstream> {
        install_crypto_provider();
        let field = |key: &str| format!("upstreams.{name}.{key}");
        let mut base = Url::parse(&config.url)
            .map_err(|e| anyhow::anyhow!("{}: {:?}: {e}", field("url"), config.url))?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        // `docker.io` is the name people use; the API lives on registry-1.docker.io.
        if matches!(base.host_str(), Some("docker.io" | "index.docker.io")) {
            base.set_host(Some("registry-1.docker.io"))
                .expect("a known host name is valid");
        }
        let read_secret = |key: &str, path: &std::path::Path| -> anyhow::Result<String> {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {}: {e}", field(key), path.display()))?;
            let secret = text.trim().to_string();
            if secret.is_empty() {
                anyhow::bail!("{}: {} is empty", field(key), path.display());
            }
            Ok(secret)
        };
        let credentials = match (&config.username, &config.password, &config.password_file) {
            (Some(u), Some(p), _) => Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            },
            (Some(u), None, Some(f)) => Credentials::Basic {
                username: u.clone(),
                password: read_secret("password_file", f)?,
            },
            _ => match &config.token_file {
                Some(f) => Credentials::Token(read_secret("token_file", f)?),
                None => Credentials::None,
            },
        };
        let mut builder = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            // Registries answer blob GETs with already-compressed layers; never ask for
            // transfer compression, which would make Content-Length meaningless.
            .no_gzip();
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("{}: {}: {e}", field("ca_file"), ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {}: not PEM certificates: {e}",
                    field("ca_file"),
                    ca.display()
                )
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("upstreams.{name}: building the HTTP client: {e}"))?;
        let host = base.host_str().unwrap_or_default().to_ascii_lowercase();
        let mut realm_hosts = vec![host.clone()];
        if let Some(parent) = parent_domain(&host) {
            realm_hosts.push(format!(".{parent}"));
        }
        realm_hosts.extend(
            config
                .token_realm_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase()),
        );
        Ok(Upstream {
            name: name.to_string(),
            http,
            base,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            credentials,
            realm_hosts,
            tokens: TokenCache::default(),
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            counters: Counters::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The longest silence allowed while reading a body.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// May a request go to this upstream now (circuit breaker)?
    pub fn admit(&self) -> bool {
        let admitted = self.breaker.admit(Instant::now());
        if !admitted {
            self.counters.skipped.fetch_add(1, Relaxed);
        }
        admitted
    }

    /// Counts blob bytes received from this upstream.
    pub fn received_blob_bytes(&self, n: u64) {
        self.counters.blob_bytes.fetch_add(n, Relaxed);
    }

    pub fn stats(&self) -> UpstreamStats {
        let c = &self.counters;
        UpstreamStats {
            requests: c.requests.load(Relaxed),
            failures: c.failures.load(Relaxed),
            skipped: c.skipped.load(Relaxed),
            blob_bytes: c.blob_bytes.load(Relaxed),
            circuit_open: self.breaker.is_open(Instant::now()),
        }
    }

    /// Records that an exchange with this upstream failed (connection error, timeout, 5xx,
    /// a body that broke off), for the circuit breaker.
    pub fn record_failure(&self, why: &dyn std::fmt::Display) {
        self.counters.failures.fetch_add(1, Relaxed);
        if self.breaker.record_failure(Instant::now()) {
            tracing::warn!(upstream = %self.name, error = %why, "circuit open: skipping this upstream for a while");
        }
    }

    /// Records that this upstream answered. A 404 or a 429 is an answer from a live upstream.
    pub fn record_success(&self) {
        self.breaker.record_success();
    }

    fn url(&self, tail: &str) -> Url {
        self.base
            .join(tail)
            .expect("paths built from validated names and digests join")
    }

    /// Sends a request for repository `repo` (as the upstream names it), authenticating when
    /// the upstream asks. `make` builds the request afresh for a retry. Holds one of this
    /// upstream's request slots, returned with the response.
    async fn send(
        &self,
        repo: &RepoName,
        make: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
        what: &str,
    ) -> Result<(reqwest::Response, OwnedSemaphorePermit)> {
        let permit = match tokio::time::timeout(
            self.header_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        {
            Ok(Ok(p)) => p,
            _ => {
                return Err(Error::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "{what}: upstream {} has no free request slot (max_concurrent_requests) after {:?}",
                        self.name, self.header_timeout
                    ),
                ));
            }
        };
        self.counters.requests.fetch_add(1, Relaxed);
        let result = self.send_authenticated(repo, make, what).await;
        super::select::after_headers(self, result.as_ref().map(|r| r.status()), what);
        let resp = result?;
        if let Some(left) = resp
            .headers()
            .get("ratelimit-remaining")
            .and_then(|v| v.to_str().ok())
        {
            tracing::debug!(upstream = %self.name, remaining = left, "upstream rate limit");
        }
        Ok((resp, permit))
    }

    async fn send_authenticated(
        &self,
        repo: &RepoName,
        make: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
        what: &str,
    ) -> Result<reqwest::Response> {
        if let Credentials::Token(token) = &self.credentials {
            return self.send_once(make, Auth::Bearer(token), what).await;
        }
        let scope = pull_scope(repo.as_str());
        // A registry that challenged us before will again: get the token up front.
        let mut token = None;
        if let Some(endpoint) = self.tokens.endpoint() {
            token = match self.tokens.get(&endpoint, &scope, Instant::now()) {
                Some(t) => Some(t),
                None => self.fetch_token(&endpoint, &scope, what).await.ok(),
            };
        }
        let auth = token.as_deref().map_or(Auth::None, Auth::Bearer);
        let resp = self.send_once(make, auth, what).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenges: Vec<_> = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .collect();
        if let Some(challenge) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = challenge.param("realm").filter(|r| is_http_url(r)) else {
                return Err(Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "{what}: upstream {} sent a bearer challenge without a usable realm",
                        self.name
                    ),
                ));
            };
            let endpoint = TokenEndpoint {
                realm: realm.to_string(),
                service: challenge.param("service").map(str::to_string),
            };
            let scope = challenge.param("scope").map_or(scope, str::to_string);
            self.tokens.forget(&endpoint, &scope);
            self.tokens.set_endpoint(endpoint.clone());
            let token = self.fetch_token(&endpoint, &scope, what).await?;
            return self.send_once(make, Auth::Bearer(&token), what).await;
        }
        if challenges.iter().any(|c| c.scheme == "basic")
            && let Credentials::Basic { username, password } = &self.credentials
        {
            return self
                .send_once(make, Auth::Basic(username, password), what)
                .await;
        }
        Ok(resp)
    }

    async fn send_once(
        &self,
        make: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
        auth: Auth<'_>,
        what: &str,
    ) -> Result<reqwest::Response> {
        let request = match auth {
            Auth::None => make(),
            Auth::Bearer(t) => make().bearer_auth(t),
            Auth::Basic(u, p) => make().basic_auth(u, Some(p)),
        };
        self.timed_send(request, &format!("upstream {}", self.name), what)
            .await
    }

    /// Sends a request under `header_timeout`; `peer` names who failed to answer.
    async fn timed_send(
        &self,
        request: reqwest::RequestBuilder,
        peer: &str,
        what: &str,
    ) -> Result<reqwest::Response> {
        match tokio::time::timeout(self.header_timeout, request.send()).await {
            Err(_) => Err(Error::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "{what}: {peer} sent no response within {:?}",
                    self.header_timeout
                ),
            )),
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::UpstreamUnavailable,
                format!("{what}: {peer}: {}", error_chain(&e)),
            )),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// May this realm receive our credentials? Only over https when the upstream is https (a
    /// realm must not downgrade them to plain text), and only on an allowed host.
    fn realm_allowed(&self, realm: &Url) -> bool {
        if self.base.scheme() == "https" && realm.scheme() != "https" {
            return false;
        }
        let Some(host) = realm.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        self.realm_hosts
            .iter()
            .any(|allowed| match allowed.strip_prefix('.') {
                Some(domain) => host.ends_with(&format!(".{domain}")) || host == domain,
                None => host == *allowed,
            })
    }

    /// Gets a token from the realm and caches it. Credentials are sent only to an allowed
    /// realm; any other realm is asked anonymously.
    async fn fetch_token(
        &self,
        endpoint: &TokenEndpoint,
        scope: &str,
        what: &str,
    ) -> Result<String> {
        let denied = |detail: String| {
            Error::new(
                ErrorKind::UpstreamDenied,
                format!("{what}: token from {}: {detail}", endpoint.realm),
            )
        };
        let mut url = Url::parse(&endpoint.realm).map_err(|e| denied(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = &endpoint.service {
                q.append_pair("service", service);
            }
            q.append_pair("scope", scope);
        }
        let mut request = self.http.get(url.clone());
        if let Credentials::Basic { username, password } = &self.credentials {
            if self.realm_allowed(&url) {
                request = request.basic_auth(username, Some(password));
            } else {
                tracing::warn!(
                    upstream = %self.name,
                    realm = %endpoint.realm,
                    "token realm is not on this upstream's allow-list (token_realm_hosts): asking it anonymously"
                );
            }
        }
        let resp = self
            .timed_send(request, &format!("token endpoint {}", endpoint.realm), what)
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(denied(format!("answered {status}")));
        }
        let body = self
            .read_body(resp, MAX_TOKEN_RESPONSE, what)
            .await?
            .ok_or_else(|| denied("response too large".into()))?;
        let (token, lifetime) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| denied("response has no token".into()))?;
        self.tokens
            .put(endpoint, scope, token.clone(), Instant::now() + lifetime);
        Ok(token)
    }

    /// Starts a blob download at byte `from`. With `from > 0` it asks for `Range: bytes=from-`
    /// and checks the 206's `Content-Range`; an upstream that ignores the range sends the
    /// whole blob, and `skip` says how much of it to drop.
    pub async fn get_blob(
        &self,
        name: &RepoName,
        digest: &Digest,
        from: u64,
    ) -> Result<BlobResponse> {
        let what = format!("GET blob {digest} of {name}");
        let url = self.url(&format!("v2/{name}/blobs/{digest}"));
        let (resp, permit) = self
            .send(
                name,
                &|| {
                    let r = self.http.get(url.clone());
                    if from > 0 {
                        r.header("Range", format!("bytes={from}-"))
                    } else {
                        r
                    }
                },
                &what,
            )
            .await?;
        match resp.status() {
            StatusCode::OK => {
                let total = resp.content_length();
                Ok(BlobResponse {
                    body: resp,
                    total,
                    skip: from,
                    permit,
                })
            }
            StatusCode::PARTIAL_CONTENT if from > 0 => {
                let range = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let start = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(from) {
                    return Err(Error::new(
                        ErrorKind::UpstreamInvalid,
                        format!(
                            "{what}: asked upstream {} for bytes {from}- and got Content-Range {range:?}",
                            self.name
                        ),
                    ));
                }
                Ok(BlobResponse {
                    body: resp,
                    total: content_range_total(&range),
                    skip: 0,
                    permit,
                })
            }
            _ => Err(self.status_error(resp, Object::Blob, &what).await),
        }
    }

    /// The size of a blob, without downloading it: HEAD, and if the HEAD carries no length, a
    /// one-byte range GET whose `Content-Range` names the total.
    pub async fn blob_size(&self, name: &RepoName, digest: &Digest) -> Result<u64> {
        let what = format!("HEAD blob {digest} of {name}");
        let url = self.url(&format!("v2/{name}/blobs/{digest}"));
        let (resp, _permit) = self
            .send(name, &|| self.http.head(url.clone()), &what)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Blob, &what).await);
        }
        if let Some(len) = header_u64(resp.headers(), CONTENT_LENGTH) {
            return Ok(len);
        }
        drop(_permit);
        let what = format!("GET (range 0-0) blob {digest} of {name}");
        let (resp, _permit) = self
            .send(
                name,
                &|| self.http.get(url.clone()).header("Range", "bytes=0-0"),
                &what,
            )
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_total)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::UpstreamInvalid,
                        format!("{what}: 206 without a usable Content-Range"),
                    )
                }),
            StatusCode::OK => header_u64(resp.headers(), CONTENT_LENGTH).ok_or_else(|| {
                Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!("{what}: upstream gives no blob size"),
                )
            }),
            _ => Err(self.status_error(resp, Object::Blob, &what).await),
        }
    }

    /// HEAD of a manifest: learns the digest of a tag without counting as a pull on Docker
    /// Hub.
    pub async fn head_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestHead> {
        let what = format!("HEAD manifest {name}:{reference}");
        let url = self.url(&format!("v2/{name}/manifests/{reference}"));
        let (resp, _permit) = self
            .send(
                name,
                &|| with_accept(self.http.request(Method::HEAD, url.clone()), accept),
                &what,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Manifest, &what).await);
        }
        let h = resp.headers();
        Ok(ManifestHead {
            digest: digest_header(h),
            content_type: h
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            size: header_u64(h, CONTENT_LENGTH),
        })
    }

    /// GET of a manifest, read whole but never more than `max_size` bytes.
    pub async fn get_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        accept: &[String],
        max_size: u64,
    ) -> Result<UpstreamManifest> {
        let what = format!("GET manifest {name}:{reference}");
        let url = self.url(&format!("v2/{name}/manifests/{reference}"));
        let (resp, _permit) = self
            .send(
                name,
                &|| with_accept(self.http.get(url.clone()), accept),
                &what,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Manifest, &what).await);
        }
        let too_large = |n: u64| {
            Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "{what}: manifest is {n} bytes or more, over the limit of {max_size} bytes (cache.max_manifest_size)"
                ),
            )
        };
        if let Some(len) = resp.content_length()
            && len > max_size
        {
            return Err(too_large(len));
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let digest_header = digest_header(resp.headers());
        let bytes = self
            .read_body(resp, max_size, &what)
            .await?
            .ok_or_else(|| too_large(max_size + 1))?;
        Ok(UpstreamManifest {
            bytes,
            content_type,
            digest_header,
        })
    }

    /// `tags/list`, passed through: body and headers (for `Link`).
    pub async fn get_tags(&self, name: &RepoName, query: &str) -> Result<(Bytes, HeaderMap)> {
        let what = format!("GET tags of {name}");
        let mut url = self.url(&format!("v2/{name}/tags/list"));
        if !query.is_empty() {
            url.set_query(Some(query));
        }
        let (resp, _permit) = self
            .send(name, &|| self.http.get(url.clone()), &what)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Tags, &what).await);
        }
        let headers = resp.headers().clone();
        // A tag list of a busy repository can be large, but 16 MiB is far past any real one.
        let body = self
            .read_body(resp, 16 << 20, &what)
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!("{what}: tag list over 16 MiB"),
                )
            })?;
        Ok((body, headers))
    }

    /// Reads a whole (small) body under the idle timeout. `Ok(None)` if it exceeds `max`.
    async fn read_body(
        &self,
        resp: reqwest::Response,
        max: u64,
        what: &str,
    ) -> Result<Option<Bytes>> {
        let mut stream = resp.bytes_stream();
        let mut buf = BytesMut::new();
        loop {
            let next = tokio::time::timeout(self.idle_timeout, stream.next())
                .await
                .map_err(|_| {
                    Error::new(
                        ErrorKind::UpstreamTimeout,
                        format!("{what}: upstream body stalled for {:?}", self.idle_timeout),
                    )
                })?;
            match next {
                None => return Ok(Some(buf.freeze())),
                Some(Err(e)) => {
                    return Err(Error::new(
                        ErrorKind::UpstreamUnavailable,
                        format!("{what}: reading the body: {}", error_chain(&e)),
                    ));
                }
                Some(Ok(chunk)) => {
                    if buf.len() as u64 + chunk.len() as u64 > max {
                        return Ok(None);
                    }
                    buf.extend_from_slice(&chunk);
                }
            }
        }
    }

    /// Turns a non-success reply into an error a client can act on.
    async fn status_error(&self, resp: reqwest::Response, object: Object, what: &str) -> Error {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after_secs)
            .map(Duration::from_secs);
        let kind = match status {
            // The upstream's own code says whether the repository or the object is missing.
            StatusCode::NOT_FOUND => match self.oci_error_code(resp, what).await.as_deref() {
                Some("NAME_UNKNOWN") => ErrorKind::NameUnknown,
                Some("MANIFEST_UNKNOWN") => ErrorKind::ManifestUnknown,
                Some("BLOB_UNKNOWN") => ErrorKind::BlobUnknown,
                _ => match object {
                    Object::Manifest => ErrorKind::ManifestUnknown,
                    Object::Blob => ErrorKind::BlobUnknown,
                    Object::Tags => ErrorKind::NameUnknown,
                },
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorKind::UpstreamDenied,
            StatusCode::TOO_MANY_REQUESTS => ErrorKind::TooManyRequests { retry_after },
            s if s.is_server_error() => ErrorKind::UpstreamUnavailable,
            _ => ErrorKind::UpstreamInvalid,
        };
        Error::new(
            kind,
            format!("{what}: upstream {} answered {status}", self.name),
        )
    }

    /// The first OCI error code in an error body (small, and bounded here), if any.
    async fn oci_error_code(&self, resp: reqwest::Response, what: &str) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Body {
            errors: Vec<Code>,
        }
        #[derive(serde::Deserialize)]
        struct Code {
            code: String,
        }
        let body = self.read_body(resp, 64 * 1024, what).await.ok()??;
        let parsed: Body = serde_json::from_slice(&body).ok()?;
        parsed.errors.into_iter().next().map(|c| c.code)
    }
}

enum Auth<'a> {
    None,
    Bearer(&'a str),
    Basic(&'a str, &'a str),
}

/// The registrable domain of a host (`registry-1.docker.io` → `docker.io`, `foo.co.uk` →
/// `foo.co.uk`), by the public suffix list, so its token service (`auth.docker.io`) may get
/// credentials but a whole public suffix never does. IP addresses and single labels have none.
fn parent_domain(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') || !host.contains('.') {
        return None;
    }
    let domain = psl::domain_str(host)?;
    Some(domain.to_string())
}

fn with_accept(req: reqwest::RequestBuilder, accept: &[String]) -> reqwest::RequestBuilder {
    if accept.is_empty() {
        // Clients that send no Accept still expect modern manifests; this is the set Docker,
        // containerd and podman send.
        req.header(
            ACCEPT,
            [
                media_types::OCI_INDEX,
                media_types::OCI_MANIFEST,
                media_types::DOCKER_MANIFEST_LIST,
                media_types::DOCKER_MANIFEST_V2,
            ]
            .join(", "),
        )
    } else {
        req.header(ACCEPT, accept.join(", "))
    }
}

fn is_http_url(s: &str) -> bool {
    Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

fn header_u64(h: &HeaderMap, name: http::header::HeaderName) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn digest_header(h: &HeaderMap) -> Option<Digest> {
    Digest::parse(h.get("docker-content-digest")?.to_str().ok()?.trim()).ok()
}

/// reqwest's Display omits the cause ("error sending request"); the chain says what happened.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// rustls needs exactly one process-wide crypto provider; with reqwest's provider-less
/// feature it is ours to install. Installing twice is harmless (the second attempt is
/// refused), so every constructor can call this.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_domains() {
        assert_eq!(
            parent_domain("registry-1.docker.io").as_deref(),
            Some("docker.io")
        );
        assert_eq!(parent_domain("ghcr.io").as_deref(), Some("ghcr.io"));
        assert_eq!(parent_domain("foo.co.uk").as_deref(), Some("foo.co.uk"));
        assert_eq!(
            parent_domain("registry.foo.co.uk").as_deref(),
            Some("foo.co.uk")
        );
        assert_eq!(
            parent_domain("me.github.io").as_deref(),
            Some("me.github.io")
        );
        assert_eq!(parent_domain("127.0.0.1"), None);
        assert_eq!(parent_domain("localhost"), None);
    }

    #[test]
    fn realm_allow_list() {
        let mut c = UpstreamConfig::new("https://registry-1.docker.io");
        c.token_realm_hosts = vec!["login.example.com".into()];
        let u = Upstream::new("hub", &c).unwrap();
        let ok = |s: &str| u.realm_allowed(&Url::parse(s).unwrap());
        assert!(ok("https://auth.docker.io/token"));
        assert!(ok("https://registry-1.docker.io/token"));
        assert!(ok("https://login.example.com/t"));
        assert!(!ok("https://evil.example/token"));
        assert!(!ok("https://docker.io.evil.example/token"));
        assert!(!ok("https://evildocker.io/token"));
        assert!(
            !ok("http://auth.docker.io/token"),
            "no downgrade to plain http"
        );
        let ghcr = Upstream::new("ghcr", &UpstreamConfig::new("https://ghcr.io")).unwrap();
        assert!(ghcr.realm_allowed(&Url::parse("https://ghcr.io/token").unwrap()));
        assert!(!ghcr.realm_allowed(&Url::parse("https://other.io/token").unwrap()));
        let uk = Upstream::new("uk", &UpstreamConfig::new("https://foo.co.uk")).unwrap();
        assert!(!uk.realm_allowed(&Url::parse("https://evil.co.uk/token").unwrap()));
        let pages = Upstream::new("p", &UpstreamConfig::new("https://me.github.io")).unwrap();
        assert!(!pages.realm_allowed(&Url::parse("https://you.github.io/token").unwrap()));
    }

    #[test]
    fn missing_secret_files_name_the_key() {
        let mut c = UpstreamConfig::new("https://ghcr.io");
        c.username = Some("me".into());
        c.password_file = Some("/nonexistent/secret".into());
        let e = Upstream::new("ghcr", &c).err().unwrap().to_string();
        assert!(e.starts_with("upstreams.ghcr.password_file:"), "{e}");
        let mut c = UpstreamConfig::new("https://ghcr.io");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = Upstream::new("ghcr", &c).err().unwrap().to_string();
        assert!(e.starts_with("upstreams.ghcr.ca_file:"), "{e}");
    }
}
