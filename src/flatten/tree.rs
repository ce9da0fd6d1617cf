//! The flattened tree: metadata in memory, keyed by path; regular-file contents in the spool.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Bound;

use super::spool::{Content, ContentReader, Spool};

/// Most symlinks followed in one lookup (Linux's `MAXSYMLINKS`).
pub const MAX_SYMLINKS: u32 = 40;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File(Content),
    /// A directory.
    Dir,
    /// A symbolic link; the target is stored verbatim, as the layer gave it.
    Symlink(Vec<u8>),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

impl Kind {
    /// A short name for messages: "file", "directory", ...
    pub fn name(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Dir => "directory",
            Self::Symlink(_) => "symlink",
            Self::CharDevice { .. } => "character device",
            Self::BlockDevice { .. } => "block device",
            Self::Fifo => "fifo",
        }
    }
}

/// An inode: what a path names. Hardlinked paths share one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// The type, with its contents, target or device numbers.
    pub kind: Kind,
    /// Permission bits, with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch, as the layer gave it.
    pub mtime: i64,
    /// Extended attributes: name (`security.capability`, `user.foo`) to value.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Inode {
    /// A directory created because an entry needed it as a parent: `0755`, owned by root,
    /// mtime 0 (deterministic whatever entry caused it; the tar output clamps nothing upwards).
    pub fn implicit_dir() -> Self {
        Self {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        }
    }
}

/// Identifies an inode within one tree: two entries with the same id are hardlinks of each
/// other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeId(pub(crate) usize);

/// A path of the tree with its inode.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The path: relative to the root, components joined by `/`, no leading `/` or `./`, no
    /// `.` or `..` components. Empty for the root.
    pub path: &'a [u8],
    /// The inode's identity (shared by hardlinks).
    pub id: InodeId,
    /// The inode.
    pub inode: &'a Inode,
}

/// One path of the map: its inode and the index of the layer that last created or replaced it
/// (whiteouts of a layer remove only what lower layers made).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    pub(crate) inode: usize,
    pub(crate) layer: usize,
}

/// Why a lookup stopped.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The walk's next component does not exist (its parent, `Walk::cur`, does).
    Missing,
    /// A non-directory where a directory is needed.
    NotDir(Vec<u8>),
    /// Too many symlinks.
    Loop,
}

/// A lookup in progress: components are resolved one by one from the root, symlinks followed
/// inside the root as in a chroot (absolute targets start again at the root, `..` stops at
/// the root).
pub(crate) struct Walk {
    /// The directory resolved so far.
    pub(crate) cur: Vec<u8>,
    /// Components still to resolve, next last.
    pending: Vec<Vec<u8>>,
    links: u32,
}

impl Walk {
    pub(crate) fn new<'c>(comps: impl DoubleEndedIterator<Item = &'c [u8]>) -> Self {
        Self {
            cur: Vec::new(),
            pending: comps.rev().map(<[u8]>::to_vec).collect(),
            links: 0,
        }
    }

    /// The missing component after a `Stop::Missing`.
    pub(crate) fn next_name(&self) -> &[u8] {
        self.pending.last().map_or(&[][..], |c| &c[..])
    }

    fn advance(&mut self) {
        let c = self.pending.pop().unwrap_or_default();
        self.cur = join(&self.cur, &c);
    }
}

/// `a/b`, or `b` when `a` is the root.
pub(crate) fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(a.len() + 1 + b.len());
    p.extend_from_slice(a);
    if !a.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(b);
    p
}

/// The parent of a normalised path (the root for a top-level name).
fn parent(p: &[u8]) -> &[u8] {
    p.iter()
        .rposition(|b| *b == b'/')
        .map_or(&[][..], |i| &p[..i])
}

/// Normalises a name from a layer lexically: empty and `.` components dropped, `..` removes
/// the previous one. `None` if the name leaves the root.
pub(crate) fn normalise(raw: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            _ => out.push(c),
        }
    }
    Some(out)
}

/// The metadata of a tree, without the contents.
#[derive(Debug, Clone)]
pub(crate) struct Nodes {
    pub(crate) map: BTreeMap<Vec<u8>, Node>,
    /// Inode 0 is the root directory.
    pub(crate) inodes: Vec<Inode>,
}

impl Nodes {
    pub(crate) fn new() -> Self {
        Self {
            map: BTreeMap::new(),
            inodes: vec![Inode::implicit_dir()],
        }
    }

    pub(crate) fn kind_at(&self, p: &[u8]) -> Option<&Kind> {
        if p.is_empty() {
            return Some(&Kind::Dir);
        }
        self.map.get(p).map(|n| &self.inodes[n.inode].kind)
    }

    /// Advances `w` until every component is resolved or a stop. With `last_any`, the final
    /// component may be a non-directory (a final symlink is still followed).
    pub(crate) fn walk(&self, w: &mut Walk, last_any: bool) -> Result<(), Stop> {
        while let Some(c) = w.pending.last() {
            match &c[..] {
                b"" | b"." => {
                    w.pending.pop();
                    continue;
                }
                b".." => {
                    w.pending.pop();
                    w.cur.truncate(parent(&w.cur).len());
                    continue;
                }
                _ => {}
            }
            let p = join(&w.cur, c);
            match self.kind_at(&p) {
                None => return Err(Stop::Missing),
                Some(Kind::Dir) => w.advance(),
                Some(Kind::Symlink(target)) => {
                    w.links += 1;
                    if w.links > MAX_SYMLINKS {
                        return Err(Stop::Loop);
                    }
                    w.pending.pop();
                    if target.starts_with(b"/") {
                        w.cur.clear();
                    }
                    w.pending
                        .extend(target.split(|b| *b == b'/').rev().map(<[u8]>::to_vec));
                }
                Some(_) if last_any && w.pending.len() == 1 => w.advance(),
                Some(_) => return Err(Stop::NotDir(p)),
            }
        }
        Ok(())
    }

    /// Resolves the directory `comps` (following symlinks), creating missing directories as
    /// implicit ones of `layer`.
    pub(crate) fn make_dirs(&mut self, comps: &[&[u8]], layer: usize) -> Result<Vec<u8>, Stop> {
        let mut w = Walk::new(comps.iter().copied());
        loop {
            match self.walk(&mut w, false) {
                Ok(()) => return Ok(w.cur),
                Err(Stop::Missing) => {
                    let p = join(&w.cur, w.next_name());
                    let inode = self.push(Inode::implicit_dir());
                    self.map.insert(p, Node { inode, layer });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Resolves the directory `comps` (following symlinks) without creating anything; `None`
    /// if some component is missing.
    pub(crate) fn find_dir(&self, comps: &[&[u8]]) -> Result<Option<Vec<u8>>, Stop> {
        let mut w = Walk::new(comps.iter().copied());
        match self.walk(&mut w, false) {
            Ok(()) => Ok(Some(w.cur)),
            Err(Stop::Missing) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn push(&mut self, inode: Inode) -> usize {
        self.inodes.push(inode);
        self.inodes.len() - 1
    }

    /// The keys strictly below `p`.
    fn below(&self, p: &[u8]) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
        if p.is_empty() {
            return (Bound::Unbounded, Bound::Unbounded);
        }
        // Every key starting with `p/` sorts in [`p/`, `p0`): '0' follows '/'.
        let mut lo = p.to_vec();
        lo.push(b'/');
        let mut hi = p.to_vec();
        hi.push(b'0');
        (Bound::Included(lo), Bound::Excluded(hi))
    }

    fn remove_below(&mut self, p: &[u8]) {
        if p.is_empty() {
            self.map.clear();
            return;
        }
        let doomed: Vec<Vec<u8>> = self
            .map
            .range(self.below(p))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.map.remove(&k);
        }
    }

    /// Puts a non-directory inode at `p`, replacing what was there (a directory with its
    /// subtree).
    pub(crate) fn put(&mut self, p: Vec<u8>, inode: usize, layer: usize) {
        if matches!(self.kind_at(&p), Some(Kind::Dir)) {
            self.remove_below(&p);
        }
        self.map.insert(p, Node { inode, layer });
    }

    /// Puts a directory at `p`: over a directory it keeps the children and takes the new
    /// metadata; over anything else it replaces it.
    pub(crate) fn put_dir(&mut self, p: Vec<u8>, inode: Inode, layer: usize) {
        match self.map.get_mut(&p) {
            Some(n) if self.inodes[n.inode].kind == Kind::Dir => {
                n.layer = layer;
                self.inodes[n.inode] = inode;
            }
            _ => {
                let id = self.push(inode);
                self.map.insert(p, Node { inode: id, layer });
            }
        }
    }

    /// Removes what layers below `layer` made at `p` (with `include_self`) and below it, as if
    /// the removal had happened before any of `layer`'s own entries. What `layer` made stays;
    /// a lower directory on the way to it becomes an implicit directory of `layer`, as it would
    /// be had the removal come first.
    pub(crate) fn remove_lower(&mut self, p: &[u8], layer: usize, include_self: bool) {
        let sub: Vec<(Vec<u8>, usize)> = self
            .map
            .range(self.below(p))
            .map(|(k, n)| (k.clone(), n.layer))
            .collect();
        let mut keep_dirs: BTreeSet<&[u8]> = BTreeSet::new();
        for (k, l) in &sub {
            if *l >= layer {
                let mut a = parent(k);
                while a.len() > p.len() && keep_dirs.insert(a) {
                    a = parent(a);
                }
            }
        }
        let any_kept = sub.iter().any(|(_, l)| *l >= layer);
        for (k, l) in &sub {
            if *l < layer {
                if keep_dirs.contains(&k[..]) {
                    self.make_implicit(k, layer);
                } else {
                    self.map.remove(k);
                }
            }
        }
        if include_self && !p.is_empty() {
            if let Some(n) = self.map.get(p) {
                if n.layer < layer {
                    if any_kept {
                        self.make_implicit(p, layer);
                    } else {
                        self.map.remove(p);
                    }
                }
            }
        }
    }

    fn make_implicit(&mut self, p: &[u8], layer: usize) {
        let id = self.push(Inode::implicit_dir());
        if let Some(n) = self.map.get_mut(p) {
            *n = Node { inode: id, layer };
        }
    }
}

/// A flattened image: every path with its metadata, and the file contents in a spool that is
/// deleted when the tree is dropped.
pub struct Tree {
    pub(crate) nodes: Nodes,
    pub(crate) spool: Spool,
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tree")
            .field("entries", &self.nodes.map.len())
            .field("spooled_bytes", &self.spool.len())
            .finish()
    }
}

impl Tree {
    fn entry<'a>(&'a self, path: &'a [u8], inode: usize) -> Entry<'a> {
        Entry {
            path,
            id: InodeId(inode),
            inode: &self.nodes.inodes[inode],
        }
    }

    /// The root directory (its path is empty). Outputs that have no root entry ignore it.
    pub fn root(&self) -> Entry<'_> {
        self.entry(b"", 0)
    }

    /// The number of paths, the root excluded.
    pub fn len(&self) -> usize {
        self.nodes.map.len()
    }

    /// Whether the tree holds nothing but its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.map.is_empty()
    }

    /// Every path but the root, sorted bytewise: a directory comes before what it holds.
    pub fn entries(&self) -> impl Iterator<Item = Entry<'_>> + '_ {
        self.nodes
            .map
            .iter()
            .map(|(k, n)| self.entry(&k[..], n.inode))
    }

    /// The entry at exactly `path` (normalised, as [`Entry::path`]; `""` is the root), no
    /// symlink followed.
    pub fn get(&self, path: &[u8]) -> Option<Entry<'_>> {
        if path.is_empty() {
            return Some(self.root());
        }
        let (k, n) = self.nodes.map.get_key_value(path)?;
        Some(self.entry(&k[..], n.inode))
    }

    /// Looks `path` up as a process chrooted into the tree would: every symlink followed,
    /// inside the root (absolute targets from the root, `..` stopping at the root). `None` if
    /// it does not resolve.
    pub fn resolve(&self, path: &[u8]) -> Option<Entry<'_>> {
        let mut w = Walk::new(path.split(|b| *b == b'/'));
        self.nodes.walk(&mut w, true).ok()?;
        self.get(&w.cur)
    }

    /// Another handle on the file that holds the contents, for positioned reads at a
    /// content's offset on other threads.
    pub(crate) fn spool_file(&self) -> std::io::Result<std::fs::File> {
        self.spool.try_clone_file()
    }

    /// Reads a file's contents.
    pub fn open(&self, content: &Content) -> ContentReader<'_> {
        self.spool.open(content)
    }

    /// Copies a file's contents to `w` through `buf`, checking that exactly `content.len()`
    /// bytes come from the spool. Reading and writing fail apart, so each output can say
    /// which side was wrong.
    pub fn copy_content(
        &self,
        content: &Content,
        w: &mut impl std::io::Write,
        buf: &mut [u8],
    ) -> Result<(), ContentCopyError> {
        use std::io::Read;
        let mut r = self.open(content);
        let mut left = content.len();
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = r.read(&mut buf[..want]).map_err(ContentCopyError::Read)?;
            if n == 0 {
                return Err(ContentCopyError::Read(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            w.write_all(&buf[..n]).map_err(ContentCopyError::Write)?;
            left -= n as u64;
        }
        Ok(())
    }

    /// The total size of the regular files, each inode counted once (what the tree needs in
    /// memory as an unpacked root filesystem, metadata aside).
    pub fn content_size(&self) -> u64 {
        let mut seen = BTreeSet::new();
        self.nodes
            .map
            .values()
            .filter(|n| seen.insert(n.inode))
            .filter_map(|n| match &self.nodes.inodes[n.inode].kind {
                Kind::File(c) => Some(c.len),
                _ => None,
            })
            .sum()
    }
}

/// Why [`Tree::copy_content`] failed.
#[derive(Debug)]
pub enum ContentCopyError {
    /// Reading the spooled contents failed (or they were short).
    Read(std::io::Error),
    /// Writing the output failed.
    Write(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        let n = |s: &str| normalise(s.as_bytes()).map(|v| v.join(&b'/'));
        assert_eq!(n("/a//b/./c/"), Some(b"a/b/c".to_vec()));
        assert_eq!(n("./a/../b"), Some(b"b".to_vec()));
        assert_eq!(n("./"), Some(Vec::new()));
        assert_eq!(n("../x"), None);
        assert_eq!(n("a/../../x"), None);
    }

    #[test]
    fn below_range_is_exact() {
        let mut n = Nodes::new();
        for k in ["a", "a-b", "a.c", "a/x", "a/x/y", "a0", "b"] {
            let id = n.push(Inode::implicit_dir());
            n.map.insert(
                k.as_bytes().to_vec(),
                Node {
                    inode: id,
                    layer: 0,
                },
            );
        }
        let keys: Vec<_> = n.map.range(n.below(b"a")).map(|(k, _)| k.clone()).collect();
        assert_eq!(keys, vec![b"a/x".to_vec(), b"a/x/y".to_vec()]);
    }
}
