//! Test support: a fake upstream registry, a cistern under test, and client helpers.
//!
//! Layout:
//! - [`registry`]: `FakeRegistry`, the one fake upstream: content per repository, fault
//!   injection per blob, manifest or request (`Fault`: statuses, 429s, no answer, cuts after
//!   exactly n bytes, stalls, wrong bytes, redirects, `Range` ignored), one-shot rules, a `Gate`
//!   that holds a body mid-way, Basic and Bearer-token auth, scripted answers, and a log of
//!   every request it saw.
//! - [`cistern`]: `TestCistern` and its builder, the one way to run cistern in-process: named
//!   upstreams and routes, a manual clock, the admin API, TLS, restarts over the same
//!   `DataDir`; shut down with the run's error or panic re-raised.
//! - [`process`]: `ChildCistern`, the one way to run the cistern binary, for tests that kill it
//!   or run it in a namespace of its own.
//! - [`config`]: the config both start from (one text, written for the binary and parsed for
//!   the library), and route and upstream helpers.
//! - [`data_dir`]: `DataDir`, a temporary data directory and what tests look for in it.
//! - [`client`]: a small reqwest client (`Client`) whose responses always carry the outcome of
//!   reading the whole body, concurrent blob readers (`Readers`), and a raw HTTP/1.1 request for
//!   paths that a URL library would normalise.
//! - [`http1`]: the bytes of a raw HTTP/1.1 request and the one parser of raw responses (the
//!   end-to-end harness in `tests/e2e/` includes it too).
//!
//! Every wait in a test is bounded: by [`bounded`] (a future), [`eventually`] (a condition; a
//! last resort, e.g. for a background fill that nobody is reading), or a `Gate`.
//! `CISTERN_TEST_PATIENCE_MS` stretches the default patience on very slow machines.

// Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

pub mod cistern;
pub mod client;
pub mod config;
pub mod data_dir;
pub mod http1;
pub mod process;
pub mod registry;

use std::future::Future;
use std::sync::Once;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

pub use self::cistern::{ADMIN_TOKEN, CisternBuilder, TestCistern};
pub use self::client::{Client, HeldResponse, RawResponse, Readers, Response, raw_request};
pub use self::config::{at, default_route, names, route, tls_file};
pub use self::data_dir::DataDir;
pub use self::registry::reply::{self, Reply};
pub use self::registry::{Auth, Bearer, FakeRegistry, Fault, Gate, Kind, Rule, Seen};

/// The host every fake upstream lives on.
pub const HOME: &str = "127.0.0.1";
/// Another host on the loopback interface (all of 127/8 is loopback on Linux): a token realm
/// or a blob store that is not the upstream's own host.
pub const FOREIGN: &str = "127.0.0.2";

pub const SECOND: Duration = Duration::from_secs(1);

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// How long any single wait in a test may take before the test fails. Generous, because the
/// tests run unoptimised on small machines; a wait that needs all of it is a hang.
pub fn patience() -> Duration {
    let ms = std::env::var("CISTERN_TEST_PATIENCE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    Duration::from_millis(ms)
}

/// Installs the process-wide pieces every test needs, once: the rustls crypto provider (the
/// crate enables reqwest's `rustls-no-provider`, so building any reqwest client without one
/// panics) and a tracing subscriber that writes through the test harness (`RUST_LOG=debug`).
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    });
}

/// `sha256:<hex>` of `data`, as registries spell digests.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `size` deterministic pseudo-random bytes; different seeds give unrelated contents, so two
/// blobs of one size never share a digest.
pub fn blob_bytes(size: usize, seed: u64) -> Bytes {
    // splitmix64: fast, and good enough that no two chunks of a blob look alike.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

/// [`blob_bytes`] and their digest: the blob most tests start from.
pub fn blob_and_digest(size: usize, seed: u64) -> (Bytes, String) {
    let blob = blob_bytes(size, seed);
    let digest = sha256_digest(&blob);
    (blob, digest)
}

/// `count` blobs of `size` bytes (seeds `first_seed`, `first_seed + 1`, ...) and their
/// digests, in the same order.
pub fn blobs_and_digests(count: u64, size: usize, first_seed: u64) -> (Vec<Bytes>, Vec<String>) {
    (first_seed..first_seed + count)
        .map(|seed| blob_and_digest(size, seed))
        .unzip()
}

/// `/v2/<repo>/blobs/<digest>`.
pub fn blob_route(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// `/v2/<repo>/manifests/<reference>`.
pub fn manifest_route(repo: &str, reference: &str) -> String {
    format!("/v2/{repo}/manifests/{reference}")
}

/// Asserts two (possibly huge) byte strings are equal without printing them: on a mismatch it
/// reports lengths, digests and the first differing offset.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first_diff = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: got {} bytes ({}), want {} bytes ({}); first difference at {first_diff:?}",
            got.len(),
            sha256_digest(got),
            want.len(),
            sha256_digest(want)
        );
    }
}

/// Awaits `fut`, failing the test if it takes longer than [`patience`].
pub async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    let limit = patience();
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `cond` until it holds, failing the test after `patience`.
///
/// A last resort: prefer a `Gate` or a response that proves progress. Use it for effects that
/// nothing in the protocol reports, such as a background fill committing after its only client
/// went away.
pub async fn eventually(what: &str, patience: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if cond() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("gave up after {patience:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The URL of a loopback port nobody listens on (bound, then closed).
pub async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind((HOME, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    format!("http://{addr}")
}

/// A small OCI image manifest, different for every `seed`.
pub fn image_manifest(seed: u32) -> Bytes {
    let config = sha256_digest(format!("config {seed}").as_bytes());
    let layer = sha256_digest(format!("layer {seed}").as_bytes());
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{seed}}}]}}"#
    ))
}

/// Repeats `attempt` until it returns `Some`, failing the test after [`patience`]: a bounded
/// poll for an effect that only a request can observe (a background refresh, a counter).
pub async fn retry_until<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    bounded(what, async {
        loop {
            if let Some(done) = attempt().await {
                return done;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// An OCI image manifest referencing `config` and `layers` (by digest and size).
pub fn oci_image_manifest(config: &[u8], layers: &[&[u8]]) -> Bytes {
    let descriptor = |media_type: &str, data: &[u8]| {
        serde_json::json!({
            "mediaType": media_type,
            "digest": sha256_digest(data),
            "size": data.len(),
        })
    };
    let layers: Vec<_> = layers
        .iter()
        .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
        .collect();
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": layers,
        })
        .to_string(),
    )
}

/// An OCI index over `manifests` (each an image manifest's bytes).
pub fn oci_index(manifests: &[&[u8]]) -> Bytes {
    let children: Vec<_> = manifests
        .iter()
        .enumerate()
        .map(|(i, m)| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST,
                "digest": sha256_digest(m),
                "size": m.len(),
                "platform": { "os": "linux", "architecture": format!("arch{i}") },
            })
        })
        .collect();
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": children,
        })
        .to_string(),
    )
}
