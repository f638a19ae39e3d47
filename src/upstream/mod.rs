//! Talking to upstream registries: one [`Upstream`] per configured registry endpoint, routes
//! that order them per registry, and the walk that falls back from one to the next.

pub mod auth;
pub mod breaker;
pub mod client;
pub mod fallback;
pub mod routes;

pub use client::{BlobResponse, ManifestHead, Upstream, UpstreamManifest};
pub use routes::{Route, Routed, Routes};
