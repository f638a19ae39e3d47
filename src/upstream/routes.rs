//! The routing table: registry name → an ordered list of upstreams.
//!
//! Built once from the config. With `proxy_any_registry`, routes for registries the config
//! does not name are made on demand (`on_demand`: `https://<registry>`, default settings, the
//! most recently used few kept).

use std::collections::HashMap;
use std::sync::Arc;

use super::bad_sources::BadSources;
use super::client::Upstream;
use super::on_demand::OnDemand;
use crate::api::registry::{self, Target};
use crate::clock::Clock;
use crate::config::{ColdRanges, Config};
use crate::error::{Error, ErrorKind, Result};
use crate::oci::RepoName;
use crate::policy::freshness::Policy;

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
    by_registry: HashMap<String, Arc<Route>>,
    default: Option<Arc<Route>>,
    /// With `proxy_any_registry`: the routes made for registries no route names.
    on_demand: Option<OnDemand>,
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
        let on_demand = if config.proxy_any_registry {
            Some(OnDemand::new(
                config.cache.freshness(),
                config.cache.cold_ranges,
                bad_sources,
                clock.clone(),
            )?)
        } else {
            None
        };
        Ok(Routes {
            by_registry,
            default,
            on_demand,
        })
    }

    /// Every upstream once (one is shared by every route that lists it), by name: those of
    /// the config and those of routes made on demand. The default route is also in
    /// `by_registry`, and a route's `tag_upstreams` are some of its `upstreams`.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        let on_demand = self.on_demand.as_ref().map(OnDemand::routes);
        let mut all: Vec<Arc<Upstream>> = Vec::new();
        for route in self.by_registry.values().chain(on_demand.iter().flatten()) {
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
            self.on_demand.is_some(),
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
            Some(r) => match (self.by_registry.get(&r), &self.on_demand) {
                (Some(route), _) => route.clone(),
                (None, Some(on_demand)) => on_demand.route(&r)?,
                (None, None) => return Err(unserved(&r)),
            },
        };
        let name = registry::upstream_name(&route.registry, &name)?;
        Ok(Routed { route, name })
    }
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
    use crate::config::testing::extremes;

    /// Routes and upstreams build from the largest settings a config may hold (timeouts of
    /// centuries, the most request slots), and their breakers count failures without
    /// overflowing.
    #[test]
    fn extreme_settings_build_working_routes() {
        let config = Config::from_toml(&extremes()).unwrap();
        let routes = Routes::from_config(&config, &Clock::system()).unwrap();
        let all = routes.upstreams();
        assert_eq!(all.len(), 1);
        for u in all {
            for _ in 0..3 {
                u.record_failure(&"down");
            }
            assert!(u.admit(), "4294967295 failures open the breaker, not 3");
            assert!(!u.stats().circuit_open);
        }
    }
}
