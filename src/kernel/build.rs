//! Building the oci2uk kernel: a Linux source (a tarball or an unpacked tree) and the fragment
//! `kernel/oci2uk.config` in, a `vmlinux` and its `.config` in the cache out, under
//! `CACHE/kernels/<key>/`, where the key is the sha256 of everything the build depends on
//! (this recipe, the fragment, the source's bytes, the toolchain's versions).
//! `CACHE/kernels/latest` names the one built or found last; [`latest`] reads it.
//!
//! The build is Kbuild's own (`make tinyconfig`, `merge_config.sh`, `make olddefconfig`,
//! `make vmlinux`) run by the system's tools in a temporary directory of the cache, with a clean
//! environment and Kbuild's reproducibility variables set, so that the same inputs give the
//! same vmlinux byte for byte. A result is renamed into place whole, or not at all.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::elf::{Elf, PT_LOAD};
use super::{Kernel, KernelError};
use crate::cache::{Cache, Hasher};
use crate::progress::Progress;

/// The configuration fragment over `tinyconfig` that makes the oci2uk kernel, as kept in the
/// repository (`kernel/oci2uk.config`).
pub const FRAGMENT: &str = include_str!("../../kernel/oci2uk.config");

/// The Linux source used when none is given: Debian's `linux-source-6.1` package installs it.
pub const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// What the steps below do, as one string in the cache key: change it whenever a step, its
/// arguments or its environment changes, so no result of the old recipe is taken for the new.
const RECIPE: &str = "oci2uk kernel build 3: tar -x --exclude UNPACKED_NOT (also in the key); \
    ARCH=x86_64; make tinyconfig; merge_config.sh -m \
    FRAGMENT; make olddefconfig; make vmlinux LDFLAGS_vmlinux=\
    -z max-page-size=0x1000 --build-id=sha1 --orphan-handling=warn; \
    KBUILD_BUILD_TIMESTAMP=1970-01-01 00:00:00 UTC, \
    KBUILD_BUILD_USER=oci2uk, KBUILD_BUILD_HOST=oci2uk, KBUILD_BUILD_VERSION=1, LOCALVERSION=, \
    LC_ALL=C";

/// The vmlinux's link flags: Linux's own for this configuration (`arch/x86/Makefile` and the top
/// `Makefile` give `-z max-page-size=0x200000 --build-id=sha1 --orphan-handling=warn`), with
/// the page size the file is laid out in lowered to 4 KiB. The segments' addresses do not
/// change (the linker script places them); their file offsets no longer carry up to 2 MiB of
/// zeros before and between them (5 MiB in all), which every baked file would carry too. The
/// loaders that boot it (QEMU, Firecracker, Cloud Hypervisor, Xen) read each segment from its
/// offset and load it at its physical address; none reads `p_align`.
const LINK_FLAGS: &str = "-z max-page-size=0x1000 --build-id=sha1 --orphan-handling=warn";

/// What a tarball's unpacking leaves out (GNU tar `--exclude` patterns): the C sources and
/// headers of the subsystems the configuration does not build (DRM alone is 446 MiB), the other
/// architectures and perf and the kernel selftests: 780 of the tarball's 1,240 MiB. Their
/// Kconfig files and Makefiles stay, since Kconfig reads every one. The vmlinux is the same
/// byte for byte with or without them; a fragment that came to need one would fail the build
/// at the missing file, naming it.
const UNPACKED_NOT: [&str; 11] = [
    "*/drivers/gpu/*.[ch]",
    "*/drivers/infiniband/*.[ch]",
    "*/drivers/media/*.[ch]",
    "*/drivers/net/ethernet/*.[ch]",
    "*/drivers/net/wireless/*.[ch]",
    "*/drivers/staging/*.[ch]",
    "*/sound/*.[ch]",
    // Every architecture but x86 (and xtensa, the other one starting with x): its sources
    // and device trees.
    "*/arch/[!x]*/*.[chS]",
    "*/arch/[!x]*/*.dts*",
    "*/tools/perf",
    "*/tools/testing",
];

/// The architecture the kernel is built for (the bake is x86_64 only).
const ARCH: &str = "x86_64";

/// The tools every build runs.
const TOOLS: [&str; 5] = ["make", "gcc", "flex", "bison", "bc"];

/// The Debian packages that provide them (and libelf, which objtool links against).
const TOOL_PACKAGES: &str = "build-essential flex bison bc libelf-dev";

/// How many of the log's last lines a failed step shows.
const LOG_TAIL: usize = 30;

/// Errors of building the oci2uk kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelBuildError {
    /// No source was given and Debian's is not installed.
    #[error(
        "no Linux source at {}: install Debian's linux-source-6.1 (apt-get install \
         linux-source-6.1) or pass --source", .0.display()
    )]
    NoDefaultSource(PathBuf),
    /// The given source does not exist.
    #[error("no Linux source at {}: expected a source tarball or directory", .0.display())]
    NoSource(PathBuf),
    /// The source holds no Linux tree.
    #[error(
        "{} holds no Linux source tree (no Makefile and Kconfig at its top or in its one \
         top-level directory)", .0.display()
    )]
    NotLinux(PathBuf),
    /// A source directory has been configured or built in: an out-of-tree build refuses it.
    #[error(
        "the Linux source tree {} is not clean (it has {found}): run `make mrproper` in it, or \
         pass a clean copy or the tarball", dir.display()
    )]
    Unclean {
        /// The source directory.
        dir: PathBuf,
        /// What it has that a clean tree has not.
        found: String,
    },
    /// Build tools are missing.
    #[error(
        "cannot build a kernel: {missing} not found on PATH (install Debian's {TOOL_PACKAGES})"
    )]
    MissingTools {
        /// The missing tools, space-separated.
        missing: String,
    },
    /// A program could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A tool's version could not be read.
    #[error("`{command}` printed no version ({status})")]
    Version {
        /// The command.
        command: String,
        /// How it ended.
        status: String,
    },
    /// A build step failed; its log's last lines say why.
    #[error("{step} failed ({status}); the last lines of the log:\n{tail}")]
    Step {
        /// The step (`make vmlinux`).
        step: String,
        /// How it ended (`exit 2`).
        status: String,
        /// The log's last lines, indented, and where the whole log was kept.
        tail: String,
    },
    /// A line of the fragment is not Kconfig.
    #[error("line {line} of kernel/oci2uk.config is not a Kconfig line: {text:?}")]
    Fragment {
        /// Its number, from 1.
        line: usize,
        /// The line.
        text: String,
    },
    /// Kconfig did not give what the fragment asks: a dependency is missing.
    #[error(
        "Kconfig did not configure the kernel as kernel/oci2uk.config asks (an option's \
         dependency is missing from the fragment): {}",
        .0.iter().map(Mismatch::to_string).collect::<Vec<_>>().join("; ")
    )]
    Config(Vec<Mismatch>),
    /// Reading or writing a file failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done (`read`, `write`, `hash`).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The built vmlinux cannot be read as a kernel.
    #[error("the built kernel {} is not usable", path.display())]
    Kernel {
        /// The vmlinux.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KernelError,
    },
}

/// One option that Kconfig did not set as the fragment asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The option, `CONFIG_X`.
    pub option: String,
    /// What the fragment asks.
    pub asked: Setting,
    /// What the resulting `.config` has; `None` when the option is not in it at all (its menu's
    /// dependencies are not met).
    pub got: Option<Setting>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let got = match &self.got {
            Some(s) => s.to_string(),
            None => "nothing (absent)".to_string(),
        };
        write!(
            f,
            "{} asked {}, Kconfig gave {got}",
            self.option, self.asked
        )
    }
}

/// An option's setting in a `.config` or a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `CONFIG_X=value`, the value as written (`y`, `64`, `"-oci2uk"`).
    Value(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Setting::Value(v) => write!(f, "={v}"),
            Setting::NotSet => f.write_str("not set"),
        }
    }
}

/// What to build from.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// A Linux source tarball or a clean, unpacked source directory; default
    /// [`DEFAULT_SOURCE`].
    pub source: Option<PathBuf>,
    /// Parallel make jobs; default the number of CPUs.
    pub jobs: Option<usize>,
}

/// A built (or found) oci2uk kernel.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Built {
    /// The vmlinux (uncompressed, unstripped ELF).
    #[serde(rename = "kernel")]
    pub vmlinux: PathBuf,
    /// Its final `.config`.
    pub config: PathBuf,
    /// Its release, as `uname -r` prints it (`6.1.192-oci2uk`).
    pub release: String,
    /// The vmlinux's sha256, in hex.
    pub sha256: String,
    /// The bytes its PT_LOAD segments occupy in memory.
    pub loaded_bytes: u64,
    /// The number of `CONFIG_*=` lines in its `.config`.
    pub options: usize,
    /// Whether it was found in the cache rather than built.
    pub cached: bool,
    /// The seconds [`build`] took.
    pub seconds: f64,
}

/// The vmlinux built or found last in the cache at `cache_root`
/// (`CACHE/kernels/latest/vmlinux`), when there is one.
pub fn latest(cache_root: &Path) -> Option<PathBuf> {
    let path = cache_root.join("kernels").join("latest").join("vmlinux");
    path.is_file().then_some(path)
}

/// Builds the oci2uk kernel from `opts.source` into the cache, or finds it there when these
/// inputs were built before, and makes it the cache's latest. Progress shows the step on a
/// spinner.
pub fn build(
    cache: &Cache,
    opts: &BuildOptions,
    progress: &Progress,
) -> Result<Built, KernelBuildError> {
    let start = Instant::now();
    let source = Source::locate(opts.source.as_deref())?;
    check_tools(source.tarball)?;
    let wants = parse_fragment(FRAGMENT)?;
    let bar = spinner(progress, "hashing the source");
    let toolchain = toolchain()?;
    let key = cache_key(FRAGMENT, &source.digest()?, &toolchain);
    let kernels = cache.root().join("kernels");
    fs::create_dir_all(&kernels).map_err(io_err("create", &kernels))?;
    let dir = kernels.join(&key);
    let found = if dir.join("vmlinux").is_file() {
        match describe(&dir, true) {
            Ok(built) => Some(built),
            Err(e) => {
                // A damaged entry (a disk filled up, a hand edit) is built again.
                tracing::warn!(path = %dir.display(), error = %e, "rebuilding a damaged kernel");
                fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
                None
            }
        }
    } else {
        None
    };
    let mut built = match found {
        Some(built) => built,
        None => {
            let jobs = opts
                .jobs
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(1);
            let job = Job {
                cache,
                source: &source,
                wants: &wants,
                jobs,
                bar: &bar,
            };
            job.run(&dir)?;
            describe(&dir, false)?
        }
    };
    bar.finish_and_clear();
    point_latest(&kernels, &key)?;
    built.seconds = start.elapsed().as_secs_f64();
    Ok(built)
}

/// Copies `built`'s vmlinux and config into `dir` (created if needed) as `vmlinux-RELEASE` and
/// `config-RELEASE`, each written beside its name and renamed over it, and returns `built` with
/// those paths.
pub fn export(built: &Built, dir: &Path) -> Result<Built, KernelBuildError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let copy = |from: &Path, name: String| -> Result<PathBuf, KernelBuildError> {
        let to = dir.join(name);
        let write = || -> io::Result<()> {
            let mut tmp = tempfile::Builder::new()
                .prefix(".oci2uk-")
                .tempfile_in(dir)?;
            io::copy(&mut File::open(from)?, tmp.as_file_mut())?;
            tmp.as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))?;
            tmp.persist(&to).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(io_err("write", &to))?;
        Ok(to)
    };
    Ok(Built {
        vmlinux: copy(&built.vmlinux, format!("vmlinux-{}", built.release))?,
        config: copy(&built.config, format!("config-{}", built.release))?,
        ..built.clone()
    })
}

/// The source to build from.
struct Source {
    path: PathBuf,
    /// A tarball, or else a directory.
    tarball: bool,
}

impl Source {
    fn locate(given: Option<&Path>) -> Result<Self, KernelBuildError> {
        let path = given.unwrap_or(Path::new(DEFAULT_SOURCE));
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(match given {
                    Some(p) => KernelBuildError::NoSource(p.to_path_buf()),
                    None => KernelBuildError::NoDefaultSource(path.to_path_buf()),
                })
            }
            Err(e) => return Err(io_err("read", path)(e)),
        };
        // Kbuild is run from other directories: the source is named absolutely.
        let path = fs::canonicalize(path).map_err(io_err("read", path))?;
        if meta.is_dir() {
            if !is_linux_tree(&path) {
                return Err(KernelBuildError::NotLinux(path));
            }
            // What Kbuild's own check for an out-of-tree build finds, said before any work.
            let found = [".config", "include/config", "arch/x86/include/generated"]
                .into_iter()
                .filter(|p| path.join(p).exists())
                .collect::<Vec<_>>();
            if !found.is_empty() {
                return Err(KernelBuildError::Unclean {
                    dir: path,
                    found: found.join(", "),
                });
            }
        }
        Ok(Self {
            tarball: !meta.is_dir(),
            path,
        })
    }

    /// The identity of the source's bytes, in hex: a tarball's sha256, or a sha256 over a
    /// directory's regular files (relative path and bytes) and symlinks (path and target) in
    /// path order, `.git` left out.
    fn digest(&self) -> Result<String, KernelBuildError> {
        let mut h = Hasher::sha256();
        if self.tarball {
            hash_file(&self.path, &mut h)?;
        } else {
            let mut entries = Vec::new();
            walk(&self.path, &self.path, &mut entries)?;
            entries.sort();
            for (rel, symlink) in entries {
                let path = self.path.join(OsStr::from_bytes(&rel));
                let field = |h: &mut Hasher, b: &[u8]| {
                    h.update(&(b.len() as u64).to_le_bytes());
                    h.update(b);
                };
                if symlink {
                    let target = fs::read_link(&path).map_err(io_err("read", &path))?;
                    h.update(b"L");
                    field(&mut h, &rel);
                    field(&mut h, target.as_os_str().as_bytes());
                } else {
                    let len = fs::metadata(&path).map_err(io_err("read", &path))?.len();
                    h.update(b"F");
                    field(&mut h, &rel);
                    h.update(&len.to_le_bytes());
                    hash_file(&path, &mut h)?;
                }
            }
        }
        Ok(h.finish().digest().to_string())
    }
}

/// Whether `dir` is the top of a Linux source tree.
fn is_linux_tree(dir: &Path) -> bool {
    dir.join("Makefile").is_file() && dir.join("Kconfig").is_file()
}

/// Collects the regular files and symlinks under `dir` as (path relative to `root`, is a
/// symlink).
fn walk(root: &Path, dir: &Path, out: &mut Vec<(Vec<u8>, bool)>) -> Result<(), KernelBuildError> {
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let entry = entry.map_err(io_err("read", dir))?;
        if entry.file_name() == ".git" {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("read", &path))?;
        let rel = || {
            let rel = path.strip_prefix(root).expect("under the root");
            rel.as_os_str().as_bytes().to_vec()
        };
        if kind.is_dir() {
            walk(root, &path, out)?;
        } else if kind.is_symlink() {
            out.push((rel(), true));
        } else if kind.is_file() {
            out.push((rel(), false));
        }
    }
    Ok(())
}

/// Feeds a file's bytes to `h`.
fn hash_file(path: &Path, h: &mut Hasher) -> Result<(), KernelBuildError> {
    let mut f = File::open(path).map_err(io_err("read", path))?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err("read", path)(e)),
        }
    }
}

/// The cache key, in hex, of a build of `fragment` from the source whose digest is `source`
/// with `toolchain`.
fn cache_key(fragment: &str, source: &str, toolchain: &str) -> String {
    let mut h = Hasher::sha256();
    let unpacked_not = UNPACKED_NOT.join(" ");
    for part in [RECIPE, &unpacked_not, fragment, source, toolchain] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finish().digest().to_string()
}

/// Fails naming every build tool that is not on PATH.
fn check_tools(tarball: bool) -> Result<(), KernelBuildError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let tar = tarball.then_some("tar");
    let missing: Vec<&str> = TOOLS
        .into_iter()
        .chain(tar)
        .filter(|tool| {
            !std::env::split_paths(&path).any(|d| {
                fs::metadata(d.join(tool))
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelBuildError::MissingTools {
            missing: missing.join(", "),
        })
    }
}

/// The first lines of `gcc --version`, `ld --version` and `make --version`: what the key
/// holds of the toolchain.
fn toolchain() -> Result<String, KernelBuildError> {
    let mut lines = Vec::new();
    for tool in ["gcc", "ld", "make"] {
        let command = format!("{tool} --version");
        let out = clean_command(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|source| KernelBuildError::Spawn {
                program: tool.to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().next().filter(|_| out.status.success()) {
            Some(line) => lines.push(line.trim().to_string()),
            None => {
                return Err(KernelBuildError::Version {
                    command,
                    status: describe_status(out.status),
                })
            }
        }
    }
    Ok(lines.join("\n"))
}

/// A command with a clean environment: the user's `KCFLAGS`, `CROSS_COMPILE`, `LOCALVERSION`,
/// `ARCH`, `MAKEFLAGS` and the like would change what is built without changing the cache key,
/// so only PATH and TMPDIR are passed on, and Kbuild's reproducibility variables are set.
fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env_clear();
    for var in ["PATH", "TMPDIR"] {
        if let Some(v) = std::env::var_os(var) {
            c.env(var, v);
        }
    }
    c.env("LC_ALL", "C")
        // The banner (`uname -v`) and the embedded timestamps are fixed, not the build's time.
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01 00:00:00 UTC")
        .env("KBUILD_BUILD_USER", "oci2uk")
        .env("KBUILD_BUILD_HOST", "oci2uk")
        .env("KBUILD_BUILD_VERSION", "1")
        // Set, and empty: Kbuild then asks no git checkout for a `+` to append to the release,
        // so a tree's `.git`, which the key leaves out, cannot change the kernel.
        .env("LOCALVERSION", "");
    c
}

/// One build, in a temporary directory of the cache that is removed whatever happens.
struct Job<'a> {
    cache: &'a Cache,
    source: &'a Source,
    wants: &'a [(String, Setting)],
    jobs: usize,
    bar: &'a ProgressBar,
}

impl Job<'_> {
    /// Builds into `dest` (`CACHE/kernels/<key>`).
    fn run(&self, dest: &Path) -> Result<(), KernelBuildError> {
        let tmp = self.cache.tmp_dir();
        let work = tempfile::Builder::new()
            .prefix("kernel-build-")
            .tempdir_in(&tmp)
            .map_err(io_err("create a directory in", &tmp))?;
        let root = fs::canonicalize(work.path()).map_err(io_err("read", work.path()))?;
        let log = Log {
            path: root.join("build.log"),
            keep: self.cache.root().join("logs").join("kernel-build.log"),
        };
        let (src, obj) = if self.source.tarball {
            self.bar.set_message("unpacking the source");
            let unpacked = root.join("src");
            fs::create_dir(&unpacked).map_err(io_err("create", &unpacked))?;
            // The system's tar (and its xz) unpacks the tree several times faster than a Rust
            // xz decoder would.
            let mut tar = clean_command("tar");
            tar.args(UNPACKED_NOT.map(|p| format!("--exclude={p}")))
                .arg("-xf")
                .arg(&self.source.path)
                .arg("-C")
                .arg(&unpacked);
            log.run("tar -xf", &mut tar)?;
            let tree = linux_tree_in(&unpacked)
                .ok_or_else(|| KernelBuildError::NotLinux(self.source.path.clone()))?;
            // In the tree itself, so every path Kbuild writes into the kernel is relative.
            (tree.clone(), tree)
        } else {
            // Out of tree: the user's tree stays as it was.
            let obj = root.join("obj");
            fs::create_dir(&obj).map_err(io_err("create", &obj))?;
            (self.source.path.clone(), obj)
        };
        let make = |args: &[&str]| {
            let mut c = clean_command("make");
            c.current_dir(&src);
            if obj != src {
                c.arg(format!("O={}", obj.display()));
            }
            c.arg(format!("ARCH={ARCH}")).args(args);
            c
        };

        self.bar.set_message("configuring");
        log.run("make tinyconfig", &mut make(&["tinyconfig"]))?;
        let fragment = root.join("oci2uk.config");
        fs::write(&fragment, FRAGMENT).map_err(io_err("write", &fragment))?;
        let config = obj.join(".config");
        let mut merge = clean_command("sh");
        // merge_config.sh writes its temporary files in the current directory.
        merge
            .current_dir(&obj)
            .arg(src.join("scripts/kconfig/merge_config.sh"))
            .args(["-m", "-O"])
            .arg(&obj)
            .arg(&config)
            .arg(&fragment);
        log.run("merge_config.sh", &mut merge)?;
        log.run("make olddefconfig", &mut make(&["olddefconfig"]))?;
        let text = fs::read_to_string(&config).map_err(io_err("read", &config))?;
        verify(self.wants, &text)?;

        self.bar.set_message("building vmlinux");
        let jobs = format!("-j{}", self.jobs);
        let link = format!("LDFLAGS_vmlinux={LINK_FLAGS}");
        log.run("make vmlinux", &mut make(&[&jobs, &link, "vmlinux"]))?;

        let out = root.join("out");
        fs::create_dir(&out).map_err(io_err("create", &out))?;
        for (from, to) in [(obj.join("vmlinux"), "vmlinux"), (config, "config")] {
            let to = out.join(to);
            fs::rename(&from, &to).map_err(io_err("move", &from))?;
        }
        fs::set_permissions(&out, fs::Permissions::from_mode(0o755))
            .map_err(io_err("write", &out))?;
        match fs::rename(&out, dest) {
            Ok(()) => Ok(()),
            // A concurrent build of the same inputs got there first; its result is this one's.
            Err(_) if dest.join("vmlinux").is_file() => Ok(()),
            Err(e) => Err(io_err("write", dest)(e)),
        }
    }
}

/// The Linux tree a tarball unpacked to `dir`: `dir` itself, or its one top-level directory.
fn linux_tree_in(dir: &Path) -> Option<PathBuf> {
    if is_linux_tree(dir) {
        return Some(dir.to_path_buf());
    }
    let mut entries = fs::read_dir(dir).ok()?;
    let only = entries.next()?.ok()?.path();
    (entries.next().is_none() && only.is_dir() && is_linux_tree(&only)).then_some(only)
}

/// The build's log: every step's output goes to it; a failed step's is kept in the cache.
struct Log {
    path: PathBuf,
    /// Where the whole log is kept when a step fails (the build's directory is removed).
    keep: PathBuf,
}

impl Log {
    /// Runs one step with its output appended to the log.
    fn run(&self, step: &str, cmd: &mut Command) -> Result<(), KernelBuildError> {
        use std::io::Write as _;
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io_err("write", &self.path))?;
        let line: Vec<_> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(OsStr::to_string_lossy)
            .collect();
        writeln!(file, "### {step}: {}", line.join(" ")).map_err(io_err("write", &self.path))?;
        let err = file.try_clone().map_err(io_err("write", &self.path))?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .status()
            .map_err(|source| KernelBuildError::Spawn {
                program: cmd.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        let text = fs::read(&self.path).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let mut tail: String = lines[lines.len().saturating_sub(LOG_TAIL)..]
            .iter()
            .map(|l| format!("  {l}\n"))
            .collect();
        let kept = self
            .keep
            .parent()
            .map_or(Ok(()), fs::create_dir_all)
            .and_then(|()| fs::copy(&self.path, &self.keep));
        match kept {
            Ok(_) => tail.push_str(&format!("the whole log: {}", self.keep.display())),
            Err(_) => tail.truncate(tail.trim_end().len()),
        }
        Err(KernelBuildError::Step {
            step: step.to_string(),
            status: describe_status(status),
            tail,
        })
    }
}

/// `exit N` or `signal N`.
fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// Replaces `kernels/latest` with a symlink to `key`, made beside it and renamed over it.
fn point_latest(kernels: &Path, key: &str) -> Result<(), KernelBuildError> {
    let latest = kernels.join("latest");
    let tmp = kernels.join(format!(".latest-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(key, &tmp)
        .and_then(|()| fs::rename(&tmp, &latest))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err("write", &latest)(e)
        })
}

/// The figures of the kernel in `dir`.
fn describe(dir: &Path, cached: bool) -> Result<Built, KernelBuildError> {
    let vmlinux = dir.join("vmlinux");
    let config = dir.join("config");
    let data = fs::read(&vmlinux).map_err(io_err("read", &vmlinux))?;
    let not_usable = |source| KernelBuildError::Kernel {
        path: vmlinux.clone(),
        source,
    };
    let mut h = Hasher::sha256();
    h.update(&data);
    let sha256 = h.finish().digest().to_string();
    let loaded_bytes = Elf::parse(&data)
        .map_err(|e| not_usable(KernelError::Elf(e)))?
        .phdrs
        .iter()
        .filter(|p| p.kind == PT_LOAD)
        .map(|p| p.memsz)
        .sum();
    let release = Kernel::parse(data).map_err(not_usable)?.version;
    let text = fs::read_to_string(&config).map_err(io_err("read", &config))?;
    Ok(Built {
        release,
        sha256,
        loaded_bytes,
        options: count_options(&text),
        cached,
        seconds: 0.0,
        vmlinux,
        config,
    })
}

/// The number of `CONFIG_*=` lines of a `.config`.
fn count_options(config: &str) -> usize {
    config
        .lines()
        .filter(|l| l.starts_with("CONFIG_") && l.contains('='))
        .count()
}

/// One `.config` or fragment line's option and setting; `None` for blank lines and comments.
fn parse_line(line: &str) -> Option<Result<(String, Setting), ()>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    if let Some(rest) = line.strip_prefix("# ") {
        return rest
            .strip_suffix(" is not set")
            .filter(|name| is_option(name))
            .map(|name| Ok((name.to_string(), Setting::NotSet)));
    }
    if line.starts_with('#') {
        return None;
    }
    Some(match line.split_once('=') {
        Some((name, value)) if is_option(name) && !value.is_empty() => {
            Ok((name.to_string(), Setting::Value(value.to_string())))
        }
        _ => Err(()),
    })
}

/// Whether `name` is an option's name, `CONFIG_` and capitals, digits and underscores.
fn is_option(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|n| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// The settings a fragment asks for, in its order.
fn parse_fragment(text: &str) -> Result<Vec<(String, Setting)>, KernelBuildError> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            parse_line(line).map(|r| {
                r.map_err(|()| KernelBuildError::Fragment {
                    line: i + 1,
                    text: line.to_string(),
                })
            })
        })
        .collect()
}

/// Checks that the `.config` text gives every option as `wants` asks: a value exactly, and
/// `not set` as anything but a value.
fn verify(wants: &[(String, Setting)], config: &str) -> Result<(), KernelBuildError> {
    let have: BTreeMap<String, Setting> =
        config.lines().filter_map(|l| parse_line(l)?.ok()).collect();
    let mismatches: Vec<Mismatch> = wants
        .iter()
        .filter_map(|(option, asked)| {
            let got = have.get(option);
            let ok = match asked {
                Setting::Value(_) => got == Some(asked),
                Setting::NotSet => !matches!(got, Some(Setting::Value(_))),
            };
            (!ok).then(|| Mismatch {
                option: option.clone(),
                asked: asked.clone(),
                got: got.cloned(),
            })
        })
        .collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(KernelBuildError::Config(mismatches))
    }
}

/// A spinner that shows the step and the time since it started.
fn spinner(progress: &Progress, msg: &str) -> ProgressBar {
    // Cleared however the build ends, so an error is not printed beside a stale step.
    let bar = progress
        .spinner(msg)
        .with_finish(indicatif::ProgressFinish::AndClear);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed_precise})")
            .expect("a valid template"),
    );
    bar
}

/// An [`KernelBuildError::Io`] maker for `path`.
fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelBuildError {
    let path = path.to_path_buf();
    move |source| KernelBuildError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTS: &str = "# A comment.\n\
        CONFIG_64BIT=y\n\
        \n\
        ## A heading\n\
        CONFIG_NR_CPUS=64\n\
        CONFIG_LOCALVERSION=\"-oci2uk\"\n\
        # CONFIG_LOCALVERSION_AUTO is not set\n";

    const GOOD: &str = "#\n# Automatically generated file; DO NOT EDIT.\n#\n\
        CONFIG_64BIT=y\n\
        CONFIG_NR_CPUS=64\n\
        CONFIG_LOCALVERSION=\"-oci2uk\"\n\
        # CONFIG_LOCALVERSION_AUTO is not set\n\
        CONFIG_X86=y\n";

    fn mismatches(config: &str) -> Vec<Mismatch> {
        match verify(&parse_fragment(WANTS).unwrap(), config) {
            Ok(()) => Vec::new(),
            Err(KernelBuildError::Config(m)) => m,
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn parses_a_fragment() {
        let wants = parse_fragment(WANTS).unwrap();
        let value = |v: &str| Setting::Value(v.to_string());
        assert_eq!(
            wants,
            vec![
                ("CONFIG_64BIT".to_string(), value("y")),
                ("CONFIG_NR_CPUS".to_string(), value("64")),
                ("CONFIG_LOCALVERSION".to_string(), value("\"-oci2uk\"")),
                ("CONFIG_LOCALVERSION_AUTO".to_string(), Setting::NotSet),
            ]
        );
        let err = parse_fragment("CONFIG_A=y\nCONFIG_B y\n").unwrap_err();
        assert!(
            matches!(err, KernelBuildError::Fragment { line: 2, .. }),
            "{err}"
        );
        assert!(parse_fragment("config_a=y\n").is_err());
        assert!(parse_fragment("CONFIG_A=\n").is_err());
    }

    #[test]
    fn the_embedded_fragment_parses() {
        let wants = parse_fragment(FRAGMENT).unwrap();
        assert!(wants.len() > 50, "{} options", wants.len());
        assert!(wants.contains(&("CONFIG_PVH".to_string(), Setting::Value("y".to_string()))));
    }

    #[test]
    fn verification_accepts_what_was_asked() {
        assert!(mismatches(GOOD).is_empty());
        // A not-set option may also be absent.
        let absent = GOOD.replace("# CONFIG_LOCALVERSION_AUTO is not set\n", "");
        assert!(mismatches(&absent).is_empty());
    }

    #[test]
    fn verification_names_each_option_that_differs() {
        let missing = GOOD.replace("CONFIG_NR_CPUS=64\n", "");
        assert_eq!(
            mismatches(&missing),
            vec![Mismatch {
                option: "CONFIG_NR_CPUS".to_string(),
                asked: Setting::Value("64".to_string()),
                got: None,
            }]
        );
        let other = GOOD
            .replace("CONFIG_NR_CPUS=64", "CONFIG_NR_CPUS=8")
            .replace("CONFIG_64BIT=y", "# CONFIG_64BIT is not set");
        let m = mismatches(&other);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].got, Some(Setting::NotSet));
        assert_eq!(m[1].got, Some(Setting::Value("8".to_string())));
        let set = GOOD.replace(
            "# CONFIG_LOCALVERSION_AUTO is not set",
            "CONFIG_LOCALVERSION_AUTO=y",
        );
        assert_eq!(
            mismatches(&set),
            vec![Mismatch {
                option: "CONFIG_LOCALVERSION_AUTO".to_string(),
                asked: Setting::NotSet,
                got: Some(Setting::Value("y".to_string())),
            }]
        );
        let err = verify(&parse_fragment(WANTS).unwrap(), &other)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CONFIG_64BIT asked =y, Kconfig gave not set"),
            "{err}"
        );
        assert!(
            err.contains("CONFIG_NR_CPUS asked =64, Kconfig gave =8"),
            "{err}"
        );
        let err = verify(&parse_fragment(WANTS).unwrap(), &missing)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CONFIG_NR_CPUS asked =64, Kconfig gave nothing"),
            "{err}"
        );
    }

    #[test]
    fn the_key_follows_every_input() {
        let key = cache_key(WANTS, "aa", "gcc 12");
        assert_eq!(key.len(), 64);
        assert_eq!(key, cache_key(WANTS, "aa", "gcc 12"));
        assert_ne!(key, cache_key(GOOD, "aa", "gcc 12"));
        assert_ne!(key, cache_key(WANTS, "ab", "gcc 12"));
        assert_ne!(key, cache_key(WANTS, "aa", "gcc 13"));
        // Parts are length-prefixed: moving bytes from one to the next is another key.
        assert_ne!(cache_key("ab", "c", "d"), cache_key("a", "bc", "d"));
    }

    #[test]
    fn a_directory_digest_follows_paths_bytes_and_links_but_not_git() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), "one").unwrap();
        std::os::unix::fs::symlink("b/f", root.join("a/l")).unwrap();
        let source = Source {
            path: root.to_path_buf(),
            tarball: false,
        };
        let first = source.digest().unwrap();
        fs::create_dir(root.join(".git")).unwrap();
        fs::write(root.join(".git/HEAD"), "ref").unwrap();
        assert_eq!(source.digest().unwrap(), first);
        fs::write(root.join("a/b/f"), "two").unwrap();
        let second = source.digest().unwrap();
        assert_ne!(second, first);
        fs::remove_file(root.join("a/l")).unwrap();
        std::os::unix::fs::symlink("b/g", root.join("a/l")).unwrap();
        assert_ne!(source.digest().unwrap(), second);
    }

    #[test]
    fn counts_options() {
        assert_eq!(count_options(GOOD), 4);
    }

    #[test]
    fn latest_is_the_linked_vmlinux() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest(dir.path()), None);
        let kernels = dir.path().join("kernels");
        fs::create_dir_all(kernels.join("k1")).unwrap();
        fs::write(kernels.join("k1/vmlinux"), "x").unwrap();
        point_latest(&kernels, "k1").unwrap();
        assert_eq!(
            latest(dir.path()),
            Some(kernels.join("latest").join("vmlinux"))
        );
        fs::create_dir_all(kernels.join("k2")).unwrap();
        point_latest(&kernels, "k2").unwrap();
        assert_eq!(latest(dir.path()), None);
        assert_eq!(
            fs::read_link(kernels.join("latest")).unwrap(),
            Path::new("k2")
        );
        let names: Vec<_> = fs::read_dir(&kernels)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    #[test]
    fn a_missing_default_source_says_what_to_install() {
        let err = Source::locate(Some(Path::new("/nonexistent/linux.tar.xz")))
            .err()
            .unwrap();
        assert!(err
            .to_string()
            .starts_with("no Linux source at /nonexistent/linux.tar.xz"));
        let err = KernelBuildError::NoDefaultSource(PathBuf::from(DEFAULT_SOURCE)).to_string();
        assert_eq!(
            err,
            "no Linux source at /usr/src/linux-source-6.1.tar.xz: install Debian's \
             linux-source-6.1 (apt-get install linux-source-6.1) or pass --source"
        );
    }
}
