//! Routing: which registry a request means (`?ns=`, a registry as the first path component,
//! or the default route), and the name the upstream is asked for. Two fake registries stand
//! for Docker Hub and ghcr.io; each test checks who was asked, not just what came back.

mod support;

use http::StatusCode;
use support::*;

const REPO: &str = "org/app";

/// docker.io (the default route) → `docker-hub`; ghcr.io → `ghcr`.
async fn hub_and_ghcr(hub: &FakeRegistry, ghcr: &FakeRegistry) -> TestCistern {
    TestCistern::builder()
        .upstream("docker-hub", at(&hub.url()))
        .upstream("ghcr", at(&ghcr.url()))
        .route(default_route("docker.io", &["docker-hub"]))
        .route(route("ghcr.io", &["ghcr"]))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ns_picks_the_registry() {
    let on_hub = blob_bytes(64 * KIB, 1);
    let on_ghcr = blob_bytes(64 * KIB, 2);
    let (hub_digest, ghcr_digest) = (sha256_digest(&on_hub), sha256_digest(&on_ghcr));
    let hub = FakeRegistry::with_blob(REPO, &on_hub).await;
    let ghcr = FakeRegistry::with_blob(REPO, &on_ghcr).await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;
    let client = cistern.client();

    let got = client
        .get(&format!("{}?ns=ghcr.io", blob_route(REPO, &ghcr_digest)))
        .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_same_bytes(got.bytes(), &on_ghcr, "?ns=ghcr.io");
    assert_eq!(ghcr.blob_gets(&ghcr_digest), 1);
    assert!(hub.requests().is_empty(), "docker.io's upstream was asked");

    let got = client
        .get(&format!("{}?ns=docker.io", blob_route(REPO, &hub_digest)))
        .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_same_bytes(got.bytes(), &on_hub, "?ns=docker.io");
    assert_eq!(hub.blob_gets(&hub_digest), 1);
    assert_eq!(
        ghcr.requests().len(),
        1,
        "ghcr.io's upstream was asked again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ns_takes_the_default_route() {
    let (blob, digest) = blob_and_digest(64 * KIB, 3);
    let hub = FakeRegistry::with_blob(REPO, &blob).await;
    let ghcr = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob by the default route");
    assert_eq!(hub.blob_gets(&digest), 1);
    assert!(ghcr.requests().is_empty(), "ghcr.io is not the default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_in_the_path_is_stripped_before_the_upstream() {
    let (blob, digest) = blob_and_digest(64 * KIB, 4);
    let hub = FakeRegistry::builder().start().await;
    let ghcr = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;

    let got = cistern
        .client()
        .get_blob(&format!("ghcr.io/{REPO}"), &digest)
        .await
        .unwrap();
    assert_same_bytes(&got, &blob, "/v2/ghcr.io/org/app/blobs/<d>");
    let asked = ghcr.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].repo, REPO, "the upstream's name has no registry");
    assert_eq!(asked[0].reference, digest);
    assert!(hub.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_registry_is_404_name_unknown_and_asks_nobody() {
    let (blob, digest) = blob_and_digest(KIB, 5);
    let hub = FakeRegistry::with_blob(REPO, &blob).await;
    let ghcr = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;
    let client = cistern.client();

    let blob = client
        .get(&format!("{}?ns=quay.io", blob_route(REPO, &digest)))
        .await;
    blob.assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    let manifest = client
        .get(&format!("{}?ns=quay.io", manifest_route(REPO, "1")))
        .await;
    manifest.assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");

    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
    assert!(ghcr.requests().is_empty(), "{:?}", ghcr.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_default_route_a_request_naming_no_registry_is_404() {
    let (blob, digest) = blob_and_digest(KIB, 6);
    let ghcr = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder()
        .upstream("ghcr", at(&ghcr.url()))
        .route(route("ghcr.io", &["ghcr"]))
        .start()
        .await;

    let got = cistern.client().get(&blob_route(REPO, &digest)).await;
    got.assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    assert!(ghcr.requests().is_empty(), "{:?}", ghcr.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_official_images_are_asked_for_under_library() {
    let manifest = image_manifest(7);
    let hub = FakeRegistry::builder()
        .manifest(
            "library/alpine",
            Some("3.20"),
            OCI_MANIFEST,
            manifest.clone(),
        )
        .start()
        .await;
    let ghcr = FakeRegistry::builder().start().await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;

    let got = cistern
        .client()
        .get(&format!(
            "{}?ns=docker.io",
            manifest_route("alpine", "3.20")
        ))
        .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_eq!(got.bytes(), &manifest);

    let asked = hub.requests();
    assert!(!asked.is_empty());
    for r in &asked {
        assert_eq!(r.repo, "library/alpine", "{} {:?}", r.method, r.reference);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_tag_on_two_registries_is_two_manifests() {
    let (hub_manifest, ghcr_manifest) = (image_manifest(8), image_manifest(9));
    let hub = FakeRegistry::with_manifest(REPO, Some("1"), OCI_MANIFEST, &hub_manifest).await;
    let ghcr = FakeRegistry::with_manifest(REPO, Some("1"), OCI_MANIFEST, &ghcr_manifest).await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;
    let client = cistern.client();
    let tag = manifest_route(REPO, "1");

    // docker.io's answer is cached first; ghcr.io's tag must not be answered from it.
    for _ in 0..2 {
        let got = client.get(&format!("{tag}?ns=docker.io")).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
        assert_eq!(got.bytes(), &hub_manifest, "docker.io org/app:1");

        let got = client.get(&format!("{tag}?ns=ghcr.io")).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
        assert_eq!(got.bytes(), &ghcr_manifest, "ghcr.io org/app:1");

        let got = client.get(&format!("/v2/ghcr.io/{REPO}/manifests/1")).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
        assert_eq!(got.bytes(), &ghcr_manifest, "ghcr.io/org/app:1 by path");
    }
}

/// A 250-character name without a slash is valid, but Docker Hub's `library/` prefix takes it
/// past the 255-character limit: a clean 400 NAME_INVALID, where it used to panic the
/// connection's task (the client saw a reset connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_library_prefix_makes_too_long_is_name_invalid() {
    let hub = FakeRegistry::builder().start().await;
    let ghcr = FakeRegistry::builder().start().await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;
    let name = "a".repeat(250);
    let target = format!("/v2/{name}/manifests/latest");
    raw_request(cistern.addr(), "GET", target.as_bytes())
        .await
        .assert_oci_error(400, "NAME_INVALID", "GET");
    let head = raw_request(cistern.addr(), "HEAD", target.as_bytes()).await;
    assert_eq!(head.status, 400, "HEAD");
    assert!(hub.requests().is_empty(), "{:?}", hub.requests().len());
}

/// On the Docker Hub default route, a name that starts with a registry host (`quay.io/org/app`)
/// asks for a registry with no route: 404, and Docker Hub is never asked for a repository
/// named `quay.io/org/app`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_registry_in_the_path_is_404_not_docker_hub() {
    let hub = FakeRegistry::builder().start().await;
    let ghcr = FakeRegistry::builder().start().await;
    let cistern = hub_and_ghcr(&hub, &ghcr).await;
    let client = cistern.client();
    for path in [
        "/v2/quay.io/org/app/manifests/1".to_string(),
        "/v2/localhost/app/manifests/1".to_string(),
        blob_route("registry.example.com/app", &sha256_digest(b"x")),
    ] {
        let got = client.get(&path).await;
        got.assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
        assert!(got.body_text().contains("no route"), "{}", got.body_text());
    }
    assert!(hub.requests().is_empty(), "{}", hub.requests().len());
    assert!(ghcr.requests().is_empty(), "{}", ghcr.requests().len());
}

/// Fills are keyed by digest, but a 404 on one route says nothing about another: a pull that
/// joined a fill started through docker.io, whose upstream does not have the blob, still gets
/// it from ghcr.io's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_that_joined_another_routes_failed_fill_uses_its_own_route() {
    let (blob, digest) = blob_and_digest(64 * KIB, 7);
    let gate = Gate::new();
    let hub = FakeRegistry::builder()
        .on_blob(
            &digest,
            Fault::Status(404).and(Fault::GateAt(0, gate.clone())),
        )
        .start()
        .await;
    let ghcr = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder()
        .upstream("docker-hub", at(&hub.url()))
        .upstream("ghcr", at(&ghcr.url()))
        .route(default_route("docker.io", &["docker-hub"]))
        .route(route("ghcr.io", &["ghcr"]))
        .admin()
        .start()
        .await;
    let client = cistern.client();

    let through_hub = tokio::spawn({
        let client = client.clone();
        let route = blob_route(REPO, &digest);
        async move { client.get(&route).await }
    });
    gate.wait_reached(1).await;
    let through_ghcr = tokio::spawn({
        let client = client.clone();
        let route = format!("{}?ns=ghcr.io", blob_route(REPO, &digest));
        async move { client.get(&route).await }
    });
    // The second pull has joined the held fill once it has counted its miss (it joins
    // without awaiting anything in between).
    bounded("the second pull to join the fill", async {
        loop {
            let stats = cistern.admin(http::Method::GET, "/admin/stats").await;
            if stats.json()["blob_misses"] == 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        ghcr.blob_gets(&digest),
        0,
        "the second pull joined, not fetched"
    );
    gate.open();

    let got = through_hub.await.unwrap();
    assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.body_text());
    let got = through_ghcr.await.unwrap();
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_same_bytes(got.bytes(), &blob, "the blob through ghcr.io");
    assert_eq!((hub.blob_gets(&digest), ghcr.blob_gets(&digest)), (1, 1));
}

/// `proxy_any_registry` keeps at most `MAX_ON_DEMAND_ROUTES` routes for registries no route
/// names, dropping the least recently used: one registry more than that is proxied like the
/// rest (it used to get 404 "too many registries" for good), the configured route is never
/// dropped, and a dropped registry is proxied again when asked. The registries are loopback
/// ports nobody listens on, so each answer is a 502 naming the upstream that was tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_any_registry_serves_more_registries_than_it_keeps() {
    use ::cistern::upstream::on_demand::MAX_ON_DEMAND_ROUTES;

    let (blob, digest) = blob_and_digest(64 * KIB, 8);
    let hub = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder()
        .upstream("docker-hub", at(&hub.url()))
        .route(default_route("docker.io", &["docker-hub"]))
        .config(|c| c.proxy_any_registry = true)
        .admin()
        .start()
        .await;
    let client = cistern.client();
    let registries = closed_loopback_hosts(MAX_ON_DEMAND_ROUTES + 1).await;

    let proxied = |registry: String| {
        let client = client.clone();
        async move {
            let got = client
                .get(&format!("/v2/{REPO}/manifests/1?ns={registry}"))
                .await;
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{registry}");
            assert!(
                got.body_text().contains(&registry),
                "{registry} was not tried: {}",
                got.body_text()
            );
        }
    };
    for registry in &registries {
        proxied(registry.clone()).await;
    }
    // The first was dropped to make room for the last; asking again makes it afresh.
    proxied(registries[0].clone()).await;

    let got = client.get(&blob_route(REPO, &digest)).await;
    assert_eq!(got.status, StatusCode::OK, "the configured route");
    let metrics = cistern
        .admin(http::Method::GET, "/metrics")
        .await
        .body_text();
    let listed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("cistern_upstream_requests_total{"))
        .collect();
    assert_eq!(listed.len(), MAX_ON_DEMAND_ROUTES + 1, "{listed:?}");
    assert!(listed.iter().any(|l| l.contains("docker-hub")));
}

/// `n` distinct `127.0.0.1:<port>` with nobody listening (all bound at once, then closed).
async fn closed_loopback_hosts(n: usize) -> Vec<String> {
    let mut listeners = Vec::new();
    for _ in 0..n {
        listeners.push(tokio::net::TcpListener::bind((HOME, 0)).await.unwrap());
    }
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}
