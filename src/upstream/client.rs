//! One upstream registry: requests with timeouts, and upstream replies classified into
//! [`Error`]s.
//!
//! Timeouts: `connect_timeout` bounds connecting, `header_timeout` bounds the wait for the
//! response head, and `idle_timeout` bounds each wait for the next body chunk (enforced by the
//! callers that read bodies, via [`Upstream::idle_timeout`]). There is no total timeout: a
//! multi-GiB layer may take long, as long as it keeps moving.
//!
//! Redirects (blob GETs are commonly redirected to S3 or a CDN) are followed; reqwest drops
//! `Authorization` when a redirect leaves the original host. The client's own `Authorization`
//! is never forwarded: requests are built here from scratch.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, StatusCode};
use reqwest::{Method, Url};

use super::auth::{TokenCache, TokenEndpoint, TokenResponse, parse_challenge, pull_scope};
use crate::api::headers::{content_range_total, retry_after_secs};
use crate::config::UpstreamConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, Reference, RepoName, media_types};

const USER_AGENT: &str = concat!("cistern/", env!("CARGO_PKG_VERSION"));
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Token responses are tiny JSON documents; anything larger is not one.
const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;

pub struct Upstream {
    http: reqwest::Client,
    /// Base URL ending in `/`, so `v2/...` joins below any path prefix it has.
    base: Url,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Docker Hub: one-component names live under `library/`.
    docker_hub: bool,
    tokens: TokenCache,
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
    pub fn new(config: &UpstreamConfig) -> Result<Upstream> {
        install_crypto_provider();
        let mut base = Url::parse(&config.url)
            .map_err(|e| Error::internal(format!("upstream.url {:?}: {e}", config.url)))?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        // `docker.io` is the name people use; the API lives on registry-1.docker.io.
        if matches!(base.host_str(), Some("docker.io" | "index.docker.io")) {
            base.set_host(Some(DOCKER_HUB_API_HOST))
                .expect("a known host name is valid");
        }
        let docker_hub = base.host_str() == Some(DOCKER_HUB_API_HOST);
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(config.connect_timeout)
            // Registries answer blob GETs with already-compressed layers; never ask for
            // transfer compression, which would make Content-Length meaningless.
            .no_gzip()
            .build()
            .map_err(|e| Error::internal(format!("building the upstream HTTP client: {e}")))?;
        Ok(Upstream {
            http,
            base,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            docker_hub,
            tokens: TokenCache::default(),
        })
    }

    /// The longest silence allowed while reading a body.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The upstream's base URL, for logs and error messages (it never holds credentials).
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    fn url(&self, tail: &str) -> Url {
        self.base
            .join(tail)
            .expect("paths built from validated names and digests join")
    }

    /// The repository name as this upstream knows it: Docker Hub keeps official images under
    /// `library/`, and clients that talk to cistern directly may leave it out.
    fn upstream_name(&self, name: &RepoName) -> String {
        if self.docker_hub && !name.as_str().contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        }
    }

    /// Sends a request for repository `repo` (as the upstream names it), authenticating with a
    /// bearer token when the upstream asks for one. `make` builds the request afresh for the
    /// retry.
    async fn send(
        &self,
        repo: &str,
        make: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
        what: &str,
    ) -> Result<reqwest::Response> {
        let scope = pull_scope(repo);
        // A registry that challenged us before will again: get the token up front.
        let mut token = None;
        if let Some(endpoint) = self.tokens.endpoint() {
            token = match self.tokens.get(&endpoint, &scope, Instant::now()) {
                Some(t) => Some(t),
                None => self.fetch_token(&endpoint, &scope, what).await.ok(),
            };
        }
        let resp = self.send_once(make, token.as_deref(), what).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get_all(WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(parse_challenge)
            .find(|c| c.scheme == "bearer")
        else {
            return Ok(resp);
        };
        let Some(realm) = challenge.param("realm").filter(|r| is_http_url(r)) else {
            return Err(Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "{what}: upstream {} sent a bearer challenge without a usable realm",
                    self.base
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
        self.send_once(make, Some(&token), what).await
    }

    async fn send_once(
        &self,
        make: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
        token: Option<&str>,
        what: &str,
    ) -> Result<reqwest::Response> {
        let mut request = make();
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        match tokio::time::timeout(self.header_timeout, request.send()).await {
            Err(_) => Err(Error::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "{what}: upstream {} sent no response within {:?}",
                    self.base, self.header_timeout
                ),
            )),
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::UpstreamUnavailable,
                format!("{what}: upstream {}: {}", self.base, error_chain(&e)),
            )),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Gets a token from the realm (anonymously) and caches it.
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
        let resp = match tokio::time::timeout(self.header_timeout, self.http.get(url).send()).await
        {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "{what}: token endpoint {} did not answer within {:?}",
                        endpoint.realm, self.header_timeout
                    ),
                ));
            }
            Ok(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::UpstreamUnavailable,
                    format!(
                        "{what}: token endpoint {}: {}",
                        endpoint.realm,
                        error_chain(&e)
                    ),
                ));
            }
            Ok(Ok(resp)) => resp,
        };
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

    /// Starts a blob download. `Ok` means a 200 with the body still to be read.
    pub async fn get_blob(&self, name: &RepoName, digest: &Digest) -> Result<reqwest::Response> {
        let what = format!("GET blob {digest} of {name}");
        let repo = self.upstream_name(name);
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"));
        let resp = self
            .send(&repo, &|| self.http.get(url.clone()), &what)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Blob, &what).await);
        }
        Ok(resp)
    }

    /// The size of a blob, without downloading it: HEAD, and if the HEAD carries no length, a
    /// one-byte range GET whose `Content-Range` names the total.
    pub async fn blob_size(&self, name: &RepoName, digest: &Digest) -> Result<u64> {
        let what = format!("HEAD blob {digest} of {name}");
        let repo = self.upstream_name(name);
        let url = self.url(&format!("v2/{repo}/blobs/{digest}"));
        let resp = self
            .send(&repo, &|| self.http.head(url.clone()), &what)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(resp, Object::Blob, &what).await);
        }
        if let Some(len) = header_u64(resp.headers(), CONTENT_LENGTH) {
            return Ok(len);
        }
        let what = format!("GET (range 0-0) blob {digest} of {name}");
        let resp = self
            .send(
                &repo,
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
        let repo = self.upstream_name(name);
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"));
        let resp = self
            .send(
                &repo,
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
        let repo = self.upstream_name(name);
        let url = self.url(&format!("v2/{repo}/manifests/{reference}"));
        let resp = self
            .send(
                &repo,
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

    /// `tags/list`, passed through: status, content type, `Link` and body.
    pub async fn get_tags(&self, name: &RepoName, query: &str) -> Result<(Bytes, HeaderMap)> {
        let what = format!("GET tags of {name}");
        let repo = self.upstream_name(name);
        let mut url = self.url(&format!("v2/{repo}/tags/list"));
        if !query.is_empty() {
            url.set_query(Some(query));
        }
        let resp = self
            .send(&repo, &|| self.http.get(url.clone()), &what)
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
            StatusCode::NOT_FOUND => match object {
                Object::Manifest => ErrorKind::ManifestUnknown,
                Object::Blob => ErrorKind::BlobUnknown,
                Object::Tags => ErrorKind::NameUnknown,
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ErrorKind::UpstreamDenied,
            StatusCode::TOO_MANY_REQUESTS => ErrorKind::TooManyRequests { retry_after },
            s if s.is_server_error() => ErrorKind::UpstreamUnavailable,
            _ => ErrorKind::UpstreamInvalid,
        };
        Error::new(
            kind,
            format!("{what}: upstream {} answered {status}", self.base),
        )
    }
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
fn error_chain(e: &dyn std::error::Error) -> String {
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
