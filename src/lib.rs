//! cistern: a pull-through caching proxy for OCI / Docker container registries.
//!
//! See `docs/ARCHITECTURE.md` for the code map and the invariants.

pub mod config;

pub use config::Config;
