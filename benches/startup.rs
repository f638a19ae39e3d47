//! Start-up on a big cache: opening the data directory (lock, sweep of `tmp/`) and building
//! the index of committed blobs from a scan of `blobs/` (`cache::evict::Usage::load`), which
//! is what `cistern::run` does before it serves.
//!
//! ```sh
//! cargo bench --bench startup
//! ```
//!
//! - `startup/open_and_index/<n>`: `DiskStore::open` then `Usage::load` on a data directory of
//!   `n` blobs (100,000 under `cargo bench`; 1,000 in the smoke test that `cargo test` runs),
//!   with the directory entries and inodes in the page cache, as on a restart.
//!
//! A cold start after a reboot also reads the inodes from disk; drop the caches
//! (`echo 3 > /proc/sys/vm/drop_caches`, as root) before a run to see that case.

use std::hint::black_box;
use std::time::{Duration, Instant};

use cistern::cache::evict::Usage;
use cistern::oci::Digest;
use cistern::storage::DiskStore;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and criterion then runs
/// every benchmark once as a smoke test. Keep the inputs small there.
fn smoke_test() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// A data directory with `n` small blobs, laid out as the store lays them out, each named by
/// the digest of its content (so `cistern verify` would accept them too).
fn data_dir(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let blobs = dir.path().join("blobs");
    for i in 0..n {
        let content = (i as u64).to_le_bytes();
        let path = blobs.join(Digest::of(&content).shard_path());
        std::fs::create_dir_all(path.parent().expect("sharded")).expect("shard dir");
        std::fs::write(&path, content).expect("write blob");
    }
    dir
}

fn bench_startup(c: &mut Criterion) {
    let n = if smoke_test() { 1_000 } else { 100_000 };
    let dir = data_dir(n);
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
                let store = DiskStore::open(dir.path()).expect("open the store");
                let usage = Usage::new(None);
                usage.load(&store).expect("index the blobs");
                total += start.elapsed();
                assert_eq!(usage.len(), n, "every blob indexed");
                black_box((store, usage));
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench_startup);
criterion_main!(benches);
