//! HTTP transport: the `reqwest` clients and the rules every request follows.
//!
//! - TLS with the system's roots plus `--ca-cert`; `--insecure` turns verification off.
//! - Plain HTTP only to loopback hosts or with `--insecure`, also when a redirect asks for it.
//! - Redirects are followed here, not by reqwest, so that `Authorization` is sent only to the
//!   origin it belongs to: registries redirect blob downloads to storage or a CDN on another
//!   host, which must never see the registry's credentials.
//! - A connect timeout and a read-stall timeout, but no overall timeout: a large layer may
//!   take as long as it takes while bytes keep arriving.
//! - Loopback hosts bypass any proxy, as Go's `http.ProxyFromEnvironment` (and so docker) does.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, LOCATION};
use reqwest::{Method, Response, Url};

use super::{RegistryError, RegistryOptions};
use crate::reference::is_loopback_host;

/// Time allowed to establish a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed without a single byte arriving, once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// Credentials bound to the origin (`scheme://host:port`) they may be sent to.
pub(crate) struct BoundAuth<'a> {
    /// `Url::origin().ascii_serialization()` of the only place this header may go.
    pub origin: &'a str,
    /// The `Authorization` value.
    pub value: &'a HeaderValue,
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The transport failed (the error's URL is removed).
    Http(reqwest::Error),
    /// A redirect that must not or cannot be followed.
    Redirect(String),
}

/// Why a body could not be read whole.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// More bytes than the cap.
    TooLarge,
    /// The transport failed (the error's URL is removed).
    Http(reqwest::Error),
}

/// What a request carries.
pub(crate) enum Payload<'a> {
    /// Nothing.
    Empty,
    /// An `application/x-www-form-urlencoded` form (token requests).
    Form(&'a [(&'a str, &'a str)]),
    /// Bytes as they are (blob chunks, manifests), with their `Content-Length`.
    Bytes(bytes::Bytes),
}

/// The HTTP clients for one run.
///
/// Loading the system's trust store takes a tenth of a second or more, so the client for
/// other hosts is built on first use, and the one for loopback hosts trusts only `--ca-cert`
/// (a registry on this machine has no public certificate; without TLS it is reached over plain
/// HTTP, as docker does).
pub(crate) struct Transport {
    remote: std::sync::OnceLock<reqwest::Client>,
    local: reqwest::Client,
    insecure: bool,
    certs: Vec<reqwest::Certificate>,
}

impl Transport {
    /// Builds the clients from the registry options.
    pub fn new(opts: &RegistryOptions) -> Result<Self, RegistryError> {
        let mut certs = Vec::new();
        if let Some(path) = &opts.ca_cert {
            let pem = std::fs::read(path).map_err(|source| RegistryError::CaCertRead {
                path: path.clone(),
                source,
            })?;
            certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::CaCert {
                    path: path.clone(),
                    source: Some(e),
                })?;
            if certs.is_empty() {
                return Err(RegistryError::CaCert {
                    path: path.clone(),
                    source: None,
                });
            }
        }
        Ok(Self {
            local: client(true, &certs, opts.insecure).map_err(RegistryError::Client)?,
            remote: std::sync::OnceLock::new(),
            insecure: opts.insecure,
            certs,
        })
    }

    /// The client for `url`'s host.
    fn client_for(&self, url: &Url) -> Result<&reqwest::Client, reqwest::Error> {
        if url.host_str().is_some_and(is_loopback_host) {
            return Ok(&self.local);
        }
        if let Some(c) = self.remote.get() {
            return Ok(c);
        }
        let c = client(false, &self.certs, self.insecure)?;
        Ok(self.remote.get_or_init(|| c))
    }

    /// Whether plain HTTP may be used for `url`'s host.
    pub fn plain_http_allowed(&self, url: &Url) -> bool {
        self.insecure || url.host_str().is_some_and(is_loopback_host)
    }

    /// Sends a request, following GET and HEAD redirects by hand (bounded). `auth` is attached
    /// only while the URL is on its origin.
    pub async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &HeaderMap,
        auth: Option<&BoundAuth<'_>>,
        payload: Payload<'_>,
    ) -> Result<Response, SendError> {
        let mut url = url;
        for _ in 0..=MAX_REDIRECTS {
            match url.scheme() {
                "https" => {}
                "http" if self.plain_http_allowed(&url) => {}
                "http" => {
                    return Err(SendError::Redirect(format!(
                        "plain HTTP to {} is not allowed (use --insecure to allow it)",
                        url.host_str().unwrap_or("?")
                    )))
                }
                other => return Err(SendError::Redirect(format!("unsupported scheme {other}"))),
            }
            let client = self.client_for(&url).map_err(SendError::Http)?;
            let mut req = client
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(a) = auth {
                if url.origin().ascii_serialization() == a.origin {
                    req = req.header(AUTHORIZATION, a.value.clone());
                }
            }
            match &payload {
                Payload::Empty => {}
                Payload::Form(f) => req = req.form(f),
                Payload::Bytes(b) => req = req.body(b.clone()),
            }
            let resp = req
                .send()
                .await
                .map_err(|e| SendError::Http(e.without_url()))?;
            let follows = method == Method::GET || method == Method::HEAD;
            if !follows || !resp.status().is_redirection() {
                return Ok(resp);
            }
            let Some(location) = resp.headers().get(LOCATION) else {
                return Ok(resp);
            };
            let next = location
                .to_str()
                .ok()
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| SendError::Redirect("an invalid Location".into()))?;
            // Origins only: a redirect target's query is often a signature.
            tracing::debug!(
                from = %url.origin().ascii_serialization(),
                to = %next.origin().ascii_serialization(),
                status = resp.status().as_u16(),
                "following a redirect"
            );
            url = next;
        }
        Err(SendError::Redirect(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }
}

/// A client: for loopback hosts (no proxy, no system trust store) or for others.
fn client(
    loopback: bool,
    certs: &[reqwest::Certificate],
    insecure: bool,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = reqwest::Client::builder()
        .user_agent(concat!("oci2uk/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .danger_accept_invalid_certs(insecure);
    for c in certs {
        b = b.add_root_certificate(c.clone());
    }
    if loopback {
        b = b.no_proxy().tls_built_in_root_certs(false);
    }
    b.build()
}

/// Reads a whole body of at most `cap` bytes, refusing a larger one as soon as its
/// `Content-Length` or its bytes show it.
pub(crate) async fn read_capped(resp: &mut Response, cap: u64) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(BodyError::TooLarge);
    }
    let mut out = Vec::with_capacity(resp.content_length().unwrap_or(0) as usize);
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Http(e.without_url()))?
    {
        if (out.len() + chunk.len()) as u64 > cap {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The registry's error code and message from an error response, as `": CODE message"`, or
/// an empty string. Only the distribution error envelope is quoted, never an HTML page.
pub(crate) async fn error_detail(mut resp: Response) -> String {
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let Ok(body) = read_capped(&mut resp, 16 * 1024).await else {
        return String::new();
    };
    let Ok(env) = serde_json::from_slice::<Envelope>(&body) else {
        return String::new();
    };
    let Some(e) = env.errors.first() else {
        return String::new();
    };
    let text: String = [e.code.as_deref(), e.message.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.is_empty() {
        text
    } else {
        format!(": {text}")
    }
}
