//! Who may pull what: the `[access]` patterns, decided without IO.
//!
//! A pattern is `<registry>/<repository>` with `*` (any run of characters, `/` included) and
//! `?` (one character) globs, as for pins, or `*` alone for everything. A request is for
//! `<registry>/<repository>` as clients name it (`docker.io/library/alpine`).
//!
//! A route whose upstreams hold credentials may reach that account's private repositories,
//! so anonymous patterns open it only when they name its registry literally
//! (`docker.io/*`, never `*` or `*/*`): a broad pattern written for public mirrors never
//! exposes a logged-in upstream by accident.

use std::collections::BTreeMap;

use crate::policy::glob;

/// One `[access]` pattern, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// The registry part, if it has no globs: what "names a registry explicitly" means.
    literal_registry: Option<String>,
}

impl Pattern {
    /// `*`, or `<registry>/<repository>` with globs. Errors say what is wrong with it.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let text = s.trim();
        if text == "*" {
            return Ok(Pattern {
                text: text.to_string(),
                literal_registry: None,
            });
        }
        let Some((registry, repository)) = text.split_once('/') else {
            return Err(format!(
                "{s:?}: give <registry>/<repository> (globs allowed, e.g. \"docker.io/*\") or \"*\""
            ));
        };
        if registry.is_empty() || repository.is_empty() {
            return Err(format!(
                "{s:?}: the registry and the repository may not be empty"
            ));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{s:?}: no spaces or control characters"));
        }
        let literal = !registry.contains(['*', '?']);
        Ok(Pattern {
            text: text.to_ascii_lowercase(),
            literal_registry: literal.then(|| registry.to_ascii_lowercase()),
        })
    }

    fn matches(&self, registry: &str, repository: &str) -> bool {
        self.text == "*" || glob::matches(&self.text, &format!("{registry}/{repository}"))
    }

    /// Does this pattern name `registry` literally, as a credentialed route requires?
    fn names_registry(&self, registry: &str) -> bool {
        self.literal_registry.as_deref() == Some(registry)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// What a request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Anonymous, and anonymous clients may not pull this: 401, so the client logs in.
    NeedsLogin,
    /// Logged in, but this user may not pull this: 403.
    Forbidden,
}

/// The `[access]` table, checked.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    anonymous: Vec<Pattern>,
    users: BTreeMap<String, Vec<Pattern>>,
}

impl Rules {
    pub fn new(anonymous: Vec<Pattern>, users: BTreeMap<String, Vec<Pattern>>) -> Rules {
        Rules { anonymous, users }
    }

    /// May `user` (`None`: anonymous) pull `registry/repository`? `credentialed`: the route's
    /// upstreams hold credentials.
    pub fn decide(
        &self,
        user: Option<&str>,
        registry: &str,
        repository: &str,
        credentialed: bool,
    ) -> Decision {
        let anonymous_ok = self.anonymous.iter().any(|p| {
            p.matches(registry, repository) && (!credentialed || p.names_registry(registry))
        });
        if anonymous_ok {
            return Decision::Allow;
        }
        let Some(user) = user else {
            return Decision::NeedsLogin;
        };
        let allowed = self
            .users
            .get(user)
            .is_some_and(|ps| ps.iter().any(|p| p.matches(registry, repository)));
        if allowed {
            Decision::Allow
        } else {
            Decision::Forbidden
        }
    }

    /// Does anything at all let anonymous clients in?
    pub fn any_anonymous(&self) -> bool {
        !self.anonymous.is_empty()
    }

    /// Does any user have patterns of their own (so logging in can open more)?
    pub fn has_users(&self) -> bool {
        !self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    fn rules() -> Rules {
        let mut users = BTreeMap::new();
        users.insert("ci".to_string(), vec![p("*")]);
        users.insert(
            "team-a".to_string(),
            vec![p("ghcr.io/org-a/*"), p("docker.io/*")],
        );
        Rules::new(vec![p("docker.io/*")], users)
    }

    #[test]
    fn anonymous_patterns_and_users() {
        let r = rules();
        use Decision::*;
        assert_eq!(r.decide(None, "docker.io", "library/alpine", false), Allow);
        assert_eq!(r.decide(None, "ghcr.io", "org-a/app", false), NeedsLogin);
        assert_eq!(
            r.decide(Some("team-a"), "ghcr.io", "org-a/app", false),
            Allow
        );
        assert_eq!(
            r.decide(Some("team-a"), "ghcr.io", "org-b/app", false),
            Forbidden
        );
        assert_eq!(r.decide(Some("ci"), "ghcr.io", "org-b/app", true), Allow);
        assert_eq!(
            r.decide(Some("nobody"), "ghcr.io", "org-a/app", false),
            Forbidden
        );
        // A glob never crosses from one registry into another's name.
        assert_eq!(r.decide(None, "docker.io.evil", "x", false), NeedsLogin);
    }

    #[test]
    fn credentialed_routes_need_a_literal_anonymous_pattern() {
        let broad = Rules::new(vec![p("*"), p("*/*"), p("ghcr.*/*")], BTreeMap::new());
        assert_eq!(
            broad.decide(None, "ghcr.io", "org/private", true),
            Decision::NeedsLogin
        );
        assert_eq!(
            broad.decide(None, "ghcr.io", "org/public", false),
            Decision::Allow
        );
        let named = Rules::new(vec![p("ghcr.io/org/*")], BTreeMap::new());
        assert_eq!(
            named.decide(None, "ghcr.io", "org/x", true),
            Decision::Allow
        );
        assert_eq!(
            named.decide(None, "ghcr.io", "other/x", true),
            Decision::NeedsLogin
        );
    }

    #[test]
    fn patterns_are_checked() {
        for bad in ["", "docker.io", "/x", "docker.io/", "docker.io/a b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(p("Docker.IO/Library/*").to_string(), "docker.io/library/*");
    }
}
