//! (method, path, query) → [`Route`]. OCI repository names contain slashes, so the path is
//! matched from its end: the last `/manifests/`, `/blobs/` or `/tags/list` decides.
//!
//! The path is taken exactly as sent, without percent-decoding: the name and reference
//! grammars contain no `%`, so an encoded `..` or `/` can only be rejected, never decoded into
//! something that reaches the file system.

use http::Method;

use crate::error::{Error, ErrorKind};
use crate::oci::{Digest, Reference, RepoName};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check every client starts with.
    Ping,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    TagsList {
        name: RepoName,
        query: TagsQuery,
    },
}

/// Pagination of `tags/list`, passed through to the upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagsQuery {
    pub n: Option<u32>,
    pub last: Option<String>,
}

impl TagsQuery {
    /// The query string to send upstream (empty when there is none).
    pub fn to_query_string(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        if let Some(n) = self.n {
            s.append_pair("n", &n.to_string());
        }
        if let Some(last) = &self.last {
            s.append_pair("last", last);
        }
        s.finish()
    }
}

/// The request's parsed query parameters that cistern cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// containerd's `?ns=<registry host>`: which registry the client meant.
    pub ns: Option<String>,
    pub tags: TagsQuery,
}

pub fn parse_query(query: Option<&str>) -> Result<Query, Error> {
    let mut q = Query::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "ns" => q.ns = Some(v.into_owned()),
            "n" => {
                let n = v.parse::<u32>().map_err(|_| {
                    Error::new(
                        ErrorKind::Unsupported,
                        format!("query parameter n={v:?} is not a number"),
                    )
                })?;
                q.tags.n = Some(n);
            }
            "last" => q.tags.last = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(q)
}

/// Maps a request to a route. Anything that is not a read is `UNSUPPORTED`: cistern is a
/// pull-only mirror.
pub fn route(method: &Method, path: &str) -> Result<Route, Error> {
    let read = method == Method::GET || method == Method::HEAD;
    let rest = match path.strip_prefix("/v2") {
        Some("") | Some("/") => {
            return if read {
                Ok(Route::Ping)
            } else {
                Err(unsupported(method, path))
            };
        }
        Some(rest) if rest.starts_with('/') => &rest[1..],
        _ => return Err(not_found(path)),
    };

    if let Some(name) = rest.strip_suffix("/tags/list") {
        let name = parse_name(name)?;
        return if read {
            Ok(Route::TagsList {
                name,
                query: TagsQuery::default(),
            })
        } else {
            Err(unsupported(method, path))
        };
    }
    // Uploads (`/blobs/uploads/…`) are writes, whatever the method.
    if let Some(i) = rest.rfind("/blobs/uploads") {
        let tail = &rest[i + "/blobs/uploads".len()..];
        if tail.is_empty() || tail.starts_with('/') {
            return Err(unsupported(method, path));
        }
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        if !read {
            return Err(unsupported(method, path));
        }
        let name = parse_name(name)?;
        let reference = Reference::parse(reference).map_err(|e| match e {
            crate::oci::name::ReferenceError::Tag(t) => {
                Error::new(ErrorKind::TagInvalid, t.to_string())
            }
            crate::oci::name::ReferenceError::Digest(d) => {
                Error::new(ErrorKind::DigestInvalid, d.to_string())
            }
        })?;
        return Ok(Route::Manifest { name, reference });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        if !read {
            return Err(unsupported(method, path));
        }
        let name = parse_name(name)?;
        let digest = Digest::parse(digest)
            .map_err(|e| Error::new(ErrorKind::DigestInvalid, e.to_string()))?;
        return Ok(Route::Blob { name, digest });
    }
    if !read {
        return Err(unsupported(method, path));
    }
    Err(not_found(path))
}

fn parse_name(name: &str) -> Result<RepoName, Error> {
    RepoName::parse(name).map_err(|e| Error::new(ErrorKind::NameInvalid, e.to_string()))
}

fn unsupported(method: &Method, path: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "{method} {} is not supported: cistern is a read-only pull-through mirror",
            short(path)
        ),
    )
}

fn not_found(path: &str) -> Error {
    Error::new(
        ErrorKind::NameUnknown,
        format!("{} is not an OCI distribution endpoint", short(path)),
    )
}

fn short(path: &str) -> String {
    path.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn get(path: &str) -> Result<Route, Error> {
        route(&Method::GET, path)
    }

    fn kind(r: Result<Route, Error>) -> ErrorKind {
        r.unwrap_err().kind
    }

    #[test]
    fn ping() {
        assert_eq!(get("/v2/").unwrap(), Route::Ping);
        assert_eq!(get("/v2").unwrap(), Route::Ping);
        assert_eq!(route(&Method::HEAD, "/v2/").unwrap(), Route::Ping);
    }

    #[test]
    fn manifests_and_blobs_with_slashes_in_names() {
        match get("/v2/library/nginx/manifests/1.25").unwrap() {
            Route::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "library/nginx");
                assert_eq!(reference.to_string(), "1.25");
            }
            other => panic!("{other:?}"),
        }
        match get(&format!("/v2/a/blobs/b/manifests/{D}")).unwrap() {
            Route::Manifest { name, reference } => {
                assert_eq!(name.as_str(), "a/blobs/b");
                assert!(matches!(reference, Reference::Digest(_)));
            }
            other => panic!("{other:?}"),
        }
        match get(&format!("/v2/manifests/blobs/{D}")).unwrap() {
            Route::Blob { name, digest } => {
                assert_eq!(name.as_str(), "manifests");
                assert_eq!(digest.to_string(), D);
            }
            other => panic!("{other:?}"),
        }
        match get("/v2/org/app/tags/list").unwrap() {
            Route::TagsList { name, .. } => assert_eq!(name.as_str(), "org/app"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn writes_are_unsupported() {
        for (m, p) in [
            (Method::POST, "/v2/a/blobs/uploads/".to_string()),
            (Method::PATCH, "/v2/a/blobs/uploads/123".to_string()),
            (Method::PUT, "/v2/a/manifests/latest".to_string()),
            (Method::DELETE, format!("/v2/a/blobs/{D}")),
            (Method::DELETE, format!("/v2/a/manifests/{D}")),
            (Method::GET, "/v2/a/blobs/uploads/123".to_string()),
            (Method::POST, "/v2/".to_string()),
        ] {
            assert_eq!(kind(route(&m, &p)), ErrorKind::Unsupported, "{m} {p}");
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        assert_eq!(kind(get("/v2/../etc/manifests/x")), ErrorKind::NameInvalid);
        assert_eq!(
            kind(get("/v2/a/%2e%2e/manifests/x")),
            ErrorKind::NameInvalid
        );
        assert_eq!(kind(get("/v2//manifests/x")), ErrorKind::NameInvalid);
        assert_eq!(kind(get("/v2/a/manifests/")), ErrorKind::TagInvalid);
        assert_eq!(kind(get("/v2/a/manifests/../x")), ErrorKind::TagInvalid);
        assert_eq!(
            kind(get("/v2/a/manifests/sha256:zz")),
            ErrorKind::DigestInvalid
        );
        assert_eq!(
            kind(get("/v2/a/blobs/sha256:../../x")),
            ErrorKind::DigestInvalid
        );
        assert_eq!(kind(get("/v2/a/blobs/latest")), ErrorKind::DigestInvalid);
        assert_eq!(
            kind(get(&format!("/v2/A/blobs/{D}"))),
            ErrorKind::NameInvalid
        );
        assert_eq!(kind(get("/v3/")), ErrorKind::NameUnknown);
        assert_eq!(kind(get("/")), ErrorKind::NameUnknown);
        assert_eq!(kind(get("/v2/a/b")), ErrorKind::NameUnknown);
        assert_eq!(kind(get("/v2x")), ErrorKind::NameUnknown);
    }

    #[test]
    fn query() {
        let q = parse_query(Some("ns=docker.io&n=10&last=v1%2B2&other=x")).unwrap();
        assert_eq!(q.ns.as_deref(), Some("docker.io"));
        assert_eq!(q.tags.n, Some(10));
        assert_eq!(q.tags.last.as_deref(), Some("v1+2"));
        assert_eq!(q.tags.to_query_string(), "n=10&last=v1%2B2");
        assert!(parse_query(Some("n=x")).is_err());
        assert_eq!(parse_query(None).unwrap(), Query::default());
    }
}
