//! Harness for the end-to-end tests with real clients (see `tests/e2e_real_clients.rs`).
//!
//! - [`image`]: builds OCI images and OCI layout directories in Rust.
//! - [`daemon`]: child processes with Drop guards, free ports, bounded waits, a tiny HTTP client.
//! - [`registry`]: a private `docker-registry` (CNCF distribution 2.8) and its access log.
//! - [`cistern`]: the binary under test.
//! - [`containerd`]: a private containerd and `ctr`.
//! - [`skopeo`]: `skopeo` invocations.
//! - [`podman`]: a private podman (own storage and config files).
//! - [`dockerd`]: a private Docker daemon and the docker CLI.
//! - [`fixtures`]: the seeded images and what the clients must see.

pub mod cistern;
pub mod containerd;
pub mod daemon;
pub mod dockerd;
pub mod fixtures;
pub mod image;
pub mod podman;
pub mod registry;
pub mod skopeo;

use std::path::PathBuf;

use self::cistern::Cistern;
use self::fixtures::{Fixtures, Seeded};
use self::registry::Registry;
use self::skopeo::Skopeo;

/// Set by CI: missing tools (or missing root) fail the tests instead of skipping them.
pub const REQUIRE_ENV: &str = "CISTERN_REQUIRE_E2E";
/// Set to keep the temporary directories (logs, caches, client state) for inspection.
pub const KEEP_ENV: &str = "CISTERN_E2E_KEEP";

/// Finds `tool` in `PATH` (or, for root-only tools, the sbin directories, which `PATH` lacks
/// for non-login shells on Debian).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Effective user id, from `/proc/self/status` (no libc dependency needed).
pub fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Writes a line to the real stderr: the test harness captures `eprintln!`, but a skip or a
/// kept directory must be visible without `--nocapture`.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What a test that seeds a registry and pulls with skopeo needs.
pub const SKOPEO_TOOLS: &[&str] = &["skopeo", "docker-registry"];
/// What a test that seeds a registry and pulls with containerd needs (and root).
pub const CONTAINERD_TOOLS: &[&str] = &["skopeo", "docker-registry", "containerd", "ctr"];

/// Checks the prerequisites of one test. Returns `false` (after printing `SKIPPED: ...`) when
/// something is missing and `CISTERN_REQUIRE_E2E` is not `1`; panics when it is.
pub fn prerequisites(test: &str, tools: &[&str], need_root: bool) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| which(t).is_none())
        .map(|t| format!("{t} not installed"))
        .collect();
    if need_root && euid() != Some(0) {
        missing.push("not running as root (containerd needs root)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!(
            "{test}: {why}; {REQUIRE_ENV}=1 requires the end-to-end tests to run \
             (install the tools with scripts/install-test-deps)"
        );
    }
    say(&format!(
        "SKIPPED: {why} ({test}; install the tools with scripts/install-test-deps and run as root, or set {REQUIRE_ENV}=1 to fail instead)"
    ));
    false
}

/// Tails of the registries' and cistern's logs, for failure messages.
pub fn logs(registries: &[&Registry], cistern: Option<&Cistern>) -> String {
    let mut s = String::new();
    for r in registries {
        s.push_str(&r.daemon.tail(25));
        s.push('\n');
    }
    if let Some(c) = cistern {
        s.push_str(&c.daemon.tail(60));
        s.push('\n');
    }
    s
}

/// The start of every test: checks its prerequisites ([`prerequisites`]) and makes its
/// [`Workdir`], named after `short`. `None` if the test is to be skipped.
pub fn begin(test: &str, tools: &[&str], need_root: bool, short: &str) -> Option<Workdir> {
    prerequisites(test, tools, need_root).then(|| Workdir::new(short))
}

/// A private registry (under `work/registry`) seeded with [`fixtures::seed`], and the skopeo
/// (state under `work/skopeo`) that seeded it.
pub fn seeded_registry(work: &Workdir) -> (Registry, Skopeo, Fixtures) {
    let registry = Registry::start(&work.sub("registry"));
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    let rctx = || logs(&[&registry], None);
    let fx = fixtures::seed(&work.sub("images"), &skopeo, registry.addr, &rctx);
    (registry, skopeo, fx)
}

/// Seeds `registry` with the large image too ([`fixtures::seed_large`]).
pub fn seed_large(work: &Workdir, registry: &Registry, skopeo: &Skopeo) -> Seeded {
    let rctx = || logs(&[registry], None);
    fixtures::seed_large(&work.sub("images"), skopeo, registry.addr, &rctx)
}

/// A temporary directory for one test: removed at the end unless `CISTERN_E2E_KEEP=1`.
pub struct Workdir {
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

impl Workdir {
    pub fn new(test: &str) -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cistern-e2e-{test}-"))
            .tempdir()
            .expect("create temp dir");
        let path = dir.path().to_path_buf();
        Workdir {
            dir: Some(dir),
            path,
        }
    }

    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::env::var(KEEP_ENV).as_deref() == Ok("1")
            && let Some(dir) = self.dir.take()
        {
            say(&format!("{KEEP_ENV}=1: keeping {}", dir.keep().display()));
        }
    }
}
