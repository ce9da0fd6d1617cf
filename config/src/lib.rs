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

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod model;
pub mod normalize;
pub mod overlay;
pub mod signal;
pub mod words;

pub use model::{
    Addr, Config, Dns, Family, Gateway, Interface, Method, Mount, MountSource, Net, Oci2uk, Rc,
    RunMode, User,
};
pub use normalize::normalize;
pub use overlay::{
    decode_override, encode_override, find_override, kernel_params, load, merge, parse,
    OVERRIDE_PARAM,
};
pub use signal::{parse_signal, signal_name};
pub use words::split_words;

/// The path of the configuration inside the guest.
pub const CONFIG_PATH: &str = "/rumpconfig.json";

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
