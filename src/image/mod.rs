//! Resolved images: a [`Source`] in, an [`Image`] out.
//!
//! Whatever the transport (a registry, an OCI layout, an `oci-archive` or a `docker save`
//! archive), resolving gives the same thing: the image configuration and the list of layer
//! blobs as files whose digest and size have been verified, in order, each with the DiffID the
//! configuration promises for it. [`resolve`] walks every transport's documents the same way;
//! the transport modules only fetch.

use std::path::PathBuf;

use oci_spec::image::{Digest, ImageConfiguration};

use crate::cache::Cache;
use crate::progress::Progress;
use crate::reference::Source;
use crate::registry::RegistryOptions;

pub(crate) mod archive;
pub mod docker_archive;
pub mod layout;
pub mod registry;
pub(crate) mod resolve;

#[cfg(test)]
mod defects;

pub use crate::oci::{Compression, Platform, MAX_DOCUMENT_SIZE};

/// One layer of a resolved image.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Digest of the blob as stored (compressed).
    pub digest: Digest,
    /// Size of the blob as stored.
    pub size: u64,
    /// The media type the manifest gives for the blob.
    pub media_type: String,
    /// The compression that media type announces.
    pub compression: Compression,
    /// Digest of the uncompressed tar, from the configuration's `rootfs.diff_ids`.
    pub diff_id: Digest,
    /// A file holding exactly the blob's bytes, verified against `digest` and `size`.
    pub path: PathBuf,
}

/// A resolved image, ready to flatten.
#[derive(Debug, Clone)]
pub struct Image {
    /// The source as the user gave it, normalised (`docker.io/library/nginx:latest`,
    /// `oci:/path/layout:tag`, ...).
    pub source: String,
    /// The default output name stem (`nginx` for `127.0.0.1:5000/web/nginx:1`).
    pub name: String,
    /// Digest of the image manifest that was used (for a `docker save` archive, which has no
    /// manifest, the digest of the image configuration).
    pub manifest_digest: Digest,
    /// The image configuration.
    pub config: ImageConfiguration,
    /// Digest of the configuration blob.
    pub config_digest: Digest,
    /// The layers, lowest first.
    pub layers: Vec<Layer>,
}

/// What resolving needs besides the source.
#[derive(Debug, Clone, Default)]
pub struct ResolveOptions {
    /// The platform to pick from an image index.
    pub platform: Platform,
    /// Registry access.
    pub registry: RegistryOptions,
    /// The largest blob an archive may hold (`--max-size`): a larger member is refused before
    /// a byte of it is copied, so a compressed archive cannot fill the disk.
    pub max_blob_size: Option<u64>,
}

/// Errors of resolving an image (the transport modules have their own, wrapped here).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// From the registry.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// From an OCI layout or oci-archive.
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    /// From a docker-archive.
    #[error(transparent)]
    DockerArchive(#[from] docker_archive::DockerArchiveError),
    /// From manifest parsing and selection.
    #[error(transparent)]
    Select(#[from] crate::oci::SelectError),
}

impl ImageError {
    /// The integrity error underneath, whichever transport found it: the same defect gives
    /// the same [`crate::oci::VerifyError`] from every transport.
    pub fn verify(&self) -> Option<&crate::oci::VerifyError> {
        match self {
            Self::Registry(crate::registry::RegistryError::Verify(e)) => Some(e),
            Self::Layout(layout::LayoutError::Verify(e)) => Some(e),
            Self::DockerArchive(docker_archive::DockerArchiveError::Verify(e)) => Some(e),
            _ => None,
        }
    }
}

/// Resolves `source` into an [`Image`] whose layer blobs are verified files.
pub async fn resolve(
    source: &Source,
    opts: &ResolveOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<Image, ImageError> {
    match source {
        Source::Registry(r) => Ok(registry::pull(r, opts, cache, progress).await?),
        Source::OciDir { path, tag } => Ok(layout::resolve_dir(path, tag.as_deref(), opts)?),
        Source::OciArchive { path, tag } => {
            Ok(layout::resolve_archive(path, tag.as_deref(), opts, cache)?)
        }
        Source::DockerArchive { path, selector } => Ok(docker_archive::resolve_capped(
            path,
            selector.as_deref(),
            cache,
            opts.max_blob_size,
        )?),
    }
}
