//! `oci2uk inspect`: what a baked file, a pushed artifact or an image holds, as one JSON
//! object (`--json`) or as text.

use serde_json::{json, Map, Value};

use super::baked::BakedInfo;
use super::fetch::Resolved;
use crate::image::Image;

/// A baked file.
pub fn file(path: &str, info: &BakedInfo) -> Value {
    let o = info.config.as_ref().map(|c| &c.oci2uk);
    let mut v = json!({
        "kind": "file",
        "path": path,
        "size": info.size,
        "sha256": info.digest,
        "architecture": info.architecture,
        "kernel_version": info.kernel_version(),
        "memory_mib": info.memory_mib,
        "boot": info.boot,
        "cmdline": info.cmdline,
        "rootfs": {
            "digest": info.rootfs_digest,
            "size": info.rootfs_size,
            "compression": info.rootfs_compression,
            "in_place": info.root_in_place,
        },
        "source": {
            "image": o.and_then(|o| o.source_image.clone()),
            "digest": o.and_then(|o| o.source_digest.clone()),
            "created": o.and_then(|o| o.source_created.clone()),
        },
    });
    if let Some(c) = &info.config {
        v["config"] = serde_json::to_value(c).expect("configs serialise");
    }
    v
}

fn layers(m: &oci_spec::image::ImageManifest) -> (Value, u64) {
    let list: Vec<Value> = m
        .layers()
        .iter()
        .map(|l| {
            json!({
                "digest": l.digest().to_string(),
                "size": l.size(),
                "media_type": l.media_type().to_string(),
            })
        })
        .collect();
    (
        Value::Array(list),
        m.layers().iter().map(|l| l.size()).sum(),
    )
}

/// The parts of an image config a user asks about.
fn config_summary(config: &Value) -> Value {
    let c = &config["config"];
    let mut v = Map::new();
    for (key, from) in [
        ("architecture", &config["architecture"]),
        ("os", &config["os"]),
        ("created", &config["created"]),
        ("entrypoint", &c["Entrypoint"]),
        ("cmd", &c["Cmd"]),
        ("env", &c["Env"]),
        ("working_dir", &c["WorkingDir"]),
        ("user", &c["User"]),
        ("exposed_ports", &c["ExposedPorts"]),
    ] {
        if !from.is_null() && from != "" {
            v.insert(key.into(), from.clone());
        }
    }
    Value::Object(v)
}

/// A manifest on a registry; `config` for a container image.
pub fn remote(r: &Resolved, config: Option<&Value>) -> Value {
    let kind = if r.is_unikernel() {
        "unikernel"
    } else if r.is_kernel() {
        "kernel"
    } else {
        "image"
    };
    let (layers, total) = layers(&r.manifest);
    let annotations: std::collections::BTreeMap<_, _> = r.annotations().into_iter().collect();
    let mut v = json!({
        "kind": kind,
        "reference": r.reference,
        "digest": r.digest.to_string(),
        "index_digest": r.index_digest.as_ref().map(ToString::to_string),
        "config_digest": r.manifest.config().digest().to_string(),
        "layers": layers,
        "compressed_size": total,
        "annotations": annotations,
    });
    if let Some(c) = config {
        v["config"] = config_summary(c);
    }
    v
}

/// An image from an archive or layout.
pub fn image(img: &Image) -> Value {
    let config = serde_json::to_value(&img.config).unwrap_or(Value::Null);
    let layers: Vec<Value> = img
        .layers
        .iter()
        .map(|l| {
            json!({
                "digest": l.digest.to_string(),
                "size": l.size,
                "media_type": l.media_type,
            })
        })
        .collect();
    json!({
        "kind": "image",
        "reference": img.source,
        "digest": img.manifest_digest.to_string(),
        "config_digest": img.config_digest.to_string(),
        "layers": layers,
        "compressed_size": img.layers.iter().map(|l| l.size).sum::<u64>(),
        "config": config_summary(&config),
    })
}

/// What each boot path of a baked file ([`BakedInfo::boot`]) means, for the text form.
fn boot_path_text(path: &str) -> &str {
    match path {
        super::baked::BOOT_PVH => {
            "pvh (QEMU -kernel, Firecracker, Cloud Hypervisor, Xen type = \"pvh\")"
        }
        super::baked::BOOT_XEN_PV => "xen-pv (Xen type = \"pv\")",
        other => other,
    }
}

/// The report as indented `key: value` lines. Lists of strings (argv, env) are written as JSON
/// arrays and odd strings JSON-quoted, so their boundaries survive.
pub fn text(report: &Value) -> String {
    let mut out = String::new();
    render(report, 0, &mut out);
    out
}

fn render(v: &Value, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::Null => {}
                    Value::Object(inner) if inner.is_empty() => {}
                    // A set as JSON spells it (`ExposedPorts`): its keys.
                    Value::Object(inner) if inner.values().all(|e| e == &json!({})) => {
                        let keys: Vec<&str> = inner.keys().map(String::as_str).collect();
                        out.push_str(&format!("{pad}{k}: {}\n", keys.join(" ")));
                    }
                    Value::Array(a) if a.is_empty() => {}
                    Value::Array(a) if depth == 0 && k == "boot" => {
                        let paths: Vec<&str> = a
                            .iter()
                            .map(|p| boot_path_text(p.as_str().unwrap_or_default()))
                            .collect();
                        out.push_str(&format!("{pad}boots as: {}\n", paths.join("; ")));
                    }
                    Value::Object(_) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        render(x, depth + 1, out);
                    }
                    Value::Array(a) if a.iter().all(|e| !e.is_object() && !e.is_array()) => {
                        out.push_str(&format!("{pad}{k}: {x}\n"));
                    }
                    Value::Array(a) => {
                        out.push_str(&format!("{pad}{k}:\n"));
                        for e in a {
                            out.push_str(&format!("{pad}  -\n"));
                            render(e, depth + 2, out);
                        }
                    }
                    _ => out.push_str(&format!("{pad}{k}: {}\n", scalar(x))),
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// A scalar as text: a string as it is, unless it would not read back as itself on a
/// `key: value` line (empty, spaces at an end, a control character), then JSON-quoted.
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s)
            if !s.is_empty()
                && s.trim() == s
                && !s.chars().any(char::is_control)
                && !s.starts_with('"') =>
        {
            s.clone()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rendering() {
        let v = json!({"kind": "file", "n": 3, "none": null, "list": ["a", "b"],
                       "nested": {"x": "y"}, "objs": [{"d": 1}]});
        let t = text(&v);
        assert!(t.contains("kind: file\n"));
        assert!(t.contains("list: [\"a\",\"b\"]\n"));
        assert!(t.contains("nested:\n  x: y\n"));
        assert!(t.contains("objs:\n  -\n    d: 1\n"));
        assert!(!t.contains("none"));
    }

    /// argv and env keep their boundaries; odd values are quoted.
    #[test]
    fn text_keeps_boundaries() {
        let v = json!({"argv": ["-g", "daemon off;"], "env": ["A=b c", "EMPTY="],
                       "vars": {"X": "two\nlines", "Y": " pad", "Z": ""}});
        let t = text(&v);
        assert!(t.contains("argv: [\"-g\",\"daemon off;\"]\n"), "{t}");
        assert!(t.contains("env: [\"A=b c\",\"EMPTY=\"]\n"), "{t}");
        assert!(t.contains("  X: \"two\\nlines\"\n"), "{t}");
        assert!(t.contains("  Y: \" pad\"\n"), "{t}");
        assert!(t.contains("  Z: \"\"\n"), "{t}");
    }

    #[test]
    fn text_names_the_boot_paths() {
        let t = text(&json!({"kind": "file", "boot": ["pvh", "xen-pv"]}));
        assert!(
            t.contains(
                "boots as: pvh (QEMU -kernel, Firecracker, Cloud Hypervisor, Xen type = \"pvh\"); \
                 xen-pv (Xen type = \"pv\")\n"
            ),
            "{t}"
        );
        let t = text(&json!({"kind": "file", "boot": []}));
        assert!(!t.contains("boot"), "{t}");
    }
}
