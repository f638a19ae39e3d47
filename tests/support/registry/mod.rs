//! `FakeRegistry`: an in-process upstream registry (OCI pull API over hyper 1) with fault
//! injection and a request log.
//!
//! ```ignore
//! let blob = blob_bytes(4 * MIB, 1);
//! let digest = sha256_digest(&blob);
//! let gate = Gate::new();
//! let upstream = FakeRegistry::builder()
//!     .blob("library/app", blob.clone())
//!     .on_blob(&digest, Fault::GateAt(MIB as u64, gate.clone()))
//!     .start()
//!     .await;
//! upstream.on_blob(&digest, Fault::WrongBytes.once());
//! assert_eq!(upstream.blob_gets(&digest), 0);
//! ```
//!
//! Content lives per repository, like a real registry: an unknown repository answers 404
//! `NAME_UNKNOWN`, an unknown blob or manifest 404 `BLOB_UNKNOWN` / `MANIFEST_UNKNOWN`.
//!
//! Faults are attached to a blob (by digest) or a manifest (by the reference the request uses:
//! tag or digest) as a [`Rule`]: one or more [`Fault`]s applied together, forever or to the
//! next N matching requests, to requests with or without `Range` only if asked
//! ([`Rule::ranged_only`], [`Rule::whole_only`]). Each request consumes at most one rule: the first one, in the
//! order they were added, that applies to its method and has uses left. A rule for every
//! request ([`FakeRegistryBuilder::on_every_request`]) can answer anything: a status, a 429
//! with `Retry-After`, a redirect, or no answer at all.
//!
//! Beyond content and faults: [`Auth`] puts the registry behind Basic auth or the Bearer token
//! flow (with its own token endpoint at `/token`), and a script
//! ([`FakeRegistryBuilder::script`]) answers whatever it chooses to, from a closure, for what
//! the rest does not express (odd headers, a 206 for the wrong range). A request goes through
//! them in this order: the log, the token endpoint, auth, the script, the rules, the content.
//!
//! Layout: [`fault`] (faults, rules, the gate), [`serve`] (routing and answers), [`body`]
//! (paced, held, stalled and cut bodies), [`reply`] (answers for scripts).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Method;
use http::header::HeaderMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::sha256_digest;

mod body;
mod fault;
pub mod reply;
mod serve;

pub use fault::{Fault, Gate, Rule};
pub use reply::Reply;

// === The request log ===

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ping,
    Blob,
    Manifest,
    Tags,
    /// The token endpoint, `/token`.
    Token,
    Other,
}

/// One request the registry received, recorded before it was answered.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub kind: Kind,
    /// Repository name; empty for `Ping` and `Other`.
    pub repo: String,
    /// Digest for blobs, tag or digest for manifests; empty otherwise.
    pub reference: String,
    /// The request's path, without the query.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// The registry's own address, as the request reached it.
    pub local: SocketAddr,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn authorization(&self) -> Option<String> {
        self.header("authorization")
    }

    /// The last path segment: the digest of a blob request.
    pub fn last_segment(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }

    /// The registry's own base URL, for a script that names it (a realm, a redirect).
    pub fn own_url(&self) -> String {
        format!("http://{}", self.local)
    }

    /// Every value of `name` across all of its header lines, split at commas and trimmed.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

// === Auth ===

/// What the registry demands of every request but those to its token endpoint.
#[derive(Clone, Debug)]
pub enum Auth {
    /// `Authorization: Basic` with this user and password; a `Basic` challenge without it.
    Basic { username: String, password: String },
    /// A Bearer token: a challenge to fetch one from the realm without it.
    Bearer(Bearer),
}

/// The Bearer token flow: the challenge, and the registry's own token endpoint at `/token`,
/// which answers `{"token": .., "expires_in": ..}` (and logs the request, query and all).
#[derive(Clone, Debug)]
pub struct Bearer {
    /// The realm the challenge names; `None`: the registry's own `/token`.
    pub realm: Option<String>,
    /// The `service` the challenge names.
    pub service: String,
    /// Whether the challenge names the scope, `repository:<repo>:pull`.
    pub scope: bool,
    /// The one token accepted and issued; `None`: the own endpoint issues `tok-<n>` for its
    /// n-th request, and only the newest is accepted (an expired token must be replaced).
    pub token: Option<String>,
    /// The `expires_in` of the tokens the own endpoint issues.
    pub expires_in: u64,
    /// The own endpoint issues tokens only to this Basic login (user, password).
    pub login: Option<(String, String)>,
}

impl Default for Bearer {
    fn default() -> Self {
        Bearer {
            realm: None,
            service: "fake.registry".to_string(),
            scope: true,
            token: None,
            expires_in: 300,
            login: None,
        }
    }
}

// === Registry state ===

type Script = Arc<dyn Fn(&Seen) -> Option<Reply> + Send + Sync>;

#[derive(Default)]
struct State {
    repos: HashMap<String, Repo>,
    rules: Vec<(Target, Rule)>,
    seen: Vec<Seen>,
    auth: Option<Auth>,
    script: Option<Script>,
    /// Tokens the own token endpoint has issued.
    tokens_issued: usize,
}

#[derive(Default)]
struct Repo {
    blobs: HashMap<String, Bytes>,
    /// By digest.
    manifests: HashMap<String, Manifest>,
    /// Tag → digest; ordered, as `tags/list` returns tags in lexical order.
    tags: BTreeMap<String, String>,
}

#[derive(Clone)]
struct Manifest {
    media_type: String,
    bytes: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Blob(String),
    Manifest(String),
    /// Every request, whatever it asks for.
    Any,
}

impl State {
    fn add_blob(&mut self, repo: &str, data: Bytes) -> String {
        let digest = sha256_digest(&data);
        self.repo(repo).blobs.insert(digest.clone(), data);
        digest
    }

    fn add_manifest(
        &mut self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> String {
        let digest = sha256_digest(&bytes);
        let repo = self.repo(repo);
        repo.manifests.insert(
            digest.clone(),
            Manifest {
                media_type: media_type.to_string(),
                bytes,
            },
        );
        if let Some(tag) = tag {
            repo.tags.insert(tag.to_string(), digest.clone());
        }
        digest
    }

    fn repo(&mut self, name: &str) -> &mut Repo {
        self.repos.entry(name.to_string()).or_default()
    }

    /// Consumes one use of the first rule for `target` that applies to `method` (with `Range`
    /// if `ranged`).
    fn take_rule(&mut self, target: &Target, method: &Method, ranged: bool) -> Option<Rule> {
        let (_, rule) = self.rules.iter_mut().find(|(t, rule)| {
            (t == target || *t == Target::Any) && rule.applies_to(method, ranged)
        })?;
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
        }
        Some(rule.clone())
    }
}

// They are never held across an await, and the critical sections are tiny, so a std mutex is
// the simple choice.
struct Shared {
    state: Mutex<State>,
    /// TCP connections accepted so far.
    connections: AtomicUsize,
    /// Cancelled when the registry is dropped: ends the accept loop, every connection and
    /// every stalled or gated body.
    stop: CancellationToken,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// === impl FakeRegistryBuilder ===

/// Content and faults to start a [`FakeRegistry`] with.
#[derive(Default)]
pub struct FakeRegistryBuilder {
    state: State,
    host: Option<String>,
}

impl FakeRegistryBuilder {
    pub fn blob(mut self, repo: &str, data: impl Into<Bytes>) -> Self {
        self.state.add_blob(repo, data.into());
        self
    }

    /// A manifest stored under the sha256 of `bytes`, and under `tag` if given.
    pub fn manifest(
        mut self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Self {
        self.state.add_manifest(repo, tag, media_type, bytes.into());
        self
    }

    pub fn on_blob(mut self, digest: &str, rule: impl Into<Rule>) -> Self {
        self.state
            .rules
            .push((Target::Blob(digest.to_string()), rule.into()));
        self
    }

    pub fn on_manifest(mut self, reference: &str, rule: impl Into<Rule>) -> Self {
        self.state
            .rules
            .push((Target::Manifest(reference.to_string()), rule.into()));
        self
    }

    /// A rule for every request (ping, tags and token endpoint included); like the rules for
    /// one blob or manifest, rules apply in the order they were added.
    pub fn on_every_request(mut self, rule: impl Into<Rule>) -> Self {
        self.state.rules.push((Target::Any, rule.into()));
        self
    }

    /// Listens on `ip` instead of `127.0.0.1` (`127.0.0.2` plays a foreign host).
    pub fn host(mut self, ip: &str) -> Self {
        self.host = Some(ip.to_string());
        self
    }

    pub fn auth(mut self, auth: Auth) -> Self {
        self.state.auth = Some(auth);
        self
    }

    /// Answers a request with what `script` returns, if it returns anything; else the
    /// registry goes on as without it.
    pub fn script(
        mut self,
        script: impl Fn(&Seen) -> Option<Reply> + Send + Sync + 'static,
    ) -> Self {
        self.state.script = Some(Arc::new(script));
        self
    }

    /// Binds port 0 on `127.0.0.1` (or the `host`) and serves until the registry is dropped.
    pub async fn start(self) -> FakeRegistry {
        super::init();
        let host = self.host.as_deref().unwrap_or(super::HOME);
        let listener = TcpListener::bind((host, 0))
            .await
            .expect("bind fake registry");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(self.state),
            connections: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(serve::accept_loop(listener, shared.clone()));
        FakeRegistry { addr, shared }
    }
}

// === impl FakeRegistry ===

/// A running fake upstream. Dropping it closes every connection it holds.
pub struct FakeRegistry {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl FakeRegistry {
    pub fn builder() -> FakeRegistryBuilder {
        FakeRegistryBuilder::default()
    }

    /// A registry holding one manifest (in `repo`, under `tag` if given), and nothing else.
    pub async fn with_manifest(
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: &Bytes,
    ) -> FakeRegistry {
        FakeRegistry::builder()
            .manifest(repo, tag, media_type, bytes.clone())
            .start()
            .await
    }

    /// A registry holding `blob` in `repo`, and nothing else, whose requests for it follow
    /// `rule`.
    pub async fn with_faulty_blob(repo: &str, blob: &Bytes, rule: impl Into<Rule>) -> FakeRegistry {
        let digest = sha256_digest(blob);
        FakeRegistry::builder()
            .blob(repo, blob.clone())
            .on_blob(&digest, rule)
            .start()
            .await
    }

    /// A registry holding `blobs` in `repo`, and nothing else.
    pub async fn with_blobs(repo: &str, blobs: &[Bytes]) -> FakeRegistry {
        let mut builder = FakeRegistry::builder();
        for blob in blobs {
            builder = builder.blob(repo, blob.clone());
        }
        builder.start().await
    }

    /// A registry holding `blob` in `repo`, and nothing else.
    pub async fn with_blob(repo: &str, blob: &Bytes) -> FakeRegistry {
        FakeRegistry::builder()
            .blob(repo, blob.clone())
            .start()
            .await
    }

    /// A registry on `ip` whose every answer comes from `script`.
    pub async fn scripted(
        ip: &str,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> FakeRegistry {
        FakeRegistry::builder()
            .host(ip)
            .script(move |req| Some(script(req)))
            .start()
            .await
    }

    /// A registry that accepts connections, reads requests and never answers one.
    pub async fn silent() -> FakeRegistry {
        FakeRegistry::builder()
            .on_every_request(Fault::NoAnswer)
            .start()
            .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, without `/v2/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a blob to `repo`; returns its digest.
    pub fn add_blob(&self, repo: &str, data: impl Into<Bytes>) -> String {
        self.shared.lock().add_blob(repo, data.into())
    }

    /// Adds a manifest (and points `tag` at it); returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> String {
        self.shared
            .lock()
            .add_manifest(repo, tag, media_type, bytes.into())
    }

    /// Points `tag` at an existing (or future) manifest digest.
    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        self.shared
            .lock()
            .repo(repo)
            .tags
            .insert(tag.to_string(), digest.to_string());
    }

    pub fn on_blob(&self, digest: &str, rule: impl Into<Rule>) {
        self.shared
            .lock()
            .rules
            .push((Target::Blob(digest.to_string()), rule.into()));
    }

    pub fn on_manifest(&self, reference: &str, rule: impl Into<Rule>) {
        self.shared
            .lock()
            .rules
            .push((Target::Manifest(reference.to_string()), rule.into()));
    }

    pub fn clear_faults(&self) {
        self.shared.lock().rules.clear();
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// The requests whose path is `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// The query strings of the token endpoint's requests, oldest first.
    pub fn token_requests(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == Kind::Token)
            .map(|r| r.query.unwrap_or_default())
            .collect()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// The requests of one kind for one blob digest or manifest reference.
    pub fn requests_for(&self, kind: Kind, reference: &str) -> Vec<Seen> {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.kind == kind && s.reference == reference)
            .cloned()
            .collect()
    }

    pub fn count(&self, method: Method, kind: Kind, reference: &str) -> usize {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.method == method && s.kind == kind && s.reference == reference)
            .count()
    }

    /// The GET requests of this blob so far (with or without `Range`), oldest first.
    pub fn blob_get_requests(&self, digest: &str) -> Vec<Seen> {
        self.requests_for(Kind::Blob, digest)
            .into_iter()
            .filter(|s| s.method == Method::GET)
            .collect()
    }

    /// GETs of this blob for a closed range (`Range: bytes=a-b`, as ranged reads send; a
    /// fill's resume asks `bytes=a-`), oldest first.
    pub fn blob_range_reads(&self, digest: &str) -> Vec<Seen> {
        self.blob_get_requests(digest)
            .into_iter()
            .filter(|s| {
                let range = s.header("range").unwrap_or_default();
                range
                    .strip_prefix("bytes=")
                    .and_then(|r| r.split_once('-'))
                    .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
            })
            .collect()
    }

    /// GETs of this blob so far (with or without `Range`).
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.count(Method::GET, Kind::Blob, digest)
    }

    /// Manifest requests of any method and reference so far.
    pub fn manifest_requests(&self) -> usize {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|s| s.kind == Kind::Manifest)
            .count()
    }
}
