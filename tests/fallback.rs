//! Fallback along a route's upstreams: a mirror first, the origin last. Which failures move
//! on, what the client gets when every upstream fails, tags only from `tags_from`, the
//! circuit breaker, and a blob fill that resumes from the next upstream mid-body.
//!
//! The rules are the `upstream` section of docs/ARCHITECTURE.md. Every test counts what each
//! upstream was asked, because "the client got the bytes" alone cannot tell a fallback from a
//! lucky first try.

mod support;

use std::time::{Duration, SystemTime};

use ::cistern::clock::Clock;
use ::cistern::config::{RouteConfig, UpstreamConfig};
use bytes::Bytes;
use http::StatusCode;
use support::reply::{blob_reply, manifest_reply};
use support::*;

const REPO: &str = "library/app";

/// The docker.io route (the default) over `mirror`, then `origin`.
async fn mirror_then_origin(mirror: UpstreamConfig, origin: UpstreamConfig) -> TestCistern {
    mirror_then_origin_builder(mirror, origin).start().await
}

/// [`mirror_then_origin`] of two fake registries, with the mirror's settings changed by
/// `tweak`.
async fn mirror_then_origin_with(
    mirror: &FakeRegistry,
    origin: &FakeRegistry,
    tweak: impl FnOnce(&mut UpstreamConfig),
) -> TestCistern {
    let mut settings = at(&mirror.url());
    tweak(&mut settings);
    mirror_then_origin(settings, at(&origin.url())).await
}

/// [`mirror_then_origin`], not started yet.
fn mirror_then_origin_builder(mirror: UpstreamConfig, origin: UpstreamConfig) -> CisternBuilder {
    TestCistern::builder()
        .upstream("mirror", mirror)
        .upstream("origin", origin)
        .route(default_route("docker.io", &["mirror", "origin"]))
}

/// A mirror whose breaker opens after two failures and cools down for a second on a manual
/// clock, then the origin: the breaker tests step the clock past the cool-down.
async fn breaker_mirror_then_origin() -> (FakeRegistry, FakeRegistry, Clock, TestCistern) {
    let mirror = FakeRegistry::builder().start().await;
    let origin = FakeRegistry::builder().start().await;
    let clock = Clock::manual(SystemTime::now());
    let cistern = mirror_then_origin_builder(
        UpstreamConfig {
            breaker_failures: 2,
            breaker_cooldown: SECOND,
            ..at(&mirror.url())
        },
        at(&origin.url()),
    )
    .clock(&clock)
    .start()
    .await;
    (mirror, origin, clock, cistern)
}

/// The `Range` header of every GET of `digest`, oldest first (`None`: no Range).
fn blob_get_ranges(upstream: &FakeRegistry, digest: &str) -> Vec<Option<String>> {
    upstream
        .blob_get_requests(digest)
        .into_iter()
        .map(|r| {
            r.headers
                .get("range")
                .map(|v| v.to_str().unwrap().to_string())
        })
        .collect()
}

/// A 4 MiB blob and its digest (a resume after its first MiB asks for [`RESUME_AT_1_MIB`]).
fn four_mib(seed: u64) -> (Bytes, String) {
    blob_and_digest(4 * MIB, seed)
}

const RESUME_AT_1_MIB: &str = "bytes=1048576-";

// === Falling back before the response starts ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_without_the_blob_falls_back_to_origin() {
    let (blob, digest) = blob_and_digest(256 * KIB, 1);
    let mirror = FakeRegistry::builder()
        .blob(REPO, blob_bytes(KIB, 2)) // the repository, but not this blob
        .start()
        .await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;
    let client = cistern.client();

    let got = client.get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob after the mirror's 404");
    assert_eq!(mirror.blob_gets(&digest), 1, "the mirror is asked first");
    assert_eq!(origin.blob_gets(&digest), 1);

    let again = client.get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&again, &blob, "blob from the cache");
    assert_eq!(
        (mirror.blob_gets(&digest), origin.blob_gets(&digest)),
        (1, 1)
    );
    cistern.data().committed_blob(&digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_503_falls_back_to_origin() {
    let (blob, digest) = blob_and_digest(256 * KIB, 3);
    let mirror = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::Status(503)).await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob after the mirror's 503");
    assert_eq!(mirror.blob_gets(&digest), 1);
    assert_eq!(origin.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_that_never_answers_falls_back_after_header_timeout() {
    let (blob, digest) = blob_and_digest(256 * KIB, 4);
    let mirror = FakeRegistry::silent().await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin_with(&mirror, &origin, |m| m.header_timeout = SECOND).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob after the silent mirror");
    assert_eq!(mirror.connections(), 1, "the mirror was tried");
    assert_eq!(origin.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_that_is_down_falls_back_to_origin() {
    let (blob, digest) = blob_and_digest(256 * KIB, 5);
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin(at(&closed_port_url().await), at(&origin.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob with the mirror down");
    assert_eq!(origin.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_with_no_free_request_slot_is_passed_over() {
    let (held, wanted) = (blob_bytes(2 * MIB, 8), blob_bytes(64 * KIB, 9));
    let (held_digest, wanted_digest) = (sha256_digest(&held), sha256_digest(&wanted));
    let gate = Gate::new();
    let mirror = FakeRegistry::builder()
        .blob(REPO, held.clone())
        .blob(REPO, wanted.clone())
        .on_blob(&held_digest, Fault::GateAt(512 * KIB as u64, gate.clone()))
        .start()
        .await;
    let origin = FakeRegistry::with_blob(REPO, &wanted).await;
    let cistern = mirror_then_origin_with(&mirror, &origin, |m| {
        m.max_concurrent_requests = 1;
        m.header_timeout = SECOND;
    })
    .await;
    let client = cistern.client();

    // A download held mid-body keeps the mirror's only request slot.
    let holder = client.spawn_readers(&blob_route(REPO, &held_digest), 1);
    holder.started().await;

    let got = client.get_blob(REPO, &wanted_digest).await.unwrap();
    assert_same_bytes(&got, &wanted, "blob while the mirror is busy");
    assert_eq!(
        mirror.blob_gets(&wanted_digest),
        0,
        "the mirror had no slot"
    );
    assert_eq!(origin.blob_gets(&wanted_digest), 1);

    gate.open();
    let body = holder.finish().await.remove(0).expect("the held download");
    assert_same_bytes(&body, &held, "the held download");
}

// === When every upstream fails ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_everywhere_is_404() {
    let digest = sha256_digest(b"on no upstream");
    let mirror = FakeRegistry::builder()
        .blob(REPO, blob_bytes(KIB, 6))
        .start()
        .await;
    let origin = FakeRegistry::builder()
        .blob(REPO, blob_bytes(KIB, 7))
        .start()
        .await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;
    let client = cistern.client();

    client.assert_blob_unknown(REPO, &digest).await;
    client.assert_manifest_unknown(REPO, "no-such-tag").await;
    assert_eq!(
        (mirror.blob_gets(&digest), origin.blob_gets(&digest)),
        (1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_everywhere_is_429_with_the_shortest_retry_after() {
    let limited = |seconds| {
        FakeRegistry::builder()
            .on_every_request(Fault::RateLimited(seconds))
            .start()
    };
    let (mirror, origin) = (limited(30).await, limited(7).await);
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;
    let digest = sha256_digest(b"rate limited");

    let got = cistern.client().get(&blob_route(REPO, &digest)).await;
    got.assert_oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    assert_eq!(got.header("retry-after"), Some("7"), "the shortest wait");
    assert_eq!(mirror.requests().len(), 1);
    assert_eq!(origin.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_failures_are_502_naming_each_upstream_and_no_secret() {
    const PASSWORD: &str = "mirror-pw-Zq8v";
    const TOKEN: &str = "origin-token-Kx3p";
    let basic = reply::basic_authorization("puller", PASSWORD);
    // The mirror demands Basic auth, and with it answers 503: the credentials are in play.
    let mirror = FakeRegistry::builder()
        .auth(Auth::Basic {
            username: "puller".into(),
            password: PASSWORD.into(),
        })
        .on_every_request(Fault::Status(503))
        .start()
        .await;
    let origin = FakeRegistry::builder().start().await; // 404 for everything
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).unwrap();
    let cistern = TestCistern::builder()
        .upstream(
            "hub-mirror",
            UpstreamConfig {
                username: Some("puller".into()),
                password: Some(PASSWORD.into()),
                ..at(&mirror.url())
            },
        )
        .upstream(
            "docker-hub",
            UpstreamConfig {
                token_file: Some(token_file.path().to_path_buf()),
                ..at(&origin.url())
            },
        )
        .route(default_route("docker.io", &["hub-mirror", "docker-hub"]))
        .anonymous(&["docker.io/*"])
        .start()
        .await;
    let digest = sha256_digest(b"mixed failures");

    let got = cistern.client().get(&blob_route(REPO, &digest)).await;
    got.assert_oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE");
    let message = got.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("hub-mirror"), "{message}");
    assert!(message.contains("docker-hub"), "{message}");
    let everything = format!("{:?}\n{}", got.headers, got.body_text());
    for secret in [PASSWORD, TOKEN, basic.trim_start_matches("Basic ")] {
        assert!(!everything.contains(secret), "{secret:?} in {everything}");
    }
    assert!(
        mirror
            .requests()
            .iter()
            .any(|r| r.authorization() == Some(basic.clone())),
        "the mirror never got the credentials, so the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_bytes_that_fail_their_digest_are_replaced_and_never_cached() {
    let manifest = image_manifest(10);
    let digest = sha256_digest(&manifest);
    let inverted: Vec<u8> = manifest.iter().map(|b| !b).collect();
    let mirror = FakeRegistry::builder()
        .manifest(REPO, None, OCI_MANIFEST, manifest.clone())
        .on_manifest(&digest, Fault::WrongBytes)
        .start()
        .await;
    let origin = FakeRegistry::with_manifest(REPO, None, OCI_MANIFEST, &manifest).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;
    let client = cistern.client();

    for _ in 0..2 {
        let got = client.get_manifest(REPO, &digest).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
        assert_eq!(got.bytes(), &manifest, "the origin's verified bytes");
    }
    assert_eq!(mirror.count(http::Method::GET, Kind::Manifest, &digest), 1);
    assert_eq!(origin.count(http::Method::GET, Kind::Manifest, &digest), 1);

    let data = cistern.data();
    assert_eq!(
        data.manifest_files().len(),
        1,
        "{:?}",
        data.manifest_files()
    );
    let stored = std::fs::read(data.manifest_path(&digest)).expect("the manifest is cached");
    assert!(
        stored.ends_with(&manifest),
        "cached file holds the right bytes"
    );
    assert!(!data.manifest_path(&sha256_digest(&inverted)).exists());
}

// === Tags only from tags_from ===

/// The mirror's tag `1` is stale (X); the origin's is current (Y). Both have both manifests
/// by digest, as a lagging mirror would.
async fn stale_mirror_and_origin() -> (FakeRegistry, FakeRegistry, Bytes, Bytes) {
    let (stale, current) = (image_manifest(11), image_manifest(12));
    let mirror = FakeRegistry::builder()
        .manifest(REPO, None, OCI_MANIFEST, current.clone())
        .manifest(REPO, Some("1"), OCI_MANIFEST, stale.clone())
        .start()
        .await;
    let origin = FakeRegistry::builder()
        .manifest(REPO, None, OCI_MANIFEST, stale.clone())
        .manifest(REPO, Some("1"), OCI_MANIFEST, current.clone())
        .start()
        .await;
    (mirror, origin, stale, current)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_come_only_from_tags_from() {
    let (mirror, origin, _stale, current) = stale_mirror_and_origin().await;
    let cistern = TestCistern::builder()
        .upstream("mirror", at(&mirror.url()))
        .upstream("origin", at(&origin.url()))
        .route(RouteConfig {
            tags_from: Some(names(&["origin"])),
            ..default_route("docker.io", &["mirror", "origin"])
        })
        .start()
        .await;

    let got = cistern.client().get_manifest(REPO, "1").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_eq!(got.bytes(), &current, "the origin's tag");
    assert!(
        mirror.requests_for(Kind::Manifest, "1").is_empty(),
        "the mirror was asked for the tag: {:?}",
        mirror.requests_for(Kind::Manifest, "1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tags_from_the_first_upstream_answers_tags() {
    let (mirror, origin, stale, _current) = stale_mirror_and_origin().await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;

    let got = cistern.client().get_manifest(REPO, "1").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_eq!(got.bytes(), &stale, "the first upstream's tag");
    assert_eq!(origin.manifest_requests(), 0);
}

// === The circuit breaker ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_sends_requests_straight_to_origin() {
    let mirror = FakeRegistry::silent().await;
    let origin = FakeRegistry::builder().start().await;
    let cistern = mirror_then_origin_with(&mirror, &origin, |m| {
        m.header_timeout = SECOND;
        m.breaker_failures = 2;
        m.breaker_cooldown = Duration::from_secs(3600);
    })
    .await;
    let client = cistern.client();

    for seed in 0..5 {
        let blob = blob_bytes(KIB, 100 + seed);
        let digest = origin.add_blob(REPO, blob.clone());
        let got = client.get_blob(REPO, &digest).await.unwrap();
        assert_same_bytes(&got, &blob, "blob from the origin");
        assert_eq!(origin.blob_gets(&digest), 1);
        let tried = if seed < 2 { seed as usize + 1 } else { 2 };
        assert_eq!(
            mirror.connections(),
            tried,
            "connections to the mirror after request {}",
            seed + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_cooldown_one_probe_finds_the_mirror_back() {
    let (mirror, origin, clock, cistern) = breaker_mirror_then_origin().await;
    let client = cistern.client();
    let mut seed = 200;
    let mut blob_on_both = || {
        seed += 1;
        let blob = blob_bytes(KIB, seed);
        mirror.add_blob(REPO, blob.clone());
        (origin.add_blob(REPO, blob.clone()), blob)
    };

    // Two 503s open the mirror's breaker; then the mirror recovers.
    for _ in 0..2 {
        let (digest, blob) = blob_on_both();
        mirror.on_blob(&digest, Fault::Status(503));
        assert_same_bytes(&client.get_blob(REPO, &digest).await.unwrap(), &blob, "");
        assert_eq!(
            (mirror.blob_gets(&digest), origin.blob_gets(&digest)),
            (1, 1)
        );
    }
    mirror.clear_faults();

    // Until the cool-down ends the origin serves (up to its last millisecond); then one
    // request probes the mirror.
    for (step, want) in [
        (Duration::ZERO, (0, 1)),
        (SECOND - Duration::from_millis(1), (0, 1)),
        (Duration::from_millis(1), (1, 0)), // the probe, and the mirror answered it
    ] {
        clock.advance(step);
        let (digest, blob) = blob_on_both();
        assert_same_bytes(&client.get_blob(REPO, &digest).await.unwrap(), &blob, "");
        assert_eq!(
            (mirror.blob_gets(&digest), origin.blob_gets(&digest)),
            want,
            "(mirror, origin) GETs after the clock moved on by {step:?}"
        );
    }

    // The probe's success closed the breaker: the mirror is first again.
    let (digest, blob) = blob_on_both();
    assert_same_bytes(&client.get_blob(REPO, &digest).await.unwrap(), &blob, "");
    assert_eq!(
        (mirror.blob_gets(&digest), origin.blob_gets(&digest)),
        (1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_404s_do_not_open_the_breaker() {
    let (limited, missing, served) = (
        blob_bytes(KIB, 20),
        blob_bytes(KIB, 21),
        blob_bytes(KIB, 22),
    );
    let limited_digest = sha256_digest(&limited);
    let missing_digest = sha256_digest(&missing);
    let served_digest = sha256_digest(&served);
    let mirror = FakeRegistry::builder()
        .blob(REPO, limited.clone())
        .blob(REPO, served.clone())
        .on_blob(&limited_digest, Fault::Status(429))
        .start()
        .await;
    let origin = FakeRegistry::builder()
        .blob(REPO, limited.clone())
        .blob(REPO, missing.clone())
        .start()
        .await;
    let cistern = mirror_then_origin_with(&mirror, &origin, |m| {
        m.breaker_failures = 1;
        m.breaker_cooldown = Duration::from_secs(3600);
    })
    .await;
    let client = cistern.client();

    for (digest, blob) in [(&limited_digest, &limited), (&missing_digest, &missing)] {
        assert_same_bytes(&client.get_blob(REPO, digest).await.unwrap(), blob, "");
        assert_eq!((mirror.blob_gets(digest), origin.blob_gets(digest)), (1, 1));
    }
    // A breaker that counted the 429 or the 404 would skip the mirror now.
    assert_same_bytes(
        &client.get_blob(REPO, &served_digest).await.unwrap(),
        &served,
        "served by the mirror",
    );
    assert_eq!(mirror.blob_gets(&served_digest), 1);
}

/// A mirror that sends a 200's headers and then cuts every blob body: the headers are no
/// success, each cut is a failure, so the breaker opens; after the cool-down the probe's
/// headers do not close it either, and its cut opens it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_cuts_every_blob_body_opens_its_breaker() {
    let (mirror, origin, clock, cistern) = breaker_mirror_then_origin().await;
    let client = cistern.client();
    let mut seed = 300;
    let mut pull = async |want: (usize, usize), why: &str| {
        seed += 1;
        let blob = blob_bytes(64 * KIB, seed);
        let digest = mirror.add_blob(REPO, blob.clone());
        mirror.on_blob(&digest, Fault::CutAfter(KIB as u64));
        origin.add_blob(REPO, blob.clone());
        assert_same_bytes(&client.get_blob(REPO, &digest).await.unwrap(), &blob, why);
        assert_eq!(
            (mirror.blob_gets(&digest), origin.blob_gets(&digest)),
            want,
            "(mirror, origin) GETs: {why}"
        );
    };

    pull((1, 1), "first cut").await;
    pull((1, 1), "second cut").await;
    pull((0, 1), "two cuts opened the breaker").await;
    clock.advance(SECOND);
    pull((1, 1), "the probe, cut too").await;
    pull((0, 1), "the probe's cut opened the breaker again").await;
}

/// The same for manifest bodies read whole: a body cut after its headers is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_cuts_every_manifest_body_opens_its_breaker() {
    let mirror = FakeRegistry::builder().start().await;
    let origin = FakeRegistry::builder().start().await;
    let cistern = mirror_then_origin_with(&mirror, &origin, |m| {
        m.breaker_failures = 2;
        m.breaker_cooldown = Duration::from_secs(3600);
    })
    .await;
    let client = cistern.client();
    for (seed, want) in [(61, (1, 1)), (62, (1, 1)), (63, (0, 1))] {
        let manifest = image_manifest(seed);
        let digest = mirror.add_manifest(REPO, None, OCI_MANIFEST, manifest.clone());
        mirror.on_manifest(&digest, Fault::CutAfter(10));
        origin.add_manifest(REPO, None, OCI_MANIFEST, manifest.clone());
        let got = client.get_manifest(REPO, &digest).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
        assert_eq!(got.bytes(), &manifest);
        assert_eq!(
            (
                mirror.count(http::Method::GET, Kind::Manifest, &digest),
                origin.count(http::Method::GET, Kind::Manifest, &digest)
            ),
            want,
            "(mirror, origin) GETs of manifest {seed}"
        );
    }
}

// === Mid-blob failover ===
//
// The mirror breaks off after exactly 1 MiB (`Fault::CutAfter`: full Content-Length, 1 MiB,
// then the connection closes), so the offset the next upstream is asked for is exact.

/// A mirror with `blob` whose every GET of it breaks off after exactly 1 MiB.
async fn cut_mirror(blob: &Bytes) -> FakeRegistry {
    FakeRegistry::with_faulty_blob(REPO, blob, Fault::CutAfter(MIB as u64)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_cut_by_the_mirror_resumes_from_origin_at_the_cut() {
    let (blob, digest) = four_mib(30);
    let mirror = cut_mirror(&blob).await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "one GET across two upstreams");
    assert_eq!(mirror.requests().len(), 1);
    assert_eq!(mirror.blob_gets(&digest), 1);
    assert_eq!(
        blob_get_ranges(&origin, &digest),
        [Some(RESUME_AT_1_MIB.to_string())],
        "one resume from exactly what the mirror delivered"
    );
    assert_same_bytes(
        &cistern.data().committed_blob(&digest).await,
        &blob,
        "committed blob",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_stalled_by_the_mirror_resumes_from_origin() {
    let (blob, digest) = four_mib(31);
    let mirror = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::StallAfter(MIB as u64)).await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin_with(&mirror, &origin, |m| m.idle_timeout = SECOND).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "one GET across a stall");
    assert_eq!(mirror.blob_gets(&digest), 1);
    assert_eq!(
        blob_get_ranges(&origin, &digest),
        [Some(RESUME_AT_1_MIB.to_string())]
    );
    cistern.data().committed_blob(&digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_that_ignores_range_still_gives_the_right_bytes() {
    let (blob, digest) = four_mib(32);
    let mirror = cut_mirror(&blob).await;
    let origin = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::IgnoreRange).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "resumed from a 200 with the whole blob");
    let asked = origin.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].header("range").as_deref(), Some(RESUME_AT_1_MIB));
    assert_eq!(origin.blob_gets(&digest), 1);
    cistern.data().committed_blob(&digest).await;
}

/// An upstream that answers a resume with a 206 for the *wrong* range: bytes from 0, exactly
/// as many as the client still needs, with a Content-Range that says so. Only the
/// Content-Range check can catch it before the digest does.
async fn wrong_range_206(blob: Bytes) -> FakeRegistry {
    FakeRegistry::scripted(HOME, move |req| {
        let from: usize = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
            .unwrap_or(0);
        let len = blob.len() - from;
        let mut reply = blob_reply(&blob.slice(..len));
        *reply.status_mut() = StatusCode::PARTIAL_CONTENT;
        reply.headers_mut().insert(
            "content-range",
            format!("bytes 0-{}/{}", len - 1, blob.len())
                .parse()
                .unwrap(),
        );
        reply
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_for_the_wrong_range_moves_on_to_the_next_upstream() {
    let (blob, digest) = four_mib(33);
    let mirror = cut_mirror(&blob).await;
    let liar = wrong_range_206(blob.clone()).await;
    let backup = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder()
        .upstream("mirror", at(&mirror.url()))
        .upstream("liar", at(&liar.url()))
        .upstream("backup", at(&backup.url()))
        .route(default_route("docker.io", &["mirror", "liar", "backup"]))
        .start()
        .await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob past a wrong 206");
    assert_eq!(liar.requests().len(), 1);
    assert_eq!(
        blob_get_ranges(&backup, &digest),
        [Some(RESUME_AT_1_MIB.to_string())]
    );
    cistern.data().committed_blob(&digest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_206_for_the_wrong_range_from_the_last_upstream_fails_the_client() {
    let (blob, digest) = four_mib(34);
    let mirror = cut_mirror(&blob).await;
    let liar = wrong_range_206(blob.clone()).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&liar.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await;
    assert!(
        got.is_err(),
        "a blob that no upstream could finish must not arrive whole ({} bytes)",
        got.map(|b| b.len()).unwrap_or(0)
    );
    assert_eq!(liar.requests().len(), 1);
    let data = cistern.data().clone();
    assert!(!data.blob_path(&digest).exists(), "nothing is committed");
    eventually("the failed fill to clean up", patience(), || {
        data.tmp_files().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_ride_one_failover() {
    let (blob, digest) = four_mib(35);
    let gate = Gate::new();
    let mirror = FakeRegistry::with_faulty_blob(
        REPO,
        &blob,
        Fault::CutAfter(MIB as u64).and(Fault::GateAt(512 * KIB as u64, gate.clone())),
    )
    .await;
    let origin = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = mirror_then_origin(at(&mirror.url()), at(&origin.url())).await;

    let readers = cistern
        .client()
        .spawn_readers(&blob_route(REPO, &digest), 20);
    // Every client has bytes from the mirror before it breaks off.
    readers.started().await;
    gate.open();

    readers.all_receive(&blob).await;
    assert_eq!(mirror.requests().len(), 1);
    assert_eq!(
        blob_get_ranges(&origin, &digest),
        [Some(RESUME_AT_1_MIB.to_string())]
    );
    cistern.data().committed_blob(&digest).await;
}

// === Rate-limit headers on a success ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_remaining_on_a_success_changes_nothing() {
    let (blob, digest) = blob_and_digest(256 * KIB, 40);
    let manifest = image_manifest(41);
    let (b, m) = (blob.clone(), manifest.clone());
    let hub = FakeRegistry::scripted(HOME, move |req| {
        let mut reply = if req.path.contains("/manifests/") {
            manifest_reply(&m)
        } else {
            blob_reply(&b)
        };
        // Docker Hub's pull-limit headers.
        let h = reply.headers_mut();
        h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.insert("ratelimit-remaining", "0;w=21600".parse().unwrap());
        h.insert("docker-ratelimit-source", "192.0.2.1".parse().unwrap());
        reply
    })
    .await;
    let cistern = TestCistern::builder()
        .upstream("docker-hub", at(&hub.url()))
        .route(default_route("docker.io", &["docker-hub"]))
        .start()
        .await;
    let client = cistern.client();

    let got = client.get_manifest(REPO, "latest").await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_eq!(got.bytes(), &manifest);
    let got = client.get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob");
}
