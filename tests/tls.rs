//! HTTPS on the registry listener (`[tls]`): HTTP/2 and HTTP/1.1 by ALPN, a plain-HTTP
//! client turned away without harm, and config errors that name the field.

mod support;

use std::path::PathBuf;

use ::cistern::Config;
use http::StatusCode;
use support::*;

const REPO: &str = "library/app";

fn tls_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tls")
        .join(name)
}

fn with_tls(c: &mut Config) {
    c.tls.cert_file = Some(tls_file("server.crt"));
    c.tls.key_file = Some(tls_file("server.key"));
}

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
    let cistern = TestCistern::start_with(&upstream, with_tls).await;
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
    let cistern = TestCistern::start_with(&upstream, with_tls).await;
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
    let data = DataDir::new();
    let base = TestCistern::config_for(&data);

    let mut half = base.clone();
    half.tls.cert_file = Some(tls_file("server.crt"));
    let e = half.validate().unwrap_err().to_string();
    assert!(e.contains("tls.key_file"), "{e}");

    let run = |config: Config| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        stop.cancel();
        bounded("a start that must fail", async move {
            ::cistern::Server::builder(config)
                .build()
                .await?
                .run(listener, stop)
                .await
        })
        .await
        .unwrap_err()
        .to_string()
    };

    let mut missing = base.clone();
    with_tls(&mut missing);
    missing.tls.cert_file = Some(tls_file("no-such.crt"));
    let e = run(missing).await;
    assert!(
        e.contains("tls.cert_file") && e.contains("no-such.crt"),
        "{e}"
    );

    let mut not_a_key = base.clone();
    with_tls(&mut not_a_key);
    not_a_key.tls.key_file = Some(tls_file("ca.crt"));
    let e = run(not_a_key).await;
    assert!(e.contains("tls.key_file"), "{e}");

    // The CA's certificate with the server's key: they do not belong together.
    let mut mismatched = base.clone();
    with_tls(&mut mismatched);
    mismatched.tls.cert_file = Some(tls_file("ca.crt"));
    let e = run(mismatched).await;
    assert!(e.contains("does not fit"), "{e}");
}
