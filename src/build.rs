//! The `build` command as a library call: a source and options in, an output file out.
//!
//! Resolves the image, flattens it and writes the requested format. The output is written to a
//! temporary file beside the destination and renamed into place only when complete, so a
//! failure never leaves a partial or stale-looking file behind.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_spec::image::Digest;

use crate::cache::{Cache, Hasher, RootfsEntry};
use crate::flatten::{self, FlattenOptions, Tree};
use crate::image::{self, Image, Platform, ResolveOptions};
use crate::kernel::{self, Kernel};
use crate::progress::Progress;
use crate::reference::Source;
use crate::{bake, output, plan, rootfs};

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

/// The modules the init loads, by name; their dependencies come along from `modules.dep`.
/// Debian's cloud kernel builds virtio as modules: `virtio_pci` for PCI machines (q35),
/// `virtio_mmio` for microvm and Firecracker, `virtio_net` for the network.
/// `button` and `evdev` let the init hear an ACPI power button (a hypervisor's shutdown
/// request).
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "virtio_mmio", "virtio_net", "button", "evdev"];

/// The command line baked into every file, before `oci2uk.memory=` is added: a serial console,
/// reboot on panic (with `-no-reboot`, QEMU exits), the tree unpacked into ramfs (no size cap),
/// and the init at its private path.
pub const BAKED_CMDLINE: &str =
    "console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet";

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
    /// The kernel used, for the baked formats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
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
    /// `$OCI2UK_TSC_KHZ` is not a frequency.
    #[error(
        "invalid OCI2UK_TSC_KHZ {0:?}: expected the TSC frequency in kHz (100000 to 100000000)"
    )]
    TscKhz(String),
}

/// Runs a build.
pub async fn build(
    req: &BuildRequest,
    cache: &Cache,
    progress: &Progress,
) -> Result<BuildOutcome, BuildError> {
    let source_name = req.source.to_string();
    let dest = match &req.output {
        Some(d) => d.clone(),
        None => Destination::Path(PathBuf::from(format!(
            "{}.{}",
            req.source.name(),
            req.format.extension()
        ))),
    };
    if req.format != Format::Tar {
        rootfs::check_layout(req.rootfs)?;
    }
    // The kernel decides the platform, and an unusable kernel or destination is better found
    // before any download. The kernel loads (a bzImage's vmlinux decompressed, or read from
    // the cache) while the image is resolved: its first bytes tell the platform.
    let (chosen, mut loading, sniffed) = match req.format {
        Format::Tar => (None, None, None),
        _ => {
            let chosen = kernel::discover(req.kernel.as_deref())?;
            let sniffed = sniff_kernel(&chosen.path);
            let path = chosen.path.clone();
            let cache = cache.clone();
            let format = req.format;
            let task = tokio::task::spawn_blocking(move || {
                let (mut k, digest) = load_kernel(&path, &cache)?;
                // The build needs the vmlinux alone; the file's bytes (14 MiB for Debian's
                // LZ4 bzImage) are kept only as their digest, for the initramfs key.
                k.image = Vec::new();
                if format == Format::Elf {
                    k.pvh_entry()?;
                }
                tracing::debug!(kernel = %path.display(), "the kernel is loaded");
                // One copy of the kernel (its vmlinux is tens of MiB), shared with the
                // build task.
                Ok::<_, kernel::KernelError>((Arc::new(k), digest))
            });
            (Some(chosen), Some(task), sniffed)
        }
    };
    let mut kernel = None;
    if req.platform.is_none() && sniffed.is_none() {
        if let Some(task) = loading.take() {
            kernel = Some(loaded(task).await?);
        }
    }
    let tsc_khz = match chosen {
        Some(_) => tsc_khz()?,
        None => 0,
    };
    // A bundle is a directory, written whole by the bundle stage; the other formats stream
    // into one file.
    let sink = match req.format {
        Format::Bundle => {
            if dest == Destination::Stdout {
                return Err(BuildError::Output {
                    path: "-".into(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a bundle is a directory and cannot go to standard output",
                    ),
                });
            }
            None
        }
        _ => Some(Sink::open(&dest).map_err(|source| BuildError::Output {
            path: dest.display(),
            source,
        })?),
    };

    let mut resolve = req.resolve.clone();
    let machine = kernel
        .as_ref()
        .map(|(k, _): &(Arc<Kernel>, _)| k.machine)
        .or(sniffed);
    resolve.platform = match (&req.platform, machine) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => Platform {
            os: "linux".into(),
            architecture: m.oci_arch().into(),
            variant: None,
        },
        (None, None) => Platform::host(),
    };
    let resolving = async {
        image::resolve(&req.source, &resolve, cache, progress)
            .await
            .map_err(|source| BuildError::Image {
                source_name: source_name.clone(),
                source: Box::new(source),
            })
    };
    // A kernel that fails to load stops the download.
    let img = match loading {
        Some(task) => {
            let (k, img) = tokio::try_join!(loaded(task), resolving)?;
            kernel = Some(k);
            img
        }
        None => resolving.await?,
    };
    if let (Some((k, _)), Some(m)) = (&kernel, sniffed) {
        debug_assert_eq!(k.machine, m, "the sniffed machine is the parsed one");
    }
    let kernel = chosen.zip(kernel).map(|(c, (k, d))| (c, k, d));
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
        kernel: kernel.as_ref().map(|(_, k, d)| (Arc::clone(k), d.clone())),
        spool: spool.path().to_path_buf(),
        tmp: cache.tmp_dir(),
        cache: cache.clone(),
        tsc_khz,
        dest_name: dest.display(),
        progress: progress.clone(),
    };
    let (sha256, size, memory_mib) = tokio::task::spawn_blocking(move || job.run(sink))
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
        kernel: kernel.as_ref().map(|(c, _, _)| c.to_string()),
        kernel_version: kernel.as_ref().map(|(_, k, _)| k.version.clone()),
        memory_mib,
    })
}

/// The blocking part of a build: flatten, then write the format.
struct Job {
    req: BuildRequest,
    img: Image,
    /// The kernel, and the sha256 of its file.
    kernel: Option<(Arc<Kernel>, String)>,
    spool: PathBuf,
    tmp: PathBuf,
    cache: Cache,
    /// The TSC frequency to bake, in kHz.
    tsc_khz: u64,
    dest_name: String,
    progress: Progress,
}

/// An initramfs ready to bake: a verified blob of the cache, its digest and length, the guest
/// memory the image needs, and the key it is kept under (none when the build cannot be keyed).
struct Initramfs {
    path: PathBuf,
    digest: String,
    len: u64,
    memory_mib: u64,
    key: Option<String>,
}

impl Job {
    fn run(self, sink: Option<Sink>) -> Result<(Digest, u64, Option<u64>), BuildError> {
        let out_err = |source: io::Error| BuildError::Output {
            path: self.dest_name.clone(),
            source,
        };
        let Some((kernel, _)) = self.kernel.clone() else {
            let mut sink = sink.expect("a tar has a sink");
            let tree = self.flatten()?;
            tracing::debug!("flattened");
            let opts = output::tar::TarOptions {
                source_date_epoch: self.req.source_date_epoch,
            };
            output::tar::write_tar_with(&tree, &mut sink, &opts)
                .map_err(|e| out_err(io::Error::other(e)))?;
            let (digest, size) = sink.finish().map_err(out_err)?;
            tracing::debug!(size, "the tar is written");
            return Ok((digest, size, None));
        };
        let initramfs = self.initramfs(&kernel)?;
        let Some(mut sink) = sink else {
            return self.bundle(&kernel, &initramfs);
        };
        let memory = Some(initramfs.memory_mib);
        if self.req.format == Format::Initrd {
            // The output is the cached blob itself, whose digest is known.
            let digest = initramfs.digest.parse().map_err(|_| {
                out_err(io::Error::other(format!(
                    "the initramfs record holds an invalid digest {:?}",
                    initramfs.digest
                )))
            })?;
            let (digest, size) = sink.copy_from(&initramfs.path, digest).map_err(out_err)?;
            return Ok((digest, size, memory));
        }
        let cmdline = baked_cmdline(initramfs.memory_mib, self.tsc_khz);
        // A baked file is kept in the cache too, under the initramfs key and the command
        // line: a warm rebuild copies it instead of baking and hashing tens of MiB again.
        let record = initramfs.key.as_ref().map(|key| {
            let id = sha256_hex(format!("oci2uk baked file 1\n{key}\n{cmdline}\n").as_bytes());
            self.cache.root().join("baked").join(id)
        });
        if let Some((digest, path)) = record.as_deref().and_then(|r| cached_blob(&self.cache, r)) {
            tracing::debug!(%digest, "the baked file is in the cache");
            let (digest, size) = sink.copy_from(&path, digest).map_err(out_err)?;
            return Ok((digest, size, memory));
        }
        let file = std::fs::File::open(&initramfs.path).map_err(|source| BuildError::Output {
            path: initramfs.path.display().to_string(),
            source,
        })?;
        let reader = io::BufReader::with_capacity(1 << 20, file);
        bake::bake(&kernel, reader, initramfs.len, &cmdline, &mut sink)?;
        let dest = sink.dest_path();
        let (digest, size) = sink.finish().map_err(out_err)?;
        if let (Some(record), Some(dest)) = (record, dest) {
            // A file that cannot be kept costs the next build a bake, nothing more.
            let kept = self
                .cache
                .put_file(&dest, &digest)
                .map_err(|e| e.to_string());
            let kept = kept.and_then(|_| {
                self.cache
                    .put_record(&record, &format!("{digest} {size}"))
                    .map_err(|e| e.to_string())
            });
            if let Err(error) = kept {
                tracing::debug!(%error, "cannot keep the baked file in the cache");
            }
        }
        Ok((digest, size, memory))
    }

    fn flatten(&self) -> Result<Tree, BuildError> {
        flatten::flatten(
            &self.img.layers,
            &self.req.flatten,
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
    fn bundle(
        &self,
        kernel: &Kernel,
        initramfs: &Initramfs,
    ) -> Result<(Digest, u64, Option<u64>), BuildError> {
        let tmp_err = |source: io::Error| BuildError::Output {
            path: self.tmp.display().to_string(),
            source,
        };
        // The baked file goes through a sink, as a single output does, which hashes it.
        let elf_dir = tempfile::tempdir_in(&self.tmp).map_err(tmp_err)?;
        let elf = elf_dir.path().join("baked.elf");
        let mut sink = Sink::open(&Destination::Path(elf.clone())).map_err(tmp_err)?;
        let cmdline = baked_cmdline(initramfs.memory_mib, self.tsc_khz);
        let file = std::fs::File::open(&initramfs.path).map_err(tmp_err)?;
        let src = io::BufReader::with_capacity(1 << 20, file);
        bake::bake(kernel, src, initramfs.len, &cmdline, &mut sink)?;
        let (digest, size) = sink.finish().map_err(tmp_err)?;
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
        Ok((digest, size, Some(initramfs.memory_mib)))
    }

    /// The initramfs of this image, kernel and options: from the cache when an earlier build
    /// made it (no flattening then), else flattened, planned, written into the cache and
    /// recorded under its key.
    fn initramfs(&self, kernel: &Kernel) -> Result<Initramfs, BuildError> {
        let modules = kernel.modules(self.req.modules.as_deref())?;
        let wanted: Vec<&str> = GUEST_MODULES
            .iter()
            .chain(self.req.rootfs.modules())
            .copied()
            .collect();
        let needed = modules.closure(&wanted).map_err(BuildError::Modules)?;
        let mut extras = vec![rootfs::Extra::init(crate::init_blob::INIT.to_vec())];
        let mut module_paths = Vec::new();
        for m in &needed {
            let ko = modules.read(m).map_err(BuildError::Modules)?;
            extras.push(rootfs::Extra::module(&m.name, ko));
            module_paths.push(rootfs::module_path(&m.name));
        }
        let opts = rootfs::RootfsOptions {
            codec: rootfs::Codec::for_kernel(kernel.config()?.as_ref()),
            level: None,
            source_date_epoch: self.req.source_date_epoch,
        };
        let key = self.rootfs_key(kernel, &extras, &opts);
        if let Some(key) = &key {
            if let Some((entry, path)) = self.cache.get_rootfs(key)? {
                tracing::debug!(%key, initramfs = %entry.initramfs, "the initramfs is in the cache");
                return Ok(Initramfs {
                    path,
                    digest: entry.initramfs,
                    len: entry.size,
                    memory_mib: entry.memory_mib,
                    key: Some(key.clone()),
                });
            }
        }

        let tree = self.flatten()?;
        tracing::debug!("flattened");
        let target = plan::Target {
            machine: kernel.machine,
            name: self.req.source.name(),
        };
        let mut config = plan::plan(&self.img, &tree, &self.req.overrides, &target)?;
        config.oci2uk.modules.extend(module_paths);
        config.oci2uk.kernel = Some(kernel.version.clone());
        extras.push(rootfs::Extra::config(config.to_json().into_bytes()));

        // Written beside the blobs (same filesystem), then moved into the cache under its
        // digest: the bake must know the length before it writes, and a later build with the
        // same key starts from here.
        let tmp_err = |source: io::Error| BuildError::Output {
            path: self.tmp.display().to_string(),
            source,
        };
        let mut file = tempfile::NamedTempFile::new_in(&self.tmp).map_err(tmp_err)?;
        let mut hashed = HashingWriter {
            inner: file.as_file_mut(),
            hasher: Hasher::sha256(),
        };
        let squash = rootfs::SquashfsOptions {
            source_date_epoch: self.req.source_date_epoch,
            ..Default::default()
        };
        let stats = rootfs::write_layout(
            self.req.rootfs,
            &tree,
            &extras,
            &opts,
            &squash,
            &self.tmp,
            &mut hashed,
        )?;
        let digest = hashed.hasher.finish();
        tracing::debug!(size = stats.compressed_size, "the initramfs is written");
        drop(tree);
        let memory_mib =
            rootfs::memory_needed(&stats, rootfs::RootfsType::from_cmdline(BAKED_CMDLINE));
        // A bundle copies this file as its initrd: an ordinary file, not a temporary's 0600.
        set_default_mode(file.as_file()).map_err(tmp_err)?;
        let entry = RootfsEntry {
            initramfs: digest.to_string(),
            size: stats.compressed_size,
            memory_mib,
        };
        let path = self
            .cache
            .put_rootfs(key.as_deref(), file, &digest, &entry)?;
        Ok(Initramfs {
            path,
            digest: digest.to_string(),
            len: stats.compressed_size,
            memory_mib,
            key,
        })
    }

    /// The key of the initramfs in the cache: a digest of everything its bytes depend on
    /// besides the layers' contents, which the manifest digest pins. That is the image
    /// (manifest, config and layer digests) and its name (the default host name), the kernel
    /// file, the init and the modules (by their bytes), the codec, `SOURCE_DATE_EPOCH`, the
    /// size cap, every launch override (with the host's values of `--env K` resolved as the
    /// plan resolves them), and the oci2uk binary itself, so that a changed planner or
    /// writer never reuses an older initramfs. None when the binary cannot be read (no
    /// caching then).
    fn rootfs_key(
        &self,
        kernel: &Kernel,
        extras: &[rootfs::Extra],
        opts: &rootfs::RootfsOptions,
    ) -> Option<String> {
        let exe = exe_digest(&self.cache)?;
        let mut k = String::from("oci2uk initramfs key 1\n");
        let mut line = |name: &str, value: &dyn std::fmt::Debug| {
            k.push_str(&format!("{name} {value:?}\n"));
        };
        line("exe", &exe);
        line("manifest", &self.img.manifest_digest.to_string());
        line("config", &self.img.config_digest.to_string());
        for l in &self.img.layers {
            line("layer", &(l.digest.to_string(), l.diff_id.to_string()));
        }
        line("name", &self.req.source.name());
        line("kernel", &self.kernel.as_ref().map(|(_, d)| d));
        line("kernel-version", &kernel.version);
        line("machine", &kernel.machine);
        for x in extras {
            let kind = match &x.kind {
                rootfs::ExtraKind::File(data) => format!("file {}", sha256_hex(data)),
                other => format!("{other:?}"),
            };
            line("extra", &(&x.path, x.mode, x.uid, x.gid, kind));
        }
        line("codec", &(opts.codec, opts.level));
        line("rootfs", &self.req.rootfs);
        line("source-date-epoch", &opts.source_date_epoch);
        line("max-size", &self.req.flatten.max_size);
        line("cmdline", &BAKED_CMDLINE);
        let o = &self.req.overrides;
        for e in &o.env {
            match e.split_once('=') {
                Some(_) => line("env", e),
                None => line("env-host", &(e, std::env::var_os(e))),
            }
        }
        line("entrypoint", &o.entrypoint);
        line("cmd", &o.cmd);
        line("workdir", &o.workdir);
        line("user", &o.user);
        line("net", &o.net);
        line("hostname", &o.hostname);
        Some(sha256_hex(k.as_bytes()))
    }
}

/// Hashes what passes through to a writer.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Hasher::sha256();
    h.update(data);
    h.finish().digest().to_string()
}

/// sha256 of the running binary, computed once: part of every initramfs key.
fn exe_digest(cache: &Cache) -> Option<String> {
    static EXE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let path = std::env::current_exe().ok()?;
        let file = std::fs::File::open(&path).ok()?;
        let meta = file.metadata().ok()?;
        recorded_digest(cache, &path, &meta, || {
            let like: Digest =
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                    .parse()
                    .expect("a valid digest");
            let (d, _) = crate::cache::digest_reader(io::BufReader::new(file), &like).ok()?;
            Some(d.digest().to_string())
        })
    })
    .clone()
}

/// The sha256 (hex) of the file at `path` whose metadata is `meta`, from a record kept under
/// the file's identity and change times, as git's index keeps a file's; `compute` hashes it
/// when there is no record yet. Hashing the binary or the kernel (tens of MiB) would be much
/// of a warm rebuild.
fn recorded_digest(
    cache: &Cache,
    path: &Path,
    meta: &std::fs::Metadata,
    compute: impl FnOnce() -> Option<String>,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let stamp = format!(
        "{} {} {} {} {}.{} {}.{}",
        path.display(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    let record = cache
        .root()
        .join("digests")
        .join(sha256_hex(stamp.as_bytes()));
    if let Ok(text) = std::fs::read_to_string(&record) {
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(text);
        }
    }
    let digest = compute()?;
    // A record that cannot be written costs the next build the hashing, nothing more.
    let _ = cache.put_record(&record, &digest);
    Some(digest)
}

/// The kernel's architecture from its first bytes, if they tell it (see
/// [`kernel::sniff_machine`]).
fn sniff_kernel(path: &Path) -> Option<kernel::Machine> {
    use io::Read as _;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .ok()?;
    kernel::sniff_machine(&head)
}

/// A kernel loaded by [`build`]'s blocking task.
type Loaded = (Arc<Kernel>, String);

async fn loaded(
    task: tokio::task::JoinHandle<Result<Loaded, kernel::KernelError>>,
) -> Result<Loaded, BuildError> {
    Ok(task.await.expect("loading the kernel does not panic")?)
}

/// Loads the kernel at `path` and gives it with the sha256 of its file. A compressed bzImage's
/// vmlinux is kept in the cache (a blob, under an index named by the bzImage's digest), so a
/// later build of the same kernel reads it instead of decompressing it again.
fn load_kernel(path: &Path, cache: &Cache) -> Result<(Kernel, String), kernel::KernelError> {
    let read_err = |source| kernel::KernelError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let mut image = Vec::with_capacity(meta.len() as usize);
    io::Read::read_to_end(&mut file, &mut image).map_err(read_err)?;
    let digest = recorded_digest(cache, path, &meta, || Some(sha256_hex(&image)))
        .expect("computed when not recorded");
    let index = cache.root().join("vmlinux").join(&digest);
    let cached = cached_blob(cache, &index).and_then(|(_, path)| std::fs::read(path).ok());
    let mut k = match cached {
        Some(vmlinux) => Kernel::from_bzimage_and_vmlinux(image, vmlinux)?,
        None => {
            let k = Kernel::parse(image)?;
            tracing::debug!("the kernel is decompressed");
            if let (
                kernel::ImageFormat::BzImage {
                    compression: Some(_),
                },
                Ok(vmlinux),
            ) = (&k.format, k.vmlinux())
            {
                // A vmlinux that cannot be kept costs the next build a decompression.
                if let Err(e) = keep_vmlinux(cache, &index, vmlinux) {
                    tracing::debug!(error = %e, "cannot keep the vmlinux in the cache");
                }
            }
            k
        }
    };
    k.path = Some(path.to_path_buf());
    Ok((k, digest))
}

/// The blob a `DIGEST SIZE` record names (the kept vmlinux, a kept baked file), if it is in
/// the cache (verified).
fn cached_blob(cache: &Cache, record: &Path) -> Option<(Digest, PathBuf)> {
    let text = std::fs::read_to_string(record).ok()?;
    let (digest, size) = text.trim().split_once(' ')?;
    let digest: Digest = digest.parse().ok()?;
    let path = cache.get(&digest, size.parse().ok()?).ok()??;
    Some((digest, path))
}

fn keep_vmlinux(cache: &Cache, index: &Path, vmlinux: &[u8]) -> Result<(), BuildError> {
    let (digest, _) = cache.put_bytes(vmlinux)?;
    cache
        .put_record(index, &format!("{digest} {}", vmlinux.len()))
        .map_err(|source| BuildError::Output {
            path: index.display().to_string(),
            source,
        })
}

/// The baked command line: [`BAKED_CMDLINE`], the TSC frequency, and the memory record.
fn baked_cmdline(memory_mib: u64, tsc_khz: u64) -> String {
    format!(
        "{BAKED_CMDLINE} tsc_early_khz={tsc_khz} {}",
        oci2uk_config::guest::memory_param(memory_mib)
    )
}

/// The variable that sets the baked TSC frequency, in kHz.
pub const TSC_KHZ_ENV: &str = "OCI2UK_TSC_KHZ";

/// The TSC frequency to bake, in kHz. A guest without a reference timer to calibrate its TSC
/// against (QEMU's microvm under TCG has neither PIT speaker gate, HPET nor ACPI PM timer)
/// hangs at boot without it; where the hypervisor offers a paravirtual clock (KVM), that
/// clock is the guest's clocksource and this value only seeds delay loops. The value is part
/// of the output's bytes, so it comes from the steadiest source there is: `$OCI2UK_TSC_KHZ`,
/// else the kernel's own measure (`tsc_freq_khz` in sysfs, where the kernel exports it), else
/// the nominal frequency in the CPU's model name (`... @ 2.40GHz`), else `cpu MHz` rounded to
/// whole MHz (it moves with frequency scaling), else 2 GHz.
fn tsc_khz() -> Result<u64, BuildError> {
    let env = std::env::var(TSC_KHZ_ENV).ok();
    let sysfs = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz").ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
    tsc_khz_from(env.as_deref(), sysfs.as_deref(), cpuinfo.as_deref())
}

/// Plausible TSC frequencies, in kHz (100 MHz to 100 GHz).
const TSC_KHZ_RANGE: std::ops::RangeInclusive<u64> = 100_000..=100_000_000;

fn tsc_khz_from(
    env: Option<&str>,
    sysfs: Option<&str>,
    cpuinfo: Option<&str>,
) -> Result<u64, BuildError> {
    if let Some(v) = env.map(str::trim).filter(|v| !v.is_empty()) {
        return v
            .parse::<u64>()
            .ok()
            .filter(|k| TSC_KHZ_RANGE.contains(k))
            .ok_or_else(|| BuildError::TscKhz(v.to_string()));
    }
    let plausible = |k: &u64| TSC_KHZ_RANGE.contains(k);
    if let Some(k) = sysfs
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(plausible)
    {
        return Ok(k);
    }
    let field = |name: &str| {
        cpuinfo?
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let nominal = field("model name").and_then(|m| {
        let (_, f) = m.rsplit_once('@')?;
        let f = f.trim();
        let (num, scale) = match f.strip_suffix("GHz") {
            Some(n) => (n, 1_000_000.0),
            None => (f.strip_suffix("MHz")?, 1_000.0),
        };
        let v: f64 = num.trim().parse().ok()?;
        Some((v * scale).round() as u64)
    });
    if let Some(k) = nominal.filter(plausible) {
        return Ok(k);
    }
    let current = field("cpu MHz")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|mhz| mhz.round() as u64 * 1000);
    Ok(current.filter(plausible).unwrap_or(2_000_000))
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
/// [`Sink::finish`], removed if dropped) or standard output; hashes what passes through. A
/// file is written and hashed by threads of their own, so that producing the output, hashing
/// it and writing it overlap.
struct Sink {
    inner: SinkInner,
    /// Hashes standard output (a file is hashed by its writing thread).
    hasher: Hasher,
    size: u64,
}

enum SinkInner {
    File { file: FileWriter, dest: PathBuf },
    Stdout(io::BufWriter<io::Stdout>),
}

/// Output chunk handed to the writing thread.
const SINK_CHUNK: usize = 256 << 10;
/// Chunks queued for the writing thread.
const SINK_QUEUE: usize = 4;

/// Writes a temporary file on a thread, and hashes it on another: chunks go to them through
/// bounded queues.
struct FileWriter {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<io::Result<(tempfile::NamedTempFile, Digest)>>>,
}

impl FileWriter {
    fn new(mut file: tempfile::NamedTempFile) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(SINK_QUEUE);
        // Writing and hashing each have a thread, the chunks going from one to the other, so
        // that the producer (flattening, the bake) is the only stage that takes its time.
        let thread = std::thread::spawn(move || {
            let (htx, hrx) = std::sync::mpsc::sync_channel::<Vec<u8>>(SINK_QUEUE);
            let hashing = std::thread::spawn(move || {
                let mut hasher = Hasher::sha256();
                for chunk in hrx {
                    hasher.update(&chunk);
                }
                hasher.finish()
            });
            let written = rx.into_iter().try_for_each(|chunk| {
                file.write_all(&chunk)?;
                htx.send(chunk)
                    .map_err(|_| io::Error::other("the hashing thread stopped"))
            });
            drop(htx);
            let digest = hashing.join().expect("the hashing thread does not panic");
            written.map(|()| (file, digest))
        });
        Self {
            buf: Vec::with_capacity(SINK_CHUNK),
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// The writing thread's result: the file and its digest, or why it stopped.
    fn join(&mut self) -> io::Result<(tempfile::NamedTempFile, Digest)> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().expect("the writing thread does not panic"),
            None => Err(io::Error::other("the output was already closed")),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(SINK_CHUNK));
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk));
        match sent {
            Some(Ok(())) => Ok(()),
            // The thread stopped on an error: that error is the answer.
            _ => Err(self
                .join()
                .err()
                .unwrap_or_else(|| io::Error::other("the output was closed"))),
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(SINK_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == SINK_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn finish(mut self) -> io::Result<(tempfile::NamedTempFile, Digest)> {
        self.send()?;
        self.join()
    }
}

impl Drop for FileWriter {
    /// An abandoned output: the thread ends and its temporary file is removed before this
    /// returns.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
                    file: FileWriter::new(file),
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

    /// The file this output becomes, once finished (none for standard output).
    fn dest_path(&self) -> Option<PathBuf> {
        match &self.inner {
            SinkInner::File { dest, .. } => Some(dest.clone()),
            SinkInner::Stdout(_) => None,
        }
    }

    /// Finishes an output that is a copy of the file `src`, whose sha256 is known, made by the
    /// kernel (`copy_file_range`, or a reflink) rather than through memory and the hasher.
    /// Nothing may have been written to the output before.
    fn copy_from(self, src: &Path, digest: Digest) -> io::Result<(Digest, u64)> {
        debug_assert_eq!(self.size, 0, "a copy is the whole output");
        let mut from = std::fs::File::open(src)?;
        let size = match self.inner {
            SinkInner::Stdout(mut w) => {
                let n = io::copy(&mut from, &mut w)?;
                w.flush()?;
                n
            }
            SinkInner::File { file, dest } => {
                let (mut tmp, _) = file.finish()?;
                let n = io::copy(&mut from, tmp.as_file_mut())?;
                set_default_mode(tmp.as_file())?;
                tmp.persist(&dest).map_err(|e| e.error)?;
                n
            }
        };
        Ok((digest, size))
    }

    fn finish(self) -> io::Result<(Digest, u64)> {
        let digest = match self.inner {
            SinkInner::Stdout(mut w) => {
                w.flush()?;
                self.hasher.finish()
            }
            SinkInner::File { file, dest } => {
                let (tmp, digest) = file.finish()?;
                // No fsync: the rename makes the output appear whole or not at all to every
                // reader, and flushing tens of MiB to the disk would be most of a warm
                // rebuild. (ext4 and XFS also flush a file renamed over another before the
                // rename is committed.) As with `cp` and `skopeo copy`, durability against a
                // power cut is the system's business.
                // Outputs are ordinary files: 0644 less the umask, not the 0600 of a temp file.
                set_default_mode(tmp.as_file())?;
                tmp.persist(&dest).map_err(|e| e.error)?;
                digest
            }
        };
        Ok((digest, self.size))
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
            SinkInner::Stdout(w) => {
                let n = w.write(buf)?;
                self.hasher.update(&buf[..n]);
                n
            }
        };
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            // Chunks reach the file as they fill; finish() writes the rest.
            SinkInner::File { .. } => Ok(()),
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
    fn tsc_frequency_sources() {
        let epyc = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2445.424\n";
        let xeon =
            "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\ncpu MHz\t\t: 1197.621\n";
        assert_eq!(tsc_khz_from(None, None, Some(epyc)).unwrap(), 2_445_000);
        assert_eq!(tsc_khz_from(None, None, Some(xeon)).unwrap(), 2_400_000);
        assert_eq!(
            tsc_khz_from(None, Some("2593906\n"), Some(xeon)).unwrap(),
            2_593_906
        );
        assert_eq!(
            tsc_khz_from(Some(" 3000000 "), Some("2593906"), Some(xeon)).unwrap(),
            3_000_000
        );
        assert_eq!(tsc_khz_from(None, Some("0"), None).unwrap(), 2_000_000);
        assert_eq!(tsc_khz_from(Some(""), None, None).unwrap(), 2_000_000);
        assert!(matches!(
            tsc_khz_from(Some("2.4GHz"), None, None),
            Err(BuildError::TscKhz(_))
        ));
        assert!(tsc_khz_from(Some("5"), None, None).is_err());
        // Frequency scaling moves the fraction, not the rounded MHz.
        let wobble = "model name\t: AMD EPYC\ncpu MHz\t\t: 2444.9\n";
        assert_eq!(tsc_khz_from(None, None, Some(wobble)).unwrap(), 2_445_000);
    }

    #[test]
    fn a_decompressed_vmlinux_is_kept_and_reused() {
        use flate2::{write::GzEncoder, Compression as Level};
        let vmlinux = crate::kernel::tests::tiny_vmlinux(Some(0x100_0001));
        let mut gz = GzEncoder::new(Vec::new(), Level::default());
        gz.write_all(&vmlinux).unwrap();
        let image = crate::kernel::tests::fake_bzimage(&gz.finish().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinuz");
        std::fs::write(&path, &image).unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();

        let (first, digest) = load_kernel(&path, &cache).unwrap();
        assert_eq!(digest, sha256_hex(&image));
        let index = cache.root().join("vmlinux").join(&digest);
        let recorded = std::fs::read_to_string(&index).unwrap();
        assert!(
            recorded.ends_with(&format!(" {}", vmlinux.len())),
            "{recorded}"
        );

        // The second load reads the kept vmlinux.
        let (d, _) = recorded.split_once(' ').unwrap();
        let blob = cache.blob_path(&d.parse().unwrap());
        let (second, _) = load_kernel(&path, &cache).unwrap();
        assert_eq!(second.vmlinux().unwrap(), first.vmlinux().unwrap());
        assert_eq!(second.version, first.version);
        assert_eq!(second.format, first.format);
        assert_eq!(second.path.as_deref(), Some(path.as_path()));
        // A corrupt kept copy is dropped by the cache's check, and the image decompressed.
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::remove_file(&blob).unwrap();
        std::fs::write(&blob, &bytes).unwrap();
        let (third, _) = load_kernel(&path, &cache).unwrap();
        assert_eq!(third.vmlinux().unwrap(), &vmlinux[..]);
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
