//! Blocking storage work from async code.

use crate::error::{Error, Result};

/// Runs blocking storage work on the blocking pool, mapping failures to storage errors.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    context: &'static str,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::storage(context, &e)),
        Err(e) => Err(Error::internal(format!("{context}: {e}"))),
    }
}
