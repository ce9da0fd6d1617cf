//! `--rootfs squashfs`: the image as a read-only SquashFS image inside the initramfs,
//! loop-mounted by the init under a tmpfs overlay, booted under `qemu-system-x86_64` (TCG)
//! with nothing but `-kernel FILE`.

use std::time::Duration;

use crate::support::{Boot, Machine};
use crate::util::*;

#[test]
fn nginx_serves_from_a_squashfs_root_and_writes_through_the_overlay() {
    let s = Scratch::new();
    let image = format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"));
    // Before nginx starts, write into a directory of the (read-only) image: the overlay takes
    // it, and nginx serves it.
    let entry = r#"["sh","-c","echo written through the overlay > /var/www/html/written.txt && exec nginx -g 'daemon off;'"]"#;
    let out = s.oci2uk(&[
        "build",
        &image,
        "--rootfs",
        "squashfs",
        "--entrypoint",
        entry,
        "-o",
        "nginx.elf",
        "--json",
    ]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let memory = v["memory_mib"].as_u64().unwrap();
    assert!(memory >= 128, "{v}");

    // The initramfs of the same build holds the root image, and none of the image's own files.
    let out = s.oci2uk(&[
        "build",
        &image,
        "--rootfs",
        "squashfs",
        "--format",
        "initrd",
        "-o",
        "nginx.initrd",
        "--quiet",
    ]);
    assert_ok(&out);
    let initrd = std::fs::read(s.path().join("work/nginx.initrd")).unwrap();
    // A zstd archive of the init, config and modules, then the root image (compressed
    // already) in an uncompressed archive.
    let frame = zstd::zstd_safe::find_frame_compressed_size(&initrd).expect("a zstd frame");
    let mut cpio = zstd::decode_all(&initrd[..frame]).expect("a zstd initramfs");
    let raw = &initrd[frame.next_multiple_of(4)..];
    assert!(
        raw.starts_with(b"070701"),
        "an uncompressed archive follows"
    );
    let raw_has = |name: &[u8]| raw.windows(name.len()).any(|w| w == name);
    assert!(raw_has(b".oci2uk/root.squashfs\0"));
    assert!(raw_has(b"hsqs"), "a SquashFS image inside");
    cpio.extend_from_slice(raw);
    let has = |name: &[u8]| cpio.windows(name.len()).any(|w| w == name);
    assert!(has(b".oci2uk/modules/squashfs.ko\0"));
    assert!(has(b".oci2uk/modules/overlay.ko\0"));
    assert!(has(b".oci2uk/modules/loop.ko\0"));
    assert!(
        !has(b"etc/nginx/nginx.conf\0"),
        "the image's files are in the root image"
    );

    // Boots at the memory the build recorded.
    let _one = one_vm();
    let port = free_port();
    let mut vm = Boot::new(&s.path().join("work/nginx.elf"), Machine::Microvm, memory)
        .forward(port, 80)
        .start(s.path().join("console"));
    let page = vm.wait_page(port, "/", Duration::from_secs(180));
    assert!(
        page.contains("Hello from the oci2uk nginx fixture."),
        "{page}"
    );
    let written = vm.wait_page(port, "/written.txt", Duration::from_secs(10));
    assert_eq!(written, "written through the overlay\n");
    let console = vm.console();
    assert!(!console.contains("oci2uk: error"), "console:\n{console}");
    assert!(!console.contains("oci2uk: warning"), "console:\n{console}");
}
