//! Pure policy: the rules that decide what to keep and for how long, with no IO, no clock and
//! no tokio types, so every rule is unit-tested on plain values.
//!
//! - [`glob`]: the `*` / `?` patterns that tag rules and pins are written in.
//! - [`pins`]: pin patterns (digests, repositories, tags) and what each one matches.
//! - [`freshness`]: how a remembered tag answer of a given age is treated.
//! - [`access`]: who may pull what (the `[access]` patterns).
//!
//! Architecture invariant: this module sits below `config`, `cache` and `upstream`, which all
//! use it, and imports only the other pure modules (`oci`, `api`, `error`). `config` turns its
//! keys into these values (`CacheConfig::freshness`, `CacheConfig::pin_patterns`); the policy
//! never reads the config, so nothing here can import back into its users.

pub mod access;
pub mod freshness;
pub mod glob;
pub mod pins;

pub use freshness::{Freshness, Policy};
pub use pins::Pin;
