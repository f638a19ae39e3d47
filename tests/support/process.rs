//! The cistern binary as a child process, for tests that need a real process: one to kill
//! with SIGKILL, or one to run in a mount namespace of its own.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::client::Client;
use super::config::config_text;

/// A running cistern binary, killed (SIGKILL) and reaped when dropped.
pub struct ChildCistern {
    child: Child,
    pub url: String,
    /// Where its stderr goes, if the test captured it: printed if it dies during start-up.
    log: Option<PathBuf>,
}

/// A free port on 127.0.0.1 for a child to listen on. (The window between picking it and the
/// child binding it is harmless here: nothing else on the machine is told to use it.)
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ChildCistern {
    /// The binary on a free port with its cache in `data`, in front of `upstream`: its config
    /// file (the text [`super::config::config_text`] writes for `TestCistern` too) goes beside
    /// `data`, and `command` turns that file's path into the command to spawn (the binary, or
    /// a wrapper that execs it). Its stderr goes to `log`, or to the test's. Waits until
    /// `/v2/` answers.
    pub async fn start(
        upstream: &str,
        data: &Path,
        log: Option<PathBuf>,
        command: impl FnOnce(&Path) -> Command,
    ) -> ChildCistern {
        ChildCistern::start_with(upstream, data, "", log, command).await
    }

    /// [`ChildCistern::start`] with `extra` (TOML tables, e.g. `"[cache]\nmax_size = ..."`)
    /// appended to the config file.
    pub async fn start_with(
        upstream: &str,
        data: &Path,
        extra: &str,
        log: Option<PathBuf>,
        command: impl FnOnce(&Path) -> Command,
    ) -> ChildCistern {
        let port = free_port();
        let config = data
            .parent()
            .expect("a data directory inside a temporary root")
            .join(format!("cistern-{port}.toml"));
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let text = config_text(listen, data, Some(upstream)) + extra;
        std::fs::write(&config, text).expect("write config");
        let mut command = command(&config);
        command.stdin(Stdio::null()).stdout(Stdio::null());
        match &log {
            Some(log) => command.stderr(std::fs::File::create(log).expect("create log")),
            None => command.stderr(Stdio::inherit()),
        };
        let child = command.spawn().expect("start the cistern binary");
        let mut c = ChildCistern {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        c.wait_ready().await;
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's resident memory now (`VmRSS` in `/proc/<pid>/status`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the child's /proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line in kB");
        kib * 1024
    }

    async fn wait_ready(&mut self) {
        let client = Client::new(self.url.clone());
        let deadline = tokio::time::Instant::now() + super::patience();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = self
                    .log
                    .as_ref()
                    .and_then(|l| std::fs::read_to_string(l).ok())
                    .unwrap_or_default();
                panic!("cistern exited during start-up: {status}\n{log}");
            }
            // Connection refused until the child has bound its port: keep polling.
            let ready = client.request(http::Method::GET, "/v2/").send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cistern did not become ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// `cistern serve --config <config>`: the binary itself, as [`ChildCistern::start`] runs it
    /// by default.
    pub fn serve(config: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cistern"));
        command.args(["serve", "--config"]).arg(config);
        command
    }

    /// SIGKILL (std's `kill`): no destructor, no shutdown hook runs in the child.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL cistern");
        self.child.wait().expect("reap cistern");
    }
}

impl Drop for ChildCistern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
