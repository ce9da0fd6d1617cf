//! The command line's contract: exit statuses, one clear error line, nothing left behind.

use crate::util::*;

#[test]
fn usage_errors_exit_2() {
    let s = Scratch::new();
    let out = s.oci2uk(&["build"]);
    assert_eq!(out.status.code(), Some(2));
    let out = s.oci2uk(&["build", "nginx", "--format", "zip"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("zip"));
    let out = s.oci2uk(&["build", "nginx", "--max-size", "12Q"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-size"));
}

#[test]
fn bad_reference_is_one_clear_line() {
    let s = Scratch::new();
    let out = s.oci2uk(&["build", "Not/A:Valid:Ref", "--format", "tar"]);
    assert_fails(&out, 1, &["Not/A:Valid:Ref"]);
    let out = s.oci2uk(&["build", "nginx", "--format", "tar", "--platform", "linux"]);
    assert_fails(&out, 1, &["platform", "\"linux\""]);
    assert!(s.outputs().is_empty());
}

#[test]
fn missing_archive_names_the_file() {
    let s = Scratch::new();
    let out = s.oci2uk(&[
        "build",
        "docker-archive:/nonexistent/app.tar",
        "--format",
        "tar",
    ]);
    assert_fails(&out, 1, &["/nonexistent/app.tar"]);
    let out = s.oci2uk(&["build", "oci:/nonexistent/layout:x", "--format", "tar"]);
    assert_fails(&out, 1, &["/nonexistent/layout"]);
    assert!(s.outputs().is_empty());
}

#[test]
fn bare_image_means_build_and_names_the_output() {
    let s = Scratch::new();
    let src = format!(
        "docker-archive:{}",
        conformance("source_image.tar").display()
    );
    let out = s.oci2uk(&[&src, "--format", "tar", "--json"]);
    assert_ok(&out);
    assert_eq!(s.outputs(), vec!["source_image.tar".to_string()]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    let data = std::fs::read(s.path().join("work/source_image.tar")).unwrap();
    assert_eq!(v["output"], "source_image.tar");
    assert_eq!(
        v["sha256"].as_str().unwrap(),
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
    );
    assert_eq!(v["size"].as_u64().unwrap(), data.len() as u64);
    assert!(v["manifest_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
}

#[test]
fn stdout_output_is_the_same_bytes() {
    let s = Scratch::new();
    let src = format!(
        "docker-archive:{}",
        conformance("source_image.tar").display()
    );
    let file = s.oci2uk(&["build", &src, "--format", "tar", "-o", "f.tar", "--quiet"]);
    assert_ok(&file);
    let piped = s.oci2uk(&["build", &src, "--format", "tar", "-o", "-", "--quiet"]);
    assert_ok(&piped);
    assert_eq!(
        piped.stdout,
        std::fs::read(s.path().join("work/f.tar")).unwrap()
    );
    assert!(
        piped.stderr.is_empty(),
        "--quiet prints nothing: {}",
        String::from_utf8_lossy(&piped.stderr)
    );
}

#[test]
fn failure_keeps_an_existing_output() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path().join("work")).unwrap();
    std::fs::write(s.path().join("work/no_manifest.tar"), b"previous").unwrap();
    let src = format!(
        "docker-archive:{}",
        conformance("no_manifest.tar").display()
    );
    let out = s.oci2uk(&[&src, "--format", "tar"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        std::fs::read(s.path().join("work/no_manifest.tar")).unwrap(),
        b"previous"
    );
    assert_eq!(
        s.outputs(),
        vec!["no_manifest.tar".to_string()],
        "no temporary left"
    );
}

#[test]
fn a_missing_kernel_is_named() {
    let s = Scratch::new();
    let src = format!(
        "docker-archive:{}",
        conformance("source_image.tar").display()
    );
    let out = s.oci2uk(&[&src, "--kernel", "/nonexistent/vmlinuz"]);
    assert_fails(&out, 1, &["/nonexistent/vmlinuz"]);
    assert!(s.outputs().is_empty());
}

/// `oci2uk ARGS` in `s`'s working directory with `envs` set.
fn oci2uk_with(s: &Scratch, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let work = s.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_oci2uk"))
        .args(args)
        .current_dir(&work)
        .env("OCI2UK_CACHE", s.cache())
        .env_remove("OCI2UK_QEMU")
        .envs(envs.iter().copied())
        .output()
        .expect("run oci2uk")
}

#[test]
fn a_missing_qemu_is_one_line_and_125() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path().join("work")).unwrap();
    std::fs::write(s.path().join("work/app.elf"), b"not booted").unwrap();
    let out = oci2uk_with(&s, &["run", "./app.elf"], &[("PATH", "/nonexistent")]);
    assert_fails(
        &out,
        125,
        &["qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"],
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_bad_sysctl_names_the_flag_and_the_key() {
    let s = Scratch::new();
    for (cmd, bad) in [
        ("run", "../../etc/passwd=x"),
        ("run", "vm..overcommit_memory=1"),
        ("build", "vm/overcommit_memory=1"),
        ("build", "vm.overcommit_memory"),
    ] {
        let out = s.oci2uk(&[cmd, "./app.elf", "--sysctl", bad]);
        assert_eq!(out.status.code(), Some(2), "{cmd} --sysctl {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--sysctl"), "{err}");
        let key = bad.split('=').next().unwrap();
        assert!(err.contains(key), "{key} not in {err}");
    }
}

#[test]
fn a_kernel_that_cannot_be_found_is_named() {
    let s = Scratch::new();
    let src = format!(
        "docker-archive:{}",
        conformance("source_image.tar").display()
    );
    let env = [("OCI2UK_KERNEL", "/nonexistent/vmlinuz")];
    let out = oci2uk_with(&s, &[&src], &env);
    assert_fails(&out, 1, &["OCI2UK_KERNEL=/nonexistent/vmlinuz"]);
    let out = oci2uk_with(&s, &["run", &src], &env);
    assert_fails(&out, 125, &["OCI2UK_KERNEL=/nonexistent/vmlinuz"]);
    let out = oci2uk_with(&s, &["run", "./missing.elf"], &[]);
    assert_fails(&out, 125, &["./missing.elf"]);
    assert!(s.outputs().is_empty());
}
