//! A private upstream: Debian's `docker-registry` (CNCF distribution 2.8.2) on 127.0.0.1,
//! storing in a temp dir, with its access log in a file the tests read.
//!
//! Distribution writes two lines per request to its log: a structured
//! `level=info msg="response completed" ... http.request.method=GET http.request.uri=/v2/...`
//! line and an Apache-style access-log line, e.g.
//! `127.0.0.1 - - [23/Nov/2026:10:43:54 +0000] "GET /v2/library/app/blobs/sha256:ab.. HTTP/1.1" 200 3145728 "" "cistern/0.1.0"`.
//! [`Registry::blob_gets`] counts the access-log lines (one per request, written when the
//! response has been sent).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::daemon::{self, Daemon};

/// How long the access log must stay unchanged before it is counted ([`Registry::settle`]).
pub const LOG_QUIET: Duration = Duration::from_millis(500);

/// Upstream GETs per blob digest in `requests` (any query string, e.g. `?ns=`, dropped).
pub fn blob_get_counts(requests: &[Request]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in requests
        .iter()
        .filter_map(|r| r.uri.split("/blobs/").nth(1))
    {
        *m.entry(d.split('?').next().unwrap().to_string())
            .or_insert(0) += 1;
    }
    m
}

/// Digests of the blobs GET from the upstream in `requests`.
pub fn blob_digests(requests: &[Request]) -> BTreeSet<String> {
    blob_get_counts(requests).into_keys().collect()
}

pub struct Registry {
    pub addr: SocketAddr,
    /// `storage.filesystem.rootdirectory`.
    pub storage: PathBuf,
    pub daemon: Daemon,
}

/// One request line from the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub user_agent: String,
}

impl Registry {
    pub fn start(dir: &Path) -> Registry {
        daemon::start_on_free_port(|port| Registry::try_start(dir, port))
    }

    fn try_start(dir: &Path, port: u16) -> Result<Registry, String> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        let config_path = dir.join("registry.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(super::which("docker-registry").unwrap());
        cmd.arg("serve").arg(&config_path);
        let mut daemon = Daemon::spawn("docker-registry", cmd, dir.join("registry.log"));
        // The log line proves the 200 comes from this process, not from whatever else might
        // have taken the port in the meantime.
        let log = daemon.log.clone();
        let listening = format!("listening on {addr}");
        daemon.try_wait_ready("logs `listening on` and GET /v2/ answers 200", || {
            daemon::log_contains(&log, &listening) && daemon::v2_ping_ok(addr)
        })?;
        Ok(Registry {
            addr,
            storage,
            daemon,
        })
    }

    /// `127.0.0.1:PORT`, the host part of image references on this registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The file holding a blob's bytes in the filesystem storage driver's layout.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Every request in the access log so far.
    pub fn requests(&self) -> Vec<Request> {
        let text = std::fs::read_to_string(&self.daemon.log).unwrap_or_default();
        text.lines().filter_map(parse_access_line).collect()
    }

    /// `GET /v2/<name>/blobs/sha256:...` requests so far (uploads are `/blobs/uploads/`).
    pub fn blob_gets(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.uri.contains("/blobs/sha256:"))
            .collect()
    }

    /// The blob GETs from number `from` on, once the log has settled ([`LOG_QUIET`]).
    pub fn blob_gets_since(&self, from: usize) -> Vec<Request> {
        self.settle(LOG_QUIET);
        self.blob_gets()[from..].to_vec()
    }

    /// Checks the upstream traffic of a first pull through an empty cistern, blob GETs from
    /// number `from` on: there were some, and every blob in `want` was among them. Prints the
    /// count as `<what>: first pull: ...` and returns the GETs.
    pub fn check_first_pull(
        &self,
        from: usize,
        want: &BTreeSet<String>,
        what: &str,
        ctx: &dyn Fn() -> String,
    ) -> Vec<Request> {
        let first = self.blob_gets_since(from);
        assert!(
            !first.is_empty(),
            "{what}: the first pull through cistern made no upstream blob GET\n{}",
            ctx()
        );
        let fetched = blob_digests(&first);
        let missing: Vec<_> = want.difference(&fetched).cloned().collect();
        assert!(
            missing.is_empty(),
            "{what}: cistern's cache was empty, yet these blobs were never fetched from the upstream: {missing:?}\n{}",
            ctx()
        );
        super::say(&format!(
            "{what}: first pull: {} upstream blob GETs for {} distinct blobs",
            first.len(),
            fetched.len()
        ));
        first
    }

    /// A pull that cistern must have served from its cache alone: no blob GET from number
    /// `from` on.
    pub fn assert_no_blob_gets_since(&self, from: usize, what: &str, ctx: &dyn Fn() -> String) {
        let gets = self.blob_gets_since(from);
        assert!(
            gets.is_empty(),
            "{what} made {} upstream blob GETs (all blobs were cached): {gets:#?}\n{}",
            gets.len(),
            ctx()
        );
    }

    /// Waits until the access log stops growing for `quiet` (bounded by [`daemon::WAIT`]), so
    /// that lines of requests that just finished are in the file before it is counted.
    pub fn settle(&self, quiet: Duration) {
        let deadline = Instant::now() + daemon::WAIT;
        let len = || {
            std::fs::metadata(&self.daemon.log)
                .map(|m| m.len())
                .unwrap_or(0)
        };
        let mut last = len();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let now = len();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet {
                return;
            }
        }
        panic!("registry log still growing after {:?}", daemon::WAIT);
    }
}

/// Parses `IP - - [date] "METHOD URI HTTP/1.1" STATUS SIZE "referer" "user agent"`.
fn parse_access_line(line: &str) -> Option<Request> {
    if line.starts_with("time=") {
        return None;
    }
    let (_, rest) = line.split_once("] \"")?;
    let (request, rest) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_string();
    let uri = parts.next()?.to_string();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    let user_agent = rest
        .rsplit_once("\" \"")
        .map(|(_, ua)| ua.trim_end_matches('"').to_string())
        .unwrap_or_default();
    Some(Request {
        method,
        uri,
        status,
        user_agent,
    })
}

#[test]
fn parses_distribution_access_log_lines() {
    let line = r#"127.0.0.1 - - [23/Nov/2026:10:43:54 +0000] "GET /v2/library/app/blobs/sha256:abcd HTTP/1.1" 200 2 "" "curl/7.88.1""#;
    assert_eq!(
        parse_access_line(line),
        Some(Request {
            method: "GET".into(),
            uri: "/v2/library/app/blobs/sha256:abcd".into(),
            status: 200,
            user_agent: "curl/7.88.1".into(),
        })
    );
    let structured = r#"time="2026-11-23T10:43:54.161374421Z" level=info msg="response completed" http.request.method=GET http.request.uri=/v2/"#;
    assert_eq!(parse_access_line(structured), None);
}
