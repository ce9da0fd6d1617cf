//! The launch configuration of an oci2uk guest, `/rumpconfig.json`.
//!
//! The host writes it (the plan stage) and the init inside the guest reads it. oci2uk's format
//! is a superset of rumprun's: the forms rumprun accepted are read and normalised into the
//! richer form oci2uk emits, so existing rumprun configurations keep working. The format, the
//! accepted forms and the override are described in `docs/config.md`; the emitted form has a
//! JSON Schema in `docs/rumpconfig.schema.json`.
//!
//! - [`model`]: the emitted form as Rust types ([`Config`]), its validation and deterministic
//!   serialisation.
//! - [`normalize`]: rumprun's forms (and the emitted form) in, the emitted form out as JSON.
//! - [`overlay`]: the deep merge of an override, and the `oci2uk.config=` kernel parameter.
//! - [`words`]: shell-like splitting of rumprun's `cmdline` string.
//! - [`signal`]: signal names as images spell them (`SIGQUIT`, `QUIT`, `3`).
//! - [`guest`]: what the host and the init agree on besides the configuration: paths in the
//!   guest, kernel parameters, and the status line.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod guest;
pub mod model;
pub mod normalize;
pub mod overlay;
pub mod signal;
pub mod words;

pub use guest::{kernel_params, StatusLine, CONFIG_PATH, OVERRIDE_PARAM};
pub use model::{
    Addr, Config, Dns, Family, Gateway, Interface, Method, Mount, MountSource, Net, Oci2uk, Rc,
    RunMode, User,
};
pub use normalize::normalize;
pub use overlay::{
    decode_override, encode_override, find_override, load, load_layers, merge, parse, LayerError,
};
pub use signal::{parse_signal, signal_name};
pub use words::split_words;

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not JSON.
    #[error("the configuration is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// The JSON does not have the shape of a configuration (an unknown field, a wrong type).
    #[error("the configuration does not match its format")]
    Shape(#[source] serde_json::Error),
    /// A value is out of range or inconsistent; `at` names where, as a JSON path.
    #[error("{at}: {message}")]
    Invalid {
        /// Where the value is, such as `net.interfaces.eth0.addrs[0].addr`.
        at: String,
        /// What is wrong with it.
        message: String,
    },
    /// The top level has a key that neither oci2uk nor rumprun defines.
    #[error("unknown key \"{0}\" at the top level of the configuration")]
    UnknownKey(String),
    /// A rumprun `cmdline` or `oci2uk.config` value has an unterminated quote.
    #[error("unterminated {quote} quote in {text:?}")]
    Quote {
        /// The quote character that was not closed.
        quote: char,
        /// The text being split.
        text: String,
    },
    /// The `oci2uk.config=` kernel parameter is not base64url.
    #[error("the kernel parameter {OVERRIDE_PARAM} is not base64url")]
    Base64(#[source] base64::DecodeError),
    /// The `oci2uk.config=` kernel parameter does not hold UTF-8 text.
    #[error("the kernel parameter {OVERRIDE_PARAM} does not decode to UTF-8 text")]
    Utf8(#[source] std::string::FromUtf8Error),
}

impl Error {
    pub(crate) fn invalid(at: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            at: at.into(),
            message: message.into(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod doc_tests {
    //! The examples in `docs/config.md` parse, and the JSON Schema describes the types.

    use serde_json::{json, Value};

    use crate::{load, parse, Config};

    const PAGE: &str = include_str!("../../docs/config.md");
    const SCHEMA: &str = include_str!("../../docs/rumpconfig.schema.json");

    fn json_blocks(text: &str) -> Vec<String> {
        let mut blocks = Vec::new();
        let mut current: Option<String> = None;
        for line in text.lines() {
            match (&mut current, line.trim_end()) {
                (None, "```json") => current = Some(String::new()),
                (Some(b), "```") => {
                    blocks.push(std::mem::take(b));
                    current = None;
                }
                (Some(b), l) => {
                    b.push_str(l);
                    b.push('\n');
                }
                _ => {}
            }
        }
        blocks
    }

    #[test]
    fn every_example_parses() {
        let blocks = json_blocks(PAGE);
        assert!(blocks.len() >= 6, "found {} examples", blocks.len());
        for b in &blocks {
            // Overrides may remove keys with null, which a file cannot hold.
            if !b.contains("null") {
                if let Err(e) = parse(b) {
                    panic!("example does not parse: {e}\n{b}");
                }
            }
            if let Err(e) = load(&blocks[0], Some(b)) {
                panic!("example does not parse as an override: {e}\n{b}");
            }
        }
    }

    #[test]
    fn the_rumprun_example_becomes_what_the_page_says() {
        let (before, after) = PAGE
            .split_once("\nbecomes\n")
            .expect("the page has the pair");
        let rumprun = json_blocks(before).pop().unwrap();
        let emitted = json_blocks(after).remove(0);
        assert_eq!(parse(&rumprun).unwrap(), parse(&emitted).unwrap());
    }

    /// Resolves `$ref`s into `$defs`.
    fn resolve<'a>(root: &'a Value, mut s: &'a Value) -> &'a Value {
        while let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let name = r.strip_prefix("#/$defs/").expect("local reference");
            s = &root["$defs"][name];
        }
        s
    }

    /// Every key of `v` is described by the schema `s`, recursively.
    fn check(root: &Value, s: &Value, v: &Value, at: &str) {
        let s = resolve(root, s);
        match v {
            Value::Object(obj) => {
                for (k, child) in obj {
                    let sub = match s.get("properties").and_then(|p| p.get(k)) {
                        Some(sub) => sub,
                        None => match s.get("additionalProperties") {
                            Some(sub) if sub.is_object() => sub,
                            _ => panic!("{at}.{k} is not in the schema"),
                        },
                    };
                    check(root, sub, child, &format!("{at}.{k}"));
                }
            }
            Value::Array(items) => {
                let sub = s
                    .get("items")
                    .unwrap_or_else(|| panic!("{at} has no items"));
                for (i, item) in items.iter().enumerate() {
                    check(root, sub, item, &format!("{at}[{i}]"));
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_schema_describes_every_field() {
        let schema: Value = serde_json::from_str(SCHEMA).unwrap();
        let full = Config::from_value(json!({
            "rc": [{"bin": "a", "argv": ["b"], "workdir": "/w", "runmode": "&",
                    "user": {"uid": 1, "gid": 2, "groups": [3]}},
                   {"bin": "main"}],
            "env": {"A": "1"},
            "hostname": "h",
            "sysctl": {"vm.overcommit_memory": "1"},
            "net": {
                "interfaces": {"eth0": {"addrs": [{"type": "inet", "method": "static", "addr": "10.0.0.2/24"}], "mtu": 1400}},
                "gateways": [{"type": "inet", "addr": "10.0.0.1"}],
                "dns": {"nameservers": ["10.0.0.1"], "search": ["example.org"]}
            },
            "mount": {
                "/t": {"source": "tmpfs", "seed": false, "uid": 1, "gid": 1, "mode": "1777", "options": {"size": "1M"}},
                "/b": {"source": "blk", "path": "/dev/vda", "fstype": "ext4"}
            },
            "oci2uk": {"stop_signal": "SIGQUIT", "stop_timeout": 3, "exposed_ports": ["80/tcp"],
                       "modules": ["/m.ko"], "source_image": "i", "source_digest": "sha256:00",
                       "kernel": "6.1", "debug": true}
        }))
        .unwrap();
        let v = serde_json::to_value(&full).unwrap();
        check(&schema, &schema, &v, "");
        // Every field was set, so every field the types have was checked.
        let text = full.to_json();
        for key in [
            "runmode", "groups", "mtu", "search", "seed", "fstype", "debug", "kernel",
        ] {
            assert!(
                text.contains(&format!("\"{key}\"")),
                "{key} missing from {text}"
            );
        }
    }
}
