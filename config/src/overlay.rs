//! The override: a JSON object deep-merged over the baked configuration at boot.
//!
//! It comes from the kernel parameter `oci2uk.config=<base64url JSON>` (the last one on the
//! command line wins; padding optional; a value starting with `{` is taken as plain JSON).
//! Objects merge key by key; arrays and scalars replace; `null` removes a key (as in JSON Merge
//! Patch, RFC 7396). An override's `cmdline` replaces the program and arguments of the main
//! `rc` entry and keeps its working directory and user, so that changing argv at boot does not
//! mean restating the whole entry.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, Engine, GeneralPurpose, GeneralPurposeConfig};
use serde_json::{Map, Value};

use crate::guest::{kernel_params, OVERRIDE_PARAM};
use crate::model::Config;
use crate::normalize::normalize_text;
use crate::{Error, Result};

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Merges `over` into `base`: objects key by key (recursively), `null` removes the key, anything
/// else in `over` replaces what `base` has.
pub fn merge(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Object(mut base), Value::Object(over)) => {
            for (k, v) in over {
                if v.is_null() {
                    base.remove(&k);
                } else {
                    let merged = merge(base.remove(&k).unwrap_or(Value::Null), v);
                    base.insert(k, merged);
                }
            }
            Value::Object(base)
        }
        // A new object still loses its nulls, so that an override never leaves one behind.
        (_, Value::Object(over)) => merge(Value::Object(Map::new()), Value::Object(over)),
        (_, over) => over,
    }
}

/// Reads a configuration in any accepted form into the emitted form, validated.
pub fn parse(text: &str) -> Result<Config> {
    load(text, None)
}

/// The baked configuration with an override (the JSON text of `oci2uk.config`) merged over it.
pub fn load(baked: &str, over: Option<&str>) -> Result<Config> {
    load_layers(baked, over.as_slice()).map_err(|e| e.error)
}

/// Which text a configuration error is about: [`load_layers`]'s error.
#[derive(Debug)]
pub struct LayerError {
    /// The override (its index) that is not a valid override by itself, or `None` when the
    /// baked configuration is wrong or the merged result does not validate.
    pub layer: Option<usize>,
    /// What is wrong.
    pub error: Error,
}

/// The baked configuration with overrides merged over it in order: a later one wins. The
/// init's order is the command line's `oci2uk.config=`, then Xenstore's `oci2uk/config`.
pub fn load_layers(baked: &str, overs: &[&str]) -> std::result::Result<Config, LayerError> {
    let at = |layer| move |error| LayerError { layer, error };
    let mut merged = normalize_text(baked, false).map_err(at(None))?.value;
    for (i, over) in overs.iter().enumerate() {
        let over = normalize_text(over, true).map_err(at(Some(i)))?;
        merged = merge(merged, over.value);
        if let Some(words) = over.cmdline {
            set_main_command(&mut merged, words);
        }
    }
    Config::from_value(merged).map_err(at(None))
}

fn set_main_command(config: &mut Value, words: Vec<String>) {
    let obj = config
        .as_object_mut()
        .expect("a configuration is an object");
    let rc = obj.entry("rc").or_insert_with(|| Value::Array(Vec::new()));
    if !rc.is_array() {
        // Left for validation to report.
        return;
    }
    let list = rc.as_array_mut().expect("checked");
    if list.is_empty() {
        list.push(Value::Object(Map::new()));
    }
    let main = list.last_mut().expect("not empty");
    if let Value::Object(main) = main {
        main.insert("bin".into(), words[0].clone().into());
        main.insert("argv".into(), words[1..].into());
    }
}

/// The raw value of the last `oci2uk.config=` parameter on a kernel command line.
pub fn find_override(cmdline: &str) -> Option<String> {
    kernel_params(cmdline)
        .into_iter()
        .rev()
        .find(|(k, v)| k == OVERRIDE_PARAM && v.is_some())
        .and_then(|(_, v)| v)
}

/// The JSON text of an `oci2uk.config=` value: base64url with or without padding (the standard
/// alphabet's `+` and `/` are accepted too), or JSON as it is when it starts with `{`.
pub fn decode_override(value: &str) -> Result<String> {
    let value = value.trim();
    if value.starts_with('{') {
        return Ok(value.to_owned());
    }
    let value = value.replace('+', "-").replace('/', "_");
    let bytes = B64URL.decode(value.as_bytes()).map_err(Error::Base64)?;
    String::from_utf8(bytes).map_err(Error::Utf8)
}

/// The value for `oci2uk.config=` carrying `over`: compact JSON, base64url without padding, so
/// it needs no quoting on a command line.
pub fn encode_override(over: &Value) -> String {
    B64URL.encode(over.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_objects_replace_arrays_and_scalars() {
        let base = json!({
            "env": {"A": "1", "B": "2"},
            "rc": [{"bin": "a"}, {"bin": "b"}],
            "hostname": "x",
            "oci2uk": {"modules": ["m1", "m2"], "stop_signal": "SIGQUIT"}
        });
        let over = json!({
            "env": {"B": "3", "C": "4", "A": null},
            "rc": [{"bin": "z"}],
            "hostname": "y",
            "oci2uk": {"modules": []},
            "net": {"interfaces": {"eth0": {"addrs": [], "mtu": null}}}
        });
        assert_eq!(
            merge(base, over),
            json!({
                "env": {"B": "3", "C": "4"},
                "rc": [{"bin": "z"}],
                "hostname": "y",
                "oci2uk": {"modules": [], "stop_signal": "SIGQUIT"},
                "net": {"interfaces": {"eth0": {"addrs": []}}}
            })
        );
        assert_eq!(merge(json!({"a": 1}), json!(2)), json!(2));
        assert_eq!(
            merge(json!([1]), json!({"a": null, "b": 1})),
            json!({"b": 1})
        );
    }

    #[test]
    fn kernel_params_like_linux() {
        let p = kernel_params(
            "console=ttyS0  quiet oci2uk.config=e30 \"a=b c\" d=\"e f\" -- oci2uk.config=x",
        );
        assert_eq!(
            p,
            vec![
                ("console".into(), Some("ttyS0".into())),
                ("quiet".into(), None),
                ("oci2uk.config".into(), Some("e30".into())),
                ("a".into(), Some("b c".into())),
                ("d".into(), Some("e f".into())),
            ]
        );
    }

    #[test]
    fn last_override_wins() {
        let c = "oci2uk.config=AAA rdinit=/x oci2uk.config=e30 oci2uk.config";
        assert_eq!(find_override(c).as_deref(), Some("e30"));
        assert_eq!(find_override("quiet"), None);
    }

    #[test]
    fn base64url_with_and_without_padding() {
        let over = json!({"env": {"K": "v?>"}});
        let enc = encode_override(&over);
        assert!(!enc.contains(['=', '+', '/']), "{enc}");
        assert_eq!(decode_override(&enc).unwrap(), over.to_string());
        // `{"a":"??>"}` exercises both alphabets' last two characters; with and without `=`.
        let text = "{\"a\":\"??>\"}";
        for enc in ["eyJhIjoiPz8+In0=", "eyJhIjoiPz8-In0", "eyJhIjoiPz8-In0="] {
            assert_eq!(decode_override(enc).unwrap(), text, "{enc}");
        }
        assert_eq!(decode_override("{\"env\":{}}").unwrap(), "{\"env\":{}}");
        assert!(matches!(decode_override("e30*"), Err(Error::Base64(_))));
        assert!(matches!(decode_override("_w"), Err(Error::Utf8(_))));
    }

    #[test]
    fn load_merges_a_normalised_override() {
        let baked = r#"{
            "rc": [{"bin": "/docker-entrypoint.sh", "argv": ["nginx", "-g", "daemon off;"],
                    "workdir": "/srv", "user": {"uid": 101, "gid": 101}}],
            "env": {"PATH": "/usr/bin:/bin", "NGINX_VERSION": "1.27"},
            "oci2uk": {"stop_signal": "SIGQUIT", "modules": ["/m/virtio.ko"]}
        }"#;
        let c = load(
            baked,
            Some(r#"{"env": ["DEBUG=1"], "cmdline": "sh -c 'exit 7'"}"#),
        )
        .unwrap();
        assert_eq!(c.env["DEBUG"], "1");
        assert_eq!(c.env["NGINX_VERSION"], "1.27");
        let main = c.main().unwrap();
        assert_eq!(main.bin, "sh");
        assert_eq!(main.argv, ["-c", "exit 7"]);
        assert_eq!(main.workdir.as_deref(), Some("/srv"));
        assert_eq!(main.user.as_ref().unwrap().uid, 101);
        assert_eq!(c.oci2uk.stop_signal.as_deref(), Some("SIGQUIT"));

        let c = load(
            baked,
            Some(r#"{"rc": [{"bin": "true"}], "oci2uk": {"modules": []}}"#),
        )
        .unwrap();
        assert_eq!(c.rc.len(), 1);
        assert_eq!(c.rc[0].user, None);
        assert!(c.oci2uk.modules.is_empty());

        // The override goes through the same validation as the file.
        let e = load(baked, Some(r#"{"rc": [{"bin": "x", "workdir": "rel"}]}"#)).unwrap_err();
        assert!(e.to_string().contains("rc[0].workdir"), "{e}");
        let e = load(baked, Some(r#"{"hostnme": "x"}"#)).unwrap_err();
        assert!(matches!(e, Error::UnknownKey(_)), "{e}");

        // A cmdline override with no baked rc makes the entry.
        let c = load("{}", Some(r#"{"cmdline": "/bin/sh"}"#)).unwrap();
        assert_eq!(c.rc[0].bin, "/bin/sh");
    }

    #[test]
    fn override_of_a_rumprun_base_with_repeated_keys() {
        let baked = r#"{"cmdline": "app", "env": "A=1", "env": "B=2"}"#;
        let c = load(baked, Some(r#"{"env": {"B": null, "C": "3"}}"#)).unwrap();
        assert_eq!(c.env.len(), 2);
        assert_eq!(c.env["A"], "1");
        assert_eq!(c.env["C"], "3");
    }

    #[test]
    fn later_layers_win_and_errors_name_their_layer() {
        let baked = r#"{"rc": [{"bin": "/app"}], "env": {"A": "baked", "B": "baked", "C": "baked"},
                        "oci2uk": {"drivers": {"xen_netfront": ["/m/xen-netfront.ko"]}}}"#;
        let cmdline = r#"{"env": {"B": "cmdline", "C": "cmdline"}}"#;
        let xenstore = r#"{"env": {"C": "xenstore"}, "cmdline": "/bin/sh -c true"}"#;
        let c = load_layers(baked, &[cmdline, xenstore]).unwrap();
        assert_eq!(c.env["A"], "baked");
        assert_eq!(c.env["B"], "cmdline");
        assert_eq!(c.env["C"], "xenstore");
        assert_eq!(c.main().unwrap().bin, "/bin/sh");
        assert_eq!(c.oci2uk.drivers["xen_netfront"], ["/m/xen-netfront.ko"]);
        assert_eq!(load_layers(baked, &[]).unwrap().env["C"], "baked");

        let e = load_layers(baked, &[cmdline, "{\"env\": "]).unwrap_err();
        assert_eq!(e.layer, Some(1));
        assert!(matches!(e.error, Error::Json(_)), "{:?}", e.error);
        let e = load_layers(baked, &["[1]", xenstore]).unwrap_err();
        assert_eq!(e.layer, Some(0));
        // A merged result that does not validate is nobody's alone.
        let e = load_layers(baked, &[r#"{"oci2uk": {"drivers": {"x": [""]}}}"#]).unwrap_err();
        assert_eq!(e.layer, None);
        assert!(
            e.error.to_string().contains("oci2uk.drivers.x[0]"),
            "{}",
            e.error
        );
    }
}
