//! `WWW-Authenticate` challenges (pure): parsing one, and deciding how to answer a 401.

use std::collections::HashMap;

use http::HeaderMap;
use http::header::WWW_AUTHENTICATE;
use reqwest::Url;

use super::credentials::Credentials;
use super::tokens::TokenEndpoint;

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
    // A cursor over characters, not bytes: values may hold any UTF-8, and an escape may
    // precede a multi-byte character.
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',' && !c.is_whitespace()) {
            key.push(c.to_ascii_lowercase());
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                // An unterminated quote, or an escape at the end, is malformed.
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',' && !c.is_whitespace()) {
                value.push(c);
            }
        }
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

/// Every challenge a reply carries that parses; the rest are ignored.
pub fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(parse_challenge)
        .collect()
}

/// How to answer a 401.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Fetch a token for `scope` from `endpoint` and send the request again with it.
    Token {
        endpoint: TokenEndpoint,
        scope: String,
    },
    /// Send the request again with the upstream's username and password.
    Basic {
        username: &'a str,
        password: &'a str,
    },
    /// A bearer challenge without a usable realm: the upstream is broken.
    NoRealm,
    /// Nothing to answer with: the 401 stands.
    PassOn,
}

/// Decides how to answer a 401 with `challenges`. A bearer challenge wins (its own `scope`
/// if it names one, else `scope`); a basic one is answered only when the upstream has a
/// username and password.
pub fn answer<'a>(
    challenges: &[Challenge],
    scope: String,
    credentials: &'a Credentials,
) -> Answer<'a> {
    if let Some(challenge) = challenges.iter().find(|c| c.scheme == "bearer") {
        let Some(realm) = challenge.param("realm").filter(|r| is_http_url(r)) else {
            return Answer::NoRealm;
        };
        return Answer::Token {
            endpoint: TokenEndpoint {
                realm: realm.to_string(),
                service: challenge.param("service").map(str::to_string),
            },
            scope: challenge.param("scope").map_or(scope, str::to_string),
        };
    }
    if challenges.iter().any(|c| c.scheme == "basic")
        && let Credentials::Basic { username, password } = credentials
    {
        return Answer::Basic { username, password };
    }
    Answer::PassOn
}

fn is_http_url(s: &str) -> bool {
    Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An escape before a multi-byte character used to leave the byte cursor inside it, and
    /// the next slice panicked: upstream input could crash the request.
    #[test]
    fn escapes_before_multibyte_characters_do_not_panic() {
        let c = parse_challenge("Bearer realm=\"\\é\", service=\"ré\\ü\"").unwrap();
        assert_eq!(c.param("realm"), Some("é"));
        assert_eq!(c.param("service"), Some("réü"));
        assert!(parse_challenge("Bearer realm=\"\\").is_none());
        assert!(parse_challenge("Bearer realm=\"open").is_none());
    }

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

    fn answer_to<'a>(headers: &[&'static str], credentials: &'a Credentials) -> Answer<'a> {
        let mut h = HeaderMap::new();
        for v in headers {
            h.append(WWW_AUTHENTICATE, http::HeaderValue::from_static(v));
        }
        answer(&challenges(&h), "repository:a:pull".into(), credentials)
    }

    fn basic() -> Credentials {
        Credentials::Basic {
            username: "me".into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn a_bearer_challenge_asks_for_a_token() {
        assert_eq!(
            answer_to(
                &[
                    r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:b:pull""#
                ],
                &Credentials::None
            ),
            Answer::Token {
                endpoint: TokenEndpoint {
                    realm: "https://auth.example/token".into(),
                    service: Some("reg".into()),
                },
                scope: "repository:b:pull".into(),
            }
        );
        // Without its own scope the request's is used; bearer wins over basic.
        assert_eq!(
            answer_to(
                &[
                    r#"Basic realm="r""#,
                    r#"Bearer realm="http://auth.example/t""#
                ],
                &basic()
            ),
            Answer::Token {
                endpoint: TokenEndpoint {
                    realm: "http://auth.example/t".into(),
                    service: None,
                },
                scope: "repository:a:pull".into(),
            }
        );
    }

    #[test]
    fn a_bearer_challenge_needs_an_http_realm() {
        for realm in [
            r#"Bearer service="reg""#,
            r#"Bearer realm="not a url""#,
            r#"Bearer realm="ftp://auth.example/t""#,
            r#"Bearer realm="file:///etc/passwd""#,
        ] {
            assert_eq!(answer_to(&[realm], &basic()), Answer::NoRealm, "{realm}");
        }
    }

    #[test]
    fn a_basic_challenge_needs_a_password() {
        assert_eq!(
            answer_to(&[r#"Basic realm="r""#], &basic()),
            Answer::Basic {
                username: "me",
                password: "pw"
            }
        );
        assert_eq!(
            answer_to(&[r#"Basic realm="r""#], &Credentials::None),
            Answer::PassOn
        );
        assert_eq!(
            answer_to(&[r#"Basic realm="r""#], &Credentials::Token("t".into())),
            Answer::PassOn
        );
        assert_eq!(answer_to(&[], &basic()), Answer::PassOn);
        assert_eq!(answer_to(&["Bear{er x"], &basic()), Answer::PassOn);
    }
}
