//! cistern: a pull-through caching proxy for OCI / Docker container registries.
//!
//! # Layout
//! Dependencies point one way, down this list; the pure modules at the bottom do no IO.
//!
//! - [`run`]: [`Server`] and its builder: start-up, serving, graceful shutdown. The one entry
//!   point, for the binary and the tests alike.
//! - [`server`]: the HTTP edge: the accept loop, request handlers, the admin API over HTTP.
//! - [`admin`]: cache administration (stats, metrics, pins, purges) as a library service,
//!   for the admin API and for `cistern admin` on a stopped cache.
//! - [`cache`]: blob fills owned by the cache, readers that follow them, manifests, the disk
//!   budget and the reference index.
//! - [`upstream`]: the upstream registry client, routes, and the walk over a route's upstreams.
//! - [`storage`]: content-addressed files, temp files, atomic commits.
//! - [`config`]: TOML → validated [`Config`] with defaults.
//! - [`clock`]: the one clock every deadline and stamp is read from (manual in tests).
//! - [`api`], [`oci`], [`policy`], [`error`] (pure): routes, header rules, OCI error bodies,
//!   digests, names, references, media types; globs, pin patterns, the freshness policy.
//! - [`sync`]: taking a mutex without a panic path, below everything that locks one.
//!
//! `docs/ARCHITECTURE.md` states the invariants.

// No panic reachable from input: outside tests, `unwrap`, `expect`, `panic!`, `unreachable!`,
// `todo!` and indexing or slicing that can go out of range do not compile under `cargo clippy`.
// Use `?`, `.get()`, `let .. else`. Each exception carries an `#[allow]` and a comment proving it cannot fail.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

pub mod admin;
pub mod api;
pub mod cache;
pub mod clock;
pub mod config;
pub mod error;
pub mod layout;
pub mod oci;
pub mod policy;
pub mod run;
pub mod server;
pub mod storage;
pub mod sync;
pub mod upstream;

pub use config::Config;
pub use run::{Prepared, Server, ServerBuilder};
