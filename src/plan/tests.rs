use std::path::Path;

use oci_spec::image::{Digest, ImageConfiguration};
use serde_json::{json, Value};

use oci2uk_config::{Family, Method, MountSource, User};

use super::*;
use crate::flatten::testutil::{Fixture, TarBuilder};

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const LD_SO: &str = "/lib64/ld-linux-x86-64.so.2";

/// A minimal ELF64 little-endian executable: one PT_LOAD and, when `interp` is given, a
/// PT_INTERP naming it.
fn elf(machine: u16, interp: Option<&str>) -> Vec<u8> {
    let phnum: u16 = if interp.is_some() { 2 } else { 1 };
    let mut v = vec![0u8; 64];
    v[..4].copy_from_slice(b"\x7fELF");
    v[4] = 2;
    v[5] = 1;
    v[6] = 1;
    v[16..18].copy_from_slice(&2u16.to_le_bytes());
    v[18..20].copy_from_slice(&machine.to_le_bytes());
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes());
    v[52..54].copy_from_slice(&64u16.to_le_bytes());
    v[54..56].copy_from_slice(&56u16.to_le_bytes());
    v[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut load = [0u8; 56];
    load[..4].copy_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&load);
    if let Some(i) = interp {
        let off = 64 + 56 * u64::from(phnum);
        let mut ph = [0u8; 56];
        ph[..4].copy_from_slice(&3u32.to_le_bytes());
        ph[8..16].copy_from_slice(&off.to_le_bytes());
        ph[32..40].copy_from_slice(&(i.len() as u64 + 1).to_le_bytes());
        v.extend_from_slice(&ph);
        v.extend_from_slice(i.as_bytes());
        v.push(0);
    }
    v.extend_from_slice(&[0x90; 16]);
    v
}

fn entry(t: &mut TarBuilder, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) {
    t.custom(b'0', name, "", data, &[], |h| {
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
    });
}

fn exe(t: &mut TarBuilder, name: &str, data: &[u8]) {
    entry(t, name, data, 0o755, 0, 0);
}

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    # a comment\n\
    app:x:1000:1000::/home/app:/bin/sh\n\
    broken:x:notanumber:0::/:/bin/sh\n\
    nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:root\n\
    wheel:x:10:root,app\n\
    app:x:1000:\n\
    audio:x:29:other, app\n\
    staff:x:50:\n";

/// A small Debian-like image: accounts, a static `/bin/sh`, a dynamic `/usr/bin/app` whose
/// loader is reached through `/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...`.
fn base(t: &mut TarBuilder) {
    t.dir("etc/");
    entry(t, "etc/passwd", PASSWD.as_bytes(), 0o644, 0, 0);
    entry(t, "etc/group", GROUP.as_bytes(), 0o644, 0, 0);
    exe(t, "bin/sh", &elf(EM_X86_64, None));
    exe(
        t,
        "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        &elf(EM_X86_64, None),
    );
    t.dir("lib64/");
    t.symlink(
        "lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    exe(t, "usr/bin/app", &elf(EM_X86_64, Some(LD_SO)));
    t.dir("usr/local/bin/");
}

struct Case {
    _fx: Fixture,
    tree: Tree,
}

fn tree(extra: impl FnOnce(&mut TarBuilder)) -> Case {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        base(t);
        extra(t);
    });
    let tree = fx.flatten(&[l]).unwrap();
    Case { _fx: fx, tree }
}

fn digest() -> Digest {
    format!("sha256:{}", "ab".repeat(32)).parse().unwrap()
}

fn image(config: Value) -> Image {
    let config: ImageConfiguration = serde_json::from_value(json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap();
    Image {
        source: "docker.io/library/test:latest".into(),
        name: "test".into(),
        manifest_digest: digest(),
        config,
        config_digest: digest(),
        layers: Vec::new(),
    }
}

fn x86() -> Target {
    Target {
        machine: Machine::X86_64,
        name: "test".into(),
        modules: Vec::new(),
        drivers: Default::default(),
        kernel: None,
    }
}

fn no_host(_: &str) -> Option<OsString> {
    None
}

fn run(c: &Case, config: Value, o: &Overrides) -> Result<Config, PlanError> {
    plan(&image(config), &c.tree, o, &x86())
}

fn ok(c: &Case, config: Value, o: &Overrides) -> Config {
    run(c, config, o).unwrap_or_else(|e| panic!("{e}"))
}

fn err(c: &Case, config: Value, o: &Overrides) -> String {
    match run(c, config, o) {
        Ok(cfg) => panic!("planned: {}", cfg.to_json()),
        Err(e) => e.to_string(),
    }
}

fn argv(cfg: &Config) -> Vec<String> {
    let rc = cfg.main().unwrap();
    let mut v = vec![rc.bin.clone()];
    v.extend(rc.argv.iter().cloned());
    v
}

fn words(w: &[&str]) -> Vec<String> {
    w.iter().map(|s| s.to_string()).collect()
}

fn user(c: &Case, spec: &str) -> Result<User, PlanError> {
    let o = Overrides {
        user: Some(spec.into()),
        ..Overrides::default()
    };
    run(c, json!({"Cmd": ["/bin/sh"]}), &o).map(|cfg| cfg.main().unwrap().user.clone().unwrap())
}

fn ids(uid: u32, gid: u32, groups: &[u32]) -> User {
    User {
        uid,
        gid,
        groups: groups.to_vec(),
    }
}

#[test]
fn parse_command_json_or_one_word() {
    assert_eq!(
        parse_command(r#"["nginx","-g","daemon off;"]"#).unwrap(),
        words(&["nginx", "-g", "daemon off;"])
    );
    assert_eq!(parse_command("echo hi").unwrap(), words(&["echo hi"]));
    assert_eq!(parse_command("").unwrap(), Vec::<String>::new());
    assert_eq!(parse_command("[]").unwrap(), Vec::<String>::new());
    for bad in ["[nginx", r#"["a", 1]"#, "[\"a\"] x"] {
        let e = parse_command(bad).unwrap_err();
        assert!(
            e.to_string().contains("is not a JSON array of strings"),
            "{e}"
        );
    }
}

#[test]
fn docker_command_rules() {
    let c = tree(|_| {});
    let img = json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]});
    let o = |ep: Option<&[&str]>, cmd: Option<&[&str]>| Overrides {
        entrypoint: ep.map(words),
        cmd: cmd.map(words),
        ..Overrides::default()
    };
    // Entrypoint + Cmd.
    assert_eq!(
        argv(&ok(&c, img.clone(), &o(None, None))),
        words(&["/bin/sh", "-c", "echo hi"])
    );
    // --cmd replaces Cmd.
    assert_eq!(
        argv(&ok(&c, img.clone(), &o(None, Some(&["exit 3"])))),
        words(&["/bin/sh", "-c", "exit 3"])
    );
    // --entrypoint clears the image's Cmd...
    assert_eq!(
        argv(&ok(&c, img.clone(), &o(Some(&["/usr/bin/app"]), None))),
        words(&["/usr/bin/app"])
    );
    // ... unless --cmd is given too.
    assert_eq!(
        argv(&ok(
            &c,
            img.clone(),
            &o(Some(&["/usr/bin/app"]), Some(&["-v"]))
        )),
        words(&["/usr/bin/app", "-v"])
    );
    // --entrypoint "" leaves the --cmd alone.
    assert_eq!(
        argv(&ok(&c, img.clone(), &o(Some(&[]), Some(&["sh", "-x"])))),
        words(&["sh", "-x"])
    );
    // Cmd alone.
    assert_eq!(
        argv(&ok(&c, json!({"Cmd": ["sh"]}), &o(None, None))),
        words(&["sh"])
    );
    // Nothing to run.
    let want = "the image has no Entrypoint or Cmd; give --entrypoint or --cmd";
    assert_eq!(err(&c, json!({}), &o(None, None)), want);
    assert_eq!(err(&c, img.clone(), &o(Some(&[]), None)), want);
    assert_eq!(
        err(&c, json!({"Entrypoint": [], "Cmd": []}), &o(None, None)),
        want
    );
    assert!(err(&c, json!({"Cmd": ["", "x"]}), &o(None, None)).contains("empty program name"));
}

#[test]
fn environment() {
    let c = tree(|_| {});
    let img = json!({
        "Cmd": ["sh"],
        "Env": ["A=1", "B=2", "A=3", "NOEQUALS", "KEEP=x=y"]
    });
    let cfg = ok(&c, img.clone(), &Overrides::default());
    let env = |cfg: &Config, k: &str| cfg.env.get(k).cloned();
    assert_eq!(env(&cfg, "A").as_deref(), Some("3"));
    assert_eq!(env(&cfg, "KEEP").as_deref(), Some("x=y"));
    assert_eq!(env(&cfg, "NOEQUALS"), None);
    assert_eq!(env(&cfg, "PATH").as_deref(), Some(DEFAULT_PATH));
    assert_eq!(env(&cfg, "HOME").as_deref(), Some("/root"));
    assert_eq!(env(&cfg, "HOSTNAME").as_deref(), Some("test"));

    let host = |k: &str| (k == "FROMHOST").then(|| OsString::from("h v"));
    let o = Overrides {
        env: resolve_env(
            &words(&["B=20", "C=", "FROMHOST", "A", "B=21", "HOME=/h"]),
            &host,
        )
        .unwrap(),
        ..Overrides::default()
    };
    let cfg = plan(&image(img.clone()), &c.tree, &o, &x86()).unwrap();
    assert_eq!(env(&cfg, "B").as_deref(), Some("21"));
    assert_eq!(env(&cfg, "C").as_deref(), Some(""));
    assert_eq!(env(&cfg, "FROMHOST").as_deref(), Some("h v"));
    // `--env A` with no A on the host removes the image's A, as docker does.
    assert_eq!(env(&cfg, "A"), None);
    assert_eq!(env(&cfg, "HOME").as_deref(), Some("/h"));

    // The image's PATH is kept, and searched.
    let img = json!({"Cmd": ["app"], "Env": ["PATH=/usr/bin"]});
    let cfg = ok(&c, img, &Overrides::default());
    assert_eq!(env(&cfg, "PATH").as_deref(), Some("/usr/bin"));

    for bad in ["=x", ""] {
        let e = resolve_env(&[bad.into()], &no_host)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the variable name is empty"), "{e}");
    }
}

#[test]
fn working_directory() {
    let c = tree(|t| {
        t.dir("srv/");
        exe(t, "srv/run", b"#!/bin/sh\n");
        t.file("etc/conf", b"x");
    });
    let wd = |cfg: &Config| cfg.main().unwrap().workdir.clone().unwrap();
    assert_eq!(
        wd(&ok(&c, json!({"Cmd": ["sh"]}), &Overrides::default())),
        "/"
    );
    let img = json!({"Cmd": ["./run"], "WorkingDir": "srv/"});
    assert_eq!(wd(&ok(&c, img.clone(), &Overrides::default())), "/srv");
    // A relative program is found against the working directory...
    let o = Overrides {
        workdir: Some("/".into()),
        ..Overrides::default()
    };
    assert_eq!(
        err(&c, img.clone(), &o),
        "the entrypoint /run is not in the image"
    );
    // ... and a missing working directory is fine (the init creates it).
    let o = Overrides {
        workdir: Some("/new/dir/..//dir".into()),
        cmd: Some(words(&["/srv/run"])),
        ..Overrides::default()
    };
    assert_eq!(wd(&ok(&c, img, &o)), "/new/dir");
    let e = err(
        &c,
        json!({"Cmd": ["sh"], "WorkingDir": "/etc/conf"}),
        &Overrides::default(),
    );
    assert_eq!(
        e,
        "the working directory /etc/conf is a file in the image, not a directory"
    );
}

#[test]
fn users_by_name_number_and_group() {
    let c = tree(|_| {});
    // Empty: root, with root's groups from /etc/group.
    assert_eq!(user(&c, "").unwrap(), ids(0, 0, &[0, 10]));
    assert_eq!(user(&c, "root").unwrap(), ids(0, 0, &[0, 10]));
    // By name and by number, supplementary groups from the member lists.
    assert_eq!(user(&c, "app").unwrap(), ids(1000, 1000, &[1000, 10, 29]));
    assert_eq!(user(&c, "1000").unwrap(), ids(1000, 1000, &[1000, 10, 29]));
    // A number without an entry: allowed, group 0.
    assert_eq!(user(&c, "4242").unwrap(), ids(4242, 0, &[0]));
    // An explicit group replaces the primary and adds none.
    assert_eq!(user(&c, "app:staff").unwrap(), ids(1000, 50, &[50]));
    assert_eq!(user(&c, "app:777").unwrap(), ids(1000, 777, &[777]));
    assert_eq!(user(&c, "4242:audio").unwrap(), ids(4242, 29, &[29]));
    assert_eq!(user(&c, "nobody").unwrap(), ids(65534, 65534, &[65534]));

    let e = user(&c, "ghost").unwrap_err().to_string();
    assert_eq!(
        e,
        "user \"ghost\" (--user) is not in the image's /etc/passwd"
    );
    let e = user(&c, "app:ghosts").unwrap_err().to_string();
    assert_eq!(
        e,
        "group \"ghosts\" (--user) is not in the image's /etc/group"
    );
    // A malformed line is not a user.
    assert!(user(&c, "broken").is_err());
    for bad in ["a:b:c", "app:", "99999999999"] {
        let e = user(&c, bad).unwrap_err().to_string();
        assert!(e.contains("is not USER[:GROUP]"), "{bad}: {e}");
    }

    // The image's User, and HOME from its entry.
    let cfg = ok(
        &c,
        json!({"Cmd": ["sh"], "User": "app"}),
        &Overrides::default(),
    );
    assert_eq!(
        cfg.main().unwrap().user,
        Some(ids(1000, 1000, &[1000, 10, 29]))
    );
    assert_eq!(cfg.env["HOME"], "/home/app");
    // An empty --user keeps the image's.
    let o = Overrides {
        user: Some(String::new()),
        ..Overrides::default()
    };
    let cfg = ok(&c, json!({"Cmd": ["sh"], "User": "app"}), &o);
    assert_eq!(cfg.main().unwrap().user.as_ref().unwrap().uid, 1000);
    let e = err(
        &c,
        json!({"Cmd": ["sh"], "User": "www-data"}),
        &Overrides::default(),
    );
    assert_eq!(
        e,
        "user \"www-data\" (the image's User) is not in the image's /etc/passwd"
    );
}

#[test]
fn users_without_account_files_and_through_symlinks() {
    let mut fx = Fixture::new();
    let l = fx.layer(|t| exe(t, "bin/sh", &elf(EM_X86_64, None)));
    let bare = Case {
        tree: fx.flatten(&[l]).unwrap(),
        _fx: fx,
    };
    assert_eq!(user(&bare, "").unwrap(), ids(0, 0, &[0]));
    assert_eq!(user(&bare, "7:8").unwrap(), ids(7, 8, &[8]));
    let e = user(&bare, "app").unwrap_err().to_string();
    assert_eq!(
        e,
        "user \"app\" (--user) is not in the image's /etc/passwd: the image has no /etc/passwd"
    );

    // /etc/passwd as a symlink inside the tree is followed; the host's is never read.
    let mut fx = Fixture::new();
    let l = fx.layer(|t| {
        exe(t, "bin/sh", &elf(EM_X86_64, None));
        t.file("data/passwd", b"svc:x:300:301::/var/svc:/bin/sh\n");
        t.dir("etc/");
        t.symlink("etc/passwd", "../../../data/passwd");
        t.symlink("etc/group", "/etc/nonexistent");
    });
    let linked = Case {
        tree: fx.flatten(&[l]).unwrap(),
        _fx: fx,
    };
    assert_eq!(user(&linked, "svc").unwrap(), ids(300, 301, &[301]));
    assert!(user(&linked, "root").is_err());
}

#[test]
fn path_search() {
    let c = tree(|t| {
        // Earlier PATH entries that do not qualify: a directory, a file with no x bit.
        t.dir("usr/local/sbin/tool/");
        entry(t, "usr/local/bin/tool", b"#!/bin/sh\n", 0o644, 0, 0);
        exe(t, "usr/sbin/tool", b"#!/bin/sh\n");
        t.dir("opt/rel/");
        exe(t, "opt/rel/mine", b"#!/bin/sh\n");
    });
    let cmd = |c: &Case, w: &str, env: &[&str], wd: &str| {
        run(
            c,
            json!({"Cmd": [w], "Env": env, "WorkingDir": wd}),
            &Overrides::default(),
        )
    };
    cmd(&c, "tool", &[], "/").unwrap();
    cmd(&c, "app", &[], "/").unwrap();
    // A relative PATH entry is taken from the working directory.
    cmd(&c, "mine", &["PATH=rel:/bin"], "/opt").unwrap();
    let e = cmd(&c, "mine", &[], "/opt").unwrap_err().to_string();
    assert_eq!(
        e,
        format!("the entrypoint \"mine\" is not found in PATH {DEFAULT_PATH} inside the image")
    );
}

#[test]
fn program_checks() {
    let c = tree(|t| {
        entry(t, "plain", &elf(EM_X86_64, None), 0o644, 0, 0);
        entry(t, "rootonly", &elf(EM_X86_64, None), 0o700, 0, 0);
        entry(t, "groupx", &elf(EM_X86_64, None), 0o750, 0, 29);
        entry(t, "ownerno", &elf(EM_X86_64, None), 0o075, 1000, 0);
        exe(t, "arm", &elf(EM_AARCH64, None));
        exe(t, "musl", &elf(EM_X86_64, Some("/lib/ld-musl-x86_64.so.1")));
        exe(t, "text", b"hello\n");
        exe(t, "obj", &{
            let mut v = elf(EM_X86_64, None);
            v[16] = 1; // ET_REL
            v
        });
        t.dir("adir/");
        t.symlink("dangling", "/nowhere/x");
    });
    let check = |bin: &str, user: Option<&str>| {
        let o = Overrides {
            entrypoint: Some(words(&[bin])),
            user: user.map(str::to_string),
            ..Overrides::default()
        };
        run(&c, json!({}), &o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        check("/nope", None).unwrap_err(),
        "the entrypoint /nope is not in the image"
    );
    assert_eq!(
        check("/dangling", None).unwrap_err(),
        "the entrypoint /dangling is a symlink to /nowhere/x, which does not resolve inside the image"
    );
    assert_eq!(
        check("/adir", None).unwrap_err(),
        "the entrypoint /adir is a directory, not a regular file"
    );
    assert_eq!(
        check("/plain", None).unwrap_err(),
        "the entrypoint /plain is not executable by root (mode 0644, owner 0:0)"
    );
    // Root needs any x bit; others the bit that applies to them.
    check("/rootonly", None).unwrap();
    assert_eq!(
        check("/rootonly", Some("app")).unwrap_err(),
        "the entrypoint /rootonly is not executable by uid 1000 (gid 1000, groups 1000,10,29) (mode 0700, owner 0:0)"
    );
    check("/groupx", Some("app")).unwrap();
    assert!(check("/groupx", Some("nobody")).is_err());
    // The owner's bits apply to the owner even when others' would allow it.
    assert!(check("/ownerno", Some("app")).is_err());
    check("/ownerno", Some("nobody")).unwrap();

    assert_eq!(
        check("/arm", None).unwrap_err(),
        "the entrypoint /arm is an aarch64 binary but the kernel is x86_64 (use --platform linux/amd64 to pick the image built for it)"
    );
    assert_eq!(
        check("/musl", None).unwrap_err(),
        "the entrypoint /musl needs the ELF interpreter /lib/ld-musl-x86_64.so.1, which is not in the image"
    );
    // The loader through /lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/...
    check("/usr/bin/app", None).unwrap();
    check("app", Some("app")).unwrap();
    assert_eq!(
        check("/text", None).unwrap_err(),
        "the entrypoint /text is neither an ELF binary nor a script starting with #! (exec format error)"
    );
    assert!(check("/obj", None)
        .unwrap_err()
        .contains("is not a usable ELF executable: it is not an executable (ELF type 1)"));
}

#[test]
fn elf_interpreter_checks() {
    let c = tree(|t| {
        exe(t, "lib/ld-arm.so", &elf(EM_AARCH64, None));
        exe(t, "needs-arm-ld", &elf(EM_X86_64, Some("/lib/ld-arm.so")));
        entry(t, "lib/ld-noexec.so", &elf(EM_X86_64, None), 0o644, 0, 0);
        exe(
            t,
            "needs-noexec",
            &elf(EM_X86_64, Some("/lib/ld-noexec.so")),
        );
        exe(t, "needs-dir", &elf(EM_X86_64, Some("/lib")));
        // A loader named relatively is opened from the working directory.
        exe(
            t,
            "needs-rel",
            &elf(EM_X86_64, Some("lib64/ld-linux-x86-64.so.2")),
        );
    });
    let check = |bin: &str| {
        let o = Overrides {
            entrypoint: Some(words(&[bin])),
            ..Overrides::default()
        };
        run(&c, json!({}), &o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        check("/needs-arm-ld").unwrap_err(),
        "the ELF interpreter /lib/ld-arm.so of /needs-arm-ld is an aarch64 binary but the kernel is x86_64 (use --platform linux/amd64 to pick the image built for it)"
    );
    assert!(check("/needs-noexec")
        .unwrap_err()
        .starts_with("the ELF interpreter /lib/ld-noexec.so of /needs-noexec is not executable"));
    assert_eq!(
        check("/needs-dir").unwrap_err(),
        "the ELF interpreter /lib of /needs-dir is a directory, not a regular file"
    );
    check("/needs-rel").unwrap();
}

#[test]
fn symlinks_stay_inside_the_tree() {
    // `../../../../usr/bin/env` cannot climb out: it resolves to the tree's /usr/bin/env.
    let with_env = tree(|t| {
        exe(t, "usr/bin/env", &elf(EM_X86_64, None));
        t.symlink("bin/app", "../../../../usr/bin/env");
        t.symlink("bin/abs", "/usr/bin/env");
    });
    let o = |bin: &str| Overrides {
        entrypoint: Some(words(&[bin])),
        ..Overrides::default()
    };
    ok(&with_env, json!({}), &o("/bin/app"));
    ok(&with_env, json!({}), &o("/bin/abs"));
    // Without one in the tree it is missing, whatever the host has.
    let without = tree(|t| {
        t.symlink("bin/app", "../../../../usr/bin/env");
    });
    assert_eq!(
        err(&without, json!({}), &o("/bin/app")),
        "the entrypoint /bin/app is a symlink to ../../../../usr/bin/env, which does not resolve inside the image"
    );
}

#[test]
fn scripts() {
    let c = tree(|t| {
        exe(t, "start.sh", b"#!/bin/bash -e\necho\n");
        exe(t, "ok.sh", b"#!  /bin/sh   -eu  \necho\n");
        exe(t, "via-env", b"#!/usr/bin/app\n");
        exe(t, "empty", b"#!   \n");
        exe(t, "arm.sh", b"#!/arm\n");
        exe(t, "arm", &elf(EM_AARCH64, None));
        // A chain of scripts: s0 -> s1 -> ... -> s5 -> /bin/sh.
        for i in 0..6 {
            let next = if i == 5 {
                "/bin/sh".to_string()
            } else {
                format!("/s{}", i + 1)
            };
            exe(t, &format!("s{i}"), format!("#!{next}\n").as_bytes());
        }
        entry(t, "noexec.sh", b"#!/bin/sh\n", 0o644, 0, 0);
        exe(t, "uses-noexec", b"#!/noexec.sh\n");
    });
    let check = |bin: &str| {
        let o = Overrides {
            entrypoint: Some(words(&[bin])),
            ..Overrides::default()
        };
        run(&c, json!({}), &o)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert_eq!(
        check("/start.sh").unwrap_err(),
        "the entrypoint /start.sh is a script for /bin/bash, which is not in the image"
    );
    check("/ok.sh").unwrap();
    check("/via-env").unwrap();
    assert_eq!(
        check("/empty").unwrap_err(),
        "the entrypoint /empty has a #! line that names no interpreter"
    );
    assert_eq!(
        check("/arm.sh").unwrap_err(),
        "the interpreter /arm of /arm.sh is an aarch64 binary but the kernel is x86_64 (use --platform linux/amd64 to pick the image built for it)"
    );
    check("/s2").unwrap();
    assert_eq!(
        check("/s1").unwrap_err(),
        "the interpreter /s5 of /s4 is a script run through more than 4 levels of #! interpreters"
    );
    assert!(check("/uses-noexec")
        .unwrap_err()
        .starts_with("the interpreter /noexec.sh of /uses-noexec is not executable by root"));
}

#[test]
fn volumes_keep_owner_and_mode() {
    let c = tree(|t| {
        t.custom(b'5', "data/", "", b"", &[], |h| {
            h.set_mode(0o1770);
            h.set_uid(1000);
            h.set_gid(29);
        });
        t.file("data/seed", b"x");
        t.symlink("var/linked", "/data");
        t.file("afile", b"x");
    });
    let cfg = ok(
        &c,
        json!({"Cmd": ["sh"], "Volumes": {"/data": {}, "/fresh/": {}, "var/linked": {}}}),
        &Overrides::default(),
    );
    let m = &cfg.mount["/data"];
    assert_eq!(m.source, MountSource::Tmpfs);
    assert!(m.seed);
    assert_eq!(
        (m.uid, m.gid, m.mode.as_deref()),
        (Some(1000), Some(29), Some("1770"))
    );
    let m = &cfg.mount["/fresh"];
    assert_eq!(
        (m.uid, m.gid, m.mode.as_deref()),
        (Some(0), Some(0), Some("755"))
    );
    // A symlinked mount point takes its target directory's owner and mode.
    let m = &cfg.mount["/var/linked"];
    assert_eq!(
        (m.uid, m.gid, m.mode.as_deref()),
        (Some(1000), Some(29), Some("1770"))
    );
    let e = err(
        &c,
        json!({"Cmd": ["sh"], "Volumes": {"/afile": {}}}),
        &Overrides::default(),
    );
    assert_eq!(
        e,
        "VOLUME /afile: it is a file in the image, not a directory"
    );
    let e = err(
        &c,
        json!({"Cmd": ["sh"], "Volumes": {"/": {}}}),
        &Overrides::default(),
    );
    assert_eq!(e, "VOLUME /: a volume cannot be mounted over the root");
}

#[test]
fn oci2uk_settings() {
    let c = tree(|_| {});
    let cfg = ok(&c, json!({"Cmd": ["sh"]}), &Overrides::default());
    assert_eq!(cfg.oci2uk.stop_signal.as_deref(), Some("SIGTERM"));
    assert_eq!(
        cfg.oci2uk.source_image.as_deref(),
        Some("docker.io/library/test:latest")
    );
    assert_eq!(cfg.oci2uk.source_digest, Some(digest().to_string()));
    assert!(cfg.oci2uk.modules.is_empty());
    let cfg = ok(
        &c,
        json!({
            "Cmd": ["sh"],
            "StopSignal": "SIGQUIT",
            "ExposedPorts": {"80/tcp": {}, "443/tcp": {}, "53/udp": {}}
        }),
        &Overrides::default(),
    );
    assert_eq!(cfg.oci2uk.stop_signal.as_deref(), Some("SIGQUIT"));
    assert_eq!(
        cfg.oci2uk.exposed_ports,
        words(&["443/tcp", "53/udp", "80/tcp"])
    );
    let e = err(
        &c,
        json!({"Cmd": ["sh"], "StopSignal": "SIGNOPE"}),
        &Overrides::default(),
    );
    assert_eq!(
        e,
        "the image's StopSignal \"SIGNOPE\" is not a signal name or number"
    );
}

#[test]
fn network() {
    assert_eq!(parse_net("dhcp").unwrap(), None);
    let n = parse_net("10.0.2.15/24,10.0.2.2").unwrap().unwrap();
    let a = &n.interfaces[STATIC_INTERFACE].addrs[0];
    assert_eq!((a.family, a.method), (Family::Inet, Method::Static));
    assert_eq!(a.addr.as_deref(), Some("10.0.2.15/24"));
    assert_eq!(n.gateways[0].addr, "10.0.2.2");
    assert!(n.dns.is_empty());
    let n = parse_net("fd00::2/64").unwrap().unwrap();
    assert_eq!(
        n.interfaces[STATIC_INTERFACE].addrs[0].family,
        Family::Inet6
    );
    assert!(n.gateways.is_empty());
    for (bad, why) in [
        ("static", "expected dhcp or ADDR/LEN"),
        ("10.0.2.15", "expected dhcp or ADDR/LEN"),
        ("10.0.2.300/24", "not an IP address"),
        ("10.0.2.15/33", "from 0 to 32"),
        ("10.0.2.15/24,fd00::1", "family"),
        ("10.0.2.15/24,gw", "gateway is not an IP address"),
    ] {
        let e = parse_net(bad).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("--net {bad:?}: ")) && e.contains(why),
            "{e}"
        );
    }

    let c = tree(|_| {});
    let cfg = ok(&c, json!({"Cmd": ["sh"]}), &Overrides::default());
    assert_eq!(cfg.net, None);
    let o = Overrides {
        net: Some("192.168.1.5/24,192.168.1.1".into()),
        ..Overrides::default()
    };
    let cfg = ok(&c, json!({"Cmd": ["sh"]}), &o);
    assert_eq!(cfg.net.unwrap().gateways[0].addr, "192.168.1.1");
}

#[test]
fn host_names() {
    let c = tree(|_| {});
    let with = |name: &str, flag: Option<&str>| {
        let o = Overrides {
            hostname: flag.map(str::to_string),
            cmd: Some(words(&["sh"])),
            ..Overrides::default()
        };
        let t = Target {
            machine: Machine::X86_64,
            name: name.into(),
            modules: Vec::new(),
            drivers: Default::default(),
            kernel: None,
        };
        plan(&image(json!({})), &c.tree, &o, &t).map(|cfg| {
            assert_eq!(cfg.env["HOSTNAME"], *cfg.hostname.as_ref().unwrap());
            cfg.hostname.unwrap()
        })
    };
    assert_eq!(with("nginx", None).unwrap(), "nginx");
    assert_eq!(with("My_App.v2", None).unwrap(), "my-app-v2");
    assert_eq!(with("__", None).unwrap(), "oci2uk");
    assert_eq!(with(&"x".repeat(100), None).unwrap().len(), 63);
    assert_eq!(with("nginx", Some("web.example")).unwrap(), "web.example");
    for bad in ["", "a b", "-a", "a..b", &"x".repeat(65)] {
        let e = with("nginx", Some(bad)).unwrap_err().to_string();
        assert!(e.starts_with("--hostname"), "{e}");
    }
}

#[test]
fn emitted_config_round_trips() {
    let c = tree(|t| {
        t.dir("data/");
    });
    let o = Overrides {
        env: resolve_env(&words(&["A=1"]), &no_host).unwrap(),
        user: Some("app".into()),
        workdir: Some("/srv".into()),
        net: Some("10.0.2.15/24,10.0.2.2".into()),
        ..Overrides::default()
    };
    let cfg = ok(
        &c,
        json!({"Entrypoint": ["app"], "Cmd": ["--flag"], "Volumes": {"/data": {}}, "ExposedPorts": {"80/tcp": {}}}),
        &o,
    );
    let back = Config::from_value(serde_json::from_str(&cfg.to_json()).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let rc = cfg.main().unwrap();
    assert_eq!(
        (rc.bin.as_str(), rc.argv.clone()),
        ("app", words(&["--flag"]))
    );
}

/// docker's hello-world from the go-containerregistry corpus: its `/hello` is a static
/// aarch64 binary (the archive holds the linux/arm64 image).
#[test]
fn hello_world_from_the_conformance_corpus() {
    let archive = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance/go-containerregistry/hello-world-v25.tar");
    let dir = tempfile::tempdir().unwrap();
    let cache = crate::cache::Cache::open(Some(&dir.path().join("cache"))).unwrap();
    let img = crate::image::docker_archive::resolve(&archive, None, &cache).unwrap();
    assert_eq!(img.config.architecture().to_string(), "arm64");
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let tree = crate::flatten::flatten(
        &img.layers,
        &crate::flatten::FlattenOptions { max_size: 1 << 30 },
        &spool,
        &crate::progress::Progress::hidden(),
    )
    .unwrap();
    let target = |machine| Target {
        machine,
        name: img.name.clone(),
        modules: Vec::new(),
        drivers: Default::default(),
        kernel: None,
    };
    let cfg = plan(
        &img,
        &tree,
        &Overrides::default(),
        &target(Machine::Aarch64),
    )
    .unwrap();
    assert_eq!(argv(&cfg), words(&["/hello"]));
    let rc = cfg.main().unwrap();
    assert_eq!(rc.workdir.as_deref(), Some("/"));
    assert_eq!(rc.user, Some(ids(0, 0, &[0])));
    assert_eq!(cfg.env["PATH"], DEFAULT_PATH);
    assert_eq!(cfg.hostname.as_deref(), Some("hello-world-v25"));
    assert_eq!(
        cfg.oci2uk.source_digest.as_deref(),
        Some(img.manifest_digest.to_string().as_str())
    );

    let e = plan(&img, &tree, &Overrides::default(), &target(Machine::X86_64)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the entrypoint /hello is an aarch64 binary but the kernel is x86_64 (use --platform linux/amd64 to pick the image built for it)"
    );
}
