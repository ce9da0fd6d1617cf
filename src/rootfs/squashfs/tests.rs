use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::Path;
use std::process::Command;

use backhand::{FilesystemReader, InnerNode};

use super::*;
use crate::flatten::testutil::Fixture;
use crate::rootfs::Extra;

/// A tree with every kind of entry, a file of several blocks (with an all-zero block) and
/// hard links to it and to a small file, xattrs, and an image `/.oci2uk`.
fn sample(fx: &mut Fixture) -> Tree {
    let mut big = Vec::new();
    for i in 0..(BLOCK_SIZE as usize * 2 + 1000) {
        big.push((i * 7 % 251) as u8);
    }
    big[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize].fill(0);
    let l1 = fx.layer(|t| {
        t.dir("etc")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .custom(
                b'0',
                "usr/bin/ping",
                "",
                b"ping",
                &[("SCHILY.xattr.security.capability", b"\x01\x02")],
                |h| {
                    h.set_mode(0o4750);
                    h.set_uid(1000);
                    h.set_gid(50);
                    h.set_mtime(2_000_000_000);
                },
            )
            .hardlink("usr/bin/ping6", "usr/bin/ping")
            .file("big", &big)
            .hardlink("big2", "big")
            .custom(b'5', "tmp", "", b"", &[], |h| h.set_mode(0o1777))
            .symlink("sym", &"t".repeat(200))
            .symlink("lib64", "usr/lib")
            .custom(b'3', "dev/tty", "", b"", &[], |h| {
                h.set_device_major(5).unwrap();
                h.set_device_minor(1).unwrap();
                h.set_mode(0o620);
            })
            .custom(b'4', "dev/big", "", b"", &[], |h| {
                h.set_device_major(259).unwrap();
                h.set_device_minor(300).unwrap();
                h.set_mode(0o600);
            })
            .custom(b'6', "run/fifo", "", b"", &[], |h| h.set_mode(0o600))
            .file("empty", b"")
            .file("a-b", b"sorts before a/ bytewise")
            .file("a/b", b"in a directory")
            .file(".oci2uk/planted.ko", b"evil")
            .file(".oci2uk-not-private", b"kept");
    });
    fx.flatten(&[l1]).unwrap()
}

fn write(tree: &Tree, opts: &SquashfsOptions) -> (tempfile::NamedTempFile, SquashfsStats) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let stats = write_squashfs(tree, opts, f.as_file_mut()).unwrap();
    assert_eq!(stats.image_size, f.as_file().metadata().unwrap().len());
    (f, stats)
}

/// What one path is, as comparable facts.
#[derive(Debug, PartialEq, Eq)]
struct Facts {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u32,
}

fn digest(data: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "file {} {}",
        data.len(),
        hex::encode(sha2::Sha256::digest(data))
    )
}

fn content(tree: &Tree, c: &crate::flatten::Content) -> Vec<u8> {
    let mut v = Vec::new();
    tree.open(c).read_to_end(&mut v).unwrap();
    v
}

fn tree_facts(tree: &Tree, clamp: Option<i64>) -> BTreeMap<String, Facts> {
    tree.entries()
        .filter(|e| !is_private(e.path))
        .map(|e| {
            let i = e.inode;
            let kind = match &i.kind {
                Kind::Dir => "dir".to_string(),
                Kind::File(c) => digest(&content(tree, c)),
                Kind::Symlink(t) => format!("symlink {}", lossy(t)),
                Kind::CharDevice { major, minor } => format!("char {major}:{minor}"),
                Kind::BlockDevice { major, minor } => format!("block {major}:{minor}"),
                Kind::Fifo => "fifo".to_string(),
            };
            let mtime = clamp.map_or(i.mtime, |c| i.mtime.min(c));
            let mode = if matches!(i.kind, Kind::Symlink(_)) {
                0o777
            } else {
                i.mode & 0o7777
            };
            (
                format!("/{}", lossy(e.path)),
                Facts {
                    kind,
                    mode,
                    uid: i.uid as u32,
                    gid: i.gid as u32,
                    mtime: mtime as u32,
                },
            )
        })
        .collect()
}

fn decode_dev(dev: u32) -> (u32, u32) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

/// The image read back with backhand's reader.
fn image_facts(image: &Path) -> BTreeMap<String, Facts> {
    let r = BufReader::new(std::fs::File::open(image).unwrap());
    let fs = FilesystemReader::from_reader(r).unwrap();
    let mut out = BTreeMap::new();
    for node in fs.files() {
        let path = node.fullpath.to_string_lossy().into_owned();
        if path == "/" {
            continue;
        }
        let kind = match &node.inner {
            InnerNode::Dir(_) => "dir".to_string(),
            InnerNode::File(f) => {
                let mut v = Vec::new();
                fs.file(f).reader().read_to_end(&mut v).unwrap();
                digest(&v)
            }
            InnerNode::Symlink(s) => format!("symlink {}", s.link.to_string_lossy()),
            InnerNode::CharacterDevice(d) => {
                let (ma, mi) = decode_dev(d.device_number);
                format!("char {ma}:{mi}")
            }
            InnerNode::BlockDevice(d) => {
                let (ma, mi) = decode_dev(d.device_number);
                format!("block {ma}:{mi}")
            }
            InnerNode::NamedPipe => "fifo".to_string(),
            InnerNode::Socket => "socket".to_string(),
        };
        let h = node.header;
        out.insert(
            path,
            Facts {
                kind,
                mode: h.permissions as u32,
                uid: h.uid,
                gid: h.gid,
                mtime: h.mtime,
            },
        );
    }
    out
}

#[test]
fn round_trips_through_backhands_reader() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    for compression in [SquashCompression::Zstd, SquashCompression::Xz] {
        let opts = SquashfsOptions {
            compression,
            ..SquashfsOptions::default()
        };
        let (img, stats) = write(&tree, &opts);
        let theirs = image_facts(img.path());
        let ours = tree_facts(&tree, None);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        for (p, f) in &ours {
            assert_eq!(Some(f), theirs.get(p), "{p} ({compression:?})");
        }
        assert!(!theirs.contains_key("/.oci2uk/planted.ko"));
        assert!(theirs.contains_key("/.oci2uk-not-private"));
        assert_eq!(stats.entries, ours.len() as u64);
        assert_eq!(stats.split_hardlinks, 2);
        assert_eq!(stats.dropped_xattrs, 1);
        // The multi-block file is stored once for both its paths, and its zero block not at
        // all: the image is smaller than one copy of it.
        assert!(stats.image_size < BLOCK_SIZE as u64 * 2, "{stats:?}");
    }
}

#[test]
fn deterministic_and_clamped() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let opts = SquashfsOptions::default();
    let (a, _) = write(&tree, &opts);
    let (b, _) = write(&tree, &opts);
    assert_eq!(
        std::fs::read(a.path()).unwrap(),
        std::fs::read(b.path()).unwrap()
    );

    let epoch = 1_700_000_000;
    let clamped = SquashfsOptions {
        source_date_epoch: Some(epoch),
        ..SquashfsOptions::default()
    };
    let (c, _) = write(&tree, &clamped);
    let theirs = image_facts(c.path());
    assert_eq!(theirs["/usr/bin/ping"].mtime, epoch as u32);
    assert_eq!(theirs, tree_facts(&tree, Some(epoch)));
    // The superblock time (bytes 8..12) is the epoch.
    let bytes = std::fs::read(c.path()).unwrap();
    assert_eq!(&bytes[8..12], &(epoch as u32).to_le_bytes());
    assert_eq!(&std::fs::read(a.path()).unwrap()[8..12], &[0; 4]);
}

/// Blocks compressed ahead on other threads give the very image `backhand` writes alone, and
/// the prediction of the writer's blocks is exact: every data and fragment block is made
/// ahead, only metadata is compressed on the spot. The tree has files of one block exactly,
/// of several blocks with a hole, hard links, paths whose byte order is not their path order,
/// and enough small files for several fragment blocks.
#[test]
fn blocks_made_ahead_give_backhands_own_image() {
    let mut fx = Fixture::new();
    let mut big = Vec::new();
    for i in 0..(BLOCK_SIZE as usize * 3 + 17) {
        big.push((i * 13 % 253) as u8);
    }
    big[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize].fill(0);
    let exact: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i % 241) as u8).collect();
    let l1 = fx.layer(|t| {
        t.file("big", &big)
            .hardlink("big2", "big")
            .file("exact", &exact)
            .file("zeros", &vec![0u8; BLOCK_SIZE as usize * 2])
            .file("a-b", b"sorts before a/ bytewise")
            .file("a/b", &big[..5000])
            .file("empty", b"");
        for i in 0..400 {
            let body: Vec<u8> = (0..(700 + i * 3))
                .map(|j| ((i * 31 + j) % 256) as u8)
                .collect();
            t.file(&format!("small/{i:03}"), &body);
        }
    });
    let tree = fx.flatten(&[l1]).unwrap();
    let opts = SquashfsOptions::default();
    let mut plain = tempfile::tempfile().unwrap();
    let (plain_stats, none) = write_squashfs_with(&tree, &opts, &mut plain, false).unwrap();
    assert_eq!(none, parallel::AheadStats::default());
    let mut fast = tempfile::tempfile().unwrap();
    let (fast_stats, made) = write_squashfs_with(&tree, &opts, &mut fast, true).unwrap();
    assert_eq!(plain_stats, fast_stats);
    let read = |mut f: File| {
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    };
    assert!(read(plain) == read(fast), "the images differ");
    assert!(made.predicted > 6, "{made:?}");
    // The blocks of zeros (one in each of big and big2, two in zeros) are holes.
    assert_eq!(
        made.made_ahead,
        made.predicted - 4,
        "{made:?}: all but the zero blocks"
    );
    assert!(made.made_on_the_spot < 10, "{made:?}: metadata only");
}

#[test]
fn an_empty_tree_is_a_root() {
    let fx = Fixture::new();
    let tree = fx.flatten(&[]).unwrap();
    let (img, stats) = write(&tree, &SquashfsOptions::default());
    assert_eq!(stats.entries, 0);
    assert!(image_facts(img.path()).is_empty());
}

#[test]
fn device_numbers_encode_as_linux_decodes() {
    for (ma, mi) in [(5, 1), (259, 300), (4095, 0xfffff), (0, 0)] {
        assert_eq!(decode_dev(encode_dev(ma, mi)), (ma, mi));
    }
}

/// squashfs-tools' own reading of the image, where it is installed: an independent check
/// of the format (`unsquashfs -lln` lists type, mode, owner, size, mtime and name).
#[test]
fn unsquashfs_lists_it() {
    assert!(
        Command::new("unsquashfs").arg("-v").output().is_ok(),
        "unsquashfs is not installed (Debian's squashfs-tools; scripts/install-vm.sh installs it)"
    );
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let (img, _) = write(&tree, &SquashfsOptions::default());
    let out = Command::new("unsquashfs")
        .args(["-lln", "-UTC"])
        .arg(img.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut listed = BTreeMap::new();
    for line in text.lines().filter(|l| l.contains("squashfs-root")) {
        // -rwsr-x--- 1000/50 4 2033-05-18 03:33 squashfs-root/usr/bin/ping
        let f: Vec<&str> = line.split_whitespace().collect();
        let name = line
            .split_once("squashfs-root")
            .map(|(_, n)| n.split(" -> ").next().unwrap().to_string())
            .unwrap();
        listed.insert(name, (f[0].to_string(), f[1].to_string()));
    }
    let expect = |p: &str, perms: &str, owner: &str| {
        assert_eq!(
            listed.get(p),
            Some(&(perms.to_string(), owner.to_string())),
            "{p} in\n{text}"
        );
    };
    expect("/usr/bin/ping", "-rwsr-x---", "1000/50");
    expect("/usr/bin/ping6", "-rwsr-x---", "1000/50");
    expect("/tmp", "drwxrwxrwt", "0/0");
    expect("/lib64", "lrwxrwxrwx", "0/0");
    expect("/run/fifo", "prw-------", "0/0");
    assert!(listed.get("/dev/tty").unwrap().0.starts_with("crw--w----"));
    assert!(listed.get("/dev/big").unwrap().0.starts_with("brw-------"));
    let ours = tree_facts(&tree, None);
    let mut names: Vec<_> = listed.keys().filter(|k| !k.is_empty()).cloned().collect();
    names.sort();
    assert_eq!(names, ours.keys().cloned().collect::<Vec<_>>());

    // And extracts the same contents.
    let dest = tempfile::tempdir().unwrap();
    let x = dest.path().join("x");
    let out = Command::new("unsquashfs")
        .args(["-no-xattrs", "-d"])
        .arg(&x)
        .arg(img.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for e in tree.entries().filter(|e| !is_private(e.path)) {
        if let Kind::File(c) = &e.inode.kind {
            let got = std::fs::read(x.join(Path::new(OsStr::from_bytes(e.path)))).unwrap();
            assert_eq!(got, content(&tree, c), "/{}", lossy(e.path));
        }
    }
}

/// The extras of the layout tests: an init and a config.
fn layout_extras() -> Vec<Extra> {
    vec![
        Extra::init(b"\x7fELF init".to_vec()),
        Extra::config(b"{}".to_vec()),
    ]
}

/// `tree` written as the SquashFS layout with [`layout_extras`] and `codec`, spooling in `tmp`.
fn squashfs_layout(
    tree: &Tree,
    codec: super::super::Codec,
    tmp: &Path,
) -> (Vec<u8>, super::super::RootfsStats) {
    let opts = super::super::RootfsOptions {
        codec,
        ..Default::default()
    };
    let mut out = Vec::new();
    let stats = super::super::write_layout(
        super::super::Layout::Squashfs,
        tree,
        &layout_extras(),
        &opts,
        &SquashfsOptions::default(),
        tmp,
        &mut out,
    )
    .unwrap();
    (out, stats)
}

#[test]
fn the_squashfs_layout_holds_extras_and_the_image() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let tmp = tempfile::tempdir().unwrap();
    let opts = super::super::RootfsOptions {
        codec: super::super::Codec::None,
        ..Default::default()
    };
    let (out, stats) = squashfs_layout(&tree, opts.codec, tmp.path());
    let sq = stats.root_image.expect("a root image");
    // No spooled image is left behind.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    // The cpio names: the extras, their parent, the image and the marker last; no image
    // path besides.
    let text = String::from_utf8_lossy(&out);
    for name in [
        ".oci2uk\0",
        ".oci2uk/init\0",
        ".oci2uk/root.squashfs\0",
        "rumpconfig.json\0",
        ".oci2uk/unpacked\0",
    ] {
        assert!(text.contains(name), "{name}");
    }
    assert!(!text.contains("etc/passwd"));
    assert_eq!(stats.entries, 5);
    assert!(stats.unpacked_size >= sq.image_size);
    let (img, _) = write(&tree, &SquashfsOptions::default());
    let bytes = std::fs::read(img.path()).unwrap();
    assert!(out.windows(bytes.len()).any(|w| w == bytes.as_slice()));
}

/// The names of a newc archive's entries, up to its trailer, and where it ends.
fn newc_names(bytes: &[u8]) -> (Vec<String>, usize) {
    let hex = |b: &[u8]| usize::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let (mut names, mut at) = (Vec::new(), 0);
    loop {
        let h = &bytes[at..at + 110];
        assert_eq!(&h[..6], b"070701", "a header at {at}");
        let (size, namesize) = (hex(&h[54..62]), hex(&h[94..102]));
        let name = String::from_utf8_lossy(&bytes[at + 110..at + 110 + namesize - 1]).into_owned();
        at = (at + 110 + namesize).next_multiple_of(4);
        at = (at + size).next_multiple_of(4);
        if name == "TRAILER!!!" {
            return (names, at);
        }
        names.push(name);
    }
}

#[test]
fn the_root_image_follows_the_compressed_archive_uncompressed() {
    let mut fx = Fixture::new();
    let tree = sample(&mut fx);
    let tmp = tempfile::tempdir().unwrap();
    let (out, stats) = squashfs_layout(&tree, super::super::Codec::Zstd, tmp.path());
    assert_eq!(stats.compressed_size, out.len() as u64);
    // First a zstd frame with the extras, then (4-byte aligned) a plain archive with the image
    // and the marker last.
    let frame = zstd::zstd_safe::find_frame_compressed_size(&out).unwrap();
    let mut head = Vec::new();
    zstd::stream::read::Decoder::new(&out[..frame])
        .unwrap()
        .read_to_end(&mut head)
        .unwrap();
    let (names, _) = newc_names(&head);
    assert_eq!(names, [".oci2uk", ".oci2uk/init", "rumpconfig.json"]);
    let start = frame.next_multiple_of(4);
    assert!(out[frame..start].iter().all(|b| *b == 0));
    let (names, end) = newc_names(&out[start..]);
    assert_eq!(names, [".oci2uk/root.squashfs", ".oci2uk/unpacked"]);
    assert_eq!(start + end, out.len());
    let (img, _) = write(&tree, &SquashfsOptions::default());
    let bytes = std::fs::read(img.path()).unwrap();
    assert!(out[start..]
        .windows(bytes.len())
        .any(|w| w == bytes.as_slice()));
    assert_eq!(stats.entries, 5);
}
