//! Leaving translated code: storing the guest state back, the indirect-
//! branch table and its lookup, running one instruction on the
//! interpreter, and the return to the dispatcher.

use super::*;

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
pub(crate) fn emit_indirect_exit(
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
pub(crate) fn emit_interp1(
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
pub(crate) fn emit_load_state(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (i, r) in HOST_GPRS.iter().enumerate() {
        a.mov(*r, qword_ptr(r15 + OFF_GPR + 8 * i as i32))?;
    }
    a.mov(r9, qword_ptr(r15 + OFF_RFLAGS))?;
    a.and(r9d, ARITH)?;
    a.or(r9d, 2)?;
    a.push(r9)?;
    a.popfq()
}

pub(crate) fn mem(off: i32) -> iced_x86::MemoryOperand {
    iced_x86::MemoryOperand::with_base_displ(Register::R15, off as i64)
}

/// Bit of a CCF's return value: it left at an indirect transfer (RET) whose
/// target the inline lookup did not find (or the chain allowance ran out).
pub const IB_EXIT: u64 = 1 << IB_EXIT_BIT;

pub(crate) const IB_EXIT_BIT: u32 = 21;

/// Leaves the CCF for `eip` (or R11 when `None`): stores EIP, sets bit
/// `mark` (e.g. [`SLOW_PATH`]) of the retired count and jumps to the
/// CCF's exit tail ([`emit_exit_tail`], shared by all its exits: a CCF
/// has one per memory access, and the copies made up most of its code and
/// of the time spent encoding it). Flag-free.
pub(crate) fn emit_store_exit(
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
pub(crate) fn emit_store_eip(a: &mut CodeAssembler, eip: Option<u32>) -> Result<(), IcedError> {
    match eip {
        Some(e) => {
            a.mov(r9d, e)?;
            a.mov(qword_ptr(r15 + OFF_RIP), r9)
        }
        None => a.mov(qword_ptr(r15 + OFF_RIP), r11),
    }
}

/// Writes flags, GPRs and EIP (`eip`, or R11 when `None`) back.
pub(crate) fn emit_store_state(a: &mut CodeAssembler, eip: Option<u32>) -> Result<(), IcedError> {
    emit_store_regs(a)?;
    emit_store_eip(a, eip)
}

/// The exit tail: writes flags and GPRs back and returns (R14, R13).
pub(crate) fn emit_exit_tail(a: &mut CodeAssembler) -> Result<(), IcedError> {
    emit_store_regs(a)?;
    emit_return(a)
}

/// Writes the guest arithmetic flags and GPRs back.
pub(crate) fn emit_store_regs(a: &mut CodeAssembler) -> Result<(), IcedError> {
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
pub(crate) fn emit_return(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, r14)?;
    a.mov(rdx, r13)?;
    for r in [r15, r14, r13, r12, rbp, rbx] {
        a.pop(r)?;
    }
    a.ret()
}

pub(crate) fn jcc(a: &mut CodeAssembler, cc: ConditionCode, l: CodeLabel) -> Result<(), IcedError> {
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
