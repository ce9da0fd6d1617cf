//! Reading one of the domain's own Xenstore keys through the xenbus device.
//!
//! A guest reaches xenstored through its kernel: each message written to `/dev/xen/xenbus` is
//! a 16-byte header `{type, req_id, tx_id, len}` (native-endian `u32`s) and `len` bytes of
//! payload; the reply comes back on the same descriptor in the same form (Xen's
//! `docs/misc/xenstore.txt`, `xen/include/public/io/xs_wire.h`). A relative path is relative
//! to the domain's home, `/local/domain/DOMID`, so the guest need not know its id.
//!
//! Written by hand, because one read is two small messages and the crates do not fit a static
//! PID 1: `xenstore-rs` is GPL-3.0-only (this project is Apache-2.0) and reaches the xenbus
//! device only through its tokio transport, an async runtime the init does without; older
//! bindings link the C `libxenstore`.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use crate::sys;

/// The device through which a domU talks to xenstored.
pub const DEVICE: &str = "/dev/xen/xenbus";

/// `XS_READ`: the payload is a NUL-terminated path; the reply, the value's bytes.
const XS_READ: u32 = 2;
/// `XS_ERROR`: the reply's payload is an errno name (`ENOENT`), NUL-terminated.
const XS_ERROR: u32 = 16;
/// The header's size: four `u32`s.
const HEADER: usize = 16;
/// The largest payload xenstored accepts or sends (`XENSTORE_PAYLOAD_MAX`).
const PAYLOAD_MAX: usize = 4096;
/// Outside a transaction.
const NO_TRANSACTION: u32 = 0;

/// The request reading `path`.
pub fn encode_read(req_id: u32, path: &str) -> Vec<u8> {
    let len = path.len() + 1;
    let mut msg = Vec::with_capacity(HEADER + len);
    for word in [XS_READ, req_id, NO_TRANSACTION, len as u32] {
        msg.extend_from_slice(&word.to_ne_bytes());
    }
    msg.extend_from_slice(path.as_bytes());
    msg.push(0);
    msg
}

/// A complete reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The key's value.
    Value(Vec<u8>),
    /// xenstored's error (`ENOENT`, `EACCES`, ...).
    Error(String),
}

/// The reply at the start of `buf`, once it is all there (`Ok(None)` until then).
pub fn decode_reply(buf: &[u8], req_id: u32) -> Result<Option<Reply>, String> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let word =
        |i: usize| u32::from_ne_bytes(buf[i * 4..i * 4 + 4].try_into().expect("a 4-byte slice"));
    let (kind, id, len) = (word(0), word(1), word(3) as usize);
    if len > PAYLOAD_MAX {
        return Err(format!("a reply of {len} bytes, more than Xenstore allows"));
    }
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    if id != req_id {
        return Err(format!("a reply to request {id}, not {req_id}"));
    }
    let payload = &buf[HEADER..HEADER + len];
    match kind {
        XS_READ => Ok(Some(Reply::Value(payload.to_vec()))),
        XS_ERROR => {
            let name = payload.split(|&b| b == 0).next().unwrap_or_default();
            Ok(Some(Reply::Error(
                String::from_utf8_lossy(name).into_owned(),
            )))
        }
        other => Err(format!("a reply of type {other} to a read")),
    }
}

/// The value of `path`, `Ok(None)` when the key does not exist. Gives up after `timeout`
/// (xenstored lives in another domain and may never answer).
pub fn read(path: &str, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + timeout;
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(DEVICE)?;
    let req_id = 1;
    // The kernel takes a whole request in one write and answers later, on read.
    dev.write_all(&encode_read(req_id, path))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; HEADER + PAYLOAD_MAX];
    loop {
        let reply = decode_reply(&buf, req_id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match reply {
            Some(Reply::Value(v)) => return Ok(Some(v)),
            Some(Reply::Error(e)) if e == "ENOENT" => return Ok(None),
            Some(Reply::Error(e)) => return Err(io::Error::other(format!("xenstored says {e}"))),
            None => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("xenstored did not answer within {} s", timeout.as_secs()),
            ));
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        if sys::poll_readable(&[dev.as_raw_fd()], ms)?.is_empty() {
            continue;
        }
        match dev.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u32, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for w in [kind, id, 0, payload.len() as u32] {
            m.extend_from_slice(&w.to_ne_bytes());
        }
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn a_read_request_is_a_header_and_the_path_with_its_nul() {
        let m = encode_read(7, "oci2uk/config");
        assert_eq!(m.len(), 16 + 14);
        assert_eq!(m, message(2, 7, b"oci2uk/config\0"));
    }

    #[test]
    fn replies_decode_once_complete() {
        let value = message(2, 7, br#"{"env":{"A":"1"}}"#);
        for cut in 0..value.len() {
            assert_eq!(decode_reply(&value[..cut], 7), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            decode_reply(&value, 7),
            Ok(Some(Reply::Value(br#"{"env":{"A":"1"}}"#.to_vec())))
        );
        assert_eq!(
            decode_reply(&message(16, 7, b"ENOENT\0"), 7),
            Ok(Some(Reply::Error("ENOENT".into())))
        );
        assert_eq!(
            decode_reply(&message(2, 7, b""), 7),
            Ok(Some(Reply::Value(Vec::new())))
        );
        assert!(decode_reply(&message(2, 8, b"x"), 7).is_err());
        assert!(decode_reply(&message(15, 7, b"x\0y\0"), 7).is_err());
        let mut huge = message(2, 7, b"");
        huge[12..16].copy_from_slice(&5000u32.to_ne_bytes());
        assert!(decode_reply(&huge, 7).is_err());
    }
}
