//! The `tar` format: a flattened tree in, a deterministic POSIX pax archive out.
//!
//! - Members sorted bytewise by path (a directory before what it holds); paths relative, no
//!   `./` prefix, no root entry. Directories carry a trailing `/`, as `docker export` and GNU
//!   tar write them; every reader (GNU tar, bsdtar, Python's tarfile, Go's archive/tar, umoci)
//!   strips it.
//! - ustar headers; what does not fit them goes into pax records (`path`, `linkpath`, `uid`,
//!   `gid`, `size`, `mtime`), never GNU extensions or base-256 numbers. A path that fits the
//!   ustar name and prefix fields is split between them. The pax header member is named
//!   `././@PaxHeader` (as Python's tarfile names it), so its name never depends on the entry.
//! - Numeric uid/gid, empty user and group names; permission bits as in the tree; mtimes as in
//!   the tree, clamped to [`TarOptions::source_date_epoch`] when set.
//! - In a hardlink group (paths sharing an inode) the first path in sort order carries the
//!   inode's data and the others are hardlink members pointing to it.
//! - Xattrs as `SCHILY.xattr.NAME` records, sorted by name (on the member that carries the
//!   inode, not on its hardlink members).
//! - The archive ends with two zero blocks and no further padding. The same tree (and
//!   options) always gives the same bytes.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};

use crate::flatten::ContentCopyError;
use crate::flatten::{Entry, InodeId, Kind, Tree};

/// Errors of writing the tar.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// Writing failed.
    #[error("writing the tar failed")]
    Io(#[from] std::io::Error),
    /// A file's contents could not be read back from the spool.
    #[error("cannot read the contents of /{path} from the spool")]
    Content {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Device numbers that a ustar header cannot hold.
    #[error("the device numbers of /{path} ({major}, {minor}) are too large for a tar header")]
    Device {
        /// The device.
        path: String,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// Options of the tar output.
#[derive(Debug, Clone, Default)]
pub struct TarOptions {
    /// `SOURCE_DATE_EPOCH`: later mtimes are written as this one.
    pub source_date_epoch: Option<i64>,
}

/// Writes `tree` as a tar to `w`.
pub fn write_tar(tree: &Tree, w: impl Write) -> Result<(), TarError> {
    write_tar_with(tree, w, &TarOptions::default())
}

const BLOCK: usize = 512;
/// Largest value of an 8-byte octal field (7 digits).
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (11 digits).
const MAX_OCTAL_12: u64 = 0o77777777777;
const PAX_HEADER_NAME: &[u8] = b"././@PaxHeader";

/// Writes `tree` as a tar to `w`, with options.
pub fn write_tar_with(tree: &Tree, w: impl Write, opts: &TarOptions) -> Result<(), TarError> {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    let mut first: HashMap<InodeId, &[u8]> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    for e in tree.entries() {
        let link_to = match e.inode.kind {
            Kind::Dir => None,
            _ => match first.get(&e.id) {
                Some(p) => Some(*p),
                None => {
                    first.insert(e.id, e.path);
                    None
                }
            },
        };
        write_entry(&mut w, tree, &e, link_to, opts, &mut buf)?;
    }
    w.write_all(&[0u8; 2 * BLOCK])?;
    w.flush()?;
    Ok(())
}

/// Appends one pax record (`LEN KEY=VALUE\n`, LEN counting itself).
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = 1 + key.len() + 1 + value.len() + 1;
    let mut len = rest + 1;
    while rest + len.to_string().len() != len {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Splits a path over the ustar prefix (155) and name (100) fields, if it can be.
fn ustar_split(p: &[u8]) -> Option<(&[u8], &[u8])> {
    if p.len() <= 100 {
        return Some((&[], p));
    }
    // The prefix ends at a `/` that is not kept; the name after it must be non-empty.
    p.iter()
        .enumerate()
        .filter(|(i, b)| **b == b'/' && *i <= 155 && p.len() - i - 1 <= 100 && p.len() - i > 1)
        .map(|(i, _)| (&p[..i], &p[i + 1..]))
        .next()
}

fn octal(field: &mut [u8], v: u64) {
    let width = field.len() - 1;
    let s = format!("{v:0width$o}");
    field[..width].copy_from_slice(s.as_bytes());
    field[width] = 0;
}

fn write_entry<W: Write>(
    w: &mut W,
    tree: &Tree,
    e: &Entry<'_>,
    link_to: Option<&[u8]>,
    opts: &TarOptions,
    buf: &mut [u8],
) -> Result<(), TarError> {
    let inode = e.inode;
    let mut name = e.path.to_vec();
    if inode.kind == Kind::Dir {
        name.push(b'/');
    }
    let mut pax = Vec::new();
    let mut h = tar::Header::new_ustar();
    match ustar_split(&name) {
        Some((prefix, base)) => {
            let u = h.as_ustar_mut().expect("a ustar header");
            u.prefix[..prefix.len()].copy_from_slice(prefix);
            u.name[..base.len()].copy_from_slice(base);
        }
        None => {
            pax_record(&mut pax, b"path", &name);
            h.as_old_mut().name.copy_from_slice(&name[..100]);
        }
    }

    let (typ, link, size): (tar::EntryType, &[u8], u64) = match (&inode.kind, link_to) {
        (Kind::Dir, _) => (tar::EntryType::Directory, b"", 0),
        (_, Some(first)) => (tar::EntryType::Link, first, 0),
        (Kind::File(c), None) => (tar::EntryType::Regular, b"", c.len()),
        (Kind::Symlink(t), None) => (tar::EntryType::Symlink, t, 0),
        (Kind::CharDevice { .. }, None) => (tar::EntryType::Char, b"", 0),
        (Kind::BlockDevice { .. }, None) => (tar::EntryType::Block, b"", 0),
        (Kind::Fifo, None) => (tar::EntryType::Fifo, b"", 0),
    };
    h.set_entry_type(typ);
    if link.len() <= 100 {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    } else {
        pax_record(&mut pax, b"linkpath", link);
        h.as_old_mut().linkname.copy_from_slice(&link[..100]);
    }

    octal(&mut h.as_old_mut().mode, (inode.mode & 0o7777) as u64);
    for (key, v) in [(&b"uid"[..], inode.uid), (&b"gid"[..], inode.gid)] {
        let old = h.as_old_mut();
        let field = if key == b"uid" {
            &mut old.uid
        } else {
            &mut old.gid
        };
        if v <= MAX_OCTAL_8 {
            octal(field, v);
        } else {
            octal(field, 0);
            pax_record(&mut pax, key, v.to_string().as_bytes());
        }
    }
    if size <= MAX_OCTAL_12 {
        octal(&mut h.as_old_mut().size, size);
    } else {
        octal(&mut h.as_old_mut().size, 0);
        pax_record(&mut pax, b"size", size.to_string().as_bytes());
    }
    let mtime = match opts.source_date_epoch {
        Some(epoch) => inode.mtime.min(epoch),
        None => inode.mtime,
    };
    match u64::try_from(mtime) {
        Ok(m) if m <= MAX_OCTAL_12 => octal(&mut h.as_old_mut().mtime, m),
        _ => {
            octal(&mut h.as_old_mut().mtime, 0);
            pax_record(&mut pax, b"mtime", mtime.to_string().as_bytes());
        }
    }
    if let Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } = inode.kind {
        if major as u64 > MAX_OCTAL_8 || minor as u64 > MAX_OCTAL_8 {
            return Err(TarError::Device {
                path: String::from_utf8_lossy(e.path).into_owned(),
                major,
                minor,
            });
        }
        let u = h.as_ustar_mut().expect("a ustar header");
        octal(&mut u.dev_major, major as u64);
        octal(&mut u.dev_minor, minor as u64);
    } else {
        let u = h.as_ustar_mut().expect("a ustar header");
        octal(&mut u.dev_major, 0);
        octal(&mut u.dev_minor, 0);
    }
    // A hardlink member only names the inode that the first member described.
    if link_to.is_none() {
        for (k, v) in &inode.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax_record(&mut pax, &key, v);
        }
    }
    h.set_cksum();

    if !pax.is_empty() {
        let mut x = tar::Header::new_ustar();
        x.as_old_mut().name[..PAX_HEADER_NAME.len()].copy_from_slice(PAX_HEADER_NAME);
        x.set_entry_type(tar::EntryType::XHeader);
        octal(&mut x.as_old_mut().mode, 0o644);
        octal(&mut x.as_old_mut().uid, 0);
        octal(&mut x.as_old_mut().gid, 0);
        octal(&mut x.as_old_mut().mtime, 0);
        octal(&mut x.as_old_mut().size, pax.len() as u64);
        x.set_cksum();
        w.write_all(x.as_bytes())?;
        w.write_all(&pax)?;
        pad(w, pax.len() as u64)?;
    }
    w.write_all(h.as_bytes())?;

    if let (Kind::File(c), tar::EntryType::Regular) = (&inode.kind, typ) {
        let path = e.path;
        tree.copy_content(c, w, buf).map_err(|err| match err {
            ContentCopyError::Read(source) => TarError::Content {
                path: String::from_utf8_lossy(path).into_owned(),
                source,
            },
            ContentCopyError::Write(source) => TarError::from(source),
        })?;
        pad(w, c.len())?;
    }
    Ok(())
}

fn pad<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let rem = (len % BLOCK as u64) as usize;
    if rem != 0 {
        w.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flatten::testutil::Fixture;
    use std::io::Read;

    fn write(tree: &Tree, epoch: Option<i64>) -> Vec<u8> {
        let mut out = Vec::new();
        write_tar_with(
            tree,
            &mut out,
            &TarOptions {
                source_date_epoch: epoch,
            },
        )
        .unwrap();
        out
    }

    /// (path, type, link, mode, uid, gid, mtime, data, xattrs) per member.
    type Member = (
        String,
        u8,
        String,
        u32,
        u64,
        u64,
        u64,
        Vec<u8>,
        Vec<(String, Vec<u8>)>,
    );

    fn read_back(bytes: &[u8]) -> Vec<Member> {
        let mut ar = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            assert_eq!(h.username_bytes(), Some(&b""[..]));
            assert_eq!(h.groupname_bytes(), Some(&b""[..]));
            let xattrs = e
                .pax_extensions()
                .unwrap()
                .map(|x| {
                    x.filter_map(|r| r.ok())
                        .filter_map(|r| {
                            r.key()
                                .ok()?
                                .strip_prefix("SCHILY.xattr.")
                                .map(|k| (k.to_string(), r.value_bytes().to_vec()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let link = e
                .link_name_bytes()
                .map(|l| String::from_utf8(l.into_owned()).unwrap())
                .unwrap_or_default();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push((
                path,
                h.entry_type().as_byte(),
                link,
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                h.mtime().unwrap(),
                data,
                xattrs,
            ));
        }
        out
    }

    fn sample(fx: &mut Fixture) -> Tree {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let long_target = "t".repeat(200);
        let l1 = fx.layer(|t| {
            t.custom(
                b'0',
                "z/data",
                "",
                b"zzz",
                &[("SCHILY.xattr.user.b", b"2"), ("SCHILY.xattr.user.a", b"1")],
                |h| {
                    h.set_mode(0o4750);
                    h.set_uid(1000);
                    h.set_gid(50);
                    h.set_mtime(2_000_000_000);
                },
            )
            .hardlink("a/link", "z/data")
            .hardlink("m/link2", "z/data")
            .symlink("sym", &long_target)
            .custom(b'3', "dev/tty", "", b"", &[], |h| {
                h.set_device_major(5).unwrap();
                h.set_device_minor(0).unwrap();
            })
            .file(&long, b"long")
            .custom(
                b'0',
                "big-ids",
                "",
                b"",
                &[("uid", b"3000000"), ("gid", b"70000000")],
                |_| {},
            )
            .custom(b'0', "old", "", b"", &[("mtime", b"-5")], |_| {});
        });
        fx.flatten(&[l1]).unwrap()
    }

    #[test]
    fn members_sorted_pax_hardlinks_and_metadata() {
        let mut fx = Fixture::new();
        let tree = sample(&mut fx);
        let bytes = write(&tree, None);
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes.ends_with(&[0u8; 1024]));
        let members = read_back(&bytes);
        let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        assert_eq!(
            names,
            [
                "a/",
                "a/link",
                "big-ids",
                &format!("{}/", "d".repeat(120)),
                &long,
                "dev/",
                "dev/tty",
                "m/",
                "m/link2",
                "old",
                "sym",
                "z/",
                "z/data"
            ]
        );
        let by = |n: &str| members.iter().find(|m| m.0 == n).unwrap();
        // The first path of the group carries the data, with the inode's metadata.
        let first = by("a/link");
        assert_eq!(
            (first.1, first.3, first.4, first.5, first.6),
            (b'0', 0o4750, 1000, 50, 2_000_000_000)
        );
        assert_eq!(first.7, b"zzz");
        assert_eq!(
            first.8,
            [
                ("user.a".to_string(), b"1".to_vec()),
                ("user.b".to_string(), b"2".to_vec())
            ]
        );
        for other in ["m/link2", "z/data"] {
            let m = by(other);
            assert_eq!(
                (m.1, m.2.as_str(), m.7.len(), m.8.len()),
                (b'1', "a/link", 0, 0),
                "{other}"
            );
        }
        assert_eq!(by("sym").2, "t".repeat(200));
        assert_eq!(by(&long).7, b"long");
        assert_eq!((by("big-ids").4, by("big-ids").5), (3_000_000, 70_000_000));
        assert_eq!(by("dev/").3, 0o755);
        let h = {
            let mut ar = tar::Archive::new(&bytes[..]);
            let e = ar
                .entries()
                .unwrap()
                .map(|e| e.unwrap())
                .find(|e| e.path_bytes().as_ref() == b"dev/tty")
                .unwrap();
            e.header().clone()
        };
        assert_eq!(
            (h.device_major().unwrap(), h.device_minor().unwrap()),
            (Some(5), Some(0))
        );
        // Every header is ustar: no GNU magic, no base-256 numbers.
        for block in bytes.chunks(512) {
            assert_ne!(&block[257..265], b"ustar  \0");
        }
        assert!(!bytes.windows(13).any(|w| w == b"././@LongLink"));
    }

    #[test]
    fn deterministic_and_clamped() {
        let mut fx = Fixture::new();
        let a = write(&sample(&mut fx), None);
        let b = write(&sample(&mut fx), None);
        assert_eq!(a, b);
        let clamped = write(&sample(&mut fx), Some(1_700_000_000));
        let members = read_back(&clamped);
        let mtime = |n: &str| members.iter().find(|m| m.0 == n).unwrap().6;
        assert_eq!(mtime("a/link"), 1_700_000_000);
        // Earlier mtimes stay (implicit directories have 0).
        assert_eq!(mtime("a/"), 0);
        // A negative mtime is a pax record.
        let mut ar = tar::Archive::new(&clamped[..]);
        let mut e = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path_bytes().as_ref() == b"old")
            .unwrap();
        let rec: Vec<(String, String)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.key().unwrap().to_string(), r.value().unwrap().to_string())
            })
            .collect();
        assert_eq!(rec, [("mtime".to_string(), "-5".to_string())]);
    }

    #[test]
    fn round_trip_through_flatten() {
        let mut fx = Fixture::new();
        let tree = sample(&mut fx);
        let bytes = write(&tree, None);
        let l = fx.layer_as(&bytes, crate::image::Compression::None);
        let again = fx.flatten(&[l]).unwrap();
        let dump = |t: &Tree| {
            t.entries()
                .map(|e| (e.path.to_vec(), e.inode.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(dump(&tree), dump(&again));
        assert_eq!(write(&again, None), bytes);
    }

    #[test]
    fn pax_record_lengths() {
        let mut v = Vec::new();
        pax_record(&mut v, b"path", b"abcd");
        assert_eq!(v, b"13 path=abcd\n");
        v.clear();
        // 9 bytes plus a one-digit length would be 10: the length takes two digits.
        pax_record(&mut v, b"k", b"12345");
        assert_eq!(v, b"11 k=12345\n");
        for n in 80..120 {
            v.clear();
            pax_record(&mut v, b"path", &vec![b'x'; n]);
            let len: usize = std::str::from_utf8(&v[..v.iter().position(|b| *b == b' ').unwrap()])
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, v.len());
        }
    }

    #[test]
    fn system_tar_lists_the_output() {
        let mut fx = Fixture::new();
        let tree = sample(&mut fx);
        let path = fx.dir.path().join("out.tar");
        std::fs::write(&path, write(&tree, None)).unwrap();
        let Ok(out) = std::process::Command::new("tar")
            .arg("-tvf")
            .arg(&path)
            .output()
        else {
            return;
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 13, "{stdout}");
        assert!(lines[0].starts_with("drwxr-xr-x 0/0"), "{stdout}");
        assert!(lines[0].ends_with(" a/"), "{stdout}");
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("-rwsr-x--- 1000/50") && l.ends_with(" a/link")),
            "{stdout}"
        );
        assert!(
            lines.iter().any(|l| l.ends_with("z/data link to a/link")),
            "{stdout}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("crw-r--r-- 0/0") && l.contains("5,0")),
            "{stdout}"
        );
        assert!(!stdout.contains("PaxHeader"), "{stdout}");
    }
}
