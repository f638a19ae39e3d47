//! Which registry a request means. Pure.
//!
//! Clients say it in three ways:
//! - containerd (a `hosts.toml` mirror) adds `?ns=<registry host>` to every request;
//! - a path like `/v2/ghcr.io/org/app/manifests/1` names it in the first component
//!   (`cistern:5000/ghcr.io/org/app:1` works with no client configuration);
//! - Docker's `registry-mirrors` and podman's `[[registry.mirror]]` send no registry at all:
//!   those requests take the default route.

use crate::error::{Error, ErrorKind, Result};
use crate::oci::RepoName;

/// Docker Hub's canonical name. Its other spellings all mean it.
pub const DOCKER_HUB: &str = "docker.io";

/// Normalizes a registry host as clients spell it: lowercase, Docker Hub's aliases folded
/// into `docker.io`, default ports dropped.
pub fn canonical_registry(host: &str) -> String {
    let h = host.trim().trim_end_matches('/').to_ascii_lowercase();
    let h = h.strip_suffix(":443").map(str::to_string).unwrap_or(h);
    match h.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            DOCKER_HUB.to_string()
        }
        _ => h,
    }
}

/// Could this string be a registry host (as opposed to a Docker Hub namespace)? The same rule
/// Docker uses: it contains a `.` or a `:`, or is `localhost`.
pub fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// A request's registry and the repository name within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `None`: the request named no registry; the default route applies.
    pub registry: Option<String>,
    pub name: RepoName,
}

/// Splits a request into registry and repository.
///
/// `is_known(registry)` says whether a registry is configured; only those (or, with
/// `any_registry`, anything that looks like a host) are taken from the path, so a Docker Hub
/// namespace is never mistaken for a registry.
pub fn target(
    ns: Option<&str>,
    name: &RepoName,
    is_known: impl Fn(&str) -> bool,
    any_registry: bool,
) -> Target {
    if let Some(ns) = ns.filter(|n| !n.trim().is_empty()) {
        return Target {
            registry: Some(canonical_registry(ns)),
            name: name.clone(),
        };
    }
    if let Some((first, rest)) = name.as_str().split_once('/') {
        let registry = canonical_registry(first);
        if (is_known(&registry) || (any_registry && looks_like_registry(first)))
            && let Ok(rest) = RepoName::parse(rest)
        {
            return Target {
                registry: Some(registry),
                name: rest,
            };
        }
    }
    Target {
        registry: None,
        name: name.clone(),
    }
}

/// The registry a name starts with, if it starts with one (by [`looks_like_registry`]).
/// Docker Hub repositories never do, so on a Docker Hub route such a name asks for a registry
/// this mirror does not serve, not for a Docker Hub repository.
pub fn leading_registry(name: &RepoName) -> Option<&str> {
    let (first, _) = name.as_str().split_once('/')?;
    looks_like_registry(first).then_some(first)
}

/// The name as the registry stores it: Docker Hub keeps official images under `library/`,
/// and clients that talk to cistern directly may leave it out. A name that the prefix takes
/// past the grammar's length limit is `NAME_INVALID`: it cannot exist on Docker Hub.
pub fn upstream_name(registry: &str, name: &RepoName) -> Result<RepoName> {
    if registry == DOCKER_HUB && !name.as_str().contains('/') {
        RepoName::parse(&format!("library/{name}"))
            .map_err(|e| Error::new(ErrorKind::NameInvalid, format!("library/{name}: {e}")))
    } else {
        Ok(name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    fn known(r: &str) -> bool {
        matches!(r, "docker.io" | "ghcr.io" | "localhost:5001")
    }

    #[test]
    fn ns_wins() {
        let t = target(Some("ghcr.io"), &n("org/app"), known, false);
        assert_eq!(t.registry.as_deref(), Some("ghcr.io"));
        assert_eq!(t.name, n("org/app"));
        let t = target(Some("registry-1.docker.io"), &n("library/x"), known, false);
        assert_eq!(t.registry.as_deref(), Some("docker.io"));
        // ns names the registry even when it is not configured: the caller decides (404).
        let t = target(Some("quay.io"), &n("a/b"), known, false);
        assert_eq!(t.registry.as_deref(), Some("quay.io"));
    }

    #[test]
    fn path_prefix_for_known_registries_only() {
        let t = target(None, &n("ghcr.io/org/app"), known, false);
        assert_eq!(t.registry.as_deref(), Some("ghcr.io"));
        assert_eq!(t.name, n("org/app"));
        let t = target(None, &n("docker.io/library/nginx"), known, false);
        assert_eq!(t.registry.as_deref(), Some("docker.io"));
        assert_eq!(t.name, n("library/nginx"));
        // Not configured, and any_registry off: an ordinary name on the default route.
        let t = target(None, &n("quay.io/org/app"), known, false);
        assert_eq!(t.registry, None);
        assert_eq!(t.name, n("quay.io/org/app"));
        let t = target(None, &n("quay.io/org/app"), known, true);
        assert_eq!(t.registry.as_deref(), Some("quay.io"));
        // A Docker Hub namespace is never a registry.
        let t = target(None, &n("library/nginx"), known, true);
        assert_eq!(t.registry, None);
        // A registry name alone is a repository name, not a registry with an empty repo.
        let t = target(None, &n("ghcr.io"), known, true);
        assert_eq!(t.registry, None);
    }

    #[test]
    fn leading_registries() {
        assert_eq!(leading_registry(&n("ghcr.io/org/app")), Some("ghcr.io"));
        assert_eq!(leading_registry(&n("localhost/app")), Some("localhost"));
        assert_eq!(leading_registry(&n("library/nginx")), None);
        assert_eq!(leading_registry(&n("nginx")), None);
        assert_eq!(leading_registry(&n("org/v1.2")), None);
    }

    #[test]
    fn docker_hub_spellings() {
        assert_eq!(canonical_registry("Index.Docker.io"), "docker.io");
        assert_eq!(canonical_registry("registry-1.docker.io:443"), "docker.io");
        assert_eq!(canonical_registry("ghcr.io"), "ghcr.io");
        assert_eq!(canonical_registry("localhost:5001"), "localhost:5001");
    }

    #[test]
    fn library_prefix_only_on_docker_hub() {
        let up = |r: &str, name: &str| upstream_name(r, &n(name)).unwrap();
        assert_eq!(up("docker.io", "nginx"), n("library/nginx"));
        assert_eq!(up("docker.io", "org/app"), n("org/app"));
        assert_eq!(up("ghcr.io", "nginx"), n("nginx"));
    }

    /// A valid name with no slash that `library/` takes past 255 characters used to panic
    /// the connection's task.
    #[test]
    fn library_prefix_past_the_length_limit_is_name_invalid() {
        let long = "a".repeat(250);
        let e = upstream_name("docker.io", &n(&long)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NameInvalid);
        assert_eq!(upstream_name("ghcr.io", &n(&long)).unwrap(), n(&long));
    }
}
