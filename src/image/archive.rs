//! Reading image archives (`docker-archive:`, `oci-archive:`): members streamed once through
//! the hardened tar reader, named safely, and never extracted.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::ops::ControlFlow;
use std::path::Path;

use oci_spec::image::Digest;

use crate::cache::Hasher;
use crate::oci::Compression;
use crate::tar::{EntryType, ReadError, TarReader};

/// The digest of an OCI-layout style member name, `blobs/<alg>/<hex>`, if it is one with an
/// algorithm the cache can verify.
pub(crate) fn blob_name_digest(name: &str) -> Option<Digest> {
    let mut parts = name.split('/').filter(|p| !p.is_empty() && *p != ".");
    let (Some("blobs"), Some(alg), Some(hex), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let d: Digest = format!("{alg}:{hex}").parse().ok()?;
    Hasher::for_digest(&d).ok().map(|_| d)
}

/// What a tar member is, as far as reading an image archive cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link, with its target as written.
    Symlink(String),
    /// A hard link, with the archive path of its target as written.
    Hardlink(String),
    /// Anything else (devices, fifos, names that are not UTF-8).
    Other,
}

/// One member of an archive, as the scan hands it over.
pub(crate) struct Member<'a> {
    /// Its position among the members (stable across scans of the same archive).
    pub index: usize,
    /// Its path, normalised: relative, no `.` or empty components.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Its size in bytes (regular files).
    pub size: u64,
    /// Its contents; what the visitor does not read is skipped.
    pub data: &'a mut dyn Read,
}

/// Errors of [`scan_archive`], for the caller to wrap.
#[derive(Debug)]
pub(crate) enum ScanError<E> {
    /// Reading the archive failed.
    Io(io::Error),
    /// A member has an absolute path or `..` in its path.
    Unsafe(String),
    /// From the visitor.
    Visit(E),
}

/// Streams the tar archive at `path` (plain, gzip or zstd; seeking over unread contents
/// when it is plain) with the hardened reader of [`crate::tar`] and hands each member to
/// `visit`, which may stop the scan. Members with an absolute path or a `..` component are
/// refused; the root entry is skipped. A malformed archive (an oversized extension record, a
/// member cut short) is an [`io::ErrorKind::InvalidData`] or
/// [`io::ErrorKind::UnexpectedEof`] error.
pub(crate) fn scan_archive<E>(
    path: &Path,
    mut visit: impl FnMut(Member<'_>) -> Result<ControlFlow<()>, E>,
) -> Result<(), ScanError<E>> {
    let mut file = File::open(path).map_err(ScanError::Io)?;
    let mut head = [0u8; 4];
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ScanError::Io(e)),
        }
    }
    file.rewind().map_err(ScanError::Io)?;
    let reader = BufReader::with_capacity(64 * 1024, file);
    match Compression::sniff(&head[..n]) {
        Some(Compression::Gzip) => walk(
            TarReader::new(flate2::read::MultiGzDecoder::new(reader)),
            &mut visit,
        ),
        Some(Compression::Zstd) => {
            let dec = zstd::Decoder::with_buffer(reader).map_err(ScanError::Io)?;
            walk(TarReader::new(dec), &mut visit)
        }
        _ => walk(TarReader::with_skip(reader, seek_over), &mut visit),
    }
}

/// Skips `n` bytes of a plain archive by seeking, refusing to seek past its end (which a
/// seek alone would allow, hiding a truncated member).
fn seek_over(r: &mut BufReader<File>, n: u64) -> io::Result<()> {
    let pos = r.stream_position()?;
    let len = r.get_ref().metadata()?.len();
    if pos.saturating_add(n) > len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the tar stream ends inside an entry",
        ));
    }
    let n = i64::try_from(n).map_err(io::Error::other)?;
    r.seek_relative(n)
}

fn walk<R: Read, E>(
    mut tar: TarReader<R>,
    visit: &mut impl FnMut(Member<'_>) -> Result<ControlFlow<()>, E>,
) -> Result<(), ScanError<E>> {
    let mut index = 0;
    loop {
        let entry = match tar.next_entry() {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(()),
            Err(ReadError::Io(e)) => return Err(ScanError::Io(e)),
            Err(ReadError::Invalid { path, why }) => {
                return Err(ScanError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the archive has a malformed tar entry {:?}: {why}",
                        String::from_utf8_lossy(&path)
                    ),
                )))
            }
        };
        let position = index;
        index += 1;
        let name = match member_name(&entry.path) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(()) => {
                return Err(ScanError::Unsafe(
                    String::from_utf8_lossy(&entry.path).into_owned(),
                ))
            }
        };
        let link = || String::from_utf8(entry.link.clone()).ok();
        let kind = match entry.kind {
            // A sparse file's stored data is not its contents; no image archive holds one.
            EntryType::File if entry.sparse.is_none() => Kind::File,
            EntryType::Dir => Kind::Dir,
            EntryType::Symlink => link().map_or(Kind::Other, Kind::Symlink),
            EntryType::Hardlink => link().map_or(Kind::Other, Kind::Hardlink),
            _ => Kind::Other,
        };
        let size = if kind == Kind::File { entry.size } else { 0 };
        let flow = visit(Member {
            index: position,
            name,
            kind,
            size,
            data: &mut tar,
        })
        .map_err(ScanError::Visit)?;
        if flow.is_break() {
            return Ok(());
        }
    }
}

/// Normalises a member path: `Ok(None)` for the root entry and for names that are not
/// UTF-8 (no JSON document can name them), `Err` for absolute paths and `..` components.
pub(crate) fn member_name(raw: &[u8]) -> Result<Option<String>, ()> {
    let Ok(s) = std::str::from_utf8(raw) else {
        return Ok(None);
    };
    if s.starts_with('/') {
        return Err(());
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(()),
            c => parts.push(c),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Reads a whole member of `size` bytes if it is at most `cap`; `Ok(None)` if larger.
pub(crate) fn read_member(data: &mut dyn Read, size: u64, cap: u64) -> io::Result<Option<Vec<u8>>> {
    if size > cap {
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(size as usize);
    data.take(cap + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("a member ends after {} of its {size} bytes", buf.len()),
        ));
    }
    Ok(Some(buf))
}
