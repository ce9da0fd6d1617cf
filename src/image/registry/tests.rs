//! Pulls from the in-memory registry of [`crate::registry::fake`], with faults injected.

use std::time::{Duration, Instant};

use super::*;
use crate::image::{Compression, Platform};
use crate::reference::ImageRef;
use crate::registry::fake::{self, Auth, Content, Fault, Registry, REPO};
use crate::registry::{retry, RegistryOptions};

fn tuning() -> Tuning {
    Tuning {
        policy: retry::Policy {
            attempts: 4,
            base: Duration::from_millis(5),
            max_delay: Duration::from_millis(40),
            max_retry_after: Duration::from_secs(2),
        },
    }
}

/// An image with two layers, the second big enough that half of it is many reads.
fn content() -> (Content, Vec<Vec<u8>>) {
    let layers = vec![
        b"first layer".to_vec(),
        (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect(),
    ];
    let mut c = Content::default();
    c.add_image(Some("1"), "amd64", &layers);
    (c, layers)
}

fn image_ref(host: &str, reference: &str) -> ImageRef {
    let sep = if reference.starts_with("sha256:") {
        "@"
    } else {
        ":"
    };
    format!("{host}/{REPO}{sep}{reference}").parse().unwrap()
}

fn options(creds: Option<&str>) -> ResolveOptions {
    ResolveOptions {
        platform: "linux/amd64".parse().unwrap(),
        registry: RegistryOptions {
            creds: creds.map(str::to_string),
            ..RegistryOptions::without_machine_auth()
        },
        max_blob_size: None,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    cache: Cache,
}

fn cache() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(Some(dir.path())).unwrap();
    Setup { _dir: dir, cache }
}

async fn pull_ref(
    r: &ImageRef,
    opts: &ResolveOptions,
    cache: &Cache,
) -> Result<Image, RegistryError> {
    pull_with(r, opts, cache, &Progress::hidden(), &tuning()).await
}

fn blob_path(digest: &str) -> String {
    format!("/v2/{REPO}/blobs/{digest}")
}

fn tmp_is_empty(cache: &Cache) -> bool {
    std::fs::read_dir(cache.tmp_dir()).unwrap().count() == 0
}

/// The full error chain, as the CLI prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[tokio::test]
async fn pulls_by_tag_and_digest_then_from_the_cache() {
    let (content, layers) = content();
    let manifest = content.manifests["1"].1.clone();
    let reg = Registry::new(content, Auth::None);
    let server = reg.serve().await;
    let s = cache();
    let r = image_ref(&server.host(), "1");
    let img = pull_ref(&r, &options(None), &s.cache).await.unwrap();
    assert_eq!(img.source, r.to_string());
    assert_eq!(img.name, "app");
    assert_eq!(img.manifest_digest.to_string(), fake::sha(&manifest));
    assert_eq!(img.layers.len(), 2);
    for (layer, data) in img.layers.iter().zip(&layers) {
        assert_eq!(layer.digest.to_string(), fake::sha(data));
        assert_eq!(layer.size, data.len() as u64);
        assert_eq!(layer.compression, Compression::Gzip);
        assert_eq!(&std::fs::read(&layer.path).unwrap(), data);
    }
    assert_eq!(img.config.rootfs().diff_ids().len(), 2);

    // By digest: verified, and every blob comes from the cache.
    let before = server.requests().len();
    let r = image_ref(&server.host(), &fake::sha(&manifest));
    let img2 = pull_ref(&r, &options(None), &s.cache).await.unwrap();
    assert_eq!(img2.manifest_digest, img.manifest_digest);
    let blob_gets = server.requests()[before..]
        .iter()
        .filter(|q| q.path().contains("/blobs/"))
        .count();
    assert_eq!(blob_gets, 0);
    assert!(tmp_is_empty(&s.cache));
}

#[tokio::test]
async fn an_index_gives_the_platform_asked_for() {
    let mut content = Content::default();
    let amd = content.add_image(None, "amd64", &[b"amd64 layer".to_vec()]);
    let arm = content.add_image(None, "arm64", &[b"arm64 layer".to_vec()]);
    content.add_index("multi", &[("amd64", &amd), ("arm64", &arm)]);
    let server = Registry::new(content, Auth::None).serve().await;
    let s = cache();
    let mut opts = options(None);
    opts.platform = "linux/arm64".parse::<Platform>().unwrap();
    let img = pull_ref(&image_ref(&server.host(), "multi"), &opts, &s.cache)
        .await
        .unwrap();
    assert_eq!(img.manifest_digest.to_string(), fake::sha(&arm));
    assert_eq!(std::fs::read(&img.layers[0].path).unwrap(), b"arm64 layer");
    assert_eq!(img.config.architecture().to_string(), "arm64");
    opts.platform = "linux/s390x".parse().unwrap();
    let e = pull_ref(&image_ref(&server.host(), "multi"), &opts, &s.cache)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("linux/amd64, linux/arm64"), "{e}");
}

#[tokio::test]
async fn transient_faults_are_retried_and_broken_bodies_resumed() {
    let (content, layers) = content();
    let (small, big) = (fake::sha(&layers[0]), fake::sha(&layers[1]));
    let reg = Registry::new(content, Auth::None);
    reg.faults(
        &format!("/v2/{REPO}/manifests/1"),
        &[Fault::Status(503, None)],
    );
    reg.faults(
        &blob_path(&small),
        &[Fault::Status(429, Some("1")), Fault::Status(502, None)],
    );
    reg.faults(
        &blob_path(&big),
        &[Fault::Cut, Fault::Reset, Fault::Status(500, None)],
    );
    let server = reg.serve().await;
    let s = cache();
    let started = Instant::now();
    let img = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured"
    );
    assert_eq!(std::fs::read(&img.layers[1].path).unwrap(), layers[1]);
    let big_gets: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|q| q.path() == blob_path(&big))
        .collect();
    assert_eq!(big_gets.len(), 4, "cut, reset, 500, then success");
    let ranges: Vec<_> = big_gets.iter().filter_map(|q| q.header("range")).collect();
    assert!(
        ranges
            .iter()
            .any(|r| r.starts_with("bytes=") && r != &"bytes=0-"),
        "the cut body was resumed with Range: {ranges:?}"
    );
    assert!(big_gets[0].header("range").is_none());
    assert!(tmp_is_empty(&s.cache));
}

#[tokio::test]
async fn a_server_ignoring_range_restarts_the_blob() {
    let (content, layers) = content();
    let big = fake::sha(&layers[1]);
    let reg = Registry::new(content, Auth::None);
    reg.faults(&blob_path(&big), &[Fault::Cut, Fault::IgnoreRange]);
    let server = reg.serve().await;
    let s = cache();
    let img = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&img.layers[1].path).unwrap(), layers[1]);
    let gets = server
        .requests()
        .into_iter()
        .filter(|q| q.path() == blob_path(&big))
        .count();
    assert_eq!(gets, 2);
}

#[tokio::test]
async fn a_permanent_fault_fails_clearly_and_leaves_nothing() {
    let (content, layers) = content();
    let big = fake::sha(&layers[1]);
    let reg = Registry::new(content, Auth::None);
    reg.always(&blob_path(&big), Fault::Status(500, None));
    let server = reg.serve().await;
    let s = cache();
    let e = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap_err();
    let text = chain(&e);
    assert!(
        matches!(e, RegistryError::Exhausted { attempts: 4, .. }),
        "{text}"
    );
    assert!(
        text.contains(&big) && text.contains(&blob_path(&big)),
        "{text}"
    );
    assert!(
        text.contains("HTTP 500") && text.contains("UNAVAILABLE"),
        "{text}"
    );
    assert!(!s.cache.blob_path(&big.parse().unwrap()).exists());
    assert!(tmp_is_empty(&s.cache));
}

#[tokio::test]
async fn a_corrupt_blob_is_fetched_once_more_then_refused() {
    let (content, layers) = content();
    let big = fake::sha(&layers[1]);
    let reg = Registry::new(content.clone(), Auth::None);
    reg.always(&blob_path(&big), Fault::Corrupt);
    let server = reg.serve().await;
    let s = cache();
    let e = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap_err();
    let text = chain(&e);
    assert!(matches!(e, RegistryError::Corrupt { .. }), "{text}");
    assert!(
        text.contains(&big) && text.contains("does not match"),
        "{text}"
    );
    let gets = server
        .requests()
        .into_iter()
        .filter(|q| q.path() == blob_path(&big))
        .count();
    assert_eq!(gets, 2);
    assert!(!s.cache.blob_path(&big.parse().unwrap()).exists());
    assert!(tmp_is_empty(&s.cache));

    // Corrupt once only: the second fetch succeeds.
    let reg = Registry::new(content, Auth::None);
    reg.faults(&blob_path(&big), &[Fault::Corrupt]);
    let server = reg.serve().await;
    let img = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&img.layers[1].path).unwrap(), layers[1]);
}

#[tokio::test]
async fn redirected_blobs_never_carry_the_registry_credentials() {
    let (content, layers) = content();
    let reg = Registry::new(
        content,
        Auth::Basic {
            user: "alice".into(),
            pass: "s3cret".into(),
        },
    );
    let cdn = fake::cdn(&reg).await;
    // 127.0.0.1 and localhost are different origins.
    let cdn_base = format!("http://localhost:{}", cdn.addr.port());
    for l in &layers {
        reg.always(&blob_path(&fake::sha(l)), Fault::Redirect(cdn_base.clone()));
    }
    let server = reg.serve().await;
    let s = cache();
    let img = pull_ref(
        &image_ref(&server.host(), "1"),
        &options(Some("alice:s3cret")),
        &s.cache,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&img.layers[1].path).unwrap(), layers[1]);
    let cdn_requests = cdn.requests();
    assert_eq!(cdn_requests.len(), 2, "{cdn_requests:?}");
    for q in &cdn_requests {
        assert!(q.header("authorization").is_none(), "{q:?}");
        assert_eq!(q.query("sig"), vec!["SIGNATURE-SECRET".to_string()]);
    }
    let blob_requests: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|q| q.path().contains("/blobs/"))
        .collect();
    assert!(blob_requests
        .iter()
        .all(|q| q.header("authorization").is_some()));

    // Wrong credentials: denied, without the password anywhere in the message.
    let e = pull_ref(
        &image_ref(&server.host(), "1"),
        &options(Some("alice:wrong-pw")),
        &s.cache,
    )
    .await
    .unwrap_err();
    let text = chain(&e);
    assert!(matches!(e, RegistryError::Denied { .. }), "{text}");
    assert!(text.contains("--creds") && text.contains(REPO), "{text}");
    assert!(
        !text.contains("wrong-pw") && !format!("{e:?}").contains("wrong-pw"),
        "{text}"
    );
    // No credentials at all.
    let e = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("anonymously"), "{e}");
}

#[tokio::test]
async fn a_redirect_to_plain_http_elsewhere_is_refused() {
    let (content, layers) = content();
    let reg = Registry::new(content, Auth::None);
    reg.always(
        &blob_path(&fake::sha(&layers[0])),
        Fault::Redirect("http://cdn.example".into()),
    );
    let server = reg.serve().await;
    let s = cache();
    let e = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap_err();
    let text = chain(&e);
    assert!(matches!(e, RegistryError::Redirect { .. }), "{text}");
    assert!(
        text.contains("plain HTTP to cdn.example") && !text.contains("SIGNATURE"),
        "{text}"
    );
}

#[tokio::test]
async fn bearer_tokens_come_from_the_realm_with_the_credentials() {
    let tokens = fake::token_service("tok-123", Some(("bob", "hunter2")), None).await;
    let realm = format!("http://localhost:{}/token", tokens.addr.port());
    let (content, _) = content();
    let reg = Registry::new(
        content,
        Auth::Bearer {
            realm,
            token: "tok-123".into(),
        },
    );
    let server = reg.serve().await;
    let s = cache();
    pull_ref(
        &image_ref(&server.host(), "1"),
        &options(Some("bob:hunter2")),
        &s.cache,
    )
    .await
    .unwrap();
    let token_requests = tokens.requests();
    assert_eq!(
        token_requests.len(),
        1,
        "the token is cached for its lifetime"
    );
    let q = &token_requests[0];
    assert!(q
        .header("authorization")
        .is_some_and(|a| a.starts_with("Basic ")));
    assert_eq!(q.query("service"), vec!["fake".to_string()]);
    assert_eq!(q.query("scope"), vec![format!("repository:{REPO}:pull")]);
    assert_eq!(q.query("account"), vec!["bob".to_string()]);
    for q in server.requests() {
        let a = q.header("authorization").unwrap_or("");
        assert!(
            !a.starts_with("Basic"),
            "credentials reached the registry: {q:?}"
        );
        if q.path() != "/v2/" {
            assert_eq!(a, "Bearer tok-123", "{q:?}");
        }
    }

    // A token the registry stops accepting mid-pull is renewed once.
    let before = tokens.requests().len();
    reg.faults(&format!("/v2/{REPO}/manifests/1"), &[Fault::Challenge]);
    let s2 = cache();
    pull_ref(
        &image_ref(&server.host(), "1"),
        &options(Some("bob:hunter2")),
        &s2.cache,
    )
    .await
    .unwrap();
    assert_eq!(
        tokens.requests().len(),
        before + 2,
        "one at the ping, one renewal"
    );

    // The token service refuses other credentials.
    let e = pull_ref(
        &image_ref(&server.host(), "1"),
        &options(Some("bob:nope")),
        &s.cache,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, RegistryError::Denied { .. }), "{e}");
    assert!(e.to_string().contains("token service refused"), "{e}");
}

#[tokio::test]
async fn anonymous_bearer_tokens() {
    let tokens = fake::token_service("anon", None, None).await;
    let (content, _) = content();
    let reg = Registry::new(
        content,
        Auth::Bearer {
            realm: format!("http://{}/token", tokens.host()),
            token: "anon".into(),
        },
    );
    let server = reg.serve().await;
    let s = cache();
    pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap();
    assert!(tokens
        .requests()
        .iter()
        .all(|q| q.header("authorization").is_none()));
    // A tag that is not there.
    let e = pull_ref(&image_ref(&server.host(), "nope"), &options(None), &s.cache)
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("manifest unknown: {}/{REPO}:nope not found", server.host())
    );
}

#[tokio::test]
async fn identity_tokens_from_an_auth_file_use_the_refresh_grant() {
    let tokens = fake::token_service("from-refresh", None, Some("refresh-xyz")).await;
    let (content, _) = content();
    let reg = Registry::new(
        content,
        Auth::Bearer {
            realm: format!("http://{}/token", tokens.host()),
            token: "from-refresh".into(),
        },
    );
    let server = reg.serve().await;
    let s = cache();
    let dir = tempfile::tempdir().unwrap();
    let authfile = dir.path().join("config.json");
    std::fs::write(
        &authfile,
        format!(
            r#"{{"auths":{{"http://{}/v1/":{{"identitytoken":"refresh-xyz"}}}}}}"#,
            server.host()
        ),
    )
    .unwrap();
    let mut opts = options(None);
    opts.registry.authfile = Some(authfile.clone());
    pull_ref(&image_ref(&server.host(), "1"), &opts, &s.cache)
        .await
        .unwrap();
    let q = &tokens.requests()[0];
    assert_eq!(q.method, "POST");
    assert!(q.header("authorization").is_none());

    // A refused refresh token names the file it came from.
    std::fs::write(
        &authfile,
        format!(
            r#"{{"auths":{{"{}":{{"identitytoken":"stale"}}}}}}"#,
            server.host()
        ),
    )
    .unwrap();
    let e = pull_ref(&image_ref(&server.host(), "1"), &opts, &s.cache)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&authfile.display().to_string()) && !e.contains("stale"),
        "{e}"
    );
}

#[tokio::test]
async fn oversized_manifests_are_refused() {
    let mut content = Content::default();
    let big = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{}},"layers":[],"pad":"{}"}}"#,
        fake::OCI_MANIFEST,
        "x".repeat(5 << 20)
    );
    content.put_manifest(Some("big"), fake::OCI_MANIFEST, big.into_bytes());
    let reg = Registry::new(content, Auth::None);
    let path = format!("/v2/{REPO}/manifests/big");
    reg.faults(&path, &[Fault::Unframed, Fault::Unframed]);
    let server = reg.serve().await;
    let s = cache();
    let r = image_ref(&server.host(), "big");
    for framing in ["no Content-Length", "Content-Length"] {
        let e = pull_ref(&r, &options(None), &s.cache).await.unwrap_err();
        assert!(
            matches!(e, RegistryError::TooLarge { .. }),
            "{framing}: {e}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&r.to_string()) && text.contains("4194304"),
            "{text}"
        );
    }
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|q| q.path() == path)
            .count(),
        2
    );
}

#[tokio::test]
async fn a_wrong_content_digest_header_is_refused() {
    let (content, _) = content();
    let reg = Registry::new(content, Auth::None);
    reg.faults(
        &format!("/v2/{REPO}/manifests/1"),
        &[Fault::WrongDigestHeader],
    );
    let server = reg.serve().await;
    let s = cache();
    let e = pull_ref(&image_ref(&server.host(), "1"), &options(None), &s.cache)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains("Docker-Content-Digest"), "{e}");
}

#[tokio::test]
async fn an_unreachable_registry_says_so() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = cache();
    let e = pull_ref(
        &image_ref(&format!("127.0.0.1:{port}"), "1"),
        &options(None),
        &s.cache,
    )
    .await
    .unwrap_err();
    let text = chain(&e);
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{text}");
    assert!(
        text.contains(&format!("https://127.0.0.1:{port}/v2/")),
        "{text}"
    );
}

#[test]
fn pull_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let s = cache();
    let r: ImageRef = "127.0.0.1:1/x:1".parse().unwrap();
    let opts = ResolveOptions::default();
    let progress = Progress::hidden();
    let f = pull(&r, &opts, &s.cache, &progress);
    assert_send(&f);
}

#[test]
fn options_debug_redacts_credentials() {
    let o = RegistryOptions {
        creds: Some("user:hunter2".into()),
        ..Default::default()
    };
    let shown = format!("{o:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("user:"),
        "{shown}"
    );
}
