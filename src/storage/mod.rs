//! The on-disk cache. See [`disk::DiskStore`].

pub mod disk;
pub mod links;
pub mod tags;

pub use disk::{DiskStore, PartialBlob, StoredManifest, VerifyReport};
pub use tags::TagRecord;
