//! The fake registry's server: the accept loop, routing, and the answers for the token
//! endpoint, auth, scripts, rules and content.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::body::{Body, CutStream, CutSwitch, empty, full, stream_body};
use super::fault::{Fault, Rule};
use super::reply::{Reply, basic_authorization, expiring_token_reply};
use super::{Auth, Bearer, Kind, Seen, Shared, Target};

pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = tokio::select! {
            _ = shared.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "fake registry: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            let cut = Arc::new(CutSwitch::default());
            let local = stream.local_addr().expect("local addr");
            let service = service_fn({
                let (shared, cut) = (shared.clone(), cut.clone());
                move |req| handle(shared.clone(), cut.clone(), local, req)
            });
            let stream = CutStream { inner: stream, cut };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = shared.stop.cancelled() => {}
            }
        });
    }
}

enum Route {
    Ping,
    Token,
    Blob { repo: String, digest: String },
    Manifest { repo: String, reference: String },
    Tags { repo: String },
    Other,
}

impl Route {
    fn parse(path: &str) -> Route {
        if path == "/v2/" || path == "/v2" {
            return Route::Ping;
        }
        if path == "/token" {
            return Route::Token;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Other;
        };
        if let Some(repo) = rest.strip_suffix("/tags/list") {
            return Route::Tags {
                repo: repo.to_string(),
            };
        }
        if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
            return Route::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            };
        }
        if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
            return Route::Manifest {
                repo: repo.to_string(),
                reference: reference.to_string(),
            };
        }
        Route::Other
    }

    fn describe(&self) -> (Kind, String, String) {
        match self {
            Route::Ping => (Kind::Ping, String::new(), String::new()),
            Route::Token => (Kind::Token, String::new(), String::new()),
            Route::Blob { repo, digest } => (Kind::Blob, repo.clone(), digest.clone()),
            Route::Manifest { repo, reference } => {
                (Kind::Manifest, repo.clone(), reference.clone())
            }
            Route::Tags { repo } => (Kind::Tags, repo.clone(), String::new()),
            Route::Other => (Kind::Other, String::new(), String::new()),
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    cut: Arc<CutSwitch>,
    local: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let route = Route::parse(req.uri().path());
    let (kind, repo, reference) = route.describe();
    let method = req.method().clone();
    let seen = Seen {
        method: method.clone(),
        kind,
        repo,
        reference,
        path: req.uri().path().to_string(),
        query: req.uri().query().map(str::to_string),
        headers: req.headers().clone(),
        local,
    };
    let (auth, script) = {
        let mut state = shared.lock();
        state.seen.push(seen.clone());
        (state.auth.clone(), state.script.clone())
    };

    if let (Route::Token, Some(Auth::Bearer(bearer))) = (&route, &auth) {
        return Ok(token_endpoint(&shared, bearer, &seen));
    }
    if let Some(challenge) = auth.and_then(|auth| challenge_unless_allowed(&shared, &auth, &seen)) {
        return Ok(challenge);
    }
    if let Some(reply) = script.and_then(|script| script(&seen)) {
        return Ok(boxed(reply));
    }
    if method != Method::GET && method != Method::HEAD {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the fake registry is read-only",
        ));
    }
    let target = match &route {
        Route::Blob { digest, .. } => Target::Blob(digest.clone()),
        Route::Manifest { reference, .. } => Target::Manifest(reference.clone()),
        _ => Target::Any,
    };
    let ranged = req.headers().contains_key(header::RANGE);
    let rule = shared.lock().take_rule(&target, &method, ranged);
    if let Some(rule) = &rule
        && let Some(answer) = rule.answer()
    {
        // A gate in the same rule holds the whole answer (a 404 the test releases).
        for fault in rule.faults() {
            if let Fault::GateAt(_, gate) = fault {
                gate.pass().await;
            }
        }
        return Ok(answer_with(&shared, answer, &seen).await);
    }
    let response = match route {
        Route::Ping => Response::builder()
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .body(full(Bytes::from_static(b"{}")))
            .unwrap(),
        Route::Blob { repo, digest } => {
            blob(&shared, &cut, &method, req.headers(), &repo, &digest, rule)
        }
        Route::Manifest { repo, reference } => {
            manifest(&shared, &cut, &method, &repo, &reference, rule)
        }
        Route::Tags { repo } => tags(&shared, &repo, req.uri().query()),
        Route::Token | Route::Other => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route"),
    };
    Ok(response)
}

/// A rule's answer in place of the content.
async fn answer_with(shared: &Shared, answer: &Fault, seen: &Seen) -> Response<Body> {
    match answer {
        Fault::Status(code) => status_fault(*code, seen.kind),
        Fault::RateLimited(seconds) => rate_limited(*seconds),
        Fault::RedirectTo(base) => Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, format!("{base}{}", seen.path))
            .body(empty())
            .unwrap(),
        // The head is never sent; the connection is held until the client hangs up (hyper
        // then drops this future) or the registry is dropped.
        _ => {
            shared.stop.cancelled().await;
            error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "stopped")
        }
    }
}

/// The own token endpoint: a token for the login it wants, or 401.
fn token_endpoint(shared: &Shared, bearer: &Bearer, seen: &Seen) -> Response<Body> {
    if let Some((user, password)) = &bearer.login
        && seen.authorization() != Some(basic_authorization(user, password))
    {
        return error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "login required");
    }
    let token = match &bearer.token {
        Some(token) => token.clone(),
        None => {
            let mut state = shared.lock();
            state.tokens_issued += 1;
            format!("tok-{}", state.tokens_issued)
        }
    };
    boxed(expiring_token_reply(&token, bearer.expires_in))
}

/// `None` if `seen` carries what `auth` asks for; otherwise the 401 challenge.
fn challenge_unless_allowed(shared: &Shared, auth: &Auth, seen: &Seen) -> Option<Response<Body>> {
    let given = seen.authorization();
    let challenge = match auth {
        Auth::Basic { username, password } => {
            if given == Some(basic_authorization(username, password)) {
                return None;
            }
            r#"Basic realm="fake registry""#.to_string()
        }
        Auth::Bearer(bearer) => {
            let valid = match &bearer.token {
                Some(token) => format!("Bearer {token}"),
                None => format!("Bearer tok-{}", shared.lock().tokens_issued),
            };
            if given.as_ref() == Some(&valid) && valid != "Bearer tok-0" {
                return None;
            }
            let realm = match &bearer.realm {
                Some(realm) => realm.clone(),
                None => format!("{}/token", seen.own_url()),
            };
            let mut challenge = format!(r#"Bearer realm="{realm}",service="{}""#, bearer.service);
            if bearer.scope {
                challenge.push_str(&format!(r#",scope="repository:{}:pull""#, seen.repo));
            }
            challenge
        }
    };
    let mut reply = error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required",
    );
    reply.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        challenge.parse().expect("a header value"),
    );
    Some(reply)
}

fn boxed(reply: Reply) -> Response<Body> {
    reply.map(|body| body.map_err(|never| match never {}).boxed())
}

fn blob(
    shared: &Arc<Shared>,
    cut: &Arc<CutSwitch>,
    method: &Method,
    headers: &HeaderMap,
    repo: &str,
    digest: &str,
    rule: Option<Rule>,
) -> Response<Body> {
    let data = {
        let state = shared.lock();
        let Some(r) = state.repos.get(repo) else {
            return name_unknown();
        };
        let Some(data) = r.blobs.get(digest).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            );
        };
        data
    };

    let size = data.len() as u64;
    let ignore_range = rule
        .as_ref()
        .is_some_and(|r| r.has(|f| matches!(f, Fault::IgnoreRange)));
    let range = headers.get(header::RANGE).filter(|_| !ignore_range);
    let (status, start, end) = match range.map(|v| parse_range(v, size)) {
        None => (StatusCode::OK, 0, size),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(None) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .body(empty())
                .unwrap();
        }
    };
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", digest)
        .header(header::ACCEPT_RANGES, "bytes");
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        );
    }
    let omit_length = rule
        .as_ref()
        .is_some_and(|r| r.has(|f| matches!(f, Fault::HeadWithoutLength)));
    if !omit_length {
        response = response.header(header::CONTENT_LENGTH, end - start);
    }
    if method == Method::HEAD {
        return response.body(empty()).unwrap();
    }
    let data = corrupt_if_asked(data, rule.as_ref());
    let body = stream_body(
        data.slice(start as usize..end as usize),
        rule,
        shared.stop.clone(),
        cut.clone(),
    );
    response.body(body).unwrap()
}

fn manifest(
    shared: &Arc<Shared>,
    cut: &Arc<CutSwitch>,
    method: &Method,
    repo: &str,
    reference: &str,
    rule: Option<Rule>,
) -> Response<Body> {
    let (digest, found) = {
        let state = shared.lock();
        let Some(r) = state.repos.get(repo) else {
            return name_unknown();
        };
        let digest = match r.tags.get(reference) {
            Some(digest) => digest.clone(),
            None => reference.to_string(),
        };
        let Some(found) = r.manifests.get(&digest).cloned() else {
            return error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            );
        };
        (digest, found)
    };
    let response = Response::builder()
        .header(header::CONTENT_TYPE, found.media_type.as_str())
        .header("Docker-Content-Digest", digest)
        .header(header::CONTENT_LENGTH, found.bytes.len());
    if method == Method::HEAD {
        return response.body(empty()).unwrap();
    }
    let data = corrupt_if_asked(found.bytes, rule.as_ref());
    response
        .body(stream_body(data, rule, shared.stop.clone(), cut.clone()))
        .unwrap()
}

fn tags(shared: &Arc<Shared>, repo: &str, query: Option<&str>) -> Response<Body> {
    let state = shared.lock();
    let Some(r) = state.repos.get(repo) else {
        return name_unknown();
    };
    let mut n = None;
    let mut last = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => n = v.parse::<usize>().ok(),
            Some(("last", v)) => last = Some(v.to_string()),
            _ => {}
        }
    }
    let after: Vec<&String> = r
        .tags
        .keys()
        .filter(|t| last.as_ref().is_none_or(|l| *t > l))
        .collect();
    let page: Vec<&String> = after
        .iter()
        .copied()
        .take(n.unwrap_or(usize::MAX))
        .collect();
    let body = serde_json::json!({ "name": repo, "tags": page });
    let mut response = Response::builder().header(header::CONTENT_TYPE, "application/json");
    if page.len() < after.len() {
        let next = format!(
            "</v2/{repo}/tags/list?n={}&last={}>; rel=\"next\"",
            page.len(),
            page.last().expect("a truncated page is not empty")
        );
        response = response.header(header::LINK, next);
    }
    response.body(full(Bytes::from(body.to_string()))).unwrap()
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` → the half-open range `[start, end)`; `None` if it
/// cannot be satisfied (or is not understood).
fn parse_range(value: &HeaderValue, size: u64) -> Option<(u64, u64)> {
    let spec = value.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (size.saturating_sub(n), size)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size
        } else {
            (b.parse::<u64>().ok()? + 1).min(size)
        };
        (start, end)
    };
    (start < end).then_some((start, end))
}

fn corrupt_if_asked(data: Bytes, rule: Option<&Rule>) -> Bytes {
    if rule.is_some_and(|r| r.has(|f| matches!(f, Fault::WrongBytes))) {
        Bytes::from(data.iter().map(|b| !b).collect::<Vec<u8>>())
    } else {
        data
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body =
        serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(Bytes::from(body.to_string())))
        .unwrap()
}

/// The answer for a repository the registry does not hold.
fn name_unknown() -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
        "repository name not known to registry",
    )
}

fn status_fault(code: u16, kind: Kind) -> Response<Body> {
    if code == 429 {
        return rate_limited(1);
    }
    let status = StatusCode::from_u16(code).expect("a valid status code in a Fault::Status");
    let oci_code = match (code, kind) {
        (401, _) => "UNAUTHORIZED",
        (403, _) => "DENIED",
        (404, Kind::Blob) => "BLOB_UNKNOWN",
        (404, Kind::Manifest) => "MANIFEST_UNKNOWN",
        (404, _) => "NAME_UNKNOWN",
        _ => "UNKNOWN",
    };
    error(status, oci_code, "injected fault")
}

/// 429 with `Retry-After: <seconds>`.
fn rate_limited(seconds: u64) -> Response<Body> {
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
        "injected fault",
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&seconds.to_string()).expect("digits"),
    );
    response
}
