//! The kernel as a build loads it: its file's digest recorded, and a bzImage's decompressed
//! vmlinux kept in the cache so that a later build reads it instead of decompressing again.

use std::io;
use std::path::Path;

use crate::cache::{BlobRecord, Cache, Kept};
use crate::kernel::{self, Kernel};

use super::keys::{recorded_digest, sha256_hex};
use super::BuildError;

/// A kernel loaded for a build.
#[derive(Debug)]
pub(super) struct Loaded<K = Kernel> {
    pub kernel: K,
    /// The sha256 (hex) of the kernel's file: part of the initramfs key.
    pub file_sha256: String,
}

/// The kernel's architecture from its first bytes, if they tell it (see
/// [`kernel::sniff_machine`]).
pub(super) fn sniff_kernel(path: &Path) -> Option<kernel::Machine> {
    use io::Read as _;
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)
        .and_then(|f| f.take(4096).read_to_end(&mut head))
        .ok()?;
    kernel::sniff_machine(&head)
}

/// Loads the kernel at `path` and gives it with the sha256 of its file. A compressed bzImage's
/// vmlinux is kept in the cache (a blob, under an index named by the bzImage's digest), so a
/// later build of the same kernel reads it instead of decompressing it again.
pub(super) fn load_kernel(path: &Path, cache: &Cache) -> Result<Loaded, kernel::KernelError> {
    let read_err = |source| kernel::KernelError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    let mut image = Vec::with_capacity(meta.len() as usize);
    io::Read::read_to_end(&mut file, &mut image).map_err(read_err)?;
    let digest = recorded_digest(cache, path, &meta, || Some(sha256_hex(&image)))
        .expect("computed when not recorded");
    let cached = cache
        .kept(Kept::Vmlinux, &digest)
        .and_then(|(_, path)| std::fs::read(path).ok());
    let mut k = match cached {
        Some(vmlinux) => Kernel::from_bzimage_and_vmlinux(image, vmlinux)?,
        None => {
            let k = Kernel::parse(image)?;
            tracing::debug!("the kernel is decompressed");
            if let (
                kernel::ImageFormat::BzImage {
                    compression: Some(_),
                },
                Ok(vmlinux),
            ) = (&k.format, k.vmlinux())
            {
                // A vmlinux that cannot be kept costs the next build a decompression.
                if let Err(e) = keep_vmlinux(cache, &digest, vmlinux) {
                    tracing::debug!(error = %e, "cannot keep the vmlinux in the cache");
                }
            }
            k
        }
    };
    k.path = Some(path.to_path_buf());
    Ok(Loaded {
        kernel: k,
        file_sha256: digest,
    })
}

/// Keeps the vmlinux of the bzImage whose sha256 is `bzimage`.
fn keep_vmlinux(cache: &Cache, bzimage: &str, vmlinux: &[u8]) -> Result<(), BuildError> {
    let (digest, path) = cache.put_bytes(vmlinux)?;
    let record = BlobRecord {
        digest,
        size: vmlinux.len() as u64,
    };
    cache
        .keep(Kept::Vmlinux, bzimage, &record)
        .map_err(|source| BuildError::Output {
            path: path.display().to_string(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_decompressed_vmlinux_is_kept_and_reused() {
        use flate2::{write::GzEncoder, Compression as Level};
        let vmlinux = crate::kernel::tests::tiny_vmlinux(Some(0x100_0001));
        let mut gz = GzEncoder::new(Vec::new(), Level::default());
        gz.write_all(&vmlinux).unwrap();
        let image = crate::kernel::tests::fake_bzimage(&gz.finish().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinuz");
        std::fs::write(&path, &image).unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();

        let Loaded {
            kernel: first,
            file_sha256: digest,
        } = load_kernel(&path, &cache).unwrap();
        assert_eq!(digest, sha256_hex(&image));
        let index = cache.root().join("vmlinux").join(&digest);
        let recorded = std::fs::read_to_string(&index).unwrap();
        assert!(
            recorded.ends_with(&format!(" {}", vmlinux.len())),
            "{recorded}"
        );

        // The second load reads the kept vmlinux.
        let (d, _) = recorded.split_once(' ').unwrap();
        let blob = cache.blob_path(&d.parse().unwrap());
        let second = load_kernel(&path, &cache).unwrap().kernel;
        assert_eq!(second.vmlinux().unwrap(), first.vmlinux().unwrap());
        assert_eq!(second.version, first.version);
        assert_eq!(second.format, first.format);
        assert_eq!(second.path.as_deref(), Some(path.as_path()));
        // A corrupt kept copy is dropped by the cache's check, and the image decompressed.
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::remove_file(&blob).unwrap();
        std::fs::write(&blob, &bytes).unwrap();
        let third = load_kernel(&path, &cache).unwrap().kernel;
        assert_eq!(third.vmlinux().unwrap(), &vmlinux[..]);
    }
}
