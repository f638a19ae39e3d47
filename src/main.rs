//! The `cistern` binary: flags, config, logging, signals. Everything else is in the library.

// As in the library (see `src/lib.rs`): no panic reachable from input outside tests.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cistern::Config;
use cistern::admin;
use cistern::cache::{Cache, FillTasks};
use cistern::clock::Clock;
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
    /// Validate a config file, check the files it names, and summarise it (secrets shown as
    /// <set>). Exits non-zero if `serve` would refuse it.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
        /// Print the result as JSON: {"ok": true, "summary": {...}} or {"ok": false, "errors": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every cached blob and manifest of a stopped cache and remove the ones that do
    /// not match their digest. Exits 1 if it found (and removed) any.
    Verify(VerifyArgs),
    /// Cache administration: against a running server's admin API (--url, or [admin] listen
    /// in --config), or directly on a stopped cache directory (--data-dir).
    Admin(AdminArgs),
    /// Write images from a stopped cache as an OCI image layout: a directory, or a tar of one
    /// when OUT ends in .tar (read by `skopeo copy oci:OUT:TAG`, `podman pull oci-archive:…`).
    Export(ExportArgs),
    /// Read an OCI image layout (a directory, or a tar of one when IN ends in .tar) into a
    /// stopped cache, verifying every blob and manifest, and record the tags it names.
    Import(ImportArgs),
}

#[derive(clap::Args)]
struct ImportArgs {
    /// TOML config file: its data_dir and cache.max_manifest_size.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The stopped cache's data directory (overrides the config's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The registry of images whose names in the layout carry none.
    #[arg(long, default_value = "docker.io")]
    registry: String,
    /// The repository prefix of names that carry no registry (`app:1` with `--prefix team` is
    /// `<registry>/team/app:1`); for a layout naming images by tag alone, the repository.
    #[arg(long)]
    prefix: Option<String>,
    /// The layout: a directory, or a tar of one (a name ending in .tar).
    input: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// TOML config file: its data_dir, and its default route's registry for references that
    /// name none.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The stopped cache's data directory (overrides the config's).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The layout to write; it must not exist yet. A name ending in .tar writes a tar.
    #[arg(long, short)]
    output: PathBuf,
    /// A file of references, one a line (# starts a comment).
    #[arg(long = "file", short = 'f')]
    list: Option<PathBuf>,
    /// Images: registry/repository:tag or registry/repository@sha256:… (no registry: the
    /// default route's, docker.io without a config).
    refs: Vec<String>,
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
        Command::CheckConfig { file, json } => check_config(&file, json),
        Command::Serve(args) => serve(args).map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => verify(args),
        Command::Admin(args) => admin(args).map(|()| ExitCode::SUCCESS),
        Command::Export(args) => export(args).map(|()| ExitCode::SUCCESS),
        Command::Import(args) => import(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cistern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let problems = match Config::load(file) {
        Err(e) => vec![format!("{e:#}")],
        Ok(config) => {
            // Every missing or unreadable file at once; then what `serve` checks in them.
            let mut problems: Vec<String> = config
                .referenced_files()
                .into_iter()
                .filter_map(|(key, path)| {
                    std::fs::File::open(&path)
                        .err()
                        .map(|e| format!("{key}: {}: {e}", path.display()))
                })
                .collect();
            if problems.is_empty()
                && let Err(e) = cistern::Prepared::from_config(&config, &Clock::system())
            {
                problems.push(format!("{e:#}"));
            }
            if problems.is_empty() {
                let summary = config.summary();
                let text = if json {
                    serde_json::json!({ "ok": true, "summary": summary }).to_string()
                } else {
                    format!("{}: ok\n{}", file.display(), summary.to_string().trim_end())
                };
                print_out(&text)?;
                return Ok(ExitCode::SUCCESS);
            }
            problems
        }
    };
    if json {
        print_out(&serde_json::json!({ "ok": false, "errors": problems }).to_string())?;
    } else {
        for p in &problems {
            eprintln!("{}: {p}", file.display());
        }
    }
    Ok(ExitCode::FAILURE)
}

/// Prints a line to stdout. A closed stdout (`cistern check-config … | head`) ends the output
/// quietly instead of panicking, as `println!` would.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
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
        print_out(&format!("removed {}: {why}", path.display()))?;
    }
    print_out(&format!(
        "{}: {} blobs ({}) and {} manifests verified; {} files removed",
        config.data_dir.display(),
        report.blobs_ok,
        bytesize::ByteSize::b(report.blob_bytes),
        report.manifests_ok,
        report.removed.len()
    ))?;
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
    let op = args.action.op()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
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
        let answer = runtime.block_on(admin::remote::call(&url, token_file.as_deref(), &op))?;
        print_out(&answer)?;
        return Ok(());
    }
    // A stopped cache, opened as a server opens it: taking its lock, so a cache a server is
    // using is refused (use --url for that one), and with the config's pins if given.
    let mut config = config.unwrap_or_default();
    match args.data_dir {
        Some(dir) => config.data_dir = dir,
        None if args.config.is_none() => anyhow::bail!("give --url, --data-dir or --config"),
        None => {}
    }
    if !config.data_dir.is_dir() {
        anyhow::bail!("data_dir {} does not exist", config.data_dir.display());
    }
    let answer = runtime.block_on(async {
        let cache = Cache::open(&config, Clock::system(), FillTasks::default()).await?;
        // On a stopped cache, answer as a server would once started up: with every blob and
        // the whole reference graph indexed.
        cache.loaded().await?;
        let answer = admin::Admin::new(Arc::new(cache)).apply(&op).await?;
        anyhow::Ok(answer)
    })?;
    print_out(&answer.to_string())?;
    Ok(())
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let default_registry = config
        .resolved_routes()
        .into_iter()
        .find(|r| r.default)
        .map(|r| r.registry)
        .unwrap_or_default();
    let mut refs = args.refs;
    if let Some(list) = &args.list {
        let text =
            std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
        refs.extend(cistern::layout::parse_list(&text));
    }
    if refs.is_empty() {
        anyhow::bail!("name at least one image (REF... or -f LIST)");
    }
    let images = refs
        .iter()
        .map(|r| cistern::layout::ImageRef::parse(r, &default_registry))
        .collect::<Result<Vec<_>, String>>()
        .map_err(anyhow::Error::msg)?;
    if !config.data_dir.is_dir() {
        anyhow::bail!("data_dir {} does not exist", config.data_dir.display());
    }
    // Opening takes the cache's lock, as `verify` and `admin --data-dir` do: a cache a running
    // server is filling is refused, not read half-written.
    let store = cistern::storage::DiskStore::open(&config.data_dir)
        .with_context(|| format!("opening the cache at {}", config.data_dir.display()))?;
    let report = cistern::layout::export(&store, &images, &args.output)?;
    print_out(&format!(
        "{}: {} images, {} manifests and {} blobs ({})",
        args.output.display(),
        report.images,
        report.manifests,
        report.blobs,
        bytesize::ByteSize::b(report.bytes)
    ))
}

fn import(args: ImportArgs) -> anyhow::Result<()> {
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
    // Opening takes the cache's lock: a cache a running server is using is refused.
    let store = cistern::storage::DiskStore::open(&config.data_dir)
        .with_context(|| format!("opening the cache at {}", config.data_dir.display()))?;
    let options = cistern::layout::ImportOptions {
        registry: args.registry,
        prefix: args.prefix,
        max_manifest_size: config.cache.max_manifest_size.as_u64(),
    };
    let report = cistern::layout::import(&store, &args.input, &options)
        .with_context(|| format!("importing {}", args.input.display()))?;
    for note in &report.unnamed {
        print_out(&format!("note: {note}"))?;
    }
    print_out(&format!(
        "{}: {} images ({} tags); {} manifests and {} blobs ({}) imported, {} manifests and {} blobs ({}) already cached",
        args.input.display(),
        report.images,
        report.tags,
        report.manifests,
        report.blobs,
        bytesize::ByteSize::b(report.blob_bytes),
        report.manifests_cached,
        report.blobs_cached,
        bytesize::ByteSize::b(report.cached_bytes),
    ))
}

impl AdminAction {
    /// The operation, checked as the admin API checks it.
    fn op(&self) -> anyhow::Result<admin::Op> {
        use admin::Op;
        Ok(match self {
            AdminAction::Stats => Op::Stats,
            AdminAction::Pins => Op::Pins,
            AdminAction::PurgeBlob { digest } => Op::PurgeBlob(admin::parse_digest(digest)?),
            AdminAction::PurgeManifest { digest } => {
                Op::PurgeManifest(admin::parse_digest(digest)?)
            }
            AdminAction::PurgeRepo { repository } => {
                Op::Purge(admin::repository_target(repository)?)
            }
            AdminAction::PurgeTag { tag } => Op::Purge(admin::tag_target(tag)?),
            AdminAction::Pin { pattern } => Op::Pin(admin::parse_pin(pattern)?),
            AdminAction::Unpin { pattern } => Op::Unpin(admin::parse_pin(pattern)?),
        })
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
    cistern::server::heap::tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work is short (a pread of one chunk, an open, a commit); fill writers have
        // their own threads. tokio's default of 512 threads only grows memory under load.
        .max_blocking_threads(64)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        tokio::spawn(cistern::server::heap::trim_when_settled());
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        let server = cistern::Server::builder(config).build().await?;
        server.run(listener, shutdown).await
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
