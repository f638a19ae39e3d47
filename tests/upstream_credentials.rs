//! Upstream credentials go only where they belong: the upstream's own host, and token realms
//! on its allow-list (its host, its parent domain, `token_realm_hosts`). A realm elsewhere is
//! asked anonymously, a redirect to another host (a blob store) carries no `Authorization`,
//! and a client's own `Authorization` never reaches any upstream.
//!
//! The registries here are `FakeRegistry`s behind Basic or Bearer auth; `127.0.0.2` plays a
//! foreign host.

mod support;

use ::cistern::config::UpstreamConfig;
use bytes::Bytes;
use http::StatusCode;
use support::reply::{basic_authorization, redirect};
use support::*;

const REPO: &str = "org/app";
const USER: &str = "puller";
const PASSWORD: &str = "s3cret-Pw-91";
/// The token every scripted token endpoint issues, and every scripted registry accepts.
const TOKEN: &str = "issued-token";

/// A single upstream, `hub`, as the default route, open to anonymous clients.
async fn through(hub: UpstreamConfig) -> TestCistern {
    TestCistern::builder()
        .upstream("hub", hub)
        .route(default_route("docker.io", &["hub"]))
        .anonymous(&["docker.io/*"])
        .start()
        .await
}

/// `url` with this upstream's username and password.
fn with_password(url: &str) -> UpstreamConfig {
    UpstreamConfig {
        username: Some(USER.into()),
        password: Some(PASSWORD.into()),
        ..at(url)
    }
}

/// The Bearer flow with [`TOKEN`], its challenge naming `realm` (`None`: the registry's own
/// token endpoint).
fn bearer_flow(realm: Option<String>) -> Bearer {
    Bearer {
        realm,
        service: "registry.test".into(),
        token: Some(TOKEN.into()),
        ..Bearer::default()
    }
}

fn bearer(realm: Option<String>) -> Auth {
    Auth::Bearer(bearer_flow(realm))
}

/// A registry that serves `blob` to `Bearer <TOKEN>` and challenges everyone else to get a
/// token from `realm`.
async fn bearer_registry(realm: String, blob: &Bytes) -> FakeRegistry {
    FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .auth(bearer(Some(realm)))
        .start()
        .await
}

/// A token endpoint on the foreign host that gives [`TOKEN`] to anyone.
async fn open_token_endpoint() -> FakeRegistry {
    FakeRegistry::builder()
        .host(FOREIGN)
        .auth(bearer(None))
        .start()
        .await
}

#[track_caller]
fn assert_no_authorization(requests: &[Seen], whose: &str) {
    for r in requests {
        assert_eq!(
            r.authorization(),
            None,
            "{whose} got credentials: {} {}",
            r.method,
            r.path
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_on_a_foreign_host_is_asked_anonymously() {
    let (blob, digest) = blob_and_digest(64 * KIB, 1);
    let tokens = open_token_endpoint().await;
    let registry = bearer_registry(format!("{}/token", tokens.url()), &blob).await;
    let cistern = through(with_password(&registry.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob with an anonymous token");
    assert!(!tokens.requests().is_empty(), "the realm was asked");
    assert_no_authorization(&tokens.requests(), "the foreign token realm");
    let basic = basic_authorization(USER, PASSWORD);
    for r in registry.requests() {
        assert_ne!(r.authorization(), Some(basic.clone()), "{}", r.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_realm_on_the_upstreams_own_host_gets_basic_credentials() {
    let (blob, digest) = blob_and_digest(64 * KIB, 2);
    let basic = basic_authorization(USER, PASSWORD);
    // The registry's own token endpoint issues tokens only for the Basic login.
    let registry = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .auth(Auth::Bearer(Bearer {
            login: Some((USER.into(), PASSWORD.into())),
            ..bearer_flow(None)
        }))
        .start()
        .await;
    let cistern = through(with_password(&registry.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob with a token bought with Basic");
    let token_requests = registry.requests_to("/token");
    assert_eq!(token_requests.len(), 1, "{token_requests:?}");
    assert_eq!(token_requests[0].authorization(), Some(basic));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_realm_hosts_lets_a_foreign_realm_have_credentials() {
    let (blob, digest) = blob_and_digest(64 * KIB, 3);
    let tokens = open_token_endpoint().await;
    let registry = bearer_registry(format!("{}/token", tokens.url()), &blob).await;
    let cistern = through(UpstreamConfig {
        token_realm_hosts: vec![FOREIGN.to_string()],
        ..with_password(&registry.url())
    })
    .await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob");
    let token_requests = tokens.requests();
    assert_eq!(token_requests.len(), 1, "{token_requests:?}");
    assert_eq!(
        token_requests[0].authorization(),
        Some(basic_authorization(USER, PASSWORD))
    );
}

/// A blob store on the foreign host that serves `blob` to anyone at `/store/<digest>`.
async fn blob_store(blob: &Bytes) -> FakeRegistry {
    let blob = blob.clone();
    FakeRegistry::scripted(FOREIGN, move |_| reply::blob_reply(&blob)).await
}

/// Whoever gets past `auth` is sent on to `store`, at `/store/<digest>`.
async fn redirecting_to(store: &FakeRegistry, auth: Auth) -> FakeRegistry {
    let store_url = store.url();
    FakeRegistry::builder()
        .auth(auth)
        .script(move |req| {
            Some(redirect(&format!(
                "{store_url}/store/{}",
                req.last_segment()
            )))
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_carries_no_basic_credentials() {
    let (blob, digest) = blob_and_digest(256 * KIB, 4);
    let store = blob_store(&blob).await;
    let basic = basic_authorization(USER, PASSWORD);
    let registry = redirecting_to(
        &store,
        Auth::Basic {
            username: USER.into(),
            password: PASSWORD.into(),
        },
    )
    .await;
    let cistern = through(with_password(&registry.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob through the redirect");
    assert!(
        registry
            .requests()
            .iter()
            .any(|r| r.authorization() == Some(basic.clone())),
        "the registry got the credentials, so the redirect followed an authenticated GET"
    );
    let stored = store.requests_to(&format!("/store/{digest}"));
    assert_eq!(stored.len(), 1, "{:?}", store.requests());
    assert_no_authorization(&store.requests(), "the blob store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_carries_no_bearer_token() {
    let (blob, digest) = blob_and_digest(256 * KIB, 5);
    let store = blob_store(&blob).await;
    let registry = redirecting_to(&store, bearer(None)).await;
    let cistern = through(with_password(&registry.url())).await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob through the redirect");
    assert_eq!(store.requests().len(), 1, "{:?}", store.requests());
    assert_no_authorization(&store.requests(), "the blob store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_is_sent_as_a_bearer_token_as_is() {
    let (blob, digest) = blob_and_digest(64 * KIB, 6);
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).unwrap();
    let registry = bearer_registry(format!("http://{FOREIGN}:1/token"), &blob).await;
    let cistern = through(UpstreamConfig {
        token_file: Some(token_file.path().to_path_buf()),
        ..at(&registry.url())
    })
    .await;

    let got = cistern.client().get_blob(REPO, &digest).await.unwrap();
    assert_same_bytes(&got, &blob, "blob with the file's token");
    let asked = registry.requests();
    assert_eq!(asked.len(), 1, "no challenge round trip: {asked:?}");
    assert_eq!(asked[0].authorization(), Some(format!("Bearer {TOKEN}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_authorization_never_reaches_any_upstream() {
    let (blob, digest) = blob_and_digest(64 * KIB, 7);
    let manifest = image_manifest(8);
    let mirror = FakeRegistry::builder().start().await; // has nothing: every request falls through
    let origin = FakeRegistry::builder()
        .blob("library/app", blob.clone())
        .manifest("library/app", Some("1"), OCI_MANIFEST, manifest.clone())
        .start()
        .await;
    let cistern = TestCistern::builder()
        .upstream("mirror", at(&mirror.url()))
        .upstream("origin", at(&origin.url()))
        .route(default_route("docker.io", &["mirror", "origin"]))
        .start()
        .await;
    let client = cistern.client();

    for (method, path, want) in [
        (
            http::Method::HEAD,
            blob_route("app", &digest),
            StatusCode::OK,
        ),
        (
            http::Method::GET,
            blob_route("app", &digest),
            StatusCode::OK,
        ),
        (
            http::Method::HEAD,
            manifest_route("app", "1"),
            StatusCode::OK,
        ),
        (
            http::Method::GET,
            manifest_route("app", "1"),
            StatusCode::OK,
        ),
        (
            http::Method::GET,
            "/v2/app/tags/list".to_string(),
            StatusCode::OK,
        ),
        (
            http::Method::GET,
            blob_route("app", &sha256_digest(b"none")),
            StatusCode::NOT_FOUND,
        ),
    ] {
        let request = client
            .request(method.clone(), &path)
            .header("authorization", "Basic Y2xpZW50OmNsaWVudC1zZWNyZXQ=")
            .header("cookie", "session=client-secret");
        let got = client.send(request).await;
        assert_eq!(got.status, want, "{method} {path}: {}", got.body_text());
    }

    for (name, upstream) in [("mirror", &mirror), ("origin", &origin)] {
        let requests = upstream.requests();
        assert!(!requests.is_empty(), "{name} was never asked");
        for r in requests {
            for header in ["authorization", "cookie"] {
                assert!(
                    r.headers.get(header).is_none(),
                    "{name} got the client's {header}: {} {:?} {}",
                    r.method,
                    r.kind,
                    r.reference
                );
            }
        }
    }
}
