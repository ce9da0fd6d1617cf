//! The `build` command as a library call: a source and options in, an output file out.
//!
//! Resolves the image, flattens it and writes the requested format. The output is written to a
//! temporary file beside the destination and renamed into place only when complete, so a
//! failure never leaves a partial or stale-looking file behind.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use crate::cache::{Cache, Hasher};
use crate::flatten::{self, FlattenOptions};
use crate::image::{self, ResolveOptions};
use crate::output;
use crate::progress::Progress;
use crate::reference::Source;

/// Output formats of `build`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The baked single kernel file.
    Elf,
    /// The compressed initramfs alone.
    Initrd,
    /// The flattened image tree as a tar.
    Tar,
    /// A directory with kernel, initrd, command line and launch files.
    Bundle,
}

impl Format {
    /// The file extension of the default output name.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Elf => "elf",
            Self::Initrd => "initrd",
            Self::Tar => "tar",
            Self::Bundle => "bundle",
        }
    }
}

/// Where the output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A file, replaced atomically.
    Path(PathBuf),
    /// Standard output (`-o -`).
    Stdout,
}

/// A build request.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The image.
    pub source: Source,
    /// The format.
    pub format: Format,
    /// The output; `None` means `NAME.EXT` in the current directory.
    pub output: Option<Destination>,
    /// How to resolve the image.
    pub resolve: ResolveOptions,
    /// Flattening limits.
    pub flatten: FlattenOptions,
    /// `SOURCE_DATE_EPOCH`: mtimes later than this are clamped to it.
    pub source_date_epoch: Option<i64>,
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildOutcome {
    /// The output file (`-` for standard output).
    pub output: String,
    /// The output's format.
    pub format: &'static str,
    /// sha256 of the output's bytes.
    pub sha256: String,
    /// Size of the output in bytes.
    pub size: u64,
    /// The source image, normalised.
    pub source: String,
    /// The manifest digest of the source image.
    pub manifest_digest: String,
    /// The config digest of the source image.
    pub config_digest: String,
}

/// Errors of a build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Resolving the image failed.
    #[error("cannot get image {source_name}")]
    Image {
        /// The source as given.
        source_name: String,
        /// The cause.
        #[source]
        source: image::ImageError,
    },
    /// Flattening failed.
    #[error("cannot flatten image {source_name}")]
    Flatten {
        /// The source.
        source_name: String,
        /// The cause.
        #[source]
        source: flatten::FlattenError,
    },
    /// Writing the output failed.
    #[error("cannot write {path}")]
    Output {
        /// The output path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The cache could not be used.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// The format is not produced by this version.
    #[error("--format {0} is not available in this version of oci2uk; use --format tar")]
    FormatUnavailable(&'static str),
}

/// Runs a build.
pub async fn build(
    req: &BuildRequest,
    cache: &Cache,
    progress: &Progress,
) -> Result<BuildOutcome, BuildError> {
    if req.format != Format::Tar {
        return Err(BuildError::FormatUnavailable(req.format.extension()));
    }
    let source_name = req.source.to_string();
    let dest = match &req.output {
        Some(d) => d.clone(),
        None => Destination::Path(PathBuf::from(format!(
            "{}.{}",
            req.source.name(),
            req.format.extension()
        ))),
    };
    // Refuse an unusable destination before any download.
    let sink = Sink::open(&dest).map_err(|source| BuildError::Output {
        path: dest.display(),
        source,
    })?;

    let img = image::resolve(&req.source, &req.resolve, cache, progress)
        .await
        .map_err(|source| BuildError::Image {
            source_name: source_name.clone(),
            source,
        })?;

    let spool = tempfile::Builder::new()
        .prefix("spool-")
        .tempdir_in(cache.tmp_dir())
        .map_err(|source| BuildError::Output {
            path: cache.tmp_dir().display().to_string(),
            source,
        })?;
    let layers = img.layers.clone();
    let flatten_opts = req.flatten.clone();
    let spool_path = spool.path().to_path_buf();
    let progress2 = progress.clone();
    let sde = req.source_date_epoch;
    let dest_name = dest.display();
    let (sha256, size) = tokio::task::spawn_blocking(move || {
        let tree = flatten::flatten(&layers, &flatten_opts, &spool_path, &progress2).map_err(
            |source| BuildError::Flatten {
                source_name: source_name.clone(),
                source,
            },
        )?;
        let mut sink = sink;
        let _ = sde;
        output::tar::write_tar(&tree, &mut sink).map_err(|e| BuildError::Output {
            path: dest_name.clone(),
            source: io::Error::other(e),
        })?;
        sink.finish().map_err(|source| BuildError::Output {
            path: dest_name,
            source,
        })
    })
    .await
    .expect("the build task does not panic")?;
    drop(spool);

    Ok(BuildOutcome {
        output: dest.display(),
        format: req.format.extension(),
        sha256: sha256.digest().to_string(),
        size,
        source: img.source,
        manifest_digest: img.manifest_digest.to_string(),
        config_digest: img.config_digest.to_string(),
    })
}

impl Destination {
    fn display(&self) -> String {
        match self {
            Self::Path(p) => p.display().to_string(),
            Self::Stdout => "-".into(),
        }
    }
}

/// An output being written: a temporary file beside the destination (renamed into place by
/// [`Sink::finish`], removed if dropped) or standard output; hashes what passes through.
struct Sink {
    inner: SinkInner,
    hasher: Hasher,
    size: u64,
}

enum SinkInner {
    File {
        file: io::BufWriter<tempfile::NamedTempFile>,
        dest: PathBuf,
    },
    Stdout(io::BufWriter<io::Stdout>),
}

impl Sink {
    fn open(dest: &Destination) -> io::Result<Self> {
        let inner = match dest {
            Destination::Stdout => SinkInner::Stdout(io::BufWriter::new(io::stdout())),
            Destination::Path(p) => {
                if p.is_dir() {
                    return Err(io::Error::new(
                        io::ErrorKind::IsADirectory,
                        "it is a directory; name a file",
                    ));
                }
                let dir = match p.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let file = tempfile::Builder::new()
                    .prefix(".oci2uk-")
                    .tempfile_in(dir)?;
                SinkInner::File {
                    file: io::BufWriter::with_capacity(1 << 20, file),
                    dest: p.clone(),
                }
            }
        };
        Ok(Self {
            inner,
            hasher: Hasher::sha256(),
            size: 0,
        })
    }

    fn finish(self) -> io::Result<(Digest, u64)> {
        match self.inner {
            SinkInner::Stdout(mut w) => w.flush()?,
            SinkInner::File { file, dest } => {
                let tmp = file.into_inner().map_err(|e| e.into_error())?;
                tmp.as_file().sync_all()?;
                // Outputs are ordinary files: 0644 less the umask, not the 0600 of a temp file.
                set_default_mode(tmp.as_file())?;
                tmp.persist(&dest).map_err(|e| e.error)?;
            }
        }
        Ok((self.hasher.finish(), self.size))
    }
}

fn set_default_mode(f: &std::fs::File) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            SinkInner::File { file, .. } => file.write(buf)?,
            SinkInner::Stdout(w) => w.write(buf)?,
        };
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            SinkInner::File { file, .. } => file.flush(),
            SinkInner::Stdout(w) => w.flush(),
        }
    }
}

/// Parses a size with an optional binary suffix: `512`, `64K`, `512M`, `8G`, `1T` (`KiB`,
/// `MB` and lowercase forms too; all are powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number with an optional K/M/G/T suffix")
    })?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown suffix {suffix:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1gib").unwrap(), 1 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").unwrap_err().contains("suffix"));
        assert!(parse_size("99999999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn sink_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.tar");
        std::fs::write(&dest, b"old").unwrap();
        let mut s = Sink::open(&Destination::Path(dest.clone())).unwrap();
        s.write_all(b"new bytes").unwrap();
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"old",
            "not replaced before finish"
        );
        drop(s);
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"old",
            "an abandoned output changes nothing"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        let mut s = Sink::open(&Destination::Path(dest.clone())).unwrap();
        s.write_all(b"new bytes").unwrap();
        let (d, n) = s.finish().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new bytes");
        assert_eq!(n, 9);
        let mut h = Hasher::sha256();
        h.update(b"new bytes");
        assert_eq!(d, h.finish());
    }
}
