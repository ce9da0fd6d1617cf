//! rumprun's configuration forms in, oci2uk's emitted form out (as JSON, not yet typed).
//!
//! Accepted besides the emitted form (rumprun `lib/librumprun_base/config.c` and its
//! `doc/config.md`):
//! - `cmdline`: a string, split into words (see [`crate::words`]) and run as an `rc` entry;
//! - `rc` (also spelt `rc_TESTING`) entries with `args` for `argv`;
//! - `env` as a `"NAME=VALUE"` string, repeated at the top level, or an array of such strings;
//! - `net` as the flat object `{if, cloner, type, method, addr, mask, gw}`, repeatable;
//! - `blk` as the flat object `{source, path, fstype, mountpoint}`, repeatable;
//! - `mount.*.options` as a string `"size=1M,noexec"`, `dns` as an array of name servers,
//!   `gateways` entries as plain address strings.
//!
//! Repeated top-level keys are seen in document order (serde_json's `Value` would keep only the
//! last one), so the top level is read with a visitor that keeps them all.

use std::fmt;
use std::net::IpAddr;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::words::split_words;
use crate::{Error, Result};

/// The top level of a configuration: every key/value pair in document order, repeats included.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(kv) = map.next_entry::<String, Value>()? {
                    v.push(kv);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A configuration in the emitted form, plus the `cmdline`s an override gave (which apply to
/// the main `rc` entry after merging rather than replacing `rc`).
pub(crate) struct Normalized {
    pub value: Value,
    pub cmdline: Option<Vec<String>>,
}

/// Reads a configuration in any accepted form and gives it in the emitted form, as JSON.
///
/// The result is not yet validated: type it with [`crate::Config::from_value`], or merge it
/// with an override first ([`crate::merge`]).
pub fn normalize(text: &str) -> Result<Value> {
    Ok(normalize_text(text, false)?.value)
}

pub(crate) fn normalize_text(text: &str, is_override: bool) -> Result<Normalized> {
    // rumprun ignores anything before the first `{` (a command line's program name).
    let start = text.find('{').unwrap_or(0);
    let Entries(entries) = serde_json::from_str(&text[start..]).map_err(Error::Json)?;

    let mut out = Map::new();
    let mut rc: Option<Vec<Value>> = None;
    let mut env: Option<Map<String, Value>> = None;
    let mut net: Option<Value> = None;
    let mut flat_net = false;
    let mut mounts: Option<Map<String, Value>> = None;
    let mut cmdline = None;

    for (key, value) in entries {
        match key.as_str() {
            "cmdline" => {
                let Value::String(s) = &value else {
                    return Err(Error::invalid("cmdline", "must be a string"));
                };
                let words = split_words(s)?;
                if words.is_empty() {
                    return Err(Error::invalid("cmdline", "has no program"));
                }
                if is_override {
                    cmdline = Some(words);
                } else {
                    let mut entry = Map::new();
                    entry.insert("bin".into(), words[0].clone().into());
                    entry.insert("argv".into(), words[1..].into());
                    rc.get_or_insert_with(Vec::new).push(Value::Object(entry));
                }
            }
            "rc" | "rc_TESTING" => {
                let Value::Array(items) = value else {
                    return Err(Error::invalid("rc", "must be an array of objects"));
                };
                let entries = rc.get_or_insert_with(Vec::new);
                let offset = entries.len();
                for (i, entry) in list_of(items)?.into_iter().enumerate() {
                    entries.push(rc_entry(offset + i, entry)?);
                }
            }
            "env" => env_entries(env.get_or_insert_with(Map::new), value)?,
            "hostname" | "sysctl" => {
                out.insert(key, value);
            }
            "net" => match value {
                Value::Object(obj) if is_flat_net(&obj) => {
                    if net.as_ref().is_some_and(|_| !flat_net) {
                        return Err(mixed_net());
                    }
                    flat_net = true;
                    flat_net_entry(net.get_or_insert_with(|| json!({"interfaces": {}})), obj)?;
                }
                Value::Object(obj) => {
                    if flat_net {
                        return Err(mixed_net());
                    }
                    net = Some(Value::Object(structured_net(obj)?));
                }
                Value::Null => net = Some(Value::Null),
                _ => return Err(Error::invalid("net", "must be an object")),
            },
            "blk" => {
                let Value::Object(obj) = value else {
                    return Err(Error::invalid("blk", "must be an object"));
                };
                if let Some((mp, m)) = blk_entry(obj)? {
                    mounts.get_or_insert_with(Map::new).insert(mp, m);
                }
            }
            "mount" => match value {
                Value::Object(obj) => {
                    let mounts = mounts.get_or_insert_with(Map::new);
                    for (mp, m) in obj {
                        let m = mount_entry(&mp, m)?;
                        mounts.insert(mp, m);
                    }
                }
                Value::Null => {
                    out.insert(key, Value::Null);
                }
                _ => return Err(Error::invalid("mount", "must be an object")),
            },
            "oci2uk" => {
                out.insert(key, value);
            }
            _ => return Err(Error::UnknownKey(key)),
        }
    }
    if let Some(rc) = rc {
        out.insert("rc".into(), Value::Array(rc));
    }
    if let Some(env) = env {
        out.insert("env".into(), Value::Object(env));
    }
    if let Some(net) = net {
        out.insert("net".into(), net);
    }
    if let Some(mounts) = mounts {
        out.insert("mount".into(), Value::Object(mounts));
    }
    Ok(Normalized {
        value: Value::Object(out),
        cmdline,
    })
}

fn list_of(list: Vec<Value>) -> Result<Vec<Map<String, Value>>> {
    list.into_iter()
        .map(|v| match v {
            Value::Object(o) => Ok(o),
            _ => Err(Error::invalid("rc", "must be an array of objects")),
        })
        .collect()
}

fn rc_entry(i: usize, mut entry: Map<String, Value>) -> Result<Value> {
    if let Some(args) = entry.remove("args") {
        if entry.contains_key("argv") {
            return Err(Error::invalid(
                format!("rc[{i}]"),
                "has both \"args\" and \"argv\"",
            ));
        }
        entry.insert("argv".into(), args);
    }
    Ok(Value::Object(entry))
}

fn env_entries(env: &mut Map<String, Value>, value: Value) -> Result<()> {
    let mut one = |s: &str| -> Result<()> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| Error::invalid("env", format!("{s:?} is not of the form NAME=VALUE")))?;
        env.insert(k.to_owned(), v.into());
        Ok(())
    };
    match value {
        Value::String(s) => one(&s),
        Value::Array(list) => {
            for v in list {
                let Value::String(s) = v else {
                    return Err(Error::invalid(
                        "env",
                        "array entries must be NAME=VALUE strings",
                    ));
                };
                one(&s)?;
            }
            Ok(())
        }
        Value::Object(obj) => {
            for (k, v) in obj {
                let v = match v {
                    Value::String(_) | Value::Null => v,
                    Value::Number(n) => n.to_string().into(),
                    Value::Bool(b) => b.to_string().into(),
                    _ => {
                        return Err(Error::invalid(
                            format!("env.{k}"),
                            "must be a string (or null to remove it in an override)",
                        ))
                    }
                };
                env.insert(k, v);
            }
            Ok(())
        }
        _ => Err(Error::invalid(
            "env",
            "must be an object, a NAME=VALUE string or an array of them",
        )),
    }
}

const FLAT_NET_KEYS: [&str; 7] = ["if", "cloner", "type", "method", "addr", "mask", "gw"];

fn is_flat_net(obj: &Map<String, Value>) -> bool {
    obj.keys().any(|k| FLAT_NET_KEYS.contains(&k.as_str()))
}

fn mixed_net() -> Error {
    Error::invalid(
        "net",
        "mixes rumprun's flat form {if, type, method, ...} with {interfaces, gateways, dns}",
    )
}

/// rumprun names interfaces after NetBSD drivers; the same first virtio or Xen interface is
/// `eth0` on Linux.
fn linux_ifname(name: &str) -> String {
    for prefix in ["vioif", "xenif"] {
        if let Some(n) = name.strip_prefix(prefix) {
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                return format!("eth{n}");
            }
        }
    }
    name.to_owned()
}

fn flat_net_entry(net: &mut Value, obj: Map<String, Value>) -> Result<()> {
    let get = |k: &str| -> Result<Option<String>> {
        match obj.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::invalid(format!("net.{k}"), "must be a string")),
        }
    };
    for k in obj.keys() {
        if !FLAT_NET_KEYS.contains(&k.as_str()) {
            return Err(Error::invalid("net", format!("unexpected key {k:?}")));
        }
    }
    let (Some(ifname), Some(family), Some(method)) = (get("if")?, get("type")?, get("method")?)
    else {
        return Err(Error::invalid(
            "net",
            "rumprun's form needs \"if\", \"type\" and \"method\"",
        ));
    };
    let (addr, mask, gw) = (get("addr")?, get("mask")?, get("gw")?);
    let mut entry = json!({"type": family, "method": method});
    if method == "static" {
        let Some(addr) = addr else {
            return Err(Error::invalid(
                "net.addr",
                "is required for method \"static\"",
            ));
        };
        let cidr = match mask {
            Some(mask) => format!("{addr}/{}", prefix_len(&mask)?),
            None if addr.contains('/') => addr,
            None => {
                return Err(Error::invalid(
                    "net.mask",
                    "is required for method \"static\"",
                ))
            }
        };
        entry["addr"] = cidr.into();
    }
    let ifname = linux_ifname(&ifname);
    let iface = net["interfaces"]
        .as_object_mut()
        .expect("built as an object")
        .entry(ifname)
        .or_insert_with(|| json!({"addrs": []}));
    iface["addrs"]
        .as_array_mut()
        .expect("built as an array")
        .push(entry);
    if let Some(gw) = gw {
        let gws = net
            .as_object_mut()
            .expect("built as an object")
            .entry("gateways")
            .or_insert_with(|| json!([]));
        gws.as_array_mut()
            .expect("built as an array")
            .push(json!({"type": family, "addr": gw}));
    }
    Ok(())
}

/// rumprun's `mask` is a prefix length (`"24"`); a dotted mask is accepted too.
fn prefix_len(mask: &str) -> Result<u32> {
    if let Ok(n) = mask.parse::<u32>() {
        if n <= 128 {
            return Ok(n);
        }
    }
    if let Ok(ip) = mask.parse::<std::net::Ipv4Addr>() {
        let bits = u32::from(ip);
        if bits.leading_ones() + bits.trailing_zeros() == 32 {
            return Ok(bits.leading_ones());
        }
    }
    Err(Error::invalid(
        "net.mask",
        format!("{mask:?} is neither a prefix length nor a netmask"),
    ))
}

fn structured_net(mut obj: Map<String, Value>) -> Result<Map<String, Value>> {
    if let Some(Value::Object(ifaces)) = obj.get_mut("interfaces") {
        // The 2016 draft's `create` (make a Xen netback interface) has no Linux meaning.
        for iface in ifaces.values_mut() {
            if let Value::Object(i) = iface {
                i.remove("create");
            }
        }
    }
    if let Some(Value::Array(gws)) = obj.get_mut("gateways") {
        for gw in gws.iter_mut() {
            if let Value::String(s) = gw {
                let ip: IpAddr = s.parse().map_err(|_| {
                    Error::invalid("net.gateways", format!("{s:?} is not an IP address"))
                })?;
                let family = if ip.is_ipv4() { "inet" } else { "inet6" };
                *gw = json!({"type": family, "addr": s});
            }
        }
    }
    if let Some(dns) = obj.get_mut("dns") {
        if let Value::Array(list) = dns {
            *dns = json!({"nameservers": list});
        }
    }
    Ok(obj)
}

fn blk_entry(obj: Map<String, Value>) -> Result<Option<(String, Value)>> {
    // The 2016 draft's `blk: {NAME: {type, path}}` only registers devices, which Linux does by
    // itself.
    if !obj.is_empty() && obj.values().all(Value::is_object) {
        return Ok(None);
    }
    let get = |k: &str| -> Result<Option<String>> {
        match obj.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::invalid(format!("blk.{k}"), "must be a string")),
        }
    };
    for k in obj.keys() {
        if !["source", "path", "fstype", "mountpoint"].contains(&k.as_str()) {
            return Err(Error::invalid("blk", format!("unexpected key {k:?}")));
        }
    }
    let (Some(source), Some(path)) = (get("source")?, get("path")?) else {
        return Err(Error::invalid("blk", "needs \"source\" and \"path\""));
    };
    let device = match source.as_str() {
        "dev" => path,
        // Xen's block devices: `blkfront:xvda` or `xvda`, /dev/xvda on Linux.
        "etfs" => format!("/dev/{}", path.strip_prefix("blkfront:").unwrap_or(&path)),
        "vnd" => {
            return Err(Error::invalid(
                "blk.source",
                "\"vnd\" (a file as a block device) is not supported",
            ))
        }
        other => {
            return Err(Error::invalid(
                "blk.source",
                format!("{other:?} is not one of \"dev\" and \"etfs\""),
            ))
        }
    };
    let Some(mp) = get("mountpoint")? else {
        return Ok(None);
    };
    let mut m = json!({"source": "blk", "path": device});
    match get("fstype")?.as_deref() {
        // rumprun's "blk" means "a file system on a block device": probe the type.
        None | Some("blk") => {}
        Some("kernfs") => {
            return Err(Error::invalid(
                "blk.fstype",
                "\"kernfs\" has no Linux equivalent",
            ))
        }
        Some(t) => m["fstype"] = t.into(),
    }
    Ok(Some((mp, m)))
}

fn mount_entry(mp: &str, m: Value) -> Result<Value> {
    let Value::Object(mut m) = m else {
        return Ok(m);
    };
    if let Some(Value::String(opts)) = m.get("options") {
        let mut map = Map::new();
        for opt in opts.split(',').filter(|o| !o.is_empty()) {
            let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
            map.insert(k.to_owned(), v.into());
        }
        m.insert("options".into(), Value::Object(map));
    }
    if let Some(Value::Object(opts)) = m.get_mut("options") {
        for (k, v) in opts.iter_mut() {
            match v {
                Value::Number(n) => *v = n.to_string().into(),
                Value::Bool(true) => *v = "".into(),
                Value::String(_) | Value::Null => {}
                _ => {
                    return Err(Error::invalid(
                        format!("mount.{mp}.options.{k}"),
                        "must be a string",
                    ))
                }
            }
        }
    }
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Family, Method, MountSource, RunMode};

    fn parse(s: &str) -> Config {
        Config::from_value(normalize(s).unwrap()).unwrap()
    }

    #[test]
    fn rumprun_cmdline_env_hostname() {
        let c = parse(
            r#"{"cmdline": "mathopd -n -f '/data/my conf'",
                "env": "A=1", "env": "B=x=y", "env": "A=2",
                "hostname": "web"}"#,
        );
        assert_eq!(c.rc.len(), 1);
        assert_eq!(c.rc[0].bin, "mathopd");
        assert_eq!(c.rc[0].argv, ["-n", "-f", "/data/my conf"]);
        assert_eq!(c.env["A"], "2");
        assert_eq!(c.env["B"], "x=y");
        assert_eq!(c.hostname.as_deref(), Some("web"));
    }

    #[test]
    fn rumprun_rc_and_env_array() {
        let c = parse(
            r#"{"rc_TESTING": [{"bin": "a", "argv": ["1"], "runmode": "&"}],
                "rc": [{"bin": "b", "args": ["2", "3"]}],
                "env": ["X=1", "Y="]}"#,
        );
        assert_eq!(c.rc[0].runmode, RunMode::Background);
        assert_eq!(c.rc[1].bin, "b");
        assert_eq!(c.rc[1].argv, ["2", "3"]);
        assert_eq!(c.env["Y"], "");
        assert_eq!(c.main().unwrap().bin, "b");
    }

    #[test]
    fn cmdline_and_rc_keep_document_order() {
        let c = parse(r#"{"rc": [{"bin": "first", "runmode": "&"}], "cmdline": "second x"}"#);
        let bins: Vec<_> = c.rc.iter().map(|r| r.bin.as_str()).collect();
        assert_eq!(bins, ["first", "second"]);
    }

    #[test]
    fn rumprun_flat_net() {
        let c = parse(
            r#"{"net": {"if": "vioif0", "type": "inet", "method": "static",
                        "addr": "10.0.120.10", "mask": "24", "gw": "10.0.120.1"},
                "net": {"if": "vioif0", "type": "inet6", "method": "auto"},
                "net": {"if": "eth1", "cloner": "true", "type": "inet", "method": "dhcp"}}"#,
        );
        let net = c.net.unwrap();
        let eth0 = &net.interfaces["eth0"].addrs;
        assert_eq!(eth0[0].addr.as_deref(), Some("10.0.120.10/24"));
        assert_eq!(eth0[1].family, Family::Inet6);
        assert_eq!(eth0[1].method, Method::Auto);
        assert_eq!(net.interfaces["eth1"].addrs[0].method, Method::Dhcp);
        assert_eq!(net.gateways[0].addr, "10.0.120.1");
        assert_eq!(net.gateways[0].family, Family::Inet);
    }

    #[test]
    fn dotted_mask() {
        let c = parse(
            r#"{"net": {"if": "eth0", "type": "inet", "method": "static",
                        "addr": "192.168.1.5", "mask": "255.255.255.0"}}"#,
        );
        assert_eq!(
            c.net.unwrap().interfaces["eth0"].addrs[0].addr.as_deref(),
            Some("192.168.1.5/24")
        );
        let e = normalize(
            r#"{"net": {"if": "eth0", "type": "inet", "method": "static",
                        "addr": "1.2.3.4", "mask": "255.0.255.0"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("netmask"), "{e}");
    }

    #[test]
    fn flat_net_needs_vital_data() {
        let e = normalize(r#"{"net": {"if": "eth0", "type": "inet"}}"#).unwrap_err();
        assert!(e.to_string().contains("\"method\""), "{e}");
        let e = normalize(
            r#"{"net": {"if": "eth0", "type": "inet", "method": "dhcp"},
                "net": {"interfaces": {}}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("mixes"), "{e}");
    }

    #[test]
    fn rumprun_blk() {
        let c = parse(
            r#"{"blk": {"source": "dev", "path": "/dev/vda", "fstype": "blk", "mountpoint": "/data"},
                "blk": {"source": "etfs", "path": "blkfront:xvdb", "fstype": "ext4", "mountpoint": "/x"},
                "blk": {"source": "dev", "path": "/dev/vdc"}}"#,
        );
        assert_eq!(c.mount.len(), 2);
        let d = &c.mount["/data"];
        assert_eq!(d.source, MountSource::Blk);
        assert_eq!(d.path.as_deref(), Some("/dev/vda"));
        assert_eq!(d.fstype, None);
        assert_eq!(c.mount["/x"].path.as_deref(), Some("/dev/xvdb"));
        assert_eq!(c.mount["/x"].fstype.as_deref(), Some("ext4"));
        let e = normalize(r#"{"blk": {"source": "vnd", "path": "/f", "mountpoint": "/m"}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn draft_forms() {
        let c = parse(
            r#"{"net": {"interfaces": {"xenif0": {"create": true, "addrs": [
                          {"type": "inet", "method": "static", "addr": "10.0.120.10/24"}]}},
                        "gateways": ["10.0.120.1", {"type": "inet6", "addr": "fd00::1"}],
                        "dns": ["10.0.2.3"]},
                "blk": {"xbd0": {"type": "etfs", "path": "blkfront:xvda"}},
                "mount": {"/tmp": {"source": "tmpfs", "options": {"size": "1M"}},
                          "/w": {"source": "tmpfs", "options": "size=2M,noexec"}},
                "rc": [{"bin": "./wopr.bin"}]}"#,
        );
        let net = c.net.unwrap();
        assert!(net.interfaces.contains_key("xenif0"));
        assert_eq!(net.gateways[0].family, Family::Inet);
        assert_eq!(net.gateways[1].family, Family::Inet6);
        assert_eq!(net.dns.nameservers, ["10.0.2.3"]);
        assert_eq!(c.mount["/tmp"].options["size"], "1M");
        assert_eq!(c.mount["/w"].options["size"], "2M");
        assert_eq!(c.mount["/w"].options["noexec"], "");
    }

    #[test]
    fn leading_text_is_ignored_like_rumprun() {
        let c = parse(r#"rumprun {"cmdline": "a"}"#);
        assert_eq!(c.rc[0].bin, "a");
    }

    #[test]
    fn errors() {
        assert!(matches!(normalize("{"), Err(Error::Json(_))));
        assert!(matches!(normalize("[]"), Err(Error::Json(_))));
        assert!(matches!(
            normalize(r#"{"bogus": 1}"#),
            Err(Error::UnknownKey(k)) if k == "bogus"
        ));
        let e = normalize(r#"{"env": "NOEQUALS"}"#).unwrap_err();
        assert!(e.to_string().contains("NAME=VALUE"), "{e}");
        let e = normalize(r#"{"cmdline": ""}"#).unwrap_err();
        assert!(e.to_string().contains("no program"), "{e}");
        let e = normalize(r#"{"cmdline": "a 'b"}"#).unwrap_err();
        assert!(matches!(e, Error::Quote { .. }), "{e}");
        let e = normalize(r#"{"rc": [{"bin": "a", "args": [], "argv": []}]}"#).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
    }
}
