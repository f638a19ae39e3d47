//! The walk's rules, without a network: upstreams built from config with URLs that are never
//! contacted, because a walk does no IO.

use std::sync::Arc;

use super::*;
use crate::config::Config;
use crate::oci::RepoName;
use crate::upstream::Routes;

fn e(kind: ErrorKind) -> Error {
    Error::new(kind, "x")
}

fn combined(kinds: Vec<ErrorKind>) -> Error {
    summarize(kinds.into_iter().map(e).collect(), "GET thing")
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
    let r = summarize(
        vec![
            Error::new(ErrorKind::BlobUnknown, "mirror: 404"),
            Error::new(ErrorKind::UpstreamUnavailable, "origin: 503"),
        ],
        "GET blob",
    );
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

#[test]
fn errors_classify_into_outcomes() {
    assert!(matches!(
        Outcome::from(e(ErrorKind::NameUnknown)),
        Outcome::NotFound(_)
    ));
    assert!(matches!(
        Outcome::from(e(ErrorKind::TooManyRequests { retry_after: None })),
        Outcome::RateLimited(_)
    ));
    for kind in [
        ErrorKind::UpstreamUnavailable,
        ErrorKind::UpstreamTimeout,
        ErrorKind::UpstreamDenied,
        ErrorKind::UpstreamInvalid,
    ] {
        assert!(matches!(Outcome::from(e(kind)), Outcome::Unavailable(_)));
    }
    assert!(matches!(
        Outcome::from(e(ErrorKind::Storage)),
        Outcome::Ours(_)
    ));
}

/// A route "docker.io" over `mirror` then `origin`, tags from `origin` only. The URLs
/// are never contacted: a walk does no IO. One failure opens a breaker, for an hour of a
/// clock that stands still.
fn route() -> Arc<Route> {
    let config = Config::from_toml(
        r#"
        [upstreams.mirror]
        url = "http://127.0.0.1:9"
        breaker_failures = 1
        breaker_cooldown = "1h"
        [upstreams.origin]
        url = "http://127.0.0.1:9"
        breaker_failures = 1
        breaker_cooldown = "1h"
        [[routes]]
        registry = "docker.io"
        upstreams = ["mirror", "origin"]
        tags_from = ["origin"]
        default = true
        "#,
    )
    .unwrap();
    let clock = crate::clock::Clock::manual(std::time::SystemTime::UNIX_EPOCH);
    let routes = Routes::from_config(&config, &clock).unwrap();
    routes
        .resolve(None, &RepoName::parse("library/app").unwrap())
        .unwrap()
        .route
}

fn names(walk: Walk<'_>) -> Vec<&str> {
    walk.map(|u| u.name()).collect()
}

fn digest() -> Digest {
    Digest::of(b"blob")
}

fn err(kind: ErrorKind, message: &str) -> Error {
    Error::new(kind, message)
}

#[test]
fn tags_come_only_from_tags_from() {
    let route = route();
    assert_eq!(
        names(Walk::new(&route, Want::ByDigest)),
        ["mirror", "origin"]
    );
    assert_eq!(names(Walk::new(&route, Want::Tags)), ["origin"]);
    let d = digest();
    assert_eq!(
        names(Walk::new(&route, Want::Blob(&d))),
        ["mirror", "origin"]
    );
}

#[test]
fn the_first_answer_ends_the_walk() {
    let route = route();
    let mut walk = Walk::new(&route, Want::ByDigest);
    let mirror = walk.next().unwrap();
    walk.record(
        mirror,
        Outcome::from(err(ErrorKind::ManifestUnknown, "mirror: 404")),
    )
    .unwrap();
    let origin = walk.next().unwrap();
    assert_eq!(origin.name(), "origin");
    walk.record(origin, Outcome::Answered).unwrap();
    assert!(walk.next().is_none());
}

#[tokio::test]
async fn first_success_stops_at_an_answer_or_our_own_failure() {
    let route = route();
    let mut tried = Vec::new();
    let got = Walk::new(&route, Want::ByDigest)
        .first_success("GET thing", |u| {
            tried.push(u.name().to_string());
            let name = u.name().to_string();
            async move {
                match name.as_str() {
                    "mirror" => Err(err(ErrorKind::UpstreamUnavailable, "mirror: 503")),
                    _ => Ok(name),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(got, "origin");
    assert_eq!(tried, ["mirror", "origin"]);

    let mut tried = 0;
    let e = Walk::new(&route, Want::ByDigest)
        .first_success("GET thing", |_| {
            tried += 1;
            async { Err::<(), _>(err(ErrorKind::Storage, "disk")) }
        })
        .await
        .unwrap_err();
    assert_eq!((e.kind, tried), (ErrorKind::Storage, 1));

    let e = Walk::new(&route, Want::ByDigest)
        .first_success("GET thing", |u| {
            let m = format!("{}: 404", u.name());
            async move { Err::<(), _>(err(ErrorKind::BlobUnknown, &m)) }
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::BlobUnknown);
    assert!(e.message.contains("mirror: 404") && e.message.contains("origin: 404"));
}

#[test]
fn an_open_circuit_is_skipped_counted_and_listed() {
    let route = route();
    let mirror = &*route.upstreams[0];
    after_headers(mirror, Ok(StatusCode::BAD_GATEWAY), "GET thing");
    assert!(mirror.stats().circuit_open);
    let mut walk = Walk::new(&route, Want::ByDigest);
    assert_eq!(walk.next().unwrap().name(), "origin");
    assert_eq!(mirror.stats().skipped, 1);
    let e = walk.into_error("GET thing");
    assert!(
        e.message.contains("upstream mirror skipped"),
        "{}",
        e.message
    );
}

#[test]
fn the_breaker_is_asked_only_when_the_walk_reaches_an_upstream() {
    let route = route();
    let origin = &*route.upstreams[1];
    after_headers(origin, Ok(StatusCode::SERVICE_UNAVAILABLE), "GET thing");
    let mut walk = Walk::new(&route, Want::ByDigest);
    let mirror = walk.next().unwrap();
    walk.record(mirror, Outcome::Answered).unwrap();
    drop(walk);
    assert_eq!(origin.stats().skipped, 0, "never reached, never skipped");
}

#[test]
fn headers_count_failures_only_for_connection_errors_timeouts_and_5xx() {
    let route = route();
    let u = &*route.upstreams[0];
    for answered in [
        Ok(StatusCode::OK),
        Ok(StatusCode::NOT_FOUND),
        Ok(StatusCode::TOO_MANY_REQUESTS),
        Ok(StatusCode::UNAUTHORIZED),
        Err(&err(ErrorKind::UpstreamDenied, "token refused")),
    ] {
        after_headers(u, answered, "GET thing");
    }
    assert_eq!(u.stats().failures, 0);
    assert!(!u.stats().circuit_open);
    after_headers(u, Err(&err(ErrorKind::UpstreamTimeout, "slow")), "GET");
    assert_eq!(u.stats().failures, 1);
    assert!(u.stats().circuit_open);
    let origin = &*route.upstreams[1];
    after_headers(
        origin,
        Err(&err(ErrorKind::UpstreamUnavailable, "refused")),
        "GET",
    );
    assert_eq!(origin.stats().failures, 1);
}

#[test]
fn a_cut_body_resumes_on_the_next_upstream_at_its_byte() {
    let route = route();
    let d = digest();
    let mut walk = Walk::new(&route, Want::Blob(&d));
    let mirror = walk.next().unwrap();
    assert_eq!(walk.resume_at(), 0);
    assert!(walk.take_body(mirror, Some(100)));
    let cut = err(ErrorKind::UpstreamUnavailable, "mirror: body failed");
    walk.record(mirror, Outcome::Cut { at: 40, error: cut })
        .unwrap();
    assert_eq!(mirror.stats().failures, 1, "a cut body counts against it");
    let origin = walk.next().unwrap();
    assert_eq!((origin.name(), walk.resume_at()), ("origin", 40));
    assert!(walk.take_body(origin, Some(100)));
    assert_eq!(walk.size(), Some(100));
    walk.record(origin, Outcome::Answered).unwrap();
    assert!(walk.next().is_none(), "each upstream at most once");
}

#[test]
fn upstreams_must_agree_on_a_blobs_size() {
    let route = route();
    let d = digest();
    let mut walk = Walk::new(&route, Want::Blob(&d));
    let mirror = walk.next().unwrap();
    assert!(walk.take_body(mirror, Some(100)));
    let cut = err(ErrorKind::UpstreamTimeout, "mirror: stalled");
    walk.record(mirror, Outcome::Cut { at: 10, error: cut })
        .unwrap();
    let origin = walk.next().unwrap();
    assert!(!walk.take_body(origin, Some(99)));
    assert_eq!(
        origin.stats().failures,
        0,
        "a reply we cannot use is not a failure"
    );
    assert!(walk.next().is_none());
    let e = walk.into_error("blob");
    assert_eq!(e.kind, ErrorKind::UpstreamUnavailable);
    assert!(
        e.message
            .contains("says it is 99 bytes, an earlier one said 100"),
        "{}",
        e.message
    );
}

#[test]
fn wrong_bytes_blame_every_source_and_demote_them_for_that_blob() {
    let route = route();
    let d = digest();
    let mut walk = Walk::new(&route, Want::Blob(&d));
    let mirror = walk.next().unwrap();
    assert!(walk.take_body(mirror, None));
    let cut = err(ErrorKind::UpstreamUnavailable, "mirror: cut");
    walk.record(mirror, Outcome::Cut { at: 3, error: cut })
        .unwrap();
    let origin = walk.next().unwrap();
    assert!(walk.take_body(origin, None));
    walk.record(origin, Outcome::Answered).unwrap();
    let e = walk.wrong_bytes(&Digest::of(b"other"));
    assert_eq!(e.kind, ErrorKind::UpstreamInvalid);
    assert!(e.message.contains("mirror + origin"), "{}", e.message);
    assert_eq!(origin.stats().failures, 1);
    assert_eq!(
        mirror.stats().failures,
        2,
        "its cut, then its share of the bytes"
    );
    // Both are suspect for this blob now (the next walk tries them last); other blobs
    // are not affected.
    assert!(route.bad_sources.is_bad(&d, "mirror") && route.bad_sources.is_bad(&d, "origin"));
    let other = Digest::of(b"another blob");
    assert!(!route.bad_sources.is_bad(&other, "mirror"));
}

#[test]
fn sources_that_sent_wrong_bytes_go_last_for_that_blob() {
    let route = route();
    let d = digest();
    route.bad_sources.mark(&d, "mirror");
    let tried = |want| -> Vec<&str> { order(&route, want).iter().map(|u| u.name()).collect() };
    assert_eq!(tried(Want::Blob(&d)), ["origin", "mirror"]);
    let other = Digest::of(b"another blob");
    assert_eq!(tried(Want::Blob(&other)), ["mirror", "origin"]);
    assert_eq!(tried(Want::ByDigest), ["mirror", "origin"]);
}

#[test]
fn our_own_failure_ends_the_walk() {
    let route = route();
    let mut walk = Walk::new(&route, Want::ByDigest);
    let mirror = walk.next().unwrap();
    let e = walk
        .record(mirror, Outcome::from(err(ErrorKind::Storage, "disk full")))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Storage);
}

#[test]
fn an_upstream_without_ranges_is_passed_over_without_a_breaker_event() {
    let route = route();
    let d = digest();
    let mut walk = Walk::new(&route, Want::Blob(&d));
    let mirror = walk.next().unwrap();
    let no_ranges = err(ErrorKind::UpstreamInvalid, "mirror: 200 to a Range");
    walk.record(mirror, Outcome::NoRanges(no_ranges)).unwrap();
    assert_eq!(
        mirror.stats().failures,
        0,
        "an upstream without ranges is alive"
    );
    assert!(!mirror.stats().circuit_open);
    let origin = walk.next().unwrap();
    assert_eq!(origin.name(), "origin");
    walk.record(origin, Outcome::Answered).unwrap();
    assert!(walk.next().is_none());

    // With no upstream serving ranges, the summary lists each.
    let mut walk = Walk::new(&route, Want::Blob(&d));
    while let Some(u) = walk.next() {
        let e = err(
            ErrorKind::UpstreamInvalid,
            &format!("{}: no ranges", u.name()),
        );
        walk.record(u, Outcome::NoRanges(e)).unwrap();
    }
    let e = walk.into_error("GET blob range");
    assert!(
        e.message.contains("mirror: no ranges") && e.message.contains("origin: no ranges"),
        "{}",
        e.message
    );
}
