//! Graceful shutdown: a fill running when shutdown starts either finishes within the grace and
//! is committed, or is cancelled; either way no partial file is left and no client sees a
//! short body as complete.

mod support;

use std::time::Duration;

use support::*;

const REPO: &str = "library/app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_running_at_shutdown_is_committed_or_vanishes() {
    let (blob, digest) = blob_and_digest(8 * MIB, 1);
    let gate = Gate::new();
    let upstream =
        FakeRegistry::with_faulty_blob(REPO, &blob, Fault::GateAt(MIB as u64, gate.clone())).await;
    let cistern = TestCistern::start(&upstream).await;

    let readers = cistern
        .client()
        .spawn_readers(&blob_route(REPO, &digest), 5);
    readers.started().await;
    // Shutdown is requested while the fill is held mid-way; only then may it go on.
    cistern.begin_shutdown();
    gate.open();
    let data = cistern.shutdown().await;

    for (i, result) in readers.finish().await.into_iter().enumerate() {
        if let Ok(body) = result {
            assert_same_bytes(
                &body,
                &blob,
                &format!("client {i} ended cleanly, so its body must be whole"),
            );
        }
    }
    assert_eq!(
        data.tmp_files(),
        Vec::<std::path::PathBuf>::new(),
        "partial files left after shutdown"
    );
    let blobs = data.blob_files();
    if !blobs.is_empty() {
        assert_eq!(blobs.len(), 1, "{blobs:?}");
        let committed =
            std::fs::read(data.blob_path(&digest)).expect("the committed blob is at its path");
        assert_same_bytes(&committed, &blob, "blob committed during shutdown");
    }
    assert_eq!(upstream.blob_gets(&digest), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_stalled_past_the_grace_is_cancelled_cleanly() {
    let (blob, digest) = blob_and_digest(4 * MIB, 2);
    let upstream = FakeRegistry::with_faulty_blob(REPO, &blob, Fault::StallAfter(MIB as u64)).await;
    // The upstream stalls for longer than the grace, and the idle timeout would not end it
    // first: only the shutdown can.
    let cistern = TestCistern::start_with(&upstream, |c| {
        c.shutdown_grace = Duration::from_secs(1);
        c.upstream.idle_timeout = Duration::from_secs(3600);
    })
    .await;

    let readers = cistern
        .client()
        .spawn_readers(&blob_route(REPO, &digest), 2);
    readers.started().await;
    let data = cistern.shutdown().await;

    readers.all_fail("from a fill that never finished").await;
    assert_eq!(
        data.tmp_files(),
        Vec::<std::path::PathBuf>::new(),
        "partial files left after shutdown"
    );
    data.assert_no_blob_files("nothing can be committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_does_not_hold_up_shutdown() {
    let upstream = FakeRegistry::builder().start().await;
    // A grace far beyond the test's patience: a shutdown that waits for idle connections to
    // go away on their own would time out below.
    let cistern =
        TestCistern::start_with(&upstream, |c| c.shutdown_grace = Duration::from_secs(3600)).await;
    let client = cistern.client();
    assert_eq!(client.get("/v2/").await.status, http::StatusCode::OK);
    // `client` is still alive, so its pooled connection to cistern stays open and idle.
    let data = bounded(
        "shutdown with only an idle connection open",
        cistern.shutdown(),
    )
    .await;
    assert_eq!(data.tmp_files(), Vec::<std::path::PathBuf>::new());
    drop(client);
}
