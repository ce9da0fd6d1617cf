//! Volumes, `run -v SRC:DST[:OPTS]`: a disk image keeps what the application wrote for the
//! next run and starts as a copy of the image's directory; a host directory gets the files
//! with the owner the application used; `:ro` refuses writes; a bad SRC or DST is one line.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::Guest;
use crate::util::*;

/// How long one short run may take (TCG on a busy machine).
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// A file of the busybox fixture with `entry` as its entrypoint (a `sh -c` script) and
/// `extra` build flags, baked into the scratch directory as `name`.
fn busybox_elf(s: &Scratch, name: &str, script: &str, extra: &[&str]) -> PathBuf {
    let image = format!("oci:{}:busybox", env("OCI2UK_TEST_LAYOUT"));
    let entry = serde_json::to_string(&["sh", "-c", script]).unwrap();
    let mut args = vec![
        "build",
        &image,
        "--entrypoint",
        &entry,
        "-o",
        name,
        "--quiet",
    ];
    args.extend(extra);
    assert_ok(&s.oci2uk(&args));
    s.path().join("work").join(name)
}

/// `oci2uk run FILE ARGS...` to its end: the exit code and the console.
fn run_to_end(elf: &Path, args: &[&str], console: PathBuf) -> (Option<i32>, String) {
    let mut vm = Guest::run(elf, args, console);
    let st = vm.wait(RUN_TIMEOUT);
    (st.code(), vm.console())
}

#[test]
fn a_disk_image_keeps_what_the_application_wrote() {
    let s = Scratch::new();
    let elf = busybox_elf(
        &s,
        "disk.elf",
        "cat /data/f 2>/dev/null || echo 'no file yet'; echo hello > /data/f; \
         ls -ln /etc2; echo done",
        &[],
    );
    let img = s.path().join("data.img");
    let etc = s.path().join("etc.img");
    let vol = format!("{}:/data", img.display());
    // A new volume over a directory the image has is seeded from it: over /etc the first
    // time, then at /etc2, where the image has nothing, to see what the volume holds.
    let over_etc = format!("{}:/etc:size=64M", etc.display());
    let at_etc2 = format!("{}:/etc2", etc.display());
    let _one = one_vm();
    let (code, first) = run_to_end(&elf, &["-v", &vol, "-v", &over_etc], s.path().join("first"));
    assert_eq!(code, Some(0), "console:\n{first}");
    assert!(first.contains("no file yet"), "console:\n{first}");
    let m = std::fs::metadata(&img).unwrap();
    assert_eq!(m.len(), 1 << 30, "1 GiB without size=");
    assert!(
        m.blocks() * 512 < 64 << 20,
        "sparse: {} bytes used",
        m.blocks() * 512
    );
    assert_eq!(std::fs::metadata(&etc).unwrap().len(), 64 << 20);

    // The second run reads it back; the seeded volume, mounted at /etc2 this time, holds the
    // image's /etc with its owners and modes.
    let (code, second) = run_to_end(&elf, &["-v", &vol, "-v", &at_etc2], s.path().join("second"));
    assert_eq!(code, Some(0), "console:\n{second}");
    assert!(second.contains("hello"), "console:\n{second}");
    assert!(!second.contains("no file yet"), "console:\n{second}");
    for name in ["passwd", "group"] {
        assert!(
            second
                .lines()
                .any(|l| l.starts_with("-rw-r--r--") && l.contains(" 0 ") && l.ends_with(name)),
            "/etc/{name} 0644 root in the seeded volume; console:\n{second}"
        );
    }
    eprintln!(
        "disk volume: {} KiB of 1 GiB used on the host",
        m.blocks() / 2
    );
}

#[test]
fn a_new_disk_volume_is_seeded_once_with_owners_and_modes() {
    // nginx's /var/log holds files of group utmp (43), mode 0660 and 0664, and nginx/ of
    // group adm (4).
    let s = Scratch::new();
    let image = format!("oci:{}:nginx", env("OCI2UK_TEST_LAYOUT"));
    let entry = r#"["sh","-c","ls -ln /var/log; rm /var/log/btmp; echo listed"]"#;
    assert_ok(&s.oci2uk(&[
        "build",
        &image,
        "--entrypoint",
        entry,
        "-o",
        "logs.elf",
        "--quiet",
    ]));
    let elf = s.path().join("work/logs.elf");
    let vol = format!("{}:/var/log", s.path().join("logs.img").display());
    let _one = one_vm();
    let (code, first) = run_to_end(&elf, &["-v", &vol], s.path().join("first"));
    assert_eq!(code, Some(0), "console:\n{first}");
    let line = |console: &str, name: &str| {
        console
            .lines()
            .find(|l| l.ends_with(&format!(" {name}")))
            .map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        line(&first, "btmp").as_deref(),
        Some("-rw-rw---- 1 0 43"),
        "console:\n{first}"
    );
    assert_eq!(
        line(&first, "wtmp").as_deref(),
        Some("-rw-rw-r-- 1 0 43"),
        "console:\n{first}"
    );
    assert!(
        line(&first, "nginx").is_some_and(|l| l.starts_with("d") && l.ends_with(" 0 4")),
        "console:\n{first}"
    );
    // Not seeded again: what the first run removed stays removed.
    let (code, second) = run_to_end(&elf, &["-v", &vol], s.path().join("second"));
    assert_eq!(code, Some(0), "console:\n{second}");
    assert!(line(&second, "wtmp").is_some(), "console:\n{second}");
    assert!(line(&second, "btmp").is_none(), "console:\n{second}");
}

#[test]
fn a_host_directory_gets_the_owner_the_application_used() {
    let s = Scratch::new();
    let elf = busybox_elf(
        &s,
        "dir.elf",
        "echo hello > /data/f; mkdir /data/d; id -u",
        &["--user", "1000:1000"],
    );
    let dir = s.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(1000), Some(1000)).unwrap();
    std::fs::write(dir.join("from-host"), "x").unwrap();
    let _one = one_vm();
    let (code, console) = run_to_end(
        &elf,
        &["-v", &format!("{}:/data", dir.display())],
        s.path().join("console"),
    );
    assert_eq!(code, Some(0), "console:\n{console}");
    let f = std::fs::metadata(dir.join("f")).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("f")).unwrap(), "hello\n");
    assert_eq!((f.uid(), f.gid()), (1000, 1000));
    let d = std::fs::metadata(dir.join("d")).unwrap();
    assert!(d.is_dir());
    assert_eq!((d.uid(), d.gid()), (1000, 1000));
    eprintln!(
        "directory volume: f {:o} {}:{}, d {:o} {}:{}",
        f.mode(),
        f.uid(),
        f.gid(),
        d.mode(),
        d.uid(),
        d.gid()
    );
}

#[test]
fn read_only_volumes_refuse_writes() {
    let s = Scratch::new();
    let elf = busybox_elf(
        &s,
        "ro.elf",
        "ls /dir; echo x > /disk/f || echo disk refused; echo x > /dir/f || echo dir refused",
        &[],
    );
    let dir = s.path().join("shared");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("there"), "x").unwrap();
    let img = s.path().join("ro.img");
    let _one = one_vm();
    let (code, console) = run_to_end(
        &elf,
        &[
            "-v",
            &format!("{}:/disk:ro", img.display()),
            "-v",
            &format!("{}:/dir:ro", dir.display()),
        ],
        s.path().join("console"),
    );
    assert_eq!(code, Some(0), "console:\n{console}");
    assert!(console.contains("there"), "console:\n{console}");
    assert!(console.contains("disk refused"), "console:\n{console}");
    assert!(console.contains("dir refused"), "console:\n{console}");
    assert_eq!(
        console.matches("Read-only file system").count(),
        2,
        "console:\n{console}"
    );
    assert!(!dir.join("f").exists());
}

#[test]
fn bad_volumes_are_one_line() {
    let s = Scratch::new();
    let elf = busybox_elf(&s, "bad.elf", "true", &[]);
    let elf = elf.to_str().unwrap();
    let base = s.path().display().to_string();
    // Nothing to make SRC in.
    let out = s.oci2uk(&["run", elf, "-v", &format!("{base}/no/such/data.img:/data")]);
    assert_fails(
        &out,
        125,
        &[&format!(
            "-v {base}/no/such/data.img:/data: the directory {base}/no/such does not exist"
        )],
    );
    // A file that holds no file system the guest mounts.
    let junk = s.path().join("junk.bin");
    std::fs::write(&junk, vec![0u8; 1 << 16]).unwrap();
    let out = s.oci2uk(&["run", elf, "-v", &format!("{}:/data", junk.display())]);
    assert_fails(&out, 125, &["-v ", "holds no ext2/ext3/ext4 file system"]);
    // A "directory" that is a file.
    let out = s.oci2uk(&["run", elf, "-v", &format!("{}/x:/data", junk.display())]);
    assert_fails(&out, 125, &["junk.bin/x: Not a directory"]);
    // DST not absolute: a usage error, as a bad -p.
    let out = s.oci2uk(&["run", elf, "-v", &format!("{base}/d:data")]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DST must be an absolute path in the guest"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "QEMU never started");
    assert!(!s.path().join("d").exists(), "nothing made for a bad -v");
}
