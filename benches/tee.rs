//! The tee path end to end: cistern (`cistern::Server` with an admin listener) on `127.0.0.1:0` in front of an
//! in-process upstream that serves one 64 MiB blob from memory.
//!
//! ```sh
//! cargo bench --bench tee
//! ```
//!
//! - `tee/upstream_direct`: the client GETs the blob from the upstream itself (the baseline).
//! - `tee/cold`: a GET through cistern when the blob is not cached. cistern streams it from the
//!   upstream to the client and into `tmp/`, hashes it, fsyncs and renames it; the client's
//!   last byte waits for all of that. Before each timed GET the blob is purged through the
//!   admin API (`DELETE /admin/blobs/<digest>`, untimed), so the next lookup misses. Each cold
//!   GET must cost exactly one upstream GET; the benchmark checks that.
//! - `tee/warm`: a GET of the cached blob (pread in 128 KiB chunks on the blocking pool).
//!
//! Throughput is bytes per second of blob delivered to the client. The three parties run on
//! separate runtimes (upstream: 1 worker thread, cistern: the binary's multi-threaded runtime,
//! client: the bench's main thread) but share the machine's cores, so on a small machine they
//! compete for CPU. The fsync at commit is part of `cold` and depends on the disk.
//!
//! Under `cargo test --benches` (criterion's one-shot smoke test, unoptimised) the blob is
//! 4 MiB.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cistern::Config;
use cistern::oci::Digest;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const MIB: usize = 1024 * 1024;
const REPO: &str = "bench/app";
/// Bytes per body frame from the fake upstream (what a real registry's writes look like).
const FRAME: usize = 64 * 1024;

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and criterion then runs
/// every benchmark once as a smoke test.
fn smoke_test() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

// === The fake upstream ===

type UpBody = BoxBody<Bytes, Infallible>;

struct FakeUpstream {
    addr: SocketAddr,
    /// GETs of the blob (not HEADs, not other paths).
    blob_gets: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// Serves `GET /v2/`, and `GET`/`HEAD /v2/<REPO>/blobs/<digest>` of one blob from memory, in
/// `FRAME`-sized frames. Ranges are ignored (a 200 with the whole blob is a valid answer).
async fn start_upstream(blob: Bytes, digest: String) -> FakeUpstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let blob_gets = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let blob_path = format!("/v2/{REPO}/blobs/{digest}");
    let (gets, token) = (blob_gets.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let (blob, blob_path, gets, token) =
                (blob.clone(), blob_path.clone(), gets.clone(), token.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = answer(&req, &blob, &blob_path, &gets);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    () = token.cancelled() => {}
                }
            });
        }
    });
    FakeUpstream {
        addr,
        blob_gets,
        stop,
    }
}

fn answer(
    req: &Request<Incoming>,
    blob: &Bytes,
    blob_path: &str,
    gets: &AtomicUsize,
) -> Response<UpBody> {
    let path = req.uri().path();
    let builder = Response::builder().header("docker-distribution-api-version", "registry/2.0");
    if path == "/v2/" {
        return builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(b"{}")).boxed())
            .expect("response");
    }
    if path != blob_path || !(req.method() == Method::GET || req.method() == Method::HEAD) {
        return builder
            .status(StatusCode::NOT_FOUND)
            .body(Empty::new().boxed())
            .expect("response");
    }
    let builder = builder
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, blob.len());
    if req.method() == Method::HEAD {
        return builder.body(Empty::new().boxed()).expect("response");
    }
    gets.fetch_add(1, Ordering::SeqCst);
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..blob.len())
        .step_by(FRAME)
        .map(|at| Ok(Frame::data(blob.slice(at..(at + FRAME).min(blob.len())))))
        .collect();
    builder
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .expect("response")
}

// === The client ===

/// GETs `url` and reads the whole body; returns its length. Panics on anything but a clean
/// 200 with a body of the expected length.
async fn get_all(client: &reqwest::Client, url: &str, want: usize) {
    let mut resp = client.get(url).send().await.expect("GET");
    assert_eq!(resp.status(), StatusCode::OK, "GET {url}");
    let mut got = 0;
    while let Some(chunk) = resp.chunk().await.expect("body") {
        got += chunk.len();
    }
    assert_eq!(got, want, "GET {url}: body length");
}

// === The benchmark ===

struct Setup {
    upstream_rt: Runtime,
    cistern_rt: Runtime,
    client_rt: Runtime,
    upstream: FakeUpstream,
    stop_cistern: CancellationToken,
    cistern: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: tempfile::TempDir,
    /// Where the committed blob lands.
    committed: PathBuf,
    /// The admin API's stats.
    stats: String,
    /// `DELETE` purges the blob (the admin API).
    purge: String,
    via_cistern: String,
    direct: String,
    size: usize,
}

fn setup() -> Setup {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let size = if smoke_test() { 4 * MIB } else { 64 * MIB };
    // Incompressible, deterministic content.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let blob: Vec<u8> = (0..size / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let blob = Bytes::from(blob);
    let digest = Digest::of(&blob);

    let upstream_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("upstream")
        .enable_all()
        .build()
        .expect("upstream runtime");
    let upstream = upstream_rt.block_on(start_upstream(blob, digest.to_string()));

    let data = tempfile::Builder::new()
        .prefix("cistern-bench-tee-")
        .tempdir()
        .expect("temp dir");
    let mut config = Config {
        data_dir: data.path().to_path_buf(),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    };
    config.upstream.url = format!("http://{}", upstream.addr);
    let cistern_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("cistern")
        .enable_all()
        .build()
        .expect("cistern runtime");
    let stop_cistern = CancellationToken::new();
    let (cistern, addr, admin) = cistern_rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind cistern");
        let addr = listener.local_addr().expect("cistern addr");
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin_addr = admin.local_addr().expect("admin addr");
        config.listen = addr;
        config.admin.listen = Some(admin_addr);
        (
            tokio::spawn({
                let stop = stop_cistern.clone();
                async move {
                    cistern::Server::builder(config)
                        .admin_listener(admin)
                        .build()
                        .await?
                        .run(listener, stop)
                        .await
                }
            }),
            addr,
            admin_addr,
        )
    });
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    Setup {
        upstream_rt,
        cistern_rt,
        client_rt,
        committed: data.path().join("blobs").join(digest.shard_path()),
        purge: format!("http://{admin}/admin/blobs/{digest}"),
        stats: format!("http://{admin}/admin/stats"),
        via_cistern: format!("http://{addr}/v2/{REPO}/blobs/{digest}"),
        direct: format!("http://{}/v2/{REPO}/blobs/{digest}", upstream.addr),
        upstream,
        stop_cistern,
        cistern,
        _data: data,
        size,
    }
}

impl Setup {
    fn shutdown(self) {
        self.stop_cistern.cancel();
        let result = self
            .cistern_rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), self.cistern).await });
        match result {
            Ok(Ok(Ok(()))) => {}
            other => panic!("cistern::run did not stop cleanly: {other:?}"),
        }
        self.upstream.stop.cancel();
        drop(self.client_rt);
        self.upstream_rt.shutdown_timeout(Duration::from_secs(5));
        self.cistern_rt.shutdown_timeout(Duration::from_secs(5));
    }
}

/// Fills running in cistern now, from the admin API's stats.
fn fills_running(s: &Setup, client: &reqwest::Client) -> u64 {
    s.client_rt.block_on(async {
        let body = client
            .get(&s.stats)
            .send()
            .await
            .expect("stats")
            .bytes()
            .await
            .expect("stats body");
        let stats: serde_json::Value = serde_json::from_slice(&body).expect("stats JSON");
        stats["fills_running"].as_u64().expect("fills_running")
    })
}

fn bench_tee(c: &mut Criterion) {
    let s = setup();
    let client = s.client_rt.block_on(async {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    });

    let mut group = c.benchmark_group("tee");
    group
        .throughput(Throughput::Bytes(s.size as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15));

    group.bench_function("upstream_direct", |b| {
        b.iter_custom(|iters| {
            s.client_rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    get_all(&client, &s.direct, s.size).await;
                }
                start.elapsed()
            })
        })
    });

    group.bench_function("cold", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                s.client_rt.block_on(async {
                    let resp = client.delete(&s.purge).send().await.expect("purge");
                    assert!(resp.status().is_success(), "purge: {}", resp.status());
                });
                assert!(!s.committed.exists(), "the purge removed the blob");
                let before = s.upstream.blob_gets.load(Ordering::SeqCst);
                let start = Instant::now();
                s.client_rt
                    .block_on(get_all(&client, &s.via_cistern, s.size));
                total += start.elapsed();
                let gets = s.upstream.blob_gets.load(Ordering::SeqCst) - before;
                assert_eq!(gets, 1, "a cold GET must make exactly one upstream GET");
                // Clients finish once the blob is verified; its commit (fsync, rename) follows
                // off their path. Wait for it, untimed, so the next purge finds it.
                // The fill leaves the map only after the directory fsync that follows the
                // rename, so wait for the admin API to report no running fill.
                let deadline = Instant::now() + Duration::from_secs(30);
                while !(s.committed.is_file() && fills_running(&s, &client) == 0) {
                    assert!(Instant::now() < deadline, "the blob was never committed");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            total
        })
    });

    // Make sure it is cached, then never cold again.
    s.client_rt
        .block_on(get_all(&client, &s.via_cistern, s.size));
    let before = s.upstream.blob_gets.load(Ordering::SeqCst);
    group.bench_function("warm", |b| {
        b.iter_custom(|iters| {
            s.client_rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    get_all(&client, &s.via_cistern, s.size).await;
                }
                start.elapsed()
            })
        })
    });
    assert_eq!(
        s.upstream.blob_gets.load(Ordering::SeqCst),
        before,
        "warm GETs must not reach the upstream"
    );
    group.finish();
    drop(client);
    s.shutdown();
}

criterion_group!(benches, bench_tee);
criterion_main!(benches);
