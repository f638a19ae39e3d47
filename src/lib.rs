//! cistern: a pull-through caching proxy for OCI / Docker container registries.
//!
//! # Layout
//! Dependencies point one way: `server → cache → {upstream, storage}`; `api`, `oci`, `config`
//! and `error` are pure and used from anywhere.
//!
//! - [`config`]: TOML → validated [`Config`] with defaults.
//! - [`oci`]: digests, names, references, media types (pure).
//! - [`api`]: routes, header rules, OCI error bodies (pure).
//! - [`server`]: the accept loop, graceful shutdown, request handlers.
//! - [`cache`]: blob fills owned by the cache, readers that follow them, manifests.
//! - [`upstream`]: the upstream registry client.
//! - [`storage`]: content-addressed files, temp files, atomic commits.
//!
//! `docs/ARCHITECTURE.md` states the invariants.

pub mod api;
pub mod cache;
pub mod config;
pub mod error;
pub mod oci;
pub mod policy;
pub mod server;
pub mod storage;
pub mod upstream;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Runs the registry mirror on `listener` until `shutdown` is cancelled, then shuts down
/// gracefully: stop accepting, let in-flight responses and cache fills finish for
/// `config.shutdown_grace`, then cancel what is left (cancelled fills remove their partial
/// files). Returns when everything has stopped. `config.listen` is not used: the caller binds.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with_clock(listener, config, shutdown, cache::Clock::system()).await
}

/// [`run`], with tag answers dated by `clock` instead of the system's: tests step a manual
/// clock past a TTL instead of sleeping through it.
pub async fn run_with_clock(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
    clock: cache::Clock,
) -> anyhow::Result<()> {
    let admin = match config.admin.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("admin.listen: binding {addr}"))?,
        ),
        None => None,
    };
    serve(listener, admin, config, shutdown, clock).await
}

/// The run-time pins in `pins.json`. Digests, as written by earlier versions, are pins too;
/// an entry that is not a pin pattern is an error, naming it.
pub fn read_pins(store: &storage::DiskStore) -> std::io::Result<Vec<cache::pins::Pin>> {
    store
        .read_pins()?
        .iter()
        .map(|p| {
            cache::pins::Pin::parse(p).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("pins.json: {e}"))
            })
        })
        .collect()
}

/// [`run`], with the admin listener bound by the caller (`None`: no admin API). Tests use
/// this to bind both on `127.0.0.1:0`.
pub async fn run_with_admin(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve(
        listener,
        admin_listener,
        config,
        shutdown,
        cache::Clock::system(),
    )
    .await
}

async fn serve(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
    clock: cache::Clock,
) -> anyhow::Result<()> {
    config.validate()?;
    let admin_token = match &config.admin.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("admin.token_file: {}", path.display()))?
                .trim()
                .to_string();
            anyhow::ensure!(
                !token.is_empty(),
                "admin.token_file: {} is empty",
                path.display()
            );
            Some(token)
        }
        None => None,
    };
    // HTTPS: loaded before anything else starts, so a bad certificate stops the start.
    let tls = match (&config.tls.cert_file, &config.tls.key_file) {
        (Some(cert), Some(key)) => Some(server::tls::acceptor(cert, key)?),
        _ => None,
    };
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || storage::DiskStore::open(&data_dir))
        .await?
        .with_context(|| format!("opening the cache at {}", config.data_dir.display()))?;
    let store = Arc::new(store);
    let routes = upstream::Routes::from_config(&config)?;

    // The disk budget's index, built from what is on disk.
    let budget = config.cache.max_size.map(|max| {
        let max = max.as_u64() as f64;
        cache::evict::Budget {
            high: (max * config.cache.high_watermark) as u64,
            low: (max * config.cache.low_watermark) as u64,
        }
    });
    let usage = cache::evict::Usage::new(budget);
    usage.set_config_pins(config.cache.pin_patterns());
    {
        let (usage, store) = (usage.clone(), store.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            usage.set_pins(read_pins(&store)?);
            usage.load(&store)
        })
        .await?
        .context("indexing the cached blobs")?;
    }
    // Which manifests each repository and tag names, and what each manifest references:
    // rebuilt from the files at every start (see cache::refs).
    let started = std::time::Instant::now();
    let index = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || cache::refs::RefIndex::load(&store))
            .await?
            .context("indexing the cached manifests")?
    };
    let index = Arc::new(index);
    let (manifests, tags, links) = index.counts();
    tracing::info!(manifests, tags, links, elapsed = ?started.elapsed(), "reference index built");
    usage.attach_index(index.clone());
    let stop_eviction = CancellationToken::new();
    let eviction = tokio::spawn(cache::evict::run(
        usage.clone(),
        store.clone(),
        stop_eviction.clone(),
    ));

    // Fills outlive the requests that start them: their own tracker, and a token that only
    // the end of the grace period cancels.
    let fills = TaskTracker::new();
    let cancel_fills = CancellationToken::new();
    let app = Arc::new(server::App {
        blobs: cache::BlobCache::new(
            store.clone(),
            usage.clone(),
            fills.clone(),
            cancel_fills.clone(),
        ),
        manifests: cache::ManifestCache::with_index(
            store.clone(),
            &config.cache,
            config.offline,
            index,
            clock,
        ),
        routes,
        offline: config.offline,
    });

    let connections = TaskTracker::new();
    let abort_connections = CancellationToken::new();
    let registries: Vec<String> = config
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
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        routes = %registries.join("; "),
        data_dir = %config.data_dir.display(),
        cached_blobs = usage.len(),
        cached_bytes = usage.total(),
        "cistern serving"
    );
    let admin_loop = admin_listener.map(|admin_listener| {
        if let Ok(addr) = admin_listener.local_addr() {
            tracing::info!(admin = %addr, token = admin_token.is_some(), "admin API listening");
        }
        let admin = Arc::new(server::admin::Admin {
            app: app.clone(),
            usage: usage.clone(),
            store: store.clone(),
            token: admin_token,
            max_size: config.cache.max_size.map(|m| m.as_u64()),
            pin_writes: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(server::accept_loop(
            admin_listener,
            admin,
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
    stop_eviction.cancel();
    let _ = eviction.await;
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
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pins_json_of_earlier_versions_reads_as_digest_pins() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::DiskStore::open(dir.path()).unwrap();
        let d = crate::oci::Digest::of(b"layer");
        // What earlier versions wrote: a list of digests.
        std::fs::write(dir.path().join("pins.json"), format!("[\n  \"{d}\"\n]")).unwrap();
        let pins = super::read_pins(&store).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].exact_digest(), Some(d));
        // A pattern round-trips; an entry that is no pattern is an error naming the file.
        store
            .write_pins(&["docker.io/library/*:1.*".to_string()])
            .unwrap();
        assert_eq!(
            super::read_pins(&store).unwrap()[0].to_string(),
            "docker.io/library/*:1.*"
        );
        store.write_pins(&["alpine".to_string()]).unwrap();
        let e = super::read_pins(&store).unwrap_err();
        assert!(e.to_string().contains("pins.json"), "{e}");
    }
}
