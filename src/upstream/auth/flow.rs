//! The token flow against a live upstream: the only part of `auth` that does IO.

use http::StatusCode;
use reqwest::Url;

use super::challenge::{Answer, answer, challenges};
use super::credentials::Credentials;
use super::realm::RealmPolicy;
use super::tokens::{
    MAX_TOKEN_RESPONSE, TokenCache, TokenEndpoint, TokenResponse, pull_scope, token_url,
};
use crate::clock::Clock;
use crate::error::{Error, ErrorKind, Result};
use crate::oci::RepoName;
use crate::upstream::transport::{MakeRequest, Transport};

/// One upstream's credentials, realm allow-list and token cache.
pub struct Authenticator {
    credentials: Credentials,
    realms: RealmPolicy,
    tokens: TokenCache,
    /// What token lifetimes are measured on.
    clock: Clock,
}

/// What one attempt sends in `Authorization`.
enum Authorization<'a> {
    None,
    Bearer(&'a str),
    Basic(&'a str, &'a str),
}

impl Authenticator {
    pub fn new(credentials: Credentials, realms: RealmPolicy, clock: Clock) -> Authenticator {
        Authenticator {
            credentials,
            realms,
            tokens: TokenCache::default(),
            clock,
        }
    }

    /// May this token realm receive the upstream's credentials?
    pub fn realm_allowed(&self, realm: &Url) -> bool {
        self.realms.allows(realm)
    }

    /// Sends the request `make` builds for repository `repo` (as the upstream names it),
    /// authenticating as the upstream asks: a configured token as is; otherwise a cached
    /// token up front if the upstream challenged before, and on a 401 one retry answering its
    /// challenge (see [`answer`]). A 401 that cannot be answered is returned as it is.
    pub async fn send(
        &self,
        transport: &Transport,
        repo: &RepoName,
        make: &MakeRequest<'_>,
        what: &str,
    ) -> Result<reqwest::Response> {
        if let Credentials::Token(token) = &self.credentials {
            return send_once(transport, make, Authorization::Bearer(token), what).await;
        }
        let scope = pull_scope(repo.as_str());
        // A registry that challenged us before will again: get the token up front.
        let mut token = None;
        if let Some(endpoint) = self.tokens.endpoint() {
            token = match self
                .tokens
                .get(&endpoint, &scope, self.clock.monotonic_now())
            {
                Some(t) => Some(t),
                None => self
                    .fetch_token(transport, &endpoint, &scope, what)
                    .await
                    .ok(),
            };
        }
        let auth = token
            .as_deref()
            .map_or(Authorization::None, Authorization::Bearer);
        let resp = send_once(transport, make, auth, what).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        match answer(&challenges(resp.headers()), scope, &self.credentials) {
            Answer::Token { endpoint, scope } => {
                self.tokens.forget(&endpoint, &scope);
                self.tokens.set_endpoint(endpoint.clone());
                let token = self.fetch_token(transport, &endpoint, &scope, what).await?;
                send_once(transport, make, Authorization::Bearer(&token), what).await
            }
            Answer::Basic { username, password } => {
                send_once(
                    transport,
                    make,
                    Authorization::Basic(username, password),
                    what,
                )
                .await
            }
            Answer::NoRealm => Err(Error::new(
                ErrorKind::UpstreamInvalid,
                format!(
                    "{what}: upstream {} sent a bearer challenge without a usable realm",
                    transport.name()
                ),
            )),
            Answer::PassOn => Ok(resp),
        }
    }

    /// Gets a token from the realm and caches it. Credentials are sent only to an allowed
    /// realm; any other realm is asked anonymously.
    async fn fetch_token(
        &self,
        transport: &Transport,
        endpoint: &TokenEndpoint,
        scope: &str,
        what: &str,
    ) -> Result<String> {
        let denied = |detail: String| {
            Error::new(
                ErrorKind::UpstreamDenied,
                format!("{what}: token from {}: {detail}", endpoint.realm),
            )
        };
        let url = token_url(endpoint, scope).map_err(denied)?;
        let mut request = transport.http().get(url.clone());
        if let Credentials::Basic { username, password } = &self.credentials {
            if self.realms.allows(&url) {
                request = request.basic_auth(username, Some(password));
            } else {
                tracing::warn!(
                    upstream = %transport.name(),
                    realm = %endpoint.realm,
                    "token realm is not on this upstream's allow-list (token_realm_hosts): asking it anonymously"
                );
            }
        }
        let resp = transport
            .timed_send(request, &format!("token endpoint {}", endpoint.realm), what)
            .await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(denied(format!("answered {status}")));
        }
        let body = transport
            .read_body(resp, MAX_TOKEN_RESPONSE, what)
            .await?
            .ok_or_else(|| denied("response too large".into()))?;
        let (token, lifetime) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| denied("response has no token".into()))?;
        let now = self.clock.monotonic_now();
        self.tokens
            .put(endpoint, scope, token.clone(), now, lifetime);
        Ok(token)
    }
}

/// One attempt, with `auth` in `Authorization`.
async fn send_once(
    transport: &Transport,
    make: &MakeRequest<'_>,
    auth: Authorization<'_>,
    what: &str,
) -> Result<reqwest::Response> {
    let request = match auth {
        Authorization::None => make(),
        Authorization::Bearer(t) => make().bearer_auth(t),
        Authorization::Basic(u, p) => make().basic_auth(u, Some(p)),
    };
    transport
        .timed_send(request, &format!("upstream {}", transport.name()), what)
        .await
}
