//! The emitted form of the configuration: typed, validated, serialised deterministically.
//!
//! Maps are `BTreeMap`s and optional fields are left out when empty, so the same configuration
//! always serialises to the same bytes. Unknown fields are refused, so a misspelt key in an
//! override is an error at boot rather than silently ignored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::{signal::parse_signal, Error, Result};

/// The whole launch configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The programs to run, in order. The last entry is the main application: its end ends the
    /// guest. Entries before it run in the foreground (each must exit 0 before the next starts)
    /// or, with `runmode: "&"`, in the background.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rc: Vec<Rc>,
    /// The programs' environment, exactly (the init adds only `PATH` when it is absent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The guest's host name (kernel, `/etc/hostname`, `/etc/hosts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The network; absent means DHCP on the first interface that is not loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Net>,
    /// File systems to mount, by mount point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mount: BTreeMap<String, Mount>,
    /// Kernel parameters to set before the application starts (docker's `--sysctl`), by
    /// dotted name: `vm.overcommit_memory` is written to `/proc/sys/vm/overcommit_memory`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sysctl: BTreeMap<String, String>,
    /// What rumprun has no word for.
    #[serde(default, skip_serializing_if = "Oci2uk::is_empty")]
    pub oci2uk: Oci2uk,
}

/// One program to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rc {
    /// The program, passed as `argv[0]`. Without a `/` it is looked up in the `PATH` of
    /// [`Config::env`]; a relative path is relative to `workdir` (docker's rules).
    pub bin: String,
    /// The arguments after `argv[0]` (rumprun's meaning of `argv`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// The working directory, absolute; `/` when absent. Created when missing, as docker does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The identity to run as; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// Foreground (absent or `""`) or background (`"&"`).
    #[serde(default, skip_serializing_if = "RunMode::is_foreground")]
    pub runmode: RunMode,
}

/// Numeric identity, resolved at build time from the image's own `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User id.
    #[serde(default)]
    pub uid: u32,
    /// Primary group id.
    #[serde(default)]
    pub gid: u32,
    /// Supplementary group ids (exactly these; empty clears them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
}

/// How an `rc` entry runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RunMode {
    /// Wait for the program (rumprun: runmode absent or `""`).
    #[default]
    Foreground,
    /// Start the program and go on (rumprun: `"&"`).
    Background,
}

impl RunMode {
    fn is_foreground(&self) -> bool {
        *self == RunMode::Foreground
    }
}

impl Serialize for RunMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            RunMode::Foreground => "",
            RunMode::Background => "&",
        })
    }
}

impl<'de> Deserialize<'de> for RunMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "" => Ok(RunMode::Foreground),
            "&" => Ok(RunMode::Background),
            "|" => Err(serde::de::Error::custom(
                "runmode \"|\" (pipe into the next program) is not supported; \
                 use a shell: \"bin\": \"sh\", \"argv\": [\"-c\", \"a | b\"]",
            )),
            other => Err(serde::de::Error::custom(format!(
                "runmode {other:?} is not one of \"\" (foreground) and \"&\" (background)"
            ))),
        }
    }
}

/// The network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    /// Interfaces by name (`eth0`); an interface not named here stays down.
    #[serde(default)]
    pub interfaces: BTreeMap<String, Interface>,
    /// Default gateways, at most one per family (DHCP adds its router when there is none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<Gateway>,
    /// Name resolution; DHCP's answer is used for what is left empty.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

/// One interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Addresses to configure, in order.
    #[serde(default)]
    pub addrs: Vec<Addr>,
    /// The MTU, when it should differ from the driver's (or DHCP's) value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Addr {
    /// `inet` or `inet6`.
    #[serde(rename = "type")]
    pub family: Family,
    /// `dhcp` (inet), `auto` (inet6: stateless autoconfiguration) or `static`.
    pub method: Method,
    /// `ADDRESS/PREFIXLEN`, for `static` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
}

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    Inet,
    /// IPv6.
    Inet6,
}

/// How an address is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// DHCPv4.
    Dhcp,
    /// IPv6 stateless autoconfiguration (the kernel's own, once the link is up).
    Auto,
    /// The `addr` given.
    Static,
}

/// A default gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// `inet` or `inet6`.
    #[serde(rename = "type")]
    pub family: Family,
    /// The gateway's address.
    pub addr: String,
}

/// Name resolution, written to `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Name servers, at most 3 are used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.search.is_empty()
    }
}

/// A file system to mount (the map key is the mount point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// `tmpfs`, `blk` or `virtiofs`.
    pub source: MountSource,
    /// The block device, for `blk` (`/dev/vda`, or `/dev/disk/by-id/virtio-SERIAL` for the
    /// virtio disk with that serial number); the tag, for `virtiofs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The file system type, for `blk`; tried from `/proc/filesystems` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// Mount options: `size`, `nr_inodes`, ... with a value; `ro`, `noexec`, `nosuid`, `nodev`,
    /// `noatime` with an empty value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Copy the directory's content from the image into the new file system, keeping owners,
    /// modes and times, as docker seeds a volume. Default true. For `tmpfs`, every boot; for
    /// `blk`, once: when the file system holds nothing (`lost+found` aside) and has not been
    /// seeded before, and is not mounted read-only.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub seed: bool,
    /// The owner of the mount's root; default: the image directory's, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The group of the mount's root; default: the image directory's, else 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// The mode of the mount's root, octal (`"1777"`); default: the image directory's, else
    /// `"755"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Mount {
    /// A seeded tmpfs with the image directory's owner and mode.
    pub fn tmpfs() -> Self {
        Mount {
            source: MountSource::Tmpfs,
            path: None,
            fstype: None,
            options: BTreeMap::new(),
            seed: true,
            uid: None,
            gid: None,
            mode: None,
        }
    }

    /// The `mode` as a number.
    pub fn mode_bits(&self) -> Option<u32> {
        self.mode
            .as_deref()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
    }
}

/// Where a mount's file system comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountSource {
    /// A new tmpfs.
    Tmpfs,
    /// A block device.
    Blk,
    /// A host directory shared through virtiofs, by its tag.
    Virtiofs,
}

/// oci2uk's own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Oci2uk {
    /// The image's StopSignal (`SIGQUIT`, `QUIT`, `3`), sent to the main application on a
    /// shutdown request; `SIGTERM` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Seconds between the stop signal and SIGKILL; 10 when absent (docker's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timeout: Option<u32>,
    /// The image's ExposedPorts (`80/tcp`), for launchers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    /// Kernel modules to load, in order (dependencies first): absolute paths of `.ko` files,
    /// paths relative to `/lib/modules/RELEASE/`, or names looked up in that directory's
    /// `modules.dep`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// The device drivers' modules, by driver name (`xen_netfront`), each list in load order
    /// with the driver's dependencies first, in the forms `modules` accepts. The init loads
    /// those of the drivers that serve where it runs (`guest::DRIVERS` says which), before
    /// `modules`; a driver built into the kernel has an empty list.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drivers: BTreeMap<String, Vec<String>>,
    /// The image the guest was built from, as the user named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<String>,
    /// That image's manifest digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    /// When that image was created (its config's `created`, RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_created: Option<String>,
    /// The kernel release the modules belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Print each step of the init with timings (as `oci2uk.debug=1` on the command line).
    #[serde(default, skip_serializing_if = "is_false")]
    pub debug: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Oci2uk {
    fn is_empty(&self) -> bool {
        *self == Oci2uk::default()
    }

    /// The stop signal's number (SIGTERM when unset). Validated configurations always have one.
    pub fn stop_signal_number(&self) -> Option<i32> {
        match &self.stop_signal {
            None => Some(15),
            Some(s) => parse_signal(s),
        }
    }
}

impl Addr {
    /// The static address and prefix length.
    pub fn cidr(&self) -> Option<(IpAddr, u8)> {
        self.addr.as_deref().and_then(parse_cidr)
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

impl Config {
    /// Types and validates a configuration in the emitted form (see [`crate::normalize`] for
    /// rumprun's forms).
    pub fn from_value(value: Value) -> Result<Config> {
        let config: Config = serde_json::from_value(value).map_err(Error::Shape)?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as pretty-printed JSON with a final newline; the same configuration
    /// always gives the same bytes.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("a configuration serialises");
        s.push('\n');
        s
    }

    /// The main application: the last `rc` entry.
    pub fn main(&self) -> Option<&Rc> {
        self.rc.last()
    }

    /// Checks what the types alone do not: paths absolute, addresses well formed, names valid.
    pub fn validate(&self) -> Result<()> {
        for (i, rc) in self.rc.iter().enumerate() {
            let at = |f: &str| format!("rc[{i}].{f}");
            if rc.bin.is_empty() {
                return Err(Error::invalid(at("bin"), "is empty"));
            }
            no_nul(&at("bin"), &rc.bin)?;
            for (j, a) in rc.argv.iter().enumerate() {
                no_nul(&format!("rc[{i}].argv[{j}]"), a)?;
            }
            if let Some(w) = &rc.workdir {
                absolute(&at("workdir"), w)?;
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(Error::invalid(
                    format!("env.{k}"),
                    "a variable name must be non-empty and contain no '=' or NUL",
                ));
            }
            no_nul(&format!("env.{k}"), v)?;
        }
        if let Some(h) = &self.hostname {
            if h.is_empty() || h.len() > 64 || h.contains(['\0', '/', ' ', '\n', '\t']) {
                return Err(Error::invalid(
                    "hostname",
                    "must be 1 to 64 characters with no space, '/' or NUL",
                ));
            }
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        for (mp, m) in &self.mount {
            let at = |f: &str| format!("mount.{mp}.{f}");
            absolute(&format!("mount.{mp}"), mp)?;
            if mp == "/" {
                return Err(Error::invalid("mount./", "cannot mount over the root"));
            }
            match (m.source, &m.path) {
                (MountSource::Tmpfs, _) => {}
                (MountSource::Blk, Some(p)) => absolute(&at("path"), p)?,
                (MountSource::Blk, None) => {
                    return Err(Error::invalid(at("path"), "is required for \"blk\""))
                }
                (MountSource::Virtiofs, Some(tag)) => {
                    if tag.is_empty() || tag.len() > 36 || tag.contains(['\0', ',']) {
                        return Err(Error::invalid(
                            at("path"),
                            "must be a virtiofs tag of 1 to 36 characters",
                        ));
                    }
                }
                (MountSource::Virtiofs, None) => {
                    return Err(Error::invalid(
                        at("path"),
                        "is required for \"virtiofs\" (the tag)",
                    ))
                }
            }
            if m.mode.is_some() && m.mode_bits().is_none_or(|b| b > 0o7777) {
                return Err(Error::invalid(
                    at("mode"),
                    "must be an octal mode such as \"1777\"",
                ));
            }
            for (k, v) in &m.options {
                if k.is_empty() || k.contains([',', '=', '\0']) || v.contains([',', '\0']) {
                    return Err(Error::invalid(
                        format!("mount.{mp}.options.{k}"),
                        "option names and values cannot contain ',' or NUL",
                    ));
                }
            }
        }
        for (k, v) in &self.sysctl {
            if let Err(why) = check_sysctl_key(k) {
                return Err(Error::invalid(format!("sysctl.{k}"), why));
            }
            no_nul(&format!("sysctl.{k}"), v)?;
        }
        if self.oci2uk.stop_signal_number().is_none() {
            return Err(Error::invalid(
                "oci2uk.stop_signal",
                format!(
                    "{:?} is not a signal name or number",
                    self.oci2uk.stop_signal.as_deref().unwrap_or_default()
                ),
            ));
        }
        for (i, m) in self.oci2uk.modules.iter().enumerate() {
            if m.is_empty() || m.contains('\0') {
                return Err(Error::invalid(format!("oci2uk.modules[{i}]"), "is empty"));
            }
        }
        for (name, list) in &self.oci2uk.drivers {
            for (i, m) in list.iter().enumerate() {
                if m.is_empty() || m.contains('\0') {
                    return Err(Error::invalid(
                        format!("oci2uk.drivers.{name}[{i}]"),
                        "is empty",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Net {
    fn validate(&self) -> Result<()> {
        for (name, iface) in &self.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
                return Err(Error::invalid(
                    format!("net.interfaces.{name}"),
                    "an interface name must be 1 to 15 characters with no '/' or space",
                ));
            }
            for (i, a) in iface.addrs.iter().enumerate() {
                let at = format!("net.interfaces.{name}.addrs[{i}]");
                match (a.family, a.method) {
                    (Family::Inet6, Method::Dhcp) => {
                        return Err(Error::invalid(
                            at,
                            "DHCPv6 is not supported; use \"auto\" (stateless autoconfiguration)",
                        ))
                    }
                    (Family::Inet, Method::Auto) => {
                        return Err(Error::invalid(at, "\"auto\" is for inet6; use \"dhcp\""))
                    }
                    (_, Method::Static) => match a.cidr() {
                        Some((ip, _)) if ip.is_ipv4() == (a.family == Family::Inet) => {}
                        _ => {
                            return Err(Error::invalid(
                                format!("{at}.addr"),
                                format!(
                                    "{:?} is not an {} ADDRESS/PREFIXLEN",
                                    a.addr.as_deref().unwrap_or_default(),
                                    family_name(a.family)
                                ),
                            ))
                        }
                    },
                    _ => {}
                }
            }
        }
        for (i, g) in self.gateways.iter().enumerate() {
            match g.addr.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == (g.family == Family::Inet) => {}
                _ => {
                    return Err(Error::invalid(
                        format!("net.gateways[{i}].addr"),
                        format!("{:?} is not an {} address", g.addr, family_name(g.family)),
                    ))
                }
            }
        }
        for (i, ns) in self.dns.nameservers.iter().enumerate() {
            if ns.parse::<IpAddr>().is_err() {
                return Err(Error::invalid(
                    format!("net.dns.nameservers[{i}]"),
                    format!("{ns:?} is not an IP address"),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a sysctl name as `--sysctl` and the `sysctl` object take it: dotted components
/// (`net.ipv4.ip_forward`) that stay inside `/proc/sys` once the dots become slashes, so no
/// `/`, no empty component (which `..` would make) and no blank, `=` or NUL.
pub fn check_sysctl_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the name is empty");
    }
    if key.contains('/') {
        return Err("the name cannot contain '/' (write it with dots: net.ipv4.ip_forward)");
    }
    if key.split('.').any(str::is_empty) {
        return Err("the name has an empty component (a leading, trailing or doubled '.')");
    }
    if key.contains(|c: char| c.is_whitespace() || c.is_control() || c == '=') {
        return Err("the name cannot contain blanks, control characters or '='");
    }
    Ok(())
}

/// The file under `/proc/sys` that a checked sysctl name is written to (its dots as slashes).
pub fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::Inet => "inet (IPv4)",
        Family::Inet6 => "inet6 (IPv6)",
    }
}

fn absolute(at: &str, p: &str) -> Result<()> {
    no_nul(at, p)?;
    if !p.starts_with('/') {
        return Err(Error::invalid(at, format!("{p:?} is not an absolute path")));
    }
    Ok(())
}

fn no_nul(at: &str, s: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(Error::invalid(at, "contains a NUL character"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serialisation_is_sorted_and_omits_defaults() {
        let mut c = Config::default();
        c.env.insert("Z".into(), "1".into());
        c.env.insert("A".into(), "2".into());
        c.rc.push(Rc {
            bin: "nginx".into(),
            ..Rc::default()
        });
        c.mount.insert("/data".into(), Mount::tmpfs());
        let s = c.to_json();
        assert_eq!(
            s,
            "{\n  \"rc\": [\n    {\n      \"bin\": \"nginx\"\n    }\n  ],\n  \"env\": {\n    \"A\": \"2\",\n    \"Z\": \"1\"\n  },\n  \"mount\": {\n    \"/data\": {\n      \"source\": \"tmpfs\"\n    }\n  }\n}\n"
        );
        let back = Config::from_value(serde_json::from_str(&s).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = Config::from_value(json!({"rc": [{"bin": "x", "argz": []}]})).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
        let e = Config::from_value(json!({"oci2uk": {"stopsignal": "TERM"}})).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
    }

    #[test]
    fn runmode_pipe_is_refused_clearly() {
        let e = Config::from_value(json!({"rc": [{"bin": "a", "runmode": "|"}]})).unwrap_err();
        let Error::Shape(inner) = e else { panic!() };
        assert!(inner.to_string().contains("not supported"), "{inner}");
        let c = Config::from_value(json!({"rc": [{"bin": "a", "runmode": "&"}]})).unwrap();
        assert_eq!(c.rc[0].runmode, RunMode::Background);
    }

    #[test]
    fn validation_names_the_place() {
        let cases = [
            (json!({"rc": [{"bin": ""}]}), "rc[0].bin"),
            (
                json!({"rc": [{"bin": "a", "workdir": "rel"}]}),
                "rc[0].workdir",
            ),
            (json!({"env": {"A=B": "x"}}), "env.A=B"),
            (
                json!({"net": {"interfaces": {"eth0": {"addrs": [{"type": "inet", "method": "static", "addr": "10.0.0.1"}]}}}}),
                "net.interfaces.eth0.addrs[0].addr",
            ),
            (
                json!({"net": {"interfaces": {"eth0": {"addrs": [{"type": "inet", "method": "static", "addr": "fe80::1/64"}]}}}}),
                "net.interfaces.eth0.addrs[0].addr",
            ),
            (
                json!({"net": {"interfaces": {"eth0": {"addrs": [{"type": "inet6", "method": "dhcp"}]}}}}),
                "net.interfaces.eth0.addrs[0]",
            ),
            (
                json!({"net": {"gateways": [{"type": "inet6", "addr": "10.0.2.2"}]}}),
                "net.gateways[0].addr",
            ),
            (
                json!({"mount": {"data": {"source": "tmpfs"}}}),
                "mount.data",
            ),
            (json!({"mount": {"/d": {"source": "blk"}}}), "mount./d.path"),
            (
                json!({"mount": {"/d": {"source": "virtiofs"}}}),
                "mount./d.path",
            ),
            (
                json!({"mount": {"/d": {"source": "tmpfs", "mode": "9"}}}),
                "mount./d.mode",
            ),
            (
                json!({"oci2uk": {"stop_signal": "SIGNOPE"}}),
                "oci2uk.stop_signal",
            ),
            (json!({"hostname": "a b"}), "hostname"),
            (json!({"sysctl": {"vm..x": "1"}}), "sysctl.vm..x"),
            (json!({"sysctl": {"../x": "1"}}), "sysctl.../x"),
            (json!({"sysctl": {"vm.x": "a\0"}}), "sysctl.vm.x"),
        ];
        for (v, want) in cases {
            match Config::from_value(v.clone()) {
                Err(Error::Invalid { at, .. }) => assert_eq!(at, want, "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
    }

    #[test]
    fn sysctl_names() {
        for good in [
            "vm.overcommit_memory",
            "net.ipv4.conf.eth0-1.forwarding",
            "kernel.shmmax",
        ] {
            assert_eq!(check_sysctl_key(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "vm/overcommit",
            "..",
            "vm..x",
            ".vm",
            "vm.",
            "a b",
            "a=b",
            "a\0b",
        ] {
            assert!(check_sysctl_key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            sysctl_path("vm.overcommit_memory"),
            "/proc/sys/vm/overcommit_memory"
        );
        let c = Config::from_value(json!({"sysctl": {"vm.overcommit_memory": "1"}})).unwrap();
        assert_eq!(c.sysctl["vm.overcommit_memory"], "1");
        assert!(c.to_json().contains("\"sysctl\""));
    }

    #[test]
    fn a_sysctl_override_merges_key_by_key() {
        let baked = r#"{"rc": [{"bin": "a"}], "sysctl": {"vm.overcommit_memory": "1", "kernel.shmmax": "9"}}"#;
        let over = r#"{"sysctl": {"vm.overcommit_memory": "2", "net.core.somaxconn": "1024", "kernel.shmmax": null}}"#;
        let c = crate::load(baked, Some(over)).unwrap();
        let got: Vec<(&str, &str)> = c
            .sysctl
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("net.core.somaxconn", "1024"),
                ("vm.overcommit_memory", "2")
            ]
        );
        let e = crate::load(baked, Some(r#"{"sysctl": {"a/b": "1"}}"#)).unwrap_err();
        assert!(e.to_string().contains("sysctl.a/b"), "{e}");
    }

    #[test]
    fn good_addresses_and_signals() {
        let c = Config::from_value(json!({
            "net": {
                "interfaces": {"eth0": {"addrs": [
                    {"type": "inet", "method": "static", "addr": "10.0.2.15/24"},
                    {"type": "inet6", "method": "static", "addr": "fd00::2/64"},
                    {"type": "inet6", "method": "auto"}
                ]}},
                "gateways": [{"type": "inet", "addr": "10.0.2.2"}],
                "dns": {"nameservers": ["10.0.2.3"], "search": ["example.org"]}
            },
            "oci2uk": {"stop_signal": "SIGQUIT"}
        }))
        .unwrap();
        let a = &c.net.as_ref().unwrap().interfaces["eth0"].addrs[0];
        assert_eq!(a.cidr(), Some(("10.0.2.15".parse().unwrap(), 24)));
        assert_eq!(c.oci2uk.stop_signal_number(), Some(3));
        assert_eq!(Config::default().oci2uk.stop_signal_number(), Some(15));
    }
}
