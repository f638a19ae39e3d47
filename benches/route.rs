//! Route parsing: `cistern::api::route::route` (and `parse_query`), the first thing every
//! request goes through.
//!
//! ```sh
//! cargo bench --bench route
//! ```
//!
//! Paths are matched from their end and every component is checked against the OCI grammars
//! (names, tags, digests), so the cost grows with the path; the cases cover a ping, the common
//! pulls, a deep name, and two rejections.

use std::hint::black_box;

use cistern::api::route::{parse_query, route};
use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;

const DIGEST: &str = "sha256:4f1e1a9fbd6fbd4d6d6e0a8f0d1fd1c7ad5a9d0c1b2e3f405162738495a6b7c8";

fn cases() -> Vec<(&'static str, Method, String)> {
    vec![
        ("ping", Method::GET, "/v2/".to_string()),
        (
            "manifest_by_tag",
            Method::GET,
            "/v2/library/alpine/manifests/3.20".to_string(),
        ),
        (
            "manifest_by_digest",
            Method::HEAD,
            format!("/v2/library/alpine/manifests/{DIGEST}"),
        ),
        (
            "blob",
            Method::GET,
            format!("/v2/library/alpine/blobs/{DIGEST}"),
        ),
        (
            "blob_deep_name",
            Method::GET,
            format!("/v2/ghcr.io/some-org/team.name/sub_project/app-server/blobs/{DIGEST}"),
        ),
        (
            "reject_upload",
            Method::POST,
            "/v2/library/alpine/blobs/uploads/".to_string(),
        ),
        (
            "reject_bad_name",
            Method::GET,
            "/v2/Library/../etc/blobs/sha256:zz".to_string(),
        ),
    ]
}

fn bench_route(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for (name, method, path) in cases() {
        // A sanity check outside the timed loop: the accepted cases are accepted.
        let ok = route(&method, &path).is_ok();
        assert_eq!(ok, !name.starts_with("reject"), "{name}: {path}");
        group.bench_function(name, |b| {
            b.iter(|| route(black_box(&method), black_box(&path)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("parse_query");
    for (name, query) in [
        ("none", None),
        ("ns", Some("ns=docker.io")),
        ("tags_page", Some("n=100&last=v1.2.3&ns=ghcr.io")),
    ] {
        group.bench_function(name, |b| b.iter(|| parse_query(black_box(query))));
    }
    group.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
