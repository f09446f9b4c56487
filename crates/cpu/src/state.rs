//! Architectural state of one x86 CPU, as plain data.
//!
//! `CpuState` is `#[repr(C)]` so that emitted host code (the binary
//! translator) can address its fields at fixed offsets, and it serializes to
//! an engine-neutral form for snapshots and migration. Registers are stored
//! 64 bits wide from the start; 32-bit code uses the low halves.

use serde::{Deserialize, Serialize};

use crate::vendor::Vendor;

/// EFLAGS bits.
pub mod flags {
    /// Carry.
    pub const CF: u32 = 1 << 0;
    /// Always-one reserved bit 1.
    pub const FIXED1: u32 = 1 << 1;
    /// Parity.
    pub const PF: u32 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u32 = 1 << 4;
    /// Zero.
    pub const ZF: u32 = 1 << 6;
    /// Sign.
    pub const SF: u32 = 1 << 7;
    /// Trap (single step).
    pub const TF: u32 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u32 = 1 << 9;
    /// Direction.
    pub const DF: u32 = 1 << 10;
    /// Overflow.
    pub const OF: u32 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u32 = 3 << 12;
    /// Nested task.
    pub const NT: u32 = 1 << 14;
    /// Resume.
    pub const RF: u32 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u32 = 1 << 17;
    /// Alignment check.
    pub const AC: u32 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u32 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u32 = 1 << 20;
    /// CPUID available.
    pub const ID: u32 = 1 << 21;
    /// The six arithmetic status flags.
    pub const ARITH: u32 = CF | PF | AF | ZF | SF | OF;
}

/// Control register bits.
pub mod cr {
    /// CR0: protection enable.
    pub const CR0_PE: u64 = 1 << 0;
    /// CR0: monitor coprocessor.
    pub const CR0_MP: u64 = 1 << 1;
    /// CR0: x87 emulation.
    pub const CR0_EM: u64 = 1 << 2;
    /// CR0: task switched.
    pub const CR0_TS: u64 = 1 << 3;
    /// CR0: extension type (hard-wired to 1 since the i486).
    pub const CR0_ET: u64 = 1 << 4;
    /// CR0: numeric error.
    pub const CR0_NE: u64 = 1 << 5;
    /// CR0: write protect.
    pub const CR0_WP: u64 = 1 << 16;
    /// CR0: alignment mask.
    pub const CR0_AM: u64 = 1 << 18;
    /// CR0: not write-through.
    pub const CR0_NW: u64 = 1 << 29;
    /// CR0: cache disable.
    pub const CR0_CD: u64 = 1 << 30;
    /// CR0: paging.
    pub const CR0_PG: u64 = 1 << 31;
    /// CR4: virtual-8086 mode extensions.
    pub const CR4_VME: u64 = 1 << 0;
    /// CR4: protected-mode virtual interrupts.
    pub const CR4_PVI: u64 = 1 << 1;
    /// CR4: time stamp disable (RDTSC privileged).
    pub const CR4_TSD: u64 = 1 << 2;
    /// CR4: debugging extensions.
    pub const CR4_DE: u64 = 1 << 3;
    /// CR4: page size extension (4 MiB pages).
    pub const CR4_PSE: u64 = 1 << 4;
    /// CR4: physical address extension.
    pub const CR4_PAE: u64 = 1 << 5;
    /// CR4: machine check enable.
    pub const CR4_MCE: u64 = 1 << 6;
    /// CR4: page global enable.
    pub const CR4_PGE: u64 = 1 << 7;
    /// CR4: performance counter enable.
    pub const CR4_PCE: u64 = 1 << 8;
    /// CR4: FXSAVE/FXRSTOR and SSE enabled.
    pub const CR4_OSFXSR: u64 = 1 << 9;
    /// CR4: unmasked SIMD exceptions.
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    /// CR4: user-mode instruction prevention.
    pub const CR4_UMIP: u64 = 1 << 11;
}

/// Segment register numbers in x86 encoding order.
pub mod seg {
    /// ES.
    pub const ES: usize = 0;
    /// CS.
    pub const CS: usize = 1;
    /// SS.
    pub const SS: usize = 2;
    /// DS.
    pub const DS: usize = 3;
    /// FS.
    pub const FS: usize = 4;
    /// GS.
    pub const GS: usize = 5;
}

/// General register numbers in x86 encoding order.
pub mod reg {
    /// RAX.
    pub const AX: usize = 0;
    /// RCX.
    pub const CX: usize = 1;
    /// RDX.
    pub const DX: usize = 2;
    /// RBX.
    pub const BX: usize = 3;
    /// RSP.
    pub const SP: usize = 4;
    /// RBP.
    pub const BP: usize = 5;
    /// RSI.
    pub const SI: usize = 6;
    /// RDI.
    pub const DI: usize = 7;
}

/// A segment register: the visible selector and the hidden descriptor cache.
///
/// `attr` uses the VMX access-rights layout: bits 0–3 type, 4 S (code/data),
/// 5–6 DPL, 7 P, 12 AVL, 13 L, 14 D/B, 15 G. `limit` is the expanded byte
/// limit (granularity already applied).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Visible selector.
    pub selector: u16,
    /// Access rights (VMX layout).
    pub attr: u16,
    /// Byte-granular limit.
    pub limit: u32,
    /// Linear base address.
    pub base: u64,
}

/// Segment attribute bits (VMX access-rights layout).
pub mod attr {
    /// Accessed (type bit 0).
    pub const ACCESSED: u16 = 1;
    /// Data: writable; code: readable (type bit 1).
    pub const RW: u16 = 1 << 1;
    /// Data: expand-down; code: conforming (type bit 2).
    pub const DC: u16 = 1 << 2;
    /// Code segment (type bit 3).
    pub const CODE: u16 = 1 << 3;
    /// Code/data (not system) descriptor.
    pub const S: u16 = 1 << 4;
    /// Present.
    pub const P: u16 = 1 << 7;
    /// Available for software.
    pub const AVL: u16 = 1 << 12;
    /// 64-bit code.
    pub const L: u16 = 1 << 13;
    /// Default operation size / big.
    pub const DB: u16 = 1 << 14;
    /// Granularity.
    pub const G: u16 = 1 << 15;
}

impl Segment {
    /// A real-mode segment for `selector`: base = selector × 16, limit 64 KiB.
    pub fn real(selector: u16) -> Segment {
        Segment {
            selector,
            attr: attr::P | attr::S | attr::RW | attr::ACCESSED,
            limit: 0xffff,
            base: (selector as u64) << 4,
        }
    }

    /// A flat 4 GiB 32-bit segment: code (execute/read) or data (read/write).
    pub fn flat32(selector: u16, code: bool) -> Segment {
        let dpl = (selector & 3) << 5;
        let ty = if code {
            attr::CODE | attr::RW
        } else {
            attr::RW
        };
        Segment {
            selector,
            attr: ty | attr::ACCESSED | attr::S | attr::P | attr::DB | attr::G | dpl,
            limit: 0xffff_ffff,
            base: 0,
        }
    }

    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        ((self.attr >> 5) & 3) as u8
    }

    /// Present bit.
    pub fn present(&self) -> bool {
        self.attr & attr::P != 0
    }

    /// Descriptor type field (4 bits).
    pub fn typ(&self) -> u8 {
        (self.attr & 0xf) as u8
    }

    /// D/B bit: 32-bit default size.
    pub fn big(&self) -> bool {
        self.attr & attr::DB != 0
    }
}

/// GDTR or IDTR.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableReg {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes minus one.
    pub limit: u16,
}

/// An 80-bit x87 register value: 64-bit significand and sign + 15-bit exponent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct F80 {
    /// Significand with explicit integer bit (bit 63).
    pub mantissa: u64,
    /// Sign (bit 15) and biased exponent (bits 0–14).
    pub sign_exp: u16,
}

/// x87 FPU and SSE state: what FNSAVE/FXSAVE move.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// Physical registers R0–R7 (ST(i) is R[(TOP + i) & 7]).
    pub regs: [F80; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word, with TOP in bits 11–13.
    pub fsw: u16,
    /// Full tag word, two bits per physical register (11 = empty).
    pub ftw: u16,
    /// Last opcode (11 bits).
    pub fop: u16,
    /// Last instruction pointer offset.
    pub fip: u32,
    /// Last instruction pointer selector.
    pub fcs: u16,
    /// Last data pointer selector.
    pub fds: u16,
    /// Last data pointer offset.
    pub fdp: u32,
    /// SSE control/status.
    pub mxcsr: u32,
    /// XMM0–XMM15.
    pub xmm: [u128; 16],
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState {
            regs: [F80::default(); 8],
            fcw: 0x40,
            fsw: 0,
            ftw: 0x5555,
            fop: 0,
            fip: 0,
            fcs: 0,
            fds: 0,
            fdp: 0,
            mxcsr: 0x1f80,
            xmm: [0; 16],
        }
    }
}

/// Model-specific registers the CPU model implements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msrs {
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP.
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP.
    pub sysenter_eip: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// IA32_PAT.
    pub pat: u64,
    /// IA32_MISC_ENABLE.
    pub misc_enable: u64,
    /// IA32_TSC_AUX.
    pub tsc_aux: u64,
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK.
    pub sfmask: u64,
    /// KERNEL_GS_BASE.
    pub kernel_gs_base: u64,
    /// Offset added to the platform clock to give the TSC.
    pub tsc_offset: u64,
}

/// The architectural state of one CPU.
#[repr(C)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8–R15.
    pub gpr: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags. While the software CPU runs, the arithmetic flags may be held
    /// lazily; `Cpu::state()` always returns them materialized here.
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Segment; 6],
    /// LDT register.
    pub ldtr: Segment,
    /// Task register.
    pub tr: Segment,
    /// GDT register.
    pub gdtr: TableReg,
    /// IDT register.
    pub idtr: TableReg,
    /// CR0.
    pub cr0: u64,
    /// CR2 (page-fault linear address).
    pub cr2: u64,
    /// CR3 (page directory base).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority, long mode).
    pub cr8: u64,
    /// DR0–DR7 (DR4/DR5 alias DR6/DR7).
    pub dr: [u64; 8],
    /// IA32_EFER.
    pub efer: u64,
    /// Other MSRs.
    pub msr: Msrs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// The CPU is in the HLT state, waiting for an interrupt.
    pub halted: bool,
    /// Interrupts are inhibited for one instruction (after STI or a load of SS).
    pub interrupt_shadow: bool,
    /// The vendor profile: whose silicon the CPU follows where the manuals
    /// leave results undefined, and what CPUID reports
    /// ([`crate::vendor`]). Part of the state, so that a snapshot or a
    /// migration carries it.
    pub vendor: Vendor,
    /// The initial APIC ID CPUID reports (CPUID.1:EBX bits 31–24): the
    /// vCPU's index in the machine (absent from older snapshots: 0).
    #[serde(default)]
    pub apic_id: u32,
    /// NMIs are blocked: one is being handled (from its delivery to the
    /// next IRET).
    #[serde(default)]
    pub nmi_blocked: bool,
}

impl Default for CpuState {
    fn default() -> Self {
        Self::reset()
    }
}

impl CpuState {
    /// The state after RESET: real mode at F000:FFF0.
    pub fn reset() -> CpuState {
        let mut seg = [Segment::real(0); 6];
        seg[seg::CS] = Segment {
            selector: 0xf000,
            base: 0xffff_0000,
            limit: 0xffff,
            attr: attr::P | attr::S | attr::CODE | attr::RW | attr::ACCESSED,
        };
        CpuState {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: flags::FIXED1 as u64,
            seg,
            ldtr: Segment {
                attr: attr::P | 2,
                limit: 0xffff,
                ..Segment::default()
            },
            tr: Segment {
                attr: attr::P | 3,
                limit: 0xffff,
                ..Segment::default()
            },
            gdtr: TableReg {
                base: 0,
                limit: 0xffff,
            },
            idtr: TableReg {
                base: 0,
                limit: 0xffff,
            },
            cr0: cr::CR0_ET | cr::CR0_CD | cr::CR0_NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            dr: [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400],
            efer: 0,
            msr: Msrs {
                apic_base: 0xfee0_0900,
                pat: 0x0007_0406_0007_0406,
                ..Msrs::default()
            },
            fpu: FpuState::default(),
            halted: false,
            interrupt_shadow: false,
            vendor: Vendor::host(),
            apic_id: 0,
            nmi_blocked: false,
        }
    }

    /// A flat 32-bit protected-mode state (paging off, interrupts off) with
    /// the given code and data selectors, as Multiboot and the Linux 32-bit
    /// boot protocol require.
    pub fn flat_protected(cs: u16, ds: u16) -> CpuState {
        let mut s = CpuState::reset();
        s.cr0 = cr::CR0_PE | cr::CR0_ET;
        s.seg = [Segment::flat32(ds, false); 6];
        s.seg[seg::CS] = Segment::flat32(cs, true);
        s.rip = 0;
        s
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr::CR0_PE == 0 {
            0
        } else if self.rflags & flags::VM as u64 != 0 {
            3
        } else {
            self.seg[seg::SS].dpl()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable_for_translated_code() {
        // The binary translator addresses these at fixed offsets.
        assert_eq!(std::mem::offset_of!(CpuState, gpr), 0);
        assert_eq!(std::mem::offset_of!(CpuState, rip), 128);
        assert_eq!(std::mem::offset_of!(CpuState, rflags), 136);
        assert_eq!(std::mem::offset_of!(CpuState, seg), 144);
    }

    #[test]
    fn state_serializes_round_trip() {
        let mut s = CpuState::flat_protected(0x10, 0x18);
        s.gpr[3] = 0x1234;
        s.fpu.regs[2].mantissa = 0x8000_0000_0000_0001;
        let json = serde_json::to_string(&s).unwrap();
        let back: CpuState = serde_json::from_str(&json).unwrap();
        assert_eq!(s, back);
    }

    #[test]
    fn cpl_follows_mode() {
        let mut s = CpuState::reset();
        assert_eq!(s.cpl(), 0);
        s = CpuState::flat_protected(0x1b, 0x23);
        assert_eq!(s.cpl(), 3);
    }
}
