//! The read-only root image (`oci2uk build --rootfs squashfs`): the initramfs holds the init,
//! the config, the modules and [`ROOT_IMAGE_PATH`]; the init attaches the image to a loop device,
//! mounts it read-only, puts a tmpfs overlay over it for writes, moves the kernel's file
//! systems into the overlay and makes it the root, as `switch_root` does (`chdir`, `mount
//! --move` onto `/`, `chroot`). oci2uk's directory (init, modules) is bound into the new root
//! at the same path, so what refers to it (the kernel's `poweroff_cmd`, the volumes' staging
//! directory) keeps working.

use std::fs::{self, File};
use std::os::unix::fs::{chown, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use libc::c_ulong;
use oci2uk_config::guest::{PRIVATE_DIR, ROOT_IMAGE_PATH};

use crate::sys;
use crate::Error;

/// Where the image is mounted.
const LOWER: &str = "/.oci2uk/lower";
/// The tmpfs for the overlay's upper and work directories.
const RW: &str = "/.oci2uk/rw";
/// Where the overlay is mounted before it becomes the root.
const NEWROOT: &str = "/.oci2uk/newroot";

/// Whether the initramfs has a root image.
pub fn present() -> bool {
    Path::new(ROOT_IMAGE_PATH).is_file()
}

fn mkdir(path: &str, mode: u32) -> Result<(), Error> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && Path::new(path).is_dir() => {
            Ok(())
        }
        Err(e) => Err(Error::io(format!("creating {path}"), e)),
    }
}

fn mount(
    what: &str,
    source: &str,
    target: &str,
    fstype: &str,
    flags: c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    sys::mount(source, Path::new(target), fstype, flags, data)
        .map_err(|e| Error::io(format!("mounting {what} on {target}"), e))
}

/// Whether the kernel has the file system `name` (built in or its module loaded).
fn has_filesystem(name: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().last() == Some(name))
}

/// Mounts the root image with an overlay and makes it the root.
pub fn switch() -> Result<(), Error> {
    for (fs, module) in [("squashfs", "squashfs"), ("overlay", "overlay")] {
        if !has_filesystem(fs) {
            return Err(Error::new(
                127,
                format!(
                    "the kernel has no {fs} file system, which the root image needs: \
                     the module {module}.ko did not load (see the warnings above)"
                ),
            ));
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err(Error::new(
            127,
            "the kernel has no loop devices (/dev/loop-control), which the root image needs: \
             the module loop.ko did not load (see the warnings above)",
        ));
    }
    let image = File::open(ROOT_IMAGE_PATH)
        .map_err(|e| Error::io(format!("opening {ROOT_IMAGE_PATH}"), e))?;
    let dev = sys::loop_attach(&image, ROOT_IMAGE_PATH)
        .map_err(|e| Error::io(format!("attaching {ROOT_IMAGE_PATH} to a loop device"), e))?;
    drop(image);
    let dev = dev.display().to_string();
    crate::console::step(|| format!("{ROOT_IMAGE_PATH} on {dev}"));

    mkdir(LOWER, 0o700)?;
    mount(
        &format!("the root image ({dev}, squashfs)"),
        &dev,
        LOWER,
        "squashfs",
        libc::MS_RDONLY,
        None,
    )?;
    mkdir(RW, 0o700)?;
    mount("tmpfs", "tmpfs", RW, "tmpfs", 0, Some("mode=0755"))?;
    let upper = format!("{RW}/upper");
    let work = format!("{RW}/work");
    mkdir(&upper, 0o755)?;
    mkdir(&work, 0o700)?;
    // The overlay's root takes the upper directory's owner and mode: the image's.
    let root = fs::metadata(LOWER).map_err(|e| Error::io(format!("reading {LOWER}"), e))?;
    chown(&upper, Some(root.uid()), Some(root.gid()))
        .and_then(|()| {
            fs::set_permissions(&upper, fs::Permissions::from_mode(root.mode() & 0o7777))
        })
        .map_err(|e| Error::io(format!("setting the owner and mode of {upper}"), e))?;
    mkdir(NEWROOT, 0o755)?;
    mount(
        "the overlay",
        "overlay",
        NEWROOT,
        "overlay",
        0,
        Some(&format!("lowerdir={LOWER},upperdir={upper},workdir={work}")),
    )?;

    for d in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEWROOT}{d}");
        ensure_mountpoint(&target)?;
        sys::mount(d, Path::new(&target), "", libc::MS_MOVE, None)
            .map_err(|e| Error::io(format!("moving {d} into the root image"), e))?;
    }
    let private = format!("{NEWROOT}{PRIVATE_DIR}");
    ensure_mountpoint(&private)?;
    fs::set_permissions(&private, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("setting the mode of {private}"), e))?;
    mount(
        "oci2uk's directory",
        PRIVATE_DIR,
        &private,
        "",
        libc::MS_BIND,
        None,
    )?;

    std::env::set_current_dir(NEWROOT)
        .map_err(|e| Error::io(format!("changing directory to {NEWROOT}"), e))?;
    sys::mount(".", Path::new("/"), "", libc::MS_MOVE, None)
        .map_err(|e| Error::io("moving the root image onto /", e))?;
    sys::chroot(Path::new(".")).map_err(|e| Error::io("changing the root to the image", e))?;
    std::env::set_current_dir("/").map_err(|e| Error::io("changing directory to /", e))?;
    Ok(())
}

/// A directory at `path` in the new root to mount on; the image's symlink or file there is
/// an error rather than something followed or hidden.
fn ensure_mountpoint(path: &str) -> Result<(), Error> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::new(
            127,
            format!(
                "the image has a non-directory at {}, where the guest mounts a file system",
                &path[NEWROOT.len()..]
            ),
        )),
        Err(_) => mkdir(path, 0o755),
    }
}
