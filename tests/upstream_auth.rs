//! Upstream bearer-token auth: cistern answers a registry's 401 challenge with a token from the
//! realm, caches it per scope until it expires, and never forwards the client's own
//! `Authorization`.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use support::{Client, DataDir, blob_and_digest, blob_bytes, sha256_digest};

/// A registry that demands `Bearer <token>` on every /v2/ request and issues tokens at /token.
struct AuthRegistry {
    url: String,
    state: Arc<AuthState>,
}

#[derive(Default)]
struct AuthState {
    blobs: HashMap<String, Bytes>,
    /// `expires_in` the token endpoint hands out.
    expires_in: u64,
    /// Every token request's query string, in order.
    token_requests: Mutex<Vec<String>>,
    /// Every `Authorization` header the /v2/ endpoints saw.
    authorizations: Mutex<Vec<String>>,
}

impl AuthRegistry {
    async fn start(blobs: HashMap<String, Bytes>, expires_in: u64) -> AuthRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(AuthState {
            blobs,
            expires_in,
            ..Default::default()
        });
        let realm = format!("http://{addr}/token");
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                let realm = realm.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        let realm = realm.clone();
                        async move { Ok::<_, Infallible>(serve(&s, &realm, req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        AuthRegistry {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn token_requests(&self) -> Vec<String> {
        self.state.token_requests.lock().unwrap().clone()
    }

    fn authorizations(&self) -> Vec<String> {
        self.state.authorizations.lock().unwrap().clone()
    }
}

fn serve(s: &AuthState, realm: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/token" {
        let query = req.uri().query().unwrap_or("").to_string();
        let n = {
            let mut t = s.token_requests.lock().unwrap();
            t.push(query);
            t.len()
        };
        let body = format!(r#"{{"token":"tok-{n}","expires_in":{}}}"#, s.expires_in);
        return Response::new(Full::new(Bytes::from(body)));
    }
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(a) = &auth {
        s.authorizations.lock().unwrap().push(a.clone());
    }
    let issued = s.token_requests.lock().unwrap().len();
    // Only the newest token is valid: an expired one must be replaced, not reused.
    let valid = auth.as_deref() == Some(&format!("Bearer tok-{issued}")) && issued > 0;
    if !valid {
        let repo = path
            .strip_prefix("/v2/")
            .and_then(|p| p.split("/blobs/").next())
            .unwrap_or("");
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(
                "www-authenticate",
                format!(
                    r#"Bearer realm="{realm}",service="fake.registry",scope="repository:{repo}:pull""#
                ),
            )
            .body(Full::new(Bytes::from_static(
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
            )))
            .unwrap();
    }
    let digest = path.rsplit('/').next().unwrap_or("");
    match s.blobs.get(digest) {
        Some(data) => Response::builder()
            .header("content-length", data.len())
            .header("docker-content-digest", digest)
            .body(Full::new(data.clone()))
            .unwrap(),
        None => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"unknown"}]}"#,
            )))
            .unwrap(),
    }
}

/// A running cistern; `stop` waits for it, so no fill is still writing when the data
/// directory is removed.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _data: DataDir,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        support::bounded("cistern to stop", self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn start_cistern(upstream: &str) -> (Client, Running) {
    support::init();
    let data = DataDir::new();
    let config = cistern::Config {
        data_dir: data.path().to_path_buf(),
        upstream: cistern::config::UpstreamConfig::new(upstream),
        ..cistern::Config::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let run_stop = stop.clone();
    let task = tokio::spawn(async move {
        cistern::Server::builder(config)
            .build()
            .await?
            .run(listener, run_stop)
            .await
    });
    (
        Client::new(url),
        Running {
            stop,
            task,
            _data: data,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_fetched_once_per_scope_and_client_credentials_stay_home() {
    let a = blob_bytes(300 * 1024, 1);
    let b = blob_bytes(10 * 1024, 2);
    let (da, db) = (sha256_digest(&a), sha256_digest(&b));
    let registry = AuthRegistry::start(
        HashMap::from([(da.clone(), a.clone()), (db.clone(), b.clone())]),
        300,
    )
    .await;
    let (client, running) = start_cistern(&registry.url).await;

    // The client sends credentials of its own: they are for cistern, never for the upstream.
    let got = client
        .send(
            client
                .request(http::Method::GET, &support::blob_route("org/app", &da))
                .header("authorization", "Bearer client-secret"),
        )
        .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body_text());
    support::assert_same_bytes(got.bytes(), &a, "first blob");
    support::assert_same_bytes(
        &client.get_blob("org/app", &db).await.unwrap(),
        &b,
        "second blob",
    );

    let tokens = registry.token_requests();
    assert_eq!(tokens.len(), 1, "one token for one scope: {tokens:?}");
    assert!(
        tokens[0].contains("service=fake.registry")
            && tokens[0].contains("scope=repository%3Aorg%2Fapp%3Apull"),
        "token request names service and scope: {}",
        tokens[0]
    );
    let auths = registry.authorizations();
    assert!(!auths.is_empty());
    assert!(
        auths.iter().all(|a| a == "Bearer tok-1"),
        "upstream saw only cistern's token: {auths:?}"
    );

    // Another repository is another scope: a new token, fetched up front (no extra 401).
    let (_, dc) = blob_and_digest(1024, 3);
    let missing = client.get(&support::blob_route("other/repo", &dc)).await;
    missing.assert_oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    let tokens = registry.token_requests();
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert!(tokens[1].contains("scope=repository%3Aother%2Frepo%3Apull"));
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_replaced() {
    let a = blob_bytes(1024, 4);
    let b = blob_bytes(1024, 5);
    let (da, db) = (sha256_digest(&a), sha256_digest(&b));
    let registry = AuthRegistry::start(
        HashMap::from([(da.clone(), a.clone()), (db.clone(), b.clone())]),
        1,
    )
    .await;
    let (client, running) = start_cistern(&registry.url).await;
    support::assert_same_bytes(&client.get_blob("x/y", &da).await.unwrap(), &a, "a");
    assert_eq!(registry.token_requests().len(), 1);
    // Let the one-second token expire: cistern must fetch a fresh one, not reuse it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    support::assert_same_bytes(&client.get_blob("x/y", &db).await.unwrap(), &b, "b");
    assert_eq!(registry.token_requests().len(), 2, "expired token replaced");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_token_realm_is_a_clear_error() {
    // A registry whose realm points at a dead port: the client gets an OCI error, not a hang.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let registry = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg_addr = registry.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = registry.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(StatusCode::UNAUTHORIZED)
                            .header(
                                "www-authenticate",
                                format!(r#"Bearer realm="http://{dead}/token",service="x""#),
                            )
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let (client, running) = start_cistern(&format!("http://{reg_addr}")).await;
    let digest = sha256_digest(b"x");
    let r = client.get(&support::blob_route("a/b", &digest)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body_text());
    assert!(
        r.body_text().contains("token endpoint"),
        "{}",
        r.body_text()
    );
    running.stop().await;
}
