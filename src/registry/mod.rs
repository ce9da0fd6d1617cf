//! The distribution protocol: a reference in, a resolved image with verified blobs in the
//! cache out.

use std::path::PathBuf;

use crate::cache::Cache;
use crate::image::{Image, ResolveOptions};
use crate::progress::Progress;
use crate::reference::ImageRef;

/// How to reach and authenticate to registries.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// `USER:PASS` from `--creds`.
    pub creds: Option<String>,
    /// A docker/podman auth file from `--authfile` (else `~/.docker/config.json`).
    pub authfile: Option<PathBuf>,
    /// Allow plain HTTP and unverified TLS for any registry.
    pub insecure: bool,
    /// An extra CA certificate (PEM) to trust.
    pub ca_cert: Option<PathBuf>,
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("creds", &self.creds.as_ref().map(|_| "<redacted>"))
            .field("authfile", &self.authfile)
            .field("insecure", &self.insecure)
            .field("ca_cert", &self.ca_cert)
            .finish()
    }
}

/// Errors of talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Placeholder.
    #[error("registry access is not available yet for {0}")]
    Unavailable(String),
}

/// Pulls `r`: negotiates the manifest, picks the platform, fetches config and layers into the
/// cache (verified), and returns the resolved image.
pub async fn pull(
    r: &ImageRef,
    _opts: &ResolveOptions,
    _cache: &Cache,
    _progress: &Progress,
) -> Result<Image, RegistryError> {
    Err(RegistryError::Unavailable(r.to_string()))
}
