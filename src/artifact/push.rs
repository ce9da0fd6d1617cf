//! `oci2uk push` and `oci2uk kernel push`: a baked file, a bundle or a kernel as an OCI image.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_spec::image::Digest;

use super::*;
use crate::cache::{Cache, Hasher};
use crate::progress::Progress;
use crate::reference::ImageRef;
use crate::registry::client::{Access, BlobPush, Session, Tuning};
use crate::registry::{RegistryError, RegistryOptions};

/// The zstd level of pushed layers.
const LAYER_LEVEL: i32 = 3;

/// Errors of a push.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The file is not a baked file.
    #[error(transparent)]
    Baked(#[from] BakedError),
    /// A bundle directory without exactly one baked file.
    #[error("{path} is not a bundle: {why}")]
    NotABundle {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The kernel cannot be pushed.
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelError),
    /// Reading the input or writing the layer failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The reference names a digest that is not the pushed manifest's.
    #[error("{reference} names digest {wanted}, but the manifest pushed would be {actual}")]
    DigestReference {
        /// The reference.
        reference: String,
        /// Its digest.
        wanted: String,
        /// The manifest's.
        actual: String,
    },
    /// Talking to the registry failed.
    #[error("cannot push to {reference}")]
    Registry {
        /// The destination.
        reference: String,
        /// The cause.
        #[source]
        source: Box<RegistryError>,
    },
}

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushOutcome {
    /// The destination, normalised.
    pub reference: String,
    /// The pushed manifest's digest.
    pub digest: String,
    /// The manifest's size.
    pub size: u64,
    /// The blobs and how each got there.
    pub blobs: Vec<PushedBlob>,
}

/// One blob of a push.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushedBlob {
    /// Its digest.
    pub digest: String,
    /// Its size.
    pub size: u64,
    /// How it got there.
    pub how: BlobPush,
}

/// What to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Registry access.
    pub registry: RegistryOptions,
    /// `SOURCE_DATE_EPOCH`: the pushed image's `created` and the layer's mtimes.
    pub source_date_epoch: Option<i64>,
}

/// One member of a layer.
enum Member {
    Dir,
    File { path: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
}

/// A built image, ready to go: its blobs in the cache, the manifest in memory.
struct Built {
    config: (Digest, u64, PathBuf),
    layer: (Digest, u64, PathBuf),
    manifest: Vec<u8>,
}

/// Pushes a baked file, or a bundle directory, to `r`.
pub async fn push_path(
    path: &Path,
    r: &ImageRef,
    opts: &PushOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<PushOutcome, PushError> {
    let (path, cache2, opts2) = (path.to_path_buf(), cache.clone(), opts.clone());
    let built = tokio::task::spawn_blocking(move || build_unikernel(&path, &opts2, &cache2))
        .await
        .expect("building the layer does not panic")?;
    upload(built, r, &opts.registry, cache, progress).await
}

/// Pushes a kernel image and its modules to `r`.
pub async fn push_kernel(
    kernel: &Path,
    modules: Option<&Path>,
    r: &ImageRef,
    opts: &PushOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<PushOutcome, PushError> {
    let (kernel, modules) = (kernel.to_path_buf(), modules.map(Path::to_path_buf));
    let (cache2, opts2) = (cache.clone(), opts.clone());
    let built = tokio::task::spawn_blocking(move || {
        build_kernel(&kernel, modules.as_deref(), &opts2, &cache2)
    })
    .await
    .expect("building the layer does not panic")?;
    upload(built, r, &opts.registry, cache, progress).await
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> PushError + '_ {
    move |source| PushError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn build_unikernel(path: &Path, opts: &PushOptions, cache: &Cache) -> Result<Built, PushError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let mut members: BTreeMap<String, Member> = BTreeMap::new();
    members.insert(format!("{UNIKERNEL_DIR}/"), Member::Dir);
    let elf = if meta.is_dir() {
        let mut elves = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let e = e.map_err(io_err(path))?;
            let ft = e.file_type().map_err(io_err(path))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !ft.is_file() {
                continue;
            }
            use std::os::unix::fs::PermissionsExt;
            let mode = e.metadata().map_err(io_err(path))?.permissions().mode();
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            if name.ends_with(".elf") {
                elves.push(e.path());
            }
            members.insert(
                format!("{UNIKERNEL_DIR}/{name}"),
                Member::File {
                    path: e.path(),
                    mode,
                },
            );
        }
        match elves.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(PushError::NotABundle {
                    path: path.to_path_buf(),
                    why: "it holds no baked .elf file".into(),
                })
            }
            _ => {
                return Err(PushError::NotABundle {
                    path: path.to_path_buf(),
                    why: "it holds more than one .elf file".into(),
                })
            }
        }
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "kernel.elf".into());
        members.insert(
            format!("{UNIKERNEL_DIR}/{name}"),
            Member::File {
                path: path.to_path_buf(),
                mode: 0o755,
            },
        );
        path.to_path_buf()
    };
    let info = BakedInfo::read(&elf)?;
    let elf_name = elf
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let binary = format!("/{UNIKERNEL_DIR}/{elf_name}");

    let mut ann = BTreeMap::new();
    ann.insert(URUNC_TYPE.to_string(), "linux".to_string());
    ann.insert(URUNC_HYPERVISOR.to_string(), "qemu".to_string());
    ann.insert(URUNC_BINARY.to_string(), binary);
    ann.insert(URUNC_CMDLINE.to_string(), info.cmdline.clone());
    ann.insert(TITLE.to_string(), elf_name);
    ann.insert(FILE_DIGEST.to_string(), info.digest.clone());
    ann.insert(ROOTFS_DIGEST.to_string(), info.rootfs_digest.clone());
    if let Some(m) = info.memory_mib {
        ann.insert(MEMORY.to_string(), m.to_string());
    }
    let created = created(
        opts,
        info.config
            .as_ref()
            .and_then(|c| c.oci2uk.source_created.clone()),
    );
    if let Some(c) = &created {
        ann.insert(CREATED.to_string(), c.clone());
    }
    if let Some(o) = info.config.as_ref().map(|c| &c.oci2uk) {
        if let Some(k) = &o.kernel {
            ann.insert(KERNEL_VERSION.to_string(), k.clone());
        }
        if let Some(s) = &o.source_image {
            ann.insert(BASE_NAME.to_string(), s.clone());
        }
        if let Some(d) = &o.source_digest {
            ann.insert(BASE_DIGEST.to_string(), d.clone());
        }
    }
    // urunc reads these from the root when the runtime above it drops annotations.
    let b64 = |v: &str| {
        format!(
            "b64:{}",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    };
    let urunc: BTreeMap<&str, String> = [URUNC_TYPE, URUNC_HYPERVISOR, URUNC_BINARY, URUNC_CMDLINE]
        .into_iter()
        .map(|k| (k, b64(&ann[k])))
        .collect();
    members.insert(
        "urunc.json".into(),
        Member::Bytes {
            data: serde_json::to_vec_pretty(&urunc).expect("strings serialise"),
            mode: 0o644,
        },
    );
    build_image(members, ann, &info.architecture, created, opts, cache)
}

fn build_kernel(
    path: &Path,
    modules: Option<&Path>,
    opts: &PushOptions,
    cache: &Cache,
) -> Result<Built, PushError> {
    let kernel = crate::kernel::Kernel::load(path)?;
    // A kernel built without modules (the oci2uk kernel) is pushed alone.
    let modular = kernel.has_modules()?;
    let dir = match modules {
        Some(d) => Some(d.to_path_buf()),
        None if modular => Some(Path::new("/lib/modules").join(&kernel.version)),
        None => None,
    };
    if let Some(dir) = &dir {
        // Check that the modules belong to the kernel (and exist) before packing them.
        kernel.modules(Some(dir))?;
    }
    let mut members = BTreeMap::new();
    members.insert("boot/".to_string(), Member::Dir);
    members.insert(
        "boot/vmlinuz".to_string(),
        Member::File {
            path: path.to_path_buf(),
            mode: 0o644,
        },
    );
    if let Some(dir) = &dir {
        members.insert("lib/".into(), Member::Dir);
        members.insert("lib/modules/".into(), Member::Dir);
        let root = format!("lib/modules/{}", kernel.version);
        members.insert(format!("{root}/"), Member::Dir);
        walk(dir, &root, &mut members)?;
    }
    let mut ann = BTreeMap::new();
    ann.insert(KERNEL_ARTIFACT.to_string(), "boot/vmlinuz".to_string());
    ann.insert(KERNEL_VERSION.to_string(), kernel.version.clone());
    ann.insert(TITLE.to_string(), format!("vmlinuz-{}", kernel.version));
    let created = created(opts, None);
    if let Some(c) = &created {
        ann.insert(CREATED.to_string(), c.clone());
    }
    build_image(
        members,
        ann,
        kernel.machine.oci_arch(),
        created,
        opts,
        cache,
    )
}

/// Adds the regular files and directories under `dir` as `prefix/...`; symbolic links (a
/// modules directory's `build` and `source`) are left out.
fn walk(dir: &Path, prefix: &str, members: &mut BTreeMap<String, Member>) -> Result<(), PushError> {
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let ft = e.file_type().map_err(io_err(dir))?;
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let rel = format!("{prefix}/{name}");
        if ft.is_dir() {
            members.insert(format!("{rel}/"), Member::Dir);
            walk(&e.path(), &rel, members)?;
        } else if ft.is_file() {
            members.insert(
                rel,
                Member::File {
                    path: e.path(),
                    mode: 0o644,
                },
            );
        }
    }
    Ok(())
}

/// `created`: `SOURCE_DATE_EPOCH` when set, else the source image's.
fn created(opts: &PushOptions, source: Option<String>) -> Option<String> {
    opts.source_date_epoch.map(rfc3339).or(source)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (the proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Writes the layer and config into the cache and makes the manifest.
fn build_image(
    members: BTreeMap<String, Member>,
    annotations: BTreeMap<String, String>,
    architecture: &str,
    created: Option<String>,
    opts: &PushOptions,
    cache: &Cache,
) -> Result<Built, PushError> {
    let mtime = opts.source_date_epoch.unwrap_or(0).max(0) as u64;
    let tmp = cache.tmp_dir();
    let tmp_err = io_err(&tmp);
    let layer_file = tempfile::NamedTempFile::new_in(&tmp).map_err(&tmp_err)?;
    let mut compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, layer_file));
    let diff_id = {
        let enc =
            zstd::stream::write::Encoder::new(&mut compressed, LAYER_LEVEL).map_err(&tmp_err)?;
        let mut uncompressed = HashingWriter::new(enc);
        {
            let mut tar = tar::Builder::new(&mut uncompressed);
            for (name, m) in &members {
                let mut h = tar::Header::new_ustar();
                h.set_mtime(mtime);
                h.set_uid(0);
                h.set_gid(0);
                match m {
                    Member::Dir => {
                        h.set_entry_type(tar::EntryType::Directory);
                        h.set_mode(0o755);
                        h.set_size(0);
                        tar.append_data(&mut h, name, io::empty())
                            .map_err(&tmp_err)?;
                    }
                    Member::File { path, mode } => {
                        let f = File::open(path).map_err(io_err(path))?;
                        let len = f.metadata().map_err(io_err(path))?.len();
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(*mode);
                        h.set_size(len);
                        tar.append_data(&mut h, name, io::BufReader::with_capacity(1 << 20, f))
                            .map_err(io_err(path))?;
                    }
                    Member::Bytes { data, mode } => {
                        h.set_entry_type(tar::EntryType::Regular);
                        h.set_mode(*mode);
                        h.set_size(data.len() as u64);
                        tar.append_data(&mut h, name, data.as_slice())
                            .map_err(&tmp_err)?;
                    }
                }
            }
            tar.finish().map_err(&tmp_err)?;
        }
        let (enc, diff_id, _) = uncompressed.finish();
        enc.finish().map_err(&tmp_err)?;
        diff_id
    };
    let (w, layer_digest, layer_size) = compressed.finish();
    let layer_file = w.into_inner().map_err(|e| tmp_err(e.into_error()))?;
    let layer_path = cache.blob_path(&layer_digest);
    layer_file
        .persist(&layer_path)
        .map_err(|e| tmp_err(e.error))?;

    let labels: BTreeMap<&String, &String> = annotations.iter().collect();
    let mut config = serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": { "Labels": labels },
        "rootfs": { "type": "layers", "diff_ids": [diff_id.to_string()] },
    });
    if let Some(c) = &created {
        config["created"] = serde_json::json!(c);
    }
    let config_bytes = serde_json::to_vec(&config).expect("JSON values serialise");
    let mut h = Hasher::sha256();
    h.update(&config_bytes);
    let config_digest = h.finish();
    let config_path = cache.blob_path(&config_digest);
    let mut t = tempfile::NamedTempFile::new_in(&tmp).map_err(&tmp_err)?;
    t.write_all(&config_bytes).map_err(&tmp_err)?;
    t.persist(&config_path).map_err(|e| tmp_err(e.error))?;

    let title = annotations.get(TITLE).cloned().unwrap_or_default();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": config_digest.to_string(),
            "size": config_bytes.len(),
        },
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": layer_digest.to_string(),
            "size": layer_size,
            "annotations": { TITLE: title },
        }],
        "annotations": labels,
    });
    Ok(Built {
        config: (config_digest, config_bytes.len() as u64, config_path),
        layer: (layer_digest, layer_size, layer_path),
        manifest: serde_json::to_vec(&manifest).expect("JSON values serialise"),
    })
}

/// Uploads what [`build_image`] made.
async fn upload(
    built: Built,
    r: &ImageRef,
    opts: &RegistryOptions,
    cache: &Cache,
    progress: &Progress,
) -> Result<PushOutcome, PushError> {
    let reference = r.to_string();
    let reg_err = |source| PushError::Registry {
        reference: reference.clone(),
        source: Box::new(source),
    };
    let mut h = Hasher::sha256();
    h.update(&built.manifest);
    let manifest_digest = h.finish();
    if let Some(wanted) = r.digest().filter(|d| *d != manifest_digest.to_string()) {
        return Err(PushError::DigestReference {
            reference: reference.clone(),
            wanted: wanted.to_string(),
            actual: manifest_digest.to_string(),
        });
    }
    let records = MountRecords::open(cache, r.endpoint());
    let blobs = [built.config, built.layer];
    let mut mount_from: Vec<String> = Vec::new();
    for (d, ..) in &blobs {
        for repo in records.repositories(d) {
            if !mount_from.contains(&repo) && repo != r.repository() {
                mount_from.push(repo);
            }
        }
    }
    let access = Access {
        push: true,
        mount_from: mount_from.clone(),
    };
    let session = Session::connect_for(r, opts, &Tuning::default(), access)
        .await
        .map_err(reg_err)?;
    let mut report = Vec::new();
    for (digest, size, path) in &blobs {
        let from = records.repositories(digest);
        let label = format!("{:.12}", digest.digest());
        let bar = progress
            .bytes(&label, *size)
            .with_finish(indicatif::ProgressFinish::AndClear);
        let how = session
            .push_blob(digest, *size, path, &from, &bar)
            .await
            .map_err(reg_err)?;
        bar.finish_and_clear();
        tracing::info!(%digest, ?how, "blob");
        report.push(PushedBlob {
            digest: digest.to_string(),
            size: *size,
            how,
        });
    }
    let tag = r
        .tag()
        .map(str::to_string)
        .unwrap_or_else(|| manifest_digest.to_string());
    let digest = session
        .put_manifest(&tag, MANIFEST_MEDIA_TYPE, &built.manifest)
        .await
        .map_err(reg_err)?;
    records.add(r.repository(), blobs.iter().map(|(d, ..)| d));
    Ok(PushOutcome {
        reference,
        digest: digest.to_string(),
        size: built.manifest.len() as u64,
        blobs: report,
    })
}

/// Which repositories of a registry a blob was pushed to, for cross-repository mounts: kept
/// in the cache, one JSON file a registry.
struct MountRecords {
    path: PathBuf,
    map: HashMap<String, Vec<String>>,
}

impl MountRecords {
    fn open(cache: &Cache, endpoint: &str) -> Self {
        let path = cache.pushed_record(endpoint);
        let map = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { path, map }
    }

    fn repositories(&self, digest: &Digest) -> Vec<String> {
        self.map
            .get(&digest.to_string())
            .cloned()
            .unwrap_or_default()
    }

    /// Records the blobs as present in `repository` (best effort: a lost record only costs
    /// an upload).
    fn add<'a>(mut self, repository: &str, digests: impl Iterator<Item = &'a Digest>) {
        for d in digests {
            let repos = self.map.entry(d.to_string()).or_default();
            if !repos.iter().any(|r| r == repository) {
                repos.push(repository.to_string());
                // The most recent few are enough to find one to mount from.
                if repos.len() > 8 {
                    repos.remove(0);
                }
            }
        }
        let write = || -> io::Result<()> {
            let dir = self.path.parent().expect("a file in a directory");
            std::fs::create_dir_all(dir)?;
            let mut t = tempfile::NamedTempFile::new_in(dir)?;
            t.write_all(&serde_json::to_vec(&self.map).map_err(io::Error::other)?)?;
            t.persist(&self.path).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot record the pushed blobs");
        }
    }
}

/// A writer that hashes (sha256) and counts what passes through.
struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    n: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::sha256(),
            n: 0,
        }
    }

    fn finish(self) -> (W, Digest, u64) {
        (self.inner, self.hasher.finish(), self.n)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
