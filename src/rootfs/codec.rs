//! The initramfs compressions: which one to use for a kernel, and the encoders.
//!
//! Each encoder writes what the kernel's own decompressor (`lib/decompress_*.c`, picked by the
//! magic number in `init/initramfs.c`) reads:
//! - gzip: one member, no name, mtime 0 (deterministic).
//! - zstd: one frame with a content checksum, single-threaded (the bytes do not depend on the
//!   machine). The default level 3 gives a 2 MiB window; Linux reads windows up to 8 MiB in
//!   every version that has `CONFIG_RD_ZSTD`, so levels up to 19 are accepted (long-distance
//!   mode is never used).
//! - xz: one stream with a CRC32 check and the LZMA2 filter alone; the kernel's xz decoder
//!   has no CRC64 or SHA-256 unless built for them.
//! - lz4: the *legacy* frame (magic `0x184C2102`, then `u32` little-endian block sizes with
//!   blocks of 8 MiB of input each), the only LZ4 format `lib/decompress_unlz4.c` reads. That
//!   decoder stops only when its input is exhausted, so an lz4 initramfs must be the last
//!   thing in the initrd (it is: nothing is appended).

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use crate::kernel::{Compression, KernelConfig};

/// A compression for the initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// No compression: the bare cpio.
    None,
    /// gzip (`CONFIG_RD_GZIP`, on in every distribution kernel).
    Gzip,
    /// zstd (`CONFIG_RD_ZSTD`, Linux >= 5.9): small and the fastest to unpack per byte saved.
    Zstd,
    /// xz (`CONFIG_RD_XZ`): smallest, slow to write and to unpack.
    Xz,
    /// LZ4, legacy frame (`CONFIG_RD_LZ4`): fastest to unpack, biggest.
    Lz4,
}

impl Codec {
    /// The compressed codecs, best first: zstd unpacks fast in the guest and is small; gzip
    /// is what every kernel reads; LZ4 is fast but big; xz is small but slow both ways.
    pub const PREFERENCE: [Codec; 4] = [Codec::Zstd, Codec::Gzip, Codec::Lz4, Codec::Xz];

    /// The best codec among those a kernel enables (in any order); [`Codec::None`] when it
    /// enables none of them (an uncompressed cpio is always read).
    pub fn best_of(enabled: &[Codec]) -> Codec {
        Self::PREFERENCE
            .into_iter()
            .find(|c| enabled.contains(c))
            .unwrap_or(Codec::None)
    }

    /// The codec for one of the kernel's compressions, if oci2uk can write it (bzip2, lzma
    /// and lzo are read by Linux but not written here).
    pub fn from_kernel(c: Compression) -> Option<Codec> {
        match c {
            Compression::Gzip => Some(Codec::Gzip),
            Compression::Zstd => Some(Codec::Zstd),
            Compression::Xz => Some(Codec::Xz),
            Compression::Lz4 => Some(Codec::Lz4),
            Compression::Bzip2 | Compression::Lzma | Compression::Lzo => None,
        }
    }

    /// The best codec for a kernel with configuration `config` (its `CONFIG_RD_*` options);
    /// gzip when the configuration is unknown, as `CONFIG_RD_GZIP` defaults to on.
    pub fn for_kernel(config: Option<&KernelConfig>) -> Codec {
        match config {
            Some(config) => {
                let enabled: Vec<Codec> = config
                    .initramfs_compressions()
                    .into_iter()
                    .filter_map(Codec::from_kernel)
                    .collect();
                Codec::best_of(&enabled)
            }
            None => Codec::Gzip,
        }
    }

    /// The name: `none`, `gzip`, `zstd`, `xz`, `lz4`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
            Codec::Xz => "xz",
            Codec::Lz4 => "lz4",
        }
    }

    /// The default level: gzip 6, zstd 3, xz 6 (LZ4 and none have no level).
    pub fn default_level(self) -> i32 {
        match self {
            Codec::Gzip | Codec::Xz => 6,
            Codec::Zstd => 3,
            Codec::None | Codec::Lz4 => 0,
        }
    }

    /// The levels accepted.
    pub fn levels(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Codec::Gzip => 1..=9,
            // Above 19 zstd's window grows past the 8 MiB Linux decodes.
            Codec::Zstd => 1..=19,
            Codec::Xz => 0..=9,
            Codec::None | Codec::Lz4 => 0..=0,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A codec name that is not one of [`Codec`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown initramfs compression {0:?} (expected none, gzip, zstd, xz or lz4)")]
pub struct UnknownCodec(pub String);

impl FromStr for Codec {
    type Err = UnknownCodec;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Codec::None),
            "gzip" => Ok(Codec::Gzip),
            "zstd" => Ok(Codec::Zstd),
            "xz" => Ok(Codec::Xz),
            "lz4" => Ok(Codec::Lz4),
            _ => Err(UnknownCodec(s.to_string())),
        }
    }
}

/// An encoder for one codec, writing into `W`.
pub(crate) enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(lzma_rust2::XzWriter<W>),
    Lz4(Lz4Legacy<W>),
}

impl<W: Write> Encoder<W> {
    /// An encoder at `level` (already checked against [`Codec::levels`]).
    pub(crate) fn new(codec: Codec, level: i32, w: W) -> io::Result<Self> {
        Ok(match codec {
            Codec::None => Encoder::None(w),
            Codec::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                w,
                flate2::Compression::new(level.unsigned_abs()),
            )),
            Codec::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, level)?;
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
            Codec::Xz => {
                let mut o = lzma_rust2::XzOptions::with_preset(level.unsigned_abs());
                o.set_check_sum_type(lzma_rust2::CheckType::Crc32);
                Encoder::Xz(lzma_rust2::XzWriter::new(w, o)?)
            }
            Codec::Lz4 => Encoder::Lz4(Lz4Legacy::new(w)?),
        })
    }

    /// Ends the stream and gives the writer back.
    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
            Encoder::Lz4(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
            Encoder::Lz4(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::Lz4(e) => e.flush(),
        }
    }
}

/// The LZ4 legacy frame's magic number.
pub(crate) const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// The input of one legacy block: `LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE` in
/// `lib/decompress_unlz4.c`, the most a block may decode to.
pub(crate) const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// The LZ4 legacy frame: magic, then independent blocks each preceded by its compressed size.
pub(crate) struct Lz4Legacy<W: Write> {
    w: W,
    block: Vec<u8>,
    out: Vec<u8>,
}

impl<W: Write> Lz4Legacy<W> {
    fn new(mut w: W) -> io::Result<Self> {
        w.write_all(&LZ4_LEGACY_MAGIC.to_le_bytes())?;
        Ok(Self {
            w,
            block: Vec::with_capacity(LZ4_LEGACY_BLOCK),
            out: Vec::new(),
        })
    }

    fn emit(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        self.out.resize(
            lz4_flex::block::get_maximum_output_size(self.block.len()),
            0,
        );
        let n =
            lz4_flex::block::compress_into(&self.block, &mut self.out).map_err(io::Error::other)?;
        let len = u32::try_from(n).map_err(io::Error::other)?;
        self.w.write_all(&len.to_le_bytes())?;
        self.w.write_all(&self.out[..n])?;
        self.block.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        self.emit()?;
        self.w.flush()?;
        Ok(self.w)
    }
}

impl<W: Write> Write for Lz4Legacy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(LZ4_LEGACY_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == LZ4_LEGACY_BLOCK {
            self.emit()?;
        }
        Ok(n)
    }

    /// Blocks are cut at 8 MiB only (smaller ones compress worse), so a flush leaves the
    /// pending block as it is.
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
