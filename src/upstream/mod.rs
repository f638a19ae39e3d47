//! Talking to upstream registries: one [`Upstream`] per configured registry endpoint, routes
//! that order them per registry, and the walk ([`select::Walk`]) that picks which one to try
//! next and what each try's outcome means.

pub mod auth;
pub mod bad_sources;
pub mod breaker;
pub mod client;
pub mod routes;
pub mod select;

pub use bad_sources::BadSources;
pub use client::{BlobResponse, ManifestHead, Upstream, UpstreamManifest};
pub use routes::{Route, Routed, Routes};
pub use select::{Outcome, Walk, Want};
