//! The `htpasswd` file format, bcrypt entries only: `user:$2y$10$…` per line, as
//! `htpasswd -B` writes them (and as distribution and Harbor accept). Pure: text in, users out.
//!
//! Other hash schemes (`$apr1$` MD5, `{SHA}`, crypt) are refused by name: they are weak, and
//! accepting them silently would let a careless file downgrade every password in it.

use std::collections::HashMap;

/// Users and their bcrypt hashes.
#[derive(Clone, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

impl Htpasswd {
    /// Parses the file's text. An error names the line (never the hash).
    pub fn parse(text: &str) -> Result<Htpasswd, String> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = n + 1;
            let Some((user, hash)) = line.split_once(':') else {
                return Err(format!("line {n}: expected <user>:<bcrypt hash>"));
            };
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            if !is_bcrypt(hash) {
                return Err(format!(
                    "line {n} ({user}): not a bcrypt hash; write it with `htpasswd -B`"
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {n}: {user} appears twice"));
            }
        }
        Ok(Htpasswd { users })
    }

    /// The bcrypt hash of `user`, if the file has that user.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(String::as_str)
    }

    pub fn has(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }
}

impl std::fmt::Debug for Htpasswd {
    /// Names the users, never their hashes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.users.keys().collect();
        names.sort();
        f.debug_struct("Htpasswd").field("users", &names).finish()
    }
}

/// `$2a$`, `$2b$`, `$2x$` or `$2y$`, a two-digit cost, and 53 characters of salt and hash.
fn is_bcrypt(hash: &str) -> bool {
    let b = hash.as_bytes();
    b.len() == 60
        && matches!(hash.get(..4), Some("$2a$" | "$2b$" | "$2x$" | "$2y$"))
        && b.get(4..6)
            .is_some_and(|c| c.iter().all(u8::is_ascii_digit))
        && b.get(6) == Some(&b'$')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$05$2Vq1a8Wm0fD4RT1pJ6dS8.9yq7o7b0f7m3v5oQ9Zk2Yw7S5tZbq6C";

    #[test]
    fn bcrypt_entries_parse() {
        let text = format!(
            "# users\n\nci:{HASH}\nteam-a:{}\n",
            HASH.replace("$2y$", "$2b$")
        );
        let h = Htpasswd::parse(&text).unwrap();
        assert_eq!(h.hash_of("ci"), Some(HASH));
        assert!(h.has("team-a"));
        assert!(!h.has("nobody"));
        assert!(!format!("{h:?}").contains("$2"), "{h:?}");
    }

    #[test]
    fn other_schemes_and_bad_lines_are_refused_by_line() {
        for (text, want) in [
            ("ci:$apr1$abc$def", "line 1 (ci): not a bcrypt hash"),
            ("ci:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "not a bcrypt hash"),
            ("\nci", "line 2: expected"),
            (":x", "empty user name"),
        ] {
            let e = Htpasswd::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("W6ph5"), "{e}");
        }
        let twice = format!("ci:{HASH}\nci:{HASH}");
        assert!(Htpasswd::parse(&twice).unwrap_err().contains("twice"));
    }
}
