//! Which upstreams recently sent wrong bytes for which blob.
//!
//! An upstream that answers 200 with corrupt content looks healthy to its breaker, and the
//! digest is known only at the end, after clients have the bytes, so that fill must fail. What
//! this memory buys is the next fill: [`super::select`] tries the sources that sent bad bytes
//! for that digest last. Demoted, not dropped, so a lone upstream whose corruption was
//! passing is still retried.

use std::time::Duration;

use crate::oci::Digest;

/// (digest, upstream name) pairs whose bytes failed verification recently.
pub struct BadSources {
    recent: moka::sync::Cache<(Digest, String), ()>,
}

impl BadSources {
    /// How long a source stays suspect for a digest: long enough for clients to retry their
    /// pull, short enough that a repaired mirror is used again.
    pub const MEMORY: Duration = Duration::from_secs(60 * 60);

    pub fn new() -> BadSources {
        BadSources {
            recent: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Self::MEMORY)
                .build(),
        }
    }

    pub fn mark(&self, digest: &Digest, upstream: &str) {
        tracing::warn!(%digest, upstream, "upstream sent bad bytes: trying it last for this blob");
        self.recent
            .insert((digest.clone(), upstream.to_string()), ());
    }

    pub fn is_bad(&self, digest: &Digest, upstream: &str) -> bool {
        self.recent
            .contains_key(&(digest.clone(), upstream.to_string()))
    }
}

impl Default for BadSources {
    fn default() -> Self {
        Self::new()
    }
}
