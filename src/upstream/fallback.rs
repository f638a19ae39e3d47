//! Walking a route's upstreams in order until one answers.
//!
//! An upstream is passed over when its circuit is open, and left for the next one when it
//! fails (connection error, timeout, 5xx), rate-limits (429), refuses (401/403), sends content
//! that does not verify, or does not have the thing (404: a mirror that lacks an image is
//! normal). Our own failures (disk, internal) end the walk at once.
//!
//! When every upstream fails the client gets one error that sums them up: 404 if none had
//! it, 429 (with the shortest `Retry-After`) if the only obstacles were rate limits, and
//! otherwise 502 with every attempt listed. Upstream names and messages never hold secrets.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::client::Upstream;
use crate::error::{Error, ErrorKind, Result};

/// Should a failure of this kind send us to the next upstream?
pub fn moves_on(e: &Error) -> bool {
    e.is_upstream_failure()
        || matches!(
            e.kind,
            ErrorKind::NameUnknown | ErrorKind::ManifestUnknown | ErrorKind::BlobUnknown
        )
}

/// The failures collected while walking a route.
#[derive(Default)]
pub struct Attempts {
    failures: Vec<Error>,
}

impl Attempts {
    pub fn push(&mut self, upstream: &Upstream, e: Error) {
        tracing::debug!(upstream = upstream.name(), error = %e, "upstream failed; trying the next");
        self.failures.push(e);
    }

    pub fn circuit_open(&mut self, upstream: &Upstream) {
        self.failures.push(Error::new(
            ErrorKind::UpstreamUnavailable,
            format!(
                "upstream {} skipped: its circuit is open after repeated failures",
                upstream.name()
            ),
        ));
    }

    /// One error that stands for all the attempts.
    pub fn into_error(self, what: &str) -> Error {
        let failures = self.failures;
        if failures.is_empty() {
            return Error::internal(format!("{what}: the route has no upstreams"));
        }
        let not_found = |e: &Error| {
            matches!(
                e.kind,
                ErrorKind::NameUnknown | ErrorKind::ManifestUnknown | ErrorKind::BlobUnknown
            )
        };
        if failures.iter().all(not_found) {
            let mut e = failures[0].clone();
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
                .all(|e| not_found(e) || matches!(e.kind, ErrorKind::TooManyRequests { .. }))
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
}

fn join(failures: &[Error]) -> String {
    failures
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Tries `attempt` on each upstream in order and returns the first success.
pub async fn first_success<'a, T, F, Fut>(
    upstreams: &'a [Arc<Upstream>],
    what: &str,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(&'a Arc<Upstream>) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempts = Attempts::default();
    for upstream in upstreams {
        if !upstream.admit() {
            attempts.circuit_open(upstream);
            continue;
        }
        match attempt(upstream).await {
            Ok(v) => return Ok(v),
            Err(e) if moves_on(&e) => attempts.push(upstream, e),
            Err(e) => return Err(e),
        }
    }
    Err(attempts.into_error(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: ErrorKind) -> Error {
        Error::new(kind, "x")
    }

    fn combined(kinds: Vec<ErrorKind>) -> Error {
        Attempts {
            failures: kinds.into_iter().map(e).collect(),
        }
        .into_error("GET thing")
    }

    #[test]
    fn all_missing_is_404() {
        let r = combined(vec![ErrorKind::ManifestUnknown, ErrorKind::ManifestUnknown]);
        assert_eq!(r.kind, ErrorKind::ManifestUnknown);
        assert!(r.message.contains("not found on any upstream"));
    }

    #[test]
    fn rate_limits_are_429_with_shortest_retry() {
        let r = combined(vec![
            ErrorKind::TooManyRequests {
                retry_after: Some(Duration::from_secs(30)),
            },
            ErrorKind::BlobUnknown,
            ErrorKind::TooManyRequests {
                retry_after: Some(Duration::from_secs(5)),
            },
        ]);
        assert_eq!(
            r.kind,
            ErrorKind::TooManyRequests {
                retry_after: Some(Duration::from_secs(5))
            }
        );
    }

    #[test]
    fn anything_else_is_502_listing_attempts() {
        let r = Attempts {
            failures: vec![
                Error::new(ErrorKind::BlobUnknown, "mirror: 404"),
                Error::new(ErrorKind::UpstreamUnavailable, "origin: 503"),
            ],
        }
        .into_error("GET blob");
        assert_eq!(r.kind, ErrorKind::UpstreamUnavailable);
        assert!(
            r.message.contains("mirror: 404") && r.message.contains("origin: 503"),
            "{}",
            r.message
        );
        let r = combined(vec![ErrorKind::UpstreamTimeout, ErrorKind::UpstreamTimeout]);
        assert_eq!(r.kind, ErrorKind::UpstreamTimeout);
    }

    #[test]
    fn our_own_failures_do_not_move_on() {
        assert!(!moves_on(&e(ErrorKind::Storage)));
        assert!(!moves_on(&e(ErrorKind::Internal)));
        assert!(moves_on(&e(ErrorKind::UpstreamDenied)));
        assert!(moves_on(&e(ErrorKind::BlobUnknown)));
    }
}
