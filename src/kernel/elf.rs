//! A minimal reader of 64-bit little-endian ELF files: the header, the program headers and the
//! notes, with the file offsets the bake needs to patch them.
//!
//! Hand-written rather than built on a general object-file crate because the bake must know
//! where each field lives in the file (to rewrite the program header table and a note's
//! descriptor in place), and every read here is bounds-checked so hostile input gives an error,
//! never a panic.

use std::ops::Range;

/// `\x7fELF`.
pub const MAGIC: &[u8; 4] = b"\x7fELF";
/// Size of an ELF64 file header.
pub const EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header.
pub const PHDR_SIZE: usize = 56;
/// Size of an ELF64 section header.
pub const SHDR_SIZE: usize = 64;
/// `e_machine` of x86_64.
pub const EM_X86_64: u16 = 62;
/// `e_machine` of aarch64.
pub const EM_AARCH64: u16 = 183;
/// A loadable segment.
pub const PT_LOAD: u32 = 1;
/// A notes segment.
pub const PT_NOTE: u32 = 4;
/// The program header table itself.
pub const PT_PHDR: u32 = 6;
/// A notes section.
pub const SHT_NOTE: u32 = 7;
/// A section that occupies no file space.
pub const SHT_NOBITS: u32 = 8;

/// Why bytes are not a usable ELF64 file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ElfError(pub String);

fn err<T>(what: impl Into<String>) -> Result<T, ElfError> {
    Err(ElfError(what.into()))
}

pub(crate) fn u16_at(data: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(crate) fn u64_at(data: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// The fields of the ELF header that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// `e_phoff`.
    pub phoff: u64,
    /// `e_shoff`.
    pub shoff: u64,
    /// `e_phnum`.
    pub phnum: u16,
    /// `e_shnum`.
    pub shnum: u16,
}

/// One program header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramHeader {
    /// `p_type`.
    pub kind: u32,
    /// `p_flags`.
    pub flags: u32,
    /// `p_offset`.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_paddr`.
    pub paddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_align`.
    pub align: u64,
}

impl ProgramHeader {
    /// The header as it is stored in the file.
    pub fn to_bytes(&self) -> [u8; PHDR_SIZE] {
        let mut b = [0u8; PHDR_SIZE];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.paddr.to_le_bytes());
        b[32..40].copy_from_slice(&self.filesz.to_le_bytes());
        b[40..48].copy_from_slice(&self.memsz.to_le_bytes());
        b[48..56].copy_from_slice(&self.align.to_le_bytes());
        b
    }

    fn parse(b: &[u8]) -> Option<Self> {
        Some(ProgramHeader {
            kind: u32_at(b, 0)?,
            flags: u32_at(b, 4)?,
            offset: u64_at(b, 8)?,
            vaddr: u64_at(b, 16)?,
            paddr: u64_at(b, 24)?,
            filesz: u64_at(b, 32)?,
            memsz: u64_at(b, 40)?,
            align: u64_at(b, 48)?,
        })
    }

    /// The bytes of the file this header's contents occupy.
    pub fn file_range(&self) -> Option<Range<u64>> {
        Some(self.offset..self.offset.checked_add(self.filesz)?)
    }
}

/// One section header (the fields used here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    /// `sh_type`.
    pub kind: u32,
    /// `sh_offset`.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
}

/// One note, with the file offset of its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note<'a> {
    /// The owner's name, without its NUL.
    pub name: &'a [u8],
    /// `n_type`.
    pub kind: u32,
    /// The descriptor.
    pub desc: &'a [u8],
    /// Where the descriptor starts in the file.
    pub desc_offset: usize,
}

/// A parsed ELF64 little-endian file.
#[derive(Debug, Clone)]
pub struct Elf<'a> {
    /// The whole file.
    pub data: &'a [u8],
    /// Its header.
    pub header: Header,
    /// Its program headers, in file order.
    pub phdrs: Vec<ProgramHeader>,
    /// Its section headers, in file order (empty when it has none).
    pub shdrs: Vec<SectionHeader>,
}

impl<'a> Elf<'a> {
    /// Parse the headers of `data`.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.len() < EHDR_SIZE || &data[..4] != MAGIC {
            return err("not an ELF file");
        }
        if data[4] != 2 {
            return err("not a 64-bit ELF file");
        }
        if data[5] != 1 {
            return err("not a little-endian ELF file");
        }
        let field = |off| u16_at(data, off).expect("inside the header");
        let header = Header {
            machine: field(18),
            entry: u64_at(data, 24).expect("inside the header"),
            phoff: u64_at(data, 32).expect("inside the header"),
            shoff: u64_at(data, 40).expect("inside the header"),
            phnum: field(56),
            shnum: field(60),
        };
        if header.phnum > 0 && usize::from(field(54)) != PHDR_SIZE {
            return err("unexpected program header size");
        }
        let table = |off: u64, n: u16, size: usize| -> Result<&'a [u8], ElfError> {
            usize::try_from(off)
                .ok()
                .and_then(|off| data.get(off..off.checked_add(usize::from(n) * size)?))
                .map_or_else(|| err("header table outside the file"), Ok)
        };
        let phdrs = table(header.phoff, header.phnum, PHDR_SIZE)?
            .chunks_exact(PHDR_SIZE)
            .map(|b| ProgramHeader::parse(b).expect("a whole header"))
            .collect();
        let mut shdrs = Vec::new();
        if header.shoff != 0 && header.shnum != 0 {
            if usize::from(field(58)) != SHDR_SIZE {
                return err("unexpected section header size");
            }
            for b in table(header.shoff, header.shnum, SHDR_SIZE)?.chunks_exact(SHDR_SIZE) {
                shdrs.push(SectionHeader {
                    kind: u32_at(b, 4).expect("a whole header"),
                    offset: u64_at(b, 24).expect("a whole header"),
                    size: u64_at(b, 32).expect("a whole header"),
                });
            }
        }
        Ok(Elf {
            data,
            header,
            phdrs,
            shdrs,
        })
    }

    /// The notes of every PT_NOTE segment, or of every SHT_NOTE section when the file has no
    /// PT_NOTE segment.
    pub fn notes(&self) -> Result<Vec<Note<'a>>, ElfError> {
        let mut ranges: Vec<(u64, u64)> = self
            .phdrs
            .iter()
            .filter(|p| p.kind == PT_NOTE)
            .map(|p| (p.offset, p.filesz))
            .collect();
        if ranges.is_empty() {
            ranges = self
                .shdrs
                .iter()
                .filter(|s| s.kind == SHT_NOTE)
                .map(|s| (s.offset, s.size))
                .collect();
        }
        let mut notes = Vec::new();
        for (offset, size) in ranges {
            let start = usize::try_from(offset).ok();
            let end = start
                .zip(usize::try_from(size).ok())
                .and_then(|(s, n)| s.checked_add(n));
            let (Some(start), Some(end)) = (start, end) else {
                return err("note segment outside the file");
            };
            if end > self.data.len() {
                return err("note segment outside the file");
            }
            parse_notes(self.data, start, end, &mut notes)?;
        }
        Ok(notes)
    }

    /// The highest physical address any PT_LOAD segment occupies in memory (exclusive).
    pub fn load_end(&self) -> Option<u64> {
        self.phdrs
            .iter()
            .filter(|p| p.kind == PT_LOAD)
            .map(|p| p.paddr.checked_add(p.memsz))
            .try_fold(0u64, |max, end| Some(max.max(end?)))
    }
}

/// The notes in the bytes of one note segment or section.
pub fn parse_note_bytes(data: &[u8]) -> Result<Vec<Note<'_>>, ElfError> {
    let mut notes = Vec::new();
    parse_notes(data, 0, data.len(), &mut notes)?;
    Ok(notes)
}

fn align4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|n| n & !3)
}

fn parse_notes<'a>(
    data: &'a [u8],
    mut pos: usize,
    end: usize,
    out: &mut Vec<Note<'a>>,
) -> Result<(), ElfError> {
    // Notes in ELF64 files still use 4-byte words and 4-byte padding (what Linux and every
    // loader of it do; the gABI's 8-byte variant is not used by kernels).
    while pos + 12 <= end {
        let namesz = u32_at(data, pos).expect("checked") as usize;
        let descsz = u32_at(data, pos + 4).expect("checked") as usize;
        let kind = u32_at(data, pos + 8).expect("checked");
        let name_start = pos + 12;
        // Padding is relative to the segment's start, as readelf reads it.
        let desc_start = align4(namesz)
            .and_then(|n| name_start.checked_add(n))
            .ok_or_else(|| ElfError("bad note".into()))?;
        let next = align4(descsz)
            .and_then(|n| desc_start.checked_add(n))
            .ok_or_else(|| ElfError("bad note".into()))?;
        if desc_start + descsz > end {
            return err("a note runs past its segment");
        }
        let mut name = &data[name_start..name_start + namesz];
        if let Some((0, rest)) = name.split_last() {
            name = rest;
        }
        out.push(Note {
            name,
            kind,
            desc: &data[desc_start..desc_start + descsz],
            desc_offset: desc_start,
        });
        pos = next;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A builder of small synthetic ELF files for tests.
    use super::*;

    /// One PT_LOAD segment of a synthetic file.
    pub struct Seg {
        pub paddr: u64,
        pub data: Vec<u8>,
        pub memsz: u64,
    }

    /// An ELF64 x86_64 file: a header, `segs` as PT_LOAD segments, a PT_NOTE holding `notes`
    /// (name, type, descriptor), at file offsets aligned to `file_align`; `extra_phdr_room`
    /// bytes of zeros after the program header table.
    pub fn build(segs: &[Seg], notes: &[(&str, u32, Vec<u8>)], first_data: usize) -> Vec<u8> {
        let mut note_bytes = Vec::new();
        for (name, kind, desc) in notes {
            let name = format!("{name}\0");
            note_bytes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            note_bytes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            note_bytes.extend_from_slice(&kind.to_le_bytes());
            note_bytes.extend_from_slice(name.as_bytes());
            while !note_bytes.len().is_multiple_of(4) {
                note_bytes.push(0);
            }
            note_bytes.extend_from_slice(desc);
            while !note_bytes.len().is_multiple_of(4) {
                note_bytes.push(0);
            }
        }
        let phnum = segs.len() + 1;
        let mut out = vec![0u8; first_data.max(EHDR_SIZE + phnum * PHDR_SIZE)];
        let mut phdrs = Vec::new();
        for s in segs {
            while !out.len().is_multiple_of(16) {
                out.push(0);
            }
            phdrs.push(ProgramHeader {
                kind: PT_LOAD,
                flags: 7,
                offset: out.len() as u64,
                vaddr: 0xffff_ffff_8000_0000 + s.paddr,
                paddr: s.paddr,
                filesz: s.data.len() as u64,
                memsz: s.memsz,
                align: 16,
            });
            out.extend_from_slice(&s.data);
        }
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        phdrs.push(ProgramHeader {
            kind: PT_NOTE,
            flags: 4,
            offset: out.len() as u64,
            vaddr: 0,
            paddr: 0,
            filesz: note_bytes.len() as u64,
            memsz: note_bytes.len() as u64,
            align: 4,
        });
        out.extend_from_slice(&note_bytes);
        out[..4].copy_from_slice(MAGIC);
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes());
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&segs.first().map_or(0, |s| s.paddr).to_le_bytes());
        out[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        out[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        out[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        out[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        out[58..60].copy_from_slice(&(SHDR_SIZE as u16).to_le_bytes());
        for (i, p) in phdrs.iter().enumerate() {
            let at = EHDR_SIZE + i * PHDR_SIZE;
            out[at..at + PHDR_SIZE].copy_from_slice(&p.to_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn parses_headers_and_notes() {
        let elf = build(
            &[Seg {
                paddr: 0x100_0000,
                data: vec![0x90; 100],
                memsz: 0x2000,
            }],
            &[
                ("Xen", 18, 0x100_0010u64.to_le_bytes().to_vec()),
                ("GNU", 3, vec![1, 2, 3]),
            ],
            0x200,
        );
        let parsed = Elf::parse(&elf).unwrap();
        assert_eq!(parsed.header.machine, EM_X86_64);
        assert_eq!(parsed.phdrs.len(), 2);
        assert_eq!(parsed.load_end(), Some(0x100_2000));
        let notes = parsed.notes().unwrap();
        assert_eq!(notes.len(), 2);
        assert_eq!(notes[0].name, b"Xen");
        assert_eq!(notes[0].kind, 18);
        assert_eq!(
            &elf[notes[0].desc_offset..notes[0].desc_offset + 8],
            &0x100_0010u64.to_le_bytes()
        );
        assert_eq!(notes[1].desc, &[1, 2, 3]);
    }

    #[test]
    fn rejects_truncated_input_without_panicking() {
        let elf = build(&[], &[("Xen", 18, vec![0; 4])], 0);
        for n in 0..elf.len() {
            if let Ok(e) = Elf::parse(&elf[..n]) {
                let _ = e.notes();
            }
        }
        assert!(Elf::parse(b"\x7fELF\x01").is_err());
    }
}
