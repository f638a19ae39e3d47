//! The on-disk cache. See [`disk::DiskStore`].

pub mod disk;
pub mod tags;

pub use disk::{DiskStore, PartialBlob, StoredManifest};
pub use tags::TagRecord;
