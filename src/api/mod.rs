//! Pure HTTP-facing protocol code: routing, header rules and error bodies.
//!
//! Architecture invariant: no IO and no tokio types. The server feeds requests in and turns
//! the results into hyper responses.

pub mod errors;
pub mod headers;
pub mod metrics;
pub mod registry;
pub mod route;
