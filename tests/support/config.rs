//! The configuration every cistern under test starts from, written once: as config-file text
//! (what [`super::process::ChildCistern`] hands the binary) and parsed from that same text
//! (what [`super::TestCistern`] hands the library), so the two cannot drift apart. Plus the
//! pieces tests add to it: named upstreams and routes, built the way the config file reads.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cistern::Config;
use cistern::config::{RouteConfig, UpstreamConfig};

/// The shutdown grace of every test cistern: short enough that a test whose shutdown must wait
/// it out stays quick, long enough for any fill a test lets finish.
pub const SHUTDOWN_GRACE: &str = "10s";

/// The config file of a cistern on `listen` with its cache in `data`, in front of `upstream`
/// (`None`: no `[upstream]`, for a config that names its upstreams and routes).
pub fn config_text(listen: SocketAddr, data: &Path, upstream: Option<&str>) -> String {
    let mut text = format!(
        "listen = \"{listen}\"\ndata_dir = {:?}\nshutdown_grace = \"{SHUTDOWN_GRACE}\"\n",
        data.display().to_string()
    );
    if let Some(url) = upstream {
        text.push_str(&format!("[upstream]\nurl = {url:?}\n"));
    }
    text
}

/// [`config_text`], parsed as the binary parses its file.
pub fn config(listen: SocketAddr, data: &Path, upstream: Option<&str>) -> Config {
    let config: Config = toml::from_str(&config_text(listen, data, upstream))
        .unwrap_or_else(|e| panic!("the test config does not parse: {e}"));
    debug_assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    config
}

/// An upstream at `url` with default settings; change some with struct-update syntax:
/// `UpstreamConfig { header_timeout: SECOND, ..at(&url) }`.
pub fn at(url: &str) -> UpstreamConfig {
    UpstreamConfig::new(url)
}

/// A route for `registry` over `upstreams`, in order; tags from all of them. Built through
/// serde, as from a config file, so every other key has its default.
pub fn route(registry: &str, upstreams: &[&str]) -> RouteConfig {
    let mut table = toml::Table::new();
    table.insert("registry".into(), registry.into());
    let upstreams = upstreams.iter().map(|&u| u.into()).collect();
    table.insert("upstreams".into(), toml::Value::Array(upstreams));
    toml::Value::Table(table)
        .try_into()
        .expect("a route with only registry and upstreams is valid")
}

/// Like [`route`], and the route for requests that name no registry.
pub fn default_route(registry: &str, upstreams: &[&str]) -> RouteConfig {
    RouteConfig {
        default: true,
        ..route(registry, upstreams)
    }
}

pub fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// A file of the test TLS material in `tests/data/tls/` (a CA, and a server certificate for
/// `127.0.0.1` and `localhost` that it signed).
pub fn tls_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

/// Serves HTTPS with the test server certificate.
pub fn with_tls(c: &mut Config) {
    c.tls.cert_file = Some(tls_file("server.crt"));
    c.tls.key_file = Some(tls_file("server.key"));
}
