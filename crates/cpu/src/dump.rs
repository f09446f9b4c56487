//! The CPU state in words, for the reports popek prints when a guest dies
//! or stops: one register dump and one disassembled instruction line, used
//! by every engine (a `Display` of [`CpuState`]).

use std::fmt;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

use crate::state::{attr, flags, seg, CpuState};

/// EFER.LMA: long mode is active.
const EFER_LMA: u64 = 1 << 10;

impl CpuState {
    /// Whether the vCPU runs 64-bit code (long mode with a 64-bit CS).
    pub fn in_64bit_code(&self) -> bool {
        self.efer & EFER_LMA != 0 && self.seg[seg::CS].attr & attr::L != 0
    }

    /// The default code size the vCPU decodes with: 64, 32 or 16 bits (the
    /// CS cache's D bit decides outside long mode, also in real mode, as on
    /// silicon; virtual-8086 mode is always 16).
    pub fn code_bits(&self) -> u32 {
        if self.in_64bit_code() {
            64
        } else if self.seg[seg::CS].big() && self.rflags & flags::VM as u64 == 0 {
            32
        } else {
            16
        }
    }

    /// `instruction at CS:IP: mnemonic [bytes]` for the instruction whose
    /// bytes (as read at CS:IP; possibly fewer than 15, or none) are given.
    pub fn instruction_line(&self, bytes: &[u8]) -> String {
        let cs = self.seg[seg::CS].selector;
        let at = if self.efer & EFER_LMA != 0 {
            format!("{cs:04x}:{:016x}", self.rip)
        } else {
            format!("{cs:04x}:{:08x}", self.rip as u32)
        };
        format!("instruction at {at}: {}", disassemble(bytes, self))
    }
}

/// `mnemonic [hex bytes]` for the instruction at the start of `bytes`,
/// decoded as the vCPU in state `s` would.
pub fn disassemble(bytes: &[u8], s: &CpuState) -> String {
    if bytes.is_empty() {
        return "(unreadable)".into();
    }
    let mut dec = Decoder::with_ip(s.code_bits(), bytes, s.rip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    dec.decode_out(&mut insn);
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    let used = insn.len().clamp(1, bytes.len());
    let hex: Vec<String> = bytes[..used].iter().map(|b| format!("{b:02x}")).collect();
    format!("{text} [{}]", hex.join(" "))
}

/// The registers, two-space indented: 64 bits wide in long mode, else 32.
impl fmt::Display for CpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.gpr;
        let sel = |i: usize| self.seg[i].selector;
        if self.efer & EFER_LMA != 0 {
            write!(
                f,
                "  RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n  \
                 RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n  \
                 R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n  \
                 R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n  \
                 RIP={:016x} RFLAGS={:08x} CPL={} CS={:04x}/{:04x} SS={:04x} DS={:04x} EFER={:x}\n  \
                 CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} GDTR={:x}/{:04x} IDTR={:x}/{:04x} TR={:04x}",
                g[0], g[3], g[1], g[2], g[6], g[7], g[5], g[4],
                g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15],
                self.rip, self.rflags, self.cpl(), sel(seg::CS), self.seg[seg::CS].attr,
                sel(seg::SS), sel(seg::DS), self.efer,
                self.cr0, self.cr2, self.cr3, self.cr4,
                self.gdtr.base, self.gdtr.limit, self.idtr.base, self.idtr.limit, self.tr.selector,
            )
        } else {
            let r = |i: usize| g[i] as u32;
            write!(
                f,
                "  EAX={:08x} EBX={:08x} ECX={:08x} EDX={:08x} ESI={:08x} EDI={:08x} EBP={:08x} ESP={:08x}\n  \
                 EIP={:08x} EFLAGS={:08x} CPL={} CS={:04x} SS={:04x} DS={:04x} ES={:04x}\n  \
                 CR0={:08x} CR2={:08x} CR3={:08x} CR4={:08x} GDTR={:08x}/{:04x} IDTR={:08x}/{:04x} TR={:04x}",
                r(0), r(3), r(1), r(2), r(6), r(7), r(5), r(4),
                self.rip as u32, self.rflags as u32, self.cpl(),
                sel(seg::CS), sel(seg::SS), sel(seg::DS), sel(seg::ES),
                self.cr0 as u32, self.cr2 as u32, self.cr3 as u32, self.cr4 as u32,
                self.gdtr.base as u32, self.gdtr.limit, self.idtr.base as u32, self.idtr.limit,
                self.tr.selector,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Segment;

    #[test]
    fn code_size_follows_the_cs_cache_and_long_mode() {
        let mut s = CpuState::reset();
        assert_eq!(s.code_bits(), 16);
        s = CpuState::flat_protected(8, 16);
        assert_eq!(s.code_bits(), 32);
        s.rflags |= flags::VM as u64;
        assert_eq!(s.code_bits(), 16);
        s.rflags &= !(flags::VM as u64);
        s.efer |= EFER_LMA;
        s.seg[seg::CS] = Segment {
            attr: s.seg[seg::CS].attr | attr::L,
            ..s.seg[seg::CS]
        };
        assert_eq!(s.code_bits(), 64);
    }

    #[test]
    fn the_dump_is_as_wide_as_the_mode() {
        let mut s = CpuState::flat_protected(8, 16);
        s.gpr[0] = 0x1234_5678;
        s.rip = 0x10_0000;
        let text = s.to_string();
        assert!(
            text.contains("EAX=12345678") && text.contains("EIP=00100000"),
            "{text}"
        );
        assert_eq!(
            s.instruction_line(&[0xeb, 0xfe, 0x90]),
            "instruction at 0008:00100000: jmp short 00100000h [eb fe]"
        );
        s.efer |= EFER_LMA;
        let text = s.to_string();
        assert!(text.contains("RAX=0000000012345678"), "{text}");
        assert_eq!(
            s.instruction_line(&[]),
            "instruction at 0008:0000000000100000: (unreadable)"
        );
    }
}
