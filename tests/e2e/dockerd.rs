//! A private Docker daemon (Debian's `docker.io`, dockerd 20.10) run as root, with the Docker
//! CLI from the same package (`/usr/bin/docker`; a newer CLI earlier in `PATH` would also work
//! by API version negotiation, but the pair is what Debian ships).
//!
//! Everything lives under a temp dir: `--data-root`, `--exec-root`, `--pidfile`,
//! `-H unix://DIR/docker.sock`, `--config-file DIR/daemon.json`, the CLI's `DOCKER_CONFIG`, the
//! trust key (`"deprecated-key-path"` in daemon.json, else `/etc/docker/key.json`), and `/run`
//! (dockerd runs in a private mount namespace with `DIR/run` bound over `/run`, else it creates
//! `/run/docker/plugins` on the host).
//! Flags that keep it off the host: `--storage-driver vfs` (plain copies, no mounts),
//! `--bridge none --iptables=false --ip6tables=false --ip-masq=false` (no docker0, no firewall
//! rules). dockerd starts its own *managed* containerd (config, socket and state under
//! `<exec-root>/containerd`, content under `<data-root>/containerd`) and stops it when it
//! exits on SIGTERM; no system containerd is needed or touched.
//!
//! `registry-mirrors` is used for docker.io images only, and dockerd falls back to Docker Hub
//! itself when the mirror fails. The daemon runs with `HTTPS_PROXY`/`HTTP_PROXY` pointing at a
//! loopback "trap" port given by the caller (Go never proxies loopback addresses, so the
//! mirror is reached directly): any attempt to reach Docker Hub lands on the trap, where the
//! test can see it, instead of on the internet.
#![allow(dead_code)] // not every test crate that declares `mod e2e` uses every helper

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::daemon::{Daemon, expect_success, run, run_ok, stdout_lines};

const PULL_LIMIT: Duration = Duration::from_secs(120);
const LIMIT: Duration = Duration::from_secs(30);

pub struct Dockerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    exec_root: PathBuf,
    pub daemon: Daemon,
}

/// The Docker CLI: Debian's `/usr/bin/docker` if present, else the first in `PATH`.
pub fn docker_cli() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/docker");
    if debian.exists() {
        debian
    } else {
        super::which("docker").expect("docker CLI")
    }
}

fn docker_cmd(dir: &Path, socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(docker_cli());
    c.arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .env("DOCKER_CONFIG", dir.join("cli-config"))
        .env_remove("DOCKER_HOST")
        .env_remove("DOCKER_CONTEXT");
    c
}

impl Dockerd {
    /// Starts dockerd with `settings` (a JSON object) as its `--config-file`; `proxy_trap` is
    /// the `127.0.0.1:PORT` its HTTP(S) proxy variables point at.
    pub fn start(dir: &Path, settings: serde_json::Value, proxy_trap: &str) -> Dockerd {
        std::fs::create_dir_all(dir).unwrap();
        for sub in ["data", "exec", "cli-config", "run"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let socket = dir.join("docker.sock");
        let config = dir.join("daemon.json");
        let mut settings = settings;
        // Its trust key, else written to /etc/docker/key.json (no command-line flag for it in
        // 20.10; the daemon.json key works).
        settings["deprecated-key-path"] = dir.join("key.json").display().to_string().into();
        std::fs::write(&config, serde_json::to_vec_pretty(&settings).unwrap()).unwrap();
        let exec_root = dir.join("exec");
        // dockerd 20.10 creates `/run/docker/plugins` whatever its --exec-root (the plugin
        // socket dir is hard-coded): it runs in a private mount namespace with `DIR/run` bound
        // over `/run`. `unshare` and `sh` exec into dockerd, so the child's PID is dockerd's.
        let mut cmd = Command::new(super::which("unshare").expect("unshare (util-linux)"));
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$1\" /run && shift && exec \"$@\"")
            .arg("sh")
            .arg(dir.join("run"))
            .arg(super::which("dockerd").unwrap());
        cmd.arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--config-file")
            .arg(&config)
            .args(["--storage-driver", "vfs", "--bridge", "none"])
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"]);
        let proxy = format!("http://{proxy_trap}");
        for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
            cmd.env(var, &proxy);
        }
        for var in ["NO_PROXY", "no_proxy", "DOCKER_HOST"] {
            cmd.env_remove(var);
        }
        let mut daemon = Daemon::spawn("dockerd", cmd, dir.join("dockerd.log"));
        let mut probe = docker_cmd(dir, &socket, &["version"]);
        daemon.wait_ready("`docker version` answers on the socket", || {
            socket.exists()
                && probe
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
        Dockerd {
            dir: dir.to_path_buf(),
            socket,
            exec_root,
            daemon,
        }
    }

    /// `docker -H unix://SOCK ARGS` with a private client config dir.
    pub fn docker(&self, args: &[&str]) -> Command {
        docker_cmd(&self.dir, &self.socket, args)
    }

    /// `docker pull REF`; the output whatever its status.
    pub fn pull_output(&self, reference: &str) -> std::process::Output {
        run(&mut self.docker(&["pull", reference]), PULL_LIMIT)
    }

    /// `docker pull REF`, which must succeed.
    pub fn pull(&self, reference: &str, ctx: &dyn Fn() -> String) {
        let out = self.pull_output(reference);
        let ctx = || format!("{}\n{}", self.daemon.tail(30), ctx());
        expect_success(&out, &format!("docker pull {reference}"), &ctx);
    }

    /// `docker image inspect --format FORMAT REF`, trimmed.
    pub fn inspect(&self, reference: &str, format: &str, ctx: &dyn Fn() -> String) -> String {
        let mut c = self.docker(&["image", "inspect", "--format", format, reference]);
        let ctx = || format!("{}\n{}", self.daemon.tail(30), ctx());
        let out = run_ok(&mut c, LIMIT, &ctx);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Image IDs known to this daemon (`docker images -q --no-trunc`).
    pub fn image_ids(&self, ctx: &dyn Fn() -> String) -> Vec<String> {
        let mut c = self.docker(&["images", "-q", "--no-trunc"]);
        stdout_lines(&run_ok(&mut c, LIMIT, ctx))
    }

    /// Stops dockerd (SIGTERM to its PID, which also stops its managed containerd), then makes
    /// sure that containerd is gone: if dockerd had to be killed, the containerd it started
    /// (identified by its PID file *and* its command line naming our exec-root) gets SIGKILL.
    pub fn stop(&mut self) {
        let pid_file = self.exec_root.join("containerd/containerd.pid");
        let managed = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        self.daemon.stop();
        let Some(pid) = managed else { return };
        let ours = || {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| {
                    String::from_utf8_lossy(&b).contains(&self.exec_root.display().to_string())
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ours() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if ours() {
            eprintln!("dockerd's managed containerd (pid {pid}) still running: killing it");
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}
