//! Where the bake puts each part in its segment, as offsets from the segment's start: what the
//! bake writes and what reading a baked file back (`artifact::baked`) finds.

use std::mem::size_of;

use super::pv::MAX_GUEST_CMDLINE;
use super::pvh::{HvmModlistEntry, HvmStartInfo, COMMAND_LINE_SIZE};
use super::stub::{MAX_PV_STUB_SIZE, MAX_STUB_SIZE};

/// The entry stub.
pub const STUB_OFFSET: u64 = 0;
/// The baked `hvm_start_info`.
pub const START_INFO_OFFSET: u64 = 0x100;
/// The baked module list (one entry).
pub const MODLIST_OFFSET: u64 = 0x140;
/// The Xen PV entry stub (absent when the kernel has no PV entry).
pub const PV_STUB_OFFSET: u64 = 0x180;
/// The command line buffer (`COMMAND_LINE_SIZE` bytes).
pub const CMDLINE_OFFSET: u64 = 0x800;
/// The initramfs, page-aligned.
pub const INITRAMFS_OFFSET: u64 = 0x1000;

const _: () = assert!(STUB_OFFSET + MAX_STUB_SIZE as u64 <= START_INFO_OFFSET);
const _: () = assert!(START_INFO_OFFSET + size_of::<HvmStartInfo>() as u64 <= MODLIST_OFFSET);
const _: () = assert!(MODLIST_OFFSET + size_of::<HvmModlistEntry>() as u64 <= CMDLINE_OFFSET);
const _: () = assert!(CMDLINE_OFFSET + COMMAND_LINE_SIZE as u64 <= INITRAMFS_OFFSET);
const _: () = assert!(MODLIST_OFFSET + size_of::<HvmModlistEntry>() as u64 <= PV_STUB_OFFSET);
const _: () = assert!(PV_STUB_OFFSET + MAX_PV_STUB_SIZE as u64 <= CMDLINE_OFFSET);
// The PV stub merges the lines in the buffer and copies MAX_GUEST_CMDLINE bytes of it.
const _: () = assert!(MAX_GUEST_CMDLINE <= COMMAND_LINE_SIZE);
