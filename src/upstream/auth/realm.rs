//! Which token realms may receive an upstream's credentials (pure).
//!
//! A registry's token service usually lives on a sibling host (`auth.docker.io` for
//! `registry-1.docker.io`), so the allow-list is the upstream's host, every host in its
//! registrable domain by the public suffix list (never a whole public suffix such as `co.uk`
//! or `github.io`), and the configured `token_realm_hosts`. An https upstream never sends
//! credentials to a plain-http realm.

use reqwest::Url;

/// The realm allow-list of one upstream.
#[derive(Debug, Clone)]
pub struct RealmPolicy {
    /// Credentials meant for https must not be downgraded to plain text.
    https_only: bool,
    /// Lowercase host names; `.domain` allows `domain` and every host below it.
    hosts: Vec<String>,
}

impl RealmPolicy {
    /// The allow-list for an upstream at `base`, plus its `token_realm_hosts`.
    pub fn new(base: &Url, token_realm_hosts: &[String]) -> RealmPolicy {
        let host = base.host_str().unwrap_or_default().to_ascii_lowercase();
        let mut hosts = vec![host.clone()];
        if let Some(parent) = parent_domain(&host) {
            hosts.push(format!(".{parent}"));
        }
        hosts.extend(token_realm_hosts.iter().map(|h| h.to_ascii_lowercase()));
        RealmPolicy {
            https_only: base.scheme() == "https",
            hosts,
        }
    }

    /// May this realm receive our credentials? Only over https when the upstream is https,
    /// and only on an allowed host.
    pub fn allows(&self, realm: &Url) -> bool {
        if self.https_only && realm.scheme() != "https" {
            return false;
        }
        let Some(host) = realm.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        self.hosts
            .iter()
            .any(|allowed| match allowed.strip_prefix('.') {
                Some(domain) => host.ends_with(&format!(".{domain}")) || host == domain,
                None => host == *allowed,
            })
    }
}

/// The registrable domain of a host (`registry-1.docker.io` → `docker.io`, `foo.co.uk` →
/// `foo.co.uk`), by the public suffix list, so its token service (`auth.docker.io`) may get
/// credentials but a whole public suffix never does. IP addresses and single labels have none.
fn parent_domain(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') || !host.contains('.') {
        return None;
    }
    let domain = psl::domain_str(host)?;
    Some(domain.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_domains() {
        assert_eq!(
            parent_domain("registry-1.docker.io").as_deref(),
            Some("docker.io")
        );
        assert_eq!(parent_domain("ghcr.io").as_deref(), Some("ghcr.io"));
        assert_eq!(parent_domain("foo.co.uk").as_deref(), Some("foo.co.uk"));
        assert_eq!(
            parent_domain("registry.foo.co.uk").as_deref(),
            Some("foo.co.uk")
        );
        assert_eq!(
            parent_domain("me.github.io").as_deref(),
            Some("me.github.io")
        );
        assert_eq!(parent_domain("127.0.0.1"), None);
        assert_eq!(parent_domain("localhost"), None);
    }

    #[test]
    fn plain_http_upstreams_may_use_plain_http_realms() {
        let base = Url::parse("http://127.0.0.1:5000/").unwrap();
        let policy = RealmPolicy::new(&base, &[]);
        assert!(policy.allows(&Url::parse("http://127.0.0.1:5000/token").unwrap()));
        assert!(!policy.allows(&Url::parse("http://127.0.0.2:5000/token").unwrap()));
    }
}
