//! A whole cistern: start-up, serving, and graceful shutdown. [`Server`] is the library's one
//! entry point; the binary and the tests both build one with [`Server::builder`].
//!
//! ```no_run
//! # async fn example(config: cistern::Config) -> anyhow::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let server = cistern::Server::builder(config).build().await?;
//! server.run(listener, shutdown).await
//! # }
//! ```

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::cache::refs::LoadGate;
use crate::cache::{self, Cache, FillTasks};
use crate::clock::Clock;
use crate::config::Config;
use crate::server::access::AccessGate;
use crate::server::{self, App};
use crate::upstream::Routes;

/// What a server is made of before it is built: the config, and what tests or embedders
/// supply instead of the defaults.
pub struct ServerBuilder {
    config: Config,
    clock: Clock,
    admin_listener: Option<TcpListener>,
    load_gate: LoadGate,
}

impl ServerBuilder {
    /// Reads time from `clock` instead of the system's: tag ages, blob access times, breaker
    /// cool-downs and token lifetimes. Tests step a manual clock past a TTL, a lifetime or a
    /// cool-down instead of sleeping through it.
    pub fn clock(mut self, clock: Clock) -> ServerBuilder {
        self.clock = clock;
        self
    }

    /// Serves the admin API on this listener (tests bind `127.0.0.1:0`). Without one, the
    /// admin API listens on `admin.listen` if the config sets it.
    pub fn admin_listener(mut self, listener: TcpListener) -> ServerBuilder {
        self.admin_listener = Some(listener);
        self
    }

    /// Holds the reference index's start-up load at `gate` until the caller opens it, after
    /// it has read the files and before it merges them: tests make records during a load
    /// deterministically. Without one the load runs through.
    pub fn reference_load_gate(mut self, gate: LoadGate) -> ServerBuilder {
        self.load_gate = gate;
        self
    }

    /// Validates the config, reads the files it names (admin token, TLS certificate, upstream
    /// secrets), opens the cache (taking its lock) and indexes it. Every failure here names
    /// what is wrong, and nothing is served yet.
    pub async fn build(self) -> anyhow::Result<Server> {
        let ServerBuilder {
            config,
            clock,
            admin_listener,
            load_gate,
        } = self;
        let Prepared {
            admin_token,
            tls,
            routes,
            access,
        } = Prepared::from_config(&config, &clock)?;
        let admin_listener = match (admin_listener, config.admin.listen) {
            (Some(l), _) => Some(l),
            (None, Some(addr)) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("admin.listen: binding {addr}"))?,
            ),
            (None, None) => None,
        };
        // Fills outlive the requests that start them: their own tracker, and a token that
        // only the end of the grace period cancels.
        let fills = FillTasks {
            fills: TaskTracker::new(),
            cancel_fills: CancellationToken::new(),
        };
        let (fill_tracker, cancel_fills) = (fills.fills.clone(), fills.cancel_fills.clone());
        let cache = Arc::new(Cache::open_with_gate(&config, clock, fills, load_gate).await?);
        Ok(Server {
            config,
            cache,
            routes,
            access,
            tls,
            admin: admin_listener.map(|l| (l, admin_token)),
            fills: fill_tracker,
            cancel_fills,
        })
    }
}

/// Everything a config names, read and checked: what `build` needs besides the cache and
/// the listeners, and all that `cistern check-config` can check without them.
pub struct Prepared {
    admin_token: Option<String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    routes: Routes,
    access: Option<AccessGate>,
}

impl Prepared {
    /// Validates `config` and reads the files it names (admin token, TLS certificate and key,
    /// upstream secrets and CAs, htpasswd). Every error names its key.
    pub fn from_config(config: &Config, clock: &Clock) -> anyhow::Result<Prepared> {
        config.validate()?;
        let admin_token = match &config.admin.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        // HTTPS: loaded before anything else starts, so a bad certificate stops the start.
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => Some(server::tls::acceptor(cert, key)?),
            _ => None,
        };
        let routes = Routes::from_config(config, clock)?;
        let access = config.access.as_ref().map(AccessGate::load).transpose()?;
        Ok(Prepared {
            admin_token,
            tls,
            routes,
            access,
        })
    }
}

/// A cistern with its cache open, ready to serve.
pub struct Server {
    config: Config,
    cache: Arc<Cache>,
    routes: Routes,
    /// `[access]`, its users' passwords loaded.
    access: Option<AccessGate>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The admin API's listener and bearer token, if it is on.
    admin: Option<(TcpListener, Option<String>)>,
    fills: TaskTracker,
    cancel_fills: CancellationToken,
}

impl Server {
    pub fn builder(config: Config) -> ServerBuilder {
        ServerBuilder {
            config,
            clock: Clock::system(),
            admin_listener: None,
            load_gate: LoadGate::default(),
        }
    }

    /// Serves the registry API on `listener` (`config.listen` is not used: the caller binds)
    /// until `shutdown` is cancelled, then shuts down gracefully: stop accepting, let
    /// in-flight responses and cache fills finish for `config.shutdown_grace`, then cancel
    /// what is left (cancelled fills remove their partial files). Returns when everything
    /// has stopped.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let Server {
            config,
            cache,
            routes,
            access,
            tls,
            admin,
            fills,
            cancel_fills,
        } = self;
        let stop_eviction = CancellationToken::new();
        let eviction = tokio::spawn(cache::evict::run(
            cache.usage.clone(),
            cache.store.clone(),
            stop_eviction.clone(),
        ));
        let metadata_eviction = tokio::spawn(cache::evict::run_metadata(
            cache.metadata.clone(),
            cache.manifests.index().clone(),
            cache.usage.clone(),
            cache.store.clone(),
            stop_eviction.clone(),
        ));
        let app = Arc::new(App {
            cache: cache.clone(),
            access,
            routes,
            offline: config.offline,
        });

        let connections = TaskTracker::new();
        let abort_connections = CancellationToken::new();
        tracing::info!(
            listen = %listener.local_addr()?,
            tls = tls.is_some(),
            routes = %describe_routes(&config),
            data_dir = %config.data_dir.display(),
            blob_index = if cache.usage.is_loading() { "loading" } else { "loaded" },
            reference_index = if cache.manifests.index().is_loaded() { "loaded" } else { "loading" },
            "cistern serving"
        );
        let admin_loop = admin.map(|(admin_listener, token)| {
            if let Ok(addr) = admin_listener.local_addr() {
                tracing::info!(admin = %addr, token = token.is_some(), "admin API listening");
            }
            let api = Arc::new(server::admin::AdminApi {
                admin: Admin::new(cache.clone()),
                app: app.clone(),
                token,
            });
            tokio::spawn(server::accept_loop(
                admin_listener,
                api,
                shutdown.clone(),
                abort_connections.clone(),
                connections.clone(),
                None,
            ))
        });
        server::accept_loop(
            listener,
            app,
            shutdown,
            abort_connections.clone(),
            connections.clone(),
            tls,
        )
        .await;
        if let Some(admin_loop) = admin_loop {
            let _ = admin_loop.await;
        }

        tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining responses and fills");
        // Start-up loads still running stop after their current batch; they hold the store
        // (and the data directory's lock) until then.
        cache.stop_loading();
        stop_eviction.cancel();
        let _ = eviction.await;
        let _ = metadata_eviction.await;
        connections.close();
        fills.close();
        let drained = tokio::time::timeout(config.shutdown_grace, async {
            connections.wait().await;
            fills.wait().await;
        })
        .await
        .is_ok();
        if !drained {
            tracing::warn!(
                connections = connections.len(),
                fills = fills.len(),
                "grace period over: cancelling what is left"
            );
            abort_connections.cancel();
            cancel_fills.cancel();
            connections.wait().await;
            fills.wait().await;
        }
        cache.settled().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// The admin bearer token in `path`: trimmed, never empty.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("admin.token_file: {}", path.display()))?
        .trim()
        .to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "admin.token_file: {} is empty",
        path.display()
    );
    Ok(token)
}

/// The routes for the start-up log line: `registry (default) <- upstream, upstream; …`.
fn describe_routes(config: &Config) -> String {
    let routes: Vec<String> = config
        .resolved_routes()
        .iter()
        .map(|r| {
            let names: Vec<&str> = r.upstreams.iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "{}{} <- {}",
                r.registry,
                if r.default { " (default)" } else { "" },
                names.join(", ")
            )
        })
        .collect();
    routes.join("; ")
}
