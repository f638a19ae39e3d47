//! `TestCistern`: `cistern::run` on `127.0.0.1:0` over a temporary data directory.
//!
//! ```ignore
//! let cistern = TestCistern::start(&upstream).await;
//! let body = cistern.client().get_blob("library/app", &digest).await.unwrap();
//! let data = cistern.shutdown().await; // re-raises run's error or panic
//! let cistern = TestCistern::start_on(&upstream, data, |_| {}).await; // a restart
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cistern::Config;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::registry::FakeRegistry;

// === impl DataDir ===

/// A data directory `<root>/data` inside a private temporary `<root>`, so a test can check that
/// nothing was written next to it. Deleted when the last clone is dropped.
#[derive(Clone)]
pub struct DataDir {
    root: Arc<tempfile::TempDir>,
    data: PathBuf,
}

impl Default for DataDir {
    fn default() -> Self {
        DataDir::new()
    }
}

impl DataDir {
    pub fn new() -> DataDir {
        let root = tempfile::Builder::new()
            .prefix("cistern-test-")
            .tempdir()
            .expect("create temp dir");
        let data = root.path().join("data");
        std::fs::create_dir(&data).expect("create data dir");
        DataDir {
            root: Arc::new(root),
            data,
        }
    }

    /// The data directory handed to cistern.
    pub fn path(&self) -> &Path {
        &self.data
    }

    /// The private directory that holds `path()` and nothing else unless a test puts it there.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Where a committed blob lives: `blobs/sha256/<2 hex>/<64 hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.data.join("blobs").join(shard(digest))
    }

    /// The committed blob's bytes, once its commit is done. A client's GET ends as soon as
    /// the blob is verified, a moment before the commit (fsync, rename) makes it visible.
    pub async fn committed_blob(&self, digest: &str) -> Vec<u8> {
        self.wait_for_blob(digest, &format!("blob {digest} to be committed"))
            .await;
        std::fs::read(self.blob_path(digest)).expect("read the committed blob")
    }

    /// Where a committed manifest lives: `manifests/sha256/<2 hex>/<64 hex>`.
    pub fn manifest_path(&self, digest: &str) -> PathBuf {
        self.data.join("manifests").join(shard(digest))
    }

    /// Every file (not directory) below `data/<sub>`, recursively, as paths relative to the
    /// data directory. Empty if `sub` does not exist.
    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.data, &self.data.join(sub), &mut out);
        out.sort();
        out
    }

    pub fn tmp_files(&self) -> Vec<PathBuf> {
        self.files("tmp")
    }

    pub fn blob_files(&self) -> Vec<PathBuf> {
        self.files("blobs")
    }

    /// Waits (bounded by the patience) until blob `digest` is committed: a fill nobody is
    /// reading, or the rename that may trail a response's last byte.
    pub async fn wait_for_blob(&self, digest: &str, what: &str) {
        super::eventually(what, super::patience(), || self.blob_path(digest).is_file()).await;
    }

    /// Asserts that no blob was committed: `blobs/` holds no file at all.
    #[track_caller]
    pub fn assert_no_blob_files(&self, what: &str) {
        assert_eq!(self.blob_files(), Vec::<PathBuf>::new(), "{what}");
    }

    pub fn manifest_files(&self) -> Vec<PathBuf> {
        self.files("manifests")
    }

    /// Names directly inside `root()`.
    pub fn root_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root())
            .expect("read temp root")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    /// Every file below `root()` that is not below `path()`, relative to `root()`.
    pub fn files_outside_data(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        walk(self.root(), self.root(), &mut all);
        all.retain(|p| !p.starts_with("data"));
        all.sort();
        all
    }
}

fn shard(digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    PathBuf::from("sha256").join(&hex[..2]).join(hex)
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // symlink_metadata: never follow a link out of the tree.
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(base, &path, out),
            Ok(_) => out.push(path.strip_prefix(base).unwrap_or(&path).to_path_buf()),
            Err(_) => {}
        }
    }
}

// === impl TestCistern ===

/// A running cistern. Dropping it cancels its shutdown token without waiting; call
/// [`TestCistern::shutdown`] to wait and to see errors.
pub struct TestCistern {
    addr: std::net::SocketAddr,
    config: Config,
    data: Option<DataDir>,
    stop: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Drop for TestCistern {
    /// Stops the server. A test that did not call `shutdown` still waits a moment for it to
    /// finish: a fill committing while the data directory is being removed would leave a
    /// stray directory behind in /tmp. The wait is short and bounded, so a test that ends
    /// with a fill stalled on purpose is not held up by the shutdown grace period.
    fn drop(&mut self) {
        self.stop.cancel();
        let Some(task) = self.task.take() else {
            return;
        };
        if std::thread::panicking() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| {
                let _ = handle.block_on(tokio::time::timeout(Duration::from_secs(2), task));
            });
        }
    }
}

impl TestCistern {
    pub async fn start(upstream: &FakeRegistry) -> TestCistern {
        TestCistern::start_with(upstream, |_| {}).await
    }

    /// Starts with a fresh data directory after `tweak` has adjusted the test config.
    pub async fn start_with(
        upstream: &FakeRegistry,
        tweak: impl FnOnce(&mut Config),
    ) -> TestCistern {
        TestCistern::start_on(upstream, DataDir::new(), tweak).await
    }

    /// Starts on an existing data directory (a restart, or one the test prepared).
    pub async fn start_on(
        upstream: &FakeRegistry,
        data: DataDir,
        tweak: impl FnOnce(&mut Config),
    ) -> TestCistern {
        let mut config = TestCistern::config_for(&data);
        config.upstream.url = upstream.url();
        tweak(&mut config);
        TestCistern::start_config(data, config).await
    }

    /// The defaults every test starts from: `data` as the data directory, and a shutdown grace
    /// short enough that a test whose shutdown must wait it out stays quick.
    pub fn config_for(data: &DataDir) -> Config {
        Config {
            data_dir: data.path().to_path_buf(),
            shutdown_grace: Duration::from_secs(10),
            ..Config::default()
        }
    }

    /// Runs `config` on `127.0.0.1:0` (its `listen` set to the address bound) over `data`.
    pub async fn start_config(data: DataDir, config: Config) -> TestCistern {
        TestCistern::start_config_clock(data, config, cistern::cache::Clock::system()).await
    }

    /// [`TestCistern::start_config`] with tag answers dated by `clock` (a manual one lets a
    /// test step past a TTL instead of sleeping through it).
    pub async fn start_config_clock(
        data: DataDir,
        mut config: Config,
        clock: cistern::cache::Clock,
    ) -> TestCistern {
        super::init();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind cistern");
        let addr = listener.local_addr().expect("local addr");
        config.listen = addr;
        let stop = CancellationToken::new();
        let (run_config, run_stop) = (config.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let server = cistern::Server::builder(run_config)
                .clock(clock)
                .build()
                .await?;
            server.run(listener, run_stop).await
        });
        TestCistern {
            addr,
            config,
            data: Some(data),
            stop,
            task: Some(task),
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Base URL, without `/v2/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::new(self.url())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn data(&self) -> &DataDir {
        self.data.as_ref().expect("data dir present until shutdown")
    }

    pub fn data_dir(&self) -> &Path {
        self.data().path()
    }

    /// Cancels the shutdown token without waiting.
    pub fn begin_shutdown(&self) {
        self.stop.cancel();
    }

    /// Cancels the shutdown token and waits (bounded by the grace plus a margin) for `run` to
    /// return. Panics if it returned an error, re-raises its panic. Returns the data directory
    /// for inspection or a restart.
    pub async fn shutdown(mut self) -> DataDir {
        self.stop.cancel();
        let task = self.task.take().expect("shut down once");
        let limit = self.config.shutdown_grace + super::patience();
        match tokio::time::timeout(limit, task).await {
            Err(_) => panic!("cistern::run did not return within {limit:?} of shutdown"),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Ok(Err(join)) => panic!("cistern::run task failed: {join}"),
            Ok(Ok(Err(e))) => panic!("cistern::run returned an error: {e:#}"),
            Ok(Ok(Ok(()))) => {}
        }
        self.data.take().expect("data dir present until shutdown")
    }
}
