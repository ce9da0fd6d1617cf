//! Xen: xl.cfg(5) files that boot the baked file alone, as a PVH guest or as a classic PV one
//! (`KEY = VALUE` lines: `name`, `type`, `kernel`, `extra`, `memory`, `vcpus`, `vif`, `on_*`),
//! and a launcher script for dom0 that starts the guest from either file with the
//! application's configuration in Xenstore, as rumprun's launcher did.
//!
//! The baked file holds the kernel, the initramfs and the command line, and boots through
//! either entry Xen offers (PVH's `XEN_ELFNOTE_PHYS32_ENTRY`, PV's `XEN_ELFNOTE_ENTRY`): no
//! `ramdisk` and no `cmdline` are needed, and `extra` is appended to the baked command line.
//!
//! `xl` resolves a relative `kernel` against its own working directory, not the file's, so the
//! configurations name the baked file by the absolute path the bundle was written to; the
//! launcher names it by its own directory, so a moved bundle still starts through it.

/// The Xen bridge the launch files attach the guest's network to unless told otherwise.
pub const XEN_BRIDGE: &str = "xenbr0";

/// What the Xen launch files add to the command line: Xen's console (a PV or PVH domain has
/// no UART).
pub const XEN_ARGS: &str = "console=hvc0";

/// The Xenstore key, relative to the domain's home `/local/domain/DOMID`, that the guest's
/// init reads its configuration override from (JSON, merged as `oci2uk.config=` is).
pub const XENSTORE_KEY: &str = "oci2uk/config";

/// How Xen runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Classic paravirtualisation: needs no hardware virtualisation, so it runs on every
    /// x86 Xen host, a Xen inside a cloud VM included.
    Pv,
    /// PVH: a paravirtualised guest in a hardware (VT-x, AMD-V) container; Xen 4.10 or later.
    Pvh,
}

impl Mode {
    /// Both, the launcher's default first.
    pub const ALL: [Mode; 2] = [Mode::Pv, Mode::Pvh];

    /// xl.cfg's `type`, and the launcher's flag without its dashes.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pv => "pv",
            Mode::Pvh => "pvh",
        }
    }

    /// What the configuration's header says about it.
    fn described(self) -> &'static str {
        match self {
            Mode::Pv => "a classic Xen PV guest (no hardware virtualisation needed)",
            Mode::Pvh => "a Xen PVH guest (needs VT-x or AMD-V, Xen 4.10 or later)",
        }
    }
}

/// A domain booted from the baked file.
#[derive(Debug, Clone, Copy)]
pub struct Domain<'a> {
    /// The domain's name (ASCII letters, digits, `.`, `_` and `-` only).
    pub name: &'a str,
    /// The baked file as the configuration names it: an absolute path, so that `xl` finds it
    /// from any directory.
    pub kernel: &'a str,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
}

/// A string that no xl.cfg string can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct Unquotable {
    /// What is wrong.
    pub why: &'static str,
}

/// An xl.cfg string: double quotes, or single quotes around a value holding double ones. A
/// backslash or a line break is refused: whether `xl` reads escapes is not something to rely
/// on.
pub fn xl_string(s: &str) -> Result<String, Unquotable> {
    if s.contains(['\\', '\n', '\r', '\0']) {
        Err(Unquotable {
            why: "it holds a backslash or a line break, which an xl.cfg string cannot",
        })
    } else if !s.contains('"') {
        Ok(format!("\"{s}\""))
    } else if !s.contains('\'') {
        Ok(format!("'{s}'"))
    } else {
        Err(Unquotable {
            why: "it holds both kinds of quote, which an xl.cfg string cannot",
        })
    }
}

/// The configuration `path` (where it is written, as its comments name it) for `mode`.
/// `launcher` is the launcher's path, which the comments name for a moved bundle.
pub fn cfg(dom: &Domain<'_>, mode: Mode, path: &str, launcher: &str) -> Result<String, Unquotable> {
    let name = dom.name;
    let from = if dom.kernel.starts_with('/') {
        "works from any directory"
    } else {
        "works from this directory only (the bundle's path cannot be written into the file)"
    };
    Ok(format!(
        "# {name} as {what}, from the baked file alone: it holds\n\
         # the kernel, the initramfs and the command line; `extra` is appended to that command line.\n\
         #\n\
         #   xl create -c {path}\n\
         #\n\
         # {from}. The network is attached to the bridge {XEN_BRIDGE}; name another,\n\
         # or start it without a network (xl create fails where the bridge does not exist):\n\
         #\n\
         #   xl create -c {path} 'vif=[\"bridge=br0\"]'\n\
         #   xl create -c {path} 'vif=[]'\n\
         #\n\
         # `kernel` is where the bundle was written; for a moved bundle, add 'kernel=\"/new/path\"'\n\
         # or start it with {launcher}, which also passes the application environment variables\n\
         # (-e K=V) through Xenstore.\n\
         name = \"{name}\"\n\
         type = \"{ty}\"\n\
         kernel = {kernel}\n\
         extra = \"{XEN_ARGS}\"\n\
         memory = {mem}\n\
         vcpus = {vcpus}\n\
         vif = [ 'bridge={XEN_BRIDGE}' ]\n\
         # The application's end powers the guest off; a panic reboots it (panic=-1): either way\n\
         # the domain goes.\n\
         on_poweroff = \"destroy\"\n\
         on_reboot = \"destroy\"\n\
         on_crash = \"destroy\"\n",
        what = mode.described(),
        ty = mode.name(),
        kernel = xl_string(dom.kernel)?,
        mem = dom.memory_mib,
        vcpus = dom.vcpus,
    ))
}

/// The launcher: a POSIX shell script that starts the domain from the configuration for the
/// mode asked (`cfgs`, file names beside the script, [`Mode::ALL`]'s order) with the baked file
/// `elf` in the script's own directory.
///
/// `xl create -p` builds the domain paused; the `-e` variables go to its Xenstore key
/// [`XENSTORE_KEY`] as `{"env":{...}}` (JSON escaped by awk, so any value works); then
/// `xl unpause`. Any failure after the domain exists destroys it.
/// `file` is the script's own name, as its usage message gives it.
pub fn launcher(name: &str, elf: &str, cfgs: [&str; 2], file: &str) -> String {
    LAUNCHER
        .replace("@NAME@", name)
        .replace("@ELF@", elf)
        .replace("@PV_CFG@", cfgs[0])
        .replace("@PVH_CFG@", cfgs[1])
        .replace("@BRIDGE@", XEN_BRIDGE)
        .replace("@KEY@", XENSTORE_KEY)
        .replace("@SELF@", file)
}

const LAUNCHER: &str = r#"#!/bin/sh
# Starts @NAME@ on Xen from this bundle, wherever the bundle is; run it in dom0 as root.
# `xl create -p` builds the domain paused from @PV_CFG@ or @PVH_CFG@ beside this script, with
# the baked file @ELF@ in this directory; the -e variables are written as JSON to the
# domain's Xenstore key @KEY@, which the guest's init merges over the image's configuration;
# then `xl unpause` starts it. If anything fails once the domain exists, it is destroyed.
# Prints the domain's id (without -c).
set -eu

usage() {
    cat <<'EOF'
usage: @SELF@ [--pv|--pvh] [-b BRIDGE|--no-network] [-e K=V|-e K]... [-m MIB] [-n NAME] [-c]
              [XL_SETTING]...
  --pv            boot as a classic PV guest (the default): any x86 Xen host
  --pvh           boot as a PVH guest: needs VT-x or AMD-V, Xen 4.10 or later
  -b BRIDGE       attach the network to BRIDGE (default: @BRIDGE@)
  --no-network    start without a network interface
  -e K=V          set K in the application's environment; -e K takes K's value from this
                  environment, and is left out when K is not set (as docker run does)
  -m MIB          memory, MiB (default: what the image needs)
  -n NAME         the domain's name (default: @NAME@)
  -c              attach to the console once started (Ctrl-] detaches)
  XL_SETTING      further xl.cfg(5) settings, as `xl create` takes them: 'vcpus=2'
EOF
}
die() {
    printf '@SELF@: %s\n' "$*" >&2
    exit 2
}
need() {
    [ "$1" -ge 2 ] || die "$2 needs a value (see --help)"
}

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
cfg=@PV_CFG@
name=@NAME@
vif=
memory=
console=
nenv=0
while [ $# -gt 0 ]; do
    case $1 in
    --pv) cfg=@PV_CFG@ ;;
    --pvh) cfg=@PVH_CFG@ ;;
    -b | --bridge)
        need $# "$1"
        case $2 in '' | *[!A-Za-z0-9._-]*) die "-b $2: not a bridge name" ;; esac
        vif="vif=['bridge=$2']"
        shift
        ;;
    --no-network) vif='vif=[]' ;;
    -e | --env)
        need $# "$1"
        case $2 in '' | =*) die "-e $2: no variable name" ;; esac
        nenv=$((nenv + 1))
        export "OCI2UK_XEN_ENV_$nenv=$2"
        shift
        ;;
    -m | --memory)
        need $# "$1"
        case $2 in '' | *[!0-9]*) die "-m $2: memory is a number of MiB" ;; esac
        memory=$2
        shift
        ;;
    -n | --name)
        need $# "$1"
        case $2 in '' | *[!A-Za-z0-9._-]*) die "-n $2: a name is letters, digits, '.', '_' and '-'" ;; esac
        name=$2
        shift
        ;;
    -c | --console) console=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        break
        ;;
    -*)
        usage >&2
        die "unknown option $1"
        ;;
    *) break ;;
    esac
    shift
done

nl='
'
case $here in *'"'* | *\\* | *"$nl"*)
    die "the bundle's path holds a double quote, a backslash or a line break, which xl cannot take: move it" ;;
esac

# {"env":{K:V,...}}, each string escaped for JSON byte by byte (any UTF-8 passes through);
# a variable named twice takes its last value.
json=$(OCI2UK_XEN_NENV=$nenv LC_ALL=C awk '
function str(s,    out, i, c) {
    out = ""
    for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c in esc) out = out esc[c]; else out = out c
    }
    return "\"" out "\""
}
BEGIN {
    for (i = 1; i < 32; i++) esc[sprintf("%c", i)] = sprintf("\\u%04x", i)
    esc["\""] = "\\\""; esc["\\"] = "\\\\"
    esc["\n"] = "\\n"; esc["\t"] = "\\t"; esc["\r"] = "\\r"
    n = ENVIRON["OCI2UK_XEN_NENV"] + 0
    count = 0
    for (i = 1; i <= n; i++) {
        e = ENVIRON["OCI2UK_XEN_ENV_" i]
        j = index(e, "=")
        if (j) { k = substr(e, 1, j - 1); v = substr(e, j + 1) }
        else if (e in ENVIRON) { k = e; v = ENVIRON[e] }
        else continue
        if (!(k in val)) order[++count] = k
        val[k] = v
    }
    if (count == 0) exit
    out = "{\"env\":{"
    for (i = 1; i <= count; i++) out = out (i > 1 ? "," : "") str(order[i]) ":" str(val[order[i]])
    print out "}}"
}')

set -- "kernel=\"$here/@ELF@\"" "name=\"$name\"" ${memory:+"memory=$memory"} ${vif:+"$vif"} "$@"
xl create -p "$here/$cfg" "$@"
# The domain exists from here on: any failure destroys it.
trap 'xl destroy "$name" >/dev/null 2>&1 || true' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM
domid=$(xl domid "$name")
if [ -n "$json" ]; then
    # -R: as it is; without it xenstore-write reads C escapes, and JSON's \" would lose its \\.
    xenstore-write -R "/local/domain/$domid/@KEY@" "$json"
fi
xl unpause "$domid"
trap - EXIT HUP INT TERM
if [ -n "$console" ]; then
    exec xl console "$domid"
fi
echo "$domid"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_take_the_quote_they_can() {
        assert_eq!(xl_string("/a b/c.elf").unwrap(), "\"/a b/c.elf\"");
        assert_eq!(xl_string("a\"b").unwrap(), "'a\"b'");
        for bad in ["a\"b'c", "a\\b", "a\nb"] {
            assert!(xl_string(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_launcher_is_filled_in() {
        let s = launcher("web", "web.elf", ["xen-pv.cfg", "xen-pvh.cfg"], "xen.sh");
        // `@WORD@` placeholders; `$@` is the shell's.
        let words: Vec<&str> = s.split('@').collect();
        assert!(
            words[1..words.len() - 1]
                .iter()
                .all(|w| !w.chars().all(|c| c.is_ascii_uppercase() || c == '_')),
            "every placeholder filled:\n{s}"
        );
        assert!(s.contains("\"kernel=\\\"$here/web.elf\\\"\""), "{s}");
        assert!(s.contains("cfg=xen-pv.cfg\n"), "PV is the default");
    }
}
