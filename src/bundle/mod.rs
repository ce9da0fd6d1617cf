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
//!   xen-pv.cfg            xl.cfg(5), classic PV: NAME.elf alone   } written with
//!   xen-pvh.cfg           xl.cfg(5), PVH: NAME.elf alone          } NAME.elf only
//!   xen.sh                Xen launcher: either, with -e K=V through Xenstore }
//!   README                how to launch each
//! ```
//!
//! The scripts change to their own directory first and name the files relative to it;
//! Firecracker is started from the bundle directory. `xl` resolves a relative path against its
//! own working directory, so the xl configurations name the baked file by the bundle's final
//! absolute path (relative only when that path cannot be written in an xl.cfg string), and
//! `xen.sh` passes the path of its own directory to `xl`, so a moved bundle starts through it.
//! There is no PV configuration from `vmlinux` + `initrd`: the baked file boots as PV itself,
//! and `extra` appends to its command line. The launch files are rendered by [`crate::launch`],
//! the QEMU script from the model `run` starts QEMU with.
//!
//! The directory is written beside the destination under a temporary name and renamed into
//! place; an existing bundle is renamed away first and removed after, so a reader sees the
//! old bundle or the new one, and a failure leaves the old one as it was.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::launch::{self, qemu};

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
/// The Xen PV configuration (with the baked file only).
pub const XEN_PV: &str = "xen-pv.cfg";
/// The Xen launcher (with the baked file only).
pub const XEN_LAUNCHER: &str = "xen.sh";
/// The README.
pub const README: &str = "README";

pub use crate::launch::firecracker::{FIRECRACKER_ARGS, GUEST_MAC};
pub use crate::launch::ports::{forwards, BadPort, Port, Proto};
pub use crate::launch::xen::{Mode as XenMode, XENSTORE_KEY, XEN_ARGS, XEN_BRIDGE};
pub use crate::launch::TAP;

/// Bytes in memory, or a file to copy.
#[derive(Debug, Clone, Copy)]
pub enum Blob<'a> {
    /// The bytes.
    Bytes(&'a [u8]),
    /// A file holding them.
    File(&'a Path),
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

/// The guest as the launch files name its parts.
fn guest<'a>(parts: &'a BundleParts<'_>, name: &'a str) -> launch::Guest<'a> {
    launch::Guest {
        name,
        kernel: VMLINUX,
        initrd: INITRD,
        cmdline: &parts.cmdline,
        cmdline_file: CMDLINE,
        memory_mib: parts.memory_mib,
        vcpus: parts.vcpus,
    }
}

/// The QEMU script: the exposed ports forwarded from 127.0.0.1, the TSC hinted on microvm
/// under emulation (the script cannot know the host's), the console on the terminal.
pub fn qemu_script(parts: &BundleParts<'_>) -> String {
    let q = qemu::Qemu {
        kernel: VMLINUX.into(),
        initrd: Some(INITRD.into()),
        append: None,
        memory_mib: parts.memory_mib,
        vcpus: parts.vcpus,
        forwards: forwards(&parts.ports),
        console: qemu::Console::Terminal,
        rtc: false,
        tsc_khz: Some(qemu::TSC_HINT_KHZ),
        monitor: None,
    };
    q.script(&safe_name(&parts.name), CMDLINE)
}

/// Firecracker's command line: the baked one and [`FIRECRACKER_ARGS`].
pub fn firecracker_args(cmdline: &str) -> String {
    launch::firecracker::boot_args(cmdline)
}

/// The Firecracker configuration (`firecracker --no-api --config-file firecracker.json`).
pub fn firecracker_json(parts: &BundleParts<'_>) -> String {
    launch::firecracker::config_json(&guest(parts, &safe_name(&parts.name)))
}

/// The Cloud Hypervisor script.
pub fn cloud_hypervisor_script(parts: &BundleParts<'_>) -> String {
    launch::cloud_hypervisor::script(&guest(parts, &safe_name(&parts.name)))
}

/// The configuration's file name for `mode`.
pub fn xen_cfg_name(mode: XenMode) -> &'static str {
    match mode {
        XenMode::Pv => XEN_PV,
        XenMode::Pvh => XEN_PVH,
    }
}

/// A Xen configuration for `mode`: the baked file alone, Xen's console added. `dir` is the
/// bundle's final absolute path, which the file names the baked file by; without one, or
/// when an xl.cfg string cannot hold it, the file names it relative to the bundle, and works
/// when `xl` is started there.
pub fn xen_cfg(parts: &BundleParts<'_>, mode: XenMode, dir: Option<&Path>) -> String {
    let name = safe_name(&parts.name);
    let elf = elf_name(&parts.name);
    let within = |file: &str| -> Option<String> {
        let p = dir?.join(file);
        let p = p.to_str()?;
        launch::xen::xl_string(p).ok().map(|_| p.to_string())
    };
    let absolute = (
        within(&elf),
        within(xen_cfg_name(mode)),
        within(XEN_LAUNCHER),
    );
    let (kernel, path, launcher) = match absolute {
        (Some(k), Some(c), Some(l)) => (k, c, l),
        _ => (
            elf.clone(),
            xen_cfg_name(mode).to_string(),
            format!("./{XEN_LAUNCHER}"),
        ),
    };
    let dom = launch::xen::Domain {
        name: &name,
        kernel: &kernel,
        memory_mib: parts.memory_mib,
        vcpus: parts.vcpus,
    };
    launch::xen::cfg(&dom, mode, &path, &launcher).expect("the paths were checked")
}

/// The Xen launcher: `xl create -p` from either configuration with the baked file in the
/// script's own directory, `-e K=V` into Xenstore, `xl unpause`.
pub fn xen_launcher(parts: &BundleParts<'_>) -> String {
    launch::xen::launcher(
        &safe_name(&parts.name),
        &elf_name(&parts.name),
        XenMode::ALL.map(xen_cfg_name),
        XEN_LAUNCHER,
    )
}

/// The README. `dir` is the bundle's final absolute path, as the Xen configurations name it.
pub fn readme(parts: &BundleParts<'_>, dir: Option<&Path>) -> String {
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
            "  {elf:<20} the same, baked into one bootable file (no initrd, no command line\n\
             {pad}needed; what is appended to the command line comes after the baked one)\n",
            elf = elf_name(&parts.name),
            pad = " ".repeat(23),
        ),
        None => String::new(),
    };
    let xen = match parts.elf {
        Some(_) => {
            let cfg = |mode| {
                let c = xen_cfg(parts, mode, dir);
                // The path as the file names it (absolute unless it could not be written).
                c.lines()
                    .find_map(|l| l.strip_prefix("#   xl create -c "))
                    .map(str::to_string)
                    .unwrap_or_else(|| xen_cfg_name(mode).to_string())
            };
            let (pv, pvh) = (cfg(XenMode::Pv), cfg(XenMode::Pvh));
            format!(
                "Xen, in dom0 as root: {elf} boots alone, as a classic PV guest (any x86 Xen host)\n\
                 or as a PVH guest (VT-x or AMD-V). The launcher starts it from wherever this\n\
                 directory is; -e passes environment variables through the Xenstore key\n\
                 {XENSTORE_KEY}, without a rebuild; ./{XEN_LAUNCHER} --help lists its options:\n\
                 \x20   ./{XEN_LAUNCHER} -c                       PV, the console on this terminal\n\
                 \x20   ./{XEN_LAUNCHER} --pvh -e KEY=VALUE       PVH, with KEY=VALUE in the environment\n\
                 \x20   ./{XEN_LAUNCHER} -b br0 | --no-network    another bridge than {XEN_BRIDGE}, or none\n\
                 or xl itself, from any directory (the files name {elf} by the path this\n\
                 bundle was written to; after moving it, use the launcher):\n\
                 \x20   xl create -c {pv}\n\
                 \x20   xl create -c {pvh} 'vif=[\"bridge=br0\"]'\n\
                 \x20   xl create -c {pv} 'vif=[]'\n\
                 \n",
                elf = elf_name(&parts.name),
            )
        }
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
         {xen}\
         On Firecracker, Cloud Hypervisor and Xen the guest asks for its address by DHCP on its\n\
         first interface; the launch files attach it to {TAP} or the bridge {XEN_BRIDGE}.\n"
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
    // The path the bundle will have, which the Xen configurations name the baked file by.
    let final_dir = dir
        .file_name()
        .and_then(|n| Some(fs::canonicalize(parent).ok()?.join(n)));
    fill(tmp.path(), parts, final_dir.as_deref())?;
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

/// Writes the bundle's files into the (new, empty) directory `dir`, which will be renamed
/// to `final_dir`.
fn fill(dir: &Path, parts: &BundleParts<'_>, final_dir: Option<&Path>) -> Result<(), BundleError> {
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
        for mode in XenMode::ALL {
            text(xen_cfg_name(mode), &xen_cfg(parts, mode, final_dir), 0o644)?;
        }
        text(XEN_LAUNCHER, &xen_launcher(parts), 0o755)?;
    }
    text(CMDLINE, &format!("{}\n", parts.cmdline), 0o644)?;
    text(QEMU, &qemu_script(parts), 0o755)?;
    text(FIRECRACKER, &firecracker_json(parts), 0o644)?;
    text(CLOUD_HYPERVISOR, &cloud_hypervisor_script(parts), 0o755)?;
    text(README, &readme(parts, final_dir), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests;
