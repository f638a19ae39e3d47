//! End-to-end tests: real clients (skopeo, containerd's `ctr`) pull through a real cistern from
//! a real upstream registry (Debian's `docker-registry`, CNCF distribution 2.8.2), all on
//! 127.0.0.1, every process a child of the test (stopped by PID through Drop guards, also when
//! a test panics), every file in a temp dir.
//!
//! # Running
//!
//! ```text
//! scripts/install-test-deps               # as root: skopeo, containerd + runc, docker-registry
//! cargo test --test e2e_real_clients      # as root: the containerd test needs it
//! ```
//!
//! Without the tools (or, for containerd, without root) a test prints `SKIPPED: <tool> not
//! installed` to stderr and passes; with `CISTERN_REQUIRE_E2E=1` (CI) it fails instead.
//! `CISTERN_E2E_KEEP=1` keeps the temp dirs (registry, cistern and containerd logs and configs,
//! caches, pulled images) and prints where they are. The tests run in parallel, each with its
//! own registry, cistern(s) and containerd(s), so their logs and counts never mix. About a
//! minute on 2 cores once built (30 s without the 200 MiB layer, which a debug build of
//! cistern hashes at about 25 MB/s on every fill).
//!
//! # Setup (every test)
//!
//! - Images are built in Rust (tests/e2e/image.rs, tests/e2e/fixtures.rs): deterministic gzip
//!   tar layers, config JSON, OCI manifests and indexes, written as one OCI layout directory and
//!   pushed with `skopeo copy --all --dest-tls-verify=false oci:DIR:TAG docker://127.0.0.1:P/..`
//!   (`--preserve-digests` for OCI, `--format v2s2` for the Docker ones):
//!   - `library/app:1.0`: OCI manifest, 3 layers, one ~3 MiB of incompressible bytes;
//!   - `library/multi:1.0`: OCI image index, linux/amd64 + linux/arm64;
//!   - `library/dockerv2:1.0`: Docker v2 schema 2 manifest;
//!   - `library/mlist:1.0`: Docker manifest list of two v2s2 manifests (amd64 + arm64);
//!   - `e2e/team/app:1.0`: the app image under a three-component name;
//!   - `library/large:1.0` (`fixtures::seed_large`, in the tests that pull it): OCI manifest
//!     with an uncompressed (`application/vnd.oci.image.layer.v1.tar`) layer of 200 MiB and a
//!     bit of pseudo-random bytes, plus a small gzip layer. The layer is generated once per
//!     machine (streamed to a file under `CARGO_TARGET_TMPDIR`, about 10 s in a debug build,
//!     nearly all of it sha256) and reused by every test and test binary after that; the
//!     tests compare copies of it byte for byte with that file instead of hashing them again.
//!
//!   Seeding reads every manifest back from the registry (plain HTTP) and checks it against
//!   what was built and against skopeo's `--digestfile`, so a later mismatch is cistern's.
//! - `library/` because that is what containerd asks a mirror for when it pulls
//!   `docker.io/library/REPO:TAG` (adding `?ns=docker.io`, which cistern ignores).
//! - Each test first pulls **directly** from the registry with the same client (the control):
//!   it proves the harness, the images and the client setup, so a failure after that is
//!   cistern's.
//! - Upstream blob traffic is counted in the registry's access log, one line per request
//!   written after the response: `"GET /v2/<name>/blobs/sha256:<hex>[?ns=..] HTTP/1.1" 200 ..`
//!   (read after the log has been quiet for 0.5 s).
//!
//! # What each check proves
//!
//! `skopeo_pulls_through_cistern`:
//! - `skopeo inspect --raw` by tag and by digest (index/list children too) returns exactly the
//!   registry's bytes: manifests pass byte-for-byte (OCI manifest and index, Docker v2s2 and
//!   manifest list), and multi-component names route.
//! - `skopeo list-tags` works (`/tags/list`); a missing tag fails with `manifest unknown`
//!   (the client understood cistern's error).
//! - Manifests, first and second pull include `library/large:1.0` (the restart and offline
//!   pulls, which are about the cache's persistence, leave it out).
//! - `skopeo copy --all docker://CISTERN/.. dir:` succeeds for every image; `manifest.json`
//!   hashes to the expected digest, children and blobs are present and hash to their names.
//! - First pull: every blob was fetched from the upstream (count > 0, and every digest seen:
//!   the cache started empty). Then each blob sits in `data_dir/blobs/sha256/<2 hex>/<hex>`
//!   with the right content.
//! - Second pull into fresh `dir:` targets, plus `skopeo inspect` (reads the config blob):
//!   **no** upstream blob GET.
//! - SIGTERM: cistern exits by itself with status 0; a new cistern on the same data_dir serves
//!   a third full pull with no upstream blob GET (the cache persists across restarts).
//! - With the upstream registry stopped, every image still pulls through cistern, by tag (tags
//!   resolved moments ago, within `tag_ttl`) and by digest: the cache alone serves them.
//!
//! `skopeo_corrupt_upstream_moved_tag_and_concurrent_pulls`:
//! - One byte of the 3 MiB layer flipped in the registry's storage (served with the right
//!   length and digest header). Control: a direct pull fails with skopeo's own "Digest did
//!   not match". Through cistern the pull fails *without* that message (cistern ended the
//!   response as an error before its last byte instead of passing a complete corrupt body),
//!   the blob is not in the cache, `tmp/` is left empty, and once the registry is repaired the
//!   next pull refetches and succeeds (no poisoned cache, no remembered failure).
//! - A tag moved upstream (re-pushed to another image) with `tag_ttl = "1s"`: cistern serves
//!   the new manifest within a bounded poll, never anything but the old or new bytes, and the
//!   old manifest stays reachable by digest.
//! - Three concurrent `skopeo copy` processes of the same uncached images through a fresh
//!   cistern: all succeed with correct data, and each blob is fetched upstream exactly once.
//!
//! `containerd_pulls_through_cistern`:
//! - A private containerd (own root/state/sockets, CRI disabled, default overlayfs
//!   snapshotter, which works here as root) with `--hosts-dir`: `docker.io/hosts.toml` has
//!   `server` = a dead loopback port and one `[host."http://127.0.0.1:CISTERN"]` with
//!   `capabilities = ["pull", "resolve"]`. It pulls and unpacks `docker.io/library/{app,
//!   dockerv2,large}:1.0` and `docker.io/library/{multi,mlist}:1.0` with `--all-platforms` (which
//!   fetches and unpacks both platforms); `ctr images check` reports each complete and unpacked
//!   (unpacking verifies every layer's diff_id) with the expected top-level digest and media
//!   type: cistern's answers to containerd's HEAD-by-tag, GET-by-digest, Accept headers and
//!   `?ns=docker.io` satisfy containerd.
//! - First pull: every blob came from the upstream through cistern.
//! - Second pull by a *fresh* containerd (new root; its content store is checked empty first,
//!   and holds every blob afterwards, so it really downloaded them from cistern): no upstream
//!   blob GET. A new namespace in the same containerd would not do: containerd's content store
//!   is shared between namespaces ("shared" content policy), and a pull into a new namespace
//!   was seen to make only a manifest HEAD, no blob GET at all.

mod e2e;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use e2e::cistern::Cistern;
use e2e::containerd::{self, Containerd};
use e2e::daemon;
use e2e::fixtures::{self, Fixtures, Seeded};
use e2e::image::sha256_digest;
use e2e::registry::{LOG_QUIET, Registry, blob_get_counts};
use e2e::skopeo::Skopeo;

/// Logs of every process involved, for failure messages.
fn logs(registry: &Registry, cistern: Option<&Cistern>) -> String {
    e2e::logs(&[registry], cistern)
}

/// Checks that cistern has `digest` on disk at `data_dir/blobs/sha256/<2 hex>/<hex>` with the
/// right content. The commit (a rename) may trail the response's last byte: wait for the file,
/// bounded.
fn cached_blob(cistern: &Cistern, digest: &str, ctx: &dyn Fn() -> String) {
    let path = cistern.blob_path(digest);
    let deadline = std::time::Instant::now() + daemon::WAIT;
    while !path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A missing file fails as "cannot read", a corrupt one with its digest or first difference.
    if let Err(e) = fixtures::check_blob_file(&path, digest) {
        panic!(
            "blob {digest} not cached (whole) at its path: {e}\n{}",
            ctx()
        );
    }
}

/// Checks a `skopeo copy --all ... dir:DIR` result: `manifest.json` is the expected top-level
/// manifest, index children are stored as `<hex>.manifest.json`, and every blob is present
/// and hashes to its name.
fn check_dir(dir: &Path, seeded: &Seeded) {
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    assert_eq!(
        sha256_digest(&manifest),
        seeded.digest,
        "{}: manifest.json in {} does not hash to the pushed digest",
        seeded.repo,
        dir.display()
    );
    assert!(
        manifest == seeded.manifest,
        "{}: manifest bytes differ",
        seeded.repo
    );
    for (arch, child) in &seeded.children {
        let hex = child.strip_prefix("sha256:").unwrap();
        let bytes = std::fs::read(dir.join(format!("{hex}.manifest.json")))
            .unwrap_or_else(|e| panic!("{}: {arch} child {child} not copied: {e}", seeded.repo));
        assert_eq!(
            &sha256_digest(&bytes),
            child,
            "{}: {arch} child",
            seeded.repo
        );
    }
    for blob in &seeded.blobs {
        let hex = blob.strip_prefix("sha256:").unwrap();
        if let Err(e) = fixtures::check_blob_file(&dir.join(hex), blob) {
            panic!("{}: blob {blob} not copied whole: {e}", seeded.repo);
        }
    }
}

/// Copies every image with `skopeo copy --all` into `<into>/<n>` and checks the results.
fn copy_all(
    skopeo: &Skopeo,
    host: &str,
    images: &[&Seeded],
    into: &Path,
    ctx: &dyn Fn() -> String,
) {
    for (n, seeded) in images.iter().enumerate() {
        let dest = into.join(n.to_string());
        skopeo.copy_to_dir(&seeded.reference(host), &dest, ctx);
        check_dir(&dest, seeded);
    }
}

#[test]
fn skopeo_pulls_through_cistern() {
    let Some(work) = e2e::begin(
        "skopeo_pulls_through_cistern",
        e2e::SKOPEO_TOOLS,
        false,
        "skopeo",
    ) else {
        return;
    };
    let (registry, skopeo, fx) = e2e::seeded_registry(&work);
    let large = e2e::seed_large(&work, &registry, &skopeo);
    let images = fx.all();
    // The first and second pulls include the 200 MiB layer; the later ones (restart, offline)
    // are about the cache's persistence and need not move it again.
    let with_large: Vec<&Seeded> = images.iter().copied().chain([&large]).collect();
    let rctx = || logs(&registry, None);

    // Control: the same client straight from the registry.
    for seeded in [&fx.app, &fx.multi] {
        let raw = skopeo.inspect_raw(&seeded.reference(&registry.host()), &rctx);
        assert!(
            raw == seeded.manifest,
            "direct inspect --raw of {}",
            seeded.repo
        );
    }
    let before = registry.blob_gets().len();
    copy_all(
        &skopeo,
        &registry.host(),
        &[&fx.app, &fx.multi],
        &work.sub("direct"),
        &rctx,
    );
    registry.settle(LOG_QUIET);
    assert!(
        registry.blob_gets().len() > before,
        "a direct pull must show blob GETs in the registry log (log format changed?)\n{}",
        rctx()
    );

    // Through cistern.
    let cistern = Cistern::start(&work.sub("cistern"), registry.addr);
    let host = cistern.host();
    let ctx = || logs(&registry, Some(&cistern));

    // Manifests byte-for-byte, by tag and by digest.
    for &seeded in &with_large {
        let raw = skopeo.inspect_raw(&seeded.reference(&host), &ctx);
        assert!(
            raw == seeded.manifest,
            "skopeo inspect --raw {} via cistern: got {} bytes (sha256 {}), want the registry's {} bytes ({})\n{}",
            seeded.reference(&host),
            raw.len(),
            sha256_digest(&raw),
            seeded.manifest.len(),
            seeded.digest,
            ctx()
        );
        let by_digest =
            skopeo.inspect_raw(&format!("{host}/{}@{}", seeded.repo, seeded.digest), &ctx);
        assert!(
            by_digest == seeded.manifest,
            "inspect --raw by digest of {}",
            seeded.repo
        );
        for (arch, child) in &seeded.children {
            let raw = skopeo.inspect_raw(&format!("{host}/{}@{child}", seeded.repo), &ctx);
            assert_eq!(
                &sha256_digest(&raw),
                child,
                "{} {arch} child via cistern",
                seeded.repo
            );
        }
    }
    let tags = skopeo.list_tags(&format!("{host}/library/app"), &ctx);
    assert_eq!(
        tags,
        vec!["1.0".to_string()],
        "skopeo list-tags via cistern"
    );

    // First pull: everything comes from the upstream.
    registry.settle(LOG_QUIET);
    let baseline = registry.blob_gets().len();
    copy_all(&skopeo, &host, &with_large, &work.sub("pull-1"), &ctx);
    let want = fixtures::all_blobs(&with_large);
    registry.check_first_pull(baseline, &want, "skopeo", &ctx);

    // The cache on disk, where the contract puts it.
    for blob in &want {
        cached_blob(&cistern, blob, &ctx);
    }

    // Second pull with fresh client state: no upstream blob GET.
    let after_first = registry.blob_gets().len();
    copy_all(&skopeo, &host, &with_large, &work.sub("pull-2"), &ctx);
    let inspected = skopeo.inspect(&fx.app.reference(&host), &ctx);
    assert_eq!(
        inspected["Digest"],
        fx.app.digest.as_str(),
        "skopeo inspect Digest"
    );
    assert_eq!(inspected["Architecture"], "amd64");
    assert_eq!(inspected["Labels"]["org.example.cistern.e2e"], "app");
    registry.assert_no_blob_gets_since(after_first, "the second pull", &ctx);

    // A tag the upstream lacks: the client gets the registry error it understands.
    let missing = skopeo.try_inspect_raw(&format!("{host}/library/app:no-such-tag"));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("manifest unknown"),
        "skopeo inspect of a missing tag via cistern: {}\n{stderr}\n{}",
        missing.status,
        ctx()
    );

    // The cache survives a restart: SIGTERM (cistern must exit by itself, successfully), a new
    // process on the same data_dir, and a third pull with fresh client state from the disk
    // cache only.
    let cistern = cistern.restart(registry.addr);
    let host = cistern.host();
    let ctx = || logs(&registry, Some(&cistern));
    registry.settle(LOG_QUIET);
    let before_third = registry.blob_gets().len();
    copy_all(&skopeo, &host, &images, &work.sub("pull-3"), &ctx);
    registry.assert_no_blob_gets_since(
        before_third,
        "after a restart on the same data_dir the pull",
        &ctx,
    );

    // Upstream gone: everything cached stays pullable, by tag (the tags were resolved by this
    // cistern moments ago, well within the default 5 min tag_ttl) and by digest.
    let mut registry = registry;
    if let Err(e) = registry.daemon.terminate() {
        panic!("{e}");
    }
    let ctx = || logs(&registry, Some(&cistern));
    copy_all(&skopeo, &host, &images, &work.sub("pull-offline"), &ctx);
    for seeded in images {
        let by_digest = format!("{host}/{}@{}", seeded.repo, seeded.digest);
        let dest = work.sub(&format!(
            "pull-offline-digest/{}",
            seeded.repo.replace('/', "_")
        ));
        skopeo.copy_to_dir(&by_digest, &dest, &ctx);
        check_dir(&dest, seeded);
    }
}

/// Pulls the four `library/` images and the large one into `ctd` through `hosts` and checks
/// them.
/// HTTPS on cistern's listener (`[tls]`), with a client that checks the certificate: skopeo
/// trusts only the test CA (no `--tls-verify=false`, no fallback to plain HTTP).
#[test]
fn skopeo_pulls_over_https() {
    let Some(work) = e2e::begin(
        "skopeo_pulls_over_https",
        e2e::SKOPEO_TOOLS,
        false,
        "skopeo-https",
    ) else {
        return;
    };
    let (registry, skopeo, fx) = e2e::seeded_registry(&work);
    let tls = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tls");
    let certs = work.sub("certs");
    std::fs::copy(tls.join("ca.crt"), certs.join("ca.crt")).unwrap();
    let cistern = Cistern::start_tls(
        &work.sub("cistern"),
        registry.addr,
        &tls.join("server.crt"),
        &tls.join("server.key"),
    );
    let host = cistern.host();
    let ctx = || logs(&registry, Some(&cistern));

    for seeded in [&fx.app, &fx.multi] {
        let raw = skopeo.inspect_raw_https(&seeded.reference(&host), &certs, &ctx);
        assert!(
            raw == seeded.manifest,
            "inspect --raw over HTTPS of {}",
            seeded.repo
        );
    }
    for (n, seeded) in [&fx.app, &fx.multi].into_iter().enumerate() {
        let dest = work.sub("first").join(n.to_string());
        skopeo.copy_to_dir_https(&seeded.reference(&host), &dest, &certs, &ctx);
        check_dir(&dest, seeded);
    }
    registry.settle(LOG_QUIET);
    let before = registry.blob_gets().len();
    for (n, seeded) in [&fx.app, &fx.multi].into_iter().enumerate() {
        let dest = work.sub("second").join(n.to_string());
        skopeo.copy_to_dir_https(&seeded.reference(&host), &dest, &certs, &ctx);
        check_dir(&dest, seeded);
    }
    registry.settle(LOG_QUIET);
    assert_eq!(
        registry.blob_gets().len(),
        before,
        "the second pull over HTTPS reached the upstream for blobs\n{}",
        ctx()
    );
}

fn ctr_pull_all(
    ctd: &Containerd,
    ns: &str,
    hosts: &Path,
    fx: &Fixtures,
    large: &Seeded,
    ctx: &dyn Fn() -> String,
) {
    for (seeded, extra) in [
        (&fx.app, &[][..]),
        (&fx.multi, &["--all-platforms"][..]),
        (&fx.dockerv2, &[][..]),
        (&fx.mlist, &["--all-platforms"][..]),
        (large, &[][..]),
    ] {
        let reference = format!("docker.io/{}:{}", seeded.repo, seeded.tag);
        ctd.pull(ns, hosts, extra, &reference, ctx);
        ctd.check_image(ns, &reference, seeded, ctx);
    }
}

#[test]
fn containerd_pulls_through_cistern() {
    let Some(work) = e2e::begin(
        "containerd_pulls_through_cistern",
        e2e::CONTAINERD_TOOLS,
        true,
        "containerd",
    ) else {
        return;
    };
    let (registry, skopeo, fx) = e2e::seeded_registry(&work);
    let large = e2e::seed_large(&work, &registry, &skopeo);
    let pulled = [&fx.app, &fx.multi, &fx.dockerv2, &fx.mlist, &large];
    let dead_port = daemon::free_port();
    const NS: &str = "e2e";

    // Control: containerd straight from the registry (same hosts.toml shape, own containerd).
    {
        let hosts = containerd::hosts_dir(
            &work.sub("hosts-direct"),
            "docker.io",
            &registry.host(),
            dead_port,
        );
        let ctd = Containerd::start(&work.path.join("containerd-direct"));
        let rctx = || format!("{}\n{}", logs(&registry, None), ctd.daemon.tail(30));
        let before = registry.blob_gets().len();
        ctr_pull_all(&ctd, NS, &hosts, &fx, &large, &rctx);
        registry.settle(LOG_QUIET);
        assert!(
            registry.blob_gets().len() > before,
            "direct containerd pull: no blob GET logged"
        );
    }

    let cistern = Cistern::start(&work.sub("cistern"), registry.addr);
    let hosts = containerd::hosts_dir(
        &work.sub("hosts-cistern"),
        "docker.io",
        &cistern.host(),
        dead_port,
    );
    let want = fixtures::all_blobs(&pulled);

    // First pull through cistern.
    registry.settle(LOG_QUIET);
    let baseline = registry.blob_gets().len();
    {
        let ctd = Containerd::start(&work.path.join("containerd-1"));
        let ctx = || {
            format!(
                "{}\n{}",
                logs(&registry, Some(&cistern)),
                ctd.daemon.tail(30)
            )
        };
        ctr_pull_all(&ctd, NS, &hosts, &fx, &large, &ctx);
    }
    let ctx = || logs(&registry, Some(&cistern));
    registry.check_first_pull(baseline, &want, "containerd", &ctx);

    // Second pull: a fresh containerd (new root, empty content store) downloads everything
    // again from cistern; the upstream sees no blob GET.
    let after_first = registry.blob_gets().len();
    {
        let ctd = Containerd::start(&work.path.join("containerd-2"));
        let ctx = || {
            format!(
                "{}\n{}",
                logs(&registry, Some(&cistern)),
                ctd.daemon.tail(30)
            )
        };
        assert_eq!(
            ctd.content(NS),
            Vec::<String>::new(),
            "fresh containerd has content"
        );
        ctr_pull_all(&ctd, NS, &hosts, &fx, &large, &ctx);
        let content: BTreeSet<String> = ctd.content(NS).into_iter().collect();
        let not_downloaded: Vec<_> = want.difference(&content).collect();
        assert!(
            not_downloaded.is_empty(),
            "second containerd lacks {not_downloaded:?}"
        );
    }
    registry.assert_no_blob_gets_since(after_first, "the second containerd pull", &ctx);
}

#[test]
fn skopeo_corrupt_upstream_moved_tag_and_concurrent_pulls() {
    let Some(work) = e2e::begin(
        "skopeo_corrupt_upstream_moved_tag_and_concurrent_pulls",
        e2e::SKOPEO_TOOLS,
        false,
        "skopeo-edge",
    ) else {
        return;
    };
    let (registry, skopeo, fx) = e2e::seeded_registry(&work);
    let rctx = || logs(&registry, None);

    // --- A corrupt upstream blob (the ~3 MiB layer, one byte flipped in the registry's
    // storage; the registry serves it as is, with the right length and digest header).
    let big = &fx.big_layer;
    let data_path = registry.blob_data_path(big);
    let good = std::fs::read(&data_path).unwrap();
    assert_eq!(
        &sha256_digest(&good),
        big,
        "registry storage layout changed?"
    );
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0xff;
    std::fs::write(&data_path, &bad).unwrap();

    // Control: straight from the registry, skopeo detects the corruption itself after reading
    // the whole blob.
    let direct =
        skopeo.try_copy_to_dir(&fx.app.reference(&registry.host()), &work.sub("direct-bad"));
    let direct_err = String::from_utf8_lossy(&direct.stderr).into_owned();
    assert!(
        !direct.status.success() && direct_err.contains("Digest did not match"),
        "direct pull of the corrupted blob: {}\n{direct_err}\n{}",
        direct.status,
        rctx()
    );

    // Through cistern (tags revalidated after 1 s for the moved-tag check below).
    let cistern = Cistern::start_with(&work.sub("cistern"), registry.addr, "tag_ttl = \"1s\"", 1);
    let host = cistern.host();
    let ctx = || logs(&registry, Some(&cistern));
    registry.settle(LOG_QUIET);
    let baseline = registry.blob_gets().len();
    let out = skopeo.try_copy_to_dir(&fx.app.reference(&host), &work.sub("pull-bad"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a pull of a corrupted blob via cistern succeeded\n{}",
        ctx()
    );
    registry.settle(LOG_QUIET);
    let fetched = blob_get_counts(&registry.blob_gets()[baseline..]);
    assert!(
        fetched.get(big).copied().unwrap_or(0) >= 1,
        "cistern never fetched the corrupted blob: {fetched:?}\n{err}\n{}",
        ctx()
    );
    // Cistern must end such a response as an error before its last byte: had it sent the
    // whole corrupted body cleanly, skopeo would report the digest mismatch (as above) instead
    // of a broken read.
    assert!(
        !err.contains("Digest did not match"),
        "cistern passed a corrupted blob to the client as a complete response:\n{err}\n{}",
        ctx()
    );
    assert!(
        !cistern.blob_path(big).exists(),
        "cistern cached a blob whose digest does not match\n{}",
        ctx()
    );
    // Partial fills are removed (tmp/ holds fills in progress; give the cleanup a bounded
    // moment).
    let tmp = cistern.data_dir.join("tmp");
    let leftovers = || -> Vec<String> {
        std::fs::read_dir(&tmp)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + daemon::WAIT;
    while !leftovers().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        leftovers().is_empty(),
        "partial fill left in {}: {:?}\n{}",
        tmp.display(),
        leftovers(),
        ctx()
    );

    // The upstream is repaired: the next pull refetches and succeeds (no poisoned cache, no
    // remembered failure).
    std::fs::write(&data_path, &good).unwrap();
    copy_all(&skopeo, &host, &[&fx.app], &work.sub("pull-good"), &ctx);
    cached_blob(&cistern, big, &ctx);

    // --- A tag moved upstream: with tag_ttl = 1s cistern must serve the new manifest soon
    // (polled, bounded), and the old one stays reachable by digest.
    let push_moving = |layout_tag: &str| -> Seeded {
        fixtures::push(
            &skopeo,
            &fx.layout_dir,
            layout_tag,
            registry.addr,
            "library/moving:1.0",
            None,
            &ctx,
        )
    };
    let old = push_moving("app");
    let moving = format!("{host}/library/moving:1.0");
    assert!(
        skopeo.inspect_raw(&moving, &ctx) == old.manifest,
        "moving tag, first version"
    );
    let new = push_moving("dockerv2");
    assert_ne!(old.digest, new.digest);
    let deadline = std::time::Instant::now() + daemon::WAIT;
    loop {
        let raw = skopeo.inspect_raw(&moving, &ctx);
        if raw == new.manifest {
            break;
        }
        assert!(
            raw == old.manifest,
            "moving tag via cistern: neither the old nor the new manifest ({})\n{}",
            sha256_digest(&raw),
            ctx()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "cistern still serves the old manifest for a tag moved upstream {:?} ago (tag_ttl = 1s)\n{}",
            daemon::WAIT,
            ctx()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let by_old_digest = skopeo.inspect_raw(&format!("{host}/library/moving@{}", old.digest), &ctx);
    assert!(
        by_old_digest == old.manifest,
        "old manifest by digest after the tag moved"
    );

    // --- Concurrent first pulls: three skopeo processes pull the same uncached images at
    // once through a fresh cistern; each blob is fetched from the upstream exactly once (one
    // fill per digest, the other clients follow it) and every client gets correct data.
    let fresh = Cistern::start(&work.sub("cistern-fresh"), registry.addr);
    let fhost = fresh.host();
    let fctx = || logs(&registry, Some(&fresh));
    registry.settle(LOG_QUIET);
    let baseline = registry.blob_gets().len();
    let targets = [&fx.app, &fx.multi];
    std::thread::scope(|scope| {
        for i in 0..3 {
            let (skopeo, fhost, fctx, targets) = (&skopeo, &fhost, &fctx, &targets);
            let dir = work.sub(&format!("concurrent-{i}"));
            scope.spawn(move || copy_all(skopeo, fhost, &targets[..], &dir, fctx));
        }
    });
    registry.settle(LOG_QUIET);
    let counts = blob_get_counts(&registry.blob_gets()[baseline..]);
    let want = fixtures::all_blobs(&targets);
    let wrong: Vec<_> = want
        .iter()
        .filter(|d| counts.get(*d).copied().unwrap_or(0) != 1)
        .map(|d| (d.clone(), counts.get(d).copied().unwrap_or(0)))
        .collect();
    assert!(
        wrong.is_empty(),
        "with 3 concurrent clients each blob must be fetched upstream exactly once; (digest, GETs): {wrong:?}\n{}",
        fctx()
    );
}
