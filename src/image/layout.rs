//! OCI image layouts (`oci:DIR[:TAG]`) and their tar archives (`oci-archive:FILE[:TAG]`).

use std::path::Path;

use super::{Image, ResolveOptions};
use crate::cache::Cache;

/// Errors of reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Placeholder.
    #[error("OCI layouts are not supported yet: {0}")]
    Unsupported(String),
}

/// Resolves an image from an OCI layout directory.
pub fn resolve_dir(path: &Path, _tag: Option<&str>, _opts: &ResolveOptions) -> Result<Image, LayoutError> {
    Err(LayoutError::Unsupported(path.display().to_string()))
}

/// Resolves an image from a tar of an OCI layout; blobs are copied into the cache.
pub fn resolve_archive(
    path: &Path,
    _tag: Option<&str>,
    _opts: &ResolveOptions,
    _cache: &Cache,
) -> Result<Image, LayoutError> {
    Err(LayoutError::Unsupported(path.display().to_string()))
}
