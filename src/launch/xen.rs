//! Xen: xl.cfg(5) files, `KEY = VALUE` lines (`name`, `type`, `kernel`, `ramdisk`, `cmdline`,
//! `extra`, `memory`, `vcpus`, `vif`, `on_*`), for a PVH guest (the baked file alone) and a
//! classic PV one (kernel and ramdisk).

use super::Guest;

/// The Xen bridge the xl configurations attach.
pub const XEN_BRIDGE: &str = "xenbr0";

/// What the Xen launch files add to the command line: Xen's console.
pub const XEN_ARGS: &str = "console=hvc0";

/// A command line that no xl.cfg string can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct Unquotable {
    /// What is wrong.
    pub why: &'static str,
}

/// An xl.cfg string: double quotes, or single quotes around a value holding double ones (xl
/// has no escapes).
fn xl_string(s: &str) -> Result<String, Unquotable> {
    if !s.contains('"') {
        Ok(format!("\"{s}\""))
    } else if !s.contains('\'') {
        Ok(format!("'{s}'"))
    } else {
        Err(Unquotable {
            why: "it holds both kinds of quote, which an xl.cfg string cannot",
        })
    }
}

fn common(guest: &Guest<'_>) -> String {
    format!(
        "memory = {mem}\nvcpus = {vcpus}\nvif = [ 'bridge={XEN_BRIDGE}' ]\n\
         # The application's end powers the guest off; a panic reboots it (panic=-1): either way\n\
         # the domain goes.\n\
         on_poweroff = \"destroy\"\non_reboot = \"destroy\"\non_crash = \"destroy\"\n",
        mem = guest.memory_mib,
        vcpus = guest.vcpus,
    )
}

/// The PVH configuration `file`: the baked file `elf` alone, Xen's console added.
pub fn pvh_cfg(guest: &Guest<'_>, elf: &str, file: &str) -> String {
    let name = guest.name;
    format!(
        "# {name} as a Xen PVH guest: the baked file holds the kernel, the initramfs and the\n\
         # command line; `extra` is appended to the baked command line.\n\
         # Start it from this directory: xl create -c {file}\n\
         name = \"{name}\"\ntype = \"pvh\"\nkernel = \"{elf}\"\nextra = \"{XEN_ARGS}\"\n{common}",
        common = common(guest),
    )
}

/// The PV configuration `file`: kernel and ramdisk, the whole command line with Xen's console.
pub fn pv_cfg(guest: &Guest<'_>, file: &str) -> Result<String, Unquotable> {
    let name = guest.name;
    Ok(format!(
        "# {name} as a classic Xen PV guest: {kernel} (built with Xen PV support) and {initrd}.\n\
         # Start it from this directory: xl create -c {file}\n\
         name = \"{name}\"\ntype = \"pv\"\nkernel = \"{kernel}\"\nramdisk = \"{initrd}\"\n\
         cmdline = {cmdline}\n{common}",
        kernel = guest.kernel,
        initrd = guest.initrd,
        cmdline = xl_string(&format!("{} {XEN_ARGS}", guest.cmdline))?,
        common = common(guest),
    ))
}
