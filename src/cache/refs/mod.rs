//! The reference index: which manifests each repository and tag names, and which blobs and
//! child manifests each stored manifest references. It answers "what is pinned" (eviction)
//! and "what may go" (purge by repository or tag).
//!
//! ```text
//! roots                                    graph
//! (registry, repository, tag) ─ tag records ─▶ manifest ─ manifests[] ─▶ manifest ─▶ blobs
//! (registry, repository)      ─ links ───────▶ manifest ─ config, layers ───────────▶ blobs
//! ```
//!
//! The files are the source of truth, as everywhere in cistern: tag records (`storage::tags`),
//! links (`storage::links`, manifests pulled by digest that no tag of their repository
//! reaches) and the stored manifests themselves. [`RefIndex::load`] rebuilds the index from
//! them at start, in the background while the server serves (`load`), and the manifest cache
//! keeps it current as it stores manifests and records tags and links. Nothing else is
//! persisted, so there is no second store to reconcile after a crash.
//!
//! - `graph`: [`Graph`], pure (no IO): the roots, the references, reachability, the pinned set
//!   ([`Pinned`]) and the purge plan ([`PurgePlan`]).
//! - `index`: [`RefIndex`] wraps the graph in a lock, keeps it current, and merges what the
//!   load reads under what was recorded while it ran (the newer record wins; nothing lost or
//!   counted twice).
//! - `load`: the load from disk at start, in the background ([`load_in_background`]), with a
//!   [`LoadGate`] tests hold it at.
//!
//! Start-up invariants: hits on blobs and manifests, and tag answers, need no graph and never
//! wait for the load. What needs the whole graph waits for [`RefIndex::loaded`] or is
//! deferred: eviction skips its passes until then, purges by repository or tag wait, links
//! claimed meanwhile are decided (and written) when the load ends. A load cut short by a
//! shutdown leaves the index incomplete, and those waits fail; the next start rebuilds it.
//! - `purge`: carries a purge plan out on disk ([`execute`]) and reports what went.
//! - `trim`: what the metadata budget removes, in what order ([`Graph::plan_trim`]), pure.
//!
//! Purge invariants:
//! - A purge removes the roots it names (tag records, links), then the manifests reachable
//!   from them that no remaining root or pin reaches, then the blobs those manifests
//!   referenced that no remaining manifest references and no pin covers. Content another
//!   repository, tag or pin still uses is kept; blobs referenced by no manifest at all, and
//!   manifests reached by no root (say, one a tag pointed at before it moved), are not a
//!   repository's to remove: purge them by digest.
//! - Files go in that order (roots, manifests, blobs), so a crash part-way leaves unreferenced
//!   content, never a root that promises more than is there (and any miss is fetched again).
//! - A purge removes the roots it names even if a repository or tag pin matches them (the pin
//!   stays, and pins them again when next pulled); digest pins keep what they name.
//!
//! Metadata budget (`cache.max_metadata_size`, `trim`, carried out by `cache::evict`):
//! - Manifests no root or pin reaches go first (least recently used first, an index before
//!   the manifests it lists), then the least recently used roots (a tag's records together,
//!   or a link), each with the manifests only it reached. Nothing a pin reaches or names, and
//!   no manifest a request is reading, is chosen.
//! - Files go root first, then the manifests it freed, and each group leaves the index as
//!   soon as its files are gone, so the index matches the disk after every removal.

mod graph;
mod index;
mod load;
mod purge;
mod trim;

pub use graph::{Graph, Pinned, PurgePlan, RepoKey, Target};
pub use index::{LoadState, RefIndex, references_or_warn};
pub use load::{LoadGate, load_in_background};
pub use purge::{Amounts, PurgeReport, execute};
pub use trim::{MetaItem, MetaKey, TrimGroup};
