//! Configuration: TOML text → a validated [`Config`] with defaults.
//!
//! Pure: parsing and validation do no IO beyond reading the file the caller names. Every key has
//! a default, so an empty file (or no file at all) is a working configuration: a mirror of Docker
//! Hub listening on `127.0.0.1:5000` with its cache under `./cistern-data`.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a typo must not silently fall back to a
//! default. Errors name the offending key, e.g. `cache.tag_ttl`.

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
    pub upstream: UpstreamConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
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
            cache: CacheConfig::default(),
            log: LogConfig::default(),
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
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: Duration::from_secs(5 * 60),
            max_manifest_size: ByteSize::mib(4),
            manifest_memory: ByteSize::mib(64),
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
    Invalid {
        field: &'static str,
        message: String,
    },
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
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty".into());
        }
        validate_upstream_url(&self.upstream.url).or_else(|m| invalid("upstream.url", m))?;
        for (field, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.header_timeout", self.upstream.header_timeout),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
        ] {
            if d.is_zero() {
                return invalid(field, "must be greater than zero".into());
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
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return invalid(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }
        Ok(())
    }
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
}
