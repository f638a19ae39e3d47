//! The cache: blob fills that no request owns, readers that follow them, and manifests.

pub mod blobs;
mod blocking;
pub mod evict;
pub mod fill;
pub mod fill_limit;
pub mod manifests;
pub mod open;
pub mod ranges;
pub mod reader;
pub mod refs;
pub mod singleflight;
pub mod spill;

pub use blobs::{BlobCache, BlobSource};
pub use blocking::blocking;
pub use manifests::{Manifest, ManifestCache};
pub use open::{Cache, FillTasks};
pub use reader::BlobReader;
