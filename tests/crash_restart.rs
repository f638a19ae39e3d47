//! A real crash: the cistern binary is killed with SIGKILL in the middle of a cache fill, then
//! started again on the same data directory. The partial file it left must never be served,
//! and must be gone once the new process is up.

mod support;

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::{Client, DataDir, FakeRegistry, Fault, Gate, MIB, blob_bytes, sha256_digest};

const REPO: &str = "crash/test";

/// The cistern binary as a child process, killed (SIGKILL) when dropped.
struct Process {
    child: Child,
    url: String,
}

impl Process {
    async fn start(upstream: &str, data: &Path) -> Process {
        // Pick a free port for the child; the tiny window before it binds is harmless here.
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = data.parent().unwrap().join(format!("cistern-{port}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[upstream]\nurl = {upstream:?}\n",
                data.display().to_string()
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the cistern binary");
        let url = format!("http://127.0.0.1:{port}");
        let mut p = Process { child, url };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&mut self) {
        let client = Client::new(self.url.clone());
        let deadline = tokio::time::Instant::now() + support::patience();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("cistern exited during start-up: {status}");
            }
            if client.get("/v2/").await.status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cistern did not become ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn kill9(&mut self) {
        // std's kill() sends SIGKILL: no destructor, no shutdown hook runs in the child.
        self.child.kill().expect("SIGKILL cistern");
        self.child.wait().expect("reap cistern");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

    let mut first = Process::start(&upstream.url(), data.path()).await;
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
    let second = Process::start(&upstream.url(), data.path()).await;
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
