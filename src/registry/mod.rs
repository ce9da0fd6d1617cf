//! The distribution protocol: a reference in, a resolved image with verified blobs in the
//! cache out.
//!
//! The client speaks the OCI distribution protocol on `reqwest` directly rather than through
//! `oci-client` 0.18, which falls short here: its pulls have no retries (let alone
//! `Retry-After`); it can ask for a blob range but does not resume an interrupted download;
//! it reads manifests and configs whole (`bytes()`) with no size cap; and it knows plain HTTP
//! only for registries listed up front (`ClientProtocol::HttpsExcept`), with no loopback
//! fallback. Following redirects by hand (rather than with reqwest's policy) also keeps the
//! rule "`Authorization` goes to the registry's origin only" in one place. The documents
//! themselves are `oci-spec` types, parsed and selected by [`crate::image::select`].
//!
//! - `transport`: the HTTP clients (system roots plus `--ca-cert`, `--insecure`), manual
//!   redirects that drop `Authorization` on leaving the registry, capped body reads.
//! - `client`: a session with one repository: scheme discovery (`/v2/` ping, loopback
//!   fallback to plain HTTP), authentication, manifests, and blobs streamed into the cache
//!   with retries and `Range` resume.
//! - `auth`: `WWW-Authenticate` challenges and bearer token answers.
//! - `credentials`: `--creds`, auth files (`--authfile`, `$REGISTRY_AUTH_FILE`, podman's and
//!   docker's defaults) and credential helpers.
//! - `retry`: what is retried and how long to wait.

use std::path::PathBuf;

use futures_util::{StreamExt, TryStreamExt};
use oci_spec::image::{Digest, ImageConfiguration, ImageManifest};
use reqwest::StatusCode;

use crate::cache::{Cache, CacheError};
use crate::image::select::{self, Document, SelectError};
use crate::image::{Compression, Image, Layer, ResolveOptions, MAX_DOCUMENT_SIZE};
use crate::progress::Progress;
use crate::reference::ImageRef;

pub(crate) mod auth;
pub(crate) mod client;
pub(crate) mod credentials;
pub(crate) mod retry;
pub(crate) mod transport;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use client::BlobPush;
use client::{Session, Tuning};

/// How many blobs are downloaded at once.
const CONCURRENT_BLOBS: usize = 4;

/// How to reach and authenticate to registries.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// `USER:PASS` from `--creds`.
    pub creds: Option<String>,
    /// A docker/podman auth file from `--authfile` (else `$REGISTRY_AUTH_FILE`, podman's
    /// `$XDG_RUNTIME_DIR/containers/auth.json`, then `~/.docker/config.json`).
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

/// Errors of talking to a registry. Messages name the registry, repository, reference or
/// digest; they never hold credentials, tokens, headers or signed URLs.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `--creds` is not `USER:PASS`.
    #[error("invalid --creds: expected USER:PASS")]
    CredsSyntax,
    /// An auth file could not be read.
    #[error("cannot read the auth file {path}")]
    AuthFileRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An auth file is malformed.
    #[error("the auth file {path} is invalid: {reason}")]
    AuthFile {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content).
        reason: String,
    },
    /// A credential helper failed.
    #[error("the credential helper docker-credential-{helper} failed for {registry}: {reason}")]
    CredentialHelper {
        /// The helper's name (`pass`, `secretservice`, ...).
        helper: String,
        /// The registry asked about.
        registry: String,
        /// What went wrong.
        reason: String,
    },
    /// The `--ca-cert` file could not be read.
    #[error("cannot read the CA certificate {path}")]
    CaCertRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The `--ca-cert` file holds no usable certificate.
    #[error("{path} holds no usable PEM certificate")]
    CaCert {
        /// The file.
        path: PathBuf,
        /// The parser's error, if any.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    /// The registry's name does not make a URL.
    #[error("registry {registry} is not a valid host name")]
    InvalidEndpoint {
        /// The registry.
        registry: String,
    },
    /// The registry could not be reached at all.
    #[error("cannot reach registry {registry} at {url}{hint}")]
    Unreachable {
        /// The registry.
        registry: String,
        /// The API root tried (`https://HOST/v2/`).
        url: String,
        /// A hint on what to do, or empty.
        hint: &'static str,
        /// The last failure.
        #[source]
        source: Cause,
    },
    /// The host answered, but not as a registry.
    #[error("{registry} does not serve the registry API at {url} (HTTP {status})")]
    NotARegistry {
        /// The registry.
        registry: String,
        /// The API root tried.
        url: String,
        /// What it answered.
        status: StatusCode,
    },
    /// The registry refused access after authentication.
    #[error("access denied to {repository} on {registry} ({how}; check --creds/--authfile)")]
    Denied {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// How access was attempted: anonymously, or whose credentials (never their value).
        how: String,
    },
    /// Authentication could not be carried out.
    #[error("authentication to {registry} failed: {reason}")]
    Auth {
        /// The registry.
        registry: String,
        /// Why.
        reason: String,
    },
    /// The manifest does not exist.
    #[error("manifest unknown: {reference} not found")]
    ManifestUnknown {
        /// The reference asked for.
        reference: String,
    },
    /// A blob the manifest names does not exist.
    #[error("blob unknown: {digest} not found in {repository} on {registry}")]
    BlobUnknown {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// The blob.
        digest: Digest,
    },
    /// A document exceeds [`MAX_DOCUMENT_SIZE`].
    #[error("{what} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The document.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// A document does not hash to the digest it was fetched by.
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The document.
        what: String,
        /// The digest asked for or announced.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// A document's size differs from its descriptor's.
    #[error("{what} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        /// The document.
        what: String,
        /// The descriptor's size.
        expected: u64,
        /// The size received.
        actual: u64,
    },
    /// An HTTP status that is neither success nor worth a retry.
    #[error("registry {registry} answered {path} with HTTP {status}{detail}")]
    Status {
        /// The registry.
        registry: String,
        /// The request path (no query).
        path: String,
        /// The status.
        status: StatusCode,
        /// The registry's error code and message, if it gave them.
        detail: String,
    },
    /// A redirect that cannot be followed.
    #[error("registry {registry} redirected {path} somewhere it cannot be followed: {reason}")]
    Redirect {
        /// The registry.
        registry: String,
        /// The request path (no query).
        path: String,
        /// Why.
        reason: String,
    },
    /// Every attempt at a request failed.
    #[error("{what} on {registry} ({path}) failed after {attempts} attempts")]
    Exhausted {
        /// What was being fetched.
        what: String,
        /// The registry.
        registry: String,
        /// The request path on the registry (no query).
        path: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: Cause,
    },
    /// A blob did not match its descriptor, twice.
    #[error("{what} from {registry} is corrupt, even when fetched again")]
    Corrupt {
        /// The blob.
        what: String,
        /// The registry.
        registry: String,
        /// The mismatch.
        #[source]
        source: Box<CacheError>,
    },
    /// The manifest is not a container image's.
    #[error("{reference} is not a container image: its config has media type {media_type}")]
    NotAnImage {
        /// The manifest's reference.
        reference: String,
        /// The config media type found.
        media_type: String,
    },
    /// The image config does not parse.
    #[error("the image config {digest} is invalid: {reason}")]
    Config {
        /// The config blob.
        digest: Digest,
        /// The parser's message.
        reason: String,
    },
    /// The config's DiffIDs do not correspond to the manifest's layers.
    #[error("the image config {digest} lists {diff_ids} layer DiffIDs, but the manifest has {layers} layers")]
    LayerCount {
        /// The config blob.
        digest: Digest,
        /// DiffIDs in the config.
        diff_ids: usize,
        /// Layers in the manifest.
        layers: usize,
    },
    /// An index entry that is itself an index.
    #[error("{what} is an image index inside an image index, which is not supported")]
    NestedIndex {
        /// The inner index.
        what: String,
    },
    /// From manifest parsing and platform selection.
    #[error(transparent)]
    Select(Box<SelectError>),
    /// From the cache.
    #[error(transparent)]
    Cache(Box<CacheError>),
}

// The large causes are boxed to keep `Result<_, RegistryError>` small.
impl From<SelectError> for RegistryError {
    fn from(e: SelectError) -> Self {
        Self::Select(Box::new(e))
    }
}

impl From<CacheError> for RegistryError {
    fn from(e: CacheError) -> Self {
        Self::Cache(Box::new(e))
    }
}

/// Why one attempt at a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// An HTTP status.
    #[error("HTTP {status}{detail}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The registry's error code and message, if it gave them.
        detail: String,
    },
    /// A transport failure (its URL removed: it may be a signed CDN URL).
    #[error(transparent)]
    Http(reqwest::Error),
    /// The body ended early without a transport error.
    #[error("the body ended after {received} of {expected} bytes")]
    Short {
        /// Bytes received in all.
        received: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A `Range` answer that does not match what was asked.
    #[error("the server answered a range request with {0}")]
    BadRange(String),
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
    let top = session
        .fetch_manifest(
            r.manifest_reference(),
            &shown,
            pinned.as_ref().map(|d| (d, None)),
        )
        .await?;
    let (manifest, manifest_digest, manifest_shown) = match select::parse_document(
        &top.bytes,
        top.content_type.as_deref(),
        &shown,
    )? {
        Document::Manifest(m) => (*m, top.digest, shown.clone()),
        Document::Index(index) => {
            let desc = select::select_platform(&index, &opts.platform, &shown)?;
            let child_shown = r.with_digest(desc.digest().as_ref()).to_string();
            tracing::debug!(platform = %opts.platform, manifest = %desc.digest(), "picked from the index");
            let child = session
                .fetch_manifest(
                    desc.digest().as_ref(),
                    &child_shown,
                    Some((desc.digest(), Some(desc.size()))),
                )
                .await?;
            let media_type = desc.media_type().to_string();
            let content_type = child.content_type.as_deref().or(Some(&media_type));
            match select::parse_document(&child.bytes, content_type, &child_shown)? {
                Document::Manifest(m) => (*m, child.digest, child_shown),
                Document::Index(_) => return Err(RegistryError::NestedIndex { what: child_shown }),
            }
        }
    };
    let (config, config_digest) = fetch_config(&session, &manifest, &manifest_shown, cache).await?;
    let layers = fetch_layers(
        &session,
        &manifest,
        &config,
        &config_digest,
        cache,
        progress,
    )
    .await?;
    Ok(Image {
        source: shown,
        name: r.name().to_string(),
        manifest_digest,
        config,
        config_digest,
        layers,
    })
}

async fn fetch_config(
    session: &Session,
    manifest: &ImageManifest,
    manifest_shown: &str,
    cache: &Cache,
) -> Result<(ImageConfiguration, Digest), RegistryError> {
    let desc = manifest.config();
    let media_type = desc.media_type().to_string();
    if !matches!(
        media_type.as_str(),
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
    ) {
        return Err(RegistryError::NotAnImage {
            reference: manifest_shown.to_string(),
            media_type,
        });
    }
    let digest = desc.digest().clone();
    let what = format!("image config {digest}");
    if desc.size() > MAX_DOCUMENT_SIZE {
        return Err(RegistryError::TooLarge {
            what,
            limit: MAX_DOCUMENT_SIZE,
        });
    }
    let path = session
        .fetch_blob(cache, &digest, desc.size(), &what, None)
        .await?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|source| CacheError::Io { path, source })?;
    let config: ImageConfiguration =
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Config {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
    Ok((config, digest))
}

async fn fetch_layers(
    session: &Session,
    manifest: &ImageManifest,
    config: &ImageConfiguration,
    config_digest: &Digest,
    cache: &Cache,
    progress: &Progress,
) -> Result<Vec<Layer>, RegistryError> {
    let descs = manifest.layers();
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != descs.len() {
        return Err(RegistryError::LayerCount {
            digest: config_digest.clone(),
            diff_ids: diff_ids.len(),
            layers: descs.len(),
        });
    }
    let mut planned = Vec::with_capacity(descs.len());
    for (desc, diff_id) in descs.iter().zip(diff_ids) {
        let media_type = desc.media_type().to_string();
        let compression = Compression::from_media_type(&media_type, desc.digest().as_ref())?;
        let diff_id: Digest = diff_id.parse().map_err(|e| RegistryError::Config {
            digest: config_digest.clone(),
            reason: format!("DiffID {diff_id:?}: {e}"),
        })?;
        planned.push((desc, media_type, compression, diff_id));
    }
    // A blob listed twice (the same layer reused) is fetched once. The stream owns its items:
    // borrowed ones would make the future lose `Send` (rust-lang/rust#102211).
    let mut unique: Vec<(Digest, u64)> = Vec::new();
    for (desc, ..) in &planned {
        if !unique.iter().any(|(d, _)| d == desc.digest()) {
            unique.push((desc.digest().clone(), desc.size()));
        }
    }
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
    Ok(planned
        .into_iter()
        .map(|(desc, media_type, compression, diff_id)| {
            let path = paths
                .iter()
                .find(|(d, _)| d == desc.digest())
                .map(|(_, p)| p.clone())
                .expect("every layer was fetched");
            Layer {
                digest: desc.digest().clone(),
                size: desc.size(),
                media_type,
                compression,
                diff_id,
                path,
            }
        })
        .collect())
}
