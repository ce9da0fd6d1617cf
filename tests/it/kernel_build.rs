//! `oci2uk kernel build` when it cannot build: a missing source is one clear line, and a
//! tarball that is not a Linux tree fails naming why or the step, leaving nothing in the cache.
//! (A real kernel build is the VM tests' part.)

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::util::*;

/// A tar of `files` (path, contents) in the scratch directory.
fn tarball(s: &Scratch, files: &[(&str, &str)]) -> PathBuf {
    let tree = s.path().join("tree");
    for (path, body) in files {
        let path = tree.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
    }
    let tar = s.path().join("source.tar");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success());
    tar
}

/// `kernel build ARGS` with the scratch cache named.
fn kernel_build(s: &Scratch, args: &[&str]) -> std::process::Output {
    let cache = s.cache();
    let mut all = vec!["kernel", "build", "--cache", cache.to_str().unwrap()];
    all.extend_from_slice(args);
    s.oci2uk(&all)
}

/// What the cache holds under `dir` (empty when it does not exist).
fn cache_entries(s: &Scratch, dir: &str) -> Vec<String> {
    fs::read_dir(s.cache().join(dir))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_missing_source_is_one_clear_line() {
    let s = Scratch::new();
    let out = kernel_build(&s, &["--source", "/nonexistent/linux-source.tar.xz"]);
    assert_fails(
        &out,
        1,
        &["no Linux source at /nonexistent/linux-source.tar.xz"],
    );
    assert!(cache_entries(&s, "kernels").is_empty());
}

#[test]
fn a_tarball_without_linux_is_named() {
    let s = Scratch::new();
    let tar = tarball(&s, &[("notlinux/README", "no kernel here\n")]);
    let out = kernel_build(&s, &["--source", tar.to_str().unwrap(), "--quiet"]);
    assert_fails(
        &out,
        1,
        &[tar.to_str().unwrap(), "holds no Linux source tree"],
    );
    assert!(cache_entries(&s, "kernels").is_empty());
    assert!(cache_entries(&s, "tmp").is_empty());
}

#[test]
fn a_failed_step_is_named_and_leaves_nothing() {
    let s = Scratch::new();
    let makefile = "tinyconfig:\n\t@echo this is no kernel tree\n\t@exit 2\n";
    let tar = tarball(&s, &[("linux/Makefile", makefile), ("linux/Kconfig", "")]);
    let out = kernel_build(&s, &["--source", tar.to_str().unwrap(), "-j1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(
        err.contains("make tinyconfig failed (exit 2); the last lines of the log:"),
        "{err}"
    );
    assert!(err.contains("this is no kernel tree"), "{err}");
    assert!(cache_entries(&s, "kernels").is_empty());
    assert!(cache_entries(&s, "tmp").is_empty());
    // The whole log is kept where the message says.
    let log = s.cache().join("logs/kernel-build.log");
    assert!(err.contains(log.to_str().unwrap()), "{err}");
    assert!(fs::read_to_string(log)
        .unwrap()
        .contains("### make tinyconfig"));
}
