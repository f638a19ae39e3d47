//! Manifests: byte-exact, with the upstream's media type and the digest of the bytes; by tag
//! through a remembered tag → digest; verified by digest; capped in size.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";

/// An image manifest as no serializer would write it: odd whitespace, `layers` before
/// `config`, an escaped character, a trailing newline. Re-serializing changes its digest.
fn image_manifest(seed: u32) -> Bytes {
    let layer = sha256_digest(format!("layer {seed}").as_bytes());
    let config = sha256_digest(format!("config {seed}").as_bytes());
    Bytes::from(format!(
        "{{\n\t\"schemaVersion\" :2 ,\"mediaType\":\"{OCI_MANIFEST}\",\n   \"layers\":[ {{\"size\":{seed},\
         \"digest\":\"{layer}\",\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\"}} ],\
         \"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{config}\",\"size\":2}},\
         \"annotations\":{{\"org.example.note\":\"caf\\u00e9  \"}}  }}\n"
    ))
}

fn docker_manifest(seed: u32) -> Bytes {
    let layer = sha256_digest(format!("docker layer {seed}").as_bytes());
    Bytes::from(format!(
        "{{\"schemaVersion\": 2,\"mediaType\": \"{DOCKER_MANIFEST}\",\"config\": {{\"size\": 7,\
         \"mediaType\": \"application/vnd.docker.container.image.v1+json\",\"digest\": \"{layer}\"}},\"layers\": []}}"
    ))
}

fn index_of(children: &[(&str, &Bytes, &str)]) -> Bytes {
    let entries: Vec<String> = children
        .iter()
        .map(|(media_type, bytes, arch)| {
            format!(
                "  {{ \"digest\":\"{}\" , \"mediaType\":\"{media_type}\",\"size\":{},\
                 \"platform\":{{\"os\":\"linux\",\"architecture\":\"{arch}\"}} }}",
                sha256_digest(bytes),
                bytes.len()
            )
        })
        .collect();
    Bytes::from(format!(
        "{{\"manifests\":[\n{}\n],\"mediaType\":\"{OCI_INDEX}\",   \"schemaVersion\":2}}\r\n",
        entries.join(",\n")
    ))
}

#[track_caller]
fn assert_manifest(r: &Response, bytes: &[u8], media_type: &str) {
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    assert_eq!(r.header("content-type"), Some(media_type));
    assert_eq!(
        r.header("docker-content-digest"),
        Some(sha256_digest(bytes).as_str())
    );
    assert_eq!(
        r.header("content-length"),
        Some(bytes.len().to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_digest_is_byte_exact_on_get_and_head() {
    let manifest = image_manifest(1);
    let digest = sha256_digest(&manifest);
    let upstream = FakeRegistry::with_manifest(REPO, None, OCI_MANIFEST, &manifest).await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();
    let route = manifest_route(REPO, &digest);

    let get = client.get(&route).await;
    assert_manifest(&get, &manifest, OCI_MANIFEST);
    assert_eq!(get.bytes(), &manifest);
    let head = client.head(&route).await;
    assert_manifest(&head, &manifest, OCI_MANIFEST);
    assert!(head.bytes().is_empty());

    let before = upstream.manifest_requests();
    assert_eq!(client.get(&route).await.bytes(), &manifest);
    assert_eq!(
        upstream.manifest_requests(),
        before,
        "a manifest by digest is fetched once"
    );
    // The spec fixes where a cached manifest lives, not the file's framing; the upstream bytes
    // must be in it unaltered.
    let stored = std::fs::read(cistern.data().manifest_path(&digest)).expect("cached manifest");
    assert!(
        stored.windows(manifest.len()).any(|w| w == manifest),
        "the cached file must hold the exact bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_tag_is_byte_exact_on_get_and_head() {
    let manifest = docker_manifest(2);
    let upstream =
        FakeRegistry::with_manifest(REPO, Some("v1.0"), DOCKER_MANIFEST, &manifest).await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    let get = client.get_manifest(REPO, "v1.0").await;
    assert_manifest(&get, &manifest, DOCKER_MANIFEST);
    assert_eq!(get.bytes(), &manifest);
    let head = client.head(&manifest_route(REPO, "v1.0")).await;
    assert_manifest(&head, &manifest, DOCKER_MANIFEST);
    assert!(head.bytes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_flow_head_by_tag_then_get_by_digest() {
    // What docker and containerd do: HEAD the tag for its digest, then GET by digest.
    let manifest = image_manifest(19);
    let digest = sha256_digest(&manifest);
    let upstream = FakeRegistry::with_manifest(REPO, Some("v2"), OCI_MANIFEST, &manifest).await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    let head = client.head(&manifest_route(REPO, "v2")).await;
    assert_manifest(&head, &manifest, OCI_MANIFEST);
    assert!(head.bytes().is_empty());
    let get = client
        .get_manifest(REPO, head.header("docker-content-digest").unwrap())
        .await;
    assert_manifest(&get, &manifest, OCI_MANIFEST);
    assert_eq!(get.bytes(), &manifest);
    let gets = upstream
        .requests()
        .into_iter()
        .filter(|s| s.kind == Kind::Manifest && s.method == Method::GET)
        .count();
    assert!(
        gets <= 1,
        "one upstream GET at most for one manifest, saw {gets}"
    );
    assert_eq!(
        upstream.count(Method::GET, Kind::Manifest, "v2"),
        0,
        "the bytes are fetched by digest, not by tag"
    );
    assert!(cistern.data().manifest_path(&digest).is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_is_remembered_within_its_ttl() {
    let old = image_manifest(3);
    let new = image_manifest(4);
    let upstream = FakeRegistry::with_manifest(REPO, Some("latest"), OCI_MANIFEST, &old).await;
    let cistern =
        TestCistern::start_with(&upstream, |c| c.cache.tag_ttl = Duration::from_secs(3600)).await;
    let client = cistern.client();

    assert_eq!(client.get_manifest(REPO, "latest").await.bytes(), &old);
    let before = upstream.manifest_requests();
    // The tag moves upstream; within the TTL cistern still answers from what it remembers.
    upstream.add_manifest(REPO, Some("latest"), OCI_MANIFEST, new);

    assert_eq!(client.get_manifest(REPO, "latest").await.bytes(), &old);
    let head = client.head(&manifest_route(REPO, "latest")).await;
    assert_manifest(&head, &old, OCI_MANIFEST);
    assert_eq!(
        upstream.manifest_requests(),
        before,
        "requests by tag within the TTL must not reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_is_asked_again_after_its_ttl() {
    let old = image_manifest(5);
    let new = image_manifest(6);
    let ttl = Duration::from_secs(1);
    let upstream = FakeRegistry::with_manifest(REPO, Some("latest"), OCI_MANIFEST, &old).await;
    let clock = ::cistern::clock::Clock::manual(std::time::SystemTime::now());
    let cistern = TestCistern::builder()
        .front(&upstream)
        .clock(&clock)
        .config(move |c| c.cache.tag_ttl = ttl)
        .start()
        .await;
    let client = cistern.client();

    assert_eq!(client.get_manifest(REPO, "latest").await.bytes(), &old);
    upstream.add_manifest(REPO, Some("latest"), OCI_MANIFEST, new.clone());
    // Past the TTL on the cistern's clock, not the wall's.
    clock.advance(ttl + Duration::from_millis(500));
    let after = client.get_manifest(REPO, "latest").await;
    assert_manifest(&after, &new, OCI_MANIFEST);
    assert_eq!(after.bytes(), &new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_lookup_heads_upstream_and_reuses_a_cached_manifest() {
    let manifest = image_manifest(7);
    let digest = sha256_digest(&manifest);
    let upstream = FakeRegistry::with_manifest(REPO, Some("stable"), OCI_MANIFEST, &manifest).await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    assert_eq!(client.get_manifest(REPO, &digest).await.bytes(), &manifest);
    assert_eq!(upstream.count(Method::GET, Kind::Manifest, &digest), 1);

    let by_tag = client.get_manifest(REPO, "stable").await;
    assert_manifest(&by_tag, &manifest, OCI_MANIFEST);
    assert_eq!(by_tag.bytes(), &manifest);
    let gets = upstream
        .requests()
        .into_iter()
        .filter(|s| s.kind == Kind::Manifest && s.method == Method::GET)
        .count();
    assert_eq!(
        gets, 1,
        "the manifest was cached by digest; resolving the tag needs only a HEAD"
    );
    assert_eq!(upstream.count(Method::HEAD, Kind::Manifest, "stable"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_and_child_manifests_by_digest() {
    let amd64 = image_manifest(8);
    let arm64 = docker_manifest(9);
    let index = index_of(&[
        (OCI_MANIFEST, &amd64, "amd64"),
        (DOCKER_MANIFEST, &arm64, "arm64"),
    ]);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("multi"), OCI_INDEX, index.clone())
        .manifest(REPO, None, OCI_MANIFEST, amd64.clone())
        .manifest(REPO, None, DOCKER_MANIFEST, arm64.clone())
        .start()
        .await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    for _round in 0..2 {
        let got = client.get_manifest(REPO, "multi").await;
        assert_manifest(&got, &index, OCI_INDEX);
        assert_eq!(got.bytes(), &index);
        // A client picks its platform from the index and fetches that child by digest.
        let children: Vec<String> = got.json()["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap().to_string())
            .collect();
        for (child, (bytes, media_type)) in children
            .iter()
            .zip([(&amd64, OCI_MANIFEST), (&arm64, DOCKER_MANIFEST)])
        {
            let r = client.get_manifest(REPO, child).await;
            assert_manifest(&r, bytes, media_type);
            assert_eq!(r.bytes(), bytes);
        }
    }
    for child in [&amd64, &arm64] {
        assert_eq!(
            upstream.count(Method::GET, Kind::Manifest, &sha256_digest(child)),
            1,
            "each child is fetched once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_header_lines_are_merged_and_forwarded() {
    // The last type is one no proxy would add on its own: it proves the client's set travels.
    const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    let manifest = image_manifest(10);
    let upstream = FakeRegistry::with_manifest(REPO, Some("accept"), OCI_MANIFEST, &manifest).await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    let request = client
        .request(Method::GET, &manifest_route(REPO, "accept"))
        .header("accept", format!("{OCI_INDEX}, {OCI_MANIFEST}"))
        .header("accept", DOCKER_LIST)
        .header("accept", format!("{DOCKER_MANIFEST},{SCHEMA1}"));
    let r = client.send(request).await;
    assert_eq!(r.bytes(), &manifest);

    let by_tag = upstream.requests_for(Kind::Manifest, "accept");
    assert!(!by_tag.is_empty(), "the tag must be resolved upstream");
    for seen in by_tag {
        let forwarded = seen.header_values("accept");
        for wanted in [
            OCI_INDEX,
            OCI_MANIFEST,
            DOCKER_LIST,
            DOCKER_MANIFEST,
            SCHEMA1,
        ] {
            assert!(
                forwarded
                    .iter()
                    .any(|v| v == wanted || v.starts_with(&format!("{wanted};"))),
                "{} by tag forwarded Accept {forwarded:?}, missing {wanted}",
                seen.method
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_with_wrong_digest_is_rejected_and_not_cached() {
    let manifest = image_manifest(11);
    let digest = sha256_digest(&manifest);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, None, OCI_MANIFEST, manifest.clone())
        .on_manifest(&digest, Fault::WrongBytes.once())
        .start()
        .await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    let bad = client.get_manifest(REPO, &digest).await;
    assert!(
        bad.status.is_server_error(),
        "a manifest whose bytes do not match the digest: {} {}",
        bad.status,
        bad.body_text()
    );
    bad.oci_error_code();
    assert_eq!(
        cistern.data().manifest_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing cached"
    );

    let good = client.get_manifest(REPO, &digest).await;
    assert_eq!(good.bytes(), &manifest);
    assert_eq!(
        upstream.count(Method::GET, Kind::Manifest, &digest),
        2,
        "the bad answer was not remembered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_by_tag_with_wrong_bytes_is_rejected() {
    let manifest = image_manifest(12);
    let digest = sha256_digest(&manifest);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("bad"), OCI_MANIFEST, manifest.clone())
        // Whichever reference cistern GETs, the body does not match the digest the HEAD gave.
        .on_manifest(&digest, Fault::WrongBytes)
        .on_manifest("bad", Fault::WrongBytes)
        .start()
        .await;
    let cistern = TestCistern::start(&upstream).await;

    let r = cistern.client().get_manifest(REPO, "bad").await;
    assert!(r.status.is_server_error(), "{} {}", r.status, r.body_text());
    r.oci_error_code();
    assert_eq!(
        cistern.data().manifest_files(),
        Vec::<std::path::PathBuf>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifest_is_refused() {
    let limit = bytesize::ByteSize::kib(2);
    let small = image_manifest(13);
    // Valid JSON, padded with whitespace to 8 KiB.
    let mut big = image_manifest(14).to_vec();
    big.truncate(big.len() - 1);
    big.resize(8 * KIB, b' ');
    let big = Bytes::from(big);
    let big_digest = sha256_digest(&big);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("big"), OCI_MANIFEST, big.clone())
        .manifest(REPO, Some("small"), OCI_MANIFEST, small.clone())
        .start()
        .await;
    let cistern =
        TestCistern::start_with(&upstream, move |c| c.cache.max_manifest_size = limit).await;
    let client = cistern.client();

    for reference in [big_digest.as_str(), "big"] {
        let r = client.get_manifest(REPO, reference).await;
        assert!(
            r.status.is_server_error(),
            "{reference}: {} {}",
            r.status,
            r.body_text()
        );
        r.oci_error_code();
        let text = r.body_text();
        let mentions = [
            limit.as_u64().to_string(),
            limit.to_string(),
            big.len().to_string(),
            bytesize::ByteSize::b(big.len() as u64).to_string(),
        ];
        assert!(
            mentions.iter().any(|m| text.contains(m.as_str())),
            "{reference}: the error should name the size: {text}"
        );
    }
    assert_eq!(
        cistern.data().manifest_files(),
        Vec::<std::path::PathBuf>::new(),
        "nothing oversized is cached"
    );
    // The cap leaves normal manifests alone.
    assert_eq!(client.get_manifest(REPO, "small").await.bytes(), &small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_is_forwarded_with_its_query() {
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("a"), OCI_MANIFEST, image_manifest(15))
        .manifest(REPO, Some("b"), OCI_MANIFEST, image_manifest(16))
        .manifest(REPO, Some("c"), OCI_MANIFEST, image_manifest(17))
        .manifest(REPO, Some("d"), OCI_MANIFEST, image_manifest(18))
        .start()
        .await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    let all = client.get(&format!("/v2/{REPO}/tags/list")).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(
        all.json(),
        serde_json::json!({ "name": REPO, "tags": ["a", "b", "c", "d"] })
    );

    let page = client
        .get(&format!("/v2/{REPO}/tags/list?n=2&last=a"))
        .await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.json(),
        serde_json::json!({ "name": REPO, "tags": ["b", "c"] })
    );
    let seen = upstream
        .requests()
        .into_iter()
        .filter(|s| s.kind == Kind::Tags)
        .last()
        .unwrap();
    let mut query: Vec<&str> = seen.query.as_deref().unwrap_or("").split('&').collect();
    query.sort();
    assert_eq!(query, ["last=a", "n=2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_accept_headers_share_one_tag_answer() {
    // Every request carries the types real clients send plus one no registry knows: a client
    // that varies its Accept header must not make a new tag answer (a record on disk, an index
    // entry, an upstream request) each time.
    let manifest = image_manifest(30);
    let upstream = FakeRegistry::with_manifest(REPO, Some("many"), OCI_MANIFEST, &manifest).await;
    let cistern = TestCistern::builder()
        .front(&upstream)
        .admin()
        .start()
        .await;
    let client = cistern.client();
    for i in 0..1000 {
        let accept = format!(
            "{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_LIST}, {DOCKER_MANIFEST}, application/x-junk-{i}"
        );
        let r = client
            .send(
                client
                    .request(Method::GET, &manifest_route(REPO, "many"))
                    .header("accept", accept),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
        assert_eq!(r.bytes(), &manifest);
    }
    let requests = upstream.requests_for(Kind::Manifest, "many").len();
    assert!(requests <= 3, "{requests} upstream requests for one tag");
    let records = cistern.data().files("tags").len();
    assert!(records <= 2, "{records} tag records for one tag");
    let stats = cistern.admin(Method::GET, "/admin/stats").await.json();
    assert!(stats["tags"].as_u64().unwrap() <= 2, "{stats}");

    // Clients with different known sets are still answered apart, and each one upstream
    // receives the known types of its class.
    let docker_only = client
        .send(
            client
                .request(Method::GET, &manifest_route(REPO, "many"))
                .header("accept", format!("{DOCKER_MANIFEST}, x/junk")),
        )
        .await;
    assert_eq!(docker_only.status, StatusCode::OK);
    let by_tag = upstream.requests_for(Kind::Manifest, "many");
    let last = by_tag.last().unwrap();
    assert_eq!(
        last.header_values("accept"),
        vec![DOCKER_MANIFEST.to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_digest_under_new_names_do_not_grow_links() {
    // A cached manifest pulled by digest under names the upstream never confirmed: cistern
    // answers from its cache but records nothing for those names.
    const OTHER: &str = "library/other";
    let manifest = image_manifest(31);
    let digest = sha256_digest(&manifest);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, None, OCI_MANIFEST, manifest.clone())
        .manifest(OTHER, None, OCI_MANIFEST, manifest.clone())
        .start()
        .await;
    let cistern = TestCistern::builder()
        .front(&upstream)
        .admin()
        .start()
        .await;
    let client = cistern.client();
    let links = |c: &TestCistern| c.data().files("links").len();
    // Fetched from the upstream for REPO: REPO owns it (one link).
    assert_eq!(client.get_manifest(REPO, &digest).await.bytes(), &manifest);
    assert_eq!(links(&cistern), 1);
    // A cache hit under another repository that has it upstream: linked once the upstream
    // confirms it (a HEAD, in the background).
    assert_eq!(client.get_manifest(OTHER, &digest).await.bytes(), &manifest);
    eventually("the confirmed link", Duration::from_secs(10), || {
        links(&cistern) == 2
    })
    .await;
    for i in 0..1000 {
        let name = format!("someone/new-{i}");
        let r = client.get_manifest(&name, &digest).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
        assert_eq!(r.bytes(), &manifest);
    }
    assert_eq!(links(&cistern), 2, "links written for unconfirmed names");
    let stats = cistern.admin(Method::GET, "/admin/stats").await.json();
    assert_eq!(stats["links"], 2, "{stats}");
}
