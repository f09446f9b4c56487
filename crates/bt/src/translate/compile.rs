//! Emission: a planned TU becomes host code (the prologue, each item,
//! the exits and their allowance checks), encoded at its address in the
//! translation cache; the runtime stubs; patching a chained exit.

use super::*;

/// The guest GPRs in `CpuState.gpr` order, as host registers.
pub(crate) const HOST_GPRS: [AsmRegister64; 8] = [rax, rcx, rdx, rbx, r8, rbp, rsi, rdi];

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
pub(crate) fn emit_prologue(a: &mut CodeAssembler, bmi2: bool) -> Result<(), IcedError> {
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
pub(crate) fn encode_block(
    instrs: &[Instruction],
    ip: u64,
) -> Result<(Vec<u8>, Vec<u32>), IcedError> {
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
    let consts = Consts {
        idx: a.create_label(),
        page: a.create_label(),
        bit32: a.create_label(),
        bit16: a.create_label(),
        tail: a.create_label(),
    };
    let roles = if tlb.bmi2 {
        share::plan_sharing(&p.items, nogroup)
    } else {
        vec![None; p.items.len()]
    };
    let mut e = Emission {
        ex: Exits {
            cs_lo: p.cs_lo,
            page,
            n: p.insns,
            sites: Vec::new(),
            ib: ib.copied(),
            tlb: *tlb,
            tail: consts.tail,
        },
        a,
        p,
        tlb,
        ib,
        consts,
        slow: Vec::new(),
        returns: Vec::new(),
    };
    let mut ended = false;
    for (item, role) in p.items.iter().zip(&roles) {
        ended |= e.item(item, *role)?;
    }
    if !ended {
        e.ex.exit(&mut e.a, p.next_eip)?;
    }
    e.out_of_line()?;
    let Emission {
        mut a,
        mut consts,
        ex,
        ..
    } = e;
    a.set_label(&mut consts.tail)?;
    match runtime {
        Some(rt) => a.jmp(rt.tail)?,
        None => emit_exit_tail(&mut a)?,
    }
    if tlb.bmi2 {
        emit_probe_constants(&mut a, &mut consts, tlb)?;
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

/// The flag-free probe's masks: TLB index bits, page bits.
fn emit_probe_constants(
    a: &mut CodeAssembler,
    consts: &mut Consts,
    tlb: &Probe,
) -> Result<(), IcedError> {
    a.set_label(&mut consts.idx)?;
    a.dd(&[(tlb.entries - 1) << 12])?;
    a.set_label(&mut consts.page)?;
    a.dq(&[0x1_ffff_f000])?;
    a.set_label(&mut consts.bit32)?;
    a.dq(&[1 << 32])?;
    a.set_label(&mut consts.bit16)?;
    a.dq(&[1 << 16])
}

/// One CCF being emitted: the assembler, the TU, and what goes out of
/// line after the body.
struct Emission<'a> {
    a: CodeAssembler,
    p: &'a Plan,
    tlb: &'a Probe,
    ib: Option<&'a IbTable>,
    consts: Consts,
    ex: Exits,
    /// TLB-miss slow paths: label, guest EIP, instructions before,
    /// exit_info word 1.
    slow: Vec<(CodeLabel, u32, u32, u64)>,
    /// RETs of callees the trace went into that returned elsewhere: label,
    /// instructions retired.
    returns: Vec<(CodeLabel, u32)>,
}

impl Emission<'_> {
    /// Emits one item; true when it ends the CCF (an exit).
    fn item(&mut self, item: &Item, role: Option<share::Share>) -> Result<bool, IcedError> {
        let (p, tlb, ib, tail) = (self.p, self.tlb, self.ib, self.consts.tail);
        let a = &mut self.a;
        match *item {
            Item::Mem(ref m) => return self.memory(m, role),
            Item::Ident(i) => a.add_instruction(i)?,
            Item::Nop => {}
            Item::Interp1 { eip, next, before } => {
                emit_interp1(a, eip, next, before, tlb, tail)?;
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
                emit_store_exit(a, Some(p.next_eip), None, tail)?;
                return Ok(true);
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
                self.ex.exit(a, t)?;
                return Ok(true);
            }
            Item::Div(r, signed, eip, before) => {
                emit_div(a, r, signed, eip, before, tlb, tail)?;
            }
            Item::JmpReg(r) => {
                a.add_instruction(Instruction::with2(Code::Mov_r32_rm32, Register::R11D, r)?)?;
                a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                emit_indirect_exit(a, ib, tlb, tail, p.insns)?;
                return Ok(true);
            }
            Item::Jcc(cc, t, f) => {
                let mut taken = a.create_label();
                jcc(a, cc, taken)?;
                self.ex.exit(a, f)?;
                a.set_label(&mut taken)?;
                self.ex.exit(a, t)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A memory access through the inline TLB probe (shared with others
    /// or its own), then what the instruction does after it.
    fn memory(&mut self, m: &MemInsn, role: Option<share::Share>) -> Result<bool, IcedError> {
        let (p, tlb, ib, tail) = (self.p, self.tlb, self.ib, self.consts.tail);
        let info1 = |m: &MemInsn| (m.size | (m.write as u32) << 8) as u64;
        let a = &mut self.a;

        if let Some(role) = role {
            emit_shared(a, m, role, tlb, self.consts, &mut self.slow)?;
        } else {
            if let Some(pre) = &m.pre {
                let miss = a.create_label();
                emit_probe(a, pre, tlb, miss, self.consts)?;
                self.slow.push((miss, pre.eip, pre.before, info1(pre)));
            }
            let miss = a.create_label();
            emit_probe(a, m, tlb, miss, self.consts)?;
            self.slow.push((miss, m.eip, m.before, info1(m)));
        }
        match m.op {
            MemOp::Call { target, .. } => {
                self.ex.exit(a, target)?;
                return Ok(true);
            }
            MemOp::CallInd { .. } | MemOp::JmpMem => {
                a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                emit_indirect_exit(a, ib, tlb, tail, p.insns)?;
                return Ok(true);
            }
            MemOp::Ret(_) => {
                a.lea(r14, qword_ptr(r14 + p.insns as i32))?;
                emit_indirect_exit(a, ib, tlb, tail, p.insns)?;
                return Ok(true);
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
                self.returns.push((other, m.before + 1));
            }
            _ => {}
        }
        Ok(false)
    }

    /// After the body: the returns that went elsewhere and the TLB-miss
    /// slow paths.
    fn out_of_line(&mut self) -> Result<(), IcedError> {
        let (tlb, ib, tail) = (self.tlb, self.ib, self.consts.tail);
        let a = &mut self.a;
        for (mut l, n) in std::mem::take(&mut self.returns) {
            // A RET the trace went into returned elsewhere.
            a.set_label(&mut l)?;
            a.mov(rcx, r12)?;
            a.lea(r14, qword_ptr(r14 + n as i32))?;
            emit_indirect_exit(a, ib, tlb, tail, n)?;
        }
        for (mut l, eip, before, info) in std::mem::take(&mut self.slow) {
            // TLB miss: the guest flags back, leave before the instruction
            // and have the dispatcher run it on the interpreter (which
            // walks the page tables, faults precisely or reaches MMIO).
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
            emit_store_exit(a, Some(eip), Some(SLOW_BIT), tail)?;
        }
        Ok(())
    }
}

/// The exits of one CCF being compiled.
pub(crate) struct Exits {
    /// CS base & 0xfff.
    pub(crate) cs_lo: u32,
    /// The TU's linear page (`(cs_lo + eip) >> 12`): exits within it may
    /// chain.
    pub(crate) page: u32,
    /// Instructions of the TU.
    pub(crate) n: u32,
    /// Chain sites: index of the `jmp rel32` instruction, target EIP.
    pub(crate) sites: Vec<(usize, u32)>,
    /// The indirect-branch table (exits to other pages go through it).
    pub(crate) ib: Option<IbTable>,
    /// The TLB layout (for the indirect-branch table's checks).
    pub(crate) tlb: Probe,
    /// The CCF's exit tail.
    pub(crate) tail: CodeLabel,
}

impl Exits {
    /// Leaves the TU for `eip` (all of it retired): through a chain site
    /// when `eip` is in the same page, else through the indirect-branch
    /// table (which checks that the TLB still maps the target's page to
    /// the physical page its CCF was translated from) or the dispatcher.
    pub(crate) fn exit(&mut self, a: &mut CodeAssembler, eip: u32) -> Result<(), IcedError> {
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
pub(crate) fn emit_allowance_check(
    a: &mut CodeAssembler,
    n: u32,
    bmi2: bool,
) -> Result<CodeLabel, IcedError> {
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
pub(crate) fn emit_allowance_out(
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

pub(crate) const SLOW_BIT: u32 = 20;

/// Bit of a CCF's return value: the instruction at the returned EIP must
/// run on the interpreter (an inline TLB probe missed).
pub const SLOW_PATH: u64 = 1 << SLOW_BIT;

/// In the second word of `Probe::exit_info`: the probe that missed was a
/// shared one ([`share`]); the span's size is in bits 16 and up (else the
/// access's size is in bits 0–7); bit 8: write.
pub const SHARED: u64 = 1 << 9;

/// DIV/IDIV of EDX:EAX by `src` (a guest register or R9D): runs on the
/// host when it cannot raise #DE (unsigned: divisor ≠ 0 and EDX < divisor;
/// signed: divisor ≠ 0, EDX:EAX is EAX sign-extended and not INT_MIN / -1);
/// otherwise leaves before it for the interpreter (a slow-path exit, so
/// the dispatcher interprets it: #DE, or the rare wide dividend). The guest
/// flags are kept around it (the interpreter leaves them unchanged).
pub(crate) fn emit_div(
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

/// ESP += `delta` (SP for a 16-bit stack), flag-free.
pub(crate) fn sp_add(a: &mut CodeAssembler, delta: i32, sp16: bool) -> Result<(), IcedError> {
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
