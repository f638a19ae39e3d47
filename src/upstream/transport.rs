//! The HTTP side of one upstream: its reqwest client, base URL, timeouts and request slots.
//!
//! Timeouts: `connect_timeout` bounds connecting (set on the client), `header_timeout` bounds
//! the wait for the response head and for a free request slot, and `idle_timeout` bounds each
//! wait for the next body chunk (here for small bodies read whole; the blob fill enforces it
//! on blob bodies through `Upstream::idle_timeout`). There is no total timeout: a multi-GiB
//! layer may take long, as long as it keeps moving.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::Url;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;
use crate::error::{Error, ErrorKind, Result, error_chain};

const USER_AGENT: &str = concat!("cistern/", env!("CARGO_PKG_VERSION"));

/// Builds a request afresh, so that the auth flow can send it again with credentials.
pub type MakeRequest<'a> = dyn Fn() -> reqwest::RequestBuilder + Sync + 'a;

pub struct Transport {
    /// The upstream's name from the config, for error messages.
    name: String,
    http: reqwest::Client,
    /// Base URL ending in `/`, so `v2/...` joins below any path prefix it has.
    base: Url,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// `max_concurrent_requests` slots; a blob download holds its slot until its body ends.
    slots: Arc<Semaphore>,
}

/// The upstream's base URL from `<table>.url` (`table`: `upstreams.<name>`), ending in `/`.
pub fn base_url(table: &str, config: &UpstreamConfig) -> anyhow::Result<Url> {
    let mut base = Url::parse(&config.url)
        .map_err(|e| anyhow::anyhow!("{table}.url: {:?}: {e}", config.url))?;
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    // `docker.io` is the name people use; the API lives on registry-1.docker.io.
    if matches!(base.host_str(), Some("docker.io" | "index.docker.io")) {
        base.set_host(Some("registry-1.docker.io"))
            .map_err(|e| anyhow::anyhow!("{table}.url: {:?}: {e}", config.url))?;
    }
    Ok(base)
}

/// The HTTP client for an upstream configured at `table`: its connect timeout and extra CA
/// certificates. Building one loads the TLS roots, which is costly: upstreams made on demand
/// share one (`on_demand`), as they all have the default settings.
/// Reads `ca_file` now, so a missing file is a start-up error naming the key.
pub fn http_client(table: &str, config: &UpstreamConfig) -> anyhow::Result<reqwest::Client> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(config.connect_timeout)
        // Registries answer blob GETs with already-compressed layers; never ask for
        // transfer compression, which would make Content-Length meaningless.
        .no_gzip();
    if let Some(ca) = &config.ca_file {
        let field = format!("{table}.ca_file");
        let pem =
            std::fs::read(ca).map_err(|e| anyhow::anyhow!("{field}: {}: {e}", ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("{field}: {}: not PEM certificates: {e}", ca.display()))?;
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("{table}: building the HTTP client: {e}"))
}

impl Transport {
    /// The transport of upstream `name` at `base` (see [`base_url`]), sending through `http`
    /// (see [`http_client`]; a clone shares its connection pool).
    pub fn new(name: &str, base: Url, config: &UpstreamConfig, http: reqwest::Client) -> Transport {
        Transport {
            name: name.to_string(),
            http,
            base,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            // `validate` keeps the setting far below the limit, and so does this for a
            // config that was never validated: `Semaphore::new` panics above it.
            slots: Arc::new(Semaphore::new(
                config.max_concurrent_requests.min(Semaphore::MAX_PERMITS),
            )),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// `tail` (`v2/...`, built from names and references the grammars checked) below the
    /// base URL.
    pub fn url(&self, tail: &str) -> Result<Url> {
        self.base.join(tail).map_err(|e| {
            Error::internal(format!(
                "upstream {}: {tail:?} below {}: {e}",
                self.name, self.base
            ))
        })
    }

    /// Waits, under `header_timeout`, for one of the upstream's request slots.
    pub async fn request_slot(&self, what: &str) -> Result<OwnedSemaphorePermit> {
        match tokio::time::timeout(self.header_timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Error::new(
                ErrorKind::UpstreamTimeout,
                format!(
                    "{what}: upstream {} has no free request slot (max_concurrent_requests) after {:?}",
                    self.name, self.header_timeout
                ),
            )),
        }
    }

    /// Sends one request under `header_timeout`; `peer` names who failed to answer.
    pub async fn timed_send(
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

    /// Reads a whole (small) body under the idle timeout. `Ok(None)` if it exceeds `max`.
    pub async fn read_body(
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
}

/// rustls needs exactly one process-wide crypto provider; with reqwest's provider-less
/// feature it is ours to install. Installing twice is harmless (the second attempt is
/// refused), so every constructor can call this.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
