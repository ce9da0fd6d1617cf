//! `docker save` archives (`docker-archive:FILE[:REPO:TAG]`).

use std::path::Path;

use super::Image;
use crate::cache::Cache;

/// Errors of reading a docker archive.
#[derive(Debug, thiserror::Error)]
pub enum DockerArchiveError {
    /// Placeholder.
    #[error("docker archives are not supported yet: {0}")]
    Unsupported(String),
}

/// Resolves an image from a `docker save` archive; layers are copied into the cache.
pub fn resolve(path: &Path, _selector: Option<&str>, _cache: &Cache) -> Result<Image, DockerArchiveError> {
    Err(DockerArchiveError::Unsupported(path.display().to_string()))
}
