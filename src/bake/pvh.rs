//! The PVH boot structures (Xen's `xen/include/public/arch-x86/hvm/start_info.h`), written as
//! little-endian bytes, and the kernel's limit on the command line they point at.

use std::mem::{offset_of, size_of};

/// `hvm_start_info.magic`: "xEn3" with the high bit of each byte flipped.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// The start_info version the bake produces (1: with the memory map fields).
pub const START_INFO_VERSION: u32 = 1;
/// The size of a version 0 start_info (no `memmap_*` fields).
pub const START_INFO_V0_SIZE: usize = offset_of!(HvmStartInfo, memmap_paddr);

/// x86 Linux's `COMMAND_LINE_SIZE` (arch/x86/include/asm/setup.h): the kernel copies at most
/// this many bytes, NUL included, so the merged line is cut at 2047 bytes.
pub const COMMAND_LINE_SIZE: u32 = 2048;

/// `struct hvm_start_info`, field by field, as the PVH ABI lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmStartInfo {
    /// [`START_INFO_MAGIC`].
    pub magic: u32,
    /// 0 or 1.
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of module entries.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP.
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version 1).
    pub memmap_paddr: u64,
    /// Number of memory map entries (version 1).
    pub memmap_entries: u32,
    /// Must be zero.
    pub reserved: u32,
}

/// `struct hvm_modlist_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HvmModlistEntry {
    /// Physical address of the module.
    pub paddr: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Physical address of its command line (0: none).
    pub cmdline_paddr: u64,
    /// Must be zero.
    pub reserved: u64,
}

const _: () = assert!(size_of::<HvmStartInfo>() == 56);
const _: () = assert!(size_of::<HvmModlistEntry>() == 32);
const _: () = assert!(offset_of!(HvmStartInfo, modlist_paddr) == 16);
const _: () = assert!(offset_of!(HvmStartInfo, cmdline_paddr) == 24);
const _: () = assert!(offset_of!(HvmStartInfo, memmap_paddr) == 40);
const _: () = assert!(offset_of!(HvmStartInfo, reserved) == 52);

impl HvmStartInfo {
    /// The structure as bytes.
    pub fn to_bytes(&self) -> [u8; 56] {
        let mut b = [0u8; 56];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.nr_modules.to_le_bytes());
        b[16..24].copy_from_slice(&self.modlist_paddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.cmdline_paddr.to_le_bytes());
        b[32..40].copy_from_slice(&self.rsdp_paddr.to_le_bytes());
        b[40..48].copy_from_slice(&self.memmap_paddr.to_le_bytes());
        b[48..52].copy_from_slice(&self.memmap_entries.to_le_bytes());
        b[52..56].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }
}

impl HvmModlistEntry {
    /// The structure as bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..8].copy_from_slice(&self.paddr.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.cmdline_paddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }
}
