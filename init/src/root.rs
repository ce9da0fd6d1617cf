//! The read-only root image (`oci2uk build --rootfs squashfs`). Either the bake placed it
//! beside the initramfs and the kernel made it the MTD device [`ROOT_MTD_NAME`] where it lies
//! (a kernel with `phram` and `mtdblock` built in), and the init mounts that device's block
//! device; or the initramfs holds it at [`ROOT_IMAGE_PATH`], and the init attaches it to a loop
//! device. It is mounted read-only, with a tmpfs overlay over it for writes, moves the kernel's file
//! systems into the overlay and makes it the root, as `switch_root` does (`chdir`, `mount
//! --move` onto `/`, `chroot`). oci2uk's directory (init, modules) is bound into the new root
//! at the same path, so what refers to it (the kernel's `poweroff_cmd`, the volumes' staging
//! directory) keeps working.

use std::fs::{self, File};
use std::os::unix::fs::{chown, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use libc::c_ulong;
use oci2uk_config::guest::{PRIVATE_DIR, ROOT_IMAGE_PATH, ROOT_MTD_NAME};

use crate::sys;
use crate::Error;

/// Where the image is mounted.
const LOWER: &str = "/.oci2uk/lower";
/// The tmpfs for the overlay's upper and work directories.
const RW: &str = "/.oci2uk/rw";
/// Where the overlay is mounted before it becomes the root.
const NEWROOT: &str = "/.oci2uk/newroot";

/// Where the root image is.
pub enum Image {
    /// Read in place: the block device of its MTD device (`/dev/mtdblock0`).
    InPlace(String),
    /// A file of the initramfs ([`ROOT_IMAGE_PATH`]).
    File,
}

impl Image {
    /// What the console calls it.
    pub fn describe(&self) -> String {
        match self {
            Image::InPlace(dev) => format!("the root image in place ({dev})"),
            Image::File => ROOT_IMAGE_PATH.to_owned(),
        }
    }
}

/// The root image, if the guest has one. A command line that places one (`phram.phram=`)
/// with no MTD device of that name is an error: the kernel could not map it.
pub fn find() -> Result<Option<Image>, Error> {
    let mtd = fs::read_to_string("/proc/mtd").unwrap_or_default();
    if let Some(n) = mtd_index(&mtd, ROOT_MTD_NAME) {
        return Ok(Some(Image::InPlace(format!("/dev/mtdblock{n}"))));
    }
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.contains(&format!("phram.phram={ROOT_MTD_NAME},")) {
        return Err(Error::new(
            127,
            format!(
                "the kernel did not make the root image's MTD device {ROOT_MTD_NAME:?} (phram and \
                 mtdblock must be built in; `oci2uk run --debug` shows the kernel's messages)"
            ),
        ));
    }
    Ok(Path::new(ROOT_IMAGE_PATH).is_file().then_some(Image::File))
}

/// The number N of the MTD device named `name` in `/proc/mtd` (lines `mtdN: SIZE ERASESIZE
/// "NAME"`).
fn mtd_index(proc_mtd: &str, name: &str) -> Option<u32> {
    let quoted = format!("\"{name}\"");
    proc_mtd.lines().find_map(|l| {
        let (dev, rest) = l.split_once(':')?;
        (rest.split_whitespace().nth(2)? == quoted)
            .then(|| dev.strip_prefix("mtd")?.parse().ok())
            .flatten()
    })
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
pub fn switch(image: &Image) -> Result<(), Error> {
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
    let dev = match image {
        Image::InPlace(dev) => dev.clone(),
        Image::File => loop_device()?,
    };

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

/// The initramfs's root image attached to a loop device: the device's path.
fn loop_device() -> Result<String, Error> {
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
    let dev = dev.display().to_string();
    crate::console::step(|| format!("{ROOT_IMAGE_PATH} on {dev}"));
    Ok(dev)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_mtd_device_by_name() {
        let proc_mtd = "dev:    size   erasesize  name\n\
                        mtd0: 00400000 00001000 \"other\"\n\
                        mtd1: 01e00000 00001000 \"oci2uk-root\"\n";
        assert_eq!(mtd_index(proc_mtd, ROOT_MTD_NAME), Some(1));
        assert_eq!(mtd_index(proc_mtd, "oci2uk"), None);
        assert_eq!(mtd_index("", ROOT_MTD_NAME), None);
    }
}
