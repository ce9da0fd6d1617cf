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
}
