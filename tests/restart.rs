//! Start-up and restart: partial files left in `tmp/` are swept and never served; committed
//! blobs and manifests are served after a restart without asking the upstream, also while
//! the reference index still loads, and what is recorded meanwhile survives the load.

mod support;

use std::time::{Duration, SystemTime};

use ::cistern::cache::refs::LoadGate;
use ::cistern::clock::Clock;
use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_tmp_files_are_removed_at_start_and_never_served() {
    let (blob, digest) = blob_and_digest(512 * KIB, 1);
    let hex = digest.strip_prefix("sha256:").unwrap();
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let manifest_digest = sha256_digest(manifest);
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .manifest(REPO, None, OCI_MANIFEST, &manifest[..])
        .start()
        .await;

    // What a crash mid-fill could leave: the first half of the blob, a full-length file of the
    // wrong bytes under the blob's name, a half manifest, and unrelated junk.
    let data = DataDir::new();
    let tmp = data.path().join("tmp");
    std::fs::create_dir_all(tmp.join("nested")).unwrap();
    std::fs::write(tmp.join(hex), &blob[..blob.len() / 2]).unwrap();
    std::fs::write(
        tmp.join(format!("{hex}.partial")),
        blob.iter().map(|b| !b).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(
        tmp.join(manifest_digest.strip_prefix("sha256:").unwrap()),
        &manifest[..10],
    )
    .unwrap();
    std::fs::write(tmp.join("nested").join("junk"), b"junk").unwrap();
    assert_eq!(data.tmp_files().len(), 4);

    let cistern = TestCistern::start_on(&upstream, data, |_| {}).await;
    let client = cistern.client();
    assert_eq!(client.get("/v2/").await.status, StatusCode::OK);
    let data = cistern.data().clone();
    eventually(
        "leftovers in tmp/ to be swept at start-up",
        patience(),
        || data.tmp_files().is_empty(),
    )
    .await;

    let got = client.get_blob(REPO, &digest).await.expect("GET blob");
    assert_same_bytes(&got, &blob, "blob after a sweep");
    assert_eq!(
        upstream.blob_gets(&digest),
        1,
        "the blob must come from the upstream, not from a leftover"
    );
    let m = client.get_manifest(REPO, &manifest_digest).await;
    assert_eq!(m.bytes(), &manifest[..]);
    assert_eq!(
        upstream.count(Method::GET, Kind::Manifest, &manifest_digest),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_is_served_after_a_restart_without_upstream() {
    let (blob, digest) = blob_and_digest(3 * MIB, 2);
    let manifest = br#"{"schemaVersion":2, "mediaType":"application/vnd.oci.image.manifest.v1+json" , "layers":[]}"#;
    let manifest_digest = sha256_digest(manifest);
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .manifest(REPO, Some("v1"), OCI_MANIFEST, &manifest[..])
        .start()
        .await;

    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();
    cistern.get_blob_committed(REPO, &digest).await;
    assert_eq!(client.get_manifest(REPO, "v1").await.bytes(), &manifest[..]);
    let data = cistern.shutdown().await;
    assert!(data.blob_path(&digest).is_file());
    assert!(data.manifest_path(&manifest_digest).is_file());
    assert_eq!(data.tmp_files(), Vec::<std::path::PathBuf>::new());

    let before = upstream.requests().len();
    let cistern = TestCistern::start_on(&upstream, data, |_| {}).await;
    let client = cistern.client();
    let got = client
        .get_blob(REPO, &digest)
        .await
        .expect("GET after restart");
    assert_same_bytes(&got, &blob, "blob after restart");
    let m = client.get_manifest(REPO, &manifest_digest).await;
    assert_eq!(m.bytes(), &manifest[..]);
    assert_eq!(m.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(
        m.header("docker-content-digest"),
        Some(manifest_digest.as_str())
    );
    assert_eq!(
        upstream.requests().len(),
        before,
        "content cached before the restart asks the upstream nothing"
    );
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_manifest_that_fails_its_digest_is_fetched_again() {
    let manifest =
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
    let digest = sha256_digest(manifest);
    let manifest = bytes::Bytes::from_static(manifest);
    let upstream = FakeRegistry::with_manifest(REPO, None, OCI_MANIFEST, &manifest).await;
    // A manifest file whose bytes changed on disk (bit rot, a hand edit): it must not be
    // served, nor make the manifest unservable.
    let data = DataDir::new();
    let path = data.manifest_path(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut corrupt = format!("{OCI_MANIFEST}\n").into_bytes();
    corrupt.extend(manifest.iter().map(|b| b ^ 1));
    std::fs::write(&path, &corrupt).unwrap();

    let cistern = TestCistern::start_on(&upstream, data, |_| {}).await;
    let got = cistern.client().get_manifest(REPO, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    assert_same_bytes(got.body.as_ref().unwrap(), &manifest, "manifest");
    let stored = std::fs::read(cistern.data().manifest_path(&digest)).unwrap();
    assert_same_bytes(
        &stored[OCI_MANIFEST.len() + 1..],
        &manifest,
        "the stored manifest, repaired",
    );
}

/// The admin stats, once the reference index is loaded.
async fn stats_once_loaded(cistern: &TestCistern) -> serde_json::Value {
    retry_until("the reference index to load", || async {
        let v = cistern.admin(Method::GET, "/admin/stats").await.json();
        (v["reference_index_loading"] == false).then_some(v)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_serves_while_the_reference_index_loads_and_keeps_what_it_records() {
    const OTHER: &str = "team/other";
    let (cfg1, layer1) = (blob_bytes(KIB, 71), blob_bytes(64 * KIB, 72));
    let (cfg2, layer2) = (blob_bytes(KIB, 73), blob_bytes(64 * KIB, 74));
    let v1 = oci_image_manifest(&cfg1, &[&layer1]);
    let v2 = oci_image_manifest(&cfg2, &[&layer2]);
    let m3 = image_manifest(75);
    let (v1_digest, v2_digest, m3_digest) =
        (sha256_digest(&v1), sha256_digest(&v2), sha256_digest(&m3));
    let upstream = FakeRegistry::builder()
        .blob(REPO, cfg1.clone())
        .blob(REPO, layer1.clone())
        .manifest(REPO, Some("1"), OCI_MANIFEST, v1.clone())
        .manifest(REPO, None, OCI_MANIFEST, v2.clone())
        .manifest(OTHER, None, OCI_MANIFEST, m3.clone())
        .start()
        .await;
    let registry = upstream.addr().to_string();
    let clock = Clock::manual(SystemTime::now());
    let cistern = TestCistern::builder()
        .front(&upstream)
        .clock(&clock)
        .admin()
        .start()
        .await;
    assert_eq!(cistern.client().get_manifest(REPO, "1").await.bytes(), &v1);
    cistern
        .get_blob_committed(REPO, &sha256_digest(&layer1))
        .await;

    // Restart with the reference index's load held after it read the files: REPO:1 → v1.
    let gate = LoadGate::closed();
    let cistern = cistern.restart_held(&gate).await;
    bounded("the load to read the files", gate.reached()).await;
    let client = cistern.client();
    let stats = cistern.admin(Method::GET, "/admin/stats").await.json();
    assert_eq!(stats["reference_index_loading"], true, "{stats}");

    // Hits wait for nothing: a blob, a manifest by digest, a manifest by its tag's record.
    let before = upstream.requests().len();
    let got = client
        .get_blob(REPO, &sha256_digest(&layer1))
        .await
        .expect("a blob hit while loading");
    assert_same_bytes(&got, &layer1, "blob");
    assert_eq!(client.get_manifest(REPO, &v1_digest).await.bytes(), &v1);
    assert_eq!(client.get_manifest(REPO, "1").await.bytes(), &v1);
    assert_eq!(
        upstream.requests().len(),
        before,
        "hits asked the upstream (the by-digest hit's link check waits for the load)"
    );

    // Records made during the load: the tag moves to v2 (a newer answer than the record the
    // load read), and OTHER's manifest is fetched by digest (a link, claimed while loading).
    upstream.tag(REPO, "1", &v2_digest);
    clock.advance(Duration::from_secs(3600));
    assert_eq!(client.get_manifest(REPO, "1").await.bytes(), &v2);
    assert_eq!(client.get_manifest(OTHER, &m3_digest).await.bytes(), &m3);
    assert!(
        cistern.data().files("links").is_empty(),
        "a link decided before the graph is whole"
    );

    gate.open();
    let stats = stats_once_loaded(&cistern).await;
    // v1, v2, m3, each once; REPO:1 once (the live answer); OTHER's link, written by the
    // load's end; and REPO's link to v1 (pulled by digest above, no longer its tag's), once
    // the background check confirmed it upstream.
    assert_eq!(stats["manifests_indexed"], 3, "{stats}");
    assert_eq!(stats["tags"], 1, "{stats}");
    eventually("REPO's link to v1", patience(), || {
        cistern.data().files("links").len() == 2
    })
    .await;

    // All of it was written to disk: a plain restart rebuilds the same graph.
    let cistern = cistern.restart().await;
    let stats = stats_once_loaded(&cistern).await;
    assert_eq!(
        (&stats["manifests_indexed"], &stats["tags"], &stats["links"]),
        (&3.into(), &1.into(), &2.into()),
        "{stats}"
    );
    // The tag names v2, not the stale v1: purging it removes v2 (v1 stays, linked).
    let r = cistern
        .admin(Method::DELETE, &format!("/admin/tags/{registry}/{REPO}:1"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    assert_eq!(r.json()["removed"]["manifests"], 1, "{}", r.body_text());
    assert!(!cistern.data().manifest_path(&v2_digest).exists());
    assert!(cistern.data().manifest_path(&v1_digest).exists());
    // OTHER owns m3 through the link written at the load's end.
    let r = cistern
        .admin(
            Method::DELETE,
            &format!("/admin/repositories/{registry}/{OTHER}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    assert_eq!(r.json()["removed"]["manifests"], 1, "{}", r.body_text());
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_the_load_does_not_hang_and_the_next_start_rebuilds() {
    let manifest = image_manifest(81);
    let upstream = FakeRegistry::builder()
        .manifest(REPO, Some("1"), OCI_MANIFEST, manifest.clone())
        .start()
        .await;
    let cistern = TestCistern::builder()
        .front(&upstream)
        .admin()
        .start()
        .await;
    assert_eq!(
        cistern.client().get_manifest(REPO, "1").await.bytes(),
        &manifest
    );

    let gate = LoadGate::closed();
    let cistern = cistern.restart_held(&gate).await;
    bounded("the load to read the files", gate.reached()).await;
    let stats = cistern.admin(Method::GET, "/admin/stats").await.json();
    assert_eq!(stats["reference_index_loading"], true, "{stats}");
    // The gate is never opened: the shutdown alone must end the load (`shutdown` fails the
    // test if cistern does not stop).
    let data = cistern.shutdown().await;
    assert!(data.manifest_path(&sha256_digest(&manifest)).exists());

    let cistern = TestCistern::builder()
        .front(&upstream)
        .data(data)
        .admin()
        .start()
        .await;
    let stats = stats_once_loaded(&cistern).await;
    assert_eq!(
        (&stats["manifests_indexed"], &stats["tags"]),
        (&1.into(), &1.into())
    );
    cistern.shutdown().await;
}
