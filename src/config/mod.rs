//! Configuration: TOML text → a validated [`Config`] with defaults.
//!
//! Pure: parsing and validation do no IO beyond reading the file the caller names. Every key has
//! a default, so an empty file (or no file at all) is a working configuration: a mirror of Docker
//! Hub listening on `127.0.0.1:5000` with its cache under `./cistern-data`.
//!
//! Unknown keys are errors (`deny_unknown_fields`): a typo must not silently fall back to a
//! default. Errors name the offending key, e.g. `cache.tag_ttl`.
//!
//! - `schema`: every key, its type, what it means and its default.
//! - `load`: TOML text or a file → a validated `Config`, and [`ConfigError`].
//! - `validate`: the rules that types alone cannot express.
//! - `routes`: `[[routes]]` (or the `[upstream]` shorthand) with upstream names looked up.
//! - `policies`: the cache keys as `crate::policy` values (pins, tag freshness).
//! - `summary`: what a config means, without secrets, and the files it names.

mod load;
mod policies;
mod routes;
mod schema;
mod summary;
mod validate;

pub use load::ConfigError;
pub use routes::ResolvedRoute;
pub use schema::{
    AccessConfig, AdminConfig, CacheConfig, ColdRanges, Config, DEFAULT_DATA_DIR, DEFAULT_LISTEN,
    DEFAULT_UPSTREAM, LogConfig, LogFormat, RouteConfig, TagRule, TlsConfig, UpstreamConfig,
};
pub use summary::{AccessSummary, RouteSummary, SET, Summary, UpstreamSummary};

/// Configs and helpers the tests of several of these files share.
#[cfg(test)]
pub(crate) mod testing {
    use super::Config;

    pub const TWO_ROUTES: &str = r#"
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

    /// A valid config with the largest value of every size and duration (near
    /// `Duration::MAX`: two of them added overflow) and of every count validate allows.
    pub fn extremes() -> String {
        const FOREVER: &str = "\"500000000000years\"";
        format!(
            "shutdown_grace = {FOREVER}\nproxy_any_registry = true\n\
             [upstream]\nurl = \"http://127.0.0.1:1\"\n\
             connect_timeout = {FOREVER}\nheader_timeout = {FOREVER}\nidle_timeout = {FOREVER}\n\
             max_concurrent_requests = 1000000\nbreaker_failures = 4294967295\n\
             breaker_cooldown = \"1d\"\n\
             [cache]\ntag_ttl = {FOREVER}\nstale_while_revalidate = {FOREVER}\n\
             stale_if_error = {FOREVER}\nnegative_ttl = {FOREVER}\n\
             tag_rules = [{{ pattern = \"x\", ttl = {FOREVER} }}]\n\
             max_manifest_size = \"18446744073709551615\"\n\
             manifest_memory = \"99999999999EiB\"\nmax_size = \"18446744073709551615\"\n\
             max_fills = 9223372036854775807\nmax_fills_per_client = 9223372036854775807\n"
        )
    }

    /// The message `text` is rejected with.
    pub fn error_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }
}
