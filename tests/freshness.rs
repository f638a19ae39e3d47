//! Tag freshness: TTLs, stale-if-error (also across a restart), stale-while-revalidate,
//! negative caching of missing tags, and offline mode. Time is a manual clock
//! (`cistern::clock::Clock`) that each test steps past a TTL, or stops just short of one:
//! nothing sleeps for time to pass, and the edges of every window are exact.

mod support;

use std::time::{Duration, SystemTime};

use ::cistern::clock::Clock;
use ::cistern::config::Config;
use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";

fn manifest(seed: u32) -> Bytes {
    let config = sha256_digest(format!("config {seed}").as_bytes());
    Bytes::from(format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"{OCI_MANIFEST}\",\"config\":{{\"mediaType\":\
         \"application/vnd.oci.image.config.v1+json\",\"digest\":\"{config}\",\"size\":2}},\"layers\":[]}}"
    ))
}

const SECOND: Duration = Duration::from_secs(1);

fn clock() -> Clock {
    Clock::manual(SystemTime::now())
}

/// A cistern in front of `upstream` on `data`, its tag answers dated by `clock`.
async fn start_on(
    upstream: &FakeRegistry,
    data: DataDir,
    clock: &Clock,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> TestCistern {
    TestCistern::builder()
        .front(upstream)
        .data(data)
        .clock(clock)
        .config(tweak)
        .start()
        .await
}

async fn start(
    upstream: &FakeRegistry,
    clock: &Clock,
    tweak: impl FnOnce(&mut Config) + Send + 'static,
) -> TestCistern {
    start_on(upstream, DataDir::new(), clock, tweak).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_answer_is_served_until_its_ttl_and_asked_again_after() {
    let (old, new) = (manifest(20), manifest(21));
    let upstream = FakeRegistry::with_manifest(REPO, Some("1.0"), OCI_MANIFEST, &old).await;
    let clock = clock();
    let ttl = Duration::from_secs(300);
    let cistern = start(&upstream, &clock, move |c| {
        c.cache.tag_ttl = ttl;
        c.cache.stale_while_revalidate = Duration::ZERO;
    })
    .await;
    let client = cistern.client();
    assert_eq!(client.get_manifest(REPO, "1.0").await.bytes(), &old);
    let asked = upstream.manifest_requests();

    upstream.add_manifest(REPO, Some("1.0"), OCI_MANIFEST, new.clone());
    clock.advance(ttl - SECOND);
    assert_eq!(
        client.get_manifest(REPO, "1.0").await.bytes(),
        &old,
        "still fresh"
    );
    assert_eq!(
        upstream.manifest_requests(),
        asked,
        "a fresh answer asks no upstream"
    );

    clock.advance(2 * SECOND);
    assert_eq!(
        client.get_manifest(REPO, "1.0").await.bytes(),
        &new,
        "expired: asked again"
    );
    assert!(upstream.manifest_requests() > asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_rules_give_matching_tags_their_own_ttl() {
    use ::cistern::config::TagRule;
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("latest"), OCI_MANIFEST, manifest(22))
        .manifest(REPO, Some("1.0"), OCI_MANIFEST, manifest(23))
        .start()
        .await;
    let clock = clock();
    let cistern = start(&upstream, &clock, move |c| {
        c.cache.tag_ttl = Duration::from_secs(86_400);
        c.cache.tag_rules = vec![TagRule {
            pattern: "lat*".into(),
            ttl: Duration::from_secs(60),
        }];
        c.cache.stale_while_revalidate = Duration::ZERO;
    })
    .await;
    let client = cistern.client();
    assert_eq!(
        client.get_manifest(REPO, "latest").await.bytes(),
        &manifest(22)
    );
    assert_eq!(
        client.get_manifest(REPO, "1.0").await.bytes(),
        &manifest(23)
    );

    upstream.add_manifest(REPO, Some("latest"), OCI_MANIFEST, manifest(24));
    upstream.add_manifest(REPO, Some("1.0"), OCI_MANIFEST, manifest(25));
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        client.get_manifest(REPO, "latest").await.bytes(),
        &manifest(24),
        "the rule's 60 s ran out"
    );
    assert_eq!(
        client.get_manifest(REPO, "1.0").await.bytes(),
        &manifest(23),
        "the default day did not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_last_answer_when_every_upstream_fails() {
    let old = manifest(1);
    let upstream = FakeRegistry::with_manifest(REPO, Some("1.0"), OCI_MANIFEST, &old).await;
    let clock = clock();
    let ttl = Duration::from_secs(60);
    let window = Duration::from_secs(3600);
    let cistern = start(&upstream, &clock, move |c| {
        c.cache.tag_ttl = ttl;
        c.cache.stale_while_revalidate = Duration::ZERO;
        c.cache.stale_if_error = window;
    })
    .await;
    let client = cistern.client();
    assert_eq!(client.get_manifest(REPO, "1.0").await.bytes(), &old);

    upstream.on_manifest("1.0", Fault::Status(503));
    clock.advance(ttl + window - SECOND);
    let stale = client.get_manifest(REPO, "1.0").await;
    assert_eq!(stale.status, StatusCode::OK, "{}", stale.body_text());
    assert_eq!(stale.bytes(), &old);
    assert!(
        stale
            .header("warning")
            .is_some_and(|w| w.starts_with("111 ")),
        "a stale answer says so: {:?}",
        stale.header("warning")
    );
    let head = client.head(&manifest_route(REPO, "1.0")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.header("warning").is_some());

    // Past the stale-if-error window, a failing upstream is an error again.
    clock.advance(2 * SECOND);
    let expired = client.get_manifest(REPO, "1.0").await;
    assert!(
        expired.status.is_server_error(),
        "{} {}",
        expired.status,
        expired.body_text()
    );

    // Once the upstream answers again, the answer is fresh again (no warning).
    upstream.clear_faults();
    let fresh = client.get_manifest(REPO, "1.0").await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.header("warning"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_survives_a_restart() {
    let old = manifest(2);
    let upstream = FakeRegistry::with_manifest(REPO, Some("1.0"), OCI_MANIFEST, &old).await;
    let clock = clock();
    let ttl = Duration::from_secs(60);
    let cistern = start(&upstream, &clock, move |c| c.cache.tag_ttl = ttl).await;
    assert_eq!(
        cistern.client().get_manifest(REPO, "1.0").await.bytes(),
        &old
    );
    let data = cistern.shutdown().await;

    upstream.on_manifest("1.0", Fault::Status(503));
    let cistern = start_on(&upstream, data, &clock, move |c| c.cache.tag_ttl = ttl).await;
    clock.advance(ttl + SECOND);
    let stale = cistern.client().get_manifest(REPO, "1.0").await;
    assert_eq!(stale.status, StatusCode::OK, "{}", stale.body_text());
    assert_eq!(stale.bytes(), &old);
    assert!(stale.header("warning").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stale_if_error_a_failing_upstream_is_an_error() {
    let upstream = FakeRegistry::with_manifest(REPO, Some("1.0"), OCI_MANIFEST, &manifest(3)).await;
    let clock = clock();
    let ttl = Duration::from_secs(60);
    let cistern = start(&upstream, &clock, move |c| {
        c.cache.tag_ttl = ttl;
        c.cache.stale_if_error = Duration::ZERO;
    })
    .await;
    let client = cistern.client();
    assert_eq!(
        client.get_manifest(REPO, "1.0").await.status,
        StatusCode::OK
    );
    upstream.on_manifest("1.0", Fault::Status(503));
    clock.advance(ttl + SECOND);
    let r = client.get_manifest(REPO, "1.0").await;
    assert!(r.status.is_server_error(), "{} {}", r.status, r.body_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_behind() {
    let (old, new) = (manifest(4), manifest(5));
    let upstream = FakeRegistry::with_manifest(REPO, Some("latest"), OCI_MANIFEST, &old).await;
    let clock = clock();
    let ttl = Duration::from_secs(60);
    let window = Duration::from_secs(3600);
    let cistern = start(&upstream, &clock, move |c| {
        c.cache.tag_ttl = ttl;
        c.cache.stale_while_revalidate = window;
    })
    .await;
    let client = cistern.client();
    assert_eq!(client.get_manifest(REPO, "latest").await.bytes(), &old);

    upstream.add_manifest(REPO, Some("latest"), OCI_MANIFEST, new.clone());
    clock.advance(ttl + window - SECOND);
    // The stale answer comes at once, without a warning: nothing failed.
    let first = client.get_manifest(REPO, "latest").await;
    assert_eq!(first.bytes(), &old);
    assert_eq!(first.header("warning"), None);
    // The refresh happened behind it; a later request sees the new manifest.
    retry_until("the background refresh to land", || async {
        let r = client.get_manifest(REPO, "latest").await;
        (r.bytes() == &new).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_is_remembered_for_negative_ttl() {
    let upstream = FakeRegistry::with_manifest(REPO, Some("1.0"), OCI_MANIFEST, &manifest(6)).await;
    let clock = clock();
    let negative = Duration::from_secs(60);
    let cistern = start(&upstream, &clock, move |c| c.cache.negative_ttl = negative).await;
    let client = cistern.client();
    client.assert_manifest_unknown(REPO, "nope").await;
    let asked = upstream.manifest_requests();
    assert!(asked > 0);
    for _ in 0..20 {
        clock.advance(negative / 30);
        client.assert_manifest_unknown(REPO, "nope").await;
        let head = client.head(&manifest_route(REPO, "nope")).await;
        assert_eq!(head.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(
        upstream.manifest_requests(),
        asked,
        "a storm of pulls of a missing tag must not reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_is_asked_again_once_negative_ttl_passes() {
    let upstream = FakeRegistry::builder().start().await;
    let clock = clock();
    let negative = Duration::from_secs(60);
    let cistern = start(&upstream, &clock, move |c| c.cache.negative_ttl = negative).await;
    let client = cistern.client();
    assert_eq!(
        client.get_manifest(REPO, "soon").await.status,
        StatusCode::NOT_FOUND
    );
    let m = manifest(7);
    upstream.add_manifest(REPO, Some("soon"), OCI_MANIFEST, m.clone());
    clock.advance(negative + SECOND);
    assert_eq!(client.get_manifest(REPO, "soon").await.bytes(), &m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_mode_serves_the_cache_and_never_calls_upstream() {
    let m = manifest(8);
    let blob = blob_bytes(300 * KIB, 8);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("1.0"), OCI_MANIFEST, m.clone())
        .blob(REPO, blob.clone())
        .start()
        .await;
    let blob_digest = sha256_digest(&blob);
    let other = upstream.add_blob(REPO, blob_bytes(KIB, 9));

    // Fill the cache online, as a site would before shipping it.
    let clock = clock();
    let cistern = start(&upstream, &clock, |_| {}).await;
    let client = cistern.client();
    assert_eq!(client.get_manifest(REPO, "1.0").await.bytes(), &m);
    assert_same_bytes(
        &client.get_blob(REPO, &blob_digest).await.unwrap(),
        &blob,
        "online",
    );
    let data = cistern.shutdown().await;

    let before = upstream.requests().len();
    let cistern = start_on(&upstream, data, &clock, move |c| c.offline = true).await;
    let client = cistern.client();
    // Offline, a tag answer of any age is served: this one is a year past every window.
    clock.advance(Duration::from_secs(365 * 86_400));
    let by_tag = client.get_manifest(REPO, "1.0").await;
    assert_eq!(by_tag.status, StatusCode::OK, "{}", by_tag.body_text());
    assert_eq!(by_tag.bytes(), &m);
    // A client with another Accept set still finds the tag if it accepts the media type.
    let other_client = client
        .send(
            client
                .request(Method::GET, &manifest_route(REPO, "1.0"))
                .header("accept", OCI_MANIFEST),
        )
        .await;
    assert_eq!(other_client.bytes(), &m);
    assert_same_bytes(
        &client.get_blob(REPO, &blob_digest).await.unwrap(),
        &blob,
        "offline",
    );
    let head = client.head(&blob_route(REPO, &blob_digest)).await;
    assert_eq!(head.status, StatusCode::OK);

    // What was never cached is unknown, and asking for it reaches no upstream.
    client.assert_blob_unknown(REPO, &other).await;
    client.assert_manifest_unknown(REPO, "2.0").await;
    assert_eq!(
        upstream.requests().len(),
        before,
        "offline mode contacted the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_route_keeps_its_own_tag_ttl() {
    use ::cistern::config::{RouteConfig, UpstreamConfig};
    let (old, new) = (manifest(10), manifest(11));
    let upstream = FakeRegistry::with_manifest(REPO, Some("1.0"), OCI_MANIFEST, &old).await;
    let url = upstream.url();
    let route = |registry: &str, default: bool, ttl: Duration| RouteConfig {
        registry: registry.into(),
        upstreams: vec![registry.replace('.', "-")],
        tags_from: None,
        default,
        tag_ttl: Some(ttl),
        tag_rules: None,
        stale_while_revalidate: None,
        stale_if_error: None,
        negative_ttl: None,
        cold_ranges: None,
    };
    let clock = clock();
    let cistern = start(&upstream, &clock, move |c| {
        c.upstream = UpstreamConfig::default();
        c.upstreams = [
            ("docker-io".to_string(), UpstreamConfig::new(&url)),
            ("ghcr-io".to_string(), UpstreamConfig::new(&url)),
        ]
        .into();
        c.routes = vec![
            route("docker.io", true, Duration::from_secs(3600)),
            route("ghcr.io", false, Duration::from_secs(60)),
        ];
    })
    .await;
    let client = cistern.client();
    let ghcr = format!("{}?ns=ghcr.io", manifest_route(REPO, "1.0"));
    assert_eq!(client.get_manifest(REPO, "1.0").await.bytes(), &old);
    assert_eq!(client.get(&ghcr).await.bytes(), &old);

    upstream.add_manifest(REPO, Some("1.0"), OCI_MANIFEST, new.clone());
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        client.get(&ghcr).await.bytes(),
        &new,
        "ghcr.io's 60 s TTL ran out"
    );
    assert_eq!(
        client.get_manifest(REPO, "1.0").await.bytes(),
        &old,
        "docker.io's 1h TTL did not"
    );
}
