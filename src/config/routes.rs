//! Routes with their upstreams looked up: what the server builds its routing table from.

use super::{CacheConfig, Config, RouteConfig, UpstreamConfig};

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
            cold_ranges: self.cold_ranges.unwrap_or(global.cold_ranges),
            ..global.clone()
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

impl Config {
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
                // `validate` has checked that every name is defined; a config that skipped
                // it loses the undefined ones here rather than panicking.
                upstreams: r
                    .upstreams
                    .iter()
                    .filter_map(|n| Some((n.clone(), self.upstreams.get(n)?.clone())))
                    .collect(),
                tags_from: r.tags_from.clone().unwrap_or_else(|| r.upstreams.clone()),
                default: r.default,
                cache: r.cache_settings(&self.cache),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::Config;
    use crate::config::testing::TWO_ROUTES;

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
    fn commented_routes_example_is_valid() {
        // The example at the end of config.example.toml, uncommented, must be a working config.
        let text = include_str!("../../config.example.toml");
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

    #[test]
    fn routes_override_cold_ranges() {
        use crate::config::ColdRanges;
        let text = TWO_ROUTES.replace(
            "upstreams = [\"ghcr\"]",
            "upstreams = [\"ghcr\"]\ncold_ranges = \"wait\"",
        );
        let c = Config::from_toml(&text).unwrap();
        let routes = c.resolved_routes();
        assert_eq!(routes[0].cache.cold_ranges, ColdRanges::Upstream);
        assert_eq!(routes[1].cache.cold_ranges, ColdRanges::Wait);
    }
}
