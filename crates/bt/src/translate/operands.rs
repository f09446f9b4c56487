//! Memory operands of inline instructions: the guest address (segment,
//! base, index, 16-bit forms), the host form the instruction takes once
//! the address is translated, and stack operations.

use super::*;

/// A memory instruction of a TU (see [`Item::Mem`]).
#[derive(Clone, Debug)]
pub(crate) struct MemInsn {
    /// What runs on a hit.
    pub(crate) op: MemOp,
    /// The host instruction, memory operand `[r11]` (for `MemOp::Insn`;
    /// flag queries use it for every kind).
    pub(crate) ins: Instruction,
    /// Its guest EIP (where a miss leaves the CCF).
    pub(crate) eip: u32,
    /// Guest instructions of the TU before it.
    pub(crate) before: u32,
    /// Address: host base and index registers (32-bit), scale, displacement.
    pub(crate) base: Register,
    pub(crate) index: Register,
    pub(crate) scale: u32,
    pub(crate) disp: u32,
    /// Access size in bytes.
    pub(crate) size: u32,
    /// `CpuState` offset of the segment base to add (FS/GS operands, and
    /// every segment in 16-bit code).
    pub(crate) seg_base: Option<i32>,
    /// 16-bit addressing (16-bit code): the offset wraps at 64 KiB and its
    /// last byte must stay within it (the segment limit is at least
    /// 0xffff); stack operations move SP, not ESP.
    pub(crate) addr16: bool,
    /// A read before this access (PUSH m32, CALL m32: the source), its
    /// value kept in the scratch slot (`Probe::exit_info` + 16).
    pub(crate) pre: Option<Box<MemInsn>>,
    /// The host register `ins` addresses memory through instead of R11
    /// (its guest value waits in R12).
    pub(crate) via: Option<Register>,
    /// Needs the write tag (store or read-modify-write).
    pub(crate) write: bool,
    /// The host flags must be the guest's before the instruction runs
    /// (it reads them, or does not overwrite all six).
    pub(crate) flags_live: bool,
}

impl MemInsn {
    /// A memory instruction at `ins`'s EIP (the other fields default:
    /// no pre-read, no `via`, guest flags live).
    pub(crate) fn new(op: MemOp, ins: Instruction, a: Addr, size: u32, write: bool) -> MemInsn {
        let mut h = ins;
        h.set_ip(0);
        MemInsn {
            op,
            ins: h,
            eip: ins.ip32(),
            before: 0,
            base: a.base,
            index: a.index,
            scale: a.scale,
            disp: a.disp,
            size,
            seg_base: a.seg_base,
            addr16: a.addr16,
            pre: None,
            via: None,
            write,
            flags_live: true,
        }
    }
}

/// The access a [`MemInsn`] makes once its probe hit (`r11` = host address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemOp {
    /// The rewritten instruction.
    Insn,
    /// PUSH r32 (the value before the decrement) or PUSH imm.
    PushReg(Register),
    /// See `PushReg`.
    PushImm(u32),
    /// POP r32 (not ESP).
    Pop(Register),
    /// CALL rel32: push the return address, jump (ends the TU).
    Call { ret: u32, target: u32 },
    /// CALL rel32 into the same page: push the return address; the TU goes
    /// on in the callee.
    CallIn { ret: u32 },
    /// RET / RET imm16: pop EIP, release `imm` more bytes (ends the TU).
    Ret(u32),
    /// RET / RET imm16 of a callee the TU went into: pop EIP, release
    /// `imm` more bytes; go on when EIP is `expect` (after the CALL), else
    /// leave through the indirect-branch table.
    RetIn { imm: u32, expect: u32 },
    /// LEAVE: ESP = EBP + 4, EBP = the dword at EBP.
    Leave,
    /// Load the dword into the scratch slot (a `pre` read).
    ToScratch,
    /// PUSH of the scratch slot (PUSH m32).
    PushScratch,
    /// CALL r32 (`Some`) or CALL m32 (`None`: the target is in the scratch
    /// slot): push the return address, leave for the target (ends the TU).
    CallInd { ret: u32, src: Option<Register> },
    /// JMP m32: leave for the dword read (ends the TU).
    JmpMem,
    /// DIV/IDIV m32 (signed): see `Item::Div`.
    Div(bool),
    /// PUSHF/PUSHFD: the guest flags (arithmetic ones from RFLAGS, the
    /// others from `CpuState`), VM and RF clear.
    PushFlags,
    /// POPF: arithmetic flags to RFLAGS, the others POPF may write at this
    /// CPL to `CpuState` (IF only when CPL ≤ IOPL, IOPL only at CPL 0, the
    /// low 16 bits for POPFW); leaves the CCF for the dispatcher (at
    /// `next`, the TU's `before + 1` instructions retired) when it sets TF
    /// or turns IF on (a pending interrupt is due), else goes on.
    PopFlags { next: u32, cpl: u8 },
    /// SGDT/SIDT m: the 16-bit limit and the 32-bit base of the table
    /// register at this `CpuState` offset.
    StoreTable(i32),
    /// A 16-bit field of `CpuState` (selector, CR0's low word) to memory.
    StoreSel(i32),
    /// PUSH Sreg: the selector at this `CpuState` offset written into a
    /// slot of `-disp` bytes, as a word (Intel writes 16 bits of a 32-bit
    /// slot) or zero-extended to the whole slot (`wide`: AMD).
    PushSel { off: i32, wide: bool },
}

/// The address of a guest memory operand, as the inline probe forms it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Addr {
    /// Host base and index registers (32-bit), scale, displacement.
    pub(crate) base: Register,
    pub(crate) index: Register,
    pub(crate) scale: u32,
    pub(crate) disp: u32,
    /// `CpuState` offset of the segment base to add.
    pub(crate) seg_base: Option<i32>,
    /// 16-bit addressing (see [`MemInsn::addr16`]).
    pub(crate) addr16: bool,
}

/// The operand of `ins` uses 16-bit addressing.
pub(crate) fn is_addr16(ins: &Instruction) -> bool {
    let (b, x) = (ins.memory_base(), ins.memory_index());
    b.size() == 2
        || x.size() == 2
        || (b == Register::None && x == Register::None && ins.memory_displ_size() == 2)
}

/// `CpuState` offset of segment register `r`'s base.
pub(crate) fn seg_base_off(r: Register) -> Option<i32> {
    let i = popek_cpu::decode::sreg(r)? as i32;
    Some(OFF_SEG_BASE + i * SEG_SIZE)
}

/// The address of a guest memory operand the inline probe can compute, or
/// `None`: in 32-bit code 32-bit addressing through DS/ES/SS (flat) and
/// usable FS/GS (their base added); in 16-bit code 16-bit addressing
/// through usable DS/ES/SS/FS/GS (the base always added).
pub(crate) fn mem_addr(guest: &Instruction, ctx: Ctx) -> Option<Addr> {
    let seg = guest.memory_segment();
    let usable = match seg {
        Register::DS | Register::ES | Register::SS => ctx.flat_data,
        Register::FS => ctx.fs_gs & 1 != 0,
        Register::GS => ctx.fs_gs & 2 != 0,
        _ => false,
    };
    if !usable {
        return None;
    }
    let addr16 = is_addr16(guest);
    if addr16 != ctx.code16 {
        return None;
    }
    let seg_base = if ctx.code16 || matches!(seg, Register::FS | Register::GS) {
        Some(seg_base_off(seg)?)
    } else {
        None
    };
    let map32 = |r: Register| -> Option<Register> {
        if r == Register::None {
            Some(r)
        } else if addr16 {
            map_reg(r.full_register32())
        } else {
            map_reg(r).filter(|r| r.size() == 4)
        }
    };
    let disp = guest.memory_displacement32();
    Some(Addr {
        base: map32(guest.memory_base())?,
        index: map32(guest.memory_index())?,
        scale: guest.memory_index_scale(),
        disp: if addr16 { disp & 0xffff } else { disp },
        seg_base,
        addr16,
    })
}

/// The stack slot below the stack pointer (`slot` bytes) or at it.
pub(crate) fn stack_addr(ctx: Ctx, disp: i32) -> Addr {
    Addr {
        base: Register::R8D,
        index: Register::None,
        scale: 1,
        disp: disp as u32,
        seg_base: ctx.code16.then_some(OFF_SEG_BASE + 2 * SEG_SIZE),
        addr16: ctx.code16,
    }
}

/// Inline sequences on the virtual CPU with a memory access: PUSHFD,
/// POPFD (CPL 0), SGDT/SIDT m (CPL 0), MOV r/m, Sreg, PUSH Sreg,
/// SLDT/STR/SMSW m16 (CPL 0).
pub(crate) fn inline_op(ins: &Instruction, ctx: Ctx) -> Option<(Item, Class)> {
    use Mnemonic::*;
    let m = ins.mnemonic();
    let sel_off = |r: Register| -> Option<i32> {
        let b = seg_base_off(r)?;
        Some(b - OFF_SEG_BASE + OFF_SEG_SEL)
    };
    let mem = |op: MemOp, a: Addr, size: u32| -> Option<(Item, Class)> {
        let mi = MemInsn::new(op, *ins, a, size, true);
        Some((Item::Mem(Box::new(mi)), Class::Inline))
    };
    match m {
        Mov if ins.op1_kind() == OpKind::Register && ins.op1_register().is_segment_register() => {
            let r = ins.op1_register();
            if matches!(r, Register::CS | Register::SS) && !ctx.inline_sensitive {
                return None; // the audit counts these
            }
            let off = sel_off(r)?;
            if ins.op0_kind() == OpKind::Register {
                let d = ins.op0_register();
                let host = map_reg(d)?;
                // To a 32-bit register zero-extended (P6 and later).
                return Some((Item::StoreReg(off, host, d.size() as u32), Class::Inline));
            }
            if !ctx.flat_data {
                return None;
            }
            mem(MemOp::StoreSel(off), mem_addr(ins, ctx)?, 2)
        }
        Push if ins.op0_kind() == OpKind::Register
            && ins.op0_register().is_segment_register()
            && ctx.flat_data =>
        {
            let r = ins.op0_register();
            if matches!(r, Register::CS | Register::SS) && !ctx.inline_sensitive {
                return None;
            }
            let slot = match ins.code() {
                Code::Pushd_ES
                | Code::Pushd_CS
                | Code::Pushd_SS
                | Code::Pushd_DS
                | Code::Pushd_FS
                | Code::Pushd_GS
                    if !ctx.code16 =>
                {
                    4
                }
                Code::Pushw_ES
                | Code::Pushw_CS
                | Code::Pushw_SS
                | Code::Pushw_DS
                | Code::Pushw_FS
                | Code::Pushw_GS
                    if ctx.code16 =>
                {
                    2
                }
                _ => return None,
            };
            let wide = ctx.amd && slot == 4;
            let op = MemOp::PushSel {
                off: sel_off(r)?,
                wide,
            };
            mem(op, stack_addr(ctx, -slot), if wide { 4 } else { 2 })
        }
        // The rest: 32-bit code on a flat stack, with the virtual CPU's
        // sensitive state not reported (audit runs interpret them).
        // PUSHF/POPF of the code's own operand size, on its stack.
        Pushfd | Pushf | Popfd | Popf
            if ctx.flat_data
                && ctx.inline_sensitive
                && matches!(
                    (ins.code(), ctx.code16),
                    (Code::Pushfd | Code::Popfd, false) | (Code::Pushfw | Code::Popfw, true)
                ) =>
        {
            let size = if ctx.code16 { 2 } else { 4 };
            if matches!(m, Pushf | Pushfd) {
                return mem(MemOp::PushFlags, stack_addr(ctx, -(size as i32)), size);
            }
            let mut mi = MemInsn::new(
                MemOp::PopFlags {
                    next: next_ip(ins, ctx),
                    cpl: ctx.cpl,
                },
                *ins,
                stack_addr(ctx, 0),
                size,
                false,
            );
            mi.flags_live = false; // POPF sets all six
            Some((Item::Mem(Box::new(mi)), Class::Inline))
        }
        _ if ctx.code16 || !ctx.flat_data || !ctx.inline_sensitive => None,
        Sgdt | Sidt if ctx.cpl == 0 && ins.code() != Code::Sgdt_m1632_16 => {
            if ins.code() == Code::Sidt_m1632_16 || ins.op0_kind() != OpKind::Memory {
                return None;
            }
            let off = if m == Sgdt { OFF_GDTR } else { OFF_IDTR };
            mem(MemOp::StoreTable(off), mem_addr(ins, ctx)?, 6)
        }
        Sldt | Str | Smsw if ctx.cpl == 0 && ins.op0_kind() == OpKind::Memory => {
            let off = match m {
                Smsw => OFF_CR0,
                Sldt => OFF_LDTR_SEL,
                _ => OFF_TR_SEL,
            };
            mem(MemOp::StoreSel(off), mem_addr(ins, ctx)?, 2)
        }
        _ => None,
    }
}

/// JMP m32, PUSH m32, CALL r32 and CALL m32 (flat 32-bit stack).
pub(crate) fn indirect_mem_op(ins: &Instruction, ctx: Ctx) -> Option<MemInsn> {
    let read = |op: MemOp| -> Option<MemInsn> {
        let mut mi = MemInsn::new(op, Instruction::default(), mem_addr(ins, ctx)?, 4, false);
        mi.eip = ins.ip32();
        Some(mi)
    };
    let push = |op: MemOp, pre: Option<MemInsn>| {
        let mut mi = MemInsn::new(op, Instruction::default(), stack_addr(ctx, -4), 4, true);
        mi.eip = ins.ip32();
        mi.pre = pre.map(Box::new);
        mi
    };
    let mem = ins.op_count() == 1 && ins.op0_kind() == OpKind::Memory;
    match ins.code() {
        Code::Jmp_rm32 if mem => read(MemOp::JmpMem),
        Code::Push_rm32 if mem => Some(push(MemOp::PushScratch, Some(read(MemOp::ToScratch)?))),
        Code::Call_rm32 if mem => Some(push(
            MemOp::CallInd {
                ret: ins.next_ip32(),
                src: None,
            },
            Some(read(MemOp::ToScratch)?),
        )),
        Code::Call_rm32 => Some(push(
            MemOp::CallInd {
                ret: ins.next_ip32(),
                src: Some(map_reg(ins.op0_register())?),
            },
            None,
        )),
        _ => None,
    }
}

/// The `[r11]` form of an ident instruction with a memory operand, or
/// `None` (call-out) for what the inline path does not cover: segments
/// other than DS/ES/SS, 16-bit addressing, moffs forms.
pub(crate) fn mem_form(
    guest: &Instruction,
    mut h: Instruction,
    m: Mnemonic,
    ctx: Ctx,
) -> Option<MemInsn> {
    use iced_x86::RflagsBits as F;
    let addr = mem_addr(guest, ctx)?;
    let size = guest.memory_size().size() as u32;
    // CMPXCHG8B: the host's (EDX:EAX, ECX:EBX are the same registers).
    if !(matches!(size, 1 | 2 | 4) || (size == 8 && m == Mnemonic::Cmpxchg8b)) {
        return None;
    }
    h.set_memory_base(Register::R11);
    h.set_memory_index(Register::None);
    h.set_memory_index_scale(1);
    h.set_memory_displacement64(0);
    h.set_memory_displ_size(0);
    // AH/BH/CH/DH exclude a REX prefix, so [r11] cannot be the address:
    // borrow RSI, RDI or RBP (one the instruction does not name) for it.
    let mut via = None;
    let h = match encodable(h) {
        Some(h) => h,
        None => {
            let used: Vec<Register> = (0..h.op_count())
                .filter(|&i| h.op_kind(i) == OpKind::Register)
                .map(|i| h.op_register(i).full_register())
                .collect();
            let x = [Register::RSI, Register::RDI, Register::RBP]
                .into_iter()
                .find(|x| !used.contains(x))?;
            h.set_memory_base(x);
            via = Some(x);
            encodable(h)?
        }
    };
    let write = (guest.op0_kind() == OpKind::Memory
        && !matches!(
            m,
            Mnemonic::Cmp | Mnemonic::Test | Mnemonic::Mul | Mnemonic::Imul | Mnemonic::Bt
        ))
        || m == Mnemonic::Xchg;
    let arith = F::OF | F::SF | F::ZF | F::AF | F::CF | F::PF;
    let flags_live = may_keep_flags(m)
        || guest.rflags_read() & arith != 0
        || guest.rflags_modified() & arith != arith;
    let mut mi = MemInsn::new(MemOp::Insn, h, addr, size, write);
    mi.eip = guest.ip32();
    mi.via = via;
    mi.flags_live = flags_live;
    Some(mi)
}

/// PUSH/POP/CALL/RET through the inline probe: on a flat 32-bit stack in
/// 32-bit code, on a 16-bit stack (SP) in 16-bit code (with either
/// operand size for PUSH/POP; the code's own for CALL/RET).
pub(crate) fn stack_op(ins: &Instruction, ctx: Ctx) -> Option<MemInsn> {
    let c16 = ctx.code16;
    let reg = |ok: bool| -> Option<Register> {
        let r = ins.op0_register();
        (ok && r.full_register32() != Register::ESP).then_some(())?;
        map_reg(r)
    };
    let (op, disp, size, write) = match ins.code() {
        Code::Push_r32 => (MemOp::PushReg(map_reg(ins.op0_register())?), -4i32, 4, true),
        Code::Push_r16 if c16 => (MemOp::PushReg(map_reg(ins.op0_register())?), -2, 2, true),
        Code::Pushd_imm32 => (MemOp::PushImm(ins.immediate32()), -4, 4, true),
        // Sign-extended (`6A ib`).
        Code::Pushd_imm8 => (MemOp::PushImm(ins.immediate8to32() as u32), -4, 4, true),
        Code::Push_imm16 if c16 => (MemOp::PushImm(ins.immediate16() as u32), -2, 2, true),
        Code::Pushw_imm8 if c16 => (
            MemOp::PushImm(ins.immediate8to16() as u16 as u32),
            -2,
            2,
            true,
        ),
        Code::Pop_r32 => (MemOp::Pop(reg(true)?), 0, 4, false),
        Code::Pop_r16 if c16 => (MemOp::Pop(reg(true)?), 0, 2, false),
        Code::Call_rel32_32 if !c16 => (
            MemOp::Call {
                ret: ins.next_ip32(),
                target: ins.near_branch32(),
            },
            -4,
            4,
            true,
        ),
        Code::Call_rel16 if c16 => (
            MemOp::Call {
                ret: next_ip(ins, ctx),
                target: ins.near_branch16() as u32,
            },
            -2,
            2,
            true,
        ),
        Code::Leaved if !c16 => (MemOp::Leave, 0, 4, false),
        Code::Retnd if !c16 => (MemOp::Ret(0), 0, 4, false),
        Code::Retnd_imm16 if !c16 => (MemOp::Ret(ins.immediate16() as u32), 0, 4, false),
        Code::Retnw if c16 => (MemOp::Ret(0), 0, 2, false),
        Code::Retnw_imm16 if c16 => (MemOp::Ret(ins.immediate16() as u32), 0, 2, false),
        _ => return None,
    };
    let mut a = stack_addr(ctx, disp);
    if op == MemOp::Leave {
        a.base = Register::EBP;
    }
    // PUSH/POP change no flags; CALL/RET leave the CCF.
    Some(MemInsn::new(op, *ins, a, size, write))
}

/// `Some(i)` when the host encoder accepts `i` in 64-bit mode (e.g. AH
/// cannot appear beside R8).
pub(crate) fn encodable(mut i: Instruction) -> Option<Instruction> {
    // CodeAssembler treats a non-zero IP as a label: drop the guest's.
    i.set_ip(0);
    let mut e = Encoder::new(64);
    e.encode(&i, 0).ok().map(|_| i)
}
