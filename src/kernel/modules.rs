//! A kernel's module tree (`/lib/modules/VERSION`): which modules exist, which are built in,
//! the order to load a set of them in, and their bytes ready for `finit_module`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::config::KernelConfig;
use super::decompress::{self, Compression, MAX_OUTPUT};

/// Errors reading a module tree.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    /// A file of the tree could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A module is neither in `modules.dep` nor built in.
    #[error(
        "kernel module {name} is not in {dir} (neither in modules.dep nor in modules.builtin)"
    )]
    Missing {
        /// The module's name.
        name: String,
        /// The module tree.
        dir: PathBuf,
    },
    /// A kernel without modules does not build in what is needed.
    #[error(
        "the kernel has no modules and does not build {name} in (CONFIG_{symbol} is not =y in \
         its configuration)"
    )]
    NotBuiltIn {
        /// The module's name.
        name: String,
        /// Its Kconfig symbol.
        symbol: String,
    },
    /// `modules.dep` names a dependency that has no line of its own, or has a cycle.
    #[error("{dir}/modules.dep is inconsistent: {why}")]
    Inconsistent {
        /// The module tree.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A compressed module could not be decompressed.
    #[error("cannot decompress kernel module {path}")]
    Decompress {
        /// The module file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: decompress::DecompressError,
    },
}

/// One module file of the tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Module {
    /// Its name, with `-` written `_` (`virtio_net`).
    pub name: String,
    /// Its path relative to the tree, as `modules.dep` writes it
    /// (`kernel/drivers/net/virtio_net.ko`).
    pub relative: PathBuf,
    /// Its full path.
    pub path: PathBuf,
}

/// Where a module is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A loadable module file.
    Module(Module),
    /// Built into the kernel: nothing to load.
    BuiltIn,
    /// Neither.
    Missing,
}

/// A module tree, read from its `modules.dep` and `modules.builtin`.
#[derive(Debug, Clone)]
pub struct Modules {
    dir: PathBuf,
    /// Name -> (relative path, the names it depends on as `modules.dep` lists them).
    deps: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
    /// Built from a kernel's configuration (a kernel without modules), not from a tree.
    from_config: bool,
}

/// The Kconfig symbol of each module oci2uk may put into an initramfs: what a kernel without
/// modules must build in instead (the drivers of `oci2uk_config::guest::DRIVERS` and the root
/// image's file systems).
const SYMBOLS: &[(&str, &str)] = &[
    ("virtio_pci", "VIRTIO_PCI"),
    ("virtio_mmio", "VIRTIO_MMIO"),
    ("virtio_net", "VIRTIO_NET"),
    ("virtio_blk", "VIRTIO_BLK"),
    ("virtiofs", "VIRTIO_FS"),
    ("fuse", "FUSE_FS"),
    ("button", "ACPI_BUTTON"),
    ("evdev", "INPUT_EVDEV"),
    ("xen_netfront", "XEN_NETDEV_FRONTEND"),
    ("xen_blkfront", "XEN_BLKDEV_FRONTEND"),
    ("squashfs", "SQUASHFS"),
    ("overlay", "OVERLAY_FS"),
    ("loop", "BLK_DEV_LOOP"),
];

/// A module's name from its file name: the stem before `.ko`, with `-` written `_` (as kmod
/// compares names).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

impl Modules {
    /// Read the tree at `dir` (its `modules.dep`, and `modules.builtin` when present).
    pub fn open(dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| ModulesError::Read { path, source })
        };
        let dep_text = read("modules.dep")?;
        let builtin_text = match read("modules.builtin") {
            Ok(text) => text,
            Err(ModulesError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                String::new()
            }
            Err(e) => return Err(e),
        };
        Ok(Self::parse(dir, &dep_text, &builtin_text))
    }

    /// Build from the text of `modules.dep` and `modules.builtin`.
    pub fn parse(dir: &Path, dep_text: &str, builtin_text: &str) -> Self {
        let deps = dep_text
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(module, deps)| {
                let module = module.trim();
                let deps = deps.split_whitespace().map(module_name).collect();
                (module_name(module), (module.to_string(), deps))
            })
            .collect();
        let builtin = builtin_text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        Modules {
            dir: dir.to_path_buf(),
            deps,
            builtin,
            from_config: false,
        }
    }

    /// The "tree" of a kernel built without modules (`CONFIG_MODULES` unset): nothing to load,
    /// and a module counts as built in when its Kconfig symbol is `=y` in `config`.
    pub fn built_in(config: &KernelConfig) -> Self {
        Modules {
            dir: PathBuf::new(),
            deps: BTreeMap::new(),
            builtin: SYMBOLS
                .iter()
                .filter(|(_, symbol)| config.is_builtin(symbol))
                .map(|(name, _)| (*name).to_owned())
                .collect(),
            from_config: true,
        }
    }

    /// The tree's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the module `name` is (`-` and `_` are the same).
    pub fn lookup(&self, name: &str) -> Lookup {
        let name = module_name(name);
        if let Some((relative, _)) = self.deps.get(&name) {
            Lookup::Module(self.module(&name, relative))
        } else if self.builtin.contains(&name) {
            Lookup::BuiltIn
        } else {
            Lookup::Missing
        }
    }

    fn module(&self, name: &str, relative: &str) -> Module {
        Module {
            name: name.to_string(),
            relative: PathBuf::from(relative),
            path: self.dir.join(relative),
        }
    }

    /// The modules to load for `wanted`, with their dependencies, in an order that loads every
    /// module after the ones it depends on (as modprobe would: the last listed dependency
    /// first). Built-in modules are skipped; a module that is neither a file nor built in is an
    /// error. Each module appears once.
    pub fn closure<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Vec<Module>, ModulesError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            let name = module_name(name.as_ref());
            match self.lookup(&name) {
                Lookup::Module(_) => self.visit(&name, &mut Vec::new(), &mut done, &mut order)?,
                Lookup::BuiltIn => {}
                Lookup::Missing if self.from_config => {
                    let symbol = SYMBOLS
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map_or("?", |(_, s)| s);
                    return Err(ModulesError::NotBuiltIn {
                        symbol: symbol.to_owned(),
                        name,
                    });
                }
                Lookup::Missing => {
                    return Err(ModulesError::Missing {
                        name,
                        dir: self.dir.clone(),
                    })
                }
            }
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), ModulesError> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(ModulesError::Inconsistent {
                dir: self.dir.clone(),
                why: format!("dependency cycle through {name}"),
            });
        }
        let Some((relative, deps)) = self.deps.get(name) else {
            return Err(ModulesError::Inconsistent {
                dir: self.dir.clone(),
                why: format!("{} depends on {name}, which has no line", path.join(" -> ")),
            });
        };
        path.push(name.to_string());
        // modules.dep lists a module's whole dependency closure, the deepest last; modprobe
        // loads from the end of the list, so visit it back to front.
        for dep in deps.iter().rev() {
            self.visit(dep, path, done, order)?;
        }
        path.pop();
        done.insert(name.to_string());
        order.push(self.module(name, relative));
        Ok(())
    }

    /// The module's bytes, decompressed when its file is `.ko.xz`, `.ko.zst` or `.ko.gz`, so
    /// the guest can `finit_module` it without a decompressor.
    pub fn read(&self, module: &Module) -> Result<Vec<u8>, ModulesError> {
        read_module(&module.path)
    }
}

/// A module file's bytes, decompressed by its extension.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModulesError> {
    let data = fs::read(path).map_err(|source| ModulesError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.to_string_lossy();
    let compression = if name.ends_with(".ko.xz") {
        Compression::Xz
    } else if name.ends_with(".ko.zst") {
        Compression::Zstd
    } else if name.ends_with(".ko.gz") {
        Compression::Gzip
    } else {
        return Ok(data);
    };
    decompress::decompress(compression, &data, MAX_OUTPUT).map_err(|source| {
        ModulesError::Decompress {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_ring.ko.xz:
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_pci_legacy_dev.ko.xz:
kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
";

    fn names(m: &[Module]) -> Vec<&str> {
        m.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn closure_loads_dependencies_first_once() {
        let m = Modules::parse(Path::new("/m"), DEP, "kernel/fs/overlayfs/overlay.ko\n");
        let order = m
            .closure(&["virtio_net", "virtio-pci", "overlay", "virtio_rng"])
            .unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_rng",
            ]
        );
        assert_eq!(
            order[0].path,
            Path::new("/m/kernel/drivers/virtio/virtio_ring.ko.xz")
        );
        assert_eq!(m.lookup("overlay"), Lookup::BuiltIn);
        assert!(matches!(
            m.closure(&["nope"]),
            Err(ModulesError::Missing { name, .. }) if name == "nope"
        ));
    }

    #[test]
    fn inconsistent_trees_are_errors() {
        let m = Modules::parse(Path::new("/m"), "a.ko: b.ko\n", "");
        assert!(matches!(
            m.closure(&["a"]),
            Err(ModulesError::Inconsistent { .. })
        ));
        let m = Modules::parse(Path::new("/m"), "a.ko: b.ko\nb.ko: a.ko\n", "");
        assert!(matches!(
            m.closure(&["a"]),
            Err(ModulesError::Inconsistent { .. })
        ));
    }

    #[test]
    fn reads_compressed_modules_decompressed() {
        let dir = tempfile::tempdir().unwrap();
        let elf = b"\x7fELF module bytes".repeat(100);
        std::fs::write(dir.path().join("a.ko"), &elf).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &elf).unwrap();
        std::fs::write(dir.path().join("b.ko.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(
            dir.path().join("c.ko.zst"),
            zstd::encode_all(&elf[..], 3).unwrap(),
        )
        .unwrap();
        for f in ["a.ko", "b.ko.gz", "c.ko.zst"] {
            assert_eq!(read_module(&dir.path().join(f)).unwrap(), elf, "{f}");
        }
        if let Some(xz) = super::super::decompress::tests::compress_with("xz", &["-c"], &elf) {
            std::fs::write(dir.path().join("d.ko.xz"), xz).unwrap();
            assert_eq!(read_module(&dir.path().join("d.ko.xz")).unwrap(), elf);
        }
    }

    /// The installed module tree (the cloud kernel's, which `scripts/install-vm.sh` installs
    /// for the VM tests).
    #[cfg(feature = "vm-tests")]
    #[test]
    fn the_installed_tree() {
        let dir = std::fs::read_dir("/lib/modules")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("modules.dep").exists())
            .expect("a module tree in /lib/modules (scripts/install-vm.sh installs one)");
        let m = Modules::open(&dir).unwrap();
        if let Lookup::Module(_) = m.lookup("virtio_net") {
            let order = m.closure(&["virtio_net"]).unwrap();
            let ring = order.iter().position(|m| m.name == "virtio_ring");
            let virtio = order.iter().position(|m| m.name == "virtio");
            assert!(ring < virtio, "{:?}", names(&order));
            assert_eq!(order.last().unwrap().name, "virtio_net");
            let bytes = m.read(order.last().unwrap()).unwrap();
            assert_eq!(&bytes[..4], b"\x7fELF");
        }
    }
}
