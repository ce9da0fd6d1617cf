//! Reading pushed artifacts back from a registry: a unikernel to boot (`run REF`), a kernel to
//! bake with (`--kernel REF`), or any reference's description (`inspect REF`).
//!
//! Layers are fetched through the cache (verified by digest) and the one file wanted is taken
//! out of them into the cache, under the layer's digest, so a second run fetches nothing.
//! Extraction writes only regular files and directories with plain relative names into a
//! fresh directory that holds no symbolic link, so a hostile layer cannot write elsewhere.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, Digest, ImageManifest};

use super::*;
use crate::cache::{Cache, Hasher};
use crate::image::registry::RegistrySource;
use crate::image::resolve as walk;
use crate::oci::Platform;
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::registry::client::{Session, Tuning};
use crate::registry::{RegistryError, RegistryOptions};

/// The most a kernel artifact may unpack to.
const MAX_KERNEL_UNPACKED: u64 = 4 << 30;

/// Errors of reading an artifact.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Talking to the registry failed.
    #[error("cannot get {reference}")]
    Registry {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<RegistryError>,
    },
    /// The artifact is not what was expected.
    #[error("{reference} {why}")]
    Invalid {
        /// The reference.
        reference: String,
        /// What is wrong.
        why: String,
    },
    /// Unpacking into the cache failed.
    #[error("cannot unpack {what} into {path}")]
    Io {
        /// The layer or file.
        what: String,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A manifest as resolved for one platform.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The reference, normalised.
    pub reference: String,
    /// The manifest's digest (the platform's, under an index).
    pub digest: Digest,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The index's digest, when the reference named one.
    pub index_digest: Option<Digest>,
}

impl Resolved {
    /// The manifest's annotations.
    pub fn annotations(&self) -> HashMap<String, String> {
        self.manifest.annotations().clone().unwrap_or_default()
    }

    /// Whether it is a pushed unikernel.
    pub fn is_unikernel(&self) -> bool {
        is_unikernel(&self.annotations())
    }

    /// Whether it is a pushed kernel.
    pub fn is_kernel(&self) -> bool {
        self.annotations().contains_key(KERNEL_ARTIFACT)
    }
}

/// A manifest on a registry, with the session that found it.
pub struct Remote {
    session: Session,
    reference: ImageRef,
    /// The manifest.
    pub resolved: Resolved,
}

impl Remote {
    /// The image config (a container image's), fetched through the cache.
    pub async fn config(&self, cache: &Cache) -> Result<serde_json::Value, FetchError> {
        let desc = self.resolved.manifest.config();
        let src = RegistrySource {
            session: &self.session,
            reference: &self.reference,
            cache: Some(cache),
            progress: None,
        };
        let what = format!("image config {}", desc.digest());
        let bytes = walk::document(&src, desc, walk::Kind::Config, &what)
            .await
            .map_err(|source| FetchError::Registry {
                reference: self.resolved.reference.clone(),
                source: Box::new(source),
            })?;
        serde_json::from_slice(&bytes).map_err(|e| FetchError::Invalid {
            reference: self.resolved.reference.clone(),
            why: format!("has an invalid config: {e}"),
        })
    }

    /// The unikernel file this manifest names, fetched and unpacked into the cache.
    pub async fn unikernel(
        &self,
        cache: &Cache,
        progress: &Progress,
    ) -> Result<PathBuf, FetchError> {
        unikernel(&self.session, &self.resolved, cache, progress).await
    }
}

/// The manifest `r` names for `platform`.
pub async fn resolve(
    r: &ImageRef,
    opts: &RegistryOptions,
    platform: &Platform,
) -> Result<Remote, FetchError> {
    let shown = r.to_string();
    let reg_err = |source| FetchError::Registry {
        reference: shown.clone(),
        source: Box::new(source),
    };
    let session = Session::connect(r, opts, &Tuning::default())
        .await
        .map_err(reg_err)?;
    if let Some(d) = r.digest() {
        d.parse::<Digest>().map_err(|e| FetchError::Invalid {
            reference: shown.clone(),
            why: format!("has an invalid digest: {e}"),
        })?;
    }
    let src = RegistrySource {
        session: &session,
        reference: r,
        cache: None,
        progress: None,
    };
    let selecting = async {
        let top = src.top().await?;
        walk::select(&src, top, platform).await
    };
    let selected = selecting.await.map_err(reg_err)?;
    let resolved = Resolved {
        reference: shown.clone(),
        digest: selected.digest,
        manifest: selected.manifest,
        index_digest: selected.index_digest,
    };
    Ok(Remote {
        session,
        reference: r.clone(),
        resolved,
    })
}

/// The one layer of a pushed artifact, fetched into the cache.
async fn only_layer(
    session: &Session,
    resolved: &Resolved,
    cache: &Cache,
    progress: &Progress,
) -> Result<(Descriptor, PathBuf), FetchError> {
    let invalid = |why: &str| FetchError::Invalid {
        reference: resolved.reference.clone(),
        why: why.to_string(),
    };
    let [layer] = resolved.manifest.layers().as_slice() else {
        return Err(invalid(
            "has more than one layer: it was not pushed by oci2uk",
        ));
    };
    let digest = layer.digest();
    let label = format!("{:.12}", digest.digest());
    let path = session
        .fetch_blob(
            cache,
            digest,
            layer.size(),
            &format!("layer {digest}"),
            Some((progress, &label)),
        )
        .await
        .map_err(|source| FetchError::Registry {
            reference: resolved.reference.clone(),
            source: Box::new(source),
        })?;
    Ok((layer.clone(), path))
}

/// A tar reader over a layer blob, decompressed by its media type.
fn layer_reader(desc: &Descriptor, path: &Path) -> io::Result<Box<dyn Read>> {
    let f = io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mt = desc.media_type().to_string();
    Ok(if mt.ends_with("+zstd") || mt.ends_with(".zstd") {
        Box::new(zstd::stream::read::Decoder::with_buffer(f)?)
    } else if mt.ends_with("+gzip") || mt.ends_with(".gzip") || mt.ends_with("tar.gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    })
}

/// A relative path of plain components only.
fn plain(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Unpacks the regular files and directories of a layer under `wanted` prefixes into a new
/// directory `dest` (made beside it, renamed into place when whole).
fn unpack(
    desc: &Descriptor,
    blob: &Path,
    wanted: &[&str],
    dest: &Path,
    cap: u64,
) -> Result<(), FetchError> {
    let what = format!("layer {}", desc.digest());
    let err = |path: &Path| {
        let what = what.clone();
        let path = path.to_path_buf();
        move |source| FetchError::Io {
            what: what.clone(),
            path: path.clone(),
            source,
        }
    };
    let parent = dest.parent().expect("a cache path");
    std::fs::create_dir_all(parent).map_err(err(parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .map_err(err(parent))?;
    let mut archive = tar::Archive::new(layer_reader(desc, blob).map_err(err(blob))?);
    let mut total = 0u64;
    for entry in archive.entries().map_err(err(blob))? {
        let mut entry = entry.map_err(err(blob))?;
        let name = entry.path().map_err(err(blob))?.into_owned();
        let Some(rel) = plain(&name) else {
            return Err(FetchError::Io {
                what: what.clone(),
                path: name.clone(),
                source: io::Error::new(io::ErrorKind::InvalidData, "a name leaving the layer"),
            });
        };
        if !wanted.iter().any(|w| rel.starts_with(w)) {
            continue;
        }
        let target = tmp.path().join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(err(&target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                total = total.saturating_add(entry.size());
                if total > cap {
                    return Err(FetchError::Io {
                        what: what.clone(),
                        path: rel,
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("the layer unpacks to more than {cap} bytes"),
                        ),
                    });
                }
                if let Some(p) = target.parent() {
                    std::fs::create_dir_all(p).map_err(err(p))?;
                }
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(err(&target))?;
                io::copy(&mut (&mut entry).take(cap), &mut out).map_err(err(&target))?;
            }
            // Links and devices have no place in an artifact: left out.
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(dest);
    let kept = tmp.keep();
    std::fs::rename(&kept, dest).map_err(err(dest))?;
    Ok(())
}

/// The unikernel file a resolved unikernel manifest names, fetched and unpacked into the
/// cache; returns its path.
async fn unikernel(
    session: &Session,
    resolved: &Resolved,
    cache: &Cache,
    progress: &Progress,
) -> Result<PathBuf, FetchError> {
    let ann = resolved.annotations();
    let invalid = |why: String| FetchError::Invalid {
        reference: resolved.reference.clone(),
        why,
    };
    let binary = ann.get(URUNC_BINARY).cloned().unwrap_or_default();
    let rel = plain(Path::new(binary.trim_start_matches('/')))
        .ok_or_else(|| invalid(format!("names an invalid kernel path {binary:?}")))?;
    let (desc, blob) = only_layer(session, resolved, cache, progress).await?;
    let dir = cache.unpacked_dir(crate::cache::Unpacked::Unikernel, desc.digest());
    let path = dir.join(&rel);
    if !path.is_file() {
        let (d, b, wanted, dest) = (desc.clone(), blob.clone(), rel.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            let w = wanted.to_string_lossy().into_owned();
            unpack(&d, &b, &[w.as_str()], &dest, u64::MAX)
        })
        .await
        .expect("unpacking does not panic")?;
    }
    if !path.is_file() {
        return Err(invalid(format!("has no file {binary} in its layer")));
    }
    if let Some(want) = ann.get(FILE_DIGEST) {
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || -> io::Result<String> {
            let mut h = Hasher::sha256();
            let mut f = std::fs::File::open(p)?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(h.finish().to_string())
        })
        .await
        .expect("hashing does not panic")
        .map_err(|source| FetchError::Io {
            what: binary.clone(),
            path: path.clone(),
            source,
        })?;
        if &got != want {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(invalid(format!(
                "holds a kernel file {got} that is not the {want} its annotation names"
            )));
        }
    }
    Ok(path)
}

/// A kernel pushed with `oci2uk kernel push`: its image and modules directory in the cache
/// (none for a kernel built without modules, whose layer has no `lib/modules`).
pub async fn kernel(
    r: &ImageRef,
    opts: &RegistryOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<(PathBuf, Option<PathBuf>), FetchError> {
    let Remote {
        session, resolved, ..
    } = resolve(r, opts, &Platform::host()).await?;
    let ann = resolved.annotations();
    let invalid = |why: String| FetchError::Invalid {
        reference: resolved.reference.clone(),
        why,
    };
    let (Some(image), Some(version)) = (ann.get(KERNEL_ARTIFACT), ann.get(KERNEL_VERSION)) else {
        return Err(invalid(
            "is not a kernel artifact (push one with `oci2uk kernel push`)".into(),
        ));
    };
    let image_rel = plain(Path::new(image))
        .ok_or_else(|| invalid(format!("names an invalid kernel path {image:?}")))?;
    let modules_rel = plain(&Path::new("lib/modules").join(version))
        .ok_or_else(|| invalid(format!("names an invalid kernel version {version:?}")))?;
    let (desc, blob) = only_layer(&session, &resolved, cache, progress).await?;
    let dir = cache.unpacked_dir(crate::cache::Unpacked::Kernel, desc.digest());
    let (kpath, mpath) = (dir.join(&image_rel), dir.join(&modules_rel));
    if !kpath.is_file() || !mpath.is_dir() {
        let (d, b, dest) = (desc.clone(), blob.clone(), dir.clone());
        let wanted = [
            image_rel.to_string_lossy().into_owned(),
            modules_rel.to_string_lossy().into_owned(),
        ];
        tokio::task::spawn_blocking(move || {
            let w: Vec<&str> = wanted.iter().map(String::as_str).collect();
            unpack(&d, &b, &w, &dest, MAX_KERNEL_UNPACKED)
        })
        .await
        .expect("unpacking does not panic")?;
    }
    if !kpath.is_file() {
        return Err(invalid(format!("has no {image} in its layer")));
    }
    if mpath.is_dir() {
        return Ok((kpath, Some(mpath)));
    }
    let modular = crate::kernel::Kernel::load(&kpath)
        .ok()
        .and_then(|k| k.has_modules().ok())
        .unwrap_or(true);
    if modular {
        return Err(invalid(format!(
            "has no modules for {version} in its layer"
        )));
    }
    Ok((kpath, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths() {
        assert_eq!(plain(Path::new("a/b")), Some(PathBuf::from("a/b")));
        assert_eq!(plain(Path::new("./a")), Some(PathBuf::from("a")));
        assert_eq!(plain(Path::new("../a")), None);
        assert_eq!(plain(Path::new("/a")), None);
        assert_eq!(plain(Path::new("a/../../b")), None);
        assert_eq!(plain(Path::new("")), None);
    }
}
