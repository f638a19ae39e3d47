//! Bearer tokens (pure): the token endpoint's answer, the token URL, and the cache of tokens.
//! The time is passed in (the flow reads it on the server's clock), so expiry is tested
//! without clocks or sleeps.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::Url;

use crate::sync::Locked;

/// Token responses are tiny JSON documents; anything larger is not one.
pub const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;

/// The longest a token is kept, whatever `expires_in` says: registry tokens live minutes, and
/// an absurd lifetime from an upstream must not overflow the expiry instant.
const LONGEST_KEPT: Duration = Duration::from_secs(24 * 3600);

/// The token endpoint's answer. Docker Hub sends `token`; OAuth2-style servers send
/// `access_token`; either may come alone.
#[derive(Debug, serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long to use it. Absent `expires_in` means 60 s (the spec's default);
    /// a margin keeps us from sending a token that expires in flight.
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        let lifetime = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        Some((token, lifetime - margin))
    }
}

/// Where tokens come from, learned from a challenge.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenEndpoint {
    pub realm: String,
    pub service: Option<String>,
}

/// Cached tokens per (endpoint, scope), and the endpoint last seen.
#[derive(Default)]
pub struct TokenCache {
    // Both locks (`Locked`): each section does one map operation or one assignment, so a
    // poisoned lock still guards a whole map or value.
    tokens: Mutex<HashMap<(TokenEndpoint, String), (String, Instant)>>,
    endpoint: Mutex<Option<TokenEndpoint>>,
}

impl TokenCache {
    pub fn get(&self, endpoint: &TokenEndpoint, scope: &str, now: Instant) -> Option<String> {
        let mut tokens = self.tokens.locked();
        let key = (endpoint.clone(), scope.to_string());
        match tokens.get(&key) {
            Some((token, expires)) if *expires > now => Some(token.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Caches `token`, fetched at `now`, for `lifetime`.
    pub fn put(
        &self,
        endpoint: &TokenEndpoint,
        scope: &str,
        token: String,
        now: Instant,
        lifetime: Duration,
    ) {
        let expires = now + lifetime.min(LONGEST_KEPT);
        let mut tokens = self.tokens.locked();
        // Bounded: expired entries go first; a registry with more live scopes than this is
        // far past anything a mirror sees.
        if tokens.len() >= 10_000 {
            tokens.retain(|_, (_, e)| *e > now);
            if tokens.len() >= 10_000 {
                tokens.clear();
            }
        }
        tokens.insert((endpoint.clone(), scope.to_string()), (token, expires));
    }

    pub fn forget(&self, endpoint: &TokenEndpoint, scope: &str) {
        self.tokens
            .locked()
            .remove(&(endpoint.clone(), scope.to_string()));
    }

    pub fn endpoint(&self) -> Option<TokenEndpoint> {
        self.endpoint.locked().clone()
    }

    pub fn set_endpoint(&self, endpoint: TokenEndpoint) {
        *self.endpoint.locked() = Some(endpoint);
    }
}

/// The pull scope for a repository.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

/// Where to ask `endpoint` for a token for `scope`: its realm with `service` and `scope`
/// appended to the query. The error says why the realm is not a URL.
pub fn token_url(endpoint: &TokenEndpoint, scope: &str) -> Result<Url, String> {
    let mut url = Url::parse(&endpoint.realm).map_err(|e| e.to_string())?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = &endpoint.service {
            q.append_pair("service", service);
        }
        q.append_pair("scope", scope);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_response_lifetimes() {
        let t: TokenResponse = serde_json::from_str(r#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("abc".into(), Duration::from_secs(270)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("xyz".into(), Duration::from_secs(54)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }

    #[test]
    fn cache_expires() {
        let cache = TokenCache::default();
        let ep = TokenEndpoint {
            realm: "https://r".into(),
            service: None,
        };
        let now = Instant::now();
        cache.put(&ep, "s", "t".into(), now, Duration::from_secs(10));
        assert_eq!(cache.get(&ep, "s", now), Some("t".into()));
        assert_eq!(cache.get(&ep, "other", now), None);
        assert_eq!(cache.get(&ep, "s", now + Duration::from_secs(11)), None);
        // An upstream's absurd `expires_in` is kept a day, not added to the instant whole.
        cache.put(&ep, "s", "t".into(), now, Duration::from_secs(u64::MAX));
        assert_eq!(
            cache.get(&ep, "s", now + LONGEST_KEPT / 2),
            Some("t".into())
        );
        assert_eq!(cache.get(&ep, "s", now + LONGEST_KEPT), None);
    }

    #[test]
    fn token_urls() {
        let ep = TokenEndpoint {
            realm: "https://auth.example/token?x=1".into(),
            service: Some("registry example".into()),
        };
        assert_eq!(
            token_url(&ep, "repository:a/b:pull").unwrap().as_str(),
            "https://auth.example/token?x=1&service=registry+example&scope=repository%3Aa%2Fb%3Apull"
        );
        let ep = TokenEndpoint {
            realm: "https://auth.example/token".into(),
            service: None,
        };
        assert_eq!(
            token_url(&ep, "s").unwrap().as_str(),
            "https://auth.example/token?scope=s"
        );
        let ep = TokenEndpoint {
            realm: "not a url".into(),
            service: None,
        };
        assert!(token_url(&ep, "s").is_err());
    }
}
