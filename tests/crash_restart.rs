//! A real crash: the cistern binary is killed with SIGKILL in the middle of a cache fill, then
//! started again on the same data directory. The partial file it left must never be served,
//! and must be gone once the new process is up.

mod support;

use std::path::Path;
use support::process::ChildCistern;
use support::{Client, DataDir, FakeRegistry, Fault, Gate, MIB, blob_bytes, sha256_digest};

const REPO: &str = "crash/test";

/// The cistern binary on the data directory `data`, in front of `upstream`.
async fn start(upstream: &str, data: &Path) -> ChildCistern {
    ChildCistern::start(upstream, data, None, ChildCistern::serve).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_fill_leaves_nothing_servable_and_restart_cleans_up() {
    support::init();
    let blob = blob_bytes(4 * MIB, 42);
    let digest = sha256_digest(&blob);
    let gate = Gate::new();
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .on_blob(&digest, Fault::GateAt(MIB as u64, gate.clone()).once())
        .start()
        .await;
    let data = DataDir::new();

    let mut first = start(&upstream.url(), data.path()).await;
    let client = Client::new(first.url.clone());
    let d = digest.clone();
    let pending = tokio::spawn(async move { client.get_blob(REPO, &d).await });
    gate.wait_reached(1).await;
    // The fill has written what the upstream sent before the gate.
    support::eventually(
        "a partial file with the first MiB",
        support::patience(),
        || {
            data.tmp_files().iter().any(|f| {
                std::fs::metadata(data.path().join(f)).is_ok_and(|m| m.len() >= MIB as u64)
            })
        },
    )
    .await;

    first.kill9();
    assert!(
        !data.tmp_files().is_empty(),
        "the crash must leave a partial file behind, or this test proves nothing"
    );
    assert!(data.blob_files().is_empty(), "nothing was committed");
    let cut = support::bounded("the client's response to end", pending)
        .await
        .unwrap();
    assert!(
        cut.is_err(),
        "a client of a killed fill must see an error, not a complete body"
    );

    // Restart on the same directory: leftovers are swept before anything is served, and the
    // blob is fetched afresh and verified.
    gate.open();
    let second = start(&upstream.url(), data.path()).await;
    assert_eq!(data.tmp_files(), Vec::<std::path::PathBuf>::new());
    let got = Client::new(second.url.clone())
        .get_blob(REPO, &digest)
        .await
        .expect("blob after restart");
    support::assert_same_bytes(&got, &blob, "blob after restart");
    assert_eq!(
        upstream.blob_gets(&digest),
        2,
        "the partial file was not reused"
    );
    data.committed_blob(&digest).await;
}
