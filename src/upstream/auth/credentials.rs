//! What an upstream authenticates with, read once at start from its config.

use std::path::Path;

use crate::config::UpstreamConfig;

/// How this upstream authenticates. No `Debug`: it holds secrets.
#[derive(Clone)]
pub enum Credentials {
    None,
    Basic {
        username: String,
        password: String,
    },
    /// A long-lived bearer token sent as is.
    Token(String),
}

impl Credentials {
    /// Reads the credentials of the upstream configured at `table` (`upstreams.<name>`).
    /// `password_file` and `token_file` are read now, so a missing or empty file is a
    /// start-up error naming its key, not a failure at the first pull.
    pub fn from_config(table: &str, config: &UpstreamConfig) -> anyhow::Result<Credentials> {
        let read_secret = |key: &str, path: &Path| -> anyhow::Result<String> {
            let field = format!("{table}.{key}");
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))?;
            let secret = text.trim().to_string();
            if secret.is_empty() {
                anyhow::bail!("{field}: {} is empty", path.display());
            }
            Ok(secret)
        };
        Ok(
            match (&config.username, &config.password, &config.password_file) {
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
            },
        )
    }
}
