//! The build-time check of the program: what `execve` inside the guest would do, done on the
//! tree.
//!
//! The program is found as the init finds it (a name without `/` in `PATH`, relative `PATH`
//! entries and relative paths against the working directory; the first `PATH` candidate that
//! is not a directory and has an execute bit wins). Then, as the kernel would: it must be a
//! regular file the user may execute; an ELF file must be an executable for the kernel's
//! machine, and its `PT_INTERP` interpreter, when it has one, a regular file the user may
//! execute for the same machine; a `#!` script's interpreter must pass the same checks, through
//! at most [`MAX_SCRIPT_DEPTH`] scripts. Every lookup follows symlinks inside the tree only.

use std::io::Read;

use oci2uk_config::User;

use super::{clean_absolute, PlanError};
use crate::flatten::{Content, Inode, Kind, Tree};
use crate::kernel::Machine;

/// Scripts run through scripts: the kernel gives up after this many rewrites (`exec_binprm`).
pub(super) const MAX_SCRIPT_DEPTH: usize = 4;
/// How much of a script the kernel reads for its `#!` line (`BINPRM_BUF_SIZE`).
const SHEBANG_MAX: u64 = 256;
/// The longest `PT_INTERP` the kernel accepts (`PATH_MAX`).
const INTERP_MAX: u64 = 4096;
/// The furthest into an ELF file its headers are looked for.
const HEADERS_MAX: u64 = 16 << 20;

const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const PT_INTERP: u32 = 3;

/// What the check needs to know of the launch.
pub(super) struct Checker<'a> {
    pub(super) tree: &'a Tree,
    /// The working directory, absolute.
    pub(super) workdir: &'a str,
    /// The `PATH` of the program's environment.
    pub(super) path_var: &'a str,
    pub(super) user: &'a User,
    pub(super) machine: Machine,
}

/// The fields of an ELF file that matter here.
struct ElfInfo {
    machine: u16,
    interp: Option<String>,
}

impl Checker<'_> {
    /// Checks the program `bin` (argv\[0\]).
    pub(super) fn check_entrypoint(&self, bin: &str) -> Result<(), PlanError> {
        let path = if bin.contains('/') {
            self.locate(bin)
        } else {
            self.search(bin)?
        };
        self.check_program(
            &path,
            format!("the entrypoint {}", clean_absolute(&path)),
            0,
        )
    }

    /// `p` as the process would open it: absolute, or relative to the working directory.
    fn locate(&self, p: &str) -> String {
        if p.starts_with('/') {
            p.to_string()
        } else {
            format!("{}/{p}", self.workdir.trim_end_matches('/'))
        }
    }

    /// The first `PATH` entry holding `bin` as something with an execute bit that is not a
    /// directory (the init's rule, and Go's `exec.LookPath` that runc uses).
    fn search(&self, bin: &str) -> Result<String, PlanError> {
        for dir in self.path_var.split(':') {
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = self.locate(&format!("{dir}/{bin}"));
            if let Some(e) = self.tree.resolve(candidate.as_bytes()) {
                if e.inode.kind != Kind::Dir && e.inode.mode & 0o111 != 0 {
                    return Ok(candidate);
                }
            }
        }
        Err(PlanError::NotInPath {
            bin: bin.to_string(),
            path_var: self.path_var.to_string(),
        })
    }

    /// Checks the program at `path` (described as `subject` in errors), `depth` scripts deep.
    fn check_program(&self, path: &str, subject: String, depth: usize) -> Result<(), PlanError> {
        let Some(entry) = self.tree.resolve(path.as_bytes()) else {
            return Err(self.missing(path, subject));
        };
        let content = self.executable_file(entry.inode, &subject)?;
        let head = self.read_prefix(path, content, SHEBANG_MAX)?;
        if head.starts_with(b"\x7fELF") {
            let elf = self.elf_info(path, &subject, content)?;
            self.check_machine(&subject, elf.machine)?;
            if let Some(interp) = elf.interp {
                self.check_elf_interpreter(path, &subject, &interp)?;
            }
            return Ok(());
        }
        let Some(line) = head.strip_prefix(b"#!") else {
            return Err(PlanError::Format { subject });
        };
        // binfmt_script: the interpreter is the first word of the first line, blanks around it
        // ignored; what follows is one optional argument.
        let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
        let interp = line
            .split(|b| *b == b' ' || *b == b'\t')
            .find(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned());
        let Some(interp) = interp else {
            return Err(PlanError::EmptyShebang { subject });
        };
        if depth >= MAX_SCRIPT_DEPTH {
            return Err(PlanError::ScriptDepth {
                subject,
                max: MAX_SCRIPT_DEPTH,
            });
        }
        let ipath = self.locate(&interp);
        if self.tree.resolve(ipath.as_bytes()).is_none() {
            return Err(PlanError::MissingScriptInterpreter { subject, interp });
        }
        self.check_program(
            &ipath,
            format!("the interpreter {interp} of {}", clean_absolute(path)),
            depth + 1,
        )
    }

    /// The dynamic loader of the ELF program at `path`: present, executable, same machine.
    /// (The kernel maps it without looking for an interpreter of its own.)
    fn check_elf_interpreter(
        &self,
        path: &str,
        subject: &str,
        interp: &str,
    ) -> Result<(), PlanError> {
        let ipath = self.locate(interp);
        let Some(e) = self.tree.resolve(ipath.as_bytes()) else {
            return Err(PlanError::MissingElfInterpreter {
                subject: subject.to_string(),
                interp: interp.to_string(),
            });
        };
        let isubject = format!("the ELF interpreter {interp} of {}", clean_absolute(path));
        let content = self.executable_file(e.inode, &isubject)?;
        let head = self.read_prefix(&ipath, content, 4)?;
        if !head.starts_with(b"\x7fELF") {
            return Err(PlanError::BadElf {
                subject: isubject,
                why: "it is not an ELF file".to_string(),
            });
        }
        let elf = self.elf_info(&ipath, &isubject, content)?;
        self.check_machine(&isubject, elf.machine)
    }

    /// The contents of a regular file the user may execute.
    fn executable_file<'t>(
        &self,
        inode: &'t Inode,
        subject: &str,
    ) -> Result<&'t Content, PlanError> {
        let Kind::File(content) = &inode.kind else {
            return Err(PlanError::NotAFile {
                subject: subject.to_string(),
                kind: inode.kind.name(),
            });
        };
        if !may_execute(inode, self.user) {
            return Err(PlanError::NotExecutable {
                subject: subject.to_string(),
                who: who(self.user),
                mode: inode.mode & 0o7777,
                uid: inode.uid,
                gid: inode.gid,
            });
        }
        Ok(content)
    }

    fn check_machine(&self, subject: &str, machine: u16) -> Result<(), PlanError> {
        if machine == self.machine.elf_machine() {
            return Ok(());
        }
        Err(PlanError::WrongMachine {
            subject: subject.to_string(),
            found: machine_name(machine),
            kernel: self.machine,
            arch: self.machine.oci_arch(),
        })
    }

    /// The error for a path that does not resolve: a dangling symlink is named as such.
    fn missing(&self, path: &str, subject: String) -> PlanError {
        let clean = clean_absolute(path);
        if let Some(e) = self.tree.get(&clean.as_bytes()[1..]) {
            if let Kind::Symlink(t) = &e.inode.kind {
                return PlanError::Dangling {
                    subject,
                    target: String::from_utf8_lossy(t).into_owned(),
                };
            }
        }
        PlanError::Missing { subject }
    }

    /// The first `n` bytes of a file (fewer if it is shorter).
    fn read_prefix(&self, path: &str, content: &Content, n: u64) -> Result<Vec<u8>, PlanError> {
        let mut buf = Vec::new();
        self.tree
            .open(content)
            .take(n)
            .read_to_end(&mut buf)
            .map_err(|source| PlanError::Read {
                path: clean_absolute(path),
                source,
            })?;
        Ok(buf)
    }

    /// The machine and interpreter of an ELF file (32 or 64 bits, either byte order), with the
    /// checks the kernel makes before it would load it.
    fn elf_info(&self, path: &str, subject: &str, content: &Content) -> Result<ElfInfo, PlanError> {
        let bad = |why: String| PlanError::BadElf {
            subject: subject.to_string(),
            why,
        };
        let head = self.read_prefix(path, content, 64)?;
        let wide = match head.get(4) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(bad("its ELF class is neither 32 nor 64 bits".into())),
        };
        let big = match head.get(5) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(bad("its byte order is unknown".into())),
        };
        let r = Fields { big };
        if head.len() < if wide { 64 } else { 52 } {
            return Err(bad("its header is truncated".into()));
        }
        let e_type = r.u16(&head, 16);
        if e_type != ET_EXEC && e_type != ET_DYN {
            return Err(bad(format!("it is not an executable (ELF type {e_type})")));
        }
        let machine = r.u16(&head, 18);
        let (phoff, entsize, phnum) = if wide {
            (r.u64(&head, 32), r.u16(&head, 54), r.u16(&head, 56))
        } else {
            (
                u64::from(r.u32(&head, 28)),
                r.u16(&head, 42),
                r.u16(&head, 44),
            )
        };
        let min_entsize = if wide { 56 } else { 32 };
        if phnum == 0 {
            return Err(bad("it has no program headers".into()));
        }
        if entsize < min_entsize {
            return Err(bad(format!(
                "its program header size {entsize} is too small"
            )));
        }
        let table_end = phoff
            .checked_add(u64::from(entsize) * u64::from(phnum))
            .filter(|end| *end <= content.len() && *end <= HEADERS_MAX)
            .ok_or_else(|| bad("its program headers lie outside the file".into()))?;
        let data = self.read_prefix(path, content, table_end)?;
        let mut interp = None;
        for i in 0..u64::from(phnum) {
            let at = usize::try_from(phoff + i * u64::from(entsize))
                .map_err(|_| bad("its program headers lie outside the file".into()))?;
            if r.u32(&data, at) != PT_INTERP {
                continue;
            }
            let (off, size) = if wide {
                (r.u64(&data, at + 8), r.u64(&data, at + 32))
            } else {
                (
                    u64::from(r.u32(&data, at + 4)),
                    u64::from(r.u32(&data, at + 16)),
                )
            };
            let end = off
                .checked_add(size)
                .filter(|end| *end <= content.len() && (2..=INTERP_MAX).contains(&size))
                .ok_or_else(|| bad("its PT_INTERP lies outside the file".into()))?;
            let bytes = self.read_prefix(path, content, end)?;
            let raw = &bytes[usize::try_from(off).unwrap_or(usize::MAX)..];
            if raw.last() != Some(&0) {
                return Err(bad("its PT_INTERP is not NUL-terminated".into()));
            }
            let name = raw.split(|b| *b == 0).next().unwrap_or_default();
            interp = Some(String::from_utf8_lossy(name).into_owned());
            break;
        }
        Ok(ElfInfo { machine, interp })
    }
}

/// Reads fixed-size fields in the file's byte order; callers check the bounds first.
struct Fields {
    big: bool,
}

impl Fields {
    fn bytes<const N: usize>(&self, d: &[u8], at: usize) -> [u8; N] {
        let mut b = [0u8; N];
        b.copy_from_slice(&d[at..at + N]);
        if self.big {
            b.reverse();
        }
        b
    }

    fn u16(&self, d: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(self.bytes(d, at))
    }

    fn u32(&self, d: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(self.bytes(d, at))
    }

    fn u64(&self, d: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(self.bytes(d, at))
    }
}

/// Whether `user` may execute the file, as the kernel decides from the permission bits:
/// root needs any execute bit; others the owner's, else the group's (primary or
/// supplementary), else everyone's.
fn may_execute(inode: &Inode, user: &User) -> bool {
    let m = inode.mode;
    if user.uid == 0 {
        return m & 0o111 != 0;
    }
    let in_group =
        inode.gid == u64::from(user.gid) || user.groups.iter().any(|g| u64::from(*g) == inode.gid);
    let bits = if inode.uid == u64::from(user.uid) {
        m >> 6
    } else if in_group {
        m >> 3
    } else {
        m
    };
    bits & 1 != 0
}

fn who(user: &User) -> String {
    if user.uid == 0 {
        return "root".to_string();
    }
    let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
    format!(
        "uid {} (gid {}, groups {})",
        user.uid,
        user.gid,
        groups.join(",")
    )
}

/// `e_machine` as a phrase: `an aarch64`, `an ELF machine 9999`.
fn machine_name(m: u16) -> String {
    let name = match m {
        3 => "an i386",
        8 => "a mips",
        20 => "a powerpc",
        21 => "a ppc64",
        22 => "an s390x",
        40 => "an arm",
        62 => "an x86_64",
        183 => "an aarch64",
        243 => "a riscv",
        258 => "a loongarch",
        _ => return format!("an ELF machine {m}"),
    };
    name.to_string()
}
