//! The disk budget: least recently used blobs are evicted online to stay under `max_size`,
//! never one being read or pinned; evicted blobs come back on demand; LRU order survives a
//! restart. The metadata budget (`max_metadata_size`) removes unreferenced manifests first,
//! never a pinned tag, and counts what a restart finds.

mod support;

use std::time::{Duration, SystemTime};

use ::cistern::clock::Clock;
use bytesize::ByteSize;
use support::*;

const REPO: &str = "library/app";

fn blob_bytes_on_disk(data: &DataDir) -> u64 {
    data.blob_files()
        .iter()
        .map(|f| std::fs::metadata(data.path().join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// cistern in front of `upstream`, after `tweak`, reading time from `clock`: blob access
/// times, in the index and in the file mtimes that keep them across restarts, are its.
async fn start_on_clock(
    upstream: &FakeRegistry,
    clock: &Clock,
    tweak: impl FnOnce(&mut ::cistern::Config) + Send + 'static,
) -> TestCistern {
    TestCistern::builder()
        .front(upstream)
        .clock(clock)
        .config(tweak)
        .start()
        .await
}

/// A clock that stands still until [`tick`] moves it. It reads 2001, long before any real
/// file time: an access stamped from the system clock instead of this one would sort as the
/// newest of all and break the LRU order the tests check.
fn clock() -> Clock {
    Clock::manual(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
}

/// Moves on to a later moment, so that access times before and after tell them apart.
fn tick(clock: &Clock) {
    clock.advance(SECOND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_go_and_come_back_on_demand() {
    let (blobs, digests) = blobs_and_digests(6, MIB, 100);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let max = 4 * MIB as u64;
    let clock = clock();
    let cistern = start_on_clock(&upstream, &clock, move |c| {
        c.cache.max_size = Some(ByteSize::b(max));
    })
    .await;
    let client = cistern.client();
    let high = (max as f64 * 0.95) as u64;

    for (b, d) in blobs.iter().zip(&digests) {
        assert_same_bytes(&client.get_blob(REPO, d).await.unwrap(), b, "pull");
        // Clients get their last byte before the commit: wait for it, so the budget check
        // below sees this blob too.
        cistern.data().wait_for_blob(d, "the blob's commit").await;
        eventually("the cache back under its budget", patience(), || {
            blob_bytes_on_disk(cistern.data()) <= high
        })
        .await;
        tick(&clock);
    }
    // The first ones pulled are the ones that went; the last one stays.
    assert!(!cistern.data().blob_path(&digests[0]).exists());
    assert!(cistern.data().blob_path(&digests[5]).exists());

    // An evicted blob is fetched again when asked for.
    assert_same_bytes(
        &client.get_blob(REPO, &digests[0]).await.unwrap(),
        &blobs[0],
        "again",
    );
    assert_eq!(upstream.blob_gets(&digests[0]), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_being_read_or_pinned_is_never_evicted() {
    // A large blob held open by a slow client, a pinned one, and four others: the last of
    // them takes the cache over its high watermark (17 + 4 × 1.5 MiB > 95 % of 24 MiB), and
    // getting under the low one (85 %) takes two blobs, which must not be these two.
    let big = blob_bytes(16 * MIB, 200);
    let pinned = blob_bytes(MIB, 201);
    let others: Vec<_> = (0..4).map(|i| blob_bytes(3 * MIB / 2, 210 + i)).collect();
    let mut builder = FakeRegistry::builder()
        .blob(REPO, big.clone())
        .blob(REPO, pinned.clone());
    for b in &others {
        builder = builder.blob(REPO, b.clone());
    }
    let upstream = builder.start().await;
    let (big_d, pinned_d) = (sha256_digest(&big), sha256_digest(&pinned));
    let pin = format!("{}*", &pinned_d[..20]);
    let clock = clock();
    let cistern = start_on_clock(&upstream, &clock, |c| {
        c.cache.max_size = Some(ByteSize::b(24 * MIB as u64));
        c.cache.pinned_digests = vec![pin];
    })
    .await;
    let client = cistern.client();
    assert_same_bytes(
        &client.get_blob(REPO, &pinned_d).await.unwrap(),
        &pinned,
        "pinned",
    );
    assert_same_bytes(&client.get_blob(REPO, &big_d).await.unwrap(), &big, "big");
    for d in [&pinned_d, &big_d] {
        cistern.data().wait_for_blob(d, "the blob's commit").await;
    }
    tick(&clock);

    // A client starts reading the big blob (now cached) and stops after 1 MiB, holding the
    // response open: far more than socket buffers hold remains unsent.
    let held = HeldResponse::start(cistern.addr(), &blob_route(REPO, &big_d), MIB).await;

    let others_d: Vec<_> = others.iter().map(|b| sha256_digest(b)).collect();
    for (b, d) in others.iter().zip(&others_d) {
        assert_same_bytes(&client.get_blob(REPO, d).await.unwrap(), b, "other");
        // Under the high watermark until the last one, so none goes before its commit is
        // seen; waiting for each keeps their LRU order the order of the pulls.
        if d != &others_d[3] {
            cistern.data().wait_for_blob(d, "the blob's commit").await;
        }
        tick(&clock);
    }
    // Eviction has run ...
    let gone = |d: &str| !cistern.data().blob_path(d).exists();
    // (Victims go oldest first, so others[1] gone means others[0] is too. Were the big blob
    // not held, it would be the oldest victim, and enough on its own.)
    eventually("eviction", patience(), || {
        gone(&others_d[1]) || gone(&big_d)
    })
    .await;
    // ... but the blob being read and the pinned one are still there ...
    assert!(!gone(&big_d), "evicted while read");
    assert!(!gone(&pinned_d), "pinned blob evicted");
    // ... and it took the least recently used of those it may take.
    assert!(
        gone(&others_d[0]) && !gone(&others_d[2]),
        "not in LRU order"
    );
    // And the held response completes with the right bytes.
    let rest = held.finish().await;
    assert_eq!(rest.status, 200);
    assert_same_bytes(&rest.body, &big, "the held response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_order_survives_a_restart() {
    let (blobs, d) = blobs_and_digests(4, MIB, 300);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let budget = |c: &mut ::cistern::Config| {
        c.cache.max_size = Some(ByteSize::b(3 * MIB as u64 + MIB as u64 / 2));
    };

    let clock = clock();
    let cistern = start_on_clock(&upstream, &clock, budget).await;
    let client = cistern.client();
    for digest in &d[..3] {
        client.get_blob(REPO, digest).await.unwrap();
        cistern
            .data()
            .wait_for_blob(digest, "the blob's commit")
            .await;
        tick(&clock);
    }
    // Use the oldest again: it is now the most recently used.
    client.get_blob(REPO, &d[0]).await.unwrap();
    tick(&clock);
    // Same config, data directory and clock.
    let cistern = cistern.restart().await;
    cistern.client().get_blob(REPO, &d[3]).await.unwrap();
    eventually("eviction after the restart", patience(), || {
        !cistern.data().blob_path(&d[1]).exists()
    })
    .await;
    assert!(
        cistern.data().blob_path(&d[0]).exists(),
        "the blob used just before the restart was evicted: LRU order was lost"
    );
    assert!(cistern.data().blob_path(&d[3]).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_pattern_in_the_config_pins_its_images_only() {
    // app:1.2 matches the pin, app:2 does not; both are pulled first, so both are the least
    // recently used when the fillers push the cache over its budget.
    let (cfg1, l1) = (blob_bytes(KIB, 400), blob_bytes(MIB, 401));
    let (cfg2, l2) = (blob_bytes(KIB, 402), blob_bytes(MIB, 403));
    let one = oci_image_manifest(&cfg1, &[&l1]);
    let two = oci_image_manifest(&cfg2, &[&l2]);
    let fillers: Vec<_> = (0..4).map(|i| blob_bytes(MIB, 410 + i)).collect();
    let mut builder = FakeRegistry::builder()
        .manifest(REPO, Some("1.2"), OCI_MANIFEST, one.clone())
        .manifest(REPO, Some("2"), OCI_MANIFEST, two.clone());
    for b in [&cfg1, &l1, &cfg2, &l2].into_iter().chain(&fillers) {
        builder = builder.blob(REPO, b.clone());
    }
    let upstream = builder.start().await;
    let pin = format!("{}/library/*:1.*", upstream.addr());
    let clock = clock();
    let cistern = start_on_clock(&upstream, &clock, |c| {
        c.cache.max_size = Some(ByteSize::b(3 * MIB as u64));
        c.cache.pins = vec![pin];
    })
    .await;
    let client = cistern.client();
    for (tag, blobs) in [("1.2", [&cfg1, &l1]), ("2", [&cfg2, &l2])] {
        let m = client.get_manifest(REPO, tag).await;
        assert_eq!(m.status, http::StatusCode::OK, "{}", m.body_text());
        for b in blobs {
            let d = sha256_digest(b);
            client.get_blob(REPO, &d).await.unwrap();
            cistern.data().wait_for_blob(&d, "the blob's commit").await;
        }
        tick(&clock);
    }
    for f in &fillers {
        client.get_blob(REPO, &sha256_digest(f)).await.unwrap();
        tick(&clock);
    }
    let exists = |b: &[u8]| cistern.data().blob_path(&sha256_digest(b)).exists();
    eventually("app:2's layer evicted", patience(), || !exists(&l2)).await;
    assert!(
        exists(&l1) && exists(&cfg1),
        "a pinned tag's blobs were evicted"
    );
}

/// Bytes of manifests, tag records and links in `data`: what `cache.max_metadata_size` counts.
fn metadata_bytes_on_disk(data: &DataDir) -> u64 {
    ["manifests", "tags", "links"]
        .iter()
        .flat_map(|sub| data.files(sub))
        .map(|f| std::fs::metadata(data.path().join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// Where the records of `registry/repository:tag` live (`storage::tags`).
fn tag_dir(data: &DataDir, registry: &str, repository: &str, tag: &str) -> std::path::PathBuf {
    let key = sha256_digest(format!("{registry}\0{repository}\0{tag}").as_bytes());
    let hex = key.trim_start_matches("sha256:");
    data.path().join("tags").join(&hex[..2]).join(hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_over_its_budget_loses_unreferenced_manifests_first_and_pins_never() {
    const BUDGET: u64 = 64 * 1024;
    let high = BUDGET * 95 / 100;
    let (old, new, pinned) = (image_manifest(1), image_manifest(2), image_manifest(3));
    let mut builder = FakeRegistry::builder()
        .manifest(REPO, Some("1"), OCI_MANIFEST, old.clone())
        .manifest("library/pinned", Some("1"), OCI_MANIFEST, pinned.clone());
    let tags = 200;
    for i in 0..tags {
        builder = builder.manifest(
            &format!("flood/t{i}"),
            Some("latest"),
            OCI_MANIFEST,
            image_manifest(100 + i),
        );
    }
    let upstream = builder.start().await;
    let registry = upstream.addr().to_string();
    let pin = format!("{registry}/library/pinned:*");
    let clock = clock();
    let cistern = TestCistern::builder()
        .front(&upstream)
        .clock(&clock)
        .admin()
        .config(move |c| {
            c.cache.max_metadata_size = ByteSize::b(BUDGET);
            c.cache.pins = vec![pin];
        })
        .start()
        .await;
    let get = |client: &Client, repo: String, reference: String| {
        let request = client
            .request(http::Method::GET, &manifest_route(&repo, &reference))
            .header("accept", OCI_MANIFEST);
        let client = client.clone();
        async move {
            let m = client.send(request).await;
            assert_eq!(m.status, 200, "{repo}:{reference}: {}", m.body_text());
        }
    };
    let client = cistern.client();
    get(&client, "library/pinned".into(), "1".into()).await;
    tick(&clock);
    get(&client, REPO.into(), "1".into()).await;
    tick(&clock);
    // The tag moves upstream; once its answer expired, app:1 names the new manifest and the
    // old one is referenced by nothing.
    upstream.add_manifest(REPO, Some("1"), OCI_MANIFEST, new.clone());
    clock.advance(Duration::from_secs(3600));
    get(&client, REPO.into(), "1".into()).await;
    tick(&clock);

    // The count is made again at start: a restart must not forget what is on disk.
    let cistern = cistern.restart().await;
    let client = cistern.client();
    let old_digest = sha256_digest(&old);
    for i in 0..tags {
        get(&client, format!("flood/t{i}"), "latest".into()).await;
        tick(&clock);
        if i == 20 {
            // Both image manifests are now more recently used than the first tags: the old
            // one (by digest, under a name the upstream does not hold, so no link) and the
            // new one (through its tag).
            get(&client, REPO.into(), "1".into()).await;
            get(&client, "nowhere/app".into(), old_digest.clone()).await;
            tick(&clock);
            assert!(tag_dir(cistern.data(), &registry, "flood/t0", "latest").exists());
        }
        // Stop after the first pass (it counts what it removed once the files are gone): what
        // it chose shows the order.
        let stats = cistern
            .admin(http::Method::GET, "/admin/stats")
            .await
            .json();
        if stats["metadata_evicted"].as_u64() > Some(0) {
            break;
        }
    }
    let stats = cistern
        .admin(http::Method::GET, "/admin/stats")
        .await
        .json();
    assert!(
        stats["metadata_evicted"].as_u64() > Some(0),
        "the tags never filled the budget: {stats}"
    );
    let data = cistern.data();
    // The count is the disk's (once a pass that a last write may have asked for is done).
    let on_disk = retry_until("the metadata count to match the disk", || async {
        let stats = cistern
            .admin(http::Method::GET, "/admin/stats")
            .await
            .json();
        let on_disk = metadata_bytes_on_disk(data);
        (stats["metadata_bytes"].as_u64() == Some(on_disk)).then_some(on_disk)
    })
    .await;
    assert!(on_disk <= high, "{on_disk} bytes of metadata");
    assert!(
        !data.manifest_path(&old_digest).exists(),
        "the unreferenced manifest stayed though it went first"
    );
    assert!(
        data.manifest_path(&sha256_digest(&new)).exists(),
        "a tagged manifest used since went before older ones"
    );
    assert!(
        !tag_dir(data, &registry, "flood/t0", "latest").exists(),
        "the least recently used tag record stayed"
    );
    assert!(data.manifest_path(&sha256_digest(&pinned)).exists());
    assert!(
        tag_dir(data, &registry, "library/pinned", "1").exists(),
        "a pinned tag's record was evicted"
    );
    // What went is fetched again when asked for.
    get(&client, "flood/t0".into(), "latest".into()).await;
}
