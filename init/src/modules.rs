//! Loading the kernel modules the configuration lists, in its order (dependencies first, as
//! the host computed from `modules.dep`).
//!
//! The host stores modules uncompressed so the init needs no decompressor; a `.ko.xz`,
//! `.ko.zst` or `.ko.gz` is handed to the kernel to decompress, which works when the kernel has
//! `CONFIG_MODULE_DECOMPRESS`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use oci2uk_config::guest::{Needs, Platform, DRIVERS};
use oci2uk_config::Oci2uk;

use crate::sys;

/// Where a module is, from its entry in the configuration.
///
/// An absolute path is used as it is; a path with a `/` or a `.ko` suffix is relative to
/// `moddir` (`/lib/modules/RELEASE`); a bare name is looked up in `moddir/modules.dep`, with
/// its dependencies before it.
pub fn resolve(spec: &str, moddir: &Path, dep: Option<&str>) -> Result<Vec<PathBuf>, String> {
    if spec.starts_with('/') {
        return Ok(vec![PathBuf::from(spec)]);
    }
    if spec.contains('/') || is_module_file(spec) {
        return Ok(vec![moddir.join(spec)]);
    }
    let Some(dep) = dep else {
        return Err(format!(
            "module {spec:?} is a name, and {}/modules.dep cannot be read",
            moddir.display()
        ));
    };
    let wanted = spec.replace('-', "_");
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .map(module_name)
            .unwrap_or_default();
        if name == wanted {
            // modules.dep lists dependencies nearest first: load them in reverse.
            let mut out: Vec<PathBuf> = deps
                .split_whitespace()
                .rev()
                .map(|d| moddir.join(d))
                .collect();
            out.push(moddir.join(path));
            return Ok(out);
        }
    }
    Err(format!(
        "module {spec:?} is not in {}/modules.dep",
        moddir.display()
    ))
}

fn is_module_file(s: &str) -> bool {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .any(|suffix| s.ends_with(suffix))
}

/// `virtio-net.ko.xz` -> `virtio_net`.
fn module_name(file: &str) -> String {
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Loads one module file; already loaded (or built in) is success.
pub fn load(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    let name = path.to_string_lossy();
    let flags = if name.ends_with(".ko") {
        0
    } else {
        sys::MODULE_INIT_COMPRESSED_FILE
    };
    match sys::finit_module(&file, flags) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// The modules to load where the guest runs: the drivers that serve on `platform` (in
/// [`DRIVERS`]' order; a driver the contract does not name is loaded everywhere), then the
/// configuration's other modules.
pub fn wanted(oci2uk: &Oci2uk, platform: Platform, needs: Needs) -> Vec<&String> {
    let known = DRIVERS
        .iter()
        .filter(|d| d.wanted(platform, needs))
        .filter_map(|d| oci2uk.drivers.get(d.name));
    let unknown = oci2uk
        .drivers
        .iter()
        .filter(|(name, _)| !DRIVERS.iter().any(|d| d.name == name.as_str()))
        .map(|(_, list)| list);
    known
        .chain(unknown)
        .flatten()
        .chain(&oci2uk.modules)
        .collect()
}

/// Loads every module of the list in order, each file once; failures are reported (the
/// application may not need the device) and do not stop the others.
pub fn load_all(specs: &[&String]) -> Vec<String> {
    let mut problems = Vec::new();
    if specs.is_empty() {
        return problems;
    }
    let moddir = PathBuf::from("/lib/modules").join(sys::kernel_release());
    let needs_dep = specs.iter().any(|s| !s.contains('/') && !is_module_file(s));
    let dep = needs_dep
        .then(|| fs::read_to_string(moddir.join("modules.dep")).ok())
        .flatten();
    let mut done = HashSet::new();
    for spec in specs {
        let paths = match resolve(spec, &moddir, dep.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        for p in paths {
            if !done.insert(p.clone()) {
                continue;
            }
            crate::console::step(|| format!("loading {}", p.display()));
            if let Err(e) = load(&p) {
                let hint = if e.raw_os_error() == Some(libc::ENOENT) {
                    ""
                } else {
                    " (the kernel log says why; unknown symbols mean a dependency is missing \
                     or comes later in oci2uk.modules)"
                };
                problems.push(format!("loading module {}: {e}{hint}", p.display()));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
kernel/net/core/failover.ko:\n\
kernel/drivers/virtio/virtio-mmio.ko.xz: kernel/drivers/virtio/virtio_ring.ko\n";

    #[test]
    fn resolves_paths_and_names() {
        let m = Path::new("/lib/modules/6.1");
        assert_eq!(
            resolve("/.oci2uk/modules/virtio.ko", m, None).unwrap(),
            [PathBuf::from("/.oci2uk/modules/virtio.ko")]
        );
        assert_eq!(
            resolve("kernel/fs/overlayfs/overlay.ko", m, None).unwrap(),
            [m.join("kernel/fs/overlayfs/overlay.ko")]
        );
        assert_eq!(
            resolve("virtio_net", m, Some(DEP)).unwrap(),
            [
                m.join("kernel/net/core/failover.ko"),
                m.join("kernel/drivers/net/net_failover.ko"),
                m.join("kernel/drivers/net/virtio_net.ko"),
            ]
        );
        assert_eq!(
            resolve("virtio_mmio", m, Some(DEP)).unwrap(),
            [
                m.join("kernel/drivers/virtio/virtio_ring.ko"),
                m.join("kernel/drivers/virtio/virtio-mmio.ko.xz"),
            ]
        );
        assert!(resolve("nope", m, Some(DEP))
            .unwrap_err()
            .contains("not in"));
        assert!(resolve("nope", m, None)
            .unwrap_err()
            .contains("cannot be read"));
    }

    #[test]
    fn drivers_are_chosen_by_platform() {
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let oci2uk = Oci2uk {
            modules: list(&["/m/squashfs.ko"]),
            drivers: [
                ("virtio_net", list(&["/m/virtio.ko", "/m/virtio_net.ko"])),
                ("virtio_pci", list(&["/m/virtio.ko", "/m/virtio_pci.ko"])),
                ("xen_netfront", list(&["/m/xen-netfront.ko"])),
                ("xen_blkfront", list(&["/m/xen-blkfront.ko"])),
                ("mine", list(&["/m/mine.ko"])),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            ..Oci2uk::default()
        };
        let got = |p, blk| {
            let needs = Needs {
                blk,
                virtiofs: false,
            };
            wanted(&oci2uk, p, needs)
                .into_iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got(Platform::Xen, false),
            ["/m/xen-netfront.ko", "/m/mine.ko", "/m/squashfs.ko"]
        );
        assert_eq!(
            got(Platform::Xen, true),
            [
                "/m/xen-netfront.ko",
                "/m/xen-blkfront.ko",
                "/m/mine.ko",
                "/m/squashfs.ko"
            ]
        );
        // virtio.ko twice: load_all loads a file once.
        assert_eq!(
            got(Platform::Virtio, true),
            [
                "/m/virtio.ko",
                "/m/virtio_pci.ko",
                "/m/virtio.ko",
                "/m/virtio_net.ko",
                "/m/mine.ko",
                "/m/squashfs.ko"
            ]
        );
    }
}
