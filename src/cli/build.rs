//! `oci2uk build` (the default command): an image in, a baked file, initrd, tar or bundle out.

use std::path::PathBuf;

use anyhow::Context as _;

use oci2uk::artifact::fetch;
use oci2uk::artifact::push::{self, PushOptions, PushOutcome};
use oci2uk::build::{self, BuildOutcome, BuildRequest, Destination, Format};
use oci2uk::cache::Cache;
use oci2uk::image::Platform;
use oci2uk::input::Input;
use oci2uk::plan::{parse_command, Overrides};
use oci2uk::progress::Progress;
use oci2uk::reference::{ImageRef, Source};
use oci2uk::registry::RegistryOptions;

use super::args::{BuildArgs, CommonArgs};

pub async fn cmd_build(args: BuildArgs) -> anyhow::Result<()> {
    let mut req = request(&args)?;
    if req.format != Format::Tar {
        super::check_kernel_env(args.kernel.is_some())?;
    }
    let push = push_target(&args, &req)?;
    let cache = Cache::open(args.common.cache.as_deref())?;
    let progress = Progress::new(!args.common.quiet);
    (req.kernel, req.modules) = kernel(&args, &req.registry, &cache, &progress).await?;
    let outcome = build::build(&req, &cache, &progress).await?;
    let pushed = match &push {
        Some(r) => {
            let opts = PushOptions {
                registry: req.registry.clone(),
                source_date_epoch: req.source_date_epoch,
            };
            let path = PathBuf::from(&outcome.output);
            Some(push::push_path(&path, r, &opts, &cache, &progress).await?)
        }
        None => None,
    };
    report(&outcome, pushed.as_ref(), &args.common)
}

/// The request the flags make, before the kernel is looked up.
fn request(args: &BuildArgs) -> anyhow::Result<BuildRequest> {
    let source: Source = args.image.parse()?;
    let platform = args
        .platform
        .as_deref()
        .map(str::parse::<Platform>)
        .transpose()?;
    let command = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<Vec<String>>> {
        v.as_deref()
            .map(|c| parse_command(c).with_context(|| format!("invalid {flag}")))
            .transpose()
    };
    let overrides = Overrides {
        env: super::resolve_env(&args.env)?,
        entrypoint: command("--entrypoint", &args.entrypoint)?,
        cmd: command("--cmd", &args.cmd)?,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        net: args.net.clone(),
        hostname: args.hostname.clone(),
        sysctl: args.sysctl.iter().cloned().collect(),
    };
    let output = args.output.clone().map(|p| match p.as_os_str() == "-" {
        true => Destination::Stdout,
        false => Destination::Path(p),
    });
    let format = args.format.into();
    Ok(BuildRequest {
        source,
        format,
        output,
        registry: args.registry.clone().into(),
        max_size: args.max_size,
        source_date_epoch: super::source_date_epoch()?,
        platform,
        kernel: None,
        modules: args.modules.clone(),
        overrides,
        rootfs: args.rootfs.layout(format)?,
    })
}

/// `--push`: a push needs a file (or bundle) to push, found out before any work.
fn push_target(args: &BuildArgs, req: &BuildRequest) -> anyhow::Result<Option<ImageRef>> {
    let Some(r) = &args.push else {
        return Ok(None);
    };
    anyhow::ensure!(
        matches!(req.format, Format::Elf | Format::Bundle),
        "--push needs --format elf or bundle: only a baked file can be pushed"
    );
    anyhow::ensure!(
        req.output != Some(Destination::Stdout),
        "--push cannot be used with -o -: the pushed file must be written first"
    );
    let r = r
        .parse::<ImageRef>()
        .with_context(|| format!("invalid --push {r:?}"))?;
    Ok(Some(r))
}

/// `--kernel PATH|REF` and `--modules`: a reference is fetched into the cache, and its
/// modules come with it.
async fn kernel(
    args: &BuildArgs,
    registry: &RegistryOptions,
    cache: &Cache,
    progress: &Progress,
) -> anyhow::Result<(Option<PathBuf>, Option<PathBuf>)> {
    let modules = args.modules.clone();
    let Some(k) = &args.kernel else {
        return Ok((None, modules));
    };
    let invalid = || format!("invalid reference {k:?}");
    match Input::parse(k).with_context(invalid)? {
        Input::File(path) => Ok((Some(path), modules)),
        Input::Image(Source::Registry(r)) => {
            let (image, dir) = fetch::kernel(&r, registry, cache, progress)
                .await
                .with_context(|| format!("cannot use --kernel {k}"))?;
            Ok((Some(image), modules.or(dir)))
        }
        Input::Image(_) => anyhow::bail!(
            "invalid --kernel {k:?}: expected a kernel file or the registry reference of a pushed kernel"
        ),
    }
}

fn report(
    outcome: &BuildOutcome,
    pushed: Option<&PushOutcome>,
    common: &CommonArgs,
) -> anyhow::Result<()> {
    if common.json {
        let mut v = serde_json::to_value(outcome)?;
        if let Some(p) = pushed {
            v["push"] = serde_json::to_value(p)?;
        }
        super::out(&format!("{v}\n"))?;
    } else if !common.quiet {
        if let Some(k) = &outcome.kernel {
            let why = match outcome.kernel_choice {
                Some("flag") => " (--kernel)",
                Some("env") => " ($OCI2UK_KERNEL)",
                Some("built") => " (the oci2uk kernel)",
                Some(_) => " (the newest installed kernel with modules)",
                None => "",
            };
            eprintln!("oci2uk: kernel {k}{why}");
        }
        let memory = outcome
            .memory_mib
            .map(|m| format!(", needs {m} MiB of guest memory"))
            .unwrap_or_default();
        eprintln!(
            "oci2uk: wrote {} ({} bytes, sha256:{}{memory}) from {}@{}",
            outcome.output, outcome.size, outcome.sha256, outcome.source, outcome.manifest_digest
        );
        if let Some(p) = pushed {
            super::push::report(p);
        }
    }
    Ok(())
}
