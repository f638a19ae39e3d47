//! Which upstream to try next, and what the outcome of each try means: the one place where
//! upstream policy lives.
//!
//! Every fetch from upstream walks a route through a [`Walk`]: manifests by digest and by
//! tag, tag lists, blob sizes and blob fills. A walk yields the upstreams to try, in order
//! ([`Walk::next`]), takes the [`Outcome`] of each try ([`Walk::record`]), and sums up the
//! failures when none answered ([`Walk::into_error`]). It does no IO: its callers make the
//! requests, so its rules are tested here without a network.
//!
//! What is decided here, and only here:
//! - **Which upstreams, in which order** ([`Want`]): anything verified by its digest may come
//!   from every upstream of the route, in the configured order; tags only from the route's
//!   `tags_from` upstreams (mirrors lag on tags); a blob's bytes from every upstream, those
//!   that recently sent wrong bytes for that digest last ([`BadSources`]).
//! - **The circuit breaker.** An upstream whose circuit is open is skipped (and the skip
//!   counted) when the walk reaches it, not earlier, so a half-open breaker's single probe
//!   goes to a request that really tries it. What an exchange tells the breaker is decided
//!   here too: at response headers ([`after_headers`], called by the transport for every
//!   request it sends) and for what only a walk sees, a body that breaks off or bytes that
//!   fail their digest ([`Walk::record`], [`Walk::wrong_bytes`]). A 2xx is a success only
//!   once its whole answer has arrived ([`Outcome::Answered`]), never at its headers.
//! - **Resuming a blob mid-body.** After a body breaks off at byte K the next upstream is
//!   asked from K ([`Walk::resume_at`]); every upstream must agree on the blob's size
//!   ([`Walk::take_body`]); each is tried at most once per walk; bytes that fail the digest
//!   are blamed on every upstream that contributed some.
//! - **The error the client gets** when no upstream answered ([`Walk::into_error`]).
//! - **Ranged reads of a blob not cached yet** (`cold_ranges = "upstream"`) walk as a blob's
//!   bytes do ([`Want::Blob`]); an upstream that answers the `Range` with the whole blob (200)
//!   serves no ranges ([`Outcome::NoRanges`]): the next is tried, and its breaker is told
//!   nothing, as the upstream is alive and its body was never read.
//!
//! A new upstream policy (a rollout cohort, an OCI-layout upstream, a bucket) belongs here:
//! a new [`Want`] or a new rule in [`order`], a new [`Outcome`] and what [`Walk::record`]
//! does with it. Upstream names and error messages never hold secrets.

use std::future::Future;
use std::time::Duration;

use http::StatusCode;

use super::bad_sources::BadSources;
use super::client::Upstream;
use super::routes::Route;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::Digest;

/// What a walk fetches, which decides the upstreams it may ask and their order.
#[derive(Clone, Copy, Debug)]
pub enum Want<'r> {
    /// Something its digest verifies (a manifest by digest, a blob's size): any upstream of
    /// the route will do, in the configured order.
    ByDigest,
    /// A tag's answer or a tag list: only the route's `tags_from` upstreams.
    Tags,
    /// A blob's bytes (from byte K after a cut): any upstream, but those that recently sent
    /// wrong bytes for this digest last.
    Blob(&'r Digest),
}

/// How one try of one upstream went.
#[derive(Debug)]
pub enum Outcome {
    /// It gave what was asked. The walk is over.
    Answered,
    /// It does not have the thing (404): a mirror that lacks an image is normal.
    NotFound(Error),
    /// It rate-limited us (429).
    RateLimited(Error),
    /// It could not or would not answer usefully: a connection error, a timeout, a 5xx, a
    /// 401/403, or a reply we cannot use.
    Unavailable(Error),
    /// A blob body broke off, stalled or ran long after byte `at` of the blob: the next
    /// upstream resumes there.
    Cut { at: u64, error: Error },
    /// Our own failure (disk, internal) while trying it: another upstream cannot fix that.
    Ours(Error),
    /// It answered a ranged read with the whole blob (200): it serves no ranges. Not a
    /// failure of the upstream (it answered, and we did not read the body), nor a success;
    /// the next upstream is tried.
    NoRanges(Error),
}

impl From<Error> for Outcome {
    /// Classifies the error a try ended with.
    fn from(e: Error) -> Outcome {
        match e.kind {
            ErrorKind::NameUnknown | ErrorKind::ManifestUnknown | ErrorKind::BlobUnknown => {
                Outcome::NotFound(e)
            }
            ErrorKind::TooManyRequests { .. } => Outcome::RateLimited(e),
            _ if moves_on(&e) => Outcome::Unavailable(e),
            _ => Outcome::Ours(e),
        }
    }
}

/// Should a failure of this kind send us to the next upstream?
fn moves_on(e: &Error) -> bool {
    e.is_upstream_failure() || is_not_found(e)
}

fn is_not_found(e: &Error) -> bool {
    matches!(
        e.kind,
        ErrorKind::NameUnknown | ErrorKind::ManifestUnknown | ErrorKind::BlobUnknown
    )
}

/// The upstreams `want` may ask on `route`, in the order to try them.
fn order<'a>(route: &'a Route, want: Want<'_>) -> Vec<&'a Upstream> {
    match want {
        Want::ByDigest => route.upstreams.iter().map(|u| &**u).collect(),
        Want::Tags => route.tag_upstreams.iter().map(|u| &**u).collect(),
        Want::Blob(digest) => {
            // Demoted, not dropped: a lone upstream whose corruption was passing is still
            // retried.
            let (trusted, suspect): (Vec<&Upstream>, Vec<&Upstream>) = route
                .upstreams
                .iter()
                .map(|u| &**u)
                .partition(|u| !route.bad_sources.is_bad(digest, u.name()));
            trusted.into_iter().chain(suspect).collect()
        }
    }
}

/// One walk over a route's upstreams for one request. Yields the upstreams to try (as an
/// [`Iterator`]); each try's outcome goes to [`Walk::record`].
pub struct Walk<'a> {
    /// Upstreams not reached yet, in the order they are tried: each at most once.
    ahead: std::vec::IntoIter<&'a Upstream>,
    /// Every try that did not answer, and every upstream skipped, for the summary error.
    failures: Vec<Error>,
    bad_sources: &'a BadSources,
    /// A blob walk's digest (None for other walks).
    digest: Option<&'a Digest>,
    /// Where the next try of a blob starts: the bytes taken from earlier upstreams.
    resume_at: u64,
    /// The blob's size, as the first upstream whose body was taken said (None: it did not).
    size: Option<u64>,
    /// Upstreams whose bytes went into the blob, in order.
    sources: Vec<&'a Upstream>,
}

impl<'a> Walk<'a> {
    /// A walk over `route` for `want`. Nothing is asked yet, not even a breaker.
    pub fn new(route: &'a Route, want: Want<'a>) -> Walk<'a> {
        Walk {
            ahead: order(route, want).into_iter(),
            failures: Vec::new(),
            bad_sources: &route.bad_sources,
            digest: match want {
                Want::Blob(digest) => Some(digest),
                Want::ByDigest | Want::Tags => None,
            },
            resume_at: 0,
            size: None,
            sources: Vec::new(),
        }
    }

    /// Takes the outcome of trying `upstream`; `Err` ends the walk with that error.
    /// - `Answered`: the walk is over, and the breaker counts a success. Only now: a 2xx's
    ///   headers prove nothing until its body has arrived whole (a mirror that sends headers
    ///   and then cuts every body must open its breaker, and a half-open probe must not close
    ///   it on headers alone), so callers record `Answered` only once the answer is complete
    ///   (body read, or blob streamed to its end).
    /// - `NotFound`, `RateLimited`, `Unavailable`: listed for [`Walk::into_error`]; try the
    ///   next upstream. The breaker heard of connection errors, timeouts and 5xx at headers;
    ///   a 404, a 429, a 401/403 or a reply we cannot use is not a failure of the upstream.
    /// - `Cut { at }`: a failure for the breaker; listed; the next upstream resumes at `at`.
    /// - `Ours`: `Err`, at once: another upstream cannot fix our own failure.
    /// - `NoRanges`: listed; try the next upstream. The breaker hears nothing: the upstream is
    ///   alive, but its answer (the whole blob, unread) proves nothing either way.
    pub fn record(&mut self, upstream: &'a Upstream, outcome: Outcome) -> Result<()> {
        match outcome {
            Outcome::Answered => {
                upstream.record_success();
                Ok(())
            }
            Outcome::NotFound(e)
            | Outcome::RateLimited(e)
            | Outcome::Unavailable(e)
            | Outcome::NoRanges(e) => {
                self.push(upstream, e);
                Ok(())
            }
            Outcome::Cut { error, .. } if !moves_on(&error) => Err(error),
            Outcome::Cut { at, error } => {
                upstream.record_failure(&error);
                self.resume_at = at;
                self.push(upstream, error);
                Ok(())
            }
            Outcome::Ours(e) => Err(e),
        }
    }

    /// Where the next try of a blob starts (`Range: bytes=K-`): 0, or where the last body
    /// broke off.
    pub fn resume_at(&self) -> u64 {
        self.resume_at
    }

    /// The blob's size, as the first upstream whose body was taken said it.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// A blob response from `upstream` (asked from [`Walk::resume_at`]) says the blob is
    /// `total` bytes. The first body taken sets the size; a later upstream that disagrees is
    /// passed over (its try recorded, false returned). Otherwise it becomes one of the
    /// blob's sources, to blame if the digest does not match, and true is returned.
    pub fn take_body(&mut self, upstream: &'a Upstream, total: Option<u64>) -> bool {
        if self.sources.is_empty() {
            self.size = total;
        } else if let (Some(known), Some(total)) = (self.size, total)
            && known != total
        {
            let e = Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "{}: upstream {} says it is {total} bytes, an earlier one said {known}",
                    self.blob(),
                    upstream.name()
                ),
            );
            self.push(upstream, e);
            return false;
        }
        self.sources.push(upstream);
        true
    }

    /// The blob's bytes hashed to `actual`, not its digest. The clients attached to this
    /// fill already have the bad bytes and must fail, so the walk ends with the returned
    /// error. Every upstream that contributed bytes is blamed: its breaker counts a failure,
    /// and the next walk for this digest tries it last ([`BadSources`]), so the next pull
    /// gets good bytes from another upstream instead of failing the same way forever.
    pub fn wrong_bytes(&mut self, actual: &Digest) -> Error {
        let names: Vec<&str> = self.sources.iter().map(|u| u.name()).collect();
        let e = Error::new(
            ErrorKind::UpstreamInvalid,
            format!(
                "{}: upstream {} sent content with digest {actual}; discarded",
                self.blob(),
                names.join(" + ")
            ),
        );
        for u in &self.sources {
            u.record_failure(&e);
            if let Some(digest) = self.digest {
                self.bad_sources.mark(digest, u.name());
            }
        }
        e
    }

    /// Tries `attempt` on each upstream in order and returns the first answer, or the error
    /// that sums up every failure (`what` names the request in it).
    pub async fn first_success<T, F, Fut>(mut self, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut(&'a Upstream) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        while let Some(upstream) = self.next() {
            match attempt(upstream).await {
                Ok(v) => {
                    self.record(upstream, Outcome::Answered)?;
                    return Ok(v);
                }
                Err(e) => self.record(upstream, e.into())?,
            }
        }
        Err(self.into_error(what))
    }

    /// One error that stands for every try: 404 if no upstream had it, 429 (with the
    /// shortest `Retry-After`) if the only obstacles were rate limits, otherwise 502 (504 if
    /// every try timed out) with every try listed by upstream name.
    pub fn into_error(self, what: &str) -> Error {
        summarize(self.failures, what)
    }

    fn push(&mut self, upstream: &Upstream, e: Error) {
        tracing::debug!(upstream = upstream.name(), error = %e, "upstream failed; trying the next");
        self.failures.push(e);
    }

    fn blob(&self) -> String {
        match self.digest {
            Some(d) => format!("blob {d}"),
            None => "body".to_string(),
        }
    }
}

impl<'a> Iterator for Walk<'a> {
    type Item = &'a Upstream;

    /// The next upstream to try. One whose circuit is open is skipped, and the skip counted
    /// and listed; the breaker is asked only now, so a half-open breaker lets its one probe
    /// through to a request that really tries it.
    fn next(&mut self) -> Option<&'a Upstream> {
        for upstream in self.ahead.by_ref() {
            if upstream.admit() {
                return Some(upstream);
            }
            self.failures.push(Error::new(
                ErrorKind::UpstreamUnavailable,
                format!(
                    "upstream {} skipped: its circuit is open after repeated failures",
                    upstream.name()
                ),
            ));
        }
        None
    }
}

/// What one exchange's response headers (or the failure to get them) tell `upstream`'s
/// breaker. The transport calls this for every request it sends, so a retry after a token
/// and the second request of a blob HEAD count too.
///
/// Connection errors, timeouts and 5xx are failures. A 2xx counts for nothing yet: its body
/// may still break off, so its success is counted when the walk records
/// [`Outcome::Answered`] (and a broken body as a failure, in [`Walk::record`] or
/// [`after_body`]). Anything else (404, 429, 401/403, a redirect) is a complete answer from a
/// live upstream, and counts as a success at its headers.
pub(super) fn after_headers(
    upstream: &Upstream,
    status: std::result::Result<StatusCode, &Error>,
    what: &str,
) {
    match status {
        Err(e)
            if matches!(
                e.kind,
                ErrorKind::UpstreamUnavailable | ErrorKind::UpstreamTimeout
            ) =>
        {
            upstream.record_failure(e);
        }
        Ok(status) if status.is_server_error() => {
            upstream.record_failure(&format!("{what}: answered {status}"));
        }
        Ok(status) if status.is_success() => {}
        _ => upstream.record_success(),
    }
}

/// What a body read whole (a manifest, a tag list) that failed tells `upstream`'s breaker: a
/// body that broke off or stalled after a 2xx's headers is a failure of the upstream, as a
/// blob body's cut is ([`Outcome::Cut`]). A body over our size limit is not.
pub(super) fn after_body(upstream: &Upstream, e: &Error) {
    if matches!(
        e.kind,
        ErrorKind::UpstreamUnavailable | ErrorKind::UpstreamTimeout
    ) {
        upstream.record_failure(e);
    }
}

fn summarize(failures: Vec<Error>, what: &str) -> Error {
    let Some(first) = failures.first() else {
        return Error::internal(format!("{what}: the route has no upstreams"));
    };
    if failures.iter().all(is_not_found) {
        let mut e = first.clone();
        if failures.len() > 1 {
            e.message = format!("{what}: not found on any upstream ({})", join(&failures));
        }
        return e;
    }
    let limited: Vec<Option<Duration>> = failures
        .iter()
        .filter_map(|e| match e.kind {
            ErrorKind::TooManyRequests { retry_after } => Some(retry_after),
            _ => None,
        })
        .collect();
    if !limited.is_empty()
        && failures
            .iter()
            .all(|e| is_not_found(e) || matches!(e.kind, ErrorKind::TooManyRequests { .. }))
    {
        let retry_after = limited.iter().flatten().min().copied();
        return Error::new(
            ErrorKind::TooManyRequests { retry_after },
            format!(
                "{what}: rate-limited by every upstream that might have it ({})",
                join(&failures)
            ),
        );
    }
    let kind = if failures
        .iter()
        .all(|e| e.kind == ErrorKind::UpstreamTimeout)
    {
        ErrorKind::UpstreamTimeout
    } else {
        ErrorKind::UpstreamUnavailable
    };
    Error::new(
        kind,
        format!("{what}: every upstream failed ({})", join(&failures)),
    )
}

fn join(failures: &[Error]) -> String {
    failures
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests;
