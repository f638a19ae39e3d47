//! The server counts request starts and response ends (what tells the heap trimmer that a
//! burst is over): a response's end is counted when its body is done, not when its headers go.
//!
//! The counter is process-wide, so this binary holds one test only: nothing else moves it.

mod support;

use support::*;

const REPO: &str = "library/app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_ends_when_its_body_is_done() {
    use ::cistern::server::activity::events;

    let (blob, digest) = blob_and_digest(16 * MIB, 7);
    let (held_blob, held_digest) = blob_and_digest(4 * MIB, 8);
    let gate = Gate::new();
    let upstream = FakeRegistry::builder()
        .blob(REPO, blob.clone())
        .blob(REPO, held_blob.clone())
        .on_blob(&held_digest, Fault::GateAt(MIB as u64, gate.clone()))
        .start()
        .await;
    let cistern = TestCistern::start(&upstream).await;
    let client = cistern.client();
    assert_same_bytes(
        &client.get_blob(REPO, &digest).await.unwrap(),
        &blob,
        "pull",
    );
    cistern
        .data()
        .wait_for_blob(&digest, "the blob's commit")
        .await;
    eventually("the pull's end is counted", patience(), || events() == 2).await;

    // Held part-way, by the upstream: the client has the headers and the first MiB, every
    // byte the upstream sends before its gate. The rest of the body cannot come until the
    // gate opens, so the response has provably not ended, while an end counted at the headers
    // (or at any byte sent so far) would show already: no waiting needed to tell them apart.
    let held = HeldResponse::start(cistern.addr(), &blob_route(REPO, &held_digest), MIB).await;
    assert_eq!(events(), 3, "the held request's start");
    gate.wait_reached(1).await;
    assert_eq!(events(), 3, "a response still being sent has not ended");

    gate.open();
    let rest = held.finish().await;
    assert_eq!(rest.status, 200);
    assert_same_bytes(&rest.body, &held_blob, "held pull");
    eventually("the held response's end is counted", patience(), || {
        events() == 4
    })
    .await;
}
