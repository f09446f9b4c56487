//! The x87 FPU: every x87 instruction on 80-bit extended precision, plus
//! the SSE state instructions (FXSAVE/FXRSTOR), with #NM from CR0.TS/EM/MP
//! and #MF for unmasked exceptions (CR0.NE = 1).
//!
//! The arithmetic lives in `fpu/soft.rs` (software 80-bit floating point
//! with x87 rounding, precision control and exception rules). This file
//! maps instructions to handlers; `fpu/regs.rs` keeps the register stack
//! (TOP, tag word, stack overflow/underflow and their masked responses),
//! each instruction's prologue and epilogue (exception flags and their
//! delivery, the last-instruction/data pointers, the memory forms);
//! `control`, `load_store`, `arith`, `compare` and `transcendental` hold
//! the handlers by kind.
//!
//! The transcendental instructions (F2XM1, FYL2X, FYL2XP1, FPTAN, FPATAN,
//! FSIN, FCOS, FSINCOS) compute in `fpu/trans.rs`: double-double evaluation
//! rounded once, within an ulp of the hardware's results (which are not
//! correctly rounded either), with the hardware's 66-bit π/2 for the
//! argument reduction.
//!
//! `tests/x87.rs` checks all of this against the host's own x87.

mod arith;
mod compare;
mod control;
mod load_store;
mod regs;
mod soft;
mod trans;
mod transcendental;

use arith::*;
use compare::*;
use control::*;
use load_store::*;
use regs::*;
use transcendental::*;

use iced_x86::{ConditionCode, Instruction, MemorySize, Mnemonic, Register};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::decode::{DecodedInsn, OpK};
use crate::exception::{Exc, Res, Vector};
use crate::exec::Handler;
use crate::state::{cr, seg, FpuState, F80};

use soft::{Class, Env, DE, IE, INDEFINITE, OE, PE, UE, ZE};

type R = Res;

/// FSW bits.
const C0: u16 = 1 << 8;
const C1: u16 = 1 << 9;
const C2: u16 = 1 << 10;
const C3: u16 = 1 << 14;
const SF: u16 = 1 << 6;
const ES: u16 = 1 << 7;
const BUSY: u16 = 1 << 15;

/// The handler for an x87/SSE-state instruction, if it is one.
pub(crate) fn handler_for(insn: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    Some(match insn.mnemonic() {
        Fninit => fninit,
        Fnstsw => fnstsw,
        Fnstcw => fnstcw,
        Fldcw => fldcw,
        Fnclex => fnclex,
        Wait => fwait,
        Fnsave => fnsave,
        Frstor => frstor,
        Fnstenv => fnstenv,
        Fldenv => fldenv,
        Fxsave => fxsave,
        Fxrstor => fxrstor,
        Finit | Fstsw | Fstcw | Fclex | Fsave | Fstenv => waiting_control,
        Fnop => fnop,
        // The 8087/287 FENI/FDISI/FSETPM execute as FNOP since the 387.
        Feni | Fneni | Fdisi | Fndisi | Fsetpm | Fnsetpm => fnop,
        Fld => fld,
        Fst | Fstp | Fstpnce => fst,
        Fild => fild,
        Fist | Fistp | Fisttp => fist,
        Fbld => fbld,
        Fbstp => fbstp,
        Fld1 | Fldz | Fldpi | Fldl2e | Fldl2t | Fldlg2 | Fldln2 => fldconst,
        Fxch => fxch,
        Ffree | Ffreep => ffree,
        Fincstp | Fdecstp => fincdec,
        Fadd | Faddp | Fiadd | Fsub | Fsubp | Fisub | Fsubr | Fsubrp | Fisubr | Fmul | Fmulp
        | Fimul | Fdiv | Fdivp | Fidiv | Fdivr | Fdivrp | Fidivr => farith,
        Fchs | Fabs => fsign,
        Fsqrt | Frndint => funary,
        Fscale => fscale,
        Fxtract => fxtract,
        Fprem | Fprem1 => fprem,
        Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom | Ficomp => fcom,
        Ftst => ftst,
        Fxam => fxam,
        Fcomi | Fcomip | Fucomi | Fucomip => fcomi,
        Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe | Fcmovnu => fcmov,
        F2xm1 | Fyl2x | Fyl2xp1 | Fptan | Fpatan | Fsin | Fcos | Fsincos => ftrans,
        _ if is_x87(insn) => x87_unimplemented,
        _ => return None,
    })
}

/// An x87 instruction: one of the escape opcodes D8–DF. (Decoding calls
/// this for every instruction the match above does not name: it must be
/// cheap.)
fn is_x87(insn: &Instruction) -> bool {
    crate::facts::is_x87(insn.code())
}

/// #NM rules for x87 instructions (SDM table 2-2).
fn nm_check(c: &Cpu) -> R {
    if c.st.cr0 & (cr::CR0_EM | cr::CR0_TS) != 0 {
        return Err(Exc::fault(Vector::NM));
    }
    Ok(())
}

/// A pending unmasked exception (ES) raises #MF before a waiting x87
/// instruction when CR0.NE = 1. With CR0.NE = 0 the PC routes it to FERR#
/// and IRQ 13, which is not modelled: the instruction just runs.
fn mf_check(c: &Cpu) -> R {
    if c.st.fpu.fsw & ES != 0 && c.st.cr0 & cr::CR0_NE != 0 {
        return Err(Exc::fault(Vector::MF));
    }
    Ok(())
}

/// Recomputes ES and B from the exception flags and masks (after FLDCW,
/// FLDENV, FRSTOR, FXRSTOR).
fn update_es(f: &mut FpuState) {
    if f.fsw & !f.fcw & 0x3f != 0 {
        f.fsw |= ES | BUSY;
    } else {
        f.fsw &= !(ES | BUSY);
    }
}
