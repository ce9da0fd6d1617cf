//! The initramfs of a build: from the cache when an earlier build made it, else flattened,
//! planned and written into the cache under its key.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::PathBuf;

use oci2uk_config::guest::DRIVERS;

use crate::cache::{Hasher, RootSpan, RootfsEntry};
use crate::kernel::{Kernel, Lookup, Module, Modules};
use crate::output::sink::set_default_mode;
use crate::{plan, rootfs};

use super::keys::{self, RootfsInputs};
use super::{BuildError, Format, Job, BAKED_ROOTFS};

/// An initramfs ready to bake: a verified blob of the cache, its digest and length, the guest
/// memory the image needs, and the key it is kept under (none when the build cannot be keyed).
pub(super) struct Initramfs {
    pub path: PathBuf,
    pub digest: String,
    pub len: u64,
    pub memory_mib: u64,
    pub key: Option<String>,
    /// Where the root image lies, when the blob is laid out to be read in place.
    pub in_place: Option<RootSpan>,
}

impl Job {
    /// The initramfs of this image, kernel and options: from the cache when an earlier build
    /// made it (no flattening then), else flattened, planned, written into the cache and
    /// recorded under its key.
    pub(super) fn initramfs(&self, kernel: &Kernel) -> Result<Initramfs, BuildError> {
        let config = kernel.config()?;
        // Only a baked file can place the root image for the kernel to read in place: a
        // bundle's or `--format initrd`'s initramfs is loaded by someone else, wherever they
        // like, and is unpacked whole.
        let in_place = self.req.format == Format::Elf
            && self.req.rootfs == rootfs::Layout::Squashfs
            && config.as_ref().is_some_and(|c| c.reads_root_in_place());
        let modules = kernel.modules(self.req.modules.as_deref())?;
        let mut extras = vec![rootfs::Extra::init(crate::init_blob::INIT.to_vec())];
        let mut packed = BTreeSet::new();
        let mut pack = |needed: Vec<Module>| -> Result<Vec<String>, BuildError> {
            let mut paths = Vec::new();
            for m in needed {
                if packed.insert(m.name.clone()) {
                    let ko = modules.read(&m).map_err(BuildError::Modules)?;
                    extras.push(rootfs::Extra::module(&m.name, ko));
                }
                paths.push(rootfs::module_path(&m.name));
            }
            Ok(paths)
        };
        let mut drivers = BTreeMap::new();
        for (name, needed) in driver_modules(&modules)? {
            drivers.insert(name.to_owned(), pack(needed)?);
        }
        // A root image read in place needs no loop device.
        let root_modules: Vec<&str> = (self.req.rootfs.modules().iter())
            .filter(|&&m| !(in_place && m == "loop"))
            .copied()
            .collect();
        let needed = modules
            .closure(&root_modules)
            .map_err(BuildError::Modules)?;
        let module_paths = pack(needed)?;
        let opts = rootfs::RootfsOptions {
            codec: rootfs::Codec::for_kernel(config.as_ref()),
            level: None,
            source_date_epoch: self.req.source_date_epoch,
        };
        let key = keys::rootfs_key(
            &self.cache,
            &RootfsInputs {
                img: &self.img,
                name: &self.req.source.name(),
                kernel,
                kernel_file: &self.kernel.as_ref().expect("a kernel").file_sha256,
                extras: &extras,
                opts: &opts,
                layout: self.req.rootfs,
                in_place,
                max_size: self.req.max_size,
                overrides: &self.req.overrides,
            },
        );
        if let Some(key) = &key {
            if let Some((entry, path)) = self.cache.get_rootfs(key)? {
                tracing::debug!(%key, initramfs = %entry.initramfs, "the initramfs is in the cache");
                return Ok(Initramfs {
                    path,
                    digest: entry.initramfs,
                    len: entry.size,
                    memory_mib: entry.memory_mib,
                    key: Some(key.clone()),
                    in_place: entry.in_place,
                });
            }
        }

        let tree = self.flatten()?;
        tracing::debug!("flattened");
        let target = plan::Target {
            machine: kernel.machine,
            name: self.req.source.name(),
            modules: module_paths,
            drivers,
            kernel: Some(kernel.version.clone()),
        };
        let config = plan::plan(&self.img, &tree, &self.req.overrides, &target)?;
        extras.push(rootfs::Extra::config(config.to_json().into_bytes()));

        // Written beside the blobs (same filesystem), then moved into the cache under its
        // digest: the bake must know the length before it writes, and a later build with the
        // same key starts from here.
        let tmp_err = |e| self.tmp_err(e);
        let mut file = tempfile::NamedTempFile::new_in(&self.tmp).map_err(tmp_err)?;
        let mut hashed = HashingWriter {
            inner: file.as_file_mut(),
            hasher: Hasher::sha256(),
        };
        let squash = rootfs::SquashfsOptions {
            source_date_epoch: self.req.source_date_epoch,
            level: in_place.then_some(rootfs::IN_PLACE_ZSTD_LEVEL),
            ..Default::default()
        };
        let stats = if in_place {
            rootfs::write_in_place(&tree, &extras, &opts, &squash, &self.tmp, &mut hashed)?
        } else {
            rootfs::write_layout(
                self.req.rootfs,
                &tree,
                &extras,
                &opts,
                &squash,
                &self.tmp,
                &mut hashed,
            )?
        };
        let digest = hashed.hasher.finish();
        tracing::debug!(size = stats.compressed_size, "the initramfs is written");
        drop(tree);
        let memory_mib = rootfs::memory_needed(&stats, BAKED_ROOTFS);
        // A bundle copies this file as its initrd: an ordinary file, not a temporary's 0600.
        set_default_mode(file.as_file()).map_err(tmp_err)?;
        let entry = RootfsEntry {
            initramfs: digest.to_string(),
            size: stats.compressed_size,
            memory_mib,
            in_place: stats.in_place,
        };
        let path = self
            .cache
            .put_rootfs(key.as_deref(), file, &digest, &entry)?;
        Ok(Initramfs {
            path,
            digest: digest.to_string(),
            len: stats.compressed_size,
            memory_mib,
            key,
            in_place: stats.in_place,
        })
    }
}

/// The modules of each device driver in the contract, with their dependencies, in load order.
///
/// Every driver goes in, for every platform: one file boots on QEMU and on Xen, and the init
/// loads the ones that serve where it runs. A driver built into the kernel has nothing to
/// load; a kernel without a driver at all (no Xen support, say) makes guests without that
/// device.
fn driver_modules(modules: &Modules) -> Result<Vec<(&'static str, Vec<Module>)>, BuildError> {
    let mut out = Vec::new();
    for d in DRIVERS {
        if let Lookup::Missing = modules.lookup(d.name) {
            tracing::debug!(driver = d.name, "the kernel has no such module");
            continue;
        }
        let needed = modules.closure(&[d.name]).map_err(BuildError::Modules)?;
        out.push((d.name, needed));
    }
    Ok(out)
}

/// Hashes what passes through to a writer.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn names(m: &Modules) -> Vec<(&'static str, Vec<String>)> {
        driver_modules(m)
            .unwrap()
            .into_iter()
            .map(|(d, list)| (d, list.into_iter().map(|m| m.name).collect()))
            .collect()
    }

    #[test]
    fn drivers_built_in_or_absent_have_nothing_to_load() {
        let dep = "kernel/drivers/net/xen-netfront.ko:\n\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let builtin = "kernel/drivers/block/xen-blkfront.ko\nkernel/drivers/virtio/virtio_pci.ko\n";
        let got = names(&Modules::parse(Path::new("/m"), dep, builtin));
        assert_eq!(
            got,
            [
                ("virtio_pci", vec![]),
                (
                    "virtio_net",
                    vec!["virtio_ring".into(), "virtio".into(), "virtio_net".into()]
                ),
                ("xen_netfront", vec!["xen_netfront".into()]),
                ("xen_blkfront", vec![]),
            ]
        );
    }
}
