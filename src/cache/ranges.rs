//! Ranges of blobs not cached yet, answered without waiting for the whole blob
//! (`cold_ranges = "upstream"`): from the bytes the blob's fill has already written, or from
//! a ranged upstream request.
//!
//! - **The whole blob is still fetched once**: the range's request opened (or joined) the
//!   blob's fill first, as every miss does; it is committed only once verified, and whole-blob
//!   responses keep withholding their last byte until then.
//! - **What is served here is not verified**: the upstream's bytes, as every registry serving
//!   a range sends them (lazy-pulling clients check their chunks against their own table of
//!   contents). If the fill then fails verification, that is logged as an error and counted
//!   ([`RangeCounts::failed_after_ranges`], in `/metrics`).
//! - **Coalesced**: a range inside one being fetched for the same fill shares that fetch
//!   ([`plan`]). Fetches are not widened: a small range costs the upstream its own bytes.
//! - **Bounded**: each fill makes at most [`MAX_FETCHES_PER_FILL`] ranged requests, at most
//!   [`MAX_FETCHES_RUNNING`] run at once in all, and each reads at most [`MAX_FETCHED_RANGE`]
//!   bytes (into memory). Past a bound, or when no upstream serves the range (a 200, an
//!   error), the range follows the fill and is sent as the fill writes it, still without
//!   waiting for verification.
//!
//! A fetch runs in its own task, so a client that goes away does not cancel it for those
//! sharing it; it is bounded by the upstream's timeouts and the range's size.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{Semaphore, watch};

use super::blobs::BlobSource;
use super::fill::FillState;
use super::reader::BlobReader;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::{Digest, RepoName};
use crate::upstream::{Outcome, RangeReply, Route, Walk, Want};

/// Ranged upstream requests one fill may make: a storm of small ranges on a cold layer costs
/// the upstream at most this many requests; the rest follow the fill.
pub const MAX_FETCHES_PER_FILL: usize = 128;

/// Ranged upstream requests running at once, over all blobs: each holds up to
/// [`MAX_FETCHED_RANGE`] bytes of memory, so at most 128 MiB in all.
pub const MAX_FETCHES_RUNNING: usize = 32;

/// The largest range fetched on its own (a SOCI span, 4 MiB by default, fits); a larger one
/// follows the fill: it is read into memory before it is sent, and a range that large is
/// not what a lazy-pulling client waits for to start a container.
pub const MAX_FETCHED_RANGE: u64 = 4 << 20;

/// What a fill's ranges share: the fetches running for it, and how many it has made.
/// Lives in the fill map's entry, so it goes away with the fill.
#[derive(Default)]
pub struct FillRanges {
    state: Mutex<FillRangesState>,
}

#[derive(Default)]
struct FillRangesState {
    /// Ranged upstream requests this fill has started.
    started: usize,
    next_id: u64,
    running: Vec<Fetch>,
    /// Ranges answered with bytes not yet verified.
    served: u64,
}

/// A ranged fetch in flight: `start..end`, and where its result will appear.
struct Fetch {
    id: u64,
    start: u64,
    end: u64,
    result: watch::Receiver<Option<Result<Bytes>>>,
}

impl FillRanges {
    /// Ranges of this blob answered before it was verified.
    pub fn served(&self) -> u64 {
        self.lock().served
    }

    fn lock(&self) -> MutexGuard<'_, FillRangesState> {
        // The state is a few counters and a list; a panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn finished(&self, id: u64) {
        self.lock().running.retain(|f| f.id != id);
    }
}

/// How one range of a blob being filled is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The fill has written it already: read it from there.
    FromFill,
    /// The fetch at this index of the running ones covers it: share it.
    Join(usize),
    /// Ask the upstream for it.
    Fetch,
    /// Over a bound (too large, or the fill's fetches used up): follow the fill.
    Follow,
}

/// The pure choice for range `start..end` of a fill that has `available` bytes, with
/// `running` fetches (their ranges) and `started` fetches made so far.
fn plan(available: u64, (start, end): (u64, u64), running: &[(u64, u64)], started: usize) -> Plan {
    if end <= available {
        return Plan::FromFill;
    }
    if let Some(i) = running.iter().position(|&(s, e)| s <= start && end <= e) {
        return Plan::Join(i);
    }
    if end - start > MAX_FETCHED_RANGE || started >= MAX_FETCHES_PER_FILL {
        return Plan::Follow;
    }
    Plan::Fetch
}

/// A range's answer: bytes fetched from an upstream, or a reader over the fill.
pub enum ColdRange {
    Fetched(Bytes),
    Reader(BlobReader),
}

/// How cold ranges were answered, for `/metrics`.
#[derive(Default)]
pub struct RangeCounts {
    /// Answered from a ranged upstream request this range started.
    pub fetched: AtomicU64,
    /// Answered by sharing a ranged request another range started.
    pub joined: AtomicU64,
    /// Read from the bytes the fill had already written.
    pub from_fill: AtomicU64,
    /// Sent as the fill wrote them, over a bound.
    pub followed: AtomicU64,
    /// Fetched or joined, but no upstream served the range (a 200, errors), so it followed
    /// the fill after all.
    pub unanswered: AtomicU64,
    /// Fills that failed verification (wrong digest or size) after ranges of their blob were
    /// served.
    pub failed_after_ranges: AtomicU64,
}

/// Ranged upstream requests for blobs not cached yet: the bound on those running, and counts.
pub struct ColdRanges {
    running: Arc<Semaphore>,
    pub counts: RangeCounts,
}

impl Default for ColdRanges {
    fn default() -> Self {
        ColdRanges::new(MAX_FETCHES_RUNNING)
    }
}

impl ColdRanges {
    /// At most `max_running` ranged upstream requests at once ([`MAX_FETCHES_RUNNING`] by
    /// default).
    pub fn new(max_running: usize) -> ColdRanges {
        ColdRanges {
            running: Arc::new(Semaphore::new(max_running)),
            counts: RangeCounts::default(),
        }
    }

    /// Answers range `start..end` (inside the blob's size) of `source` without waiting for
    /// the blob's verification. A cached or verified blob is read as usual.
    pub async fn serve(
        &self,
        route: &Arc<Route>,
        name: &RepoName,
        digest: &Digest,
        source: BlobSource,
        (start, end): (u64, u64),
    ) -> ColdRange {
        let BlobSource::Filling {
            progress,
            ranges,
            size: Some(size),
            ..
        } = &source
        else {
            return ColdRange::Reader(BlobReader::new(source, start, Some(end)));
        };
        let available = match &*progress.borrow() {
            // Verified: read as usual. Failed: the reader reports the failure.
            FillState::Verified(_) | FillState::Complete { .. } | FillState::Failed(_) => None,
            FillState::Receiving(p) => Some(p.available),
            FillState::Connecting => Some(0),
        };
        let (size, ranges) = (*size, ranges.clone());
        let Some(available) = available else {
            return ColdRange::Reader(BlobReader::new(source, start, Some(end)));
        };
        let result = {
            let mut state = ranges.lock();
            let spans: Vec<(u64, u64)> = state.running.iter().map(|f| (f.start, f.end)).collect();
            let planned = plan(available, (start, end), &spans, state.started);
            let permit = match planned {
                Plan::Fetch => self.running.clone().try_acquire_owned().ok(),
                _ => None,
            };
            match (planned, permit) {
                (Plan::FromFill, _) => {
                    self.counts.from_fill.fetch_add(1, Relaxed);
                    None
                }
                (Plan::Join(i), _) => {
                    self.counts.joined.fetch_add(1, Relaxed);
                    state.running.get(i).map(|f| (f.start, f.result.clone()))
                }
                (Plan::Fetch, Some(permit)) => {
                    self.counts.fetched.fetch_add(1, Relaxed);
                    state.started += 1;
                    state.next_id += 1;
                    let id = state.next_id;
                    let (tx, rx) = watch::channel(None);
                    state.running.push(Fetch {
                        id,
                        start,
                        end,
                        result: rx.clone(),
                    });
                    let (route, name, digest) = (route.clone(), name.clone(), digest.clone());
                    let ranges = ranges.clone();
                    tokio::spawn(async move {
                        let fetched = fetch(&route, &name, &digest, (start, end), size).await;
                        tx.send_replace(Some(fetched));
                        ranges.finished(id);
                        drop(permit);
                    });
                    Some((start, rx))
                }
                (Plan::Fetch | Plan::Follow, _) => {
                    self.counts.followed.fetch_add(1, Relaxed);
                    None
                }
            }
        };
        ranges.lock().served += 1;
        let Some((fetched_from, mut rx)) = result else {
            return ColdRange::Reader(BlobReader::unverified(source, start, end));
        };
        let fetched = match rx.wait_for(Option::is_some).await {
            Ok(done) => done.clone(),
            Err(_) => None,
        };
        let ours = fetched.map(|r| {
            r.and_then(|bytes| {
                part(&bytes, fetched_from, (start, end))
                    .ok_or_else(|| Error::internal("a shared fetch does not cover the range"))
            })
        });
        match ours {
            Some(Ok(bytes)) => ColdRange::Fetched(bytes),
            failed => {
                let error = failed.and_then(|r| r.err()).map(|e| e.message);
                tracing::debug!(%digest, %name, start, end, error, "no upstream served the range; following the blob's fill");
                self.counts.unanswered.fetch_add(1, Relaxed);
                ColdRange::Reader(BlobReader::unverified(source, start, end))
            }
        }
    }

    /// A fill whose blob had ranges served before verification ended with `outcome`: a
    /// verification failure then is logged loudly and counted, since those ranges carried
    /// bytes that did not verify.
    pub fn fill_ended(&self, ranges: &FillRanges, digest: &Digest, outcome: &Result<FillState>) {
        let served = ranges.served();
        if let Err(e) = outcome
            && e.kind == ErrorKind::UpstreamInvalid
            && served > 0
        {
            self.counts.failed_after_ranges.fetch_add(1, Relaxed);
            tracing::error!(%digest, ranges = served, error = %e, "blob failed verification after ranges of it were served unverified (cold_ranges = \"upstream\")");
        }
    }
}

/// Bytes `start..end` of the blob, out of `bytes`, which hold the blob from `from` on; `None`
/// if they do not cover them.
fn part(bytes: &Bytes, from: u64, (start, end): (u64, u64)) -> Option<Bytes> {
    let a = usize::try_from(start.checked_sub(from)?).ok()?;
    let b = usize::try_from(end.checked_sub(from)?).ok()?;
    (a <= b && b <= bytes.len()).then(|| bytes.slice(a..b))
}

/// Reads `start..end` of the blob from the first upstream of the route that serves ranges.
async fn fetch(
    route: &Route,
    name: &RepoName,
    digest: &Digest,
    range: (u64, u64),
    size: u64,
) -> Result<Bytes> {
    let mut walk = Walk::new(route, Want::Blob(digest));
    while let Some(upstream) = walk.next() {
        match upstream.get_blob_range(name, digest, range, size).await {
            Ok(RangeReply::Bytes(bytes)) => {
                walk.record(upstream, Outcome::Answered)?;
                return Ok(bytes);
            }
            Ok(RangeReply::WholeBlob) => {
                let e = Error::new(
                    ErrorKind::UpstreamInvalid,
                    format!(
                        "upstream {} answered a Range with the whole blob",
                        upstream.name()
                    ),
                );
                walk.record(upstream, Outcome::NoRanges(e))?;
            }
            Err(e) => walk.record(upstream, e.into())?,
        }
    }
    Err(walk.into_error(&format!("range {}-{} of blob {digest}", range.0, range.1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fill::Progress;
    use crate::cache::spill::Followers;
    use crate::config::Config;
    use crate::upstream::Routes;

    /// A route whose one upstream is never contacted, and a fill of a 1000-byte blob that has
    /// written nothing yet.
    fn route_and_fill() -> (Arc<Route>, RepoName, BlobSource, Arc<FillRanges>) {
        let config = Config::from_toml("[upstream]\nurl = \"http://127.0.0.1:9\"\n").unwrap();
        let clock = crate::clock::Clock::manual(std::time::SystemTime::UNIX_EPOCH);
        let routes = Routes::from_config(&config, &clock).unwrap();
        let name = RepoName::parse("library/app").unwrap();
        let route = routes.resolve(None, &name).unwrap().route;
        let (_, progress) = watch::channel(FillState::Receiving(Progress {
            file: None,
            on_disk: 0,
            spill: None,
            available: 0,
            size: Some(1000),
        }));
        let ranges = Arc::new(FillRanges::default());
        let source = BlobSource::Filling {
            progress,
            cursor: Arc::new(Followers::default()).join(),
            size: Some(1000),
            ranges: ranges.clone(),
        };
        (route, name, source, ranges)
    }

    #[tokio::test]
    async fn past_the_bound_on_running_fetches_a_range_follows_the_fill() {
        let (route, name, source, ranges) = route_and_fill();
        let cold = ColdRanges::new(0);
        let digest = Digest::of(b"blob");
        let answer = cold.serve(&route, &name, &digest, source, (10, 20)).await;
        assert!(matches!(answer, ColdRange::Reader(_)));
        assert_eq!(cold.counts.followed.load(Relaxed), 1);
        assert_eq!(cold.counts.fetched.load(Relaxed), 0);
        assert_eq!(ranges.served(), 1);
        assert_eq!(ranges.lock().started, 0, "no upstream request was made");
    }

    #[test]
    fn only_a_failed_verification_after_served_ranges_is_counted() {
        let (_, _, _, ranges) = route_and_fill();
        let cold = ColdRanges::default();
        let digest = Digest::of(b"blob");
        let invalid = || Err(Error::new(ErrorKind::UpstreamInvalid, "wrong digest"));
        cold.fill_ended(&ranges, &digest, &invalid());
        assert_eq!(
            cold.counts.failed_after_ranges.load(Relaxed),
            0,
            "no range served"
        );
        ranges.lock().served = 1;
        let unavailable = Err(Error::new(ErrorKind::UpstreamUnavailable, "cut"));
        cold.fill_ended(&ranges, &digest, &unavailable);
        cold.fill_ended(&ranges, &digest, &Ok(FillState::Connecting));
        assert_eq!(cold.counts.failed_after_ranges.load(Relaxed), 0);
        cold.fill_ended(&ranges, &digest, &invalid());
        assert_eq!(cold.counts.failed_after_ranges.load(Relaxed), 1);
    }

    #[test]
    fn written_bytes_come_from_the_fill() {
        assert_eq!(plan(100, (10, 100), &[], 0), Plan::FromFill);
        assert_eq!(plan(100, (10, 101), &[], 0), Plan::Fetch);
    }

    #[test]
    fn a_range_inside_a_running_fetch_shares_it() {
        let running = [(0, 50), (100, 300)];
        assert_eq!(plan(0, (120, 300), &running, 2), Plan::Join(1));
        assert_eq!(plan(0, (100, 101), &running, 2), Plan::Join(1));
        assert_eq!(
            plan(0, (40, 120), &running, 2),
            Plan::Fetch,
            "overlaps both, inside neither"
        );
    }

    #[test]
    fn a_shared_fetch_is_cut_to_each_range() {
        let fetched = Bytes::from_static(b"0123456789");
        assert_eq!(
            part(&fetched, 100, (100, 110)).as_deref(),
            Some(&b"0123456789"[..])
        );
        assert_eq!(part(&fetched, 100, (103, 105)).as_deref(), Some(&b"34"[..]));
        assert_eq!(part(&fetched, 100, (99, 105)), None, "starts before");
        assert_eq!(part(&fetched, 100, (105, 111)), None, "ends after");
    }

    #[test]
    fn bounds_send_ranges_to_the_fill() {
        assert_eq!(plan(0, (0, MAX_FETCHED_RANGE), &[], 0), Plan::Fetch);
        assert_eq!(plan(0, (0, MAX_FETCHED_RANGE + 1), &[], 0), Plan::Follow);
        assert_eq!(plan(0, (0, 10), &[], MAX_FETCHES_PER_FILL - 1), Plan::Fetch);
        assert_eq!(plan(0, (0, 10), &[], MAX_FETCHES_PER_FILL), Plan::Follow);
        // Sharing costs the upstream nothing, so it is allowed past the bound.
        assert_eq!(
            plan(0, (0, 10), &[(0, 10)], MAX_FETCHES_PER_FILL),
            Plan::Join(0)
        );
    }
}
