//! The disk budget: an index of committed blobs (size, last access, open readers) and the
//! background task that removes the least recently used ones when the cache is too big.
//!
//! - `victims`: the pure choice of which blobs go ([`choose_victims`]).
//! - `usage`: the index of committed blobs and the pins ([`Usage`]), and the pass that copies
//!   candidates out of it, chooses, and takes the victims out.
//! - `task`: the background task that runs a pass when asked and removes the files ([`run`]).
//! - `metadata`, `meta_task`: the metadata budget (`cache.max_metadata_size`): the index of
//!   stored manifests, tag records and links ([`MetaUsage`]) and its task ([`run_metadata`]);
//!   what goes in what order is `cache::refs::trim`'s decision.
//!
//! The file system is the single source of truth. At start a scan of `blobs/` builds the
//! index, in the background while the server already serves; a blob's last access is its
//! file's mtime, set on every cache hit, so LRU order survives restarts without a second
//! store to keep consistent with the files.
//!
//! Architecture invariants:
//! - Eviction (and purges) wait until the start-up scan is merged; hits and fills do not. What
//!   was recorded during the scan (commits, hits, readers, forgets) wins over what the scan
//!   saw, so nothing is lost or counted twice (see `usage`).
//! - Eviction runs off the request path, in its own task, and only when the blobs pass the
//!   high watermark; it removes least recently used blobs until they are under the low one.
//! - A blob with an open reader, a pinned blob, or a blob still being filled (not yet in the
//!   index) is never chosen. A reader that opens a blob in the instant it is removed keeps
//!   reading it: an open file outlives its name.
//! - A commit updates the blob's entry, never replaces it: a reader may have opened the file
//!   (and entered it in the index) between the commit's rename and this index's update.
//! - A pass holds the index lock only to copy the unread entries out and to take the victims
//!   out; victims are chosen (sorted) outside it, and one whose entry changed in between
//!   (opened, read, re-committed) stays. The pinned set (digest, repository and tag pins,
//!   through `cache::refs`) is computed once per pass, again only if a pin, tag, link or
//!   manifest was added while the pass chose.
//! - Removing a blob never breaks a cached manifest: the blob is fetched again on demand.

mod key;
mod meta_task;
mod metadata;
mod task;
mod usage;
mod victims;

pub use key::BlobKey;
pub use meta_task::{run_metadata, trim_once};
pub use metadata::{MetaReadGuard, MetaUsage};
pub use task::run;
pub use usage::{Budget, ReadGuard, Usage};
pub use victims::{Candidate, choose_victims};
