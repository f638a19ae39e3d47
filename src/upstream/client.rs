//! One configured upstream, [`Upstream`]: its transport, auth, circuit breaker and counters,
//! and [`Upstream::send`], through which every registry call goes.
//!
//! The registry calls themselves (`get_blob`, `blob_size`, `head_manifest`, `get_manifest`,
//! `get_tags`) are in `registry_api`; the HTTP client and timeouts in `transport`; the token
//! flow and the realm allow-list in `auth`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::auth::{Authenticator, Credentials, RealmPolicy};
use super::breaker::Breaker;
use super::transport::{MakeRequest, Transport, base_url, http_client};
use crate::clock::Clock;
use crate::config::UpstreamConfig;
use crate::error::Result;
use crate::oci::RepoName;

pub struct Upstream {
    /// The name from the config, for logs and error messages.
    name: String,
    pub(super) transport: Transport,
    auth: Authenticator,
    breaker: Breaker,
    /// What the breaker's cool-down is measured on.
    clock: Clock,
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

impl Upstream {
    /// Builds an upstream from its config. Reads `password_file`, `token_file` and `ca_file`
    /// now, so a missing file is a start-up error naming the key, not a failure at first pull.
    /// Its breaker and token lifetimes run on the system clock.
    pub fn new(name: &str, config: &UpstreamConfig) -> anyhow::Result<Upstream> {
        Upstream::with_clock(name, config, Clock::system())
    }

    /// [`Upstream::new`], with the breaker's cool-downs and the tokens' lifetimes measured on
    /// `clock` (the server's: a manual one in tests).
    pub fn with_clock(
        name: &str,
        config: &UpstreamConfig,
        clock: Clock,
    ) -> anyhow::Result<Upstream> {
        Upstream::configured(name, &format!("upstreams.{name}"), config, clock)
    }

    /// [`Upstream::with_clock`], for the config table at `key` (`upstreams.<name>`, or
    /// `upstream` for the one-upstream shorthand), which start-up errors name.
    pub fn configured(
        name: &str,
        key: &str,
        config: &UpstreamConfig,
        clock: Clock,
    ) -> anyhow::Result<Upstream> {
        let http = http_client(key, config)?;
        Upstream::with_http(name, key, config, clock, http)
    }

    /// [`Upstream::configured`], sending through `http`, which [`http_client`] built for
    /// settings equal to `config`'s connect timeout and CA file (a clone shares its pool).
    pub(super) fn with_http(
        name: &str,
        key: &str,
        config: &UpstreamConfig,
        clock: Clock,
        http: reqwest::Client,
    ) -> anyhow::Result<Upstream> {
        let base = base_url(key, config)?;
        let credentials = Credentials::from_config(key, config)?;
        let realms = RealmPolicy::new(&base, &config.token_realm_hosts);
        Ok(Upstream {
            name: name.to_string(),
            transport: Transport::new(name, base, config, http),
            auth: Authenticator::new(credentials, realms, clock.clone()),
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            clock,
            counters: Counters::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The longest silence allowed while reading a body.
    pub fn idle_timeout(&self) -> Duration {
        self.transport.idle_timeout()
    }

    /// May a request go to this upstream now (circuit breaker)?
    pub fn admit(&self) -> bool {
        let admitted = self.breaker.admit(self.clock.monotonic_now());
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
            circuit_open: self.breaker.is_open(self.clock.monotonic_now()),
        }
    }

    /// Records that an exchange with this upstream failed (connection error, timeout, 5xx,
    /// a body that broke off), for the circuit breaker.
    pub fn record_failure(&self, why: &dyn std::fmt::Display) {
        self.counters.failures.fetch_add(1, Relaxed);
        if self.breaker.record_failure(self.clock.monotonic_now()) {
            tracing::warn!(upstream = %self.name, error = %why, "circuit open: skipping this upstream for a while");
        }
    }

    /// Records that this upstream answered. A 404 or a 429 is an answer from a live upstream.
    pub fn record_success(&self) {
        self.breaker.record_success();
    }

    /// Sends a request for repository `repo` (as the upstream names it), authenticating when
    /// the upstream asks. `make` builds the request afresh for a retry. Holds one of this
    /// upstream's request slots, returned with the response.
    pub(super) async fn send(
        &self,
        repo: &RepoName,
        make: &MakeRequest<'_>,
        what: &str,
    ) -> Result<(reqwest::Response, OwnedSemaphorePermit)> {
        let permit = self.transport.request_slot(what).await?;
        self.counters.requests.fetch_add(1, Relaxed);
        let result = self.auth.send(&self.transport, repo, make, what).await;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::Url;

    #[test]
    fn realm_allow_list() {
        let mut c = UpstreamConfig::new("https://registry-1.docker.io");
        c.token_realm_hosts = vec!["login.example.com".into()];
        let u = Upstream::new("hub", &c).unwrap();
        let ok = |s: &str| u.auth.realm_allowed(&Url::parse(s).unwrap());
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
        let allowed = |u: &Upstream, s: &str| u.auth.realm_allowed(&Url::parse(s).unwrap());
        let ghcr = Upstream::new("ghcr", &UpstreamConfig::new("https://ghcr.io")).unwrap();
        assert!(allowed(&ghcr, "https://ghcr.io/token"));
        assert!(!allowed(&ghcr, "https://other.io/token"));
        let uk = Upstream::new("uk", &UpstreamConfig::new("https://foo.co.uk")).unwrap();
        assert!(!allowed(&uk, "https://evil.co.uk/token"));
        let pages = Upstream::new("p", &UpstreamConfig::new("https://me.github.io")).unwrap();
        assert!(!allowed(&pages, "https://you.github.io/token"));
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
