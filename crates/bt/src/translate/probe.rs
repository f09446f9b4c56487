//! The inline TLB probe: the host code that turns a guest linear address
//! into a host pointer through the software TLB (with and without BMI2),
//! the shared out-of-line probes, and a memory access built on it.

use super::*;

/// What the inline TLB probe needs from the CPU (`popek_cpu::mmu::TlbLayout`
/// for the TU's privilege set).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// Address of entry 0 of the set (supervisor or user).
    pub set_base: u64,
    /// Entries (a power of two).
    pub entries: u32,
    /// log2 of the entry size.
    pub entry_shift: u32,
    /// Bytes from way 0 of an index to way 1 (the data sets are two-way).
    pub way_stride: i32,
    /// Offsets of the read tag, write tag and host address in an entry.
    pub read_tag: i32,
    /// See `read_tag`.
    pub write_tag: i32,
    /// See `read_tag`.
    pub host: i32,
    /// Where a slow-path exit leaves its access for the dispatcher: two
    /// u64, the linear address (bit 32: past 4 GiB) and `size | write << 8`;
    /// a third is scratch for two-access instructions (PUSH m32, CALL m32).
    pub exit_info: u64,
    /// The host has BMI2: the probe is flag-free (PEXT/PDEP, LEA, JRCXZ)
    /// and the guest flags stay in RFLAGS throughout.
    pub bmi2: bool,
    /// DIV/IDIV leave the flags as AMD processors do (AF set, SF/ZF/PF
    /// clear, CF/OF kept) rather than unchanged as Intel processors do:
    /// the CPU's vendor profile.
    pub amd_div_flags: bool,
    /// `extern "sysv64" fn(ctx, next_eip: u64, retired: u64) -> u64` that
    /// runs one instruction on the interpreter for [`Item::Interp1`] (1:
    /// it retired and EIP is `next_eip`, go on; 0: leave), and its first
    /// argument; 0: no such call-outs (they leave the CCF).
    pub interp1_fn: u64,
    /// See `interp1_fn`.
    pub interp1_ctx: u64,
}

/// Labels of the flag-free probe's masks (emitted after the code).
#[derive(Clone, Copy)]
pub(crate) struct Consts {
    /// TLB index bits of a linear address (dword).
    pub(crate) idx: CodeLabel,
    /// Page bits of a 33-bit address (qword).
    pub(crate) page: CodeLabel,
    /// Bit 32 (qword).
    pub(crate) bit32: CodeLabel,
    /// Bit 16 (qword).
    pub(crate) bit16: CodeLabel,
    /// The CCF's exit tail.
    pub(crate) tail: CodeLabel,
}

/// Guest linear address → R9, TLB entry → R10, host address → R11; jumps
/// to `miss` (guest flags saved in R12) unless the access can go straight
/// to host memory; then runs the instruction.
pub(crate) fn emit_probe(
    a: &mut CodeAssembler,
    m: &MemInsn,
    t: &Probe,
    miss: CodeLabel,
    consts: Consts,
) -> Result<(), IcedError> {
    if t.bmi2 {
        emit_probe_bmi2(a, m, t, miss, consts)?;
        return emit_access(a, m, t, consts.tail);
    }
    // Without BMI2 there are neither FS/GS nor 16-bit TUs.
    debug_assert!(m.seg_base.is_none() && !m.addr16);
    a.pushfq()?;
    a.pop(r12)?;
    emit_offset(a, m)?;
    a.mov(r10d, r9d)?;
    a.shr(r10d, 12)?;
    a.and(r10d, (t.entries - 1) as i32)?;
    a.shl(r10, t.entry_shift)?;
    a.mov(r11, t.set_base)?;
    a.add(r10, r11)?;
    a.mov(r11d, r9d)?;
    a.and(r11d, !0xfff)?;
    a.or(r11d, 1)?;
    let tag = if m.write { t.write_tag } else { t.read_tag };
    let mut hit = a.create_label();
    a.cmp(r11d, dword_ptr(r10 + tag))?;
    a.je(hit)?;
    a.add(r10, t.way_stride)?;
    a.cmp(r11d, dword_ptr(r10 + tag))?;
    a.jne(miss)?;
    a.set_label(&mut hit)?;
    a.mov(r11d, r9d)?;
    a.and(r11d, 0xfff)?;
    a.cmp(r11d, (0x1000 - m.size) as i32)?;
    a.ja(miss)?;
    a.add(r11, qword_ptr(r10 + t.host))?;
    if m.flags_live {
        a.push(r12)?;
        a.popfq()?;
    }
    emit_access(a, m, t, consts.tail)
}

/// A memory instruction whose probe is shared ([`share`]): the group's
/// head probes the span (a miss leaves before it: a slow path in `slow`)
/// and keeps the span's host address in its red-zone slot; a member takes
/// it from there. Then the access, at the span's address + the offset.
pub(crate) fn emit_shared(
    a: &mut CodeAssembler,
    m: &MemInsn,
    role: share::Share,
    t: &Probe,
    consts: Consts,
    slow: &mut Vec<(CodeLabel, u32, u32, u64)>,
) -> Result<(), IcedError> {
    let off = match role {
        share::Share::Head {
            low,
            size,
            write,
            slot,
        } => {
            let mut g = m.clone();
            g.disp = low as u32;
            g.size = size;
            g.write = write;
            let miss = a.create_label();
            emit_probe_bmi2(a, &g, t, miss, consts)?;
            slow.push((
                miss,
                m.eip,
                m.before,
                SHARED | (size as u64) << 16 | (write as u64) << 8,
            ));
            a.mov(qword_ptr(rsp - share::slot_offset(slot)), r11)?;
            m.disp as i32 - low
        }
        share::Share::Member { off, slot } => {
            a.mov(r11, qword_ptr(rsp - share::slot_offset(slot)))?;
            off
        }
    };
    if off != 0 {
        if m.op == MemOp::Insn && m.via.is_none() {
            // The offset in the instruction's own displacement ([r11 + off]:
            // the encoder picks disp8 or disp32): one instruction fewer.
            let mut ins = m.ins;
            ins.set_memory_displacement64(off as i64 as u64);
            ins.set_memory_displ_size(1);
            return a.add_instruction(ins);
        }
        a.lea(r11, qword_ptr(r11 + off))?;
    }
    emit_access(a, m, t, consts.tail)
}

/// The flag-free probe (BMI2): R9 = guest linear address, R10 = TLB entry,
/// R11 = host address on a hit; a miss jumps to `miss` with every guest
/// register and flag intact. One comparison covers both the tag and page
/// crossing: the tag must equal the page of the access's *last* byte | 1
/// (the entry is the first byte's, so a crossing access never matches).
/// Guest RCX waits in R12 while JRCXZ tests the difference.
pub(crate) fn emit_probe_bmi2(
    a: &mut CodeAssembler,
    m: &MemInsn,
    t: &Probe,
    miss: CodeLabel,
    consts: Consts,
) -> Result<(), IcedError> {
    emit_offset(a, m)?;
    if m.addr16 {
        a.movzx(r9d, r9w)?;
    }
    if let Some(off) = m.seg_base {
        // The offset's last byte must not pass the 4 GiB limit (FS/GS in
        // 32-bit code) or 0xffff (16-bit code: the limit is at least
        // that; beyond, the interpreter checks): bit 32 (16) of offset +
        // size - 1, kept in bit 32 of R9 (where it fails the tag
        // comparison), then linear = base + offset.
        if m.size > 1 {
            let bit = if m.addr16 { consts.bit16 } else { consts.bit32 };
            a.lea(r10, qword_ptr(r9 + (m.size as i32 - 1)))?;
            a.pext(r10, r10, qword_ptr(bit))?;
            a.pdep(r10, r10, qword_ptr(consts.bit32))?;
        }
        a.mov(r11d, dword_ptr(r15 + off))?;
        a.lea(r9d, dword_ptr(r9 + r11))?;
        if m.size > 1 {
            a.lea(r9, qword_ptr(r9 + r10))?;
        }
    }
    // Entry = set + index << shift (LEA scales: shift 3..=6).
    a.pext(r10d, r9d, dword_ptr(consts.idx))?;
    a.mov(r11, t.set_base)?;
    let s = t.entry_shift;
    if s > 3 {
        a.lea(r10, qword_ptr(r10 * 8))?;
    }
    let rest = if s > 3 { s - 3 } else { s };
    a.lea(r10, qword_ptr(r11 + r10 * (1u32 << rest)))?;
    // Page of the last byte, 33 bits (a wrap past 4 GiB never matches).
    a.lea(r11, qword_ptr(r9 + (m.size as i32 - 1)))?;
    a.pext(r11, r11, qword_ptr(consts.page))?;
    a.pdep(r11, r11, qword_ptr(consts.page))?;
    let tag = if m.write { t.write_tag } else { t.read_tag };
    a.mov(r12, rcx)?;
    a.mov(ecx, dword_ptr(r10 + tag))?;
    a.not(rcx)?;
    a.lea(rcx, qword_ptr(r11 + rcx + 2))?; // (page | 1) - tag
    let mut hit = a.create_label();
    a.jrcxz(hit)?;
    // Way 1 (only on a way-0 miss: the hit path is unchanged). A miss
    // leaves with guest RCX still in R12 (the stub restores it).
    a.lea(r10, qword_ptr(r10 + t.way_stride))?;
    a.mov(ecx, dword_ptr(r10 + tag))?;
    a.not(rcx)?;
    a.lea(rcx, qword_ptr(r11 + rcx + 2))?;
    a.jrcxz(hit)?;
    a.jmp(miss)?;
    a.set_label(&mut hit)?;
    a.mov(rcx, r12)?;
    // Host address = host page + (lin - page).
    a.not(r11)?;
    a.lea(r11, qword_ptr(r9 + r11 + 1))?;
    a.add_instruction(Instruction::with2(
        Code::Mov_r64_rm64,
        Register::R10,
        iced_x86::MemoryOperand::with_base_displ(Register::R10, t.host as i64),
    )?)?;
    a.lea(r11, qword_ptr(r10 + r11))
}

/// The access of a memory instruction whose probe hit (R11 = host
/// address); the guest flags are in RFLAGS.
pub(crate) fn emit_access(
    a: &mut CodeAssembler,
    m: &MemInsn,
    t: &Probe,
    tail: CodeLabel,
) -> Result<(), IcedError> {
    let scratch = t.exit_info + 16;
    // Flag-neutral code only around the instruction (MOV, LEA).
    match m.op {
        MemOp::Insn => match m.via {
            None => a.add_instruction(m.ins),
            Some(x) => {
                let mov = |d: Register, s: Register| Instruction::with2(Code::Mov_r64_rm64, d, s);
                a.add_instruction(mov(Register::R12, x)?)?;
                a.add_instruction(mov(x, Register::R11)?)?;
                a.add_instruction(m.ins)?;
                a.add_instruction(mov(x, Register::R12)?)
            }
        },
        MemOp::PushReg(r) => {
            let code = if m.size == 4 {
                Code::Mov_rm32_r32
            } else {
                Code::Mov_rm16_r16
            };
            a.add_instruction(Instruction::with2(code, at11(), r)?)?;
            sp_add(a, -(m.size as i32), m.addr16)
        }
        MemOp::PushImm(v) => {
            if m.size == 4 {
                a.mov(dword_ptr(r11), v)?;
            } else {
                a.mov(word_ptr(r11), v)?;
            }
            sp_add(a, -(m.size as i32), m.addr16)
        }
        MemOp::Pop(r) => {
            let code = if m.size == 4 {
                Code::Mov_r32_rm32
            } else {
                Code::Mov_r16_rm16
            };
            a.add_instruction(Instruction::with2(code, r, at11())?)?;
            sp_add(a, m.size as i32, m.addr16)
        }
        MemOp::Call { ret, .. } | MemOp::CallIn { ret } => {
            if m.size == 4 {
                a.mov(dword_ptr(r11), ret)?;
            } else {
                a.mov(word_ptr(r11), ret)?;
            }
            sp_add(a, -(m.size as i32), m.addr16)
        }
        MemOp::Ret(imm) | MemOp::RetIn { imm, .. } => {
            if m.size == 4 {
                a.mov(r11d, dword_ptr(r11))?;
            } else {
                a.movzx(r11d, word_ptr(r11))?;
            }
            sp_add(a, m.size as i32 + imm as i32, m.addr16)
        }
        MemOp::Leave => {
            a.lea(r8d, dword_ptr(rbp + 4))?;
            a.mov(ebp, dword_ptr(r11))
        }
        MemOp::ToScratch => {
            a.mov(r9d, dword_ptr(r11))?;
            a.mov(r10, scratch)?;
            a.mov(qword_ptr(r10), r9)
        }
        MemOp::PushScratch => {
            a.mov(r10, scratch)?;
            a.mov(r10d, dword_ptr(r10))?;
            a.mov(dword_ptr(r11), r10d)?;
            a.lea(r8d, dword_ptr(r8 - 4))
        }
        MemOp::CallInd { ret, src } => {
            a.mov(dword_ptr(r11), ret)?;
            match src {
                Some(r) => {
                    a.add_instruction(Instruction::with2(Code::Mov_r32_rm32, Register::R11D, r)?)?
                }
                None => {
                    a.mov(r11, scratch)?;
                    a.mov(r11d, dword_ptr(r11))?;
                }
            }
            a.lea(r8d, dword_ptr(r8 - 4))
        }
        MemOp::JmpMem => a.mov(r11d, dword_ptr(r11)),
        MemOp::Div(signed) => {
            a.mov(r9d, dword_ptr(r11))?;
            emit_div(a, Register::R9D, signed, m.eip, m.before, t, tail)
        }
        MemOp::PushFlags => emit_push_flags(a, m),
        MemOp::PopFlags { next, cpl } => emit_pop_flags(a, m, next, cpl, tail),
        MemOp::StoreTable(off) => {
            a.movzx(r9d, word_ptr(r15 + (off + OFF_TABLE_LIMIT)))?;
            a.mov(word_ptr(r11), r9w)?;
            a.mov(r9d, dword_ptr(r15 + (off + OFF_TABLE_BASE)))?;
            a.mov(dword_ptr(r11 + 2), r9d)
        }
        MemOp::StoreSel(off) => {
            a.movzx(r9d, word_ptr(r15 + off))?;
            a.mov(word_ptr(r11), r9w)
        }
        MemOp::PushSel { off, wide } => {
            a.movzx(r9d, word_ptr(r15 + off))?;
            if wide {
                a.mov(dword_ptr(r11), r9d)?;
            } else {
                a.mov(word_ptr(r11), r9w)?;
            }
            sp_add(a, m.disp as i32, m.addr16)
        }
    }
}

/// PUSHF: the guest image (arithmetic flags from RFLAGS, the others from
/// `CpuState`, VM and RF clear) at [R11]; RFLAGS restored after.
fn emit_push_flags(a: &mut CodeAssembler, m: &MemInsn) -> Result<(), IcedError> {
    // The guest image: arithmetic flags from RFLAGS, the others
    // from `CpuState`, VM and RF clear; RFLAGS restored after.
    a.pushfq()?;
    a.pop(r12)?;
    a.mov(r9, r12)?;
    a.and(r9d, ARITH)?;
    a.mov(r10, qword_ptr(r15 + OFF_RFLAGS))?;
    a.and(r10, !(ARITH | VM_RF))?;
    a.or(r10, r9)?;
    if m.size == 4 {
        a.mov(dword_ptr(r11), r10d)?;
    } else {
        a.mov(word_ptr(r11), r10w)?;
    }
    sp_add(a, -(m.size as i32), m.addr16)?;
    a.push(r12)?;
    a.popfq()
}

/// POPF from [R11]: what POPF may write at `cpl` merged into `CpuState`'s
/// flags; leaves the CCF for `next` when TF is set or IF turned on (the
/// dispatcher decides then).
fn emit_pop_flags(
    a: &mut CodeAssembler,
    m: &MemInsn,
    next: u32,
    cpl: u8,
    tail: CodeLabel,
) -> Result<(), IcedError> {
    if m.size == 4 {
        a.mov(r9d, dword_ptr(r11))?;
    } else {
        a.movzx(r9d, word_ptr(r11))?;
    }
    sp_add(a, m.size as i32, m.addr16)?;
    // What POPF writes (SDM): IF when CPL ≤ IOPL (read at run
    // time: the host flags are free, POPF sets them all), IOPL at
    // CPL 0; the low word for POPFW.
    let word = if m.size == 2 { 0xffff } else { -1 };
    let cpl = cpl as i32;
    let fixed = (POPF_MASK & !IF & !0x3000) | if cpl == 0 { IF | 0x3000 } else { 0 };
    a.mov(r10, qword_ptr(r15 + OFF_RFLAGS))?;
    a.mov(r12, r10)?;
    a.mov(r11d, fixed & word)?;
    if cpl > 0 {
        let mut no_if = a.create_label();
        a.mov(r11d, r10d)?;
        a.shr(r11d, 12)?;
        a.and(r11d, 3)?;
        a.cmp(r11d, cpl)?;
        a.mov(r11d, fixed & word)?;
        a.jb(no_if)?;
        a.or(r11d, IF)?;
        a.set_label(&mut no_if)?;
    }
    // new = old ^ ((old ^ value) & mask)
    a.xor(r10, r9)?;
    a.and(r10, r11)?;
    a.xor(r10, r12)?;
    a.or(r10, 2)?;
    a.mov(qword_ptr(r15 + OFF_RFLAGS), r10)?;
    a.and(r9d, ARITH)?;
    // TF set (the trap after the next instruction), or IF turned
    // on (an interrupt may be due now): the dispatcher decides.
    let mut leave = a.create_label();
    let mut stay = a.create_label();
    a.test(r10d, TF)?;
    a.jnz(leave)?;
    a.test(r10d, IF)?;
    a.jz(stay)?;
    a.test(r12d, IF)?;
    a.jz(leave)?;
    a.set_label(&mut stay)?;
    a.push(r9)?;
    a.popfq()?;
    let mut done = a.create_label();
    a.jmp(done)?;
    a.set_label(&mut leave)?;
    a.push(r9)?;
    a.popfq()?;
    a.lea(r14, qword_ptr(r14 + (m.before as i32 + 1)))?;
    emit_store_exit(a, Some(next), None, tail)?;
    a.set_label(&mut done)
}

/// `[r11]`.
pub(crate) fn at11() -> iced_x86::MemoryOperand {
    iced_x86::MemoryOperand::with_base(Register::R11)
}

/// R9D := the guest offset of `m`'s memory operand (base + index × scale
/// + displacement, in the guest registers the host registers hold).
fn emit_offset(a: &mut CodeAssembler, m: &MemInsn) -> Result<(), IcedError> {
    if m.base == Register::None && m.index == Register::None {
        a.mov(r9d, m.disp)?;
    } else {
        let mo = iced_x86::MemoryOperand::new(
            m.base,
            m.index,
            m.scale,
            m.disp as i32 as i64,
            if m.disp != 0 { 4 } else { 0 },
            false,
            Register::None,
        );
        a.add_instruction(Instruction::with2(Code::Lea_r32_m, Register::R9D, mo)?)?;
    }
    Ok(())
}
