//! Test fixtures: layer tars built in memory with the tar crate, compressed into files.

use std::io::Write;
use std::path::PathBuf;

use oci_spec::image::Digest;

use super::{flatten, FlattenError, FlattenOptions, Tree};
use crate::cache::Hasher;
use crate::image::{Compression, Layer};
use crate::progress::Progress;

pub(crate) fn sha256(data: &[u8]) -> Digest {
    let mut h = Hasher::sha256();
    h.update(data);
    h.finish()
}

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub(crate) fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

pub(crate) fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// Builds a layer tar entry by entry, with full control of the raw names.
pub(crate) struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

impl TarBuilder {
    pub(crate) fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry; `f` may change the header further. Names and link targets longer than
    /// 100 bytes get pax records.
    pub(crate) fn custom(
        &mut self,
        ty: u8,
        name: &str,
        link: &str,
        data: &[u8],
        pax: &[(&str, &[u8])],
        f: impl FnOnce(&mut tar::Header),
    ) -> &mut Self {
        let mut pax: Vec<(&str, &[u8])> = pax.to_vec();
        if name.len() > 100 {
            pax.push(("path", name.as_bytes()));
        }
        if link.len() > 100 {
            pax.push(("linkpath", link.as_bytes()));
        }
        if !pax.is_empty() {
            self.b.append_pax_extensions(pax).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name.as_bytes()[..n]);
        let l = link.len().min(100);
        h.as_old_mut().linkname[..l].copy_from_slice(&link.as_bytes()[..l]);
        h.set_entry_type(tar::EntryType::new(ty));
        h.set_mode(if ty == b'5' { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        f(&mut h);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub(crate) fn raw(&mut self, ty: u8, name: &str, link: &str, data: &[u8]) -> &mut Self {
        self.custom(ty, name, link, data, &[], |_| {})
    }

    pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(b'0', name, "", data)
    }

    pub(crate) fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(b'5', name, "", b"")
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(b'2', name, target, b"")
    }

    pub(crate) fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(b'1', name, target, b"")
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// Builds a tar with `f`.
pub(crate) fn tar(f: impl FnOnce(&mut TarBuilder)) -> Vec<u8> {
    let mut t = TarBuilder::new();
    f(&mut t);
    t.finish()
}

/// Layer files and a spool directory in one temporary directory.
pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    n: usize,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("spool")).unwrap();
        Self { dir, n: 0 }
    }

    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// A layer from a blob, with the DiffID of `uncompressed`, declared as `declared`.
    pub(crate) fn blob(
        &mut self,
        blob: &[u8],
        uncompressed: &[u8],
        declared: Compression,
    ) -> Layer {
        self.n += 1;
        let path = self.dir.path().join(format!("layer{}", self.n));
        std::fs::write(&path, blob).unwrap();
        Layer {
            digest: sha256(blob),
            size: blob.len() as u64,
            media_type: media_type(declared).to_string(),
            compression: declared,
            diff_id: sha256(uncompressed),
            path,
        }
    }

    /// A layer holding `tar`, compressed with `c`.
    pub(crate) fn layer_as(&mut self, tar: &[u8], c: Compression) -> Layer {
        let blob = match c {
            Compression::None => tar.to_vec(),
            Compression::Gzip => gzip(tar),
            Compression::Zstd => zstd(tar),
        };
        self.blob(&blob, tar, c)
    }

    /// A gzip layer built with `f`.
    pub(crate) fn layer(&mut self, f: impl FnOnce(&mut TarBuilder)) -> Layer {
        self.layer_as(&tar(f), Compression::Gzip)
    }

    pub(crate) fn flatten_max(
        &self,
        layers: &[Layer],
        max_size: u64,
    ) -> Result<Tree, FlattenError> {
        flatten(
            layers,
            &FlattenOptions { max_size },
            &self.spool_dir(),
            &Progress::hidden(),
        )
    }

    pub(crate) fn flatten(&self, layers: &[Layer]) -> Result<Tree, FlattenError> {
        self.flatten_max(layers, 1 << 32)
    }
}
