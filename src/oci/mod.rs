//! The OCI document model, with no I/O: media types, the document size cap, manifest and
//! index parsing, platform selection, layer compression, image configurations and the
//! integrity checks every blob passes.
//!
//! Shared by every transport and by the registry protocol below them. It knows the OCI and
//! Docker schema 2 media types, refuses schema 1 and documents whose kind cannot be told
//! apart, picks the platform from an image index or manifest list, and maps layer media types
//! to their compression.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

pub mod digest;
pub mod verify;

pub use digest::{Hasher, UnsupportedAlgorithm};
pub use verify::VerifyError;

/// Largest manifest, index or config document accepted, from any transport.
pub const MAX_DOCUMENT_SIZE: u64 = 4 * 1024 * 1024;

/// OCI image configuration.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image configuration.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 image manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1 (refused).
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Docker schema 1, signed (refused).
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The `Accept` list for manifest requests, most wanted first.
pub const MANIFEST_ACCEPT: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Errors of reading and selecting manifests.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    /// Docker schema 1 manifests are deprecated and carry no config digest.
    #[error("{what} is a Docker schema 1 manifest, which is not supported (push it again with a current docker or skopeo to convert it to schema 2)")]
    Schema1 {
        /// What was being read.
        what: String,
    },
    /// The document's kind could not be determined.
    #[error("{what} is ambiguous: {why}")]
    Ambiguous {
        /// What was being read.
        what: String,
        /// Why.
        why: String,
    },
    /// The media type is not a manifest or index.
    #[error("{what} has media type {media_type}, which is not an image manifest or index")]
    MediaType {
        /// What was being read.
        what: String,
        /// The media type found.
        media_type: String,
    },
    /// The JSON is not a valid manifest or index.
    #[error("{what} is not a valid {kind}: {reason}")]
    Invalid {
        /// What was being read.
        what: String,
        /// Manifest or index.
        kind: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// No index entry matches the wanted platform.
    #[error("{what} has no image for platform {wanted} (it has: {available})")]
    NoPlatform {
        /// What was being read.
        what: String,
        /// The platform asked for.
        wanted: Platform,
        /// The platforms present.
        available: String,
    },
    /// A layer media type that is not a tar layer.
    #[error("layer {digest} has media type {media_type}, which is not a supported image layer")]
    LayerType {
        /// The layer's digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// A platform string that does not parse.
    #[error("invalid platform {0:?}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")]
    PlatformSyntax(String),
}

/// A parsed manifest document.
// Parsed once per resolution and consumed at once: the size of the unboxed index does not
// matter, and boxing it would only add a dereference at every use.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Document {
    /// An image manifest (OCI or Docker schema 2).
    Manifest(Box<ImageManifest>),
    /// An image index or manifest list.
    Index(ImageIndex),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<serde_json::Value>,
}

/// Parses a manifest or index. `content_type` is what the transport said (a registry's
/// `Content-Type`, a descriptor's `mediaType`); `what` names the document in errors.
pub fn parse_document(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<Document, SelectError> {
    let invalid = |kind, reason: String| SelectError::Invalid {
        what: what.to_string(),
        kind,
        reason,
    };
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| invalid("manifest", e.to_string()))?;
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "text/plain");
    if probe.schema_version.as_ref().and_then(|v| v.as_i64()) == Some(1)
        || probe.fs_layers.is_some()
        || [content_type, probe.media_type.as_deref()]
            .into_iter()
            .flatten()
            .any(|m| m == DOCKER_SCHEMA1 || m == DOCKER_SCHEMA1_SIGNED)
    {
        return Err(SelectError::Schema1 {
            what: what.to_string(),
        });
    }
    let ambiguous = |why: &str| SelectError::Ambiguous {
        what: what.to_string(),
        why: why.to_string(),
    };
    if let (Some(a), Some(b)) = (content_type, probe.media_type.as_deref()) {
        if a != b {
            return Err(ambiguous(&format!(
                "it was served as {a} but says it is {b}"
            )));
        }
    }
    let is_index = probe.manifests.is_some();
    let is_manifest = probe.layers.is_some() || probe.config.is_some();
    if is_index && is_manifest {
        // A document with both `manifests` and `config`/`layers` could be read either way
        // (the OCI spec's "ambiguous documents" advisory): refuse rather than guess.
        return Err(ambiguous("it has both `manifests` and `config`/`layers`"));
    }
    let media_type = content_type.or(probe.media_type.as_deref());
    let kind_index = match media_type {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) => {
            return Err(SelectError::MediaType {
                what: what.to_string(),
                media_type: other.to_string(),
            })
        }
        None if is_index => true,
        None if is_manifest => false,
        None => {
            return Err(ambiguous(
                "it has no media type and neither `manifests` nor `layers`",
            ))
        }
    };
    if kind_index && is_manifest || !kind_index && is_index {
        return Err(ambiguous(&format!(
            "its media type {} does not match its content",
            media_type.unwrap_or("(none)")
        )));
    }
    if kind_index {
        let index: ImageIndex =
            serde_json::from_slice(bytes).map_err(|e| invalid("image index", e.to_string()))?;
        Ok(Document::Index(index))
    } else {
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| invalid("image manifest", e.to_string()))?;
        Ok(Document::Manifest(Box::new(manifest)))
    }
}

/// A platform: `os/architecture[/variant]`, as in `--platform linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`, ... (Go's names).
    pub architecture: String,
    /// `v8`, `v7`, ... if given.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in Go's names.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    /// Whether an index entry's platform is this one. An unspecified variant matches any;
    /// arm64 without a variant matches `v8`, as containerd's matcher does.
    pub fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        if p.os().to_string() != self.os || p.architecture().to_string() != self.architecture {
            return false;
        }
        match (&self.variant, p.variant()) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(want), None) => self.architecture == "arm64" && want == "v8",
        }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::host()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = SelectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok =
            |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Self {
                os: os.to_string(),
                architecture: normalise_arch(arch),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Self {
                os: os.to_string(),
                architecture: normalise_arch(arch),
                variant: Some(variant.to_string()),
            }),
            _ => Err(SelectError::PlatformSyntax(s.to_string())),
        }
    }
}

fn normalise_arch(a: &str) -> String {
    match a {
        "x86_64" | "x86-64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        other => other.to_string(),
    }
}

/// Picks the entry of `index` for `platform`. `what` names the index in errors.
pub fn select_platform<'a>(
    index: &'a ImageIndex,
    platform: &Platform,
    what: &str,
) -> Result<&'a Descriptor, SelectError> {
    let candidates = index.manifests().iter().filter(|d| {
        // Attestation manifests (buildkit's `unknown/unknown`) and nested indexes are skipped.
        matches!(
            d.media_type().to_string().as_str(),
            OCI_MANIFEST | DOCKER_MANIFEST
        )
    });
    let mut found = None;
    for d in candidates.clone() {
        if let Some(p) = d.platform() {
            if platform.matches(p) {
                found = Some(d);
                break;
            }
        }
    }
    found.ok_or_else(|| SelectError::NoPlatform {
        what: what.to_string(),
        wanted: platform.clone(),
        available: {
            let list: Vec<String> = candidates
                .filter_map(|d| d.platform().as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                })
                .collect();
            if list.is_empty() {
                "none".into()
            } else {
                list.join(", ")
            }
        },
    })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (possibly several members).
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression a layer media type announces; non-layer media types are refused.
    pub fn from_media_type(media_type: &str, digest: &str) -> Result<Self, SelectError> {
        let base = media_type
            .strip_prefix("application/vnd.oci.image.layer.nondistributable.v1.")
            .map(|s| format!("application/vnd.oci.image.layer.v1.{s}"));
        match base.as_deref().unwrap_or(media_type) {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Ok(Self::Zstd),
            _ => Err(SelectError::LayerType {
                digest: digest.to_string(),
                media_type: media_type.to_string(),
            }),
        }
    }

    /// The compression the first bytes of a blob show.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0x1f, 0x8b]) {
            Some(Self::Gzip)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else if head.len() >= 262 && &head[257..262] == b"ustar" || head.iter().all(|b| *b == 0) {
            Some(Self::None)
        } else {
            None
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "uncompressed",
            Self::Gzip => "gzip",
            Self::Zstd => "zstd",
        })
    }
}

/// Parses an image configuration and its `rootfs.diff_ids`; the error is the reason.
pub fn parse_config(bytes: &[u8]) -> Result<(ImageConfiguration, Vec<Digest>), String> {
    let config: ImageConfiguration = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let diff_ids = config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| {
            d.parse::<Digest>()
                .map_err(|e| format!("diff_id {d:?} is not a digest: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((config, diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
      "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":0},
      "layers":[]}"#;

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> String {
        let entries: Vec<String> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, var))| {
                let var = var.map(|v| format!(r#","variant":"{v}""#)).unwrap_or_default();
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"sha256:{:064x}","size":1,"platform":{{"os":"{os}","architecture":"{arch}"{var}}}}}"#,
                    i
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
            entries.join(",")
        )
    }

    #[test]
    fn manifest_and_index_are_told_apart() {
        assert!(matches!(
            parse_document(MANIFEST.as_bytes(), Some(OCI_MANIFEST), "m").unwrap(),
            Document::Manifest(_)
        ));
        let idx = index(&[("linux", "amd64", None)]);
        assert!(matches!(
            parse_document(idx.as_bytes(), None, "i").unwrap(),
            Document::Index(_)
        ));
    }

    #[test]
    fn schema1_is_refused() {
        let s1 = r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        let e = parse_document(s1.as_bytes(), None, "docker.io/x:y").unwrap_err();
        assert!(e.to_string().contains("schema 1"), "{e}");
        let e = parse_document(MANIFEST.as_bytes(), Some(DOCKER_SCHEMA1_SIGNED), "m").unwrap_err();
        assert!(matches!(e, SelectError::Schema1 { .. }));
    }

    #[test]
    fn ambiguous_documents_are_refused() {
        let both = r#"{"schemaVersion":2,"manifests":[],"layers":[],"config":{}}"#;
        assert!(matches!(
            parse_document(both.as_bytes(), None, "x").unwrap_err(),
            SelectError::Ambiguous { .. }
        ));
        // Served as an index but holds a manifest.
        assert!(matches!(
            parse_document(MANIFEST.as_bytes(), Some(OCI_INDEX), "x").unwrap_err(),
            SelectError::Ambiguous { .. }
        ));
        assert!(matches!(
            parse_document(br#"{"schemaVersion":2}"#, None, "x").unwrap_err(),
            SelectError::Ambiguous { .. }
        ));
        assert!(matches!(
            parse_document(
                br#"{"layers":[]}"#,
                Some("application/vnd.oci.image.config.v1+json"),
                "x"
            )
            .unwrap_err(),
            SelectError::MediaType { .. }
        ));
    }

    #[test]
    fn platform_selection() {
        let idx = index(&[
            ("linux", "amd64", None),
            ("linux", "arm64", Some("v8")),
            ("linux", "arm", Some("v7")),
        ]);
        let Document::Index(idx) = parse_document(idx.as_bytes(), None, "i").unwrap() else {
            panic!()
        };
        let pick = |p: &str| {
            select_platform(&idx, &p.parse().unwrap(), "i").map(|d| d.digest().to_string())
        };
        assert!(pick("linux/amd64").unwrap().ends_with("0"));
        assert!(pick("linux/arm64").unwrap().ends_with("1"));
        assert!(pick("linux/aarch64/v8").unwrap().ends_with("1"));
        assert!(pick("linux/arm/v7").unwrap().ends_with("2"));
        let e = pick("linux/s390x").unwrap_err().to_string();
        assert!(
            e.contains("linux/amd64, linux/arm64/v8, linux/arm/v7"),
            "{e}"
        );
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux/amd64/v2/x".parse::<Platform>().is_err());
    }

    #[test]
    fn compression_from_media_type_and_bytes() {
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip", "d")
                .unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd", "d")
                .unwrap(),
            Compression::Zstd
        );
        assert!(
            Compression::from_media_type("application/vnd.oci.image.config.v1+json", "d").is_err()
        );
        assert_eq!(
            Compression::sniff(&[0x1f, 0x8b, 8]),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::sniff(b"PK\x03\x04"), None);
    }
}
