//! The compressions Linux uses for a bzImage's payload (and for modules), detected by their
//! magic numbers and decoded with a bound on the output size.
//!
//! The kernel's build appends the uncompressed size as 4 bytes after most payloads
//! (`size_append` in `scripts/Makefile.lib`); every decoder here stops at the end of its own
//! stream and ignores what follows.

use std::fmt;
use std::io::{self, Read};

/// The largest decompressed kernel (or module) accepted: a guard against decompression bombs.
/// Distribution vmlinux files are 40-80 MiB.
pub const MAX_OUTPUT: u64 = 256 << 20;

/// A compression format Linux uses for its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// gzip (`CONFIG_KERNEL_GZIP`).
    Gzip,
    /// bzip2 (`CONFIG_KERNEL_BZIP2`).
    Bzip2,
    /// Legacy `.lzma` (`lzma_alone`, `CONFIG_KERNEL_LZMA`).
    Lzma,
    /// xz, usually with the x86 BCJ filter (`CONFIG_KERNEL_XZ`).
    Xz,
    /// lzop (`CONFIG_KERNEL_LZO`).
    Lzo,
    /// LZ4's legacy frame (`CONFIG_KERNEL_LZ4`).
    Lz4,
    /// zstd (`CONFIG_KERNEL_ZSTD`).
    Zstd,
}

impl Compression {
    /// Every format, in the order the kernel's Kconfig lists them.
    pub const ALL: [Compression; 7] = [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Xz,
        Compression::Lzo,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The format `data` starts with, by its magic number.
    pub fn detect(data: &[u8]) -> Option<Compression> {
        const LZOP: &[u8] = b"\x89LZO\x00\r\n\x1a\n";
        if data.starts_with(&[0x1f, 0x8b]) || data.starts_with(&[0x1f, 0x9e]) {
            Some(Compression::Gzip)
        } else if data.starts_with(b"BZh") {
            Some(Compression::Bzip2)
        } else if data.starts_with(b"\xfd7zXZ\x00") {
            Some(Compression::Xz)
        } else if data.starts_with(LZOP) {
            Some(Compression::Lzo)
        } else if data.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
            Some(Compression::Lz4)
        } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else if data.starts_with(&[0x5d, 0x00, 0x00]) {
            // `.lzma` has no magic; Linux's own check (lib/decompress.c) is this prefix: the
            // properties byte lc=3 lp=0 pb=2 and a dictionary size below 16 MiB.
            Some(Compression::Lzma)
        } else {
            None
        }
    }

    /// The name Linux uses (`CONFIG_KERNEL_<NAME>`, `CONFIG_RD_<NAME>`), lower-case.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why decompressing failed.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// The output would be larger than the limit.
    #[error("decompresses to more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The stream is corrupt.
    #[error("corrupt {compression} data")]
    Corrupt {
        /// The format.
        compression: Compression,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Decode `data`, compressed with `compression`, into at most `limit` bytes.
pub fn decompress(
    compression: Compression,
    data: &[u8],
    limit: u64,
) -> Result<Vec<u8>, DecompressError> {
    let corrupt = |source| DecompressError::Corrupt {
        compression,
        source,
    };
    match compression {
        Compression::Lz4 => return lz4_legacy(data, limit),
        Compression::Lzo => return lzop(data, limit),
        _ => {}
    }
    let reader: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
        Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(data)),
        Compression::Xz => Box::new(lzma_rust2::XzReader::new(data, false)),
        Compression::Lzma => Box::new(
            lzma_rust2::LzmaReader::new_mem_limit(data, u32::MAX, None)
                .map_err(|e| corrupt(io::Error::other(e)))?,
        ),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(data).map_err(corrupt)?;
            // `zstd -22 --ultra`, which the kernel's build uses, may need a 128 MiB window; the
            // decoder's default refuses more than 128 MiB (log 27).
            d.window_log_max(31).map_err(corrupt)?;
            Box::new(d.single_frame())
        }
        Compression::Lz4 | Compression::Lzo => unreachable!("handled above"),
    };
    read_bounded(reader, limit).map_err(|e| match e {
        Bounded::TooLarge => DecompressError::TooLarge { limit },
        Bounded::Io(source) => corrupt(source),
    })
}

enum Bounded {
    TooLarge,
    Io(io::Error),
}

fn read_bounded(reader: impl Read, limit: u64) -> Result<Vec<u8>, Bounded> {
    let mut out = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(Bounded::Io)?;
    if out.len() as u64 > limit {
        return Err(Bounded::TooLarge);
    }
    Ok(out)
}

/// The magic number of LZ4's legacy frame, which `lz4 -l` writes and the kernel reads.
pub const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// The legacy frame's uncompressed block size.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decode LZ4's legacy frame: the magic, then blocks each prefixed with its compressed size as a
/// u32 LE, each decompressing to at most 8 MiB. Another magic may start a new frame; what
/// cannot be a block (the kernel's appended size) ends the stream, as in Linux's
/// `lib/decompress_unlz4.c`.
fn lz4_legacy(data: &[u8], limit: u64) -> Result<Vec<u8>, DecompressError> {
    let corrupt = |why: String| DecompressError::Corrupt {
        compression: Compression::Lz4,
        source: io::Error::new(io::ErrorKind::InvalidData, why),
    };
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 4;
    let bound = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;
    while let Some(word) = data.get(pos..pos + 4) {
        let size = u32::from_le_bytes(word.try_into().expect("four bytes"));
        pos += 4;
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = size as usize;
        if size == 0 || size > bound || size > data.len() - pos {
            // The kernel's build appends the uncompressed size after the last block.
            if pos == data.len() {
                break;
            }
            return Err(corrupt(format!(
                "bad block size {size} at offset {}",
                pos - 4
            )));
        }
        let n = lz4_flex::block::decompress_into(&data[pos..pos + size], &mut block)
            .map_err(|e| corrupt(e.to_string()))?;
        if (out.len() + n) as u64 > limit {
            return Err(DecompressError::TooLarge { limit });
        }
        out.extend_from_slice(&block[..n]);
        pos += size;
    }
    Ok(out)
}

/// Decode an lzop file (one member) with LZO1X blocks, the way Linux's `lib/decompress_unlzo.c`
/// reads it: checksums are skipped, not verified.
fn lzop(data: &[u8], limit: u64) -> Result<Vec<u8>, DecompressError> {
    const F_ADLER32_D: u32 = 0x1;
    const F_ADLER32_C: u32 = 0x2;
    const F_H_EXTRA_FIELD: u32 = 0x40;
    const F_CRC32_D: u32 = 0x100;
    const F_CRC32_C: u32 = 0x200;
    const F_H_FILTER: u32 = 0x800;
    const MAX_BLOCK: usize = 64 << 20;
    let corrupt = |why: &str| DecompressError::Corrupt {
        compression: Compression::Lzo,
        source: io::Error::new(io::ErrorKind::InvalidData, why.to_string()),
    };
    let mut r = ByteReader { data, pos: 9 };
    let truncated = || corrupt("truncated lzop header");
    let version = r.be16().ok_or_else(truncated)?;
    r.skip(2).ok_or_else(truncated)?; // library version
    if version >= 0x0940 {
        r.skip(2).ok_or_else(truncated)?; // version needed to extract
    }
    let method = r.u8().ok_or_else(truncated)?;
    if !(1..=3).contains(&method) {
        return Err(corrupt("not an LZO1X lzop file"));
    }
    if version >= 0x0940 {
        r.skip(1).ok_or_else(truncated)?; // level
    }
    let flags = r.be32().ok_or_else(truncated)?;
    if flags & F_H_FILTER != 0 {
        r.skip(4).ok_or_else(truncated)?;
    }
    r.skip(8).ok_or_else(truncated)?; // mode, mtime low
    if version >= 0x0940 {
        r.skip(4).ok_or_else(truncated)?; // mtime high
    }
    let name_len = r.u8().ok_or_else(truncated)?;
    r.skip(usize::from(name_len) + 4).ok_or_else(truncated)?; // name, header checksum
    if flags & F_H_EXTRA_FIELD != 0 {
        let len = r.be32().ok_or_else(truncated)?;
        r.skip(len as usize + 4).ok_or_else(truncated)?;
    }
    let mut out = Vec::new();
    loop {
        let truncated = || corrupt("truncated lzop block");
        let dst_len = r.be32().ok_or_else(truncated)? as usize;
        if dst_len == 0 {
            break;
        }
        if dst_len > MAX_BLOCK {
            return Err(corrupt("lzop block too large"));
        }
        let src_len = r.be32().ok_or_else(truncated)? as usize;
        let mut skip = 0;
        if flags & F_ADLER32_D != 0 {
            skip += 4;
        }
        if flags & F_CRC32_D != 0 {
            skip += 4;
        }
        if src_len < dst_len {
            if flags & F_ADLER32_C != 0 {
                skip += 4;
            }
            if flags & F_CRC32_C != 0 {
                skip += 4;
            }
        }
        r.skip(skip).ok_or_else(truncated)?;
        let src = r.take(src_len).ok_or_else(truncated)?;
        if (out.len() + dst_len) as u64 > limit {
            return Err(DecompressError::TooLarge { limit });
        }
        if src_len == dst_len {
            out.extend_from_slice(src);
        } else if src_len > dst_len {
            return Err(corrupt("lzop block larger than its output"));
        } else {
            let start = out.len();
            lzo1x_decompress(src, &mut out, dst_len).map_err(corrupt)?;
            if out.len() - start != dst_len {
                return Err(corrupt("lzop block decodes to the wrong size"));
            }
        }
    }
    Ok(out)
}

struct ByteReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(drop)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn be16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn be32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// Decode one LZO1X block into `out` (appending at most `max` bytes), following the format as
/// Linux documents it (`Documentation/staging/lzo.rst`). Matches refer back only into this
/// block's output.
fn lzo1x_decompress(src: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), &'static str> {
    const TRUNCATED: &str = "truncated LZO1X block";
    let base = out.len();
    let end = base + max;
    let mut r = ByteReader { data: src, pos: 0 };
    let literal = |r: &mut ByteReader, out: &mut Vec<u8>, n: usize| -> Result<(), &'static str> {
        if out.len() + n > end {
            return Err("LZO1X literal past the block's end");
        }
        out.extend_from_slice(r.take(n).ok_or(TRUNCATED)?);
        Ok(())
    };
    let copy = |out: &mut Vec<u8>, distance: usize, len: usize| -> Result<(), &'static str> {
        if distance == 0 || distance > out.len() - base {
            return Err("LZO1X match before the block's start");
        }
        if out.len() + len > end {
            return Err("LZO1X match past the block's end");
        }
        let from = out.len() - distance;
        for i in 0..len {
            let b = out[from + i];
            out.push(b);
        }
        Ok(())
    };
    // A length that continues in zero bytes (255 each) and a final non-zero byte.
    let long_len = |r: &mut ByteReader, add: usize| -> Result<usize, &'static str> {
        let mut len = add;
        loop {
            let b = r.u8().ok_or(TRUNCATED)?;
            if b != 0 {
                return Ok(len + usize::from(b));
            }
            len += 255;
            if len > end {
                return Err("LZO1X length too large");
            }
        }
    };
    // `state`: how many literals the last instruction copied (4: a long literal run).
    let mut state;
    let first = *src.first().ok_or(TRUNCATED)?;
    if first >= 22 {
        r.pos = 1;
        literal(&mut r, out, usize::from(first) - 17)?;
        state = 4;
    } else if first >= 18 {
        r.pos = 1;
        state = usize::from(first) - 17;
        literal(&mut r, out, state)?;
    } else {
        state = 0;
    }
    loop {
        let inst = usize::from(r.u8().ok_or(TRUNCATED)?);
        let (distance, len, next);
        if inst >= 64 {
            // 1 L L D D D S S or 0 1 L D D D S S, then H: distance = (H << 3) + D + 1.
            let h = usize::from(r.u8().ok_or(TRUNCATED)?);
            distance = (h << 3) + ((inst >> 2) & 7) + 1;
            len = if inst >= 128 {
                5 + ((inst >> 5) & 3)
            } else {
                3 + ((inst >> 5) & 1)
            };
            next = inst & 3;
        } else if inst >= 32 {
            // 0 0 1 L L L L L, then LE16 D..D S S: distance = D + 1.
            let l = inst & 31;
            len = 2 + if l == 0 { long_len(&mut r, 31)? } else { l };
            let v = usize::from(r.be16_le().ok_or(TRUNCATED)?);
            distance = (v >> 2) + 1;
            next = v & 3;
        } else if inst >= 16 {
            // 0 0 0 1 H L L L, then LE16 D..D S S: distance = 16384 + (H << 14) + D.
            let l = inst & 7;
            len = 2 + if l == 0 { long_len(&mut r, 7)? } else { l };
            let v = usize::from(r.be16_le().ok_or(TRUNCATED)?);
            distance = 16384 + ((inst & 8) << 11) + (v >> 2);
            next = v & 3;
            if distance == 16384 {
                return if r.pos == src.len() {
                    Ok(())
                } else {
                    Err("data after the LZO1X end marker")
                };
            }
        } else if state == 0 {
            // 0 0 0 0 L L L L: a literal run of 3 + L bytes (L = 0: a long length).
            let n = 3 + if inst == 0 {
                long_len(&mut r, 15)?
            } else {
                inst
            };
            literal(&mut r, out, n)?;
            state = 4;
            continue;
        } else {
            // 0 0 0 0 D D S S, then H: 2 bytes at (H << 2) + D + 1 after a short literal run,
            // 3 bytes at (H << 2) + D + 2049 after a long one.
            let h = usize::from(r.u8().ok_or(TRUNCATED)?);
            if state == 4 {
                distance = (h << 2) + ((inst >> 2) & 3) + 2049;
                len = 3;
            } else {
                distance = (h << 2) + ((inst >> 2) & 3) + 1;
                len = 2;
            }
            next = inst & 3;
        }
        copy(out, distance, len)?;
        literal(&mut r, out, next)?;
        state = next;
    }
}

impl ByteReader<'_> {
    fn be16_le(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Compress `data` with an external tool (`args` on stdin to stdout), or None when the tool
    /// is not installed.
    pub(crate) fn compress_with(tool: &str, args: &[&str], data: &[u8]) -> Option<Vec<u8>> {
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take().unwrap();
        let input = data.to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(&input).unwrap();
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "{tool} {args:?} failed");
        Some(out.stdout)
    }

    /// The command line the kernel's build uses for each format (`scripts/Makefile.lib`),
    /// without the appended size.
    pub(crate) fn kernel_compressor(c: Compression) -> (&'static str, &'static [&'static str]) {
        match c {
            Compression::Gzip => ("gzip", &["-n", "-9", "-c"]),
            Compression::Bzip2 => ("bzip2", &["-9", "-c"]),
            Compression::Lzma => ("lzma", &["-9", "-c"]),
            Compression::Xz => (
                "xz",
                &["--check=crc32", "--x86", "--lzma2=dict=32MiB", "-c"],
            ),
            Compression::Lzo => ("lzop", &["-9", "-c"]),
            Compression::Lz4 => ("lz4", &["-l", "-9", "-c"]),
            Compression::Zstd => ("zstd", &["-22", "--ultra", "-c", "-q"]),
        }
    }

    /// Sample data with repeats at every distance range LZO1X encodes, and incompressible runs.
    pub(crate) fn sample(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut x: u32 = 12345;
        while out.len() < len {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            match x >> 29 {
                0 | 1 => out.extend_from_slice(&x.to_le_bytes()),
                2 => out.extend(std::iter::repeat_n(
                    (x >> 8) as u8,
                    (x >> 16) as usize % 300,
                )),
                _ => {
                    let back = 1 + (x >> 8) as usize % 60000;
                    let n = 2 + (x >> 20) as usize % 400;
                    if back <= out.len() {
                        let from = out.len() - back;
                        for i in 0..n {
                            let b = out[from + i];
                            out.push(b);
                        }
                    }
                }
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn every_kernel_compression_round_trips() {
        let data = sample(3 << 20);
        for c in Compression::ALL {
            let (tool, args) = kernel_compressor(c);
            let Some(mut packed) = compress_with(tool, args, &data) else {
                panic!("`{tool}` is not installed (scripts/install-vm.sh installs it)");
            };
            assert_eq!(Compression::detect(&packed), Some(c), "{c}");
            packed.extend_from_slice(&(data.len() as u32).to_le_bytes());
            let got = decompress(c, &packed, MAX_OUTPUT).unwrap_or_else(|e| panic!("{c}: {e:?}"));
            assert!(got == data, "{c}: output differs");
            let small = decompress(c, &packed, 1 << 20);
            assert!(
                matches!(small, Err(DecompressError::TooLarge { .. })),
                "{c}: {small:?}"
            );
        }
    }

    #[test]
    fn lzo_handles_short_and_incompressible_inputs() {
        for data in [
            b"a".to_vec(),
            b"hello hello hello hello".to_vec(),
            sample(100),
            {
                let mut x = 7u64;
                (0..300_000)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            },
        ] {
            for level in ["-1", "-9"] {
                let Some(packed) = compress_with("lzop", &[level, "-c"], &data) else {
                    return;
                };
                assert_eq!(
                    decompress(Compression::Lzo, &packed, MAX_OUTPUT).unwrap(),
                    data
                );
            }
        }
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let data = sample(200_000);
        for c in Compression::ALL {
            let (tool, args) = kernel_compressor(c);
            let Some(packed) = compress_with(tool, args, &data) else {
                continue;
            };
            for cut in [packed.len() / 2, packed.len() - 9] {
                assert!(
                    decompress(c, &packed[..cut], MAX_OUTPUT).is_err(),
                    "{c} cut {cut}"
                );
            }
            let mut flipped = packed.clone();
            for i in (40..flipped.len()).step_by(97) {
                flipped[i] ^= 0x55;
            }
            // Only the absence of a panic matters here; some formats have no checksum.
            let _ = decompress(c, &flipped, MAX_OUTPUT);
        }
    }
}
