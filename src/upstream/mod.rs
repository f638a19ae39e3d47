//! Talking to upstream registries. See [`client::Upstream`].

pub mod auth;
pub mod breaker;
pub mod client;

pub use client::{ManifestHead, Upstream, UpstreamManifest};
