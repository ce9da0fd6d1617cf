//! Real boots of a baked kernel under QEMU (software emulation), with no `-initrd` and no
//! `-append`: the installed distribution kernel, a busybox initramfs whose `/init` prints a
//! marker with `/proc/cmdline` and powers off. Slow, so built only with the `vm-tests`
//! feature; with it, a missing kernel, busybox or QEMU is a failure.
#![cfg(feature = "vm-tests")]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bake::{bake_inner, Placement};
use crate::kernel::{discover, Kernel};
use crate::launch::qemu::{self, Accel, Machine, Qemu};

const MARKER: &str = "OCI2UK-BAKE-BOOTED";
const CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init quiet";
const INIT: &str = "#!/bin/busybox sh\n\
/bin/busybox mount -t proc proc /proc\n\
echo \"OCI2UK-BAKE-BOOTED cmdline=[$(/bin/busybox cat /proc/cmdline)]\"\n\
/bin/busybox poweroff -f\n";

/// A newc cpio archive (what the kernel unpacks as an initramfs).
#[derive(Default)]
pub(crate) struct Cpio(Vec<u8>);

impl Cpio {
    pub(crate) fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.0.len() as u32 + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.0.extend_from_slice(b"070701");
        for f in fields {
            self.0.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        self.pad();
        self.0.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), b"");
        self.0
    }
}

fn busybox_initramfs() -> Option<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox").ok()?;
    let mut cpio = Cpio::default();
    cpio.entry("bin", 0o40755, (0, 0), b"");
    cpio.entry("bin/busybox", 0o100755, (0, 0), &busybox);
    cpio.entry("dev", 0o40755, (0, 0), b"");
    cpio.entry("dev/console", 0o20600, (5, 1), b"");
    cpio.entry("proc", 0o40755, (0, 0), b"");
    cpio.entry("init", 0o100755, (0, 0), INIT.as_bytes());
    // Uncompressed: every kernel that takes an initramfs reads one, whichever decompressors it
    // has (the oci2uk kernel has zstd's alone).
    Some(cpio.finish())
}

/// Boots `elf` on QEMU (TCG) on `machine`, with `append` added to its command line: the
/// console output, the time it took, and whether it finished before `timeout`.
fn boot(
    elf: &Path,
    machine: Machine,
    append: Option<&str>,
    timeout: Duration,
) -> (String, Duration, bool) {
    let start = Instant::now();
    let mut model = Qemu::new(elf.display().to_string(), 256);
    model.append = append.map(str::to_string);
    let mut child = Command::new(qemu::BINARY)
        .args(model.args(machine, Accel::Tcg))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 runs");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let finished = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let elapsed = start.elapsed();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    let out = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    (format!("{out}{err}"), elapsed, finished)
}

#[test]
fn boots_under_qemu_q35_and_microvm() {
    let chosen = discover(None).expect("a kernel: set OCI2UK_KERNEL or install one");
    let kernel = Kernel::load(&chosen.path).unwrap();
    let initramfs = busybox_initramfs().expect("a static /bin/busybox (busybox-static)");
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("baked.elf");
    let moved = dir.path().join("moved.elf");
    for (path, move_phdrs) in [(&elf, false), (&moved, true)] {
        let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        let layout: Placement = bake_inner(
            &kernel,
            &initramfs[..],
            initramfs.len() as u64,
            None,
            CMDLINE,
            file,
            move_phdrs,
        )
        .unwrap();
        eprintln!(
            "baked {chosen} ({}) with {} bytes of initramfs: {layout:#x?}",
            kernel.version,
            initramfs.len()
        );
    }

    // Under software emulation microvm gives the kernel no way to learn the TSC's frequency
    // (its ACPI is hardware-reduced, so Linux ignores the PIT; TCG has no kvmclock), and
    // Debian's kernel then hangs calibrating; `tsc_early_khz` tells it. KVM needs no such word.
    let cases: [(&str, &Path, Machine, Option<&str>, String); 4] = [
        ("q35", &elf, Machine::Q35, None, CMDLINE.to_string()),
        (
            "q35, program headers moved to the end",
            &moved,
            Machine::Q35,
            None,
            CMDLINE.to_string(),
        ),
        (
            "q35 -append",
            &elf,
            Machine::Q35,
            Some("foo=bar"),
            format!("{CMDLINE} foo=bar"),
        ),
        (
            "microvm -append",
            &elf,
            Machine::Microvm,
            Some("tsc_early_khz=2000000 foo=bar"),
            format!("{CMDLINE} tsc_early_khz=2000000 foo=bar"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, file, machine, append, expected) in cases {
        let (out, took, finished) = boot(file, machine, append, Duration::from_secs(240));
        let want = format!("{MARKER} cmdline=[{expected}]");
        let ok = out.contains(&want);
        eprintln!(
            "{name}: {} in {:.1}s{}",
            if ok { "booted" } else { "FAILED" },
            took.as_secs_f64(),
            if finished { "" } else { " (timed out)" }
        );
        if !ok {
            failures.push(format!("{name}: expected {want:?} in:\n{out}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
