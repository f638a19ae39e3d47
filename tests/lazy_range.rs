//! Ranges of blobs not cached yet (`cold_ranges`, issue 16): with "upstream" (the default) a
//! range is answered from a ranged upstream request, or from what the whole blob's fill has
//! already written, without waiting for the fill; the fill still caches only a verified blob.
//!
//! Every test holds the fill's whole-blob GET at a gate a little way into the blob while
//! ranged GETs answer at once, so "answered before the fill got there" is a fact of the test,
//! not a timing.

mod support;

use ::cistern::cache::ranges::MAX_FETCHES_PER_FILL;
use ::cistern::config::{ColdRanges, RouteConfig};
use http::StatusCode;
use support::*;

const REPO: &str = "library/app";
/// Not a power of two, so offsets in `Content-Range` are unambiguous.
const SIZE: usize = 4_000_000;
/// Where the fill's whole-blob GET is held.
const HELD_AT: u64 = 64 * KIB as u64;

/// An upstream whose whole-blob GETs of the blob stop at [`HELD_AT`] until `gate` opens (and
/// follow `whole` too, if given), and whose ranged GETs follow `ranged`, if given.
async fn held_upstream(
    blob: &bytes::Bytes,
    gate: &Gate,
    whole: Option<Fault>,
    ranged: Option<Rule>,
) -> FakeRegistry {
    let digest = sha256_digest(blob);
    let held = Fault::GateAt(HELD_AT, gate.clone());
    let held = match whole {
        Some(fault) => held.and(fault),
        None => Rule::from(held),
    };
    let mut builder = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(&digest, held.whole_only());
    if let Some(rule) = ranged {
        builder = builder.on_blob(&digest, rule.ranged_only());
    }
    builder.start().await
}

/// A cistern (with its admin API, for `/metrics`) in front of `upstream`.
async fn cistern(upstream: &FakeRegistry, cold: ColdRanges) -> TestCistern {
    TestCistern::builder()
        .front(upstream)
        .admin()
        .config(move |c| c.cache.cold_ranges = cold)
        .start()
        .await
}

/// Checks a 206 for `first..=last` of the blob, and its bytes against `want`.
#[track_caller]
fn assert_range(r: &Response, want: &[u8], first: usize, last: usize, what: &str) {
    assert_eq!(
        r.status,
        StatusCode::PARTIAL_CONTENT,
        "{what}: {}",
        r.body_text()
    );
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {first}-{last}/{SIZE}").as_str()),
        "{what}"
    );
    assert_same_bytes(r.bytes(), want, what);
}

fn range(first: usize, last: usize) -> String {
    format!("bytes={first}-{last}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_is_answered_while_the_fill_is_far_from_it() {
    let (blob, digest) = blob_and_digest(SIZE, 1);
    let gate = Gate::new();
    let upstream = held_upstream(&blob, &gate, None, None).await;
    let cistern = cistern(&upstream, ColdRanges::Upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    // Near the end of the layer, where a table of contents is: the fill is held at 64 KiB.
    let (first, last) = (3_900_000, 3_999_999);
    let r = client.get_range(&route, range(first, last)).await;
    assert_range(&r, &blob[first..=last], first, last, "a cold range");
    assert_eq!(gate.reached(), 1, "the fill is held at its gate");

    // One ranged GET for exactly those bytes, and one whole-blob GET (the fill) without Range.
    let reads = upstream.blob_range_reads(&digest);
    assert_eq!(reads.len(), 1);
    assert_eq!(reads[0].header_values("range"), [range(first, last)]);
    let whole: Vec<Seen> = upstream
        .blob_get_requests(&digest)
        .into_iter()
        .filter(|s| s.header("range").is_none())
        .collect();
    assert_eq!(whole.len(), 1, "the whole blob is fetched once");
    assert_eq!(
        cistern
            .metric(r#"cistern_cold_ranges_total{source="fetched"}"#)
            .await,
        1.0
    );

    // A range the fill has already written comes from the fill. A whole-blob reader shows how
    // far that is: it gets every byte the fill has but the last of the blob.
    let whole_reader = client.spawn_readers(&route, 1);
    whole_reader.received_at_least(HELD_AT as usize).await;
    let r = client.get_range(&route, range(1000, 1999)).await;
    assert_range(&r, &blob[1000..2000], 1000, 1999, "a range the fill wrote");
    assert_eq!(
        upstream.blob_range_reads(&digest).len(),
        1,
        "no new ranged GET"
    );
    assert_eq!(
        cistern
            .metric(r#"cistern_cold_ranges_total{source="fill"}"#)
            .await,
        1.0
    );

    gate.open();
    whole_reader.all_receive(&blob).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fill_commits_the_verified_blob_and_later_requests_hit_the_cache() {
    let (blob, digest) = blob_and_digest(SIZE, 2);
    let gate = Gate::new();
    let upstream = held_upstream(&blob, &gate, None, None).await;
    let cistern = cistern(&upstream, ColdRanges::Upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let (first, last) = (2_000_000, 2_000_099);
    let r = client.get_range(&route, range(first, last)).await;
    assert_range(&r, &blob[first..=last], first, last, "a cold range");
    // Whole-blob responses still wait for verification: this one completes only after the
    // gate opens and the blob verifies.
    let whole = client.spawn_readers(&route, 1);
    whole.started().await;
    gate.open();
    whole.all_receive(&blob).await;
    cistern
        .data()
        .wait_for_blob(&digest, "the fill's commit")
        .await;
    assert_same_bytes(
        &cistern.data().committed_blob(&digest).await,
        &blob,
        "the committed blob",
    );

    let before = upstream.requests().len();
    let r = client.get_range(&route, range(first, last)).await;
    assert_range(&r, &blob[first..=last], first, last, "a warm range");
    let r = client.get_range(&route, range(10, 20)).await;
    assert_range(&r, &blob[10..=20], 10, 20, "another warm range");
    assert_same_bytes(
        &client.get_blob(REPO, &digest).await.unwrap(),
        &blob,
        "warm GET",
    );
    assert_eq!(upstream.requests().len(), before, "the cache answers alone");
    assert_eq!(
        cistern
            .metric("cistern_cold_range_blobs_failed_verification_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_holds_a_cold_range_until_the_blob_verifies() {
    let (blob, digest) = blob_and_digest(SIZE, 3);
    let gate = Gate::new();
    let upstream = held_upstream(&blob, &gate, None, None).await;
    // Set on the route, over the default of `[cache]`.
    let cistern = TestCistern::builder()
        .upstream("origin", at(&upstream.url()))
        .route(RouteConfig {
            cold_ranges: Some(ColdRanges::Wait),
            ..default_route("docker.io", &["origin"])
        })
        .start()
        .await;
    assert_eq!(cistern.config().cache.cold_ranges, ColdRanges::Upstream);
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let (first, last) = (3_000_000, 3_000_999);
    let ranged = client.spawn_readers_with(&route, 1, |r| r.header("range", range(first, last)));
    gate.wait_reached(1).await;
    gate.open();
    let got = ranged
        .finish()
        .await
        .remove(0)
        .expect("the range, once verified");
    assert_same_bytes(&got, &blob[first..=last], "a range with cold_ranges = wait");
    assert_eq!(upstream.blob_range_reads(&digest).len(), 0, "no ranged GET");
    assert_eq!(upstream.blob_gets(&digest), 1, "only the fill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_upstream_gets_no_whole_blob_through_and_is_counted() {
    let (blob, digest) = blob_and_digest(SIZE, 4);
    let gate = Gate::new();
    let upstream = held_upstream(
        &blob,
        &gate,
        Some(Fault::WrongBytes),
        Some(Rule::from(Fault::WrongBytes)),
    )
    .await;
    let cistern = cistern(&upstream, ColdRanges::Upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    // A range carries the upstream's bytes, unverified: here, wrong ones.
    let (first, last) = (1_000_000, 1_000_999);
    let r = client.get_range(&route, range(first, last)).await;
    let inverted: Vec<u8> = blob[first..=last].iter().map(|b| !b).collect();
    assert_range(
        &r,
        &inverted,
        first,
        last,
        "a range from a corrupting upstream",
    );

    // A whole-blob reader on the same fill never gets a complete body.
    let whole = client.spawn_readers(&route, 1);
    whole.started().await;
    gate.open();
    whole.all_fail("of a blob that did not verify").await;
    retry_until("the failed verification to be counted", || async {
        let failed = cistern
            .metric("cistern_cold_range_blobs_failed_verification_total")
            .await;
        (failed == 1.0).then_some(())
    })
    .await;
    assert_eq!(cistern.data().blob_files().len(), 0, "nothing committed");
    // Nor does a whole-blob GET of a fresh fill.
    assert!(client.get_blob(REPO, &digest).await.is_err());
    assert_eq!(
        cistern.data().blob_files().len(),
        0,
        "still nothing committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ranges_inside_one_being_fetched_share_it() {
    let (blob, digest) = blob_and_digest(SIZE, 5);
    let gate = Gate::new();
    let ranges_gate = Gate::new();
    let held_range = Fault::GateAt(0, ranges_gate.clone());
    let upstream = held_upstream(&blob, &gate, None, Some(Rule::from(held_range))).await;
    let cistern = cistern(&upstream, ColdRanges::Upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let (first, last) = (1_000_000, 1_999_999);
    let outer = client.spawn_readers_with(&route, 2, |r| r.header("range", range(first, last)));
    ranges_gate.wait_reached(1).await;
    let inner = client.spawn_readers_with(&route, 1, |r| {
        r.header("range", range(1_500_000, 1_500_999))
    });
    // Both later requests have joined the one fetch (the first started it) before it answers.
    retry_until("two ranges to join the running fetch", || async {
        let joined = cistern
            .metric(r#"cistern_cold_ranges_total{source="joined"}"#)
            .await;
        (joined == 2.0).then_some(())
    })
    .await;
    ranges_gate.open();
    outer.all_receive(&blob[first..=last]).await;
    inner.all_receive(&blob[1_500_000..1_501_000]).await;
    assert_eq!(
        upstream.blob_range_reads(&digest).len(),
        1,
        "one upstream ranged GET"
    );
    assert_eq!(ranges_gate.reached(), 1);
    gate.open();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_requests_per_fill_are_bounded() {
    let (blob, digest) = blob_and_digest(SIZE, 6);
    let gate = Gate::new();
    let upstream = held_upstream(&blob, &gate, None, None).await;
    let cistern = cistern(&upstream, ColdRanges::Upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    // A storm of small distinct ranges past the fill: each of the first ones costs the
    // upstream one ranged GET.
    let at = |i: usize| 100_000 + i * 1000;
    for i in 0..MAX_FETCHES_PER_FILL {
        let r = client.get_range(&route, range(at(i), at(i) + 99)).await;
        assert_range(
            &r,
            &blob[at(i)..at(i) + 100],
            at(i),
            at(i) + 99,
            "a small range",
        );
    }
    assert_eq!(
        upstream.blob_range_reads(&digest).len(),
        MAX_FETCHES_PER_FILL
    );

    // One more follows the fill: it is sent once the fill has written its bytes.
    let i = MAX_FETCHES_PER_FILL;
    let over =
        client.spawn_readers_with(&route, 1, |r| r.header("range", range(at(i), at(i) + 99)));
    retry_until("the range past the bound to follow the fill", || async {
        let followed = cistern
            .metric(r#"cistern_cold_ranges_total{source="followed"}"#)
            .await;
        (followed == 1.0).then_some(())
    })
    .await;
    gate.open();
    over.all_receive(&blob[at(i)..at(i) + 100]).await;
    assert_eq!(
        upstream.blob_range_reads(&digest).len(),
        MAX_FETCHES_PER_FILL,
        "no ranged GET past the bound"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_ignores_range_sends_the_range_to_the_fill() {
    let (blob, digest) = blob_and_digest(SIZE, 7);
    let gate = Gate::new();
    let upstream = held_upstream(&blob, &gate, None, Some(Rule::from(Fault::IgnoreRange))).await;
    let cistern = cistern(&upstream, ColdRanges::Upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let (first, last) = (500_000, 500_999);
    let ranged = client.spawn_readers_with(&route, 1, |r| r.header("range", range(first, last)));
    retry_until("the range to follow the fill", || async {
        let unanswered = cistern
            .metric("cistern_cold_range_fetches_unanswered_total")
            .await;
        (unanswered == 1.0).then_some(())
    })
    .await;
    gate.open();
    ranged.all_receive(&blob[first..=last]).await;
    assert_eq!(
        upstream.blob_range_reads(&digest).len(),
        1,
        "asked once, answered 200"
    );
    assert_eq!(
        cistern
            .metric(r#"cistern_cold_ranges_total{source="fetched"}"#)
            .await,
        1.0
    );
    assert_eq!(
        cistern
            .metric(&format!(
                r#"cistern_upstream_failures_total{{upstream="{}"}}"#,
                upstream.addr()
            ))
            .await,
        0.0,
        "a 200 to a Range is no failure of the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_walks_the_route_with_fallback_and_breaker_accounting() {
    let (blob, digest) = blob_and_digest(SIZE, 8);
    let gate = Gate::new();
    // The mirror serves the fill (held at its gate) but fails ranged GETs; the origin serves.
    let mirror = held_upstream(&blob, &gate, None, Some(Rule::from(Fault::Status(503)))).await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder()
        .upstream("mirror", at(&mirror.url()))
        .upstream("origin", at(&origin.url()))
        .route(default_route("docker.io", &["mirror", "origin"]))
        .admin()
        .start()
        .await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let (first, last) = (3_500_000, 3_500_999);
    let r = client.get_range(&route, range(first, last)).await;
    assert_range(
        &r,
        &blob[first..=last],
        first,
        last,
        "a range from the origin",
    );
    assert_eq!(
        mirror.blob_range_reads(&digest).len(),
        1,
        "the mirror was asked first"
    );
    assert_eq!(origin.blob_range_reads(&digest).len(), 1);
    assert_eq!(
        origin.blob_gets(&digest),
        1,
        "the origin only served the range"
    );
    let failures = |name: &str| format!(r#"cistern_upstream_failures_total{{upstream="{name}"}}"#);
    assert_eq!(
        cistern.metric(&failures("mirror")).await,
        1.0,
        "its 503 counts"
    );
    assert_eq!(cistern.metric(&failures("origin")).await, 0.0);
    gate.open();
    cistern.get_blob_committed(REPO, &digest).await;
}
