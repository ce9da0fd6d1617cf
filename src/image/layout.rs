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

use futures_util::FutureExt;
use oci_spec::image::{Descriptor, Digest, ImageIndex, OciLayout};

use super::archive::{blob_name_digest, read_member, scan_archive, Kind, ScanError};
use super::resolve::{self, BlobSource, Resolved, Top};
use super::{Image, ResolveOptions, MAX_DOCUMENT_SIZE};
use crate::cache::{digest_reader, Cache, CacheError, Hasher};
use crate::oci::{self, verify, Document, SelectError, VerifyError, DOCKER_LIST, OCI_INDEX};
use crate::reference::{ImageRef, Source};

/// The annotation that tags an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd writes with the image's full name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Errors of reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A blob member is larger than `--max-size`.
    #[error("member {member} of {archive} is {size} bytes, more than the limit of {limit} bytes (--max-size)")]
    BlobTooLarge {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A file of the layout could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `oci:` names a file.
    #[error("{path} is not a directory (for a tar of an OCI layout, use oci-archive:{path})")]
    NotADirectory {
        /// The path given.
        path: PathBuf,
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
    #[error("{layout} holds {count} images; name one as {transport}:PATH:TAG (it has: {tags})")]
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
    /// `index.json` is not an image index.
    #[error("index.json of {layout} is not an image index")]
    NotAnIndex {
        /// The layout.
        layout: String,
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
    /// A document or blob that does not match its descriptor, or an image whose parts
    /// disagree.
    #[error(transparent)]
    Verify(#[from] VerifyError),
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
        return Err(LayoutError::NotADirectory { path: abs });
    }
    let oci_layout = read_small_file(&path.join("oci-layout"), &layout, "oci-layout")?;
    let index = read_small_file(&path.join("index.json"), &layout, "index.json")?;
    let blobs = Blobs::Dir(path);
    let r = resolve_layout(&blobs, &layout, "oci", oci_layout, index, tag, opts)?;
    let source = Source::OciDir {
        path: abs,
        tag: tag.map(str::to_string),
    };
    Ok(into_image(r, source.to_string(), path))
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
                    if let Some(limit) = opts.max_blob_size.filter(|l| m.size > *l) {
                        return Err(LayoutError::BlobTooLarge {
                            archive: abs.clone(),
                            member: m.name.clone(),
                            size: m.size,
                            limit,
                        });
                    }
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
    Ok(into_image(r, source.to_string(), path))
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
        verify::size(d, actual, &blob_name(digest, layout))?;
        Ok((file, path))
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
            verify::digest(d, actual, n, &blob_name(d.digest(), layout))?;
        }
        Ok(path)
    }
}

fn blob_name(digest: &Digest, layout: &str) -> String {
    format!("blob {digest} in {layout}")
}

/// A layout's blobs as a [`BlobSource`]: nothing in it waits, so the walk over it finishes
/// in one poll.
struct LayoutSource<'a> {
    blobs: &'a Blobs<'a>,
    layout: &'a str,
}

impl BlobSource for LayoutSource<'_> {
    type Error = LayoutError;

    fn name(&self, kind: &str, digest: &Digest) -> String {
        format!("{kind} {digest} in {}", self.layout)
    }

    async fn document(
        &self,
        d: &Descriptor,
        _: resolve::Kind,
        _: &str,
    ) -> Result<Vec<u8>, LayoutError> {
        let (file, path) = self.blobs.open(d, self.layout)?;
        let mut bytes = Vec::with_capacity(d.size() as usize);
        file.take(d.size() + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Io { path, source })?;
        Ok(bytes)
    }

    async fn layers(&self, ds: &[Descriptor]) -> Result<Vec<PathBuf>, LayoutError> {
        ds.iter()
            .map(|d| self.blobs.layer(d, self.layout))
            .collect()
    }
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

fn into_image(r: Resolved, source: String, path: &Path) -> Image {
    Image {
        source,
        name: Source::OciDir {
            path: path.to_path_buf(),
            tag: None,
        }
        .name(),
        manifest_digest: r.manifest_digest,
        config: r.config,
        config_digest: r.config_digest,
        layers: r.layers,
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
    let Document::Index(index) = oci::parse_document(&index, None, &what)? else {
        return Err(LayoutError::NotAnIndex {
            layout: layout.to_string(),
        });
    };

    let entry = choose(&index, tag, layout, transport)?;
    let src = LayoutSource { blobs, layout };
    let kind = match entry.media_type().to_string().as_str() {
        OCI_INDEX | DOCKER_LIST => "image index",
        _ => "manifest",
    };
    let walk = async {
        let what = src.name(kind, entry.digest());
        let bytes = resolve::document(&src, entry, resolve::Kind::Manifest, &what).await?;
        let top = Top {
            bytes,
            content_type: Some(entry.media_type().to_string()),
            digest: entry.digest().clone(),
            what,
        };
        resolve::resolve(&src, top, &opts.platform).await
    };
    walk.now_or_never()
        .expect("a layout's blobs are read without waiting")
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use serde_json::{json, Value};

    use super::super::docker_archive::tests::{config, gzip, layer, tar_of, M};
    use super::*;
    use crate::oci::{Compression, OCI_CONFIG, OCI_MANIFEST};

    const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

    fn sha256(bytes: &[u8]) -> Digest {
        let mut h = Hasher::sha256();
        h.update(bytes);
        h.finish()
    }

    /// An OCI layout being written in a temporary directory.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let f = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            std::fs::create_dir_all(f.root().join("blobs/sha256")).unwrap();
            f.write("oci-layout", br#"{"imageLayoutVersion": "1.0.0"}"#);
            f
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("app.oci")
        }

        fn write(&self, name: &str, bytes: &[u8]) {
            std::fs::create_dir_all(self.root()).unwrap();
            std::fs::write(self.root().join(name), bytes).unwrap();
        }

        /// Stores a blob; returns its descriptor.
        fn blob(&self, media_type: &str, bytes: &[u8]) -> Value {
            let d = sha256(bytes);
            self.write(&format!("blobs/sha256/{}", d.digest()), bytes);
            json!({"mediaType": media_type, "digest": d.to_string(), "size": bytes.len()})
        }

        /// Stores an image whose layers each hold one file; returns the manifest descriptor.
        fn image(&self, files: &[&str], gzipped: bool) -> Value {
            let tars: Vec<Vec<u8>> = files.iter().map(|f| layer(f, f.as_bytes())).collect();
            let diff_ids: Vec<Digest> = tars.iter().map(|t| sha256(t)).collect();
            let layers: Vec<Value> = tars
                .iter()
                .map(|t| match gzipped {
                    true => self.blob(GZIP_LAYER, &gzip(t)),
                    false => self.blob(TAR_LAYER, t),
                })
                .collect();
            let config = self.blob(OCI_CONFIG, &config(&diff_ids.iter().collect::<Vec<_>>()));
            self.manifest(config, layers)
        }

        fn manifest(&self, config: Value, layers: Vec<Value>) -> Value {
            let m = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers});
            self.blob(OCI_MANIFEST, &serde_json::to_vec(&m).unwrap())
        }

        fn index(&self, entries: &[Value]) {
            let i = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
            self.write("index.json", &serde_json::to_vec(&i).unwrap());
        }

        fn resolve(&self, tag: Option<&str>) -> Result<Image, LayoutError> {
            resolve_dir(&self.root(), tag, &ResolveOptions::default())
        }

        fn resolve_on(&self, tag: Option<&str>, platform: &str) -> Result<Image, LayoutError> {
            let opts = ResolveOptions {
                platform: platform.parse().unwrap(),
                ..Default::default()
            };
            resolve_dir(&self.root(), tag, &opts)
        }

        /// The layout as a tar archive, in the same temporary directory.
        fn archive(&self, compress: bool) -> PathBuf {
            let mut b = tar::Builder::new(Vec::new());
            b.append_dir_all(".", self.root()).unwrap();
            let mut bytes = b.into_inner().unwrap();
            if compress {
                bytes = gzip(&bytes);
            }
            let path = self.dir.path().join("app.tar");
            std::fs::write(&path, bytes).unwrap();
            path
        }

        fn cache(&self) -> Cache {
            Cache::open(Some(&self.dir.path().join("cache"))).unwrap()
        }
    }

    fn tagged(mut d: Value, tag: &str) -> Value {
        d["annotations"] = json!({REF_NAME: tag});
        d
    }

    fn assert_verified(img: &Image) {
        assert_eq!(img.config.rootfs().diff_ids().len(), img.layers.len());
        for l in &img.layers {
            let bytes = std::fs::read(&l.path).unwrap();
            assert_eq!(
                (sha256(&bytes), bytes.len() as u64),
                (l.digest.clone(), l.size)
            );
            let tar = match l.compression {
                Compression::Gzip => {
                    let mut out = Vec::new();
                    flate2::read::MultiGzDecoder::new(&bytes[..])
                        .read_to_end(&mut out)
                        .unwrap();
                    out
                }
                Compression::None => bytes,
                Compression::Zstd => zstd::decode_all(&bytes[..]).unwrap(),
            };
            assert_eq!(sha256(&tar), l.diff_id);
        }
    }

    #[test]
    fn one_image_without_a_tag() {
        let f = Fixture::new();
        let m = f.image(&["a", "b"], true);
        f.index(std::slice::from_ref(&m));
        let img = f.resolve(None).unwrap();
        assert_eq!(img.manifest_digest.to_string(), m["digest"]);
        assert_eq!(img.layers.len(), 2);
        assert!(img
            .layers
            .iter()
            .all(|l| l.compression == Compression::Gzip));
        assert!(img.layers.iter().all(|l| l.path.starts_with(f.root())));
        assert_eq!(img.name, "app");
        assert_eq!(img.source, format!("oci:{}", f.root().display()));
        assert_verified(&img);
    }

    #[test]
    fn tags_positions_and_full_names() {
        let f = Fixture::new();
        let one = f.image(&["a"], false);
        let two = f.image(&["a", "b"], false);
        let mut three = f.image(&["c"], true);
        three["annotations"] = json!({REF_NAME: "3", CONTAINERD_NAME: "docker.io/library/app:3"});
        f.index(&[
            tagged(one.clone(), "1"),
            tagged(two.clone(), "two"),
            three.clone(),
        ]);
        let digest = |img: Image| img.manifest_digest.to_string();
        assert_eq!(digest(f.resolve(Some("1")).unwrap()), one["digest"]);
        let img = f.resolve(Some("two")).unwrap();
        assert_eq!(img.source, format!("oci:{}:two", f.root().display()));
        assert_eq!(img.layers.len(), 2);
        assert_eq!(digest(f.resolve(Some("@1")).unwrap()), two["digest"]);
        for name in ["3", "docker.io/library/app:3", "app:3"] {
            assert_eq!(
                digest(f.resolve(Some(name)).unwrap()),
                three["digest"],
                "{name}"
            );
        }

        let e = f.resolve(None).unwrap_err();
        assert!(matches!(e, LayoutError::NeedTag { count: 3, .. }), "{e}");
        assert!(e.to_string().contains("(it has: 1, two, 3)"), "{e}");
        for bad in ["4", "@3", "app:4"] {
            let e = f.resolve(Some(bad)).unwrap_err();
            assert!(matches!(e, LayoutError::NoTag { .. }), "{e}");
        }
        // One tag on two different images.
        f.index(&[tagged(one, "x"), tagged(two, "x")]);
        assert!(matches!(
            f.resolve(Some("x")).unwrap_err(),
            LayoutError::AmbiguousTag { .. }
        ));
    }

    #[test]
    fn nested_index_picks_the_platform() {
        let f = Fixture::new();
        let mut amd = f.image(&["amd"], true);
        amd["platform"] = json!({"os": "linux", "architecture": "amd64"});
        let mut arm = f.image(&["arm", "more"], true);
        arm["platform"] = json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let idx = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [amd, arm]});
        let idx = f.blob(OCI_INDEX, &serde_json::to_vec(&idx).unwrap());
        f.index(&[tagged(idx, "multi")]);
        let img = f.resolve_on(Some("multi"), "linux/arm64").unwrap();
        assert_eq!(img.manifest_digest.to_string(), arm["digest"]);
        assert_eq!(img.layers.len(), 2);
        let img = f.resolve_on(None, "linux/amd64").unwrap();
        assert_eq!(img.manifest_digest.to_string(), amd["digest"]);
        let e = f.resolve_on(None, "linux/s390x").unwrap_err();
        assert!(
            matches!(e, LayoutError::Select(SelectError::NoPlatform { .. })),
            "{e}"
        );
    }

    #[test]
    fn blobs_are_verified() {
        let f = Fixture::new();
        let tar = layer("a", b"a");
        let l = f.blob(TAR_LAYER, &tar);
        let c = f.blob(OCI_CONFIG, &config(&[&sha256(&tar)]));
        let m = f.manifest(c.clone(), vec![l.clone()]);
        f.index(std::slice::from_ref(&m));
        f.resolve(None).unwrap();
        let blob = |d: &Value| {
            f.root()
                .join("blobs/sha256")
                .join(d["digest"].as_str().unwrap().trim_start_matches("sha256:"))
        };

        // Same size, other bytes.
        let mut bad = tar.clone();
        bad[0] ^= 1;
        std::fs::write(blob(&l), &bad).unwrap();
        let e = f.resolve(None).unwrap_err();
        assert!(
            matches!(e, LayoutError::Verify(VerifyError::Digest { .. })),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(&format!("blob {} in ", l["digest"].as_str().unwrap())),
            "{e}"
        );
        std::fs::write(blob(&l), &tar[..100]).unwrap();
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::Verify(VerifyError::Size { actual: 100, .. })
        ));
        std::fs::remove_file(blob(&l)).unwrap();
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::Missing { .. }
        ));
        std::fs::write(blob(&l), &tar).unwrap();

        // A document announcing more than the cap is refused before it is read.
        let mut huge = m.clone();
        huge["size"] = json!(MAX_DOCUMENT_SIZE + 1);
        f.index(&[huge]);
        let e = f.resolve(None).unwrap_err();
        assert!(
            matches!(
                e,
                LayoutError::Verify(VerifyError::TooLarge { ref what, .. })
                    if what.starts_with("manifest ")
            ),
            "{e}"
        );
        // Digests name paths only for algorithms that can be verified.
        let mut odd = m.clone();
        odd["digest"] = json!(format!("sha384:{}", "a".repeat(96)));
        f.index(&[odd]);
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::Algorithm { .. }
        ));

        // Config problems.
        let two = f.manifest(c.clone(), vec![l.clone(), l.clone()]);
        f.index(&[two]);
        let e = f.resolve(None).unwrap_err();
        assert!(
            matches!(
                e,
                LayoutError::Verify(VerifyError::DiffIdCount {
                    diff_ids: 1,
                    layers: 2,
                    ..
                })
            ),
            "{e}"
        );
        let other = f.blob(OCI_CONFIG, &config(&[&sha256(b"x")]));
        f.index(&[f.manifest(other, vec![l.clone()])]);
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::Verify(VerifyError::DiffId { .. })
        ));
        let artifact = f.blob("application/vnd.cncf.helm.config.v1+json", b"{}");
        f.index(&[f.manifest(artifact, vec![])]);
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::Verify(VerifyError::NotAnImage { .. })
        ));
        let broken = f.blob(OCI_CONFIG, b"{\"os\": 1}");
        f.index(&[f.manifest(broken, vec![])]);
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::Verify(VerifyError::InvalidConfig { .. })
        ));
        let mut not_a_layer = l.clone();
        not_a_layer["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
        f.index(&[f.manifest(c, vec![not_a_layer])]);
        let e = f.resolve(None).unwrap_err();
        assert!(
            matches!(e, LayoutError::Select(SelectError::LayerType { .. })),
            "{e}"
        );
    }

    #[test]
    fn layout_files_are_checked() {
        let f = Fixture::new();
        let m = f.image(&["a"], false);
        f.index(&[m]);
        f.write("oci-layout", br#"{"imageLayoutVersion": "2.0.0"}"#);
        let e = f.resolve(None).unwrap_err();
        assert!(matches!(e, LayoutError::LayoutVersion { .. }), "{e}");
        std::fs::remove_file(f.root().join("oci-layout")).unwrap();
        let e = f.resolve(None).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is not an OCI image layout: it has no oci-layout file"),
            "{e}"
        );
        f.write("oci-layout", br#"{"imageLayoutVersion": "1.0.0"}"#);
        for empty in [
            &br#"{"schemaVersion":2,"manifests":null}"#[..],
            br#"{"schemaVersion":2,"manifests":[]}"#,
        ] {
            f.write("index.json", empty);
            assert!(matches!(
                f.resolve(None).unwrap_err(),
                LayoutError::Empty { .. }
            ));
        }
        f.write("index.json", &vec![b' '; MAX_DOCUMENT_SIZE as usize + 1]);
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::FileTooLarge {
                file: "index.json",
                ..
            }
        ));
        std::fs::remove_file(f.root().join("index.json")).unwrap();
        assert!(matches!(
            f.resolve(None).unwrap_err(),
            LayoutError::NoIndex { .. }
        ));
        let e = resolve_dir(
            Path::new("/nonexistent/layout"),
            None,
            &ResolveOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, LayoutError::Io { .. }), "{e}");
    }

    #[test]
    fn archives_are_copied_into_the_cache() {
        let f = Fixture::new();
        let one = f.image(&["a", "b"], true);
        let two = f.image(&["c"], false);
        f.index(&[tagged(one.clone(), "one"), tagged(two, "two")]);
        let cache = f.cache();
        for compress in [false, true] {
            let archive = f.archive(compress);
            let opts = ResolveOptions::default();
            let img = resolve_archive(&archive, Some("one"), &opts, &cache).unwrap();
            assert_eq!(img.manifest_digest.to_string(), one["digest"]);
            assert_eq!(img.source, format!("oci-archive:{}:one", archive.display()));
            assert_eq!(img.name, "app");
            assert!(img.layers.iter().all(|l| l.path.starts_with(cache.root())));
            assert_verified(&img);
            let e = resolve_archive(&archive, None, &opts, &cache).unwrap_err();
            assert!(
                matches!(
                    e,
                    LayoutError::NeedTag {
                        transport: "oci-archive",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_archives_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();
        let path = dir.path().join("a.tar");
        let resolve = |members: &[M<'_>]| {
            std::fs::write(&path, tar_of(members)).unwrap();
            resolve_archive(&path, None, &ResolveOptions::default(), &cache).unwrap_err()
        };
        let layout = || M::File("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec());
        let e = resolve(&[layout(), M::File("../index.json", b"{}".to_vec())]);
        assert!(
            matches!(e, LayoutError::UnsafeMember { ref member, .. } if member == "../index.json"),
            "{e}"
        );
        let liar = format!("blobs/sha256/{}", sha256(b"right").digest());
        let e = resolve(&[layout(), M::File(&liar, b"wrong".to_vec())]);
        assert!(
            matches!(e, LayoutError::Member { ref member, .. } if *member == liar),
            "{e}"
        );
        let e = resolve(&[M::File("index.json", b"{}".to_vec())]);
        assert!(matches!(e, LayoutError::NotALayout { .. }), "{e}");
        // Blobs the index needs but the archive lacks.
        let m = json!({"mediaType": OCI_MANIFEST, "digest": sha256(b"m").to_string(), "size": 1});
        let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap();
        let e = resolve(&[layout(), M::File("index.json", idx)]);
        assert!(matches!(e, LayoutError::Missing { .. }), "{e}");
    }

    /// Layouts and archives written by an independent tool, skopeo, from the conformance
    /// corpus's docker archives, resolve to the same layers (by diff_id) as the archives do.
    #[test]
    fn skopeo_layouts_and_archives() {
        assert!(
            Command::new("skopeo").arg("--version").output().is_ok(),
            "skopeo is not installed (testregistry/install.sh installs it)"
        );
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/conformance/go-containerregistry");
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();
        let skopeo = |from: String, to: String| {
            let out = Command::new("skopeo")
                .args(["--insecure-policy", "copy", "-q", &from, &to])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "skopeo copy {from} {to}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let docker = |file: &str, selector: Option<&str>| {
            super::super::docker_archive::resolve(&corpus.join(file), selector, &cache).unwrap()
        };
        let diff_ids = |img: &Image| {
            img.layers
                .iter()
                .map(|l| l.diff_id.clone())
                .collect::<Vec<_>>()
        };

        let layout = dir.path().join("layout");
        let link = corpus.join("test_link.tar");
        for tag in ["test_image_1", "test_image_3"] {
            skopeo(
                format!("docker-archive:{}:bazel/v1/tarball:{tag}", link.display()),
                format!("oci:{}:{tag}", layout.display()),
            );
        }
        let opts = ResolveOptions::default();
        for tag in ["test_image_1", "test_image_3"] {
            let img = resolve_dir(&layout, Some(tag), &opts).unwrap();
            assert_verified(&img);
            let expected = docker("test_link.tar", Some(&format!("bazel/v1/tarball:{tag}")));
            assert_eq!(diff_ids(&img), diff_ids(&expected), "{tag}");
        }
        let e = resolve_dir(&layout, None, &opts).unwrap_err().to_string();
        assert!(e.contains("test_image_1, test_image_3"), "{e}");

        for file in [
            "whiteout_dir.tar",
            "overwritten_file.tar",
            "hello-world-v25.tar",
        ] {
            let archive = dir.path().join(format!("{file}.oci.tar"));
            skopeo(
                format!("docker-archive:{}", corpus.join(file).display()),
                format!("oci-archive:{}:t", archive.display()),
            );
            let img = resolve_archive(&archive, None, &opts, &cache).unwrap();
            assert_verified(&img);
            assert_eq!(diff_ids(&img), diff_ids(&docker(file, None)), "{file}");
            assert_eq!(
                resolve_archive(&archive, Some("t"), &opts, &cache)
                    .unwrap()
                    .manifest_digest,
                img.manifest_digest
            );
        }

        // docker 25's save is OCI-layout shaped, but its index.json lists no image.
        let e =
            resolve_archive(&corpus.join("hello-world-v25.tar"), None, &opts, &cache).unwrap_err();
        assert!(matches!(e, LayoutError::Empty { .. }), "{e}");
    }
}
