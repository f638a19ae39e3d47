//! The binary under test, started as `cistern serve --config FILE` with one route: docker.io
//! (and requests that name no registry) served from the private registry, as a site would
//! mirror Docker Hub from a local copy. [`Cistern::start_routes`] takes the `[upstreams.*]`
//! and `[[routes]]` tables instead (several registries, several upstreams per route).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::daemon::{self, Daemon};

pub struct Cistern {
    pub addr: SocketAddr,
    /// Holds the config and logs; `cache/` below it is the data_dir.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    /// Extra TOML appended to the `[cache]` table (e.g. `tag_ttl = "1s"`).
    cache_toml: String,
    /// Bumped at each restart so every run keeps its own log.
    run: u32,
    pub daemon: Daemon,
}

/// The one route of [`Cistern::start`]: docker.io (and requests that name no registry) from
/// the registry at `upstream`.
fn docker_io_from(upstream: SocketAddr) -> String {
    format!(
        "[upstreams.local]\n\
         url = \"http://{upstream}\"\n\
         [[routes]]\n\
         registry = \"docker.io\"\n\
         upstreams = [\"local\"]\n\
         default = true\n"
    )
}

/// `GET /v2/` answers 200, or, when `[access]` lets no anonymous client in, cistern's own
/// login challenge (401 with `WWW-Authenticate: Basic realm="cistern"`).
fn v2_ping_answers(addr: SocketAddr) -> bool {
    matches!(
        daemon::http_get(addr, "/v2/", &[]),
        Ok(r) if r.status == 200
            || (r.status == 401 && r.header("www-authenticate") == Some("Basic realm=\"cistern\""))
    )
}

impl Cistern {
    pub fn start(dir: &Path, upstream: SocketAddr) -> Cistern {
        Cistern::start_with(dir, upstream, "", 1)
    }

    /// Starts cistern with `cache_toml` lines in its `[cache]` table; its data_dir is
    /// `dir/cache` and its log `dir/cistern-<run>.log`.
    pub fn start_with(dir: &Path, upstream: SocketAddr, cache_toml: &str, run: u32) -> Cistern {
        let routes_toml = docker_io_from(upstream);
        daemon::start_on_free_port(|port| {
            Cistern::try_start(dir, &routes_toml, cache_toml, run, port, None)
        })
    }

    /// Like [`Cistern::start`], serving HTTPS with `cert` and `key` (`[tls]`).
    #[allow(dead_code)] // used by tests/e2e_real_clients.rs, not by every test crate
    pub fn start_tls(dir: &Path, upstream: SocketAddr, cert: &Path, key: &Path) -> Cistern {
        let routes_toml = docker_io_from(upstream);
        daemon::start_on_free_port(|port| {
            Cistern::try_start(dir, &routes_toml, "", 1, port, Some((cert, key)))
        })
    }

    /// Starts cistern with `routes_toml` (its `[upstreams.NAME]` tables and `[[routes]]`)
    /// instead of the one docker.io route; data_dir `dir/cache`, log `dir/cistern-1.log`.
    /// [`Cistern::restart`] does not apply to it (it restarts with the one route).
    #[allow(dead_code)] // used by tests/e2e_fallback.rs, not by every test crate
    pub fn start_routes(dir: &Path, routes_toml: &str) -> Cistern {
        daemon::start_on_free_port(|port| Cistern::try_start(dir, routes_toml, "", 1, port, None))
    }

    fn try_start(
        dir: &Path,
        routes_toml: &str,
        cache_toml: &str,
        run: u32,
        port: u16,
        tls: Option<(&Path, &Path)>,
    ) -> Result<Cistern, String> {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let data_dir = dir.join("cache");
        let tls_toml = match tls {
            Some((cert, key)) => format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let config = format!(
            "listen = \"{addr}\"\n\
             data_dir = \"{}\"\n\
             shutdown_grace = \"2s\"\n\
             {routes_toml}\n\
             {tls_toml}\n\
             [cache]\n\
             {cache_toml}\n\
             [log]\n\
             level = \"cistern=debug,info\"\n",
            data_dir.display()
        );
        let config_path = dir.join(format!("cistern-{run}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cistern"));
        cmd.arg("serve").arg("--config").arg(&config_path);
        cmd.env_remove("RUST_LOG");
        let mut daemon = Daemon::spawn("cistern", cmd, dir.join(format!("cistern-{run}.log")));
        // Its start-up line naming the address proves the 200 comes from this process, not
        // from whatever else might have taken the port in the meantime.
        let log = daemon.log.clone();
        let serving = addr.to_string();
        // Over TLS the log line alone: it is written once the listener is bound.
        let plain = tls.is_none();
        daemon.try_wait_ready(
            "logs its listen address and GET /v2/ answers 200 (or its login challenge)",
            || daemon::log_contains(&log, &serving) && (!plain || v2_ping_answers(addr)),
        )?;
        Ok(Cistern {
            addr,
            dir: dir.to_path_buf(),
            data_dir,
            cache_toml: cache_toml.to_string(),
            run,
            daemon,
        })
    }

    /// Stops cistern with SIGTERM (asserting it exits by itself, successfully, within the
    /// bounded wait) and starts a new process on the same data_dir and a new port.
    pub fn restart(mut self, upstream: SocketAddr) -> Cistern {
        match self.daemon.terminate() {
            Ok(status) => assert!(
                status.success(),
                "cistern exited with {status} on SIGTERM\n{}",
                self.daemon.tail(30)
            ),
            Err(e) => panic!("{e}\n{}", self.daemon.tail(30)),
        }
        Cistern::start_with(&self.dir, upstream, &self.cache_toml, self.run + 1)
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Where the contract says a cached blob lives:
    /// `data_dir/blobs/sha256/<first 2 hex>/<hex>`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
    }
}
