//! Flattening: layer blobs in, one [`Tree`] out.
//!
//! Each layer is read once, as a stream: the blob is decompressed (by its media type, which
//! is checked against the blob's first bytes), the uncompressed stream is hashed as it goes
//! and checked against the layer's DiffID once it has been read to its very end, and the tar
//! entries are applied to the tree in memory. Regular-file contents go to one anonymous,
//! append-only spool file in the caller's directory, deduplicated and deleted with
//! the tree; nothing is ever written at an image path on the host, so a hostile layer cannot
//! reach outside. The result depends only on the layers: the spool starts empty for every
//! flattening.
//!
//! Decompression runs on a thread of its own while this one hashes the stream for the DiffID,
//! parses the tar and stores contents, so a layer costs about as long as the slower half; the next
//! [`LAYERS_AHEAD`] layers are decompressed at the same time (into bounded buffers, so memory
//! does not grow with the layers' sizes) while the layers are still applied strictly in order.
//!
//! # Rules
//!
//! The OCI image spec's layer rules, with the choices where implementations differ:
//!
//! - **Names** are normalised: leading `/` and `./`, empty and `.` components dropped, `..`
//!   removes the previous component. A name that leaves the root is refused (containerd clamps
//!   it; an image that needs that is broken or hostile). Names naming the root itself (`./`)
//!   set the root directory's metadata; anything but a directory there is refused.
//! - **Parent directories** are resolved in the tree as it stands when the entry is read:
//!   symlinks among them are followed inside the root, as in a chroot (absolute targets start
//!   at the root, `..` stops there, at most [`MAX_SYMLINKS`] links), as containerd and umoci
//!   do; `lib/x` under `lib -> usr/lib` lands at `usr/lib/x`. A non-directory on the way is an
//!   error. Missing parents are created as directories `0755`, `0:0`, mtime 0 (fixed values,
//!   so the tree does not depend on which entry needed them).
//! - **Whiteouts** `.wh.NAME` remove NAME (and what is below it) as the lower layers left it;
//!   `DIR/.wh..wh..opq` removes what lower layers put in DIR. Both act as if they came before
//!   all of their layer's own entries, wherever they are in the tar: every path remembers
//!   the layer that last made it, and a whiteout removes only what lower layers made. So a
//!   file and its own whiteout in one layer leave the file (the spec: whiteouts apply to lower
//!   layers), and a directory whited out and recreated in the same layer holds only that
//!   layer's entries. Whiteouts only remove: one for something absent, or under a directory
//!   that does not exist, is a no-op and creates nothing. They never appear in the tree.
//!   Refused: `.wh.` alone, `.wh..` and `.wh...`, the reserved prefix `.wh..wh.` with anything
//!   but `.opq`, and whiteout names used as directories (`.wh.x/y`).
//! - **Replacement**: a non-directory replaces whatever is at its path (a directory with its
//!   subtree); a directory over a directory keeps the children and takes the new metadata; a
//!   directory over a non-directory replaces it. Within one layer the later of two entries
//!   for a path wins, as tar extraction does.
//! - **Hardlinks** share their target's inode (metadata and contents); the link header's own
//!   metadata is ignored. The link keeps the contents the target had when it was made: a
//!   later layer that replaces the target path gives that path a new inode. The target is
//!   looked up like a parent (symlinks in its directories followed), its last component is not
//!   followed, so a hardlink to a symlink links the symlink. Refused: a target outside the
//!   root, missing, or a directory.
//! - **Symlink targets** are stored verbatim; they are data.
//! - **Metadata**: mode (permission bits), uid, gid and mtime from the header, with pax
//!   overrides; pax mtimes are truncated to whole seconds. Xattrs from pax `SCHILY.xattr.*`
//!   records (`LIBARCHIVE.xattr.*` records are not read). User and group names are ignored:
//!   the ids are what the kernel uses. Pax global headers are ignored, as containerd does.
//! - **Entry types**: files (also the contiguous type), directories, symlinks, hardlinks,
//!   character and block devices, fifos, GNU long names and link names, pax records, and
//!   sparse files (old GNU, pax 0.0, 0.1 and 1.0), expanded. Other types (GNU volume labels,
//!   multi-volume parts, dump directories) are refused. Extension records larger than 1 MiB
//!   are refused, as Go's `archive/tar` does.
//! - **Size cap** (`--max-size`, [`FlattenOptions::max_size`]): it bounds every uncompressed
//!   byte produced, cumulatively over all layers: the decompressed tar streams (headers and
//!   trailing padding included) plus the holes of sparse files. That is at least the tree's
//!   size, so a tree that passes fits the cap, and it bounds the time, disk and memory a
//!   hostile layer (a decompression bomb, millions of tiny headers) can take. Reading stops as
//!   soon as the cap is passed. A file rewritten by several layers counts each time.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use flate2::bufread::MultiGzDecoder;

use crate::cache::Hasher;
use crate::image::{Compression, Layer};
use crate::progress::Progress;

mod spool;
use crate::tar as tarstream;
mod tree;

pub use spool::{Content, ContentReader};
pub use tree::ContentCopyError;
pub use tree::{Entry, Inode, InodeId, Kind, Tree, MAX_SYMLINKS};

use spool::{CopyError, SpoolWriter};
use tarstream::{EntryType, ReadError, SparseReader, TarReader};
use tree::{join, normalise, Nodes, Stop};

/// Read buffer for layer blobs.
const READ_BUF: usize = 1 << 20;
/// Chunks handed from the decompressing thread to the parsing one.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads.
const IN_FLIGHT: usize = 8;
/// Layers decompressed ahead of the one being applied: each holds at most [`IN_FLIGHT`]
/// chunks of [`CHUNK`] bytes until its turn comes.
pub const LAYERS_AHEAD: usize = 2;

/// Options of flattening.
#[derive(Debug, Clone)]
pub struct FlattenOptions {
    /// Largest total uncompressed size (`--max-size`): see the module documentation for what
    /// it counts.
    pub max_size: u64,
}

/// Errors of flattening.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// The spool file could not be created.
    #[error("cannot create the spool file in {path}")]
    SpoolCreate {
        /// The spool directory.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the spool file failed (a full disk, most likely).
    #[error("cannot write the spool file")]
    Spool(#[source] io::Error),
    /// The layer's blob file could not be read.
    #[error("cannot read layer {digest} from {path}")]
    Open {
        /// The layer's digest.
        digest: String,
        /// The blob file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The DiffID uses an algorithm that cannot be verified.
    #[error("layer {digest} has DiffID {diff_id}, whose algorithm is not supported")]
    DiffIdAlgorithm {
        /// The layer's digest.
        digest: String,
        /// The DiffID.
        diff_id: String,
    },
    /// The blob's bytes do not match the compression its media type announces.
    #[error("layer {digest} is declared {declared} by its media type {media_type}, but its bytes are {found}")]
    Compression {
        /// The layer's digest.
        digest: String,
        /// The media type.
        media_type: String,
        /// The compression it announces.
        declared: Compression,
        /// What the bytes are.
        found: String,
    },
    /// Decompressing or reading the tar stream failed.
    #[error("layer {digest} is not a valid {compression} tar stream")]
    Corrupt {
        /// The layer's digest.
        digest: String,
        /// Its compression.
        compression: Compression,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A malformed tar entry.
    #[error("layer {digest} has a malformed tar entry {path:?}: {why}")]
    Malformed {
        /// The layer's digest.
        digest: String,
        /// The entry's name, as far as it is known.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The uncompressed stream does not hash to the DiffID.
    #[error("layer {digest} has DiffID {actual}, but the image configuration says {expected}")]
    DiffId {
        /// The layer's digest.
        digest: String,
        /// The DiffID from the configuration.
        expected: String,
        /// What the stream hashed to.
        actual: String,
    },
    /// The size cap was passed.
    #[error("the image is larger than the limit of {max_size} bytes (--max-size), passed in layer {digest}")]
    TooLarge {
        /// The layer being read.
        digest: String,
        /// The cap.
        max_size: u64,
    },
    /// A name that leaves the root.
    #[error("layer {digest} has an entry {path:?} that leaves the image root")]
    Escape {
        /// The layer's digest.
        digest: String,
        /// The name as written.
        path: String,
    },
    /// A hardlink whose target leaves the root.
    #[error("layer {digest}: hard link {path:?} points to {target:?}, outside the image root")]
    HardlinkEscape {
        /// The layer's digest.
        digest: String,
        /// The link's name.
        path: String,
        /// The target as written.
        target: String,
    },
    /// A hardlink to nothing.
    #[error("layer {digest}: hard link {path:?} points to {target:?}, which does not exist")]
    HardlinkMissing {
        /// The layer's digest.
        digest: String,
        /// The link's name.
        path: String,
        /// The target as written.
        target: String,
    },
    /// A hardlink to a directory.
    #[error("layer {digest}: hard link {path:?} points to the directory {target:?}")]
    HardlinkToDir {
        /// The layer's digest.
        digest: String,
        /// The link's name.
        path: String,
        /// The target as written.
        target: String,
    },
    /// A whiteout that the spec does not allow.
    #[error("layer {digest} has an invalid whiteout {path:?}: {why}")]
    Whiteout {
        /// The layer's digest.
        digest: String,
        /// The entry's name.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A non-directory where an entry needs a directory.
    #[error("layer {digest}: {path:?} needs /{parent} to be a directory, but it is a {kind}")]
    NotADirectory {
        /// The layer's digest.
        digest: String,
        /// The entry's name.
        path: String,
        /// The path in the tree that is not a directory.
        parent: String,
        /// What it is.
        kind: &'static str,
    },
    /// A symlink loop, or a chain longer than [`MAX_SYMLINKS`].
    #[error("layer {digest}: too many levels of symbolic links resolving {path:?}")]
    SymlinkLoop {
        /// The layer's digest.
        digest: String,
        /// The name being resolved.
        path: String,
    },
    /// An entry that would replace the root directory with a non-directory.
    #[error("layer {digest}: {path:?} would replace the root directory with a {kind}")]
    RootReplaced {
        /// The layer's digest.
        digest: String,
        /// The entry's name.
        path: String,
        /// What it is.
        kind: &'static str,
    },
}

/// Applies `layers` in order into one tree; file contents are spooled under `spool_dir`.
pub fn flatten(
    layers: &[Layer],
    opts: &FlattenOptions,
    spool_dir: &Path,
    progress: &Progress,
) -> Result<Tree, FlattenError> {
    let mut spool = SpoolWriter::new(spool_dir).map_err(|source| FlattenError::SpoolCreate {
        path: spool_dir.display().to_string(),
        source,
    })?;
    let mut nodes = Nodes::new();
    let used = AtomicU64::new(0);
    std::thread::scope(|s| {
        // Started layers, in order; an error opening one is reported when its turn comes,
        // after the layers below it applied cleanly.
        let mut started = std::collections::VecDeque::new();
        let mut next = 0;
        for (index, layer) in layers.iter().enumerate() {
            while next < layers.len() && next <= index + LAYERS_AHEAD {
                let label = format!("layer {}/{}", next + 1, layers.len());
                let run = Run {
                    used: &used,
                    max_size: opts.max_size,
                };
                started.push_back(start_layer(s, &layers[next], run, progress, &label));
                next += 1;
            }
            let layer_run = started.pop_front().expect("started above")?;
            let mut cx = LayerCx {
                digest: layer.digest.to_string(),
                compression: layer.compression,
                index,
                nodes: &mut nodes,
                spool: &mut spool,
                used: &used,
                max_size: opts.max_size,
            };
            cx.finish_layer(layer, layer_run)?;
            tracing::debug!(layer = %layer.digest, entries = nodes.map.len(), spooled = spool.stored(), "applied a layer");
        }
        Ok::<(), FlattenError>(())
    })?;
    let spool = spool.finish().map_err(FlattenError::Spool)?;
    Ok(Tree { nodes, spool })
}

/// What the decompressing threads share: the count of bytes produced against the cap.
#[derive(Clone, Copy)]
struct Run<'a> {
    used: &'a AtomicU64,
    max_size: u64,
}

/// A layer whose decompressing thread runs.
struct Started<'scope> {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    producer: std::thread::ScopedJoinHandle<'scope, ()>,
    hasher: Hasher,
    bar: indicatif::ProgressBar,
}

/// Opens a layer, checks its first bytes against its media type and starts decompressing it
/// on a thread of `scope`.
fn start_layer<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    layer: &Layer,
    run: Run<'scope>,
    progress: &Progress,
    label: &str,
) -> Result<Started<'scope>, FlattenError> {
    let digest = || layer.digest.to_string();
    let hasher = Hasher::for_digest(&layer.diff_id).map_err(|_| FlattenError::DiffIdAlgorithm {
        digest: digest(),
        diff_id: layer.diff_id.to_string(),
    })?;
    let open_err = |source| FlattenError::Open {
        digest: digest(),
        path: layer.path.display().to_string(),
        source,
    };
    let file = File::open(&layer.path).map_err(open_err)?;
    let bar = progress.bytes(label, layer.size);
    let mut input = BufReader::with_capacity(
        READ_BUF,
        ProgressRead {
            inner: file,
            bar: bar.clone(),
        },
    );
    let head = input.fill_buf().map_err(open_err)?;
    let found = Compression::sniff(head);
    let matches = match (layer.compression, found) {
        (declared, Some(f)) => declared == f,
        (Compression::None, None) => tar_checksum_ok(head),
        (Compression::Zstd, None) => zstd_skippable(head),
        (Compression::Gzip, None) => false,
    };
    if !matches {
        bar.finish_and_clear();
        return Err(FlattenError::Compression {
            digest: digest(),
            media_type: layer.media_type.clone(),
            declared: layer.compression,
            found: describe(found, head),
        });
    }
    let (tx, rx) = mpsc::sync_channel(IN_FLIGHT);
    let compression = layer.compression;
    let producer = scope.spawn(move || produce(input, compression, run.used, run.max_size, tx));
    Ok(Started {
        rx,
        producer,
        hasher,
        bar,
    })
}

/// Marks the size cap in an I/O error crossing from the decompressing thread.
#[derive(Debug)]
struct CapPassed;

impl std::fmt::Display for CapPassed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the size cap was passed")
    }
}

impl std::error::Error for CapPassed {}

fn is_cap(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CapPassed>())
}

/// Counts compressed bytes read into the layer's progress bar.
struct ProgressRead<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for ProgressRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// The parsing side of the channel. It hashes the stream for the DiffID as the chunks come:
/// the decompressing thread has the most work, so the hash is done on this one.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    hasher: Hasher,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.hasher.update(&chunk);
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The producer is done: the end of the stream.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The decompressing side: decompresses to the end of the stream, counting, and hands the
/// bytes over. An error goes down the channel; the channel's end is the stream's.
fn produce(
    input: impl BufRead,
    compression: Compression,
    used: &AtomicU64,
    max_size: u64,
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
) {
    let mut dec: Box<dyn Read> = match compression {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(MultiGzDecoder::new(input)),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(input) {
            Ok(d) => Box::new(d),
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        },
    };
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0;
        while n < CHUNK {
            match dec.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
        buf.truncate(n);
        if used.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > max_size {
            let _ = tx.send(Err(io::Error::other(CapPassed)));
            return;
        }
        if tx.send(Ok(buf)).is_err() {
            // The parser stopped (on an error of its own).
            return;
        }
    }
}

/// Names the first bytes of a blob for the compression check.
fn describe(found: Option<Compression>, head: &[u8]) -> String {
    match found {
        Some(Compression::None) => "an uncompressed tar".into(),
        Some(c) => format!("{c}-compressed"),
        None => {
            let hex: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
            format!(
                "neither gzip, zstd nor tar (they start with {})",
                if hex.is_empty() {
                    "nothing".into()
                } else {
                    hex.join(" ")
                }
            )
        }
    }
}

/// A tar header whose checksum is right: an uncompressed tar, even without the POSIX magic.
fn tar_checksum_ok(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    let sum: u64 = head[..148]
        .iter()
        .chain(&head[156..512])
        .map(|b| *b as u64)
        .sum::<u64>()
        + 8 * b' ' as u64;
    let field = &head[148..156];
    let digits: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 8).ok())
        == Some(sum)
}

/// A zstd stream may start with a skippable frame (magic `0x184D2A5?`).
fn zstd_skippable(head: &[u8]) -> bool {
    head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18]
}

/// One layer being applied.
struct LayerCx<'a> {
    digest: String,
    compression: Compression,
    index: usize,
    nodes: &'a mut Nodes,
    spool: &'a mut SpoolWriter,
    used: &'a AtomicU64,
    max_size: u64,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl LayerCx<'_> {
    /// Parses a started layer's tar stream into the tree, then checks its DiffID.
    fn finish_layer(&mut self, layer: &Layer, started: Started<'_>) -> Result<(), FlattenError> {
        let Started {
            rx,
            producer,
            hasher,
            bar,
        } = started;
        let mut tr = TarReader::new(ChannelReader {
            rx,
            hasher,
            buf: Vec::new(),
            pos: 0,
        });
        let mut parsed = self.apply_entries(&mut tr);
        let mut rest = tr.into_inner();
        if parsed.is_ok() {
            // The DiffID covers the whole stream, past the end of the archive.
            parsed = io::copy(&mut rest, &mut io::sink())
                .map(drop)
                .map_err(|e| self.read_error(ReadError::Io(e)));
        }
        let ChannelReader { rx, hasher, .. } = rest;
        // Dropping the receiver stops the producer if it still runs (after an error here).
        drop(rx);
        producer
            .join()
            .expect("the decompressing thread does not panic");
        bar.finish_and_clear();
        parsed?;
        // The stream was read to its end without error: all of it went through the hasher.
        let actual = hasher.finish();
        if actual != layer.diff_id {
            return Err(FlattenError::DiffId {
                digest: self.digest.clone(),
                expected: layer.diff_id.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    fn read_error(&self, e: ReadError) -> FlattenError {
        match e {
            ReadError::Io(e) if is_cap(&e) => self.too_large(),
            ReadError::Io(source) => FlattenError::Corrupt {
                digest: self.digest.clone(),
                compression: self.compression,
                source,
            },
            ReadError::Invalid { path, why } => FlattenError::Malformed {
                digest: self.digest.clone(),
                path: lossy(&path),
                why,
            },
        }
    }

    fn too_large(&self) -> FlattenError {
        FlattenError::TooLarge {
            digest: self.digest.clone(),
            max_size: self.max_size,
        }
    }

    fn stop_error(&self, stop: Stop, path: &[u8]) -> FlattenError {
        match stop {
            Stop::NotDir(p) => FlattenError::NotADirectory {
                digest: self.digest.clone(),
                path: lossy(path),
                kind: self.nodes.kind_at(&p).map_or("nothing", Kind::name),
                parent: lossy(&p),
            },
            Stop::Loop | Stop::Missing => FlattenError::SymlinkLoop {
                digest: self.digest.clone(),
                path: lossy(path),
            },
        }
    }

    fn apply_entries<R: Read>(&mut self, tr: &mut TarReader<R>) -> Result<(), FlattenError> {
        while let Some(e) = tr.next_entry().map_err(|e| self.read_error(e))? {
            self.apply(e, tr)?;
        }
        Ok(())
    }

    fn inode(e: &tarstream::Entry, kind: Kind) -> Inode {
        Inode {
            kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e.xattrs.clone(),
        }
    }

    fn apply<R: Read>(
        &mut self,
        e: tarstream::Entry,
        tr: &mut TarReader<R>,
    ) -> Result<(), FlattenError> {
        let layer = self.index;
        let comps = normalise(&e.path).ok_or_else(|| FlattenError::Escape {
            digest: self.digest.clone(),
            path: lossy(&e.path),
        })?;
        let Some((base, dirs)) = comps.split_last() else {
            if e.kind == EntryType::Dir {
                self.nodes.inodes[0] = Self::inode(&e, Kind::Dir);
                return Ok(());
            }
            return Err(FlattenError::RootReplaced {
                digest: self.digest.clone(),
                path: lossy(&e.path),
                kind: match e.kind {
                    EntryType::Hardlink => "hard link",
                    EntryType::Symlink => "symlink",
                    EntryType::File => "file",
                    _ => "device or fifo",
                },
            });
        };
        let whiteout_error = |why| FlattenError::Whiteout {
            digest: self.digest.clone(),
            path: lossy(&e.path),
            why,
        };
        if dirs.iter().any(|c| c.starts_with(b".wh.")) {
            return Err(whiteout_error("a whiteout name cannot be a directory"));
        }
        if let Some(name) = base.strip_prefix(b".wh.") {
            let opaque = name == b".wh..opq";
            if !opaque {
                if name.starts_with(b".wh.") {
                    return Err(whiteout_error(
                        "the prefix .wh..wh. is reserved, and only .wh..wh..opq is defined",
                    ));
                }
                if name.is_empty() || name == b"." || name == b".." {
                    return Err(whiteout_error("it names no file"));
                }
            }
            let dir = match self.nodes.find_dir(dirs) {
                Ok(Some(d)) => d,
                // Nothing lower to remove there.
                Ok(None) | Err(Stop::NotDir(_)) => return Ok(()),
                Err(stop) => return Err(self.stop_error(stop, &e.path)),
            };
            if opaque {
                self.nodes.remove_lower(&dir, layer, false);
            } else {
                self.nodes.remove_lower(&join(&dir, name), layer, true);
            }
            return Ok(());
        }

        let parent = self
            .nodes
            .make_dirs(dirs, layer)
            .map_err(|stop| self.stop_error(stop, &e.path))?;
        let path = join(&parent, base);
        let kind = match e.kind {
            EntryType::Dir => {
                self.nodes.put_dir(path, Self::inode(&e, Kind::Dir), layer);
                return Ok(());
            }
            EntryType::Hardlink => {
                let target = self.link_target(&e)?;
                self.nodes.put(path, target, layer);
                return Ok(());
            }
            EntryType::File => Kind::File(self.read_content(&e, tr)?),
            EntryType::Symlink => Kind::Symlink(e.link.clone()),
            EntryType::Char => Kind::CharDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            EntryType::Block => Kind::BlockDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            EntryType::Fifo => Kind::Fifo,
        };
        let id = self.nodes.push(Self::inode(&e, kind));
        self.nodes.put(path, id, layer);
        Ok(())
    }

    fn read_content<R: Read>(
        &mut self,
        e: &tarstream::Entry,
        tr: &mut TarReader<R>,
    ) -> Result<Content, FlattenError> {
        let res = match &e.sparse {
            None => self.spool.add(tr, e.size),
            Some(map) => {
                let stored: u64 = map.iter().map(|c| c.1).sum();
                let holes = e.size - stored;
                if self.used.fetch_add(holes, Ordering::Relaxed) + holes > self.max_size {
                    return Err(self.too_large());
                }
                self.spool.add(SparseReader::new(tr, map, e.size), e.size)
            }
        };
        res.map_err(|err| match err {
            CopyError::Read(e) => self.read_error(ReadError::Io(e)),
            CopyError::Write(e) => FlattenError::Spool(e),
        })
    }

    /// The inode a hardlink entry points to.
    fn link_target(&self, e: &tarstream::Entry) -> Result<usize, FlattenError> {
        let (path, target) = (lossy(&e.path), lossy(&e.link));
        let digest = self.digest.clone();
        let comps = normalise(&e.link).ok_or_else(|| FlattenError::HardlinkEscape {
            digest: digest.clone(),
            path: path.clone(),
            target: target.clone(),
        })?;
        let to_dir = || FlattenError::HardlinkToDir {
            digest: digest.clone(),
            path: path.clone(),
            target: target.clone(),
        };
        let missing = || FlattenError::HardlinkMissing {
            digest: digest.clone(),
            path: path.clone(),
            target: target.clone(),
        };
        let Some((base, dirs)) = comps.split_last() else {
            return Err(to_dir());
        };
        let dir = match self.nodes.find_dir(dirs) {
            Ok(Some(d)) => d,
            Ok(None) | Err(Stop::NotDir(_)) => return Err(missing()),
            Err(stop) => return Err(self.stop_error(stop, &e.link)),
        };
        match self.nodes.map.get(&join(&dir, base)) {
            None => Err(missing()),
            Some(n) if self.nodes.inodes[n.inode].kind == Kind::Dir => Err(to_dir()),
            Some(n) => Ok(n.inode),
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod testutil;
