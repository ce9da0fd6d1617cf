//! The flattened [`Tree`] as a SquashFS 4.0 image (written with the `backhand` crate), the
//! read-only root of `--rootfs squashfs`: the initramfs then holds the init, the config, the
//! modules and this one file ([`ROOT_IMAGE_PATH`]), which the init mounts through a loop device
//! under a tmpfs overlay.
//!
//! What the image keeps of the tree:
//! - every path but the root's own [`PRIVATE_DIR`](super::PRIVATE_DIR) (oci2uk's, as in the
//!   initramfs), with its type, permission bits (setuid, setgid and sticky too), uid, gid and
//!   mtime (clamped to `SOURCE_DATE_EPOCH` and to the format's unsigned 32 bits); the root
//!   directory's mode and owner (its mtime is 0: the writer has no setter for it);
//! - regular files, directories, symlinks, character and block devices (numbers as Linux's
//!   `new_encode_dev`), fifos;
//! - contents compressed in blocks of [`BLOCK_SIZE`] with zstd (or xz), tails packed into
//!   fragments, all-zero blocks stored as holes, identical multi-block files stored once.
//!
//! What it does not keep, because the writer cannot yet write it:
//! - hard links: each path of a hardlink group is its own inode with `nlink` 1; the contents
//!   are stored once (deduplicated) when they fill at least one block, else once per path.
//!   Counted in [`SquashfsStats::split_hardlinks`].
//! - extended attributes (file capabilities among them): dropped and counted in
//!   [`SquashfsStats::dropped_xattrs`], as the newc initramfs drops them.
//!
//! The bytes depend on the tree and the options alone: entries are added in the tree's sorted
//! order, the superblock time is `SOURCE_DATE_EPOCH` or 0, a block's compressed form depends
//! on its bytes alone whichever thread made it (see `parallel`), and the file is cut to the
//! length the writer reports (its deduplication may leave bytes past the end).
//!
//! Memory: the writer holds one node per path (its path, header and a reader of the spool)
//! and the compressed inode and directory tables until the end; contents stream from the
//! spool one block at a time (and at most `parallel::WINDOW` blocks ahead of the writer). So it
//! grows with the number of paths (a few hundred bytes each), not with the image's size.

mod parallel;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use backhand::compression::{CompressionOptions, Compressor, Zstd};
use backhand::kind::Kind as SquashKind;
use backhand::{BackhandError, FilesystemCompressor, FilesystemWriter, NodeHeader};

use super::{is_private, lossy, RootfsError};
use crate::flatten::{InodeId, Kind, Tree};
use parallel::Ahead;

pub use oci2uk_config::guest::ROOT_IMAGE_PATH;

/// The modules the init needs to mount the root image: the loop device, the file system and
/// the overlay that makes it writable.
pub const MODULES: &[&str] = &["loop", "squashfs", "overlay"];

/// The data block size: mksquashfs's default. Larger blocks compress a little better but make
/// every random read decompress more, into page cache the guest pays for.
pub const BLOCK_SIZE: u32 = 128 * 1024;

/// The compression of the image's blocks and tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SquashCompression {
    /// zstd (`CONFIG_SQUASHFS_ZSTD`, Linux >= 4.14): fast to decompress.
    Zstd,
    /// xz (`CONFIG_SQUASHFS_XZ`): smaller, several times slower to decompress.
    Xz,
}

/// Options of the SquashFS image.
#[derive(Debug, Clone)]
pub struct SquashfsOptions {
    /// The compression.
    pub compression: SquashCompression,
    /// The compression level (zstd 1 to 22, xz 0 to 9); `None` for 3 (zstd: level 15 compresses the
    /// nginx tree 6% smaller but takes 14 times as long) or 6 (xz).
    pub level: Option<u32>,
    /// `SOURCE_DATE_EPOCH`: later mtimes are written as this one; also the image's time.
    pub source_date_epoch: Option<i64>,
}

impl Default for SquashfsOptions {
    fn default() -> Self {
        Self {
            compression: SquashCompression::Zstd,
            level: None,
            source_date_epoch: None,
        }
    }
}

/// What a SquashFS image holds and weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SquashfsStats {
    /// Paths in the image, the root not counted.
    pub entries: u64,
    /// Regular files, a hardlink group counted once.
    pub files: u64,
    /// Bytes of regular-file contents, each inode once.
    pub content_size: u64,
    /// Size of the image.
    pub image_size: u64,
    /// Paths written as separate files although they are hard links of an earlier path.
    pub split_hardlinks: u64,
    /// Inodes whose extended attributes were dropped.
    pub dropped_xattrs: u64,
}

fn squash_err(e: BackhandError) -> RootfsError {
    match e {
        BackhandError::StdIo(e) => RootfsError::Io(e),
        other => RootfsError::Io(io::Error::other(format!(
            "writing the SquashFS image: {other}"
        ))),
    }
}

/// Writes `tree` as a SquashFS image into `file` (from its start; the file is cut to the
/// image's length).
pub fn write_squashfs(
    tree: &Tree,
    opts: &SquashfsOptions,
    file: &mut File,
) -> Result<SquashfsStats, RootfsError> {
    write_squashfs_with(tree, opts, file, true).map(|(stats, _)| stats)
}

/// [`write_squashfs`], with zstd blocks compressed ahead on other threads or not (`ahead`),
/// and how that went.
fn write_squashfs_with(
    tree: &Tree,
    opts: &SquashfsOptions,
    file: &mut File,
    ahead: bool,
) -> Result<(SquashfsStats, parallel::AheadStats), RootfsError> {
    let mut fs = FilesystemWriter::default();
    fs.set_block_size(BLOCK_SIZE);
    let time = opts.source_date_epoch.unwrap_or(0);
    fs.set_time(time.clamp(0, u32::MAX as i64) as u32);
    let compressor = match opts.compression {
        SquashCompression::Zstd => FilesystemCompressor::new(
            Compressor::Zstd,
            Some(CompressionOptions::Zstd(Zstd {
                compression_level: opts.level.unwrap_or(3),
            })),
        ),
        SquashCompression::Xz => {
            let mut c = FilesystemCompressor::new(Compressor::Xz, None).map_err(squash_err)?;
            if let Some(level) = opts.level {
                let mut extra = backhand::ExtraXz::default();
                extra.level(level).map_err(squash_err)?;
                c.extra(backhand::CompressionExtra::Xz(extra))
                    .map_err(squash_err)?;
            }
            Ok(c)
        }
    }
    .map_err(squash_err)?;
    fs.set_compressor(compressor);

    let clamp = |t: i64| {
        let t = opts.source_date_epoch.map_or(t, |e| t.min(e));
        t.clamp(0, u32::MAX as i64) as u32
    };
    let root = tree.root().inode;
    let (ruid, rgid) = ids(b"", root.uid, root.gid)?;
    fs.set_root_mode((root.mode & 0o7777) as u16);
    fs.set_root_uid(ruid);
    fs.set_root_gid(rgid);

    let mut stats = SquashfsStats::default();
    let mut seen: HashSet<InodeId> = HashSet::new();
    for e in tree.entries().filter(|e| !is_private(e.path)) {
        let inode = e.inode;
        let (uid, gid) = ids(e.path, inode.uid, inode.gid)?;
        // Linux symlinks are always 0777, whatever the layer said.
        let perm = match inode.kind {
            Kind::Symlink(_) => 0o777,
            _ => inode.mode & 0o7777,
        };
        let header = NodeHeader::new(perm as u16, uid, gid, clamp(inode.mtime));
        let path = Path::new(OsStr::from_bytes(e.path));
        stats.entries += 1;
        let first = seen.insert(e.id);
        if first && !inode.xattrs.is_empty() {
            stats.dropped_xattrs += 1;
        }
        let pushed = match &inode.kind {
            Kind::Dir => fs.push_dir(path, header),
            Kind::File(c) => {
                if first {
                    stats.files += 1;
                    stats.content_size += c.len();
                } else {
                    stats.split_hardlinks += 1;
                }
                fs.push_file(tree.open(c), path, header)
            }
            Kind::Symlink(target) => {
                if target.len() >= super::PATH_MAX {
                    return Err(RootfsError::SymlinkTooLong {
                        path: lossy(e.path),
                        len: target.len(),
                    });
                }
                fs.push_symlink(PathBuf::from(OsStr::from_bytes(target)), path, header)
            }
            Kind::CharDevice { major, minor } => {
                fs.push_char_device(encode_dev(*major, *minor), path, header)
            }
            Kind::BlockDevice { major, minor } => {
                fs.push_block_device(encode_dev(*major, *minor), path, header)
            }
            Kind::Fifo => fs.push_fifo(path, header),
        };
        pushed.map_err(|err| match err {
            BackhandError::StdIo(e) => RootfsError::Io(e),
            other => RootfsError::Io(io::Error::other(format!(
                "adding /{} to the SquashFS image: {other}",
                lossy(e.path)
            ))),
        })?;
    }

    // zstd blocks are compressed ahead of the writer on every core (see `parallel`).
    let ahead = match opts.compression {
        SquashCompression::Zstd if ahead => {
            let level = opts.level.unwrap_or(3) as i32;
            let a = Ahead::leak(level, tree.spool_file()?, predicted_blocks(tree));
            fs.set_kind(SquashKind::new_v4(a));
            Some(a)
        }
        _ => None,
    };
    let workers = match ahead {
        Some(_) => std::thread::available_parallelism().map_or(1, |n| n.get().clamp(2, 9) - 1),
        None => 0,
    };
    file.rewind()?;
    let written = std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| ahead.expect("workers only with a compressor").work());
        }
        let mut w = BufWriter::with_capacity(1 << 20, &mut *file);
        let written = fs
            .write(&mut w)
            .map_err(|e| match e {
                // The spool's own read errors come through as I/O errors too.
                BackhandError::StdIo(e) => RootfsError::Io(e),
                other => squash_err(other),
            })
            .and_then(|(_, len)| Ok(w.flush().map(|()| len)?));
        let made = ahead.map(|a| a.finish()).unwrap_or_default();
        written.map(|len| (len, made))
    });
    let (len, made) = written?;
    file.set_len(len)?;
    file.rewind()?;
    stats.image_size = len;
    Ok((stats, made))
}

/// The blocks the writer will compress, in its order, as `backhand` 0.25's `DataWriter`
/// makes them. Files go by path as [`Path`] orders them (every path of a hard link group is
/// a file of its own). A file of at least one block is cut in blocks of [`BLOCK_SIZE`], the
/// last one partial (blocks of zeros become holes: the workers find those). A shorter,
/// non-empty file is appended to the fragment block being filled, which is compressed first
/// when the file does not fit; the last fragment block is compressed after all files.
fn predicted_blocks(tree: &Tree) -> Vec<parallel::Block> {
    let bs = u64::from(BLOCK_SIZE);
    let mut files: Vec<(&Path, crate::flatten::Content)> = tree
        .entries()
        .filter(|e| !is_private(e.path))
        .filter_map(|e| match &e.inode.kind {
            Kind::File(c) if !c.is_empty() => Some((Path::new(OsStr::from_bytes(e.path)), *c)),
            _ => None,
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut blocks = Vec::new();
    let mut fragment = parallel::Block {
        ranges: Vec::new(),
        fragment: true,
    };
    for (_, c) in files {
        if c.len() < bs {
            if fragment.len() as u64 + c.len() > bs {
                blocks.push(std::mem::replace(
                    &mut fragment,
                    parallel::Block {
                        ranges: Vec::new(),
                        fragment: true,
                    },
                ));
            }
            fragment.ranges.push((c.offset, c.len() as u32));
            continue;
        }
        let mut at = 0;
        while at < c.len() {
            let len = (c.len() - at).min(bs);
            blocks.push(parallel::Block {
                ranges: vec![(c.offset + at, len as u32)],
                fragment: false,
            });
            at += len;
        }
    }
    if !fragment.ranges.is_empty() {
        blocks.push(fragment);
    }
    blocks
}

/// uid and gid as the format's 32 bits.
fn ids(path: &[u8], uid: u64, gid: u64) -> Result<(u32, u32), RootfsError> {
    match (u32::try_from(uid), u32::try_from(gid)) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(RootfsError::IdTooLarge {
            path: lossy(path),
            uid,
            gid,
        }),
    }
}

/// A device number as SquashFS stores it and Linux decodes it (`new_decode_dev`).
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

#[cfg(test)]
mod tests;
