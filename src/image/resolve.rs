//! The one resolution walk: a top document in, a manifest, its configuration and its verified
//! layers out, over any [`BlobSource`].
//!
//! document -> (index -> platform -> manifest) -> config -> DiffIDs -> layer media types.
//! Every transport reaches the same checks here, in the same order, so the same defect gives
//! the same [`VerifyError`] or [`SelectError`] whichever carried the image: a registry
//! session, an OCI layout directory, an `oci-archive:` and, from its config on, a
//! `docker-archive:` (whose `manifest.json` is not an OCI document).

use std::future::Future;
use std::path::PathBuf;

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageManifest};

use super::Layer;
use crate::oci::{
    self, verify, Compression, Document, Platform, SelectError, VerifyError, DOCKER_CONFIG,
    OCI_CONFIG,
};

/// What a document is, for a transport that fetches each kind differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A manifest or index.
    Manifest,
    /// An image (or artifact) configuration.
    Config,
}

/// Where an image's documents and blobs come from.
///
/// Implementations fetch; they do not judge. The walk caps and verifies every document
/// itself; [`BlobSource::layers`] returns files that the implementation has verified against
/// their descriptors (streaming them through a hasher, or through the cache's writer), with
/// [`verify`]'s checks.
pub(crate) trait BlobSource: Sync {
    /// The transport's own error, which carries the walk's.
    type Error: From<VerifyError> + From<SelectError> + Send;

    /// How messages name an object of this source: `config sha256:… in /srv/layout`.
    fn name(&self, kind: &str, digest: &Digest) -> String;

    /// How messages name the manifest an index entry points to.
    fn manifest_name(&self, digest: &Digest) -> String {
        self.name("manifest", digest)
    }

    /// The bytes of the document `d` names, not yet verified; the walk has checked its
    /// announced size.
    fn document(
        &self,
        d: &Descriptor,
        kind: Kind,
        what: &str,
    ) -> impl Future<Output = Result<Vec<u8>, Self::Error>> + Send;

    /// The verified files holding the layer blobs `ds` names, in order.
    fn layers(
        &self,
        ds: &[Descriptor],
    ) -> impl Future<Output = Result<Vec<PathBuf>, Self::Error>> + Send;
}

/// The document a walk starts from: what the reference or the layout's entry named.
pub(crate) struct Top {
    /// Its bytes (verified, if the reference pinned a digest).
    pub bytes: Vec<u8>,
    /// The media type its transport gave (a registry's `Content-Type`, a descriptor's).
    pub content_type: Option<String>,
    /// Its digest.
    pub digest: Digest,
    /// How messages name it.
    pub what: String,
}

/// The manifest chosen for a platform.
#[derive(Debug, Clone)]
pub(crate) struct Selected {
    /// The manifest.
    pub manifest: ImageManifest,
    /// Its digest.
    pub digest: Digest,
    /// How messages name it.
    pub what: String,
    /// The index's digest, when the top document was one.
    pub index_digest: Option<Digest>,
}

/// A resolved image, before it is named.
pub(crate) struct Resolved {
    /// The manifest's digest.
    pub manifest_digest: Digest,
    /// The configuration.
    pub config: ImageConfiguration,
    /// The configuration's digest.
    pub config_digest: Digest,
    /// The layers, lowest first.
    pub layers: Vec<Layer>,
}

/// Fetches a document, refused before a byte is read when its descriptor announces more than
/// the cap, and verified against its descriptor.
pub(crate) async fn document<S: BlobSource>(
    src: &S,
    d: &Descriptor,
    kind: Kind,
    what: &str,
) -> Result<Vec<u8>, S::Error> {
    verify::document_size(d, what)?;
    let bytes = src.document(d, kind, what).await?;
    verify::bytes(d, &bytes, &src.name("blob", d.digest()))?;
    Ok(bytes)
}

/// The manifest `top` is, or the one its index lists for `platform`.
pub(crate) async fn select<S: BlobSource>(
    src: &S,
    top: Top,
    platform: &Platform,
) -> Result<Selected, S::Error> {
    match oci::parse_document(&top.bytes, top.content_type.as_deref(), &top.what)? {
        Document::Manifest(m) => Ok(Selected {
            manifest: *m,
            digest: top.digest,
            what: top.what,
            index_digest: None,
        }),
        Document::Index(index) => {
            let desc = oci::select_platform(&index, platform, &top.what)?;
            tracing::debug!(%platform, manifest = %desc.digest(), "picked from the index");
            let what = src.manifest_name(desc.digest());
            let bytes = document(src, desc, Kind::Manifest, &what).await?;
            // The bytes are pinned by the entry's digest, so they, not a media type a server
            // or the entry gives, say what the document is.
            match oci::parse_document(&bytes, None, &what)? {
                Document::Manifest(m) => Ok(Selected {
                    manifest: *m,
                    digest: desc.digest().clone(),
                    what,
                    index_digest: Some(top.digest),
                }),
                Document::Index(_) => Err(VerifyError::NestedIndex { what }.into()),
            }
        }
    }
}

/// The configuration a container image's manifest names, and its DiffIDs, one per layer.
pub(crate) async fn config<S: BlobSource>(
    src: &S,
    sel: &Selected,
) -> Result<(ImageConfiguration, Vec<Digest>), S::Error> {
    let cdesc = sel.manifest.config();
    let media_type = cdesc.media_type().to_string();
    if media_type != OCI_CONFIG && media_type != DOCKER_CONFIG {
        return Err(VerifyError::NotAnImage {
            what: sel.what.clone(),
            media_type,
        }
        .into());
    }
    let what = src.name("config", cdesc.digest());
    let bytes = document(src, cdesc, Kind::Config, &what).await?;
    let (config, diff_ids) = check_config(&bytes, &what, &sel.digest, sel.manifest.layers().len())?;
    Ok((config, diff_ids))
}

/// Parses a configuration and checks that it gives one DiffID per layer.
pub(crate) fn check_config(
    bytes: &[u8],
    what: &str,
    manifest: &dyn std::fmt::Display,
    layers: usize,
) -> Result<(ImageConfiguration, Vec<Digest>), VerifyError> {
    let (config, diff_ids) =
        oci::parse_config(bytes).map_err(|reason| VerifyError::InvalidConfig {
            what: what.to_string(),
            reason,
        })?;
    if diff_ids.len() != layers {
        return Err(VerifyError::DiffIdCount {
            what: what.to_string(),
            manifest: manifest.to_string(),
            diff_ids: diff_ids.len(),
            layers,
        });
    }
    Ok((config, diff_ids))
}

/// The manifest's layers, checked against the DiffIDs, fetched and verified.
pub(crate) async fn layers<S: BlobSource>(
    src: &S,
    manifest: &ImageManifest,
    diff_ids: Vec<Digest>,
) -> Result<Vec<Layer>, S::Error> {
    let descs = manifest.layers();
    let mut planned = Vec::with_capacity(descs.len());
    for (d, diff_id) in descs.iter().zip(diff_ids) {
        let media_type = d.media_type().to_string();
        let compression = Compression::from_media_type(&media_type, d.digest().as_ref())?;
        if compression == Compression::None {
            verify::uncompressed_diff_id(d.digest(), &diff_id, &src.name("layer", d.digest()))?;
        }
        planned.push((d, media_type, compression, diff_id));
    }
    let paths = src.layers(descs).await?;
    Ok(planned
        .into_iter()
        .zip(paths)
        .map(|((d, media_type, compression, diff_id), path)| Layer {
            digest: d.digest().clone(),
            size: d.size(),
            media_type,
            compression,
            diff_id,
            path,
        })
        .collect())
}

/// The whole walk from `top`.
pub(crate) async fn resolve<S: BlobSource>(
    src: &S,
    top: Top,
    platform: &Platform,
) -> Result<Resolved, S::Error> {
    let sel = select(src, top, platform).await?;
    let (config, diff_ids) = config(src, &sel).await?;
    let layers = layers(src, &sel.manifest, diff_ids).await?;
    Ok(Resolved {
        manifest_digest: sel.digest,
        config_digest: sel.manifest.config().digest().clone(),
        config,
        layers,
    })
}
