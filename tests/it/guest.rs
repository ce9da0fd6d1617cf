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
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::{Boot, Guest, Machine};
use crate::util::*;

/// How long a boot may take until the application answers or ends (TCG on a busy machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long `oci2uk run` may take to stop after a ctrl-C.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

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
    let page = guest.wait_page(port, "/", BOOT_TIMEOUT);
    let served = t2.elapsed();
    let want = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testregistry/webapp/site/index.html"),
    )
    .unwrap();
    assert_eq!(page, want, "the page COPY put into the image");

    // The CGI scripts run as the Dockerfile's USER, with its ENV, in the guest named after the
    // repository.
    let who = guest.get_ok(port, "/cgi-bin/whoami");
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
    assert_eq!(guest.get_ok(port, "/cgi-bin/visit").trim(), "visits=1");
    assert_eq!(guest.get_ok(port, "/cgi-bin/visit").trim(), "visits=2");
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
    guest.signal("INT");
    let t3 = Instant::now();
    let st = guest.wait(STOP_TIMEOUT);
    let stopped = t3.elapsed();
    assert!(
        guest.qemus_gone(Duration::from_secs(5)),
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
    let boot = Boot::new(&elf, Machine::Microvm, 256).append(&format!(
        "oci2uk.config={}",
        oci2uk_config::encode_override(&over)
    ));
    let start = Instant::now();
    let mut guest = boot.start(s.path().join("console"));
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
    guest.wait_for_console("guest app started", BOOT_TIMEOUT);
    guest.note_qemus();
    assert_eq!(guest.live_qemus().len(), 1, "one QEMU under oci2uk run");
    guest.signal("TERM");
    let st = guest.wait(STOP_TIMEOUT);
    assert!(
        guest.qemus_gone(Duration::from_secs(10)),
        "oci2uk run ended by SIGTERM ({st}) but its QEMU {:?} still runs",
        guest.live_qemus()
    );
}
