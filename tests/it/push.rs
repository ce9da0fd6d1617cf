//! Pushing baked files to the loopback registries and reading them back: `push`, `build
//! --push`, `inspect`, `run REF`, `kernel push` and `--kernel REF`. Every repository name is
//! new for each test run, so that "already there" and "mounted" mean what they say.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::Guest;
use crate::util::*;
use crate::vm::nginx_elf;

/// A repository name no earlier run used.
fn fresh(name: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("uk-{}-{n}/{name}", std::process::id())
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert_ok(out);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn sha256_of(path: &Path) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The registry log from `from` bytes on.
fn log_since(var: &str, from: u64) -> String {
    let log = std::fs::read(env(var)).unwrap();
    String::from_utf8_lossy(&log[from as usize..]).into_owned()
}

fn log_len(var: &str) -> u64 {
    std::fs::metadata(env(var)).unwrap().len()
}

fn skopeo(args: &[&str]) -> std::process::Output {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The files of the pushed image's layer, copied out with skopeo (an independent client).
fn layer_files(reference: &str) -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    skopeo(&[
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:x", layout.display()),
    ]);
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let f = std::fs::File::open(blob(layers[0]["digest"].as_str().unwrap())).unwrap();
    let mut files = Vec::new();
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(f).unwrap());
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            files.push((name, data));
        }
    }
    files
}

fn raw_manifest(reference: &str) -> serde_json::Value {
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn pushed_file_is_an_oci_image_that_runs_by_reference() {
    let (elf, page) = nginx_elf();
    let s = Scratch::new();
    let reg = env("OCI2UK_TEST_REGISTRY");
    let repo = fresh("nginx");
    let r1 = format!("{reg}/{repo}:1");
    let elf_s = elf.to_str().unwrap();

    let pushed = json(&s.oci2uk(&["push", elf_s, &r1, "--json"]));
    let digest = pushed["digest"].as_str().unwrap().to_string();
    assert!(pushed["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["how"] == "uploaded"));

    // The manifest, as skopeo sees it: urunc's keys and ours.
    let m = raw_manifest(&r1);
    let a = &m["annotations"];
    assert_eq!(a["com.urunc.unikernel.unikernelType"], "linux");
    assert_eq!(a["com.urunc.unikernel.hypervisor"], "qemu");
    assert_eq!(a["com.urunc.unikernel.binary"], "/unikernel/nginx.elf");
    assert!(a["com.urunc.unikernel.cmdline"]
        .as_str()
        .unwrap()
        .contains("rdinit=/.oci2uk/init"));
    assert_eq!(
        a["org.opencontainers.image.base.name"],
        format!("{reg}/nginx:latest")
    );
    assert!(a["org.opencontainers.image.base.digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(a["org.oci2uk.file.digest"], sha256_of(elf));
    assert!(
        a["org.oci2uk.memory"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert!(a["org.oci2uk.kernel.version"].as_str().unwrap().len() > 3);
    assert!(a["org.oci2uk.rootfs.digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));

    // The layer holds the file byte for byte, and urunc's metadata file.
    let files = layer_files(&r1);
    let original = std::fs::read(elf).unwrap();
    let (_, copy) = files
        .iter()
        .find(|(n, _)| n == "unikernel/nginx.elf")
        .expect("unikernel/nginx.elf in the layer");
    assert!(copy == &original, "the pushed file differs from nginx.elf");
    let (_, urunc) = files.iter().find(|(n, _)| n == "urunc.json").unwrap();
    let urunc: serde_json::Value = serde_json::from_slice(urunc).unwrap();
    assert!(urunc["com.urunc.unikernel.binary"]
        .as_str()
        .unwrap()
        .starts_with("b64:"));

    // The same file under a second tag: no upload session at all.
    let mark = log_len("OCI2UK_TEST_REGISTRY_LOG");
    let again = json(&s.oci2uk(&["push", elf_s, &format!("{reg}/{repo}:2"), "--json"]));
    assert_eq!(again["digest"], digest.as_str(), "same file, same manifest");
    assert!(again["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["how"] == "existed"));
    std::thread::sleep(Duration::from_millis(200));
    let log = log_since("OCI2UK_TEST_REGISTRY_LOG", mark);
    assert!(
        !log.contains(&format!("POST /v2/{repo}/blobs/uploads")),
        "an upload session was opened:\n{log}"
    );
    assert!(
        log.contains(&format!("PUT /v2/{repo}/manifests/2")),
        "{log}"
    );

    // Another repository of the registry: the blobs are mounted, not uploaded.
    let other = fresh("nginx");
    let mark = log_len("OCI2UK_TEST_REGISTRY_LOG");
    let mounted = json(&s.oci2uk(&["push", elf_s, &format!("{reg}/{other}:1"), "--json"]));
    assert!(
        mounted["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["how"] == "mounted"),
        "{mounted}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = log_since("OCI2UK_TEST_REGISTRY_LOG", mark);
    assert!(log.contains("blobs/uploads/?mount="), "{log}");
    assert!(!log.contains("PATCH /v2/"), "bytes were uploaded:\n{log}");

    // `inspect` reads the reference without pulling the layer.
    let info = json(&s.oci2uk(&["inspect", &r1, "--json"]));
    assert_eq!(info["kind"], "unikernel");
    assert_eq!(info["digest"], digest.as_str());

    // `run REF` fetches it through the cache and boots it.
    let _one = one_vm();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci2uk"));
    cmd.env("OCI2UK_CACHE", s.cache())
        .args(["run", &r1, "-p", &format!("127.0.0.1:{port}:80")]);
    let mut vm = Guest::start(&mut cmd, s.path().join("console"));
    let body = vm.wait_page(port, "/", Duration::from_secs(180));
    assert_eq!(&body, page);
}

#[test]
fn run_builds_an_ordinary_image_first() {
    let (_, page) = nginx_elf();
    let s = Scratch::new();
    let image = format!("{}/nginx:latest", env("OCI2UK_TEST_REGISTRY"));
    let _one = one_vm();
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_oci2uk"));
    cmd.env("OCI2UK_CACHE", s.cache())
        .args(["run", &image, "-p", &format!("127.0.0.1:{port}:80")]);
    let mut vm = Guest::start(&mut cmd, s.path().join("console"));
    let body = vm.wait_page(port, "/", Duration::from_secs(240));
    assert_eq!(&body, page);
    drop(vm);
    // The build is kept for the next run.
    let builds: Vec<PathBuf> = std::fs::read_dir(s.cache().join("builds"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(builds.len(), 1, "{builds:?}");
}

#[test]
fn htpasswd_registry_push_with_creds() {
    let (elf, _) = nginx_elf();
    let s = Scratch::new();
    let reg = env("OCI2UK_TEST_REGISTRY_HTPASSWD");
    let password = env("OCI2UK_TEST_PASSWORD");
    let r = format!("{reg}/{}:1", fresh("nginx"));
    let elf_s = elf.to_str().unwrap();

    let out = s.oci2uk(&[
        "push",
        elf_s,
        &r,
        "--creds",
        &env("OCI2UK_TEST_CREDS"),
        "--quiet",
    ]);
    assert_ok(&out);
    let user = env("OCI2UK_TEST_USER");
    let creds = format!("{user}:{password}");
    let m = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", "--creds", &creds])
        .arg(format!("docker://{r}"))
        .output()
        .unwrap();
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    assert!(String::from_utf8_lossy(&m.stdout).contains("com.urunc.unikernel.binary"));

    // Wrong credentials: one clear line, a failure status, and no secret anywhere, even in
    // the debug log.
    let wrong = format!("{user}:not-{password}");
    let out = Command::new(env!("CARGO_BIN_EXE_oci2uk"))
        .args(["push", elf_s, &r, "--creds", &wrong])
        .env("OCI2UK_CACHE", s.cache())
        .output()
        .unwrap();
    let line = assert_fails(&out, 1, &["denied", &reg]);
    assert!(!line.contains(&password));
    let out = Command::new(env!("CARGO_BIN_EXE_oci2uk"))
        .args(["push", elf_s, &r, "--creds", &wrong])
        .env("OCI2UK_CACHE", s.cache())
        .env("OCI2UK_LOG", "debug")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    for text in [&out.stdout, &out.stderr] {
        let t = String::from_utf8_lossy(text);
        assert!(!t.contains(&password), "the password leaked:\n{t}");
        assert!(!t.contains("Basic "), "an Authorization value leaked:\n{t}");
    }
    let log = std::fs::read_to_string(env("OCI2UK_TEST_REGISTRY_HTPASSWD_LOG")).unwrap();
    assert!(!log.contains(&password), "the registry logged the password");
}

/// The kernel the other tests bake with.
fn kernel_path() -> PathBuf {
    if let Ok(k) = std::env::var("OCI2UK_KERNEL") {
        return PathBuf::from(k);
    }
    let mut ks: Vec<PathBuf> = std::fs::read_dir("/boot")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .collect();
    ks.sort();
    ks.pop().expect("a kernel in /boot")
}

#[test]
fn kernel_from_a_registry_bakes_a_file_that_boots() {
    let s = Scratch::new();
    let reg = env("OCI2UK_TEST_REGISTRY");
    let kref = format!("{reg}/{}:1", fresh("kernel"));
    let kernel = kernel_path();
    let pushed = json(&s.oci2uk(&["kernel", "push", kernel.to_str().unwrap(), &kref, "--json"]));
    assert!(pushed["digest"].as_str().unwrap().starts_with("sha256:"));
    let info = json(&s.oci2uk(&["inspect", &kref, "--json"]));
    assert_eq!(info["kind"], "kernel");

    let image = format!("{reg}/busybox:latest");
    let out = s.oci2uk(&[
        "build",
        &image,
        "--kernel",
        &kref,
        "--entrypoint",
        r#"["sh","-c","echo booted the registry kernel"]"#,
        "-o",
        "bb.elf",
        "--json",
    ]);
    let built = json(&out);
    assert!(
        built["kernel"].as_str().unwrap().contains("kernels"),
        "the kernel came from the cache: {built}"
    );
    let _one = one_vm();
    let out = s.oci2uk(&["run", s.path().join("work/bb.elf").to_str().unwrap()]);
    let console = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "console:\n{console}");
    assert!(console.contains("booted the registry kernel"), "{console}");

    // A reference that is no kernel artifact is refused with a clear line.
    let out = s.oci2uk(&[
        "build",
        &image,
        "--kernel",
        &format!("{reg}/busybox:latest"),
    ]);
    assert_fails(&out, 1, &["not a kernel artifact"]);
}

#[test]
fn build_push_bundle_and_inspect() {
    let s = Scratch::new();
    let reg = env("OCI2UK_TEST_REGISTRY");
    let r = format!("{reg}/{}:1", fresh("busybox"));
    let image = format!("{reg}/busybox:latest");
    let out = s.oci2uk(&[
        "build", &image, "--format", "bundle", "--push", &r, "--json",
    ]);
    let v = json(&out);
    let digest = v["push"]["digest"].as_str().unwrap();
    assert!(digest.starts_with("sha256:"), "{v}");
    let names: Vec<String> = layer_files(&r).into_iter().map(|(n, _)| n).collect();
    for want in [
        "unikernel/busybox.elf",
        "unikernel/vmlinux",
        "unikernel/initrd",
        "unikernel/qemu.sh",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }

    // --push needs a file to push.
    let out = s.oci2uk(&["build", &image, "--format", "tar", "--push", &r]);
    assert_fails(&out, 1, &["--push needs --format elf or bundle"]);
    assert!(!s.outputs().contains(&"busybox.tar".to_string()));

    // inspect FILE reads the file's own record.
    let elf = s.path().join("work/busybox.bundle/busybox.elf");
    let info = json(&s.oci2uk(&["inspect", elf.to_str().unwrap(), "--json"]));
    assert_eq!(info["kind"], "file");
    assert_eq!(info["source"]["image"], image.as_str());
    assert_eq!(info["sha256"], sha256_of(&elf));
    assert!(info["memory_mib"].as_u64().unwrap() > 0);
    assert!(info["config"]["rc"][0]["bin"].is_string(), "{info}");

    // inspect REF of a container image shows its config.
    let info = json(&s.oci2uk(&["inspect", &image, "--json"]));
    assert_eq!(info["kind"], "image");
    assert_eq!(info["config"]["architecture"], "amd64");

    // Pushing something that is not a baked file is refused.
    std::fs::write(s.path().join("work/junk.elf"), b"not an ELF").unwrap();
    let out = s.oci2uk(&["push", "junk.elf", &r]);
    assert_fails(&out, 1, &["junk.elf", "not a file baked by oci2uk"]);
}

#[test]
fn token_registry_push_asks_for_push_scope() {
    let (elf, _) = nginx_elf();
    let s = Scratch::new();
    let reg = env("OCI2UK_TEST_REGISTRY_TOKEN");
    let repo = fresh("nginx");
    let r = format!("{reg}/{repo}:1");
    let elf_s = elf.to_str().unwrap();
    let mark = log_len("OCI2UK_TEST_TOKEN_SERVER_LOG");
    let out = s.oci2uk(&[
        "push",
        elf_s,
        &r,
        "--creds",
        &env("OCI2UK_TEST_CREDS"),
        "--json",
    ]);
    let v = json(&out);
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"));
    std::thread::sleep(Duration::from_millis(200));
    let log = log_since("OCI2UK_TEST_TOKEN_SERVER_LOG", mark);
    let wanted = format!("repository%3A{}%3Apull%2Cpush", repo.replace('/', "%2F"));
    assert!(log.contains(&wanted), "no push scope asked for:\n{log}");
    // Anonymous pushes get a token that grants nothing: one clear line.
    let out = s.oci2uk(&["push", elf_s, &r]);
    assert_fails(&out, 1, &["denied", &repo]);
}

#[test]
fn a_stale_mount_record_falls_back_to_an_upload() {
    let (elf, _) = nginx_elf();
    let s = Scratch::new();
    let reg = env("OCI2UK_TEST_REGISTRY");
    let elf_s = elf.to_str().unwrap();
    let first = json(&s.oci2uk(&[
        "push",
        elf_s,
        &format!("{reg}/{}:1", fresh("nginx")),
        "--json",
    ]));
    // The cache's record says another repository holds the blobs; the registry cannot mount
    // from there (it does not exist), answers 202 and the upload goes on in that session.
    let records = s.cache().join("pushed").join("127.0.0.1_5000.json");
    let mut map = serde_json::Map::new();
    for b in first["blobs"].as_array().unwrap() {
        map.insert(
            b["digest"].as_str().unwrap().to_string(),
            serde_json::json!(["no-such/repository"]),
        );
    }
    std::fs::write(&records, serde_json::to_vec(&map).unwrap()).unwrap();
    let repo = fresh("nginx");
    let mark = log_len("OCI2UK_TEST_REGISTRY_LOG");
    let v = json(&s.oci2uk(&["push", elf_s, &format!("{reg}/{repo}:1"), "--json"]));
    assert!(
        v["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["how"] == "uploaded"),
        "{v}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = log_since("OCI2UK_TEST_REGISTRY_LOG", mark);
    assert!(
        log.contains(&format!("POST /v2/{repo}/blobs/uploads/?mount=")) && log.contains("\" 202 "),
        "{log}"
    );
    assert!(
        log.contains(&format!("PATCH /v2/{repo}/blobs/uploads/")),
        "{log}"
    );
    assert_eq!(v["digest"], first["digest"], "same file, same manifest");
}

#[test]
fn upload_faults_are_retried_and_a_permanent_one_is_one_line() {
    use crate::faults::{start_proxy_with_uploads, Fault};
    let (elf, _) = nginx_elf();
    let elf_s = elf.to_str().unwrap();
    let s = Scratch::new();
    // Chunk 2 of the layer gets a 503, the retried session's first chunk a reset.
    let proxy = start_proxy_with_uploads(
        env("OCI2UK_TEST_REGISTRY"),
        vec![],
        vec![],
        vec![Fault::Forward, Fault::Unavailable, Fault::Reset],
    );
    let repo = fresh("nginx");
    let v = json(&s.oci2uk(&["push", elf_s, &format!("{}/{repo}:1", proxy.addr), "--json"]));
    let log = proxy.log.lock().unwrap().requests.join("\n");
    assert!(
        log.contains("PATCH") && log.contains("Unavailable"),
        "{log}"
    );
    assert!(log.contains("Reset"), "{log}");
    // The result is what a push without faults gives, and the layer is whole.
    let direct = json(&s.oci2uk(&[
        "push",
        elf_s,
        &format!("{}/{}:1", env("OCI2UK_TEST_REGISTRY"), fresh("nginx")),
        "--json",
    ]));
    assert_eq!(v["digest"], direct["digest"]);
    let files = layer_files(&format!("{}/{repo}:1", env("OCI2UK_TEST_REGISTRY")));
    let original = std::fs::read(elf).unwrap();
    assert!(files
        .iter()
        .any(|(n, d)| n == "unikernel/nginx.elf" && d == &original));

    // Every upload request failing: one clear line and status 1.
    let proxy = start_proxy_with_uploads(
        env("OCI2UK_TEST_REGISTRY"),
        vec![],
        vec![],
        vec![Fault::Always500; 64],
    );
    let out = s.oci2uk(&[
        "push",
        elf_s,
        &format!("{}/{}:1", proxy.addr, fresh("nginx")),
    ]);
    assert_fails(&out, 1, &["cannot push", "500"]);
}
