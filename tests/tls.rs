//! HTTPS on the registry listener (`[tls]`): HTTP/2 and HTTP/1.1 by ALPN, a plain-HTTP
//! client turned away without harm, and config errors that name the field.

mod support;

use ::cistern::Config;
use http::StatusCode;
use support::*;

const REPO: &str = "library/app";

/// A client that trusts only the test CA.
fn https_client(http1_only: bool) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read(tls_file("ca.crt")).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .no_proxy();
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_blobs_over_http2_and_http1() {
    let (blob, digest) = blob_and_digest(3 * MIB, 1);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let cistern = TestCistern::builder().front(&upstream).tls().start().await;
    let base = format!("https://127.0.0.1:{}", cistern.addr().port());

    for (http1_only, want) in [
        (false, http::Version::HTTP_2),
        (true, http::Version::HTTP_11),
    ] {
        let client = https_client(http1_only);
        let ping = bounded("GET /v2/", client.get(format!("{base}/v2/")).send())
            .await
            .unwrap();
        assert_eq!(ping.status(), StatusCode::OK);
        assert_eq!(ping.version(), want, "ALPN");
        let got = bounded(
            "a blob over TLS",
            client
                .get(format!("{base}{}", blob_route(REPO, &digest)))
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(got.status(), StatusCode::OK);
        assert_eq!(got.version(), want);
        assert_same_bytes(&got.bytes().await.unwrap(), &blob, "blob over TLS");
    }
    assert_eq!(upstream.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_to_the_https_listener_is_refused_and_harmless() {
    let upstream = FakeRegistry::builder().start().await;
    let cistern = TestCistern::builder().front(&upstream).tls().start().await;
    let plain = raw_request(cistern.addr(), "GET", b"/v2/").await;
    assert_ne!(
        plain.status, 200,
        "plain HTTP must not be served on the TLS port"
    );

    let base = format!("https://127.0.0.1:{}", cistern.addr().port());
    let ping = bounded(
        "GET /v2/ after",
        https_client(false).get(format!("{base}/v2/")).send(),
    )
    .await
    .unwrap();
    assert_eq!(ping.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_config_errors_name_the_field() {
    let start = |tweak: fn(&mut Config)| TestCistern::builder().tls().config(tweak).start_error();

    // Half a TLS config fails validation.
    let e = TestCistern::builder()
        .config(|c| c.tls.cert_file = Some(tls_file("server.crt")))
        .start_error()
        .await;
    assert!(e.contains("tls.key_file"), "{e}");

    let e = start(|c| c.tls.cert_file = Some(tls_file("no-such.crt"))).await;
    assert!(
        e.contains("tls.cert_file") && e.contains("no-such.crt"),
        "{e}"
    );

    let e = start(|c| c.tls.key_file = Some(tls_file("ca.crt"))).await;
    assert!(e.contains("tls.key_file"), "{e}");

    // The CA's certificate with the server's key: they do not belong together.
    let e = start(|c| c.tls.cert_file = Some(tls_file("ca.crt"))).await;
    assert!(e.contains("does not fit"), "{e}");
}
