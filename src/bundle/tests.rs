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
        ("xen.sh", 0o755),
    ]
    .into_iter()
    .map(|(n, m)| (n.to_string(), m))
    .collect();
    // Modes as the umask gives them; the scripts are executable whatever it is.
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for s in ["qemu.sh", "cloud-hypervisor.sh", "xen.sh"] {
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
    let abs = fs::canonicalize(&dir).unwrap();
    for f in ["xen-pv.cfg", "xen-pvh.cfg"] {
        let line = format!("xl create -c {}", abs.join(f).display());
        assert!(readme.contains(&line), "{line} in:\n{readme}");
    }
    assert!(readme.contains("./xen.sh --pvh -e KEY=VALUE"), "{readme}");
    // Nothing but the bundle beside it.
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);

    // Without a baked file there is nothing for Xen to boot.
    let other = tmp.path().join("plain.bundle");
    write_bundle(&other, &parts(None)).unwrap();
    let files = listing(&other);
    for f in ["xen-pv.cfg", "xen-pvh.cfg", "xen.sh", "web-nginx.elf"] {
        assert!(!files.contains_key(f), "{f}");
    }
    let readme = fs::read_to_string(other.join("README")).unwrap();
    assert!(
        !readme.contains("xen.sh") && !readme.contains("xen-pv"),
        "{readme}"
    );
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
    let dir = Path::new("/srv/b x/web.bundle");
    let pv_text = xen_cfg(&p, XenMode::Pv, Some(dir));
    let pvh_text = xen_cfg(&p, XenMode::Pvh, Some(dir));
    let pv = parse_xl(&pv_text);
    let pvh = parse_xl(&pvh_text);
    for cfg in [&pvh, &pv] {
        for k in cfg.keys() {
            assert!(XL_KEYS.contains(&k.as_str()), "{k}");
        }
        assert_eq!(cfg["name"], "\"web-nginx\"");
        // The baked file alone, by the bundle's absolute path: xl finds it from anywhere.
        assert_eq!(cfg["kernel"], "\"/srv/b x/web.bundle/web-nginx.elf\"");
        assert_eq!(cfg["extra"], "\"console=hvc0\"");
        assert!(!cfg.contains_key("ramdisk") && !cfg.contains_key("cmdline"));
        assert_eq!(cfg["memory"], "288");
        assert_eq!(cfg["vcpus"], "1");
        assert_eq!(cfg["vif"], "[ 'bridge=xenbr0' ]");
        for k in ["on_poweroff", "on_reboot", "on_crash"] {
            assert_eq!(cfg[k], "\"destroy\"");
        }
    }
    assert_eq!(pv["type"], "\"pv\"");
    assert_eq!(pvh["type"], "\"pvh\"");
    // The comments say how to name another bridge or go without a network, and what to do
    // with a moved bundle.
    for (text, file) in [(&pv_text, "xen-pv.cfg"), (&pvh_text, "xen-pvh.cfg")] {
        for line in [
            format!("#   xl create -c /srv/b x/web.bundle/{file}\n"),
            format!("#   xl create -c /srv/b x/web.bundle/{file} 'vif=[\"bridge=br0\"]'\n"),
            format!("#   xl create -c /srv/b x/web.bundle/{file} 'vif=[]'\n"),
        ] {
            assert!(text.contains(&line), "{line:?} in:\n{text}");
        }
        assert!(text.contains("/srv/b x/web.bundle/xen.sh"), "{text}");
        assert!(text.contains("works from any directory"), "{text}");
    }

    // A path that an xl string cannot hold, or none: relative names, said to work from the
    // bundle's directory only.
    for dir in [
        Some(Path::new("/a\"b'c/web.bundle")),
        Some(Path::new("/a\\b")),
        None,
    ] {
        let text = xen_cfg(&p, XenMode::Pv, dir);
        assert_eq!(parse_xl(&text)["kernel"], "\"web-nginx.elf\"", "{dir:?}");
        assert!(text.contains("from this directory only"), "{text}");
        assert!(text.contains("./xen.sh"), "{text}");
    }

    // The bundle written names its own final path.
    let tmp = tempfile::tempdir().unwrap();
    let written = tmp.path().join("w.bundle");
    write_bundle(&written, &p).unwrap();
    let abs = fs::canonicalize(&written).unwrap();
    for f in ["xen-pv.cfg", "xen-pvh.cfg"] {
        let cfg = parse_xl(&fs::read_to_string(written.join(f)).unwrap());
        assert_eq!(
            unquote(&cfg["kernel"]),
            abs.join("web-nginx.elf").to_str().unwrap()
        );
    }

    // A line break in the command line cannot go into the command line's file.
    let mut q = parts(None);
    q.cmdline = "a\nb".to_string();
    assert!(matches!(
        write_bundle(&tmp.path().join("q.bundle"), &q),
        Err(BundleError::Cmdline { .. })
    ));
    assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1, "nothing left");
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
        ("xen.sh", xen_launcher(&p)),
    ] {
        let path = tmp.path().join(name);
        fs::write(&path, &script).unwrap();
        for shell in ["bash", "dash", "sh", "busybox"] {
            if !have(shell) && shell != "sh" {
                continue;
            }
            let mut cmd = Command::new(shell);
            if shell == "busybox" {
                cmd.arg("sh");
            }
            let out = cmd.arg("-n").arg(&path).output().unwrap();
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

/// One run of a bundle's `xen.sh` against stand-ins for dom0's `xl` and `xenstore-write`.
struct XenRun {
    /// The calls, in order: the tool's name, then its arguments.
    calls: Vec<Vec<String>>,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl XenRun {
    fn call(&self, tool: &str, first: &str) -> Option<&[String]> {
        self.calls
            .iter()
            .find(|c| c[0] == tool && c.get(1).map(String::as_str) == Some(first))
            .map(|c| &c[1..])
    }
}

/// Runs `dir/xen.sh ARGS` from `/` with `shell` (`busybox` runs it with busybox's sh and
/// awk, as a minimal dom0 would), `xl` and `xenstore-write` replaced by stand-ins that log
/// their arguments; `xl domid` answers 7, and the call starting with `fail` (`"xl unpause"`)
/// fails.
fn run_xen(dir: &Path, shell: &str, args: &[&str], env: &[(&str, &str)], fail: &str) -> XenRun {
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    let fake = "#!/bin/sh\n\
                { printf '%s\\n' \"${0##*/}\" \"$@\"; echo ---; } >>\"$XEN_LOG\"\n\
                case \"${0##*/} ${1:-}\" in \"$XEN_FAIL\"*) [ -n \"$XEN_FAIL\" ] && exit 1 ;; esac\n\
                if [ \"${0##*/} ${1:-}\" = 'xl domid' ]; then echo 7; fi\n";
    for tool in ["xl", "xenstore-write"] {
        let f = bin.path().join(tool);
        fs::write(&f, fake).unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new(shell);
    if shell == "busybox" {
        std::os::unix::fs::symlink("/usr/bin/busybox", bin.path().join("awk"))
            .or_else(|_| std::os::unix::fs::symlink("/bin/busybox", bin.path().join("awk")))
            .unwrap();
        cmd.arg("sh");
    }
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.arg(dir.join("xen.sh"))
        .args(args)
        .current_dir("/")
        .env("PATH", path)
        .env("XEN_LOG", &log)
        .env("XEN_FAIL", fail);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let calls = fs::read_to_string(&log)
        .unwrap_or_default()
        .split("---\n")
        .filter(|c| !c.is_empty())
        .map(|c| c.lines().map(str::to_string).collect())
        .collect();
    XenRun {
        calls,
        status: out.status,
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[test]
fn xen_launcher_starts_the_domain_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("b");
    write_bundle(&first, &parts(Some(b"baked"))).unwrap();
    // Moved after it was written: the launcher names the baked file where it is now.
    let dir = fs::canonicalize(tmp.path()).unwrap().join("moved 'here'");
    fs::rename(&first, &dir).unwrap();
    let d = dir.display();
    let shells: Vec<&str> = ["sh", "dash", "bash", "busybox"]
        .into_iter()
        .filter(|s| *s == "sh" || have(s))
        .collect();
    // Every kind of byte a value may hold, escaped as JSON wants it.
    let odd = "q\"uote \\back\nline\ttab\u{1}ctl é $(touch /tmp/x) `x` 'single'";
    for shell in shells {
        let r = run_xen(
            &dir,
            shell,
            &[
                "-e",
                "A=1",
                "-e",
                &format!("ODD={odd}"),
                "-e",
                "FROM_ENV",
                "-e",
                "UNSET_HERE",
                "-e",
                "EQ=a=b",
                "-e",
                "EMPTY=",
                "-e",
                "A=2",
                "vcpus=2",
            ],
            &[("FROM_ENV", "it's \"mine\"")],
            "",
        );
        assert!(r.status.success(), "{shell}: {}", r.stderr);
        let names: Vec<String> = r.calls.iter().map(|c| c[..2].join(" ")).collect();
        assert_eq!(
            names,
            ["xl create", "xl domid", "xenstore-write -R", "xl unpause"],
            "{shell}"
        );
        assert_eq!(
            r.call("xl", "create").unwrap(),
            [
                "create".to_string(),
                "-p".into(),
                format!("{d}/xen-pv.cfg"),
                format!("kernel=\"{d}/web-nginx.elf\""),
                "name=\"web-nginx\"".into(),
                "vcpus=2".into(),
            ],
            "{shell}: PV by default, the user's settings last"
        );
        assert_eq!(r.call("xl", "domid").unwrap(), ["domid", "web-nginx"]);
        let write = r.call("xenstore-write", "-R").unwrap();
        assert_eq!(write[1], "/local/domain/7/oci2uk/config");
        let json = &write[2];
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{shell}: {json}: {e}"));
        assert_eq!(
            v,
            serde_json::json!({"env": {
                "A": "2",
                "ODD": odd,
                "FROM_ENV": "it's \"mine\"",
                "EQ": "a=b",
                "EMPTY": "",
            }}),
            "{shell}: {json}"
        );
        assert_eq!(r.call("xl", "unpause").unwrap(), ["unpause", "7"]);
        assert_eq!(r.stdout, "7\n", "{shell}: prints the domain's id");

        // PVH, another bridge, memory, name; no -e, so no Xenstore key.
        let r = run_xen(
            &dir,
            shell,
            &["--pvh", "-b", "br0", "-m", "512", "-n", "web-2"],
            &[],
            "",
        );
        assert!(r.status.success(), "{shell}: {}", r.stderr);
        assert_eq!(
            r.call("xl", "create").unwrap()[2..],
            [
                format!("{d}/xen-pvh.cfg"),
                format!("kernel=\"{d}/web-nginx.elf\""),
                "name=\"web-2\"".into(),
                "memory=512".into(),
                "vif=['bridge=br0']".into(),
            ]
        );
        assert!(r.calls.iter().all(|c| c[0] != "xenstore-write"));
        assert_eq!(r.call("xl", "domid").unwrap(), ["domid", "web-2"]);

        // No network; the console attached after the unpause.
        let r = run_xen(&dir, shell, &["--no-network", "-c"], &[], "");
        assert!(r.status.success(), "{shell}: {}", r.stderr);
        assert!(r.call("xl", "create").unwrap().contains(&"vif=[]".into()));
        assert_eq!(r.calls.last().unwrap(), &["xl", "console", "7"]);
        assert_eq!(r.stdout, "");

        // A failure once the domain exists destroys it; before, nothing is destroyed.
        for fail in ["xl domid", "xenstore-write", "xl unpause"] {
            let r = run_xen(&dir, shell, &["-e", "A=1"], &[], fail);
            assert!(!r.status.success(), "{shell}: {fail}");
            assert_eq!(
                r.calls.last().unwrap(),
                &["xl", "destroy", "web-nginx"],
                "{shell}: {fail}"
            );
            assert!(r.call("xl", "unpause").is_none() || fail == "xl unpause");
        }
        let r = run_xen(&dir, shell, &[], &[], "xl create");
        assert!(!r.status.success());
        assert_eq!(r.calls.len(), 1, "{shell}: {:?}", r.calls);

        // Bad flags: a clear message, status 2, and xl never runs.
        for bad in [
            &["-e", "=x"][..],
            &["-e"],
            &["-b", "a b"],
            &["-m", "1G"],
            &["-n", "a/b"],
            &["--bogus"],
        ] {
            let r = run_xen(&dir, shell, bad, &[], "");
            assert_eq!(r.status.code(), Some(2), "{shell} {bad:?}: {}", r.stderr);
            assert!(
                r.stderr.contains("xen.sh: "),
                "{shell} {bad:?}: {}",
                r.stderr
            );
            assert!(r.calls.is_empty(), "{shell} {bad:?}");
        }
        let r = run_xen(&dir, shell, &["--help"], &[], "");
        assert!(r.status.success() && r.stdout.starts_with("usage: xen.sh"));
    }
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
