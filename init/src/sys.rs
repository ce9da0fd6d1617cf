//! Thin wrappers over the system calls the init needs and the standard library lacks.
//!
//! Every `unsafe` block in the init is here, each with the reason it is sound. Callers get
//! `io::Result`s and plain Rust types.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libc::{c_int, c_ulong};

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A C string, or `InvalidInput` when `s` has a NUL byte.
pub fn cstr(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (source, target, fstype) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let data = data.map(cstr).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null for the
    // optional data, as mount(2) accepts.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })?;
    Ok(())
}

/// Flag of `finit_module(2)`: the file is compressed and the kernel decompresses it.
pub const MODULE_INIT_COMPRESSED_FILE: c_int = 4;

/// `finit_module(2)` with no parameters.
pub fn finit_module(file: &File, flags: c_int) -> io::Result<()> {
    let params = c"";
    // SAFETY: the descriptor is open for the duration of the call and the parameter string is
    // a valid empty C string; the kernel reads the module from the descriptor.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `reboot(2)` with one of the `RB_*` commands.
pub fn reboot(cmd: c_int) -> io::Result<()> {
    // SAFETY: reboot takes a plain integer; it either acts or fails with errno.
    check(unsafe { libc::reboot(cmd) })?;
    Ok(())
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `name`, which outlives the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// `kill(2)`.
pub fn kill(pid: i32, sig: c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// How a child ended, from its wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `exit(N)`.
    Status(i32),
    /// Killed by signal N.
    Signal(i32),
}

/// `waitpid(-1, WNOHANG)`: a child that ended, if any. `Ok(None)` when children remain but
/// none has ended; `ECHILD` when there are none.
pub fn reap_one() -> io::Result<Option<(i32, Exit)>> {
    let mut status: c_int = 0;
    // SAFETY: `status` is a valid place for the kernel to write the status to.
    let pid = check(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) })?;
    if pid == 0 {
        return Ok(None);
    }
    let exit = if libc::WIFEXITED(status) {
        Exit::Status(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        // Stopped or continued: not an end (WNOHANG without WUNTRACED does not report these).
        return Ok(None);
    };
    Ok(Some((pid, exit)))
}

/// `setrlimit(2)`.
pub fn setrlimit(resource: c_int, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit that outlives the call. The resource constant's type
    // differs between C libraries, hence the cast.
    check(unsafe { libc::setrlimit(resource as _, &lim) })?;
    Ok(())
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data for which all-zero bytes are valid.
    let mut u: libc::utsname = unsafe { zeroed() };
    // SAFETY: `u` is a valid utsname for the kernel to fill.
    if unsafe { libc::uname(&mut u) } < 0 {
        return String::new();
    }
    // SAFETY: the kernel NUL-terminates every utsname field.
    let r = unsafe { CStr::from_ptr(u.release.as_ptr()) };
    r.to_string_lossy().into_owned()
}

/// Seconds since boot (`CLOCK_BOOTTIME`), as the kernel's log timestamps count.
pub fn boot_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Whether `fd` is an open descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; a closed one gives EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// `dup2(2)`.
pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 takes plain descriptors; replacing `to` is the intent.
    check(unsafe { libc::dup2(from, to) })?;
    Ok(())
}

/// `tcdrain(3)`: waits until the terminal has sent what was written to it.
pub fn tcdrain(fd: RawFd) {
    // SAFETY: tcdrain takes a plain descriptor and fails harmlessly on a non-terminal.
    unsafe { libc::tcdrain(fd) };
}

/// `getrandom(2)` without blocking; fills what it can.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: the buffer is valid for 4 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, libc::GRND_NONBLOCK) };
    if n != 4 {
        // Early in boot the pool may not be ready; the time is unique enough for a DHCP xid.
        return (boot_time() * 1e9) as u64 as u32;
    }
    u32::from_ne_bytes(b)
}

/// The signals the init handles, blocked so that they queue for [`SignalFd`].
pub struct SignalFd {
    fd: OwnedFd,
}

/// One signal read from a [`SignalFd`].
pub struct SigInfo {
    /// Signal number.
    pub signo: i32,
}

extern "C" fn ignore_signal(_: c_int) {}

impl SignalFd {
    /// Blocks `signals` and opens a signalfd for them. Each gets a do-nothing handler too:
    /// signals whose action is the default are never delivered to PID 1.
    pub fn new(signals: &[c_int]) -> io::Result<SignalFd> {
        let set = sigset(signals);
        for &sig in signals {
            // SAFETY: sigaction is plain data for which zero bytes are valid.
            let mut sa: libc::sigaction = unsafe { zeroed() };
            sa.sa_sigaction = ignore_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: `sa` is a valid sigaction whose handler is an extern "C" function that
            // does nothing, which is async-signal-safe.
            check(unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) })?;
        }
        // SAFETY: `set` is an initialised sigset; the old mask is not wanted.
        check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) })?;
        // SAFETY: -1 asks for a new descriptor; `set` is initialised.
        let fd =
            check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The next pending signal, if any.
    pub fn read(&self) -> Option<SigInfo> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is valid for one signalfd_siginfo, the unit signalfd reads in.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n != size as isize {
            return None;
        }
        // SAFETY: the kernel filled the whole struct.
        let info = unsafe { info.assume_init() };
        Some(SigInfo {
            signo: info.ssi_signo as i32,
        })
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn sigset(signals: &[c_int]) -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: initialised just above.
    let mut set = unsafe { set.assume_init() };
    for &s in signals {
        // SAFETY: `set` is initialised; an invalid number only makes sigaddset fail.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// `poll(2)` on descriptors for reading; the indexes of those that are ready.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: the pointer and length describe `pfds`, which outlives the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    Ok(pfds
        .iter()
        .enumerate()
        .filter(|(_, p)| p.revents != 0)
        .map(|(i, _)| i)
        .collect())
}

/// Sets `(atime, mtime)` of a path, not following a final symlink.
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let p = cstr(path)?;
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: the path is a C string and `ts` two timespecs, both outliving the call.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// `mknod(2)`.
pub fn mknod(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: the path is a C string that outlives the call.
    check(unsafe { libc::mknod(p.as_ptr(), mode as _, rdev as _) })?;
    Ok(())
}

/// The extended attributes of a path (not following a final symlink), names and values.
pub fn xattrs(path: &Path) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let p = cstr(path)?;
    // SAFETY: a null buffer of size 0 asks for the size of the name list.
    let size = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    if size <= 0 {
        return if size == 0 {
            Ok(Vec::new())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    let mut names = vec![0u8; size as usize];
    // SAFETY: the buffer is valid for its length.
    let size = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(size as usize);
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = CString::new(name).expect("split at NUL");
        // SAFETY: a null buffer of size 0 asks for the value's size.
        let len = unsafe { libc::lgetxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            continue;
        }
        let mut value = vec![0u8; len as usize];
        // SAFETY: the buffer is valid for its length.
        let len = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            continue;
        }
        value.truncate(len as usize);
        out.push((name, value));
    }
    Ok(out)
}

/// `lsetxattr(2)`.
pub fn set_xattr(path: &Path, name: &CStr, value: &[u8]) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: the path and name are C strings, and the pointer and length describe `value`;
    // all outlive the call.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })?;
    Ok(())
}

/// `SO_BINDTODEVICE`: the socket sends and receives on that interface only.
pub fn bind_to_device(sock: &impl AsRawFd, ifname: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `ifname`, which outlives the call.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            ifname.as_ptr().cast(),
            ifname.len() as _,
        )
    })?;
    Ok(())
}

/// A datagram socket for interface ioctls.
pub struct IoctlSocket(OwnedFd);

/// `struct ifreq`: the name, then a 24-byte union whose member each ioctl picks.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

const _: () = assert!(size_of::<IfReq>() == 40);

/// `struct rtentry` of `SIOCADDRT` for IPv4.
#[repr(C)]
struct RtEntry {
    pad1: c_ulong,
    dst: [u8; 16],
    gateway: [u8; 16],
    genmask: [u8; 16],
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: c_ulong,
    pad4: *mut libc::c_void,
    metric: libc::c_short,
    dev: *mut libc::c_char,
    mtu: c_ulong,
    window: c_ulong,
    irtt: libc::c_ushort,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<RtEntry>() == 120);

/// `struct in6_rtmsg` of `SIOCADDRT` for IPv6.
#[repr(C)]
struct In6RtMsg {
    dst: [u8; 16],
    src: [u8; 16],
    gateway: [u8; 16],
    kind: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: c_ulong,
    flags: u32,
    ifindex: c_int,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(size_of::<In6RtMsg>() == 80);

/// `struct in6_ifreq` of `SIOCSIFADDR` on an IPv6 socket.
#[repr(C)]
struct In6IfReq {
    addr: [u8; 16],
    prefixlen: u32,
    ifindex: c_int,
}

const _: () = assert!(size_of::<In6IfReq>() == 24);

/// A `struct sockaddr_in` as bytes.
fn sockaddr_in(ip: [u8; 4]) -> [u8; 16] {
    let mut sa = [0u8; 16];
    sa[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    sa[4..8].copy_from_slice(&ip);
    sa
}

impl IoctlSocket {
    /// A socket of `family` (`AF_INET` or `AF_INET6`).
    pub fn new(family: c_int) -> io::Result<IoctlSocket> {
        // SAFETY: socket takes plain integers and returns a new descriptor or -1.
        let fd = check(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: the descriptor is new and owned by nothing else.
        Ok(IoctlSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ifreq(&self, ifname: &str, req: c_ulong, data: [u8; 24]) -> io::Result<[u8; 24]> {
        if ifname.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "interface name too long",
            ));
        }
        let mut ifr = IfReq {
            name: [0; libc::IFNAMSIZ],
            data,
        };
        ifr.name[..ifname.len()].copy_from_slice(ifname.as_bytes());
        // SAFETY: the interface ioctls read and write a struct ifreq, which `ifr` is (its
        // layout and size are checked above).
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, &mut ifr) })?;
        Ok(ifr.data)
    }

    /// The interface flags (`SIOCGIFFLAGS`).
    pub fn flags(&self, ifname: &str) -> io::Result<i16> {
        let d = self.ifreq(ifname, libc::SIOCGIFFLAGS, [0; 24])?;
        Ok(i16::from_ne_bytes([d[0], d[1]]))
    }

    /// Brings an interface up (`SIOCSIFFLAGS` with `IFF_UP`).
    pub fn up(&self, ifname: &str) -> io::Result<()> {
        let flags = self.flags(ifname)? | libc::IFF_UP as i16;
        let mut d = [0u8; 24];
        d[..2].copy_from_slice(&flags.to_ne_bytes());
        self.ifreq(ifname, libc::SIOCSIFFLAGS, d)?;
        Ok(())
    }

    /// The hardware address (`SIOCGIFHWADDR`).
    pub fn hwaddr(&self, ifname: &str) -> io::Result<[u8; 6]> {
        let d = self.ifreq(ifname, libc::SIOCGIFHWADDR, [0; 24])?;
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&d[2..8]);
        Ok(mac)
    }

    /// The interface index (`SIOCGIFINDEX`).
    pub fn index(&self, ifname: &str) -> io::Result<i32> {
        let d = self.ifreq(ifname, libc::SIOCGIFINDEX, [0; 24])?;
        Ok(i32::from_ne_bytes([d[0], d[1], d[2], d[3]]))
    }

    /// Sets the MTU (`SIOCSIFMTU`).
    pub fn set_mtu(&self, ifname: &str, mtu: u32) -> io::Result<()> {
        let mut d = [0u8; 24];
        d[..4].copy_from_slice(&(mtu as i32).to_ne_bytes());
        self.ifreq(ifname, libc::SIOCSIFMTU, d)?;
        Ok(())
    }

    /// Sets an IPv4 address, its netmask and broadcast address.
    pub fn set_inet(&self, ifname: &str, ip: [u8; 4], prefix: u8) -> io::Result<()> {
        let mask = prefix_mask(prefix);
        let bcast = (u32::from_be_bytes(ip) | !mask).to_be_bytes();
        let d = |a: [u8; 4]| {
            let mut d = [0u8; 24];
            d[..16].copy_from_slice(&sockaddr_in(a));
            d
        };
        self.ifreq(ifname, libc::SIOCSIFADDR, d(ip))?;
        self.ifreq(ifname, libc::SIOCSIFNETMASK, d(mask.to_be_bytes()))?;
        if prefix < 31 {
            self.ifreq(ifname, libc::SIOCSIFBRDADDR, d(bcast))?;
        }
        Ok(())
    }

    /// Adds an IPv4 default route through `gateway` (`SIOCADDRT`).
    pub fn add_default_route(&self, gateway: [u8; 4]) -> io::Result<()> {
        let mut rt = RtEntry {
            pad1: 0,
            dst: sockaddr_in([0; 4]),
            gateway: sockaddr_in(gateway),
            genmask: sockaddr_in([0; 4]),
            flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: std::ptr::null_mut(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        // SAFETY: SIOCADDRT on an IPv4 socket reads a struct rtentry, which `rt` is; its
        // pointers are null, which the kernel accepts (any device).
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT as _, &mut rt) })?;
        Ok(())
    }

    /// Adds an IPv6 address (on an `AF_INET6` socket).
    pub fn add_inet6(&self, ifindex: i32, ip: [u8; 16], prefix: u8) -> io::Result<()> {
        let mut req = In6IfReq {
            addr: ip,
            prefixlen: prefix as u32,
            ifindex,
        };
        // SAFETY: SIOCSIFADDR on an IPv6 socket reads a struct in6_ifreq, which `req` is.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCSIFADDR as _, &mut req) })?;
        Ok(())
    }

    /// Adds an IPv6 default route through `gateway` (on an `AF_INET6` socket).
    pub fn add_default_route6(&self, gateway: [u8; 16], ifindex: i32) -> io::Result<()> {
        let mut rt = In6RtMsg {
            dst: [0; 16],
            src: [0; 16],
            gateway,
            kind: 0,
            dst_len: 0,
            src_len: 0,
            metric: 1,
            info: 0,
            flags: (libc::RTF_UP | libc::RTF_GATEWAY) as u32,
            ifindex,
        };
        // SAFETY: SIOCADDRT on an IPv6 socket reads a struct in6_rtmsg, which `rt` is.
        check(unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT as _, &mut rt) })?;
        Ok(())
    }
}

/// The netmask of a prefix length, as a host-order number.
pub fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p if p >= 32 => u32::MAX,
        p => u32::MAX << (32 - p),
    }
}

/// What a child process does between `fork` and `exec`, prepared beforehand so the child
/// only makes system calls.
pub struct Spawn {
    /// The program's path.
    pub path: CString,
    /// `argv`.
    pub argv: Vec<CString>,
    /// `envp`.
    pub envp: Vec<CString>,
    /// The working directory.
    pub workdir: CString,
    /// uid, gid, supplementary groups.
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// The step of [`Spawn`] that failed in the child, with errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStep {
    /// `chdir` to the working directory.
    Chdir,
    /// `setgroups`, `setgid` or `setuid`.
    Identity,
    /// `execve`.
    Exec,
}

/// Forks and execs `s`. Returns the child's pid, or the step and error that made the child
/// fail before exec (it then exits 127 and is left for the caller to reap).
pub fn spawn(s: &Spawn) -> io::Result<Result<i32, (i32, SpawnStep, io::Error)>> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 returned two new descriptors that nothing else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let argv: Vec<*const libc::c_char> = s
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = s
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let groups: Vec<libc::gid_t> = s.groups.clone();

    // SAFETY: the init is single-threaded, so the child is a full copy; it only makes system
    // calls on data prepared above, then execs or exits.
    let pid = check(unsafe { libc::fork() })?;
    if pid == 0 {
        // SAFETY: (the child) see `child`.
        unsafe { child(s, &argv, &envp, &groups, wr.as_raw_fd()) }
    }
    drop(wr);
    let mut buf = [0u8; 5];
    let mut got = 0;
    loop {
        // SAFETY: the buffer is valid for the remaining bytes.
        let n = unsafe {
            libc::read(
                rd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
        if got == buf.len() {
            break;
        }
    }
    if got < buf.len() {
        // The pipe closed on exec: the program runs.
        return Ok(Ok(pid));
    }
    let step = match buf[0] {
        0 => SpawnStep::Chdir,
        1 => SpawnStep::Identity,
        _ => SpawnStep::Exec,
    };
    let errno = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
    Ok(Err((pid, step, io::Error::from_raw_os_error(errno))))
}

/// The child side of [`spawn`]; never returns.
///
/// # Safety
///
/// Must only be called in the child of `fork`, with `argv` and `envp` NULL-terminated arrays
/// of pointers into `s`.
unsafe fn child(
    s: &Spawn,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    groups: &[libc::gid_t],
    report: RawFd,
) -> ! {
    let fail = |step: u8| -> ! {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        let mut msg = [step, 0, 0, 0, 0];
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: the buffer is valid for its length; _exit ends the child at once.
        unsafe {
            libc::write(report, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: all calls below take plain integers or the prepared C strings and arrays, which
    // live in this (copied) address space until exec replaces it.
    unsafe {
        // A clean slate: nothing blocked, every signal at its default (the init's Rust runtime
        // ignores SIGPIPE, and ignored signals stay ignored across exec).
        let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(empty.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
        for sig in 1..=64 {
            libc::signal(sig, libc::SIG_DFL);
        }
        // Its own session, with no controlling terminal: when a session leader that owns the
        // serial console exits, the kernel hangs the terminal up and drops output not yet sent.
        libc::setsid();
        if libc::chdir(s.workdir.as_ptr()) < 0 {
            fail(0);
        }
        if libc::setgroups(groups.len(), groups.as_ptr()) < 0
            || libc::setgid(s.gid) < 0
            || libc::setuid(s.uid) < 0
        {
            fail(1);
        }
        libc::umask(0o022);
        libc::execve(s.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(2)
    }
}

/// Opens `path` read-write, not as controlling terminal.
pub fn open_console(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: the path is a C string; the result is a new descriptor or -1.
    let fd = check(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the descriptor is new and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `chroot(2)`.
pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: the path is a C string that outlives the call.
    check(unsafe { libc::chroot(p.as_ptr()) })?;
    Ok(())
}

// The loop device's ioctls and structures (`linux/loop.h`), which the libc crate lacks.
const LOOP_SET_FD: c_ulong = 0x4C00;
const LOOP_SET_STATUS64: c_ulong = 0x4C04;
const LOOP_CONFIGURE: c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: c_ulong = 0x4C82;
/// `LO_FLAGS_READ_ONLY`.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// The loop device's major number.
const LOOP_MAJOR: u64 = 7;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn loop_info(file_name: &str) -> LoopInfo64 {
    // SAFETY: the structure is plain integers and byte arrays, for which zero is valid.
    let mut info: LoopInfo64 = unsafe { zeroed() };
    info.lo_flags = LO_FLAGS_READ_ONLY;
    let name = file_name.as_bytes();
    let n = name.len().min(63);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    info
}

/// Attaches `backing` (opened read-only) to a free loop device, read-only and with buffered
/// I/O (no `LO_FLAGS_DIRECT_IO`), and returns the device's path (`/dev/loop0`). Uses
/// `LOOP_CONFIGURE` (Linux >= 5.8), else `LOOP_SET_FD` and `LOOP_SET_STATUS64`. The device
/// node is made when devtmpfs has not (yet) made it.
pub fn loop_attach(backing: &File, name: &str) -> io::Result<std::path::PathBuf> {
    let ctl = File::open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
    let n = check(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) })?;
    let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
    if !path.exists() {
        mknod(
            &path,
            libc::S_IFBLK | 0o660,
            libc::makedev(LOOP_MAJOR as u32, n as u32),
        )?;
    }
    let dev = File::open(&path)?;
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: loop_info(name),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is (repr(C), the
    // kernel's layout) and which outlives the call.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
    if ret == 0 {
        return Ok(path);
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(err);
    }
    // SAFETY: LOOP_SET_FD takes a descriptor, which `backing` owns for the call.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd()) })?;
    let info = loop_info(name);
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, which `info` is and which
    // outlives the call.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) })?;
    Ok(path)
}

#[cfg(test)]
mod loop_tests {
    use super::*;

    #[test]
    fn loop_structures_have_the_kernels_sizes() {
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(size_of::<LoopConfig>(), 304);
    }
}
