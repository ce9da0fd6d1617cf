//! The bake: kernel + initramfs + command line in, one bootable ELF out, for PVH and, when the
//! kernel supports it, Xen PV.
//!
//! The kernel's vmlinux gets one more PT_LOAD segment, placed at the first 2 MiB boundary at or
//! above the highest physical address the kernel occupies, holding (offsets from its start):
//!
//! ```text
//! 0x0000  the PVH entry stub (stub.rs)      0x0180  the PV entry stub (stub.rs)
//! 0x0100  hvm_start_info (56 bytes)         0x0800  the command line buffer (2048 bytes,
//! 0x0140  one hvm_modlist_entry (32 bytes)          the baked line, NUL-terminated)
//!                                           0x1000  the initramfs
//! ```
//!
//! The PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) is pointed at the PVH stub, which copies the
//! hypervisor's start_info into the baked one, makes the initramfs its one module, appends the
//! hypervisor's command line to the baked one (so `-append`, Firecracker's `boot_args` and Xen's
//! `extra` still work and, coming last, win) and jumps to the kernel's own entry. The
//! segment's virtual address is `__START_KERNEL_map + paddr`, as the kernel's own are.
//!
//! The Xen PV note (`XEN_ELFNOTE_ENTRY`, a virtual address), when the kernel has one, is
//! pointed at the PV stub, which does the same to Xen's PV `start_info` in place: the initramfs
//! becomes its module (libxc maps every PT_LOAD segment, so it is already in memory), Xen's
//! `extra` is appended to the baked line in `cmd_line`, and it jumps to `startup_xen`. So
//! `xl` boots the one file with `type = "pv"` or `type = "pvh"`, no `ramdisk`, no `cmdline`.
//! Under PV the whole image is mapped in the kernel's 1 GiB `__START_KERNEL_map` window with
//! Xen's start-of-day pages after it, so PV wants the segment to end well below
//! `__START_KERNEL_map + 1 GiB`; PVH has no such limit.
//!
//! The ELF is edited with plain byte writes: the crates that write ELF files build new objects
//! from sections and cannot add a program header to an existing executable, and the edit is
//! small (a header, a program header, a note's descriptor). Output is deterministic.

pub mod pv;
pub mod pvh;
pub mod segment;
pub mod stub;

use std::io::{self, Read, Write};

use crate::cache::RootSpan;
use crate::kernel::elf::{self, Elf, ProgramHeader};
pub use crate::kernel::START_KERNEL_MAP;
use crate::kernel::{Kernel, KernelError, XEN_ELFNOTE_ENTRY, XEN_ELFNOTE_PHYS32_ENTRY};
use oci2uk_config::guest::ROOT_MTD_NAME;
use pv::MAX_GUEST_CMDLINE;
use pvh::*;
use segment::*;
use stub::{entry_stub, pv_entry_stub, PvStubParams, StubParams};
/// The baked segment starts on this boundary (the alignment of the kernel's own segments).
pub const SEGMENT_ALIGN: u64 = 2 << 20;
/// The baked segment's alignment in the file (it is congruent with its address modulo this).
const FILE_ALIGN: u64 = 0x1000;
/// The longest baked command line: it must leave room for a space and one byte of the
/// hypervisor's line within Xen PV's [`MAX_GUEST_CMDLINE`] (NUL included), the smaller of the
/// two limits (PVH's is Linux's [`COMMAND_LINE_SIZE`], 2048). One limit for every file keeps
/// every boot path open to every file; the lines `oci2uk build` bakes are about 120 bytes.
pub const MAX_BAKED_CMDLINE: usize = MAX_GUEST_CMDLINE as usize - 3;

/// Errors of baking.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// The kernel cannot be baked (no PVH entry, arm64).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The baked command line is too long or holds a NUL byte.
    #[error("the kernel command line {why}")]
    Cmdline {
        /// What is wrong.
        why: String,
    },
    /// The baked segment would not fit below 4 GiB, where the 32-bit entry can reach it.
    #[error("the initramfs ({len} bytes) is too large: the baked image must end below 4 GiB")]
    TooLarge {
        /// The initramfs's size.
        len: u64,
    },
    /// The root image's span does not describe a blob laid out to be read in place.
    #[error("the root image to read in place is not where the blob's layout puts it ({why})")]
    RootSpan {
        /// The figures.
        why: String,
    },
    /// The initramfs reader gave fewer or more bytes than announced.
    #[error("the initramfs was announced as {expected} bytes but gave {got}")]
    InitramfsLength {
        /// The announced length.
        expected: u64,
        /// What the reader gave (at least).
        got: u64,
    },
    /// Reading the initramfs or writing the output failed.
    #[error("cannot write the baked kernel")]
    Io(#[from] io::Error),
}

/// Where the bake put everything: physical addresses, sizes and file offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The kernel's own highest physical address (exclusive).
    pub kernel_end: u64,
    /// The baked segment's physical address.
    pub segment_paddr: u64,
    /// Its virtual address.
    pub segment_vaddr: u64,
    /// Its file offset.
    pub segment_offset: u64,
    /// Its size (in the file and in memory).
    pub segment_size: u64,
    /// The PVH entry stub (what the PVH note now points at).
    pub stub_paddr: u64,
    /// The stub's size.
    pub stub_size: u64,
    /// The Xen PV entry stub's virtual address (what the PV note now points at); `None` when
    /// the kernel has no PV entry and the file boots through PVH only.
    pub pv_stub_vaddr: Option<u64>,
    /// The PV stub's size (0 without one).
    pub pv_stub_size: u64,
    /// The baked `hvm_start_info`.
    pub start_info_paddr: u64,
    /// The module list.
    pub modlist_paddr: u64,
    /// The command line buffer.
    pub cmdline_paddr: u64,
    /// The initramfs (with a root image read in place: the whole blob, the archive the
    /// kernel unpacks and the image after it).
    pub initramfs_paddr: u64,
    /// Its size.
    pub initramfs_len: u64,
    /// What the kernel is given as its initramfs (the module's size): all of it, or the
    /// archive before a root image read in place.
    pub initrd_len: u64,
    /// The root image read in place: its physical address and length.
    pub root_image: Option<(u64, u64)>,
    /// The command line as baked, with the root image's parameters.
    pub cmdline: String,
    /// The kernel's own PVH entry, which the stub jumps to.
    pub kernel_entry: u32,
    /// The kernel's own PV entry (`startup_xen`), which the PV stub jumps to.
    pub kernel_pv_entry: Option<u64>,
    /// Where the program header table is in the output file.
    pub phdr_offset: u64,
    /// Whether it had to be moved to the end of the file for lack of room.
    pub phdrs_moved: bool,
    /// The output file's size.
    pub file_len: u64,
}

impl Placement {
    /// The highest physical address the baked image occupies (exclusive): the guest needs more
    /// RAM than this, plus what the kernel and the unpacked initramfs use.
    pub fn memory_end(&self) -> u64 {
        self.segment_paddr + self.segment_size
    }

    /// Whether the file also boots as a Xen PV guest.
    pub fn supports_pv(&self) -> bool {
        self.pv_stub_vaddr.is_some()
    }
}

/// Where the bake of `kernel` with an initramfs of `initramfs_len` bytes and the command line
/// `cmdline` puts everything, without writing anything.
pub fn place(kernel: &Kernel, initramfs_len: u64, cmdline: &str) -> Result<Placement, BakeError> {
    Ok(Edit::new(kernel, initramfs_len, None, cmdline, false)?.placement)
}

/// Bake `kernel`, the `initramfs_len` bytes read from `initramfs` and `cmdline` into one
/// bootable ELF written to `out`. The initramfs is streamed: only the kernel is held in memory.
pub fn bake(
    kernel: &Kernel,
    initramfs: impl Read,
    initramfs_len: u64,
    cmdline: &str,
    out: impl Write,
) -> Result<Placement, BakeError> {
    bake_inner(kernel, initramfs, initramfs_len, None, cmdline, out, false)
}

/// [`bake`] of a blob whose root image is read in place ([`crate::rootfs::write_in_place`]
/// wrote it; `span` says where its parts are). The kernel is given the archive as its
/// initramfs, and the command line says where the image is: `memmap=LEN$ADDR` keeps the
/// kernel's allocator off it and `phram.phram=oci2uk-root,ADDR,LEN` makes it an MTD device,
/// whose block device the init mounts. Every boot path that loads the ELF's segments where
/// they say (PVH on QEMU, Firecracker, Cloud Hypervisor and Xen, and Xen PV, whose
/// pseudo-physical addresses follow the same `__START_KERNEL_map + paddr` rule) reads it
/// there.
pub fn bake_in_place(
    kernel: &Kernel,
    blob: impl Read,
    blob_len: u64,
    span: RootSpan,
    cmdline: &str,
    out: impl Write,
) -> Result<Placement, BakeError> {
    bake_inner(kernel, blob, blob_len, Some(span), cmdline, out, false)
}

/// [`bake`], optionally moving the program header table to the end even when it has room (so
/// tests can boot that placement too).
fn bake_inner(
    kernel: &Kernel,
    initramfs: impl Read,
    initramfs_len: u64,
    root: Option<RootSpan>,
    cmdline: &str,
    mut out: impl Write,
    move_phdrs: bool,
) -> Result<Placement, BakeError> {
    let edit = Edit::new(kernel, initramfs_len, root, cmdline, move_phdrs)?;
    edit.write(initramfs, &mut out)?;
    out.flush()?;
    Ok(edit.placement)
}

/// [`bake`] into memory.
pub fn bake_to_vec(kernel: &Kernel, initramfs: &[u8], cmdline: &str) -> Result<Vec<u8>, BakeError> {
    let mut out = Vec::new();
    bake(kernel, initramfs, initramfs.len() as u64, cmdline, &mut out)?;
    Ok(out)
}

/// Everything decided before a byte is written: the kernel's bytes to keep, the edits to them,
/// and what follows.
struct Edit<'k> {
    vmlinux: &'k [u8],
    placement: Placement,
    patches: Patches,
    /// The first 0x1000 bytes of the segment: stub, start_info, module entry, command line.
    segment_head: Vec<u8>,
    /// The program header table written at the end, when it had to move.
    moved_phdrs: Option<Vec<u8>>,
}

/// Byte ranges of the vmlinux to replace: (file offset, new bytes), sorted, disjoint.
type Patches = Vec<(u64, Vec<u8>)>;

fn align_up(n: u64, to: u64) -> Option<u64> {
    Some(n.checked_add(to - 1)? & !(to - 1))
}

fn bad_elf(why: &str) -> BakeError {
    BakeError::Kernel(KernelError::Elf(elf::ElfError(why.into())))
}

/// The baked segment's place in memory.
struct SegmentAt {
    /// The kernel's own highest physical address (exclusive).
    kernel_end: u64,
    paddr: u64,
    vaddr: u64,
    size: u64,
    initramfs_len: u64,
    /// The module's size: what the kernel unpacks.
    initrd_len: u64,
}

impl SegmentAt {
    /// The physical address of the part at `offset` in the segment.
    fn at(&self, offset: u64) -> u64 {
        self.paddr + offset
    }

    /// Its virtual address.
    fn vat(&self, offset: u64) -> u64 {
        self.vaddr + offset
    }
}

/// What is kept of the kernel's file.
struct Kept {
    /// The kernel's program headers, their zero tails cut from the file.
    phdrs: Vec<ProgramHeader>,
    /// The length of the file kept.
    len: u64,
    /// Where the kernel's program header table ends.
    phdr_table_end: u64,
    /// Whether the section table lies past what is kept, and so goes.
    drop_sections: bool,
}

/// The output's program header table.
struct PhdrTable {
    /// Its file offset.
    offset: u64,
    bytes: Vec<u8>,
    phnum: u16,
    /// Whether it stays where the kernel had it (else it goes at the end).
    in_place: bool,
    /// The output file's size.
    file_len: u64,
}

impl<'k> Edit<'k> {
    fn new(
        kernel: &'k Kernel,
        initramfs_len: u64,
        root: Option<RootSpan>,
        cmdline: &str,
        move_phdrs: bool,
    ) -> Result<Self, BakeError> {
        let vmlinux = kernel.vmlinux()?;
        let kernel_entry = kernel.pvh_entry()?;
        let parsed = Elf::parse(vmlinux).map_err(KernelError::Elf)?;
        let mut seg = place_segment(&parsed, initramfs_len)?;
        let root_image = match root {
            Some(span) => {
                check_span(&span, initramfs_len)?;
                seg.initrd_len = span.initrd_len;
                Some((seg.at(INITRAMFS_OFFSET + span.offset), span.len))
            }
            None => None,
        };
        let cmdline = match root_image {
            Some((paddr, len)) => format!("{cmdline} {}", root_params(paddr, len)),
            None => cmdline.to_owned(),
        };
        let cmdline = cmdline.as_str();
        check_cmdline(cmdline)?;
        let kept = keep(&parsed, vmlinux);
        let segment_offset = align_up(kept.len, FILE_ALIGN).expect("small");
        let stub = entry_stub(&StubParams {
            start_info: seg.at(START_INFO_OFFSET) as u32,
            modlist: seg.at(MODLIST_OFFSET) as u32,
            cmdline: seg.at(CMDLINE_OFFSET) as u32,
            baked_len: cmdline.len() as u32,
            entry: kernel_entry,
        });
        let kernel_pv_entry = kernel.pv_entry();
        let pv_stub = kernel_pv_entry.map(|entry| {
            pv_entry_stub(&PvStubParams {
                cmdline: seg.vat(CMDLINE_OFFSET),
                baked_len: cmdline.len() as u32,
                initramfs: seg.vat(INITRAMFS_OFFSET),
                initramfs_len: seg.initrd_len,
                entry,
            })
        });
        let head = segment_head(&seg, &stub, pv_stub.as_deref(), cmdline);
        let table = phdr_table(&parsed, &kept, &seg, segment_offset, move_phdrs)?;
        let stub_paddr = seg.at(STUB_OFFSET);
        let pv_stub_vaddr = pv_stub.as_ref().map(|_| seg.vat(PV_STUB_OFFSET));
        let (phdr_offset, in_place, file_len) = (table.offset, table.in_place, table.file_len);
        let (patches, moved_phdrs) = patches(&parsed, &kept, table, stub_paddr, pv_stub_vaddr)?;

        Ok(Edit {
            vmlinux: &vmlinux[..kept.len as usize],
            placement: Placement {
                kernel_end: seg.kernel_end,
                segment_paddr: seg.paddr,
                segment_vaddr: seg.vaddr,
                segment_offset,
                segment_size: seg.size,
                stub_paddr,
                stub_size: stub.len() as u64,
                pv_stub_vaddr,
                pv_stub_size: pv_stub.as_ref().map_or(0, |s| s.len() as u64),
                start_info_paddr: seg.at(START_INFO_OFFSET),
                modlist_paddr: seg.at(MODLIST_OFFSET),
                cmdline_paddr: seg.at(CMDLINE_OFFSET),
                initramfs_paddr: seg.at(INITRAMFS_OFFSET),
                initramfs_len,
                initrd_len: seg.initrd_len,
                root_image,
                cmdline: cmdline.to_owned(),
                kernel_entry,
                kernel_pv_entry,
                phdr_offset,
                phdrs_moved: !in_place,
                file_len,
            },
            patches,
            segment_head: head,
            moved_phdrs,
        })
    }

    fn write(&self, initramfs: impl Read, out: &mut impl Write) -> Result<(), BakeError> {
        let mut pos = 0usize;
        for (offset, bytes) in &self.patches {
            let offset = *offset as usize;
            out.write_all(&self.vmlinux[pos..offset])?;
            out.write_all(bytes)?;
            pos = offset + bytes.len();
        }
        out.write_all(&self.vmlinux[pos..])?;
        let pad = self.placement.segment_offset - self.vmlinux.len() as u64;
        out.write_all(&vec![0u8; pad as usize])?;
        out.write_all(&self.segment_head)?;
        let expected = self.placement.initramfs_len;
        let mut limited = initramfs.take(expected);
        let got = io::copy(&mut limited, out)?;
        let mut probe = [0u8; 1];
        let extra = limited.into_inner().read(&mut probe)?;
        if got != expected || extra != 0 {
            return Err(BakeError::InitramfsLength {
                expected,
                got: got + extra as u64,
            });
        }
        if let Some(table) = &self.moved_phdrs {
            let end = self.placement.segment_offset + self.placement.segment_size;
            out.write_all(&vec![0u8; (self.placement.phdr_offset - end) as usize])?;
            out.write_all(table)?;
        }
        Ok(())
    }
}

/// The kernel parameters that tell the kernel where the root image read in place is: kept
/// from its allocator, and made the MTD device [`ROOT_MTD_NAME`].
pub fn root_params(paddr: u64, len: u64) -> String {
    format!("memmap={len:#x}${paddr:#x} phram.phram={ROOT_MTD_NAME},{paddr:#x},{len:#x}")
}

/// The root image's physical address and length from a command line that holds
/// [`root_params`]' `phram.phram=` (the last one, as the kernel takes it).
pub fn find_root_params(cmdline: &str) -> Option<(u64, u64)> {
    let prefix = format!("phram.phram={ROOT_MTD_NAME},");
    let hex = |v: &str| u64::from_str_radix(v.strip_prefix("0x")?, 16).ok();
    cmdline
        .split_ascii_whitespace()
        .rev()
        .filter_map(|w| w.strip_prefix(&prefix))
        .find_map(|v| {
            let (addr, len) = v.split_once(',')?;
            Some((hex(addr)?, hex(len)?))
        })
}

/// The span lies in the blob as [`crate::rootfs::write_in_place`] lays it out: the archive
/// first, then the image on a page boundary, in whole pages, to the end.
fn check_span(span: &RootSpan, blob_len: u64) -> Result<(), BakeError> {
    let page = crate::rootfs::IN_PLACE_ALIGN;
    let fits = span.initrd_len > 0
        && span.initrd_len <= span.offset
        && span.offset.is_multiple_of(page)
        && span.len.is_multiple_of(page)
        && span.len > 0
        && span.offset.checked_add(span.len) == Some(blob_len);
    if fits {
        Ok(())
    } else {
        Err(BakeError::RootSpan {
            why: format!(
                "archive {} bytes, image at {} for {} bytes, in a blob of {blob_len}",
                span.initrd_len, span.offset, span.len
            ),
        })
    }
}

/// The baked line fits with room for the hypervisor's and holds no NUL.
fn check_cmdline(cmdline: &str) -> Result<(), BakeError> {
    if cmdline.len() > MAX_BAKED_CMDLINE {
        return Err(BakeError::Cmdline {
            why: format!(
                "is {} bytes; at most {MAX_BAKED_CMDLINE} can be baked",
                cmdline.len()
            ),
        });
    }
    if cmdline.contains('\0') {
        return Err(BakeError::Cmdline {
            why: "holds a NUL byte".into(),
        });
    }
    Ok(())
}

/// Where the segment goes: the first [`SEGMENT_ALIGN`] boundary after the kernel, ending
/// below 4 GiB.
fn place_segment(parsed: &Elf, initramfs_len: u64) -> Result<SegmentAt, BakeError> {
    let too_large = BakeError::TooLarge { len: initramfs_len };
    let kernel_end = parsed
        .load_end()
        .ok_or_else(|| bad_elf("a segment ends past 2^64"))?;
    let paddr = align_up(kernel_end, SEGMENT_ALIGN).ok_or_else(|| bad_elf("huge"))?;
    let size = INITRAMFS_OFFSET
        .checked_add(initramfs_len)
        .ok_or(BakeError::TooLarge { len: initramfs_len })?;
    match paddr.checked_add(size) {
        Some(end) if end <= 1 << 32 => {}
        _ => return Err(too_large),
    }
    let vaddr = START_KERNEL_MAP
        .checked_add(paddr)
        .ok_or_else(|| bad_elf("the kernel lies beyond __START_KERNEL_map's reach"))?;
    Ok(SegmentAt {
        kernel_end,
        paddr,
        vaddr,
        size,
        initramfs_len,
        initrd_len: initramfs_len,
    })
}

/// What the output keeps of the kernel's file. The kernel's segments lose their zero tails
/// (.bss, .brk, the init scratch area): the loader zero-fills memory past a segment's file
/// size, and a fresh guest's RAM is zero anyway. The file keeps what the segments and notes
/// need and ends there; the section table (no loader reads it) goes.
fn keep(parsed: &Elf, vmlinux: &[u8]) -> Kept {
    let mut phdrs = parsed.phdrs.clone();
    for p in phdrs.iter_mut().filter(|p| p.kind == elf::PT_LOAD) {
        let len = vmlinux.len() as u64;
        if let Some(range) = p.file_range().filter(|r| r.start <= len) {
            let bytes = &vmlinux[range.start as usize..range.end.min(len) as usize];
            p.filesz = bytes
                .iter()
                .rposition(|b| *b != 0)
                .map_or(0, |i| i as u64 + 1);
        }
    }
    let phdr_table_end = parsed
        .header
        .phoff
        .saturating_add(u64::from(parsed.header.phnum) * elf::PHDR_SIZE as u64);
    let len = phdrs
        .iter()
        .filter(|p| p.filesz > 0)
        .map(|p| p.offset.saturating_add(p.filesz))
        .chain([elf::EHDR_SIZE as u64, phdr_table_end])
        .max()
        .expect("not empty")
        .min(vmlinux.len() as u64);
    Kept {
        drop_sections: parsed.header.shoff >= len,
        phdrs,
        len,
        phdr_table_end,
    }
}

/// The segment's head: the stubs, the baked start_info and module entry, the command line.
fn segment_head(seg: &SegmentAt, stub: &[u8], pv_stub: Option<&[u8]>, cmdline: &str) -> Vec<u8> {
    let start_info = HvmStartInfo {
        magic: START_INFO_MAGIC,
        version: START_INFO_VERSION,
        nr_modules: 1,
        modlist_paddr: seg.at(MODLIST_OFFSET),
        cmdline_paddr: seg.at(CMDLINE_OFFSET),
        ..Default::default()
    };
    let module = HvmModlistEntry {
        paddr: seg.at(INITRAMFS_OFFSET),
        size: seg.initrd_len,
        ..Default::default()
    };
    let mut head = vec![0u8; INITRAMFS_OFFSET as usize];
    let put = |head: &mut Vec<u8>, offset: u64, bytes: &[u8]| {
        head[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut head, STUB_OFFSET, stub);
    put(&mut head, START_INFO_OFFSET, &start_info.to_bytes());
    put(&mut head, MODLIST_OFFSET, &module.to_bytes());
    if let Some(pv_stub) = pv_stub {
        put(&mut head, PV_STUB_OFFSET, pv_stub);
    }
    put(&mut head, CMDLINE_OFFSET, cmdline.as_bytes());
    head
}

/// The program header table, the kernel's and the segment's: in place when the bytes after it
/// are free, else at the end.
fn phdr_table(
    parsed: &Elf,
    kept: &Kept,
    seg: &SegmentAt,
    segment_offset: u64,
    move_phdrs: bool,
) -> Result<PhdrTable, BakeError> {
    let new_phdr = ProgramHeader {
        kind: elf::PT_LOAD,
        flags: 7, // PF_R | PF_W | PF_X: the stub runs from here
        offset: segment_offset,
        vaddr: seg.vaddr,
        paddr: seg.paddr,
        filesz: seg.size,
        memsz: seg.size,
        align: FILE_ALIGN,
    };
    let mut phdrs = kept.phdrs.clone();
    phdrs.push(new_phdr);
    let phnum = u16::try_from(phdrs.len())
        .ok()
        .filter(|&n| n < 0xffff)
        .ok_or_else(|| bad_elf("too many program headers"))?;
    let table_len = phdrs.len() as u64 * elf::PHDR_SIZE as u64;
    let end_of_data = segment_offset + seg.size;
    let in_place = !move_phdrs
        && phdr_room(parsed)
        && kept.phdr_table_end + (elf::PHDR_SIZE as u64) <= kept.len;
    let offset = if in_place {
        parsed.header.phoff
    } else {
        align_up(end_of_data, 8).ok_or(BakeError::TooLarge {
            len: seg.initramfs_len,
        })?
    };
    for p in phdrs.iter_mut().filter(|p| p.kind == elf::PT_PHDR) {
        // Keep a PT_PHDR describing the table's file bytes (vmlinux files have none).
        p.offset = offset;
        p.filesz = table_len;
        p.memsz = table_len;
    }
    Ok(PhdrTable {
        offset,
        bytes: phdrs.iter().flat_map(|p| p.to_bytes()).collect(),
        phnum,
        in_place,
        file_len: if in_place {
            end_of_data
        } else {
            offset + table_len
        },
    })
}

/// The patches to the kernel's file: the ELF header's table fields, the PVH note pointed at
/// the stub (and the PV note at the PV stub, when there is one), and the program header table
/// when it stays in place (else it is returned, to be written at the end).
fn patches(
    parsed: &Elf,
    kept: &Kept,
    table: PhdrTable,
    stub_paddr: u64,
    pv_stub_vaddr: Option<u64>,
) -> Result<(Patches, Option<Vec<u8>>), BakeError> {
    let mut patches = Vec::new();
    patches.push((32, table.offset.to_le_bytes().to_vec())); // e_phoff
    patches.push((56, table.phnum.to_le_bytes().to_vec())); // e_phnum
    if kept.drop_sections {
        patches.push((40, 0u64.to_le_bytes().to_vec())); // e_shoff
        patches.push((60, [0u8; 4].to_vec())); // e_shnum, e_shstrndx
    }
    let notes = parsed.notes().map_err(KernelError::Elf)?;
    let xen_note = |kind: u32| notes.iter().find(|n| n.name == b"Xen" && n.kind == kind);
    let note = xen_note(XEN_ELFNOTE_PHYS32_ENTRY).ok_or(KernelError::NoPvh)?;
    let desc = match note.desc.len() {
        4 => (stub_paddr as u32).to_le_bytes().to_vec(),
        _ => stub_paddr.to_le_bytes().to_vec(),
    };
    patches.push((note.desc_offset as u64, desc));
    if let Some(vaddr) = pv_stub_vaddr {
        // `Kernel::pv_entry` read it: it is there, and its descriptor is 4 or 8 bytes.
        let note = xen_note(XEN_ELFNOTE_ENTRY).ok_or_else(|| bad_elf("no PV entry note"))?;
        let desc = match note.desc.len() {
            8 => vaddr.to_le_bytes().to_vec(),
            _ => {
                return Err(bad_elf(
                    "the PV entry note is too small for a 64-bit address",
                ))
            }
        };
        patches.push((note.desc_offset as u64, desc));
    }
    let moved_phdrs = if table.in_place {
        patches.push((table.offset, table.bytes));
        None
    } else {
        Some(table.bytes)
    };
    patches.sort_by_key(|(offset, _)| *offset);
    if patches
        .windows(2)
        .any(|w| w[0].0 + w[0].1.len() as u64 > w[1].0)
    {
        return Err(bad_elf("a Xen note overlaps the ELF or program headers"));
    }
    if patches
        .iter()
        .any(|(offset, bytes)| offset.saturating_add(bytes.len() as u64) > kept.len)
    {
        return Err(bad_elf("a Xen note lies outside the kernel's segments"));
    }
    Ok((patches, moved_phdrs))
}

/// Whether one more program header fits after the table: the bytes it would take are inside the
/// file, zero, and used by no header, segment or section.
fn phdr_room(parsed: &Elf) -> bool {
    let start = parsed.header.phoff + u64::from(parsed.header.phnum) * elf::PHDR_SIZE as u64;
    let end = start + elf::PHDR_SIZE as u64;
    let overlaps = |from: u64, len: u64| len > 0 && from < end && start < from.saturating_add(len);
    let shdr_table = u64::from(parsed.header.shnum) * elf::SHDR_SIZE as u64;
    let free = end <= parsed.data.len() as u64
        && parsed.data[start as usize..end as usize]
            .iter()
            .all(|&b| b == 0)
        && !overlaps(0, elf::EHDR_SIZE as u64)
        && !overlaps(parsed.header.shoff, shdr_table)
        && !parsed.phdrs.iter().any(|p| overlaps(p.offset, p.filesz))
        && !parsed
            .shdrs
            .iter()
            .any(|s| s.kind != elf::SHT_NOBITS && overlaps(s.offset, s.size));
    free
}

#[cfg(test)]
mod tests;
