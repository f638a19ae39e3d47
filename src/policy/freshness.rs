//! Tag freshness: how old a remembered tag answer may be, and what to do with it. The policy
//! is pure: ages come in as durations, so every rule is unit-tested without clocks.
//!
//! A tag answer (tag → digest) is:
//! - **fresh** while younger than its TTL (`cache.tag_rules`, else `cache.tag_ttl`): served;
//! - **stale-while-revalidate** for `cache.stale_while_revalidate` more: served at once, and
//!   refreshed in the background;
//! - **stale-if-error** for `cache.stale_if_error` past its TTL: asked again, but served (with a
//!   warning) if every upstream fails;
//! - otherwise **expired**: asked again, and the upstreams' answer (or error) is the answer.
//!
//! "Not found" answers are remembered for `cache.negative_ttl` only, and never served stale.
//! Offline mode serves whatever it has, at any age. Digests never expire.
//!
//! Ages are measured by the caller (the cache reads them on the server's `clock::Clock`) and
//! come in as durations; the rules come from the config (`config::CacheConfig::freshness`),
//! which is why this module knows neither.

use std::time::Duration;

use super::glob;

/// What to do with a remembered answer of a given age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it.
    Fresh,
    /// Serve it, and refresh it in the background.
    StaleRevalidate,
    /// Ask the upstreams; serve it only if they all fail.
    StaleIfError,
    /// Ask the upstreams; it is too old to serve.
    Expired,
}

/// The freshness rules of one registry (built from its `[cache]` settings and route overrides
/// by `config::CacheConfig::freshness`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The TTL of a tag no rule matches (`cache.tag_ttl`).
    pub default_ttl: Duration,
    /// (glob, TTL) in order: the first pattern that matches a tag gives its TTL.
    pub rules: Vec<(String, Duration)>,
    /// How long past its TTL an answer is served while it is refreshed in the background.
    pub stale_while_revalidate: Duration,
    /// How long past its TTL an answer is served when every upstream fails.
    pub stale_if_error: Duration,
    /// How long "not found" is believed.
    pub negative_ttl: Duration,
}

impl Policy {
    /// The TTL of a tag: the first matching rule's, else the default.
    pub fn ttl(&self, tag: &str) -> Duration {
        self.rules
            .iter()
            .find(|(pattern, _)| glob::matches(pattern, tag))
            .map_or(self.default_ttl, |(_, ttl)| *ttl)
    }

    /// How to treat a positive answer for `tag` that is `age` old.
    pub fn classify(&self, tag: &str, age: Duration) -> Freshness {
        let ttl = self.ttl(tag);
        // Saturating: a TTL and a grace period from the config may each be near
        // `Duration::MAX`, and their sum is then "forever", not a panic.
        if age < ttl {
            Freshness::Fresh
        } else if age < ttl.saturating_add(self.stale_while_revalidate) {
            Freshness::StaleRevalidate
        } else if age < ttl.saturating_add(self.stale_if_error) {
            Freshness::StaleIfError
        } else {
            Freshness::Expired
        }
    }

    /// Is a "not found" answer `age` old still to be believed?
    pub fn negative_is_fresh(&self, age: Duration) -> bool {
        age < self.negative_ttl
    }

    /// The longest any answer may be kept (for sizing memory caches).
    pub fn longest_ttl(&self) -> Duration {
        self.rules
            .iter()
            .map(|(_, t)| *t)
            .fold(self.default_ttl, Duration::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn policy() -> Policy {
        Policy {
            default_ttl: 5 * MIN,
            stale_while_revalidate: 10 * MIN,
            stale_if_error: 60 * MIN,
            negative_ttl: MIN / 2,
            rules: vec![("latest".into(), MIN), ("v*".into(), 24 * 60 * MIN)],
        }
    }

    #[test]
    fn rules_pick_the_ttl() {
        let p = policy();
        assert_eq!(p.ttl("latest"), MIN);
        assert_eq!(p.ttl("v1.0"), 24 * 60 * MIN);
        assert_eq!(p.ttl("1.25"), 5 * MIN);
        assert_eq!(p.longest_ttl(), 24 * 60 * MIN);
    }

    #[test]
    fn ages_classify() {
        let p = policy();
        assert_eq!(p.classify("1.25", MIN), Freshness::Fresh);
        assert_eq!(p.classify("1.25", 5 * MIN), Freshness::StaleRevalidate);
        assert_eq!(p.classify("1.25", 14 * MIN), Freshness::StaleRevalidate);
        assert_eq!(p.classify("1.25", 15 * MIN), Freshness::StaleIfError);
        assert_eq!(p.classify("1.25", 64 * MIN), Freshness::StaleIfError);
        assert_eq!(p.classify("1.25", 65 * MIN), Freshness::Expired);
        assert_eq!(p.classify("latest", 2 * MIN), Freshness::StaleRevalidate);
        assert!(p.negative_is_fresh(MIN / 4));
        assert!(!p.negative_is_fresh(MIN / 2));
    }

    #[test]
    fn zero_windows_turn_features_off() {
        let p = Policy {
            default_ttl: MIN,
            rules: Vec::new(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            negative_ttl: Duration::ZERO,
        };
        assert_eq!(p.classify("x", MIN), Freshness::Expired);
        assert!(!p.negative_is_fresh(Duration::ZERO));
    }

    /// A TTL and a grace period that overflow a `Duration` together (absurd config values)
    /// used to panic the pull that classified the tag.
    #[test]
    fn huge_windows_saturate() {
        let p = Policy {
            default_ttl: Duration::MAX / 2 + MIN,
            rules: Vec::new(),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::MAX,
            negative_ttl: Duration::MAX,
        };
        assert_eq!(p.classify("x", MIN), Freshness::Fresh);
        assert_eq!(
            p.classify("x", Duration::MAX / 2 + MIN),
            Freshness::StaleIfError
        );
        assert_eq!(
            p.classify("x", Duration::MAX - MIN),
            Freshness::StaleIfError
        );
        let p = Policy {
            stale_while_revalidate: Duration::MAX,
            ..p
        };
        assert_eq!(
            p.classify("x", Duration::MAX - MIN),
            Freshness::StaleRevalidate
        );
    }
}
