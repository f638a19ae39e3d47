//! Response bodies: a task ("pump") feeds the body frame by frame as a [`Rule`] asks: paced,
//! held at a [`Gate`], stalled, or cut after exactly n bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Frame;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fault::{Fault, Gate, Rule};

pub(super) type Body = BoxBody<Bytes, io::Error>;

/// Bytes per body frame when no fault asks for something else.
const CHUNK: usize = 64 * 1024;

/// How a body is sent: pacing, a gate, and how it ends.
struct Plan {
    chunk: usize,
    delay: Option<Duration>,
    gate: Option<(u64, Gate)>,
    end: End,
}

enum End {
    Complete,
    Cut(u64),
    Stall(u64),
}

impl Plan {
    fn from_rule(rule: Option<Rule>) -> Plan {
        let mut plan = Plan {
            chunk: CHUNK,
            delay: None,
            gate: None,
            end: End::Complete,
        };
        for fault in rule.map(|r| r.faults().to_vec()).unwrap_or_default() {
            match fault {
                Fault::CutAfter(n) => plan.end = End::Cut(n),
                Fault::StallAfter(n) => plan.end = End::Stall(n),
                Fault::GateAt(n, gate) => plan.gate = Some((n, gate)),
                Fault::Slow { bytes_per_sec } => {
                    let per_tick = (bytes_per_sec / 20).clamp(1, CHUNK as u64);
                    plan.chunk = per_tick as usize;
                    plan.delay = Some(Duration::from_secs_f64(
                        per_tick as f64 / bytes_per_sec.max(1) as f64,
                    ));
                }
                _ => {}
            }
        }
        plan
    }
}

/// What the pump hands the body.
enum Piece {
    Data(Bytes),
    /// End the body with this error at once.
    Fail(io::Error),
    /// Close the connection once every byte before this point is on the socket.
    Cut,
}

/// A body fed by a task that follows the plan. The task stops as soon as the client goes away
/// (hyper drops the body, closing the channel) or the registry is dropped.
pub(super) fn stream_body(
    data: Bytes,
    rule: Option<Rule>,
    stop: CancellationToken,
    cut: Arc<CutSwitch>,
) -> Body {
    let (tx, rx) = mpsc::channel::<Piece>(2);
    tokio::spawn(pump(data, Plan::from_rule(rule), tx, stop));
    PumpedBody {
        rx,
        cut,
        cutting: false,
    }
    .boxed()
}

/// The body of a response, as the pump sends it.
///
/// A cut needs care: an error from a body makes hyper drop the connection at once, with
/// whatever it still holds in its write buffer (up to several frames), and a close that races
/// the last write can lose it. So at [`Piece::Cut`] the body asks the connection's socket
/// ([`CutStream`]) to close its sending side at its next flush, and answers `Pending` until it
/// has. hyper buffers each frame before it asks for the next, so its buffer then holds every
/// byte this body returned; it writes that buffer out, and calls the socket's flush only once
/// the buffer is empty. The socket then sends its FIN after exactly the bytes before the cut,
/// and only then does the body return its error, which ends the connection.
struct PumpedBody {
    rx: mpsc::Receiver<Piece>,
    cut: Arc<CutSwitch>,
    /// Set at [`Piece::Cut`].
    cutting: bool,
}

impl hyper::body::Body for PumpedBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if self.cutting {
                if self.cut.closed(cx.waker()) {
                    return Poll::Ready(Some(Err(io::Error::other(
                        "fake registry: cut the body short",
                    ))));
                }
                return Poll::Pending;
            }
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Piece::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Some(Piece::Fail(e)) => return Poll::Ready(Some(Err(e))),
                Some(Piece::Cut) => {
                    self.cut.request();
                    self.cutting = true;
                }
                None => return Poll::Ready(None),
            }
        }
    }
}

/// A cut asked for by a connection's body and carried out by its socket, and who waits for it.
#[derive(Default)]
pub(super) struct CutSwitch {
    requested: AtomicBool,
    closed: AtomicBool,
    waiter: Mutex<Option<Waker>>,
}

impl CutSwitch {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// True once the socket has sent its FIN; otherwise `waker` is woken when it has.
    fn closed(&self, waker: &Waker) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            return true;
        }
        *self.waiter.lock().unwrap_or_else(|e| e.into_inner()) = Some(waker.clone());
        // A close between the check and the registration found no waiter to wake.
        self.closed.load(Ordering::SeqCst)
    }

    fn close_now(&self) -> bool {
        self.requested.load(Ordering::SeqCst) && !self.closed.load(Ordering::SeqCst)
    }

    fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let waiter = self.waiter.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(waker) = waiter {
            waker.wake();
        }
    }
}

/// A connection's socket, which carries out a cut its body asked for (see [`PumpedBody`]).
pub(super) struct CutStream {
    pub(super) inner: TcpStream,
    pub(super) cut: Arc<CutSwitch>,
}

impl AsyncRead for CutStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CutStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// hyper flushes the socket only once its own buffer is empty: if the body asked for a
    /// cut, every byte before it has been written now, and the FIN goes right after them.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        if self.cut.close_now() {
            // An error here (the client already left) still ends what the client receives.
            let _ = std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
            self.cut.mark_closed();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn pump(data: Bytes, plan: Plan, tx: mpsc::Sender<Piece>, stop: CancellationToken) {
    let len = data.len() as u64;
    let limit = match plan.end {
        End::Complete => len,
        End::Cut(n) | End::Stall(n) => n.min(len),
    };
    let mut pos = 0u64;
    let mut gate_passed = false;
    while pos < limit {
        if let Some((at, gate)) = &plan.gate
            && !gate_passed
            && pos >= *at
        {
            tokio::select! {
                _ = gate.pass() => {}
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
            }
            gate_passed = true;
        }
        let mut end = (pos + plan.chunk as u64).min(limit);
        if let Some((at, _)) = &plan.gate
            && !gate_passed
            && *at > pos
            && *at < end
        {
            end = *at;
        }
        if let Some(delay) = plan.delay {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
            }
        }
        let piece = Piece::Data(data.slice(pos as usize..end as usize));
        if tx.send(piece).await.is_err() {
            return;
        }
        pos = end;
    }
    match plan.end {
        End::Complete => {}
        End::Cut(_) => {
            let _ = tx.send(Piece::Cut).await;
        }
        End::Stall(_) => {
            tokio::select! {
                _ = tx.closed() => {}
                _ = stop.cancelled() => {
                    let _ = tx.send(Piece::Fail(io::Error::other("fake registry: stopped"))).await;
                }
            }
        }
    }
}

pub(super) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

pub(super) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}
