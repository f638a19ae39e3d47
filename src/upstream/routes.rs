//! The routing table: registry name → an ordered list of upstreams.
//!
//! Built once from the config. With `proxy_any_registry`, routes for registries the config
//! does not name are made on demand (`https://<registry>`, default settings) and kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::bad_sources::BadSources;
use super::client::Upstream;
use crate::api::registry::{self, Target};
use crate::clock::Clock;
use crate::config::{ColdRanges, Config, UpstreamConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::RepoName;
use crate::policy::freshness::Policy;

/// Most registries `proxy_any_registry` will make routes for; past it, requests for new ones
/// are refused rather than growing without bound on client input.
const MAX_DYNAMIC_ROUTES: usize = 256;

/// One registry and the upstreams that serve it.
pub struct Route {
    /// Canonical registry name (`docker.io`, `ghcr.io`, …).
    pub registry: String,
    /// Tried in order for anything fetched by digest (verified, so any source will do).
    pub upstreams: Vec<Arc<Upstream>>,
    /// Tried in order to resolve tags: the upstreams the config trusts for them.
    pub tag_upstreams: Vec<Arc<Upstream>>,
    /// How long this registry's tag answers are trusted.
    pub freshness: Policy,
    /// Upstreams that recently sent wrong bytes for a blob (shared by every route, as the
    /// upstreams are); `select` tries them last for that blob.
    pub bad_sources: Arc<BadSources>,
    /// Some upstream logs in, so the route may reach private repositories: `[access]`
    /// opens it to anonymous clients only by a pattern naming its registry.
    pub credentialed: bool,
    /// How a `Range` request for a blob not cached yet is answered (`cold_ranges`).
    pub cold_ranges: ColdRanges,
}

pub struct Routes {
    /// Freshness for routes made on demand (`proxy_any_registry`): the `[cache]` settings.
    default_freshness: Policy,
    /// `cache.cold_ranges`, for routes made on demand.
    default_cold_ranges: ColdRanges,
    by_registry: HashMap<String, Arc<Route>>,
    default: Option<Arc<Route>>,
    any_registry: bool,
    dynamic: Mutex<HashMap<String, Arc<Route>>>,
    bad_sources: Arc<BadSources>,
    /// The server's clock, for the upstreams of routes made on demand.
    clock: Clock,
}

/// A request's route, and the repository name as that registry knows it.
pub struct Routed {
    pub route: Arc<Route>,
    pub name: RepoName,
}

impl Routes {
    /// The routes of `config`, their upstreams' breakers and tokens timed by `clock`.
    pub fn from_config(config: &Config, clock: &Clock) -> anyhow::Result<Routes> {
        // One `Upstream` per name, shared by every route that lists it: one breaker, one
        // token cache and one concurrency limit per real upstream.
        let mut built: HashMap<String, Arc<Upstream>> = HashMap::new();
        let bad_sources = Arc::new(BadSources::new());
        let mut by_registry = HashMap::new();
        let mut default = None;
        for r in config.resolved_routes() {
            let mut upstreams = Vec::new();
            for (name, settings) in &r.upstreams {
                let u = match built.get(name) {
                    Some(u) => u.clone(),
                    None => {
                        // Errors name the table the user wrote: `[upstream]` for the
                        // one-upstream shorthand.
                        let table = if config.routes.is_empty() {
                            "upstream".to_string()
                        } else {
                            format!("upstreams.{name}")
                        };
                        let u = Upstream::configured(name, &table, settings, clock.clone())?;
                        let u = Arc::new(u);
                        built.insert(name.clone(), u.clone());
                        u
                    }
                };
                upstreams.push(u);
            }
            let tag_upstreams = upstreams
                .iter()
                .filter(|u| r.tags_from.iter().any(|t| t == u.name()))
                .cloned()
                .collect();
            let route = Arc::new(Route {
                credentialed: r.upstreams.iter().any(|(_, u)| u.has_credentials()),
                registry: r.registry.clone(),
                upstreams,
                tag_upstreams,
                freshness: r.cache.freshness(),
                bad_sources: bad_sources.clone(),
                cold_ranges: r.cache.cold_ranges,
            });
            if r.default {
                default = Some(route.clone());
            }
            by_registry.insert(r.registry, route);
        }
        Ok(Routes {
            default_freshness: config.cache.freshness(),
            default_cold_ranges: config.cache.cold_ranges,
            by_registry,
            default,
            any_registry: config.proxy_any_registry,
            dynamic: Mutex::default(),
            bad_sources,
            clock: clock.clone(),
        })
    }

    /// Every upstream once (one is shared by every route that lists it), by name: those of
    /// the config and those of routes made on demand. The default route is also in
    /// `by_registry`, and a route's `tag_upstreams` are some of its `upstreams`.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let dynamic = self.dynamic.lock().expect("route map poisoned");
        let mut all: Vec<Arc<Upstream>> = Vec::new();
        for route in self.by_registry.values().chain(dynamic.values()) {
            for u in &route.upstreams {
                if !all.iter().any(|seen| Arc::ptr_eq(seen, u)) {
                    all.push(u.clone());
                }
            }
        }
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Picks the route for a request (see `api::registry::target` for the rules).
    pub fn resolve(&self, ns: Option<&str>, name: &RepoName) -> Result<Routed> {
        let Target { registry, name } = registry::target(
            ns,
            name,
            |r| self.by_registry.contains_key(r),
            self.any_registry,
        );
        let route = match registry {
            None => {
                let route = self.default.clone().ok_or_else(|| {
                    Error::new(
                        ErrorKind::NameUnknown,
                        format!(
                            "{name}: the request names no registry and this mirror has no default route"
                        ),
                    )
                })?;
                // `ghcr.io/org/app` on the Docker Hub route names a registry with no route,
                // not a Docker Hub repository: answer as for any unserved registry.
                if route.registry == registry::DOCKER_HUB
                    && let Some(r) = registry::leading_registry(&name)
                {
                    return Err(unserved(r));
                }
                route
            }
            Some(r) => match self.by_registry.get(&r) {
                Some(route) => route.clone(),
                None if self.any_registry => self.dynamic_route(&r)?,
                None => return Err(unserved(&r)),
            },
        };
        let name = registry::upstream_name(&route.registry, &name)?;
        Ok(Routed { route, name })
    }

    fn dynamic_route(&self, registry: &str) -> Result<Arc<Route>> {
        if !is_host_port(registry) {
            return Err(Error::new(
                ErrorKind::NameInvalid,
                format!("{registry:?} is not a registry host name"),
            ));
        }
        let mut dynamic = self.dynamic.lock().expect("route map poisoned");
        if let Some(route) = dynamic.get(registry) {
            return Ok(route.clone());
        }
        if dynamic.len() >= MAX_DYNAMIC_ROUTES {
            return Err(Error::new(
                ErrorKind::NameUnknown,
                format!("registry {registry:?}: too many registries proxied on demand"),
            ));
        }
        let upstream = Upstream::with_clock(
            registry,
            &UpstreamConfig::new(format!("https://{registry}")),
            self.clock.clone(),
        )
        .map_err(|e| Error::new(ErrorKind::NameInvalid, e.to_string()))?;
        let upstream = Arc::new(upstream);
        let route = Arc::new(Route {
            registry: registry.to_string(),
            upstreams: vec![upstream.clone()],
            tag_upstreams: vec![upstream],
            freshness: self.default_freshness.clone(),
            bad_sources: self.bad_sources.clone(),
            credentialed: false,
            cold_ranges: self.default_cold_ranges,
        });
        tracing::info!(
            registry,
            "proxying a registry on demand (proxy_any_registry)"
        );
        dynamic.insert(registry.to_string(), route.clone());
        Ok(route)
    }
}

/// `host` or `host:port`, with a DNS-style host: the only registry names accepted from
/// clients.
fn is_host_port(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

/// The answer for a registry this mirror has no route for.
fn unserved(registry: &str) -> Error {
    Error::new(
        ErrorKind::NameUnknown,
        format!("registry {registry:?} is not served by this mirror (no route for it)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_names() {
        for ok in [
            "ghcr.io",
            "quay.io",
            "localhost:5000",
            "registry.example.com:443",
        ] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a..b",
            "-a.io",
            "a.io:0",
            "a.io:99999",
            "a.io:x",
            "a b",
            "ex%2e.io",
            "[::1]",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }
}
