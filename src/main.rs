//! The `oci2uk` command line: parses arguments, calls the library, maps errors to exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use oci2uk::artifact::push::{self, PushOptions};
use oci2uk::artifact::{fetch, inspect, BakedInfo};
use oci2uk::build::{self, BuildRequest, Destination, Format};
use oci2uk::cache::Cache;
use oci2uk::flatten::FlattenOptions;
use oci2uk::image::{Platform, ResolveOptions};
use oci2uk::progress::Progress;
use oci2uk::reference::{ImageRef, Source};
use oci2uk::registry::{BlobPush, RegistryOptions};

/// Exit status for a failure that was reported.
const EXIT_FAILURE: u8 = 1;

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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull an image, flatten it and write the output (the default command).
    Build(Box<BuildArgs>),
    /// Boot a baked file, a pushed unikernel or an image on QEMU: console on stdout, the
    /// application's exit status as ours.
    Run(RunArgs),
    /// Push a baked file or a bundle directory to a registry as an OCI image.
    Push(PushArgs),
    /// Show what a baked file or a reference holds, without booting it.
    Inspect(InspectArgs),
    /// Kernels in registries.
    #[command(subcommand)]
    Kernel(KernelCommand),
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Push a kernel image and its modules, for `--kernel REF`.
    Push(KernelPushArgs),
}

#[derive(Args)]
struct PushArgs {
    /// The baked file (`oci2uk build` writes one) or bundle directory.
    path: PathBuf,

    /// Where to push: REGISTRY/REPOSITORY[:TAG].
    reference: String,

    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct InspectArgs {
    /// A baked file, or an image: a reference or a transport (`oci:DIR`, ...).
    target: String,

    /// Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,

    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct KernelPushArgs {
    /// The kernel image: a bzImage/vmlinuz or vmlinux.
    path: PathBuf,

    /// Where to push: REGISTRY/REPOSITORY[:TAG].
    reference: String,

    /// The kernel's module tree. Default: /lib/modules/VERSION, VERSION read from the kernel.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,

    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct RunArgs {
    /// A baked file (`oci2uk build IMAGE` writes one), a pushed unikernel's reference, or an
    /// image (built first, and kept in the cache).
    target: String,

    /// Forward a host port to the guest: [IP:]HOST:GUEST[/tcp|/udp]. Repeatable.
    #[arg(short, long = "publish", value_name = "HOST:GUEST")]
    publish: Vec<oci2uk::run::PortForward>,

    /// Guest memory: MiB, or a size with a suffix (512, 512M, 1G). Default: what the image
    /// needs, recorded in the file at build time.
    #[arg(short, long, value_name = "MEM")]
    memory: Option<String>,

    /// Set an environment variable of the application (K=V), without rebuilding. Repeatable.
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,

    /// Acceleration: `auto` uses KVM only where it can run guests.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,

    #[command(flatten)]
    registry: RegistryArgs,

    /// Cache directory for blobs and builds. Default: ~/.cache/oci2uk.
    #[arg(long, value_name = "DIR", env = "OCI2UK_CACHE")]
    cache: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    /// KVM where it can run guests, else TCG.
    Auto,
    /// KVM.
    Kvm,
    /// Software emulation.
    Tcg,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
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
enum RootfsArg {
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
    const DEFAULT: RootfsArg = RootfsArg::Squashfs;
}

impl From<RootfsArg> for oci2uk::rootfs::Layout {
    fn from(a: RootfsArg) -> Self {
        match a {
            RootfsArg::Initramfs => Self::Initramfs,
            RootfsArg::Erofs => Self::Erofs,
            RootfsArg::Squashfs => Self::Squashfs,
        }
    }
}

#[derive(Args)]
struct BuildArgs {
    /// The image: a reference (`nginx`, `127.0.0.1:5000/web/nginx:1`, `REPO@sha256:...`) or
    /// `docker://REF`, `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:REPO:TAG]`.
    image: String,

    /// Output path; `-` writes to standard output. Default: NAME.EXT in the current directory,
    /// NAME being the repository's last component or the archive's stem.
    #[arg(short, long, value_name = "PATH")]
    output: Option<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value = "elf")]
    format: FormatArg,

    /// The guest's root file system (`elf`, `initrd` and `bundle`).
    #[arg(long, value_enum, default_value_t = RootfsArg::DEFAULT)]
    rootfs: RootfsArg,

    /// Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT]. Default: this
    /// machine's.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,

    /// Largest total uncompressed size of the image's layers (suffixes K, M, G, T): the guard
    /// against decompression bombs.
    #[arg(long, value_name = "BYTES", default_value = "8G", value_parser = build::parse_size)]
    max_size: u64,

    /// The kernel: a bzImage/vmlinuz or vmlinux, or the reference of a kernel pushed with
    /// `oci2uk kernel push` (its modules come with it). Default: $OCI2UK_KERNEL, else the
    /// newest installed kernel whose modules are present.
    #[arg(long, value_name = "PATH|REF")]
    kernel: Option<String>,

    /// The kernel's module tree. Default: /lib/modules/VERSION, VERSION read from the kernel.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,

    /// Set an environment variable (K=V), or pass this machine's value of K. Repeatable.
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,

    /// Replace the image's Entrypoint: a JSON array or one word. Clears the image's Cmd
    /// unless --cmd is given too (docker's rule).
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,

    /// Replace the image's Cmd: a JSON array or one word.
    #[arg(long, value_name = "CMD")]
    cmd: Option<String>,

    /// Working directory of the application.
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,

    /// User to run as: NAME or UID, optionally :GROUP or :GID, resolved in the image.
    #[arg(short, long, value_name = "U[:G]")]
    user: Option<String>,

    /// Network: `dhcp` (default) or a static ADDR/LEN[,GATEWAY].
    #[arg(long, value_name = "dhcp|ADDR/LEN[,GW]")]
    net: Option<String>,

    /// Host name of the guest. Default: the output's name.
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,

    /// Push the result (`--format elf` or `bundle`) to this reference once it is written.
    #[arg(long, value_name = "REF")]
    push: Option<String>,

    #[command(flatten)]
    registry: RegistryArgs,

    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args, Clone)]
struct RegistryArgs {
    /// Registry credentials as USER:PASS (never printed).
    #[arg(
        long,
        value_name = "USER:PASS",
        env = "OCI2UK_CREDS",
        hide_env_values = true
    )]
    creds: Option<String>,

    /// A docker/podman auth file to read credentials from. Default: ~/.docker/config.json.
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,

    /// Allow plain HTTP and unverified TLS for any registry (loopback registries fall back to
    /// plain HTTP without it).
    #[arg(long)]
    insecure: bool,

    /// A CA certificate (PEM) to trust besides the system's roots.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

#[derive(Args)]
struct CommonArgs {
    /// Cache directory for blobs. Default: ~/.cache/oci2uk.
    #[arg(long, value_name = "DIR", env = "OCI2UK_CACHE")]
    cache: Option<PathBuf>,

    /// No progress bars and no messages except errors.
    #[arg(short, long)]
    quiet: bool,

    /// Print one JSON object describing the result on standard output.
    #[arg(long)]
    json: bool,
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
fn with_default_subcommand(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
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

fn main() -> ExitCode {
    let cli = Cli::parse_from(with_default_subcommand(std::env::args_os().collect()));
    let quiet = match &cli.command {
        Command::Build(b) => b.common.quiet,
        Command::Run(_) => false,
        Command::Push(p) => p.common.quiet,
        Command::Inspect(i) => i.common.quiet,
        Command::Kernel(KernelCommand::Push(k)) => k.common.quiet,
    };
    init_logging(quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the runtime")),
    };
    match cli.command {
        Command::Build(args) => match runtime.block_on(cmd_build(*args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        Command::Push(args) => finish(runtime.block_on(cmd_push(args))),
        Command::Inspect(args) => finish(runtime.block_on(cmd_inspect(args))),
        Command::Kernel(KernelCommand::Push(args)) => {
            finish(runtime.block_on(cmd_kernel_push(args)))
        }
        Command::Run(args) => match runtime.block_on(cmd_run(args)) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
                eprintln!("oci2uk: error: {}", chain.join(": "));
                ExitCode::from(oci2uk::run::EXIT_VM_FAILED)
            }
        },
    }
}

fn init_logging(quiet: bool) {
    let default = if quiet { "error" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OCI2UK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Asked-for logs carry the time since the start, which tells where a build spends it;
    // warnings and errors alone are plain lines.
    if std::env::var_os("OCI2UK_LOG").is_some() {
        fmt.with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    } else {
        fmt.without_time().init();
    }
}

fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints the error chain on one line and returns the failure status.
fn fail(e: &anyhow::Error) -> ExitCode {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    eprintln!("oci2uk: error: {}", chain.join(": "));
    ExitCode::from(EXIT_FAILURE)
}

async fn cmd_build(args: BuildArgs) -> anyhow::Result<()> {
    let source: Source = args.image.parse()?;
    let platform = match &args.platform {
        Some(p) => Some(p.parse::<Platform>()?),
        None => None,
    };
    let command = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<Vec<String>>> {
        v.as_deref()
            .map(|c| oci2uk::plan::parse_command(c).with_context(|| format!("invalid {flag}")))
            .transpose()
    };
    let overrides = oci2uk::plan::Overrides {
        env: args.env.clone(),
        entrypoint: command("--entrypoint", &args.entrypoint)?,
        cmd: command("--cmd", &args.cmd)?,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        net: args.net.clone(),
        hostname: args.hostname.clone(),
    };
    let output = args.output.map(|p| {
        if p.as_os_str() == "-" {
            Destination::Stdout
        } else {
            Destination::Path(p)
        }
    });
    let source_date_epoch = source_date_epoch()?;
    let format = match args.format {
        FormatArg::Elf => Format::Elf,
        FormatArg::Initrd => Format::Initrd,
        FormatArg::Tar => Format::Tar,
        FormatArg::Bundle => Format::Bundle,
    };
    // A push needs a file (or bundle) to push, found out before any work.
    let push = match &args.push {
        Some(r) => {
            anyhow::ensure!(
                matches!(format, Format::Elf | Format::Bundle),
                "--push needs --format elf or bundle: only a baked file can be pushed"
            );
            anyhow::ensure!(
                output != Some(Destination::Stdout),
                "--push cannot be used with -o -: the pushed file must be written first"
            );
            Some(
                r.parse::<ImageRef>()
                    .with_context(|| format!("invalid --push {r:?}"))?,
            )
        }
        None => None,
    };
    let registry: RegistryOptions = args.registry.into();
    let cache = Cache::open(args.common.cache.as_deref())?;
    let progress = Progress::new(!args.common.quiet);
    let (kernel, modules) =
        resolve_kernel(args.kernel, args.modules, &registry, &cache, &progress).await?;
    let req = BuildRequest {
        source,
        format,
        output,
        resolve: ResolveOptions {
            platform: Platform::host(),
            registry: registry.clone(),
            max_blob_size: Some(args.max_size),
        },
        platform,
        kernel,
        modules,
        overrides,
        rootfs: args.rootfs.into(),
        flatten: FlattenOptions {
            max_size: args.max_size,
        },
        source_date_epoch,
    };
    let outcome = build::build(&req, &cache, &progress).await?;
    let pushed = match &push {
        Some(r) => {
            let opts = PushOptions {
                registry,
                source_date_epoch,
            };
            let path = PathBuf::from(&outcome.output);
            Some(push::push_path(&path, r, &opts, &cache, &progress).await?)
        }
        None => None,
    };
    if args.common.json {
        let mut v = serde_json::to_value(&outcome)?;
        if let Some(p) = &pushed {
            v["push"] = serde_json::to_value(p)?;
        }
        println!("{v}");
    } else if !args.common.quiet {
        if let Some(k) = &outcome.kernel {
            eprintln!("oci2uk: kernel {k}");
        }
        let memory = outcome
            .memory_mib
            .map(|m| format!(", needs {m} MiB of guest memory"))
            .unwrap_or_default();
        eprintln!(
            "oci2uk: wrote {} ({} bytes, sha256:{}{memory}) from {}@{}",
            outcome.output, outcome.size, outcome.sha256, outcome.source, outcome.manifest_digest
        );
        if let Some(p) = &pushed {
            report_push(p);
        }
    }
    Ok(())
}

/// `SOURCE_DATE_EPOCH`, when set.
fn source_date_epoch() -> anyhow::Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => Ok(Some(v.parse::<i64>().with_context(|| {
            format!("invalid SOURCE_DATE_EPOCH {v:?}: expected seconds since 1970")
        })?)),
        _ => Ok(None),
    }
}

/// A registry reference named by `s`, when `s` is not an existing file and looks like one
/// (`docker://REF`, or a first component that is a host: `HOST.DOMAIN/...`, `HOST:PORT/...`,
/// `localhost/...`).
fn registry_reference(s: &str) -> Option<anyhow::Result<ImageRef>> {
    if let Some(r) = s.strip_prefix("docker://") {
        return Some(
            r.parse()
                .with_context(|| format!("invalid reference {s:?}")),
        );
    }
    if std::path::Path::new(s).exists() || s.starts_with('/') || s.starts_with('.') {
        return None;
    }
    let (host, _) = s.split_once('/')?;
    if host.contains('.') || host.contains(':') || host == "localhost" {
        Some(
            s.parse()
                .with_context(|| format!("invalid reference {s:?}")),
        )
    } else {
        None
    }
}

/// `--kernel PATH|REF` and `--modules`: a reference is fetched into the cache.
async fn resolve_kernel(
    kernel: Option<String>,
    modules: Option<PathBuf>,
    registry: &RegistryOptions,
    cache: &Cache,
    progress: &Progress,
) -> anyhow::Result<(Option<PathBuf>, Option<PathBuf>)> {
    let Some(k) = kernel else {
        return Ok((None, modules));
    };
    match registry_reference(&k) {
        None => Ok((Some(PathBuf::from(k)), modules)),
        Some(r) => {
            let r = r?;
            let (image, dir) = fetch::kernel(&r, registry, cache, progress)
                .await
                .with_context(|| format!("cannot use --kernel {k}"))?;
            Ok((Some(image), Some(modules.unwrap_or(dir))))
        }
    }
}

fn report_push(p: &push::PushOutcome) {
    let count = |how| p.blobs.iter().filter(|b| b.how == how).count();
    eprintln!(
        "oci2uk: pushed {}@{} ({} blobs uploaded, {} mounted, {} already there)",
        p.reference,
        p.digest,
        count(BlobPush::Uploaded),
        count(BlobPush::Mounted),
        count(BlobPush::Existed)
    );
}

/// What `push` and `kernel push` share: the destination, cache, progress and options.
fn push_setup(
    reference: &str,
    registry: RegistryArgs,
    common: &CommonArgs,
) -> anyhow::Result<(ImageRef, Cache, Progress, PushOptions)> {
    let r: ImageRef = reference
        .parse()
        .with_context(|| format!("invalid reference {reference:?}"))?;
    let opts = PushOptions {
        registry: registry.into(),
        source_date_epoch: source_date_epoch()?,
    };
    Ok((
        r,
        Cache::open(common.cache.as_deref())?,
        Progress::new(!common.quiet),
        opts,
    ))
}

/// Prints a push's outcome as `--json`/`--quiet` ask.
fn print_push(p: &push::PushOutcome, common: &CommonArgs) -> anyhow::Result<()> {
    if common.json {
        println!("{}", serde_json::to_string(p)?);
    } else if !common.quiet {
        report_push(p);
    }
    Ok(())
}

async fn cmd_push(args: PushArgs) -> anyhow::Result<()> {
    let (r, cache, progress, opts) = push_setup(&args.reference, args.registry, &args.common)?;
    let p = push::push_path(&args.path, &r, &opts, &cache, &progress).await?;
    print_push(&p, &args.common)
}

async fn cmd_kernel_push(args: KernelPushArgs) -> anyhow::Result<()> {
    let (r, cache, progress, opts) = push_setup(&args.reference, args.registry, &args.common)?;
    let modules = args.modules.as_deref();
    let p = push::push_kernel(&args.path, modules, &r, &opts, &cache, &progress).await?;
    print_push(&p, &args.common)
}

async fn cmd_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let cache = Cache::open(args.common.cache.as_deref())?;
    let registry: RegistryOptions = args.registry.into();
    let platform = match &args.platform {
        Some(p) => p.parse::<Platform>()?,
        None => Platform::host(),
    };
    let target = &args.target;
    let report = if std::path::Path::new(target).is_file() {
        let path = PathBuf::from(target);
        let info = tokio::task::spawn_blocking(move || BakedInfo::read(&path)).await??;
        inspect::file(target, &info)
    } else {
        let source: Source = target.parse()?;
        match source {
            Source::Registry(r) => {
                let remote = fetch::resolve(&r, &registry, &platform).await?;
                let config = if remote.resolved.is_unikernel() || remote.resolved.is_kernel() {
                    None
                } else {
                    Some(remote.config(&cache).await?)
                };
                inspect::remote(&remote.resolved, config.as_ref())
            }
            other => {
                let opts = ResolveOptions {
                    platform,
                    registry,
                    max_blob_size: None,
                };
                let img = oci2uk::image::resolve(&other, &opts, &cache, &Progress::hidden())
                    .await
                    .with_context(|| format!("cannot get image {target}"))?;
                inspect::image(&img)
            }
        }
    };
    if args.common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", inspect::text(&report));
    }
    Ok(())
}

/// The file `run` boots: the target itself, a pushed unikernel fetched into the cache, or an
/// image built into the cache (kept by manifest digest and kernel, so the next run boots at
/// once). The directory returned with it, if any, holds a build that is not kept.
async fn run_file(args: &RunArgs) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    let target = &args.target;
    if std::path::Path::new(target).is_file() {
        return Ok((PathBuf::from(target), None));
    }
    let source: Source = target
        .parse()
        .with_context(|| format!("{target:?} is neither a file nor an image reference"))?;
    let cache = Cache::open(args.cache.as_deref())?;
    let progress = Progress::new(true);
    let registry: RegistryOptions = args.registry.clone().into();
    let chosen = oci2uk::kernel::discover(None)?;
    let build_to = |source: Source, out: PathBuf| BuildRequest {
        source,
        format: Format::Elf,
        output: Some(Destination::Path(out)),
        resolve: ResolveOptions {
            platform: Platform::host(),
            registry: registry.clone(),
            max_blob_size: Some(8 << 30),
        },
        platform: None,
        kernel: Some(chosen.path.clone()),
        modules: None,
        overrides: Default::default(),
        rootfs: Default::default(),
        flatten: FlattenOptions { max_size: 8 << 30 },
        source_date_epoch: None,
    };
    let Source::Registry(r) = source else {
        let dir = tempfile::Builder::new()
            .prefix("run-")
            .tempdir_in(cache.tmp_dir())?;
        let out = dir.path().join(format!("{}.elf", source.name()));
        build::build(&build_to(source, out.clone()), &cache, &progress).await?;
        return Ok((out, Some(dir)));
    };
    let platform = Platform {
        os: "linux".into(),
        architecture: Platform::host().architecture,
        variant: None,
    };
    let remote = fetch::resolve(&r, &registry, &platform).await?;
    if remote.resolved.is_unikernel() {
        return Ok((remote.unikernel(&cache, &progress).await?, None));
    }
    let meta = std::fs::metadata(&chosen.path)
        .with_context(|| format!("cannot read the kernel {}", chosen.path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = oci2uk::cache::Hasher::sha256();
    h.update(
        format!(
            "oci2uk {}\n{}\n{}\n{}\n{mtime}\n",
            env!("CARGO_PKG_VERSION"),
            remote.resolved.digest,
            chosen.path.display(),
            meta.len()
        )
        .as_bytes(),
    );
    let key = h.finish();
    let out = cache
        .root()
        .join("builds")
        .join(format!("{}.elf", key.digest()));
    if out.is_file() {
        tracing::info!(path = %out.display(), "built before");
        return Ok((out, None));
    }
    std::fs::create_dir_all(out.parent().expect("a cache path"))?;
    let pinned = Source::Registry(r.with_digest(remote.resolved.digest.as_ref()));
    let outcome = build::build(&build_to(pinned, out.clone()), &cache, &progress).await?;
    eprintln!(
        "oci2uk: built {}@{} with kernel {}",
        outcome.source,
        outcome.manifest_digest,
        chosen.path.display()
    );
    Ok((out, None))
}

async fn cmd_run(args: RunArgs) -> anyhow::Result<u8> {
    use oci2uk::run::{self, Accel, RunOptions};
    let (file, _keep) = run_file(&args).await?;
    let recorded =
        run::recorded_memory(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let memory_mib = match (&args.memory, recorded) {
        (Some(m), Some(need)) => {
            let m = parse_memory(m)?;
            // Below this the initramfs does not fit: the kernel would fail to unpack it and
            // panic, or hang before printing anything.
            anyhow::ensure!(
                m >= need,
                "-m {m} is too small: {} needs {need} MiB of guest memory (recorded when it was built)",
                args.target
            );
            m
        }
        (Some(m), None) => parse_memory(m)?,
        (None, need) => need.unwrap_or(512),
    };
    let env = args
        .env
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => match std::env::var(kv) {
                Ok(v) if !kv.is_empty() => Ok((kv.clone(), v)),
                _ => {
                    anyhow::bail!("invalid -e {kv:?}: expected K=V, or the name of a set variable")
                }
            },
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = RunOptions {
        file,
        ports: args.publish,
        memory_mib,
        env,
        accel: match args.accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        },
        qemu: run::default_qemu(),
    };
    let status = run::run(&opts, tokio::io::stdout()).await?;
    Ok(status.exit_code())
}

/// `-m`: MiB, or a size with a suffix.
fn parse_memory(s: &str) -> anyhow::Result<u64> {
    if let Ok(mib) = s.parse::<u64>() {
        return Ok(mib);
    }
    let bytes = build::parse_size(s).map_err(|e| anyhow::anyhow!("invalid -m: {e}"))?;
    Ok(bytes.div_ceil(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_rootfs_default_is_the_librarys() {
        assert_eq!(
            oci2uk::rootfs::Layout::from(RootfsArg::DEFAULT),
            oci2uk::rootfs::Layout::default()
        );
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
