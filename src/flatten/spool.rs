//! The spool: regular-file contents of a tree, in one append-only temporary file.
//!
//! One file rather than one file per content: a layer holds tens of thousands of small files,
//! and one file costs one `open` for the whole image instead of an `open`, `write` and `close`
//! per content (and as many inodes in the cache). Contents are deduplicated (see
//! [`SpoolWriter`]), so a file rewritten unchanged by a later layer, or present in several
//! layers, is stored once.
//! The file is anonymous (`O_TMPFILE` where the kernel has it, else unlinked at once), so it
//! disappears with the tree, even if the process is killed; it is never fsynced (it is scratch
//! data) and never named by an image path.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use xxhash_rust::xxh3::{xxh3_128, Xxh3};

/// Contents up to this size are read into memory first, so that a duplicate costs no write.
const SMALL: u64 = 1 << 20;
/// Copy buffer for larger contents.
const CHUNK: usize = 256 * 1024;

/// A regular file's contents, stored in the spool. Two contents are equal when they
/// have the same size and XXH3-128, wherever they are stored: a check for tests and tools
/// comparing trees, not a proof against crafted collisions (the spool compares bytes before
/// it shares a copy).
#[derive(Debug, Clone, Copy)]
pub struct Content {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) hash: u128,
}

impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.hash == other.hash
    }
}

impl Eq for Content {}

impl std::hash::Hash for Content {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.len.hash(state);
        self.hash.hash(state);
    }
}

impl Content {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why copying a content failed: reading the layer or writing the spool.
#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// The spool while a tree is being built.
///
/// Contents are indexed by length and XXH3-128, which costs a tenth of a sha256 (the layer's
/// bytes are already hashed once for the DiffID). A non-cryptographic hash can be made to
/// collide on purpose, so a hit is only taken after the stored bytes compare equal: two
/// different contents never share a copy.
pub(crate) struct SpoolWriter {
    w: BufWriter<File>,
    len: u64,
    index: HashMap<(u64, u128), u64>,
    buf: Vec<u8>,
    other: Vec<u8>,
}

impl SpoolWriter {
    /// A new, empty spool in `dir`.
    pub(crate) fn new(dir: &Path) -> io::Result<Self> {
        Ok(Self {
            w: BufWriter::with_capacity(CHUNK, tempfile::tempfile_in(dir)?),
            len: 0,
            index: HashMap::new(),
            buf: Vec::new(),
            other: Vec::new(),
        })
    }

    /// Stores exactly `len` bytes read from `r`.
    pub(crate) fn add(&mut self, mut r: impl Read, len: u64) -> Result<Content, CopyError> {
        if len <= SMALL {
            self.buf.resize(len as usize, 0);
            r.read_exact(&mut self.buf).map_err(CopyError::Read)?;
            let hash = xxh3_128(&self.buf);
            if let Some(&offset) = self.index.get(&(len, hash)) {
                if self.stored_equals(offset, None).map_err(CopyError::Write)? {
                    return Ok(Content { offset, len, hash });
                }
            }
            let offset = self.len;
            self.w.write_all(&self.buf).map_err(CopyError::Write)?;
            self.len += len;
            self.index.entry((len, hash)).or_insert(offset);
            return Ok(Content { offset, len, hash });
        }
        let start = self.len;
        let mut hasher = Xxh3::new();
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
        self.len = start + len;
        let hash = hasher.digest128();
        if let Some(&offset) = self.index.get(&(len, hash)) {
            if self
                .stored_equals(offset, Some(start))
                .map_err(CopyError::Write)?
            {
                // Written for nothing: take it back.
                self.w.get_ref().set_len(start).map_err(CopyError::Write)?;
                self.w
                    .seek(SeekFrom::Start(start))
                    .map_err(CopyError::Write)?;
                self.len = start;
                return Ok(Content { offset, len, hash });
            }
        }
        self.index.entry((len, hash)).or_insert(start);
        Ok(Content {
            offset: start,
            len,
            hash,
        })
    }

    /// Whether the stored content at `offset` holds the same bytes as the one just read: the
    /// small content in `buf` (`new` is `None`), or the one just written from `new` to the
    /// spool's end. Both have the same length, the index's key.
    fn stored_equals(&mut self, offset: u64, new: Option<u64>) -> io::Result<bool> {
        self.w.flush()?;
        let file = self.w.get_ref();
        match new {
            None => {
                self.other.resize(self.buf.len(), 0);
                file.read_exact_at(&mut self.other, offset)?;
                Ok(self.other == self.buf)
            }
            Some(new) => {
                let total = self.len - new;
                self.other.resize(CHUNK, 0);
                self.buf.resize(CHUNK, 0);
                let mut done = 0;
                while done < total {
                    let n = (total - done).min(CHUNK as u64) as usize;
                    file.read_exact_at(&mut self.buf[..n], new + done)?;
                    file.read_exact_at(&mut self.other[..n], offset + done)?;
                    if self.buf[..n] != self.other[..n] {
                        return Ok(false);
                    }
                    done += n as u64;
                }
                Ok(true)
            }
        }
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

    /// Another handle on the spool file, for positioned reads from other threads.
    pub(crate) fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
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

    /// A hash collision (forged here in the index) never shares a copy: the bytes are
    /// compared first, and the new content gets its own.
    #[test]
    fn colliding_hashes_keep_both_contents() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SpoolWriter::new(dir.path()).unwrap();
        let small = s.add(&b"hello"[..], 5).unwrap();
        s.index.insert((5, xxh3_128(b"world")), small.offset);
        let world = s.add(&b"world"[..], 5).unwrap();
        assert_ne!(world.offset, small.offset);

        let big_a = vec![1u8; SMALL as usize + 3];
        let mut big_b = big_a.clone();
        *big_b.last_mut().unwrap() = 2;
        let a = s.add(&big_a[..], big_a.len() as u64).unwrap();
        s.index
            .insert((big_b.len() as u64, xxh3_128(&big_b)), a.offset);
        let b = s.add(&big_b[..], big_b.len() as u64).unwrap();
        assert_ne!(b.offset, a.offset);
        // A true duplicate is still shared.
        let again = s.add(&big_a[..], big_a.len() as u64).unwrap();
        assert_eq!(again.offset, a.offset);
        assert_eq!(s.stored(), 10 + 2 * big_a.len() as u64);

        let spool = s.finish().unwrap();
        let read = |c: &Content| {
            let mut v = Vec::new();
            spool.open(c).read_to_end(&mut v).unwrap();
            v
        };
        assert_eq!(read(&small), b"hello");
        assert_eq!(read(&world), b"world");
        assert_eq!(read(&a), big_a);
        assert_eq!(read(&b), big_b);
    }
}
