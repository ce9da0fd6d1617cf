//! The cache's namespaces besides the blobs: small records and kept files, each under a
//! directory of its own that only this module names.
//!
//! - `digests/<stamp key>`: the sha256 (hex) of a large input file (the oci2uk binary, a
//!   kernel), under a digest of the file's identity and change times.
//! - `vmlinux/<bzImage sha256>`, `baked/<key>`: a [`BlobRecord`], naming a kept blob (a
//!   decompressed vmlinux, a baked file).
//! - `builds/<key>.elf`: a file `run` built from an image, kept under its [`Cache::build_path`]
//!   key.
//! - `unikernels/<layer hex>/`, `kernels/<layer hex>/`: a pushed unikernel's or kernel's layer,
//!   unpacked.
//! - `pushed/<registry>.json`: the repositories each blob was pushed to, for cross-repository
//!   mounts.

use std::path::PathBuf;

use oci_spec::image::Digest;

use super::Cache;

/// A namespace of [`BlobRecord`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// A bzImage's decompressed vmlinux, by the bzImage's sha256.
    Vmlinux,
    /// A baked file, by its build key.
    Baked,
}

impl Kept {
    fn dir(self) -> &'static str {
        match self {
            Self::Vmlinux => "vmlinux",
            Self::Baked => "baked",
        }
    }
}

/// What a layer was unpacked from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpacked {
    /// A pushed unikernel.
    Unikernel,
    /// A pushed kernel and its modules.
    Kernel,
}

/// A record naming a kept blob: `DIGEST SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRecord {
    /// The blob's digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

impl BlobRecord {
    fn parse(text: &str) -> Option<Self> {
        let (digest, size) = text.trim().split_once(' ')?;
        Some(Self {
            digest: digest.parse().ok()?,
            size: size.parse().ok()?,
        })
    }

    fn format(&self) -> String {
        format!("{} {}", self.digest, self.size)
    }
}

impl Cache {
    fn kept_record(&self, ns: Kept, key: &str) -> PathBuf {
        self.root.join(ns.dir()).join(key)
    }

    /// The blob recorded under `key` in `ns`, with its path, if the cache holds it (verified).
    pub fn kept(&self, ns: Kept, key: &str) -> Option<(Digest, PathBuf)> {
        let text = std::fs::read_to_string(self.kept_record(ns, key)).ok()?;
        let record = BlobRecord::parse(&text)?;
        let path = self.get(&record.digest, record.size).ok()??;
        Some((record.digest, path))
    }

    /// Records under `key` in `ns` the blob `record` names (the blob is stored separately).
    pub fn keep(&self, ns: Kept, key: &str, record: &BlobRecord) -> std::io::Result<PathBuf> {
        let path = self.kept_record(ns, key);
        self.put_record(&path, &record.format())?;
        Ok(path)
    }

    fn digest_record(&self, stamp: &str) -> PathBuf {
        self.root.join("digests").join(hex_sha256(stamp.as_bytes()))
    }

    /// The sha256 (hex) recorded for the file whose identity is `stamp`, if any.
    pub fn file_digest(&self, stamp: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.digest_record(stamp)).ok()?;
        (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())).then_some(text)
    }

    /// Records `hex`, a sha256, for the file whose identity is `stamp`.
    pub fn record_file_digest(&self, stamp: &str, hex: &str) -> std::io::Result<()> {
        self.put_record(&self.digest_record(stamp), hex)
    }

    /// Where `run` keeps the file it built under `key` (whether or not it is there); its
    /// directory exists.
    pub fn build_path(&self, key: &str) -> std::io::Result<PathBuf> {
        let dir = self.root.join("builds");
        std::fs::create_dir_all(&dir)?;
        Ok(dir.join(format!("{key}.elf")))
    }

    /// The directory a layer `digest` of `kind` is unpacked into.
    pub fn unpacked_dir(&self, kind: Unpacked, digest: &Digest) -> PathBuf {
        let ns = match kind {
            Unpacked::Unikernel => "unikernels",
            Unpacked::Kernel => "kernels",
        };
        self.root.join(ns).join(digest.digest())
    }

    /// The record of the repositories each blob was pushed to on the registry `endpoint`.
    pub fn pushed_record(&self, endpoint: &str) -> PathBuf {
        let name: String = endpoint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.root.join("pushed").join(format!("{name}.json"))
    }
}

fn hex_sha256(data: &[u8]) -> String {
    let mut h = super::Hasher::sha256();
    h.update(data);
    h.finish().digest().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(dir.path())).unwrap();
        assert_eq!(cache.file_digest("a file"), None);
        let hex = "ab".repeat(32);
        cache.record_file_digest("a file", &hex).unwrap();
        assert_eq!(cache.file_digest("a file"), Some(hex));

        let (digest, _) = cache.put_bytes(b"kept").unwrap();
        assert_eq!(cache.kept(Kept::Baked, "k"), None);
        let record = BlobRecord {
            digest: digest.clone(),
            size: 4,
        };
        cache.keep(Kept::Baked, "k", &record).unwrap();
        assert_eq!(cache.kept(Kept::Baked, "k").unwrap().0, digest);
        assert_eq!(cache.kept(Kept::Vmlinux, "k"), None);
        // A record whose size is wrong names no blob.
        let wrong = BlobRecord { size: 5, ..record };
        cache.keep(Kept::Vmlinux, "k", &wrong).unwrap();
        assert_eq!(cache.kept(Kept::Vmlinux, "k"), None);

        for p in [
            cache.build_path("key").unwrap(),
            cache.unpacked_dir(Unpacked::Kernel, &digest),
            cache.pushed_record("127.0.0.1:5000"),
        ] {
            assert!(p.starts_with(cache.root()), "{}", p.display());
        }
        assert!(cache
            .pushed_record("127.0.0.1:5000")
            .ends_with("127.0.0.1_5000.json"));
    }
}
