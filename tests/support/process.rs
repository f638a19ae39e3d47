//! The cistern binary as a child process, for tests that need a real process: one to kill
//! with SIGKILL, or one to run in a mount namespace of its own.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::client::Client;

/// A running cistern binary, killed (SIGKILL) and reaped when dropped.
pub struct ChildCistern {
    child: Child,
    pub url: String,
    /// Where its stderr goes, if the test captured it: printed if it dies during start-up.
    log: Option<PathBuf>,
}

/// A free port on 127.0.0.1 for a child to listen on. (The window between picking it and the
/// child binding it is harmless here: nothing else on the machine is told to use it.)
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes a config for a cistern on `port` with its cache in `data`, in front of `upstream`.
pub fn write_config(path: &Path, port: u16, data: &Path, upstream: &str) {
    std::fs::write(
        path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[upstream]\nurl = {upstream:?}\n",
            data.display().to_string()
        ),
    )
    .unwrap();
}

impl ChildCistern {
    /// Spawns `command` (the binary, or a wrapper that execs it) and waits until `/v2/`
    /// answers on `port`.
    pub async fn start(mut command: Command, port: u16, log: Option<PathBuf>) -> ChildCistern {
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
