use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::testutil::{gzip, tar, zstd, Fixture, TarBuilder};
use super::*;

fn paths(t: &Tree) -> Vec<String> {
    t.entries().map(|e| lossy(e.path)).collect()
}

fn content(t: &Tree, path: &str) -> Vec<u8> {
    let e = t
        .get(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"));
    let Kind::File(c) = &e.inode.kind else {
        panic!("{path} is a {}", e.inode.kind.name())
    };
    let mut v = Vec::new();
    t.open(c).read_to_end(&mut v).unwrap();
    v
}

fn kind<'a>(t: &'a Tree, path: &str) -> &'a Kind {
    &t.get(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"))
        .inode
        .kind
}

#[test]
fn basic_entries_and_metadata() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.dir("etc/")
            .custom(
                b'0',
                "./etc/passwd",
                "",
                b"root:x:0:0::/root:/bin/sh\n",
                &[],
                |h| {
                    h.set_mode(0o4755);
                    h.set_uid(1000);
                    h.set_gid(100);
                    h.set_mtime(1234);
                },
            )
            .symlink("/bin", "usr/bin")
            .file("usr//bin/./sh", b"ELF")
            .raw(b'3', "dev/null", "", b"")
            .custom(b'4', "dev/sda", "", b"", &[], |h| {
                h.set_device_major(8).unwrap();
                h.set_device_minor(1).unwrap();
            })
            .raw(b'6', "run/fifo", "", b"");
    });
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(
        paths(&t),
        [
            "bin",
            "dev",
            "dev/null",
            "dev/sda",
            "etc",
            "etc/passwd",
            "run",
            "run/fifo",
            "usr",
            "usr/bin",
            "usr/bin/sh"
        ]
    );
    let p = t.get(b"etc/passwd").unwrap().inode;
    assert_eq!((p.mode, p.uid, p.gid, p.mtime), (0o4755, 1000, 100, 1234));
    assert_eq!(content(&t, "etc/passwd"), b"root:x:0:0::/root:/bin/sh\n");
    assert_eq!(kind(&t, "bin"), &Kind::Symlink(b"usr/bin".to_vec()));
    assert_eq!(
        kind(&t, "dev/sda"),
        &Kind::BlockDevice { major: 8, minor: 1 }
    );
    assert_eq!(
        kind(&t, "dev/null"),
        &Kind::CharDevice { major: 0, minor: 0 }
    );
    assert_eq!(kind(&t, "run/fifo"), &Kind::Fifo);
    // Implicit parents: fixed metadata.
    assert_eq!(t.get(b"usr").unwrap().inode, &Inode::implicit_dir());
    assert_eq!(t.get(b"etc").unwrap().inode.mtime, 1_600_000_000);
    // Lookups through symlinks.
    assert_eq!(t.resolve(b"/bin/sh").unwrap().path, b"usr/bin/sh");
    assert_eq!(
        t.resolve(b"../../bin/../bin/sh").unwrap().path,
        b"usr/bin/sh"
    );
    assert!(t.resolve(b"bin/nope").is_none());
    assert_eq!(t.content_size(), 26 + 3);
}

#[test]
fn root_entry_sets_root_metadata_and_cannot_be_replaced() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.custom(b'5', "./", "", b"", &[], |h| h.set_mode(0o700));
    });
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(t.root().inode.mode, 0o700);
    assert!(t.is_empty());
    let l = fx.layer(|t| {
        t.file("./", b"x");
    });
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(matches!(err, FlattenError::RootReplaced { .. }), "{err}");
}

#[test]
fn whiteouts_remove_lower_entries() {
    let mut fx = Fixture::new();
    let l1 = fx.layer(|t| {
        t.file("a/x", b"1")
            .file("a/y/z", b"2")
            .file("b", b"3")
            .file("keep", b"4");
    });
    let l2 = fx.layer(|t| {
        t.file("a/.wh.x", b"")
            .file(".wh.b", b"")
            .file(".wh.absent", b"")
            .file("nodir/sub/.wh.q", b"")
            .file("keep/.wh.q", b"");
    });
    let t = fx.flatten(&[l1, l2]).unwrap();
    assert_eq!(paths(&t), ["a", "a/y", "a/y/z", "keep"]);

    let l3 = fx.layer(|t| {
        t.file(".wh.a", b"");
    });
    let again = fx_layer_again(&mut fx);
    let t = fx.flatten(&[again, l3]).unwrap();
    assert_eq!(paths(&t), ["b", "keep"]);
}

fn fx_layer_again(fx: &mut Fixture) -> Layer {
    fx.layer(|t| {
        t.file("a/x", b"1")
            .file("a/y/z", b"2")
            .file("b", b"3")
            .file("keep", b"4");
    })
}

#[test]
fn whiteout_then_recreate_in_same_and_later_layer() {
    let mut fx = Fixture::new();
    let lower = fx.layer(|t| {
        t.file("d/old", b"old").file("d/sub/deep", b"deep");
    });
    // The whiteout comes after the layer's own new entries: it still only removes the lower
    // ones.
    let same = fx.layer(|t| {
        t.file("d/new", b"new")
            .file("d/sub/fresh", b"f")
            .file(".wh.d", b"");
    });
    let t = fx.flatten(&[lower.clone(), same]).unwrap();
    assert_eq!(paths(&t), ["d", "d/new", "d/sub", "d/sub/fresh"]);
    // The lower directories the new entries went through became this layer's.
    assert_eq!(t.get(b"d/sub").unwrap().inode, &Inode::implicit_dir());

    // Whiteout first, then recreated with its own metadata.
    let same2 = fx.layer(|t| {
        t.file(".wh.d", b"")
            .custom(b'5', "d", "", b"", &[], |h| h.set_mode(0o700))
            .file("d/new", b"new");
    });
    let t = fx.flatten(&[lower.clone(), same2]).unwrap();
    assert_eq!(paths(&t), ["d", "d/new"]);
    assert_eq!(t.get(b"d").unwrap().inode.mode, 0o700);

    let gone = fx.layer(|t| {
        t.file(".wh.d", b"");
    });
    let back = fx.layer(|t| {
        t.file("d/again", b"a");
    });
    let t = fx.flatten(&[lower, gone, back]).unwrap();
    assert_eq!(paths(&t), ["d", "d/again"]);
}

#[test]
fn opaque_directory_applies_before_the_layers_own_entries() {
    let mut fx = Fixture::new();
    let lower = fx.layer(|t| {
        t.file("d/old", b"old")
            .file("d/sub/x", b"x")
            .file("other", b"o");
    });
    let upper = fx.layer(|t| {
        t.custom(b'5', "d", "", b"", &[], |h| h.set_mode(0o750))
            .file("d/new", b"new")
            .file("d/sub/y", b"y")
            .file("d/.wh..wh..opq", b"");
    });
    let t = fx.flatten(&[lower, upper]).unwrap();
    assert_eq!(paths(&t), ["d", "d/new", "d/sub", "d/sub/y", "other"]);
    assert_eq!(t.get(b"d").unwrap().inode.mode, 0o750);

    // An opaque root.
    let mut fx = Fixture::new();
    let lower = fx.layer(|t| {
        t.file("a", b"a");
    });
    let upper = fx.layer(|t| {
        t.file("b", b"b").file(".wh..wh..opq", b"");
    });
    assert_eq!(paths(&fx.flatten(&[lower, upper]).unwrap()), ["b"]);
}

#[test]
fn a_file_and_its_own_whiteout_in_one_layer_stay() {
    let mut fx = Fixture::new();
    let lower = fx.layer(|t| {
        t.file("f", b"lower");
    });
    let upper = fx.layer(|t| {
        t.file("f", b"upper").file(".wh.f", b"");
    });
    let t = fx.flatten(&[lower, upper]).unwrap();
    assert_eq!(content(&t, "f"), b"upper");
}

#[test]
fn duplicates_in_one_layer_the_later_wins() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("f", b"first")
            .file("f", b"second")
            .file("d/x", b"x")
            .file("d", b"now a file")
            .file("e", b"file")
            .dir("e")
            .file("e/y", b"y");
    });
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(paths(&t), ["d", "e", "e/y", "f"]);
    assert_eq!(content(&t, "f"), b"second");
    assert_eq!(content(&t, "d"), b"now a file");
}

#[test]
fn type_replacement_across_layers() {
    let mut fx = Fixture::new();
    let lower = fx.layer(|t| {
        t.custom(b'5', "keep", "", b"", &[], |h| h.set_mode(0o700))
            .file("keep/child", b"c")
            .file("gone/child", b"c")
            .file("file", b"f")
            .dir("link");
    });
    let upper = fx.layer(|t| {
        t.custom(b'5', "keep", "", b"", &[], |h| {
            h.set_mode(0o711);
            h.set_uid(5);
        })
        .file("gone", b"replaced")
        .dir("file")
        .symlink("link", "keep");
    });
    let t = fx.flatten(&[lower, upper]).unwrap();
    assert_eq!(paths(&t), ["file", "gone", "keep", "keep/child", "link"]);
    let keep = t.get(b"keep").unwrap().inode;
    assert_eq!((keep.mode, keep.uid), (0o711, 5));
    assert_eq!(kind(&t, "file"), &Kind::Dir);
    assert_eq!(kind(&t, "link"), &Kind::Symlink(b"keep".to_vec()));
}

#[test]
fn hardlinks_share_the_inode_and_keep_old_contents() {
    let mut fx = Fixture::new();
    let l1 = fx.layer(|t| {
        t.custom(b'0', "bin/a", "", b"v1", &[], |h| h.set_mode(0o755))
            .hardlink("bin/b", "bin/a")
            .symlink("bin/s", "a")
            .hardlink("bin/s2", "./bin/s");
    });
    let l2 = fx.layer(|t| {
        t.hardlink("sbin/c", "/bin/a").file("bin/a", b"v2");
    });
    let t = fx.flatten(&[l1, l2]).unwrap();
    let id = |p: &str| t.get(p.as_bytes()).unwrap().id;
    assert_eq!(id("bin/b"), id("sbin/c"));
    assert_ne!(id("bin/a"), id("bin/b"));
    assert_eq!(content(&t, "bin/a"), b"v2");
    assert_eq!(content(&t, "bin/b"), b"v1");
    assert_eq!(content(&t, "sbin/c"), b"v1");
    assert_eq!(t.get(b"sbin/c").unwrap().inode.mode, 0o755);
    assert_eq!(id("bin/s"), id("bin/s2"));
    assert_eq!(kind(&t, "bin/s2"), &Kind::Symlink(b"a".to_vec()));
    // Counted once per inode.
    assert_eq!(t.content_size(), 4);
}

#[test]
fn hardlink_through_a_symlinked_directory() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("usr/lib/x", b"x")
            .symlink("lib", "usr/lib")
            .hardlink("y", "lib/x");
    });
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(t.get(b"y").unwrap().id, t.get(b"usr/lib/x").unwrap().id);
}

#[test]
fn bad_hardlinks_are_refused() {
    type Check = fn(&FlattenError) -> bool;
    let cases: [(&str, Check); 4] = [
        ("dir", |e| matches!(e, FlattenError::HardlinkToDir { .. })),
        ("nothing", |e| {
            matches!(e, FlattenError::HardlinkMissing { .. })
        }),
        ("../../etc/passwd", |e| {
            matches!(e, FlattenError::HardlinkEscape { .. })
        }),
        ("file/x", |e| {
            matches!(e, FlattenError::HardlinkMissing { .. })
        }),
    ];
    for (target, check) in cases {
        let mut fx = Fixture::new();
        let l = fx.layer(|t| {
            t.dir("dir").file("file", b"f").hardlink("link", target);
        });
        let err = fx.flatten(&[l]).unwrap_err();
        assert!(check(&err), "{target}: {err}");
        let msg = err.to_string();
        assert!(msg.contains("\"link\"") && msg.contains(target), "{msg}");
    }
}

#[test]
fn symlinked_parents_resolve_inside_the_root() {
    let mut fx = Fixture::new();
    let l1 = fx.layer(|t| {
        t.dir("usr/lib")
            .symlink("lib", "usr/lib")
            .symlink("abs", "/usr/lib")
            .symlink("a", "../../..")
            .symlink("b", "/../../etc");
    });
    let l2 = fx.layer(|t| {
        t.file("lib/x", b"x")
            .file("abs/y", b"y")
            .file("a/etc/passwd", b"not the host's")
            .file("b/group", b"g");
    });
    let t = fx.flatten(&[l1, l2]).unwrap();
    assert_eq!(
        paths(&t),
        [
            "a",
            "abs",
            "b",
            "etc",
            "etc/group",
            "etc/passwd",
            "lib",
            "usr",
            "usr/lib",
            "usr/lib/x",
            "usr/lib/y"
        ]
    );
    assert_eq!(content(&t, "etc/passwd"), b"not the host's");
    // Nothing but the anonymous spool reached the disk.
    assert_eq!(std::fs::read_dir(fx.spool_dir()).unwrap().count(), 0);
    // A whiteout through a symlinked directory.
    let l3 = fx.layer(|t| {
        t.file("lib/.wh.x", b"");
    });
    let l1 = fx_layer_links(&mut fx);
    let l2 = fx.layer(|t| {
        t.file("lib/x", b"x");
    });
    let t = fx.flatten(&[l1, l2, l3]).unwrap();
    assert!(t.get(b"usr/lib/x").is_none());
}

fn fx_layer_links(fx: &mut Fixture) -> Layer {
    fx.layer(|t| {
        t.dir("usr/lib").symlink("lib", "usr/lib");
    })
}

#[test]
fn symlink_loops_and_non_directories_are_refused() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.symlink("a", "b").symlink("b", "a").file("a/x", b"x");
    });
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(matches!(err, FlattenError::SymlinkLoop { .. }), "{err}");
    let l = fx.layer(|t| {
        t.symlink("self", "self/x").file("self/y", b"");
    });
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(matches!(err, FlattenError::SymlinkLoop { .. }), "{err}");
    let l = fx.layer(|t| {
        t.file("f", b"").file("f/x", b"x");
    });
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(matches!(err, FlattenError::NotADirectory { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("/f to be a directory, but it is a file"),
        "{err}"
    );
}

#[test]
fn names_leaving_the_root_are_refused() {
    for name in ["../x", "a/../../x", "/../x"] {
        let mut fx = Fixture::new();
        let l = fx.layer(|t| {
            t.file(name, b"x");
        });
        let err = fx.flatten(std::slice::from_ref(&l)).unwrap_err();
        assert!(matches!(err, FlattenError::Escape { .. }), "{name}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains(&l.digest.to_string()),
            "{msg}"
        );
    }
    // Inside the root, `..` is fine.
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("a/../b", b"x");
    });
    assert_eq!(paths(&fx.flatten(&[l]).unwrap()), ["b"]);
}

#[test]
fn invalid_whiteouts_are_refused() {
    for name in [
        ".wh.",
        "d/.wh..wh.foo",
        "d/.wh..wh..opqx",
        ".wh..",
        ".wh...",
        ".wh.x/y",
        "d/.wh..wh..opq/x",
    ] {
        let mut fx = Fixture::new();
        let l = fx.layer(|t| {
            t.file(name, b"");
        });
        let err = fx.flatten(&[l]).unwrap_err();
        assert!(
            matches!(err, FlattenError::Whiteout { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn diff_id_mismatch() {
    let mut fx = Fixture::new();
    let data = tar(|t| {
        t.file("a", b"a");
    });
    let mut l = fx.layer_as(&data, Compression::Gzip);
    l.diff_id = testutil::sha256(b"something else");
    let err = fx.flatten(std::slice::from_ref(&l)).unwrap_err();
    let FlattenError::DiffId {
        expected,
        actual,
        digest,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(expected, &l.diff_id.to_string());
    assert_eq!(actual, &testutil::sha256(&data).to_string());
    assert_eq!(digest, &l.digest.to_string());
}

#[test]
fn diff_id_covers_trailing_bytes() {
    let mut fx = Fixture::new();
    let mut data = tar(|t| {
        t.file("a", b"a");
    });
    data.extend_from_slice(&[0u8; 8192]);
    let l = fx.layer_as(&data, Compression::Zstd);
    fx.flatten(&[l]).unwrap();
    // The DiffID of the archive without its trailing zeros is not the stream's.
    let mut l = fx.layer_as(&data, Compression::Gzip);
    l.diff_id = testutil::sha256(&data[..data.len() - 8192]);
    assert!(matches!(fx.flatten(&[l]), Err(FlattenError::DiffId { .. })));
}

#[test]
fn media_type_is_checked_against_the_bytes() {
    let mut fx = Fixture::new();
    let data = tar(|t| {
        t.file("a", b"a");
    });
    let cases = [
        (data.clone(), Compression::Gzip, "an uncompressed tar"),
        (zstd(&data), Compression::None, "zstd-compressed"),
        (gzip(&data), Compression::Zstd, "gzip-compressed"),
        (
            b"PK\x03\x04 not a tar at all".to_vec(),
            Compression::None,
            "neither gzip, zstd nor tar",
        ),
    ];
    for (blob, declared, found) in cases {
        let l = fx.blob(&blob, &data, declared);
        let err = fx.flatten(std::slice::from_ref(&l)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FlattenError::Compression { .. }), "{msg}");
        assert!(
            msg.contains(&l.digest.to_string())
                && msg.contains(&format!("declared {declared}"))
                && msg.contains(&l.media_type)
                && msg.contains(found),
            "{msg}"
        );
    }
}

#[test]
fn uncompressed_and_pre_posix_tars() {
    let mut fx = Fixture::new();
    let mut data = tar(|t| {
        t.file("a", b"a");
    });
    let l = fx.layer_as(&data, Compression::None);
    assert_eq!(paths(&fx.flatten(&[l]).unwrap()), ["a"]);
    // Without the ustar magic (a v7 tar), the header checksum still tells it is a tar.
    data[257..265].fill(0);
    let sum: u32 = data[..148]
        .iter()
        .chain(&data[156..512])
        .map(|b| *b as u32)
        .sum::<u32>()
        + 256;
    data[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let l = fx.layer_as(&data, Compression::None);
    assert_eq!(paths(&fx.flatten(&[l]).unwrap()), ["a"]);
    // An empty layer.
    let l = fx.layer_as(&[0u8; 1024], Compression::None);
    assert!(fx.flatten(&[l]).unwrap().is_empty());
}

#[test]
fn multi_member_gzip_and_zstd() {
    let mut fx = Fixture::new();
    let data = tar(|t| {
        t.file("a", &[1u8; 3000]).file("b", b"b");
    });
    let (x, y) = data.split_at(1700);
    let mut blob = gzip(x);
    blob.extend(gzip(y));
    let l = fx.blob(&blob, &data, Compression::Gzip);
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(content(&t, "a"), [1u8; 3000]);
    assert_eq!(content(&t, "b"), b"b");

    let mut blob = zstd(x);
    blob.extend(zstd(y));
    let l = fx.blob(&blob, &data, Compression::Zstd);
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(content(&t, "a"), [1u8; 3000]);
}

#[test]
fn decompression_bomb_stops_at_the_cap() {
    let mut fx = Fixture::new();
    // A header announcing a 6 GiB file, then 6 GiB of zeros as 96 gzip members of 64 MiB
    // (about 6 MB compressed).
    let size: u64 = 96 << 26;
    let mut h = tar::Header::new_ustar();
    h.set_path("zeros").unwrap();
    h.set_size(size);
    h.set_cksum();
    let mut blob = gzip(h.as_bytes());
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..64 {
        e.write_all(&chunk).unwrap();
    }
    let member = e.finish().unwrap();
    for _ in 0..96 {
        blob.extend_from_slice(&member);
    }
    let l = fx.blob(&blob, b"unknown", Compression::Gzip);
    let start = Instant::now();
    let err = fx
        .flatten_max(std::slice::from_ref(&l), 16 << 20)
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(err, FlattenError::TooLarge { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("16777216") && msg.contains(&l.digest.to_string()),
        "{msg}"
    );
}

#[test]
fn cap_counts_all_layers() {
    let mut fx = Fixture::new();
    let a = fx.layer(|t| {
        t.file("a", &[0u8; 6000]);
    });
    let b = fx.layer(|t| {
        t.file("b", &[1u8; 6000]);
    });
    assert!(fx.flatten_max(std::slice::from_ref(&a), 10_000).is_ok());
    let err = fx.flatten_max(&[a, b], 10_000).unwrap_err();
    assert!(matches!(err, FlattenError::TooLarge { .. }), "{err}");
}

#[test]
fn long_names_links_and_xattrs() {
    let long_dir = "d".repeat(150);
    let long = format!("{long_dir}/{}", "f".repeat(120));
    let target = format!("/{}", "t".repeat(300));
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.custom(
            b'0',
            &long,
            "",
            b"long",
            &[
                ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
                ("SCHILY.xattr.user.k", b"v"),
            ],
            |_| {},
        )
        .custom(
            b'2',
            "sym",
            "",
            b"",
            &[("linkpath", target.as_bytes())],
            |_| {},
        )
        // GNU long name and long link name records.
        .raw(
            b'L',
            "././@LongLink",
            "",
            format!("gnu/{}\0", "g".repeat(200)).as_bytes(),
        )
        .raw(b'0', "truncated", "", b"gnu")
        .raw(b'K', "././@LongLink", "", target.as_bytes())
        .raw(b'2', "gnusym", "short", b"")
        .custom(
            b'0',
            "pax",
            "",
            b"",
            &[
                ("uid", b"3000000"),
                ("gid", b"4000000"),
                ("mtime", b"1700000000.75"),
            ],
            |_| {},
        );
    });
    let t = fx.flatten(&[l]).unwrap();
    let f = t.get(long.as_bytes()).unwrap().inode;
    assert_eq!(f.xattrs.len(), 2);
    assert_eq!(f.xattrs[&b"security.capability"[..]], b"\x01\x00\x00\x02");
    assert_eq!(content(&t, &long), b"long");
    assert_eq!(kind(&t, "sym"), &Kind::Symlink(target.clone().into_bytes()));
    assert_eq!(content(&t, &format!("gnu/{}", "g".repeat(200))), b"gnu");
    assert_eq!(kind(&t, "gnusym"), &Kind::Symlink(target.into_bytes()));
    let p = t.get(b"pax").unwrap().inode;
    assert_eq!(
        (p.uid, p.gid, p.mtime),
        (3_000_000, 4_000_000, 1_700_000_000)
    );
}

#[test]
fn malformed_archives() {
    let mut fx = Fixture::new();
    let mut data = tar(|t| {
        t.file("a", b"a");
    });
    data[0] = b'b';
    let l = fx.layer_as(&data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(
        err.to_string().contains("malformed") && matches!(err, FlattenError::Malformed { .. }),
        "{err}"
    );

    let data = tar(|t| {
        t.file("a", &[7u8; 5000]);
    });
    let l = fx.blob(&gzip(&data[..2048]), &data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(matches!(err, FlattenError::Corrupt { .. }), "{err}");

    let mut blob = gzip(&data);
    let n = blob.len();
    blob[n / 2] ^= 0xff;
    let l = fx.blob(&blob, &data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(
        matches!(
            err,
            FlattenError::Corrupt { .. } | FlattenError::Malformed { .. }
        ),
        "{err}"
    );

    let data = tar(|t| {
        t.custom(b'0', "nul", "", b"", &[("path", b"a\0b")], |_| {});
    });
    let l = fx.layer_as(&data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");

    let data = tar(|t| {
        t.raw(b'V', "volume", "", b"");
    });
    let l = fx.layer_as(&data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(
        err.to_string().contains("unsupported tar entry type 'V'"),
        "{err}"
    );

    let data = tar(|t| {
        t.raw(
            b'x',
            "pax",
            "",
            &vec![b'x'; (tarstream::MAX_SPECIAL + 1) as usize],
        );
    });
    let l = fx.layer_as(&data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(
        err.to_string().contains("pax header of 1048577 bytes"),
        "{err}"
    );
}

#[test]
fn pax_size_disagreeing_with_the_header_is_refused() {
    // A member hidden in another's data: readers that honour the pax size and readers that
    // read the header's size field would see different trees.
    let smuggled = tar(|t| {
        t.file("smuggled", b"hidden");
    });
    let header = &smuggled[..1024];
    let mut fx = Fixture::new();
    for (name, pax_size, member) in [("larger", "1536", &b"small"[..]), ("smaller", "0", header)] {
        let data = tar(|t| {
            t.custom(
                b'0',
                name,
                "",
                member,
                &[("size", pax_size.as_bytes())],
                |_| {},
            )
            .file("after", b"x");
        });
        let l = fx.layer_as(&data, Compression::Gzip);
        let err = fx.flatten(&[l]).unwrap_err();
        assert!(matches!(err, FlattenError::Malformed { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!(
                "{name:?}: its pax size {pax_size} disagrees with the size field of its header ({})",
                member.len()
            )),
            "{err}"
        );
    }

    // A pax size the header cannot hold (8 GiB and more): the field is ignored, as writers
    // zero it. Here the data is missing, which is another error.
    let data = tar(|t| {
        t.custom(b'0', "huge", "", b"", &[("size", b"8589934592")], |_| {});
    });
    let l = fx.layer_as(&data, Compression::Gzip);
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(matches!(err, FlattenError::Corrupt { .. }), "{err}");

    // Agreeing sizes are fine.
    let data = tar(|t| {
        t.custom(b'0', "same", "", b"abc", &[("size", b"3")], |_| {});
    });
    let l = fx.layer_as(&data, Compression::Gzip);
    let t = fx.flatten(&[l]).unwrap();
    assert_eq!(content(&t, "same"), b"abc");
}

/// Builds an old GNU sparse entry (type `S`) by hand.
fn old_gnu_sparse(t: &mut TarBuilder, name: &str, map: &[(u64, u64)], real: u64, data: &[u8]) {
    t.custom(b'S', name, "", data, &[], |h| {
        let mut g = tar::Header::new_gnu();
        g.as_mut_bytes()[..100].copy_from_slice(&h.as_bytes()[..100]);
        g.set_mode(0o644);
        g.set_size(data.len() as u64);
        g.set_entry_type(tar::EntryType::GNUSparse);
        let gnu = g.as_gnu_mut().unwrap();
        for (s, (o, l)) in gnu.sparse.iter_mut().zip(map) {
            s.set_offset(*o);
            s.set_length(*l);
        }
        gnu.set_real_size(real);
        *h = g;
    });
}

#[test]
fn sparse_files() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        old_gnu_sparse(t, "old", &[(4, 2), (10, 3)], 16, b"abxyz");
        // pax 0.1
        t.custom(
            b'0',
            "GNUSparseFile.0/p01",
            "",
            b"abxyz",
            &[
                ("GNU.sparse.major", b"0"),
                ("GNU.sparse.minor", b"1"),
                ("GNU.sparse.name", b"p01"),
                ("GNU.sparse.size", b"16"),
                ("GNU.sparse.numblocks", b"2"),
                ("GNU.sparse.map", b"4,2,10,3"),
            ],
            |_| {},
        );
        // pax 1.0: the map leads the data, padded to a block.
        let mut data = b"2\n4\n2\n10\n3\n".to_vec();
        data.resize(512, 0);
        data.extend_from_slice(b"abxyz");
        t.custom(
            b'0',
            "GNUSparseFile.0/p10",
            "",
            &data,
            &[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"p10"),
                ("GNU.sparse.realsize", b"16"),
            ],
            |_| {},
        );
        t.file("after", b"after");
    });
    let t = fx.flatten(&[l]).unwrap();
    let want = b"\0\0\0\0ab\0\0\0\0xyz\0\0\0";
    assert_eq!(content(&t, "old"), want);
    assert_eq!(content(&t, "p01"), want);
    assert_eq!(content(&t, "p10"), want);
    assert_eq!(content(&t, "after"), b"after");

    let l = fx.layer(|t| {
        old_gnu_sparse(t, "bad", &[(4, 2), (10, 3)], 12, b"abxyz");
    });
    let err = fx.flatten(&[l]).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn sparse_files_from_gnu_tar() {
    let Ok(out) = std::process::Command::new("tar").arg("--version").output() else {
        return;
    };
    if !String::from_utf8_lossy(&out.stdout).contains("GNU tar") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("s")).unwrap();
    f.set_len(3 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"middle", 1 << 20).unwrap();
    f.write_at(b"end", (3 << 20) - 3).unwrap();
    drop(f);
    let want = std::fs::read(dir.path().join("s")).unwrap();
    for args in [
        &["--format=gnu"][..],
        &["--format=posix", "--sparse-version=0.0"],
        &["--format=posix", "--sparse-version=0.1"],
        &["--format=posix", "--sparse-version=1.0"],
    ] {
        let out = std::process::Command::new("tar")
            .args(["--sparse", "-cf", "-", "-C"])
            .arg(dir.path())
            .args(args)
            .arg("s")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut fx = Fixture::new();
        let l = fx.layer_as(&out.stdout, Compression::None);
        let t = fx.flatten(&[l]).unwrap();
        assert_eq!(paths(&t), ["s"], "{args:?}");
        assert!(content(&t, "s") == want, "{args:?}");
    }
}

#[test]
fn spool_deduplicates_and_is_removed_with_the_tree() {
    let mut fx = Fixture::new();
    let big = vec![5u8; 3 << 20];
    let l1 = fx.layer(|t| {
        t.file("a", &big).file("b", b"same").file("c", b"same");
    });
    let l2 = fx.layer(|t| {
        t.file("a", &big).file("d", &big);
    });
    let t = fx.flatten(&[l1, l2]).unwrap();
    assert_eq!(t.spool.len(), big.len() as u64 + 4);
    assert_eq!(content(&t, "d"), big);
    drop(t);
    assert_eq!(std::fs::read_dir(fx.spool_dir()).unwrap().count(), 0);
}

#[test]
fn layers_are_deterministic() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        t.file("z", b"z").file("a/b", b"b").hardlink("h", "z");
    });
    let a = fx.flatten(std::slice::from_ref(&l)).unwrap();
    let b = fx.flatten(&[l]).unwrap();
    let dump = |t: &Tree| {
        t.entries()
            .map(|e| (e.path.to_vec(), e.id, e.inode.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(dump(&a), dump(&b));
}

#[test]
#[ignore = "a timing run: cargo test --release --lib flatten::tests::throughput -- --ignored --nocapture"]
fn throughput() {
    let mut fx = Fixture::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut t = TarBuilder::new();
    let mut total = 0u64;
    let mut i = 0;
    while total < 256 << 20 {
        // Mostly small files, some large, text-like bytes (gzip shrinks them about 2x).
        let size = match next() % 100 {
            0 => 4 << 20,
            1..=10 => 64 << 10,
            _ => (next() % 8192) as usize,
        };
        let data: Vec<u8> = (0..size)
            .map(|_| b"abcdefghijklmnop \n"[(next() % 18) as usize])
            .collect();
        t.file(&format!("d{}/f{i}", i % 97), &data);
        total += size as u64;
        i += 1;
    }
    let data = t.finish();
    let l = fx.layer_as(&data, Compression::Gzip);
    let start = Instant::now();
    let tree = fx.flatten(std::slice::from_ref(&l)).unwrap();
    let flatten = start.elapsed();
    let start = Instant::now();
    crate::output::tar::write_tar(&tree, std::io::sink()).unwrap();
    let write = start.elapsed();
    let start = Instant::now();
    let file = std::io::BufReader::new(std::fs::File::open(&l.path).unwrap());
    std::io::copy(
        &mut flate2::bufread::MultiGzDecoder::new(file),
        &mut std::io::sink(),
    )
    .unwrap();
    let inflate = start.elapsed();
    let start = Instant::now();
    let gz = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc < {} > /dev/null", l.path.display()))
        .status();
    let gunzip = start.elapsed();
    eprintln!(
        "{} files, {} MiB ({} MiB gzip): flatten {flatten:?}, write_tar {write:?}, \
         flate2 alone {inflate:?}, gzip -dc {gunzip:?} ({gz:?})",
        tree.len(),
        data.len() >> 20,
        l.size >> 20
    );
}
