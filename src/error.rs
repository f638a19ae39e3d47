//! One error type for everything a request can run into.
//!
//! The [`ErrorKind`] says what went wrong in terms a client understands, and so decides the
//! HTTP status and OCI error code (see `api::errors`, the only place that picks them). The
//! message is for people: it is sent to the client, so it never contains credentials.
//! Errors are `Clone` because one failed cache fill reports the same error to every client
//! attached to it.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    // --- The client's request is wrong.
    NameInvalid,
    DigestInvalid,
    TagInvalid,
    /// A write (push, delete) or an endpoint cistern does not serve.
    Unsupported,
    /// A `Range` that lies outside the blob; carries the blob's size for `Content-Range`.
    RangeNotSatisfiable {
        size: u64,
    },
    // --- The content does not exist upstream.
    NameUnknown,
    ManifestUnknown,
    BlobUnknown,
    // --- The upstream failed or misbehaved.
    /// Could not connect, connection reset, 5xx, or any other failure of the exchange.
    UpstreamUnavailable,
    /// No response headers, or no body bytes, within the configured limit.
    UpstreamTimeout,
    /// The upstream refused access (401/403) with the credentials cistern has.
    UpstreamDenied,
    /// The upstream rate-limited us; `Retry-After` is passed on when it gave one.
    TooManyRequests {
        retry_after: Option<Duration>,
    },
    /// The upstream sent content that fails verification: wrong digest, wrong length, a
    /// manifest over the size cap.
    UpstreamInvalid,
    /// The admin API's bearer token is missing or wrong.
    AdminUnauthorized,
    // --- Client access control (`[access]`).
    /// No credentials where a login is needed, or wrong ones: 401 with a Basic challenge.
    Unauthorized,
    /// Logged in, but this user may not pull this.
    Denied,
    // --- cistern itself.
    /// Local disk trouble.
    Storage,
    /// The server is shutting down and cancelled the work.
    ShuttingDown,
    Internal,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn storage(context: &str, e: &std::io::Error) -> Error {
        Error::new(ErrorKind::Storage, format!("{context}: {e}"))
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// Was the upstream at fault, so that another upstream (or a later retry) might succeed?
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::UpstreamUnavailable
                | ErrorKind::UpstreamTimeout
                | ErrorKind::UpstreamDenied
                | ErrorKind::TooManyRequests { .. }
                | ErrorKind::UpstreamInvalid
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {}

/// An error and its causes, joined with `: `. reqwest's `Display` omits the cause ("error
/// sending request"); the chain says what happened ("… connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
