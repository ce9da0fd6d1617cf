//! Bake a kernel, an initramfs file and a command line into one PVH ELF, and print the layout:
//!
//! ```text
//! cargo run --example bake_demo -- /boot/vmlinuz-6.1.0-56-cloud-amd64 initrd.cpio.gz \
//!     'console=ttyS0 panic=-1 rdinit=/init' baked.elf
//! qemu-system-x86_64 -accel tcg -m 256 -M q35 -nographic -no-reboot -kernel baked.elf
//! ```

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, initramfs, cmdline, out] = &args[..] else {
        anyhow::bail!("usage: bake_demo KERNEL INITRAMFS CMDLINE OUTPUT");
    };
    let kernel = oci2uk::kernel::Kernel::load(Path::new(kernel))?;
    eprintln!(
        "kernel {} {} ({}), PVH entry {:#x}",
        kernel.version,
        kernel.machine,
        kernel.format,
        kernel.pvh_entry()?
    );
    let initramfs = File::open(initramfs).with_context(|| format!("cannot open {initramfs}"))?;
    let len = initramfs.metadata()?.len();
    let file = File::create(out).with_context(|| format!("cannot create {out}"))?;
    let layout = oci2uk::bake::bake(&kernel, initramfs, len, cmdline, BufWriter::new(file))?;
    eprintln!("{layout:#x?}");
    Ok(())
}
