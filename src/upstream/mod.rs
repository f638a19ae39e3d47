//! Talking to upstream registries: one [`Upstream`] per configured registry endpoint, routes
//! that order them per registry, and the walk ([`select::Walk`]) that picks which one to try
//! next and what each try's outcome means.
//!
//! An `Upstream` is split by concern: `client` (the handle: breaker, counters, `send`),
//! `transport` (reqwest client, timeouts, request slots), `auth` (credentials, token flow,
//! realm allow-list), `registry_api` (the registry calls) and `reply` (what a reply means,
//! pure). `routes` maps registries to routes; `on_demand` makes and keeps the routes of
//! registries the config does not name (`proxy_any_registry`).

pub mod auth;
pub mod bad_sources;
pub mod breaker;
pub mod client;
pub mod on_demand;
mod registry_api;
mod reply;
pub mod routes;
pub mod select;
mod transport;

pub use bad_sources::BadSources;
pub use client::{Upstream, UpstreamStats};
pub use registry_api::{BlobResponse, ManifestHead, RangeReply, UpstreamManifest};
pub use routes::{Route, Routed, Routes};
pub use select::{Outcome, Walk, Want};
