//! A private containerd 1.6 (its own root, state and sockets under a temp dir; the CRI plugin
//! and the snapshotters that need special filesystems disabled) driven with `ctr`.
//!
//! Registry access goes through a `--hosts-dir` directory, the containerd 1.5+ mirror
//! configuration (`<hosts-dir>/<registry>/hosts.toml`). Its `server` is a dead loopback port,
//! so if a mirror answer were refused containerd could fall back to nothing real: every byte
//! has to come from the one `[host."http://127.0.0.1:PORT"]` entry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::daemon::{Daemon, run_ok, stdout_lines};
use super::fixtures::Seeded;

const PULL_LIMIT: Duration = Duration::from_secs(90);
const LIMIT: Duration = Duration::from_secs(20);

pub struct Containerd {
    pub socket: PathBuf,
    /// `overlayfs` (containerd's default; works on this Debian 12 machine as root, the
    /// snapshotter's mount check passes on ext4 /tmp) when containerd reports that plugin
    /// `ok`, else `native` (plain copies, works anywhere).
    pub snapshotter: &'static str,
    pub daemon: Daemon,
}

/// One row of `ctr images check`.
#[derive(Debug, Clone)]
pub struct ImageStatus {
    pub reference: String,
    pub media_type: String,
    pub digest: String,
    /// e.g. `complete (4/4)`.
    pub status: String,
    pub unpacked: bool,
}

impl Containerd {
    pub fn start(dir: &Path) -> Containerd {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# CRI needs host setup (CNI, cgroups policy) and is not what these tests use; the other
# snapshotters need btrfs/zfs/devmapper/aufs and only add warnings to the log.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = "{dir}/debug.sock"
  level = "info"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{dir}/opt"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            dir = dir.display(),
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(super::which("containerd").unwrap());
        cmd.arg("--config").arg(&config_path);
        let mut daemon = Daemon::spawn("containerd", cmd, dir.join("containerd.log"));
        let probe_socket = socket.clone();
        daemon.wait_ready("ctr version answers on the socket", || {
            probe_socket.exists()
                && Command::new(super::which("ctr").unwrap())
                    .arg("--address")
                    .arg(&probe_socket)
                    .arg("version")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
        let mut ctd = Containerd {
            socket,
            snapshotter: "native",
            daemon,
        };
        let mut c = Command::new(super::which("ctr").unwrap());
        c.arg("--address").arg(&ctd.socket).args(["plugins", "ls"]);
        let out = run_ok(&mut c, LIMIT, &|| ctd.daemon.tail(30));
        let plugins = String::from_utf8_lossy(&out.stdout).into_owned();
        let overlay_ok = plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1")
                && f.get(1) == Some(&"overlayfs")
                && f.last() == Some(&"ok")
        });
        if overlay_ok {
            ctd.snapshotter = "overlayfs";
        } else {
            eprintln!("containerd: overlayfs snapshotter unavailable, using native:\n{plugins}");
        }
        ctd
    }

    pub fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new(super::which("ctr").unwrap());
        c.arg("--address")
            .arg(&self.socket)
            .arg("-n")
            .arg(namespace);
        c
    }

    /// The `ctr images pull --hosts-dir HOSTS [extra...] REF` command, for callers that run
    /// it with their own time limit or expect it to fail.
    pub fn pull_command(
        &self,
        namespace: &str,
        hosts_dir: &Path,
        extra: &[&str],
        reference: &str,
    ) -> Command {
        let mut c = self.ctr(namespace);
        c.args([
            "images",
            "pull",
            "--snapshotter",
            self.snapshotter,
            "--hosts-dir",
        ]);
        c.arg(hosts_dir);
        c.args(extra).arg(reference);
        c
    }

    /// `ctr images pull --hosts-dir HOSTS [extra...] REF`.
    pub fn pull(
        &self,
        namespace: &str,
        hosts_dir: &Path,
        extra: &[&str],
        reference: &str,
        ctx: &dyn Fn() -> String,
    ) -> String {
        let mut c = self.pull_command(namespace, hosts_dir, extra, reference);
        let ctx = || format!("{}\n{}", self.daemon.tail(30), ctx());
        let out = run_ok(&mut c, PULL_LIMIT, &ctx);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr images check`, parsed.
    pub fn check(&self, namespace: &str) -> Vec<ImageStatus> {
        let mut c = self.ctr(namespace);
        c.args(["images", "check", "--snapshotter", self.snapshotter]);
        let out = run_ok(&mut c, LIMIT, &|| self.daemon.tail(30));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // REF  TYPE  DIGEST  STATUS  SIZE  UNPACKED, where STATUS is e.g. "complete (4/4)" and
        // SIZE e.g. "3.0 MiB/3.0 MiB": split on whitespace and pick by position.
        text.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert!(
                    f.len() >= 6,
                    "unexpected `ctr images check` line: {l:?}\n{text}"
                );
                ImageStatus {
                    reference: f[0].to_string(),
                    media_type: f[1].to_string(),
                    digest: f[2].to_string(),
                    status: format!("{} {}", f[3], f[4]),
                    unpacked: *f.last().unwrap() == "true",
                }
            })
            .collect()
    }

    /// `ctr images check` must list `reference` as complete and unpacked, with `seeded`'s
    /// digest and media type.
    pub fn check_image(
        &self,
        namespace: &str,
        reference: &str,
        seeded: &Seeded,
        ctx: &dyn Fn() -> String,
    ) {
        let rows = self.check(namespace);
        let row = rows
            .iter()
            .find(|r| r.reference == reference)
            .unwrap_or_else(|| {
                panic!(
                    "{reference} not in `ctr images check`: {rows:#?}\n{}",
                    ctx()
                )
            });
        assert_eq!(
            row.digest,
            seeded.digest,
            "{reference}: digest in containerd\n{}",
            ctx()
        );
        assert_eq!(
            row.media_type, seeded.media_type,
            "{reference}: media type in containerd"
        );
        assert!(
            row.status.starts_with("complete"),
            "{reference}: {row:?}\n{}",
            ctx()
        );
        assert!(
            row.unpacked,
            "{reference} was not unpacked: {row:?}\n{}",
            ctx()
        );
    }

    /// Digests in the content store (`ctr content ls -q`), sorted.
    pub fn content(&self, namespace: &str) -> Vec<String> {
        let mut c = self.ctr(namespace);
        c.args(["content", "ls", "-q"]);
        let out = run_ok(&mut c, LIMIT, &|| self.daemon.tail(30));
        let mut v = stdout_lines(&out);
        v.sort();
        v
    }
}

/// Writes `<dir>/<registry>/hosts.toml` sending pulls of `registry` to `mirror` (plain HTTP)
/// with `server` set to a port nothing listens on.
pub fn hosts_dir(dir: &Path, registry: &str, mirror: &str, dead_port: u16) -> PathBuf {
    hosts_dir_with_headers(dir, registry, mirror, dead_port, &[])
}

/// [`hosts_dir`] with `headers` in the mirror's `[host."http://MIRROR".header]` table, which
/// containerd sends with every request to it (e.g. `authorization = "Basic ..."`).
pub fn hosts_dir_with_headers(
    dir: &Path,
    registry: &str,
    mirror: &str,
    dead_port: u16,
    headers: &[(&str, &str)],
) -> PathBuf {
    let reg_dir = dir.join(registry);
    std::fs::create_dir_all(&reg_dir).unwrap();
    let mut toml = format!(
        "server = \"http://127.0.0.1:{dead_port}\"\n\n\
         [host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    );
    if !headers.is_empty() {
        toml.push_str(&format!("  [host.\"http://{mirror}\".header]\n"));
        for (name, value) in headers {
            toml.push_str(&format!("    {name} = {value:?}\n"));
        }
    }
    std::fs::write(reg_dir.join("hosts.toml"), toml).unwrap();
    dir.to_path_buf()
}
