//! `USER[:GROUP]` to numbers, against the image's own `/etc/passwd` and `/etc/group`.
//!
//! The rules are runc's (`libcontainer/user.GetExecUser`), which docker uses:
//! - the user part: empty means uid 0; a number is a uid (its passwd entry, when there is one,
//!   gives the primary group and home; without one the group is 0); a name must have an entry;
//! - the group part, when given: a number is a gid, a name must be in `/etc/group`; it replaces
//!   the primary group and no supplementary groups are added;
//! - otherwise the supplementary groups are the groups whose member list names the user.
//!
//! The files are read from the tree, following symlinks inside it only.

use std::io::Read;

use oci2uk_config::User;

use super::PlanError;
use crate::flatten::{Kind, Tree};

const PASSWD: &str = "/etc/passwd";
const GROUP: &str = "/etc/group";
/// Largest account file read; far beyond any real one.
const MAX_FILE: u64 = 16 << 20;
/// Largest id accepted (runc's bound: ids are signed 32-bit in its API and `-1` is special).
const MAX_ID: u32 = i32::MAX as u32;

/// A resolved identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Account {
    /// Numbers; `groups` starts with the primary group.
    pub(super) user: User,
    /// The home directory from `/etc/passwd`, when the user has an entry.
    pub(super) home: Option<String>,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `spec` (`--user` or the image's User; `origin` says which, for messages).
pub(super) fn resolve(tree: &Tree, spec: &str, origin: &'static str) -> Result<Account, PlanError> {
    let syntax = || PlanError::UserSyntax {
        origin,
        spec: spec.to_string(),
    };
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((_, g)) if g.contains(':') => return Err(syntax()),
        Some((_, "")) => return Err(syntax()),
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let number = |s: &str| -> Result<Option<u32>, PlanError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(None);
        }
        match s.parse::<u32>() {
            Ok(n) if n <= MAX_ID => Ok(Some(n)),
            _ => Err(syntax()),
        }
    };
    let uid_arg = number(user_arg)?;
    let gid_arg = group_arg.map(number).transpose()?.flatten();

    let passwd = read(tree, PASSWD)?;
    let entries = passwd.as_deref().map(parse_passwd).unwrap_or_default();
    let found = entries.into_iter().find(|u| match uid_arg {
        _ if user_arg.is_empty() => u.uid == 0,
        Some(n) => u.uid == n,
        None => u.name == user_arg,
    });
    let (uid, mut gid, home, name) = match found {
        Some(u) => (u.uid, u.gid, Some(u.home), Some(u.name)),
        None if user_arg.is_empty() => (0, 0, None, None),
        None => match uid_arg {
            Some(n) => (n, 0, None, None),
            None => {
                return Err(PlanError::UnknownUser {
                    user: user_arg.to_string(),
                    origin,
                    no_file: passwd.is_none(),
                })
            }
        },
    };

    let mut groups = Vec::new();
    if group_arg.is_some() || name.is_some() {
        let file = read(tree, GROUP)?;
        let entries = file.as_deref().map(parse_group).unwrap_or_default();
        match group_arg {
            Some(g) => {
                gid = match (
                    entries.iter().find(|e| match gid_arg {
                        Some(n) => e.gid == n,
                        None => e.name == g,
                    }),
                    gid_arg,
                ) {
                    (Some(e), _) => e.gid,
                    (None, Some(n)) => n,
                    (None, None) => {
                        return Err(PlanError::UnknownGroup {
                            group: g.to_string(),
                            origin,
                            no_file: file.is_none(),
                        })
                    }
                };
            }
            None => {
                let name = name.as_deref().unwrap_or_default();
                groups = entries
                    .iter()
                    .filter(|e| e.members.iter().any(|m| m == name))
                    .map(|e| e.gid)
                    .collect();
            }
        }
    }
    let mut all = vec![gid];
    for g in groups {
        if !all.contains(&g) {
            all.push(g);
        }
    }
    Ok(Account {
        user: User {
            uid,
            gid,
            groups: all,
        },
        home: home.filter(|h| !h.is_empty()),
    })
}

/// The text of an account file, `None` when the image has none.
fn read(tree: &Tree, path: &'static str) -> Result<Option<String>, PlanError> {
    let Some(e) = tree.resolve(path.as_bytes()) else {
        return Ok(None);
    };
    let Kind::File(c) = &e.inode.kind else {
        return Err(PlanError::AccountFile {
            path,
            why: format!("it is a {}", e.inode.kind.name()),
        });
    };
    if c.len() > MAX_FILE {
        return Err(PlanError::AccountFile {
            path,
            why: format!("it is larger than {MAX_FILE} bytes"),
        });
    }
    let mut bytes = Vec::new();
    tree.open(c)
        .read_to_end(&mut bytes)
        .map_err(|source| PlanError::Read {
            path: path.to_string(),
            source,
        })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The well-formed lines of `/etc/passwd` (`name:password:uid:gid:gecos:home:shell`); others,
/// comments and NIS `+`/`-` lines are skipped.
fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    lines(text)
        .filter_map(|f| {
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).copied().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// The well-formed lines of `/etc/group` (`name:password:gid:member,member`).
fn parse_group(text: &str) -> Vec<GroupEntry> {
    lines(text)
        .filter_map(|f| {
            Some(GroupEntry {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .copied()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

fn lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', '+', '-']))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.first().is_some_and(|n| !n.is_empty()))
}
