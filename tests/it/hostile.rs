//! Hostile images: the binary on each image of `tests/hostile/` (written by `make.py` there)
//! and on decompression bombs built here, through the `docker-archive:`, `oci-archive:` and
//! `oci:` transports.
//!
//! An image that attacks the converter is refused with exit status 1 and one line naming what
//! was wrong (the path inside the image, the digest, the limit), leaving no output and no
//! temporary file; or, where the attack is one the image format allows and the tree can hold
//! harmlessly (an absolute name, a symlink pointing out of the root), it is neutralised and
//! the tree is exactly as given here. Either way nothing appears outside the output: a
//! sentinel directory beside the scratch directory stays as it was, and no file appears at the
//! paths the images aim at.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Output;

use sha2::{Digest, Sha256};

use crate::util::{assert_fails, assert_ok, tree_from_tar, Entry, Kind, Scratch, Tree};

/// The corpus file or directory `name`.
fn hostile(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/hostile")
        .join(name)
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The members of a tar (plain or gzip-compressed) by name.
fn members(archive: &Path) -> BTreeMap<String, Vec<u8>> {
    let raw = fs::read(archive).unwrap();
    let data = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        raw
    };
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(&data[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut buf = Vec::new();
        e.read_to_end(&mut buf).unwrap();
        out.insert(name, buf);
    }
    out
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// The digests an OCI layout (directory or archive) names: manifest, config, first layer.
fn oci_digests(name: &str) -> (String, String, String) {
    let path = hostile(name);
    let read = |file: &str| -> Vec<u8> {
        if path.is_dir() {
            fs::read(path.join(file)).unwrap()
        } else {
            members(&path).remove(file).unwrap()
        }
    };
    let index: serde_json::Value = serde_json::from_slice(&read("index.json")).unwrap();
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let m: serde_json::Value = serde_json::from_slice(&read(&format!(
        "blobs/sha256/{}",
        manifest.trim_start_matches("sha256:")
    )))
    .unwrap();
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    (manifest, config, layer)
}

/// What `make.py` gives an invalid DiffID.
fn wrong_diff_id() -> String {
    digest(b"not the layer")
}

/// A scratch directory with a sentinel directory beside it, and what the sentinel held.
struct Site {
    parent: tempfile::TempDir,
    scratch: Scratch,
    sentinel: PathBuf,
    before: BTreeMap<String, String>,
}

/// Every path under `root` with what it is (and a file's sha256).
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let what = if md.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if md.file_type().is_symlink() {
                format!("symlink {}", fs::read_link(&p).unwrap().display())
            } else {
                format!("file {}", sha256_hex(&fs::read(&p).unwrap()))
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Host paths the corpus aims at (absolute, or as far up as `../` leads).
const ESCAPE_TARGETS: &[&str] = &[
    "/pwned",
    "/outside",
    "/sentinel",
    "/tmp/outside",
    "/tmp/pwned",
    "/tmp/sub/pwned",
    "/abs/pwned",
];

impl Site {
    fn new() -> Self {
        let parent = tempfile::tempdir().unwrap();
        let scratch = Scratch {
            dir: tempfile::tempdir_in(parent.path()).unwrap(),
        };
        let sentinel = parent.path().join("sentinel");
        fs::create_dir_all(sentinel.join("sub")).unwrap();
        fs::write(sentinel.join("keep"), b"untouched\n").unwrap();
        fs::write(sentinel.join("sub/keep"), b"untouched too\n").unwrap();
        let before = listing(&sentinel);
        for t in ESCAPE_TARGETS {
            assert!(!Path::new(t).exists(), "{t} exists before the test");
        }
        Self {
            parent,
            scratch,
            sentinel,
            before,
        }
    }

    /// `oci2uk build SOURCE --format tar -o out.tar ARGS`.
    fn build(&self, source: &str, args: &[&str]) -> Output {
        let mut all = vec!["build", source, "--format", "tar", "-o", "out.tar"];
        all.extend_from_slice(args);
        self.scratch.oci2uk(&all)
    }

    /// Nothing outside the output: the sentinel as it was, nothing new beside it or at the
    /// escape targets, no temporary file in the working directory or the cache.
    fn assert_contained(&self, outputs: &[&str]) {
        assert_eq!(listing(&self.sentinel), self.before, "the sentinel changed");
        let mut beside: Vec<String> = fs::read_dir(self.parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        beside.sort();
        let mut expected = vec![
            "sentinel".to_string(),
            self.scratch
                .path()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
        ];
        expected.sort();
        assert_eq!(
            beside, expected,
            "something appeared beside the scratch directory"
        );
        let mut top: Vec<String> = fs::read_dir(self.scratch.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["cache", "work"],
            "something appeared in the scratch directory"
        );
        assert_eq!(self.scratch.outputs(), outputs, "the working directory");
        let tmp = self.scratch.cache().join("tmp");
        if tmp.exists() {
            assert_eq!(listing(&tmp), BTreeMap::new(), "temporary files left");
        }
        // The cache holds verified blobs, named by their digests, and nothing else (a tar
        // needs no initramfs).
        for (path, what) in listing(&self.scratch.cache()) {
            let parts: Vec<&str> = path.split('/').collect();
            match parts.as_slice() {
                ["tmp" | "rootfs" | "blobs" | "verified"]
                | ["blobs" | "verified", "sha256" | "sha512"] => {
                    assert_eq!(what, "dir", "{path}")
                }
                // Records of verified blobs: their size, mtime, inode and device.
                ["verified", "sha256", hex] => assert!(
                    self.scratch
                        .cache()
                        .join("blobs/sha256")
                        .join(hex)
                        .is_file(),
                    "a record of no blob: {path}"
                ),
                ["blobs", "sha256", hex] => {
                    assert_eq!(what, format!("file {hex}"), "cache entry {path}")
                }
                _ => panic!("unexpected cache entry {path}: {what}"),
            }
        }
        for t in ESCAPE_TARGETS {
            assert!(!Path::new(t).exists(), "{t} was written");
        }
        for up in ["pwned", "outside", "abs"] {
            assert!(
                !self.parent.path().join(up).exists(),
                "{up} beside the scratch"
            );
            assert!(
                !self.scratch.path().join(up).exists(),
                "{up} in the scratch"
            );
        }
    }

    /// Refused: status 1, one line with all of `needles`, nothing written.
    fn refused(&self, source: &str, args: &[&str], needles: &[&str]) -> String {
        let out = self.build(source, args);
        let line = assert_fails(&out, 1, needles);
        self.assert_contained(&[]);
        line
    }

    /// Neutralised: success, and the tree written is exactly `expected`.
    fn neutralised(&self, source: &str, expected: &[(&str, Entry)]) {
        let out = self.build(source, &[]);
        assert_ok(&out);
        self.assert_contained(&["out.tar"]);
        let tree = tree_from_tar(&fs::read(self.scratch.path().join("work/out.tar")).unwrap());
        let expected: Tree = expected
            .iter()
            .map(|(p, e)| (p.to_string(), e.clone()))
            .collect();
        crate::util::assert_same_tree(&tree, &expected, source);
    }
}

fn docker(name: &str) -> String {
    format!("docker-archive:{}", hostile(name).display())
}

fn oci_archive(name: &str) -> String {
    format!("oci-archive:{}", hostile(name).display())
}

fn oci_dir(name: &str) -> String {
    format!("oci:{}", hostile(name).display())
}

/// The digest of layer `n` of a docker-archive of the corpus, as stored.
fn layer_digest(name: &str, n: usize) -> String {
    digest(&members(&hostile(name))[&format!("{n}/layer.tar")])
}

fn entry(kind: Kind, mode: u32) -> Entry {
    Entry {
        kind,
        mode,
        uid: 0,
        gid: 0,
    }
}

fn dir() -> Entry {
    entry(Kind::Dir, 0o755)
}

fn file(data: &[u8]) -> Entry {
    entry(
        Kind::File {
            size: data.len() as u64,
            sha256: sha256_hex(data),
        },
        0o644,
    )
}

fn symlink(target: &str) -> Entry {
    entry(Kind::Symlink(target.into()), 0o777)
}

/// What every layer of the corpus holds besides its attack.
fn base() -> Vec<(&'static str, Entry)> {
    vec![("etc", dir()), ("etc/hostname", file(b"hostile\n"))]
}

#[test]
fn names_leaving_the_root_are_refused() {
    for (name, path) in [
        ("name-dotdot.tar", "../../sentinel/pwned"),
        ("name-dotdot-inner.tar", "etc/../../pwned"),
        ("name-absolute-dotdot.tar", "/../pwned"),
    ] {
        let site = Site::new();
        site.refused(
            &docker(name),
            &[],
            &[
                &format!("layer {}", layer_digest(name, 0)),
                &format!("has an entry {path:?} that leaves the image root"),
            ],
        );
    }
}

#[test]
fn absolute_names_are_read_from_the_image_root() {
    let mut want = base();
    want.extend([("abs", dir()), ("abs/pwned", file(b"abs\n"))]);
    Site::new().neutralised(&docker("name-absolute.tar"), &want);
}

#[test]
fn archive_members_leaving_the_archive_are_refused() {
    let site = Site::new();
    let archive = hostile("archive-layer-dotdot.tar");
    site.refused(
        &docker("archive-layer-dotdot.tar"),
        &[],
        &[&format!(
            "member ../../../etc/passwd of {} leads outside the archive",
            archive.display()
        )],
    );
    let site = Site::new();
    site.refused(
        &docker("archive-layer-symlink.tar"),
        &[],
        &["member link.tar of", "leads outside the archive"],
    );
    for (name, member) in [
        ("archive-member-dotdot.tar", "../outside"),
        ("archive-member-absolute.tar", "/tmp/outside"),
    ] {
        let site = Site::new();
        site.refused(
            &docker(name),
            &[],
            &[&format!(
                "{} has a member with an unsafe path: {member}",
                hostile(name).display()
            )],
        );
    }
}

#[test]
fn symlinks_pointing_out_resolve_inside_the_root() {
    // The link is kept as written; the file written through it lands inside the tree, where
    // the link resolves in a chroot (`..` stops at the root).
    let mut want = base();
    want.extend([
        ("evil", symlink("../../../../../../../../sentinel")),
        ("sentinel", dir()),
        ("sentinel/pwned", file(b"through the link\n")),
    ]);
    Site::new().neutralised(&docker("symlink-escape.tar"), &want);

    let mut want = base();
    want.extend([
        ("evil", symlink("/tmp")),
        ("tmp", dir()),
        ("tmp/sub", dir()),
        ("tmp/sub/pwned", file(b"x\n")),
    ]);
    Site::new().neutralised(&docker("symlink-escape-absolute.tar"), &want);

    // A file over a symlink replaces the link; its target is not written.
    let mut want = base();
    want.push(("passwd", file(b"root::0:0::/:/bin/sh\n")));
    Site::new().neutralised(&docker("symlink-overwrite.tar"), &want);
}

#[test]
fn bad_hardlinks_are_refused() {
    for (name, why) in [
        (
            "hardlink-dotdot.tar",
            r#"hard link "link" points to "../outside", outside the image root"#,
        ),
        (
            "hardlink-absent.tar",
            r#"hard link "link" points to "etc/nothing", which does not exist"#,
        ),
        (
            "hardlink-dir.tar",
            r#"hard link "link" points to the directory "etc""#,
        ),
        // An absolute target, and one through a symlink pointing out, are looked up in the
        // image, never on the host.
        (
            "hardlink-absolute.tar",
            r#"hard link "link" points to "/etc/shadow", which does not exist"#,
        ),
        (
            "hardlink-through-symlink.tar",
            r#"hard link "link" points to "up/etc/shadow", which does not exist"#,
        ),
    ] {
        let site = Site::new();
        site.refused(
            &docker(name),
            &[],
            &[&format!("layer {}: ", layer_digest(name, 0)), why],
        );
    }
}

#[test]
fn invalid_whiteouts_are_refused() {
    for (name, path, why) in [
        ("whiteout-dotdot.tar", ".wh...", "it names no file"),
        ("whiteout-empty.tar", "etc/.wh.", "it names no file"),
        (
            "whiteout-opaque-dir.tar",
            "etc/.wh..wh..opq/x",
            "a whiteout name cannot be a directory",
        ),
        (
            "whiteout-reserved.tar",
            "etc/.wh..wh.plnk",
            "the prefix .wh..wh. is reserved",
        ),
    ] {
        let site = Site::new();
        site.refused(
            &docker(name),
            &[],
            &[
                &format!("layer {}", layer_digest(name, 1)),
                &format!("has an invalid whiteout {path:?}: {why}"),
            ],
        );
    }
    let site = Site::new();
    site.refused(
        &docker("whiteout-escape.tar"),
        &[],
        &[
            &format!("layer {}", layer_digest("whiteout-escape.tar", 1)),
            r#"has an entry "../.wh.etc" that leaves the image root"#,
        ],
    );
}

#[test]
fn whiteouts_through_a_symlink_pointing_out_act_inside_the_root() {
    // `up -> ../../../etc` resolves to /etc of the image: its hostname is removed there.
    Site::new().neutralised(
        &docker("whiteout-through-symlink.tar"),
        &[("etc", dir()), ("up", symlink("../../../etc"))],
    );
}

#[test]
fn diff_id_mismatches_are_refused() {
    let wrong = wrong_diff_id();
    let name = "diffid-plain.tar";
    let site = Site::new();
    site.refused(
        &docker(name),
        &[],
        &[&format!(
            "layer 0/layer.tar of {} is an uncompressed tar with digest {}, but the config gives diff_id {wrong}",
            hostile(name).display(),
            layer_digest(name, 0)
        )],
    );

    let name = "diffid-gzip.tar";
    let layer = &members(&hostile(name))["0/layer.tar"];
    let site = Site::new();
    site.refused(
        &docker(name),
        &[],
        &[&format!(
            "layer {} has DiffID {}, but the image configuration says {wrong}",
            digest(layer),
            digest(&gunzip(layer))
        )],
    );

    let name = "diffid-oci.tar";
    let (_, _, layer) = oci_digests(name);
    let blob = &members(&hostile(name))[&format!("blobs/sha256/{}", &layer[7..])];
    let site = Site::new();
    site.refused(
        &oci_archive(name),
        &[],
        &[&format!(
            "layer {layer} has DiffID {}, but the image configuration says {wrong}",
            digest(&gunzip(blob))
        )],
    );
}

#[test]
fn missing_layers_are_refused() {
    let name = "missing-layer.tar";
    Site::new().refused(
        &docker(name),
        &[],
        &[&format!(
            "{} has no member 1/layer.tar",
            hostile(name).display()
        )],
    );
    for (source, name, which) in [
        (
            oci_archive("missing-blob-oci.tar"),
            "missing-blob-oci.tar",
            2,
        ),
        (
            oci_archive("missing-config-oci.tar"),
            "missing-config-oci.tar",
            1,
        ),
        (oci_dir("missing-blob-layout"), "missing-blob-layout", 2),
    ] {
        let (_, config, layer) = oci_digests(name);
        let absent = if which == 1 { config } else { layer };
        Site::new().refused(
            &source,
            &[],
            &[&format!("{} has no blob {absent}", hostile(name).display())],
        );
    }
}

#[test]
fn oversize_documents_are_refused() {
    const MAX: u64 = 4 * 1024 * 1024;
    let over = format!("{} bytes, more than the {MAX} allowed", MAX + 1);
    let name = "oversize-manifest-json.tar.gz";
    Site::new().refused(
        &docker(name),
        &[],
        &[
            &format!("member manifest.json of {}", hostile(name).display()),
            &over,
        ],
    );
    let name = "oversize-config.tar.gz";
    let config = members(&hostile(name))
        .into_keys()
        .find(|k| k.ends_with(".json") && k != "manifest.json")
        .unwrap();
    Site::new().refused(
        &docker(name),
        &[],
        &[&format!("member {config} of"), &over, "JSON document"],
    );
    let name = "oversize-index-oci.tar.gz";
    Site::new().refused(
        &oci_archive(name),
        &[],
        &[&format!(
            "index.json of {} is larger than the {MAX} bytes allowed",
            hostile(name).display()
        )],
    );
    let name = "oversize-config-oci.tar.gz";
    let (_, config, _) = oci_digests(name);
    Site::new().refused(
        &oci_archive(name),
        &[],
        &[&format!(
            "config {config} in {} is {over}",
            hostile(name).display()
        )],
    );
    // Descriptors announcing more than the limit: refused before anything is read.
    for (name, what) in [
        ("oversize-manifest-layout", "manifest"),
        ("oversize-config-layout", "config"),
    ] {
        let (manifest, config, _) = oci_digests(name);
        let d = if what == "manifest" { manifest } else { config };
        Site::new().refused(
            &oci_dir(name),
            &[],
            &[&format!(
                "{what} {d} in {} is {over}",
                hostile(name).display()
            )],
        );
    }
}

#[test]
fn tar_header_desync_is_refused() {
    for (name, member, pax, field) in [
        ("desync-pax-larger.tar", "big", 1536, 5),
        ("desync-pax-smaller.tar", "small", 0, 1024),
    ] {
        Site::new().refused(
            &docker(name),
            &[],
            &[&format!(
                "layer {} has a malformed tar entry {member:?}: its pax size {pax} disagrees with the size field of its header ({field})",
                layer_digest(name, 0)
            )],
        );
    }
    let name = "truncated-member.tar";
    Site::new().refused(
        &docker(name),
        &[],
        &[&format!(
            "layer {} is not a valid gzip tar stream: the tar stream ends inside an entry",
            layer_digest(name, 0)
        )],
    );
}

/// The archive transports read their own tar with the reader the layers are read with, so a
/// malformed archive is refused for the reason a malformed layer is.
#[test]
fn malformed_archives_are_refused_as_malformed_layers_are() {
    const PAX: &str =
        "malformed tar entry \"PaxHeader\": a pax header of 1048593 bytes (at most 1048576 are accepted)";
    const CUT: &str = "the tar stream ends inside an entry";
    for (source, name, needle) in [
        (
            docker("archive-pax-oversize-docker.tar.gz"),
            "archive-pax-oversize-docker.tar.gz",
            PAX,
        ),
        (
            oci_archive("archive-pax-oversize-oci.tar.gz"),
            "archive-pax-oversize-oci.tar.gz",
            PAX,
        ),
        (
            docker("archive-truncated-docker.tar"),
            "archive-truncated-docker.tar",
            CUT,
        ),
        (
            oci_archive("archive-truncated-oci.tar"),
            "archive-truncated-oci.tar",
            CUT,
        ),
    ] {
        Site::new().refused(
            &source,
            &[],
            &[&hostile(name).display().to_string(), needle],
        );
    }
}

/// A docker-archive of one image whose only layer is `layer`, written to `path`.
fn write_docker_archive(path: &Path, layer: &[u8]) {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        digest(b"")
    );
    let manifest =
        r#"[{"Config":"config.json","RepoTags":["bomb:latest"],"Layers":["layer.tar"]}]"#;
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in [
        ("manifest.json", manifest.as_bytes()),
        ("config.json", config.as_bytes()),
        ("layer.tar", layer),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    b.into_inner().unwrap().flush().unwrap();
}

/// The header of a tar member `bomb` announcing `size` bytes.
fn bomb_header(size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path("bomb").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

#[test]
fn decompression_bombs_stop_at_the_size_cap() {
    // 4 GiB of zeros behind a header announcing them: gzip (4 MiB, as concatenated members of
    // 1 MiB each) and zstd (concatenated frames of 16 MiB each, a few hundred KiB in all).
    const ANNOUNCED: u64 = 4 << 30;
    let gzip = {
        let member = |data: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        };
        let zeros = member(&vec![0u8; 1 << 20]);
        let mut out = member(&bomb_header(ANNOUNCED));
        for _ in 0..ANNOUNCED >> 20 {
            out.extend_from_slice(&zeros);
        }
        out
    };
    let zstd = {
        let zeros = zstd::bulk::compress(&vec![0u8; 16 << 20], 19).unwrap();
        let mut out = zstd::bulk::compress(&bomb_header(ANNOUNCED), 3).unwrap();
        for _ in 0..ANNOUNCED >> 24 {
            out.extend_from_slice(&zeros);
        }
        out
    };
    assert!(gzip.len() < 8 << 20 && zstd.len() < 1 << 20);
    for (what, layer) in [("gzip", gzip), ("zstd", zstd)] {
        let site = Site::new();
        let bombs = tempfile::tempdir().unwrap();
        let archive = bombs.path().join(format!("{what}-bomb.tar"));
        write_docker_archive(&archive, &layer);
        let started = std::time::Instant::now();
        site.refused(
            &format!("docker-archive:{}", archive.display()),
            &["--max-size", "64M"],
            &[&format!(
                "the image is larger than the limit of {} bytes (--max-size), passed in layer {}",
                64 << 20,
                digest(&layer)
            )],
        );
        eprintln!("{what} bomb refused in {:?}", started.elapsed());
    }
}

#[test]
fn a_compressed_archive_with_a_huge_member_is_refused_before_copying() {
    // `docker save | gzip` of an image whose layer member is 1 GiB of zeros: 1 MiB on disk.
    const MEMBER: u64 = 1 << 30;
    let gz = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        digest(b"")
    );
    let manifest =
        r#"[{"Config":"config.json","RepoTags":["bomb:latest"],"Layers":["layer.tar"]}]"#;
    let mut head = Vec::new();
    for (name, data) in [
        ("manifest.json", manifest.as_bytes()),
        ("config.json", config.as_bytes()),
    ] {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        let mut bytes = b.into_inner().unwrap();
        bytes.truncate(bytes.len() - 1024); // no end-of-archive yet
        head.extend_from_slice(&bytes);
    }
    let mut h = tar::Header::new_ustar();
    h.set_path("layer.tar").unwrap();
    h.set_size(MEMBER);
    h.set_mode(0o644);
    h.set_cksum();
    head.extend_from_slice(h.as_bytes());
    let mut archive = gz(&head);
    let zeros = gz(&vec![0u8; 1 << 20]);
    for _ in 0..MEMBER >> 20 {
        archive.extend_from_slice(&zeros);
    }
    archive.extend_from_slice(&gz(&[0u8; 1024]));
    assert!(archive.len() < 4 << 20);
    let site = Site::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.tar.gz");
    fs::write(&path, &archive).unwrap();
    let started = std::time::Instant::now();
    site.refused(
        &format!("docker-archive:{}", path.display()),
        &["--max-size", "64M"],
        &[&format!(
            "member layer.tar of {} is {MEMBER} bytes, more than the limit of {} bytes (--max-size)",
            path.display(),
            64 << 20
        )],
    );
    eprintln!("refused in {:?}", started.elapsed());
}
