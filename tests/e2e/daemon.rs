//! Child processes with Drop guards, free ports, bounded waits and a minimal HTTP/1.1 client
//! (over `tests/support/http1.rs`, the one raw response parser).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// Every wait in these tests is bounded by this (or a caller's shorter) deadline.
pub const WAIT: Duration = Duration::from_secs(30);

/// A port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Starts a server on a port from [`free_port`], retrying with another port (3 tries in all)
/// when the one picked was taken in the meantime ("address already in use" in its log).
pub fn start_on_free_port<T>(mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    let mut last = String::new();
    for _ in 0..3 {
        match start(free_port()) {
            Ok(t) => return t,
            Err(e) if e.to_ascii_lowercase().contains("address already in use") => last = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("no free port after 3 tries:\n{last}")
}

/// True if the log file contains `needle`.
pub fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).contains(needle))
        .unwrap_or(false)
}

/// The last `lines` lines of a log file, for failure messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A long-running child (registry, cistern, containerd) whose stdout and stderr go to a log
/// file. Dropping it stops it: SIGTERM to its PID, up to 10 s to exit, then SIGKILL.
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Daemon {
        let out = File::create(&log).expect("create log file");
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Daemon {
            name: name.to_string(),
            log,
            child: Some(child),
        }
    }

    /// `Err` with the exit status if the child is gone.
    pub fn alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err(format!("{} was stopped", self.name));
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("{} exited: {status}", self.name)),
            Err(e) => Err(format!("{}: wait failed: {e}", self.name)),
        }
    }

    pub fn tail(&self, lines: usize) -> String {
        format!(
            "---- last {lines} lines of {} log ({}) ----\n{}\n---- end of {} log ----",
            self.name,
            self.log.display(),
            tail(&self.log, lines),
            self.name
        )
    }

    /// Polls `ready` until it returns true, failing with the log tail if the child exits or
    /// the deadline passes.
    pub fn wait_ready(&mut self, what: &str, ready: impl FnMut() -> bool) {
        if let Err(e) = self.try_wait_ready(what, ready) {
            panic!("{e}");
        }
    }

    /// [`Daemon::wait_ready`] returning the failure (with the log tail) instead.
    pub fn try_wait_ready(
        &mut self,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if ready() {
                return Ok(());
            }
            if let Err(e) = self.alive() {
                return Err(format!(
                    "{} never became ready ({what}): {e}\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} not ready after {WAIT:?} ({what})\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the child by its PID: SIGTERM, up to 10 s to exit, then SIGKILL. `Ok` with the
    /// exit status if it exited by itself (or had already exited), `Err` if it had to be
    /// killed.
    pub fn terminate(&mut self) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("{} was already stopped", self.name));
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "{} (pid {}) ignored SIGTERM for 10 s and was killed",
            self.name,
            child.id()
        ))
    }

    pub fn stop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.terminate()
        {
            eprintln!("{e}");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a short-lived command to completion with a time limit (it is killed past `limit`).
/// Returns its output; the caller decides what a failure means.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = t_err.join().unwrap();
            panic!(
                "timed out after {limit:?}: {desc}\nstderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Like [`run`], but panics with the command, its output and `context` unless it succeeded.
pub fn run_ok(cmd: &mut Command, limit: Duration, context: &dyn Fn() -> String) -> Output {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    expect_success(&out, &desc, context);
    out
}

/// Panics with `what`, the command's exit status, its output and `context` unless it
/// succeeded.
pub fn expect_success(out: &Output, what: &str, context: &dyn Fn() -> String) {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            context()
        );
    }
}

/// The non-empty lines of a command's stdout, trimmed (e.g. one ID a line).
pub fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

// The one raw HTTP/1.1 parser, shared with the in-process harness (which alone uses its
// lenient half). A test crate with both harnesses (`e2e_fallback`) loads the file twice, as
// two modules of the same std-only code.
#[path = "../support/http1.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod http1;

/// A response from [`http_get`].
pub use http1::RawResponse as Response;

/// A plain HTTP/1.1 request on loopback (`Connection: close`, body read to EOF, chunked
/// bodies decoded). Used for readiness probes and to read manifests straight from the
/// registry; the checks of cistern itself go through the real clients.
pub fn http_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&http1::request(
        method,
        path.as_bytes(),
        &addr.to_string(),
        headers,
    ))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    http1::parse(&raw, method == "HEAD")
        .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidData, m.why))
}

pub fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    http_request("GET", addr, path, headers)
}

/// True once `GET /v2/` on `addr` answers 200 (the ping every client sends first).
pub fn v2_ping_ok(addr: SocketAddr) -> bool {
    matches!(http_get(addr, "/v2/", &[]), Ok(r) if r.status == 200)
}
