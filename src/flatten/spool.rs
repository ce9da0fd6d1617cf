//! The spool: regular-file contents of a tree, in one append-only temporary file.
//!
//! One file rather than one file per content: a layer holds tens of thousands of small files,
//! and one file costs one `open` for the whole image instead of an `open`, `write` and `close`
//! per content (and as many inodes in the cache). Contents are deduplicated by sha256, so a
//! file rewritten unchanged by a later layer, or present in several layers, is stored once.
//! The file is anonymous (`O_TMPFILE` where the kernel has it, else unlinked at once), so it
//! disappears with the tree, even if the process is killed; it is never fsynced (it is scratch
//! data) and never named by an image path.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::tree::Content;

/// Contents up to this size are read into memory first, so that a duplicate costs no write.
const SMALL: u64 = 1 << 20;
/// Copy buffer for larger contents.
const CHUNK: usize = 256 * 1024;

/// Why copying a content failed: reading the layer or writing the spool.
#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// The spool while a tree is being built.
pub(crate) struct SpoolWriter {
    w: BufWriter<File>,
    len: u64,
    index: HashMap<[u8; 32], u64>,
    buf: Vec<u8>,
}

impl SpoolWriter {
    /// A new, empty spool in `dir`.
    pub(crate) fn new(dir: &Path) -> io::Result<Self> {
        Ok(Self {
            w: BufWriter::with_capacity(CHUNK, tempfile::tempfile_in(dir)?),
            len: 0,
            index: HashMap::new(),
            buf: Vec::new(),
        })
    }

    /// Stores exactly `len` bytes read from `r`.
    pub(crate) fn add(&mut self, mut r: impl Read, len: u64) -> Result<Content, CopyError> {
        if len <= SMALL {
            self.buf.resize(len as usize, 0);
            r.read_exact(&mut self.buf).map_err(CopyError::Read)?;
            let sha256: [u8; 32] = Sha256::digest(&self.buf).into();
            if let Some(&offset) = self.index.get(&sha256) {
                return Ok(Content {
                    offset,
                    len,
                    sha256,
                });
            }
            let offset = self.len;
            self.w.write_all(&self.buf).map_err(CopyError::Write)?;
            self.len += len;
            self.index.insert(sha256, offset);
            return Ok(Content {
                offset,
                len,
                sha256,
            });
        }
        let start = self.len;
        let mut hasher = Sha256::new();
        self.buf.resize(CHUNK, 0);
        let mut left = len;
        while left > 0 {
            let want = self
                .buf
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match r.read(&mut self.buf[..want]) {
                Ok(0) => Err(CopyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file's data ends early",
                ))),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(CopyError::Read(e)),
            }
            .and_then(|n| {
                hasher.update(&self.buf[..n]);
                self.w.write_all(&self.buf[..n]).map_err(CopyError::Write)?;
                Ok(n)
            });
            match n {
                Ok(n) => left -= n as u64,
                Err(e) => {
                    // Keep the index consistent with what reached the writer.
                    self.len = start + (len - left);
                    return Err(e);
                }
            }
        }
        let sha256: [u8; 32] = hasher.finalize().into();
        if let Some(&offset) = self.index.get(&sha256) {
            // Written for nothing: take it back.
            let mut rewind = || -> io::Result<()> {
                self.w.flush()?;
                self.w.get_ref().set_len(start)?;
                self.w.seek(SeekFrom::Start(start))?;
                Ok(())
            };
            rewind().map_err(CopyError::Write)?;
            return Ok(Content {
                offset,
                len,
                sha256,
            });
        }
        self.len = start + len;
        self.index.insert(sha256, start);
        Ok(Content {
            offset: start,
            len,
            sha256,
        })
    }

    /// Bytes stored so far.
    pub(crate) fn stored(&self) -> u64 {
        self.len
    }

    /// Ends writing; the spool is then read-only.
    pub(crate) fn finish(self) -> io::Result<Spool> {
        let file = self.w.into_inner().map_err(|e| e.into_error())?;
        Ok(Spool {
            file,
            len: self.len,
        })
    }
}

/// The finished spool.
#[derive(Debug)]
pub(crate) struct Spool {
    file: File,
    len: u64,
}

impl Spool {
    /// A reader of one content.
    pub(crate) fn open(&self, c: &Content) -> ContentReader<'_> {
        ContentReader {
            file: &self.file,
            pos: c.offset,
            end: c.offset + c.len,
        }
    }

    /// Bytes stored (each distinct content once).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

/// Reads one file's contents from the spool (positioned reads: several readers may be open
/// at once).
#[derive(Debug)]
pub struct ContentReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for ContentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..max], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spool file is shorter than its index says",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_small_and_large() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SpoolWriter::new(dir.path()).unwrap();
        let a = s.add(&b"hello"[..], 5).unwrap();
        let b = s.add(&b"hello"[..], 5).unwrap();
        assert_eq!(a, b);
        let big = vec![7u8; SMALL as usize + 10];
        let c = s.add(&big[..], big.len() as u64).unwrap();
        let d = s.add(&big[..], big.len() as u64).unwrap();
        assert_eq!(c, d);
        let e = s.add(&b"world"[..], 5).unwrap();
        assert_eq!(s.stored(), 10 + big.len() as u64);
        let err = s.add(&b"abc"[..], 4).unwrap_err();
        assert!(matches!(err, CopyError::Read(_)));
        let spool = s.finish().unwrap();
        let read = |c: &Content| {
            let mut v = Vec::new();
            spool.open(c).read_to_end(&mut v).unwrap();
            v
        };
        assert_eq!(read(&a), b"hello");
        assert_eq!(read(&d), big);
        assert_eq!(read(&e), b"world");
        // Nothing named is left in the spool directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
