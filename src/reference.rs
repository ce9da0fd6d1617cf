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
        let inner: Reference = s.parse().map_err(|e| invalid(format!("{e}")))?;
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
