//! End-to-end tests of routing and upstream fallback: real clients (containerd's `ctr`,
//! skopeo) pull through one real cistern configured with several named upstreams and routes,
//! each upstream a real `docker-registry` (CNCF distribution 2.8) on 127.0.0.1 — or, for the
//! hanging-mirror case, a listener in this file that accepts connections and never answers.
//! Same harness and rules as `tests/e2e_real_clients.rs` (tests/e2e/): every process a child
//! of the test, stopped by PID through Drop guards; temp dirs only; every wait bounded; no
//! timing assertions.
//!
//! # Running
//!
//! ```text
//! cargo test --test e2e_fallback          # as root: containerd needs it
//! ```
//!
//! Missing tools (or root, for containerd) print `SKIPPED: ...` and pass, unless
//! `CISTERN_REQUIRE_E2E=1`, which makes them fail. `CISTERN_E2E_KEEP=1` keeps the temp dirs.
//!
//! # Setup
//!
//! Small images built in Rust (two gzip layers and a config each; every image's blobs are its
//! own, so an access-log line names exactly one image), written to one OCI layout and pushed
//! with `skopeo copy --preserve-digests` — the same bytes to every registry that gets them.
//! Which upstream served what is read from each registry's access log
//! (`"GET /v2/<repo>/blobs/sha256:<hex> HTTP/1.1" 200 ...`), after it has been quiet; only
//! lines with cistern's User-Agent count (not the seeding's uploads and read-backs).
//!
//! Every upstream has `header_timeout = "2s"`, `connect_timeout = "2s"`, `idle_timeout =
//! "5s"`, `breaker_failures = 3` and `breaker_cooldown = "10m"` (longer than any test).
//!
//! containerd's `--hosts-dir` holds `docker.io/hosts.toml`, `ghcr.io/hosts.toml` and
//! `quay.io/hosts.toml`, each with `server` = a dead loopback port and cistern as the one
//! `[host."http://127.0.0.1:CPORT"]` (pull, resolve): containerd adds `?ns=<registry>`, which
//! picks cistern's route; whatever cistern refuses falls through to the dead port and fails.
//!
//! # What each test proves
//!
//! `containerd_routes_by_ns_and_falls_back_on_404` (upstreams mirror + origin for docker.io,
//! ghcr for ghcr.io):
//! - `docker.io/library/x:1` (on mirror and origin) and `ghcr.io/org/y:1` (on ghcr only) pull
//!   through one cistern, complete, unpacked, with the registries' digests. x's blobs all came
//!   from the mirror (first in the route) and origin saw no blob GET for x; y's blobs all came
//!   from ghcr, and neither docker.io upstream ever saw a request for `org/y`.
//! - `docker.io/library/z:1`, only on origin: the mirror answered 404 (and nothing else) for
//!   z, and origin served every blob: cistern fell back on 404.
//! - Those 404s (6, more than `breaker_failures`) are answers, not failures: the mirror still
//!   serves every blob of `docker.io/library/v:1` pulled next.
//! - A request naming no registry (`GET /v2/library/x/manifests/1`, no `ns`) takes the default
//!   (docker.io) route.
//! - `quay.io/org/q:1` (no route): a raw `GET ...?ns=quay.io` is a 404 `NAME_UNKNOWN`; the ctr
//!   pull fails (containerd moved on to the dead `server`), cistern's log shows its 404 for the
//!   pull's request, and no upstream saw `org/q`.
//!
//! `containerd_falls_back_when_mirror_is_killed`: x pulls from the mirror; the mirror process
//! is then stopped (by PID), and `docker.io/library/w:1` (on both) pulls via origin, which
//! served every one of its blobs.
//!
//! `containerd_falls_back_when_mirror_never_answers`: the mirror is a TCP listener that
//! accepts and reads but never writes; with the mirror's `header_timeout = "2s"` the pull of
//! `docker.io/library/h:1` (origin only) succeeds via origin within a bounded run of `ctr`
//! (far below containerd's own, very long, limits), and the listener did receive cistern's
//! requests for h (at least `breaker_failures` of them). Then the mirror's circuit is open:
//! `docker.io/library/h2:1` pulls via origin and the listener never sees a request for it.
//!
//! `skopeo_path_prefix_names_the_registry`: `org/y:1` exists with *different* content on ghcr
//! (route ghcr.io) and on origin (the default docker.io route).
//! `skopeo inspect --raw docker://CPORT/ghcr.io/org/y:1` returns ghcr's exact bytes, while
//! `docker://CPORT/org/y:1` (no registry in the path) returns origin's; `skopeo copy` by the
//! prefixed name gets every blob from ghcr. The docker.io route has `tags_from = ["origin"]`:
//! `library/s:1`, stale on the mirror, resolves to origin's manifest and the mirror is never
//! asked for the tag.
//!
//! `skopeo_falls_back_on_content_that_fails_verification`: the mirror's copies are altered on
//! its disk (checked straight from the registry: it serves them as they are).
//! - A manifest whose bytes no longer match its digest: `skopeo inspect --raw` through cistern
//!   returns origin's exact bytes.
//! - A layer with one byte flipped: the pull that starts the fill may fail (its response was
//!   streamed from the mirror and is aborted before its last byte), but the fill must move on
//!   to origin, so the next pull succeeds with origin's bytes and the layer ends up in
//!   cistern's cache.
//!
//! Not covered here: failover in the middle of a blob body (it needs an upstream that dies
//! mid-response; the in-process fake-registry tests cover it).

// This file uses only part of the shared harness.
#[allow(dead_code)]
mod e2e;
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use flate2::Compression;

use e2e::Workdir;
use e2e::cistern::Cistern;
use e2e::containerd::{self, Containerd};
use e2e::daemon;
use e2e::fixtures::{self, Seeded};
use e2e::image::{self, Entry, Image, Layout};
use e2e::registry::{LOG_QUIET, Registry, Request};
use e2e::skopeo::Skopeo;

/// containerd namespace for every pull.
const NS: &str = "e2e";
/// Bound on one `ctr images pull` in the hanging-mirror test: each request cistern sends the
/// mirror costs it at most the 2 s `header_timeout`, and the circuit breaker stops that after
/// a few. containerd itself would wait far longer.
const HANGING_PULL_LIMIT: Duration = Duration::from_secs(60);
/// Bound on a pull that is expected to fail (it should fail at once: 404, then a dead port).
const FAILING_PULL_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Images

/// A small single-platform image whose blobs (two layers and the config) are its own.
fn small_image(name: &str) -> Image {
    let layer = |n: usize| {
        image::layer(
            &[
                Entry::Dir("opt/"),
                Entry::File(
                    format!("opt/{name}-{n}.txt"),
                    format!("{name} layer {n}\n").repeat(64 + n).into_bytes(),
                ),
            ],
            Compression::default(),
        )
    };
    Image::build(name, "amd64", vec![layer(0), layer(1)])
}

/// Writes an OCI layout under `dir` with one tag per image (the image's name).
fn write_layout(dir: &Path, names: &[&str]) -> PathBuf {
    let mut layout = Layout::default();
    for name in names {
        layout.add_image(name, &small_image(name));
    }
    let path = dir.join("oci-layout");
    layout.write(&path);
    path
}

/// Starts one registry per name, each under `work/<name>`.
fn start_registries<const N: usize>(work: &Workdir, names: [&str; N]) -> [Registry; N] {
    names.map(|name| Registry::start(&work.sub(name)))
}

/// Pushes layout tag `tag` to `registry` as `repo:1` and reads it back.
fn push(
    skopeo: &Skopeo,
    layout: &Path,
    tag: &str,
    registry: &Registry,
    repo: &str,
    ctx: &dyn Fn() -> String,
) -> Seeded {
    let dest = format!("{repo}:1");
    fixtures::push(skopeo, layout, tag, registry.addr, &dest, None, ctx)
}

/// Pushes layout tag `tag` as `repo:1` to each of `registries`, which must then all hold the
/// same manifest (the same bytes everywhere, as the setup promises); returns the first's.
fn push_to_each(
    skopeo: &Skopeo,
    layout: &Path,
    tag: &str,
    registries: &[&Registry],
    repo: &str,
    ctx: &dyn Fn() -> String,
) -> Seeded {
    let mut seeded = registries
        .iter()
        .map(|r| push(skopeo, layout, tag, r, repo, ctx));
    let first = seeded.next().expect("at least one registry");
    for other in seeded {
        assert_eq!(
            first.manifest, other.manifest,
            "{tag} differs between upstreams"
        );
    }
    first
}

/// Checks what `skopeo copy` wrote to `dir`: `seeded`'s exact manifest and every blob.
fn check_copied_dir(dir: &Path, seeded: &Seeded) {
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    assert!(manifest == seeded.manifest, "copied manifest.json");
    for blob in &seeded.blobs {
        let bytes = std::fs::read(dir.join(blob.strip_prefix("sha256:").unwrap()))
            .unwrap_or_else(|e| panic!("blob {blob} not copied: {e}"));
        assert_eq!(&image::sha256_digest(&bytes), blob, "copied blob content");
    }
}

// ---------------------------------------------------------------------------------------
// Access logs

/// Every request cistern (User-Agent `cistern/<version>`) made for repository `repo`
/// (`/v2/<repo>/...`) in `registry`'s log; the seeding's uploads and read-backs are not.
fn requests_for(registry: &Registry, repo: &str) -> Vec<Request> {
    let prefix = format!("/v2/{repo}/");
    registry
        .requests()
        .into_iter()
        .filter(|r| r.uri.starts_with(&prefix) && r.user_agent.starts_with("cistern/"))
        .collect()
}

/// Digests of the blobs of `repo` that `registry` served cistern (GET answered 200 or 206).
fn served_blobs(registry: &Registry, repo: &str) -> BTreeSet<String> {
    requests_for(registry, repo)
        .into_iter()
        .filter(|r| r.method == "GET" && matches!(r.status, 200 | 206))
        .filter_map(|r| {
            let d = r.uri.split("/blobs/").nth(1)?;
            Some(d.split('?').next().unwrap().to_string())
        })
        .filter(|d| d.starts_with("sha256:"))
        .collect()
}

/// Asserts that `registry` served cistern every blob of `seeded` (as `repo`) and no other.
fn assert_served_all(
    registry: &Registry,
    repo: &str,
    seeded: &Seeded,
    why: &str,
    ctx: &dyn Fn() -> String,
) {
    assert_eq!(
        served_blobs(registry, repo),
        seeded.blobs,
        "{why}\n{}",
        ctx()
    );
}

/// Cistern's blob GETs for `repo` in `registry`'s log, whatever their status.
fn blob_gets_for(registry: &Registry, repo: &str) -> Vec<Request> {
    requests_for(registry, repo)
        .into_iter()
        .filter(|r| r.method == "GET" && r.uri.contains("/blobs/sha256:"))
        .collect()
}

/// Tails of the registries' and cistern's logs, then `extra`, for failure messages.
fn logs(registries: &[&Registry], cistern: Option<&Cistern>, extra: &str) -> String {
    e2e::logs(registries, cistern) + extra
}

// ---------------------------------------------------------------------------------------
// Cistern config, containerd

/// Consecutive failures that open an upstream's circuit breaker in these tests (below the
/// default 5, so a handful of requests is enough to show whether it opened); the cooldown
/// outlasts every test.
const BREAKER_FAILURES: u32 = 3;

/// `[upstreams.NAME]` with the timeouts of the spec (short enough that a dead or silent
/// upstream costs seconds, not minutes) and the breaker settings above.
fn upstream_toml(name: &str, url: &str) -> String {
    format!(
        "[upstreams.{name}]\n\
         url = \"{url}\"\n\
         header_timeout = \"2s\"\n\
         connect_timeout = \"2s\"\n\
         idle_timeout = \"5s\"\n\
         breaker_failures = {BREAKER_FAILURES}\n\
         breaker_cooldown = \"10m\"\n"
    )
}

/// docker.io (the default route) from `mirror` then `origin`, its tags resolved by the
/// upstreams in `tags_from` (`None`: all of them); with `ghcr`, ghcr.io from it.
fn routes_toml(
    mirror: &str,
    origin: &str,
    ghcr: Option<&str>,
    tags_from: Option<&[&str]>,
) -> String {
    let mut s = upstream_toml("mirror", mirror);
    s.push_str(&upstream_toml("origin", origin));
    if let Some(g) = ghcr {
        s.push_str(&upstream_toml("ghcr", g));
    }
    s.push_str(
        "[[routes]]\n\
         registry = \"docker.io\"\n\
         upstreams = [\"mirror\", \"origin\"]\n\
         default = true\n",
    );
    if let Some(tags) = tags_from {
        let list: Vec<String> = tags.iter().map(|t| format!("\"{t}\"")).collect();
        s.push_str(&format!("tags_from = [{}]\n", list.join(", ")));
    }
    if ghcr.is_some() {
        s.push_str(
            "[[routes]]\n\
             registry = \"ghcr.io\"\n\
             upstreams = [\"ghcr\"]\n",
        );
    }
    s
}

/// `registry` as an upstream url.
fn url(registry: &Registry) -> String {
    format!("http://{}", registry.host())
}

/// Cistern with the upstreams and routes of [`routes_toml`]: docker.io from `mirror_url` then
/// `origin`, ghcr.io from `ghcr` if given.
fn start_cistern(
    work: &Workdir,
    mirror_url: &str,
    origin: &Registry,
    ghcr: Option<&Registry>,
    tags_from: Option<&[&str]>,
) -> Cistern {
    let ghcr = ghcr.map(url);
    let routes = routes_toml(mirror_url, &url(origin), ghcr.as_deref(), tags_from);
    Cistern::start_routes(&work.sub("cistern"), &routes)
}

/// A private containerd and, for it, a hosts dir sending every registry to `cistern`
/// ([`hosts_for`]).
fn start_containerd(work: &Workdir, cistern: &Cistern) -> (Containerd, PathBuf) {
    let hosts = hosts_for(&work.sub("hosts"), cistern);
    (Containerd::start(&work.path.join("containerd")), hosts)
}

/// A hosts dir sending docker.io, ghcr.io and quay.io to cistern, each with a dead `server`.
fn hosts_for(dir: &Path, cistern: &Cistern) -> PathBuf {
    let dead_port = daemon::free_port();
    for registry in ["docker.io", "ghcr.io", "quay.io"] {
        containerd::hosts_dir(dir, registry, &cistern.host(), dead_port);
    }
    dir.to_path_buf()
}

/// Pulls `reference` (succeeding, within containerd's helper's bound) and checks it.
fn ctr_pull(
    ctd: &Containerd,
    hosts: &Path,
    reference: &str,
    seeded: &Seeded,
    ctx: &dyn Fn() -> String,
) {
    ctd.pull(NS, hosts, &[], reference, ctx);
    ctd.check_image(NS, reference, seeded, ctx);
}

/// Pulls `reference` past the silent mirror: `ctr` must succeed within [`HANGING_PULL_LIMIT`]
/// (`what` names the pull if not), and the image is checked.
fn ctr_pull_past_silent(
    ctd: &Containerd,
    hosts: &Path,
    reference: &str,
    seeded: &Seeded,
    what: &str,
    ctx: &dyn Fn() -> String,
) {
    let mut pull = ctd.pull_command(NS, hosts, &[], reference);
    let out = daemon::run(&mut pull, HANGING_PULL_LIMIT);
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        output_text(&out),
        ctx()
    );
    ctd.check_image(NS, reference, seeded, ctx);
}

fn output_text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// A mirror that accepts connections and never answers

/// The support `FakeRegistry` that accepts every connection, reads every request and never
/// answers one, on a runtime of its own (this test is synchronous).
struct Silent {
    addr: SocketAddr,
    registry: support::FakeRegistry,
    _runtime: tokio::runtime::Runtime,
}

impl Silent {
    fn start() -> Silent {
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let registry = runtime.block_on(support::FakeRegistry::silent());
        Silent {
            addr: registry.addr(),
            registry,
            _runtime: runtime,
        }
    }

    /// (connections accepted, request lines received) so far.
    fn finish(&mut self) -> (usize, Vec<String>) {
        let lines = self
            .registry
            .requests()
            .iter()
            .map(|r| format!("{} {} HTTP/1.1", r.method, r.path))
            .collect();
        (self.registry.connections(), lines)
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn containerd_routes_by_ns_and_falls_back_on_404() {
    let Some(work) = e2e::begin(
        "containerd_routes_by_ns_and_falls_back_on_404",
        e2e::CONTAINERD_TOOLS,
        true,
        "fallback-routes",
    ) else {
        return;
    };
    let [mirror, origin, ghcr] = start_registries(&work, ["mirror", "origin", "ghcr"]);
    let regs = [&mirror, &origin, &ghcr];
    let rctx = || logs(&regs, None, "");
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    let layout = write_layout(&work.sub("images"), &["x", "y", "z", "v"]);
    let both = [&mirror, &origin];
    let x = push_to_each(&skopeo, &layout, "x", &both, "library/x", &rctx);
    let v = push_to_each(&skopeo, &layout, "v", &both, "library/v", &rctx);
    let z = push(&skopeo, &layout, "z", &origin, "library/z", &rctx);
    let y = push(&skopeo, &layout, "y", &ghcr, "org/y", &rctx);
    // The premise of the 404 fallback: the mirror really lacks z.
    let r = daemon::http_get(mirror.addr, "/v2/library/z/manifests/1", &[]).unwrap();
    assert_eq!(r.status, 404, "the mirror must not have library/z");

    let cistern = start_cistern(&work, &url(&mirror), &origin, Some(&ghcr), None);
    let (ctd, hosts) = start_containerd(&work, &cistern);
    let ctx = || logs(&regs, Some(&cistern), &ctd.daemon.tail(30));

    // Two registries through one cistern, picked by ?ns=.
    ctr_pull(&ctd, &hosts, "docker.io/library/x:1", &x, &ctx);
    ctr_pull(&ctd, &hosts, "ghcr.io/org/y:1", &y, &ctx);
    // An image only the second upstream has.
    ctr_pull(&ctd, &hosts, "docker.io/library/z:1", &z, &ctx);
    // The mirror's 404s for z (more than BREAKER_FAILURES of them) are answers, not failures:
    // its circuit stays closed and it still serves v, which it has.
    ctr_pull(&ctd, &hosts, "docker.io/library/v:1", &v, &ctx);

    for r in regs {
        r.settle(LOG_QUIET);
    }
    // x: every blob from the mirror (first in the route); origin not asked for x's blobs.
    assert_served_all(
        &mirror,
        "library/x",
        &x,
        "x's blobs must all come from the mirror",
        &ctx,
    );
    let origin_x = blob_gets_for(&origin, "library/x");
    assert!(
        origin_x.is_empty(),
        "origin got blob GETs for x although the mirror had it: {origin_x:#?}\n{}",
        ctx()
    );
    // y: every blob from ghcr; the docker.io upstreams never heard of org/y.
    assert_served_all(
        &ghcr,
        "org/y",
        &y,
        "y's blobs must all come from the ghcr.io upstream",
        &ctx,
    );
    for (name, r) in [("mirror", &mirror), ("origin", &origin)] {
        let leaked = requests_for(r, "org/y");
        assert!(
            leaked.is_empty(),
            "the docker.io upstream {name} got requests for ghcr.io's org/y: {leaked:#?}\n{}",
            ctx()
        );
    }
    for repo in ["library/x", "library/z"] {
        let leaked = requests_for(&ghcr, repo);
        assert!(
            leaked.is_empty(),
            "the ghcr.io upstream got requests for docker.io's {repo}: {leaked:#?}\n{}",
            ctx()
        );
    }
    // z: the mirror was asked and said 404 (nothing else); origin served every blob.
    let mirror_z = requests_for(&mirror, "library/z");
    assert!(
        !mirror_z.is_empty(),
        "cistern never asked the mirror (first upstream) for z\n{}",
        ctx()
    );
    assert!(
        mirror_z.iter().all(|r| r.status == 404),
        "the mirror answered z with something other than 404: {mirror_z:#?}"
    );
    assert_served_all(
        &origin,
        "library/z",
        &z,
        "z's blobs must all come from origin after the mirror's 404",
        &ctx,
    );
    eprintln!(
        "mirror requests for z (all 404): {:?}",
        mirror_z
            .iter()
            .map(|r| format!("{} {}", r.method, r.uri))
            .collect::<Vec<_>>()
    );
    assert!(
        mirror_z.len() > BREAKER_FAILURES as usize,
        "fewer 404s than breaker_failures: the check below would prove nothing"
    );
    // v: after those 404s the mirror still serves (its breaker did not open).
    let why = format!(
        "after {} 404s from the mirror, v's blobs must still come from it (404 is not a \
         breaker failure)",
        mirror_z.len()
    );
    assert_served_all(&mirror, "library/v", &v, &why, &ctx);
    let origin_v = blob_gets_for(&origin, "library/v");
    assert!(
        origin_v.is_empty(),
        "origin got blob GETs for v although the mirror has it: {origin_v:#?}\n{}",
        ctx()
    );

    // No registry named: the default route (docker.io).
    let r = daemon::http_get(cistern.addr, "/v2/library/x/manifests/1", &[]).unwrap();
    assert_eq!(
        (r.status, r.header("Docker-Content-Digest")),
        (200, Some(x.digest.as_str())),
        "a request with no ns and no registry prefix must take the default route\n{}",
        ctx()
    );

    // An unconfigured registry: 404 NAME_UNKNOWN from cistern...
    let r = daemon::http_get(cistern.addr, "/v2/org/q/manifests/1?ns=quay.io", &[]).unwrap();
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(
        r.status == 404 && body.contains("NAME_UNKNOWN"),
        "GET /v2/org/q/manifests/1?ns=quay.io: {} {body}\n{}",
        r.status,
        ctx()
    );
    // ... so containerd moves on to quay.io's `server` (a dead port) and the pull fails.
    let mut pull = ctd.pull_command(NS, &hosts, &[], "quay.io/org/q:1");
    let out = daemon::run(&mut pull, FAILING_PULL_LIMIT);
    assert!(
        !out.status.success(),
        "pulling quay.io/org/q:1 (no route in cistern, dead server) succeeded:\n{}\n{}",
        output_text(&out),
        ctx()
    );
    eprintln!("quay.io pull failed as expected:\n{}", output_text(&out));
    let log = std::fs::read_to_string(&cistern.daemon.log).unwrap_or_default();
    let q_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("/v2/org/q/manifests/1"))
        .collect();
    // containerd resolves with a HEAD (the raw GET above is ours).
    assert!(
        q_lines.iter().any(|l| l.contains("HEAD")) && q_lines.iter().all(|l| l.contains("404")),
        "cistern's log must show its 404 for containerd's HEAD of org/q (and nothing but 404s): {q_lines:#?}\n{}",
        ctx()
    );
    for r in regs {
        r.settle(LOG_QUIET);
        let leaked = requests_for(r, "org/q");
        assert!(
            leaked.is_empty(),
            "an upstream got requests for quay.io's org/q: {leaked:#?}\n{}",
            ctx()
        );
    }
}

#[test]
fn containerd_falls_back_when_mirror_is_killed() {
    let Some(work) = e2e::begin(
        "containerd_falls_back_when_mirror_is_killed",
        e2e::CONTAINERD_TOOLS,
        true,
        "fallback-killed",
    ) else {
        return;
    };
    let [mut mirror, origin] = start_registries(&work, ["mirror", "origin"]);
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    let layout = write_layout(&work.sub("images"), &["x", "w"]);
    let (x, w) = {
        let rctx = || logs(&[&mirror, &origin], None, "");
        let both = [&mirror, &origin];
        let x = push_to_each(&skopeo, &layout, "x", &both, "library/x", &rctx);
        let w = push_to_each(&skopeo, &layout, "w", &both, "library/w", &rctx);
        (x, w)
    };

    let cistern = start_cistern(&work, &url(&mirror), &origin, None, None);
    let (ctd, hosts) = start_containerd(&work, &cistern);

    // While the mirror is up, it serves.
    {
        let ctx = || logs(&[&mirror, &origin], Some(&cistern), &ctd.daemon.tail(30));
        ctr_pull(&ctd, &hosts, "docker.io/library/x:1", &x, &ctx);
        mirror.settle(LOG_QUIET);
        origin.settle(LOG_QUIET);
        assert_served_all(
            &mirror,
            "library/x",
            &x,
            "with the mirror up, x's blobs must come from it",
            &ctx,
        );
        assert!(blob_gets_for(&origin, "library/x").is_empty());
    }

    // The mirror's process is stopped; nothing listens on its port any more.
    if let Err(e) = mirror.daemon.terminate() {
        panic!("{e}");
    }
    assert!(
        daemon::http_get(mirror.addr, "/v2/", &[]).is_err(),
        "the stopped mirror's port still answers"
    );
    let ctx = || logs(&[&mirror, &origin], Some(&cistern), &ctd.daemon.tail(30));
    ctr_pull(&ctd, &hosts, "docker.io/library/w:1", &w, &ctx);
    origin.settle(LOG_QUIET);
    assert_served_all(
        &origin,
        "library/w",
        &w,
        "with the mirror stopped, w's blobs must all come from origin",
        &ctx,
    );
    let mirror_w = blob_gets_for(&mirror, "library/w");
    assert!(
        mirror_w.is_empty(),
        "the stopped mirror logged blob GETs for w: {mirror_w:#?}"
    );
}

#[test]
fn containerd_falls_back_when_mirror_never_answers() {
    let Some(work) = e2e::begin(
        "containerd_falls_back_when_mirror_never_answers",
        e2e::CONTAINERD_TOOLS,
        true,
        "fallback-silent",
    ) else {
        return;
    };
    let origin = Registry::start(&work.sub("origin"));
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    let layout = write_layout(&work.sub("images"), &["h", "h2"]);
    let rctx = || logs(&[&origin], None, "");
    let h = push(&skopeo, &layout, "h", &origin, "library/h", &rctx);
    let h2 = push(&skopeo, &layout, "h2", &origin, "library/h2", &rctx);

    let mut silent = Silent::start();
    let silent_url = format!("http://{}", silent.addr);
    let cistern = start_cistern(&work, &silent_url, &origin, None, None);
    let (ctd, hosts) = start_containerd(&work, &cistern);
    let ctx = || logs(&[&origin], Some(&cistern), &ctd.daemon.tail(30));

    let started = Instant::now();
    let what = "pull with a mirror that never answers (header_timeout = 2s)";
    ctr_pull_past_silent(&ctd, &hosts, "docker.io/library/h:1", &h, what, &ctx);
    let took = started.elapsed();
    origin.settle(LOG_QUIET);
    let why = "h's blobs must all come from origin";
    assert_served_all(&origin, "library/h", &h, why, &ctx);

    // By now the mirror has failed at least BREAKER_FAILURES times in a row (a tag HEAD, a
    // manifest GET and blob GETs for h, each timed out): its circuit is open, and the next
    // pull does not wait for it at all.
    let what = "second pull with the silent mirror";
    ctr_pull_past_silent(&ctd, &hosts, "docker.io/library/h2:1", &h2, what, &ctx);
    origin.settle(LOG_QUIET);
    let why = "h2's blobs must all come from origin";
    assert_served_all(&origin, "library/h2", &h2, why, &ctx);

    let (accepted, lines) = silent.finish();
    eprintln!(
        "silent mirror: {accepted} connections, requests {lines:#?}; first pull took {took:?} \
         (informational, not asserted)"
    );
    let for_h = lines
        .iter()
        .filter(|l| l.contains("/v2/library/h/"))
        .count();
    assert!(
        for_h >= BREAKER_FAILURES as usize,
        "the silent mirror (first upstream) got {for_h} requests for h, expected at least \
         breaker_failures = {BREAKER_FAILURES} (each one a header timeout) before its circuit \
         opened: {accepted} connections, requests {lines:#?}\n{}",
        ctx()
    );
    let for_h2: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("/v2/library/h2/"))
        .collect();
    assert!(
        for_h2.is_empty(),
        "after {for_h} consecutive header timeouts (breaker_failures = {BREAKER_FAILURES}) the \
         silent mirror's circuit should be open, yet cistern sent it: {for_h2:#?}\n{}",
        ctx()
    );
}

#[test]
fn skopeo_path_prefix_names_the_registry() {
    let Some(work) = e2e::begin(
        "skopeo_path_prefix_names_the_registry",
        e2e::SKOPEO_TOOLS,
        false,
        "fallback-prefix",
    ) else {
        return;
    };
    let [mirror, origin, ghcr] = start_registries(&work, ["mirror", "origin", "ghcr"]);
    let regs = [&mirror, &origin, &ghcr];
    let rctx = || logs(&regs, None, "");
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    // `org/y:1` is one image on ghcr and another on origin: the registry in the path decides.
    // `library/s:1` is stale on the mirror: only origin may resolve docker.io tags.
    let layout = write_layout(
        &work.sub("images"),
        &["y", "y-on-docker-hub", "s-old", "s-new"],
    );
    let y = push(&skopeo, &layout, "y", &ghcr, "org/y", &rctx);
    let y_hub = push(&skopeo, &layout, "y-on-docker-hub", &origin, "org/y", &rctx);
    assert_ne!(y.digest, y_hub.digest);
    let s_old = push(&skopeo, &layout, "s-old", &mirror, "library/s", &rctx);
    let s_new = push(&skopeo, &layout, "s-new", &origin, "library/s", &rctx);
    assert_ne!(s_old.digest, s_new.digest);

    let cistern = start_cistern(
        &work,
        &url(&mirror),
        &origin,
        Some(&ghcr),
        Some(&["origin"]),
    );
    let host = cistern.host();
    let ctx = || logs(&regs, Some(&cistern), "");

    let raw = skopeo.inspect_raw(&format!("{host}/ghcr.io/org/y:1"), &ctx);
    assert!(
        raw == y.manifest,
        "skopeo inspect --raw {host}/ghcr.io/org/y:1: got {} bytes ({}), want ghcr's {} bytes ({})\n{}",
        raw.len(),
        image::sha256_digest(&raw),
        y.manifest.len(),
        y.digest,
        ctx()
    );
    let by_digest = skopeo.inspect_raw(&format!("{host}/ghcr.io/org/y@{}", y.digest), &ctx);
    assert!(by_digest == y.manifest, "ghcr.io/org/y by digest");
    let raw = skopeo.inspect_raw(&format!("{host}/org/y:1"), &ctx);
    assert!(
        raw == y_hub.manifest,
        "skopeo inspect --raw {host}/org/y:1 (default route) must be origin's org/y ({}), got {}\n{}",
        y_hub.digest,
        image::sha256_digest(&raw),
        ctx()
    );

    // tags_from = ["origin"]: the mirror's stale tag is never asked for, origin's wins.
    let raw = skopeo.inspect_raw(&format!("{host}/library/s:1"), &ctx);
    assert!(
        raw == s_new.manifest,
        "library/s:1 with tags_from = [\"origin\"]: got {}, want origin's {} (the mirror's stale \
         one is {})\n{}",
        image::sha256_digest(&raw),
        s_new.digest,
        s_old.digest,
        ctx()
    );

    // A full copy by the prefixed name: every blob from ghcr.
    let dest = work.sub("copy-y");
    skopeo.copy_to_dir(&format!("{host}/ghcr.io/org/y:1"), &dest, &ctx);
    check_copied_dir(&dest, &y);
    for r in regs {
        r.settle(LOG_QUIET);
    }
    let why = "y's blobs must come from the ghcr.io upstream";
    assert_served_all(&ghcr, "org/y", &y, why, &ctx);
    let tag_asked: Vec<Request> = requests_for(&mirror, "library/s")
        .into_iter()
        .filter(|r| r.uri.starts_with("/v2/library/s/manifests/1"))
        .collect();
    assert!(
        tag_asked.is_empty(),
        "the mirror is not in tags_from, yet cistern asked it for the tag: {tag_asked:#?}\n{}",
        ctx()
    );
    for (name, r) in [("mirror", &mirror), ("origin", &origin)] {
        let wrong: Vec<Request> = blob_gets_for(r, "org/y");
        assert!(
            wrong.is_empty(),
            "docker.io upstream {name} got blob GETs for the ghcr.io copy: {wrong:#?}\n{}",
            ctx()
        );
    }
}

#[test]
fn skopeo_falls_back_on_content_that_fails_verification() {
    let Some(work) = e2e::begin(
        "skopeo_falls_back_on_content_that_fails_verification",
        e2e::SKOPEO_TOOLS,
        false,
        "fallback-verify",
    ) else {
        return;
    };
    let [mirror, origin] = start_registries(&work, ["mirror", "origin"]);
    let regs = [&mirror, &origin];
    let rctx = || logs(&regs, None, "");
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    let layout = write_layout(&work.sub("images"), &["corrupt-manifest", "corrupt-layer"]);
    let cm = push_to_each(
        &skopeo,
        &layout,
        "corrupt-manifest",
        &regs,
        "library/cm",
        &rctx,
    );
    let cl = push_to_each(
        &skopeo,
        &layout,
        "corrupt-layer",
        &regs,
        "library/cl",
        &rctx,
    );

    // The mirror's copies go bad on disk; it serves them as they are (checked straight from
    // the registry, so what follows is cistern's doing).
    let manifest_path = mirror.blob_data_path(&cm.digest);
    let good = std::fs::read(&manifest_path).unwrap();
    assert!(good == cm.manifest, "registry storage layout changed?");
    let text = String::from_utf8(good).unwrap();
    assert!(text.contains("\"corrupt-manifest\""));
    std::fs::write(
        &manifest_path,
        text.replace("\"corrupt-manifest\"", "\"CORRUPT-manifest\""),
    )
    .unwrap();
    let r = daemon::http_get(
        mirror.addr,
        &format!("/v2/library/cm/manifests/{}", cm.digest),
        &[("Accept", image::OCI_MANIFEST)],
    )
    .unwrap();
    assert!(
        r.status == 200 && image::sha256_digest(&r.body) != cm.digest,
        "control: the mirror must serve the altered manifest under its old digest: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let layer = cl
        .blobs
        .iter()
        .find(|d| **d != config_digest(&cl))
        .unwrap()
        .clone();
    let layer_path = mirror.blob_data_path(&layer);
    let mut bytes = std::fs::read(&layer_path).unwrap();
    assert_eq!(image::sha256_digest(&bytes), layer);
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&layer_path, &bytes).unwrap();
    let r = daemon::http_get(mirror.addr, &format!("/v2/library/cl/blobs/{layer}"), &[]).unwrap();
    assert!(
        r.status == 200 && r.body.len() == bytes.len() && image::sha256_digest(&r.body) != layer,
        "control: the mirror must serve the corrupted layer in full: {}",
        r.status
    );

    let cistern = start_cistern(&work, &url(&mirror), &origin, None, None);
    let host = cistern.host();
    let ctx = || logs(&regs, Some(&cistern), "");

    // A manifest that does not verify: passed over, origin's bytes served.
    let raw = skopeo.inspect_raw(&format!("{host}/library/cm:1"), &ctx);
    assert!(
        raw == cm.manifest,
        "library/cm:1 with a corrupt manifest on the mirror: got {} ({} bytes), want origin's \
         {}\n{}",
        image::sha256_digest(&raw),
        raw.len(),
        cm.digest,
        ctx()
    );

    // A layer that does not verify. Cistern streams blobs as they arrive, so the client that
    // triggered the fill may see its response aborted (the final byte is withheld until the
    // digest checks out); but the fill must then go on to origin, and the blob must become
    // pullable: the very next pull has to succeed with origin's bytes.
    let first = skopeo.try_copy_to_dir(&format!("{host}/library/cl:1"), &work.sub("copy-1"));
    eprintln!(
        "first pull of library/cl:1 (corrupt layer on the mirror): {}",
        first.status
    );
    let copied = if first.status.success() {
        work.path.join("copy-1")
    } else {
        let second = skopeo.try_copy_to_dir(&format!("{host}/library/cl:1"), &work.sub("copy-2"));
        // Diagnosis only, when the second pull failed: do more pulls than breaker_failures
        // get through once the mirror's circuit should have opened?
        let later: Vec<bool> = if second.status.success() {
            Vec::new()
        } else {
            (0..2 * BREAKER_FAILURES)
                .map(|i| {
                    skopeo
                        .try_copy_to_dir(
                            &format!("{host}/library/cl:1"),
                            &work.sub(&format!("copy-diag-{i}")),
                        )
                        .status
                        .success()
                })
                .collect()
        };
        let log = std::fs::read_to_string(&cistern.daemon.log).unwrap_or_default();
        let about_layer: Vec<&str> = log.lines().filter(|l| l.contains(&layer[7..])).collect();
        assert!(
            second.status.success(),
            "library/cl:1, whose layer {layer} is corrupt on the mirror and intact on origin: \
             the first pull failed (acceptable: its response was streamed from the mirror), and \
             the second pull failed too; content that fails digest verification must send the \
             fill to the next upstream.\nfirst pull:\n{}\nsecond pull:\n{}\n{} further pulls \
             (breaker_failures = {BREAKER_FAILURES}), succeeded?: {later:?}\ncistern log lines \
             about the layer:\n{}\norigin requests for it: {:#?}\n{}",
            output_text(&first),
            output_text(&second),
            later.len(),
            about_layer.join("\n"),
            requests_for(&origin, "library/cl")
                .iter()
                .filter(|r| r.uri.contains(&layer))
                .collect::<Vec<_>>(),
            ctx()
        );
        work.path.join("copy-2")
    };
    check_copied_dir(&copied, &cl);
    origin.settle(LOG_QUIET);
    assert!(
        served_blobs(&origin, "library/cl").contains(&layer),
        "origin never served the layer that is corrupt on the mirror\n{}",
        ctx()
    );
    let cached = std::fs::read(cistern.blob_path(&layer)).unwrap_or_default();
    assert_eq!(
        image::sha256_digest(&cached),
        layer,
        "cistern's cached copy of the layer"
    );
}

/// The config blob's digest of a single-image `Seeded`.
fn config_digest(seeded: &Seeded) -> String {
    let v: serde_json::Value = serde_json::from_slice(&seeded.manifest).unwrap();
    v["config"]["digest"].as_str().unwrap().to_string()
}
