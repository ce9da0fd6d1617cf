//! The 32-bit entry stub, hand-assembled: the hypervisor enters it as it would enter the
//! kernel's PVH entry (protected mode, paging off, `%ebx` = physical address of its
//! `hvm_start_info`); it builds the baked start_info and jumps to the kernel's own entry.
//!
//! The machine code is written here byte by byte with its absolute addresses patched in, so the
//! bake needs neither an assembler nor `unsafe`. The stub uses no stack and touches only
//! `%eax`, `%ebx`, `%ecx`, `%esi`, `%edi` and the direction flag; Linux's `pvh_start_xen` sets up
//! everything else itself.

use std::collections::BTreeMap;

use super::pvh::{HvmStartInfo, COMMAND_LINE_SIZE, START_INFO_V0_SIZE, START_INFO_VERSION};
use std::mem::offset_of;

/// The addresses and sizes the stub is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StubParams {
    /// Physical address of the baked `hvm_start_info`.
    pub start_info: u32,
    /// Physical address of the baked module list (one entry).
    pub modlist: u32,
    /// Physical address of the command line buffer (`COMMAND_LINE_SIZE` bytes, the baked line
    /// at its start, NUL-terminated).
    pub cmdline: u32,
    /// Length of the baked command line, without its NUL.
    pub baked_len: u32,
    /// The kernel's own PVH entry point.
    pub entry: u32,
}

/// The largest stub [`entry_stub`] emits.
pub const MAX_STUB_SIZE: usize = 192;

/// A tiny assembler: bytes, labels and 8-bit relative jumps.
struct Asm {
    code: Vec<u8>,
    labels: BTreeMap<&'static str, usize>,
    fixups: Vec<(usize, &'static str)>,
}

impl Asm {
    fn new() -> Self {
        Asm {
            code: Vec::new(),
            labels: BTreeMap::new(),
            fixups: Vec::new(),
        }
    }

    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn imm32(&mut self, v: u32) -> &mut Self {
        self.op(&v.to_le_bytes())
    }

    fn label(&mut self, name: &'static str) {
        self.labels.insert(name, self.code.len());
    }

    /// A short jump (`opcode rel8`) to `target`.
    fn jump8(&mut self, opcode: u8, target: &'static str) {
        self.code.push(opcode);
        self.fixups.push((self.code.len(), target));
        self.code.push(0);
    }

    /// `movl $imm, addr` (C7 /0 with a 32-bit absolute address: modrm 0x05).
    fn store32(&mut self, addr: u32, value: u32) {
        self.op(&[0xc7, 0x05]).imm32(addr).imm32(value);
    }

    fn finish(mut self) -> Vec<u8> {
        for (at, target) in &self.fixups {
            let to = self.labels[target] as isize;
            let rel = to - (*at as isize + 1);
            self.code[*at] = i8::try_from(rel).expect("a short jump") as u8;
        }
        self.code
    }
}

/// The entry stub's machine code for `p`.
///
/// ```text
///        cld
///        mov   %ebx, %esi                 ; the hypervisor's start_info
///        mov   $START_INFO, %edi          ; ours
///        mov   $10, %ecx                  ; its first 40 bytes (version 0's layout)
///        rep movsl
///        cmpl  $0, 4(%ebx)                ; version 0 has no memmap fields:
///        je    v0
///        mov   $4, %cl                    ;   else copy them (16 more bytes)
///        rep movsl
///        movl  $1, START_INFO+4           ;   and claim only the version we copied
///        jmp   common
/// v0:    xor   %eax, %eax                 ;   clear memmap_paddr/entries/reserved
///        mov   $4, %cl
///        rep stosl
/// common:
///        movl  $1, START_INFO+12          ; nr_modules = 1
///        movl  $MODLIST, START_INFO+16    ; modlist_paddr = our entry (high half 0)
///        movl  $0, START_INFO+20
///        mov   $CMDLINE+BAKED_LEN, %edi   ; the end of the baked line
///        mov   24(%ebx), %esi             ; the hypervisor's cmdline_paddr
///        cmpl  $0, 28(%ebx)               ; above 4 GiB (unreachable without paging): skip
///        jne   done
///        test  %esi, %esi                 ; none: skip
///        jz    done
///        cmpb  $0, (%esi)                 ; empty: skip
///        je    done
///        movb  $' ', (%edi)               ; a space after the baked line...
///        add   $SPACE, %edi               ; ...kept only if the baked line is not empty
///        mov   $ROOM, %ecx                ; bytes left before COMMAND_LINE_SIZE - 1
/// copy:  lodsb                            ; append the hypervisor's line, bounded
///        test  %al, %al
///        jz    term
///        stosb
///        loop  copy
/// term:  movb  $0, (%edi)
/// done:  movl  $CMDLINE, START_INFO+24    ; cmdline_paddr = the merged line
///        movl  $0, START_INFO+28
///        mov   $START_INFO, %ebx
///        mov   $ENTRY, %eax               ; the kernel's own PVH entry
///        jmp   *%eax
/// ```
pub fn entry_stub(p: &StubParams) -> Vec<u8> {
    let field = |offset: usize| p.start_info + offset as u32;
    let space = u32::from(p.baked_len > 0);
    let end = p.baked_len + space;
    // The bake refuses baked lines that leave no room; `loop` with %ecx = 0 would run 2^32 times.
    assert!(end < COMMAND_LINE_SIZE - 1, "the baked line leaves no room");
    let room = COMMAND_LINE_SIZE - 1 - end;
    let v0_dwords = (START_INFO_V0_SIZE / 4) as u8;
    let rest_dwords = ((size_of::<HvmStartInfo>() - START_INFO_V0_SIZE) / 4) as u8;

    let mut a = Asm::new();
    a.op(&[0xfc]); // cld
    a.op(&[0x89, 0xde]); // mov %ebx,%esi
    a.op(&[0xbf]).imm32(p.start_info); // mov $start_info,%edi
    a.op(&[0xb9]).imm32(u32::from(v0_dwords)); // mov $10,%ecx
    a.op(&[0xf3, 0xa5]); // rep movsl
    a.op(&[0x83, 0x7b, offset_of!(HvmStartInfo, version) as u8, 0x00]); // cmpl $0,4(%ebx)
    a.jump8(0x74, "v0"); // je v0
    a.op(&[0xb1, rest_dwords]); // mov $4,%cl
    a.op(&[0xf3, 0xa5]); // rep movsl
    a.store32(field(offset_of!(HvmStartInfo, version)), START_INFO_VERSION);
    a.jump8(0xeb, "common"); // jmp common
    a.label("v0");
    a.op(&[0x31, 0xc0]); // xor %eax,%eax
    a.op(&[0xb1, rest_dwords]); // mov $4,%cl
    a.op(&[0xf3, 0xab]); // rep stos %eax,%es:(%edi)
    a.label("common");
    a.store32(field(offset_of!(HvmStartInfo, nr_modules)), 1);
    a.store32(field(offset_of!(HvmStartInfo, modlist_paddr)), p.modlist);
    a.store32(field(offset_of!(HvmStartInfo, modlist_paddr) + 4), 0);
    a.op(&[0xbf]).imm32(p.cmdline + p.baked_len); // mov $cmdline+len,%edi
    let cmdline = offset_of!(HvmStartInfo, cmdline_paddr) as u8;
    a.op(&[0x8b, 0x73, cmdline]); // mov 24(%ebx),%esi
    a.op(&[0x83, 0x7b, cmdline + 4, 0x00]); // cmpl $0,28(%ebx)
    a.jump8(0x75, "done"); // jne done
    a.op(&[0x85, 0xf6]); // test %esi,%esi
    a.jump8(0x74, "done"); // je done
    a.op(&[0x80, 0x3e, 0x00]); // cmpb $0,(%esi)
    a.jump8(0x74, "done"); // je done
    a.op(&[0xc6, 0x07, b' ']); // movb $' ',(%edi)
    a.op(&[0x83, 0xc7, space as u8]); // add $space,%edi
    a.op(&[0xb9]).imm32(room); // mov $room,%ecx
    a.label("copy");
    a.op(&[0xac]); // lods %ds:(%esi),%al
    a.op(&[0x84, 0xc0]); // test %al,%al
    a.jump8(0x74, "term"); // je term
    a.op(&[0xaa]); // stos %al,%es:(%edi)
    a.jump8(0xe2, "copy"); // loop copy
    a.label("term");
    a.op(&[0xc6, 0x07, 0x00]); // movb $0,(%edi)
    a.label("done");
    a.store32(field(offset_of!(HvmStartInfo, cmdline_paddr)), p.cmdline);
    a.store32(field(offset_of!(HvmStartInfo, cmdline_paddr) + 4), 0);
    a.op(&[0xbb]).imm32(p.start_info); // mov $start_info,%ebx
    a.op(&[0xb8]).imm32(p.entry); // mov $entry,%eax
    a.op(&[0xff, 0xe0]); // jmp *%eax
    let code = a.finish();
    assert!(code.len() <= MAX_STUB_SIZE);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> StubParams {
        StubParams {
            start_info: 0x3e0_0100,
            modlist: 0x3e0_0140,
            cmdline: 0x3e0_0800,
            baked_len: 40,
            entry: 0x100_0850,
        }
    }

    #[test]
    fn addresses_are_patched_in() {
        let code = entry_stub(&params());
        let has = |v: u32| code.windows(4).any(|w| w == v.to_le_bytes());
        for v in [
            0x3e0_0100,
            0x3e0_0140,
            0x3e0_0800,
            0x3e0_0800 + 40,
            0x100_0850,
        ] {
            assert!(has(v), "{v:#x} missing");
        }
        assert_eq!(&code[code.len() - 2..], &[0xff, 0xe0]);
        assert_eq!(entry_stub(&params()), code, "deterministic");
    }

    /// The stub disassembled by binutils reads as the listing in `entry_stub`'s doc.
    #[test]
    fn objdump_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stub.bin");
        std::fs::write(&path, entry_stub(&params())).unwrap();
        let out = std::process::Command::new("objdump")
            .args(["-D", "-b", "binary", "-m", "i386"])
            .arg(&path)
            .output()
            .expect("objdump runs (Debian's binutils; scripts/install-vm.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let insns: Vec<String> = text
            .lines()
            .filter_map(|l| l.split('\t').nth(2))
            .map(|i| i.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        let expected = [
            "cld",
            "mov %ebx,%esi",
            "mov $0x3e00100,%edi",
            "mov $0xa,%ecx",
            "rep movsl %ds:(%esi),%es:(%edi)",
            "cmpl $0x0,0x4(%ebx)",
            "je 0x25",
            "mov $0x4,%cl",
            "rep movsl %ds:(%esi),%es:(%edi)",
            "movl $0x1,0x3e00104",
            "jmp 0x2b",
            "xor %eax,%eax",
            "mov $0x4,%cl",
            "rep stos %eax,%es:(%edi)",
            "movl $0x1,0x3e0010c",
            "movl $0x3e00140,0x3e00110",
            "movl $0x0,0x3e00114",
            "mov $0x3e00828,%edi",
            "mov 0x18(%ebx),%esi",
            "cmpl $0x0,0x1c(%ebx)",
            "jne 0x76",
            "test %esi,%esi",
            "je 0x76",
            "cmpb $0x0,(%esi)",
            "je 0x76",
            "movb $0x20,(%edi)",
            "add $0x1,%edi",
            "mov $0x7d6,%ecx",
            "lods %ds:(%esi),%al",
            "test %al,%al",
            "je 0x73",
            "stos %al,%es:(%edi)",
            "loop 0x6b",
            "movb $0x0,(%edi)",
            "movl $0x3e00800,0x3e00118",
            "movl $0x0,0x3e0011c",
            "mov $0x3e00100,%ebx",
            "mov $0x1000850,%eax",
            "jmp *%eax",
        ];
        assert_eq!(insns, expected, "\n{text}");
    }
}
