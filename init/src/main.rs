//! PID 1 of an oci2uk guest.
//!
//! Mounts the kernel's file systems, reads `/rumpconfig.json` with the `oci2uk.config=`
//! override from the kernel command line and, on Xen, the domain's Xenstore key
//! `oci2uk/config`, loads the drivers that serve where it runs and the listed modules, makes a read-only root
//! image (when the initramfs has one) the root under a tmpfs overlay, mounts the volumes, sets
//! up the network and /etc, then runs the application with its identity, environment and
//! working directory, forwards signals, reaps zombies, and when the application ends prints
//! `oci2uk: exit status N` (or `oci2uk: killed by signal N`) as the last line on the console
//! and powers off. It never returns and never leaves the guest running without its
//! application: every failure, a panic included, ends in that line (127 or 126 when the
//! application could not start) or an `oci2uk: error:` line, then power-off.
//!
//! Run by the kernel as `poweroff_cmd` (not as PID 1) with the argument `poweroff`, it asks
//! PID 1 to shut down.

mod app;
mod console;
mod dhcp;
mod fs;
mod modules;
mod net;
mod root;
mod sys;
mod sysctl;
mod volume;
mod xenstore;

use std::time::Duration;

use oci2uk_config::guest::{
    Needs, Platform, CONFIG_PATH, DEBUG_PARAM, HYPERVISOR_TYPE_PATH, UNPACKED_PATH,
    XENSTORE_OVERRIDE_KEY,
};
use oci2uk_config::{find_override, kernel_params, Config, MountSource, StatusLine};

use crate::console::step;

/// A failure before the application's status is known: the message and the status to report.
#[derive(Debug)]
pub struct Error {
    /// Status for the final line (127: could not start, 126: not executable).
    pub status: i32,
    /// What went wrong, as one line.
    pub msg: String,
}

impl Error {
    /// An error with its status.
    pub fn new(status: i32, msg: impl Into<String>) -> Error {
        Error {
            status,
            msg: msg.into(),
        }
    }

    /// A system call's failure while doing `what`.
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Error {
        Error::new(127, format!("{what}: {e}"))
    }
}

fn main() {
    if std::process::id() != 1 {
        if std::env::args().nth(1).as_deref() == Some("poweroff") {
            let _ = sys::kill(1, libc::SIGPWR);
            std::process::exit(0);
        }
        eprintln!("oci2uk-init: this is the init of an oci2uk guest and runs only as PID 1");
        std::process::exit(2);
    }
    // PID 1 must never exit (the kernel would panic): a panic powers off instead, with no
    // status line, so the host reports the guest's failure rather than an application status.
    std::panic::set_hook(Box::new(|info| {
        console::error(&format!("the init failed: {info}"));
        app::power_off(None)
    }));
    let status = match boot() {
        Ok(exit) => app::status_line(exit),
        Err(e) => {
            console::error(&e.msg);
            StatusLine::Exited(e.status).format()
        }
    };
    sysctl::at_end();
    app::power_off(Some(status))
}

fn boot() -> Result<sys::Exit, Error> {
    fs::mount_kernel_filesystems()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let debug = kernel_params(&cmdline)
        .iter()
        .any(|(k, v)| k == DEBUG_PARAM && v.as_deref().is_none_or(|v| v != "0"));
    console::set_debug(debug);
    step(|| "kernel file systems mounted".into());

    // The initramfs ends with this marker: without it, the kernel ran out of memory while
    // unpacking (it says "Initramfs unpacking failed" and starts the init anyway). No status
    // line: the application never ran, and the host reports a failure of the VM.
    if !std::path::Path::new(UNPACKED_PATH).exists() {
        console::error(&format!(
            "the image was cut short while unpacking ({UNPACKED_PATH} is missing): \
             the guest needs more memory; give it what `oci2uk build` reported"
        ));
        app::power_off(None);
    }

    // Ctrl-alt-del becomes SIGINT to us instead of an immediate reboot, and the kernel's
    // orderly power-off (Xen's shutdown request) runs us to send SIGPWR.
    let _ = sys::reboot(libc::RB_DISABLE_CAD);
    if let Ok(exe) = std::fs::read_link("/proc/self/exe") {
        let _ = std::fs::write(
            "/proc/sys/kernel/poweroff_cmd",
            format!("{} poweroff\n", exe.display()),
        );
    }
    let mut sup = app::Supervisor::new().map_err(|e| Error::io("catching signals", e))?;

    let platform = Platform::from_hypervisor_type(
        std::fs::read_to_string(HYPERVISOR_TYPE_PATH)
            .ok()
            .as_deref(),
    );
    step(|| format!("running on {platform:?}"));
    let config = load_config(&cmdline, platform)?;
    if config.oci2uk.debug {
        console::set_debug(true);
    }
    step(|| format!("{CONFIG_PATH} read"));
    sup.set_stop(
        config.oci2uk.stop_signal_number().unwrap_or(libc::SIGTERM),
        Duration::from_secs(config.oci2uk.stop_timeout.unwrap_or(10).into()),
    );

    let needs = Needs {
        blk: config.mount.values().any(|m| m.source == MountSource::Blk),
        virtiofs: config
            .mount
            .values()
            .any(|m| m.source == MountSource::Virtiofs),
    };
    let wanted = modules::wanted(&config.oci2uk, platform, needs);
    for problem in modules::load_all(&wanted) {
        console::warn(&problem);
    }
    step(|| format!("{} modules loaded", wanted.len()));
    // A read-only root image (`--rootfs squashfs`) becomes the root, with an overlay for
    // writes, before anything is mounted or written for the application.
    if let Some(image) = root::find()? {
        root::switch(&image)?;
        step(|| format!("{} mounted as the root", image.describe()));
    }
    sup.watch_power_button();

    fs::mount_tmp_and_run()?;
    for (mountpoint, m) in &config.mount {
        volume::mount_config(mountpoint, m)?;
    }
    step(|| "mounts done".into());

    let hostname = config
        .hostname
        .clone()
        .unwrap_or_else(|| fs::DEFAULT_HOSTNAME.into());
    if let Err(e) = sys::sethostname(&hostname) {
        console::warn(&format!("setting the host name {hostname:?}: {e}"));
    }
    let net = net::setup(config.net.as_ref(), config.hostname.as_deref(), platform);
    fs::write_etc(&hostname, net.addr.as_deref(), &net.dns, &net.search);
    step(|| "network and /etc done".into());

    sysctl::apply(&config.sysctl);
    raise_nofile();
    app::run(&config, &mut sup)
}

/// How long xenstored may take to answer: it runs in dom0, which may be busy starting other
/// domains, but a guest must not hang at boot when it never answers.
const XENSTORE_TIMEOUT: Duration = Duration::from_secs(5);

/// The baked configuration with the overrides merged over it: the command line's
/// `oci2uk.config=`, then (on Xen) the Xenstore key. Xenstore wins because it is the most
/// specific: the launcher writes it for this one domain just before unpausing it, while the
/// command line is the file's (baked at build time) plus the launch file's `extra`, shared by
/// every domain started from that file. rumprun read its configuration from Xenstore too.
fn load_config(cmdline: &str, platform: Platform) -> Result<Config, Error> {
    let baked = std::fs::read_to_string(CONFIG_PATH)
        .map_err(|e| Error::io(format!("reading {CONFIG_PATH}"), e))?;
    let mut layers: Vec<(String, String)> = Vec::new();
    if let Some(v) = find_override(cmdline) {
        let json = oci2uk_config::decode_override(&v).map_err(|e| Error::new(127, chain(&e)))?;
        layers.push(("the oci2uk.config override".into(), json));
    }
    if platform == Platform::Xen {
        if let Some(json) = xenstore_override()? {
            layers.push((
                format!("the Xenstore override {XENSTORE_OVERRIDE_KEY}"),
                json,
            ));
        }
    }
    let texts: Vec<&str> = layers.iter().map(|(_, t)| t.as_str()).collect();
    oci2uk_config::load_layers(&baked, &texts).map_err(|e| {
        let which = match e.layer {
            Some(i) => layers[i].0.clone(),
            None if layers.is_empty() => CONFIG_PATH.to_owned(),
            None => {
                let names: Vec<&str> = layers.iter().map(|(n, _)| n.as_str()).collect();
                format!("{CONFIG_PATH} with {}", names.join(" and "))
            }
        };
        Error::new(127, format!("{which}: {}", chain(&e.error)))
    })
}

/// The domain's `oci2uk/config` key: `None` when it is not there (most guests) or there is no
/// xenbus device; an error when it cannot be read or is not text.
fn xenstore_override() -> Result<Option<String>, Error> {
    if !std::path::Path::new(xenstore::DEVICE).exists() {
        step(|| format!("no {}: no Xenstore override", xenstore::DEVICE));
        return Ok(None);
    }
    let value = xenstore::read(XENSTORE_OVERRIDE_KEY, XENSTORE_TIMEOUT).map_err(|e| {
        Error::new(
            127,
            format!("reading the Xenstore override {XENSTORE_OVERRIDE_KEY}: {e}"),
        )
    })?;
    step(|| format!("Xenstore {XENSTORE_OVERRIDE_KEY} read"));
    let Some(bytes) = value else {
        return Ok(None);
    };
    String::from_utf8(bytes).map(Some).map_err(|_| {
        Error::new(
            127,
            format!("the Xenstore override {XENSTORE_OVERRIDE_KEY} is not UTF-8 text"),
        )
    })
}

/// An error and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Open files: as many as the kernel allows (`fs.nr_open`, 1048576 by default), as docker
/// gives containers.
fn raise_nofile() {
    let max = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1_048_576u64);
    if let Err(e) = sys::setrlimit(libc::RLIMIT_NOFILE as _, max, max) {
        console::warn(&format!("raising the open file limit to {max}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_are_one_line() {
        let e = oci2uk_config::decode_override("***").unwrap_err();
        let s = chain(&e);
        assert!(
            s.starts_with("the kernel parameter oci2uk.config is not base64url: "),
            "{s}"
        );
        assert!(!s.contains('\n'));
    }
}
