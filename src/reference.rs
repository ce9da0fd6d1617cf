//! Image names: what the user types in, a [`Source`] out.
//!
//! Registry references follow Docker's normalisation (`nginx` is
//! `docker.io/library/nginx:latest`, served by `registry-1.docker.io`); the other transports
//! are spelled as skopeo spells them: `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
//! `docker-archive:FILE[:REPO:TAG]`, and `docker://REF` for a registry explicitly.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::distribution::Reference;

/// Errors of parsing an image name.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The registry reference does not parse.
    #[error("invalid image reference {input:?}: {reason}")]
    Invalid {
        /// What the user gave.
        input: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A transport was named without its path.
    #[error("invalid image name {0:?}: the transport needs a path after the colon")]
    MissingPath(String),
}

/// Docker Hub's canonical registry name, as references spell it.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";

/// A normalised registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    inner: Reference,
}

impl ImageRef {
    /// The registry as named (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host (and port) that serves the registry API: `registry-1.docker.io` for Docker Hub.
    pub fn endpoint(&self) -> &str {
        match self.inner.registry() {
            DOCKER_HUB | "index.docker.io" => DOCKER_HUB_ENDPOINT,
            other => other,
        }
    }

    /// The repository (`library/nginx`).
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, if any (`latest` is implied when neither tag nor digest is given).
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&str> {
        self.inner.digest()
    }

    /// What to ask the registry for: the digest when there is one, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest().or(self.tag()).unwrap_or("latest")
    }

    /// The same repository at another digest.
    pub fn with_digest(&self, digest: &str) -> Self {
        Self {
            inner: Reference::with_digest(
                self.registry().to_string(),
                self.repository().to_string(),
                digest.to_string(),
            ),
        }
    }

    /// The default output name: the last component of the repository.
    pub fn name(&self) -> &str {
        self.repository()
            .rsplit('/')
            .next()
            .unwrap_or(self.repository())
    }

    /// Whether the registry is on this machine (127.0.0.0/8, ::1, localhost), where plain
    /// HTTP is allowed as a fallback, as docker allows it.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.endpoint())
    }
}

/// Whether a `host[:port]` names this machine.
pub fn is_loopback_host(host_port: &str) -> bool {
    let host = if host_port.parse::<std::net::IpAddr>().is_ok() {
        host_port
    } else if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host_port
            }
        })
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

impl FromStr for ImageRef {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ReferenceError::Invalid {
            input: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        let inner = parse_reference(s).map_err(|e| invalid(e.into()))?;
        if inner.repository().chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid("repository names must be lowercase".into()));
        }
        if let Some(d) = inner.digest() {
            d.parse::<oci_spec::image::Digest>()
                .map_err(|e| invalid(format!("bad digest: {e}")))?;
        }
        Ok(Self { inner })
    }
}

/// Longest repository name (distribution's `NameTotalLengthMax`).
const NAME_MAX: usize = 255;

/// Parses a reference by distribution's grammar, as `oci_spec`'s `Reference::from_str` does,
/// and normalises it the same way (`docker.io`, `library/`, `latest`). Written out because
/// `oci_spec` checks the grammar with a regex whose Unicode `[\w.-]{0,127}` takes about 40 ms
/// to compile, the largest part of a warm rebuild's start. One difference: a tag is ASCII
/// (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`), as distribution's Go grammar has it; the regex also
/// took Unicode letters, which no registry accepts.
fn parse_reference(s: &str) -> Result<Reference, &'static str> {
    const FORMAT: &str = "invalid reference format";
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    // A colon after the last slash starts the tag; one before it is the registry's port.
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if name.is_empty() {
        return Err("repository name must have at least one component");
    }
    let mut components = name.split('/');
    let first = components.next().unwrap_or_default();
    let rest_ok = components.clone().all(is_path_component);
    let valid = rest_ok && (is_path_component(first) || (name.contains('/') && is_domain(first)));
    if !valid {
        return Err(FORMAT);
    }
    if let Some(t) = tag {
        let ok = t.len() <= 128
            && t.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
            })
            && !t.is_empty();
        if !ok {
            return Err(FORMAT);
        }
    }
    if let Some(d) = digest {
        let (algorithm, hex) = d.split_once(':').ok_or(FORMAT)?;
        let algorithm_ok = algorithm.split(['-', '_', '+', '.']).all(|part| {
            part.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && part.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FORMAT);
        }
    }
    // Distribution's splitDomain: the first component is a registry when it looks like a
    // host (a dot or a port) or is `localhost`.
    let (mut registry, mut repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_string(), rest.to_string())
        }
        _ => (DOCKER_HUB.to_string(), name.to_string()),
    };
    if registry == "index.docker.io" {
        registry = DOCKER_HUB.to_string();
    }
    if registry == DOCKER_HUB && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    if repository.len() > NAME_MAX {
        return Err("repository name must not be more than 255 characters");
    }
    if let Some(d) = digest {
        let want = match d.split_once(':').map(|(a, _)| a) {
            Some("sha256") => 64,
            Some("sha384") => 96,
            Some("sha512") => 128,
            _ => return Err("unsupported digest algorithm"),
        };
        if d.len() - d.find(':').map_or(0, |i| i + 1) != want {
            return Err("invalid checksum digest length");
        }
    }
    let (registry, repository) = (registry, repository);
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: &u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !b.first().is_some_and(alnum) || !b.last().is_some_and(alnum) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        // A separator: `.`, `_`, `__`, or a run of `-`, between two alphanumerics.
        let sep = match b[i] {
            b'.' => 1,
            b'_' if b.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => b[i..].iter().take_while(|&&x| x == b'-').count(),
            _ => return false,
        };
        i += sep;
        if !b.get(i).is_some_and(alnum) {
            return false;
        }
    }
    true
}

/// A host of dot-separated labels (letters, digits, inner `-`), with an optional `:PORT`.
fn is_domain(c: &str) -> bool {
    let (host, port) = match c.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (c, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry(), self.repository())?;
        if let Some(t) = self.tag() {
            write!(f, ":{t}")?;
        }
        if let Some(d) = self.digest() {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A registry (`docker://` or a bare reference).
    Registry(ImageRef),
    /// An OCI image layout directory, with an optional tag (`org.opencontainers.image.ref.name`).
    OciDir {
        /// The layout directory.
        path: PathBuf,
        /// The tag to pick; without one the layout must hold exactly one image.
        tag: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        /// The archive.
        path: PathBuf,
        /// The tag to pick.
        tag: Option<String>,
    },
    /// A `docker save` archive, with an optional `REPO:TAG` (or `@N`) selector.
    DockerArchive {
        /// The archive.
        path: PathBuf,
        /// Which image of the archive.
        selector: Option<String>,
    },
}

impl Source {
    /// The default output name stem: the repository's last component, or the file or
    /// directory stem for archives and layouts.
    pub fn name(&self) -> String {
        let stem = |p: &Path| {
            let p = if p.as_os_str().is_empty() || p == Path::new(".") {
                std::env::current_dir().unwrap_or_default()
            } else {
                p.to_path_buf()
            };
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        };
        match self {
            Self::Registry(r) => r.name().to_string(),
            Self::OciDir { path, .. } => {
                // A layout directory's name is the stem, but not its extension-like part
                // (`nginx.oci` gives `nginx`), as for archives.
                stem(path)
            }
            Self::OciArchive { path, .. } | Self::DockerArchive { path, .. } => stem(path),
        }
    }
}

impl FromStr for Source {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // skopeo splits a transport's argument at its first colon, so paths cannot hold one.
        fn path_and_rest(
            s: &str,
            whole: &str,
        ) -> Result<(PathBuf, Option<String>), ReferenceError> {
            let (p, rest) = match s.split_once(':') {
                Some((p, r)) => (p, Some(r.to_string()).filter(|r| !r.is_empty())),
                None => (s, None),
            };
            if p.is_empty() {
                return Err(ReferenceError::MissingPath(whole.to_string()));
            }
            Ok((PathBuf::from(p), rest))
        }
        if let Some(r) = s.strip_prefix("docker://") {
            return Ok(Self::Registry(r.parse()?));
        }
        if let Some(r) = s.strip_prefix("oci:") {
            let (path, tag) = path_and_rest(r, s)?;
            return Ok(Self::OciDir { path, tag });
        }
        if let Some(r) = s.strip_prefix("oci-archive:") {
            let (path, tag) = path_and_rest(r, s)?;
            return Ok(Self::OciArchive { path, tag });
        }
        if let Some(r) = s.strip_prefix("docker-archive:") {
            let (path, selector) = path_and_rest(r, s)?;
            return Ok(Self::DockerArchive { path, selector });
        }
        Ok(Self::Registry(s.parse()?))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |o: &Option<String>| o.as_ref().map(|t| format!(":{t}")).unwrap_or_default();
        match self {
            Self::Registry(r) => write!(f, "{r}"),
            Self::OciDir { path, tag } => write!(f, "oci:{}{}", path.display(), opt(tag)),
            Self::OciArchive { path, tag } => {
                write!(f, "oci-archive:{}{}", path.display(), opt(tag))
            }
            Self::DockerArchive { path, selector } => {
                write!(f, "docker-archive:{}{}", path.display(), opt(selector))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(s: &str) -> ImageRef {
        match s.parse::<Source>().unwrap() {
            Source::Registry(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn docker_normalisation() {
        let r = reg("nginx");
        assert_eq!(r.to_string(), "docker.io/library/nginx:latest");
        assert_eq!(r.endpoint(), "registry-1.docker.io");
        assert_eq!(r.name(), "nginx");
        assert_eq!(
            reg("docker://nginx").to_string(),
            "docker.io/library/nginx:latest"
        );
        assert_eq!(reg("user/app:1").to_string(), "docker.io/user/app:1");
        let r = reg("127.0.0.1:5000/web/nginx:1");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "web/nginx", Some("1"))
        );
        assert_eq!(r.name(), "nginx");
        assert!(r.is_loopback());
        let d = "sha256:".to_string() + &"a".repeat(64);
        let r = reg(&format!("localhost:5000/nginx@{d}"));
        assert_eq!(r.digest(), Some(d.as_str()));
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.name(), "nginx");
        assert!(!reg("quay.io/x/y").is_loopback());
        assert!(!reg("localhostx:5000/y").is_loopback());
    }

    #[test]
    fn bad_references_are_refused() {
        for bad in ["", "UPPER/case", "nginx@sha256:zz", "a b", "nginx:"] {
            let e = bad.parse::<Source>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert!(matches!(
            "oci:".parse::<Source>().unwrap_err(),
            ReferenceError::MissingPath(_)
        ));
    }

    /// The parser agrees with `oci_spec`'s regex on every ASCII name: hand-picked edge cases,
    /// then every string of up to four symbols over an alphabet of the grammar's classes.
    #[test]
    fn parser_agrees_with_oci_spec() {
        let agree = |s: &str| {
            let ours = parse_reference(s).ok();
            let theirs = s.parse::<Reference>().ok();
            assert_eq!(ours, theirs, "{s:?}");
        };
        let h64 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        for s in [
            "nginx",
            "nginx:1.25",
            "library/nginx",
            "docker.io/nginx",
            "index.docker.io/library/nginx:latest",
            "localhost/a",
            "localhost:5000/a/b:c",
            "127.0.0.1:5000/web/nginx:1",
            "my-reg.example.com/x",
            "-bad.com/x",
            "bad-.com/x",
            "a.b/c_d/e__f/g---h/i.j:t.t-t_",
            "a/b___c",
            "a/b._c",
            "a/-b",
            "a/b-",
            "A/b",
            "Host.com/b",
            "host.com:/b",
            "host.com:5x/b",
            "a:b:c",
            "a:",
            "a:-x",
            "a:_x",
            "a/:x",
            "/a",
            "a//b",
            "a/",
            "test.com:5000",
            &format!("a:{}", "t".repeat(128)),
            &format!("a:{}", "t".repeat(129)),
            &format!("a/{}", "b".repeat(260)),
            &format!("a@sha256:{h64}"),
            &format!("a:t@sha256:{h64}"),
            &format!("a@sha256:{}", &h64[..63]),
            &format!("a@sha512:{h64}"),
            &format!("a@md5+x.y:{h64}"),
            &format!("a@5ha:{h64}"),
            &format!("a@sha256:{h64}@x"),
            &format!("@sha256:{h64}"),
        ] {
            agree(s);
        }
        let alphabet = [
            "a",
            "B",
            "0",
            ".",
            "-",
            "_",
            "/",
            ":",
            "@",
            "localhost",
            "x.y",
        ];
        let mut words = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for w in &words {
                for a in alphabet {
                    let s = format!("{w}{a}");
                    agree(&s);
                    next.push(s);
                }
            }
            words = next;
        }
    }

    #[test]
    fn transports() {
        assert_eq!(
            "oci:/x/layout:nginx".parse::<Source>().unwrap(),
            Source::OciDir {
                path: "/x/layout".into(),
                tag: Some("nginx".into())
            }
        );
        assert_eq!(
            "docker-archive:t.tar:bazel/v1/tarball:test_image_1"
                .parse::<Source>()
                .unwrap(),
            Source::DockerArchive {
                path: "t.tar".into(),
                selector: Some("bazel/v1/tarball:test_image_1".into())
            }
        );
        let s: Source = "oci-archive:/tmp/hello.tar".parse().unwrap();
        assert_eq!(s.name(), "hello");
        assert_eq!(s.to_string(), "oci-archive:/tmp/hello.tar");
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1:5000", "[fe80::1]:5000"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
