//! The shared conformance corpus: `docker save` archives written by others, each with the tree
//! it must flatten to (or the refusal it must give).

use crate::util::*;

/// A regular file with the first 12 hex digits of its sha256 (and its mode when the corpus
/// README names it).
fn file<'a>(path: &'a str, sha12: &'a str) -> (&'a str, &'a str, Option<u32>) {
    (path, sha12, None)
}

fn check(
    archive: &str,
    selector: Option<&str>,
    dirs: &[&str],
    files: &[(&str, &str, Option<u32>)],
    symlinks: &[(&str, &str)],
) {
    let s = Scratch::new();
    let mut src = format!("docker-archive:{}", conformance(archive).display());
    if let Some(sel) = selector {
        src.push(':');
        src.push_str(sel);
    }
    let out = s.oci2uk(&["build", &src, "--format", "tar", "-o", "out.tar", "--quiet"]);
    assert_ok(&out);
    let tree = tree_from_tar(&std::fs::read(s.path().join("work/out.tar")).unwrap());
    let mut expected: Vec<&str> = dirs.to_vec();
    expected.extend(files.iter().map(|f| f.0));
    expected.extend(symlinks.iter().map(|l| l.0));
    expected.sort();
    let got: Vec<&str> = tree.keys().map(String::as_str).collect();
    assert_eq!(got, expected, "{archive}: paths");
    for d in dirs {
        assert_eq!(tree[*d].kind, Kind::Dir, "{archive}: {d}");
    }
    for (p, sha12, mode) in files {
        match &tree[*p].kind {
            Kind::File { sha256, .. } => assert_eq!(&sha256[..12], *sha12, "{archive}: {p}"),
            k => panic!("{archive}: {p} is {k:?}"),
        }
        if let Some(m) = mode {
            assert_eq!(tree[*p].mode, *m, "{archive}: mode of {p}");
        }
    }
    for (p, target) in symlinks {
        assert_eq!(
            tree[*p].kind,
            Kind::Symlink(target.to_string()),
            "{archive}: {p}"
        );
    }
}

#[test]
fn whiteout_dir() {
    check(
        "whiteout_dir.tar",
        None,
        &["a", "b"],
        &[file("a/baz", "e3b0c44298fc"), file("b/bar", "e3b0c44298fc")],
        &[],
    );
}

#[test]
fn whiteout_image() {
    check(
        "whiteout_image.tar",
        None,
        &[],
        &[file("bar.txt", "7d865e959b24")],
        &[],
    );
}

#[test]
fn overwritten_file() {
    check(
        "overwritten_file.tar",
        None,
        &[],
        &[file("bar.txt", "7d865e959b24")],
        &[("foo.txt", "bar.txt")],
    );
}

#[test]
fn source_image() {
    check(
        "source_image.tar",
        None,
        &[],
        &[file("bar", "7d865e959b24"), file("foo", "b5bb9d8014a0")],
        &[],
    );
}

#[test]
fn hello_world_v25() {
    check(
        "hello-world-v25.tar",
        None,
        &[],
        &[file("hello", "4bdd840f996a")],
        &[],
    );
}

#[test]
fn test_image_1() {
    check(
        "test_image_1.tar",
        None,
        &[],
        &[file("bar", "7d865e959b24"), file("foo", "b5bb9d8014a0")],
        &[],
    );
}

#[test]
fn test_link_selectors() {
    check(
        "test_link.tar",
        Some("bazel/v1/tarball:test_image_1"),
        &[],
        &[
            ("bar", "7d865e959b24", Some(0o555)),
            ("foo", "b5bb9d8014a0", Some(0o555)),
        ],
        &[],
    );
    check(
        "test_link.tar",
        Some("bazel/v1/tarball:test_image_3"),
        &[],
        &[
            ("bar", "7d865e959b24", Some(0o555)),
            ("foo", "b5bb9d8014a0", Some(0o555)),
            ("test", "5891b5b522d5", Some(0o640)),
        ],
        &[],
    );
}

#[test]
fn test_link_without_selector_names_both_images() {
    let s = Scratch::new();
    let src = format!("docker-archive:{}", conformance("test_link.tar").display());
    let out = s.oci2uk(&["build", &src, "--format", "tar"]);
    assert_fails(&out, 1, &["test_image_1", "test_image_3"]);
    assert!(s.outputs().is_empty(), "no output left: {:?}", s.outputs());
}

#[test]
fn broken_archives_are_refused() {
    for (name, needle) in [
        ("no_manifest.tar", "manifest.json"),
        ("null_manifest.tar", "manifest.json"),
    ] {
        let s = Scratch::new();
        let src = format!("docker-archive:{}", conformance(name).display());
        let out = s.oci2uk(&["build", &src, "--format", "tar"]);
        assert_fails(&out, 1, &[name, needle]);
        assert!(
            s.outputs().is_empty(),
            "{name}: no output left: {:?}",
            s.outputs()
        );
    }
}
