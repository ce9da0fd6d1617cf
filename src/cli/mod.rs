//! The subcommands, each a short function over the library, and what they share.

use anyhow::Context as _;

pub mod args;
pub mod build;
pub mod exit;
pub mod inspect;
pub mod kernel;
pub mod push;
pub mod run;

/// Logs on stderr: warnings and errors (errors only with `--quiet`), or what `OCI2UK_LOG`
/// asks for.
pub fn init_logging(quiet: bool) {
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

/// Writes `text` to standard output. A reader that has gone (`oci2uk inspect IMG | head`) is
/// not an error: what it wanted it has.
pub fn out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write to standard output"))
        }
        _ => Ok(()),
    }
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

/// `--env`/`-e` entries with the host's values taken, once, here: `K` with no K in the
/// host's environment removes K (docker's rule).
fn resolve_env(entries: &[String]) -> anyhow::Result<Vec<oci2uk::plan::EnvVar>> {
    Ok(oci2uk::plan::resolve_env(entries, &|k| {
        std::env::var_os(k)
    })?)
}

/// `$OCI2UK_KERNEL`, when it is what picks the kernel, must name a file: said here with the
/// variable's name, where the library would only say that the path cannot be read.
fn check_kernel_env(flag_given: bool) -> anyhow::Result<()> {
    let var = oci2uk::kernel::KERNEL_ENV;
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(path) if !flag_given && !std::path::Path::new(&path).is_file() => {
            anyhow::bail!(
                "{var}={} is not a kernel file (unset it to use the newest installed kernel)",
                path.to_string_lossy()
            )
        }
        _ => Ok(()),
    }
}
