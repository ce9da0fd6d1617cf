//! SquashFS data blocks compressed ahead of the writer, on several threads.
//!
//! `backhand`'s writer compresses one block at a time, on the thread that writes the image,
//! and zstd is most of a SquashFS root's build time. Its compressor is a trait object
//! ([`CompressionAction`]) called with each block's bytes, and which blocks will come is
//! known in advance (`squashfs::predicted_blocks` works it out): the data blocks of the
//! files, in the writer's order, with the fragment blocks that pack the small files between
//! them. Worker threads read those blocks from the spool and compress them, at most
//! [`WINDOW`] blocks ahead of the writer; the writer's own calls take a finished block when
//! its bytes are exactly the ones asked for, else compress on the spot (metadata, or any
//! block the prediction got wrong). While the block it needs is still being made, the writer
//! makes the next one nobody has taken rather than wait.
//!
//! The image's bytes do not depend on any of this: a block's compressed form is a function of
//! its bytes and the level (each thread keeps one zstd context, which zstd resets for every
//! block), and a precompressed block is only used for the very bytes it was made from. A
//! wrong prediction costs time, never correctness.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use backhand::compression::{CompressionAction, Compressor, DefaultCompressor};
use backhand::{BackhandError, FilesystemCompressor, SuperBlock};

/// Blocks compressed ahead of the writer at most (each holds its input and output: 4 MiB at
/// most for 128 KiB blocks).
pub(crate) const WINDOW: usize = 16;

/// One predicted block: where its bytes are in the spool, in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Block {
    /// `(offset, length)` in the spool: one range for a data block, the packed files' for a
    /// fragment block.
    pub(crate) ranges: Vec<(u64, u32)>,
    /// A fragment block, which the writer compresses even when it is all zeros.
    pub(crate) fragment: bool,
}

impl Block {
    pub(crate) fn len(&self) -> usize {
        self.ranges.iter().map(|(_, l)| *l as usize).sum()
    }
}

/// A finished block.
enum Done {
    /// All zeros: the writer stores a hole and never asks for it.
    Zero,
    /// Its bytes and their compressed form.
    Compressed { input: Vec<u8>, output: Vec<u8> },
    /// It could not be read or compressed here; the writer compresses what it is given.
    Failed,
}

struct State {
    /// The next block a thread may take.
    claimed: usize,
    /// The next block the writer will ask for.
    next: usize,
    done: BTreeMap<usize, Done>,
    stop: bool,
    /// Calls answered with a block made ahead, and calls compressed on the spot.
    hits: u64,
    misses: u64,
}

/// The blocks of one image being written, and the threads' meeting point.
struct Shared {
    level: i32,
    spool: File,
    blocks: Vec<Block>,
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    /// Reads and compresses block `i`.
    fn make(&self, i: usize) -> Done {
        let b = &self.blocks[i];
        let mut input = vec![0u8; b.len()];
        let mut at = 0;
        for &(offset, len) in &b.ranges {
            let end = at + len as usize;
            if self
                .spool
                .read_exact_at(&mut input[at..end], offset)
                .is_err()
            {
                return Done::Failed;
            }
            at = end;
        }
        if !b.fragment && input.iter().all(|x| *x == 0) {
            return Done::Zero;
        }
        match zstd_block(self.level, &input) {
            Ok(output) => Done::Compressed { input, output },
            Err(_) => Done::Failed,
        }
    }

    /// A worker: takes blocks in order, within the window, until there are none or the image
    /// is written.
    fn work(&self) {
        let mut st = self
            .state
            .lock()
            .expect("no thread panics holding the lock");
        loop {
            while !st.stop && st.claimed < self.blocks.len() && st.claimed >= st.next + WINDOW {
                st = self
                    .cond
                    .wait(st)
                    .expect("no thread panics holding the lock");
            }
            if st.stop || st.claimed >= self.blocks.len() {
                return;
            }
            st = self.make_next(st);
        }
    }

    /// Takes the next block nobody has taken, makes it with the lock released, and files it.
    fn make_next<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let i = st.claimed;
        st.claimed += 1;
        drop(st);
        let done = self.make(i);
        let mut st = self
            .state
            .lock()
            .expect("no thread panics holding the lock");
        st.done.insert(i, done);
        self.cond.notify_all();
        st
    }

    /// The writer's call: the compressed form of `bytes`.
    fn compress(&self, bytes: &[u8]) -> Result<Vec<u8>, BackhandError> {
        let mut st = self
            .state
            .lock()
            .expect("no thread panics holding the lock");
        loop {
            let next = st.next;
            if next >= self.blocks.len() {
                break;
            }
            match st.done.remove(&next) {
                Some(Done::Zero | Done::Failed) => {
                    st.next += 1;
                    self.cond.notify_all();
                }
                Some(Done::Compressed { input, output }) => {
                    if input.as_slice() != bytes {
                        // Not this block (metadata, or a wrong prediction): it waits for its
                        // own call.
                        st.done.insert(next, Done::Compressed { input, output });
                        break;
                    }
                    st.next += 1;
                    st.hits += 1;
                    self.cond.notify_all();
                    return Ok(output);
                }
                None if st.claimed < self.blocks.len() && st.claimed < next + WINDOW => {
                    // Rather than wait for a worker, this thread makes the next block nobody
                    // has taken: this one, or one a little further on.
                    st = self.make_next(st);
                }
                None => {
                    // A worker is making it.
                    st = self
                        .cond
                        .wait(st)
                        .expect("no thread panics holding the lock");
                }
            }
        }
        st.misses += 1;
        drop(st);
        zstd_block(self.level, bytes)
    }
}

thread_local! {
    /// This thread's zstd context and its level.
    static CONTEXT: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
}

/// One block compressed as `backhand` compresses it (`ZSTD_compress2` at `level`), with the
/// thread's context.
fn zstd_block(level: i32, bytes: &[u8]) -> Result<Vec<u8>, BackhandError> {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        let (_, z) = c.as_mut().expect("set above");
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(bytes.len()));
        z.compress_to_buffer(bytes, &mut out)?;
        Ok(out)
    })
}

/// How the compression of one image went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AheadStats {
    /// Blocks predicted.
    pub(crate) predicted: u64,
    /// Writer calls answered with a block made ahead.
    pub(crate) made_ahead: u64,
    /// Writer calls compressed on the spot (metadata, and blocks predicted wrong).
    pub(crate) made_on_the_spot: u64,
}

/// The compressor given to the writer. The writer's API wants it `'static`, so one is leaked
/// per image written (a few bytes); what it holds for the image is released by
/// [`Ahead::finish`].
pub(crate) struct Ahead {
    shared: Mutex<Option<Arc<Shared>>>,
}

impl Ahead {
    /// A compressor for zstd at `level` that expects `blocks`, read from `spool`.
    pub(crate) fn leak(level: i32, spool: File, blocks: Vec<Block>) -> &'static Self {
        let shared = Shared {
            level,
            spool,
            blocks,
            state: Mutex::new(State {
                claimed: 0,
                next: 0,
                done: BTreeMap::new(),
                stop: false,
                hits: 0,
                misses: 0,
            }),
            cond: Condvar::new(),
        };
        Box::leak(Box::new(Self {
            shared: Mutex::new(Some(Arc::new(shared))),
        }))
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared
            .lock()
            .expect("no thread panics holding the lock")
            .clone()
    }

    /// Runs one worker until the blocks run out or [`Ahead::finish`] is called.
    pub(crate) fn work(&self) {
        if let Some(s) = self.shared() {
            s.work();
        }
    }

    /// Stops the workers and drops what they made; says how the prediction went.
    pub(crate) fn finish(&self) -> AheadStats {
        let shared = self
            .shared
            .lock()
            .expect("no thread panics holding the lock")
            .take();
        let Some(s) = shared else {
            return AheadStats::default();
        };
        let mut st = s.state.lock().expect("no thread panics holding the lock");
        st.stop = true;
        let stats = AheadStats {
            predicted: s.blocks.len() as u64,
            made_ahead: st.hits,
            made_on_the_spot: st.misses,
        };
        drop(st);
        s.cond.notify_all();
        tracing::debug!(?stats, "squashfs blocks compressed");
        stats
    }
}

impl CompressionAction for Ahead {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Self::Compressor,
    ) -> Result<(), Self::Error> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        _fc: Self::FilesystemCompressor,
        _block_size: u32,
    ) -> Result<Vec<u8>, Self::Error> {
        match self.shared() {
            Some(s) => s.compress(bytes),
            None => Err(BackhandError::StdIo(std::io::Error::other(
                "the image was already written",
            ))),
        }
    }

    fn compression_options(
        &self,
        superblock: &mut Self::SuperBlock,
        kind: &backhand::kind::Kind,
        fs_compressor: Self::FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, Self::Error> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}
