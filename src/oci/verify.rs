//! The integrity checks every document and layer passes, whatever carried it: its size and
//! digest against the descriptor that names it, the document size cap, and the rules that tie
//! a manifest, its configuration and its layers together.
//!
//! Each message names the object as its transport describes it (`config sha256:… in
//! /srv/layout`, `docker.io/library/nginx:1`), so the same defect reads the same from every
//! transport but for that name.

use oci_spec::image::{Descriptor, Digest};

use super::{Hasher, MAX_DOCUMENT_SIZE};

/// A document or blob that does not match what names it, or an image whose parts disagree.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VerifyError {
    /// A document whose descriptor announces more than [`MAX_DOCUMENT_SIZE`].
    #[error("{what} is {size} bytes, more than the {MAX_DOCUMENT_SIZE} allowed")]
    TooLarge {
        /// The document.
        what: String,
        /// The size announced.
        size: u64,
    },
    /// Content whose size is not its descriptor's.
    #[error("{what} is {actual} bytes, but its descriptor says {expected}")]
    Size {
        /// The blob.
        what: String,
        /// The descriptor's size.
        expected: u64,
        /// The content's size.
        actual: u64,
    },
    /// Content whose digest is not its descriptor's.
    #[error("{what} is corrupt: its content has digest {actual}")]
    Digest {
        /// The blob.
        what: String,
        /// The descriptor's digest.
        expected: Box<Digest>,
        /// The digest of the content.
        actual: Box<Digest>,
    },
    /// A descriptor whose digest algorithm cannot be computed.
    #[error("{what} has a digest whose algorithm is not supported (sha256 and sha512 are)")]
    Algorithm {
        /// The blob.
        what: String,
    },
    /// An index entry chosen as a manifest that is itself an index.
    #[error("{what} is an image index inside an image index, which is not supported")]
    NestedIndex {
        /// The inner index.
        what: String,
    },
    /// The manifest's config is not an image configuration (an artifact).
    #[error("{what} has a config of media type {media_type}, which is not a container image")]
    NotAnImage {
        /// The manifest.
        what: String,
        /// The config's media type.
        media_type: String,
    },
    /// The configuration does not parse.
    #[error("{what} is not a valid image configuration: {reason}")]
    InvalidConfig {
        /// The configuration.
        what: String,
        /// The parser's message.
        reason: String,
    },
    /// The configuration's `rootfs.diff_ids` do not correspond to the manifest's layers.
    #[error("{what} lists {diff_ids} diff_ids, but manifest {manifest} has {layers} layers")]
    DiffIdCount {
        /// The configuration.
        what: String,
        /// The manifest's digest.
        manifest: String,
        /// How many DiffIDs.
        diff_ids: usize,
        /// How many layers.
        layers: usize,
    },
    /// An uncompressed layer whose digest is not its DiffID.
    #[error("{what} is an uncompressed tar with digest {digest}, but the config gives diff_id {diff_id}")]
    DiffId {
        /// The layer.
        what: String,
        /// The layer's digest.
        digest: Box<Digest>,
        /// The DiffID the config gives.
        diff_id: Box<Digest>,
    },
}

/// Refuses a document whose descriptor announces more than [`MAX_DOCUMENT_SIZE`], before a
/// byte of it is read.
pub fn document_size(d: &Descriptor, what: &str) -> Result<(), VerifyError> {
    if d.size() > MAX_DOCUMENT_SIZE {
        return Err(VerifyError::TooLarge {
            what: what.to_string(),
            size: d.size(),
        });
    }
    Ok(())
}

/// Checks bytes against the descriptor that names them (size, then digest).
pub fn bytes(d: &Descriptor, bytes: &[u8], what: &str) -> Result<(), VerifyError> {
    let mut h = Hasher::for_digest(d.digest()).map_err(|_| VerifyError::Algorithm {
        what: what.to_string(),
    })?;
    h.update(bytes);
    digest(d, h.finish(), bytes.len() as u64, what)
}

/// Checks a computed digest and byte count against the descriptor (size, then digest).
pub fn digest(d: &Descriptor, actual: Digest, n: u64, what: &str) -> Result<(), VerifyError> {
    size(d, n, what)?;
    if &actual != d.digest() {
        return Err(VerifyError::Digest {
            what: what.to_string(),
            expected: Box::new(d.digest().clone()),
            actual: Box::new(actual),
        });
    }
    Ok(())
}

/// Checks a size against the descriptor.
pub fn size(d: &Descriptor, n: u64, what: &str) -> Result<(), VerifyError> {
    if n != d.size() {
        return Err(VerifyError::Size {
            what: what.to_string(),
            expected: d.size(),
            actual: n,
        });
    }
    Ok(())
}

/// Refuses an uncompressed layer whose digest is not its DiffID: the two name the same bytes.
/// Digests of different algorithms cannot be compared here; flatten checks those.
pub fn uncompressed_diff_id(
    digest: &Digest,
    diff_id: &Digest,
    what: &str,
) -> Result<(), VerifyError> {
    if digest.algorithm() == diff_id.algorithm() && digest != diff_id {
        return Err(VerifyError::DiffId {
            what: what.to_string(),
            digest: Box::new(digest.clone()),
            diff_id: Box::new(diff_id.clone()),
        });
    }
    Ok(())
}
