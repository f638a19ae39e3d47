//! The config file's keys: their types, what each means, and its default.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// The embedded default configuration, also shipped as the documented `config.example.toml`
/// (a test checks that the example parses to exactly these defaults).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5000);
/// Relative to the working directory the server was started in.
pub const DEFAULT_DATA_DIR: &str = "cistern-data";
pub const DEFAULT_UPSTREAM: &str = "https://registry-1.docker.io";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the registry API listens on.
    pub listen: SocketAddr,
    /// Root of the on-disk cache: `blobs/`, `manifests/` and `tmp/` live below it.
    pub data_dir: PathBuf,
    /// How long a shutdown waits for open responses and running cache fills before it
    /// cancels them.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Shorthand for mirroring one registry: this upstream serves it, and it is the default
    /// route. Used only when `routes` is empty.
    pub upstream: UpstreamConfig,
    /// Named upstreams, referred to by `routes`.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Registry name → ordered upstreams. When empty, `upstream` is the one route.
    pub routes: Vec<RouteConfig>,
    /// A request for a registry no route names: `false` answers 404 (containerd then tries its
    /// next host); `true` proxies it to `https://<registry>` with default settings, keeping
    /// the routes of the most recently used `upstream::on_demand::MAX_ON_DEMAND_ROUTES`.
    pub proxy_any_registry: bool,
    /// Never contact an upstream: serve only what is cached (tags as last seen, any age).
    /// For air-gapped sites running a cache filled ahead of time.
    pub offline: bool,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
    /// Who may pull what. Without it every client may pull everything, which a config whose
    /// upstreams hold credentials is refused for (they may reach private repositories).
    pub access: Option<AccessConfig>,
}

/// Client access control: anonymous clients and the users in `htpasswd_file` may pull what
/// their patterns name.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Users and their bcrypt password hashes, as `htpasswd -B` writes them.
    pub htpasswd_file: Option<PathBuf>,
    /// Patterns (`<registry>/<repository>` with `*` and `?` globs, or `*`) clients without
    /// credentials may pull. A route whose upstreams hold credentials is opened only by a
    /// pattern that names its registry literally (`docker.io/*`, never `*`).
    pub anonymous: Vec<String>,
    /// User → the patterns that user may pull (`*`: everything).
    pub users: BTreeMap<String, Vec<String>>,
}

/// HTTPS on the registry listener: off unless both files are given.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM: the server's certificate, then any intermediates.
    pub cert_file: Option<PathBuf>,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

/// The admin API: off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the admin API listens. Keep it on loopback; any other address needs a token.
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token admin requests must carry.
    pub token_file: Option<PathBuf>,
}

/// One registry served through an ordered list of upstreams.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The registry as clients name it: `docker.io`, `ghcr.io`, `registry.example.com:5000`.
    pub registry: String,
    /// Names from `[upstreams]`, tried in this order (mirrors first, the origin last).
    pub upstreams: Vec<String>,
    /// The upstreams trusted to resolve tags (mirrors are often stale for tags). Content
    /// fetched by digest is verified, so any upstream may serve it. Default: all of them.
    #[serde(default)]
    pub tags_from: Option<Vec<String>>,
    /// The route for requests that name no registry (Docker `registry-mirrors`, podman
    /// mirrors). At most one route may be the default.
    #[serde(default)]
    pub default: bool,
    /// Freshness overrides for this registry; each defaults to the `[cache]` setting.
    #[serde(default, with = "humantime_serde::option")]
    pub tag_ttl: Option<Duration>,
    #[serde(default)]
    pub tag_rules: Option<Vec<TagRule>>,
    #[serde(default, with = "humantime_serde::option")]
    pub stale_while_revalidate: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub stale_if_error: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub negative_ttl: Option<Duration>,
    /// How a `Range` request for a blob not cached yet is answered on this registry; defaults
    /// to `cache.cold_ranges`.
    #[serde(default)]
    pub cold_ranges: Option<ColdRanges>,
}

/// `Debug` is written by hand below, so that no log line or dump shows the password.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the upstream registry, without the `/v2/` suffix. `http://` is allowed so
    /// local registries work.
    pub url: String,
    /// Limit for establishing the TCP (and TLS) connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit from sending a request to receiving the response status and headers.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Limit on silence while reading a response body. There is deliberately no total
    /// timeout: a multi-GiB layer can legitimately take a long time.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most requests in flight to this upstream at once (a blob download counts until its
    /// body is read). Protects a small mirror, and our sockets, from a pull storm.
    pub max_concurrent_requests: usize,
    /// Consecutive failures (connection errors, timeouts, 5xx) that open the circuit breaker,
    /// after which this upstream is skipped until `breaker_cooldown` has passed.
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Credentials for this upstream (and its token service). `password_file` keeps the
    /// secret out of the config file; give one of `password` and `password_file`.
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// A file holding a bearer token sent as is, for registries that issue long-lived tokens.
    pub token_file: Option<PathBuf>,
    /// PEM file with extra CA certificates to trust (a private registry's own CA).
    pub ca_file: Option<PathBuf>,
    /// Hosts, besides this upstream's host and the hosts of its parent domain, that may
    /// receive its credentials as a token realm.
    pub token_realm_hosts: Vec<String>,
}

/// The default `cache.max_metadata_size`, 256 MiB. Real metadata is small: an image manifest
/// takes 1 to 3 KiB, an index a few KiB, a tag record or a link under 1 KiB, so 256 MiB holds
/// about 100,000 image manifests with their tags, the scale cistern is built for, more than a
/// mirror's working set. It is not larger because memory follows it: the reference index and
/// this budget's own index hold every counted manifest, tag and link, at about as many bytes
/// as their files for manifests and up to three times as many for links (the smallest
/// files), so a client pulling every tag and repository an upstream holds can cost at most
/// this much disk and some hundreds of MiB of memory. It applies with or without `max_size`:
/// metadata is not counted in the blob budget.
pub const DEFAULT_MAX_METADATA_SIZE: ByteSize = ByteSize::mib(256);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a tag → digest answer is trusted before it is revalidated upstream (with a
    /// HEAD, which Docker Hub does not count against its pull limit).
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// Largest manifest cistern accepts from an upstream. Real manifests are a few KiB; the
    /// cap keeps a broken or hostile upstream from filling memory.
    pub max_manifest_size: ByteSize,
    /// Memory budget for manifests kept in memory in front of the disk cache.
    pub manifest_memory: ByteSize,
    /// After a tag answer's TTL, for this long more it is still served at once while a
    /// background request refreshes it (stale-while-revalidate). Zero (the default) turns it
    /// off, so that `tag_ttl` bounds how stale a tag answer can be.
    #[serde(with = "humantime_serde")]
    pub stale_while_revalidate: Duration,
    /// When every upstream fails, a tag answer this much past its TTL is still served (with a
    /// `Warning` header and a log line) instead of an error (stale-if-error). Zero turns it off.
    #[serde(with = "humantime_serde")]
    pub stale_if_error: Duration,
    /// How long "this tag or manifest does not exist" is remembered, so a storm of pulls of
    /// a missing tag costs the upstreams one request. Zero turns it off.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// TTLs by tag pattern; the first matching rule wins, else `tag_ttl` applies.
    pub tag_rules: Vec<TagRule>,
    /// Disk budget for cached blobs. When they pass `high_watermark` of it, the least recently
    /// used are removed in the background until they are under `low_watermark`. Unset: no
    /// limit.
    pub max_size: Option<ByteSize>,
    /// Disk budget for metadata: stored manifests, tag records and links. Kept like the blob
    /// budget (same watermarks): past the high one, manifests no tag, link or pin reaches go
    /// first (least recently used first), then the least recently used tag records and links
    /// with the manifests only they reached. Always set, unlike `max_size`, because anonymous
    /// clients can cause metadata (every tag and repository an upstream holds); see
    /// [`DEFAULT_MAX_METADATA_SIZE`] for the default's reasoning.
    pub max_metadata_size: ByteSize,
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// What is never evicted (and kept by purges of other repositories): digests, or
    /// repositories and tags by glob (`policy::pins`): `sha256:<hex>`, `docker.io/library/*`,
    /// `docker.io/library/*:1.*`.
    pub pins: Vec<String>,
    /// Deprecated alias of `pins` for digest globs (`sha256:abc*`); both lists apply.
    pub pinned_digests: Vec<String>,
    /// Most blob downloads from the upstreams (cold fills) one client address may have
    /// running at once; a request that would start one more gets 429 with `Retry-After`.
    /// Cache hits and requests that join a running download are never capped. 0: no cap.
    pub max_fills_per_client: usize,
    /// Most blob downloads from the upstreams running at once, for all clients together;
    /// over it, 429 with `Retry-After`. 0: no cap.
    pub max_fills: usize,
    /// How a `Range` request for a blob not cached yet is answered (each route may override
    /// it): from a ranged upstream request at once, or after the whole blob is verified.
    pub cold_ranges: ColdRanges,
}

/// How a `Range` request for a blob that is not cached yet is answered.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ColdRanges {
    /// From a ranged upstream request (or from the bytes the blob's download has already
    /// written), without waiting for the whole blob: the upstream's bytes, not yet checked
    /// against the digest, as every registry serving a range sends them. Lazy-pulling
    /// snapshotters (eStargz, SOCI, Nydus) check their chunks themselves. The whole blob is
    /// still downloaded once and cached only once verified.
    #[default]
    Upstream,
    /// After the whole blob has been downloaded and verified (the last byte of the range is
    /// held back until then), as for whole-blob responses.
    Wait,
}

/// A TTL for the tags matching a glob pattern (`*` any run of characters, `?` any one).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TagRule {
    pub pattern: String,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines. `RUST_LOG` overrides `level`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `cistern=debug,info`.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            shutdown_grace: Duration::from_secs(30),
            upstream: UpstreamConfig::default(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
            proxy_any_registry: false,
            offline: false,
            cache: CacheConfig::default(),
            log: LogConfig::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            access: None,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: DEFAULT_UPSTREAM.to_string(),
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_concurrent_requests: 64,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            username: None,
            password: None,
            password_file: None,
            token_file: None,
            ca_file: None,
            token_realm_hosts: Vec::new(),
        }
    }
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &self.url)
            .field("connect_timeout", &self.connect_timeout)
            .field("header_timeout", &self.header_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("username", &self.username)
            .field(
                "password",
                &self.password.as_ref().map(|_| super::summary::SET),
            )
            .field("password_file", &self.password_file)
            .field("token_file", &self.token_file)
            .field("ca_file", &self.ca_file)
            .field("token_realm_hosts", &self.token_realm_hosts)
            .finish()
    }
}

impl UpstreamConfig {
    /// Does cistern log in to this upstream? Then it may reach an account's private
    /// repositories, which `[access]` must guard.
    pub fn has_credentials(&self) -> bool {
        self.username.is_some() || self.token_file.is_some()
    }

    /// An upstream at `url` with default settings.
    pub fn new(url: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            ..UpstreamConfig::default()
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(5 * 60),
            max_manifest_size: ByteSize::mib(4),
            manifest_memory: ByteSize::mib(64),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(7 * 24 * 60 * 60),
            negative_ttl: Duration::from_secs(30),
            tag_rules: Vec::new(),
            max_size: None,
            max_metadata_size: DEFAULT_MAX_METADATA_SIZE,
            high_watermark: 0.95,
            low_watermark: 0.85,
            pins: Vec::new(),
            pinned_digests: Vec::new(),
            max_fills_per_client: 32,
            max_fills: 256,
            cold_ranges: ColdRanges::Upstream,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn cold_ranges_parse_and_bad_values_are_named() {
        let c = Config::from_toml("[cache]\ncold_ranges = \"wait\"\n").unwrap();
        assert_eq!(c.cache.cold_ranges, ColdRanges::Wait);
        assert_eq!(Config::default().cache.cold_ranges, ColdRanges::Upstream);
        let e = Config::from_toml("[cache]\ncold_ranges = \"later\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cold_ranges") && e.contains("upstream"), "{e}");
    }

    #[test]
    fn example_file_matches_the_defaults() {
        let text = include_str!("../../config.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }
}
