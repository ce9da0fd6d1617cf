//! The distribution protocol: a reference in, manifests and verified blobs in the cache out,
//! and blobs and manifests pushed.
//!
//! The client speaks the OCI distribution protocol on `reqwest` directly rather than through
//! `oci-client` 0.18, which falls short here: its pulls have no retries (let alone
//! `Retry-After`); it can ask for a blob range but does not resume an interrupted download;
//! it reads manifests and configs whole (`bytes()`) with no size cap; and it knows plain HTTP
//! only for registries listed up front (`ClientProtocol::HttpsExcept`), with no loopback
//! fallback. Following redirects by hand (rather than with reqwest's policy) also keeps the
//! rule "`Authorization` goes to the registry's origin only" in one place. The documents
//! themselves are `oci-spec` types, parsed and selected by [`crate::oci`]; the walk from a reference to an image
//! is `image::registry`'s.
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

use oci_spec::image::Digest;
use reqwest::StatusCode;

use crate::cache::CacheError;
use crate::oci::{SelectError, UnsupportedAlgorithm, VerifyError};

pub(crate) mod auth;
pub(crate) mod client;
pub(crate) mod credentials;
pub(crate) mod retry;
pub(crate) mod transport;

#[cfg(test)]
pub(crate) mod fake;

pub use client::BlobPush;

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

#[cfg(test)]
impl RegistryOptions {
    /// Options whose auth file is an empty one (`tests/data/empty-auth.json`), so that the
    /// machine's own auth files play no part in a test.
    pub(crate) fn without_machine_auth() -> Self {
        RegistryOptions {
            authfile: Some(
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/empty-auth.json").into(),
            ),
            ..Default::default()
        }
    }
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
    /// A document exceeds [`crate::oci::MAX_DOCUMENT_SIZE`].
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
    /// A document or blob that does not match its descriptor, or an image whose parts
    /// disagree.
    #[error(transparent)]
    Verify(Box<VerifyError>),
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

impl From<VerifyError> for RegistryError {
    fn from(e: VerifyError) -> Self {
        Self::Verify(Box::new(e))
    }
}

impl From<UnsupportedAlgorithm> for RegistryError {
    fn from(e: UnsupportedAlgorithm) -> Self {
        CacheError::from(e).into()
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
