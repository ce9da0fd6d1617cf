use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};

use super::codec::{LZ4_LEGACY_BLOCK, LZ4_LEGACY_MAGIC};
use super::*;
use crate::flatten::testutil::Fixture;
use crate::kernel::KernelConfig;

/// One entry read back from a newc archive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    name: String,
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// Reads a newc archive strictly: magic, alignment, zero device and check fields, nothing
/// after the trailer but padding to 4 bytes.
fn parse(bytes: &[u8]) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        assert_eq!(pos % 4, 0, "entry at {pos} is not aligned");
        let h = &bytes[pos..pos + 110];
        assert_eq!(&h[..6], b"070701", "magic at {pos}");
        let field = |i: usize| {
            let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
            assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "{s:?}");
            u32::from_str_radix(s, 16).unwrap()
        };
        let (filesize, namesize) = (field(6) as usize, field(11) as usize);
        assert_eq!((field(7), field(8), field(12)), (0, 0, 0));
        let name_start = pos + 110;
        let name = &bytes[name_start..name_start + namesize];
        assert_eq!(name.last(), Some(&0), "name is NUL-terminated");
        let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
        let data_start = (name_start + namesize).next_multiple_of(4);
        assert!(bytes[name_start + namesize..data_start]
            .iter()
            .all(|b| *b == 0));
        let data = bytes[data_start..data_start + filesize].to_vec();
        let next = (data_start + filesize).next_multiple_of(4);
        assert!(bytes[data_start + filesize..next].iter().all(|b| *b == 0));
        pos = next;
        if name == "TRAILER!!!" {
            assert_eq!(filesize, 0);
            assert_eq!(pos, bytes.len(), "nothing follows the trailer");
            return out;
        }
        out.push(Rec {
            name,
            ino: field(0),
            mode: field(1),
            uid: field(2),
            gid: field(3),
            nlink: field(4),
            mtime: field(5),
            rdev: (field(9), field(10)),
            data,
        });
    }
}

fn long_name() -> String {
    format!("{}/{}", "d".repeat(120), "f".repeat(120))
}

/// A tree with every kind of entry, a hardlink group of three, and what extras interact with:
/// an image `/.oci2uk` and an image `/rumpconfig.json`.
fn sample(fx: &mut Fixture) -> Tree {
    let l1 = fx.layer(|t| {
        t.dir("etc")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .custom(
                b'0',
                "z/data",
                "",
                b"zzz",
                &[("SCHILY.xattr.security.capability", b"\x01")],
                |h| {
                    h.set_mode(0o4750);
                    h.set_uid(1000);
                    h.set_gid(50);
                    h.set_mtime(2_000_000_000);
                },
            )
            .hardlink("a/link", "z/data")
            .hardlink("m/link2", "z/data")
            .symlink("sym", &"t".repeat(200))
            .custom(b'3', "dev/tty", "", b"", &[], |h| {
                h.set_device_major(5).unwrap();
                h.set_device_minor(1).unwrap();
                h.set_mode(0o620);
            })
            .custom(b'6', "run/fifo", "", b"", &[], |h| h.set_mode(0o600))
            .file(&long_name(), b"long")
            .file("empty", b"")
            .file(".oci2uk/planted.ko", b"evil")
            .file(".oci2uk-not-private", b"kept")
            .file("rumpconfig.json", b"{\"image\": true}");
    });
    fx.flatten(&[l1]).unwrap()
}

fn extras() -> Vec<Extra> {
    vec![
        Extra::init(b"\x7fELF init".to_vec()),
        Extra::config(b"{\"rc\": []}".to_vec()),
        Extra::module("virtio_net", b"\x7fELF module".to_vec()),
    ]
}

fn opts(codec: Codec) -> RootfsOptions {
    RootfsOptions {
        codec,
        ..RootfsOptions::default()
    }
}

fn write(tree: &Tree, extras: &[Extra], o: &RootfsOptions) -> (Vec<u8>, RootfsStats) {
    let mut out = Vec::new();
    let stats = write_initramfs(tree, extras, o, &mut out).unwrap();
    assert_eq!(stats.compressed_size, out.len() as u64);
    (out, stats)
}

fn r_mode(recs: &[Rec], name: &str) -> (u32, usize) {
    let r = recs.iter().find(|r| r.name == name).unwrap();
    (r.mode, r.data.len())
}

fn by_name(recs: &[Rec]) -> BTreeMap<&str, &Rec> {
    recs.iter().map(|r| (r.name.as_str(), r)).collect()
}

#[test]
fn archive_layout_hardlinks_and_extras() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let (bytes, stats) = write(&tree, &extras(), &opts(Codec::None));
    let recs = parse(&bytes);
    let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
    let long = long_name();
    assert_eq!(
        names,
        [
            ".oci2uk",
            ".oci2uk-not-private",
            ".oci2uk/init",
            ".oci2uk/modules",
            ".oci2uk/modules/virtio_net.ko",
            "a",
            "a/link",
            &"d".repeat(120),
            &long,
            "dev",
            "dev/tty",
            "empty",
            "etc",
            "etc/passwd",
            "m",
            "m/link2",
            "rumpconfig.json",
            "run",
            "run/fifo",
            "sym",
            "z",
            "z/data",
            ".oci2uk/unpacked",
        ]
    );
    // The marker comes last, after everything the tree has.
    assert_eq!(r_mode(&recs, ".oci2uk/unpacked"), (0o100444, 0));
    let r = by_name(&recs);

    // Implied directories of the extras: 0755 root, mtime 0; the image's /.oci2uk is gone.
    for d in [".oci2uk", ".oci2uk/modules"] {
        assert_eq!(
            (r[d].mode, r[d].uid, r[d].gid, r[d].nlink),
            (0o40755, 0, 0, 2)
        );
        assert_eq!(r[d].mtime, 0);
    }
    assert_eq!(r[".oci2uk/init"].mode, 0o100755);
    assert_eq!(r[".oci2uk/init"].data, b"\x7fELF init");
    assert_eq!(r[".oci2uk/modules/virtio_net.ko"].mode, 0o100644);
    assert_eq!(r[".oci2uk-not-private"].data, b"kept");
    // The extra replaces the image's file.
    assert_eq!(r["rumpconfig.json"].data, b"{\"rc\": []}");
    assert_eq!(r["rumpconfig.json"].mode, 0o100644);

    // The hardlink group: one inode number, nlink 3, data on the last entry only.
    let group = ["a/link", "m/link2", "z/data"];
    for n in group {
        let e = r[n];
        assert_eq!((e.ino, e.nlink), (r["a/link"].ino, 3), "{n}");
        assert_eq!(
            (e.mode, e.uid, e.gid, e.mtime),
            (0o104750, 1000, 50, 2_000_000_000)
        );
    }
    assert!(r["a/link"].data.is_empty() && r["m/link2"].data.is_empty());
    assert_eq!(r["z/data"].data, b"zzz");

    // Inode numbers: one per inode, from 1, in order of first appearance.
    let mut seen = Vec::new();
    for rec in &recs {
        if !seen.contains(&rec.ino) {
            seen.push(rec.ino);
        }
    }
    assert_eq!(seen, (1..=seen.len() as u32).collect::<Vec<_>>());
    assert_eq!(seen.len(), recs.len() - 2);
    assert_eq!(recs.last().unwrap().ino, seen.len() as u32);

    assert_eq!(r["sym"].mode & 0o170000, 0o120000);
    assert_eq!(r["sym"].data, "t".repeat(200).as_bytes());
    assert_eq!((r["dev/tty"].mode, r["dev/tty"].rdev), (0o020620, (5, 1)));
    assert_eq!(r["run/fifo"].mode, 0o010600);
    assert_eq!(r[long.as_str()].data, b"long");
    assert_eq!(r["etc"].nlink, 2);
    assert_eq!(r["etc/passwd"].mtime, 1_600_000_000);

    assert_eq!(stats.entries, recs.len() as u64);
    assert_eq!(stats.cpio_size, bytes.len() as u64);
    // init, config, module, kept, long, empty, passwd, the group once, the marker.
    assert_eq!(stats.files, 9);
    assert_eq!(
        stats.content_size,
        [9, 10, 11, 4, 4, 0, 26, 3].iter().sum::<u64>()
    );
    assert_eq!(stats.dropped_xattrs, 1);
    // 7 non-empty files and a symlink take a page each; 1 KiB per entry.
    assert_eq!(stats.unpacked_size, 8 * 4096 + 1024 * recs.len() as u64);
}

#[test]
fn an_extra_over_a_hardlink_shrinks_the_group() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("a", b"data").hardlink("b", "a").hardlink("c", "a");
    });
    let tree = fx.flatten(&[l]).unwrap();
    let (bytes, stats) = write(
        &tree,
        &[Extra::file("/c", b"mine".to_vec(), 0o600)],
        &opts(Codec::None),
    );
    let recs = parse(&bytes);
    let r = by_name(&recs);
    assert_eq!((r["a"].nlink, r["b"].nlink, r["a"].ino), (2, 2, r["b"].ino));
    assert!(r["a"].data.is_empty());
    assert_eq!(r["b"].data, b"data");
    assert_eq!((r["c"].nlink, r["c"].data.as_slice()), (1, &b"mine"[..]));
    assert_ne!(r["c"].ino, r["a"].ino);
    assert_eq!(stats.files, 2);
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

#[test]
fn gnu_cpio_lists_and_extracts_it() {
    assert!(
        have("cpio"),
        "cpio is not installed (scripts/install-vm.sh installs it)"
    );
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let (bytes, _) = write(&tree, &extras(), &opts(Codec::None));
    let archive = fx.dir.path().join("initramfs.cpio");
    std::fs::write(&archive, &bytes).unwrap();

    let out = Command::new("cpio")
        .args(["-itv", "--quiet", "--numeric-uid-gid", "-F"])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), parse(&bytes).len(), "{listing}");
    // mode, nlink, uid, gid of the line ending with `suffix`.
    let fields = |suffix: &str| {
        let line = lines
            .iter()
            .find(|l| l.ends_with(suffix))
            .unwrap_or_else(|| panic!("no line ending {suffix:?} in\n{listing}"));
        line.split_whitespace()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(fields(" z/data"), "-rwsr-x--- 3 1000 50");
    assert_eq!(fields(" a/link"), "-rwsr-x--- 3 1000 50");
    assert_eq!(fields(" .oci2uk/init"), "-rwxr-xr-x 1 0 0");
    assert_eq!(fields(" .oci2uk"), "drwxr-xr-x 2 0 0");
    assert_eq!(fields(" dev/tty"), "crw--w---- 1 0 0");
    assert_eq!(
        fields(&format!(" sym -> {}", "t".repeat(200))),
        "lrwxrwxrwx 1 0 0"
    );
    assert_eq!(fields(" run/fifo"), "prw------- 1 0 0");

    if !is_root() {
        eprintln!("not root: the extraction (owners, devices) is skipped");
        return;
    }
    let dest = fx.dir.path().join("root");
    std::fs::create_dir(&dest).unwrap();
    let out = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames", "-F"])
        .arg(&archive)
        .current_dir(&dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_extracted(&dest, &parse(&bytes));
}

/// Compares an extracted tree with the archive's entries: types, modes, owners, mtimes,
/// contents, link targets, device numbers, and hardlinks sharing one inode.
fn check_extracted(dest: &Path, recs: &[Rec]) {
    let mut inodes: HashMap<u32, u64> = HashMap::new();
    let data: HashMap<u32, &[u8]> = recs
        .iter()
        .filter(|r| !r.data.is_empty())
        .map(|r| (r.ino, r.data.as_slice()))
        .collect();
    for r in recs {
        let p = dest.join(&r.name);
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", r.name));
        assert_eq!(m.mode(), r.mode, "{}", r.name);
        assert_eq!((m.uid(), m.gid()), (r.uid, r.gid), "{}", r.name);
        let ft = m.file_type();
        if ft.is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            assert_eq!(t.as_os_str().as_encoded_bytes(), &r.data[..], "{}", r.name);
            continue;
        }
        if !ft.is_dir() {
            assert_eq!(m.mtime(), i64::from(r.mtime), "{}", r.name);
        }
        if ft.is_file() {
            let want = data.get(&r.ino).copied().unwrap_or(&[]);
            assert_eq!(std::fs::read(&p).unwrap(), want, "{}", r.name);
            assert_eq!(m.nlink(), u64::from(r.nlink), "{}", r.name);
            let ino = *inodes.entry(r.ino).or_insert(m.ino());
            assert_eq!(ino, m.ino(), "{} is not linked to its group", r.name);
        }
        if ft.is_char_device() {
            let rdev = m.rdev();
            let (major, minor) = (((rdev >> 8) & 0xfff) as u32, (rdev & 0xff) as u32);
            assert_eq!((major, minor), r.rdev, "{}", r.name);
        }
        if ft.is_fifo() {
            assert_eq!(r.mode & 0o170000, 0o010000);
        }
    }
}

/// Decompresses with the Rust decoders (independent of the encoders' crates where one
/// exists: LZ4's legacy frame is read here by hand).
fn decompress(codec: Codec, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match codec {
        Codec::None => out = data.to_vec(),
        Codec::Gzip => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        Codec::Zstd => out = zstd::decode_all(data).unwrap(),
        Codec::Xz => {
            lzma_rust2::XzReader::new(data, false)
                .read_to_end(&mut out)
                .unwrap();
        }
        Codec::Lz4 => {
            assert_eq!(data[..4], LZ4_LEGACY_MAGIC.to_le_bytes());
            let mut pos = 4;
            while pos < data.len() {
                let n = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
                pos += 4;
                let block =
                    lz4_flex::block::decompress(&data[pos..pos + n], LZ4_LEGACY_BLOCK).unwrap();
                assert!(block.len() <= LZ4_LEGACY_BLOCK);
                out.extend_from_slice(&block);
                pos += n;
            }
            assert_eq!(pos, data.len(), "the last block ends the input");
        }
    }
    out
}

/// The system tool that decompresses `codec`, if installed.
fn system_decompress(codec: Codec, data: &[u8], dir: &Path) -> Option<Vec<u8>> {
    let tool = match codec {
        Codec::None => return None,
        Codec::Gzip => "gzip",
        Codec::Zstd => "zstd",
        Codec::Xz => "xz",
        Codec::Lz4 => "lz4",
    };
    assert!(
        have(tool),
        "{tool} is not installed (scripts/install-vm.sh installs it)"
    );
    let input = dir.join(format!("initramfs.{tool}"));
    std::fs::write(&input, data).unwrap();
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(out.stdout)
}

#[test]
fn every_codec_round_trips_in_the_format_linux_reads() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let (plain, plain_stats) = write(&tree, &extras(), &opts(Codec::None));
    for codec in [Codec::Gzip, Codec::Zstd, Codec::Xz, Codec::Lz4] {
        let (bytes, stats) = write(&tree, &extras(), &opts(codec));
        assert_eq!(decompress(codec, &bytes), plain, "{codec}");
        if let Some(out) = system_decompress(codec, &bytes, fx.dir.path()) {
            assert_eq!(out, plain, "{codec} through the system tool");
        }
        assert_eq!(
            (stats.cpio_size, stats.codec),
            (plain_stats.cpio_size, codec)
        );
        // The magic numbers `decompress_method` (lib/decompress.c) detects.
        let magic: &[u8] = match codec {
            Codec::Gzip => b"\x1f\x8b",
            Codec::Zstd => b"\x28\xb5\x2f\xfd",
            Codec::Xz => b"\xfd7zXZ\x00",
            Codec::Lz4 => b"\x02\x21\x4c\x18",
            Codec::None => b"070701",
        };
        assert!(bytes.starts_with(magic), "{codec}");
        match codec {
            // Stream flags: check type 1 is CRC32, the only one the kernel's decoder has.
            Codec::Xz => assert_eq!(bytes[6..8], [0, 1]),
            Codec::Zstd => {
                let descriptor = bytes[4];
                assert_ne!(descriptor & 0x04, 0, "content checksum");
                assert_eq!(descriptor & 0x20, 0, "a window descriptor follows");
                let wd = bytes[5];
                let base = 1u64 << (10 + (wd >> 3));
                let window = base + base / 8 * u64::from(wd & 7);
                assert!(window <= 8 << 20, "window {window}");
            }
            _ => {}
        }
    }
}

/// Pseudo-random bytes that compress a little.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                b'a'
            } else {
                x as u8
            }
        })
        .collect()
}

#[test]
fn lz4_cuts_blocks_of_eight_mib() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("small", b"s");
    });
    let tree = fx.flatten(&[l]).unwrap();
    let big = vec![Extra::file(
        "/big",
        noise(LZ4_LEGACY_BLOCK + 100_000),
        0o644,
    )];
    let (plain, _) = write(&tree, &big, &opts(Codec::None));
    let (bytes, _) = write(&tree, &big, &opts(Codec::Lz4));
    assert_eq!(decompress(Codec::Lz4, &bytes), plain);
    // Two blocks: the first decodes to exactly 8 MiB.
    let first = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
    let block = lz4_flex::block::decompress(&bytes[8..8 + first], LZ4_LEGACY_BLOCK).unwrap();
    assert_eq!(block.len(), LZ4_LEGACY_BLOCK);
    if let Some(out) = system_decompress(Codec::Lz4, &bytes, fx.dir.path()) {
        assert_eq!(out, plain);
    }
}

#[test]
fn deterministic_and_clamped() {
    let mut fx = Fixture::new();
    let a = write(&sample(&mut fx), &extras(), &opts(Codec::Zstd)).0;
    let b = write(&sample(&mut fx), &extras(), &opts(Codec::Zstd)).0;
    assert_eq!(a, b);
    let tree = sample(&mut fx);
    let gz = |t: &Tree| write(t, &extras(), &opts(Codec::Gzip)).0;
    assert_eq!(gz(&tree), gz(&tree));

    let o = RootfsOptions {
        codec: Codec::None,
        level: None,
        source_date_epoch: Some(1_700_000_000),
    };
    let recs = parse(&write(&tree, &extras(), &o).0);
    let r = by_name(&recs);
    assert_eq!(r["z/data"].mtime, 1_700_000_000);
    assert_eq!(r["etc/passwd"].mtime, 1_600_000_000);
    // Extras and their implied parents take the epoch.
    assert_eq!(r[".oci2uk/init"].mtime, 1_700_000_000);
    assert_eq!(r[".oci2uk"].mtime, 1_700_000_000);
}

#[test]
fn levels_change_the_bytes_and_are_checked() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let at = |level| {
        let o = RootfsOptions {
            codec: Codec::Zstd,
            level: Some(level),
            source_date_epoch: None,
        };
        let mut out = Vec::new();
        write_initramfs(&tree, &[], &o, &mut out).map(|_| out)
    };
    assert_eq!(
        decompress(Codec::Zstd, &at(19).unwrap()),
        decompress(Codec::Zstd, &at(1).unwrap())
    );
    let e = at(20).unwrap_err();
    assert!(matches!(e, RootfsError::Level { level: 20, .. }), "{e}");
    assert_eq!(e.to_string(), "zstd has no level 20 (levels 1 to 19)");
}

fn err(tree: &Tree, extras: &[Extra]) -> RootfsError {
    write_initramfs(tree, extras, &opts(Codec::None), std::io::sink()).unwrap_err()
}

#[test]
fn extras_never_silently_replace_the_image() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.symlink("lib", "usr/lib")
            .dir("usr/lib")
            .file("rumpconfig.json/inside", b"x")
            .file("opt", b"file")
            .symlink(".oci2uk", "/etc");
    });
    let tree = fx.flatten(&[l]).unwrap();

    let e = err(&tree, &[Extra::file("/lib/modules/x.ko", vec![], 0o644)]);
    assert_eq!(
        e.to_string(),
        "the image has a symlink at /lib, where oci2uk needs a directory (for /lib/modules/x.ko)"
    );
    let e = err(&tree, &[Extra::config(vec![])]);
    assert_eq!(
        e.to_string(),
        "the image has a directory at /rumpconfig.json, where oci2uk needs a file (for \
         /rumpconfig.json)"
    );
    let e = err(&tree, &[Extra::dir("/opt", 0o755)]);
    assert!(
        matches!(&e, RootfsError::Conflict { path, found: "file", needed: "directory", .. } if path == "opt"),
        "{e}"
    );
    // A directory over a directory keeps what it holds and takes the extra's metadata.
    let (bytes, _) = write(&tree, &[Extra::dir("/usr", 0o700)], &opts(Codec::None));
    let recs = parse(&bytes);
    let r = by_name(&recs);
    assert_eq!(r["usr"].mode, 0o40700);
    assert!(r.contains_key("usr/lib"));

    // The image's /.oci2uk (here a symlink out of it) is replaced by oci2uk's directory.
    let (bytes, _) = write(&tree, &[Extra::init(vec![1])], &opts(Codec::None));
    let recs = parse(&bytes);
    let r = by_name(&recs);
    assert_eq!(r[".oci2uk"].mode, 0o40755);
    assert_eq!(r[".oci2uk/init"].data, [1]);
}

#[test]
fn bad_extra_paths_are_errors() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("f", b"");
    });
    let tree = fx.flatten(&[l]).unwrap();
    for (path, why) in [
        ("relative", "the path is not absolute"),
        ("/", "the path is the root"),
        ("/a/../b", "the path is not normalised"),
        ("/a//b", "the path is not normalised"),
        ("/a/./b", "the path is not normalised"),
    ] {
        let e = err(&tree, &[Extra::file(path, vec![], 0o644)]);
        assert!(
            matches!(&e, RootfsError::ExtraPath { why: w, .. } if *w == why),
            "{path}: {e}"
        );
    }
    let e = err(&tree, &[Extra::file(UNPACKED_PATH, vec![], 0o644)]);
    assert!(e.to_string().contains("oci2uk's own marker"), "{e}");
    let e = err(&tree, &[Extra::init(vec![]), Extra::init(vec![])]);
    assert!(
        e.to_string().contains("another extra has the same path"),
        "{e}"
    );
    let e = err(
        &tree,
        &[
            Extra::file("/x", vec![], 0o644),
            Extra::file("/x/y", vec![], 0o644),
        ],
    );
    assert!(
        e.to_string().contains("a parent of it a non-directory"),
        "{e}"
    );
    assert!(matches!(
        err(&tree, &[Extra::module("../../etc/shadow", vec![])]),
        RootfsError::ExtraPath { .. }
    ));
    // Explicit directory extras are parents like implied ones.
    let (bytes, _) = write(
        &tree,
        &[Extra::dir("/x", 0o700), Extra::file("/x/y", vec![], 0o600)],
        &opts(Codec::None),
    );
    let names: Vec<String> = parse(&bytes).into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["f", "x", "x/y"]);
}

#[test]
fn limits_of_the_format_are_clear_errors() {
    let mut fx = Fixture::new();
    let deep: String = (0..20)
        .map(|i| format!("{i:0>250}"))
        .collect::<Vec<_>>()
        .join("/");
    let l = fx.layer(|t| {
        t.file(&deep, b"x");
    });
    let tree = fx.flatten(&[l]).unwrap();
    let e = err(&tree, &[]);
    assert!(
        matches!(e, RootfsError::NameTooLong { len, .. } if len > 4095),
        "{e}"
    );

    let l = fx.layer(|t| {
        t.symlink("s", &"t".repeat(4096));
    });
    let tree = fx.flatten(&[l]).unwrap();
    assert!(matches!(
        err(&tree, &[]),
        RootfsError::SymlinkTooLong { len: 4096, .. }
    ));
    let empty = fx.flatten(&[]).unwrap();
    write(
        &empty,
        &[Extra::symlink("/s", "t".repeat(4095))],
        &opts(Codec::None),
    );
    assert!(matches!(
        err(&empty, &[Extra::symlink("/s", "t".repeat(4096))]),
        RootfsError::SymlinkTooLong { len: 4096, .. }
    ));

    let l = fx.layer(|t| {
        t.custom(b'0', "big-uid", "", b"", &[("uid", b"5000000000")], |_| {});
    });
    let tree = fx.flatten(&[l]).unwrap();
    assert_eq!(
        err(&tree, &[]).to_string(),
        "/big-uid is owned by 5000000000:0; an initramfs holds ids up to 4294967295"
    );
    assert!(matches!(
        file_size(b"f", 1 << 32),
        Err(RootfsError::FileTooLarge { size, .. }) if size == 1 << 32
    ));
    assert_eq!(file_size(b"f", u32::MAX as u64).unwrap(), u32::MAX);
}

#[test]
fn an_empty_tree_is_a_trailer() {
    let fx = Fixture::new();
    let tree = fx.flatten(&[]).unwrap();
    let (bytes, stats) = write(&tree, &[], &opts(Codec::None));
    assert!(parse(&bytes).is_empty());
    assert_eq!((stats.entries, stats.cpio_size), (0, 124));
}

fn stats(unpacked_mib: u64, compressed_mib: u64) -> RootfsStats {
    RootfsStats {
        codec: Codec::Zstd,
        entries: 0,
        files: 0,
        content_size: 0,
        cpio_size: 0,
        compressed_size: compressed_mib << 20,
        unpacked_size: unpacked_mib << 20,
        dropped_xattrs: 0,
        root_image: None,
        in_place: None,
    }
}

#[test]
fn memory_needed_follows_the_formula() {
    // The nginx figures of issue 3: a 131 MiB tree (about 140 MiB in pages) unpacks on ramfs
    // at 256 MiB; on tmpfs it needs 320.
    let nginx = stats(140, 45);
    assert_eq!(memory_needed(&nginx, RootfsType::Ramfs), 288);
    assert_eq!(memory_needed(&nginx, RootfsType::Tmpfs), 320);
    // Tiny images: the kernel and the application's share.
    assert_eq!(memory_needed(&stats(1, 1), RootfsType::Ramfs), 160);
    assert_eq!(memory_needed(&stats(0, 0), RootfsType::Tmpfs), 160);
    // The nginx fixture: 98 MiB unpacked, 30 MiB zstd (unpacks at 208 MiB on ramfs, 224 on
    // tmpfs), or 85 MiB uncompressed (at 256 on ramfs, not 240).
    assert_eq!(memory_needed(&stats(98, 30), RootfsType::Ramfs), 256);
    assert_eq!(memory_needed(&stats(98, 30), RootfsType::Tmpfs), 256);
    assert_eq!(memory_needed(&stats(98, 85), RootfsType::Ramfs), 288);
    // A big compressed image weighs while it is unpacked.
    assert_eq!(memory_needed(&stats(100, 90), RootfsType::Ramfs), 288);
    let m = memory_needed(&stats(1000, 300), RootfsType::Tmpfs);
    assert_eq!((m % 32, m), (0, 2048));
}

#[test]
fn rootfs_type_from_the_command_line() {
    use RootfsType::*;
    for (cmdline, want) in [
        (
            "console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet",
            Ramfs,
        ),
        ("console=ttyS0", Tmpfs),
        ("rootfstype=ramfs rootfstype=tmpfs", Tmpfs),
        ("rootfstype=tmpfs rootfstype=ramfs", Ramfs),
        ("root=/dev/vda", Ramfs),
        ("", Tmpfs),
    ] {
        assert_eq!(RootfsType::from_cmdline(cmdline), want, "{cmdline}");
    }
}

#[test]
fn the_codec_for_a_kernel() {
    assert_eq!(Codec::best_of(&[Codec::Gzip, Codec::Zstd]), Codec::Zstd);
    assert_eq!(Codec::best_of(&[Codec::Xz, Codec::Lz4]), Codec::Lz4);
    assert_eq!(Codec::best_of(&[Codec::Xz]), Codec::Xz);
    assert_eq!(Codec::best_of(&[]), Codec::None);
    let config = |text: &str| KernelConfig::parse(text, "test");
    let debian = config(
        "CONFIG_RD_GZIP=y\nCONFIG_RD_BZIP2=y\nCONFIG_RD_LZMA=y\nCONFIG_RD_XZ=y\n\
         CONFIG_RD_LZO=y\nCONFIG_RD_LZ4=y\nCONFIG_RD_ZSTD=y\n",
    );
    assert_eq!(Codec::for_kernel(Some(&debian)), Codec::Zstd);
    assert_eq!(
        Codec::for_kernel(Some(&config("CONFIG_RD_GZIP=y\nCONFIG_RD_XZ=y\n"))),
        Codec::Gzip
    );
    assert_eq!(
        Codec::for_kernel(Some(&config("CONFIG_RD_LZO=y\nCONFIG_RD_BZIP2=y\n"))),
        Codec::None
    );
    assert_eq!(Codec::for_kernel(None), Codec::Gzip);
    for c in [Codec::None, Codec::Gzip, Codec::Zstd, Codec::Xz, Codec::Lz4] {
        assert_eq!(c.to_string().parse::<Codec>(), Ok(c));
        assert!(c.levels().contains(&c.default_level()));
    }
    assert_eq!(
        "bzip2".parse::<Codec>().unwrap_err().to_string(),
        "unknown initramfs compression \"bzip2\" (expected none, gzip, zstd, xz or lz4)"
    );
}

/// Boots `kernel` with `initrd` and the command line `append` on q35 under QEMU's software
/// emulation, as the launch model renders it, killed after `timeout_s` seconds.
fn tcg_boot(
    kernel: &Path,
    initrd: &Path,
    memory_mib: u64,
    append: &str,
    timeout_s: u32,
) -> Command {
    use crate::launch::qemu::{self, Accel, Machine, Qemu};
    let mut model = Qemu::new(kernel.display().to_string(), memory_mib);
    model.initrd = Some(initrd.display().to_string());
    model.append = Some(append.to_string());
    let mut cmd = Command::new("timeout");
    cmd.arg(timeout_s.to_string())
        .arg(qemu::BINARY)
        .args(model.args(Machine::Q35, Accel::Tcg))
        .stdin(Stdio::null());
    cmd
}

/// The init of the boot test: checks from inside the guest that the hardlink group shares one
/// inode with its data (busybox itself runs through a link whose entry had no data), that
/// owners, modes and symlinks came through, and powers off.
#[cfg(feature = "vm-tests")]
const BOOT_INIT: &str = "#!/bin/busybox sh\n\
b=/bin/busybox\n\
$b mount -t proc proc /proc\n\
set -- $($b stat -c %i /bin/busybox /bin/ls /bin/sh)\n\
[ \"$1\" = \"$2\" ] && [ \"$2\" = \"$3\" ] && links=$($b stat -c %h /bin/sh)\n\
if [ -e /.oci2uk/unpacked ]; then u=yes; else u=no; fi\n\
echo \"OCI2UK-ROOTFS links=$links data=$($b cat /z/data) \
meta=$($b stat -c %a:%u:%g /z/data) sym=$($b readlink /sym) \
conf=$($b cat /rumpconfig.json) root=$($b stat -f -c %T /) \
unpacked=$u\"\n\
$b poweroff -f\n";

/// Boots the kernel (`$OCI2UK_KERNEL`, else the installed one) under QEMU (software emulation)
/// with an initramfs in every codec it reads. Slow, so built only with the `vm-tests` feature.
#[cfg(feature = "vm-tests")]
#[test]
fn the_kernel_unpacks_every_codec() {
    let kernel = crate::kernel::discover(None).expect("a kernel: set OCI2UK_KERNEL");
    let busybox = std::fs::read("/bin/busybox").expect("a static /bin/busybox");
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.dir("proc")
            .custom(b'0', "bin/busybox", "", &busybox, &[], |h| {
                h.set_mode(0o755)
            })
            .hardlink("bin/ls", "bin/busybox")
            .hardlink("bin/sh", "bin/busybox")
            .custom(b'0', "z/data", "", b"zzz", &[], |h| {
                h.set_mode(0o4750);
                h.set_uid(1000);
                h.set_gid(50);
            })
            .symlink("sym", "/z/data");
    });
    let tree = fx.flatten(&[l]).unwrap();
    let extras = [
        Extra::file(INIT_PATH, BOOT_INIT.as_bytes().to_vec(), 0o755),
        Extra::config(b"{}".to_vec()),
    ];
    let want = "OCI2UK-ROOTFS links=3 data=zzz meta=4750:1000:50 sym=/z/data conf={} \
                root=ramfs unpacked=yes";
    let mut failures = Vec::new();
    // Every codec the kernel reads (the oci2uk kernel reads zstd alone), and none.
    let config = crate::kernel::Kernel::load(&kernel.path)
        .unwrap()
        .config()
        .unwrap();
    let enabled: Vec<Codec> = match &config {
        Some(c) => (c.initramfs_compressions().into_iter())
            .filter_map(Codec::from_kernel)
            .collect(),
        None => vec![Codec::Gzip],
    };
    let codecs = [Codec::Zstd, Codec::Gzip, Codec::Xz, Codec::Lz4]
        .into_iter()
        .filter(|c| enabled.contains(c))
        .chain([Codec::None]);
    for codec in codecs {
        let initrd = fx.dir.path().join(format!("initrd.{codec}"));
        let file = std::fs::File::create(&initrd).unwrap();
        let stats = write_initramfs(&tree, &extras, &opts(codec), file).unwrap();
        let start = std::time::Instant::now();
        let out = tcg_boot(
            &kernel.path,
            &initrd,
            memory_needed(&stats, RootfsType::Ramfs),
            "console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet",
            240,
        )
        .output()
        .expect("qemu-system-x86_64 runs");
        let console = String::from_utf8_lossy(&out.stdout);
        eprintln!(
            "{codec}: {} bytes, {} in {:.1}s",
            stats.compressed_size,
            if console.contains(want) {
                "booted"
            } else {
                "FAILED"
            },
            start.elapsed().as_secs_f64()
        );
        if !console.contains(want) {
            failures.push(format!("{codec}: expected {want:?} in:\n{console}"));
        }
    }

    // A tree too big for the tmpfs root (half of 192 MiB): the kernel stops unpacking, the
    // init still starts, and the marker is missing.
    let mut extras = extras.to_vec();
    extras.push(Extra::file("/zz/big", vec![0; 120 << 20], 0o644));
    let initrd = fx.dir.path().join("initrd.big");
    let file = std::fs::File::create(&initrd).unwrap();
    write_initramfs(&tree, &extras, &opts(Codec::Zstd), file).unwrap();
    let out = tcg_boot(
        &kernel.path,
        &initrd,
        192,
        "console=ttyS0 panic=-1 rdinit=/.oci2uk/init quiet",
        240,
    )
    .output()
    .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    let cut_short = console.contains("Initramfs unpacking failed: write error")
        && console.contains("root=tmpfs unpacked=no");
    eprintln!(
        "too big for tmpfs: {}",
        if cut_short {
            "cut short, no marker"
        } else {
            "FAILED"
        }
    );
    if !cut_short {
        failures.push(format!("too big for tmpfs: {console}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Size and time of each codec on a real tree: `OCI2UK_ROOTFS_TAR` names a tar of one (as
/// `oci2uk build IMAGE --format tar` writes it).
#[test]
#[ignore = "a timing run: OCI2UK_ROOTFS_TAR=nginx.tar cargo test --lib rootfs::tests::codec_timings -- --ignored --nocapture"]
fn codec_timings() {
    let Ok(tar) = std::env::var("OCI2UK_ROOTFS_TAR") else {
        eprintln!("set OCI2UK_ROOTFS_TAR to a tar of an image's tree");
        return;
    };
    let mut fx = Fixture::new();
    let data = std::fs::read(tar).unwrap();
    let l = fx.layer_as(&data, crate::image::Compression::None);
    let tree = fx.flatten(&[l]).unwrap();
    let levels: &[(Codec, Option<i32>)] = &[
        (Codec::None, None),
        (Codec::Lz4, None),
        (Codec::Zstd, Some(1)),
        (Codec::Zstd, None),
        (Codec::Zstd, Some(6)),
        (Codec::Zstd, Some(9)),
        (Codec::Gzip, Some(1)),
        (Codec::Gzip, None),
        (Codec::Xz, None),
    ];
    // OCI2UK_ROOTFS_BOOT=1 also boots each with the installed kernel under QEMU's software
    // emulation and prints the guest's uptime when the init starts (the initramfs unpacked),
    // or how the boot failed.
    let boot = std::env::var("OCI2UK_ROOTFS_BOOT").as_deref() == Ok("1");
    let kernel = boot.then(|| crate::kernel::discover(None).expect("a kernel"));
    let extras = match &kernel {
        Some(_) => vec![
            Extra::file(
                "/.oci2uk/busybox",
                std::fs::read("/bin/busybox").expect("a static /bin/busybox"),
                0o755,
            ),
            Extra::file(
                INIT_PATH,
                b"#!/.oci2uk/busybox sh\n/.oci2uk/busybox mount -t proc p /proc\n\
                  echo UPTIME $(/.oci2uk/busybox cat /proc/uptime)\n\
                  [ -e /.oci2uk/unpacked ] || echo CUT SHORT\n\
                  /.oci2uk/busybox poweroff -f\n"
                    .to_vec(),
                0o755,
            ),
        ],
        None => Vec::new(),
    };
    // OCI2UK_ROOTFS_TMPFS=1 boots onto the default tmpfs root, with the memory it needs.
    let (rootfs, append) = match std::env::var("OCI2UK_ROOTFS_TMPFS").as_deref() {
        Ok("1") => (
            RootfsType::Tmpfs,
            "console=ttyS0 panic=-1 rdinit=/.oci2uk/init quiet",
        ),
        _ => (
            RootfsType::Ramfs,
            "console=ttyS0 panic=-1 rootfstype=ramfs rdinit=/.oci2uk/init quiet",
        ),
    };
    // OCI2UK_ROOTFS_MEM=MiB boots with that much memory instead, to probe the formula.
    let mem = std::env::var("OCI2UK_ROOTFS_MEM").ok();
    // OCI2UK_ROOTFS_CODEC=NAME runs one codec only.
    let only = std::env::var("OCI2UK_ROOTFS_CODEC").ok();
    for &(codec, level) in levels {
        if only.as_deref().is_some_and(|o| o != codec.name()) {
            continue;
        }
        let o = RootfsOptions {
            codec,
            level,
            source_date_epoch: None,
        };
        let start = std::time::Instant::now();
        let path = fx.dir.path().join("initrd");
        let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let s = write_initramfs(&tree, &extras, &o, file).unwrap();
        eprintln!(
            "{codec} level {}: {} -> {} bytes in {:.2}s; unpacked {} MiB; needs {} MiB on \
             ramfs, {} on tmpfs",
            level.unwrap_or(codec.default_level()),
            s.cpio_size,
            s.compressed_size,
            start.elapsed().as_secs_f64(),
            s.unpacked_size >> 20,
            memory_needed(&s, RootfsType::Ramfs),
            memory_needed(&s, RootfsType::Tmpfs),
        );
        if let Some(k) = &kernel {
            let memory = match &mem {
                Some(m) => m.parse().expect("OCI2UK_ROOTFS_MEM: MiB"),
                None => memory_needed(&s, rootfs),
            };
            let out = tcg_boot(&k.path, &path, memory, append, 300)
                .output()
                .unwrap();
            let console = String::from_utf8_lossy(&out.stdout);
            let uptime = console
                .lines()
                .find_map(|l| l.split_once("UPTIME ").map(|(_, u)| u.trim()))
                .unwrap_or("(no init output)");
            if !console.contains("UPTIME") {
                eprintln!(
                    "{:?} {}{}",
                    out.status,
                    &console[console.len().saturating_sub(3000)..],
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            eprintln!("    guest uptime at init: {uptime}");
            for l in console
                .lines()
                .filter(|l| l.contains("CUT SHORT") || l.contains("nitramfs"))
            {
                eprintln!("    {}", l.trim());
            }
        }
    }
}

#[test]
fn in_place_puts_the_image_on_a_page_after_the_archive() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let stats = write_in_place(
        &tree,
        &extras(),
        &opts(Codec::None),
        &SquashfsOptions::default(),
        dir.path(),
        &mut out,
    )
    .unwrap();
    let span = stats.in_place.expect("a span");
    assert_eq!(stats.compressed_size, out.len() as u64);
    assert_eq!(span.offset % IN_PLACE_ALIGN, 0);
    assert_eq!(span.len % IN_PLACE_ALIGN, 0);
    assert_eq!(span.offset + span.len, out.len() as u64);
    assert!(span.initrd_len <= span.offset && span.offset - span.initrd_len < IN_PLACE_ALIGN);
    // The archive holds the extras and ends with the marker, and no copy of the image.
    let recs = parse(&out[..span.initrd_len as usize]);
    let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&".oci2uk/init"), "{names:?}");
    assert_eq!(names.last(), Some(&&UNPACKED_PATH[1..]));
    assert!(!names.iter().any(|n| n.contains("root.squashfs")));
    // Zeros to the page, then the SquashFS image, then zeros.
    assert!(out[span.initrd_len as usize..span.offset as usize]
        .iter()
        .all(|&b| b == 0));
    let image = &out[span.offset as usize..];
    assert_eq!(&image[..4], b"hsqs");
    let root = stats.root_image.unwrap();
    assert!(image[root.image_size as usize..].iter().all(|&b| b == 0));
    assert_eq!(span.len, root.image_size.next_multiple_of(IN_PLACE_ALIGN));
}

#[test]
fn memory_needed_in_place_counts_the_image_once() {
    let mut s = stats(1, 1);
    s.in_place = Some(RootSpan {
        initrd_len: 400 << 10,
        offset: 400 << 10,
        len: 29 << 20,
    });
    // 16 (kernel) + 1 (archive) + 29 (image) + 16 (application) = 62, rounded up to 64.
    assert_eq!(memory_needed(&s, RootfsType::Ramfs), 64);
    assert_eq!(memory_needed(&s, RootfsType::Tmpfs), 64);
}
