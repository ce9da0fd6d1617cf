//! `oci2uk kernel build`: the oci2uk kernel, built from a Linux source into the cache.

use std::time::Duration;

use oci2uk::cache::Cache;
use oci2uk::kernel::build::{self, BuildOptions, Built};
use oci2uk::progress::Progress;

use super::args::KernelBuildArgs;

/// How long an interrupted build may take to stop and remove its temporary tree.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Builds the oci2uk kernel (or finds it in the cache) and reports where it is.
pub async fn cmd_kernel_build(args: KernelBuildArgs) -> anyhow::Result<()> {
    let cache = Cache::open(args.common.cache.as_deref())?;
    let progress = Progress::new(!args.common.quiet);
    let opts = BuildOptions {
        source: args.source,
        jobs: args.jobs.map(usize::from),
    };
    let task = tokio::task::spawn_blocking(move || build::build(&cache, &opts, &progress));
    tokio::pin!(task);
    let built = tokio::select! {
        r = &mut task => r??,
        _ = tokio::signal::ctrl_c() => {
            // The terminal's ctrl-C reached make too, so the build fails in a moment and
            // removes its temporary tree (a gigabyte and more): wait for that, up to a limit
            // or a second ctrl-C.
            tokio::select! {
                _ = &mut task => {}
                _ = tokio::signal::ctrl_c() => {}
                _ = tokio::time::sleep(STOP_GRACE) => {}
            }
            anyhow::bail!("interrupted: the kernel build stopped");
        }
    };
    let built = match &args.output {
        Some(dir) => build::export(&built, dir)?,
        None => built,
    };
    if args.common.json {
        super::out(&format!("{}\n", serde_json::to_string(&built)?))?;
    } else if !args.common.quiet {
        report(&built);
    }
    Ok(())
}

/// The lines that say what was built, its figures, and how to use it.
fn report(b: &Built) {
    if b.cached {
        eprintln!("oci2uk: the oci2uk kernel {} is in the cache", b.release);
    } else {
        eprintln!(
            "oci2uk: built the oci2uk kernel {} in {:.0}s",
            b.release, b.seconds
        );
    }
    eprintln!("  kernel:  {}", b.vmlinux.display());
    eprintln!("  config:  {} ({} options)", b.config.display(), b.options);
    eprintln!("  sha256:  {}", b.sha256);
    eprintln!(
        "  loaded:  {:.1} MiB",
        b.loaded_bytes as f64 / (1024.0 * 1024.0)
    );
    eprintln!(
        "oci2uk: use it with `oci2uk build IMAGE --kernel {}`; it is now the kernel `oci2uk \
         build` uses when no --kernel is given",
        b.vmlinux.display()
    );
}
