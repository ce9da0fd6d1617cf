//! The `build` command as a library call: a source and options in, an output file out.
//!
//! Resolves the image, flattens it and writes the requested format. The output is written to a
//! temporary file beside the destination and renamed into place only when complete, so a
//! failure never leaves a partial or stale-looking file behind.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::Digest;

use crate::cache::{BlobRecord, Cache, Kept};
use crate::flatten::{self, FlattenOptions, Tree};
use crate::image::{self, Image, Platform, ResolveOptions};
use crate::kernel::{self, Kernel};
use crate::output::sink::Sink;
use crate::progress::Progress;
use crate::reference::Source;
use crate::registry::RegistryOptions;
use crate::{bake, output, plan, rootfs};

mod bootable;
mod initramfs;
mod kernel_cache;
mod keys;

pub use crate::output::sink::Destination;
pub use bootable::{bootable, Bootable};

use initramfs::Initramfs;
use kernel_cache::{load_kernel, sniff_kernel, Loaded};

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

/// A build request.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The image.
    pub source: Source,
    /// The format.
    pub format: Format,
    /// The output; `None` means `NAME.EXT` in the current directory.
    pub output: Option<Destination>,
    /// Registry access.
    pub registry: RegistryOptions,
    /// `--max-size`: the largest total uncompressed size of the layers, which also caps each
    /// blob an archive may hold.
    pub max_size: u64,
    /// `SOURCE_DATE_EPOCH`: mtimes later than this are clamped to it.
    pub source_date_epoch: Option<i64>,
    /// `--platform`; without it, the kernel's architecture (or the host's for `tar`).
    pub platform: Option<Platform>,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--modules`.
    pub modules: Option<PathBuf>,
    /// The launch overrides (`--env`, `--entrypoint`, ...).
    pub overrides: plan::Overrides,
    /// What the guest's root is made of (`--rootfs`).
    pub rootfs: rootfs::Layout,
}

/// The default of `--max-size`: 8 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 8 << 30;

/// The command line baked into every file, before `oci2uk.memory=` is added: a serial console,
/// reboot on panic (with `-no-reboot`, QEMU exits), the tree unpacked into ramfs (no size cap),
/// the init at its private path, and a kernel that prints only emergencies (a panic, whose
/// report raises the level itself): `quiet` alone still lets errors through, such as
/// microvm's `PCI: Fatal: No config space access function found`. A `loglevel=` appended
/// at boot wins (`oci2uk run --debug` appends `loglevel=7`).
pub const BAKED_CMDLINE: &str =
    "console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet loglevel=1";

/// What [`BAKED_CMDLINE`]'s `rootfstype=` unpacks the initramfs into, which the guest memory
/// estimate depends on.
pub const BAKED_ROOTFS: rootfs::RootfsType = rootfs::RootfsType::Ramfs;

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
    /// The kernel file used, for the baked formats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Why that kernel: `flag` (`--kernel`), `env` (`$OCI2UK_KERNEL`), `built` (the oci2uk
    /// kernel `oci2uk kernel build` built) or `installed` (the newest installed kernel whose
    /// modules are present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_choice: Option<&'static str>,
    /// The kernel's release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_version: Option<String>,
    /// The guest memory the image needs, in MiB, for the baked formats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
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
        source: Box<image::ImageError>,
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
    /// The kernel cannot be used.
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    /// The modules the guest needs cannot be found or read.
    #[error("cannot collect the guest's kernel modules")]
    Modules(#[source] kernel::modules::ModulesError),
    /// The image cannot run as planned.
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// The initramfs cannot be written.
    #[error("cannot write the initramfs")]
    Rootfs(#[from] rootfs::RootfsError),
    /// The bake failed.
    #[error("cannot bake the kernel file")]
    Bake(#[from] bake::BakeError),
    /// The bundle could not be written.
    #[error(transparent)]
    Bundle(#[from] crate::bundle::BundleError),
    /// A pushed unikernel or its image cannot be fetched.
    #[error(transparent)]
    Fetch(#[from] crate::artifact::fetch::FetchError),
    /// A probe of the host failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
}

/// Runs a build.
pub async fn build(
    req: &BuildRequest,
    cache: &Cache,
    progress: &Progress,
) -> Result<BuildOutcome, BuildError> {
    let dest = destination(req);
    // The kernel decides the platform, and an unusable kernel or destination is better found
    // before any download.
    let mut loading = match req.format {
        Format::Tar => None,
        _ => Some(KernelLoad::start(req, cache)?),
    };
    let mut kernel = None;
    if req.platform.is_none() {
        if let Some(l) = loading.as_mut().filter(|l| l.sniffed.is_none()) {
            kernel = Some(l.wait().await?);
        }
    }
    let tsc_khz = match loading {
        Some(_) => crate::host::tsc_khz()?,
        None => 0,
    };
    let sink = open_sink(req.format, &dest)?;

    let machine = kernel
        .as_ref()
        .map(|l| l.kernel.machine)
        .or(loading.as_ref().and_then(|l| l.sniffed));
    let resolve = ResolveOptions {
        platform: platform(req.platform.as_ref(), machine),
        registry: req.registry.clone(),
        max_blob_size: Some(req.max_size),
    };
    let resolving = async {
        image::resolve(&req.source, &resolve, cache, progress)
            .await
            .map_err(|source| BuildError::Image {
                source_name: req.source.to_string(),
                source: Box::new(source),
            })
    };
    // A kernel that fails to load stops the download.
    let (chosen, img) = match loading {
        Some(mut l) if kernel.is_none() => {
            let (k, img) = tokio::try_join!(l.wait(), resolving)?;
            kernel = Some(k);
            (Some(l.chosen), img)
        }
        Some(l) => (Some(l.chosen), resolving.await?),
        None => (None, resolving.await?),
    };
    tracing::debug!(layers = img.layers.len(), "the image is resolved");

    let spool = tempfile::Builder::new()
        .prefix("spool-")
        .tempdir_in(cache.tmp_dir())
        .map_err(|source| BuildError::Output {
            path: cache.tmp_dir().display().to_string(),
            source,
        })?;
    let job = Job {
        req: req.clone(),
        img: img.clone(),
        kernel: kernel.as_ref().map(|l| Loaded {
            kernel: Arc::clone(&l.kernel),
            file_sha256: l.file_sha256.clone(),
        }),
        spool: spool.path().to_path_buf(),
        tmp: cache.tmp_dir(),
        cache: cache.clone(),
        tsc_khz,
        dest_name: dest.display(),
        progress: progress.clone(),
    };
    let written = tokio::task::spawn_blocking(move || job.run(sink))
        .await
        .expect("the build task does not panic")?;
    drop(spool);

    Ok(BuildOutcome {
        output: dest.display(),
        format: req.format.extension(),
        sha256: written.digest.digest().to_string(),
        size: written.size,
        source: img.source,
        manifest_digest: img.manifest_digest.to_string(),
        config_digest: img.config_digest.to_string(),
        kernel: chosen.as_ref().map(|c| c.path.display().to_string()),
        kernel_choice: chosen.as_ref().map(|c| match c.choice {
            kernel::Choice::Flag => "flag",
            kernel::Choice::Env => "env",
            kernel::Choice::Built => "built",
            kernel::Choice::Installed => "installed",
        }),
        kernel_version: kernel.as_ref().map(|l| l.kernel.version.clone()),
        memory_mib: written.memory_mib,
    })
}

/// Where the output goes: `-o`, else `NAME.EXT` in the current directory.
fn destination(req: &BuildRequest) -> Destination {
    match &req.output {
        Some(d) => d.clone(),
        None => Destination::Path(PathBuf::from(format!(
            "{}.{}",
            req.source.name(),
            req.format.extension()
        ))),
    }
}

/// The platform to pick from an image index: `--platform`, else the kernel's architecture,
/// else the host's.
fn platform(flag: Option<&Platform>, machine: Option<kernel::Machine>) -> Platform {
    match (flag, machine) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => Platform {
            os: "linux".into(),
            architecture: m.oci_arch().into(),
            variant: None,
        },
        (None, None) => Platform::host(),
    }
}

/// The output file, opened before any work. A bundle is a directory, written whole by the
/// bundle stage; the other formats stream into one file.
fn open_sink(format: Format, dest: &Destination) -> Result<Option<Sink>, BuildError> {
    if format != Format::Bundle {
        let sink = Sink::open(dest).map_err(|source| BuildError::Output {
            path: dest.display(),
            source,
        })?;
        return Ok(Some(sink));
    }
    if *dest == Destination::Stdout {
        return Err(BuildError::Output {
            path: "-".into(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bundle is a directory and cannot go to standard output",
            ),
        });
    }
    Ok(None)
}

/// The kernel being loaded (a bzImage's vmlinux decompressed, or read from the cache) on a
/// blocking task while the image is resolved; its first bytes tell the platform at once.
struct KernelLoad {
    chosen: kernel::Chosen,
    sniffed: Option<kernel::Machine>,
    task: Option<tokio::task::JoinHandle<Result<Loaded<Arc<Kernel>>, kernel::KernelError>>>,
}

impl KernelLoad {
    fn start(req: &BuildRequest, cache: &Cache) -> Result<Self, BuildError> {
        let chosen = kernel::discover_in(req.kernel.as_deref(), Some(cache.root()))?;
        let sniffed = sniff_kernel(&chosen.path);
        let path = chosen.path.clone();
        let cache = cache.clone();
        let format = req.format;
        let task = tokio::task::spawn_blocking(move || {
            let Loaded {
                kernel: k,
                file_sha256,
            } = load_kernel(&path, &cache)?;
            // The build needs the vmlinux alone; the file's bytes are kept only as their
            // digest, for the initramfs key.
            let k = k.without_image();
            if format == Format::Elf {
                k.pvh_entry()?;
            }
            tracing::debug!(kernel = %path.display(), "the kernel is loaded");
            // One copy of the kernel (its vmlinux is tens of MiB), shared with the
            // build task.
            Ok(Loaded {
                kernel: Arc::new(k),
                file_sha256,
            })
        });
        Ok(Self {
            chosen,
            sniffed,
            task: Some(task),
        })
    }

    /// The loaded kernel; waited for once.
    async fn wait(&mut self) -> Result<Loaded<Arc<Kernel>>, BuildError> {
        let task = self.task.take().expect("the kernel is waited for once");
        let loaded = task.await.expect("loading the kernel does not panic")?;
        if let Some(m) = self.sniffed {
            debug_assert_eq!(
                loaded.kernel.machine, m,
                "the sniffed machine is the parsed one"
            );
        }
        Ok(loaded)
    }
}

/// What the blocking part of a build wrote.
struct Written {
    /// sha256 of the output (of the baked file inside, for a bundle).
    digest: Digest,
    size: u64,
    /// The guest memory the image needs, in MiB, for the baked formats.
    memory_mib: Option<u64>,
}

/// The blocking part of a build: flatten, then write the format.
struct Job {
    req: BuildRequest,
    img: Image,
    kernel: Option<Loaded<Arc<Kernel>>>,
    spool: PathBuf,
    tmp: PathBuf,
    cache: Cache,
    /// The TSC frequency to bake, in kHz.
    tsc_khz: u64,
    dest_name: String,
    progress: Progress,
}

impl Job {
    fn run(self, sink: Option<Sink>) -> Result<Written, BuildError> {
        let Some(kernel) = self.kernel.as_ref().map(|l| Arc::clone(&l.kernel)) else {
            return self.tar(sink.expect("a tar has a sink"));
        };
        let initramfs = self.initramfs(&kernel)?;
        match sink {
            None => self.bundle(&kernel, &initramfs),
            Some(sink) if self.req.format == Format::Initrd => self.initrd(sink, &initramfs),
            Some(sink) => self.elf(sink, &kernel, &initramfs),
        }
    }

    fn out_err(&self, source: io::Error) -> BuildError {
        BuildError::Output {
            path: self.dest_name.clone(),
            source,
        }
    }

    fn tmp_err(&self, source: io::Error) -> BuildError {
        BuildError::Output {
            path: self.tmp.display().to_string(),
            source,
        }
    }

    fn tar(&self, mut sink: Sink) -> Result<Written, BuildError> {
        let tree = self.flatten()?;
        tracing::debug!("flattened");
        let opts = output::tar::TarOptions {
            source_date_epoch: self.req.source_date_epoch,
        };
        output::tar::write_tar_with(&tree, &mut sink, &opts)
            .map_err(|e| self.out_err(io::Error::other(e)))?;
        let (digest, size) = sink.finish().map_err(|e| self.out_err(e))?;
        tracing::debug!(size, "the tar is written");
        Ok(Written {
            digest,
            size,
            memory_mib: None,
        })
    }

    /// The output is the cached blob itself, whose digest is known.
    fn initrd(&self, sink: Sink, initramfs: &Initramfs) -> Result<Written, BuildError> {
        let digest = initramfs.digest.parse().map_err(|_| {
            self.out_err(io::Error::other(format!(
                "the initramfs record holds an invalid digest {:?}",
                initramfs.digest
            )))
        })?;
        let (digest, size) = sink
            .copy_from(&initramfs.path, digest)
            .map_err(|e| self.out_err(e))?;
        Ok(Written {
            digest,
            size,
            memory_mib: Some(initramfs.memory_mib),
        })
    }

    fn elf(
        &self,
        mut sink: Sink,
        kernel: &Kernel,
        initramfs: &Initramfs,
    ) -> Result<Written, BuildError> {
        let memory_mib = Some(initramfs.memory_mib);
        let cmdline = baked_cmdline(initramfs.memory_mib, self.tsc_khz);
        // A baked file is kept in the cache too, under the initramfs key and the command
        // line: a warm rebuild copies it instead of baking and hashing tens of MiB again.
        let key = initramfs
            .key
            .as_ref()
            .map(|key| keys::baked_key(key, &cmdline));
        if let Some((digest, path)) = key.as_ref().and_then(|k| self.cache.kept(Kept::Baked, k)) {
            tracing::debug!(%digest, "the baked file is in the cache");
            let (digest, size) = sink.copy_from(&path, digest).map_err(|e| self.out_err(e))?;
            return Ok(Written {
                digest,
                size,
                memory_mib,
            });
        }
        let file = std::fs::File::open(&initramfs.path).map_err(|source| BuildError::Output {
            path: initramfs.path.display().to_string(),
            source,
        })?;
        let reader = io::BufReader::with_capacity(1 << 20, file);
        match initramfs.in_place {
            Some(span) => {
                bake::bake_in_place(kernel, reader, initramfs.len, span, &cmdline, &mut sink)?
            }
            None => bake::bake(kernel, reader, initramfs.len, &cmdline, &mut sink)?,
        };
        let dest = sink.dest_path();
        let (digest, size) = sink.finish().map_err(|e| self.out_err(e))?;
        if let (Some(key), Some(dest)) = (key, dest) {
            // A file that cannot be kept costs the next build a bake, nothing more.
            let kept = self
                .cache
                .put_file(&dest, &digest)
                .map_err(|e| e.to_string());
            let record = BlobRecord {
                digest: digest.clone(),
                size,
            };
            let kept = kept.and_then(|_| {
                self.cache
                    .keep(Kept::Baked, &key, &record)
                    .map_err(|e| e.to_string())
            });
            if let Err(error) = kept {
                tracing::debug!(%error, "cannot keep the baked file in the cache");
            }
        }
        Ok(Written {
            digest,
            size,
            memory_mib,
        })
    }

    fn flatten(&self) -> Result<Tree, BuildError> {
        flatten::flatten(
            &self.img.layers,
            &FlattenOptions {
                max_size: self.req.max_size,
            },
            &self.spool,
            &self.progress,
        )
        .map_err(|source| BuildError::Flatten {
            source_name: self.req.source.to_string(),
            source,
        })
    }

    /// Writes the bundle directory: vmlinux, initrd, the baked file, command line and launch
    /// files. Its digest and size are those of the baked file inside.
    fn bundle(&self, kernel: &Kernel, initramfs: &Initramfs) -> Result<Written, BuildError> {
        // The baked file goes through a sink, as a single output does, which hashes it.
        let elf_dir = tempfile::tempdir_in(&self.tmp).map_err(|e| self.tmp_err(e))?;
        let elf = elf_dir.path().join("baked.elf");
        let mut sink = Sink::open(&Destination::Path(elf.clone())).map_err(|e| self.tmp_err(e))?;
        let cmdline = baked_cmdline(initramfs.memory_mib, self.tsc_khz);
        let file = std::fs::File::open(&initramfs.path).map_err(|e| self.tmp_err(e))?;
        let src = io::BufReader::with_capacity(1 << 20, file);
        bake::bake(kernel, src, initramfs.len, &cmdline, &mut sink)?;
        let (digest, size) = sink.finish().map_err(|e| self.tmp_err(e))?;
        let ports = self
            .img
            .config
            .config()
            .as_ref()
            .and_then(|c| c.exposed_ports().clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect();
        let parts = crate::bundle::BundleParts {
            name: self.req.source.name(),
            vmlinux: crate::bundle::Blob::Bytes(kernel.vmlinux()?),
            initrd: crate::bundle::Blob::File(&initramfs.path),
            elf: Some(crate::bundle::Blob::File(&elf)),
            cmdline,
            memory_mib: initramfs.memory_mib,
            vcpus: 1,
            ports,
        };
        crate::bundle::write_bundle(Path::new(&self.dest_name), &parts)?;
        Ok(Written {
            digest,
            size,
            memory_mib: Some(initramfs.memory_mib),
        })
    }
}

/// The baked command line: [`BAKED_CMDLINE`], the TSC frequency, and the memory record.
fn baked_cmdline(memory_mib: u64, tsc_khz: u64) -> String {
    format!(
        "{BAKED_CMDLINE} tsc_early_khz={tsc_khz} {}",
        oci2uk_config::guest::memory_param(memory_mib)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baked_rootfs_is_the_command_lines() {
        assert_eq!(
            rootfs::RootfsType::from_cmdline(BAKED_CMDLINE),
            BAKED_ROOTFS
        );
    }
}
