//! OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): the standard format
//! skopeo, podman, crane, oras, BuildKit and containerd read and write, for carrying images to
//! sites with no network.
//!
//! - `model`: pure. Image references as the CLI takes them, which tag record names an image,
//!   what a manifest needs in a layout, the ref names and the exact `index.json` bytes.
//! - `export`: the edge. Walks images in a stopped cache's store and writes a layout directory
//!   or a tar of one, atomically (a temporary name renamed at the end) and verified (every
//!   blob's bytes are hashed as they are copied).
//! - `import`: the edge the other way. Walks a layout directory or tar from its `index.json`
//!   into a stopped cache's store, verifying every manifest and blob before it is visible, and
//!   records the tags it names.
//! - `hashing`: the reader both copy blobs through.
//!
//! Invariants: manifests go into the layout with the exact bytes the cache holds (never
//! re-serialized), so their digests are the ones clients pulled; nothing appears under the
//! output's name unless every image was written whole and verified. An import records a tag
//! only after every blob and manifest of every image it imports is committed.

pub mod export;
mod hashing;
pub mod import;
pub mod model;

pub use export::{ExportReport, export};
pub use import::{ImportOptions, ImportReport, import};
pub use model::{ImageRef, parse_list};
