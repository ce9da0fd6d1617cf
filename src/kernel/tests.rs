use super::decompress::tests::{compress_with, kernel_compressor, sample};
use super::elf::testutil::{build, Seg};
use super::*;

/// A small vmlinux: one PT_LOAD segment holding a banner, the PVH note pointing into it.
pub(crate) fn tiny_vmlinux(pvh: Option<u32>) -> Vec<u8> {
    tiny_vmlinux_with(pvh, None)
}

/// [`tiny_vmlinux`] with, when `pv` is given, the Xen PV notes as Linux writes them: the entry
/// (a virtual address), `VIRT_BASE` and `PADDR_OFFSET`.
pub(crate) fn tiny_vmlinux_with(pvh: Option<u32>, pv: Option<u64>) -> Vec<u8> {
    let mut text = b"\x90\x90Linux version 6.1.0-99-test (builder@example) #1 SMP\n\0".to_vec();
    text.extend_from_slice(&sample(200_000));
    let mut notes = vec![("Xen", 6, b"linux\0".to_vec())];
    if let Some(entry) = pv {
        notes.push(("Xen", XEN_ELFNOTE_ENTRY, entry.to_le_bytes().to_vec()));
        notes.push((
            "Xen",
            XEN_ELFNOTE_VIRT_BASE,
            START_KERNEL_MAP.to_le_bytes().to_vec(),
        ));
        notes.push(("Xen", XEN_ELFNOTE_PADDR_OFFSET, 0u64.to_le_bytes().to_vec()));
    }
    if let Some(entry) = pvh {
        notes.push((
            "Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            u64::from(entry).to_le_bytes().to_vec(),
        ));
    }
    notes.push(("GNU", 3, vec![0xab; 20]));
    build(
        &[
            Seg {
                paddr: 0x100_0000,
                data: text,
                memsz: 0x40_0000,
            },
            Seg {
                paddr: 0x150_0000,
                data: vec![1; 64],
                memsz: 0x12_3456,
            },
        ],
        &notes,
        0x1000,
    )
}

/// A bzImage around `payload`: 4 setup sectors (written as 0, which means 4), boot protocol
/// 2.15, a `kernel_version` string, and the payload after 0x123 bytes of decompressor code.
pub(crate) fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; 5 * 512];
    image[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    image[0x1f1] = 0;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let version = b"6.1.0-99-test (builder@example) #1 SMP\0";
    image[0x400..0x400 + version.len()].copy_from_slice(version);
    image[0x20e..0x210].copy_from_slice(&(0x400u16 - 0x200).to_le_bytes());
    image[0x248..0x24c].copy_from_slice(&0x123u32.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    image.extend_from_slice(&[0xcc; 0x123]);
    image.extend_from_slice(payload);
    image.extend_from_slice(&[0; 300]);
    image
}

#[test]
fn reads_the_pv_entry() {
    let k = Kernel::parse(tiny_vmlinux_with(
        Some(0x100_0001),
        Some(0xffff_ffff_8100_0040),
    ))
    .unwrap();
    assert_eq!(k.pv_entry(), Some(0xffff_ffff_8100_0040));
    assert_eq!(k.pvh_entry().unwrap(), 0x100_0001);
    assert_eq!(
        Kernel::parse(tiny_vmlinux(Some(0x100_0001)))
            .unwrap()
            .pv_entry(),
        None
    );
    // A PV-only kernel: no PVH entry, a PV entry.
    let k = Kernel::parse(tiny_vmlinux_with(None, Some(0xffff_ffff_8100_0040))).unwrap();
    assert_eq!(k.pv_entry(), Some(0xffff_ffff_8100_0040));
    assert!(matches!(k.pvh_entry(), Err(KernelError::NoPvh)));
}

#[test]
fn reads_a_vmlinux() {
    let vmlinux = tiny_vmlinux(Some(0x100_0001));
    let k = Kernel::parse(vmlinux.clone()).unwrap();
    assert_eq!(k.format, ImageFormat::Vmlinux);
    assert_eq!(k.machine, Machine::X86_64);
    assert_eq!(k.version, "6.1.0-99-test");
    assert_eq!(k.pvh_entry().unwrap(), 0x100_0001);
    assert_eq!(k.vmlinux().unwrap(), &vmlinux[..]);
}

#[test]
fn a_kernel_without_pvh_reads_but_cannot_bake() {
    let k = Kernel::parse(tiny_vmlinux(None)).unwrap();
    let e = k.pvh_entry().unwrap_err();
    assert!(matches!(e, KernelError::NoPvh));
    assert!(e.to_string().contains("CONFIG_PVH"), "{e}");
}

#[test]
fn extracts_every_compression_from_a_bzimage() {
    let vmlinux = tiny_vmlinux(Some(0x100_0001));
    let mut tried = 0;
    for c in Compression::ALL {
        let (tool, args) = kernel_compressor(c);
        let Some(mut payload) = compress_with(tool, args, &vmlinux) else {
            panic!("`{tool}` is not installed (scripts/install-vm.sh installs it)");
        };
        if c != Compression::Gzip {
            payload.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
        }
        let k = Kernel::parse(fake_bzimage(&payload)).unwrap_or_else(|e| panic!("{c}: {e:?}"));
        assert_eq!(
            k.format,
            ImageFormat::BzImage {
                compression: Some(c)
            }
        );
        assert_eq!(k.version, "6.1.0-99-test");
        assert!(k.vmlinux().unwrap() == &vmlinux[..], "{c}");
        assert_eq!(k.pvh_entry().unwrap(), 0x100_0001);
        tried += 1;
    }
    // gzip is always available here (flate2), whatever is installed.
    assert!(tried >= 1);
    let k = Kernel::parse(fake_bzimage(&vmlinux)).unwrap();
    assert_eq!(k.format, ImageFormat::BzImage { compression: None });
}

#[test]
fn rejects_what_is_not_a_kernel() {
    for bad in [vec![], b"hello".to_vec(), vec![0; 4096]] {
        assert!(matches!(
            Kernel::parse(bad),
            Err(KernelError::NotAKernel { .. })
        ));
    }
    let e = Kernel::parse(fake_bzimage(b"\x01\x02\x03\x04garbage")).unwrap_err();
    assert!(matches!(e, KernelError::UnknownCompression { .. }), "{e:?}");
    let mut truncated = fake_bzimage(&[0x1f, 0x8b, 8, 0, 0, 0]);
    truncated.truncate(5 * 512 + 0x130);
    assert!(Kernel::parse(truncated).is_err());
}

#[test]
fn recognises_arm64_images() {
    let mut image = vec![0u8; 0x1000];
    image[0x38..0x3c].copy_from_slice(b"ARM\x64");
    image.extend_from_slice(b"Linux version 6.1.0-99-arm64 (x) #1\0");
    let k = Kernel::parse(image.clone()).unwrap();
    assert_eq!(k.machine, Machine::Aarch64);
    assert_eq!(k.version, "6.1.0-99-arm64");
    assert_eq!(k.format, ImageFormat::Arm64Image { gzip: false });
    let e = k.vmlinux().unwrap_err();
    assert!(e.to_string().contains("arm64"), "{e}");
    assert!(matches!(k.pvh_entry(), Err(KernelError::Arm64NotBakeable)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &image).unwrap();
    let k = Kernel::parse(gz.finish().unwrap()).unwrap();
    assert_eq!(k.format, ImageFormat::Arm64Image { gzip: true });
}

#[test]
fn versions_sort_like_sort_v() {
    let mut v = vec![
        "6.1.0-9-amd64",
        "6.1.0-10-amd64",
        "5.10.0-28-cloud-amd64",
        "6.1.0-10-cloud-amd64",
        "6.12.1",
    ];
    v.sort_by(|a, b| version_cmp(a, b));
    assert_eq!(
        v,
        [
            "5.10.0-28-cloud-amd64",
            "6.1.0-9-amd64",
            "6.1.0-10-amd64",
            "6.1.0-10-cloud-amd64",
            "6.12.1"
        ]
    );
}

#[test]
fn discovery_picks_the_newest_kernel_with_modules() {
    let root = tempfile::tempdir().unwrap();
    let (boot, modules) = (root.path().join("boot"), root.path().join("modules"));
    assert!(matches!(
        newest_installed(&boot, &modules),
        Err(KernelError::NoneInstalled)
    ));
    std::fs::create_dir_all(&boot).unwrap();
    for v in ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.1.0-11-amd64"] {
        std::fs::write(boot.join(format!("vmlinuz-{v}")), b"").unwrap();
    }
    std::fs::write(boot.join("config-6.1.0-11-amd64"), b"").unwrap();
    let e = newest_installed(&boot, &modules).unwrap_err();
    assert!(e.to_string().contains("linux-image-cloud-amd64"), "{e}");
    for v in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
        std::fs::create_dir_all(modules.join(v)).unwrap();
        std::fs::write(modules.join(v).join("modules.dep"), b"").unwrap();
    }
    assert_eq!(
        newest_installed(&boot, &modules).unwrap(),
        boot.join("vmlinuz-6.1.0-10-amd64")
    );
    let chosen = discover(Some(Path::new("/k"))).unwrap();
    assert_eq!(chosen.choice, Choice::Flag);
    assert_eq!(chosen.to_string(), "/k (--kernel)");
}

/// The installed Debian kernel (the cloud kernel `scripts/install-vm.sh` installs, as the VM
/// tests need): the real bzImage end to end.
#[cfg(feature = "vm-tests")]
#[test]
fn the_installed_kernel() {
    let path = newest_installed(Path::new("/boot"), Path::new("/lib/modules"))
        .expect("a kernel with modules in /boot (scripts/install-vm.sh installs one)");
    let k = Kernel::load(&path).unwrap();
    eprintln!(
        "{}: {} {} {}",
        path.display(),
        k.format,
        k.machine,
        k.version
    );
    assert!(path.to_string_lossy().ends_with(&k.version));
    assert!(matches!(k.format, ImageFormat::BzImage { .. }));
    let vmlinux = k.vmlinux().unwrap();
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert_eq!(banner_version(vmlinux).as_deref(), Some(k.version.as_str()));
    if let Ok(entry) = k.pvh_entry() {
        assert!(entry >= 0x100_0000, "{entry:#x}");
    }
    if let Some(entry) = k.pv_entry() {
        assert!(entry >= START_KERNEL_MAP + 0x100_0000, "{entry:#x}");
    }
    if let Some(config) = k.config().unwrap() {
        assert!(config.initramfs_compressions().contains(&Compression::Gzip));
    }
    let modules = k.modules(None).unwrap();
    assert_eq!(modules.dir(), Path::new("/lib/modules").join(&k.version));
}
