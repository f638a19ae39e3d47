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
//! Ages are measured on a [`Clock`]: the system's, or in tests one moved by hand, so that the
//! integration tests step past a TTL instead of sleeping through it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::CacheConfig;

/// Where tag answers get their fetch times and ages: the system clock, or a manual one that
/// stands still until a test advances it.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<Mutex<SystemTime>>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start` until [`Clock::advance`] moves it (tests).
    pub fn manual(start: SystemTime) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    pub fn now(&self) -> SystemTime {
        match &self.manual {
            Some(t) => *t.lock().expect("clock poisoned"),
            None => SystemTime::now(),
        }
    }

    /// Moves a manual clock forward; every copy of it moves. The system clock cannot be moved.
    pub fn advance(&self, by: Duration) {
        let t = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        *t.lock().expect("clock poisoned") += by;
    }

    /// How long ago `then` was; zero if it is in the future (a clock set back).
    pub fn age(&self, then: SystemTime) -> Duration {
        self.now().duration_since(then).unwrap_or(Duration::ZERO)
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.manual {
            Some(_) => write!(f, "Clock::manual({:?})", self.now()),
            None => f.write_str("Clock::system"),
        }
    }
}

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

/// The freshness rules, from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    default_ttl: Duration,
    rules: Vec<(String, Duration)>,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    negative_ttl: Duration,
}

impl Policy {
    pub fn new(config: &CacheConfig) -> Policy {
        Policy {
            default_ttl: config.tag_ttl,
            rules: config
                .tag_rules
                .iter()
                .map(|r| (r.pattern.clone(), r.ttl))
                .collect(),
            stale_while_revalidate: config.stale_while_revalidate,
            stale_if_error: config.stale_if_error,
            negative_ttl: config.negative_ttl,
        }
    }

    /// The TTL of a tag: the first matching rule's, else the default.
    pub fn ttl(&self, tag: &str) -> Duration {
        self.rules
            .iter()
            .find(|(pattern, _)| glob_match(pattern, tag))
            .map_or(self.default_ttl, |(_, ttl)| *ttl)
    }

    /// How to treat a positive answer for `tag` that is `age` old.
    pub fn classify(&self, tag: &str, age: Duration) -> Freshness {
        let ttl = self.ttl(tag);
        if age < ttl {
            Freshness::Fresh
        } else if age < ttl + self.stale_while_revalidate {
            Freshness::StaleRevalidate
        } else if age < ttl + self.stale_if_error {
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

/// `*` matches any run of characters (including none), `?` exactly one; everything else
/// matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            // Let the last `*` swallow one more character and try again.
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TagRule;

    const MIN: Duration = Duration::from_secs(60);

    fn policy() -> Policy {
        Policy::new(&CacheConfig {
            tag_ttl: 5 * MIN,
            stale_while_revalidate: 10 * MIN,
            stale_if_error: 60 * MIN,
            negative_ttl: MIN / 2,
            tag_rules: vec![
                TagRule {
                    pattern: "latest".into(),
                    ttl: MIN,
                },
                TagRule {
                    pattern: "v*".into(),
                    ttl: 24 * 60 * MIN,
                },
            ],
            ..CacheConfig::default()
        })
    }

    #[test]
    fn globs() {
        assert!(glob_match("latest", "latest"));
        assert!(!glob_match("latest", "latest2"));
        assert!(glob_match("v*", "v1.2.3"));
        assert!(glob_match("v*", "v"));
        assert!(!glob_match("v*", "1.2"));
        assert!(glob_match("*-alpine", "1.25-alpine"));
        assert!(glob_match("1.?", "1.5"));
        assert!(!glob_match("1.?", "1.55"));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
        assert!(!glob_match("*a*b", "xxbxxa"));
        assert!(glob_match("*", ""));
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
        let p = Policy::new(&CacheConfig {
            tag_ttl: MIN,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            negative_ttl: Duration::ZERO,
            ..CacheConfig::default()
        });
        assert_eq!(p.classify("x", MIN), Freshness::Expired);
        assert!(!p.negative_is_fresh(Duration::ZERO));
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_every_copy_with_it() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = Clock::manual(start);
        let copy = clock.clone();
        assert_eq!(clock.now(), start);
        copy.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), start + Duration::from_secs(90));
        assert_eq!(clock.age(start), Duration::from_secs(90));
        assert_eq!(clock.age(start + Duration::from_secs(100)), Duration::ZERO);
    }
}
