//! `TestCistern`: cistern, the library, on `127.0.0.1:0` over a temporary data directory. The
//! one way tests start it in-process; [`super::process::ChildCistern`] is the one way to start
//! the binary.
//!
//! ```ignore
//! let cistern = TestCistern::start(&upstream).await;          // one upstream, defaults
//! let cistern = TestCistern::builder()
//!     .upstream("mirror", at(&mirror.url()))                 // named upstreams and routes
//!     .upstream("origin", at(&origin.url()))
//!     .route(default_route("docker.io", &["mirror", "origin"]))
//!     .clock(&clock)                                         // a manual clock
//!     .admin()                                               // the admin listener and token
//!     .config(|c| c.cache.tag_ttl = ttl)                     // anything else
//!     .start()
//!     .await;
//! let cistern = cistern.restart().await;                     // same config, same DataDir
//! let gate = LoadGate::closed();                              // the reference index's load,
//! let cistern = cistern.restart_held(&gate).await;           //   held until gate.open()
//! let data = cistern.shutdown().await;                       // re-raises run's error or panic
//! ```

use std::path::Path;
use std::time::Duration;

use cistern::Config;
use cistern::cache::refs::LoadGate;
use cistern::clock::Clock;
use cistern::config::{RouteConfig, UpstreamConfig};
use http::Method;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::{Client, Response};
use super::data_dir::DataDir;
use super::registry::FakeRegistry;

/// The token of every test cistern's admin API.
pub const ADMIN_TOKEN: &str = "s3cret-admin-token";

// === impl CisternBuilder ===

type Tweak = Box<dyn FnOnce(&mut Config) + Send>;

/// What to start a [`TestCistern`] with. Without `upstream_url` or routes, the single upstream
/// is a closed port: a test that never reaches an upstream needs none.
#[derive(Default)]
pub struct CisternBuilder {
    data: Option<DataDir>,
    upstream_url: Option<String>,
    upstreams: Vec<(String, UpstreamConfig)>,
    routes: Vec<RouteConfig>,
    tweaks: Vec<Tweak>,
    clock: Option<Clock>,
    admin: bool,
    load_gate: LoadGate,
}

impl CisternBuilder {
    /// Runs over `data` (a restart, or a directory the test prepared) instead of a fresh one.
    pub fn data(mut self, data: DataDir) -> Self {
        self.data = Some(data);
        self
    }

    /// The `[upstream]` shorthand: one upstream, the default route.
    pub fn upstream_url(mut self, url: impl Into<String>) -> Self {
        self.upstream_url = Some(url.into());
        self
    }

    /// In front of `registry` alone.
    pub fn front(self, registry: &FakeRegistry) -> Self {
        self.upstream_url(registry.url())
    }

    /// A named upstream, for [`CisternBuilder::route`]s.
    pub fn upstream(mut self, name: &str, config: UpstreamConfig) -> Self {
        self.upstreams.push((name.to_string(), config));
        self
    }

    pub fn route(mut self, route: RouteConfig) -> Self {
        self.routes.push(route);
        self
    }

    /// Any other change to the config, applied in order after everything above.
    pub fn config(mut self, tweak: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// `[access]` letting anonymous clients pull what `patterns` name (and no users): what a
    /// config whose upstreams log in must say before cistern serves it.
    pub fn anonymous(self, patterns: &[&str]) -> Self {
        let anonymous: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        self.config(move |c| {
            c.access = Some(cistern::config::AccessConfig {
                anonymous,
                ..Default::default()
            })
        })
    }

    /// Tag answers (and everything else the library dates) by `clock`, a manual one in tests
    /// that step past a TTL instead of sleeping through it.
    pub fn clock(mut self, clock: &Clock) -> Self {
        self.clock = Some(clock.clone());
        self
    }

    /// The admin API on a listener of its own, behind [`ADMIN_TOKEN`] (written to the file
    /// `admin-token` beside the data directory).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Holds the reference index's start-up load at `gate` (after it read the files, before
    /// it merges them) until the test opens it: requests made meanwhile meet a loading index.
    pub fn reference_load_gate(mut self, gate: &LoadGate) -> Self {
        self.load_gate = gate.clone();
        self
    }

    /// HTTPS on the registry listener, with the certificate in `tests/data/tls/`.
    pub fn tls(self) -> Self {
        self.config(super::config::with_tls)
    }

    /// The config this builder describes, over `data`, listening on `listen`.
    fn resolve(self, data: &DataDir) -> (Config, Option<Clock>, bool, LoadGate) {
        // Without any upstream, a closed port: not Docker Hub, the default.
        let upstream = match (self.upstream_url, self.routes.is_empty()) {
            (Some(url), _) => Some(url),
            (None, true) => Some("http://127.0.0.1:9".to_string()),
            (None, false) => None,
        };
        let listen = "127.0.0.1:0".parse().expect("an address");
        let mut config = super::config::config(listen, data.path(), upstream.as_deref());
        config.upstreams.extend(self.upstreams);
        config.routes.extend(self.routes);
        if self.admin {
            let token_file = data.root().join("admin-token");
            std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("write admin token");
            config.admin.token_file = Some(token_file);
        }
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        (config, self.clock, self.admin, self.load_gate)
    }

    /// Starts cistern; fails the test if it does not start.
    pub async fn start(mut self) -> TestCistern {
        let data = self.data.take().unwrap_or_default();
        let (config, clock, admin, gate) = self.resolve(&data);
        match TestCistern::launch(data, config, clock, admin, gate).await {
            Ok(cistern) => cistern,
            Err(e) => panic!("cistern did not start: {e:#}"),
        }
    }

    /// Starts cistern where the start must fail; returns the error, as text.
    pub async fn start_error(mut self) -> String {
        let data = self.data.take().unwrap_or_default();
        let (config, clock, admin, gate) = self.resolve(&data);
        match TestCistern::launch(data, config, clock, admin, gate).await {
            Ok(_) => panic!("cistern started where it must refuse to"),
            Err(e) => e.to_string(),
        }
    }
}

// === impl TestCistern ===

/// A running cistern. Dropping it cancels its shutdown token without waiting; call
/// [`TestCistern::shutdown`] to wait and to see errors.
pub struct TestCistern {
    addr: std::net::SocketAddr,
    admin_addr: Option<std::net::SocketAddr>,
    config: Config,
    clock: Option<Clock>,
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
    pub fn builder() -> CisternBuilder {
        CisternBuilder::default()
    }

    /// In front of `upstream`, with the defaults.
    pub async fn start(upstream: &FakeRegistry) -> TestCistern {
        TestCistern::builder().front(upstream).start().await
    }

    /// In front of `upstream`, after `tweak` has adjusted the config.
    pub async fn start_with(
        upstream: &FakeRegistry,
        tweak: impl FnOnce(&mut Config) + Send + 'static,
    ) -> TestCistern {
        TestCistern::builder()
            .front(upstream)
            .config(tweak)
            .start()
            .await
    }

    /// [`TestCistern::start_with`] on an existing data directory (a restart, or one the test
    /// prepared).
    pub async fn start_on(
        upstream: &FakeRegistry,
        data: DataDir,
        tweak: impl FnOnce(&mut Config) + Send + 'static,
    ) -> TestCistern {
        TestCistern::builder()
            .front(upstream)
            .data(data)
            .config(tweak)
            .start()
            .await
    }

    /// Binds the listeners and starts cistern on them: the one place that calls the library's
    /// entry point.
    async fn launch(
        data: DataDir,
        mut config: Config,
        clock: Option<Clock>,
        admin: bool,
        gate: LoadGate,
    ) -> anyhow::Result<TestCistern> {
        super::init();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind cistern");
        let addr = listener.local_addr().expect("local addr");
        config.listen = addr;
        let admin_listener = match admin {
            true => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind admin")),
            false => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .map(|l| l.local_addr().expect("local addr"));
        let stop = CancellationToken::new();
        let task = spawn_server(
            &config,
            clock.clone(),
            admin_listener,
            gate,
            listener,
            &stop,
        )
        .await?;
        Ok(TestCistern {
            addr,
            admin_addr,
            config,
            clock,
            data: Some(data),
            stop,
            task: Some(task),
        })
    }

    /// Shuts down (see [`TestCistern::shutdown`]) and starts again over the same data
    /// directory, with the same config, clock and admin API, on new ports.
    pub async fn restart(self) -> TestCistern {
        self.restart_held(&LoadGate::default()).await
    }

    /// [`TestCistern::restart`], with the reference index's load held at `gate` until the
    /// test opens it (see [`CisternBuilder::reference_load_gate`]).
    pub async fn restart_held(self, gate: &LoadGate) -> TestCistern {
        let config = self.config.clone();
        let clock = self.clock.clone();
        let admin = self.admin_addr.is_some();
        let data = self.shutdown().await;
        match TestCistern::launch(data, config, clock, admin, gate.clone()).await {
            Ok(cistern) => cistern,
            Err(e) => panic!("cistern did not start again: {e:#}"),
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

    /// A client connecting from loopback address `ip` (127.0.0.x).
    pub fn client_from(&self, ip: &str) -> Client {
        Client::from_address(self.url(), ip.parse().expect("an IP address"))
    }

    /// GETs a blob (which must succeed) and waits for its commit: a client gets its last byte
    /// before the fsync and rename, and a test that then looks at the disk, or counts the
    /// upstream's requests, must not race them.
    pub async fn get_blob_committed(&self, repo: &str, digest: &str) -> bytes::Bytes {
        let got = self
            .client()
            .get_blob(repo, digest)
            .await
            .unwrap_or_else(|e| panic!("GET blob {digest} of {repo}: {e}"));
        self.data().wait_for_blob(digest, "the blob's commit").await;
        got
    }

    /// The admin API's base URL (the builder asked for [`CisternBuilder::admin`]).
    pub fn admin_url(&self) -> String {
        let addr = self.admin_addr.expect("started with .admin()");
        format!("http://{addr}")
    }

    /// A client of the admin API, without the token.
    pub fn admin_client(&self) -> Client {
        Client::new(self.admin_url())
    }

    /// The file that holds [`ADMIN_TOKEN`].
    pub fn admin_token_file(&self) -> &Path {
        self.config
            .admin
            .token_file
            .as_deref()
            .expect("started with .admin()")
    }

    /// An admin API request with the token.
    pub async fn admin(&self, method: Method, path: &str) -> Response {
        let client = self.admin_client();
        client
            .send(client.request(method, path).bearer_auth(ADMIN_TOKEN))
            .await
    }

    /// The value of one series of `/metrics` (`name` or `name{label="v"}`, as rendered), 0
    /// if it is not there (the builder asked for [`CisternBuilder::admin`]).
    pub async fn metric(&self, series: &str) -> f64 {
        let r = self.admin(Method::GET, "/metrics").await;
        assert_eq!(r.status, http::StatusCode::OK, "{}", r.body_text());
        r.body_text()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(name, _)| *name == series)
            .map_or(0.0, |(_, v)| {
                v.parse().expect("a sample's value is a number")
            })
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
            Err(_) => panic!("cistern did not stop within {limit:?} of shutdown"),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Ok(Err(join)) => panic!("cistern's task failed: {join}"),
            Ok(Ok(Err(e))) => panic!("cistern's run returned an error: {e:#}"),
            Ok(Ok(Ok(()))) => {}
        }
        self.data.take().expect("data dir present until shutdown")
    }
}

/// Starts the library on `listener` until `stop`. Errors that stop the start (a config the
/// library refuses, a certificate it cannot load, a data directory it cannot open) are
/// returned here, not at shutdown.
async fn spawn_server(
    config: &Config,
    clock: Option<Clock>,
    admin: Option<TcpListener>,
    gate: LoadGate,
    listener: TcpListener,
    stop: &CancellationToken,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let mut server = cistern::Server::builder(config.clone()).reference_load_gate(gate);
    if let Some(clock) = clock {
        server = server.clock(clock);
    }
    if let Some(admin) = admin {
        server = server.admin_listener(admin);
    }
    let server = server.build().await?;
    Ok(tokio::spawn(server.run(listener, stop.clone())))
}
