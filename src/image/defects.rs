//! The same defects through every transport: a registry (the in-process fake), an OCI layout
//! directory, an `oci-archive:` and a `docker-archive:` are each built from one description
//! of a broken image, and each must refuse it with the same error kind and message (but for
//! the name it gives the object).

use std::path::PathBuf;
use std::time::Duration;

use oci_spec::image::Digest;
use serde_json::{json, Value};

use super::docker_archive::tests::{config, gzip, layer, tar_of, M};
use super::*;
use crate::cache::Hasher;
use crate::flatten::{flatten, FlattenOptions};
use crate::oci::{VerifyError, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST};
use crate::reference::ImageRef;
use crate::registry::client::Tuning;
use crate::registry::fake::{Auth, Content, Registry, REPO};
use crate::registry::retry::Policy;

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn sha(b: &[u8]) -> Digest {
    let mut h = Hasher::sha256();
    h.update(b);
    h.finish()
}

fn desc(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha(bytes).to_string(), "size": bytes.len()})
}

fn amd64(mut d: Value) -> Value {
    d["platform"] = json!({"os": "linux", "architecture": "amd64"});
    d
}

fn manifest(config: Value, layers: &[Value], note: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": config, "layers": layers, "annotations": {"note": note},
    }))
    .unwrap()
}

fn index(entries: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
        .unwrap()
}

/// A broken image, as blobs every transport is made from.
struct Parts {
    /// The document the reference or `index.json` names: media type and bytes.
    top: (&'static str, Vec<u8>),
    /// Blobs (manifests, configs, layers) under the digest their descriptors give.
    blobs: Vec<(Digest, Vec<u8>)>,
    /// The same image as `docker save` writes it (config, layers), when it has that form.
    docker: Option<(Vec<u8>, Vec<Vec<u8>>)>,
}

impl Parts {
    /// An image whose manifest is `manifest` (named by the index entry `entry`).
    fn indexed(entry: Value, manifest: Vec<u8>, blobs: Vec<(Digest, Vec<u8>)>) -> Self {
        let name: Digest = entry["digest"].as_str().unwrap().parse().unwrap();
        let mut blobs = blobs;
        blobs.push((name, manifest));
        Self {
            top: (OCI_INDEX, index(&[entry])),
            blobs,
            docker: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    BadDigest,
    WrongSize,
    NestedIndex,
    ConfigMediaType,
    DiffIdCount,
    InvalidConfig,
    UncompressedDiffId,
    OversizeConfig,
}

const DEFECTS: &[Defect] = &[
    Defect::BadDigest,
    Defect::WrongSize,
    Defect::NestedIndex,
    Defect::ConfigMediaType,
    Defect::DiffIdCount,
    Defect::InvalidConfig,
    Defect::UncompressedDiffId,
    Defect::OversizeConfig,
];

/// The image with `defect`, and the kind of error it must give.
fn parts(defect: Defect) -> (Parts, &'static str) {
    let tar = layer("a", b"a");
    let gz = gzip(&tar);
    let good_config = config(&[&sha(&tar)]);
    let blobs = |config: &[u8], layers: &[&[u8]]| -> Vec<(Digest, Vec<u8>)> {
        std::iter::once(config)
            .chain(layers.iter().copied())
            .map(|b| (sha(b), b.to_vec()))
            .collect()
    };
    let image = |config_type: &str, config: &[u8], layers: &[(&str, &[u8])], note: &str| {
        let ls: Vec<Value> = layers.iter().map(|(t, b)| desc(t, b)).collect();
        manifest(desc(config_type, config), &ls, note)
    };
    match defect {
        Defect::BadDigest => {
            let m = image(OCI_CONFIG, &good_config, &[(GZIP_LAYER, &gz)], "x");
            let liar = image(OCI_CONFIG, &good_config, &[(GZIP_LAYER, &gz)], "y");
            let p = Parts::indexed(
                amd64(desc(OCI_MANIFEST, &m)),
                liar,
                blobs(&good_config, &[&gz]),
            );
            (p, "Digest")
        }
        Defect::WrongSize => {
            let m = image(OCI_CONFIG, &good_config, &[(GZIP_LAYER, &gz)], "x");
            let mut entry = amd64(desc(OCI_MANIFEST, &m));
            entry["size"] = json!(m.len() + 1);
            (
                Parts::indexed(entry, m, blobs(&good_config, &[&gz])),
                "Size",
            )
        }
        Defect::NestedIndex => {
            let m = image(OCI_CONFIG, &good_config, &[(GZIP_LAYER, &gz)], "x");
            let inner = index(&[amd64(desc(OCI_MANIFEST, &m))]);
            let mut b = blobs(&good_config, &[&gz]);
            b.push((sha(&m), m));
            (
                Parts::indexed(amd64(desc(OCI_MANIFEST, &inner)), inner, b),
                "NestedIndex",
            )
        }
        Defect::ConfigMediaType => {
            let helm = "application/vnd.cncf.helm.config.v1+json";
            let m = image(helm, &good_config, &[(GZIP_LAYER, &gz)], "x");
            (
                Parts::indexed(
                    amd64(desc(OCI_MANIFEST, &m)),
                    m,
                    blobs(&good_config, &[&gz]),
                ),
                "NotAnImage",
            )
        }
        Defect::DiffIdCount | Defect::InvalidConfig | Defect::UncompressedDiffId => {
            let (c, layer_type, blob, kind): (Vec<u8>, _, &[u8], _) = match defect {
                Defect::DiffIdCount => (config(&[]), GZIP_LAYER, &gz, "DiffIdCount"),
                Defect::InvalidConfig => {
                    (b"{\"os\": 1}".to_vec(), GZIP_LAYER, &gz, "InvalidConfig")
                }
                _ => (config(&[&sha(b"x")]), TAR_LAYER, &tar, "DiffId"),
            };
            let m = image(OCI_CONFIG, &c, &[(layer_type, blob)], "x");
            let mut p = Parts::indexed(amd64(desc(OCI_MANIFEST, &m)), m, blobs(&c, &[blob]));
            p.docker = Some((c, vec![blob.to_vec()]));
            (p, kind)
        }
        Defect::OversizeConfig => {
            let mut c = desc(OCI_CONFIG, &good_config);
            c["size"] = json!(MAX_DOCUMENT_SIZE + 1);
            let m = manifest(c, &[desc(GZIP_LAYER, &gz)], "x");
            (
                Parts::indexed(
                    amd64(desc(OCI_MANIFEST, &m)),
                    m,
                    blobs(&good_config, &[&gz]),
                ),
                "TooLarge",
            )
        }
    }
}

fn kind(e: &VerifyError) -> &'static str {
    match e {
        VerifyError::TooLarge { .. } => "TooLarge",
        VerifyError::Size { .. } => "Size",
        VerifyError::Digest { .. } => "Digest",
        VerifyError::Algorithm { .. } => "Algorithm",
        VerifyError::NestedIndex { .. } => "NestedIndex",
        VerifyError::NotAnImage { .. } => "NotAnImage",
        VerifyError::InvalidConfig { .. } => "InvalidConfig",
        VerifyError::DiffIdCount { .. } => "DiffIdCount",
        VerifyError::DiffId { .. } => "DiffId",
    }
}

/// The message with the transport's names for the objects blanked out.
fn shape(e: &VerifyError) -> String {
    let mut e = e.clone();
    match &mut e {
        VerifyError::TooLarge { what, .. }
        | VerifyError::Size { what, .. }
        | VerifyError::Digest { what, .. }
        | VerifyError::Algorithm { what }
        | VerifyError::NestedIndex { what }
        | VerifyError::NotAnImage { what, .. }
        | VerifyError::InvalidConfig { what, .. }
        | VerifyError::DiffId { what, .. } => *what = "X".into(),
        VerifyError::DiffIdCount { what, manifest, .. } => {
            *what = "X".into();
            *manifest = "M".into();
        }
    }
    e.to_string()
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

struct Site {
    dir: tempfile::TempDir,
    cache: Cache,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(&dir.path().join("cache"))).unwrap();
        Self { dir, cache }
    }

    /// The OCI layout's files, as (path, bytes).
    fn layout_files(p: &Parts) -> Vec<(String, Vec<u8>)> {
        let mut files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            ("index.json".to_string(), index(&[desc(p.top.0, &p.top.1)])),
            (
                format!("blobs/sha256/{}", sha(&p.top.1).digest()),
                p.top.1.clone(),
            ),
        ];
        for (d, b) in &p.blobs {
            files.push((format!("blobs/sha256/{}", d.digest()), b.clone()));
        }
        files
    }

    fn oci_dir(&self, p: &Parts) -> PathBuf {
        let root = self.dir.path().join("layout");
        for (name, bytes) in Self::layout_files(p) {
            let path = root.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        root
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn oci_archive_bytes(p: &Parts) -> Vec<u8> {
        let files = Self::layout_files(p);
        let members: Vec<M<'_>> = files
            .iter()
            .map(|(n, b)| M::File(n.as_str(), b.clone()))
            .collect();
        tar_of(&members)
    }

    fn docker_archive_bytes(config: &[u8], layers: &[Vec<u8>]) -> Vec<u8> {
        let names: Vec<String> = (0..layers.len())
            .map(|i| format!("{i}/layer.tar"))
            .collect();
        let manifest = serde_json::to_vec(&json!([
            {"Config": "config.json", "RepoTags": ["x:1"], "Layers": names}
        ]))
        .unwrap();
        let mut members = vec![
            M::File("manifest.json", manifest),
            M::File("config.json", config.to_vec()),
        ];
        for (n, l) in names.iter().zip(layers) {
            members.push(M::File(n, l.clone()));
        }
        tar_of(&members)
    }

    fn options() -> ResolveOptions {
        ResolveOptions {
            platform: "linux/amd64".parse().unwrap(),
            registry: crate::registry::RegistryOptions::without_machine_auth(),
            max_blob_size: None,
        }
    }

    async fn registry(&self, p: &Parts) -> Result<Image, ImageError> {
        let mut content = Content::default();
        content.put_manifest(Some("1"), p.top.0, p.top.1.clone());
        for (d, b) in &p.blobs {
            content
                .manifests
                .insert(d.to_string(), (OCI_MANIFEST.to_string(), b.clone()));
            content.blobs.insert(d.to_string(), b.clone());
        }
        let server = Registry::new(content, Auth::None).serve().await;
        let r: ImageRef = format!("{}/{REPO}:1", server.host()).parse().unwrap();
        let tuning = Tuning {
            policy: Policy {
                attempts: 2,
                base: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
                max_retry_after: Duration::from_millis(5),
            },
        };
        Ok(registry::pull_with(
            &r,
            &Self::options(),
            &self.cache,
            &Progress::hidden(),
            &tuning,
        )
        .await?)
    }

    fn oci(&self, p: &Parts) -> Result<Image, ImageError> {
        Ok(layout::resolve_dir(
            &self.oci_dir(p),
            None,
            &Self::options(),
        )?)
    }

    fn oci_archive(&self, bytes: &[u8]) -> Result<Image, ImageError> {
        let path = self.write("oci.tar", bytes);
        Ok(layout::resolve_archive(
            &path,
            None,
            &Self::options(),
            &self.cache,
        )?)
    }

    fn docker_archive(&self, bytes: &[u8]) -> Result<Image, ImageError> {
        let path = self.write("docker.tar", bytes);
        Ok(docker_archive::resolve_capped(
            &path,
            None,
            &self.cache,
            None,
        )?)
    }

    /// Every transport's answer to `p`, by name.
    async fn all(&self, p: &Parts) -> Vec<(&'static str, Result<Image, ImageError>)> {
        let mut out = vec![
            ("registry", self.registry(p).await),
            ("oci", self.oci(p)),
            ("oci-archive", self.oci_archive(&Self::oci_archive_bytes(p))),
        ];
        if let Some((config, layers)) = &p.docker {
            out.push((
                "docker-archive",
                self.docker_archive(&Self::docker_archive_bytes(config, layers)),
            ));
        }
        out
    }
}

#[tokio::test]
async fn the_same_defect_gives_the_same_error_from_every_transport() {
    for &defect in DEFECTS {
        let (p, want) = parts(defect);
        let site = Site::new();
        let mut shapes = Vec::new();
        for (transport, r) in site.all(&p).await {
            let e = match r {
                Ok(_) => panic!("{defect:?} through {transport}: resolved"),
                Err(e) => e,
            };
            // An archive copies every blob into the cache, verified against the digest its
            // member name gives, so a blob that lies about its digest is refused there, before
            // any descriptor is read.
            if defect == Defect::BadDigest && transport == "oci-archive" {
                assert!(
                    matches!(e, ImageError::Layout(layout::LayoutError::Member { .. })),
                    "{defect:?} through {transport}: {}",
                    chain(&e)
                );
                continue;
            }
            let v = e
                .verify()
                .unwrap_or_else(|| panic!("{defect:?} through {transport}: {}", chain(&e)));
            assert_eq!(kind(v), want, "{defect:?} through {transport}: {v}");
            shapes.push((transport, shape(v)));
        }
        for (transport, s) in &shapes[1..] {
            assert_eq!(
                s, &shapes[0].1,
                "{defect:?}: {transport} and {} disagree",
                shapes[0].0
            );
        }
    }
}

/// A pax header announcing a record set of `MAX_SPECIAL + 1` bytes, with its records, for
/// whatever member follows.
fn oversize_pax() -> Vec<u8> {
    let n = crate::tar::MAX_SPECIAL + 1;
    let mut h = ::tar::Header::new_ustar();
    h.set_entry_type(::tar::EntryType::XHeader);
    h.set_size(n);
    h.set_mode(0o644);
    h.set_path("PaxHeaders/big").unwrap();
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.resize(out.len() + n.div_ceil(512) as usize * 512, b'x');
    out
}

/// A tar whose only member has an oversize pax record set.
fn oversize_pax_tar() -> Vec<u8> {
    [oversize_pax(), layer("big", b"b")].concat()
}

/// A tar whose last member is cut short.
fn truncated_tar() -> Vec<u8> {
    let mut t = layer("cut", &[7u8; 4096]);
    t.truncate(512 + 1000);
    t
}

const PAX_REASON: &str = "a pax header of 1048577 bytes (at most 1048576 are accepted)";
const TRUNCATED_REASON: &str = "the tar stream ends inside an entry";

/// A malformed tar inside a layer passes resolution on every transport and is refused by
/// the one tar reader when the layer is read, with the same reason.
#[tokio::test]
async fn a_malformed_layer_tar_is_refused_alike_from_every_transport() {
    for (bad, reason) in [
        (oversize_pax_tar(), PAX_REASON),
        (truncated_tar(), TRUNCATED_REASON),
    ] {
        let gz = gzip(&bad);
        let diff = sha(&bad);
        let c = config(&[&diff]);
        let m = manifest(desc(OCI_CONFIG, &c), &[desc(GZIP_LAYER, &gz)], "x");
        let mut p = Parts::indexed(
            amd64(desc(OCI_MANIFEST, &m)),
            m,
            vec![(sha(&c), c.clone()), (sha(&gz), gz.clone())],
        );
        p.docker = Some((c, vec![gz]));
        let site = Site::new();
        for (transport, r) in site.all(&p).await {
            let img = r.unwrap_or_else(|e| panic!("{transport}: {}", chain(&e)));
            let spool = tempfile::tempdir().unwrap();
            let e = flatten(
                &img.layers,
                &FlattenOptions { max_size: 1 << 30 },
                spool.path(),
                &Progress::hidden(),
            )
            .map(|_| ())
            .unwrap_err();
            let text = chain(&e);
            assert!(text.contains(reason), "{transport}: {text}");
        }
    }
}

/// The same malformed tar as the archive itself: refused by the same reader, for the same
/// reason, before any image is resolved.
#[test]
fn a_malformed_archive_is_refused_alike_by_both_archive_transports() {
    let tar = layer("a", b"a");
    let c = config(&[&sha(&tar)]);
    let m = manifest(desc(OCI_CONFIG, &c), &[desc(TAR_LAYER, &tar)], "x");
    let p = Parts::indexed(
        amd64(desc(OCI_MANIFEST, &m)),
        m,
        vec![(sha(&c), c.clone()), (sha(&tar), tar.clone())],
    );
    // Both archives end with a member of no interest to either, cut inside its data.
    let tail = |t: Vec<u8>| {
        let body = &t[..t.len() - 1024];
        let extra = tar_of(&[M::File("zz", vec![0; 4096])]);
        [body, &extra[..]].concat()
    };
    let oci = tail(Site::oci_archive_bytes(&p));
    let docker = tail(Site::docker_archive_bytes(&c, &[tar]));
    for (archive, transport) in [(&oci, "oci-archive"), (&docker, "docker-archive")] {
        let with_pax = [oversize_pax(), archive.clone()].concat();
        let cut = archive[..archive.len() - 1024 - 2000].to_vec();
        for (bytes, reason) in [(with_pax, PAX_REASON), (cut, TRUNCATED_REASON)] {
            let site = Site::new();
            let e = match transport {
                "oci-archive" => site.oci_archive(&bytes),
                _ => site.docker_archive(&bytes),
            }
            .map(|_| ())
            .unwrap_err();
            let text = chain(&e);
            assert!(text.contains(reason), "{transport}: {text}");
        }
    }
}
