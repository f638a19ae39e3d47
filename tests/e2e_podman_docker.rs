//! End-to-end tests: podman and the Docker daemon pull through a real cistern from a real
//! upstream registry (Debian's `docker-registry`, CNCF distribution 2.8), all on 127.0.0.1,
//! every process a child of the test (stopped by PID through Drop guards, also when a test
//! panics), every file in a temp dir. Shares the harness of `tests/e2e_real_clients.rs`
//! (`tests/e2e/`): images built in Rust and pushed with skopeo, cistern with one docker.io
//! route served from the private registry, upstream blob GETs counted in the registry's access
//! log.
//!
//! # Running
//!
//! ```text
//! scripts/install-test-deps                # as root: podman, docker.io (dockerd 20.10), ...
//! cargo test --test e2e_podman_docker      # as root: dockerd needs it
//! ```
//!
//! Without the tools (or, for dockerd, without root) a test prints `SKIPPED: ...` to stderr
//! and passes; with `CISTERN_REQUIRE_E2E=1` it fails instead. `CISTERN_E2E_KEEP=1` keeps the
//! temp dirs (logs, configs, storage).
//!
//! # Client setup (what works on Debian 12 as root; see tests/e2e/podman.rs, tests/e2e/dockerd.rs)
//!
//! - podman 4.3: `podman --root DIR/root --runroot /tmp/cistern-pr-XXXX --storage-driver vfs
//!   --cgroup-manager cgroupfs --events-backend file --tmpdir DIR/tmp pull --signature-policy
//!   DIR/policy.json REF`, with `CONTAINERS_REGISTRIES_CONF`, `CONTAINERS_STORAGE_CONF`,
//!   `CONTAINERS_CONF` (CNI network backend with a private `network_config_dir`: the default
//!   netavark backend creates `/run/containers/networks`), `REGISTRY_AUTH_FILE`, `HOME`,
//!   `XDG_{CONFIG,DATA}_HOME`, `XDG_RUNTIME_DIR` and `TMPDIR` all in the temp dir. The runroot
//!   is a short dir of its own: podman refuses a runroot longer than 50 characters.
//! - dockerd 20.10: `unshare --mount --propagation private -- sh -c 'mount --bind DIR/run /run
//!   && exec dockerd --data-root DIR/data --exec-root DIR/exec --pidfile DIR/dockerd.pid
//!   -H unix://DIR/docker.sock --config-file DIR/daemon.json --storage-driver vfs --bridge none
//!   --iptables=false --ip6tables=false --ip-masq=false'` with `"deprecated-key-path":
//!   "DIR/key.json"` in daemon.json (else `/etc/docker/key.json`) and the private `/run` (else
//!   `/run/docker/plugins` on the host). dockerd starts and stops its own managed containerd
//!   under `DIR/exec/containerd`; no `--containerd` needed. The CLI is Debian's
//!   `/usr/bin/docker` with `DOCKER_CONFIG` in the temp dir.
//!
//! # What each check proves
//!
//! Both tests pull `docker.io/library/app:1.0` (OCI manifest, 3 layers, one ~3 MiB),
//! `docker.io/library/mlist:1.0` (Docker manifest list, amd64 + arm64 v2s2 children; the
//! client picks its platform, linux/amd64) — the shapes of Docker Hub images — and
//! `docker.io/library/large:1.0` (OCI manifest with an uncompressed layer of just over 200 MiB,
//! see `tests/e2e_real_clients.rs`).
//!
//! A loopback "trap" listener (accepts, counts and closes every connection) stands in for
//! Docker Hub: podman's `location` for docker.io and dockerd's `HTTPS_PROXY`/`HTTP_PROXY`
//! point at it. No connection may reach it: the clients took every byte from the mirror and
//! never fell back (and could not have reached the internet if they had tried).
//!
//! `podman_pulls_through_cistern`:
//! - Control: the same podman setup pulls `REGISTRY/library/app:1.0` directly
//!   (`--tls-verify=false`) and reports the pushed digest.
//! - `registries.conf` (via `CONTAINERS_REGISTRIES_CONF`): `[[registry]] prefix = "docker.io"
//!   location = "127.0.0.1:<trap>"` with one `[[registry.mirror]] location = "<cistern>"
//!   insecure = true`. `podman pull docker.io/library/{app,mlist}:1.0` succeeds and
//!   `podman image inspect --format '{{.Digest}}'` is the registry's manifest (list) digest.
//! - First pull: blobs came from the upstream, every upstream request in that window was
//!   cistern's (user agent `cistern/..`), and every blob of the app and large images was
//!   fetched.
//! - Second pull with fresh podman storage (checked empty first): same digests, **no**
//!   upstream blob GET.
//!
//! `docker_daemon_pulls_through_cistern`:
//! - Control: a private dockerd with the registry in `insecure-registries` pulls
//!   `REGISTRY/library/app:1.0` directly; `RepoDigests` ends with the pushed digest.
//! - A private dockerd with `{"registry-mirrors": ["http://<cistern>"]}`: `docker pull
//!   library/{app,mlist}:1.0` succeeds; `RepoDigests[0]` ends with the registry's digest
//!   (dockerd sends `library/app` to the mirror, the registry holds `library/app`).
//! - First pull: blobs came from the upstream through cistern (cistern's user agent on every
//!   upstream request in that window), every blob of the app and large images among them.
//! - A second dockerd with a fresh data-root (no images, checked) pulls again: **no** upstream
//!   blob GET.

#[allow(dead_code)] // the harness serves several test crates; this one uses part of it
mod e2e;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use e2e::cistern::Cistern;
use e2e::dockerd::Dockerd;
use e2e::fixtures::{self, Fixtures, Seeded};
use e2e::podman::{self, Podman};
use e2e::registry::{LOG_QUIET, Registry, Request};

/// Logs of every process involved, for failure messages.
fn logs(registry: &Registry, cistern: Option<&Cistern>) -> String {
    e2e::logs(&[registry], cistern)
}

/// A loopback listener standing in for Docker Hub: a thread accepts every connection, counts
/// it and closes it at once (so a client that tries it fails fast instead of hanging).
struct Trap {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Trap {
    fn start() -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind trap");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        h.fetch_add(1, Ordering::SeqCst);
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Trap {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Registry, seeded images, and the large image (`library/large:1.0`, a 200 MiB layer).
fn setup(work: &e2e::Workdir) -> (Registry, Fixtures, Seeded) {
    let (registry, skopeo, fx) = e2e::seeded_registry(work);
    let large = e2e::seed_large(work, &registry, &skopeo);
    (registry, fx, large)
}

/// Every upstream request since `from` (index into the access log) came from cistern.
fn assert_all_from_cistern(registry: &Registry, from: usize, what: &str, ctx: &dyn Fn() -> String) {
    let foreign: Vec<Request> = registry.requests()[from..]
        .iter()
        .filter(|r| !r.user_agent.starts_with("cistern/"))
        .cloned()
        .collect();
    assert!(
        foreign.is_empty(),
        "{what}: the registry saw requests that did not come through cistern: {foreign:#?}\n{}",
        ctx()
    );
}

/// The first pull's upstream traffic: blobs were fetched, by cistern, including every blob of
/// the single-platform `images` (the cache started empty).
fn check_first_pull(
    registry: &Registry,
    from_req: usize,
    from_blob: usize,
    images: &[&Seeded],
    what: &str,
    ctx: &dyn Fn() -> String,
) {
    registry.check_first_pull(from_blob, &fixtures::all_blobs(images), what, ctx);
    assert_all_from_cistern(registry, from_req, what, ctx);
}

#[test]
fn podman_pulls_through_cistern() {
    let Some(work) = e2e::begin(
        "podman_pulls_through_cistern",
        &["podman", "skopeo", "docker-registry"],
        false,
        "podman",
    ) else {
        return;
    };
    let (registry, fx, large) = setup(&work);
    let images = [&fx.app, &fx.mlist, &large];
    let trap = Trap::start();
    let rctx = || logs(&registry, None);

    // Control: the same podman setup, straight from the registry.
    let conf_direct = podman::registries_conf(
        &work.sub("conf-direct"),
        "docker.io",
        "127.0.0.1:1",
        trap.addr.port(),
    );
    let direct = Podman::new(&work.sub("podman-direct"), &conf_direct);
    let reference = fx.app.reference(&registry.host());
    direct.pull(&reference, &["--tls-verify=false"], &rctx);
    assert_eq!(
        direct.inspect(&reference, "{{.Digest}}", &rctx),
        fx.app.digest,
        "direct podman pull: image digest"
    );

    // Through cistern.
    let cistern = Cistern::start(&work.sub("cistern"), registry.addr);
    let ctx = || logs(&registry, Some(&cistern));
    let conf = podman::registries_conf(
        &work.sub("conf"),
        "docker.io",
        &cistern.host(),
        trap.addr.port(),
    );
    let pull_all = |p: &Podman| {
        for seeded in images {
            let reference = format!("docker.io/{}:{}", seeded.repo, seeded.tag);
            p.pull(&reference, &[], &ctx);
            let digest = p.inspect(&reference, "{{.Digest}}", &ctx);
            assert_eq!(
                digest,
                seeded.digest,
                "podman image inspect {reference}: Digest is not the registry's manifest digest\n{}",
                ctx()
            );
        }
    };

    registry.settle(LOG_QUIET);
    let (req0, blob0) = (registry.requests().len(), registry.blob_gets().len());
    let first = Podman::new(&work.sub("podman-1"), &conf);
    pull_all(&first);
    check_first_pull(&registry, req0, blob0, &[&fx.app, &large], "podman", &ctx);
    assert_eq!(trap.hits(), 0, "podman tried docker.io's own location");

    // Second pull, fresh storage: everything from cistern's cache.
    let after_first = registry.blob_gets().len();
    let second = Podman::new(&work.sub("podman-2"), &conf);
    assert!(
        second.image_ids(&ctx).is_empty(),
        "fresh podman storage is not empty"
    );
    pull_all(&second);
    assert_eq!(
        second.image_ids(&ctx).len(),
        images.len(),
        "second podman storage"
    );
    registry.assert_no_blob_gets_since(after_first, "podman second pull (fresh storage)", &ctx);
    assert_eq!(trap.hits(), 0, "podman tried docker.io's own location");
}

#[test]
fn docker_daemon_pulls_through_cistern() {
    let Some(work) = e2e::begin(
        "docker_daemon_pulls_through_cistern",
        &["dockerd", "docker", "unshare", "skopeo", "docker-registry"],
        true,
        "dockerd",
    ) else {
        return;
    };
    let (registry, fx, large) = setup(&work);
    let images = [&fx.app, &fx.mlist, &large];
    let trap = Trap::start();
    let proxy = trap.addr.to_string();
    let rctx = || logs(&registry, None);
    let repo_digest = "{{index .RepoDigests 0}}";

    // Control: a private dockerd pulling straight from the registry (an insecure registry).
    {
        let settings = serde_json::json!({ "insecure-registries": [registry.host()] });
        let direct = Dockerd::start(&work.sub("dockerd-direct"), settings, &proxy);
        let reference = fx.app.reference(&registry.host());
        direct.pull(&reference, &rctx);
        let got = direct.inspect(&reference, repo_digest, &rctx);
        assert!(
            got.ends_with(&format!("@{}", fx.app.digest)),
            "direct docker pull: RepoDigests[0] = {got:?}, want …@{}",
            fx.app.digest
        );
    }

    // Through cistern, as Docker Hub's registry-mirror.
    let cistern = Cistern::start(&work.sub("cistern"), registry.addr);
    let settings =
        serde_json::json!({ "registry-mirrors": [format!("http://{}", cistern.host())] });
    let pull_all = |d: &Dockerd, ctx: &dyn Fn() -> String| {
        for seeded in images {
            let reference = format!("{}:{}", seeded.repo, seeded.tag);
            d.pull(&reference, ctx);
            let got = d.inspect(&reference, repo_digest, ctx);
            assert!(
                got.ends_with(&format!("@{}", seeded.digest)),
                "docker image inspect {reference}: RepoDigests[0] = {got:?}, want …@{}\n{}",
                seeded.digest,
                ctx()
            );
        }
    };

    registry.settle(LOG_QUIET);
    let (req0, blob0) = (registry.requests().len(), registry.blob_gets().len());
    {
        let first = Dockerd::start(&work.sub("dockerd-1"), settings.clone(), &proxy);
        let ctx = || {
            format!(
                "{}\n{}",
                logs(&registry, Some(&cistern)),
                first.daemon.tail(30)
            )
        };
        pull_all(&first, &ctx);
        check_first_pull(&registry, req0, blob0, &[&fx.app, &large], "dockerd", &ctx);
        assert_eq!(
            trap.hits(),
            0,
            "dockerd tried to reach Docker Hub (through the proxy trap)\n{}",
            ctx()
        );
    }

    // A second daemon with a fresh data-root: everything from cistern's cache.
    let after_first = registry.blob_gets().len();
    let second = Dockerd::start(&work.sub("dockerd-2"), settings, &proxy);
    let ctx = || {
        format!(
            "{}\n{}",
            logs(&registry, Some(&cistern)),
            second.daemon.tail(30)
        )
    };
    assert!(
        second.image_ids(&ctx).is_empty(),
        "fresh dockerd has images"
    );
    pull_all(&second, &ctx);
    registry.assert_no_blob_gets_since(after_first, "dockerd second pull (fresh data-root)", &ctx);
    assert_eq!(
        trap.hits(),
        0,
        "dockerd tried to reach Docker Hub (through the proxy trap)\n{}",
        ctx()
    );
}
