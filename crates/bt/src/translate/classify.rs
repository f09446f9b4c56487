//! Classification: which of the three classes (ident, inline, call-out)
//! each guest instruction falls in, and the flag liveness that lets an
//! instruction run without computing flags nobody reads.

use super::*;

/// How one guest instruction is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The same host instruction.
    Ident,
    /// A short emitted sequence on the virtual CPU.
    Inline,
    /// A designed call-out: system/sensitive work for the interpreter.
    Callout,
    /// Not translated yet: run on the interpreter.
    Fallback,
}

/// One translated instruction of a TU.
#[derive(Clone, Debug)]
pub(crate) enum Item {
    /// Emit this (register-mapped) host instruction.
    Ident(Instruction),
    /// An ident instruction with a memory operand, rewritten to access
    /// `[r11]`: compute the guest linear address, probe the CPU's TLB, run
    /// it on a hit, leave the CCF before it (the interpreter runs it) on a
    /// miss.
    Mem(Box<MemInsn>),
    /// Nothing to emit (NOP).
    Nop,
    /// CLI at CPL 0.
    Cli,
    /// CLD (false) / STD (true): DF in `CpuState`.
    SetDf(bool),
    /// A call-out that does not leave the CCF: the guest state is stored,
    /// the engine's [`Probe::interp1_fn`] runs the instruction at `eip` on
    /// the interpreter, and the CCF reloads the state and goes on when it
    /// retired and EIP is `next` (else it returns to the dispatcher with
    /// the `before` instructions of the TU ahead of it retired). String
    /// instructions (INS/OUTS too), IN/OUT and RDTSC.
    Interp1 { eip: u32, next: u32, before: u32 },
    /// STI at CPL 0 (ends the TU: interrupt shadow).
    Sti,
    /// Store a 16-bit field of `CpuState` (SLDT/STR/SMSW) into a register:
    /// (field offset, host register, operand size, zero-extend from 16).
    StoreReg(i32, Register, u32),
    /// Direct jump to the target (ends the TU).
    Jmp(u32),
    /// JMP r32: leave for the register's value (ends the TU).
    JmpReg(Register),
    /// DIV/IDIV r32 (divisor register, signed, guest EIP, instructions
    /// before it): checked for #DE first, which leaves to the interpreter.
    Div(Register, bool, u32, u32),
    /// Conditional jump: condition, target, fall-through (ends the TU).
    Jcc(ConditionCode, u32, u32),
}

/// The EIP after `ins` (IP wraps at 64 KiB in 16-bit code).
pub(crate) fn next_ip(ins: &Instruction, ctx: Ctx) -> u32 {
    if ctx.code16 {
        ins.next_ip32() & 0xffff
    } else {
        ins.next_ip32()
    }
}

pub(crate) const ARITH_BITS: u32 = iced_x86::RflagsBits::OF
    | iced_x86::RflagsBits::SF
    | iced_x86::RflagsBits::ZF
    | iced_x86::RflagsBits::AF
    | iced_x86::RflagsBits::CF
    | iced_x86::RflagsBits::PF;

/// Instructions iced lists as writing all six arithmetic flags that may
/// leave some alone: shifts and rotates (a masked count of 0 changes no
/// flag), and those whose flags the SDM leaves undefined, which a processor
/// may keep: BSF/BSR, BT*, MUL/IMUL (AMD keeps SF/ZF/AF/PF), DIV/IDIV
/// (Intel keeps all six, AMD CF and OF).
pub(crate) fn may_keep_flags(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Shl | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Bsf
            | Bsr
            | Tzcnt
            | Lzcnt
            | Bt
            | Bts
            | Btr
            | Btc
            | Mul
            | Imul
            | Div
            | Idiv
    )
}

/// Longest leaf function a trace goes into.
pub(crate) const LEAF_MAX: usize = 12;

/// The code at `code[at]` (EIP `target`) is a leaf function: at most
/// [`LEAF_MAX`] translatable instructions without control transfers, then
/// RET or RET imm16, all in `code` and the page.
pub(crate) fn leaf(
    code: &[u8],
    at: usize,
    target: u32,
    ctx: Ctx,
    forced: &dyn Fn(u32) -> bool,
) -> bool {
    let end = (at & !0xfff) + 0x1000;
    let Some(bytes) = code.get(at..end.min(code.len())) else {
        return false;
    };
    let mut dec = Decoder::with_ip(32, bytes, target as u64, DecoderOptions::NONE);
    for _ in 0..=LEAF_MAX {
        if !dec.can_decode() {
            return false;
        }
        let ins = dec.decode();
        if ins.is_invalid() || forced(ins.ip32()) || ins.next_ip() > (target as u64 | 0xfff) + 1 {
            return false;
        }
        if matches!(ins.code(), Code::Retnd | Code::Retnd_imm16) {
            return true;
        }
        let foreign = ctx.foreign_vendor && vendor_difference(&ins).is_some();
        if ins.flow_control() != FlowControl::Next || classify(&ins, ctx, foreign).is_none() {
            return false;
        }
    }
    false
}

/// Clears `flags_live` of memory instructions whose probe may leave the
/// host flags clobbered on a hit: those followed, before any flag read,
/// any possible exit (another probe, an inline sequence, the TU end), by an
/// instruction that overwrites all six arithmetic flags. Saves a POPFQ.
pub(crate) fn flags_liveness(items: &mut [Item]) {
    for i in 0..items.len() {
        let Item::Mem(m) = &items[i] else { continue };
        if !m.flags_live || m.ins.rflags_read() & ARITH_BITS != 0 {
            continue;
        }
        if matches!(m.op, MemOp::Div(_)) {
            continue; // may leave (for #DE) after the probe
        }
        let mut dead = false;
        for it in &items[i + 1..] {
            match it {
                Item::Nop => continue,
                Item::Ident(h) => {
                    if h.rflags_read() & ARITH_BITS != 0 {
                        break;
                    }
                    if !may_keep_flags(h.mnemonic())
                        && h.rflags_modified() & ARITH_BITS == ARITH_BITS
                    {
                        dead = true;
                        break;
                    }
                }
                _ => break,
            }
        }
        if dead {
            if let Item::Mem(m) = &mut items[i] {
                m.flags_live = false;
            }
        }
    }
}

/// Designed call-outs: system and sensitive instructions (the rest of the
/// untranslated instructions are fallbacks).
pub fn is_system(ins: &Instruction) -> bool {
    use Mnemonic::*;
    for i in 0..ins.op_count() {
        if ins.op_kind(i) == OpKind::Register {
            let r = ins.op_register(i);
            if r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr() {
                return true;
            }
        }
    }
    matches!(
        ins.mnemonic(),
        In | Out
            | Insb
            | Insw
            | Insd
            | Outsb
            | Outsw
            | Outsd
            | Hlt
            | Cli
            | Sti
            | Pushf
            | Pushfd
            | Popf
            | Popfd
            | Lgdt
            | Lidt
            | Lldt
            | Ltr
            | Sgdt
            | Sidt
            | Sldt
            | Str
            | Smsw
            | Lmsw
            | Clts
            | Invlpg
            | Invd
            | Wbinvd
            | Int
            | Int1
            | Int3
            | Into
            | Iret
            | Iretd
            | Retf
            | Cpuid
            | Rdtsc
            | Rdmsr
            | Wrmsr
            | Rdpmc
            | Lar
            | Lsl
            | Verr
            | Verw
            | Sysenter
            | Sysexit
            | Lds
            | Les
            | Lfs
            | Lgs
            | Lss
    ) || (matches!(ins.mnemonic(), Call | Jmp)
        && matches!(ins.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32))
        || (matches!(ins.mnemonic(), Call | Jmp)
            && ins.op0_kind() == OpKind::Memory
            && matches!(
                ins.memory_size(),
                iced_x86::MemorySize::SegPtr16 | iced_x86::MemorySize::SegPtr32
            ))
}

/// Guest register → host register for the duration of a CCF: the same
/// register except ESP, which lives in R8 (the host RSP stays the host's).
pub fn map_reg(r: Register) -> Option<Register> {
    use Register::*;
    Some(match r {
        EAX | ECX | EDX | EBX | EBP | ESI | EDI => r,
        AX | CX | DX | BX | BP | SI | DI => r,
        AL | CL | DL | BL | AH | CH | DH | BH => r,
        ESP => R8D,
        SP => R8W,
        _ => return Option::None,
    })
}

/// What Intel and AMD processors do differently after `ins`, where the
/// manuals leave results undefined (`popek_cpu::vendor`): `None` nothing;
/// `Some(flags)` only these arithmetic flags (iced's `RflagsBits`);
/// `Some(u32::MAX)` a result or memory too. Shifts (AF, OF), rotates by
/// other than 1 (OF), SHLD/SHRD (AF, OF; a 16-bit operand shifted by more
/// than 16 also its result), MUL/IMUL (SF, ZF, AF, PF), the BCD adjusts,
/// PUSH of a segment register with a 32-bit operand size (the slot's upper
/// half), BSF/BSR (CF, OF, SF, AF, PF: AMD generations differ too). DIV/IDIV differ in their flags too, but `Item::Div` computes
/// them for the profile and the other forms are interpreted.
pub(crate) fn vendor_difference(ins: &Instruction) -> Option<u32> {
    use iced_x86::RflagsBits as F;
    use Mnemonic::*;
    let narrow = |op0: u32| {
        ins.op_kind(op0) == OpKind::Register && ins.op_register(op0).size() == 2
            || ins.op_kind(op0) == OpKind::Memory && ins.memory_size().size() == 2
    };
    Some(match ins.mnemonic() {
        Rol | Ror | Rcl | Rcr => {
            if ins.op1_kind() == OpKind::Immediate8 && ins.immediate8() == 1 {
                return None;
            }
            F::OF
        }
        Sar => F::AF,
        Shl | Sal | Shr => F::AF | F::OF,
        Shld | Shrd if narrow(0) => u32::MAX,
        Shld | Shrd => F::AF | F::OF,
        Mul | Imul => F::SF | F::ZF | F::AF | F::PF,
        // Zen 3 keeps them; Intel and Zen 4 define them
        // (`popek_cpu::vendor::amd_bitscan_keeps_flags`). TZCNT/LZCNT are
        // BSF/BSR on the virtual CPU, which has no BMI1/ABM.
        Bsf | Bsr | Tzcnt | Lzcnt => F::CF | F::OF | F::SF | F::AF | F::PF,
        Daa | Das => F::OF,
        Aaa | Aas => F::SF | F::ZF | F::PF | F::OF,
        Push if matches!(
            ins.code(),
            Code::Pushd_ES
                | Code::Pushd_CS
                | Code::Pushd_SS
                | Code::Pushd_DS
                | Code::Pushd_FS
                | Code::Pushd_GS
        ) =>
        {
            u32::MAX
        }
        _ => return None,
    })
}

/// Register-only instructions that cannot fault and run as themselves
/// inside a TU: between a vendor-dependent instruction and them no event
/// can show the flags.
pub(crate) fn harmless(ins: &Instruction) -> bool {
    use Mnemonic::*;
    let regs_only = (0..ins.op_count()).all(|i| {
        !matches!(
            ins.op_kind(i),
            OpKind::Memory
                | OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
        )
    });
    (regs_only || ins.mnemonic() == Lea)
        && !ins.has_lock_prefix()
        && !(0..ins.op_count()).any(|i| {
            ins.op_kind(i) == OpKind::Register
                && (ins.op_register(i).is_segment_register()
                    || matches!(ins.op_register(i), Register::ESP | Register::SP))
        })
        && (simple_integer(ins.mnemonic()) || ins.mnemonic() == Nop)
}

/// The arithmetic flags in `mask`, left as the vendor's silicon leaves them
/// by the instruction before `code[0]` (EIP `ip`), are written over by the
/// next few harmless instructions of the same TU before anything reads
/// them (`avail`: how many more instructions the TU may hold).
pub(crate) fn flags_dead_after(
    code: &[u8],
    ip: u32,
    mut mask: u32,
    avail: u32,
    page_end: u64,
) -> bool {
    let mut d = Decoder::with_ip(32, code, ip as u64, DecoderOptions::NONE);
    for _ in 0..avail.min(8) {
        if !d.can_decode() {
            return false;
        }
        let i = d.decode();
        if i.is_invalid() || i.next_ip() > page_end || !harmless(&i) {
            return false;
        }
        if i.rflags_read() & mask != 0 {
            return false;
        }
        mask &= !(i.rflags_written() | i.rflags_cleared() | i.rflags_set());
        if mask == 0 {
            return true;
        }
    }
    false
}

pub(crate) fn classify(ins: &Instruction, ctx: Ctx, foreign: bool) -> Option<(Item, Class)> {
    use Mnemonic::*;
    let m = ins.mnemonic();
    if ins.has_lock_prefix()
        && !(ins.op0_kind() == OpKind::Memory && popek_cpu::facts::lock_legal(m))
    {
        return None; // #UD
    }
    if matches!(m, Bt | Bts | Btr | Btc)
        && ins.op0_kind() == OpKind::Memory
        && ins.op1_kind() == OpKind::Register
    {
        return None; // the bit offset reaches beyond the operand
    }
    let one_at_a_time = ctx.interp1
        && !ctx.code16
        && (ins.is_string_instruction() || matches!(m, Rdtsc | In | Out));
    if foreign || one_at_a_time {
        // Under a foreign vendor profile every instruction, and string
        // instructions, RDTSC and port I/O always, run one at a time on
        // the interpreter from the CCF.
        if !ctx.interp1 || ctx.code16 {
            return None;
        }
        let it = Item::Interp1 {
            eip: ins.ip32(),
            next: next_ip(ins, ctx),
            before: 0,
        };
        return Some((it, Class::Callout));
    }
    if ins.code() == Code::Jmp_rm32 && ins.op0_kind() == OpKind::Register && !ctx.code16 {
        return Some((Item::JmpReg(map_reg(ins.op0_register())?), Class::Ident));
    }
    if ctx.flat_data && !ctx.code16 {
        if let Some(mi) = indirect_mem_op(ins, ctx) {
            return Some((Item::Mem(Box::new(mi)), Class::Ident));
        }
    }
    if let Some(decided) = control_or_system(ins, ctx) {
        return decided;
    }
    if let Some(x) = inline_op(ins, ctx) {
        return Some(x);
    }
    if ctx.flat_data {
        if let Some(mi) = stack_op(ins, ctx) {
            return Some((Item::Mem(Box::new(mi)), Class::Ident));
        }
    }
    if matches!(ins.code(), Code::Div_rm32 | Code::Idiv_rm32) {
        return divide(ins, ctx);
    }
    if !runs_as_itself(ins) {
        return None;
    }
    let mut h = host_form(ins)?;
    h.set_segment_prefix(Register::None);
    // One virtual CPU at a time on the host: a locked access is an
    // ordinary one.
    if !ctx.atomic {
        h.set_has_lock_prefix(false);
    }
    host_operands(ins, h, ctx)
}

/// Branches, NOPs, the flag instructions and the sensitive register reads
/// the translator handles itself: `Some(decision)` for those (`Some(None)`:
/// not translated), `None` for every other instruction.
fn control_or_system(ins: &Instruction, ctx: Ctx) -> Option<Option<(Item, Class)>> {
    use Mnemonic::*;
    Some(match ins.mnemonic() {
        Jmp | Jo | Jno | Jb | Jae | Je | Jne | Jbe | Ja | Js | Jns | Jp | Jnp | Jl | Jge | Jle
        | Jg => near_branch(ins, ctx),
        Pause if ctx.pause_exits => None,
        Pause => Some((Item::Nop, Class::Ident)),
        Nop if ins.code() == Code::Nopd || ins.code() == Code::Nopw || ins.op_count() <= 1 => {
            Some((Item::Nop, Class::Ident))
        }
        Cli if ctx.cpl == 0 => Some((Item::Cli, Class::Inline)),
        // DF lives in `CpuState` (string instructions run on the
        // interpreter; the host's DF stays clear).
        Cld => Some((Item::SetDf(false), Class::Ident)),
        Std => Some((Item::SetDf(true), Class::Ident)),
        Sti if ctx.cpl == 0 => Some((Item::Sti, Class::Inline)),
        Smsw | Sldt | Str
            if ctx.cpl == 0
                && ctx.inline_sensitive
                && ins.op0_kind() == OpKind::Register
                && !ctx.code16 =>
        {
            store_system_register(ins)
        }
        _ => return None,
    })
}

/// A near relative JMP or Jcc, in the code's own operand size only: o16
/// in 32-bit code truncates EIP, o32 in 16-bit code may pass the CS limit
/// (flat 32-bit CS needs no limit check, and 16-bit code runs only with a
/// limit of at least 0xffff).
fn near_branch(ins: &Instruction, ctx: Ctx) -> Option<(Item, Class)> {
    let want = if ctx.code16 {
        OpKind::NearBranch16
    } else {
        OpKind::NearBranch32
    };
    if ins.op0_kind() != want {
        return None;
    }
    let target = if ctx.code16 {
        ins.near_branch16() as u32
    } else {
        ins.near_branch32()
    };
    Some(if ins.mnemonic() == Mnemonic::Jmp {
        (Item::Jmp(target), Class::Ident)
    } else {
        (
            Item::Jcc(ins.condition_code(), target, next_ip(ins, ctx)),
            Class::Ident,
        )
    })
}

/// SMSW, SLDT or STR into a 16- or 32-bit register, read from the
/// virtual CPU's state.
fn store_system_register(ins: &Instruction) -> Option<(Item, Class)> {
    let r = ins.op0_register();
    let host = map_reg(r)?;
    let size = r.size() as u32;
    if size != 2 && size != 4 {
        return None;
    }
    let off = match ins.mnemonic() {
        Mnemonic::Smsw => OFF_CR0,
        Mnemonic::Sldt => OFF_LDTR_SEL,
        _ => OFF_TR_SEL,
    };
    Some((Item::StoreReg(off, host, size), Class::Inline))
}

/// 32-bit DIV/IDIV: through the translator's own sequence, which raises
/// #DE as the CPU does.
fn divide(ins: &Instruction, ctx: Ctx) -> Option<(Item, Class)> {
    let signed = ins.code() == Code::Idiv_rm32;
    if ins.op0_kind() == OpKind::Register {
        let r = map_reg(ins.op0_register())?;
        return Some((Item::Div(r, signed, ins.ip32(), 0), Class::Ident));
    }
    if !ctx.flat_data {
        return None;
    }
    let mut mi = MemInsn::new(
        MemOp::Div(signed),
        Instruction::default(),
        mem_addr(ins, ctx)?,
        4,
        false,
    );
    mi.eip = ins.ip32();
    Some((Item::Mem(Box::new(mi)), Class::Ident))
}

/// The integer instructions the host runs as they are, once their
/// registers are mapped and their memory operand translated.
fn runs_as_itself(ins: &Instruction) -> bool {
    use Mnemonic::*;
    let m = ins.mnemonic();
    let ok = simple_integer(m)
        || matches!(
            m,
            Shl | Sal
                | Shr
                | Sar
                | Rol
                | Ror
                | Rcl
                | Rcr
                | Lahf
                | Sahf
                | Seto
                | Setno
                | Setb
                | Setae
                | Sete
                | Setne
                | Setbe
                | Seta
                | Sets
                | Setns
                | Setp
                | Setnp
                | Setl
                | Setge
                | Setle
                | Setg
                | Cmovo
                | Cmovno
                | Cmovb
                | Cmovae
                | Cmove
                | Cmovne
                | Cmovbe
                | Cmova
                | Cmovs
                | Cmovns
                | Cmovp
                | Cmovnp
                | Cmovl
                | Cmovge
                | Cmovle
                | Cmovg
                | Imul
                | Mul
                | Bt
                | Bts
                | Btr
                | Btc
                | Cmpxchg
                | Cmpxchg8b
                | Xadd
                | Bsf
                | Bsr
                | Tzcnt
                | Lzcnt
                | Shld
                | Shrd
        );
    if !ok {
        return false;
    }
    // SHLD/SHRD of a 16-bit operand by more than 16 is undefined (the model
    // follows Intel's result): only the 32-bit forms run as themselves.
    if matches!(m, Shld | Shrd)
        && !matches!(
            ins.code(),
            Code::Shld_rm32_r32_imm8
                | Code::Shld_rm32_r32_CL
                | Code::Shrd_rm32_r32_imm8
                | Code::Shrd_rm32_r32_CL
        )
    {
        return false;
    }
    // BSWAP r16 is undefined.
    !(m == Bswap && ins.op0_register().size() != 4)
}

/// The instruction as the host encodes it: the forms that do not exist in
/// 64-bit mode rebuilt (and the moffs forms, which take no base register).
fn host_form(ins: &Instruction) -> Option<Instruction> {
    let moffs = |code: Code, r: Register, load: bool| -> Option<Instruction> {
        let mo = iced_x86::MemoryOperand::with_base_displ(Register::R11, 0);
        if load {
            Instruction::with2(code, r, mo).ok()
        } else {
            Instruction::with2(code, mo, r).ok()
        }
    };
    Some(match ins.code() {
        Code::Mov_AL_moffs8 => moffs(Code::Mov_r8_rm8, Register::AL, true)?,
        Code::Mov_AX_moffs16 => moffs(Code::Mov_r16_rm16, Register::AX, true)?,
        Code::Mov_EAX_moffs32 => moffs(Code::Mov_r32_rm32, Register::EAX, true)?,
        Code::Mov_moffs8_AL => moffs(Code::Mov_rm8_r8, Register::AL, false)?,
        Code::Mov_moffs16_AX => moffs(Code::Mov_rm16_r16, Register::AX, false)?,
        Code::Mov_moffs32_EAX => moffs(Code::Mov_rm32_r32, Register::EAX, false)?,
        Code::Inc_r32 => Instruction::with1(Code::Inc_rm32, ins.op0_register()).ok()?,
        Code::Inc_r16 => Instruction::with1(Code::Inc_rm16, ins.op0_register()).ok()?,
        Code::Dec_r32 => Instruction::with1(Code::Dec_rm32, ins.op0_register()).ok()?,
        Code::Dec_r16 => Instruction::with1(Code::Dec_rm16, ins.op0_register()).ok()?,
        // The virtual CPU has no BMI1/LZCNT (not advertised): F3 0F BC/BD
        // are BSF/BSR with an ignored REP prefix, as on older processors.
        Code::Tzcnt_r32_rm32
        | Code::Tzcnt_r16_rm16
        | Code::Lzcnt_r32_rm32
        | Code::Lzcnt_r16_rm16 => {
            let mut h = *ins;
            h.set_code(match ins.code() {
                Code::Tzcnt_r32_rm32 => Code::Bsf_r32_rm32,
                Code::Tzcnt_r16_rm16 => Code::Bsf_r16_rm16,
                Code::Lzcnt_r32_rm32 => Code::Bsr_r32_rm32,
                _ => Code::Bsr_r16_rm16,
            });
            h.set_has_repe_prefix(false);
            h
        }
        _ => *ins,
    })
}

/// Maps the operands of `h` (the host form of `ins`) onto host registers
/// and, for a memory operand, the translated access; LEA computes its
/// address in host registers.
fn host_operands(ins: &Instruction, mut h: Instruction, ctx: Ctx) -> Option<(Item, Class)> {
    use Mnemonic::*;
    let m = ins.mnemonic();
    let mut mem_op = false;
    for i in 0..h.op_count() {
        match h.op_kind(i) {
            OpKind::Register => {
                let r = map_reg(h.op_register(i))?;
                h.set_op_register(i, r);
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32 => {}
            OpKind::Memory if m == Lea => {
                // LEA computes, it does not access memory. 16-bit
                // addressing does not exist in 64-bit mode: into a 16-bit
                // register the 32-bit sum of the same registers has the
                // same low 16 bits.
                let base = h.memory_base();
                let index = h.memory_index();
                let addr16 = is_addr16(ins);
                if addr16 && h.op0_register().size() != 2 {
                    return None;
                }
                let wide = |r: Register| {
                    if addr16 {
                        map_reg(r.full_register32())
                    } else {
                        map_reg(r).filter(|r| r.size() >= 4)
                    }
                };
                if base != Register::None {
                    h.set_memory_base(wide(base)?);
                }
                if index != Register::None {
                    h.set_memory_index(wide(index)?);
                }
                if addr16 {
                    let d = ins.memory_displacement32() & 0xffff;
                    h.set_memory_displacement64(d as u64);
                    h.set_memory_displ_size(if d != 0 { 4 } else { 0 });
                }
                if base == Register::None && index == Register::None {
                    // `lea r, [disp32]`: a move of the displacement.
                    let r = h.op0_register();
                    let v = ins.memory_displacement32();
                    let mov = if r.size() == 4 {
                        Instruction::with2(Code::Mov_r32_imm32, r, v).ok()?
                    } else {
                        Instruction::with2(Code::Mov_r16_imm16, r, v & 0xffff).ok()?
                    };
                    return encodable(mov).map(|i| (Item::Ident(i), Class::Ident));
                }
            }
            OpKind::Memory if ctx.flat_data && !mem_op => mem_op = true,
            _ => return None,
        }
    }
    if mem_op {
        return mem_form(ins, h, m, ctx).map(|mi| (Item::Mem(Box::new(mi)), Class::Ident));
    }
    encodable(h).map(|i| (Item::Ident(i), Class::Ident))
}

/// The plain integer instructions both the register-only fast path and
/// the memory forms translate as they are: arithmetic and logic, moves
/// and extensions, exchanges, sign extensions of the accumulator, carry
/// flag changes.
fn simple_integer(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Add | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Mov
            | Movzx
            | Movsx
            | Lea
            | Xchg
            | Bswap
            | Cbw
            | Cwde
            | Cwd
            | Cdq
            | Clc
            | Stc
            | Cmc
    )
}
