//! Which blobs an eviction pass removes. Pure: it sees copies of the index's entries, so it
//! sorts without holding any lock.

use std::time::SystemTime;

use super::key::BlobKey;

/// A blob eviction may consider.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub digest: BlobKey,
    pub size: u64,
    pub last_access: SystemTime,
    /// Pinned or being read: never chosen.
    pub keep: bool,
}

/// The least recently used blobs whose removal brings `total` to `target` or below (or as
/// close as the blobs that may go allow). Pure.
pub fn choose_victims(
    candidates: impl Iterator<Item = Candidate>,
    total: u64,
    target: u64,
) -> Vec<Candidate> {
    let mut c: Vec<Candidate> = candidates.filter(|c| !c.keep).collect();
    c.sort_by(|a, b| {
        a.last_access
            .cmp(&b.last_access)
            .then(a.digest.cmp(&b.digest))
    });
    let mut remaining = total;
    let mut out = Vec::new();
    for cand in c {
        if remaining <= target {
            break;
        }
        remaining = remaining.saturating_sub(cand.size);
        out.push(cand);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;
    use std::time::Duration;

    fn cand(n: u8, size: u64, age_secs: u64, keep: bool) -> Candidate {
        Candidate {
            digest: BlobKey::of(&Digest::of(&[n])),
            size,
            last_access: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age_secs),
            keep,
        }
    }

    fn digests(v: &[Candidate]) -> Vec<Digest> {
        v.iter().map(|c| c.digest.digest()).collect()
    }

    #[test]
    fn oldest_go_first_until_under_target() {
        let c = vec![
            cand(1, 10, 5, false),
            cand(2, 10, 50, false),
            cand(3, 10, 500, false),
        ];
        let v = choose_victims(c.into_iter(), 30, 15);
        assert_eq!(digests(&v), vec![Digest::of(&[3]), Digest::of(&[2])]);
    }

    #[test]
    fn kept_blobs_are_never_chosen() {
        let c = vec![cand(1, 10, 5, false), cand(2, 10, 500, true)];
        let v = choose_victims(c.into_iter(), 20, 0);
        assert_eq!(digests(&v), vec![Digest::of(&[1])]);
    }

    #[test]
    fn nothing_under_target() {
        let c = vec![cand(1, 10, 5, false)];
        assert!(choose_victims(c.into_iter(), 10, 10).is_empty());
    }
}
