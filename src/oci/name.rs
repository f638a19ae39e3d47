//! Repository names and manifest references, checked against the OCI Distribution grammars.

use std::fmt;

use super::digest::{Digest, DigestError};

/// Longest repository name accepted; distribution uses the same bound.
pub const MAX_NAME_LEN: usize = 255;

/// A repository name such as `library/nginx`: one or more `/`-separated path components,
/// each matching `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name {0:?} does not match the OCI name grammar")]
    Invalid(String),
}

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        if !s.split('/').all(is_path_component) {
            return Err(NameError::Invalid(s.chars().take(80).collect()));
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, without a regex engine.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // A run of alphanumerics.
        let start = i;
        while b.get(i).is_some_and(alnum) {
            i += 1;
        }
        if i == start {
            return false;
        }
        let Some(&separator) = b.get(i) else {
            return true;
        };
        // A separator: ".", "_", "__" or one or more "-".
        match separator {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if b.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks a registry host as clients name it: DNS labels (`[a-z0-9]`, inner `-`) joined by
/// `.`, or `localhost`, with an optional `:port`. Lowercase only (canonicalize first).
pub fn check_registry(s: &str) -> Result<(), NameError> {
    let invalid = || NameError::Invalid(s.chars().take(80).collect());
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid());
    }
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'-')
            && b.first() != Some(&b'-')
            && b.last() != Some(&b'-')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(invalid())
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tag {0:?} does not match the OCI tag grammar")]
pub struct TagError(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, TagError> {
        let ok = match s.as_bytes().split_first() {
            Some((&first, rest)) => {
                s.len() <= 128
                    && (first.is_ascii_alphanumeric() || first == b'_')
                    && rest
                        .iter()
                        .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
            }
            None => false,
        };
        if ok {
            Ok(Tag(s.to_string()))
        } else {
            Err(TagError(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What a manifest request names: a tag (mutable) or a digest (immutable, verifiable).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl Reference {
    /// A reference containing `:` is a digest (tags cannot contain one); anything else a tag.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            Ok(Reference::Tag(Tag::parse(s)?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_real_names() {
        for ok in [
            "nginx",
            "library/nginx",
            "a/b/c/d",
            "my-org/my.app_v2",
            "a__b",
            "a---b",
            "0",
            "ghcr.io/org/app",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long = "a".repeat(256);
        for bad in [
            "",
            "/",
            "a/",
            "/a",
            "a//b",
            "..",
            "a/../b",
            "a/./b",
            "A",
            "a___b",
            "a_-b",
            "-a",
            "a-",
            "a.",
            ".a",
            "a%2e%2e",
            "a%2fb",
            "a\0b",
            "a b",
            "a\\b",
            long.as_str(),
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn registries() {
        for ok in [
            "docker.io",
            "ghcr.io",
            "localhost",
            "127.0.0.1:5000",
            "a-b.example.com:443",
        ] {
            assert!(check_registry(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Docker.io",
            "a..b",
            ".a",
            "a.",
            "-a.io",
            "a-.io",
            "a.io:",
            "a.io:x",
            "a.io:123456",
            "a/b",
            "a%2fb",
            "..",
            "a b",
            "a\0b",
        ] {
            assert!(check_registry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["latest", "1.25.3-alpine", "_x", "A_b.c-d"] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(129);
        for bad in ["", ".x", "-x", "a/b", "a:b", "..", long.as_str(), "a\0"] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "ab".repeat(32));
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(matches!(
            Reference::parse("sha256:zz"),
            Err(ReferenceError::Digest(_))
        ));
    }
}
