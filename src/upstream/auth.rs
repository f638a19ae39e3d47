//! Registry token auth: `WWW-Authenticate` parsing (pure) and a cache of bearer tokens.
//!
//! The flow (Docker's token spec, used by Docker Hub, ghcr.io, quay.io, …): a request answered
//! 401 with `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` is retried once with a
//! token fetched from `realm?service=…&scope=…`. Tokens are cached per (realm, service, scope)
//! until shortly before they expire. The last challenge seen is remembered, so requests for
//! other repositories fetch their token up front instead of paying a 401 round trip.
//!
//! Today tokens are fetched anonymously; upstream credentials come with the multi-upstream
//! work. No client credential is ever involved: cistern never forwards `Authorization`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme: `bearer` or `basic`.
    pub scheme: String,
    /// Parameter names lowercased; values unquoted.
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses one challenge: `Scheme k1="v, with comma", k2=token`. Quoted values may contain
/// commas and backslash escapes. Returns `None` for an empty or malformed header.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r),
        None => (header, ""),
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return None;
    }
    let mut params = HashMap::new();
    let b = rest.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let key_start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = rest[key_start..i].to_ascii_lowercase();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            return None;
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let value = if i < b.len() && b[i] == b'"' {
            i += 1;
            let mut v = String::new();
            loop {
                let c = *b.get(i)?; // an unterminated quote is malformed
                i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        v.push(*b.get(i)? as char);
                        i += 1;
                    }
                    _ => {
                        // Copy the whole UTF-8 sequence, not just one byte of it.
                        let start = i - 1;
                        let mut end = i;
                        while end < b.len() && (b[end] & 0xC0) == 0x80 {
                            end += 1;
                        }
                        v.push_str(&rest[start..end]);
                        i = end;
                    }
                }
            }
            v
        } else {
            let start = i;
            while i < b.len() && b[i] != b',' && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            rest[start..i].to_string()
        };
        if key.is_empty() {
            return None;
        }
        params.insert(key, value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

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
    tokens: Mutex<HashMap<(TokenEndpoint, String), (String, Instant)>>,
    endpoint: Mutex<Option<TokenEndpoint>>,
}

impl TokenCache {
    pub fn get(&self, endpoint: &TokenEndpoint, scope: &str, now: Instant) -> Option<String> {
        let mut tokens = self.tokens.lock().expect("token cache poisoned");
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

    pub fn put(&self, endpoint: &TokenEndpoint, scope: &str, token: String, expires: Instant) {
        let mut tokens = self.tokens.lock().expect("token cache poisoned");
        // Bounded: expired entries go first; a registry with more live scopes than this is
        // far past anything a mirror sees.
        if tokens.len() >= 10_000 {
            tokens.retain(|_, (_, e)| *e > Instant::now());
            if tokens.len() >= 10_000 {
                tokens.clear();
            }
        }
        tokens.insert((endpoint.clone(), scope.to_string()), (token, expires));
    }

    pub fn forget(&self, endpoint: &TokenEndpoint, scope: &str) {
        self.tokens
            .lock()
            .expect("token cache poisoned")
            .remove(&(endpoint.clone(), scope.to_string()));
    }

    pub fn endpoint(&self) -> Option<TokenEndpoint> {
        self.endpoint.lock().expect("token cache poisoned").clone()
    }

    pub fn set_endpoint(&self, endpoint: TokenEndpoint) {
        *self.endpoint.lock().expect("token cache poisoned") = Some(endpoint);
    }
}

/// The pull scope for a repository.
pub fn pull_scope(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/nginx:pull"));
    }

    #[test]
    fn quoted_values_keep_commas_and_escapes() {
        let c = parse_challenge(
            r#"Bearer realm = "https://r/t", scope="repository:a:pull,push", error="x\"y", x=tok"#,
        )
        .unwrap();
        assert_eq!(c.param("scope"), Some("repository:a:pull,push"));
        assert_eq!(c.param("error"), Some("x\"y"));
        assert_eq!(c.param("x"), Some("tok"));
        assert_eq!(c.param("realm"), Some("https://r/t"));
    }

    #[test]
    fn basic_and_malformed() {
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        assert_eq!(parse_challenge("").map(|c| c.scheme), None);
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge(r#"Bearer realm"#).is_none());
        assert!(parse_challenge(r#"Bear{er realm="x""#).is_none());
        let c = parse_challenge(r#"Bearer realm="ünïcode""#).unwrap();
        assert_eq!(c.param("realm"), Some("ünïcode"));
    }

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
        cache.put(&ep, "s", "t".into(), now + Duration::from_secs(10));
        assert_eq!(cache.get(&ep, "s", now), Some("t".into()));
        assert_eq!(cache.get(&ep, "other", now), None);
        assert_eq!(cache.get(&ep, "s", now + Duration::from_secs(11)), None);
    }
}
