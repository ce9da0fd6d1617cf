//! The kernel reader: bzImage (with every decompressor Linux uses), vmlinux ELF, arm64
//! `Image` and its gzip form, as `--kernel` hands them over.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci2uk::kernel::Kernel;

fuzz_target!(|data: &[u8]| {
    let Ok(kernel) = Kernel::parse(data.to_vec()) else {
        return;
    };
    let _ = format!("{kernel:?}");
    let _ = kernel.vmlinux();
    let _ = kernel.pvh_entry();
    let _ = kernel.config();
});
