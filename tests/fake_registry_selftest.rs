//! The fake upstream on its own: every fault does what the cistern tests rely on.

mod support;

use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_blobs_with_registry_headers() {
    let (blob, digest) = blob_and_digest(300 * KIB, 1);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let client = Client::new(upstream.url());

    let got = client.get_blob(REPO, &digest).await.expect("GET blob");
    assert_eq!(got, blob);

    let head = client.head(&format!("/v2/{REPO}/blobs/{digest}")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), Some("307200"));
    assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        head.header("content-type"),
        Some("application/octet-stream")
    );

    assert_eq!(upstream.blob_gets(&digest), 1);
    assert_eq!(upstream.count(Method::HEAD, Kind::Blob, &digest), 1);
    let seen = &upstream.requests_for(Kind::Blob, &digest)[0];
    assert_eq!(seen.repo, REPO);
    assert!(seen.headers.get("range").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_ranges() {
    let (blob, digest) = blob_and_digest(1000, 2);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let client = Client::new(upstream.url());
    let path = format!("/v2/{REPO}/blobs/{digest}");

    let r = client.get_range(&path, "bytes=0-0").await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), Some("bytes 0-0/1000"));
    assert_eq!(r.bytes()[..], blob[..1]);

    let r = client.get_range(&path, "bytes=-10").await;
    assert_eq!(r.header("content-range"), Some("bytes 990-999/1000"));
    assert_eq!(r.bytes()[..], blob[990..]);

    let r = client.get_range(&path, "bytes=1000-").await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));

    let seen = upstream.requests_for(Kind::Blob, &digest);
    assert_eq!(seen[0].header_values("range"), ["bytes=0-0"]);
}

/// The premise of every abort test: reqwest reports a body shorter than its Content-Length as
/// an error, not as a clean short body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_body_is_an_error_for_reqwest() {
    let (blob, digest) = blob_and_digest(512 * KIB, 3);
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::CutAfter(100 * KIB as u64).once()).await;
    let client = Client::new(upstream.url());

    let first = client.get_blob(REPO, &digest).await;
    assert!(
        first.is_err(),
        "a cut body must be an error, got {} bytes",
        first.map(|b| b.len()).unwrap_or(0)
    );
    // One-shot: the next GET is clean.
    assert_eq!(client.get_blob(REPO, &digest).await.unwrap(), blob);
    assert_eq!(upstream.blob_gets(&digest), 2);
}

/// A cut delivers exactly its offset, every time: the abort waits until hyper has flushed the
/// bytes before it (it used to drop the last 64 KiB frame now and then). Offsets on, just
/// before and just after a frame boundary, and far from one; each several times, on fresh
/// connections, with the full `Content-Length` declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_body_delivers_exactly_the_cut_offset() {
    let (blob, digest) = blob_and_digest(2 * MIB, 11);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let target = format!("/v2/{REPO}/blobs/{digest}");
    for cut in [
        1,
        64 * KIB - 1,
        64 * KIB,
        64 * KIB + 1,
        100 * KIB + 7,
        MIB,
        2 * MIB - 1,
    ] {
        for run in 0..5 {
            upstream.on_blob(&digest, Fault::CutAfter(cut as u64).once());
            let r = raw_request(upstream.addr(), "GET", target.as_bytes()).await;
            assert_eq!(r.status, 200, "cut at {cut}, run {run}");
            assert_eq!(
                r.header("content-length"),
                Some(blob.len().to_string().as_str()),
                "cut at {cut}, run {run}"
            );
            assert_eq!(
                r.body.len(),
                cut,
                "cut at {cut}, run {run}: bytes delivered before the abort"
            );
            assert_same_bytes(&r.body, &blob[..cut], "the bytes before the cut");
        }
    }
    assert_eq!(upstream.blob_gets(&digest), 35);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_errors_when_the_registry_goes_away() {
    let (blob, digest) = blob_and_digest(256 * KIB, 4);
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::StallAfter(64 * KIB as u64)).await;
    let client = Client::new(upstream.url());

    let readers = client.spawn_readers(&format!("/v2/{REPO}/blobs/{digest}"), 1);
    readers.started().await;
    drop(upstream);
    let results = readers.finish().await;
    assert!(results[0].is_err(), "a stalled body must not complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_keep_length_and_headers() {
    let (blob, digest) = blob_and_digest(200 * KIB, 5);
    let upstream = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::WrongBytes).await;
    let client = Client::new(upstream.url());

    let r = client.get(&format!("/v2/{REPO}/blobs/{digest}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(r.bytes().len(), blob.len());
    assert_ne!(sha256_digest(r.bytes()), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_holds_the_body_until_opened() {
    let (blob, digest) = blob_and_digest(MIB, 6);
    let gate = Gate::new();
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::GateAt(300 * KIB as u64, gate.clone()))
            .await;
    let client = Client::new(upstream.url());

    let readers = client.spawn_readers(&format!("/v2/{REPO}/blobs/{digest}"), 2);
    readers.started().await;
    gate.wait_reached(2).await;
    gate.open();
    for result in readers.finish().await {
        assert_eq!(result.unwrap(), blob);
    }
    // Once open, the gate lets later bodies straight through.
    assert_eq!(client.get_blob(REPO, &digest).await.unwrap(), blob);
    assert_eq!(gate.reached(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_arrives_whole() {
    let (blob, digest) = blob_and_digest(64 * KIB, 7);
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(
            &digest,
            Fault::Slow {
                bytes_per_sec: 1024 * 1024,
            },
        )
        .start()
        .await;
    let client = Client::new(upstream.url());
    assert_eq!(client.get_blob(REPO, &digest).await.unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_faults_and_unknown_content() {
    let (blob, digest) = blob_and_digest(1000, 8);
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(&digest, Fault::Status(429).once())
        .on_blob(&digest, Fault::Status(503).once())
        .start()
        .await;
    let client = Client::new(upstream.url());
    let path = format!("/v2/{REPO}/blobs/{digest}");

    let r = client.get(&path).await;
    r.assert_oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(
        client.head(&path).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(client.get_blob(REPO, &digest).await.unwrap(), blob);

    let missing = sha256_digest(b"missing");
    client.assert_blob_unknown(REPO, &missing).await;
    client
        .get(&format!("/v2/nope/blobs/{digest}"))
        .await
        .assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    client.assert_manifest_unknown(REPO, "nope").await;
    client
        .send(client.request(Method::PUT, &path))
        .await
        .assert_oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_without_length() {
    let (blob, digest) = blob_and_digest(5000, 9);
    let upstream = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::HeadWithoutLength).await;
    let target = format!("/v2/{REPO}/blobs/{digest}");

    let head = raw_request(upstream.addr(), "HEAD", target.as_bytes()).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), None, "{head:?}");
    // GETs are untouched by a HEAD-only fault.
    let get = raw_request(upstream.addr(), "GET", target.as_bytes()).await;
    assert_eq!(get.header("content-length"), Some("5000"));
    assert_eq!(get.body, blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_tags_and_the_request_log() {
    let manifest =
        br#"{ "schemaVersion":2,   "mediaType" : "application/vnd.oci.image.manifest.v1+json" }"#;
    let digest = sha256_digest(manifest);
    let manifest = bytes::Bytes::from_static(manifest);
    let upstream = FakeRegistry::with_manifest(REPO, Some("v1"), OCI_MANIFEST, &manifest).await;
    upstream.tag(REPO, "v2", &digest);
    upstream.tag(REPO, "v3", &digest);
    let client = Client::new(upstream.url());

    for reference in ["v1", digest.as_str()] {
        let r = client
            .send(
                client
                    .request(Method::GET, &format!("/v2/{REPO}/manifests/{reference}"))
                    .header("accept", OCI_MANIFEST)
                    .header("accept", format!("{OCI_INDEX}, {DOCKER_MANIFEST}")),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.bytes()[..], manifest[..]);
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    }
    let seen = upstream.requests_for(Kind::Manifest, "v1");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header_values("accept"),
        [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST]
    );

    let page = client
        .get(&format!("/v2/{REPO}/tags/list?n=2&last=v1"))
        .await;
    assert_eq!(
        page.json(),
        serde_json::json!({ "name": REPO, "tags": ["v2", "v3"] })
    );
    let page = client.get(&format!("/v2/{REPO}/tags/list?n=1")).await;
    assert_eq!(page.json()["tags"], serde_json::json!(["v1"]));
    assert!(page.header("link").unwrap().contains("last=v1"));
    assert_eq!(
        upstream.requests().last().unwrap().query.as_deref(),
        Some("n=1")
    );

    let ping = raw_request(upstream.addr(), "GET", b"/v2/").await;
    assert_eq!(ping.status, 200);
    assert_eq!(
        ping.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_compose_and_count_down() {
    let (blob, digest) = blob_and_digest(400 * KIB, 10);
    let gate = Gate::new();
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    upstream.on_blob(
        &digest,
        Fault::WrongBytes
            .and(Fault::GateAt(100 * KIB as u64, gate.clone()))
            .times(2),
    );
    let client = Client::new(upstream.url());

    let readers = client.spawn_readers(&format!("/v2/{REPO}/blobs/{digest}"), 2);
    readers.started().await;
    gate.open();
    for result in readers.finish().await {
        let body = result.unwrap();
        assert_eq!(body.len(), blob.len());
        assert_ne!(body, blob);
    }
    assert_eq!(client.get_blob(REPO, &digest).await.unwrap(), blob);
    assert_eq!(upstream.blob_gets(&digest), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_for_every_request_rate_limit_redirect_and_ignore_range() {
    let (blob, digest) = blob_and_digest(100 * KIB, 20);
    let path = blob_route(REPO, &digest);

    let limited = FakeRegistry::builder()
        .on_every_request(Fault::RateLimited(7))
        .start()
        .await;
    let r = Client::new(limited.url()).get("/v2/").await;
    r.assert_oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    assert_eq!(r.header("retry-after"), Some("7"));

    let store = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::IgnoreRange).await;
    let ranged = Client::new(store.url());
    let r = ranged.get_range(&path, "bytes=10-").await;
    assert_eq!(r.status, StatusCode::OK, "Range ignored");
    assert_same_bytes(r.bytes(), &blob, "the whole blob");

    let redirecting = FakeRegistry::builder()
        .on_every_request(Fault::RedirectTo(store.url()))
        .start()
        .await;
    let got = Client::new(redirecting.url()).get_blob(REPO, &digest).await;
    assert_same_bytes(&got.unwrap(), &blob, "followed to the store");
    assert_eq!(redirecting.requests_to(&path).len(), 1);
    assert_eq!(store.blob_gets(&digest), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_flow_challenges_issues_and_rotates_tokens() {
    let (blob, digest) = blob_and_digest(KIB, 21);
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .auth(Auth::Bearer(Bearer::default()))
        .start()
        .await;
    let client = Client::new(upstream.url());
    let path = blob_route(REPO, &digest);

    let challenged = client.get(&path).await;
    challenged.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(
        challenged.header("www-authenticate"),
        Some(
            format!(
                r#"Bearer realm="{}/token",service="fake.registry",scope="repository:{REPO}:pull""#,
                upstream.url()
            )
            .as_str()
        )
    );
    let with = |token: &str| client.request(Method::GET, &path).bearer_auth(token);
    for n in 1..=2 {
        let token = client.get("/token?scope=x").await.json();
        assert_eq!(token["token"], format!("tok-{n}"));
        assert_eq!(token["expires_in"], 300);
    }
    // Only the newest token is good.
    assert_eq!(
        client.send(with("tok-1")).await.status,
        StatusCode::UNAUTHORIZED
    );
    let got = client.send(with("tok-2")).await;
    assert_same_bytes(got.bytes(), &blob, "with the newest token");
    assert_eq!(upstream.token_requests(), ["scope=x", "scope=x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_scripts_and_a_silent_registry() {
    let upstream = FakeRegistry::builder()
        .auth(Auth::Basic {
            username: "u".into(),
            password: "p".into(),
        })
        .script(|req| (req.path == "/hello").then(|| reply::oci_error(418, "TEAPOT")))
        .start()
        .await;
    let client = Client::new(upstream.url());
    let r = client.get("/hello").await;
    r.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic "));
    let with_basic = |path| client.request(Method::GET, path).basic_auth("u", Some("p"));
    let r = client.send(with_basic("/hello")).await;
    r.assert_oci_error(StatusCode::IM_A_TEAPOT, "TEAPOT");
    // Past the script, the content: an empty registry.
    let r = client.send(with_basic("/v2/a/b/tags/list")).await;
    r.assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");

    // A silent registry logs the request and never sends a head.
    let silent = FakeRegistry::silent().await;
    let pending = tokio::spawn({
        let client = Client::new(silent.url());
        async move { client.get("/v2/").await }
    });
    eventually("the request to be logged", patience(), || {
        silent.requests().len() == 1
    })
    .await;
    assert_eq!(silent.connections(), 1);
    assert!(!pending.is_finished(), "no answer");
    drop(silent);
    let _ = bounded("the client after the registry went away", pending).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_for_whole_or_ranged_requests_only_and_the_range_read_count() {
    let (blob, digest) = blob_and_digest(200 * KIB, 30);
    let path = blob_route(REPO, &digest);
    let gate = Gate::new();
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(
            &digest,
            Fault::GateAt(10 * KIB as u64, gate.clone()).whole_only(),
        )
        .on_blob(&digest, Fault::WrongBytes.ranged_only().once())
        .start()
        .await;
    let client = Client::new(upstream.url());

    // The whole GET is held at the gate; ranged GETs pass it by.
    let whole = client.spawn_readers(&path, 1);
    gate.wait_reached(1).await;
    let r = client.get_range(&path, "bytes=100-199").await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    let inverted: Vec<u8> = blob[100..200].iter().map(|b| !b).collect();
    assert_same_bytes(r.bytes(), &inverted, "the once-rule for ranges");
    let r = client.get_range(&path, "bytes=100-199").await;
    assert_same_bytes(r.bytes(), &blob[100..200], "the rule is used up");
    let r = client.get_range(&path, "bytes=150000-").await;
    assert_same_bytes(r.bytes(), &blob[150_000..], "an open range");
    assert_eq!(
        gate.reached(),
        1,
        "ranged GETs never reach the whole GET's gate"
    );

    gate.open();
    whole.all_receive(&blob).await;
    // Closed ranges only: `bytes=a-` is how a fill resumes, not a ranged read.
    let reads = upstream.blob_range_reads(&digest);
    assert_eq!(reads.len(), 2);
    assert_eq!(reads[0].header_values("range"), ["bytes=100-199"]);
    assert_eq!(upstream.blob_gets(&digest), 4);
}
