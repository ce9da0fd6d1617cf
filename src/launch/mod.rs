//! Launching a guest: one model per hypervisor, rendered as what that hypervisor takes.
//!
//! - [`qemu`]: QEMU's argument vector (what `run` starts) and the bundle's `qemu.sh`, from one
//!   [`qemu::Qemu`].
//! - [`firecracker`]: Firecracker's `--config-file` JSON.
//! - [`cloud_hypervisor`]: a script that starts Cloud Hypervisor.
//! - [`xen`]: xl.cfg(5) files (the baked file as PV or PVH) and the dom0 launcher `xen.sh`.
//! - [`ports`]: exposed ports and host-to-guest forwards.
//!
//! Nothing here starts a process or writes a file: the renderers return text or arguments.

pub mod cloud_hypervisor;
pub mod firecracker;
pub mod ports;
pub mod qemu;
pub mod xen;

pub use ports::{BadPort, Port, PortForward, Proto};

/// The tap device the Firecracker and Cloud Hypervisor launch files attach.
pub const TAP: &str = "tap0";

/// A guest booted from a kernel, an initramfs and a command line, with the files named as
/// the launch files name them (relative to the directory they are started from).
#[derive(Debug, Clone, Copy)]
pub struct Guest<'a> {
    /// The guest's name (ASCII letters, digits, `.`, `_` and `-` only): Xen's domain name, and
    /// what the scripts' comments call it.
    pub name: &'a str,
    /// The uncompressed kernel ELF.
    pub kernel: &'a str,
    /// The compressed initramfs.
    pub initrd: &'a str,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The file holding the command line, which the scripts read when they run.
    pub cmdline_file: &'a str,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}
