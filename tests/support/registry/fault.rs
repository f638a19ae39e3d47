//! What a [`super::FakeRegistry`] can do wrong: [`Fault`]s, grouped into [`Rule`]s with a
//! use count, and the [`Gate`] that holds a body mid-way until the test opens it.

use std::sync::Arc;

use http::Method;
use tokio::sync::watch;

/// One way for the upstream to misbehave on a request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an OCI error body (GET and HEAD). A 429 carries
    /// `Retry-After: 1`; a 404 uses the matching `*_UNKNOWN` code.
    Status(u16),
    /// Answer 429 `TOOMANYREQUESTS` with `Retry-After: <seconds>`.
    RateLimited(u64),
    /// Never send the response head; hold the connection open until the client goes away or
    /// the registry is dropped (a black hole behind a working TCP accept).
    NoAnswer,
    /// Declare the full `Content-Length`, send exactly this many bytes, then close the
    /// connection. The close (a FIN, then the body's error) comes only once those bytes are on
    /// the socket, so the client receives every one of them and then the end: the cut offset
    /// is exact.
    CutAfter(u64),
    /// Declare the full `Content-Length`, send this many bytes, then send nothing more until the
    /// client goes away or the registry is dropped.
    StallAfter(u64),
    /// Send a body of the right length whose every byte is inverted (headers, including
    /// `Docker-Content-Digest`, still describe the real content).
    WrongBytes,
    /// Send the body in small chunks at about this rate.
    Slow { bytes_per_sec: u64 },
    /// Send this many bytes, then hold the rest of the body until the gate opens. With an
    /// answer in the same rule (`Status`, `RateLimited`, …) the whole answer is held.
    GateAt(u64, Gate),
    /// Answer HEAD without a `Content-Length` (as some upstreams do).
    HeadWithoutLength,
    /// Answer a `Range` request with `200` and the whole blob, as if `Range` were not there.
    IgnoreRange,
    /// Answer 307 to the same path on `base` (`http://host:port`), as registries send blob
    /// GETs to a blob store.
    RedirectTo(String),
}

impl Fault {
    /// A rule that applies to the next matching request only.
    pub fn once(self) -> Rule {
        Rule::from(self).once()
    }

    /// A rule that applies to the next `n` matching requests.
    pub fn times(self, n: usize) -> Rule {
        Rule::from(self).times(n)
    }

    /// A rule applying this fault and `other` to the same request.
    pub fn and(self, other: Fault) -> Rule {
        Rule::from(self).and(other)
    }

    /// A rule for requests without `Range` only (a fill's whole-blob GET).
    pub fn whole_only(self) -> Rule {
        Rule::from(self).whole_only()
    }

    /// A rule for requests with `Range` only.
    pub fn ranged_only(self) -> Rule {
        Rule::from(self).ranged_only()
    }

    fn applies_to(&self, method: &Method) -> bool {
        match self {
            Fault::Status(_) | Fault::RateLimited(_) | Fault::NoAnswer | Fault::RedirectTo(_) => {
                method == Method::GET || method == Method::HEAD
            }
            Fault::HeadWithoutLength => method == Method::HEAD,
            _ => method == Method::GET,
        }
    }
}

/// Faults applied together to a request, with an optional use count.
#[derive(Clone, Debug)]
pub struct Rule {
    faults: Vec<Fault>,
    /// `None`: forever.
    pub(super) remaining: Option<usize>,
    /// `Some(true)`: only requests with `Range`; `Some(false)`: only those without.
    ranged: Option<bool>,
}

impl Rule {
    pub fn and(mut self, fault: Fault) -> Rule {
        self.faults.push(fault);
        self
    }

    pub fn once(self) -> Rule {
        self.times(1)
    }

    /// Applies only to requests without `Range` (a fill's whole-blob GET).
    pub fn whole_only(mut self) -> Rule {
        self.ranged = Some(false);
        self
    }

    /// Applies only to requests with `Range`.
    pub fn ranged_only(mut self) -> Rule {
        self.ranged = Some(true);
        self
    }

    pub fn times(mut self, n: usize) -> Rule {
        self.remaining = Some(n);
        self
    }

    /// A rule applies to a method only if every one of its faults does (a HEAD has no body to
    /// cut, a GET has no missing HEAD length), and to a request with (`ranged`) or without
    /// `Range` as [`Rule::ranged_only`] or [`Rule::whole_only`] say.
    pub(super) fn applies_to(&self, method: &Method, ranged: bool) -> bool {
        self.remaining != Some(0)
            && self.ranged.is_none_or(|r| r == ranged)
            && self.faults.iter().all(|f| f.applies_to(method))
    }

    /// The answer that replaces the content, if one of the faults is such an answer.
    pub(super) fn answer(&self) -> Option<&Fault> {
        self.faults.iter().find(|f| {
            matches!(
                f,
                Fault::Status(_) | Fault::RateLimited(_) | Fault::NoAnswer | Fault::RedirectTo(_)
            )
        })
    }

    pub(super) fn faults(&self) -> &[Fault] {
        &self.faults
    }

    pub(super) fn has(&self, pred: impl Fn(&Fault) -> bool) -> bool {
        self.faults.iter().any(pred)
    }
}

impl From<Fault> for Rule {
    fn from(fault: Fault) -> Rule {
        Rule {
            faults: vec![fault],
            remaining: None,
            ranged: None,
        }
    }
}

// === impl Gate ===

/// Holds response bodies at a byte offset until the test opens it. Once open it stays open.
#[derive(Clone, Debug)]
pub struct Gate {
    inner: Arc<GateInner>,
}

#[derive(Debug)]
struct GateInner {
    open: watch::Sender<bool>,
    /// How many bodies have reached the gate so far (open or not).
    reached: watch::Sender<usize>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                open: watch::Sender::new(false),
                reached: watch::Sender::new(0),
            }),
        }
    }

    /// Lets every held body, and every later one, through.
    pub fn open(&self) {
        self.inner.open.send_replace(true);
    }

    /// Waits (bounded) until `n` bodies in total have been sent up to the gate. The bytes
    /// before the gate have then been handed to the connection, not necessarily received.
    pub async fn wait_reached(&self, n: usize) {
        let mut rx = self.inner.reached.subscribe();
        crate::support::bounded("bodies to reach the gate", rx.wait_for(|&r| r >= n))
            .await
            .expect("gate sender lives as long as the gate");
    }

    pub fn reached(&self) -> usize {
        *self.inner.reached.borrow()
    }

    pub(super) async fn pass(&self) {
        self.inner.reached.send_modify(|r| *r += 1);
        let mut rx = self.inner.open.subscribe();
        let _ = rx.wait_for(|&open| open).await;
    }
}
