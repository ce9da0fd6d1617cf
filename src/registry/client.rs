//! A session with one repository on one registry: the API root is pinged to learn the scheme
//! and how to authenticate, then manifests and blobs are fetched with retries.
//!
//! - Scheme: HTTPS. A loopback registry (or any, with `--insecure`) whose TLS connection
//!   fails is tried once over plain HTTP, as docker does; it is used only if it answers as a
//!   registry, and that choice is remembered for the rest of the run.
//! - Authentication: on a `401`, the `WWW-Authenticate` challenge decides: a bearer token from
//!   the realm (kept until it expires, renewed on a later `401`) or basic credentials. The
//!   token and credentials are bound to the registry's origin (see [`super::transport`]).
//! - Blobs stream into the cache's [`BlobWriter`], which checks size and digest. A broken
//!   download resumes where it stopped with `Range: bytes=N-`; a server that answers with the
//!   whole blob instead restarts it. A blob that fails verification is fetched once more from
//!   scratch before giving up.

mod ping;
mod upload;

use ping::Ping;
pub use upload::BlobPush;

use std::path::PathBuf;

use indicatif::ProgressBar;
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode, Url};

use super::auth::{self, AuthState, Challenge, TokenClient};
use super::credentials::{self, Credentials};
use super::retry::{self, Failure, Policy, Retrier};
use super::transport::{self, BodyError, BoundAuth, Payload, SendError, Transport};
use super::{Cause, RegistryError, RegistryOptions};
use crate::cache::{BlobWriter, Cache, CacheError, Hasher};
use crate::oci::{MANIFEST_ACCEPT, MAX_DOCUMENT_SIZE};
use crate::progress::Progress;
use crate::reference::ImageRef;

/// Timings that tests shorten.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tuning {
    /// Retries and backoff.
    pub policy: Policy,
}

/// A manifest as fetched.
pub(crate) struct Fetched {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// The `Content-Type` the registry gave.
    pub content_type: Option<String>,
    /// Its digest (verified against the reference or descriptor when there was one).
    pub digest: Digest,
}

/// What a session may do, for the token scopes it asks for.
#[derive(Debug, Clone, Default)]
pub(crate) struct Access {
    /// Push as well as pull.
    pub push: bool,
    /// Other repositories of the registry that blobs may be mounted from.
    pub mount_from: Vec<String>,
}

/// One repository on one registry.
pub(crate) struct Session {
    access: Access,
    transport: Transport,
    policy: Policy,
    opts: RegistryOptions,
    /// The registry as the reference names it.
    registry: String,
    repository: String,
    /// `scheme://host:port` of the API.
    base: String,
    /// The origin credentials are bound to.
    origin: String,
    creds: tokio::sync::OnceCell<Option<Credentials>>,
    auth: tokio::sync::Mutex<AuthState>,
}

impl Session {
    /// Pings the registry's API root, settling the scheme and authenticating (for pulls) if
    /// it asks.
    pub async fn connect(
        r: &ImageRef,
        opts: &RegistryOptions,
        tuning: &Tuning,
    ) -> Result<Self, RegistryError> {
        Self::connect_for(r, opts, tuning, Access::default()).await
    }

    /// [`Session::connect`] for the given access.
    pub async fn connect_for(
        r: &ImageRef,
        opts: &RegistryOptions,
        tuning: &Tuning,
        access: Access,
    ) -> Result<Self, RegistryError> {
        let transport = Transport::new(opts)?;
        let registry = r.registry().to_string();
        let endpoint = r.endpoint().to_string();
        let ping = Ping {
            transport: &transport,
            registry: &registry,
            endpoint: &endpoint,
            may_fall_back: r.is_loopback() || opts.insecure,
        };
        let (scheme, challenges) = ping.run(&tuning.policy).await?;
        let origin = ping.root(scheme)?.origin().ascii_serialization();
        let session = Self {
            access,
            transport,
            policy: tuning.policy.clone(),
            opts: opts.clone(),
            registry,
            repository: r.repository().to_string(),
            base: format!("{scheme}://{endpoint}"),
            origin,
            creds: tokio::sync::OnceCell::new(),
            auth: tokio::sync::Mutex::new(AuthState::default()),
        };
        if !challenges.is_empty() {
            session.authenticate(0, &challenges).await?;
        }
        Ok(session)
    }

    fn retrier(&self, what: String, path: &str) -> Retrier<'_> {
        Retrier::new(&self.policy, &self.registry, what, path.to_string())
    }

    /// What the token flow needs of this session.
    fn tokens(&self) -> TokenClient<'_> {
        TokenClient {
            transport: &self.transport,
            policy: &self.policy,
            registry: &self.registry,
            repository: &self.repository,
        }
    }

    /// The scopes this session asks tokens for: pull (and push) on its repository, and pull
    /// on the repositories blobs may be mounted from.
    fn scopes(&self) -> Vec<String> {
        let actions = if self.access.push {
            "pull,push"
        } else {
            "pull"
        };
        let mut scopes = vec![format!("repository:{}:{actions}", self.repository)];
        scopes.extend(
            self.access
                .mount_from
                .iter()
                .filter(|r| **r != self.repository)
                .map(|r| format!("repository:{r}:pull")),
        );
        scopes
    }

    async fn credentials(&self) -> Result<Option<&Credentials>, RegistryError> {
        self.creds
            .get_or_try_init(|| credentials::lookup(&self.registry, &self.repository, &self.opts))
            .await
            .map(Option::as_ref)
    }

    async fn current_auth(&self) -> (u64, Option<HeaderValue>) {
        self.auth.lock().await.current()
    }

    async fn denied(&self) -> RegistryError {
        let how = self.auth.lock().await.how.clone();
        self.tokens().denied(how)
    }

    /// Answers a `401` whose request was made at `generation`; a no-op when another request
    /// has renewed the authorization since.
    async fn authenticate(
        &self,
        generation: u64,
        challenges: &[Challenge],
    ) -> Result<(), RegistryError> {
        let mut state = self.auth.lock().await;
        if state.generation != generation {
            return Ok(());
        }
        let creds = self.credentials().await?;
        state
            .answer(challenges, creds, self.scopes(), &self.tokens())
            .await
    }

    /// One GET on the registry (redirects followed), renewing the authorization once if the
    /// registry answers `401`.
    async fn get(&self, path: &str, headers: &HeaderMap) -> Result<Response, Failure> {
        let url = self.url(path)?;
        self.request(Method::GET, url, path, headers, None).await
    }

    /// The URL of `path` (which may carry a query) on the registry's API.
    pub(crate) fn url(&self, path: &str) -> Result<Url, RegistryError> {
        Url::parse(&format!("{}{path}", self.base)).map_err(|_| RegistryError::InvalidEndpoint {
            registry: self.registry.clone(),
        })
    }

    /// One request to the registry, renewing the authorization once if the registry answers
    /// `401`. `path` names the request in errors (no query: upload locations carry state).
    pub(crate) async fn request(
        &self,
        method: Method,
        url: Url,
        path: &str,
        headers: &HeaderMap,
        body: Option<bytes::Bytes>,
    ) -> Result<Response, Failure> {
        let mut renewed = false;
        loop {
            let (generation, header) = self.current_auth().await;
            let bound = header.as_ref().map(|value| BoundAuth {
                origin: &self.origin,
                value,
            });
            let payload = match &body {
                Some(b) => Payload::Bytes(b.clone()),
                None => Payload::Empty,
            };
            let resp = self
                .transport
                .send(
                    method.clone(),
                    url.clone(),
                    headers,
                    bound.as_ref(),
                    payload,
                )
                .await
                .map_err(|e| match e {
                    SendError::Http(e) => Failure::retry(Cause::Http(e)),
                    SendError::Redirect(reason) => Failure::Fatal(RegistryError::Redirect {
                        registry: self.registry.clone(),
                        path: path.to_string(),
                        reason,
                    }),
                })?;
            tracing::debug!(registry = %self.registry, %method, path, status = resp.status().as_u16(), "request");
            if resp.status() == StatusCode::UNAUTHORIZED
                && !renewed
                && resp.url().origin().ascii_serialization() == self.origin
            {
                let challenges = auth::challenges(resp.headers());
                self.authenticate(generation, &challenges).await?;
                renewed = true;
                continue;
            }
            return Ok(resp);
        }
    }

    /// Classifies an unsuccessful response (other than the `404`s callers name themselves).
    async fn status_failure(&self, resp: Response, path: &str) -> Failure {
        let status = resp.status();
        // Storage behind a redirect refuses an expired signature with 401/403: asking the
        // registry again gets a fresh one.
        let foreign = resp.url().origin().ascii_serialization() != self.origin;
        let auth_status = matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
        if retry::retryable_status(status) || (foreign && auth_status) {
            return Failure::status(resp).await;
        }
        if auth_status {
            return Failure::Fatal(self.denied().await);
        }
        Failure::Fatal(RegistryError::Status {
            registry: self.registry.clone(),
            path: path.to_string(),
            status,
            detail: transport::error_detail(resp).await,
        })
    }

    /// Fetches a manifest or index by tag or digest, at most [`MAX_DOCUMENT_SIZE`] bytes.
    /// With `expected`, the bytes must have that digest (and size); without, they must match
    /// the registry's `Docker-Content-Digest` when it sends one. `shown` names it in errors.
    pub async fn fetch_manifest(
        &self,
        reference: &str,
        shown: &str,
        expected: Option<(&Digest, Option<u64>)>,
    ) -> Result<Fetched, RegistryError> {
        let path = format!("/v2/{}/manifests/{reference}", self.repository);
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_str(&MANIFEST_ACCEPT.join(", ")).expect("media types are ASCII"),
        );
        let what = format!("manifest {shown}");
        let mut retry = self.retrier(format!("fetching {what}"), &path);
        let (bytes, content_type, announced) = loop {
            match self.try_manifest(&path, &headers, shown, &what).await {
                Ok(v) => break v,
                Err(f) => retry.wait(f).await?,
            }
        };
        let digest_of = |like: &Digest| -> Result<Digest, RegistryError> {
            let mut h = Hasher::for_digest(like)?;
            h.update(&bytes);
            Ok(h.finish())
        };
        let digest = if let Some((want, size)) = expected {
            if let Some(size) = size.filter(|s| *s != bytes.len() as u64) {
                return Err(RegistryError::SizeMismatch {
                    what,
                    expected: size,
                    actual: bytes.len() as u64,
                });
            }
            let actual = digest_of(want)?;
            if &actual != want {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected: want.to_string(),
                    actual: actual.to_string(),
                });
            }
            actual
        } else {
            if let Some(announced) = announced.as_deref().and_then(|a| a.parse::<Digest>().ok()) {
                // An algorithm the cache cannot compute is left unchecked.
                if let Ok(actual) = digest_of(&announced) {
                    if actual != announced {
                        return Err(RegistryError::DigestMismatch {
                            what: format!("{what} (by its Docker-Content-Digest)"),
                            expected: announced.to_string(),
                            actual: actual.to_string(),
                        });
                    }
                }
            }
            let mut h = Hasher::sha256();
            h.update(&bytes);
            h.finish()
        };
        Ok(Fetched {
            bytes,
            content_type,
            digest,
        })
    }

    async fn try_manifest(
        &self,
        path: &str,
        headers: &HeaderMap,
        shown: &str,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>, Option<String>), Failure> {
        let mut resp = self.get(path, headers).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Err(Failure::Fatal(RegistryError::ManifestUnknown {
                reference: shown.to_string(),
            }));
        }
        if !resp.status().is_success() {
            return Err(self.status_failure(resp, path).await);
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header(CONTENT_TYPE.as_str());
        let announced = header("docker-content-digest");
        match transport::read_capped(&mut resp, MAX_DOCUMENT_SIZE).await {
            Ok(bytes) => Ok((bytes, content_type, announced)),
            Err(BodyError::TooLarge) => Err(Failure::Fatal(RegistryError::TooLarge {
                what: what.to_string(),
                limit: MAX_DOCUMENT_SIZE,
            })),
            Err(BodyError::Http(e)) => Err(Failure::retry(Cause::Http(e))),
        }
    }

    /// Fetches a blob into the cache (unless it is there already, verified) and returns its
    /// path. `bar`: the progress to show it on, and its label.
    pub async fn fetch_blob(
        &self,
        cache: &Cache,
        digest: &Digest,
        size: u64,
        what: &str,
        bar: Option<(&Progress, &str)>,
    ) -> Result<PathBuf, RegistryError> {
        let (c, d) = (cache.clone(), digest.clone());
        let cached = tokio::task::spawn_blocking(move || c.get(&d, size))
            .await
            .map_err(|e| CacheError::Io {
                path: cache.blob_path(digest),
                source: std::io::Error::other(e.to_string()),
            })??;
        if let Some(path) = cached {
            tracing::debug!(%digest, "in the cache");
            return Ok(path);
        }
        // Cleared however this ends, so a failed pull leaves no half-drawn bars behind its
        // error line.
        let bar = bar
            .map_or_else(ProgressBar::hidden, |(p, label)| p.bytes(label, size))
            .with_finish(indicatif::ProgressFinish::AndClear);
        let path = format!("/v2/{}/blobs/{digest}", self.repository);
        let mut writer = cache.writer(digest, size)?;
        let mut retry = self.retrier(format!("fetching {what}"), &path);
        let mut fresh_starts_left = 1;
        loop {
            let before = writer.written();
            let corrupt = match self
                .try_blob(&path, digest, (&mut writer, size), &cache.tmp_dir(), &bar)
                .await
            {
                Ok(()) => match writer.commit() {
                    Ok(p) => {
                        bar.finish_and_clear();
                        return Ok(p);
                    }
                    Err(e @ CacheError::Mismatch { .. }) => e,
                    Err(e) => return Err(e.into()),
                },
                Err(BlobFailure::TooLarge(e)) => CacheError::Io {
                    path: cache.tmp_dir(),
                    source: e,
                },
                Err(BlobFailure::Failure(f)) => {
                    if writer.written() > before {
                        retry.progressed();
                    }
                    retry.wait(f).await?;
                    continue;
                }
            };
            if fresh_starts_left == 0 {
                return Err(RegistryError::Corrupt {
                    what: what.to_string(),
                    registry: self.registry.clone(),
                    source: Box::new(corrupt),
                });
            }
            fresh_starts_left -= 1;
            tracing::warn!(%digest, error = %corrupt, "the blob is corrupt: fetching it again");
            writer = cache.writer(digest, size)?;
            bar.set_position(0);
        }
    }

    /// One attempt at a blob: resumes after what `writer` holds, appends to it, and returns
    /// `Ok` once it holds `size` bytes.
    async fn try_blob(
        &self,
        path: &str,
        digest: &Digest,
        (writer, size): (&mut BlobWriter, u64),
        tmp_dir: &std::path::Path,
        bar: &ProgressBar,
    ) -> Result<(), BlobFailure> {
        let cache_io = |source: std::io::Error| {
            BlobFailure::Failure(Failure::Fatal(
                CacheError::Io {
                    path: tmp_dir.to_path_buf(),
                    source,
                }
                .into(),
            ))
        };
        let offset = writer.written();
        let ranged = offset > 0 && offset < size;
        let mut headers = HeaderMap::new();
        if ranged {
            headers.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={offset}-")).expect("ASCII"),
            );
        }
        let mut resp = self.get(path, &headers).await?;
        let status = resp.status();
        match status {
            StatusCode::NOT_FOUND => {
                return Err(Failure::Fatal(RegistryError::BlobUnknown {
                    registry: self.registry.clone(),
                    repository: self.repository.clone(),
                    digest: digest.clone(),
                })
                .into())
            }
            StatusCode::PARTIAL_CONTENT if ranged => {
                let range = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no Content-Range")
                    .to_string();
                if !content_range_matches(&range, offset, size) {
                    writer.reset().map_err(cache_io)?;
                    bar.set_position(0);
                    return Err(Failure::retry(Cause::BadRange(range)).into());
                }
                tracing::debug!(%digest, offset, "resuming");
            }
            s if s.is_success() && s != StatusCode::PARTIAL_CONTENT => {
                if offset > 0 {
                    // The whole blob again, from its first byte.
                    writer.reset().map_err(cache_io)?;
                    bar.set_position(0);
                }
            }
            StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                writer.reset().map_err(cache_io)?;
                bar.set_position(0);
                return Err(Failure::retry(Cause::BadRange(status.to_string())).into());
            }
            _ => return Err(self.status_failure(resp, path).await.into()),
        }
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    use std::io::Write as _;
                    writer.write_all(&chunk).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            BlobFailure::TooLarge(e)
                        } else {
                            cache_io(e)
                        }
                    })?;
                    bar.set_position(writer.written());
                }
                Ok(None) => break,
                // Every byte is there: let the digest judge.
                Err(_) if writer.written() == size => break,
                Err(e) => return Err(Failure::retry(Cause::Http(e.without_url())).into()),
            }
        }
        if writer.written() < size {
            return Err(Failure::retry(Cause::Short {
                received: writer.written(),
                expected: size,
            })
            .into());
        }
        Ok(())
    }
}

enum BlobFailure {
    /// More bytes than the descriptor's size.
    TooLarge(std::io::Error),
    Failure(Failure),
}

impl From<Failure> for BlobFailure {
    fn from(f: Failure) -> Self {
        Self::Failure(f)
    }
}

/// Whether `Content-Range: bytes START-END/TOTAL` answers `bytes=offset-` for a blob of `size`.
fn content_range_matches(value: &str, offset: u64, size: u64) -> bool {
    let Some(rest) = value.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((start, end)) = range.split_once('-') else {
        return false;
    };
    let (Ok(start), Ok(end)) = (start.trim().parse::<u64>(), end.trim().parse::<u64>()) else {
        return false;
    };
    let total_ok = total.trim() == "*" || total.trim().parse::<u64>() == Ok(size);
    start == offset && end + 1 == size && total_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert!(content_range_matches("bytes 100-199/200", 100, 200));
        assert!(content_range_matches("bytes 100-199/*", 100, 200));
        assert!(!content_range_matches("bytes 0-199/200", 100, 200));
        assert!(!content_range_matches("bytes 100-150/200", 100, 200));
        assert!(!content_range_matches("bytes 100-199/300", 100, 200));
        assert!(!content_range_matches("items 100-199/200", 100, 200));
        assert!(!content_range_matches("", 100, 200));
    }
}
