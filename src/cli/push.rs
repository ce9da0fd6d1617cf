//! `oci2uk push` and `oci2uk kernel push`.

use anyhow::Context as _;

use oci2uk::artifact::push::{self, PushOptions, PushOutcome};
use oci2uk::cache::Cache;
use oci2uk::progress::Progress;
use oci2uk::reference::ImageRef;
use oci2uk::registry::BlobPush;

use super::args::{CommonArgs, KernelPushArgs, PushArgs, RegistryArgs};

pub async fn cmd_push(args: PushArgs) -> anyhow::Result<()> {
    let (r, cache, progress, opts) = setup(&args.reference, args.registry, &args.common)?;
    let p = push::push_path(&args.path, &r, &opts, &cache, &progress).await?;
    print(&p, &args.common)
}

pub async fn cmd_kernel_push(args: KernelPushArgs) -> anyhow::Result<()> {
    let (r, cache, progress, opts) = setup(&args.reference, args.registry, &args.common)?;
    let modules = args.modules.as_deref();
    let p = push::push_kernel(&args.path, modules, &r, &opts, &cache, &progress).await?;
    print(&p, &args.common)
}

/// What `push` and `kernel push` share: the destination, cache, progress and options.
fn setup(
    reference: &str,
    registry: RegistryArgs,
    common: &CommonArgs,
) -> anyhow::Result<(ImageRef, Cache, Progress, PushOptions)> {
    let r: ImageRef = reference
        .parse()
        .with_context(|| format!("invalid reference {reference:?}"))?;
    let opts = PushOptions {
        registry: registry.into(),
        source_date_epoch: super::source_date_epoch()?,
    };
    Ok((
        r,
        Cache::open(common.cache.as_deref())?,
        Progress::new(!common.quiet),
        opts,
    ))
}

/// Prints a push's outcome as `--json`/`--quiet` ask.
fn print(p: &PushOutcome, common: &CommonArgs) -> anyhow::Result<()> {
    if common.json {
        super::out(&format!("{}\n", serde_json::to_string(p)?))?;
    } else if !common.quiet {
        report(p);
    }
    Ok(())
}

/// The one line that tells what a push did.
pub fn report(p: &PushOutcome) {
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
