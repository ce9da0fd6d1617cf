//! Real boots: the baked file under `qemu-system-x86_64` (TCG), as the bundle's script starts
//! a kernel, with nothing but `-kernel FILE` (no `-initrd`, no `-append`), and through
//! `oci2uk run`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::{Boot, Guest, Machine};
use crate::util::*;

/// The fixture nginx baked once per test run, and its index page as the image holds it.
pub(crate) fn nginx_elf() -> &'static (PathBuf, String) {
    static ELF: OnceLock<(tempfile::TempDir, PathBuf, String)> = OnceLock::new();
    let (_, path, page) = ELF.get_or_init(|| {
        let s = Scratch::for_the_process();
        let image = format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"));
        assert_ok(&s.oci2uk(&["build", &image, "-o", "nginx.elf", "--quiet"]));
        assert_ok(&s.oci2uk(&[
            "build",
            &image,
            "--format",
            "tar",
            "-o",
            "nginx.tar",
            "--quiet",
        ]));
        let tar = std::fs::read(s.path().join("work/nginx.tar")).unwrap();
        let mut page = String::new();
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap() == Path::new("var/www/html/index.html") {
                e.read_to_string(&mut page).unwrap();
            }
        }
        assert!(!page.is_empty(), "the fixture has var/www/html/index.html");
        let path = s.path().join("work/nginx.elf");
        (s.dir, path, page)
    });
    // The tuple's last two fields, borrowed for the test's lifetime.
    static VIEW: OnceLock<(PathBuf, String)> = OnceLock::new();
    VIEW.get_or_init(|| (path.clone(), page.clone()))
}

fn serves(machine: Machine) {
    let (elf, page) = nginx_elf();
    let _one = one_vm();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Boot::new(elf, machine, 512)
        .forward(port, 80)
        .start(dir.path().join("console"));
    let body = vm.wait_page(port, "/", Duration::from_secs(120));
    assert_eq!(&body, page, "the page is the image's index.html");
}

#[test]
fn nginx_serves_on_microvm_with_plain_qemu() {
    serves(Machine::Microvm);
}

#[test]
fn nginx_serves_on_q35_with_plain_qemu() {
    serves(Machine::Q35);
}

#[test]
fn nginx_serves_through_oci2uk_run() {
    let (elf, page) = nginx_elf();
    let _one = one_vm();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Guest::run(
        elf,
        &["-p", &format!("127.0.0.1:{port}:80")],
        dir.path().join("console"),
    );
    let body = vm.wait_page(port, "/", Duration::from_secs(120));
    assert_eq!(&body, page);
    // nginx logs to stdout: the request shows on the console `run` passes through.
    vm.wait_for_console("\"GET / HTTP/1.0\" 200", Duration::from_secs(20));
}

#[test]
fn application_exit_status_is_runs_exit_status() {
    let s = Scratch::new();
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY"));
    let entry = r#"["sh","-c","echo out of the guest; exit 7"]"#;
    assert_ok(&s.oci2uk(&[
        "build",
        &image,
        "--entrypoint",
        entry,
        "-o",
        "bb.elf",
        "--quiet",
    ]));
    let _one = one_vm();
    let out = s.oci2uk(&["run", s.path().join("work/bb.elf").to_str().unwrap()]);
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "console:\n{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.contains("out of the guest"), "{console}");
    assert!(console.contains("oci2uk: exit status 7"), "{console}");
    // Too little memory for the initramfs is refused before boot, with status 125.
    let out = s.oci2uk(&[
        "run",
        s.path().join("work/bb.elf").to_str().unwrap(),
        "-m",
        "16",
    ]);
    assert_fails(&out, 125, &["-m 16 is too small", "MiB"]);
}

#[test]
fn build_time_errors_leave_no_output() {
    let reg = env("OCI2UK_TEST_REGISTRY");
    let s = Scratch::new();
    // An arm64 image for an x86_64 kernel.
    let out = s.oci2uk(&[
        "build",
        &format!("{reg}/multi:latest"),
        "--platform",
        "linux/arm64",
    ]);
    assert_fails(&out, 1, &["aarch64", "x86_64"]);
    // An entrypoint that is not in the image.
    let out = s.oci2uk(&[
        "build",
        &format!("{reg}/busybox:latest"),
        "--entrypoint",
        "/no/such/program",
    ]);
    assert_fails(&out, 1, &["/no/such/program"]);
    // One that is not executable.
    let out = s.oci2uk(&[
        "build",
        &format!("{reg}/nginx:latest"),
        "--entrypoint",
        "/etc/debian_version",
    ]);
    assert_fails(&out, 1, &["/etc/debian_version"]);
    assert!(s.outputs().is_empty(), "no output left: {:?}", s.outputs());
}

#[test]
fn bundle_holds_the_parts_and_launch_files() {
    let s = Scratch::new();
    let image = format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"));
    let out = s.oci2uk(&["build", &image, "--format", "bundle", "--json"]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dir = s.path().join("work/nginx.bundle");
    assert_eq!(v["output"], "nginx.bundle");
    for f in [
        "vmlinux",
        "initrd",
        "cmdline",
        "nginx.elf",
        "qemu.sh",
        "firecracker.json",
        "cloud-hypervisor.sh",
        "xen-pvh.cfg",
        "xen-pv.cfg",
    ] {
        assert!(dir.join(f).is_file(), "{f} in the bundle");
    }
    let elf = std::fs::read(dir.join("nginx.elf")).unwrap();
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&elf))
    );
    let fc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("firecracker.json")).unwrap()).unwrap();
    assert_eq!(fc["boot-source"]["kernel_image_path"], "vmlinux");
    assert_eq!(fc["machine-config"]["mem_size_mib"], v["memory_mib"]);
    for script in ["qemu.sh", "cloud-hypervisor.sh"] {
        let st = Command::new("sh")
            .arg("-n")
            .arg(dir.join(script))
            .status()
            .unwrap();
        assert!(st.success(), "{script} parses");
    }
    let pvh = std::fs::read_to_string(dir.join("xen-pvh.cfg")).unwrap();
    assert!(
        pvh.contains("type = \"pvh\"") && pvh.contains("nginx.elf"),
        "{pvh}"
    );
}

/// Whether a console line is the kernel's (`[    0.262208] PCI: Fatal: ...`).
pub(crate) fn is_kernel_line(l: &str) -> bool {
    l.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(t, _)| {
            let t = t.trim();
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

#[test]
fn sysctls_of_build_and_run_reach_the_guest() {
    let s = Scratch::new();
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY"));
    let entry = r#"["sh","-c","echo overcommit=$(cat /proc/sys/vm/overcommit_memory) somaxconn=$(cat /proc/sys/net/core/somaxconn)"]"#;
    let out = s.oci2uk(&[
        "build",
        &image,
        "--entrypoint",
        entry,
        "--sysctl",
        "vm.overcommit_memory=1",
        "--sysctl",
        "net.core.somaxconn=500",
        "-o",
        "sysctl.elf",
        "--json",
    ]);
    assert_ok(&out);
    // `kernel` is the path alone; why it was chosen is beside it.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kernel = v["kernel"].as_str().unwrap();
    assert!(Path::new(kernel).is_file(), "kernel {kernel:?}");
    assert!(
        matches!(v["kernel_choice"].as_str(), Some("installed" | "env")),
        "{v}"
    );
    let _one = one_vm();
    let elf = s.path().join("work/sysctl.elf");
    // run's own deep-merge over the file's; a name the kernel lacks is a warning.
    let out = s.oci2uk(&[
        "run",
        elf.to_str().unwrap(),
        "--sysctl",
        "net.core.somaxconn=1000",
        "--sysctl",
        "no.such.setting=1",
    ]);
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "console:\n{console}");
    assert!(
        console.contains("overcommit=1 somaxconn=1000"),
        "console:\n{console}"
    );
    assert!(
        console
            .contains("oci2uk: warning: sysctl no.such.setting=1: the kernel has no such setting"),
        "console:\n{console}"
    );
}

#[test]
fn running_out_of_memory_ends_visibly() {
    let s = Scratch::new();
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY"));
    // A shell variable that grows past the guest's memory.
    let entry = r#"["sh","-c","echo allocating; x=$(head -c 400000000 /dev/zero | tr '\\0' a); echo survived ${#x}"]"#;
    assert_ok(&s.oci2uk(&[
        "build",
        &image,
        "--entrypoint",
        entry,
        "-o",
        "oom.elf",
        "--quiet",
    ]));
    let _one = one_vm();
    let elf = s.path().join("work/oom.elf");
    let start = std::time::Instant::now();
    let mut vm = Guest::run(&elf, &["-m", "192"], s.path().join("console"));
    // Without the init's memory settings the guest thrashes for many minutes, silently.
    let st = vm.wait(Duration::from_secs(240));
    let took = start.elapsed();
    let console = vm.console();
    assert_eq!(st.code(), Some(137), "{st}; console:\n{console}");
    assert!(console.contains("allocating"), "console:\n{console}");
    assert!(!console.contains("survived"), "console:\n{console}");
    assert!(
        console.contains("oci2uk: out of memory: the kernel's OOM killer killed 1 process"),
        "console:\n{console}"
    );
    assert!(
        console.contains("oci2uk: killed by signal 9"),
        "console:\n{console}"
    );
    eprintln!("out of memory at -m 192: ended after {took:.1?}");
}

#[test]
fn run_of_an_image_names_its_digest_once() {
    let s = Scratch::new();
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY"));
    // A busy port stops the run after the build, before the boot.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = s.oci2uk(&["run", &image, "-p", &format!("127.0.0.1:{port}:80")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    let built = err
        .lines()
        .find(|l| l.starts_with("oci2uk: built "))
        .unwrap_or_else(|| panic!("no build line in:\n{err}"));
    assert_eq!(built.matches("sha256:").count(), 1, "{built}");
    assert!(err.contains("is already in use"), "{err}");
}
