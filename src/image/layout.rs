//! OCI image layouts (`oci:DIR[:TAG]`) and their tar archives (`oci-archive:FILE[:TAG]`).
//!
//! A layout is read as the image spec lays it out: the `oci-layout` file marks it,
//! `index.json` lists its images (tagged by the `org.opencontainers.image.ref.name`
//! annotation), and every blob lives at `blobs/ALG/HEX`. An index entry may be an image
//! manifest or a (multi-platform) image index, from which the platform is picked.
//!
//! Every blob is checked against the descriptor that names it (size, then digest) before it is
//! used, and documents are refused before they are read when their descriptor announces more
//! than [`MAX_DOCUMENT_SIZE`]. Blob paths are built only from validated digests. A directory's
//! layer blobs are used in place, once verified; an archive is streamed once, its blobs copied
//! into the cache (each verified against the digest its member name gives), and never
//! extracted.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, OciLayout};

use super::docker_archive::{blob_name_digest, read_member, scan_archive, Kind, ScanError};
use super::select::{self, Document, SelectError};
use super::{Compression, Image, Layer, ResolveOptions, MAX_DOCUMENT_SIZE};
use crate::cache::{digest_reader, Cache, CacheError, Hasher};
use crate::reference::{ImageRef, Source};

/// The annotation that tags an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd writes with the image's full name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// OCI image configuration.
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image configuration.
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// Errors of reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file of the layout could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No `oci-layout` file.
    #[error("{layout} is not an OCI image layout: it has no oci-layout file")]
    NotALayout {
        /// The layout.
        layout: String,
    },
    /// An `oci-layout` file that does not parse or names another version.
    #[error("{layout} has an unsupported oci-layout file: {reason}")]
    LayoutVersion {
        /// The layout.
        layout: String,
        /// Why.
        reason: String,
    },
    /// No `index.json`.
    #[error("{layout} has no index.json")]
    NoIndex {
        /// The layout.
        layout: String,
    },
    /// `index.json` lists no image.
    #[error("{layout} holds no image: its index.json lists no manifest")]
    Empty {
        /// The layout.
        layout: String,
    },
    /// Several images and no tag.
    #[error("{layout} holds {count} images; name one with a tag, {transport}:{layout}:TAG (it has: {tags})")]
    NeedTag {
        /// The layout.
        layout: String,
        /// `oci` or `oci-archive`.
        transport: &'static str,
        /// How many images.
        count: usize,
        /// Their tags.
        tags: String,
    },
    /// No image with that tag.
    #[error("{layout} has no image tagged {tag} (it has: {tags})")]
    NoTag {
        /// The layout.
        layout: String,
        /// The tag asked for.
        tag: String,
        /// The tags present.
        tags: String,
    },
    /// Several different images with that tag.
    #[error("{layout} has several different images tagged {tag}: {digests}")]
    AmbiguousTag {
        /// The layout.
        layout: String,
        /// The tag asked for.
        tag: String,
        /// Their manifest digests.
        digests: String,
    },
    /// A document larger than [`MAX_DOCUMENT_SIZE`].
    #[error(
        "{what} {digest} in {layout} is {size} bytes, more than the {MAX_DOCUMENT_SIZE} allowed"
    )]
    TooLarge {
        /// The layout.
        layout: String,
        /// What the document is.
        what: &'static str,
        /// Its digest.
        digest: String,
        /// The size announced.
        size: u64,
    },
    /// A layout file (`index.json`, `oci-layout`) larger than [`MAX_DOCUMENT_SIZE`].
    #[error("{file} of {layout} is larger than the {MAX_DOCUMENT_SIZE} bytes allowed")]
    FileTooLarge {
        /// The layout.
        layout: String,
        /// The file.
        file: &'static str,
    },
    /// A descriptor whose digest uses an algorithm that cannot be verified.
    #[error(
        "{layout} refers to {digest}, whose algorithm is not supported (sha256 and sha512 are)"
    )]
    Algorithm {
        /// The layout.
        layout: String,
        /// The digest.
        digest: String,
    },
    /// A blob a descriptor names is absent.
    #[error("{layout} has no blob {digest}")]
    Missing {
        /// The layout.
        layout: String,
        /// The digest.
        digest: String,
    },
    /// A blob whose size is not its descriptor's.
    #[error("blob {digest} in {layout} is {actual} bytes, but its descriptor says {expected}")]
    Size {
        /// The layout.
        layout: String,
        /// The digest.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// The blob's size.
        actual: u64,
    },
    /// A blob whose digest is not its descriptor's.
    #[error("blob {expected} in {layout} is corrupt: its content has digest {actual}")]
    Digest {
        /// The layout.
        layout: String,
        /// The descriptor's digest.
        expected: String,
        /// The digest of the content.
        actual: String,
    },
    /// `index.json` is not an image index.
    #[error("index.json of {layout} is not an image index")]
    NotAnIndex {
        /// The layout.
        layout: String,
    },
    /// The manifest's config is not an image configuration (an artifact).
    #[error("manifest {manifest} in {layout} has a config of media type {media_type}, which is not a container image")]
    NotAnImage {
        /// The layout.
        layout: String,
        /// The manifest's digest.
        manifest: String,
        /// The config's media type.
        media_type: String,
    },
    /// The configuration does not parse.
    #[error("config {digest} in {layout} is not a valid image configuration: {reason}")]
    InvalidConfig {
        /// The layout.
        layout: String,
        /// The config's digest.
        digest: String,
        /// Why.
        reason: String,
    },
    /// The configuration's `rootfs.diff_ids` do not match the manifest's layers.
    #[error("config {digest} in {layout} lists {diff_ids} diff_ids, but manifest {manifest} has {layers} layers")]
    DiffIdCount {
        /// The layout.
        layout: String,
        /// The config's digest.
        digest: String,
        /// The manifest's digest.
        manifest: String,
        /// How many diff_ids.
        diff_ids: usize,
        /// How many layers.
        layers: usize,
    },
    /// An uncompressed layer whose digest is not its DiffID.
    #[error(
        "layer {digest} in {layout} is an uncompressed tar, but the config gives diff_id {diff_id}"
    )]
    DiffId {
        /// The layout.
        layout: String,
        /// The layer's digest.
        digest: String,
        /// The DiffID the config gives.
        diff_id: String,
    },
    /// An archive member with an absolute path or `..` in its path.
    #[error("{archive} has a member with an unsafe path: {member}")]
    UnsafeMember {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
    },
    /// An archive's blob member could not be copied into the cache (or does not match the
    /// digest its name gives).
    #[error("cannot store member {member} of {archive} in the cache")]
    Member {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
        /// The cause.
        #[source]
        source: Box<CacheError>,
    },
    /// The cache could not be used.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// From manifest parsing and platform selection.
    #[error(transparent)]
    Select(#[from] SelectError),
}

/// Resolves an image from an OCI layout directory. `tag` is matched against the
/// `org.opencontainers.image.ref.name` annotation (or is `@N`, the position in
/// `index.json`); without one, the layout must hold exactly one image. Layer paths point into
/// the layout itself.
pub fn resolve_dir(
    path: &Path,
    tag: Option<&str>,
    opts: &ResolveOptions,
) -> Result<Image, LayoutError> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let layout = abs.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| LayoutError::Io {
        path: abs.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LayoutError::Io {
            path: abs,
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }
    let oci_layout = read_small_file(&path.join("oci-layout"), &layout, "oci-layout")?;
    let index = read_small_file(&path.join("index.json"), &layout, "index.json")?;
    let blobs = Blobs::Dir(path);
    let r = resolve_layout(&blobs, &layout, "oci", oci_layout, index, tag, opts)?;
    let source = Source::OciDir {
        path: abs,
        tag: tag.map(str::to_string),
    };
    Ok(r.into_image(source.to_string(), path))
}

/// Resolves an image from a tar of an OCI layout (plain, gzip or zstd). The archive is
/// streamed once; every `blobs/ALG/HEX` member is copied into the cache, verified against its
/// name, and layer paths point into the cache.
pub fn resolve_archive(
    path: &Path,
    tag: Option<&str>,
    opts: &ResolveOptions,
    cache: &Cache,
) -> Result<Image, LayoutError> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let layout = abs.display().to_string();
    let mut oci_layout = None;
    let mut index = None;
    let mut blobs = HashMap::new();
    scan_archive(path, |m| {
        let document = |file, data, size| {
            read_member(data, size, MAX_DOCUMENT_SIZE)
                .map_err(|source| LayoutError::Io {
                    path: abs.clone(),
                    source,
                })?
                .ok_or(LayoutError::FileTooLarge {
                    layout: layout.clone(),
                    file,
                })
        };
        if m.kind != Kind::File {
            return Ok(ControlFlow::Continue(()));
        }
        match m.name.as_str() {
            "oci-layout" => oci_layout = Some(document("oci-layout", m.data, m.size)?),
            "index.json" => index = Some(document("index.json", m.data, m.size)?),
            name => {
                if let Some(digest) = blob_name_digest(name) {
                    let member_error = |source| LayoutError::Member {
                        archive: abs.clone(),
                        member: m.name.clone(),
                        source: Box::new(source),
                    };
                    // A blob the cache already holds (verified again by `get`) is skipped.
                    let path = match cache.get(&digest, m.size).map_err(member_error)? {
                        Some(p) => p,
                        None => cache
                            .put_reader(&digest, m.size, m.data)
                            .map_err(member_error)?,
                    };
                    blobs.insert(digest, (path, m.size));
                }
            }
        }
        Ok(ControlFlow::Continue(()))
    })
    .map_err(|e| match e {
        ScanError::Io(source) => LayoutError::Io {
            path: abs.clone(),
            source,
        },
        ScanError::Unsafe(member) => LayoutError::UnsafeMember {
            archive: abs.clone(),
            member,
        },
        ScanError::Visit(e) => e,
    })?;
    let blobs = Blobs::Cached(blobs);
    let r = resolve_layout(&blobs, &layout, "oci-archive", oci_layout, index, tag, opts)?;
    let source = Source::OciArchive {
        path: abs,
        tag: tag.map(str::to_string),
    };
    Ok(r.into_image(source.to_string(), path))
}

/// Where a layout's blobs are.
enum Blobs<'a> {
    /// In a layout directory, read and verified in place.
    Dir(&'a Path),
    /// Copied from an archive into the cache (already verified), by digest, with their size.
    Cached(HashMap<Digest, (PathBuf, u64)>),
}

impl Blobs<'_> {
    /// The file holding `d`, after checking its size against the descriptor (its digest is
    /// for the caller to check).
    fn open(&self, d: &Descriptor, layout: &str) -> Result<(File, PathBuf), LayoutError> {
        let digest = d.digest();
        let missing = || LayoutError::Missing {
            layout: layout.to_string(),
            digest: digest.to_string(),
        };
        let path = match self {
            Self::Dir(root) => {
                // Only sha256 and sha512, whose hex part `Digest` has validated, name a path.
                Hasher::for_digest(digest).map_err(|_| LayoutError::Algorithm {
                    layout: layout.to_string(),
                    digest: digest.to_string(),
                })?;
                root.join("blobs")
                    .join(digest.algorithm().as_ref())
                    .join(digest.digest())
            }
            Self::Cached(map) => map.get(digest).ok_or_else(missing)?.0.clone(),
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
            Err(source) => return Err(LayoutError::Io { path, source }),
        };
        let actual = file
            .metadata()
            .map_err(|source| LayoutError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if actual != d.size() {
            return Err(LayoutError::Size {
                layout: layout.to_string(),
                digest: digest.to_string(),
                expected: d.size(),
                actual,
            });
        }
        Ok((file, path))
    }

    /// Reads a manifest, index or config, refusing it before reading when its descriptor
    /// announces more than [`MAX_DOCUMENT_SIZE`], and verifies it.
    fn document(
        &self,
        d: &Descriptor,
        what: &'static str,
        layout: &str,
    ) -> Result<Vec<u8>, LayoutError> {
        if d.size() > MAX_DOCUMENT_SIZE {
            return Err(LayoutError::TooLarge {
                layout: layout.to_string(),
                what,
                digest: d.digest().to_string(),
                size: d.size(),
            });
        }
        let (file, path) = self.open(d, layout)?;
        let mut bytes = Vec::with_capacity(d.size() as usize);
        file.take(d.size() + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Io { path, source })?;
        let actual = {
            let mut h = Hasher::for_digest(d.digest()).map_err(|_| LayoutError::Algorithm {
                layout: layout.to_string(),
                digest: d.digest().to_string(),
            })?;
            h.update(&bytes);
            h.finish()
        };
        check(d, actual, bytes.len() as u64, layout)?;
        Ok(bytes)
    }

    /// The verified file holding a layer blob.
    fn layer(&self, d: &Descriptor, layout: &str) -> Result<PathBuf, LayoutError> {
        let (file, path) = self.open(d, layout)?;
        if let Self::Dir(_) = self {
            let (actual, n) = digest_reader(BufReader::with_capacity(256 * 1024, file), d.digest())
                .map_err(|e| match e {
                    CacheError::Io { source, .. } => LayoutError::Io {
                        path: path.clone(),
                        source,
                    },
                    e => e.into(),
                })?;
            check(d, actual, n, layout)?;
        }
        Ok(path)
    }
}

fn check(d: &Descriptor, actual: Digest, n: u64, layout: &str) -> Result<(), LayoutError> {
    if n != d.size() {
        return Err(LayoutError::Size {
            layout: layout.to_string(),
            digest: d.digest().to_string(),
            expected: d.size(),
            actual: n,
        });
    }
    if &actual != d.digest() {
        return Err(LayoutError::Digest {
            layout: layout.to_string(),
            expected: d.digest().to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Reads a small file of a layout directory; `None` if it does not exist.
fn read_small_file(
    path: &Path,
    layout: &str,
    file: &'static str,
) -> Result<Option<Vec<u8>>, LayoutError> {
    let io_error = |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_DOCUMENT_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > MAX_DOCUMENT_SIZE {
        return Err(LayoutError::FileTooLarge {
            layout: layout.to_string(),
            file,
        });
    }
    Ok(Some(bytes))
}

/// A resolved layout image, before it is named.
struct Resolved {
    manifest_digest: Digest,
    config: ImageConfiguration,
    config_digest: Digest,
    layers: Vec<Layer>,
}

impl Resolved {
    fn into_image(self, source: String, path: &Path) -> Image {
        Image {
            source,
            name: Source::OciDir {
                path: path.to_path_buf(),
                tag: None,
            }
            .name(),
            manifest_digest: self.manifest_digest,
            config: self.config,
            config_digest: self.config_digest,
            layers: self.layers,
        }
    }
}

fn resolve_layout(
    blobs: &Blobs<'_>,
    layout: &str,
    transport: &'static str,
    oci_layout: Option<Vec<u8>>,
    index: Option<Vec<u8>>,
    tag: Option<&str>,
    opts: &ResolveOptions,
) -> Result<Resolved, LayoutError> {
    let oci_layout = oci_layout.ok_or_else(|| LayoutError::NotALayout {
        layout: layout.to_string(),
    })?;
    let version_error = |reason: String| LayoutError::LayoutVersion {
        layout: layout.to_string(),
        reason,
    };
    let parsed: OciLayout =
        serde_json::from_slice(&oci_layout).map_err(|e| version_error(e.to_string()))?;
    // The layout format has not changed since 1.0.0; a later 1.x stays readable.
    if !parsed.image_layout_version().starts_with("1.") {
        return Err(version_error(format!(
            "imageLayoutVersion is {:?}, expected 1.x",
            parsed.image_layout_version()
        )));
    }

    let index = index.ok_or_else(|| LayoutError::NoIndex {
        layout: layout.to_string(),
    })?;
    // `"manifests": null` (docker 25's archives carry such an index.json) is "no image", not
    // an invalid index.
    let probe: serde_json::Value = serde_json::from_slice(&index).unwrap_or_default();
    if probe
        .get("manifests")
        .is_some_and(|m| m.is_null() || m.as_array().is_some_and(|a| a.is_empty()))
    {
        return Err(LayoutError::Empty {
            layout: layout.to_string(),
        });
    }
    let what = format!("index.json of {layout}");
    let Document::Index(index) = select::parse_document(&index, None, &what)? else {
        return Err(LayoutError::NotAnIndex {
            layout: layout.to_string(),
        });
    };

    let entry = choose(&index, tag, layout, transport)?;
    let entry_type = entry.media_type().to_string();
    let what = format!("manifest {} in {layout}", entry.digest());
    let bytes = blobs.document(entry, "manifest", layout)?;
    let (desc, manifest) = match select::parse_document(&bytes, Some(&entry_type), &what)? {
        Document::Manifest(m) => (entry.clone(), m),
        Document::Index(idx) => {
            let what = format!("image index {} in {layout}", entry.digest());
            let desc = select::select_platform(&idx, &opts.platform, &what)?;
            let what = format!("manifest {} in {layout}", desc.digest());
            let bytes = blobs.document(desc, "manifest", layout)?;
            match select::parse_document(&bytes, Some(desc.media_type().as_ref()), &what)? {
                Document::Manifest(m) => (desc.clone(), m),
                // `select_platform` only picks manifests, and `parse_document` refuses a
                // document whose content disagrees with its media type.
                Document::Index(_) => unreachable!("a manifest descriptor parsed as an index"),
            }
        }
    };

    let cdesc = manifest.config();
    let media_type = cdesc.media_type().to_string();
    if media_type != OCI_CONFIG && media_type != DOCKER_CONFIG {
        return Err(LayoutError::NotAnImage {
            layout: layout.to_string(),
            manifest: desc.digest().to_string(),
            media_type,
        });
    }
    let config_bytes = blobs.document(cdesc, "config", layout)?;
    let (config, diff_ids) =
        parse_config(&config_bytes).map_err(|reason| LayoutError::InvalidConfig {
            layout: layout.to_string(),
            digest: cdesc.digest().to_string(),
            reason,
        })?;
    if diff_ids.len() != manifest.layers().len() {
        return Err(LayoutError::DiffIdCount {
            layout: layout.to_string(),
            digest: cdesc.digest().to_string(),
            manifest: desc.digest().to_string(),
            diff_ids: diff_ids.len(),
            layers: manifest.layers().len(),
        });
    }

    let mut layers = Vec::with_capacity(diff_ids.len());
    for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
        let media_type = d.media_type().to_string();
        let compression = Compression::from_media_type(&media_type, d.digest().as_ref())?;
        if compression == Compression::None && d.digest() != &diff_id {
            return Err(LayoutError::DiffId {
                layout: layout.to_string(),
                digest: d.digest().to_string(),
                diff_id: diff_id.to_string(),
            });
        }
        let path = blobs.layer(d, layout)?;
        layers.push(Layer {
            digest: d.digest().clone(),
            size: d.size(),
            media_type,
            compression,
            diff_id,
            path,
        });
    }
    Ok(Resolved {
        manifest_digest: desc.digest().clone(),
        config,
        config_digest: cdesc.digest().clone(),
        layers,
    })
}

/// Picks the `index.json` entry `tag` names.
///
/// skopeo's rule: without a tag the index must list exactly one entry; with one, the entry
/// whose `org.opencontainers.image.ref.name` is the tag. When none is, a full name is also
/// accepted, matched (as written or after Docker's normalisation) against that annotation
/// and containerd's `io.containerd.image.name`. `@N` picks the N-th entry.
fn choose<'a>(
    index: &'a ImageIndex,
    tag: Option<&str>,
    layout: &str,
    transport: &'static str,
) -> Result<&'a Descriptor, LayoutError> {
    let manifests = index.manifests();
    let annotation = |d: &'a Descriptor, key: &str| -> Option<&'a str> {
        d.annotations()
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let tags = || {
        manifests
            .iter()
            .enumerate()
            .map(|(i, d)| match annotation(d, REF_NAME) {
                Some(t) => t.to_string(),
                None => format!("untagged @{i} ({})", d.digest()),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(tag) = tag else {
        return match manifests.as_slice() {
            [one] => Ok(one),
            _ => Err(LayoutError::NeedTag {
                layout: layout.to_string(),
                transport,
                count: manifests.len(),
                tags: tags(),
            }),
        };
    };
    let not_found = || LayoutError::NoTag {
        layout: layout.to_string(),
        tag: tag.to_string(),
        tags: tags(),
    };
    if let Some(n) = tag.strip_prefix('@').and_then(|n| n.parse::<usize>().ok()) {
        return manifests.get(n).ok_or_else(not_found);
    }
    let mut found: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| annotation(d, REF_NAME) == Some(tag))
        .collect();
    if found.is_empty() {
        let want = tag.parse::<ImageRef>().ok().map(|r| r.to_string());
        found = manifests
            .iter()
            .filter(|d| {
                [REF_NAME, CONTAINERD_NAME]
                    .iter()
                    .filter_map(|k| annotation(d, k))
                    .any(|a| {
                        a == tag
                            || want.is_some()
                                && a.parse::<ImageRef>().ok().map(|r| r.to_string()) == want
                    })
            })
            .collect();
    }
    let mut digests: Vec<String> = found.iter().map(|d| d.digest().to_string()).collect();
    digests.sort();
    digests.dedup();
    match (found.first(), digests.len()) {
        (None, _) => Err(not_found()),
        (Some(d), 1) => Ok(d),
        _ => Err(LayoutError::AmbiguousTag {
            layout: layout.to_string(),
            tag: tag.to_string(),
            digests: digests.join(", "),
        }),
    }
}

/// Parses an image configuration and its `rootfs.diff_ids`; the error is the reason.
pub(super) fn parse_config(bytes: &[u8]) -> Result<(ImageConfiguration, Vec<Digest>), String> {
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
