//! `run`: a baked file in, a QEMU guest on this machine out, its console on stdout and its
//! application's exit status as ours.
//!
//! The guest's init prints one last line, `oci2uk: exit status N` or `oci2uk: killed by
//! signal N`, before it powers the VM off; that line is how the status crosses the VM
//! boundary. Anything else that ends the VM is a failure of the VM (status 125, as docker uses
//! for failures of its own).
//!
//! A stop request (SIGINT, SIGTERM, SIGHUP) reaches the guest as its ACPI power button,
//! pressed through QEMU's monitor (`monitor.rs`); the init turns it into the image's stop
//! signal, so the application ends as it would under `docker stop`, and its status line comes
//! out as usual.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

pub use crate::launch::ports::PortForward;
use crate::launch::qemu;
pub use crate::launch::qemu::kvm_usable;
use monitor::{Monitor, Request};
pub use volume::{Volume, VolumeError, VolumeKind, VolumeSpec};

mod monitor;
pub mod volume;

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
    /// Kernel parameters set before the application starts (`--sysctl K=V`), over the file's.
    pub sysctl: Vec<(String, String)>,
    /// The kernel's messages and the init's steps on the console (`--debug`).
    pub debug: bool,
    /// Acceleration.
    pub accel: Accel,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// How long the application has to stop after a stop request (docker's `--stop-timeout`).
    pub stop_timeout: Duration,
    /// Whether the console keeps the guest's CRLF line ends (for a terminal); otherwise each
    /// line ends in a plain LF, as a file or a pipe expects.
    pub keep_crlf: bool,
    /// Volumes (`-v`), prepared: in this order they are attached and named to the guest.
    pub volumes: Vec<Volume>,
}

/// The stop timeout in seconds when none is given: docker's.
pub const DEFAULT_STOP_TIMEOUT_SECS: u32 = 10;

/// What the guest gets without `-m` beyond the memory its file records: the record is the
/// least the image boots in (the kernel, the unpacked initramfs and a 64 MiB margin), which
/// leaves an application little to work with.
pub const MEMORY_ROOM_MIB: u64 = 256;

/// The least the guest gets without `-m`. Guest memory costs the host only what the guest
/// touches (QEMU allocates it lazily): measured with the fixture nginx under TCG, QEMU's
/// resident size after boot and 50 requests was 327 MiB at `-m 192` and 333 MiB at
/// `-m 512`, and the boot took as long.
pub const MEMORY_FLOOR_MIB: u64 = 512;

/// The guest memory without `-m`: the recorded need plus [`MEMORY_ROOM_MIB`], at least
/// [`MEMORY_FLOOR_MIB`].
pub fn default_memory(recorded_mib: Option<u64>) -> u64 {
    recorded_mib
        .map_or(0, |n| n.saturating_add(MEMORY_ROOM_MIB))
        .max(MEMORY_FLOOR_MIB)
}

/// What `run --debug` appends to the kernel command line: the kernel's messages up to
/// informational (the baked `loglevel=1` shows emergencies only) and the init's steps.
pub const DEBUG_APPEND: &str = "loglevel=7 oci2uk.debug=1";

/// Errors of `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// QEMU is not installed (not on PATH, or not an executable file).
    #[error("{0} is not installed (apt-get install qemu-system-x86)")]
    NoQemu(String),
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
    /// A volume cannot be attached.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A directory volume needs a virtiofs daemon that is not installed.
    #[error("-v {0}: sharing a directory needs virtiofsd (apt-get install qemu-system-common, or set OCI2UK_VIRTIOFSD)")]
    NoVirtiofsd(String),
    /// A directory volume needs root.
    #[error("-v {0}: sharing a directory needs root (virtiofsd keeps the guest's owners only as root); use a disk image (a name ending in .img) instead")]
    ShareNeedsRoot(String),
    /// The virtiofs daemon did not come up.
    #[error("-v {spec}: virtiofsd did not start ({why})")]
    Virtiofsd {
        /// The volume.
        spec: String,
        /// What it said, or how it ended.
        why: String,
    },
    /// A forwarded host port is taken.
    #[error("host port {0} is already in use")]
    PortBusy(String),
    /// A forwarded host port cannot be listened on.
    #[error("cannot listen on host port {addr}")]
    Port {
        /// The address and port.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM ended without the application's status line.
    #[error("the VM stopped before the application reported an exit status ({0})")]
    NoStatus(String),
    /// Console I/O failed.
    #[error("console I/O failed")]
    Io(#[from] std::io::Error),
}

/// The QEMU model of a run: the baked file on microvm (the quickest boot; the file carries
/// its TSC frequency for emulation), its console on stdout for the status line, the wall
/// clock under KVM too, and the monitor on `monitor` when given. The override tells the
/// guest `-e` and the stop timeout: its init kills the application when the timeout passes,
/// then syncs and powers off, so what the application wrote reaches its disks even then.
pub fn qemu_model(opts: &RunOptions, monitor: Option<&Path>) -> qemu::Qemu {
    let mut over = serde_json::json!({
        "oci2uk": { "stop_timeout": opts.stop_timeout.as_secs() }
    });
    if !opts.env.is_empty() {
        let env: serde_json::Map<String, serde_json::Value> = opts
            .env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        over["env"] = serde_json::Value::Object(env);
    }
    if !opts.sysctl.is_empty() {
        let sysctl: serde_json::Map<String, serde_json::Value> = opts
            .sysctl
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        over["sysctl"] = serde_json::Value::Object(sysctl);
    }
    if !opts.volumes.is_empty() {
        let mount: serde_json::Map<String, serde_json::Value> = opts
            .volumes
            .iter()
            .enumerate()
            .map(|(i, v)| (v.spec.target.clone(), v.mount_entry(i)))
            .collect();
        over["mount"] = serde_json::Value::Object(mount);
    }
    let mut append = format!(
        "{}={}",
        oci2uk_config::guest::OVERRIDE_PARAM,
        oci2uk_config::encode_override(&over)
    );
    if opts.debug {
        append = format!("{DEBUG_APPEND} {append}");
    }
    let append = Some(append);
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
        monitor: monitor.map(|p| p.display().to_string()),
    }
}

/// The devices that carry the volumes, with the virtiofs daemons' sockets in `dir`.
pub fn volume_devices(opts: &RunOptions, dir: &Path) -> qemu::Devices {
    let mut devices = qemu::Devices::default();
    for (i, v) in opts.volumes.iter().enumerate() {
        devices.disks.extend(v.disk(i));
        devices.shares.extend(v.share(i, dir));
    }
    devices
}

/// The QEMU arguments for a run (without the binary).
pub fn qemu_args(
    opts: &RunOptions,
    accel: Accel,
    monitor: Option<&Path>,
    devices: &qemu::Devices,
) -> Vec<String> {
    let accel = match accel {
        Accel::Kvm => qemu::Accel::Kvm,
        Accel::Auto | Accel::Tcg => qemu::Accel::Tcg,
    };
    qemu_model(opts, monitor).args_with(qemu::Machine::Microvm, accel, devices)
}

/// How the application ended: what the guest's last line said, or a hard stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStatus {
    /// `oci2uk: exit status N`.
    Exited(i32),
    /// `oci2uk: killed by signal N`.
    Signalled(i32),
    /// No status line: the VM was killed after a stop request, when its timeout passed or
    /// at a second request. 137, as for an application killed by SIGKILL.
    Stopped,
}

impl GuestStatus {
    /// Parses the init's status line.
    pub fn parse(line: &str) -> Option<Self> {
        match oci2uk_config::StatusLine::parse(line)? {
            oci2uk_config::StatusLine::Exited(n) => Some(Self::Exited(n)),
            oci2uk_config::StatusLine::Signalled(n) => Some(Self::Signalled(n)),
        }
    }

    /// Reads a status line at the end of a console line (`last words oci2uk: exit status 0`),
    /// as it comes when the application's last output did not end in a newline. Only the
    /// console's last line is read so: elsewhere it is the application's own text.
    pub fn parse_tail(line: &str) -> Option<Self> {
        Self::parse(&line[line.rfind("oci2uk: ")?..])
    }

    /// The status for our own exit: N, or 128+N for a signal (as shells report it).
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Exited(n) => (n & 0xff) as u8,
            Self::Signalled(n) => (128 + n).clamp(0, 255) as u8,
            Self::Stopped => 128 + 9,
        }
    }
}

/// How QEMU's lifetime is tied to run's: `setpriv --pdeathsig KILL` (util-linux, which
/// Debian marks essential, so every Debian 12 has it) sets the parent-death signal and then
/// executes QEMU, which keeps it. The kernel sends it when `run` ends by any means, SIGKILL
/// included. The library forbids `unsafe`, which a `prctl` in `pre_exec` would need; a pipe
/// that QEMU watches does not exist (its stdio console does not end on a closed pipe). The
/// signal follows the thread that started the child: `run` starts QEMU from the thread it
/// is awaited on, the runtime's main or a worker thread, which last as long as the process.
const PDEATHSIG: [&str; 3] = ["setpriv", "--pdeathsig", "KILL"];

/// How often the power button is pressed again while the guest has not stopped: a press
/// before the init watches the button (early in the boot) is not heard.
const PRESS_AGAIN: Duration = Duration::from_secs(1);

/// What the guest gets after its stop timeout to end the application, sync and power off,
/// before QEMU is killed.
const HARD_STOP_GRACE: Duration = Duration::from_secs(2);

/// The stop signals `run` turns into a shutdown request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopSignal {
    Interrupt,
    Terminate,
    Hangup,
}

impl StopSignal {
    fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
            StopSignal::Hangup => "SIGHUP",
        }
    }
}

/// The program and arguments that start QEMU: behind [`PDEATHSIG`] when `setpriv` is on
/// PATH, QEMU itself otherwise (it could then outlive a `run` that is killed).
fn qemu_process(qemu: &Path, args: Vec<String>) -> Result<Command, RunError> {
    let qemu = find_qemu(qemu)?;
    let mut cmd = match find_program(Path::new(PDEATHSIG[0])) {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(&PDEATHSIG[1..]).arg("--").arg(&qemu);
            c
        }
        None => {
            tracing::warn!("setpriv is not installed: QEMU will outlive oci2uk if it is killed");
            Command::new(&qemu)
        }
    };
    cmd.args(args);
    Ok(cmd)
}

/// The QEMU binary as a path to an executable file.
fn find_qemu(qemu: &Path) -> Result<PathBuf, RunError> {
    find_program(qemu).ok_or_else(|| RunError::NoQemu(qemu.display().to_string()))
}

/// Checks what would stop the VM from starting, so that the caller can say it before
/// anything else: QEMU is installed, every forwarded host port is free, a shared directory
/// can be served.
pub fn preflight(opts: &RunOptions) -> Result<(), RunError> {
    find_qemu(&opts.qemu)?;
    check_shares(opts)?;
    check_ports(&opts.ports)
}

/// The virtiofs daemon, when a volume is a directory; an error naming the first such volume
/// when it cannot be served.
fn check_shares(opts: &RunOptions) -> Result<Option<PathBuf>, RunError> {
    let Some(v) = opts
        .volumes
        .iter()
        .find(|v| v.kind == VolumeKind::Directory)
    else {
        return Ok(None);
    };
    if !volume::is_root() {
        return Err(RunError::ShareNeedsRoot(v.spec.to_string()));
    }
    volume::find_virtiofsd()
        .map(Some)
        .ok_or_else(|| RunError::NoVirtiofsd(v.spec.to_string()))
}

/// How long a virtiofs daemon has to create its socket.
const VIRTIOFSD_START: Duration = Duration::from_secs(10);

/// Starts a virtiofs daemon for every directory volume, its socket in `dir`, and waits until
/// each listens. Each is tied to our lifetime as QEMU is, and in its own process group, so a
/// ctrl-C at the terminal leaves it serving the guest while the guest stops; it ends by
/// itself when QEMU disconnects.
async fn start_shares(
    opts: &RunOptions,
    dir: &Path,
) -> Result<Vec<tokio::process::Child>, RunError> {
    let Some(daemon) = check_shares(opts)? else {
        return Ok(Vec::new());
    };
    let mut children = Vec::new();
    for (i, v) in opts.volumes.iter().enumerate() {
        if v.kind != VolumeKind::Directory {
            continue;
        }
        let socket = volume::share_socket(dir, i);
        let log = dir.join(format!("virtiofs{i}.log"));
        let mut cmd = match find_program(Path::new(PDEATHSIG[0])) {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(&PDEATHSIG[1..]).arg("--").arg(&daemon);
                c
            }
            None => Command::new(&daemon),
        };
        cmd.args(volume::virtiofsd_args(&socket, &v.source))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .process_group(0);
        let spec = v.spec.to_string();
        let mut child = cmd.spawn().map_err(|e| RunError::Virtiofsd {
            spec: spec.clone(),
            why: format!("{}: {e}", daemon.display()),
        })?;
        let start = tokio::time::Instant::now();
        while !socket.exists() {
            let last_line = || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            };
            if let Some(st) = child.try_wait()? {
                return Err(RunError::Virtiofsd {
                    spec,
                    why: format!("{st}: {}", last_line()),
                });
            }
            if start.elapsed() > VIRTIOFSD_START {
                return Err(RunError::Virtiofsd {
                    spec,
                    why: format!("no socket after {} s", VIRTIOFSD_START.as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        children.push(child);
    }
    Ok(children)
}

/// `program` as a path to an executable file: itself when it names a directory, else the
/// first match on PATH.
fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

/// Checks that every forwarded host port can be listened on, so that a busy port is one
/// clear error before QEMU starts rather than QEMU's own message after. The sockets are
/// closed again at once for QEMU to open.
fn check_ports(forwards: &[PortForward]) -> Result<(), RunError> {
    use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
    for f in forwards {
        // QEMU listens on every address when the forward names none.
        let ip = match f.host_ip.as_deref() {
            None | Some("") => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(ip) => match ip.parse() {
                Ok(ip) => ip,
                Err(_) => continue,
            },
        };
        let bound = match f.guest.proto {
            crate::launch::ports::Proto::Tcp => TcpListener::bind((ip, f.host)).map(drop),
            crate::launch::ports::Proto::Udp => UdpSocket::bind((ip, f.host)).map(drop),
        };
        if let Err(source) = bound {
            let addr = match f.host_ip.as_deref() {
                None | Some("") => format!("{}/{}", f.host, f.guest.proto),
                Some(ip) => format!("{ip}:{}/{}", f.host, f.guest.proto),
            };
            return Err(if source.kind() == std::io::ErrorKind::AddrInUse {
                RunError::PortBusy(addr)
            } else {
                RunError::Port { addr, source }
            });
        }
    }
    Ok(())
}

/// Whether a console line is the kernel's (`[    5.429767] reboot: Power down`).
fn is_kernel_line(l: &str) -> bool {
    l.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(t, _)| {
            let t = t.trim();
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

/// Turns the CRLF that the guest's serial console ends a line with into LF. A CR the
/// application wrote itself stays: only the one the terminal driver added goes.
fn plain_line_end(line: &mut Vec<u8>) {
    if line.ends_with(b"\r\n") {
        line.remove(line.len() - 2);
    }
}

/// Boots the file and returns the application's status. The console goes to `out`.
///
/// SIGINT, SIGTERM and SIGHUP ask the guest to stop: its ACPI power button is pressed through
/// QEMU's monitor, the init sends the application its stop signal, and the application's
/// status is returned as usual. The guest has [`RunOptions::stop_timeout`] to end (its init
/// kills the application then) and a little more to power off; after that, or at a second
/// signal, QEMU is killed and the status is [`GuestStatus::Stopped`].
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
    check_ports(&opts.ports)?;
    // Caught from here on: a signal between QEMU's start and the loop below is not lost.
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let monitor = Monitor::bind()?;
    let share_dir = tempfile::Builder::new()
        .prefix("oci2uk-volumes-")
        .tempdir()?;
    let _daemons = start_shares(opts, share_dir.path()).await?;
    let devices = volume_devices(opts, share_dir.path());
    let mut cmd = qemu_process(
        &opts.qemu,
        qemu_args(opts, accel, Some(monitor.path()), &devices),
    )?;
    cmd.stdin(Stdio::null())
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
    // The status at the end of the last line that is not the kernel's: an application whose
    // output does not end in a newline has the status line glued to it.
    let mut tail_status = None;
    let mut line = Vec::new();
    // When the stop was asked for, and whether QEMU was killed.
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut killed = false;
    let deadline = opts.stop_timeout + HARD_STOP_GRACE;
    let mut press = tokio::time::interval(PRESS_AGAIN);
    loop {
        line.clear();
        let stop_signal = tokio::select! {
            n = lines.read_until(b'\n', &mut line) => {
                if n? == 0 {
                    break;
                }
                if !opts.keep_crlf {
                    plain_line_end(&mut line);
                }
                out.write_all(&line).await?;
                out.flush().await?;
                let text = String::from_utf8_lossy(&line);
                if let Some(s) = GuestStatus::parse(&text) {
                    status = Some(s);
                }
                if !is_kernel_line(&text) {
                    tail_status = GuestStatus::parse_tail(&text);
                }
                None
            }
            _ = int.recv() => Some(StopSignal::Interrupt),
            _ = term.recv() => Some(StopSignal::Terminate),
            _ = hup.recv() => Some(StopSignal::Hangup),
            _ = press.tick(), if stopping.is_some() && !killed => {
                monitor.send(Request::Powerdown);
                None
            }
            _ = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now) + deadline),
                if stopping.is_some() && !killed =>
            {
                eprintln!(
                    "oci2uk: the guest did not stop within {} s: stopping the VM",
                    deadline.as_secs()
                );
                killed = true;
                let _ = child.start_kill();
                None
            }
        };
        match (stop_signal, stopping) {
            (None, _) => {}
            (Some(sig), None) => {
                eprintln!(
                    "oci2uk: {}: asking the guest to stop (within {} s; again to stop the VM at once)",
                    sig.name(),
                    opts.stop_timeout.as_secs()
                );
                stopping = Some(tokio::time::Instant::now());
                monitor.send(Request::Powerdown);
                press.reset();
            }
            (Some(sig), Some(_)) if !killed => {
                eprintln!("oci2uk: {}: stopping the VM", sig.name());
                killed = true;
                let _ = child.start_kill();
            }
            (Some(_), Some(_)) => {}
        }
    }
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let stderr = stderr_task.await.unwrap_or_default();
    match status.or(tail_status) {
        Some(s) => Ok(s),
        None if killed => Ok(GuestStatus::Stopped),
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
        assert_eq!(
            GuestStatus::parse_tail("no newline oci2uk: exit status 7\r\n"),
            Some(GuestStatus::Exited(7))
        );
        assert_eq!(
            GuestStatus::parse_tail("oci2uk: exit status 7 and more"),
            None
        );
        assert!(is_kernel_line("[    2.107817] reboot: Power down"));
        assert!(!is_kernel_line("[notice] ready"));
        assert_eq!(GuestStatus::Signalled(9).exit_code(), 137);
        assert_eq!(GuestStatus::Exited(7).exit_code(), 7);
    }

    fn options() -> RunOptions {
        RunOptions {
            file: "nginx.elf".into(),
            ports: vec!["8080:80".parse().unwrap()],
            memory_mib: 320,
            env: vec![("A".into(), "b c".into())],
            sysctl: vec![("vm.overcommit_memory".into(), "1".into())],
            debug: false,
            accel: Accel::Tcg,
            qemu: "qemu-system-x86_64".into(),
            stop_timeout: Duration::from_secs(3),
            keep_crlf: false,
            volumes: Vec::new(),
        }
    }

    #[test]
    fn qemu_command() {
        let opts = options();
        let args = qemu_args(
            &opts,
            Accel::Tcg,
            Some(Path::new("/run/q.sock")),
            &qemu::Devices::default(),
        );
        let joined = args.join(" ");
        assert!(joined.contains("-m 320"), "{joined}");
        assert!(joined.contains("hostfwd=tcp::8080-:80"), "{joined}");
        assert!(joined.contains("-kernel nginx.elf"), "{joined}");
        assert!(
            joined
                .contains("-chardev socket,id=qmp,path=/run/q.sock -mon chardev=qmp,mode=control"),
            "{joined}"
        );
        // The override carries `-e` and the stop timeout to the guest's init.
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        let value = oci2uk_config::find_override(append).unwrap();
        let over: serde_json::Value =
            serde_json::from_str(&oci2uk_config::decode_override(&value).unwrap()).unwrap();
        assert_eq!(
            over,
            serde_json::json!({
                "env": {"A": "b c"},
                "sysctl": {"vm.overcommit_memory": "1"},
                "oci2uk": {"stop_timeout": 3}
            })
        );
        assert!(!append.contains("loglevel"), "{append}");
        // --debug: the kernel's messages and the init's steps.
        let debug = RunOptions {
            debug: true,
            ..options()
        };
        let args = qemu_args(&debug, Accel::Tcg, None, &qemu::Devices::default());
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert!(append.starts_with("loglevel=7 oci2uk.debug=1 "), "{append}");
        assert!(oci2uk_config::find_override(append).is_some());
    }

    #[test]
    fn memory_without_m() {
        assert_eq!(default_memory(Some(192)), 512);
        assert_eq!(default_memory(Some(320)), 576);
        assert_eq!(default_memory(None), 512);
        assert_eq!(default_memory(Some(u64::MAX)), u64::MAX);
    }

    #[test]
    fn a_missing_qemu_is_named() {
        let opts = RunOptions {
            qemu: "no-such-qemu-here".into(),
            ..options()
        };
        assert_eq!(
            preflight(&opts).unwrap_err().to_string(),
            "no-such-qemu-here is not installed (apt-get install qemu-system-x86)"
        );
    }

    #[test]
    fn line_ends() {
        let mut line = b"ready\r\n".to_vec();
        plain_line_end(&mut line);
        assert_eq!(line, b"ready\n");
        let mut line = b"own cr\r\r\n".to_vec();
        plain_line_end(&mut line);
        assert_eq!(line, b"own cr\r\n");
        let mut line = b"no end".to_vec();
        plain_line_end(&mut line);
        assert_eq!(line, b"no end");
    }

    #[test]
    fn a_busy_port_is_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let forwards: Vec<PortForward> = vec![format!("127.0.0.1:{port}:80").parse().unwrap()];
        let err = check_ports(&forwards).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("host port 127.0.0.1:{port}/tcp is already in use")
        );
        // On every address, as QEMU listens without one.
        let forwards: Vec<PortForward> = vec![format!("{port}:80").parse().unwrap()];
        let err = check_ports(&forwards).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("host port {port}/tcp is already in use")
        );
        // The same number for UDP is another port; a free one passes.
        let forwards: Vec<PortForward> = vec![format!("127.0.0.1:{port}:80/udp").parse().unwrap()];
        check_ports(&forwards).unwrap();
        drop(taken);
        let forwards: Vec<PortForward> = vec![format!("127.0.0.1:{port}:80").parse().unwrap()];
        check_ports(&forwards).unwrap();
    }

    #[test]
    fn programs_are_found_on_path() {
        assert!(find_program(Path::new("sh")).is_some());
        assert!(find_program(Path::new("/bin/sh")).is_some());
        assert!(find_program(Path::new("no-such-program-here")).is_none());
        assert!(find_program(Path::new("/etc/passwd")).is_none());
    }
}
