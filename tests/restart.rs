//! Start-up and restart: partial files left in `tmp/` are swept and never served; committed
//! blobs and manifests are served after a restart without asking the upstream.

mod support;

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
