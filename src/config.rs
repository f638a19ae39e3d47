//! Configuration: TOML text → a validated [`Config`] with defaults.
//!
//! Pure: parsing and validation do no IO beyond reading the file the caller names. Every key has
//! a default, so an empty file (or no file at all) is a working configuration: a mirror of Docker
//! Hub listening on `127.0.0.1:5000` with its cache under `./cistern-data`.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a typo must not silently fall back to a
//! default. Errors name the offending key, e.g. `cache.tag_ttl`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// The embedded default configuration, also shipped as the documented `config.example.toml`
/// (a test checks that the example parses to exactly these defaults).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
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
    /// next host); `true` proxies it to `https://<registry>` with default settings.
    pub proxy_any_registry: bool,
    /// Never contact an upstream: serve only what is cached (tags as last seen, any age).
    /// For air-gapped sites running a cache filled ahead of time.
    pub offline: bool,
    pub cache: CacheConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
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
}

impl RouteConfig {
    /// The `[cache]` settings with this route's freshness overrides applied.
    pub fn cache_settings(&self, global: &CacheConfig) -> CacheConfig {
        CacheConfig {
            tag_ttl: self.tag_ttl.unwrap_or(global.tag_ttl),
            tag_rules: self
                .tag_rules
                .clone()
                .unwrap_or_else(|| global.tag_rules.clone()),
            stale_while_revalidate: self
                .stale_while_revalidate
                .unwrap_or(global.stale_while_revalidate),
            stale_if_error: self.stale_if_error.unwrap_or(global.stale_if_error),
            negative_ttl: self.negative_ttl.unwrap_or(global.negative_ttl),
            ..global.clone()
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
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
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// What is never evicted (and kept by purges of other repositories): digests, or
    /// repositories and tags by glob (`cache::pins`): `sha256:<hex>`, `docker.io/library/*`,
    /// `docker.io/library/*:1.*`.
    pub pins: Vec<String>,
    /// Deprecated alias of `pins` for digest globs (`sha256:abc*`); both lists apply.
    pub pinned_digests: Vec<String>,
}

impl CacheConfig {
    /// `pins` and `pinned_digests`, parsed (`validate` has checked them).
    pub fn pin_patterns(&self) -> Vec<crate::cache::pins::Pin> {
        self.pins
            .iter()
            .chain(&self.pinned_digests)
            .filter_map(|p| crate::cache::pins::Pin::parse(p).ok())
            .collect()
    }
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
            listen: DEFAULT_LISTEN
                .parse()
                .expect("default listen address parses"),
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

impl UpstreamConfig {
    /// An upstream at `url` with default settings.
    pub fn new(url: impl Into<String>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            ..UpstreamConfig::default()
        }
    }
}

/// A route with its upstreams looked up: what the server builds its routing from.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRoute {
    /// Canonical registry name (see `api::registry::canonical_registry`).
    pub registry: String,
    /// (name, settings), in order.
    pub upstreams: Vec<(String, UpstreamConfig)>,
    /// Names of the upstreams that may resolve tags.
    pub tags_from: Vec<String>,
    pub default: bool,
    /// `[cache]` with this route's freshness overrides.
    pub cache: CacheConfig,
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
            high_watermark: 0.95,
            low_watermark: 0.85,
            pins: Vec::new(),
            pinned_digests: Vec::new(),
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

/// A configuration problem, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl Config {
    /// Parses TOML text and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Checks the rules that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| {
            Err(ConfigError::Invalid {
                field: field.to_string(),
                message,
            })
        };
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty".into());
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => {
                return invalid(
                    "tls.key_file",
                    "tls.cert_file is set: give its key too".into(),
                );
            }
            (None, Some(_)) => {
                return invalid(
                    "tls.cert_file",
                    "tls.key_file is set: give its certificate too".into(),
                );
            }
            _ => {}
        }
        if self.routes.is_empty() {
            if !self.upstreams.is_empty() {
                return invalid(
                    "routes",
                    "[upstreams] are defined but no [[routes]] use them".into(),
                );
            }
            validate_upstream("upstream", &self.upstream)?;
        } else {
            if self.upstream != UpstreamConfig::default() {
                return invalid(
                    "upstream",
                    "give either [upstream] (one registry) or [upstreams.NAME] with [[routes]], not both".into(),
                );
            }
            for (name, u) in &self.upstreams {
                if name.is_empty()
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return invalid(
                        &format!("upstreams.{name}"),
                        "names use letters, digits, '-', '_' and '.'".into(),
                    );
                }
                validate_upstream(&format!("upstreams.{name}"), u)?;
            }
            let mut registries = BTreeSet::new();
            let mut defaults = 0;
            for (i, r) in self.routes.iter().enumerate() {
                let field = |k: &str| format!("routes[{i}].{k}");
                let registry = crate::api::registry::canonical_registry(&r.registry);
                if registry.is_empty()
                    || registry.contains('/')
                    || registry.contains(char::is_whitespace)
                {
                    return invalid(
                        &field("registry"),
                        format!("{:?} is not a registry host name", r.registry),
                    );
                }
                if !registries.insert(registry.clone()) {
                    return invalid(
                        &field("registry"),
                        format!("{registry:?} has more than one route"),
                    );
                }
                if r.upstreams.is_empty() {
                    return invalid(&field("upstreams"), "lists no upstream".into());
                }
                let mut seen = BTreeSet::new();
                for u in &r.upstreams {
                    if !self.upstreams.contains_key(u) {
                        return invalid(
                            &field("upstreams"),
                            format!("{u:?} is not defined in [upstreams]"),
                        );
                    }
                    if !seen.insert(u) {
                        return invalid(&field("upstreams"), format!("{u:?} is listed twice"));
                    }
                }
                if let Some(tags) = &r.tags_from {
                    if tags.is_empty() {
                        return invalid(
                            &field("tags_from"),
                            "must name at least one upstream (or be left out for all)".into(),
                        );
                    }
                    for t in tags {
                        if !r.upstreams.contains(t) {
                            return invalid(
                                &field("tags_from"),
                                format!("{t:?} is not one of this route's upstreams"),
                            );
                        }
                    }
                }
                if r.tag_rules
                    .iter()
                    .flatten()
                    .any(|rule| rule.pattern.is_empty())
                {
                    return invalid(&field("tag_rules"), "a pattern must not be empty".into());
                }
                defaults += usize::from(r.default);
            }
            if defaults > 1 {
                return invalid("routes", "more than one route has default = true".into());
            }
        }
        if self.cache.max_manifest_size.as_u64() < 1024 {
            return invalid(
                "cache.max_manifest_size",
                format!(
                    "{} is too small for real manifests (at least 1KiB)",
                    self.cache.max_manifest_size
                ),
            );
        }
        let (high, low) = (self.cache.high_watermark, self.cache.low_watermark);
        if !(0.0 < high && high <= 1.0) {
            return invalid("cache.high_watermark", format!("{high} is not in (0, 1]"));
        }
        if !(0.0 < low && low < high) {
            return invalid(
                "cache.low_watermark",
                format!("{low} must be above 0 and below high_watermark ({high})"),
            );
        }
        if self.cache.max_size.is_some_and(|m| m.as_u64() == 0) {
            return invalid(
                "cache.max_size",
                "must be more than 0 (leave it out for no limit)".into(),
            );
        }
        for (i, p) in self.cache.pins.iter().enumerate() {
            if let Err(e) = crate::cache::pins::Pin::parse(p) {
                return invalid(&format!("cache.pins[{i}]"), e);
            }
        }
        for (i, p) in self.cache.pinned_digests.iter().enumerate() {
            match crate::cache::pins::Pin::parse(p) {
                Ok(crate::cache::pins::Pin::Digest(_)) => {}
                Ok(_) => {
                    return invalid(
                        &format!("cache.pinned_digests[{i}]"),
                        format!("{p:?} is not a digest pattern; put it in cache.pins"),
                    );
                }
                Err(e) => return invalid(&format!("cache.pinned_digests[{i}]"), e),
            }
        }
        for (i, rule) in self.cache.tag_rules.iter().enumerate() {
            if rule.pattern.is_empty() {
                return invalid(
                    &format!("cache.tag_rules[{i}].pattern"),
                    "must not be empty".into(),
                );
            }
        }
        if let Some(addr) = self.admin.listen
            && !addr.ip().is_loopback()
            && self.admin.token_file.is_none()
        {
            return invalid(
                "admin.token_file",
                format!("required when admin.listen ({addr}) is not a loopback address"),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }
        Ok(())
    }

    /// The routes, with upstream names resolved. With no `[[routes]]`, the `[upstream]`
    /// shorthand is one default route for the registry its URL names.
    pub fn resolved_routes(&self) -> Vec<ResolvedRoute> {
        if self.routes.is_empty() {
            let host = reqwest::Url::parse(&self.upstream.url)
                .ok()
                .and_then(|u| {
                    u.host_str().map(|h| match u.port() {
                        Some(p) => format!("{h}:{p}"),
                        None => h.to_string(),
                    })
                })
                .unwrap_or_default();
            // Named by its host, so logs and errors say which registry failed.
            return vec![ResolvedRoute {
                registry: crate::api::registry::canonical_registry(&host),
                upstreams: vec![(host.clone(), self.upstream.clone())],
                tags_from: vec![host],
                default: true,
                cache: self.cache.clone(),
            }];
        }
        self.routes
            .iter()
            .map(|r| ResolvedRoute {
                registry: crate::api::registry::canonical_registry(&r.registry),
                upstreams: r
                    .upstreams
                    .iter()
                    .map(|n| (n.clone(), self.upstreams[n].clone()))
                    .collect(),
                tags_from: r.tags_from.clone().unwrap_or_else(|| r.upstreams.clone()),
                default: r.default,
                cache: r.cache_settings(&self.cache),
            })
            .collect()
    }
}

fn validate_upstream(field: &str, u: &UpstreamConfig) -> Result<(), ConfigError> {
    let invalid = |key: &str, message: String| {
        Err(ConfigError::Invalid {
            field: format!("{field}.{key}"),
            message,
        })
    };
    if let Err(m) = validate_upstream_url(&u.url) {
        return invalid("url", m);
    }
    for (key, d) in [
        ("connect_timeout", u.connect_timeout),
        ("header_timeout", u.header_timeout),
        ("idle_timeout", u.idle_timeout),
    ] {
        if d.is_zero() {
            return invalid(key, "must be greater than zero".into());
        }
    }
    if u.max_concurrent_requests == 0 {
        return invalid("max_concurrent_requests", "must be at least 1".into());
    }
    if u.breaker_failures == 0 {
        return invalid("breaker_failures", "must be at least 1".into());
    }
    if u.password.is_some() && u.password_file.is_some() {
        return invalid(
            "password_file",
            "give either password or password_file, not both".into(),
        );
    }
    if (u.password.is_some() || u.password_file.is_some()) && u.username.is_none() {
        return invalid("username", "a password needs a username".into());
    }
    if u.username.is_some() && u.password.is_none() && u.password_file.is_none() {
        return invalid(
            "password",
            "a username needs a password or password_file".into(),
        );
    }
    if u.token_file.is_some() && u.username.is_some() {
        return invalid(
            "token_file",
            "give either a token_file or username/password, not both".into(),
        );
    }
    Ok(())
}

fn validate_upstream_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "scheme {other:?} is not supported (use http or https)"
            ));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials do not belong in the URL".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!("{url:?} must not have a query or fragment"));
    }
    let path = parsed.path().trim_end_matches('/');
    if path.ends_with("/v2") {
        return Err(format!("{url:?}: give the registry's base URL without /v2"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn example_file_matches_the_defaults() {
        let text = include_str!("../config.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn parses_every_key() {
        let c = Config::from_toml(
            r#"
            listen = "0.0.0.0:6000"
            data_dir = "/var/cache/cistern"
            shutdown_grace = "5s"
            [upstream]
            url = "http://127.0.0.1:5001"
            connect_timeout = "1s"
            header_timeout = "2s"
            idle_timeout = "3s"
            [cache]
            tag_ttl = "1m"
            max_manifest_size = "8MiB"
            manifest_memory = "1GiB"
            [log]
            format = "json"
            level = "debug"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.upstream.header_timeout, Duration::from_secs(2));
        assert_eq!(c.cache.tag_ttl, Duration::from_secs(60));
        assert_eq!(c.cache.max_manifest_size, ByteSize::mib(8));
        assert_eq!(c.log.format, LogFormat::Json);
    }

    fn error_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn pins_are_checked_and_name_their_key() {
        let c = Config::from_toml(
            "[cache]\npins = [\"docker.io/library/*:1.*\", \"registry.example.com/base/*\"]\npinned_digests = [\"sha256:4f1b*\"]\n",
        )
        .unwrap();
        let pins: Vec<String> = c
            .cache
            .pin_patterns()
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            pins,
            [
                "docker.io/library/*:1.*",
                "registry.example.com/base/*",
                "sha256:4f1b*"
            ]
        );
        let e = error_of("[cache]\npins = [\"docker.io/library/*\", \"alpine\"]\n");
        assert!(e.contains("cache.pins[1]"), "{e}");
        let e = error_of("[cache]\npinned_digests = [\"docker.io/library/*\"]\n");
        assert!(e.contains("cache.pinned_digests[0]"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = error_of("[cache]\ntag_tll = \"5m\"\n");
        assert!(e.contains("tag_tll"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = error_of("[cache]\ntag_ttl = \"five minutes\"\n");
        assert!(e.contains("tag_ttl"), "{e}");
    }

    #[test]
    fn bad_url_is_named() {
        for url in [
            "ftp://x",
            "not a url",
            "http://user:pw@host",
            "http://host/v2/",
        ] {
            let e = error_of(&format!("[upstream]\nurl = {url:?}\n"));
            assert!(e.starts_with("upstream.url:"), "{url}: {e}");
        }
    }

    #[test]
    fn zero_timeout_is_named() {
        let e = error_of("[upstream]\nidle_timeout = \"0s\"\n");
        assert!(e.starts_with("upstream.idle_timeout:"), "{e}");
    }

    #[test]
    fn bad_listen_is_named() {
        let e = error_of("listen = \"localhost\"\n");
        assert!(e.contains("listen"), "{e}");
    }

    const TWO_ROUTES: &str = r#"
        [upstreams.hub-mirror]
        url = "https://mirror.example.cn"
        [upstreams.docker-hub]
        url = "https://registry-1.docker.io"
        [upstreams.ghcr]
        url = "https://ghcr.io"
        [[routes]]
        registry = "docker.io"
        upstreams = ["hub-mirror", "docker-hub"]
        tags_from = ["docker-hub"]
        default = true
        [[routes]]
        registry = "ghcr.io"
        upstreams = ["ghcr"]
    "#;

    #[test]
    fn routes_resolve_in_order() {
        let c = Config::from_toml(TWO_ROUTES).unwrap();
        let routes = c.resolved_routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].registry, "docker.io");
        let names: Vec<_> = routes[0]
            .upstreams
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(names, ["hub-mirror", "docker-hub"]);
        assert_eq!(routes[0].tags_from, ["docker-hub"]);
        assert!(routes[0].default);
        assert_eq!(routes[1].tags_from, ["ghcr"], "tags_from defaults to all");
    }

    #[test]
    fn shorthand_is_one_default_route() {
        let routes = Config::default().resolved_routes();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].registry, "docker.io");
        assert!(routes[0].default);
        let c = Config::from_toml("[upstream]\nurl = \"http://127.0.0.1:5001\"\n").unwrap();
        assert_eq!(c.resolved_routes()[0].registry, "127.0.0.1:5001");
    }

    #[test]
    fn route_errors_name_the_field() {
        let cases = [
            (
                TWO_ROUTES.replace(r#"["ghcr"]"#, r#"["nope"]"#),
                "routes[1].upstreams:",
            ),
            (
                TWO_ROUTES.replace(r#"tags_from = ["docker-hub"]"#, r#"tags_from = ["ghcr"]"#),
                "routes[0].tags_from:",
            ),
            (
                TWO_ROUTES.replace(r#"registry = "ghcr.io""#, r#"registry = "index.docker.io""#),
                "routes[1].registry:",
            ),
            (
                TWO_ROUTES.replace(r#"upstreams = ["ghcr"]"#, "upstreams = []"),
                "routes[1].upstreams:",
            ),
            (
                TWO_ROUTES.replace(
                    r#"upstreams = ["ghcr"]"#,
                    "upstreams = [\"ghcr\"]\ndefault = true",
                ),
                "routes:",
            ),
            (
                TWO_ROUTES.replace(r#"url = "https://ghcr.io""#, r#"url = "ghcr.io""#),
                "upstreams.ghcr.url:",
            ),
            (
                format!("{TWO_ROUTES}\n[upstream]\nurl = \"http://x\"\n"),
                "upstream:",
            ),
            ("[upstreams.a]\nurl = \"http://x\"\n".to_string(), "routes:"),
            (
                TWO_ROUTES.replace(
                    r#"url = "https://ghcr.io""#,
                    "url = \"https://ghcr.io\"\npassword = \"x\"",
                ),
                "upstreams.ghcr.username:",
            ),
            (
                TWO_ROUTES.replace(
                    r#"url = "https://ghcr.io""#,
                    "url = \"https://ghcr.io\"\nmax_concurrent_requests = 0",
                ),
                "upstreams.ghcr.max_concurrent_requests:",
            ),
        ];
        for (text, want) in cases {
            let e = error_of(&text);
            assert!(e.starts_with(want), "want {want}, got {e}");
        }
    }

    #[test]
    fn commented_routes_example_is_valid() {
        // The example at the end of config.example.toml, uncommented, must be a working config.
        let text = include_str!("../config.example.toml");
        let start = text
            .find("# [upstreams.hub-mirror]")
            .expect("the routes example is in config.example.toml");
        let uncommented: String = text[start..]
            .lines()
            .filter_map(|l| l.strip_prefix("# ").or_else(|| (l == "#").then_some("")))
            .filter(|l| !l.starts_with("# "))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let routes = c.resolved_routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].tags_from, ["docker-hub"]);
    }

    #[test]
    fn routes_override_freshness() {
        let text = TWO_ROUTES.replace(
            "upstreams = [\"ghcr\"]",
            "upstreams = [\"ghcr\"]\ntag_ttl = \"1h\"\ntag_rules = [{ pattern = \"latest\", ttl = \"1m\" }]",
        );
        let c = Config::from_toml(&text).unwrap();
        let routes = c.resolved_routes();
        assert_eq!(
            routes[0].cache.tag_ttl,
            Duration::from_secs(300),
            "docker.io keeps the default"
        );
        assert_eq!(routes[1].cache.tag_ttl, Duration::from_secs(3600));
        assert_eq!(routes[1].cache.tag_rules[0].pattern, "latest");
        assert_eq!(routes[1].cache.stale_if_error, c.cache.stale_if_error);
    }
}
