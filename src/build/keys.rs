//! The keys a build's outputs are kept under in the cache: the initramfs key (a digest of
//! everything the initramfs's bytes depend on) and the baked file's, and the recorded digests
//! of large input files (the oci2uk binary, the kernel) that the keys name.

use std::io;
use std::path::Path;

use oci_spec::image::Digest;

use crate::cache::{Cache, Hasher};
use crate::image::Image;
use crate::kernel::Kernel;
use crate::{plan, rootfs};

use super::BAKED_CMDLINE;

/// What the initramfs's bytes depend on besides the layers' contents (which the manifest
/// digest pins).
pub(super) struct RootfsInputs<'a> {
    /// The resolved image.
    pub img: &'a Image,
    /// The output's name (the default host name).
    pub name: &'a str,
    /// The kernel, and the sha256 of its file.
    pub kernel: &'a Kernel,
    pub kernel_file: &'a str,
    /// The files added beside the tree: the init, the modules.
    pub extras: &'a [rootfs::Extra],
    pub opts: &'a rootfs::RootfsOptions,
    pub layout: rootfs::Layout,
    /// Whether the root image follows the archive, to be read in place.
    pub in_place: bool,
    /// The size cap (`--max-size`): a smaller one may refuse the image.
    pub max_size: u64,
    pub overrides: &'a plan::Overrides,
}

/// The key of the initramfs in the cache: a digest of the image (manifest, config and layer
/// digests) and its name, the kernel file, the init and the modules (by their bytes), the
/// codec, `SOURCE_DATE_EPOCH`, the size cap, every launch override, and the oci2uk binary
/// itself, so that a changed planner or writer never reuses an older initramfs. None when the
/// binary cannot be read (no caching then).
pub(super) fn rootfs_key(cache: &Cache, i: &RootfsInputs<'_>) -> Option<String> {
    let exe = exe_digest(cache)?;
    let mut k = String::from("oci2uk initramfs key 1\n");
    let mut line = |name: &str, value: &dyn std::fmt::Debug| {
        k.push_str(&format!("{name} {value:?}\n"));
    };
    line("exe", &exe);
    line("manifest", &i.img.manifest_digest.to_string());
    line("config", &i.img.config_digest.to_string());
    for l in &i.img.layers {
        line("layer", &(l.digest.to_string(), l.diff_id.to_string()));
    }
    line("name", &i.name);
    line("kernel", &Some(i.kernel_file));
    line("kernel-version", &i.kernel.version);
    line("machine", &i.kernel.machine);
    for x in i.extras {
        let kind = match &x.kind {
            rootfs::ExtraKind::File(data) => format!("file {}", sha256_hex(data)),
            other => format!("{other:?}"),
        };
        line("extra", &(&x.path, x.mode, x.uid, x.gid, kind));
    }
    line("codec", &(i.opts.codec, i.opts.level));
    line("rootfs", &i.layout);
    line("in-place", &i.in_place);
    line("source-date-epoch", &i.opts.source_date_epoch);
    line("max-size", &i.max_size);
    line("cmdline", &BAKED_CMDLINE);
    let o = i.overrides;
    for e in &o.env {
        line("env", e);
    }
    line("entrypoint", &o.entrypoint);
    line("cmd", &o.cmd);
    line("workdir", &o.workdir);
    line("user", &o.user);
    line("net", &o.net);
    line("hostname", &o.hostname);
    line("sysctl", &o.sysctl);
    Some(sha256_hex(k.as_bytes()))
}

/// The key of a baked file: its initramfs's key and the command line baked with it.
pub(super) fn baked_key(rootfs_key: &str, cmdline: &str) -> String {
    sha256_hex(format!("oci2uk baked file 1\n{rootfs_key}\n{cmdline}\n").as_bytes())
}

pub(super) fn sha256_hex(data: &[u8]) -> String {
    let mut h = Hasher::sha256();
    h.update(data);
    h.finish().digest().to_string()
}

/// sha256 of the running binary, computed once: part of every initramfs key.
fn exe_digest(cache: &Cache) -> Option<String> {
    static EXE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let path = std::env::current_exe().ok()?;
        let file = std::fs::File::open(&path).ok()?;
        let meta = file.metadata().ok()?;
        recorded_digest(cache, &path, &meta, || {
            let like: Digest =
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                    .parse()
                    .expect("a valid digest");
            let (d, _) = crate::cache::digest_reader(io::BufReader::new(file), &like).ok()?;
            Some(d.digest().to_string())
        })
    })
    .clone()
}

/// The sha256 (hex) of the file at `path` whose metadata is `meta`, from a record kept under
/// the file's identity and change times, as git's index keeps a file's; `compute` hashes it
/// when there is no record yet. Hashing the binary or the kernel (tens of MiB) would be much
/// of a warm rebuild.
pub(super) fn recorded_digest(
    cache: &Cache,
    path: &Path,
    meta: &std::fs::Metadata,
    compute: impl FnOnce() -> Option<String>,
) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let stamp = format!(
        "{} {} {} {} {}.{} {}.{}",
        path.display(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    if let Some(digest) = cache.file_digest(&stamp) {
        return Some(digest);
    }
    let digest = compute()?;
    // A record that cannot be written costs the next build the hashing, nothing more.
    let _ = cache.record_file_digest(&stamp, &digest);
    Some(digest)
}
