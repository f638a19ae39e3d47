//! Pure OCI vocabulary: digests, repository names, references and media types.
//!
//! Architecture invariant: nothing here does IO or holds a tokio type. Everything that turns
//! client input into a file path goes through these parsers first, and they only accept the
//! spec's grammars, so no accepted value can contain `/..`, `%`, NUL or an absolute path.

pub mod digest;
pub mod media_types;
pub mod name;
pub mod references;

pub use digest::{Digest, DigestVerifier};
pub use name::{Reference, RepoName, Tag};
