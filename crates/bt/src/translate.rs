//! The translator: guest instructions → a translation unit (TU) → a
//! compiled code fragment (CCF) of host x86-64 code.
//!
//! Each guest instruction is classified:
//!
//! * **ident** — safe, emitted as the same host instruction with the guest
//!   registers mapped onto host registers (see [`map_reg`]); the host's
//!   arithmetic flags are the guest's for the whole fragment;
//! * **inline** — a simple sensitive instruction emitted as a short sequence
//!   on the virtual CPU state (`CpuState` through `r15`);
//! * **call-out** — everything else: the dispatcher runs it on the
//!   interpreter (`Cpu::run(bus, n)`), counted as a designed call-out
//!   (system and sensitive instructions) or a fallback (ordinary
//!   instructions the translator does not cover yet).
//!
//! A TU is the longest run of ident/inline instructions from one guest
//! EIP, ending at a direct jump (JMP/Jcc rel, translated), STI, the first
//! call-out instruction (not included: the next dispatch runs it), the page
//! end or [`MAX_TU`] instructions.

use iced_x86::code_asm::*;
use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Encoder, FlowControl, Instruction, Mnemonic,
    OpKind, Register,
};
use popek_cpu::{CpuState, Segment};

mod share;

/// Largest number of guest instructions in one TU.
pub const MAX_TU: usize = 64;
/// Largest number of instructions one call-out entry runs on the
/// interpreter.
pub const MAX_CALLOUT_RUN: usize = 16;

/// The guest arithmetic flags (CF, PF, AF, ZF, SF, OF).
const ARITH: i32 = 0x8d5;
const IF: i32 = 0x200;

const OFF_GPR: i32 = std::mem::offset_of!(CpuState, gpr) as i32;
const OFF_RIP: i32 = std::mem::offset_of!(CpuState, rip) as i32;
const OFF_RFLAGS: i32 = std::mem::offset_of!(CpuState, rflags) as i32;
const OFF_CR0: i32 = std::mem::offset_of!(CpuState, cr0) as i32;
const OFF_SEG_BASE: i32 =
    (std::mem::offset_of!(CpuState, seg) + std::mem::offset_of!(Segment, base)) as i32;
const SEG_SIZE: i32 = std::mem::size_of::<Segment>() as i32;
const OFF_SHADOW: i32 = std::mem::offset_of!(CpuState, interrupt_shadow) as i32;
const OFF_LDTR_SEL: i32 =
    (std::mem::offset_of!(CpuState, ldtr) + std::mem::offset_of!(Segment, selector)) as i32;
const OFF_TR_SEL: i32 =
    (std::mem::offset_of!(CpuState, tr) + std::mem::offset_of!(Segment, selector)) as i32;
const OFF_SEG_SEL: i32 =
    (std::mem::offset_of!(CpuState, seg) + std::mem::offset_of!(Segment, selector)) as i32;
const OFF_GDTR: i32 = std::mem::offset_of!(CpuState, gdtr) as i32;
const OFF_IDTR: i32 = std::mem::offset_of!(CpuState, idtr) as i32;
const OFF_TABLE_BASE: i32 = std::mem::offset_of!(popek_cpu::state::TableReg, base) as i32;
const OFF_TABLE_LIMIT: i32 = std::mem::offset_of!(popek_cpu::state::TableReg, limit) as i32;
/// What POPF writes at CPL 0 (SDM: every flag but VM, RF, VIF, VIP).
const POPF_MASK: i32 = ARITH | 0x100 | IF | 0x400 | 0x3000 | 0x4000 | 0x4_0000 | 0x20_0000;
/// VM and RF: cleared in the image PUSHF stores.
const VM_RF: i32 = 0x3_0000;
const TF: i32 = 0x100;
const DF: i32 = 0x400;

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
enum Item {
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

/// A memory instruction of a TU (see [`Item::Mem`]).
#[derive(Clone, Debug)]
struct MemInsn {
    /// What runs on a hit.
    op: MemOp,
    /// The host instruction, memory operand `[r11]` (for `MemOp::Insn`;
    /// flag queries use it for every kind).
    ins: Instruction,
    /// Its guest EIP (where a miss leaves the CCF).
    eip: u32,
    /// Guest instructions of the TU before it.
    before: u32,
    /// Address: host base and index registers (32-bit), scale, displacement.
    base: Register,
    index: Register,
    scale: u32,
    disp: u32,
    /// Access size in bytes.
    size: u32,
    /// `CpuState` offset of the segment base to add (FS/GS operands, and
    /// every segment in 16-bit code).
    seg_base: Option<i32>,
    /// 16-bit addressing (16-bit code): the offset wraps at 64 KiB and its
    /// last byte must stay within it (the segment limit is at least
    /// 0xffff); stack operations move SP, not ESP.
    addr16: bool,
    /// A read before this access (PUSH m32, CALL m32: the source), its
    /// value kept in the scratch slot (`Probe::exit_info` + 16).
    pre: Option<Box<MemInsn>>,
    /// The host register `ins` addresses memory through instead of R11
    /// (its guest value waits in R12).
    via: Option<Register>,
    /// Needs the write tag (store or read-modify-write).
    write: bool,
    /// The host flags must be the guest's before the instruction runs
    /// (it reads them, or does not overwrite all six).
    flags_live: bool,
}

/// The access a [`MemInsn`] makes once its probe hit (`r11` = host address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemOp {
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

/// A planned TU: what to emit, and the counts.
pub struct Plan {
    items: Vec<Item>,
    /// The EIP of each guest instruction, in the order the TU runs them.
    pub eips: Vec<u32>,
    /// The TU follows a JMP, CALL or RET (its instructions are not
    /// consecutive).
    pub traced: bool,
    /// EIP after the last instruction (for TUs that do not end in a jump).
    pub next_eip: u32,
    /// Guest instructions.
    pub insns: u32,
    /// Of which ident.
    pub ident: u32,
    /// Of which inline.
    pub inline: u32,
    /// Of which call-outs made from inside the CCF ([`Item::Interp1`]).
    pub callouts: u32,
    /// CS base & 0xfff (see [`Ctx::cs_lo`]).
    pub cs_lo: u32,
}

/// What the translator made of the code at one EIP.
pub enum Translation {
    /// A TU to compile.
    Tu(Plan),
    /// The first instruction is a call-out: run `run` instructions on the
    /// interpreter; `callouts` of the first `run` are designed call-outs,
    /// the rest fallbacks.
    Interp {
        /// Instructions to run.
        run: u32,
        /// How many of them are designed call-outs.
        callouts: u32,
        /// For the fallback profile: `(code * 4 + segment) * 4 + why`, the
        /// first instruction's form (`Code`), its segment prefix (0 none,
        /// 1 FS, 2 GS, 3 other) and why it is interpreted (0 not
        /// translated, 1 adaptive call-out, 2 non-flat data segments).
        first: u32,
    },
}

/// Translation context: what the TU key fixes.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// The CPL the TU runs at.
    pub cpl: u8,
    /// Inline sensitive instructions (off while the CPU reports them).
    pub inline_sensitive: bool,
    /// DS, ES and SS are flat (base 0, limit 4 GiB, present, writable,
    /// expand-up): memory operands through them are ident with an inline
    /// TLB probe.
    pub flat_data: bool,
    /// FS (bit 0) and GS (bit 1) are present writable expand-up data
    /// segments with a 4 GiB limit: memory operands through them are ident
    /// with the segment base (read from `CpuState` at run time) added and
    /// the limit checked in the inline probe (BMI2 hosts only).
    /// In 16-bit code: the same with a limit of at least 0xffff.
    pub fs_gs: u8,
    /// 16-bit code (CS.D = 0, real or protected mode; BMI2 hosts only).
    /// `flat_data` then means: DS, ES and SS are present writable
    /// expand-up data segments with limits of at least 0xffff and SS is a
    /// 16-bit stack; memory operands add the segment base (read at run
    /// time) to the 16-bit offset.
    pub code16: bool,
    /// CS base & 0xfff (16-bit code): which EIPs share a linear page.
    pub cs_lo: u32,
    /// String instructions, IN/OUT and RDTSC run on the interpreter from
    /// inside the CCF ([`Item::Interp1`]) instead of ending the TU.
    pub interp1: bool,
    /// The CPU's vendor profile is not the host's: instructions whose
    /// undefined results differ between vendors (`vendor_sensitive`) run on
    /// the interpreter, which follows the profile, instead of natively.
    pub foreign_vendor: bool,
    /// The vendor profile is AMD: inline PUSH Sreg writes the selector
    /// zero-extended to the whole 32-bit slot (Intel: 16 bits).
    pub amd: bool,
}

/// Plans the TU for `code` (the guest bytes from `eip` to the end of its
/// page; flat 32-bit protected mode).
///
/// `forced(eip)` names instructions that must be call-outs even if they
/// could be translated (adaptive BT: inline accesses that keep missing).
pub fn plan(code: &[u8], eip: u32, ctx: Ctx, forced: &dyn Fn(u32) -> bool) -> Translation {
    plan_at(code, 0, eip, ctx, forced)
}

/// [`plan`] with `code[start]` the byte at `eip`: for 32-bit code, `code`
/// may begin before it, at most at its page's start, so that the TU can
/// go into a function it calls in the page (a trace): a CALL rel32 to a
/// leaf function of the same page ([`LEAF_MAX`] instructions or fewer, all
/// translatable, then RET) pushes the return address and goes on in the
/// callee, whose RET compares the address it pops with that return
/// address and goes on after the CALL when they match. (Following every
/// CALL and JMP in the page made Debian's code 2.5 times as large and its
/// boot 10 % slower; leaves are where a CALL and RET cost most.)
pub fn plan_at(
    code: &[u8],
    start: usize,
    eip: u32,
    ctx: Ctx,
    forced: &dyn Fn(u32) -> bool,
) -> Translation {
    let bits = if ctx.code16 { 16 } else { 32 };
    let code = if ctx.code16 { &code[start..] } else { code };
    let start = if ctx.code16 { 0 } else { start };
    // 16-bit code: an instruction may not run past offset 0xffff (the
    // interpreter raises the #GP).
    let code = if ctx.code16 {
        &code[..code.len().min(0x1_0000 - eip as usize)]
    } else {
        code
    };
    // 32-bit code: `code` may hold a few bytes of the next page (when it
    // is mapped), so that an instruction straddling the page end decodes.
    let page_end = if ctx.code16 {
        u64::MAX
    } else {
        (eip as u64 | 0xfff) + 1
    };
    let mut dec = Decoder::with_ip(
        bits,
        code,
        (eip as usize - start) as u64,
        DecoderOptions::NONE,
    );
    if dec.set_position(start).is_err() {
        return Translation::Interp {
            run: 1,
            callouts: 0,
            first: 0,
        };
    }
    dec.set_ip(eip as u64);
    // The return addresses of the CALLs the trace went into.
    let mut calls: Vec<u32> = Vec::new();
    let mut p = Plan {
        items: Vec::new(),
        eips: Vec::new(),
        traced: false,
        next_eip: eip,
        insns: 0,
        ident: 0,
        inline: 0,
        callouts: 0,
        cs_lo: ctx.cs_lo,
    };
    while (p.insns as usize) < MAX_TU && dec.can_decode() && dec.ip() < page_end {
        let ins = dec.decode();
        if ins.is_invalid() {
            break; // undecodable (or straddling into an unmapped page): a call-out
        }
        if forced(ins.ip32()) {
            break;
        }
        // Under another vendor's profile, an instruction whose results
        // differ between vendors runs on the interpreter, unless only
        // flags differ and the next instructions overwrite them unseen.
        let foreign = ctx.foreign_vendor
            && vendor_difference(&ins).is_some_and(|mask| {
                let at = dec.position();
                mask == u32::MAX
                    || ctx.code16
                    || !flags_dead_after(
                        &code[at..],
                        ins.next_ip32(),
                        mask,
                        MAX_TU as u32 - p.insns - 1,
                        page_end,
                    )
            });
        let Some((mut item, mut class)) = classify(&ins, ctx, foreign) else {
            break;
        };
        if ins.next_ip() > page_end {
            // Straddles the page end: its bytes in the next page may
            // change (or be mapped elsewhere) without this page's TUs
            // being dropped, so the interpreter runs it from inside the CCF
            // (fetching it anew; the CCF leaves unless it ends at `next`),
            // ending the TU. Only ordinary instructions: inline ones may
            // change what the TU assumes (IF, TF, the shadow).
            let plain = class == Class::Ident || matches!(item, Item::Interp1 { .. });
            if !(ctx.interp1 && plain) {
                break;
            }
            item = Item::Interp1 {
                eip: ins.ip32(),
                next: next_ip(&ins, ctx),
                before: 0,
            };
            class = Class::Callout;
        }
        if let Item::Div(_, _, _, before) | Item::Interp1 { before, .. } = &mut item {
            *before = p.insns;
        }
        if let Item::Mem(m) = &mut item {
            m.before = p.insns;
            if let Some(pre) = &mut m.pre {
                pre.before = p.insns;
            }
        }
        p.insns += 1;
        match class {
            Class::Inline => p.inline += 1,
            Class::Callout => p.callouts += 1,
            _ => p.ident += 1,
        }
        p.next_eip = next_ip(&ins, ctx);
        p.eips.push(ins.ip32());
        // A trace goes into a leaf function called in this page, and on
        // after the CALL at the leaf's RET.
        let mut goto = None;
        let pos = |t: u32| start as i64 + t as i64 - eip as i64;
        let in_page = |t: u32| {
            !ctx.code16
                && (t ^ eip) >> 12 == 0
                && (0..code.len() as i64).contains(&pos(t))
                && p.insns < MAX_TU as u32
        };
        if let Item::Mem(m) = &mut item {
            match m.op {
                MemOp::Call { ret, target }
                    if in_page(target)
                        && in_page(ret)
                        && leaf(code, pos(target) as usize, target, ctx, forced) =>
                {
                    m.op = MemOp::CallIn { ret };
                    calls.push(ret);
                    goto = Some(target);
                }
                MemOp::Ret(imm) if calls.last().is_some_and(|&r| in_page(r)) => {
                    let expect = calls.pop().unwrap_or_default();
                    m.op = MemOp::RetIn { imm, expect };
                    goto = Some(expect);
                }
                _ => {}
            }
        }
        if let Some(t) = goto {
            p.next_eip = t;
            p.traced = true;
            p.items.push(item);
            // (In `code`: checked above.)
            let _ = dec.set_position(pos(t) as usize);
            dec.set_ip(t as u64);
            continue;
        }
        let ends = match &item {
            Item::Sti | Item::Jmp(_) | Item::Jcc(..) | Item::JmpReg(_) => true,
            Item::Mem(m) => matches!(
                m.op,
                MemOp::Call { .. } | MemOp::Ret(_) | MemOp::CallInd { .. } | MemOp::JmpMem
            ),
            _ => false,
        };
        p.items.push(item);
        if ends {
            break;
        }
    }
    if p.insns > 0 {
        flags_liveness(&mut p.items);
        return Translation::Tu(p);
    }
    // A call-out: count how far the interpreter may run (up to the next
    // translatable instruction or control transfer).
    let code = &code[start..code.len().min(start + (page_end - eip as u64) as usize)];
    let mut dec = Decoder::with_ip(bits, code, eip as u64, DecoderOptions::NONE);
    let (mut run, mut callouts) = (0, 0);
    let mut first = 0u32;
    while (run as usize) < MAX_CALLOUT_RUN && dec.can_decode() {
        let ins = dec.decode();
        let foreign = ctx.foreign_vendor && vendor_difference(&ins).is_some();
        if run > 0
            && (ins.is_invalid() || (classify(&ins, ctx, foreign).is_some() && !forced(ins.ip32())))
        {
            break;
        }
        if run == 0 {
            // Form and segment (for the profile).
            let seg = match ins.segment_prefix() {
                Register::FS => 1,
                Register::GS => 2,
                Register::None => 0,
                _ => 3,
            };
            let why = if forced(ins.ip32()) {
                1
            } else if !ctx.flat_data {
                2
            } else {
                0
            };
            first = (ins.code() as u32 * 4 + seg) * 4 + why;
        }
        run += 1;
        if !ins.is_invalid() && is_system(&ins) {
            callouts += 1;
        }
        if ins.is_invalid() || ins.flow_control() != FlowControl::Next {
            break;
        }
    }
    Translation::Interp {
        run: run.max(1),
        callouts,
        first,
    }
}

/// The EIP after `ins` (IP wraps at 64 KiB in 16-bit code).
fn next_ip(ins: &Instruction, ctx: Ctx) -> u32 {
    if ctx.code16 {
        ins.next_ip32() & 0xffff
    } else {
        ins.next_ip32()
    }
}

const ARITH_BITS: u32 = iced_x86::RflagsBits::OF
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
fn may_keep_flags(m: Mnemonic) -> bool {
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
const LEAF_MAX: usize = 12;

/// The code at `code[at]` (EIP `target`) is a leaf function: at most
/// [`LEAF_MAX`] translatable instructions without control transfers, then
/// RET or RET imm16, all in `code` and the page.
fn leaf(code: &[u8], at: usize, target: u32, ctx: Ctx, forced: &dyn Fn(u32) -> bool) -> bool {
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
fn flags_liveness(items: &mut [Item]) {
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
/// half). DIV/IDIV differ in their flags too, but `Item::Div` computes
/// them for the profile and the other forms are interpreted.
fn vendor_difference(ins: &Instruction) -> Option<u32> {
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
fn harmless(ins: &Instruction) -> bool {
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
        && matches!(
            ins.mnemonic(),
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
                | Nop
        )
}

/// The arithmetic flags in `mask`, left as the vendor's silicon leaves them
/// by the instruction before `code[0]` (EIP `ip`), are written over by the
/// next few harmless instructions of the same TU before anything reads
/// them (`avail`: how many more instructions the TU may hold).
fn flags_dead_after(code: &[u8], ip: u32, mut mask: u32, avail: u32, page_end: u64) -> bool {
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

fn classify(ins: &Instruction, ctx: Ctx, foreign: bool) -> Option<(Item, Class)> {
    use Mnemonic::*;
    let m = ins.mnemonic();
    if ins.has_lock_prefix()
        && !(ins.op0_kind() == OpKind::Memory
            && matches!(
                m,
                Add | Or
                    | Adc
                    | Sbb
                    | And
                    | Sub
                    | Xor
                    | Inc
                    | Dec
                    | Neg
                    | Not
                    | Xchg
                    | Cmpxchg
                    | Xadd
                    | Bts
                    | Btr
                    | Btc
                    | Cmpxchg8b
            ))
    {
        return None; // #UD
    }
    if matches!(m, Bt | Bts | Btr | Btc)
        && ins.op0_kind() == OpKind::Memory
        && ins.op1_kind() == OpKind::Register
    {
        return None; // the bit offset reaches beyond the operand
    }
    if foreign {
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
    if ctx.interp1 && !ctx.code16 && (ins.is_string_instruction() || matches!(m, Rdtsc | In | Out))
    {
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
    match m {
        Jmp | Jo | Jno | Jb | Jae | Je | Jne | Jbe | Ja | Js | Jns | Jp | Jnp | Jl | Jge | Jle
        | Jg => {
            // Near relative forms with the code's own operand size only:
            // o16 in 32-bit code truncates EIP, o32 in 16-bit code may
            // pass the CS limit (flat 32-bit CS needs no limit check, and
            // 16-bit code runs only with a limit of at least 0xffff).
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
            if m == Jmp {
                return Some((Item::Jmp(target), Class::Ident));
            }
            return Some((
                Item::Jcc(ins.condition_code(), target, next_ip(ins, ctx)),
                Class::Ident,
            ));
        }
        Pause => return Some((Item::Nop, Class::Ident)),
        Nop if ins.code() == Code::Nopd || ins.code() == Code::Nopw || ins.op_count() <= 1 => {
            return Some((Item::Nop, Class::Ident));
        }
        Cli if ctx.cpl == 0 => return Some((Item::Cli, Class::Inline)),
        // DF lives in `CpuState` (string instructions run on the
        // interpreter; the host's DF stays clear).
        Cld => return Some((Item::SetDf(false), Class::Ident)),
        Std => return Some((Item::SetDf(true), Class::Ident)),
        Sti if ctx.cpl == 0 => return Some((Item::Sti, Class::Inline)),
        Smsw | Sldt | Str
            if ctx.cpl == 0
                && ctx.inline_sensitive
                && ins.op0_kind() == OpKind::Register
                && !ctx.code16 =>
        {
            let r = ins.op0_register();
            let host = map_reg(r)?;
            let size = r.size() as u32;
            if size != 2 && size != 4 {
                return None;
            }
            let off = match m {
                Smsw => OFF_CR0,
                Sldt => OFF_LDTR_SEL,
                _ => OFF_TR_SEL,
            };
            return Some((Item::StoreReg(off, host, size), Class::Inline));
        }
        _ => {}
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
        return Some((Item::Mem(Box::new(mi)), Class::Ident));
    }
    let ok = matches!(
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
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Xchg
            | Bswap
            | Cbw
            | Cwde
            | Cwd
            | Cdq
            | Clc
            | Stc
            | Cmc
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
        return None;
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
        return None;
    }

    if m == Bswap && ins.op0_register().size() != 4 {
        return None; // BSWAP r16 is undefined
    }
    // Rebuild the forms that do not exist in 64-bit mode (and the moffs
    // forms, which take no base register).
    let moffs = |code: Code, r: Register, load: bool| -> Option<Instruction> {
        let mo = iced_x86::MemoryOperand::with_base_displ(Register::R11, 0);
        if load {
            Instruction::with2(code, r, mo).ok()
        } else {
            Instruction::with2(code, mo, r).ok()
        }
    };
    let mut h = match ins.code() {
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
    };
    h.set_segment_prefix(Register::None);
    // One virtual CPU: a locked access is an ordinary one.
    h.set_has_lock_prefix(false);
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

/// The address of a guest memory operand, as the inline probe forms it.
#[derive(Clone, Copy, Debug)]
struct Addr {
    /// Host base and index registers (32-bit), scale, displacement.
    base: Register,
    index: Register,
    scale: u32,
    disp: u32,
    /// `CpuState` offset of the segment base to add.
    seg_base: Option<i32>,
    /// 16-bit addressing (see [`MemInsn::addr16`]).
    addr16: bool,
}

impl MemInsn {
    /// A memory instruction at `ins`'s EIP (the other fields default:
    /// no pre-read, no `via`, guest flags live).
    fn new(op: MemOp, ins: Instruction, a: Addr, size: u32, write: bool) -> MemInsn {
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

/// The operand of `ins` uses 16-bit addressing.
fn is_addr16(ins: &Instruction) -> bool {
    let (b, x) = (ins.memory_base(), ins.memory_index());
    b.size() == 2
        || x.size() == 2
        || (b == Register::None && x == Register::None && ins.memory_displ_size() == 2)
}

/// `CpuState` offset of segment register `r`'s base.
fn seg_base_off(r: Register) -> Option<i32> {
    let i = popek_cpu::decode::sreg(r)? as i32;
    Some(OFF_SEG_BASE + i * SEG_SIZE)
}

/// The address of a guest memory operand the inline probe can compute, or
/// `None`: in 32-bit code 32-bit addressing through DS/ES/SS (flat) and
/// usable FS/GS (their base added); in 16-bit code 16-bit addressing
/// through usable DS/ES/SS/FS/GS (the base always added).
fn mem_addr(guest: &Instruction, ctx: Ctx) -> Option<Addr> {
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
fn stack_addr(ctx: Ctx, disp: i32) -> Addr {
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
fn inline_op(ins: &Instruction, ctx: Ctx) -> Option<(Item, Class)> {
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
fn indirect_mem_op(ins: &Instruction, ctx: Ctx) -> Option<MemInsn> {
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
fn mem_form(guest: &Instruction, mut h: Instruction, m: Mnemonic, ctx: Ctx) -> Option<MemInsn> {
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
fn stack_op(ins: &Instruction, ctx: Ctx) -> Option<MemInsn> {
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
fn encodable(mut i: Instruction) -> Option<Instruction> {
    // CodeAssembler treats a non-zero IP as a label: drop the guest's.
    i.set_ip(0);
    let mut e = Encoder::new(64);
    e.encode(&i, 0).ok().map(|_| i)
}

/// The guest GPRs in `CpuState.gpr` order, as host registers.
const HOST_GPRS: [AsmRegister64; 8] = [rax, rcx, rdx, rbx, r8, rbp, rsi, rdi];

/// A compiled TU.
pub struct Compiled {
    /// Host code.
    pub code: Vec<u8>,
    /// Offset of the chained entry (after the prologue and the loads): the
    /// host registers already hold the guest's.
    pub body: u64,
    /// Chainable exits: offset of a `jmp rel32`'s displacement and the guest
    /// EIP it leaves for (same page as the TU). Initially the jump leads to
    /// the exit stub; [`patch`] points it at the target's body.
    pub sites: Vec<(u64, u32)>,
    /// Memory instructions that use another's probe ([`share`]).
    pub shared: u32,
}

/// The CCF entry (sysv64: `&CpuState` in RDI, chain allowance in RSI):
/// saves the callee-saved registers, keeps the state pointer in R15, the
/// allowance in R13, zeroes the retired count (R14), loads the guest flags
/// and GPRs.
fn emit_prologue(a: &mut CodeAssembler, bmi2: bool) -> Result<(), IcedError> {
    for r in [rbx, rbp, r12, r13, r14, r15] {
        a.push(r)?;
    }
    a.mov(r15, rdi)?;
    a.mov(r13, rsi)?;
    a.xor(r14d, r14d)?;
    if bmi2 {
        // The guest flags without POPFQ (microcoded, slow): OF from
        // ADD AL,7Fh on AL = OF (1 + 7Fh overflows), then SAHF for SF ZF AF
        // PF CF (it leaves OF alone). Any host with BMI2 has LAHF/SAHF in
        // 64-bit mode.
        a.mov(rax, qword_ptr(r15 + OFF_RFLAGS))?;
        a.mov(ecx, eax)?;
        a.shr(ecx, 11)?;
        a.and(ecx, 1)?;
        a.mov(ah, al)?;
        a.mov(al, cl)?;
        a.add(al, 0x7f)?;
        a.sahf()?;
        for (i, r) in HOST_GPRS.iter().enumerate() {
            a.mov(*r, qword_ptr(r15 + OFF_GPR + 8 * i as i32))?;
        }
    } else {
        emit_load_state(a)?;
    }
    Ok(())
}

/// What the whole cache shares ([`compile_runtime`]): the entry every
/// dispatch calls and the exit tail every CCF leaves through.
#[derive(Clone, Copy, Debug)]
pub struct Runtime {
    /// `extern "sysv64" fn(*mut CpuState, chain: u64, body: u64) ->
    /// (retired, chain left)`: the prologue, then a jump to the CCF body.
    pub entry: u64,
    /// The exit tail (flags and GPRs back, return).
    pub tail: u64,
}

/// Compiles the shared entry and exit tail for address `ip`: CCFs
/// compiled against it ([`compile_with`] with `Some(runtime)`) have neither
/// a prologue nor a tail of their own (half of a small TU's code, and of
/// the time spent encoding it). Returns the code and the tail's offset.
pub fn compile_runtime(ip: u64, bmi2: bool) -> Result<(Vec<u8>, u64), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.set_prefer_short_branch(false);
    // The body (RDX, the third argument) waits in R11 (caller-saved,
    // untouched by the prologue, free at a body's entry).
    a.mov(r11, rdx)?;
    emit_prologue(&mut a, bmi2)?;
    a.jmp(r11)?;
    let tail = a.instructions().len();
    emit_exit_tail(&mut a)?;
    let (code, offsets) = encode_block(a.instructions(), ip)?;
    Ok((code, offsets[tail] as u64))
}

/// Encodes the instructions of a `CodeAssembler` at `ip` as they are
/// (branch forms are not changed: near branches are rel32, JRCXZ rel8),
/// resolving its labels — an instruction's IP is its label's id, and a
/// branch or RIP-relative target equal to a label id means that label;
/// any other target is an absolute address. Returns the code and each
/// instruction's offset. Two passes of iced's `Encoder`: sizes, then the
/// bytes. (iced's block encoder, which allocates per instruction and can
/// resize branches, took ~60 % of the time spent translating.)
fn encode_block(instrs: &[Instruction], ip: u64) -> Result<(Vec<u8>, Vec<u32>), IcedError> {
    let mut enc = Encoder::try_with_capacity(64, instrs.len() * 8)?;
    let mut offsets = Vec::with_capacity(instrs.len() + 1);
    let mut labels: Vec<(u64, u64)> = Vec::new();
    let retarget = |ins: &Instruction, to: &dyn Fn(u64) -> u64| -> Instruction {
        let mut t = *ins;
        for i in 0..t.op_count() {
            if t.op_kind(i) == OpKind::NearBranch64 {
                t.set_near_branch64(to(t.near_branch64()));
            }
        }
        if t.is_ip_rel_memory_operand() {
            t.set_memory_displacement64(to(t.memory_displacement64()));
        }
        t
    };
    // Sizes (every branch form has a fixed size): aim each target at the
    // instruction itself, in reach of any form.
    let mut at = ip;
    for ins in instrs {
        if ins.ip() != 0 {
            labels.push((ins.ip(), at));
        }
        offsets.push((at - ip) as u32);
        at += enc.encode(&retarget(ins, &|_| at), at)? as u64;
    }
    offsets.push((at - ip) as u32);
    labels.sort_unstable();
    let resolve = |t: u64| match labels.binary_search_by_key(&t, |&(id, _)| id) {
        Ok(k) => labels[k].1,
        Err(_) => t,
    };
    enc.set_buffer(Vec::with_capacity((at - ip) as usize));
    let mut at = ip;
    for (k, ins) in instrs.iter().enumerate() {
        debug_assert_eq!(at - ip, offsets[k] as u64);
        at += enc.encode(&retarget(ins, &resolve), at)? as u64;
    }
    Ok((enc.take_buffer(), offsets))
}

/// Compiles a plan into host code for address `ip` (see [`compile_with`]:
/// probes shared wherever possible).
pub fn compile(
    p: &Plan,
    ip: u64,
    tlb: &Probe,
    page: u32,
    ib: Option<&IbTable>,
) -> Result<Compiled, IcedError> {
    compile_with(p, ip, tlb, page, ib, &|_| false, None)
}

/// Compiles a plan into host code for address `ip`.
///
/// The fragment is an `extern "sysv64" fn(*mut CpuState, allowance: u64)
/// -> (u64, u64)`: it saves the callee-saved registers (RBX, RBP,
/// R12–R15), keeps the state pointer in R15, the chain allowance in R13
/// (instructions the dispatch may still retire) and the
/// instructions retired in R14, loads the eight guest GPRs into host
/// registers and the guest arithmetic flags into RFLAGS, runs the body,
/// and on every exit stores flags, GPRs and the next EIP back. It returns
/// the instructions retired with the exit's marks and the chain counts
/// (see [`RETIRED_MASK`]) and what is left of the allowance. An exit to a
/// known EIP in the same page may jump straight to the body of that TU's
/// CCF while the allowance covers another TU (chaining).
///
/// On BMI2 hosts, memory instructions with the same base and index share
/// one TLB probe ([`share`]), except groups headed at an EIP for which
/// `nogroup` is true (their span's probe kept missing).
pub fn compile_with(
    p: &Plan,
    ip: u64,
    tlb: &Probe,
    page: u32,
    ib: Option<&IbTable>,
    nogroup: &dyn Fn(u32) -> bool,
    runtime: Option<&Runtime>,
) -> Result<Compiled, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.set_prefer_short_branch(false);
    if runtime.is_none() {
        emit_prologue(&mut a, tlb.bmi2)?;
    }
    let body = a.instructions().len();
    let mut consts = Consts {
        idx: a.create_label(),
        page: a.create_label(),
        bit32: a.create_label(),
        bit16: a.create_label(),
        tail: a.create_label(),
    };
    let tail = consts.tail;
    let mut ex = Exits {
        cs_lo: p.cs_lo,
        page,
        n: p.insns,
        sites: Vec::new(),
        ib: ib.copied(),
        tlb: *tlb,
        tail,
    };
    let mut ended = false;
    // Slow paths: label, guest EIP, instructions before, exit_info word 1.
    let mut slow: Vec<(CodeLabel, u32, u32, u64)> = Vec::new();
    // RETs of callees the trace went into that returned elsewhere: label,
    // instructions retired.
    let mut returns: Vec<(CodeLabel, u32)> = Vec::new();
    let info1 = |m: &MemInsn| (m.size | (m.write as u32) << 8) as u64;
    let roles = if tlb.bmi2 {
        share::plan_sharing(&p.items, nogroup)
    } else {
        vec![None; p.items.len()]
    };
    for (k, item) in p.items.iter().enumerate() {
        match *item {
            Item::Ident(i) => a.add_instruction(i)?,
            Item::Mem(ref m) => {
                if let Some(role) = roles[k] {
                    emit_shared(&mut a, m, role, tlb, consts, &mut slow)?;
                } else {
                    if let Some(pre) = &m.pre {
                        let miss = a.create_label();
                        emit_probe(&mut a, pre, tlb, miss, consts)?;
                        slow.push((miss, pre.eip, pre.before, info1(pre)));
                    }
                    let miss = a.create_label();
                    emit_probe(&mut a, m, tlb, miss, consts)?;
                    slow.push((miss, m.eip, m.before, info1(m)));
                }
                match m.op {
                    MemOp::Call { target, .. } => {
                        ex.exit(&mut a, target)?;
                        ended = true;
                    }
                    MemOp::CallInd { .. } | MemOp::JmpMem => {
                        a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                        emit_indirect_exit(&mut a, ib, tlb, tail, p.insns)?;
                        ended = true;
                    }
                    MemOp::Ret(_) => {
                        a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                        emit_indirect_exit(&mut a, ib, tlb, tail, p.insns)?;
                        ended = true;
                    }
                    MemOp::RetIn { expect, .. } => {
                        // EIP (R11) − expect, flag-free, into ECX: zero
                        // goes on; else out of line, the indirect exit.
                        let mut go = a.create_label();
                        let other = a.create_label();
                        a.mov(r12, rcx)?;
                        a.lea(ecx, dword_ptr(r11 + (expect as i32).wrapping_neg()))?;
                        a.jrcxz(go)?;
                        a.jmp(other)?;
                        a.set_label(&mut go)?;
                        a.mov(rcx, r12)?;
                        returns.push((other, m.before + 1));
                    }
                    _ => {}
                }
            }
            Item::Nop => {}
            Item::Interp1 { eip, next, before } => {
                emit_interp1(&mut a, eip, next, before, tlb, tail)?;
            }
            Item::SetDf(set) => {
                a.pushfq()?;
                if set {
                    a.or(qword_ptr(r15 + OFF_RFLAGS), DF)?;
                } else {
                    a.and(qword_ptr(r15 + OFF_RFLAGS), !DF)?;
                }
                a.popfq()?;
            }
            Item::Cli => {
                a.pushfq()?;
                a.and(qword_ptr(r15 + OFF_RFLAGS), !IF)?;
                a.popfq()?;
            }
            Item::Sti => {
                // IF 0 → 1 starts the interrupt shadow (SDM: STI); never
                // chained: the dispatcher must see the shadow.
                let mut set = a.create_label();
                a.pushfq()?;
                a.test(dword_ptr(r15 + OFF_RFLAGS), IF)?;
                a.jnz(set)?;
                a.mov(byte_ptr(r15 + OFF_SHADOW), 1)?;
                a.set_label(&mut set)?;
                a.or(qword_ptr(r15 + OFF_RFLAGS), IF)?;
                a.popfq()?;
                a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                emit_store_exit(&mut a, Some(p.next_eip), None, tail)?;
                ended = true;
            }
            Item::StoreReg(off, r, size) => {
                let ins = if off == OFF_CR0 {
                    // SMSW r: CR0 (low 32 bits, or low 16 merged).
                    if size == 4 {
                        Instruction::with2(Code::Mov_r32_rm32, r, mem(off))
                    } else {
                        Instruction::with2(Code::Mov_r16_rm16, r, mem(off))
                    }
                } else if size == 4 {
                    Instruction::with2(Code::Movzx_r32_rm16, r, mem(off))
                } else {
                    Instruction::with2(Code::Mov_r16_rm16, r, mem(off))
                }?;
                a.add_instruction(ins)?;
            }
            Item::Jmp(t) => {
                ex.exit(&mut a, t)?;
                ended = true;
            }
            Item::Div(r, signed, eip, before) => {
                emit_div(&mut a, r, signed, eip, before, tlb, tail)?;
            }
            Item::JmpReg(r) => {
                a.add_instruction(Instruction::with2(Code::Mov_r32_rm32, Register::R11D, r)?)?;
                a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                emit_indirect_exit(&mut a, ib, tlb, tail, p.insns)?;
                ended = true;
            }
            Item::Jcc(cc, t, f) => {
                let mut taken = a.create_label();
                jcc(&mut a, cc, taken)?;
                ex.exit(&mut a, f)?;
                a.set_label(&mut taken)?;
                ex.exit(&mut a, t)?;
                ended = true;
            }
        }
    }
    if !ended {
        ex.exit(&mut a, p.next_eip)?;
    }
    for (mut l, n) in returns {
        // A RET the trace went into returned elsewhere.
        a.set_label(&mut l)?;
        a.mov(rcx, r12)?;
        a.lea(r14, qword_ptr(r14 + n as i32))?;
        emit_indirect_exit(&mut a, ib, tlb, tail, n)?;
    }
    for (mut l, eip, before, info) in slow {
        // TLB miss: the guest flags back, leave before the instruction and
        // have the dispatcher run it on the interpreter (which walks the
        // page tables, faults precisely or reaches MMIO).
        a.set_label(&mut l)?;
        if tlb.bmi2 {
            a.mov(rcx, r12)?;
        } else {
            a.push(r12)?;
            a.popfq()?;
        }
        // Tell the dispatcher the access (adaptive BT looks at it).
        a.mov(r10, tlb.exit_info)?;
        a.mov(qword_ptr(r10), r9)?;
        a.mov(qword_ptr(r10 + 8), info as i32)?;
        a.lea(r14, qword_ptr(r14 + before as i32))?;
        emit_store_exit(&mut a, Some(eip), Some(SLOW_BIT), tail)?;
    }
    a.set_label(&mut consts.tail)?;
    match runtime {
        Some(rt) => a.jmp(rt.tail)?,
        None => emit_exit_tail(&mut a)?,
    }
    if tlb.bmi2 {
        // The flag-free probe's masks: TLB index bits, page bits.
        a.set_label(&mut consts.idx)?;
        a.dd(&[(tlb.entries - 1) << 12])?;
        a.set_label(&mut consts.page)?;
        a.dq(&[0x1_ffff_f000])?;
        a.set_label(&mut consts.bit32)?;
        a.dq(&[1 << 32])?;
        a.set_label(&mut consts.bit16)?;
        a.dq(&[1 << 16])?;
    }
    let (code, offsets) = encode_block(a.instructions(), ip)?;
    let body = offsets[body] as u64;
    let mut sites = Vec::new();
    for (k, t) in ex.sites {
        // The displacement follows the E9 opcode.
        sites.push((offsets[k] as u64 + 1, t));
    }
    for &(off, _) in &sites {
        assert_eq!(code[off as usize - 1], 0xe9, "chain site is a jmp rel32");
    }
    let shared = roles
        .iter()
        .filter(|r| matches!(r, Some(share::Share::Member { .. })))
        .count() as u32;
    Ok(Compiled {
        code,
        body,
        sites,
        shared,
    })
}

/// The exits of one CCF being compiled.
struct Exits {
    /// CS base & 0xfff.
    cs_lo: u32,
    /// The TU's linear page (`(cs_lo + eip) >> 12`): exits within it may
    /// chain.
    page: u32,
    /// Instructions of the TU.
    n: u32,
    /// Chain sites: index of the `jmp rel32` instruction, target EIP.
    sites: Vec<(usize, u32)>,
    /// The indirect-branch table (exits to other pages go through it).
    ib: Option<IbTable>,
    /// The TLB layout (for the indirect-branch table's checks).
    tlb: Probe,
    /// The CCF's exit tail.
    tail: CodeLabel,
}

impl Exits {
    /// Leaves the TU for `eip` (all of it retired): through a chain site
    /// when `eip` is in the same page, else through the indirect-branch
    /// table (which checks that the TLB still maps the target's page to
    /// the physical page its CCF was translated from) or the dispatcher.
    fn exit(&mut self, a: &mut CodeAssembler, eip: u32) -> Result<(), IcedError> {
        let same = (self.cs_lo + eip) >> 12 == self.page;
        if !same && self.ib.is_some() {
            a.lea(r14, qword_ptr(r14 + self.n as i32))?;
            a.mov(r11d, eip)?;
            return emit_indirect_exit(a, self.ib.as_ref(), &self.tlb, self.tail, self.n);
        }
        if same {
            // Counted as a chain; the stub (an unpatched site, or no
            // allowance left) takes the count back.
            let mut stub = a.create_label();
            a.lea(r14, qword_ptr(r14 + (self.n as i32 + CHAIN_ONE as i32)))?;
            let out = emit_allowance_check(a, self.n, self.tlb.bmi2)?;
            let site = a.instructions().len();
            a.jmp(stub)?;
            emit_allowance_out(a, out, self.tlb.bmi2)?;
            a.set_label(&mut stub)?;
            a.lea(r14, qword_ptr(r14 - CHAIN_ONE as i32))?;
            self.sites.push((site, eip));
        } else {
            a.lea(r14, qword_ptr(r14 + self.n as i32))?;
        }
        emit_store_exit(a, Some(eip), None, self.tail)
    }
}

/// The chain allowance (R13: instructions this dispatch may still retire)
/// after a TU that retired `n`: subtracts `n` and falls through when at
/// least [`MAX_TU`] are left (the next TU may run), guest flags and RCX
/// unchanged; else jumps to the returned label, which the caller places
/// with [`emit_allowance_out`] on its way out. R9 and R12 clobbered. (The
/// common case falls through: a taken branch per chained transfer cost
/// Debian's shell loop 8 %.)
fn emit_allowance_check(a: &mut CodeAssembler, n: u32, bmi2: bool) -> Result<CodeLabel, IcedError> {
    const _: () = assert!(MAX_TU == 1 << 6);
    let out = a.create_label();
    a.lea(r13, qword_ptr(r13 - n as i32))?;
    if bmi2 {
        // SHRX (no flags): zero when fewer than 64 are left; JRCXZ reads
        // no flags.
        a.mov(r12, rcx)?;
        a.mov(r9d, 6)?;
        a.shrx(rcx, r13, r9)?;
        a.jrcxz(out)?;
        a.mov(rcx, r12)?;
    } else {
        a.pushfq()?;
        a.cmp(r13, MAX_TU as i32)?;
        a.jb(out)?;
        a.popfq()?;
    }
    Ok(out)
}

/// Where [`emit_allowance_check`] jumps: guest RCX or flags back.
fn emit_allowance_out(
    a: &mut CodeAssembler,
    mut out: CodeLabel,
    bmi2: bool,
) -> Result<(), IcedError> {
    a.set_label(&mut out)?;
    if bmi2 {
        a.mov(rcx, r12)
    } else {
        a.popfq()
    }
}

/// Points the chain site at `site` (an RW address of a rel32 whose RX
/// address is `site_rx`) to `target_rx`.
pub fn patch(site_rw: &mut [u8; 4], site_rx: u64, target_rx: u64) {
    let rel = target_rx.wrapping_sub(site_rx + 4) as i64;
    debug_assert!(i32::try_from(rel).is_ok());
    *site_rw = (rel as i32).to_le_bytes();
}

/// A CCF's return value (R14, returned in RAX) holds the instructions
/// retired in bits 0–19 (a dispatch retires at most [`ALLOWANCE_MAX`] +
/// [`MAX_TU`]), [`SLOW_PATH`] (bit 20), [`IB_EXIT`] (bit 21), the chained
/// transfers in bits 22–41 ([`CHAIN_ONE`] each) and the indirect-branch
/// table hits in bits 42 and up ([`IB_HIT`]).
pub const RETIRED_MASK: u64 = (1 << 20) - 1;

/// Most instructions one dispatch lets CCFs retire through chaining (the
/// chain allowance passed in R13 is the dispatcher's budget, at most this).
pub const ALLOWANCE_MAX: u64 = 1 << 18;

/// One chained transfer in a CCF's return value.
pub const CHAIN_ONE: u64 = 1 << 22;

/// The chained transfers' bits of a CCF's return value.
pub const CHAIN_MASK: u64 = ((1 << 20) - 1) << 22;

const SLOW_BIT: u32 = 20;

/// Bit of a CCF's return value: the instruction at the returned EIP must
/// run on the interpreter (an inline TLB probe missed).
pub const SLOW_PATH: u64 = 1 << SLOW_BIT;

/// In the second word of `Probe::exit_info`: the probe that missed was a
/// shared one ([`share`]); the span's size is in bits 16 and up (else the
/// access's size is in bits 0–7); bit 8: write.
pub const SHARED: u64 = 1 << 9;

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
struct Consts {
    /// TLB index bits of a linear address (dword).
    idx: CodeLabel,
    /// Page bits of a 33-bit address (qword).
    page: CodeLabel,
    /// Bit 32 (qword).
    bit32: CodeLabel,
    /// Bit 16 (qword).
    bit16: CodeLabel,
    /// The CCF's exit tail.
    tail: CodeLabel,
}

/// Guest linear address → R9, TLB entry → R10, host address → R11; jumps
/// to `miss` (guest flags saved in R12) unless the access can go straight
/// to host memory; then runs the instruction.
fn emit_probe(
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
fn emit_shared(
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
fn emit_probe_bmi2(
    a: &mut CodeAssembler,
    m: &MemInsn,
    t: &Probe,
    miss: CodeLabel,
    consts: Consts,
) -> Result<(), IcedError> {
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

/// DIV/IDIV of EDX:EAX by `src` (a guest register or R9D): runs on the
/// host when it cannot raise #DE (unsigned: divisor ≠ 0 and EDX < divisor;
/// signed: divisor ≠ 0, EDX:EAX is EAX sign-extended and not INT_MIN / -1);
/// otherwise leaves before it for the interpreter (a slow-path exit, so
/// the dispatcher interprets it: #DE, or the rare wide dividend). The guest
/// flags are kept around it (the interpreter leaves them unchanged).
fn emit_div(
    a: &mut CodeAssembler,
    src: Register,
    signed: bool,
    eip: u32,
    before: u32,
    t: &Probe,
    tail: CodeLabel,
) -> Result<(), IcedError> {
    let reg = |c: Code, x: Register, y: Register| Instruction::with2(c, x, y);
    let mut fail = a.create_label();
    let mut done = a.create_label();
    a.pushfq()?;
    a.pop(r10)?;
    a.add_instruction(reg(Code::Test_rm32_r32, src, src)?)?;
    a.jz(fail)?;
    if signed {
        a.mov(r11d, eax)?;
        a.sar(r11d, 31)?;
        a.cmp(r11d, edx)?;
        a.jne(fail)?;
        let mut ok = a.create_label();
        a.add_instruction(Instruction::with2(Code::Cmp_rm32_imm8, src, -1)?)?;
        a.jne(ok)?;
        a.cmp(eax, i32::MIN)?;
        a.je(fail)?;
        a.set_label(&mut ok)?;
        a.add_instruction(Instruction::with1(Code::Idiv_rm32, src)?)?;
    } else {
        a.add_instruction(reg(Code::Cmp_r32_rm32, Register::EDX, src)?)?;
        a.jae(fail)?;
        a.add_instruction(Instruction::with1(Code::Div_rm32, src)?)?;
    }
    if t.amd_div_flags {
        a.and(r10, !(0xc4u32 as i32))?; // SF, ZF, PF
        a.or(r10, 0x10)?; // AF
    }
    a.push(r10)?;
    a.popfq()?;
    a.jmp(done)?;
    a.set_label(&mut fail)?;
    a.push(r10)?;
    a.popfq()?;
    // No access to report: bit 32 keeps adaptive BT from taking it for a
    // TLB miss.
    a.mov(r10, t.exit_info)?;
    a.mov(r9, 1u64 << 32)?;
    a.mov(qword_ptr(r10), r9)?;
    a.mov(qword_ptr(r10 + 8), 4)?;
    a.lea(r14, qword_ptr(r14 + before as i32))?;
    emit_store_exit(a, Some(eip), Some(SLOW_BIT), tail)?;
    a.set_label(&mut done)
}

/// The access of a memory instruction whose probe hit (R11 = host
/// address); the guest flags are in RFLAGS.
fn emit_access(
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
        MemOp::PushFlags => {
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
        MemOp::PopFlags { next, cpl } => {
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

/// `[r11]`.
fn at11() -> iced_x86::MemoryOperand {
    iced_x86::MemoryOperand::with_base(Register::R11)
}

/// ESP += `delta` (SP for a 16-bit stack), flag-free.
fn sp_add(a: &mut CodeAssembler, delta: i32, sp16: bool) -> Result<(), IcedError> {
    if sp16 {
        a.add_instruction(Instruction::with2(
            Code::Lea_r16_m,
            Register::R8W,
            iced_x86::MemoryOperand::with_base_displ(Register::R8, delta as i64),
        )?)
    } else {
        a.lea(r8d, dword_ptr(r8 + delta))
    }
}

/// The indirect-branch table a CCF probes inline (see [`emit_indirect_exit`]).
#[derive(Clone, Copy, Debug)]
pub struct IbTable {
    /// Address of record 0: [`IB_SLOTS`] records of [`IB_RECORD`] bytes.
    pub base: u64,
    /// The TU context bits of the key (`ctx << 32 | 1 << 40`).
    pub key_bits: u64,
    /// Address of the CPU's fetch-entry generation (`TlbLayout::fetch_gen`:
    /// a multiple of `popek_cpu::mmu::FETCH_GEN_STEP`, 2^41).
    pub gen: u64,
}

/// Records in the indirect-branch table (indexed by the low 16 bits of
/// the target EIP: MOVZX is the flag-free way to mask it).
pub const IB_SLOTS: usize = 1 << 16;
/// Bytes per record: key (EIP | context), TLB entry address, expected read
/// tag, expected host page, CCF body, [`IB_HIT`], the key + the fetch-entry
/// generation at which the TLB checks last passed, padding.
pub const IB_RECORD: usize = 64;
/// What a CCF adds to its return value (R14, see [`RETIRED_MASK`]) for
/// each indirect-branch table hit: a hit and a chained transfer.
pub const IB_HIT: u64 = 1 << IB_HIT_SHIFT | CHAIN_ONE;

/// Where the indirect-branch table hits start in a CCF's return value.
pub const IB_HIT_SHIFT: u32 = 42;

/// An indirect transfer's exit, EIP in R11 (zero-extended): while the
/// chain allowance lasts, look the target up in the indirect-branch table and
/// jump to its CCF's body when the record is for this EIP and context and
/// the CPU's TLB still maps the target's page, readable, to the same
/// physical page the TU was translated from (what the dispatcher's
/// `fetch_phys` + key lookup would find); else store and return to the
/// dispatcher. Touches no flags: LEA/MOV/NOT compute differences, JRCXZ
/// tests them (guest RCX waits in R12).
///
/// Fast path: the record's key + generation (field 6) equals the key + the
/// CPU's current fetch-entry generation — no fetch entry changed since the
/// TLB checks last passed for this record, so they still would. Else the
/// TLB checks run and, when they pass, field 6 is brought up to date.
fn emit_indirect_exit(
    a: &mut CodeAssembler,
    ib: Option<&IbTable>,
    tlb: &Probe,
    tail: CodeLabel,
    n: u32,
) -> Result<(), IcedError> {
    let Some(ib) = ib else {
        return emit_store_exit(a, None, Some(IB_EXIT_BIT), tail);
    };
    let mut exit = a.create_label();
    let mut miss = a.create_label();
    let mut miss2 = a.create_label();
    let mut hit = a.create_label();
    let out = emit_allowance_check(a, n, tlb.bmi2)?;
    // Guest RCX waits in R12 from here.
    a.mov(r12, rcx)?;
    a.movzx(r10d, r11w)?;
    a.lea(r10, qword_ptr(r10 * 8))?;
    a.mov(r9, ib.base)?;
    a.lea(r10, qword_ptr(r9 + r10 * 8))?;
    // Key: EIP | context (R9); + generation (R11).
    a.mov(r9, ib.key_bits)?;
    a.lea(r9, qword_ptr(r9 + r11))?;
    a.mov(rcx, ib.gen)?;
    a.mov(rcx, qword_ptr(rcx))?;
    a.lea(r11, qword_ptr(r9 + rcx))?;
    a.mov(rcx, qword_ptr(r10 + 48))?;
    a.not(rcx)?;
    a.lea(rcx, qword_ptr(r11 + rcx + 1))?;
    let mut slow = a.create_label();
    a.jrcxz(hit)?;
    a.jmp(slow)?;
    // Hit: count it in R14's bits 40 and up (the record holds 1 << 40;
    // counting in the record itself, a store the next lookup of the same
    // record waits for, cost callret 6.7 → 4.5 ns), go.
    a.set_label(&mut hit)?;
    a.mov(rcx, qword_ptr(r10 + 40))?;
    a.lea(r14, qword_ptr(r14 + rcx))?;
    a.mov(rcx, r12)?;
    a.jmp(qword_ptr(r10 + 32))?;
    // (Within JRCXZ's reach.)
    emit_allowance_out(a, out, tlb.bmi2)?;
    a.jmp(exit)?;
    // The slow checks: the key …
    a.set_label(&mut slow)?;
    a.mov(rcx, qword_ptr(r10))?;
    a.not(rcx)?;
    a.lea(rcx, qword_ptr(r9 + rcx + 1))?;
    let mut ok = a.create_label();
    a.jrcxz(ok)?;
    a.mov(r11d, r9d)?;
    a.jmp(miss)?;
    a.set_label(&mut ok)?;
    // … the TLB entry's read tag: the page is mapped and readable (= may be
    // fetched: no NX) at this privilege …
    a.mov(r9, qword_ptr(r10 + 8))?;
    a.mov(ecx, dword_ptr(r9 + tlb.read_tag))?;
    a.not(rcx)?;
    a.mov(r11, qword_ptr(r10 + 16))?;
    a.lea(rcx, qword_ptr(r11 + rcx + 1))?;
    let mut ok = a.create_label();
    a.jrcxz(ok)?;
    a.jmp(miss2)?;
    a.set_label(&mut ok)?;
    // … to the same physical page.
    a.mov(rcx, qword_ptr(r9 + tlb.host))?;
    a.not(rcx)?;
    a.mov(r11, qword_ptr(r10 + 24))?;
    a.lea(rcx, qword_ptr(r11 + rcx + 1))?;
    let mut ok = a.create_label();
    a.jrcxz(ok)?;
    a.jmp(miss2)?;
    a.set_label(&mut ok)?;
    // Passed: record the generation.
    a.mov(r9, ib.gen)?;
    a.mov(r9, qword_ptr(r9))?;
    a.mov(rcx, qword_ptr(r10))?;
    a.lea(rcx, qword_ptr(rcx + r9))?;
    a.mov(qword_ptr(r10 + 48), rcx)?;
    a.jmp(hit)?;
    a.set_label(&mut miss2)?;
    a.mov(r11d, dword_ptr(r10))?;
    a.set_label(&mut miss)?;
    a.mov(rcx, r12)?;
    a.set_label(&mut exit)?;
    emit_store_exit(a, None, Some(IB_EXIT_BIT), tail)
}

/// [`Item::Interp1`]: store the guest state (EIP = `eip`), call the
/// engine's one-instruction interpreter entry, then reload the state and
/// go on, or return to the dispatcher (`before` TU instructions retired
/// here; the interpreter counted its own) with the state it left.
fn emit_interp1(
    a: &mut CodeAssembler,
    eip: u32,
    next: u32,
    before: u32,
    t: &Probe,
    tail: CodeLabel,
) -> Result<(), IcedError> {
    emit_store_state(a, Some(eip))?;
    // Past the red zone, 16-byte aligned (RSP ≡ 8 mod 16 in a CCF: the
    // call into it and six pushes).
    a.sub(rsp, 136)?;
    a.mov(rdi, t.interp1_ctx)?;
    a.mov(esi, next)?;
    a.mov(edx, r14d)?;
    a.and(edx, RETIRED_MASK as u32)?;
    a.add(edx, before)?;
    a.mov(rax, t.interp1_fn)?;
    a.call(rax)?;
    a.add(rsp, 136)?;
    let mut go = a.create_label();
    a.test(eax, eax)?;
    a.jnz(go)?;
    // Leave with the state the interpreter left (the tail writes back
    // what is loaded here).
    a.lea(r14, qword_ptr(r14 + before as i32))?;
    emit_load_state(a)?;
    a.jmp(tail)?;
    a.set_label(&mut go)?;
    // The interpreter's results: GPRs and flags back into registers.
    emit_load_state(a)
}

/// Loads the guest GPRs and arithmetic flags from `CpuState` (POPFQ).
fn emit_load_state(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (i, r) in HOST_GPRS.iter().enumerate() {
        a.mov(*r, qword_ptr(r15 + OFF_GPR + 8 * i as i32))?;
    }
    a.mov(r9, qword_ptr(r15 + OFF_RFLAGS))?;
    a.and(r9d, ARITH)?;
    a.or(r9d, 2)?;
    a.push(r9)?;
    a.popfq()
}

fn mem(off: i32) -> iced_x86::MemoryOperand {
    iced_x86::MemoryOperand::with_base_displ(Register::R15, off as i64)
}

/// Bit of a CCF's return value: it left at an indirect transfer (RET) whose
/// target the inline lookup did not find (or the chain allowance ran out).
pub const IB_EXIT: u64 = 1 << IB_EXIT_BIT;
const IB_EXIT_BIT: u32 = 21;

/// Leaves the CCF for `eip` (or R11 when `None`): stores EIP, sets bit
/// `mark` (e.g. [`SLOW_PATH`]) of the retired count and jumps to the
/// CCF's exit tail ([`emit_exit_tail`], shared by all its exits: a CCF
/// has one per memory access, and the copies made up most of its code and
/// of the time spent encoding it). Flag-free.
fn emit_store_exit(
    a: &mut CodeAssembler,
    eip: Option<u32>,
    mark: Option<u32>,
    tail: CodeLabel,
) -> Result<(), IcedError> {
    emit_store_eip(a, eip)?;
    if let Some(bit) = mark {
        a.mov(r9, 1u64 << bit)?;
        a.lea(r14, qword_ptr(r14 + r9))?;
    }
    a.jmp(tail)
}

/// Stores EIP: `eip`, or R11 when `None`. Flag-free.
fn emit_store_eip(a: &mut CodeAssembler, eip: Option<u32>) -> Result<(), IcedError> {
    match eip {
        Some(e) => {
            a.mov(r9d, e)?;
            a.mov(qword_ptr(r15 + OFF_RIP), r9)
        }
        None => a.mov(qword_ptr(r15 + OFF_RIP), r11),
    }
}

/// Writes flags, GPRs and EIP (`eip`, or R11 when `None`) back.
fn emit_store_state(a: &mut CodeAssembler, eip: Option<u32>) -> Result<(), IcedError> {
    emit_store_regs(a)?;
    emit_store_eip(a, eip)
}

/// The exit tail: writes flags and GPRs back and returns (R14, R13).
fn emit_exit_tail(a: &mut CodeAssembler) -> Result<(), IcedError> {
    emit_store_regs(a)?;
    emit_return(a)
}

/// Writes the guest arithmetic flags and GPRs back.
fn emit_store_regs(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.pushfq()?;
    a.pop(r9)?;
    a.and(r9d, ARITH)?;
    a.mov(r10, qword_ptr(r15 + OFF_RFLAGS))?;
    a.and(r10, !ARITH)?;
    a.or(r10, r9)?;
    a.mov(qword_ptr(r15 + OFF_RFLAGS), r10)?;
    for (i, r) in HOST_GPRS.iter().enumerate() {
        a.mov(qword_ptr(r15 + OFF_GPR + 8 * i as i32), *r)?;
    }
    Ok(())
}

/// Returns (R14, R13) to the dispatcher.
fn emit_return(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, r14)?;
    a.mov(rdx, r13)?;
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r)?;
    }
    a.ret()
}

fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> Result<(), IcedError> {
    use ConditionCode as C;
    match cc {
        C::o => a.jo(l),
        C::no => a.jno(l),
        C::b => a.jb(l),
        C::ae => a.jae(l),
        C::e => a.je(l),
        C::ne => a.jne(l),
        C::be => a.jbe(l),
        C::a => a.ja(l),
        C::s => a.js(l),
        C::ns => a.jns(l),
        C::p => a.jp(l),
        C::np => a.jnp(l),
        C::l => a.jl(l),
        C::ge => a.jge(l),
        C::le => a.jle(l),
        C::g => a.jg(l),
        C::None => a.jmp(l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        Probe {
            set_base: 0x1000,
            entries: 1024,
            entry_shift: 5,
            way_stride: 1024 * 32,
            read_tag: 4,
            write_tag: 8,
            host: 24,
            exit_info: 0x2000,
            bmi2: std::arch::is_x86_feature_detected!("bmi2"),
            amd_div_flags: false,
            interp1_fn: 0,
            interp1_ctx: 0,
        }
    }

    fn compiles(code: &[u8]) -> usize {
        let ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: false,
            cs_lo: 0,
            interp1: false,
            foreign_vendor: false,
            amd: false,
        };
        plan_ctx(code, ctx).map_or(0, |p| p.insns as usize)
    }

    fn plan_ctx(code: &[u8], ctx: Ctx) -> Option<Plan> {
        match plan(code, 0x1000, ctx, &|_| false) {
            Translation::Tu(p) => {
                compile(&p, 0x10_0000, &probe(), 1, None).unwrap();
                Some(p)
            }
            Translation::Interp { .. } => None,
        }
    }

    /// PUSHFD, POPFD, SGDT/SIDT m, segment-register reads, SLDT/STR m are
    /// inline at CPL 0 in flat 32-bit code; at CPL 3 the segment reads,
    /// PUSHFD and POPFD are (POPF keeps IF unless IOPL = 3, decided at run
    /// time); all stay call-outs while the CPU reports sensitive
    /// instructions (the audit).
    #[test]
    fn sensitive_reads_are_inline() {
        let mut a = CodeAssembler::new(32).unwrap();
        a.pushfd().unwrap();
        a.mov(eax, ds).unwrap();
        a.mov(word_ptr(ebx + 4), fs).unwrap();
        a.push(es).unwrap();
        a.mov(cx, ss).unwrap();
        a.popfd().unwrap();
        a.sgdt(ptr(edi)).unwrap();
        a.sidt(ptr(edi + 8)).unwrap();
        a.sldt(word_ptr(edi)).unwrap();
        a.str(word_ptr(edi + 2)).unwrap();
        a.smsw(word_ptr(edi + 4)).unwrap();
        let code = a.assemble(0x1000).unwrap();
        let mut ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: false,
            cs_lo: 0,
            interp1: false,
            foreign_vendor: false,
            amd: false,
        };
        let p = plan_ctx(&code, ctx).unwrap();
        assert_eq!((p.insns, p.inline), (11, 11));
        ctx.cpl = 3;
        let p = plan_ctx(&code, ctx).unwrap();
        assert_eq!((p.insns, p.inline), (6, 6));
        ctx.cpl = 0;
        ctx.inline_sensitive = false;
        let p = plan_ctx(&code, ctx);
        assert!(p.is_none(), "PUSHFD is a call-out while the audit runs");
    }

    /// 16-bit code: ALU, 16-bit memory operands through segment bases,
    /// PUSH/POP, CALL rel16 translate; o32 jumps and 32-bit addressing do
    /// not.
    #[test]
    fn code16_translates() {
        let mut a = CodeAssembler::new(16).unwrap();
        a.add(ax, bx).unwrap();
        a.mov(cx, 5).unwrap();
        a.add_instruction(
            Instruction::with2(
                Code::Mov_r16_rm16,
                Register::DX,
                iced_x86::MemoryOperand::new(
                    Register::BX,
                    Register::SI,
                    1,
                    4,
                    1,
                    false,
                    Register::None,
                ),
            )
            .unwrap(),
        )
        .unwrap();
        a.push(dx).unwrap();
        a.pop(ax).unwrap();
        a.push(es).unwrap();
        a.lea(di, ptr(bp + di + 6)).unwrap();
        a.add(dword_ptr(ebx), eax).unwrap(); // 32-bit addressing: a call-out
        let code = a.assemble(0x1000).unwrap();
        let ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: true,
            cs_lo: 0x340,
            interp1: false,
            foreign_vendor: false,
            amd: false,
        };
        if !probe().bmi2 {
            return; // the 16-bit probe needs BMI2
        }
        let p = plan_ctx(&code, ctx).unwrap();
        assert_eq!(p.insns, 7);
        // Data segments not usable: register-only instructions still are.
        let p = plan_ctx(
            &code,
            Ctx {
                flat_data: false,
                ..ctx
            },
        )
        .unwrap();
        assert_eq!(p.insns, 2);
    }

    /// The worked example of `docs/binary-translation.md`: prints the CCF
    /// of a small loop (`cargo test -p popek-bt worked_example --
    /// --nocapture`).
    #[test]
    fn worked_example() {
        use iced_x86::{Formatter, IntelFormatter};
        // top: add eax,[ebx+ecx*4] / inc ecx / cmp ecx,edx / jne top
        let code = [0x03, 0x04, 0x8b, 0x41, 0x39, 0xd1, 0x75, 0xf8];
        let ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: false,
            cs_lo: 0,
            interp1: false,
            foreign_vendor: false,
            amd: false,
        };
        let Translation::Tu(p) = plan(&code, 0x1000, ctx, &|_| false) else {
            panic!("not translated")
        };
        assert_eq!((p.insns, p.ident), (4, 4));
        let c = compile(&p, 0x7f00_0000_0000, &probe(), 1, None).unwrap();
        assert_eq!(c.sites.len(), 2, "both Jcc exits chain");
        let host = c.code;
        let mut dec = Decoder::with_ip(64, &host, 0x7f00_0000_0000, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = String::new();
        for i in dec.iter() {
            out.push_str(&format!("{:5x}  ", i.ip() & 0xfff));
            f.format(&i, &mut out);
            out.push('\n');
        }
        println!("{} bytes\n{out}", host.len());
    }

    #[test]
    fn fs_gs_operands_compile_when_usable() {
        // mov eax, fs:[0x10]; add gs:[ebx+4], ecx; mov fs:[0x20], eax (moffs)
        let code = [
            0x64, 0x8b, 0x05, 0x10, 0, 0, 0, 0x65, 0x01, 0x4b, 0x04, 0x64, 0xa3, 0x20, 0, 0, 0,
        ];
        for (fs_gs, want) in [(3, 3), (0, 0)] {
            let ctx = Ctx {
                cpl: 0,
                inline_sensitive: true,
                flat_data: true,
                fs_gs,
                code16: false,
                cs_lo: 0,
                interp1: false,
                foreign_vendor: false,
                amd: false,
            };
            let n = match plan(&code, 0x1000, ctx, &|_| false) {
                Translation::Tu(p) => {
                    let mut t = probe();
                    t.bmi2 = true;
                    compile(&p, 0x10_0000, &t, 1, None).unwrap();
                    p.insns
                }
                Translation::Interp { .. } => 0,
            };
            assert_eq!(n, want);
        }
    }

    #[test]
    fn high_byte_registers_with_memory_compile() {
        // cmp [ebx], ah; mov dh, [esi+4]; hlt
        let code = [0x38, 0x23, 0x8a, 0x76, 0x04, 0xf4];
        assert_eq!(compiles(&code), 2);
    }

    #[test]
    fn memory_operands_compile() {
        // add [eax], al; mov ecx, [ebx+esi*4+0x10]; mov [esp+4], edx; hlt
        let code = [
            0x00, 0x00, 0x8b, 0x4c, 0xb3, 0x10, 0x89, 0x54, 0x24, 0x04, 0xf4,
        ];
        assert_eq!(compiles(&code), 3);
    }
}
