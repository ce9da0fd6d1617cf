//! Digests: a streaming hasher for the algorithms OCI content uses.

use oci_spec::image::{Digest, DigestAlgorithm};
use sha2::Digest as _;

/// A digest whose algorithm cannot be computed here (only sha256 and sha512 can).
#[derive(Debug, Clone, thiserror::Error)]
#[error("unsupported digest algorithm in {0}")]
pub struct UnsupportedAlgorithm(pub Digest);

/// A streaming hasher for the digest algorithms OCI registries use.
#[derive(Clone)]
pub enum Hasher {
    /// sha256, the canonical algorithm.
    Sha256(sha2::Sha256),
    /// sha512, allowed by the OCI image spec.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// A hasher for the algorithm of `digest`.
    pub fn for_digest(digest: &Digest) -> Result<Self, UnsupportedAlgorithm> {
        match digest.algorithm() {
            DigestAlgorithm::Sha256 => Ok(Self::sha256()),
            DigestAlgorithm::Sha512 => Ok(Self::Sha512(sha2::Sha512::new())),
            _ => Err(UnsupportedAlgorithm(digest.clone())),
        }
    }

    /// A sha256 hasher.
    pub fn sha256() -> Self {
        Self::Sha256(sha2::Sha256::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        let s = match self {
            Self::Sha256(h) => format!("sha256:{}", hex::encode(h.finalize())),
            Self::Sha512(h) => format!("sha512:{}", hex::encode(h.finalize())),
        };
        s.parse().expect("a hex digest is always valid")
    }
}
