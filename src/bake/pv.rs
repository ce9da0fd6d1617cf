//! The Xen PV boot structure the PV entry stub edits (`struct start_info` of Xen's
//! `xen/include/public/xen.h`, x86_64 layout: `unsigned long` and `xen_pfn_t` are 8 bytes).
//! Only its offsets are used: the stub rewrites the hypervisor's copy in place.

use std::mem::{offset_of, size_of};

/// `MAX_GUEST_CMDLINE`: the size of `start_info.cmd_line`, NUL included.
pub const MAX_GUEST_CMDLINE: u32 = 1024;
/// `SIF_MOD_START_PFN`: `mod_start` is a page frame number, not a virtual address.
pub const SIF_MOD_START_PFN: u32 = 1 << 3;

/// `struct start_info` as a 64-bit PV guest sees it, field by field.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PvStartInfo {
    /// `"xen-<version>-<platform>"`.
    pub magic: [u8; 32],
    /// Total pages allocated to the domain.
    pub nr_pages: u64,
    /// Machine address of the shared info page.
    pub shared_info: u64,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Machine frame of the Xenstore page.
    pub store_mfn: u64,
    /// Event channel for Xenstore.
    pub store_evtchn: u32,
    /// The console's frame and event channel (the `domU` arm of the union; `dom0`'s arm is
    /// two `uint32_t`, no larger).
    pub console: [u64; 2],
    /// Virtual address of the page directory.
    pub pt_base: u64,
    /// Number of bootstrap page-table frames.
    pub nr_pt_frames: u64,
    /// Virtual address of the page-frame list.
    pub mfn_list: u64,
    /// Virtual address of the module (a frame number when `SIF_MOD_START_PFN` is set).
    pub mod_start: u64,
    /// The module's size in bytes.
    pub mod_len: u64,
    /// The NUL-terminated command line.
    pub cmd_line: [u8; MAX_GUEST_CMDLINE as usize],
    /// First frame of the initial P->M table.
    pub first_p2m_pfn: u64,
    /// Number of its frames.
    pub nr_p2m_frames: u64,
}

// Checked against the header's layout as a C compiler lays it out for x86_64.
const _: () = assert!(offset_of!(PvStartInfo, flags) == 48);
const _: () = assert!(offset_of!(PvStartInfo, store_mfn) == 56);
const _: () = assert!(offset_of!(PvStartInfo, console) == 72);
const _: () = assert!(offset_of!(PvStartInfo, mod_start) == 112);
const _: () = assert!(offset_of!(PvStartInfo, mod_len) == 120);
const _: () = assert!(offset_of!(PvStartInfo, cmd_line) == 128);
const _: () = assert!(size_of::<PvStartInfo>() == 1168);
