//! `--rootfs squashfs`: the image as a read-only SquashFS image under a tmpfs overlay, booted
//! under `qemu-system-x86_64` (TCG) with nothing but `-kernel FILE`: inside the initramfs and
//! loop-mounted with Debian's kernel, read in place with the oci2uk kernel.

use std::time::Duration;

use crate::support::{distribution_kernel, oci2uk_kernel, Boot, Guest, Machine};
use crate::util::*;

/// Before nginx starts, write into a directory of the (read-only) image: the overlay takes
/// it, and nginx serves it.
const WRITE_THEN_NGINX: &str = r#"["sh","-c","echo written through the overlay > /var/www/html/written.txt && exec nginx -g 'daemon off;'"]"#;

/// Boots `elf` at `memory` MiB with `append` on its command line: nginx serves its page and
/// the file written through the overlay, and the console has no error or warning.
fn serves_through_the_overlay(s: &Scratch, elf: &str, memory: u64, append: &str) -> Guest {
    let _one = one_vm();
    let port = free_port();
    let mut boot =
        Boot::new(&s.path().join("work").join(elf), Machine::Microvm, memory).forward(port, 80);
    if !append.is_empty() {
        boot = boot.append(append);
    }
    let mut vm = boot.start(s.path().join(format!("console-{elf}")));
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
    vm
}

#[test]
fn nginx_serves_from_a_squashfs_root_and_writes_through_the_overlay() {
    let s = Scratch::new();
    let image = format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"));
    let kernel = distribution_kernel();
    let kernel = kernel.to_str().unwrap();
    let out = s.oci2uk(&[
        "build",
        &image,
        "--kernel",
        kernel,
        "--rootfs",
        "squashfs",
        "--entrypoint",
        WRITE_THEN_NGINX,
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
        "--kernel",
        kernel,
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
    serves_through_the_overlay(&s, "nginx.elf", memory, "");
}

#[test]
fn the_oci2uk_kernel_reads_the_root_image_in_place_and_nginx_serves_from_64_mib() {
    let s = Scratch::new();
    let image = format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"));
    let kernel = oci2uk_kernel();
    let out = s.oci2uk(&[
        "build",
        &image,
        "--kernel",
        kernel.to_str().unwrap(),
        "--entrypoint",
        WRITE_THEN_NGINX,
        "-o",
        "nginx.elf",
        "--json",
    ]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let memory = v["memory_mib"].as_u64().unwrap();
    assert!(memory <= 64, "{v}");

    // The file says where the image is, and its initramfs holds no copy of it.
    let out = s.oci2uk(&["inspect", "nginx.elf", "--json"]);
    assert_ok(&out);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["rootfs"]["in_place"], true, "{info}");
    let cmdline = info["cmdline"].as_str().unwrap();
    assert!(cmdline.contains(" memmap=0x"), "{cmdline}");
    assert!(cmdline.contains(" phram.phram=oci2uk-root,0x"), "{cmdline}");

    // Boots at the memory the build recorded, mounting the image's block device.
    let vm = serves_through_the_overlay(&s, "nginx.elf", memory, "oci2uk.debug=1");
    let console = vm.console();
    assert!(
        console.contains("the root image in place (/dev/mtdblock0) mounted as the root"),
        "{console}"
    );
    assert!(console.contains(" 0 modules loaded"), "{console}");
}
