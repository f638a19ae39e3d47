//! Talking to upstream registries: one [`Upstream`] per configured registry endpoint, routes
//! that order them per registry, and the walk that falls back from one to the next.
//!
//! An `Upstream` is split by concern: `client` (the handle: breaker, counters, `send`),
//! `transport` (reqwest client, timeouts, request slots), `auth` (credentials, token flow,
//! realm allow-list), `registry_api` (the registry calls) and `reply` (what a reply means,
//! pure).

pub mod auth;
pub mod breaker;
pub mod client;
pub mod fallback;
mod registry_api;
mod reply;
pub mod routes;
mod transport;

pub use client::{Upstream, UpstreamStats};
pub use registry_api::{BlobResponse, ManifestHead, UpstreamManifest};
pub use routes::{Route, Routed, Routes};
