//! The CLI's side of the admin API: sends one [`Op`] to a running server and returns its
//! answer. The only IO in `admin` besides the cache itself.

use std::path::Path;

use anyhow::Context;

use super::Op;

/// Sends `op` to the admin API at `url` (e.g. `http://127.0.0.1:5001`), with the bearer token
/// read from `token_file` if given, and returns the answer's body. A non-2xx answer is an
/// error carrying the status and the body.
pub async fn call(url: &str, token_file: Option<&Path>, op: &Op) -> anyhow::Result<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (method, path) = op.to_http();
    let base = reqwest::Url::parse(&format!("{}/", url.trim_end_matches('/')))
        .with_context(|| format!("--url {url:?}"))?;
    let target = base.join(&path)?;
    let token = match token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let mut request = reqwest::Client::new().request(method, target.clone());
    if let Some(t) = &token {
        request = request.bearer_auth(t);
    }
    let resp = request.send().await.with_context(|| format!("{target}"))?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        anyhow::bail!("{target}: {status}: {body}");
    }
    Ok(body)
}
