//! The admin API (token, stats, purge, pins) and the `cistern admin` CLI, against a running
//! server and on a stopped cache directory.

mod support;

use std::process::{Command, Stdio};

use bytesize::ByteSize;
use http::{Method, StatusCode};
use support::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const REPO: &str = "library/app";
const TOKEN: &str = "s3cret-admin-token";

struct Running {
    api: Client,
    admin: Client,
    admin_url: String,
    token_file: std::path::PathBuf,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(upstream: &FakeRegistry, data: &DataDir, max_size: Option<u64>) -> Running {
    init();
    let token_file = data.root().join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut config = ::cistern::Config {
        data_dir: data.path().to_path_buf(),
        upstream: ::cistern::config::UpstreamConfig::new(upstream.url()),
        ..::cistern::Config::default()
    };
    config.admin.token_file = Some(token_file.clone());
    config.cache.max_size = max_size.map(ByteSize::b);
    let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api_url = format!("http://{}", api.local_addr().unwrap());
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(::cistern::run_with_admin(
        api,
        Some(admin),
        config,
        stop.clone(),
    ));
    Running {
        api: Client::new(api_url),
        admin: Client::new(admin_url.clone()),
        admin_url,
        token_file,
        stop,
        task,
    }
}

impl Running {
    async fn admin(&self, method: Method, path: &str) -> Response {
        self.admin
            .send(self.admin.request(method, path).bearer_auth(TOKEN))
            .await
    }

    async fn stop(self) {
        self.stop.cancel();
        bounded("shutdown", self.task).await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_its_token_and_reports_stats() {
    let (blob, digest) = blob_and_digest(200 * KIB, 1);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let data = DataDir::new();
    let s = start(&upstream, &data, None).await;
    s.api.get_blob(REPO, &digest).await.unwrap();
    s.api.get_blob(REPO, &digest).await.unwrap();

    let anonymous = s.admin.get("/admin/stats").await;
    anonymous.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let wrong = s
        .admin
        .send(
            s.admin
                .request(Method::GET, "/admin/stats")
                .bearer_auth("nope"),
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    let stats = s.admin(Method::GET, "/admin/stats").await;
    assert_eq!(stats.status, StatusCode::OK, "{}", stats.body_text());
    let v = stats.json();
    assert_eq!(v["blobs"], 1);
    assert_eq!(v["blob_bytes"], blob.len() as u64);
    assert_eq!(v["blob_hits"], 1);
    assert_eq!(v["blob_misses"], 1);
    assert_eq!(v["hit_ratio"], 0.5);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_and_the_next_pull_refetches() {
    let (blob, digest) = blob_and_digest(100 * KIB, 2);
    let manifest = bytes::Bytes::from_static(b"{\"schemaVersion\":2,\"layers\":[]}");
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .manifest(REPO, Some("1"), OCI_MANIFEST, manifest.clone())
        .start()
        .await;
    let manifest_digest = sha256_digest(&manifest);
    let data = DataDir::new();
    let s = start(&upstream, &data, None).await;
    s.api.get_blob(REPO, &digest).await.unwrap();
    s.api.get_manifest(REPO, &manifest_digest).await;
    assert!(data.blob_path(&digest).exists());

    let r = s
        .admin(Method::DELETE, &format!("/admin/blobs/{digest}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    assert!(!data.blob_path(&digest).exists());
    let r = s
        .admin(
            Method::DELETE,
            &format!("/admin/manifests/{manifest_digest}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!data.manifest_path(&manifest_digest).exists());

    assert_same_bytes(
        &s.api.get_blob(REPO, &digest).await.unwrap(),
        &blob,
        "refetched",
    );
    assert_eq!(upstream.blob_gets(&digest), 2);
    let again = s.api.get_manifest(REPO, &manifest_digest).await;
    assert_eq!(again.bytes(), &manifest);
    assert_eq!(
        upstream.count(Method::GET, Kind::Manifest, &manifest_digest),
        2
    );

    let bad = s
        .admin(Method::DELETE, "/admin/blobs/sha256:../../etc")
        .await;
    bad.assert_oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_survive_eviction_and_restarts() {
    let (blobs, d) = blobs_and_digests(5, MIB, 10);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let data = DataDir::new();
    let s = start(&upstream, &data, Some(3 * MIB as u64)).await;
    s.api.get_blob(REPO, &d[0]).await.unwrap();
    let r = s.admin(Method::PUT, &format!("/admin/pins/{}", d[0])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    for digest in &d[1..] {
        s.api.get_blob(REPO, digest).await.unwrap();
    }
    eventually("eviction", patience(), || !data.blob_path(&d[1]).exists()).await;
    assert!(data.blob_path(&d[0]).exists(), "a pinned blob was evicted");
    s.stop().await;

    let s = start(&upstream, &data, Some(3 * MIB as u64)).await;
    let pins = s.admin(Method::GET, "/admin/pins").await.json();
    assert_eq!(pins["pins"][0], d[0].as_str(), "pins survive a restart");
    let r = s
        .admin(Method::DELETE, &format!("/admin/pins/{}", d[0]))
        .await;
    assert_eq!(r.json()["changed"], true);

    // The CLI talks to the same API.
    let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["admin", "--url", &s.admin_url, "--token-file"])
        .arg(&s.token_file)
        .arg("stats")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pins"], 0);
    s.stop().await;

    // On a stopped cache, the CLI works on the directory itself.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cistern"))
            .arg("admin")
            .arg("--data-dir")
            .arg(data.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = cli(&["pin", &d[4]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["pins"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&d[4]));
    let out = cli(&["purge-blob", &d[3]]);
    assert!(out.status.success());
    assert!(!data.blob_path(&d[3]).exists());
    let out = cli(&["stats"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pins"], 1);
}
