//! The `cistern` binary: flags, config, logging, signals. Everything else is in the library.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cistern::Config;
use cistern::config::LogFormat;

#[derive(Parser)]
#[command(
    version,
    about = "A pull-through caching proxy for container registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry mirror (the default when no command is given).
    Serve(ServeArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Re-hash every cached blob and manifest of a stopped cache and remove the ones that do
    /// not match their digest. Exits 1 if it found (and removed) any.
    Verify(VerifyArgs),
    /// Cache administration: against a running server's admin API (--url, or [admin] listen
    /// in --config), or directly on a stopped cache directory (--data-dir).
    Admin(AdminArgs),
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The running server's admin API, e.g. http://127.0.0.1:5001.
    #[arg(long)]
    url: Option<String>,
    /// File holding the admin bearer token (default: [admin] token_file from --config).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Config file: its [admin] listen is the API to use, else its data_dir.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Work directly on this stopped cache directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    action: AdminAction,
}

#[derive(Subcommand, Clone)]
enum AdminAction {
    /// Cache size, entries, hit ratio.
    Stats,
    /// Remove a blob from the cache.
    PurgeBlob { digest: String },
    /// Remove a manifest from the cache.
    PurgeManifest { digest: String },
    /// Remove a repository's tags and links, then the manifests and blobs nothing else uses.
    PurgeRepo {
        /// <registry>/<repository>, e.g. docker.io/library/alpine.
        repository: String,
    },
    /// Remove a tag's records, then the manifests and blobs nothing else uses.
    PurgeTag {
        /// <registry>/<repository>:<tag>, e.g. docker.io/library/alpine:3.20.
        tag: String,
    },
    /// Never evict what this pattern names.
    Pin {
        /// sha256:<hex>, <registry>/<repository> or <registry>/<repository>:<tag>, with * and
        /// ? globs.
        pattern: String,
    },
    /// Remove a pin made with `pin`.
    Unpin { pattern: String },
    /// List the pins.
    Pins,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// TOML config file naming the data directory.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The data directory (overrides the config's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML config file; without it the embedded defaults are used (see config.example.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides `listen` from the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Overrides `data_dir` from the config.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::CheckConfig { file } => check_config(&file).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve(args).map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => verify(args),
        Command::Admin(args) => admin(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cistern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    println!("{}: ok", file.display());
    println!("{config:#?}");
    Ok(())
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if !config.data_dir.is_dir() {
        anyhow::bail!("data_dir {} does not exist", config.data_dir.display());
    }
    // Opening takes the cache's lock: a running server's cache is refused, not raced.
    let store = cistern::storage::DiskStore::open(&config.data_dir)
        .with_context(|| format!("opening the cache at {}", config.data_dir.display()))?;
    let report = store.verify(|_| {})?;
    for (path, why) in &report.removed {
        println!("removed {}: {why}", path.display());
    }
    println!(
        "{}: {} blobs ({}) and {} manifests verified; {} files removed",
        config.data_dir.display(),
        report.blobs_ok,
        bytesize::ByteSize::b(report.blob_bytes),
        report.manifests_ok,
        report.removed.len()
    );
    Ok(if report.removed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Some(Config::load(path)?),
        None => None,
    };
    let url = args.url.clone().or_else(|| {
        if args.data_dir.is_some() {
            return None;
        }
        config
            .as_ref()
            .and_then(|c| c.admin.listen)
            .map(|a| format!("http://{a}"))
    });
    if let Some(url) = url {
        let token_file = args
            .token_file
            .clone()
            .or_else(|| config.as_ref().and_then(|c| c.admin.token_file.clone()));
        return admin_remote(&url, token_file.as_deref(), &args.action);
    }
    let dir = args
        .data_dir
        .clone()
        .or_else(|| config.as_ref().map(|c| c.data_dir.clone()))
        .ok_or_else(|| anyhow::anyhow!("give --url, --data-dir or --config"))?;
    let config_pins = config
        .as_ref()
        .map(|c| c.cache.pin_patterns())
        .unwrap_or_default();
    admin_local(&dir, &args.action, &config_pins)
}

fn admin_request(action: &AdminAction) -> anyhow::Result<(reqwest::Method, String)> {
    let parse = |d: &str| cistern::oci::Digest::parse(d).map_err(|e| anyhow::anyhow!("{e}"));
    let pin = |p: &str| {
        let pin = cistern::cache::pins::Pin::parse(p).map_err(|e| anyhow::anyhow!("{e}"))?;
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("pattern", &pin.to_string())
            .finish();
        anyhow::Ok(format!("admin/pins?{query}"))
    };
    Ok(match action {
        AdminAction::Stats => (reqwest::Method::GET, "admin/stats".into()),
        AdminAction::Pins => (reqwest::Method::GET, "admin/pins".into()),
        AdminAction::PurgeBlob { digest } => (
            reqwest::Method::DELETE,
            format!("admin/blobs/{}", parse(digest)?),
        ),
        AdminAction::PurgeManifest { digest } => (
            reqwest::Method::DELETE,
            format!("admin/manifests/{}", parse(digest)?),
        ),
        AdminAction::PurgeRepo { .. } | AdminAction::PurgeTag { .. } => {
            let target = purge_target(action)?;
            let path = match &target {
                cistern::cache::refs::Target::Repository(k) => format!("admin/repositories/{k}"),
                cistern::cache::refs::Target::Tag(k, t) => format!("admin/tags/{k}:{t}"),
            };
            (reqwest::Method::DELETE, path)
        }
        AdminAction::Pin { pattern } => (reqwest::Method::PUT, pin(pattern)?),
        AdminAction::Unpin { pattern } => (reqwest::Method::DELETE, pin(pattern)?),
    })
}

/// The repository or tag a purge names, checked as the admin API checks it.
fn purge_target(action: &AdminAction) -> anyhow::Result<cistern::cache::refs::Target> {
    use cistern::cache::refs::Target;
    use cistern::server::admin::repo_key;
    let key = |s: &str| repo_key(s).map_err(|e| anyhow::anyhow!("{s:?}: {}", e.message));
    match action {
        AdminAction::PurgeRepo { repository } => Ok(Target::Repository(key(repository)?)),
        AdminAction::PurgeTag { tag } => {
            let (repo, t) = tag
                .rsplit_once(':')
                .ok_or_else(|| anyhow::anyhow!("{tag:?}: give <registry>/<repository>:<tag>"))?;
            let t = cistern::oci::Tag::parse(t).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Target::Tag(key(repo)?, t.to_string()))
        }
        _ => anyhow::bail!("not a purge by repository or tag"),
    }
}

fn admin_remote(
    url: &str,
    token_file: Option<&std::path::Path>,
    action: &AdminAction,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (method, path) = admin_request(action)?;
    let base = reqwest::Url::parse(&format!("{}/", url.trim_end_matches('/')))
        .with_context(|| format!("--url {url:?}"))?;
    let target = base.join(&path)?;
    let token = match token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut request = reqwest::Client::new().request(method, target.clone());
        if let Some(t) = &token {
            request = request.bearer_auth(t);
        }
        let resp = request.send().await.with_context(|| format!("{target}"))?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            anyhow::bail!("{target}: {status}: {body}");
        }
        println!("{body}");
        Ok(())
    })
}

/// The admin actions on a stopped cache. `config_pins`: the config's `cache.pins` (known only
/// with --config), which purges respect as the server does.
fn admin_local(
    dir: &std::path::Path,
    action: &AdminAction,
    config_pins: &[cistern::cache::pins::Pin],
) -> anyhow::Result<()> {
    use cistern::cache::pins::Pin;
    if !dir.is_dir() {
        anyhow::bail!("data_dir {} does not exist", dir.display());
    }
    // Taking the lock refuses a cache a server is using: use --url for that one.
    let store = cistern::storage::DiskStore::open(dir)
        .with_context(|| format!("opening the cache at {}", dir.display()))?;
    let parse = |d: &str| cistern::oci::Digest::parse(d).map_err(|e| anyhow::anyhow!("{e}"));
    let strings = |pins: &[Pin]| -> Vec<String> { pins.iter().map(Pin::to_string).collect() };
    match action {
        AdminAction::Stats => {
            let blobs = store.list_blobs()?;
            let bytes: u64 = blobs.iter().map(|(_, size, _)| size).sum();
            let value = serde_json::json!({
                "blobs": blobs.len(),
                "blob_bytes": bytes,
                "pins": store.read_pins()?.len(),
            });
            println!("{value}");
        }
        AdminAction::Pins => {
            let pins = cistern::read_pins(&store)?;
            println!(
                "{}",
                serde_json::json!({ "pins": strings(&pins), "config": strings(config_pins) })
            );
        }
        AdminAction::PurgeBlob { digest } => {
            store.remove_blob(&parse(digest)?)?;
            println!("{}", serde_json::json!({ "purged": digest }));
        }
        AdminAction::PurgeManifest { digest } => {
            store.remove_manifest(&parse(digest)?)?;
            println!("{}", serde_json::json!({ "purged": digest }));
        }
        AdminAction::PurgeRepo { .. } | AdminAction::PurgeTag { .. } => {
            let target = purge_target(action)?;
            let index = cistern::cache::refs::RefIndex::load(&store)?;
            let mut pins = config_pins.to_vec();
            pins.extend(cistern::read_pins(&store)?);
            let plan = index.plan_purge(&target, &pins);
            if !plan.found() {
                anyhow::bail!("{target}: nothing of it is cached in {}", dir.display());
            }
            let report = cistern::cache::refs::execute(&store, &plan)?;
            println!("{}", cistern::server::admin::purge_answer(&target, &report));
        }
        AdminAction::Pin { pattern } | AdminAction::Unpin { pattern } => {
            let p = Pin::parse(pattern).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut pins = cistern::read_pins(&store)?;
            let pin = matches!(action, AdminAction::Pin { .. });
            let had = pins.contains(&p);
            pins.retain(|x| *x != p);
            if pin {
                pins.push(p.clone());
            }
            pins.sort();
            store.write_pins(&strings(&pins))?;
            println!(
                "{}",
                serde_json::json!({ "pattern": p.to_string(), "changed": had != pin })
            );
        }
    }
    Ok(())
}

/// glibc malloc, tuned for a proxy that moves buffers between threads:
/// - each thread that allocates gets its own arena (up to 8 per core), and each keeps what it
///   freed: buffers allocated on one thread and freed on another only raise the peak RSS, and
///   two arenas are enough for two allocating pools;
/// - by default, freed memory above 128 KiB at the top of a heap goes back to the kernel, and
///   buffers of 128 KiB or more get their own mmap: the upstream client's receive buffers
///   then cost a fresh mmap and a page fault per page, every time. A fixed 4 MiB mmap
///   threshold keeps them in the heap (cold 200 MiB GETs 0.34 -> 0.26 s). The trim
///   threshold decides how much freed heap stays mapped: 128 KiB made cold GETs 20 % slower
///   again, 8 MiB cost 3-5 MiB of peak RSS with 50 clients on one cold blob, 1 MiB cost
///   neither (measured in docs/BENCHMARKS.md).
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Gives freed heap back to the kernel once a burst of requests is over.
///
/// glibc returns memory only from the top of a heap (and `M_TRIM_THRESHOLD` only on `free`),
/// so after a burst of a hundred clients the arenas keep ~15 MiB of which under 1 MiB is in
/// use: the next burst's peak starts from there. `malloc_trim(0)` also releases the free
/// pages inside the heaps. It is run when a burst is over (the first quiet second after
/// requests started or ended), never mid-burst, and takes well under a few milliseconds.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_heap_when_settled() {
    use cistern::server::activity::{Settle, events};
    let mut settle = Settle::new(30);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if settle.tick(events()) {
            let trimmed = tokio::task::spawn_blocking(|| {
                let started = std::time::Instant::now();
                // SAFETY: malloc_trim only releases free memory; any thread may call it.
                unsafe { libc::malloc_trim(0) };
                started.elapsed()
            })
            .await;
            if let Ok(elapsed) = trimmed {
                tracing::debug!(?elapsed, "gave freed heap back to the kernel");
            }
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    config.validate()?;
    init_tracing(&config);
    if args.config.is_none() {
        tracing::info!("no --config given: using the embedded defaults");
    }
    tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work is short (a pread of one chunk, an open, a commit); fill writers have
        // their own threads. tokio's default of 512 threads only grows memory under load.
        .max_blocking_threads(64)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        tokio::spawn(trim_heap_when_settled());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        cistern::run(listener, config, shutdown).await
    })
}

fn init_tracing(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Cancels `shutdown` on SIGINT (Ctrl-C) or SIGTERM.
async fn on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            None
        }
    };
    let term = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        () = term => tracing::info!("SIGTERM received"),
    }
    shutdown.cancel();
}
