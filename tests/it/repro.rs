//! Reproducible output: the nginx fixture built to each format with an empty cache and again
//! with everything cached gives the same bytes; `SOURCE_DATE_EPOCH` changes the bytes exactly
//! where it clamps something; the sha256 that `build` prints and puts in `--json` is the
//! file's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use crate::util::*;

/// The baked TSC frequency, pinned so that the ELF does not depend on this host's CPU.
const TSC_KHZ: &str = "2000000";
/// Before every file of the fixture (2001): clamps them all.
const EARLY: &str = "1000000000";
/// Also before every file, but another second (2017).
const LATER: &str = "1500000000";
/// After every file of the fixture (2096): clamps nothing.
const FUTURE: &str = "4000000000";

fn nginx() -> String {
    format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"))
}

fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// One build: its output file, the sha256 the binary reported, and its log.
struct Built {
    path: PathBuf,
    sha256: String,
    stderr: String,
}

/// Builds the nginx fixture to `format` with `cache`, `SOURCE_DATE_EPOCH` as given, and
/// checks what `--json` reports against the file. `OCI2UK_LOG=debug` shows where the
/// initramfs came from.
fn build(dir: &Path, cache: &Path, format: &str, name: &str, epoch: Option<&str>) -> Built {
    let out = dir.join(name);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci2uk"));
    cmd.args(["build", &nginx(), "--format", format, "--json", "-o"])
        .arg(&out)
        .arg("--cache")
        .arg(cache)
        .env("OCI2UK_TSC_KHZ", TSC_KHZ)
        .env("OCI2UK_LOG", "oci2uk=debug")
        .env("NO_COLOR", "1")
        .env_remove("OCI2UK_CACHE")
        .env_remove("SOURCE_DATE_EPOCH");
    if let Some(e) = epoch {
        cmd.env("SOURCE_DATE_EPOCH", e);
    }
    let output: Output = cmd.output().expect("run oci2uk");
    assert_ok(&output);
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("--json prints one object");
    let reported = json["sha256"]
        .as_str()
        .expect("sha256 in --json")
        .to_string();
    let file = if format == "bundle" {
        out.join("nginx.elf")
    } else {
        out.clone()
    };
    assert_eq!(
        reported,
        sha256_file(&file),
        "--json sha256 is the file's ({format})"
    );
    assert_eq!(
        json["size"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    Built {
        path: out,
        sha256: reported,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn from_cache(b: &Built) -> bool {
    b.stderr.contains("the initramfs is in the cache")
}

/// Cold with an empty cache, warm with the same cache, and cold again with another empty
/// cache: three equal files. Returns the sha256.
fn cold_warm_cold(format: &str) -> String {
    let s = Scratch::new();
    let (c1, c2) = (s.path().join("cache1"), s.path().join("cache2"));
    let cold = build(s.path(), &c1, format, "cold", None);
    let warm = build(s.path(), &c1, format, "warm", None);
    let other = build(s.path(), &c2, format, "other", None);
    assert_eq!(cold.sha256, warm.sha256, "{format}: cold and warm cache");
    assert_eq!(cold.sha256, other.sha256, "{format}: two empty caches");
    if format != "tar" {
        assert!(!from_cache(&cold), "{format}: a cold build flattens");
        assert!(
            from_cache(&warm),
            "{format}: a warm build reuses the initramfs"
        );
    }
    cold.sha256
}

#[test]
fn tar_is_reproducible() {
    let sha = cold_warm_cold("tar");
    // A SOURCE_DATE_EPOCH after every mtime clamps nothing; one before them changes the
    // bytes, the same way every time.
    let s = Scratch::new();
    let c = s.path().join("cache");
    assert_eq!(
        build(s.path(), &c, "tar", "future", Some(FUTURE)).sha256,
        sha
    );
    let early = build(s.path(), &c, "tar", "early", Some(EARLY));
    assert_ne!(early.sha256, sha, "SOURCE_DATE_EPOCH clamps the mtimes");
    let again = build(
        s.path(),
        &s.path().join("cache2"),
        "tar",
        "again",
        Some(EARLY),
    );
    assert_eq!(early.sha256, again.sha256);
    // Every member's mtime is the epoch or earlier.
    let bytes = std::fs::read(&early.path).unwrap();
    let mut ar = tar::Archive::new(&bytes[..]);
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        assert!(e.header().mtime().unwrap() <= EARLY.parse().unwrap());
    }
}

#[test]
fn initrd_is_reproducible() {
    epoch_changes("initrd", cold_warm_cold("initrd"));
}

#[test]
fn elf_is_reproducible() {
    let sha = cold_warm_cold("elf");
    epoch_changes("elf", sha);
}

/// A warm ELF build copies the baked file the cold one kept; a kept file that was damaged is
/// found out (the cache checks it) and baked again, to the same bytes.
#[test]
fn a_kept_baked_file_is_reused_and_checked() {
    let s = Scratch::new();
    let cache = s.path().join("cache");
    let cold = build(s.path(), &cache, "elf", "cold", None);
    assert!(!cold.stderr.contains("the baked file is in the cache"));
    let warm = build(s.path(), &cache, "elf", "warm", None);
    assert!(
        warm.stderr.contains("the baked file is in the cache"),
        "{}",
        warm.stderr
    );
    assert_eq!(warm.sha256, cold.sha256);
    let kept = cache
        .join("blobs/sha256")
        .join(cold.sha256.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&kept).expect("the baked file is a blob");
    bytes[4096] ^= 0xff;
    std::fs::write(&kept, &bytes).unwrap();
    let again = build(s.path(), &cache, "elf", "again", None);
    assert!(
        !again.stderr.contains("the baked file is in the cache"),
        "{}",
        again.stderr
    );
    assert_eq!(again.sha256, cold.sha256, "baked again, to the same bytes");
    let fourth = build(s.path(), &cache, "elf", "fourth", None);
    assert!(fourth.stderr.contains("the baked file is in the cache"));
    assert_eq!(fourth.sha256, cold.sha256);
}

/// With a warm cache, a new SOURCE_DATE_EPOCH must not reuse the initramfs made for another:
/// each epoch gives its own bytes, equal to a cold build's with that epoch.
fn epoch_changes(format: &str, plain: String) {
    let s = Scratch::new();
    let warm = s.path().join("cache-warm");
    let base = build(s.path(), &warm, format, "base", None);
    assert_eq!(base.sha256, plain);
    let early = build(s.path(), &warm, format, "early", Some(EARLY));
    let later = build(s.path(), &warm, format, "later", Some(LATER));
    assert!(
        !from_cache(&early) && !from_cache(&later),
        "{format}: a new key"
    );
    assert_ne!(early.sha256, plain, "{format}: the epoch is in the bytes");
    assert_ne!(
        early.sha256, later.sha256,
        "{format}: each epoch its own bytes"
    );
    let cold = build(
        s.path(),
        &s.path().join("cache-cold"),
        format,
        "cold",
        Some(EARLY),
    );
    assert_eq!(
        cold.sha256, early.sha256,
        "{format}: cold and warm with an epoch"
    );
    let again = build(s.path(), &warm, format, "again", Some(EARLY));
    assert!(from_cache(&again));
    assert_eq!(again.sha256, early.sha256);
}

fn files(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                sha256_file(&e.path()),
            )
        })
        .collect()
}

#[test]
fn bundle_is_reproducible() {
    let s = Scratch::new();
    let (c1, c2) = (s.path().join("cache1"), s.path().join("cache2"));
    // The same destination each time: the Xen configurations name the bundle's absolute path.
    let cold = build(s.path(), &c1, "bundle", "out.bundle", None);
    let want = files(&cold.path);
    let warm = build(s.path(), &c1, "bundle", "out.bundle", None);
    assert!(from_cache(&warm));
    assert_eq!(files(&warm.path), want, "cold and warm cache");
    let other = build(s.path(), &c2, "bundle", "out.bundle", None);
    assert_eq!(files(&other.path), want, "two empty caches");
    assert!(want.contains_key("initrd") && want.contains_key("vmlinux"));
    assert_eq!(cold.sha256, want["nginx.elf"]);
    // The bundle's command line carries the pinned TSC frequency.
    let cmdline = std::fs::read_to_string(cold.path.join("cmdline")).unwrap();
    assert!(
        cmdline.contains(&format!("tsc_early_khz={TSC_KHZ}")),
        "{cmdline}"
    );
}

#[test]
fn printed_sha256_is_the_files() {
    let s = Scratch::new();
    let out = s.oci2uk(&["build", &nginx(), "--format", "tar", "-o", "out.tar"]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let sha = sha256_file(&s.path().join("work/out.tar"));
    assert!(
        stderr.contains(&format!("sha256:{sha}")),
        "the summary line names the file's sha256: {stderr}"
    );
}
