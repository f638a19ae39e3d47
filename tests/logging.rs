//! What the binary's log says about a failed request: its cause, once, at warn, under the id
//! the client got in `x-request-id`, and never a secret.

mod support;

use support::process::ChildCistern;
use support::{Client, DataDir, blob_route, closed_port_url, sha256_digest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_request_logs_its_cause_once_under_the_id_the_client_got() {
    support::init();
    let data = DataDir::new();
    let log = data.root().join("cistern.log");
    let upstream = closed_port_url().await;
    let child = ChildCistern::start(
        &upstream,
        data.path(),
        Some(log.clone()),
        ChildCistern::serve,
    )
    .await;
    let client = Client::new(child.url.clone());

    let got = client
        .get(&blob_route("library/app", &sha256_digest(b"missing")))
        .await;
    assert_eq!(got.status, 502, "{}", got.body_text());
    let id = got
        .header("x-request-id")
        .expect("x-request-id")
        .to_string();
    // A second request gets an id of its own.
    let again = client.get("/v2/").await;
    assert_ne!(again.header("x-request-id"), Some(id.as_str()));

    drop(child);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(&id)).collect();
    assert_eq!(lines.len(), 1, "one line for the failed request:\n{text}");
    let line = lines[0];
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("502"), "{line}");
    // The cause: which upstream, and what went wrong with it.
    let port = upstream.rsplit(':').next().unwrap();
    assert!(line.contains(port), "the upstream is not named: {line}");
    assert!(
        line.to_lowercase().contains("connect"),
        "the connection error is not said: {line}"
    );
}
