//! Volumes (`run -v SRC:DST[:OPTIONS]`): host storage that outlives the guest, mounted at DST
//! before the application starts.
//!
//! SRC is a disk image when it is an existing regular file, or when it does not exist and its
//! name ends in `.img`, `.raw` or `.ext4`: it is attached as a virtio disk, and a new one is
//! created sparse (`size=`, default [`DEFAULT_DISK_SIZE`]) with an ext4 file system made here
//! by `mkfs.ext4` (the guest's kernel can mount ext4 but not make one). Otherwise SRC is a
//! directory, created when missing as docker creates a bind mount's, and shared through
//! virtiofs: one `virtiofsd` per directory, which needs root, as it keeps the owners the
//! guest's application uses. The guest learns where each volume goes through the
//! configuration override (`mount` entries), and finds each disk by its serial number rather
//! than its probe order.

use std::fmt;
use std::fs;
use std::io::{self, Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci2uk_config::MountSource;

use crate::launch::qemu::{Disk, Share};

/// The size of a new disk image without `size=`: sparse, so it costs the host only what the
/// guest writes.
pub const DEFAULT_DISK_SIZE: u64 = 1 << 30;

/// The smallest disk image `size=` accepts: room for ext4's metadata and a journal.
const MIN_DISK_SIZE: u64 = 8 << 20;

/// The names of a file that `-v` creates as a disk image when it does not exist.
pub const DISK_EXTENSIONS: [&str; 3] = ["img", "raw", "ext4"];

/// The program that makes a new disk image's file system.
const MKFS: &str = "mkfs.ext4";

/// Where a virtiofs daemon is looked for after `$OCI2UK_VIRTIOFSD` and PATH: Debian 13's
/// (the Rust one) and Debian 12's (QEMU's own, in qemu-system-common).
const VIRTIOFSD_PATHS: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

/// One `-v` as written: SRC, DST and the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The host path as given.
    pub source: PathBuf,
    /// The absolute path in the guest.
    pub target: String,
    /// `ro`: the guest cannot write.
    pub read_only: bool,
    /// `size=`: the size of a disk image created now.
    pub size: Option<u64>,
}

impl fmt::Display for VolumeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source.display(), self.target)?;
        let mut opts = Vec::new();
        if self.read_only {
            opts.push("ro".to_owned());
        }
        if let Some(size) = self.size {
            opts.push(format!("size={size}"));
        }
        if !opts.is_empty() {
            write!(f, ":{}", opts.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for VolumeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid volume {s:?}: {why}");
        let mut parts = s.splitn(3, ':');
        let source = parts.next().unwrap_or_default();
        let Some(target) = parts.next() else {
            return Err(bad("expected SRC:DST[:ro][,size=SIZE]"));
        };
        if source.is_empty() {
            return Err(bad("SRC is empty"));
        }
        if !target.starts_with('/') {
            return Err(bad("DST must be an absolute path in the guest"));
        }
        if target.trim_end_matches('/').is_empty() {
            return Err(bad("DST cannot be the root"));
        }
        if target.contains(['\0', ',']) || target.split('/').any(|c| c == "..") {
            return Err(bad("DST cannot hold a comma, NUL or \"..\""));
        }
        let mut spec = VolumeSpec {
            source: PathBuf::from(source),
            target: target.trim_end_matches('/').to_owned(),
            read_only: false,
            size: None,
        };
        for opt in parts.next().unwrap_or_default().split(',') {
            match opt.split_once('=') {
                None if opt == "ro" => spec.read_only = true,
                None if opt == "rw" || opt.is_empty() => {}
                Some(("size", v)) => {
                    let size = parse_size(v).map_err(|e| bad(&format!("size: {e}")))?;
                    if size < MIN_DISK_SIZE {
                        return Err(bad("size: a disk image needs at least 8M"));
                    }
                    spec.size = Some(size);
                }
                _ => return Err(bad(&format!("unknown option {opt:?} (ro, rw, size=SIZE)"))),
            }
        }
        Ok(spec)
    }
}

/// A size: bytes, or a number with a binary suffix K, M, G or T (`1G`, `512M`).
fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a number with an optional K/M/G/T suffix"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?} has an unknown suffix (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// What a volume's SRC is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// A raw disk image holding an ext2/3/4 file system.
    Disk,
    /// A host directory.
    Directory,
}

/// A volume ready to attach: SRC exists, and a new disk image has its file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// What was asked for.
    pub spec: VolumeSpec,
    /// SRC as an absolute path.
    pub source: PathBuf,
    /// Disk or directory.
    pub kind: VolumeKind,
    /// Whether it was created now.
    pub created: bool,
}

/// A volume that cannot be attached; the message names the `-v` and the path.
#[derive(Debug, thiserror::Error)]
#[error("-v {spec}: {why}")]
pub struct VolumeError {
    spec: String,
    why: String,
}

fn error(spec: &VolumeSpec, why: impl Into<String>) -> VolumeError {
    VolumeError {
        spec: spec.to_string(),
        why: why.into(),
    }
}

/// Checks SRC and creates it when missing: a disk image (see the module's rule) or a
/// directory.
pub fn prepare(spec: &VolumeSpec) -> Result<Volume, VolumeError> {
    let source = std::path::absolute(&spec.source)
        .map_err(|e| error(spec, format!("cannot resolve the path: {e}")))?;
    let shown = source.display();
    let (kind, created) = match fs::metadata(&source) {
        Ok(m) if m.is_dir() => {
            fs::read_dir(&source).map_err(|e| error(spec, format!("cannot read {shown}: {e}")))?;
            (VolumeKind::Directory, false)
        }
        Ok(m) if m.is_file() => {
            let mut f = fs::OpenOptions::new()
                .read(true)
                .write(!spec.read_only)
                .open(&source)
                .map_err(|e| error(spec, format!("cannot open {shown}: {e}")))?;
            if m.len() == 0 {
                // An empty file is a disk to make, as a missing one is.
                drop(f);
                make_disk(spec, &source)?;
                (VolumeKind::Disk, true)
            } else {
                if !holds_ext(&mut f).map_err(|e| error(spec, format!("reading {shown}: {e}")))? {
                    return Err(error(
                        spec,
                        format!(
                            "{shown} holds no ext2/ext3/ext4 file system, which is what the \
                             guest mounts (make one with mkfs.ext4, or name a new file)"
                        ),
                    ));
                }
                (VolumeKind::Disk, false)
            }
        }
        Ok(_) => {
            return Err(error(
                spec,
                format!("{shown} is neither a regular file nor a directory"),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = source.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(error(
                    spec,
                    format!("the directory {} does not exist", parent.display()),
                ));
            }
            if is_disk_name(&source) {
                make_disk(spec, &source)?;
                (VolumeKind::Disk, true)
            } else {
                fs::create_dir(&source)
                    .map_err(|e| error(spec, format!("cannot create {shown}: {e}")))?;
                (VolumeKind::Directory, true)
            }
        }
        Err(e) => return Err(error(spec, format!("cannot read {shown}: {e}"))),
    };
    if kind == VolumeKind::Directory && spec.size.is_some() {
        return Err(error(
            spec,
            format!("size= is for a disk image, and {shown} is a directory"),
        ));
    }
    Ok(Volume {
        spec: spec.clone(),
        source,
        kind,
        created,
    })
}

/// Whether a missing SRC is to be a disk image: its name ends in one of [`DISK_EXTENSIONS`].
pub fn is_disk_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| DISK_EXTENSIONS.contains(&e))
}

/// Whether the image holds an ext2/3/4 file system: the superblock's magic 0xEF53 at byte
/// 1080.
fn holds_ext(f: &mut fs::File) -> io::Result<bool> {
    let mut magic = [0u8; 2];
    f.seek(io::SeekFrom::Start(1080))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(magic == [0x53, 0xef]),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A new sparse image at `path` with an empty ext4 file system, made beside it and renamed into
/// place, so a failure leaves nothing half-made.
fn make_disk(spec: &VolumeSpec, path: &Path) -> Result<(), VolumeError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = tempfile::Builder::new()
        .prefix(".oci2uk-volume-")
        .tempfile_in(dir)
        .map_err(|e| {
            error(
                spec,
                format!("cannot create a file in {}: {e}", dir.display()),
            )
        })?;
    tmp.as_file()
        .set_len(spec.size.unwrap_or(DEFAULT_DISK_SIZE))
        .map_err(|e| error(spec, format!("cannot size {}: {e}", path.display())))?;
    // The root directory is owned by root (mke2fs would give it the caller's uid); the guest
    // gives it the owner and mode of the image's directory when it seeds the volume.
    let out = std::process::Command::new(MKFS)
        .args(["-q", "-F", "-E", "root_owner=0:0"])
        .arg(tmp.path())
        .output()
        .map_err(|e| {
            error(
                spec,
                format!(
                    "cannot run {MKFS} to make the disk image (apt-get install e2fsprogs): {e}"
                ),
            )
        })?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(error(
            spec,
            format!("{MKFS} failed: {} {}", out.status, last.trim()),
        ));
    }
    tmp.persist_noclobber(path).map_err(|e| {
        error(
            spec,
            format!("cannot create {}: {}", path.display(), e.error),
        )
    })?;
    Ok(())
}

impl Volume {
    /// The serial number (disk) or tag (directory) the guest knows volume `index` by.
    pub fn name(index: usize) -> String {
        format!("oci2uk-vol{index}")
    }

    /// The entry of the configuration's `mount` for volume `index`.
    pub fn mount_entry(&self, index: usize) -> serde_json::Value {
        let mut m = match self.kind {
            VolumeKind::Disk => serde_json::json!({
                "source": MountSource::Blk,
                "path": format!("/dev/disk/by-id/virtio-{}", Volume::name(index)),
                "fstype": "ext4",
            }),
            VolumeKind::Directory => serde_json::json!({
                "source": MountSource::Virtiofs,
                "path": Volume::name(index),
            }),
        };
        if self.spec.read_only {
            m["options"] = serde_json::json!({"ro": ""});
        }
        m
    }

    /// The disk QEMU attaches, for a disk image.
    pub fn disk(&self, index: usize) -> Option<Disk> {
        (self.kind == VolumeKind::Disk).then(|| Disk {
            file: self.source.display().to_string(),
            serial: Volume::name(index),
            read_only: self.spec.read_only,
        })
    }

    /// The share QEMU attaches, for a directory, with its daemon's socket in `dir`.
    pub fn share(&self, index: usize, dir: &Path) -> Option<Share> {
        (self.kind == VolumeKind::Directory).then(|| Share {
            socket: share_socket(dir, index).display().to_string(),
            tag: Volume::name(index),
        })
    }
}

/// The socket of volume `index`'s virtiofs daemon in `dir`.
pub fn share_socket(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("virtiofs{index}.sock"))
}

/// The virtiofs daemon: `$OCI2UK_VIRTIOFSD`, `virtiofsd` on PATH, or where Debian installs it.
pub fn find_virtiofsd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("OCI2UK_VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    super::find_program(Path::new("virtiofsd")).or_else(|| {
        VIRTIOFSD_PATHS
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .map(Path::to_path_buf)
    })
}

/// Whether this process runs as root (virtiofsd needs it to keep the guest's owners).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The daemon's arguments for sharing `dir` on `socket`: QEMU's own virtiofsd's options,
/// which the Rust one accepts too. `sandbox=chroot` works inside a container, where the
/// default (namespaces) may not.
pub fn virtiofsd_args(socket: &Path, dir: &Path) -> Vec<String> {
    vec![
        format!("--socket-path={}", socket.display()),
        "-o".into(),
        format!("source={}", dir.display()),
        "-o".into(),
        "sandbox=chroot".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let v: VolumeSpec = "data.img:/data".parse().unwrap();
        assert_eq!(v.source, Path::new("data.img"));
        assert_eq!(v.target, "/data");
        assert!(!v.read_only);
        let v: VolumeSpec = "/srv/x:/var/lib/x/:ro,size=2G".parse().unwrap();
        assert_eq!(v.target, "/var/lib/x");
        assert!(v.read_only);
        assert_eq!(v.size, Some(2 << 30));
        assert_eq!(v.to_string(), "/srv/x:/var/lib/x:ro,size=2147483648");
        for (bad, why) in [
            ("data", "expected SRC:DST"),
            (":/data", "SRC is empty"),
            ("d:data", "DST must be an absolute path"),
            ("d:/", "cannot be the root"),
            ("d:/a/../b", "\"..\""),
            ("d:/a:rx", "unknown option \"rx\""),
            ("d:/a:size=1K", "at least 8M"),
        ] {
            let e = bad.parse::<VolumeSpec>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn disks_and_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = |s: &str| -> VolumeSpec { s.parse().unwrap() };
        // A missing name with a disk extension: a new ext4 image, sparse.
        let img = tmp.path().join("a.img");
        let v = prepare(&spec(&format!("{}:/data:size=16M", img.display()))).unwrap();
        assert_eq!((v.kind, v.created), (VolumeKind::Disk, true));
        let m = fs::metadata(&img).unwrap();
        assert_eq!(m.len(), 16 << 20);
        assert!(holds_ext(&mut fs::File::open(&img).unwrap()).unwrap());
        // Again: kept as it is.
        let v = prepare(&spec(&format!("{}:/data", img.display()))).unwrap();
        assert_eq!((v.kind, v.created), (VolumeKind::Disk, false));
        // A missing name without one: a directory, as docker makes.
        let d = tmp.path().join("d");
        let v = prepare(&spec(&format!("{}:/data", d.display()))).unwrap();
        assert_eq!((v.kind, v.created), (VolumeKind::Directory, true));
        assert!(d.is_dir());
        // A file that is no ext file system, a missing parent, size= on a directory.
        let junk = tmp.path().join("junk.bin");
        fs::write(&junk, vec![7u8; 4096]).unwrap();
        let e = prepare(&spec(&format!("{}:/data", junk.display()))).unwrap_err();
        assert!(e.to_string().contains("holds no ext2/ext3/ext4"), "{e}");
        let e = prepare(&spec(&format!("{}/no/x.img:/data", tmp.path().display()))).unwrap_err();
        assert!(e.to_string().ends_with("/no does not exist"), "{e}");
        let e = prepare(&spec(&format!("{}:/data:size=1G", d.display()))).unwrap_err();
        assert!(e.to_string().contains("size= is for a disk image"), "{e}");
        // Nothing was left beside them.
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.img", "d", "junk.bin"]);
    }

    #[test]
    fn mount_entries() {
        let v = Volume {
            spec: "x.img:/data:ro".parse().unwrap(),
            source: "/h/x.img".into(),
            kind: VolumeKind::Disk,
            created: false,
        };
        assert_eq!(
            v.mount_entry(1),
            serde_json::json!({"source": "blk", "path": "/dev/disk/by-id/virtio-oci2uk-vol1",
                "fstype": "ext4", "options": {"ro": ""}})
        );
        assert_eq!(v.disk(1).unwrap().serial, "oci2uk-vol1");
        assert!(v.share(1, Path::new("/r")).is_none());
        let d = Volume {
            kind: VolumeKind::Directory,
            spec: "x:/data".parse().unwrap(),
            ..v.clone()
        };
        assert_eq!(
            d.mount_entry(0),
            serde_json::json!({"source": "virtiofs", "path": "oci2uk-vol0"})
        );
        assert_eq!(
            d.share(0, Path::new("/r")).unwrap().socket,
            "/r/virtiofs0.sock"
        );
        // Both parse as the guest reads them.
        let cfg = serde_json::json!({"mount": {"/a": v.mount_entry(1), "/b": d.mount_entry(0)}});
        oci2uk_config::Config::from_value(cfg).unwrap();
    }
}
