//! Upstream bearer-token auth: cistern answers a registry's 401 challenge with a token from the
//! realm, caches it per scope until it expires, and never forwards the client's own
//! `Authorization`.

mod support;

use std::time::{Duration, SystemTime};

use ::cistern::clock::Clock;

use http::StatusCode;

use support::{
    Auth, Bearer, FakeRegistry, Kind, TestCistern, blob_and_digest, blob_bytes, closed_port_url,
    sha256_digest,
};

/// A registry that demands `Bearer <token>` on every /v2/ request and issues tokens at its own
/// /token, each valid for `expires_in` seconds; only the newest token is accepted.
async fn auth_registry(blobs: &[&bytes::Bytes], expires_in: u64) -> FakeRegistry {
    let mut builder = FakeRegistry::builder().auth(Auth::Bearer(Bearer {
        expires_in,
        ..Bearer::default()
    }));
    // Every repository the tests ask, each with every blob (the old fake ignored the name).
    for repo in ["org/app", "x/y", "other/repo"] {
        for blob in blobs {
            builder = builder.blob(repo, (*blob).clone());
        }
    }
    builder.start().await
}

/// Every `Authorization` header the /v2/ endpoints saw.
fn authorizations(registry: &FakeRegistry) -> Vec<String> {
    registry
        .requests()
        .into_iter()
        .filter(|r| r.kind != Kind::Token)
        .filter_map(|r| r.authorization())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_fetched_once_per_scope_and_client_credentials_stay_home() {
    let a = blob_bytes(300 * 1024, 1);
    let b = blob_bytes(10 * 1024, 2);
    let (da, db) = (sha256_digest(&a), sha256_digest(&b));
    let registry = auth_registry(&[&a, &b], 300).await;
    let cistern = TestCistern::start(&registry).await;
    let client = cistern.client();

    // The client sends credentials of its own: they are for cistern, never for the upstream.
    let got = client
        .send(
            client
                .request(http::Method::GET, &support::blob_route("org/app", &da))
                .header("authorization", "Bearer client-secret"),
        )
        .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    support::assert_same_bytes(got.bytes(), &a, "first blob");
    support::assert_same_bytes(
        &client.get_blob("org/app", &db).await.unwrap(),
        &b,
        "second blob",
    );

    let tokens = registry.token_requests();
    assert_eq!(tokens.len(), 1, "one token for one scope: {tokens:?}");
    assert!(
        tokens[0].contains("service=fake.registry")
            && tokens[0].contains("scope=repository%3Aorg%2Fapp%3Apull"),
        "token request names service and scope: {}",
        tokens[0]
    );
    let auths = authorizations(&registry);
    assert!(!auths.is_empty());
    assert!(
        auths.iter().all(|a| a == "Bearer tok-1"),
        "upstream saw only cistern's token: {auths:?}"
    );

    // Another repository is another scope: a new token, fetched up front (no extra 401).
    let (_, dc) = blob_and_digest(1024, 3);
    let missing = client.get(&support::blob_route("other/repo", &dc)).await;
    missing.assert_oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    let tokens = registry.token_requests();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(tokens[1].contains("scope=repository%3Aother%2Frepo%3Apull"));
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_replaced() {
    let a = blob_bytes(1024, 4);
    let b = blob_bytes(1024, 5);
    let (da, db) = (sha256_digest(&a), sha256_digest(&b));
    let registry = auth_registry(&[&a, &b], 1).await;
    let clock = Clock::manual(SystemTime::now());
    let cistern = TestCistern::builder()
        .front(&registry)
        .clock(&clock)
        .start()
        .await;
    let client = cistern.client();
    support::assert_same_bytes(&client.get_blob("x/y", &da).await.unwrap(), &a, "a");
    assert_eq!(registry.token_requests().len(), 1);
    // Step past the one-second token's life: cistern must fetch a fresh one, not reuse it.
    clock.advance(Duration::from_secs(1));
    support::assert_same_bytes(&client.get_blob("x/y", &db).await.unwrap(), &b, "b");
    assert_eq!(registry.token_requests().len(), 2, "expired token replaced");
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_token_realm_is_a_clear_error() {
    // A registry whose realm points at a dead port: the client gets an OCI error, not a hang.
    let registry = FakeRegistry::builder()
        .auth(Auth::Bearer(Bearer {
            realm: Some(format!("{}/token", closed_port_url().await)),
            service: "x".into(),
            scope: false,
            ..Bearer::default()
        }))
        .start()
        .await;
    let cistern = TestCistern::start(&registry).await;
    let client = cistern.client();
    let digest = sha256_digest(b"x");
    let r = client.get(&support::blob_route("a/b", &digest)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body_text());
    assert!(
        r.body_text().contains("token endpoint"),
        "{}",
        r.body_text()
    );
    cistern.shutdown().await;
}
