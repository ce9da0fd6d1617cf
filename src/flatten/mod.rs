//! Flattening: layer blobs in, one [`Tree`] out.

use std::path::Path;

use crate::image::Layer;
use crate::progress::Progress;

/// Options of flattening.
#[derive(Debug, Clone)]
pub struct FlattenOptions {
    /// Largest total uncompressed size of the tree (`--max-size`).
    pub max_size: u64,
}

/// Errors of flattening.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// Placeholder.
    #[error("flattening is not available yet")]
    Unavailable,
}

/// The flattened tree.
pub struct Tree {}

/// Applies `layers` in order into one tree; file contents are spooled under `spool_dir`.
pub fn flatten(
    _layers: &[Layer],
    _opts: &FlattenOptions,
    _spool_dir: &Path,
    _progress: &Progress,
) -> Result<Tree, FlattenError> {
    Err(FlattenError::Unavailable)
}
