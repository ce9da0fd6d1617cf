//! The command line's words: clap structs, and how they map to the library's types.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use oci2uk::build::Format;
use oci2uk::registry::RegistryOptions;
use oci2uk::rootfs::Layout;
use oci2uk::run::Accel;

#[derive(Parser)]
#[command(
    name = "oci2uk",
    version,
    about = "Turn a container image into one bootable unikernel file",
    long_about = "Turn a container image into one bootable unikernel file.\n\n\
        `oci2uk IMAGE` is short for `oci2uk build IMAGE`.",
    after_help = "Examples:\n  \
        oci2uk build nginx --format tar              # nginx.tar: the image's flattened tree\n  \
        oci2uk 127.0.0.1:5000/web/nginx:1 --format tar -o - | tar -t\n  \
        oci2uk build oci:./layout:app --format tar\n  \
        oci2uk build docker-archive:app.tar --format tar --json"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Pull an image, flatten it and write the output (the default command).
    Build(Box<BuildArgs>),
    /// Boot a baked file, a pushed unikernel or an image on QEMU: console on stdout, the
    /// application's exit status as ours.
    ///
    /// ctrl-C, SIGTERM and SIGHUP stop it as `docker stop` does: the application gets the
    /// image's stop signal and its exit status is run's; after --stop-timeout it is killed
    /// (137). QEMU ends with run, however run ends. Status 125: oci2uk or the VM failed (a busy
    /// host port, no QEMU) before the application reported one.
    Run(RunArgs),
    /// Push a baked file or a bundle directory to a registry as an OCI image.
    Push(PushArgs),
    /// Show what a baked file or a reference holds, without booting it.
    Inspect(InspectArgs),
    /// The oci2uk kernel, and kernels in registries.
    #[command(subcommand)]
    Kernel(KernelCommand),
}

#[derive(Subcommand)]
pub enum KernelCommand {
    /// Build the oci2uk kernel: Linux configured for one application, with no modules.
    ///
    /// Builds a vmlinux from a Linux source (Debian's linux-source-6.1 by default) with
    /// `make tinyconfig` and oci2uk's configuration fragment (every driver a guest needs built
    /// in, no modules), and checks that Kconfig kept every option of the fragment. The result,
    /// `vmlinux` and its `config`, goes to the cache under the digest of its inputs (the
    /// fragment, the source, the compiler), so the same inputs are built once and give the same
    /// bytes. Once built it is the kernel `oci2uk build` uses when no --kernel is given.
    Build(KernelBuildArgs),
    /// Push a kernel image and its modules, for `--kernel REF`; a kernel built without modules
    /// (the oci2uk kernel) goes alone.
    Push(KernelPushArgs),
}

#[derive(Args)]
pub struct KernelBuildArgs {
    /// The Linux source: a tarball (.tar.xz, .tar.gz, .tar, ...) or a directory holding a
    /// clean, unpacked source tree (built out of tree, left as it is). Default:
    /// /usr/src/linux-source-6.1.tar.xz, from Debian's linux-source-6.1.
    #[arg(long, value_name = "DIR|TARBALL")]
    pub source: Option<PathBuf>,

    /// Also copy the kernel and its configuration into DIR, as vmlinux-RELEASE and
    /// config-RELEASE.
    #[arg(short, long, value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// Parallel make jobs. Default: the number of CPUs.
    #[arg(short, long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args)]
pub struct PushArgs {
    /// The baked file (`oci2uk build` writes one) or bundle directory.
    pub path: PathBuf,

    /// Where to push: REGISTRY/REPOSITORY[:TAG].
    pub reference: String,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A baked file, or an image: a reference or a transport (`oci:DIR`, ...).
    pub target: String,

    /// Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args)]
pub struct KernelPushArgs {
    /// The kernel image: a bzImage/vmlinuz or vmlinux.
    pub path: PathBuf,

    /// Where to push: REGISTRY/REPOSITORY[:TAG].
    pub reference: String,

    /// The kernel's module tree. Default: /lib/modules/VERSION, VERSION read from the kernel;
    /// none for a kernel built without modules.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args)]
pub struct RunArgs {
    /// A baked file (`oci2uk build IMAGE` writes one), a pushed unikernel's reference, or an
    /// image (built first, and kept in the cache).
    pub target: String,

    /// Forward a host port to the guest: [IP:]HOST:GUEST[/tcp|/udp]. Repeatable.
    #[arg(short, long = "publish", value_name = "HOST:GUEST")]
    pub publish: Vec<oci2uk::run::PortForward>,

    /// Guest memory: MiB, or a size with a suffix (512, 512M, 1G). Default: what the image
    /// needs (recorded in the file at build time) plus 256 MiB for the application's work,
    /// and at least 512 MiB.
    #[arg(short, long, value_name = "MEM")]
    pub memory: Option<String>,

    /// Set an environment variable of the application (K=V), without rebuilding. Repeatable.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,

    /// Mount host storage at DST in the guest, kept across runs: SRC:DST[:ro][,size=SIZE].
    /// SRC is a disk image when it is a file or its name ends in .img, .raw or .ext4 (a new
    /// one is made sparse with ext4, size= or 1G, and seeded from the image's DST); otherwise
    /// a host directory (made when missing), shared through virtiofs (needs root).
    /// Repeatable.
    #[arg(short, long, value_name = "SRC:DST[:OPTS]")]
    pub volume: Vec<oci2uk::run::VolumeSpec>,

    /// Set a kernel parameter before the application starts (vm.overcommit_memory=1), over
    /// those recorded at build time. Repeatable.
    #[arg(long, value_name = "K=V", value_parser = parse_sysctl)]
    pub sysctl: Vec<(String, String)>,

    /// Show the kernel's messages and each step of the guest's init on the console (appends
    /// `loglevel=7 oci2uk.debug=1` to the kernel command line).
    #[arg(long)]
    pub debug: bool,

    /// No messages of oci2uk's own but errors and the stop requests (the console is
    /// unchanged).
    #[arg(short, long)]
    pub quiet: bool,

    /// Seconds the application has to stop after ctrl-C, SIGTERM or SIGHUP, which press the
    /// guest's power button (the init sends the image's stop signal). Then the application
    /// is killed and run exits 137; a second ctrl-C stops the VM at once.
    #[arg(long, value_name = "SECONDS", default_value_t = oci2uk::run::DEFAULT_STOP_TIMEOUT_SECS)]
    pub stop_timeout: u32,

    /// Acceleration: `auto` uses KVM only where it can run guests.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// Cache directory for blobs and builds. Default: ~/.cache/oci2uk.
    #[arg(long, value_name = "DIR", env = "OCI2UK_CACHE")]
    pub cache: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AccelArg {
    /// KVM where it can run guests, else TCG.
    Auto,
    /// KVM.
    Kvm,
    /// Software emulation.
    Tcg,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// One bootable kernel file with the image baked in.
    Elf,
    /// The compressed initramfs alone.
    Initrd,
    /// The flattened image tree as a POSIX tar (what `docker export` gives).
    Tar,
    /// A directory with kernel, initrd, command line and launch files.
    Bundle,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RootfsArg {
    /// The image's tree in the initramfs, unpacked into RAM at boot.
    Initramfs,
    /// Not supported yet (no EROFS writer).
    Erofs,
    /// A compressed read-only SquashFS image in the initramfs, loop-mounted under a tmpfs
    /// overlay: the guest needs less memory.
    Squashfs,
}

impl RootfsArg {
    /// The default, [`oci2uk::rootfs::Layout::default`].
    pub const DEFAULT: RootfsArg = RootfsArg::Squashfs;
}

impl RootfsArg {
    /// The library's layout, for a format that has a root file system. EROFS has no writer:
    /// it is refused before any work, with the reason.
    pub fn layout(self, format: Format) -> anyhow::Result<Layout> {
        match self {
            Self::Initramfs => Ok(Layout::Initramfs),
            Self::Squashfs => Ok(Layout::Squashfs),
            // A tar has no root file system of its own: the flag does not matter.
            Self::Erofs if format == Format::Tar => Ok(Layout::default()),
            Self::Erofs => Err(anyhow::anyhow!(
                "--rootfs erofs is not supported yet: there is no maintained Rust EROFS writer, \
                 Debian 12's mkfs.erofs (1.5) cannot read a tar and oci2uk never unpacks an \
                 image onto the host; use --rootfs squashfs"
            )
            .context("cannot write the initramfs")),
        }
    }
}

#[derive(Args)]
pub struct BuildArgs {
    /// The image: a reference (`nginx`, `127.0.0.1:5000/web/nginx:1`, `REPO@sha256:...`) or
    /// `docker://REF`, `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:REPO:TAG]`.
    pub image: String,

    /// Output path; `-` writes to standard output. Default: NAME.EXT in the current directory,
    /// NAME being the repository's last component or the archive's stem.
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value = "elf")]
    pub format: FormatArg,

    /// The guest's root file system (`elf`, `initrd` and `bundle`).
    #[arg(long, value_enum, default_value_t = RootfsArg::DEFAULT)]
    pub rootfs: RootfsArg,

    /// Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT]. Default: this
    /// machine's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    pub platform: Option<String>,

    /// Largest total uncompressed size of the image's layers (suffixes K, M, G, T): the guard
    /// against decompression bombs.
    #[arg(long, value_name = "BYTES", default_value = "8G", value_parser = parse_size)]
    pub max_size: u64,

    /// The kernel: a bzImage/vmlinuz or vmlinux, or the reference of a kernel pushed with
    /// `oci2uk kernel push` (its modules come with it). Default: $OCI2UK_KERNEL, else the
    /// newest installed kernel whose modules are present.
    #[arg(long, value_name = "PATH|REF")]
    pub kernel: Option<String>,

    /// The kernel's module tree. Default: /lib/modules/VERSION, VERSION read from the kernel.
    #[arg(long, value_name = "DIR")]
    pub modules: Option<PathBuf>,

    /// Set an environment variable (K=V), or pass this machine's value of K. Repeatable.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,

    /// Replace the image's Entrypoint: a JSON array or one word. Clears the image's Cmd
    /// unless --cmd is given too (docker's rule).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,

    /// Replace the image's Cmd: a JSON array or one word.
    #[arg(long, value_name = "CMD")]
    pub cmd: Option<String>,

    /// Working directory of the application.
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// User to run as: NAME or UID, optionally :GROUP or :GID, resolved in the image.
    #[arg(short, long, value_name = "U[:G]")]
    pub user: Option<String>,

    /// Network: `dhcp` (default) or a static ADDR/LEN[,GATEWAY].
    #[arg(long, value_name = "dhcp|ADDR/LEN[,GW]")]
    pub net: Option<String>,

    /// Host name of the guest. Default: the output's name.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,

    /// Set a kernel parameter before the application starts, as docker's --sysctl
    /// (vm.overcommit_memory=1). Repeatable.
    #[arg(long, value_name = "K=V", value_parser = parse_sysctl)]
    pub sysctl: Vec<(String, String)>,

    /// Push the result (`--format elf` or `bundle`) to this reference once it is written.
    #[arg(long, value_name = "REF")]
    pub push: Option<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// Registry credentials as USER:PASS (never printed).
    #[arg(
        long,
        value_name = "USER:PASS",
        env = "OCI2UK_CREDS",
        hide_env_values = true
    )]
    pub creds: Option<String>,

    /// A docker/podman auth file to read credentials from. Default: ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    pub authfile: Option<PathBuf>,

    /// Allow plain HTTP and unverified TLS for any registry (loopback registries fall back to
    /// plain HTTP without it).
    #[arg(long)]
    pub insecure: bool,

    /// A CA certificate (PEM) to trust besides the system's roots.
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Args)]
pub struct CommonArgs {
    /// Cache directory for blobs. Default: ~/.cache/oci2uk.
    #[arg(long, value_name = "DIR", env = "OCI2UK_CACHE")]
    pub cache: Option<PathBuf>,

    /// No progress bars and no messages except errors.
    #[arg(short, long)]
    pub quiet: bool,

    /// Print one JSON object describing the result on standard output.
    #[arg(long)]
    pub json: bool,
}

impl From<RegistryArgs> for RegistryOptions {
    fn from(a: RegistryArgs) -> Self {
        Self {
            creds: a.creds,
            authfile: a.authfile,
            insecure: a.insecure,
            ca_cert: a.ca_cert,
        }
    }
}

/// Inserts `build` when the first argument is not a subcommand, so `oci2uk IMAGE` builds.
pub fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    const KNOWN: &[&str] = &[
        "build",
        "run",
        "push",
        "inspect",
        "kernel",
        "help",
        "-h",
        "--help",
        "-V",
        "--version",
    ];
    match args.get(1).and_then(|a| a.to_str()) {
        Some(first) if KNOWN.contains(&first) => {}
        None => {}
        Some(_) => args.insert(1, "build".into()),
    }
    args
}

impl From<FormatArg> for Format {
    fn from(a: FormatArg) -> Self {
        match a {
            FormatArg::Elf => Self::Elf,
            FormatArg::Initrd => Self::Initrd,
            FormatArg::Tar => Self::Tar,
            FormatArg::Bundle => Self::Bundle,
        }
    }
}

impl From<AccelArg> for Accel {
    fn from(a: AccelArg) -> Self {
        match a {
            AccelArg::Auto => Self::Auto,
            AccelArg::Kvm => Self::Kvm,
            AccelArg::Tcg => Self::Tcg,
        }
    }
}

impl Command {
    /// Whether the command asked for no messages but errors.
    pub fn quiet(&self) -> bool {
        match self {
            Self::Build(b) => b.common.quiet,
            Self::Run(r) => r.quiet,
            Self::Push(p) => p.common.quiet,
            Self::Inspect(i) => i.common.quiet,
            Self::Kernel(KernelCommand::Build(k)) => k.common.quiet,
            Self::Kernel(KernelCommand::Push(k)) => k.common.quiet,
        }
    }
}

/// Parses `--sysctl K=V`: a dotted name that stays inside `/proc/sys` and any value.
pub fn parse_sysctl(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not of the form NAME=VALUE (vm.overcommit_memory=1)"))?;
    oci2uk_config::model::check_sysctl_key(k).map_err(|why| format!("sysctl {k:?}: {why}"))?;
    if v.contains('\0') {
        return Err(format!("sysctl {k:?}: the value contains a NUL character"));
    }
    Ok((k.to_owned(), v.to_owned()))
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
    use clap::CommandFactory;

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
    fn sysctls() {
        assert_eq!(
            parse_sysctl("vm.overcommit_memory=1").unwrap(),
            ("vm.overcommit_memory".to_owned(), "1".to_owned())
        );
        assert_eq!(
            parse_sysctl("net.ipv4.ip_local_port_range=1024 65000").unwrap(),
            (
                "net.ipv4.ip_local_port_range".to_owned(),
                "1024 65000".to_owned()
            )
        );
        assert_eq!(parse_sysctl("kernel.x=").unwrap().1, "");
        assert!(parse_sysctl("vm.overcommit_memory")
            .unwrap_err()
            .contains("NAME=VALUE"));
        let e = parse_sysctl("../../etc/passwd=x").unwrap_err();
        assert!(e.contains("\"../../etc/passwd\""), "{e}");
        assert!(parse_sysctl("vm..x=1")
            .unwrap_err()
            .contains("empty component"));
        assert!(parse_sysctl("=1").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_rootfs_default_is_the_librarys() {
        assert_eq!(
            RootfsArg::DEFAULT.layout(Format::Elf).unwrap(),
            oci2uk::rootfs::Layout::default()
        );
    }

    #[test]
    fn erofs_is_refused_but_for_a_tar() {
        let err = RootfsArg::Erofs.layout(Format::Elf).unwrap_err();
        let chain: Vec<String> = err.chain().map(|c| c.to_string()).collect();
        assert!(chain.join(": ").contains("not supported yet"), "{err:#}");
        assert!(RootfsArg::Erofs.layout(Format::Tar).is_ok());
    }

    #[test]
    fn the_max_size_default_is_the_librarys() {
        assert_eq!(parse_size("8G").unwrap(), oci2uk::build::DEFAULT_MAX_SIZE);
    }

    #[test]
    fn build_is_the_default_command() {
        let argv = |v: &[&str]| with_default_subcommand(v.iter().map(Into::into).collect());
        assert_eq!(argv(&["oci2uk", "nginx"])[1], "build");
        assert_eq!(argv(&["oci2uk", "--format", "tar", "nginx"])[1], "build");
        assert_eq!(argv(&["oci2uk", "build", "nginx"]).len(), 3);
        assert_eq!(argv(&["oci2uk", "--help"]).len(), 2);
    }
}
