use super::*;
use crate::kernel::elf::testutil::{build, Seg};
use crate::kernel::elf::{u32_at, u64_at};
use crate::kernel::tests::{tiny_vmlinux, tiny_vmlinux_with};

const ENTRY: u32 = 0x100_0001;
const PV_ENTRY: u64 = 0xffff_ffff_8100_0040;

fn kernel() -> Kernel {
    Kernel::parse(tiny_vmlinux(Some(ENTRY))).unwrap()
}

fn xen_note(out: &[u8], kind: u32) -> u64 {
    let parsed = Elf::parse(out).unwrap();
    let notes = parsed.notes().unwrap();
    let note = notes
        .iter()
        .find(|n| n.name == b"Xen" && n.kind == kind)
        .unwrap();
    u64_at(note.desc, 0).unwrap()
}

fn pvh_note(out: &[u8]) -> u64 {
    xen_note(out, XEN_ELFNOTE_PHYS32_ENTRY)
}

#[test]
fn adds_a_segment_after_the_kernel_and_points_the_note_at_the_stub() {
    let k = kernel();
    let initramfs: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let cmdline = "console=ttyS0 panic=-1 rdinit=/init";
    let out = bake_to_vec(&k, &initramfs, cmdline).unwrap();
    let layout = place(&k, initramfs.len() as u64, cmdline).unwrap();

    // The synthetic kernel ends at 0x150_0000 + 0x12_3456: the segment goes at 0x180_0000.
    assert_eq!(layout.kernel_end, 0x162_3456);
    assert_eq!(layout.segment_paddr, 0x180_0000);
    assert_eq!(layout.segment_vaddr, 0xffff_ffff_8180_0000);
    assert_eq!(layout.stub_paddr, 0x180_0000);
    assert_eq!(layout.start_info_paddr, 0x180_0100);
    assert_eq!(layout.initramfs_paddr, 0x180_1000);
    assert_eq!(layout.segment_size, 0x1000 + 10_000);
    assert!(!layout.phdrs_moved);
    assert_eq!(layout.file_len, out.len() as u64);
    assert_eq!(layout.memory_end(), 0x180_1000 + 10_000);
    // A kernel without a PV entry boots through PVH only; the PV stub's place stays zero.
    assert!(!layout.supports_pv());
    assert_eq!((layout.pv_stub_vaddr, layout.pv_stub_size), (None, 0));

    let parsed = Elf::parse(&out).unwrap();
    let original = Elf::parse(k.vmlinux().unwrap()).unwrap();
    assert_eq!(parsed.phdrs.len(), original.phdrs.len() + 1);
    assert_eq!(parsed.phdrs[..original.phdrs.len()], original.phdrs[..]);
    let seg = parsed.phdrs.last().unwrap();
    assert_eq!(seg.kind, elf::PT_LOAD);
    assert_eq!(seg.paddr, layout.segment_paddr);
    assert_eq!(seg.vaddr, layout.segment_vaddr);
    assert_eq!(seg.offset % 0x1000, 0);
    assert_eq!(seg.offset, layout.segment_offset);
    assert_eq!(
        (seg.filesz, seg.memsz),
        (layout.segment_size, layout.segment_size)
    );
    assert_eq!(pvh_note(&out), layout.stub_paddr);

    let seg_bytes = &out[seg.offset as usize..(seg.offset + seg.filesz) as usize];
    let si = &seg_bytes[START_INFO_OFFSET as usize..];
    assert_eq!(u32_at(si, 0), Some(START_INFO_MAGIC));
    assert_eq!(u32_at(si, 12), Some(1));
    assert_eq!(u64_at(si, 16), Some(layout.modlist_paddr));
    assert_eq!(u64_at(si, 24), Some(layout.cmdline_paddr));
    let module = &seg_bytes[MODLIST_OFFSET as usize..];
    assert_eq!(u64_at(module, 0), Some(layout.initramfs_paddr));
    assert_eq!(u64_at(module, 8), Some(initramfs.len() as u64));
    let line = &seg_bytes[CMDLINE_OFFSET as usize..INITRAMFS_OFFSET as usize];
    assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
    assert!(line[cmdline.len()..].iter().all(|&b| b == 0));
    assert_eq!(&seg_bytes[INITRAMFS_OFFSET as usize..], &initramfs[..]);
    assert!(
        seg_bytes[MODLIST_OFFSET as usize + 32..CMDLINE_OFFSET as usize]
            .iter()
            .all(|&b| b == 0)
    );
    assert_eq!(
        &seg_bytes[..layout.stub_size as usize],
        &entry_stub(&StubParams {
            start_info: 0x180_0100,
            modlist: 0x180_0140,
            cmdline: 0x180_0800,
            baked_len: cmdline.len() as u32,
            entry: ENTRY,
        })[..]
    );

    // Everything else is the kernel, byte for byte, then zeros up to the segment.
    let vmlinux = k.vmlinux().unwrap();
    let mut expected = vmlinux.to_vec();
    expected[56..58].copy_from_slice(&(parsed.phdrs.len() as u16).to_le_bytes());
    let slot = 64 + original.phdrs.len() * elf::PHDR_SIZE;
    expected[slot..slot + elf::PHDR_SIZE].copy_from_slice(&seg.to_bytes());
    let note = original
        .notes()
        .unwrap()
        .into_iter()
        .find(|n| n.kind == 18)
        .unwrap();
    expected[note.desc_offset..note.desc_offset + 8].copy_from_slice(&0x180_0000u64.to_le_bytes());
    assert!(out[..vmlinux.len()] == expected[..]);
    assert!(out[vmlinux.len()..seg.offset as usize]
        .iter()
        .all(|&b| b == 0));
}

/// A kernel with both entries: the PV note points at the PV stub's virtual address, which is
/// where libxc maps it (`VIRT_BASE + paddr`); the PVH side is what a PVH-only kernel gets.
#[test]
fn points_the_pv_note_at_the_pv_stub() {
    let k = Kernel::parse(tiny_vmlinux_with(Some(ENTRY), Some(PV_ENTRY))).unwrap();
    let initramfs = vec![0xa5; 10_000];
    let cmdline = "console=ttyS0 panic=-1 rdinit=/init";
    let out = bake_to_vec(&k, &initramfs, cmdline).unwrap();
    let layout = place(&k, initramfs.len() as u64, cmdline).unwrap();
    assert!(layout.supports_pv());
    assert_eq!(layout.kernel_pv_entry, Some(PV_ENTRY));
    assert_eq!(layout.segment_paddr, 0x180_0000);
    assert_eq!(
        layout.segment_vaddr,
        START_KERNEL_MAP + layout.segment_paddr
    );
    assert_eq!(layout.pv_stub_vaddr, Some(0xffff_ffff_8180_0180));
    assert_eq!(xen_note(&out, XEN_ELFNOTE_ENTRY), 0xffff_ffff_8180_0180);
    assert_eq!(pvh_note(&out), layout.stub_paddr);

    let parsed = Elf::parse(&out).unwrap();
    let seg = parsed.phdrs.last().unwrap();
    assert_eq!(seg.vaddr - seg.paddr, START_KERNEL_MAP);
    let seg_bytes = &out[seg.offset as usize..(seg.offset + seg.filesz) as usize];
    let pv = PV_STUB_OFFSET as usize;
    assert_eq!(
        &seg_bytes[pv..pv + layout.pv_stub_size as usize],
        &pv_entry_stub(&PvStubParams {
            cmdline: 0xffff_ffff_8180_0800,
            baked_len: cmdline.len() as u32,
            initramfs: 0xffff_ffff_8180_1000,
            initramfs_len: 10_000,
            entry: PV_ENTRY,
        })[..]
    );
    // The PVH stub and everything else in the head are what a PVH-only kernel gets.
    let pvh_only = bake_to_vec(&kernel(), &initramfs, cmdline).unwrap();
    let pvh_seg = Elf::parse(&pvh_only).unwrap().phdrs.last().unwrap().offset as usize;
    let pvh_head = &pvh_only[pvh_seg..pvh_seg + INITRAMFS_OFFSET as usize];
    for (i, (a, b)) in seg_bytes[..INITRAMFS_OFFSET as usize]
        .iter()
        .zip(pvh_head)
        .enumerate()
    {
        if !(pv..pv + layout.pv_stub_size as usize).contains(&i) {
            assert_eq!(a, b, "at {i:#x}");
        }
    }
}

/// Both notes, as readelf reads them, point into the baked segment.
#[test]
fn readelf_sees_both_entries() {
    let k = Kernel::parse(tiny_vmlinux_with(Some(ENTRY), Some(PV_ENTRY))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baked.elf");
    std::fs::write(&path, bake_to_vec(&k, &[1; 5000], "quiet").unwrap()).unwrap();
    let out = std::process::Command::new("readelf")
        .args(["-nW"])
        .arg(&path)
        .output()
        .expect("readelf runs (Debian's binutils; scripts/install-vm.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // binutils does not know Xen's note types: it prints both descriptors as bytes (and calls
    // type 1 by the generic NT_VERSION name).
    let desc = |kind: &str, bytes: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with("Xen") && l.contains(kind) && l.contains(bytes))
    };
    assert!(desc("NT_VERSION", "80 01 80 81 ff ff ff ff"), "{text}");
    assert!(desc("(0x00000012)", "00 00 80 01 00 00 00 00"), "{text}");
}

#[test]
fn output_is_deterministic_and_streams() {
    let k = kernel();
    let initramfs = vec![0x5a; 123_457];
    let a = bake_to_vec(&k, &initramfs, "quiet").unwrap();
    let b = bake_to_vec(&k, &initramfs, "quiet").unwrap();
    assert!(a == b);
    let mut streamed = Vec::new();
    let layout = bake(
        &k,
        std::io::Cursor::new(&initramfs),
        123_457,
        "quiet",
        &mut streamed,
    )
    .unwrap();
    assert!(streamed == a);
    assert_eq!(layout.file_len, a.len() as u64);
}

#[test]
fn moves_the_program_headers_when_there_is_no_room() {
    let vmlinux = build(
        &[Seg {
            paddr: 0x100_0000,
            data: b"Linux version 6.1.0-1-tight (x) #1\0".to_vec(),
            memsz: 0x20_0000,
        }],
        &[(
            "Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            ENTRY.to_le_bytes().to_vec(),
        )],
        0,
    );
    let k = Kernel::parse(vmlinux.clone()).unwrap();
    let out = bake_to_vec(&k, b"initramfs", "").unwrap();
    let layout = place(&k, 9, "").unwrap();
    assert!(layout.phdrs_moved);
    assert_eq!(layout.segment_paddr, 0x120_0000);
    assert_eq!(layout.phdr_offset % 8, 0);
    assert!(layout.phdr_offset >= layout.segment_offset + layout.segment_size);
    let parsed = Elf::parse(&out).unwrap();
    assert_eq!(parsed.header.phoff, layout.phdr_offset);
    assert_eq!(parsed.phdrs.len(), 3);
    assert_eq!(parsed.phdrs[2].paddr, 0x120_0000);
    // The 4-byte note descriptor stays 4 bytes.
    let note = parsed
        .notes()
        .unwrap()
        .into_iter()
        .find(|n| n.kind == 18)
        .unwrap();
    assert_eq!(note.desc, &0x120_0000u32.to_le_bytes());
    // The old table is left where it was, unchanged.
    assert_eq!(&out[64..64 + 2 * 56], &vmlinux[64..64 + 2 * 56]);
}

#[test]
fn refuses_what_cannot_boot() {
    let k = kernel();
    let long = "x".repeat(MAX_BAKED_CMDLINE + 1);
    assert!(matches!(
        bake_to_vec(&k, b"", &long),
        Err(BakeError::Cmdline { .. })
    ));
    assert!(bake_to_vec(&k, b"", &"x".repeat(MAX_BAKED_CMDLINE)).is_ok());
    // The limit is Xen PV's, for every kernel, and the error names it.
    assert_eq!(MAX_BAKED_CMDLINE, 1021);
    let e = bake_to_vec(&k, b"", &"x".repeat(1022)).unwrap_err();
    assert!(e.to_string().contains("at most 1021"), "{e}");
    let both = Kernel::parse(tiny_vmlinux_with(Some(ENTRY), Some(PV_ENTRY))).unwrap();
    assert!(bake_to_vec(&both, b"", &"x".repeat(MAX_BAKED_CMDLINE)).is_ok());
    assert!(matches!(
        bake_to_vec(&k, b"", "a\0b"),
        Err(BakeError::Cmdline { .. })
    ));
    let no_pvh = Kernel::parse(tiny_vmlinux(None)).unwrap();
    let e = bake_to_vec(&no_pvh, b"", "").unwrap_err();
    assert!(e.to_string().contains("CONFIG_PVH"), "{e}");
    assert!(matches!(
        place(&k, 4 << 30, ""),
        Err(BakeError::TooLarge { .. })
    ));
    for (len, data) in [(10, &b"short"[..]), (3, &b"longer"[..])] {
        let e = bake(&k, data, len, "", std::io::sink()).unwrap_err();
        assert!(matches!(e, BakeError::InitramfsLength { .. }), "{e:?}");
    }
}

/// readelf, an independent reader, sees the new segment and the patched note.
#[test]
fn readelf_agrees() {
    let k = kernel();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baked.elf");
    std::fs::write(&path, bake_to_vec(&k, &[1; 5000], "quiet").unwrap()).unwrap();
    let out = std::process::Command::new("readelf")
        .args(["-lnW"])
        .arg(&path)
        .output()
        .expect("readelf runs (Debian's binutils; scripts/install-vm.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("LOAD           0x")
            && text.contains("0xffffffff81800000 0x0000000001800000 0x002388 0x002388 RWE 0x1000"),
        "{text}"
    );
    assert!(text.contains("00 00 80 01 00 00 00 00"), "{text}");
}

/// The installed Debian kernel: where the segment goes and whether its table had room. It
/// needs the cloud kernel that `scripts/install-vm.sh` installs, as the VM tests do.
#[cfg(feature = "vm-tests")]
#[test]
fn bakes_the_installed_kernel() {
    let path = crate::kernel::newest_installed(
        std::path::Path::new("/boot"),
        std::path::Path::new("/lib/modules"),
    )
    .expect("a kernel with modules in /boot (scripts/install-vm.sh installs one)");
    let k = Kernel::load(&path).unwrap();
    let entry = k
        .pvh_entry()
        .unwrap_or_else(|e| panic!("{} has no PVH entry: {e}", path.display()));
    let layout = place(&k, 1 << 20, "console=ttyS0").unwrap();
    eprintln!("{}: PVH entry {entry:#x}, {layout:#x?}", path.display());
    assert_eq!(layout.segment_paddr % SEGMENT_ALIGN, 0);
    assert!(layout.segment_paddr >= layout.kernel_end);
    let mut out = Vec::new();
    bake(
        &k,
        std::io::repeat(0).take(1 << 20),
        1 << 20,
        "console=ttyS0",
        &mut out,
    )
    .unwrap();
    assert_eq!(pvh_note(&out), layout.stub_paddr);
    if let Some(vaddr) = layout.pv_stub_vaddr {
        assert_eq!(xen_note(&out, XEN_ELFNOTE_ENTRY), vaddr);
        assert_eq!(vaddr, layout.segment_vaddr + PV_STUB_OFFSET);
    }
    assert_eq!(out.len() as u64, layout.file_len);
}

mod vm;

/// Damaged kernels give errors, never panics, from reading through planning and writing.
#[test]
fn damaged_kernels_never_panic() {
    for good in [
        tiny_vmlinux(Some(ENTRY)),
        tiny_vmlinux_with(Some(ENTRY), Some(PV_ENTRY)),
    ] {
        damaged_kernel_never_panics(good);
    }
}

fn damaged_kernel_never_panics(good: Vec<u8>) {
    let mut inputs = Vec::new();
    for cut in (0..0x1200).step_by(7) {
        inputs.push(good[..cut].to_vec());
    }
    for at in 0..0x140 {
        for bits in [0x01, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[at] ^= bits;
            inputs.push(bad);
        }
    }
    let note = Elf::parse(&good).unwrap().phdrs.last().unwrap().offset as usize;
    for at in note..note + 64 {
        let mut bad = good.clone();
        bad[at] ^= 0xff;
        inputs.push(bad);
    }
    for input in inputs {
        if let Ok(k) = Kernel::parse(input) {
            let _ = bake(&k, &b"x"[..], 1, "quiet", std::io::sink());
        }
    }
}

#[test]
fn a_root_image_in_place_is_kept_out_of_the_module_and_named_on_the_command_line() {
    let k = kernel();
    // An archive of 5000 bytes, zeros to the page, then two pages of image.
    let mut blob: Vec<u8> = (0..5000u32).map(|i| (i * 3) as u8).collect();
    blob.resize(0x1000 * 2, 0);
    blob.extend((0..0x2000u32).map(|i| (i % 251) as u8));
    let span = RootSpan {
        initrd_len: 5000,
        offset: 0x2000,
        len: 0x2000,
    };
    let cmdline = "console=ttyS0 rdinit=/init";
    let mut out = Vec::new();
    let layout = bake_in_place(&k, &blob[..], blob.len() as u64, span, cmdline, &mut out).unwrap();

    assert_eq!(layout.initramfs_len, blob.len() as u64);
    assert_eq!(layout.initrd_len, 5000);
    let image = layout.initramfs_paddr + 0x2000;
    assert_eq!(layout.root_image, Some((image, 0x2000)));
    assert_eq!(image % 0x1000, 0);
    let params = format!("memmap=0x2000${image:#x} phram.phram=oci2uk-root,{image:#x},0x2000");
    assert_eq!(layout.cmdline, format!("{cmdline} {params}"));
    assert_eq!(find_root_params(&layout.cmdline), Some((image, 0x2000)));

    // The module is the archive alone; the baked line holds the parameters; the image's bytes
    // are in the file at its address.
    let seg = Elf::parse(&out).unwrap().phdrs.last().cloned().unwrap();
    let at = |paddr: u64| (seg.offset + paddr - seg.paddr) as usize;
    let modlist = at(layout.modlist_paddr);
    assert_eq!(u64_at(&out, modlist), Some(layout.initramfs_paddr));
    assert_eq!(u64_at(&out, modlist + 8), Some(5000));
    let line = &out[at(layout.cmdline_paddr)..][..layout.cmdline.len() + 1];
    assert_eq!(&line[..line.len() - 1], layout.cmdline.as_bytes());
    assert_eq!(line[line.len() - 1], 0);
    assert_eq!(&out[at(image)..][..0x2000], &blob[0x2000..]);
    assert_eq!(seg.filesz, 0x1000 + blob.len() as u64);
}

#[test]
fn a_span_that_does_not_fit_the_blob_is_refused() {
    let k = kernel();
    let blob = vec![1u8; 0x3000];
    let cases = [
        (0x1000, 0x1000, 0x1000), // ends before the blob does
        (0x1800, 0x1000, 0x2000), // the archive runs into the image
        (0x800, 0x800, 0x2800),   // the image is not page-aligned
        (0, 0x1000, 0x2000),      // no archive
    ];
    for (initrd_len, offset, len) in cases {
        let span = RootSpan {
            initrd_len,
            offset,
            len,
        };
        let err = bake_in_place(&k, &blob[..], 0x3000, span, "x", io::sink()).unwrap_err();
        assert!(matches!(err, BakeError::RootSpan { .. }), "{span:?}: {err}");
    }
}

#[test]
fn root_params_are_found_on_a_merged_line() {
    assert_eq!(find_root_params("console=ttyS0 quiet"), None);
    let line = format!(
        "a {} b phram.phram=other,0x1,0x2",
        root_params(0x20_0000, 0x3000)
    );
    assert_eq!(find_root_params(&line), Some((0x20_0000, 0x3000)));
    assert_eq!(find_root_params("phram.phram=oci2uk-root,12,0x1000"), None);
}
