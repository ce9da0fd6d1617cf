//! Planning: the image configuration, the flattened tree and the command-line overrides in, the
//! launch configuration ([`Config`], written as `/rumpconfig.json`) out.
//!
//! The mapping follows docker's rules, so an image runs as `docker run` would run it:
//!
//! - **Command**: argv is Entrypoint followed by Cmd. `--entrypoint` replaces the Entrypoint
//!   and clears the image's Cmd unless `--cmd` is given too; `--cmd` replaces the Cmd. An empty
//!   argv is an error.
//! - **Environment**: the image's Env, then `--env` in order (a later value wins). `--env K`
//!   without `=` takes K from the host's environment, or removes K when the host has none
//!   (docker's rule). `PATH` defaults to docker's; `HOME` to the user's home directory from
//!   the image's `/etc/passwd` (else `/`), as runc sets it; `HOSTNAME` to the host name.
//! - **Working directory**: `--workdir`, else the image's WorkingDir, else `/`; a relative one
//!   is taken from `/`.
//! - **User**: `--user`, else the image's User, resolved to numbers against the image's own
//!   `/etc/passwd` and `/etc/group` as runc resolves it: an empty user is
//!   root; a name must exist; a number need not; supplementary groups are those listing the
//!   user in `/etc/group`, after the primary group, unless a group is given explicitly.
//! - **Volumes** become tmpfs mounts seeded from the image directory, with its owner and mode
//!   (root `0755` when the image has no such directory, as docker creates it).
//! - **Network**: DHCP unless `--net ADDR/LEN[,GATEWAY]` asks for a static address.
//! - **Host name**: `--hostname`, else the output's name made into a valid host name.
//!
//! Then it checks at build time what would otherwise fail at boot, reading the tree as the
//! guest will see it (symlinks followed inside the tree, never on the host): the program is
//! found (in `PATH` for a bare name, against the working directory for a relative path), is a
//! regular file the user may execute, and is either an ELF binary for the kernel's machine
//! whose ELF interpreter is in the image, or a `#!` script whose interpreter passes the same
//! checks.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::IpAddr;

use oci2uk_config::{
    parse_signal, Addr, Config, Family, Gateway, Interface, Method, Mount, Net, Oci2uk, Rc,
};

use crate::flatten::{Kind, Tree};
use crate::image::Image;
use crate::kernel::Machine;

mod exec;
mod user;

#[cfg(test)]
mod tests;

/// docker's `PATH` for a container whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The interface a static `--net` address is put on (the first virtio-net device).
pub const STATIC_INTERFACE: &str = "eth0";

/// What the user asked for on the command line, over the image's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--env`, in order, with the host's values already taken ([`resolve_env`]).
    pub env: Vec<EnvVar>,
    /// `--entrypoint`, parsed with [`parse_command`]; an empty list clears the Entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// `--cmd`, parsed with [`parse_command`].
    pub cmd: Option<Vec<String>>,
    /// `--workdir`; empty means not given.
    pub workdir: Option<String>,
    /// `--user` as `USER[:GROUP]`, names or numbers; empty means not given.
    pub user: Option<String>,
    /// `--net`: `dhcp` or `ADDR/LEN[,GATEWAY]` (see [`parse_net`]).
    pub net: Option<String>,
    /// `--hostname`.
    pub hostname: Option<String>,
    /// `--sysctl`, by name (checked with [`oci2uk_config::model::check_sysctl_key`]).
    pub sysctl: BTreeMap<String, String>,
}

/// One `--env` entry, resolved: a value, or none to remove the variable (`--env K` with no K
/// in the host's environment, docker's rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// The variable's name.
    pub name: String,
    /// Its value; `None` removes it.
    pub value: Option<String>,
}

/// Resolves `--env` entries once, where the command line is read: `K=V` sets K; `K` takes K's
/// value from `host_env`, or removes K when the host has none (docker's rule).
pub fn resolve_env(
    entries: &[String],
    host_env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Vec<EnvVar>, PlanError> {
    entries
        .iter()
        .map(|e| match e.split_once('=') {
            Some(("", _)) => Err(PlanError::EnvName(e.clone())),
            Some((k, v)) => Ok(EnvVar {
                name: k.to_string(),
                value: Some(v.to_string()),
            }),
            None if e.is_empty() => Err(PlanError::EnvName(e.clone())),
            None => {
                let value = host_env(e)
                    .map(|v| v.into_string())
                    .transpose()
                    .map_err(|_| PlanError::EnvNotUtf8(e.clone()))?;
                Ok(EnvVar {
                    name: e.clone(),
                    value,
                })
            }
        })
        .collect()
}

/// What the image is being built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The kernel's machine: the entrypoint's ELF files must be built for it.
    pub machine: Machine,
    /// The output's name (`nginx`), the default host name.
    pub name: String,
    /// The kernel modules the init loads, as paths in the guest, in load order.
    pub modules: Vec<String>,
    /// The device drivers' modules, by driver name, for the init to load where they serve.
    pub drivers: BTreeMap<String, Vec<String>>,
    /// The kernel's release, recorded in the configuration.
    pub kernel: Option<String>,
}

/// Why an image cannot be planned. Each message names the flag, the user or the path inside
/// the image that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--entrypoint` or `--cmd` starts with `[` but is not a JSON array of strings.
    #[error("{text:?} starts with '[' but is not a JSON array of strings")]
    Command {
        /// The text given.
        text: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// Entrypoint and Cmd are both empty.
    #[error("the image has no Entrypoint or Cmd; give --entrypoint or --cmd")]
    NoCommand,
    /// The program's name is the empty string.
    #[error("the command {0:?} starts with an empty program name")]
    EmptyProgram(Vec<String>),
    /// An `--env` entry is not `NAME=VALUE` or `NAME`.
    #[error("--env {0:?}: the variable name is empty")]
    EnvName(String),
    /// `--env NAME` names a host variable whose value is not UTF-8.
    #[error("--env {0}: the host's value of {0} is not UTF-8")]
    EnvNotUtf8(String),
    /// `--user` or the image's User is not `USER[:GROUP]`.
    #[error("{origin} {spec:?} is not USER[:GROUP] (names, or numbers up to 2147483647)")]
    UserSyntax {
        /// `--user` or `the image's User`.
        origin: &'static str,
        /// The value.
        spec: String,
    },
    /// A user name that the image's `/etc/passwd` does not have.
    #[error("user {user:?} ({origin}) is not in the image's /etc/passwd{}", missing_note(*.no_file, "/etc/passwd"))]
    UnknownUser {
        /// The name.
        user: String,
        /// `--user` or `the image's User`.
        origin: &'static str,
        /// Whether the image has no `/etc/passwd` at all.
        no_file: bool,
    },
    /// A group name that the image's `/etc/group` does not have.
    #[error("group {group:?} ({origin}) is not in the image's /etc/group{}", missing_note(*.no_file, "/etc/group"))]
    UnknownGroup {
        /// The name.
        group: String,
        /// `--user` or `the image's User`.
        origin: &'static str,
        /// Whether the image has no `/etc/group` at all.
        no_file: bool,
    },
    /// `/etc/passwd` or `/etc/group` exists but cannot be read as a file.
    #[error("cannot read {path} in the image: {why}")]
    AccountFile {
        /// The path inside the image.
        path: &'static str,
        /// What is wrong.
        why: String,
    },
    /// `--net` does not parse.
    #[error("--net {value:?}: {why}")]
    Net {
        /// The value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// `--hostname` is not a host name.
    #[error("--hostname {0:?} is not a valid host name (letters, digits, '-' and '.', at most 64 characters)")]
    Hostname(String),
    /// The image's StopSignal is not a signal.
    #[error("the image's StopSignal {0:?} is not a signal name or number")]
    StopSignal(String),
    /// The working directory exists in the image and is not a directory.
    #[error("the working directory {path} is a {kind} in the image, not a directory")]
    Workdir {
        /// The working directory.
        path: String,
        /// What it is.
        kind: &'static str,
    },
    /// A Volume that cannot be mounted.
    #[error("VOLUME {path}: {why}")]
    Volume {
        /// The volume's path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A bare program name found in no `PATH` directory.
    #[error("the entrypoint {bin:?} is not found in PATH {path_var} inside the image")]
    NotInPath {
        /// The program name.
        bin: String,
        /// The `PATH` searched.
        path_var: String,
    },
    /// A program path that does not exist in the image.
    #[error("{subject} is not in the image")]
    Missing {
        /// What is missing, with its path (`the entrypoint /app`).
        subject: String,
    },
    /// A symlink on the way leads nowhere inside the image.
    #[error("{subject} is a symlink to {target}, which does not resolve inside the image")]
    Dangling {
        /// The program, with its path.
        subject: String,
        /// The symlink's target.
        target: String,
    },
    /// The program is a directory, a device, ...
    #[error("{subject} is a {kind}, not a regular file")]
    NotAFile {
        /// The program, with its path.
        subject: String,
        /// What it is.
        kind: &'static str,
    },
    /// The program has no execute permission for the user.
    #[error("{subject} is not executable by {who} (mode {mode:04o}, owner {uid}:{gid})")]
    NotExecutable {
        /// The program, with its path.
        subject: String,
        /// `root`, or `uid 1000 (groups 1000, 27)`.
        who: String,
        /// Its permission bits.
        mode: u32,
        /// Its owner.
        uid: u64,
        /// Its group.
        gid: u64,
    },
    /// An ELF file for another machine.
    #[error("{subject} is {found} binary but the kernel is {kernel} (use --platform linux/{arch} to pick the image built for it)")]
    WrongMachine {
        /// The program, with its path.
        subject: String,
        /// `an aarch64`, `an ELF machine 8`.
        found: String,
        /// The kernel's machine.
        kernel: Machine,
        /// The OCI architecture of the kernel's machine.
        arch: &'static str,
    },
    /// A dynamically linked program whose ELF interpreter is absent.
    #[error("{subject} needs the ELF interpreter {interp}, which is not in the image")]
    MissingElfInterpreter {
        /// The program, with its path.
        subject: String,
        /// The PT_INTERP path.
        interp: String,
    },
    /// A script whose `#!` interpreter is absent.
    #[error("{subject} is a script for {interp}, which is not in the image")]
    MissingScriptInterpreter {
        /// The script, with its path.
        subject: String,
        /// The interpreter named on its `#!` line.
        interp: String,
    },
    /// Scripts whose interpreters are scripts, too deep for the kernel.
    #[error("{subject} is a script run through more than {max} levels of #! interpreters")]
    ScriptDepth {
        /// The innermost script, with its path.
        subject: String,
        /// The kernel's limit.
        max: usize,
    },
    /// Not ELF and no `#!`: the kernel refuses to execute it.
    #[error(
        "{subject} is neither an ELF binary nor a script starting with #! (exec format error)"
    )]
    Format {
        /// The program, with its path.
        subject: String,
    },
    /// An ELF file the kernel would refuse.
    #[error("{subject} is not a usable ELF executable: {why}")]
    BadElf {
        /// The program, with its path.
        subject: String,
        /// What is wrong.
        why: String,
    },
    /// A script with an empty `#!` line.
    #[error("{subject} has a #! line that names no interpreter")]
    EmptyShebang {
        /// The script, with its path.
        subject: String,
    },
    /// A file's contents could not be read from the spool.
    #[error("cannot read {path} from the flattened image")]
    Read {
        /// The path inside the image.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The result does not pass the configuration's own validation (a NUL byte in the
    /// image's Env, for instance).
    #[error("the launch configuration would be invalid")]
    Config(#[source] oci2uk_config::Error),
}

fn missing_note(no_file: bool, path: &str) -> String {
    if no_file {
        format!(": the image has no {path}")
    } else {
        String::new()
    }
}

/// Parses `--entrypoint` or `--cmd`: a JSON array of strings (`'["nginx","-g","daemon off;"]'`)
/// when the text starts with `[`, else the whole text as one word (an empty text gives an empty
/// list, which clears the Entrypoint as `--entrypoint ""` does for docker).
pub fn parse_command(text: &str) -> Result<Vec<String>, PlanError> {
    if text.starts_with('[') {
        return serde_json::from_str(text).map_err(|source| PlanError::Command {
            text: text.to_string(),
            source,
        });
    }
    if text.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![text.to_string()])
}

/// Parses `--net`: `dhcp` gives `None` (the init's default, DHCP on the first interface), and
/// `ADDR/LEN[,GATEWAY]` (IPv4 or IPv6) a static address on [`STATIC_INTERFACE`] with that
/// default gateway. DNS is left empty: DHCP supplies it, and a static network has none unless
/// a boot-time override adds it.
pub fn parse_net(value: &str) -> Result<Option<Net>, PlanError> {
    let err = |why: &str| PlanError::Net {
        value: value.to_string(),
        why: why.to_string(),
    };
    if value == "dhcp" {
        return Ok(None);
    }
    let (cidr, gw) = match value.split_once(',') {
        Some((c, g)) => (c, Some(g)),
        None => (value, None),
    };
    let Some((ip, len)) = cidr.split_once('/') else {
        return Err(err(
            "expected dhcp or ADDR/LEN[,GATEWAY], such as 10.0.2.15/24,10.0.2.2",
        ));
    };
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| err("the address is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len.parse().ok().filter(|l| *l <= max).ok_or_else(|| {
        err(&format!(
            "the prefix length must be a number from 0 to {max}"
        ))
    })?;
    let family = if ip.is_ipv4() {
        Family::Inet
    } else {
        Family::Inet6
    };
    let mut gateways = Vec::new();
    if let Some(g) = gw {
        let g: IpAddr = g
            .parse()
            .map_err(|_| err("the gateway is not an IP address"))?;
        if g.is_ipv4() != ip.is_ipv4() {
            return Err(err("the gateway is not of the address's family"));
        }
        gateways.push(Gateway {
            family,
            addr: g.to_string(),
        });
    }
    let iface = Interface {
        addrs: vec![Addr {
            family,
            method: Method::Static,
            addr: Some(format!("{ip}/{len}")),
        }],
        mtu: None,
    };
    Ok(Some(Net {
        interfaces: BTreeMap::from([(STATIC_INTERFACE.to_string(), iface)]),
        gateways,
        dns: Default::default(),
    }))
}

/// Maps `image`'s configuration and `overrides` to the launch configuration, and checks the
/// program against `tree` (see the module documentation).
pub fn plan(
    image: &Image,
    tree: &Tree,
    overrides: &Overrides,
    target: &Target,
) -> Result<Config, PlanError> {
    let none = oci_spec::image::Config::default();
    let ic = image.config.config().as_ref().unwrap_or(&none);

    let argv = command(ic.entrypoint(), ic.cmd(), overrides)?;

    let workdir = given(&overrides.workdir)
        .or_else(|| given(ic.working_dir()))
        .map_or_else(|| "/".to_string(), clean_absolute);

    let (origin, spec) = match given(&overrides.user) {
        Some(u) => ("--user", u),
        None => ("the image's User", ic.user().as_deref().unwrap_or("")),
    };
    let account = user::resolve(tree, spec, origin)?;

    let hostname = match &overrides.hostname {
        Some(h) if valid_hostname(h) => h.clone(),
        Some(h) => return Err(PlanError::Hostname(h.clone())),
        None => default_hostname(&target.name),
    };

    let mut env = BTreeMap::new();
    env.insert("HOSTNAME".to_string(), hostname.clone());
    for e in ic.env().iter().flatten() {
        // An image entry without '=' is not a variable; docker passes it on and it has no
        // effect.
        if let Some((k, v)) = e.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    for e in &overrides.env {
        match &e.value {
            Some(v) => env.insert(e.name.clone(), v.clone()),
            None => env.remove(&e.name),
        };
    }
    env.entry("PATH".to_string())
        .or_insert_with(|| DEFAULT_PATH.to_string());
    env.entry("HOME".to_string())
        .or_insert_with(|| account.home.clone().unwrap_or_else(|| "/".to_string()));

    let net = match given(&overrides.net) {
        Some(n) => parse_net(n)?,
        None => None,
    };

    let mut mount = BTreeMap::new();
    for v in ic.volumes().iter().flatten() {
        let (path, m) = volume(tree, v)?;
        mount.insert(path, m);
    }

    let stop_signal = match ic.stop_signal().as_deref().map(str::trim) {
        None | Some("") => "SIGTERM".to_string(),
        Some(s) if parse_signal(s).is_some() => s.to_string(),
        Some(s) => return Err(PlanError::StopSignal(s.to_string())),
    };
    let mut exposed_ports = ic.exposed_ports().clone().unwrap_or_default();
    exposed_ports.sort();
    exposed_ports.dedup();

    if let Some(e) = tree.resolve(workdir.as_bytes()) {
        if e.inode.kind != Kind::Dir {
            return Err(PlanError::Workdir {
                path: workdir,
                kind: e.inode.kind.name(),
            });
        }
    }
    exec::Checker {
        tree,
        workdir: &workdir,
        path_var: &env["PATH"],
        user: &account.user,
        machine: target.machine,
    }
    .check_entrypoint(&argv[0])?;

    let config = Config {
        rc: vec![Rc {
            bin: argv[0].clone(),
            argv: argv[1..].to_vec(),
            workdir: Some(workdir),
            user: Some(account.user),
            runmode: Default::default(),
        }],
        env,
        hostname: Some(hostname),
        net,
        mount,
        sysctl: overrides.sysctl.clone(),
        oci2uk: Oci2uk {
            stop_signal: Some(stop_signal),
            exposed_ports,
            source_image: Some(image.source.clone()),
            source_digest: Some(image.manifest_digest.to_string()),
            source_created: image.config.created().clone(),
            modules: target.modules.clone(),
            drivers: target.drivers.clone(),
            kernel: target.kernel.clone(),
            ..Oci2uk::default()
        },
    };
    config.validate().map_err(PlanError::Config)?;
    Ok(config)
}

/// `Some` of a non-empty value.
fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().filter(|s| !s.is_empty())
}

/// docker's Entrypoint/Cmd rules.
fn command(
    entrypoint: &Option<Vec<String>>,
    cmd: &Option<Vec<String>>,
    o: &Overrides,
) -> Result<Vec<String>, PlanError> {
    let image_ep = entrypoint.clone().unwrap_or_default();
    let image_cmd = cmd.clone().unwrap_or_default();
    let (mut argv, cmd) = match (&o.entrypoint, &o.cmd) {
        (Some(e), Some(c)) => (e.clone(), c.clone()),
        (Some(e), None) => (e.clone(), Vec::new()),
        (None, Some(c)) => (image_ep, c.clone()),
        (None, None) => (image_ep, image_cmd),
    };
    argv.extend(cmd);
    match argv.first() {
        None => Err(PlanError::NoCommand),
        Some(p) if p.is_empty() => Err(PlanError::EmptyProgram(argv)),
        Some(_) => Ok(argv),
    }
}

/// `p` made absolute (from `/`) and cleaned lexically: no empty, `.` or `..` components, no
/// trailing `/`.
pub(crate) fn clean_absolute(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

/// A host name as the kernel and resolvers accept it: dot-separated labels of letters, digits
/// and `-`, not starting or ending with `-`, at most 64 bytes in all.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The output's name as a host name: lower case, other characters as `-`, at most 63 bytes;
/// `oci2uk` when nothing is left.
fn default_hostname(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut h = mapped.trim_matches('-').to_string();
    h.truncate(63);
    let h = h.trim_end_matches('-').to_string();
    if h.is_empty() {
        "oci2uk".to_string()
    } else {
        h
    }
}

/// A Volume as a seeded tmpfs with the image directory's owner and mode.
fn volume(tree: &Tree, v: &str) -> Result<(String, Mount), PlanError> {
    let path = clean_absolute(v);
    let err = |why: &str| PlanError::Volume {
        path: path.clone(),
        why: why.to_string(),
    };
    if path == "/" {
        return Err(err("a volume cannot be mounted over the root"));
    }
    let mut m = Mount::tmpfs();
    // The kernel follows symlinks in the mount point inside the guest's root, as docker
    // follows them inside the container's: read the directory the mount will cover.
    let (uid, gid, mode) = match tree.resolve(path.as_bytes()) {
        None => (0, 0, 0o755),
        Some(e) if e.inode.kind == Kind::Dir => {
            let id = |n: u64| u32::try_from(n).map_err(|_| err("its owner is out of range"));
            (id(e.inode.uid)?, id(e.inode.gid)?, e.inode.mode & 0o7777)
        }
        Some(e) => {
            return Err(err(&format!(
                "it is a {} in the image, not a directory",
                e.inode.kind.name()
            )))
        }
    };
    m.uid = Some(uid);
    m.gid = Some(gid);
    m.mode = Some(format!("{mode:o}"));
    Ok((path, m))
}
