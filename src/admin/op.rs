//! The admin operations as values, and their HTTP form both ways: the admin API parses a
//! request into an [`Op`] ([`Op::from_http`]), the CLI turns an [`Op`] into the request for a
//! running server ([`Op::to_http`]). Pure: no IO.
//!
//! ```text
//! GET    /admin/stats                               Stats
//! GET    /admin/pins                                Pins
//! PUT    /admin/pins?pattern=<pattern>              Pin      (also PUT /admin/pins/<digest>)
//! DELETE /admin/pins?pattern=<pattern>              Unpin    (also DELETE /admin/pins/<digest>)
//! DELETE /admin/blobs/<digest>                      PurgeBlob
//! DELETE /admin/manifests/<digest>                  PurgeManifest
//! DELETE /admin/repositories/<registry>/<repo>      Purge(Repository)
//! DELETE /admin/tags/<registry>/<repo>:<tag>        Purge(Tag)
//! ```
//!
//! Every path component is checked against the OCI grammars: a bad one is a 400.

use http::Method;

use crate::cache::pins::Pin;
use crate::cache::refs::{RepoKey, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::name::check_registry;
use crate::oci::{Digest, RepoName, Tag};

/// One admin operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Stats,
    Pins,
    Pin(Pin),
    Unpin(Pin),
    PurgeBlob(Digest),
    PurgeManifest(Digest),
    /// A repository or a tag, and what nothing else uses.
    Purge(Target),
}

impl Op {
    /// The operation an admin API request asks for. `Ok(None)`: not an admin operation
    /// (e.g. `/metrics`, or an unknown path).
    pub fn from_http(method: &Method, path: &str, query: Option<&str>) -> Result<Option<Op>> {
        let op = if path == "/admin/stats" {
            expect(method, &[Method::GET])?;
            Op::Stats
        } else if path == "/admin/pins" {
            expect(method, &[Method::GET, Method::PUT, Method::DELETE])?;
            if *method == Method::GET {
                Op::Pins
            } else {
                let pattern = query_param(query, "pattern").ok_or_else(|| {
                    Error::new(
                        ErrorKind::NameInvalid,
                        "give the pin pattern as ?pattern=<sha256:…|registry/repo[:tag]>",
                    )
                })?;
                pin_op(method, parse_pin(&pattern)?)
            }
        } else if let Some(d) = path.strip_prefix("/admin/pins/") {
            let pin = Pin::Digest(parse_digest(d)?.to_string());
            expect(method, &[Method::PUT, Method::DELETE])?;
            pin_op(method, pin)
        } else if let Some(d) = path.strip_prefix("/admin/blobs/") {
            let d = parse_digest(d)?;
            expect(method, &[Method::DELETE])?;
            Op::PurgeBlob(d)
        } else if let Some(d) = path.strip_prefix("/admin/manifests/") {
            let d = parse_digest(d)?;
            expect(method, &[Method::DELETE])?;
            Op::PurgeManifest(d)
        } else if let Some(rest) = path.strip_prefix("/admin/repositories/") {
            let target = repository_target(rest)?;
            expect(method, &[Method::DELETE])?;
            Op::Purge(target)
        } else if let Some(rest) = path.strip_prefix("/admin/tags/") {
            let target = tag_target(rest)?;
            expect(method, &[Method::DELETE])?;
            Op::Purge(target)
        } else {
            return Ok(None);
        };
        Ok(Some(op))
    }

    /// The admin API request for this operation: method, and path with query, relative to
    /// the API's base URL.
    pub fn to_http(&self) -> (Method, String) {
        let pin = |p: &Pin| {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("pattern", &p.to_string())
                .finish();
            format!("admin/pins?{query}")
        };
        match self {
            Op::Stats => (Method::GET, "admin/stats".into()),
            Op::Pins => (Method::GET, "admin/pins".into()),
            Op::Pin(p) => (Method::PUT, pin(p)),
            Op::Unpin(p) => (Method::DELETE, pin(p)),
            Op::PurgeBlob(d) => (Method::DELETE, format!("admin/blobs/{d}")),
            Op::PurgeManifest(d) => (Method::DELETE, format!("admin/manifests/{d}")),
            Op::Purge(Target::Repository(k)) => (Method::DELETE, format!("admin/repositories/{k}")),
            Op::Purge(Target::Tag(k, t)) => (Method::DELETE, format!("admin/tags/{k}:{t}")),
        }
    }
}

fn pin_op(method: &Method, pin: Pin) -> Op {
    if *method == Method::PUT {
        Op::Pin(pin)
    } else {
        Op::Unpin(pin)
    }
}

/// `<registry>/<repository>`, each checked against its grammar: a repository purge's target.
pub fn repository_target(s: &str) -> Result<Target> {
    Ok(Target::Repository(repo_key(s)?))
}

/// `<registry>/<repository>:<tag>`, each checked against its grammar: a tag purge's target.
pub fn tag_target(s: &str) -> Result<Target> {
    let (repo, tag) = s.rsplit_once(':').ok_or_else(|| {
        Error::new(
            ErrorKind::TagInvalid,
            format!("{s:?}: give <registry>/<repository>:<tag>"),
        )
    })?;
    let tag = Tag::parse(tag).map_err(|e| Error::new(ErrorKind::TagInvalid, e.to_string()))?;
    Ok(Target::Tag(repo_key(repo)?, tag.to_string()))
}

/// A pin pattern, as a request error if it is not one.
pub fn parse_pin(pattern: &str) -> Result<Pin> {
    Pin::parse(pattern).map_err(|e| Error::new(ErrorKind::NameInvalid, e))
}

/// A digest, as a request error if it is not one.
pub fn parse_digest(s: &str) -> Result<Digest> {
    Digest::parse(s).map_err(|e| Error::new(ErrorKind::DigestInvalid, e.to_string()))
}

fn repo_key(s: &str) -> Result<RepoKey> {
    let (registry, repository) = s.split_once('/').ok_or_else(|| {
        Error::new(
            ErrorKind::NameInvalid,
            format!("{s:?}: give <registry>/<repository>"),
        )
    })?;
    let registry = crate::api::registry::canonical_registry(registry);
    check_registry(&registry)
        .map_err(|e| Error::new(ErrorKind::NameInvalid, format!("registry: {e}")))?;
    let repository = RepoName::parse(repository)
        .map_err(|e| Error::new(ErrorKind::NameInvalid, e.to_string()))?;
    Ok(RepoKey {
        registry,
        repository: repository.to_string(),
    })
}

/// A query parameter, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn expect(method: &Method, allowed: &[Method]) -> Result<()> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("{method} is not allowed here"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked_against_the_grammars() {
        assert_eq!(
            repository_target("index.docker.io/library/alpine")
                .unwrap()
                .to_string(),
            "docker.io/library/alpine"
        );
        assert_eq!(
            tag_target("ghcr.io/org/app:1.2").unwrap().to_string(),
            "ghcr.io/org/app:1.2"
        );
        for bad in ["no-repository", "docker.io/X", "docker.io/a/../b", ""] {
            assert!(repository_target(bad).is_err(), "{bad} was accepted");
        }
        for bad in ["docker.io/app", "docker.io/app:", "docker.io/app:a b"] {
            assert!(tag_target(bad).is_err(), "{bad} was accepted");
        }
    }

    /// What the CLI sends is what the API understands, for every operation.
    #[test]
    fn http_form_round_trips() {
        let d = Digest::of(b"x");
        let ops = [
            Op::Stats,
            Op::Pins,
            Op::Pin(parse_pin("docker.io/library/*:1.*").unwrap()),
            Op::Unpin(parse_pin(&d.to_string()).unwrap()),
            Op::PurgeBlob(d.clone()),
            Op::PurgeManifest(d.clone()),
            Op::Purge(repository_target("ghcr.io/org/app").unwrap()),
            Op::Purge(tag_target("docker.io/library/alpine:3.20").unwrap()),
        ];
        for op in ops {
            let (method, path_query) = op.to_http();
            let (path, query) = match path_query.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (path_query.clone(), None),
            };
            let back = Op::from_http(&method, &format!("/{path}"), query.as_deref()).unwrap();
            assert_eq!(back, Some(op), "{method} {path_query}");
        }
    }

    #[test]
    fn requests_are_checked() {
        let from = |m: Method, p: &str, q: Option<&str>| Op::from_http(&m, p, q);
        assert_eq!(from(Method::GET, "/metrics", None).unwrap(), None);
        assert_eq!(from(Method::GET, "/admin/nothing", None).unwrap(), None);
        let kind = |r: Result<Option<Op>>| r.unwrap_err().kind;
        assert_eq!(
            kind(from(Method::POST, "/admin/stats", None)),
            ErrorKind::Unsupported
        );
        assert_eq!(
            kind(from(Method::GET, "/admin/blobs/sha256:abc", None)),
            ErrorKind::DigestInvalid
        );
        assert_eq!(
            kind(from(Method::PUT, "/admin/pins", None)),
            ErrorKind::NameInvalid
        );
        assert_eq!(
            kind(from(Method::PUT, "/admin/pins", Some("pattern=alpine"))),
            ErrorKind::NameInvalid
        );
        assert_eq!(
            kind(from(Method::DELETE, "/admin/tags/docker.io/app", None)),
            ErrorKind::TagInvalid
        );
        // A `/` in the pattern may be percent-encoded or not.
        assert_eq!(
            from(
                Method::PUT,
                "/admin/pins",
                Some("pattern=docker.io%2Flibrary%2F*")
            )
            .unwrap(),
            Some(Op::Pin(parse_pin("docker.io/library/*").unwrap()))
        );
    }
}
