//! A blob's key in the disk budget's index: its digest's 32 bytes, stored inline. The text form
//! (`Digest`, 64 hex characters on the heap behind a 24-byte `String`) costs about three times
//! as much per blob, and the index holds every committed blob.

use std::fmt;

use crate::oci::Digest;

/// A committed blob, as the index names it. Orders as its digest's text does (lowercase hex
/// sorts as the bytes it spells), so victim choice breaks ties the same way.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey([u8; 32]);

impl BlobKey {
    pub fn of(digest: &Digest) -> BlobKey {
        BlobKey(digest.to_bytes())
    }

    /// The digest this key stands for.
    pub fn digest(&self) -> Digest {
        Digest::from_bytes(self.0)
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.digest())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_as_digests_do() {
        let mut digests: Vec<Digest> = (0u8..50).map(|n| Digest::of(&[n])).collect();
        let mut keys: Vec<BlobKey> = digests.iter().map(BlobKey::of).collect();
        digests.sort();
        keys.sort();
        let back: Vec<Digest> = keys.iter().map(BlobKey::digest).collect();
        assert_eq!(back, digests);
    }
}
