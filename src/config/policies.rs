//! The `[cache]` keys that are policy, as the pure `crate::policy` values the cache and the
//! routes work with: pin patterns and tag freshness. The conversions live here, on the config's
//! side, so that `policy` never needs to know the config.

use super::CacheConfig;
use crate::policy::freshness::Policy;
use crate::policy::pins::Pin;

impl CacheConfig {
    /// `pins` and `pinned_digests`, parsed (`validate` has checked them).
    pub fn pin_patterns(&self) -> Vec<Pin> {
        self.pins
            .iter()
            .chain(&self.pinned_digests)
            .filter_map(|p| Pin::parse(p).ok())
            .collect()
    }

    /// The tag freshness rules these settings give (a route's `cache` has its overrides
    /// applied already: see `Config::resolved_routes`).
    pub fn freshness(&self) -> Policy {
        Policy {
            default_ttl: self.tag_ttl,
            rules: self
                .tag_rules
                .iter()
                .map(|r| (r.pattern.clone(), r.ttl))
                .collect(),
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
            negative_ttl: self.negative_ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testing::error_of;
    use crate::config::{CacheConfig, Config, TagRule};
    use crate::policy::freshness::{Freshness, Policy};

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
    fn freshness_takes_every_window_and_the_rules_in_order() {
        let min = Duration::from_secs(60);
        let cache = CacheConfig {
            tag_ttl: 5 * min,
            stale_while_revalidate: 10 * min,
            stale_if_error: 60 * min,
            negative_ttl: min / 2,
            tag_rules: vec![
                TagRule {
                    pattern: "latest".into(),
                    ttl: min,
                },
                TagRule {
                    pattern: "*".into(),
                    ttl: 2 * min,
                },
            ],
            ..CacheConfig::default()
        };
        let p = cache.freshness();
        assert_eq!(
            p,
            Policy {
                default_ttl: 5 * min,
                rules: vec![("latest".into(), min), ("*".into(), 2 * min)],
                stale_while_revalidate: 10 * min,
                stale_if_error: 60 * min,
                negative_ttl: min / 2,
            }
        );
        assert_eq!(p.classify("latest", min), Freshness::StaleRevalidate);
    }
}
