//! OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): the standard format
//! skopeo, podman, crane, oras, BuildKit and containerd read and write, for carrying images to
//! sites with no network.
//!
//! - `model`: pure. Image references as the CLI takes them, which tag record names an image,
//!   what a manifest needs in a layout, the ref names and the exact `index.json` bytes.
//! - `export`: the edge. Walks images in a stopped cache's store and writes a layout directory
//!   or a tar of one, atomically (a temporary name renamed at the end) and verified (every
//!   blob's bytes are hashed as they are copied).
//!
//! Invariants: manifests go into the layout with the exact bytes the cache holds (never
//! re-serialized), so their digests are the ones clients pulled; nothing appears under the
//! output's name unless every image was written whole and verified.

pub mod export;
pub mod model;

pub use export::{ExportReport, export};
pub use model::{ImageRef, parse_list};
