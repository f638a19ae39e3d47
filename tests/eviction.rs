//! The disk budget: least recently used blobs are evicted online to stay under `max_size`,
//! never one being read or pinned; evicted blobs come back on demand; LRU order survives a
//! restart.

mod support;

use std::time::Duration;

use bytesize::ByteSize;
use support::*;

const REPO: &str = "library/app";

fn blob_bytes_on_disk(data: &DataDir) -> u64 {
    data.blob_files()
        .iter()
        .map(|f| std::fs::metadata(data.path().join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// Lets file mtimes (the persisted last-access times) tell two moments apart.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_go_and_come_back_on_demand() {
    let (blobs, digests) = blobs_and_digests(6, MIB, 100);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let max = 4 * MIB as u64;
    let cistern = TestCistern::start_with(&upstream, |c| {
        c.cache.max_size = Some(ByteSize::b(max));
    })
    .await;
    let client = cistern.client();
    let high = (max as f64 * 0.95) as u64;

    for (b, d) in blobs.iter().zip(&digests) {
        assert_same_bytes(&client.get_blob(REPO, d).await.unwrap(), b, "pull");
        eventually("the cache back under its budget", patience(), || {
            blob_bytes_on_disk(cistern.data()) <= high
        })
        .await;
        tick().await;
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
    // A large blob held open by a slow client, a pinned one, and enough others to force
    // eviction well past both.
    let big = blob_bytes(16 * MIB, 200);
    let pinned = blob_bytes(MIB, 201);
    let others: Vec<_> = (0..5).map(|i| blob_bytes(4 * MIB, 210 + i)).collect();
    let mut builder = FakeRegistry::builder()
        .blob(REPO, big.clone())
        .blob(REPO, pinned.clone());
    for b in &others {
        builder = builder.blob(REPO, b.clone());
    }
    let upstream = builder.start().await;
    let (big_d, pinned_d) = (sha256_digest(&big), sha256_digest(&pinned));
    let pin = format!("{}*", &pinned_d[..20]);
    let cistern = TestCistern::start_with(&upstream, |c| {
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
    tick().await;

    // A client starts reading the big blob (now cached) and stops after 1 MiB, holding the
    // response open: far more than socket buffers hold remains unsent.
    let slow = reqwest::Client::new();
    let mut held = slow
        .get(client.url(&blob_route(REPO, &big_d)))
        .send()
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < MIB {
        got.extend_from_slice(&held.chunk().await.unwrap().expect("more body"));
    }

    for b in &others {
        let d = sha256_digest(b);
        assert_same_bytes(&client.get_blob(REPO, &d).await.unwrap(), b, "other");
        tick().await;
    }
    // Eviction has run (the others alone are 20 MiB of a 24 MiB budget) ...
    eventually("eviction", patience(), || {
        !cistern
            .data()
            .blob_path(&sha256_digest(&others[0]))
            .exists()
    })
    .await;
    // ... but the blob being read and the pinned one are still there.
    assert!(
        cistern.data().blob_path(&big_d).exists(),
        "evicted while read"
    );
    assert!(
        cistern.data().blob_path(&pinned_d).exists(),
        "pinned blob evicted"
    );
    // And the held response completes with the right bytes.
    while let Some(chunk) = held.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_same_bytes(&got, &big, "the held response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_order_survives_a_restart() {
    let (blobs, d) = blobs_and_digests(4, MIB, 300);
    let upstream = FakeRegistry::with_blobs(REPO, &blobs).await;
    let budget = |c: &mut ::cistern::Config| {
        c.cache.max_size = Some(ByteSize::b(3 * MIB as u64 + MIB as u64 / 2));
    };

    let cistern = TestCistern::start_with(&upstream, budget).await;
    let client = cistern.client();
    for digest in &d[..3] {
        client.get_blob(REPO, digest).await.unwrap();
        tick().await;
    }
    // Use the oldest again: it is now the most recently used.
    client.get_blob(REPO, &d[0]).await.unwrap();
    tick().await;
    let data = cistern.shutdown().await;

    let cistern = TestCistern::start_on(&upstream, data, budget).await;
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
