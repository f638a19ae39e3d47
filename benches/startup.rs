//! Start-up on a big cache: how soon a restarted cistern serves a hit, how long its indexes
//! take to build in the background, and how much memory they hold per blob.
//!
//! ```sh
//! cargo bench --bench startup
//! CISTERN_BENCH_BLOBS=1000000 CISTERN_BENCH_MANIFESTS=100000 \
//!   CISTERN_BENCH_DIR=/var/tmp/cistern-1m cargo bench --bench startup
//! ```
//!
//! - `startup/open_and_index/<n>`: `DiskStore::open` then `Usage::load` (the whole scan of
//!   `blobs/`, as `Cache::open` runs it in the background) on a data directory of `n` blobs.
//! - `startup/first_hit/<n>`: `Cache::open` (lock, sweep of `tmp/`, pins; both indexes
//!   started in the background) until `BlobCache::open_cached` has the last blob open: what
//!   a restarted server needs before it answers a hit. The loads are waited for after the
//!   clock stops, so each run starts alone.
//! - Before the timed runs it prints one line, `startup: blobs=… manifests=… tags=…
//!   first_blob_hit=… first_tag_hit=… blobs_loaded=… refs_loaded=… index_bytes_per_blob=…
//!   rss_bytes_per_blob=… refs_rss_bytes_per_blob=…`: a single start measured end to end
//!   (the first hit on a blob, then on a manifest resolved through a tag record, each from
//!   the start; the ends of the blob scan and of the reference index's load), the blob
//!   index's own estimate of its size (`Usage::index_bytes`), and the growth of the process's
//!   resident memory while `Usage::load` built the blob index and `RefIndex::load` the
//!   reference index (Linux, after `malloc_trim` as the server does once a burst is over;
//!   0 elsewhere), each divided by the number of blobs.
//!
//! Inputs: `CISTERN_BENCH_BLOBS` one-byte-ish blobs (default 100,000 under `cargo bench`,
//! 1,000 in the smoke test that `cargo test --all-targets` runs), `CISTERN_BENCH_MANIFESTS`
//! manifests, each referencing one blob (default a tenth of the blobs), and
//! `CISTERN_BENCH_TAGS` tag records (default a quarter of the manifests, ten per repository:
//! a tag per image index, the rest platform manifests). One-byte blobs still cost an inode
//! each (about 4 GB of inodes for a million on ext4): with `CISTERN_BENCH_DIR` the directory
//! is built there once and reused by later runs (`ready-…` files mark it complete), instead
//! of in a fresh temporary directory. The start runs offline, so a tag is answered from its
//! record and nothing reaches an upstream.
//!
//! A cold start after a reboot also reads the inodes from disk; drop the caches
//! (`sync; echo 3 > /proc/sys/vm/drop_caches`, as root) before a run to see that case: the
//! one-shot start runs first, so it is the cold one (add a filter that matches no benchmark,
//! e.g. `-- nomatch`, to run only it).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cistern::Config;
use cistern::cache::evict::Usage;
use cistern::cache::refs::RefIndex;
use cistern::cache::{Cache, FillTasks};
use cistern::clock::Clock;
use cistern::oci::media_types::AcceptClass;
use cistern::oci::{Digest, Reference, RepoName, Tag};
use cistern::storage::{DiskStore, TagRecord};
use cistern::upstream::{Route, Routes};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and criterion then runs
/// every benchmark once as a smoke test. Keep the inputs small there.
fn smoke_test() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The content of blob `i`: 8 bytes, distinct for each `i`.
fn blob(i: usize) -> [u8; 8] {
    (i as u64).to_le_bytes()
}

/// A data directory with `blobs` small blobs and `manifests` manifests (manifest `j`
/// references blob `j`), laid out as the store lays them out, each named by the digest of
/// its content (so `cistern verify` would accept them too). Written directly, without the
/// store's fsyncs, which would take hours for a million files.
struct DataDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn data_dir(blobs: usize, manifests: usize, tags: usize, registry: &str) -> DataDir {
    let (path, temp) = match std::env::var_os("CISTERN_BENCH_DIR") {
        Some(p) => (PathBuf::from(p), None),
        None => {
            let t = tempfile::tempdir().expect("temp dir");
            (t.path().to_path_buf(), Some(t))
        }
    };
    let ready = path.join(format!("ready-{blobs}-{manifests}"));
    if !ready.exists() {
        fill(&path, blobs, manifests);
        std::fs::write(&ready, b"").expect("mark the directory complete");
    }
    let tagged = path.join(format!("ready-tags-{manifests}-{tags}"));
    if !tagged.exists() {
        write_tags(&path, manifests.min(blobs), tags, registry);
        std::fs::write(&tagged, b"").expect("mark the tags complete");
    }
    DataDir { path, _temp: temp }
}

/// Manifest `j`'s bytes, as `fill` writes them.
fn manifest(j: usize) -> String {
    let layer = Digest::of(&blob(j));
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_TYPE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer}","size":8}},"layers":[]}}"#
    )
}

/// Tag `k` (`bench/r<k / 10>:t<k>`) names manifest `k * manifests / tags`, as the store
/// records a tag answer.
fn tag_of(k: usize) -> (String, String) {
    (format!("bench/r{}", k / 10), format!("t{k}"))
}

fn write_tags(root: &Path, manifests: usize, tags: usize, registry: &str) {
    let store = DiskStore::open(root).expect("open the store");
    let accept = AcceptClass::of(&[MANIFEST_TYPE]).key();
    for k in 0..tags.min(manifests) {
        let bytes = manifest(k * manifests / tags.max(1));
        let (repository, tag) = tag_of(k);
        store
            .write_tag(&TagRecord {
                registry: registry.to_string(),
                repository,
                tag,
                accept: accept.clone(),
                digest: Digest::of(bytes.as_bytes()).to_string(),
                media_type: MANIFEST_TYPE.to_string(),
                size: bytes.len() as u64,
                fetched_at_ms: 1,
            })
            .expect("write a tag record");
    }
}

fn fill(root: &Path, blobs: usize, manifests: usize) {
    for i in 0..blobs {
        let content = blob(i);
        write_sharded(&root.join("blobs"), &Digest::of(&content), &content);
    }
    for j in 0..manifests.min(blobs) {
        let bytes = manifest(j);
        let mut file = format!("{MANIFEST_TYPE}\n").into_bytes();
        file.extend_from_slice(bytes.as_bytes());
        write_sharded(
            &root.join("manifests"),
            &Digest::of(bytes.as_bytes()),
            &file,
        );
    }
}

fn write_sharded(under: &Path, digest: &Digest, content: &[u8]) {
    let path = under.join(digest.shard_path());
    let parent = path.parent().expect("sharded paths have a parent");
    if !parent.is_dir() {
        std::fs::create_dir_all(parent).expect("shard dir");
    }
    std::fs::write(&path, content).expect("write file");
}

/// The process's resident memory in bytes (Linux; 0 where `/proc` is missing), after giving
/// freed heap back to the kernel as the server does once a burst is over
/// (`server::heap::trim_when_settled`): what a load only borrowed (file listings, records
/// read) does not count as what the index holds.
fn rss_bytes() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; any thread may call it.
    unsafe {
        libc::malloc_trim(0);
    }
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        // Tags from their records at any age: nothing reaches an upstream.
        offline: true,
        ..Config::default()
    }
}

/// What a start looks up: the last blob written, and the last tag's manifest.
struct Probe {
    blob: Digest,
    route: Arc<Route>,
    name: RepoName,
    tag: Reference,
    manifest: Digest,
}

/// When a start got there, each from the start.
struct Start {
    first_blob_hit: Duration,
    first_tag_hit: Duration,
    blobs_loaded: Duration,
    refs_loaded: Duration,
}

/// One start, measured.
async fn start_once(config: &Config, probe: &Probe) -> Start {
    let start = Instant::now();
    let cache = Cache::open(config, Clock::system(), FillTasks::default())
        .await
        .expect("open the cache");
    let hit = cache
        .blobs
        .open_cached(&probe.blob)
        .await
        .expect("look the blob up");
    let first_blob_hit = start.elapsed();
    assert!(hit.is_some(), "the probe is cached");
    drop(hit);
    let (m, _) = cache
        .manifests
        .get(
            &probe.route,
            &probe.name,
            &probe.tag,
            &[MANIFEST_TYPE.to_string()],
        )
        .await
        .expect("the tag's manifest");
    let first_tag_hit = start.elapsed();
    assert_eq!(m.digest, probe.manifest);
    let mut blobs_loaded = None;
    let mut refs_loaded = None;
    let refs = cache.manifests.index().clone();
    let both = async {
        tokio::join!(
            async {
                cache.usage.loaded().await;
                blobs_loaded = Some(start.elapsed());
            },
            async {
                refs.loaded().await.expect("the reference index loads");
                refs_loaded = Some(start.elapsed());
            }
        )
    };
    both.await;
    Start {
        first_blob_hit,
        first_tag_hit,
        blobs_loaded: blobs_loaded.unwrap_or_default(),
        refs_loaded: refs_loaded.unwrap_or_default(),
    }
}

fn bench_startup(c: &mut Criterion) {
    let default = if smoke_test() { 1_000 } else { 100_000 };
    let n = env_count("CISTERN_BENCH_BLOBS", default);
    let manifests = env_count("CISTERN_BENCH_MANIFESTS", n / 10).min(n);
    let tags = env_count("CISTERN_BENCH_TAGS", manifests / 4)
        .min(manifests)
        .max(1);
    let mut config = config(Path::new(""));
    let routes = Routes::from_config(&config, &Clock::system()).expect("routes");
    let (repository, tag) = tag_of(tags - 1);
    let name = RepoName::parse(&repository).expect("a repository name");
    let route = routes.resolve(None, &name).expect("a route").route;
    let dir = data_dir(n, manifests, tags, &route.registry);
    config.data_dir = dir.path.clone();
    let probe = Probe {
        // The last blob written: no earlier than any other in the scan's order.
        blob: Digest::of(&blob(n.saturating_sub(1))),
        route,
        name,
        tag: Reference::Tag(Tag::parse(&tag).expect("a tag")),
        manifest: Digest::of(manifest((tags - 1) * manifests / tags).as_bytes()),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // One start measured end to end first, so that with the page cache dropped before the
    // run it starts cold; then the indexes' memory, each built alone (`rss_bytes` gives the
    // start's freed heap back first, so reusing it does not hide the growth).
    let s = runtime.block_on(start_once(&config, &probe));
    let before = rss_bytes();
    let store = DiskStore::open(&dir.path).expect("open the store");
    let usage = Usage::new(None);
    usage.load(&store).expect("index the blobs");
    let rss_growth = rss_bytes().saturating_sub(before);
    let indexed = usage.len().max(1);
    let index_bytes = usage.index_bytes();
    let before = rss_bytes();
    let refs = RefIndex::load(&store).expect("index the manifests");
    let refs_rss_growth = rss_bytes().saturating_sub(before);
    assert_eq!(refs.counts().0, manifests, "every manifest indexed");
    drop((usage, refs, store));
    eprintln!(
        "startup: blobs={n} manifests={manifests} tags={tags} first_blob_hit={:?} \
         first_tag_hit={:?} blobs_loaded={:?} refs_loaded={:?} index_bytes_per_blob={} \
         rss_bytes_per_blob={} refs_rss_bytes_per_blob={}",
        s.first_blob_hit,
        s.first_tag_hit,
        s.blobs_loaded,
        s.refs_loaded,
        index_bytes / indexed,
        rss_growth / indexed,
        refs_rss_growth / indexed,
    );

    let mut group = c.benchmark_group("startup");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    group.bench_with_input(BenchmarkId::new("open_and_index", n), &n, |b, &n| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let store = DiskStore::open(&dir.path).expect("open the store");
                let usage = Usage::new(None);
                usage.load(&store).expect("index the blobs");
                total += start.elapsed();
                assert_eq!(usage.len(), n, "every blob indexed");
                black_box((store, usage));
            }
            total
        })
    });
    group.bench_with_input(BenchmarkId::new("first_hit", n), &n, |b, _| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += runtime.block_on(start_once(&config, &probe)).first_blob_hit;
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench_startup);
criterion_main!(benches);
