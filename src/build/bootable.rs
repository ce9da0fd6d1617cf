//! What `run` boots when it is given an image rather than a file: a pushed unikernel fetched
//! into the cache, or the image built with the default kernel and kept in the cache by
//! manifest digest and kernel, so that the next run boots at once.

use std::io;
use std::path::{Path, PathBuf};

use crate::artifact::fetch;
use crate::cache::{Cache, Hasher};
use crate::image::Platform;
use crate::kernel::{self, KernelError};
use crate::progress::Progress;
use crate::reference::Source;
use crate::registry::RegistryOptions;

use super::{build, BuildError, BuildRequest, Destination, Format, DEFAULT_MAX_SIZE};

/// A baked file to boot. A build that is not kept (from an archive or a layout) lives in a
/// temporary directory that goes when this does.
#[derive(Debug)]
pub struct Bootable {
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Bootable {
    /// A file given as it is.
    pub fn file(path: PathBuf) -> Self {
        Self { path, _dir: None }
    }

    /// The baked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The baked file for the image `source`: a pushed unikernel as it is, else the image built
/// (`--format elf`, the default kernel, no overrides).
pub async fn bootable(
    source: Source,
    registry: &RegistryOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<Bootable, BuildError> {
    let chosen = kernel::discover_in(None, Some(cache.root()))?;
    let request = |source: Source, out: PathBuf| BuildRequest {
        source,
        format: Format::Elf,
        output: Some(Destination::Path(out)),
        registry: registry.clone(),
        max_size: DEFAULT_MAX_SIZE,
        source_date_epoch: None,
        platform: None,
        kernel: Some(chosen.path.clone()),
        modules: None,
        overrides: Default::default(),
        rootfs: Default::default(),
    };
    let Source::Registry(r) = source else {
        let tmp_err = |source| BuildError::Output {
            path: cache.tmp_dir().display().to_string(),
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(cache.tmp_dir())
            .map_err(tmp_err)?;
        let out = dir.path().join(format!("{}.elf", source.name()));
        build(&request(source, out.clone()), cache, progress).await?;
        return Ok(Bootable {
            path: out,
            _dir: Some(dir),
        });
    };
    let platform = Platform {
        variant: None,
        ..Platform::host()
    };
    let remote = fetch::resolve(&r, registry, &platform).await?;
    if remote.resolved.is_unikernel() {
        return Ok(Bootable::file(remote.unikernel(cache, progress).await?));
    }
    let key = build_key(&remote.resolved.digest, &chosen.path)?;
    let out = cache
        .build_path(&key)
        .map_err(|source| BuildError::Output {
            path: cache.root().display().to_string(),
            source,
        })?;
    if out.is_file() {
        tracing::info!(path = %out.display(), "built before");
        return Ok(Bootable::file(out));
    }
    let pinned = Source::Registry(r.with_digest(remote.resolved.digest.as_ref()));
    let outcome = build(&request(pinned, out.clone()), cache, progress).await?;
    // The source is pinned by its manifest digest already.
    eprintln!(
        "oci2uk: built {} with kernel {}",
        outcome.source,
        chosen.path.display()
    );
    Ok(Bootable::file(out))
}

/// The key a run's build is kept under: the oci2uk version, the manifest digest and the
/// kernel file (its path, size and modification time).
fn build_key(manifest: &impl std::fmt::Display, kernel: &Path) -> Result<String, BuildError> {
    let meta = std::fs::metadata(kernel).map_err(|source: io::Error| KernelError::Read {
        path: kernel.to_path_buf(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Hasher::sha256();
    h.update(
        format!(
            "oci2uk {}\n{manifest}\n{}\n{}\n{mtime}\n",
            env!("CARGO_PKG_VERSION"),
            kernel.display(),
            meta.len()
        )
        .as_bytes(),
    );
    Ok(h.finish().digest().to_string())
}
