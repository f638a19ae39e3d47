//! Cache lookups on the warm path, on a temporary data directory.
//!
//! ```sh
//! cargo bench --bench cache_lookup
//! ```
//!
//! A blob lookup is an `open` + `fstat` of `blobs/sha256/ab/<hex>` plus a `futimens` that
//! records the access for LRU (`DiskStore::open_blob_for_read`), run on tokio's blocking pool,
//! then an update of the in-memory index of committed blobs (`cache::evict::Usage::open`).
//! The benchmarks separate those costs:
//!
//! - `blob/open_cached_hit`, `blob/open_cached_miss`: the public async lookup
//!   (`BlobCache::open_cached`), as a request makes it, on the same kind of multi-threaded
//!   runtime as the binary.
//! - `blob/disk_open_blob_hit`, `blob/disk_open_blob_for_read_hit`: the syscalls alone, called
//!   directly (without and with the access-time update).
//! - `index/open_hit/<n>`: `Usage::open` and dropping its `ReadGuard` (the index side of a
//!   hit) on an index of `n` blobs; `index/choose_victims/<n>`: one eviction pass's choice of
//!   victims among `n` blobs (outside the index lock); `index/copy_candidates/<n>`: what a
//!   pass does under the lock, copying the unread entries out.
//! - `manifest/get_memory_hit`: `ManifestCache::get` by digest when the manifest is in memory
//!   (moka), the path of every warm manifest-by-digest GET.
//! - `manifest/get_disk_hit`: the same on a fresh `ManifestCache` (not in memory, on disk):
//!   read, re-hash against the digest, insert into memory.
//! - `refs/load/<n>`: the reference index rebuilt at start (`RefIndex::load`) from `n` stored
//!   image manifests (config + 3 layers each), one tag record per manifest and one index per
//!   ten manifests; `refs/pinned/<n>`: one eviction pass's pinned set over that index, with a
//!   repository pattern that matches a tenth of the tags.
//!
//! The upstream in the config points at a closed port: none of these may reach it.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use cistern::Config;
use cistern::cache::evict::{BlobKey, Candidate, Usage, choose_victims};
use cistern::cache::refs::RefIndex;
use cistern::cache::{BlobCache, ManifestCache};
use cistern::oci::{Digest, Reference, RepoName};
use cistern::policy::pins::Pin;
use cistern::storage::{DiskStore, StoredManifest, TagRecord};
use cistern::upstream::Routes;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and criterion then runs
/// every benchmark once as a smoke test. Unoptimised, so keep the inputs small there.
fn smoke_test() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<DiskStore>,
    config: Config,
    blob: Digest,
    missing: Digest,
    manifest: Digest,
}

fn fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("cistern-bench-")
        .tempdir()
        .expect("temp dir");
    let store = Arc::new(DiskStore::open(dir.path()).expect("open store"));

    // A committed 1 MiB blob, written the way a fill writes it.
    let body = vec![0x5a_u8; 1 << 20];
    let blob = Digest::of(&body);
    let partial = store.create_partial(&blob).expect("partial");
    (&*partial.file).write_all(&body).expect("write blob");
    store.commit_blob(partial, &blob).expect("commit blob");

    let manifest_bytes = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_TYPE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{blob}","size":1048576}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{blob}","size":1048576}}]}}"#
    ));
    let manifest = Digest::of(&manifest_bytes);
    store
        .write_manifest(
            &manifest,
            &StoredManifest {
                media_type: MANIFEST_TYPE.to_string(),
                bytes: manifest_bytes,
            },
        )
        .expect("write manifest");

    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    // Port 9 (discard) is closed on loopback: a lookup that reached the upstream would fail.
    config.upstream.url = "http://127.0.0.1:9".to_string();
    Fixture {
        _dir: dir,
        store,
        config,
        blob,
        missing: Digest::of(b"not cached"),
        manifest,
    }
}

/// Times `iters` awaits of `f` inside one `block_on`, so the runtime entry is not measured.
fn time_async<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            black_box(f().await);
        }
        start.elapsed()
    })
}

fn bench_blobs(c: &mut Criterion) {
    let fx = fixture();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = BlobCache::new(
        fx.store.clone(),
        Usage::new(None),
        TaskTracker::new(),
        CancellationToken::new(),
        cistern::clock::Clock::system(),
        cistern::cache::fill_limit::FillLimits::unlimited(),
    );

    // Sanity checks, outside the timed loops.
    rt.block_on(async {
        let hit = cache.open_cached(&fx.blob).await.expect("lookup");
        assert_eq!(hit.and_then(|s| s.size()), Some(1 << 20));
        assert!(
            cache
                .open_cached(&fx.missing)
                .await
                .expect("lookup")
                .is_none()
        );
    });

    let mut group = c.benchmark_group("blob");
    group.bench_function("open_cached_hit", |b| {
        b.iter_custom(|iters| time_async(&rt, iters, || cache.open_cached(&fx.blob)))
    });
    group.bench_function("open_cached_miss", |b| {
        b.iter_custom(|iters| time_async(&rt, iters, || cache.open_cached(&fx.missing)))
    });
    group.bench_function("disk_open_blob_hit", |b| {
        b.iter(|| fx.store.open_blob(black_box(&fx.blob)).expect("open"))
    });
    group.bench_function("disk_open_blob_for_read_hit", |b| {
        b.iter(|| {
            fx.store
                .open_blob_for_read(black_box(&fx.blob))
                .expect("open")
        })
    });
    group.finish();
}

/// `n` distinct digests.
fn digests(n: usize) -> Vec<Digest> {
    (0..n as u64)
        .map(|i| Digest::of(&i.to_le_bytes()))
        .collect()
}

fn bench_index(c: &mut Criterion) {
    let sizes: &[usize] = if smoke_test() {
        &[100]
    } else {
        &[1_000, 100_000]
    };
    let mut group = c.benchmark_group("index");
    for &n in sizes {
        let all = digests(n);
        let usage = Usage::new(None);
        for d in &all {
            usage.committed(d, 1 << 20);
        }
        let probe = &all[n / 2];
        group.bench_with_input(BenchmarkId::new("open_hit", n), &n, |b, _| {
            b.iter(|| drop(usage.open(black_box(probe), 1 << 20)))
        });
        group.bench_with_input(BenchmarkId::new("copy_candidates", n), &n, |b, _| {
            b.iter(|| usage.candidates())
        });
        let now = SystemTime::now();
        group.bench_with_input(BenchmarkId::new("choose_victims", n), &n, |b, _| {
            b.iter_batched(
                || {
                    all.iter()
                        .enumerate()
                        .map(|(i, d)| Candidate {
                            digest: BlobKey::of(d),
                            size: 1 << 20,
                            last_access: now - Duration::from_secs((i * 7919 % n) as u64),
                            keep: i % 100 == 0,
                        })
                        .collect::<Vec<_>>()
                },
                // Down to 90 %: a pass that evicts a tenth of the cache.
                |cands| {
                    let total = (n as u64) << 20;
                    choose_victims(cands.into_iter(), total, total / 10 * 9)
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn bench_manifests(c: &mut Criterion) {
    let fx = fixture();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let routes = Routes::from_config(&fx.config, &cistern::clock::Clock::system()).expect("routes");
    let name = RepoName::parse("library/app").expect("name");
    let route = routes.resolve(None, &name).expect("route").route;
    let reference = Reference::Digest(fx.manifest.clone());
    let accept = vec![MANIFEST_TYPE.to_string()];
    let cache = ManifestCache::new(fx.store.clone(), &fx.config.cache, false);

    rt.block_on(async {
        let m = cache
            .get(&route, &name, &reference, &accept)
            .await
            .expect("manifest from disk");
        // (manifest, stale): a manifest by digest is never stale.
        assert_eq!((&m.0.digest, m.1), (&fx.manifest, false));
    });

    let mut group = c.benchmark_group("manifest");
    group.bench_function("get_memory_hit", |b| {
        b.iter_custom(|iters| {
            time_async(&rt, iters, || cache.get(&route, &name, &reference, &accept))
        })
    });
    group.bench_function("get_disk_hit", |b| {
        // `_ref`: the fresh cache is dropped outside the timed part.
        b.iter_batched_ref(
            || ManifestCache::new(fx.store.clone(), &fx.config.cache, false),
            |fresh| {
                rt.block_on(async {
                    fresh
                        .get(&route, &name, &reference, &accept)
                        .await
                        .expect("manifest from disk")
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A store with `n` image manifests, a tag for each, and an index over every ten.
fn refs_fixture(n: usize) -> (tempfile::TempDir, DiskStore) {
    let dir = tempfile::Builder::new()
        .prefix("cistern-bench-refs-")
        .tempdir()
        .expect("temp dir");
    let store = DiskStore::open(dir.path()).expect("open store");
    let put = |bytes: String, repo: &str, tag: &str, media_type: &str| {
        let bytes = Bytes::from(bytes);
        let digest = Digest::of(&bytes);
        store
            .write_manifest(
                &digest,
                &StoredManifest {
                    media_type: media_type.to_string(),
                    bytes,
                },
            )
            .expect("write manifest");
        store
            .write_tag(&TagRecord {
                registry: "docker.io".into(),
                repository: repo.into(),
                tag: tag.into(),
                accept: String::new(),
                digest: digest.to_string(),
                media_type: media_type.into(),
                size: 1,
                fetched_at_ms: 0,
            })
            .expect("write tag");
        digest
    };
    let mut children = Vec::new();
    for i in 0..n {
        let d = |k: usize| Digest::of(format!("blob {i} {k}").as_bytes());
        let layer = |k: usize| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":1048576}}"#,
                d(k)
            )
        };
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_TYPE}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":1234}},"layers":[{},{},{}]}}"#,
            d(0),
            layer(1),
            layer(2),
            layer(3)
        );
        let repo = format!("team{}/app{}", i % 10, i / 10);
        children.push(put(manifest, &repo, "arch", MANIFEST_TYPE));
        if children.len() == 10 {
            let list: Vec<String> = children
                .drain(..)
                .map(|c| format!(r#"{{"mediaType":"{MANIFEST_TYPE}","digest":"{c}","size":500}}"#))
                .collect();
            let index = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
                list.join(",")
            );
            put(
                index,
                &format!("multi/app{i}"),
                "latest",
                "application/vnd.oci.image.index.v1+json",
            );
        }
    }
    (dir, store)
}

fn bench_refs(c: &mut Criterion) {
    let sizes: &[usize] = if smoke_test() { &[100] } else { &[10_000] };
    let mut group = c.benchmark_group("refs");
    group.sample_size(10);
    for &n in sizes {
        let (_dir, store) = refs_fixture(n);
        let index = RefIndex::load(&store).expect("load");
        assert_eq!(index.counts().0, n + n / 10);
        group.bench_with_input(BenchmarkId::new("load", n), &n, |b, _| {
            b.iter(|| RefIndex::load(&store).expect("load"))
        });
        let pins = vec![Pin::parse("docker.io/team1/*").expect("pin")];
        assert!(!index.pinned(&pins).blobs.is_empty());
        group.bench_with_input(BenchmarkId::new("pinned", n), &n, |b, _| {
            b.iter(|| index.pinned(black_box(&pins)))
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_blobs,
    bench_index,
    bench_manifests,
    bench_refs
);
criterion_main!(benches);
