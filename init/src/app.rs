//! The application: found, started with its identity and environment, watched until it ends;
//! signals forwarded, a shutdown request turned into the image's stop signal, zombies reaped;
//! then the status line and power-off.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci2uk_config::{Config, Rc, RunMode, StatusLine};

use crate::console::{line, step};
use crate::sys::{self, Exit, SignalFd, Spawn, SpawnStep};
use crate::Error;

/// `PATH` when the configuration's environment has none (docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Signals passed on to the running program as they are.
const FORWARDED: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGQUIT,
    libc::SIGWINCH,
];

/// Shutdown requests: ctrl-alt-del (the kernel sends SIGINT to PID 1 once `RB_DISABLE_CAD` is
/// set) and SIGPWR (sent by `init poweroff`, which the kernel runs on an orderly power-off
/// such as Xen's).
const SHUTDOWN: [i32; 2] = [libc::SIGINT, libc::SIGPWR];

/// The status line the host reads.
pub fn status_line(exit: Exit) -> String {
    match exit {
        Exit::Status(n) => StatusLine::Exited(n),
        Exit::Signal(n) => StatusLine::Signalled(n),
    }
    .format()
}

/// The environment: exactly the configuration's, plus `PATH` when it has none.
pub fn environment(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut env = env.clone();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env
}

/// Finds the program as docker does: a name without `/` in `PATH` (relative entries against
/// the working directory), a relative path against the working directory. The error carries
/// docker's status: 127 not found, 126 not executable.
pub fn lookup(bin: &str, path_var: &str, workdir: &Path) -> Result<PathBuf, Error> {
    // The path is checked against the working directory but returned as written (relative
    // paths stay relative): the child changes into the working directory before exec, and a
    // script's interpreter gets this path as the script's name (`$0`), as runc gives it.
    if bin.contains('/') {
        return match executable(&workdir.join(bin)) {
            Ok(()) => Ok(PathBuf::from(bin)),
            Err(e) => Err(exec_error(bin, &e)),
        };
    }
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let p = Path::new(dir).join(bin);
        if executable(&workdir.join(&p)).is_ok() {
            return Ok(p);
        }
    }
    Err(Error::new(
        127,
        format!("exec {bin:?}: executable file not found in $PATH"),
    ))
}

fn executable(p: &Path) -> io::Result<()> {
    let m = fs::metadata(p)?;
    if m.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::EISDIR));
    }
    if m.mode() & 0o111 == 0 {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(())
}

fn exec_error(bin: &str, e: &io::Error) -> Error {
    let errno = e.raw_os_error().unwrap_or(0);
    let status = if errno == libc::ENOENT || errno == libc::ENOTDIR {
        127
    } else {
        126
    };
    Error::new(status, format!("exec {bin:?}: {e}"))
}

fn prepare(rc: &Rc, env: &BTreeMap<String, String>) -> Result<Spawn, Error> {
    let workdir = PathBuf::from(rc.workdir.as_deref().unwrap_or("/"));
    if !workdir.is_dir() {
        // docker creates a missing working directory.
        fs::create_dir_all(&workdir).map_err(|e| {
            Error::new(
                127,
                format!("creating the working directory {workdir:?}: {e}"),
            )
        })?;
    }
    let path = lookup(&rc.bin, &env["PATH"], &workdir)?;
    let c = |s: &str| sys::cstr(s).map_err(|e| Error::new(127, format!("{s:?}: {e}")));
    let mut argv = vec![c(&rc.bin)?];
    for a in &rc.argv {
        argv.push(c(a)?);
    }
    let envp = env
        .iter()
        .map(|(k, v)| c(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    let user = rc.user.clone().unwrap_or_default();
    Ok(Spawn {
        path: sys::cstr(&path).map_err(|e| Error::new(127, format!("{path:?}: {e}")))?,
        argv,
        envp,
        workdir: sys::cstr(&workdir).map_err(|e| Error::new(127, format!("{workdir:?}: {e}")))?,
        uid: user.uid,
        gid: user.gid,
        groups: user.groups,
    })
}

/// Runs the configuration's `rc` entries: background ones are started, foreground ones waited
/// for (a failure stops there), and the last one is the main application.
pub fn run(config: &Config, sup: &mut Supervisor) -> Result<Exit, Error> {
    if config.rc.is_empty() {
        return Err(Error::new(
            127,
            "the configuration has no program to run (\"rc\" is empty)",
        ));
    }
    let env = environment(&config.env);
    let last = config.rc.len() - 1;
    for (i, rc) in config.rc.iter().enumerate() {
        let spawn = prepare(rc, &env)?;
        step(|| format!("starting rc[{i}]: {} {:?}", rc.bin, rc.argv));
        let pid = match sys::spawn(&spawn) {
            Ok(Ok(pid)) => pid,
            Ok(Err((_, SpawnStep::Chdir, e))) => {
                return Err(Error::new(
                    127,
                    format!("chdir to {:?}: {e}", rc.workdir.as_deref().unwrap_or("/")),
                ))
            }
            Ok(Err((_, SpawnStep::Identity, e))) => {
                let u = rc.user.clone().unwrap_or_default();
                return Err(Error::new(
                    126,
                    format!("switching to uid {} gid {}: {e}", u.uid, u.gid),
                ));
            }
            Ok(Err((_, SpawnStep::Exec, e))) => {
                let mut err = exec_error(&rc.bin, &e);
                if e.raw_os_error() == Some(libc::ENOENT) {
                    err.msg
                        .push_str(" (is its ELF interpreter or #! interpreter missing?)");
                }
                return Err(err);
            }
            Err(e) => return Err(Error::new(127, format!("fork: {e}"))),
        };
        if i != last && rc.runmode == RunMode::Background {
            continue;
        }
        let exit = sup.wait_for(pid);
        step(|| format!("rc[{i}] ended: {exit:?}"));
        if i == last || exit != Exit::Status(0) || sup.shutting_down {
            return Ok(exit);
        }
    }
    unreachable!("the last entry returns")
}

/// Watches children and signals while a program runs.
pub struct Supervisor {
    signals: SignalFd,
    inputs: Vec<File>,
    stop_signal: i32,
    stop_timeout: Duration,
    kill_at: Option<Instant>,
    /// Whether a shutdown was requested.
    pub shutting_down: bool,
    ended: HashMap<i32, Exit>,
}

impl Supervisor {
    /// Blocks and catches the signals the init handles. Call before starting any child.
    pub fn new() -> io::Result<Supervisor> {
        let mut sigs = vec![libc::SIGCHLD];
        sigs.extend(FORWARDED);
        sigs.extend(SHUTDOWN);
        Ok(Supervisor {
            signals: SignalFd::new(&sigs)?,
            inputs: Vec::new(),
            stop_signal: libc::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            kill_at: None,
            shutting_down: false,
            ended: HashMap::new(),
        })
    }

    /// The image's stop signal and the time it has before SIGKILL.
    pub fn set_stop(&mut self, signal: i32, timeout: Duration) {
        self.stop_signal = signal;
        self.stop_timeout = timeout;
    }

    /// Watches the input devices for the power button (ACPI's, once the `button` and `evdev`
    /// modules are loaded).
    pub fn watch_power_button(&mut self) {
        let Ok(dir) = fs::read_dir("/dev/input") else {
            return;
        };
        for e in dir.flatten() {
            if !e.file_name().to_string_lossy().starts_with("event") {
                continue;
            }
            if let Ok(f) = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(e.path())
            {
                self.inputs.push(f);
            }
        }
    }

    /// Waits until `pid` ends, handling signals meanwhile.
    pub fn wait_for(&mut self, pid: i32) -> Exit {
        loop {
            if let Some(exit) = self.ended.remove(&pid) {
                return exit;
            }
            let timeout = match self.kill_at {
                Some(t) => t
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128) as i32,
                None => -1,
            };
            let mut fds = vec![self.signals.as_raw_fd()];
            fds.extend(self.inputs.iter().map(|f| f.as_raw_fd()));
            let ready = sys::poll_readable(&fds, timeout).unwrap_or_else(|_| {
                // Cannot happen with valid descriptors; never spin if it does.
                std::thread::sleep(Duration::from_millis(10));
                vec![0]
            });
            if self.kill_at.is_some_and(|t| Instant::now() >= t) {
                step(|| "stop timeout: SIGKILL".into());
                let _ = sys::kill(pid, libc::SIGKILL);
                self.kill_at = None;
            }
            for i in ready {
                if i == 0 {
                    while let Some(si) = self.signals.read() {
                        self.on_signal(si.signo, pid);
                    }
                } else if power_button_pressed(&mut self.inputs[i - 1]) {
                    self.request_shutdown(pid);
                }
            }
        }
    }

    fn on_signal(&mut self, signo: i32, pid: i32) {
        if signo == libc::SIGCHLD {
            while let Ok(Some((child, exit))) = sys::reap_one() {
                self.ended.insert(child, exit);
            }
        } else if SHUTDOWN.contains(&signo) {
            self.request_shutdown(pid);
        } else {
            let _ = sys::kill(pid, signo);
        }
    }

    fn request_shutdown(&mut self, pid: i32) {
        if self.shutting_down {
            return;
        }
        step(|| format!("shutdown requested: signal {} to {pid}", self.stop_signal));
        self.shutting_down = true;
        let _ = sys::kill(pid, self.stop_signal);
        self.kill_at = Some(Instant::now() + self.stop_timeout);
    }
}

/// Whether the device reported a press of the power key (`EV_KEY`, `KEY_POWER`, value 1).
fn power_button_pressed(dev: &mut File) -> bool {
    let mut pressed = false;
    let mut buf = [0u8; 24 * 16];
    while let Ok(n) = dev.read(&mut buf) {
        if n == 0 {
            break;
        }
        pressed |= buf[..n].chunks_exact(24).any(is_power_press);
    }
    pressed
}

/// One `struct input_event` (64-bit: a 16-byte time, type, code, value).
fn is_power_press(ev: &[u8]) -> bool {
    const EV_KEY: u16 = 1;
    const KEY_POWER: u16 = 116;
    let kind = u16::from_ne_bytes([ev[16], ev[17]]);
    let code = u16::from_ne_bytes([ev[18], ev[19]]);
    let value = i32::from_ne_bytes([ev[20], ev[21], ev[22], ev[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// Ends the guest: every other process killed, the status line (if any) printed last and
/// drained to the console, file systems synced, power off. Never returns.
pub fn power_off(status: Option<String>) -> ! {
    let _ = sys::kill(-1, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match sys::reap_one() {
            Ok(Some(_)) => continue,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break,
        }
    }
    crate::volume::release();
    if let Some(s) = status {
        line(&s);
    }
    sys::tcdrain(1);
    sys::sync();
    let _ = sys::reboot(libc::RB_POWER_OFF);
    // Powering off failed (it cannot, as PID 1 with CAP_SYS_BOOT); halting is next best, and
    // PID 1 must never return.
    let _ = sys::reboot(libc::RB_HALT_SYSTEM);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn status_lines() {
        assert_eq!(status_line(Exit::Status(7)), "oci2uk: exit status 7");
        assert_eq!(status_line(Exit::Signal(9)), "oci2uk: killed by signal 9");
    }

    #[test]
    fn path_defaults_only_when_absent() {
        let env = environment(&BTreeMap::new());
        assert_eq!(env["PATH"], DEFAULT_PATH);
        assert_eq!(env.len(), 1);
        let mine = BTreeMap::from([("PATH".to_string(), "/x".to_string())]);
        assert_eq!(environment(&mine)["PATH"], "/x");
    }

    #[test]
    fn lookup_like_docker() {
        let base = std::env::temp_dir().join(format!("oci2uk-init-lookup-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (bin, work) = (base.join("bin"), base.join("work"));
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(work.join("sub")).unwrap();
        for (p, mode) in [
            (bin.join("app"), 0o755),
            (bin.join("data"), 0o644),
            (work.join("run.sh"), 0o700),
            (work.join("sub/tool"), 0o755),
        ] {
            fs::write(&p, "").unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let path = format!("/nonexistent:{}:sub", bin.display());

        assert_eq!(lookup("app", &path, &work).unwrap(), bin.join("app"));
        // A relative PATH entry is relative to the working directory.
        assert_eq!(
            lookup("tool", &path, &work).unwrap(),
            PathBuf::from("sub/tool")
        );
        assert_eq!(
            lookup("./run.sh", &path, &work).unwrap(),
            PathBuf::from("./run.sh")
        );
        let abs = bin.join("app");
        assert_eq!(lookup(abs.to_str().unwrap(), "", &work).unwrap(), abs);

        let e = lookup("data", &path, &work).unwrap_err();
        assert_eq!(e.status, 127);
        assert!(e.msg.contains("not found in $PATH"), "{}", e.msg);
        let e = lookup("nope", &path, &work).unwrap_err();
        assert_eq!(e.status, 127);
        let e = lookup("./missing", &path, &work).unwrap_err();
        assert_eq!(e.status, 127);
        let data = bin.join("data");
        let e = lookup(data.to_str().unwrap(), &path, &work).unwrap_err();
        assert_eq!(e.status, 126);
        let e = lookup("./sub", &path, &work).unwrap_err();
        assert_eq!(e.status, 126);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn power_key_events() {
        let ev = |kind: u16, code: u16, value: i32| {
            let mut e = [0u8; 24];
            e[16..18].copy_from_slice(&kind.to_ne_bytes());
            e[18..20].copy_from_slice(&code.to_ne_bytes());
            e[20..24].copy_from_slice(&value.to_ne_bytes());
            e
        };
        assert!(is_power_press(&ev(1, 116, 1)));
        assert!(!is_power_press(&ev(1, 116, 0)));
        assert!(!is_power_press(&ev(1, 30, 1)));
        assert!(!is_power_press(&ev(0, 116, 1)));
    }
}
