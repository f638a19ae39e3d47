//! Digest hashing throughput: `cistern::oci::DigestVerifier`, which every cache fill runs over
//! every byte of every blob, and `Digest::parse` / `Digest::of` on the request and manifest
//! paths.
//!
//! ```sh
//! cargo bench --bench digest
//! ```
//!
//! `verifier/<chunk>` hashes a buffer in chunks of that size (16 KiB is about what one upstream
//! read yields, 1 MiB is the fill's largest write batch), so the numbers show both the raw
//! sha256 speed and any per-call cost. Throughput is reported in bytes per second. The fill
//! hashes on the blocking pool, one batch at a time, in series with the upstream reads: this
//! number is an upper bound on one fill's throughput.

use std::hint::black_box;

use cistern::oci::{Digest, DigestVerifier};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and criterion then runs
/// every benchmark once as a smoke test. Unoptimised, so keep the inputs small there.
fn smoke_test() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

fn bytes(size: usize) -> Vec<u8> {
    // Content does not matter to sha256's speed; make it not all zeros anyway.
    (0..size)
        .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes()[7])
        .collect()
}

fn bench_verifier(c: &mut Criterion) {
    let total = if smoke_test() { 256 * KIB } else { 16 * MIB };
    let data = bytes(total);
    let mut group = c.benchmark_group("verifier");
    group.throughput(Throughput::Bytes(total as u64));
    for chunk in [16 * KIB, 128 * KIB, MIB] {
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{}KiB", chunk / KIB)),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut v = DigestVerifier::new();
                    for c in data.chunks(chunk) {
                        v.update(black_box(c));
                    }
                    v.finish()
                })
            },
        );
    }
    group.finish();
}

fn bench_small(c: &mut Criterion) {
    let mut group = c.benchmark_group("digest");
    let text = "sha256:4f1e1a9fbd6fbd4d6d6e0a8f0d1fd1c7ad5a9d0c1b2e3f405162738495a6b7c8";
    group.bench_function("parse", |b| b.iter(|| Digest::parse(black_box(text))));
    // A typical image manifest is 0.5–2 KiB; a manifest served from disk is re-hashed.
    let manifest = bytes(2 * KIB);
    group.throughput(Throughput::Bytes(manifest.len() as u64));
    group.bench_function("of_2KiB_manifest", |b| {
        b.iter(|| Digest::of(black_box(&manifest)))
    });
    group.finish();
}

criterion_group!(benches, bench_verifier, bench_small);
criterion_main!(benches);
