//! Client access control (`[access]`): anonymous patterns, users from an htpasswd file, the
//! Basic challenge clients answer, failed logins, and upstreams that hold credentials.

mod support;

use ::cistern::config::{AccessConfig, UpstreamConfig};
use http::{Method, StatusCode};
use support::*;

const REPO_PUBLIC: &str = "library/alpine";
const REPO_TEAM: &str = "team/app";
const REPO_OTHER: &str = "other/app";

/// An htpasswd file (bcrypt at the lowest cost, to keep tests fast) for these users.
fn htpasswd(dir: &DataDir, users: &[(&str, &str)]) -> std::path::PathBuf {
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()))
        .collect();
    let path = dir.root().join("htpasswd");
    std::fs::write(&path, text).unwrap();
    path
}

/// One upstream with a blob in each repository; `[access]` as given.
async fn with_access(
    upstream: &FakeRegistry,
    access: impl FnOnce(&DataDir) -> AccessConfig,
) -> TestCistern {
    let data = DataDir::new();
    let access = access(&data);
    TestCistern::builder()
        .upstream("hub", at(&upstream.url()))
        .route(default_route("docker.io", &["hub"]))
        .data(data)
        .config(move |c| c.access = Some(access))
        .start()
        .await
}

fn team_access(data: &DataDir) -> AccessConfig {
    AccessConfig {
        htpasswd_file: Some(htpasswd(data, &[("ci", "ci-pass"), ("team", "team-pass")])),
        anonymous: vec!["docker.io/library/*".into()],
        users: [
            ("ci".to_string(), vec!["*".to_string()]),
            ("team".to_string(), vec!["docker.io/team/*".to_string()]),
        ]
        .into(),
    }
}

async fn upstream_with_blobs() -> (FakeRegistry, String) {
    let blob = blob_bytes(4 * KIB, 1);
    let digest = sha256_digest(&blob);
    let upstream = FakeRegistry::builder()
        .blob(REPO_PUBLIC, blob.clone())
        .blob(REPO_TEAM, blob.clone())
        .blob(REPO_OTHER, blob)
        .start()
        .await;
    (upstream, digest)
}

/// A blob GET, with Basic credentials if given.
async fn get_as(
    cistern: &TestCistern,
    login: Option<(&str, &str)>,
    repo: &str,
    digest: &str,
) -> Response {
    let client = cistern.client();
    let mut request = client.request(Method::GET, &blob_route(repo, digest));
    if let Some((user, password)) = login {
        request = request.basic_auth(user, Some(password));
    }
    client.send(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_patterns_users_and_the_basic_challenge() {
    let (upstream, digest) = upstream_with_blobs().await;
    let cistern = with_access(&upstream, team_access).await;

    // With users to log in, an anonymous ping gets the Basic challenge: skopeo and podman
    // send credentials only for a challenge they saw there.
    let ping = cistern.client().get("/v2/").await;
    ping.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(
        ping.header("www-authenticate"),
        Some("Basic realm=\"cistern\"")
    );
    // Anonymous clients pull what the anonymous patterns name.
    let got = get_as(&cistern, None, REPO_PUBLIC, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());

    // Anything else asks them to log in, the way registries do, without asking upstream.
    let before = upstream.requests().len();
    let got = get_as(&cistern, None, REPO_TEAM, &digest).await;
    got.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(
        got.header("www-authenticate"),
        Some("Basic realm=\"cistern\"")
    );
    let got = cistern
        .client()
        .get(&manifest_route(REPO_TEAM, "latest"))
        .await;
    got.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(upstream.requests().len(), before, "the upstream was asked");

    // A user pulls what its patterns name, and is refused the rest with 403.
    let team = Some(("team", "team-pass"));
    let got = get_as(&cistern, team, REPO_TEAM, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    get_as(&cistern, team, REPO_OTHER, &digest)
        .await
        .assert_oci_error(StatusCode::FORBIDDEN, "DENIED");
    // Logged in, the anonymous patterns still apply.
    let got = get_as(&cistern, team, REPO_PUBLIC, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    let got = get_as(&cistern, Some(("ci", "ci-pass")), REPO_OTHER, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());

    // Wrong credentials are refused even where anonymous clients may pull.
    for login in [("team", "wrong"), ("nobody", "team-pass")] {
        get_as(&cistern, Some(login), REPO_PUBLIC, &digest)
            .await
            .assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_from_one_address_are_rate_limited() {
    let (upstream, digest) = upstream_with_blobs().await;
    let cistern = with_access(&upstream, team_access).await;
    for _ in 0..10 {
        get_as(&cistern, Some(("team", "guess")), REPO_TEAM, &digest)
            .await
            .assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    }
    // Past the limit even the right password waits for the window to pass.
    let got = get_as(&cistern, Some(("team", "team-pass")), REPO_TEAM, &digest).await;
    got.assert_oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
    assert_eq!(got.header("retry-after"), Some("60"));
    // Anonymous pulls are not logins: they go on.
    let got = get_as(&cistern, None, REPO_PUBLIC, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    cistern.shutdown().await;
}

/// What skopeo and podman send after a Basic challenge when they hold no credentials for the
/// host: an empty user and password. That is an anonymous client, not a failed login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_basic_credentials_are_anonymous_not_a_failed_login() {
    let (upstream, digest) = upstream_with_blobs().await;
    let cistern = with_access(&upstream, team_access).await;
    for _ in 0..15 {
        let got = get_as(&cistern, Some(("", "")), REPO_PUBLIC, &digest).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    }
    get_as(&cistern, Some(("", "")), REPO_TEAM, &digest)
        .await
        .assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    cistern.shutdown().await;
}

/// A mirror with anonymous patterns and no users answers the ping: Docker's
/// `registry-mirrors` uses a mirror without `docker login` only if its ping is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_users_the_ping_is_open() {
    let (upstream, _) = upstream_with_blobs().await;
    let cistern = with_access(&upstream, |_| AccessConfig {
        anonymous: vec!["docker.io/*".into()],
        ..Default::default()
    })
    .await;
    assert_eq!(cistern.client().get("/v2/").await.status, StatusCode::OK);
    cistern.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_anonymous_patterns_even_the_ping_asks_for_a_login() {
    let (upstream, digest) = upstream_with_blobs().await;
    let cistern = with_access(&upstream, |data| AccessConfig {
        anonymous: vec![],
        ..team_access(data)
    })
    .await;
    let ping = cistern.client().get("/v2/").await;
    ping.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    assert_eq!(
        ping.header("www-authenticate"),
        Some("Basic realm=\"cistern\"")
    );
    let client = cistern.client();
    let ping = client
        .send(
            client
                .request(Method::GET, "/v2/")
                .basic_auth("ci", Some("ci-pass")),
        )
        .await;
    assert_eq!(ping.status, StatusCode::OK);
    get_as(&cistern, None, REPO_PUBLIC, &digest)
        .await
        .assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    cistern.shutdown().await;
}

/// An upstream that logs in may reach its account's private repositories: a broad anonymous
/// pattern never opens it, one naming its registry does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentialed_route_opens_only_to_a_pattern_naming_its_registry() {
    let (upstream, digest) = upstream_with_blobs().await;
    let logged_in = UpstreamConfig {
        username: Some("puller".into()),
        password: Some("upstream-secret".into()),
        ..at(&upstream.url())
    };
    let start = |anonymous: &[&str]| {
        TestCistern::builder()
            .upstream("hub", logged_in.clone())
            .route(default_route("docker.io", &["hub"]))
            .anonymous(anonymous)
            .start()
    };
    let broad = start(&["*", "*/*", "docker.*/*"]).await;
    get_as(&broad, None, REPO_PUBLIC, &digest)
        .await
        .assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    broad.shutdown().await;

    let named = start(&["docker.io/library/*"]).await;
    let got = get_as(&named, None, REPO_PUBLIC, &digest).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    get_as(&named, None, REPO_TEAM, &digest)
        .await
        .assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    named.shutdown().await;
}

/// A config whose upstreams log in and that has no `[access]` is refused, and the message
/// shows the line to add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_without_an_access_table_are_refused_with_the_line_to_add() {
    let e = TestCistern::builder()
        .upstream(
            "hub",
            UpstreamConfig {
                username: Some("puller".into()),
                password: Some("upstream-secret".into()),
                ..at("http://127.0.0.1:9")
            },
        )
        .route(default_route("docker.io", &["hub"]))
        .start_error()
        .await;
    assert!(e.contains("upstreams.hub"), "{e}");
    assert!(e.contains("anonymous = [\"docker.io/*\"]"), "{e}");
    assert!(!e.contains("upstream-secret"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_access_tables_are_refused_naming_the_key() {
    for (access, key) in [
        (
            AccessConfig {
                anonymous: vec!["alpine".into()],
                ..Default::default()
            },
            "access.anonymous[0]",
        ),
        (
            AccessConfig {
                users: [("ci".to_string(), vec!["*".to_string()])].into(),
                ..Default::default()
            },
            "access.htpasswd_file",
        ),
    ] {
        let e = TestCistern::builder()
            .config(move |c| c.access = Some(access))
            .start_error()
            .await;
        assert!(e.contains(key), "{key} not named: {e}");
    }
    // A user the htpasswd file does not have, and a file with a weak hash.
    let data = DataDir::new();
    let file = htpasswd(&data, &[("ci", "x")]);
    let missing_user = AccessConfig {
        htpasswd_file: Some(file.clone()),
        users: [("team".to_string(), vec!["*".to_string()])].into(),
        ..Default::default()
    };
    let e = TestCistern::builder()
        .config(move |c| c.access = Some(missing_user))
        .start_error()
        .await;
    assert!(e.contains("access.users.team"), "{e}");
    std::fs::write(&file, "ci:$apr1$abc$def\n").unwrap();
    let weak = AccessConfig {
        htpasswd_file: Some(file),
        ..Default::default()
    };
    let e = TestCistern::builder()
        .config(move |c| c.access = Some(weak))
        .start_error()
        .await;
    assert!(
        e.contains("access.htpasswd_file") && e.contains("bcrypt"),
        "{e}"
    );
    assert!(!e.contains("$apr1$abc"), "{e}");
}
