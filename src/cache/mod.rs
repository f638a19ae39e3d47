//! The cache: blob fills that no request owns, readers that follow them, and manifests.

pub mod blobs;
pub mod evict;
pub mod fill;
pub mod freshness;
pub mod manifests;
pub mod open;
pub mod pins;
pub mod reader;
pub mod refs;
pub mod singleflight;
pub mod spill;

pub use blobs::{BlobCache, BlobSource};
pub use freshness::Clock;
pub use manifests::{Manifest, ManifestCache};
pub use open::{Cache, FillTasks};
pub use reader::BlobReader;
