//! cistern: a pull-through caching proxy for OCI / Docker container registries.
//!
//! See `docs/ARCHITECTURE.md` for the code map and the invariants.

pub mod api;
pub mod config;
pub mod error;
pub mod oci;

pub use config::Config;
