//! Images from a registry: the resolution walk over a registry session.
//!
//! Manifests come through the session's manifest endpoint, configs and layers through its
//! blob endpoint into the cache (verified by the cache's writer, and fetched once more when
//! corrupt), several layers at a time.

use std::path::PathBuf;

use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::{Descriptor, Digest};

use super::resolve::{self, BlobSource, Kind, Top};
use super::{Image, ResolveOptions};
use crate::cache::{Cache, CacheError};
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::registry::client::{Session, Tuning};
use crate::registry::RegistryError;

/// How many blobs are downloaded at once.
const CONCURRENT_BLOBS: usize = 4;

/// A registry session as a [`BlobSource`] for one reference.
pub(crate) struct RegistrySource<'a> {
    /// The session with the reference's repository.
    pub session: &'a Session,
    /// The reference the walk started from.
    pub reference: &'a ImageRef,
    /// Where configs and layers go; without one, only manifests can be fetched.
    pub cache: Option<&'a Cache>,
    /// Where layer downloads are shown.
    pub progress: Option<&'a Progress>,
}

impl RegistrySource<'_> {
    /// Fetches the document the reference names (verified when it pins a digest).
    pub async fn top(&self) -> Result<Top, RegistryError> {
        let r = self.reference;
        let shown = r.to_string();
        let pinned = r
            .digest()
            .map(|d| d.parse::<Digest>())
            .transpose()
            .map_err(|e| RegistryError::DigestMismatch {
                what: shown.clone(),
                expected: r.digest().unwrap_or_default().to_string(),
                actual: e.to_string(),
            })?;
        let top = self
            .session
            .fetch_manifest(
                r.manifest_reference(),
                &shown,
                pinned.as_ref().map(|d| (d, None)),
            )
            .await?;
        Ok(Top {
            bytes: top.bytes,
            content_type: top.content_type,
            digest: top.digest,
            what: shown,
        })
    }

    fn cache(&self) -> Result<&Cache, RegistryError> {
        self.cache.ok_or_else(|| {
            RegistryError::Cache(Box::new(CacheError::Io {
                path: PathBuf::new(),
                source: std::io::Error::other("no cache to fetch blobs into"),
            }))
        })
    }
}

impl BlobSource for RegistrySource<'_> {
    type Error = RegistryError;

    fn name(&self, kind: &str, digest: &Digest) -> String {
        format!("{kind} {digest}")
    }

    fn manifest_name(&self, digest: &Digest) -> String {
        self.reference.with_digest(digest.as_ref()).to_string()
    }

    async fn document(
        &self,
        d: &Descriptor,
        kind: Kind,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        match kind {
            // Fetched by digest and unverified here: the walk checks the bytes against the
            // entry, as it does for every transport.
            Kind::Manifest => Ok(self
                .session
                .fetch_manifest(d.digest().as_ref(), what, None)
                .await?
                .bytes),
            Kind::Config => {
                let path = self
                    .session
                    .fetch_blob(self.cache()?, d.digest(), d.size(), what, None)
                    .await?;
                Ok(tokio::fs::read(&path)
                    .await
                    .map_err(|source| CacheError::Io { path, source })?)
            }
        }
    }

    async fn layers(&self, ds: &[Descriptor]) -> Result<Vec<PathBuf>, RegistryError> {
        let cache = self.cache()?;
        let hidden = Progress::hidden();
        let progress = self.progress.unwrap_or(&hidden);
        // A blob listed twice (the same layer reused) is fetched once. The stream owns its
        // items: borrowed ones would make the future lose `Send` (rust-lang/rust#102211).
        let mut unique: Vec<(Digest, u64)> = Vec::new();
        for d in ds {
            if !unique.iter().any(|(u, _)| u == d.digest()) {
                unique.push((d.digest().clone(), d.size()));
            }
        }
        let session = self.session;
        let paths: Vec<(Digest, PathBuf)> = futures_util::stream::iter(unique)
            .map(|(digest, size)| async move {
                let what = format!("layer {digest}");
                let label = format!("{:.12}", digest.digest());
                let path = session
                    .fetch_blob(cache, &digest, size, &what, Some((progress, &label)))
                    .await?;
                Ok::<_, RegistryError>((digest, path))
            })
            .buffer_unordered(CONCURRENT_BLOBS)
            .try_collect()
            .await?;
        Ok(ds
            .iter()
            .map(|d| {
                paths
                    .iter()
                    .find(|(u, _)| u == d.digest())
                    .map(|(_, p)| p.clone())
                    .expect("every layer was fetched")
            })
            .collect())
    }
}

/// Pulls `r`: negotiates the manifest, picks the platform, fetches config and layers into the
/// cache (verified), and returns the resolved image.
pub async fn pull(
    r: &ImageRef,
    opts: &ResolveOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<Image, RegistryError> {
    pull_with(r, opts, cache, progress, &Tuning::default()).await
}

/// [`pull`] with explicit timings (tests shorten the backoff).
pub(crate) async fn pull_with(
    r: &ImageRef,
    opts: &ResolveOptions,
    cache: &Cache,
    progress: &Progress,
    tuning: &Tuning,
) -> Result<Image, RegistryError> {
    let session = Session::connect(r, &opts.registry, tuning).await?;
    let src = RegistrySource {
        session: &session,
        reference: r,
        cache: Some(cache),
        progress: Some(progress),
    };
    let top = src.top().await?;
    let resolved = resolve::resolve(&src, top, &opts.platform).await?;
    Ok(Image {
        source: r.to_string(),
        name: r.name().to_string(),
        manifest_digest: resolved.manifest_digest,
        config: resolved.config,
        config_digest: resolved.config_digest,
        layers: resolved.layers,
    })
}

#[cfg(test)]
mod tests;
