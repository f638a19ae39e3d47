//! The edges of the protocol: the ping, OCI error bodies for bad, unknown and unsupported
//! requests, and hostile paths that must never reach outside the data directory.

mod support;

use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";

/// A cistern whose upstream knows `library/app` with one blob and one tagged manifest.
async fn setup() -> (FakeRegistry, TestCistern, String) {
    let (blob, digest) = blob_and_digest(10 * KIB, 1);
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob)
        .manifest(
            REPO,
            Some("latest"),
            OCI_MANIFEST,
            &br#"{"schemaVersion":2}"#[..],
        )
        .start()
        .await;
    let cistern = TestCistern::start(&upstream).await;
    (upstream, cistern, digest)
}

/// Nothing appeared next to the data directory.
#[track_caller]
fn assert_nothing_outside(data: &DataDir, expected: &[&str]) {
    assert_eq!(
        data.root_entries(),
        expected,
        "entries next to the data directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_answers_with_the_api_version() {
    let (_upstream, cistern, _) = setup().await;
    let client = cistern.client();
    for r in [client.get("/v2/").await, client.head("/v2/").await] {
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_unsupported() {
    let (upstream, cistern, digest) = setup().await;
    let client = cistern.client();

    let writes = [
        (Method::POST, format!("/v2/{REPO}/blobs/uploads/")),
        (Method::PATCH, format!("/v2/{REPO}/blobs/uploads/1234")),
        (
            Method::PUT,
            format!("/v2/{REPO}/blobs/uploads/1234?digest={digest}"),
        ),
        (Method::PUT, manifest_route(REPO, "latest")),
        (Method::DELETE, manifest_route(REPO, "latest")),
        (Method::DELETE, blob_route(REPO, &digest)),
        (Method::PUT, blob_route(REPO, &digest)),
        (Method::POST, "/v2/".to_string()),
        (Method::DELETE, format!("/v2/{REPO}/tags/list")),
    ];
    for (method, path) in writes {
        let r = client
            .send(client.request(method.clone(), &path).body("payload"))
            .await;
        assert_eq!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {}",
            r.body_text()
        );
        assert_eq!(r.oci_error_code(), "UNSUPPORTED", "{method} {path}");
    }
    let forwarded: Vec<Seen> = upstream
        .requests()
        .into_iter()
        .filter(|s| s.method != Method::GET && s.method != Method::HEAD)
        .collect();
    assert!(
        forwarded.is_empty(),
        "writes reached the upstream: {forwarded:?}"
    );
    assert_nothing_outside(cistern.data(), &["data"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_content_is_404_with_the_matching_code() {
    let (_upstream, cistern, digest) = setup().await;
    let client = cistern.client();
    let missing = sha256_digest(b"no such content");

    let cases = [
        (blob_route(REPO, &missing), "BLOB_UNKNOWN"),
        (manifest_route(REPO, "no-such-tag"), "MANIFEST_UNKNOWN"),
        (manifest_route(REPO, &missing), "MANIFEST_UNKNOWN"),
        (manifest_route("library/nope", "latest"), "NAME_UNKNOWN"),
        (blob_route("library/nope", &digest), "NAME_UNKNOWN"),
        ("/v2/library/nope/tags/list".to_string(), "NAME_UNKNOWN"),
    ];
    // Every case is checked before failing, so one run reports all the wrong answers.
    let mut wrong = Vec::new();
    for (path, code) in cases {
        let r = client.get(&path).await;
        if r.status != StatusCode::NOT_FOUND || r.oci_error_code() != code {
            wrong.push(format!(
                "GET {path}: want 404 {code}, got {} {}",
                r.status,
                r.body_text()
            ));
        }
        let head = client.head(&path).await;
        if head.status != StatusCode::NOT_FOUND {
            wrong.push(format!("HEAD {path}: want 404, got {}", head.status));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        cistern.data().blob_files(),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        cistern.data().manifest_files(),
        Vec::<std::path::PathBuf>::new()
    );
    assert_nothing_outside(cistern.data(), &["data"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_400_name_invalid() {
    let (_upstream, cistern, digest) = setup().await;
    let names = [
        "Library/app",
        "library/App",
        "-library/app",
        "library/app-",
        "library/a..pp",
        "library//app",
        "library/app/",
        "_library/app",
        "library/ap p",
        "library/app%2fsub",
        "library/%2e%2e",
        "%2e%2e/%2e%2e",
        "library/../../x",
        "library/./app",
        "..",
    ];
    for name in names {
        for path in [
            manifest_route(name, "latest"),
            blob_route(name, &digest),
            format!("/v2/{name}/tags/list"),
        ] {
            // Raw, so that no URL library normalises the path on the way.
            let r = raw_request(cistern.addr(), "GET", path.replace(' ', "%20").as_bytes()).await;
            r.assert_oci_error(400, "NAME_INVALID", &format!("GET {path}"));
        }
    }
    assert_nothing_outside(cistern.data(), &["data"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_digests_are_400_digest_invalid() {
    let (_upstream, cistern, digest) = setup().await;
    let hex = digest.strip_prefix("sha256:").unwrap();
    let blob_digests = [
        "sha256:abc".to_string(),
        format!("sha256:{}", &hex[..63]),
        format!("sha256:{hex}0"),
        format!("sha256:{}", hex.to_uppercase()),
        format!("sha256:{}g", &hex[..63]),
        format!("sha256{hex}"),
        format!("sha256:{hex}/x"),
        "latest".to_string(),
        "sha256:".to_string(),
        "sha256:..%2f..%2f..%2fetc%2fpasswd".to_string(),
    ];
    for d in &blob_digests {
        let path = blob_route(REPO, d);
        let r = raw_request(cistern.addr(), "GET", path.as_bytes()).await;
        r.assert_oci_error(400, "DIGEST_INVALID", &format!("GET {path}"));
    }
    // A manifest reference with a colon is a digest, and must be a valid one.
    for d in ["sha256:abc", &format!("sha256:{}", hex.to_uppercase())] {
        let path = manifest_route(REPO, d);
        let r = raw_request(cistern.addr(), "GET", path.as_bytes()).await;
        r.assert_oci_error(400, "DIGEST_INVALID", &format!("GET {path}"));
    }
    assert_nothing_outside(cistern.data(), &["data"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_never_touch_files_outside_the_data_dir() {
    let data = DataDir::new();
    // A file next to the data directory that a traversal would reach.
    let secret = b"the secret next to the data dir";
    std::fs::write(data.root().join("secret.txt"), secret).unwrap();
    let (upstream, _, digest) = setup().await;
    let cistern = TestCistern::start_on(&upstream, data, |_| {}).await;
    let hex = digest.strip_prefix("sha256:").unwrap().to_string();

    let targets: Vec<Vec<u8>> = [
        "/v2/../../secret.txt".to_string(),
        "/v2/../secret.txt".to_string(),
        format!("/v2/{REPO}/blobs/../../../../secret.txt"),
        format!("/v2/{REPO}/blobs/..%2f..%2f..%2f..%2fsecret.txt"),
        format!("/v2/{REPO}/blobs/sha256:..%2f..%2f..%2f..%2f..%2fsecret.txt"),
        format!("/v2/{REPO}/blobs/sha256%3a%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt"),
        format!(
            "/v2/{REPO}/blobs/sha256:{}%2f..%2f..%2f..%2f..%2fsecret.txt",
            &hex[..2]
        ),
        format!("/v2/{REPO}/manifests/..%2f..%2f..%2f..%2fsecret.txt"),
        format!("/v2/{REPO}/manifests/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt"),
        format!("/v2/{REPO}/manifests/sha256:..%2F..%2F..%2F..%2F..%2Fsecret.txt"),
        format!("/v2/{REPO}/manifests/.."),
        format!("/v2/{REPO}/manifests/%2e%2e"),
        format!("/v2/{REPO}/manifests/latest%00.txt"),
        format!("/v2/{REPO}/blobs/{digest}%00"),
        "/v2/%2e%2e/%2e%2e/manifests/latest".to_string(),
        "/v2/%2e%2e%2f%2e%2e%2fsecret.txt/manifests/latest".to_string(),
        "/v2//etc/passwd/manifests/latest".to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .chain([
        format!("/v2/{REPO}/manifests/lat\0est").into_bytes(),
        b"/v2/library/app/blobs/sha256:\0".to_vec(),
    ])
    .collect();

    for method in ["GET", "HEAD", "PUT", "DELETE"] {
        for target in &targets {
            let shown = String::from_utf8_lossy(target).into_owned();
            let r = raw_request(cistern.addr(), method, target).await;
            // 0: closed without an answer (a request line the HTTP parser refused).
            assert!(
                r.status == 0 || (400..500).contains(&r.status),
                "{method} {shown:?} answered {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            assert!(
                !r.body.windows(secret.len()).any(|w| w == secret),
                "{method} {shown:?} leaked the secret"
            );
        }
    }
    let data = cistern.shutdown().await;
    assert_nothing_outside(&data, &["data", "secret.txt"]);
    assert_eq!(
        std::fs::read(data.root().join("secret.txt")).unwrap(),
        secret
    );
    assert_eq!(
        data.files_outside_data(),
        [std::path::PathBuf::from("secret.txt")]
    );
}
