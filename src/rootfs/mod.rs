//! The initramfs: a flattened [`Tree`] and oci2uk's own files ([`Extra`]: the init, the
//! config, kernel modules) in, a compressed newc cpio out, with the figures that size the guest
//! ([`RootfsStats`], [`memory_needed`]).
//!
//! The archive is what the kernel's unpacker (`init/initramfs.c`) reads, and GNU cpio too:
//! - newc (`070701`) headers, numbers in 8 hex digits; each name NUL-terminated and padded so
//!   the data starts on a 4-byte boundary; data padded to 4 bytes; a `TRAILER!!!` entry; no
//!   padding after it beyond 4 bytes.
//! - Paths relative (`etc/passwd`), sorted bytewise, so a directory comes before what it
//!   holds; no entry for the root itself. The one exception, [`UNPACKED_PATH`], comes last. Parent directories of every entry are present (the
//!   tree has them; extras get implied ones, `0755` root).
//! - Inode numbers sequential from 1 in archive order; device fields 0.
//! - A hardlink group (regular files sharing an inode) is one inode number with `nlink` the
//!   group's size, and the data only on the group's *last* entry, the others having size 0:
//!   GNU cpio defers size-0 links until the entry with data, and the kernel creates the first
//!   link empty, links the others to it and writes the data when it reaches it. Symlinks,
//!   devices and fifos sharing an inode are written as separate entries.
//! - uid, gid and permission bits as in the tree (symlinks `0777`, as Linux has them); mtimes as in the tree, clamped to
//!   [`RootfsOptions::source_date_epoch`] and to the format's unsigned 32 bits (earlier than
//!   1970 becomes 0). Directories have `nlink` 2, as `usr/gen_init_cpio` writes them.
//! - Extended attributes cannot be stored (newc has no place for them): they are dropped and
//!   counted in [`RootfsStats::dropped_xattrs`].
//!
//! [`Extra`]s override the image's entries at the same path. The private directory
//! [`PRIVATE_DIR`] is oci2uk's: whatever the image has there is left out, so an image cannot
//! plant a module or a symlink where the init looks. Elsewhere, an extra whose parent is not a
//! directory in the image, or that would replace a directory by a non-directory (or the
//! reverse), is an error rather than a silent loss of the image's files.

mod codec;
pub mod squashfs;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use codec::{Codec, UnknownCodec};
pub use squashfs::{SquashCompression, SquashfsOptions, SquashfsStats, ROOT_IMAGE_PATH};

pub use crate::cache::RootSpan;
use crate::flatten::ContentCopyError;
use crate::flatten::{Content, Entry, InodeId, Kind, Tree};
use codec::Encoder;

// The guest's paths are shared with the init. The archive ends with UNPACKED_PATH, out of sort
// order, whenever it has PRIVATE_DIR.
pub use oci2uk_config::guest::{CONFIG_PATH, INIT_PATH, MODULES_DIR, PRIVATE_DIR, UNPACKED_PATH};

/// The longest path the kernel's unpacker takes, its terminating NUL included (`PATH_MAX`):
/// it silently skips entries with longer names.
const PATH_MAX: usize = 4096;
/// The largest newc number (8 hex digits).
const NEWC_MAX: u64 = u32::MAX as u64;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// Where a kernel module named `name` (`virtio_net`) goes in the initramfs:
/// `/.oci2uk/modules/virtio_net.ko`.
pub fn module_path(name: &str) -> String {
    format!("{MODULES_DIR}/{name}.ko")
}

/// What the guest's root file system is made of (`--rootfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// The image's tree in the initramfs itself, unpacked by the kernel into RAM.
    Initramfs,
    /// The image's tree as a SquashFS image ([`ROOT_IMAGE_PATH`]) inside the initramfs,
    /// mounted read-only through a loop device, with a tmpfs overlay for writes. The default:
    /// the fixture nginx serves from 128 MiB this way and from 200 MiB as an initramfs
    /// (`scripts/bench-memory.sh`), and boots sooner.
    #[default]
    Squashfs,
}

impl Layout {
    /// Every layout, in the order `--help` lists them.
    pub const ALL: [Layout; 2] = [Layout::Initramfs, Layout::Squashfs];

    /// The name: `initramfs`, `squashfs`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Initramfs => "initramfs",
            Self::Squashfs => "squashfs",
        }
    }

    /// The kernel modules the init loads to mount the root (beside the guest's own).
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Self::Initramfs => &[],
            Self::Squashfs => squashfs::MODULES,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Layout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| format!("unknown root file system {s:?} (initramfs, squashfs)"))
    }
}

/// A file, directory or symlink oci2uk adds to the image's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    /// Absolute, normalised path in the guest (`/.oci2uk/init`).
    pub path: String,
    /// What it is.
    pub kind: ExtraKind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// What an [`Extra`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraKind {
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A regular file whose contents are read from this host file when the archive is
    /// written; it must then be `len` bytes long.
    HostFile {
        /// The host file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link to this target.
    Symlink(String),
}

impl Extra {
    /// A regular file owned by root.
    pub fn file(path: impl Into<String>, data: Vec<u8>, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind: ExtraKind::File(data),
            mode,
            uid: 0,
            gid: 0,
        }
    }

    /// A directory owned by root.
    pub fn dir(path: impl Into<String>, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind: ExtraKind::Dir,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    /// A symlink owned by root.
    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            kind: ExtraKind::Symlink(target.into()),
            mode: 0o777,
            uid: 0,
            gid: 0,
        }
    }

    /// The init binary at [`INIT_PATH`], `0755`.
    pub fn init(binary: Vec<u8>) -> Self {
        Self::file(INIT_PATH, binary, 0o755)
    }

    /// The launch configuration at [`CONFIG_PATH`], `0644`.
    pub fn config(json: Vec<u8>) -> Self {
        Self::file(CONFIG_PATH, json, 0o644)
    }

    /// A kernel module (its uncompressed bytes) at [`module_path`]`(name)`, `0644`.
    pub fn module(name: &str, ko: Vec<u8>) -> Self {
        Self::file(module_path(name), ko, 0o644)
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            ExtraKind::File(_) | ExtraKind::HostFile { .. } => "file",
            ExtraKind::Dir => "directory",
            ExtraKind::Symlink(_) => "symlink",
        }
    }
}

/// Options of the initramfs.
#[derive(Debug, Clone)]
pub struct RootfsOptions {
    /// The compression; [`Codec::for_kernel`] picks one the kernel reads.
    pub codec: Codec,
    /// The codec's level; `None` for [`Codec::default_level`].
    pub level: Option<i32>,
    /// `SOURCE_DATE_EPOCH`: later mtimes are written as this one. The extras' mtime is this,
    /// or 0.
    pub source_date_epoch: Option<i64>,
}

impl Default for RootfsOptions {
    /// gzip, which every kernel reads, at its default level.
    fn default() -> Self {
        Self {
            codec: Codec::Gzip,
            level: None,
            source_date_epoch: None,
        }
    }
}

/// What an initramfs holds and weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootfsStats {
    /// The compression used.
    pub codec: Codec,
    /// Entries in the archive (paths; the trailer not counted).
    pub entries: u64,
    /// Regular files, a hardlink group counted once.
    pub files: u64,
    /// Bytes of regular-file contents, each inode once.
    pub content_size: u64,
    /// Size of the uncompressed cpio.
    pub cpio_size: u64,
    /// Size of the compressed initramfs (what was written).
    pub compressed_size: u64,
    /// Estimated memory the unpacked tree takes in the guest: every file's contents rounded up
    /// to whole 4 KiB pages, a page per symlink (ramfs keeps a symlink's target in a page),
    /// and 1 KiB of inode and dentry per entry.
    pub unpacked_size: u64,
    /// Inodes whose extended attributes were dropped (newc cannot hold them): file
    /// capabilities (`security.capability`) among them are lost.
    pub dropped_xattrs: u64,
    /// The root image inside the initramfs, for [`Layout::Squashfs`].
    pub root_image: Option<SquashfsStats>,
    /// Where the root image lies, when it follows the archive to be read in place
    /// ([`write_in_place`]).
    pub in_place: Option<RootSpan>,
}

impl RootfsStats {
    /// Records the SquashFS root image the blob carries: the image's files are its files, so
    /// the extended attributes it dropped are the ones the blob lost.
    fn record_root_image(&mut self, sq: SquashfsStats) {
        self.dropped_xattrs = sq.dropped_xattrs;
        self.root_image = Some(sq);
    }
}

/// What the initramfs is unpacked into, which decides how much memory the guest needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsType {
    /// `rootfstype=ramfs`: no size limit; the tree takes what it takes.
    Ramfs,
    /// The default: a tmpfs capped at half the guest's RAM.
    Tmpfs,
}

impl RootfsType {
    /// What the kernel picks for `cmdline` (`init/do_mounts.c`, `init_rootfs`): tmpfs unless
    /// `root=` is given or the last `rootfstype=` names no `tmpfs`.
    pub fn from_cmdline(cmdline: &str) -> Self {
        let mut fstype = None;
        let mut root = false;
        for word in cmdline.split_whitespace() {
            if let Some(v) = word.strip_prefix("rootfstype=") {
                fstype = Some(v);
            } else if word.starts_with("root=") {
                root = true;
            }
        }
        match fstype {
            _ if root => RootfsType::Ramfs,
            Some(v) if !v.contains("tmpfs") => RootfsType::Ramfs,
            _ => RootfsType::Tmpfs,
        }
    }
}

/// The kernel's own memory besides the initramfs: Debian's cloud kernel (text and data,
/// page tables, `struct page` array, slabs at boot), with margin. Measured with Debian's
/// 6.1 cloud kernel under QEMU: a 98 MiB tree with its 30 MiB zstd initramfs unpacks on ramfs
/// at 208 MiB and not at 192; uncompressed (85 MiB) at 256 and not at 240, so the kernel and
/// the decompressor take about 70 MiB while unpacking.
pub const KERNEL_MIB: u64 = 80;
/// What the application is given beyond its files.
pub const APP_MIB: u64 = 64;
/// The decompressor's working memory while unpacking: zstd's window, xz's dictionary or
/// LZ4's block, each at most 8 MiB.
pub const DECOMPRESS_MIB: u64 = 8;
/// The memory a kernel that reads the root image in place takes (the oci2uk kernel loads
/// 13 MiB, and its tables take more).
pub const IN_PLACE_KERNEL_MIB: u64 = 16;
/// What the application is given beyond its files, with a root image read in place: its own
/// pages, the page cache of the files it reads and the kernel's tables for them.
pub const IN_PLACE_APP_MIB: u64 = 16;
/// Memory the kernel keeps out of `totalram` (on which the tmpfs cap is computed).
pub const RESERVED_MIB: u64 = 32;

/// The guest memory, in MiB, that an initramfs with `stats` needs when unpacked into
/// `rootfs`:
///
/// - ramfs: `KERNEL_MIB + unpacked + max(compressed + DECOMPRESS_MIB, APP_MIB)`. While
///   unpacking, the compressed initramfs is still in memory beside the growing tree; once it
///   is freed, the application gets at least that much.
/// - tmpfs: the same, and at least `2 × unpacked + RESERVED_MIB`, as the tree must fit in half
///   of the memory the kernel manages. (A 131 MiB nginx tree failed to unpack at 256 MiB and
///   served at 320 MiB; a 98 MiB one failed at 192 and unpacked at 224.)
///
/// Too little memory on ramfs ends in the kernel's "System is deadlocked on memory" panic while
/// unpacking; on tmpfs in a tree cut short (see [`UNPACKED_PATH`]).
///
/// For [`Layout::Squashfs`] the unpacked size is the root image's (and the modules'): the
/// same formula, checked by boots of the fixture nginx (30 MiB image): it records 192 MiB,
/// nginx serves from 128 MiB and the kernel panics unpacking at 120, as the initramfs of the
/// same tree records 256 MiB and serves from 200 (`scripts/bench-memory.sh`).
///
/// A root image read in place ([`RootfsStats::in_place`]) needs a kernel that reads it there,
/// built for one application (the oci2uk kernel loads 13 MiB and unpacks nothing big):
/// `IN_PLACE_KERNEL_MIB + unpacked archive + image + IN_PLACE_APP_MIB`, rounded up to 8 MiB.
/// The fixture nginx records 64 MiB this way and serves from 60 (not from 56;
/// `scripts/bench-kernel.sh`).
///
/// Rounded up to a multiple of 32 MiB; at least 128 MiB. The sizes are estimates: the figures
/// are Debian's cloud kernel's, with margin.
pub fn memory_needed(stats: &RootfsStats, rootfs: RootfsType) -> u64 {
    if let Some(span) = stats.in_place {
        // The image is held once, where the bake put it; only the archive is unpacked.
        let need = IN_PLACE_KERNEL_MIB
            + stats.unpacked_size.div_ceil(MIB)
            + span.len.div_ceil(MIB)
            + IN_PLACE_APP_MIB;
        return need.div_ceil(8) * 8;
    }
    let unpacked = stats.unpacked_size.div_ceil(MIB);
    let compressed = stats.compressed_size.div_ceil(MIB);
    let mut need = KERNEL_MIB + unpacked + (compressed + DECOMPRESS_MIB).max(APP_MIB);
    if rootfs == RootfsType::Tmpfs {
        need = need.max(2 * unpacked + RESERVED_MIB);
    }
    need.div_ceil(32).saturating_mul(32).max(128)
}

/// Errors of writing the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Writing (or compressing) failed.
    #[error("writing the initramfs failed")]
    Io(#[from] io::Error),
    /// A file's contents could not be read back from the spool.
    #[error("cannot read the contents of /{path} from the spool")]
    Content {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A level the codec does not have.
    #[error("{codec} has no level {level} (levels {min} to {max})")]
    Level {
        /// The codec.
        codec: Codec,
        /// The level asked for.
        level: i32,
        /// The lowest level.
        min: i32,
        /// The highest level.
        max: i32,
    },
    /// An extra's path is not absolute and normalised, is the root, or names the same path as
    /// another extra, or as a parent that another extra makes a non-directory.
    #[error("cannot add {path} to the initramfs: {why}")]
    ExtraPath {
        /// The extra's path.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The image has an entry of another type where an extra goes or needs a directory.
    #[error("the image has a {found} at /{path}, where oci2uk needs a {needed} (for {extra})")]
    Conflict {
        /// The image's path.
        path: String,
        /// What the image has there.
        found: &'static str,
        /// What oci2uk needs there.
        needed: &'static str,
        /// The extra that needs it.
        extra: String,
    },
    /// A path longer than the kernel's unpacker takes.
    #[error("/{path} is {len} bytes long; the kernel's initramfs unpacker takes paths up to 4095")]
    NameTooLong {
        /// The path (shortened).
        path: String,
        /// Its length.
        len: usize,
    },
    /// A symlink target longer than Linux takes.
    #[error("the target of symlink /{path} is {len} bytes long; Linux takes up to 4095")]
    SymlinkTooLong {
        /// The symlink.
        path: String,
        /// The target's length.
        len: usize,
    },
    /// A file too large for a newc header.
    #[error("/{path} is {size} bytes; an initramfs (newc cpio) holds files below 4 GiB")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
    },
    /// An owner too large for a newc header.
    #[error("/{path} is owned by {uid}:{gid}; an initramfs holds ids up to 4294967295")]
    IdTooLarge {
        /// The entry.
        path: String,
        /// Its owner.
        uid: u64,
        /// Its group.
        gid: u64,
    },
    /// More inodes than newc can number.
    #[error("the tree has more than 4294967295 inodes")]
    TooManyInodes,
    /// A host file given as an extra changed length.
    #[error("{path} changed while the initramfs was written")]
    HostFileChanged {
        /// The host file.
        path: String,
    },
}

/// Writes the initramfs of `tree` plus `extras` to `w`, compressed with `opts.codec`, and
/// says what it holds.
pub fn write_initramfs(
    tree: &Tree,
    extras: &[Extra],
    opts: &RootfsOptions,
    w: impl Write,
) -> Result<RootfsStats, RootfsError> {
    write_archive(Some(tree), extras, opts, w, None)
}

/// Writes the initramfs of `layout` to `w`: for [`Layout::Initramfs`], what
/// [`write_initramfs`] writes; for [`Layout::Squashfs`], `tree` as a SquashFS image
/// (spooled in `tmp_dir`, with `squash` options) at [`ROOT_IMAGE_PATH`] beside `extras`, and
/// nothing else of the image. `extras` must hold the modules of [`Layout::modules`] for the
/// init to mount it.
pub fn write_layout(
    layout: Layout,
    tree: &Tree,
    extras: &[Extra],
    opts: &RootfsOptions,
    squash: &SquashfsOptions,
    tmp_dir: &Path,
    w: impl Write,
) -> Result<RootfsStats, RootfsError> {
    match layout {
        Layout::Initramfs => write_initramfs(tree, extras, opts, w),
        Layout::Squashfs => {
            let (image, sq) = spool_root_image(tree, squash, tmp_dir)?;
            let tail = (image.path(), sq.image_size);
            let mut stats = write_archive(None, extras, opts, w, Some(tail))?;
            stats.record_root_image(sq);
            Ok(stats)
        }
    }
}

/// `tree` as a SquashFS root image (with `squash`'s options), spooled to a temporary file in
/// `tmp_dir` for the blob's writer to copy: the file, removed when dropped, and the image's
/// stats.
fn spool_root_image(
    tree: &Tree,
    squash: &SquashfsOptions,
    tmp_dir: &Path,
) -> Result<(tempfile::NamedTempFile, SquashfsStats), RootfsError> {
    let mut image = tempfile::NamedTempFile::new_in(tmp_dir)?;
    let sq = squashfs::write_squashfs(tree, squash, image.as_file_mut())?;
    Ok((image, sq))
}

/// The zstd level of a root image read in place. Such an image stays in the guest's memory,
/// compressed, for the guest's life, so its size is memory the application does not get: level
/// 15 makes the fixture nginx's image 13% smaller than level 3 (30.0 MB against 34.5) and is
/// what lets it serve from 60 MiB, for about 8 s more of a build that is cached after. Reads
/// cost the same (zstd decompresses every level at one speed).
pub const IN_PLACE_ZSTD_LEVEL: u32 = 15;

/// The root image's alignment in a blob written by [`write_in_place`], and the unit of its
/// length: a page, as the kernel maps it.
pub const IN_PLACE_ALIGN: u64 = 4096;

/// Writes the blob of a root image the kernel reads in place: the archive of `extras` (the
/// init, its configuration and modules, and the marker), compressed with the codec; zeros to
/// the next page; the SquashFS image of `tree`; zeros to the next page. The kernel unpacks only
/// the archive ([`RootSpan::initrd_len`] bytes); the bake keeps the image where it placed it
/// and the guest mounts it from there, so it is in the guest's memory once, not unpacked
/// beside itself. The whole blob is one file of the cache, like any initramfs.
pub fn write_in_place(
    tree: &Tree,
    extras: &[Extra],
    opts: &RootfsOptions,
    squash: &SquashfsOptions,
    tmp_dir: &Path,
    w: impl Write,
) -> Result<RootfsStats, RootfsError> {
    let (image, sq) = spool_root_image(tree, squash, tmp_dir)?;
    let mut out = Counter::new(w);
    let mut stats = write_archive(None, extras, opts, &mut out, None)?;
    let initrd_len = out.n;
    let pad = |n: u64| (IN_PLACE_ALIGN - n % IN_PLACE_ALIGN) % IN_PLACE_ALIGN;
    io::copy(&mut io::repeat(0).take(pad(initrd_len)), &mut out)?;
    let offset = out.n;
    let copied = io::copy(&mut fs::File::open(image.path())?, &mut out)?;
    if copied != sq.image_size {
        return Err(RootfsError::Io(io::Error::other(format!(
            "the root image was {} bytes and {copied} were read back",
            sq.image_size
        ))));
    }
    io::copy(&mut io::repeat(0).take(pad(copied)), &mut out)?;
    out.flush()?;
    stats.compressed_size = out.n;
    stats.record_root_image(sq);
    stats.in_place = Some(RootSpan {
        initrd_len,
        offset,
        len: out.n - offset,
    });
    Ok(stats)
}

/// Writes the archive of `tree` and `extras`, compressed with the codec. A `tail`, the root
/// image (already compressed: the host file and its length), follows at [`ROOT_IMAGE_PATH`]
/// in an uncompressed archive of its own, with the marker: the kernel unpacks concatenated
/// archives, compressed or not, and compressing a SquashFS image again would cost the build
/// and the boot time for nothing.
fn write_archive(
    tree: Option<&Tree>,
    extras: &[Extra],
    opts: &RootfsOptions,
    w: impl Write,
    tail: Option<(&Path, u64)>,
) -> Result<RootfsStats, RootfsError> {
    let level = opts.level.unwrap_or(opts.codec.default_level());
    let levels = opts.codec.levels();
    if !levels.contains(&level) {
        return Err(RootfsError::Level {
            codec: opts.codec,
            level,
            min: *levels.start(),
            max: *levels.end(),
        });
    }
    let items = merge(tree, extras)?;

    let out = Counter::new(BufWriter::with_capacity(256 * 1024, w));
    let enc = Encoder::new(opts.codec, level, out)?;
    let mut cpio = Newc {
        w: BufWriter::with_capacity(256 * 1024, enc),
        pos: 0,
    };
    let mut stats = RootfsStats {
        codec: opts.codec,
        entries: 0,
        files: 0,
        content_size: 0,
        cpio_size: 0,
        compressed_size: 0,
        unpacked_size: 0,
        dropped_xattrs: 0,
        root_image: None,
        in_place: None,
    };
    let tail_path = &ROOT_IMAGE_PATH.as_bytes()[1..];
    if tail.is_some() && items.contains_key(tail_path) {
        return Err(RootfsError::ExtraPath {
            path: ROOT_IMAGE_PATH.into(),
            why: "another extra has the same path",
        });
    }
    let mut next_ino = write_entries(tree, &items, opts, &mut cpio, &mut stats, tail.is_none())?;
    cpio.trailer()?;
    stats.cpio_size = cpio.pos;

    let enc = cpio.w.into_inner().map_err(|e| e.into_error())?;
    let mut out = enc.finish()?;
    if let Some((host, len)) = tail {
        // The uncompressed archive starts on a 4-byte boundary (the kernel skips zeros).
        let pad = (4 - out.n % 4) % 4;
        out.write_all(&[0u8; 4][..pad as usize])?;
        let mut raw = Newc {
            w: &mut out,
            pos: 0,
        };
        let mtime = extra_mtime(opts);
        let mut ino = || {
            next_ino += 1;
            u32::try_from(next_ino - 1).map_err(|_| RootfsError::TooManyInodes)
        };
        let h = Header::new(ino()?, S_IFREG | 0o400, 0, 0, 1, mtime);
        host_file_entry(&mut raw, h, tail_path, host, len, &mut stats)?;
        stats.entries += 1;
        stats.unpacked_size += 1024;
        marker_entry(&mut raw, ino()?, mtime, &mut stats)?;
        raw.trailer()?;
        stats.cpio_size += raw.pos;
    }
    out.flush()?;
    stats.compressed_size = out.n;
    Ok(stats)
}

/// Where an entry of the archive comes from.
enum Source<'a> {
    Image(Entry<'a>),
    Extra(&'a Extra),
    /// A parent directory an extra needs that neither the image nor the extras have.
    Implied,
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn image_kind(e: &Entry<'_>) -> &'static str {
    e.inode.kind.name()
}

/// The extra's path relative to the root, checked.
fn extra_rel(x: &Extra) -> Result<&[u8], RootfsError> {
    let bad = |why| RootfsError::ExtraPath {
        path: x.path.clone(),
        why,
    };
    let rel = x
        .path
        .strip_prefix('/')
        .ok_or_else(|| bad("the path is not absolute"))?;
    if rel.is_empty() {
        return Err(bad("the path is the root"));
    }
    if rel
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0'))
    {
        return Err(bad("the path is not normalised"));
    }
    Ok(rel.as_bytes())
}

fn is_private(p: &[u8]) -> bool {
    let private = &PRIVATE_DIR.as_bytes()[1..];
    p.strip_prefix(private)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
}

/// Every entry of the archive, sorted: the image's (minus the private directory), the implied
/// parents of the extras, and the extras over them.
fn merge<'a>(
    tree: Option<&'a Tree>,
    extras: &'a [Extra],
) -> Result<BTreeMap<Cow<'a, [u8]>, Source<'a>>, RootfsError> {
    let mut by_path: BTreeMap<&[u8], &Extra> = BTreeMap::new();
    for x in extras {
        if x.path == UNPACKED_PATH {
            return Err(RootfsError::ExtraPath {
                path: x.path.clone(),
                why: "the path is oci2uk's own marker",
            });
        }
        if by_path.insert(extra_rel(x)?, x).is_some() {
            return Err(RootfsError::ExtraPath {
                path: x.path.clone(),
                why: "another extra has the same path",
            });
        }
    }
    let mut items: BTreeMap<Cow<'a, [u8]>, Source<'a>> = tree
        .into_iter()
        .flat_map(|t| t.entries())
        .filter(|e| !is_private(e.path))
        .map(|e| (Cow::Borrowed(e.path), Source::Image(e)))
        .collect();
    for (&rel, &x) in &by_path {
        // Every proper ancestor must be a directory.
        for (i, _) in rel.iter().enumerate().filter(|(_, b)| **b == b'/') {
            let a = &rel[..i];
            if let Some(other) = by_path.get(a) {
                if other.kind != ExtraKind::Dir {
                    return Err(RootfsError::ExtraPath {
                        path: x.path.clone(),
                        why: "another extra makes a parent of it a non-directory",
                    });
                }
                continue;
            }
            match items.get(a) {
                Some(Source::Image(e)) if e.inode.kind != Kind::Dir => {
                    return Err(RootfsError::Conflict {
                        path: lossy(a),
                        found: image_kind(e),
                        needed: "directory",
                        extra: x.path.clone(),
                    })
                }
                Some(_) => {}
                None => {
                    items.insert(Cow::Owned(a.to_vec()), Source::Implied);
                }
            }
        }
        if let Some(Source::Image(e)) = items.get(rel) {
            let image_dir = e.inode.kind == Kind::Dir;
            if image_dir != (x.kind == ExtraKind::Dir) {
                return Err(RootfsError::Conflict {
                    path: lossy(rel),
                    found: image_kind(e),
                    needed: x.kind_name(),
                    extra: x.path.clone(),
                });
            }
        }
        items.insert(Cow::Borrowed(rel), Source::Extra(x));
    }
    Ok(items)
}

/// A hardlink group of the image: how many of its paths are in the archive, how many are
/// still to be written, and its inode number once given.
struct Group {
    size: u32,
    left: u32,
    ino: Option<u32>,
}

/// Writes every entry of `items`, then the marker if `marker` and the image has the private
/// directory; returns the next free inode number.
fn write_entries<W: Write>(
    tree: Option<&Tree>,
    items: &BTreeMap<Cow<'_, [u8]>, Source<'_>>,
    opts: &RootfsOptions,
    cpio: &mut Newc<W>,
    stats: &mut RootfsStats,
    marker: bool,
) -> Result<u64, RootfsError> {
    let mut w = EntryWriter {
        tree,
        opts,
        cpio,
        stats,
        groups: hardlink_groups(items),
        next_ino: 1,
        extra_mtime: extra_mtime(opts),
        buf: vec![0u8; 256 * 1024],
    };
    for (path, src) in items {
        let path: &[u8] = path;
        if path.len() + 1 > PATH_MAX {
            return Err(RootfsError::NameTooLong {
                path: format!("{}...", lossy(&path[..64])),
                len: path.len(),
            });
        }
        w.stats.entries += 1;
        w.stats.unpacked_size += 1024;
        match src {
            Source::Implied => w.implied(path)?,
            Source::Extra(x) => w.extra(path, x)?,
            Source::Image(e) => w.image(path, e)?,
        }
    }
    if marker && items.contains_key(&PRIVATE_DIR.as_bytes()[1..]) {
        let ino = w.new_ino()?;
        marker_entry(w.cpio, ino, w.extra_mtime, w.stats)?;
    }
    Ok(w.next_ino)
}

/// The hardlink groups of the image's regular files in `items`, each with its size.
fn hardlink_groups(items: &BTreeMap<Cow<'_, [u8]>, Source<'_>>) -> HashMap<InodeId, Group> {
    let mut groups: HashMap<InodeId, Group> = HashMap::new();
    for src in items.values() {
        if let Source::Image(e) = src {
            if let Kind::File(_) = e.inode.kind {
                let g = groups.entry(e.id).or_insert(Group {
                    size: 0,
                    left: 0,
                    ino: None,
                });
                g.size += 1;
                g.left += 1;
            }
        }
    }
    groups
}

/// The archive while its entries are written: inode numbers, hardlink groups and the
/// statistics.
struct EntryWriter<'a, W: Write> {
    tree: Option<&'a Tree>,
    opts: &'a RootfsOptions,
    cpio: &'a mut Newc<W>,
    stats: &'a mut RootfsStats,
    groups: HashMap<InodeId, Group>,
    /// The next inode number to give.
    next_ino: u64,
    /// See [`extra_mtime`].
    extra_mtime: u32,
    /// The copy buffer for contents.
    buf: Vec<u8>,
}

impl<W: Write> EntryWriter<'_, W> {
    fn new_ino(&mut self) -> Result<u32, RootfsError> {
        let ino = u32::try_from(self.next_ino).map_err(|_| RootfsError::TooManyInodes)?;
        self.next_ino += 1;
        Ok(ino)
    }

    /// An image mtime, clamped to `SOURCE_DATE_EPOCH` and to what newc can hold.
    fn clamp(&self, t: i64) -> u32 {
        let t = self.opts.source_date_epoch.map_or(t, |e| t.min(e));
        t.clamp(0, NEWC_MAX as i64) as u32
    }

    /// A parent directory that only the extras need.
    fn implied(&mut self, path: &[u8]) -> Result<(), RootfsError> {
        let h = Header::new(self.new_ino()?, S_IFDIR | 0o755, 0, 0, 2, self.extra_mtime);
        self.cpio.entry(&h, path, &[])?;
        Ok(())
    }

    fn extra(&mut self, path: &[u8], x: &Extra) -> Result<(), RootfsError> {
        let mode = x.mode & 0o7777;
        let ino = self.new_ino()?;
        let mtime = self.extra_mtime;
        match &x.kind {
            ExtraKind::Dir => {
                let h = Header::new(ino, S_IFDIR | mode, x.uid, x.gid, 2, mtime);
                self.cpio.entry(&h, path, &[])?;
            }
            ExtraKind::File(data) => {
                let mut h = Header::new(ino, S_IFREG | mode, x.uid, x.gid, 1, mtime);
                h.filesize = file_size(path, data.len() as u64)?;
                self.cpio.entry(&h, path, data)?;
                self.stats.files += 1;
                self.stats.content_size += data.len() as u64;
                self.stats.unpacked_size += (data.len() as u64).next_multiple_of(PAGE);
            }
            ExtraKind::HostFile { path: host, len } => {
                let h = Header::new(ino, S_IFREG | mode, x.uid, x.gid, 1, mtime);
                host_file_entry(self.cpio, h, path, host, *len, self.stats)?;
            }
            ExtraKind::Symlink(target) => {
                symlink_len(path, target.len())?;
                let mut h = Header::new(ino, S_IFLNK | 0o777, x.uid, x.gid, 1, mtime);
                h.filesize = target.len() as u32;
                self.cpio.entry(&h, path, target.as_bytes())?;
                self.stats.unpacked_size += PAGE;
            }
        }
        Ok(())
    }

    fn image(&mut self, path: &[u8], e: &Entry<'_>) -> Result<(), RootfsError> {
        let inode = e.inode;
        let (uid, gid) = match (u32::try_from(inode.uid), u32::try_from(inode.gid)) {
            (Ok(u), Ok(g)) => (u, g),
            _ => {
                return Err(RootfsError::IdTooLarge {
                    path: lossy(path),
                    uid: inode.uid,
                    gid: inode.gid,
                })
            }
        };
        let perm = inode.mode & 0o7777;
        let mtime = self.clamp(inode.mtime);
        match &inode.kind {
            Kind::Dir => {
                let h = Header::new(self.new_ino()?, S_IFDIR | perm, uid, gid, 2, mtime);
                self.cpio.entry(&h, path, &[])?;
            }
            Kind::File(c) => {
                let h = Header::new(0, S_IFREG | perm, uid, gid, 0, mtime);
                self.image_file(path, e, c, h)?;
            }
            Kind::Symlink(target) => {
                symlink_len(path, target.len())?;
                // Linux symlinks are always 0777 (the unpacker sets no mode on them).
                let mut h = Header::new(self.new_ino()?, S_IFLNK | 0o777, uid, gid, 1, mtime);
                h.filesize = target.len() as u32;
                self.cpio.entry(&h, path, target)?;
                self.stats.unpacked_size += PAGE;
            }
            Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                let t = if matches!(inode.kind, Kind::CharDevice { .. }) {
                    S_IFCHR
                } else {
                    S_IFBLK
                };
                let mut h = Header::new(self.new_ino()?, t | perm, uid, gid, 1, mtime);
                h.rdevmajor = *major;
                h.rdevminor = *minor;
                self.cpio.entry(&h, path, &[])?;
            }
            Kind::Fifo => {
                let h = Header::new(self.new_ino()?, S_IFIFO | perm, uid, gid, 1, mtime);
                self.cpio.entry(&h, path, &[])?;
            }
        }
        if !matches!(inode.kind, Kind::File(_)) && !inode.xattrs.is_empty() {
            self.stats.dropped_xattrs += 1;
        }
        Ok(())
    }

    /// One path of a hardlink group (`h` is given its inode number and link count here):
    /// every path shares the group's inode, and the contents go with the last one, as GNU
    /// cpio writes them.
    fn image_file(
        &mut self,
        path: &[u8],
        e: &Entry<'_>,
        c: &Content,
        mut h: Header,
    ) -> Result<(), RootfsError> {
        let tree = self.tree.expect("image entries come from a tree");
        let given = self.groups.get(&e.id).expect("every file was counted").ino;
        let first = given.is_none();
        let ino = match given {
            Some(ino) => ino,
            None => self.new_ino()?,
        };
        let g = self.groups.get_mut(&e.id).expect("every file was counted");
        g.ino = Some(ino);
        g.left -= 1;
        let last = g.left == 0;
        h.ino = ino;
        h.nlink = g.size;
        if last {
            h.filesize = file_size(path, c.len())?;
        }
        self.cpio.header(&h, path)?;
        if last {
            copy_content(tree, c, path, &mut self.cpio.w, &mut self.buf)?;
            self.cpio.pos += c.len();
            self.cpio.pad()?;
        }
        if first {
            self.stats.files += 1;
            self.stats.content_size += c.len();
            self.stats.unpacked_size += c.len().next_multiple_of(PAGE);
            if !e.inode.xattrs.is_empty() {
                self.stats.dropped_xattrs += 1;
            }
        }
        Ok(())
    }
}

/// The mtime of what oci2uk adds: `SOURCE_DATE_EPOCH`, else 0.
fn extra_mtime(opts: &RootfsOptions) -> u32 {
    opts.source_date_epoch
        .unwrap_or(0)
        .clamp(0, NEWC_MAX as i64) as u32
}

/// The last entry, [`UNPACKED_PATH`].
fn marker_entry<W: Write>(
    cpio: &mut Newc<W>,
    ino: u32,
    mtime: u32,
    stats: &mut RootfsStats,
) -> Result<(), RootfsError> {
    let h = Header::new(ino, S_IFREG | 0o444, 0, 0, 1, mtime);
    cpio.entry(&h, &UNPACKED_PATH.as_bytes()[1..], &[])?;
    stats.entries += 1;
    stats.files += 1;
    stats.unpacked_size += 1024;
    Ok(())
}

/// A regular file whose `len` bytes are copied from `host`, which must not change meanwhile.
fn host_file_entry<W: Write>(
    cpio: &mut Newc<W>,
    mut h: Header,
    path: &[u8],
    host: &Path,
    len: u64,
    stats: &mut RootfsStats,
) -> Result<(), RootfsError> {
    h.filesize = file_size(path, len)?;
    cpio.header(&h, path)?;
    let changed = || RootfsError::HostFileChanged {
        path: host.display().to_string(),
    };
    let f = std::fs::File::open(host)?;
    let mut r = f.take(len);
    let n = io::copy(&mut r, &mut cpio.w)?;
    if n != len || r.into_inner().read(&mut [0u8; 1])? != 0 {
        return Err(changed());
    }
    cpio.pos += len;
    cpio.pad()?;
    stats.files += 1;
    stats.content_size += len;
    stats.unpacked_size += len.next_multiple_of(PAGE);
    Ok(())
}

fn file_size(path: &[u8], size: u64) -> Result<u32, RootfsError> {
    u32::try_from(size).map_err(|_| RootfsError::FileTooLarge {
        path: lossy(path),
        size,
    })
}

fn symlink_len(path: &[u8], len: usize) -> Result<(), RootfsError> {
    // symlink(2) takes targets shorter than PATH_MAX; the unpacker skips longer ones.
    if len >= PATH_MAX {
        return Err(RootfsError::SymlinkTooLong {
            path: lossy(path),
            len,
        });
    }
    Ok(())
}

fn copy_content<W: Write>(
    tree: &Tree,
    c: &Content,
    path: &[u8],
    w: &mut W,
    buf: &mut [u8],
) -> Result<(), RootfsError> {
    tree.copy_content(c, w, buf).map_err(|e| match e {
        ContentCopyError::Read(source) => RootfsError::Content {
            path: lossy(path),
            source,
        },
        ContentCopyError::Write(source) => RootfsError::from(source),
    })?;
    Ok(())
}

const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;
const S_IFDIR: u32 = 0o040000;
const S_IFBLK: u32 = 0o060000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// The numbers of a newc header that vary.
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

impl Header {
    fn new(ino: u32, mode: u32, uid: u32, gid: u32, nlink: u32, mtime: u32) -> Self {
        Self {
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        }
    }
}

/// The length of a newc header.
const HEADER_LEN: usize = 110;

/// A newc writer that knows its position, for the 4-byte alignment.
struct Newc<W: Write> {
    w: W,
    pos: u64,
}

impl<W: Write> Newc<W> {
    /// Writes a header and the name (NUL-terminated, padded to 4 bytes).
    fn header(&mut self, h: &Header, name: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        out.extend_from_slice(b"070701");
        for v in [
            h.ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            h.mtime,
            h.filesize,
            0, // devmajor
            0, // devminor
            h.rdevmajor,
            h.rdevminor,
            (name.len() + 1) as u32,
            0, // check
        ] {
            out.extend_from_slice(format!("{v:08X}").as_bytes());
        }
        debug_assert_eq!(out.len(), HEADER_LEN);
        out.extend_from_slice(name);
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        self.w.write_all(&out)?;
        self.pos += out.len() as u64;
        Ok(())
    }

    /// Pads the data just written to 4 bytes.
    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.pos % 4) as usize;
        if rem != 0 {
            self.w.write_all(&[0u8; 4][..4 - rem])?;
            self.pos += (4 - rem) as u64;
        }
        Ok(())
    }

    /// Writes a whole entry whose data is in memory.
    fn entry(&mut self, h: &Header, name: &[u8], data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(h.filesize as usize, data.len());
        self.header(h, name)?;
        self.w.write_all(data)?;
        self.pos += data.len() as u64;
        self.pad()
    }

    fn trailer(&mut self) -> io::Result<()> {
        self.header(&Header::new(0, 0, 0, 0, 1, 0), b"TRAILER!!!")
    }
}

/// A writer that counts what goes through it.
struct Counter<W: Write> {
    w: W,
    n: u64,
}

impl<W: Write> Counter<W> {
    fn new(w: W) -> Self {
        Self { w, n: 0 }
    }
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests;
