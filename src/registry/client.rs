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

mod upload;

pub use upload::BlobPush;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use indicatif::ProgressBar;
use oci_spec::image::Digest;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use reqwest::{Method, Response, StatusCode, Url};

use super::auth::{self, Challenge, Token};
use super::credentials::{self, Credentials, Secret};
use super::retry::{self, Policy};
use super::transport::{self, BoundAuth, Payload, ReadError, SendError, Transport};
use super::{Cause, RegistryError, RegistryOptions};
use crate::cache::{BlobWriter, Cache, CacheError, Hasher};
use crate::oci::{MANIFEST_ACCEPT, MAX_DOCUMENT_SIZE};
use crate::progress::Progress;
use crate::reference::ImageRef;

/// Largest token service answer read.
const MAX_TOKEN_ANSWER: u64 = 1024 * 1024;

/// Timings that tests shorten.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tuning {
    /// Retries and backoff.
    pub policy: Policy,
}

/// Registries (`host:port`) found to speak plain HTTP during this run.
static PLAIN_HTTP: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// The outcome of one failed attempt.
pub(crate) enum Failure {
    /// Worth another attempt, after `retry_after` if the server said so.
    Retry {
        /// What went wrong.
        cause: Cause,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Not worth another attempt.
    Fatal(RegistryError),
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        Self::Fatal(e)
    }
}

impl Failure {
    fn retry(cause: Cause) -> Self {
        Self::Retry {
            cause,
            retry_after: None,
        }
    }
}

/// Counts the failed attempts at one request and waits between them.
pub(crate) struct Retrier<'a> {
    policy: &'a Policy,
    registry: &'a str,
    what: String,
    path: String,
    /// Consecutive failures without progress.
    failures: u32,
    /// All failures.
    total: u32,
}

impl Retrier<'_> {
    /// Handles a failed attempt: a fatal one is returned; a retryable one waits and returns
    /// `Ok` unless the attempts are used up.
    pub async fn wait(&mut self, f: Failure) -> Result<(), RegistryError> {
        let (cause, retry_after) = match f {
            Failure::Fatal(e) => return Err(e),
            Failure::Retry { cause, retry_after } => (cause, retry_after),
        };
        self.failures += 1;
        self.total += 1;
        // Progress resets the count (a slow, flaky link still gets there), within a bound.
        // An untrusted certificate will not become trusted by asking again.
        if self.failures >= self.policy.attempts
            || self.total >= self.policy.attempts * 4
            || !hint_for(&cause).is_empty()
        {
            return Err(RegistryError::Exhausted {
                what: std::mem::take(&mut self.what),
                registry: self.registry.to_string(),
                path: std::mem::take(&mut self.path),
                attempts: self.total,
                source: cause,
            });
        }
        let delay = self.policy.delay(self.failures, retry_after);
        tracing::debug!(
            what = %self.what,
            path = %self.path,
            attempt = self.total,
            delay_ms = delay.as_millis() as u64,
            cause = %cause,
            "retrying"
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Notes that the failed attempt still made progress.
    pub fn progressed(&mut self) {
        self.failures = 0;
    }
}

struct AuthState {
    /// Bumped on every change, so concurrent requests that got a `401` renew only once.
    generation: u64,
    header: Option<HeaderValue>,
    /// When a bearer token stops being used.
    expires: Option<Instant>,
    /// How access is attempted, for messages: "anonymously", "with the credentials from X".
    how: String,
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
        let root = |scheme: &str| {
            Url::parse(&format!("{scheme}://{endpoint}/v2/")).map_err(|_| {
                RegistryError::InvalidEndpoint {
                    registry: registry.clone(),
                }
            })
        };
        let may_fall_back = r.is_loopback() || opts.insecure;
        let remembered = PLAIN_HTTP.lock().expect("not poisoned").contains(&endpoint);
        let mut scheme = if remembered { "http" } else { "https" };
        let mut tried_http = remembered;
        // First contact gives up sooner: a registry that is down or misnamed is more likely
        // than one that is restarting, and the user should hear about it quickly.
        let ping_policy = Policy {
            attempts: tuning.policy.attempts.min(3),
            ..tuning.policy.clone()
        };
        let mut retry = Retrier {
            policy: &ping_policy,
            registry: &registry,
            what: "fetching the API root".into(),
            path: "/v2/".into(),
            failures: 0,
            total: 0,
        };
        let challenges = loop {
            let url = root(scheme)?;
            let mut result = transport
                .send(
                    Method::GET,
                    url.clone(),
                    &HeaderMap::new(),
                    None,
                    Payload::Empty,
                )
                .await;
            if let Err(SendError::Http(_)) = &result {
                if scheme == "https" && may_fall_back && !tried_http {
                    tried_http = true;
                    let plain = transport
                        .send(
                            Method::GET,
                            root("http")?,
                            &HeaderMap::new(),
                            None,
                            Payload::Empty,
                        )
                        .await;
                    if let Ok(resp) = plain {
                        if answers_as_registry(&resp) {
                            tracing::info!(%registry, "the registry does not speak TLS: using plain HTTP");
                            PLAIN_HTTP
                                .lock()
                                .expect("not poisoned")
                                .insert(endpoint.clone());
                            scheme = "http";
                            result = Ok(resp);
                        }
                    }
                }
            }
            let failure = match result {
                Ok(resp) if resp.status().is_success() => break Vec::new(),
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    break auth::challenges(resp.headers())
                }
                Ok(resp) if retry::retryable_status(resp.status()) => Failure::Retry {
                    retry_after: retry::retry_after(resp.headers(), SystemTime::now()),
                    cause: Cause::Status {
                        status: resp.status(),
                        detail: transport::error_detail(resp).await,
                    },
                },
                Ok(resp) => {
                    return Err(RegistryError::NotARegistry {
                        registry,
                        url: url.to_string(),
                        status: resp.status(),
                    })
                }
                Err(SendError::Http(e)) => Failure::retry(Cause::Http(e)),
                Err(SendError::Redirect(reason)) => {
                    return Err(RegistryError::Redirect {
                        registry,
                        path: "/v2/".into(),
                        reason,
                    })
                }
            };
            if let Err(e) = retry.wait(failure).await {
                return Err(match e {
                    RegistryError::Exhausted { source, .. } => RegistryError::Unreachable {
                        hint: hint_for(&source),
                        registry: registry.clone(),
                        url: url.to_string(),
                        source,
                    },
                    other => other,
                });
            }
        };
        let base = format!("{scheme}://{endpoint}");
        let origin = root(scheme)?.origin().ascii_serialization();
        let session = Self {
            access,
            transport,
            policy: tuning.policy.clone(),
            opts: opts.clone(),
            registry,
            repository: r.repository().to_string(),
            base,
            origin,
            creds: tokio::sync::OnceCell::new(),
            auth: tokio::sync::Mutex::new(AuthState {
                generation: 0,
                header: None,
                expires: None,
                how: "anonymously".into(),
            }),
        };
        if !challenges.is_empty() {
            session.authenticate(0, &challenges).await?;
        }
        Ok(session)
    }

    fn retrier(&self, what: String, path: &str) -> Retrier<'_> {
        Retrier {
            policy: &self.policy,
            registry: &self.registry,
            what,
            path: path.to_string(),
            failures: 0,
            total: 0,
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
        let mut state = self.auth.lock().await;
        if state.expires.is_some_and(|t| Instant::now() >= t) {
            state.header = None;
            state.expires = None;
        }
        (state.generation, state.header.clone())
    }

    async fn denied(&self) -> RegistryError {
        RegistryError::Denied {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            how: self.auth.lock().await.how.clone(),
        }
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
        let how = match creds {
            Some(c) => format!("with the credentials from {}", c.origin),
            None => "anonymously".to_string(),
        };
        state.how = how.clone();
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => Some((realm, service, scope)),
            Challenge::Basic => None,
        });
        if let Some((realm, service, scope)) = bearer {
            // Ours, and the one the registry named if it differs (docker asks for both).
            let mut scopes = self.scopes();
            if let Some(named) = scope.as_ref().filter(|s| !scopes.contains(s)) {
                scopes.push(named.clone());
            }
            let token = self
                .fetch_token(realm, service.as_deref(), &scopes, creds, &how)
                .await?;
            state.header = Some(token.header);
            state.expires = Some(token.expires);
        } else if challenges.contains(&Challenge::Basic) {
            let Some(Credentials {
                secret: Secret::Basic { username, password },
                ..
            }) = creds
            else {
                drop(state);
                return Err(self.denied().await);
            };
            state.header = Some(auth::basic_header(username, password));
            state.expires = None;
        } else {
            drop(state);
            return Err(self.denied().await);
        }
        state.generation += 1;
        Ok(())
    }

    /// Gets a token from a bearer realm.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        creds: Option<&Credentials>,
        how: &str,
    ) -> Result<Token, RegistryError> {
        let auth_error = |reason: String| RegistryError::Auth {
            registry: self.registry.clone(),
            reason,
        };
        let realm_url = Url::parse(realm)
            .map_err(|_| auth_error("its token realm is not a valid URL".into()))?;
        let realm_host = realm_url.host_str().unwrap_or_default().to_string();
        match realm_url.scheme() {
            "https" => {}
            "http" if self.transport.plain_http_allowed(&realm_url) => {}
            "http" => {
                return Err(auth_error(format!(
                    "its token service {realm_host} uses plain HTTP (use --insecure to allow it)"
                )))
            }
            _ => return Err(auth_error("its token realm is not an HTTP URL".into())),
        }
        let realm_origin = realm_url.origin().ascii_serialization();
        let path = realm_url.path().to_string();
        let basic;
        let mut url = realm_url.clone();
        let scope_list = scopes.join(" ");
        let mut form: Vec<(&str, &str)> = Vec::new();
        let method = match creds.map(|c| &c.secret) {
            Some(Secret::IdentityToken(refresh)) => {
                form.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh.as_str()),
                    ("client_id", "oci2uk"),
                    ("access_type", "offline"),
                    ("scope", scope_list.as_str()),
                ]);
                if let Some(s) = service {
                    form.push(("service", s));
                }
                basic = None;
                Method::POST
            }
            secret => {
                let mut q = url.query_pairs_mut();
                if let Some(s) = service {
                    q.append_pair("service", s);
                }
                for s in scopes {
                    q.append_pair("scope", s);
                }
                basic = match secret {
                    Some(Secret::Basic { username, password }) => {
                        q.append_pair("account", username);
                        Some(auth::basic_header(username, password))
                    }
                    _ => None,
                };
                drop(q);
                Method::GET
            }
        };
        let bound = basic.as_ref().map(|value| BoundAuth {
            origin: &realm_origin,
            value,
        });
        let mut retry = Retrier {
            policy: &self.policy,
            registry: &self.registry,
            what: format!("fetching a token from {realm_host}"),
            path: path.clone(),
            failures: 0,
            total: 0,
        };
        loop {
            let sent = self
                .transport
                .send(
                    method.clone(),
                    url.clone(),
                    &HeaderMap::new(),
                    bound.as_ref(),
                    if form.is_empty() {
                        Payload::Empty
                    } else {
                        Payload::Form(form.as_slice())
                    },
                )
                .await;
            let failure = match sent {
                Err(SendError::Http(e)) => Failure::retry(Cause::Http(e)),
                Err(SendError::Redirect(reason)) => Failure::Fatal(RegistryError::Redirect {
                    registry: realm_host.clone(),
                    path: path.clone(),
                    reason,
                }),
                Ok(mut resp) if resp.status().is_success() => {
                    match transport::read_capped(&mut resp, MAX_TOKEN_ANSWER).await {
                        Ok(body) => {
                            return auth::parse_token(&body, Instant::now()).map_err(auth_error)
                        }
                        Err(ReadError::TooLarge) => {
                            return Err(auth_error(
                                "its token service's answer is too large".into(),
                            ))
                        }
                        Err(ReadError::Http(e)) => Failure::retry(Cause::Http(e)),
                    }
                }
                Ok(resp)
                    if matches!(
                        resp.status(),
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                    ) =>
                {
                    return Err(RegistryError::Denied {
                        registry: self.registry.clone(),
                        repository: self.repository.clone(),
                        how: format!("the token service refused access {how}"),
                    })
                }
                Ok(resp) if retry::retryable_status(resp.status()) => Failure::Retry {
                    retry_after: retry::retry_after(resp.headers(), SystemTime::now()),
                    cause: Cause::Status {
                        status: resp.status(),
                        detail: transport::error_detail(resp).await,
                    },
                },
                Ok(resp) => Failure::Fatal(RegistryError::Status {
                    registry: realm_host.clone(),
                    path: path.clone(),
                    status: resp.status(),
                    detail: transport::error_detail(resp).await,
                }),
            };
            retry.wait(failure).await?;
        }
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
            let retry_after = retry::retry_after(resp.headers(), SystemTime::now());
            let detail = transport::error_detail(resp).await;
            return Failure::Retry {
                cause: Cause::Status { status, detail },
                retry_after,
            };
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
            Err(ReadError::TooLarge) => Err(Failure::Fatal(RegistryError::TooLarge {
                what: what.to_string(),
                limit: MAX_DOCUMENT_SIZE,
            })),
            Err(ReadError::Http(e)) => Err(Failure::retry(Cause::Http(e))),
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

/// Whether a plain-HTTP answer comes from a registry (so falling back to it is right).
fn answers_as_registry(resp: &Response) -> bool {
    matches!(resp.status(), StatusCode::OK | StatusCode::UNAUTHORIZED)
        || resp
            .headers()
            .contains_key("docker-distribution-api-version")
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

/// A hint for an unreachable registry, from its last error.
fn hint_for(cause: &Cause) -> &'static str {
    let mut source: Option<&dyn std::error::Error> = Some(cause);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("certificate") || text.contains("UnknownIssuer") {
            return " (its TLS certificate is not trusted: use --ca-cert FILE, or --insecure)";
        }
        source = e.source();
    }
    ""
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
