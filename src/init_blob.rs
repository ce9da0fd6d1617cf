//! The guest init, built for x86_64 musl by `build.rs` from `init/` and embedded here.

/// The static init binary that becomes `/.oci2uk/init` in every guest.
pub const INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/oci2uk-init"));

#[cfg(test)]
mod tests {
    #[test]
    fn init_is_a_static_x86_64_elf() {
        let elf = super::INIT;
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "x86_64");
        // A static executable has no PT_INTERP program header.
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes([elf[54], elf[55]]) as usize;
        let phnum = u16::from_le_bytes([elf[56], elf[57]]) as usize;
        for i in 0..phnum {
            let ph = &elf[phoff + i * phentsize..];
            assert_ne!(
                u32::from_le_bytes(ph[..4].try_into().unwrap()),
                3,
                "PT_INTERP found"
            );
        }
    }
}
