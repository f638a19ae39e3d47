//! Blob headers, `Range` and `HEAD`, on cold (never fetched) and warm (cached) blobs.

mod support;

use ::cistern::config::ColdRanges;
use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";
/// Not a power of two, so offsets and sizes in `Content-Range` are unambiguous.
const SIZE: usize = 1_000_000;

/// A cistern whose upstream has one blob; returns (upstream, cistern, blob, digest).
async fn setup(seed: u64) -> (FakeRegistry, TestCistern, bytes::Bytes, String) {
    setup_with(seed, ColdRanges::Upstream).await
}

/// [`setup`], with `cache.cold_ranges` set to `cold`.
async fn setup_with(
    seed: u64,
    cold: ColdRanges,
) -> (FakeRegistry, TestCistern, bytes::Bytes, String) {
    let (blob, digest) = blob_and_digest(SIZE, seed);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::start_with(&upstream, move |c| c.cache.cold_ranges = cold).await;
    (upstream, cistern, blob, digest)
}

#[track_caller]
fn assert_blob_headers(r: &Response, digest: &str) {
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("docker-content-digest"), Some(digest));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_carries_registry_headers_cold_and_warm() {
    let (upstream, cistern, blob, digest) = setup(1).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let cold = client.get(&route).await;
    assert_eq!(cold.status, StatusCode::OK);
    assert_blob_headers(&cold, &digest);
    assert_eq!(cold.header("content-length"), Some("1000000"));
    assert_same_bytes(cold.bytes(), &blob, "cold GET");

    cistern
        .data()
        .wait_for_blob(&digest, "the blob to be committed")
        .await;
    let before = upstream.requests().len();
    let warm = client.get(&route).await;
    assert_eq!(warm.status, StatusCode::OK);
    assert_blob_headers(&warm, &digest);
    assert_eq!(warm.header("content-length"), Some("1000000"));
    assert_same_bytes(warm.bytes(), &blob, "warm GET");
    assert_eq!(
        upstream.requests().len(),
        before,
        "a warm GET asks the upstream nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_ranges_are_served_partially_from_one_full_fetch() {
    // With `cold_ranges = "wait"`; the default is tested in tests/lazy_range.rs.
    // (range, first byte, last byte), each on a fresh cistern so every one is cold.
    let cases = [
        ("bytes=100-199", 100, 199),
        ("bytes=999000-", 999_000, SIZE - 1),
        ("bytes=-10", SIZE - 10, SIZE - 1),
        ("bytes=0-0", 0, 0),
    ];
    for (seed, (range, first, last)) in (10..).zip(cases) {
        let (upstream, cistern, blob, digest) = setup_with(seed, ColdRanges::Wait).await;
        let client = cistern.client();

        let r = client.get_range(&blob_route(REPO, &digest), range).await;
        assert_eq!(
            r.status,
            StatusCode::PARTIAL_CONTENT,
            "cold {range}: {}",
            r.body_text()
        );
        assert_blob_headers(&r, &digest);
        assert_range_body(&r, &blob, first, last, &format!("cold {range}"));

        // The fill behind it is a single upstream GET of the whole blob.
        let gets: Vec<Seen> = upstream.blob_get_requests(&digest);
        assert_eq!(gets.len(), 1, "cold {range}: upstream GETs");
        assert_eq!(
            gets[0].header_values("range"),
            Vec::<String>::new(),
            "cold {range}: the fill must not send Range"
        );
    }
}

/// A 206's `Content-Range` and `Content-Length` name bytes `first..=last` of the blob, and its
/// body is exactly those bytes.
#[track_caller]
fn assert_range_body(r: &Response, blob: &[u8], first: usize, last: usize, what: &str) {
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {first}-{last}/{SIZE}").as_str()),
        "{what}"
    );
    assert_eq!(
        r.header("content-length"),
        Some((last - first + 1).to_string().as_str()),
        "{what}"
    );
    assert_same_bytes(r.bytes(), &blob[first..=last], what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_ranges_are_served_from_the_cache() {
    let (upstream, cistern, blob, digest) = setup(20).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);
    cistern.get_blob_committed(REPO, &digest).await;
    let before = upstream.requests().len();

    for (range, first, last) in [
        ("bytes=0-99", 0, 99),
        ("bytes=123456-654321", 123_456, 654_321),
        ("bytes=999990-", 999_990, SIZE - 1),
        ("bytes=-1", SIZE - 1, SIZE - 1),
        ("bytes=-1000000", 0, SIZE - 1),
        // A last byte past the end is clamped to the end (RFC 9110, 14.1.2).
        ("bytes=999000-5000000", 999_000, SIZE - 1),
    ] {
        let r = client.get_range(&route, range).await;
        assert_eq!(
            r.status,
            StatusCode::PARTIAL_CONTENT,
            "warm {range}: {}",
            r.body_text()
        );
        assert_range_body(&r, &blob, first, last, &format!("warm {range}"));
    }
    assert_eq!(
        upstream.requests().len(),
        before,
        "warm ranges ask the upstream nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_range_is_416_cold_and_warm() {
    let (_upstream, cistern, _blob, digest) = setup(30).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let cold = client.get_range(&route, "bytes=1000000-").await;
    assert_eq!(
        cold.status,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "cold: {}",
        cold.body_text()
    );
    assert_eq!(
        cold.header("content-range"),
        Some("bytes */1000000"),
        "cold"
    );

    cistern.get_blob_committed(REPO, &digest).await;
    for range in ["bytes=1000000-", "bytes=2000000-2000010"] {
        let warm = client.get_range(&route, range).await;
        assert_eq!(
            warm.status,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "warm {range}: {}",
            warm.body_text()
        );
        assert_eq!(
            warm.header("content-range"),
            Some("bytes */1000000"),
            "warm {range}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_never_fetched_blob_asks_upstream_without_downloading() {
    let (upstream, cistern, _blob, digest) = setup(40).await;

    let head = cistern.client().head(&blob_route(REPO, &digest)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_blob_headers(&head, &digest);
    assert_eq!(head.header("content-length"), Some("1000000"));
    assert_eq!(head.bytes().len(), 0);

    assert_eq!(
        upstream.blob_gets(&digest),
        0,
        "a HEAD must not download the blob"
    );
    assert!(upstream.count(Method::HEAD, Kind::Blob, &digest) >= 1);
    cistern.data().assert_no_blob_files("a HEAD caches nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_falls_back_to_a_one_byte_range_get_when_upstream_head_has_no_length() {
    let (blob, digest) = blob_and_digest(SIZE, 50);
    let upstream = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::HeadWithoutLength).await;
    let cistern = TestCistern::start(&upstream).await;

    let head = cistern.client().head(&blob_route(REPO, &digest)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), Some("1000000"));

    let gets: Vec<Seen> = upstream.blob_get_requests(&digest);
    assert!(
        !gets.is_empty(),
        "expected a GET with Range: bytes=0-0 after a HEAD without length"
    );
    for get in &gets {
        assert_eq!(
            get.header_values("range"),
            ["bytes=0-0"],
            "the fallback must not download the blob"
        );
    }
    cistern.data().assert_no_blob_files("a HEAD caches nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_of_a_cached_blob_asks_upstream_nothing() {
    let (upstream, cistern, _blob, digest) = setup(60).await;
    let client = cistern.client();
    cistern.get_blob_committed(REPO, &digest).await;
    let before = upstream.requests().len();

    let head = client.head(&blob_route(REPO, &digest)).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_blob_headers(&head, &digest);
    assert_eq!(head.header("content-length"), Some("1000000"));
    assert_eq!(upstream.requests().len(), before);
}
