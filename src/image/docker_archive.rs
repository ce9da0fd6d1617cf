//! `docker save` archives (`docker-archive:FILE[:REPO:TAG | :@N]`).
//!
//! An archive holds `manifest.json`, a list of `{Config, RepoTags, Layers}` naming members of
//! the archive, and no image manifest. It may hold several images; the selector picks one by
//! one of its `RepoTags` (compared as written and after Docker's normalisation) or by its
//! position (`@N`). Members can be symbolic or hard links to other members (older docker saves
//! link a layer shared by two images); links are followed inside the archive only.
//!
//! The archive is read in two streaming passes and never extracted: the first indexes the
//! member names and reads `manifest.json`, the second reads the chosen configuration (size
//! capped) and copies the chosen layers into the cache under the sha256 of their bytes. The
//! archive itself may be gzip- or zstd-compressed.
//!
//! The tar-reading helpers at the end of this module are shared with [`super::layout`]'s
//! `oci-archive` reader.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use serde::Deserialize;

use super::archive::{blob_name_digest, read_member, scan_archive, Kind, ScanError};
use super::resolve::check_config;
use super::{Compression, Image, Layer, MAX_DOCUMENT_SIZE};
use crate::cache::{Cache, CacheError, Hasher};
use crate::oci::{verify, VerifyError};
use crate::reference::{ImageRef, Source};

/// Most links followed while resolving one member path (Linux's `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Errors of reading a docker archive.
#[derive(Debug, thiserror::Error)]
pub enum DockerArchiveError {
    /// The archive could not be read.
    #[error("cannot read the archive {path}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A layer could not be written into the cache.
    #[error("cannot write layer member {member} of {archive} into the cache at {path}")]
    Write {
        /// The archive.
        archive: PathBuf,
        /// The member being copied.
        member: String,
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive has no `manifest.json`.
    #[error("{archive} has no manifest.json (not a docker save archive?)")]
    NoManifest {
        /// The archive.
        archive: PathBuf,
    },
    /// `manifest.json` does not parse.
    #[error("manifest.json of {archive} is not valid: {reason}")]
    InvalidManifest {
        /// The archive.
        archive: PathBuf,
        /// Why.
        reason: String,
    },
    /// `manifest.json` lists no image.
    #[error("manifest.json of {archive} lists no image")]
    NoImages {
        /// The archive.
        archive: PathBuf,
    },
    /// Several images and no selector.
    #[error("{archive} holds {count} images; name one as docker-archive:FILE:REPO:TAG or docker-archive:FILE:@N (it has: {images})")]
    Ambiguous {
        /// The archive.
        archive: PathBuf,
        /// How many images.
        count: usize,
        /// The images, by their tags and positions.
        images: String,
    },
    /// The selector matches no image.
    #[error("{archive} has no image {selector} (it has: {images})")]
    NotFound {
        /// The archive.
        archive: PathBuf,
        /// The selector given.
        selector: String,
        /// The images, by their tags and positions.
        images: String,
    },
    /// The selector matches several different images.
    #[error("{selector} names several images in {archive}: {images}")]
    AmbiguousSelector {
        /// The archive.
        archive: PathBuf,
        /// The selector given.
        selector: String,
        /// The images it matches.
        images: String,
    },
    /// A member that `manifest.json` names is missing.
    #[error("{archive} has no member {member}")]
    Missing {
        /// The archive.
        archive: PathBuf,
        /// The member path, as named.
        member: String,
    },
    /// A member that `manifest.json` names is not a regular file.
    #[error("member {member} of {archive} is not a regular file")]
    NotAFile {
        /// The archive.
        archive: PathBuf,
        /// The member path, as named.
        member: String,
    },
    /// A member path or link leads outside the archive.
    #[error("member {member} of {archive} leads outside the archive")]
    Escape {
        /// The archive.
        archive: PathBuf,
        /// The member path, as named.
        member: String,
    },
    /// Too many links, or a loop.
    #[error("member {member} of {archive} goes through more than {MAX_LINKS} links")]
    LinkDepth {
        /// The archive.
        archive: PathBuf,
        /// The member path, as named.
        member: String,
    },
    /// A member with an absolute path or `..` in its path.
    #[error("{archive} has a member with an unsafe path: {member}")]
    UnsafeMember {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
    },
    /// A document is larger than [`MAX_DOCUMENT_SIZE`].
    #[error("member {member} of {archive} is {size} bytes, more than the {MAX_DOCUMENT_SIZE} allowed for a JSON document")]
    TooLarge {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
        /// Its size.
        size: u64,
    },
    /// A layer member is larger than `--max-size`.
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
    /// The archive is not the same between the two passes over it.
    #[error("{archive} changed while it was being read")]
    Changed {
        /// The archive.
        archive: PathBuf,
    },
    /// A member whose name is a digest does not hash to it.
    #[error("member {member} of {archive} has digest {actual}, not the {expected} its name gives")]
    Digest {
        /// The archive.
        archive: PathBuf,
        /// The member path.
        member: String,
        /// The digest its name gives.
        expected: String,
        /// The digest of its bytes.
        actual: String,
    },
    /// A config or layer that does not match what names it, or an image whose parts
    /// disagree.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A layer that is neither a tar nor a compressed tar.
    #[error("layer {member} of {archive} is neither a tar nor gzip- or zstd-compressed")]
    NotALayer {
        /// The archive.
        archive: PathBuf,
        /// The layer member.
        member: String,
    },
}

/// One entry of `manifest.json`.
#[derive(Debug, Deserialize)]
struct ManifestItem {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Option<Vec<String>>,
}

impl ManifestItem {
    fn tags(&self) -> &[String] {
        self.repo_tags.as_deref().unwrap_or_default()
    }
}

/// A member seen in the first pass.
#[derive(Debug, Clone)]
struct Indexed {
    index: usize,
    kind: Kind,
    size: u64,
}

/// A layer blob copied into the cache.
#[derive(Debug, Clone)]
struct Stored {
    digest: Digest,
    size: u64,
    head: Vec<u8>,
    path: PathBuf,
}

/// Resolves an image from a `docker save` archive; layers are copied into the cache.
///
/// `selector` is a `REPO:TAG` among the archive's `RepoTags` or `@N`, the image's position
/// in `manifest.json`; without one, the archive must hold exactly one image.
pub fn resolve(
    path: &Path,
    selector: Option<&str>,
    cache: &Cache,
) -> Result<Image, DockerArchiveError> {
    resolve_capped(path, selector, cache, None)
}

/// [`resolve`], refusing a layer member larger than `max_blob_size` before copying it.
pub fn resolve_capped(
    path: &Path,
    selector: Option<&str>,
    cache: &Cache,
    max_blob_size: Option<u64>,
) -> Result<Image, DockerArchiveError> {
    let archive = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let scan_error = |e: ScanError<DockerArchiveError>| match e {
        ScanError::Io(source) => DockerArchiveError::Io {
            path: archive.clone(),
            source,
        },
        ScanError::Unsafe(member) => DockerArchiveError::UnsafeMember {
            archive: archive.clone(),
            member,
        },
        ScanError::Visit(e) => e,
    };

    // Pass 1: the member index and manifest.json.
    let mut members: HashMap<String, Indexed> = HashMap::new();
    let mut manifest = None;
    scan_archive(path, |m| {
        if m.name == "manifest.json" && m.kind == Kind::File {
            manifest = Some(read_document(&archive, &m.name, m.data, m.size)?);
        }
        members.insert(
            m.name,
            Indexed {
                index: m.index,
                kind: m.kind,
                size: m.size,
            },
        );
        Ok(ControlFlow::Continue(()))
    })
    .map_err(scan_error)?;
    let Some(manifest) = manifest else {
        return Err(match members.get("manifest.json") {
            Some(_) => DockerArchiveError::NotAFile {
                archive,
                member: "manifest.json".into(),
            },
            None => DockerArchiveError::NoManifest { archive },
        });
    };
    let items: Option<Vec<ManifestItem>> =
        serde_json::from_slice(&manifest).map_err(|e| DockerArchiveError::InvalidManifest {
            archive: archive.clone(),
            reason: e.to_string(),
        })?;
    let items = items.unwrap_or_default();
    let item = choose(&items, selector, &archive)?;
    let layer_names = item.layers.as_deref().unwrap_or_default();

    let locate = |name: &str| -> Result<(String, &Indexed), DockerArchiveError> {
        let (canonical, m) =
            resolve_member(&members, name).map_err(|e| e.into_error(&archive, name))?;
        Ok((canonical, m))
    };
    let (config_path, config_member) = locate(&item.config)?;
    if config_member.size > MAX_DOCUMENT_SIZE {
        return Err(DockerArchiveError::TooLarge {
            archive,
            member: item.config.clone(),
            size: config_member.size,
        });
    }
    let config_index = config_member.index;
    let mut layer_members = Vec::with_capacity(layer_names.len());
    for name in layer_names {
        let (canonical, m) = locate(name)?;
        if let Some(limit) = max_blob_size.filter(|l| m.size > *l) {
            return Err(DockerArchiveError::BlobTooLarge {
                archive,
                member: name.clone(),
                size: m.size,
                limit,
            });
        }
        layer_members.push((canonical, m.index, m.size));
    }
    let wanted: HashSet<usize> = layer_members.iter().map(|(_, i, _)| *i).collect();

    // Pass 2: the config in memory, the layers into the cache.
    let mut config = None;
    let mut stored: HashMap<usize, Stored> = HashMap::new();
    let sizes: HashMap<usize, u64> = layer_members
        .iter()
        .map(|(_, i, s)| (*i, *s))
        .chain([(config_index, config_member.size)])
        .collect();
    let changed = || DockerArchiveError::Changed {
        archive: archive.clone(),
    };
    scan_archive(path, |m| {
        if m.index != config_index && !wanted.contains(&m.index) {
            return Ok(ControlFlow::Continue(()));
        }
        if m.kind != Kind::File || sizes.get(&m.index) != Some(&m.size) {
            return Err(changed());
        }
        if m.index == config_index {
            let bytes = read_document(&archive, &m.name, m.data, m.size)?;
            if wanted.contains(&m.index) {
                stored.insert(
                    m.index,
                    store_blob(cache, &archive, &m.name, &mut &bytes[..], m.size)?,
                );
            }
            config = Some(bytes);
        } else {
            stored.insert(
                m.index,
                store_blob(cache, &archive, &m.name, m.data, m.size)?,
            );
        }
        if config.is_some() && wanted.iter().all(|i| stored.contains_key(i)) {
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    })
    .map_err(scan_error)?;
    let config_bytes = config.ok_or_else(changed)?;

    // The configuration: verified against its name when that is a digest, then parsed.
    let config_digest = sha256(&config_bytes);
    for name in [item.config.as_str(), config_path.as_str()] {
        if let Some(expected) = implied_config_digest(name) {
            let actual = digest_of(&config_bytes, &expected);
            if actual != expected {
                return Err(DockerArchiveError::Digest {
                    archive,
                    member: name.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
    }
    let (config, diff_ids) = check_config(
        &config_bytes,
        &format!("config {} of {}", item.config, archive.display()),
        &"manifest.json",
        layer_members.len(),
    )?;

    let mut layers = Vec::with_capacity(layer_members.len());
    for ((name, (canonical, index, _)), diff_id) in
        layer_names.iter().zip(&layer_members).zip(diff_ids)
    {
        let blob = stored.get(index).ok_or_else(changed)?;
        for n in [name.as_str(), canonical.as_str()] {
            let Some(expected) = blob_name_digest(n) else {
                continue;
            };
            let actual = if expected.algorithm() == blob.digest.algorithm() {
                blob.digest.clone()
            } else {
                rehash(&blob.path, &expected).map_err(|source| DockerArchiveError::Io {
                    path: blob.path.clone(),
                    source,
                })?
            };
            if actual != expected {
                return Err(DockerArchiveError::Digest {
                    archive,
                    member: n.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let compression = sniff_layer(&blob.head).ok_or_else(|| DockerArchiveError::NotALayer {
            archive: archive.clone(),
            member: name.clone(),
        })?;
        // An uncompressed layer's DiffID is its digest: check it while it costs nothing.
        if compression == Compression::None {
            verify::uncompressed_diff_id(
                &blob.digest,
                &diff_id,
                &format!("layer {name} of {}", archive.display()),
            )?;
        }
        layers.push(Layer {
            digest: blob.digest.clone(),
            size: blob.size,
            media_type: layer_media_type(compression).to_string(),
            compression,
            diff_id,
            path: blob.path.clone(),
        });
    }

    let source = Source::DockerArchive {
        path: archive.clone(),
        selector: selector.map(str::to_string),
    };
    Ok(Image {
        source: source.to_string(),
        name: Source::DockerArchive {
            path: path.to_path_buf(),
            selector: None,
        }
        .name(),
        manifest_digest: config_digest.clone(),
        config,
        config_digest,
        layers,
    })
}

/// The media type a `docker save` layer would have in a Docker schema 2 manifest (Docker has
/// no zstd type; OCI's is used).
fn layer_media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.docker.image.rootfs.diff.tar",
        Compression::Gzip => "application/vnd.docker.image.rootfs.diff.tar.gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// The compression of a layer from its first bytes; a tar without the `ustar` magic (the
/// old v7 format) is recognised by its header checksum.
fn sniff_layer(head: &[u8]) -> Option<Compression> {
    Compression::sniff(head).or_else(|| {
        let header = head.get(..512)?;
        let stored = tar::Header::from_byte_slice(header).cksum().ok()?;
        let sum: u32 = header
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(*b)
                }
            })
            .sum();
        (stored == sum).then_some(Compression::None)
    })
}

/// Picks the item of `manifest.json` the selector names.
fn choose<'a>(
    items: &'a [ManifestItem],
    selector: Option<&str>,
    archive: &Path,
) -> Result<&'a ManifestItem, DockerArchiveError> {
    let describe = |picked: &mut dyn Iterator<Item = usize>| -> String {
        picked
            .map(|i| {
                let tags = items[i].tags();
                if tags.is_empty() {
                    format!("untagged image @{i} (config {})", items[i].config)
                } else {
                    format!("{} (@{i})", tags.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let Some(selector) = selector else {
        return match items {
            [] => Err(DockerArchiveError::NoImages {
                archive: archive.to_path_buf(),
            }),
            [one] => Ok(one),
            _ => Err(DockerArchiveError::Ambiguous {
                archive: archive.to_path_buf(),
                count: items.len(),
                images: describe(&mut (0..items.len())),
            }),
        };
    };
    if items.is_empty() {
        return Err(DockerArchiveError::NoImages {
            archive: archive.to_path_buf(),
        });
    }
    let not_found = || DockerArchiveError::NotFound {
        archive: archive.to_path_buf(),
        selector: selector.to_string(),
        images: describe(&mut (0..items.len())),
    };
    if let Some(n) = selector.strip_prefix('@') {
        let n: usize = n.parse().map_err(|_| not_found())?;
        return items.get(n).ok_or_else(not_found);
    }
    let mut found: Vec<usize> = (0..items.len())
        .filter(|&i| items[i].tags().iter().any(|t| t == selector))
        .collect();
    if found.is_empty() {
        // skopeo compares the normalised names (`busybox:1` is `docker.io/library/busybox:1`).
        if let Some(want) = normalise(selector) {
            found = (0..items.len())
                .filter(|&i| {
                    items[i]
                        .tags()
                        .iter()
                        .any(|t| normalise(t).as_ref() == Some(&want))
                })
                .collect();
        }
    }
    let mut configs: Vec<&str> = found.iter().map(|&i| items[i].config.as_str()).collect();
    configs.dedup();
    match (found.first(), configs.len()) {
        (None, _) => Err(not_found()),
        (Some(&i), 1) => Ok(&items[i]),
        _ => Err(DockerArchiveError::AmbiguousSelector {
            archive: archive.to_path_buf(),
            selector: selector.to_string(),
            images: describe(&mut found.into_iter()),
        }),
    }
}

fn normalise(name: &str) -> Option<String> {
    name.parse::<ImageRef>().ok().map(|r| r.to_string())
}

/// Why a member path could not be resolved.
#[derive(Debug, PartialEq, Eq)]
enum LinkError {
    Missing,
    NotAFile,
    Escape,
    Depth,
}

impl LinkError {
    fn into_error(self, archive: &Path, member: &str) -> DockerArchiveError {
        let archive = archive.to_path_buf();
        let member = member.to_string();
        match self {
            Self::Missing => DockerArchiveError::Missing { archive, member },
            Self::NotAFile => DockerArchiveError::NotAFile { archive, member },
            Self::Escape => DockerArchiveError::Escape { archive, member },
            Self::Depth => DockerArchiveError::LinkDepth { archive, member },
        }
    }
}

/// Resolves `path` to the regular-file member it names, following symbolic links (relative
/// to the link's directory; absolute ones from the archive's root, as `docker load` scopes
/// them) and hard links (from the root), in every component, never above the root.
fn resolve_member<'a>(
    members: &'a HashMap<String, Indexed>,
    path: &str,
) -> Result<(String, &'a Indexed), LinkError> {
    let mut queue: VecDeque<String> = path.split('/').map(str::to_string).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop().ok_or(LinkError::Escape)?;
                continue;
            }
            _ => resolved.push(c),
        }
        let target = match members.get(&resolved.join("/")).map(|m| &m.kind) {
            Some(Kind::Symlink(t)) => {
                resolved.pop();
                if t.starts_with('/') {
                    resolved.clear();
                }
                t
            }
            Some(Kind::Hardlink(t)) => {
                resolved.clear();
                t
            }
            _ => continue,
        };
        links += 1;
        if links > MAX_LINKS {
            return Err(LinkError::Depth);
        }
        for c in target.split('/').rev() {
            queue.push_front(c.to_string());
        }
    }
    let name = resolved.join("/");
    match members.get(&name) {
        None => Err(LinkError::Missing),
        Some(m) if m.kind == Kind::File => Ok((name, m)),
        Some(_) => Err(LinkError::NotAFile),
    }
}

/// The digest a config member's name gives: `<hex>.json` (docker), `sha256:<hex>`
/// (go-containerregistry) or `blobs/<alg>/<hex>` (docker 25 and later).
fn implied_config_digest(name: &str) -> Option<Digest> {
    if let Some(d) = blob_name_digest(name) {
        return Some(d);
    }
    let last = name.rsplit('/').next()?;
    if let Some(hex) = last.strip_suffix(".json") {
        return format!("sha256:{hex}").parse().ok();
    }
    last.strip_prefix("sha256:")
        .and_then(|hex| format!("sha256:{hex}").parse().ok())
}

fn sha256(bytes: &[u8]) -> Digest {
    let mut h = Hasher::sha256();
    h.update(bytes);
    h.finish()
}

fn digest_of(bytes: &[u8], like: &Digest) -> Digest {
    let mut h = Hasher::for_digest(like).unwrap_or_else(|_| Hasher::sha256());
    h.update(bytes);
    h.finish()
}

fn rehash(path: &Path, like: &Digest) -> io::Result<Digest> {
    let f = File::open(path)?;
    crate::cache::digest_reader(BufReader::new(f), like)
        .map(|(d, _)| d)
        .map_err(io::Error::other)
}

/// Reads a JSON member into memory, refusing one larger than [`MAX_DOCUMENT_SIZE`].
fn read_document(
    archive: &Path,
    member: &str,
    data: &mut dyn Read,
    size: u64,
) -> Result<Vec<u8>, DockerArchiveError> {
    read_member(data, size, MAX_DOCUMENT_SIZE)
        .map_err(|source| DockerArchiveError::Io {
            path: archive.to_path_buf(),
            source,
        })?
        .ok_or_else(|| DockerArchiveError::TooLarge {
            archive: archive.to_path_buf(),
            member: member.to_string(),
            size,
        })
}

/// Copies a member into the cache under the sha256 of its bytes (through the cache's
/// writer, which hashes them on their way in), keeping its first bytes for sniffing the
/// compression.
fn store_blob(
    cache: &Cache,
    archive: &Path,
    member: &str,
    data: &mut dyn Read,
    size: u64,
) -> Result<Stored, DockerArchiveError> {
    let write_error = |source: CacheError| {
        let (path, source) = match source {
            CacheError::Io { path, source } | CacheError::Dir { path, source } => (path, source),
            other => (cache.tmp_dir(), io::Error::other(other)),
        };
        DockerArchiveError::Write {
            archive: archive.to_path_buf(),
            member: member.to_string(),
            path,
            source,
        }
    };
    let mut out = cache.writer_by_content(size).map_err(write_error)?;
    let mut head = Vec::with_capacity(512);
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = match data.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(DockerArchiveError::Io {
                    path: archive.to_path_buf(),
                    source,
                })
            }
        };
        let chunk = &buf[..k];
        if head.len() < 512 {
            head.extend_from_slice(&chunk[..chunk.len().min(512 - head.len())]);
        }
        out.write_all(chunk).map_err(|source| {
            write_error(CacheError::Io {
                path: cache.tmp_dir(),
                source,
            })
        })?;
        n += k as u64;
    }
    if n != size {
        return Err(DockerArchiveError::Io {
            path: archive.to_path_buf(),
            source: truncated(member, size, n),
        });
    }
    let (digest, path) = out.commit_by_content().map_err(write_error)?;
    Ok(Stored {
        digest,
        size,
        head,
        path,
    })
}

fn truncated(member: &str, size: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("member {member} ends after {got} of its {size} bytes"),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::image::archive::member_name;

    pub(crate) enum M<'a> {
        File(&'a str, Vec<u8>),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
    }

    /// A tar of `members`; names are written as given, even unsafe ones.
    pub(crate) fn tar_of(members: &[M<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for m in members {
            let mut h = tar::Header::new_ustar();
            let (name, data, link): (&str, &[u8], Option<&str>) = match m {
                M::File(n, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    (n, d, None)
                }
                M::Dir(n) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    (n, &[], None)
                }
                M::Symlink(n, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    (n, &[], Some(t))
                }
                M::Hardlink(n, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    (n, &[], Some(t))
                }
            };
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(t) = link {
                old.linkname[..t.len()].copy_from_slice(t.as_bytes());
            }
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A layer: a tar holding one file.
    pub(crate) fn layer(file: &str, content: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, file, content).unwrap();
        b.into_inner().unwrap()
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    pub(crate) fn config(diff_ids: &[&Digest]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        cache: Cache,
        archive: PathBuf,
    }

    fn fixture(members: &[M<'_>]) -> Fixture {
        fixture_bytes(&tar_of(members))
    }

    fn fixture_bytes(bytes: &[u8]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();
        let archive = dir.path().join("saved.tar");
        std::fs::write(&archive, bytes).unwrap();
        Fixture {
            _dir: dir,
            cache,
            archive,
        }
    }

    impl Fixture {
        fn resolve(&self, selector: Option<&str>) -> Result<Image, DockerArchiveError> {
            resolve(&self.archive, selector, &self.cache)
        }
    }

    /// Two images sharing their first layer, which the second names through a symlink (as
    /// older docker saves do), with the manifest last.
    fn two_images() -> Vec<u8> {
        let base = layer("foo", b"foo\n");
        let top = layer("bar", b"bar\n");
        let (base_d, top_d) = (sha256(&base), sha256(&top));
        let c1 = config(&[&base_d]);
        let c2 = config(&[&base_d, &top_d]);
        let (c1n, c2n) = (
            format!("{}.json", sha256(&c1).digest()),
            format!("{}.json", sha256(&c2).digest()),
        );
        let manifest = serde_json::json!([
            {"Config": c1n, "RepoTags": ["example.com/app:1", "app:latest"], "Layers": ["aaa/layer.tar"]},
            {"Config": c2n, "RepoTags": ["example.com/app:2"], "Layers": ["bbb/layer.tar", "ccc/layer.tar"]},
        ]);
        tar_of(&[
            M::Dir("aaa/"),
            M::File("aaa/layer.tar", base),
            M::Dir("bbb/"),
            M::Symlink("bbb/layer.tar", "../aaa/layer.tar"),
            M::File("ccc/layer.tar", top),
            M::File(&c1n, c1),
            M::File(&c2n, c2),
            M::File("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ])
    }

    #[test]
    fn selects_by_tag_normalised_tag_and_position() {
        let f = fixture_bytes(&two_images());
        let one = f.resolve(Some("example.com/app:1")).unwrap();
        assert_eq!(one.layers.len(), 1);
        assert_eq!(one.manifest_digest, one.config_digest);
        assert_eq!(one.name, "saved");
        assert!(one.source.starts_with("docker-archive:/"), "{}", one.source);
        assert!(
            one.source.ends_with("saved.tar:example.com/app:1"),
            "{}",
            one.source
        );
        // `app:latest` in the archive is `docker.io/library/app:latest`.
        let by_full = f.resolve(Some("docker.io/library/app:latest")).unwrap();
        assert_eq!(by_full.config_digest, one.config_digest);
        let by_short = f.resolve(Some("app")).unwrap();
        assert_eq!(by_short.config_digest, one.config_digest);
        let two = f.resolve(Some("@1")).unwrap();
        assert_eq!(two.layers.len(), 2);
        assert_eq!(two.layers[0].digest, one.layers[0].digest);
        assert_eq!(two.layers[0].path, one.layers[0].path);
        for l in &two.layers {
            assert_eq!(l.compression, Compression::None);
            assert_eq!(l.media_type, "application/vnd.docker.image.rootfs.diff.tar");
            assert_eq!(l.diff_id, l.digest);
            let bytes = std::fs::read(&l.path).unwrap();
            assert_eq!(sha256(&bytes), l.digest);
            assert_eq!(bytes.len() as u64, l.size);
        }

        let e = f.resolve(None).unwrap_err();
        assert!(
            matches!(e, DockerArchiveError::Ambiguous { count: 2, .. }),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("example.com/app:1, app:latest (@0); example.com/app:2 (@1)"),
            "{msg}"
        );
        for bad in ["example.com/app:3", "@2", "@x"] {
            let e = f.resolve(Some(bad)).unwrap_err();
            assert!(matches!(e, DockerArchiveError::NotFound { .. }), "{e}");
            assert!(e.to_string().contains("example.com/app:2 (@1)"), "{e}");
        }
    }

    #[test]
    fn links_are_followed_inside_the_archive_only() {
        let l = layer("f", b"x");
        let c = config(&[&sha256(&l)]);
        let build = |members: Vec<M<'_>>, layer: &str| {
            let mut members = members;
            let manifest =
                serde_json::json!([{"Config": "c.json", "RepoTags": null, "Layers": [layer]}]);
            members.push(M::File("c.json", c.clone()));
            members.push(M::File(
                "manifest.json",
                serde_json::to_vec(&manifest).unwrap(),
            ));
            fixture(&members)
        };
        // A hard link, an absolute symlink (scoped to the archive root, as docker load does),
        // and a symlinked directory component.
        for (members, name) in [
            (
                vec![
                    M::File("real", l.clone()),
                    M::Hardlink("x/layer.tar", "real"),
                ],
                "x/layer.tar",
            ),
            (
                vec![
                    M::File("a/real", l.clone()),
                    M::Symlink("b/layer.tar", "/a/real"),
                ],
                "b/layer.tar",
            ),
            (
                vec![M::File("a/real", l.clone()), M::Symlink("d", "a")],
                "./d/real",
            ),
        ] {
            let img = build(members, name).resolve(None).unwrap();
            assert_eq!(img.layers[0].digest, sha256(&l), "{name}");
        }
        let escape = build(vec![M::Symlink("x/layer.tar", "../../real")], "x/layer.tar");
        let e = escape.resolve(None).unwrap_err();
        assert!(matches!(e, DockerArchiveError::Escape { .. }), "{e}");
        assert!(e.to_string().contains("member x/layer.tar of "), "{e}");
        let looped = build(vec![M::Symlink("a", "b"), M::Symlink("b", "a")], "a");
        assert!(matches!(
            looped.resolve(None).unwrap_err(),
            DockerArchiveError::LinkDepth { .. }
        ));
        let dangling = build(vec![M::Symlink("a", "nowhere")], "a");
        assert!(matches!(
            dangling.resolve(None).unwrap_err(),
            DockerArchiveError::Missing { .. }
        ));
        let dir = build(vec![M::Dir("a/")], "a");
        assert!(matches!(
            dir.resolve(None).unwrap_err(),
            DockerArchiveError::NotAFile { .. }
        ));
    }

    #[test]
    fn compressed_layers_and_archives() {
        let raw = layer("f", b"hello");
        let gz = gzip(&raw);
        let zst = zstd::encode_all(&raw[..], 3).unwrap();
        let c = config(&[&sha256(&raw), &sha256(&raw)]);
        let manifest =
            serde_json::json!([{"Config": "c.json", "Layers": ["l1.tar.gz", "l2.tar.zst"]}]);
        let tar = tar_of(&[
            M::File("l1.tar.gz", gz.clone()),
            M::File("l2.tar.zst", zst.clone()),
            M::File("c.json", c),
            M::File("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ]);
        // The archive itself gzip-compressed (`docker save | gzip`).
        for bytes in [tar.clone(), gzip(&tar)] {
            let f = fixture_bytes(&bytes);
            let img = f.resolve(None).unwrap();
            let [a, b] = &img.layers[..] else { panic!() };
            assert_eq!(a.compression, Compression::Gzip);
            assert_eq!(
                a.media_type,
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            );
            assert_eq!((a.digest.clone(), a.size), (sha256(&gz), gz.len() as u64));
            assert_eq!(a.diff_id, sha256(&raw));
            assert_eq!(b.compression, Compression::Zstd);
            assert_eq!(b.digest, sha256(&zst));
            assert_eq!(std::fs::read(&b.path).unwrap(), zst);
        }
    }

    #[test]
    fn broken_archives_are_refused() {
        let l = layer("f", b"x");
        let ld = sha256(&l);
        let good_config = config(&[&ld]);
        let manifest = |c: &str, layers: &[&str]| {
            M::File(
                "manifest.json",
                serde_json::to_vec(&serde_json::json!([{"Config": c, "Layers": layers}])).unwrap(),
            )
        };
        let err = |members: Vec<M<'_>>| fixture(&members).resolve(None).unwrap_err();

        let e = err(vec![M::File("l.tar", l.clone())]);
        assert!(
            e.to_string()
                .ends_with("has no manifest.json (not a docker save archive?)"),
            "{e}"
        );
        for (body, null) in [(&b"null"[..], true), (b"[]", true), (b"{}", false)] {
            let e = err(vec![M::File("manifest.json", body.to_vec())]);
            if null {
                assert!(matches!(e, DockerArchiveError::NoImages { .. }), "{e}");
                assert!(e.to_string().ends_with("lists no image"), "{e}");
            } else {
                assert!(
                    matches!(e, DockerArchiveError::InvalidManifest { .. }),
                    "{e}"
                );
            }
        }

        // A config whose name is a digest it does not have.
        let wrong = format!("{}.json", ld.digest());
        let e = err(vec![
            M::File("l.tar", l.clone()),
            M::File(&wrong, good_config.clone()),
            manifest(&wrong, &["l.tar"]),
        ]);
        assert!(matches!(e, DockerArchiveError::Digest { .. }), "{e}");
        // A layer under blobs/sha256/ that is not what its name says.
        let name = format!("blobs/sha256/{}", sha256(b"other").digest());
        let e = err(vec![
            M::File(&name, l.clone()),
            M::File("c.json", good_config.clone()),
            manifest("c.json", &[&name]),
        ]);
        assert!(matches!(e, DockerArchiveError::Digest { .. }), "{e}");

        // diff_ids that do not match the layers.
        let e = err(vec![
            M::File("l.tar", l.clone()),
            M::File("c.json", config(&[])),
            manifest("c.json", &["l.tar"]),
        ]);
        assert!(
            matches!(
                e,
                DockerArchiveError::Verify(VerifyError::DiffIdCount {
                    diff_ids: 0,
                    layers: 1,
                    ..
                })
            ),
            "{e}"
        );
        let other = sha256(b"other");
        let e = err(vec![
            M::File("l.tar", l.clone()),
            M::File("c.json", config(&[&other])),
            manifest("c.json", &["l.tar"]),
        ]);
        assert!(
            matches!(e, DockerArchiveError::Verify(VerifyError::DiffId { .. })),
            "{e}"
        );

        // Not a layer, not a config, missing members, unsafe names.
        let e = err(vec![
            M::File("l.tar", b"PK\x03\x04 not a tar".to_vec()),
            M::File("c.json", good_config.clone()),
            manifest("c.json", &["l.tar"]),
        ]);
        assert!(matches!(e, DockerArchiveError::NotALayer { .. }), "{e}");
        let e = err(vec![
            M::File("l.tar", l.clone()),
            M::File("c.json", b"{}".to_vec()),
            manifest("c.json", &["l.tar"]),
        ]);
        assert!(
            matches!(
                e,
                DockerArchiveError::Verify(VerifyError::InvalidConfig { .. })
            ),
            "{e}"
        );
        let e = err(vec![
            M::File("c.json", good_config.clone()),
            manifest("c.json", &["l.tar"]),
        ]);
        assert!(e.to_string().ends_with("has no member l.tar"), "{e}");
        for bad in ["../evil", "/etc/passwd", "a/../../b"] {
            let e = err(vec![
                M::File(bad, vec![]),
                M::File("c.json", good_config.clone()),
                manifest("c.json", &[]),
            ]);
            assert!(
                matches!(e, DockerArchiveError::UnsafeMember { ref member, .. } if member == bad),
                "{e}"
            );
        }
        let e = err(vec![
            M::File("c.json", vec![b' '; MAX_DOCUMENT_SIZE as usize + 1]),
            manifest("c.json", &[]),
        ]);
        assert!(
            matches!(e, DockerArchiveError::TooLarge { ref member, .. } if member == "c.json"),
            "{e}"
        );
    }

    #[test]
    fn v7_tar_layers_are_recognised() {
        let mut l = layer("f", b"x");
        l[257..265].fill(0); // strip the ustar magic and version
        let header = tar::Header::from_byte_slice(&l[..512]);
        let mut h = header.clone();
        h.set_cksum();
        l[..512].copy_from_slice(h.as_bytes());
        assert_eq!(Compression::sniff(&l), None);
        assert_eq!(sniff_layer(&l), Some(Compression::None));
        l[0] ^= 1;
        assert_eq!(sniff_layer(&l), None);
    }

    #[test]
    fn member_names() {
        assert_eq!(member_name(b"./a//b/./c"), Ok(Some("a/b/c".into())));
        assert_eq!(member_name(b"./"), Ok(None));
        assert_eq!(member_name(b"/x"), Err(()));
        assert_eq!(member_name(b"a/../b"), Err(()));
        assert_eq!(member_name(b"a/\xff"), Ok(None));
        assert_eq!(
            blob_name_digest(&("blobs/sha256/".to_string() + &"a".repeat(64)))
                .map(|d| d.to_string()),
            Some(format!("sha256:{}", "a".repeat(64)))
        );
        assert_eq!(blob_name_digest("blobs/sha256/zz"), None);
        assert_eq!(blob_name_digest("blobs/md5/abc"), None);
        assert!(implied_config_digest(&format!("sha256:{}", "b".repeat(64))).is_some());
        assert!(implied_config_digest(&format!("x/{}.json", "b".repeat(64))).is_some());
        assert!(implied_config_digest("config.json").is_none());
    }

    /// The go-containerregistry corpus (`../shared/conformance/go-containerregistry/`).
    mod conformance {
        use super::*;

        fn corpus(name: &str) -> PathBuf {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/conformance/go-containerregistry")
                .join(name)
        }

        /// Resolves with a fresh cache and checks what every good image must satisfy: each
        /// layer file is its digest and size, and decompresses to its diff_id.
        fn check(name: &str, selector: Option<&str>) -> Result<Image, DockerArchiveError> {
            let dir = tempfile::tempdir().unwrap();
            let cache = Cache::open(Some(dir.path())).unwrap();
            let img = resolve(&corpus(name), selector, &cache)?;
            assert_eq!(
                img.config.rootfs().diff_ids().len(),
                img.layers.len(),
                "{name}"
            );
            assert_eq!(img.manifest_digest, img.config_digest);
            for l in &img.layers {
                let bytes = std::fs::read(&l.path).unwrap();
                assert_eq!(
                    (sha256(&bytes), bytes.len() as u64),
                    (l.digest.clone(), l.size),
                    "{name}"
                );
                let tar = match l.compression {
                    Compression::None => bytes,
                    Compression::Gzip => {
                        let mut out = Vec::new();
                        flate2::read::MultiGzDecoder::new(&bytes[..])
                            .read_to_end(&mut out)
                            .unwrap();
                        out
                    }
                    Compression::Zstd => zstd::decode_all(&bytes[..]).unwrap(),
                };
                assert_eq!(sha256(&tar), l.diff_id, "{name}: diff_id of {}", l.digest);
                assert_eq!(
                    Compression::from_media_type(&l.media_type, "d").unwrap(),
                    l.compression
                );
            }
            Ok(img)
        }

        #[test]
        fn every_archive_resolves_as_expected() {
            for (name, layers, compression) in [
                ("hello-world-v25.tar", 1, Compression::None),
                ("overwritten_file.tar", 3, Compression::None),
                ("source_image.tar", 1, Compression::None),
                ("test_image_1.tar", 1, Compression::None),
                ("whiteout_image.tar", 3, Compression::None),
                ("whiteout_dir.tar", 4, Compression::Gzip),
            ] {
                let img = check(name, None).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(img.layers.len(), layers, "{name}");
                assert!(
                    img.layers.iter().all(|l| l.compression == compression),
                    "{name}"
                );
                assert_eq!(img.name, name.trim_end_matches(".tar"));
            }
            // docker 25's archive is also OCI-layout shaped: its config is named by digest.
            let img = check("hello-world-v25.tar", None).unwrap();
            assert_eq!(
                img.config_digest.to_string(),
                "sha256:ee301c921b8aadc002973b2e0c3da17d701dcd994b606769a7e6eaa100b81d44"
            );
        }

        #[test]
        fn test_link_needs_a_selector_and_follows_the_link() {
            let one = check("test_link.tar", Some("bazel/v1/tarball:test_image_1")).unwrap();
            assert_eq!(one.layers.len(), 1);
            let three = check("test_link.tar", Some("bazel/v1/tarball:test_image_3")).unwrap();
            assert_eq!(three.layers.len(), 2);
            // Its first layer member is a symlink to test_image_1's layer.
            assert_eq!(three.layers[0].digest, one.layers[0].digest);
            assert_eq!(
                three.layers[1].diff_id.to_string(),
                "sha256:6b617a2706576ed038acdc3aa668cac62010386a5a3d227d83aada32085c9f29"
            );
            let normalised = check(
                "test_link.tar",
                Some("docker.io/bazel/v1/tarball:test_image_3"),
            )
            .unwrap();
            assert_eq!(normalised.config_digest, three.config_digest);
            let e = check("test_link.tar", None).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, DockerArchiveError::Ambiguous { count: 2, .. }),
                "{msg}"
            );
            assert!(msg.contains("bazel/v1/tarball:test_image_1"), "{msg}");
            assert!(msg.contains("bazel/v1/tarball:test_image_3"), "{msg}");
        }

        #[test]
        fn broken_archives_are_refused() {
            let e = check("no_manifest.tar", None).unwrap_err();
            assert!(matches!(e, DockerArchiveError::NoManifest { .. }), "{e}");
            assert!(
                e.to_string()
                    .contains("no_manifest.tar has no manifest.json"),
                "{e}"
            );
            let e = check("null_manifest.tar", None).unwrap_err();
            assert!(matches!(e, DockerArchiveError::NoImages { .. }), "{e}");
            assert!(
                e.to_string().contains("null_manifest.tar lists no image"),
                "{e}"
            );
        }
    }
}
