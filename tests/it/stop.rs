//! Stopping `oci2uk run` as a supervisor, a CI job or a user at a terminal does: SIGTERM and
//! ctrl-C press the guest's power button and the application stops through its own stop
//! signal; `--stop-timeout` bounds the wait; a second ctrl-C stops the VM at once; SIGKILL
//! takes QEMU with it; a busy host port is refused before QEMU starts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::support::Guest;
use crate::util::*;
use crate::vm::nginx_elf;

/// How long a boot may take until the application answers (TCG on a busy machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// How long `run` may take to end once it was asked to.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A busybox shell that announces itself and traps its stop signal (SIGTERM) without
/// stopping, baked into the scratch directory.
fn stubborn_elf(s: &Scratch) -> PathBuf {
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY"));
    let entry = r#"["sh","-c","trap 'echo ignoring TERM' TERM; echo stubborn started; while true; do sleep 1; done"]"#;
    assert_ok(&s.oci2uk(&[
        "build",
        &image,
        "--entrypoint",
        entry,
        "-o",
        "stubborn.elf",
        "--quiet",
    ]));
    s.path().join("work/stubborn.elf")
}

#[test]
fn sigterm_stops_nginx_through_its_stop_signal() {
    let (elf, _) = nginx_elf();
    let _one = one_vm();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Guest::run(
        elf,
        &["-p", &format!("127.0.0.1:{port}:80")],
        dir.path().join("console"),
    );
    vm.wait_page(port, "/", BOOT_TIMEOUT);
    vm.signal("TERM");
    let t = Instant::now();
    let st = vm.wait(STOP_TIMEOUT);
    let took = t.elapsed();
    let console = vm.console();
    // nginx ends on SIGQUIT, its image's stop signal, with status 0; SIGTERM would have
    // killed it (143).
    assert_eq!(st.code(), Some(0), "{st}; console:\n{console}");
    assert!(
        console.contains("oci2uk: exit status 0"),
        "console:\n{console}"
    );
    assert!(
        vm.qemus_gone(Duration::from_secs(5)),
        "{:?}",
        vm.live_qemus()
    );
    assert_eq!(
        vm.left_behind(),
        Vec::<String>::new(),
        "run's temporary files"
    );
    // The console went to a file: plain line ends.
    assert!(!console.contains('\r'), "CR in the console:\n{console:?}");
    // A quiet console: run's own lines (the memory it gives, the stop), nginx's, the
    // status line last, and nothing of the kernel's.
    let lines: Vec<&str> = console.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines[0].starts_with("oci2uk: guest memory 512 MiB (the file needs "),
        "console:\n{console}"
    );
    assert_eq!(
        lines.last().copied(),
        Some("oci2uk: exit status 0"),
        "console:\n{console}"
    );
    for l in &lines {
        assert!(
            !crate::vm::is_kernel_line(l) && !l.contains("PCI:") && !l.contains("reboot:"),
            "a kernel line on the console: {l:?}; console:\n{console}"
        );
    }
    eprintln!("nginx stopped by SIGTERM in {took:.1?}");
}

#[test]
fn sigkill_to_run_leaves_no_qemu() {
    let (elf, _) = nginx_elf();
    let _one = one_vm();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Guest::run(
        elf,
        &["-p", &format!("127.0.0.1:{port}:80")],
        dir.path().join("console"),
    );
    vm.wait_page(port, "/", BOOT_TIMEOUT);
    vm.note_qemus();
    let qemus = vm.live_qemus();
    assert_eq!(qemus.len(), 1, "one QEMU under oci2uk run: {qemus:?}");
    vm.signal("KILL");
    let st = vm.wait(STOP_TIMEOUT);
    assert_eq!(st.code(), None, "killed: {st}");
    // Nothing but `run`'s death ended QEMU here: the harness kills left-over QEMUs only when
    // it is dropped, after this check.
    assert!(
        vm.qemus_gone(Duration::from_secs(5)),
        "QEMU {:?} outlived oci2uk run killed by SIGKILL",
        vm.live_qemus()
    );
}

#[test]
fn stop_timeout_ends_an_application_that_ignores_its_stop_signal() {
    let s = Scratch::new();
    let elf = stubborn_elf(&s);
    let _one = one_vm();
    let mut vm = Guest::run(&elf, &["--stop-timeout", "2"], s.path().join("console"));
    vm.wait_for_console("stubborn started", BOOT_TIMEOUT);
    vm.signal("TERM");
    let t = Instant::now();
    let st = vm.wait(STOP_TIMEOUT);
    let took = t.elapsed();
    let console = vm.console();
    assert_eq!(st.code(), Some(137), "{st}; console:\n{console}");
    assert!(console.contains("ignoring TERM"), "console:\n{console}");
    // About two seconds: not before the timeout, and well before the default ten.
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "stopped after {took:?}; console:\n{console}"
    );
    assert!(
        vm.qemus_gone(Duration::from_secs(5)),
        "{:?}",
        vm.live_qemus()
    );
    eprintln!("--stop-timeout 2: ended with 137 after {took:.1?}");
}

#[test]
fn a_second_interrupt_stops_the_vm_at_once() {
    let s = Scratch::new();
    let elf = stubborn_elf(&s);
    let _one = one_vm();
    let mut vm = Guest::run(&elf, &[], s.path().join("console"));
    vm.wait_for_console("stubborn started", BOOT_TIMEOUT);
    vm.signal("INT");
    vm.wait_for_console("ignoring TERM", Duration::from_secs(20));
    vm.signal("INT");
    let t = Instant::now();
    let st = vm.wait(STOP_TIMEOUT);
    let took = t.elapsed();
    assert_eq!(st.code(), Some(137), "{st}; console:\n{}", vm.console());
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert!(
        vm.qemus_gone(Duration::from_secs(5)),
        "{:?}",
        vm.live_qemus()
    );
}

#[test]
fn a_busy_host_port_is_one_line_and_125() {
    let (elf, _) = nginx_elf();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let s = Scratch::new();
    let elf = elf.to_str().unwrap();
    let out = s.oci2uk(&["run", elf, "-p", &format!("127.0.0.1:{port}:80")]);
    assert_fails(
        &out,
        125,
        &[&format!("host port 127.0.0.1:{port}/tcp is already in use")],
    );
    // Without an address QEMU listens on all of them, where the port is taken too.
    let out = s.oci2uk(&["run", elf, "-p", &format!("{port}:80")]);
    assert_fails(
        &out,
        125,
        &[&format!("host port {port}/tcp is already in use")],
    );
    assert!(out.stdout.is_empty(), "QEMU never started");
}
