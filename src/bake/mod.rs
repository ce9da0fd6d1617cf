//! The bake: kernel + initramfs + command line in, one bootable PVH ELF out.
//!
//! The kernel's vmlinux gets one more PT_LOAD segment, placed at the first 2 MiB boundary at or
//! above the highest physical address the kernel occupies, holding (offsets from its start):
//!
//! ```text
//! 0x0000  the entry stub (stub.rs)          0x0800  the command line buffer (2048 bytes,
//! 0x0100  hvm_start_info (56 bytes)                 the baked line, NUL-terminated)
//! 0x0140  one hvm_modlist_entry (32 bytes)  0x1000  the initramfs
//! ```
//!
//! The PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) is pointed at the stub, which copies the
//! hypervisor's start_info into the baked one, makes the initramfs its one module, appends the
//! hypervisor's command line to the baked one (so `-append`, Firecracker's `boot_args` and Xen's
//! `extra` still work and, coming last, win) and jumps to the kernel's own entry. The
//! segment's virtual address is `__START_KERNEL_map + paddr`, as the kernel's own are.
//!
//! The ELF is edited with plain byte writes: the crates that write ELF files build new objects
//! from sections and cannot add a program header to an existing executable, and the edit is
//! small (a header, a program header, a note's descriptor). Output is deterministic.

pub mod layout;
pub mod stub;

use std::io::{self, Read, Write};

use crate::kernel::elf::{self, Elf, ProgramHeader};
use crate::kernel::{Kernel, KernelError, XEN_ELFNOTE_PHYS32_ENTRY};
use layout::*;
use stub::{entry_stub, StubParams};

/// `__START_KERNEL_map`: x86_64 Linux maps its image at this virtual address plus its physical
/// address.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The baked segment starts on this boundary (the alignment of the kernel's own segments).
pub const SEGMENT_ALIGN: u64 = 2 << 20;
/// The baked segment's alignment in the file (it is congruent with its address modulo this).
const FILE_ALIGN: u64 = 0x1000;
/// The longest baked command line: it must leave room for a space and one byte of the
/// hypervisor's line within [`COMMAND_LINE_SIZE`] (NUL included).
pub const MAX_BAKED_CMDLINE: usize = COMMAND_LINE_SIZE as usize - 3;

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
pub struct Layout {
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
    /// The entry stub (what the PVH note now points at).
    pub stub_paddr: u64,
    /// The stub's size.
    pub stub_size: u64,
    /// The baked `hvm_start_info`.
    pub start_info_paddr: u64,
    /// The module list.
    pub modlist_paddr: u64,
    /// The command line buffer.
    pub cmdline_paddr: u64,
    /// The initramfs.
    pub initramfs_paddr: u64,
    /// Its size.
    pub initramfs_len: u64,
    /// The kernel's own PVH entry, which the stub jumps to.
    pub kernel_entry: u32,
    /// Where the program header table is in the output file.
    pub phdr_offset: u64,
    /// Whether it had to be moved to the end of the file for lack of room.
    pub phdrs_moved: bool,
    /// The output file's size.
    pub file_len: u64,
}

impl Layout {
    /// The highest physical address the baked image occupies (exclusive): the guest needs more
    /// RAM than this, plus what the kernel and the unpacked initramfs use.
    pub fn memory_end(&self) -> u64 {
        self.segment_paddr + self.segment_size
    }
}

/// Plan the bake of `kernel` with an initramfs of `initramfs_len` bytes and the command line
/// `cmdline`, without writing anything.
pub fn plan(kernel: &Kernel, initramfs_len: u64, cmdline: &str) -> Result<Layout, BakeError> {
    Ok(Plan::new(kernel, initramfs_len, cmdline, false)?.layout)
}

/// Bake `kernel`, the `initramfs_len` bytes read from `initramfs` and `cmdline` into one PVH ELF
/// written to `out`. The initramfs is streamed: only the kernel is held in memory.
pub fn bake(
    kernel: &Kernel,
    initramfs: impl Read,
    initramfs_len: u64,
    cmdline: &str,
    out: impl Write,
) -> Result<Layout, BakeError> {
    bake_inner(kernel, initramfs, initramfs_len, cmdline, out, false)
}

/// [`bake`], optionally moving the program header table to the end even when it has room (so
/// tests can boot that layout too).
fn bake_inner(
    kernel: &Kernel,
    initramfs: impl Read,
    initramfs_len: u64,
    cmdline: &str,
    mut out: impl Write,
    move_phdrs: bool,
) -> Result<Layout, BakeError> {
    let plan = Plan::new(kernel, initramfs_len, cmdline, move_phdrs)?;
    plan.write(initramfs, &mut out)?;
    out.flush()?;
    Ok(plan.layout)
}

/// [`bake`] into memory.
pub fn bake_to_vec(kernel: &Kernel, initramfs: &[u8], cmdline: &str) -> Result<Vec<u8>, BakeError> {
    let mut out = Vec::new();
    bake(kernel, initramfs, initramfs.len() as u64, cmdline, &mut out)?;
    Ok(out)
}

/// Everything decided before a byte is written.
struct Plan<'k> {
    vmlinux: &'k [u8],
    layout: Layout,
    /// Byte ranges of the vmlinux to replace: (file offset, new bytes), sorted, disjoint.
    patches: Vec<(u64, Vec<u8>)>,
    /// The first 0x1000 bytes of the segment: stub, start_info, module entry, command line.
    segment_head: Vec<u8>,
    /// The program header table written at the end, when it had to move.
    moved_phdrs: Option<Vec<u8>>,
}

fn align_up(n: u64, to: u64) -> Option<u64> {
    Some(n.checked_add(to - 1)? & !(to - 1))
}

impl<'k> Plan<'k> {
    fn new(
        kernel: &'k Kernel,
        initramfs_len: u64,
        cmdline: &str,
        move_phdrs: bool,
    ) -> Result<Self, BakeError> {
        let vmlinux = kernel.vmlinux()?;
        let kernel_entry = kernel.pvh_entry()?;
        let bad_elf = |why: &str| BakeError::Kernel(KernelError::Elf(elf::ElfError(why.into())));
        let parsed = Elf::parse(vmlinux).map_err(KernelError::Elf)?;
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

        // Where the segment goes.
        let too_large = BakeError::TooLarge { len: initramfs_len };
        let kernel_end = parsed
            .load_end()
            .ok_or_else(|| bad_elf("a segment ends past 2^64"))?;
        let segment_paddr = align_up(kernel_end, SEGMENT_ALIGN).ok_or_else(|| bad_elf("huge"))?;
        let segment_size = INITRAMFS_OFFSET
            .checked_add(initramfs_len)
            .ok_or(BakeError::TooLarge { len: initramfs_len })?;
        match segment_paddr.checked_add(segment_size) {
            Some(end) if end <= 1 << 32 => {}
            _ => return Err(too_large),
        }
        let segment_vaddr = START_KERNEL_MAP
            .checked_add(segment_paddr)
            .ok_or_else(|| bad_elf("the kernel lies beyond __START_KERNEL_map's reach"))?;
        // The kernel's segments lose their zero tails (.bss, .brk, the init scratch area): the
        // loader zero-fills memory past a segment's file size, and a fresh guest's RAM is zero
        // anyway. The file keeps what the segments and notes need and ends there; the section
        // table (no loader reads it) goes.
        let mut kernel_phdrs = parsed.phdrs.clone();
        for p in kernel_phdrs.iter_mut().filter(|p| p.kind == elf::PT_LOAD) {
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
        let kept_len = kernel_phdrs
            .iter()
            .filter(|p| p.filesz > 0)
            .map(|p| p.offset.saturating_add(p.filesz))
            .chain([elf::EHDR_SIZE as u64, phdr_table_end])
            .max()
            .expect("not empty")
            .min(vmlinux.len() as u64);
        let drop_sections = parsed.header.shoff >= kept_len;
        let segment_offset = align_up(kept_len, FILE_ALIGN).expect("small");
        let at = |offset: u64| segment_paddr + offset;

        // The segment's head.
        let params = StubParams {
            start_info: at(START_INFO_OFFSET) as u32,
            modlist: at(MODLIST_OFFSET) as u32,
            cmdline: at(CMDLINE_OFFSET) as u32,
            baked_len: cmdline.len() as u32,
            entry: kernel_entry,
        };
        let stub = entry_stub(&params);
        let start_info = HvmStartInfo {
            magic: START_INFO_MAGIC,
            version: START_INFO_VERSION,
            nr_modules: 1,
            modlist_paddr: at(MODLIST_OFFSET),
            cmdline_paddr: at(CMDLINE_OFFSET),
            ..Default::default()
        };
        let module = HvmModlistEntry {
            paddr: at(INITRAMFS_OFFSET),
            size: initramfs_len,
            ..Default::default()
        };
        let mut head = vec![0u8; INITRAMFS_OFFSET as usize];
        let put = |head: &mut Vec<u8>, offset: u64, bytes: &[u8]| {
            head[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut head, STUB_OFFSET, &stub);
        put(&mut head, START_INFO_OFFSET, &start_info.to_bytes());
        put(&mut head, MODLIST_OFFSET, &module.to_bytes());
        put(&mut head, CMDLINE_OFFSET, cmdline.as_bytes());

        // The program header table: in place when the bytes after it are free, else at the end.
        let new_phdr = ProgramHeader {
            kind: elf::PT_LOAD,
            flags: 7, // PF_R | PF_W | PF_X: the stub runs from here
            offset: segment_offset,
            vaddr: segment_vaddr,
            paddr: segment_paddr,
            filesz: segment_size,
            memsz: segment_size,
            align: FILE_ALIGN,
        };
        let mut phdrs = kernel_phdrs;
        phdrs.push(new_phdr);
        let phnum = u16::try_from(phdrs.len())
            .ok()
            .filter(|&n| n < 0xffff)
            .ok_or_else(|| bad_elf("too many program headers"))?;
        let table_len = phdrs.len() as u64 * elf::PHDR_SIZE as u64;
        let end_of_data = segment_offset + segment_size;
        let in_place = !move_phdrs
            && phdr_room(&parsed)
            && phdr_table_end + (elf::PHDR_SIZE as u64) <= kept_len;
        let phdr_offset = if in_place {
            parsed.header.phoff
        } else {
            align_up(end_of_data, 8).ok_or(BakeError::TooLarge { len: initramfs_len })?
        };
        for p in phdrs.iter_mut().filter(|p| p.kind == elf::PT_PHDR) {
            // Keep a PT_PHDR describing the table's file bytes (vmlinux files have none).
            p.offset = phdr_offset;
            p.filesz = table_len;
            p.memsz = table_len;
        }
        let table: Vec<u8> = phdrs.iter().flat_map(|p| p.to_bytes()).collect();
        let file_len = if in_place {
            end_of_data
        } else {
            phdr_offset + table_len
        };

        // The patches to the vmlinux.
        let mut patches = Vec::new();
        patches.push((32, phdr_offset.to_le_bytes().to_vec())); // e_phoff
        patches.push((56, phnum.to_le_bytes().to_vec())); // e_phnum
        if drop_sections {
            patches.push((40, 0u64.to_le_bytes().to_vec())); // e_shoff
            patches.push((60, [0u8; 4].to_vec())); // e_shnum, e_shstrndx
        }
        let note = parsed
            .notes()
            .map_err(KernelError::Elf)?
            .into_iter()
            .find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
            .ok_or(KernelError::NoPvh)?;
        let stub_paddr = at(STUB_OFFSET);
        let desc = match note.desc.len() {
            4 => (stub_paddr as u32).to_le_bytes().to_vec(),
            _ => stub_paddr.to_le_bytes().to_vec(),
        };
        patches.push((note.desc_offset as u64, desc));
        let moved_phdrs = if in_place {
            patches.push((phdr_offset, table));
            None
        } else {
            Some(table)
        };
        patches.sort_by_key(|(offset, _)| *offset);
        if patches
            .windows(2)
            .any(|w| w[0].0 + w[0].1.len() as u64 > w[1].0)
        {
            return Err(bad_elf("the PVH note overlaps the ELF or program headers"));
        }
        if patches
            .iter()
            .any(|(offset, bytes)| offset.saturating_add(bytes.len() as u64) > kept_len)
        {
            return Err(bad_elf("the PVH note lies outside the kernel's segments"));
        }

        Ok(Plan {
            vmlinux: &vmlinux[..kept_len as usize],
            layout: Layout {
                kernel_end,
                segment_paddr,
                segment_vaddr,
                segment_offset,
                segment_size,
                stub_paddr,
                stub_size: stub.len() as u64,
                start_info_paddr: at(START_INFO_OFFSET),
                modlist_paddr: at(MODLIST_OFFSET),
                cmdline_paddr: at(CMDLINE_OFFSET),
                initramfs_paddr: at(INITRAMFS_OFFSET),
                initramfs_len,
                kernel_entry,
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
        let pad = self.layout.segment_offset - self.vmlinux.len() as u64;
        out.write_all(&vec![0u8; pad as usize])?;
        out.write_all(&self.segment_head)?;
        let expected = self.layout.initramfs_len;
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
            let end = self.layout.segment_offset + self.layout.segment_size;
            out.write_all(&vec![0u8; (self.layout.phdr_offset - end) as usize])?;
            out.write_all(table)?;
        }
        Ok(())
    }
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
