//! A flood of requests that each cause state (distinct Accept headers, repository names, tags
//! and cold digests) leaves disk and memory within their budgets, and normal pulls keep
//! working during and after it.

mod support;

use std::path::Path;

use futures_util::StreamExt;
use http::Method;
use support::process::ChildCistern;
use support::*;

/// Requests in the flood, and how many run at once.
const REQUESTS: usize = 10_000;
const CONCURRENCY: usize = 32;
/// The metadata budget under test (the smallest one allowed) and its high watermark (the
/// default 95 %): what the data directory's metadata may hold once eviction has run.
const METADATA_BUDGET: u64 = 64 * 1024;
const METADATA_HIGH: u64 = METADATA_BUDGET * 95 / 100;
/// The blob budget.
const MAX_SIZE: u64 = 16 * 1024 * 1024;
/// Resident memory the cistern process may use after the flood. Measured: about 40 MiB for
/// the debug build (10,000 tag and negative answers in memory, the reference index, 64 KiB of
/// metadata on disk). Unbounded state would grow with every request; the bound leaves room for
/// allocator variance, not for that.
const MAX_RSS: u64 = 96 * 1024 * 1024;

/// Repositories the upstream holds: each tagged repository has its own image manifest; each
/// linked repository holds the shared manifest (so a pull of it by digest there is a cache hit
/// that the upstream confirms, and becomes a link).
const TAGGED: usize = REQUESTS / 4;
const LINKED: usize = REQUESTS / 8;

fn tagged(i: usize) -> String {
    format!("flood/tagged{i}")
}

fn linked(i: usize) -> String {
    format!("flood/linked{i}")
}

/// Bytes and count of the files below `data/sub`.
fn files_below(data: &Path, sub: &str) -> (u64, usize) {
    let mut bytes = 0;
    let mut count = 0;
    let mut stack = vec![data.join(sub)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                bytes += meta.len();
                count += 1;
            }
        }
    }
    (bytes, count)
}

/// Bytes of manifests, tag records and links: what `cache.max_metadata_size` counts.
fn metadata_bytes(data: &Path) -> u64 {
    ["manifests", "tags", "links"]
        .iter()
        .map(|s| files_below(data, s).0)
        .sum()
}

/// An image: its manifest, config and two layers, held by `library/app:1` upstream.
struct Image {
    manifest: bytes::Bytes,
    blobs: Vec<bytes::Bytes>,
}

fn image() -> Image {
    let config = blob_bytes(KIB, 7000);
    let layers = [blob_bytes(MIB, 7001), blob_bytes(MIB, 7002)];
    Image {
        manifest: oci_image_manifest(&config, &[&layers[0], &layers[1]]),
        blobs: vec![config, layers[0].clone(), layers[1].clone()],
    }
}

/// Pulls `library/app:1` as a client does: the manifest by tag, then each blob, every digest
/// checked. From another loopback address than the flood's, so the flood's cold fills do not
/// count against its per-client cap.
async fn pull(url: &str, image: &Image) {
    let client = Client::from_address(url, FOREIGN.parse().unwrap());
    let request = client
        .request(Method::GET, &manifest_route("library/app", "1"))
        .header("accept", OCI_MANIFEST);
    let manifest = client.send(request).await;
    assert_eq!(manifest.status, 200, "manifest: {}", manifest.body_text());
    assert_same_bytes(manifest.bytes(), &image.manifest, "the image's manifest");
    assert_eq!(
        manifest.header("docker-content-digest"),
        Some(sha256_digest(&image.manifest).as_str())
    );
    for blob in &image.blobs {
        let digest = sha256_digest(blob);
        let got = client.get_blob("library/app", &digest).await.unwrap();
        assert_eq!(sha256_digest(&got), digest, "a blob of the image");
    }
}

/// One request of the flood, by its number: what it asks and the statuses it may get.
fn flood_request(
    client: &Client,
    i: usize,
    shared: &str,
) -> (reqwest::RequestBuilder, &'static [u16]) {
    // A distinct Accept header on every request: known types with one no registry knows.
    let accept = format!("{OCI_MANIFEST}, {OCI_INDEX}, application/x-flood-{i}");
    match i % 8 {
        // A tag of a repository the upstream holds: a manifest and a tag record each.
        0 | 4 => {
            let path = manifest_route(&tagged(i / 4), "latest");
            (
                client.request(Method::GET, &path).header("accept", accept),
                &[200],
            )
        }
        // The shared manifest by digest under a repository that holds it: a cache hit, then
        // a link once the upstream confirms it.
        1 => {
            let path = manifest_route(&linked(i / 8), shared);
            (
                client.request(Method::GET, &path).header("accept", accept),
                &[200],
            )
        }
        // ... and under a name the upstream does not know: a cache hit, never a link.
        5 => {
            let path = manifest_route(&format!("flood/madeup{i}"), shared);
            (
                client.request(Method::GET, &path).header("accept", accept),
                &[200],
            )
        }
        // A tag of a repository nobody holds.
        2 | 6 => {
            let path = manifest_route(&format!("flood/ghost{i}"), "latest");
            (
                client.request(Method::GET, &path).header("accept", accept),
                &[404],
            )
        }
        // A cold digest: unknown upstream (429 if the client's cold-fill cap is full).
        _ => {
            let digest = sha256_digest(format!("cold {i}").as_bytes());
            let path = blob_route("flood/app", &digest);
            (client.request(Method::GET, &path), &[404, 429])
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_state_stays_within_the_budgets_and_pulls_keep_working() {
    let image = image();
    let shared = image_manifest(1);
    let shared_digest = sha256_digest(&shared);
    let mut builder = FakeRegistry::builder().manifest(
        "library/app",
        Some("1"),
        OCI_MANIFEST,
        image.manifest.clone(),
    );
    for b in &image.blobs {
        builder = builder.blob("library/app", b.clone());
    }
    builder = builder.manifest("flood/shared", None, OCI_MANIFEST, shared.clone());
    for i in 0..TAGGED {
        builder = builder.manifest(
            &tagged(i),
            Some("latest"),
            OCI_MANIFEST,
            image_manifest(10 + i as u32),
        );
    }
    for i in 0..LINKED {
        builder = builder.manifest(&linked(i), None, OCI_MANIFEST, shared.clone());
    }
    let upstream = builder.start().await;

    let data = DataDir::new();
    let extra = format!(
        "[cache]\nmax_metadata_size = \"{METADATA_BUDGET}B\"\nmax_size = \"{MAX_SIZE}B\"\n"
    );
    // Its log (a warning per cold digest) goes to a file beside the data directory.
    let log = data.root().join("cistern.log");
    let cistern = ChildCistern::start_with(
        &upstream.url(),
        data.path(),
        &extra,
        Some(log),
        ChildCistern::serve,
    )
    .await;
    let url = cistern.url.clone();

    // The shared manifest is cached before the flood pulls it under other names.
    let client = Client::new(&url);
    let first = client.get_manifest("flood/shared", &shared_digest).await;
    assert_eq!(first.status, 200);
    pull(&url, &image).await;

    // The flood, 32 requests at a time, and a normal pull while it runs.
    let during = tokio::spawn({
        let (url, image) = (url.clone(), image);
        async move {
            pull(&url, &image).await;
            image
        }
    });
    let answered = futures_util::stream::iter(0..REQUESTS)
        .map(|i| {
            let (request, allowed) = flood_request(&client, i, &shared_digest);
            let client = &client;
            async move {
                let status = client.send(request).await.status.as_u16();
                assert!(
                    allowed.contains(&status),
                    "request {i}: status {status}, wanted {allowed:?}"
                );
            }
        })
        .buffer_unordered(CONCURRENCY)
        .count()
        .await;
    assert_eq!(answered, REQUESTS);
    let image = bounded("the pull during the flood", during).await.unwrap();

    // The metadata is back within its budget once eviction has run (it runs after every write
    // that passes the high watermark; the last of the flood's writes asks for the last pass).
    let data_path = data.path().to_path_buf();
    eventually(
        "the metadata back under its high watermark",
        patience(),
        || metadata_bytes(&data_path) <= METADATA_HIGH,
    )
    .await;
    let (tag_bytes, tag_records) = files_below(data.path(), "tags");
    let (link_bytes, links) = files_below(data.path(), "links");
    let (manifest_bytes, manifests) = files_below(data.path(), "manifests");
    eprintln!(
        "after the flood: {manifests} manifests ({manifest_bytes} B), {tag_records} tag records \
         ({tag_bytes} B), {links} links ({link_bytes} B)"
    );
    // Every tag record or link takes over 100 bytes: the budget bounds how many there are,
    // far below the 2,500 tags the flood resolved.
    assert!(
        tag_records + links <= (METADATA_HIGH / 100) as usize,
        "{tag_records} tag records and {links} links"
    );
    let (blob_bytes_on_disk, _) = files_below(data.path(), "blobs");
    assert!(
        blob_bytes_on_disk <= MAX_SIZE,
        "{blob_bytes_on_disk} bytes of blobs"
    );
    let rss = cistern.rss_bytes();
    eprintln!("cistern's RSS after the flood: {} KiB", rss / 1024);
    assert!(rss <= MAX_RSS, "cistern's RSS is {} KiB", rss / 1024);

    // And a normal pull after it, through metadata the flood may have evicted.
    pull(&url, &image).await;
}
