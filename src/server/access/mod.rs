//! Client access control on the registry API (`[access]`): who a request is, and whether it
//! may pull what it asks for.
//!
//! Clients log in the way registries expect: a `401` with `WWW-Authenticate: Basic
//! realm="cistern"` makes Docker, containerd, podman and skopeo send `Authorization: Basic`
//! with the credentials they hold for this host. The decision itself is the pure
//! `policy::access`; this module adds what needs state or IO:
//! - passwords are bcrypt hashes (`htpasswd`), checked on the blocking pool, at most
//!   [`HASHING_AT_ONCE`] at a time, so a flood of logins cannot starve the async workers; a
//!   successful check is remembered for [`REMEMBER_LOGIN`] (keyed by a hash of the user and
//!   password, never the password) because clients send credentials with every request;
//! - an unknown user costs the same bcrypt check as a known one (against a dummy hash), so
//!   timing does not tell which users exist;
//! - failed logins are logged (user and address, never the password) and counted per client
//!   address: past [`MAX_FAILURES`] in [`FAILURE_WINDOW`], that address gets 429 until the
//!   window passes. Both memories are bounded caches.

mod htpasswd;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

pub use htpasswd::Htpasswd;

use crate::config::AccessConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::policy::access::{Decision, Pattern, Rules};

/// Failed logins from one address before it is refused for the rest of the window.
pub const MAX_FAILURES: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a verified user and password are taken as verified without bcrypt.
pub const REMEMBER_LOGIN: Duration = Duration::from_secs(300);
/// bcrypt checks running at once (each takes tens of milliseconds of one core, on purpose).
pub const HASHING_AT_ONCE: usize = 2;

/// Who the request is: `None` for anonymous.
pub type User = Option<Arc<str>>;

pub struct AccessGate {
    rules: Rules,
    passwords: Htpasswd,
    /// A bcrypt hash of nothing anyone knows, checked for unknown users.
    dummy_hash: String,
    verified: moka::sync::Cache<[u8; 32], Arc<str>>,
    failures: moka::sync::Cache<IpAddr, Arc<AtomicU32>>,
    hashing: Arc<Semaphore>,
}

impl AccessGate {
    /// Builds the gate from `[access]`, reading `htpasswd_file`. Errors name the key.
    pub fn load(config: &AccessConfig) -> anyhow::Result<AccessGate> {
        let passwords = match &config.htpasswd_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("access.htpasswd_file: {}", path.display()))?;
                Htpasswd::parse(&text)
                    .map_err(|e| anyhow::anyhow!("access.htpasswd_file: {}: {e}", path.display()))?
            }
            None => Htpasswd::default(),
        };
        let patterns = |field: &str, list: &[String]| -> anyhow::Result<Vec<Pattern>> {
            list.iter()
                .enumerate()
                .map(|(i, p)| Pattern::parse(p).map_err(|e| anyhow::anyhow!("{field}[{i}]: {e}")))
                .collect()
        };
        let anonymous = patterns("access.anonymous", &config.anonymous)?;
        let mut users = std::collections::BTreeMap::new();
        for (user, list) in &config.users {
            if !passwords.has(user) {
                anyhow::bail!(
                    "access.users.{user}: no such user in access.htpasswd_file (add one with `htpasswd -B`)"
                );
            }
            users.insert(
                user.clone(),
                patterns(&format!("access.users.{user}"), list)?,
            );
        }
        // Cost 10, as `htpasswd -B` writes by default, so an unknown user takes as long as a
        // known one. Its password need not be secret: a match for an unknown user is still a
        // failed login.
        let dummy_hash = bcrypt::hash("no such user", 10)
            .map_err(|e| anyhow::anyhow!("preparing the password checks: {e}"))?;
        Ok(AccessGate {
            rules: Rules::new(anonymous, users),
            passwords,
            dummy_hash,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(REMEMBER_LOGIN)
                .build(),
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_WINDOW)
                .build(),
            hashing: Arc::new(Semaphore::new(HASHING_AT_ONCE)),
        })
    }

    /// Who sent the request: anonymous without `Authorization`, the user if its Basic
    /// credentials check out, else an error (401, or 429 for an address with too many
    /// failed logins).
    pub async fn identify(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Result<User> {
        let Some(value) = headers.get(AUTHORIZATION) else {
            return Ok(None);
        };
        let (user, password) = basic_credentials(value.as_bytes())?;
        // containers/image (skopeo, podman) answers a Basic challenge with `Basic Og==` (an
        // empty user and password) when it holds no credentials for this host: that is an
        // anonymous client, not a failed login.
        if user.is_empty() && password.is_empty() {
            return Ok(None);
        }
        if let Some(ip) = peer
            && self
                .failures
                .get(&ip)
                .is_some_and(|n| n.load(Ordering::Relaxed) >= MAX_FAILURES)
        {
            tracing::warn!(%ip, user = %user, "login refused: too many failed logins from this address");
            return Err(Error::new(
                ErrorKind::TooManyRequests {
                    retry_after: Some(FAILURE_WINDOW),
                },
                "too many failed logins from this address; try again later",
            ));
        }
        let key = login_key(&user, &password);
        if let Some(known) = self.verified.get(&key) {
            return Ok(Some(known));
        }
        let hash = self
            .passwords
            .hash_of(&user)
            .unwrap_or(&self.dummy_hash)
            .to_string();
        let known_user = self.passwords.has(&user);
        let permit = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("the password checks stopped"))?;
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .map_err(|e| Error::internal(format!("checking a password: {e}")))?;
        if matched && known_user {
            let user: Arc<str> = Arc::from(user);
            self.verified.insert(key, user.clone());
            return Ok(Some(user));
        }
        if let Some(ip) = peer {
            self.failures
                .get_with(ip, Default::default)
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(
            ip = ?peer,
            user = %user,
            known_user,
            "failed login to the registry API"
        );
        Err(Error::new(
            ErrorKind::Unauthorized,
            "wrong user name or password",
        ))
    }

    /// May `user` pull `registry/repository`? `credentialed`: the route's upstreams log in.
    pub fn authorize(
        &self,
        user: Option<&str>,
        registry: &str,
        repository: &str,
        credentialed: bool,
    ) -> Result<()> {
        match self.rules.decide(user, registry, repository, credentialed) {
            Decision::Allow => Ok(()),
            Decision::NeedsLogin => Err(Error::new(
                ErrorKind::Unauthorized,
                format!("{registry}/{repository}: log in to pull this"),
            )),
            Decision::Forbidden => Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "{registry}/{repository}: user {} may not pull this",
                    user.unwrap_or_default()
                ),
            )),
        }
    }

    /// The `/v2/` ping. skopeo and podman send credentials only for a challenge they saw on
    /// the ping, so with users to log in, an anonymous ping gets the 401 Basic challenge;
    /// clients without credentials then send empty ones, which count as anonymous. Only a
    /// mirror with anonymous patterns and no users answers an anonymous ping with 200 (which
    /// Docker's `registry-mirrors` needs to use it without `docker login`).
    pub fn ping(&self, user: Option<&str>) -> Result<()> {
        if user.is_some() || (self.rules.any_anonymous() && !self.rules.has_users()) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unauthorized,
                "this mirror needs a login",
            ))
        }
    }
}

/// `Basic <base64(user:password)>`. Anything else is a 401 that says what is accepted.
fn basic_credentials(value: &[u8]) -> Result<(String, String)> {
    let malformed = || {
        Error::new(
            ErrorKind::Unauthorized,
            "give credentials as Authorization: Basic <base64 of user:password>",
        )
    };
    let value = std::str::from_utf8(value).map_err(|_| malformed())?;
    let (scheme, encoded) = value.trim().split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed());
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| malformed())?;
    let text = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (user, password) = text.split_once(':').ok_or_else(malformed)?;
    Ok((user.to_string(), password.to_string()))
}

/// What a verified login is remembered under: a hash, so the password is not kept in memory
/// longer than the check.
fn login_key(user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(password.as_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse_and_refuse() {
        let enc = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        assert_eq!(
            basic_credentials(enc("ci:pa:ss").as_bytes()).unwrap(),
            ("ci".to_string(), "pa:ss".to_string())
        );
        assert_eq!(
            basic_credentials(format!("basic  {}", &enc("a:b")[6..]).as_bytes()).unwrap(),
            ("a".to_string(), "b".to_string())
        );
        for bad in [
            "Bearer abc".to_string(),
            "Basic !!!".to_string(),
            enc("no-colon"),
            "Basic".to_string(),
        ] {
            let e = basic_credentials(bad.as_bytes()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Unauthorized, "{bad}");
        }
        assert!(basic_credentials(b"Basic \xff").is_err());
    }
}
