//! Registry auth: an upstream's credentials, the token flow, and which realms may see them.
//!
//! The flow (Docker's token spec, used by Docker Hub, ghcr.io, quay.io, …): a request answered
//! 401 with `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` is retried once with a
//! token fetched from `realm?service=…&scope=…`. Tokens are cached per (realm, service, scope)
//! until shortly before they expire. The last challenge seen is remembered, so requests for
//! other repositories fetch their token up front instead of paying a 401 round trip. A `Basic`
//! challenge is answered with the upstream's username and password, if it has them; a
//! configured `token_file` is sent as a bearer token on every request.
//!
//! Credentials go only to the upstream's own host and to token realms on its allow-list
//! ([`realm`]); any other realm is asked anonymously. No client credential is ever involved:
//! requests upstream are built from scratch, so a client's `Authorization` is never forwarded.
//!
//! Everything here is pure except [`flow`], which sends the requests.

pub mod challenge;
pub mod credentials;
pub mod flow;
pub mod realm;
pub mod tokens;

pub use challenge::{Challenge, parse_challenge};
pub use credentials::Credentials;
pub use flow::Authenticator;
pub use realm::RealmPolicy;
pub use tokens::{TokenCache, TokenEndpoint, TokenResponse, pull_scope};
