//! The first contact with a registry: its API root (`/v2/`) settles the scheme and tells
//! whether and how to authenticate.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use reqwest::header::HeaderMap;
use reqwest::{Method, Response, StatusCode, Url};

use crate::registry::auth::{self, Challenge};
use crate::registry::retry::{self, Failure, Policy, Retrier};
use crate::registry::transport::{Payload, SendError, Transport};
use crate::registry::{Cause, RegistryError};

/// Registries (`host:port`) found to speak plain HTTP during this run.
static PLAIN_HTTP: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// The first contact with a registry: settles the scheme and learns how to authenticate.
pub(super) struct Ping<'a> {
    pub transport: &'a Transport,
    /// The registry as the reference names it.
    pub registry: &'a str,
    /// Its `host:port`.
    pub endpoint: &'a str,
    /// Whether a failed TLS connection may be retried over plain HTTP.
    pub may_fall_back: bool,
}

impl Ping<'_> {
    /// Gets the API root, with retries, and returns the scheme it answered on and the
    /// challenges of its `401` (none when it let us in).
    pub async fn run(
        &self,
        policy: &Policy,
    ) -> Result<(&'static str, Vec<Challenge>), RegistryError> {
        let remembered = PLAIN_HTTP
            .lock()
            .expect("not poisoned")
            .contains(self.endpoint);
        let mut scheme = if remembered { "http" } else { "https" };
        let mut tried_http = remembered;
        // First contact gives up sooner: a registry that is down or misnamed is more likely
        // than one that is restarting, and the user should hear about it quickly.
        let ping_policy = Policy {
            attempts: policy.attempts.min(3),
            ..policy.clone()
        };
        let mut retry = Retrier::new(
            &ping_policy,
            self.registry,
            "fetching the API root".into(),
            "/v2/".into(),
        );
        loop {
            let url = self.root(scheme)?;
            let mut result = self.get(url.clone()).await;
            if let Err(SendError::Http(_)) = &result {
                if scheme == "https" && self.may_fall_back && !tried_http {
                    tried_http = true;
                    if let Some(resp) = self.plain_http().await? {
                        scheme = "http";
                        result = Ok(resp);
                    }
                }
            }
            let failure = match self.answer(result, &url).await {
                Ok(challenges) => return Ok((scheme, challenges)),
                Err(failure) => failure,
            };
            if let Err(e) = retry.wait(failure).await {
                return Err(match e {
                    RegistryError::Exhausted { source, .. } => RegistryError::Unreachable {
                        hint: retry::hint_for(&source),
                        registry: self.registry.to_string(),
                        url: url.to_string(),
                        source,
                    },
                    other => other,
                });
            }
        }
    }

    /// The API root over `scheme`.
    pub fn root(&self, scheme: &str) -> Result<Url, RegistryError> {
        Url::parse(&format!("{scheme}://{}/v2/", self.endpoint)).map_err(|_| {
            RegistryError::InvalidEndpoint {
                registry: self.registry.to_string(),
            }
        })
    }

    async fn get(&self, url: Url) -> Result<Response, SendError> {
        self.transport
            .send(Method::GET, url, &HeaderMap::new(), None, Payload::Empty)
            .await
    }

    /// The API root over plain HTTP, after TLS failed, if a registry answers there; that
    /// choice is remembered for the rest of the run.
    async fn plain_http(&self) -> Result<Option<Response>, RegistryError> {
        let Ok(resp) = self.get(self.root("http")?).await else {
            return Ok(None);
        };
        if !answers_as_registry(&resp) {
            return Ok(None);
        }
        tracing::info!(registry = %self.registry, "the registry does not speak TLS: using plain HTTP");
        PLAIN_HTTP
            .lock()
            .expect("not poisoned")
            .insert(self.endpoint.to_string());
        Ok(Some(resp))
    }

    /// Reads the API root's answer: the challenges to meet (none when open), or why not.
    async fn answer(
        &self,
        result: Result<Response, SendError>,
        url: &Url,
    ) -> Result<Vec<Challenge>, Failure> {
        match result {
            Ok(resp) if resp.status().is_success() => Ok(Vec::new()),
            Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                Ok(auth::challenges(resp.headers()))
            }
            Ok(resp) if retry::retryable_status(resp.status()) => Err(Failure::status(resp).await),
            Ok(resp) => Err(Failure::Fatal(RegistryError::NotARegistry {
                registry: self.registry.to_string(),
                url: url.to_string(),
                status: resp.status(),
            })),
            Err(SendError::Http(e)) => Err(Failure::retry(Cause::Http(e))),
            Err(SendError::Redirect(reason)) => Err(Failure::Fatal(RegistryError::Redirect {
                registry: self.registry.to_string(),
                path: "/v2/".into(),
                reason,
            })),
        }
    }
}

/// Whether a plain-HTTP answer comes from a registry (so falling back to it is right).
fn answers_as_registry(resp: &Response) -> bool {
    matches!(resp.status(), StatusCode::OK | StatusCode::UNAUTHORIZED)
        || resp
            .headers()
            .contains_key("docker-distribution-api-version")
}
