//! A private `podman` (4.3): every invocation gets its own storage (`--root`, `--runroot`,
//! `--storage-driver vfs`, `--tmpdir`) and its own configuration files through the
//! environment (`CONTAINERS_REGISTRIES_CONF`, `CONTAINERS_STORAGE_CONF`, `CONTAINERS_CONF`,
//! `REGISTRY_AUTH_FILE`, `HOME` and the `XDG_*` dirs), all in a temp dir, plus its own
//! signature policy: nothing on the host (`/etc/containers`, `/var/lib/containers`, `~`) is read
//! or written.
//!
//! Registry access goes through a private `registries.conf` (v2 format): the pulled prefix
//! (`docker.io`) has `location` = a loopback port nothing answers on, and one
//! `[[registry.mirror]]` (`insecure = true`: plain HTTP) — every byte has to come from the
//! mirror.
#![allow(dead_code)] // not every test crate that declares `mod e2e` uses every helper

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::{expect_success, run, run_ok, stdout_lines};

const PULL_LIMIT: Duration = Duration::from_secs(120);
const LIMIT: Duration = Duration::from_secs(30);

/// Writes a `registries.conf` sending pulls of `prefix` to `mirror` (plain HTTP), with the
/// registry's own `location` set to `127.0.0.1:<dead_port>`. Returns its path.
pub fn registries_conf(dir: &Path, prefix: &str, mirror: &str, dead_port: u16) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("registries.conf");
    std::fs::write(
        &path,
        format!(
            "unqualified-search-registries = []\n\
             short-name-mode = \"enforcing\"\n\n\
             [[registry]]\n\
             prefix = \"{prefix}\"\n\
             location = \"127.0.0.1:{dead_port}\"\n\n\
             [[registry.mirror]]\n\
             location = \"{mirror}\"\n\
             insecure = true\n"
        ),
    )
    .unwrap();
    path
}

/// One private podman "installation": storage and configuration under `dir`.
pub struct Podman {
    pub dir: PathBuf,
    pub root: PathBuf,
    /// `--runroot`: podman 4.3 refuses one longer than 50 characters ("the specified runroot
    /// is longer than 50 characters"), so it is a short temp dir of its own, `/tmp/cistern-pr-*`.
    runroot: tempfile::TempDir,
    registries_conf: PathBuf,
    policy: PathBuf,
}

impl Podman {
    /// Fresh (empty) storage under `dir`; registry configuration from `registries_conf`.
    pub fn new(dir: &Path, registries_conf: &Path) -> Podman {
        std::fs::create_dir_all(dir).unwrap();
        let root = dir.join("root");
        let runroot = tempfile::Builder::new()
            .prefix("cistern-pr-")
            .tempdir_in("/tmp")
            .expect("create podman runroot");
        for sub in ["root", "tmp", "home", "config", "data", "xdg-run"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // XDG_RUNTIME_DIR must be private to the user (podman checks its owner).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("xdg-run"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                runroot.path().display(),
                root.display()
            ),
        )
        .unwrap();
        // The network backend is pinned to CNI with a private config dir: podman 4.3's netavark
        // backend (the default) creates `/run/containers/networks` on the host even for a pull.
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{}\"\ntmp_dir = \"{}\"\n\n\
                 [network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\n",
                dir.join("events.log").display(),
                dir.join("tmp").display(),
                dir.join("networks").display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("auth.json"), "{}").unwrap();
        let policy = dir.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        Podman {
            dir: dir.to_path_buf(),
            root,
            runroot,
            registries_conf: registries_conf.to_path_buf(),
            policy,
        }
    }

    /// `podman --root .. --runroot .. --storage-driver vfs --tmpdir .. ARGS` with the private
    /// environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(super::which("podman").unwrap());
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(self.runroot.path())
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file", "--tmpdir"])
            .arg(self.dir.join("tmp"))
            .args(args);
        c.env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("REGISTRY_AUTH_FILE", self.dir.join("auth.json"))
            .env("HOME", self.dir.join("home"))
            .env("XDG_CONFIG_HOME", self.dir.join("config"))
            .env("XDG_DATA_HOME", self.dir.join("data"))
            .env("XDG_RUNTIME_DIR", self.dir.join("xdg-run"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env_remove("CONTAINER_HOST")
            .env_remove("DOCKER_HOST");
        c
    }

    /// `podman pull [extra..] REF` with our signature policy; returns the command's output
    /// whatever its status (the caller decides).
    pub fn pull_output(&self, reference: &str, extra: &[&str]) -> std::process::Output {
        let mut c = self.cmd(&["pull"]);
        c.arg("--signature-policy").arg(&self.policy);
        c.args(extra).arg(reference);
        run(&mut c, PULL_LIMIT)
    }

    /// `podman pull [extra..] REF`, which must succeed.
    pub fn pull(&self, reference: &str, extra: &[&str], ctx: &dyn Fn() -> String) {
        let out = self.pull_output(reference, extra);
        expect_success(&out, &format!("podman pull {reference}"), ctx);
    }

    /// `podman image inspect --format FORMAT REF`, trimmed.
    pub fn inspect(&self, reference: &str, format: &str, ctx: &dyn Fn() -> String) -> String {
        let mut c = self.cmd(&["image", "inspect", "--format", format, reference]);
        let out = run_ok(&mut c, LIMIT, ctx);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Image IDs in this storage (`podman images -q --no-trunc`).
    pub fn image_ids(&self, ctx: &dyn Fn() -> String) -> Vec<String> {
        let mut c = self.cmd(&["images", "-q", "--no-trunc"]);
        stdout_lines(&run_ok(&mut c, LIMIT, ctx))
    }
}
