//! The `bundle` output: kernel, initrd, command line and launch files in, a directory out.
//!
//! ```text
//! NAME.bundle/
//!   vmlinux               the uncompressed kernel ELF (PVH entry and Xen PV support)
//!   initrd                the compressed initramfs
//!   cmdline               the kernel command line, one line
//!   NAME.elf              the baked single file, when there is one
//!   qemu.sh               QEMU: KVM where it runs guests, software emulation otherwise
//!   firecracker.json      Firecracker's --config-file
//!   cloud-hypervisor.sh   Cloud Hypervisor
//!   xen-pvh.cfg           xl.cfg(5), PVH: NAME.elf alone (written with NAME.elf only)
//!   xen-pv.cfg            xl.cfg(5), classic PV: vmlinux + initrd
//!   README                how to launch each
//! ```
//!
//! The launch files name the files by relative paths: the scripts change to their own
//! directory first; Firecracker and `xl` are started from the bundle directory. Each follows
//! its tool's documented format: Firecracker's `VmmConfig` JSON (`boot-source`, `drives`,
//! `machine-config`, `network-interfaces`), Cloud Hypervisor's command line (`--kernel`,
//! `--initramfs`, `--cmdline`, `--memory size=`, `--serial tty --console off`, `--net tap=`),
//! xl.cfg(5)'s `KEY = VALUE` lines (`name`, `type`, `kernel`, `ramdisk`, `cmdline`, `extra`,
//! `memory`, `vcpus`, `vif`, `on_*`).
//!
//! The directory is written beside the destination under a temporary name and renamed into
//! place; an existing bundle is renamed away first and removed after, so a reader sees the
//! old bundle or the new one, and a failure leaves the old one as it was.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The kernel's file in the bundle.
pub const VMLINUX: &str = "vmlinux";
/// The initramfs's file in the bundle.
pub const INITRD: &str = "initrd";
/// The command line's file in the bundle.
pub const CMDLINE: &str = "cmdline";
/// The QEMU script.
pub const QEMU: &str = "qemu.sh";
/// The Firecracker configuration.
pub const FIRECRACKER: &str = "firecracker.json";
/// The Cloud Hypervisor script.
pub const CLOUD_HYPERVISOR: &str = "cloud-hypervisor.sh";
/// The Xen PVH configuration (with the baked file only).
pub const XEN_PVH: &str = "xen-pvh.cfg";
/// The Xen PV configuration.
pub const XEN_PV: &str = "xen-pv.cfg";
/// The README.
pub const README: &str = "README";

/// The tap device the Firecracker and Cloud Hypervisor launch files attach.
pub const TAP: &str = "tap0";
/// The Xen bridge the xl configurations attach.
pub const XEN_BRIDGE: &str = "xenbr0";
/// The guest's MAC address on Firecracker: locally administered, unicast.
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// What Firecracker needs on the command line beyond the baked one: reboot through the
/// keyboard controller (which stops the VM; the baked `panic=-1` reboots on a panic), no PCI
/// probe, and no i8042 probes that only cost time (as Firecracker's own default has them).
pub const FIRECRACKER_ARGS: &str = "reboot=k pci=off i8042.noaux i8042.nomux i8042.nopnp \
                                    i8042.dumbkbd";
/// What the Xen launch files add to the command line: Xen's console.
pub const XEN_ARGS: &str = "console=hvc0";

/// Bytes in memory, or a file to copy.
#[derive(Debug, Clone, Copy)]
pub enum Blob<'a> {
    /// The bytes.
    Bytes(&'a [u8]),
    /// A file holding them.
    File(&'a Path),
}

/// A transport protocol of an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// `tcp` or `udp`.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// A port the image exposes (an `ExposedPorts` key: `80/tcp`, `53/udp`, `8080`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    /// The guest's port.
    pub port: u16,
    /// Its protocol.
    pub proto: Proto,
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto.name())
    }
}

/// A port that is not `PORT[/tcp|/udp]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a port (expected PORT, PORT/tcp or PORT/udp)")]
pub struct BadPort(pub String);

impl FromStr for Port {
    type Err = BadPort;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadPort(s.to_string());
        let (port, proto) = match s.split_once('/') {
            Some((p, "tcp")) => (p, Proto::Tcp),
            Some((p, "udp")) => (p, Proto::Udp),
            Some(_) => return Err(bad()),
            None => (s, Proto::Tcp),
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match port.parse::<u16>() {
            Ok(port) if port != 0 => Ok(Port { port, proto }),
            _ => Err(bad()),
        }
    }
}

/// A forward from a host port to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// The host's port (on 127.0.0.1).
    pub host: u16,
    /// The guest's.
    pub guest: Port,
}

/// The host ports QEMU forwards: the guest's port, or `8000 + port` for ports below 1024
/// (which only root may bind: 80 -> 8080, 443 -> 8443); the next free one when two would
/// collide. Sorted and deduplicated by guest port.
pub fn forwards(ports: &[Port]) -> Vec<Forward> {
    let mut ports = ports.to_vec();
    ports.sort();
    ports.dedup();
    let mut out: Vec<Forward> = Vec::new();
    for guest in ports {
        let mut host = if guest.port < 1024 {
            8000 + guest.port
        } else {
            guest.port
        };
        while out
            .iter()
            .any(|f| f.host == host && f.guest.proto == guest.proto)
        {
            host = if host == u16::MAX { 1024 } else { host + 1 };
        }
        out.push(Forward { host, guest });
    }
    out
}

/// What goes into a bundle.
#[derive(Debug, Clone)]
pub struct BundleParts<'a> {
    /// The image's name (`nginx`): names the baked file and the Xen domain. Characters other
    /// than ASCII letters, digits, `.`, `_` and `-` are written as `-`.
    pub name: String,
    /// The uncompressed kernel ELF (with a PVH note and Xen PV support for every launch file
    /// to work).
    pub vmlinux: Blob<'a>,
    /// The compressed initramfs.
    pub initrd: Blob<'a>,
    /// The baked single file, if any.
    pub elf: Option<Blob<'a>>,
    /// The kernel command line (the baked one:
    /// `console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet`).
    pub cmdline: String,
    /// The guest's memory, MiB.
    pub memory_mib: u64,
    /// The guest's vCPUs.
    pub vcpus: u32,
    /// The ports the image exposes, forwarded by the QEMU script.
    pub ports: Vec<Port>,
}

/// Errors of writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Writing failed.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file to copy into the bundle could not be read.
    #[error("cannot copy {path} into the bundle")]
    Copy {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something other than a directory is where the bundle goes.
    #[error("{path} exists and is not a directory; remove it or name another output")]
    NotADirectory {
        /// The destination.
        path: PathBuf,
    },
    /// The command line cannot be written into the launch files.
    #[error("the kernel command line cannot go into the launch files: {why}")]
    Cmdline {
        /// What is wrong.
        why: &'static str,
    },
}

/// The name as file and domain names take it.
fn safe_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    match s.trim_start_matches('.') {
        "" => "oci2uk".to_string(),
        t => t.to_string(),
    }
}

/// The baked file's name in the bundle: `NAME.elf`.
pub fn elf_name(name: &str) -> String {
    format!("{}.elf", safe_name(name))
}

/// An xl.cfg string: double quotes, or single quotes around a value holding double ones (xl
/// has no escapes).
fn xl_string(s: &str) -> Result<String, BundleError> {
    if !s.contains('"') {
        Ok(format!("\"{s}\""))
    } else if !s.contains('\'') {
        Ok(format!("'{s}'"))
    } else {
        Err(BundleError::Cmdline {
            why: "it holds both kinds of quote, which an xl.cfg string cannot",
        })
    }
}

/// The QEMU script.
pub fn qemu_script(parts: &BundleParts<'_>) -> String {
    let fwd = forwards(&parts.ports);
    let mut netdev = "user,id=net0".to_string();
    let mut described = String::new();
    for f in &fwd {
        netdev.push_str(&format!(
            ",hostfwd={}:127.0.0.1:{}-:{}",
            f.guest.proto.name(),
            f.host,
            f.guest.port
        ));
        described.push_str(&format!(
            "#   {} 127.0.0.1:{} -> guest port {}\n",
            f.guest.proto.name(),
            f.host,
            f.guest.port
        ));
    }
    if described.is_empty() {
        described.push_str("#   (none: the image exposes no port)\n");
    }
    format!(
        r#"#!/bin/sh
# Boots {name} on QEMU: {VMLINUX} with {INITRD} and the command line in {CMDLINE},
# {mem} MiB, the serial console on this terminal (Ctrl-A X quits). Host ports forwarded:
{described}# KVM when this machine can run guests with it, software emulation otherwise; the
# microvm machine with KVM, q35 otherwise. OCI2UK_ACCEL=kvm|tcg and OCI2UK_MACHINE=microvm|q35
# choose. Further arguments go to QEMU.
set -eu
cd "$(dirname "$0")"
accel=${{OCI2UK_ACCEL:-}}
if [ -z "$accel" ]; then
    # /dev/kvm opens on machines that do not expose virtualisation to this one (nested
    # virtualisation off), and guests then never start: require vmx or svm as well.
    if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo; then accel=kvm; else accel=tcg; fi
fi
machine=${{OCI2UK_MACHINE:-}}
if [ -z "$machine" ]; then
    if [ "$accel" = kvm ]; then machine=microvm; else machine=q35; fi
fi
append=$(cat {CMDLINE})
case "$machine" in
microvm)
    machine=microvm,isa-serial=on
    net=virtio-net-device
    # Emulated, microvm gives Linux no way to measure the TSC's frequency: say it.
    if [ "$accel" = tcg ]; then append="$append tsc_early_khz=2000000"; fi
    ;;
*)
    net=virtio-net-pci
    ;;
esac
exec qemu-system-x86_64 \
    -machine "$machine" -accel "$accel" -cpu max -smp {vcpus} -m {mem} \
    -kernel {VMLINUX} -initrd {INITRD} -append "$append" \
    -netdev {netdev} \
    -device "$net,netdev=net0" \
    -nographic -no-reboot "$@"
"#,
        name = safe_name(&parts.name),
        mem = parts.memory_mib,
        vcpus = parts.vcpus,
    )
}

/// Firecracker's command line: the baked one and [`FIRECRACKER_ARGS`].
pub fn firecracker_args(cmdline: &str) -> String {
    format!("{cmdline} {FIRECRACKER_ARGS}")
}

/// The Firecracker configuration (`firecracker --no-api --config-file firecracker.json`).
pub fn firecracker_json(parts: &BundleParts<'_>) -> String {
    let v = serde_json::json!({
        "boot-source": {
            "kernel_image_path": VMLINUX,
            "initrd_path": INITRD,
            "boot_args": firecracker_args(&parts.cmdline),
        },
        // Firecracker's configuration has no default for this list.
        "drives": [],
        "machine-config": {
            "vcpu_count": parts.vcpus,
            "mem_size_mib": parts.memory_mib,
        },
        "network-interfaces": [{
            "iface_id": "eth0",
            "guest_mac": GUEST_MAC,
            "host_dev_name": TAP,
        }],
    });
    let mut s = serde_json::to_string_pretty(&v).expect("JSON values serialise");
    s.push('\n');
    s
}

/// The Cloud Hypervisor script.
pub fn cloud_hypervisor_script(parts: &BundleParts<'_>) -> String {
    format!(
        r#"#!/bin/sh
# Boots {name} on Cloud Hypervisor: {VMLINUX} (PVH) with {INITRD} and the command line in
# {CMDLINE}, {mem} MiB, the serial console on this terminal. The guest's network is the tap
# device $OCI2UK_TAP (default {TAP}); Cloud Hypervisor creates it when it has CAP_NET_ADMIN.
# The guest asks for an address by DHCP. Further arguments go to Cloud Hypervisor.
set -eu
cd "$(dirname "$0")"
exec cloud-hypervisor \
    --kernel {VMLINUX} --initramfs {INITRD} --cmdline "$(cat {CMDLINE})" \
    --cpus boot={vcpus} --memory size={mem}M \
    --serial tty --console off \
    --net "tap=${{OCI2UK_TAP:-{TAP}}}" "$@"
"#,
        name = safe_name(&parts.name),
        mem = parts.memory_mib,
        vcpus = parts.vcpus,
    )
}

fn xl_common(parts: &BundleParts<'_>) -> String {
    format!(
        "memory = {mem}\nvcpus = {vcpus}\nvif = [ 'bridge={XEN_BRIDGE}' ]\n\
         # The application's end powers the guest off; a panic reboots it (panic=-1): either way\n\
         # the domain goes.\n\
         on_poweroff = \"destroy\"\non_reboot = \"destroy\"\non_crash = \"destroy\"\n",
        mem = parts.memory_mib,
        vcpus = parts.vcpus,
    )
}

/// The Xen PVH configuration: the baked file alone, Xen's console added.
pub fn xen_pvh_cfg(parts: &BundleParts<'_>) -> String {
    let name = safe_name(&parts.name);
    format!(
        "# {name} as a Xen PVH guest: the baked file holds the kernel, the initramfs and the\n\
         # command line; `extra` is appended to the baked command line.\n\
         # Start it from this directory: xl create -c {XEN_PVH}\n\
         name = \"{name}\"\ntype = \"pvh\"\nkernel = \"{elf}\"\nextra = \"{XEN_ARGS}\"\n{common}",
        elf = elf_name(&parts.name),
        common = xl_common(parts),
    )
}

/// The Xen PV configuration: kernel and ramdisk, the whole command line with Xen's console.
pub fn xen_pv_cfg(parts: &BundleParts<'_>) -> Result<String, BundleError> {
    let name = safe_name(&parts.name);
    Ok(format!(
        "# {name} as a classic Xen PV guest: {VMLINUX} (built with Xen PV support) and {INITRD}.\n\
         # Start it from this directory: xl create -c {XEN_PV}\n\
         name = \"{name}\"\ntype = \"pv\"\nkernel = \"{VMLINUX}\"\nramdisk = \"{INITRD}\"\n\
         cmdline = {cmdline}\n{common}",
        cmdline = xl_string(&format!("{} {XEN_ARGS}", parts.cmdline))?,
        common = xl_common(parts),
    ))
}

/// The README.
pub fn readme(parts: &BundleParts<'_>) -> String {
    let name = safe_name(&parts.name);
    let mem = parts.memory_mib;
    let ports = if parts.ports.is_empty() {
        "The image exposes no port.".to_string()
    } else {
        let list: Vec<String> = forwards(&parts.ports)
            .iter()
            .map(|f| format!("{} (host 127.0.0.1:{} under QEMU)", f.guest, f.host))
            .collect();
        format!("The image exposes {}.", list.join(", "))
    };
    let elf = match parts.elf {
        Some(_) => format!(
            "  {elf:<20} the same, baked into one bootable PVH file (no initrd, no command line\n\
             {pad}needed; what is appended to the command line comes after the baked one)\n",
            elf = elf_name(&parts.name),
            pad = " ".repeat(23),
        ),
        None => String::new(),
    };
    let pvh = match parts.elf {
        Some(_) => format!(
            "Xen, PVH, the single file (from this directory):\n    xl create -c {XEN_PVH}\n\n"
        ),
        None => String::new(),
    };
    format!(
        "{name}: a unikernel made by oci2uk from a container image.\n\
         \n\
         The guest needs {mem} MiB of memory; every launch file below gives it that much.\n\
         {ports}\n\
         \n\
         Files:\n\
         \x20 {VMLINUX:<20} the kernel (an uncompressed ELF)\n\
         \x20 {INITRD:<20} the initramfs: the image, oci2uk's init and its configuration\n\
         \x20 {CMDLINE:<20} the kernel command line\n\
         {elf}\
         \n\
         QEMU (KVM where it runs guests, else emulation; console on the terminal, Ctrl-A X quits):\n\
         \x20   ./{QEMU}\n\
         \n\
         Firecracker (from this directory; a tap device {TAP} must exist; Firecracker 1.8 or\n\
         later, whose ACPI tables let the guest find its devices):\n\
         \x20   firecracker --no-api --config-file {FIRECRACKER}\n\
         \n\
         Cloud Hypervisor (tap device {TAP}, or OCI2UK_TAP=NAME):\n\
         \x20   ./{CLOUD_HYPERVISOR}\n\
         \n\
         {pvh}\
         Xen, classic PV (from this directory):\n\
         \x20   xl create -c {XEN_PV}\n\
         \n\
         On Firecracker, Cloud Hypervisor and Xen the guest asks for its address by DHCP on its\n\
         first interface; the launch files attach it to {TAP} or the bridge {XEN_BRIDGE}.\n\
         The launch files name the files relative to this directory.\n"
    )
}

/// Writes the bundle directory `dir`, replacing an existing one.
pub fn write_bundle(dir: &Path, parts: &BundleParts<'_>) -> Result<(), BundleError> {
    if parts.cmdline.contains(['\n', '\r', '\0']) {
        return Err(BundleError::Cmdline {
            why: "it holds a line break or a NUL",
        });
    }
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Write { path, source }
    };
    let exists = match fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => true,
        Ok(_) => {
            return Err(BundleError::NotADirectory {
                path: dir.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(werr(dir)(e)),
    };
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".to_string());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{base}."))
        .suffix(".new")
        .tempdir_in(parent)
        .map_err(werr(parent))?;
    fill(tmp.path(), parts)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).map_err(werr(tmp.path()))?;

    if !exists {
        let new = tmp.keep();
        return fs::rename(&new, dir).map_err(|e| {
            let _ = fs::remove_dir_all(&new);
            werr(dir)(e)
        });
    }
    // Renaming a directory over an empty one replaces it: make an empty place for the old
    // bundle, move it there, move the new one in, then remove the old.
    let old = tempfile::Builder::new()
        .prefix(&format!(".{base}."))
        .suffix(".old")
        .tempdir_in(parent)
        .map_err(werr(parent))?
        .keep();
    if let Err(e) = fs::rename(dir, &old) {
        let _ = fs::remove_dir(&old);
        return Err(werr(dir)(e));
    }
    let new = tmp.keep();
    if let Err(e) = fs::rename(&new, dir) {
        let _ = fs::rename(&old, dir);
        let _ = fs::remove_dir_all(&new);
        return Err(werr(dir)(e));
    }
    fs::remove_dir_all(&old).map_err(werr(&old))
}

/// Writes the bundle's files into the (new, empty) directory `dir`.
fn fill(dir: &Path, parts: &BundleParts<'_>) -> Result<(), BundleError> {
    let blob = |name: &str, b: Blob<'_>| {
        let dest = dir.join(name);
        match b {
            Blob::Bytes(bytes) => fs::write(&dest, bytes).map_err(|source| BundleError::Write {
                path: dest.clone(),
                source,
            }),
            Blob::File(src) => fs::copy(src, &dest)
                .map(drop)
                .map_err(|source| BundleError::Copy {
                    path: src.to_path_buf(),
                    source,
                }),
        }
    };
    let text = |name: &str, s: &str, mode: u32| {
        let dest = dir.join(name);
        fs::write(&dest, s)
            .and_then(|()| fs::set_permissions(&dest, fs::Permissions::from_mode(mode)))
            .map_err(|source| BundleError::Write { path: dest, source })
    };
    blob(VMLINUX, parts.vmlinux)?;
    blob(INITRD, parts.initrd)?;
    if let Some(elf) = parts.elf {
        blob(&elf_name(&parts.name), elf)?;
        text(XEN_PVH, &xen_pvh_cfg(parts), 0o644)?;
    }
    text(CMDLINE, &format!("{}\n", parts.cmdline), 0o644)?;
    text(QEMU, &qemu_script(parts), 0o755)?;
    text(FIRECRACKER, &firecracker_json(parts), 0o644)?;
    text(CLOUD_HYPERVISOR, &cloud_hypervisor_script(parts), 0o755)?;
    text(XEN_PV, &xen_pv_cfg(parts)?, 0o644)?;
    text(README, &readme(parts), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests;
