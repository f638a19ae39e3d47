//! The admin API (token, stats, purge, pins) and the `cistern admin` CLI, against a running
//! server and on a stopped cache directory.

mod support;

use std::process::{Command, Stdio};

use bytesize::ByteSize;
use http::{Method, StatusCode};
use support::*;

const REPO: &str = "library/app";

/// A cistern with its admin API, in front of `upstream`, on `data`, with `max_size` as its
/// budget. Started again on the same `data`, it is a restart.
async fn start(upstream: &FakeRegistry, data: &DataDir, max_size: Option<u64>) -> TestCistern {
    TestCistern::builder()
        .front(upstream)
        .data(data.clone())
        .admin()
        .config(move |c| c.cache.max_size = max_size.map(ByteSize::b))
        .start()
        .await
}

/// `cistern admin --data-dir <data> <args>`: the CLI on a stopped cache's directory.
fn offline_admin(data: &DataDir, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cistern"))
        .arg("admin")
        .arg("--data-dir")
        .arg(data.path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `cistern admin --url <s's admin API> --token-file <its token> <args>`: the CLI through the
/// API of a running cistern.
fn online_admin(s: &TestCistern, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["admin", "--url", &s.admin_url(), "--token-file"])
        .arg(s.admin_token_file())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The JSON a CLI run printed, which must have succeeded.
fn cli_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What these tests do to a cistern beyond what `TestCistern` does.
trait AdminTest {
    async fn pull(&self, repo: &str, reference: &str, blobs: &[&bytes::Bytes]);
    async fn pull_blob(&self, blob: &bytes::Bytes);
    async fn metrics(&self) -> std::collections::HashMap<String, f64>;
    async fn metrics_when(
        &self,
        what: &str,
        ready: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
    ) -> std::collections::HashMap<String, f64>;
}

impl AdminTest for TestCistern {
    /// Pulls an image as a client does: the manifest by tag (or digest), then each blob.
    async fn pull(&self, repo: &str, reference: &str, blobs: &[&bytes::Bytes]) {
        let m = self.client().get_manifest(repo, reference).await;
        assert_eq!(
            m.status,
            StatusCode::OK,
            "{repo}:{reference}: {}",
            m.body_text()
        );
        for b in blobs {
            let got = self.get_blob_committed(repo, &sha256_digest(b)).await;
            assert_same_bytes(&got, b, "a layer");
        }
    }

    /// GETs a blob without waiting for its commit (for blobs that are there to be evicted).
    async fn pull_blob(&self, blob: &bytes::Bytes) {
        let got = self
            .client()
            .get_blob(REPO, &sha256_digest(blob))
            .await
            .unwrap();
        assert_same_bytes(&got, blob, "a blob");
    }

    async fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let r = self.admin(Method::GET, "/metrics").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        scrape_lines(&r.body_text())
    }

    /// Scrapes until `ready` holds (bounded): counters and the index move a moment after
    /// what the test waited for.
    async fn metrics_when(
        &self,
        what: &str,
        ready: impl Fn(&std::collections::HashMap<String, f64>) -> bool,
    ) -> std::collections::HashMap<String, f64> {
        retry_until(what, || async {
            let m = self.metrics().await;
            ready(&m).then_some(m)
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_its_token_and_reports_stats() {
    let (blob, digest) = blob_and_digest(200 * KIB, 1);
    let upstream = FakeRegistry::with_blob(REPO, &blob).await;
    let data = DataDir::new();
    let s = start(&upstream, &data, None).await;
    s.client().get_blob(REPO, &digest).await.unwrap();
    // The second GET is a hit only once the first fill's commit is done.
    data.committed_blob(&digest).await;
    s.client().get_blob(REPO, &digest).await.unwrap();

    let anonymous = s.admin_client().get("/admin/stats").await;
    anonymous.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let wrong = s
        .admin_client()
        .send(
            s.admin_client()
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
    s.shutdown().await;
}

/// `GET /metrics`, parsed: every line is a comment or `name[{labels}] value`, and each sample
/// appears once.
fn scrape_lines(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample line: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in {line:?}"));
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_hits_upstream_failures_and_skips() {
    use ::cistern::config::UpstreamConfig;

    let (blobs, digests) = blobs_and_digests(2, 300 * KIB, 40);
    let origin = FakeRegistry::with_blobs(REPO, &blobs).await;
    let s = TestCistern::builder()
        .upstream(
            "mirror",
            UpstreamConfig {
                breaker_failures: 1,
                breaker_cooldown: std::time::Duration::from_secs(3600),
                ..at(&closed_port_url().await)
            },
        )
        .upstream("origin", at(&origin.url()))
        .route(default_route("docker.io", &["mirror", "origin"]))
        .admin()
        .start()
        .await;

    let anonymous = s.admin_client().get("/metrics").await;
    anonymous.assert_oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
    let m = s.metrics().await;
    assert_eq!(m["cistern_cache_blobs"], 0.0);
    assert_eq!(
        m[r#"cistern_upstream_requests_total{upstream="origin"}"#],
        0.0
    );
    assert!(
        !m.contains_key("cistern_cache_max_size_bytes"),
        "no budget, no sample"
    );

    // A miss: the mirror refuses the connection (its circuit opens), the origin serves.
    assert_same_bytes(
        &s.get_blob_committed(REPO, &digests[0]).await,
        &blobs[0],
        "first pull",
    );
    // A hit.
    assert_same_bytes(
        &s.get_blob_committed(REPO, &digests[0]).await,
        &blobs[0],
        "second pull",
    );
    // A miss that skips the mirror.
    assert_same_bytes(
        &s.get_blob_committed(REPO, &digests[1]).await,
        &blobs[1],
        "other blob",
    );

    // A blob's file is visible a moment before the fill updates the index and leaves the
    // fill map: wait for both.
    let m = s
        .metrics_when("the second commit in the index", |m| {
            m["cistern_cache_blobs"] == 2.0 && m["cistern_fills_running"] == 0.0
        })
        .await;
    let size = blobs[0].len() as f64;
    let upstream =
        |metric: &str, name: &str| format!("cistern_upstream_{metric}{{upstream=\"{name}\"}}");
    let want = [
        (
            r#"cistern_blob_requests_total{result="hit"}"#.to_string(),
            1.0,
        ),
        (
            r#"cistern_blob_requests_total{result="miss"}"#.to_string(),
            2.0,
        ),
        ("cistern_cache_blobs".into(), 2.0),
        ("cistern_cache_blob_bytes".into(), 2.0 * size),
        ("cistern_fills_running".into(), 0.0),
        ("cistern_evicted_blobs_total".into(), 0.0),
        (upstream("requests_total", "mirror"), 1.0),
        (upstream("failures_total", "mirror"), 1.0),
        (upstream("skipped_total", "mirror"), 1.0),
        (upstream("circuit_open", "mirror"), 1.0),
        (upstream("blob_bytes_total", "mirror"), 0.0),
        (upstream("requests_total", "origin"), 2.0),
        (upstream("failures_total", "origin"), 0.0),
        (upstream("skipped_total", "origin"), 0.0),
        (upstream("circuit_open", "origin"), 0.0),
        (upstream("blob_bytes_total", "origin"), 2.0 * size),
    ];
    for (series, value) in want {
        assert_eq!(m.get(&series), Some(&value), "{series}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_evictions_and_show_the_budget() {
    let (blobs, digests) = blobs_and_digests(3, 100 * KIB, 50);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let data = DataDir::new();
    let max = 250 * KIB as u64;
    let s = start(&upstream, &data, Some(max)).await;
    for d in &digests {
        s.get_blob_committed(REPO, d).await;
    }
    let evicted = s
        .metrics_when("an eviction", |m| m["cistern_evicted_blobs_total"] > 0.0)
        .await;
    assert_eq!(evicted["cistern_cache_max_size_bytes"], max as f64);
    assert_eq!(
        evicted["cistern_evicted_bytes_total"],
        evicted["cistern_evicted_blobs_total"] * (100 * KIB) as f64
    );
    assert!(evicted["cistern_cache_blob_bytes"] <= max as f64);
    s.shutdown().await;
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
    s.get_blob_committed(REPO, &digest).await;
    s.client().get_manifest(REPO, &manifest_digest).await;
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
        &s.client().get_blob(REPO, &digest).await.unwrap(),
        &blob,
        "refetched",
    );
    assert_eq!(upstream.blob_gets(&digest), 2);
    let again = s.client().get_manifest(REPO, &manifest_digest).await;
    assert_eq!(again.bytes(), &manifest);
    assert_eq!(
        upstream.count(Method::GET, Kind::Manifest, &manifest_digest),
        2
    );

    let bad = s
        .admin(Method::DELETE, "/admin/blobs/sha256:../../etc")
        .await;
    bad.assert_oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_purged_while_it_is_being_fetched_is_not_committed_after() {
    let (blob, digest) = blob_and_digest(4 * MIB, 3);
    let gate = Gate::new();
    // Only the first GET is held: the refetch after the purge goes straight through.
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::GateAt(MIB as u64, gate.clone()).once())
            .await;
    let data = DataDir::new();
    let s = start(&upstream, &data, None).await;
    let client = s.client().clone();
    let d = digest.clone();
    let pulling = tokio::spawn(async move { client.get_blob(REPO, &d).await });
    gate.wait_reached(1).await;

    let r = s
        .admin(Method::DELETE, &format!("/admin/blobs/{digest}"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    gate.open();
    // The client that started the fill still gets the whole, verified blob.
    let got = bounded("the held GET", pulling).await.unwrap().unwrap();
    assert_same_bytes(&got, &blob, "the blob served during the purge");
    let stats = retry_until("the fill to end", || async {
        let stats = s.admin(Method::GET, "/admin/stats").await.json();
        (stats["fills_running"] == 0).then_some(stats)
    })
    .await;
    assert_eq!(data.tmp_files(), Vec::<std::path::PathBuf>::new());
    assert!(
        !data.blob_path(&digest).exists(),
        "the purged blob was committed by the fill that was running"
    );
    assert_eq!(stats["blobs"], 0, "{stats}");

    // The next pull fetches it again, and this time it is cached.
    s.get_blob_committed(REPO, &digest).await;
    assert_eq!(upstream.blob_gets(&digest), 2);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_survive_eviction_and_restarts() {
    let (blobs, d) = blobs_and_digests(5, MIB, 10);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let data = DataDir::new();
    let s = start(&upstream, &data, Some(3 * MIB as u64)).await;
    s.get_blob_committed(REPO, &d[0]).await;
    let r = s.admin(Method::PUT, &format!("/admin/pins/{}", d[0])).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    for digest in &d[1..] {
        s.get_blob_committed(REPO, digest).await;
    }
    eventually("eviction", patience(), || !data.blob_path(&d[1]).exists()).await;
    assert!(data.blob_path(&d[0]).exists(), "a pinned blob was evicted");
    s.shutdown().await;

    let s = start(&upstream, &data, Some(3 * MIB as u64)).await;
    let pins = s.admin(Method::GET, "/admin/pins").await.json();
    assert_eq!(pins["pins"][0], d[0].as_str(), "pins survive a restart");
    let r = s
        .admin(Method::DELETE, &format!("/admin/pins/{}", d[0]))
        .await;
    assert_eq!(r.json()["changed"], true);

    // The CLI talks to the same API.
    let v = cli_json(&online_admin(&s, &["stats"]));
    assert_eq!(v["pins"], 0);
    s.shutdown().await;

    // On a stopped cache, the CLI works on the directory itself.
    let cli = |args: &[&str]| offline_admin(&data, args);
    cli_json(&cli(&["pin", &d[4]]));
    let out = cli(&["pins"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&d[4]));
    let out = cli(&["purge-blob", &d[3]]);
    assert!(out.status.success());
    assert!(!data.blob_path(&d[3]).exists());
    let v = cli_json(&cli(&["stats"]));
    assert_eq!(v["pins"], 1);
}

const OTHER: &str = "library/other";

/// Upstream requests for a repository's tag.
fn tag_requests(upstream: &FakeRegistry, repo: &str, tag: &str) -> usize {
    upstream
        .requests_for(Kind::Manifest, tag)
        .iter()
        .filter(|s| s.repo == repo)
        .count()
}

/// Two images that share a base layer: `app` (`REPO:1`: config `cfg_a`, layers `base`, `a1`)
/// and `other` (in `other_repo`, tagged `other_tag` or only by digest: `cfg_b`, `base`, `b1`).
struct SharedBase {
    upstream: FakeRegistry,
    base: bytes::Bytes,
    cfg_a: bytes::Bytes,
    a1: bytes::Bytes,
    cfg_b: bytes::Bytes,
    b1: bytes::Bytes,
    app: bytes::Bytes,
    other: bytes::Bytes,
}

async fn two_images_sharing_a_layer(
    other_repo: &str,
    other_tag: Option<&str>,
    seed: u64,
) -> SharedBase {
    let base = blob_bytes(64 * KIB, seed);
    let (cfg_a, a1) = (blob_bytes(KIB, seed + 1), blob_bytes(32 * KIB, seed + 2));
    let (cfg_b, b1) = (blob_bytes(KIB, seed + 3), blob_bytes(16 * KIB, seed + 4));
    let app = oci_image_manifest(&cfg_a, &[&base, &a1]);
    let other = oci_image_manifest(&cfg_b, &[&base, &b1]);
    let upstream = FakeRegistry::builder()
        .blob(REPO, base.clone())
        .blob(REPO, cfg_a.clone())
        .blob(REPO, a1.clone())
        .blob(other_repo, base.clone())
        .blob(other_repo, cfg_b.clone())
        .blob(other_repo, b1.clone())
        .manifest(REPO, Some("1"), OCI_MANIFEST, app.clone())
        .manifest(other_repo, other_tag, OCI_MANIFEST, other.clone())
        .start()
        .await;
    SharedBase {
        upstream,
        base,
        cfg_a,
        a1,
        cfg_b,
        b1,
        app,
        other,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_tag_or_a_repository_keeps_what_others_use() {
    let SharedBase {
        upstream,
        base,
        cfg_a,
        a1,
        cfg_b,
        b1,
        app,
        other,
    } = two_images_sharing_a_layer(OTHER, Some("1"), 40).await;
    // The [upstream] shorthand's registry is the upstream's host and port.
    let registry = upstream.addr().to_string();
    let data = DataDir::new();
    let s = start(&upstream, &data, None).await;
    s.pull(REPO, "1", &[&cfg_a, &base, &a1]).await;
    s.pull(OTHER, "1", &[&cfg_b, &base, &b1]).await;
    let exists = |b: &[u8]| data.blob_path(&sha256_digest(b)).exists();

    // The tag goes, with what only it used; `base` stays for library/other.
    let r = s
        .admin(Method::DELETE, &format!("/admin/tags/{registry}/{REPO}:1"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    let v = r.json();
    assert_eq!(v["purged"], format!("{registry}/{REPO}:1"));
    assert_eq!(v["tags"], 1);
    assert_eq!(v["removed"]["manifests"], 1);
    assert_eq!(v["removed"]["blobs"], 2);
    assert_eq!(v["removed"]["blob_bytes"], (cfg_a.len() + a1.len()) as u64);
    assert_eq!(v["kept"]["blobs"], 1);
    assert_eq!(v["kept"]["blob_bytes"], base.len() as u64);
    assert!(!data.manifest_path(&sha256_digest(&app)).exists());
    assert!(!exists(&cfg_a) && !exists(&a1));
    assert!(exists(&base) && exists(&cfg_b) && exists(&b1));
    assert!(data.manifest_path(&sha256_digest(&other)).exists());
    let stats = s.admin(Method::GET, "/admin/stats").await.json();
    assert_eq!(
        stats["blob_bytes"],
        (base.len() + cfg_b.len() + b1.len()) as u64
    );

    // The tag's answer is gone from memory too: the next pull asks the upstream (tag_ttl is
    // five minutes, so a remembered answer would have been served).
    let before = tag_requests(&upstream, REPO, "1");
    s.pull(REPO, "1", &[&cfg_a, &base, &a1]).await;
    assert!(
        tag_requests(&upstream, REPO, "1") > before,
        "a purged tag was answered from memory"
    );

    // The whole of library/other; `base` is used by library/app again.
    let r = s
        .admin(
            Method::DELETE,
            &format!("/admin/repositories/{registry}/{OTHER}"),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body_text());
    let v = r.json();
    assert_eq!(v["removed"]["manifests"], 1);
    assert_eq!(v["removed"]["blobs"], 2);
    assert_eq!(v["kept"]["blobs"], 1);
    assert!(!exists(&cfg_b) && !exists(&b1) && exists(&base));
    assert!(!data.manifest_path(&sha256_digest(&other)).exists());

    // Nothing left to purge: 404, not a silent success.
    let again = s
        .admin(
            Method::DELETE,
            &format!("/admin/repositories/{registry}/{OTHER}"),
        )
        .await;
    again.assert_oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    let again = s
        .admin(Method::DELETE, &format!("/admin/tags/{registry}/{OTHER}:1"))
        .await;
    again.assert_oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");

    // Every component is checked: 400s with OCI error bodies, nothing removed.
    for (path, code) in [
        (
            format!("/admin/repositories/{registry}/Library/App"),
            "NAME_INVALID",
        ),
        (
            format!("/admin/repositories/{registry}/a%2f..%2fetc"),
            "NAME_INVALID",
        ),
        (
            "/admin/repositories/no-repository".to_string(),
            "NAME_INVALID",
        ),
        (
            format!("/admin/repositories/bad_host!/{REPO}"),
            "NAME_INVALID",
        ),
        (format!("/admin/tags/{registry}/{REPO}:-1"), "TAG_INVALID"),
        (format!("/admin/tags/{registry}/{REPO}"), "TAG_INVALID"),
    ] {
        let r = s.admin(Method::DELETE, &path).await;
        r.assert_oci_error(StatusCode::BAD_REQUEST, code);
    }
    let wrong_method = s
        .admin(
            Method::GET,
            &format!("/admin/repositories/{registry}/{REPO}"),
        )
        .await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(exists(&base) && exists(&cfg_a) && exists(&a1));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_pins_hold_a_repository_through_eviction_and_restarts() {
    // library/keep:1 is an index over one image: the pin must reach through it to the layers.
    let (cfg, k1, k2) = (
        blob_bytes(KIB, 50),
        blob_bytes(MIB, 51),
        blob_bytes(MIB, 52),
    );
    let image = oci_image_manifest(&cfg, &[&k1, &k2]);
    let index = oci_index(&[&image]);
    const KEEP: &str = "library/keep";
    let fillers: Vec<_> = (0..5).map(|i| blob_bytes(MIB, 60 + i)).collect();
    let mut builder = FakeRegistry::builder()
        .blob(KEEP, cfg.clone())
        .blob(KEEP, k1.clone())
        .blob(KEEP, k2.clone())
        .manifest(KEEP, None, OCI_MANIFEST, image.clone())
        .manifest(KEEP, Some("1"), OCI_INDEX, index.clone());
    for f in &fillers {
        builder = builder.blob(REPO, f.clone());
    }
    let upstream = builder.start().await;
    let registry = upstream.addr().to_string();
    let pattern = format!("{registry}/library/kee*");
    let data = DataDir::new();
    let budget = Some(3 * MIB as u64);
    let s = start(&upstream, &data, budget).await;

    // Bad patterns are refused.
    let r = s.admin(Method::PUT, "/admin/pins?pattern=alpine").await;
    r.assert_oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID");
    let r = s.admin(Method::PUT, "/admin/pins").await;
    r.assert_oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID");

    // The CLI pins through the API (the pattern is percent-encoded in the query).
    let v = cli_json(&online_admin(&s, &["pin", &pattern]));
    assert_eq!(
        (v["pattern"].as_str(), v["changed"].as_bool()),
        (Some(pattern.as_str()), Some(true))
    );

    s.pull(KEEP, "1", &[]).await;
    s.pull(KEEP, &sha256_digest(&image), &[&cfg, &k1, &k2])
        .await;
    for f in &fillers[..3] {
        s.pull_blob(f).await;
    }
    let exists = |b: &[u8]| data.blob_path(&sha256_digest(b)).exists();
    eventually("eviction", patience(), || !exists(&fillers[0])).await;
    assert!(
        exists(&k1) && exists(&k2) && exists(&cfg),
        "a blob of a pinned repository was evicted"
    );
    s.shutdown().await;

    // After a restart the pin (pins.json) and the references (rebuilt from disk) still hold.
    let s = start(&upstream, &data, budget).await;
    let pins = s.admin(Method::GET, "/admin/pins").await.json();
    assert_eq!(pins["pins"], serde_json::json!([pattern]));
    for f in &fillers[3..] {
        s.pull_blob(f).await;
    }
    eventually("eviction after the restart", patience(), || {
        !exists(&fillers[3])
    })
    .await;
    assert!(exists(&k1) && exists(&k2) && exists(&cfg));

    // Unpinned, they are ordinary blobs again: the oldest, so the next pass takes them.
    let query: String = form_urlencoded_pattern(&pattern);
    let r = s
        .admin(Method::DELETE, &format!("/admin/pins?{query}"))
        .await;
    assert_eq!(r.json()["changed"], true, "{}", r.body_text());
    s.pull_blob(&fillers[0]).await;
    eventually("the unpinned layers evicted", patience(), || {
        !exists(&k1) || !exists(&k2)
    })
    .await;
    s.shutdown().await;
}

fn form_urlencoded_pattern(pattern: &str) -> String {
    reqwest::Url::parse_with_params("http://x/", &[("pattern", pattern)])
        .unwrap()
        .query()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_purges_a_stopped_cache_and_pulls_by_digest_belong_to_their_repository() {
    const PINNED: &str = "library/deploy";
    // library/deploy is pulled by digest only (a deployment pinned to a digest).
    let SharedBase {
        upstream,
        base,
        cfg_a,
        a1,
        cfg_b: cfg_d,
        b1: d1,
        other: deploy,
        ..
    } = two_images_sharing_a_layer(PINNED, None, 70).await;
    let registry = upstream.addr().to_string();
    let data = DataDir::new();
    let s = start(&upstream, &data, None).await;
    s.pull(REPO, "1", &[&cfg_a, &base, &a1]).await;
    s.pull(PINNED, &sha256_digest(&deploy), &[&cfg_d, &base, &d1])
        .await;
    s.shutdown().await;

    let cli = |args: &[&str]| offline_admin(&data, args);
    let exists = |b: &[u8]| data.blob_path(&sha256_digest(b)).exists();

    // The repository owns the manifest it served by digest (a link recorded on disk, read
    // back by this separate process).
    let v = cli_json(&cli(&["purge-repo", &format!("{registry}/{PINNED}")]));
    assert_eq!(v["links"], 1, "{v}");
    assert_eq!(v["removed"]["manifests"], 1);
    assert_eq!(v["removed"]["blobs"], 2);
    assert_eq!(v["removed"]["blob_bytes"], (cfg_d.len() + d1.len()) as u64);
    assert_eq!(v["kept"]["blobs"], 1);
    assert!(!exists(&cfg_d) && !exists(&d1) && exists(&base));
    assert!(!data.manifest_path(&sha256_digest(&deploy)).exists());

    // A digest pin keeps a blob a purge would otherwise remove.
    cli_json(&cli(&["pin", &sha256_digest(&a1)]));
    let v = cli_json(&cli(&["purge-tag", &format!("{registry}/{REPO}:1")]));
    assert_eq!(v["tags"], 1);
    assert_eq!(v["removed"]["blobs"], 2, "{v}");
    assert_eq!(v["kept"]["blobs"], 1);
    assert!(!exists(&cfg_a) && !exists(&base) && exists(&a1));

    let out = cli(&["purge-tag", &format!("{registry}/{REPO}:1")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing"));
    for bad in ["no-repository", "docker.io/X", "docker.io/a/../b"] {
        let out = cli(&["purge-repo", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
    }
    let v = cli_json(&cli(&["pins"]));
    assert_eq!(v["pins"], serde_json::json!([sha256_digest(&a1)]));
}
