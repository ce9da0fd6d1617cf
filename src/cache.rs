//! The content-addressed cache: blobs in, verified files out.
//!
//! Blobs are stored as `ROOT/blobs/<algorithm>/<hex>`. An entry is only ever created by
//! renaming a fully written and verified temporary file into place, so concurrent runs that
//! share the cache never see a partial blob, and an entry is re-verified against its digest
//! every time it is used: the cache is never trusted on its name alone.
//!
//! Initramfs files that builds made are blobs too, found again through a small index entry
//! `ROOT/rootfs/<key>.json` ([`RootfsEntry`]) whose key the build derives from everything the
//! initramfs depends on; the entry names the blob by digest, so it is verified like any other.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;

pub use crate::oci::Hasher;
use crate::oci::UnsupportedAlgorithm;

mod records;

pub use records::{BlobRecord, Kept, Unpacked};

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The cache directory could not be used.
    #[error("cannot use the cache directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a blob failed.
    #[error("cache I/O failed on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Bytes did not match the digest or size they were fetched for.
    #[error("blob {expected} does not match its descriptor: got {actual_digest} ({actual_size} bytes, expected {expected_size})")]
    Mismatch {
        /// The digest the bytes were supposed to have.
        expected: Digest,
        /// The size the bytes were supposed to have.
        expected_size: u64,
        /// What they hashed to.
        actual_digest: Digest,
        /// How many bytes there were.
        actual_size: u64,
    },
    /// The digest uses an algorithm the cache cannot verify.
    #[error("unsupported digest algorithm in {0}")]
    Algorithm(Digest),
}

impl From<UnsupportedAlgorithm> for CacheError {
    fn from(e: UnsupportedAlgorithm) -> Self {
        Self::Algorithm(e.0)
    }
}

/// Hashes a whole reader with the algorithm of `like`; returns the digest and byte count.
pub fn digest_reader(mut r: impl Read, like: &Digest) -> Result<(Digest, u64), CacheError> {
    let mut h = Hasher::for_digest(like)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(CacheError::Io {
                    path: PathBuf::new(),
                    source: e,
                })
            }
        };
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finish(), n))
}

/// A content-addressed cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating it if needed) the cache at `dir`, or the default: `$XDG_CACHE_HOME/oci2uk`
    /// (`~/.cache/oci2uk`).
    pub fn open(dir: Option<&Path>) -> Result<Self, CacheError> {
        let root = match dir {
            Some(d) => d.to_path_buf(),
            None => dirs::cache_dir()
                .unwrap_or_else(std::env::temp_dir)
                .join("oci2uk"),
        };
        for sub in ["blobs/sha256", "blobs/sha512", "rootfs", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|source| CacheError::Dir { path: p, source })?;
        }
        Ok(Self { root })
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory for temporary files (same filesystem as the blobs, so renames are atomic).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_ref())
            .join(digest.digest())
    }

    /// Where the record of the blob's last verification lives.
    fn stamp_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("verified")
            .join(digest.algorithm().as_ref())
            .join(digest.digest())
    }

    /// Records that the blob file, as `meta` describes it, was verified (best effort).
    fn stamp(&self, digest: &Digest, meta: &fs::Metadata) {
        let path = self.stamp_path(digest);
        if let Err(e) = self.put_record(&path, &file_identity(meta)) {
            tracing::debug!(%digest, error = %e, "cannot record the verification");
        }
    }

    /// Writes a small record file at `path` (a path inside the cache) whole or not at all.
    pub fn put_record(&self, path: &Path, contents: &str) -> io::Result<()> {
        fs::create_dir_all(path.parent().expect("a cache path"))?;
        let mut t = tempfile::NamedTempFile::new_in(self.tmp_dir())?;
        t.write_all(contents.as_bytes())?;
        t.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    /// The path of the blob if the cache holds it with the right digest and size. A corrupt
    /// entry is removed and reported as absent. A blob is hashed again unless the file is
    /// exactly as it was when it was last verified (same size, modification time, inode and
    /// device), as git's index trusts unchanged files.
    pub fn get(&self, digest: &Digest, size: u64) -> Result<Option<PathBuf>, CacheError> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CacheError::Io { path, source }),
        };
        let meta = file.metadata().map_err(|source| CacheError::Io {
            path: path.clone(),
            source,
        })?;
        if meta.len() == size {
            let stamp = fs::read_to_string(self.stamp_path(digest)).unwrap_or_default();
            if stamp == file_identity(&meta) {
                return Ok(Some(path));
            }
            let (actual, _) = digest_reader(io::BufReader::new(file), digest)?;
            if &actual == digest {
                self.stamp(digest, &meta);
                return Ok(Some(path));
            }
        }
        let _ = fs::remove_file(self.stamp_path(digest));
        tracing::warn!(%digest, path = %path.display(), "removing a corrupt cache entry");
        let _ = fs::remove_file(&path);
        Ok(None)
    }

    /// Starts writing a blob that must turn out to be `digest` of `size` bytes.
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter, CacheError> {
        let tmp =
            tempfile::NamedTempFile::new_in(self.tmp_dir()).map_err(|source| CacheError::Io {
                path: self.tmp_dir(),
                source,
            })?;
        Ok(BlobWriter {
            hasher: Hasher::for_digest(digest)?,
            expected: digest.clone(),
            expected_size: size,
            written: 0,
            file: io::BufWriter::with_capacity(256 * 1024, tmp),
            dest: self.blob_path(digest),
        })
    }

    /// Stores `data` as a blob under its own sha256 (hashed once, here) and returns the digest
    /// and the path.
    pub fn put_bytes(&self, data: &[u8]) -> Result<(Digest, PathBuf), CacheError> {
        let mut h = Hasher::sha256();
        h.update(data);
        let digest = h.finish();
        let mut w = self.writer(&digest, data.len() as u64)?;
        // The writer would hash the bytes again: they go to its file directly.
        w.file.write_all(data).map_err(|source| CacheError::Io {
            path: w.dest.clone(),
            source,
        })?;
        let path = w.persist()?;
        Ok((digest, path))
    }

    /// Stores a copy of the file `src`, whose sha256 the caller computed as it wrote it, as a
    /// blob, and returns its path. The copy is made by the kernel (`copy_file_range`, a
    /// reflink where the file system has them), not through memory.
    pub fn put_file(&self, src: &Path, digest: &Digest) -> Result<PathBuf, CacheError> {
        let io_err = |source| CacheError::Io {
            path: src.to_path_buf(),
            source,
        };
        let mut from = File::open(src).map_err(io_err)?;
        let size = from.metadata().map_err(io_err)?.len();
        let mut w = self.writer(digest, size)?;
        let copied = io::copy(&mut from, w.file.get_mut().as_file_mut()).map_err(io_err)?;
        if copied != size {
            return Err(io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file changed while it was copied",
            )));
        }
        w.persist()
    }

    /// Starts writing a blob of `size` bytes whose digest nothing announces (an archive
    /// member): it is stored under its own sha256 by [`BlobWriter::commit_by_content`].
    pub fn writer_by_content(&self, size: u64) -> Result<BlobWriter, CacheError> {
        let mut h = Hasher::sha256();
        h.update(b"");
        self.writer(&h.finish(), size)
    }

    /// Copies a verified blob from `r` into the cache and returns its path.
    pub fn put_reader(
        &self,
        digest: &Digest,
        size: u64,
        mut r: impl Read,
    ) -> Result<PathBuf, CacheError> {
        let mut w = self.writer(digest, size)?;
        io::copy(&mut r, &mut w).map_err(|source| CacheError::Io {
            path: w.dest.clone(),
            source,
        })?;
        w.commit()
    }
}

/// An initramfs a build stored: the blob, its size, and the figure the build needs from it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootfsEntry {
    /// The blob's digest (`sha256:...`).
    pub initramfs: String,
    /// Its size in bytes.
    pub size: u64,
    /// The guest memory the image needs, in MiB.
    pub memory_mib: u64,
    /// Where the root image lies when the blob is laid out to be read in place (an archive,
    /// then the image on a page boundary); `None` for an initramfs the kernel unpacks whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_place: Option<RootSpan>,
}

/// A blob laid out for a root image read in place: the kernel unpacks the first
/// `initrd_len` bytes (the init, its configuration and modules) as its initramfs, and the
/// SquashFS root image lies at `offset`, page-aligned, `len` bytes padded to whole pages, to
/// the blob's end. The bake places the blob and tells the kernel where the image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RootSpan {
    /// The length of the archive the kernel unpacks.
    pub initrd_len: u64,
    /// The root image's offset in the blob (a multiple of 4096).
    pub offset: u64,
    /// Its length, a multiple of 4096.
    pub len: u64,
}

impl Cache {
    fn rootfs_index(&self, key: &str) -> PathBuf {
        self.root.join("rootfs").join(format!("{key}.json"))
    }

    /// The initramfs recorded under `key` (a hex digest), with the path of its verified blob;
    /// None when there is none, or when the entry or its blob is damaged (the entry is then
    /// removed).
    pub fn get_rootfs(&self, key: &str) -> Result<Option<(RootfsEntry, PathBuf)>, CacheError> {
        let index = self.rootfs_index(key);
        let text = match fs::read(&index) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Io {
                    path: index,
                    source,
                })
            }
        };
        let found = serde_json::from_slice::<RootfsEntry>(&text)
            .ok()
            .and_then(|entry| Some((entry.initramfs.parse::<Digest>().ok()?, entry)));
        if let Some((digest, entry)) = found {
            if let Some(path) = self.get(&digest, entry.size)? {
                return Ok(Some((entry, path)));
            }
        }
        tracing::warn!(path = %index.display(), "removing a damaged initramfs entry");
        let _ = fs::remove_file(&index);
        Ok(None)
    }

    /// Moves `file`, whose bytes hash to `digest` (the caller hashed them as it wrote them),
    /// into the blobs and, with a key, records `entry` under it. Both steps are renames of
    /// complete files, so a concurrent build sees the entry whole or not at all. Returns the
    /// blob's path.
    pub fn put_rootfs(
        &self,
        key: Option<&str>,
        file: tempfile::NamedTempFile,
        digest: &Digest,
        entry: &RootfsEntry,
    ) -> Result<PathBuf, CacheError> {
        let dest = self.blob_path(digest);
        file.persist(&dest).map_err(|e| CacheError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        let Some(key) = key else {
            return Ok(dest);
        };
        let index = self.rootfs_index(key);
        let write = || -> io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(self.tmp_dir())?;
            tmp.write_all(&serde_json::to_vec(entry).map_err(io::Error::other)?)?;
            tmp.persist(&index).map_err(|e| e.error)?;
            Ok(())
        };
        write().map_err(|source| CacheError::Io {
            path: index.clone(),
            source,
        })?;
        Ok(dest)
    }
}

/// What identifies a file's bytes as unchanged: size, modification time, inode, device.
fn file_identity(meta: &fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{} {}.{} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
        meta.dev()
    )
}

/// A blob being written into the cache; it appears under its digest only on a successful
/// [`BlobWriter::commit`], and the temporary file is removed if it is dropped.
pub struct BlobWriter {
    hasher: Hasher,
    expected: Digest,
    expected_size: u64,
    written: u64,
    file: io::BufWriter<tempfile::NamedTempFile>,
    dest: PathBuf,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Discards what was written (for a download that restarts from the beginning).
    pub fn reset(&mut self) -> io::Result<()> {
        use std::io::Seek;
        self.file.flush()?;
        let f = self.file.get_mut().as_file_mut();
        f.set_len(0)?;
        f.seek(io::SeekFrom::Start(0))?;
        self.hasher = Hasher::for_digest(&self.expected).map_err(io::Error::other)?;
        self.written = 0;
        Ok(())
    }

    /// Verifies digest and size, then moves the blob into place.
    pub fn commit(self) -> Result<PathBuf, CacheError> {
        let actual = self.hasher.clone().finish();
        if actual != self.expected || self.written != self.expected_size {
            return Err(CacheError::Mismatch {
                expected: self.expected,
                expected_size: self.expected_size,
                actual_digest: actual,
                actual_size: self.written,
            });
        }
        self.persist()
    }

    /// Checks the size, then moves the blob into place under the digest its bytes have (for
    /// a writer from [`Cache::writer_by_content`]), and returns the digest and the path.
    pub fn commit_by_content(mut self) -> Result<(Digest, PathBuf), CacheError> {
        let actual = self.hasher.clone().finish();
        if self.written != self.expected_size {
            return Err(CacheError::Mismatch {
                expected: actual.clone(),
                expected_size: self.expected_size,
                actual_digest: actual,
                actual_size: self.written,
            });
        }
        let blobs = self.dest.ancestors().nth(2).map(Path::to_path_buf);
        if let Some(blobs) = blobs {
            self.dest = blobs
                .join(actual.algorithm().as_ref())
                .join(actual.digest());
        }
        self.expected = actual.clone();
        Ok((actual, self.persist()?))
    }

    /// Moves the blob into place and records it as verified: its bytes were hashed on their
    /// way in.
    fn persist(self) -> Result<PathBuf, CacheError> {
        let tmp = self.file.into_inner().map_err(|e| CacheError::Io {
            path: self.dest.clone(),
            source: e.into_error(),
        })?;
        tmp.persist(&self.dest).map_err(|e| CacheError::Io {
            path: self.dest.clone(),
            source: e.error,
        })?;
        // The bytes were hashed on their way in: record it, as `Cache::get` would.
        let root = self.dest.ancestors().nth(3).map(Path::to_path_buf);
        if let (Some(root), Ok(meta)) = (root, fs::metadata(&self.dest)) {
            Cache { root }.stamp(&self.expected, &meta);
        }
        Ok(self.dest)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.expected_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is larger than its descriptor's {} bytes",
                    self.expected, self.expected_size
                ),
            ));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> Digest {
        let mut h = Hasher::sha256();
        h.update(data);
        h.finish()
    }

    #[test]
    fn bytes_are_stored_under_their_digest_and_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(dir.path())).unwrap();
        let data = b"a vmlinux, say".repeat(1000);
        let (digest, path) = cache.put_bytes(&data).unwrap();
        assert_eq!(digest, sha(&data));
        assert_eq!(fs::read(&path).unwrap(), data);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            fs::read_to_string(cache.stamp_path(&digest)).unwrap(),
            file_identity(&meta)
        );
        assert_eq!(cache.get(&digest, data.len() as u64).unwrap(), Some(path));
    }

    #[test]
    fn put_get_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(dir.path())).unwrap();
        let d = sha(b"hello");
        assert!(cache.get(&d, 5).unwrap().is_none());
        let p = cache.put_reader(&d, 5, &b"hello"[..]).unwrap();
        assert_eq!(cache.get(&d, 5).unwrap(), Some(p.clone()));
        fs::write(&p, b"jello").unwrap();
        assert!(cache.get(&d, 5).unwrap().is_none());
        assert!(!p.exists(), "a corrupt entry is removed");
    }

    #[test]
    fn rootfs_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(dir.path())).unwrap();
        let key = "ab".repeat(32);
        assert!(cache.get_rootfs(&key).unwrap().is_none());
        let mut f = tempfile::NamedTempFile::new_in(cache.tmp_dir()).unwrap();
        f.write_all(b"initramfs").unwrap();
        let d = sha(b"initramfs");
        let entry = RootfsEntry {
            initramfs: d.to_string(),
            size: 9,
            memory_mib: 128,
            in_place: Some(RootSpan {
                initrd_len: 3,
                offset: 4096,
                len: 4096,
            }),
        };
        let p = cache.put_rootfs(Some(&key), f, &d, &entry).unwrap();
        assert_eq!(p, cache.blob_path(&d));
        assert_eq!(
            cache.get_rootfs(&key).unwrap(),
            Some((entry.clone(), p.clone()))
        );
        // A damaged blob makes the entry a miss, and the entry goes.
        fs::write(&p, b"initramfx").unwrap();
        assert!(cache.get_rootfs(&key).unwrap().is_none());
        assert!(!cache.rootfs_index(&key).exists());
        // So does a damaged entry.
        fs::write(cache.rootfs_index(&key), b"{").unwrap();
        assert!(cache.get_rootfs(&key).unwrap().is_none());
        assert_eq!(fs::read_dir(cache.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(dir.path())).unwrap();
        let d = sha(b"hello");
        let err = cache.put_reader(&d, 5, &b"world"[..]).unwrap_err();
        assert!(matches!(err, CacheError::Mismatch { .. }), "{err}");
        let err = cache.put_reader(&d, 5, &b"hello!"[..]).unwrap_err();
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert!(cause.contains("larger"), "{cause}");
        assert!(!cache.blob_path(&d).exists());
        assert_eq!(fs::read_dir(cache.tmp_dir()).unwrap().count(), 0);
    }
}
