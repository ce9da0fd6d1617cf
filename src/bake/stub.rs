//! The entry stubs, hand-assembled.
//!
//! - [`entry_stub`], 32-bit: the hypervisor enters it as it would enter the kernel's PVH entry
//!   (protected mode, paging off, `%ebx` = physical address of its `hvm_start_info`); it builds
//!   the baked start_info and jumps to the kernel's own entry. It uses no stack and touches only
//!   `%eax`, `%ebx`, `%ecx`, `%esi`, `%edi` and the direction flag; Linux's `pvh_start_xen` sets
//!   up everything else itself.
//! - [`pv_entry_stub`], 64-bit: Xen enters it as it would enter `startup_xen` (long mode,
//!   paging on, `%rsi` = virtual address of its PV `start_info`); it edits that start_info in
//!   place (the module, the command line) and jumps to `startup_xen`. It uses no stack, touches
//!   only `%rax`, `%rcx`, `%rdx`, `%rdi` and the direction flag, and leaves `%rsi` as it found it:
//!   `startup_xen` reads only `%rsi`.
//!
//! The machine code is written here byte by byte with its absolute addresses patched in, so the
//! bake needs neither an assembler nor `unsafe`.

use std::collections::BTreeMap;

use super::pv::{PvStartInfo, MAX_GUEST_CMDLINE, SIF_MOD_START_PFN};
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

    fn imm64(&mut self, v: u64) -> &mut Self {
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

/// The addresses and sizes the PV stub is built for: virtual addresses, as the kernel's image
/// is mapped when Xen enters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvStubParams {
    /// The segment's command line buffer (the baked line at its start, NUL-terminated, zeros
    /// after it for at least [`MAX_GUEST_CMDLINE`] bytes); the stub merges the lines there.
    pub cmdline: u64,
    /// Length of the baked command line, without its NUL.
    pub baked_len: u32,
    /// The embedded initramfs.
    pub initramfs: u64,
    /// Its length.
    pub initramfs_len: u64,
    /// The kernel's own PV entry (`startup_xen`).
    pub entry: u64,
}

/// The largest stub [`pv_entry_stub`] emits.
pub const MAX_PV_STUB_SIZE: usize = 192;

/// The PV entry stub's machine code for `p`.
///
/// Linux reads the initrd from `mod_start` (through `__pa`, as a virtual address, unless
/// `SIF_MOD_START_PFN` says it is a frame number) and `mod_len`, and the command line from the
/// 1024-byte `cmd_line` array, all inside the start_info `%rsi` points at. The merged line is
/// built in the segment's buffer (only one of the two stubs ever runs) and copied back whole.
///
/// ```text
///        cld
///        movabs $INITRAMFS, %rax          ; mod_start = the initramfs's virtual address
///        mov    %rax, 112(%rsi)
///        movabs $INITRAMFS_LEN, %rax      ; mod_len = its length
///        mov    %rax, 120(%rsi)
///        andl   $~SIF_MOD_START_PFN, 48(%rsi)
///        movabs $CMDLINE+BAKED_LEN, %rdi  ; the end of the baked line
///        cmpb   $0, 128(%rsi)             ; the toolstack's line is empty: keep ours
///        je     back
///        movb   $' ', (%rdi)              ; a space after the baked line...
///        add    $SPACE, %rdi              ; ...kept only if the baked line is not empty
///        mov    %rsi, %rdx
///        lea    128(%rsi), %rsi           ; the toolstack's line
///        mov    $ROOM, %ecx               ; bytes left before MAX_GUEST_CMDLINE - 1
/// copy:  lodsb                            ; append it, bounded
///        test   %al, %al
///        je     term
///        stos   %al, (%rdi)
///        loop   copy
/// term:  movb   $0, (%rdi)
///        mov    %rdx, %rsi
/// back:  mov    %rsi, %rdx                ; copy the merged line (NUL-padded) over cmd_line
///        lea    128(%rsi), %rdi
///        movabs $CMDLINE, %rsi
///        mov    $MAX_GUEST_CMDLINE, %ecx
///        rep movsb
///        mov    %rdx, %rsi                ; %rsi = start_info again
///        movabs $ENTRY, %rax              ; the kernel's own PV entry
///        jmp    *%rax
/// ```
pub fn pv_entry_stub(p: &PvStubParams) -> Vec<u8> {
    let space = u32::from(p.baked_len > 0);
    let end = p.baked_len + space;
    // The bake refuses baked lines that leave no room; `loop` with %ecx = 0 would run 2^64 times.
    assert!(end < MAX_GUEST_CMDLINE - 1, "the baked line leaves no room");
    let room = MAX_GUEST_CMDLINE - 1 - end;
    let mod_start = offset_of!(PvStartInfo, mod_start) as u8;
    let mod_len = offset_of!(PvStartInfo, mod_len) as u8;
    let flags = offset_of!(PvStartInfo, flags) as u8;
    let cmd_line = (offset_of!(PvStartInfo, cmd_line) as u32).to_le_bytes();

    let mut a = Asm::new();
    a.op(&[0xfc]); // cld
    a.op(&[0x48, 0xb8]).imm64(p.initramfs); // movabs $initramfs,%rax
    a.op(&[0x48, 0x89, 0x46, mod_start]); // mov %rax,112(%rsi)
    a.op(&[0x48, 0xb8]).imm64(p.initramfs_len); // movabs $len,%rax
    a.op(&[0x48, 0x89, 0x46, mod_len]); // mov %rax,120(%rsi)
    a.op(&[0x83, 0x66, flags, !(SIF_MOD_START_PFN as u8)]); // andl $~8,48(%rsi)
    a.op(&[0x48, 0xbf])
        .imm64(p.cmdline + u64::from(p.baked_len)); // movabs $cmdline+len,%rdi
    a.op(&[0x80, 0xbe]).op(&cmd_line).op(&[0x00]); // cmpb $0,128(%rsi)
    a.jump8(0x74, "back"); // je back
    a.op(&[0xc6, 0x07, b' ']); // movb $' ',(%rdi)
    a.op(&[0x48, 0x83, 0xc7, space as u8]); // add $space,%rdi
    a.op(&[0x48, 0x89, 0xf2]); // mov %rsi,%rdx
    a.op(&[0x48, 0x8d, 0xb6]).op(&cmd_line); // lea 128(%rsi),%rsi
    a.op(&[0xb9]).imm32(room); // mov $room,%ecx
    a.label("copy");
    a.op(&[0xac]); // lods %ds:(%rsi),%al
    a.op(&[0x84, 0xc0]); // test %al,%al
    a.jump8(0x74, "term"); // je term
    a.op(&[0xaa]); // stos %al,%es:(%rdi)
    a.jump8(0xe2, "copy"); // loop copy
    a.label("term");
    a.op(&[0xc6, 0x07, 0x00]); // movb $0,(%rdi)
    a.op(&[0x48, 0x89, 0xd6]); // mov %rdx,%rsi
    a.label("back");
    a.op(&[0x48, 0x89, 0xf2]); // mov %rsi,%rdx
    a.op(&[0x48, 0x8d, 0xbe]).op(&cmd_line); // lea 128(%rsi),%rdi
    a.op(&[0x48, 0xbe]).imm64(p.cmdline); // movabs $cmdline,%rsi
    a.op(&[0xb9]).imm32(MAX_GUEST_CMDLINE); // mov $1024,%ecx
    a.op(&[0xf3, 0xa4]); // rep movsb
    a.op(&[0x48, 0x89, 0xd6]); // mov %rdx,%rsi
    a.op(&[0x48, 0xb8]).imm64(p.entry); // movabs $entry,%rax
    a.op(&[0xff, 0xe0]); // jmp *%rax
    let code = a.finish();
    assert!(code.len() <= MAX_PV_STUB_SIZE);
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

    /// `code` disassembled by binutils for `machine`, one instruction a line, spaces collapsed.
    fn objdump(code: &[u8], machine: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stub.bin");
        std::fs::write(&path, code).unwrap();
        let out = std::process::Command::new("objdump")
            .args(["-D", "-b", "binary", "-m", machine])
            .arg(&path)
            .output()
            .expect("objdump runs (Debian's binutils; scripts/install-vm.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .filter_map(|l| l.split('\t').nth(2))
            .map(|i| i.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    /// The stub disassembled by binutils reads as the listing in `entry_stub`'s doc.
    #[test]
    fn objdump_agrees() {
        let insns = objdump(&entry_stub(&params()), "i386");
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
        assert_eq!(insns, expected);
    }

    fn pv_params() -> PvStubParams {
        PvStubParams {
            cmdline: 0xffff_ffff_83e0_0800,
            baked_len: 40,
            initramfs: 0xffff_ffff_83e0_1000,
            initramfs_len: 0x12_3456,
            entry: 0xffff_ffff_8300_1234,
        }
    }

    #[test]
    fn pv_addresses_are_patched_in() {
        let code = pv_entry_stub(&pv_params());
        let has = |v: u64| code.windows(8).any(|w| w == v.to_le_bytes());
        for v in [
            0xffff_ffff_83e0_0800,
            0xffff_ffff_83e0_0800 + 40,
            0xffff_ffff_83e0_1000,
            0x12_3456,
            0xffff_ffff_8300_1234,
        ] {
            assert!(has(v), "{v:#x} missing");
        }
        // The room left for the toolstack's line: 1023 - 40 - 1.
        assert!(code.windows(4).any(|w| w == 982u32.to_le_bytes()));
        assert_eq!(&code[code.len() - 2..], &[0xff, 0xe0]);
        assert_eq!(pv_entry_stub(&pv_params()), code, "deterministic");
        // An empty baked line: no space is kept.
        let empty = pv_entry_stub(&PvStubParams {
            baked_len: 0,
            ..pv_params()
        });
        assert!(empty.windows(4).any(|w| w == [0x48, 0x83, 0xc7, 0x00]));
        assert!(empty.windows(4).any(|w| w == 1023u32.to_le_bytes()));
    }

    /// The PV stub disassembled by binutils reads as the listing in `pv_entry_stub`'s doc.
    #[test]
    fn pv_objdump_agrees() {
        let insns = objdump(&pv_entry_stub(&pv_params()), "i386:x86-64");
        let expected = [
            "cld",
            "movabs $0xffffffff83e01000,%rax",
            "mov %rax,0x70(%rsi)",
            "movabs $0x123456,%rax",
            "mov %rax,0x78(%rsi)",
            "andl $0xfffffff7,0x30(%rsi)",
            "movabs $0xffffffff83e00828,%rdi",
            "cmpb $0x0,0x80(%rsi)",
            "je 0x58",
            "movb $0x20,(%rdi)",
            "add $0x1,%rdi",
            "mov %rsi,%rdx",
            "lea 0x80(%rsi),%rsi",
            "mov $0x3d6,%ecx",
            "lods %ds:(%rsi),%al",
            "test %al,%al",
            "je 0x52",
            "stos %al,%es:(%rdi)",
            "loop 0x4a",
            "movb $0x0,(%rdi)",
            "mov %rdx,%rsi",
            "mov %rsi,%rdx",
            "lea 0x80(%rsi),%rdi",
            "movabs $0xffffffff83e00800,%rsi",
            "mov $0x400,%ecx",
            "rep movsb %ds:(%rsi),%es:(%rdi)",
            "mov %rdx,%rsi",
            "movabs $0xffffffff83001234,%rax",
            "jmp *%rax",
        ];
        assert_eq!(insns, expected);
    }

    #[test]
    #[should_panic(expected = "leaves no room")]
    fn pv_refuses_a_line_without_room() {
        pv_entry_stub(&PvStubParams {
            baked_len: MAX_GUEST_CMDLINE - 2,
            ..pv_params()
        });
    }
}
