//! The rules a config must keep that its types alone cannot express. Each failure names its
//! key (`routes[1].upstreams`, `cache.pins[0]`, `upstream.url`).

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Config, ConfigError, UpstreamConfig};
use crate::policy::access::Pattern as AccessPattern;
use crate::policy::pins::Pin;

impl Config {
    /// Checks the rules that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        self.validate_routes()?;
        self.validate_cache()?;
        self.validate_access()?;
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

    /// `[access]`: its patterns and users; and without it, no upstream with credentials,
    /// which would let any client pull that account's private repositories.
    fn validate_access(&self) -> Result<(), ConfigError> {
        let Some(access) = &self.access else {
            let credentialed = self.resolved_routes().into_iter().find_map(|r| {
                let (name, _) = r.upstreams.iter().find(|(_, u)| u.has_credentials())?;
                Some((r.registry.clone(), name.clone()))
            });
            if let Some((registry, upstream)) = credentialed {
                let key = if self.routes.is_empty() {
                    "upstream".to_string()
                } else {
                    format!("upstreams.{upstream}")
                };
                return invalid(
                    "access",
                    format!(
                        "{key} holds credentials, which may reach that account's private \
                         repositories: add an [access] table saying who may pull through it, \
                         e.g. for a login used only for the registry's rate limit:\n\n\
                         [access]\nanonymous = [\"{registry}/*\"]\n"
                    ),
                );
            }
            return Ok(());
        };
        let check = |field: String, pattern: &str| match AccessPattern::parse(pattern) {
            Ok(_) => Ok(()),
            Err(message) => invalid(&field, message),
        };
        for (i, p) in access.anonymous.iter().enumerate() {
            check(format!("access.anonymous[{i}]"), p)?;
        }
        for (user, patterns) in &access.users {
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                return invalid(
                    "access.users",
                    format!("{user:?} is not a user name (no ':' or control characters)"),
                );
            }
            for (i, p) in patterns.iter().enumerate() {
                check(format!("access.users.{user}[{i}]"), p)?;
            }
        }
        if !access.users.is_empty() && access.htpasswd_file.is_none() {
            return invalid(
                "access.htpasswd_file",
                "required when [access.users] names users: their passwords live there".into(),
            );
        }
        Ok(())
    }

    /// `[upstream]`, or `[upstreams.NAME]` with the `[[routes]]` that use them.
    fn validate_routes(&self) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[cache]`: sizes, watermarks, pins and tag rules.
    fn validate_cache(&self) -> Result<(), ConfigError> {
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
        // Below this a budget cannot hold a few images' manifests and tags, and eviction would
        // remove what a pull is about to need.
        let min_metadata = bytesize::ByteSize::kib(64);
        if self.cache.max_metadata_size < min_metadata {
            return invalid(
                "cache.max_metadata_size",
                format!(
                    "{} is too small to hold a working set of manifests and tags (at least {min_metadata})",
                    self.cache.max_metadata_size
                ),
            );
        }
        for (i, p) in self.cache.pins.iter().enumerate() {
            if let Err(e) = Pin::parse(p) {
                return invalid(&format!("cache.pins[{i}]"), e);
            }
        }
        for (i, p) in self.cache.pinned_digests.iter().enumerate() {
            match Pin::parse(p) {
                Ok(Pin::Digest(_)) => {}
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
        Ok(())
    }
}

/// A failed check of `field`.
fn invalid(field: &str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        field: field.to_string(),
        message,
    })
}

/// The longest `breaker_cooldown`: a day.
const MAX_BREAKER_COOLDOWN: Duration = Duration::from_secs(24 * 60 * 60);

/// The most `max_concurrent_requests`: far above what any upstream or socket table takes,
/// and far below what a request-slot semaphore can hold.
const MAX_CONCURRENT_REQUESTS: usize = 1_000_000;

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
    if u.max_concurrent_requests > MAX_CONCURRENT_REQUESTS {
        return invalid(
            "max_concurrent_requests",
            format!(
                "{} is more than the most allowed, {MAX_CONCURRENT_REQUESTS}",
                u.max_concurrent_requests
            ),
        );
    }
    if u.breaker_failures == 0 {
        return invalid("breaker_failures", "must be at least 1".into());
    }
    if u.breaker_cooldown > MAX_BREAKER_COOLDOWN {
        return invalid(
            "breaker_cooldown",
            format!(
                "{:?} is longer than the most allowed, {:?} (a longer one would keep an \
                 upstream that is back skipped for good)",
                u.breaker_cooldown, MAX_BREAKER_COOLDOWN
            ),
        );
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
    use crate::config::Config;
    use crate::config::testing::{TWO_ROUTES, error_of, extremes};

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

    /// Values that passed before and then panicked (a request-slot semaphore too large) or
    /// were absurd (a cool-down of centuries, which used to overflow the breaker's deadline).
    #[test]
    fn upstream_upper_bounds_are_named() {
        for (line, want) in [
            ("breaker_cooldown = \"2d\"", "upstream.breaker_cooldown:"),
            (
                "breaker_cooldown = \"500000000years\"",
                "upstream.breaker_cooldown:",
            ),
            (
                "max_concurrent_requests = 1000001",
                "upstream.max_concurrent_requests:",
            ),
            (
                "max_concurrent_requests = 9223372036854775807",
                "upstream.max_concurrent_requests:",
            ),
        ] {
            let e = error_of(&format!("[upstream]\n{line}\n"));
            assert!(e.starts_with(want), "{line}: {e}");
        }
        for line in [
            "breaker_cooldown = \"1d\"",
            "max_concurrent_requests = 1000000",
        ] {
            let text = format!("[upstream]\n{line}\n");
            assert!(Config::from_toml(&text).is_ok(), "{line}");
        }
    }

    /// The largest value of every size and duration a config may hold is accepted, and using
    /// it (the summary, freshness) panics nowhere. (`upstream::routes` builds routes from it.)
    #[test]
    fn extreme_values_never_panic() {
        use std::time::Duration;

        let c = Config::from_toml(&extremes()).unwrap();
        assert!(!c.summary().to_string().is_empty());
        let freshness = c.cache.freshness();
        for age in [Duration::ZERO, Duration::MAX / 2, Duration::MAX] {
            freshness.classify("x", age);
            freshness.classify("y", age);
            freshness.negative_is_fresh(age);
        }
    }

    #[test]
    fn a_metadata_budget_too_small_is_named() {
        let e = error_of("[cache]\nmax_metadata_size = \"1KiB\"\n");
        assert!(e.starts_with("cache.max_metadata_size:"), "{e}");
        assert!(e.contains("64"), "{e}");
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
}
