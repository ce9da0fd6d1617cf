//! Reading a tar stream from an untrusted source (an image layer, a `docker-archive:` or
//! `oci-archive:` file): framing, pax and GNU extension headers, sparse files.
//!
//! `tar::Archive` is not used for the framing because it reads pax and GNU long-name records of
//! any size into memory (a layer can declare a multi-gigabyte pax header), ignores the pax
//! `mtime` and the pax sparse formats, and cannot tell a clean end of the archive from a
//! truncated one. This reader caps every extension record at [`MAX_SPECIAL`] (1 MiB, as Go's
//! `archive/tar`, which writes most layers, does), and still uses `tar::Header` to decode the
//! fixed header fields.

use std::collections::BTreeMap;
use std::io::{self, Read};

/// The largest pax record set, GNU long name or sparse map accepted for one entry.
pub(crate) const MAX_SPECIAL: u64 = 1 << 20;

const BLOCK: usize = 512;

/// The largest size the header's 11 octal digits can hold.
const MAX_OCTAL_SIZE: u64 = 0o77_777_777_777;

/// Errors of the framing: I/O (including the decompressor's) or a malformed archive.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Reading the stream failed.
    Io(io::Error),
    /// The archive is malformed; `path` is the entry's name as far as it is known.
    Invalid { path: Vec<u8>, why: String },
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

fn invalid(path: &[u8], why: impl Into<String>) -> ReadError {
    ReadError::Invalid {
        path: path.to_vec(),
        why: why.into(),
    }
}

/// The kind of an entry, with tar's extension headers already folded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryType {
    File,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

/// One member of the archive, with pax overrides applied.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The name as written (pax `path`, GNU long name or the header's name and prefix).
    pub path: Vec<u8>,
    pub kind: EntryType,
    /// Link target (hardlinks and symlinks), as written.
    pub link: Vec<u8>,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch (pax sub-second precision is truncated towards the past).
    pub mtime: i64,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// `SCHILY.xattr.NAME` records: name without the prefix, value.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The size of the file's contents (for a sparse file, its expanded size).
    pub size: u64,
    /// For a sparse file: the data chunks `(offset, length)`, in order; the stored data is
    /// their concatenation.
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// A tar reader over a decompressed stream.
pub(crate) struct TarReader<R> {
    r: R,
    /// Unread data bytes of the current entry.
    remaining: u64,
    /// Padding after the current entry's data.
    padding: u64,
    /// A faster way past unread data than reading it (a seek), which must fail as reading
    /// would when the stream ends first.
    skip_with: Option<fn(&mut R, u64) -> io::Result<()>>,
}

fn padding_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Decodes a numeric header field: octal, or the base-256 form (GNU and star), signed.
fn numeric(field: &[u8]) -> Option<i64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let negative = field[0] & 0x40 != 0;
        let mut v: i128 = (field[0] & 0x7f) as i128;
        if negative {
            v |= !0x7f;
        }
        for b in &field[1..] {
            v = v.checked_mul(256)? + *b as i128;
        }
        return i64::try_from(v).ok();
    }
    let s = field
        .iter()
        .position(|b| *b != b' ' && *b != 0)
        .map_or(&[][..], |i| &field[i..]);
    let end = s
        .iter()
        .position(|b| *b == b' ' || *b == 0)
        .unwrap_or(s.len());
    let s = &s[..end];
    if s.is_empty() {
        return Some(0);
    }
    let mut v: i64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add((b - b'0') as i64)?;
    }
    Some(v)
}

fn unsigned(field: &[u8]) -> Option<u64> {
    numeric(field).and_then(|v| u64::try_from(v).ok())
}

fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A pax time (`1234567890`, `1234567890.5`, `-1.25`), in whole seconds towards the past.
fn pax_time(v: &[u8]) -> Option<i64> {
    let (negative, v) = match v.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = match v.iter().position(|b| *b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = i64::try_from(decimal(int)?).ok()?;
    let has_frac = frac.iter().any(|b| *b != b'0');
    Some(match (negative, has_frac) {
        (false, _) => secs,
        (true, false) => -secs,
        (true, true) => -secs - 1,
    })
}

fn trim_nuls(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// The pax records that describe GNU sparse files.
#[derive(Default)]
struct PaxSparse {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    size: Option<Vec<u8>>,
    map: Option<Vec<u8>>,
    /// Format 0.0 spells the map as repeated `offset`/`numbytes` records.
    pairs: Vec<u8>,
}

impl<R: Read> TarReader<R> {
    pub(crate) fn new(r: R) -> Self {
        Self {
            r,
            remaining: 0,
            padding: 0,
            skip_with: None,
        }
    }

    /// A reader that skips unread data with `skip` instead of reading it.
    pub(crate) fn with_skip(r: R, skip: fn(&mut R, u64) -> io::Result<()>) -> Self {
        Self {
            skip_with: Some(skip),
            ..Self::new(r)
        }
    }

    /// The underlying stream, positioned after whatever was read.
    pub(crate) fn into_inner(self) -> R {
        self.r
    }

    /// Reads one block; `false` on a clean end of stream before it.
    fn read_block(&mut self, buf: &mut [u8; BLOCK]) -> io::Result<bool> {
        let mut n = 0;
        while n < BLOCK {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        match n {
            0 => Ok(false),
            BLOCK => Ok(true),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar stream ends inside a header",
            )),
        }
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        if let Some(skip) = self.skip_with.filter(|_| n > 0) {
            return skip(&mut self.r, n);
        }
        let skipped = io::copy(&mut (&mut self.r).take(n), &mut io::sink())?;
        if skipped < n {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar stream ends inside an entry",
            ));
        }
        Ok(())
    }

    /// Reads `size` bytes of an extension record (capped) and its padding.
    fn read_special(&mut self, size: u64, path: &[u8], what: &str) -> Result<Vec<u8>, ReadError> {
        if size > MAX_SPECIAL {
            return Err(invalid(
                path,
                format!("a {what} of {size} bytes (at most {MAX_SPECIAL} are accepted)"),
            ));
        }
        let mut data = vec![0u8; size as usize];
        self.r.read_exact(&mut data)?;
        self.skip(padding_of(size))?;
        Ok(data)
    }

    /// The next entry, or `None` at the end of the archive. The previous entry's unread data is
    /// skipped.
    pub(crate) fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut pax: Option<Vec<u8>> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut block = [0u8; BLOCK];
        let header = loop {
            let pending = pax.is_some() || long_name.is_some() || long_link.is_some();
            let pending_name = long_name.clone().unwrap_or_default();
            if !self.read_block(&mut block)? {
                if pending {
                    return Err(invalid(
                        &pending_name,
                        "the archive ends after an extension header",
                    ));
                }
                return Ok(None);
            }
            if block.iter().all(|b| *b == 0) {
                if pending {
                    return Err(invalid(
                        &pending_name,
                        "an extension header describes no entry",
                    ));
                }
                // The end of the archive is two zero blocks; a lone zero block at the end of
                // the stream is accepted (as Go's reader does), one followed by a header is not.
                if self.read_block(&mut block)? && block.iter().any(|b| *b != 0) {
                    return Err(invalid(b"", "a header follows the end-of-archive marker"));
                }
                return Ok(None);
            }
            let h = tar::Header::from_byte_slice(&block).clone();
            let stored = unsigned(&h.as_old().cksum);
            let unsigned_sum: u32 = block[..148]
                .iter()
                .chain(&block[156..])
                .map(|b| *b as u32)
                .sum::<u32>()
                + 8 * b' ' as u32;
            // Some historic writers summed signed bytes; Go and GNU tar accept both.
            let signed_sum: i64 = block[..148]
                .iter()
                .chain(&block[156..])
                .map(|b| *b as i8 as i64)
                .sum::<i64>()
                + 8 * b' ' as i64;
            if stored != Some(unsigned_sum as u64) && stored.map(|s| s as i64) != Some(signed_sum) {
                return Err(invalid(&h.path_bytes(), "header checksum mismatch"));
            }
            let size = unsigned(&h.as_old().size)
                .ok_or_else(|| invalid(&h.path_bytes(), "invalid size field"))?;
            match h.entry_type().as_byte() {
                b'x' => {
                    if pax.is_some() {
                        return Err(invalid(&h.path_bytes(), "two pax headers for one entry"));
                    }
                    pax = Some(self.read_special(size, &h.path_bytes(), "pax header")?);
                }
                b'g' => {
                    // Global pax records: ignored, as containerd and docker do (git archive
                    // writes one with a commit id).
                    self.read_special(size, &h.path_bytes(), "pax global header")?;
                }
                b'L' => {
                    if long_name.is_some() {
                        return Err(invalid(&h.path_bytes(), "two long names for one entry"));
                    }
                    let v = self.read_special(size, &h.path_bytes(), "GNU long name")?;
                    long_name = Some(trim_nuls(v));
                }
                b'K' => {
                    if long_link.is_some() {
                        return Err(invalid(
                            &h.path_bytes(),
                            "two long link names for one entry",
                        ));
                    }
                    let v = self.read_special(size, &h.path_bytes(), "GNU long link name")?;
                    long_link = Some(trim_nuls(v));
                }
                _ => break h,
            }
        };

        let mut path = long_name.unwrap_or_else(|| header.path_bytes().into_owned());
        let mut link = long_link.unwrap_or_else(|| {
            header
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default()
        });
        let old = header.as_old();
        let bad = |path: &[u8], field: &str| invalid(path, format!("invalid {field} field"));
        let mut size = unsigned(&old.size).ok_or_else(|| bad(&path, "size"))?;
        let mode = unsigned(&old.mode).ok_or_else(|| bad(&path, "mode"))?;
        let mut uid = unsigned(&old.uid).ok_or_else(|| bad(&path, "uid"))?;
        let mut gid = unsigned(&old.gid).ok_or_else(|| bad(&path, "gid"))?;
        let mut mtime = numeric(&old.mtime).ok_or_else(|| bad(&path, "mtime"))?;
        let (mut dev_major, mut dev_minor) = (0, 0);
        if let Some(u) = header.as_ustar() {
            dev_major = unsigned(&u.dev_major)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(&path, "device major"))?;
            dev_minor = unsigned(&u.dev_minor)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(&path, "device minor"))?;
        } else if let Some(g) = header.as_gnu() {
            dev_major = unsigned(&g.dev_major)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(&path, "device major"))?;
            dev_minor = unsigned(&g.dev_minor)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| bad(&path, "device minor"))?;
        }

        let mut xattrs = BTreeMap::new();
        let mut ps = PaxSparse::default();
        let header_size = size;
        if let Some(records) = &pax {
            for rec in tar::PaxExtensions::new(records) {
                let rec = rec.map_err(|_| invalid(&path, "malformed pax record"))?;
                let (k, v) = (rec.key_bytes(), rec.value_bytes());
                let num = |what: &str| decimal(v).ok_or_else(|| bad(&path, what));
                match k {
                    b"path" => path = v.to_vec(),
                    b"linkpath" => link = v.to_vec(),
                    b"size" => size = num("pax size")?,
                    b"uid" => uid = num("pax uid")?,
                    b"gid" => gid = num("pax gid")?,
                    b"mtime" => mtime = pax_time(v).ok_or_else(|| bad(&path, "pax mtime"))?,
                    b"GNU.sparse.major" => ps.major = Some(v.to_vec()),
                    b"GNU.sparse.minor" => ps.minor = Some(v.to_vec()),
                    b"GNU.sparse.name" => ps.name = Some(v.to_vec()),
                    b"GNU.sparse.size" | b"GNU.sparse.realsize" => ps.size = Some(v.to_vec()),
                    b"GNU.sparse.map" => ps.map = Some(v.to_vec()),
                    b"GNU.sparse.offset" | b"GNU.sparse.numbytes" => {
                        if !ps.pairs.is_empty() {
                            ps.pairs.push(b',');
                        }
                        ps.pairs.extend_from_slice(v);
                    }
                    _ => {
                        if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                            xattrs.insert(name.to_vec(), v.to_vec());
                        }
                    }
                }
            }
        }

        if size != header_size && size <= MAX_OCTAL_SIZE {
            // Writers put a size in a pax record only when the header's field cannot hold it
            // (and zero that field). A pax size that disagrees with a field that could hold it
            // makes readers that honour pax (this one, Go's, GNU tar) and readers that do not
            // see different members in the same bytes: refused rather than picking a side.
            return Err(invalid(
                &path,
                format!("its pax size {size} disagrees with the size field of its header ({header_size})"),
            ));
        }

        if path.contains(&0) || link.contains(&0) {
            // No filesystem can hold it, and a ustar field would cut it short.
            return Err(invalid(&path, "a name or link target with a NUL byte"));
        }

        let typeflag = header.entry_type().as_byte();
        let kind = match typeflag {
            b'0' | b'7' | b'S' => EntryType::File,
            // Pre-POSIX archives mark directories by a trailing slash only.
            0 if path.ends_with(b"/") => EntryType::Dir,
            0 => EntryType::File,
            b'1' => EntryType::Hardlink,
            b'2' => EntryType::Symlink,
            b'3' => EntryType::Char,
            b'4' => EntryType::Block,
            b'5' => EntryType::Dir,
            b'6' => EntryType::Fifo,
            other => {
                return Err(invalid(
                    &path,
                    format!("unsupported tar entry type {:?}", other as char),
                ))
            }
        };

        let mut sparse = None;
        let mut stored = size;
        if typeflag == b'S' {
            let (map, real) = self.old_gnu_sparse(&header, &path)?;
            sparse = Some(map);
            size = real;
        } else if kind == EntryType::File
            && (ps.major.is_some()
                || ps.minor.is_some()
                || ps.map.is_some()
                || !ps.pairs.is_empty())
        {
            if let Some(name) = ps.name.take() {
                path = name;
            }
            let real = ps
                .size
                .as_deref()
                .and_then(decimal)
                .ok_or_else(|| invalid(&path, "a pax sparse file without a valid real size"))?;
            let version = (ps.major.as_deref(), ps.minor.as_deref());
            let map = match version {
                (Some(b"1"), Some(b"0")) => {
                    let (map, used) = self.sparse_map_1_0(size, &path)?;
                    stored = size - used;
                    map
                }
                (Some(b"0"), Some(b"0" | b"1")) | (None, None) => {
                    let text = ps.map.take().unwrap_or(ps.pairs);
                    parse_map_0x(&text).ok_or_else(|| invalid(&path, "malformed pax sparse map"))?
                }
                _ => {
                    return Err(invalid(
                        &path,
                        format!(
                            "unsupported pax sparse format {}.{}",
                            String::from_utf8_lossy(ps.major.as_deref().unwrap_or(b"?")),
                            String::from_utf8_lossy(ps.minor.as_deref().unwrap_or(b"?")),
                        ),
                    ))
                }
            };
            sparse = Some(map);
            size = real;
        }
        if let Some(map) = &sparse {
            check_sparse_map(map, size, stored).map_err(|why| invalid(&path, why))?;
        }

        // Data of non-files (a hardlink with contents, a directory with a GNU dump list) is
        // skipped.
        self.remaining = stored;
        // A 1.0 sparse map took whole blocks, so the padding depends on the stored data only.
        self.padding = padding_of(stored);
        Ok(Some(Entry {
            path,
            kind,
            link,
            mode: (mode & 0o7777) as u32,
            uid,
            gid,
            mtime,
            dev_major,
            dev_minor,
            xattrs,
            size: if kind == EntryType::File { size } else { 0 },
            sparse,
        }))
    }

    /// The old GNU sparse format: the map is in the header and in extension blocks that follow
    /// it, before the data.
    fn old_gnu_sparse(
        &mut self,
        header: &tar::Header,
        path: &[u8],
    ) -> Result<(Vec<(u64, u64)>, u64), ReadError> {
        let gnu = header
            .as_gnu()
            .ok_or_else(|| invalid(path, "a GNU sparse entry without a GNU header"))?;
        let mut map = Vec::new();
        let bad = || invalid(path, "malformed GNU sparse map");
        let mut push = |offset: &[u8], numbytes: &[u8]| -> Result<(), ReadError> {
            if offset[0] == 0 {
                return Ok(());
            }
            map.push((
                unsigned(offset).ok_or_else(bad)?,
                unsigned(numbytes).ok_or_else(bad)?,
            ));
            Ok(())
        };
        for s in &gnu.sparse {
            push(&s.offset, &s.numbytes)?;
        }
        let real = unsigned(&gnu.realsize).ok_or_else(bad)?;
        let mut extended = gnu.is_extended();
        let mut blocks = 0u64;
        let mut block = [0u8; BLOCK];
        while extended {
            blocks += 1;
            if blocks * BLOCK as u64 > MAX_SPECIAL {
                return Err(invalid(path, "a GNU sparse map larger than 1 MiB"));
            }
            if !self.read_block(&mut block)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the tar stream ends inside a sparse map",
                )
                .into());
            }
            for i in 0..21 {
                let e = &block[i * 24..i * 24 + 24];
                push(&e[..12], &e[12..])?;
            }
            extended = block[504] != 0;
        }
        Ok((map, real))
    }

    /// The pax sparse format 1.0: the map is at the start of the data, in decimal lines, padded
    /// to a block. Returns the map and the bytes it took.
    fn sparse_map_1_0(
        &mut self,
        size: u64,
        path: &[u8],
    ) -> Result<(Vec<(u64, u64)>, u64), ReadError> {
        let mut text = Vec::new();
        let mut used = 0u64;
        let mut numbers = Vec::new();
        let mut pos = 0;
        let mut block = [0u8; BLOCK];
        let mut want: Option<u64> = None;
        loop {
            // Parse whole lines from what has been read so far.
            while let Some(nl) = text[pos..].iter().position(|b| *b == b'\n') {
                let n = decimal(&text[pos..pos + nl])
                    .ok_or_else(|| invalid(path, "malformed pax sparse map"))?;
                pos += nl + 1;
                match want {
                    None => {
                        want = Some(
                            n.checked_mul(2)
                                .ok_or_else(|| invalid(path, "malformed pax sparse map"))?,
                        )
                    }
                    Some(_) => numbers.push(n),
                }
                if want == Some(numbers.len() as u64) {
                    let map = numbers.chunks(2).map(|c| (c[0], c[1])).collect();
                    return Ok((map, used));
                }
            }
            if used + BLOCK as u64 > size || used + BLOCK as u64 > MAX_SPECIAL {
                return Err(invalid(path, "malformed or oversized pax sparse map"));
            }
            if !self.read_block(&mut block)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the tar stream ends inside a sparse map",
                )
                .into());
            }
            used += BLOCK as u64;
            text.extend_from_slice(&block);
        }
    }
}

/// `offset,length,offset,length,...` (formats 0.0 and 0.1).
fn parse_map_0x(text: &[u8]) -> Option<Vec<(u64, u64)>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    let nums: Vec<u64> = text
        .split(|b| *b == b',')
        .map(decimal)
        .collect::<Option<_>>()?;
    if !nums.len().is_multiple_of(2) {
        return None;
    }
    Some(nums.chunks(2).map(|c| (c[0], c[1])).collect())
}

/// Chunks must be in order, must not overlap, must stay inside the file, and must account for
/// exactly the stored data.
fn check_sparse_map(map: &[(u64, u64)], real: u64, stored: u64) -> Result<(), &'static str> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(offset, len) in map {
        if offset < end {
            return Err("sparse chunks overlap or are out of order");
        }
        end = offset.checked_add(len).ok_or("a sparse chunk overflows")?;
        if end > real {
            return Err("a sparse chunk lies past the end of the file");
        }
        total += len;
    }
    if total != stored {
        return Err("the sparse map does not match the stored data");
    }
    Ok(())
}

/// Reads the current entry's stored data.
impl<R: Read> Read for TarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.r.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar stream ends inside an entry",
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Expands a sparse file: its stored chunks at their offsets, zeros in the holes.
pub(crate) struct SparseReader<'a, R> {
    inner: R,
    map: &'a [(u64, u64)],
    size: u64,
    pos: u64,
}

impl<'a, R: Read> SparseReader<'a, R> {
    pub(crate) fn new(inner: R, map: &'a [(u64, u64)], size: u64) -> Self {
        Self {
            inner,
            map,
            size,
            pos: 0,
        }
    }
}

impl<R: Read> Read for SparseReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(&(offset, len)) = self.map.first() {
            if offset + len <= self.pos {
                self.map = &self.map[1..];
            } else {
                break;
            }
        }
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let clamp = |n: u64| buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        match self.map.first() {
            Some(&(offset, len)) if self.pos >= offset => {
                let max = clamp(offset + len - self.pos);
                let n = self.inner.read(&mut buf[..max])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the tar stream ends inside a sparse file",
                    ));
                }
                self.pos += n as u64;
                Ok(n)
            }
            next => {
                let hole_end = next.map_or(self.size, |c| c.0);
                let n = clamp(hole_end - self.pos);
                buf[..n].fill(0);
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(numeric(b"0000755\0"), Some(0o755));
        assert_eq!(numeric(b"  755 \0"), Some(0o755));
        assert_eq!(numeric(b"\0\0\0\0"), Some(0));
        assert_eq!(numeric(b"0000789\0"), None);
        assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(numeric(&[0xff; 12]), Some(-1));
        assert_eq!(pax_time(b"1700000000.999"), Some(1_700_000_000));
        assert_eq!(pax_time(b"-1.5"), Some(-2));
        assert_eq!(pax_time(b"-3"), Some(-3));
        assert_eq!(pax_time(b"12x"), None);
    }

    #[test]
    fn sparse_expansion() {
        let map = [(2, 3), (8, 2)];
        let mut out = Vec::new();
        SparseReader::new(&b"abcde"[..], &map, 12)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"\0\0abc\0\0\0de\0\0");
        assert!(check_sparse_map(&map, 12, 5).is_ok());
        assert!(check_sparse_map(&map, 9, 5).is_err());
        assert!(check_sparse_map(&[(4, 2), (3, 1)], 12, 3).is_err());
        assert!(check_sparse_map(&map, 12, 6).is_err());
    }
}
