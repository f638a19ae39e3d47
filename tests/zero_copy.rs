//! Cached blobs go out by sendfile on plain HTTP/1 connections (`server::zero_copy`), whole
//! or as ranges, byte for byte; over TLS they are read and encrypted as before. The counter
//! behind `cistern_blob_bytes_sent_zero_copy_total` is per process, so this file holds one
//! test: nothing else in its process moves it.

mod support;

use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";
const METRIC: &str = "cistern_blob_bytes_sent_zero_copy_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_blobs_are_sent_by_sendfile_on_plain_http_only() {
    // Larger than a mapped chunk, and not a multiple of one, so the last chunk is short.
    let size = 3 * MIB + 12_345;
    let (blob, digest) = blob_and_digest(size, 7);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder()
        .front(&upstream)
        .admin()
        .start()
        .await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    // Cold: the fill's bytes are read as they land, not mapped.
    let cold = client.get(&route).await;
    assert_eq!(cold.status, StatusCode::OK);
    assert_same_bytes(cold.bytes(), &blob, "cold GET");
    cistern
        .data()
        .wait_for_blob(&digest, "the blob to be committed")
        .await;

    let before = cistern.metric(METRIC).await;
    let warm = client.get(&route).await;
    assert_eq!(warm.status, StatusCode::OK);
    assert_same_bytes(warm.bytes(), &blob, "warm GET");
    let (start, end) = (1_000_001, 2 * MIB + 77);
    let ranged = client
        .send(
            client
                .request(Method::GET, &route)
                .header("range", format!("bytes={start}-{}", end - 1)),
        )
        .await;
    assert_eq!(ranged.status, StatusCode::PARTIAL_CONTENT);
    assert_same_bytes(ranged.bytes(), &blob[start..end], "warm range");
    let sent = cistern.metric(METRIC).await - before;
    assert_eq!(
        sent,
        (size + (end - start)) as f64,
        "every byte of the warm GET and the range went by sendfile"
    );
    assert_eq!(upstream.blob_gets(&digest), 1);

    // Over TLS (HTTP/1.1 and HTTP/2) the same blob is read and encrypted: correct bytes,
    // nothing counted.
    let tls = TestCistern::builder()
        .front(&upstream)
        .tls()
        .admin()
        .start()
        .await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(tls_file("ca.crt")).unwrap();
    let base = format!("https://127.0.0.1:{}", tls.addr().port());
    for http1_only in [true, false] {
        let mut builder = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .no_proxy();
        if http1_only {
            builder = builder.http1_only();
        }
        let https = builder.build().unwrap();
        for _ in 0..2 {
            let got = bounded(
                "a blob over TLS",
                https.get(format!("{base}{route}")).send(),
            )
            .await
            .unwrap();
            assert_eq!(got.status(), StatusCode::OK);
            assert_same_bytes(&got.bytes().await.unwrap(), &blob, "blob over TLS");
        }
    }
    assert_eq!(
        cistern.metric(METRIC).await - before,
        sent,
        "TLS responses are not sent by sendfile"
    );
}
