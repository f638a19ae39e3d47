//! Reading a config: TOML text (or a file) → a validated [`Config`], or a [`ConfigError`]
//! that names the key at fault.

use std::path::{Path, PathBuf};

use super::Config;

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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytesize::ByteSize;

    use super::*;
    use crate::config::LogFormat;
    use crate::config::testing::error_of;

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
    fn bad_listen_is_named() {
        let e = error_of("listen = \"localhost\"\n");
        assert!(e.contains("listen"), "{e}");
    }
}
