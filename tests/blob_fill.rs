//! Blob fills: one upstream GET per digest, owned by the cache rather than by a request, with
//! every client streaming from it; a fill that fails (wrong digest, cut, stall) aborts every
//! client, caches nothing, and leaves the next request free to fetch again.

mod support;

use std::time::Duration;

use support::*;

const REPO: &str = "library/app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_completes_after_the_client_disconnects() {
    let (blob, digest) = blob_and_digest(64 * MIB, 1);
    let gate = Gate::new();
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::GateAt(2 * MIB as u64, gate.clone()))
            .await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    // The only client leaves after 1 MiB, while the upstream is held at 2 MiB: the fill
    // cannot have finished yet.
    client
        .read_prefix_then_disconnect(&blob_route(REPO, &digest), MIB)
        .await;
    gate.open();

    let data = cistern.data().clone();
    data.wait_for_blob(&digest, "the abandoned fill to commit")
        .await;
    let again = client
        .get_blob(REPO, &digest)
        .await
        .expect("GET after the fill");
    assert_same_bytes(&again, &blob, "blob served after the fill");
    assert_eq!(
        upstream.blob_gets(&digest),
        1,
        "the later GET must be served from the cache"
    );
    assert_same_bytes(
        &std::fs::read(data.blob_path(&digest)).unwrap(),
        &blob,
        "committed file",
    );
    assert_eq!(
        data.tmp_files(),
        Vec::<std::path::PathBuf>::new(),
        "tmp/ after a commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_cold_gets_make_one_upstream_get() {
    let (blob, digest) = blob_and_digest(2 * MIB, 2);
    let gate = Gate::new();
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::GateAt(512 * KIB as u64, gate.clone()))
            .await;
    let cistern = TestCistern::start(&upstream).await;

    let readers = cistern
        .client()
        .spawn_readers(&blob_route(REPO, &digest), 100);
    // Every client has bytes while the upstream is still held: all 100 are in flight at once.
    readers.started().await;
    gate.open();

    readers.all_receive(&blob).await;
    assert_eq!(
        upstream.blob_gets(&digest),
        1,
        "upstream GETs for 100 concurrent clients"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_gets_the_whole_blob_from_byte_zero() {
    let (blob, digest) = blob_and_digest(4 * MIB, 3);
    let gate = Gate::new();
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::GateAt(2 * MIB as u64, gate.clone()))
            .await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let first = client.spawn_readers(&route, 1);
    // A megabyte of the fill has landed (a client has seen it) before the second client comes.
    first.received_at_least(MIB).await;
    let late = client.spawn_readers(&route, 1);
    late.started().await;
    gate.open();

    let first = first.finish().await.remove(0).expect("first client");
    let late = late.finish().await.remove(0).expect("late joiner");
    assert_same_bytes(&first, &blob, "first client");
    assert_same_bytes(&late, &blob, "late joiner");
    assert_eq!(upstream.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bytes_abort_every_client_and_cache_nothing() {
    fill_that_fails_aborts_readers_then_refetches(FailingFill {
        blob: blob_bytes(MIB, 4),
        fault: Fault::WrongBytes,
        readers: 3,
        tweak: |_| {},
        how: "of wrong bytes",
        fill: "failed",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_upstream_body_aborts_clients_and_next_get_refetches() {
    fill_that_fails_aborts_readers_then_refetches(FailingFill {
        blob: blob_bytes(2 * MIB, 5),
        fault: Fault::CutAfter(MIB as u64),
        readers: 3,
        tweak: |_| {},
        how: "from a cut upstream",
        fill: "cut",
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_body_aborts_clients_after_idle_timeout() {
    fill_that_fails_aborts_readers_then_refetches(FailingFill {
        blob: blob_bytes(2 * MIB, 6),
        fault: Fault::StallAfter(MIB as u64),
        readers: 2,
        tweak: |c| c.upstream.idle_timeout = Duration::from_secs(1),
        how: "from a stalled upstream",
        fill: "stalled",
    })
    .await;
}

/// A fill whose upstream body goes wrong: `fault`, once, on a body held at 256 KiB until
/// `readers` clients have bytes.
struct FailingFill {
    blob: bytes::Bytes,
    fault: Fault,
    readers: usize,
    /// Adjusts cistern's config.
    tweak: fn(&mut ::cistern::Config),
    /// How the clients' bodies would be wrong ("of wrong bytes", "from a cut upstream").
    how: &'static str,
    /// What the fill was ("failed", "cut").
    fill: &'static str,
}

/// Every client following a fill that fails gets an error, the fill leaves nothing behind,
/// and the next GET fetches the blob from the upstream again, whole.
async fn fill_that_fails_aborts_readers_then_refetches(case: FailingFill) {
    let FailingFill {
        blob,
        fault,
        readers,
        tweak,
        how,
        fill,
    } = case;
    let digest = sha256_digest(&blob);
    let gate = Gate::new();
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(
            &digest,
            fault
                .and(Fault::GateAt(256 * KIB as u64, gate.clone()))
                .once(),
        )
        .start()
        .await;
    let cistern = TestCistern::start_with(&upstream, tweak).await;
    let client = cistern.client();

    let readers = client.spawn_readers(&blob_route(REPO, &digest), readers);
    readers.started().await;
    gate.open();
    readers.all_fail(how).await;

    assert_failed_fill_left_nothing(cistern.data(), &digest).await;
    let retry = client
        .get_blob(REPO, &digest)
        .await
        .unwrap_or_else(|e| panic!("GET after a {fill} fill: {e}"));
    assert_same_bytes(&retry, &blob, &format!("blob after the {fill} fill"));
    assert_eq!(
        upstream.blob_gets(&digest),
        2,
        "the next GET fetches upstream again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_response_is_held_until_the_whole_blob_verifies() {
    // The range ends long before the fill does, and the upstream is held past it: a range
    // response that is not held back until the digest verifies completes here with bytes
    // that turn out to be wrong. (With `cold_ranges = "wait"`; the default, "upstream",
    // serves ranges unverified: tests/lazy_range.rs.)
    let (blob, digest) = blob_and_digest(2 * MIB, 8);
    let gate = Gate::new();
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(
            &digest,
            Fault::WrongBytes
                .and(Fault::GateAt(3 * MIB as u64 / 2, gate.clone()))
                .once(),
        )
        .start()
        .await;
    let cistern = TestCistern::start_with(&upstream, |c| {
        c.cache.cold_ranges = ::cistern::config::ColdRanges::Wait;
    })
    .await;
    let client = cistern.client();
    let route = blob_route(REPO, &digest);

    let range = client.spawn_readers_with(&route, 1, |r| r.header("range", "bytes=0-524287"));
    range.started().await;
    gate.open();
    let result = range.finish().await.remove(0);
    assert!(
        result.is_err(),
        "a range of an unverified (and wrong) fill completed cleanly"
    );

    // With good bytes the same range completes once the blob verifies.
    let range = client.spawn_readers_with(&route, 1, |r| r.header("range", "bytes=0-524287"));
    let good = range
        .finish()
        .await
        .remove(0)
        .expect("range of a good fill");
    assert_same_bytes(&good, &blob[..512 * KIB], "range after the failed fill");
    assert_eq!(upstream.blob_gets(&digest), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_client_sees_wrong_bytes_as_an_error() {
    // No gate: the mismatch may be found before or after the response header is sent, and
    // both must end as an error for the client.
    let (blob, digest) = blob_and_digest(3 * MIB, 7);
    let upstream = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::WrongBytes.once()).await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();

    let first = client.get_blob(REPO, &digest).await;
    assert!(first.is_err(), "got a complete body of wrong bytes");
    assert_failed_fill_left_nothing(cistern.data(), &digest).await;
    assert_same_bytes(
        &client.get_blob(REPO, &digest).await.unwrap(),
        &blob,
        "retry",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_status_is_not_cached() {
    for (seed, status) in [(10, 503), (11, 429), (12, 500)] {
        let (blob, digest) = blob_and_digest(100 * KIB, seed);
        let upstream =
            FakeRegistry::with_faulty_blob(REPO, &blob, Fault::Status(status).once()).await;
        let cistern = TestCistern::start(&upstream).await;
        let client = cistern.client();

        // cistern may answer with an error or retry on its own; it must not serve garbage.
        let first = client.get(&blob_route(REPO, &digest)).await;
        if first.status == 200 {
            assert_same_bytes(first.bytes(), &blob, "first GET after a retry");
        } else {
            assert!(
                first.status.is_server_error() || first.status == 429,
                "upstream {status} became {}",
                first.status
            );
            first.oci_error_code();
        }
        let second = client.get_blob(REPO, &digest).await.unwrap_or_else(|e| {
            let gets = upstream.blob_gets(&digest);
            panic!("upstream {status} once, then the next GET failed after {gets} upstream GETs in all: {e}")
        });
        assert_same_bytes(&second, &blob, "second GET");
        assert!(
            upstream.blob_gets(&digest) >= 2,
            "upstream {status} was remembered"
        );
    }
}

/// After a failed fill: no blob committed, and the partial file removed (cleanup may finish
/// just after the clients saw their errors).
async fn assert_failed_fill_left_nothing(data: &DataDir, digest: &str) {
    assert!(
        !data.blob_path(digest).exists(),
        "a failed fill was committed"
    );
    data.assert_no_blob_files("files in blobs/ after a failed fill");
    eventually("tmp/ to be cleaned after a failed fill", patience(), || {
        data.tmp_files().is_empty()
    })
    .await;
}

/// The admin stats' count of running fills reaches 0 (a fill's slot under the cap is free
/// once it has left the map).
async fn no_fill_running(cistern: &TestCistern) {
    bounded("every fill to end", async {
        while cistern
            .admin(http::Method::GET, "/admin/stats")
            .await
            .json()["fills_running"]
            != 0
        {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Cold fills are capped per client address and in total (429 with Retry-After over the
/// cap); cache hits and requests that join a running fill are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_fills_are_capped_per_client_and_in_total_but_hits_and_joins_are_not() {
    let (held, held_digest) = blob_and_digest(4 * MIB, 50);
    let (held2, held2_digest) = blob_and_digest(4 * MIB, 51);
    let (cold, cold_digest) = blob_and_digest(64 * KIB, 52);
    let (cached, cached_digest) = blob_and_digest(64 * KIB, 53);
    let gate = Gate::new();
    let upstream = FakeRegistry::builder()
        .blob(REPO, held.clone())
        .blob(REPO, held2.clone())
        .blob(REPO, cold.clone())
        .blob(REPO, cached.clone())
        .on_blob(&held_digest, Fault::GateAt(MIB as u64, gate.clone()))
        .on_blob(&held2_digest, Fault::GateAt(MIB as u64, gate.clone()))
        .start()
        .await;
    let cistern = TestCistern::builder()
        .front(&upstream)
        .config(|c| {
            c.cache.max_fills_per_client = 1;
            c.cache.max_fills = 2;
        })
        .admin()
        .start()
        .await;
    let (a, b, c) = (
        cistern.client_from("127.0.0.1"),
        cistern.client_from("127.0.0.2"),
        cistern.client_from("127.0.0.3"),
    );
    let got = a.get_blob(REPO, &cached_digest).await.unwrap();
    assert_same_bytes(&got, &cached, "the blob to cache");
    cistern.data().committed_blob(&cached_digest).await;
    no_fill_running(&cistern).await;

    let pull = |client: &Client, digest: &str| {
        let (client, path) = (client.clone(), blob_route(REPO, digest));
        tokio::spawn(async move { client.get(&path).await })
    };
    let first = pull(&a, &held_digest);
    gate.wait_reached(1).await;

    // Client a has its one fill running: another cold blob is refused...
    let over = a.get(&blob_route(REPO, &cold_digest)).await;
    assert_eq!(
        over.status,
        http::StatusCode::TOO_MANY_REQUESTS,
        "a cold blob over the per-client cap"
    );
    assert_eq!(over.header("retry-after"), Some("1"));
    assert_eq!(
        upstream.blob_gets(&cold_digest),
        0,
        "refused before the upstream"
    );
    // ...but a hit is served, and joining the running fill is allowed.
    let hit = a.get_blob(REPO, &cached_digest).await.unwrap();
    assert_same_bytes(&hit, &cached, "a hit while at the cap");
    let joined = pull(&a, &held_digest);

    // Client b starts the second fill; the total (2) is then reached for everyone.
    let second = pull(&b, &held2_digest);
    gate.wait_reached(2).await;
    let over = c.get(&blob_route(REPO, &cold_digest)).await;
    assert_eq!(
        over.status,
        http::StatusCode::TOO_MANY_REQUESTS,
        "a cold blob over the total cap"
    );
    assert_eq!(upstream.blob_gets(&cold_digest), 0);

    gate.open();
    for (task, blob) in [(first, &held), (joined, &held), (second, &held2)] {
        let got = task.await.unwrap();
        assert_eq!(got.status, http::StatusCode::OK, "{}", got.body_text());
        assert_same_bytes(got.bytes(), blob, "a pull under the cap");
    }
    assert_eq!(
        upstream.blob_gets(&held_digest),
        1,
        "the join shared the fill"
    );
    no_fill_running(&cistern).await;
    let got = a.get_blob(REPO, &cold_digest).await.unwrap();
    assert_same_bytes(&got, &cold, "under the cap again");
}
