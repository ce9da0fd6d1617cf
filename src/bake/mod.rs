//! The bake: kernel + initramfs + command line in, one bootable PVH ELF out.
