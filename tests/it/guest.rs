//! The guest as its application sees it, booted under QEMU (TCG):
//!
//! - `Dockerfile.test`, built with buildah the way a CI pipeline builds it, pushed to the test
//!   registry, converted, and serving its pages and CGI scripts through `oci2uk run -p`;
//! - the `guestcheck` fixture (`testregistry/guestcheck/check.sh`), whose entrypoint checks from
//!   inside the guest that the image's Entrypoint, Cmd, WorkingDir, User, Env and Volume took
//!   effect as docker applies them, that `run -e` and the `oci2uk.config=` kernel parameter
//!   reach it, and that its exit status comes back out of `oci2uk run`.
//!
//! Needs the test registry with its fixtures (`testregistry/up.sh`), `qemu-system-x86_64`,
//! Debian's cloud kernel and buildah. Every VM is stopped, and every QEMU it started killed by
//! pid, when its test ends, passing or not.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

/// How long a boot may take until the application answers or ends (TCG on a busy machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long `oci2uk run` may take to stop after a ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends `signal` (`INT`, `KILL`) to `pid`.
fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// `(ppid, comm)` of a process, from `/proc/PID/stat`.
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

/// A VM process (`oci2uk run`, or QEMU itself) with its console and stderr in a file. Dropping
/// it kills it and every QEMU it was seen to start, by pid: `oci2uk run` starts QEMU in its own
/// process group, so a QEMU whose `oci2uk run` died would otherwise go on running.
struct Guest {
    child: Child,
    console: PathBuf,
    qemus: Vec<u32>,
}

impl Guest {
    fn start(cmd: &mut Command, console: PathBuf) -> Guest {
        let out = File::create(&console).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Guest {
            child,
            console,
            qemus: Vec::new(),
        }
    }

    /// `oci2uk run FILE ARGS...`.
    fn run(file: &Path, args: &[&str], console: PathBuf) -> Guest {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci2uk"));
        cmd.arg("run").arg(file).args(args);
        Guest::start(&mut cmd, console)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Notes the QEMU processes the child has started (itself, when it is QEMU).
    fn note_qemus(&mut self) {
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
    fn poll(&mut self) -> Option<ExitStatus> {
        self.note_qemus();
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to end by itself; panics with the console after `timeout`.
    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.poll() {
                return st;
            }
            if start.elapsed() > timeout {
                panic!(
                    "still running after {timeout:?}; console:\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The QEMU processes seen that are still alive.
    fn live_qemus(&self) -> Vec<u32> {
        self.qemus.iter().copied().filter(|p| is_qemu(*p)).collect()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.note_qemus();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in self.live_qemus() {
            kill(pid, "KILL");
        }
        // Reparented, they are reaped by whoever is PID 1 here: wait until they are gone, so
        // the next test starts on an idle machine.
        let start = Instant::now();
        while !self.live_qemus().is_empty() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `GET path` over HTTP/1.0: the status line and the body, or `None` when nothing answered.
fn http_get(port: u16, path: &str) -> Option<(String, String)> {
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

/// GETs `path` until it answers 200, the guest ends, or `timeout` passes; returns the body.
fn wait_page(guest: &mut Guest, port: u16, path: &str, timeout: Duration) -> String {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(st) = guest.poll() {
            panic!(
                "the guest ended ({st}) before serving; console:\n{}",
                guest.console()
            );
        }
        if let Some((status, body)) = http_get(port, path) {
            if status.starts_with("HTTP/1.") && status.contains(" 200 ") {
                return body;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("no page after {timeout:?}; console:\n{}", guest.console());
}

/// GETs `path` once, expecting 200; returns the body.
fn get_ok(guest: &Guest, port: u16, path: &str) -> String {
    match http_get(port, path) {
        Some((status, body)) if status.contains(" 200 ") => body,
        other => panic!("GET {path}: {other:?}; console:\n{}", guest.console()),
    }
}

/// Runs buildah with its own storage under `storage` (vfs, as on a CI runner without
/// overlayfs), in the repository.
fn buildah(storage: &Path, args: &[&str]) -> Output {
    Command::new("buildah")
        .arg("--root")
        .arg(storage.join("root"))
        .arg("--runroot")
        .arg(storage.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("buildah: {e} (testregistry/install.sh installs it)"))
}

fn assert_ok_out(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerfile_test_builds_converts_and_serves() {
    let reg = env("OCI2UK_TEST_REGISTRY");
    let s = Scratch::new();
    let storage = s.path().join("buildah");
    let image = format!("{reg}/webapp:latest");

    let t0 = Instant::now();
    let out = buildah(
        &storage,
        &[
            "bud",
            "--isolation",
            "chroot",
            "--tls-verify=false",
            "--build-arg",
            &format!("BASE={reg}/busybox:latest"),
            "-f",
            "Dockerfile.test",
            "-t",
            "oci2uk-webapp",
            "testregistry/webapp",
        ],
    );
    assert_ok_out(&out, "buildah bud -f Dockerfile.test");
    let out = buildah(
        &storage,
        &[
            "push",
            "--tls-verify=false",
            "oci2uk-webapp",
            &format!("docker://{image}"),
        ],
    );
    assert_ok_out(&out, "buildah push");
    let built = t0.elapsed();

    let t1 = Instant::now();
    assert_ok(&s.oci2uk(&["build", &image, "-o", "webapp.elf", "--quiet"]));
    let converted = t1.elapsed();
    let elf = s.path().join("work/webapp.elf");

    let _one = one_vm();
    let port = free_port();
    let t2 = Instant::now();
    let mut guest = Guest::run(
        &elf,
        &["-p", &format!("127.0.0.1:{port}:8080")],
        s.path().join("console"),
    );
    let page = wait_page(&mut guest, port, "/", BOOT_TIMEOUT);
    let served = t2.elapsed();
    let want = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testregistry/webapp/site/index.html"),
    )
    .unwrap();
    assert_eq!(page, want, "the page COPY put into the image");

    // The CGI scripts run as the Dockerfile's USER, with its ENV, in the guest named after the
    // repository.
    let who = get_ok(&guest, port, "/cgi-bin/whoami");
    for line in [
        "uid=1000 gid=1000 groups=1000",
        "user=www",
        "greeting=Hello from Dockerfile.test",
        "home=/srv/www",
        "app_home=/srv/www",
        "hostname=webapp",
    ] {
        assert!(who.lines().any(|l| l == line), "{line:?} not in:\n{who}");
    }
    // The VOLUME is writable by that user.
    assert_eq!(get_ok(&guest, port, "/cgi-bin/visit").trim(), "visits=1");
    assert_eq!(get_ok(&guest, port, "/cgi-bin/visit").trim(), "visits=2");
    // httpd -v logs each request on the console `run` passes through.
    assert!(
        guest.console().contains("response:200"),
        "console:\n{}",
        guest.console()
    );

    // ctrl-C at a terminal: `run` stops QEMU and ends.
    guest.note_qemus();
    let qemus = guest.live_qemus();
    assert_eq!(qemus.len(), 1, "one QEMU under oci2uk run: {qemus:?}");
    kill(guest.child.id(), "INT");
    let t3 = Instant::now();
    let st = guest.wait(STOP_TIMEOUT);
    let stopped = t3.elapsed();
    let start = Instant::now();
    while !guest.live_qemus().is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        guest.live_qemus().is_empty(),
        "QEMU {:?} still runs after oci2uk run ended ({st})",
        guest.live_qemus()
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the forwarded port is closed"
    );
    eprintln!(
        "webapp: buildah bud+push {built:.1?}, oci2uk build {converted:.1?}, \
         first page {served:.1?} after run, stopped by SIGINT in {stopped:.1?} ({st})"
    );
}

/// The `CHECK NAME RESULT` lines of a console, by name (the last one wins).
fn checks(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("CHECK "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, result)| (name.to_string(), result.to_string()))
        .collect()
}

/// Asserts every check in `names` ran and said ok, none failed, and the script finished.
fn assert_checks(console: &str, names: &[&str]) {
    let got = checks(console);
    let failed: Vec<String> = got
        .iter()
        .filter(|(n, r)| *n != "done" && r.as_str() != "ok")
        .map(|(n, r)| format!("CHECK {n} {r}"))
        .collect();
    let missing: Vec<&&str> = names.iter().filter(|n| !got.contains_key(**n)).collect();
    assert!(
        failed.is_empty() && missing.is_empty(),
        "failed: {failed:#?}\nmissing: {missing:?}\nconsole:\n{console}"
    );
    assert_eq!(
        got.get("done").map(String::as_str),
        Some("0 failed"),
        "console:\n{console}"
    );
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

/// The console's last line that is neither empty nor the kernel's: the kernel itself prints
/// `reboot: Power down` after the init's status line, however quiet it is asked to be.
fn last_line(console: &str) -> &str {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .rfind(|l| !l.trim().is_empty() && !is_kernel_line(l))
        .unwrap_or("")
}

/// Bakes the guestcheck fixture with the build's extra `args` into `s`'s `work/guestcheck.elf`.
fn guestcheck_elf(s: &Scratch, args: &[&str]) -> PathBuf {
    let image = format!("{}/guestcheck:latest", env("OCI2UK_TEST_REGISTRY"));
    let mut all = vec!["build", image.as_str(), "-o", "guestcheck.elf", "--quiet"];
    all.extend(args);
    let out = s.oci2uk(&all);
    assert!(
        out.status.success(),
        "{}\n(no guestcheck:latest? testregistry/fixtures.sh push, or testregistry/up.sh, \
         pushes it)",
        String::from_utf8_lossy(&out.stderr)
    );
    s.path().join("work/guestcheck.elf")
}

const IDENTITY_CHECKS: [&str; 6] = [
    "uid",
    "gid",
    "user-name",
    "groups",
    "proc-groups",
    "workdir",
];

#[test]
fn guestcheck_sees_the_image_configuration() {
    let s = Scratch::new();
    let elf = guestcheck_elf(&s, &[]);
    let _one = one_vm();
    let start = Instant::now();
    let mut guest = Guest::run(&elf, &["-e", "EXTRA=1"], s.path().join("console"));
    let st = guest.wait(BOOT_TIMEOUT);
    let took = start.elapsed();
    let console = guest.console();
    let mut names = vec!["argv0", "argc", "args"];
    names.extend(IDENTITY_CHECKS);
    names.extend([
        "env-greeting",
        "env-equals",
        "env-empty",
        "env-path",
        "env-home",
        "env-hostname",
        "env-extra",
        "env-exact",
        "volume-fs",
        "volume-owner",
        "volume-seed",
        "volume-seed-owner",
        "volume-seed-nested",
        "volume-seed-root-file",
        "volume-writable",
        "tmp-fs",
        "tmp-mode",
        "tmp-writable",
        "hostname",
        "etc-hostname",
        "etc-hosts",
        "net-addr",
        "resolv",
        "umask",
        "nofile",
        "not-pid1",
    ]);
    assert_checks(&console, &names);
    assert_eq!(st.code(), Some(0), "console:\n{console}");
    assert_eq!(last_line(&console), "oci2uk: exit status 0", "{console}");
    eprintln!(
        "guestcheck: {} checks passed, run took {took:.1?}",
        names.len()
    );
}

#[test]
fn boot_override_changes_env_and_argv_without_rebuilding() {
    let s = Scratch::new();
    let elf = guestcheck_elf(&s, &[]);
    // `cmdline` replaces the program and its arguments and keeps the entry's user and working
    // directory; `sh` is found in PATH, and check.sh in the working directory.
    let over = serde_json::json!({
        "env": { "X": "y", "GREETING": null },
        "cmdline": "sh check.sh override 'a b'",
    });
    let _one = one_vm();
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg",
        "-m",
        "256",
        "-M",
        "microvm,isa-serial=on",
        "-nographic",
        "-no-reboot",
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
        "-kernel",
    ])
    .arg(&elf)
    .args([
        "-append",
        &format!("oci2uk.config={}", oci2uk_config::encode_override(&over)),
    ]);
    let start = Instant::now();
    let mut guest = Guest::start(&mut qemu, s.path().join("console"));
    let st = guest.wait(BOOT_TIMEOUT);
    let took = start.elapsed();
    let console = guest.console();
    let mut names = vec![
        "argv0",
        "argc",
        "args",
        "env-added",
        "env-removed",
        "env-kept",
    ];
    names.extend(IDENTITY_CHECKS);
    assert_checks(&console, &names);
    assert_eq!(last_line(&console), "oci2uk: exit status 0", "{console}");
    assert!(st.success(), "QEMU {st} after the guest powered off");
    eprintln!("guestcheck override: plain QEMU boot to power-off {took:.1?}");
}

#[test]
fn application_exit_status_and_output_come_out_of_run() {
    let s = Scratch::new();
    // The Entrypoint stays, the Cmd becomes `exit 7`.
    let elf = guestcheck_elf(&s, &["--cmd", r#"["exit","7"]"#]);
    let _one = one_vm();
    let mut guest = Guest::run(&elf, &[], s.path().join("console"));
    let st = guest.wait(BOOT_TIMEOUT);
    let console = guest.console();
    assert_eq!(st.code(), Some(7), "console:\n{console}");
    assert!(
        console.contains("guestcheck: exiting with status 7 as asked"),
        "{console}"
    );
    assert_eq!(last_line(&console), "oci2uk: exit status 7", "{console}");
    // The VM is off: run ended by itself and left no QEMU behind.
    assert!(guest.live_qemus().is_empty(), "{:?}", guest.live_qemus());
}

#[test]
fn run_ended_by_sigterm_leaves_no_qemu() {
    // What a CI job's cancellation, `timeout`, or `kill` sends: `run` must not leave its QEMU
    // running (and holding the forwarded ports) when it goes.
    let s = Scratch::new();
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY"));
    let entry = r#"["sh","-c","echo guest app started; exec sleep 600"]"#;
    assert_ok(&s.oci2uk(&[
        "build",
        &image,
        "--entrypoint",
        entry,
        "-o",
        "sleeper.elf",
        "--quiet",
    ]));
    let _one = one_vm();
    let mut guest = Guest::run(
        &s.path().join("work/sleeper.elf"),
        &[],
        s.path().join("console"),
    );
    let start = Instant::now();
    while !guest.console().contains("guest app started") {
        if let Some(st) = guest.poll() {
            panic!("run ended ({st}); console:\n{}", guest.console());
        }
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "console:\n{}",
            guest.console()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    guest.note_qemus();
    assert_eq!(guest.live_qemus().len(), 1, "one QEMU under oci2uk run");
    kill(guest.child.id(), "TERM");
    let st = guest.wait(STOP_TIMEOUT);
    let start = Instant::now();
    while !guest.live_qemus().is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        guest.live_qemus().is_empty(),
        "oci2uk run ended by SIGTERM ({st}) but its QEMU {:?} still runs",
        guest.live_qemus()
    );
}
