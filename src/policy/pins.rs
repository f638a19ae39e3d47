//! Pin patterns: what may never be evicted or garbage-collected by a purge. Pure.
//!
//! Three forms, each with `*` (any run of characters, `/` included) and `?` (one character)
//! globs, matched by [`glob::matches`]:
//!
//! ```text
//! sha256:<hex>                        a blob or manifest digest (sha256:4f1b* pins a prefix)
//! <registry>/<repository>             every tag of the repositories, and what was pulled from
//!                                     them by digest (docker.io/library/*)
//! <registry>/<repository>:<tag>       the tags (docker.io/library/*:1.*)
//! ```
//!
//! A repository or tag pin keeps every manifest reachable from what it matches (an index,
//! its child manifests) and every blob those manifests reference. The registry is the name
//! clients use (`docker.io`, `ghcr.io`, `registry.example.com:5000`), and Docker Hub's official
//! images are `docker.io/library/<name>`, as the registry itself names them.

use std::fmt;

use super::glob;
use crate::oci::Digest;

/// One pin pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pin {
    /// `sha256:<hex or glob>`.
    Digest(String),
    /// `<registry>/<repository>[:<tag>]`.
    Repo {
        registry: String,
        repository: String,
        tag: Option<String>,
    },
}

fn is_glob(c: char) -> bool {
    c == '*' || c == '?'
}

impl Pin {
    /// Parses and checks a pattern; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Pin, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("sha256:") {
            if hex.is_empty()
                || hex.len() > 64
                || !hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c) || is_glob(c))
            {
                return Err(format!(
                    "{s:?}: a digest pin is sha256: and up to 64 lowercase hex digits (or * and ?)"
                ));
            }
            if hex.len() < 64 && !hex.contains(is_glob) {
                return Err(format!(
                    "{s:?} is not a whole digest; end a prefix with * to pin every digest it starts"
                ));
            }
            return Ok(Pin::Digest(s.to_string()));
        }
        let Some((registry, rest)) = s.split_once('/') else {
            return Err(format!(
                "{s:?}: give sha256:<hex>, <registry>/<repository> or <registry>/<repository>:<tag>"
            ));
        };
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:_".contains(c) || is_glob(c))
        {
            return Err(format!("{s:?}: {registry:?} is not a registry host name"));
        }
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (rest, None),
        };
        if repository.is_empty()
            || !repository.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c) || is_glob(c)
            })
        {
            return Err(format!(
                "{s:?}: {repository:?} is not a repository name (lowercase letters, digits, . _ - /, and * ?)"
            ));
        }
        if let Some(t) = tag
            && (t.is_empty()
                || t.len() > 128
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || is_glob(c)))
        {
            return Err(format!(
                "{s:?}: {t:?} is not a tag (letters, digits, . _ -, and * ?)"
            ));
        }
        // Spell the registry the way requests are recorded (docker.io for its aliases), unless
        // it is a glob, which is matched as written.
        let registry = if registry.contains(is_glob) {
            registry.to_ascii_lowercase()
        } else {
            crate::api::registry::canonical_registry(registry)
        };
        Ok(Pin::Repo {
            registry,
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
        })
    }

    /// The one digest this pin names, if it is a whole digest (no glob).
    pub fn exact_digest(&self) -> Option<Digest> {
        match self {
            Pin::Digest(p) => Digest::parse(p).ok(),
            Pin::Repo { .. } => None,
        }
    }

    /// Does this digest pin match `digest`? (Repository pins never match a digest.)
    pub fn matches_digest(&self, digest: &Digest) -> bool {
        match self {
            Pin::Digest(p) => glob::matches(p, &digest.to_string()),
            Pin::Repo { .. } => false,
        }
    }

    /// Does this pin match a tag of a repository?
    pub fn matches_tag(&self, registry: &str, repository: &str, tag: &str) -> bool {
        match self {
            Pin::Repo {
                registry: r,
                repository: p,
                tag: t,
            } => {
                glob::matches(r, registry)
                    && glob::matches(p, repository)
                    && t.as_ref().is_none_or(|t| glob::matches(t, tag))
            }
            Pin::Digest(_) => false,
        }
    }

    /// Does this pin match a whole repository (and so what was pulled from it by digest)?
    pub fn matches_repository(&self, registry: &str, repository: &str) -> bool {
        match self {
            Pin::Repo {
                registry: r,
                repository: p,
                tag: None,
            } => glob::matches(r, registry) && glob::matches(p, repository),
            _ => false,
        }
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pin::Digest(p) => f.write_str(p),
            Pin::Repo {
                registry,
                repository,
                tag: None,
            } => write!(f, "{registry}/{repository}"),
            Pin::Repo {
                registry,
                repository,
                tag: Some(t),
            } => write!(f, "{registry}/{repository}:{t}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(s: &str) -> Pin {
        Pin::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn the_three_forms_parse_and_print_back() {
        let d = Digest::of(b"x").to_string();
        for s in [
            d.as_str(),
            "sha256:4f1b*",
            "docker.io/library/alpine",
            "docker.io/library/*:1.*",
            "registry.example.com:5000/base/*",
            "*/team/app:v?",
        ] {
            assert_eq!(pin(s).to_string(), s);
        }
        assert_eq!(pin(&d).exact_digest(), Some(Digest::of(b"x")));
        assert_eq!(pin("sha256:4f*").exact_digest(), None);
        // Docker Hub's aliases are the name requests are recorded under.
        assert_eq!(
            pin("index.docker.io/library/alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
    }

    #[test]
    fn bad_patterns_say_why() {
        for bad in [
            "",
            "alpine",
            "sha256:",
            "sha256:XYZ",
            "sha256:abcd",
            "docker.io/",
            "/library/alpine",
            "docker.io/Library/alpine",
            "docker.io/library/alpine:",
            "docker.io/library/alpine:a/b",
            "docker.io/library/al pine",
            "dock er.io/library/alpine",
            "docker.io/library/alpine:x%2e",
        ] {
            assert!(Pin::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn matching() {
        let d = Digest::of(b"x");
        assert!(pin(&d.to_string()).matches_digest(&d));
        assert!(pin(&format!("{}*", &d.to_string()[..12])).matches_digest(&d));
        let prefix = pin(&format!("{}*", &d.to_string()[..20]));
        assert!(!prefix.matches_digest(&Digest::of(b"y")));
        assert!(!pin("docker.io/library/*").matches_digest(&d));

        let all = pin("docker.io/library/*");
        assert!(all.matches_tag("docker.io", "library/alpine", "3.20"));
        assert!(all.matches_repository("docker.io", "library/alpine"));
        assert!(!all.matches_tag("ghcr.io", "library/alpine", "3.20"));
        assert!(!all.matches_repository("docker.io", "team/app"));

        let tags = pin("docker.io/library/*:1.*");
        assert!(tags.matches_tag("docker.io", "library/nginx", "1.27"));
        assert!(!tags.matches_tag("docker.io", "library/nginx", "latest"));
        // A tag pin does not pin what was pulled by digest.
        assert!(!tags.matches_repository("docker.io", "library/nginx"));

        let ported = pin("registry.example.com:5000/base/*");
        assert!(ported.matches_tag("registry.example.com:5000", "base/a/b", "x"));
        assert!(!ported.matches_tag("registry.example.com", "base/a", "x"));
    }
}
