//! Hashing while copying: what export and import read blobs through, so a blob's bytes are
//! checked against its digest in the same pass that copies them (never read twice, never
//! held whole in memory).

use std::io::{self, Read};

use crate::oci::DigestVerifier;

/// Read size when copying a blob: large reads, few syscalls.
pub(super) const CHUNK: usize = 256 * 1024;

/// A reader that hashes what passes through it.
pub(super) struct Hashing<R> {
    pub(super) inner: R,
    pub(super) verifier: DigestVerifier,
}

impl<R> Hashing<R> {
    pub(super) fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            verifier: DigestVerifier::new(),
        }
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.verifier.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}
