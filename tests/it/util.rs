//! Helpers: running the binary, and reading trees from a tar or a directory so that two
//! independent flattenings can be compared entry by entry.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

/// What a tree entry is, with everything the comparison checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { size: u64, sha256: String },
    Symlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One entry: kind, permission bits, owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// A tree: relative path (no leading `./`, no trailing `/`) to entry.
pub type Tree = BTreeMap<String, Entry>;

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Reads a tar as written by `oci2uk --format tar`; hardlink members take their target's
/// content, as they would on disk.
pub fn tree_from_tar(bytes: &[u8]) -> Tree {
    let mut tree = Tree::new();
    let mut ar = tar::Archive::new(bytes);
    for e in ar.entries().expect("tar") {
        let mut e = e.expect("tar entry");
        let path = e.path().expect("path").to_string_lossy().into_owned();
        let path = path.trim_end_matches('/').to_string();
        let h = e.header().clone();
        let mode = h.mode().unwrap() & 0o7777;
        let (uid, gid) = (h.uid().unwrap(), h.gid().unwrap());
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                Kind::File {
                    size: data.len() as u64,
                    sha256: sha256_hex(&data),
                }
            }
            tar::EntryType::Symlink => Kind::Symlink(
                e.link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            ),
            tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let t = tree.get(target.trim_end_matches('/')).unwrap_or_else(|| {
                    panic!("hardlink {path} to {target}, which comes later or not at all")
                });
                t.kind.clone()
            }
            tar::EntryType::Char => Kind::Char(
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
            ),
            tar::EntryType::Block => Kind::Block(
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
            ),
            tar::EntryType::Fifo => Kind::Fifo,
            other => panic!("unexpected entry type {other:?} at {path}"),
        };
        let prev = tree.insert(
            path.clone(),
            Entry {
                kind,
                mode,
                uid,
                gid,
            },
        );
        assert!(prev.is_none(), "duplicate member {path}");
    }
    tree
}

/// Reads a directory tree (as `umoci raw unpack` leaves it).
pub fn tree_from_dir(root: &Path) -> Tree {
    let mut tree = Tree::new();
    walk(root, root, &mut tree);
    tree
}

fn walk(root: &Path, dir: &Path, tree: &mut Tree) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            let data = fs::read(&p).unwrap();
            Kind::File {
                size: data.len() as u64,
                sha256: sha256_hex(&data),
            }
        } else if ft.is_symlink() {
            Kind::Symlink(fs::read_link(&p).unwrap().to_string_lossy().into_owned())
        } else if ft.is_char_device() {
            Kind::Char(major(md.rdev()), minor(md.rdev()))
        } else if ft.is_block_device() {
            Kind::Block(major(md.rdev()), minor(md.rdev()))
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            panic!("unexpected file type at {}", p.display())
        };
        tree.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid() as u64,
                gid: md.gid() as u64,
            },
        );
        if ft.is_dir() {
            walk(root, &p, tree);
        }
    }
}

fn major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

/// Asserts two trees are equal, listing every difference (up to 40) on failure.
pub fn assert_same_tree(ours: &Tree, theirs: &Tree, what: &str) {
    let mut diffs = Vec::new();
    for (p, e) in ours {
        match theirs.get(p) {
            None => diffs.push(format!("only in oci2uk: {p} {e:?}")),
            Some(t) if t != e => {
                diffs.push(format!("differs: {p}\n   oci2uk: {e:?}\n   other:  {t:?}"))
            }
            _ => {}
        }
    }
    for (p, e) in theirs {
        if !ours.contains_key(p) {
            diffs.push(format!("missing from oci2uk: {p} {e:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences (of {} vs {} entries):\n{}",
        diffs.len(),
        ours.len(),
        theirs.len(),
        diffs
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A scratch area for one test: a working directory and a private cache.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

/// This test process's directory for what it builds once and its tests share (a baked file, an
/// unpacked image): such a thing lives in a static, which is never dropped, so a temporary
/// directory of its own would stay in /tmp after every run. This one is under cargo's scratch
/// directory for integration tests (`target/tmp/it-PID`), and the first call removes those of
/// test processes that have ended.
pub fn process_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for entry in fs::read_dir(base).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let pid = name.to_str().and_then(|n| n.strip_prefix("it-"));
            if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = base.join(format!("it-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    })
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A scratch directory for the whole test process (see [`process_dir`]).
    pub fn for_the_process() -> Self {
        Self {
            dir: tempfile::tempdir_in(process_dir()).unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Runs `oci2uk ARGS` in the scratch directory with its private cache.
    pub fn oci2uk(&self, args: &[&str]) -> Output {
        let work = self.dir.path().join("work");
        fs::create_dir_all(&work).unwrap();
        Command::new(env!("CARGO_BIN_EXE_oci2uk"))
            .args(args)
            .current_dir(&work)
            .env("OCI2UK_CACHE", self.cache())
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .expect("run oci2uk")
    }

    /// The files the command left in its working directory.
    pub fn outputs(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.path().join("work"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Asserts a command succeeded, showing its stderr otherwise.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts a command failed with status `code` and exactly one line on stderr containing all
/// of `needles`; returns that line.
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one clear line expected, got:\n{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in: {}", lines[0]);
    }
    lines[0].to_string()
}

/// The shared corpus beside the repository.
pub fn conformance(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance/go-containerregistry")
        .join(name)
}

/// A test registry address from the environment `testregistry/up.sh` writes.
pub fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run testregistry/up.sh and source /tmp/oci2uk-testreg/env")
    })
}

/// VMs under TCG are heavy on a two-core machine: the VM tests of every module take this lock,
/// so that one guest boots at a time.
pub fn one_vm() -> std::sync::MutexGuard<'static, ()> {
    static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
