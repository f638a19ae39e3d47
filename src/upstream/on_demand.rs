//! Routes made on demand for registries the config does not name (`proxy_any_registry`):
//! `https://<registry>` with default settings.
//!
//! Clients choose these registries, so the set is bounded: at most [`MAX_ON_DEMAND_ROUTES`]
//! are kept, and making one more drops the least recently used. Configured routes are not
//! in this set and are never dropped. A dropped route lives on in the requests that hold it
//! (its `Arc`), so they finish; the next request for its registry makes a fresh route, with
//! a fresh breaker and token cache.
//!
//! Making a route takes no lock: the map's lock is held only to look up, and to insert what
//! was made (if two requests made the same registry's route at once, the first inserted wins
//! and the other is dropped). All these upstreams share one HTTP client, built with the
//! table, since building one (loading the TLS roots) is the costly part.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::bad_sources::BadSources;
use super::client::Upstream;
use super::routes::Route;
use super::transport::http_client;
use crate::clock::Clock;
use crate::config::{ColdRanges, UpstreamConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::policy::freshness::Policy;

/// Most routes kept for registries made on demand; making one more drops the least recently
/// used. Each holds an upstream (breaker, token cache, request slots), a few KiB.
pub const MAX_ON_DEMAND_ROUTES: usize = 256;

pub(super) struct OnDemand {
    /// Shared by every upstream made here: they all have the default settings.
    http: reqwest::Client,
    /// Freshness for these routes: the `[cache]` settings.
    freshness: Policy,
    /// `cache.cold_ranges`, for these routes.
    cold_ranges: ColdRanges,
    bad_sources: Arc<BadSources>,
    /// The server's clock, for the upstreams' breakers and tokens.
    clock: Clock,
    routes: Mutex<Recent>,
}

impl OnDemand {
    pub(super) fn new(
        freshness: Policy,
        cold_ranges: ColdRanges,
        bad_sources: Arc<BadSources>,
        clock: Clock,
    ) -> anyhow::Result<OnDemand> {
        OnDemand::with_capacity(
            MAX_ON_DEMAND_ROUTES,
            freshness,
            cold_ranges,
            bad_sources,
            clock,
        )
    }

    fn with_capacity(
        capacity: usize,
        freshness: Policy,
        cold_ranges: ColdRanges,
        bad_sources: Arc<BadSources>,
        clock: Clock,
    ) -> anyhow::Result<OnDemand> {
        Ok(OnDemand {
            http: http_client("proxy_any_registry", &UpstreamConfig::default())?,
            freshness,
            cold_ranges,
            bad_sources,
            clock,
            routes: Mutex::new(Recent::new(capacity)),
        })
    }

    /// The route for `registry`, made now if it has none.
    pub(super) fn route(&self, registry: &str) -> Result<Arc<Route>> {
        if !is_host_port(registry) {
            return Err(Error::new(
                ErrorKind::NameInvalid,
                format!("{registry:?} is not a registry host name"),
            ));
        }
        self.route_or_make(registry, || self.make(registry))
    }

    /// The routes kept now (for listing their upstreams).
    pub(super) fn routes(&self) -> Vec<Arc<Route>> {
        self.lock()
            .entries
            .values()
            .map(|e| e.route.clone())
            .collect()
    }

    /// The kept route for `registry`, or the one `make` makes, which runs without the lock.
    fn route_or_make(
        &self,
        registry: &str,
        make: impl FnOnce() -> Result<Route>,
    ) -> Result<Arc<Route>> {
        if let Some(route) = self.lock().get(registry) {
            return Ok(route);
        }
        let made = Arc::new(make()?);
        let inserted = self.lock().insert(registry, made);
        if let Some(dropped) = &inserted.dropped {
            tracing::info!(
                registry = %dropped,
                "dropping the least recently used registry proxied on demand"
            );
        }
        if inserted.new {
            tracing::info!(
                registry,
                "proxying a registry on demand (proxy_any_registry)"
            );
        }
        Ok(inserted.route)
    }

    fn make(&self, registry: &str) -> Result<Route> {
        let upstream = Upstream::with_http(
            registry,
            "proxy_any_registry",
            &UpstreamConfig::new(format!("https://{registry}")),
            self.clock.clone(),
            self.http.clone(),
        )
        .map_err(|e| Error::new(ErrorKind::NameInvalid, e.to_string()))?;
        let upstream = Arc::new(upstream);
        Ok(Route {
            registry: registry.to_string(),
            upstreams: vec![upstream.clone()],
            tag_upstreams: vec![upstream],
            freshness: self.freshness.clone(),
            bad_sources: self.bad_sources.clone(),
            credentialed: false,
            cold_ranges: self.cold_ranges,
        })
    }

    /// The map holds no invariant a panicking holder could break half-way (each change is
    /// one insert or remove), so a poisoned lock is still good to use.
    fn lock(&self) -> MutexGuard<'_, Recent> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// At most `capacity` routes by registry, each stamped with when it was last used.
struct Recent {
    entries: HashMap<String, Entry>,
    capacity: usize,
    /// Counts uses: a larger stamp is a more recent use.
    clock: u64,
}

struct Entry {
    route: Arc<Route>,
    used: u64,
}

/// What [`Recent::insert`] did.
struct Inserted {
    /// The route kept for the registry: the one given, or one inserted before it.
    route: Arc<Route>,
    /// Whether the one given was kept.
    new: bool,
    /// The registry whose route was dropped to make room.
    dropped: Option<String>,
}

impl Recent {
    fn new(capacity: usize) -> Recent {
        Recent {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.saturating_add(1);
        self.clock
    }

    /// The route for `registry`, now its most recently used.
    fn get(&mut self, registry: &str) -> Option<Arc<Route>> {
        let now = self.tick();
        let entry = self.entries.get_mut(registry)?;
        entry.used = now;
        Some(entry.route.clone())
    }

    /// Keeps `route` for `registry` unless one is kept already (then that one is used),
    /// dropping the least recently used route if the set is full. A linear scan: it runs
    /// only when a route is made, over at most `capacity` entries.
    fn insert(&mut self, registry: &str, route: Arc<Route>) -> Inserted {
        if let Some(kept) = self.get(registry) {
            return Inserted {
                route: kept,
                new: false,
                dropped: None,
            };
        }
        let mut dropped = None;
        if self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(registry, _)| registry.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
                dropped = Some(oldest);
            }
        }
        let used = self.tick();
        self.entries.insert(
            registry.to_string(),
            Entry {
                route: route.clone(),
                used,
            },
        );
        Inserted {
            route,
            new: true,
            dropped,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn on_demand(capacity: usize) -> OnDemand {
        OnDemand::with_capacity(
            capacity,
            Config::default().cache.freshness(),
            Config::default().cache.cold_ranges,
            Arc::new(BadSources::new()),
            Clock::system(),
        )
        .unwrap()
    }

    fn kept(o: &OnDemand) -> Vec<String> {
        let mut names: Vec<String> = o.routes().iter().map(|r| r.registry.clone()).collect();
        names.sort();
        names
    }

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

    #[test]
    fn a_full_set_drops_the_least_recently_used() {
        let o = on_demand(2);
        let a = o.route("a.io").unwrap();
        o.route("b.io").unwrap();
        assert!(Arc::ptr_eq(&o.route("a.io").unwrap(), &a), "a.io is kept");
        // b.io is now the least recently used.
        o.route("c.io").unwrap();
        assert_eq!(kept(&o), ["a.io", "c.io"]);
        o.route("b.io").unwrap();
        assert_eq!(kept(&o), ["b.io", "c.io"], "a.io was used before c.io");
        // A request still holding a dropped route keeps a working route.
        assert_eq!(a.upstreams.first().map(|u| u.name()), Some("a.io"));
        let again = o.route("a.io").unwrap();
        assert!(!Arc::ptr_eq(&again, &a), "a.io made afresh");
    }

    #[test]
    fn every_registry_is_served_past_the_bound() {
        let o = on_demand(3);
        for i in 0..10 {
            let registry = format!("r{i}.example");
            let route = o.route(&registry).unwrap();
            assert_eq!(route.registry, registry);
            assert!(o.routes().len() <= 3);
        }
    }

    #[test]
    fn routes_are_made_without_the_lock() {
        let o = on_demand(4);
        let route = o
            .route_or_make("a.io", || {
                assert!(
                    o.routes.try_lock().is_ok(),
                    "the route map is locked while a route is made"
                );
                o.make("a.io")
            })
            .unwrap();
        assert_eq!(route.registry, "a.io");
        assert_eq!(kept(&o), ["a.io"]);
    }

    #[test]
    fn a_route_made_twice_at_once_is_kept_once() {
        let o = on_demand(4);
        let mut other = None;
        // Another request inserts its route while this one is making its own.
        let got = o
            .route_or_make("a.io", || {
                other = Some(o.route("a.io").unwrap());
                o.make("a.io")
            })
            .unwrap();
        let other = other.unwrap();
        assert!(Arc::ptr_eq(&got, &other), "the first inserted wins");
        assert!(Arc::ptr_eq(&o.route("a.io").unwrap(), &other));
        assert_eq!(o.routes().len(), 1);
    }
}
