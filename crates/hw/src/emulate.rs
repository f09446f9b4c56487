//! The few instructions popek finishes itself when the host's KVM reports
//! an emulation failure for them.
//!
//! A software KVM such as `kvm_pvm` runs the guest kernel (CPL 0) through
//! its own instruction emulator, which lacks some instructions: LAR, LSL,
//! VERR, VERW, RDRAND, RDSEED and CMPXCHG16B among them. On hardware VT
//! they never reach the VMM. Rather than letting a correct guest die on
//! such a host, the `hw` engine executes them here on the vCPU state,
//! exactly as the SDM describes, and resumes. Anything else stays an
//! emulation-failure report.
//!
//! Only register and memory operands through the guest's current paging
//! are supported; the descriptor tables are read through the guest's
//! linear addresses.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use popek_cpu::state::flags;
use popek_cpu::CpuState;

/// Reads and writes guest memory at linear addresses.
pub trait LinearRead {
    /// Fills `buf` from linear address `addr`, or `None` where unmapped.
    fn read_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()>;
    /// Stores `data` at linear address `addr`, or `None` where unmapped
    /// (then nothing is stored).
    fn write_linear(&mut self, addr: u64, data: &[u8]) -> Option<()>;
}

fn gpr_index(r: Register) -> Option<usize> {
    let full = r.full_register();
    if (Register::RAX..=Register::R15).contains(&full) {
        Some(full as usize - Register::RAX as usize)
    } else {
        None
    }
}

fn read_reg(s: &CpuState, r: Register) -> Option<u64> {
    let v = s.gpr[gpr_index(r)?];
    Some(match r.size() {
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    })
}

fn write_reg(s: &mut CpuState, r: Register, v: u64) -> Option<()> {
    let i = gpr_index(r)?;
    s.gpr[i] = match r.size() {
        2 => (s.gpr[i] & !0xffff) | (v & 0xffff),
        4 => v & 0xffff_ffff, // 32-bit writes zero-extend (all modes popek runs hw in)
        8 => v,
        _ => return None,
    };
    Some(())
}

/// The descriptor a selector names (GDT or LDT), or `None` when it is
/// null or outside its table.
fn descriptor(s: &CpuState, sel: u16, mem: &mut dyn LinearRead) -> Option<(u32, u32)> {
    if sel & !3 == 0 {
        return None;
    }
    let (base, limit) = if sel & 4 != 0 {
        if !s.ldtr.present() {
            return None;
        }
        (s.ldtr.base, s.ldtr.limit)
    } else {
        (s.gdtr.base, u32::from(s.gdtr.limit))
    };
    let off = u32::from(sel & !7);
    if off + 7 > limit {
        return None;
    }
    let mut d = [0u8; 8];
    mem.read_linear(base + u64::from(off), &mut d)?;
    Some((
        u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
        u32::from_le_bytes([d[4], d[5], d[6], d[7]]),
    ))
}

/// LAR/LSL validity: whether the descriptor may be examined at this CPL
/// and RPL, for LAR (`lar = true`) or LSL.
fn visible(s: &CpuState, sel: u16, lo_hi: (u32, u32), lar: bool) -> bool {
    let hi = lo_hi.1;
    let long = s.efer & (1 << 10) != 0;
    let typ = (hi >> 8) & 0xf;
    let code_data = hi & (1 << 12) != 0;
    let dpl = ((hi >> 13) & 3) as u8;
    if code_data {
        let conforming_code = typ & 0b1100 == 0b1100;
        if conforming_code {
            return true;
        }
        let cpl = s.cpl();
        let rpl = (sel & 3) as u8;
        return dpl >= cpl.max(rpl);
    }
    let ok_type = match (long, lar) {
        (true, true) => matches!(typ, 2 | 9 | 0xb | 0xc),
        (true, false) => matches!(typ, 2 | 9 | 0xb),
        (false, true) => matches!(typ, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc),
        (false, false) => matches!(typ, 1 | 2 | 3 | 9 | 0xb),
    };
    if !ok_type {
        return false;
    }
    let cpl = s.cpl();
    let rpl = (sel & 3) as u8;
    dpl >= cpl.max(rpl)
}

/// The linear address of the instruction's memory operand `op`.
fn mem_addr(s: &CpuState, insn: &Instruction, op: u32) -> Option<u64> {
    insn.virtual_address(op, 0, |reg, _, _| match reg {
        Register::None => Some(0),
        Register::ES | Register::CS | Register::SS | Register::DS => {
            let i = [Register::ES, Register::CS, Register::SS, Register::DS]
                .iter()
                .position(|&r| r == reg)?;
            Some(s.seg[i].base)
        }
        Register::FS => Some(s.seg[4].base),
        Register::GS => Some(s.seg[5].base),
        Register::RIP | Register::EIP => Some(insn.next_ip()),
        r => read_reg(s, r),
    })
}

/// The 16-bit selector operand `op` (register or memory).
fn selector(s: &CpuState, insn: &Instruction, op: u32, mem: &mut dyn LinearRead) -> Option<u16> {
    match insn.op_kind(op) {
        OpKind::Register => Some(read_reg(s, insn.op_register(op))? as u16),
        OpKind::Memory => {
            let mut b = [0u8; 2];
            mem.read_linear(mem_addr(s, insn, op)?, &mut b)?;
            Some(u16::from_le_bytes(b))
        }
        _ => None,
    }
}

/// Executes the instruction at the start of `bytes` on `s` (RIP advanced)
/// if it is one popek finishes itself (LAR, LSL, VERR, VERW, RDRAND,
/// RDSEED, CMPXCHG16B). Returns its mnemonic, or `None` (and leaves `s`
/// alone) when it is not, or when finishing it would need an exception
/// (the failure report then stands).
pub fn emulate(
    s: &mut CpuState,
    bytes: &[u8],
    bitness: u32,
    mem: &mut dyn LinearRead,
) -> Option<&'static str> {
    let mut dec = Decoder::with_ip(bitness, bytes, s.rip, DecoderOptions::NONE);
    let insn: Instruction = dec.decode();
    if insn.is_invalid() || insn.has_lock_prefix() && insn.mnemonic() != Mnemonic::Cmpxchg16b {
        return None;
    }
    let lar = match insn.mnemonic() {
        Mnemonic::Lar => true,
        Mnemonic::Lsl => false,
        Mnemonic::Verr | Mnemonic::Verw => return verify(s, &insn, mem),
        Mnemonic::Rdrand | Mnemonic::Rdseed => return random(s, &insn),
        Mnemonic::Cmpxchg16b => return cmpxchg16b(s, &insn, mem),
        _ => return None,
    };
    let sel = selector(s, &insn, 1, mem)?;
    let dest = insn.op0_register();
    let result = descriptor(s, sel, mem).filter(|d| visible(s, sel, *d, lar));
    match result {
        Some((lo, hi)) => {
            let v = if lar {
                let mask = if dest.size() == 2 {
                    0xff00
                } else {
                    0x00f0_ff00
                };
                u64::from(hi & mask)
            } else {
                let raw = (lo & 0xffff) | (hi & 0x000f_0000);
                let lim = if hi & (1 << 23) != 0 {
                    (raw << 12) | 0xfff
                } else {
                    raw
                };
                u64::from(lim)
            };
            write_reg(s, dest, v)?;
            s.rflags |= u64::from(flags::ZF);
        }
        None => s.rflags &= !u64::from(flags::ZF),
    }
    s.rip = insn.next_ip();
    Some(if lar { "lar" } else { "lsl" })
}

/// VERR/VERW: ZF set when the segment could be read (written) at this CPL
/// with the selector's RPL (SDM: readable code or any data for VERR,
/// writable data for VERW; non-conforming segments need DPL ≥ max(CPL,
/// RPL)).
fn verify(s: &mut CpuState, insn: &Instruction, mem: &mut dyn LinearRead) -> Option<&'static str> {
    let write = insn.mnemonic() == Mnemonic::Verw;
    let sel = selector(s, insn, 0, mem)?;
    let ok = descriptor(s, sel, mem).is_some_and(|(_, hi)| {
        let code_data = hi & (1 << 12) != 0;
        let code = hi & (1 << 11) != 0;
        let typ = (hi >> 8) & 0xf;
        let dpl = ((hi >> 13) & 3) as u8;
        let conforming = code && typ & 4 != 0;
        let usable = if write {
            !code && typ & 2 != 0
        } else {
            !code || typ & 2 != 0
        };
        let privilege = conforming || dpl >= s.cpl().max((sel & 3) as u8);
        code_data && usable && privilege
    });
    if ok {
        s.rflags |= u64::from(flags::ZF);
    } else {
        s.rflags &= !u64::from(flags::ZF);
    }
    s.rip = insn.next_ip();
    Some(if write { "verw" } else { "verr" })
}

/// RDRAND/RDSEED: random bits from the host (`getrandom`), CF = 1, the
/// other arithmetic flags clear.
fn random(s: &mut CpuState, insn: &Instruction) -> Option<&'static str> {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid buffer of 8 bytes for the call.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
    if n != b.len() as isize {
        return None;
    }
    write_reg(s, insn.op0_register(), u64::from_le_bytes(b))?;
    s.rflags = (s.rflags & !u64::from(flags::ARITH)) | u64::from(flags::CF);
    s.rip = insn.next_ip();
    Some(if insn.mnemonic() == Mnemonic::Rdrand {
        "rdrand"
    } else {
        "rdseed"
    })
}

/// CMPXCHG16B m128: RDX:RAX against the memory; equal: RCX:RBX stored, ZF
/// set; else the memory loaded into RDX:RAX, ZF clear. (One vCPU: nothing
/// else can touch the memory in between.) A misaligned operand would be
/// #GP: left to the failure report.
fn cmpxchg16b(
    s: &mut CpuState,
    insn: &Instruction,
    mem: &mut dyn LinearRead,
) -> Option<&'static str> {
    let addr = mem_addr(s, insn, 0)?;
    if addr % 16 != 0 {
        return None;
    }
    let mut m = [0u8; 16];
    mem.read_linear(addr, &mut m)?;
    let lo = u64::from_le_bytes(m[..8].try_into().ok()?);
    let hi = u64::from_le_bytes(m[8..].try_into().ok()?);
    if (lo, hi) == (s.gpr[0], s.gpr[2]) {
        let mut new = [0u8; 16];
        new[..8].copy_from_slice(&s.gpr[3].to_le_bytes());
        new[8..].copy_from_slice(&s.gpr[1].to_le_bytes());
        mem.write_linear(addr, &new)?;
        s.rflags |= u64::from(flags::ZF);
    } else {
        // The locked access writes the old value back.
        mem.write_linear(addr, &m)?;
        s.gpr[0] = lo;
        s.gpr[2] = hi;
        s.rflags &= !u64::from(flags::ZF);
    }
    s.rip = insn.next_ip();
    Some("cmpxchg16b")
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_cpu::state::{attr, seg, Segment, TableReg};

    struct Mem(Vec<u8>);
    impl LinearRead for Mem {
        fn read_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
            let a = addr as usize;
            buf.copy_from_slice(self.0.get(a..a + buf.len())?);
            Some(())
        }
        fn write_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
            let a = addr as usize;
            self.0.get_mut(a..a + data.len())?.copy_from_slice(data);
            Some(())
        }
    }

    #[test]
    fn verr_and_verw_follow_type_and_privilege() {
        let (mut s, mut mem) = setup();
        for (sel, verr, verw) in [
            (0x08u64, true, false),
            (0x10, true, true),
            (0x18, true, true),
            (0x20, false, false),
            (0, false, false),
        ] {
            s.gpr[0] = sel;
            // verr ax / verw ax
            assert_eq!(
                emulate(&mut s, &[0x0f, 0x00, 0xe0], 64, &mut mem),
                Some("verr")
            );
            assert_eq!(s.rflags & u64::from(flags::ZF) != 0, verr, "verr {sel:#x}");
            assert_eq!(
                emulate(&mut s, &[0x0f, 0x00, 0xe8], 64, &mut mem),
                Some("verw")
            );
            assert_eq!(s.rflags & u64::from(flags::ZF) != 0, verw, "verw {sel:#x}");
        }
        // RPL 3 cannot see the DPL-0 data segment.
        s.gpr[0] = 0x13;
        emulate(&mut s, &[0x0f, 0x00, 0xe0], 64, &mut mem).unwrap();
        assert_eq!(s.rflags & u64::from(flags::ZF), 0);
    }

    #[test]
    fn rdrand_sets_cf_and_fills_the_register() {
        let (mut s, mut mem) = setup();
        s.rflags |= u64::from(flags::ZF | flags::OF);
        // rdrand rax
        let mut seen = 0;
        for _ in 0..4 {
            assert_eq!(
                emulate(&mut s, &[0x48, 0x0f, 0xc7, 0xf0], 64, &mut mem),
                Some("rdrand")
            );
            seen |= s.gpr[0];
        }
        assert_eq!(s.rflags & u64::from(flags::ARITH), u64::from(flags::CF));
        assert_ne!(seen, 0, "random bits");
    }

    #[test]
    fn cmpxchg16b_swaps_or_loads() {
        let (mut s, mut mem) = setup();
        mem.0[0x1800..0x1810].copy_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
        s.gpr[6] = 0x1800; // rsi
        (s.gpr[0], s.gpr[2], s.gpr[3], s.gpr[1]) = (1, 2, 0x33, 0x44);
        // lock cmpxchg16b [rsi]
        let code = [0xf0, 0x48, 0x0f, 0xc7, 0x0e];
        assert_eq!(emulate(&mut s, &code, 64, &mut mem), Some("cmpxchg16b"));
        assert_ne!(s.rflags & u64::from(flags::ZF), 0);
        assert_eq!(mem.0[0x1800], 0x33);
        assert_eq!(mem.0[0x1808], 0x44);
        s.rip = 0x100;
        (s.gpr[0], s.gpr[2]) = (9, 9);
        emulate(&mut s, &code, 64, &mut mem).unwrap();
        assert_eq!(s.rflags & u64::from(flags::ZF), 0);
        assert_eq!((s.gpr[0], s.gpr[2]), (0x33, 0x44));
    }

    fn setup() -> (CpuState, Mem) {
        let mut mem = Mem(vec![0; 0x2000]);
        for (i, d) in [
            0u64,
            0x00af_9b00_0000_ffff, // 0x08 code64 DPL0
            0x00cf_9300_0000_ffff, // 0x10 data DPL0
            0x00cf_f300_0000_ffff, // 0x18 data DPL3
            0x0000_8900_1000_0067, // 0x20 64-bit TSS, available, byte limit 0x67
        ]
        .iter()
        .enumerate()
        {
            mem.0[0x1000 + i * 8..0x1000 + i * 8 + 8].copy_from_slice(&d.to_le_bytes());
        }
        let mut s = CpuState::flat_protected(0x08, 0x10);
        s.efer = 0x500;
        s.seg[seg::CS].attr = (s.seg[seg::CS].attr & !attr::DB) | attr::L;
        s.gdtr = TableReg {
            base: 0x1000,
            limit: 39,
        };
        s.rip = 0x100;
        (s, mem)
    }

    #[test]
    fn lar_of_kernel_code_sets_zf_and_access_rights() {
        let (mut s, mut mem) = setup();
        s.gpr[0] = 0x08;
        // lar edx, eax
        assert_eq!(
            emulate(&mut s, &[0x0f, 0x02, 0xd0], 64, &mut mem),
            Some("lar")
        );
        assert_eq!(s.gpr[2], 0x00af_9b00 & 0x00f0_ff00);
        assert_ne!(s.rflags & u64::from(flags::ZF), 0);
        assert_eq!(s.rip, 0x103);
    }

    #[test]
    fn lar_of_null_or_out_of_range_clears_zf() {
        let (mut s, mut mem) = setup();
        s.rflags |= u64::from(flags::ZF);
        s.gpr[2] = 0x55;
        s.gpr[0] = 0;
        emulate(&mut s, &[0x0f, 0x02, 0xd0], 64, &mut mem).unwrap();
        assert_eq!(s.rflags & u64::from(flags::ZF), 0);
        assert_eq!(s.gpr[2], 0x55, "destination unchanged");
        s.gpr[0] = 0x40;
        emulate(&mut s, &[0x0f, 0x02, 0xd0], 64, &mut mem).unwrap();
        assert_eq!(s.rflags & u64::from(flags::ZF), 0);
    }

    #[test]
    fn lsl_expands_granular_limits_and_reads_tss() {
        let (mut s, mut mem) = setup();
        s.gpr[1] = 0x10;
        // lsl eax, ecx
        assert_eq!(
            emulate(&mut s, &[0x0f, 0x03, 0xc1], 64, &mut mem),
            Some("lsl")
        );
        assert_eq!(s.gpr[0], 0xffff_ffff);
        s.gpr[1] = 0x20;
        emulate(&mut s, &[0x0f, 0x03, 0xc1], 64, &mut mem).unwrap();
        assert_eq!(s.gpr[0], 0x67);
    }

    #[test]
    fn privilege_hides_more_privileged_descriptors() {
        let (mut s, mut mem) = setup();
        // At CPL 3, the DPL-0 data segment is invisible; the DPL-3 one is not.
        s.seg[seg::SS] = Segment::flat32(0x1b, false);
        s.gpr[0] = 0x10;
        emulate(&mut s, &[0x0f, 0x02, 0xd0], 64, &mut mem).unwrap();
        assert_eq!(s.rflags & u64::from(flags::ZF), 0);
        s.gpr[0] = 0x1b;
        emulate(&mut s, &[0x0f, 0x02, 0xd0], 64, &mut mem).unwrap();
        assert_ne!(s.rflags & u64::from(flags::ZF), 0);
    }

    #[test]
    fn other_instructions_are_left_alone() {
        let (mut s, mut mem) = setup();
        let before = s.clone();
        // cpuid
        assert_eq!(emulate(&mut s, &[0x0f, 0xa2], 64, &mut mem), None);
        assert_eq!(s, before);
    }
}
