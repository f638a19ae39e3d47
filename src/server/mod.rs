//! The HTTP edge: the accept loop, connections, graceful shutdown. Knows HTTP, not OCI; the
//! OCI handling is in [`handlers`].

pub mod access;
pub mod activity;
pub mod admin;
pub mod handlers;
pub mod heap;
pub mod tls;
pub mod zero_copy;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use handlers::{App, Body};

/// The client's address, put in every request's extensions by the accept loop (failed logins
/// are counted per address).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// Something that answers HTTP requests: the registry API, or the admin API.
pub trait Service: Send + Sync + 'static {
    fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = hyper::Response<Body>> + Send;
}

/// Bytes hyper may buffer per HTTP/1 connection, each way.
const MAX_BUFFERED: usize = 64 * 1024;

/// A client that has not sent its request headers after this long is dropped (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `shutdown` is cancelled. Each connection runs on `connections`;
/// on shutdown it finishes its in-flight request and closes, or is dropped outright when
/// `abort` is cancelled (end of the grace period).
pub async fn accept_loop<S: Service>(
    listener: TcpListener,
    app: Arc<S>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    connections: TaskTracker,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Body chunks go to the socket as the buffers they are (no copy into hyper's own
        // buffer), which is what lets `zero_copy` see a mapped chunk and send it by sendfile.
        .writev(true)
        // hyper keeps polling a body while less than this is queued for the socket (default
        // ~400 KiB): with 64 KiB chunks this keeps about one queued per connection, which is
        // what bounds memory with many clients on one blob. It also caps request headers,
        // which 64 KiB covers with room to spare.
        .max_buf_size(MAX_BUFFERED);
    // The same bound per HTTP/2 stream (HTTPS clients get h2 by ALPN): hyper's default would
    // queue ~400 KiB per stream, 20 MiB for 50 clients on one blob.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_send_buf_size(MAX_BUFFERED);
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning, and
                // keep serving the connections we have.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let abort = abort.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => {
                    let stream = zero_copy::ZeroCopyStream::new(stream);
                    serve_connection(stream, peer, true, app, builder, shutdown, abort).await;
                }
                Some(tls) => {
                    // Bounded like the request head: a client that connects and says nothing
                    // does not hold a task.
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)) => r,
                        () = shutdown.cancelled() => return,
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, false, app, builder, shutdown, abort)
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// Serves one connection (plain or TLS) until it closes, or until shutdown: then in-flight
/// responses may finish until `abort`. `zero_copy`: the stream is a
/// [`zero_copy::ZeroCopyStream`], so HTTP/1 responses on it may carry mapped chunks.
async fn serve_connection<S: Service, IO>(
    io: IO,
    peer: std::net::SocketAddr,
    zero_copy: bool,
    app: Arc<S>,
    builder: auto::Builder<TokioExecutor>,
    shutdown: CancellationToken,
    abort: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let end = activity::request_started();
        let app = app.clone();
        req.extensions_mut().insert(Peer(peer));
        // HTTP/2 (h2c) copies every body byte into its frames: mapped chunks would only be
        // read through the mapping there.
        if zero_copy && req.version() < hyper::Version::HTTP_2 {
            req.extensions_mut().insert(zero_copy::ZeroCopy);
        }
        async move {
            let response = app.handle(req).await.map(|body| {
                body.map_frame(move |frame| {
                    let _counted_when_dropped = &end;
                    frame
                })
                .boxed_unsync()
            });
            Ok::<_, Infallible>(response)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = abort.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
