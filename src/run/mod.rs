//! `run`: a baked file in, a QEMU guest on this machine out, its console on stdout and its
//! application's exit status as ours.
//!
//! The guest's init prints one last line, `oci2uk: exit status N` or `oci2uk: killed by
//! signal N`, before it powers the VM off; that line is how the status crosses the VM
//! boundary. Anything else that ends the VM is a failure of the VM (status 125, as docker uses
//! for failures of its own).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

pub use crate::launch::ports::PortForward;
use crate::launch::qemu;
pub use crate::launch::qemu::kvm_usable;

/// Exit status when the VM failed before the application reported one.
pub const EXIT_VM_FAILED: u8 = 125;

/// How to accelerate the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM where it can run guests, else TCG.
    Auto,
    /// KVM only.
    Kvm,
    /// Software emulation.
    Tcg,
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The baked kernel file.
    pub file: PathBuf,
    /// Port forwards.
    pub ports: Vec<PortForward>,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Extra environment for the application (`-e K=V`).
    pub env: Vec<(String, String)>,
    /// Acceleration.
    pub accel: Accel,
    /// The QEMU binary.
    pub qemu: PathBuf,
}

/// Errors of `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// QEMU could not be started.
    #[error("cannot start {qemu} (install it with `apt-get install qemu-system-x86`)")]
    Spawn {
        /// The binary.
        qemu: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// KVM was asked for but cannot run guests here.
    #[error("--accel kvm: {0}")]
    NoKvm(String),
    /// The VM ended without the application's status line.
    #[error("the VM stopped before the application reported an exit status ({0})")]
    NoStatus(String),
    /// Console I/O failed.
    #[error("console I/O failed")]
    Io(#[from] std::io::Error),
}

/// The QEMU model of a run: the baked file on microvm (the quickest boot; the file carries
/// its TSC frequency for emulation), its console on stdout for the status line, and the
/// wall clock under KVM too.
pub fn qemu_model(opts: &RunOptions) -> qemu::Qemu {
    let append = (!opts.env.is_empty()).then(|| {
        let env: serde_json::Map<String, serde_json::Value> = opts
            .env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let over = serde_json::json!({ "env": env });
        format!(
            "{}={}",
            oci2uk_config::guest::OVERRIDE_PARAM,
            oci2uk_config::encode_override(&over)
        )
    });
    qemu::Qemu {
        kernel: opts.file.display().to_string(),
        initrd: None,
        append,
        memory_mib: opts.memory_mib,
        vcpus: 1,
        forwards: opts.ports.clone(),
        console: qemu::Console::Stdio,
        rtc: true,
        tsc_khz: None,
    }
}

/// The QEMU arguments for a run (without the binary).
pub fn qemu_args(opts: &RunOptions, accel: Accel) -> Vec<String> {
    let accel = match accel {
        Accel::Kvm => qemu::Accel::Kvm,
        Accel::Auto | Accel::Tcg => qemu::Accel::Tcg,
    };
    qemu_model(opts).args(qemu::Machine::Microvm, accel)
}

/// What the guest's last line said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    /// `oci2uk: exit status N`.
    Exited(i32),
    /// `oci2uk: killed by signal N`.
    Signalled(i32),
}

impl GuestStatus {
    /// Parses the init's status line.
    pub fn parse(line: &str) -> Option<Self> {
        match oci2uk_config::StatusLine::parse(line)? {
            oci2uk_config::StatusLine::Exited(n) => Some(Self::Exited(n)),
            oci2uk_config::StatusLine::Signalled(n) => Some(Self::Signalled(n)),
        }
    }

    /// The status for our own exit: N, or 128+N for a signal (as shells report it).
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Exited(n) => (n & 0xff) as u8,
            Self::Signalled(n) => (128 + n).clamp(0, 255) as u8,
        }
    }
}

/// Boots the file and returns the application's status. The console goes to `out`.
pub async fn run(
    opts: &RunOptions,
    mut out: impl tokio::io::AsyncWrite + Unpin,
) -> Result<GuestStatus, RunError> {
    let accel = match opts.accel {
        Accel::Tcg => Accel::Tcg,
        Accel::Kvm => {
            kvm_usable().map_err(RunError::NoKvm)?;
            Accel::Kvm
        }
        Accel::Auto => match kvm_usable() {
            Ok(()) => Accel::Kvm,
            Err(why) => {
                tracing::info!("using TCG: {why}");
                Accel::Tcg
            }
        },
    };
    let mut cmd = Command::new(&opts.qemu);
    cmd.args(qemu_args(opts, accel))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a ctrl-C at the terminal reaches oci2uk, which asks the guest
        // to shut down, rather than killing QEMU outright.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        qemu: opts.qemu.display().to_string(),
        source,
    })?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut buf).await;
        buf
    });
    let mut lines = BufReader::new(stdout);
    let mut status = None;
    let mut line = Vec::new();
    let mut interrupted = false;
    // QEMU runs in its own process group, so a SIGTERM or SIGHUP for oci2uk must end it here.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        line.clear();
        tokio::select! {
            n = lines.read_until(b'\n', &mut line) => {
                if n? == 0 {
                    break;
                }
                out.write_all(&line).await?;
                out.flush().await?;
                if let Some(s) = GuestStatus::parse(&String::from_utf8_lossy(&line)) {
                    status = Some(s);
                }
            }
            _ = term.recv(), if !interrupted => {
                interrupted = true;
                let _ = child.start_kill();
            }
            _ = hup.recv(), if !interrupted => {
                interrupted = true;
                let _ = child.start_kill();
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                // The guest has no way to hear a shutdown request from here without a
                // monitor socket; ending QEMU is what a user who presses ctrl-C expects.
                interrupted = true;
                let _ = child.start_kill();
            }
        }
    }
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let stderr = stderr_task.await.unwrap_or_default();
    match status {
        Some(s) => Ok(s),
        None if interrupted => Err(RunError::NoStatus("interrupted".into())),
        None => {
            let why = match exit {
                Ok(Ok(st)) => {
                    let text = String::from_utf8_lossy(&stderr);
                    let last = text
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    if last.is_empty() {
                        format!("QEMU {st}")
                    } else {
                        format!("QEMU {st}: {}", last.trim())
                    }
                }
                _ => "QEMU did not exit".into(),
            };
            Err(RunError::NoStatus(why))
        }
    }
}

/// The guest memory (MiB) recorded in a baked file at build time: the `oci2uk.memory=NM`
/// word of its baked command line, which sits in the head of the segment the bake appends
/// (the program header with the highest physical address). `None` for a file that is not a
/// baked ELF or has no record.
pub fn recorded_memory(file: &Path) -> std::io::Result<Option<u64>> {
    crate::artifact::baked::recorded_memory(file)
}

/// The default QEMU binary: `$OCI2UK_QEMU` or `qemu-system-x86_64` on PATH.
pub fn default_qemu() -> PathBuf {
    std::env::var_os("OCI2UK_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(qemu::BINARY).to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            GuestStatus::parse("oci2uk: exit status 7\r\n"),
            Some(GuestStatus::Exited(7))
        );
        assert_eq!(
            GuestStatus::parse("oci2uk: killed by signal 9"),
            Some(GuestStatus::Signalled(9))
        );
        assert_eq!(GuestStatus::parse("app: oci2uk: exit status 7 "), None);
        assert_eq!(GuestStatus::Signalled(9).exit_code(), 137);
        assert_eq!(GuestStatus::Exited(7).exit_code(), 7);
    }

    #[test]
    fn qemu_command() {
        let opts = RunOptions {
            file: "nginx.elf".into(),
            ports: vec!["8080:80".parse().unwrap()],
            memory_mib: 320,
            env: vec![("A".into(), "b c".into())],
            accel: Accel::Tcg,
            qemu: "qemu-system-x86_64".into(),
        };
        let args = qemu_args(&opts, Accel::Tcg).join(" ");
        assert!(args.contains("-m 320"), "{args}");
        assert!(args.contains("hostfwd=tcp::8080-:80"), "{args}");
        assert!(args.contains("-kernel nginx.elf"), "{args}");
        assert!(args.contains("-append oci2uk.config="), "{args}");
    }
}
