//! The kernel: a kernel image in (a bzImage/vmlinuz, a vmlinux ELF, or an arm64 `Image`), a
//! [`Kernel`] out: its uncompressed vmlinux, version, architecture, PVH entry point, build
//! configuration and module tree.
//!
//! Without `--kernel` oci2uk uses `$OCI2UK_KERNEL`, else its own lean kernel once
//! `oci2uk kernel build` has built it ([`build`]), else the newest installed `/boot/vmlinuz-*`
//! whose `/lib/modules/<version>` exists ([`discover_in`]).

pub mod build;
pub mod config;
pub mod decompress;
pub mod elf;
pub mod modules;

use std::cmp::Ordering;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use config::KernelConfig;
pub use decompress::Compression;
pub use modules::{Lookup, Module, Modules, ModulesError};

use decompress::{DecompressError, MAX_OUTPUT};
use elf::Elf;

/// The environment variable naming the kernel to use when `--kernel` is not given.
pub const KERNEL_ENV: &str = "OCI2UK_KERNEL";

/// The Xen ELF note type giving the 32-bit PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// The Xen ELF note type giving the PV entry point, a virtual address (`XEN_ELFNOTE_ENTRY`).
pub const XEN_ELFNOTE_ENTRY: u32 = 1;
/// The Xen ELF note type giving the virtual address the image is mapped at
/// (`XEN_ELFNOTE_VIRT_BASE`).
pub const XEN_ELFNOTE_VIRT_BASE: u32 = 3;
/// The Xen ELF note type giving `VIRT_BASE` minus the physical address of the first byte
/// (`XEN_ELFNOTE_PADDR_OFFSET`).
pub const XEN_ELFNOTE_PADDR_OFFSET: u32 = 4;
/// `__START_KERNEL_map`: x86_64 Linux maps its image at this virtual address plus its physical
/// address.
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;

/// Errors of reading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel file could not be read.
    #[error("cannot read the kernel {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bytes are no kernel image this tool knows.
    #[error(
        "not a kernel image (expected a bzImage/vmlinuz, a vmlinux ELF or an arm64 Image): {why}"
    )]
    NotAKernel {
        /// What was found.
        why: String,
    },
    /// The bzImage's payload is in a format Linux does not use.
    #[error("the bzImage's payload has an unknown compression (first bytes {magic})")]
    UnknownCompression {
        /// The payload's first bytes, in hex.
        magic: String,
    },
    /// The payload could not be decompressed.
    #[error("cannot decompress the bzImage's {compression} payload")]
    Decompress {
        /// Its compression.
        compression: Compression,
        /// The cause.
        #[source]
        source: DecompressError,
    },
    /// The vmlinux is not a usable ELF file.
    #[error("the kernel's vmlinux is not a usable ELF file")]
    Elf(#[source] elf::ElfError),
    /// No version string was found.
    #[error("cannot find the kernel version in the image (no `Linux version` banner)")]
    NoVersion,
    /// The kernel has no PVH entry point.
    #[error(
        "this kernel has no PVH entry point (CONFIG_PVH): it cannot be baked into one bootable \
         file; use a kernel built with CONFIG_PVH=y (Debian's linux-image-cloud-amd64 is one) \
         or --format bundle"
    )]
    NoPvh,
    /// An arm64 kernel was asked for something only x86_64 has.
    #[error("arm64 kernels have no PVH entry point and are not bakeable; use --format bundle")]
    Arm64NotBakeable,
    /// No kernel was given and none is installed.
    #[error(
        "no kernel given and none found: build oci2uk's own with `oci2uk kernel build`, pass \
         --kernel PATH, set {KERNEL_ENV}, or install one with its modules (apt-get install \
         linux-image-cloud-amd64)"
    )]
    NoneInstalled,
    /// The kernel's configuration could not be read.
    #[error("cannot read the kernel configuration {path}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The module tree could not be read.
    #[error(transparent)]
    Modules(#[from] ModulesError),
}

/// A kernel's architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Machine {
    /// x86_64 (bakeable through PVH).
    X86_64,
    /// arm64 (served by the bundle).
    Aarch64,
}

impl Machine {
    /// The OCI platform architecture name (`amd64`, `arm64`).
    pub fn oci_arch(self) -> &'static str {
        match self {
            Machine::X86_64 => "amd64",
            Machine::Aarch64 => "arm64",
        }
    }

    /// The ELF `e_machine` of binaries that run on it.
    pub fn elf_machine(self) -> u16 {
        match self {
            Machine::X86_64 => elf::EM_X86_64,
            Machine::Aarch64 => elf::EM_AARCH64,
        }
    }
}

/// The architecture of the kernel file whose first bytes are `head` (at least its first 4 KiB),
/// when those bytes alone tell it as [`Kernel::parse`] would: a bzImage is x86_64, an arm64
/// Image says so, an ELF vmlinux has its `e_machine`. `None` when the file must be read
/// further (a gzip-compressed Image) or is no kernel. A build uses this to pick the image's
/// platform while the kernel is still loading.
pub fn sniff_machine(head: &[u8]) -> Option<Machine> {
    if head.starts_with(elf::MAGIC) {
        // ELFCLASS64, little-endian.
        if head.get(4..6) != Some(&[2, 1]) {
            return None;
        }
        return match elf::u16_at(head, 18)? {
            elf::EM_X86_64 => Some(Machine::X86_64),
            elf::EM_AARCH64 => Some(Machine::Aarch64),
            _ => None,
        };
    }
    if head.get(setup::HEADER_MAGIC..setup::HEADER_MAGIC + 4) == Some(b"HdrS") {
        return Some(Machine::X86_64);
    }
    if is_arm64_image(head) {
        return Some(Machine::Aarch64);
    }
    None
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::X86_64 => "x86_64",
            Machine::Aarch64 => "aarch64",
        })
    }
}

/// What kind of file the kernel image was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// An x86 bzImage (what distributions install as `/boot/vmlinuz-*`), its payload compressed
    /// with `compression` (None: `CONFIG_KERNEL_UNCOMPRESSED`).
    BzImage {
        /// The payload's compression.
        compression: Option<Compression>,
    },
    /// A vmlinux ELF file.
    Vmlinux,
    /// An arm64 `Image`, gzip-compressed as distributions install it when `gzip` is set.
    Arm64Image {
        /// Whether the file was `Image.gz`.
        gzip: bool,
    },
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageFormat::BzImage {
                compression: Some(c),
            } => write!(f, "bzImage ({c})"),
            ImageFormat::BzImage { compression: None } => f.write_str("bzImage (uncompressed)"),
            ImageFormat::Vmlinux => f.write_str("vmlinux"),
            ImageFormat::Arm64Image { gzip: true } => f.write_str("arm64 Image.gz"),
            ImageFormat::Arm64Image { gzip: false } => f.write_str("arm64 Image"),
        }
    }
}

/// A kernel, read and checked.
#[derive(Clone)]
pub struct Kernel {
    /// The file it was read from, when it was read from one.
    pub path: Option<PathBuf>,
    /// The image's kind.
    pub format: ImageFormat,
    /// Its architecture.
    pub machine: Machine,
    /// Its release (`6.1.0-56-cloud-amd64`), as `uname -r` would print it.
    pub version: String,
    /// The image file's bytes as given (what a bundle ships and `-kernel` boots); empty after
    /// [`Kernel::without_image`].
    pub image: Vec<u8>,
    /// The uncompressed vmlinux ELF (x86_64 only; equal to `image` for a vmlinux).
    vmlinux: Option<Vec<u8>>,
    /// The 32-bit PVH entry point, from the Xen note `XEN_ELFNOTE_PHYS32_ENTRY`.
    pvh_entry: Option<u32>,
    /// The 64-bit Xen PV entry point (a virtual address), from `XEN_ELFNOTE_ENTRY`.
    pv_entry: Option<u64>,
}

impl fmt::Debug for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("machine", &self.machine)
            .field("version", &self.version)
            .field("image_len", &self.image.len())
            .field("vmlinux_len", &self.vmlinux.as_ref().map(Vec::len))
            .field("pvh_entry", &self.pvh_entry)
            .field("pv_entry", &self.pv_entry)
            .finish()
    }
}

/// Offsets in the x86 boot protocol's setup header (Documentation/arch/x86/boot.rst).
mod setup {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const HEADER_MAGIC: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const KERNEL_VERSION: usize = 0x20e;
    pub const PAYLOAD_OFFSET: usize = 0x248;
    pub const PAYLOAD_LENGTH: usize = 0x24c;
}

/// Where an arm64 `Image` keeps its magic `ARM\x64`.
const ARM64_MAGIC_OFFSET: usize = 0x38;

impl Kernel {
    /// Read the kernel image at `path`.
    pub fn load(path: &Path) -> Result<Self, KernelError> {
        let image = fs::read(path).map_err(|source| KernelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut kernel = Self::parse(image)?;
        kernel.path = Some(path.to_path_buf());
        Ok(kernel)
    }

    /// The kernel without its image file's bytes, for a caller that needs only the vmlinux
    /// and what is read from it (a bzImage's file is 14 MiB beside it for Debian's kernel).
    pub fn without_image(self) -> Self {
        Self {
            image: Vec::new(),
            ..self
        }
    }

    /// Read a kernel image from its bytes.
    pub fn parse(image: Vec<u8>) -> Result<Self, KernelError> {
        if image.starts_with(elf::MAGIC) {
            return Self::from_vmlinux(image.clone(), image, ImageFormat::Vmlinux, None);
        }
        if image.get(setup::HEADER_MAGIC..setup::HEADER_MAGIC + 4) == Some(b"HdrS") {
            return Self::from_bzimage(image);
        }
        if is_arm64_image(&image) {
            return Self::from_arm64(&image, false, image.clone());
        }
        if image.starts_with(&[0x1f, 0x8b]) {
            // Distributions install arm64 kernels as a gzip-compressed Image.
            let inner = decompress::decompress(Compression::Gzip, &image, MAX_OUTPUT).map_err(
                |source| KernelError::Decompress {
                    compression: Compression::Gzip,
                    source,
                },
            )?;
            if is_arm64_image(&inner) {
                return Self::from_arm64(&inner, true, image);
            }
            return Err(KernelError::NotAKernel {
                why: "a gzip file that holds no arm64 Image".into(),
            });
        }
        Err(KernelError::NotAKernel {
            why: format!("first bytes {}", hex_prefix(&image)),
        })
    }

    /// A bzImage whose vmlinux was decompressed before (a build's cache keeps it under the
    /// bzImage's digest): the header is read, the payload is not decompressed again.
    pub fn from_bzimage_and_vmlinux(image: Vec<u8>, vmlinux: Vec<u8>) -> Result<Self, KernelError> {
        if image.get(setup::HEADER_MAGIC..setup::HEADER_MAGIC + 4) != Some(b"HdrS") {
            return Self::parse(image);
        }
        let payload = bzimage_payload(&image)?;
        if payload.starts_with(elf::MAGIC) {
            return Self::from_bzimage(image);
        }
        let compression =
            Compression::detect(payload).ok_or_else(|| KernelError::UnknownCompression {
                magic: hex_prefix(payload),
            })?;
        let version = bzimage_version(&image);
        Self::from_vmlinux(
            vmlinux,
            image,
            ImageFormat::BzImage {
                compression: Some(compression),
            },
            version,
        )
    }

    fn from_bzimage(image: Vec<u8>) -> Result<Self, KernelError> {
        let payload = bzimage_payload(&image)?;
        let (compression, vmlinux) = if payload.starts_with(elf::MAGIC) {
            (None, payload.to_vec())
        } else {
            let compression =
                Compression::detect(payload).ok_or_else(|| KernelError::UnknownCompression {
                    magic: hex_prefix(payload),
                })?;
            let mut vmlinux =
                decompress::decompress(compression, payload, MAX_OUTPUT).map_err(|source| {
                    KernelError::Decompress {
                        compression,
                        source,
                    }
                })?;
            // Held for the whole build: not the up to twice its size the decoder grew it to.
            vmlinux.shrink_to_fit();
            (Some(compression), vmlinux)
        };
        let version = bzimage_version(&image);
        Self::from_vmlinux(
            vmlinux,
            image,
            ImageFormat::BzImage { compression },
            version,
        )
    }

    fn from_vmlinux(
        vmlinux: Vec<u8>,
        image: Vec<u8>,
        format: ImageFormat,
        version: Option<String>,
    ) -> Result<Self, KernelError> {
        let parsed = Elf::parse(&vmlinux).map_err(KernelError::Elf)?;
        let machine = match parsed.header.machine {
            elf::EM_X86_64 => Machine::X86_64,
            elf::EM_AARCH64 => Machine::Aarch64,
            other => {
                return Err(KernelError::NotAKernel {
                    why: format!("an ELF file for machine {other}, neither x86_64 nor aarch64"),
                })
            }
        };
        let pvh_entry = pvh_entry(&parsed)?;
        let pv_entry = pv_entry(&parsed)?;
        let version = version
            .or_else(|| banner_version(&vmlinux))
            .ok_or(KernelError::NoVersion)?;
        Ok(Kernel {
            path: None,
            format,
            machine,
            version,
            image,
            vmlinux: (machine == Machine::X86_64).then_some(vmlinux),
            pvh_entry,
            pv_entry: pv_entry.filter(|_| machine == Machine::X86_64),
        })
    }

    fn from_arm64(inner: &[u8], gzip: bool, image: Vec<u8>) -> Result<Self, KernelError> {
        Ok(Kernel {
            path: None,
            format: ImageFormat::Arm64Image { gzip },
            machine: Machine::Aarch64,
            version: banner_version(inner).ok_or(KernelError::NoVersion)?,
            image,
            vmlinux: None,
            pvh_entry: None,
            pv_entry: None,
        })
    }

    /// The uncompressed vmlinux ELF, for baking.
    pub fn vmlinux(&self) -> Result<&[u8], KernelError> {
        match (&self.vmlinux, self.machine) {
            (Some(v), Machine::X86_64) => Ok(v),
            _ => Err(KernelError::Arm64NotBakeable),
        }
    }

    /// The 32-bit PVH entry point (a physical address), or why there is none.
    pub fn pvh_entry(&self) -> Result<u32, KernelError> {
        match self.machine {
            Machine::Aarch64 => Err(KernelError::Arm64NotBakeable),
            Machine::X86_64 => self.pvh_entry.ok_or(KernelError::NoPvh),
        }
    }

    /// The 64-bit Xen PV entry point (`startup_xen`, a virtual address), when the kernel can
    /// boot as a Xen PV guest and is mapped where the bake expects (`VIRT_BASE` =
    /// `__START_KERNEL_map`, `PADDR_OFFSET` = 0, as every x86_64 Linux has it).
    pub fn pv_entry(&self) -> Option<u64> {
        self.pv_entry
    }

    /// The kernel's build configuration: the copy built in (`CONFIG_IKCONFIG`), else
    /// `config-VERSION` beside the image file, else `/boot/config-VERSION`; None when there is
    /// none (callers then assume only gzip, which every kernel with initramfs support enables
    /// by default).
    pub fn config(&self) -> Result<Option<KernelConfig>, KernelError> {
        if let Some(text) = self.vmlinux.as_deref().and_then(ikconfig) {
            return Ok(Some(KernelConfig::parse(&text, "IKCONFIG")));
        }
        let name = format!("config-{}", self.version);
        let mut candidates = Vec::new();
        if let Some(dir) = self.path.as_deref().and_then(Path::parent) {
            candidates.push(dir.join(&name));
        }
        candidates.push(Path::new("/boot").join(&name));
        for path in candidates {
            match fs::read_to_string(&path) {
                Ok(text) => {
                    return Ok(Some(KernelConfig::parse(&text, path.display().to_string())))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(KernelError::Config { path, source }),
            }
        }
        Ok(None)
    }

    /// Whether the kernel loads modules: its configuration says so, or it has none to tell
    /// (then a module tree is expected, as for any distribution kernel).
    pub fn has_modules(&self) -> Result<bool, KernelError> {
        Ok(self.config()?.is_none_or(|c| c.has_modules()))
    }

    /// The kernel's module tree: `dir` when given (`--modules`), else
    /// `/lib/modules/VERSION`; for a kernel built without modules (its configuration says
    /// so), none: every driver is built in or absent ([`Modules::built_in`]).
    pub fn modules(&self, dir: Option<&Path>) -> Result<Modules, KernelError> {
        if dir.is_none() {
            if let Some(config) = self.config()?.filter(|c| !c.has_modules()) {
                return Ok(Modules::built_in(&config));
            }
        }
        let default = Path::new("/lib/modules").join(&self.version);
        Ok(Modules::open(dir.unwrap_or(&default))?)
    }
}

fn is_arm64_image(data: &[u8]) -> bool {
    data.get(ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4) == Some(b"ARM\x64")
}

fn hex_prefix(data: &[u8]) -> String {
    data.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The release from the setup header's `kernel_version` string ("6.1.0-56-cloud-amd64
/// (debian-kernel@...) #1 SMP ...": its first word).
fn bzimage_version(image: &[u8]) -> Option<String> {
    let ptr = usize::from(elf::u16_at(image, setup::KERNEL_VERSION)?);
    if ptr == 0 {
        return None;
    }
    first_word(image.get(ptr + 0x200..)?)
}

fn first_word(data: &[u8]) -> Option<String> {
    let end = data
        .iter()
        .position(|&b| b == 0 || b.is_ascii_whitespace())
        .unwrap_or(data.len().min(256));
    let word = std::str::from_utf8(&data[..end]).ok()?;
    (!word.is_empty() && word.len() < 256).then(|| word.to_string())
}

/// The release from the `Linux version X (...)` banner.
fn banner_version(data: &[u8]) -> Option<String> {
    const BANNER: &[u8] = b"Linux version ";
    let mut from = 0;
    while let Some(at) = find(&data[from..], BANNER) {
        let start = from + at + BANNER.len();
        if data.get(start).is_some_and(u8::is_ascii_digit) {
            return first_word(&data[start..]);
        }
        from = start;
    }
    None
}

/// The payload of a bzImage (the compressed vmlinux, or the vmlinux itself).
fn bzimage_payload(image: &[u8]) -> Result<&[u8], KernelError> {
    let not = |why: &str| KernelError::NotAKernel { why: why.into() };
    let protocol = elf::u16_at(image, setup::VERSION).unwrap_or(0);
    if protocol < 0x208 {
        // payload_offset/payload_length arrived with boot protocol 2.08 (Linux 2.6.26).
        return Err(not(
            "a bzImage older than boot protocol 2.08 (no payload fields)",
        ));
    }
    let setup_sects = match image[setup::SETUP_SECTS] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = elf::u32_at(image, setup::PAYLOAD_OFFSET).ok_or_else(|| not("truncated"))?;
    let length = elf::u32_at(image, setup::PAYLOAD_LENGTH).ok_or_else(|| not("truncated"))?;
    let start = (setup_sects + 1) * 512 + offset as usize;
    image
        .get(start..start.saturating_add(length as usize))
        .ok_or_else(|| not("a bzImage whose payload lies outside the file"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// The configuration built into the kernel with `CONFIG_IKCONFIG`: gzip data between the
/// markers `IKCFG_ST` and `IKCFG_ED` (kernel/configs.c).
fn ikconfig(vmlinux: &[u8]) -> Option<String> {
    let start = find(vmlinux, b"IKCFG_ST")? + 8;
    let len = find(&vmlinux[start..], b"IKCFG_ED")?;
    let data =
        decompress::decompress(Compression::Gzip, &vmlinux[start..start + len], 16 << 20).ok()?;
    String::from_utf8(data).ok()
}

/// The PVH entry from the Xen note (its descriptor is 4 or 8 bytes: Linux writes it with
/// `_ASM_PTR`, a quad on x86_64).
fn pvh_entry(parsed: &Elf) -> Result<Option<u32>, KernelError> {
    let notes = parsed.notes().map_err(KernelError::Elf)?;
    let Some(note) = notes
        .iter()
        .find(|n| n.name == b"Xen" && n.kind == XEN_ELFNOTE_PHYS32_ENTRY)
    else {
        return Ok(None);
    };
    let entry = match note.desc.len() {
        4 => u64::from(elf::u32_at(note.desc, 0).expect("four bytes")),
        8 => elf::u64_at(note.desc, 0).expect("eight bytes"),
        n => {
            return Err(KernelError::Elf(elf::ElfError(format!(
                "the PVH entry note has a {n}-byte descriptor"
            ))))
        }
    };
    u32::try_from(entry)
        .map(Some)
        .map_err(|_| KernelError::Elf(elf::ElfError(format!("PVH entry {entry:#x} above 4 GiB"))))
}

/// The PV entry from the Xen note `XEN_ELFNOTE_ENTRY` (Linux writes it with `_ASM_PTR`: 8
/// bytes on x86_64). `None` when there is none, or when the kernel's notes place its image
/// elsewhere than `__START_KERNEL_map + paddr`: the bake puts its PV entry at that address, and
/// libxc's loader maps each segment at `VIRT_BASE - PADDR_OFFSET + paddr`.
fn pv_entry(parsed: &Elf) -> Result<Option<u64>, KernelError> {
    let notes = parsed.notes().map_err(KernelError::Elf)?;
    let value = |kind: u32| {
        notes
            .iter()
            .find(|n| n.name == b"Xen" && n.kind == kind)
            .map(|n| match n.desc.len() {
                4 => elf::u32_at(n.desc, 0).map(u64::from),
                8 => elf::u64_at(n.desc, 0),
                _ => None,
            })
    };
    let Some(entry) = value(XEN_ELFNOTE_ENTRY) else {
        return Ok(None);
    };
    let entry = entry.ok_or_else(|| {
        KernelError::Elf(elf::ElfError(
            "the Xen PV entry note has neither a 4- nor an 8-byte descriptor".into(),
        ))
    })?;
    let standard = value(XEN_ELFNOTE_VIRT_BASE).is_none_or(|v| v == Some(START_KERNEL_MAP))
        && value(XEN_ELFNOTE_PADDR_OFFSET).is_none_or(|v| v == Some(0));
    Ok((standard && entry >= START_KERNEL_MAP).then_some(entry))
}

/// How the kernel was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// `--kernel`.
    Flag,
    /// `$OCI2UK_KERNEL`.
    Env,
    /// The oci2uk kernel `oci2uk kernel build` built.
    Built,
    /// The newest installed kernel with modules.
    Installed,
}

/// The kernel file to use and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    /// The kernel image file.
    pub path: PathBuf,
    /// Why this one.
    pub choice: Choice,
}

impl fmt::Display for Chosen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.choice {
            Choice::Flag => "--kernel",
            Choice::Env => KERNEL_ENV,
            Choice::Built => "the oci2uk kernel, built by `oci2uk kernel build`",
            Choice::Installed => "the newest installed kernel with modules",
        };
        write!(f, "{} ({why})", self.path.display())
    }
}

/// [`discover_in`] without a cache: `flag`, else `$OCI2UK_KERNEL`, else the newest installed
/// kernel.
pub fn discover(flag: Option<&Path>) -> Result<Chosen, KernelError> {
    discover_in(flag, None)
}

/// Pick the kernel: `flag` (`--kernel`), else `$OCI2UK_KERNEL`, else the oci2uk kernel last
/// built into the cache at `cache_root` ([`build::latest`]), else the newest
/// `/boot/vmlinuz-VERSION` with `/lib/modules/VERSION`.
///
/// The oci2uk kernel comes before the installed one because it is the better guest wherever
/// both boot: the fixture nginx serves from less than half the memory, boots in half the time
/// and bakes into a smaller file (`scripts/bench-kernel.sh`).
pub fn discover_in(flag: Option<&Path>, cache_root: Option<&Path>) -> Result<Chosen, KernelError> {
    if let Some(path) = flag {
        return Ok(Chosen {
            path: path.to_path_buf(),
            choice: Choice::Flag,
        });
    }
    if let Some(path) = std::env::var_os(KERNEL_ENV).filter(|v| !v.is_empty()) {
        return Ok(Chosen {
            path: PathBuf::from(path),
            choice: Choice::Env,
        });
    }
    if let Some(path) = cache_root.and_then(build::latest) {
        return Ok(Chosen {
            path,
            choice: Choice::Built,
        });
    }
    newest_installed(Path::new("/boot"), Path::new("/lib/modules")).map(|path| Chosen {
        path,
        choice: Choice::Installed,
    })
}

/// The newest `BOOT/vmlinuz-VERSION` for which `MODULES/VERSION/modules.dep` exists, by version
/// order (`sort -V`). Every flavour counts: a machine with both a generic and a `-cloud-`
/// kernel of one version gets the one that sorts last, and `--kernel` picks another.
pub fn newest_installed(boot: &Path, modules: &Path) -> Result<PathBuf, KernelError> {
    let entries = match fs::read_dir(boot) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(KernelError::NoneInstalled),
        Err(source) => {
            return Err(KernelError::Read {
                path: boot.to_path_buf(),
                source,
            })
        }
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            modules
                .join(&version)
                .join("modules.dep")
                .is_file()
                .then(|| (version, e.path()))
        })
        .max_by(|a, b| version_cmp(&a.0, &b.0))
        .map(|(_, path)| path)
        .ok_or(KernelError::NoneInstalled)
}

/// Compare versions as `sort -V` does: digit runs by value, other runs bytewise.
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut rest = s;
        while let Some(c) = rest.chars().next() {
            let digit = c.is_ascii_digit();
            let end = rest
                .find(|ch: char| ch.is_ascii_digit() != digit)
                .unwrap_or(rest.len());
            out.push((digit, &rest[..end]));
            rest = &rest[end..];
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
pub(crate) mod tests;
