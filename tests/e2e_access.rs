//! End-to-end tests of client access control (`[access]`, issue 17): real clients (skopeo,
//! podman, containerd's `ctr`) log in to cistern the way each of them logs in to a registry,
//! and pull through a route whose upstream holds credentials. Same harness and rules as
//! `tests/e2e_real_clients.rs` (tests/e2e/): every process a child of the test, stopped by PID
//! through Drop guards; temp dirs only; every wait bounded; no timing assertions.
//!
//! # Running
//!
//! ```text
//! cargo test --test e2e_access      # as root: containerd needs it
//! ```
//!
//! Missing tools (or root, for containerd) print `SKIPPED: ...` and pass (the test needs
//! skopeo and docker-registry; podman and containerd each skip only their own part), unless
//! `CISTERN_REQUIRE_E2E=1`, which makes them fail. `CISTERN_E2E_KEEP=1` keeps the temp dirs.
//!
//! # Setup
//!
//! One registry (Debian's `docker-registry`, no auth of its own), one small image per
//! repository (its own config and layer, so no digest can stand in for another's), and
//! cisterns configured with:
//!
//! ```toml
//! [upstreams.hub]                 # holds credentials: the route is "credentialed"
//! url = "http://REGISTRY"
//! username = "puller"             # the registry never asks for them, so pulls work,
//! password = "upstream-secret"    # but cistern must guard the route as if it did
//! [upstreams.plain]               # the same registry without credentials
//! url = "http://REGISTRY"
//! [[routes]]
//! registry = "docker.io"
//! upstreams = ["hub"]
//! default = true
//! [[routes]]
//! registry = "plain.test"
//! upstreams = ["plain"]
//! [access]
//! htpasswd_file = "WORK/htpasswd" # bcrypt (cost 4), written by the test
//! anonymous = ["*", "docker.io/library/*"]    # the "mixed" cistern; [] for "login-only"
//! [access.users]
//! team = ["docker.io/team/*"]
//! outsider = ["docker.io/outsider/*"]
//! ```
//!
//! `*` opens the uncredentialed route to anonymous clients but must not open the credentialed
//! one: only the literal `docker.io/library/*` does, for `library/` alone. Give `hub` no
//! credentials and every anonymous "refused" check below fails (so does every `outsider`
//! check with `outsider = ["docker.io/*"]`).
//!
//! # What `clients_log_in_to_pull_through_a_credentialed_route` proves, for each client
//!
//! Each client has its own repository, `team/<client>:1.0`, which no anonymous pattern
//! covers on the credentialed route.
//! - Control: anonymously, the client pulls `library/open:1.0` through the mixed cistern with
//!   the registry's digest (the client setup works, the literal pattern opens the route).
//! - Anonymously, the pull of `team/<client>:1.0` fails, and the client reports cistern's 401.
//! - Logged in as `outsider` (valid credentials, no pattern for `team/`), it fails with
//!   cistern's 403 `DENIED`.
//! - Neither refused pull reached the upstream: the registry's access log has no request at
//!   all in that window.
//! - Logged in as `team`, the pull succeeds with the registry's exact manifest digest.
//!
//! How each client logs in:
//! - skopeo: `--src-creds USER:PASSWORD`.
//! - podman: `--authfile` with `{"auths": {"<cistern host:port>": {"auth": "<base64>"}}}`, and
//!   its `registries.conf` making cistern the docker.io mirror (`location` a dead port; podman
//!   retries a failed pull 3 times, a second apart, when that dead port is its last error,
//!   which is most of this test's wall time).
//! - ctr: `--hosts-dir` whose `docker.io/hosts.toml` has cistern as the one host, with
//!   `[host."http://CISTERN".header] authorization = "Basic <base64>"` (containerd sends it on
//!   every request to that host, so it never needs a challenge).
//!
//! skopeo and podman (containers/image) send credentials only for the challenges they saw on
//! the `GET /v2/` ping. Both cisterns have users, so both challenge an anonymous ping, and
//! clients without credentials answer with empty ones, which cistern takes as anonymous. The
//! first test's logged-in checks for skopeo and podman run against the login-only cistern,
//! ctr's against the mixed one; skopeo also pulls `plain.test/team/skopeo:1.0` anonymously
//! from the mixed cistern: the same repository, through the uncredentialed route, is open to
//! `*`. Finally no password (nor its base64) is in either cistern's log.
//!
//! The three clients run in turn against the same cisterns; each part runs even when an
//! earlier one failed, and the test then fails naming every client that did.
//!
//! # `containers_image_clients_log_in_where_anonymous_clients_may_pull_too`
//!
//! The same checks for skopeo and podman, all against the mixed cistern: what the issue asks
//! (anonymous patterns and users in one config). It failed until an anonymous ping was
//! challenged whenever users exist.

#[allow(dead_code)] // the harness serves several test crates; this one uses part of it
mod e2e;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use e2e::cistern::Cistern;
use e2e::containerd::{self, Containerd};
use e2e::daemon;
use e2e::fixtures::{self, Seeded};
use e2e::image::sha256_digest;
use e2e::podman::{self, Podman};
use e2e::registry::{LOG_QUIET, Registry};
use e2e::skopeo::Skopeo;

const TEAM: (&str, &str) = ("team", "team-pass");
const OUTSIDER: (&str, &str) = ("outsider", "outsider-pass");
/// The route's upstream login: never sent (the registry does not ask) and never to be seen
/// in cistern's log.
const UPSTREAM_PASSWORD: &str = "upstream-secret";

/// Logs of every process involved, for failure messages.
fn logs(registry: &Registry, cistern: &Cistern) -> String {
    e2e::logs(&[registry], Some(cistern))
}

/// `user:password` in base64, as in `Authorization: Basic` and an auth file's `auth`.
fn basic((user, password): (&str, &str)) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// The htpasswd file of [`TEAM`] and [`OUTSIDER`]: bcrypt, as `htpasswd -B` writes it, at the
/// lowest cost to keep the test fast.
fn write_htpasswd(path: &Path) {
    let text: String = [TEAM, OUTSIDER]
        .iter()
        .map(|(user, password)| format!("{user}:{}\n", bcrypt::hash(password, 4).unwrap()))
        .collect();
    std::fs::write(path, text).unwrap();
}

/// The anonymous patterns of the "mixed" cistern (module docs).
const MIXED: &[&str] = &["*", "docker.io/library/*"];

/// The `[upstreams.*]`, `[[routes]]` and `[access]` tables of the module docs, with
/// `anonymous` patterns.
fn config(registry: SocketAddr, htpasswd: &Path, anonymous: &[&str]) -> String {
    let anonymous = serde_json::to_string(anonymous).unwrap();
    format!(
        "[upstreams.hub]\n\
         url = \"http://{registry}\"\n\
         username = \"puller\"\n\
         password = \"{UPSTREAM_PASSWORD}\"\n\
         [upstreams.plain]\n\
         url = \"http://{registry}\"\n\
         [[routes]]\n\
         registry = \"docker.io\"\n\
         upstreams = [\"hub\"]\n\
         default = true\n\
         [[routes]]\n\
         registry = \"plain.test\"\n\
         upstreams = [\"plain\"]\n\
         [access]\n\
         htpasswd_file = \"{}\"\n\
         anonymous = {anonymous}\n\
         [access.users]\n\
         {} = [\"docker.io/team/*\"]\n\
         {} = [\"docker.io/outsider/*\"]\n",
        htpasswd.display(),
        TEAM.0,
        OUTSIDER.0,
    )
}

/// What one client is asked to do; each client implements it its own way.
trait Client {
    /// Pulls `docker.io/<repo>:<tag>` of `seeded` through cistern, logged in as `login`
    /// (`None`: anonymously). `Ok` with the digest the client reports for what it pulled,
    /// `Err` with its output if it failed.
    fn pull(&self, seeded: &Seeded, login: Option<(&str, &str)>) -> Result<String, String>;
}

/// The output of a failed client command, for the assertions and their messages.
fn failure(out: &Output) -> Result<String, String> {
    Err(format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The anonymous checks (module docs): the control through the literal pattern, then a
/// refused pull of `team` that never reaches the upstream.
fn check_anonymous(
    what: &str,
    client: &dyn Client,
    open: &Seeded,
    team: &Seeded,
    registry: &Registry,
    ctx: &dyn Fn() -> String,
) {
    match client.pull(open, None) {
        Ok(digest) => assert_eq!(
            digest,
            open.digest,
            "{what}: anonymous pull of {} (control): digest\n{}",
            open.repo,
            ctx()
        ),
        Err(e) => panic!(
            "{what}: anonymous pull of {} (control, which the literal pattern opens) failed: {e}\n{}",
            open.repo,
            ctx()
        ),
    }
    refused_without_asking_upstream(what, registry, ctx, || match client.pull(team, None) {
        Ok(digest) => panic!(
            "{what}: an anonymous client pulled {} ({digest}) through the credentialed route\n{}",
            team.repo,
            ctx()
        ),
        Err(e) => assert!(
            e.contains("401") || e.to_ascii_lowercase().contains("unauthorized"),
            "{what}: the anonymous pull of {} failed, but not with cistern's 401: {e}\n{}",
            team.repo,
            ctx()
        ),
    });
}

/// The logged-in checks (module docs): [`OUTSIDER`] is refused `team` without the upstream
/// being asked, [`TEAM`] pulls it with the registry's digest.
fn check_logins(
    what: &str,
    client: &dyn Client,
    team: &Seeded,
    registry: &Registry,
    ctx: &dyn Fn() -> String,
) {
    refused_without_asking_upstream(what, registry, ctx, || {
        match client.pull(team, Some(OUTSIDER)) {
            Ok(digest) => panic!(
                "{what}: user {} pulled {} ({digest}) without a pattern for it\n{}",
                OUTSIDER.0,
                team.repo,
                ctx()
            ),
            Err(e) => assert!(
                e.contains("403") || e.to_ascii_lowercase().contains("denied"),
                "{what}: user {}'s pull of {} failed, but not with cistern's 403: {e}\n{}",
                OUTSIDER.0,
                team.repo,
                ctx()
            ),
        }
    });
    match client.pull(team, Some(TEAM)) {
        Ok(digest) => assert_eq!(
            digest,
            team.digest,
            "{what}: user {}'s pull of {}: digest\n{}",
            TEAM.0,
            team.repo,
            ctx()
        ),
        Err(e) => panic!(
            "{what}: user {} may pull {}, yet the pull failed: {e}\n{}",
            TEAM.0,
            team.repo,
            ctx()
        ),
    }
}

/// Runs `refused` (a pull that must fail) and checks that the registry saw no request at all
/// meanwhile: cistern refused before asking the upstream anything.
fn refused_without_asking_upstream(
    what: &str,
    registry: &Registry,
    ctx: &dyn Fn() -> String,
    refused: impl FnOnce(),
) {
    registry.settle(LOG_QUIET);
    let before = registry.requests().len();
    refused();
    registry.settle(LOG_QUIET);
    let asked = &registry.requests()[before..];
    assert!(
        asked.is_empty(),
        "{what}: cistern asked the upstream for a pull it refused: {asked:#?}\n{}",
        ctx()
    );
}

/// skopeo: `copy --all docker://CISTERN/REPO:TAG dir:DEST`, with `--src-creds` to log in; the
/// digest is that of the `manifest.json` it wrote, whose blobs must all be there and whole.
struct SkopeoClient<'a> {
    skopeo: &'a Skopeo,
    host: String,
    dir: PathBuf,
}

impl SkopeoClient<'_> {
    fn copy(
        &self,
        reference: &str,
        seeded: &Seeded,
        login: Option<(&str, &str)>,
    ) -> Result<String, String> {
        let dest = self.dir.join(format!(
            "{}-{}",
            reference.replace(['/', ':'], "_"),
            login.map_or("anonymous", |l| l.0)
        ));
        let creds = login.map(|(u, p)| format!("{u}:{p}"));
        let extra: Vec<&str> = match &creds {
            Some(c) => vec!["--src-creds", c],
            None => vec![],
        };
        let out = self.skopeo.try_copy_to_dir_with(reference, &dest, &extra);
        if !out.status.success() {
            return failure(&out);
        }
        let manifest = std::fs::read(dest.join("manifest.json")).unwrap();
        for blob in &seeded.blobs {
            let hex = blob.strip_prefix("sha256:").unwrap();
            if let Err(e) = fixtures::check_blob_file(&dest.join(hex), blob) {
                panic!("skopeo: {reference}: blob {blob} not copied whole: {e}");
            }
        }
        Ok(sha256_digest(&manifest))
    }
}

impl Client for SkopeoClient<'_> {
    fn pull(&self, seeded: &Seeded, login: Option<(&str, &str)>) -> Result<String, String> {
        self.copy(&seeded.reference(&self.host), seeded, login)
    }
}

/// podman: `pull docker.io/REPO:TAG` with cistern as the docker.io mirror, each pull into
/// fresh storage; `--authfile` to log in. The digest is `podman image inspect`'s.
struct PodmanClient {
    conf: PathBuf,
    dir: PathBuf,
    host: String,
}

impl Client for PodmanClient {
    fn pull(&self, seeded: &Seeded, login: Option<(&str, &str)>) -> Result<String, String> {
        let name = format!(
            "{}-{}",
            seeded.repo.replace('/', "_"),
            login.map_or("anonymous", |l| l.0)
        );
        let podman = Podman::new(&self.dir.join(&name), &self.conf);
        let mut extra = vec![];
        let authfile = self.dir.join(format!("{name}-auth.json"));
        if let Some(login) = login {
            let auths = serde_json::json!({ "auths": { &self.host: { "auth": basic(login) } } });
            std::fs::write(&authfile, auths.to_string()).unwrap();
            extra = vec!["--authfile", authfile.to_str().unwrap()];
        }
        let reference = format!("docker.io/{}:{}", seeded.repo, seeded.tag);
        let out = podman.pull_output(&reference, &extra);
        if !out.status.success() {
            return failure(&out);
        }
        Ok(podman.inspect(&reference, "{{.Digest}}", &|| String::new()))
    }
}

/// ctr: `images pull --hosts-dir HOSTS docker.io/REPO:TAG`, where HOSTS has cistern as the one
/// docker.io host, with the login as its `authorization` header. Each pull in its own
/// namespace; the digest is `ctr images check`'s, which must also say complete and unpacked.
struct CtrClient<'a> {
    containerd: &'a Containerd,
    dir: &'a Path,
    host: String,
    dead_port: u16,
}

const CTR_LIMIT: Duration = Duration::from_secs(90);

impl Client for CtrClient<'_> {
    fn pull(&self, seeded: &Seeded, login: Option<(&str, &str)>) -> Result<String, String> {
        let who = login.map_or("anonymous", |l| l.0);
        let authorization = login.map(|l| format!("Basic {}", basic(l)));
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|a| ("authorization", a.as_str()))
            .collect();
        let hosts = containerd::hosts_dir_with_headers(
            &self.dir.join(format!("hosts-{who}")),
            "docker.io",
            &self.host,
            self.dead_port,
            &headers,
        );
        let namespace = format!("{}-{who}", seeded.repo.replace('/', "-"));
        let reference = format!("docker.io/{}:{}", seeded.repo, seeded.tag);
        let mut cmd = self
            .containerd
            .pull_command(&namespace, &hosts, &[], &reference);
        let out = daemon::run(&mut cmd, CTR_LIMIT);
        if !out.status.success() {
            return failure(&out);
        }
        let ctx = || self.containerd.daemon.tail(30);
        self.containerd
            .check_image(&namespace, &reference, seeded, &ctx);
        Ok(seeded.digest.clone())
    }
}

/// Runs each part in turn, all of them even when one fails (its panic message is printed as
/// usual), then fails naming every part that did.
fn run_parts(parts: &[(&str, &dyn Fn())]) {
    let failed: Vec<&str> = parts
        .iter()
        .filter(|(_, part)| std::panic::catch_unwind(std::panic::AssertUnwindSafe(part)).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(failed.is_empty(), "failed for: {}", failed.join(", "));
}

const REPOS: [&str; 4] = ["library/open", "team/skopeo", "team/podman", "team/ctr"];

/// What both tests begin with: the registry seeded with [`REPOS`], the skopeo that seeded
/// it, the htpasswd file, and the "mixed" cistern (module docs).
struct Mixed {
    work: e2e::Workdir,
    registry: Registry,
    skopeo: Skopeo,
    /// `library/open`, which the literal anonymous pattern opens.
    open: Seeded,
    /// `team/skopeo`, `team/podman` and `team/ctr`: one per client.
    team: [Seeded; 3],
    htpasswd: PathBuf,
    cistern: Cistern,
}

/// [`e2e::begin`] (`None`: a tool is missing and the test skips), then [`Mixed`].
fn begin_mixed(test: &str, tools: &[&str], short: &str) -> Option<Mixed> {
    let work = e2e::begin(test, tools, false, short)?;
    let registry = Registry::start(&work.sub("registry"));
    let skopeo = Skopeo::new(&work.sub("skopeo"));
    let rctx = || e2e::logs(&[&registry], None);
    let seeded = fixtures::seed_small(&work.sub("images"), &skopeo, registry.addr, &REPOS, &rctx);
    let Ok([open, team_skopeo, team_podman, team_ctr]) = <[Seeded; 4]>::try_from(seeded) else {
        unreachable!("one image per repository")
    };
    let htpasswd = work.path.join("htpasswd");
    write_htpasswd(&htpasswd);
    let cistern = start_cistern(&work, "cistern-mixed", &registry, &htpasswd, MIXED);
    Some(Mixed {
        work,
        registry,
        skopeo,
        open,
        team: [team_skopeo, team_podman, team_ctr],
        htpasswd,
        cistern,
    })
}

/// A cistern (state under `work/<dir>`) with the module docs' config and `anonymous`.
fn start_cistern(
    work: &e2e::Workdir,
    dir: &str,
    registry: &Registry,
    htpasswd: &Path,
    anonymous: &[&str],
) -> Cistern {
    Cistern::start_routes(&work.sub(dir), &config(registry.addr, htpasswd, anonymous))
}

impl Mixed {
    /// Another cistern in front of the same registry, with other `anonymous` patterns.
    fn another_cistern(&self, dir: &str, anonymous: &[&str]) -> Cistern {
        start_cistern(&self.work, dir, &self.registry, &self.htpasswd, anonymous)
    }

    /// The logs of the registry and `cistern`, for failure messages.
    fn logs(&self, cistern: &Cistern) -> String {
        logs(&self.registry, cistern)
    }

    /// skopeo pulling from `cistern` into `work/skopeo-pulls`.
    fn skopeo_client(&self, cistern: &Cistern) -> SkopeoClient<'_> {
        SkopeoClient {
            skopeo: &self.skopeo,
            host: cistern.host(),
            dir: self.work.sub("skopeo-pulls"),
        }
    }

    /// podman with `cistern` as its docker.io mirror (configured in `work/<conf>`), pulling
    /// into `work/podman`.
    fn podman_client(&self, cistern: &Cistern, conf: &str, dead_port: u16) -> PodmanClient {
        PodmanClient {
            conf: podman::registries_conf(
                &self.work.sub(conf),
                "docker.io",
                &cistern.host(),
                dead_port,
            ),
            dir: self.work.sub("podman"),
            host: cistern.host(),
        }
    }
}

/// Neither the clients' credentials nor the upstream's password ever reach cistern's log.
fn check_no_secret_logged(cistern: &Cistern) {
    let log = std::fs::read_to_string(&cistern.daemon.log).unwrap();
    for secret in [
        TEAM.1,
        OUTSIDER.1,
        UPSTREAM_PASSWORD,
        &basic(TEAM),
        &basic(OUTSIDER),
    ] {
        assert!(!log.contains(secret), "cistern logged a secret ({secret})");
    }
}

#[test]
fn clients_log_in_to_pull_through_a_credentialed_route() {
    const TEST: &str = "clients_log_in_to_pull_through_a_credentialed_route";
    let Some(m) = begin_mixed(TEST, e2e::SKOPEO_TOOLS, "access") else {
        return;
    };
    let [team_skopeo, team_podman, team_ctr] = &m.team;
    let mixed = &m.cistern;
    let login_only = m.another_cistern("cistern-login-only", &[]);
    let mctx = || m.logs(mixed);
    let lctx = || m.logs(&login_only);
    let dead_port = daemon::free_port();

    let skopeo_part = || {
        let on_mixed = m.skopeo_client(mixed);
        check_anonymous(
            "skopeo",
            &on_mixed,
            &m.open,
            team_skopeo,
            &m.registry,
            &mctx,
        );
        // The same repository through the route without credentials: `*` opens it.
        let plain = format!(
            "{}/plain.test/{}:{}",
            mixed.host(),
            team_skopeo.repo,
            team_skopeo.tag
        );
        match on_mixed.copy(&plain, team_skopeo, None) {
            Ok(digest) => assert_eq!(digest, team_skopeo.digest, "skopeo: {plain}"),
            Err(e) => panic!(
                "skopeo: anonymous pull of {plain} (uncredentialed route, open to \"*\") failed: {e}\n{}",
                mctx()
            ),
        }
        let on_login_only = m.skopeo_client(&login_only);
        check_logins("skopeo", &on_login_only, team_skopeo, &m.registry, &lctx);
    };
    let podman_part = || {
        if !e2e::prerequisites(&format!("{TEST} (podman)"), &["podman"], false) {
            return;
        }
        let on_mixed = m.podman_client(mixed, "podman-conf-mixed", dead_port);
        check_anonymous(
            "podman",
            &on_mixed,
            &m.open,
            team_podman,
            &m.registry,
            &mctx,
        );
        let on_login_only = m.podman_client(&login_only, "podman-conf-login-only", dead_port);
        check_logins("podman", &on_login_only, team_podman, &m.registry, &lctx);
    };
    let ctr_part = || {
        if !e2e::prerequisites(&format!("{TEST} (ctr)"), &["containerd", "ctr"], true) {
            return;
        }
        let containerd = Containerd::start(&m.work.path.join("containerd"));
        let client = CtrClient {
            containerd: &containerd,
            dir: &m.work.sub("ctr"),
            host: mixed.host(),
            dead_port,
        };
        let ctx = || format!("{}\n{}", mctx(), containerd.daemon.tail(30));
        check_anonymous("ctr", &client, &m.open, team_ctr, &m.registry, &ctx);
        check_logins("ctr", &client, team_ctr, &m.registry, &ctx);
    };
    run_parts(&[
        ("skopeo", &skopeo_part),
        ("podman", &podman_part),
        ("ctr", &ctr_part),
    ]);
    check_no_secret_logged(mixed);
    check_no_secret_logged(&login_only);
}

/// skopeo and podman log in to a cistern that also lets anonymous clients in, as the issue's
/// own example `[access]` table does (`anonymous = ["docker.io/*"]` beside `[access.users]`).
///
/// containers/image sends credentials only for the challenges it saw on the `GET /v2/` ping,
/// so cistern challenges an anonymous ping whenever `[access.users]` names anyone; without
/// credentials it then sends `Authorization: Basic Og==` (an empty user and password), which
/// cistern takes as anonymous, not as a failed login. This test failed before both.
#[test]
fn containers_image_clients_log_in_where_anonymous_clients_may_pull_too() {
    const TEST: &str = "containers_image_clients_log_in_where_anonymous_clients_may_pull_too";
    let tools = ["skopeo", "docker-registry", "podman"];
    let Some(m) = begin_mixed(TEST, &tools, "access-mixed") else {
        return;
    };
    let [team_skopeo, team_podman, _] = &m.team;
    let ctx = || m.logs(&m.cistern);
    let skopeo_part = || {
        let client = m.skopeo_client(&m.cistern);
        check_anonymous("skopeo", &client, &m.open, team_skopeo, &m.registry, &ctx);
        check_logins("skopeo", &client, team_skopeo, &m.registry, &ctx);
    };
    let podman_part = || {
        let client = m.podman_client(&m.cistern, "podman-conf", daemon::free_port());
        check_anonymous("podman", &client, &m.open, team_podman, &m.registry, &ctx);
        check_logins("podman", &client, team_podman, &m.registry, &ctx);
    };
    run_parts(&[("skopeo", &skopeo_part), ("podman", &podman_part)]);
    check_no_secret_logged(&m.cistern);
}
