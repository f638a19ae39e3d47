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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
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
