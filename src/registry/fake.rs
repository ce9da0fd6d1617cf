//! A registry in memory on loopback, for fault-injection tests: a minimal HTTP/1.1 server (one
//! request per connection, `Connection: close`) that logs every request and answers with
//! whatever its handler decides, including broken answers that a real server would not give.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cache::Hasher;

/// A request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The values of a query parameter (percent-decoded).
    pub fn query(&self, name: &str) -> Vec<String> {
        let Some((_, q)) = self.target.split_once('?') else {
            return Vec::new();
        };
        reqwest::Url::parse(&format!("http://x/?{q}"))
            .unwrap()
            .query_pairs()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .collect()
    }
}

/// How the body of a reply is framed and delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` and the whole body.
    Length,
    /// `Content-Length` of the whole body, but only this many bytes, then the connection
    /// closes.
    CutAfter(usize),
    /// Like `CutAfter`, but the connection is reset (RST) rather than closed.
    ResetAfter(usize),
    /// No `Content-Length`: the body ends when the connection closes.
    Close,
}

/// A reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub framing: Framing,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            framing: Framing::Length,
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// A running server; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(serve(conn, handler.clone(), log.clone()));
                }
            }
        });
        Self { addr, log, task }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
}

async fn serve(mut conn: TcpStream, handler: Handler, log: Arc<Mutex<Vec<Request>>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        // Not HTTP (a TLS ClientHello starts with 0x16): hang up, as on a wrong protocol.
        if buf.first().is_some_and(|b| !b.is_ascii_uppercase()) || buf.len() > 64 * 1024 {
            return;
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target) = (
        first.next().unwrap_or("").to_string(),
        first.next().unwrap_or("").to_string(),
    );
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let req = Request {
        method,
        target,
        headers,
        body,
    };
    let reply = handler(&req);
    log.lock().unwrap().push(req);
    let mut out = format!("HTTP/1.1 {} Fake\r\nConnection: close\r\n", reply.status);
    for (n, v) in &reply.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if reply.framing != Framing::Close {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    out.push_str("\r\n");
    let sent = match reply.framing {
        Framing::CutAfter(n) | Framing::ResetAfter(n) => n.min(reply.body.len()),
        _ => reply.body.len(),
    };
    let _ = conn.write_all(out.as_bytes()).await;
    let _ = conn.write_all(&reply.body[..sent]).await;
    let _ = conn.flush().await;
    if let Framing::ResetAfter(_) = reply.framing {
        // Let the bytes leave before the reset discards them.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let _ = conn.set_zero_linger();
        drop(conn);
    } else {
        let _ = conn.shutdown().await;
    }
}

/// `sha256:HEX` of `data`.
pub fn sha(data: &[u8]) -> String {
    let mut h = Hasher::sha256();
    h.update(data);
    h.finish().to_string()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const REPO: &str = "test/app";

/// A repository's content: manifests by tag and digest, blobs by digest.
#[derive(Default, Clone)]
pub struct Content {
    pub manifests: HashMap<String, (String, Vec<u8>)>,
    pub blobs: HashMap<String, Vec<u8>>,
}

impl Content {
    /// Adds an image for `arch` with these layers; returns the manifest's bytes.
    pub fn add_image(&mut self, tag: Option<&str>, arch: &str, layers: &[Vec<u8>]) -> Vec<u8> {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|l| sha(&[l.as_slice(), b"tar"].concat()))
            .collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(l), "size": l.len(),
                })
            })
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(&config), "size": config.len()},
            "layers": layer_descs,
        }))
        .unwrap();
        self.blobs.insert(sha(&config), config);
        for l in layers {
            self.blobs.insert(sha(l), l.clone());
        }
        self.put_manifest(tag, OCI_MANIFEST, manifest.clone());
        manifest
    }

    /// Adds an index over `(arch, manifest bytes)` pairs under `tag`.
    pub fn add_index(&mut self, tag: &str, entries: &[(&str, &[u8])]) {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(arch, m)| {
                serde_json::json!({
                    "mediaType": OCI_MANIFEST, "digest": sha(m), "size": m.len(),
                    "platform": {"os": "linux", "architecture": arch},
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests,
        }))
        .unwrap();
        self.put_manifest(Some(tag), OCI_INDEX, index);
    }

    pub fn put_manifest(&mut self, tag: Option<&str>, media_type: &str, bytes: Vec<u8>) {
        if let Some(t) = tag {
            self.manifests
                .insert(t.to_string(), (media_type.to_string(), bytes.clone()));
        }
        self.manifests
            .insert(sha(&bytes), (media_type.to_string(), bytes));
    }
}

/// What the registry demands.
#[derive(Clone)]
pub enum Auth {
    None,
    Basic { user: String, pass: String },
    Bearer { realm: String, token: String },
}

/// A broken answer for one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This status, with a `Retry-After` if given.
    Status(u16, Option<&'static str>),
    /// The right headers, half the body, then the connection closes.
    Cut,
    /// Half the body, then a reset.
    Reset,
    /// The right length, wrong bytes.
    Corrupt,
    /// A 200 with the whole body, whatever `Range` asked.
    IgnoreRange,
    /// Redirect (307) to this base URL, as `BASE/cdn/DIGEST?sig=SIGNATURE`.
    Redirect(String),
    /// The body without `Content-Length`.
    Unframed,
    /// A wrong `Docker-Content-Digest`.
    WrongDigestHeader,
    /// A `401` with the registry's challenge, whatever the credentials (an expired token).
    Challenge,
}

/// The registry: content, authentication, and faults per path (one-shot ones in order, then a
/// permanent one if set).
pub struct Registry {
    pub content: Content,
    pub auth: Auth,
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    permanent: Mutex<HashMap<String, Fault>>,
}

impl Registry {
    pub fn new(content: Content, auth: Auth) -> Arc<Self> {
        Arc::new(Self {
            content,
            auth,
            faults: Mutex::default(),
            permanent: Mutex::default(),
        })
    }

    /// Faults for the next requests to `path`, in order.
    pub fn faults(&self, path: &str, faults: &[Fault]) {
        self.faults
            .lock()
            .unwrap()
            .entry(path.to_string())
            .or_default()
            .extend(faults.iter().cloned());
    }

    /// A fault for every request to `path` once the one-shot ones are used.
    pub fn always(&self, path: &str, fault: Fault) {
        self.permanent
            .lock()
            .unwrap()
            .insert(path.to_string(), fault);
    }

    fn next_fault(&self, path: &str) -> Option<Fault> {
        if let Some(f) = self
            .faults
            .lock()
            .unwrap()
            .get_mut(path)
            .and_then(VecDeque::pop_front)
        {
            return Some(f);
        }
        self.permanent.lock().unwrap().get(path).cloned()
    }

    pub async fn serve(self: &Arc<Self>) -> Server {
        let me = self.clone();
        Server::start(move |req| me.handle(req)).await
    }

    fn handle(&self, req: &Request) -> Reply {
        let path = req.path().to_string();
        let mut fault = None;
        if path != "/v2/" {
            fault = self.next_fault(&path);
        }
        let authorized = !matches!(fault, Some(Fault::Challenge))
            && match &self.auth {
                Auth::None => true,
                Auth::Basic { user, pass } => {
                    use base64::Engine as _;
                    let want =
                        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                    req.header("authorization") == Some(&format!("Basic {want}"))
                }
                Auth::Bearer { token, .. } => {
                    req.header("authorization") == Some(&format!("Bearer {token}"))
                }
            };
        if !authorized {
            let challenge = match &self.auth {
                Auth::Basic { .. } => r#"Basic realm="fake registry""#.to_string(),
                Auth::Bearer { realm, .. } if path == "/v2/" => {
                    format!(r#"Bearer realm="{realm}",service="fake""#)
                }
                Auth::Bearer { realm, .. } => {
                    format!(
                        r#"Bearer realm="{realm}",service="fake",scope="repository:{REPO}:pull""#
                    )
                }
                Auth::None => r#"Basic realm="fake registry""#.to_string(),
            };
            return Reply::new(
                401,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            )
            .header("WWW-Authenticate", challenge);
        }
        if path == "/v2/" {
            return Reply::new(200, "{}").header("Docker-Distribution-API-Version", "registry/2.0");
        }
        if let Some(Fault::Status(s, retry_after)) = &fault {
            let mut r = Reply::new(
                *s,
                r#"{"errors":[{"code":"UNAVAILABLE","message":"try later"}]}"#,
            );
            if let Some(ra) = retry_after {
                r = r.header("Retry-After", *ra);
            }
            return r;
        }
        if let Some(reference) = path.strip_prefix(&format!("/v2/{REPO}/manifests/")) {
            let Some((media_type, bytes)) = self.content.manifests.get(reference) else {
                return Reply::new(
                    404,
                    r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                );
            };
            let mut r = Reply::new(200, bytes.clone())
                .header("Content-Type", media_type.clone())
                .header(
                    "Docker-Content-Digest",
                    if matches!(fault, Some(Fault::WrongDigestHeader)) {
                        sha(b"something else")
                    } else {
                        sha(bytes)
                    },
                );
            if matches!(fault, Some(Fault::Unframed)) {
                r.framing = Framing::Close;
            }
            return r;
        }
        if let Some(digest) = path.strip_prefix(&format!("/v2/{REPO}/blobs/")) {
            if let Some(Fault::Redirect(base)) = &fault {
                return Reply::new(307, "").header(
                    "Location",
                    format!("{base}/cdn/{digest}?sig=SIGNATURE-SECRET"),
                );
            }
            return self.blob(digest, req, fault);
        }
        Reply::new(
            404,
            r#"{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}"#,
        )
    }

    /// A blob answer with `Range` support (what a CDN serves too).
    pub fn blob(&self, digest: &str, req: &Request, fault: Option<Fault>) -> Reply {
        let Some(data) = self.content.blobs.get(digest) else {
            return Reply::new(
                404,
                r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
            );
        };
        let mut data = data.clone();
        if matches!(fault, Some(Fault::Corrupt)) {
            for b in &mut data {
                *b ^= 0x5a;
            }
        }
        let total = data.len();
        let start = req
            .header("range")
            .filter(|_| !matches!(fault, Some(Fault::IgnoreRange)))
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|s| s.parse::<usize>().ok());
        let mut r = match start {
            Some(s) if s < total => Reply::new(206, data[s..].to_vec())
                .header("Content-Range", format!("bytes {s}-{}/{total}", total - 1)),
            Some(_) => return Reply::new(416, ""),
            None => Reply::new(200, data),
        };
        r = r.header("Content-Type", "application/octet-stream");
        let half = r.body.len() / 2;
        r.framing = match fault {
            Some(Fault::Cut) => Framing::CutAfter(half),
            Some(Fault::Reset) => Framing::ResetAfter(half),
            _ => Framing::Length,
        };
        r
    }
}

/// A blob store on another origin that a registry redirects to (`/cdn/DIGEST`).
pub async fn cdn(registry: &Arc<Registry>) -> Server {
    let reg = registry.clone();
    Server::start(move |req| match req.path().strip_prefix("/cdn/") {
        Some(d) => reg.blob(d, req, None),
        None => Reply::new(404, ""),
    })
    .await
}

/// A token service at `/token`; with `creds`, it wants them as basic auth on a GET; with
/// `refresh`, it wants that refresh token in an OAuth2 POST.
pub async fn token_service(
    token: &str,
    creds: Option<(&str, &str)>,
    refresh: Option<&str>,
) -> Server {
    use base64::Engine as _;
    let token = token.to_string();
    let want = creds.map(|(u, p)| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    });
    let refresh = refresh.map(str::to_string);
    Server::start(move |req| {
        if req.path() != "/token" {
            return Reply::new(404, "");
        }
        if let Some(r) = &refresh {
            let form: Vec<(String, String)> =
                reqwest::Url::parse(&format!("http://x/?{}", String::from_utf8_lossy(&req.body)))
                    .unwrap()
                    .query_pairs()
                    .into_owned()
                    .collect();
            let has = |k: &str, v: &str| form.iter().any(|(a, b)| a == k && b == v);
            if req.method != "POST"
                || !has("grant_type", "refresh_token")
                || !has("refresh_token", r)
            {
                return Reply::new(401, r#"{"details":"bad refresh token"}"#);
            }
            return Reply::new(
                200,
                format!(r#"{{"access_token":"{token}","expires_in":300}}"#),
            );
        }
        if let Some(w) = &want {
            if req.header("authorization") != Some(w.as_str()) {
                return Reply::new(401, r#"{"details":"bad credentials"}"#);
            }
        }
        Reply::new(200, format!(r#"{{"token":"{token}","expires_in":300}}"#))
            .header("Content-Type", "application/json")
    })
    .await
}
