//! Pulls from the real loopback registries (`testregistry/`), compared with what an
//! independent tool (`umoci raw unpack`) makes of the same images.

use std::path::PathBuf;
use std::process::Command;

use crate::util::*;

/// `umoci raw unpack` of a tag of the fixture layout, done once per test run.
fn umoci_tree(tag: &str) -> Tree {
    let base = process_dir().join("umoci");
    std::fs::create_dir_all(&base).unwrap();
    let dir: PathBuf = base.join(tag);
    // Each tag is unpacked by the first test that needs it; a lock file serialises them.
    let lock = std::fs::File::create(base.join(format!("{tag}.lock"))).unwrap();
    lock.lock().unwrap();
    if !dir.exists() {
        let layout = env("OCI2UK_TEST_LAYOUT");
        let out = Command::new("umoci")
            .args(["raw", "unpack", "--image", &format!("{layout}:{tag}")])
            .arg(&dir)
            .output()
            .expect("umoci is installed (testregistry/install.sh)");
        assert!(
            out.status.success(),
            "umoci raw unpack {tag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    tree_from_dir(&dir)
}

fn pull_tree(s: &Scratch, image: &str, extra: &[&str]) -> (Tree, Vec<u8>) {
    let mut args = vec![
        "build", image, "--format", "tar", "-o", "out.tar", "--quiet",
    ];
    args.extend_from_slice(extra);
    let out = s.oci2uk(&args);
    assert_ok(&out);
    let bytes = std::fs::read(s.path().join("work/out.tar")).unwrap();
    (tree_from_tar(&bytes), bytes)
}

fn registry_image(name: &str) -> String {
    format!("{}/{name}", env("OCI2UK_TEST_REGISTRY"))
}

#[test]
fn nginx_gzip_equals_umoci() {
    let (ours, _) = pull_tree(&Scratch::new(), &registry_image("nginx:latest"), &[]);
    assert!(
        ours.len() > 1000,
        "a Debian tree has thousands of entries, got {}",
        ours.len()
    );
    assert_same_tree(&ours, &umoci_tree("nginx"), "nginx:latest");
}

#[test]
fn nginx_raw_equals_umoci() {
    let (ours, _) = pull_tree(&Scratch::new(), &registry_image("nginx:raw"), &[]);
    assert_same_tree(&ours, &umoci_tree("nginx"), "nginx:raw");
}

#[test]
fn nginx_zstd_equals_the_gzip_tree() {
    // umoci 0.4.7 cannot unpack zstd layers: the same content as gzip must give the same tree.
    let (ours, _) = pull_tree(&Scratch::new(), &registry_image("nginx:zstd"), &[]);
    assert_same_tree(&ours, &umoci_tree("nginx"), "nginx:zstd");
}

#[test]
fn nginx_docker_schema2_equals_umoci() {
    let (ours, _) = pull_tree(&Scratch::new(), &registry_image("nginx:docker"), &[]);
    assert_same_tree(&ours, &umoci_tree("nginx"), "nginx:docker");
}

#[test]
fn oci_layout_transport_equals_the_registry_pull() {
    let s = Scratch::new();
    let (from_layout, a) = pull_tree(&s, &format!("oci:{}:nginx", env("OCI2UK_TEST_LAYOUT")), &[]);
    let (from_registry, b) = pull_tree(&Scratch::new(), &registry_image("nginx:latest"), &[]);
    assert_same_tree(&from_layout, &from_registry, "oci: vs docker://");
    assert_eq!(
        a, b,
        "the same image gives the same bytes whatever the transport"
    );
}

#[test]
fn output_is_reproducible_across_caches() {
    let s = Scratch::new();
    let (_, first) = pull_tree(&s, &registry_image("nginx:latest"), &[]);
    let (_, warm) = pull_tree(&s, &registry_image("nginx:latest"), &[]);
    let (_, cold) = pull_tree(&Scratch::new(), &registry_image("nginx:latest"), &[]);
    assert!(first == warm && first == cold, "same image, same bytes");
}

#[test]
fn pull_by_digest_and_a_wrong_digest() {
    let s = Scratch::new();
    let out = s.oci2uk(&[
        "build",
        &registry_image("busybox:latest"),
        "--format",
        "tar",
        "-o",
        "a.tar",
        "--json",
    ]);
    assert_ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = v["manifest_digest"].as_str().unwrap().to_string();
    let by_digest = format!("{}/busybox@{digest}", env("OCI2UK_TEST_REGISTRY"));
    let out = s.oci2uk(&[
        "build", &by_digest, "--format", "tar", "-o", "b.tar", "--quiet",
    ]);
    assert_ok(&out);
    let work = s.path().join("work");
    assert_eq!(
        std::fs::read(work.join("a.tar")).unwrap(),
        std::fs::read(work.join("b.tar")).unwrap()
    );
    let missing = format!(
        "{}/busybox@sha256:{}",
        env("OCI2UK_TEST_REGISTRY"),
        "0".repeat(64)
    );
    let out = s.oci2uk(&["build", &missing, "--format", "tar", "-o", "c.tar"]);
    assert_fails(&out, 1, &["busybox"]);
    assert!(!work.join("c.tar").exists());
}

#[test]
fn index_platforms() {
    let elf_machine = |tree_bytes: &[u8]| -> u16 {
        let mut ar = tar::Archive::new(tree_bytes);
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_string_lossy() == "bin/busybox" {
                let mut head = [0u8; 20];
                std::io::Read::read_exact(&mut e, &mut head).unwrap();
                return u16::from_le_bytes([head[18], head[19]]);
            }
        }
        panic!("no bin/busybox");
    };
    let s = Scratch::new();
    let (_, amd) = pull_tree(
        &s,
        &registry_image("multi:latest"),
        &["--platform", "linux/amd64"],
    );
    assert_eq!(elf_machine(&amd), 62, "x86_64 busybox");
    let (_, arm) = pull_tree(
        &s,
        &registry_image("multi:latest"),
        &["--platform", "linux/arm64"],
    );
    assert_eq!(elf_machine(&arm), 183, "aarch64 busybox");
    let out = s.oci2uk(&[
        "build",
        &registry_image("multi:latest"),
        "--format",
        "tar",
        "--platform",
        "linux/s390x",
    ]);
    assert_fails(&out, 1, &["linux/s390x", "linux/amd64", "linux/arm64"]);
}

#[test]
fn missing_image_is_one_clear_line() {
    let s = Scratch::new();
    let out = s.oci2uk(&[
        "build",
        &registry_image("no/such/image:1"),
        "--format",
        "tar",
    ]);
    assert_fails(&out, 1, &["no/such/image"]);
    assert!(s.outputs().is_empty());
}

fn creds() -> String {
    env("OCI2UK_TEST_CREDS")
}

fn assert_no_secret(out: &std::process::Output) {
    let password = creds().split_once(':').unwrap().1.to_string();
    for stream in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(stream);
        assert!(!text.contains(&password), "the password was printed");
    }
}

#[test]
fn htpasswd_registry() {
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY_HTPASSWD"));
    let s = Scratch::new();
    let out = s.oci2uk(&[
        "build",
        &image,
        "--format",
        "tar",
        "-o",
        "b.tar",
        "--creds",
        &creds(),
    ]);
    assert_ok(&out);
    assert_no_secret(&out);
    let (_, plain) = pull_tree(&Scratch::new(), &registry_image("busybox:latest"), &[]);
    assert_eq!(std::fs::read(s.path().join("work/b.tar")).unwrap(), plain);

    let s = Scratch::new();
    let out = s.oci2uk(&["build", &image, "--format", "tar"]);
    assert_fails(&out, 1, &[&env("OCI2UK_TEST_REGISTRY_HTPASSWD")]);
    let wrong = format!("{}:not-the-password", creds().split_once(':').unwrap().0);
    let out = s.oci2uk(&["build", &image, "--format", "tar", "--creds", &wrong]);
    let line = assert_fails(&out, 1, &[&env("OCI2UK_TEST_REGISTRY_HTPASSWD")]);
    assert!(!line.contains("not-the-password"), "{line}");
    assert!(s.outputs().is_empty());
}

#[test]
fn htpasswd_registry_with_an_authfile() {
    use base64::Engine as _;
    let s = Scratch::new();
    let host = env("OCI2UK_TEST_REGISTRY_HTPASSWD");
    let auth = base64::engine::general_purpose::STANDARD.encode(creds());
    let file = s.path().join("auth.json");
    std::fs::write(
        &file,
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let out = s.oci2uk(&[
        "build",
        &format!("{host}/busybox:latest"),
        "--format",
        "tar",
        "--authfile",
        file.to_str().unwrap(),
    ]);
    assert_ok(&out);
    assert_no_secret(&out);
}

#[test]
fn token_registry() {
    let image = format!("{}/busybox:latest", env("OCI2UK_TEST_REGISTRY_TOKEN"));
    let s = Scratch::new();
    let out = s.oci2uk(&[
        "build",
        &image,
        "--format",
        "tar",
        "-o",
        "b.tar",
        "--creds",
        &creds(),
    ]);
    assert_ok(&out);
    assert_no_secret(&out);
    let out = s.oci2uk(&["build", &image, "--format", "tar", "-o", "c.tar"]);
    assert_fails(&out, 1, &["busybox"]);
    assert!(!s.path().join("work/c.tar").exists());
}

#[test]
fn tls_registry_with_a_ca() {
    let tls = env("OCI2UK_TEST_REGISTRY_TLS");
    let image = format!("{tls}/busybox:latest");
    let s = Scratch::new();
    let out = s.oci2uk(&[
        "build",
        &image,
        "--format",
        "tar",
        "-o",
        "b.tar",
        "--ca-cert",
        &env("OCI2UK_TEST_CA"),
    ]);
    assert_ok(&out);
    // Without the CA the certificate is not trusted, and a loopback registry that speaks TLS
    // is not silently downgraded to plain HTTP.
    let out = s.oci2uk(&["build", &image, "--format", "tar", "-o", "c.tar"]);
    assert_fails(&out, 1, &[&tls]);
    // --insecure skips verification.
    let out = s.oci2uk(&[
        "build",
        &image,
        "--format",
        "tar",
        "-o",
        "d.tar",
        "--insecure",
    ]);
    assert_ok(&out);
}
