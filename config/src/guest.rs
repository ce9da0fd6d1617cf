//! The contract between the host and the init inside the guest: where the host puts things in
//! the initramfs, the kernel parameters it passes, and the status line the init prints last.
//!
//! Both sides compile this one module, so a path or a word changed here changes on both.

use std::fmt;

/// oci2uk's own directory in the guest; the image's entries there are left out.
pub const PRIVATE_DIR: &str = "/.oci2uk";
/// Where the init goes ([`INIT_PARAM`] names it).
pub const INIT_PATH: &str = "/.oci2uk/init";
/// Where the launch configuration goes.
pub const CONFIG_PATH: &str = "/rumpconfig.json";
/// Where kernel modules go, as `MODULES_DIR/NAME.ko`: outside the image's own `/lib/modules`,
/// which may be a symlink (merged `/usr`) or hold another kernel's tree.
pub const MODULES_DIR: &str = "/.oci2uk/modules";
/// The read-only root image in the initramfs (`--rootfs squashfs`), which the init mounts
/// through a loop device when it is there.
pub const ROOT_IMAGE_PATH: &str = "/.oci2uk/root.squashfs";
/// The name of the MTD device of a root image read in place: the bake tells the kernel
/// (`phram.phram=NAME,ADDRESS,LENGTH`) where it put the image, and the init mounts the block
/// device of the MTD device of this name (`/proc/mtd`) instead of a file of the initramfs.
pub const ROOT_MTD_NAME: &str = "oci2uk-root";
/// The last entry of the archive, out of sort order: an empty file that exists only if the
/// kernel unpacked the whole initramfs. When the root filesystem fills up (a tmpfs is capped
/// at half the memory), the kernel prints "Initramfs unpacking failed: write error", stops
/// unpacking, and still starts the init, which sorts early and so is there: without this file
/// the init knows the tree is cut short and can say that the guest needs more memory.
pub const UNPACKED_PATH: &str = "/.oci2uk/unpacked";

/// The kernel's parameter naming the program it runs from the initramfs: [`INIT_PATH`].
pub const INIT_PARAM: &str = "rdinit";
/// The kernel parameter carrying the override of the launch configuration
/// (`oci2uk.config=<base64url JSON>`).
pub const OVERRIDE_PARAM: &str = "oci2uk.config";
/// The kernel parameter recording the memory the image needs (`oci2uk.memory=NM`, in MiB),
/// written at build time and read back by `run` and `inspect`; the init ignores it.
pub const MEMORY_PARAM: &str = "oci2uk.memory";
/// The kernel parameter that asks the init for each step with its time (`oci2uk.debug=1`;
/// `0` turns it off).
pub const DEBUG_PARAM: &str = "oci2uk.debug";

/// The Xenstore key holding a per-instance override of the launch configuration: the same
/// JSON as [`OVERRIDE_PARAM`]'s value, not encoded. Relative, so the guest reads
/// `/local/domain/DOMID/oci2uk/config`, which the toolstack lets dom0 write before the domain
/// is unpaused (`xl create -p`, `xenstore-write`, `xl unpause`).
pub const XENSTORE_OVERRIDE_KEY: &str = "oci2uk/config";
/// What Linux says it runs on (`xen` under Xen, PV, PVH and HVM alike; absent elsewhere).
pub const HYPERVISOR_TYPE_PATH: &str = "/sys/hypervisor/type";

/// Where a guest runs, as far as its devices go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A Xen domain: its devices are Xen's split drivers, found through xenbus.
    Xen,
    /// Anything else (QEMU/KVM, Firecracker, Cloud Hypervisor): virtio devices and ACPI.
    Virtio,
}

impl Platform {
    /// The platform from the content of [`HYPERVISOR_TYPE_PATH`] (`None` when it is absent).
    ///
    /// Linux writes `xen` there whenever it runs as a Xen guest, before any module loads, so
    /// this needs no module and no probing. A KVM guest has no such file.
    pub fn from_hypervisor_type(content: Option<&str>) -> Platform {
        match content.map(str::trim) {
            Some("xen") => Platform::Xen,
            _ => Platform::Virtio,
        }
    }
}

/// The mounts of a configuration that need a driver of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// A block device is mounted (a `blk` mount).
    pub blk: bool,
    /// A host directory is shared (a `virtiofs` mount).
    pub virtiofs: bool,
}

/// When a driver is loaded, beyond its platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// At every boot.
    Always,
    /// Only when the configuration mounts a block device.
    Blk,
    /// Only when it shares a host directory.
    Virtiofs,
}

/// A device driver the host puts into every initramfs (with the modules it depends on) and the
/// init loads only where it serves: each module costs 25-190 ms under emulation and more than a
/// second under nested Xen, so a Xen guest skips virtio and ACPI, and the others skip Xen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Driver {
    /// The module's name (`virtio_net`).
    pub name: &'static str,
    /// Where it is loaded.
    pub platform: Platform,
    /// What else it waits for.
    pub need: Need,
}

impl Driver {
    const fn new(platform: Platform, name: &'static str, need: Need) -> Driver {
        Driver {
            name,
            platform,
            need,
        }
    }

    /// Whether the init loads this driver on `platform` for a configuration with `needs`.
    pub fn wanted(&self, platform: Platform, needs: Needs) -> bool {
        self.platform == platform
            && match self.need {
                Need::Always => true,
                Need::Blk => needs.blk,
                Need::Virtiofs => needs.virtiofs,
            }
    }
}

/// The device drivers, in the order the init loads them. `virtio_pci` serves PCI machines
/// (q35), `virtio_mmio` microvm and Firecracker; `button` and `evdev` let the init hear an ACPI
/// power button (QEMU's shutdown request); `virtio_blk` and `virtiofs` (with `fuse`) carry
/// volumes, disks and shared host directories (the kernel has ext4 built in and no 9p). On Xen
/// the network and disks are the frontends (`xen-netfront`, `xen-blkfront`); a shutdown request
/// arrives through Xenstore, which the kernel turns into running `poweroff_cmd`, so nothing
/// else is needed there.
pub const DRIVERS: &[Driver] = &[
    Driver::new(Platform::Virtio, "virtio_pci", Need::Always),
    Driver::new(Platform::Virtio, "virtio_mmio", Need::Always),
    Driver::new(Platform::Virtio, "virtio_net", Need::Always),
    Driver::new(Platform::Virtio, "virtio_blk", Need::Blk),
    Driver::new(Platform::Virtio, "virtiofs", Need::Virtiofs),
    Driver::new(Platform::Virtio, "button", Need::Always),
    Driver::new(Platform::Virtio, "evdev", Need::Always),
    Driver::new(Platform::Xen, "xen_netfront", Need::Always),
    Driver::new(Platform::Xen, "xen_blkfront", Need::Blk),
];

/// Splits a kernel command line into parameters as Linux does (`next_arg`): separated by
/// spaces, double quotes group, a quoted value loses its quotes; `--` ends the kernel's part.
pub fn kernel_params(cmdline: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = cmdline.trim_start();
    while !rest.is_empty() {
        let mut in_quote = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if c == '"' {
                in_quote = !in_quote;
            } else if c.is_ascii_whitespace() && !in_quote {
                end = i;
                break;
            }
        }
        let arg = &rest[..end];
        rest = rest[end..].trim_start();
        if arg == "--" {
            break;
        }
        let (key, value) = match arg.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (arg, None),
        };
        let key = key.trim_start_matches('"').to_owned();
        let value = value.map(|v| {
            let v = v.strip_prefix('"').unwrap_or(v);
            v.strip_suffix('"').unwrap_or(v).to_owned()
        });
        out.push((key.trim_end_matches('"').to_owned(), value));
    }
    out
}

/// The `oci2uk.memory=` word for `mib` MiB.
pub fn memory_param(mib: u64) -> String {
    format!("{MEMORY_PARAM}={mib}M")
}

/// The MiB of the first `oci2uk.memory=` parameter of `cmdline`, if it has one that parses.
pub fn find_memory(cmdline: &str) -> Option<u64> {
    kernel_params(cmdline)
        .into_iter()
        .find_map(|(k, v)| v.filter(|_| k == MEMORY_PARAM))
        .and_then(|v| v.trim_end_matches('M').parse().ok())
}

/// Whether `cmdline` has the kernel start oci2uk's init (`rdinit=/.oci2uk/init`).
pub fn starts_init(cmdline: &str) -> bool {
    kernel_params(cmdline)
        .iter()
        .any(|(k, v)| k == INIT_PARAM && v.as_deref() == Some(INIT_PATH))
}

/// The one last line the init prints on the console when the application has ended, which the
/// host reads as the application's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusLine {
    /// `oci2uk: exit status N`.
    Exited(i32),
    /// `oci2uk: killed by signal N`.
    Signalled(i32),
}

const EXITED: &str = "oci2uk: exit status ";
const SIGNALLED: &str = "oci2uk: killed by signal ";

impl StatusLine {
    /// The line as the init prints it, without a line ending.
    pub fn format(self) -> String {
        self.to_string()
    }

    /// Reads a console line: the whole line (line ending and surrounding blanks aside) must be
    /// a status line, so that an application printing the words mid-line is not taken for it.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end_matches(['\r', '\n']).trim();
        if let Some(n) = line.strip_prefix(EXITED) {
            return n.parse().ok().map(Self::Exited);
        }
        if let Some(n) = line.strip_prefix(SIGNALLED) {
            return n.parse().ok().map(Self::Signalled);
        }
        None
    }
}

impl fmt::Display for StatusLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited(n) => write!(f, "{EXITED}{n}"),
            Self::Signalled(n) => write!(f, "{SIGNALLED}{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_round_trip() {
        for s in [
            StatusLine::Exited(0),
            StatusLine::Exited(7),
            StatusLine::Exited(-1),
            StatusLine::Exited(255),
            StatusLine::Signalled(9),
            StatusLine::Signalled(15),
        ] {
            assert_eq!(StatusLine::parse(&s.format()), Some(s), "{s}");
            assert_eq!(StatusLine::parse(&format!("{s}\r\n")), Some(s), "{s}");
        }
        assert_eq!(StatusLine::Exited(7).format(), "oci2uk: exit status 7");
        assert_eq!(
            StatusLine::Signalled(9).format(),
            "oci2uk: killed by signal 9"
        );
    }

    #[test]
    fn other_lines_are_not_status_lines() {
        for line in [
            "",
            "oci2uk: exit status",
            "oci2uk: exit status x",
            "oci2uk: exit status 7 8",
            "app: oci2uk: exit status 7",
            "oci2uk: error: reading /rumpconfig.json",
            "oci2uk: killed by signal nine",
        ] {
            assert_eq!(StatusLine::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn the_memory_record_round_trips() {
        let line = format!("console=ttyS0 rdinit=/.oci2uk/init {}", memory_param(384));
        assert_eq!(
            line,
            "console=ttyS0 rdinit=/.oci2uk/init oci2uk.memory=384M"
        );
        assert_eq!(find_memory(&line), Some(384));
        assert_eq!(find_memory("oci2uk.memory=12"), Some(12));
        assert_eq!(find_memory("oci2uk.memoryx=12M quiet"), None);
        assert_eq!(find_memory("oci2uk.memory=lots"), None);
        assert_eq!(find_memory("quiet"), None);
    }

    #[test]
    fn the_init_parameter_is_found() {
        assert!(starts_init("console=ttyS0 rdinit=/.oci2uk/init quiet"));
        assert!(!starts_init("rdinit=/init"));
        assert!(!starts_init("rdinit=/.oci2uk/init2"));
        assert!(!starts_init("init=/.oci2uk/init"));
    }

    #[test]
    fn drivers_follow_the_platform() {
        let names = |p, blk| {
            DRIVERS
                .iter()
                .filter(|d| {
                    d.wanted(
                        p,
                        Needs {
                            blk,
                            virtiofs: false,
                        },
                    )
                })
                .map(|d| d.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Platform::Xen, false), ["xen_netfront"]);
        assert_eq!(names(Platform::Xen, true), ["xen_netfront", "xen_blkfront"]);
        assert_eq!(
            names(Platform::Virtio, false),
            ["virtio_pci", "virtio_mmio", "virtio_net", "button", "evdev"]
        );
        assert!(names(Platform::Virtio, true).contains(&"virtio_blk"));
        let fs = Needs {
            blk: false,
            virtiofs: true,
        };
        assert!(DRIVERS
            .iter()
            .any(|d| d.name == "virtiofs" && d.wanted(Platform::Virtio, fs)));
        assert!(!DRIVERS
            .iter()
            .any(|d| d.name == "virtiofs" && d.wanted(Platform::Xen, fs)));
        assert_eq!(Platform::from_hypervisor_type(Some("xen\n")), Platform::Xen);
        assert_eq!(Platform::from_hypervisor_type(None), Platform::Virtio);
        assert_eq!(
            Platform::from_hypervisor_type(Some("kvm")),
            Platform::Virtio
        );
    }
}
