//! The on-disk cache. See [`disk::DiskStore`].

pub mod disk;
pub mod links;
pub mod mapped;
pub mod metadata;
pub mod tags;

pub use disk::{DiskStore, PartialBlob, StoredManifest, VerifyReport};
pub use metadata::{MetaFile, MetaFileInfo};
pub use tags::{TagRecord, Written};
