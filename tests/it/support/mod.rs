//! The guest harness every VM test boots through: a [`Guest`] is a started VM (`oci2uk run`,
//! or QEMU itself under TCG from the same launch model `run` uses) with its console in a
//! file; it waits for a console line or a forwarded port and stops the VM, and every QEMU it
//! started, when dropped.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use oci2uk::launch::qemu::Machine;
use oci2uk::launch::qemu::{self, Accel, Qemu};

/// Calls `done` every `every` until it says yes or `timeout` passes; whether it said yes.
pub fn wait_until(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if done() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Sends `signal` (`INT`, `TERM`, `KILL`) to `pid`.
pub fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// `(ppid, comm)` of a live process, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `PID (COMM) STATE PPID ...`; COMM may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let mut rest = stat[close + 1..].split_whitespace();
    let state = rest.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, comm))
}

/// The live children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| proc_stat(*p).is_some_and(|(ppid, _)| ppid == pid))
        .collect()
}

/// Whether `pid` is a live QEMU.
fn is_qemu(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, comm)| comm.starts_with("qemu-system"))
}

/// `GET path` over HTTP/1.0 on a loopback port: the status line and the body, or `None` when
/// nothing answered.
pub fn http_get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let status = head.lines().next().unwrap_or_default().to_string();
    Some((status, body.to_string()))
}

fn is_ok(status: &str) -> bool {
    status.starts_with("HTTP/1.") && status.contains(" 200 ")
}

/// A QEMU boot under TCG, with the arguments the launch model gives (console on the
/// terminal, as the bundle's script boots): a kernel file and, optionally, an initramfs,
/// command line words and host ports forwarded from 127.0.0.1.
pub struct Boot {
    machine: Machine,
    model: Qemu,
}

impl Boot {
    /// `kernel` on `machine` with `memory_mib` of memory.
    pub fn new(kernel: &Path, machine: Machine, memory_mib: u64) -> Boot {
        Boot {
            machine,
            model: Qemu::new(kernel.display().to_string(), memory_mib),
        }
    }

    /// Forwards 127.0.0.1:`host` to the guest's TCP port `guest`.
    pub fn forward(mut self, host: u16, guest: u16) -> Boot {
        self.model.forwards.push(
            format!("127.0.0.1:{host}:{guest}")
                .parse()
                .expect("a forward"),
        );
        self
    }

    /// Boots `initrd` with the kernel.
    pub fn initrd(mut self, initrd: &Path) -> Boot {
        self.model.initrd = Some(initrd.display().to_string());
        self
    }

    /// Adds `words` to the kernel command line.
    pub fn append(mut self, words: &str) -> Boot {
        self.model.append = Some(words.to_string());
        self
    }

    /// The QEMU command.
    pub fn command(&self) -> Command {
        let mut c = Command::new(qemu::BINARY);
        c.args(self.model.args(self.machine, Accel::Tcg));
        c
    }

    /// Starts it, the console into `console`.
    pub fn start(&self, console: PathBuf) -> Guest {
        Guest::start(&mut self.command(), console)
    }
}

/// A VM process (`oci2uk run`, or QEMU itself) with its console and stderr in a file. Dropping
/// it stops it (SIGTERM first, so that `oci2uk run` ends its QEMU) and then kills every QEMU it
/// was seen to start, by pid: `oci2uk run` starts QEMU in its own process group, so a QEMU
/// whose `oci2uk run` died would otherwise go on running.
pub struct Guest {
    child: Child,
    console: PathBuf,
    qemus: Vec<u32>,
}

impl Guest {
    /// Starts `cmd` with its stdout and stderr into `console`.
    pub fn start(cmd: &mut Command, console: PathBuf) -> Guest {
        let out = File::create(&console).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut guest = Guest {
            child,
            console,
            qemus: Vec::new(),
        };
        guest.note_qemus();
        guest
    }

    /// `oci2uk run FILE ARGS...`, with its temporary files (the monitor socket, the volume
    /// shares) in the console's directory: a test that kills it leaves nothing in /tmp, and
    /// [`Guest::left_behind`] sees what a run that ended left.
    pub fn run(file: &Path, args: &[&str], console: PathBuf) -> Guest {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci2uk"));
        cmd.arg("run").arg(file).args(args);
        if let Some(dir) = console.parent() {
            cmd.env("TMPDIR", dir);
        }
        Guest::start(&mut cmd, console)
    }

    /// What `run` created in the console's directory and did not remove.
    pub fn left_behind(&self) -> Vec<String> {
        let dir = self
            .console
            .parent()
            .expect("the console is in a directory");
        let mut left: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("oci2uk-"))
            .collect();
        left.sort();
        left
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the VM has printed so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Notes the QEMU processes the child has started (itself, when it is QEMU).
    pub fn note_qemus(&mut self) {
        let pid = self.child.id();
        let mut found = children_of(pid);
        found.push(pid);
        for p in found {
            if is_qemu(p) && !self.qemus.contains(&p) {
                self.qemus.push(p);
            }
        }
    }

    /// The exit status once the process has ended, noting its QEMUs meanwhile.
    pub fn poll(&mut self) -> Option<ExitStatus> {
        self.note_qemus();
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to end by itself; panics with the console after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until(timeout, Duration::from_millis(100), || {
            status = self.poll();
            status.is_some()
        });
        status.unwrap_or_else(|| {
            panic!(
                "still running after {timeout:?}; console:\n{}",
                self.console()
            )
        })
    }

    /// Waits until the console holds `text`; panics with the console when the process ends
    /// first or `timeout` passes.
    pub fn wait_for_console(&mut self, text: &str, timeout: Duration) {
        let mut ended = None;
        let seen = wait_until(timeout, Duration::from_millis(100), || {
            if self.console().contains(text) {
                return true;
            }
            ended = self.poll();
            ended.is_some()
        });
        if let Some(st) = ended {
            if !self.console().contains(text) {
                panic!("ended ({st}) before {text:?}; console:\n{}", self.console());
            }
        }
        assert!(
            seen,
            "no {text:?} after {timeout:?}; console:\n{}",
            self.console()
        );
    }

    /// GETs `path` on the forwarded `port` until it answers 200; the body. Panics with the
    /// console when the process ends first or `timeout` passes.
    pub fn wait_page(&mut self, port: u16, path: &str, timeout: Duration) -> String {
        let mut page = None;
        let mut ended = None;
        wait_until(timeout, Duration::from_millis(250), || {
            ended = self.poll();
            if ended.is_some() {
                return true;
            }
            page = http_get(port, path)
                .filter(|(st, _)| is_ok(st))
                .map(|(_, b)| b);
            page.is_some()
        });
        if let Some(st) = ended {
            panic!(
                "the guest ended ({st}) before serving {path}; console:\n{}",
                self.console()
            );
        }
        page.unwrap_or_else(|| {
            panic!(
                "no page {path} after {timeout:?}; console:\n{}",
                self.console()
            )
        })
    }

    /// GETs `path` once, expecting 200; the body.
    pub fn get_ok(&self, port: u16, path: &str) -> String {
        match http_get(port, path) {
            Some((status, body)) if is_ok(&status) => body,
            other => panic!("GET {path}: {other:?}; console:\n{}", self.console()),
        }
    }

    /// The QEMU processes seen that are still alive.
    pub fn live_qemus(&self) -> Vec<u32> {
        self.qemus.iter().copied().filter(|p| is_qemu(*p)).collect()
    }

    /// Sends `signal` to the process (not to its QEMU).
    pub fn signal(&mut self, signal: &str) {
        self.note_qemus();
        kill(self.child.id(), signal);
    }

    /// Waits up to `timeout` for every QEMU seen to be gone; whether they are.
    pub fn qemus_gone(&self, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(50), || {
            self.live_qemus().is_empty()
        })
    }

    /// Stops the VM: SIGTERM, a hard kill after 10 s, then every QEMU seen, by pid.
    pub fn stop(&mut self) {
        self.note_qemus();
        if self.child.try_wait().ok().flatten().is_none() {
            kill(self.child.id(), "TERM");
            if !wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        for pid in self.live_qemus() {
            kill(pid, "KILL");
        }
        // Reparented, they are reaped by whoever is PID 1 here: wait until they are gone, so
        // the next test starts on an idle machine.
        self.qemus_gone(Duration::from_secs(5));
    }
}

impl Guest {
    /// Waits until `probe` succeeds (an application answering on its port): it is asked every
    /// half second until `timeout`; panics with the console and the probe's last error when the
    /// guest ends first or the time runs out. `what` names the application in the message.
    pub fn wait_answering(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<(), String>,
    ) {
        let mut last = String::new();
        let mut ended = None;
        let ready = wait_until(timeout, Duration::from_millis(500), || {
            ended = self.poll();
            if ended.is_some() {
                return true;
            }
            match probe() {
                Ok(()) => true,
                Err(e) => {
                    last = e;
                    false
                }
            }
        });
        if let Some(st) = ended {
            panic!(
                "the guest ended ({st}) before {what} answered; console:\n{}",
                self.console()
            );
        }
        assert!(
            ready,
            "{what} did not answer after {timeout:?} ({last}); console:\n{}",
            self.console()
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Debian's kernel, the newest installed one with its modules: for the tests of what a
/// kernel with modules does (loading them, a root image in a loop device).
pub fn distribution_kernel() -> PathBuf {
    oci2uk::kernel::newest_installed(Path::new("/boot"), Path::new("/lib/modules"))
        .expect("an installed kernel with modules (scripts/install-vm.sh installs Debian's)")
}

/// The oci2uk kernel, `$OCI2UK_KERNEL` (scripts/test.sh builds it and sets it), checked to be
/// one: built without modules and able to read a root image in place.
pub fn oci2uk_kernel() -> PathBuf {
    let path = PathBuf::from(std::env::var_os("OCI2UK_KERNEL").expect(
        "OCI2UK_KERNEL names the oci2uk kernel (`oci2uk kernel build --json` prints its path)",
    ));
    let config = oci2uk::kernel::Kernel::load(&path)
        .expect("a kernel")
        .config()
        .expect("its configuration")
        .expect("a kernel with its configuration built in");
    assert!(
        !config.is_builtin("MODULES") && config.reads_root_in_place(),
        "{} is not the oci2uk kernel",
        path.display()
    );
    path
}
