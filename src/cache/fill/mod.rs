//! One cache fill: download a blob from the upstream, hash it and write it to a temporary file
//! on a writer thread while the next bytes arrive, publish `Verified` once the digest
//! matches, and commit. Progress is published on a `watch` channel, which every attached
//! reader follows.
//!
//! - `state`: where a fill is ([`FillState`], [`Progress`]), the [`FillGuard`] that
//!   publishes it and guarantees a final state, [`Detach`] (out of the fill map, once) and the
//!   [`CommitGate`] a purge closes.
//! - `pipeline`: the writer and hashing threads and the bounded channels between them.
//! - `driver`: [`run`], which walks the route's upstreams (through `upstream::select`,
//!   which decides the order, resumes mid-body and blames bad bytes), streams each response
//!   into the pipeline, verifies and commits.
//!
//! Architecture invariants:
//! - The fill runs in its own task on the cache's `TaskTracker`, under a cancellation token
//!   derived from the server's, never from a request. No client can cancel it.
//! - **Receiving, hashing and storing overlap.** The task receives from the upstream and hands
//!   batches to the fill's writer thread over a bounded channel (`PIPELINE_BATCHES` batches
//!   of at most `MAX_WRITE_BATCH` bytes, in `pipeline`); the writer passes each batch on to a
//!   hashing thread (another bounded channel) and writes it. The upstream is paced by the
//!   slower of the two, and memory per fill is bounded by the channels.
//! - **Readers finish on `Verified`, the cache on `Complete`.** Readers may send their last
//!   byte once every byte has matched the digest; the fill stays in the fill map (new
//!   requests join it) until the fsync, rename and directory fsync are done, and only then is
//!   the blob visible under `blobs/`. Durability is not on the clients' critical path; what is
//!   visible on disk is always durable.
//! - **A disk that fails mid-fill (ENOSPC, EIO) does not fail the clients.** The writer keeps
//!   what landed, passes the rest through memory (`cache::spill`), leaves the fill map (new
//!   requests start a fresh fill, which tries the disk again), and still checks the digest
//!   over every byte. Nothing is committed; the temporary file is removed; on a full disk,
//!   eviction is asked to make room.
//! - The fill ends in exactly one of three named states: [`FillState::Complete`] (committed),
//!   [`FillState::Verified`] (verified, served, not cached) or [`FillState::Failed`]. If the
//!   task dies some other way (a panic), [`FillGuard`]'s `Drop` publishes `Failed`, so readers
//!   never wait forever and never mistake a dead fill for a finished one.
//! - The temporary file is removed on every path except a successful commit (see
//!   `PartialBlob`'s `Drop`).
//! - **A purge wins over a running fill.** An admin purge of a digest whose fill has not
//!   begun its commit closes the fill's [`CommitGate`]: the readers still get their verified
//!   bytes, but the blob is not committed. If the commit is already under way, the purge waits
//!   for the fill to end and removes the file after it.

mod driver;
mod pipeline;
mod state;

pub use driver::{FillContext, run};
pub use state::{CommitGate, Detach, FillGuard, FillState, Progress};
