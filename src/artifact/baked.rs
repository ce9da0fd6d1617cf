//! Reading a baked file back: the command line, the memory record, the initramfs and the
//! launch configuration inside it, without booting it (for `push` and `inspect`).
//!
//! The bake's segment is the PT_LOAD with the highest physical address; its parts are at the
//! offsets in [`crate::bake::segment`]: the command line at `CMDLINE_OFFSET`, the module list
//! entry (the initramfs's address and size) at `MODLIST_OFFSET`. The Xen notes that point into
//! it say how the file boots.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci2uk_config::guest;
use oci2uk_config::Config as RumpConfig;

use crate::bake::pvh::COMMAND_LINE_SIZE;
use crate::bake::segment::{CMDLINE_OFFSET, INITRAMFS_OFFSET, MODLIST_OFFSET};
use crate::cache::Hasher;
use crate::kernel::decompress::Compression;
use crate::kernel::elf;
use crate::kernel::{XEN_ELFNOTE_ENTRY, XEN_ELFNOTE_PHYS32_ENTRY};

/// The boot path of a file whose PVH entry (`XEN_ELFNOTE_PHYS32_ENTRY`) is the bake's stub:
/// QEMU's `-kernel`, Firecracker, Cloud Hypervisor, Xen `type = "pvh"`.
pub const BOOT_PVH: &str = "pvh";
/// The boot path of a file whose Xen PV entry (`XEN_ELFNOTE_ENTRY`) is the bake's stub: Xen
/// `type = "pv"`.
pub const BOOT_XEN_PV: &str = "xen-pv";
/// The largest note segment read.
const MAX_NOTES: u64 = 64 << 10;

/// The largest launch configuration read back.
const MAX_CONFIG: u64 = 4 << 20;

/// Why a file cannot be read as a baked file.
#[derive(Debug, thiserror::Error)]
pub enum BakedError {
    /// Reading failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not one `oci2uk build` writes.
    #[error("{path} is not a file baked by oci2uk: {why}")]
    NotBaked {
        /// The file.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
}

/// What a baked file holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BakedInfo {
    /// The file's size.
    pub size: u64,
    /// sha256 of the whole file.
    pub digest: String,
    /// The OCI architecture of its kernel (`amd64`).
    pub architecture: String,
    /// The baked command line.
    pub cmdline: String,
    /// The guest memory the image needs, in MiB (`oci2uk.memory=`).
    pub memory_mib: Option<u64>,
    /// sha256 of the initramfs (with a root image read in place: of the archive and the image
    /// after it, the blob the build made).
    pub rootfs_digest: String,
    /// The initramfs's size.
    pub rootfs_size: u64,
    /// Whether the root image is read in place (the kernel unpacks only the archive before it).
    pub root_in_place: bool,
    /// Its compression.
    pub rootfs_compression: String,
    /// The launch configuration (`/rumpconfig.json`).
    pub config: Option<RumpConfig>,
    /// How it boots: [`BOOT_PVH`], [`BOOT_XEN_PV`], each when its Xen note points into the
    /// baked segment (a kernel's own entry would boot without the initramfs).
    pub boot: Vec<&'static str>,
}

impl BakedInfo {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Self, BakedError> {
        let io_err = |source| BakedError::Io {
            path: path.to_path_buf(),
            source,
        };
        let not_baked = |why: &str| BakedError::NotBaked {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let mut f = File::open(path).map_err(io_err)?;
        let size = f.metadata().map_err(io_err)?.len();
        let seg = last_segment(&mut f)
            .map_err(io_err)?
            .ok_or_else(|| not_baked("it is not an x86_64 ELF with loadable segments"))?;
        let architecture = match seg.machine {
            62 => "amd64",
            183 => "arm64",
            _ => "unknown",
        }
        .to_string();
        let head = read_head(&mut f, &seg)
            .map_err(io_err)?
            .ok_or_else(|| not_baked("it has no baked segment"))?;
        let le64 = |at: u64| u64::from_le_bytes(head[at as usize..][..8].try_into().expect("8"));
        let (mod_paddr, mod_size) = (le64(MODLIST_OFFSET), le64(MODLIST_OFFSET + 8));
        let cmdline = head_cmdline(&head);
        if !guest::starts_init(&cmdline) {
            return Err(not_baked(
                "its baked command line does not start oci2uk's init",
            ));
        }
        let rel = mod_paddr
            .checked_sub(seg.paddr)
            .filter(|r| r.saturating_add(mod_size) <= seg.filesz && mod_size > 0)
            .ok_or_else(|| not_baked("its initramfs lies outside its baked segment"))?;
        // A root image read in place follows the module: the blob runs to its end.
        let root = crate::bake::find_root_params(&cmdline);
        let blob_size = match root {
            Some((addr, len)) => addr
                .checked_add(len)
                .and_then(|end| end.checked_sub(mod_paddr))
                .filter(|&n| n >= mod_size && rel.saturating_add(n) <= seg.filesz)
                .ok_or_else(|| not_baked("its root image lies outside its baked segment"))?,
            None => mod_size,
        };
        let memory_mib = guest::find_memory(&cmdline);
        let boot = boot_paths(&mut f, &seg).map_err(io_err)?;

        // The initramfs: hashed whole, and read as far as the configuration.
        f.seek(SeekFrom::Start(seg.offset + rel)).map_err(io_err)?;
        let mut magic = [0u8; 6];
        (&mut f).take(6).read_exact(&mut magic).map_err(io_err)?;
        let compression = Compression::detect(&magic);
        f.seek(SeekFrom::Start(seg.offset + rel)).map_err(io_err)?;
        let mut hasher = Hasher::sha256();
        let mut tee = TeeReader {
            inner: BufReader::with_capacity(1 << 20, (&mut f).take(blob_size)),
            hasher: &mut hasher,
        };
        let config = match compression {
            None if magic.starts_with(b"070701") => find_config(&mut tee),
            // One frame: a SquashFS root follows it as an uncompressed archive.
            Some(Compression::Zstd) => zstd::stream::read::Decoder::new(&mut tee)
                .map_err(io_err)
                .map(|d| find_config(&mut d.single_frame()))?,
            Some(Compression::Gzip) => find_config(&mut flate2::read::GzDecoder::new(&mut tee)),
            Some(Compression::Xz) => find_config(&mut lzma_rust2::XzReader::new(&mut tee, true)),
            _ => Ok(None),
        };
        // A configuration that cannot be read leaves the rest of the answer standing.
        let config = config.unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the launch configuration");
            None
        });
        io::copy(&mut tee, &mut io::sink()).map_err(io_err)?;
        let rootfs_digest = hasher.finish().to_string();

        f.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let mut whole = Hasher::sha256();
        let mut r = BufReader::with_capacity(1 << 20, f);
        loop {
            let buf = io::BufRead::fill_buf(&mut r).map_err(io_err)?;
            if buf.is_empty() {
                break;
            }
            whole.update(buf);
            let n = buf.len();
            io::BufRead::consume(&mut r, n);
        }
        Ok(Self {
            size,
            digest: whole.finish().to_string(),
            architecture,
            cmdline,
            memory_mib,
            rootfs_digest,
            rootfs_size: blob_size,
            root_in_place: root.is_some(),
            rootfs_compression: compression.map_or("none", |c| c.name()).to_string(),
            config,
            boot,
        })
    }

    /// The kernel release, from the launch configuration.
    pub fn kernel_version(&self) -> Option<&str> {
        self.config
            .as_ref()
            .and_then(|c| c.oci2uk.kernel.as_deref())
    }
}

struct TeeReader<'a, R> {
    inner: R,
    hasher: &'a mut Hasher,
}

impl<R: Read> Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The baked segment: the PT_LOAD with the highest physical address.
struct Segment {
    machine: u16,
    paddr: u64,
    vaddr: u64,
    offset: u64,
    filesz: u64,
    /// The file's PT_NOTE segments: (offset, size).
    notes: Vec<(u64, u64)>,
}

fn last_segment(f: &mut File) -> io::Result<Option<Segment>> {
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0))?;
    if f.read(&mut eh)? < 64 || &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(None);
    }
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let machine = u16::from_le_bytes([eh[18], eh[19]]);
    let phoff = le64(&eh[32..]);
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as usize;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as usize;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Ok(None);
    }
    let mut ph = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut ph)?;
    let kind = |p: &[u8]| u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
    let notes = ph
        .chunks(phentsize)
        .filter(|p| kind(p) == elf::PT_NOTE)
        .map(|p| (le64(&p[8..]), le64(&p[32..])))
        .collect();
    Ok(ph
        .chunks(phentsize)
        .filter(|p| kind(p) == elf::PT_LOAD)
        .map(|p| {
            (
                le64(&p[24..]),
                le64(&p[8..]),
                le64(&p[32..]),
                le64(&p[16..]),
            )
        })
        .max()
        .map(|(paddr, offset, filesz, vaddr)| Segment {
            machine,
            paddr,
            vaddr,
            offset,
            filesz,
            notes,
        }))
}

/// The boot paths whose Xen entry note points into the baked segment: the PVH entry is a
/// physical address, the PV entry a virtual one.
fn boot_paths(f: &mut File, seg: &Segment) -> io::Result<Vec<&'static str>> {
    let mut pvh = false;
    let mut pv = false;
    for &(offset, size) in &seg.notes {
        if size > MAX_NOTES {
            continue;
        }
        let mut bytes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset))?;
        if f.read_exact(&mut bytes).is_err() {
            continue;
        }
        let Ok(notes) = elf::parse_note_bytes(&bytes) else {
            continue;
        };
        for note in notes.iter().filter(|n| n.name == b"Xen") {
            let value = match note.desc.len() {
                4 => elf::u32_at(note.desc, 0).map(u64::from),
                8 => elf::u64_at(note.desc, 0),
                _ => None,
            };
            let inside = |base: u64| {
                value.is_some_and(|v| v >= base && v - base < seg.filesz.min(INITRAMFS_OFFSET))
            };
            match note.kind {
                XEN_ELFNOTE_PHYS32_ENTRY => pvh |= inside(seg.paddr),
                XEN_ELFNOTE_ENTRY => pv |= inside(seg.vaddr),
                _ => {}
            }
        }
    }
    Ok([(pvh, BOOT_PVH), (pv, BOOT_XEN_PV)]
        .into_iter()
        .filter_map(|(yes, name)| yes.then_some(name))
        .collect())
}

/// The segment's head (everything before the initramfs); `None` when the segment is too short
/// to have one.
fn read_head(f: &mut File, seg: &Segment) -> io::Result<Option<Vec<u8>>> {
    let mut head = vec![0u8; INITRAMFS_OFFSET as usize];
    if seg.filesz < head.len() as u64 {
        return Ok(None);
    }
    f.seek(SeekFrom::Start(seg.offset))?;
    f.read_exact(&mut head)?;
    Ok(Some(head))
}

/// The baked command line in a segment's head: the buffer up to its NUL.
fn head_cmdline(head: &[u8]) -> String {
    let line = &head[CMDLINE_OFFSET as usize..][..COMMAND_LINE_SIZE as usize];
    String::from_utf8_lossy(&line[..line.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned()
}

/// The guest memory recorded in a baked file (`oci2uk.memory=NM` on its command line), in
/// MiB; `None` for a file without one.
pub fn recorded_memory(path: &Path) -> io::Result<Option<u64>> {
    let mut f = File::open(path)?;
    let Some(seg) = last_segment(&mut f)? else {
        return Ok(None);
    };
    let Some(head) = read_head(&mut f, &seg)? else {
        return Ok(None);
    };
    Ok(guest::find_memory(&head_cmdline(&head)))
}

/// Walks a newc archive to `/rumpconfig.json`.
fn find_config(r: &mut dyn Read) -> io::Result<Option<RumpConfig>> {
    let want = guest::CONFIG_PATH.trim_start_matches('/');
    let mut pos: u64 = 0;
    loop {
        let mut hdr = [0u8; 110];
        match r.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        pos += 110;
        if &hdr[..6] != b"070701" && &hdr[..6] != b"070702" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a newc archive",
            ));
        }
        let field = |i: usize| -> io::Result<u64> {
            let s = std::str::from_utf8(&hdr[6 + i * 8..][..8])
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad newc header"))?;
            u64::from_str_radix(s, 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad newc header"))
        };
        let filesize = field(6)?;
        let namesize = field(11)?;
        if namesize > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "newc name too long",
            ));
        }
        let mut name = vec![0u8; namesize as usize];
        r.read_exact(&mut name)?;
        pos += namesize;
        let pad = (4 - pos % 4) % 4;
        io::copy(&mut r.take(pad), &mut io::sink())?;
        pos += pad;
        let name = name.strip_suffix(b"\0").unwrap_or(&name);
        let name = name.strip_prefix(b"./").unwrap_or(name);
        let name = name.strip_prefix(b"/").unwrap_or(name);
        if name == want.as_bytes() {
            if filesize > MAX_CONFIG {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the configuration is too large",
                ));
            }
            let mut data = vec![0u8; filesize as usize];
            r.read_exact(&mut data)?;
            let text = String::from_utf8(data)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))?;
            return oci2uk_config::parse(&text)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
        }
        io::copy(&mut r.take(filesize), &mut io::sink())?;
        pos += filesize;
        let pad = (4 - pos % 4) % 4;
        io::copy(&mut r.take(pad), &mut io::sink())?;
        pos += pad;
        if name == b"TRAILER!!!" {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bake::bake_to_vec;
    use crate::build::BAKED_CMDLINE;
    use crate::kernel::tests::{tiny_vmlinux, tiny_vmlinux_with};
    use crate::kernel::Kernel;

    fn baked(kernel: &Kernel, dir: &Path) -> PathBuf {
        let path = dir.join("baked.elf");
        let cmdline = format!("{BAKED_CMDLINE} {}", guest::memory_param(64));
        std::fs::write(&path, bake_to_vec(kernel, &[0; 100], &cmdline).unwrap()).unwrap();
        path
    }

    /// The boot paths come from the notes: both for a kernel with both entries, PVH only for
    /// a kernel without a PV entry, none for a kernel's own notes.
    #[test]
    fn boot_paths_follow_the_notes() {
        let dir = tempfile::tempdir().unwrap();
        let both = Kernel::parse(tiny_vmlinux_with(
            Some(0x100_0001),
            Some(0xffff_ffff_8100_0040),
        ))
        .unwrap();
        let pvh_only = Kernel::parse(tiny_vmlinux(Some(0x100_0001))).unwrap();
        for (kernel, want) in [
            (&both, vec![BOOT_PVH, BOOT_XEN_PV]),
            (&pvh_only, vec![BOOT_PVH]),
        ] {
            let path = baked(kernel, dir.path());
            let mut f = File::open(&path).unwrap();
            let seg = last_segment(&mut f).unwrap().unwrap();
            assert_eq!(boot_paths(&mut f, &seg).unwrap(), want);
        }
        // The unbaked kernel: its notes point at its own entries, outside the last segment.
        let path = dir.path().join("vmlinux");
        std::fs::write(
            &path,
            tiny_vmlinux_with(Some(0x100_0001), Some(0xffff_ffff_8100_0040)),
        )
        .unwrap();
        let mut f = File::open(&path).unwrap();
        let seg = last_segment(&mut f).unwrap().unwrap();
        assert!(boot_paths(&mut f, &seg).unwrap().is_empty());
    }

    #[test]
    fn the_baked_command_line_starts_the_init() {
        assert!(guest::starts_init(BAKED_CMDLINE), "{BAKED_CMDLINE}");
    }

    #[test]
    fn the_memory_record_is_read_back() {
        let kernel = Kernel::parse(tiny_vmlinux(Some(0x100_0001))).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baked.elf");
        for (cmdline, memory) in [
            (
                format!("{BAKED_CMDLINE} {}", guest::memory_param(384)),
                Some(384),
            ),
            (BAKED_CMDLINE.to_owned(), None),
        ] {
            std::fs::write(&path, bake_to_vec(&kernel, &[0; 100], &cmdline).unwrap()).unwrap();
            assert_eq!(recorded_memory(&path).unwrap(), memory, "{cmdline}");
        }
        std::fs::write(&path, b"not an ELF").unwrap();
        assert_eq!(recorded_memory(&path).unwrap(), None);
    }
}
