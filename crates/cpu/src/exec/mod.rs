//! Instruction execution: the handler table and the operand helpers every
//! handler uses.
//!
//! To find where an instruction executes: `handler_for` maps its mnemonic to
//! a function in one of the modules below (`alu`, `control`, `stack`,
//! `string`, `system`, `fpu`). See `docs/cpu.md` for adding one.

use iced_x86::{ConditionCode, Instruction, Mnemonic};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::decode::{DecodedInsn, OpK, Operand, NO_REG};
use crate::exception::{Exc, Res};
use crate::flags::{size_mask, FlagOp};
use crate::hooks::{SensitiveEvent, SensitiveKind};
use crate::state::{flags::*, seg};

pub(crate) mod alu;
pub(crate) mod control;
pub(crate) mod fpu;
pub(crate) mod locked;
pub(crate) mod stack;
pub(crate) mod string;
pub(crate) mod system;

/// An instruction implementation.
pub type Handler = fn(&mut Cpu, &DecodedInsn, &mut dyn Bus) -> Res;

/// Operand-kind parameters for handlers specialized at decode time, so the
/// hot forms (register, memory, immediate) need no run-time dispatch.
pub(crate) const KR: u8 = 0;
/// Memory operand.
pub(crate) const KM: u8 = 1;
/// Immediate operand.
pub(crate) const KI: u8 = 2;
/// Any kind: decided at run time.
pub(crate) const KX: u8 = 3;

fn kind_of(insn: &Instruction, i: u32) -> u8 {
    use iced_x86::OpKind;
    if i >= insn.op_count() {
        return KX;
    }
    match insn.op_kind(i) {
        OpKind::Register if crate::decode::gpr(insn.op_register(i)).is_some() => KR,
        OpKind::Memory => KM,
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32 => KI,
        _ => KX,
    }
}

/// Picks the instantiation of a two-operand handler for the operand kinds.
macro_rules! pick2 {
    ($m:ident :: $f:ident, $insn:expr) => {
        match (kind_of($insn, 0), kind_of($insn, 1)) {
            (KR, KR) => $m::$f::<KR, KR>,
            (KR, KM) => $m::$f::<KR, KM>,
            (KR, KI) => $m::$f::<KR, KI>,
            (KM, KR) => $m::$f::<KM, KR>,
            (KM, KI) => $m::$f::<KM, KI>,
            _ => $m::$f::<KX, KX>,
        }
    };
}

/// Picks the instantiation of a one-operand handler.
macro_rules! pick1 {
    ($m:ident :: $f:ident, $insn:expr) => {
        match kind_of($insn, 0) {
            KR => $m::$f::<KR>,
            KM => $m::$f::<KM>,
            _ => $m::$f::<KX>,
        }
    };
}

/// The operand-size attribute (2 or 4) of an instruction.
pub fn op_size(insn: &Instruction, code_size: u8) -> u8 {
    match crate::facts::operand_size(insn.code()) {
        16 => 2,
        32 => 4,
        64 => 8,
        _ => code_size,
    }
}

fn undefined(_: &mut Cpu, _: &DecodedInsn, _: &mut dyn Bus) -> Res {
    Err(Exc::ud())
}

/// The condition code with discriminant `v` (for const-generic handlers).
#[inline(always)]
pub(crate) const fn cc_from_u8(v: u8) -> ConditionCode {
    use ConditionCode as C;
    const ALL: [ConditionCode; 17] = [
        C::None,
        C::o,
        C::no,
        C::b,
        C::ae,
        C::e,
        C::ne,
        C::be,
        C::a,
        C::s,
        C::ns,
        C::p,
        C::np,
        C::l,
        C::ge,
        C::le,
        C::g,
    ];
    ALL[v as usize]
}

/// Chooses the handler for an instruction.
pub fn handler_for(insn: &Instruction) -> Handler {
    use Mnemonic::*;
    if insn.is_invalid() {
        return undefined;
    }
    if let Some(h) = fpu::handler_for(insn) {
        return h;
    }
    match insn.mnemonic() {
        Add => pick2!(alu::add, insn),
        Or => pick2!(alu::or, insn),
        Adc => pick2!(alu::adc, insn),
        Sbb => pick2!(alu::sbb, insn),
        And => pick2!(alu::and, insn),
        Sub => pick2!(alu::sub, insn),
        Xor => pick2!(alu::xor, insn),
        Cmp => pick2!(alu::cmp, insn),
        Test => pick2!(alu::test, insn),
        Inc => pick1!(alu::inc, insn),
        Dec => pick1!(alu::dec, insn),
        Neg => alu::neg,
        Not => alu::not,
        Mov => {
            if insn.op0_register().is_segment_register()
                || insn.op1_register().is_segment_register()
            {
                system::mov_seg
            } else if insn.op0_register().is_cr() || insn.op1_register().is_cr() {
                system::mov_cr
            } else if insn.op0_register().is_dr() || insn.op1_register().is_dr() {
                system::mov_dr
            } else if insn.op0_register().is_tr() || insn.op1_register().is_tr() {
                undefined
            } else {
                pick2!(alu::mov, insn)
            }
        }
        Movzx => alu::movzx,
        Movsx => alu::movsx,
        Lea => alu::lea,
        Xchg => alu::xchg,
        Xadd => alu::xadd,
        Cmpxchg => alu::cmpxchg,
        Cmpxchg8b => alu::cmpxchg8b,
        Bswap => alu::bswap,
        Cbw | Cwde => alu::cbw,
        Cwd | Cdq => alu::cwd,
        Shl | Sal => alu::shl,
        Shr => alu::shr,
        Sar => alu::sar,
        Rol => alu::rol,
        Ror => alu::ror,
        Rcl => alu::rcl,
        Rcr => alu::rcr,
        Shld => alu::shld,
        Shrd => alu::shrd,
        Mul => alu::mul,
        Imul => alu::imul,
        Div => alu::div,
        Idiv => alu::idiv,
        Daa => alu::daa,
        Das => alu::das,
        Aaa => alu::aaa,
        Aas => alu::aas,
        Aam => alu::aam,
        Aad => alu::aad,
        Bt => alu::bt,
        Bts => alu::bts,
        Btr => alu::btr,
        Btc => alu::btc,
        // Without BMI1/LZCNT (not advertised), F3 0F BC/BD execute as
        // BSF/BSR, as on every processor before Haswell.
        Bsf | Tzcnt => alu::bsf,
        Bsr | Lzcnt => alu::bsr,
        Seta | Setae | Setb | Setbe | Sete | Setg | Setge | Setl | Setle | Setne | Setno
        | Setnp | Setns | Seto | Setp | Sets => alu::setcc,
        Cmova | Cmovae | Cmovb | Cmovbe | Cmove | Cmovg | Cmovge | Cmovl | Cmovle | Cmovne
        | Cmovno | Cmovnp | Cmovns | Cmovo | Cmovp | Cmovs => alu::cmovcc,
        Lahf => alu::lahf,
        Sahf => alu::sahf,
        Clc => alu::clc,
        Stc => alu::stc,
        Cmc => alu::cmc,
        Cld => alu::cld,
        Std => alu::std,
        Salc => alu::salc,
        Xlatb => alu::xlat,
        Pause => alu::pause,
        Nop | Prefetchnta | Prefetcht0 | Prefetcht1 | Prefetcht2 | Prefetchw | Lfence | Sfence => {
            alu::nop
        }
        Mfence => alu::mfence,
        Bound => alu::bound,

        Jmp => control::jmp,
        Ja | Jae | Jb | Jbe | Je | Jg | Jge | Jl | Jle | Jne | Jno | Jnp | Jns | Jo | Jp | Js => {
            use ConditionCode as C;
            match insn.condition_code() {
                C::o => control::jcc::<{ C::o as u8 }>,
                C::no => control::jcc::<{ C::no as u8 }>,
                C::b => control::jcc::<{ C::b as u8 }>,
                C::ae => control::jcc::<{ C::ae as u8 }>,
                C::e => control::jcc::<{ C::e as u8 }>,
                C::ne => control::jcc::<{ C::ne as u8 }>,
                C::be => control::jcc::<{ C::be as u8 }>,
                C::a => control::jcc::<{ C::a as u8 }>,
                C::s => control::jcc::<{ C::s as u8 }>,
                C::ns => control::jcc::<{ C::ns as u8 }>,
                C::p => control::jcc::<{ C::p as u8 }>,
                C::np => control::jcc::<{ C::np as u8 }>,
                C::l => control::jcc::<{ C::l as u8 }>,
                C::ge => control::jcc::<{ C::ge as u8 }>,
                C::le => control::jcc::<{ C::le as u8 }>,
                C::g => control::jcc::<{ C::g as u8 }>,
                C::None => control::jcc::<{ C::None as u8 }>,
            }
        }
        Call => control::call,
        Ret => control::ret,
        Retf => control::retf,
        Loop | Loope | Loopne => control::loop_,
        Jcxz | Jecxz => control::jcxz,
        Int => control::int,
        Int3 => control::int3,
        Into => control::into,
        Int1 => control::int1,
        Iret | Iretd => control::iret,

        Push => stack::push,
        Pop => stack::pop,
        Pusha | Pushad => stack::pusha,
        Popa | Popad => stack::popa,
        Pushf | Pushfd => stack::pushf,
        Popf | Popfd => stack::popf,
        Enter => stack::enter,
        Leave => stack::leave,

        Movsb | Movsw | Movsd => string::movs,
        Cmpsb | Cmpsw | Cmpsd => string::cmps,
        Stosb | Stosw | Stosd => string::stos,
        Lodsb | Lodsw | Lodsd => string::lods,
        Scasb | Scasw | Scasd => string::scas,
        Insb | Insw | Insd => string::ins,
        Outsb | Outsw | Outsd => string::outs,

        Lgdt | Lidt => system::lgdt_lidt,
        Sgdt | Sidt => system::sgdt_sidt,
        Lldt => system::lldt,
        Sldt => system::sldt,
        Ltr => system::ltr,
        Str => system::str_,
        Lmsw => system::lmsw,
        Smsw => system::smsw,
        Clts => system::clts,
        Invlpg => system::invlpg,
        Lar => system::lar,
        Lsl => system::lsl,
        Verr | Verw => system::verr_verw,
        Arpl => system::arpl,
        Cpuid => system::cpuid,
        Rdtsc => system::rdtsc,
        Rdmsr => system::rdmsr,
        Wrmsr => system::wrmsr,
        Sysenter => system::sysenter,
        Sysexit => system::sysexit,
        Hlt => system::hlt,
        Cli => system::cli,
        Sti => system::sti,
        In => system::in_,
        Out => system::out,
        Wbinvd | Invd => system::wbinvd,
        Lds | Les | Lfs | Lgs | Lss => system::lxs,
        Rdpmc => system::rdpmc,
        _ => undefined,
    }
}

impl Cpu {
    /// Reads a GPR operand.
    #[inline(always)]
    pub(crate) fn reg_get(&self, o: Operand) -> u64 {
        let v = self.st.gpr[o.reg as usize & 15];
        if o.hi {
            (v >> 8) & 0xff
        } else {
            v & size_mask(o.size)
        }
    }

    /// Writes a GPR operand, preserving the untouched bits like hardware
    /// (8/16-bit writes merge; 32-bit writes zero-extend).
    #[inline(always)]
    pub(crate) fn reg_set(&mut self, o: Operand, v: u64) {
        let r = &mut self.st.gpr[o.reg as usize & 15];
        match (o.size, o.hi) {
            (1, true) => *r = (*r & !0xff00) | ((v & 0xff) << 8),
            (1, false) => *r = (*r & !0xff) | (v & 0xff),
            (2, _) => *r = (*r & !0xffff) | (v & 0xffff),
            (4, _) => *r = v & 0xffff_ffff,
            _ => *r = v,
        }
    }

    /// Reads register `n` at `size` bytes.
    #[inline(always)]
    pub(crate) fn gr(&self, n: usize, size: u8) -> u64 {
        self.st.gpr[n] & size_mask(size)
    }

    /// Writes register `n` at `size` bytes (2 merges, 4 zero-extends).
    #[inline(always)]
    pub(crate) fn sr(&mut self, n: usize, size: u8, v: u64) {
        self.reg_set(
            Operand {
                kind: OpK::Reg,
                reg: n as u8,
                hi: false,
                size,
            },
            v,
        )
    }

    /// Effective address (segment offset) of the memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, d: &DecodedInsn) -> u32 {
        let mut a = d.disp as u64;
        if d.base != NO_REG {
            a = a.wrapping_add(self.st.gpr[d.base as usize]);
        }
        if d.index != NO_REG {
            a = a.wrapping_add(self.st.gpr[d.index as usize].wrapping_mul(d.scale as u64));
        }
        if d.asize == 2 {
            (a & 0xffff) as u32
        } else {
            a as u32
        }
    }

    /// Reads operand `i`, whose kind `K` is known at compile time.
    #[inline(always)]
    pub(crate) fn rdk<const K: u8>(
        &mut self,
        bus: &mut dyn Bus,
        d: &DecodedInsn,
        i: usize,
    ) -> Res<u64> {
        match K {
            KR => Ok(self.reg_get(d.ops[i])),
            KM => {
                let ea = self.ea(d);
                if i == 0 && d.rmw {
                    return self.read_mem_rmw(bus, d.mseg as usize, ea, d.ops[i].size);
                }
                self.read_mem(bus, d.mseg as usize, ea, d.ops[i].size)
            }
            KI => Ok(d.imm & size_mask(d.ops[i].size.max(d.osize))),
            _ => self.rd(bus, d, i),
        }
    }

    /// Writes operand `i`, whose kind `K` is known at compile time.
    #[inline(always)]
    pub(crate) fn wrk<const K: u8>(
        &mut self,
        bus: &mut dyn Bus,
        d: &DecodedInsn,
        i: usize,
        v: u64,
    ) -> Res {
        match K {
            KR => {
                self.reg_set(d.ops[i], v);
                Ok(())
            }
            KM => {
                let ea = self.ea(d);
                self.write_mem(bus, d.mseg as usize, ea, d.ops[i].size, v)
            }
            _ => self.wr(bus, d, i, v),
        }
    }

    /// Reads operand `i`.
    #[inline(always)]
    pub(crate) fn rd(&mut self, bus: &mut dyn Bus, d: &DecodedInsn, i: usize) -> Res<u64> {
        let o = d.ops[i];
        match o.kind {
            OpK::Reg => Ok(self.reg_get(o)),
            OpK::Mem => {
                let ea = self.ea(d);
                if i == 0 && d.rmw {
                    return self.read_mem_rmw(bus, d.mseg as usize, ea, o.size);
                }
                self.read_mem(bus, d.mseg as usize, ea, o.size)
            }
            OpK::Imm => Ok(d.imm & size_mask(o.size.max(d.osize))),
            _ => Err(Exc::ud()),
        }
    }

    /// Writes operand `i`.
    #[inline(always)]
    pub(crate) fn wr(&mut self, bus: &mut dyn Bus, d: &DecodedInsn, i: usize, v: u64) -> Res {
        let o = d.ops[i];
        match o.kind {
            OpK::Reg => {
                self.reg_set(o, v);
                Ok(())
            }
            OpK::Mem => {
                let ea = self.ea(d);
                self.write_mem(bus, d.mseg as usize, ea, o.size, v)
            }
            _ => Err(Exc::ud()),
        }
    }

    /// Stack pointer width: 4 with a big SS, else 2.
    #[inline(always)]
    pub(crate) fn stack_size(&self) -> u8 {
        if self.st.seg[seg::SS].big() {
            4
        } else {
            2
        }
    }

    /// Pushes `size` bytes.
    #[inline]
    pub(crate) fn push(&mut self, bus: &mut dyn Bus, size: u8, v: u64) -> Res {
        let ss = self.stack_size();
        let sp = self.gr(4, ss).wrapping_sub(size as u64) & size_mask(ss);
        self.write_mem(bus, seg::SS, sp as u32, size, v)?;
        self.sr(4, ss, sp);
        Ok(())
    }

    /// Pops `size` bytes.
    #[inline]
    pub(crate) fn pop(&mut self, bus: &mut dyn Bus, size: u8) -> Res<u64> {
        let ss = self.stack_size();
        let sp = self.gr(4, ss);
        let v = self.read_mem(bus, seg::SS, sp as u32, size)?;
        self.sr(4, ss, sp.wrapping_add(size as u64));
        Ok(v)
    }

    /// Reads the stack at `offset` bytes above the stack pointer without
    /// popping (for instructions that must check before committing).
    pub(crate) fn peek_stack(&mut self, bus: &mut dyn Bus, offset: u32, size: u8) -> Res<u64> {
        let ss = self.stack_size();
        let sp = (self.gr(4, ss) as u32).wrapping_add(offset) & size_mask(ss) as u32;
        self.read_mem(bus, seg::SS, sp, size)
    }

    /// CF.
    #[inline(always)]
    pub(crate) fn cf(&self) -> bool {
        if self.lazy.op == FlagOp::Eager {
            self.st.rflags & CF as u64 != 0
        } else {
            self.lazy.cf()
        }
    }

    /// ZF.
    #[inline(always)]
    pub(crate) fn zf(&self) -> bool {
        if self.lazy.op == FlagOp::Eager {
            self.st.rflags & ZF as u64 != 0
        } else {
            self.lazy.zf()
        }
    }

    /// SF.
    #[inline(always)]
    pub(crate) fn sf(&self) -> bool {
        if self.lazy.op == FlagOp::Eager {
            self.st.rflags & SF as u64 != 0
        } else {
            self.lazy.sf()
        }
    }

    /// OF.
    #[inline(always)]
    pub(crate) fn of(&self) -> bool {
        if self.lazy.op == FlagOp::Eager {
            self.st.rflags & OF as u64 != 0
        } else {
            self.lazy.of()
        }
    }

    /// PF.
    #[inline(always)]
    pub(crate) fn pf(&self) -> bool {
        if self.lazy.op == FlagOp::Eager {
            self.st.rflags & PF as u64 != 0
        } else {
            self.lazy.pf()
        }
    }

    /// Evaluates a condition code.
    #[inline]
    pub(crate) fn cond(&self, cc: ConditionCode) -> bool {
        use ConditionCode::*;
        match cc {
            o => self.of(),
            no => !self.of(),
            b => self.cf(),
            ae => !self.cf(),
            e => self.zf(),
            ne => !self.zf(),
            be => self.cf() || self.zf(),
            a => !self.cf() && !self.zf(),
            s => self.sf(),
            ns => !self.sf(),
            p => self.pf(),
            np => !self.pf(),
            l => self.sf() != self.of(),
            ge => self.sf() == self.of(),
            le => self.zf() || self.sf() != self.of(),
            g => !self.zf() && self.sf() == self.of(),
            None => true,
        }
    }

    /// Records lazily computed flags.
    #[inline(always)]
    pub(crate) fn set_lazy(
        &mut self,
        op: FlagOp,
        size: u8,
        res: u64,
        a: u64,
        b: u64,
        carry_in: bool,
    ) {
        self.lazy.op = op;
        self.lazy.size = size;
        self.lazy.res = res;
        self.lazy.a = a;
        self.lazy.b = b;
        self.lazy.carry_in = carry_in;
    }

    /// IOPL.
    #[inline]
    pub(crate) fn iopl(&self) -> u8 {
        ((self.st.rflags >> 12) & 3) as u8
    }

    /// Reports a sensitive instruction to the bus (when enabled).
    pub(crate) fn note_sensitive(
        &mut self,
        bus: &mut dyn Bus,
        kind: SensitiveKind,
        operand: u64,
        result: u64,
    ) {
        if !self.report_sensitive {
            return;
        }
        let (cs_base, cpl, iopl) = (self.st.seg[seg::CS].base, self.cpl, self.iopl());
        self.note_sensitive_as(bus, kind, operand, result, (cs_base, cpl, iopl));
    }

    /// Reports a sensitive instruction that already changed CS or the CPL
    /// (IRET): `before` is (CS base, CPL, IOPL) as they were when it began.
    pub(crate) fn note_sensitive_as(
        &mut self,
        bus: &mut dyn Bus,
        kind: SensitiveKind,
        operand: u64,
        result: u64,
        before: (u64, u8, u8),
    ) {
        if !self.report_sensitive {
            return;
        }
        let ev = SensitiveEvent {
            kind,
            linear_ip: before.0.wrapping_add(self.st.rip),
            ip: self.st.rip,
            cpl: before.1,
            iopl: before.2,
            operand,
            result,
        };
        bus.sensitive(&ev);
    }

    /// Sets the next instruction pointer (a jump), masked to the operand
    /// size, with the CS limit check.
    #[inline]
    pub(crate) fn jump_near(&mut self, target: u64, size: u8) -> Res {
        let t = target & size_mask(size);
        if t > self.st.seg[seg::CS].limit as u64 && !self.long_mode_active() {
            return Err(Exc::gp(0));
        }
        self.next_ip = t;
        Ok(())
    }

    /// Long mode is not implemented yet.
    #[inline(always)]
    pub(crate) fn long_mode_active(&self) -> bool {
        false
    }
}
