//! The cache: blob fills that no request owns, readers that follow them, and manifests.

pub mod blobs;
pub mod clock;
pub mod evict;
pub mod fill;
pub mod manifests;
pub mod reader;
pub mod refs;
pub mod singleflight;
pub mod spill;

/// Pin patterns moved to the pure `policy` module (config uses them too); this keeps the old
/// path `cache::pins` working for the code that names it.
pub use crate::policy::pins;

pub use blobs::{BlobCache, BlobSource};
pub use clock::Clock;
pub use manifests::{Manifest, ManifestCache};
pub use reader::BlobReader;
