//! File systems: the kernel's (/proc, /sys, /dev, ...), the configuration's mounts, tmpfs
//! volumes seeded from the image as docker seeds a volume, and the files in /etc that describe
//! the guest (hostname, hosts, resolv.conf).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{lchown, symlink, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use libc::c_ulong;
use oci2uk_config::Mount;

use crate::sys;
use crate::Error;

const NOSUID: c_ulong = libc::MS_NOSUID;
const NODEV: c_ulong = libc::MS_NODEV;
const NOEXEC: c_ulong = libc::MS_NOEXEC;

/// Where a tmpfs is mounted while it is filled, before it moves over its mount point.
const STAGING: &str = "/.oci2uk/staging";

/// The directory `path`, created with `mode` when missing.
pub(crate) fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        )),
        Err(_) => fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path),
    }
}

fn mount_at(
    source: &str,
    target: &str,
    fstype: &str,
    flags: c_ulong,
    data: Option<&str>,
    mode: u32,
) -> Result<(), Error> {
    let t = Path::new(target);
    ensure_dir(t, mode).map_err(|e| Error::io(format!("creating {target}"), e))?;
    sys::mount(source, t, fstype, flags, data)
        .map_err(|e| Error::io(format!("mounting {fstype} on {target}"), e))
}

/// Mounts what every Linux program expects, and makes sure the console is on 0, 1 and 2.
pub fn mount_kernel_filesystems() -> Result<(), Error> {
    mount_at(
        "proc",
        "/proc",
        "proc",
        NOSUID | NODEV | NOEXEC,
        None,
        0o555,
    )?;
    mount_at(
        "sysfs",
        "/sys",
        "sysfs",
        NOSUID | NODEV | NOEXEC,
        None,
        0o555,
    )?;
    mount_at(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        NOSUID,
        Some("mode=0755"),
        0o755,
    )?;
    stdio_on_console();
    mount_at(
        "devpts",
        "/dev/pts",
        "devpts",
        NOSUID | NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        0o755,
    )?;
    mount_at(
        "shm",
        "/dev/shm",
        "tmpfs",
        NOSUID | NODEV | NOEXEC,
        Some("mode=1777"),
        0o1777,
    )?;
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
        ("/dev/core", "/proc/kcore"),
    ] {
        // devtmpfs may have some of them already.
        let _ = symlink(target, link);
    }
    // Programs that size themselves from their cgroup (Go, the JVM) find the whole guest.
    if Path::new("/sys/fs/cgroup").is_dir() {
        let _ = sys::mount(
            "cgroup2",
            Path::new("/sys/fs/cgroup"),
            "cgroup2",
            NOSUID | NODEV | NOEXEC,
            None,
        );
    }
    Ok(())
}

/// Without `/dev/console` in the initramfs the kernel starts the init with no descriptors;
/// devtmpfs has the node, so open it now.
fn stdio_on_console() {
    if (0..3).all(sys::fd_is_open) {
        return;
    }
    let Ok(fd) = sys::open_console(c"/dev/console") else {
        return;
    };
    use std::os::fd::AsRawFd;
    for target in 0..3 {
        if !sys::fd_is_open(target) {
            let _ = sys::dup2(fd.as_raw_fd(), target);
        }
    }
}

/// /tmp and /run: tmpfs, seeded with what the image has there.
pub fn mount_tmp_and_run() -> Result<(), Error> {
    let mut tmp = Mount::tmpfs();
    tmp.mode = Some("1777".into());
    tmp.options.insert("nosuid".into(), String::new());
    tmp.options.insert("nodev".into(), String::new());
    mount_tmpfs(Path::new("/tmp"), &tmp)?;
    let mut run = Mount::tmpfs();
    run.options.insert("nosuid".into(), String::new());
    run.options.insert("nodev".into(), String::new());
    mount_tmpfs(Path::new("/run"), &run)
}

/// Splits mount options into flags and the data string.
pub(crate) fn options(m: &Mount) -> (c_ulong, Vec<String>) {
    let mut flags = 0;
    let mut data = Vec::new();
    for (k, v) in &m.options {
        let flag = match k.as_str() {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            "noatime" => libc::MS_NOATIME,
            "nodiratime" => libc::MS_NODIRATIME,
            "relatime" => libc::MS_RELATIME,
            "sync" => libc::MS_SYNCHRONOUS,
            "dirsync" => libc::MS_DIRSYNC,
            "rw" => 0,
            _ => {
                data.push(if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k}={v}")
                });
                continue;
            }
        };
        flags |= flag;
    }
    (flags, data)
}

/// A tmpfs over `mountpoint` with the directory's owner and mode (or the configured ones) and,
/// when seeding, its content copied in, owners, modes, times and xattrs kept. The image's
/// files are removed from under the mount point (they would be hidden anyway) to free memory.
pub(crate) fn mount_tmpfs(mountpoint: &Path, m: &Mount) -> Result<(), Error> {
    let mp_s = mountpoint.display().to_string();
    ensure_dir(mountpoint, 0o755).map_err(|e| Error::io(format!("creating {mp_s}"), e))?;
    // A mount point that is a symlink in the image (/var/run -> /run) is mounted where it
    // points, as mount(2) would.
    let mountpoint =
        fs::canonicalize(mountpoint).map_err(|e| Error::io(format!("resolving {mp_s}"), e))?;
    let meta = fs::metadata(&mountpoint).map_err(|e| Error::io(format!("reading {mp_s}"), e))?;
    let mode = m.mode_bits().unwrap_or(meta.mode() & 0o7777);
    let uid = m.uid.unwrap_or(meta.uid());
    let gid = m.gid.unwrap_or(meta.gid());
    let (flags, mut data) = options(m);
    data.push(format!("mode={mode:o}"));
    data.push(format!("uid={uid}"));
    data.push(format!("gid={gid}"));
    let data = data.join(",");

    let has_content = m.seed
        && fs::read_dir(&mountpoint)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
    if !has_content {
        return sys::mount("tmpfs", &mountpoint, "tmpfs", flags, Some(&data))
            .map_err(|e| Error::io(format!("mounting tmpfs on {mp_s}"), e));
    }
    let staging = Path::new(STAGING);
    ensure_dir(staging, 0o700).map_err(|e| Error::io(format!("creating {STAGING}"), e))?;
    // Filled read-write; the read-only flag (if any) applies once it is in place.
    sys::mount(
        "tmpfs",
        staging,
        "tmpfs",
        flags & !libc::MS_RDONLY,
        Some(&data),
    )
    .map_err(|e| Error::io(format!("mounting tmpfs for {mp_s}"), e))?;
    copy_dir_content(&mountpoint, staging)
        .map_err(|e| Error::io(format!("seeding {mp_s} from the image"), e))?;
    for entry in fs::read_dir(&mountpoint).into_iter().flatten().flatten() {
        let p = entry.path();
        let _ = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
    sys::mount(STAGING, &mountpoint, "", libc::MS_MOVE, None)
        .map_err(|e| Error::io(format!("moving the tmpfs onto {mp_s}"), e))?;
    if flags & libc::MS_RDONLY != 0 {
        sys::mount(
            "",
            &mountpoint,
            "",
            libc::MS_REMOUNT | libc::MS_BIND | flags,
            None,
        )
        .map_err(|e| Error::io(format!("making {mp_s} read-only"), e))?;
    }
    Ok(())
}

/// Copies the content of `src` into the existing directory `dst`, keeping types, owners, modes,
/// times, xattrs and hard links.
pub fn copy_dir_content(src: &Path, dst: &Path) -> io::Result<()> {
    let mut links = HashMap::new();
    copy_children(src, dst, &mut links)
}

fn copy_children(
    src: &Path,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(src)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let from = e.path();
        let to = dst.join(e.file_name());
        copy_one(&from, &to, links)?;
    }
    Ok(())
}

fn copy_one(from: &Path, to: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if !ft.is_dir() && meta.nlink() > 1 {
        if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
            return fs::hard_link(first, to);
        }
        links.insert((meta.dev(), meta.ino()), to.to_owned());
    }
    if ft.is_dir() {
        fs::create_dir(to)?;
        copy_children(from, to, links)?;
    } else if ft.is_symlink() {
        symlink(fs::read_link(from)?, to)?;
    } else if ft.is_file() {
        fs::copy(from, to)?;
    } else {
        // Devices, FIFOs, sockets.
        sys::mknod(to, meta.mode(), meta.rdev())?;
    }
    for (name, value) in sys::xattrs(from).unwrap_or_default() {
        let _ = sys::set_xattr(to, &name, &value);
    }
    // Owner before mode: chown clears set-id bits.
    lchown(to, Some(meta.uid()), Some(meta.gid()))?;
    if !ft.is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    sys::set_times(
        to,
        (meta.atime(), meta.atime_nsec()),
        (meta.mtime(), meta.mtime_nsec()),
    )
}

/// The name used when the configuration has none.
pub const DEFAULT_HOSTNAME: &str = "localhost";

/// Writes /etc/hostname and /etc/hosts as docker does, and /etc/resolv.conf when there is
/// something to say. A file in the image (or a symlink such as systemd's resolv.conf) is
/// replaced.
pub fn write_etc(hostname: &str, addr: Option<&str>, dns: &[String], search: &[String]) {
    if let Err(e) = ensure_dir(Path::new("/etc"), 0o755) {
        crate::console::warn(&format!("creating /etc: {e}"));
        return;
    }
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    if hostname != DEFAULT_HOSTNAME {
        hosts.push_str(&format!("{}\t{hostname}\n", addr.unwrap_or("127.0.1.1")));
    }
    replace_file("/etc/hostname", &format!("{hostname}\n"));
    replace_file("/etc/hosts", &hosts);
    if !dns.is_empty() || !search.is_empty() {
        let mut r = String::new();
        if !search.is_empty() {
            r.push_str(&format!("search {}\n", search.join(" ")));
        }
        for ns in dns.iter().take(3) {
            r.push_str(&format!("nameserver {ns}\n"));
        }
        replace_file("/etc/resolv.conf", &r);
    }
}

fn replace_file(path: &str, content: &str) {
    let p = Path::new(path);
    if fs::symlink_metadata(p).is_ok_and(|m| !m.is_file()) {
        let _ = fs::remove_file(p);
    }
    if let Err(e) = fs::write(p, content)
        .and_then(|()| fs::set_permissions(p, fs::Permissions::from_mode(0o644)))
    {
        crate::console::warn(&format!("writing {path}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let mut m = Mount::tmpfs();
        for (k, v) in [
            ("size", "64M"),
            ("noexec", ""),
            ("ro", ""),
            ("huge", "never"),
        ] {
            m.options.insert(k.into(), v.into());
        }
        let (flags, data) = options(&m);
        assert_eq!(flags, libc::MS_NOEXEC | libc::MS_RDONLY);
        assert_eq!(data, ["huge=never", "size=64M"]);
    }

    #[test]
    fn copy_keeps_types_modes_links_and_times() {
        let base = std::env::temp_dir().join(format!("oci2uk-init-copy-{}", std::process::id()));
        let (src, dst) = (base.join("src"), base.join("dst"));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::write(src.join("sub/f"), "data").unwrap();
        fs::set_permissions(src.join("sub/f"), fs::Permissions::from_mode(0o640)).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::hard_link(src.join("sub/f"), src.join("g")).unwrap();
        symlink("sub/f", src.join("l")).unwrap();
        sys::set_times(&src.join("sub/f"), (1, 0), (1_000_000, 5)).unwrap();

        copy_dir_content(&src, &dst).unwrap();

        assert_eq!(fs::read_to_string(dst.join("sub/f")).unwrap(), "data");
        let f = fs::metadata(dst.join("sub/f")).unwrap();
        assert_eq!(f.mode() & 0o7777, 0o640);
        assert_eq!((f.mtime(), f.mtime_nsec()), (1_000_000, 5));
        assert_eq!(f.nlink(), 2);
        assert_eq!(fs::metadata(dst.join("g")).unwrap().ino(), f.ino());
        assert_eq!(
            fs::metadata(dst.join("sub")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(fs::read_link(dst.join("l")).unwrap(), Path::new("sub/f"));
        fs::remove_dir_all(&base).unwrap();
    }
}
