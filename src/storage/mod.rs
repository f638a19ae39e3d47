//! The on-disk cache. See [`disk::DiskStore`].

pub mod disk;

pub use disk::{DiskStore, PartialBlob, StoredManifest};
