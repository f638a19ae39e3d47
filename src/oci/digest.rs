//! Content digests (`sha256:<64 hex>`) and incremental verification.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// A validated `sha256:` digest. Other algorithms are rejected at parse time: cistern verifies
/// every byte it caches, and sha256 is the algorithm every registry and client uses.
///
/// Held as its 32 bytes, not as text: the reference graph and the indexes keep one per
/// manifest, blob and reference, and a string (24 bytes plus a 64-byte allocation) tripled
/// what they cost per cached item. Byte order is the order of the lowercase hex, so sorting is
/// unchanged; the text form is made where it is shown or becomes a path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    bytes: [u8; 32],
}

/// Why a string is not a digest; the message is shown to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form algorithm:hex")]
    Malformed(String),
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    #[error("sha256 digest must be 64 lowercase hex characters, got {0:?}")]
    BadHex(String),
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let (algorithm, hex) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(truncate(s)))?;
        // The OCI grammar for algorithm names: [a-z0-9]+([+._-][a-z0-9]+)*.
        if algorithm.is_empty()
            || !algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
        {
            return Err(DigestError::Malformed(truncate(s)));
        }
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(truncate(algorithm)));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadHex(truncate(hex)));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            if let [hi, lo] = pair {
                *byte = (nibble(*hi) << 4) | nibble(*lo);
            }
        }
        Ok(Digest { bytes })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        let mut v = DigestVerifier::new();
        v.update(bytes);
        v.finish()
    }

    /// The 64 lowercase hex characters, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// The 32 bytes the hex spells.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.bytes
    }

    /// The digest whose 32 bytes these are (the inverse of [`Digest::to_bytes`]).
    pub fn from_bytes(bytes: [u8; 32]) -> Digest {
        Digest { bytes }
    }

    /// A relative path that shards by the first two hex characters, e.g.
    /// `sha256/ab/abcdef…`, so that no directory holds more than 1/256 of the cache.
    pub fn shard_path(&self) -> String {
        let hex = self.hex();
        let shard = hex.get(..2).unwrap_or_default();
        format!("sha256/{shard}/{hex}")
    }
}

/// The value of one lowercase hex character; `parse` has checked every character first, so
/// the `_` arm is never taken.
fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    }
}

fn truncate(s: &str) -> String {
    // Error messages echo client input; keep them short.
    s.chars().take(80).collect()
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl std::str::FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// Hashes bytes as they stream past; `finish` gives the digest of everything seen.
#[derive(Clone, Default)]
pub struct DigestVerifier {
    hasher: Sha256,
    len: u64,
}

impl DigestVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digest {
        Digest {
            bytes: self.hasher.finalize().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.shard_path(), format!("sha256/e3/{}", &EMPTY[7..]));
    }

    #[test]
    fn bytes_round_trip() {
        let d = Digest::parse(EMPTY).unwrap();
        let b = d.to_bytes();
        assert_eq!(b[0], 0xe3);
        assert_eq!(b[31], 0x55);
        assert_eq!(Digest::from_bytes(b), d);
    }

    #[test]
    fn hashes_incrementally() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
        let mut v = DigestVerifier::new();
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.len(), 11);
        assert_eq!(v.finish(), Digest::of(b"hello world"));
    }

    #[test]
    fn rejects_bad_digests() {
        let upper = EMPTY.to_uppercase().replacen("SHA256", "sha256", 1);
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:abc",
            &upper,
            "sha256:../../../../etc/passwd",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85%",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8550",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85\0",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(matches!(
            Digest::parse("sha512:abcd"),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
    }
}
