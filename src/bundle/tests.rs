use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use super::*;

const CMDLINE_TEXT: &str = "console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet";

fn parts<'a>(elf: Option<&'a [u8]>) -> BundleParts<'a> {
    BundleParts {
        name: "web/nginx".to_string(),
        vmlinux: Blob::Bytes(b"\x7fELF vmlinux"),
        initrd: Blob::Bytes(b"\x28\xb5\x2f\xfd initrd"),
        elf: elf.map(Blob::Bytes),
        cmdline: CMDLINE_TEXT.to_string(),
        memory_mib: 288,
        vcpus: 1,
        ports: vec!["80/tcp".parse().unwrap(), "53/udp".parse().unwrap()],
    }
}

fn listing(dir: &Path) -> BTreeMap<String, u32> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
            (e.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect()
}

#[test]
fn the_bundle_holds_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nginx.bundle");
    write_bundle(&dir, &parts(Some(b"baked"))).unwrap();
    let files = listing(&dir);
    let want: BTreeMap<String, u32> = [
        ("README", 0o644),
        ("cloud-hypervisor.sh", 0o755),
        ("cmdline", 0o644),
        ("firecracker.json", 0o644),
        ("initrd", 0o644),
        ("qemu.sh", 0o755),
        ("vmlinux", 0o644),
        ("web-nginx.elf", 0o644),
        ("xen-pv.cfg", 0o644),
        ("xen-pvh.cfg", 0o644),
    ]
    .into_iter()
    .map(|(n, m)| (n.to_string(), m))
    .collect();
    // Modes as the umask gives them; the scripts are executable whatever it is.
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for s in ["qemu.sh", "cloud-hypervisor.sh"] {
        assert_eq!(files[s], 0o755, "{s}");
    }
    let meta = fs::metadata(&dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::read(dir.join("vmlinux")).unwrap(), b"\x7fELF vmlinux");
    assert_eq!(fs::read(dir.join("web-nginx.elf")).unwrap(), b"baked");
    assert_eq!(
        fs::read_to_string(dir.join("cmdline")).unwrap(),
        format!("{CMDLINE_TEXT}\n")
    );
    let readme = fs::read_to_string(dir.join("README")).unwrap();
    assert!(readme.contains("288 MiB"), "{readme}");
    assert!(
        readme.contains("80/tcp (host 127.0.0.1:8080 under QEMU)"),
        "{readme}"
    );
    assert!(readme.contains("xl create -c xen-pvh.cfg"), "{readme}");
    // Nothing but the bundle beside it.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

    // Without a baked file there is no PVH configuration.
    let other = tmp.path().join("plain.bundle");
    write_bundle(&other, &parts(None)).unwrap();
    let files = listing(&other);
    assert!(!files.contains_key("xen-pvh.cfg") && !files.contains_key("web-nginx.elf"));
    assert!(!fs::read_to_string(other.join("README"))
        .unwrap()
        .contains("xen-pvh"));
}

#[test]
fn firecracker_json_has_the_documented_keys() {
    let p = parts(None);
    let v: serde_json::Value = serde_json::from_str(&firecracker_json(&p)).unwrap();
    let top: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        top,
        [
            "boot-source",
            "drives",
            "machine-config",
            "network-interfaces"
        ]
    );
    let boot = &v["boot-source"];
    assert_eq!(boot["kernel_image_path"], "vmlinux");
    assert_eq!(boot["initrd_path"], "initrd");
    let args = boot["boot_args"].as_str().unwrap();
    assert!(args.starts_with(CMDLINE_TEXT), "{args}");
    for w in ["reboot=k", "pci=off"] {
        assert!(args.split(' ').any(|a| a == w), "{args}");
    }
    assert_eq!(boot.as_object().unwrap().len(), 3);
    assert_eq!(v["drives"], serde_json::json!([]));
    assert_eq!(
        v["machine-config"],
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 288})
    );
    let nics = v["network-interfaces"].as_array().unwrap();
    assert_eq!(nics.len(), 1);
    let nic = nics[0].as_object().unwrap();
    let mut keys: Vec<&str> = nic.keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["guest_mac", "host_dev_name", "iface_id"]);
    assert_eq!(nic["host_dev_name"], "tap0");
    let mac: Vec<u8> = nic["guest_mac"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    assert_eq!(mac.len(), 6);
    assert_eq!(mac[0] & 0b11, 0b10, "locally administered unicast");
}

/// xl.cfg(5): `KEY = VALUE` lines; VALUE a quoted string, a number or a list. Returns the
/// keys with their values as written.
fn parse_xl(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
        let (k, v) = (k.trim(), v.trim());
        assert!(
            k.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{k:?}"
        );
        let ok = (v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"') && !v[1..v.len() - 1].contains('"'))
                || (v.starts_with('\'')
                    && v.ends_with('\'')
                    && !v[1..v.len() - 1].contains('\''))))
            || v.parse::<u64>().is_ok()
            || (v.starts_with('[') && v.ends_with(']'));
        assert!(ok, "{k} = {v}");
        assert!(
            out.insert(k.to_string(), v.to_string()).is_none(),
            "{k} twice"
        );
    }
    out
}

/// The keys of xl.cfg(5) these files may use.
const XL_KEYS: &[&str] = &[
    "name",
    "type",
    "kernel",
    "ramdisk",
    "cmdline",
    "extra",
    "memory",
    "vcpus",
    "vif",
    "on_poweroff",
    "on_reboot",
    "on_crash",
];

fn unquote(v: &str) -> &str {
    &v[1..v.len() - 1]
}

#[test]
fn xl_configurations_follow_xl_cfg() {
    let p = parts(Some(b"baked"));
    let pvh = parse_xl(&xen_pvh_cfg(&p));
    let pv = parse_xl(&xen_pv_cfg(&p).unwrap());
    for cfg in [&pvh, &pv] {
        for k in cfg.keys() {
            assert!(XL_KEYS.contains(&k.as_str()), "{k}");
        }
        assert_eq!(cfg["name"], "\"web-nginx\"");
        assert_eq!(cfg["memory"], "288");
        assert_eq!(cfg["vcpus"], "1");
        assert_eq!(cfg["vif"], "[ 'bridge=xenbr0' ]");
        for k in ["on_poweroff", "on_reboot", "on_crash"] {
            assert_eq!(cfg[k], "\"destroy\"");
        }
    }
    assert_eq!(pvh["type"], "\"pvh\"");
    assert_eq!(pvh["kernel"], "\"web-nginx.elf\"");
    assert_eq!(pvh["extra"], "\"console=hvc0\"");
    assert!(!pvh.contains_key("ramdisk") && !pvh.contains_key("cmdline"));
    assert_eq!(pv["type"], "\"pv\"");
    assert_eq!(pv["kernel"], "\"vmlinux\"");
    assert_eq!(pv["ramdisk"], "\"initrd\"");
    assert_eq!(
        unquote(&pv["cmdline"]),
        format!("{CMDLINE_TEXT} console=hvc0")
    );

    // Quotes in the command line: single quotes around double ones; both cannot be written.
    let mut q = parts(None);
    q.cmdline = "a=\"b c\"".to_string();
    assert_eq!(
        parse_xl(&xen_pv_cfg(&q).unwrap())["cmdline"],
        "'a=\"b c\" console=hvc0'"
    );
    q.cmdline = "a=\"b' c\"".to_string();
    let tmp = tempfile::tempdir().unwrap();
    let e = write_bundle(&tmp.path().join("q.bundle"), &q).unwrap_err();
    assert!(matches!(e, BundleError::Cmdline { .. }), "{e}");
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing left");
    q.cmdline = "a\nb".to_string();
    assert!(matches!(
        write_bundle(&tmp.path().join("q.bundle"), &q),
        Err(BundleError::Cmdline { .. })
    ));
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn scripts_pass_the_shells_and_shellcheck() {
    let p = parts(None);
    let tmp = tempfile::tempdir().unwrap();
    for (name, script) in [
        ("qemu.sh", qemu_script(&p)),
        ("cloud-hypervisor.sh", cloud_hypervisor_script(&p)),
    ] {
        let path = tmp.path().join(name);
        fs::write(&path, &script).unwrap();
        for shell in ["bash", "dash", "sh"] {
            if !have(shell) && shell != "sh" {
                continue;
            }
            let out = Command::new(shell).arg("-n").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "{shell} -n {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if Command::new("shellcheck")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok()
        {
            let out = Command::new("shellcheck").arg(&path).output().unwrap();
            assert!(
                out.status.success(),
                "shellcheck {name}:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

/// Runs a bundle's script with `tool` replaced by a stand-in that prints its arguments one
/// per line, from another working directory.
fn run_with_stand_in(dir: &Path, script: &str, tool: &str, env: &[(&str, &str)]) -> Vec<String> {
    let bin = tempfile::tempdir().unwrap();
    let fake = bin.path().join(tool);
    fs::write(
        &fake,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\npwd\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(dir.join(script));
    cmd.current_dir("/").env("PATH", path).arg("-extra");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The value after `flag` in `args`.
fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    &args[i + 1]
}

#[test]
fn qemu_script_runs_qemu_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    write_bundle(&dir, &parts(None)).unwrap();
    let dir = fs::canonicalize(&dir).unwrap();

    let args = run_with_stand_in(
        &dir,
        "qemu.sh",
        "qemu-system-x86_64",
        &[("OCI2UK_ACCEL", "tcg")],
    );
    assert_eq!(
        args.last().unwrap(),
        &dir.display().to_string(),
        "runs in the bundle"
    );
    assert_eq!(after(&args, "-machine"), "q35");
    assert_eq!(after(&args, "-accel"), "tcg");
    assert_eq!(after(&args, "-m"), "288");
    assert_eq!(after(&args, "-kernel"), "vmlinux");
    assert_eq!(after(&args, "-initrd"), "initrd");
    assert_eq!(after(&args, "-append"), CMDLINE_TEXT);
    assert_eq!(
        after(&args, "-netdev"),
        "user,id=net0,hostfwd=udp:127.0.0.1:8053-:53,hostfwd=tcp:127.0.0.1:8080-:80"
    );
    assert_eq!(after(&args, "-device"), "virtio-net-pci,netdev=net0");
    for a in ["-nographic", "-no-reboot", "-extra"] {
        assert!(args.iter().any(|x| x == a), "{a} in {args:?}");
    }

    let args = run_with_stand_in(
        &dir,
        "qemu.sh",
        "qemu-system-x86_64",
        &[("OCI2UK_ACCEL", "kvm")],
    );
    assert_eq!(after(&args, "-machine"), "microvm,isa-serial=on");
    assert_eq!(after(&args, "-device"), "virtio-net-device,netdev=net0");
    assert_eq!(after(&args, "-append"), CMDLINE_TEXT);

    let args = run_with_stand_in(
        &dir,
        "qemu.sh",
        "qemu-system-x86_64",
        &[("OCI2UK_ACCEL", "tcg"), ("OCI2UK_MACHINE", "microvm")],
    );
    assert_eq!(
        after(&args, "-append"),
        format!("{CMDLINE_TEXT} tsc_early_khz=2000000")
    );
}

#[test]
fn cloud_hypervisor_script_runs_it_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    write_bundle(&dir, &parts(None)).unwrap();
    let args = run_with_stand_in(&dir, "cloud-hypervisor.sh", "cloud-hypervisor", &[]);
    assert_eq!(after(&args, "--kernel"), "vmlinux");
    assert_eq!(after(&args, "--initramfs"), "initrd");
    assert_eq!(after(&args, "--cmdline"), CMDLINE_TEXT);
    assert_eq!(after(&args, "--cpus"), "boot=1");
    assert_eq!(after(&args, "--memory"), "size=288M");
    assert_eq!(after(&args, "--serial"), "tty");
    assert_eq!(after(&args, "--console"), "off");
    assert_eq!(after(&args, "--net"), "tap=tap0");
    let args = run_with_stand_in(
        &dir,
        "cloud-hypervisor.sh",
        "cloud-hypervisor",
        &[("OCI2UK_TAP", "vm7")],
    );
    assert_eq!(after(&args, "--net"), "tap=vm7");
}

#[test]
fn an_existing_bundle_is_replaced_and_failures_leave_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nginx.bundle");
    write_bundle(&dir, &parts(Some(b"first"))).unwrap();
    fs::write(dir.join("stale"), b"x").unwrap();
    write_bundle(&dir, &parts(None)).unwrap();
    let files = listing(&dir);
    assert!(!files.contains_key("stale") && !files.contains_key("web-nginx.elf"));
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "no leftovers");

    // A file to copy that is missing: the old bundle stays, nothing else is left.
    let missing = tmp.path().join("missing");
    let mut p = parts(None);
    p.initrd = Blob::File(&missing);
    let e = write_bundle(&dir, &p).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("cannot copy {} into the bundle", missing.display())
    );
    assert_eq!(listing(&dir), files);
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

    // A file copied in.
    let initrd = tmp.path().join("x.initrd");
    fs::write(&initrd, b"from a file").unwrap();
    p.initrd = Blob::File(&initrd);
    write_bundle(&dir, &p).unwrap();
    assert_eq!(fs::read(dir.join("initrd")).unwrap(), b"from a file");

    // A file where the bundle goes is not replaced.
    let file = tmp.path().join("file.bundle");
    fs::write(&file, b"mine").unwrap();
    let e = write_bundle(&file, &parts(None)).unwrap_err();
    assert!(matches!(e, BundleError::NotADirectory { .. }), "{e}");
    assert_eq!(fs::read(&file).unwrap(), b"mine");
}

#[test]
fn names_are_safe() {
    assert_eq!(elf_name("nginx"), "nginx.elf");
    assert_eq!(elf_name("web/nginx:1"), "web-nginx-1.elf");
    assert_eq!(elf_name("../.."), "-...elf");
    assert_eq!(elf_name(""), "oci2uk.elf");
}

/// The init of the boot test: loads the virtio modules in order, sets QEMU user networking's
/// static address, serves a page with busybox httpd, and says so on the console.
#[cfg(feature = "vm-tests")]
fn boot_init(modules: &[String], port: u16) -> String {
    format!(
        "#!/bin/busybox sh\n\
         b=/bin/busybox\n\
         $b mount -t proc proc /proc\n\
         $b mount -t sysfs sys /sys\n\
         for m in {mods}; do $b insmod /.oci2uk/modules/$m.ko; done\n\
         n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do $b sleep 0.1; n=$((n+1)); done\n\
         $b ip link set lo up\n\
         $b ip addr add 10.0.2.15/24 dev eth0\n\
         $b ip link set eth0 up\n\
         $b httpd -p {port} -h /www\n\
         echo OCI2UK-BUNDLE-BOOTED cmdline=[$($b cat /proc/cmdline)]\n\
         $b sleep 600\n\
         $b poweroff -f\n",
        mods = modules.join(" ")
    )
}

/// Boots the bundle's `qemu.sh` with the installed kernel under software emulation, on q35
/// and on microvm, and fetches a page through its port forward. Slow, so built only with the
/// `vm-tests` feature.
#[cfg(feature = "vm-tests")]
#[test]
fn qemu_script_boots_and_forwards_ports() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    use crate::flatten::testutil::Fixture;
    use crate::rootfs::{self, Codec, Extra, RootfsOptions};

    let chosen = crate::kernel::discover(None).expect("a kernel: set OCI2UK_KERNEL");
    let kernel = crate::kernel::Kernel::load(&chosen.path).unwrap();
    let modules = kernel.modules(None).unwrap();
    let order = modules
        .closure(&["virtio_pci", "virtio_mmio", "virtio_net"])
        .unwrap();
    let busybox = fs::read("/bin/busybox").expect("a static /bin/busybox");
    // A port of its own, so that concurrent runs do not collide.
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut extras = vec![Extra::file(
        rootfs::INIT_PATH,
        boot_init(
            &order.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
            port,
        )
        .into_bytes(),
        0o755,
    )];
    for m in &order {
        extras.push(Extra::module(&m.name, modules.read(m).unwrap()));
    }
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.dir("proc")
            .dir("sys")
            .custom(b'0', "bin/busybox", "", &busybox, &[], |h| {
                h.set_mode(0o755)
            })
            .file("www/index.html", b"hello from the bundle\n");
    });
    let tree = fx.flatten(&[l]).unwrap();
    let mut initrd = Vec::new();
    let opts = RootfsOptions {
        codec: Codec::for_kernel(kernel.config().unwrap().as_ref()),
        ..RootfsOptions::default()
    };
    let stats = rootfs::write_initramfs(&tree, &extras, &opts, &mut initrd).unwrap();
    let parts = BundleParts {
        name: "boot".to_string(),
        vmlinux: Blob::Bytes(kernel.vmlinux().unwrap()),
        initrd: Blob::Bytes(&initrd),
        elf: None,
        cmdline: CMDLINE_TEXT.to_string(),
        memory_mib: rootfs::memory_needed(&stats, rootfs::RootfsType::Ramfs),
        vcpus: 1,
        ports: vec![Port {
            port,
            proto: Proto::Tcp,
        }],
    };
    let dir = fx.dir.path().join("boot.bundle");
    write_bundle(&dir, &parts).unwrap();

    let mut failures = Vec::new();
    for machine in ["q35", "microvm"] {
        let start = Instant::now();
        let mut child = Command::new(dir.join("qemu.sh"))
            .env("OCI2UK_ACCEL", "tcg")
            .env("OCI2UK_MACHINE", machine)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stdout.read_to_end(&mut out);
            out
        });
        let mut page = None;
        while start.elapsed() < Duration::from_secs(240) && page.is_none() {
            std::thread::sleep(Duration::from_millis(500));
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.contains("hello from the bundle") {
                page = Some(body);
            }
        }
        let took = start.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        let console = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
        eprintln!(
            "{machine}: {} in {:.1}s",
            if page.is_some() { "served" } else { "FAILED" },
            took.as_secs_f64()
        );
        if page.is_none() || !console.contains("OCI2UK-BUNDLE-BOOTED cmdline=[") {
            failures.push(format!(
                "{machine}: no page through the forward; console:\n{console}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
