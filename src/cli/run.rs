//! `oci2uk run`: boot a baked file, a pushed unikernel or an image on QEMU.

use std::io::IsTerminal as _;

use anyhow::Context as _;

use oci2uk::build::{self, Bootable};
use oci2uk::cache::Cache;
use oci2uk::input::Input;
use oci2uk::progress::Progress;
use oci2uk::run::{self, RunOptions};

use super::args::{parse_size, RunArgs};

/// Boots the target; gives the application's exit status.
pub async fn cmd_run(args: RunArgs) -> anyhow::Result<u8> {
    // `-e K` with no K on the host sets nothing: a baked file's own value stays.
    let env = super::resolve_env(&args.env)
        .context("invalid -e")?
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    let target = Input::parse(&args.target)
        .with_context(|| format!("{:?} is neither a file nor an image reference", args.target))?;
    let file = match target {
        Input::File(path) => Bootable::file(path),
        Input::Image(source) => {
            super::check_kernel_env(false)?;
            let cache = Cache::open(args.cache.as_deref())?;
            let registry = args.registry.clone().into();
            build::bootable(source, &registry, &cache, &Progress::new(!args.quiet)).await?
        }
    };
    let (memory_mib, why) = memory(&args, file.path())?;
    let volumes = args
        .volume
        .iter()
        .map(run::volume::prepare)
        .collect::<Result<Vec<_>, _>>()?;
    let opts = RunOptions {
        file: file.path().to_path_buf(),
        ports: args.publish,
        memory_mib,
        env,
        sysctl: args.sysctl,
        debug: args.debug,
        accel: args.accel.into(),
        qemu: run::default_qemu(),
        stop_timeout: std::time::Duration::from_secs(args.stop_timeout.into()),
        // A terminal wants the guest's CRLF; a file or a pipe gets plain lines.
        keep_crlf: std::io::stdout().is_terminal(),
        volumes,
    };
    // What stops the VM from starting is said before anything else.
    run::preflight(&opts)?;
    if !args.quiet {
        eprintln!("oci2uk: guest memory {memory_mib} MiB ({why})");
    }
    let status = run::run(&opts, tokio::io::stdout()).await?;
    Ok(status.exit_code())
}

/// `-m`, checked against what the file records it needs; without `-m`, that record with room
/// for the application ([`run::default_memory`]). The MiB, and where they come from.
fn memory(args: &RunArgs, file: &std::path::Path) -> anyhow::Result<(u64, String)> {
    let recorded =
        run::recorded_memory(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(match (&args.memory, recorded) {
        (Some(m), Some(need)) => {
            let m = parse_memory(m)?;
            // Below this the initramfs does not fit: the kernel would fail to unpack it and
            // panic, or hang before printing anything.
            anyhow::ensure!(
                m >= need,
                "-m {m} is too small: {} needs {need} MiB of guest memory (recorded when it was built)",
                args.target
            );
            (m, format!("-m; the file needs {need} MiB"))
        }
        (Some(m), None) => (parse_memory(m)?, "-m".to_owned()),
        (None, Some(need)) => (
            run::default_memory(Some(need)),
            format!("the file needs {need} MiB, plus room to work; -m to change"),
        ),
        (None, None) => (
            run::default_memory(None),
            "the file records no need; -m to change".to_owned(),
        ),
    })
}

/// `-m`: MiB, or a size with a suffix.
fn parse_memory(s: &str) -> anyhow::Result<u64> {
    if let Ok(mib) = s.parse::<u64>() {
        return Ok(mib);
    }
    let bytes = parse_size(s).map_err(|e| anyhow::anyhow!("invalid -m: {e}"))?;
    Ok(bytes.div_ceil(1 << 20))
}
