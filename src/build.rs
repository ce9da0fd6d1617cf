//! The `build` command as a library call: a source and options in, an output file out.
//!
//! Resolves the image, flattens it and writes the requested format. The output is written to a
//! temporary file beside the destination and renamed into place only when complete, so a
//! failure never leaves a partial or stale-looking file behind.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

use crate::cache::{Cache, Hasher};
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
    // The kernel decides the platform, and an unusable kernel or destination is better found
    // before any download.
    let kernel = match req.format {
        Format::Tar => None,
        _ => {
            let chosen = kernel::discover(req.kernel.as_deref())?;
            let path = chosen.path.clone();
            let k = tokio::task::spawn_blocking(move || Kernel::load(&path))
                .await
                .expect("loading the kernel does not panic")?;
            if req.format == Format::Elf {
                k.pvh_entry()?;
            }
            Some((chosen, k))
        }
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
    resolve.platform = match (&req.platform, &kernel) {
        (Some(p), _) => p.clone(),
        (None, Some((_, k))) => Platform {
            os: "linux".into(),
            architecture: k.machine.oci_arch().into(),
            variant: None,
        },
        (None, None) => Platform::host(),
    };
    let img = image::resolve(&req.source, &resolve, cache, progress)
        .await
        .map_err(|source| BuildError::Image {
            source_name: source_name.clone(),
            source: Box::new(source),
        })?;

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
        kernel: kernel.as_ref().map(|(_, k)| k.clone()),
        spool: spool.path().to_path_buf(),
        tmp: cache.tmp_dir(),
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
        kernel: kernel.as_ref().map(|(c, _)| c.to_string()),
        kernel_version: kernel.as_ref().map(|(_, k)| k.version.clone()),
        memory_mib,
    })
}

/// The blocking part of a build: flatten, then write the format.
struct Job {
    req: BuildRequest,
    img: Image,
    kernel: Option<Kernel>,
    spool: PathBuf,
    tmp: PathBuf,
    dest_name: String,
    progress: Progress,
}

impl Job {
    fn run(self, sink: Option<Sink>) -> Result<(Digest, u64, Option<u64>), BuildError> {
        let tree = flatten::flatten(
            &self.img.layers,
            &self.req.flatten,
            &self.spool,
            &self.progress,
        )
        .map_err(|source| BuildError::Flatten {
            source_name: self.req.source.to_string(),
            source,
        })?;
        let out_err = |source: io::Error| BuildError::Output {
            path: self.dest_name.clone(),
            source,
        };
        let Some(mut sink) = sink else {
            let kernel = self.kernel.as_ref().expect("a bundle has a kernel");
            return self.bundle(kernel, &tree);
        };
        let memory = match &self.kernel {
            None => {
                let opts = output::tar::TarOptions {
                    source_date_epoch: self.req.source_date_epoch,
                };
                output::tar::write_tar_with(&tree, &mut sink, &opts)
                    .map_err(|e| out_err(io::Error::other(e)))?;
                None
            }
            Some(kernel) => {
                let (initramfs, len, memory) = self.initramfs(kernel, &tree)?;
                let reader = io::BufReader::with_capacity(1 << 20, initramfs);
                if self.req.format == Format::Initrd {
                    let mut reader = reader;
                    io::copy(&mut reader, &mut sink).map_err(&out_err)?;
                } else {
                    bake::bake(kernel, reader, len, &baked_cmdline(memory), &mut sink)?;
                }
                Some(memory)
            }
        };
        let (digest, size) = sink.finish().map_err(out_err)?;
        Ok((digest, size, memory))
    }

    /// Writes the bundle directory: vmlinux, initrd, the baked file, command line and launch
    /// files. Its digest and size are those of the baked file inside.
    fn bundle(
        &self,
        kernel: &Kernel,
        tree: &Tree,
    ) -> Result<(Digest, u64, Option<u64>), BuildError> {
        let tmp_err = |source: io::Error| BuildError::Output {
            path: self.tmp.display().to_string(),
            source,
        };
        let (initrd, len, memory) = self.initramfs(kernel, tree)?;
        // A bundle file is an ordinary file, not the 0600 of a temporary one.
        set_default_mode(initrd.as_file()).map_err(tmp_err)?;
        // The baked file goes through a sink, as a single output does, which hashes it.
        let elf_dir = tempfile::tempdir_in(&self.tmp).map_err(tmp_err)?;
        let elf = elf_dir.path().join("baked.elf");
        let mut sink = Sink::open(&Destination::Path(elf.clone())).map_err(tmp_err)?;
        let cmdline = baked_cmdline(memory);
        let src = io::BufReader::with_capacity(1 << 20, initrd.reopen().map_err(tmp_err)?);
        bake::bake(kernel, src, len, &cmdline, &mut sink)?;
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
            initrd: crate::bundle::Blob::File(initrd.path()),
            elf: Some(crate::bundle::Blob::File(&elf)),
            cmdline,
            memory_mib: memory,
            vcpus: 1,
            ports,
        };
        crate::bundle::write_bundle(Path::new(&self.dest_name), &parts)?;
        Ok((digest, size, Some(memory)))
    }

    /// Plans the launch configuration and writes the initramfs to a temporary file; returns
    /// it (rewound), its length and the guest memory the image needs.
    fn initramfs(
        &self,
        kernel: &Kernel,
        tree: &Tree,
    ) -> Result<(tempfile::NamedTempFile, u64, u64), BuildError> {
        let target = plan::Target {
            machine: kernel.machine,
            name: self.req.source.name(),
        };
        let mut config = plan::plan(&self.img, tree, &self.req.overrides, &target)?;
        let modules = kernel.modules(self.req.modules.as_deref())?;
        let needed = modules
            .closure(GUEST_MODULES)
            .map_err(BuildError::Modules)?;
        let mut extras = vec![rootfs::Extra::init(crate::init_blob::INIT.to_vec())];
        for m in &needed {
            let ko = modules.read(m).map_err(BuildError::Modules)?;
            extras.push(rootfs::Extra::module(&m.name, ko));
            config.oci2uk.modules.push(rootfs::module_path(&m.name));
        }
        config.oci2uk.kernel = Some(kernel.version.clone());
        extras.push(rootfs::Extra::config(config.to_json().into_bytes()));

        let opts = rootfs::RootfsOptions {
            codec: rootfs::Codec::for_kernel(kernel.config()?.as_ref()),
            level: None,
            source_date_epoch: self.req.source_date_epoch,
        };
        // The bake must know the initramfs's length before writing it: spool it beside the
        // blobs (same filesystem as the cache, removed when dropped).
        let mut initramfs =
            tempfile::NamedTempFile::new_in(&self.tmp).map_err(|source| BuildError::Output {
                path: self.tmp.display().to_string(),
                source,
            })?;
        let stats = rootfs::write_initramfs(
            tree,
            &extras,
            &opts,
            io::BufWriter::with_capacity(1 << 20, &mut initramfs),
        )?;
        let memory = rootfs::memory_needed(&stats, rootfs::RootfsType::from_cmdline(BAKED_CMDLINE));
        use std::io::Seek;
        initramfs
            .seek(io::SeekFrom::Start(0))
            .map_err(|source| BuildError::Output {
                path: self.tmp.display().to_string(),
                source,
            })?;
        Ok((initramfs, stats.compressed_size, memory))
    }
}

/// The baked command line: [`BAKED_CMDLINE`], the TSC frequency, and the memory record.
fn baked_cmdline(memory_mib: u64) -> String {
    format!(
        "{BAKED_CMDLINE} tsc_early_khz={} oci2uk.memory={memory_mib}M",
        tsc_khz()
    )
}

/// The TSC frequency to bake, in kHz: this machine's. A guest without a reference timer to
/// calibrate its TSC against (QEMU's microvm under TCG has neither PIT speaker gate, HPET nor
/// ACPI PM timer) hangs at boot without it; where the hypervisor offers a paravirtual clock
/// (KVM), that clock is the guest's clocksource and this value only seeds delay loops.
fn tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .filter(|khz| *khz > 100_000)
        .unwrap_or(2_000_000)
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
