//! What a config means, for people (`cistern check-config`) and machines (`--json`): the
//! listeners, the routes with their upstreams in order, the cache budget and access control.
//! Secrets are never shown, only whether one is set (`<set>`); file paths are shown, since
//! checking them is the point. Pure: the files themselves are checked by the caller, using
//! [`Config::referenced_files`].

use std::path::PathBuf;

use serde::Serialize;

use super::Config;

/// Shown in place of a secret.
pub const SET: &str = "<set>";

#[derive(Debug, Serialize)]
pub struct Summary {
    pub listen: String,
    pub tls: bool,
    pub admin: Option<String>,
    pub admin_token: bool,
    pub data_dir: PathBuf,
    pub offline: bool,
    pub proxy_any_registry: bool,
    /// `cache.max_size` in bytes; `None`: unbounded.
    pub cache_max_size: Option<u64>,
    /// `cache.max_metadata_size` in bytes (always bounded).
    pub cache_max_metadata_size: u64,
    pub cache_watermarks: (f64, f64),
    pub pins: usize,
    pub routes: Vec<RouteSummary>,
    pub access: Option<AccessSummary>,
}

#[derive(Debug, Serialize)]
pub struct RouteSummary {
    pub registry: String,
    pub default: bool,
    /// In the order they are tried.
    pub upstreams: Vec<UpstreamSummary>,
    pub tags_from: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct UpstreamSummary {
    pub name: String,
    pub url: String,
    pub username: Option<String>,
    /// [`SET`] when a password or password file is given; never the password.
    pub password: Option<&'static str>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct AccessSummary {
    pub htpasswd_file: Option<PathBuf>,
    pub anonymous: Vec<String>,
    pub users: Vec<(String, Vec<String>)>,
}

impl Config {
    /// What this config means, without secrets.
    pub fn summary(&self) -> Summary {
        let routes = self
            .resolved_routes()
            .into_iter()
            .map(|r| RouteSummary {
                registry: r.registry,
                default: r.default,
                upstreams: r
                    .upstreams
                    .into_iter()
                    .map(|(name, u)| UpstreamSummary {
                        name,
                        password: (u.password.is_some() || u.password_file.is_some())
                            .then_some(SET),
                        url: u.url,
                        username: u.username,
                        token_file: u.token_file,
                        ca_file: u.ca_file,
                    })
                    .collect(),
                tags_from: r.tags_from,
            })
            .collect();
        Summary {
            listen: self.listen.to_string(),
            tls: self.tls.cert_file.is_some(),
            admin: self.admin.listen.map(|a| a.to_string()),
            admin_token: self.admin.token_file.is_some(),
            data_dir: self.data_dir.clone(),
            offline: self.offline,
            proxy_any_registry: self.proxy_any_registry,
            cache_max_size: self.cache.max_size.map(|s| s.as_u64()),
            cache_max_metadata_size: self.cache.max_metadata_size.as_u64(),
            cache_watermarks: (self.cache.high_watermark, self.cache.low_watermark),
            pins: self.cache.pins.len() + self.cache.pinned_digests.len(),
            routes,
            access: self.access.as_ref().map(|a| AccessSummary {
                htpasswd_file: a.htpasswd_file.clone(),
                anonymous: a.anonymous.clone(),
                users: a
                    .users
                    .iter()
                    .map(|(u, p)| (u.clone(), p.clone()))
                    .collect(),
            }),
        }
    }

    /// Every file the config names, with the key naming it: what must exist and be readable
    /// before `serve` can start.
    pub fn referenced_files(&self) -> Vec<(String, PathBuf)> {
        let mut files = Vec::new();
        let mut add = |key: String, path: &Option<PathBuf>| {
            if let Some(p) = path {
                files.push((key, p.clone()));
            }
        };
        if self.routes.is_empty() {
            let u = &self.upstream;
            add("upstream.password_file".into(), &u.password_file);
            add("upstream.token_file".into(), &u.token_file);
            add("upstream.ca_file".into(), &u.ca_file);
        }
        for (name, u) in &self.upstreams {
            add(format!("upstreams.{name}.password_file"), &u.password_file);
            add(format!("upstreams.{name}.token_file"), &u.token_file);
            add(format!("upstreams.{name}.ca_file"), &u.ca_file);
        }
        add("tls.cert_file".into(), &self.tls.cert_file);
        add("tls.key_file".into(), &self.tls.key_file);
        add("admin.token_file".into(), &self.admin.token_file);
        if let Some(a) = &self.access {
            add("access.htpasswd_file".into(), &a.htpasswd_file);
        }
        files
    }
}

impl std::fmt::Display for Summary {
    /// A few lines a person reads at a glance.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        writeln!(f, "listen     {} ({scheme})", self.listen)?;
        match &self.admin {
            Some(a) => {
                let token = if self.admin_token { SET } else { "none" };
                writeln!(f, "admin      {a} (token {token})")?;
            }
            None => writeln!(f, "admin      off")?,
        }
        writeln!(f, "data_dir   {}", self.data_dir.display())?;
        match self.cache_max_size {
            Some(max) => writeln!(
                f,
                "cache      {} of blobs, evicting from {:.0}% down to {:.0}%; {} config pins",
                bytesize::ByteSize::b(max),
                self.cache_watermarks.0 * 100.0,
                self.cache_watermarks.1 * 100.0,
                self.pins
            )?,
            None => writeln!(f, "cache      unbounded; {} config pins", self.pins)?,
        }
        writeln!(
            f,
            "metadata   {} of manifests, tag records and links",
            bytesize::ByteSize::b(self.cache_max_metadata_size)
        )?;
        if self.offline {
            writeln!(f, "offline    yes: no upstream is contacted")?;
        }
        writeln!(f, "routes")?;
        for r in &self.routes {
            let default = if r.default { " (default)" } else { "" };
            writeln!(f, "  {}{default}", r.registry)?;
            for (i, u) in r.upstreams.iter().enumerate() {
                let mut extra = Vec::new();
                if let Some(user) = &u.username {
                    extra.push(format!("user {user}"));
                }
                if let Some(p) = u.password {
                    extra.push(format!("password {p}"));
                }
                if u.token_file.is_some() {
                    extra.push(format!("token {SET}"));
                }
                if let Some(ca) = &u.ca_file {
                    extra.push(format!("ca {}", ca.display()));
                }
                if !r.tags_from.contains(&u.name) {
                    extra.push("not for tags".into());
                }
                let extra = if extra.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", extra.join(", "))
                };
                writeln!(f, "    {}. {} {}{extra}", i + 1, u.name, u.url)?;
            }
        }
        if self.proxy_any_registry {
            writeln!(f, "  any other registry: proxied to https://<registry>")?;
        }
        match &self.access {
            None => writeln!(f, "access     off: every client may pull everything")?,
            Some(a) => {
                writeln!(f, "access     anonymous: {}", list(&a.anonymous))?;
                for (user, patterns) in &a.users {
                    writeln!(f, "           {user}: {}", list(patterns))?;
                }
            }
        }
        Ok(())
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::TWO_ROUTES;
    use super::*;

    #[test]
    fn the_summary_shows_routes_in_order_and_never_a_secret() {
        // The two-route fixture with credentials on docker-hub, and the [access] they need.
        let text = TWO_ROUTES.replace(
            "url = \"https://registry-1.docker.io\"",
            "url = \"https://registry-1.docker.io\"\nusername = \"me\"\npassword = \"hunter2\"",
        ) + "\n[access]\nanonymous = [\"docker.io/*\"]\n";
        let config = Config::from_toml(&text).unwrap();
        let summary = config.summary();
        let shown = summary.to_string();
        let json = serde_json::to_string(&summary).unwrap();
        for out in [&shown, &json] {
            assert!(!out.contains("hunter2"), "{out}");
            assert!(out.contains(SET), "{out}");
        }
        assert!(!format!("{config:?}").contains("hunter2"));
        let hub = shown.find("hub-mirror").unwrap();
        let origin = shown.find("docker-hub").unwrap();
        assert!(hub < origin, "{shown}");
        assert!(shown.contains("docker.io (default)"), "{shown}");
        assert!(shown.contains("anonymous: docker.io/*"), "{shown}");
    }

    #[test]
    fn referenced_files_name_their_keys() {
        let config = Config::from_toml(
            "[upstream]\nurl = \"https://ghcr.io\"\nusername = \"u\"\npassword_file = \"/p\"\n\
             [tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n[access]\nanonymous = [\"ghcr.io/*\"]\n",
        )
        .unwrap();
        let keys: Vec<String> = config
            .referenced_files()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            ["upstream.password_file", "tls.cert_file", "tls.key_file"]
        );
    }
}
