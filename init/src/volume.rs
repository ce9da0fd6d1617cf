//! Volumes that outlive the guest: a file system on a block device (`blk`), seeded once from
//! the image as docker seeds a new named volume, and a host directory shared through virtiofs.

use std::fs;
use std::io;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci2uk_config::{Mount, MountSource};

use crate::fs::{copy_dir_content, ensure_dir, mount_tmpfs, options as mount_options};
use crate::sys;
use crate::Error;

/// Where a block volume is mounted while it is seeded, before it moves over its mount point.
const STAGING: &str = "/.oci2uk/volume";

/// The extended attribute on a block volume's root that says it was seeded (or found in use):
/// it is not seeded again, even when emptied. `trusted.`: invisible to an unprivileged
/// application, as docker's own record of a volume is.
const SEEDED: &std::ffi::CStr = c"trusted.oci2uk.seeded";

/// The prefix of the device name udev gives a virtio disk by its serial number, which the
/// configuration may use where the guest has no udev: the init finds the disk itself.
const BY_SERIAL: &str = "/dev/disk/by-id/virtio-";

/// How long a device or a virtiofs tag may take to appear after its driver is loaded.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(5);

/// The block volumes mounted read-write, which [`release`] leaves clean.
static WRITABLE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remounts every writable block volume read-only, once the application and everything else
/// in the guest has ended: the file system is then clean (its journal written back), so the
/// next boot mounts it as it is, read-only too (a read-only disk cannot replay a journal).
pub fn release() {
    let Ok(mut mounted) = WRITABLE.lock() else {
        return;
    };
    for target in mounted.drain(..).rev() {
        let flags = libc::MS_REMOUNT | libc::MS_RDONLY;
        if let Err(e) = sys::mount("", &target, "", flags, None) {
            crate::console::warn(&format!("making {} read-only: {e}", target.display()));
        }
    }
}

/// The block device that `path` names: itself, or for [`BY_SERIAL`] the virtio disk whose
/// serial number it gives, waiting for it to appear.
fn device(path: &str) -> Result<PathBuf, Error> {
    let start = Instant::now();
    loop {
        let found = match path.strip_prefix(BY_SERIAL) {
            Some(serial) => by_serial(serial),
            None => Path::new(path).exists().then(|| PathBuf::from(path)),
        };
        if let Some(dev) = found {
            return Ok(dev);
        }
        if start.elapsed() >= APPEAR_TIMEOUT {
            return Err(Error::new(
                127,
                format!("the disk {path} did not appear (is it attached?)"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `/dev/vdX` whose `/sys/block/vdX/serial` is `serial`.
fn by_serial(serial: &str) -> Option<PathBuf> {
    fs::read_dir("/sys/block").ok()?.flatten().find_map(|e| {
        let s = fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim_end_matches(['\n', '\0']) == serial).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// Mounts one entry of the configuration's `mount`: a tmpfs, a disk or a shared directory.
pub fn mount_config(mountpoint: &str, m: &Mount) -> Result<(), Error> {
    match m.source {
        MountSource::Tmpfs => mount_tmpfs(Path::new(mountpoint), m),
        MountSource::Blk => mount_blk(mountpoint, m),
        MountSource::Virtiofs => mount_virtiofs(mountpoint, m),
    }
}

/// Mounts a `blk` entry: the device's file system over `mountpoint`, seeded first when it is
/// new (see [`Mount::seed`]).
pub fn mount_blk(mountpoint: &str, m: &Mount) -> Result<(), Error> {
    let dev = device(m.path.as_deref().unwrap_or_default())?;
    let dev_s = dev.display().to_string();
    ensure_dir(Path::new(mountpoint), 0o755)
        .map_err(|e| Error::io(format!("creating {mountpoint}"), e))?;
    // A mount point that is a symlink in the image is mounted where it points.
    let target = fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("resolving {mountpoint}"), e))?;
    let (flags, data) = mount_options(m);
    let read_only = flags & libc::MS_RDONLY != 0;
    if read_only {
        return match mount_fs(&dev_s, &target, m, flags, &data) {
            // A journal to replay, which a read-only disk cannot take (the guest that wrote
            // it did not stop cleanly): the file system as its last checkpoint left it.
            Err(_) if m.fstype.as_deref().is_some_and(|t| t.starts_with("ext")) => {
                let mut data = data;
                data.push("noload".into());
                mount_fs(&dev_s, &target, m, flags, &data).map(drop)
            }
            other => other.map(drop),
        };
    }
    if !m.seed {
        mount_fs(&dev_s, &target, m, flags, &data)?;
        writable(target);
        return Ok(());
    }
    let staging = Path::new(STAGING);
    ensure_dir(staging, 0o700).map_err(|e| Error::io(format!("creating {STAGING}"), e))?;
    let fstype = mount_fs(&dev_s, staging, m, flags, &data)?;
    let seeded = seed(&target, staging)
        .map_err(|e| Error::io(format!("seeding the volume {dev_s} from {mountpoint}"), e));
    // On failure the init powers off, which syncs what was written.
    seeded?;
    crate::console::step(|| format!("{dev_s} ({fstype}) ready for {mountpoint}"));
    sys::mount(STAGING, &target, "", libc::MS_MOVE, None)
        .map_err(|e| Error::io(format!("moving {dev_s} onto {mountpoint}"), e))?;
    writable(target);
    Ok(())
}

fn writable(target: PathBuf) {
    if let Ok(mut mounted) = WRITABLE.lock() {
        mounted.push(target);
    }
}

/// Seeds a new volume mounted at `vol` with the content of `dir`, and its root with the
/// directory's owner and mode, unless it was seeded before or holds files already (a disk
/// that was in use elsewhere). Marks it seeded either way.
fn seed(dir: &Path, vol: &Path) -> io::Result<()> {
    if sys::xattrs(vol)?
        .iter()
        .any(|(n, _)| n.as_c_str() == SEEDED)
    {
        return Ok(());
    }
    let empty = fs::read_dir(vol)?
        .flatten()
        .all(|e| e.file_name() == "lost+found");
    if empty {
        let meta = fs::metadata(dir)?;
        copy_dir_content(dir, vol)?;
        chown(vol, Some(meta.uid()), Some(meta.gid()))?;
        fs::set_permissions(vol, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    sys::set_xattr(vol, SEEDED, b"1")
}

/// Mounts `dev` at `target` as the configured type, or as the first block file system the
/// kernel knows that takes it; the type.
fn mount_fs(
    dev: &str,
    target: &Path,
    m: &Mount,
    flags: libc::c_ulong,
    data: &[String],
) -> Result<String, Error> {
    let data = data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let types = match &m.fstype {
        Some(t) => vec![t.clone()],
        None => block_filesystems(),
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no block file system is available");
    for t in &types {
        match sys::mount(dev, target, t, flags, data) {
            Ok(()) => return Ok(t.clone()),
            Err(e) => last = e,
        }
    }
    Err(Error::io(
        format!(
            "mounting {dev} on {} (tried {})",
            target.display(),
            types.join(", ")
        ),
        last,
    ))
}

/// The kernel's file systems that need a device, from /proc/filesystems.
fn block_filesystems() -> Vec<String> {
    fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with("nodev"))
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Mounts a `virtiofs` entry: the host directory shared under the tag `path`.
pub fn mount_virtiofs(mountpoint: &str, m: &Mount) -> Result<(), Error> {
    let tag = m.path.as_deref().unwrap_or_default();
    ensure_dir(Path::new(mountpoint), 0o755)
        .map_err(|e| Error::io(format!("creating {mountpoint}"), e))?;
    let target = fs::canonicalize(mountpoint)
        .map_err(|e| Error::io(format!("resolving {mountpoint}"), e))?;
    let (flags, data) = mount_options(m);
    let data = data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    let start = Instant::now();
    loop {
        match sys::mount(tag, &target, "virtiofs", flags, data) {
            Ok(()) => return Ok(()),
            // The tag is not there yet, or the driver is still registering.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV))
                    && start.elapsed() < APPEAR_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("mounting the shared directory {tag:?} on {mountpoint}"),
                    e,
                ))
            }
        }
    }
}
