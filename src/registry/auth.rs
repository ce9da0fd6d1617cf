//! Authentication challenges (`WWW-Authenticate`) and bearer token answers.
//!
//! The token flow is the distribution token protocol: a `401` with
//! `Bearer realm="...",service="...",scope="..."` sends the client to the realm for a token
//! (`GET ?service=&scope=`, with basic credentials when there are some, or the OAuth2
//! refresh-token grant for an identity token), and the token is then sent to the registry.
//! A token is kept until it expires; a later `401` renews it.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};

use super::credentials::{Credentials, Secret};
use super::retry::{self, Failure, Policy, Retrier};
use super::transport::{self, BodyError, BoundAuth, Payload, SendError, Transport};
use super::{Cause, RegistryError};

/// Largest token service answer read.
const MAX_TOKEN_ANSWER: u64 = 1024 * 1024;

/// One authentication challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// Get a token from `realm`.
    Bearer {
        /// The token endpoint.
        realm: String,
        /// The `service` to ask the token for.
        service: Option<String>,
        /// The scope the registry says the request needs.
        scope: Option<String>,
    },
    /// Send basic credentials.
    Basic,
}

/// The challenges of a response, in the order given, unknown schemes skipped.
pub(crate) fn challenges(headers: &HeaderMap) -> Vec<Challenge> {
    headers
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(parse_challenges)
        .filter_map(|(scheme, params)| {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            if scheme.eq_ignore_ascii_case("bearer") {
                Some(Challenge::Bearer {
                    realm: get("realm")?,
                    service: get("service"),
                    scope: get("scope"),
                })
            } else if scheme.eq_ignore_ascii_case("basic") {
                Some(Challenge::Basic)
            } else {
                None
            }
        })
        .collect()
}

/// Parses a `WWW-Authenticate` value (RFC 9110 section 11.6.1): one or more challenges, each
/// a scheme followed by comma-separated `name=value` parameters, values being tokens or
/// quoted strings (which may hold commas and escaped quotes).
pub(crate) fn parse_challenges(s: &str) -> Vec<(String, Vec<(String, String)>)> {
    let b = s.as_bytes();
    let is_tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/:".contains(&c);
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        s[start..*i].to_string()
    };
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b',' || b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let scheme = token(&mut i);
        if scheme.is_empty() {
            break; // not a challenge: give up on the rest rather than misread it
        }
        let mut params = Vec::new();
        loop {
            skip_ws(&mut i);
            let save = i;
            let name = token(&mut i);
            skip_ws(&mut i);
            if name.is_empty() || i >= b.len() || b[i] != b'=' {
                // The next challenge's scheme.
                i = save;
                break;
            }
            let mut j = i;
            while j < b.len() && b[j] == b'=' {
                j += 1;
            }
            let mut k = j;
            skip_ws(&mut k);
            if params.is_empty() && (j - i > 1 || k >= b.len() || b[k] == b',') {
                // A token68 (`Scheme abc==`), which registries do not use: skipped.
                i = j;
                break;
            }
            i += 1;
            skip_ws(&mut i);
            let value = if i < b.len() && b[i] == b'"' {
                i += 1;
                let mut v = String::new();
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    let ch = s[i..].chars().next().expect("in bounds");
                    v.push(ch);
                    i += ch.len_utf8();
                }
                i += 1; // the closing quote
                v
            } else {
                token(&mut i)
            };
            params.push((name, value));
            skip_ws(&mut i);
            if i < b.len() && b[i] == b',' {
                i += 1;
                // Another parameter, or the next challenge: decided at the top of the loop.
                continue;
            }
            break;
        }
        out.push((scheme, params));
    }
    out
}

/// A token from the token service.
#[derive(Clone)]
pub(crate) struct Token {
    /// The `Authorization` value (`Bearer ...`), marked sensitive.
    pub header: HeaderValue,
    /// When to stop using it.
    pub expires: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("header", &"<redacted>")
            .field("expires", &self.expires)
            .finish()
    }
}

/// Reads a token service's answer: `token` or `access_token` (the spec makes them
/// synonyms; the OAuth2 name wins when both are given), valid for `expires_in` seconds (60 when
/// absent or smaller, as the spec says). The token is dropped a little early to allow for the
/// time requests take. Errors never quote the answer.
pub(crate) fn parse_token(body: &[u8], now: Instant) -> Result<Token, String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<i64>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the token service's answer is not valid (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    let token = a
        .access_token
        .filter(|t| !t.is_empty())
        .or(a.token.filter(|t| !t.is_empty()))
        .ok_or("the token service's answer holds no token")?;
    let mut header = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token service's token is not a valid header value")?;
    header.set_sensitive(true);
    let secs = a.expires_in.unwrap_or(60).max(60) as u64;
    let lifetime =
        Duration::from_secs(secs) - Duration::from_secs(secs / 10).min(Duration::from_secs(30));
    Ok(Token {
        header,
        expires: now + lifetime,
    })
}

/// The `Authorization` value for basic credentials, marked sensitive.
pub(crate) fn basic_header(username: &str, password: &str) -> HeaderValue {
    use base64::Engine as _;
    let enc = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let mut v =
        HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is a valid header value");
    v.set_sensitive(true);
    v
}

/// The authorization a session sends, and how it got it.
pub(crate) struct AuthState {
    /// Bumped on every change, so concurrent requests that got a `401` renew only once.
    pub generation: u64,
    header: Option<HeaderValue>,
    /// When a bearer token stops being used.
    expires: Option<Instant>,
    /// How access is attempted, for messages: "anonymously", "with the credentials from X".
    pub how: String,
}

impl Default for AuthState {
    fn default() -> Self {
        Self {
            generation: 0,
            header: None,
            expires: None,
            how: "anonymously".into(),
        }
    }
}

impl AuthState {
    /// The `Authorization` value to send now (none once a token has expired), and the
    /// generation it belongs to.
    pub fn current(&mut self) -> (u64, Option<HeaderValue>) {
        if self.expires.is_some_and(|t| Instant::now() >= t) {
            self.header = None;
            self.expires = None;
        }
        (self.generation, self.header.clone())
    }

    /// Answers `challenges` with `creds`: a token from the bearer realm, for `scopes` and
    /// the scope the registry named, or else basic credentials.
    pub async fn answer(
        &mut self,
        challenges: &[Challenge],
        creds: Option<&Credentials>,
        mut scopes: Vec<String>,
        tokens: &TokenClient<'_>,
    ) -> Result<(), RegistryError> {
        self.how = match creds {
            Some(c) => format!("with the credentials from {}", c.origin),
            None => "anonymously".to_string(),
        };
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
            if let Some(named) = scope.as_ref().filter(|s| !scopes.contains(s)) {
                scopes.push(named.clone());
            }
            let token = tokens
                .fetch(realm, service.as_deref(), &scopes, creds, &self.how)
                .await?;
            self.header = Some(token.header);
            self.expires = Some(token.expires);
        } else if challenges.contains(&Challenge::Basic) {
            let Some(Credentials {
                secret: Secret::Basic { username, password },
                ..
            }) = creds
            else {
                return Err(tokens.denied(self.how.clone()));
            };
            self.header = Some(basic_header(username, password));
            self.expires = None;
        } else {
            return Err(tokens.denied(self.how.clone()));
        }
        self.generation += 1;
        Ok(())
    }
}

/// What the token flow needs of a session: its transport and retry policy, and the names its
/// errors give.
pub(crate) struct TokenClient<'a> {
    /// Reaches the realm.
    pub transport: &'a Transport,
    /// Retries token requests.
    pub policy: &'a Policy,
    /// The registry as the reference names it.
    pub registry: &'a str,
    /// The repository the session is for.
    pub repository: &'a str,
}

/// A token request, ready to send.
struct TokenRequest {
    method: Method,
    url: Url,
    /// The form of a refresh-token grant (empty for a `GET`).
    form: Vec<(&'static str, String)>,
    /// Basic credentials for the realm.
    basic: Option<HeaderValue>,
}

impl TokenClient<'_> {
    /// Gets a token from a bearer realm.
    pub async fn fetch(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        creds: Option<&Credentials>,
        how: &str,
    ) -> Result<Token, RegistryError> {
        let realm = self.realm_url(realm)?;
        let realm_host = realm.host_str().unwrap_or_default().to_string();
        let realm_origin = realm.origin().ascii_serialization();
        let path = realm.path().to_string();
        let request = token_request(realm, service, scopes, creds);
        let bound = request.basic.as_ref().map(|value| BoundAuth {
            origin: &realm_origin,
            value,
        });
        let form: Vec<(&str, &str)> = request.form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut retry = Retrier::new(
            self.policy,
            self.registry,
            format!("fetching a token from {realm_host}"),
            path.clone(),
        );
        loop {
            let sent = self
                .transport
                .send(
                    request.method.clone(),
                    request.url.clone(),
                    &HeaderMap::new(),
                    bound.as_ref(),
                    if form.is_empty() {
                        Payload::Empty
                    } else {
                        Payload::Form(form.as_slice())
                    },
                )
                .await;
            match self.token_answer(sent, &realm_host, &path, how).await {
                Ok(token) => return Ok(token),
                Err(failure) => retry.wait(failure).await?,
            }
        }
    }

    /// The realm as a URL, refused unless it is HTTPS (or plain HTTP where that is allowed).
    fn realm_url(&self, realm: &str) -> Result<Url, RegistryError> {
        let url = Url::parse(realm)
            .map_err(|_| self.auth_error("its token realm is not a valid URL".into()))?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if self.transport.plain_http_allowed(&url) => Ok(url),
            "http" => Err(self.auth_error(format!(
                "its token service {} uses plain HTTP (use --insecure to allow it)",
                url.host_str().unwrap_or_default()
            ))),
            _ => Err(self.auth_error("its token realm is not an HTTP URL".into())),
        }
    }

    /// Reads the realm's answer to one token request: the token, or why there is none.
    async fn token_answer(
        &self,
        sent: Result<reqwest::Response, SendError>,
        realm_host: &str,
        path: &str,
        how: &str,
    ) -> Result<Token, Failure> {
        let mut resp = match sent {
            Err(SendError::Http(e)) => return Err(Failure::retry(Cause::Http(e))),
            Err(SendError::Redirect(reason)) => {
                return Err(Failure::Fatal(RegistryError::Redirect {
                    registry: realm_host.to_string(),
                    path: path.to_string(),
                    reason,
                }))
            }
            Ok(resp) => resp,
        };
        let status = resp.status();
        if status.is_success() {
            return match transport::read_capped(&mut resp, MAX_TOKEN_ANSWER).await {
                Ok(body) => parse_token(&body, Instant::now())
                    .map_err(|reason| Failure::Fatal(self.auth_error(reason))),
                Err(BodyError::TooLarge) => Err(Failure::Fatal(
                    self.auth_error("its token service's answer is too large".into()),
                )),
                Err(BodyError::Http(e)) => Err(Failure::retry(Cause::Http(e))),
            };
        }
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            return Err(Failure::Fatal(
                self.denied(format!("the token service refused access {how}")),
            ));
        }
        if retry::retryable_status(status) {
            return Err(Failure::status(resp).await);
        }
        Err(Failure::Fatal(RegistryError::Status {
            registry: realm_host.to_string(),
            path: path.to_string(),
            status,
            detail: transport::error_detail(resp).await,
        }))
    }

    fn auth_error(&self, reason: String) -> RegistryError {
        RegistryError::Auth {
            registry: self.registry.to_string(),
            reason,
        }
    }

    /// Access refused, after asking `how`.
    pub fn denied(&self, how: String) -> RegistryError {
        RegistryError::Denied {
            registry: self.registry.to_string(),
            repository: self.repository.to_string(),
            how,
        }
    }
}

/// The request for a token for `scopes`: the OAuth2 refresh-token grant (a `POST`) for an
/// identity token, else a `GET` with the scopes in the query and basic credentials when there
/// are some.
fn token_request(
    mut url: Url,
    service: Option<&str>,
    scopes: &[String],
    creds: Option<&Credentials>,
) -> TokenRequest {
    match creds.map(|c| &c.secret) {
        Some(Secret::IdentityToken(refresh)) => {
            let mut form = vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", refresh.clone()),
                ("client_id", "oci2uk".to_string()),
                ("access_type", "offline".to_string()),
                ("scope", scopes.join(" ")),
            ];
            if let Some(s) = service {
                form.push(("service", s.to_string()));
            }
            TokenRequest {
                method: Method::POST,
                url,
                form,
                basic: None,
            }
        }
        secret => {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
            let basic = match secret {
                Some(Secret::Basic { username, password }) => {
                    q.append_pair("account", username);
                    Some(basic_header(username, password))
                }
                _ => None,
            };
            drop(q);
            TokenRequest {
                method: Method::GET,
                url,
                form: Vec::new(),
                basic,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        );
        assert_eq!(
            c,
            vec![(
                "Bearer".to_string(),
                params(&[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/nginx:pull"),
                ])
            )]
        );
    }

    #[test]
    fn quoted_commas_escapes_and_several_challenges() {
        let c = parse_challenges(
            r#"Basic realm="Registry Realm", Bearer realm="http://127.0.0.1:5002/token" , service=reg , scope="repository:a/b:pull,push repository:c:pull", error="insufficient_scope", Newauth realm="x\"y", Token68 abc==, Final"#,
        );
        assert_eq!(c.len(), 5, "{c:?}");
        assert_eq!(
            c[0],
            ("Basic".into(), params(&[("realm", "Registry Realm")]))
        );
        assert_eq!(
            c[1],
            (
                "Bearer".into(),
                params(&[
                    ("realm", "http://127.0.0.1:5002/token"),
                    ("service", "reg"),
                    ("scope", "repository:a/b:pull,push repository:c:pull"),
                    ("error", "insufficient_scope"),
                ])
            )
        );
        assert_eq!(c[2], ("Newauth".into(), params(&[("realm", "x\"y")])));
        assert_eq!(c[3], ("Token68".into(), vec![]));
        assert_eq!(c[4], ("Final".into(), vec![]));
    }

    #[test]
    fn challenges_from_headers() {
        let mut h = HeaderMap::new();
        h.append(WWW_AUTHENTICATE, HeaderValue::from_static("Negotiate"));
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"basic realm="r""#),
        );
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"BEARER REALM="https://a/token",Service="s""#),
        );
        h.append(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer service="no realm""#),
        );
        assert_eq!(
            challenges(&h),
            vec![
                Challenge::Basic,
                Challenge::Bearer {
                    realm: "https://a/token".into(),
                    service: Some("s".into()),
                    scope: None
                }
            ]
        );
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges(", ,").is_empty());
        assert_eq!(
            parse_challenges(r#"Bearer realm="unterminated"#)[0].1[0].1,
            "unterminated"
        );
    }

    #[test]
    fn token_answers() {
        let now = Instant::now();
        let t = parse_token(br#"{"token":"abc","expires_in":300}"#, now).unwrap();
        assert_eq!(t.header.to_str().unwrap(), "Bearer abc");
        assert!(t.header.is_sensitive());
        assert_eq!(t.expires, now + Duration::from_secs(270));
        let t = parse_token(br#"{"token":"a","access_token":"b"}"#, now).unwrap();
        assert_eq!(t.header.to_str().unwrap(), "Bearer b");
        assert_eq!(t.expires, now + Duration::from_secs(54));
        let t = parse_token(br#"{"access_token":"b","expires_in":5}"#, now).unwrap();
        assert_eq!(t.expires, now + Duration::from_secs(54));
        assert!(parse_token(br#"{"token":""}"#, now).is_err());
        let e = parse_token(br#"{"token": 12345678}"#, now).unwrap_err();
        assert!(!e.contains("12345678"), "{e}");
        assert!(parse_token(b"{\"token\":\"a\nb\"}", now).is_err());
        let shown = format!("{t:?}");
        assert!(
            shown.contains("redacted") && !shown.contains("Bearer"),
            "{shown}"
        );
    }

    #[test]
    fn basic_header_is_sensitive() {
        let h = basic_header("user", "pa:ss");
        assert_eq!(h.to_str().unwrap(), "Basic dXNlcjpwYTpzcw==");
        assert!(h.is_sensitive());
        assert!(!format!("{h:?}").contains("dXNl"));
    }
}
