//! Registry credentials: where they come from, and keeping them out of sight.
//!
//! In order: `--creds USER:PASS`; else `--authfile FILE` alone; else the first of
//! `$REGISTRY_AUTH_FILE`, podman's `$XDG_RUNTIME_DIR/containers/auth.json` and docker's
//! `$DOCKER_CONFIG/config.json` (`~/.docker/config.json`) that has something for the registry.
//! Within a file, as docker reads it: a `credHelpers` entry for the host, else the
//! `credsStore` helper, else the `auths` entry. Helpers are run as
//! `docker-credential-NAME get` with the server on stdin.
//!
//! `auths` keys are matched by host, with or without a scheme and a `/v1/` or `/v2/` path
//! (docker writes Docker Hub's as `https://index.docker.io/v1/`); a key with a repository path
//! (`host/namespace`, as podman allows) applies to that namespace and wins over the bare host.
//!
//! An identity token (`identitytoken`, or a helper's `<token>` username) is used with the
//! OAuth2 refresh-token grant at the bearer realm.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{RegistryError, RegistryOptions};

/// How long a credential helper may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// The secret part of credentials.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Secret {
    /// A user name and password (or personal access token).
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// An OAuth2 refresh token for the bearer realm.
    IdentityToken(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Basic { .. } => "Basic(<redacted>)",
            Self::IdentityToken(_) => "IdentityToken(<redacted>)",
        })
    }
}

/// Credentials and where they came from.
#[derive(Clone)]
pub(crate) struct Credentials {
    /// The secret.
    pub secret: Secret,
    /// Where it came from (`--creds`, a file, a helper), for messages.
    pub origin: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.secret {
            Secret::Basic { .. } => "basic",
            Secret::IdentityToken(_) => "identity token",
        };
        f.debug_struct("Credentials")
            .field("kind", &kind)
            .field("secret", &"<redacted>")
            .field("origin", &self.origin)
            .finish()
    }
}

/// Finds credentials for `registry` (as the reference names it) and `repository`.
pub(crate) async fn lookup(
    registry: &str,
    repository: &str,
    opts: &RegistryOptions,
) -> Result<Option<Credentials>, RegistryError> {
    if let Some(c) = &opts.creds {
        let (username, password) = c.split_once(':').ok_or(RegistryError::CredsSyntax)?;
        if username.is_empty() {
            return Err(RegistryError::CredsSyntax);
        }
        return Ok(Some(Credentials {
            secret: Secret::Basic {
                username: username.to_string(),
                password: password.to_string(),
            },
            origin: "--creds".into(),
        }));
    }
    let files = match &opts.authfile {
        Some(p) => vec![(p.clone(), true)],
        None => default_auth_files(|k| std::env::var_os(k).map(PathBuf::from), dirs::home_dir()),
    };
    for (path, required) in files {
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
            Err(source) => return Err(RegistryError::AuthFileRead { path, source }),
        };
        if let Some(c) = lookup_in_file(&path, &text, registry, repository, None).await? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// The auth files to search, most specific first, and whether each must exist.
fn default_auth_files(
    env: impl Fn(&str) -> Option<PathBuf>,
    home: Option<PathBuf>,
) -> Vec<(PathBuf, bool)> {
    let mut v = Vec::new();
    if let Some(p) = env("REGISTRY_AUTH_FILE").filter(|p| !p.as_os_str().is_empty()) {
        v.push((p, true));
    }
    if let Some(d) = env("XDG_RUNTIME_DIR").filter(|p| !p.as_os_str().is_empty()) {
        v.push((d.join("containers/auth.json"), false));
    }
    match env("DOCKER_CONFIG").filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => v.push((d.join("config.json"), false)),
        None => {
            if let Some(h) = home {
                v.push((h.join(".docker/config.json"), false));
            }
        }
    }
    v
}

/// Docker Hub's names, which share one set of credentials.
fn canonical_host(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    match h.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => h,
    }
}

/// A config key as (canonical host, repository path if any).
fn parse_key(key: &str) -> (String, Option<String>) {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let path = path.trim_matches('/');
    let path = (!path.is_empty() && path != "v1" && path != "v2").then(|| path.to_string());
    (canonical_host(host), path)
}

/// The server name a credential helper is asked about: docker's own key for Docker Hub,
/// the host as named otherwise.
fn helper_server(registry: &str) -> String {
    if canonical_host(registry) == "docker.io" {
        "https://index.docker.io/v1/".into()
    } else {
        registry.to_string()
    }
}

/// `helper_path`: the `PATH` to find credential helpers on, when not the process's own.
async fn lookup_in_file(
    path: &Path,
    text: &[u8],
    registry: &str,
    repository: &str,
    helper_path: Option<&std::ffi::OsStr>,
) -> Result<Option<Credentials>, RegistryError> {
    let invalid = |reason: String| RegistryError::AuthFile {
        path: path.to_path_buf(),
        reason,
    };
    // serde_json's messages can quote the input, which holds secrets: only say where.
    let doc: Value = serde_json::from_slice(text).map_err(|e| {
        invalid(format!(
            "not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let host = canonical_host(registry);
    let helper = doc
        .get("credHelpers")
        .and_then(Value::as_object)
        .and_then(|m| {
            m.iter()
                .find(|(k, _)| parse_key(k) == (host.clone(), None))
                .map(|(_, v)| v)
        })
        .map(|v| (v, true))
        .or_else(|| doc.get("credsStore").map(|v| (v, false)));
    if let Some((name, specific)) = helper {
        let name = name
            .as_str()
            .filter(|n| !n.is_empty() && !n.contains(['/', '\\']))
            .ok_or_else(|| invalid("a credential helper name is not a plain name".into()))?;
        match run_helper(name, &helper_server(registry), helper_path).await {
            Ok(Some(secret)) => {
                return Ok(Some(Credentials {
                    secret,
                    origin: format!("credential helper docker-credential-{name}"),
                }))
            }
            Ok(None) => {}
            // A global store that is not installed (a config copied from another machine)
            // should not break pulls from registries it knows nothing about; a helper named
            // for this registry should.
            Err(HelperError::Missing) if !specific => {
                tracing::warn!(
                    helper = name,
                    "the credsStore credential helper is not installed; ignoring it"
                );
            }
            Err(e) => {
                return Err(RegistryError::CredentialHelper {
                    helper: name.to_string(),
                    registry: registry.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }
    let Some(auths) = doc.get("auths").and_then(Value::as_object) else {
        return Ok(None);
    };
    let mut best: Option<(usize, &str, &Value)> = None;
    for (key, entry) in auths {
        let (h, p) = parse_key(key);
        if h != host {
            continue;
        }
        let score = match &p {
            None => 0,
            Some(p) if repository == p || repository.starts_with(&format!("{p}/")) => p.len() + 1,
            Some(_) => continue,
        };
        if best.is_none_or(|(s, ..)| score > s) {
            best = Some((score, key, entry));
        }
    }
    let Some((_, key, entry)) = best else {
        return Ok(None);
    };
    let field = |name: &str| {
        entry
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let secret = if let Some(token) = field("identitytoken") {
        Secret::IdentityToken(token.to_string())
    } else if let Some(auth) = field("auth") {
        use base64::Engine as _;
        let bad = || invalid(format!("the `auth` of {key:?} is not base64 of USER:PASS"));
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let raw = String::from_utf8(raw).map_err(|_| bad())?;
        let (u, p) = raw.split_once(':').ok_or_else(bad)?;
        Secret::Basic {
            username: u.to_string(),
            password: p.to_string(),
        }
    } else if let Some(u) = field("username") {
        Secret::Basic {
            username: u.to_string(),
            password: field("password").unwrap_or_default().to_string(),
        }
    } else {
        return Ok(None);
    };
    Ok(Some(Credentials {
        secret,
        origin: path.display().to_string(),
    }))
}

#[derive(Debug, thiserror::Error)]
enum HelperError {
    #[error("it is not installed (not found on PATH)")]
    Missing,
    #[error("it could not be run: {0}")]
    Spawn(std::io::Error),
    #[error("it did not answer within {} seconds", HELPER_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Failed(String),
}

/// Asks `docker-credential-NAME get` about `server`. `Ok(None)`: it has nothing for it.
async fn run_helper(
    name: &str,
    server: &str,
    helper_path: Option<&std::ffi::OsStr>,
) -> Result<Option<Secret>, HelperError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(format!("docker-credential-{name}"));
    if let Some(p) = helper_path {
        // The program is then looked up on this PATH too.
        cmd.env("PATH", p);
    }
    let mut child = cmd
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => HelperError::Missing,
            _ => HelperError::Spawn(e),
        })?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // The protocol: the server URL alone on stdin, then EOF. A helper that exits without
    // reading it is judged by its exit status below.
    let _ = stdin.write_all(server.as_bytes()).await;
    drop(stdin);
    let out = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| HelperError::Timeout)?
        .map_err(HelperError::Spawn)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let text = format!("{stdout}\n{stderr}");
        if text.contains("credentials not found") {
            return Ok(None);
        }
        // Helpers report errors as one line; quote only that, bounded.
        let line: String = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no message")
            .chars()
            .take(200)
            .collect();
        return Err(HelperError::Failed(format!("{} ({line})", out.status)));
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        username: Option<String>,
        secret: Option<String>,
    }
    let a: Answer = serde_json::from_slice(&out.stdout)
        .map_err(|_| HelperError::Failed("its answer is not the expected JSON".into()))?;
    let secret = a.secret.unwrap_or_default();
    let username = a.username.unwrap_or_default();
    if secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(if username == "<token>" {
        Secret::IdentityToken(secret)
    } else {
        Secret::Basic {
            username,
            password: secret,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(u: &str, p: &str) -> Secret {
        Secret::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    async fn find(doc: &str, registry: &str, repo: &str) -> Option<Secret> {
        find_with(doc, registry, repo, None).await
    }

    async fn find_with(
        doc: &str,
        registry: &str,
        repo: &str,
        helper_path: Option<&std::ffi::OsStr>,
    ) -> Option<Secret> {
        lookup_in_file(
            Path::new("/x/config.json"),
            doc.as_bytes(),
            registry,
            repo,
            helper_path,
        )
        .await
        .unwrap()
        .map(|c| c.secret)
    }

    #[tokio::test]
    async fn auths_key_forms() {
        // "alice:secret1", "bob:secret2", "carol:pw:with:colons"
        let doc = r#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "YWxpY2U6c2VjcmV0MQ=="},
            "registry.example:5000": {"auth": "Ym9iOnNlY3JldDI="},
            "http://other.example/v2/": {"username": "dave", "password": "pw"},
            "quay.io/team": {"auth": "Y2Fyb2w6cHc6d2l0aDpjb2xvbnM="},
            "quay.io": {"username": "eve", "password": "x"},
            "ghcr.io": {"identitytoken": "refresh-me"},
            "empty.example": {}
        }}"#;
        assert_eq!(
            find(doc, "docker.io", "library/nginx").await,
            Some(basic("alice", "secret1"))
        );
        assert_eq!(
            find(doc, "index.docker.io", "x/y").await,
            Some(basic("alice", "secret1"))
        );
        assert_eq!(
            find(doc, "registry.example:5000", "a").await,
            Some(basic("bob", "secret2"))
        );
        assert_eq!(
            find(doc, "registry.example", "a").await,
            None,
            "the port is part of the host"
        );
        assert_eq!(
            find(doc, "other.example", "a").await,
            Some(basic("dave", "pw"))
        );
        assert_eq!(
            find(doc, "quay.io", "team/app").await,
            Some(basic("carol", "pw:with:colons"))
        );
        assert_eq!(
            find(doc, "quay.io", "teammate/app").await,
            Some(basic("eve", "x"))
        );
        assert_eq!(
            find(doc, "ghcr.io", "a").await,
            Some(Secret::IdentityToken("refresh-me".into()))
        );
        assert_eq!(find(doc, "empty.example", "a").await, None);
        assert_eq!(find(doc, "nowhere.example", "a").await, None);
        assert_eq!(find("{}", "docker.io", "a").await, None);
    }

    #[tokio::test]
    async fn malformed_files_do_not_leak() {
        let e = lookup_in_file(
            Path::new("/x/c.json"),
            br#"{"auths": {"h": {"auth": "!!notbase64secret"}}}"#,
            "h",
            "r",
            None,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/x/c.json") && !e.contains("notbase64secret"),
            "{e}"
        );
        let e = lookup_in_file(
            Path::new("/x/c.json"),
            br#"{"auths": {"h": {"auth": hunter2}}}"#,
            "h",
            "r",
            None,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 1") && !e.contains("hunter2"), "{e}");
    }

    #[tokio::test]
    async fn creds_option_wins_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(
            &file,
            r#"{"auths":{"h":{"username":"file","password":"Zq7-secret"}}}"#,
        )
        .unwrap();
        let mut opts = RegistryOptions {
            creds: Some("me:p:w".into()),
            authfile: Some(file.clone()),
            ..Default::default()
        };
        let c = lookup("h", "r", &opts).await.unwrap().unwrap();
        assert_eq!(
            (c.secret, c.origin.as_str()),
            (basic("me", "p:w"), "--creds")
        );
        opts.creds = Some("nopassword".into());
        let e = lookup("h", "r", &opts).await.unwrap_err().to_string();
        assert!(!e.contains("nopassword"), "{e}");
        opts.creds = None;
        let c = lookup("h", "r", &opts).await.unwrap().unwrap();
        assert_eq!(c.secret, basic("file", "Zq7-secret"));
        assert_eq!(c.origin, file.display().to_string());
        let dbg = format!("{c:?}");
        // A secret that no temporary directory name can contain by chance.
        assert!(
            !dbg.contains("Zq7-secret") && !dbg.contains("file\""),
            "{dbg}"
        );
        opts.authfile = Some(dir.path().join("missing.json"));
        assert!(matches!(
            lookup("h", "r", &opts).await.unwrap_err(),
            RegistryError::AuthFileRead { .. }
        ));
    }

    #[test]
    fn default_file_order() {
        let env = |k: &str| match k {
            "REGISTRY_AUTH_FILE" => Some(PathBuf::from("/a/auth.json")),
            "XDG_RUNTIME_DIR" => Some(PathBuf::from("/run/user/1")),
            _ => None,
        };
        assert_eq!(
            default_auth_files(env, Some("/home/u".into())),
            vec![
                (PathBuf::from("/a/auth.json"), true),
                (PathBuf::from("/run/user/1/containers/auth.json"), false),
                (PathBuf::from("/home/u/.docker/config.json"), false),
            ]
        );
        let env = |k: &str| (k == "DOCKER_CONFIG").then(|| PathBuf::from("/d"));
        assert_eq!(
            default_auth_files(env, Some("/home/u".into())),
            vec![(PathBuf::from("/d/config.json"), false)]
        );
    }

    /// Writes a fake `docker-credential-NAME` into `dir`; it records what it was asked on
    /// stdin into `dir/asked-NAME`.
    fn fake_helper(dir: &Path, name: &str, script_body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("docker-credential-{name}"));
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 3\ncat > \"{}/asked-{name}\"\n{script_body}\n",
            dir.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn credential_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fake_helper(
            d,
            "fake",
            r#"echo '{"ServerURL":"x","Username":"helperuser","Secret":"helpersecret"}'"#,
        );
        fake_helper(
            d,
            "tok",
            r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
        );
        fake_helper(
            d,
            "none",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        fake_helper(d, "broken", "echo 'the keyring is locked' >&2; exit 1");
        // Helpers are looked up on PATH, as docker does; the fakes' directory goes first.
        let path = std::ffi::OsString::from(format!(
            "{}:{}",
            d.display(),
            std::env::var("PATH").unwrap_or_default()
        ));
        let p = Some(path.as_os_str());

        let doc = r#"{"credHelpers": {"helped.example": "fake", "https://tok.example": "tok",
                                      "none.example": "none", "broken.example": "broken"},
                      "auths": {"none.example": {"auth": "dTpw"}}}"#;
        assert_eq!(
            find_with(doc, "helped.example", "r", p).await,
            Some(basic("helperuser", "helpersecret"))
        );
        assert_eq!(
            std::fs::read_to_string(d.join("asked-fake")).unwrap(),
            "helped.example"
        );
        assert_eq!(
            find_with(doc, "tok.example", "r", p).await,
            Some(Secret::IdentityToken("refresh".into()))
        );
        // Nothing in the helper: the inline entry is used.
        assert_eq!(
            find_with(doc, "none.example", "r", p).await,
            Some(basic("u", "p"))
        );
        let e = lookup_in_file(Path::new("/c"), doc.as_bytes(), "broken.example", "r", p)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("docker-credential-broken") && e.contains("keyring is locked"),
            "{e}"
        );

        // credsStore: Docker Hub is asked about under docker's key.
        let doc = r#"{"credsStore": "fake"}"#;
        assert_eq!(
            find_with(doc, "docker.io", "library/x", p).await,
            Some(basic("helperuser", "helpersecret"))
        );
        assert_eq!(
            std::fs::read_to_string(d.join("asked-fake")).unwrap(),
            "https://index.docker.io/v1/"
        );
        // A missing global store is ignored; a missing per-registry helper is an error.
        assert_eq!(
            find_with(r#"{"credsStore": "oci2uk-absent"}"#, "h", "r", p).await,
            None
        );
        let e = lookup_in_file(
            Path::new("/c"),
            br#"{"credHelpers": {"h": "oci2uk-absent"}}"#,
            "h",
            "r",
            p,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("not installed"), "{e}");
        let e = lookup_in_file(
            Path::new("/c"),
            br#"{"credsStore": "../evil"}"#,
            "h",
            "r",
            p,
        )
        .await
        .unwrap_err();
        assert!(matches!(e, RegistryError::AuthFile { .. }), "{e}");
    }
}
